//! Replays the recorded kernel trace runC-sample (64 KiB nodes, quotas on,
//! tree-mod-log blockers, a phase where live blockers hold refs back)
//! through the stress binary, sequentially and with 4 concurrent adders and
//! 2 runners, with both implementations, and requires a full match: the
//! extent trees, the kernel's runs, the kernel's hold-back decisions (no run
//! past a live blocker) and the qgroup records of the heads the kernel
//! marked. The trace is part of the repository (`traces/runC-sample`); a
//! missing trace fails the test.

mod replay_support;

use replay_support::{Expect, check, replay, trace};

/// The figures of runC-sample (docs/replay.md).
const RUNC: Expect<'static> = Expect {
    replay: "replay: extents 11105/11105 backrefs 14693/14693",
    kernel_runs: "kernel-runs: agree 14246/14246",
    hold_backs: "hold-backs: decisions agree 7007/7007",
    qgroup: "qgroup-records: matched 7475/7475",
    held_back_some: true,
};

#[test]
fn runc_replays_with_locked() {
    check(&trace("runC-sample"), "locked", &RUNC);
}

#[test]
fn runc_replays_with_lockfree() {
    check(&trace("runC-sample"), "lockfree", &RUNC);
}

#[test]
fn runc_reports_its_node_size_and_the_events_it_does_not_replay() {
    let (code, stdout, stderr) =
        replay(&trace("runC-sample"), &["--impl", "locked", "--threads", "1", "--runners", "0"]);
    assert_eq!(code, 0, "{stdout}\n{stderr}");
    assert!(stdout.lines().any(|l| l.starts_with("node size: 65536 bytes (from ")), "{stdout}");
    assert!(stdout.lines().any(|l| l.contains("qgroup records on")), "{stdout}");
    let line = stdout.lines().find(|l| l.starts_with("events not replayed")).unwrap_or_default();
    assert!(
        line.contains("qgroup_num_dirty_extents 375") && line.contains("btrfs_qgroup_account_extent 7183"),
        "{line}"
    );
}
