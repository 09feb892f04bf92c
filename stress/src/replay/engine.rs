//! Feeding a segment's plan through an implementation, sequentially or with
//! concurrent adders and runners, over a strict [`MemExtentTree`] wrapped so
//! every run the implementation makes is recorded and checked against the
//! tree-mod-log blockers the trace had live.
//!
//! Seq and blockers. Every tree or data ref of an fs-tree root is queued
//! while the fs-wide [`SeqTracker`] (`FsShared::seq`) reads the seq the
//! kernel gave it (`SeqTracker::set_current`); blockers are registered at
//! the kernel's seq (`SeqTracker::register_at`) and removed in event order;
//! each transaction starts at seq 0 (`SeqTracker::reset`). Sequentially this
//! is trace order. Concurrently (adders on several threads) three orders
//! are kept besides each task's own: the blocker events (get, put, check)
//! happen one at a time in trace order; a ref waits until every blocker
//! event before it in the trace has happened; and the refs of fs-tree roots
//! go in phases of equal seq in trace order, the tracker moving to the next
//! phase's seq once every ref of a phase is queued. Refs of one phase, and
//! everything else, run concurrently with each other and with the runners.
//!
//! Checks. At each `kp_check_seq` the tracker's decision
//! (`SeqTracker::holds_back`, which both implementations consult) is
//! compared with the kernel's (`kp_held_back` or not). Each run the
//! implementation applies is attributed to the lowest-seq pending node of its
//! backref and direction (the only one a correct runner may take); if that
//! node's seq is at or above a blocker registered before the run started and
//! still registered, the run is a seq violation.

#![forbid(unsafe_code)]

use std::cell::Cell;
use std::collections::{BTreeMap, HashMap};
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use delayed_refs::{
    Action, DelayedRefs, Error, ExtentError, ExtentInfo, ExtentItem, ExtentTree, FsConfig, FsShared, HeadOutcome,
    MemExtentTree, OpRun, Pin, RefKey, RefRun, RunMode, RunStats, SeqBlocker, SeqTracker, TransHandle,
};

use super::plan::{Batch, BatchEnd, Op, OpKind, Segment};

/// How the adds are fed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// One thread, trace order; one head run wherever the kernel finished
    /// with a head, and a full drain at each transaction end.
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

thread_local! {
    /// The blocker serial read by this thread right before its current run
    /// call: blockers registered before it were visible to the whole run.
    static RUN_START: Cell<u64> = const { Cell::new(0) };
}

/// Note the start of a run call on this thread.
fn start_run(blockers: &Blockers<'_>) {
    RUN_START.with(|c| c.set(blockers.serial()));
}

/// The tree-mod-log blockers the replay registered, by plan id.
#[derive(Debug)]
pub struct Blockers<'t> {
    tracker: &'t SeqTracker,
    live: Mutex<HashMap<u32, (SeqBlocker<'t>, u64)>>,
    serial: AtomicU64,
}

impl<'t> Blockers<'t> {
    /// Blockers on `tracker`.
    pub fn new(tracker: &'t SeqTracker) -> Self {
        Blockers { tracker, live: Mutex::new(HashMap::new()), serial: AtomicU64::new(0) }
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<u32, (SeqBlocker<'t>, u64)>> {
        self.live.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Register blocker `id` at `seq`. Registration, serial and entry are
    /// made under one lock, so a run whose start serial is above this
    /// blocker's finds it here.
    pub fn get(&self, id: u32, seq: u64) -> Result<(), String> {
        let mut live = self.lock();
        if live.contains_key(&id) {
            return Err(format!("blocker {id} registered twice"));
        }
        let b = self.tracker.register_at(seq).map_err(|e| e.to_string())?;
        let serial = self.serial.fetch_add(1, Ordering::SeqCst);
        live.insert(id, (b, serial));
        Ok(())
    }

    /// Remove blocker `id`; false if it is not registered (released at a
    /// transaction end before its put).
    pub fn put(&self, id: u32) -> bool {
        // Out of the map first, then unregistered (the guard drops here).
        let gone = self.lock().remove(&id);
        gone.is_some()
    }

    /// Remove every blocker; returns how many there were.
    pub fn release_all(&self) -> usize {
        let all: Vec<_> = self.lock().drain().collect();
        all.len()
    }

    /// Registrations so far.
    pub fn serial(&self) -> u64 {
        self.serial.load(Ordering::SeqCst)
    }

    /// The lowest seq of the blockers registered before serial `before` and
    /// still registered; 0 if none.
    pub fn established_lowest(&self, before: u64) -> u64 {
        self.lock().values().filter(|(_, s)| *s < before).map(|(b, _)| b.seq()).min().unwrap_or(0)
    }
}

/// Pending nodes the replay queued, per backref: signed counts by seq (the
/// implementations merge at insert only equal (key, seq)).
type Shadow = HashMap<(u64, RefKey), BTreeMap<u64, i64>>;

/// At most this many seq violations are described per segment.
const MAX_VIOLATIONS: usize = 10;

/// A [`MemExtentTree`] that records every successfully applied [`RefRun`]
/// before returning, tagged with the current batch, and checks it against
/// the registered blockers.
#[derive(Debug)]
pub struct RecordingTree<'t> {
    /// The strict tree.
    pub inner: MemExtentTree,
    batch: AtomicU32,
    runs: Mutex<Vec<ImplRun>>,
    refused: AtomicU64,
    /// The blockers the replay registered.
    pub blockers: Blockers<'t>,
    shadow: Mutex<Shadow>,
    violations: AtomicU64,
    under_blocker: AtomicU64,
    violation_examples: Mutex<Vec<String>>,
}

impl<'t> RecordingTree<'t> {
    /// A tree holding the items of `items`, checking runs against blockers
    /// registered on `tracker`.
    pub fn new(items: &BTreeMap<u64, ExtentItem>, tracker: &'t SeqTracker) -> Self {
        let inner = MemExtentTree::new();
        for (b, it) in items {
            inner.insert_item(*b, it.clone());
        }
        RecordingTree {
            inner,
            batch: AtomicU32::new(0),
            runs: Mutex::new(Vec::new()),
            refused: AtomicU64::new(0),
            blockers: Blockers::new(tracker),
            shadow: Mutex::new(HashMap::new()),
            violations: AtomicU64::new(0),
            under_blocker: AtomicU64::new(0),
            violation_examples: Mutex::new(Vec::new()),
        }
    }

    /// Tag later runs with `batch`; forget the pending nodes of the last one.
    pub fn set_batch(&self, batch: u32) {
        self.batch.store(batch, Ordering::Relaxed);
        self.shadow_lock().clear();
    }

    /// The runs recorded so far.
    pub fn take_runs(&self) -> Vec<ImplRun> {
        std::mem::take(&mut *self.log())
    }

    fn log(&self) -> MutexGuard<'_, Vec<ImplRun>> {
        self.runs.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn shadow_lock(&self) -> MutexGuard<'_, Shadow> {
        self.shadow.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Runs the strict tree refused.
    pub fn refused(&self) -> u64 {
        self.refused.load(Ordering::Relaxed)
    }

    /// Runs checked while a blocker registered before them was registered
    /// (the runs the violation check can catch).
    pub fn runs_under_blocker(&self) -> u64 {
        self.under_blocker.load(Ordering::Relaxed)
    }

    /// Runs of a node at or above a registered blocker's seq, and the first
    /// few described.
    pub fn violations(&self) -> (u64, Vec<String>) {
        let ex = self.violation_examples.lock().unwrap_or_else(|e| e.into_inner()).clone();
        (self.violations.load(Ordering::Relaxed), ex)
    }

    /// Note a ref about to be queued with `seq` (call before the add).
    pub fn note_add(&self, bytenr: u64, key: RefKey, seq: u64, add: bool) {
        let mut sh = self.shadow_lock();
        let slot = sh.entry((bytenr, key)).or_default().entry(seq).or_insert(0);
        *slot += if add { 1 } else { -1 };
    }

    /// Attribute a run to the lowest-seq pending nodes of its backref and
    /// direction, and count a violation if such a node is held back by a
    /// blocker registered before the run started.
    fn check_run(&self, run: &RefRun<'_>) {
        let add = !matches!(run.action, Action::Drop);
        let lowest = self.blockers.established_lowest(RUN_START.with(Cell::get));
        if lowest != 0 {
            self.under_blocker.fetch_add(1, Ordering::Relaxed);
        }
        let mut sh = self.shadow_lock();
        let Some(nodes) = sh.get_mut(&(run.bytenr, run.key)) else { return };
        let mut left = i64::try_from(run.ref_mod).unwrap_or(i64::MAX);
        let mut bad = None;
        for (&seq, cnt) in nodes.iter_mut() {
            if left == 0 {
                break;
            }
            if *cnt == 0 || (*cnt > 0) != add {
                continue;
            }
            if seq != 0 && lowest != 0 && seq >= lowest && bad.is_none() {
                bad = Some(seq);
            }
            let take = cnt.abs().min(left);
            left -= take;
            *cnt -= if add { take } else { -take };
        }
        nodes.retain(|_, c| *c != 0);
        drop(sh);
        if let Some(seq) = bad {
            self.violations.fetch_add(1, Ordering::Relaxed);
            let mut ex = self.violation_examples.lock().unwrap_or_else(|e| e.into_inner());
            if ex.len() < MAX_VIOLATIONS {
                ex.push(format!(
                    "extent {} {:?}: a {} of seq {seq} ran while a blocker at seq {lowest} was registered",
                    run.bytenr,
                    run.key,
                    if add { "ADD" } else { "DROP" }
                ));
            }
        }
    }
}

impl ExtentTree for RecordingTree<'_> {
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
                self.check_run(run);
            }
            Err(_) => {
                self.refused.fetch_add(1, Ordering::Relaxed);
            }
        }
        r
    }

    fn apply_extent_op(&self, run: &OpRun<'_>) -> Result<(), ExtentError> {
        let r = self.inner.apply_extent_op(run);
        if r.is_err() {
            self.refused.fetch_add(1, Ordering::Relaxed);
        }
        r
    }

    fn pin_reserved(&self, pin: &Pin) -> Result<(), ExtentError> {
        self.inner.pin_reserved(pin)
    }

    fn lookup(&self, bytenr: u64) -> Result<Option<ExtentInfo>, ExtentError> {
        ExtentTree::lookup(&self.inner, bytenr)
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
    /// `run_one` calls by concurrent runners that selected a head.
    pub runner_heads: u64,
    /// `run_one` calls of a sequential replay, where the kernel finished
    /// with a head, that selected a head.
    pub paced_runs: u64,
    /// Runs the strict tree refused (each is put back by the implementation
    /// and retried; in concurrent mode an ordering hazard of the trace).
    pub refused_runs: u64,
    /// Errors other than a refused run from `run_one` before a
    /// transaction's end.
    pub run_errors: u64,
    /// `run(RunMode::All)` calls at a transaction end that failed.
    pub drain_errors: u64,
    /// Heads left after a failed drain (dropped with `destroy`).
    pub heads_left: u64,
    /// Adds that waited for an add of the same extent on another thread.
    pub order_waits: u64,
    /// Bytes of cancelled allocations pinned.
    pub pinned_bytes: u64,
    /// Times the implementation unselected a head because of a seq blocker.
    pub held_back: u64,
    /// Blocker registrations refused by the tracker.
    pub blocker_errors: u64,
    /// Blockers still registered at a transaction end (released there).
    pub blockers_released: u64,
    /// Kernel checks (`kp_check_seq`) compared.
    pub checks: u64,
    /// Of those, the kernel held the ref back (`kp_held_back`).
    pub checks_kernel_held: u64,
    /// Of those, the tracker decided as the kernel did.
    pub checks_agree: u64,
    /// Runs of a node at or above a registered blocker's seq.
    pub seq_violations: u64,
    /// Runs made while a blocker (registered before the run) was registered.
    pub runs_under_blocker: u64,
    /// Qgroup records of marked heads the kernel made (per transaction).
    pub qgroup_kernel: u64,
    /// Qgroup records the implementation made (per transaction).
    pub qgroup_impl: u64,
    /// Records on both sides with the same length.
    pub qgroup_matched: u64,
    /// Records on either side.
    pub qgroup_total: u64,
}

impl EngineStats {
    fn absorb_run(&mut self, s: &RunStats) {
        self.heads += s.heads;
        self.refs_run += s.refs;
        self.extent_ops_run += s.extent_ops;
        self.heads_deleted += s.heads_deleted;
        self.held_back += s.held_back;
    }

    fn absorb_thread(&mut self, t: &EngineStats) {
        self.adds += t.adds;
        self.add_errors += t.add_errors;
        self.order_waits += t.order_waits;
        self.checks += t.checks;
        self.checks_kernel_held += t.checks_kernel_held;
        self.checks_agree += t.checks_agree;
        self.blocker_errors += t.blocker_errors;
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
    /// The first few disagreements (hold-back decisions, seq violations,
    /// qgroup records), as text.
    pub mismatches: Vec<String>,
    /// Wall time.
    pub elapsed: Duration,
}

const MAX_ERRORS: usize = 10;

fn note(errors: &mut Vec<String>, msg: String) {
    if errors.len() < MAX_ERRORS {
        errors.push(msg);
    }
}

/// Make one add call (extent ops only; blocker events do nothing here).
fn apply<D: DelayedRefs>(refs: &D, h: &mut TransHandle, op: &Op) -> delayed_refs::Result<()> {
    match op.kind {
        OpKind::Tree { gref, op: xop } => refs.add_tree_ref(h, &gref, xop).map(|_| ()),
        OpKind::Data { gref, reserved } => refs.add_data_ref(h, &gref, reserved).map(|_| ()),
        OpKind::ExtentOp { num_bytes, op: xop } => refs.add_extent_op(h, op.bytenr, num_bytes, xop),
        OpKind::GetSeq { .. } | OpKind::PutSeq { .. } | OpKind::CheckSeq { .. } | OpKind::KernelRun => Ok(()),
    }
}

/// Note a tree or data ref in the tree's shadow before it is queued.
fn note_ref(tree: &RecordingTree<'_>, op: &Op) {
    if let Some(g) = op.kind.gref() {
        let seq = op.fs_seq().unwrap_or(0);
        tree.note_add(op.bytenr, g.ref_key(), seq, g.action != Action::Drop);
    }
}

/// A blocker event (get, put or check); `st` gets the check figures,
/// `mismatches` a described disagreement.
fn blocker_event(
    tracker: &SeqTracker,
    tree: &RecordingTree<'_>,
    op: &Op,
    st: &mut EngineStats,
    mismatches: &mut Vec<String>,
    at: &str,
) {
    match op.kind {
        OpKind::GetSeq { seq, id } => {
            if let Err(e) = tree.blockers.get(id, seq) {
                st.blocker_errors += 1;
                note(mismatches, format!("{at}: blocker at seq {seq}: {e}"));
            }
        }
        OpKind::PutSeq { id } => {
            // A put of a blocker released at a transaction end is a no-op.
            tree.blockers.put(id);
        }
        OpKind::CheckSeq { seq, held } => {
            st.checks += 1;
            st.checks_kernel_held += u64::from(held);
            let ours = tracker.holds_back(seq);
            if ours == held {
                st.checks_agree += 1;
            } else {
                note(
                    mismatches,
                    format!(
                        "{at}: hold-back check of seq {seq}: kernel {}, tracker {} (lowest blocker {})",
                        if held { "held back" } else { "ran" },
                        if ours { "holds back" } else { "runs" },
                        tracker.lowest_seq()
                    ),
                );
            }
        }
        _ => {}
    }
}

fn is_blocker_event(k: &OpKind) -> bool {
    matches!(k, OpKind::GetSeq { .. } | OpKind::PutSeq { .. } | OpKind::CheckSeq { .. })
}

/// A `run_one` result outside a drain: figures, or an error that is not a
/// refused run (those are counted by the tree and retried). True if a head
/// was selected.
fn absorb_run_one(
    r: delayed_refs::Result<Option<(u64, HeadOutcome, RunStats)>>,
    st: &mut EngineStats,
    errors: &mut Vec<String>,
    at: &str,
) -> bool {
    match r {
        Ok(Some((_, _, rs))) => {
            st.absorb_run(&rs);
            true
        }
        Ok(None) | Err(Error::Backend { .. }) => false,
        Err(e) => {
            st.run_errors += 1;
            note(errors, format!("{at}: run_one: {}", crate::out::Chain(&e)));
            false
        }
    }
}

/// Run everything at a transaction end. A backend error leaves the failing
/// ref queued (the implementation puts it back); other heads keep running
/// until only failing ones are left, which are then destroyed and counted.
/// No blocker may be registered (a held-back head would never run).
fn drain<D: DelayedRefs>(refs: &D, tree: &RecordingTree<'_>, st: &mut EngineStats, errors: &mut Vec<String>, at: &str) {
    start_run(&tree.blockers);
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
                note(errors, format!("{at}: run(All): {}", crate::out::Chain(&e)));
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

/// The end of a transaction: release leftover blockers, drain, compare the
/// qgroup records, restart the seq numbering (not at a realloc cut, which is
/// no transaction end in the kernel).
fn end_batch<D: DelayedRefs>(
    refs: &D,
    tree: &RecordingTree<'_>,
    batch: &Batch,
    st: &mut EngineStats,
    errors: &mut Vec<String>,
    mismatches: &mut Vec<String>,
    at: &str,
) {
    st.blockers_released += tree.blockers.release_all() as u64;
    drain(refs, tree, st, errors, at);
    let ours: BTreeMap<u64, u64> = refs.qgroup_records().iter().map(|r| (r.bytenr, r.num_bytes)).collect();
    st.qgroup_kernel += batch.qgroup.len() as u64;
    st.qgroup_impl += ours.len() as u64;
    let mut all: Vec<u64> = batch.qgroup.keys().chain(ours.keys()).copied().collect();
    all.sort_unstable();
    all.dedup();
    for b in all {
        st.qgroup_total += 1;
        let (k, i) = (batch.qgroup.get(&b), ours.get(&b));
        if k.is_some() && k == i {
            st.qgroup_matched += 1;
        } else {
            note(mismatches, format!("{at}: qgroup record for {b}: kernel {k:?} bytes, implementation {i:?} bytes"));
        }
    }
    if batch.end != BatchEnd::Realloc {
        if let Err(e) = refs.fs().seq.reset() {
            note(errors, format!("{at}: {e}"));
        }
    }
}

fn thread_of(pid: u32, threads: usize) -> usize {
    ((u64::from(pid).wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 32) as usize) % threads
}

/// A wait for another adder's op longer than this is reported as an error
/// (the orders of a concurrent batch never deadlock: every wait is for an
/// earlier op in trace order; this turns a bug into a failure, not a hang).
const WAIT_LIMIT: Duration = Duration::from_secs(60);

/// Spin, then yield, until `done()`. False if the batch was aborted (an
/// adder panicked, or this wait passed [`WAIT_LIMIT`] and aborted it): then
/// every later wait returns at once and the batch ends with an error.
fn wait_for(done: impl Fn() -> bool, abort: &AtomicBool) -> bool {
    let mut spins = 0u32;
    let mut since: Option<Instant> = None;
    while !done() {
        if abort.load(Ordering::Relaxed) {
            return false;
        }
        spins += 1;
        if spins < 64 {
            std::hint::spin_loop();
        } else {
            std::thread::yield_now();
            if spins % 1024 == 0 && since.get_or_insert_with(Instant::now).elapsed() > WAIT_LIMIT {
                abort.store(true, Ordering::Relaxed);
                return false;
            }
        }
    }
    true
}

/// The orders a concurrent batch keeps across adder threads (module docs).
#[derive(Debug)]
struct Gates {
    /// The previous op on the same extent, made on another thread.
    dep: Vec<Option<usize>>,
    /// A blocker event's rank among the batch's blocker events.
    rank: Vec<Option<usize>>,
    /// For fs-tree refs: blocker events before them in trace order.
    events_before: Vec<usize>,
    /// For fs-tree refs: their seq phase.
    phase: Vec<Option<usize>>,
    /// Each phase's seq.
    phase_seq: Vec<u64>,
    /// Refs of each phase not yet queued.
    phase_left: Vec<AtomicUsize>,
}

impl Gates {
    fn new(ops: &[Op], threads: usize, per_extent_order: bool) -> Self {
        let n = ops.len();
        let mut g = Gates {
            dep: vec![None; n],
            rank: vec![None; n],
            events_before: vec![0; n],
            phase: vec![None; n],
            phase_seq: Vec::new(),
            phase_left: Vec::new(),
        };
        let mut last_on: HashMap<u64, usize> = HashMap::new();
        let mut events = 0usize;
        let mut counts: Vec<usize> = Vec::new();
        for (i, op) in ops.iter().enumerate() {
            let t = thread_of(op.pid, threads);
            if per_extent_order && op.kind.is_extent() {
                if let Some(&j) = last_on.get(&op.bytenr)
                    && thread_of(ops[j].pid, threads) != t
                {
                    g.dep[i] = Some(j);
                }
                last_on.insert(op.bytenr, i);
            }
            if is_blocker_event(&op.kind) {
                g.rank[i] = Some(events);
                events += 1;
            }
            if let Some(seq) = op.fs_seq() {
                g.events_before[i] = events;
                if g.phase_seq.last() != Some(&seq) {
                    g.phase_seq.push(seq);
                    counts.push(0);
                }
                g.phase[i] = Some(g.phase_seq.len() - 1);
                if let Some(c) = counts.last_mut() {
                    *c += 1;
                }
            }
        }
        g.phase_left = counts.into_iter().map(AtomicUsize::new).collect();
        g
    }
}

/// Replay one batch with concurrent adders and runners, then end it.
#[allow(clippy::too_many_arguments)]
fn concurrent_batch<D: DelayedRefs>(
    refs: &D,
    tree: &RecordingTree<'_>,
    batch: &Batch,
    threads: usize,
    runners: usize,
    per_extent_order: bool,
    st: &mut EngineStats,
    errors: &mut Vec<String>,
    mismatches: &mut Vec<String>,
    at: &str,
) {
    let ops = &batch.ops;
    let threads = threads.max(1);
    let mut lists: Vec<Vec<usize>> = vec![Vec::new(); threads];
    for (i, op) in ops.iter().enumerate() {
        lists[thread_of(op.pid, threads)].push(i);
    }
    let gates = Gates::new(ops, threads, per_extent_order);
    let tracker = &refs.fs().seq;
    if let Some(&first) = gates.phase_seq.first() {
        tracker.set_current(first);
    }
    let queued: Vec<AtomicBool> = ops.iter().map(|_| AtomicBool::new(false)).collect();
    let events_done = AtomicUsize::new(0);
    let cur_phase = AtomicUsize::new(0);
    let adders_done = AtomicBool::new(false);
    let panicked = AtomicBool::new(false);
    std::thread::scope(|s| {
        let runner_handles: Vec<_> = (0..runners)
            .map(|_| {
                s.spawn(|| {
                    let mut local = EngineStats::default();
                    let mut errs = Vec::new();
                    // Run heads while the adders work; the transaction's
                    // full drain is left to the committing (main) thread.
                    while !adders_done.load(Ordering::Acquire) {
                        start_run(&tree.blockers);
                        if absorb_run_one(refs.run_one(tree), &mut local, &mut errs, at) {
                            local.runner_heads += 1;
                        } else {
                            std::thread::yield_now();
                        }
                    }
                    (local, errs)
                })
            })
            .collect();
        let adder_handles: Vec<_> = lists
            .iter()
            .map(|list| {
                let (gates, queued, panicked, events_done, cur_phase) =
                    (&gates, &queued, &panicked, &events_done, &cur_phase);
                s.spawn(move || {
                    let mut h = TransHandle::new();
                    let mut errs = Vec::new();
                    let mut mism = Vec::new();
                    let mut local = EngineStats::default();
                    let mut aborted = false;
                    for &i in list {
                        let op = &ops[i];
                        let mut waited = true;
                        if let Some(j) = gates.dep[i]
                            && !queued[j].load(Ordering::Acquire)
                        {
                            local.order_waits += 1;
                            waited &= wait_for(|| queued[j].load(Ordering::Acquire), panicked);
                        }
                        if let Some(k) = gates.phase[i] {
                            let before = gates.events_before[i];
                            waited &= wait_for(|| events_done.load(Ordering::Acquire) >= before, panicked);
                            waited &= wait_for(|| cur_phase.load(Ordering::Acquire) == k, panicked);
                        }
                        if let Some(r) = gates.rank[i] {
                            waited &= wait_for(|| events_done.load(Ordering::Acquire) == r, panicked);
                        }
                        if !waited && !aborted {
                            aborted = true;
                            local.add_errors += 1;
                            errs.push(format!("the batch was aborted while op {i} waited for an earlier op"));
                        }
                        if gates.rank[i].is_some() {
                            blocker_event(tracker, tree, op, &mut local, &mut mism, at);
                        } else if op.kind.is_extent() {
                            local.adds += 1;
                            note_ref(tree, op);
                            match catch_unwind(AssertUnwindSafe(|| apply(refs, &mut h, op))) {
                                Ok(Ok(())) => {}
                                Ok(Err(e)) => {
                                    local.add_errors += 1;
                                    errs.push(format!("add for {}: {}", crate::out::Chain(&e), op.bytenr));
                                }
                                Err(_) => {
                                    local.add_errors += 1;
                                    panicked.store(true, Ordering::Relaxed);
                                    errs.push(format!("add for {} panicked", op.bytenr));
                                }
                            }
                        }
                        queued[i].store(true, Ordering::Release);
                        if let Some(r) = gates.rank[i] {
                            events_done.store(r + 1, Ordering::Release);
                        }
                        if let Some(k) = gates.phase[i]
                            && gates.phase_left[k].fetch_sub(1, Ordering::AcqRel) == 1
                        {
                            // The last ref of its phase moves the seq on.
                            if let Some(&next) = gates.phase_seq.get(k + 1) {
                                tracker.set_current(next);
                            }
                            cur_phase.store(k + 1, Ordering::Release);
                        }
                    }
                    (local, errs, mism)
                })
            })
            .collect();
        for a in adder_handles {
            match a.join() {
                Ok((local, errs, mism)) => {
                    st.absorb_thread(&local);
                    for e in errs {
                        note(errors, format!("{at}: {e}"));
                    }
                    for m in mism {
                        note(mismatches, m);
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
                Ok((local, errs)) => {
                    st.absorb_run(&RunStats {
                        heads: local.heads,
                        refs: local.refs_run,
                        extent_ops: local.extent_ops_run,
                        heads_deleted: local.heads_deleted,
                        held_back: local.held_back,
                        ..RunStats::default()
                    });
                    st.runner_heads += local.runner_heads;
                    st.run_errors += local.run_errors;
                    for e in errs {
                        note(errors, e);
                    }
                }
                Err(_) => {
                    st.drain_errors += 1;
                    note(errors, format!("{at}: a runner thread panicked"));
                }
            }
        }
    });
    end_batch(refs, tree, batch, st, errors, mismatches, at);
}

/// Replay one batch sequentially, then end it.
fn sequential_batch<D: DelayedRefs>(
    refs: &D,
    tree: &RecordingTree<'_>,
    batch: &Batch,
    st: &mut EngineStats,
    errors: &mut Vec<String>,
    mismatches: &mut Vec<String>,
    at: &str,
) {
    let tracker = &refs.fs().seq;
    let mut handles: HashMap<u32, TransHandle> = HashMap::new();
    for op in &batch.ops {
        if is_blocker_event(&op.kind) {
            blocker_event(tracker, tree, op, st, mismatches, at);
        } else if op.kind == OpKind::KernelRun {
            start_run(&tree.blockers);
            if absorb_run_one(refs.run_one(tree), st, errors, at) {
                st.paced_runs += 1;
            }
        } else {
            if let Some(seq) = op.fs_seq()
                && tracker.current() != seq
            {
                tracker.set_current(seq);
            }
            st.adds += 1;
            note_ref(tree, op);
            if let Err(e) = apply(refs, handles.entry(op.pid).or_default(), op) {
                st.add_errors += 1;
                note(errors, format!("{at}: add for {}: {}", crate::out::Chain(&e), op.bytenr));
            }
        }
    }
    end_batch(refs, tree, batch, st, errors, mismatches, at);
}

/// Replay one segment against implementation `D`: load the before-dump into
/// a fresh strict tree, then for each batch (transaction) a fresh delayed-ref
/// root over shared fs-wide state (qgroup records kept if `qgroups`), its
/// adds and blocker events, and a full drain.
pub fn replay_segment<D: DelayedRefs>(seg: &Segment, mode: Mode, qgroups: bool) -> SegmentOutcome {
    let t0 = Instant::now();
    let fs = Arc::new(FsShared::<D::Cell>::new(FsConfig { qgroups, ..FsConfig::default() }));
    let tree = RecordingTree::new(&seg.before, &fs.seq);
    let mut st = EngineStats::default();
    let mut errors = Vec::new();
    let mut mismatches = Vec::new();
    for (b, batch) in seg.batches.iter().enumerate() {
        let bno = u32::try_from(b).unwrap_or(u32::MAX);
        tree.set_batch(bno);
        let at = format!("{} transaction {b}", seg.name);
        let refs = D::with_fs(fs.clone());
        st.batches += 1;
        match mode {
            Mode::Sequential => sequential_batch(&refs, &tree, batch, &mut st, &mut errors, &mut mismatches, &at),
            Mode::Concurrent { threads, runners, per_extent_order } => concurrent_batch(
                &refs,
                &tree,
                batch,
                threads,
                runners,
                per_extent_order,
                &mut st,
                &mut errors,
                &mut mismatches,
                &at,
            ),
        }
    }
    st.refused_runs = tree.refused();
    st.pinned_bytes = tree.inner.pinned_bytes();
    let (violations, examples) = tree.violations();
    st.seq_violations = violations;
    st.runs_under_blocker = tree.runs_under_blocker();
    for e in examples {
        note(&mut mismatches, format!("{}: {e}", seg.name));
    }
    SegmentOutcome {
        items: tree.inner.items(),
        runs: tree.take_runs(),
        stats: st,
        errors,
        mismatches,
        elapsed: t0.elapsed(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::replay::plan::{PlanStats, new_block_op};
    use delayed_refs::{GenericRef, LockFreeRefs, LockedRefs};
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
            other_events: BTreeMap::new(),
        }
    }

    fn batch(ops: Vec<Op>, end: BatchEnd) -> Batch {
        Batch { ops, end, ..Batch::default() }
    }

    fn tree_op(pid: u32, action: Action, bytenr: u64) -> Op {
        tree_op_seq(pid, action, bytenr, 0)
    }

    fn tree_op_seq(pid: u32, action: Action, bytenr: u64, seq: u64) -> Op {
        let gref = GenericRef::new(action, bytenr, 4096, 0, 5).tree(0, 5, 0, true);
        let op = (action == Action::AddExtent).then(|| new_block_op(0, 0));
        Op { pid, bytenr, seq, kind: OpKind::Tree { gref, op } }
    }

    fn ev(pid: u32, kind: OpKind) -> Op {
        Op { pid, bytenr: 0, seq: 0, kind }
    }

    const MODES: [Mode; 3] = [
        Mode::Sequential,
        Mode::Concurrent { threads: 2, runners: 1, per_extent_order: true },
        Mode::Concurrent { threads: 4, runners: 2, per_extent_order: true },
    ];

    #[test]
    fn allocate_then_free_across_transactions() {
        allocate_then_free::<LockedRefs>();
        allocate_then_free::<LockFreeRefs>();
    }

    fn allocate_then_free<D: DelayedRefs>() {
        let s = seg(vec![
            batch(vec![tree_op(1, Action::AddExtent, 8192), tree_op(2, Action::AddExtent, 12288)], BatchEnd::Commit),
            batch(vec![tree_op(2, Action::Drop, 8192)], BatchEnd::Commit),
        ]);
        for mode in MODES {
            let out = replay_segment::<D>(&s, mode, false);
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
        missing_extent::<LockFreeRefs>();
    }

    fn missing_extent<D: DelayedRefs>() {
        let s = seg(vec![batch(vec![tree_op(1, Action::Drop, 8192)], BatchEnd::SegmentEnd)]);
        let out = replay_segment::<D>(&s, Mode::Sequential, false);
        assert!(out.stats.drain_errors >= 1);
        assert_eq!(out.stats.heads_left, 1);
        assert!(!out.errors.is_empty());
    }

    /// A blocker at seq 3 holds back the block added with the kernel's seq 3
    /// but not the one added before it (seq 0); the tracker's decisions
    /// follow the kernel's checks; nothing runs past the blocker.
    fn held_back_segment() -> Segment {
        let ops = vec![
            tree_op_seq(1, Action::AddExtent, 8192, 0),
            ev(2, OpKind::GetSeq { seq: 3, id: 0 }),
            tree_op_seq(1, Action::AddExtent, 12288, 3),
            ev(3, OpKind::CheckSeq { seq: 3, held: true }),
            ev(3, OpKind::KernelRun),
            ev(3, OpKind::KernelRun),
            ev(3, OpKind::KernelRun),
            ev(2, OpKind::PutSeq { id: 0 }),
            ev(3, OpKind::CheckSeq { seq: 3, held: false }),
            ev(3, OpKind::KernelRun),
        ];
        seg(vec![batch(ops, BatchEnd::Commit)])
    }

    #[test]
    fn blockers_hold_back_the_kernels_seq() {
        blockers_hold_back::<LockedRefs>();
        blockers_hold_back::<LockFreeRefs>();
    }

    fn blockers_hold_back<D: DelayedRefs>() {
        let s = held_back_segment();
        for mode in MODES {
            let out = replay_segment::<D>(&s, mode, false);
            let st = out.stats;
            assert!(
                out.errors.is_empty() && out.mismatches.is_empty(),
                "{mode:?}: {:?} {:?}",
                out.errors,
                out.mismatches
            );
            assert_eq!((st.checks, st.checks_kernel_held, st.checks_agree), (2, 1, 2), "{mode:?}");
            assert_eq!((st.seq_violations, st.blockers_released), (0, 0), "{mode:?}");
            assert_eq!(out.items.len(), 2, "{mode:?}");
            if mode == Mode::Sequential {
                // Paced runs: 8192 runs, 12288 is held back twice (it carries
                // seq 3, not the tracker's 0), then runs after the put.
                assert_eq!((st.paced_runs, st.held_back), (4, 2), "{st:?}");
            }
        }
    }

    #[test]
    fn a_decision_the_kernel_did_not_make_is_counted() {
        let mut s = held_back_segment();
        // The kernel ran it: the tracker (blocker at 3 registered) disagrees.
        s.batches[0].ops[3].kind = OpKind::CheckSeq { seq: 3, held: false };
        for mode in MODES {
            let out = replay_segment::<LockedRefs>(&s, mode, false);
            assert_eq!((out.stats.checks, out.stats.checks_agree), (2, 1), "{mode:?}");
            assert!(out.mismatches.iter().any(|m| m.contains("kernel ran")), "{:?}", out.mismatches);
        }
        // Without the blocker, the kernel's hold-back is not reproduced.
        let mut s = held_back_segment();
        s.batches[0].ops.retain(|o| !matches!(o.kind, OpKind::GetSeq { .. }));
        let out = replay_segment::<LockedRefs>(&s, Mode::Sequential, false);
        assert_eq!((out.stats.checks_agree, out.stats.held_back), (1, 0));
    }

    #[test]
    fn an_unput_blocker_is_released_at_the_transaction_end() {
        let mut s = held_back_segment();
        s.batches[0].ops.retain(|o| !matches!(o.kind, OpKind::PutSeq { .. }));
        for mode in MODES {
            let out = replay_segment::<LockFreeRefs>(&s, mode, false);
            assert_eq!(out.stats.blockers_released, 1);
            assert_eq!(out.items.len(), 2, "the drain runs the held block after the release");
        }
    }

    fn tree_item() -> ExtentItem {
        let mut backrefs = BTreeMap::new();
        backrefs.insert(RefKey::TreeBlock { root: 5 }, 1);
        ExtentItem {
            num_bytes: 4096,
            is_data: false,
            refs: 1,
            flags: delayed_refs::EXTENT_FLAG_TREE_BLOCK,
            level: 0,
            key: None,
            backrefs,
        }
    }

    fn drop_run(ref_mod: u64) -> RefRun<'static> {
        RefRun {
            bytenr: 8192,
            num_bytes: 4096,
            is_data: false,
            key: RefKey::TreeBlock { root: 5 },
            level: 0,
            action: Action::Drop,
            ref_mod,
            insert_reserved: false,
            extent_op: None,
            owning_root: 5,
            batch: Default::default(),
        }
    }

    /// The run check: a run of a node at or above a blocker registered before
    /// the run started is a violation; below it, or a blocker registered
    /// after the run started, is not.
    #[test]
    fn runs_past_a_registered_blocker_are_violations() {
        let key = RefKey::TreeBlock { root: 5 };
        let before: BTreeMap<u64, ExtentItem> = [(8192, tree_item())].into();
        let tracker = SeqTracker::new();
        for (node_seq, blocker_seq, registered_first, bad) in
            [(7, 5, true, true), (5, 5, true, true), (4, 5, true, false), (0, 5, true, false), (7, 5, false, false)]
        {
            let tree = RecordingTree::new(&before, &tracker);
            tree.set_batch(0);
            tree.note_add(8192, key, node_seq, false);
            if registered_first {
                tree.blockers.get(0, blocker_seq).unwrap();
                start_run(&tree.blockers);
            } else {
                start_run(&tree.blockers);
                tree.blockers.get(0, blocker_seq).unwrap();
            }
            tree.apply_ref(&drop_run(1)).unwrap();
            let (n, ex) = tree.violations();
            assert_eq!(n, u64::from(bad), "node {node_seq} blocker {blocker_seq} first {registered_first}: {ex:?}");
            assert_eq!(tree.blockers.release_all(), 1);
        }
        // The lowest pending node of the run's direction is the one taken.
        let tree = RecordingTree::new(&before, &tracker);
        tree.set_batch(0);
        tree.note_add(8192, key, 2, false);
        tree.note_add(8192, key, 9, false);
        tree.blockers.get(0, 5).unwrap();
        start_run(&tree.blockers);
        tree.apply_ref(&drop_run(1)).unwrap();
        assert_eq!(tree.violations().0, 0, "the seq-2 drop ran");
        let _ = tree.blockers.release_all();
    }

    #[test]
    fn qgroup_records_of_marked_heads() {
        qgroup_records::<LockedRefs>();
        qgroup_records::<LockFreeRefs>();
    }

    fn qgroup_records<D: DelayedRefs>() {
        let marked = |pid, bytenr| {
            let gref = GenericRef::new(Action::AddExtent, bytenr, 4096, 0, 5).tree(0, 5, 0, false);
            Op { pid, bytenr, seq: 0, kind: OpKind::Tree { gref, op: Some(new_block_op(0, 0)) } }
        };
        let mut b =
            batch(vec![marked(1, 8192), tree_op(1, Action::AddExtent, 12288), marked(2, 16384)], BatchEnd::Commit);
        b.qgroup = [(8192, 4096), (16384, 4096)].into();
        let s = seg(vec![b]);
        for mode in MODES {
            let out = replay_segment::<D>(&s, mode, true);
            let st = out.stats;
            assert_eq!(
                (st.qgroup_kernel, st.qgroup_impl, st.qgroup_matched, st.qgroup_total),
                (2, 2, 2, 2),
                "{mode:?}"
            );
            // Qgroups off in the root: no records, two mismatches.
            let out = replay_segment::<D>(&s, mode, false);
            assert_eq!((out.stats.qgroup_matched, out.stats.qgroup_total), (0, 2), "{mode:?}");
            assert_eq!(out.mismatches.len(), 2);
        }
        // A head the kernel did not mark must not get a record.
        let mut s = s;
        s.batches[0].qgroup.remove(&16384);
        let st = replay_segment::<D>(&s, Mode::Sequential, true).stats;
        assert_eq!((st.qgroup_kernel, st.qgroup_impl, st.qgroup_matched, st.qgroup_total), (1, 2, 1, 2));
    }

    #[test]
    fn gates_order_blocker_events_and_seq_phases() {
        let ops = vec![
            tree_op_seq(1, Action::AddExtent, 8192, 0),
            ev(2, OpKind::GetSeq { seq: 4, id: 0 }),
            tree_op_seq(3, Action::AddExtent, 12288, 4),
            tree_op_seq(4, Action::AddExtent, 16384, 4),
            ev(2, OpKind::CheckSeq { seq: 4, held: true }),
            tree_op_seq(5, Action::Drop, 8192, 6),
            ev(2, OpKind::PutSeq { id: 0 }),
            ev(2, OpKind::KernelRun),
            tree_op_seq(6, Action::Drop, 12288, 6),
        ];
        let g = Gates::new(&ops, 4, true);
        assert_eq!(g.phase_seq, [0, 4, 6]);
        assert_eq!(g.phase, [Some(0), None, Some(1), Some(1), None, Some(2), None, None, Some(2)]);
        assert_eq!(g.rank, [None, Some(0), None, None, Some(1), None, Some(2), None, None]);
        assert_eq!(g.events_before[2], 1);
        assert_eq!(g.events_before[5], 2);
        assert_eq!(g.events_before[8], 3);
        assert_eq!(g.phase_left.iter().map(|c| c.load(Ordering::Relaxed)).collect::<Vec<_>>(), [1, 2, 2]);
        // The drop of 8192 waits for its add when they are on different threads.
        assert_eq!(g.dep[5].is_some(), thread_of(1, 4) != thread_of(5, 4));
        assert_eq!(g.dep[8].is_some(), thread_of(3, 4) != thread_of(6, 4));
    }

    /// Concurrently, refs of one seq phase are queued while the tracker
    /// reads their seq: a blocker at 4, live the whole transaction, holds
    /// back exactly the blocks added with seq 4 and above, whatever thread
    /// adds them and however the runners interleave.
    #[test]
    fn concurrent_phases_give_each_ref_its_seq() {
        let mut ops = vec![ev(9, OpKind::GetSeq { seq: 4, id: 0 })];
        let mut b = 1u64 << 20;
        for seq in [1u64, 5, 2, 6] {
            for pid in 0..24u32 {
                b += 4096;
                ops.push(tree_op_seq(100 + pid + 100 * seq as u32, Action::AddExtent, b, seq));
            }
        }
        let s = seg(vec![batch(ops, BatchEnd::Commit)]);
        for _ in 0..10 {
            let out = replay_segment::<LockFreeRefs>(
                &s,
                Mode::Concurrent { threads: 4, runners: 2, per_extent_order: true },
                false,
            );
            assert!(out.errors.is_empty(), "{:?}", out.errors);
            assert_eq!((out.stats.seq_violations, out.items.len()), (0, 96), "{:?}", out.mismatches);
            assert_eq!(out.stats.blockers_released, 1);
        }
    }
}
