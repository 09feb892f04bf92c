//! Batch hooks around runs and heads: the one place that calls
//! [`ExtentTree::begin_run`], [`ExtentTree::end_run`],
//! [`ExtentTree::begin_head`] and [`ExtentTree::end_head`], for every
//! implementation.
//!
//! # Implementation details
//!
//! A run's scope is opened lazily: `begin_run` is called when the run has
//! claimed its first head, so a run that finds nothing to do (a runner
//! polling an empty index) costs the backend nothing. From then on the
//! scope owns the run's end: `end_run` is called exactly once, with how the
//! run ended, also when it panicked (the panic is caught, the hook called,
//! the panic resumed).
//!
//! The head hooks nest inside: `begin_head` after the claim, `end_head`
//! after the head's run returned or unwound. A failing begin hook releases
//! the claimed head through the implementation's `release` closure before
//! anything was taken from it.
//!
//! # Synchronization
//!
//! None of its own: a scope belongs to one call of `run` or `run_one` on one
//! thread. Run ids come from a per-root counter ([`BatchIds`]).

#![forbid(unsafe_code)]

use std::cell::Cell;
use std::panic::{AssertUnwindSafe, catch_unwind, resume_unwind};
use std::sync::atomic::{AtomicU64, Ordering};

use crate::api::{HeadOutcome, RunStats};
use crate::error::{Hook, Result};
use crate::extent_tree::{Batch, BatchEnd, ExtentTree, call_backend};

/// A root's transaction id and its run-id counter.
#[derive(Debug)]
pub(crate) struct BatchIds {
    transid: u64,
    // std's atomic even under the model checkers: an id source, not part of
    // any protocol they check.
    next: AtomicU64,
}

impl BatchIds {
    pub(crate) fn new(transid: u64) -> Self {
        BatchIds { transid, next: AtomicU64::new(0) }
    }

    pub(crate) fn transid(&self) -> u64 {
        self.transid
    }

    /// A fresh run id (from 1).
    pub(crate) fn next(&self) -> Batch {
        // Relaxed: only uniqueness matters, which the RMW gives.
        Batch { transid: self.transid, run: self.next.fetch_add(1, Ordering::Relaxed) + 1 }
    }

    /// The batch of calls made outside any run (abort cleanup).
    pub(crate) fn outside_runs(&self) -> Batch {
        Batch { transid: self.transid, run: 0 }
    }
}

/// One run's hooks, opened at its first head.
pub(crate) struct RunScope<'b, B: ExtentTree + ?Sized> {
    backend: &'b B,
    batch: Batch,
    begun: Cell<bool>,
}

impl<B: ExtentTree + ?Sized> RunScope<'_, B> {
    /// The backend.
    pub(crate) fn backend(&self) -> &B {
        self.backend
    }

    /// The run's batch (for `RefRun::batch` and friends).
    pub(crate) fn batch(&self) -> Batch {
        self.batch
    }

    /// Run one claimed head inside the hooks. `release` gives the head back
    /// untouched (a begin hook failed); `body` runs it.
    pub(crate) fn head(
        &self,
        bytenr: u64,
        release: impl FnOnce(),
        body: impl FnOnce() -> Result<(HeadOutcome, RunStats)>,
    ) -> Result<(HeadOutcome, RunStats)> {
        let (backend, batch) = (self.backend, self.batch);
        let begin = || {
            if !self.begun.get() {
                call_backend(|| backend.begin_run(batch)).map_err(|f| (Hook::BeginRun, f))?;
                self.begun.set(true);
            }
            call_backend(|| backend.begin_head(batch, bytenr)).map_err(|f| (Hook::BeginHead(bytenr), f))
        };
        if let Err((hook, failure)) = begin() {
            release();
            return Err(failure.into_hook_error(hook));
        }
        let hook = Hook::EndHead(bytenr);
        match catch_unwind(AssertUnwindSafe(body)) {
            Ok(Ok((outcome, stats))) => {
                let end = match outcome {
                    HeadOutcome::Deleted => BatchEnd::Completed,
                    HeadOutcome::HeldBack => BatchEnd::HeldBack,
                };
                call_backend(|| backend.end_head(batch, bytenr, end)).map_err(|f| f.into_hook_error(hook))?;
                Ok((outcome, stats))
            }
            Ok(Err(e)) => {
                // A failing end hook outranks the run's error: it is the one
                // that needs an abort.
                call_backend(|| backend.end_head(batch, bytenr, BatchEnd::Failed))
                    .map_err(|f| f.into_hook_error(hook))?;
                Err(e)
            }
            Err(panic) => {
                // The first panic goes on; the hook's own failure, if any,
                // is dropped with it.
                let _ = call_backend(|| backend.end_head(batch, bytenr, BatchEnd::Panicked));
                resume_unwind(panic)
            }
        }
    }

    /// Call `end_run` if the run began.
    fn end(&self, end: BatchEnd) -> Result<()> {
        if !self.begun.get() {
            return Ok(());
        }
        call_backend(|| self.backend.end_run(self.batch, end)).map_err(|f| f.into_hook_error(Hook::EndRun))
    }
}

/// Run `body` as one run of `batch`: the scope it gets opens the run at
/// its first head; this closes it, however `body` ends.
pub(crate) fn run_batch<B: ExtentTree + ?Sized, T>(
    backend: &B,
    batch: Batch,
    body: impl FnOnce(&RunScope<'_, B>) -> Result<T>,
) -> Result<T> {
    let scope = RunScope { backend, batch, begun: Cell::new(false) };
    match catch_unwind(AssertUnwindSafe(|| body(&scope))) {
        Ok(Ok(v)) => {
            scope.end(BatchEnd::Completed)?;
            Ok(v)
        }
        Ok(Err(e)) => {
            scope.end(BatchEnd::Failed)?;
            Err(e)
        }
        Err(panic) => {
            let _ = scope.end(BatchEnd::Panicked);
            resume_unwind(panic)
        }
    }
}
