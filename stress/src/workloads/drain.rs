//! W2 drain: prefill `heads` x 4 refs with the adder threads, then the runner
//! threads drain everything with `run(RunMode::All)`; repeated until the
//! round's time is up. Prefills alternate between allocating the extents
//! (4 adds each) and freeing them (4 drops each), so the tree stays bounded.
//!
//! Throughput counts refs drained per second of drain time; the latency
//! figures are those of the prefill adds.
//!
//! Reader threads (`--readers`, none by default) read tracked extents the
//! whole round, through prefills and drains alike.

use std::sync::Barrier;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use delayed_refs::{DelayedRefs, RunMode, TransHandle};
use indicatif::ProgressBar;

use super::history::OpLog;
use super::slots::{Pattern, REFS_PER_HEAD, SlotAdder};
use super::{Adder, Params, harness};
use crate::check::{Violations, finish_round, rsv_size};
use crate::faults::{self, Outcome, Tree};
use crate::oracle::Oracle;
use crate::stats::{RoundResult, ThreadStats, merge_threads};

/// Every adder queues `REFS_PER_HEAD` ops on each of its slots, in parallel.
fn prefill<D: DelayedRefs>(refs: &D, adders: &mut [SlotAdder], logs: &mut [OpLog<'_>], stats: &mut [ThreadStats]) {
    std::thread::scope(|s| {
        for ((a, log), st) in adders.iter_mut().zip(logs.iter_mut()).zip(stats.iter_mut()) {
            s.spawn(move || {
                let mut trans = TransHandle::new();
                for i in 0..a.slots() {
                    for _ in 0..REFS_PER_HEAD {
                        let t0 = Instant::now();
                        match a.step_slot(i, refs, &mut trans, log) {
                            Ok(()) => st.record(t0.elapsed().as_nanos() as u64),
                            Err(e) => st.error(|| e),
                        }
                    }
                }
            });
        }
    });
}

/// `runners` threads call `run(RunMode::All)` at once (again after an
/// injected fault); returns the seconds until the last one returned.
fn drain<D: DelayedRefs>(refs: &D, tree: &Tree, runner_stats: &mut [ThreadStats]) -> f64 {
    let barrier = Barrier::new(runner_stats.len() + 1);
    std::thread::scope(|s| {
        let barrier = &barrier;
        for st in runner_stats.iter_mut() {
            s.spawn(move || {
                barrier.wait();
                loop {
                    match faults::retrying(|| refs.run(tree, RunMode::All)) {
                        Ok(Outcome::Done(r)) => st.ops += r.refs,
                        Ok(Outcome::Retry) => continue,
                        Err(e) => st.error(|| format!("drain run(All): {}", crate::out::Chain(&e))),
                    }
                    break;
                }
            });
        }
        barrier.wait();
        let start = Instant::now();
        // The scope joins the runners before it returns.
        start
    })
    .elapsed()
    .as_secs_f64()
}

/// One round of the drain workload.
pub fn round<D: DelayedRefs>(p: &Params, seed: u64, bar: &ProgressBar) -> RoundResult {
    let (refs, fresh) = super::new_root::<D>(p);
    let tree = faults::new_tree(p.backend, p.faults, p.stall_at);
    let rsv_start = rsv_size(&refs);
    let per_thread = (p.heads / p.threads).max(1);
    let mut adders: Vec<SlotAdder> =
        (0..p.threads).map(|t| SlotAdder::new(t, per_thread, seed, false, Pattern::Cycle)).collect();
    let mut adder_stats: Vec<ThreadStats> = (0..p.threads).map(|_| ThreadStats::default()).collect();
    let mut runner_stats: Vec<ThreadStats> = (0..p.runners.max(1)).map(|_| ThreadStats::default()).collect();
    let mut hist = super::slot_history(&adders, p.readers, seed);
    let (mut op_logs, read_logs) = hist.logs();
    let stop = AtomicBool::new(false);
    let mut drained = 0u64;
    let (secs, read_lens) = std::thread::scope(|s| {
        let (refs, tree, stop) = (&refs, &tree, &stop);
        let readers: Vec<_> = read_logs
            .into_iter()
            .map(|mut log| {
                s.spawn(move || {
                    harness::reader_loop(refs, tree, &mut log, stop);
                    log.len()
                })
            })
            .collect();
        let start = Instant::now();
        let mut secs = 0.0;
        loop {
            prefill(refs, &mut adders, &mut op_logs, &mut adder_stats);
            let before = tree.inner().applied_refs();
            let dump = || faults::claimed_heads(refs);
            secs += faults::watchdog("a drain", p.round + p.watchdog, dump, || drain(refs, tree, &mut runner_stats));
            // Counted on the tree: a run(All) stopped by an injected fault
            // returns no figures for the refs it did apply.
            drained += tree.inner().applied_refs() - before;
            let e = start.elapsed();
            bar.set_position(e.as_millis() as u64);
            if e >= p.round {
                break;
            }
        }
        stop.store(true, Ordering::Relaxed);
        let lens: Vec<usize> = readers.into_iter().map(|t| t.join().expect("reader thread panicked")).collect();
        (secs, lens)
    });
    let op_lens: Vec<usize> = op_logs.iter().map(OpLog::len).collect();
    drop(op_logs);
    bar.set_message("checking");
    let (lin, lin_violations) = hist.check(&op_lens, &read_lens);
    drop(hist);
    let mut v = Violations::default();
    super::note_lin(&mut v, lin_violations, &lin);
    let (hist, _) = merge_threads(&adder_stats, &mut v);
    let (_, per_runner) = merge_threads(&runner_stats, &mut v);
    let mut oracle = Oracle::new();
    for a in &adders {
        a.expect(&mut oracle);
    }
    let fin = finish_round(&refs, &tree, &oracle, rsv_start, p.watchdog, &mut v);
    let mut res = RoundResult {
        ops: drained,
        secs,
        hist,
        per_thread_ops: per_runner,
        refs_run: drained + fin.refs,
        violations: v,
        mem_end_bytes: fin.mem_end_bytes,
        mem_root_retained_bytes: 0,
        lin,
        faults: tree.stats(),
        throttled: 0,
    };
    res.mem_root_retained_bytes = super::retire_root(refs, fresh);
    res
}
