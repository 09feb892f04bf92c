//! Command-line interface: subcommands, flags and their defaults.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

/// Stress, replay and memory tools for the delayed-refs implementations.
#[derive(Debug, Parser)]
#[command(name = "delayed-refs-stress", version, about)]
pub struct Cli {
    /// What to do; without a subcommand, `stress` runs with its defaults.
    #[command(subcommand)]
    pub command: Option<Command>,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run a concurrent workload and check the final extent tree against an oracle.
    ///
    /// Prints a short table (throughput, p99.9 latency, memory verdict and linearizability per
    /// implementation), lock-free's throughput ratio against each baseline as the median of the per-round
    /// ratios with their min-max, and one verdict line (`verdict: OK ...` or `verdict: FAIL ...`, which
    /// decides the exit code). `--details` prints the full tables instead of the short one.
    ///
    /// Also watches the live heap (the binary's counting allocator): a `mem t=..s live=.. MiB` line goes to
    /// stderr every max(1, S/20) seconds, and the results give per implementation a memory verdict (`flat`
    /// or `GROWS`, rule below; `--details`: the peak, the live bytes after each round's final run(All) +
    /// reclaim(), and what the root still held then beyond its fresh size). The memory verdict does not
    /// change the exit code.
    ///
    /// Reader threads (--readers) call lookup_extent_info on every 8th extent while the adders work. After
    /// each round a sample of their reads is checked for linearizability against a history of the adders'
    /// successful calls on those extents: a read must return a count the extent held at one instant while it
    /// ran. Reads checked and violations are reported per implementation (linearizability_* in --json); any
    /// violation fails the verdict, and the first few are printed to stderr (bytenr, value, allowed range).
    #[command(after_long_help = format!("Memory verdict: {}.", crate::memwatch::FLAT_DEFINITION))]
    Stress(StressArgs),
    /// Measure live heap bytes per pending ref and per head, and the return to baseline.
    #[command(long_about = MEM_LONG_ABOUT)]
    Mem(MemArgs),
    /// Replay a recorded kernel trace directory against the implementations.
    Replay(ReplayCliArgs),
}

/// Which implementations a command runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum ImplChoice {
    /// The lock-free implementation.
    Lockfree,
    /// The port with the kernel's locking.
    Locked,
    /// Both, interleaved in short rounds (locked, lockfree, locked, ...).
    Both,
    /// The locked port sharded by bytenr (`ShardedRefs`, 16 shards).
    Sharded,
    /// All three, interleaved in short rounds (locked, sharded, lockfree,
    /// locked, ...); lock-free's ratio is reported against both baselines.
    All,
}

impl ImplChoice {
    /// The implementation names this choice selects, in run order.
    pub fn names(self) -> &'static [&'static str] {
        match self {
            ImplChoice::Lockfree => &["lockfree"],
            ImplChoice::Locked => &["locked"],
            ImplChoice::Both => &["locked", "lockfree"],
            ImplChoice::Sharded => &["sharded"],
            ImplChoice::All => &["locked", "sharded", "lockfree"],
        }
    }

    /// The flag's spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            ImplChoice::Lockfree => "lockfree",
            ImplChoice::Locked => "locked",
            ImplChoice::Both => "both",
            ImplChoice::Sharded => "sharded",
            ImplChoice::All => "all",
        }
    }
}

/// The stress workloads (the W1-W4 of docs/benchmarks.md and two more).
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum WorkloadKind {
    /// W1: adders on random bytenrs over `--heads` heads, ~4 refs per head, runners retiring heads.
    Spread,
    /// W2: prefill `--heads` heads x 4 refs, then `--runners` threads drain everything.
    Drain,
    /// W3: every adder on one head (or `--heads 8`), runners retiring it.
    Hot,
    /// W4: merge throughput, adds and cancelling drops with no runner.
    AddOnly,
    /// Wide head: `--keys` distinct backref keys under one head.
    Wide,
    /// Adders and runners at once on data and tree refs, drops and extent ops.
    Mixed,
}

impl WorkloadKind {
    /// The flag's spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            WorkloadKind::Spread => "spread",
            WorkloadKind::Drain => "drain",
            WorkloadKind::Hot => "hot",
            WorkloadKind::AddOnly => "add-only",
            WorkloadKind::Wide => "wide",
            WorkloadKind::Mixed => "mixed",
        }
    }
}

/// Flags of `stress`.
#[derive(Clone, Debug, Args)]
pub struct StressArgs {
    /// Implementation(s) to run.
    #[arg(long = "impl", value_enum, default_value = "both")]
    pub impl_choice: ImplChoice,
    /// Workload.
    #[arg(long, value_enum, default_value = "spread")]
    pub workload: WorkloadKind,
    /// Adder threads (prefill threads for `drain`).
    #[arg(long, default_value_t = 2)]
    pub threads: usize,
    /// Runner threads [default: 1; 0 for `wide`; always 0 for `add-only`].
    #[arg(long)]
    pub runners: Option<usize>,
    /// Reader threads checked for linearizability (lookup_extent_info while adders and runners work; not
    /// counted in throughput) [default: 1 where adders and runners overlap (spread, mixed, hot, wide with
    /// --runners > 0); 0 for add-only, drain and wide without runners].
    #[arg(long)]
    pub readers: Option<usize>,
    /// Timed seconds per implementation, split into rounds.
    #[arg(long, default_value_t = 4.0)]
    pub seconds: f64,
    /// Heads (extents) [default: 10000; 1 for `hot` and `wide`].
    #[arg(long)]
    pub heads: Option<usize>,
    /// Distinct backref keys kept live by `wide` over all threads.
    #[arg(long, default_value_t = 10_000)]
    pub keys: usize,
    /// Rounds per implementation [default: about one per second].
    #[arg(long)]
    pub rounds: Option<usize>,
    /// Random seed [default: from the clock; printed].
    #[arg(long)]
    pub seed: Option<u64>,
    /// Print one JSON object on stdout instead of the table.
    #[arg(long)]
    pub json: bool,
    /// Print the full tables (latency percentiles, fairness, memory figures, linearizability per round)
    /// instead of the short one.
    #[arg(long)]
    pub details: bool,
    /// Also run the same rounds on a root that does nothing (`NoopRefs`) and
    /// report the harness's own cost per operation beside the
    /// implementations' (never part of the verdict).
    #[arg(long)]
    pub harness_cost: bool,
    /// Fault injection: about one backend call in N fails with a storage error, one in 7N panics, one in N
    /// pauses up to 200 us (a seeded hash of the call number, not a fixed period). Runners, readers and the final drain retry (the errors say Retry), so a round
    /// must still end with 0 lost / 0 doubled. 0: none. Throughput under faults is not a benchmark.
    #[arg(long, default_value_t = 0)]
    pub faults: u64,
    /// Backpressure mode: roots get this pending-entry limit (FsConfig::pending_limit), and every 32 adds an
    /// adder asks DelayedRefs::backpressure(); on Throttle it runs one head itself (run_one) before adding
    /// more, as a kernel transaction handle runs delayed refs when they pile up.
    #[arg(long)]
    pub throttle: Option<u64>,
    /// Seconds a phase may take past its end (joining the timed phase's threads, the final drain) before the
    /// run is declared stalled: the claimed heads are printed and the process exits with code 3.
    #[arg(long, default_value_t = 60)]
    pub watchdog: u64,
    /// Test the watchdog: backend call number N (counted as --faults counts them) never returns, so a runner
    /// stalls holding its head. The run must end with exit code 3 and the claimed heads printed.
    #[arg(long, default_value_t = 0)]
    pub stall_at: u64,
    /// The extent tree the runners apply refs to: the strict in-memory tree, or a redb database file
    /// (examples/redb_extent_tree: one transaction per head, a durable commit per run; disk-bound, so its
    /// throughput is not a benchmark of the roots).
    #[arg(long, value_enum, default_value = "mem")]
    pub backend: crate::backend::BackendKind,
}

impl Default for StressArgs {
    fn default() -> Self {
        StressArgs {
            impl_choice: ImplChoice::Both,
            workload: WorkloadKind::Spread,
            threads: 2,
            runners: None,
            readers: None,
            seconds: 4.0,
            heads: None,
            keys: 10_000,
            rounds: None,
            seed: None,
            json: false,
            details: false,
            harness_cost: false,
            faults: 0,
            throttle: None,
            watchdog: 60,
            stall_at: 0,
            backend: crate::backend::BackendKind::Mem,
        }
    }
}

/// `mem --help`: what the figures mean.
const MEM_LONG_ABOUT: &str = concat!(
    "Measure, for each implementation, live heap bytes per pending ref and per head, and whether a root \
     returns to its baseline once everything ran, with the binary's counting global allocator. \
     Single-threaded. Exit code 1 if a root does not return to its baseline.\n\n",
    "bytes: live heap bytes as requested from the global allocator (Layout::size), malloc headers and \
     rounding not included.\n\n",
    "bytes_per_ref: growth of live bytes while --refs refs with new keys are added to --refs/4 heads that \
     already exist (4 keys per head), divided by --refs.\n\n",
    "bytes_per_head: growth of live bytes while --heads new heads are created with exactly one ref each, \
     divided by --heads, minus bytes_per_ref.\n\n",
    "baseline_restored: live bytes and blocks after run(RunMode::All) into a fresh extent tree, reclaim() and \
     the drop of that tree equal those read right after the root was created and warmed up (an add, \
     run(All), reclaim() cycle on 64 extents per kind, so that every shard of a sharded root has been used, \
     then one more on one extent per kind).\n\n",
    "settled_restored: the same with one more reclaim() on each side (the baseline read after a second \
     reclaim(), the end read after a second reclaim()). Reported beside; the exit code follows \
     baseline_restored.\n\n",
    "The headline figures are for data refs; tree refs are reported beside them."
);

/// Flags of `mem`.
#[derive(Clone, Debug, Args)]
pub struct MemArgs {
    /// Implementation(s) to measure.
    #[arg(long = "impl", value_enum, default_value = "both")]
    pub impl_choice: ImplChoice,
    /// Refs with new keys added to existing heads, 4 per head (rounded up to a multiple of 4).
    #[arg(long, default_value_t = 100_000)]
    pub refs: usize,
    /// New heads created with one ref each.
    #[arg(long, default_value_t = 100_000)]
    pub heads: usize,
    /// Print one JSON object on stdout instead of the table.
    #[arg(long)]
    pub json: bool,
}

/// Flags of `replay`.
#[derive(Clone, Debug, Args)]
pub struct ReplayCliArgs {
    /// A recorded run directory (see the traces README).
    pub run_dir: PathBuf,
    /// Implementation(s) to replay against.
    #[arg(long = "impl", value_enum, default_value = "both")]
    pub impl_choice: ImplChoice,
    /// Adder threads.
    #[arg(long, default_value_t = 2)]
    pub threads: usize,
    /// Runner threads.
    #[arg(long, default_value_t = 1)]
    pub runners: usize,
    /// Print one JSON object on stdout.
    #[arg(long)]
    pub json: bool,
    /// Node size in bytes (4096 to 65536, a power of two) [default: the recording's: raw/mkfs.txt.gz
    /// "Node size", else the tree ref events' num_bytes]. Every tree ref event must agree with it.
    #[arg(long)]
    pub nodesize: Option<u64>,
}
