//! The timed phase shared by the continuous workloads: adder threads and
//! runner threads released together, stopped together after a duration.

use std::sync::Barrier;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use delayed_refs::{DelayedRefs, MemExtentTree, TransHandle};
use indicatif::ProgressBar;

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
}

/// One adder thread: queue ops until `stop`, timing each one.
fn adder_loop<D: DelayedRefs, A: Adder>(refs: &D, adder: &mut A, stop: &AtomicBool) -> ThreadStats {
    let mut trans = TransHandle::new();
    let mut st = ThreadStats::default();
    while !stop.load(Ordering::Relaxed) {
        let t0 = Instant::now();
        match adder.step(refs, &mut trans) {
            Ok(()) => st.record(t0.elapsed().as_nanos() as u64),
            Err(e) => st.error(|| e),
        }
    }
    st
}

/// Run `adders` and `runners` runner threads at once for `length`.
pub fn timed_phase<D: DelayedRefs, A: Adder>(
    refs: &D,
    tree: &MemExtentTree,
    adders: Vec<A>,
    runners: usize,
    length: Duration,
    bar: &ProgressBar,
) -> PhaseOut<A> {
    let stop = AtomicBool::new(false);
    let barrier = Barrier::new(adders.len() + runners + 1);
    std::thread::scope(|s| {
        let (stop, barrier) = (&stop, &barrier);
        let adder_threads: Vec<_> = adders
            .into_iter()
            .map(|mut a| {
                s.spawn(move || {
                    barrier.wait();
                    let st = adder_loop(refs, &mut a, stop);
                    (a, st)
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
        barrier.wait();
        let start = Instant::now();
        tick_until(bar, start, length);
        stop.store(true, Ordering::Relaxed);
        let secs = start.elapsed().as_secs_f64();
        let (adders, adder_stats) = adder_threads.into_iter().map(|t| t.join().expect("adder thread panicked")).unzip();
        let runner_stats = runner_threads.into_iter().map(|t| t.join().expect("runner thread panicked")).collect();
        PhaseOut { adders, adder_stats, runner_stats, secs }
    })
}
