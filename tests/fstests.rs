//! In-process analogues of fstests scenarios (scenarios
//! worth porting, written fresh):
//!
//! - btrfs/095: dropping N refs and adding N refs of one extent in one
//!   transaction, then running at commit, must not fail (adds run before
//!   drops, §3.4, §11.10) and leaves the extent's refs as queued;
//! - btrfs/279: readers of pending data refs see them (`find_head`,
//!   `snapshot`, `lookup_extent_info` = disk + pending, §7.1, invariant 18);
//! - generic/027, 269, 371, 619 (ENOSPC): reservation paths never give a
//!   false ENOSPC and never over-commit, with a small metadata space
//!   (§8, invariants 21-24).
//!
//! Every test is generic over `D: DelayedRefs`; see `common::for_each_impl!`.

#[macro_use]
mod common;

use std::collections::BTreeMap;

use common::*;
use delayed_refs::{
    Action, DelayedRefs, EXTENT_FLAG_DATA, Error, ExtentOp, FlushMode, FsConfig, Geometry, MemExtentTree, RefKey,
    ReleaseRouting, ReserveConfig, RunMode, TransHandle,
};
use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};

const X: u64 = 1 << 30;
const N: u64 = 64;

fn ed(ino: u64, offset: u64) -> RefKey {
    RefKey::ExtentData { root: 5, objectid: ino, offset }
}

/// btrfs/095 analogue: N refs dropped and N re-added (other keys, the same
/// keys in the same seq, the same keys in a later seq) of one data extent.
fn btrfs_095_drop_and_readd<D: DelayedRefs>() {
    for variant in 0..3 {
        let refs = D::new(FsConfig::default());
        let tree = Recording::new(MemExtentTree::new());
        let before: Vec<(RefKey, u64)> = (0..N).map(|i| (ed(257 + i, 0), 1)).collect();
        load_item(&tree.inner, X, DATA_NB, true, &before);
        let mut h = TransHandle::new();
        for i in 0..N {
            refs.add_data_ref(&mut h, &dref(Action::Drop, X, 5, 257 + i, 0, 0), 0).unwrap();
        }
        if variant == 2 {
            drop(refs.fs().seq.register()); // the re-adds get a later seq: no insert merge
        }
        let new_offset = if variant == 0 { 4096 } else { 0 };
        for i in 0..N {
            refs.add_data_ref(&mut h, &dref(Action::Add, X, 5, 257 + i, new_offset, 0), 0).unwrap();
        }
        let head = check_quiescent(&refs).remove(0);
        assert_eq!((head.ref_mod, head.total_ref_mod), (0, 0));
        let want_nodes = [2 * N, 0, 2 * N][variant] as usize;
        assert_eq!(head.nodes.len(), want_nodes, "variant {variant}");
        // "Commit": run everything.
        refs.run(&tree, RunMode::All).unwrap_or_else(|e| panic!("{}: variant {variant}: {e}", D::NAME));
        check_empty(&refs);
        let runs = tree.runs();
        assert_eq!(runs.len(), want_nodes);
        let adds = runs.iter().take_while(|r| r.action == Action::Add).count();
        assert_eq!(adds, want_nodes / 2, "all adds before any drop (§3.4)");
        let item = tree.inner.item(X).expect("the extent survives");
        assert_eq!(item.refs, N);
        let want: BTreeMap<RefKey, u64> = (0..N).map(|i| (ed(257 + i, new_offset), 1)).collect();
        assert_eq!(item.backrefs, want);
    }

    // Tree block: drop the root's ref and add a shared (full-backref) ref.
    let refs = D::new(FsConfig::default());
    let tree = MemExtentTree::new();
    load_item(&tree, X, TREE_NB, false, &[(RefKey::TreeBlock { root: 5 }, 1)]);
    let mut h = TransHandle::new();
    refs.add_tree_ref(&mut h, &tref(Action::Drop, X, 5, 0), None).unwrap();
    let op = ExtentOp::set_flags(delayed_refs::BLOCK_FLAG_FULL_BACKREF, 0);
    refs.add_tree_ref(&mut h, &tref(Action::Add, X, 5, 1 << 40), Some(op)).unwrap();
    refs.run(&tree, RunMode::All).unwrap();
    let item = tree.item(X).unwrap();
    assert_eq!(item.backrefs, BTreeMap::from([(RefKey::SharedBlock { parent: 1 << 40 }, 1)]));
    assert_ne!(item.flags & delayed_refs::BLOCK_FLAG_FULL_BACKREF, 0);
    check_empty(&refs);
}

/// btrfs/279 analogue: pending data refs (reflinks, new extents, frees) are
/// visible to readers before they run; `lookup_extent_info` equals disk +
/// pending after every single head run, also with a seq blocker holding
/// some back.
fn btrfs_279_readers_see_pending<D: DelayedRefs>() {
    let refs = D::new(FsConfig::default());
    let tree = MemExtentTree::new();
    let mut h = TransHandle::new();
    let mut model: BTreeMap<u64, BTreeMap<RefKey, u64>> = BTreeMap::new();
    let b = |i: u64| X + i * DATA_NB;
    for i in 0..8 {
        load_item(&tree, b(i), DATA_NB, true, &[(ed(300 + i, 0), 1)]);
        model.entry(b(i)).or_default().insert(ed(300 + i, 0), 1);
    }
    let queue = |refs: &D, h: &mut TransHandle, model: &mut BTreeMap<u64, BTreeMap<RefKey, u64>>, i: u64, j: u64| {
        // Reflink extent i into inode 400 + j.
        refs.add_data_ref(h, &dref(Action::Add, b(i), 5, 400 + j, 0, 0), 0).unwrap();
        *model.entry(b(i)).or_default().entry(ed(400 + j, 0)).or_insert(0) += 1;
    };
    for i in 0..8 {
        for j in 0..i {
            queue(&refs, &mut h, &mut model, i, j);
        }
    }
    let blocker = refs.fs().seq.register();
    for i in 0..4 {
        queue(&refs, &mut h, &mut model, i, 99);
    }
    for i in 8..12 {
        refs.add_data_ref(&mut h, &dref(Action::AddExtent, b(i), 5, 500 + i, 0, 0), DATA_NB).unwrap();
        model.entry(b(i)).or_default().insert(ed(500 + i, 0), 1);
    }
    // Free the original ref of extent 7 (it keeps its 7 reflinks).
    refs.add_data_ref(&mut h, &dref(Action::Drop, b(7), 5, 307, 0, 0), 0).unwrap();
    model.get_mut(&b(7)).unwrap().remove(&ed(307, 0));

    let check = |refs: &D, model: &BTreeMap<u64, BTreeMap<RefKey, u64>>| {
        for (&bytenr, keys) in model {
            let total: u64 = keys.values().sum();
            let info = refs.lookup_extent_info(&tree, bytenr).unwrap().expect("extent visible");
            assert_eq!(info.refs, total, "{}: lookup at {bytenr:#x}", D::NAME);
            // disk + pending per key (invariants 12, 18) through find_head.
            let disk = tree.item(bytenr).map(|i| i.backrefs).unwrap_or_default();
            let head = refs.find_head(bytenr);
            for (k, &n) in keys {
                let pending: i64 =
                    head.iter().flat_map(|h| h.nodes.iter()).filter(|nd| nd.key.key == *k).map(signed).sum();
                assert_eq!(disk.get(k).copied().unwrap_or(0) as i64 + pending, n as i64, "key {k:?} at {bytenr:#x}");
            }
        }
    };
    let snap = check_quiescent(&refs);
    assert_eq!(snap.len(), 12);
    assert_eq!(refs.find_head(b(3)).unwrap().nodes.len(), 4);
    check(&refs, &model);
    // Run with the blocker alive: refs queued after it stay pending but visible.
    loop {
        let before = refs.counters().num_heads;
        let st = refs.run(&tree, RunMode::Ready).unwrap();
        check(&refs, &model);
        check_quiescent(&refs);
        if st.heads_deleted == 0 || refs.counters().num_heads == before {
            break;
        }
    }
    // Extents 0-3 (a reflink after the blocker), 7 (a drop after it) and the
    // four new extents hold refs with seq >= the blocker (§5.2).
    assert_eq!(refs.counters().num_heads, 9, "the blocked heads remain");
    drop(blocker);
    while refs.run_one(&tree).unwrap().is_some() {
        check(&refs, &model);
    }
    check_empty(&refs);
    for (&bytenr, keys) in &model {
        let item = tree.item(bytenr).unwrap();
        assert_eq!(&item.backrefs, keys);
        assert_eq!(item.flags, EXTENT_FLAG_DATA);
    }
}

/// One step of the reservation scenario.
#[derive(Clone, Debug)]
enum ROp {
    /// `start_transaction(n, FlushAll)`.
    Start(u64),
    /// Queue `k` new tree blocks through open handle `i % open`.
    Add(usize, u64),
    /// End open handle `i % open`.
    End(usize),
    /// `start_transaction(0, FlushAll)`: refill the delayed refs rsv (§8.7).
    Refill,
    /// Run one head.
    RunOne,
    /// Run `Ready`.
    RunReady,
}

fn rop() -> impl Strategy<Value = ROp> {
    prop_oneof![
        3 => (1u64..4).prop_map(ROp::Start),
        4 => (any::<usize>(), 1u64..4).prop_map(|(i, k)| ROp::Add(i, k)),
        2 => any::<usize>().prop_map(ROp::End),
        2 => Just(ROp::Refill),
        2 => Just(ROp::RunOne),
        1 => Just(ROp::RunReady),
    ]
}

fn small_config(routing: ReleaseRouting) -> FsConfig {
    let g = Geometry::default();
    let per_item = g.insert_metadata_size(1) + g.delayed_ref_bytes(1);
    let global = 1 << 20;
    FsConfig {
        reserves: ReserveConfig {
            geometry: g,
            routing,
            space_total: global + 2 * per_item + per_item / 2,
            global_size: global,
        },
        qgroups: false,
        pending_limit: 0,
    }
}

/// Exact ledger of bytes_may_use: every byte is in exactly one reserve or in
/// an open handle's transaction reserve (§2.7 "every byte in any rsv's
/// reserved is also counted in bytes_may_use"), so nothing leaks or is
/// created by release routing (§8.2, §11.4).
fn check_ledger<D: DelayedRefs>(refs: &D, open: &[(TransHandle, u64)], ctx: &str) {
    let r = &refs.fs().reserves;
    let g = *r.geometry();
    let s = r.snapshot();
    let locals: u64 = open.iter().map(|(h, _)| h.local_rsv().reserved).sum();
    let trans: u64 = open.iter().map(|(_, n)| g.insert_metadata_size(*n)).sum();
    assert_eq!(
        s.space.may_use,
        s.global.reserved + s.delayed_refs.reserved + locals + trans,
        "{}: {ctx}: bytes_may_use ledger {s:?}",
        D::NAME
    );
    for (h, _) in open {
        assert!(h.local_rsv().reserved <= h.local_rsv().size, "invariant 22 for a handle's local rsv");
    }
    // Invariant 23, including the handles' local reserves.
    assert!(s.global.reserved + s.delayed_refs.reserved + locals <= s.space.may_use);
    assert!(s.space.used + s.space.may_use <= r.space.total(), "{ctx}: over-commit {s:?}");
}

fn run_reservation_ops<D: DelayedRefs>(routing: ReleaseRouting, ops: &[ROp]) {
    let refs = D::new(small_config(routing));
    let r = &refs.fs().reserves;
    let g = *r.geometry();
    let total = r.space.total();
    let tree = MemExtentTree::new();
    let initial = r.snapshot();
    let mut open: Vec<(TransHandle, u64)> = Vec::new();
    let mut next = X;
    for (step, op) in ops.iter().enumerate() {
        let s = r.snapshot();
        let ctx = format!("step {step} {op:?}");
        match *op {
            ROp::Start(n) => {
                let need = g.insert_metadata_size(n) + g.delayed_ref_bytes(n);
                let fits = s.space.used + s.space.may_use + need <= total;
                match r.start_transaction(n, FlushMode::FlushAll) {
                    Ok(h) => {
                        assert!(fits, "{ctx}: granted {need} without room: over-commit");
                        assert_eq!(r.snapshot().space.may_use, s.space.may_use + need);
                        open.push((h, n));
                    }
                    Err(Error::NoSpace { wanted }) => {
                        assert!(!fits, "{ctx}: false ENOSPC with {need} free of {s:?}");
                        assert_eq!(wanted, need);
                        assert_eq!(r.snapshot(), s, "a failed reservation changes nothing");
                    }
                    Err(e) => panic!("{ctx}: {e}"),
                }
            }
            ROp::Add(i, k) if !open.is_empty() => {
                let idx = i % open.len();
                for _ in 0..k {
                    refs.add_tree_ref(&mut open[idx].0, &tref(Action::AddExtent, next, 5, 0), None).unwrap();
                    next += TREE_NB;
                }
            }
            ROp::Add(..) => {}
            ROp::End(i) if !open.is_empty() => {
                let (h, _) = open.swap_remove(i % open.len());
                r.end_transaction(h).unwrap();
            }
            ROp::End(_) => {}
            ROp::Refill => {
                let d = s.delayed_refs;
                let want = if d.full() { 0 } else { d.gap().min(g.delayed_ref_bytes(1)) };
                let fits = s.space.used + s.space.may_use + want <= total;
                let res = r.start_transaction(0, FlushMode::FlushAll);
                match res {
                    Ok(h) => {
                        assert!(fits, "{ctx}: refill over-committed");
                        let after = r.snapshot().delayed_refs;
                        assert_eq!(after.reserved, d.reserved + want, "{ctx}: refill took the capped gap");
                        assert!(after.reserved <= after.size, "invariant 24");
                        r.end_transaction(h).unwrap();
                    }
                    Err(Error::NoSpace { .. }) => assert!(!fits, "{ctx}: false ENOSPC on refill ({want} of {s:?})"),
                    Err(e) => panic!("{ctx}: {e}"),
                }
            }
            ROp::RunOne => {
                refs.run_one(&tree).unwrap();
            }
            ROp::RunReady => {
                refs.run(&tree, RunMode::Ready).unwrap();
            }
        }
        check_quiescent(&refs);
        check_ledger(&refs, &open, &ctx);
    }
    for (h, _) in open.drain(..) {
        r.end_transaction(h).unwrap();
    }
    refs.run(&tree, RunMode::All).unwrap();
    check_empty(&refs);
    check_ledger(&refs, &open, "end");
    let s = r.snapshot();
    assert_eq!(s.space.may_use, initial.space.may_use, "{}: every byte returned", D::NAME);
    assert_eq!(s.global, initial.global);
    assert_eq!((next - X) / TREE_NB, tree.len() as u64, "every queued block was inserted");
    // No false ENOSPC at the end: the largest transaction that fits is granted.
    let free = total - s.space.used - s.space.may_use;
    let per = g.insert_metadata_size(1) + g.delayed_ref_bytes(1);
    let n_max = free / per;
    assert!(n_max >= 2);
    let h = r.start_transaction(n_max, FlushMode::FlushAll).expect("fits: no false ENOSPC");
    r.end_transaction(h).unwrap();
    assert!(matches!(r.start_transaction(n_max + 1, FlushMode::NoFlush), Err(Error::NoSpace { .. })));
    assert_eq!(r.snapshot(), s);
}

/// generic/027, 269, 371, 619 spirit: random start/add/end/refill/run
/// sequences on a small metadata space, both release routings (§11.4).
fn reservations_never_false_enospc<D: DelayedRefs>() {
    let mut runner = TestRunner::new(Config { cases: 96, failure_persistence: None, ..Config::default() });
    let strat = (prop::bool::ANY, prop::collection::vec(rop(), 1..60));
    runner
        .run(&strat, |(fixed, ops)| {
            let routing = if fixed { ReleaseRouting::Fixed } else { ReleaseRouting::V6_8 };
            run_reservation_ops::<D>(routing, &ops);
            Ok(())
        })
        .unwrap();
}

/// The same from four threads at once: no over-commit is ever observed,
/// every ENOSPC is for a request that did not fit the total at all or raced
/// with other holders, and every byte comes back.
fn reservations_concurrent<D: DelayedRefs>() {
    let refs = D::new(small_config(ReleaseRouting::V6_8));
    let tree = MemExtentTree::new();
    let r = &refs.fs().reserves;
    let initial = r.snapshot();
    let total = r.space.total();
    let granted = std::sync::atomic::AtomicU64::new(0);
    std::thread::scope(|s| {
        for t in 0..4u64 {
            let (refs, tree, granted) = (&refs, &tree, &granted);
            s.spawn(move || {
                let r = &refs.fs().reserves;
                for i in 0..300u64 {
                    match r.start_transaction(1 + i % 2, FlushMode::FlushAll) {
                        Ok(mut h) => {
                            granted.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                            let s = r.snapshot();
                            assert!(s.space.used + s.space.may_use <= total, "over-commit {s:?}");
                            let b = X + (t * 1000 + i) * TREE_NB;
                            refs.add_tree_ref(&mut h, &tref(Action::AddExtent, b, 5, 0), None).unwrap();
                            r.end_transaction(h).unwrap();
                        }
                        Err(Error::NoSpace { .. }) => {}
                        Err(e) => panic!("{e}"),
                    }
                    if i % 3 == t % 3 {
                        refs.run(tree, RunMode::Ready).unwrap();
                    }
                    if i % 7 == 0 {
                        match r.start_transaction(0, FlushMode::FlushAll) {
                            Ok(h) => r.end_transaction(h).unwrap(),
                            Err(Error::NoSpace { .. }) => {}
                            Err(e) => panic!("{e}"),
                        }
                    }
                }
            });
        }
    });
    assert!(granted.load(std::sync::atomic::Ordering::Relaxed) > 0);
    refs.run(&tree, RunMode::All).unwrap();
    check_empty(&refs);
    let s = r.snapshot();
    assert_eq!(s.space.may_use, initial.space.may_use, "{}: every byte returned", D::NAME);
    assert_eq!(tree.len() as u64, granted.load(std::sync::atomic::Ordering::Relaxed));
}

for_each_impl!(
    btrfs_095_drop_and_readd,
    btrfs_279_readers_see_pending,
    reservations_never_false_enospc,
    reservations_concurrent,
);
