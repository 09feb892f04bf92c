//! A head of the locked port: the per-head lock (L2) over its ref tree and
//! add list, and the run token (L3).

#![forbid(unsafe_code)]

use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use parking_lot::Mutex;

use super::root::Root;
use crate::api::{HeadSnapshot, HeadUpdate, NodeSnapshot};
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

/// Everything a head's lock protects (semantics.md §2.4, L2). The fields are
/// private: the rest of the port changes them only through the transitions
/// below, each taking `&mut self`, i.e. with the head lock held.
#[derive(Debug, Default)]
pub(crate) struct HeadInner {
    num_bytes: u64,
    ref_mod: i64,
    total_ref_mod: i64,
    owning_root: u64,
    must_insert_reserved: bool,
    extent_op: Option<ExtentOp>,
    refs: BTreeMap<NodeKey, Node>,
    add_list: VecDeque<(NodeKey, u64)>,
    next_gen: u64,
}

/// What inserting one ref did to the head's tree (semantics.md §4.7).
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
    /// `init_delayed_ref_head` (semantics.md §4.4): the state of a new head from the
    /// first update of its bytenr.
    fn from_update(upd: &HeadUpdate) -> Self {
        HeadInner {
            num_bytes: upd.num_bytes,
            ref_mod: upd.count_mod,
            total_ref_mod: upd.count_mod,
            owning_root: upd.owning_root,
            must_insert_reserved: upd.must_insert_reserved,
            extent_op: upd.extent_op,
            ..HeadInner::default()
        }
    }

    /// The extent's size.
    pub fn num_bytes(&self) -> u64 {
        self.num_bytes
    }

    /// Net count of the refs still queued (ADD > 0, DROP < 0).
    pub fn ref_mod(&self) -> i64 {
        self.ref_mod
    }

    /// Net count of every ref ever queued on this head (decides the pending
    /// csum accounting of data heads).
    pub fn total_ref_mod(&self) -> i64 {
        self.total_ref_mod
    }

    /// The root that owns the extent (0 = not known yet).
    pub fn owning_root(&self) -> u64 {
        self.owning_root
    }

    /// The extent is a reserved allocation not yet inserted.
    pub fn must_insert_reserved(&self) -> bool {
        self.must_insert_reserved
    }

    /// The queued extent op, if any.
    pub fn extent_op(&self) -> Option<ExtentOp> {
        self.extent_op
    }

    /// Some ref is still queued.
    pub fn has_refs(&self) -> bool {
        !self.refs.is_empty()
    }

    /// `update_existing_head_ref` (semantics.md §4.6 steps 2-6) on a head of the
    /// same kind (step 1 is the caller's). Returns `total_ref_mod` as it was
    /// before, for the caller's pending csum accounting.
    pub fn update_existing(&mut self, upd: &HeadUpdate) -> i64 {
        if self.owning_root == 0 {
            self.owning_root = upd.owning_root;
        }
        if upd.must_insert_reserved {
            self.must_insert_reserved = true;
            self.owning_root = upd.owning_root;
            self.num_bytes = upd.num_bytes;
        }
        if let Some(op) = &upd.extent_op {
            self.extent_op = Some(ExtentOp::merged(self.extent_op.as_ref(), op));
        }
        let old = self.total_ref_mod;
        self.ref_mod += upd.count_mod;
        self.total_ref_mod += upd.count_mod;
        old
    }

    fn link_add(&mut self, key: NodeKey) -> u64 {
        self.next_gen += 1;
        let g = self.next_gen;
        self.add_list.push_back((key, g));
        g
    }

    /// Insert or merge `ref_mod` refs of `action` for `key` (semantics.md §4.7).
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
                    // Flip: the add list follows the action (§3.3).
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
    fn remove_node(&mut self, key: &NodeKey) -> Option<Node> {
        self.refs.remove(key)
    }

    /// Take the selected `node` at `key` off the head to run it (semantics.md
    /// §6.8): unlink it and drop its count from `ref_mod`.
    pub fn take_ref(&mut self, key: &NodeKey, node: &Node) {
        self.remove_node(key);
        self.ref_mod -= node.signed();
    }

    /// Take `must_insert_reserved` (it goes with the first ref run, or with
    /// the deleted head).
    pub fn take_must_insert_reserved(&mut self) -> bool {
        std::mem::take(&mut self.must_insert_reserved)
    }

    /// Take the extent op (it goes with the ref run).
    pub fn take_extent_op(&mut self) -> Option<ExtentOp> {
        self.extent_op.take()
    }

    /// `cleanup_extent_op` (semantics.md §6.11 step 1): take the extent op; it is
    /// returned to be run unless the extent was never inserted, in which case
    /// it is discarded.
    pub fn cleanup_extent_op(&mut self) -> Option<ExtentOp> {
        let op = self.extent_op.take()?;
        if self.must_insert_reserved { None } else { Some(op) }
    }

    /// `btrfs_free_delayed_extent_op` of the head's op: discard it unrun.
    pub fn discard_extent_op(&mut self) {
        self.extent_op = None;
    }

    /// Put a taken ref, its `must_insert_reserved` and its extent op back
    /// after a backend error (the undo of [`Self::take_ref`],
    /// [`Self::take_must_insert_reserved`] and [`Self::take_extent_op`]).
    /// Returns what re-inserting the node did, for the caller's accounting.
    pub fn restore_ref(&mut self, key: NodeKey, node: Node, mir: bool, op: Option<ExtentOp>) -> InsertEffect {
        let effect = self.insert_ref(key, node.action, node.ref_mod, node.level);
        self.ref_mod += node.signed();
        if mir {
            self.must_insert_reserved = true;
        }
        if let Some(op) = op {
            self.restore_extent_op(op);
        }
        effect
    }

    /// Put back an op a failed run took; an op queued meanwhile merges over it.
    pub fn restore_extent_op(&mut self, op: ExtentOp) {
        self.extent_op = Some(match self.extent_op.as_ref() {
            None => op,
            Some(newer) => ExtentOp::merged(Some(&op), newer),
        });
    }

    /// Drop every queued ref unrun (`btrfs_destroy_delayed_refs`): the tree
    /// and add list are emptied and `ref_mod` zeroed. Returns the number of
    /// nodes dropped.
    pub fn drop_all_refs(&mut self) -> u64 {
        let nodes = self.refs.len() as u64;
        self.refs.clear();
        self.add_list.clear();
        self.ref_mod = 0;
        nodes
    }

    /// `select_delayed_ref` (semantics.md §3.4): the oldest ADD, else the leftmost node.
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

    /// `btrfs_merge_delayed_refs` (semantics.md §5.1) for a metadata head with the
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

/// A head (semantics.md §2.4). `processing` and `linked` are only written under the
/// root lock (L1), like the kernel's; the rest lives under the head lock.
/// Their setters take a `&Root` as witness that L1 is held.
#[derive(Debug)]
pub(crate) struct Head {
    pub bytenr: u64,
    pub is_data: bool,
    pub is_system: bool,
    pub reserved_bytes: u64,
    /// L1-protected: selected by a runner.
    processing: AtomicBool,
    /// L1-protected: still in the index.
    linked: AtomicBool,
    /// L2.
    pub inner: Mutex<HeadInner>,
    /// L3: the run token.
    pub token: Arc<Mutex<()>>,
}

impl Head {
    /// `init_delayed_ref_head` (semantics.md §4.4): a new head, not yet linked, for
    /// the first update of its bytenr.
    pub fn new(upd: &HeadUpdate) -> Self {
        Head {
            bytenr: upd.bytenr,
            is_data: upd.is_data,
            is_system: upd.is_system,
            reserved_bytes: upd.reserved,
            processing: AtomicBool::new(false),
            linked: AtomicBool::new(false),
            inner: Mutex::new(HeadInner::from_update(upd)),
            token: Arc::new(Mutex::new(())),
        }
    }

    /// Selected by a runner (root lock held by the caller).
    pub fn processing(&self) -> bool {
        // Relaxed: only written under the root lock, which every reader holds.
        self.processing.load(Ordering::Relaxed)
    }

    /// Selection (`btrfs_select_ref_head`), root lock held.
    pub fn mark_processing(&self, _l1: &Root) {
        self.processing.store(true, Ordering::Relaxed);
    }

    /// Unselection (`unselect_delayed_ref_head`, `btrfs_check_ref_cleanup`),
    /// root lock held.
    pub fn clear_processing(&self, _l1: &Root) {
        self.processing.store(false, Ordering::Relaxed);
    }

    /// Still in the index, root lock held.
    pub fn is_linked(&self, _l1: &Root) -> bool {
        // Relaxed: only written under the root lock, held here.
        self.linked.load(Ordering::Relaxed)
    }

    /// Linked into the index (`add_delayed_ref_head`), root lock held.
    pub fn link(&self, _l1: &Root) {
        self.linked.store(true, Ordering::Relaxed);
    }

    /// Unlinked from the index (`btrfs_delete_ref_head`), root lock held.
    pub fn unlink(&self, _l1: &Root) {
        self.linked.store(false, Ordering::Relaxed);
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
