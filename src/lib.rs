//! # delayed-refs
//!
//! The Linux btrfs delayed-ref subsystem (v6.8 `fs/btrfs/delayed-ref.c` and
//! its run side) as a concurrent data structure: pending reference-count
//! changes of extents are queued per extent ("head", keyed by bytenr) and per
//! backref key, merged with action flips and drop-at-zero, and run against an
//! extent-tree backend with adds before drops, tree-mod-log hold-back, extent
//! ops, must_insert_reserved, qgroup records and the delayed-refs reserve.
//!
//! Three implementations share the domain model and the [`DelayedRefs`] trait:
//!
//! - [`LockFreeRefs`]: heads in a lock-free skiplist reclaimed by an owned
//!   epoch collector, per-key atomic ref counts, CAS-loop reserves;
//! - [`LockedRefs`]: a faithful port of the kernel's locking (root lock,
//!   head lock, head run token). It is the oracle for differential tests and
//!   the baseline every benchmark reports a ratio against;
//! - [`ShardedRefs`]: the locked port sharded by bytenr (16 port roots over
//!   one shared fs state by default, runs rotating over them): what a user
//!   would build instead of a lock-free structure, and the second baseline
//!   the benchmarks report a ratio against.
//!
//! Refs are queued as [`GenericRef`]s (the kernel's shape); the typed
//! builders [`TreeRef`], [`SharedBlockRef`], [`DataRef`] and
//! [`SharedDataRef`] build them with every field named and checked.
//!
//! Section numbers (`§4.6`) refer to `docs/semantics.md` in the package, the
//! semantics the crate implements; `§` with a letter (`§c`) is a section of
//! `docs/protocols.md`, the concurrent protocols of the lock-free
//! implementation. "Invariant *n*" is item *n* of semantics §10, `L1`…`L12`
//! the kernel locks of its §13, "hazard *n*" its §14.*n*.
//!
//! ```
//! use delayed_refs::{Action, DelayedRefs, ExtentTree, FsConfig, GenericRef, LockedRefs, MemExtentTree,
//!     RunMode, TransHandle};
//! let refs = LockedRefs::new(FsConfig::default());
//! let tree = MemExtentTree::new();
//! let mut h = TransHandle::new();
//! let new_block = GenericRef::new(Action::AddExtent, 1 << 30, 16384, 0, 5).tree(0, 5, 0, false);
//! refs.add_tree_ref(&mut h, &new_block, None).unwrap();
//! assert_eq!(refs.counters().num_heads, 1);
//! refs.run(&tree, RunMode::All).unwrap();
//! assert_eq!(tree.lookup(1 << 30).unwrap().refs, 1);
//! ```

#![warn(missing_docs)]
#![deny(unsafe_op_in_unsafe_fn)]

mod batch;
pub(crate) mod sync;

pub mod api;
pub mod domain;
pub mod error;
pub mod extent_tree;
pub mod lincheck;
pub mod locked;
pub mod lockfree;
pub mod rsv;
pub mod sharded;
pub mod trace;

#[cfg(all(test, dref_loom))]
mod loom_models;
#[cfg(all(test, any(dref_loom, dref_shuttle)))]
mod model_support;
#[cfg(all(test, dref_shuttle, not(dref_loom)))]
mod shuttle_models;

/// The README's examples, compiled as doctests.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
pub struct ReadmeDoctests;

/// The rayon version [`DelayedRefs::commit_drain`] takes a pool of.
pub use rayon;

pub use api::{
    AddOutcome, Backpressure, CleanupOutcome, Counters, DelayedRefs, DestroyStats, FsConfig, FsShared, HeadOutcome,
    HeadSnapshot, NodeSnapshot, RunMode, RunStats,
};
pub use domain::builders::{DataRef, Qgroup, SharedBlockRef, SharedDataRef, TreeRef};
pub use domain::extent_op::{DiskKey, ExtentOp};
pub use domain::generic_ref::{GenericRef, RefPayload, skip_qgroup};
pub use domain::geometry::Geometry;
pub use domain::key::{NodeKey, RefKey, comp_refs};
pub use domain::kind::{
    Action, BLOCK_FLAG_FULL_BACKREF, EXTENT_FLAG_DATA, EXTENT_FLAG_TREE_BLOCK, RefType, is_fstree, roots,
};
pub use domain::qgroup::QgroupRecord;
pub use domain::seq::{SeqBlocker, SeqError, SeqTracker};
pub use error::{Error, ExtentError, Hook, Recovery, Result};
pub use extent_tree::{
    Batch, BatchEnd, ExtentInfo, ExtentItem, ExtentTree, FaultConfig, FaultStats, FaultyTree, InjectedFault,
    InjectedPanic, MemExtentTree, OpRun, Pin, RefRun, StorageError,
};
pub use locked::LockedRefs;
#[cfg(not(any(dref_loom, dref_shuttle)))]
pub use lockfree::LockFreeRefs;
pub use rsv::cell::{AtomicCell, LockedCell, PairCell};
pub use rsv::handle::TransHandle;
pub use rsv::reserves::{BlockRsv, FsReserves, ReleaseRouting, ReserveConfig, ReservesSnapshot, RsvType, SpaceInfo};
pub use rsv::state::{FlushMode, RsvState, SpaceState};
pub use sharded::ShardedRefs;
