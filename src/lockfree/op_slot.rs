//! A head's pending extent op (semantics.md §4.6 step 4): one slot that adders merge
//! into and the runner takes.
//!
//! # Implementation details
//!
//! At run time an `arc_swap::ArcSwapOption`: readers and the runner's cheap
//! "is there one" check are loads, merges are read-copy-update loops. Under
//! the loom and shuttle models (which cannot see inside arc-swap) the same
//! operations run on a mutex of the `sync` shim, so the models schedule
//! around them.
//!
//! # Synchronization
//!
//! Every operation is one linearizable step on the slot (an RCU loop or a
//! swap); an op merged after the runner took the slot stays for the next
//! take. Nothing else is published through it.
//!
//! At run time a `pending` flag beside the `ArcSwapOption` saves the
//! runner arc-swap's load protocol on every ref it takes (most heads never
//! have an op): a merge stores the op, then sets the flag (Release); a take
//! clears the flag (`swap`, AcqRel) before it swaps the op out, and returns
//! nothing when the flag was clear. So an op in the slot has its flag set,
//! or its merger is between the store and the flag, or a taker is between
//! its two swaps and takes it; a spurious `true` only costs one arc-swap
//! load. `is_some` reads the flag first for the same reason.

#![forbid(unsafe_code)]

use crate::domain::extent_op::ExtentOp;

/// The extent-op slot of one head.
#[derive(Debug, Default)]
pub(crate) struct OpSlot(imp::Slot);

impl OpSlot {
    /// An empty slot.
    pub(crate) fn new() -> Self {
        OpSlot::default()
    }

    /// Whether an op is pending.
    pub(crate) fn is_some(&self) -> bool {
        imp::is_some(&self.0)
    }

    /// A copy of the pending op.
    pub(crate) fn get(&self) -> Option<ExtentOp> {
        imp::get(&self.0)
    }

    /// Take the pending op, leaving the slot empty.
    pub(crate) fn take(&self) -> Option<ExtentOp> {
        imp::take(&self.0)
    }

    /// Merge an update into the pending op (an adder).
    pub(crate) fn merge(&self, upd: &ExtentOp) {
        imp::update(&self.0, |cur| ExtentOp::merged(cur, upd));
    }

    /// Put back an op a failed run took, with any newer op merged over it.
    pub(crate) fn restore(&self, op: ExtentOp) {
        imp::update(&self.0, |cur| match cur {
            None => op,
            Some(newer) => ExtentOp::merged(Some(&op), newer),
        });
    }
}

#[cfg(not(any(dref_loom, dref_shuttle)))]
mod imp {
    use std::sync::Arc;

    use std::sync::atomic::{AtomicBool, Ordering};

    use arc_swap::ArcSwapOption;

    use crate::domain::extent_op::ExtentOp;

    /// The op, and whether one may be there (module docs).
    #[derive(Debug, Default)]
    pub(super) struct Slot {
        op: ArcSwapOption<ExtentOp>,
        pending: AtomicBool,
    }

    pub(super) fn get(s: &Slot) -> Option<ExtentOp> {
        s.op.load().as_deref().copied()
    }

    pub(super) fn is_some(s: &Slot) -> bool {
        // Acquire: pairs with the Release store in `update`.
        s.pending.load(Ordering::Acquire) && s.op.load().is_some()
    }

    pub(super) fn take(s: &Slot) -> Option<ExtentOp> {
        // Relaxed pre-check: the swap below decides; most heads have no op.
        // AcqRel swap: clears the flag before the op is swapped out, so an
        // op stored after this point sets it again (module docs).
        if !s.pending.load(Ordering::Relaxed) || !s.pending.swap(false, Ordering::AcqRel) {
            return None;
        }
        s.op.swap(None).as_deref().copied()
    }

    pub(super) fn update(s: &Slot, f: impl Fn(Option<&ExtentOp>) -> ExtentOp) {
        s.op.rcu(|cur| Some(Arc::new(f(cur.as_deref()))));
        // Release: after the op is in the slot; pairs with `take`/`is_some`.
        s.pending.store(true, Ordering::Release);
    }
}

#[cfg(any(dref_loom, dref_shuttle))]
mod imp {
    use crate::domain::extent_op::ExtentOp;
    use crate::sync::Mutex;

    #[derive(Debug)]
    pub(super) struct Slot(Mutex<Option<ExtentOp>>);

    impl Default for Slot {
        fn default() -> Self {
            Slot(Mutex::new(None))
        }
    }

    pub(super) fn get(s: &Slot) -> Option<ExtentOp> {
        *s.0.lock().unwrap()
    }

    pub(super) fn is_some(s: &Slot) -> bool {
        s.0.lock().unwrap().is_some()
    }

    pub(super) fn take(s: &Slot) -> Option<ExtentOp> {
        s.0.lock().unwrap().take()
    }

    pub(super) fn update(s: &Slot, f: impl Fn(Option<&ExtentOp>) -> ExtentOp) {
        let mut g = s.0.lock().unwrap();
        *g = Some(f(g.as_ref()));
    }
}
