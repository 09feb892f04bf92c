//! The locked port's run side (spec §3.13-3.16).

#![forbid(unsafe_code)]

use std::sync::Arc;
use std::sync::atomic::Ordering;

use parking_lot::{ArcMutexGuard, RawMutex};

use super::head::{Head, InsertEffect};
use super::{LockedRefs, Root};
use crate::api::{HeadOutcome, RunMode, RunStats};
use crate::domain::extent_op::ExtentOp;
use crate::error::{Error, Result};
use crate::extent_tree::{ExtentTree, RefRun};

type Token = ArcMutexGuard<RawMutex, ()>;

/// `btrfs_select_ref_head` (spec §3.13), root lock held.
fn select_head(root: &mut Root) -> Option<Arc<Head>> {
    let start = root.run_delayed_start;
    let pick =
        root.heads.range(start..).chain(root.heads.range(..start)).map(|(_, h)| h).find(|h| !h.processing()).cloned();
    let Some(h) = pick else {
        root.run_delayed_start = 0;
        return None;
    };
    h.processing.store(true, Ordering::Relaxed);
    root.num_heads_ready -= 1;
    root.run_delayed_start = h.bytenr.wrapping_add(h.inner.lock().num_bytes);
    Some(h)
}

/// `btrfs_obtain_ref_head` with `btrfs_delayed_ref_lock` (spec §3.14, §3.16.3).
/// `Ok(None)`: no head; `Err(())`: -EAGAIN, select again (spec §5.1).
fn obtain_head(refs: &LockedRefs) -> std::result::Result<Option<(Arc<Head>, Token)>, ()> {
    let mut root = refs.root.lock();
    let Some(h) = select_head(&mut root) else { return Ok(None) };
    if let Some(t) = h.token.try_lock_arc() {
        return Ok(Some((h, t)));
    }
    drop(root);
    let t = h.token.lock_arc();
    let root = refs.root.lock();
    if !h.linked.load(Ordering::Relaxed) {
        drop(root);
        drop(t);
        return Err(());
    }
    Ok(Some((h, t)))
}

/// Select and run one head.
pub(super) fn run_one<B: ExtentTree + ?Sized>(
    refs: &LockedRefs,
    backend: &B,
) -> Result<Option<(u64, HeadOutcome, RunStats)>> {
    loop {
        match obtain_head(refs) {
            Ok(None) => return Ok(None),
            Err(()) => continue,
            Ok(Some((h, token))) => {
                let (outcome, stats) = run_head(refs, backend, &h, token)?;
                return Ok(Some((h.bytenr, outcome, stats)));
            }
        }
    }
}

/// Put a taken ref, its must_insert_reserved and its extent op back after a
/// backend error, so nothing queued is lost.
fn restore(refs: &LockedRefs, h: &Head, key: crate::NodeKey, node: super::head::Node, mir: bool, op: Option<ExtentOp>) {
    let mut hi = h.inner.lock();
    match hi.insert_ref(key, node.action, node.ref_mod, node.level) {
        InsertEffect::Inserted => refs.entries_add(1),
        // The node we took still accounts C(1) in the reserve: merging it
        // into a node added meanwhile leaves one node fewer.
        InsertEffect::Merged => {
            refs.fs.reserves.delayed_refs_rsv_release(1, 0);
        }
        InsertEffect::Dropped => {
            refs.entries_add(-1);
            refs.fs.reserves.delayed_refs_rsv_release(2, 0);
        }
    }
    hi.ref_mod += node.signed();
    if mir {
        hi.must_insert_reserved = true;
    }
    if let Some(op) = op {
        restore_op_locked(&mut hi, op);
    }
}

/// Run one selected head to the end (spec §3.16.4, §3.16.7).
fn run_head<B: ExtentTree + ?Sized>(
    refs: &LockedRefs,
    backend: &B,
    h: &Arc<Head>,
    token: Token,
) -> Result<(HeadOutcome, RunStats)> {
    let g = *refs.fs.reserves.geometry();
    let mut stats = RunStats { heads: 1, ..RunStats::default() };
    loop {
        // §3.16.4: refs, adds first, merging before each.
        loop {
            let mut hi = h.inner.lock();
            if !h.is_data {
                let dropped = hi.merge_pass(refs.fs.seq.lowest_seq());
                if dropped > 0 {
                    refs.entries_add(-(dropped as i64));
                    refs.fs.reserves.delayed_refs_rsv_release(dropped, 0);
                }
            }
            let Some((key, node)) = hi.select_ref() else { break };
            if refs.fs.seq.holds_back(key.seq) {
                drop(hi);
                refs.unselect(h);
                drop(token);
                stats.held_back += 1;
                return Ok((HeadOutcome::HeldBack, stats));
            }
            if !h.is_data && node.ref_mod != 1 {
                drop(hi);
                refs.unselect(h);
                drop(token);
                return Err(Error::TreeRefMod { bytenr: h.bytenr, key: key.key, ref_mod: node.ref_mod });
            }
            hi.remove_node(&key);
            hi.ref_mod -= node.signed();
            refs.entries_add(-1);
            let mir = std::mem::take(&mut hi.must_insert_reserved);
            let op = hi.extent_op.take();
            let (num_bytes, owning_root) = (hi.num_bytes, hi.owning_root);
            drop(hi);
            let run = RefRun {
                bytenr: h.bytenr,
                num_bytes,
                is_data: h.is_data,
                key: key.key,
                level: node.level,
                action: node.action,
                ref_mod: node.ref_mod,
                insert_reserved: mir,
                extent_op: op.as_ref(),
                owning_root,
            };
            if let Err(e) = backend.apply_ref(&run) {
                restore(refs, h, key, node, mir, op);
                refs.unselect(h);
                drop(token);
                return Err(Error::Backend { bytenr: h.bytenr, source: e });
            }
            crate::trace_ref!(run, h.bytenr, num_bytes, node.action, key, node.level, node.ref_mod);
            refs.fs.reserves.delayed_refs_rsv_release(1, 0);
            stats.refs += 1;
            stats.bytes_released += g.delayed_ref_bytes(1);
        }
        // §3.16.7 step 1: a leftover extent op.
        let mut hi = h.inner.lock();
        if let Some(op) = hi.extent_op.take() {
            if !hi.must_insert_reserved {
                let nb = hi.num_bytes;
                drop(hi);
                if let Err(e) = backend.apply_extent_op(h.bytenr, nb, h.is_data, &op) {
                    restore_op(h, op);
                    refs.unselect(h);
                    drop(token);
                    return Err(Error::Backend { bytenr: h.bytenr, source: e });
                }
                stats.extent_ops += 1;
                continue;
            }
        }
        drop(hi);
        // Step 2: the emptiness re-check under L1 + L2.
        let mut root = refs.root.lock();
        let mut hi = h.inner.lock();
        if !hi.refs.is_empty() || hi.extent_op.is_some() {
            continue;
        }
        // Step 3: btrfs_delete_ref_head.
        root.heads.remove(&h.bytenr);
        h.linked.store(false, Ordering::Relaxed);
        refs.entries_add(-1);
        root.num_heads -= 1;
        let mir = std::mem::take(&mut hi.must_insert_reserved);
        let nb = hi.num_bytes;
        // Step 5: cleanup accounting.
        if h.is_data && hi.total_ref_mod < 0 {
            root.pending_csums = root.pending_csums.wrapping_sub(nb);
            let lv = g.csum_leaves(nb);
            refs.fs.reserves.delayed_refs_rsv_release(0, lv);
            stats.bytes_released += g.csum_bytes(lv);
        }
        drop(hi);
        drop(root);
        // Step 4: a cancelled allocation is pinned.
        if mir {
            backend.pin_reserved(h.bytenr, nb, h.is_data);
        }
        crate::trace_head!(run, h.bytenr, nb, crate::Action::Add, h.is_data);
        drop(token);
        stats.heads_deleted += 1;
        return Ok((HeadOutcome::Deleted, stats));
    }
}

fn restore_op(h: &Head, op: ExtentOp) {
    restore_op_locked(&mut h.inner.lock(), op);
}

/// Put back an op a failed run took; an op queued meanwhile merges over it.
fn restore_op_locked(hi: &mut super::head::HeadInner, op: ExtentOp) {
    hi.extent_op = Some(match hi.extent_op.as_ref() {
        None => op,
        Some(newer) => ExtentOp::merged(Some(&op), newer),
    });
}

/// `btrfs_run_delayed_refs` (spec §3.16.1).
pub(super) fn run<B: ExtentTree + ?Sized>(refs: &LockedRefs, backend: &B, mode: RunMode) -> Result<RunStats> {
    let ready = if mode == RunMode::Ready { refs.root.lock().num_heads_ready } else { 0 };
    crate::api::drive_run(
        mode,
        ready,
        || Ok(run_one(refs, backend)?.map(|(_, _, s)| s)),
        || refs.root.lock().heads.is_empty(),
    )
}
