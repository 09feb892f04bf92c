//! `delayed-refs-stress`: concurrent stress workloads checked against an
//! oracle, trace replay, and memory measurement, for the delayed-refs
//! implementations.
//!
//! ```text
//! delayed-refs-stress stress [--impl lockfree|locked|sharded|both|all]
//!                            [--workload spread|drain|hot|add-only|wide|mixed]
//!                            [--threads N] [--runners M] [--readers R] [--seconds S] [--heads K] [--seed X]
//!                            [--rounds N] [--json]
//! delayed-refs-stress replay <run-dir> [--impl lockfree|locked|sharded|both|all] [--threads N] [--runners M]
//!                            [--nodesize BYTES] [--json]
//! delayed-refs-stress mem [--impl lockfree|locked|sharded|both|all] [--refs R] [--heads H] [--json]
//! ```
//!
//! Exit codes: 0 all checks passed, 1 a violation, 2 a usage error or an
//! implementation that is not available.

// Only the global allocator (`alloc`) needs unsafe code.
#![deny(unsafe_code)]

#[macro_use]
mod out;

mod alloc;
mod backend;
mod check;
mod cli;
mod faults;
mod impls;
mod mem;
mod memwatch;
mod noop;
mod oracle;
mod progress;
mod replay;
mod report;
mod stats;
mod stress;
mod workloads;

use clap::Parser;

use cli::{Cli, Command};

fn main() {
    let cli = Cli::parse();
    let code = match cli.command {
        None => stress::run(&cli::StressArgs::default()),
        Some(Command::Stress(args)) => stress::run(&args),
        Some(Command::Mem(args)) => mem::run(&args),
        Some(Command::Replay(a)) => replay::run(&replay::ReplayArgs {
            run_dir: a.run_dir,
            impl_name: a.impl_choice.as_str().to_string(),
            threads: a.threads,
            runners: a.runners,
            json: a.json,
            nodesize: a.nodesize,
        }),
    };
    std::process::exit(code);
}
