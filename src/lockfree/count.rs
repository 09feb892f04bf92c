//! The node-count protocol: signed counts changed by adders and taken by the
//! runner (BRIEF hazard 3, spec §3.7, §3.16.4).
//!
//! | count | meaning | adder `+1` | adder `-1` | runner take |
//! |---|---|---|---|---|
//! | `> 0` | that many ADDs | merged | merged, or dropped at 1 | CAS `v → 0` in the add phase |
//! | `0` | no node | created (ADD) | created (DROP) | nothing |
//! | `< 0` | that many DROPs | merged, or dropped at -1 | merged | CAS `v → 0` in the drop phase |
//!
//! Every change is one RMW, so the old value tells exactly one thread about
//! each crossing of zero ([`Transition`]); that thread does the matching
//! `num_entries` and `C(1)` reserve accounting.

#![forbid(unsafe_code)]

use crate::sync::{AtomicI64, Ordering};

/// What one signed change did to a node (from its old and new count).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Transition {
    /// 0 → non-zero: a node was inserted (`num_entries++`, reserve `C(1)`).
    Created,
    /// non-zero → non-zero: merged.
    Merged,
    /// non-zero → 0: the node was dropped (`num_entries--`, release `C(1)`).
    Dropped,
    /// 0 → 0: nothing.
    None,
}

impl Transition {
    pub(crate) fn of(old: i64, new: i64) -> Transition {
        match (old == 0, new == 0) {
            (true, false) => Transition::Created,
            (false, false) => Transition::Merged,
            (false, true) => Transition::Dropped,
            (true, true) => Transition::None,
        }
    }

    /// The change of `num_entries` this transition accounts (the loom models
    /// account with it; the implementation inlines it next to its reserve calls).
    #[cfg_attr(not(dref_loom), allow(dead_code))]
    pub(crate) fn entries_delta(self) -> i64 {
        match self {
            Transition::Created => 1,
            Transition::Dropped => -1,
            Transition::Merged | Transition::None => 0,
        }
    }
}

/// Add `delta` (an adder's ±1, or a restore/merge amount); returns the old value.
pub(crate) fn change(count: &AtomicI64, delta: i64) -> i64 {
    // AcqRel: the adder's change is ordered with the runner's CAS take on
    // the same word; any interleaving is one total order of RMWs.
    count.fetch_add(delta, Ordering::AcqRel)
}

/// Read a count for a take.
pub(crate) fn peek(count: &AtomicI64) -> i64 {
    // Acquire: pairs with the adders' AcqRel `change`.
    count.load(Ordering::Acquire)
}

/// Take exactly `v` (the value just peeked): fails if an adder changed it,
/// and the runner peeks again. A sign change while taking can therefore
/// never lose or double a ref.
pub(crate) fn try_take(count: &AtomicI64, v: i64) -> bool {
    // AcqRel: see `change`.
    count.compare_exchange(v, 0, Ordering::AcqRel, Ordering::Acquire).is_ok()
}

/// Take whatever is there (merge pass, destroy); returns it.
#[cfg_attr(dref_loom, allow(dead_code))]
pub(crate) fn take_all(count: &AtomicI64) -> i64 {
    // AcqRel: see `change`.
    count.swap(0, Ordering::AcqRel)
}
