//! A lock-free head (atomic fields and the state word) and its ref nodes
//! with signed atomic counts.
//!
//! # Implementation details
//!
//! The nodes of every head live in one root-level skiplist, the [`NodeMap`],
//! keyed by [`NodeIx`] = (bytenr, head generation, node key): a head's nodes
//! are one contiguous range, walked in the order of spec §2.1. A head carries
//! no list of its own (a crossbeam `SkipList` is ~512 bytes inline before its
//! first entry, which made each head cost ~640 bytes inline). The generation is
//! unique per head object, so a head created after its bytenr's previous head
//! was retired never meets that head's leftover (zero) nodes, which the
//! retiring runner unlinks after closing.
//!
//! A node is `(NodeIx → count: AtomicI64)`: positive = that many ADDs,
//! negative = DROPs, zero = no node. Every add call is `fetch_add(±1)`
//! (spec §3.7 with ref_mod 1: "decrement, never flip"), so an action flip
//! always passes through zero, and the old value of the RMW tells exactly
//! what happened (see [`Transition`]). A zero node is "absent"; the claiming
//! runner kills and unlinks zero nodes as it passes them (module `count`),
//! and unlinks whatever is left when it retires the head.
//!
//! # Synchronization
//!
//! Node counts: adders `fetch_add(AcqRel)`; the runner takes a count with
//! `compare_exchange(v, 0, AcqRel)` from the value it read: an adder's
//! concurrent change makes the CAS fail and the runner re-reads (take vs merge
//! never loses or doubles a ref). Head counts (`ref_mod`, `total_ref_mod`) are
//! single RMWs; `pending_csums` transitions are decided from the old value of
//! `total_ref_mod`'s `fetch_add`, so each crossing of zero is seen by exactly
//! one thread.

#![forbid(unsafe_code)]

use arc_swap::ArcSwapOption;
use std::cell::Cell;
use std::ops::Bound;

use crossbeam_epoch::Guard;
use crossbeam_skiplist::base::{Entry, SkipList};

use super::count::{self, Transition};
use super::state::HeadState;
use crate::api::{HeadSnapshot, NodeSnapshot};
use crate::domain::extent_op::ExtentOp;
use crate::domain::key::NodeKey;
use crate::domain::kind::Action;
use crate::sync::{AtomicBool, AtomicI64, AtomicU64, Ordering};

/// Where a node lives in the [`NodeMap`]: its head's bytenr and generation,
/// then its key (field order = sort order).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) struct NodeIx {
    pub bytenr: u64,
    pub generation: u64,
    pub key: NodeKey,
}

/// The smallest node key of spec §2.1's order (lowest type, zero fields and seq).
const MIN_KEY: NodeKey = NodeKey { key: crate::domain::key::RefKey::TreeBlock { root: 0 }, seq: 0 };

/// Every head's ref nodes, in one skiplist owned by the root.
pub(crate) type NodeMap = SkipList<NodeIx, RefNode>;

/// An entry of the [`NodeMap`].
pub(crate) type NodeEntry<'g> = Entry<'g, 'g, NodeIx, RefNode>;

/// The nodes of one head, in key order (zero nodes included).
pub(crate) struct HeadNodes<'g> {
    cur: Option<NodeEntry<'g>>,
    bytenr: u64,
    generation: u64,
}

impl<'g> Iterator for HeadNodes<'g> {
    type Item = NodeEntry<'g>;

    fn next(&mut self) -> Option<NodeEntry<'g>> {
        let cur = self.cur.take()?;
        let (bytenr, generation) = (self.bytenr, self.generation);
        self.cur = cur.next().filter(|n| n.key().bytenr == bytenr && n.key().generation == generation);
        Some(cur)
    }
}

/// A head generation unique in the process, with no shared write per head:
/// each thread takes blocks of ids from a global counter.
fn next_gen() -> u64 {
    const BLOCK: u64 = 1 << 16;
    static NEXT_BLOCK: AtomicU64 = AtomicU64::new(0);
    thread_local! {
        static IDS: Cell<(u64, u64)> = const { Cell::new((0, 0)) };
    }
    IDS.with(|ids| {
        let (mut next, mut end) = ids.get();
        if next == end {
            // Relaxed: only uniqueness matters, which the RMW gives.
            next = NEXT_BLOCK.fetch_add(BLOCK, Ordering::Relaxed);
            end = next + BLOCK;
        }
        ids.set((next + 1, end));
        next
    })
}

/// One ref node's mutable part.
#[derive(Debug)]
pub(crate) struct RefNode {
    pub count: AtomicI64,
    pub level: u8,
}

/// A head (spec §1.5), stored inline in the index's skiplist node.
#[derive(Debug)]
pub(crate) struct Head {
    pub bytenr: u64,
    /// This head object's generation (its nodes' range in the [`NodeMap`]).
    pub generation: u64,
    pub is_data: bool,
    pub is_system: bool,
    pub reserved_bytes: u64,
    pub state: HeadState,
    pub num_bytes: AtomicU64,
    pub ref_mod: AtomicI64,
    pub total_ref_mod: AtomicI64,
    pub owning_root: AtomicU64,
    pub must_insert_reserved: AtomicBool,
    pub extent_op: ArcSwapOption<ExtentOp>,
    /// Bumped whenever a node becomes an ADD (0 → positive): the runner's
    /// drop phase restarts its add phase when it moves (adds before drops).
    pub add_epoch: AtomicU64,
    /// Reader seqlock (spec §3.17): odd while a ref taken from this head is
    /// not yet applied to the backend. Only the claiming runner writes it.
    pub run_seq: AtomicU64,
}

impl Head {
    /// A fresh head. Takes a generation number: when the index discards
    /// this value (a concurrent insert won), the number is simply skipped.
    pub(crate) fn new(bytenr: u64, num_bytes: u64, is_data: bool, is_system: bool, reserved: u64) -> Self {
        Head {
            bytenr,
            generation: next_gen(),
            is_data,
            is_system,
            reserved_bytes: reserved,
            state: HeadState::new(),
            num_bytes: AtomicU64::new(num_bytes),
            ref_mod: AtomicI64::new(0),
            total_ref_mod: AtomicI64::new(0),
            owning_root: AtomicU64::new(0),
            must_insert_reserved: AtomicBool::new(false),
            extent_op: ArcSwapOption::empty(),
            add_epoch: AtomicU64::new(0),
            run_seq: AtomicU64::new(0),
        }
    }

    fn ix(&self, key: NodeKey) -> NodeIx {
        NodeIx { bytenr: self.bytenr, generation: self.generation, key }
    }

    /// This head's nodes in `map`, in key order.
    pub(crate) fn nodes<'g>(&self, map: &'g NodeMap, guard: &'g Guard) -> HeadNodes<'g> {
        let cur = map
            .lower_bound(Bound::Included(&self.ix(MIN_KEY)), guard)
            .filter(|n| n.key().bytenr == self.bytenr && n.key().generation == self.generation);
        HeadNodes { cur, bytenr: self.bytenr, generation: self.generation }
    }

    /// Apply one signed change to the node `key` (insert or merge, §3.7).
    /// A node killed meanwhile is helped out of the map and the change
    /// retried into a fresh node (module `count`). Adders, and the runner
    /// when it puts counts back or folds a merge, all come through here.
    pub(crate) fn change_node(&self, map: &NodeMap, key: NodeKey, delta: i64, level: u8, guard: &Guard) -> Transition {
        let ix = self.ix(key);
        let old = loop {
            let res = match map.get(&ix, guard) {
                // A zero node is absent: one left with another level (a tree
                // block re-allocated at a new level, §3.6 step 3) must not
                // lend the new ref its old level. Kill it and start fresh.
                Some(e) if e.value().level != level && count::try_kill(&e.value().count) => {
                    e.remove();
                    continue;
                }
                Some(e) => count::change(&e.value().count, delta).map_err(|_| e.remove()),
                None => {
                    let e = map.get_or_insert_with(ix, || RefNode { count: AtomicI64::new(0), level }, guard);
                    let res = count::change(&e.value().count, delta).map_err(|_| e.remove(guard));
                    e.release(guard);
                    res
                }
            };
            match res {
                Ok(old) => break old,
                Err(_) => crate::sync::spin_hint(),
            }
        };
        let new = old + delta;
        if old <= 0 && new > 0 {
            // Release: pairs with the runner's Acquire load in its drop phase.
            self.add_epoch.fetch_add(1, Ordering::Release);
        }
        Transition::of(old, new)
    }

    /// Whether any node is non-zero.
    pub(crate) fn has_refs(&self, map: &NodeMap, guard: &Guard) -> bool {
        self.nodes(map, guard).any(|n| count::peek(&n.value().count) != 0)
    }

    /// Unlink every node of a closed head (all zero: the close CAS proved no
    /// adder entered after the emptiness check). Their memory goes through
    /// the epoch like the head's.
    /// Returns how many live (not killed) nodes it unlinked.
    pub(crate) fn unlink_nodes(&self, map: &NodeMap, guard: &Guard) -> usize {
        debug_assert!(self.state.is_closed());
        self.nodes(map, guard)
            // Relaxed: the head is closed, the count no longer changes; the
            // load only keeps killed nodes out of the retired tally.
            .filter(|n| !count::is_dead(n.value().count.load(Ordering::Relaxed)) && n.remove())
            .count()
    }

    /// Merge an update into the extent op (spec §3.6 step 4).
    pub(crate) fn merge_op(&self, upd: &ExtentOp) {
        self.extent_op.rcu(|cur| Some(std::sync::Arc::new(ExtentOp::merged(cur.as_deref(), upd))));
    }

    /// Put an op taken by a failed run back, merging a newer one over it.
    pub(crate) fn restore_op(&self, op: ExtentOp) {
        self.extent_op.rcu(|cur| {
            Some(std::sync::Arc::new(match cur.as_deref() {
                None => op,
                Some(newer) => ExtentOp::merged(Some(&op), newer),
            }))
        });
    }

    pub(crate) fn snapshot(&self, map: &NodeMap, guard: &Guard) -> HeadSnapshot {
        let mut nodes = Vec::new();
        for n in self.nodes(map, guard) {
            let c = count::peek(&n.value().count);
            if c != 0 {
                nodes.push(NodeSnapshot {
                    key: n.key().key,
                    action: if c > 0 { Action::Add } else { Action::Drop },
                    ref_mod: c.unsigned_abs(),
                    level: n.value().level,
                });
            }
        }
        HeadSnapshot {
            bytenr: self.bytenr,
            num_bytes: self.num_bytes.load(Ordering::Acquire),
            is_data: self.is_data,
            is_system: self.is_system,
            ref_mod: self.ref_mod.load(Ordering::Acquire),
            total_ref_mod: self.total_ref_mod.load(Ordering::Acquire),
            must_insert_reserved: self.must_insert_reserved.load(Ordering::Acquire),
            processing: self.state.load() & super::state::PROCESSING != 0,
            owning_root: self.owning_root.load(Ordering::Acquire),
            reserved_bytes: self.reserved_bytes,
            extent_op: self.extent_op.load().as_deref().copied(),
            nodes,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The inline sizes behind docs/benchmarks.md's bytes-per-head and
    /// bytes-per-ref figures (a skiplist node adds 8 bytes of refcount and
    /// height plus 8 per tower level, 2 levels on average).
    #[test]
    fn inline_sizes() {
        let (head, ix, node) = (size_of::<Head>(), size_of::<NodeIx>(), size_of::<RefNode>());
        eprintln!("Head {head} B, NodeIx {ix} B, RefNode {node} B");
        assert!(head <= 112, "Head grew to {head} bytes");
        assert!(ix + node <= 72, "node key + value grew to {} bytes", ix + node);
    }
}
