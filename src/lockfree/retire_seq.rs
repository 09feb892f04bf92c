//! Per-stripe retire counters: how a reader that found no live head learns
//! that a head of its bytenr lived and was retired while it read the disk.
//!
//! # Implementation details
//!
//! A fixed array of cache-padded counters, one per stripe of bytenrs (a
//! hash picks the stripe). Every retire attempt bumps its bytenr's stripe
//! *before* its close CAS; a reader reads the stripe before it looks for the
//! head and again after its backend lookup. A failed close leaves a spurious
//! bump: a reader then retries once for nothing.
//!
//! # Synchronization
//!
//! The bump is a `Release` RMW sequenced before the close CAS (`AcqRel`) and
//! the unlink. A reader that sees the head closed (an `Acquire` load of the
//! state word) or unlinked (the index's `Acquire` search reading the unlink)
//! therefore also sees the bump in its later `Acquire` load of the stripe.
//! See docs/protocols.md, "Readers".

#![forbid(unsafe_code)]

use crossbeam_utils::CachePadded;

use crate::sync::{AtomicU64, Ordering};

const STRIPES: usize = 64;

/// The retire counters of one root.
#[derive(Debug)]
pub(crate) struct RetireSeq {
    stripes: Box<[CachePadded<AtomicU64>]>,
}

/// One stripe's counter.
#[derive(Debug)]
pub(crate) struct Stripe<'a>(&'a AtomicU64);

impl RetireSeq {
    pub(crate) fn new() -> Self {
        RetireSeq { stripes: (0..STRIPES).map(|_| CachePadded::new(AtomicU64::new(0))).collect() }
    }

    /// The stripe of `bytenr` (Fibonacci hashing: neighbouring extents land
    /// on different stripes).
    pub(crate) fn stripe(&self, bytenr: u64) -> Stripe<'_> {
        let i = (bytenr.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> (64 - STRIPES.trailing_zeros())) as usize;
        Stripe(&self.stripes[i])
    }
}

impl Stripe<'_> {
    /// Called by a retirer before its close CAS.
    pub(crate) fn bump(&self) {
        // Release: pairs with `read`'s Acquire in a reader that saw this
        // head closed or unlinked (both come after this bump).
        self.0.fetch_add(1, Ordering::Release);
    }

    /// The stripe's count (a reader reads it before and after its lookup).
    pub(crate) fn read(&self) -> u64 {
        // Acquire: see `bump`.
        self.0.load(Ordering::Acquire)
    }
}
