//! End-to-end rounds of every workload on every implementation, and a
//! fault-injecting wrapper that shows the checks catch a lost add.

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
    Params { workload, threads: 2, runners, heads: 64, keys: 200, round: Duration::from_millis(60) }
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

/// `LockedRefs` that silently forgets every 50th plain data add.
struct LosesAdds {
    inner: LockedRefs,
    calls: AtomicU64,
}

impl DelayedRefs for LosesAdds {
    type Cell = <LockedRefs as DelayedRefs>::Cell;
    const NAME: &'static str = "loses-adds";

    fn with_fs(fs: Arc<FsShared<Self::Cell>>) -> Self {
        LosesAdds { inner: LockedRefs::with_fs(fs), calls: AtomicU64::new(0) }
    }
    fn fs(&self) -> &Arc<FsShared<Self::Cell>> {
        self.inner.fs()
    }
    fn add_tree_ref(&self, t: &mut TransHandle, g: &GenericRef, op: Option<ExtentOp>) -> Result<AddOutcome> {
        self.inner.add_tree_ref(t, g, op)
    }
    fn add_data_ref(&self, t: &mut TransHandle, g: &GenericRef, reserved: u64) -> Result<AddOutcome> {
        if g.action == Action::Add && self.calls.fetch_add(1, Ordering::Relaxed) % 50 == 49 {
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
    fn lookup_extent_info<B: ExtentTree + ?Sized>(&self, b: &B, bytenr: u64) -> Option<ExtentInfo> {
        self.inner.lookup_extent_info(b, bytenr)
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
        let r = run_round::<LosesAdds>(&params(w, 1), 7, &ProgressBar::hidden());
        assert!(!r.violations.is_ok(), "{w:?}: a lost add went unnoticed");
    }
    // With no runner nothing underflows during the round: the tree check itself finds it.
    let r = run_round::<LosesAdds>(&params(WorkloadKind::Wide, 0), 7, &ProgressBar::hidden());
    assert!(r.violations.lost > 0, "{:?}", r.violations);
}
