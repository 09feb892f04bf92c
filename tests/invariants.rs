//! Property test: random operation sequences against a model, checking the
//! invariants of semantics.md §10 after every step and the final extent tree.
//!
//! Operations: tree and data refs on a few extents and backref keys, extent
//! ops, `run_one`, `run(Ready)`, `run(Bytes)`, `check_ref_cleanup`, seq
//! blockers registered and dropped, and seq bumps. The generator keeps every
//! sequence valid for the strict extent tree: it models the true refs (disk
//! plus queued) per key, only drops what exists, makes the first ref of a
//! free extent an `AddExtent`, keeps tree backrefs at 0 or 1 (so no tree
//! ref ever runs with `ref_mod != 1`, §11.14), and never reuses a freed
//! bytenr while its head is still queued (§11.11a).
//!
//! Checked after every step: invariants 1-4, 7, 8, 10, 15, 20-23 (common
//! `check_quiescent`), 11 (total_ref_mod per head object), 12 and 18 (disk +
//! queued per key and `lookup_extent_info`), 13 (after a metadata head is
//! held back), 16 (must_insert_reserved ⇒ no item), 25 (qgroup records,
//! with the absorb rule of §9), the exact `check_ref_cleanup` outcome
//! (§7.2) and the pinned bytes of cancelled allocations (§6.11 step 4).
//! At the end: invariant 17 (every insert is an ADD), a final `run(All)`,
//! invariant 26, and the extent tree equal to the model.
//!
//! Every test is generic over `D: DelayedRefs`; see `common::for_each_impl!`.

#[macro_use]
mod common;

use std::collections::{BTreeMap, BTreeSet};

use common::*;
use delayed_refs::{
    Action, CleanupOutcome, DelayedRefs, DiskKey, EXTENT_FLAG_DATA, EXTENT_FLAG_TREE_BLOCK, ExtentOp, FlushMode,
    FsConfig, GenericRef, HeadOutcome, MemExtentTree, QgroupRecord, RefKey, RunMode, comp_refs, is_fstree, roots,
};
use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};

const N_TREE: usize = 3;
const N_DATA: usize = 3;
const P1: u64 = 1 << 40;
const P2: u64 = (1 << 40) + TREE_NB;

fn tree_bytenr(i: usize) -> u64 {
    (1 << 20) * (i as u64 + 1)
}

fn data_bytenr(i: usize) -> u64 {
    (1 << 30) + i as u64 * DATA_NB
}

/// (root, parent) of the tree keys.
const TREE_KEYS: [(u64, u64); 5] = [(5, 0), (256, 0), (2, 0), (5, P1), (2, P2)];
/// (root, ino, parent) of the data keys.
const DATA_KEYS: [(u64, u64, u64); 4] = [(5, 257, 0), (256, 258, 0), (roots::DATA_RELOC, 257, 0), (5, 260, P1)];

#[derive(Clone, Debug)]
#[allow(clippy::enum_variant_names)]
enum Op {
    /// Toggle tree key `key` of tree extent `ext` (add if absent, else drop),
    /// with an extent op of flag bit `op` if the extent stays live.
    Tree {
        ext: usize,
        key: usize,
        op: Option<u8>,
    },
    /// Add (or, if `drop` and present, drop) data key `key` of data extent `ext`.
    Data {
        ext: usize,
        key: usize,
        drop: bool,
    },
    /// An extent op on a live tree extent (flag bit, and a key write).
    ExtOp {
        ext: usize,
        bit: u8,
        key: Option<u8>,
    },
    RunOne,
    RunReady,
    /// `run(Bytes(n × C(1)))`, only without blockers (it would spin, §11.15).
    RunBytes(u64),
    /// `check_ref_cleanup` of extent `ext` (tree if `data` is false).
    Cleanup {
        ext: usize,
        data: bool,
    },
    Register,
    Unregister(usize),
    Bump,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => (0..N_TREE, 0..TREE_KEYS.len(), prop::option::weighted(0.3, 0u8..4))
            .prop_map(|(ext, key, op)| Op::Tree { ext, key, op }),
        6 => (0..N_DATA, 0..DATA_KEYS.len(), any::<bool>()).prop_map(|(ext, key, drop)| Op::Data { ext, key, drop }),
        1 => (0..N_TREE, 0u8..4, prop::option::of(0u8..3)).prop_map(|(ext, bit, key)| Op::ExtOp { ext, bit, key }),
        3 => Just(Op::RunOne),
        1 => Just(Op::RunReady),
        1 => (1u64..3).prop_map(Op::RunBytes),
        2 => (0..N_TREE.max(N_DATA), any::<bool>()).prop_map(|(ext, data)| Op::Cleanup { ext, data }),
        1 => Just(Op::Register),
        1 => any::<usize>().prop_map(Op::Unregister),
        1 => Just(Op::Bump),
    ]
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum St {
    /// No refs, no head: the next ref is an `AddExtent`.
    Free,
    /// True refs > 0.
    Live,
    /// All refs dropped; the head may still be queued.
    Retired,
}

#[derive(Clone, Debug)]
struct Ext {
    bytenr: u64,
    is_data: bool,
    num_bytes: u64,
    /// True refs per key: disk plus queued.
    counts: BTreeMap<RefKey, u64>,
    st: St,
    /// Flags and key the item must have once everything ran.
    flags: u64,
    key: Option<DiskKey>,
    /// Σ count_mod of add calls on the current head object (invariant 11).
    head_total: i64,
}

impl Ext {
    fn total(&self) -> u64 {
        self.counts.values().sum()
    }
}

struct Model {
    exts: Vec<Ext>,
    /// Qgroup records by bytenr (§9).
    qgroups: BTreeMap<u64, QgroupRecord>,
    pinned: u64,
}

impl Model {
    fn new() -> Self {
        let mk = |bytenr, is_data, num_bytes| Ext {
            bytenr,
            is_data,
            num_bytes,
            counts: BTreeMap::new(),
            st: St::Free,
            flags: 0,
            key: None,
            head_total: 0,
        };
        let mut exts: Vec<Ext> = (0..N_TREE).map(|i| mk(tree_bytenr(i), false, TREE_NB)).collect();
        exts.extend((0..N_DATA).map(|i| mk(data_bytenr(i), true, DATA_NB)));
        Model { exts, qgroups: BTreeMap::new(), pinned: 0 }
    }

    /// Record one add call's qgroup effect; returns whether a record is new.
    fn qgroup(&mut self, gref: &GenericRef, reserved: u64) -> bool {
        if gref.skip_qgroup {
            return false;
        }
        let rec = QgroupRecord::new(gref.bytenr, gref.num_bytes, gref.ref_root(), reserved);
        match self.qgroups.get_mut(&gref.bytenr) {
            Some(r) => {
                r.absorb(&rec);
                false
            }
            None => {
                self.qgroups.insert(gref.bytenr, rec);
                true
            }
        }
    }
}

fn ext_op(bit: u8, key: Option<u8>) -> ExtentOp {
    ExtentOp {
        key: DiskKey { objectid: key.unwrap_or(0) as u64 + 256, item_type: 1, offset: 0 },
        level: 0,
        update_key: key.is_some(),
        update_flags: true,
        flags_to_set: 0x100 << bit,
    }
}

fn apply_model_op(e: &mut Ext, op: &ExtentOp) {
    if op.update_flags {
        e.flags |= op.flags_to_set;
    }
    if op.update_key {
        e.key = Some(op.key);
    }
}

/// Apply a ref add to the model; returns the action used, or `None` to skip.
fn plan(e: &Ext, key: RefKey, want_drop: bool) -> Option<Action> {
    if e.st == St::Retired {
        return None;
    }
    let have = e.counts.get(&key).copied().unwrap_or(0);
    Some(if want_drop && have > 0 {
        Action::Drop
    } else if e.st == St::Free {
        Action::AddExtent
    } else {
        Action::Add
    })
}

fn record(e: &mut Ext, key: RefKey, action: Action) {
    if action == Action::AddExtent {
        e.st = St::Live;
        e.flags = if e.is_data { EXTENT_FLAG_DATA } else { EXTENT_FLAG_TREE_BLOCK };
        e.key = None;
    }
    let c = e.counts.entry(key).or_insert(0);
    if action == Action::Drop {
        *c -= 1;
        if *c == 0 {
            e.counts.remove(&key);
        }
        if e.total() == 0 {
            e.st = St::Retired;
        }
    } else {
        *c += 1;
    }
    e.head_total += action.count_mod();
}

fn run_case<D: DelayedRefs>(ops: &[Op]) {
    let refs = D::new(FsConfig { qgroups: true, ..FsConfig::default() });
    let tree = Recording::new(MemExtentTree::new());
    let rs = &refs.fs().reserves;
    let may_use0 = rs.snapshot().space.may_use;
    let mut h = rs.start_transaction(4, FlushMode::FlushAll).unwrap();
    let mut m = Model::new();
    let mut blockers = Vec::new();
    let g = *rs.geometry();

    for (step, op) in ops.iter().enumerate() {
        let before = refs.snapshot();
        match *op {
            Op::Tree { ext, key, op } => {
                let (root, parent) = TREE_KEYS[key];
                let e = &mut m.exts[ext];
                let gref = tref(Action::Add, e.bytenr, root, parent);
                let Some(action) = plan(e, gref.ref_key(), true) else { continue };
                let gref = GenericRef { action, ..gref };
                let stays_live = action != Action::Drop || e.total() > 1;
                let xop = op.filter(|_| stays_live).map(|b| ext_op(b, None));
                let out = refs.add_tree_ref(&mut h, &gref, xop).unwrap();
                record(e, gref.ref_key(), action);
                if let Some(x) = &xop {
                    apply_model_op(e, x);
                }
                assert_eq!(out.qgroup_record_inserted, m.qgroup(&gref, 0), "step {step}: qgroup record");
            }
            Op::Data { ext, key, drop } => {
                let (root, ino, parent) = DATA_KEYS[key];
                let e = &mut m.exts[N_TREE + ext];
                let gref = dref(Action::Add, e.bytenr, root, ino, 0, parent);
                let Some(action) = plan(e, gref.ref_key(), drop) else { continue };
                let gref = GenericRef { action, ..gref };
                let reserved = if action == Action::AddExtent { DATA_NB } else { 0 };
                let out = refs.add_data_ref(&mut h, &gref, reserved).unwrap();
                record(e, gref.ref_key(), action);
                assert_eq!(out.qgroup_record_inserted, m.qgroup(&gref, reserved), "step {step}: qgroup record");
            }
            Op::ExtOp { ext, bit, key } => {
                let e = &mut m.exts[ext];
                if e.st != St::Live {
                    continue;
                }
                let x = ext_op(bit, key);
                refs.add_extent_op(&mut h, e.bytenr, TREE_NB, x).unwrap();
                apply_model_op(e, &x);
            }
            Op::RunOne | Op::RunReady | Op::RunBytes(_) => {
                let candidates = pin_candidates(&before, refs.fs().seq.lowest_seq());
                match *op {
                    Op::RunOne => {
                        if let Some((b, outcome, st)) = refs.run_one(&tree).unwrap() {
                            assert!(before.iter().any(|h| h.bytenr == b), "ran an indexed head");
                            if outcome == HeadOutcome::HeldBack {
                                assert_eq!(st.held_back, 1);
                                let lowest = refs.fs().seq.lowest_seq();
                                assert_ne!(lowest, 0, "held back without a blocker");
                                let head = refs.find_head(b).expect("a held-back head stays indexed");
                                if !head.is_data {
                                    // Invariant 13.
                                    let old: Vec<_> = head.nodes.iter().filter(|n| n.key.seq < lowest).collect();
                                    for w in old.windows(2) {
                                        assert_ne!(
                                            comp_refs(&w[0].key, &w[1].key, false),
                                            std::cmp::Ordering::Equal,
                                            "step {step}: invariant 13 after merge: {head:#?}"
                                        );
                                    }
                                }
                                assert!(
                                    head.nodes.iter().any(|n| n.key.seq >= lowest),
                                    "held back only for a ref at or above the blocker (§5.2)"
                                );
                            } else {
                                assert!(refs.find_head(b).is_none(), "Deleted: the head left the index");
                            }
                        } else {
                            assert!(before.is_empty(), "run_one found nothing with heads queued");
                        }
                    }
                    Op::RunReady => {
                        let st = refs.run(&tree, RunMode::Ready).unwrap();
                        assert_eq!(st.heads, before.len() as u64, "step {step}: Ready runs num_heads_ready heads");
                        if blockers.is_empty() {
                            assert_eq!(st.held_back, 0);
                        }
                    }
                    Op::RunBytes(n) => {
                        if !blockers.is_empty() {
                            continue;
                        }
                        let want = n * g.delayed_ref_bytes(1);
                        let st = refs.run(&tree, RunMode::Bytes(want)).unwrap();
                        assert!(st.bytes_released >= want || refs.snapshot().is_empty(), "step {step}: Bytes({want})");
                    }
                    _ => unreachable!(),
                }
                for (b, nb) in candidates {
                    if refs.find_head(b).is_none() {
                        m.pinned += nb;
                    }
                }
            }
            Op::Cleanup { ext, data } => {
                let e = if data { &m.exts[N_TREE + ext % N_DATA] } else { &m.exts[ext % N_TREE] };
                let head = before.iter().find(|h| h.bytenr == e.bytenr);
                let want = match head {
                    None => CleanupOutcome::NoHead,
                    Some(h) if !h.nodes.is_empty() || (h.extent_op.is_some() && !h.must_insert_reserved) => {
                        CleanupOutcome::Busy
                    }
                    Some(h) => CleanupOutcome::Deleted { must_insert_reserved: h.must_insert_reserved },
                };
                assert_eq!(refs.check_ref_cleanup(e.bytenr), want, "step {step}: §7.2 on {head:#?}");
            }
            Op::Register => blockers.push(refs.fs().seq.register()),
            Op::Unregister(i) => {
                if !blockers.is_empty() {
                    let i = i % blockers.len();
                    drop(blockers.remove(i));
                }
            }
            Op::Bump => {
                refs.fs().seq.bump();
            }
        }
        check_step(&refs, &tree.inner, &mut m, step);
    }

    drop(blockers);
    let candidates = pin_candidates(&refs.snapshot(), 0);
    refs.run(&tree, RunMode::All).unwrap();
    m.pinned += candidates.iter().map(|(_, nb)| nb).sum::<u64>();
    check_step(&refs, &tree.inner, &mut m, usize::MAX);
    check_empty(&refs);
    // Invariant 17, and every backend call succeeded.
    for ev in tree.events() {
        match ev {
            Event::Ref(r, ok) => {
                assert!(ok, "backend refused {r:?}");
                if r.insert_reserved {
                    assert_eq!(r.action, Action::Add, "invariant 17: {r:?}");
                }
            }
            Event::Op { ok, .. } => assert!(ok, "backend refused an extent op"),
            Event::Pin { .. } => {}
        }
    }
    // The extent tree equals the model.
    let items = tree.inner.items();
    for e in &m.exts {
        match items.get(&e.bytenr) {
            None => assert_eq!(e.total(), 0, "extent {:#x} missing: {e:#?}", e.bytenr),
            Some(item) => {
                assert_eq!(item.backrefs, e.counts, "backrefs of {:#x}", e.bytenr);
                assert_eq!(item.refs, e.total());
                assert_eq!((item.is_data, item.num_bytes), (e.is_data, e.num_bytes));
                assert_eq!(item.flags, e.flags, "flags of {:#x}", e.bytenr);
                assert_eq!(item.key, e.key, "key of {:#x}", e.bytenr);
            }
        }
    }
    assert_eq!(items.len(), m.exts.iter().filter(|e| e.total() > 0).count());
    rs.end_transaction(h).unwrap();
    assert_eq!(rs.snapshot().space.may_use, may_use0, "every reserved byte returned");
}

/// Heads a run that deletes them must pin: a cancelled allocation, i.e.
/// must_insert_reserved and no node left once the merge pass ran with the
/// lowest blocker seq `lowest` (§5.1, §6.11 step 4, §11.11b). On a
/// metadata head the pass cancels same-key nodes older than the blocker.
fn pin_candidates(snap: &[delayed_refs::HeadSnapshot], lowest: u64) -> Vec<(u64, u64)> {
    let empty_after_merge = |h: &delayed_refs::HeadSnapshot| {
        if h.is_data {
            return h.nodes.is_empty();
        }
        let mut sums: BTreeMap<RefKey, i64> = BTreeMap::new();
        for n in &h.nodes {
            if lowest != 0 && n.key.seq >= lowest {
                return false;
            }
            *sums.entry(n.key.key).or_insert(0) += signed(n);
        }
        sums.values().all(|s| *s == 0)
    };
    snap.iter().filter(|h| h.must_insert_reserved && empty_after_merge(h)).map(|h| (h.bytenr, h.num_bytes)).collect()
}

fn check_step<D: DelayedRefs>(refs: &D, tree: &MemExtentTree, m: &mut Model, step: usize) {
    let snap = check_quiescent(refs);
    let heads: BTreeMap<u64, &delayed_refs::HeadSnapshot> = snap.iter().map(|h| (h.bytenr, h)).collect();
    let ours: BTreeSet<u64> = m.exts.iter().map(|e| e.bytenr).collect();
    assert!(heads.keys().all(|b| ours.contains(b)), "step {step}: unknown head");
    for e in &mut m.exts {
        let head = heads.get(&e.bytenr);
        match head {
            None => {
                e.head_total = 0;
                if e.st == St::Retired {
                    e.st = St::Free;
                }
            }
            Some(h) => {
                assert_eq!(h.total_ref_mod, e.head_total, "step {step}: invariant 11 at {:#x}: {h:#?}", e.bytenr);
                assert_eq!(h.is_data, e.is_data);
                if h.must_insert_reserved {
                    assert!(tree.item(e.bytenr).is_none(), "step {step}: invariant 16 at {:#x}", e.bytenr);
                }
                for n in &h.nodes {
                    if let RefKey::TreeBlock { root } | RefKey::ExtentData { root, .. } = n.key.key {
                        if is_fstree(root) {
                            assert!(n.key.seq <= refs.fs().seq.current(), "seq from the past (§4.3)");
                        }
                    }
                }
            }
        }
        // Invariants 12 and 18: disk + queued per key, and the reader's view.
        let disk = tree.item(e.bytenr).map(|i| i.backrefs).unwrap_or_default();
        for (k, have, want) in common::disk_plus_queued(&e.counts, &disk, head.copied()) {
            assert_eq!(have, want, "step {step}: invariant 12 {k:?} at {:#x}", e.bytenr);
        }
        let seen = refs.lookup_extent_info(tree, e.bytenr).unwrap().map(|i| i.refs).unwrap_or(0);
        assert_eq!(seen, e.total(), "step {step}: invariant 18 lookup at {:#x}", e.bytenr);
    }
    // Invariant 25 and §9.
    let recs = refs.qgroup_records();
    assert_eq!(recs, m.qgroups.values().copied().collect::<Vec<_>>(), "step {step}: qgroup records");
    assert_eq!(tree.pinned_bytes(), m.pinned, "step {step}: pinned bytes of cancelled allocations");
}

/// Random valid sequences keep every observable invariant of §10.
fn random_sequences_keep_invariants<D: DelayedRefs>() {
    let cases = std::env::var("DREF_INVARIANT_CASES").ok().and_then(|s| s.parse().ok()).unwrap_or(256);
    let mut runner = TestRunner::new(Config { cases, failure_persistence: None, ..Config::default() });
    runner
        .run(&prop::collection::vec(op(), 1..80), |ops| {
            run_case::<D>(&ops);
            Ok(())
        })
        .unwrap();
}

/// A fixed sequence exercising every branch at least once (cancelled
/// allocation, hold-back with a merge, cleanup, op), as a smoke test that
/// does not depend on the generator.
fn fixed_sequence<D: DelayedRefs>() {
    use Op::*;
    run_case::<D>(&[
        Tree { ext: 0, key: 0, op: Some(1) },
        Tree { ext: 0, key: 3, op: None },
        Data { ext: 0, key: 0, drop: false },
        Data { ext: 0, key: 0, drop: true },
        Cleanup { ext: 0, data: true },
        Data { ext: 1, key: 1, drop: false },
        RunOne,
        RunOne,
        Register,
        Tree { ext: 0, key: 0, op: None },
        Bump,
        Tree { ext: 0, key: 0, op: None },
        Data { ext: 1, key: 2, drop: false },
        RunReady,
        ExtOp { ext: 0, bit: 2, key: Some(1) },
        Unregister(0),
        Tree { ext: 1, key: 1, op: None },
        Tree { ext: 1, key: 1, op: None },
        RunBytes(2),
        RunOne,
    ]);
}

for_each_impl!(random_sequences_keep_invariants, fixed_sequence);
