//! Feeding a segment's plan through an implementation, sequentially or with
//! concurrent adders and runners, over a strict [`MemExtentTree`] wrapped so
//! every run the implementation makes is recorded.

#![forbid(unsafe_code)]

use std::collections::{BTreeMap, HashMap};
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use delayed_refs::{
    Action, DelayedRefs, ExtentError, ExtentInfo, ExtentItem, ExtentOp, ExtentTree, FsConfig, FsShared, MemExtentTree,
    RefKey, RefRun, RunMode, RunStats, TransHandle,
};

use super::plan::{Op, OpKind, Segment};

/// How the adds are fed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// One thread, trace order, a full drain at each transaction end.
    Sequential,
    /// `threads` adder threads (each traced pid on one thread, by hash) and
    /// `runners` threads calling `run_one` meanwhile; a full drain at each
    /// transaction end.
    Concurrent {
        /// Adder threads.
        threads: usize,
        /// Runner threads.
        runners: usize,
        /// Keep each extent's adds in trace order across adder threads (an
        /// add waits until the extent's previous add, made by a pid on
        /// another thread, was queued). Off only to demonstrate the hazard.
        per_extent_order: bool,
    },
}

/// One merged ref the implementation ran (recorded by [`RecordingTree`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ImplRun {
    /// The batch (transaction) it ran in.
    pub batch: u32,
    /// Extent start.
    pub bytenr: u64,
    /// The backref.
    pub key: RefKey,
    /// Signed merged count (add > 0).
    pub signed: i64,
    /// The run carried must_insert_reserved.
    pub insert: bool,
}

/// A [`MemExtentTree`] that records every successfully applied [`RefRun`]
/// before returning, tagged with the current batch.
#[derive(Debug)]
pub struct RecordingTree {
    /// The strict tree.
    pub inner: MemExtentTree,
    batch: AtomicU32,
    runs: Mutex<Vec<ImplRun>>,
    refused: AtomicU64,
}

impl RecordingTree {
    /// A tree holding the items of `items`.
    pub fn new(items: &BTreeMap<u64, ExtentItem>) -> Self {
        let inner = MemExtentTree::new();
        for (b, it) in items {
            inner.insert_item(*b, it.clone());
        }
        RecordingTree { inner, batch: AtomicU32::new(0), runs: Mutex::new(Vec::new()), refused: AtomicU64::new(0) }
    }

    /// Tag later runs with `batch`.
    pub fn set_batch(&self, batch: u32) {
        self.batch.store(batch, Ordering::Relaxed);
    }

    /// The runs recorded so far.
    pub fn take_runs(&self) -> Vec<ImplRun> {
        std::mem::take(&mut *self.log())
    }

    fn log(&self) -> MutexGuard<'_, Vec<ImplRun>> {
        self.runs.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Runs the strict tree refused.
    pub fn refused(&self) -> u64 {
        self.refused.load(Ordering::Relaxed)
    }
}

impl ExtentTree for RecordingTree {
    fn apply_ref(&self, run: &RefRun<'_>) -> Result<(), ExtentError> {
        let r = self.inner.apply_ref(run);
        match r {
            Ok(()) => {
                let m = i64::try_from(run.ref_mod).unwrap_or(i64::MAX);
                let signed = if matches!(run.action, Action::Drop) { -m } else { m };
                self.log().push(ImplRun {
                    batch: self.batch.load(Ordering::Relaxed),
                    bytenr: run.bytenr,
                    key: run.key,
                    signed,
                    insert: run.insert_reserved,
                });
            }
            Err(_) => {
                self.refused.fetch_add(1, Ordering::Relaxed);
            }
        }
        r
    }

    fn apply_extent_op(&self, bytenr: u64, num_bytes: u64, is_data: bool, op: &ExtentOp) -> Result<(), ExtentError> {
        let r = self.inner.apply_extent_op(bytenr, num_bytes, is_data, op);
        if r.is_err() {
            self.refused.fetch_add(1, Ordering::Relaxed);
        }
        r
    }

    fn pin_reserved(&self, bytenr: u64, num_bytes: u64, is_data: bool) {
        self.inner.pin_reserved(bytenr, num_bytes, is_data);
    }

    fn lookup(&self, bytenr: u64) -> Option<ExtentInfo> {
        self.inner.lookup(bytenr)
    }
}

/// What the implementation did over one segment.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct EngineStats {
    /// Batches replayed.
    pub batches: u64,
    /// Add calls made.
    pub adds: u64,
    /// Add calls that returned an error.
    pub add_errors: u64,
    /// Heads selected by any run.
    pub heads: u64,
    /// Merged refs applied.
    pub refs_run: u64,
    /// Extent ops applied on their own.
    pub extent_ops_run: u64,
    /// Heads deleted by runs.
    pub heads_deleted: u64,
    /// `run_one` calls by concurrent runners that ran a head.
    pub runner_heads: u64,
    /// Runs the strict tree refused (each is put back by the implementation
    /// and retried; in concurrent mode an ordering hazard of the trace).
    pub refused_runs: u64,
    /// `run(RunMode::All)` calls at a transaction end that failed.
    pub drain_errors: u64,
    /// Heads left after a failed drain (dropped with `destroy`).
    pub heads_left: u64,
    /// Adds that waited for an add of the same extent on another thread.
    pub order_waits: u64,
    /// Bytes of cancelled allocations pinned.
    pub pinned_bytes: u64,
}

impl EngineStats {
    fn absorb_run(&mut self, s: &RunStats) {
        self.heads += s.heads;
        self.refs_run += s.refs;
        self.extent_ops_run += s.extent_ops;
        self.heads_deleted += s.heads_deleted;
    }
}

/// The result of replaying one segment.
#[derive(Debug)]
pub struct SegmentOutcome {
    /// The extent tree at the end.
    pub items: BTreeMap<u64, ExtentItem>,
    /// Every run the implementation made.
    pub runs: Vec<ImplRun>,
    /// Figures.
    pub stats: EngineStats,
    /// The first few errors, as text.
    pub errors: Vec<String>,
    /// Wall time.
    pub elapsed: Duration,
}

const MAX_ERRORS: usize = 10;

fn note(errors: &mut Vec<String>, msg: String) {
    if errors.len() < MAX_ERRORS {
        errors.push(msg);
    }
}

/// Make one add call.
fn apply<D: DelayedRefs>(refs: &D, h: &mut TransHandle, op: &Op) -> delayed_refs::Result<()> {
    match op.kind {
        OpKind::Tree { gref, op: xop } => refs.add_tree_ref(h, &gref, xop).map(|_| ()),
        OpKind::Data { gref, reserved } => refs.add_data_ref(h, &gref, reserved).map(|_| ()),
        OpKind::ExtentOp { num_bytes, op: xop } => refs.add_extent_op(h, op.bytenr, num_bytes, xop),
    }
}

/// Run everything at a transaction end. A backend error leaves the failing
/// ref queued (the implementation puts it back); other heads keep running
/// until only failing ones are left, which are then destroyed and counted.
fn drain<D: DelayedRefs>(refs: &D, tree: &RecordingTree, st: &mut EngineStats, errors: &mut Vec<String>, at: &str) {
    let mut stuck = 0u64;
    loop {
        let before = refs.counters().num_entries;
        match refs.run(tree, RunMode::All) {
            Ok(s) => {
                st.absorb_run(&s);
                break;
            }
            Err(e) => {
                st.drain_errors += 1;
                note(errors, format!("{at}: run(All): {e}"));
                let c = refs.counters();
                stuck = if c.num_entries == before { stuck + 1 } else { 0 };
                if stuck > c.num_heads + 1 {
                    break;
                }
            }
        }
    }
    let left = refs.counters().num_heads;
    if left > 0 {
        st.heads_left += left;
        let d = refs.destroy(tree);
        note(errors, format!("{at}: {} heads ({} refs) left unrun after a failed drain", d.heads, d.nodes));
    }
}

fn thread_of(pid: u32, threads: usize) -> usize {
    ((u64::from(pid).wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 32) as usize) % threads
}

/// Replay one batch with concurrent adders and runners, then drain.
#[allow(clippy::too_many_arguments)]
fn concurrent_batch<D: DelayedRefs>(
    refs: &D,
    tree: &RecordingTree,
    ops: &[Op],
    threads: usize,
    runners: usize,
    per_extent_order: bool,
    st: &mut EngineStats,
    errors: &mut Vec<String>,
    at: &str,
) {
    let threads = threads.max(1);
    let mut lists: Vec<Vec<usize>> = vec![Vec::new(); threads];
    let mut dep: Vec<Option<usize>> = vec![None; ops.len()];
    let mut last_on: HashMap<u64, usize> = HashMap::new();
    for (i, op) in ops.iter().enumerate() {
        let t = thread_of(op.pid, threads);
        lists[t].push(i);
        if per_extent_order {
            if let Some(&j) = last_on.get(&op.bytenr)
                && thread_of(ops[j].pid, threads) != t
            {
                dep[i] = Some(j);
            }
            last_on.insert(op.bytenr, i);
        }
    }
    let queued: Vec<AtomicBool> = ops.iter().map(|_| AtomicBool::new(false)).collect();
    let adders_done = AtomicBool::new(false);
    let panicked = AtomicBool::new(false);
    std::thread::scope(|s| {
        let runner_handles: Vec<_> = (0..runners)
            .map(|_| {
                s.spawn(|| {
                    let mut local = EngineStats::default();
                    // Run heads while the adders work; the transaction's
                    // full drain is left to the committing (main) thread.
                    while !adders_done.load(Ordering::Acquire) {
                        match refs.run_one(tree) {
                            Ok(Some((_, _, rs))) => {
                                local.absorb_run(&rs);
                                local.runner_heads += 1;
                            }
                            Ok(None) => std::thread::yield_now(),
                            // The strict tree refused a ref (counted by the
                            // tree); the implementation put it back.
                            Err(_) => std::thread::yield_now(),
                        }
                    }
                    local
                })
            })
            .collect();
        let adder_handles: Vec<_> = lists
            .iter()
            .map(|list| {
                let (dep, queued, panicked) = (&dep, &queued, &panicked);
                s.spawn(move || {
                    let mut h = TransHandle::new();
                    let mut errs = Vec::new();
                    let (mut adds, mut add_errors, mut waits) = (0u64, 0u64, 0u64);
                    for &i in list {
                        if let Some(j) = dep[i]
                            && !queued[j].load(Ordering::Acquire)
                        {
                            waits += 1;
                            let mut spins = 0u32;
                            while !queued[j].load(Ordering::Acquire) && !panicked.load(Ordering::Relaxed) {
                                spins += 1;
                                if spins < 64 {
                                    std::hint::spin_loop();
                                } else {
                                    std::thread::yield_now();
                                }
                            }
                        }
                        adds += 1;
                        match catch_unwind(AssertUnwindSafe(|| apply(refs, &mut h, &ops[i]))) {
                            Ok(Ok(())) => {}
                            Ok(Err(e)) => {
                                add_errors += 1;
                                errs.push(format!("add for {}: {e}", ops[i].bytenr));
                            }
                            Err(_) => {
                                add_errors += 1;
                                panicked.store(true, Ordering::Relaxed);
                                errs.push(format!("add for {} panicked", ops[i].bytenr));
                            }
                        }
                        queued[i].store(true, Ordering::Release);
                    }
                    (adds, add_errors, waits, errs)
                })
            })
            .collect();
        for a in adder_handles {
            match a.join() {
                Ok((adds, add_errors, waits, errs)) => {
                    st.adds += adds;
                    st.add_errors += add_errors;
                    st.order_waits += waits;
                    for e in errs {
                        note(errors, format!("{at}: {e}"));
                    }
                }
                Err(_) => {
                    st.add_errors += 1;
                    note(errors, format!("{at}: an adder thread panicked"));
                }
            }
        }
        adders_done.store(true, Ordering::Release);
        for r in runner_handles {
            match r.join() {
                Ok(local) => {
                    st.absorb_run(&RunStats {
                        heads: local.heads,
                        refs: local.refs_run,
                        extent_ops: local.extent_ops_run,
                        heads_deleted: local.heads_deleted,
                        ..RunStats::default()
                    });
                    st.runner_heads += local.runner_heads;
                }
                Err(_) => {
                    st.drain_errors += 1;
                    note(errors, format!("{at}: a runner thread panicked"));
                }
            }
        }
    });
    drain(refs, tree, st, errors, at);
}

/// Replay one segment against implementation `D`: load the before-dump into
/// a fresh strict tree, then for each batch (transaction) a fresh delayed-ref
/// root over shared fs-wide state, its adds, and a full drain.
pub fn replay_segment<D: DelayedRefs>(seg: &Segment, mode: Mode) -> SegmentOutcome {
    let t0 = Instant::now();
    let tree = RecordingTree::new(&seg.before);
    let fs = Arc::new(FsShared::<D::Cell>::new(FsConfig::default()));
    let mut st = EngineStats::default();
    let mut errors = Vec::new();
    for (b, batch) in seg.batches.iter().enumerate() {
        let bno = u32::try_from(b).unwrap_or(u32::MAX);
        tree.set_batch(bno);
        let at = format!("{} transaction {b}", seg.name);
        let refs = D::with_fs(fs.clone());
        st.batches += 1;
        match mode {
            Mode::Sequential => {
                let mut handles: HashMap<u32, TransHandle> = HashMap::new();
                for op in &batch.ops {
                    st.adds += 1;
                    if let Err(e) = apply(&refs, handles.entry(op.pid).or_default(), op) {
                        st.add_errors += 1;
                        note(&mut errors, format!("{at}: add for {}: {e}", op.bytenr));
                    }
                }
                drain(&refs, &tree, &mut st, &mut errors, &at);
            }
            Mode::Concurrent { threads, runners, per_extent_order } => {
                concurrent_batch(
                    &refs,
                    &tree,
                    &batch.ops,
                    threads,
                    runners,
                    per_extent_order,
                    &mut st,
                    &mut errors,
                    &at,
                );
            }
        }
    }
    st.refused_runs = tree.refused();
    st.pinned_bytes = tree.inner.pinned_bytes();
    SegmentOutcome { items: tree.inner.items(), runs: tree.take_runs(), stats: st, errors, elapsed: t0.elapsed() }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::replay::plan::{Batch, BatchEnd, PlanStats, new_block_op};
    use delayed_refs::{GenericRef, LockedRefs};
    use std::collections::BTreeSet;

    fn seg(batches: Vec<Batch>) -> Segment {
        Segment {
            name: "t".into(),
            before_name: "b".into(),
            before: BTreeMap::new(),
            after: BTreeMap::new(),
            batches,
            kernel_runs: Vec::new(),
            touched_extents: BTreeSet::new(),
            touched_keys: BTreeSet::new(),
            stats: PlanStats::default(),
        }
    }

    fn tree_op(pid: u32, action: Action, bytenr: u64) -> Op {
        let gref = GenericRef::new(action, bytenr, 4096, 0, 5).tree(0, 5, 0, true);
        let op = (action == Action::AddExtent).then(|| new_block_op(0, 0));
        Op { pid, bytenr, kind: OpKind::Tree { gref, op } }
    }

    #[test]
    fn allocate_then_free_across_transactions() {
        allocate_then_free::<LockedRefs>();
        allocate_then_free::<delayed_refs::LockFreeRefs>();
    }

    fn allocate_then_free<D: DelayedRefs>() {
        let b = |ops| Batch { ops, end: BatchEnd::Commit };
        let s = seg(vec![
            b(vec![tree_op(1, Action::AddExtent, 8192), tree_op(2, Action::AddExtent, 12288)]),
            b(vec![tree_op(2, Action::Drop, 8192)]),
        ]);
        for mode in [
            Mode::Sequential,
            Mode::Concurrent { threads: 2, runners: 1, per_extent_order: true },
            Mode::Concurrent { threads: 3, runners: 2, per_extent_order: true },
        ] {
            let out = replay_segment::<D>(&s, mode);
            assert!(out.errors.is_empty(), "{:?}", out.errors);
            assert_eq!(out.items.keys().copied().collect::<Vec<_>>(), [12288]);
            let nets: i64 = out.runs.iter().map(|r| r.signed).sum();
            assert_eq!(nets, 1);
            assert_eq!(out.runs.iter().filter(|r| r.insert).count(), 2);
        }
    }

    #[test]
    fn a_drop_of_a_missing_extent_is_reported_not_panicked() {
        missing_extent::<LockedRefs>();
        missing_extent::<delayed_refs::LockFreeRefs>();
    }

    fn missing_extent<D: DelayedRefs>() {
        let s = seg(vec![Batch { ops: vec![tree_op(1, Action::Drop, 8192)], end: BatchEnd::SegmentEnd }]);
        let out = replay_segment::<D>(&s, Mode::Sequential);
        assert!(out.stats.drain_errors >= 1);
        assert_eq!(out.stats.heads_left, 1);
        assert!(!out.errors.is_empty());
    }
}
