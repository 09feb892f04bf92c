//! The timed phase shared by the continuous workloads: adder threads, runner
//! threads and reader threads released together, stopped together after a
//! duration.

use std::sync::Barrier;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use delayed_refs::{DelayedRefs, MemExtentTree, TransHandle};
use indicatif::ProgressBar;

use super::history::{OpLog, ReadLog};
use super::{Adder, runner};
use crate::progress::tick_until;
use crate::stats::ThreadStats;

/// What a timed phase hands back.
#[derive(Debug)]
pub struct PhaseOut<A> {
    /// The adders, with their models of what they queued.
    pub adders: Vec<A>,
    /// Per adder: successful adds and their latencies.
    pub adder_stats: Vec<ThreadStats>,
    /// Per runner: refs applied.
    pub runner_stats: Vec<ThreadStats>,
    /// Seconds between the start and the stop signal.
    pub secs: f64,
    /// Per adder: history records filled.
    pub op_lens: Vec<usize>,
    /// Per reader: history records filled.
    pub read_lens: Vec<usize>,
}

/// One adder thread: queue ops until `stop`, timing each one.
fn adder_loop<D: DelayedRefs, A: Adder>(
    refs: &D,
    adder: &mut A,
    log: &mut OpLog<'_>,
    stop: &AtomicBool,
) -> ThreadStats {
    let mut trans = TransHandle::new();
    let mut st = ThreadStats::default();
    while !stop.load(Ordering::Relaxed) {
        let t0 = Instant::now();
        match adder.step(refs, &mut trans, log) {
            Ok(()) => st.record(t0.elapsed().as_nanos() as u64),
            Err(e) => st.error(|| e),
        }
    }
    st
}

/// One reader thread: `lookup_extent_info` of tracked extents until `stop`
/// (a sample of the reads goes into `log`).
pub fn reader_loop<D: DelayedRefs>(refs: &D, tree: &MemExtentTree, log: &mut ReadLog<'_>, stop: &AtomicBool) {
    while !stop.load(Ordering::Relaxed) {
        if !log.read(|b| refs.lookup_extent_info(tree, b).map_or(0, |i| i.refs as i64)) {
            std::thread::yield_now();
        }
    }
}

/// Run `adders` (each with its history log), `runners` runner threads and
/// one reader thread per read log at once for `length`.
pub fn timed_phase<'h, D: DelayedRefs, A: Adder>(
    refs: &D,
    tree: &MemExtentTree,
    adders: Vec<(A, OpLog<'h>)>,
    readers: Vec<ReadLog<'h>>,
    runners: usize,
    length: Duration,
    bar: &ProgressBar,
) -> PhaseOut<A> {
    let stop = AtomicBool::new(false);
    let barrier = Barrier::new(adders.len() + runners + readers.len() + 1);
    std::thread::scope(|s| {
        let (stop, barrier) = (&stop, &barrier);
        let adder_threads: Vec<_> = adders
            .into_iter()
            .map(|(mut a, mut log)| {
                s.spawn(move || {
                    barrier.wait();
                    let st = adder_loop(refs, &mut a, &mut log, stop);
                    (a, st, log.len())
                })
            })
            .collect();
        let runner_threads: Vec<_> = (0..runners)
            .map(|_| {
                s.spawn(move || {
                    barrier.wait();
                    runner::run_until(refs, tree, stop)
                })
            })
            .collect();
        let reader_threads: Vec<_> = readers
            .into_iter()
            .map(|mut log| {
                s.spawn(move || {
                    barrier.wait();
                    reader_loop(refs, tree, &mut log, stop);
                    log.len()
                })
            })
            .collect();
        barrier.wait();
        let start = Instant::now();
        tick_until(bar, start, length);
        stop.store(true, Ordering::Relaxed);
        let secs = start.elapsed().as_secs_f64();
        let (mut adders, mut adder_stats, mut op_lens) = (Vec::new(), Vec::new(), Vec::new());
        for t in adder_threads {
            let (a, st, len) = t.join().expect("adder thread panicked");
            adders.push(a);
            adder_stats.push(st);
            op_lens.push(len);
        }
        let runner_stats = runner_threads.into_iter().map(|t| t.join().expect("runner thread panicked")).collect();
        let read_lens = reader_threads.into_iter().map(|t| t.join().expect("reader thread panicked")).collect();
        PhaseOut { adders, adder_stats, runner_stats, secs, op_lens, read_lens }
    })
}
