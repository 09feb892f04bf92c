//! The `stress` subcommand: resolve the parameters, run short rounds of the
//! selected implementations interleaved (locked, lockfree, locked, ...; with
//! `--impl all` locked, sharded, lockfree, locked, ...), report medians, the
//! lock-free ratio against each selected baseline with its per-round spread,
//! and a verdict, and watch the live heap meanwhile ([`crate::memwatch`]).

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use delayed_refs::DelayedRefs;
use indicatif::ProgressBar;

use crate::cli::{ImplChoice, StressArgs, WorkloadKind};
use crate::impls::{self, ImplVisitor};
use crate::memwatch::{self, MemWatch};
use crate::progress::Progress;
use crate::report::{self, Header, ImplRun, MemFigures, Summary};
use crate::stats::RoundResult;
use crate::workloads::{self, Params};

/// Most adder threads (the bytenr layout gives each one a 2^36-extent range).
const MAX_THREADS: usize = 4000;

/// Most reader threads.
const MAX_READERS: usize = 256;

/// Most rounds chosen by default.
const MAX_DEFAULT_ROUNDS: usize = 20;

/// Exit code for a violation.
const EXIT_FAIL: i32 = 1;

/// Exit code for a usage error or a missing implementation.
const EXIT_USAGE: i32 = 2;

/// One round of the workload with whichever implementation dispatch picks.
struct RoundVisitor<'a> {
    params: &'a Params,
    seed: u64,
    bar: &'a ProgressBar,
}

impl ImplVisitor for RoundVisitor<'_> {
    type Output = RoundResult;

    fn visit<D: DelayedRefs>(self) -> RoundResult {
        workloads::run_round::<D>(self.params, self.seed, self.bar)
    }
}

/// How often `stress` prints a `mem` line: every max(1, S/20) seconds.
fn mem_interval(seconds: f64) -> Duration {
    Duration::from_secs_f64((seconds / 20.0).max(1.0))
}

/// Print a round's first linearizability violations to stderr (above the
/// progress bar when one is shown).
fn report_lin(bar: &ProgressBar, label: &str, res: &RoundResult) {
    let n = res.violations.linearizability;
    if n == 0 {
        return;
    }
    let say = |text: String| if bar.is_hidden() { eprintln!("{text}") } else { bar.println(text) };
    say(format!(
        "linearizability: {label}: {n} of {} reads checked returned a count never held during the read",
        res.lin.reads_checked
    ));
    for s in &res.lin.samples {
        say(format!("linearizability:   {s}"));
    }
}

/// Check the flags and fill in per-workload defaults.
fn resolve(args: &StressArgs) -> Result<(Params, Header), String> {
    if args.threads == 0 || args.threads > MAX_THREADS {
        return Err(format!("--threads must be in 1..={MAX_THREADS}"));
    }
    if !(args.seconds.is_finite() && args.seconds > 0.0) {
        return Err("--seconds must be a positive number".into());
    }
    let w = args.workload;
    let runners = match w {
        WorkloadKind::AddOnly => {
            if args.runners.is_some_and(|r| r != 0) {
                eprintln!("stress: add-only runs no runner; --runners ignored");
            }
            0
        }
        WorkloadKind::Wide => args.runners.unwrap_or(0),
        WorkloadKind::Drain => args.runners.unwrap_or(1).max(1),
        _ => args.runners.unwrap_or(1),
    };
    // Readers by default wherever adders and runners run at once.
    let overlap = runners > 0 && w != WorkloadKind::Drain;
    let readers = args.readers.unwrap_or(usize::from(overlap));
    if readers > MAX_READERS {
        return Err(format!("--readers must be at most {MAX_READERS}"));
    }
    let heads = args.heads.unwrap_or(match w {
        WorkloadKind::Hot | WorkloadKind::Wide => 1,
        _ => 10_000,
    });
    if heads == 0 || args.keys == 0 {
        return Err("--heads and --keys must be at least 1".into());
    }
    let rounds = match args.rounds {
        Some(0) => return Err("--rounds must be at least 1".into()),
        Some(r) => r,
        None => (args.seconds.round() as usize).clamp(1, MAX_DEFAULT_ROUNDS),
    };
    let seed = args
        .seed
        .unwrap_or_else(|| SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or(0x5eed));
    let params = Params {
        workload: w,
        threads: args.threads,
        runners,
        readers,
        heads,
        keys: args.keys,
        round: Duration::from_secs_f64(args.seconds / rounds as f64),
        faults: args.faults,
        throttle: args.throttle,
        watchdog: Duration::from_secs(args.watchdog.max(1)),
        backend: args.backend,
        stall_at: args.stall_at,
    };
    let header = Header {
        workload: w.as_str(),
        threads: args.threads,
        runners,
        readers,
        seconds: args.seconds,
        heads,
        keys: args.keys,
        rounds,
        seed,
        faults: args.faults,
        throttle: args.throttle,
        backend: args.backend.as_str(),
    };
    Ok((params, header))
}

/// Lock-free's ratio against each baseline `choice` selected with it
/// (`both`: locked; `all`: locked and sharded), from rounds of the same run.
/// A selected pair with an implementation unavailable gives a ratio of n/a.
fn ratios(choice: ImplChoice, runs: &[ImplRun]) -> report::Ratios {
    let selected = |n: &str| choice.names().contains(&n) && choice.names().contains(&"lockfree");
    let find = |n: &str| runs.iter().find(|r| r.name == n);
    let against = |baseline: &str| {
        selected(baseline).then(|| match find(baseline).zip(find("lockfree")) {
            Some((b, f)) => report::Ratio::of(b, f),
            None => report::Ratio::default(),
        })
    };
    report::Ratios { over_locked: against("locked"), over_sharded: against("sharded") }
}

/// The median over `header.rounds` rounds (same seeds as the
/// implementations') of the no-op root's throughput: the harness's own
/// cost (module `noop`). Its zero-loss checks fail by construction and are
/// not reported.
fn harness_ops_per_sec(params: &Params, header: &Header, progress: &Progress) -> f64 {
    let mut ops: Vec<f64> = (0..header.rounds)
        .map(|r| {
            let seed = header.seed.wrapping_add((r as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15));
            let bar = progress.phase(&format!("noop {} {}/{}", header.workload, r + 1, header.rounds), params.round);
            let res = RoundVisitor { params, seed, bar: &bar }.visit::<crate::noop::NoopRefs>();
            bar.finish_with_message("harness");
            res.ops_per_sec()
        })
        .collect();
    ops.sort_by(f64::total_cmp);
    ops[ops.len() / 2]
}

/// Run `stress` and return the process exit code.
pub fn run(args: &StressArgs) -> i32 {
    if args.faults > 0 {
        // Injected panics are caught and retried: their reports would bury
        // the output (a real panic still reports).
        delayed_refs::InjectedPanic::silence_reports();
    }
    let (params, header) = match resolve(args) {
        Ok(x) => x,
        Err(msg) => {
            eprintln!("stress: {msg}");
            return EXIT_USAGE;
        }
    };
    let (avail, unavail): (Vec<&'static str>, Vec<&'static str>) =
        args.impl_choice.names().iter().copied().partition(|n| impls::is_available(n));
    for n in &unavail {
        eprintln!("stress: {}", impls::unavailable_message(n));
    }
    if avail.is_empty() {
        return EXIT_USAGE;
    }
    let progress = Progress::new(args.json);
    let mut runs: Vec<ImplRun> = avail.iter().map(|&name| ImplRun::new(name)).collect();
    let expected = Duration::from_secs_f64(args.seconds * runs.len() as f64);
    let watch = MemWatch::start(runs.len(), expected, mem_interval(args.seconds), progress.enabled());
    for r in 0..header.rounds {
        let seed = header.seed.wrapping_add((r as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15));
        for (i, run) in runs.iter_mut().enumerate() {
            let label = format!("{} {} {}/{}", run.name, header.workload, r + 1, header.rounds);
            let bar = progress.phase(&label, params.round);
            watch.enter(i, run.name, r + 1, header.rounds, &bar);
            let v = RoundVisitor { params: &params, seed, bar: &bar };
            let res = impls::with_impl(run.name, v).expect("only available implementations are run");
            watch.leave();
            report_lin(&bar, &label, &res);
            bar.finish_with_message(if res.violations.is_ok() { "ok" } else { "FAIL" });
            run.push(res);
        }
    }
    let seen = watch.finish();
    let sums: Vec<Summary> = runs
        .iter()
        .enumerate()
        .map(|(i, run)| {
            let (ends, retained) = (run.mem_ends(), run.mem_retained());
            let rm = memwatch::RoundMem { ends: &ends, floors: &run.floors, retained: &retained };
            let flatness = memwatch::flatness(&seen.series, i, rm);
            let mem = MemFigures {
                mem_peak_bytes: seen.peaks[i].max(ends.iter().copied().max().unwrap_or(0)),
                mem_end_bytes: ends.last().copied().unwrap_or(0),
                mem_flat: flatness.flat,
                mem_flatness: flatness,
                mem_round_end_bytes: ends,
                mem_round_floor_bytes: run.floors.clone(),
                mem_round_root_retained_bytes: retained,
            };
            Summary::of(run, mem)
        })
        .collect();
    let ratios = ratios(args.impl_choice, &runs);
    let all = report::total(&sums);
    let harness =
        args.harness_cost.then(|| report::Harness::of(harness_ops_per_sec(&params, &header, &progress), &sums));
    if args.json {
        outln!("{}", report::json(&header, &sums, &unavail, &ratios, harness.as_ref()));
    } else {
        if args.details {
            out!("{}", report::table(&header, &sums, &unavail, &ratios));
        } else {
            out!("{}", report::short_table(&header, &sums, &unavail, &ratios));
        }
        if let Some(h) = &harness {
            outln!("{}", h.line());
        }
        if args.faults > 0 || args.throttle.is_some() {
            for s in &sums {
                outln!(
                    "{}: injected {} errors, {} panics, {} pauses (each retried); adders throttled {} times",
                    s.impl_name,
                    s.faults_injected_errors,
                    s.faults_injected_panics,
                    s.faults_pauses,
                    s.throttled
                );
            }
        }
        for m in &all.messages {
            eprintln!("violation: {m}");
        }
        outln!("{}", report::verdict_line(&all));
    }
    if all.is_ok() { 0 } else { EXIT_FAIL }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_follow_the_workload() {
        let mut a = StressArgs::default();
        let (p, h) = resolve(&a).unwrap();
        assert_eq!((p.threads, p.runners, p.readers, p.heads, h.rounds), (2, 1, 1, 10_000, 4));
        a.workload = WorkloadKind::Hot;
        assert_eq!(resolve(&a).unwrap().0.heads, 1);
        for (w, readers) in [(WorkloadKind::Wide, 0), (WorkloadKind::Drain, 0), (WorkloadKind::Mixed, 1)] {
            a.workload = w;
            assert_eq!(resolve(&a).unwrap().0.readers, readers, "{w:?}");
        }
        a.workload = WorkloadKind::Wide;
        a.runners = Some(1);
        assert_eq!(resolve(&a).unwrap().0.readers, 1);
        a.readers = Some(0);
        assert_eq!(resolve(&a).unwrap().0.readers, 0);
        a.readers = Some(MAX_READERS + 1);
        assert!(resolve(&a).is_err());
        a.readers = None;
        a.workload = WorkloadKind::AddOnly;
        a.runners = Some(3);
        assert_eq!((resolve(&a).unwrap().0.runners, resolve(&a).unwrap().0.readers), (0, 0));
        a.threads = 0;
        assert!(resolve(&a).is_err());
    }

    #[test]
    fn ratios_follow_the_choice() {
        let runs: Vec<ImplRun> = ImplChoice::All.names().iter().map(|&n| ImplRun::new(n)).collect();
        let r = ratios(ImplChoice::Both, &runs);
        assert!(r.over_locked.is_some() && r.over_sharded.is_none());
        let r = ratios(ImplChoice::All, &runs);
        assert!(r.over_locked.is_some() && r.over_sharded.is_some());
        // No rounds yet: selected, but n/a.
        assert_eq!(r.over_sharded.unwrap().median, None);
        for c in [ImplChoice::Lockfree, ImplChoice::Locked, ImplChoice::Sharded] {
            assert_eq!(ratios(c, &runs), report::Ratios::default(), "{c:?}");
        }
        assert_eq!(ImplChoice::All.names(), ["locked", "sharded", "lockfree"]);
        assert!(ImplChoice::All.names().iter().all(|n| impls::is_available(n)));
    }
}
