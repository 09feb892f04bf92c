//! Cells holding a pair of u64 that change by whole transitions.
//!
//! # Implementation details
//!
//! [`LockedCell`] is the kernel's shape (a lock per reserve, L5).
//! [`AtomicCell`] packs the pair into one 128-bit word (portable-atomic's
//! `AtomicU128`, lock-free `cmpxchg16b` on x86-64) and applies a transition
//! with a CAS loop. Under `--cfg dref_loom` the word is a loom `AtomicU64`
//! holding two 32-bit halves: the loop is the same code, models use small values.
//!
//! # Synchronization
//!
//! State word of an [`AtomicCell`]:
//!
//! | bits | field | meaning |
//! |---|---|---|
//! | high half | a | `size` for a reserve, `used` for a space info |
//! | low half | b | `reserved` for a reserve, `bytes_may_use` for a space info |
//!
//! Every transition is `load(Acquire)` then `compare_exchange(AcqRel, Acquire)`
//! from the loaded snapshot; the output is computed from the snapshot that was
//! installed, so "excess", "take" and "surplus" always describe the exact
//! state they changed. The orderings make a reserve's changes visible together
//! with whatever the transition's caller published before it; no other memory
//! is guarded by the cell.

#![forbid(unsafe_code)]

/// A cell of two u64 values changed only by whole transitions.
pub trait PairCell: Send + Sync + std::fmt::Debug {
    /// A cell holding `v`.
    fn new(v: (u64, u64)) -> Self;
    /// The current value.
    fn load(&self) -> (u64, u64);
    /// Apply `f` atomically: `f` sees the current value and returns the new
    /// value and an output; it may run more than once and must be pure.
    fn transition<R>(&self, f: impl FnMut((u64, u64)) -> ((u64, u64), R)) -> R;
}

/// A pair behind a mutex (the locked port's reserves).
#[derive(Debug, Default)]
pub struct LockedCell(parking_lot::Mutex<(u64, u64)>);

impl PairCell for LockedCell {
    fn new(v: (u64, u64)) -> Self {
        LockedCell(parking_lot::Mutex::new(v))
    }
    fn load(&self) -> (u64, u64) {
        *self.0.lock()
    }
    fn transition<R>(&self, mut f: impl FnMut((u64, u64)) -> ((u64, u64), R)) -> R {
        let mut g = self.0.lock();
        let (n, r) = f(*g);
        *g = n;
        r
    }
}

#[cfg(not(dref_loom))]
mod word {
    pub(super) type Word = portable_atomic::AtomicU128;
    pub(super) type Raw = u128;
    pub(super) fn pack((a, b): (u64, u64)) -> Raw {
        ((a as u128) << 64) | b as u128
    }
    pub(super) fn unpack(w: Raw) -> (u64, u64) {
        ((w >> 64) as u64, w as u64)
    }
}

#[cfg(dref_loom)]
mod word {
    pub(super) type Word = loom::sync::atomic::AtomicU64;
    pub(super) type Raw = u64;
    pub(super) fn pack((a, b): (u64, u64)) -> Raw {
        debug_assert!(a >> 32 == 0 || a >> 32 == 0xffff_ffff, "loom cells hold 32-bit halves");
        ((a as u32 as u64) << 32) | (b as u32 as u64)
    }
    pub(super) fn unpack(w: Raw) -> (u64, u64) {
        // Sign-extend the high half so a wrapped size stays "negative" (§11.12).
        (((w >> 32) as u32 as i32) as i64 as u64, w as u32 as u64)
    }
}

/// A pair in one atomic word, changed by CAS loops (the lock-free reserves).
#[derive(Debug)]
pub struct AtomicCell(word::Word);

impl Default for AtomicCell {
    fn default() -> Self {
        AtomicCell::new((0, 0))
    }
}

impl PairCell for AtomicCell {
    fn new(v: (u64, u64)) -> Self {
        AtomicCell(word::Word::new(word::pack(v)))
    }
    fn load(&self) -> (u64, u64) {
        // Acquire: pairs with the AcqRel CAS in `transition`.
        word::unpack(self.0.load(crate::sync::Ordering::Acquire))
    }
    fn transition<R>(&self, mut f: impl FnMut((u64, u64)) -> ((u64, u64), R)) -> R {
        use crate::sync::Ordering::{AcqRel, Acquire};
        // Acquire: pairs with the AcqRel CAS of the previous transition.
        let mut cur = self.0.load(Acquire);
        loop {
            let (next, out) = f(word::unpack(cur));
            let next = word::pack(next);
            if next == cur {
                // No change: the transition linearizes at the load above.
                return out;
            }
            // AcqRel: releases this transition's caller-side writes and
            // acquires those of the transition it replaces.
            match self.0.compare_exchange_weak(cur, next, AcqRel, Acquire) {
                Ok(_) => return out,
                Err(actual) => {
                    cur = actual;
                    crate::sync::spin_hint();
                }
            }
        }
    }
}
