//! Per-thread measurements and the figures of one round.

use hdrhistogram::Histogram;

use crate::check::Violations;

/// Largest latency the histograms track (60 s, in nanoseconds).
const MAX_LATENCY_NS: u64 = 60_000_000_000;

/// How many error descriptions a thread keeps.
const MAX_ERROR_SAMPLES: usize = 4;

/// A latency histogram in nanoseconds.
pub fn new_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, MAX_LATENCY_NS, 3).expect("valid histogram bounds")
}

/// What one worker thread measured.
#[derive(Debug)]
pub struct ThreadStats {
    /// Successful operations (adds for adders, refs run for runners).
    pub ops: u64,
    /// Operations that returned an error (all ops are valid: each is a violation).
    pub errors: u64,
    /// The first few errors, described.
    pub error_samples: Vec<String>,
    /// Latency of single add calls in nanoseconds.
    pub hist: Histogram<u64>,
    /// `--throttle`: times this adder was told to throttle and ran a head.
    pub throttled: u64,
}

impl Default for ThreadStats {
    fn default() -> Self {
        ThreadStats { ops: 0, errors: 0, error_samples: Vec::new(), hist: new_histogram(), throttled: 0 }
    }
}

impl ThreadStats {
    /// Record one successful op and its latency.
    pub fn record(&mut self, ns: u64) {
        self.ops += 1;
        self.hist.saturating_record(ns.max(1));
    }

    /// Record one failed op.
    pub fn error(&mut self, what: impl FnOnce() -> String) {
        self.errors += 1;
        if self.error_samples.len() < MAX_ERROR_SAMPLES {
            self.error_samples.push(what());
        }
    }
}

/// What the linearizability check of one round's readers found (the
/// violations themselves are counted in [`Violations::linearizability`]).
#[derive(Clone, Debug, Default)]
pub struct LinFigures {
    /// Reads checked: those recorded before the history was cut.
    pub reads_checked: u64,
    /// Count-changing calls in the history.
    pub ops_recorded: u64,
    /// An adder's history buffer filled up during the round: reads after
    /// that point were not checked.
    pub cut: bool,
    /// The first few violations, described.
    pub samples: Vec<String>,
}

/// The figures of one round of one implementation.
#[derive(Debug)]
pub struct RoundResult {
    /// Operations counted for throughput (adds, or refs drained for `drain`).
    pub ops: u64,
    /// Timed seconds the ops took.
    pub secs: f64,
    /// Latency of single add calls.
    pub hist: Histogram<u64>,
    /// Ops per worker thread that counts toward `ops`, for fairness.
    pub per_thread_ops: Vec<u64>,
    /// Merged refs applied by all runs, the final drain included.
    pub refs_run: u64,
    /// What the end-of-round checks found.
    pub violations: Violations,
    /// Live heap bytes after the final drain and `reclaim()`, with the
    /// round's root and tree still alive (see `check::Finish`).
    pub mem_end_bytes: i64,
    /// Live heap bytes the root still held at the end of the round beyond
    /// its fresh size (released by its drop, less what its construction
    /// took); about 0 when drain and `reclaim()` freed everything.
    pub mem_root_retained_bytes: i64,
    /// The readers' linearizability check.
    pub lin: LinFigures,
    /// What `--faults` injected into the round's backend.
    pub faults: delayed_refs::FaultStats,
    /// `--throttle`: times adders were told to throttle.
    pub throttled: u64,
}

impl RoundResult {
    /// Throughput of the round.
    pub fn ops_per_sec(&self) -> f64 {
        if self.secs > 0.0 { self.ops as f64 / self.secs } else { 0.0 }
    }

    /// Slowest thread's ops over the fastest thread's ops (1 = perfectly fair).
    pub fn fairness(&self) -> f64 {
        let max = self.per_thread_ops.iter().copied().max().unwrap_or(0);
        let min = self.per_thread_ops.iter().copied().min().unwrap_or(0);
        if max == 0 { 1.0 } else { min as f64 / max as f64 }
    }
}

/// Fold worker statistics into one histogram, the per-thread op counts and
/// the error tally of `violations`.
pub fn merge_threads(stats: &[ThreadStats], violations: &mut Violations) -> (Histogram<u64>, Vec<u64>) {
    let mut hist = new_histogram();
    let mut per_thread = Vec::with_capacity(stats.len());
    for s in stats {
        hist.add(&s.hist).expect("histograms share bounds");
        per_thread.push(s.ops);
        violations.op_errors(s.errors, &s.error_samples);
    }
    (hist, per_thread)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fairness_and_throughput() {
        let r = RoundResult {
            ops: 300,
            secs: 2.0,
            hist: new_histogram(),
            per_thread_ops: vec![100, 200],
            refs_run: 0,
            violations: Violations::default(),
            mem_end_bytes: 0,
            mem_root_retained_bytes: 0,
            lin: LinFigures::default(),
            faults: Default::default(),
            throttled: 0,
        };
        assert_eq!(r.ops_per_sec(), 150.0);
        assert_eq!(r.fairness(), 0.5);
    }

    #[test]
    fn errors_are_tallied() {
        let mut a = ThreadStats::default();
        a.record(100);
        a.error(|| "boom".into());
        let mut v = Violations::default();
        let (h, per) = merge_threads(&[a], &mut v);
        assert_eq!((h.len(), per), (1, vec![1]));
        assert_eq!(v.errors, 1);
    }
}
