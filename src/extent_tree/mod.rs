//! The backend the runner applies refs and extent ops to (semantics.md §6.10), and
//! a strict in-memory implementation.
//!
//! # The contract, in short
//!
//! - **Calls.** [`ExtentTree::apply_ref`] once per merged ref,
//!   [`ExtentTree::apply_extent_op`] for an op left without a ref,
//!   [`ExtentTree::pin_reserved`] for a cancelled allocation,
//!   [`ExtentTree::lookup`] for readers. Each is atomic for its extent: on
//!   error it changed nothing.
//! - **Batches.** Every call a run makes carries a [`Batch`]: the root's
//!   transaction id and the run's id. [`ExtentTree::begin_run`] /
//!   [`ExtentTree::end_run`] bracket one `run`, `run_one` (or one runner of
//!   `commit_drain`); [`ExtentTree::begin_head`] / [`ExtentTree::end_head`]
//!   bracket the refs of one head within it. All four default to no-ops.
//! - **Ordering.** Within a head: every ADD before the DROPs that were queued
//!   with it, and every ref before the head's leftover extent op. Across
//!   heads: nothing. Two runners run two different heads at once, each inside
//!   its own run batch, and one run visits heads in an order of its choosing.
//!   A head is run by one runner at a time, so the calls for one extent never
//!   overlap (the backend's per-extent atomicity is enough).
//! - **Failure.** An error or a panic from a call leaves the ref (or op)
//!   queued and its head released; see [`ExtentTree`] and
//!   [`crate::Error::recovery`].
//!
//! docs/backend.md has the whole contract: the call table, batches,
//! ordering, durability, recovery, backpressure and fault injection.

#![forbid(unsafe_code)]

mod faults;
mod mem;

pub use faults::{FaultConfig, FaultStats, FaultyTree, InjectedFault, InjectedPanic};
pub use mem::{ExtentItem, MemExtentTree};

use std::sync::Arc;

use crate::domain::extent_op::ExtentOp;
use crate::domain::key::RefKey;
use crate::domain::kind::Action;
use crate::error::ExtentError;

/// Which run a backend call belongs to.
///
/// A database backend keys its open state on `run` and can stamp `transid`
/// on what it writes. On a store with one writer at a time (redb, LMDB,
/// SQLite), hold a write transaction per *head* (`begin_head` ..
/// `end_head`) and make the run durable in `end_run`: a write transaction
/// held for a whole run deadlocks two runners in `RunMode::All`, one holding
/// the writer while it waits for a head the other has claimed, the other
/// waiting for the writer (docs/backend.md §2, §10). Run ids are unique and
/// increasing within a root, not dense: a run that found nothing used one.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Batch {
    /// The transaction id the root was created with
    /// ([`DelayedRefs::for_transaction`](crate::DelayedRefs::for_transaction)).
    pub transid: u64,
    /// The run, unique within the root, counting from 1. `0` marks a call
    /// made outside any run: the pins of abort cleanup (`destroy`).
    pub run: u64,
}

/// How a batch ended, as [`ExtentTree::end_head`] and
/// [`ExtentTree::end_run`] are told.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum BatchEnd {
    /// Everything the batch took ran; a head left the index.
    Completed,
    /// A head only: a tree-mod-log blocker held a ref back, the head went
    /// back to the index with that ref (and any after it) still queued.
    HeldBack,
    /// A call failed with an error: the failing ref is back on its head.
    Failed,
    /// A call panicked: the failing ref is back on its head, and the panic
    /// unwinds into the caller once the end hooks have returned.
    Panicked,
}

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
    /// The run this ref is applied in.
    pub batch: Batch,
}

/// An extent op run on its own, without a ref (`run_delayed_extent_op`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OpRun<'a> {
    /// Extent start.
    pub bytenr: u64,
    /// Extent length.
    pub num_bytes: u64,
    /// Whether the head is a data head.
    pub is_data: bool,
    /// The op.
    pub op: &'a ExtentOp,
    /// The run this op is applied in.
    pub batch: Batch,
}

/// A reserved extent whose item was never inserted (its allocation was
/// cancelled within the transaction), to be pinned.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Pin {
    /// Extent start.
    pub bytenr: u64,
    /// Extent length.
    pub num_bytes: u64,
    /// Whether it is a data extent.
    pub is_data: bool,
    /// The run that retired the head, or run 0 for abort cleanup.
    pub batch: Batch,
}

/// What a reader sees of one extent.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ExtentInfo {
    /// Reference count.
    pub refs: u64,
    /// Extent flags.
    pub flags: u64,
}

/// A backend's own failure (an I/O error, a database error), carried inside
/// [`ExtentError::Storage`].
///
/// Cheap to clone (shared); two values are equal when they share the same
/// error. Its `Display` is the wrapped error's; its `source` the wrapped
/// error's source, so a reporter walking the chain prints each cause once.
///
/// ```
/// use delayed_refs::{ExtentError, StorageError};
/// let io = std::io::Error::new(std::io::ErrorKind::Other, "disk gone");
/// let e = ExtentError::Storage(StorageError::new(io));
/// let ExtentError::Storage(s) = &e else { unreachable!() };
/// assert_eq!(s.to_string(), "disk gone");
/// assert!(s.downcast_ref::<std::io::Error>().is_some());
/// ```
#[derive(Clone)]
pub struct StorageError(Arc<dyn std::error::Error + Send + Sync + 'static>);

impl StorageError {
    /// Wrap a backend's error.
    pub fn new(error: impl std::error::Error + Send + Sync + 'static) -> Self {
        StorageError(Arc::new(error))
    }

    /// Wrap a boxed error (what `?` on mixed error types often yields).
    pub fn from_boxed(error: Box<dyn std::error::Error + Send + Sync + 'static>) -> Self {
        StorageError(Arc::from(error))
    }

    /// The wrapped error.
    pub fn get_ref(&self) -> &(dyn std::error::Error + Send + Sync + 'static) {
        &*self.0
    }

    /// The wrapped error, if it is a `T`.
    pub fn downcast_ref<T: std::error::Error + 'static>(&self) -> Option<&T> {
        self.0.downcast_ref::<T>()
    }
}

impl std::fmt::Debug for StorageError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("StorageError").field(&self.0).finish()
    }
}

impl std::fmt::Display for StorageError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Display::fmt(&self.0, f)
    }
}

impl std::error::Error for StorageError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.0.source()
    }
}

impl PartialEq for StorageError {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }
}

impl Eq for StorageError {}

/// An extent tree the runner applies refs to. Implementations are shared by
/// concurrent runners; each call must be atomic for its extent.
///
/// # Errors and panics
///
/// An error from [`apply_ref`](Self::apply_ref) or
/// [`apply_extent_op`](Self::apply_extent_op) puts the ref (or op) back on
/// its head and releases the head: the run returns
/// [`crate::Error::Backend`] and a later run retries it. A panic does the
/// same, calls the end hooks with [`BatchEnd::Panicked`], then goes on
/// unwinding into the caller of `run`, `run_one` or `commit_drain`: nothing
/// queued is lost, no head stays claimed, and a later run or `destroy`
/// finishes (tests/backend_panic.rs, tests/backend_errors.rs, every
/// implementation).
///
/// An error from [`lookup`](Self::lookup) fails the reader's call
/// ([`crate::Error::Backend`]); nothing changes. An error from
/// [`begin_run`](Self::begin_run) or [`begin_head`](Self::begin_head) stops
/// the run before it takes anything from that head ([`crate::Error::Hook`]).
///
/// Two failures cannot be undone by the queue, because what they concern has
/// already left it: [`pin_reserved`](Self::pin_reserved), called once the
/// head is retired ([`crate::Error::PinLost`]), and the end hooks, which a
/// database backend uses to commit refs that `apply_ref` already accepted
/// ([`crate::Error::Hook`] with an end hook). Both mean the transaction
/// cannot complete: abort it (`destroy`) and go back to the last committed
/// state, as btrfs does when a commit fails.
/// [`crate::Error::recovery`] tells a caller which case it is in.
///
/// # Batches and durability
///
/// A ref whose `apply_ref` returned `Ok` has left the queue for good. A
/// backend that buffers writes (a write transaction per head, committed in
/// `end_head`, made durable in `end_run`) must commit them whatever the
/// [`BatchEnd`]: `Failed` and `Panicked` only say that the run stopped
/// early, not that the refs it applied before are void. If it cannot
/// isolate a failure to the one call that failed (a write error half-way
/// through a transaction that holds earlier refs), it must not report it as
/// a plain storage error from that call, which promises a retry: poison the
/// batch and fail its end hook, which asks for an abort.
///
/// # Which calls nest where
///
/// Within a run: `begin_run` (once, when the run has claimed its first
/// head), then per head `begin_head`, its `apply_ref`s, `apply_extent_op`s
/// and at most one `pin_reserved`, then `end_head`; `end_run` last. A failed
/// `begin_head` is not followed by an `end_head`. `end_head` is called after
/// the head was released: another runner may already have claimed the same
/// extent (a new head of it, or the same head after `HeldBack` or a
/// failure), and its `begin_head` may come before this `end_head` returns.
/// The pins of `destroy` (`batch.run == 0`) come with no hook around them:
/// such a call must make itself durable.
///
/// # What `apply_ref` does (the rules of [`MemExtentTree`])
///
/// An ADD (`Action::Add` or `AddExtent`) with `insert_reserved` inserts the
/// extent item (flags [`EXTENT_FLAG_DATA`](crate::EXTENT_FLAG_DATA) or
/// [`EXTENT_FLAG_TREE_BLOCK`](crate::EXTENT_FLAG_TREE_BLOCK), `ref_mod`
/// refs, this backref, then the op's flags) and fails with
/// [`ExtentError::AlreadyExists`] if it exists; an ADD without it adds
/// `ref_mod` to the backref and the item's count
/// ([`ExtentError::MissingExtent`] if there is no item); a DROP takes
/// `ref_mod` from the backref ([`ExtentError::BackrefUnderflow`] below
/// zero) and deletes the item when its count reaches zero; a tree ref with
/// `ref_mod != 1` is [`ExtentError::TreeRefMod`]; a ref whose kind differs
/// from the item's is [`ExtentError::KindMismatch`]. `insert_reserved` comes
/// only with an ADD; anything a backend cannot represent is
/// [`ExtentError::Unsupported`] (never a storage error, which would be
/// retried forever).
pub trait ExtentTree: Send + Sync {
    /// Apply one merged ref (semantics.md §6.10). On error nothing may have changed.
    fn apply_ref(&self, run: &RefRun<'_>) -> Result<(), ExtentError>;

    /// Apply an extent op to an existing item (`run_delayed_extent_op`,
    /// semantics.md §6.11 step 1). On error nothing may have changed.
    fn apply_extent_op(&self, run: &OpRun<'_>) -> Result<(), ExtentError>;

    /// A reserved extent whose item was never inserted is pinned (semantics.md §6.11
    /// step 4, §7.3): its space must not be reused before the transaction
    /// commits, then it is free (btrfs unpins at commit). A durable backend
    /// records the pinned range; the in-memory tree only counts the bytes.
    /// Within a run it comes inside the head's `begin_head` .. `end_head`;
    /// from `destroy` (`pin.batch.run == 0`) with no hook around it.
    fn pin_reserved(&self, pin: &Pin) -> Result<(), ExtentError>;

    /// The extent's refs and flags, `None` if it has no item. It must
    /// reflect every [`apply_ref`](Self::apply_ref) that returned `Ok`,
    /// committed or not: a backend that buffers writes per batch answers
    /// from its buffer first (readers add the queued count to this one).
    fn lookup(&self, bytenr: u64) -> Result<Option<ExtentInfo>, ExtentError>;

    /// A run starts: called once the run has claimed its first head (a run
    /// that finds nothing calls no hook). An error releases that head
    /// untouched and ends the run (and no `end_run` follows).
    fn begin_run(&self, batch: Batch) -> Result<(), ExtentError> {
        let _ = batch;
        Ok(())
    }

    /// A run that `begin_run` opened ends: every ref it applied has been
    /// given to [`apply_ref`](Self::apply_ref). Called once per successful
    /// `begin_run`, on the runner's thread, also when the run failed or
    /// panicked.
    fn end_run(&self, batch: Batch, end: BatchEnd) -> Result<(), ExtentError> {
        let _ = (batch, end);
        Ok(())
    }

    /// A run claimed the head of `bytenr` and is about to run its refs. An
    /// error releases the head untouched (and no `end_head` follows).
    fn begin_head(&self, batch: Batch, bytenr: u64) -> Result<(), ExtentError> {
        let _ = (batch, bytenr);
        Ok(())
    }

    /// The run of one head ends ([`BatchEnd::Completed`]: the head left the
    /// index; `HeldBack`: it went back with refs held by a blocker). Called
    /// after the head was released (see "Which calls nest where").
    fn end_head(&self, batch: Batch, bytenr: u64, end: BatchEnd) -> Result<(), ExtentError> {
        let _ = (batch, bytenr, end);
        Ok(())
    }
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

    /// The error of a failed pin (its head is gone); a panic resumes
    /// unwinding instead.
    pub(crate) fn into_pin_error(self, pin: &Pin) -> crate::Error {
        match self {
            BackendFailure::Error(source) => {
                crate::Error::PinLost { bytenr: pin.bytenr, num_bytes: pin.num_bytes, source }
            }
            BackendFailure::Panic(panic) => std::panic::resume_unwind(panic),
        }
    }

    /// The error of a failed batch hook; a panic resumes unwinding instead.
    pub(crate) fn into_hook_error(self, hook: crate::error::Hook) -> crate::Error {
        match self {
            BackendFailure::Error(source) => crate::Error::Hook { hook, source },
            BackendFailure::Panic(panic) => std::panic::resume_unwind(panic),
        }
    }
}
