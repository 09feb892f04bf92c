//! Loom models of the crate's own protocols (VERIFY tier T3).
//!
//! Run with:
//! `RUSTFLAGS="--cfg dref_loom -C debug-assertions" LOOM_MAX_PREEMPTIONS=2 cargo test --release --lib loom_models -- --test-threads=1`
//!
//! crossbeam-skiplist and crossbeam-epoch cannot run under loom (VERIFY), so
//! the models drive the protocol code itself — the head state word
//! (`lockfree::state`), the node-count RMWs (`lockfree::count`), the
//! index-level lifecycle steps (`lockfree::index::{enter, retire}`, over the
//! loom-visible `MockIndex`) and the reserve CAS cells (`rsv`) — which the
//! real implementation calls unchanged.

use loom::sync::Arc;
use loom::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use loom::thread;

use crate::domain::geometry::Geometry;
use crate::lockfree::count::{self, Transition};
use crate::lockfree::index::mock::MockIndex;
use crate::lockfree::index::{self, HeadIndex, Indexed};
use crate::lockfree::state::{self, CLOSED, HeadState};
use crate::rsv::cell::AtomicCell;
use crate::rsv::handle::TransHandle;
use crate::rsv::reserves::{FsReserves, ReleaseRouting, ReserveConfig};
use crate::rsv::state::{FlushMode, RsvState};

/// An adder's whole critical section on one head: enter, change the node,
/// account the transition, exit. Returns whether the add landed in this head.
fn adder(h: &HeadState, node: &AtomicI64, entries: &AtomicI64, delta: i64) -> bool {
    match h.enter() {
        Err(_) => false,
        Ok(_) => {
            let old = count::change(node, delta).unwrap();
            entries.fetch_add(Transition::of(old, old + delta).entries_delta(), Ordering::Relaxed);
            h.exit();
            true
        }
    }
}

/// Add vs close (BRIEF hazard 1): a closed head never holds a ref, and an add
/// that landed is in a head that is still open, or was taken by the runner.
#[test]
fn loom_add_vs_close() {
    loom::model(|| {
        let h = Arc::new(HeadState::new());
        let node = Arc::new(AtomicI64::new(0));
        let entries = Arc::new(AtomicI64::new(0));
        // Born and claimed by the runner before the race.
        h.enter().unwrap();
        h.exit();
        assert!(h.try_claim());
        let a = {
            let (h, node, entries) = (h.clone(), node.clone(), entries.clone());
            thread::spawn(move || adder(&h, &node, &entries, 1))
        };
        // Runner: take what is there, then try to close from the exact word.
        let mut taken = 0;
        let mut closed = false;
        for _ in 0..2 {
            let v = count::peek(&node);
            if v != 0 {
                if count::try_take(&node, v) {
                    taken += v;
                    entries.fetch_sub(1, Ordering::Relaxed);
                }
                continue;
            }
            let w0 = h.load();
            if state::adders(w0) == 0 && count::peek(&node) == 0 && h.close_from(w0) {
                closed = true;
                break;
            }
        }
        let landed = a.join().unwrap();
        let left = node.load(Ordering::SeqCst);
        if closed {
            assert_eq!(left, 0, "a closed head lost a ref");
        }
        assert_eq!(taken + left, if landed { 1 } else { 0 }, "a ref was lost or doubled");
        assert_eq!(entries.load(Ordering::SeqCst), (left != 0) as i64, "num_entries drifted");
    });
}

/// A head in the mock index: the real state word and one node count.
#[derive(Debug)]
struct MHead {
    state: HeadState,
    node: AtomicI64,
}

impl Indexed for MHead {
    fn state(&self) -> &HeadState {
        &self.state
    }
}

fn mhead() -> MHead {
    MHead { state: HeadState::new(), node: AtomicI64::new(0) }
}

/// Add vs retire through the head index (hazard 1, spec §3.5 and §3.16.7),
/// with the real `index::enter` and `index::retire` over the loom-visible
/// mock: the adder never lands in a closed head; when the runner retires the
/// head, the adder's ref ends up in a fresh indexed head (or was taken by
/// the runner); no ref is lost or doubled and no closed head stays indexed.
#[test]
fn loom_index_add_vs_retire() {
    loom::model(|| {
        let idx = Arc::new(MockIndex::<MHead>::new());
        // One born head holding one ref, claimed by the runner before the race.
        {
            let (e, first) = index::enter(&*idx, 7, mhead, &());
            assert!(first);
            count::change(&MockIndex::head(&e).node, 1).unwrap();
            MockIndex::head(&e).state.exit();
        }
        let a = {
            let idx = idx.clone();
            thread::spawn(move || {
                let (e, _) = index::enter(&*idx, 7, mhead, &());
                let h = MockIndex::head(&e);
                assert_eq!(h.state.load() & CLOSED, 0, "entered a closed head");
                count::change(&h.node, 1).unwrap();
                h.state.exit();
            })
        };
        let e = idx.get(7, &()).expect("indexed");
        let h = MockIndex::head(&e);
        assert!(h.state.try_claim());
        let mut taken = 0;
        let mut retired = false;
        for _ in 0..3 {
            let v = count::peek(&h.node);
            if v != 0 {
                if count::try_take(&h.node, v) {
                    taken += v;
                }
                continue;
            }
            let w0 = h.state.load();
            if state::adders(w0) != 0 || count::peek(&h.node) != 0 {
                loom::thread::yield_now();
                continue;
            }
            if index::retire::<MockIndex<MHead>>(&e, w0) {
                retired = true;
                break;
            }
        }
        a.join().unwrap();
        let nodes = idx.nodes();
        let left: i64 = nodes.iter().map(|(_, n)| n.node.load(Ordering::SeqCst)).sum();
        assert_eq!(taken + left, 2, "a ref was lost or doubled (taken {taken}, left {left})");
        for (_, n) in &nodes {
            assert_eq!(n.state.load() & CLOSED, 0, "a closed head is still indexed");
        }
        if retired {
            assert_eq!(h.node.load(Ordering::SeqCst), 0, "a retired head kept a ref");
        }
        assert!(nodes.len() <= 1, "two heads under one bytenr");
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

/// Update vs release (§3.20.2/3): both transitions land, nothing leaks.
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

/// Refill vs refill (§5.3): the re-check returns the surplus.
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
