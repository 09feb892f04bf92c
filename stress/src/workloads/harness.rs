//! The timed phase shared by the continuous workloads: adder threads, runner
//! threads and reader threads released together, stopped together after a
//! duration.

use std::sync::Barrier;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use delayed_refs::{Backpressure, DelayedRefs, TransHandle};
use indicatif::ProgressBar;

use super::history::{OpLog, ReadLog};
use super::{Adder, Params, runner};
use crate::faults::{self, Outcome, Tree};
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

/// Adds between two backpressure checks of a throttled adder.
const THROTTLE_EVERY: u64 = 32;

/// One adder thread: queue ops until `stop`, timing each one. With
/// `throttle`, every `THROTTLE_EVERY` adds it asks the root for
/// backpressure and runs one head itself while told to throttle (the time
/// spent there is not an add's latency).
fn adder_loop<D: DelayedRefs, A: Adder>(
    refs: &D,
    tree: &Tree,
    adder: &mut A,
    log: &mut OpLog<'_>,
    stop: &AtomicBool,
    throttle: bool,
) -> ThreadStats {
    let mut trans = TransHandle::new();
    let mut st = ThreadStats::default();
    let mut n = 0u64;
    while !stop.load(Ordering::Relaxed) {
        n += 1;
        if throttle && n % THROTTLE_EVERY == 0 {
            while refs.backpressure() == Backpressure::Throttle && !stop.load(Ordering::Relaxed) {
                st.throttled += 1;
                match faults::retrying(|| refs.run_one(tree)) {
                    Ok(Outcome::Done(Some(_)) | Outcome::Retry) => {}
                    // Nothing this adder can run: the runners hold it.
                    Ok(Outcome::Done(None)) => std::thread::yield_now(),
                    Err(e) => st.error(|| format!("throttled adder's run_one: {}", crate::out::Chain(&e))),
                }
            }
        }
        let t0 = Instant::now();
        match adder.step(refs, &mut trans, log) {
            Ok(()) => st.record(t0.elapsed().as_nanos() as u64),
            Err(e) => st.error(|| e),
        }
    }
    st
}

/// One reader thread: `lookup_extent_info` of tracked extents until `stop`
/// (a sample of the reads goes into `log`). A lookup failed by an injected
/// fault is retried inside the same read (its interval only grows).
pub fn reader_loop<D: DelayedRefs>(refs: &D, tree: &Tree, log: &mut ReadLog<'_>, stop: &AtomicBool) {
    let read = |b: u64| loop {
        match faults::retrying(|| refs.lookup_extent_info(tree, b)) {
            Ok(Outcome::Done(info)) => return info.map_or(0, |i| i.refs as i64),
            Ok(Outcome::Retry) => continue,
            // Only a storage error can come back from a lookup, and that
            // is retried above: anything else is a broken contract.
            Err(e) => panic!("reader: lookup_extent_info: {e}"),
        }
    };
    while !stop.load(Ordering::Relaxed) {
        if !log.read(read) {
            std::thread::yield_now();
        }
    }
}

/// Run `adders` (each with its history log), `p.runners` runner threads and
/// one reader thread per read log at once for `p.round`; joining them after
/// the stop runs under the watchdog.
pub fn timed_phase<'h, D: DelayedRefs, A: Adder>(
    refs: &D,
    tree: &Tree,
    adders: Vec<(A, OpLog<'h>)>,
    readers: Vec<ReadLog<'h>>,
    p: &Params,
    bar: &ProgressBar,
) -> PhaseOut<A> {
    let (runners, length, throttle) = (p.runners, p.round, p.throttle.is_some());
    let stop = AtomicBool::new(false);
    let barrier = Barrier::new(adders.len() + runners + readers.len() + 1);
    std::thread::scope(|s| {
        let (stop, barrier) = (&stop, &barrier);
        let adder_threads: Vec<_> = adders
            .into_iter()
            .map(|(mut a, mut log)| {
                s.spawn(move || {
                    barrier.wait();
                    let st = adder_loop(refs, tree, &mut a, &mut log, stop, throttle);
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
        let dump = || faults::claimed_heads(refs);
        faults::watchdog("stopping the timed phase's threads", p.watchdog, dump, || {
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
    })
}
