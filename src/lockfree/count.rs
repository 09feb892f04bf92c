//! The node-count protocol: signed counts changed by adders and taken by the
//! runner (hazard 3, semantics.md §4.7, §6.8).
//!
//! | count | meaning | adder `+1` | adder `-1` | runner take |
//! |---|---|---|---|---|
//! | `> 0` | that many ADDs | merged | merged, or dropped at 1 | CAS `v → 0` in the add phase |
//! | `0` | no node | created (ADD) | created (DROP) | nothing |
//! | `< 0` | that many DROPs | merged, or dropped at -1 | merged | CAS `v → 0` in the drop phase |
//! | `DEAD` (and below) | unlinked by the runner | refused: retry into a fresh node | refused | nothing |
//!
//! Every change is one RMW, so the old value tells exactly one thread about
//! each crossing of zero ([`Transition`]); that thread does the matching
//! `num_entries` and `C(1)` reserve accounting.
//!
//! A zero node is "absent", but it still occupies the node map. So that a
//! head that never empties (a hot head with adders always in flight) does
//! not accumulate every key it ever saw, the claiming runner kills zero
//! nodes: CAS `0 → DEAD`, then unlinks them (an adder does the same to a
//! zero node left with another level). An adder that finds a dead node
//! (its RMW returned a dead value) made no change that counts: it helps
//! unlink the node and retries into a fresh one. `DEAD` is `-2^62`, so the
//! ±1 changes of late adders can neither wrap it nor bring it near a live
//! count.

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

/// The count of a node the runner killed (see the module docs).
pub(crate) const DEAD: i64 = -(1 << 62);

/// Whether a count read from a node means "dead".
pub(crate) fn is_dead(v: i64) -> bool {
    v < DEAD / 2
}

/// The node was killed: the change did not count.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Dead;

/// Add `delta` (an adder's ±1, or a restore/merge amount); returns the old
/// value, or `Dead` if the node was killed (the change then counts for nothing).
pub(crate) fn change(count: &AtomicI64, delta: i64) -> Result<i64, Dead> {
    // AcqRel: the adder's change is ordered with the runner's CAS take and
    // kill on the same word; any interleaving is one total order of RMWs.
    let old = count.fetch_add(delta, Ordering::AcqRel);
    if is_dead(old) { Err(Dead) } else { Ok(old) }
}

/// Read a count; a dead node reads as 0 (absent).
pub(crate) fn peek(count: &AtomicI64) -> i64 {
    // Acquire: pairs with the adders' AcqRel `change`.
    let v = count.load(Ordering::Acquire);
    if is_dead(v) { 0 } else { v }
}

/// Kill a zero node: true if the node was 0 and is now dead; the caller
/// then unlinks it. The claiming runner kills the zero nodes it passes; an
/// adder kills a zero node whose level is not its own (re-allocation).
#[cfg_attr(dref_loom, allow(dead_code))]
pub(crate) fn try_kill(count: &AtomicI64) -> bool {
    // AcqRel: ordered with adders' RMWs on the same word; an adder whose
    // RMW follows this one sees DEAD and retries elsewhere.
    count.compare_exchange(0, DEAD, Ordering::AcqRel, Ordering::Relaxed).is_ok()
}

/// Take exactly `v` (the value just peeked): fails if an adder changed it,
/// and the runner peeks again. A sign change while taking can therefore
/// never lose or double a ref.
pub(crate) fn try_take(count: &AtomicI64, v: i64) -> bool {
    // AcqRel: see `change`.
    count.compare_exchange(v, 0, Ordering::AcqRel, Ordering::Acquire).is_ok()
}

/// Take whatever is there (merge pass, destroy, a marker's notes); returns it
/// (0 for a dead entry).
#[cfg_attr(dref_loom, allow(dead_code))]
pub(crate) fn take_all(count: &AtomicI64) -> i64 {
    loop {
        let v = peek(count);
        if v == 0 || try_take(count, v) {
            return v;
        }
    }
}
