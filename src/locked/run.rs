//! The locked port's run side (semantics.md §6.2-6.5).

#![forbid(unsafe_code)]

use std::sync::Arc;

use parking_lot::{ArcMutexGuard, RawMutex};

use super::LockedRefs;
use super::head::{Head, InsertEffect};
use crate::api::{HeadOutcome, RunMode, RunStats};
use crate::batch::{RunScope, run_batch};
use crate::domain::extent_op::ExtentOp;
use crate::error::{Error, Result};
use crate::extent_tree::{ExtentTree, OpRun, Pin, RefRun, call_backend};

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

/// Select and run one head inside `scope`'s hooks (the sharded peer runs
/// its shards' heads in its own scope through this).
pub(crate) fn run_one_in<B: ExtentTree + ?Sized>(
    refs: &LockedRefs,
    scope: &RunScope<'_, B>,
) -> Result<Option<(u64, HeadOutcome, RunStats)>> {
    loop {
        match obtain_head(refs) {
            Ok(None) => return Ok(None),
            Err(()) => continue,
            Ok(Some((h, token))) => {
                // The token moves into the body; a failed begin hook drops
                // it after unselecting the head (through the shared slot).
                let slot = std::cell::Cell::new(Some(token));
                let release = || {
                    refs.unselect(&h);
                    drop(slot.take());
                };
                let body = || run_head(refs, scope, &h, slot.take().expect("token taken once"));
                let (outcome, stats) = scope.head(h.bytenr, release, body)?;
                return Ok(Some((h.bytenr, outcome, stats)));
            }
        }
    }
}

/// Select and run one head, as one run batch.
pub(super) fn run_one<B: ExtentTree + ?Sized>(
    refs: &LockedRefs,
    backend: &B,
) -> Result<Option<(u64, HeadOutcome, RunStats)>> {
    run_batch(backend, refs.batches().next(), |scope| run_one_in(refs, scope))
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
    scope: &RunScope<'_, B>,
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
                batch: scope.batch(),
            };
            // A failing or panicking backend: put the ref back and release
            // the head; a panic then goes on to the caller, and a later run
            // or `destroy` finds the head unclaimed.
            if let Err(failure) = call_backend(|| scope.backend().apply_ref(&run)) {
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
            let op_run = OpRun { bytenr: h.bytenr, num_bytes: nb, is_data: h.is_data, op: &op, batch: scope.batch() };
            if let Err(failure) = call_backend(|| scope.backend().apply_extent_op(&op_run)) {
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
        // Step 4: a cancelled allocation is pinned. The head is gone: a
        // failed pin cannot be put back (Error::PinLost).
        if mir {
            let pin = Pin { bytenr: h.bytenr, num_bytes: nb, is_data: h.is_data, batch: scope.batch() };
            if let Err(failure) = call_backend(|| scope.backend().pin_reserved(&pin)) {
                return Err(failure.into_pin_error(&pin));
            }
        }
        crate::trace_head!(run, h.bytenr, nb, crate::Action::Add, h.is_data);
        drop(token);
        stats.heads_deleted += 1;
        return Ok((HeadOutcome::Deleted, stats));
    }
}

/// `btrfs_run_delayed_refs` (semantics.md §6.5), as one run batch.
pub(super) fn run<B: ExtentTree + ?Sized>(refs: &LockedRefs, backend: &B, mode: RunMode) -> Result<RunStats> {
    let ready = if mode == RunMode::Ready { refs.root.lock().num_heads_ready() } else { 0 };
    run_batch(backend, refs.batches().next(), |scope| {
        crate::api::drive_run(
            mode,
            ready,
            || Ok(run_one_in(refs, scope)?.map(|(_, _, s)| s)),
            || refs.root.lock().is_empty(),
        )
    })
}
