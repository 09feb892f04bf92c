//! Replays every segment of the recorded kernel trace runB (4 KiB nodes, no
//! quotas, no tree-mod-log users) through the stress binary
//! (`delayed-refs-stress replay`), sequentially and with 4 concurrent adders
//! and 2 runners, with both implementations, and requires a full match with
//! the kernel's extent trees and runs. The trace is part of the repository
//! (`traces/runB`); a missing trace fails the test.
//!
//! Each replay takes about a second in release mode; CI runs
//! `cargo test --workspace --release`.

mod replay_support;

use replay_support::{Expect, check, replay, trace};

/// The figures of runB (its README and validation.json).
const RUNB: Expect<'static> = Expect {
    replay: "replay: extents 34398/34398 backrefs 54106/54106",
    kernel_runs: "kernel-runs: agree 46741/46741",
    hold_backs: "hold-backs: decisions agree 0/0",
    qgroup: "qgroup-records: matched 0/0",
    held_back_some: false,
};

#[test]
fn runb_replays_with_locked() {
    check(&trace("runB"), "locked", &RUNB);
}

#[test]
fn runb_replays_with_lockfree() {
    check(&trace("runB"), "lockfree", &RUNB);
}

#[test]
fn runb_node_size_is_read_from_mkfs() {
    let (code, stdout, stderr) = replay(&trace("runB"), &["--impl", "locked", "--threads", "1", "--runners", "0"]);
    assert_eq!(code, 0, "{stdout}\n{stderr}");
    assert!(
        stdout.lines().any(|l| l.starts_with("node size: 4096 bytes (from ") && l.contains("mkfs.txt.gz")),
        "{stdout}"
    );
    // Overriding it with another size contradicts the tree ref events.
    let (code, _, stderr) = replay(&trace("runB"), &["--impl", "locked", "--nodesize", "16384"]);
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("tree ref event of 4096 bytes, but the node size is 16384"), "{stderr}");
}

#[test]
fn unreadable_input_exits_2_naming_file_and_line() {
    let dir = trace("runB");
    let tmp = std::env::temp_dir().join(format!("replay-runb-bad-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    for sub in ["events", "extents", "raw"] {
        std::fs::create_dir_all(tmp.join(sub)).unwrap();
    }
    for d in ["00_mkfs", "01_p0_mount"] {
        let name = format!("{d}.jsonl.gz");
        std::fs::copy(dir.join("extents").join(&name), tmp.join("extents").join(&name)).unwrap();
    }
    std::fs::copy(dir.join("raw/mkfs.txt.gz"), tmp.join("raw/mkfs.txt.gz")).unwrap();
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
