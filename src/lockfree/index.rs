//! The two index-level steps of the head lifecycle, written once against
//! the storage seam ([`OrderedMap`], module `store`).
//!
//! # Implementation details
//!
//! [`enter`] finds or inserts a head and enters it as an adder, unlinking a
//! closed one on the way; [`retire`] closes from an exact word, then
//! unlinks. The runtime runs them on crossbeam-skiplist; the loom and
//! shuttle models and Miri on the mock map of module `store` (whose
//! contract with the skiplist is written there).
//!
//! # Synchronization
//!
//! All of it is in the head's state word (`state`): the index only
//! publishes and unlinks. An adder that finds a closed head helps unlink it
//! and retries, so it never enters a head a runner retired (hazard 1).

#![forbid(unsafe_code)]

use super::state::HeadState;
use super::store::{MapEntry, OrderedMap};

/// A value stored in the index: anything with a lifecycle word.
pub(crate) trait Indexed {
    fn state(&self) -> &HeadState;
}

/// Find or create the head for `key` and enter it as an adder (semantics.md §4.5,
/// hazard 1). Returns the entry and whether this adder is the head's first.
pub(crate) fn enter<'g, H: Indexed, M: OrderedMap<u64, H>>(
    index: &'g M,
    key: u64,
    make: impl Fn() -> H,
    guard: &'g M::Guard,
) -> (M::Entry<'g>, bool) {
    loop {
        let Some(entry) = index.get(&key, guard) else {
            index.insert_with(key, &make, guard);
            continue;
        };
        match entry.value().state().enter() {
            Ok(first) => return (entry, first),
            Err(_) => {
                // Closed: its closer is about to unlink it; help, then retry
                // into a fresh head.
                entry.remove();
                crate::sync::spin_hint();
            }
        }
    }
}

/// Close a claimed head from exactly `w0` and unlink it (semantics.md §6.11 steps
/// 2-3). False: an adder entered since `w0`; the caller keeps its claim.
pub(crate) fn retire<H: Indexed, E: MapEntry<u64, H>>(entry: &E, w0: u64) -> bool {
    if !entry.value().state().close_from(w0) {
        return false;
    }
    entry.remove();
    true
}

#[cfg(all(test, not(any(dref_loom, dref_shuttle))))]
mod tests {
    use super::*;
    use crate::lockfree::state::CLOSED;
    use crate::lockfree::store::mock::MockMap;
    use crate::lockfree::store::{MapEntry, OrderedMap};
    use crate::sync::{AtomicI64, Ordering};

    #[derive(Debug)]
    struct H {
        state: HeadState,
        count: AtomicI64,
    }

    impl Indexed for H {
        fn state(&self) -> &HeadState {
            &self.state
        }
    }

    fn fresh() -> H {
        H { state: HeadState::new(), count: AtomicI64::new(0) }
    }

    #[test]
    fn enter_creates_once_and_reports_first() {
        let idx = MockMap::<u64, H>::new();
        let (e, first) = enter(&idx, 7, fresh, &());
        assert!(first);
        e.value().state().exit();
        let (e2, first2) = enter(&idx, 7, fresh, &());
        assert!(!first2);
        assert!(e.same_node(&e2));
        e2.value().state().exit();
        assert_eq!(idx.len(), 1);
    }

    #[test]
    fn closed_head_is_unlinked_and_replaced() {
        let idx = MockMap::<u64, H>::new();
        let (e, _) = enter(&idx, 7, fresh, &());
        let h = e.value();
        h.count.fetch_add(1, Ordering::Relaxed);
        h.state().exit();
        assert!(h.state().try_claim());
        assert!(!retire(&e, h.state().load() | (1 << 3)), "a word with an adder never closes");
        h.count.store(0, Ordering::Relaxed);
        let w0 = h.state().load();
        // An adder comes and goes after w0: the close must fail.
        let (e2, _) = enter(&idx, 7, fresh, &());
        e2.value().state().exit();
        assert!(!retire(&e, w0));
        let w1 = h.state().load();
        assert!(retire(&e, w1));
        assert!(idx.is_empty(), "retire unlinks");
        assert!(!e.remove(), "unlink is by node identity, once");
        // A stale entry to the closed node: the next adder gets a new head.
        let (e3, first) = enter(&idx, 7, fresh, &());
        assert!(first);
        assert_eq!(e3.value().state().load() & CLOSED, 0);
        e3.value().state().exit();
    }

    #[test]
    fn unlink_never_removes_a_newer_node() {
        let idx = MockMap::<u64, H>::new();
        let (old, _) = enter(&idx, 9, fresh, &());
        old.value().state().exit();
        assert!(old.remove());
        let (new, _) = enter(&idx, 9, fresh, &());
        new.value().state().exit();
        assert!(!old.remove());
        assert_eq!(idx.len(), 1);
    }
}
