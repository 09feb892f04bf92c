//! Trace replay (placeholder until the replay module lands).

use std::path::PathBuf;

/// Arguments of `replay`.
pub struct ReplayArgs {
    /// The recorded run directory.
    pub run_dir: PathBuf,
    /// `lockfree`, `locked` or `both`.
    pub impl_name: String,
    /// Adder threads.
    pub threads: usize,
    /// Runner threads.
    pub runners: usize,
    /// Print JSON.
    pub json: bool,
}

/// Replay a run directory; returns the exit code.
pub fn run(args: &ReplayArgs) -> i32 {
    let _ = (&args.run_dir, &args.impl_name, args.threads, args.runners, args.json);
    eprintln!("replay: not yet implemented");
    2
}
