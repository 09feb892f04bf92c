//! Shuttle models (tier T3b (README.md, \"Verification\")): whole workloads of the composed
//! lock-free engine under AWS shuttle's randomized and PCT schedulers.
//!
//! Run with:
//! `RUSTFLAGS="--cfg dref_shuttle" cargo test --release --lib shuttle_models -- --test-threads=1`
//!
//! The engine's own code (`Engine` on the mock stores, module
//! `lockfree::store`) runs with every atomic and mutex of the `sync` shim
//! replaced by shuttle's, so each one is a point where the scheduler may
//! switch threads. A workload is two adders, a runner that also deletes
//! empty heads (`check_ref_cleanup`), and a reader that registers and drops
//! tree-mod-log blockers between its lookups, over data extents and tree
//! blocks each adder owns and a data extent both share; it ends in a drain, or in `destroy` (a transaction
//! abort). Checked: every ref queued is applied exactly once (the strict
//! model tree refuses a drop run before the add queued ahead of it), no run
//! fails, counters and reserve return to zero, and every lookup returns a
//! count the extent held during the call ([`crate::lincheck`]).
//!
//! Environment:
//! - `DREF_SHUTTLE_ITERS`: schedules per scheduler and workload (default 500);
//! - `DREF_SHUTTLE_SEED`: the random scheduler's seed (default: shuttle's);
//! - `DREF_SHUTTLE_REPLAY`: a failing schedule as shuttle printed it; the
//!   tests then replay that one schedule of the workload named by
//!   `DREF_SHUTTLE_WORKLOAD` (`drain` or `destroy`).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64 as StdAtomicU64, Ordering as StdOrdering};

use shuttle::thread;

use crate::domain::generic_ref::GenericRef;
use crate::domain::key::RefKey;
use crate::domain::kind::Action;
use crate::lincheck::{self, OpRecord, ReadRecord};
use crate::model_support::{ModelRefs, ModelTree, NB, data, drain_and_check, engine, tree};
use crate::rsv::handle::TransHandle;
use crate::sync::{Arc, AtomicUsize, Mutex, Ordering};

/// Each adder owns one data extent and one tree block; both share a third
/// data extent.
const DATA: [u64; 2] = [1 << 20, (1 << 20) + NB];
const TREES: [u64; 2] = [1 << 21, (1 << 21) + NB];
const SHARED: u64 = 1 << 22;
const ALL: [u64; 5] = [DATA[0], DATA[1], TREES[0], TREES[1], SHARED];
/// Steps per adder (each one or two add calls).
const OPS: usize = 12;
const ADDERS: usize = 2;

/// A deterministic generator per thread (the schedule is shuttle's).
struct Lcg(u64);

impl Lcg {
    fn next(&mut self, n: u64) -> u64 {
        self.0 = self.0.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        (self.0 >> 33) % n
    }
}

/// A ref of `owner` on `bytenr` (a tree ref on the tree blocks).
fn backref(action: Action, bytenr: u64, owner: u64) -> GenericRef {
    if TREES.contains(&bytenr) { tree(action, bytenr, owner) } else { data(action, bytenr, owner) }
}

/// The base backref each extent holds on disk before the workload.
fn base_ref(bytenr: u64) -> GenericRef {
    backref(Action::Add, bytenr, 5)
}

/// What every workload shares.
struct World {
    refs: ModelRefs,
    tree: ModelTree,
    clock: StdAtomicU64,
    ops: Mutex<Vec<OpRecord>>,
    reads: Mutex<Vec<ReadRecord>>,
    adders_done: AtomicUsize,
}

impl World {
    fn stamp(&self) -> u64 {
        self.clock.fetch_add(1, StdOrdering::SeqCst)
    }

    /// Queue `r` and record the call.
    fn add(&self, id: usize, r: &GenericRef, net: &mut BTreeMap<(u64, RefKey), i64>) {
        let mut h = TransHandle::new();
        let inv = self.stamp();
        let res =
            if r.is_data() { self.refs.add_data_ref(&mut h, r, 0) } else { self.refs.add_tree_ref(&mut h, r, None) };
        let resp = self.stamp();
        res.expect("a valid add failed");
        let delta = if r.action == Action::Drop { -1 } else { 1 };
        self.ops.lock().unwrap().push(OpRecord { bytenr: r.bytenr, thread: id, delta, inv, resp });
        *net.entry((r.bytenr, r.node_key(0).key)).or_insert(0) += delta;
    }
}

/// One adder. On each extent it owns it moves the extent's one live
/// backref: ADD a fresh backref, then DROP the old one (the count goes 1,
/// 2, 1: a DROP run before the ADD queued ahead of it frees the extent and
/// the strict tree refuses the ADD). On the shared extent it toggles a
/// backref of its own (ADD, then DROP). Returns the net change per
/// (extent, backref).
fn adder(w: &World, id: usize) -> BTreeMap<(u64, RefKey), i64> {
    let mut rng = Lcg(id as u64 + 1);
    let mine = [DATA[id], TREES[id]];
    let mut live = mine.map(base_ref);
    let mut net = BTreeMap::new();
    for i in 0..OPS {
        let owner = 100 + (id * OPS + i) as u64;
        match rng.next(3) {
            2 => {
                w.add(id, &backref(Action::Add, SHARED, owner), &mut net);
                w.add(id, &backref(Action::Drop, SHARED, owner), &mut net);
            }
            j => {
                let j = j as usize;
                let fresh = backref(Action::Add, mine[j], owner);
                w.add(id, &fresh, &mut net);
                let old = GenericRef { action: Action::Drop, ..live[j] };
                w.add(id, &old, &mut net);
                live[j] = fresh;
            }
        }
    }
    w.adders_done.fetch_add(1, Ordering::Release);
    net
}

/// The runner: runs heads one at a time and deletes empty ones until the
/// adders are done.
fn runner(w: &World) {
    let mut rng = Lcg(77);
    while w.adders_done.load(Ordering::Acquire) < ADDERS {
        if w.refs.run_one(&w.tree).expect("a run failed").is_none() {
            thread::yield_now();
        }
        let _ = w.refs.check_ref_cleanup(ALL[rng.next(5) as usize]);
    }
}

/// The reader: lookups of every extent, with a tree-mod-log blocker held
/// across some of them.
fn reader(w: &World) {
    let mut rng = Lcg(99);
    while w.adders_done.load(Ordering::Acquire) < ADDERS {
        let blocker = (rng.next(3) == 0).then(|| w.refs.fs.seq.register());
        for _ in 0..2 {
            let bytenr = ALL[rng.next(5) as usize];
            let inv = w.stamp();
            let value = w.refs.lookup_extent_info(&w.tree, bytenr).unwrap().map_or(0, |i| i.refs as i64);
            let resp = w.stamp();
            w.reads.lock().unwrap().push(ReadRecord { bytenr, inv, resp, value });
        }
        drop(blocker);
        thread::yield_now();
    }
}

/// One run of the workload; `destroy` ends it with `destroy` (abort)
/// instead of a drain.
fn workload(destroy: bool) {
    let w = Arc::new(World {
        refs: engine(),
        tree: ModelTree::new(),
        clock: StdAtomicU64::new(0),
        ops: Mutex::new(Vec::new()),
        reads: Mutex::new(Vec::new()),
        adders_done: AtomicUsize::new(0),
    });
    for b in ALL {
        w.tree.load(b, &[(base_ref(b).node_key(0).key, 1)]);
    }
    let adders: Vec<_> = (0..ADDERS)
        .map(|id| {
            let w = w.clone();
            thread::spawn(move || adder(&w, id))
        })
        .collect();
    let run = {
        let w = w.clone();
        thread::spawn(move || runner(&w))
    };
    let read = {
        let w = w.clone();
        thread::spawn(move || reader(&w))
    };
    let mut want: BTreeMap<(u64, RefKey), i64> = ALL.iter().map(|&b| ((b, base_ref(b).node_key(0).key), 1)).collect();
    for a in adders {
        for (k, d) in a.join().unwrap() {
            *want.entry(k).or_insert(0) += d;
        }
    }
    run.join().unwrap();
    read.join().unwrap();

    let violations = lincheck::check(|_| 1, &w.ops.lock().unwrap(), &w.reads.lock().unwrap());
    assert!(violations.is_empty(), "reads outside the counts the extents held: {violations:?}");
    if destroy {
        let applied_before: Vec<_> = ALL.iter().map(|&b| w.tree.backrefs(b)).collect();
        w.refs.destroy(&w.tree);
        let c = w.refs.counters();
        assert_eq!((c.num_heads, c.num_entries), (0, 0), "destroy left {c:?}");
        assert!(w.refs.snapshot().is_empty(), "destroy left a head");
        let after: Vec<_> = ALL.iter().map(|&b| w.tree.backrefs(b)).collect();
        assert_eq!(after, applied_before, "destroy applied a ref");
        return;
    }
    drain_and_check(&w.refs, &w.tree);
    let mut got: BTreeMap<(u64, RefKey), i64> = BTreeMap::new();
    for b in ALL {
        for (k, n) in w.tree.backrefs(b).unwrap_or_default() {
            got.insert((b, k), n as i64);
        }
    }
    want.retain(|_, n| *n != 0);
    assert_eq!(got, want, "the extent tree differs from the refs queued");
}

fn iters() -> usize {
    std::env::var("DREF_SHUTTLE_ITERS").ok().and_then(|s| s.parse().ok()).unwrap_or(500)
}

/// Run `f` under the random scheduler (seeded by `DREF_SHUTTLE_SEED` if
/// set) and under PCT, or replay `DREF_SHUTTLE_REPLAY` if set.
fn explore(name: &str, f: fn()) {
    if let Ok(schedule) = std::env::var("DREF_SHUTTLE_REPLAY") {
        if std::env::var("DREF_SHUTTLE_WORKLOAD").is_ok_and(|w| w == name) {
            shuttle::replay(f, &schedule);
        }
        return;
    }
    match std::env::var("DREF_SHUTTLE_SEED").ok().and_then(|s| s.parse().ok()) {
        Some(seed) => shuttle::check_random_with_seed(f, seed, iters()),
        None => shuttle::check_random(f, iters()),
    }
    shuttle::check_pct(f, iters(), 3);
}

/// The workload ending in a drain, under both schedulers.
#[test]
fn shuttle_workload_drain() {
    explore("drain", || workload(false));
}

/// The workload ending in `destroy`, under both schedulers.
#[test]
fn shuttle_workload_destroy() {
    explore("destroy", || workload(true));
}
