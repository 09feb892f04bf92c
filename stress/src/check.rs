//! End-of-round checks: drain everything, then compare counters, the
//! delayed-refs reserve and the extent tree with what must hold at quiescence.

use std::time::Duration;

use delayed_refs::{DelayedRefs, RunMode};

use crate::faults::{self, Outcome, Tree};
use crate::oracle::Oracle;

/// How many violation descriptions are kept.
const MAX_MESSAGES: usize = 12;

/// Everything that went wrong in one or more rounds.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Violations {
    /// Refs the tree lacks (lost add or doubled drop).
    pub lost: u64,
    /// Extra refs in the tree (doubled add or lost drop).
    pub doubled: u64,
    /// Tree blocks whose flags disagree with the queued extent ops.
    pub flag_mismatches: u64,
    /// Operations or runs that returned an error.
    pub errors: u64,
    /// Rounds that ended with a root counter not zero or heads still indexed.
    pub counters_nonzero: u64,
    /// Rounds whose delayed-refs reserve size did not return to its start.
    pub rsv_leaks: u64,
    /// Reads (`lookup_extent_info`) that returned a count the extent never
    /// held while they ran (`delayed_refs::lincheck`).
    pub linearizability: u64,
    /// The first few violations, described.
    pub messages: Vec<String>,
}

impl Violations {
    /// Whether nothing went wrong.
    pub fn is_ok(&self) -> bool {
        self.lost == 0
            && self.doubled == 0
            && self.flag_mismatches == 0
            && self.errors == 0
            && self.counters_nonzero == 0
            && self.rsv_leaks == 0
            && self.linearizability == 0
    }

    /// Keep a description if there is room.
    pub fn note(&mut self, msg: String) {
        if self.messages.len() < MAX_MESSAGES {
            self.messages.push(msg);
        }
    }

    /// Count `n` failed operations described by `samples`.
    pub fn op_errors(&mut self, n: u64, samples: &[String]) {
        self.errors += n;
        for s in samples {
            self.note(format!("error: {s}"));
        }
    }

    /// Add another tally to this one.
    pub fn absorb(&mut self, o: &Violations) {
        self.lost += o.lost;
        self.doubled += o.doubled;
        self.flag_mismatches += o.flag_mismatches;
        self.errors += o.errors;
        self.counters_nonzero += o.counters_nonzero;
        self.rsv_leaks += o.rsv_leaks;
        self.linearizability += o.linearizability;
        for m in &o.messages {
            self.note(m.clone());
        }
    }

    /// `lost=.. doubled=..` and every other non-zero tally.
    pub fn summary(&self) -> String {
        let mut s = format!("lost={} doubled={}", self.lost, self.doubled);
        for (name, n) in [
            ("flag_mismatches", self.flag_mismatches),
            ("errors", self.errors),
            ("counters_nonzero", self.counters_nonzero),
            ("rsv_leaks", self.rsv_leaks),
            ("linearizability", self.linearizability),
        ] {
            if n != 0 {
                s.push_str(&format!(" {name}={n}"));
            }
        }
        s
    }
}

/// The delayed-refs reserve size now.
pub fn rsv_size<D: DelayedRefs>(refs: &D) -> u64 {
    refs.fs().reserves.snapshot().delayed_refs.size
}

/// `run(RunMode::All)`, again after each injected fault, under a watchdog
/// that ends the process (dumping the claimed heads) if it stalls.
fn drain_all<D: DelayedRefs>(refs: &D, tree: &Tree, limit: Duration) -> delayed_refs::Result<delayed_refs::RunStats> {
    let mut total = delayed_refs::RunStats::default();
    faults::watchdog(
        "the final run(RunMode::All)",
        limit,
        || faults::claimed_heads(refs),
        || loop {
            match faults::retrying(|| refs.run(tree, RunMode::All))? {
                Outcome::Done(s) => {
                    total.absorb(&s);
                    return Ok(total);
                }
                Outcome::Retry => continue,
            }
        },
    )
}

/// What the end of a round found besides violations.
#[derive(Clone, Copy, Debug)]
pub struct Finish {
    /// Refs the final drain ran.
    pub refs: u64,
    /// Live heap bytes of the whole process after the drain, the checks and
    /// `reclaim()`, with the round's root, tree, oracle and adders alive.
    pub mem_end_bytes: i64,
}

/// Drain everything left, then check at quiescence: root counters zero, no
/// head indexed, the reserve size back at `rsv_start`, and the tree equal to
/// `oracle`; then `reclaim()` and read the live heap bytes.
pub fn finish_round<D: DelayedRefs>(
    refs: &D,
    tree: &Tree,
    oracle: &Oracle,
    rsv_start: u64,
    watchdog: Duration,
    v: &mut Violations,
) -> Finish {
    let drained = match drain_all(refs, tree, watchdog) {
        Ok(s) => s.refs,
        Err(e) => {
            v.errors += 1;
            v.note(format!("final run(All) failed: {e}"));
            0
        }
    };
    let c = refs.counters();
    let heads_left = refs.snapshot().len();
    if c.num_heads != 0 || c.num_heads_ready != 0 || c.num_entries != 0 || c.pending_csums != 0 || heads_left != 0 {
        v.counters_nonzero += 1;
        v.note(format!("after the final drain: {c:?}, {heads_left} heads indexed"));
    }
    let rsv_end = rsv_size(refs);
    if rsv_end != rsv_start {
        v.rsv_leaks += 1;
        v.note(format!("delayed-refs reserve size {rsv_end}, started at {rsv_start}"));
    }
    let diff = oracle.compare(&tree.inner().items());
    v.lost += diff.lost;
    v.doubled += diff.doubled;
    v.flag_mismatches += diff.flag_mismatches;
    for s in diff.samples {
        v.note(s);
    }
    refs.reclaim();
    Finish { refs: drained, mem_end_bytes: crate::alloc::live_bytes() }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn summary_lists_nonzero_tallies() {
        let mut v = Violations::default();
        assert!(v.is_ok());
        assert_eq!(v.summary(), "lost=0 doubled=0");
        v.rsv_leaks = 1;
        let mut w = Violations::default();
        w.absorb(&v);
        assert!(!w.is_ok());
        assert_eq!(w.summary(), "lost=0 doubled=0 rsv_leaks=1");
        let l = Violations { linearizability: 3, ..Violations::default() };
        assert!(!l.is_ok());
        w.absorb(&l);
        assert_eq!(w.summary(), "lost=0 doubled=0 rsv_leaks=1 linearizability=3");
    }
}
