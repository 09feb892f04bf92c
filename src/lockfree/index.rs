//! The two index-level steps of the head lifecycle, written once against
//! the storage seam ([`OrderedMap`], module `store`).
//!
//! # Implementation details
//!
//! [`enter`] finds or inserts a head and enters it as an adder, unlinking a
//! closed one on the way; [`retire`] closes from an exact word, then
//! unlinks. The runtime runs them on crossbeam-skiplist; the loom and
//! shuttle models and Miri on the mock map of module `store` (whose
//! contract with the skiplist is written there).
//!
//! # Synchronization
//!
//! All of it is in the head's state word (`state`): the index only
//! publishes and unlinks. An adder that finds a closed head helps unlink it
//! and retries, so it never enters a head a runner retired (hazard 1).

#![forbid(unsafe_code)]

use super::state::HeadState;
use super::store::{MapEntry, OrderedMap};

/// A value stored in the index: anything with a lifecycle word.
pub(crate) trait Indexed {
    fn state(&self) -> &HeadState;
}

/// Find or create the head for `key`, enter it as an adder (semantics.md §4.5,
/// hazard 1) and call `f` on it with whether this adder is the head's
/// first; `f` must leave (exit) before it returns.
///
/// An existing head costs one search (`get`). A missing one costs one more:
/// the insert's own search, with `f` called on the entry the insert found
/// or made (no search again to find what was just inserted).
pub(crate) fn enter<'g, H: Indexed, M: OrderedMap<u64, H>, R>(
    index: &'g M,
    key: u64,
    make: impl Fn() -> H,
    f: impl FnOnce(&H, bool) -> R,
    guard: &'g M::Guard,
) -> R {
    let mut f = Some(f);
    loop {
        if let Some(entry) = index.get(&key, guard) {
            match entry.value().state().enter() {
                Ok(first) => return f.take().expect("f runs once")(entry.value(), first),
                Err(_) => {
                    // Closed: its closer is about to unlink it; help, then
                    // retry into a fresh head.
                    entry.remove();
                    crate::sync::spin_hint();
                    continue;
                }
            }
        }
        let done = index.upsert(
            key,
            &make,
            |h| match h.state().enter() {
                Ok(first) => (Some(f.take().expect("f runs once")(h, first)), false),
                // Closed (a head inserted, run and retired since the
                // `get`): unlink it and retry.
                Err(_) => (None, true),
            },
            guard,
        );
        match done {
            Some(r) => return r,
            None => crate::sync::spin_hint(),
        }
    }
}

/// Close a claimed head from exactly `w0` and unlink it (semantics.md §6.11 steps
/// 2-3). False: an adder entered since `w0`; the caller keeps its claim.
pub(crate) fn retire<H: Indexed, E: MapEntry<u64, H>>(entry: &E, w0: u64) -> bool {
    if !entry.value().state().close_from(w0) {
        return false;
    }
    entry.remove();
    true
}

#[cfg(all(test, not(any(dref_loom, dref_shuttle))))]
mod tests {
    use super::*;
    use crate::lockfree::state::CLOSED;
    use crate::lockfree::store::mock::MockMap;
    use crate::lockfree::store::{MapEntry, OrderedMap};
    use crate::sync::{AtomicI64, Ordering};

    #[derive(Debug)]
    struct H {
        state: HeadState,
        count: AtomicI64,
    }

    impl Indexed for H {
        fn state(&self) -> &HeadState {
            &self.state
        }
    }

    fn fresh() -> H {
        H { state: HeadState::new(), count: AtomicI64::new(0) }
    }

    #[test]
    fn enter_creates_once_and_reports_first() {
        let idx = MockMap::<u64, H>::new();
        let enter_and_leave = || {
            enter(
                &idx,
                7,
                fresh,
                |h, first| {
                    h.state().exit();
                    first
                },
                &(),
            )
        };
        assert!(enter_and_leave());
        let e = idx.get(&7, &()).unwrap();
        assert!(!enter_and_leave());
        assert!(e.same_node(&idx.get(&7, &()).unwrap()));
        assert_eq!(idx.len(), 1);
    }

    #[test]
    fn closed_head_is_unlinked_and_replaced() {
        let idx = MockMap::<u64, H>::new();
        enter(&idx, 7, fresh, |h, _| h.count.fetch_add(1, Ordering::Relaxed), &());
        let e = idx.get(&7, &()).unwrap();
        let h = e.value();
        h.state().exit();
        assert!(h.state().try_claim());
        assert!(!retire(&e, h.state().load() | (1 << 3)), "a word with an adder never closes");
        h.count.store(0, Ordering::Relaxed);
        let w0 = h.state().load();
        // An adder comes and goes after w0: the close must fail.
        enter(&idx, 7, fresh, |h, _| h.state().exit(), &());
        assert!(!retire(&e, w0));
        let w1 = h.state().load();
        assert!(retire(&e, w1));
        assert!(idx.is_empty(), "retire unlinks");
        assert!(!e.remove(), "unlink is by node identity, once");
        // A stale entry to the closed node: the next adder gets a new head.
        let (first, w) = enter(
            &idx,
            7,
            fresh,
            |h, first| {
                let w = h.state().load();
                h.state().exit();
                (first, w)
            },
            &(),
        );
        assert!(first);
        assert_eq!(w & CLOSED, 0);
    }

    #[test]
    fn unlink_never_removes_a_newer_node() {
        let idx = MockMap::<u64, H>::new();
        enter(&idx, 9, fresh, |h, _| h.state().exit(), &());
        let old = idx.get(&9, &()).unwrap();
        assert!(old.remove());
        enter(&idx, 9, fresh, |h, _| h.state().exit(), &());
        assert!(!old.remove());
        assert_eq!(idx.len(), 1);
    }
}
