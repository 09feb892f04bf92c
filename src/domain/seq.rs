//! The tree-mod-log seq tracker: blockers and the lowest seq (spec §3.22, lock L7).
//!
//! # Implementation details
//!
//! Registration and removal are rare and take a small mutex; the hot query
//! [`SeqTracker::lowest_seq`] is one atomic load of a cached minimum.
//!
//! # Synchronization
//!
//! `lowest` is written only under `blockers`' mutex with `SeqCst` stores and
//! read with `Acquire`. A blocker registered before a node is created is
//! visible to any runner that later reads that node: registration's store
//! happens-before the adder reads `tree_mod_seq` (same SeqCst total order on
//! `seq`), and the runner reaches the node only through the adder's release
//! publication, so its `Acquire` load of `lowest` sees the registration (L7).

#![forbid(unsafe_code)]

use std::collections::BTreeMap;

use crate::sync::{AtomicU64, Mutex, Ordering};

/// Tracks `tree_mod_seq` and the registered point-in-time blockers.
#[derive(Debug, Default)]
pub struct SeqTracker {
    seq: AtomicU64,
    lowest: AtomicU64,
    blockers: Mutex<BTreeMap<u64, usize>>,
}

/// A registered blocker; unregisters on drop.
#[derive(Debug)]
#[must_use = "the blocker unregisters when dropped"]
pub struct SeqBlocker<'a> {
    tracker: &'a SeqTracker,
    seq: u64,
}

impl SeqBlocker<'_> {
    /// The blocker's seq: refs created from now on carry a seq at least this.
    pub fn seq(&self) -> u64 {
        self.seq
    }
}

impl Drop for SeqBlocker<'_> {
    fn drop(&mut self) {
        self.tracker.unregister(self.seq);
    }
}

impl SeqTracker {
    /// A tracker with no blockers and seq 0.
    pub fn new() -> Self {
        Self::default()
    }

    /// The current `tree_mod_seq` (read, not incremented: spec §3.3).
    pub fn current(&self) -> u64 {
        // SeqCst: pairs with the SeqCst increment in `register`/`bump`.
        self.seq.load(Ordering::SeqCst)
    }

    /// Record one logged tree modification (advances the seq).
    pub fn bump(&self) -> u64 {
        self.seq.fetch_add(1, Ordering::SeqCst) + 1
    }

    /// Register a blocker (`btrfs_get_tree_mod_seq`): its seq is `++tree_mod_seq`.
    pub fn register(&self) -> SeqBlocker<'_> {
        let mut b = self.blockers.lock().unwrap_or_else(|e| e.into_inner());
        // Publish a conservative lowest seq *before* the seq moves: a node
        // that reads the new seq must never meet a runner that still reads
        // "no blocker". `next` is at most the blocker's own seq (a concurrent
        // `bump` can only raise it), so this holds back at least as much.
        let next = self.seq.load(Ordering::SeqCst) + 1;
        let cur = self.lowest.load(Ordering::SeqCst);
        self.lowest.store(if cur == 0 { next } else { cur.min(next) }, Ordering::SeqCst);
        let seq = self.seq.fetch_add(1, Ordering::SeqCst) + 1;
        *b.entry(seq).or_insert(0) += 1;
        let low = *b.keys().next().expect("just inserted");
        // SeqCst: pairs with the Acquire load in `lowest_seq`.
        self.lowest.store(low, Ordering::SeqCst);
        SeqBlocker { tracker: self, seq }
    }

    fn unregister(&self, seq: u64) {
        let mut b = self.blockers.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(c) = b.get_mut(&seq) {
            *c -= 1;
            if *c == 0 {
                b.remove(&seq);
            }
        }
        let low = b.keys().next().copied().unwrap_or(0);
        // SeqCst: pairs with the Acquire load in `lowest_seq`.
        self.lowest.store(low, Ordering::SeqCst);
    }

    /// The lowest registered blocker seq, 0 if none (`btrfs_tree_mod_log_lowest_seq`).
    pub fn lowest_seq(&self) -> u64 {
        // Acquire: pairs with the SeqCst stores in `register`/`unregister`.
        self.lowest.load(Ordering::Acquire)
    }

    /// Whether a node with this seq must be held back (spec §3.11).
    pub fn holds_back(&self, seq: u64) -> bool {
        if seq == 0 {
            return false;
        }
        let min = self.lowest_seq();
        min != 0 && seq >= min
    }
}

#[cfg(all(test, not(dref_loom)))]
mod tests {
    use super::*;

    #[test]
    fn lowest_tracks_registration_order() {
        let t = SeqTracker::new();
        assert_eq!(t.lowest_seq(), 0);
        assert!(!t.holds_back(5));
        let a = t.register();
        let b = t.register();
        assert_eq!(a.seq(), 1);
        assert_eq!(b.seq(), 2);
        assert_eq!(t.lowest_seq(), 1);
        assert!(t.holds_back(1) && t.holds_back(3));
        assert!(!t.holds_back(0), "seq 0 is never held back (§5.15)");
        drop(a);
        assert_eq!(t.lowest_seq(), 2);
        assert!(!t.holds_back(1));
        drop(b);
        assert_eq!(t.lowest_seq(), 0);
        assert_eq!(t.current(), 2);
    }
}
