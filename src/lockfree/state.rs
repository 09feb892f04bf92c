//! The head lifecycle state word (hazard 1, semantics.md L1 a/b, L3).
//!
//! # Implementation details
//!
//! One `AtomicU64` per head:
//!
//! | bits | field | set by | cleared by |
//! |---|---|---|---|
//! | 0 | `CLOSED` | the runner (or cleanup/destroy) that retires the head, by CAS | never |
//! | 1 | `PROCESSING` | a runner claiming the head, by CAS | the same runner (unselect) |
//! | 2 | `BORN` | the first adder to enter (in `enter`'s CAS) | never |
//! | 3..=18 | adders in flight | `enter` (CAS, refused when closed) | `exit` (`fetch_add`) |
//! | 19..=63 | version | `exit` bumps it | wraps |
//!
//! State table of one head:
//!
//! | state | adders may enter | runner may claim | runner may close |
//! |---|---|---|---|
//! | unborn (inserted, no adder entered yet) | yes | no | no |
//! | born, idle | yes | yes | no (not claimed) |
//! | born, processing, adders > 0 | yes | no | no |
//! | born, processing, adders = 0 | yes | no | yes, by CAS from the exact word read before the emptiness check |
//! | closed | no: the adder helps unlink the head and retries into a new one | no | no |
//!
//! # Synchronization
//!
//! An adder changes the ref list only between `enter` and `exit`. `exit` is a
//! `Release` RMW; the runner's `load(Acquire)` of the word it will close from
//! (`w0`) therefore sees every change of every adder that had exited when
//! `w0` was written (release sequence of RMWs on one location). An adder that
//! enters after `w0` changes the adder count; one that entered and exited
//! changes the version: either way `close`'s CAS from `w0` fails. So a head
//! is closed only if no add landed between the emptiness check and the close
//! (hazard 1), and an add that returned has its ref in a head that is not
//! closed, or retried.

#![forbid(unsafe_code)]

use crate::sync::{AtomicU64, Ordering};

/// The head has been retired: no adder may enter.
pub(crate) const CLOSED: u64 = 1 << 0;
/// A runner (or cleanup) holds the head exclusively.
pub(crate) const PROCESSING: u64 = 1 << 1;
/// An adder has entered once and done the head-creation accounting.
pub(crate) const BORN: u64 = 1 << 2;
const ADDER_SHIFT: u32 = 3;
const ADDER_ONE: u64 = 1 << ADDER_SHIFT;
const ADDER_MASK: u64 = 0xffff << ADDER_SHIFT;
const VERSION_ONE: u64 = 1 << 19;

/// Adders in flight in a word.
pub(crate) fn adders(w: u64) -> u64 {
    (w & ADDER_MASK) >> ADDER_SHIFT
}

/// The head state word.
#[derive(Debug)]
pub(crate) struct HeadState(AtomicU64);

/// Why an adder could not enter.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Closed;

impl HeadState {
    pub(crate) fn new() -> Self {
        HeadState(AtomicU64::new(0))
    }

    /// Current word.
    pub(crate) fn load(&self) -> u64 {
        // Acquire: pairs with the Release `exit` of every adder (see module docs).
        self.0.load(Ordering::Acquire)
    }

    /// Enter as an adder. Returns whether this adder is the first ever (and
    /// must do the head-creation accounting).
    pub(crate) fn enter(&self) -> Result<bool, Closed> {
        let mut w = self.0.load(Ordering::Relaxed);
        loop {
            if w & CLOSED != 0 {
                return Err(Closed);
            }
            assert!(adders(w) < 0xffff, "more than 65535 adders in flight on one head");
            let next = (w + ADDER_ONE) | BORN;
            // Acquire on success: the adder reads head fields published by
            // earlier adders and runners (their Release RMWs on this word).
            match self.0.compare_exchange_weak(w, next, Ordering::Acquire, Ordering::Relaxed) {
                Ok(_) => return Ok(w & BORN == 0),
                Err(cur) => w = cur,
            }
        }
    }

    /// Leave as an adder: one fewer in flight, version bumped.
    pub(crate) fn exit(&self) {
        // Release: publishes this adder's ref-list and head changes to the
        // runner that closes from a later word (pairs with `load`'s Acquire).
        self.0.fetch_add(VERSION_ONE.wrapping_sub(ADDER_ONE), Ordering::Release);
    }

    /// Leave as an adder that made a node an ADD (0 → positive): if a runner
    /// holds the head at the moment of leaving, `note` runs first, still
    /// inside, so the runner learns of the late ADD (a marker, module `head`).
    ///
    /// The decision and the exit are one CAS from the word that showed no
    /// claim: if it succeeds, any later claim reads this `Release` exit and
    /// its add scan sees the ADD; if a claim got in first, the CAS fails and
    /// the retry sees `PROCESSING`. A plain load-then-exit would let a claim
    /// slip between the two, and neither side would see the other (the
    /// `loom_late_add_vs_claim` model fails on that mutation).
    pub(crate) fn exit_noting(&self, note: impl FnOnce()) {
        let mut w = self.0.load(Ordering::Acquire);
        loop {
            if w & PROCESSING != 0 {
                note();
                return self.exit();
            }
            let next = w.wrapping_add(VERSION_ONE.wrapping_sub(ADDER_ONE));
            // Release on success: as `exit`. Acquire on failure: the retry
            // reads the claim that made it fail.
            match self.0.compare_exchange_weak(w, next, Ordering::Release, Ordering::Acquire) {
                Ok(_) => return,
                Err(cur) => w = cur,
            }
        }
    }

    /// Claim for running: fails if closed, unborn or already claimed.
    pub(crate) fn try_claim(&self) -> bool {
        let mut w = self.0.load(Ordering::Relaxed);
        loop {
            if w & (CLOSED | PROCESSING) != 0 || w & BORN == 0 {
                return false;
            }
            // AcqRel: the claimer reads what earlier adders and the previous
            // runner (Release in `unclaim`) wrote; claim-vs-claim is decided
            // by this CAS alone (one winner, invariant 5).
            match self.0.compare_exchange_weak(w, w | PROCESSING, Ordering::AcqRel, Ordering::Relaxed) {
                Ok(_) => return true,
                Err(cur) => w = cur,
            }
        }
    }

    /// Give the claim back (unselect, semantics.md §6.9).
    #[cfg_attr(dref_loom, allow(dead_code))]
    pub(crate) fn unclaim(&self) {
        // Release: the next claimer sees this runner's changes.
        self.0.fetch_and(!PROCESSING, Ordering::Release);
    }

    /// Close from exactly `w0` (read with [`HeadState::load`] before the
    /// emptiness check). Requires `w0` to have no adder in flight.
    pub(crate) fn close_from(&self, w0: u64) -> bool {
        if adders(w0) != 0 || w0 & CLOSED != 0 {
            return false;
        }
        // AcqRel: success means no adder entered since `w0`.
        self.0.compare_exchange(w0, w0 | CLOSED, Ordering::AcqRel, Ordering::Acquire).is_ok()
    }

    #[cfg_attr(dref_loom, allow(dead_code))]
    pub(crate) fn is_closed(&self) -> bool {
        self.load() & CLOSED != 0
    }
}

#[cfg(all(test, not(dref_loom)))]
mod tests {
    use super::*;

    #[test]
    fn lifecycle() {
        let s = HeadState::new();
        assert!(!s.try_claim(), "unborn heads are not selectable");
        assert_eq!(s.enter(), Ok(true));
        let w_in = s.load();
        assert_eq!(adders(w_in), 1);
        assert!(s.try_claim());
        assert!(!s.try_claim(), "one runner per head");
        assert!(!s.close_from(s.load()), "adder in flight");
        s.exit();
        let w0 = s.load();
        assert_eq!(s.enter(), Ok(false));
        s.exit();
        assert!(!s.close_from(w0), "an adder came and went: version changed");
        let w1 = s.load();
        assert!(s.close_from(w1));
        assert_eq!(s.enter(), Err(Closed));
        assert!(s.is_closed());
    }
}
