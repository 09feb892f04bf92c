//! `replay <run-dir>`: feed a recorded kernel trace (see the traces README)
//! through an implementation and compare with the kernel's extent trees and
//! with the kernel's own runs. docs/replay.md describes what is replayed and
//! what is compared, and the measured results.
//!
//! For each segment `NN` (`events/NN_*.tsv.gz`, in order) the previous dump
//! (`extents/(NN-1)_*`) is loaded into a fresh strict
//! [`delayed_refs::MemExtentTree`]; the segment's add events become add
//! calls ([`plan`]), grouped into transactions; each transaction gets a fresh
//! delayed-ref root over shared fs-wide state and ends with
//! `run(RunMode::All)` ([`engine`]); the tree is then compared with
//! `extents/NN_*`, and the runs the implementation made with the kernel's
//! ([`compare`]).
//!
//! Modes: `--threads 1 --runners 0` (or `--threads 0`) is sequential: one
//! thread, trace order, one head run wherever the kernel finished with a
//! head. Anything else is concurrent: `--threads N` adder threads (each
//! traced pid's adds in order on one thread, pid to thread by hash, and each
//! extent's adds kept in trace order across threads) while `--runners M`
//! threads call `run_one` in a loop, with a full drain at each transaction
//! end. Setting `DELAYED_REFS_REPLAY_UNORDERED=1` drops the per-extent order
//! across threads, to show the hazard it prevents.
//!
//! Tree-mod-log blockers are registered and removed where the trace has
//! them, every ref is queued with the kernel's seq, and the seq restarts
//! with every transaction ([`engine`]); the seq tracker's hold-back
//! decisions are compared with the kernel's `kp_check_seq`/`kp_held_back`
//! rows, and no run may take a ref at or above a live blocker's seq. With
//! qgroup rows in the recording the roots keep qgroup records, compared per
//! transaction with the heads `btrfs_qgroup_trace_extent` marks. The node
//! size comes from the recording ([`nodesize`]); events the replay does not
//! use are counted by name.
//!
//! Output: a table per implementation, `hold-backs:`, `qgroup-records:`
//! and `kernel-runs:` lines per implementation, and last exactly one line
//! `replay: extents <matched>/<total> backrefs <matched>/<total>` (summed
//! over the implementations run; on stderr with `--json`, whose object goes
//! to stdout). Exit status: 0 everything matched, 1 a mismatch or an error
//! from the implementation, 2 unreadable input or an unavailable
//! implementation.

#![forbid(unsafe_code)]

pub mod compare;
pub mod dump;
pub mod engine;
pub mod events;
pub mod input;
pub mod nodesize;
pub mod plan;

use std::path::PathBuf;
use std::time::Instant;

use delayed_refs::DelayedRefs;
use serde::Serialize;

use crate::impls::{ImplVisitor, is_available, unavailable_message, with_impl};
use engine::{EngineStats, Mode, replay_segment};
use plan::{PlanStats, Run, Segment, load_run};

/// Arguments of `replay`.
#[derive(Clone, Debug)]
pub struct ReplayArgs {
    /// The recorded run directory.
    pub run_dir: PathBuf,
    /// `lockfree`, `locked`, `sharded`, `both` or `all`.
    pub impl_name: String,
    /// Adder threads.
    pub threads: usize,
    /// Runner threads.
    pub runners: usize,
    /// Print JSON.
    pub json: bool,
    /// The node size, overriding what the recording says.
    pub nodesize: Option<u64>,
}

/// The environment variable that turns off per-extent order across adder
/// threads in concurrent mode.
pub const UNORDERED_ENV: &str = "DELAYED_REFS_REPLAY_UNORDERED";

/// One segment's results for one implementation.
#[derive(Clone, Debug, Serialize)]
pub struct SegmentReport {
    /// `NN_phase`.
    pub segment: String,
    /// The dump it started from.
    pub before: String,
    /// Extents matched.
    pub extents_matched: u64,
    /// Extents compared.
    pub extents_total: u64,
    /// Backrefs matched.
    pub backrefs_matched: u64,
    /// Backrefs compared.
    pub backrefs_total: u64,
    /// Extents whose refs agree but flags do not (included in the mismatches).
    pub flag_mismatches: u64,
    /// Kernel runs.
    pub kernel_runs: u64,
    /// Kernel runs the implementation agrees with.
    pub kernel_runs_agree: u64,
    /// Kernel runs tolerated as the add/run tracing race.
    pub kernel_runs_tolerated: u64,
    /// Kernel runs that disagree.
    pub kernel_runs_disagree: u64,
    /// Groups only the implementation ran.
    pub impl_only_groups: u64,
    /// Groups where both sides ran exactly one equal ref.
    pub single_exact_groups: u64,
    /// Groups where the kernel ran several refs.
    pub multi_kernel_groups: u64,
    /// Groups where another add of the head carried must_insert_reserved.
    pub insert_carrier_differs: u64,
    /// Rows of events the replay does not use, by event name.
    pub other_events: std::collections::BTreeMap<String, u64>,
    /// What the plan holds.
    pub plan: PlanStats,
    /// What the implementation did.
    pub engine: EngineStats,
    /// Milliseconds to replay the segment (not counting parsing).
    pub millis: f64,
    /// The first few mismatches.
    pub mismatches: Vec<String>,
    /// The first few errors from the implementation.
    pub errors: Vec<String>,
}

impl SegmentReport {
    /// Whether everything matched and nothing failed.
    pub fn ok(&self) -> bool {
        self.extents_matched == self.extents_total
            && self.backrefs_matched == self.backrefs_total
            && self.kernel_runs_disagree == 0
            && self.impl_only_groups == 0
            && self.engine.add_errors == 0
            && self.engine.drain_errors == 0
            && self.engine.run_errors == 0
            && self.engine.heads_left == 0
            && self.engine.checks_agree == self.engine.checks
            && self.engine.seq_violations == 0
            && self.engine.blocker_errors == 0
            && self.engine.qgroup_matched == self.engine.qgroup_total
    }
}

/// One implementation's results.
#[derive(Clone, Debug, Serialize)]
pub struct ImplReport {
    /// Implementation name.
    #[serde(rename = "impl")]
    pub impl_name: &'static str,
    /// `sequential` or `concurrent`.
    pub mode: &'static str,
    /// Adder threads.
    pub threads: usize,
    /// Runner threads.
    pub runners: usize,
    /// Per-extent order across adder threads (concurrent mode).
    pub per_extent_order: bool,
    /// Per segment.
    pub segments: Vec<SegmentReport>,
    /// Milliseconds for all segments.
    pub millis: f64,
}

impl ImplReport {
    fn sum(&self, f: impl Fn(&SegmentReport) -> u64) -> u64 {
        self.segments.iter().map(f).sum()
    }

    /// Whether every segment matched.
    pub fn ok(&self) -> bool {
        self.segments.iter().all(SegmentReport::ok)
    }
}

struct ReplayVisitor<'a> {
    segments: &'a [Segment],
    mode: Mode,
    qgroups: bool,
}

impl ImplVisitor for ReplayVisitor<'_> {
    type Output = ImplReport;

    fn visit<D: DelayedRefs>(self) -> ImplReport {
        let t0 = Instant::now();
        let segments = self.segments.iter().map(|s| replay_one::<D>(s, self.mode, self.qgroups)).collect();
        let (mode, threads, runners, per_extent_order) = match self.mode {
            Mode::Sequential => ("sequential", 1, 0, true),
            Mode::Concurrent { threads, runners, per_extent_order } => {
                ("concurrent", threads, runners, per_extent_order)
            }
        };
        ImplReport {
            impl_name: D::NAME,
            mode,
            threads,
            runners,
            per_extent_order,
            segments,
            millis: t0.elapsed().as_secs_f64() * 1e3,
        }
    }
}

/// Replay and compare one segment with implementation `D` (qgroup records
/// kept if `qgroups`).
fn replay_one<D: DelayedRefs>(seg: &Segment, mode: Mode, qgroups: bool) -> SegmentReport {
    let out = replay_segment::<D>(seg, mode, qgroups);
    let t = compare::compare_tree(seg, &out.items);
    let r = compare::compare_runs(&seg.kernel_runs, &out.runs);
    let mut mismatches = t.examples;
    mismatches.extend(r.examples.iter().map(|e| format!("kernel run: {e}")));
    mismatches.extend(out.mismatches);
    SegmentReport {
        segment: seg.name.clone(),
        before: seg.before_name.clone(),
        extents_matched: t.extents_matched,
        extents_total: t.extents_total,
        backrefs_matched: t.backrefs_matched,
        backrefs_total: t.backrefs_total,
        flag_mismatches: t.flag_mismatches,
        kernel_runs: r.kernel_runs,
        kernel_runs_agree: r.agree,
        kernel_runs_tolerated: r.tolerated,
        kernel_runs_disagree: r.disagree,
        impl_only_groups: r.impl_only,
        single_exact_groups: r.single_exact,
        multi_kernel_groups: r.multi_kernel_groups,
        insert_carrier_differs: r.insert_carrier_differs,
        other_events: seg.other_events.clone(),
        plan: seg.stats,
        engine: out.stats,
        millis: out.elapsed.as_secs_f64() * 1e3,
        mismatches,
        errors: out.errors,
    }
}

/// The implementations `name` selects, in run order.
fn impl_names(name: &str) -> Option<&'static [&'static str]> {
    match name {
        "locked" => Some(&["locked"]),
        "lockfree" => Some(&["lockfree"]),
        "both" => Some(&["locked", "lockfree"]),
        "sharded" => Some(&["sharded"]),
        "all" => Some(&["locked", "sharded", "lockfree"]),
        _ => None,
    }
}

fn print_table(r: &ImplReport) {
    outln!(
        "{:<22} {:>7} {:>6} {:>5} {:>4} {:>6} {:>13} {:>13} {:>13} {:>11} {:>5} {:>11} {:>8}",
        "segment",
        "events",
        "adds",
        "xops",
        "txns",
        "runs",
        "extents",
        "backrefs",
        "kernel-runs",
        "hb-checks",
        "held",
        "qgroup",
        "ms"
    );
    let frac = |a: u64, b: u64| format!("{a}/{b}");
    for s in &r.segments {
        outln!(
            "{:<22} {:>7} {:>6} {:>5} {:>4} {:>6} {:>13} {:>13} {:>13} {:>11} {:>5} {:>11} {:>8.1}",
            s.segment,
            s.plan.events,
            s.plan.ref_adds,
            s.plan.extent_ops,
            s.plan.batches,
            s.engine.refs_run,
            frac(s.extents_matched, s.extents_total),
            frac(s.backrefs_matched, s.backrefs_total),
            frac(s.kernel_runs_agree, s.kernel_runs),
            frac(s.engine.checks_agree, s.engine.checks),
            s.engine.held_back,
            frac(s.engine.qgroup_matched, s.engine.qgroup_total),
            s.millis
        );
    }
    outln!(
        "{:<22} {:>7} {:>6} {:>5} {:>4} {:>6} {:>13} {:>13} {:>13} {:>11} {:>5} {:>11} {:>8.1}",
        "total",
        r.segments.iter().map(|s| s.plan.events).sum::<usize>(),
        r.segments.iter().map(|s| s.plan.ref_adds).sum::<usize>(),
        r.segments.iter().map(|s| s.plan.extent_ops).sum::<usize>(),
        r.segments.iter().map(|s| s.plan.batches).sum::<usize>(),
        r.sum(|s| s.engine.refs_run),
        frac(r.sum(|s| s.extents_matched), r.sum(|s| s.extents_total)),
        frac(r.sum(|s| s.backrefs_matched), r.sum(|s| s.backrefs_total)),
        frac(r.sum(|s| s.kernel_runs_agree), r.sum(|s| s.kernel_runs)),
        frac(r.sum(|s| s.engine.checks_agree), r.sum(|s| s.engine.checks)),
        r.sum(|s| s.engine.held_back),
        frac(r.sum(|s| s.engine.qgroup_matched), r.sum(|s| s.engine.qgroup_total)),
        r.millis
    );
    for s in &r.segments {
        for m in &s.mismatches {
            outln!("  {}: mismatch: {m}", s.segment);
        }
        for e in &s.errors {
            outln!("  {}: error: {e}", s.segment);
        }
    }
    let e = |f: fn(&EngineStats) -> u64| r.sum(|s| f(&s.engine));
    let p = |f: fn(&PlanStats) -> usize| r.segments.iter().map(|s| f(&s.plan)).sum::<usize>();
    outln!(
        "{}: plan: {} new extents, {} UPDATE_DELAYED_HEAD heads replayed as FULL_BACKREF extent ops (kernel \
         kp_extent_op: {}, {} not exactly FULL_BACKREF); {} kernel runs without kprobe (tree-block inserts), \
         {} odd",
        r.impl_name,
        p(|s| s.new_extents),
        p(|s| s.extent_ops),
        p(|s| s.kernel_extent_ops),
        p(|s| s.kernel_extent_ops_other),
        p(|s| s.kernel_runs_without_kp),
        p(|s| s.kernel_run_oddities)
    );
    outln!(
        "{}: heads run {}, refs run {}, extent ops run {}, pinned {} bytes; late adds {}, realloc drains {}",
        r.impl_name,
        e(|s| s.heads),
        e(|s| s.refs_run),
        e(|s| s.extent_ops_run),
        e(|s| s.pinned_bytes),
        p(|s| s.late_adds),
        p(|s| s.realloc_drains)
    );
    if r.mode == "concurrent" {
        outln!(
            "{}: concurrent: heads run by runners {}, refused runs {} (ordering hazards, retried), \
             order waits {}, failed drains {}, heads left {}, run errors {}",
            r.impl_name,
            e(|s| s.runner_heads),
            e(|s| s.refused_runs),
            e(|s| s.order_waits),
            e(|s| s.drain_errors),
            e(|s| s.heads_left),
            e(|s| s.run_errors)
        );
    } else {
        outln!(
            "{}: sequential: heads run where the kernel finished one {}, refused runs {} (retried), \
             run errors {}",
            r.impl_name,
            e(|s| s.paced_runs),
            e(|s| s.refused_runs),
            e(|s| s.run_errors)
        );
    }
    outln!(
        "{}: seq: {} refs with a kernel seq != 0 ({} of roots that are not fs trees); blockers: {} registered, \
         {} removed, {} gets of an already registered elem, {} gets without their entry row, {} puts without a \
         get, {} released at a transaction end, {} refused",
        r.impl_name,
        p(|s| s.seq_refs),
        p(|s| s.seq_refs_not_fstree),
        p(|s| s.blocker_gets),
        p(|s| s.blocker_puts),
        p(|s| s.blocker_gets_reused),
        p(|s| s.blocker_gets_without_entry),
        p(|s| s.blocker_puts_unpaired),
        e(|s| s.blockers_released),
        e(|s| s.blocker_errors)
    );
    outln!(
        "hold-backs: decisions agree {}/{} ({}; kernel held back {} of {} checks, {} kp_held_back rows without a \
         check; the implementation held back {} heads; runs past a live blocker {} of {} runs made while a \
         blocker was live)",
        e(|s| s.checks_agree),
        e(|s| s.checks),
        r.impl_name,
        e(|s| s.checks_kernel_held),
        e(|s| s.checks),
        p(|s| s.held_back_unpaired),
        e(|s| s.held_back),
        e(|s| s.seq_violations),
        e(|s| s.runs_under_blocker)
    );
    outln!(
        "qgroup-records: matched {}/{} ({}; kernel {} on marked heads, implementation {}; {} records the kernel \
         traced outside delayed-ref adds, not replayed; accounted = traced in {}/{} transactions)",
        e(|s| s.qgroup_matched),
        e(|s| s.qgroup_total),
        r.impl_name,
        e(|s| s.qgroup_kernel),
        e(|s| s.qgroup_impl),
        p(|s| s.qgroup_other_marks),
        p(|s| s.qgroup_account_consistent),
        p(|s| s.qgroup_account_batches)
    );
    outln!(
        "kernel-runs: agree {}/{} ({}; {} tolerated as add/run tracing race, {} disagree, {} implementation-only; \
         {} groups ran once on both sides with equal refs, {} of them with the insert on another add of \
         the head, {} groups the kernel ran in several steps)",
        r.sum(|s| s.kernel_runs_agree),
        r.sum(|s| s.kernel_runs),
        r.impl_name,
        r.sum(|s| s.kernel_runs_tolerated),
        r.sum(|s| s.kernel_runs_disagree),
        r.sum(|s| s.impl_only_groups),
        r.sum(|s| s.single_exact_groups + s.insert_carrier_differs),
        r.sum(|s| s.insert_carrier_differs),
        r.sum(|s| s.multi_kernel_groups)
    );
}

/// Replay a run directory; returns the exit code (0 all matched, 1 a
/// mismatch or implementation error, 2 unreadable input or unavailable
/// implementation).
pub fn run(args: &ReplayArgs) -> i32 {
    let Some(names) = impl_names(&args.impl_name) else {
        eprintln!("replay: unknown implementation {:?} (lockfree, locked, sharded, both or all)", args.impl_name);
        return 2;
    };
    let mut chosen = Vec::new();
    for &n in names {
        if is_available(n) {
            chosen.push(n);
        } else if names.len() == 1 {
            eprintln!("{}", unavailable_message(n));
            return 2;
        } else {
            eprintln!("note: {}; replaying the others only", unavailable_message(n));
        }
    }
    let mode = if (args.threads <= 1 && args.runners == 0) || args.threads == 0 {
        Mode::Sequential
    } else {
        let unordered = std::env::var(UNORDERED_ENV).is_ok_and(|v| !v.is_empty() && v != "0");
        Mode::Concurrent { threads: args.threads, runners: args.runners, per_extent_order: !unordered }
    };
    let t0 = Instant::now();
    let Run { segments, nodesize, qgroups } = match load_run(&args.run_dir, args.nodesize) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("replay: unreadable input: {e}");
            return 2;
        }
    };
    let parse_ms = t0.elapsed().as_secs_f64() * 1e3;
    let events: usize = segments.iter().map(|s| s.stats.events).sum();
    let mut other_events: std::collections::BTreeMap<String, u64> = std::collections::BTreeMap::new();
    for s in &segments {
        for (k, v) in &s.other_events {
            *other_events.entry(k.clone()).or_insert(0) += v;
        }
    }
    let nodesize_text = match &nodesize {
        Some(n) => format!("{} bytes (from {})", n.bytes, n.source),
        None => "unknown (no tree block in the recording)".to_string(),
    };
    if !args.json {
        let how = match mode {
            Mode::Sequential => "sequential".to_string(),
            Mode::Concurrent { threads, runners, per_extent_order } => format!(
                "concurrent: {threads} adder threads, {runners} runners, per-extent order {}",
                if per_extent_order { "kept" } else { "NOT kept" }
            ),
        };
        outln!(
            "replaying {}: {} segments, {events} events (parsed in {parse_ms:.0} ms); {how}",
            args.run_dir.display(),
            segments.len()
        );
        outln!("node size: {nodesize_text}; qgroup records {}", if qgroups { "on" } else { "off (no qgroup rows)" });
        if other_events.is_empty() {
            outln!("events not replayed: none");
        } else {
            let list: Vec<String> = other_events.iter().map(|(k, v)| format!("{k} {v}")).collect();
            outln!("events not replayed (not in the delayed-ref, blocker or qgroup sets): {}", list.join(", "));
        }
    }
    let mut reports = Vec::new();
    for n in chosen {
        let Some(r) = with_impl(n, ReplayVisitor { segments: &segments, mode, qgroups }) else {
            eprintln!("{}", unavailable_message(n));
            return 2;
        };
        if !args.json {
            outln!();
            outln!("implementation {} ({} ms)", r.impl_name, r.millis.round());
            print_table(&r);
        }
        reports.push(r);
    }
    let sum = |f: fn(&SegmentReport) -> u64| reports.iter().map(|r| r.sum(f)).sum::<u64>();
    let line = format!(
        "replay: extents {}/{} backrefs {}/{}",
        sum(|s| s.extents_matched),
        sum(|s| s.extents_total),
        sum(|s| s.backrefs_matched),
        sum(|s| s.backrefs_total)
    );
    let ok = reports.iter().all(ImplReport::ok);
    if args.json {
        #[derive(Serialize)]
        struct Out<'a> {
            run_dir: String,
            events: usize,
            parse_ms: f64,
            nodesize: Option<u64>,
            nodesize_source: String,
            qgroups: bool,
            events_not_replayed: &'a std::collections::BTreeMap<String, u64>,
            ok: bool,
            summary: &'a str,
            implementations: &'a [ImplReport],
        }
        let out = Out {
            run_dir: args.run_dir.display().to_string(),
            events,
            parse_ms,
            nodesize: nodesize.as_ref().map(|n| n.bytes),
            nodesize_source: nodesize_text,
            qgroups,
            events_not_replayed: &other_events,
            ok,
            summary: &line,
            implementations: &reports,
        };
        match serde_json::to_string(&out) {
            Ok(s) => outln!("{s}"),
            Err(e) => {
                eprintln!("replay: cannot serialize the report: {e}");
                return 1;
            }
        }
        eprintln!("{line}");
    } else {
        outln!("{line}");
    }
    if ok { 0 } else { 1 }
}

#[cfg(test)]
mod tests {
    use super::input::tests::{gz, scratch};
    use super::plan::{OpKind, load_segment};
    use super::*;
    use delayed_refs::{Action, LockFreeRefs, LockedRefs};

    /// A recording kept in the repository (`traces/`); missing is a failure.
    fn trace(name: &str) -> PathBuf {
        let p = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../traces").join(name);
        assert!(p.is_dir(), "the recorded trace {} is missing: it is part of the repository (traces/)", p.display());
        p
    }

    fn args(dir: PathBuf, impl_name: &str) -> ReplayArgs {
        ReplayArgs { run_dir: dir, impl_name: impl_name.into(), threads: 1, runners: 0, json: false, nodesize: None }
    }

    fn load(dir: &std::path::Path, name: &str) -> Segment {
        load_segment(dir, name, &dir.join("events").join(format!("{name}.tsv.gz")), None).unwrap()
    }

    #[test]
    fn unreadable_input_and_unknown_impl_exit_2() {
        assert_eq!(run(&args(PathBuf::from("/nonexistent/run"), "locked")), 2);
        assert_eq!(run(&args(PathBuf::from("."), "frob")), 2);
        let d = scratch("run-dir");
        std::fs::create_dir_all(d.join("events")).unwrap();
        std::fs::create_dir_all(d.join("extents")).unwrap();
        let item = r#"{"bytenr":8192,"item":"METADATA_ITEM","num_bytes":null,"refs":1,"gen":6,"flags":"TREE_BLOCK","level":0,"backrefs":[{"type":"TREE_BLOCK_REF","root":5,"count":1,"inline":true}]}"#;
        std::fs::write(d.join("extents/00_mkfs.jsonl.gz"), gz(&format!("{item}\n"))).unwrap();
        std::fs::write(d.join("extents/01_p.jsonl.gz"), gz(&format!("{item}\n"))).unwrap();
        let header = format!("#{}", events::COLUMNS.join("\t"));
        let marker = format!("0\t1.0\t0\t1\tsh\tmarker{}\tphase", "\t-".repeat(12));
        std::fs::write(d.join("events/01_p.tsv.gz"), gz(&format!("{header}\n{marker}\n"))).unwrap();
        assert_eq!(run(&args(d.clone(), "locked")), 2, "a skinny item and no node size");
        assert_eq!(run(&ReplayArgs { nodesize: Some(4096), ..args(d.clone(), "locked") }), 0, "--nodesize");
        assert_eq!(run(&ReplayArgs { nodesize: Some(6000), ..args(d.clone(), "locked") }), 2, "not a node size");
        std::fs::create_dir_all(d.join("raw")).unwrap();
        std::fs::write(d.join("raw/mkfs.txt.gz"), gz("Node size:          4096\n")).unwrap();
        assert_eq!(run(&args(d.clone(), "locked")), 0, "an empty segment matches");
        std::fs::write(d.join("events/01_p.tsv.gz"), gz(&format!("{header}\n{marker}\nnot an event\n"))).unwrap();
        assert_eq!(run(&args(d.clone(), "locked")), 2, "malformed line");
        let full = gz(&format!("{header}\n{}", format!("{marker}\n").repeat(2000)));
        std::fs::write(d.join("events/01_p.tsv.gz"), &full[..full.len() / 2]).unwrap();
        assert_eq!(run(&args(d.clone(), "locked")), 2, "truncated gzip");
        std::fs::write(d.join("events/01_p.tsv.gz"), gz(&format!("{header}\n{marker}\n"))).unwrap();
        std::fs::remove_file(d.join("extents/01_p.jsonl.gz")).unwrap();
        assert_eq!(run(&args(d, "locked")), 2, "missing after-dump");
    }

    /// Where a synthetic run says its node size.
    #[derive(Clone, Copy)]
    enum Says {
        Mkfs,
        Events,
        Option,
    }

    /// A one-segment run on a filesystem with node size `ns`: a new tree
    /// block replaces an old one (both `ns` bytes, the old one a skinny item
    /// in the before-dump), the kernel runs both, an event the replay does
    /// not know is in the middle; replayed sequentially and concurrently with
    /// both implementations, it must match fully.
    fn replays_with_nodesize(ns: u64, says: Says) {
        let d = scratch(&format!("nodesize-{ns}"));
        for sub in ["events", "extents", "raw"] {
            std::fs::create_dir_all(d.join(sub)).unwrap();
        }
        let (old, new) = (ns * 64, ns * 80);
        let item = |b: u64| {
            format!(
                r#"{{"bytenr":{b},"item":"METADATA_ITEM","num_bytes":null,"refs":1,"gen":6,"flags":"TREE_BLOCK","level":0,"backrefs":[{{"type":"TREE_BLOCK_REF","root":5,"count":1,"inline":true}}]}}"#
            )
        };
        std::fs::write(d.join("extents/00_mkfs.jsonl.gz"), gz(&format!("{}\n", item(old)))).unwrap();
        std::fs::write(d.join("extents/01_p.jsonl.gz"), gz(&format!("{}\n", item(new)))).unwrap();
        let header = format!("#{}", events::COLUMNS.join("\t"));
        let row = |idx: u32, pid: u32, event: &str, cols: String| format!("{idx}\t1.0\t0\t{pid}\tx\t{event}\t{cols}");
        let head = |b: u64, action: &str| format!("{b}\t{ns}\t{action}\t-\t-\t-\t-\t-\t-\t-\t0\t-\t-");
        let tref = |b: u64, action: &str| format!("{b}\t{ns}\t{action}\t0\t5\t0\t-\t-\tTREE_BLOCK_REF\t0\t0\t-\t-");
        let lines = [
            row(1, 10, "add_delayed_ref_head", head(new, "ADD_DELAYED_EXTENT")),
            row(2, 10, "add_delayed_tree_ref", tref(new, "ADD_DELAYED_REF")),
            row(3, 10, "sched_switch", format!("{}-", "-\t".repeat(12))),
            row(4, 10, "add_delayed_ref_head", head(old, "DROP_DELAYED_REF")),
            row(5, 10, "add_delayed_tree_ref", tref(old, "DROP_DELAYED_REF")),
            row(6, 11, "run_delayed_tree_ref", tref(new, "ADD_DELAYED_REF")),
            row(7, 11, "run_delayed_ref_head", format!("{new}\t{ns}\t{}-", "-\t".repeat(10))),
            row(8, 11, "run_delayed_tree_ref", tref(old, "DROP_DELAYED_REF")),
            row(9, 11, "kp_free_extent", format!("{old}\t{ns}\t-\t0\t5\t-\t-\t-\t-\t-\t0\t1\t-")),
            row(10, 11, "run_delayed_ref_head", format!("{old}\t{ns}\t{}-", "-\t".repeat(10))),
            row(11, 11, "btrfs_transaction_commit", format!("{}gen=7", "-\t".repeat(12))),
        ];
        std::fs::write(d.join("events/01_p.tsv.gz"), gz(&format!("{header}\n{}\n", lines.join("\n")))).unwrap();
        let mut a = args(d.clone(), "both");
        match says {
            Says::Mkfs => {
                std::fs::write(d.join("raw/mkfs.txt.gz"), gz(&format!("Node size:          {ns}\n"))).unwrap()
            }
            Says::Events => {}
            Says::Option => a.nodesize = Some(ns),
        }
        let Run { segments, nodesize, .. } = load_run(&d, a.nodesize).unwrap();
        assert_eq!(nodesize.map(|n| n.bytes), Some(ns));
        assert_eq!(segments[0].before[&old].num_bytes, ns);
        assert_eq!(segments[0].other_events.get("sched_switch"), Some(&1));
        for (threads, runners) in [(1, 0), (4, 2)] {
            assert_eq!(run(&ReplayArgs { threads, runners, ..a.clone() }), 0, "{ns} {threads}/{runners}");
        }
        let s = &segments[0];
        for r in [
            replay_one::<LockedRefs>(s, Mode::Sequential, false),
            replay_one::<LockFreeRefs>(s, Mode::Sequential, false),
        ] {
            assert!(r.ok(), "{r:?}");
            assert_eq!((r.extents_matched, r.extents_total, r.kernel_runs_agree, r.kernel_runs), (2, 2, 2, 2));
        }
        // Another size contradicts the tree ref events.
        let other = if ns == 4096 { 8192 } else { ns / 2 };
        assert_eq!(run(&ReplayArgs { nodesize: Some(other), ..a }), 2);
    }

    #[test]
    fn nodesize_4k() {
        replays_with_nodesize(4096, Says::Mkfs);
    }

    #[test]
    fn nodesize_8k() {
        replays_with_nodesize(8192, Says::Events);
    }

    #[test]
    fn nodesize_16k() {
        replays_with_nodesize(16384, Says::Option);
    }

    #[test]
    fn nodesize_32k() {
        replays_with_nodesize(32768, Says::Mkfs);
    }

    #[test]
    fn nodesize_64k() {
        replays_with_nodesize(65536, Says::Events);
    }

    /// The comparison is not vacuous: taking calls out of a real segment's
    /// plan shows up as mismatches in both oracles.
    #[test]
    fn mutated_plans_mismatch() {
        let dir = trace("runB");
        let name = "04_p3_snap_reflink";
        let mut seg = load(&dir, name);
        let ok = replay_one::<LockedRefs>(&seg, Mode::Sequential, false);
        assert!(ok.ok(), "{:?} {:?}", ok.mismatches, ok.errors);
        assert_eq!(ok.kernel_runs_agree, ok.kernel_runs);

        // Without the extent ops, the FULL_BACKREF flags are missing.
        let mut no_ops = Segment { batches: seg.batches.clone(), ..load(&dir, name) };
        for b in &mut no_ops.batches {
            b.ops.retain(|o| !matches!(o.kind, OpKind::ExtentOp { .. }));
        }
        let r = replay_one::<LockedRefs>(&no_ops, Mode::Sequential, false);
        assert!(r.flag_mismatches > 0 && r.extents_matched < r.extents_total, "{r:?}");
        assert_eq!(r.backrefs_matched, r.backrefs_total);

        // Without the last plain add of a backref that survives the segment,
        // its count and the kernel's run of it disagree.
        let in_after = |o: &plan::Op| match o.kind {
            OpKind::Data { gref, .. } if gref.action == Action::Add => {
                seg.after.get(&o.bytenr).is_some_and(|it| it.backrefs.contains_key(&gref.ref_key()))
            }
            _ => false,
        };
        let (bi, oi) = seg
            .batches
            .iter()
            .enumerate()
            .rev()
            .find_map(|(bi, b)| b.ops.iter().rposition(in_after).map(|oi| (bi, oi)))
            .unwrap();
        seg.batches[bi].ops.remove(oi);
        let r = replay_one::<LockedRefs>(&seg, Mode::Sequential, false);
        assert!(r.backrefs_matched < r.backrefs_total, "{r:?}");
        assert!(r.kernel_runs_disagree > 0, "{r:?}");
        assert!(!r.ok());
    }

    /// runC-sample's hold-back phase: the blockers, the kernel's seqs and
    /// the qgroup marks are all needed for a full match.
    #[test]
    fn runc_holdback_mutations_mismatch() {
        let dir = trace("runC-sample");
        let name = "10_p9_holdback";
        let seg = load(&dir, name);
        assert!(seg.stats.kernel_held_back > 0 && seg.stats.blocker_gets > 0 && seg.stats.qgroup_marked_heads > 0);
        let ok = replay_one::<LockedRefs>(&seg, Mode::Sequential, true);
        assert!(ok.ok(), "{:?} {:?}", ok.mismatches, ok.errors);
        assert!(ok.engine.held_back > 0 && ok.engine.checks_kernel_held > 0, "{:?}", ok.engine);
        assert_eq!((ok.engine.checks_agree, ok.engine.seq_violations), (ok.engine.checks, 0));

        // Without the blockers the kernel's hold-backs are not reproduced,
        // and nothing is held back.
        let mut no_blockers = load(&dir, name);
        for b in &mut no_blockers.batches {
            b.ops.retain(|o| !matches!(o.kind, OpKind::GetSeq { .. } | OpKind::PutSeq { .. }));
        }
        let r = replay_one::<LockedRefs>(&no_blockers, Mode::Sequential, true);
        assert_eq!(r.engine.checks - r.engine.checks_agree, r.engine.checks_kernel_held, "{:?}", r.engine);
        assert_eq!(r.engine.held_back, 0);
        assert!(!r.ok());

        // Refs queued with seq 0 instead of the kernel's: checks of their
        // seqs still agree (the tracker follows the blockers), but the
        // implementation holds back nothing.
        let mut zero = load(&dir, name);
        for b in &mut zero.batches {
            for o in &mut b.ops {
                o.seq = 0;
            }
        }
        let r = replay_one::<LockedRefs>(&zero, Mode::Sequential, true);
        assert_eq!(r.engine.held_back, 0, "{:?}", r.engine);

        // Without one qgroup mark, that head gets no record.
        let mut unmarked = load(&dir, name);
        let b = unmarked.batches.iter_mut().find(|b| !b.qgroup.is_empty()).unwrap();
        let bytenr = *b.qgroup.keys().next().unwrap();
        for o in &mut b.ops {
            if o.bytenr == bytenr {
                match &mut o.kind {
                    OpKind::Tree { gref, .. } | OpKind::Data { gref, .. } => gref.skip_qgroup = true,
                    _ => {}
                }
            }
        }
        let r = replay_one::<LockFreeRefs>(&unmarked, Mode::Sequential, true);
        assert_eq!(r.engine.qgroup_total - r.engine.qgroup_matched, 1, "{:?}", r.engine);
        assert!(!r.ok());
    }
}
