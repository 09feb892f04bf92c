//! The locked port's run side (semantics.md §6.2-6.5).

#![forbid(unsafe_code)]

use std::sync::Arc;

use parking_lot::{ArcMutexGuard, RawMutex};

use super::LockedRefs;
use super::head::{Head, InsertEffect};
use crate::api::{HeadOutcome, RunMode, RunStats};
use crate::domain::extent_op::ExtentOp;
use crate::error::{Error, Result};
use crate::extent_tree::{ExtentTree, RefRun, call_backend};

type Token = ArcMutexGuard<RawMutex, ()>;

/// `btrfs_obtain_ref_head` with `btrfs_delayed_ref_lock` (semantics.md §6.3, §6.7).
/// `Ok(None)`: no head; `Err(())`: -EAGAIN, select again (semantics.md §11.1).
fn obtain_head(refs: &LockedRefs) -> std::result::Result<Option<(Arc<Head>, Token)>, ()> {
    let mut root = refs.root.lock();
    let Some(h) = root.select_head() else { return Ok(None) };
    if let Some(t) = h.token.try_lock_arc() {
        return Ok(Some((h, t)));
    }
    drop(root);
    let t = h.token.lock_arc();
    let root = refs.root.lock();
    if !h.is_linked(&root) {
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
    match hi.restore_ref(key, node, mir, op) {
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
}

/// Run one selected head to the end (semantics.md §6.8, §6.11).
fn run_head<B: ExtentTree + ?Sized>(
    refs: &LockedRefs,
    backend: &B,
    h: &Arc<Head>,
    token: Token,
) -> Result<(HeadOutcome, RunStats)> {
    let g = *refs.fs.reserves.geometry();
    let mut stats = RunStats { heads: 1, ..RunStats::default() };
    loop {
        // §6.8: refs, adds first, merging before each.
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
            hi.take_ref(&key, &node);
            refs.entries_add(-1);
            let mir = hi.take_must_insert_reserved();
            let op = hi.take_extent_op();
            let (num_bytes, owning_root) = (hi.num_bytes(), hi.owning_root());
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
            // A failing or panicking backend: put the ref back and release
            // the head; a panic then goes on to the caller, and a later run
            // or `destroy` finds the head unclaimed.
            if let Err(failure) = call_backend(|| backend.apply_ref(&run)) {
                restore(refs, h, key, node, mir, op);
                refs.unselect(h);
                drop(token);
                return Err(failure.into_error(h.bytenr));
            }
            crate::trace_ref!(run, h.bytenr, num_bytes, node.action, key, node.level, node.ref_mod);
            refs.fs.reserves.delayed_refs_rsv_release(1, 0);
            stats.refs += 1;
            stats.bytes_released += g.delayed_ref_bytes(1);
        }
        // §6.11 step 1: a leftover extent op (discarded if the extent was
        // never inserted).
        let mut hi = h.inner.lock();
        if let Some(op) = hi.cleanup_extent_op() {
            let nb = hi.num_bytes();
            drop(hi);
            if let Err(failure) = call_backend(|| backend.apply_extent_op(h.bytenr, nb, h.is_data, &op)) {
                h.inner.lock().restore_extent_op(op);
                refs.unselect(h);
                drop(token);
                return Err(failure.into_error(h.bytenr));
            }
            stats.extent_ops += 1;
            continue;
        }
        drop(hi);
        // Step 2: the emptiness re-check under L1 + L2.
        let mut root = refs.root.lock();
        let mut hi = h.inner.lock();
        if hi.has_refs() || hi.extent_op().is_some() {
            continue;
        }
        // Step 3: btrfs_delete_ref_head (`h` is processing: selected by this
        // run, so num_heads_ready is left as it is).
        refs.delete_ref_head(&mut root, h);
        let mir = hi.take_must_insert_reserved();
        let nb = hi.num_bytes();
        // Step 5: cleanup accounting.
        if let Some(lv) = refs.cleanup_ref_head_accounting(&mut root, h, &hi) {
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

/// `btrfs_run_delayed_refs` (semantics.md §6.5).
pub(super) fn run<B: ExtentTree + ?Sized>(refs: &LockedRefs, backend: &B, mode: RunMode) -> Result<RunStats> {
    let ready = if mode == RunMode::Ready { refs.root.lock().num_heads_ready() } else { 0 };
    crate::api::drive_run(
        mode,
        ready,
        || Ok(run_one(refs, backend)?.map(|(_, _, s)| s)),
        || refs.root.lock().is_empty(),
    )
}
