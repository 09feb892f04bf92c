//! The tree-mod-log seq tracker: blockers and the lowest seq (semantics.md §5.3, lock L7).
//!
//! # Following a recorded numbering
//!
//! In the kernel the seq moves with every logged tree modification while a
//! blocker is registered, and restarts at 0 with every transaction. A
//! recording (a trace replay) sees only some of those values: the seq each
//! ref was added with and the seq each blocker got. [`SeqTracker::set_current`],
//! [`SeqTracker::register_at`] and [`SeqTracker::reset`] reproduce them
//! without replaying the invisible increments.
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

/// Why a [`SeqTracker`] call was refused. Nothing changed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SeqError {
    /// A blocker at seq 0: 0 means "no seq" (a ref with seq 0 is never held
    /// back, and a lowest seq of 0 means no blocker), so no blocker has it.
    #[error("a tree-mod-log blocker cannot have seq 0")]
    ZeroSeq,
    /// The seq restarts only when no blocker is registered (the kernel
    /// starts a transaction only then; it warns otherwise).
    #[error("cannot reset the tree-mod seq while blockers are registered (lowest seq {lowest})")]
    BlockersLive {
        /// The lowest registered blocker's seq.
        lowest: u64,
    },
}

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

    /// The current `tree_mod_seq` (read, not incremented: semantics.md §4.3).
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

    /// Register a blocker at a given `seq` (a recorded
    /// `btrfs_get_tree_mod_seq`) without moving the current seq: refs keep
    /// the seq [`current`](Self::current) gives them, whatever blockers
    /// exist. Refs with a seq at or above `seq` are held back until the
    /// returned guard drops. Several blockers may share a seq.
    ///
    /// ```
    /// use delayed_refs::SeqTracker;
    /// let t = SeqTracker::new();
    /// t.set_current(7);
    /// let b = t.register_at(5).unwrap();
    /// assert_eq!((b.seq(), t.current(), t.lowest_seq()), (5, 7, 5));
    /// assert!(t.holds_back(5) && !t.holds_back(4));
    /// drop(b);
    /// assert_eq!(t.lowest_seq(), 0);
    /// assert!(t.register_at(0).is_err());
    /// ```
    ///
    /// # Errors
    ///
    /// [`SeqError::ZeroSeq`] for `seq == 0`.
    pub fn register_at(&self, seq: u64) -> Result<SeqBlocker<'_>, SeqError> {
        if seq == 0 {
            return Err(SeqError::ZeroSeq);
        }
        let mut b = self.blockers.lock().unwrap_or_else(|e| e.into_inner());
        *b.entry(seq).or_insert(0) += 1;
        let low = *b.keys().next().expect("just inserted");
        // SeqCst: pairs with the Acquire load in `lowest_seq`; a ref added
        // after this returns is checked against the new lowest.
        self.lowest.store(low, Ordering::SeqCst);
        Ok(SeqBlocker { tracker: self, seq })
    }

    /// Set the current seq to `seq` (a recorded value: the logged tree
    /// modifications that moved the kernel's seq in between are not
    /// replayed). Refs created afterwards carry `seq` (fs-tree roots);
    /// registered blockers are unchanged. The value may be lower than the
    /// current one, or than a registered blocker's: such refs are not held
    /// back by that blocker, as in the kernel a ref whose seq was read before
    /// the blocker registered is not. Serialized with [`register`](Self::register).
    ///
    /// ```
    /// use delayed_refs::SeqTracker;
    /// let t = SeqTracker::new();
    /// t.set_current(12);
    /// assert_eq!(t.current(), 12);
    /// assert_eq!(t.register().seq(), 13);
    /// t.set_current(3);
    /// assert_eq!(t.current(), 3);
    /// ```
    pub fn set_current(&self, seq: u64) {
        let _b = self.blockers.lock().unwrap_or_else(|e| e.into_inner());
        // SeqCst: pairs with the SeqCst load in `current`.
        self.seq.store(seq, Ordering::SeqCst);
    }

    /// Restart the numbering at 0, as the kernel does when a new transaction
    /// starts (`join_transaction`).
    ///
    /// ```
    /// use delayed_refs::SeqTracker;
    /// use delayed_refs::domain::seq::SeqError;
    /// let t = SeqTracker::new();
    /// let b = t.register();
    /// assert_eq!(t.reset(), Err(SeqError::BlockersLive { lowest: 1 }));
    /// drop(b);
    /// t.reset().unwrap();
    /// assert_eq!(t.current(), 0);
    /// ```
    ///
    /// # Errors
    ///
    /// [`SeqError::BlockersLive`] while a blocker is registered (nothing changes).
    pub fn reset(&self) -> Result<(), SeqError> {
        let b = self.blockers.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(&lowest) = b.keys().next() {
            return Err(SeqError::BlockersLive { lowest });
        }
        // SeqCst: pairs with the SeqCst load in `current`.
        self.seq.store(0, Ordering::SeqCst);
        Ok(())
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

    /// Whether a node with this seq must be held back (semantics.md §5.2).
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
        assert!(!t.holds_back(0), "seq 0 is never held back (§11.15)");
        drop(a);
        assert_eq!(t.lowest_seq(), 2);
        assert!(!t.holds_back(1));
        drop(b);
        assert_eq!(t.lowest_seq(), 0);
        assert_eq!(t.current(), 2);
    }

    #[test]
    fn register_at_keeps_the_current_seq() {
        let t = SeqTracker::new();
        t.set_current(40);
        let a = t.register_at(30).unwrap();
        assert_eq!((a.seq(), t.current(), t.lowest_seq()), (30, 40, 30));
        // Below the lowest: the lowest moves down; a duplicate seq counts twice.
        let b = t.register_at(12).unwrap();
        let c = t.register_at(12).unwrap();
        assert_eq!(t.lowest_seq(), 12);
        assert!(t.holds_back(12) && !t.holds_back(11) && !t.holds_back(0));
        drop(b);
        assert_eq!(t.lowest_seq(), 12, "the other blocker at 12 is still registered");
        drop(c);
        assert_eq!(t.lowest_seq(), 30);
        drop(a);
        assert_eq!(t.lowest_seq(), 0);
        assert_eq!(t.current(), 40);
        assert_eq!(t.register_at(0).err(), Some(SeqError::ZeroSeq));
        assert_eq!(t.lowest_seq(), 0, "a refused registration changes nothing");
    }

    #[test]
    fn set_current_moves_both_ways_and_register_follows() {
        let t = SeqTracker::new();
        t.set_current(9);
        assert_eq!(t.current(), 9);
        let a = t.register();
        assert_eq!(a.seq(), 10);
        t.set_current(4);
        assert_eq!((t.current(), t.lowest_seq()), (4, 10), "blockers are unchanged");
        assert!(!t.holds_back(t.current()), "a ref at the lowered seq escapes the blocker");
        assert_eq!(t.bump(), 5);
    }

    #[test]
    fn reset_only_without_blockers() {
        let t = SeqTracker::new();
        t.set_current(17);
        let a = t.register_at(3).unwrap();
        assert_eq!(t.reset(), Err(SeqError::BlockersLive { lowest: 3 }));
        assert_eq!(t.current(), 17, "a refused reset changes nothing");
        drop(a);
        assert_eq!(t.reset(), Ok(()));
        assert_eq!(t.current(), 0);
        assert_eq!(t.register().seq(), 1, "the numbering restarts at 1");
    }
}
