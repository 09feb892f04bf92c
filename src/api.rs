//! The operations both implementations offer, and the values they return.

#![forbid(unsafe_code)]

use crate::domain::extent_op::ExtentOp;
use crate::domain::generic_ref::{GenericRef, RefPayload};
use crate::domain::key::NodeKey;
use crate::domain::kind::{Action, roots};
use crate::domain::qgroup::QgroupRecord;
use crate::domain::seq::SeqTracker;
use crate::error::{Error, Result};
use crate::extent_tree::{ExtentInfo, ExtentTree};
use crate::rsv::cell::PairCell;
use crate::rsv::handle::TransHandle;
use crate::rsv::reserves::{FsReserves, ReserveConfig};

/// Configuration of the fs-wide state a delayed-ref root uses.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FsConfig {
    /// Reserves and geometry.
    pub reserves: ReserveConfig,
    /// Full qgroup accounting: adds create qgroup extent records (semantics.md §9).
    pub qgroups: bool,
    /// Queued entries (heads plus ref nodes) at which
    /// [`DelayedRefs::backpressure`] starts saying [`Backpressure::Throttle`];
    /// 0: no limit of this kind (the reserve check still applies).
    pub pending_limit: u64,
}

/// What [`DelayedRefs::backpressure`] tells an adder.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Backpressure {
    /// Go on adding.
    Proceed,
    /// Runners are behind: the queue reached
    /// [`FsConfig::pending_limit`], or the delayed-refs reserve no longer
    /// covers what is queued. Run refs (`run_one`, `run(RunMode::Ready)`)
    /// or wait for the runners before adding more.
    Throttle,
}

/// Fs-wide state shared by the delayed-ref roots of successive transactions:
/// the reserves (semantics.md §2.7) and the tree-mod-log seq tracker (§5.3).
#[derive(Debug)]
pub struct FsShared<C> {
    /// The reserves.
    pub reserves: FsReserves<C>,
    /// Tree-mod-log blockers.
    pub seq: SeqTracker,
    /// Whether qgroup records are kept.
    pub qgroups: bool,
    /// [`FsConfig::pending_limit`].
    pub pending_limit: u64,
}

impl<C: PairCell> FsShared<C> {
    /// Fresh fs-wide state.
    pub fn new(config: FsConfig) -> Self {
        FsShared {
            reserves: FsReserves::new(config.reserves),
            seq: SeqTracker::new(),
            qgroups: config.qgroups,
            pending_limit: config.pending_limit,
        }
    }
}

/// How much a run does (semantics.md §6.5).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum RunMode {
    /// `min_bytes == 0`: about as many heads as were ready at the start.
    Ready,
    /// Until the bytes-released estimate reaches this many bytes.
    Bytes(u64),
    /// `U64_MAX`: until the index is empty, including refs added meanwhile.
    /// Spins while everything left is held back by a seq blocker (§11.15).
    All,
}

/// What a run did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct RunStats {
    /// Heads selected.
    pub heads: u64,
    /// Merged refs applied to the backend.
    pub refs: u64,
    /// Extent ops applied on their own (not with a ref).
    pub extent_ops: u64,
    /// Heads deleted from the index by this run.
    pub heads_deleted: u64,
    /// Times a head was unselected because of a seq blocker.
    pub held_back: u64,
    /// The bytes-released estimate (`processed`, semantics.md §6.5).
    pub bytes_released: u64,
}

impl RunStats {
    /// Add another run's figures.
    pub fn absorb(&mut self, o: &RunStats) {
        self.heads += o.heads;
        self.refs += o.refs;
        self.extent_ops += o.extent_ops;
        self.heads_deleted += o.heads_deleted;
        self.held_back += o.held_back;
        self.bytes_released += o.bytes_released;
    }
}

/// What happened to the head one [`DelayedRefs::run_one`] call selected.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum HeadOutcome {
    /// Everything ran and the head left the index.
    Deleted,
    /// A seq blocker held a ref back; the head was unselected.
    HeldBack,
}

/// Result of [`DelayedRefs::check_ref_cleanup`] (semantics.md §7.2).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum CleanupOutcome {
    /// No head for the bytenr.
    NoHead,
    /// Refs or an extent op remain, or a runner holds the head: nothing done.
    Busy,
    /// The head was deleted; `must_insert_reserved` tells whether the caller
    /// owns the extent's reserved space (kernel return value 1).
    Deleted {
        /// The head still had must_insert_reserved.
        must_insert_reserved: bool,
    },
}

/// What abort cleanup removed (semantics.md §7.3).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct DestroyStats {
    /// Heads removed.
    pub heads: u64,
    /// Nodes dropped unrun.
    pub nodes: u64,
    /// Bytes of reserved extents pinned.
    pub pinned_bytes: u64,
    /// Reserved extents whose pin the backend refused (or panicked on);
    /// cleanup went on without them.
    pub pin_failures: u64,
}

/// Root counters (semantics.md §2.5, invariants 1-3, 20). Exact at quiescence; while
/// threads work they are a racy sum and may be off by in-flight operations.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Counters {
    /// Heads in the index.
    pub num_heads: u64,
    /// Indexed heads not being processed.
    pub num_heads_ready: u64,
    /// Heads plus queued nodes.
    pub num_entries: u64,
    /// Bytes of data heads whose net change is a drop.
    pub pending_csums: u64,
}

/// One queued node as seen at quiescence.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct NodeSnapshot {
    /// Identity (key and seq).
    pub key: NodeKey,
    /// `Add` or `Drop`.
    pub action: Action,
    /// Count, at least 1.
    pub ref_mod: u64,
    /// Tree level of a tree ref (first seen), 0 for data.
    pub level: u8,
}

/// One head as seen at quiescence (or under the head's lock for the locked port).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct HeadSnapshot {
    /// Extent start.
    pub bytenr: u64,
    /// Extent length.
    pub num_bytes: u64,
    /// Data head.
    pub is_data: bool,
    /// Chunk-tree head.
    pub is_system: bool,
    /// Σ signed counts of queued nodes.
    pub ref_mod: i64,
    /// Σ of every add call on this head object.
    pub total_ref_mod: i64,
    /// The extent item must be inserted by the first run.
    pub must_insert_reserved: bool,
    /// Selected by a runner.
    pub processing: bool,
    /// Owning root.
    pub owning_root: u64,
    /// Reserved data bytes given at creation.
    pub reserved_bytes: u64,
    /// Pending extent op.
    pub extent_op: Option<ExtentOp>,
    /// Queued nodes in key order.
    pub nodes: Vec<NodeSnapshot>,
}

/// What an add did.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct AddOutcome {
    /// The ref merged into (or cancelled) an existing node.
    pub merged: bool,
    /// A qgroup record was inserted for the extent.
    pub qgroup_record_inserted: bool,
}

/// The delayed-ref root of one transaction: the operations both
/// implementations offer, so tests, benches and the stress binary are generic.
///
/// All methods take `&self` and are safe to call from many threads at once.
///
/// ```
/// use delayed_refs::{Action, DelayedRefs, ExtentTree, FsConfig, GenericRef, LockedRefs, MemExtentTree,
///     RunMode, TransHandle};
/// let refs = LockedRefs::new(FsConfig::default());
/// let tree = MemExtentTree::new();
/// let mut h = TransHandle::new();
/// let alloc = GenericRef::new(Action::AddExtent, 1 << 20, 4096, 0, 5).data(5, 257, 0, 0, false);
/// refs.add_data_ref(&mut h, &alloc, 4096).unwrap();
/// let extra = GenericRef::new(Action::Add, 1 << 20, 4096, 0, 5).data(5, 258, 0, 0, false);
/// refs.add_data_ref(&mut h, &extra, 0).unwrap();
/// refs.run(&tree, RunMode::All).unwrap();
/// assert_eq!(tree.lookup(1 << 20).unwrap().refs, 2);
/// assert_eq!(refs.counters().num_entries, 0);
/// ```
pub trait DelayedRefs: Send + Sync + Sized {
    /// The reserve cell type.
    type Cell: PairCell;
    /// Short name for reports (`lockfree`, `locked`).
    const NAME: &'static str;

    /// The root of transaction `transid` over shared fs-wide state. The id
    /// reaches the backend in every [`Batch`](crate::Batch).
    fn for_transaction(fs: std::sync::Arc<FsShared<Self::Cell>>, transid: u64) -> Self;

    /// A root over shared fs-wide state, transaction id 0.
    fn with_fs(fs: std::sync::Arc<FsShared<Self::Cell>>) -> Self {
        Self::for_transaction(fs, 0)
    }

    /// A root with its own fresh fs-wide state, transaction id 0.
    fn new(config: FsConfig) -> Self {
        Self::with_fs(std::sync::Arc::new(FsShared::new(config)))
    }

    /// The transaction id the root was created with.
    fn transid(&self) -> u64;

    /// The fs-wide state.
    fn fs(&self) -> &std::sync::Arc<FsShared<Self::Cell>>;

    /// Queue a tree ref (`btrfs_add_delayed_tree_ref`, semantics.md §4.1).
    fn add_tree_ref(&self, trans: &mut TransHandle, gref: &GenericRef, op: Option<ExtentOp>) -> Result<AddOutcome>;

    /// Queue a data ref (`btrfs_add_delayed_data_ref`, semantics.md §4.2).
    ///
    /// `reserved` is the data space reserved for a newly allocated extent
    /// (an `AddExtent`: its uncompressed size, as btrfs reserves it for the
    /// write); the head keeps it for qgroup accounting, which releases it
    /// when the head is retired. Pass 0 for every other data ref, and 0 if
    /// no reservation was made (then none is released).
    fn add_data_ref(&self, trans: &mut TransHandle, gref: &GenericRef, reserved: u64) -> Result<AddOutcome>;

    /// Queue an extent op (`btrfs_add_delayed_extent_op`, semantics.md §4.8).
    fn add_extent_op(&self, trans: &mut TransHandle, bytenr: u64, num_bytes: u64, op: ExtentOp) -> Result<()>;

    /// The indexed head for `bytenr` (semantics.md §6.1).
    fn find_head(&self, bytenr: u64) -> Option<HeadSnapshot>;

    /// Select one head round-robin, run it and retire it or hold it back
    /// (semantics.md §6.2-6.11), as one run batch of the backend's hooks.
    /// `Ok(None)`: no unprocessed head.
    ///
    /// # Errors
    ///
    /// Each error says what to do next through [`Error::recovery`]
    /// (docs/backend.md): a failing ref is back on its head and its head
    /// released. A panicking backend call unwinds out of this call after
    /// the same clean-up.
    fn run_one<B: ExtentTree + ?Sized>(&self, backend: &B) -> Result<Option<(u64, HeadOutcome, RunStats)>>;

    /// Run delayed refs (`btrfs_run_delayed_refs`, semantics.md §6.5), as one
    /// run batch of the backend's hooks ([`ExtentTree::begin_run`] at the
    /// first head it claims, [`ExtentTree::end_run`] at the end).
    ///
    /// # Errors
    ///
    /// As [`run_one`](Self::run_one); the run stops at the first error, and
    /// the figures of what it ran before the error are not returned (the
    /// extents show it: what ran is applied).
    fn run<B: ExtentTree + ?Sized>(&self, backend: &B, mode: RunMode) -> Result<RunStats>;

    /// On-disk plus pending refcount and flags of one extent (semantics.md §7.1),
    /// never observing a ref taken from its head but not yet applied.
    ///
    /// # Errors
    ///
    /// [`Error::Backend`] when the backend's [`ExtentTree::lookup`] fails;
    /// nothing changes.
    fn lookup_extent_info<B: ExtentTree + ?Sized>(&self, backend: &B, bytenr: u64) -> Result<Option<ExtentInfo>>;

    /// Fast cleanup of a just-allocated tree block (semantics.md §7.2).
    fn check_ref_cleanup(&self, bytenr: u64) -> CleanupOutcome;

    /// Drop everything unrun on transaction abort (semantics.md §7.3). A pin
    /// the backend refuses is counted in [`DestroyStats::pin_failures`];
    /// the cleanup goes on.
    fn destroy<B: ExtentTree + ?Sized>(&self, backend: &B) -> DestroyStats;

    /// Root counters (semantics.md §2.5). Exact at quiescence; while other threads
    /// add or run, the lock-free root returns an approximation (each field
    /// clamped at zero), the locked port a value taken under its root lock.
    fn counters(&self) -> Counters;

    /// Whether adders should let runners catch up (the spirit of the
    /// kernel's `btrfs_check_space_for_delayed_refs` and
    /// `should_end_transaction`, semantics.md §8.1): [`Backpressure::Throttle`]
    /// when the queued entries reached [`FsConfig::pending_limit`] or the
    /// delayed-refs reserve is over budget.
    ///
    /// Cheap but not free (it reads the reserve and sums the entry counter):
    /// an adder asks every few dozen adds, not before each one. Advisory: an
    /// add never fails because of it.
    ///
    /// ```
    /// use delayed_refs::{Action, Backpressure, DelayedRefs, FsConfig, LockFreeRefs, MemExtentTree, Qgroup,
    ///     RunMode, TransHandle, TreeRef};
    /// let refs = LockFreeRefs::new(FsConfig { pending_limit: 8, ..FsConfig::default() });
    /// let tree = MemExtentTree::new();
    /// let mut h = TransHandle::new();
    /// for i in 0..100u64 {
    ///     if refs.backpressure() == Backpressure::Throttle {
    ///         refs.run(&tree, RunMode::Ready).unwrap();
    ///     }
    ///     let r = TreeRef { action: Action::AddExtent, bytenr: (i + 1) << 20, num_bytes: 16384, owning_root: 5,
    ///         root: 5, level: 0, qgroup: Qgroup::ACCOUNT };
    ///     refs.add_tree_ref(&mut h, &r.build().unwrap(), None).unwrap();
    ///     // A head and its node per block: the queue stays near the limit.
    ///     assert!(refs.counters().num_entries <= 8 + 2);
    /// }
    /// // Everything is either on disk or still queued, at most the limit's worth.
    /// assert_eq!(tree.len() as u64 + refs.counters().num_heads, 100);
    /// assert!(refs.counters().num_heads <= 8 / 2 + 1);
    /// ```
    fn backpressure(&self) -> Backpressure {
        let fs = self.fs();
        let over_limit = fs.pending_limit > 0 && self.counters().num_entries >= fs.pending_limit;
        if over_limit || fs.reserves.check_space_for_delayed_refs() {
            Backpressure::Throttle
        } else {
            Backpressure::Proceed
        }
    }

    /// Every indexed head, by bytenr (consistent at quiescence).
    fn snapshot(&self) -> Vec<HeadSnapshot>;

    /// The qgroup extent records, by bytenr.
    fn qgroup_records(&self) -> Vec<QgroupRecord>;

    /// Free memory that runs and cleanups retired, once no reader can still
    /// hold it. Call at a quiescent point (no thread inside an operation) to
    /// bring the structure back to its baseline allocation, give or take the
    /// epoch collector's fixed bookkeeping (one garbage-queue block of about
    /// 2 KiB, which does not grow with the work); while other threads are
    /// inside an operation it frees what it can and returns.
    ///
    /// Memory that *another live thread* retired sits in that thread's private
    /// batch until the thread calls [`release_thread`](Self::release_thread),
    /// retires more, or exits (docs/architecture.md, "Reclamation"). The
    /// locked port frees eagerly: there this is a no-op.
    fn reclaim(&self) {}

    /// Detach the calling thread from this root: hand the memory it retired
    /// to the shared queue and drop its cached registration, so a long-lived
    /// thread (a pool worker) keeps nothing of a root it no longer uses.
    /// Harmless to call at any time; the next operation re-attaches.
    fn release_thread(&self) {}

    /// The commit drain (semantics.md §6.5 with `U64_MAX`, invariant 26): every
    /// thread of `pool` runs delayed refs until the index is empty, refs added
    /// meanwhile included, then detaches ([`release_thread`](Self::release_thread)).
    /// Returns the summed run figures, or the first error a runner hit.
    /// `pool` is a [`rayon::ThreadPool`] (rayon 1.x; re-exported as
    /// [`delayed_refs::rayon`](crate::rayon) so that a caller builds it with
    /// the same version). Each runner is its own run batch. A panicking backend call stops the
    /// runner it hit (the others go on with what is queued, the released
    /// head included) and reaches the caller through rayon's `broadcast`;
    /// a second `commit_drain` finishes whatever is left.
    ///
    /// Like [`RunMode::All`] it waits while a seq blocker holds refs back
    /// (§11.15): unregister blockers before draining.
    ///
    /// ```
    /// use delayed_refs::{Action, DelayedRefs, FsConfig, GenericRef, LockFreeRefs, MemExtentTree, TransHandle};
    /// let refs = LockFreeRefs::new(FsConfig::default());
    /// let tree = MemExtentTree::new();
    /// let mut h = TransHandle::new();
    /// for i in 0..64u64 {
    ///     let r = GenericRef::new(Action::AddExtent, (1 + i) << 20, 4096, 0, 5).data(5, 257, i, 0, false);
    ///     refs.add_data_ref(&mut h, &r, 4096).unwrap();
    /// }
    /// let pool = rayon::ThreadPoolBuilder::new().num_threads(2).build().unwrap();
    /// let stats = refs.commit_drain(&tree, &pool).unwrap();
    /// assert_eq!(stats.refs, 64);
    /// assert_eq!(refs.counters(), Default::default());
    /// assert_eq!(tree.len(), 64);
    /// ```
    fn commit_drain<B: ExtentTree + Sync + ?Sized>(&self, backend: &B, pool: &rayon::ThreadPool) -> Result<RunStats> {
        let per_runner = pool.broadcast(|_| {
            let r = self.run(backend, RunMode::All);
            self.release_thread();
            r
        });
        let mut stats = RunStats::default();
        for r in per_runner {
            stats.absorb(&r?);
        }
        self.reclaim();
        Ok(stats)
    }
}

/// Validate a tree-ref add (semantics.md §4.1 step 1, §4.10).
pub(crate) fn validate_tree_ref(gref: &GenericRef) -> Result<()> {
    if gref.num_bytes == 0 {
        return Err(Error::ZeroLength { bytenr: gref.bytenr });
    }
    if !matches!(gref.payload, RefPayload::Tree { .. }) {
        return Err(Error::BadAction { call: "add_tree_ref", action: gref.action, what: "with a data payload" });
    }
    if gref.action == Action::UpdateHead {
        return Err(Error::BadAction { call: "add_tree_ref", action: gref.action, what: "(use add_extent_op)" });
    }
    if crate::domain::builders::unfinished_tree_ref(gref) {
        // `GenericRef::new` without `.tree()`: a tree block ref of root 0.
        return Err(Error::MissingRoot { bytenr: gref.bytenr });
    }
    Ok(())
}

/// Validate a data-ref add (semantics.md §4.10, §4.4 step 1).
pub(crate) fn validate_data_ref(gref: &GenericRef, reserved: u64) -> Result<()> {
    if gref.num_bytes == 0 {
        return Err(Error::ZeroLength { bytenr: gref.bytenr });
    }
    if !matches!(gref.payload, RefPayload::Data { .. }) {
        if reserved != 0 {
            return Err(Error::ReservedOnMetadata { bytenr: gref.bytenr, reserved });
        }
        return Err(Error::BadAction { call: "add_data_ref", action: gref.action, what: "with a tree payload" });
    }
    if gref.action == Action::UpdateHead {
        return Err(Error::BadAction { call: "add_data_ref", action: gref.action, what: "(use add_extent_op)" });
    }
    Ok(())
}

/// Validate an extent-op add (semantics.md §4.8).
pub(crate) fn validate_extent_op(bytenr: u64, num_bytes: u64) -> Result<()> {
    if num_bytes == 0 {
        return Err(Error::ZeroLength { bytenr });
    }
    Ok(())
}

/// The head-side inputs of one add call (semantics.md §4.4 init / §4.6 merge), the
/// same for both implementations.
pub(crate) struct HeadUpdate {
    pub bytenr: u64,
    pub num_bytes: u64,
    pub is_data: bool,
    pub is_system: bool,
    pub reserved: u64,
    pub owning_root: u64,
    pub count_mod: i64,
    pub must_insert_reserved: bool,
    pub extent_op: Option<ExtentOp>,
}

impl HeadUpdate {
    /// The update a tree or data ref makes (semantics.md §4.1, §4.2).
    pub fn for_ref(gref: &GenericRef, reserved: u64, extent_op: Option<ExtentOp>) -> Self {
        let is_data = gref.is_data();
        HeadUpdate {
            bytenr: gref.bytenr,
            num_bytes: gref.num_bytes,
            is_data,
            is_system: !is_data && gref.ref_root() == roots::CHUNK_TREE,
            reserved,
            owning_root: gref.owning_root,
            count_mod: gref.action.count_mod(),
            must_insert_reserved: gref.action == Action::AddExtent,
            extent_op,
        }
    }

    /// The update `add_extent_op` makes (semantics.md §4.8: UPDATE_DELAYED_HEAD).
    pub fn for_extent_op(bytenr: u64, num_bytes: u64, op: ExtentOp) -> Self {
        HeadUpdate {
            bytenr,
            num_bytes,
            is_data: false,
            is_system: false,
            reserved: 0,
            owning_root: 0,
            count_mod: 0,
            must_insert_reserved: false,
            extent_op: Some(op),
        }
    }
}

/// The qgroup record an add inserts, if full accounting is on (semantics.md §9).
pub(crate) fn qgroup_record(qgroups: bool, gref: &GenericRef, reserved: u64) -> Option<QgroupRecord> {
    (qgroups && !gref.skip_qgroup).then(|| QgroupRecord::new(gref.bytenr, gref.num_bytes, gref.ref_root(), reserved))
}

/// The mode loop of `btrfs_run_delayed_refs` (semantics.md §6.5) over an
/// implementation's `run_one`; `ready` is the racy ready count (§11.8) and
/// `is_empty` tells `All` when the index is empty.
pub(crate) fn drive_run(
    mode: RunMode,
    ready: u64,
    mut run_one: impl FnMut() -> Result<Option<RunStats>>,
    is_empty: impl Fn() -> bool,
) -> Result<RunStats> {
    let mut stats = RunStats::default();
    match mode {
        RunMode::Ready => {
            for _ in 0..ready {
                match run_one()? {
                    Some(s) => stats.absorb(&s),
                    None => break,
                }
            }
        }
        RunMode::Bytes(n) => {
            while stats.bytes_released < n {
                match run_one()? {
                    Some(s) => stats.absorb(&s),
                    None => break,
                }
            }
        }
        RunMode::All => loop {
            match run_one()? {
                Some(s) => stats.absorb(&s),
                // Other runners hold what is left (or a seq blocker does, §11.15): wait.
                None if !is_empty() => crate::sync::yield_now(),
                None => break,
            }
        },
    }
    Ok(stats)
}
