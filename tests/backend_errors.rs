//! The backend contract's failure paths and batch hooks (issue 14): typed
//! backend errors from every call, what each leaves queued, the recovery it
//! asks for, panics in every hook, the order of the hooks around runs and
//! heads, the commit drain with a panicking backend, and the fault-injecting
//! wrapper converging under retries. Every implementation, through
//! `for_each_impl!`.

#[macro_use]
mod common;

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use common::{extent as bytenr, extent_ref as data};
use delayed_refs::{
    Action, Batch, BatchEnd, DelayedRefs, Error, ExtentError, ExtentInfo, ExtentOp, ExtentTree, FaultConfig,
    FaultyTree, FsConfig, FsShared, GenericRef, Hook, InjectedPanic, MemExtentTree, OpRun, Pin, Recovery, RefRun,
    RunMode, TransHandle,
};

/// One backend call, as the scripted tree saw it.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Call {
    BeginRun(Batch),
    EndRun(Batch, BatchEnd),
    BeginHead(Batch, u64),
    EndHead(Batch, u64, BatchEnd),
    Ref(Batch, u64, Action),
    Op(Batch, u64),
    Pin(Batch, u64),
    Lookup(u64),
}

/// Which call misbehaves.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Site {
    BeginRun,
    EndRun,
    BeginHead,
    EndHead,
    Ref,
    Op,
    Pin,
    Lookup,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum How {
    Fail,
    Panic,
}

/// The in-memory tree, logging every call, failing (or panicking) once at
/// the `nth` call of one site.
struct Scripted {
    tree: MemExtentTree,
    log: Mutex<Vec<Call>>,
    plan: Mutex<Option<(Site, u64, How)>>,
    seen: Mutex<Vec<(Site, u64)>>,
}

/// The error a scripted failure returns.
#[derive(Debug, thiserror::Error)]
#[error("scripted storage failure")]
struct Scripted503;

impl Scripted {
    fn new() -> Self {
        Scripted {
            tree: MemExtentTree::new(),
            log: Mutex::new(Vec::new()),
            plan: Mutex::new(None),
            seen: Mutex::new(Vec::new()),
        }
    }

    fn arm(&self, site: Site, nth: u64, how: How) {
        *self.plan.lock().unwrap() = Some((site, nth, how));
        self.seen.lock().unwrap().clear();
    }

    fn calls(&self) -> Vec<Call> {
        self.log.lock().unwrap().clone()
    }

    /// Log `call`, then misbehave if it is the armed one.
    fn at(&self, site: Site, call: Call) -> Result<(), ExtentError> {
        self.log.lock().unwrap().push(call);
        let n = {
            let mut seen = self.seen.lock().unwrap();
            let n = seen.iter().filter(|(s, _)| *s == site).count() as u64 + 1;
            seen.push((site, n));
            n
        };
        let mut plan = self.plan.lock().unwrap();
        match *plan {
            Some((s, nth, how)) if s == site && nth == n => {
                *plan = None;
                drop(plan);
                match how {
                    How::Fail => Err(ExtentError::storage(Scripted503)),
                    How::Panic => std::panic::panic_any(InjectedPanic { call: n }),
                }
            }
            _ => Ok(()),
        }
    }
}

impl ExtentTree for Scripted {
    fn apply_ref(&self, run: &RefRun<'_>) -> Result<(), ExtentError> {
        self.at(Site::Ref, Call::Ref(run.batch, run.bytenr, run.action))?;
        self.tree.apply_ref(run)
    }

    fn apply_extent_op(&self, run: &OpRun<'_>) -> Result<(), ExtentError> {
        self.at(Site::Op, Call::Op(run.batch, run.bytenr))?;
        self.tree.apply_extent_op(run)
    }

    fn pin_reserved(&self, pin: &Pin) -> Result<(), ExtentError> {
        self.at(Site::Pin, Call::Pin(pin.batch, pin.bytenr))?;
        self.tree.pin_reserved(pin)
    }

    fn lookup(&self, bytenr: u64) -> Result<Option<ExtentInfo>, ExtentError> {
        self.at(Site::Lookup, Call::Lookup(bytenr))?;
        Ok(self.tree.lookup(bytenr))
    }

    fn begin_run(&self, batch: Batch) -> Result<(), ExtentError> {
        self.at(Site::BeginRun, Call::BeginRun(batch))
    }

    fn end_run(&self, batch: Batch, end: BatchEnd) -> Result<(), ExtentError> {
        self.at(Site::EndRun, Call::EndRun(batch, end))
    }

    fn begin_head(&self, batch: Batch, bytenr: u64) -> Result<(), ExtentError> {
        self.at(Site::BeginHead, Call::BeginHead(batch, bytenr))
    }

    fn end_head(&self, batch: Batch, bytenr: u64, end: BatchEnd) -> Result<(), ExtentError> {
        self.at(Site::EndHead, Call::EndHead(batch, bytenr, end))
    }
}

const HEADS: u64 = 6;
const REFS: u64 = 3;
const TRANSID: u64 = 42;

fn root<D: DelayedRefs>() -> D {
    // The panics these tests inject on purpose print nothing.
    static QUIET: std::sync::Once = std::sync::Once::new();
    QUIET.call_once(InjectedPanic::silence_reports);
    D::for_transaction(std::sync::Arc::new(FsShared::new(FsConfig::default())), TRANSID)
}

/// Queue `HEADS` data extents of `REFS` refs each (the first allocates).
fn queue<D: DelayedRefs>(refs: &D) {
    common::queue_extents(refs, HEADS, REFS);
}

/// Every extent holds exactly `REFS` refs on disk and nothing is queued.
fn all_applied<D: DelayedRefs>(refs: &D, tree: &Scripted) {
    for i in 0..HEADS {
        assert_eq!(tree.tree.lookup(bytenr(i)).map(|x| x.refs), Some(REFS), "extent {i}: a ref was lost or doubled");
    }
    assert!(refs.snapshot().is_empty());
    assert_eq!(refs.counters().num_entries, 0);
}

/// Σ of what is queued plus what is on disk, per extent: an error or a panic
/// must leave it unchanged (nothing lost, nothing doubled).
fn conserved<D: DelayedRefs>(refs: &D, tree: &Scripted) -> Vec<i64> {
    let snap = refs.snapshot();
    (0..HEADS)
        .map(|i| {
            let disk = tree.tree.lookup(bytenr(i)).map_or(0, |x| x.refs as i64);
            let queued = snap.iter().find(|h| h.bytenr == bytenr(i)).map_or(0, |h| h.ref_mod);
            disk + queued
        })
        .collect()
}

/// No head is left claimed.
fn none_claimed<D: DelayedRefs>(refs: &D) {
    assert!(refs.snapshot().iter().all(|h| !h.processing), "a head stayed claimed");
}

/// Run `f` in a thread and fail if it does not return within 30 s (a head
/// left claimed makes `run(All)` and `destroy` spin).
fn within<T: Send + 'static>(what: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    rx.recv_timeout(Duration::from_secs(30)).unwrap_or_else(|_| panic!("{what} hangs"))
}

fn expect_recovery(e: &Error, want: Recovery) {
    assert_eq!(e.recovery(), want, "{e:?}");
}

/// A storage error in `apply_ref` (the 2nd, 4th and last ref): typed, Retry,
/// the ref stays queued, the head is released, the hooks hear `Failed`, and
/// a rerun completes with every ref applied once.
fn storage_error_in_apply_ref<D: DelayedRefs>() {
    for nth in [2, 4, HEADS * REFS] {
        let refs: D = root();
        let tree = Scripted::new();
        queue(&refs);
        let before = conserved(&refs, &tree);
        tree.arm(Site::Ref, nth, How::Fail);
        let e = refs.run(&tree, RunMode::All).unwrap_err();
        let Error::Backend { source: ExtentError::Storage(s), .. } = &e else { panic!("{e:?}") };
        assert!(s.downcast_ref::<Scripted503>().is_some());
        expect_recovery(&e, Recovery::Retry);
        assert_eq!(conserved(&refs, &tree), before, "nothing lost or doubled");
        none_claimed(&refs);
        let calls = tree.calls();
        assert!(matches!(calls.last(), Some(Call::EndRun(_, BatchEnd::Failed))), "{:?}", calls.last());
        assert!(calls.iter().any(|c| matches!(c, Call::EndHead(_, _, BatchEnd::Failed))));
        refs.run(&tree, RunMode::All).expect("the rerun completes");
        all_applied(&refs, &tree);
    }
}

/// A storage error in a leftover extent op: the op stays queued, the rerun
/// applies it.
fn storage_error_in_extent_op<D: DelayedRefs>() {
    let refs: D = root();
    let tree = Scripted::new();
    queue(&refs);
    refs.run(&tree, RunMode::All).unwrap();
    let mut h = TransHandle::new();
    refs.add_extent_op(&mut h, bytenr(0), 4096, ExtentOp::set_flags(1 << 8, 0)).unwrap();
    tree.arm(Site::Op, 1, How::Fail);
    let e = refs.run(&tree, RunMode::All).unwrap_err();
    assert!(matches!(e, Error::Backend { source: ExtentError::Storage(_), .. }), "{e:?}");
    expect_recovery(&e, Recovery::Retry);
    assert!(refs.find_head(bytenr(0)).expect("the op's head stays").extent_op.is_some());
    none_claimed(&refs);
    refs.run(&tree, RunMode::All).unwrap();
    assert_ne!(tree.tree.lookup(bytenr(0)).unwrap().flags & (1 << 8), 0, "the op was applied");
}

/// A failing lookup fails the reader's call with a typed, retryable error.
fn lookup_error<D: DelayedRefs>() {
    let refs: D = root();
    let tree = Scripted::new();
    queue(&refs);
    tree.arm(Site::Lookup, 1, How::Fail);
    let e = refs.lookup_extent_info(&tree, bytenr(1)).unwrap_err();
    assert!(matches!(e, Error::Backend { bytenr: b, .. } if b == bytenr(1)), "{e:?}");
    expect_recovery(&e, Recovery::Retry);
    assert_eq!(refs.lookup_extent_info(&tree, bytenr(1)).unwrap().map(|i| i.refs), Some(REFS));
}

/// A failing `begin_run` or `begin_head`: nothing taken, head released,
/// Retry; `end_run` is called only for a run that began.
fn begin_hook_errors<D: DelayedRefs>() {
    for (site, hook) in [(Site::BeginRun, Hook::BeginRun), (Site::BeginHead, Hook::BeginHead(0))] {
        let refs: D = root();
        let tree = Scripted::new();
        queue(&refs);
        let before = common::observe(&refs);
        tree.arm(site, 1, How::Fail);
        let e = refs.run(&tree, RunMode::All).unwrap_err();
        match (&e, hook) {
            (Error::Hook { hook: Hook::BeginRun, .. }, Hook::BeginRun) => {}
            (Error::Hook { hook: Hook::BeginHead(b), .. }, Hook::BeginHead(_)) => assert_ne!(*b, 0),
            _ => panic!("{e:?}"),
        }
        expect_recovery(&e, Recovery::Retry);
        assert_eq!(common::observe(&refs), before, "a failed begin hook changes nothing");
        let calls = tree.calls();
        assert!(!calls.iter().any(|c| matches!(c, Call::Ref(..))), "nothing ran");
        let ended = calls.iter().any(|c| matches!(c, Call::EndRun(..)));
        assert_eq!(ended, site == Site::BeginHead, "end_run only after a begun run: {calls:?}");
        refs.run(&tree, RunMode::All).expect("the rerun completes");
        all_applied(&refs, &tree);
    }
}

/// A failing end hook means applied refs may not be durable: Abort; the
/// root still destroys (and, here, can even go on running).
fn end_hook_errors<D: DelayedRefs>() {
    for site in [Site::EndHead, Site::EndRun] {
        let refs: D = root();
        let tree = Scripted::new();
        queue(&refs);
        tree.arm(site, 1, How::Fail);
        let e = refs.run(&tree, RunMode::All).unwrap_err();
        assert!(matches!(e, Error::Hook { hook: Hook::EndHead(_) | Hook::EndRun, .. }), "{e:?}");
        expect_recovery(&e, Recovery::Abort);
        none_claimed(&refs);
        let stats = refs.destroy(&tree);
        assert!(refs.snapshot().is_empty(), "{stats:?}");
        assert_eq!(refs.counters().num_entries, 0);
    }
}

/// A cancelled allocation whose pin fails: the head is gone (PinLost,
/// Abort); in `destroy` the failure is counted and cleanup goes on.
fn pin_failures<D: DelayedRefs>() {
    let refs: D = root();
    let tree = Scripted::new();
    let mut h = TransHandle::new();
    refs.add_data_ref(&mut h, &data(Action::AddExtent, 0, 0), 4096).unwrap();
    refs.add_data_ref(&mut h, &data(Action::Drop, 0, 0), 0).unwrap();
    tree.arm(Site::Pin, 1, How::Fail);
    let e = refs.run(&tree, RunMode::All).unwrap_err();
    assert!(matches!(e, Error::PinLost { bytenr: b, num_bytes: 4096, .. } if b == bytenr(0)), "{e:?}");
    expect_recovery(&e, Recovery::Abort);
    assert!(refs.snapshot().is_empty(), "the head was retired before the pin");

    refs.add_data_ref(&mut h, &data(Action::AddExtent, 1, 0), 4096).unwrap();
    refs.add_data_ref(&mut h, &data(Action::AddExtent, 2, 0), 4096).unwrap();
    tree.arm(Site::Pin, 1, How::Fail);
    let stats = refs.destroy(&tree);
    assert_eq!((stats.heads, stats.pin_failures, stats.pinned_bytes), (2, 1, 4096), "{stats:?}");
    let pins: Vec<_> = tree.calls().into_iter().filter(|c| matches!(c, Call::Pin(..))).collect();
    assert!(
        pins.iter().skip(1).all(|c| matches!(c, Call::Pin(b, _) if b.run == 0 && b.transid == TRANSID)),
        "{pins:?}"
    );
}

/// The hooks bracket each run and each head; every call carries the run's
/// batch with the root's transaction id; run ids grow; a run that finds
/// nothing calls no hook; adds come before drops within a head.
fn hooks_bracket_runs_and_heads<D: DelayedRefs>() {
    let refs: D = root();
    let tree = Scripted::new();
    assert_eq!(refs.transid(), TRANSID);
    refs.run(&tree, RunMode::All).unwrap();
    assert!(tree.calls().is_empty(), "an empty run calls no hook");
    queue(&refs);
    let mut h = TransHandle::new();
    // A drop queued before an add of another key on the same head.
    refs.run(&tree, RunMode::All).unwrap();
    refs.add_data_ref(&mut h, &data(Action::Drop, 0, 1), 0).unwrap();
    refs.add_data_ref(&mut h, &data(Action::Add, 0, 7), 0).unwrap();
    refs.run(&tree, RunMode::All).unwrap();
    let calls = tree.calls();
    let mut runs = Vec::new();
    let mut open_run: Option<Batch> = None;
    let mut open_head: Option<(Batch, u64, bool)> = None;
    for c in &calls {
        match *c {
            Call::BeginRun(b) => {
                assert!(open_run.is_none(), "nested run: {calls:?}");
                assert_eq!(b.transid, TRANSID);
                open_run = Some(b);
                runs.push(b.run);
            }
            Call::BeginHead(b, x) => {
                assert_eq!(Some(b), open_run);
                assert!(open_head.is_none());
                open_head = Some((b, x, false));
            }
            Call::Ref(b, x, action) => {
                let (hb, hx, dropped) = open_head.as_mut().expect("a ref outside a head");
                assert_eq!((b, x), (*hb, *hx));
                if action == Action::Drop {
                    *dropped = true;
                } else {
                    assert!(!*dropped, "an add after a drop within one head");
                }
            }
            Call::EndHead(b, x, end) => {
                let (hb, hx, _) = open_head.take().expect("end_head without begin_head");
                assert_eq!((b, x, end), (hb, hx, BatchEnd::Completed));
            }
            Call::EndRun(b, end) => {
                assert!(open_head.is_none());
                assert_eq!((Some(b), end), (open_run.take(), BatchEnd::Completed));
            }
            ref other => panic!("unexpected {other:?}"),
        }
    }
    assert!(open_run.is_none());
    assert_eq!(runs.len(), 2, "two runs had work: {calls:?}");
    assert!(runs[0] < runs[1], "run ids grow: {runs:?}");
    assert_eq!(calls.iter().filter(|c| matches!(c, Call::BeginHead(..))).count() as u64, HEADS + 1);
}

/// A panic in any hook (or in `apply_ref`) reaches the caller; the end
/// hooks hear `Panicked`; no head stays claimed; a rerun (or `destroy`)
/// finishes promptly; nothing is lost or doubled.
fn panics_in_every_hook<D: DelayedRefs + 'static>() {
    for site in [Site::BeginRun, Site::BeginHead, Site::Ref, Site::EndHead, Site::EndRun] {
        let refs = std::sync::Arc::new(root::<D>());
        let tree = std::sync::Arc::new(Scripted::new());
        queue(&*refs);
        let before = conserved(&*refs, &tree);
        tree.arm(site, 1, How::Panic);
        let p = catch_unwind(AssertUnwindSafe(|| refs.run(&*tree, RunMode::All)))
            .expect_err("the panic reaches the caller");
        assert!(p.downcast_ref::<InjectedPanic>().is_some());
        assert_eq!(conserved(&*refs, &tree), before, "{site:?}: nothing lost or doubled");
        none_claimed(&*refs);
        let calls = tree.calls();
        // A run that began hears the panic at its end, unless end_run
        // itself panicked.
        if matches!(site, Site::BeginHead | Site::Ref | Site::EndHead) {
            assert!(
                matches!(calls.last(), Some(Call::EndRun(_, BatchEnd::Panicked))),
                "{site:?}: end_run hears the panic: {:?}",
                calls.last()
            );
        }
        if site == Site::Ref {
            assert!(calls.iter().any(|c| matches!(c, Call::EndHead(_, _, BatchEnd::Panicked))), "{calls:?}");
        }
        let (r, t) = (refs.clone(), tree.clone());
        within("the rerun after a panic", move || r.run(&*t, RunMode::All).map(|_| ())).expect("the rerun completes");
        all_applied(&*refs, &tree);
    }
}

/// The commit drain on a pool: a panic in one runner stops that runner, the
/// panic reaches the caller, and a second drain completes.
fn commit_drain_with_a_panic<D: DelayedRefs + 'static>() {
    let refs = std::sync::Arc::new(root::<D>());
    let tree = std::sync::Arc::new(Scripted::new());
    queue(&*refs);
    tree.arm(Site::Ref, 3, How::Panic);
    let pool = rayon::ThreadPoolBuilder::new().num_threads(2).build().unwrap();
    let p = catch_unwind(AssertUnwindSafe(|| refs.commit_drain(&*tree, &pool)));
    assert!(p.is_err(), "the panic reaches the caller of commit_drain");
    none_claimed(&*refs);
    let (r, t) = (refs.clone(), tree.clone());
    within("commit_drain after a panic", move || r.commit_drain(&*t, &pool).map(|_| ())).expect("the drain completes");
    all_applied(&*refs, &tree);
}

/// The fault wrapper under concurrent adders and runners: retries converge
/// to every ref applied exactly once.
fn faulty_tree_converges<D: DelayedRefs>() {
    let refs: D = root();
    let tree = FaultyTree::new(MemExtentTree::new(), FaultConfig::every(5));
    let threads = 3u64;
    let per = 200u64;
    let done = AtomicU64::new(0);
    std::thread::scope(|s| {
        for t in 0..threads {
            let (refs, done) = (&refs, &done);
            s.spawn(move || {
                let mut h = TransHandle::new();
                for k in 0..per {
                    let b = bytenr(1000 + t * per + k);
                    let r = GenericRef::new(Action::AddExtent, b, 4096, 0, 5).data(5, 300, 0, 0, false);
                    refs.add_data_ref(&mut h, &r, 4096).unwrap();
                    let r = GenericRef::new(Action::Add, b, 4096, 0, 5).data(5, 301, 0, 0, false);
                    refs.add_data_ref(&mut h, &r, 0).unwrap();
                }
                done.fetch_add(1, Ordering::SeqCst);
            });
        }
        let (refs, tree, done) = (&refs, &tree, &done);
        s.spawn(move || {
            loop {
                let finished = done.load(Ordering::SeqCst) == threads;
                match catch_unwind(AssertUnwindSafe(|| refs.run(tree, RunMode::All))) {
                    Ok(Ok(_)) if finished && refs.snapshot().is_empty() => break,
                    Ok(Ok(_)) => {}
                    Ok(Err(e)) => assert_eq!(e.recovery(), Recovery::Retry, "{e:?}"),
                    Err(p) => assert!(p.downcast_ref::<InjectedPanic>().is_some()),
                }
            }
        });
    });
    let stats = tree.stats();
    assert!(stats.errors > 0 && stats.panics > 0, "{stats:?}");
    for t in 0..threads {
        for k in 0..per {
            assert_eq!(tree.inner().lookup(bytenr(1000 + t * per + k)).map(|i| i.refs), Some(2));
        }
    }
    assert_eq!(refs.counters().num_entries, 0);
}

for_each_impl!(
    storage_error_in_apply_ref,
    storage_error_in_extent_op,
    lookup_error,
    begin_hook_errors,
    end_hook_errors,
    pin_failures,
    hooks_bracket_runs_and_heads,
    panics_in_every_hook,
    commit_drain_with_a_panic,
    faulty_tree_converges,
);
