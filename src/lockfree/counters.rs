//! Striped root counters: exact at quiescence, cheap on the hot path.
//!
//! # Implementation details
//!
//! Each counter is 16 cache-padded cells; a thread adds to the cell picked by
//! its thread index, readers sum all cells. No cache line is written by every
//! thread (hazard 7). While threads work, a sum is approximate.

#![forbid(unsafe_code)]

use crossbeam_utils::CachePadded;

use crate::sync::{AtomicI64, Ordering};

/// One stripe under the models: the striping is a cache optimisation, not
/// a protocol, and each extra cell is a scheduling point.
const STRIPES: usize = if cfg!(any(dref_loom, dref_shuttle)) { 1 } else { 16 };

// A std atomic even under the models: it only spreads threads over stripes
// (and loom's atomics cannot live in a static).
static NEXT_THREAD: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

thread_local! {
    static STRIPE: usize = NEXT_THREAD.fetch_add(1, std::sync::atomic::Ordering::Relaxed) % STRIPES;
}

/// One striped counter.
#[derive(Debug)]
pub(crate) struct Striped {
    cells: Box<[CachePadded<AtomicI64>]>,
}

impl Default for Striped {
    fn default() -> Self {
        Striped { cells: (0..STRIPES).map(|_| CachePadded::new(AtomicI64::new(0))).collect() }
    }
}

impl Striped {
    pub(crate) fn add(&self, n: i64) {
        let i = STRIPE.with(|s| *s);
        // Relaxed: a statistic; quiescence (joins, locks) orders the sum.
        self.cells[i].fetch_add(n, Ordering::Relaxed);
    }

    pub(crate) fn sum(&self) -> i64 {
        self.cells.iter().map(|c| c.load(Ordering::Relaxed)).sum()
    }
}

/// The root counters of semantics.md §2.5.
#[derive(Debug, Default)]
pub(crate) struct RootCounters {
    pub num_heads: Striped,
    pub num_heads_ready: Striped,
    pub num_entries: Striped,
    pub pending_csums: Striped,
    /// Heads and nodes unlinked since the last `reclaim` (sizes its flushing).
    pub retired: Striped,
}
