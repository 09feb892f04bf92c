//! Typed errors. Bad input never panics and never changes queued state.

#![forbid(unsafe_code)]

use crate::domain::key::RefKey;
use crate::domain::kind::Action;

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
    /// The backend refused a run; the ref was put back on its head.
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
}

/// Result alias.
pub type Result<T, E = Error> = std::result::Result<T, E>;
