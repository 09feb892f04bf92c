//! The backend the runner applies refs and extent ops to (semantics.md §6.10), and
//! a strict in-memory implementation.

#![forbid(unsafe_code)]

mod mem;

pub use mem::{ExtentItem, MemExtentTree};

use crate::domain::extent_op::ExtentOp;
use crate::domain::key::RefKey;
use crate::domain::kind::Action;
use crate::error::ExtentError;

/// One merged ref being run (`run_one_delayed_ref`'s arguments).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RefRun<'a> {
    /// Extent start.
    pub bytenr: u64,
    /// Extent length (the head's).
    pub num_bytes: u64,
    /// Whether the head is a data head.
    pub is_data: bool,
    /// The backref.
    pub key: RefKey,
    /// Tree level of a tree ref (0 for data).
    pub level: u8,
    /// `Add` or `Drop`.
    pub action: Action,
    /// Merged count, at least 1.
    pub ref_mod: u64,
    /// The extent item must be inserted by this run (must_insert_reserved).
    pub insert_reserved: bool,
    /// The head's extent op, applied by this run if present.
    pub extent_op: Option<&'a ExtentOp>,
    /// The head's owning root.
    pub owning_root: u64,
}

/// What a reader sees of one extent.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ExtentInfo {
    /// Reference count.
    pub refs: u64,
    /// Extent flags.
    pub flags: u64,
}

/// An extent tree the runner applies refs to. Implementations are shared by
/// concurrent runners; each call must be atomic for its extent.
///
/// # Errors and panics
///
/// An error from [`ExtentTree::apply_ref`] or [`ExtentTree::apply_extent_op`]
/// puts the ref (or op) back on its head and releases the head: the run
/// returns [`crate::Error::Backend`] and a later run retries it. A panic
/// does the same, then goes on unwinding into the caller of `run`,
/// `run_one` or `commit_drain`: nothing queued is lost, no head stays
/// claimed, and a later run or `destroy` finishes (tests/backend_panic.rs,
/// every implementation). A panic in [`ExtentTree::pin_reserved`], called
/// after its head was retired, loses only that pin.
pub trait ExtentTree: Send + Sync {
    /// Apply one merged ref (semantics.md §6.10). On error nothing may have changed.
    fn apply_ref(&self, run: &RefRun<'_>) -> Result<(), ExtentError>;

    /// Apply an extent op to an existing item (`run_delayed_extent_op`,
    /// semantics.md §6.11 step 1).
    fn apply_extent_op(&self, bytenr: u64, num_bytes: u64, is_data: bool, op: &ExtentOp) -> Result<(), ExtentError>;

    /// A reserved extent whose item was never inserted is pinned (semantics.md §6.11
    /// step 4, §7.3). The in-memory tree only counts it.
    fn pin_reserved(&self, bytenr: u64, num_bytes: u64, is_data: bool);

    /// The extent's on-disk refs and flags, `None` if it has no item.
    fn lookup(&self, bytenr: u64) -> Option<ExtentInfo>;
}

/// What a failed backend call left: its error, or the payload of its panic,
/// which the run resumes once it has put back what the call was given.
pub(crate) enum BackendFailure {
    Error(ExtentError),
    Panic(Box<dyn std::any::Any + Send>),
}

/// Call the backend, catching a panic (both implementations' runs).
pub(crate) fn call_backend(f: impl FnOnce() -> Result<(), ExtentError>) -> Result<(), BackendFailure> {
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)) {
        Ok(res) => res.map_err(BackendFailure::Error),
        Err(panic) => Err(BackendFailure::Panic(panic)),
    }
}

impl BackendFailure {
    /// Whether the call panicked.
    pub(crate) fn is_panic(&self) -> bool {
        matches!(self, BackendFailure::Panic(_))
    }

    /// The run's error for `bytenr`; a panic resumes unwinding instead.
    pub(crate) fn into_error(self, bytenr: u64) -> crate::Error {
        match self {
            BackendFailure::Error(source) => crate::Error::Backend { bytenr, source },
            BackendFailure::Panic(panic) => std::panic::resume_unwind(panic),
        }
    }
}
