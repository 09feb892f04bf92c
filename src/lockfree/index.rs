//! The head index behind a small internal trait, and the two index-level
//! steps of the head lifecycle written once against it.
//!
//! # Implementation details
//!
//! The real index is a `crossbeam_skiplist::base::SkipList<u64, Head>`.
//! crossbeam-epoch and crossbeam-skiplist cannot run under loom (VERIFY), so
//! the protocol steps that touch the index — [`enter`] (find or insert a head
//! and enter it as an adder, unlinking a closed one on the way) and
//! [`retire`] (close from an exact word, then unlink) — are generic over
//! [`HeadIndex`]. The runtime instantiates them with the skiplist; the loom
//! models and the Miri tier instantiate them with [`mock::MockIndex`], a
//! linearizable map built from the `sync` shim's `Mutex` and `Arc`.
//!
//! What the mock must share with the skiplist for the models to mean
//! something (crossbeam-skiplist 0.1.3 semantics, BRIEF §4):
//! - `get` returns an entry that stays usable after the node is unlinked;
//! - `insert_with` may build a value and throw it away (a concurrent insert
//!   won): the constructor has no side effects;
//! - `unlink` removes *that* node, never a newer node under the same key.
//!
//! # Synchronization
//!
//! All of it is in the head's state word (`state`): the index only
//! publishes and unlinks. An adder that finds a closed head helps unlink it
//! and retries, so it never enters a head a runner retired (hazard 1).

#![forbid(unsafe_code)]

use super::state::HeadState;

/// A value stored in the index: anything with a lifecycle word.
pub(crate) trait Indexed {
    fn state(&self) -> &HeadState;
}

/// The operations the lifecycle needs from an index of heads by bytenr.
pub(crate) trait HeadIndex {
    /// The stored head.
    type Head: Indexed;
    /// What keeps entries alive (an epoch guard for the skiplist).
    type Guard;
    /// A handle on one indexed node.
    type Entry<'g>
    where
        Self: 'g;

    /// The node indexed under `key`, if any.
    fn get<'g>(&'g self, key: u64, guard: &'g Self::Guard) -> Option<Self::Entry<'g>>;
    /// Insert `make()` under `key` unless a node is there; `make` may run and
    /// its value be discarded.
    fn insert_with<'g>(&'g self, key: u64, make: impl FnOnce() -> Self::Head, guard: &'g Self::Guard);
    /// The head an entry points at.
    fn head<'e>(entry: &'e Self::Entry<'_>) -> &'e Self::Head;
    /// Unlink exactly this node; false if it was already unlinked.
    fn unlink(entry: &Self::Entry<'_>) -> bool;
}

/// Find or create the head for `key` and enter it as an adder (spec §3.5,
/// hazard 1). Returns the entry and whether this adder is the head's first.
pub(crate) fn enter<'g, I: HeadIndex>(
    index: &'g I,
    key: u64,
    make: impl Fn() -> I::Head,
    guard: &'g I::Guard,
) -> (I::Entry<'g>, bool) {
    loop {
        let Some(entry) = index.get(key, guard) else {
            index.insert_with(key, &make, guard);
            continue;
        };
        match I::head(&entry).state().enter() {
            Ok(first) => return (entry, first),
            Err(_) => {
                // Closed: its closer is about to unlink it; help, then retry
                // into a fresh head.
                I::unlink(&entry);
                crate::sync::spin_hint();
            }
        }
    }
}

/// Close a claimed head from exactly `w0` and unlink it (spec §3.16.7 steps
/// 2-3). False: an adder entered since `w0`; the caller keeps its claim.
pub(crate) fn retire<I: HeadIndex>(entry: &I::Entry<'_>, w0: u64) -> bool {
    if !I::head(entry).state().close_from(w0) {
        return false;
    }
    I::unlink(entry);
    true
}

#[cfg(not(dref_loom))]
mod skiplist {
    use crossbeam_epoch::Guard;
    use crossbeam_skiplist::base::{Entry, SkipList};

    use super::{HeadIndex, Indexed};
    use crate::lockfree::head::Head;
    use crate::lockfree::state::HeadState;

    impl Indexed for Head {
        fn state(&self) -> &HeadState {
            &self.state
        }
    }

    impl HeadIndex for SkipList<u64, Head> {
        type Head = Head;
        type Guard = Guard;
        type Entry<'g> = Entry<'g, 'g, u64, Head>;

        fn get<'g>(&'g self, key: u64, guard: &'g Guard) -> Option<Self::Entry<'g>> {
            SkipList::get(self, &key, guard)
        }

        fn insert_with<'g>(&'g self, key: u64, make: impl FnOnce() -> Head, guard: &'g Guard) {
            // The returned reference-counted entry is released at once: the
            // caller re-reads through `get`, which needs no refcount.
            self.get_or_insert_with(key, make, guard).release(guard);
        }

        fn head<'e>(entry: &'e Self::Entry<'_>) -> &'e Head {
            entry.value()
        }

        fn unlink(entry: &Self::Entry<'_>) -> bool {
            entry.remove()
        }
    }
}

/// A loom-visible index: a vector of `(key, Arc<head>)` under the shim's
/// mutex. Linearizable, and unlinks by node identity like the skiplist.
#[cfg(any(test, dref_loom))]
pub(crate) mod mock {
    use super::{HeadIndex, Indexed};
    use crate::sync::{Arc, Mutex};

    #[derive(Debug)]
    pub(crate) struct MockIndex<H> {
        nodes: Mutex<Vec<(u64, Arc<H>)>>,
    }

    /// An entry: the index it came from and the node it names.
    #[derive(Debug)]
    pub(crate) struct MockEntry<'g, H> {
        index: &'g MockIndex<H>,
        key: u64,
        node: Arc<H>,
    }

    impl<H> MockEntry<'_, H> {
        /// Whether two entries name the same node.
        #[cfg_attr(dref_loom, allow(dead_code))]
        pub(crate) fn same_node(&self, other: &Self) -> bool {
            Arc::ptr_eq(&self.node, &other.node)
        }
    }

    impl<H> MockIndex<H> {
        pub(crate) fn new() -> Self {
            MockIndex { nodes: Mutex::new(Vec::new()) }
        }

        /// Every indexed node, by key.
        pub(crate) fn nodes(&self) -> Vec<(u64, Arc<H>)> {
            let v = self.nodes.lock().unwrap();
            v.iter().map(|(k, n)| (*k, n.clone())).collect()
        }
    }

    impl<H: Indexed> HeadIndex for MockIndex<H> {
        type Head = H;
        type Guard = ();
        type Entry<'g>
            = MockEntry<'g, H>
        where
            H: 'g;

        fn get<'g>(&'g self, key: u64, _guard: &'g ()) -> Option<MockEntry<'g, H>> {
            let v = self.nodes.lock().unwrap();
            v.iter().find(|(k, _)| *k == key).map(|(_, n)| MockEntry { index: self, key, node: n.clone() })
        }

        fn insert_with<'g>(&'g self, key: u64, make: impl FnOnce() -> H, _guard: &'g ()) {
            // Built outside the lock, like the skiplist (which may discard it).
            let fresh = Arc::new(make());
            let mut v = self.nodes.lock().unwrap();
            if !v.iter().any(|(k, _)| *k == key) {
                v.push((key, fresh));
            }
        }

        fn head<'e>(entry: &'e MockEntry<'_, H>) -> &'e H {
            &entry.node
        }

        fn unlink(entry: &MockEntry<'_, H>) -> bool {
            let mut v = entry.index.nodes.lock().unwrap();
            match v.iter().position(|(k, n)| *k == entry.key && Arc::ptr_eq(n, &entry.node)) {
                Some(i) => {
                    v.remove(i);
                    true
                }
                None => false,
            }
        }
    }
}

#[cfg(all(test, not(dref_loom)))]
mod tests {
    use super::mock::MockIndex;
    use super::*;
    use crate::lockfree::state::CLOSED;
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
        let idx = MockIndex::new();
        let (e, first) = enter(&idx, 7, fresh, &());
        assert!(first);
        MockIndex::head(&e).state().exit();
        let (e2, first2) = enter(&idx, 7, fresh, &());
        assert!(!first2);
        assert!(e.same_node(&e2));
        MockIndex::head(&e2).state().exit();
        assert_eq!(idx.nodes().len(), 1);
    }

    #[test]
    fn closed_head_is_unlinked_and_replaced() {
        let idx = MockIndex::new();
        let (e, _) = enter(&idx, 7, fresh, &());
        let h = MockIndex::head(&e);
        h.count.fetch_add(1, Ordering::Relaxed);
        h.state().exit();
        assert!(h.state().try_claim());
        assert!(!retire::<MockIndex<H>>(&e, h.state().load() | (1 << 3)), "a word with an adder never closes");
        h.count.store(0, Ordering::Relaxed);
        let w0 = h.state().load();
        // An adder comes and goes after w0: the close must fail.
        let (e2, _) = enter(&idx, 7, fresh, &());
        MockIndex::head(&e2).state().exit();
        assert!(!retire::<MockIndex<H>>(&e, w0));
        let w1 = h.state().load();
        assert!(retire::<MockIndex<H>>(&e, w1));
        assert!(idx.nodes().is_empty(), "retire unlinks");
        assert!(!MockIndex::unlink(&e), "unlink is by node identity, once");
        // A stale entry to the closed node: the next adder gets a new head.
        let (e3, first) = enter(&idx, 7, fresh, &());
        assert!(first);
        assert_eq!(MockIndex::head(&e3).state().load() & CLOSED, 0);
        MockIndex::head(&e3).state().exit();
    }

    #[test]
    fn unlink_never_removes_a_newer_node() {
        let idx = MockIndex::new();
        let (old, _) = enter(&idx, 9, fresh, &());
        MockIndex::head(&old).state().exit();
        assert!(MockIndex::unlink(&old));
        let (new, _) = enter(&idx, 9, fresh, &());
        MockIndex::head(&new).state().exit();
        assert!(!MockIndex::unlink(&old));
        assert_eq!(idx.nodes().len(), 1);
    }
}
