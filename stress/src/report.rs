//! Summaries over rounds (medians), the results table, the JSON object and
//! the verdict line.

use serde::Serialize;

use crate::check::Violations;
use crate::stats::{RoundResult, new_histogram};

/// The rounds one implementation ran.
#[derive(Debug)]
pub struct ImplRun {
    /// Implementation name.
    pub name: &'static str,
    /// Its rounds, in run order.
    pub rounds: Vec<RoundResult>,
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
    /// Per-round throughput.
    pub round_ops_per_sec: Vec<f64>,
    /// The first violations, described.
    pub violations: Vec<String>,
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
    pub fn of(run: &ImplRun) -> Summary {
        let mut hist = new_histogram();
        let mut tally = Violations::default();
        for r in &run.rounds {
            hist.add(&r.hist).expect("histograms share bounds");
            tally.absorb(&r.violations);
        }
        let round_ops_per_sec: Vec<f64> = run.rounds.iter().map(RoundResult::ops_per_sec).collect();
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
            fairness_min_over_max: median(run.rounds.iter().map(RoundResult::fairness).collect()),
            refs_run: run.rounds.iter().map(|r| r.refs_run).sum(),
            errors: tally.errors,
            flag_mismatches: tally.flag_mismatches,
            counters_nonzero: tally.counters_nonzero,
            rsv_leaks: tally.rsv_leaks,
            round_ops_per_sec,
            violations: tally.messages.clone(),
            tally,
        }
    }

    /// Everything that went wrong.
    pub fn tally(&self) -> &Violations {
        &self.tally
    }
}

/// Median over rounds of lock-free throughput over locked throughput.
pub fn ratio(locked: &ImplRun, lockfree: &ImplRun) -> Option<f64> {
    let ratios: Vec<f64> = locked
        .rounds
        .iter()
        .zip(&lockfree.rounds)
        .filter(|(a, _)| a.ops_per_sec() > 0.0)
        .map(|(a, b)| b.ops_per_sec() / a.ops_per_sec())
        .collect();
    (!ratios.is_empty()).then(|| median(ratios))
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
    #[serde(skip_serializing_if = "Option::is_none")]
    ratio_lockfree_over_locked: Option<Option<f64>>,
    verdict: &'static str,
}

/// One JSON object; `ratio` is `Some` only for `--impl both`.
pub fn json(h: &Header, sums: &[Summary], unavailable: &[&'static str], ratio: Option<Option<f64>>) -> String {
    let report = JsonReport {
        header: h,
        results: sums,
        unavailable,
        ratio_lockfree_over_locked: ratio,
        verdict: if total(sums).is_ok() { "OK" } else { "FAIL" },
    };
    serde_json::to_string(&report).expect("report serializes")
}

/// The human-readable results table, without the verdict line.
pub fn table(h: &Header, sums: &[Summary], unavailable: &[&'static str], ratio: Option<Option<f64>>) -> String {
    let mut out = format!(
        "workload={} threads={} runners={} seconds={} heads={} rounds={} seed={}\n",
        h.workload, h.threads, h.runners, h.seconds, h.heads, h.rounds, h.seed
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
    match ratio {
        Some(Some(r)) => out.push_str(&format!("ratio lockfree/locked (median of rounds): {r:.3}\n")),
        Some(None) => out.push_str("ratio lockfree/locked: n/a\n"),
        None => {}
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_of_odd_and_even() {
        assert_eq!(median(vec![]), 0.0);
        assert_eq!(median(vec![3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(vec![4.0, 1.0, 2.0, 3.0]), 2.5);
    }

    #[test]
    fn json_has_the_contract_fields() {
        let h =
            Header { workload: "spread", threads: 2, runners: 1, seconds: 1.0, heads: 10, keys: 1, rounds: 1, seed: 7 };
        let run = ImplRun {
            name: "locked",
            rounds: vec![RoundResult {
                ops: 10,
                secs: 1.0,
                hist: new_histogram(),
                per_thread_ops: vec![5, 5],
                refs_run: 0,
                violations: Violations::default(),
            }],
        };
        let sums = vec![Summary::of(&run)];
        let v: serde_json::Value = serde_json::from_str(&json(&h, &sums, &["lockfree"], Some(None))).unwrap();
        for k in ["workload", "threads", "runners", "seconds", "results", "ratio_lockfree_over_locked"] {
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
        ] {
            assert!(r.get(k).is_some(), "{k}");
        }
        assert_eq!(r["fairness_min_over_max"], 1.0);
        assert!(verdict_line(&total(&sums)).starts_with("verdict: OK"));
    }
}
