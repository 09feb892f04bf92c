//! Multi-threaded add storms (semantics.md §4.5-§4.8, invariants of §10).
//!
//! Four threads queue 1,000,000 add calls in total with no runner active,
//! then the queued state is checked against an oracle built from what every
//! thread did (each thread records its own calls; the records are summed
//! after the threads joined, which is valid because merges are commutative:
//! a node's count is the signed sum of the calls on its key, §4.7, and a
//! head's `total_ref_mod` the sum of their count_mods, invariant 11).
//!
//! - `hot_storm`: every thread hammers the same few heads and keys. Data keys
//!   get random adds and drops (each thread keeps its own net count per key
//!   within ±3), so a node's signed count keeps flipping between ADD and
//!   DROP through zero (drop-at-zero and re-creation, §4.7, §4.9); tree keys
//!   move between 0 and ±1 per thread, and extent ops from every thread merge
//!   on the hot tree heads (§4.6 step 4). The extent items exist beforehand
//!   with enough backrefs that every final count is valid.
//! - `spread_storm`: many heads. Half the calls hit one of 16,384 existing
//!   data extents (shared by all threads, rarely the same key at once); the
//!   other half allocate new extents per thread (`AddExtent` with reserved
//!   bytes or with a flags op, must_insert_reserved, §4.4, §4.6 step 3), add
//!   and drop their backrefs, and sometimes cancel them (every ref dropped
//!   again, §11.11b).
//!
//! After the storm, for both implementations: the quiescent invariants of
//! §10 (common `check_quiescent`), every head's nodes (key, seq, action,
//! count, level) and head fields equal the oracle, the counters are exact
//! (`num_heads`, `num_heads_ready`, `num_entries`, `pending_csums`,
//! invariants 1-3, 20) and so is the delayed-refs reserve size (invariant 21).
//! Then `run(All)`: the extent tree equals the oracle item by item, cancelled
//! allocations are pinned, every counter is zero (invariant 26) and every
//! reserved byte is back in the space info.
//!
//! Every test is generic over `D: DelayedRefs`; see `common::for_each_impl!`.

#[macro_use]
mod common;

use std::collections::{BTreeMap, HashMap};
use std::time::Instant;

use common::*;
use delayed_refs::{
    Action, DelayedRefs, EXTENT_FLAG_DATA, EXTENT_FLAG_TREE_BLOCK, ExtentItem, ExtentOp, FsConfig, GenericRef,
    HeadSnapshot, MemExtentTree, NodeKey, RefKey, RunMode, TransHandle,
};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

const THREADS: u64 = 4;
const ADDS_PER_THREAD: u64 = 250_000;

/// What the calls of one thread (or, merged, of all threads) did to one head.
#[derive(Clone, Debug, Default, PartialEq)]
struct HeadWant {
    is_data: bool,
    num_bytes: u64,
    level: u8,
    /// Σ count_mod of the calls (invariant 11).
    total: i64,
    /// Net signed count per backref (every call has seq 0: no blockers, no bumps).
    nodes: BTreeMap<RefKey, i64>,
    /// An `AddExtent` queued must_insert_reserved.
    mir: bool,
    /// OR of the flags of every extent op queued (`None`: no op).
    op_flags: Option<u64>,
    /// Reserved bytes given by the call that created the head.
    reserved: u64,
    owning_root: u64,
}

impl HeadWant {
    fn absorb(&mut self, o: &HeadWant) {
        self.total += o.total;
        for (k, c) in &o.nodes {
            *self.nodes.entry(*k).or_insert(0) += c;
        }
        self.mir |= o.mir;
        self.op_flags = match (self.op_flags, o.op_flags) {
            (None, x) | (x, None) => x,
            (Some(a), Some(b)) => Some(a | b),
        };
        self.reserved = self.reserved.max(o.reserved);
    }

    fn live_nodes(&self) -> impl Iterator<Item = (&RefKey, &i64)> {
        self.nodes.iter().filter(|(_, c)| **c != 0)
    }
}

/// One storm thread: its handle and the record of its calls.
struct Storm<'a, D: DelayedRefs> {
    refs: &'a D,
    rng: StdRng,
    h: common::RenewingHandle,
    adds: u64,
    want: HashMap<u64, HeadWant>,
}

impl<'a, D: DelayedRefs> Storm<'a, D> {
    fn new(refs: &'a D, seed: u64) -> Self {
        Storm {
            refs,
            rng: StdRng::seed_from_u64(seed),
            h: common::RenewingHandle::default(),
            adds: 0,
            want: HashMap::new(),
        }
    }

    /// The handle, renewed every 64 calls (start/end transaction, §8.10).
    fn handle(&mut self) -> &mut TransHandle {
        self.adds += 1;
        self.h.get(&self.refs.fs().reserves)
    }

    fn head(&mut self, bytenr: u64, is_data: bool, num_bytes: u64, level: u8, owning_root: u64) -> &mut HeadWant {
        self.want.entry(bytenr).or_insert_with(|| HeadWant {
            is_data,
            num_bytes,
            level,
            owning_root,
            ..HeadWant::default()
        })
    }

    fn data(&mut self, action: Action, bytenr: u64, num_bytes: u64, key: (u64, u64, u64), reserved: u64) {
        let (root, ino, parent) = key;
        let g = GenericRef::new(action, bytenr, num_bytes, parent, 5).data(root, ino, 0, 0, false);
        let refs = self.refs;
        refs.add_data_ref(self.handle(), &g, reserved).unwrap();
        let w = self.head(bytenr, true, num_bytes, 0, 5);
        w.total += action.count_mod();
        *w.nodes.entry(g.ref_key()).or_insert(0) += action.count_mod();
        if action == Action::AddExtent {
            w.mir = true;
            w.reserved = reserved;
        }
    }

    fn tree(&mut self, action: Action, bytenr: u64, level: u8, key: (u64, u64), op: Option<ExtentOp>) {
        let (root, parent) = key;
        let g = GenericRef::new(action, bytenr, TREE_NB, parent, 5).tree(level, root, 0, false);
        let refs = self.refs;
        refs.add_tree_ref(self.handle(), &g, op).unwrap();
        let w = self.head(bytenr, false, TREE_NB, level, 5);
        w.total += action.count_mod();
        *w.nodes.entry(g.ref_key()).or_insert(0) += action.count_mod();
        w.mir |= action == Action::AddExtent;
        if let Some(op) = op {
            w.op_flags = Some(w.op_flags.unwrap_or(0) | op.flags_to_set);
        }
    }

    fn ext_op(&mut self, bytenr: u64, level: u8, flags: u64) {
        let refs = self.refs;
        refs.add_extent_op(self.handle(), bytenr, TREE_NB, ExtentOp::set_flags(flags, level)).unwrap();
        let w = self.head(bytenr, false, TREE_NB, level, 5);
        w.op_flags = Some(w.op_flags.unwrap_or(0) | flags);
    }

    fn finish(mut self) -> HashMap<u64, HeadWant> {
        self.h.finish(&self.refs.fs().reserves);
        self.want
    }
}

/// Merge the threads' records.
fn merge(parts: Vec<HashMap<u64, HeadWant>>) -> BTreeMap<u64, HeadWant> {
    let mut all: BTreeMap<u64, HeadWant> = BTreeMap::new();
    for p in parts {
        for (b, w) in p {
            match all.get_mut(&b) {
                Some(e) => {
                    assert_eq!((e.is_data, e.num_bytes), (w.is_data, w.num_bytes), "one extent, one kind");
                    e.absorb(&w)
                }
                None => {
                    all.insert(b, w);
                }
            }
        }
    }
    all
}

/// The queued state equals the oracle: every head and node, the counters,
/// the delayed-refs reserve size.
fn check_queued<D: DelayedRefs>(refs: &D, want: &BTreeMap<u64, HeadWant>) {
    let name = D::NAME;
    let snap = check_quiescent(refs);
    let g = *refs.fs().reserves.geometry();
    let got: BTreeMap<u64, &HeadSnapshot> = snap.iter().map(|h| (h.bytenr, h)).collect();
    assert_eq!(got.len(), want.len(), "{name}: one head per extent touched");
    let mut bad = Vec::new();
    for (b, w) in want {
        let Some(h) = got.get(b) else {
            bad.push(format!("{b:#x}: no head"));
            continue;
        };
        let nodes: BTreeMap<NodeKey, (i64, u8)> = h.nodes.iter().map(|n| (n.key, (signed(n), n.level))).collect();
        let want_nodes: BTreeMap<NodeKey, (i64, u8)> =
            w.live_nodes().map(|(k, c)| (NodeKey { key: *k, seq: 0 }, (*c, w.level))).collect();
        let fields = (h.is_data, h.num_bytes, h.ref_mod, h.total_ref_mod, h.must_insert_reserved, h.processing);
        let want_fields = (w.is_data, w.num_bytes, w.live_nodes().map(|(_, c)| c).sum(), w.total, w.mir, false);
        let op = h.extent_op.map(|o| o.flags_to_set);
        let extra = (h.reserved_bytes, h.owning_root);
        if nodes != want_nodes || fields != want_fields || op != w.op_flags || extra != (w.reserved, w.owning_root) {
            bad.push(format!(
                "{b:#x}:\n   nodes {nodes:?}\n    want {want_nodes:?}\n   (is_data, num_bytes, ref_mod, total, mir, processing) {fields:?} want {want_fields:?}\n   op flags {op:?} want {:?}\n   (reserved, owning_root) {extra:?} want {:?}",
                w.op_flags,
                (w.reserved, w.owning_root)
            ));
        }
    }
    assert!(
        bad.is_empty(),
        "{name}: {} heads differ from the oracle:\n{}",
        bad.len(),
        bad.iter().take(8).cloned().collect::<Vec<_>>().join("\n")
    );
    let nodes: u64 = want.values().map(|w| w.live_nodes().count() as u64).sum();
    let negative = || want.values().filter(|w| w.is_data && w.total < 0);
    let c = refs.counters();
    assert_eq!(c.num_heads, want.len() as u64, "{name}: num_heads (invariant 1)");
    assert_eq!(c.num_heads_ready, want.len() as u64, "{name}: num_heads_ready (invariant 2)");
    assert_eq!(c.num_entries, want.len() as u64 + nodes, "{name}: num_entries (invariant 3)");
    assert_eq!(c.pending_csums, negative().map(|w| w.num_bytes).sum::<u64>(), "{name}: pending_csums (invariant 20)");
    let csums: u64 = negative().map(|w| csum_rsv(&g, w.num_bytes)).sum();
    let size = refs.fs().reserves.snapshot().delayed_refs.size;
    assert_eq!(size, g.delayed_ref_bytes(nodes) + csums, "{name}: delayed refs rsv size (invariant 21)");
}

/// Run everything and compare the extent tree with `before` plus the oracle.
fn check_applied<D: DelayedRefs>(
    refs: &D,
    tree: &MemExtentTree,
    before: BTreeMap<u64, ExtentItem>,
    want: &BTreeMap<u64, HeadWant>,
    may_use0: u64,
) {
    let name = D::NAME;
    let st = refs.run(tree, RunMode::All).unwrap();
    assert_eq!(st.heads_deleted, want.len() as u64, "{name}: every head ran once");
    assert_eq!(st.held_back, 0);
    check_empty(refs);
    let mut expect = before;
    let mut pinned = 0;
    for (b, w) in want {
        let item = match expect.get_mut(b) {
            Some(i) => i,
            None if w.live_nodes().next().is_none() => {
                assert!(w.mir, "{name}: {b:#x}: a head with no item and no ref must be a cancelled allocation");
                pinned += w.num_bytes;
                continue;
            }
            None => {
                assert!(w.mir, "{name}: {b:#x}: refs on an extent with no item and no AddExtent");
                let flags = if w.is_data { EXTENT_FLAG_DATA } else { EXTENT_FLAG_TREE_BLOCK };
                expect.entry(*b).or_insert(ExtentItem {
                    num_bytes: w.num_bytes,
                    is_data: w.is_data,
                    flags,
                    level: w.level,
                    ..ExtentItem::default()
                })
            }
        };
        for (k, c) in w.live_nodes() {
            let n = item.backrefs.entry(*k).or_insert(0);
            *n = (*n as i64 + c).try_into().unwrap_or_else(|_| panic!("{name}: invalid storm: {b:#x} {k:?} below 0"));
            if *n == 0 {
                item.backrefs.remove(k);
            }
        }
        item.refs = item.backrefs.values().sum();
        item.flags |= w.op_flags.unwrap_or(0);
        if item.refs == 0 {
            expect.remove(b);
        }
    }
    let got = tree.items();
    let bad: Vec<String> = expect
        .iter()
        .filter(|(b, w)| got.get(b) != Some(w))
        .map(|(b, w)| format!("{b:#x}:\n   want {w:?}\n    got {:?}", got.get(b)))
        .take(8)
        .collect();
    assert!(bad.is_empty(), "{name}: extent tree differs from the oracle:\n{}", bad.join("\n"));
    assert_eq!(got.len(), expect.len(), "{name}: no extra items");
    assert_eq!(tree.pinned_bytes(), pinned, "{name}: cancelled allocations pinned (§6.11 step 4)");
    let rs = refs.fs().reserves.snapshot();
    assert_eq!(rs.space.may_use, may_use0, "{name}: every reserved byte returned: {rs:?}");
}

/// Spawn the storm threads; returns their merged records and the adds done.
fn storm<D: DelayedRefs>(refs: &D, seed: u64, body: impl Fn(&mut Storm<'_, D>, u64) + Sync) -> BTreeMap<u64, HeadWant> {
    let parts = std::thread::scope(|s| {
        let hs: Vec<_> = (0..THREADS)
            .map(|t| {
                let body = &body;
                s.spawn(move || {
                    let mut w = Storm::new(refs, seed ^ (t + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15));
                    body(&mut w, t);
                    let adds = w.adds;
                    (w.finish(), adds)
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect::<Vec<_>>()
    });
    let adds: u64 = parts.iter().map(|(_, a)| a).sum();
    assert!(adds >= THREADS * ADDS_PER_THREAD, "{}: only {adds} adds", D::NAME);
    merge(parts.into_iter().map(|(p, _)| p).collect())
}

const HOT_DATA: u64 = 2;
const HOT_TREE: u64 = 2;
const HOT_KEYS: u64 = 4;
/// Each thread's net count of a hot data key stays within ±HOT_SPREAD.
const HOT_SPREAD: i64 = 3;
/// Backrefs each hot data key has on disk (covers every possible net drop).
const HOT_BASE: u64 = (THREADS as i64 * HOT_SPREAD) as u64 + 1;

fn hot_data(i: u64) -> u64 {
    (1 << 30) + i * DATA_NB
}

fn hot_tree(i: u64) -> u64 {
    (2 << 30) + i * TREE_NB
}

/// Tree key `j` of a hot tree head: shared by parent. Even keys are on disk
/// (the owning thread finally drops them), odd ones are not (it adds them).
fn hot_tree_key(j: u64) -> (u64, u64) {
    (256, (3 << 30) + j * TREE_NB)
}

fn hot_storm<D: DelayedRefs>() {
    let t0 = Instant::now();
    let refs = D::new(FsConfig::default());
    let tree = MemExtentTree::new();
    for i in 0..HOT_DATA {
        let keys: Vec<(RefKey, u64)> =
            (0..HOT_KEYS).map(|j| (dref(Action::Add, hot_data(i), 5, 1000 + j, 0, 0).ref_key(), HOT_BASE)).collect();
        load_item(&tree, hot_data(i), DATA_NB, true, &keys);
    }
    for i in 0..HOT_TREE {
        // A permanent backref of the extent tree keeps every item alive.
        let mut keys = vec![(RefKey::TreeBlock { root: 2 }, 1)];
        keys.extend((0..HOT_KEYS).step_by(2).map(|j| (RefKey::SharedBlock { parent: hot_tree_key(j).1 }, 1)));
        load_item(&tree, hot_tree(i), TREE_NB, false, &keys);
    }
    let before = tree.items();
    let may_use0 = refs.fs().reserves.snapshot().space.may_use;

    let want = storm(&refs, 0x4807, |w, t| {
        let mut data_net = [[0i64; HOT_KEYS as usize]; HOT_DATA as usize];
        let mut tree_net = [[0i64; HOT_KEYS as usize]; HOT_TREE as usize];
        // Toggle tree key j of head i: away from 0 (drop if on disk, else
        // add), or back to 0.
        let toggle = |w: &mut Storm<'_, D>, net: &mut i64, i: u64, j: u64| {
            let away = if j % 2 == 0 { -1 } else { 1 };
            let action = if (*net == 0) == (away > 0) { Action::Add } else { Action::Drop };
            *net += action.count_mod();
            w.tree(action, hot_tree(i), 0, hot_tree_key(j), None);
        };
        while w.adds < ADDS_PER_THREAD {
            let r = w.rng.gen_range(0..100);
            if r < 60 {
                let i = w.rng.gen_range(0..HOT_DATA);
                let j = w.rng.gen_range(0..HOT_KEYS);
                let net = &mut data_net[i as usize][j as usize];
                let drop = *net == HOT_SPREAD || (*net > -HOT_SPREAD && w.rng.gen_bool(0.5));
                let action = if drop { Action::Drop } else { Action::Add };
                *net += action.count_mod();
                w.data(action, hot_data(i), DATA_NB, (5, 1000 + j, 0), 0);
            } else if r < 98 {
                let i = w.rng.gen_range(0..HOT_TREE);
                let j = w.rng.gen_range(0..HOT_KEYS);
                toggle(w, &mut tree_net[i as usize][j as usize], i, j);
            } else {
                let i = w.rng.gen_range(0..HOT_TREE);
                w.ext_op(hot_tree(i), 0, 0x1000 << t);
            }
        }
        // Settle the tree keys: the owner (j % THREADS == t) leaves its key
        // away from 0, everyone else at 0, so every final count is ±1 or 0.
        for i in 0..HOT_TREE {
            for j in 0..HOT_KEYS {
                let net = &mut tree_net[i as usize][j as usize];
                let target = if j % THREADS == t { if j % 2 == 0 { -1 } else { 1 } } else { 0 };
                if *net != target {
                    toggle(w, net, i, j);
                }
            }
        }
    });
    let t_storm = t0.elapsed();
    assert_eq!(want.len() as u64, HOT_DATA + HOT_TREE);
    check_queued(&refs, &want);
    check_applied(&refs, &tree, before, &want, may_use0);
    eprintln!("{}: hot storm {:?}, total {:?}", D::NAME, t_storm, t0.elapsed());
}

/// Existing data extents shared by all threads in the spread storm.
const SHARED: u64 = 16_384;
/// Keys per shared extent; each thread keeps its net within ±SHARED_SPREAD.
const SHARED_KEYS: u64 = 3;
const SHARED_SPREAD: i64 = 2;
const SHARED_BASE: u64 = (THREADS as i64 * SHARED_SPREAD) as u64;
/// New extents a thread works on at a time.
const SLOTS: usize = 32;

fn shared(i: u64) -> u64 {
    (1 << 32) + i * DATA_NB
}

/// A thread's own new extent.
#[derive(Clone, Copy, Debug)]
struct Own {
    bytenr: u64,
    is_data: bool,
    /// Counts of its 4 possible keys (tree keys stay 0 or 1).
    counts: [u64; 4],
}

fn own_data_key(t: u64, j: usize) -> (u64, u64, u64) {
    if j == 3 { (256 + t, 0, (7 << 40) + t * TREE_NB) } else { (256 + t, 500 + j as u64, 0) }
}

fn own_tree_key(t: u64, j: usize) -> (u64, u64) {
    if j == 0 { (256 + t, 0) } else { (256 + t, (6 << 40) + (t * 4 + j as u64) * TREE_NB) }
}

fn spread_storm<D: DelayedRefs>() {
    let t0 = Instant::now();
    let refs = D::new(FsConfig::default());
    let tree = MemExtentTree::new();
    for i in 0..SHARED {
        let keys: Vec<(RefKey, u64)> = (0..SHARED_KEYS)
            .map(|j| (dref(Action::Add, shared(i), 5, 2000 + j, 0, 0).ref_key(), SHARED_BASE))
            .collect();
        load_item(&tree, shared(i), DATA_NB, true, &keys);
    }
    let before = tree.items();
    let may_use0 = refs.fs().reserves.snapshot().space.may_use;

    let want = storm(&refs, 0x59e4d, |w, t| {
        let mut net: HashMap<(u64, u64), i64> = HashMap::new();
        let mut slots: [Option<Own>; SLOTS] = [None; SLOTS];
        let mut next = (t + 1) << 44;
        while w.adds < ADDS_PER_THREAD {
            if w.rng.gen_bool(0.5) {
                let i = w.rng.gen_range(0..SHARED);
                let j = w.rng.gen_range(0..SHARED_KEYS);
                let n = net.entry((i, j)).or_insert(0);
                let drop = *n == SHARED_SPREAD || (*n > -SHARED_SPREAD && w.rng.gen_bool(0.5));
                let action = if drop { Action::Drop } else { Action::Add };
                *n += action.count_mod();
                w.data(action, shared(i), DATA_NB, (5, 2000 + j, 0), 0);
                continue;
            }
            let s = w.rng.gen_range(0..SLOTS);
            let Some(mut o) = slots[s] else {
                // Allocate a new extent: data with reserved bytes, or a tree
                // block with a flags op (§4.4, §11.14).
                let is_data = w.rng.gen_bool(0.5);
                let o = Own { bytenr: next, is_data, counts: [1, 0, 0, 0] };
                next += 1 << 20;
                if is_data {
                    w.data(Action::AddExtent, o.bytenr, DATA_NB, own_data_key(t, 0), DATA_NB);
                } else {
                    let op = ExtentOp::set_flags(0x100 << t, 1);
                    w.tree(Action::AddExtent, o.bytenr, 1, own_tree_key(t, 0), Some(op));
                }
                slots[s] = Some(o);
                continue;
            };
            let x = w.rng.gen_range(0..100);
            let total: u64 = o.counts.iter().sum();
            if x < 5 {
                // Cancel: drop every ref (the item was never inserted).
                for j in 0..4 {
                    for _ in 0..o.counts[j] {
                        if o.is_data {
                            w.data(Action::Drop, o.bytenr, DATA_NB, own_data_key(t, j), 0);
                        } else {
                            w.tree(Action::Drop, o.bytenr, 1, own_tree_key(t, j), None);
                        }
                    }
                }
                slots[s] = None;
            } else if x < 12 {
                // Done with it: keep its refs, start a new one later.
                slots[s] = None;
            } else if !o.is_data && x < 16 {
                let bit = w.rng.gen_range(0..4);
                w.ext_op(o.bytenr, 1, 0x1_0000 << bit);
            } else {
                let j = w.rng.gen_range(0..4);
                let c = o.counts[j];
                let drop = c > 0 && total > 1 && (!o.is_data || w.rng.gen_bool(0.5));
                if !o.is_data && !drop && c > 0 {
                    continue;
                }
                let action = if drop { Action::Drop } else { Action::Add };
                if o.is_data {
                    w.data(action, o.bytenr, DATA_NB, own_data_key(t, j), 0);
                } else {
                    w.tree(action, o.bytenr, 1, own_tree_key(t, j), None);
                }
                o.counts[j] = (c as i64 + action.count_mod()) as u64;
                slots[s] = Some(o);
            }
        }
    });
    let t_storm = t0.elapsed();
    assert!(want.len() > 20_000, "{}: a spread storm over many heads ({})", D::NAME, want.len());
    check_queued(&refs, &want);
    check_applied(&refs, &tree, before, &want, may_use0);
    eprintln!("{}: spread storm over {} heads {:?}, total {:?}", D::NAME, want.len(), t_storm, t0.elapsed());
}

for_each_impl!(hot_storm, spread_storm);
