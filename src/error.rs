//! Typed errors. Bad input never panics and never changes queued state.

#![forbid(unsafe_code)]

use crate::domain::key::RefKey;
use crate::domain::kind::Action;
use crate::extent_tree::StorageError;

/// Errors of the extent-tree backend (semantics.md §6.10).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ExtentError {
    /// A ref was added to, or dropped from, an extent with no item.
    #[error("extent {bytenr} has no extent item")]
    MissingExtent {
        /// Extent start.
        bytenr: u64,
    },
    /// must_insert_reserved asked to insert an item that already exists.
    #[error("extent {bytenr} already has an extent item")]
    AlreadyExists {
        /// Extent start.
        bytenr: u64,
    },
    /// A drop would take a backref count below zero.
    #[error("extent {bytenr}: dropping {drop} from backref {key:?} holding {have}")]
    BackrefUnderflow {
        /// Extent start.
        bytenr: u64,
        /// The backref.
        key: RefKey,
        /// Its current count.
        have: u64,
        /// The requested drop.
        drop: u64,
    },
    /// A tree ref ran with `ref_mod != 1` (-EUCLEAN, semantics.md §11.14).
    #[error("extent {bytenr}: tree ref {key:?} with ref_mod {ref_mod} (must be 1)")]
    TreeRefMod {
        /// Extent start.
        bytenr: u64,
        /// The backref.
        key: RefKey,
        /// The offending count.
        ref_mod: u64,
    },
    /// A ref's kind (data or tree) disagrees with the extent item.
    #[error("extent {bytenr}: data/metadata mismatch with the extent item")]
    KindMismatch {
        /// Extent start.
        bytenr: u64,
    },
    /// The backend's own failure (I/O, database): the extent tree may be
    /// fine, the call did not go through and changed nothing, so a retry
    /// may succeed. Built with [`ExtentError::storage`].
    #[error("storage failure")]
    Storage(#[source] StorageError),
    /// The backend cannot represent this ref or op (a combination it does
    /// not support): not retryable.
    #[error("extent {bytenr}: the backend does not support {what}")]
    Unsupported {
        /// Extent start.
        bytenr: u64,
        /// What it does not support.
        what: &'static str,
    },
}

impl ExtentError {
    /// Wrap a backend's own error as [`ExtentError::Storage`].
    pub fn storage(error: impl std::error::Error + Send + Sync + 'static) -> Self {
        ExtentError::Storage(StorageError::new(error))
    }

    /// Whether this is the backend's own failure ([`ExtentError::Storage`])
    /// rather than a disagreement between the queue and the extent tree.
    pub fn is_storage(&self) -> bool {
        matches!(self, ExtentError::Storage(_))
    }
}

/// Which backend hook failed ([`Error::Hook`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Hook {
    /// [`ExtentTree::begin_run`](crate::ExtentTree::begin_run).
    BeginRun,
    /// [`ExtentTree::end_run`](crate::ExtentTree::end_run).
    EndRun,
    /// [`ExtentTree::begin_head`](crate::ExtentTree::begin_head) for this extent.
    BeginHead(u64),
    /// [`ExtentTree::end_head`](crate::ExtentTree::end_head) for this extent.
    EndHead(u64),
}

/// What a caller does after an [`Error`] ([`Error::recovery`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Recovery {
    /// The call was refused and changed nothing: fix the input (or the
    /// caller's accounting) and call again.
    Rejected,
    /// Nothing queued was lost: the failing ref is back on its head (or the
    /// run never took it). Run again once the backend has recovered.
    Retry,
    /// Out of reserved space: run delayed refs (or commit the transaction)
    /// to release reservations, then call again.
    RunRefs,
    /// The transaction cannot complete: the extent tree disagrees with the
    /// queue, or something that had already left the queue may not have
    /// reached storage. Abort it: `destroy` the root, then go back to the
    /// last committed state.
    Abort,
}

/// Errors of the delayed-ref API.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// `num_bytes == 0`.
    #[error("extent {bytenr}: num_bytes is zero")]
    ZeroLength {
        /// Extent start.
        bytenr: u64,
    },
    /// The ref's kind disagrees with the existing head (the kernel BUGs, §4.6 step 1).
    #[error("extent {bytenr}: head is {}, ref is {}", if *.head_is_data { "data" } else { "metadata" }, if *.head_is_data { "metadata" } else { "data" })]
    DataMismatch {
        /// Extent start.
        bytenr: u64,
        /// Whether the existing head is a data head.
        head_is_data: bool,
    },
    /// Reserved bytes were passed with a metadata ref (the kernel BUGs, §4.4 step 1).
    #[error("extent {bytenr}: {reserved} reserved bytes on a metadata ref")]
    ReservedOnMetadata {
        /// Extent start.
        bytenr: u64,
        /// The reserved bytes passed.
        reserved: u64,
    },
    /// The call does not take this action or this kind of ref.
    #[error("{call} does not take {action:?} {what}")]
    BadAction {
        /// The API entry point.
        call: &'static str,
        /// The action passed.
        action: Action,
        /// What else was wrong, if anything.
        what: &'static str,
    },
    /// A tree block or extent data ref without a referencing root (root 0):
    /// also what [`GenericRef::new`](crate::GenericRef::new) leaves when
    /// [`.tree()`](crate::GenericRef::tree) is forgotten (semantics.md §4.10).
    #[error("extent {bytenr}: the ref has no referencing root (root 0; was .tree() or .data() forgotten?)")]
    MissingRoot {
        /// Extent start.
        bytenr: u64,
    },
    /// A shared (block or data) ref built with parent 0.
    #[error("extent {bytenr}: a shared ref needs a non-zero parent")]
    MissingParent {
        /// Extent start.
        bytenr: u64,
    },
    /// A tree block level at or above the maximum tree height (8).
    #[error("extent {bytenr}: tree level {level} (levels are 0 to 7)")]
    BadLevel {
        /// Extent start.
        bytenr: u64,
        /// The level passed.
        level: u8,
    },
    /// A runner found a tree ref whose merged count is not 1 (-EUCLEAN, §11.14).
    /// The ref stays queued.
    #[error("extent {bytenr}: tree ref {key:?} has ref_mod {ref_mod} at run time")]
    TreeRefMod {
        /// Extent start.
        bytenr: u64,
        /// The backref.
        key: RefKey,
        /// Its merged count.
        ref_mod: u64,
    },
    /// A reservation would go below zero.
    #[error("reservation underflow: {what} holds {have}, asked for {want}")]
    RsvUnderflow {
        /// Which counter.
        what: &'static str,
        /// What it holds.
        have: u64,
        /// What was asked.
        want: u64,
    },
    /// Not enough space to reserve (-ENOSPC).
    #[error("no space: wanted {wanted} bytes")]
    NoSpace {
        /// Bytes asked for.
        wanted: u64,
    },
    /// The backend refused a ref, an extent op or a lookup; a ref or op was
    /// put back on its head.
    ///
    /// The message names the extent only; the backend's reason is the
    /// error's [`source`](std::error::Error::source), so that a reporter
    /// that prints the chain shows it once.
    #[error("the extent-tree backend refused a ref of extent {bytenr}")]
    Backend {
        /// Extent start.
        bytenr: u64,
        /// Backend error.
        #[source]
        source: ExtentError,
    },
    /// A batch hook of the backend failed ([`Hook`]). A begin hook failed
    /// before anything was taken; an end hook failed after the refs of its
    /// batch had left the queue.
    #[error("the extent-tree backend's {hook:?} hook failed")]
    Hook {
        /// Which hook.
        hook: Hook,
        /// Backend error.
        #[source]
        source: ExtentError,
    },
    /// Pinning a cancelled allocation failed after its head was retired: the
    /// pin is lost, the extent's reserved space is unaccounted for.
    #[error("extent {bytenr}: pinning {num_bytes} reserved bytes failed after the head was retired")]
    PinLost {
        /// Extent start.
        bytenr: u64,
        /// Extent length.
        num_bytes: u64,
        /// Backend error.
        #[source]
        source: ExtentError,
    },
}

impl Error {
    /// What a caller does after this error (docs/backend.md, "Recovery").
    ///
    /// ```
    /// use delayed_refs::{Error, ExtentError, Recovery};
    /// let io = std::io::Error::new(std::io::ErrorKind::Other, "disk gone");
    /// let e = Error::Backend { bytenr: 4096, source: ExtentError::storage(io) };
    /// assert_eq!(e.recovery(), Recovery::Retry);
    /// let e = Error::Backend { bytenr: 4096, source: ExtentError::MissingExtent { bytenr: 4096 } };
    /// assert_eq!(e.recovery(), Recovery::Abort);
    /// ```
    pub fn recovery(&self) -> Recovery {
        match self {
            Error::ZeroLength { .. }
            | Error::DataMismatch { .. }
            | Error::ReservedOnMetadata { .. }
            | Error::BadAction { .. }
            | Error::MissingRoot { .. }
            | Error::MissingParent { .. }
            | Error::BadLevel { .. }
            | Error::RsvUnderflow { .. } => Recovery::Rejected,
            Error::NoSpace { .. } => Recovery::RunRefs,
            // The backend could not do it this time; the queue is intact.
            Error::Backend { source, .. } if source.is_storage() => Recovery::Retry,
            Error::Hook { hook: Hook::BeginRun | Hook::BeginHead(_), source } if source.is_storage() => Recovery::Retry,
            // The queue and the extent tree disagree (a retry fails the same
            // way), or applied refs may not be durable, or a pin is lost.
            Error::Backend { .. } | Error::Hook { .. } | Error::TreeRefMod { .. } | Error::PinLost { .. } => {
                Recovery::Abort
            }
        }
    }
}

/// Result alias.
pub type Result<T, E = Error> = std::result::Result<T, E>;
