//! The runner thread of the timed workloads: retire heads until told to stop.

use std::sync::atomic::{AtomicBool, Ordering};

use delayed_refs::{DelayedRefs, RunMode};

use crate::faults::{self, Outcome, Tree};
use crate::stats::ThreadStats;

/// Alternate `run_one` and `run(RunMode::Ready)` until `stop` is set; `ops`
/// of the result counts the merged refs applied. An injected fault (a
/// retryable error, an injected panic) is retried by the next turn.
pub fn run_until<D: DelayedRefs>(refs: &D, tree: &Tree, stop: &AtomicBool) -> ThreadStats {
    let mut st = ThreadStats::default();
    let mut turn = 0u64;
    while !stop.load(Ordering::Relaxed) {
        turn += 1;
        let r = faults::retrying(|| {
            if turn % 2 == 0 {
                refs.run(tree, RunMode::Ready).map(|s| (s.heads > 0).then_some(s))
            } else {
                refs.run_one(tree).map(|o| o.map(|(_, _, s)| s))
            }
        });
        match r {
            Ok(Outcome::Done(Some(s))) => st.ops += s.refs,
            Ok(Outcome::Done(None)) => std::thread::yield_now(),
            Ok(Outcome::Retry) => {}
            Err(e) => st.error(|| format!("runner: {}", crate::out::Chain(&e))),
        }
    }
    st
}
