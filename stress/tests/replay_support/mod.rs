//! Shared by the replay tests: where the recorded traces are (in the
//! repository, `traces/`), and running `delayed-refs-stress replay`.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;

/// A recorded run kept in the repository (`traces/<name>`). A missing trace
/// fails the test: the traces are part of the repository, so a clone without
/// them is broken, not a reason to skip.
pub fn trace(name: &str) -> PathBuf {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..").join("traces").join(name);
    assert!(
        p.join("events").is_dir() && p.join("extents").is_dir(),
        "the recorded trace {} is missing (events/ and extents/ expected): the traces live in the repository \
         under traces/ (see traces/README.md); restore them (git checkout -- traces) and run the tests again",
        p.display()
    );
    p
}

/// Run `replay` and return (exit code, stdout, stderr).
pub fn replay(dir: &Path, args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_delayed-refs-stress"))
        .arg("replay")
        .arg(dir)
        .args(args)
        .output()
        .expect("the stress binary runs");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The modes every recording is replayed in: sequential, and 4 adders with 2 runners.
pub const MODES: [&[&str]; 2] = [&["--threads", "1", "--runners", "0"], &["--threads", "4", "--runners", "2"]];

/// What a full match of one implementation prints.
pub struct Expect<'a> {
    /// The last line.
    pub replay: &'a str,
    /// A line starting with this (the kernel runs).
    pub kernel_runs: &'a str,
    /// A line starting with this (hold-back decisions).
    pub hold_backs: &'a str,
    /// A line starting with this (qgroup records).
    pub qgroup: &'a str,
    /// Whether the implementation must have held back at least one head, and
    /// run refs while a blocker was live (false: neither).
    pub held_back_some: bool,
}

/// The number after `what` in `line`.
fn number_after(line: &str, what: &str) -> Option<u64> {
    let rest = &line[line.find(what)? + what.len()..];
    rest.split(|c: char| !c.is_ascii_digit()).next()?.parse().ok()
}

/// Replay `dir` with `impl_name` in every mode and require a full match.
pub fn check(dir: &Path, impl_name: &str, want: &Expect<'_>) {
    for mode in MODES {
        let mut args = vec!["--impl", impl_name];
        args.extend_from_slice(mode);
        let (code, stdout, stderr) = replay(dir, &args);
        let ctx = format!("replay {} {args:?}\n--- stdout\n{stdout}\n--- stderr\n{stderr}", dir.display());
        assert_eq!(code, 0, "{ctx}");
        assert_eq!(stdout.lines().last(), Some(want.replay), "{ctx}");
        assert_eq!(stdout.lines().filter(|l| l.starts_with("replay: ")).count(), 1, "{ctx}");
        for prefix in [want.kernel_runs, want.hold_backs, want.qgroup] {
            assert!(stdout.lines().any(|l| l.starts_with(prefix)), "no line starting with {prefix:?}\n{ctx}");
        }
        let hb = stdout.lines().find(|l| l.starts_with("hold-backs: ")).unwrap_or_default();
        assert_eq!(number_after(hb, "runs past a live blocker "), Some(0), "{ctx}");
        let held = number_after(hb, "the implementation held back ").unwrap_or(0);
        assert_eq!(held > 0, want.held_back_some, "{ctx}");
        // The run check had runs to check: some ran while a blocker was live.
        let under = number_after(hb, "runs past a live blocker 0 of ").unwrap_or(0);
        assert_eq!(under > 0, want.held_back_some, "{ctx}");
        assert!(!stderr.contains("panicked"), "{ctx}");
    }
}
