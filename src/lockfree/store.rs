//! The storage seam of the lock-free engine: the two ordered maps it keeps
//! (heads by bytenr, ref nodes by [`NodeIx`](super::head::NodeIx)) and the
//! reclamation domain whose guards keep their entries alive.
//!
//! # Implementation details
//!
//! The engine (`root`, `run`, `head`) is written once against [`Stores`].
//! The runtime instantiates it with [`SkipStores`]: crossbeam-skiplist maps
//! reclaimed by the root's own crossbeam-epoch collector. The loom and
//! shuttle models, and Miri, instantiate the same code with
//! `mock::MockStores`: linearizable maps built from the `sync` shim's
//! `Mutex` and `Arc`, so every atomic of the engine's own protocols, and
//! every map operation, is a point where the model checker may switch
//! threads. Nothing of the engine is re-written for the models.
//!
//! What the mock shares with crossbeam-skiplist 0.1.3's raw (`base`) layer,
//! for the models to mean something:
//! - `get`, `lower_bound` and `front` see only entries not yet removed; an
//!   entry handle stays usable (its value readable) after its node is
//!   removed, for as long as the guard it came from lives;
//! - `next` from a handle is the first entry with a greater key present at
//!   the time of the call, whether or not the handle's node was removed;
//! - `upsert` may build a value and discard it (a
//!   concurrent insert won): constructors have no side effects;
//! - `remove` removes *that* node, never a newer node under the same key,
//!   and says whether this call removed it.
//!
//! # Synchronization
//!
//! The maps only publish and unlink; the engine's protocols live in the
//! atomics of the values (module `state`, `count`). The skiplist publishes
//! an insert with a `Release` CAS and searches with `Acquire` loads, so a
//! thread that finds an entry sees the value as built; the mock's mutex
//! gives the same.

#![forbid(unsafe_code)]

/// One entry of an [`OrderedMap`], valid while the guard it came from lives.
pub(crate) trait MapEntry<K, V>: Clone {
    /// The entry's key.
    fn key(&self) -> &K;
    /// The entry's value (readable even after the entry was removed).
    fn value(&self) -> &V;
    /// The first present entry with a greater key.
    fn next(&self) -> Option<Self>;
    /// Remove this entry's node; false if it was already removed.
    fn remove(&self) -> bool;
}

/// An ordered concurrent map with guard-scoped entries (the raw layer of
/// crossbeam-skiplist, and a loom-visible mock of it).
pub(crate) trait OrderedMap<K, V>: Send + Sync {
    /// What keeps entries alive.
    type Guard;
    /// A handle on one entry.
    type Entry<'g>: MapEntry<K, V>
    where
        Self: 'g;

    /// The entry under `key`, if present.
    fn get<'g>(&'g self, key: &K, guard: &'g Self::Guard) -> Option<Self::Entry<'g>>;
    /// The first entry with a key at least `key`.
    fn lower_bound<'g>(&'g self, key: &K, guard: &'g Self::Guard) -> Option<Self::Entry<'g>>;
    /// The first entry.
    fn front<'g>(&'g self, guard: &'g Self::Guard) -> Option<Self::Entry<'g>>;
    /// Find the entry under `key`, or insert `make()` there (`make` may run
    /// and its value be discarded when a concurrent insert wins), and call
    /// `f` on its value; if `f` says so, remove that entry. One search.
    fn upsert<R>(&self, key: K, make: impl FnOnce() -> V, f: impl FnOnce(&V) -> (R, bool), guard: &Self::Guard) -> R;
    /// Whether the map has no entry.
    fn is_empty(&self) -> bool;
}

/// The engine's stores: a head index, a node map and their reclamation.
pub(crate) trait Stores: Send + Sync + Sized {
    /// An epoch guard (or nothing, for the mock).
    type Guard;
    /// Heads by bytenr.
    type Heads: OrderedMap<u64, super::head::Head, Guard = Self::Guard>;
    /// Ref nodes and late-ADD markers of every head.
    type Nodes: OrderedMap<super::head::NodeIx, super::head::RefNode, Guard = Self::Guard>;

    /// A fresh domain with its two empty maps.
    fn create() -> (Self, Self::Heads, Self::Nodes);
    /// Pin the current thread: entries read under the guard stay valid.
    fn pin(&self) -> Self::Guard;
    /// Collect retired memory at a quiescent point (`retired` objects were
    /// unlinked since the last call).
    #[cfg_attr(any(dref_loom, dref_shuttle), allow(dead_code))]
    fn reclaim(&self, retired: u64);
    /// Drop this thread's cached handle on the domain.
    fn forget_local(&self);
}

/// An entry of the engine's head index.
pub(crate) type HeadEntry<'g, S> = <<S as Stores>::Heads as OrderedMap<u64, super::head::Head>>::Entry<'g>;

#[cfg(not(any(dref_loom, dref_shuttle)))]
pub(crate) use skiplist::SkipStores;

#[cfg(not(any(dref_loom, dref_shuttle)))]
mod skiplist {
    use std::ops::Bound;

    use crossbeam_epoch::Guard;
    use crossbeam_skiplist::base::{Entry, SkipList};

    use super::{MapEntry, OrderedMap, Stores};
    use crate::lockfree::epoch::Epoch;
    use crate::lockfree::head::{Head, NodeIx, RefNode};

    impl<K: Ord + Send + 'static, V: Send + 'static> MapEntry<K, V> for Entry<'_, '_, K, V> {
        fn key(&self) -> &K {
            Entry::key(self)
        }

        fn value(&self) -> &V {
            Entry::value(self)
        }

        fn next(&self) -> Option<Self> {
            Entry::next(self)
        }

        fn remove(&self) -> bool {
            Entry::remove(self)
        }
    }

    impl<K: Ord + Send + Sync + 'static, V: Send + Sync + 'static> OrderedMap<K, V> for SkipList<K, V> {
        type Guard = Guard;
        type Entry<'g> = Entry<'g, 'g, K, V>;

        fn get<'g>(&'g self, key: &K, guard: &'g Guard) -> Option<Self::Entry<'g>> {
            SkipList::get(self, key, guard)
        }

        fn lower_bound<'g>(&'g self, key: &K, guard: &'g Guard) -> Option<Self::Entry<'g>> {
            SkipList::lower_bound(self, Bound::Included(key), guard)
        }

        fn front<'g>(&'g self, guard: &'g Guard) -> Option<Self::Entry<'g>> {
            SkipList::front(self, guard)
        }

        fn upsert<R>(&self, key: K, make: impl FnOnce() -> V, f: impl FnOnce(&V) -> (R, bool), guard: &Guard) -> R {
            let e = self.get_or_insert_with(key, make, guard);
            let (r, remove) = f(e.value());
            if remove {
                e.remove(guard);
            }
            e.release(guard);
            r
        }

        fn is_empty(&self) -> bool {
            SkipList::is_empty(self)
        }
    }

    /// The runtime stores: crossbeam skiplists on the root's own collector.
    #[derive(Debug)]
    pub(crate) struct SkipStores(Epoch);

    impl Stores for SkipStores {
        type Guard = Guard;
        type Heads = SkipList<u64, Head>;
        type Nodes = SkipList<NodeIx, RefNode>;

        fn create() -> (Self, Self::Heads, Self::Nodes) {
            let epoch = Epoch::new();
            let heads = SkipList::new(epoch.collector().clone());
            let nodes = SkipList::new(epoch.collector().clone());
            (SkipStores(epoch), heads, nodes)
        }

        fn pin(&self) -> Guard {
            self.0.pin()
        }

        fn reclaim(&self, retired: u64) {
            self.0.reclaim(retired)
        }

        fn forget_local(&self) {
            self.0.forget_local()
        }
    }
}

/// Loom- and shuttle-visible stores: ordered maps under the shim's mutex.
#[cfg(any(test, dref_loom, dref_shuttle))]
pub(crate) mod mock {
    use std::collections::BTreeMap;
    use std::ops::Bound;

    use super::{MapEntry, OrderedMap, Stores};
    use crate::lockfree::head::{Head, NodeIx, RefNode};
    use crate::sync::{Arc, Mutex};

    /// A linearizable ordered map: `(key → Arc<value>)` under one mutex.
    /// Nodes are identified by their `Arc`, so `remove` never removes a
    /// newer node under the same key.
    #[derive(Debug)]
    pub(crate) struct MockMap<K, V> {
        nodes: Mutex<BTreeMap<K, Arc<V>>>,
    }

    /// An entry: the map it came from, its key and the node it names.
    #[derive(Debug)]
    pub(crate) struct MockEntry<'g, K, V> {
        map: &'g MockMap<K, V>,
        key: K,
        node: Arc<V>,
    }

    impl<K: Clone, V> Clone for MockEntry<'_, K, V> {
        fn clone(&self) -> Self {
            MockEntry { map: self.map, key: self.key.clone(), node: self.node.clone() }
        }
    }

    impl<K: Ord + Clone, V> MockMap<K, V> {
        pub(crate) fn new() -> Self {
            MockMap { nodes: Mutex::new(BTreeMap::new()) }
        }

        fn entry(&self, found: Option<(&K, &Arc<V>)>) -> Option<MockEntry<'_, K, V>> {
            found.map(|(k, n)| MockEntry { map: self, key: k.clone(), node: n.clone() })
        }

        /// How many entries are present.
        #[cfg_attr(any(not(test), dref_loom, dref_shuttle), allow(dead_code))]
        pub(crate) fn len(&self) -> usize {
            self.nodes.lock().unwrap().len()
        }
    }

    impl<K: Ord + Clone, V> MockEntry<'_, K, V> {
        /// Whether two entries name the same node.
        #[cfg_attr(any(not(test), dref_loom, dref_shuttle), allow(dead_code))]
        pub(crate) fn same_node(&self, other: &Self) -> bool {
            Arc::ptr_eq(&self.node, &other.node)
        }
    }

    impl<K: Ord + Clone, V> MapEntry<K, V> for MockEntry<'_, K, V> {
        fn key(&self) -> &K {
            &self.key
        }

        fn value(&self) -> &V {
            &self.node
        }

        fn next(&self) -> Option<Self> {
            let v = self.map.nodes.lock().unwrap();
            self.map.entry(v.range((Bound::Excluded(&self.key), Bound::Unbounded)).next())
        }

        fn remove(&self) -> bool {
            let mut v = self.map.nodes.lock().unwrap();
            match v.get(&self.key) {
                Some(n) if Arc::ptr_eq(n, &self.node) => {
                    v.remove(&self.key);
                    true
                }
                _ => false,
            }
        }
    }

    impl<K: Ord + Clone + Send + Sync, V: Send + Sync> OrderedMap<K, V> for MockMap<K, V> {
        type Guard = ();
        type Entry<'g>
            = MockEntry<'g, K, V>
        where
            Self: 'g;

        fn get<'g>(&'g self, key: &K, _: &'g ()) -> Option<Self::Entry<'g>> {
            let v = self.nodes.lock().unwrap();
            self.entry(v.get_key_value(key))
        }

        fn lower_bound<'g>(&'g self, key: &K, _: &'g ()) -> Option<Self::Entry<'g>> {
            let v = self.nodes.lock().unwrap();
            self.entry(v.range(key..).next())
        }

        fn front<'g>(&'g self, _: &'g ()) -> Option<Self::Entry<'g>> {
            let v = self.nodes.lock().unwrap();
            self.entry(v.iter().next())
        }

        fn upsert<R>(&self, key: K, make: impl FnOnce() -> V, f: impl FnOnce(&V) -> (R, bool), _: &()) -> R {
            // Built outside the lock, like the skiplist (which may discard it).
            let fresh = Arc::new(make());
            let node = self.nodes.lock().unwrap().entry(key.clone()).or_insert(fresh).clone();
            let (r, remove) = f(&node);
            if remove {
                MockEntry { map: self, key, node }.remove();
            }
            r
        }

        fn is_empty(&self) -> bool {
            self.nodes.lock().unwrap().is_empty()
        }
    }

    /// The mock stores: no reclamation domain (the `Arc`s free the nodes).
    #[derive(Debug)]
    pub(crate) struct MockStores;

    impl Stores for MockStores {
        type Guard = ();
        type Heads = MockMap<u64, Head>;
        type Nodes = MockMap<NodeIx, RefNode>;

        fn create() -> (Self, Self::Heads, Self::Nodes) {
            (MockStores, MockMap::new(), MockMap::new())
        }

        fn pin(&self) {}

        fn reclaim(&self, _: u64) {}

        fn forget_local(&self) {}
    }
}

/// The engine's own code on the mock stores, sequentially (the Miri tier
/// runs this with strict provenance; the models run it concurrently).
#[cfg(all(test, not(any(dref_loom, dref_shuttle))))]
mod tests {
    use std::sync::Arc;

    use super::mock::MockStores;
    use crate::api::{CleanupOutcome, FsConfig, FsShared, RunMode};
    use crate::domain::generic_ref::GenericRef;
    use crate::domain::kind::Action;
    use crate::extent_tree::MemExtentTree;
    use crate::lockfree::root::Engine;
    use crate::rsv::handle::TransHandle;

    #[test]
    fn engine_runs_on_the_mock_stores() {
        let refs = Engine::<MockStores>::with_fs(Arc::new(FsShared::new(FsConfig::default())));
        let tree = MemExtentTree::new();
        let mut h = TransHandle::new();
        let r = |action, ino| GenericRef::new(action, 1 << 20, 4096, 0, 5).data(5, ino, 0, 0, false);
        refs.add_data_ref(&mut h, &r(Action::AddExtent, 257), 4096).unwrap();
        refs.add_data_ref(&mut h, &r(Action::Add, 258), 0).unwrap();
        assert_eq!(refs.lookup_extent_info(&tree, 1 << 20).unwrap().unwrap().refs, 2);
        refs.run(&tree, RunMode::All).unwrap();
        assert_eq!(tree.lookup(1 << 20).unwrap().refs, 2);
        assert_eq!(refs.counters().num_heads, 0);
        // A born, empty head: cleanup deletes it.
        refs.add_data_ref(&mut h, &r(Action::Add, 259), 0).unwrap();
        refs.add_data_ref(&mut h, &r(Action::Drop, 259), 0).unwrap();
        assert!(matches!(refs.check_ref_cleanup(1 << 20), CleanupOutcome::Deleted { .. }));
        // Destroy drops what is queued without running it.
        refs.add_data_ref(&mut h, &r(Action::Drop, 258), 0).unwrap();
        let d = refs.destroy(&tree);
        assert_eq!((d.heads, d.nodes), (1, 1));
        assert_eq!(tree.lookup(1 << 20).unwrap().refs, 2);
        assert!(refs.snapshot().is_empty());
    }
}
