//! Summaries over rounds (medians), the results table, the JSON object and
//! the verdict line.

use serde::Serialize;

use hdrhistogram::Histogram;

use crate::check::Violations;
use crate::memwatch::Flatness;
use crate::stats::{RoundResult, new_histogram};

/// One finished round, without its histogram (merged into [`ImplRun`]).
#[derive(Clone, Copy, Debug)]
pub struct RoundRecord {
    /// Ops counted for throughput.
    pub ops: u64,
    /// Throughput.
    pub ops_per_sec: f64,
    /// Min/max per-thread ops.
    pub fairness: f64,
    /// Merged refs applied.
    pub refs_run: u64,
    /// Live heap bytes after the final run(All) and reclaim().
    pub mem_end_bytes: i64,
    /// Bytes the root held beyond its fresh size at the end.
    pub mem_root_retained_bytes: i64,
    /// Reads checked for linearizability.
    pub lin_reads_checked: u64,
    /// Count-changing calls in the linearizability history.
    pub lin_ops_recorded: u64,
    /// Linearizability violations.
    pub lin_violations: u64,
    /// The history was cut before the end of the round.
    pub lin_cut: bool,
    /// What `--faults` injected.
    pub faults: delayed_refs::FaultStats,
    /// `--throttle`: times adders were told to throttle.
    pub throttled: u64,
}

/// The rounds one implementation ran, folded in as they finish: a round's
/// histogram is merged and dropped, so a long run does not keep one per
/// round (that would make the heap grow with the run's length).
#[derive(Debug)]
pub struct ImplRun {
    /// Implementation name.
    pub name: &'static str,
    /// Its rounds, in run order.
    pub rounds: Vec<RoundRecord>,
    /// Live heap bytes after each round, once its root, tree, threads and
    /// histogram are gone.
    pub floors: Vec<i64>,
    hist: Histogram<u64>,
    tally: Violations,
}

impl ImplRun {
    /// No round yet.
    pub fn new(name: &'static str) -> Self {
        ImplRun { name, rounds: Vec::new(), floors: Vec::new(), hist: new_histogram(), tally: Violations::default() }
    }

    /// Fold in a finished round (and drop it), then read the live bytes
    /// for [`floors`](Self::floors).
    pub fn push(&mut self, r: RoundResult) {
        self.hist.add(&r.hist).expect("histograms share bounds");
        self.tally.absorb(&r.violations);
        self.rounds.push(RoundRecord {
            ops: r.ops,
            ops_per_sec: r.ops_per_sec(),
            fairness: r.fairness(),
            refs_run: r.refs_run,
            mem_end_bytes: r.mem_end_bytes,
            mem_root_retained_bytes: r.mem_root_retained_bytes,
            lin_reads_checked: r.lin.reads_checked,
            lin_ops_recorded: r.lin.ops_recorded,
            lin_violations: r.violations.linearizability,
            lin_cut: r.lin.cut,
            faults: r.faults,
            throttled: r.throttled,
        });
        drop(r);
        self.floors.push(crate::alloc::live_bytes());
    }

    /// The end-of-round live bytes, in round order.
    pub fn mem_ends(&self) -> Vec<i64> {
        self.rounds.iter().map(|r| r.mem_end_bytes).collect()
    }

    /// The root-retained bytes, in round order.
    pub fn mem_retained(&self) -> Vec<i64> {
        self.rounds.iter().map(|r| r.mem_root_retained_bytes).collect()
    }
}

/// One implementation's memory figures over its rounds.
#[derive(Clone, Debug, Default, Serialize)]
pub struct MemFigures {
    /// Highest live heap bytes sampled (every 50 ms) while its rounds ran.
    pub mem_peak_bytes: i64,
    /// Live heap bytes after the final run(All) + reclaim() of its last round.
    pub mem_end_bytes: i64,
    /// The flatness verdict.
    pub mem_flat: bool,
    /// What the verdict is based on.
    pub mem_flatness: Flatness,
    /// Per round: live heap bytes after its final run(All) + reclaim().
    pub mem_round_end_bytes: Vec<i64>,
    /// Per round: live heap bytes once its root, tree and threads were gone.
    pub mem_round_floor_bytes: Vec<i64>,
    /// Per round: bytes the root held beyond its fresh size after the final
    /// run(All) + reclaim() (what its drop released, less what creating it took).
    pub mem_round_root_retained_bytes: Vec<i64>,
}

/// What the header of a report says about the run.
#[derive(Clone, Debug, Serialize)]
pub struct Header {
    /// Workload name.
    pub workload: &'static str,
    /// Adder threads.
    pub threads: usize,
    /// Runner threads.
    pub runners: usize,
    /// Reader threads checked for linearizability.
    pub readers: usize,
    /// Timed seconds per implementation.
    pub seconds: f64,
    /// Heads.
    pub heads: usize,
    /// Live keys (`wide`).
    pub keys: usize,
    /// Rounds per implementation.
    pub rounds: usize,
    /// Random seed.
    pub seed: u64,
    /// `--faults`: about one backend call in this many fails (0: none).
    pub faults: u64,
    /// `--throttle`: the roots' pending-entry limit, if adders throttle.
    pub throttle: Option<u64>,
    /// `--backend`: `mem` or `redb`.
    pub backend: &'static str,
}

/// One implementation's figures over all its rounds.
#[derive(Clone, Debug, Serialize)]
pub struct Summary {
    /// Implementation name.
    #[serde(rename = "impl")]
    pub impl_name: &'static str,
    /// Rounds run.
    pub rounds: usize,
    /// Ops over all rounds (adds, or refs drained for `drain`).
    pub ops: u64,
    /// Median over rounds of ops per second.
    pub ops_per_sec: f64,
    /// Median latency of a single add call.
    pub p50_ns: u64,
    /// 99th percentile latency.
    pub p99_ns: u64,
    /// 99.9th percentile latency.
    pub p999_ns: u64,
    /// Refs the tree lacks, over all rounds.
    pub lost_updates: u64,
    /// Extra refs in the tree, over all rounds.
    pub doubled_updates: u64,
    /// Median over rounds of min/max per-thread ops.
    pub fairness_min_over_max: f64,
    /// Merged refs applied by runners and final drains.
    pub refs_run: u64,
    /// Failed operations and runs.
    pub errors: u64,
    /// Tree blocks with flags that disagree with the queued extent ops.
    pub flag_mismatches: u64,
    /// Rounds that ended with counters not zero.
    pub counters_nonzero: u64,
    /// Rounds whose reserve size did not return to its start.
    pub rsv_leaks: u64,
    /// Reads that returned a count the extent never held while they ran,
    /// over all rounds (`delayed_refs::lincheck`).
    pub linearizability_violations: u64,
    /// Reads checked for linearizability, over all rounds (0 with no readers).
    pub linearizability_reads_checked: u64,
    /// Count-changing calls recorded in the histories, over all rounds.
    pub linearizability_ops_recorded: u64,
    /// Rounds whose history buffers filled up before the round ended (reads
    /// made after that were not checked).
    pub linearizability_cut_rounds: usize,
    /// Per round: reads checked.
    pub round_linearizability_reads_checked: Vec<u64>,
    /// Per round: linearizability violations.
    pub round_linearizability_violations: Vec<u64>,
    /// Per-round throughput.
    pub round_ops_per_sec: Vec<f64>,
    /// `--faults`: backend errors injected over all rounds (each retried).
    pub faults_injected_errors: u64,
    /// `--faults`: backend panics injected over all rounds (each caught and retried).
    pub faults_injected_panics: u64,
    /// `--faults`: backend calls paused.
    pub faults_pauses: u64,
    /// `--throttle`: times adders were told to throttle (and ran a head).
    pub throttled: u64,
    /// The first violations, described.
    pub violations: Vec<String>,
    /// Memory over the run.
    #[serde(flatten)]
    pub mem: MemFigures,
    #[serde(skip)]
    tally: Violations,
}

/// The median of `v` (0 when empty).
pub fn median(mut v: Vec<f64>) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 { v[n / 2] } else { (v[n / 2 - 1] + v[n / 2]) / 2.0 }
}

impl Summary {
    /// Summarize the rounds of one implementation.
    pub fn of(run: &ImplRun, mem: MemFigures) -> Summary {
        let hist = &run.hist;
        let tally = run.tally.clone();
        let round_ops_per_sec: Vec<f64> = run.rounds.iter().map(|r| r.ops_per_sec).collect();
        Summary {
            impl_name: run.name,
            rounds: run.rounds.len(),
            ops: run.rounds.iter().map(|r| r.ops).sum(),
            ops_per_sec: median(round_ops_per_sec.clone()),
            p50_ns: hist.value_at_quantile(0.5),
            p99_ns: hist.value_at_quantile(0.99),
            p999_ns: hist.value_at_quantile(0.999),
            lost_updates: tally.lost,
            doubled_updates: tally.doubled,
            fairness_min_over_max: median(run.rounds.iter().map(|r| r.fairness).collect()),
            refs_run: run.rounds.iter().map(|r| r.refs_run).sum(),
            errors: tally.errors,
            flag_mismatches: tally.flag_mismatches,
            counters_nonzero: tally.counters_nonzero,
            rsv_leaks: tally.rsv_leaks,
            linearizability_violations: tally.linearizability,
            linearizability_reads_checked: run.rounds.iter().map(|r| r.lin_reads_checked).sum(),
            linearizability_ops_recorded: run.rounds.iter().map(|r| r.lin_ops_recorded).sum(),
            linearizability_cut_rounds: run.rounds.iter().filter(|r| r.lin_cut).count(),
            round_linearizability_reads_checked: run.rounds.iter().map(|r| r.lin_reads_checked).collect(),
            round_linearizability_violations: run.rounds.iter().map(|r| r.lin_violations).collect(),
            round_ops_per_sec,
            faults_injected_errors: run.rounds.iter().map(|r| r.faults.errors).sum(),
            faults_injected_panics: run.rounds.iter().map(|r| r.faults.panics).sum(),
            faults_pauses: run.rounds.iter().map(|r| r.faults.pauses).sum(),
            throttled: run.rounds.iter().map(|r| r.throttled).sum(),
            violations: tally.messages.clone(),
            mem,
            tally,
        }
    }

    /// Everything that went wrong.
    pub fn tally(&self) -> &Violations {
        &self.tally
    }
}

/// Per round, lock-free throughput over a baseline's (`locked` or
/// `sharded`) in the same round; rounds where the baseline did nothing are
/// left out.
pub fn round_ratios(baseline: &ImplRun, lockfree: &ImplRun) -> Vec<f64> {
    baseline
        .rounds
        .iter()
        .zip(&lockfree.rounds)
        .filter(|(a, _)| a.ops_per_sec > 0.0)
        .map(|(a, b)| b.ops_per_sec / a.ops_per_sec)
        .collect()
}

/// Median over rounds of lock-free throughput over a baseline's.
pub fn ratio(baseline: &ImplRun, lockfree: &ImplRun) -> Option<f64> {
    let ratios = round_ratios(baseline, lockfree);
    (!ratios.is_empty()).then(|| median(ratios))
}

/// Lock-free's throughput against one baseline: the median of the per-round
/// ratios and the ratios themselves (their spread).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Ratio {
    /// Median over rounds; `None` when no round has both figures.
    pub median: Option<f64>,
    /// Per round, in round order.
    pub rounds: Vec<f64>,
}

impl Ratio {
    /// The ratio of `lockfree` over `baseline`, round by round.
    pub fn of(baseline: &ImplRun, lockfree: &ImplRun) -> Ratio {
        Ratio { median: ratio(baseline, lockfree), rounds: round_ratios(baseline, lockfree) }
    }

    /// `median 0.950, min-max 0.900-1.020 over 3 rounds`, or `n/a`.
    fn describe(&self) -> String {
        match self.median {
            None => "n/a".into(),
            Some(m) => {
                let lo = self.rounds.iter().copied().fold(f64::INFINITY, f64::min);
                let hi = self.rounds.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                let n = self.rounds.len();
                format!("median {m:.3}, min-max {lo:.3}-{hi:.3} over {n} round{}", if n == 1 { "" } else { "s" })
            }
        }
    }
}

/// The ratios a run reports: lock-free against the locked port (`--impl
/// both` and `all`) and against the sharded port (`all`). `None`: that pair
/// was not selected.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Ratios {
    /// Lock-free over locked.
    pub over_locked: Option<Ratio>,
    /// Lock-free over sharded.
    pub over_sharded: Option<Ratio>,
}

/// Bytes as MiB.
fn mib(b: i64) -> f64 {
    b as f64 / (1024.0 * 1024.0)
}

/// All implementations' violations together.
pub fn total(sums: &[Summary]) -> Violations {
    let mut v = Violations::default();
    for s in sums {
        v.absorb(s.tally());
    }
    v
}

/// `verdict: OK lost=0 doubled=0` or `verdict: FAIL ...`.
pub fn verdict_line(v: &Violations) -> String {
    format!("verdict: {} {}", if v.is_ok() { "OK" } else { "FAIL" }, v.summary())
}

/// The JSON object `--json` prints.
#[derive(Debug, Serialize)]
struct JsonReport<'a> {
    #[serde(flatten)]
    header: &'a Header,
    results: &'a [Summary],
    unavailable: &'a [&'static str],
    /// Median over rounds of lock-free over locked (`both`, `all`).
    #[serde(skip_serializing_if = "Option::is_none")]
    ratio_lockfree_over_locked: Option<Option<f64>>,
    /// The per-round ratios behind it.
    #[serde(skip_serializing_if = "Option::is_none")]
    round_ratios_lockfree_over_locked: Option<&'a [f64]>,
    /// Median over rounds of lock-free over sharded (`all`).
    #[serde(skip_serializing_if = "Option::is_none")]
    ratio_lockfree_over_sharded: Option<Option<f64>>,
    /// The per-round ratios behind it.
    #[serde(skip_serializing_if = "Option::is_none")]
    round_ratios_lockfree_over_sharded: Option<&'a [f64]>,
    verdict: &'static str,
    /// `--harness-cost`: the no-op root's figures.
    #[serde(skip_serializing_if = "Option::is_none")]
    harness: Option<&'a Harness>,
}

/// The harness's own cost (`stress --harness-cost`): the same rounds on a
/// root that does nothing.
#[derive(Clone, Debug, Serialize)]
pub struct Harness {
    /// Median over rounds of the no-op root's ops per second.
    pub ops_per_sec: f64,
    /// Its cost per op in nanoseconds (1e9 / ops_per_sec).
    pub ns_per_op: f64,
    /// Per implementation: the harness's ns per op over the implementation's
    /// (each implementation's ns per op includes the harness).
    pub share_of: std::collections::BTreeMap<&'static str, f64>,
}

impl Harness {
    /// From the no-op root's median throughput and the implementations' summaries.
    pub fn of(ops_per_sec: f64, sums: &[Summary]) -> Harness {
        let ns = |ops: f64| if ops > 0.0 { 1e9 / ops } else { f64::NAN };
        let ns_per_op = ns(ops_per_sec);
        let share_of = sums.iter().map(|s| (s.impl_name, ns_per_op / ns(s.ops_per_sec))).collect();
        Harness { ops_per_sec, ns_per_op, share_of }
    }

    /// One line for the text report.
    pub fn line(&self) -> String {
        let shares: Vec<String> = self.share_of.iter().map(|(n, f)| format!("{n} {:.0}%", f * 100.0)).collect();
        format!(
            "harness (no-op root): {:.0} ops/s = {:.0} ns/op; share of each implementation's ns/op: {}",
            self.ops_per_sec,
            self.ns_per_op,
            shares.join(", ")
        )
    }
}

/// One JSON object; a ratio's fields are there only when its pair was selected.
pub fn json(
    h: &Header,
    sums: &[Summary],
    unavailable: &[&'static str],
    ratios: &Ratios,
    harness: Option<&Harness>,
) -> String {
    let report = JsonReport {
        header: h,
        results: sums,
        unavailable,
        ratio_lockfree_over_locked: ratios.over_locked.as_ref().map(|r| r.median),
        round_ratios_lockfree_over_locked: ratios.over_locked.as_ref().map(|r| r.rounds.as_slice()),
        ratio_lockfree_over_sharded: ratios.over_sharded.as_ref().map(|r| r.median),
        round_ratios_lockfree_over_sharded: ratios.over_sharded.as_ref().map(|r| r.rounds.as_slice()),
        verdict: if total(sums).is_ok() { "OK" } else { "FAIL" },
        harness,
    };
    serde_json::to_string(&report).expect("report serializes")
}

/// The default output, without the verdict line: one row per
/// implementation (throughput, tail latency, memory verdict, linearizability
/// reads checked and violations) and lock-free's throughput ratio against
/// each baseline with its spread over rounds. `--details` prints [`table`].
pub fn short_table(h: &Header, sums: &[Summary], unavailable: &[&'static str], ratios: &Ratios) -> String {
    let mut out = format!(
        "{}: {} adder(s), {} runner(s), {} reader(s), {} s per implementation in {} round(s), {} heads, seed {}\n",
        h.workload, h.threads, h.runners, h.readers, h.seconds, h.rounds, h.heads, h.seed
    );
    out.push_str(&format!(
        "{:<9} {:>12} {:>10} {:>7} {:>24}\n",
        "impl", "ops/s", "p99.9_us", "memory", "reads_checked/violations"
    ));
    for s in sums {
        let lin = if h.readers > 0 {
            format!("{}/{}", s.linearizability_reads_checked, s.linearizability_violations)
        } else {
            "-".to_string()
        };
        out.push_str(&format!(
            "{:<9} {:>12.0} {:>10.1} {:>7} {:>24}\n",
            s.impl_name,
            s.ops_per_sec,
            s.p999_ns as f64 / 1000.0,
            if s.mem.mem_flat { "flat" } else { "GROWS" },
            lin
        ));
    }
    for name in unavailable {
        out.push_str(&format!("{name:<9} unavailable: {}\n", crate::impls::unavailable_message(name)));
    }
    for (name, r) in [("locked", &ratios.over_locked), ("sharded", &ratios.over_sharded)] {
        if let Some(r) = r {
            out.push_str(&format!("throughput lockfree/{name}: {}\n", r.describe()));
        }
    }
    out
}

/// The full results table (`--details`), without the verdict line.
pub fn table(h: &Header, sums: &[Summary], unavailable: &[&'static str], ratios: &Ratios) -> String {
    let mut out = format!(
        "workload={} threads={} runners={} readers={} seconds={} heads={} rounds={} seed={}\n",
        h.workload, h.threads, h.runners, h.readers, h.seconds, h.heads, h.rounds, h.seed
    );
    if h.workload == "wide" {
        out.push_str(&format!("keys={}\n", h.keys));
    }
    if h.workload == "drain" {
        out.push_str("(drain: ops = refs drained, ops/s over drain time, latency = prefill adds)\n");
    }
    out.push_str(&format!(
        "{:<9} {:>6} {:>12} {:>12} {:>8} {:>8} {:>9} {:>8} {:>12}\n",
        "impl", "rounds", "ops", "ops/s", "p50_ns", "p99_ns", "p99.9_ns", "fairness", "refs_run"
    ));
    for s in sums {
        out.push_str(&format!(
            "{:<9} {:>6} {:>12} {:>12.0} {:>8} {:>8} {:>9} {:>8.3} {:>12}\n",
            s.impl_name,
            s.rounds,
            s.ops,
            s.ops_per_sec,
            s.p50_ns,
            s.p99_ns,
            s.p999_ns,
            s.fairness_min_over_max,
            s.refs_run
        ));
    }
    for name in unavailable {
        out.push_str(&format!("{name:<9} unavailable: {}\n", crate::impls::unavailable_message(name)));
    }
    if !sums.is_empty() {
        out.push_str(&format!(
            "{:<9} {:>8} {:>8} {:>13} {:>12} {:>14} {:>14} {:>6}\n",
            "impl", "peak_MiB", "end_MiB", "retained_KiB", "end_grow_KiB", "floor_grow_KiB", "growing_rounds", "mem"
        ));
        for s in sums {
            let f = &s.mem.mem_flatness;
            out.push_str(&format!(
                "{:<9} {:>8.1} {:>8.1} {:>13.1} {:>12.1} {:>14.1} {:>14} {:>6}\n",
                s.impl_name,
                mib(s.mem.mem_peak_bytes),
                mib(s.mem.mem_end_bytes),
                f.max_root_retained_bytes as f64 / 1024.0,
                f.end_growth_bytes as f64 / 1024.0,
                f.floor_growth_bytes as f64 / 1024.0,
                format!("{}/{}", f.rounds_growing, f.rounds_checked),
                if s.mem.mem_flat { "flat" } else { "GROWS" }
            ));
        }
        out.push_str("(mem: the rule is in `stress --help`)\n");
    }
    if h.readers > 0 {
        for s in sums {
            let per_round: Vec<String> = s
                .round_linearizability_reads_checked
                .iter()
                .zip(&s.round_linearizability_violations)
                .map(|(r, v)| format!("{r}/{v}"))
                .collect();
            out.push_str(&format!(
                "linearizability {:<9} reads_checked={} violations={} ops_recorded={} cut_rounds={} (per round \
                 reads/violations: {})\n",
                s.impl_name,
                s.linearizability_reads_checked,
                s.linearizability_violations,
                s.linearizability_ops_recorded,
                s.linearizability_cut_rounds,
                per_round.join(" ")
            ));
        }
    }
    for (name, r) in [("locked", &ratios.over_locked), ("sharded", &ratios.over_sharded)] {
        match r {
            Some(r @ Ratio { median: Some(_), .. }) => {
                out.push_str(&format!("ratio lockfree/{name}: {}\n", r.describe()))
            }
            Some(_) => out.push_str(&format!("ratio lockfree/{name}: n/a\n")),
            None => {}
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stats::LinFigures;

    #[test]
    fn median_of_odd_and_even() {
        assert_eq!(median(vec![]), 0.0);
        assert_eq!(median(vec![3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(vec![4.0, 1.0, 2.0, 3.0]), 2.5);
    }

    #[test]
    fn json_has_the_contract_fields() {
        let h = Header {
            workload: "spread",
            threads: 2,
            runners: 1,
            readers: 1,
            seconds: 1.0,
            heads: 10,
            keys: 1,
            rounds: 1,
            seed: 7,
            faults: 0,
            throttle: None,
            backend: "mem",
        };
        let mut run = ImplRun::new("locked");
        run.push(RoundResult {
            ops: 10,
            secs: 1.0,
            hist: new_histogram(),
            per_thread_ops: vec![5, 5],
            refs_run: 0,
            violations: Violations::default(),
            mem_end_bytes: 3 << 20,
            mem_root_retained_bytes: 0,
            lin: LinFigures { reads_checked: 1000, ops_recorded: 50, cut: false, samples: Vec::new() },
            faults: Default::default(),
            throttled: 0,
        });
        let mem = MemFigures { mem_peak_bytes: 4 << 20, mem_end_bytes: 3 << 20, mem_flat: true, ..Default::default() };
        let sums = vec![Summary::of(&run, mem)];
        let na = Ratios { over_locked: Some(Ratio::default()), over_sharded: None };
        let v: serde_json::Value = serde_json::from_str(&json(&h, &sums, &["lockfree"], &na, None)).unwrap();
        assert!(v.get("ratio_lockfree_over_sharded").is_none(), "only for --impl all");
        for k in ["workload", "threads", "runners", "readers", "seconds", "results", "ratio_lockfree_over_locked"] {
            assert!(v.get(k).is_some(), "{k}");
        }
        let r = &v["results"][0];
        for k in [
            "impl",
            "ops",
            "ops_per_sec",
            "p50_ns",
            "p99_ns",
            "p999_ns",
            "lost_updates",
            "doubled_updates",
            "fairness_min_over_max",
            "mem_peak_bytes",
            "mem_end_bytes",
            "mem_flat",
            "mem_flatness",
            "linearizability_violations",
            "linearizability_reads_checked",
            "linearizability_ops_recorded",
            "linearizability_cut_rounds",
            "round_linearizability_reads_checked",
            "round_linearizability_violations",
        ] {
            assert!(r.get(k).is_some(), "{k}");
        }
        assert_eq!(
            (r["linearizability_violations"].as_u64(), r["linearizability_reads_checked"].as_u64()),
            (Some(0), Some(1000))
        );
        assert!(
            table(&h, &sums, &[], &Ratios::default())
                .contains("linearizability locked    reads_checked=1000 violations=0")
        );
        assert_eq!(r["mem_peak_bytes"], 4 << 20);
        assert!(table(&h, &sums, &[], &Ratios::default()).contains("peak_MiB"));
        assert_eq!(r["fairness_min_over_max"], 1.0);
        assert!(verdict_line(&total(&sums)).starts_with("verdict: OK"));
    }

    fn run_of(name: &'static str, ops_per_round: &[u64]) -> ImplRun {
        let mut run = ImplRun::new(name);
        for &ops in ops_per_round {
            run.push(RoundResult {
                ops,
                secs: 1.0,
                hist: new_histogram(),
                per_thread_ops: vec![ops],
                refs_run: 0,
                violations: Violations::default(),
                mem_end_bytes: 0,
                mem_root_retained_bytes: 0,
                lin: LinFigures { reads_checked: 0, ops_recorded: 0, cut: false, samples: Vec::new() },
                faults: Default::default(),
                throttled: 0,
            });
        }
        run
    }

    #[test]
    fn both_ratios_with_their_rounds() {
        let (locked, sharded, lockfree) = (
            run_of("locked", &[100, 200, 100]),
            run_of("sharded", &[200, 200, 400]),
            run_of("lockfree", &[150, 200, 200]),
        );
        let ratios = Ratios {
            over_locked: Some(Ratio::of(&locked, &lockfree)),
            over_sharded: Some(Ratio::of(&sharded, &lockfree)),
        };
        assert_eq!(ratios.over_locked.as_ref().unwrap().rounds, vec![1.5, 1.0, 2.0]);
        assert_eq!(ratios.over_locked.as_ref().unwrap().median, Some(1.5));
        assert_eq!(ratios.over_sharded.as_ref().unwrap().rounds, vec![0.75, 1.0, 0.5]);
        assert_eq!(ratios.over_sharded.as_ref().unwrap().median, Some(0.75));
        let h = Header {
            workload: "spread",
            threads: 2,
            runners: 1,
            readers: 0,
            seconds: 3.0,
            heads: 10,
            keys: 1,
            rounds: 3,
            seed: 7,
            faults: 0,
            throttle: None,
            backend: "mem",
        };
        let sums: Vec<Summary> =
            [&locked, &sharded, &lockfree].iter().map(|r| Summary::of(r, MemFigures::default())).collect();
        let v: serde_json::Value = serde_json::from_str(&json(&h, &sums, &[], &ratios, None)).unwrap();
        assert_eq!(v["ratio_lockfree_over_locked"], 1.5);
        assert_eq!(v["ratio_lockfree_over_sharded"], 0.75);
        assert!(v.get("harness").is_none(), "no harness figures unless asked");
        // The harness at 4x the lock-free root's throughput costs a quarter
        // of its time per op.
        let lf_ops = sums[2].ops_per_sec;
        let harness = Harness::of(4.0 * lf_ops, &sums);
        assert!((harness.share_of["lockfree"] - 0.25).abs() < 1e-9, "{harness:?}");
        assert!((harness.ns_per_op - 1e9 / (4.0 * lf_ops)).abs() < 1e-6);
        let v: serde_json::Value = serde_json::from_str(&json(&h, &sums, &[], &ratios, Some(&harness))).unwrap();
        assert!((v["harness"]["share_of"]["lockfree"].as_f64().unwrap() - 0.25).abs() < 1e-9);
        assert_eq!(v["round_ratios_lockfree_over_sharded"], serde_json::json!([0.75, 1.0, 0.5]));
        let t = table(&h, &sums, &[], &ratios);
        assert!(t.contains("ratio lockfree/locked: median 1.500, min-max 1.000-2.000 over 3 rounds"), "{t}");
        assert!(t.contains("ratio lockfree/sharded: median 0.750, min-max 0.500-1.000 over 3 rounds"), "{t}");
        let s = short_table(&h, &sums, &[], &ratios);
        assert!(s.contains("throughput lockfree/locked: median 1.500, min-max 1.000-2.000 over 3 rounds"), "{s}");
        assert!(s.contains("throughput lockfree/sharded: median 0.750, min-max 0.500-1.000 over 3 rounds"), "{s}");
        assert_eq!(s.lines().count(), 2 + sums.len() + 2, "{s}");
    }
}
