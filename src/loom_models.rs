//! Loom models (tier T3 (README.md, \"Verification\")): the composed lock-free engine, and the
//! protocol primitives it is built from.
//!
//! Run with:
//! `RUSTFLAGS="--cfg dref_loom -C debug-assertions" LOOM_MAX_PREEMPTIONS=2 cargo test --release --lib loom_models -- --test-threads=1`
//!
//! The `loom_engine_*` models run the engine's own code, `Engine`'s add,
//! run, reader and cleanup methods, on the mock stores (module
//! `lockfree::store`) and a loom-visible extent tree (`model_support`):
//! every atomic of the head state word, the node counts, the seqlock, the
//! retire stripes, the reserves, the seq tracker and every map operation
//! is a point where loom switches threads. Each names the mutation that
//! makes it fail (run and recorded in docs/protocols.md, "What is model
//! checked").
//!
//! The other models drive one primitive at a time (`count`, `state`,
//! `rsv`) with a few atomics around it, to check its transition table at
//! bounds the composed models cannot reach.

use loom::sync::Arc;
use loom::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use loom::thread;

use crate::api::CleanupOutcome;
use crate::domain::extent_op::ExtentOp;
use crate::domain::geometry::Geometry;
use crate::domain::key::RefKey;
use crate::domain::kind::Action;
use crate::lockfree::count::{self, Transition};
use crate::lockfree::state::HeadState;
use crate::model_support::{ModelRefs, ModelTree, NB, data, drain_and_check, engine, tree};
use crate::rsv::cell::AtomicCell;
use crate::rsv::handle::TransHandle;
use crate::rsv::reserves::{FsReserves, ReleaseRouting, ReserveConfig};
use crate::rsv::state::{FlushMode, RsvState};

const E: u64 = 1 << 20;

fn key(r: &crate::GenericRef) -> RefKey {
    r.node_key(0).key
}

/// Queue one ref through the engine's add path (a fresh transaction handle).
fn add(refs: &ModelRefs, r: &crate::GenericRef) {
    let mut h = TransHandle::new();
    let res = if r.is_data() { refs.add_data_ref(&mut h, r, 0) } else { refs.add_tree_ref(&mut h, r, None) };
    res.expect("add failed");
}

/// Run a composed-engine model with a preemption bound of its own, 3
/// (`DREF_LOOM_ENGINE_PREEMPTIONS` sets another; `LOOM_MAX_PREEMPTIONS`,
/// which `.ci/run` sets to 2 for the primitive models, does not apply):
/// the interleavings that break the composed protocols need three (the
/// spawned thread's start, the runner stopped inside its window, the adder
/// stopped inside its own). At 2, mutations M1-M3 of docs/protocols.md
/// survive; at 3 every one fails.
fn engine_model(f: impl Fn() + Sync + Send + 'static) {
    engine_model_at(3, f)
}

/// [`engine_model`] at another default bound. The inline-node models run at
/// 2: each of their two threads inserts a key (a search over the slots, a
/// claim, a publish and a commit, all loom points), so bound 3 takes tens
/// of minutes, and their mutations fail at 2.
fn engine_model_at(default_bound: usize, f: impl Fn() + Sync + Send + 'static) {
    let mut b = loom::model::Builder::new();
    let bound = std::env::var("DREF_LOOM_ENGINE_PREEMPTIONS").ok().and_then(|v| v.parse().ok());
    b.preemption_bound = Some(bound.unwrap_or(default_bound));
    b.check(f);
}

/// A born head with no refs on `E` (an ADD and its DROP cancelled).
fn empty_head(refs: &ModelRefs) {
    add(refs, &data(Action::Add, E, 9));
    add(refs, &data(Action::Drop, E, 9));
}

/// Adder vs runner on one head (adds before drops, semantics.md §3.3, §11.18): the
/// extent holds {A}; an adder queues ADD B then DROP A while a runner runs
/// the head. A DROP that ran before the ADD queued ahead of it would free
/// the extent and the strict tree would refuse the ADD. Mutation (fails):
/// the adder leaves with a plain `exit` instead of `exit_noting` (no
/// late-ADD marker), root.rs `add_inner`.
#[test]
fn loom_engine_adds_before_drops() {
    engine_model(|| {
        let (refs, tree) = (Arc::new(engine()), Arc::new(ModelTree::new()));
        let (a, b) = (data(Action::Drop, E, 1), data(Action::Add, E, 2));
        tree.load(E, &[(key(&a), 1)]);
        let adder = {
            let refs = refs.clone();
            thread::spawn(move || {
                add(&refs, &b);
                add(&refs, &a);
            })
        };
        refs.run_one(&*tree).expect("a run failed: a DROP ran before the ADD queued ahead of it");
        adder.join().unwrap();
        drain_and_check(&refs, &tree);
        assert_eq!(tree.backrefs(E).unwrap().into_iter().collect::<Vec<_>>(), vec![(key(&b), 1)]);
    });
}

/// Adder vs retire vs re-create (hazard 1, semantics.md §4.5, §6.11): a runner
/// runs and retires the head of `E` while an adder queues a second ADD. The
/// ADD lands in the head before the close, or in a fresh head after it;
/// never in a closed one. Mutation (fails): `Engine::retire` closes from a
/// fresh load of the state word instead of the `w0` read before the
/// emptiness check.
#[test]
fn loom_engine_add_vs_retire() {
    engine_model(|| {
        let (refs, tree) = (Arc::new(engine()), Arc::new(ModelTree::new()));
        let (x, a, b) = (data(Action::Add, E, 1), data(Action::Add, E, 2), data(Action::Add, E, 3));
        tree.load(E, &[(key(&x), 1)]);
        add(&refs, &a);
        let adder = {
            let refs = refs.clone();
            thread::spawn(move || add(&refs, &b))
        };
        refs.run_one(&*tree).expect("run failed");
        adder.join().unwrap();
        drain_and_check(&refs, &tree);
        assert_eq!(tree.refs(E), 3, "an ADD was lost or doubled: {:?}", tree.backrefs(E));
    });
}

/// Reader vs runner vs retire (semantics.md §7.1, invariant 18; the bug of
/// tests/reader_pause.rs): the extent holds {A} and a born, empty head; a
/// reader looks it up while another thread retires that head, queues ADD
/// C, DROP A, ADD D (the count goes 1, 2, 1, 2) and runs the new head (its
/// ADDs first: the disk says 3 in between). The reader must return 1 or 2.
/// Mutation (fails): the reader's head path without the "still open after
/// the seqlock read" check.
#[test]
fn loom_engine_reader_vs_runner_vs_retire() {
    engine_model(|| {
        let (refs, tree) = (Arc::new(engine()), Arc::new(ModelTree::new()));
        let a = data(Action::Drop, E, 1);
        tree.load(E, &[(key(&a), 1)]);
        empty_head(&refs);
        let reader = {
            let (refs, tree) = (refs.clone(), tree.clone());
            thread::spawn(move || refs.lookup_extent_info(&*tree, E).unwrap().map_or(0, |i| i.refs))
        };
        assert!(matches!(refs.check_ref_cleanup(E), CleanupOutcome::Deleted { .. }));
        add(&refs, &data(Action::Add, E, 2));
        add(&refs, &a);
        add(&refs, &data(Action::Add, E, 3));
        refs.run_one(&*tree).expect("run failed");
        let seen = reader.join().unwrap();
        assert!(seen == 1 || seen == 2, "the reader returned {seen}: the count went 1, 2, 1, 2");
        drain_and_check(&refs, &tree);
        assert_eq!(tree.refs(E), 2);
    });
}

/// Cleanup vs adder (semantics.md §7.2): `check_ref_cleanup` deletes a born,
/// empty head while an adder queues an ADD on it; the ADD is never lost in
/// the deleted head. Mutation (fails): cleanup reads the word it closes
/// from after its second emptiness check instead of before.
#[test]
fn loom_engine_cleanup_vs_adder() {
    engine_model(|| {
        let (refs, tree) = (Arc::new(engine()), Arc::new(ModelTree::new()));
        let (a, b) = (data(Action::Add, E, 1), data(Action::Add, E, 2));
        tree.load(E, &[(key(&a), 1)]);
        empty_head(&refs);
        let adder = {
            let refs = refs.clone();
            thread::spawn(move || add(&refs, &b))
        };
        let _ = refs.check_ref_cleanup(E);
        adder.join().unwrap();
        drain_and_check(&refs, &tree);
        assert_eq!(tree.refs(E), 2, "the ADD was lost: {:?}", tree.backrefs(E));
    });
}

/// Blocker register vs merge pass (semantics.md §5.1-5.2, invariant 13): a tree
/// block holds {R, Q} and has DROP R queued; a thread registers a
/// tree-mod-log blocker and queues ADD R (at the blocker's seq) while a
/// runner's merge pass walks the head. While the blocker lives, the ADD is
/// neither run nor folded with the older DROP. Mutation (fails): the merge
/// pass reads the seq barrier before its walk instead of after it.
#[test]
fn loom_engine_blocker_vs_merge_pass() {
    engine_model(|| {
        let (refs, tree_) = (Arc::new(engine()), Arc::new(ModelTree::new()));
        let (r_drop, q) = (tree(Action::Drop, E, 5), tree(Action::Add, E, 7));
        tree_.load(E, &[(key(&r_drop), 1), (key(&q), 1)]);
        add(&refs, &r_drop);
        let ran = Arc::new(AtomicBool::new(false));
        let blocker = {
            let (refs, ran) = (refs.clone(), ran.clone());
            thread::spawn(move || {
                let b = refs.fs.seq.register();
                add(&refs, &tree(Action::Add, E, 5));
                while !ran.load(Ordering::Acquire) {
                    thread::yield_now();
                }
                let snap = refs.find_head(E).expect("the held ADD keeps its head");
                let held = snap.nodes.iter().find(|n| n.key.seq >= b.seq()).expect("the held ADD is gone (folded?)");
                assert_eq!((held.action, held.ref_mod), (Action::Add, 1), "the held ADD changed: {snap:?}");
            })
        };
        refs.run_one(&*tree_).expect("run failed");
        ran.store(true, Ordering::Release);
        blocker.join().unwrap();
        drain_and_check(&refs, &tree_);
        assert_eq!(tree_.refs(E), 2);
    });
}

/// Same new key, two inserters (module `lockfree::inline`, uniqueness): a
/// tree block's head was created by an extent op, so both of its (loom: two)
/// inline slots are free; two adders queue ADD of the same tree ref at
/// once. Each may claim a different slot, but only a publish from the
/// membership word its search read succeeds: the head ends with one node of
/// that key, count 2. Mutation (fails): the publish CAS reads the membership
/// word afresh instead of using the searched one.
#[test]
fn loom_engine_inline_same_new_key() {
    engine_model_at(2, || {
        let (refs, tree_) = (Arc::new(engine()), ModelTree::new());
        let mut h = TransHandle::new();
        refs.add_extent_op(&mut h, E, NB, ExtentOp::set_flags(1, 0)).expect("extent op");
        let r = tree(Action::Add, E, 5);
        let adder = {
            let refs = refs.clone();
            thread::spawn(move || add(&refs, &tree(Action::Add, E, 5)))
        };
        add(&refs, &r);
        adder.join().unwrap();
        let snap = refs.find_head(E).expect("the head holds the ADDs");
        let same: Vec<_> = snap.nodes.iter().filter(|n| n.key.key == key(&r)).collect();
        assert_eq!(same.len(), 1, "one key in two nodes: {snap:?}");
        assert_eq!((same[0].action, same[0].ref_mod), (Action::Add, 2), "{snap:?}");
        refs.destroy(&tree_);
    });
}

/// Slot reclaim vs re-add (module `lockfree::inline`): under loom a head
/// has two inline slots; they hold A (one queued ADD) and B, whose ADD and
/// DROP cancelled (a zero node). One adder queues ADD C, a new key: with no
/// free slot it kills B's zero node and takes the slot; another queues ADD
/// B at once. B's ADD lands on the zero node before the kill (the kill's
/// CAS then fails and C spills to the node map) or in a fresh node after
/// it; it is never lost in a reclaimed slot. Mutation (fails): the kill
/// stores DEAD unconditionally instead of a CAS from `LIVE(g, 0)`.
#[test]
fn loom_engine_inline_reclaim_vs_readd() {
    engine_model_at(2, || {
        let (refs, tree) = (Arc::new(engine()), Arc::new(ModelTree::new()));
        let (a, b) = (data(Action::Add, E, 1), data(Action::Add, E, 2));
        tree.load(E, &[(key(&a), 1), (key(&b), 1)]);
        add(&refs, &a);
        add(&refs, &b);
        add(&refs, &data(Action::Drop, E, 2));
        let adder = {
            let refs = refs.clone();
            thread::spawn(move || add(&refs, &data(Action::Add, E, 3)))
        };
        add(&refs, &data(Action::Add, E, 2));
        adder.join().unwrap();
        drain_and_check(&refs, &tree);
        let b_refs = tree.backrefs(E).unwrap().get(&key(&b)).copied();
        assert_eq!(b_refs, Some(2), "the re-ADD of B was lost or doubled");
        assert_eq!(tree.refs(E), 5);
    });
}

/// Kill vs add (module `count`): the runner kills a zero node while an adder
/// changes it; an adder refused by a dead node retries into a fresh node
/// (`fresh` stands for the node its retry inserts). Exactly one live count
/// holds the adder's ref, and a dead node never reads as a count.
#[test]
fn loom_kill_vs_add() {
    loom::model(|| {
        let node = Arc::new(AtomicI64::new(0));
        let fresh = Arc::new(AtomicI64::new(0));
        let a = {
            let (node, fresh) = (node.clone(), fresh.clone());
            thread::spawn(move || match count::change(&node, 1) {
                Ok(old) => assert_eq!(Transition::of(old, old + 1), Transition::Created),
                Err(count::Dead) => assert_eq!(count::change(&fresh, 1), Ok(0)),
            })
        };
        let killed = count::try_kill(&node);
        a.join().unwrap();
        let (n, f) = (count::peek(&node), count::peek(&fresh));
        assert_eq!(n + f, 1, "the add was lost or doubled (node {n}, fresh {f})");
        if killed {
            assert_eq!(n, 0, "a dead node reads as a count");
            assert_eq!(count::take_all(&node), 0, "take_all revived a dead node");
        }
    });
}

/// Late ADD vs claim (adds before drops, module `lockfree::head`): an adder
/// makes a node an ADD while a runner claims the head and scans it. Either
/// the runner's add scan (after its claim) sees the ADD, or the adder left a
/// marker before leaving, and a runner that sees the `add_epoch` bump also
/// sees the marker. Replacing `exit_noting` by a load of the word followed
/// by a plain `exit` makes this model fail (a claim slips in between and the
/// scan reads the node's old value).
#[test]
fn loom_late_add_vs_claim() {
    loom::model(|| {
        let h = Arc::new(HeadState::new());
        let node = Arc::new(AtomicI64::new(0));
        let mark = Arc::new(AtomicI64::new(0));
        let epoch = Arc::new(AtomicU64::new(0));
        h.enter().unwrap();
        h.exit();
        let a = {
            let (h, node, mark, epoch) = (h.clone(), node.clone(), mark.clone(), epoch.clone());
            thread::spawn(move || {
                h.enter().unwrap();
                let old = count::change(&node, 1).unwrap();
                assert_eq!(Transition::of(old, old + 1), Transition::Created);
                h.exit_noting(|| {
                    count::change(&mark, 1).unwrap();
                    epoch.fetch_add(1, Ordering::Release);
                });
            })
        };
        assert!(h.try_claim());
        // The add scan, then one look before a drop.
        let scanned = count::peek(&node) > 0;
        let bumped = epoch.load(Ordering::Acquire) != 0;
        if bumped {
            assert!(count::peek(&mark) > 0, "add_epoch moved but the marker is not visible");
        }
        a.join().unwrap();
        assert!(scanned || count::peek(&mark) > 0, "a late ADD the add scan missed left no marker");
    });
}

/// Marker drain vs a new note (module `lockfree::head`): the runner takes a
/// stale marker's notes, looks at the node, then kills the marker, while an
/// adder makes the node an ADD and notes it at the same key (`fresh` is the
/// marker its retry inserts if it meets the dead one). Afterwards either the
/// runner took the ADD or a live marker still names it. Two mutations make
/// this model fail (both checked): peeking the node before taking the
/// marker's count, and killing the marker by an unconditional swap to DEAD
/// instead of a CAS from 0.
#[test]
fn loom_marker_drain_vs_note() {
    loom::model(|| {
        let node = Arc::new(AtomicI64::new(0));
        let mark = Arc::new(AtomicI64::new(1));
        let fresh = Arc::new(AtomicI64::new(0));
        let a = {
            let (node, mark, fresh) = (node.clone(), mark.clone(), fresh.clone());
            thread::spawn(move || {
                count::change(&node, 1).unwrap();
                if count::change(&mark, 1).is_err() {
                    count::change(&fresh, 1).unwrap();
                }
            })
        };
        count::take_all(&mark);
        let v = count::peek(&node);
        let taken = v > 0 && count::try_take(&node, v);
        count::try_kill(&mark);
        a.join().unwrap();
        let marked = count::peek(&mark) > 0 || count::peek(&fresh) > 0;
        assert!(taken || marked, "the ADD was neither run nor marked");
        assert_eq!(taken as i64 + count::peek(&node), 1, "the ADD was lost or doubled");
    });
}

/// Claim vs claim (hazard 2, invariant 5): exactly one runner wins.
#[test]
fn loom_claim_vs_claim() {
    loom::model(|| {
        let h = Arc::new(HeadState::new());
        h.enter().unwrap();
        h.exit();
        let t = {
            let h = h.clone();
            thread::spawn(move || h.try_claim())
        };
        let mine = h.try_claim();
        let theirs = t.join().unwrap();
        assert!(mine ^ theirs, "claims: {mine} {theirs}");
    });
}

/// Take vs merge/flip (hazard 3): an adder drops (+1 → 0 → -1 via two
/// drops) while the runner takes; the signed sum is preserved and the
/// transition accounting leaves `num_entries` exact.
#[test]
fn loom_take_vs_merge_flip() {
    loom::model(|| {
        let node = Arc::new(AtomicI64::new(1));
        let entries = Arc::new(AtomicI64::new(1));
        let done = Arc::new(AtomicBool::new(false));
        let a = {
            let (node, entries, done) = (node.clone(), entries.clone(), done.clone());
            thread::spawn(move || {
                for _ in 0..2 {
                    let old = count::change(&node, -1).unwrap();
                    entries.fetch_add(Transition::of(old, old - 1).entries_delta(), Ordering::Relaxed);
                }
                done.store(true, Ordering::Release);
            })
        };
        // Runner: one add-phase take attempt (retrying on a lost CAS).
        let mut taken = 0;
        loop {
            let v = count::peek(&node);
            if v <= 0 {
                break;
            }
            if count::try_take(&node, v) {
                taken += v;
                entries.fetch_sub(1, Ordering::Relaxed);
                break;
            }
        }
        a.join().unwrap();
        let left = node.load(Ordering::SeqCst);
        assert_eq!(taken + left, 1 - 2, "signed sum not preserved");
        assert_eq!(entries.load(Ordering::SeqCst), (left != 0) as i64);
    });
}

fn small_reserves() -> FsReserves<AtomicCell> {
    FsReserves::new(ReserveConfig {
        geometry: Geometry { nodesize: 4096, sectorsize: 4096, csum_size: 4, free_space_tree: false },
        routing: ReleaseRouting::V6_8,
        space_total: 1 << 28,
        global_size: 0,
    })
}

fn check_rsv(r: &FsReserves<AtomicCell>) {
    let s = r.snapshot();
    assert!(s.delayed_refs.reserved <= s.delayed_refs.size || (s.delayed_refs.size as i64) < 0, "inv 22: {s:?}");
    assert_eq!(s.space.may_use, s.delayed_refs.reserved + s.global.reserved, "inv 23 (exact here): {s:?}");
}

/// Update vs release (§8.2/3): both transitions land, nothing leaks.
#[test]
fn loom_rsv_update_vs_release() {
    loom::model(|| {
        let r = Arc::new(small_reserves());
        let c = r.geometry().delayed_ref_bytes(1);
        // One node queued and backed; a handle holding C(1) for a second.
        r.space.reserve(2 * c, FlushMode::NoFlush).unwrap();
        r.delayed_refs.apply(|s| s.grow(c, c));
        let mut h = TransHandle::default();
        h.local = RsvState { size: c, reserved: c };
        h.delayed_ref_updates = 1;
        let t = {
            let r = r.clone();
            thread::spawn(move || {
                r.update_delayed_refs_rsv(&mut h);
            })
        };
        r.delayed_refs_rsv_release(1, 0);
        t.join().unwrap();
        let s = r.snapshot();
        assert_eq!(s.delayed_refs.size, c);
        check_rsv(&r);
    });
}

/// Refill vs refill (§11.3): the re-check returns the surplus.
#[test]
fn loom_rsv_refill_vs_refill() {
    loom::model(|| {
        let r = Arc::new(small_reserves());
        let c = r.geometry().delayed_ref_bytes(1);
        r.delayed_refs.apply(|s| s.grow(c, 0));
        let t = {
            let r = r.clone();
            thread::spawn(move || r.refill(FlushMode::FlushAll).unwrap())
        };
        r.refill(FlushMode::FlushAll).unwrap();
        t.join().unwrap();
        let s = r.snapshot();
        assert_eq!(s.delayed_refs, RsvState { size: c, reserved: c });
        check_rsv(&r);
    });
}

/// Refill vs release: a refill racing a shrink never leaves reserved > size.
#[test]
fn loom_rsv_refill_vs_release() {
    loom::model(|| {
        let r = Arc::new(small_reserves());
        let c = r.geometry().delayed_ref_bytes(1);
        r.delayed_refs.apply(|s| s.grow(c, 0));
        let t = {
            let r = r.clone();
            thread::spawn(move || r.refill(FlushMode::FlushAll).unwrap())
        };
        r.delayed_refs_rsv_release(1, 0);
        t.join().unwrap();
        let s = r.snapshot();
        assert_eq!(s.delayed_refs, RsvState { size: 0, reserved: 0 });
        check_rsv(&r);
    });
}
