//! `stress --faults`, `--throttle` and the watchdog, through the binary: a
//! run under injected faults ends OK with the faults reported; a backend
//! call that never returns ends the run with exit code 3 and the claimed
//! head printed, well before the test's own timeout.

use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::Value;

fn stress(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_delayed-refs-stress")).arg("stress").args(args).output().expect("runs")
}

#[test]
fn faults_are_retried_to_a_clean_verdict() {
    let out = stress(&[
        "--impl",
        "both",
        "--workload",
        "mixed",
        "--threads",
        "3",
        "--seconds",
        "1",
        "--faults",
        "50",
        "--seed",
        "3",
        "--json",
    ]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["verdict"], "OK");
    assert_eq!(v["faults"], 50);
    for r in v["results"].as_array().unwrap() {
        assert_eq!((r["lost_updates"].as_u64(), r["doubled_updates"].as_u64()), (Some(0), Some(0)));
        assert!(r["faults_injected_errors"].as_u64().unwrap() > 0, "{r}");
        assert!(r["faults_injected_panics"].as_u64().unwrap() > 0, "{r}");
    }
}

#[test]
fn throttled_adders_report_it() {
    let out = stress(&[
        "--impl",
        "lockfree",
        "--workload",
        "hot",
        "--threads",
        "2",
        "--seconds",
        "1",
        "--throttle",
        "64",
        "--json",
    ]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["throttle"], 64);
    assert!(v["results"][0]["throttled"].as_u64().unwrap() > 0, "{v}");
}

#[test]
fn a_stalled_backend_call_is_a_failure_with_the_claimed_heads() {
    let t = Instant::now();
    let mut child = Command::new(env!("CARGO_BIN_EXE_delayed-refs-stress"))
        .args(["stress", "--impl", "lockfree", "--workload", "spread", "--threads", "2", "--seconds", "1"])
        .args(["--stall-at", "200", "--watchdog", "2"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("runs");
    // A broken watchdog would hang the run: this test fails instead.
    while child.try_wait().unwrap().is_none() {
        if t.elapsed() > Duration::from_secs(60) {
            let _ = child.kill();
            panic!("the stalled run did not end within 60 s: the watchdog did not fire");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "{err}");
    assert!(err.contains("stress: stall:"), "{err}");
    assert!(err.contains("claimed heads") && err.contains("  head 0x"), "the stalled runner's head is named: {err}");
    assert!(t.elapsed() < Duration::from_secs(60), "the watchdog fired late: {:?}", t.elapsed());
}
