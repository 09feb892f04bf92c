//! The workloads (W1-W4 of docs/benchmarks.md, wide, mixed), each generic over the implementation: one round
//! builds a fresh root and extent tree, runs the workload, drains, and checks.

mod drain;
mod harness;
mod history;
pub mod ops;
mod runner;
mod shared;
mod slots;
#[cfg(test)]
mod tests;

use std::collections::BTreeMap;
use std::time::Duration;

use delayed_refs::{DelayedRefs, FsConfig, TransHandle};
use indicatif::ProgressBar;

use crate::alloc;
use crate::check::{Violations, finish_round, rsv_size};
use crate::cli::WorkloadKind;
use crate::faults::{self, Tree};
use crate::oracle::Oracle;
use crate::stats::{LinFigures, RoundResult, merge_threads, new_histogram};
use delayed_refs::FaultStats;
use history::{History, OpLog};
use slots::{Pattern, SlotAdder};

/// Live refs each `hot` adder keeps.
const HOT_WINDOW: usize = 16;

/// Resolved parameters of a stress run.
#[derive(Clone, Debug)]
pub struct Params {
    /// Which workload.
    pub workload: WorkloadKind,
    /// Adder threads.
    pub threads: usize,
    /// Runner threads.
    pub runners: usize,
    /// Reader threads checked for linearizability (0: no history).
    pub readers: usize,
    /// Heads (extents).
    pub heads: usize,
    /// Live keys of `wide`.
    pub keys: usize,
    /// Length of one round.
    pub round: Duration,
    /// `--faults`: every N-th backend call fails (0: none).
    pub faults: u64,
    /// `--throttle`: the roots' pending-entry limit; adders help when told.
    pub throttle: Option<u64>,
    /// `--watchdog`: how long a phase may overrun before it is a stall.
    pub watchdog: Duration,
    /// `--backend`: the extent tree.
    pub backend: crate::backend::BackendKind,
    /// `--stall-at`: the backend call that never returns (0: none).
    pub stall_at: u64,
}

/// An adder thread's op generator and its model of what it queued.
pub trait Adder: Send {
    /// Queue exactly one operation, recording it in `log` if its extent is
    /// tracked; the model changes only if it succeeded.
    fn step<D: DelayedRefs>(&mut self, refs: &D, trans: &mut TransHandle, log: &mut OpLog<'_>) -> Result<(), String>;

    /// Add the refs this adder expects to survive to the oracle.
    fn expect(&self, oracle: &mut Oracle);
}

/// Run one round of `p.workload` on a fresh `D`.
pub fn run_round<D: DelayedRefs>(p: &Params, seed: u64, bar: &ProgressBar) -> RoundResult {
    let per_thread = (p.heads / p.threads).max(1);
    let slot_adders = |reuse: bool, pattern: Pattern| -> Vec<SlotAdder> {
        (0..p.threads).map(|t| SlotAdder::new(t, per_thread, seed, reuse, pattern)).collect()
    };
    match p.workload {
        WorkloadKind::Drain => drain::round::<D>(p, seed, bar),
        WorkloadKind::Spread => fresh_round::<D>(p, slot_adders(p.runners == 0, Pattern::Cycle), seed, bar),
        WorkloadKind::AddOnly => {
            // Re-allocating freed bytenrs is only valid with no runner at work.
            let no_runner = Params { runners: 0, ..p.clone() };
            fresh_round::<D>(&no_runner, slot_adders(true, Pattern::Cycle), seed, bar)
        }
        WorkloadKind::Mixed => fresh_round::<D>(p, slot_adders(p.runners == 0, Pattern::Mixed), seed, bar),
        WorkloadKind::Hot | WorkloadKind::Wide => {
            let window = if p.workload == WorkloadKind::Hot { HOT_WINDOW } else { (p.keys / p.threads).max(1) };
            shared_round::<D>(p, seed, window, bar)
        }
    }
}

/// A fresh root (with `p`'s pending limit) and the live heap bytes its
/// construction took.
pub(crate) fn new_root<D: DelayedRefs>(p: &Params) -> (D, i64) {
    let before = alloc::live_bytes();
    let refs = D::new(FsConfig { pending_limit: p.throttle.unwrap_or(0), ..FsConfig::default() });
    let fresh = alloc::live_bytes() - before;
    (refs, fresh)
}

/// Drop `refs`, built by [`new_root`] with `fresh` bytes, and return how
/// many bytes more than that its drop released: what the root still held
/// beyond its fresh size (about 0 after a full drain and `reclaim()`).
pub(crate) fn retire_root<D: DelayedRefs>(refs: D, fresh: i64) -> i64 {
    let before = alloc::live_bytes();
    drop(refs);
    before - alloc::live_bytes() - fresh
}

/// The history of slot adders: their tracked slots, every extent new
/// (base count 0).
fn slot_history(adders: &[SlotAdder], readers: usize, seed: u64) -> History {
    let (mut targets, mut bases) = (Vec::new(), Vec::with_capacity(adders.len()));
    for a in adders {
        bases.push(targets.len());
        targets.extend(a.tracked_bytenrs());
    }
    History::new(adders.len(), readers, targets, bases, BTreeMap::new(), seed)
}

/// Count the linearizability violations of a round and describe the first.
fn note_lin(v: &mut Violations, violations: u64, lin: &LinFigures) {
    v.linearizability += violations;
    if let Some(first) = lin.samples.first() {
        v.note(format!("linearizability: {violations} of {} reads; first: {first}", lin.reads_checked));
    }
}

/// Where a round starts from: the oracle of what exists before the adders
/// run, and the reserve size before anything was queued.
struct Start {
    oracle: Oracle,
    rsv_start: u64,
}

/// `hot` and `wide`: allocate the shared extents, then run the adders on them.
fn shared_round<D: DelayedRefs>(p: &Params, seed: u64, window: usize, bar: &ProgressBar) -> RoundResult {
    let (refs, fresh) = new_root::<D>(p);
    let tree = faults::new_tree(p.backend, p.faults, p.stall_at);
    let rsv_start = rsv_size(&refs);
    let mut res = match shared::setup(&refs, &tree, p.heads) {
        Ok((heads, oracle)) => {
            let adders = (0..p.threads).map(|t| shared::SharedAdder::new(t, &heads, window, seed)).collect();
            // Every shared extent holds its one base ref, on disk.
            let targets = heads.iter().copied().filter(|&b| shared::tracked(b)).collect();
            let base = heads.iter().map(|&b| (b, 1)).collect();
            let mut hist = History::new(p.threads, p.readers, targets, vec![0; p.threads], base, seed);
            run_adders(p, Start { oracle, rsv_start }, adders, &mut hist, &refs, &tree, bar)
        }
        Err(e) => {
            let mut violations = Violations::default();
            violations.op_errors(1, &[e]);
            RoundResult {
                ops: 0,
                secs: 0.0,
                hist: new_histogram(),
                per_thread_ops: Vec::new(),
                refs_run: 0,
                violations,
                mem_end_bytes: alloc::live_bytes(),
                mem_root_retained_bytes: 0,
                lin: LinFigures::default(),
                faults: FaultStats::default(),
                throttled: 0,
            }
        }
    };
    res.faults = tree.stats();
    res.mem_root_retained_bytes = retire_root(refs, fresh);
    res
}

/// Run slot `adders` on a fresh root and tree.
fn fresh_round<D: DelayedRefs>(p: &Params, adders: Vec<SlotAdder>, seed: u64, bar: &ProgressBar) -> RoundResult {
    let (refs, fresh) = new_root::<D>(p);
    let tree = faults::new_tree(p.backend, p.faults, p.stall_at);
    let rsv_start = rsv_size(&refs);
    let mut hist = slot_history(&adders, p.readers, seed);
    let start = Start { oracle: Oracle::new(), rsv_start };
    let mut res = run_adders(p, start, adders, &mut hist, &refs, &tree, bar);
    drop(hist);
    res.faults = tree.stats();
    res.mem_root_retained_bytes = retire_root(refs, fresh);
    res
}

/// The timed phase with `p.runners` runners and `p.readers` readers
/// recorded into `history`, then the linearizability check and the
/// end-of-round checks against `start` plus what the adders queued.
fn run_adders<D: DelayedRefs, A: Adder>(
    p: &Params,
    start: Start,
    adders: Vec<A>,
    history: &mut History,
    refs: &D,
    tree: &Tree,
    bar: &ProgressBar,
) -> RoundResult {
    let (op_logs, read_logs) = history.logs();
    let crew = adders.into_iter().zip(op_logs).collect();
    let out = harness::timed_phase(refs, tree, crew, read_logs, p, bar);
    bar.set_message("checking");
    let mut v = Violations::default();
    let (lin, lin_violations) = history.check(&out.op_lens, &out.read_lens);
    note_lin(&mut v, lin_violations, &lin);
    let (hist, per_thread_ops) = merge_threads(&out.adder_stats, &mut v);
    let (_, per_runner) = merge_threads(&out.runner_stats, &mut v);
    let mut oracle = start.oracle;
    for a in &out.adders {
        a.expect(&mut oracle);
    }
    let fin = finish_round(refs, tree, &oracle, start.rsv_start, p.watchdog, &mut v);
    let throttled = out.adder_stats.iter().map(|s| s.throttled).sum();
    RoundResult {
        ops: per_thread_ops.iter().sum(),
        secs: out.secs,
        hist,
        per_thread_ops,
        refs_run: per_runner.iter().sum::<u64>() + fin.refs,
        violations: v,
        mem_end_bytes: fin.mem_end_bytes,
        mem_root_retained_bytes: 0,
        lin,
        faults: FaultStats::default(),
        throttled,
    }
}
