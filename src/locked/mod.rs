//! The faithful locked port: the kernel's locking in Rust.
//!
//! # Implementation details
//!
//! - L1, the root lock: one mutex around the ordered map of heads, the
//!   counters `num_heads`, `num_heads_ready`, `pending_csums`, the selection
//!   cursor and the qgroup records. `num_entries` is an atomic, as in v6.8.
//! - L2, the head lock: a mutex per head over its ref tree (`BTreeMap` by
//!   [`crate::NodeKey`]), add list, counts, extent op and flags.
//! - L3, the run token: a mutex per head held by the runner (and by readers
//!   that need disk + pending to agree) for the whole run of that head.
//!
//! Lock order is L1 → L2; L3 is taken before L2 and only by try-lock while L1
//! is held (invariant 27). Reserves are leaf locks ([`crate::LockedCell`]).
//! The port is complete and safe to use from many threads: it is the oracle
//! of the differential tests and the baseline of every benchmark.

#![forbid(unsafe_code)]

mod head;
mod run;

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};

use parking_lot::Mutex;

use self::head::{Head, HeadInner, InsertEffect};
use self::root::Root;
use crate::api::{
    self, AddOutcome, CleanupOutcome, Counters, DelayedRefs, DestroyStats, FsShared, HeadOutcome, HeadSnapshot,
    HeadUpdate, RunMode, RunStats,
};
use crate::domain::extent_op::ExtentOp;
use crate::domain::generic_ref::GenericRef;
use crate::domain::kind::Action;
use crate::domain::qgroup::QgroupRecord;
use crate::error::{Error, Result};
use crate::extent_tree::{ExtentInfo, ExtentTree, Pin};
use crate::rsv::cell::LockedCell;
use crate::rsv::handle::TransHandle;

/// The root lock's state in a module of its own, so that its fields are
/// private to it: the rest of the port (this module's `LockedRefs`, `run`,
/// `head`) reads them through the getters and changes them only through the
/// transitions below. A `&Root` or `&mut Root` exists only behind
/// `LockedRefs::root`, so every method runs with the root lock (L1) held.
mod root {
    use std::collections::BTreeMap;
    use std::sync::Arc;

    use super::head::Head;
    use crate::domain::qgroup::QgroupRecord;

    /// Stripes of `Root::heads_created`.
    const CREATED_STRIPES: usize = 32;

    /// The stripe of `bytenr` in `Root::heads_created`.
    fn created_stripe(bytenr: u64) -> usize {
        (bytenr.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 59) as usize
    }

    /// What the root lock protects (semantics.md §2.5, L1).
    #[derive(Debug, Default)]
    pub(super) struct Root {
        heads: BTreeMap<u64, Arc<Head>>,
        num_heads: u64,
        num_heads_ready: u64,
        pending_csums: u64,
        run_delayed_start: u64,
        qgroup: BTreeMap<u64, QgroupRecord>,
        /// Heads ever inserted, per stripe of bytenrs: a reader that found no
        /// head re-checks its stripe after its unlocked disk lookup
        /// (`lookup_extent_info`).
        heads_created: [u64; CREATED_STRIPES],
    }

    impl Root {
        /// `btrfs_find_delayed_ref_head`: the head of `bytenr`, if linked.
        pub(super) fn head(&self, bytenr: u64) -> Option<&Arc<Head>> {
            self.heads.get(&bytenr)
        }

        /// The linked head of the lowest bytenr.
        pub(super) fn first_head(&self) -> Option<&Arc<Head>> {
            self.heads.values().next()
        }

        /// The linked heads, by bytenr.
        pub(super) fn heads(&self) -> impl Iterator<Item = &Arc<Head>> {
            self.heads.values()
        }

        /// No head is linked.
        pub(super) fn is_empty(&self) -> bool {
            self.heads.is_empty()
        }

        /// `num_heads`: linked heads.
        pub(super) fn num_heads(&self) -> u64 {
            self.num_heads
        }

        /// `num_heads_ready`: linked heads no runner has selected.
        pub(super) fn num_heads_ready(&self) -> u64 {
            self.num_heads_ready
        }

        /// `pending_csums`: bytes of data heads whose net count deletes.
        pub(super) fn pending_csums(&self) -> u64 {
            self.pending_csums
        }

        /// Heads ever inserted in `bytenr`'s stripe (see `heads_created`).
        pub(super) fn heads_created(&self, bytenr: u64) -> u64 {
            self.heads_created[created_stripe(bytenr)]
        }

        /// The qgroup extent records, by bytenr.
        pub(super) fn qgroup_records(&self) -> impl Iterator<Item = &QgroupRecord> {
            self.qgroup.values()
        }

        /// `btrfs_qgroup_trace_extent_nolock`: insert `rec`, or absorb it into
        /// the record of its bytenr. Returns whether it was inserted.
        pub(super) fn insert_qgroup_record(&mut self, rec: QgroupRecord) -> bool {
            match self.qgroup.entry(rec.bytenr) {
                std::collections::btree_map::Entry::Occupied(mut e) => {
                    e.get_mut().absorb(&rec);
                    false
                }
                std::collections::btree_map::Entry::Vacant(v) => {
                    v.insert(rec);
                    true
                }
            }
        }

        /// `add_delayed_ref_head`'s root part (semantics.md §4.5 step 4): link a new
        /// head, count it in `num_heads` and `num_heads_ready`, and bump its
        /// stripe of `heads_created`. The caller counts its entry.
        pub(super) fn insert_head(&mut self, h: Arc<Head>) {
            h.link(self);
            let bytenr = h.bytenr;
            self.heads.insert(bytenr, h);
            self.heads_created[created_stripe(bytenr)] += 1;
            self.num_heads += 1;
            self.num_heads_ready += 1;
        }

        /// A data head's net count turned negative: its csum deletions are
        /// pending (semantics.md §4.5, §4.6).
        pub(super) fn add_pending_csums(&mut self, bytes: u64) {
            self.pending_csums = self.pending_csums.wrapping_add(bytes);
        }

        /// A data head's csum deletions are no longer pending (its net count
        /// turned non-negative, or the head is gone).
        pub(super) fn sub_pending_csums(&mut self, bytes: u64) {
            self.pending_csums = self.pending_csums.wrapping_sub(bytes);
        }

        /// `btrfs_select_ref_head` (semantics.md §6.2): the first head not being
        /// processed, round robin from the cursor; it is marked processing,
        /// leaves `num_heads_ready`, and the cursor moves past its extent.
        /// None: every head is taken, and the cursor restarts at 0.
        pub(super) fn select_head(&mut self) -> Option<Arc<Head>> {
            let start = self.run_delayed_start;
            let pick = self
                .heads
                .range(start..)
                .chain(self.heads.range(..start))
                .map(|(_, h)| h)
                .find(|h| !h.processing())
                .cloned();
            let Some(h) = pick else {
                self.run_delayed_start = 0;
                return None;
            };
            h.mark_processing(self);
            self.num_heads_ready -= 1;
            self.run_delayed_start = h.bytenr.wrapping_add(h.inner.lock().num_bytes());
            Some(h)
        }

        /// `unselect_delayed_ref_head` (semantics.md §6.9): `h` is no longer
        /// processed and is ready again.
        pub(super) fn unselect_head(&mut self, h: &Head) {
            h.clear_processing(self);
            self.num_heads_ready += 1;
        }

        /// `btrfs_delete_ref_head`'s root part: unlink `h` and uncount it
        /// (from `num_heads_ready` too unless a runner had selected it). The
        /// caller holds the head lock and counts its entry.
        pub(super) fn delete_head(&mut self, h: &Head) {
            self.heads.remove(&h.bytenr);
            h.unlink(self);
            self.num_heads -= 1;
            if !h.processing() {
                self.num_heads_ready -= 1;
            }
        }
    }
}

/// The delayed-ref root with the kernel's three locks (see module docs).
#[derive(Debug)]
pub struct LockedRefs {
    fs: Arc<FsShared<LockedCell>>,
    root: Mutex<Root>,
    num_entries: AtomicI64,
    /// The transaction id and run ids the backend's batch hooks see.
    batches: crate::batch::BatchIds,
}

impl LockedRefs {
    fn entries_add(&self, n: i64) {
        // Relaxed: a statistic; exact at quiescence through the locks' ordering.
        self.num_entries.fetch_add(n, Ordering::Relaxed);
    }

    /// `btrfs_delete_ref_head` (semantics.md §6.11 step 3), root and head locks
    /// held: unlink `h` and count its entry gone.
    fn delete_ref_head(&self, root: &mut Root, h: &Head) {
        root.delete_head(h);
        self.entries_add(-1);
    }

    /// `btrfs_cleanup_ref_head_accounting` (semantics.md §6.11 step 5) of a deleted
    /// head, root and head locks held: a data head whose net count deletes
    /// takes its bytes out of `pending_csums` and releases its csum leaves
    /// from the reserve. Returns the leaves released, if any.
    fn cleanup_ref_head_accounting(&self, root: &mut Root, h: &Head, hi: &HeadInner) -> Option<u64> {
        if !(h.is_data && hi.total_ref_mod() < 0) {
            return None;
        }
        let nb = hi.num_bytes();
        root.sub_pending_csums(nb);
        let lv = self.fs.reserves.geometry().csum_leaves(nb);
        self.fs.reserves.delayed_refs_rsv_release(0, lv);
        Some(lv)
    }

    /// Find-or-create the head and apply the head update (semantics.md §4.5, §4.6),
    /// then insert the node (§4.7), all under L1 as in the kernel.
    fn add_locked(
        &self,
        trans: &mut TransHandle,
        upd: HeadUpdate,
        node: Option<(crate::NodeKey, Action, u8)>,
        rec: Option<QgroupRecord>,
    ) -> Result<AddOutcome> {
        let g = *self.fs.reserves.geometry();
        let mut out = AddOutcome { merged: false, qgroup_record_inserted: false };
        let mut root = self.root.lock();
        let existing = root.head(upd.bytenr).cloned();
        if let Some(h) = &existing {
            if h.is_data != upd.is_data {
                // The kernel BUGs (§4.6 step 1); checked before any change.
                return Err(Error::DataMismatch { bytenr: upd.bytenr, head_is_data: h.is_data });
            }
        }
        if let Some(rec) = rec {
            if root.insert_qgroup_record(rec) {
                out.qgroup_record_inserted = true;
            }
        }
        let head = match existing {
            Some(h) => {
                let mut hi = h.inner.lock();
                // §4.6 steps 2-6.
                let old = hi.update_existing(&upd);
                if h.is_data {
                    let lv = g.csum_leaves(hi.num_bytes());
                    if old < 0 && hi.total_ref_mod() >= 0 {
                        root.sub_pending_csums(hi.num_bytes());
                        self.fs.reserves.delayed_refs_rsv_release(0, lv);
                    } else if old >= 0 && hi.total_ref_mod() < 0 {
                        root.add_pending_csums(hi.num_bytes());
                        trans.delayed_ref_csum_deletions += lv;
                    }
                }
                drop(hi);
                h
            }
            None => {
                // §4.4 init, §4.5 step 4 link.
                let h = Arc::new(Head::new(&upd));
                root.insert_head(h.clone());
                if upd.is_data && upd.count_mod < 0 {
                    root.add_pending_csums(upd.num_bytes);
                    trans.delayed_ref_csum_deletions += g.csum_leaves(upd.num_bytes);
                }
                self.entries_add(1);
                h
            }
        };
        if let Some((key, action, level)) = node {
            let mut hi = head.inner.lock();
            match hi.insert_ref(key, action, 1, level) {
                InsertEffect::Inserted => {
                    self.entries_add(1);
                    trans.delayed_ref_updates += 1;
                }
                InsertEffect::Merged => out.merged = true,
                InsertEffect::Dropped => {
                    // drop_delayed_ref (§4.9).
                    out.merged = true;
                    self.entries_add(-1);
                    self.fs.reserves.delayed_refs_rsv_release(1, 0);
                }
            }
        }
        drop(root);
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
        let out = self.add_locked(trans, upd, Some((key, gref.action.node_action(), gref.level())), rec)?;
        self.fs.reserves.update_delayed_refs_rsv(trans);
        crate::trace_head!(add, gref.bytenr, gref.num_bytes, gref.action, gref.is_data());
        crate::trace_ref!(add, gref.bytenr, gref.num_bytes, gref.action, key, gref.level(), 1u64);
        Ok(out)
    }

    /// Select and run one head inside another root's run batch (the
    /// sharded peer's runs span its shards).
    pub(crate) fn run_one_in<B: ExtentTree + ?Sized>(
        &self,
        scope: &crate::batch::RunScope<'_, B>,
    ) -> Result<Option<(u64, HeadOutcome, RunStats)>> {
        run::run_one_in(self, scope)
    }

    /// The run-id source (the run side's batches).
    pub(crate) fn batches(&self) -> &crate::batch::BatchIds {
        &self.batches
    }

    /// Unselect a head (semantics.md §6.9); the caller then drops its token.
    fn unselect(&self, head: &Head) {
        self.root.lock().unselect_head(head);
    }
}

impl DelayedRefs for LockedRefs {
    type Cell = LockedCell;
    const NAME: &'static str = "locked";

    fn for_transaction(fs: Arc<FsShared<LockedCell>>, transid: u64) -> Self {
        LockedRefs {
            fs,
            root: Mutex::new(Root::default()),
            num_entries: AtomicI64::new(0),
            batches: crate::batch::BatchIds::new(transid),
        }
    }

    fn transid(&self) -> u64 {
        self.batches.transid()
    }

    fn fs(&self) -> &Arc<FsShared<LockedCell>> {
        &self.fs
    }

    fn add_tree_ref(&self, trans: &mut TransHandle, gref: &GenericRef, op: Option<ExtentOp>) -> Result<AddOutcome> {
        api::validate_tree_ref(gref)?;
        self.add_ref(trans, gref, 0, op)
    }

    fn add_data_ref(&self, trans: &mut TransHandle, gref: &GenericRef, reserved: u64) -> Result<AddOutcome> {
        api::validate_data_ref(gref, reserved)?;
        self.add_ref(trans, gref, reserved, None)
    }

    fn add_extent_op(&self, trans: &mut TransHandle, bytenr: u64, num_bytes: u64, op: ExtentOp) -> Result<()> {
        api::validate_extent_op(bytenr, num_bytes)?;
        let upd = HeadUpdate::for_extent_op(bytenr, num_bytes, op);
        self.add_locked(trans, upd, None, None)?;
        self.fs.reserves.update_delayed_refs_rsv(trans);
        crate::trace_head!(add, bytenr, num_bytes, Action::UpdateHead, false);
        Ok(())
    }

    fn find_head(&self, bytenr: u64) -> Option<HeadSnapshot> {
        let root = self.root.lock();
        root.head(bytenr).map(|h| h.snapshot())
    }

    fn run_one<B: ExtentTree + ?Sized>(&self, backend: &B) -> Result<Option<(u64, HeadOutcome, RunStats)>> {
        run::run_one(self, backend)
    }

    fn run<B: ExtentTree + ?Sized>(&self, backend: &B, mode: RunMode) -> Result<RunStats> {
        run::run(self, backend, mode)
    }

    fn lookup_extent_info<B: ExtentTree + ?Sized>(&self, backend: &B, bytenr: u64) -> Result<Option<ExtentInfo>> {
        let disk_of = |b: u64| backend.lookup(b).map_err(|source| Error::Backend { bytenr: b, source });
        loop {
            let root = self.root.lock();
            let Some(h) = root.head(bytenr).cloned() else {
                // No head: the disk alone is the answer, unless a head was
                // created, partly run and maybe retired while the unlocked
                // lookup read the disk (the kernel keeps the extent tree leaf
                // locked across its lookup; this port's backend is opaque).
                let created = root.heads_created(bytenr);
                drop(root);
                let disk = disk_of(bytenr)?;
                let root = self.root.lock();
                if root.heads_created(bytenr) == created {
                    return Ok(disk);
                }
                continue;
            };
            // §7.1: the token hides a ref taken from the head but not yet on disk.
            let Some(token) = h.token.try_lock_arc() else {
                drop(root);
                drop(h.token.lock());
                continue;
            };
            drop(root);
            let disk = disk_of(bytenr)?;
            let hi = h.inner.lock();
            let mut info = disk.unwrap_or(ExtentInfo { refs: 0, flags: 0 });
            if let Some(op) = hi.extent_op().filter(|o| o.update_flags) {
                info.flags |= op.flags_to_set;
            }
            info.refs = (info.refs as i64).wrapping_add(hi.ref_mod()) as u64;
            drop(hi);
            drop(token);
            return Ok(Some(info));
        }
    }

    fn check_ref_cleanup(&self, bytenr: u64) -> CleanupOutcome {
        let mut root = self.root.lock();
        let Some(h) = root.head(bytenr).cloned() else { return CleanupOutcome::NoHead };
        let mut hi = h.inner.lock();
        if hi.has_refs() || (hi.extent_op().is_some() && !hi.must_insert_reserved()) {
            return CleanupOutcome::Busy;
        }
        let Some(token) = h.token.try_lock_arc() else { return CleanupOutcome::Busy };
        // cleanup_extent_op: an op on a never-inserted extent is discarded.
        hi.discard_extent_op();
        self.delete_ref_head(&mut root, &h);
        h.clear_processing(&root);
        let mir = hi.take_must_insert_reserved();
        self.cleanup_ref_head_accounting(&mut root, &h, &hi);
        drop(hi);
        drop(root);
        drop(token);
        CleanupOutcome::Deleted { must_insert_reserved: mir }
    }

    fn destroy<B: ExtentTree + ?Sized>(&self, backend: &B) -> DestroyStats {
        let mut stats = DestroyStats::default();
        loop {
            let mut root = self.root.lock();
            let Some(h) = root.first_head().cloned() else { break };
            let token = match h.token.try_lock_arc() {
                Some(t) => t,
                None => {
                    drop(root);
                    let t = h.token.lock_arc();
                    root = self.root.lock();
                    if !h.is_linked(&root) {
                        continue;
                    }
                    t
                }
            };
            let mut hi = h.inner.lock();
            let nodes = hi.drop_all_refs();
            self.entries_add(-(nodes as i64));
            self.fs.reserves.delayed_refs_rsv_release(nodes, 0);
            let mir = hi.take_must_insert_reserved();
            hi.discard_extent_op();
            self.delete_ref_head(&mut root, &h);
            self.cleanup_ref_head_accounting(&mut root, &h, &hi);
            let nb = hi.num_bytes();
            drop(hi);
            drop(root);
            if mir {
                let pin =
                    Pin { bytenr: h.bytenr, num_bytes: nb, is_data: h.is_data, batch: self.batches.outside_runs() };
                match crate::extent_tree::call_backend(|| backend.pin_reserved(&pin)) {
                    Ok(()) => stats.pinned_bytes += nb,
                    // Abort cleanup goes on: the caller learns from the count.
                    Err(_) => stats.pin_failures += 1,
                }
            }
            drop(token);
            stats.heads += 1;
            stats.nodes += nodes;
        }
        stats
    }

    fn counters(&self) -> Counters {
        let root = self.root.lock();
        Counters {
            num_heads: root.num_heads(),
            num_heads_ready: root.num_heads_ready(),
            num_entries: self.num_entries.load(Ordering::Relaxed) as u64,
            pending_csums: root.pending_csums(),
        }
    }

    fn snapshot(&self) -> Vec<HeadSnapshot> {
        let root = self.root.lock();
        root.heads().map(|h| h.snapshot()).collect()
    }

    fn qgroup_records(&self) -> Vec<QgroupRecord> {
        self.root.lock().qgroup_records().copied().collect()
    }
}
