//! Replays every segment of the recorded kernel trace runB through the stress
//! binary (`delayed-refs-stress replay`), sequentially and with concurrent
//! adders and a runner, and requires a full match with the kernel's extent
//! trees and runs. The traces live beside the repository
//! (`../shared/traces/runB` from the workspace root); when they are missing
//! the test says so loudly and passes.
//!
//! A full replay takes well under a second in release mode and a few seconds
//! in debug; CI runs `cargo test --workspace --release`.

use std::path::PathBuf;
use std::process::Command;

/// The figures of runB (its README and validation.json).
const FULL_MATCH: &str = "replay: extents 34398/34398 backrefs 54106/54106";
const KERNEL_RUNS: &str = "kernel-runs: agree 46741/46741";

fn runb() -> Option<PathBuf> {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../shared/traces/runB");
    if p.is_dir() {
        Some(p)
    } else {
        eprintln!(
            "\n!!!!!!!! SKIPPED: trace directory {} not found; the runB replay test did not run !!!!!!!!\n",
            p.display()
        );
        None
    }
}

/// Run `replay` and return (exit code, stdout, stderr).
fn replay(dir: &PathBuf, args: &[&str]) -> (i32, String, String) {
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

fn check(dir: &PathBuf, impl_name: &str) {
    for mode in [&["--threads", "1", "--runners", "0"][..], &["--threads", "2", "--runners", "1"][..]] {
        let mut args = vec!["--impl", impl_name];
        args.extend_from_slice(mode);
        let (code, stdout, stderr) = replay(dir, &args);
        let ctx = format!("replay {args:?}\n--- stdout\n{stdout}\n--- stderr\n{stderr}");
        assert_eq!(code, 0, "{ctx}");
        assert_eq!(stdout.lines().last(), Some(FULL_MATCH), "{ctx}");
        assert_eq!(stdout.lines().filter(|l| l.starts_with("replay: ")).count(), 1, "{ctx}");
        assert!(stdout.lines().any(|l| l.starts_with(KERNEL_RUNS)), "{ctx}");
    }
}

#[test]
fn runb_replays_with_locked() {
    let Some(dir) = runb() else { return };
    check(&dir, "locked");
}

#[test]
fn runb_replays_with_lockfree() {
    let Some(dir) = runb() else { return };
    check(&dir, "lockfree");
}

#[test]
fn unreadable_input_exits_2_naming_file_and_line() {
    let Some(dir) = runb() else { return };
    let tmp = std::env::temp_dir().join(format!("replay-runb-bad-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(tmp.join("events")).unwrap();
    std::fs::create_dir_all(tmp.join("extents")).unwrap();
    for d in ["00_mkfs", "01_p0_mount"] {
        let name = format!("{d}.jsonl.gz");
        std::fs::copy(dir.join("extents").join(&name), tmp.join("extents").join(&name)).unwrap();
    }
    let events = std::fs::read(dir.join("events/01_p0_mount.tsv.gz")).unwrap();
    let target = tmp.join("events/01_p0_mount.tsv.gz");

    std::fs::write(&target, &events).unwrap();
    let (code, stdout, _) = replay(&tmp, &["--impl", "locked", "--threads", "1", "--runners", "0"]);
    assert_eq!(code, 0, "{stdout}");

    std::fs::write(&target, &events[..events.len() / 2]).unwrap();
    let (code, _, stderr) = replay(&tmp, &["--impl", "locked"]);
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("01_p0_mount.tsv.gz:"), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    let _ = std::fs::remove_dir_all(&tmp);
}
