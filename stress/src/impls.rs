//! The implementations this binary can run, behind one dispatch function.
//!
//! Enabling an implementation is a one-line change in [`with_impl`].

use delayed_refs::DelayedRefs;

/// Work that is generic over the implementation ([`with_impl`] picks it).
pub trait ImplVisitor {
    /// What the work returns.
    type Output;

    /// Do the work with implementation `D`.
    fn visit<D: DelayedRefs>(self) -> Self::Output;
}

/// Run `visitor` with the implementation called `name`; `None` if that
/// implementation is unknown or not available yet.
pub fn with_impl<V: ImplVisitor>(name: &str, visitor: V) -> Option<V::Output> {
    match name {
        "locked" => Some(visitor.visit::<delayed_refs::LockedRefs>()),
        "lockfree" => Some(visitor.visit::<delayed_refs::LockFreeRefs>()),
        "sharded" => Some(visitor.visit::<delayed_refs::ShardedRefs>()),
        _ => None,
    }
}

/// A visitor that only reports the implementation's own name.
struct Probe;

impl ImplVisitor for Probe {
    type Output = &'static str;

    fn visit<D: DelayedRefs>(self) -> &'static str {
        D::NAME
    }
}

/// Whether the implementation called `name` can be run.
pub fn is_available(name: &str) -> bool {
    with_impl(name, Probe).is_some()
}

/// The message for an implementation that is not available.
pub fn unavailable_message(name: &str) -> String {
    format!("{name} implementation not yet available")
}
