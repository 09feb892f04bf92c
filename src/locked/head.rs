//! A head of the locked port: the per-head lock (L2) over its ref tree and
//! add list, and the run token (L3).

#![forbid(unsafe_code)]

use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use parking_lot::Mutex;

use crate::api::{HeadSnapshot, NodeSnapshot};
use crate::domain::extent_op::ExtentOp;
use crate::domain::key::{NodeKey, comp_refs};
use crate::domain::kind::Action;
use crate::domain::merge::merge_run;

/// A queued node: action and count of one `(key, seq)`.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Node {
    pub action: Action,
    pub ref_mod: u64,
    pub level: u8,
    /// Position in the add list: non-zero iff the node is linked there. The
    /// list is a FIFO of `(key, gen)` pairs; entries whose node is gone or
    /// carries another generation are stale and skipped (lazy unlink, O(1)).
    pub add_gen: u64,
}

/// Everything a head's lock protects (spec §1.5, L2).
#[derive(Debug, Default)]
pub(crate) struct HeadInner {
    pub num_bytes: u64,
    pub ref_mod: i64,
    pub total_ref_mod: i64,
    pub owning_root: u64,
    pub must_insert_reserved: bool,
    pub extent_op: Option<ExtentOp>,
    pub refs: BTreeMap<NodeKey, Node>,
    pub add_list: VecDeque<(NodeKey, u64)>,
    pub next_gen: u64,
}

/// What inserting one ref did to the head's tree (spec §3.7).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum InsertEffect {
    /// A new node was linked (`num_entries++`, `delayed_ref_updates++`).
    Inserted,
    /// Merged into an existing node that survives.
    Merged,
    /// Merged and the node reached zero and was dropped (`num_entries--`, release `C(1)`).
    Dropped,
}

impl Node {
    /// Signed count: ADD > 0, DROP < 0.
    pub fn signed(&self) -> i64 {
        if self.action == Action::Add { self.ref_mod as i64 } else { -(self.ref_mod as i64) }
    }
}

impl HeadInner {
    fn link_add(&mut self, key: NodeKey) -> u64 {
        self.next_gen += 1;
        let g = self.next_gen;
        self.add_list.push_back((key, g));
        g
    }

    /// Insert or merge `ref_mod` refs of `action` for `key` (spec §3.7).
    pub fn insert_ref(&mut self, key: NodeKey, action: Action, ref_mod: u64, level: u8) -> InsertEffect {
        match self.refs.get(&key).copied() {
            None => {
                let add_gen = if action == Action::Add { self.link_add(key) } else { 0 };
                self.refs.insert(key, Node { action, ref_mod, level, add_gen });
                InsertEffect::Inserted
            }
            Some(mut e) => {
                if e.action == action {
                    e.ref_mod += ref_mod;
                } else if e.ref_mod < ref_mod {
                    // Flip: the add list follows the action (§2.3).
                    e.action = action;
                    e.ref_mod = ref_mod - e.ref_mod;
                    e.add_gen = if action == Action::Add { self.link_add(key) } else { 0 };
                } else {
                    e.ref_mod -= ref_mod;
                }
                if e.ref_mod == 0 {
                    self.refs.remove(&key);
                    InsertEffect::Dropped
                } else {
                    self.refs.insert(key, e);
                    InsertEffect::Merged
                }
            }
        }
    }

    /// Remove a node from the tree (and, lazily, from the add list).
    pub fn remove_node(&mut self, key: &NodeKey) -> Option<Node> {
        self.refs.remove(key)
    }

    /// `select_delayed_ref` (spec §2.4): the oldest ADD, else the leftmost node.
    pub fn select_ref(&mut self) -> Option<(NodeKey, Node)> {
        while let Some(&(key, g)) = self.add_list.front() {
            match self.refs.get(&key) {
                Some(n) if n.add_gen == g => return Some((key, *n)),
                _ => {
                    self.add_list.pop_front();
                }
            }
        }
        self.refs.iter().next().map(|(k, n)| (*k, *n))
    }

    /// `btrfs_merge_delayed_refs` (spec §3.10) for a metadata head with the
    /// lowest blocker seq `seq` (0 = none): every run of nodes with one
    /// identity and a seq older than the blocker collapses to at most one.
    /// Returns the number of nodes dropped.
    pub fn merge_pass(&mut self, seq: u64) -> u64 {
        let eligible: Vec<NodeKey> = self.refs.keys().copied().filter(|k| seq == 0 || k.seq < seq).collect();
        let mut dropped = 0;
        let mut i = 0;
        while i < eligible.len() {
            let mut j = i + 1;
            while j < eligible.len() && comp_refs(&eligible[i], &eligible[j], false) == std::cmp::Ordering::Equal {
                j += 1;
            }
            if j - i >= 2 {
                let group = &eligible[i..j];
                let signed: Vec<i64> = group.iter().map(|k| self.refs[k].signed()).collect();
                let survivor = merge_run(&signed);
                for (idx, k) in group.iter().enumerate() {
                    if survivor.map(|(s, _)| s) != Some(idx) {
                        self.refs.remove(k);
                        dropped += 1;
                    }
                }
                if let Some((s, net)) = survivor {
                    let key = group[s];
                    let action = if net > 0 { Action::Add } else { Action::Drop };
                    let was_add = self.refs[&key].action == Action::Add;
                    let add_gen = if action == Action::Add && !was_add {
                        self.link_add(key)
                    } else if action == Action::Add {
                        self.refs[&key].add_gen
                    } else {
                        0
                    };
                    let n = self.refs.get_mut(&key).expect("survivor is queued");
                    n.action = action;
                    n.ref_mod = net.unsigned_abs();
                    n.add_gen = add_gen;
                }
            }
            i = j;
        }
        dropped
    }
}

/// A head (spec §1.5). `processing` and `linked` are only written under the
/// root lock (L1), like the kernel's; the rest lives under the head lock.
#[derive(Debug)]
pub(crate) struct Head {
    pub bytenr: u64,
    pub is_data: bool,
    pub is_system: bool,
    pub reserved_bytes: u64,
    /// L1-protected: selected by a runner.
    pub processing: AtomicBool,
    /// L1-protected: still in the index.
    pub linked: AtomicBool,
    /// L2.
    pub inner: Mutex<HeadInner>,
    /// L3: the run token.
    pub token: Arc<Mutex<()>>,
}

impl Head {
    pub fn new(bytenr: u64, is_data: bool, is_system: bool, reserved_bytes: u64, inner: HeadInner) -> Self {
        Head {
            bytenr,
            is_data,
            is_system,
            reserved_bytes,
            processing: AtomicBool::new(false),
            linked: AtomicBool::new(false),
            inner: Mutex::new(inner),
            token: Arc::new(Mutex::new(())),
        }
    }

    pub fn processing(&self) -> bool {
        // Relaxed: only written under the root lock, which every reader holds.
        self.processing.load(Ordering::Relaxed)
    }

    pub fn snapshot(&self) -> HeadSnapshot {
        let i = self.inner.lock();
        HeadSnapshot {
            bytenr: self.bytenr,
            num_bytes: i.num_bytes,
            is_data: self.is_data,
            is_system: self.is_system,
            ref_mod: i.ref_mod,
            total_ref_mod: i.total_ref_mod,
            must_insert_reserved: i.must_insert_reserved,
            processing: self.processing(),
            owning_root: i.owning_root,
            reserved_bytes: self.reserved_bytes,
            extent_op: i.extent_op,
            nodes: i
                .refs
                .iter()
                .map(|(k, n)| NodeSnapshot { key: *k, action: n.action, ref_mod: n.ref_mod, level: n.level })
                .collect(),
        }
    }
}
