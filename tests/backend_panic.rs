//! A backend that panics in the middle of a run (issue 14's panic safety):
//! the panic reaches the caller of `run`, the ref (or extent op) it was
//! applying stays queued, the head is released, and a later `run` or
//! `destroy` finishes promptly. Every implementation, through
//! `for_each_impl!`.

#[macro_use]
mod common;

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::atomic::{AtomicU64, Ordering};

use common::extent as bytenr;
use delayed_refs::{
    DelayedRefs, ExtentError, ExtentInfo, ExtentOp, ExtentTree, FsConfig, MemExtentTree, OpRun, Pin, RefRun, RunMode,
    TransHandle,
};

/// The in-memory tree, with a panic on the `panic_at`-th `apply_ref` (and
/// on the first `apply_extent_op` if `panic_on_op`).
struct PanicOnce {
    tree: MemExtentTree,
    calls: AtomicU64,
    panic_at: u64,
    panic_on_op: AtomicU64,
}

impl PanicOnce {
    fn new(panic_at: u64, panic_on_op: bool) -> Self {
        PanicOnce {
            tree: MemExtentTree::new(),
            calls: AtomicU64::new(0),
            panic_at,
            panic_on_op: AtomicU64::new(panic_on_op as u64),
        }
    }
}

impl ExtentTree for PanicOnce {
    fn apply_ref(&self, run: &RefRun<'_>) -> Result<(), ExtentError> {
        if self.calls.fetch_add(1, Ordering::SeqCst) + 1 == self.panic_at {
            panic!("backend panics in apply_ref");
        }
        self.tree.apply_ref(run)
    }

    fn apply_extent_op(&self, run: &OpRun<'_>) -> Result<(), ExtentError> {
        if self.panic_on_op.swap(0, Ordering::SeqCst) == 1 {
            panic!("backend panics in apply_extent_op");
        }
        self.tree.apply_extent_op(run)
    }

    fn pin_reserved(&self, pin: &Pin) -> Result<(), ExtentError> {
        self.tree.pin_reserved(pin)
    }

    fn lookup(&self, bytenr: u64) -> Result<Option<ExtentInfo>, ExtentError> {
        ExtentTree::lookup(&self.tree, bytenr)
    }
}

const HEADS: u64 = 8;
const REFS: u64 = 3;

/// Queue `HEADS` data extents of `REFS` refs each (the first allocates).
fn queue<D: DelayedRefs>(refs: &D) {
    common::queue_extents(refs, HEADS, REFS);
}

fn all_applied(tree: &PanicOnce) {
    for i in 0..HEADS {
        assert_eq!(tree.tree.lookup(bytenr(i)).map(|x| x.refs), Some(REFS), "extent {i}: a ref was lost or doubled");
    }
}

/// Whatever ref the panic hits, the rerun applies every ref exactly once.
fn panic_in_apply_ref_then_rerun<D: DelayedRefs>() {
    for panic_at in [1, 2, REFS + 1, HEADS * REFS] {
        let refs = D::new(FsConfig::default());
        let tree = PanicOnce::new(panic_at, false);
        queue(&refs);
        let first = catch_unwind(AssertUnwindSafe(|| refs.run(&tree, RunMode::All)));
        assert!(first.is_err(), "the panic reaches the caller of run (panic at call {panic_at})");
        let snap = refs.snapshot();
        assert!(snap.iter().all(|h| !h.processing), "a head is still claimed after the panic: {snap:?}");
        refs.run(&tree, RunMode::All).expect("the rerun completes");
        all_applied(&tree);
        assert_eq!(refs.counters().num_heads, 0);
        assert_eq!(refs.counters().num_entries, 0);
    }
}

/// A panic in the leftover extent op: the op stays queued and the rerun
/// applies it.
fn panic_in_extent_op_then_rerun<D: DelayedRefs>() {
    let refs = D::new(FsConfig::default());
    let tree = PanicOnce::new(0, true);
    queue(&refs);
    refs.run(&tree, RunMode::All).unwrap();
    let mut h = TransHandle::new();
    refs.add_extent_op(&mut h, bytenr(0), 4096, ExtentOp::set_flags(1 << 8, 0)).unwrap();
    let first = catch_unwind(AssertUnwindSafe(|| refs.run(&tree, RunMode::All)));
    assert!(first.is_err(), "the panic reaches the caller of run");
    assert!(refs.find_head(bytenr(0)).is_some_and(|h| !h.processing && h.extent_op.is_some()), "the op stays queued");
    refs.run(&tree, RunMode::All).expect("the rerun completes");
    assert!(refs.find_head(bytenr(0)).is_none());
    assert_ne!(tree.tree.lookup(bytenr(0)).unwrap().flags & (1 << 8), 0, "the op was applied");
}

/// After a panic, `destroy` (transaction abort) finishes and applies nothing.
fn panic_then_destroy<D: DelayedRefs + Send + Sync + 'static>() {
    let refs = std::sync::Arc::new(D::new(FsConfig::default()));
    let tree = std::sync::Arc::new(PanicOnce::new(2, false));
    queue(&*refs);
    assert!(catch_unwind(AssertUnwindSafe(|| refs.run(&*tree, RunMode::All))).is_err());
    let before = tree.calls.load(Ordering::SeqCst);
    // A watchdog turns a hang (a head left claimed) into a failure; the
    // detached thread does not keep the test from ending.
    let (tx, rx) = std::sync::mpsc::channel();
    {
        let (refs, tree) = (refs.clone(), tree.clone());
        std::thread::spawn(move || {
            let _ = tx.send(refs.destroy(&*tree));
        });
    }
    let stats = rx
        .recv_timeout(std::time::Duration::from_secs(30))
        .unwrap_or_else(|_| panic!("destroy hangs after a panicking run: a head stayed claimed"));
    assert_eq!(tree.calls.load(Ordering::SeqCst), before, "destroy applies nothing");
    assert!(stats.heads >= 1, "{stats:?}");
    assert!(refs.snapshot().is_empty());
    assert_eq!(refs.counters().num_entries, 0);
}

for_each_impl!(panic_in_apply_ref_then_rerun, panic_in_extent_op_then_rerun, panic_then_destroy);
