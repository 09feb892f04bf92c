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

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};

use parking_lot::Mutex;

use self::head::{Head, HeadInner, InsertEffect};
use crate::api::{
    self, AddOutcome, CleanupOutcome, Counters, DelayedRefs, DestroyStats, FsShared, HeadOutcome, HeadSnapshot,
    HeadUpdate, RunMode, RunStats,
};
use crate::domain::extent_op::ExtentOp;
use crate::domain::generic_ref::GenericRef;
use crate::domain::kind::Action;
use crate::domain::qgroup::QgroupRecord;
use crate::error::{Error, Result};
use crate::extent_tree::{ExtentInfo, ExtentTree};
use crate::rsv::cell::LockedCell;
use crate::rsv::handle::TransHandle;

/// Stripes of `Root::heads_created`.
const CREATED_STRIPES: usize = 32;

/// The stripe of `bytenr` in `Root::heads_created`.
fn created_stripe(bytenr: u64) -> usize {
    (bytenr.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 59) as usize
}

/// What the root lock protects (spec §1.6, L1).
#[derive(Debug, Default)]
struct Root {
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

/// The delayed-ref root with the kernel's three locks (see module docs).
#[derive(Debug)]
pub struct LockedRefs {
    fs: Arc<FsShared<LockedCell>>,
    root: Mutex<Root>,
    num_entries: AtomicI64,
}

impl LockedRefs {
    fn entries_add(&self, n: i64) {
        // Relaxed: a statistic; exact at quiescence through the locks' ordering.
        self.num_entries.fetch_add(n, Ordering::Relaxed);
    }

    /// Find-or-create the head and apply the head update (spec §3.5, §3.6),
    /// then insert the node (§3.7), all under L1 as in the kernel.
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
        let existing = root.heads.get(&upd.bytenr).cloned();
        if let Some(h) = &existing {
            if h.is_data != upd.is_data {
                // The kernel BUGs (§3.6 step 1); checked before any change.
                return Err(Error::DataMismatch { bytenr: upd.bytenr, head_is_data: h.is_data });
            }
        }
        if let Some(rec) = rec {
            match root.qgroup.entry(rec.bytenr) {
                std::collections::btree_map::Entry::Occupied(mut e) => e.get_mut().absorb(&rec),
                std::collections::btree_map::Entry::Vacant(v) => {
                    v.insert(rec);
                    out.qgroup_record_inserted = true;
                }
            }
        }
        let head = match existing {
            Some(h) => {
                let mut hi = h.inner.lock();
                // §3.6 steps 2-6.
                if hi.owning_root == 0 {
                    hi.owning_root = upd.owning_root;
                }
                if upd.must_insert_reserved {
                    hi.must_insert_reserved = true;
                    hi.owning_root = upd.owning_root;
                    hi.num_bytes = upd.num_bytes;
                }
                if let Some(op) = &upd.extent_op {
                    hi.extent_op = Some(ExtentOp::merged(hi.extent_op.as_ref(), op));
                }
                let old = hi.total_ref_mod;
                hi.ref_mod += upd.count_mod;
                hi.total_ref_mod += upd.count_mod;
                if h.is_data {
                    let lv = g.csum_leaves(hi.num_bytes);
                    if old < 0 && hi.total_ref_mod >= 0 {
                        root.pending_csums = root.pending_csums.wrapping_sub(hi.num_bytes);
                        self.fs.reserves.delayed_refs_rsv_release(0, lv);
                    } else if old >= 0 && hi.total_ref_mod < 0 {
                        root.pending_csums = root.pending_csums.wrapping_add(hi.num_bytes);
                        trans.delayed_ref_csum_deletions += lv;
                    }
                }
                drop(hi);
                h
            }
            None => {
                // §3.4 init, §3.5 step 4 link.
                let inner = HeadInner {
                    num_bytes: upd.num_bytes,
                    ref_mod: upd.count_mod,
                    total_ref_mod: upd.count_mod,
                    owning_root: upd.owning_root,
                    must_insert_reserved: upd.must_insert_reserved,
                    extent_op: upd.extent_op,
                    ..HeadInner::default()
                };
                let h = Arc::new(Head::new(upd.bytenr, upd.is_data, upd.is_system, upd.reserved, inner));
                h.linked.store(true, Ordering::Relaxed);
                root.heads.insert(upd.bytenr, h.clone());
                root.heads_created[created_stripe(upd.bytenr)] += 1;
                if upd.is_data && upd.count_mod < 0 {
                    root.pending_csums = root.pending_csums.wrapping_add(upd.num_bytes);
                    trans.delayed_ref_csum_deletions += g.csum_leaves(upd.num_bytes);
                }
                root.num_heads += 1;
                root.num_heads_ready += 1;
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
                    // drop_delayed_ref (§3.9).
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

    /// Unselect a head (spec §3.16.5); the caller then drops its token.
    fn unselect(&self, head: &Head) {
        let mut root = self.root.lock();
        head.processing.store(false, Ordering::Relaxed);
        root.num_heads_ready += 1;
    }
}

impl DelayedRefs for LockedRefs {
    type Cell = LockedCell;
    const NAME: &'static str = "locked";

    fn with_fs(fs: Arc<FsShared<LockedCell>>) -> Self {
        LockedRefs { fs, root: Mutex::new(Root::default()), num_entries: AtomicI64::new(0) }
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
        root.heads.get(&bytenr).map(|h| h.snapshot())
    }

    fn run_one<B: ExtentTree + ?Sized>(&self, backend: &B) -> Result<Option<(u64, HeadOutcome, RunStats)>> {
        run::run_one(self, backend)
    }

    fn run<B: ExtentTree + ?Sized>(&self, backend: &B, mode: RunMode) -> Result<RunStats> {
        run::run(self, backend, mode)
    }

    fn lookup_extent_info<B: ExtentTree + ?Sized>(&self, backend: &B, bytenr: u64) -> Option<ExtentInfo> {
        loop {
            let root = self.root.lock();
            let Some(h) = root.heads.get(&bytenr).cloned() else {
                // No head: the disk alone is the answer, unless a head was
                // created, partly run and maybe retired while the unlocked
                // lookup read the disk (the kernel keeps the extent tree leaf
                // locked across its lookup; this port's backend is opaque).
                let created = root.heads_created[created_stripe(bytenr)];
                drop(root);
                let disk = backend.lookup(bytenr);
                let root = self.root.lock();
                if root.heads_created[created_stripe(bytenr)] == created {
                    return disk;
                }
                continue;
            };
            // §3.17: the token hides a ref taken from the head but not yet on disk.
            let Some(token) = h.token.try_lock_arc() else {
                drop(root);
                drop(h.token.lock());
                continue;
            };
            drop(root);
            let disk = backend.lookup(bytenr);
            let hi = h.inner.lock();
            let mut info = disk.unwrap_or(ExtentInfo { refs: 0, flags: 0 });
            if let Some(op) = hi.extent_op.filter(|o| o.update_flags) {
                info.flags |= op.flags_to_set;
            }
            info.refs = (info.refs as i64).wrapping_add(hi.ref_mod) as u64;
            drop(hi);
            drop(token);
            return Some(info);
        }
    }

    fn check_ref_cleanup(&self, bytenr: u64) -> CleanupOutcome {
        let g = *self.fs.reserves.geometry();
        let mut root = self.root.lock();
        let Some(h) = root.heads.get(&bytenr).cloned() else { return CleanupOutcome::NoHead };
        let mut hi = h.inner.lock();
        if !hi.refs.is_empty() || (hi.extent_op.is_some() && !hi.must_insert_reserved) {
            return CleanupOutcome::Busy;
        }
        let Some(token) = h.token.try_lock_arc() else { return CleanupOutcome::Busy };
        // cleanup_extent_op: an op on a never-inserted extent is discarded.
        hi.extent_op = None;
        root.heads.remove(&bytenr);
        h.linked.store(false, Ordering::Relaxed);
        self.entries_add(-1);
        root.num_heads -= 1;
        if !h.processing() {
            root.num_heads_ready -= 1;
        }
        h.processing.store(false, Ordering::Relaxed);
        let mir = std::mem::take(&mut hi.must_insert_reserved);
        if h.is_data && hi.total_ref_mod < 0 {
            root.pending_csums = root.pending_csums.wrapping_sub(hi.num_bytes);
            self.fs.reserves.delayed_refs_rsv_release(0, g.csum_leaves(hi.num_bytes));
        }
        drop(hi);
        drop(root);
        drop(token);
        CleanupOutcome::Deleted { must_insert_reserved: mir }
    }

    fn destroy<B: ExtentTree + ?Sized>(&self, backend: &B) -> DestroyStats {
        let g = *self.fs.reserves.geometry();
        let mut stats = DestroyStats::default();
        loop {
            let mut root = self.root.lock();
            let Some(h) = root.heads.values().next().cloned() else { break };
            let token = match h.token.try_lock_arc() {
                Some(t) => t,
                None => {
                    drop(root);
                    let t = h.token.lock_arc();
                    root = self.root.lock();
                    if !h.linked.load(Ordering::Relaxed) {
                        continue;
                    }
                    t
                }
            };
            let mut hi = h.inner.lock();
            let nodes = hi.refs.len() as u64;
            hi.refs.clear();
            hi.add_list.clear();
            hi.ref_mod = 0;
            self.entries_add(-(nodes as i64));
            self.fs.reserves.delayed_refs_rsv_release(nodes, 0);
            let mir = std::mem::take(&mut hi.must_insert_reserved);
            hi.extent_op = None;
            root.heads.remove(&h.bytenr);
            h.linked.store(false, Ordering::Relaxed);
            self.entries_add(-1);
            root.num_heads -= 1;
            if !h.processing() {
                root.num_heads_ready -= 1;
            }
            if h.is_data && hi.total_ref_mod < 0 {
                root.pending_csums = root.pending_csums.wrapping_sub(hi.num_bytes);
                self.fs.reserves.delayed_refs_rsv_release(0, g.csum_leaves(hi.num_bytes));
            }
            let nb = hi.num_bytes;
            drop(hi);
            drop(root);
            if mir {
                backend.pin_reserved(h.bytenr, nb, h.is_data);
                stats.pinned_bytes += nb;
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
            num_heads: root.num_heads,
            num_heads_ready: root.num_heads_ready,
            num_entries: self.num_entries.load(Ordering::Relaxed) as u64,
            pending_csums: root.pending_csums,
        }
    }

    fn snapshot(&self) -> Vec<HeadSnapshot> {
        let root = self.root.lock();
        root.heads.values().map(|h| h.snapshot()).collect()
    }

    fn qgroup_records(&self) -> Vec<QgroupRecord> {
        self.root.lock().qgroup.values().copied().collect()
    }
}
