//! The kernel's delayed-ref self-test cases (written fresh
//! against docs/semantics.md; no kernel code), plus per-operation semantics:
//! counters (§4.5-4.9, invariants 1-3, 20), the delayed-refs reserve (§8.3,
//! invariant 21), extent ops (§4.6 step 4, §4.8), must_insert_reserved
//! (§6.10, §6.11, §11.11), seq hold-back and the merge pass (§5.1, §5.2,
//! §6.8, §5.3), check_ref_cleanup (§7.2), destroy (§7.3), readers
//! (§7.1), qgroup records (§9) and run modes (§6.5).
//!
//! Every test is generic over `D: DelayedRefs`; see `common::for_each_impl!`.

#[macro_use]
mod common;

use std::sync::Mutex;

use common::*;
use delayed_refs::{
    Action, BLOCK_FLAG_FULL_BACKREF, CleanupOutcome, Counters, DelayedRefs, DiskKey, EXTENT_FLAG_DATA,
    EXTENT_FLAG_TREE_BLOCK, ExtentInfo, ExtentOp, FsConfig, GenericRef, HeadOutcome, MemExtentTree, NodeKey,
    QgroupRecord, RefKey, RunMode, TransHandle, roots,
};

const X: u64 = 1 << 30;
const Y: u64 = 2 << 30;
const Z: u64 = 3 << 30;
const W: u64 = 4 << 30;

fn counters(heads: u64, entries: u64, pending_csums: u64) -> Counters {
    Counters { num_heads: heads, num_heads_ready: heads, num_entries: entries, pending_csums }
}

fn only_head<D: DelayedRefs>(refs: &D) -> delayed_refs::HeadSnapshot {
    let snap = check_quiescent(refs);
    assert_eq!(snap.len(), 1, "{}: expected one head: {snap:#?}", D::NAME);
    snap.into_iter().next().unwrap()
}

/// Self-test: one ADD or DROP of each of the four types makes one head with
/// `ref_mod == total_ref_mod == ±1` and one node with matching fields
/// (§4.1-4.5, §4.7 step 2); counters and reserve follow (§4.5 step 4,
/// §8.3, invariants 1-3, 20, 21).
fn single_ref_each_type<D: DelayedRefs>() {
    for kind in KINDS {
        for action in [Action::Add, Action::Drop] {
            let refs = D::new(FsConfig::default());
            let g = *refs.fs().reserves.geometry();
            let mut h = TransHandle::new();
            let mut gref = kind.gref(action, X, 3);
            if let delayed_refs::RefPayload::Tree { root, .. } = gref.payload {
                gref.payload = delayed_refs::RefPayload::Tree { level: 2, root };
            }
            let out = add(&refs, &mut h, &gref);
            assert!(!out.merged, "{kind:?} {action:?}: first ref is not a merge");
            assert_eq!((h.delayed_ref_updates, h.delayed_ref_csum_deletions), (0, 0), "§8.3 step 4 zeroes the handle");
            let head = only_head(&refs);
            assert_eq!(head.bytenr, X);
            assert_eq!(head.num_bytes, kind.nb());
            assert_eq!(head.is_data, kind.is_data());
            assert!(!head.is_system && !head.must_insert_reserved && !head.processing);
            assert_eq!(head.ref_mod, action.count_mod(), "{kind:?} {action:?}");
            assert_eq!(head.total_ref_mod, action.count_mod(), "{kind:?} {action:?}");
            assert_eq!(head.owning_root, gref.owning_root);
            assert_eq!(head.extent_op, None);
            assert_eq!(head.nodes.len(), 1);
            let n = head.nodes[0];
            assert_eq!(n.key, NodeKey { key: gref.ref_key(), seq: 0 });
            assert_eq!(
                n.key.key.ref_type() as u8,
                match kind {
                    Kind::TreeBlock => 176,
                    Kind::ExtentData => 178,
                    Kind::SharedBlock => 182,
                    Kind::SharedData => 184,
                }
            );
            assert_eq!(n.action, action);
            assert_eq!(n.ref_mod, 1);
            assert_eq!(n.level, if kind.is_data() { 0 } else { 2 }, "tree level recorded");
            let csum = kind.is_data() && action == Action::Drop;
            assert_eq!(refs.counters(), counters(1, 2, if csum { DATA_NB } else { 0 }), "{kind:?} {action:?}");
            let want = g.delayed_ref_bytes(1) + if csum { csum_rsv(&g, DATA_NB) } else { 0 };
            assert_eq!(refs.fs().reserves.snapshot().delayed_refs.size, want, "{kind:?} {action:?} rsv");
            assert_eq!(refs.find_head(X), Some(head));
            assert_eq!(refs.find_head(X + 1), None, "exact match only (§6.1)");
        }
    }
}

/// A tree ref of the chunk tree marks the head `is_system` (§4.1 step 1).
fn chunk_tree_ref_is_system<D: DelayedRefs>() {
    let refs = D::new(FsConfig::default());
    let mut h = TransHandle::new();
    add(&refs, &mut h, &tref(Action::Add, X, roots::CHUNK_TREE, 0));
    add(&refs, &mut h, &tref(Action::Add, Y, 2, 0));
    let snap = check_quiescent(&refs);
    assert!(snap[0].is_system);
    assert!(!snap[1].is_system);
}

/// Self-test: ADD then DROP of one ref leaves the head with `ref_mod` 0 and
/// no node (§4.7 step 3, §4.9); the run then deletes the head without
/// touching the extent tree. DROP then ADD of a data ref undoes the csum
/// accounting (§4.6 step 6).
fn add_then_drop_cancels<D: DelayedRefs>() {
    for kind in KINDS {
        let refs = D::new(FsConfig::default());
        let tree = Recording::new(MemExtentTree::new());
        let mut h = TransHandle::new();
        add(&refs, &mut h, &kind.gref(Action::Add, X, 1));
        let out = add(&refs, &mut h, &kind.gref(Action::Drop, X, 1));
        assert!(out.merged, "{kind:?}: the drop cancels the add");
        let head = only_head(&refs);
        assert_eq!((head.ref_mod, head.total_ref_mod), (0, 0));
        assert!(head.nodes.is_empty());
        assert_eq!(refs.counters(), counters(1, 1, 0));
        assert_eq!(refs.fs().reserves.snapshot().delayed_refs.size, 0, "§4.9 releases C(1)");
        let st = refs.run(&tree, RunMode::All).unwrap();
        assert_eq!(tree.events(), vec![], "{kind:?}: nothing to apply");
        assert_eq!((st.heads, st.refs, st.heads_deleted), (1, 0, 1));
        check_empty(&refs);
    }
    for kind in [Kind::ExtentData, Kind::SharedData] {
        let refs = D::new(FsConfig::default());
        let g = *refs.fs().reserves.geometry();
        let mut h = TransHandle::new();
        add(&refs, &mut h, &kind.gref(Action::Drop, X, 1));
        assert_eq!(refs.counters().pending_csums, DATA_NB, "§4.5 step 4");
        assert_eq!(refs.fs().reserves.snapshot().delayed_refs.size, g.delayed_ref_bytes(1) + csum_rsv(&g, DATA_NB));
        add(&refs, &mut h, &kind.gref(Action::Add, X, 1));
        let head = only_head(&refs);
        assert_eq!((head.ref_mod, head.total_ref_mod, head.nodes.len()), (0, 0, 0));
        assert_eq!(refs.counters(), counters(1, 1, 0), "§4.6 step 6: old < 0 && total >= 0");
        assert_eq!(refs.fs().reserves.snapshot().delayed_refs.size, 0, "K(L) released at the transition");
    }
}

/// Self-test: two ADDs of one ref give one node with `ref_mod` 2 (§4.7).
fn two_adds_merge<D: DelayedRefs>() {
    for kind in KINDS {
        let refs = D::new(FsConfig::default());
        let g = *refs.fs().reserves.geometry();
        let mut h = TransHandle::new();
        assert!(!add(&refs, &mut h, &kind.gref(Action::Add, X, 0)).merged);
        assert!(add(&refs, &mut h, &kind.gref(Action::Add, X, 0)).merged);
        let head = only_head(&refs);
        assert_eq!((head.ref_mod, head.total_ref_mod), (2, 2));
        assert_eq!(head.nodes.len(), 1);
        assert_eq!((head.nodes[0].action, head.nodes[0].ref_mod), (Action::Add, 2));
        assert_eq!(refs.counters(), counters(1, 2, 0));
        assert_eq!(refs.fs().reserves.snapshot().delayed_refs.size, g.delayed_ref_bytes(1), "merges add no C(1)");
    }
}

/// Self-test: ten ADDs then twelve DROPs leave one DROP node with `ref_mod`
/// 2 (through zero: the node is dropped at 0 and a new one is created), and
/// the mirror case. For data, the merged count runs in one go.
fn sign_flip_through_zero<D: DelayedRefs>() {
    for kind in KINDS {
        for (first, second) in [(Action::Add, Action::Drop), (Action::Drop, Action::Add)] {
            let refs = D::new(FsConfig::default());
            let g = *refs.fs().reserves.geometry();
            let tree = Recording::new(MemExtentTree::new());
            let mut h = TransHandle::new();
            for i in 0..10 {
                add(&refs, &mut h, &kind.gref(first, X, 0));
                let head = only_head(&refs);
                assert_eq!(head.nodes.len(), 1);
                assert_eq!((head.nodes[0].action, head.nodes[0].ref_mod), (first, i + 1));
            }
            let negative_first = kind.is_data() && first == Action::Drop;
            assert_eq!(refs.counters().pending_csums, if negative_first { DATA_NB } else { 0 });
            for i in 0..12i64 {
                add(&refs, &mut h, &kind.gref(second, X, 0));
                let head = only_head(&refs);
                let net = 9 - i; // count of `first` left (negative: of `second`)
                assert_eq!(head.ref_mod, net * first.count_mod());
                assert_eq!(head.total_ref_mod, net * first.count_mod());
                match net {
                    0 => {
                        assert!(head.nodes.is_empty(), "{kind:?}: node dropped at zero");
                        assert_eq!(refs.counters().num_entries, 1);
                    }
                    n if n > 0 => assert_eq!((head.nodes[0].action, head.nodes[0].ref_mod), (first, n as u64)),
                    n => assert_eq!((head.nodes[0].action, head.nodes[0].ref_mod), (second, (-n) as u64)),
                }
            }
            let head = only_head(&refs);
            assert_eq!(head.nodes.len(), 1);
            assert_eq!((head.nodes[0].action, head.nodes[0].ref_mod), (second, 2));
            let negative = kind.is_data() && second == Action::Drop;
            assert_eq!(refs.counters(), counters(1, 2, if negative { DATA_NB } else { 0 }));
            let want = g.delayed_ref_bytes(1) + if negative { csum_rsv(&g, DATA_NB) } else { 0 };
            assert_eq!(refs.fs().reserves.snapshot().delayed_refs.size, want);
            if kind.is_data() {
                // Run the net change: one ref with ref_mod 2.
                let key = kind.gref(Action::Add, X, 0).ref_key();
                load_item(&tree.inner, X, DATA_NB, true, &[(key, 3)]);
                refs.run(&tree, RunMode::All).unwrap();
                let runs = tree.runs();
                assert_eq!(runs.len(), 1);
                assert_eq!((runs[0].action, runs[0].ref_mod, runs[0].key), (second, 2, key));
                let want = if second == Action::Drop { 1 } else { 5 };
                assert_eq!(tree.inner.item(X).unwrap().backrefs[&key], want);
                check_empty(&refs);
            }
        }
    }
}

/// Self-test: fifty refs alternating between two types, then their drops,
/// leave nothing: no node, head mod 0, reserve back to 0, and a run that
/// applies nothing.
fn fifty_alternating_then_drops<D: DelayedRefs>() {
    for (a, b) in [(Kind::TreeBlock, Kind::SharedBlock), (Kind::ExtentData, Kind::SharedData)] {
        let refs = D::new(FsConfig::default());
        let g = *refs.fs().reserves.geometry();
        let tree = Recording::new(MemExtentTree::new());
        let mut h = TransHandle::new();
        let refs_of = |action| (0..50u64).map(move |i| if i % 2 == 0 { a } else { b }.gref(action, X, i));
        for r in refs_of(Action::Add) {
            add(&refs, &mut h, &r);
        }
        let head = only_head(&refs);
        assert_eq!(head.nodes.len(), 50);
        assert_eq!((head.ref_mod, head.total_ref_mod), (50, 50));
        assert!(head.nodes[..25].iter().all(|n| n.key.key.ref_type() as u8 == if a.is_data() { 178 } else { 176 }));
        assert_eq!(refs.counters(), counters(1, 51, 0));
        assert_eq!(refs.fs().reserves.snapshot().delayed_refs.size, g.delayed_ref_bytes(50));
        for r in refs_of(Action::Drop) {
            assert!(add(&refs, &mut h, &r).merged);
        }
        let head = only_head(&refs);
        assert!(head.nodes.is_empty());
        assert_eq!((head.ref_mod, head.total_ref_mod), (0, 0));
        assert_eq!(refs.counters(), counters(1, 1, 0));
        assert_eq!(refs.fs().reserves.snapshot().delayed_refs.size, 0);
        refs.run(&tree, RunMode::All).unwrap();
        assert!(tree.events().is_empty());
        check_empty(&refs);
    }
}

/// The locked port keeps the kernel's FIFO add list (§3.3) exactly; the
/// lock-free runner takes adds in key order, and must keep adds before
/// drops (§3.4, §11.10): the same adds, all before the same drops.
fn assert_run_order<D: DelayedRefs>(ran: Vec<(Action, RefKey)>, fifo: Vec<(Action, RefKey)>) {
    if D::NAME == "locked" {
        assert_eq!(ran, fifo);
        return;
    }
    let split = |v: &[(Action, RefKey)]| {
        let n = v.iter().take_while(|(a, _)| *a == Action::Add).count();
        let mut adds = v[..n].to_vec();
        adds.sort_by_key(|(_, k)| *k);
        (adds, v[n..].to_vec())
    };
    assert!(
        ran[ran.iter().take_while(|(a, _)| *a == Action::Add).count()..].iter().all(|(a, _)| *a == Action::Drop),
        "an add ran after a drop: {ran:?}"
    );
    assert_eq!(split(&ran), split(&fifo));
}

fn order(runs: &[RunRecord]) -> Vec<(Action, RefKey)> {
    runs.iter().map(|r| (r.action, r.key)).collect()
}

/// Run everything, queueing `late` from the backend while it applies the
/// first drop (the runner is then in its drop phase); `new_seq` first moves
/// the tree-mod-log seq on, so `late` gets its own node.
fn run_with_late_add<D: DelayedRefs>(refs: &D, tree: &Recording, late: &GenericRef, new_seq: bool) {
    run_with_late_refs(refs, tree, Action::Drop, std::slice::from_ref(late), new_seq);
}

/// Run everything, queueing `lates` in order from the backend while it
/// applies the first ref with action `on`; `new_seq` moves the tree-mod-log
/// seq on before each, so each gets its own node.
fn run_with_late_refs<D: DelayedRefs>(refs: &D, tree: &Recording, on: Action, lates: &[GenericRef], new_seq: bool) {
    let pending = Mutex::new(Some(TransHandle::new()));
    let hooked = Hooked {
        inner: tree,
        hook: Box::new(|run: &delayed_refs::RefRun<'_>| {
            if run.action == on {
                if let Some(mut h) = pending.lock().unwrap().take() {
                    for late in lates {
                        if new_seq {
                            drop(refs.fs().seq.register());
                        }
                        add(refs, &mut h, late);
                    }
                }
            }
        }),
    };
    refs.run(&hooked, RunMode::All).unwrap();
}

/// Self-test: selection returns adds before drops even when the drop sorts
/// first (§3.4, §11.10), adds in FIFO order (§3.3), also after a merge
/// cancelled an add and after a cancelled add was re-added.
fn adds_run_before_drops<D: DelayedRefs>() {
    let t = |root| RefKey::TreeBlock { root };
    let sh = RefKey::SharedBlock { parent: 1 << 40 };
    // A: one drop that sorts first, two adds queued 7 then 6.
    {
        let refs = D::new(FsConfig::default());
        let tree = Recording::new(MemExtentTree::new());
        load_item(&tree.inner, X, TREE_NB, false, &[(t(5), 1)]);
        let mut h = TransHandle::new();
        add(&refs, &mut h, &tref(Action::Drop, X, 5, 0));
        add(&refs, &mut h, &tref(Action::Add, X, 7, 0));
        add(&refs, &mut h, &tref(Action::Add, X, 6, 0));
        let head = only_head(&refs);
        let keys: Vec<RefKey> = head.nodes.iter().map(|n| n.key.key).collect();
        assert_eq!(keys, vec![t(5), t(6), t(7)], "tree in key order");
        refs.run(&tree, RunMode::All).unwrap();
        assert_run_order::<D>(
            order(&tree.runs()),
            vec![(Action::Add, t(7)), (Action::Add, t(6)), (Action::Drop, t(5))],
        );
        let item = tree.inner.item(X).unwrap();
        assert_eq!(item.refs, 2);
        check_empty(&refs);
    }
    // B1: ADD A, DROP B, DROP A (cancels A): only the drop runs.
    {
        let refs = D::new(FsConfig::default());
        let tree = Recording::new(MemExtentTree::new());
        load_item(&tree.inner, X, TREE_NB, false, &[(t(5), 1), (t(9), 1)]);
        let mut h = TransHandle::new();
        add(&refs, &mut h, &tref(Action::Add, X, 6, 0));
        add(&refs, &mut h, &tref(Action::Drop, X, 5, 0));
        add(&refs, &mut h, &tref(Action::Drop, X, 6, 0));
        refs.run(&tree, RunMode::All).unwrap();
        assert_eq!(order(&tree.runs()), vec![(Action::Drop, t(5))]);
        assert_eq!(tree.inner.item(X).unwrap().refs, 1);
    }
    // B2: ADD A, DROP B, ADD C, DROP A (cancel), ADD A again: FIFO is C, A.
    {
        let refs = D::new(FsConfig::default());
        let tree = Recording::new(MemExtentTree::new());
        load_item(&tree.inner, X, TREE_NB, false, &[(t(5), 1)]);
        let mut h = TransHandle::new();
        add(&refs, &mut h, &tref(Action::Add, X, 6, 0));
        add(&refs, &mut h, &tref(Action::Drop, X, 5, 0));
        add(&refs, &mut h, &tref(Action::Add, X, 256, 1 << 40));
        add(&refs, &mut h, &tref(Action::Drop, X, 6, 0));
        add(&refs, &mut h, &tref(Action::Add, X, 6, 0));
        refs.run(&tree, RunMode::All).unwrap();
        assert_run_order::<D>(order(&tree.runs()), vec![(Action::Add, sh), (Action::Add, t(6)), (Action::Drop, t(5))]);
        assert_eq!(tree.inner.item(X).unwrap().refs, 2);
        check_empty(&refs);
    }
    // C: data, the drop and the add of one key have different seqs (so they
    // do not merge; data heads are never merged by the pass): the add must
    // run first, or the drop would delete the item and the add would fail.
    {
        let refs = D::new(FsConfig::default());
        let tree = Recording::new(MemExtentTree::new());
        let k = RefKey::ExtentData { root: 5, objectid: 257, offset: 0 };
        load_item(&tree.inner, X, DATA_NB, true, &[(k, 1)]);
        let mut h = TransHandle::new();
        drop(refs.fs().seq.register());
        add(&refs, &mut h, &dref(Action::Drop, X, 5, 257, 0, 0));
        drop(refs.fs().seq.register());
        add(&refs, &mut h, &dref(Action::Add, X, 5, 257, 0, 0));
        let head = only_head(&refs);
        assert_eq!(head.nodes.len(), 2, "different seq: no insert merge");
        assert_eq!((head.nodes[0].action, head.nodes[0].key.seq), (Action::Drop, 1));
        assert_eq!((head.nodes[1].action, head.nodes[1].key.seq), (Action::Add, 2));
        refs.run(&tree, RunMode::All).unwrap();
        assert_eq!(order(&tree.runs()), vec![(Action::Add, k), (Action::Drop, k)]);
        assert_eq!(tree.inner.item(X).unwrap().backrefs[&k], 1);
        check_empty(&refs);
    }
    // D: an ADD queued while the runner is in its drop phase, under a key
    // the drop walk has already passed, runs before the next drop (§3.3,
    // §11.18: the kernel takes the add list first at every selection; the
    // lock-free runner finds it through its late-ADD marker). Without it the
    // three drops would free the extent and the add would fail.
    {
        let refs = D::new(FsConfig::default());
        let tree = Recording::new(MemExtentTree::new());
        load_item(&tree.inner, X, TREE_NB, false, &[(t(5), 1), (t(6), 1), (t(7), 1)]);
        let mut h = TransHandle::new();
        for root in [5, 6, 7] {
            add(&refs, &mut h, &tref(Action::Drop, X, root, 0));
        }
        run_with_late_add(&refs, &tree, &tref(Action::Add, X, 3, 0), false);
        assert_eq!(
            order(&tree.runs()),
            vec![(Action::Drop, t(5)), (Action::Add, t(3)), (Action::Drop, t(6)), (Action::Drop, t(7))]
        );
        assert_eq!(tree.inner.item(X).map(|i| i.refs), Some(1));
        check_empty(&refs);
    }
    // E: metadata, a late ADD of a backref whose DROP (older seq) is still
    // queued: the kernel merges the head after every ref (§5.1, §6.8
    // step 9), so the two cancel and neither runs; running the ADD first
    // would insert a second copy of a tree backref (§11.9). Root 257 is an
    // fs tree, so its refs carry the tree-mod-log seq and do not merge on
    // insert.
    {
        let refs = D::new(FsConfig::default());
        let tree = Recording::new(MemExtentTree::new());
        load_item(&tree.inner, X, TREE_NB, false, &[(t(5), 1), (t(257), 1), (t(9), 1)]);
        let mut h = TransHandle::new();
        drop(refs.fs().seq.register());
        for root in [5, 257] {
            add(&refs, &mut h, &tref(Action::Drop, X, root, 0));
        }
        run_with_late_add(&refs, &tree, &tref(Action::Add, X, 257, 0), true);
        assert_eq!(order(&tree.runs()), vec![(Action::Drop, t(5))]);
        let item = tree.inner.item(X).unwrap();
        assert_eq!((item.refs, item.backrefs.get(&t(257)).copied()), (2, Some(1)));
        check_empty(&refs);
    }
    // F: metadata, one backref toggled DROP/ADD/DROP at three seqs while
    // the runner is in its add phase (queued from the backend while it
    // applies the first ADD; the second ADD, still ahead of the walk, sorts
    // between it and that backref, so the walk goes on into the toggled
    // nodes rather than ending and leaving them to the late-ADD path). The kernel
    // merges before every ref it selects (§5.1, §6.8 step 9), so the
    // three fold into one DROP. Taking the middle ADD on its own (a merge
    // done only once per pass) runs ADD, DROP, DROP; under adders that keep
    // toggling, such leftovers later fold into one node with ref_mod 2 or
    // more (Error::TreeRefMod, an intermittent mt_add_run failure, since fixed).
    {
        let refs = D::new(FsConfig::default());
        let tree = Recording::new(MemExtentTree::new());
        load_item(&tree.inner, X, TREE_NB, false, &[(t(5), 1), (t(257), 1)]);
        let mut h = TransHandle::new();
        add(&refs, &mut h, &tref(Action::Add, X, 3, 0));
        add(&refs, &mut h, &tref(Action::Add, X, 4, 0));
        let toggles = [Action::Drop, Action::Add, Action::Drop].map(|a| tref(a, X, 257, 0));
        run_with_late_refs(&refs, &tree, Action::Add, &toggles, true);
        assert_eq!(order(&tree.runs()), vec![(Action::Add, t(3)), (Action::Add, t(4)), (Action::Drop, t(257))]);
        let item = tree.inner.item(X).unwrap();
        assert_eq!((item.refs, item.backrefs.get(&t(257)).copied()), (3, None));
        check_empty(&refs);
    }
    // H: metadata, a shared backref (its key names no root) changed by an fs
    // tree (ops carry the current seq) and by a tree that is not an fs tree
    // (ops carry seq 0, like relocation's drop and re-add, §11.9). An ADD at
    // seq s1 is queued; while the add scan applies an ADD of a lower key, the
    // backref is dropped at seq 0 and re-added at seq s2. The seq-0 node sorts
    // before the scan's position, so folding from the node the scan stands on
    // would fold only the two ADDs (ref_mod 2, TreeRefMod); folding the whole
    // identity, as the kernel does, leaves one ADD.
    {
        let refs = D::new(FsConfig::default());
        let tree = Recording::new(MemExtentTree::new());
        load_item(&tree.inner, X, TREE_NB, false, &[(t(5), 1)]);
        let mut h = TransHandle::new();
        drop(refs.fs().seq.register());
        add(&refs, &mut h, &tref(Action::Add, X, 3, 0));
        add(&refs, &mut h, &tref(Action::Add, X, 256, 1 << 40));
        let lates = [tref(Action::Drop, X, 2, 1 << 40), tref(Action::Add, X, 256, 1 << 40)];
        run_with_late_refs(&refs, &tree, Action::Add, &lates, true);
        assert_eq!(order(&tree.runs()), vec![(Action::Add, t(3)), (Action::Add, sh)]);
        let item = tree.inner.item(X).unwrap();
        assert_eq!((item.refs, item.backrefs.get(&sh).copied()), (3, Some(1)));
        check_empty(&refs);
    }
    // G: metadata, a late ADD held back by a blocker that registered during
    // the run, behind a queued DROP of the same backref below that blocker:
    // the two do not merge (§5.1 merges below the lowest blocker only),
    // and the held ADD stops every drop, as the kernel's add list would
    // select it first and unselect the head (§3.3, §5.2). Once the blocker
    // leaves, the two cancel; running the DROP first would apply a DROP and
    // an ADD of one tree backref instead.
    {
        let refs = D::new(FsConfig::default());
        let tree = Recording::new(MemExtentTree::new());
        load_item(&tree.inner, X, TREE_NB, false, &[(t(5), 1), (t(257), 1)]);
        let mut h = TransHandle::new();
        add(&refs, &mut h, &tref(Action::Drop, X, 5, 0));
        add(&refs, &mut h, &tref(Action::Drop, X, 257, 0));
        let blocker = Mutex::new(None);
        let pending = Mutex::new(Some(TransHandle::new()));
        let hooked = Hooked {
            inner: &tree,
            hook: Box::new(|run: &delayed_refs::RefRun<'_>| {
                if run.key == t(5) {
                    if let Some(mut h) = pending.lock().unwrap().take() {
                        *blocker.lock().unwrap() = Some(refs.fs().seq.register());
                        add(&refs, &mut h, &tref(Action::Add, X, 257, 0));
                    }
                }
            }),
        };
        let (_, outcome, _) = refs.run_one(&hooked).unwrap().unwrap();
        assert_eq!(outcome, HeadOutcome::HeldBack);
        assert_eq!(order(&tree.runs()), vec![(Action::Drop, t(5))], "the held ADD stops the DROP");
        drop(blocker.lock().unwrap().take());
        refs.run(&tree, RunMode::All).unwrap();
        assert_eq!(order(&tree.runs()), vec![(Action::Drop, t(5))], "DROP and ADD cancel");
        assert_eq!(tree.inner.item(X).unwrap().backrefs.get(&t(257)).copied(), Some(1));
        check_empty(&refs);
    }
}

/// The delayed-refs reserve grows by `C(n)` per new node plus `K(L)` per data
/// head going negative, after every add (§8.3, invariant 21), is backed by
/// the handle's local reserve as far as it goes, and returns to 0 after the
/// run; all bytes return to the space info (§8.2, §8.10).
fn delayed_refs_rsv_tracks_nodes<D: DelayedRefs>() {
    let refs = D::new(FsConfig::default());
    let g = *refs.fs().reserves.geometry();
    let c1 = g.delayed_ref_bytes(1);
    let k1 = csum_rsv(&g, DATA_NB);
    let tree = MemExtentTree::new();
    load_item(&tree, Y, DATA_NB, true, &[(RefKey::ExtentData { root: 5, objectid: 257, offset: 0 }, 1)]);
    let mut h = TransHandle::new();
    let size = |refs: &D| refs.fs().reserves.snapshot().delayed_refs;
    add(&refs, &mut h, &tref(Action::AddExtent, X, 5, 0));
    assert_eq!(size(&refs).size, c1);
    add(&refs, &mut h, &dref(Action::Drop, Y, 5, 257, 0, 0));
    assert_eq!(size(&refs).size, 2 * c1 + k1);
    add(&refs, &mut h, &dref(Action::Add, Y, 5, 300, 0, 0));
    assert_eq!(size(&refs).size, 3 * c1, "total_ref_mod back to 0: K released (§4.6 step 6)");
    add(&refs, &mut h, &dref(Action::Add, Y, 5, 300, 0, 0));
    assert_eq!(size(&refs).size, 3 * c1, "a merge adds nothing");
    add(&refs, &mut h, &dref(Action::Add, Y, 5, 257, 0, 0));
    assert_eq!(size(&refs).size, 2 * c1, "a cancel releases C(1) (§4.9)");
    assert_eq!(size(&refs).reserved, 0, "an unbacked handle backs nothing");
    check_quiescent(&refs);
    refs.run(&tree, RunMode::All).unwrap();
    check_empty(&refs);

    // A backed handle: start_transaction(1) reserves I(1) + C(1).
    let refs = D::new(FsConfig::default());
    let r = &refs.fs().reserves;
    let tree = MemExtentTree::new();
    let may_use0 = r.snapshot().space.may_use;
    let mut h = r.start_transaction(1, delayed_refs::FlushMode::FlushAll).unwrap();
    assert_eq!(r.snapshot().space.may_use, may_use0 + g.insert_metadata_size(1) + c1);
    add(&refs, &mut h, &tref(Action::AddExtent, X, 5, 0));
    add(&refs, &mut h, &tref(Action::AddExtent, Z, 5, 0));
    let d = r.snapshot().delayed_refs;
    assert_eq!((d.size, d.reserved), (2 * c1, c1), "take = min(n, local.reserved) (§8.3 step 2-3)");
    assert_eq!(h.local_rsv().reserved, 0);
    refs.run(&tree, RunMode::All).unwrap();
    let d = r.snapshot().delayed_refs;
    assert_eq!((d.size, d.reserved), (0, 0), "released and clamped (§8.2)");
    r.end_transaction(h).unwrap();
    let s = r.snapshot();
    assert_eq!(s.space.may_use, may_use0, "every byte returned to the space info");
    assert_eq!(s.global.reserved, s.global.size);
    check_empty(&refs);
}

/// Extent ops: a node-less head carrying only an op (§4.8), ops merged with
/// later keys replacing and flags accumulating, level kept (§4.6 step 4);
/// run on their own at cleanup (§6.11 step 1) or with the first ref run
/// after them (§6.10).
fn extent_op_merge<D: DelayedRefs>() {
    let refs = D::new(FsConfig::default());
    let tree = Recording::new(MemExtentTree::new());
    load_item(&tree.inner, X, TREE_NB, false, &[(RefKey::TreeBlock { root: 5 }, 1)]);
    let mut h = TransHandle::new();
    let k1 = DiskKey { objectid: 256, item_type: 1, offset: 0 };
    let k2 = DiskKey { objectid: 300, item_type: 84, offset: 7 };
    let op1 = ExtentOp { key: k1, update_key: true, level: 1, ..ExtentOp::default() };
    refs.add_extent_op(&mut h, X, TREE_NB, op1).unwrap();
    let head = only_head(&refs);
    assert_eq!((head.ref_mod, head.total_ref_mod, head.nodes.len()), (0, 0, 0));
    assert_eq!((head.is_data, head.owning_root), (false, 0));
    assert_eq!(head.extent_op, Some(op1));
    assert_eq!(refs.counters(), counters(1, 1, 0));
    assert_eq!(refs.fs().reserves.snapshot().delayed_refs.size, 0, "a head alone reserves nothing (§4.5 note)");
    refs.add_extent_op(&mut h, X, TREE_NB, ExtentOp::set_flags(BLOCK_FLAG_FULL_BACKREF, 3)).unwrap();
    refs.add_extent_op(
        &mut h,
        X,
        TREE_NB,
        ExtentOp { key: k2, update_key: true, update_flags: true, flags_to_set: 0x4, level: 5 },
    )
    .unwrap();
    let merged = ExtentOp { key: k2, level: 1, update_key: true, update_flags: true, flags_to_set: 0x104 };
    assert_eq!(only_head(&refs).extent_op, Some(merged));
    assert_eq!(
        refs.lookup_extent_info(&tree, X).unwrap(),
        Some(ExtentInfo { refs: 1, flags: EXTENT_FLAG_TREE_BLOCK | 0x104 })
    );
    let st = refs.run(&tree, RunMode::All).unwrap();
    assert_eq!(tree.take(), vec![Event::Op { bytenr: X, op: merged, ok: true }]);
    assert_eq!((st.extent_ops, st.refs, st.heads_deleted), (1, 0, 1));
    let item = tree.inner.item(X).unwrap();
    assert_eq!((item.flags, item.key), (EXTENT_FLAG_TREE_BLOCK | 0x104, Some(k2)));
    check_empty(&refs);

    // An op on a head with refs goes with the first ref run, once.
    let op = ExtentOp::set_flags(0x8, 0);
    refs.add_tree_ref(&mut h, &tref(Action::Add, X, 256, 1 << 40), Some(op)).unwrap();
    add(&refs, &mut h, &tref(Action::Drop, X, 5, 0));
    assert_eq!(only_head(&refs).extent_op, Some(op));
    let st = refs.run(&tree, RunMode::All).unwrap();
    let runs = tree.runs();
    assert_eq!(runs.len(), 2);
    assert_eq!((runs[0].action, runs[0].extent_op), (Action::Add, Some(op)));
    assert_eq!((runs[1].action, runs[1].extent_op), (Action::Drop, None));
    assert_eq!(st.extent_ops, 0, "applied with a ref, not on its own");
    assert_eq!(tree.inner.item(X).unwrap().flags, EXTENT_FLAG_TREE_BLOCK | 0x104 | 0x8);
    check_empty(&refs);
}

/// `AddExtent` sets must_insert_reserved (§4.4 step 2); the first run takes
/// it, is an ADD (invariant 17) and inserts the item carrying the op; later
/// runs do not insert (§6.8 step 5, §6.10).
fn must_insert_reserved_first_run_inserts<D: DelayedRefs>() {
    let refs = D::new(FsConfig::default());
    let tree = Recording::new(MemExtentTree::new());
    let mut h = TransHandle::new();
    refs.add_data_ref(&mut h, &dref(Action::AddExtent, X, 5, 257, 0, 0), DATA_NB).unwrap();
    add(&refs, &mut h, &dref(Action::Add, X, 256, 300, 0, 0));
    let op = ExtentOp::set_flags(BLOCK_FLAG_FULL_BACKREF, 0);
    refs.add_tree_ref(&mut h, &tref(Action::AddExtent, Y, 5, 0), Some(op)).unwrap();
    let snap = check_quiescent(&refs);
    assert!(snap[0].must_insert_reserved && snap[1].must_insert_reserved);
    assert_eq!((snap[0].reserved_bytes, snap[0].owning_root), (DATA_NB, 5));
    assert_eq!(snap[1].reserved_bytes, 0);
    assert_eq!(
        refs.lookup_extent_info(&tree, X).unwrap(),
        Some(ExtentInfo { refs: 2, flags: 0 }),
        "pending insert (§7.1)"
    );
    assert_eq!(
        refs.lookup_extent_info(&tree, Y).unwrap(),
        Some(ExtentInfo { refs: 1, flags: BLOCK_FLAG_FULL_BACKREF })
    );
    refs.run(&tree, RunMode::All).unwrap();
    let xr = tree.runs_of(X);
    assert_eq!(xr.len(), 2);
    assert!(xr[0].insert_reserved && xr[0].action == Action::Add, "first run inserts: {xr:?}");
    assert!(!xr[1].insert_reserved);
    assert_eq!((xr[0].owning_root, xr[0].num_bytes), (5, DATA_NB));
    let yr = tree.runs_of(Y);
    assert_eq!(yr.len(), 1);
    assert!(yr[0].insert_reserved);
    assert_eq!(yr[0].extent_op, Some(op));
    let x = tree.inner.item(X).unwrap();
    assert_eq!((x.refs, x.is_data, x.flags), (2, true, EXTENT_FLAG_DATA));
    let y = tree.inner.item(Y).unwrap();
    assert_eq!((y.refs, y.flags), (1, EXTENT_FLAG_TREE_BLOCK | BLOCK_FLAG_FULL_BACKREF));
    assert_eq!(tree.inner.pinned_bytes(), 0);
    assert!(!tree.events().iter().any(|e| matches!(e, Event::Pin { .. })));
    check_empty(&refs);
}

/// Merging into an existing head (§4.6 steps 2-3): `owning_root` is filled in
/// when 0; `AddExtent` sets must_insert_reserved and overwrites `num_bytes`
/// and `owning_root`; `reserved_bytes` is not merged (faithful quirk, §11.13).
fn head_fields_merge<D: DelayedRefs>() {
    let refs = D::new(FsConfig::default());
    let mut h = TransHandle::new();
    let big = GenericRef::new(Action::Drop, X, 2 * DATA_NB, 0, 0).data(5, 257, 0, 0, false);
    add(&refs, &mut h, &big);
    assert_eq!(only_head(&refs).owning_root, 0);
    assert_eq!(refs.counters().pending_csums, 2 * DATA_NB);
    let add9 = GenericRef::new(Action::Add, X, 2 * DATA_NB, 0, 9).data(9, 1, 0, 0, false);
    add(&refs, &mut h, &add9);
    assert_eq!(only_head(&refs).owning_root, 9, "§4.6 step 2");
    assert_eq!(refs.counters().pending_csums, 0);
    let add11 = GenericRef::new(Action::Add, X, 2 * DATA_NB, 0, 11).data(11, 1, 0, 0, false);
    add(&refs, &mut h, &add11);
    assert_eq!(only_head(&refs).owning_root, 9, "only filled in when 0");
    let realloc = GenericRef::new(Action::AddExtent, X, DATA_NB, 0, 7).data(7, 2, 0, 0, false);
    refs.add_data_ref(&mut h, &realloc, DATA_NB).unwrap();
    let head = only_head(&refs);
    assert!(head.must_insert_reserved, "§4.6 step 3");
    assert_eq!((head.num_bytes, head.owning_root), (DATA_NB, 7));
    assert_eq!(head.reserved_bytes, 0, "§11.13: reserved_bytes is not merged");
    assert_eq!((head.ref_mod, head.total_ref_mod), (2, 2));
    let tree = MemExtentTree::new();
    let st = refs.destroy(&tree);
    assert_eq!(st.pinned_bytes, DATA_NB, "destroy pins the (overwritten) num_bytes");
    check_empty(&refs);
}

/// A cancelled allocation (AddExtent then Drop before running) leaves a
/// node-less head with must_insert_reserved; the run deletes it, applies
/// nothing (its op is discarded: §6.11 step 1) and pins the extent
/// (§6.11 step 4, §11.11b).
fn cancelled_allocation_is_pinned<D: DelayedRefs>() {
    let refs = D::new(FsConfig::default());
    let tree = Recording::new(MemExtentTree::new());
    let mut h = TransHandle::new();
    refs.add_data_ref(&mut h, &dref(Action::AddExtent, X, 5, 257, 0, 0), DATA_NB).unwrap();
    add(&refs, &mut h, &dref(Action::Drop, X, 5, 257, 0, 0));
    let op = ExtentOp::set_flags(BLOCK_FLAG_FULL_BACKREF, 0);
    refs.add_tree_ref(&mut h, &tref(Action::AddExtent, Y, 5, 0), Some(op)).unwrap();
    add(&refs, &mut h, &tref(Action::Drop, Y, 5, 0));
    let snap = check_quiescent(&refs);
    for head in &snap {
        assert!(head.must_insert_reserved && head.nodes.is_empty());
        assert_eq!((head.ref_mod, head.total_ref_mod), (0, 0));
    }
    assert_eq!(snap[1].extent_op, Some(op));
    assert_eq!(refs.counters(), counters(2, 2, 0));
    assert_eq!(refs.fs().reserves.snapshot().delayed_refs.size, 0);
    let st = refs.run(&tree, RunMode::All).unwrap();
    let mut ev = tree.events();
    ev.sort_by_key(|e| match e {
        Event::Pin { bytenr, .. } => *bytenr,
        _ => 0,
    });
    assert_eq!(
        ev,
        vec![
            Event::Pin { bytenr: X, num_bytes: DATA_NB, is_data: true },
            Event::Pin { bytenr: Y, num_bytes: TREE_NB, is_data: false },
        ]
    );
    assert_eq!(tree.inner.pinned_bytes(), DATA_NB + TREE_NB);
    assert!(tree.inner.is_empty());
    assert_eq!((st.refs, st.extent_ops, st.heads_deleted), (0, 0, 2));
    check_empty(&refs);
}

/// Seq hold-back (§5.2, §6.8 step 1, §5.3): with a blocker alive, refs
/// of fs trees created after it are not run and their heads stay queued and
/// unselected; refs created before it and refs of non-fs-tree roots (seq 0)
/// run; after the blocker leaves everything runs.
fn seq_hold_back<D: DelayedRefs>() {
    let refs = D::new(FsConfig::default());
    let tree = MemExtentTree::new();
    let mut h = TransHandle::new();
    let (a0, a, d, e, r) = (1u64 << 20, 2u64 << 20, 3u64 << 20, 4u64 << 20, 5u64 << 20);
    drop(refs.fs().seq.register());
    add(&refs, &mut h, &tref(Action::AddExtent, a0, 5, 0)); // seq 1
    let blocker = refs.fs().seq.register(); // seq 2
    assert_eq!(blocker.seq(), 2);
    add(&refs, &mut h, &tref(Action::AddExtent, a, 5, 0)); // seq 2: held back
    add(&refs, &mut h, &dref(Action::AddExtent, d, 256, 257, 0, 0)); // seq 2: held back
    add(&refs, &mut h, &tref(Action::AddExtent, e, 2, 0)); // extent tree: seq 0
    let reloc =
        GenericRef::new(Action::AddExtent, r, DATA_NB, 0, roots::DATA_RELOC).data(roots::DATA_RELOC, 257, 0, 0, false);
    refs.add_data_ref(&mut h, &reloc, DATA_NB).unwrap(); // not an fs tree: seq 0
    let seqs: Vec<u64> = check_quiescent(&refs).iter().map(|h| h.nodes[0].key.seq).collect();
    assert_eq!(seqs, vec![1, 2, 2, 0, 0], "§4.3: seq read, not incremented; 0 for non-fs trees");
    let held_before: Vec<_> = refs.snapshot().into_iter().filter(|h| h.bytenr == a || h.bytenr == d).collect();

    let mut deleted = Vec::new();
    let mut held = 0;
    for _ in 0..10 {
        let (b, outcome, st) = refs.run_one(&tree).unwrap().expect("heads remain");
        match outcome {
            HeadOutcome::Deleted => deleted.push(b),
            HeadOutcome::HeldBack => {
                assert!(b == a || b == d, "only seq >= blocker is held back, got {b:#x}");
                assert_eq!((st.held_back, st.refs, st.heads_deleted), (1, 0, 0));
                held += 1;
            }
        }
        check_quiescent(&refs);
    }
    deleted.sort();
    assert_eq!(deleted, vec![a0, e, r], "each runnable head ran exactly once");
    assert_eq!(held, 7);
    assert_eq!(refs.snapshot(), held_before, "held-back heads keep refs, unselected");
    assert_eq!(refs.counters(), counters(2, 4, 0));
    assert!(tree.item(a).is_none() && tree.item(d).is_none());
    assert!(tree.item(a0).is_some() && tree.item(e).is_some() && tree.item(r).is_some());

    let st = refs.run(&tree, RunMode::Ready).unwrap();
    assert_eq!((st.heads, st.held_back, st.heads_deleted, st.refs), (2, 2, 0, 0), "§6.5 Ready: 2 heads ready");
    assert_eq!(refs.lookup_extent_info(&tree, a).unwrap(), Some(ExtentInfo { refs: 1, flags: 0 }));

    drop(blocker);
    let st = refs.run(&tree, RunMode::All).unwrap();
    assert_eq!((st.held_back, st.heads_deleted), (0, 2));
    assert!(tree.item(a).is_some() && tree.item(d).is_some());
    check_empty(&refs);
}

/// `RunMode::All` spins while everything left is held back (§6.5, §11.15)
/// and finishes once the blocker leaves; before that nothing held back runs.
fn run_all_waits_for_blocker<D: DelayedRefs>() {
    let refs = D::new(FsConfig::default());
    let tree = MemExtentTree::new();
    let mut h = TransHandle::new();
    let blocker = refs.fs().seq.register();
    add(&refs, &mut h, &tref(Action::AddExtent, X, 5, 0));
    std::thread::scope(|s| {
        let runner = s.spawn(|| refs.run(&tree, RunMode::All));
        std::thread::sleep(std::time::Duration::from_millis(50));
        assert!(tree.item(X).is_none(), "held back while the blocker lives");
        assert!(!runner.is_finished(), "All must not return with refs queued");
        drop(blocker);
        runner.join().unwrap().unwrap();
    });
    assert!(tree.item(X).is_some());
    check_empty(&refs);
}

/// Merge pass (§5.1, invariant 13): on a metadata head, nodes of one key
/// with different seqs older than the lowest blocker merge (here: cancel, so
/// nothing is applied); a node at or above the blocker is neither merged
/// nor run; data heads are never merged by the pass.
fn merge_pass_respects_seq<D: DelayedRefs>() {
    let t5 = RefKey::TreeBlock { root: 5 };
    let refs = D::new(FsConfig::default());
    let g = *refs.fs().reserves.geometry();
    let tree = Recording::new(MemExtentTree::new());
    let mut h = TransHandle::new();
    // Both older than the blocker: cancel.
    load_item(&tree.inner, X, TREE_NB, false, &[(t5, 1)]);
    drop(refs.fs().seq.register());
    add(&refs, &mut h, &tref(Action::Drop, X, 5, 0));
    drop(refs.fs().seq.register());
    add(&refs, &mut h, &tref(Action::Add, X, 5, 0));
    let head = only_head(&refs);
    assert_eq!(head.nodes.len(), 2, "different seq: not merged at insert");
    assert_eq!(refs.fs().reserves.snapshot().delayed_refs.size, g.delayed_ref_bytes(2));
    let blocker = refs.fs().seq.register();
    let (b, outcome, st) = refs.run_one(&tree).unwrap().unwrap();
    assert_eq!((b, outcome), (X, HeadOutcome::Deleted));
    assert_eq!(st.refs, 0);
    assert!(tree.events().is_empty(), "merged away: {:?}", tree.events());
    assert_eq!(tree.inner.item(X).unwrap().backrefs[&t5], 1);
    check_empty(&refs);
    drop(blocker);

    // Drop, Add, Drop of one key (disk 1 → 0 → 1 → 0): one Drop survives.
    load_item(&tree.inner, Y, TREE_NB, false, &[(t5, 1)]);
    for action in [Action::Drop, Action::Add, Action::Drop] {
        add(&refs, &mut h, &tref(action, Y, 5, 0));
        drop(refs.fs().seq.register());
    }
    assert_eq!(only_head(&refs).nodes.len(), 3);
    refs.run(&tree, RunMode::All).unwrap();
    let runs = tree.runs();
    assert_eq!(runs.len(), 1);
    assert_eq!((runs[0].action, runs[0].ref_mod, runs[0].key), (Action::Drop, 1, t5));
    assert!(tree.inner.item(Y).is_none());
    check_empty(&refs);
    tree.take();

    // The Add is at the blocker's seq: not merged, held back; merged after.
    load_item(&tree.inner, Z, TREE_NB, false, &[(t5, 1)]);
    add(&refs, &mut h, &tref(Action::Drop, Z, 5, 0));
    let blocker = refs.fs().seq.register();
    add(&refs, &mut h, &tref(Action::Add, Z, 5, 0));
    let (_, outcome, _) = refs.run_one(&tree).unwrap().unwrap();
    assert_eq!(outcome, HeadOutcome::HeldBack);
    let head = only_head(&refs);
    assert_eq!(head.nodes.len(), 2, "invariant 13 only merges below the lowest blocker");
    assert!(tree.events().is_empty());
    drop(blocker);
    refs.run(&tree, RunMode::All).unwrap();
    assert!(tree.events().is_empty(), "merged once the blocker left");
    check_empty(&refs);

    // Data: same shape, never merged by the pass; both run, add first.
    let k = RefKey::ExtentData { root: 5, objectid: 257, offset: 0 };
    load_item(&tree.inner, W, DATA_NB, true, &[(k, 1)]);
    add(&refs, &mut h, &dref(Action::Drop, W, 5, 257, 0, 0));
    drop(refs.fs().seq.register());
    add(&refs, &mut h, &dref(Action::Add, W, 5, 257, 0, 0));
    let _blocker = refs.fs().seq.register();
    let st = refs.run(&tree, RunMode::All).unwrap();
    assert_eq!(st.refs, 2, "data heads are not merged by the pass (§5.1 step 1)");
    assert_eq!(order(&tree.runs()), vec![(Action::Add, k), (Action::Drop, k)]);
    assert_eq!(tree.inner.item(W).unwrap().refs, 1);
    check_empty(&refs);
}

/// `check_ref_cleanup` (§7.2): no head; busy with refs, with a surviving
/// extent op, or while held back; deletes a node-less head and reports
/// must_insert_reserved, discarding an op on a never-inserted block.
fn check_ref_cleanup_cases<D: DelayedRefs>() {
    let refs = D::new(FsConfig::default());
    let tree = MemExtentTree::new();
    load_item(&tree, Z, TREE_NB, false, &[(RefKey::TreeBlock { root: 5 }, 1)]);
    load_item(&tree, W, TREE_NB, false, &[(RefKey::TreeBlock { root: 5 }, 1)]);
    let mut h = TransHandle::new();
    assert_eq!(refs.check_ref_cleanup(X), CleanupOutcome::NoHead);

    let op = ExtentOp::set_flags(BLOCK_FLAG_FULL_BACKREF, 0);
    refs.add_tree_ref(&mut h, &tref(Action::AddExtent, X, 5, 0), Some(op)).unwrap();
    refs.add_extent_op(&mut h, Z, TREE_NB, op).unwrap();
    let before = observe(&refs);
    assert_eq!(refs.check_ref_cleanup(X), CleanupOutcome::Busy, "refs queued");
    assert_eq!(refs.check_ref_cleanup(Z), CleanupOutcome::Busy, "op on an existing item survives");
    assert_eq!(observe(&refs), before, "Busy changes nothing");

    // Cancel the allocation: node-less head with mir and an op.
    add(&refs, &mut h, &tref(Action::Drop, X, 5, 0));
    assert_eq!(refs.check_ref_cleanup(X), CleanupOutcome::Deleted { must_insert_reserved: true });
    assert_eq!(refs.find_head(X), None);
    check_quiescent(&refs);
    assert_eq!(refs.counters(), counters(1, 1, 0));

    // Node-less head without mir.
    add(&refs, &mut h, &tref(Action::Add, W, 256, 1 << 40));
    add(&refs, &mut h, &tref(Action::Drop, W, 256, 1 << 40));
    assert_eq!(refs.check_ref_cleanup(W), CleanupOutcome::Deleted { must_insert_reserved: false });
    assert_eq!(refs.counters(), counters(1, 1, 0));

    // A held-back head is not processing but has refs: Busy.
    let blocker = refs.fs().seq.register();
    add(&refs, &mut h, &tref(Action::Drop, W, 5, 0));
    let held = refs.run(&tree, RunMode::Ready).unwrap();
    assert_eq!(held.held_back, 1);
    assert_eq!(refs.check_ref_cleanup(W), CleanupOutcome::Busy);
    drop(blocker);

    refs.run(&tree, RunMode::All).unwrap();
    check_empty(&refs);
    assert_eq!(tree.item(Z).unwrap().flags, EXTENT_FLAG_TREE_BLOCK | BLOCK_FLAG_FULL_BACKREF);
    assert!(tree.item(X).is_none() && tree.item(W).is_none());
}

/// Abort cleanup (§7.3): every head and node goes, counters and the reserve
/// return to zero, reserved extents are pinned, the extent tree is untouched.
fn destroy_empties_everything<D: DelayedRefs>() {
    let refs = D::new(FsConfig::default());
    let tree = MemExtentTree::new();
    let k = RefKey::ExtentData { root: 5, objectid: 257, offset: 0 };
    load_item(&tree, X, DATA_NB, true, &[(k, 2)]);
    load_item(&tree, W, TREE_NB, false, &[(RefKey::TreeBlock { root: 5 }, 1)]);
    let before_tree = tree.items();
    let mut h = TransHandle::new();
    add(&refs, &mut h, &dref(Action::Drop, X, 5, 257, 0, 0));
    add(&refs, &mut h, &dref(Action::Add, X, 5, 258, 0, 0));
    add(&refs, &mut h, &dref(Action::Drop, X, 5, 257, 0, 0)); // total -1: pending csum
    refs.add_data_ref(&mut h, &dref(Action::AddExtent, Y, 5, 300, 0, 0), DATA_NB).unwrap();
    refs.add_tree_ref(&mut h, &tref(Action::AddExtent, Z, 5, 0), Some(ExtentOp::set_flags(0x100, 0))).unwrap();
    refs.add_extent_op(&mut h, W, TREE_NB, ExtentOp::set_flags(0x100, 0)).unwrap();
    let _blocker = refs.fs().seq.register();
    add(&refs, &mut h, &tref(Action::Add, 5 << 30, 5, 1 << 40)); // held back if run; destroy ignores seq
    let snap = check_quiescent(&refs);
    assert_eq!(refs.counters().pending_csums, DATA_NB);
    let nodes: u64 = snap.iter().map(|h| h.nodes.len() as u64).sum();
    let st = refs.destroy(&tree);
    assert_eq!(st.heads, snap.len() as u64);
    assert_eq!(st.nodes, nodes);
    assert_eq!(st.pinned_bytes, DATA_NB + TREE_NB, "Y and Z were reserved (§11.11d)");
    assert_eq!(tree.pinned_bytes(), DATA_NB + TREE_NB);
    check_empty(&refs);
    assert_eq!(tree.items(), before_tree, "destroy applies nothing");
    // Still usable.
    add(&refs, &mut h, &tref(Action::AddExtent, Z, 2, 0));
    refs.run(&tree, RunMode::All).unwrap();
    assert_eq!(tree.item(Z).unwrap().refs, 1);
    check_empty(&refs);
}

/// `lookup_extent_info` = disk + pending (§7.1, invariant 18): pending
/// adds/drops, a pending insert, an extent op's flags; unchanged by running.
fn lookup_extent_info_disk_plus_pending<D: DelayedRefs>() {
    let refs = D::new(FsConfig::default());
    let tree = MemExtentTree::new();
    let mut h = TransHandle::new();
    let ed = |ino| RefKey::ExtentData { root: 5, objectid: ino, offset: 0 };
    load_item(&tree, X, DATA_NB, true, &[(ed(1), 1), (ed(2), 1), (ed(3), 1)]);
    load_item(&tree, W, TREE_NB, false, &[(RefKey::TreeBlock { root: 5 }, 1)]);
    assert_eq!(refs.lookup_extent_info(&tree, Y).unwrap(), None);
    assert_eq!(refs.lookup_extent_info(&tree, X).unwrap(), Some(ExtentInfo { refs: 3, flags: EXTENT_FLAG_DATA }));
    add(&refs, &mut h, &dref(Action::Add, X, 5, 4, 0, 0));
    add(&refs, &mut h, &dref(Action::Add, X, 5, 5, 0, 0));
    add(&refs, &mut h, &dref(Action::Drop, X, 5, 1, 0, 0));
    assert_eq!(refs.lookup_extent_info(&tree, X).unwrap(), Some(ExtentInfo { refs: 4, flags: EXTENT_FLAG_DATA }));
    refs.add_data_ref(&mut h, &dref(Action::AddExtent, Y, 5, 9, 0, 0), DATA_NB).unwrap();
    add(&refs, &mut h, &dref(Action::Add, Y, 5, 10, 0, 0));
    assert_eq!(refs.lookup_extent_info(&tree, Y).unwrap(), Some(ExtentInfo { refs: 2, flags: 0 }));
    refs.add_tree_ref(&mut h, &tref(Action::AddExtent, Z, 5, 0), Some(ExtentOp::set_flags(0x100, 0))).unwrap();
    assert_eq!(refs.lookup_extent_info(&tree, Z).unwrap(), Some(ExtentInfo { refs: 1, flags: 0x100 }));
    let key_only =
        ExtentOp { update_key: true, key: DiskKey { objectid: 1, item_type: 1, offset: 1 }, ..ExtentOp::default() };
    refs.add_extent_op(&mut h, W, TREE_NB, key_only).unwrap();
    assert_eq!(refs.lookup_extent_info(&tree, W).unwrap(), Some(ExtentInfo { refs: 1, flags: EXTENT_FLAG_TREE_BLOCK }));
    refs.add_extent_op(&mut h, W, TREE_NB, ExtentOp::set_flags(0x100, 0)).unwrap();
    assert_eq!(
        refs.lookup_extent_info(&tree, W).unwrap(),
        Some(ExtentInfo { refs: 1, flags: EXTENT_FLAG_TREE_BLOCK | 0x100 })
    );
    let want_refs = [(X, 4), (Y, 2), (Z, 1), (W, 1)];
    while refs.run_one(&tree).unwrap().is_some() {
        for (b, n) in want_refs {
            assert_eq!(refs.lookup_extent_info(&tree, b).unwrap().unwrap().refs, n, "invariant 18 at {b:#x}");
        }
    }
    check_empty(&refs);
    assert_eq!(refs.lookup_extent_info(&tree, X).unwrap(), Some(ExtentInfo { refs: 4, flags: EXTENT_FLAG_DATA }));
    assert_eq!(refs.lookup_extent_info(&tree, Y).unwrap(), Some(ExtentInfo { refs: 2, flags: EXTENT_FLAG_DATA }));
    assert_eq!(
        refs.lookup_extent_info(&tree, Z).unwrap(),
        Some(ExtentInfo { refs: 1, flags: EXTENT_FLAG_TREE_BLOCK | 0x100 })
    );
    assert_eq!(
        refs.lookup_extent_info(&tree, W).unwrap(),
        Some(ExtentInfo { refs: 1, flags: EXTENT_FLAG_TREE_BLOCK | 0x100 })
    );
}

/// Qgroup records (§2.8, §4.4 step 4, §9, invariant 25): at most one per
/// bytenr; a duplicate copies its reservation only into a record without
/// one; skip_qgroup refs and disabled accounting make none; records outlive
/// their heads.
fn qgroup_records<D: DelayedRefs>() {
    let refs = D::new(FsConfig { qgroups: true, ..FsConfig::default() });
    let mut h = TransHandle::new();
    let out = refs.add_data_ref(&mut h, &dref(Action::Add, X, 5, 257, 0, 0), 0).unwrap();
    assert!(out.qgroup_record_inserted);
    let rec = |b, rsv, root| QgroupRecord { bytenr: b, num_bytes: DATA_NB, data_rsv: rsv, data_rsv_refroot: root };
    assert_eq!(refs.qgroup_records(), vec![rec(X, 0, 0)]);
    let out = refs.add_data_ref(&mut h, &dref(Action::AddExtent, X, 256, 258, 0, 0), 8192).unwrap();
    assert!(!out.qgroup_record_inserted, "one record per bytenr");
    assert_eq!(refs.qgroup_records(), vec![rec(X, 8192, 256)], "absorb copies the reservation once");
    refs.add_data_ref(&mut h, &dref(Action::Add, X, 257, 259, 0, 0), 4096).unwrap();
    assert_eq!(refs.qgroup_records(), vec![rec(X, 8192, 256)], "an existing reservation is kept");
    let out = refs.add_data_ref(&mut h, &dref(Action::AddExtent, Y, 256, 300, 0, 0), 4096).unwrap();
    assert!(out.qgroup_record_inserted);
    // Not an fs tree, or explicitly skipped: no record.
    let out = refs.add_tree_ref(&mut h, &tref(Action::AddExtent, Z, 2, 0), None).unwrap();
    assert!(!out.qgroup_record_inserted);
    let skip = GenericRef::new(Action::AddExtent, W, TREE_NB, 0, 5).tree(0, 5, 0, true);
    assert!(!refs.add_tree_ref(&mut h, &skip, None).unwrap().qgroup_record_inserted);
    let t = GenericRef::new(Action::AddExtent, 5 << 30, TREE_NB, 0, 5).tree(0, 5, 0, false);
    assert!(refs.add_tree_ref(&mut h, &t, None).unwrap().qgroup_record_inserted);
    let recs = refs.qgroup_records();
    assert_eq!(recs.iter().map(|r| r.bytenr).collect::<Vec<_>>(), vec![X, Y, 5 << 30]);
    assert_eq!(recs[1], rec(Y, 4096, 256));
    assert_eq!(recs[2], QgroupRecord { bytenr: 5 << 30, num_bytes: TREE_NB, data_rsv: 0, data_rsv_refroot: 0 });
    // X got an AddExtent merged in (§4.6 step 3): its first run inserts.
    let tree = MemExtentTree::new();
    refs.run(&tree, RunMode::All).unwrap();
    check_empty(&refs);
    assert_eq!(refs.qgroup_records(), recs, "records survive until commit (invariant 25)");

    // Accounting off: no records.
    let refs = D::new(FsConfig::default());
    let out = refs.add_data_ref(&mut h, &dref(Action::AddExtent, X, 5, 257, 0, 0), 4096).unwrap();
    assert!(!out.qgroup_record_inserted);
    assert!(refs.qgroup_records().is_empty());
}

/// Run modes (§6.5): `Bytes(n)` selects heads until the released
/// estimate (`C(1)` per node run plus `K(L)` per negative data head) reaches
/// `n`; `Ready` runs as many heads as were ready at the start, not heads
/// added meanwhile; `All` also runs refs added while running.
fn run_modes<D: DelayedRefs>() {
    let refs = D::new(FsConfig::default());
    let g = *refs.fs().reserves.geometry();
    let c1 = g.delayed_ref_bytes(1);
    let tree = MemExtentTree::new();
    let mut h = TransHandle::new();
    for i in 0..4 {
        add(&refs, &mut h, &tref(Action::AddExtent, X + i * TREE_NB, 5, 0));
    }
    let st = refs.run(&tree, RunMode::Bytes(1)).unwrap();
    assert_eq!((st.heads, st.refs, st.heads_deleted, st.bytes_released), (1, 1, 1, c1));
    assert_eq!(refs.counters().num_heads, 3);
    let st = refs.run(&tree, RunMode::Bytes(c1 + 1)).unwrap();
    assert_eq!((st.heads, st.bytes_released), (2, 2 * c1));
    assert_eq!(refs.counters().num_heads, 1);
    refs.run(&tree, RunMode::All).unwrap();
    check_empty(&refs);

    // A negative data head releases C(1) + K(L(num_bytes)).
    let k = RefKey::ExtentData { root: 5, objectid: 257, offset: 0 };
    load_item(&tree, Y, DATA_NB, true, &[(k, 2)]);
    add(&refs, &mut h, &dref(Action::Drop, Y, 5, 257, 0, 0));
    let st = refs.run(&tree, RunMode::Bytes(1)).unwrap();
    assert_eq!(st.bytes_released, c1 + csum_rsv(&g, DATA_NB));
    check_empty(&refs);

    // Ready vs All with a backend that queues a new head while running.
    for mode in [RunMode::Ready, RunMode::All] {
        let refs = D::new(FsConfig::default());
        let tree = MemExtentTree::new();
        let mut h = TransHandle::new();
        for i in 0..3 {
            add(&refs, &mut h, &tref(Action::AddExtent, X + i * TREE_NB, 5, 0));
        }
        let h2 = Mutex::new(TransHandle::new());
        let hooked = Hooked {
            inner: &tree,
            hook: Box::new(|run: &delayed_refs::RefRun<'_>| {
                if run.bytenr == X {
                    add(&refs, &mut h2.lock().unwrap(), &tref(Action::AddExtent, W, 2, 0));
                }
            }),
        };
        let st = refs.run(&hooked, mode).unwrap();
        match mode {
            RunMode::Ready => {
                assert_eq!(st.heads, 3, "max_count = num_heads_ready at the start");
                assert_eq!(refs.counters().num_heads, 1, "one head (the one added meanwhile, §6.2) is left");
                refs.run(&tree, RunMode::All).unwrap();
            }
            _ => assert_eq!(st.heads, 4, "All runs refs added while running"),
        }
        assert_eq!(tree.item(W).map(|i| i.refs), Some(1));
        check_empty(&refs);
    }
}

for_each_impl!(
    single_ref_each_type,
    chunk_tree_ref_is_system,
    add_then_drop_cancels,
    two_adds_merge,
    sign_flip_through_zero,
    fifty_alternating_then_drops,
    adds_run_before_drops,
    delayed_refs_rsv_tracks_nodes,
    extent_op_merge,
    must_insert_reserved_first_run_inserts,
    head_fields_merge,
    cancelled_allocation_is_pinned,
    seq_hold_back,
    run_all_waits_for_blocker,
    merge_pass_respects_seq,
    check_ref_cleanup_cases,
    destroy_empties_everything,
    lookup_extent_info_disk_plus_pending,
    qgroup_records,
    run_modes,
);
