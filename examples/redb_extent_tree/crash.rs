//! The crash test: a child process runs rounds (one run each) on a redb
//! database until it is killed with SIGKILL in the middle of a run; the
//! database, reopened, must hold exactly the state of the last completed
//! run. Shared by the example (`crash-test`) and `tests/redb_backend.rs`.

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use delayed_refs::{DelayedRefs, FsConfig, LockFreeRefs, RunMode};

use super::tree::RedbExtentTree;
use super::workload;

/// What the child prints before round K's run (`ROUND-RUNNING K`) and
/// after its durable end (`ROUND-COMMITTED K`); a token, so that it can be
/// found in lines a test harness prefixes.
const RUNNING: &str = "ROUND-RUNNING";
const COMMITTED: &str = "ROUND-COMMITTED";

/// The child: rounds forever on the database at `db`, one run per round
/// from one runner after `adders` threads queued the round.
pub fn child(db: &Path, extents: u64, adders: u64) -> Result<(), String> {
    let tree = RedbExtentTree::open(db).map_err(|e| e.to_string())?;
    let refs = LockFreeRefs::new(FsConfig::default());
    let mut out = std::io::stdout();
    for k in 1.. {
        workload::queue_round(&refs, k, extents, adders);
        tree.set_label(k);
        writeln!(out, "{RUNNING} {k}").and_then(|_| out.flush()).map_err(|e| e.to_string())?;
        refs.run(&tree, RunMode::All).map_err(|e| format!("round {k}: {e}"))?;
        writeln!(out, "{COMMITTED} {k}").and_then(|_| out.flush()).map_err(|e| e.to_string())?;
    }
    Ok(())
}

/// The last (word, round) the child printed in `line`, if any.
fn marker(line: &str) -> Option<(&'static str, u64)> {
    [RUNNING, COMMITTED]
        .into_iter()
        .filter_map(|w| line.rfind(w).map(|at| (at, w)))
        .max()
        .and_then(|(at, w)| line[at + w.len()..].split_whitespace().next()?.parse().ok().map(|k| (w, k)))
}

/// Kill one child inside a run and check its database. Returns whether the
/// kill landed inside a run (the database then holds the round before).
pub fn crash_once(child: impl Fn(&Path) -> Command, db: &Path, extents: u64, attempt: u32) -> Result<bool, String> {
    let mut c = child(db).stdout(Stdio::piped()).spawn().map_err(|e| e.to_string())?;
    let mut lines = BufReader::new(c.stdout.take().expect("piped")).lines();
    let mut last = None;
    // Let a few rounds complete, then wait for a run to start.
    let start = 3 + attempt as u64;
    for line in lines.by_ref() {
        let line = line.map_err(|e| e.to_string())?;
        last = marker(&line).or(last);
        if last == Some((RUNNING, start)) {
            break;
        }
    }
    if last != Some((RUNNING, start)) {
        let _ = c.kill();
        return Err(format!("the child stopped before round {start} (last marker {last:?})"));
    }
    // Somewhere inside that run.
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.subsec_nanos());
    std::thread::sleep(Duration::from_micros(1000 + u64::from(nanos) % 6000));
    c.kill().map_err(|e| e.to_string())?;
    let _ = c.wait();
    for line in lines {
        let line = line.map_err(|e| e.to_string())?;
        last = marker(&line).or(last);
    }
    let (word, k) = last.expect("seen above");
    let tree = RedbExtentTree::open(db).map_err(|e| format!("reopen after the kill: {e}"))?;
    let label = tree.meta("label").map_err(|e| e.to_string())?;
    // COMMITTED is printed after the durable commit; RUNNING before the
    // run, whose durable commit may or may not have happened.
    let allowed = if word == COMMITTED { k..=k } else { k - 1..=k };
    if !allowed.contains(&label) {
        return Err(format!("last marker {word} {k}, but the database holds round {label}"));
    }
    tree.check_consistent()?;
    let got = tree.items().map_err(|e| e.to_string())?;
    workload::same_items(&got, &workload::expected(label, extents)).map_err(|e| format!("after round {label}: {e}"))?;
    let mid_run = word == RUNNING && label == k - 1;
    println!(
        "crash {}: killed after {word} {k}; the reopened database holds round {label} exactly ({} extents){}",
        attempt + 1,
        got.len(),
        if mid_run { ", the interrupted run left nothing" } else { "" }
    );
    Ok(mid_run)
}

/// Three kills, each on a fresh database from `fresh`; at least one must
/// land inside a run, or the test proved nothing.
pub fn crash_test(
    child: impl Fn(&Path) -> Command,
    extents: u64,
    fresh: impl Fn(&str) -> PathBuf,
) -> Result<(), String> {
    let mut mid = 0;
    for attempt in 0..3 {
        let db = fresh("crash");
        let r = crash_once(&child, &db, extents, attempt);
        let _ = std::fs::remove_file(&db);
        mid += u32::from(r?);
    }
    if mid == 0 {
        return Err("no kill landed inside a run: the test proved nothing (more --extents make runs longer)".into());
    }
    println!("crash test: OK ({mid} of 3 kills inside a run)");
    Ok(())
}
