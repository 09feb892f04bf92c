//! Readers return disk + pending as of one point inside the call (semantics.md
//! §7.1, invariant 18), even when their backend lookup is slow.
//!
//! A backend whose `lookup` pauses at two gates (before it reads the tree,
//! after it read it) and whose first DROP pauses the runner lets each test
//! place heads being retired, re-created and half-run exactly inside a
//! reader's lookup. The extent starts on disk with refs {A, B}; while the
//! reader is paused, one thread queues ADD C, DROP A, ADD D, DROP B (the
//! count goes 2, 3, 2, 3, 2) and a runner applies C and D and stops at the
//! first drop (adds run before drops). The disk then says 4, a count the
//! extent never held: a reader must return 2 or 3.
//!
//! Variations: a live (born, empty) head or no head at all when the reader
//! starts; the runner still paused, or finished (its head retired), when the
//! reader checks what it read. Before the fix every lock-free case returned
//! 4; the locked port returned 4 in the two cases that start with no head.

#[macro_use]
mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Condvar, Mutex};
use std::time::Duration;

use common::{add, dref};
use delayed_refs::{
    Action, CleanupOutcome, DelayedRefs, ExtentError, ExtentInfo, ExtentTree, MemExtentTree, OpRun, Pin, RefRun,
    RunMode, TransHandle,
};

const E: u64 = 1 << 30;

/// A one-shot rendezvous: a thread `pause`s at it until the test releases it.
#[derive(Default)]
struct Gate {
    /// (arrived, released)
    state: Mutex<(bool, bool)>,
    cv: Condvar,
}

impl Gate {
    fn pause(&self) {
        let mut s = self.state.lock().unwrap();
        s.0 = true;
        self.cv.notify_all();
        while !s.1 {
            s = self.cv.wait(s).unwrap();
        }
    }

    /// Wait until a thread is paused here. False after a minute: the
    /// thread is blocked elsewhere (an implementation that holds a lock
    /// across the reader's lookup); the caller then releases every gate and
    /// fails instead of hanging.
    fn wait_arrived(&self) -> bool {
        let s = self.state.lock().unwrap();
        let (s, _) = self.cv.wait_timeout_while(s, Duration::from_secs(60), |s| !s.0).unwrap();
        s.0
    }

    fn release(&self) {
        self.state.lock().unwrap().1 = true;
        self.cv.notify_all();
    }
}

/// The extent tree with the gates (each armed for its first call only).
#[derive(Default)]
struct PausingTree {
    inner: MemExtentTree,
    lookup_armed: AtomicBool,
    before_read: Gate,
    after_read: Gate,
    drop_armed: AtomicBool,
    at_drop: Gate,
}

impl PausingTree {
    /// Wait for a thread at `gate`; if none comes, open every gate and fail.
    fn expect_at(&self, gate: &Gate, what: &str) {
        if !gate.wait_arrived() {
            for g in [&self.before_read, &self.after_read, &self.at_drop] {
                g.release();
            }
            panic!("no thread reached {what}: something holds a lock across the reader's lookup");
        }
    }
}

impl ExtentTree for PausingTree {
    fn apply_ref(&self, run: &RefRun<'_>) -> Result<(), ExtentError> {
        if run.action == Action::Drop && self.drop_armed.swap(false, Ordering::SeqCst) {
            self.at_drop.pause();
        }
        self.inner.apply_ref(run)
    }

    fn apply_extent_op(&self, run: &OpRun<'_>) -> Result<(), ExtentError> {
        self.inner.apply_extent_op(run)
    }

    fn pin_reserved(&self, pin: &Pin) -> Result<(), ExtentError> {
        self.inner.pin_reserved(pin)
    }

    fn lookup(&self, bytenr: u64) -> Result<Option<ExtentInfo>, ExtentError> {
        if !self.lookup_armed.swap(false, Ordering::SeqCst) {
            return ExtentTree::lookup(&self.inner, bytenr);
        }
        self.before_read.pause();
        let v = ExtentTree::lookup(&self.inner, bytenr);
        self.after_read.pause();
        v
    }
}

/// One scenario: `live_head` — a born, empty head exists when the reader
/// starts; `runner_done` — the runner finishes (and retires its head)
/// between the reader's disk read and its checks.
fn scenario<D: DelayedRefs>(live_head: bool, runner_done: bool) {
    let refs = D::new(Default::default());
    let tree = PausingTree::default();
    let mut h = TransHandle::new();
    let r = |action, ino| dref(action, E, 5, ino, 0, 0);
    add(&refs, &mut h, &r(Action::AddExtent, 1));
    add(&refs, &mut h, &r(Action::Add, 2));
    refs.run(&tree, RunMode::All).unwrap();
    assert_eq!(tree.inner.lookup(E).unwrap().refs, 2);
    if live_head {
        add(&refs, &mut h, &r(Action::Add, 9));
        add(&refs, &mut h, &r(Action::Drop, 9));
        assert!(refs.find_head(E).is_some(), "{}: the empty head is there", D::NAME);
    }
    tree.lookup_armed.store(true, Ordering::SeqCst);
    std::thread::scope(|s| {
        let reader = s.spawn(|| refs.lookup_extent_info(&tree, E).unwrap().map_or(0, |i| i.refs));
        tree.expect_at(&tree.before_read, "the reader's lookup");
        // An implementation that keeps the reader's head from being run or
        // retired (the locked port holds its run token) answers Busy here,
        // and the ops below land in that head, which no runner can take
        // until the reader is done.
        let runner_can_go = !live_head || matches!(refs.check_ref_cleanup(E), CleanupOutcome::Deleted { .. });
        let mut h = TransHandle::new();
        add(&refs, &mut h, &r(Action::Add, 3));
        add(&refs, &mut h, &r(Action::Drop, 1));
        add(&refs, &mut h, &r(Action::Add, 4));
        add(&refs, &mut h, &r(Action::Drop, 2));
        tree.drop_armed.store(true, Ordering::SeqCst);
        let runner = s.spawn(|| refs.run(&tree, RunMode::All).unwrap());
        if runner_can_go {
            tree.expect_at(&tree.at_drop, "the runner's first drop");
            assert_eq!(tree.inner.lookup(E).unwrap().refs, 4, "{}: the runner applied C and D", D::NAME);
        }
        tree.before_read.release();
        tree.expect_at(&tree.after_read, "the end of the reader's disk read");
        if runner_done && runner_can_go {
            tree.at_drop.release();
            runner.join().unwrap();
            assert!(refs.find_head(E).is_none(), "{}: the runner retired the head", D::NAME);
            tree.after_read.release();
        } else {
            tree.after_read.release();
            tree.at_drop.release();
            runner.join().unwrap();
        }
        let seen = reader.join().unwrap();
        assert!(
            seen == 2 || seen == 3,
            "{}: the reader returned {seen} refs; the count went 2, 3, 2, 3, 2 during its call",
            D::NAME
        );
    });
    refs.run(&tree, RunMode::All).unwrap();
    let item = tree.inner.lookup(E).unwrap();
    assert_eq!(item.refs, 2);
    assert_eq!(refs.lookup_extent_info(&tree, E).unwrap().unwrap().refs, 2);
}

/// The reproduction as reported: a live head, retired and replaced while
/// the reader reads; its runner still paused when the reader checks.
fn live_head_runner_paused<D: DelayedRefs>() {
    scenario::<D>(true, false);
}

/// A live head replaced, and the new head run to the end and retired before
/// the reader checks.
fn live_head_runner_done<D: DelayedRefs>() {
    scenario::<D>(true, true);
}

/// No head when the reader starts; a head created and half run meanwhile.
fn no_head_runner_paused<D: DelayedRefs>() {
    scenario::<D>(false, false);
}

/// No head when the reader starts, and none when it checks: a head lived,
/// was half run when the disk was read, and was retired before the check.
fn no_head_runner_done<D: DelayedRefs>() {
    scenario::<D>(false, true);
}

for_each_impl!(live_head_runner_paused, live_head_runner_done, no_head_runner_paused, no_head_runner_done);
