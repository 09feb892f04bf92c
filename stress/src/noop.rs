//! A delayed-ref root that does nothing, to measure the harness itself.
//!
//! `stress --harness-cost` runs the same rounds on [`NoopRefs`]: every add
//! returns at once and every run finds nothing, so its throughput is what
//! the adder loop (op planning, the model of queued refs, timing, the
//! latency histogram) and the round scaffolding cost without any
//! implementation behind them. Its rounds fail the zero-loss checks by
//! construction; they are reported beside the implementations and never
//! enter the verdict.

use std::sync::Arc;

use delayed_refs::{
    AddOutcome, AtomicCell, CleanupOutcome, Counters, DelayedRefs, DestroyStats, ExtentInfo, ExtentOp, ExtentTree,
    FsShared, GenericRef, HeadOutcome, HeadSnapshot, QgroupRecord, Result, RunMode, RunStats, TransHandle,
};

/// The no-op root (see the module docs).
#[derive(Debug)]
pub struct NoopRefs(Arc<FsShared<AtomicCell>>);

const NOTHING: AddOutcome = AddOutcome { merged: false, qgroup_record_inserted: false };

impl DelayedRefs for NoopRefs {
    type Cell = AtomicCell;
    const NAME: &'static str = "noop";

    fn for_transaction(fs: Arc<FsShared<AtomicCell>>, _transid: u64) -> Self {
        NoopRefs(fs)
    }

    fn transid(&self) -> u64 {
        0
    }

    fn fs(&self) -> &Arc<FsShared<AtomicCell>> {
        &self.0
    }

    fn add_tree_ref(&self, _: &mut TransHandle, _: &GenericRef, _: Option<ExtentOp>) -> Result<AddOutcome> {
        Ok(NOTHING)
    }

    fn add_data_ref(&self, _: &mut TransHandle, _: &GenericRef, _: u64) -> Result<AddOutcome> {
        Ok(NOTHING)
    }

    fn add_extent_op(&self, _: &mut TransHandle, _: u64, _: u64, _: ExtentOp) -> Result<()> {
        Ok(())
    }

    fn find_head(&self, _: u64) -> Option<HeadSnapshot> {
        None
    }

    fn run_one<B: ExtentTree + ?Sized>(&self, _: &B) -> Result<Option<(u64, HeadOutcome, RunStats)>> {
        Ok(None)
    }

    fn run<B: ExtentTree + ?Sized>(&self, _: &B, _: RunMode) -> Result<RunStats> {
        Ok(RunStats::default())
    }

    fn lookup_extent_info<B: ExtentTree + ?Sized>(&self, backend: &B, bytenr: u64) -> Result<Option<ExtentInfo>> {
        backend.lookup(bytenr).map_err(|source| delayed_refs::Error::Backend { bytenr, source })
    }

    fn check_ref_cleanup(&self, _: u64) -> CleanupOutcome {
        CleanupOutcome::NoHead
    }

    fn destroy<B: ExtentTree + ?Sized>(&self, _: &B) -> DestroyStats {
        DestroyStats::default()
    }

    fn counters(&self) -> Counters {
        Counters::default()
    }

    fn snapshot(&self) -> Vec<HeadSnapshot> {
        Vec::new()
    }

    fn qgroup_records(&self) -> Vec<QgroupRecord> {
        Vec::new()
    }
}
