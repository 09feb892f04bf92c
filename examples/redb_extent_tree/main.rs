//! A durable extent tree on redb behind the lock-free delayed-ref root.
//!
//! ```text
//! cargo run --release --example redb_extent_tree                 # adders + runners + commit drains, reopen, verify
//! cargo run --release --example redb_extent_tree -- crash-test   # kill a run half-way, reopen, verify (3 times)
//! ```
//!
//! Options of both: `--db PATH` (default: a fresh file under the temporary
//! directory), `--rounds N`, `--extents N`, `--adders N`, `--runners N`.
//!
//! The backend (`tree.rs`) writes one redb transaction per head and makes a
//! run durable at its end (`end_run`); the crash test checks that after a
//! SIGKILL in the middle of a run the reopened database holds exactly the
//! state of the last completed run: the run the database's journal names,
//! rebuilt independently on the locked port and the in-memory tree.

mod crash;
mod tree;
mod workload;

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use delayed_refs::{DelayedRefs, FsConfig, FsShared, LockFreeRefs, RunMode};
use tree::RedbExtentTree;

#[derive(Clone, Debug)]
struct Opts {
    db: Option<PathBuf>,
    rounds: u64,
    extents: u64,
    adders: u64,
    runners: usize,
}

fn parse(args: &[String]) -> Result<Opts, String> {
    let mut o = Opts { db: None, rounds: 6, extents: 2000, adders: 2, runners: 2 };
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let mut val = |name: &str| it.next().cloned().ok_or(format!("{name} needs a value"));
        let num = |s: String| s.parse::<u64>().map_err(|e| format!("{s}: {e}"));
        match a.as_str() {
            "--db" => o.db = Some(PathBuf::from(val("--db")?)),
            "--rounds" => o.rounds = num(val("--rounds")?)?,
            "--extents" => o.extents = num(val("--extents")?)?.max(1),
            "--adders" => o.adders = num(val("--adders")?)?.max(1),
            "--runners" => o.runners = num(val("--runners")?)?.max(1) as usize,
            other => return Err(format!("unknown option {other}")),
        }
    }
    Ok(o)
}

/// A fresh database path under the temporary directory.
fn fresh_db(tag: &str) -> PathBuf {
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos());
    std::env::temp_dir().join(format!("delayed-refs-{tag}-{}-{nanos}.redb", std::process::id()))
}

/// Adders and runners at once, a commit drain per round, then reopen and
/// verify against the workload rebuilt in memory.
fn demo(o: &Opts) -> Result<(), String> {
    let path = o.db.clone().unwrap_or_else(|| fresh_db("demo"));
    let t0 = Instant::now();
    {
        let tree = RedbExtentTree::open(&path).map_err(|e| e.to_string())?;
        let fs = std::sync::Arc::new(FsShared::new(FsConfig::default()));
        let pool = rayon::ThreadPoolBuilder::new().num_threads(o.runners).build().map_err(|e| e.to_string())?;
        let mut transid = 0;
        for k in 1..=o.rounds {
            // One delayed-ref root per transaction, as btrfs has.
            transid += 1;
            let refs = LockFreeRefs::for_transaction(fs.clone(), transid);
            tree.set_label(k);
            let adding = AtomicBool::new(true);
            std::thread::scope(|s| {
                for _ in 0..o.runners {
                    s.spawn(|| {
                        while adding.load(Ordering::Relaxed) {
                            match refs.run(&tree, RunMode::Ready) {
                                Ok(r) if r.refs > 0 => {}
                                Ok(_) => std::thread::yield_now(),
                                Err(e) => panic!("runner: {e} (recovery: {:?})", e.recovery()),
                            }
                        }
                    });
                }
                workload::queue_round(&refs, k, o.extents, o.adders);
                adding.store(false, Ordering::Relaxed);
            });
            // The commit: everything left, on the pool.
            refs.commit_drain(&tree, &pool).map_err(|e| format!("round {k}: {e}"))?;
            assert_eq!(refs.counters().num_entries, 0);
        }
        println!(
            "{} rounds of {} extents: {} refs applied, {} durable commits, {:.2} s",
            o.rounds,
            o.extents,
            tree.applied_refs(),
            tree.durable_commits(),
            t0.elapsed().as_secs_f64()
        );
    }
    // Reopen: what is on disk must be the whole workload.
    let tree = RedbExtentTree::open(&path).map_err(|e| e.to_string())?;
    tree.check_consistent()?;
    let got = tree.items().map_err(|e| e.to_string())?;
    workload::same_items(&got, &workload::expected(o.rounds, o.extents))?;
    let journal = tree.journal().map_err(|e| e.to_string())?;
    println!(
        "reopened {}: {} extents as expected, {} runs in the journal ({} refs), transid {}",
        path.display(),
        got.len(),
        journal.len(),
        journal.values().sum::<u64>(),
        tree.meta("transid").map_err(|e| e.to_string())?
    );
    if o.db.is_none() {
        let _ = std::fs::remove_file(&path);
    }
    Ok(())
}

fn crash_test(o: &Opts) -> Result<(), String> {
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let child = |db: &std::path::Path| {
        let mut c = std::process::Command::new(&exe);
        c.arg("child").arg("--db").arg(db).arg("--extents").arg(o.extents.to_string());
        c
    };
    crash::crash_test(child, o.extents, fresh_db)
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (mode, rest) = match args.first().map(String::as_str) {
        Some(m @ ("crash-test" | "child")) => (m, &args[1..]),
        _ => ("demo", &args[..]),
    };
    let r = parse(rest).and_then(|o| match mode {
        "crash-test" => crash_test(&o),
        "child" => {
            let path = o.db.clone().ok_or("child needs --db")?;
            crash::child(&path, o.extents, o.adders)
        }
        _ => demo(&o),
    });
    if let Err(e) = r {
        eprintln!("redb_extent_tree: {e}");
        std::process::exit(1);
    }
}
