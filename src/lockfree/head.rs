//! A lock-free head: atomic fields, the state word and a nested skiplist of
//! ref nodes with signed atomic counts.
//!
//! # Implementation details
//!
//! A node is `(NodeKey → count: AtomicI64)`: positive = that many ADDs,
//! negative = DROPs, zero = no node. Every add call is `fetch_add(±1)`
//! (spec §3.7 with ref_mod 1: "decrement, never flip"), so an action flip
//! always passes through zero, and the old value of the RMW tells exactly
//! what happened (see [`Transition`]). Nodes are never unlinked from a live
//! head; a zero node is "absent" and is freed with the head.
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
use crossbeam_epoch::{Collector, Guard};
use crossbeam_skiplist::base::SkipList;

use super::count::{self, Transition};
use super::state::HeadState;
use crate::api::{HeadSnapshot, NodeSnapshot};
use crate::domain::extent_op::ExtentOp;
use crate::domain::key::NodeKey;
use crate::domain::kind::Action;
use crate::sync::{AtomicBool, AtomicI64, AtomicU64, Ordering};

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
    pub refs: SkipList<NodeKey, RefNode>,
}

impl Head {
    pub(crate) fn new(
        collector: &Collector,
        bytenr: u64,
        num_bytes: u64,
        is_data: bool,
        is_system: bool,
        reserved: u64,
    ) -> Self {
        Head {
            bytenr,
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
            refs: SkipList::new(collector.clone()),
        }
    }

    /// Apply one signed change to the node `key` (insert or merge, §3.7).
    pub(crate) fn change_node(&self, key: NodeKey, delta: i64, level: u8, guard: &Guard) -> Transition {
        let old = match self.refs.get(&key, guard) {
            Some(e) => count::change(&e.value().count, delta),
            None => {
                let e = self.refs.get_or_insert_with(key, || RefNode { count: AtomicI64::new(0), level }, guard);
                let old = count::change(&e.value().count, delta);
                e.release(guard);
                old
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
    pub(crate) fn has_refs(&self, guard: &Guard) -> bool {
        let mut e = self.refs.front(guard);
        while let Some(n) = e {
            if n.value().count.load(Ordering::Acquire) != 0 {
                return true;
            }
            e = n.next();
        }
        false
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

    pub(crate) fn snapshot(&self, guard: &Guard) -> HeadSnapshot {
        let mut nodes = Vec::new();
        let mut e = self.refs.front(guard);
        while let Some(n) = e {
            let c = n.value().count.load(Ordering::Acquire);
            if c != 0 {
                nodes.push(NodeSnapshot {
                    key: *n.key(),
                    action: if c > 0 { Action::Add } else { Action::Drop },
                    ref_mod: c.unsigned_abs(),
                    level: n.value().level,
                });
            }
            e = n.next();
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
