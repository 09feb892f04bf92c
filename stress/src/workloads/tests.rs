//! End-to-end rounds of every workload on every implementation, and
//! fault-injecting wrappers that show the checks catch a lost add and a
//! reader that returns a count that never existed.

use std::marker::PhantomData;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use delayed_refs::{
    Action, AddOutcome, CleanupOutcome, Counters, DelayedRefs, DestroyStats, ExtentInfo, ExtentOp, ExtentTree,
    FsShared, GenericRef, HeadOutcome, HeadSnapshot, LockedRefs, QgroupRecord, Result, RunMode, RunStats, TransHandle,
};
use indicatif::ProgressBar;

use super::{Params, run_round};
use crate::cli::WorkloadKind;
use crate::impls::{ImplVisitor, with_impl};
use crate::stats::RoundResult;

const ALL: [WorkloadKind; 6] = [
    WorkloadKind::Spread,
    WorkloadKind::Drain,
    WorkloadKind::Hot,
    WorkloadKind::AddOnly,
    WorkloadKind::Wide,
    WorkloadKind::Mixed,
];

fn params(workload: WorkloadKind, runners: usize) -> Params {
    Params {
        workload,
        threads: 2,
        runners,
        readers: 0,
        heads: 64,
        keys: 200,
        round: Duration::from_millis(60),
        faults: 0,
        throttle: None,
        watchdog: Duration::from_secs(60),
        backend: crate::backend::BackendKind::Mem,
        stall_at: 0,
    }
}

/// `params` with `readers` reader threads.
fn with_readers(workload: WorkloadKind, runners: usize, readers: usize) -> Params {
    Params { readers, ..params(workload, runners) }
}

struct Round(Params);

impl ImplVisitor for Round {
    type Output = RoundResult;

    fn visit<D: DelayedRefs>(self) -> RoundResult {
        run_round::<D>(&self.0, 42, &ProgressBar::hidden())
    }
}

#[test]
fn every_workload_passes_on_every_implementation() {
    for name in ["locked", "lockfree"] {
        for w in ALL {
            for runners in [0, 1, 2] {
                let r = with_impl(name, Round(params(w, runners))).expect("implementation available");
                assert!(r.violations.is_ok(), "{name} {w:?} runners={runners}: {:?}", r.violations);
                assert!(r.ops > 0 || w == WorkloadKind::Drain, "{name} {w:?}: no op ran");
            }
        }
    }
}

/// A fault injected into `LockedRefs` by [`Faulty`].
trait Fault: Send + Sync {
    /// Name for reports.
    const NAME: &'static str;

    /// Whether to silently skip data add call number `n` (counting from 0).
    fn skip_data_add(_g: &GenericRef, _n: u64) -> bool {
        false
    }

    /// What `lookup_extent_info` returns.
    fn lookup<B: ExtentTree + ?Sized>(inner: &LockedRefs, b: &B, bytenr: u64) -> Option<ExtentInfo> {
        inner.lookup_extent_info(b, bytenr).unwrap()
    }
}

/// `LockedRefs` with fault `F`.
struct Faulty<F> {
    inner: LockedRefs,
    calls: AtomicU64,
    fault: PhantomData<F>,
}

/// Silently forgets every 50th plain data add.
struct LosesAdds;

impl Fault for LosesAdds {
    const NAME: &'static str = "loses-adds";

    fn skip_data_add(g: &GenericRef, n: u64) -> bool {
        g.action == Action::Add && n % 50 == 49
    }
}

/// A reader that returns the on-disk refs only, ignoring the pending ones.
struct ReadsDiskOnly;

impl Fault for ReadsDiskOnly {
    const NAME: &'static str = "reads-disk-only";

    fn lookup<B: ExtentTree + ?Sized>(_: &LockedRefs, b: &B, bytenr: u64) -> Option<ExtentInfo> {
        b.lookup(bytenr).unwrap()
    }
}

/// A reader that returns one ref too many.
struct ReadsOneMore;

impl Fault for ReadsOneMore {
    const NAME: &'static str = "reads-one-more";

    fn lookup<B: ExtentTree + ?Sized>(inner: &LockedRefs, b: &B, bytenr: u64) -> Option<ExtentInfo> {
        let info = inner.lookup_extent_info(b, bytenr).unwrap().unwrap_or(ExtentInfo { refs: 0, flags: 0 });
        Some(ExtentInfo { refs: info.refs + 1, ..info })
    }
}

/// A torn reader: the pending refs as of one instant plus the on-disk refs
/// as of a moment later, after a yield (a runner may have moved refs from
/// pending to disk in between, which then count twice or not at all).
struct ReadsTorn;

impl Fault for ReadsTorn {
    const NAME: &'static str = "reads-torn";

    fn lookup<B: ExtentTree + ?Sized>(inner: &LockedRefs, b: &B, bytenr: u64) -> Option<ExtentInfo> {
        let refs = |i: Option<ExtentInfo>| i.map_or(0, |i| i.refs);
        let both = inner.lookup_extent_info(b, bytenr).unwrap();
        let disk_then = refs(b.lookup(bytenr).unwrap());
        std::thread::yield_now();
        let disk_now = refs(b.lookup(bytenr).unwrap());
        both.map(|i| ExtentInfo { refs: (i.refs + disk_now).wrapping_sub(disk_then), ..i })
    }
}

impl<F: Fault> DelayedRefs for Faulty<F> {
    type Cell = <LockedRefs as DelayedRefs>::Cell;
    const NAME: &'static str = F::NAME;

    fn for_transaction(fs: Arc<FsShared<Self::Cell>>, transid: u64) -> Self {
        Faulty { inner: LockedRefs::for_transaction(fs, transid), calls: AtomicU64::new(0), fault: PhantomData }
    }
    fn transid(&self) -> u64 {
        self.inner.transid()
    }
    fn fs(&self) -> &Arc<FsShared<Self::Cell>> {
        self.inner.fs()
    }
    fn add_tree_ref(&self, t: &mut TransHandle, g: &GenericRef, op: Option<ExtentOp>) -> Result<AddOutcome> {
        self.inner.add_tree_ref(t, g, op)
    }
    fn add_data_ref(&self, t: &mut TransHandle, g: &GenericRef, reserved: u64) -> Result<AddOutcome> {
        if F::skip_data_add(g, self.calls.fetch_add(1, Ordering::Relaxed)) {
            return Ok(AddOutcome { merged: false, qgroup_record_inserted: false });
        }
        self.inner.add_data_ref(t, g, reserved)
    }
    fn add_extent_op(&self, t: &mut TransHandle, bytenr: u64, num_bytes: u64, op: ExtentOp) -> Result<()> {
        self.inner.add_extent_op(t, bytenr, num_bytes, op)
    }
    fn find_head(&self, bytenr: u64) -> Option<HeadSnapshot> {
        self.inner.find_head(bytenr)
    }
    fn run_one<B: ExtentTree + ?Sized>(&self, b: &B) -> Result<Option<(u64, HeadOutcome, RunStats)>> {
        self.inner.run_one(b)
    }
    fn run<B: ExtentTree + ?Sized>(&self, b: &B, mode: RunMode) -> Result<RunStats> {
        self.inner.run(b, mode)
    }
    fn lookup_extent_info<B: ExtentTree + ?Sized>(&self, b: &B, bytenr: u64) -> Result<Option<ExtentInfo>> {
        Ok(F::lookup(&self.inner, b, bytenr))
    }
    fn check_ref_cleanup(&self, bytenr: u64) -> CleanupOutcome {
        self.inner.check_ref_cleanup(bytenr)
    }
    fn destroy<B: ExtentTree + ?Sized>(&self, b: &B) -> DestroyStats {
        self.inner.destroy(b)
    }
    fn counters(&self) -> Counters {
        self.inner.counters()
    }
    fn snapshot(&self) -> Vec<HeadSnapshot> {
        self.inner.snapshot()
    }
    fn qgroup_records(&self) -> Vec<QgroupRecord> {
        self.inner.qgroup_records()
    }
}

#[test]
fn a_lost_add_fails_the_round() {
    for w in ALL {
        let r = run_round::<Faulty<LosesAdds>>(&params(w, 1), 7, &ProgressBar::hidden());
        assert!(!r.violations.is_ok(), "{w:?}: a lost add went unnoticed");
    }
    // With no runner nothing underflows during the round: the tree check itself finds it.
    let r = run_round::<Faulty<LosesAdds>>(&params(WorkloadKind::Wide, 0), 7, &ProgressBar::hidden());
    assert!(r.violations.lost > 0, "{:?}", r.violations);
}

/// Readers on every workload (with a runner where it has one) and both
/// implementations: reads are checked and none is a violation.
///
/// Until the lock-free reader fix lands, `lockfree` may fail this test
/// (a reader that sees a runner's applied adds but not the pending drops).
#[test]
fn readers_are_checked_and_linearizable() {
    for name in ["locked", "lockfree"] {
        for w in ALL {
            let r = with_impl(name, Round(with_readers(w, 1, 1))).expect("implementation available");
            assert!(r.violations.is_ok(), "{name} {w:?}: {:?}", r.violations);
            assert!(r.lin.reads_checked > 0, "{name} {w:?}: no read checked");
            assert!(r.lin.ops_recorded > 0 || w == WorkloadKind::Drain, "{name} {w:?}: no op recorded");
        }
    }
}

/// Broken readers fail the round through the linearizability check alone:
/// the extent tree and the counters are right.
#[test]
fn a_broken_reader_fails_the_round() {
    fn broken<F: Fault>(w: WorkloadKind, runners: usize) {
        let r = run_round::<Faulty<F>>(&with_readers(w, runners, 1), 7, &ProgressBar::hidden());
        let v = &r.violations;
        assert!(
            v.linearizability > 0,
            "{} {w:?}: a broken reader went unnoticed ({} reads)",
            F::NAME,
            r.lin.reads_checked
        );
        assert_eq!((v.lost, v.doubled, v.errors, v.counters_nonzero), (0, 0, 0, 0), "{} {w:?}", F::NAME);
        assert!(!v.is_ok());
        assert!(!r.lin.samples.is_empty());
    }
    for w in [WorkloadKind::Spread, WorkloadKind::Hot, WorkloadKind::Mixed] {
        broken::<ReadsDiskOnly>(w, 1);
        broken::<ReadsOneMore>(w, 1);
    }
    // With no runner every queued ref stays pending: a disk-only reader reads 0.
    broken::<ReadsDiskOnly>(WorkloadKind::AddOnly, 0);
}

/// A torn read (the kind of bug the check was written for, less narrow) is
/// caught too. It needs a runner to move refs of the extent inside the
/// reader's yield, so it is not caught in every round: in a probe of 20
/// seeds, spread rounds caught it 20 times and hot rounds 19 times, and one
/// pair of rounds missed it in 1 of 6 runs on a loaded machine. The test
/// therefore runs pairs of rounds (new seeds) until one catches it, up to 8
/// pairs; it fails only if none does.
#[test]
fn a_torn_reader_fails_the_round() {
    let caught = (7..15u64).any(|seed| {
        let caught: u64 = [WorkloadKind::Spread, WorkloadKind::Hot]
            .into_iter()
            .map(|w| {
                let r = run_round::<Faulty<ReadsTorn>>(&with_readers(w, 1, 1), seed, &ProgressBar::hidden());
                assert_eq!((r.violations.lost, r.violations.doubled), (0, 0), "{w:?}");
                r.violations.linearizability
            })
            .sum();
        caught > 0
    });
    assert!(caught, "a torn reader went unnoticed in 8 pairs of rounds");
}
