//! Multi-threaded adds and runs against an oracle (tier T5 (README.md, \"Verification\")).
//!
//! Four adder threads (each with its own transaction handles) queue 200k
//! operations: refs on their own data and tree extents (allocated with
//! `AddExtent`, changed, sometimes freed; bytenrs never reused), refs with
//! per-thread keys on a few hot extents every thread shares, and extent ops
//! on their own and on the hot tree blocks. Two runner threads call
//! `run_one` and `run(Ready)` meanwhile, and a blocker thread registers and
//! drops tree-mod-log blockers so heads are held back (§5.2, §5.3). Adders
//! also read: `lookup_extent_info` of an extent only they change must equal
//! their model exactly, whatever the runners are doing (§7.1, invariant 18).
//!
//! At the end a final `run(All)` must leave every counter of §10 at zero
//! (invariant 26), the delayed-refs reserve back to its starting size, every
//! reserved byte back in the space info, and the extent tree equal to the
//! oracle: per extent the refs, every backref key's count, and the flags the
//! extent ops set (ops OR together in any order, §4.6 step 4).
//!
//! Every test is generic over `D: DelayedRefs`; see `common::for_each_impl!`.

#[macro_use]
mod common;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use common::*;
use delayed_refs::{
    Action, DelayedRefs, EXTENT_FLAG_DATA, EXTENT_FLAG_TREE_BLOCK, ExtentOp, FsConfig, MemExtentTree, RefKey, RunMode,
    TransHandle,
};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

const ADDERS: u64 = 4;
const OPS_PER_ADDER: u64 = 50_000;
const HOT_DATA: u64 = 4;
const HOT_TREE: u64 = 2;
const HOT_DATA_KEYS: u64 = 3;
const HOT_TREE_KEYS: u64 = 4;
const MAX_HOT_COUNT: u64 = 3;
const DATA_SLOTS: usize = 8;
const TREE_SLOTS: usize = 6;

fn hot_data(i: u64) -> u64 {
    (1 << 30) + i * DATA_NB
}

fn hot_tree(i: u64) -> u64 {
    (2 << 30) + i * TREE_NB
}

/// The base backref of a hot data extent, never dropped.
const HOT_DATA_BASE: RefKey = RefKey::SharedData { parent: 4096 };
/// The base backref of a hot tree block, never dropped.
const HOT_TREE_BASE: RefKey = RefKey::TreeBlock { root: 2 };

/// One adder's view: its own extents (exact) and its share of the hot ones.
struct Adder<'a, D: DelayedRefs> {
    t: u64,
    refs: &'a D,
    tree: &'a MemExtentTree,
    rng: StdRng,
    h: common::RenewingHandle,
    ops: u64,
    /// Every private extent ever allocated (freed ones have no refs left).
    own: BTreeMap<u64, Want>,
    data_slots: [Option<u64>; DATA_SLOTS],
    tree_slots: [Option<u64>; TREE_SLOTS],
    next_data: u64,
    next_tree: u64,
    /// This thread's refs on the hot extents.
    hot: BTreeMap<u64, Want>,
    /// Flags this thread set on hot tree blocks.
    hot_flags: BTreeMap<u64, u64>,
    freed_bytes: u64,
}

impl<'a, D: DelayedRefs> Adder<'a, D> {
    fn new(t: u64, refs: &'a D, tree: &'a MemExtentTree, seed: u64) -> Self {
        Adder {
            t,
            refs,
            tree,
            rng: StdRng::seed_from_u64(seed ^ (t * 0x9E37_79B9)),
            h: common::RenewingHandle::default(),
            ops: 0,
            own: BTreeMap::new(),
            data_slots: [None; DATA_SLOTS],
            tree_slots: [None; TREE_SLOTS],
            next_data: (t + 1) << 40,
            next_tree: ((t + 1) << 40) + (1 << 36),
            hot: BTreeMap::new(),
            hot_flags: BTreeMap::new(),
            freed_bytes: 0,
        }
    }

    /// The handle, renewed every 64 operations (start/end transaction, §8.10).
    fn handle(&mut self) -> &mut TransHandle {
        self.ops += 1;
        self.h.get(&self.refs.fs().reserves)
    }

    fn add_data(&mut self, action: Action, bytenr: u64, root: u64, ino: u64, parent: u64) {
        let g = dref(action, bytenr, root, ino, 0, parent);
        let reserved = if action == Action::AddExtent { DATA_NB } else { 0 };
        let refs = self.refs;
        refs.add_data_ref(self.handle(), &g, reserved).unwrap();
    }

    fn add_tree(&mut self, action: Action, bytenr: u64, root: u64, parent: u64, op: Option<ExtentOp>) {
        let g = tref(action, bytenr, root, parent);
        let refs = self.refs;
        refs.add_tree_ref(self.handle(), &g, op).unwrap();
    }

    fn step(&mut self) {
        let r = self.rng.gen_range(0..100);
        match r {
            0..30 => self.hot_data_ref(),
            30..40 => self.hot_tree_ref(),
            40..42 => {
                let b = hot_tree(self.rng.gen_range(0..HOT_TREE));
                let bit = 0x100 << self.t;
                let refs = self.refs;
                refs.add_extent_op(self.handle(), b, TREE_NB, ExtentOp::set_flags(bit, 0)).unwrap();
                *self.hot_flags.entry(b).or_insert(0) |= bit;
            }
            42..75 => self.private_data(),
            75..95 => self.private_tree(),
            _ => self.read_check(),
        }
    }

    fn hot_data_ref(&mut self) {
        let b = hot_data(self.rng.gen_range(0..HOT_DATA));
        let j = self.rng.gen_range(0..HOT_DATA_KEYS);
        let key = RefKey::ExtentData { root: 256 + self.t, objectid: 1000 + j, offset: 0 };
        let want = self.hot.entry(b).or_insert_with(|| Want { is_data: true, num_bytes: DATA_NB, ..Want::default() });
        let have = want.counts.get(&key).copied().unwrap_or(0);
        let action =
            if have >= MAX_HOT_COUNT || (have > 0 && self.rng.gen_bool(0.5)) { Action::Drop } else { Action::Add };
        want.bump(key, action);
        self.add_data(action, b, 256 + self.t, 1000 + j, 0);
    }

    fn hot_tree_ref(&mut self) {
        let b = hot_tree(self.rng.gen_range(0..HOT_TREE));
        let parent = ((self.t + 1) << 20) + self.rng.gen_range(0..HOT_TREE_KEYS) * TREE_NB;
        let key = RefKey::SharedBlock { parent };
        let want = self.hot.entry(b).or_insert_with(|| Want { is_data: false, num_bytes: TREE_NB, ..Want::default() });
        let action = if want.counts.contains_key(&key) { Action::Drop } else { Action::Add };
        want.bump(key, action);
        self.add_tree(action, b, 256 + self.t, parent, None);
    }

    fn data_key(&self, slot: usize, j: u64) -> (RefKey, u64, u64, u64) {
        let root = 256 + self.t;
        if j == 3 {
            let parent = ((self.t + 1) << 32) + slot as u64 * TREE_NB;
            (RefKey::SharedData { parent }, root, 0, parent)
        } else {
            let ino = slot as u64 * 100 + j;
            (RefKey::ExtentData { root, objectid: ino, offset: 0 }, root, ino, 0)
        }
    }

    fn private_data(&mut self) {
        let slot = self.rng.gen_range(0..DATA_SLOTS);
        let Some(b) = self.data_slots[slot] else {
            let b = self.next_data;
            self.next_data += DATA_NB;
            self.data_slots[slot] = Some(b);
            let (key, root, ino, parent) = self.data_key(slot, 0);
            let mut want = Want { is_data: true, num_bytes: DATA_NB, flags: EXTENT_FLAG_DATA, ..Want::default() };
            want.bump(key, Action::Add);
            self.own.insert(b, want);
            self.add_data(Action::AddExtent, b, root, ino, parent);
            return;
        };
        if self.rng.gen_bool(0.08) {
            // Free the extent: drop every ref it has.
            let keys: Vec<(RefKey, u64)> = self.own[&b].counts.iter().map(|(k, c)| (*k, *c)).collect();
            for (key, c) in keys {
                let j = (0..4).find(|j| self.data_key(slot, *j).0 == key).unwrap();
                let (_, root, ino, parent) = self.data_key(slot, j);
                for _ in 0..c {
                    self.own.get_mut(&b).unwrap().bump(key, Action::Drop);
                    self.add_data(Action::Drop, b, root, ino, parent);
                }
            }
            self.data_slots[slot] = None;
            self.freed_bytes += DATA_NB;
            return;
        }
        let j = self.rng.gen_range(0..4);
        let (key, root, ino, parent) = self.data_key(slot, j);
        let want = self.own.get_mut(&b).unwrap();
        let have = want.counts.get(&key).copied().unwrap_or(0);
        // Never drop the last ref here (freeing is explicit above).
        let action = if have > 0 && want.total() > 1 && self.rng.gen_bool(0.5) { Action::Drop } else { Action::Add };
        want.bump(key, action);
        self.add_data(action, b, root, ino, parent);
    }

    fn private_tree(&mut self) {
        let slot = self.rng.gen_range(0..TREE_SLOTS);
        let root = 256 + self.t;
        let Some(b) = self.tree_slots[slot] else {
            let b = self.next_tree;
            self.next_tree += TREE_NB;
            self.tree_slots[slot] = Some(b);
            let op = ExtentOp::set_flags(0x100 << (slot % 4), 0);
            let mut want = Want {
                is_data: false,
                num_bytes: TREE_NB,
                flags: EXTENT_FLAG_TREE_BLOCK | op.flags_to_set,
                ..Want::default()
            };
            want.bump(RefKey::TreeBlock { root }, Action::Add);
            self.own.insert(b, want);
            self.add_tree(Action::AddExtent, b, root, 0, Some(op));
            return;
        };
        let x = self.rng.gen_range(0..100);
        if x < 8 {
            let keys: Vec<RefKey> = self.own[&b].counts.keys().copied().collect();
            for key in keys {
                self.own.get_mut(&b).unwrap().bump(key, Action::Drop);
                match key {
                    RefKey::TreeBlock { root } => self.add_tree(Action::Drop, b, root, 0, None),
                    RefKey::SharedBlock { parent } => self.add_tree(Action::Drop, b, root, parent, None),
                    _ => unreachable!(),
                }
            }
            self.tree_slots[slot] = None;
            self.freed_bytes += TREE_NB;
        } else if x < 14 {
            let op = ExtentOp::set_flags(0x1000 << self.rng.gen_range(0..4), 0);
            self.own.get_mut(&b).unwrap().flags |= op.flags_to_set;
            let refs = self.refs;
            refs.add_extent_op(self.handle(), b, TREE_NB, op).unwrap();
        } else {
            let parent = ((self.t + 1) << 32) + self.rng.gen_range(0..3) * TREE_NB;
            let key = RefKey::SharedBlock { parent };
            let want = self.own.get_mut(&b).unwrap();
            let present = want.counts.contains_key(&key);
            if present && want.total() == 1 {
                return;
            }
            let action = if present { Action::Drop } else { Action::Add };
            want.bump(key, action);
            self.add_tree(action, b, root, parent, None);
        }
    }

    /// Readers see disk + pending exactly for extents only this thread
    /// changes, and at least the base plus this thread's refs on hot ones.
    fn read_check(&mut self) {
        for b in self.data_slots.iter().chain(self.tree_slots.iter()).flatten() {
            let want = self.own[b].total();
            let seen = self.refs.lookup_extent_info(self.tree, *b).unwrap().map(|i| i.refs);
            assert_eq!(seen, Some(want), "{}: thread {} lookup of its own extent {b:#x}", D::NAME, self.t);
        }
        for (b, want) in &self.hot {
            let seen = self.refs.lookup_extent_info(self.tree, *b).unwrap().expect("hot extents exist").refs;
            assert!(
                seen > want.total(),
                "{}: hot {b:#x}: {seen} refs, this thread alone holds {} + base",
                D::NAME,
                want.total()
            );
            let max = 1 + ADDERS * HOT_DATA_KEYS.max(HOT_TREE_KEYS) * MAX_HOT_COUNT;
            assert!(seen <= max, "{}: hot {b:#x}: {seen} refs > {max}", D::NAME);
        }
        self.ops += 1;
    }

    fn finish(mut self) -> Self {
        self.h.finish(&self.refs.fs().reserves);
        self
    }
}

/// Three rounds (seeds) of [`mt_round`]: the races it looks for are timing
/// dependent. `DREF_MT_SEED` picks the first seed.
fn mt_add_run<D: DelayedRefs>() {
    let seed = std::env::var("DREF_MT_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or(0x5eed);
    for round in 0..3 {
        mt_round::<D>(seed + round);
    }
}

/// 4 adders × 50k operations, 2 runners, a blocker thread; oracle at the end.
fn mt_round<D: DelayedRefs>(seed: u64) {
    let refs = D::new(FsConfig::default());
    let tree = MemExtentTree::new();
    for i in 0..HOT_DATA {
        load_item(&tree, hot_data(i), DATA_NB, true, &[(HOT_DATA_BASE, 1)]);
    }
    for i in 0..HOT_TREE {
        load_item(&tree, hot_tree(i), TREE_NB, false, &[(HOT_TREE_BASE, 1)]);
    }
    let start = refs.fs().reserves.snapshot();
    assert_eq!(start.delayed_refs.size, 0);
    let adders_done = AtomicU64::new(0);
    let stop = AtomicBool::new(false);
    let run_calls = AtomicU64::new(0);

    let adders: Vec<Adder<'_, D>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..ADDERS)
            .map(|t| {
                let (refs, tree, adders_done) = (&refs, &tree, &adders_done);
                s.spawn(move || {
                    let mut a = Adder::new(t, refs, tree, seed);
                    while a.ops < OPS_PER_ADDER {
                        a.step();
                    }
                    let a = a.finish();
                    adders_done.fetch_add(1, Ordering::SeqCst);
                    a
                })
            })
            .collect();
        for k in 0..2u64 {
            let (refs, tree, adders_done, run_calls) = (&refs, &tree, &adders_done, &run_calls);
            s.spawn(move || {
                let mut i = 0u64;
                while adders_done.load(Ordering::SeqCst) < ADDERS {
                    if (i + k) % 4 == 0 {
                        refs.run(tree, RunMode::Ready).unwrap();
                    } else {
                        refs.run_one(tree).unwrap();
                    }
                    i += 1;
                    if i % 64 == 0 {
                        std::thread::yield_now();
                    }
                }
                run_calls.fetch_add(i, Ordering::Relaxed);
            });
        }
        {
            let (refs, adders_done, stop) = (&refs, &adders_done, &stop);
            s.spawn(move || {
                while adders_done.load(Ordering::SeqCst) < ADDERS && !stop.load(Ordering::Relaxed) {
                    let b = refs.fs().seq.register();
                    for _ in 0..50 {
                        std::thread::yield_now();
                    }
                    drop(b);
                    for _ in 0..200 {
                        std::thread::yield_now();
                    }
                }
            });
        }
        let out = handles.into_iter().map(|h| h.join().unwrap()).collect();
        stop.store(true, Ordering::Relaxed);
        out
    });
    assert_eq!(refs.fs().seq.lowest_seq(), 0, "blockers gone");

    let total_ops: u64 = adders.iter().map(|a| a.ops).sum();
    assert!(total_ops >= 100_000, "the test must cover at least 100k operations");
    assert!(run_calls.load(Ordering::Relaxed) > 0, "runners ran concurrently");

    let st = refs.run(&tree, RunMode::All).unwrap();
    assert_eq!(st.held_back, 0, "no blocker left");
    // Invariant 26 and the reserves.
    check_empty(&refs);
    let end = refs.fs().reserves.snapshot();
    assert_eq!(end.delayed_refs.size, start.delayed_refs.size, "{}: delayed refs rsv size back to start", D::NAME);
    assert_eq!(end.space.may_use, start.space.may_use, "{}: every reserved byte returned", D::NAME);
    assert_eq!(end.global, start.global);

    // The oracle.
    let mut want: BTreeMap<u64, Want> = BTreeMap::new();
    for i in 0..HOT_DATA {
        let mut w = Want { is_data: true, num_bytes: DATA_NB, flags: EXTENT_FLAG_DATA, ..Want::default() };
        w.counts.insert(HOT_DATA_BASE, 1);
        want.insert(hot_data(i), w);
    }
    for i in 0..HOT_TREE {
        let mut w = Want { is_data: false, num_bytes: TREE_NB, flags: EXTENT_FLAG_TREE_BLOCK, ..Want::default() };
        w.counts.insert(HOT_TREE_BASE, 1);
        want.insert(hot_tree(i), w);
    }
    let mut freed = 0;
    for a in &adders {
        for (b, w) in &a.hot {
            let e = want.get_mut(b).unwrap();
            for (k, c) in &w.counts {
                assert!(e.counts.insert(*k, *c).is_none(), "per-thread keys are disjoint");
            }
        }
        for (b, f) in &a.hot_flags {
            want.get_mut(b).unwrap().flags |= f;
        }
        for (b, w) in &a.own {
            if w.total() > 0 {
                want.insert(*b, w.clone());
            }
        }
        freed += a.freed_bytes;
    }
    let got: BTreeMap<u64, Want> = tree.items().iter().map(|(b, i)| (*b, Want::of(i))).collect();
    let bad = oracle_diff(&want, &got);
    assert!(
        bad.is_empty(),
        "{} (seed {seed}): {} extents differ from the oracle:\n{}",
        D::NAME,
        bad.len(),
        bad.join("\n")
    );
    assert_eq!(got.len(), want.len(), "{}: no extra extents in the tree", D::NAME);
    assert!(tree.pinned_bytes() <= freed, "only freed (cancelled) allocations are pinned");
}

for_each_impl!(mt_add_run);
