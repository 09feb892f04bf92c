//! The lock-free delayed-ref root: add side, readers, cleanup, destroy.

#![forbid(unsafe_code)]

use std::collections::BTreeMap;
use std::sync::Arc;

use super::count::Transition;
use super::counters::RootCounters;
use super::head::Head;
use super::index;
use super::retire_seq::RetireSeq;
use super::store::{HeadEntry, MapEntry, OrderedMap, Stores};
#[cfg(not(any(dref_loom, dref_shuttle)))]
use crate::api::DelayedRefs;
use crate::api::{
    self, AddOutcome, CleanupOutcome, Counters, DestroyStats, FsShared, HeadOutcome, HeadSnapshot, HeadUpdate, RunMode,
    RunStats,
};
use crate::domain::extent_op::ExtentOp;
use crate::domain::generic_ref::GenericRef;
use crate::domain::key::NodeKey;
use crate::domain::kind::Action;
use crate::domain::qgroup::QgroupRecord;
use crate::error::{Error, Result};
use crate::extent_tree::{ExtentInfo, ExtentTree, Pin};
use crate::rsv::cell::AtomicCell;
use crate::rsv::handle::TransHandle;
use crate::sync::{AtomicU64, Mutex};

/// The lock-free engine over its stores (module `store`): everything the
/// add, run, reader, cleanup and destroy paths do. [`LockFreeRefs`] is this
/// engine on crossbeam's skiplists; the loom and shuttle models run it on
/// the mock stores.
pub(crate) struct Engine<S: Stores> {
    pub(crate) fs: Arc<FsShared<AtomicCell>>,
    // Field order matters: the index (and the heads in it) and the node map
    // drop before the reclamation domain that owns their garbage.
    pub(super) heads: S::Heads,
    /// Every head's ref nodes (see `head`).
    pub(super) nodes: S::Nodes,
    pub(super) counters: RootCounters,
    pub(super) run_start: AtomicU64,
    /// Bumped before every close (readers, module `retire_seq`).
    retire_seq: RetireSeq,
    qgroup: Mutex<BTreeMap<u64, QgroupRecord>>,
    /// The transaction id and run ids the backend's batch hooks see.
    pub(super) batches: crate::batch::BatchIds,
    stores: S,
}

impl<S: Stores> std::fmt::Debug for Engine<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LockFreeRefs").field("counters", &self.counters()).finish_non_exhaustive()
    }
}

impl<S: Stores> Drop for Engine<S> {
    fn drop(&mut self) {
        // The maps free their live entries when their fields drop; what
        // runs and cleanups retired is freed with the collector (the last
        // handle to it goes with the last thread that cached one). Nothing
        // retired holds the collector, so there is no cycle to break; drop
        // this thread's cached handle so the collector can go now.
        self.stores.forget_local();
    }
}

impl<S: Stores> Engine<S> {
    /// A fresh engine on fresh stores (the model checkers' constructor).
    #[cfg_attr(not(any(dref_loom, dref_shuttle)), allow(dead_code))]
    pub(crate) fn with_fs(fs: Arc<FsShared<AtomicCell>>) -> Self {
        Self::for_transaction(fs, 0)
    }

    /// A fresh engine on fresh stores, for transaction `transid`.
    pub(crate) fn for_transaction(fs: Arc<FsShared<AtomicCell>>, transid: u64) -> Self {
        let (stores, heads, nodes) = S::create();
        Engine {
            batches: crate::batch::BatchIds::new(transid),
            fs,
            heads,
            nodes,
            counters: RootCounters::default(),
            run_start: AtomicU64::new(0),
            retire_seq: RetireSeq::new(),
            qgroup: Mutex::new(BTreeMap::new()),
            stores,
        }
    }

    pub(super) fn pin(&self) -> S::Guard {
        self.stores.pin()
    }

    /// The add path (semantics.md §4.1-§4.8): head update (§4.6) and node change (§4.7).
    fn add_inner(
        &self,
        trans: &mut TransHandle,
        upd: HeadUpdate,
        node: Option<(NodeKey, Action, u8)>,
        rec: Option<QgroupRecord>,
    ) -> Result<AddOutcome> {
        let guard = self.pin();
        // The constructor may run and be discarded (protocols.md §g, crossbeam-skiplist rules): no side
        // effects. A new head is built with this add's node inline.
        let first_node = node.map(|(key, _, level)| (key, level));
        let make = || Head::new(upd.num_bytes, upd.is_data, upd.is_system, upd.reserved, first_node);
        let out = index::enter(
            &self.heads,
            upd.bytenr,
            make,
            |head, first| self.add_entered(trans, head, first, &upd, node, rec, &guard),
            &guard,
        );
        drop(guard);
        // §8.3, after publishing (semantics.md §11.12: size may wrap meanwhile).
        self.fs.reserves.update_delayed_refs_rsv(trans);
        out
    }

    /// The add path inside the head (entered as an adder; leaves it).
    #[allow(clippy::too_many_arguments)]
    fn add_entered(
        &self,
        trans: &mut TransHandle,
        head: &Head,
        first: bool,
        upd: &HeadUpdate,
        node: Option<(NodeKey, Action, u8)>,
        rec: Option<QgroupRecord>,
        guard: &S::Guard,
    ) -> Result<AddOutcome> {
        let g = *self.fs.reserves.geometry();
        if first {
            // Head-creation accounting (§4.5 step 4), done by the first adder
            // inside the state word, so no runner can retire it before.
            self.counters.num_heads.add(1);
            self.counters.num_heads_ready.add(1);
            self.counters.num_entries.add(1);
        }
        if head.is_data() != upd.is_data {
            head.exit();
            return Err(Error::DataMismatch { bytenr: upd.bytenr, head_is_data: head.is_data() });
        }
        let mut out = AddOutcome { merged: false, qgroup_record_inserted: false };
        if let Some(rec) = rec {
            let mut q = self.qgroup.lock().unwrap_or_else(|e| e.into_inner());
            match q.entry(rec.bytenr) {
                std::collections::btree_map::Entry::Occupied(mut e) => e.get_mut().absorb(&rec),
                std::collections::btree_map::Entry::Vacant(v) => {
                    v.insert(rec);
                    out.qgroup_record_inserted = true;
                }
            }
        }
        // Head fields below are independent words that guard no other memory;
        // the runner reads them after claiming, and the state word's
        // Acquire/Release (enter/exit vs close) orders them for it.
        // §4.6 step 2: fill in a missing owning root.
        head.fill_owning_root(upd.owning_root);
        if upd.must_insert_reserved {
            // §4.6 step 3 (re-allocation: size overwritten, §11.11a).
            head.reallocate(upd.owning_root, upd.num_bytes);
        }
        if let Some(op) = &upd.extent_op {
            head.merge_op(op);
        }
        if upd.count_mod != 0 {
            // total_ref_mod's old value decides the pending_csums crossing
            // for exactly one thread.
            let old = head.apply_count_mod(upd.count_mod);
            let total = old + upd.count_mod;
            if head.is_data() {
                let nb = head.num_bytes();
                let lv = g.csum_leaves(nb);
                if old < 0 && total >= 0 {
                    self.counters.pending_csums.add(-(nb as i64));
                    self.fs.reserves.delayed_refs_rsv_release(0, lv);
                } else if old >= 0 && total < 0 {
                    self.counters.pending_csums.add(nb as i64);
                    trans.delayed_ref_csum_deletions += lv;
                }
            }
        }
        let mut became_add = None;
        if let Some((key, action, level)) = node {
            let delta = if action == Action::Add { 1 } else { -1 };
            let (t, unlinked, inline) = head.change_node(&self.nodes, key, delta, level, guard);
            if unlinked {
                self.counters.retired.add(1);
            }
            match t {
                Transition::Created => {
                    self.counters.num_entries.add(1);
                    trans.delayed_ref_updates += 1;
                    if delta > 0 {
                        became_add = Some((key, inline));
                    }
                }
                Transition::Merged => out.merged = true,
                Transition::Dropped => {
                    out.merged = true;
                    self.counters.num_entries.add(-1);
                    self.fs.reserves.delayed_refs_rsv_release(1, 0);
                }
                Transition::None => {}
            }
        }
        match became_add {
            // A runner that claimed the head before this exit may be past
            // this key in its add scan: leave it a late-ADD marker (module
            // `head`, adds before drops).
            Some((key, inline)) => head.exit_noting_late_add(&self.nodes, key, inline, guard),
            None => head.exit(),
        }
        Ok(out)
    }

    fn add_ref(
        &self,
        trans: &mut TransHandle,
        gref: &GenericRef,
        reserved: u64,
        op: Option<ExtentOp>,
    ) -> Result<AddOutcome> {
        let key = gref.node_key(self.fs.seq.current());
        let rec = api::qgroup_record(self.fs.qgroups, gref, reserved);
        let upd = HeadUpdate::for_ref(gref, reserved, op);
        let out = self.add_inner(trans, upd, Some((key, gref.action.node_action(), gref.level())), rec)?;
        crate::trace_head!(add, gref.bytenr, gref.num_bytes, gref.action, gref.is_data());
        crate::trace_ref!(add, gref.bytenr, gref.num_bytes, gref.action, key, gref.level(), 1u64);
        Ok(out)
    }

    /// Retire a claimed head whose list the caller found empty: close from
    /// `w0`, unlink, account (§6.4, §6.11 steps 3-5). Returns the bytes the
    /// csum accounting released, or `None` if the close CAS failed.
    pub(super) fn retire(&self, entry: &HeadEntry<'_, S>, w0: u64, guard: &S::Guard) -> Option<(bool, u64)> {
        let head = entry.value();
        // Before the close: a reader that sees this head closed or gone
        // sees the bump too (module `retire_seq`).
        self.retire_seq.stripe(*entry.key()).bump();
        if !index::retire(entry, w0) {
            return None;
        }
        let nodes = head.unlink_nodes(&self.nodes, guard);
        self.counters.retired.add(1 + nodes as i64);
        let g = *self.fs.reserves.geometry();
        self.counters.num_heads.add(-1);
        self.counters.num_entries.add(-1);
        // Closed: no adder sets the flag again; this takes it for good.
        let mir = head.take_must_insert();
        let mut released = 0;
        if head.is_data() && head.total_ref_mod() < 0 {
            let nb = head.num_bytes();
            self.counters.pending_csums.add(-(nb as i64));
            let lv = g.csum_leaves(nb);
            self.fs.reserves.delayed_refs_rsv_release(0, lv);
            released = g.csum_bytes(lv);
        }
        Some((mir, released))
    }

    /// Unselect a claimed head (semantics.md §6.9).
    pub(super) fn unselect(&self, head: &Head) {
        self.counters.num_heads_ready.add(1);
        head.unclaim();
    }
}

#[cfg_attr(any(dref_loom, dref_shuttle), allow(dead_code))]
impl<S: Stores> Engine<S> {
    pub(crate) fn add_tree_ref(
        &self,
        trans: &mut TransHandle,
        gref: &GenericRef,
        op: Option<ExtentOp>,
    ) -> Result<AddOutcome> {
        api::validate_tree_ref(gref)?;
        self.add_ref(trans, gref, 0, op)
    }

    pub(crate) fn add_data_ref(&self, trans: &mut TransHandle, gref: &GenericRef, reserved: u64) -> Result<AddOutcome> {
        api::validate_data_ref(gref, reserved)?;
        self.add_ref(trans, gref, reserved, None)
    }

    pub(crate) fn add_extent_op(
        &self,
        trans: &mut TransHandle,
        bytenr: u64,
        num_bytes: u64,
        op: ExtentOp,
    ) -> Result<()> {
        api::validate_extent_op(bytenr, num_bytes)?;
        let upd = HeadUpdate::for_extent_op(bytenr, num_bytes, op);
        self.add_inner(trans, upd, None, None)?;
        crate::trace_head!(add, bytenr, num_bytes, Action::UpdateHead, false);
        Ok(())
    }

    pub(crate) fn find_head(&self, bytenr: u64) -> Option<HeadSnapshot> {
        let guard = self.pin();
        let e = self.heads.get(&bytenr, &guard).filter(|e| e.value().is_live())?;
        Some(e.value().snapshot(bytenr, &self.nodes, &guard))
    }

    pub(crate) fn run_one<B: ExtentTree + ?Sized>(&self, backend: &B) -> Result<Option<(u64, HeadOutcome, RunStats)>> {
        super::run::run_one(self, backend)
    }

    pub(crate) fn run<B: ExtentTree + ?Sized>(&self, backend: &B, mode: RunMode) -> Result<RunStats> {
        super::run::run(self, backend, mode)
    }

    pub(crate) fn lookup_extent_info<B: ExtentTree + ?Sized>(
        &self,
        backend: &B,
        bytenr: u64,
    ) -> Result<Option<ExtentInfo>> {
        // Disk + pending as of one point inside the call (§7.1, invariant
        // 18). Every ref applied to the disk comes from the live head of its
        // bytenr, taken and applied inside that head's seqlock; a new head
        // exists only after the previous one closed. So a disk read is
        // consistent with a head's ref_mod when that head's seqlock did not
        // move and the head was still open afterwards, and with "no pending
        // refs" when no live head was there before or after and none was
        // retired in between (module `retire_seq`). docs/protocols.md,
        // "Readers", has the argument.
        loop {
            match self.try_lookup(backend, bytenr)? {
                Some(info) => return Ok(info),
                None => crate::sync::yield_now(),
            }
        }
    }

    /// One attempt of [`Engine::lookup_extent_info`]; `None`: retry (its
    /// guard is dropped first, so a waiting reader does not hold the epoch).
    /// A backend error ends the call.
    fn try_lookup<B: ExtentTree + ?Sized>(&self, backend: &B, bytenr: u64) -> Result<Option<Option<ExtentInfo>>> {
        let disk_of = |b: u64| backend.lookup(b).map_err(|source| Error::Backend { bytenr: b, source });
        let retires = self.retire_seq.stripe(bytenr);
        let r1 = retires.read();
        let guard = self.pin();
        let live = |e: &HeadEntry<'_, S>| !e.value().is_closed();
        let Some(e) = self.heads.get(&bytenr, &guard).filter(live) else {
            let disk = disk_of(bytenr)?;
            let calm = self.heads.get(&bytenr, &guard).filter(live).is_none() && retires.read() == r1;
            return Ok(calm.then_some(disk));
        };
        let head = e.value();
        let s1 = head.read_seq();
        if s1 & 1 == 1 {
            return Ok(None);
        }
        let disk = disk_of(bytenr)?;
        let rm = head.ref_mod();
        let op = head.op();
        let s2 = head.read_seq();
        // Still open after s2: no newer head of this bytenr can have
        // applied anything the lookup saw.
        if s1 != s2 || head.is_closed() {
            return Ok(None);
        }
        let mut info = disk.unwrap_or(ExtentInfo { refs: 0, flags: 0 });
        if let Some(op) = op.filter(|o| o.update_flags) {
            info.flags |= op.flags_to_set;
        }
        info.refs = (info.refs as i64).wrapping_add(rm) as u64;
        Ok(Some(Some(info)))
    }

    pub(crate) fn check_ref_cleanup(&self, bytenr: u64) -> CleanupOutcome {
        let guard = self.pin();
        let Some(e) = self.heads.get(&bytenr, &guard) else { return CleanupOutcome::NoHead };
        let head = e.value();
        let busy = |h: &Head| h.has_refs(&self.nodes, &guard) || h.has_pending_op();
        if busy(head) || !head.try_claim() {
            return CleanupOutcome::Busy;
        }
        self.counters.num_heads_ready.add(-1);
        let w0 = head.word();
        if busy(head) {
            self.unselect(head);
            return CleanupOutcome::Busy;
        }
        let op = head.take_op();
        match self.retire(&e, w0, &guard) {
            Some((mir, _)) => CleanupOutcome::Deleted { must_insert_reserved: mir },
            None => {
                if let Some(op) = op {
                    head.restore_op(op);
                }
                self.unselect(head);
                CleanupOutcome::Busy
            }
        }
    }

    pub(crate) fn destroy<B: ExtentTree + ?Sized>(&self, backend: &B) -> DestroyStats {
        let mut stats = DestroyStats::default();
        while let Some(busy) = self.destroy_front(backend, &mut stats) {
            if busy {
                // A runner holds the first head (or it is unborn): wait for it.
                crate::sync::yield_now();
            }
        }
        stats
    }

    /// One step of [`Engine::destroy`] on the first head: `None` when the
    /// index is empty, `Some(true)` when that head is claimed by another.
    fn destroy_front<B: ExtentTree + ?Sized>(&self, backend: &B, stats: &mut DestroyStats) -> Option<bool> {
        let guard = self.pin();
        let e = self.heads.front(&guard)?;
        let head = e.value();
        if head.is_closed() {
            e.remove();
            return Some(false);
        }
        if !head.try_claim() {
            return Some(true);
        }
        self.counters.num_heads_ready.add(-1);
        for node in head.nodes(&self.nodes, &guard) {
            let v = node.take_all();
            if v != 0 {
                head.take_ref_mod(v);
                self.counters.num_entries.add(-1);
                self.fs.reserves.delayed_refs_rsv_release(1, 0);
                stats.nodes += 1;
            }
        }
        let w0 = head.word();
        if head.has_refs(&self.nodes, &guard) {
            self.unselect(head);
            return Some(false);
        }
        match self.retire(&e, w0, &guard) {
            Some((mir, _)) => {
                // Closed: no adder can merge into the op any more; drop it.
                head.take_op();
                stats.heads += 1;
                if mir {
                    let nb = head.num_bytes();
                    let pin = Pin {
                        bytenr: *e.key(),
                        num_bytes: nb,
                        is_data: head.is_data(),
                        batch: self.batches.outside_runs(),
                    };
                    match crate::extent_tree::call_backend(|| backend.pin_reserved(&pin)) {
                        Ok(()) => stats.pinned_bytes += nb,
                        // Abort cleanup goes on: the caller learns from the count.
                        Err(_) => stats.pin_failures += 1,
                    }
                }
            }
            None => self.unselect(head),
        }
        Some(false)
    }

    pub(crate) fn counters(&self) -> Counters {
        // Exact at quiescence. While threads work, stripes are read at
        // different moments and a sum can dip below zero: read that as 0
        // rather than as a huge unsigned count.
        let read = |c: &super::counters::Striped| c.sum().max(0) as u64;
        Counters {
            num_heads: read(&self.counters.num_heads),
            num_heads_ready: read(&self.counters.num_heads_ready),
            num_entries: read(&self.counters.num_entries),
            pending_csums: read(&self.counters.pending_csums),
        }
    }

    pub(crate) fn snapshot(&self) -> Vec<HeadSnapshot> {
        let guard = self.pin();
        let mut out = Vec::new();
        let mut e = self.heads.front(&guard);
        while let Some(h) = e {
            if h.value().is_live() {
                out.push(h.value().snapshot(*h.key(), &self.nodes, &guard));
            }
            e = h.next();
        }
        out
    }

    pub(crate) fn qgroup_records(&self) -> Vec<QgroupRecord> {
        self.qgroup.lock().unwrap_or_else(|e| e.into_inner()).values().copied().collect()
    }

    pub(crate) fn reclaim(&self) {
        let n = self.counters.retired.sum().max(0);
        self.stores.reclaim(n as u64);
        self.counters.retired.add(-n);
    }

    pub(crate) fn release_thread(&self) {
        self.stores.forget_local();
    }
}

/// The lock-free delayed-ref root (see the module docs of `lockfree`).
///
/// ```
/// use delayed_refs::{Action, DelayedRefs, ExtentTree, FsConfig, GenericRef, LockFreeRefs, MemExtentTree,
///     RunMode, TransHandle};
/// let refs = LockFreeRefs::new(FsConfig::default());
/// let tree = MemExtentTree::new();
/// let mut h = TransHandle::new();
/// let r = GenericRef::new(Action::AddExtent, 1 << 20, 4096, 0, 5).data(5, 257, 0, 0, false);
/// refs.add_data_ref(&mut h, &r, 4096).unwrap();
/// std::thread::scope(|s| {
///     s.spawn(|| refs.run(&tree, RunMode::All).unwrap());
/// });
/// assert_eq!(tree.lookup(1 << 20).unwrap().refs, 1);
/// ```
#[cfg(not(any(dref_loom, dref_shuttle)))]
pub struct LockFreeRefs(Engine<super::store::SkipStores>);

#[cfg(not(any(dref_loom, dref_shuttle)))]
impl std::fmt::Debug for LockFreeRefs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

#[cfg(not(any(dref_loom, dref_shuttle)))]
impl DelayedRefs for LockFreeRefs {
    type Cell = AtomicCell;
    const NAME: &'static str = "lockfree";

    fn for_transaction(fs: Arc<FsShared<AtomicCell>>, transid: u64) -> Self {
        LockFreeRefs(Engine::for_transaction(fs, transid))
    }

    fn transid(&self) -> u64 {
        self.0.batches.transid()
    }

    fn fs(&self) -> &Arc<FsShared<AtomicCell>> {
        &self.0.fs
    }

    fn add_tree_ref(&self, trans: &mut TransHandle, gref: &GenericRef, op: Option<ExtentOp>) -> Result<AddOutcome> {
        self.0.add_tree_ref(trans, gref, op)
    }

    fn add_data_ref(&self, trans: &mut TransHandle, gref: &GenericRef, reserved: u64) -> Result<AddOutcome> {
        self.0.add_data_ref(trans, gref, reserved)
    }

    fn add_extent_op(&self, trans: &mut TransHandle, bytenr: u64, num_bytes: u64, op: ExtentOp) -> Result<()> {
        self.0.add_extent_op(trans, bytenr, num_bytes, op)
    }

    fn find_head(&self, bytenr: u64) -> Option<HeadSnapshot> {
        self.0.find_head(bytenr)
    }

    fn run_one<B: ExtentTree + ?Sized>(&self, backend: &B) -> Result<Option<(u64, HeadOutcome, RunStats)>> {
        self.0.run_one(backend)
    }

    fn run<B: ExtentTree + ?Sized>(&self, backend: &B, mode: RunMode) -> Result<RunStats> {
        self.0.run(backend, mode)
    }

    fn lookup_extent_info<B: ExtentTree + ?Sized>(&self, backend: &B, bytenr: u64) -> Result<Option<ExtentInfo>> {
        self.0.lookup_extent_info(backend, bytenr)
    }

    fn check_ref_cleanup(&self, bytenr: u64) -> CleanupOutcome {
        self.0.check_ref_cleanup(bytenr)
    }

    fn destroy<B: ExtentTree + ?Sized>(&self, backend: &B) -> DestroyStats {
        self.0.destroy(backend)
    }

    fn counters(&self) -> Counters {
        self.0.counters()
    }

    fn snapshot(&self) -> Vec<HeadSnapshot> {
        self.0.snapshot()
    }

    fn qgroup_records(&self) -> Vec<QgroupRecord> {
        self.0.qgroup_records()
    }

    fn reclaim(&self) {
        self.0.reclaim()
    }

    fn release_thread(&self) {
        self.0.release_thread()
    }
}
