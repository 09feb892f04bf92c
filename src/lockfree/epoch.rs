//! The root's own epoch collector and a per-thread cache of handles to it.
//!
//! Each root owns a `crossbeam_epoch::Collector` (so teardown is
//! deterministic and leak checks pass). Registering a handle costs an
//! allocation, so each thread keeps a few handles keyed by root id.

#![forbid(unsafe_code)]

use std::cell::RefCell;

use crossbeam_epoch::{Collector, Guard, LocalHandle};

use crate::sync::{AtomicU64, Ordering};

static NEXT_ROOT: AtomicU64 = AtomicU64::new(1);
const CACHED: usize = 8;

thread_local! {
    static HANDLES: RefCell<Vec<(u64, LocalHandle)>> = const { RefCell::new(Vec::new()) };
}

/// A collector with an id for the per-thread handle cache.
#[derive(Debug)]
pub(crate) struct Epoch {
    id: u64,
    collector: Collector,
}

impl Epoch {
    pub(crate) fn new() -> Self {
        Epoch { id: NEXT_ROOT.fetch_add(1, Ordering::Relaxed), collector: Collector::new() }
    }

    pub(crate) fn collector(&self) -> &Collector {
        &self.collector
    }

    /// Pin the current thread to this root's collector.
    pub(crate) fn pin(&self) -> Guard {
        HANDLES.with(|h| {
            let mut h = h.borrow_mut();
            if let Some((_, lh)) = h.iter().find(|(id, _)| *id == self.id) {
                return lh.pin();
            }
            let lh = self.collector.register();
            let g = lh.pin();
            if h.len() >= CACHED {
                h.remove(0);
            }
            h.push((self.id, lh));
            g
        })
    }

    /// Collect retired memory at a quiescent point. `retired` is how many
    /// objects were retired since the last call: each flush publishes this
    /// thread's batch and collects a bounded number of batches (crossbeam
    /// collects at most 8 bags of up to 64 objects per call), and an object
    /// needs two epoch advances, so the number of flushes scales with it.
    /// Uses this thread's cached handle: registering a fresh one would
    /// itself leave a record and a batch behind for a later collection.
    pub(crate) fn reclaim(&self, retired: u64) {
        let rounds = 64 + retired / 128;
        for _ in 0..rounds {
            self.pin().flush();
        }
    }

    /// Drop this thread's cached handle (lets the collector go when the
    /// root is dropped on this thread).
    pub(crate) fn forget_local(&self) {
        let _ = HANDLES.try_with(|h| h.borrow_mut().retain(|(id, _)| *id != self.id));
    }
}
