//! A lock-free head (atomic fields and the state word) and its ref nodes
//! with signed atomic counts.
//!
//! # Implementation details
//!
//! A head keeps its first four keys' nodes inside itself (module `inline`,
//! docs/protocols.md §j): adding to, running and cancelling them touches
//! no shared index. Only when four live keys are there does a further key
//! go to the root-level skiplist of nodes, the [`NodeMap`], keyed by
//! [`NodeIx`] = (head generation and range tag, node key); from then on
//! the head is *spilled* and its walks ([`HeadNodes`]) merge the inline
//! nodes into its map range, in the order of semantics.md §3.1. Just
//! before that range lies the head's *late-ADD marker* range (see below).
//! The generation is unique per head object, so a head created after its
//! bytenr's previous head was retired never meets that head's leftover
//! (zero) map nodes, which the retiring runner unlinks after closing.
//!
//! A node's count is signed: positive = that many ADDs, negative = DROPs,
//! zero = no node. Every add call changes it by ±1 (semantics.md §4.7 with
//! ref_mod 1: "decrement, never flip"), so an action flip always passes
//! through zero, and the old value of the RMW tells exactly what happened
//! (see [`Transition`]). A zero map node is killed and unlinked by the
//! change that brought it to zero, or by the runner that passes it (module
//! `count`); a zero inline node keeps its slot until its key comes back or
//! an inserter needs the slot.
//!
//! # Late-ADD markers (adds before drops, semantics.md §3.3, §11.18)
//!
//! The kernel keeps a list of a head's ADD nodes so the runner finds the
//! next ADD in O(1). Here the claiming runner first walks the whole node
//! range taking ADDs (its add scan), then walks it again taking DROPs. An
//! ADD created after the claim is the only kind the add scan can miss; its
//! adder leaves a marker (a map key's; an inline node needs none, the
//! runner looks at every inline node when `add_epoch` moves): an entry at the same key in the marker range whose
//! count is the number of such notes, and then bumps `add_epoch`. Before
//! each drop the runner compares `add_epoch` with the value it last drained
//! at (one load) and, when it moved, runs the ADDs the markers name, each
//! found by key. A late ADD thus costs O(log n), never a rescan, and an ADD
//! created while no runner holds the head costs nothing extra (the next
//! claimant's add scan finds it). Markers use the same count protocol as
//! nodes (module `count`): the runner takes a marker's count, runs the
//! node, then kills the marker (0 → DEAD) and unlinks it; a marker noted
//! again in between survives the kill and is visited again. Whether an
//! adder notes is decided by `HeadState::exit_noting`.
//!
//! # Synchronization
//!
//! Map node counts: adders `fetch_add(AcqRel)` (inline counts: a CAS at the
//! slot's generation, module `inline`); the runner takes a count with
//! `compare_exchange(v, 0, AcqRel)` from the value it read: an adder's
//! concurrent change makes the CAS fail and the runner re-reads (take vs merge
//! never loses or doubles a ref). Head counts (`ref_mod`, `total_ref_mod`) are
//! single RMWs; `pending_csums` transitions are decided from the old value of
//! `total_ref_mod`'s `fetch_add`, so each crossing of zero is seen by exactly
//! one thread.

#![forbid(unsafe_code)]

use std::cell::Cell;

use super::count::{self, Transition};
use super::index::Indexed;
use super::inline::{InlineNodes, InlineRef, InlineSet, Placed};
use super::op_slot::OpSlot;
use super::state::HeadState;
use super::store::{MapEntry, OrderedMap};
use crate::api::{HeadSnapshot, NodeSnapshot};
use crate::domain::extent_op::ExtentOp;
use crate::domain::key::{NodeKey, RefKey};
use crate::domain::kind::Action;
use crate::sync::{AtomicBool, AtomicI64, AtomicU64, Ordering};

/// The node map of the storage seam (module `store`): every head's ref
/// nodes and late-ADD markers.
pub(crate) trait NodeMap: OrderedMap<NodeIx, RefNode> {}

impl<M: OrderedMap<NodeIx, RefNode>> NodeMap for M {}

/// An entry of a [`NodeMap`].
pub(crate) type NodeEntry<'g, N> = <N as OrderedMap<NodeIx, RefNode>>::Entry<'g>;

/// Where a node lives in the [`NodeMap`]: its `slot` = head generation
/// `<< 1 |` range tag ([`MARK_TAG`] or [`NODE_TAG`]), then its key (field
/// order = sort order). The generation is unique per head object, so it
/// alone names the head; the bytenr is not repeated in every node.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) struct NodeIx {
    pub slot: u64,
    pub key: NodeKey,
}

/// The range tag of late-ADD markers (sorted before the head's nodes).
const MARK_TAG: u64 = 0;
/// The range tag of ref nodes.
const NODE_TAG: u64 = 1;

/// The smallest node key of semantics.md §3.1's order (lowest type, zero fields and seq).
const MIN_KEY: NodeKey = NodeKey { key: crate::domain::key::RefKey::TreeBlock { root: 0 }, seq: 0 };

/// The entries of one head's range of the [`NodeMap`] in key order (zero
/// entries included): its spilled nodes, its markers, or both
/// (`slot_shift` 0 compares the exact slot, 1 compares the generation only).
pub(crate) struct MapRange<'g, N: NodeMap + 'g> {
    cur: Option<NodeEntry<'g, N>>,
    slot: u64,
    slot_shift: u32,
}

impl<'g, N: NodeMap + 'g> MapRange<'g, N> {
    fn owns(&self, n: &NodeEntry<'g, N>) -> bool {
        n.key().slot >> self.slot_shift == self.slot >> self.slot_shift
    }
}

impl<'g, N: NodeMap + 'g> Iterator for MapRange<'g, N> {
    type Item = NodeEntry<'g, N>;

    fn next(&mut self) -> Option<NodeEntry<'g, N>> {
        let cur = self.cur.take()?;
        self.cur = cur.next().filter(|n| self.owns(n));
        Some(cur)
    }
}

/// One node of a head: an inline one, or a spilled one in the [`NodeMap`].
pub(crate) enum HeadNode<'g, N: NodeMap + 'g> {
    Inline(InlineRef<'g>),
    Map(NodeEntry<'g, N>),
}

impl<'g, N: NodeMap + 'g> Clone for HeadNode<'g, N> {
    fn clone(&self) -> Self {
        match self {
            HeadNode::Inline(i) => HeadNode::Inline(*i),
            HeadNode::Map(e) => HeadNode::Map(e.clone()),
        }
    }
}

impl<'g, N: NodeMap + 'g> HeadNode<'g, N> {
    /// The node's key.
    pub(crate) fn key(&self) -> NodeKey {
        match self {
            HeadNode::Inline(i) => i.key(),
            HeadNode::Map(e) => e.key().key,
        }
    }

    /// The node's level (tree blocks).
    pub(crate) fn level(&self) -> u8 {
        match self {
            HeadNode::Inline(i) => i.level(),
            HeadNode::Map(e) => e.value().level,
        }
    }

    /// The count; 0 for a killed node.
    pub(crate) fn peek(&self) -> i64 {
        match self {
            HeadNode::Inline(i) => i.peek(),
            HeadNode::Map(e) => count::peek(&e.value().count),
        }
    }

    /// Take exactly `v`, the value just peeked (false: it changed).
    pub(crate) fn try_take(&self, v: i64) -> bool {
        match self {
            HeadNode::Inline(i) => i.try_take(v),
            HeadNode::Map(e) => count::try_take(&e.value().count, v),
        }
    }

    /// Take whatever is there.
    pub(crate) fn take_all(&self) -> i64 {
        match self {
            HeadNode::Inline(i) => i.take_all(),
            HeadNode::Map(e) => count::take_all(&e.value().count),
        }
    }

    /// Kill a spilled node that reads 0 and unlink it (module `count`);
    /// true if this call unlinked it (the reclamation tally counts those).
    pub(crate) fn kill_if_zero(&self) -> bool {
        match self {
            // A zero inline node stays: walks skip it, the next change of
            // its key reuses it, and an inserter that needs the slot
            // reclaims it (module `inline`).
            HeadNode::Inline(_) => false,
            // An adder that met the dead node may have unlinked it first.
            HeadNode::Map(e) => count::try_kill(&e.value().count) && e.remove(),
        }
    }
}

/// A head's nodes in key order (zero nodes included): the inline nodes
/// merged with the head's spilled range.
pub(crate) struct HeadNodes<'g, N: NodeMap + 'g> {
    inline: InlineNodes<'g>,
    map: Option<MapRange<'g, N>>,
    peeked: Option<NodeEntry<'g, N>>,
}

impl<'g, N: NodeMap + 'g> Iterator for HeadNodes<'g, N> {
    type Item = HeadNode<'g, N>;

    fn next(&mut self) -> Option<HeadNode<'g, N>> {
        if self.peeked.is_none() {
            self.peeked = self.map.as_mut().and_then(Iterator::next);
        }
        match (self.inline.peek_key(), &self.peeked) {
            (Some(k), Some(e)) if k > e.key().key => self.peeked.take().map(HeadNode::Map),
            (Some(_), _) => self.inline.next().map(HeadNode::Inline),
            (None, _) => self.peeked.take().map(HeadNode::Map),
        }
    }
}

/// A head generation unique in the process, with no shared write per head:
/// each thread takes blocks of ids from a global counter.
fn next_gen() -> u64 {
    const BLOCK: u64 = 1 << 16;
    // A std atomic even under the models: an id source, not a protocol
    // (and loom's atomics cannot live in a static).
    static NEXT_BLOCK: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    thread_local! {
        static IDS: Cell<(u64, u64)> = const { Cell::new((0, 0)) };
    }
    IDS.with(|ids| {
        let (mut next, mut end) = ids.get();
        if next == end {
            // Relaxed: only uniqueness matters, which the RMW gives.
            next = NEXT_BLOCK.fetch_add(BLOCK, std::sync::atomic::Ordering::Relaxed);
            end = next + BLOCK;
        }
        ids.set((next + 1, end));
        next
    })
}

/// Add `delta` to the entry at `ix`, inserting it if absent; returns the old
/// count. A dead entry is helped out of the map and the change retried into
/// a fresh one (module `count`). With `level`, a zero entry left with
/// another level is killed first: a tree block re-allocated at a new level
/// (§4.6 step 3) must not take its old level from a leftover node.
/// `likely_new` skips the plain lookup and goes straight to the insert's own
/// search (one search instead of two when the entry is usually absent; the
/// insert returns a refcounted entry, which costs two RMWs when present).
/// With `kill_at_zero`, a change that brings an entry to 0 kills and
/// unlinks it at once, so cancelled keys do not stay in the map until a
/// runner passes. Returns the old count and whether this call unlinked
/// an entry.
fn change_entry<N: NodeMap>(
    map: &N,
    ix: NodeIx,
    delta: i64,
    level: Option<u8>,
    likely_new: bool,
    kill_at_zero: bool,
    guard: &N::Guard,
) -> (i64, bool) {
    let mut unlinked = false;
    loop {
        let found = if likely_new { None } else { map.get(&ix, guard) };
        let res = match found {
            Some(e) if level.is_some_and(|l| e.value().level != l) && count::try_kill(&e.value().count) => {
                unlinked |= e.remove();
                continue;
            }
            Some(e) => match count::change(&e.value().count, delta) {
                Ok(old) => {
                    if kill_at_zero && old + delta == 0 && count::try_kill(&e.value().count) {
                        unlinked |= e.remove();
                    }
                    Ok(old)
                }
                Err(_) => {
                    e.remove();
                    Err(())
                }
            },
            None => {
                let level = level.unwrap_or(0);
                let make = || RefNode { count: AtomicI64::new(0), level };
                map.upsert(
                    ix,
                    make,
                    |n| match count::change(&n.count, delta) {
                        Ok(old) => (Ok(old), false),
                        Err(_) => (Err(()), true),
                    },
                    guard,
                )
            }
        };
        match res {
            Ok(old) => return (old, unlinked),
            Err(_) => crate::sync::spin_hint(),
        }
    }
}

/// One ref node's mutable part (markers use `count` only).
#[derive(Debug)]
pub(crate) struct RefNode {
    pub count: AtomicI64,
    pub level: u8,
}

/// A head (semantics.md §2.4), stored inline in the index's skiplist node.
///
/// Every field is private: each protocol's state changes only through the
/// method named after its transition (below), with its ordering argument
/// next to the atomic operation. Who may call what:
///
/// | state | adders (between `enter` and `exit`) | the claiming runner | readers |
/// |---|---|---|---|
/// | lifecycle word (`state`) | `exit`, `exit_noting_late_add` | `try_claim`, `unclaim`, `word` (close: `index::retire`) | `is_live`, `is_closed` |
/// | seqlock (`run_seq`) | — | `open_apply_window` (the only writer) | `read_seq` |
/// | counts (`ref_mod`, `total_ref_mod`) | `apply_count_mod` | `take_ref_mod`, `restore_ref_mod`, `total_ref_mod` | `ref_mod` |
/// | allocation (`owning_root`, `num_bytes`, `must_insert_reserved`) | `fill_owning_root`, `reallocate` | `take_must_insert`, `restore_must_insert` | getters |
/// | extent op | `merge_op` | `take_op`, `restore_op`, `has_pending_op` | `op` |
/// | late-ADD markers (`add_epoch`, marker range) | `exit_noting_late_add` | `add_epoch`, `markers` | — |
#[derive(Debug)]
pub(crate) struct Head {
    /// This head object's generation: its marker and spilled-node ranges
    /// in the [`NodeMap`] are the slots `generation << 1 | tag`.
    generation: u64,
    is_data: bool,
    is_system: bool,
    /// The head's inline nodes (module `inline`); while the set is not
    /// spilled they are all its nodes and no walk touches the [`NodeMap`].
    inline: InlineSet,
    reserved_bytes: u64,
    state: HeadState,
    num_bytes: AtomicU64,
    ref_mod: AtomicI64,
    total_ref_mod: AtomicI64,
    owning_root: AtomicU64,
    must_insert_reserved: AtomicBool,
    extent_op: OpSlot,
    /// Bumped after an adder noted a late ADD (a marker, see the module
    /// docs): the runner's drop phase runs the marked ADDs when it moves.
    add_epoch: AtomicU64,
    /// Reader seqlock (semantics.md §7.1): odd while a ref taken from this head is
    /// not yet applied to the backend. Only the claiming runner writes it,
    /// through [`Head::open_apply_window`].
    run_seq: AtomicU64,
}

/// The seqlock's odd window, opened by [`Head::open_apply_window`]: while
/// it lives, readers of this head retry. Dropping it closes the window
/// (even again), on every path out of a take, including an unwinding one.
#[must_use = "the window closes when dropped"]
pub(crate) struct ApplyWindow<'h>(&'h AtomicU64);

impl Drop for ApplyWindow<'_> {
    fn drop(&mut self) {
        // Release: the even value publishes the applied (or restored)
        // state; pairs with the readers' Acquire loads in `read_seq`.
        self.0.fetch_add(1, Ordering::Release);
    }
}

impl Head {
    /// A fresh head whose inline node has the key and level `first` (none
    /// for a head built by an extent op). Takes a generation number: when
    /// the index discards this value (a concurrent insert won), the number
    /// is simply skipped.
    pub(crate) fn new(
        num_bytes: u64,
        is_data: bool,
        is_system: bool,
        reserved: u64,
        first: Option<(NodeKey, u8)>,
    ) -> Self {
        Head {
            generation: next_gen(),
            is_data,
            is_system,
            inline: InlineSet::new(first),
            reserved_bytes: reserved,
            state: HeadState::new(),
            num_bytes: AtomicU64::new(num_bytes),
            ref_mod: AtomicI64::new(0),
            total_ref_mod: AtomicI64::new(0),
            owning_root: AtomicU64::new(0),
            must_insert_reserved: AtomicBool::new(false),
            extent_op: OpSlot::new(),
            add_epoch: AtomicU64::new(0),
            run_seq: AtomicU64::new(0),
        }
    }

    /// A data head (else a tree block's).
    pub(crate) fn is_data(&self) -> bool {
        self.is_data
    }

    // ---- lifecycle word (module `state`) ----

    /// Leave as an adder (`HeadState::exit`).
    pub(crate) fn exit(&self) {
        self.state.exit()
    }

    /// Leave as an adder that made the node `key` an ADD: if a runner holds
    /// the head, leave it a late-ADD marker first (`HeadState::exit_noting`,
    /// [`Head::note_late_add`]).
    pub(crate) fn exit_noting_late_add<N: NodeMap>(&self, map: &N, key: NodeKey, inline: bool, guard: &N::Guard) {
        self.state.exit_noting(|| self.note_late_add(map, key, inline, guard))
    }

    /// Claim for running (`HeadState::try_claim`).
    pub(crate) fn try_claim(&self) -> bool {
        self.state.try_claim()
    }

    /// Give the claim back (`HeadState::unclaim`).
    pub(crate) fn unclaim(&self) {
        self.state.unclaim()
    }

    /// The lifecycle word, for a close from exactly this word.
    pub(crate) fn word(&self) -> u64 {
        self.state.load()
    }

    /// Whether the head was retired.
    pub(crate) fn is_closed(&self) -> bool {
        self.state.is_closed()
    }

    /// Born and not retired: what snapshots and `find_head` show.
    pub(crate) fn is_live(&self) -> bool {
        let w = self.state.load();
        w & super::state::CLOSED == 0 && w & super::state::BORN != 0
    }

    // ---- reader seqlock ----

    /// Open the odd window before taking a ref or the leftover op; the
    /// window closes (even, Release) when the returned value drops.
    pub(crate) fn open_apply_window(&self) -> ApplyWindow<'_> {
        // Relaxed: ordered before the take's RMWs that follow (the CAS on
        // the node count, `take_ref_mod`'s AcqRel, the op slot's swap),
        // which release it to a reader that sees their effect.
        self.run_seq.fetch_add(1, Ordering::Relaxed);
        ApplyWindow(&self.run_seq)
    }

    /// The seqlock value (a reader reads it before and after its lookup).
    pub(crate) fn read_seq(&self) -> u64 {
        // Acquire: pairs with the Release close of an apply window.
        self.run_seq.load(Ordering::Acquire)
    }

    // ---- counts ----

    /// An adder's `count_mod` (semantics.md §4.6): `ref_mod` and `total_ref_mod`
    /// change by `delta`; returns `total_ref_mod`'s old value, which tells
    /// exactly one thread about each crossing of zero (`pending_csums`).
    pub(crate) fn apply_count_mod(&self, delta: i64) -> i64 {
        // AcqRel: pairs with the runner's RMWs on ref_mod and readers'
        // Acquire loads (docs/protocols.md §f).
        self.ref_mod.fetch_add(delta, Ordering::AcqRel);
        self.total_ref_mod.fetch_add(delta, Ordering::AcqRel)
    }

    /// The runner took `v` from a node (inside an apply window).
    pub(crate) fn take_ref_mod(&self, v: i64) {
        // AcqRel: Release publishes the window's odd value to a reader that
        // sees this change (docs/protocols.md §f).
        self.ref_mod.fetch_sub(v, Ordering::AcqRel);
    }

    /// Put back `v` a failed run took.
    pub(crate) fn restore_ref_mod(&self, v: i64) {
        // AcqRel: as `take_ref_mod`.
        self.ref_mod.fetch_add(v, Ordering::AcqRel);
    }

    /// Pending refs (a reader's or a snapshot's view).
    pub(crate) fn ref_mod(&self) -> i64 {
        // Acquire: pairs with the AcqRel changes above.
        self.ref_mod.load(Ordering::Acquire)
    }

    /// Pending refs counting never-inserted reservations (the runner, at retire).
    pub(crate) fn total_ref_mod(&self) -> i64 {
        // Acquire: pairs with `apply_count_mod`.
        self.total_ref_mod.load(Ordering::Acquire)
    }

    // ---- allocation fields (semantics.md §4.6 steps 2-3) ----

    /// Fill in a missing owning root.
    pub(crate) fn fill_owning_root(&self, root: u64) {
        // AcqRel: pairs with the Acquire loads of `owning_root`.
        let _ = self.owning_root.compare_exchange(0, root, Ordering::AcqRel, Ordering::Acquire);
    }

    /// A (re-)allocation under must_insert_reserved: owning root and size
    /// overwritten (§11.11a), then the flag set.
    pub(crate) fn reallocate(&self, owning_root: u64, num_bytes: u64) {
        // Release: pairs with the runner's Acquire loads when it takes the flag.
        self.owning_root.store(owning_root, Ordering::Release);
        self.num_bytes.store(num_bytes, Ordering::Release);
        self.must_insert_reserved.store(true, Ordering::Release);
    }

    /// The runner takes must_insert_reserved for the ref it runs (a load
    /// first: the swap is an RMW most refs do not need; a flag set right
    /// after the load stays for the next ref or the retire).
    pub(crate) fn take_must_insert(&self) -> bool {
        // Acquire/AcqRel: pair with `reallocate`'s Release store.
        self.must_insert_reserved.load(Ordering::Acquire) && self.must_insert_reserved.swap(false, Ordering::AcqRel)
    }

    /// Put back a flag a failed run took.
    pub(crate) fn restore_must_insert(&self) {
        // Release: as `reallocate`.
        self.must_insert_reserved.store(true, Ordering::Release);
    }

    /// Whether the item must still be inserted (the op of such a head waits).
    pub(crate) fn must_insert_reserved(&self) -> bool {
        // Acquire: pairs with `reallocate`.
        self.must_insert_reserved.load(Ordering::Acquire)
    }

    /// The extent's length.
    pub(crate) fn num_bytes(&self) -> u64 {
        // Acquire: pairs with `reallocate`.
        self.num_bytes.load(Ordering::Acquire)
    }

    /// The owning root (0: not known).
    pub(crate) fn owning_root(&self) -> u64 {
        // Acquire: pairs with `fill_owning_root` and `reallocate`.
        self.owning_root.load(Ordering::Acquire)
    }

    // ---- extent op ----

    /// Take the pending extent op.
    pub(crate) fn take_op(&self) -> Option<ExtentOp> {
        self.extent_op.take()
    }

    /// A copy of the pending extent op.
    pub(crate) fn op(&self) -> Option<ExtentOp> {
        self.extent_op.get()
    }

    /// Leftover work that keeps the head from closing: an extent op on an
    /// item that exists (an op on a must_insert_reserved head goes with it).
    pub(crate) fn has_pending_op(&self) -> bool {
        self.extent_op.is_some() && !self.must_insert_reserved()
    }

    // ---- late-ADD markers ----

    /// How many late ADDs were noted (`note_late_add`).
    pub(crate) fn add_epoch(&self) -> u64 {
        // Acquire: pairs with `note_late_add`'s Release bump, made after its
        // marker was in the map.
        self.add_epoch.load(Ordering::Acquire)
    }

    fn slot(&self, tag: u64) -> u64 {
        self.generation << 1 | tag
    }

    fn ix(&self, key: NodeKey) -> NodeIx {
        NodeIx { slot: self.slot(NODE_TAG), key }
    }

    /// Whether keys went to the [`NodeMap`] (then walks read it too).
    fn spilled(&self) -> bool {
        self.inline.spilled()
    }

    fn range<'g, N: NodeMap>(&self, map: &'g N, tag: u64, slot_shift: u32, guard: &'g N::Guard) -> MapRange<'g, N> {
        self.range_from(map, tag, MIN_KEY, slot_shift, guard)
    }

    fn range_from<'g, N: NodeMap>(
        &self,
        map: &'g N,
        tag: u64,
        from: NodeKey,
        slot_shift: u32,
        guard: &'g N::Guard,
    ) -> MapRange<'g, N> {
        let start = NodeIx { slot: self.slot(tag), key: from };
        let mut it = MapRange { cur: None, slot: self.slot(tag), slot_shift };
        let first = map.lower_bound(&start, guard).filter(|n| it.owns(n));
        it.cur = first;
        it
    }

    /// This head's nodes, inline and spilled, in key order.
    pub(crate) fn nodes<'g, N: NodeMap>(&'g self, map: &'g N, guard: &'g N::Guard) -> HeadNodes<'g, N> {
        self.nodes_from(map, MIN_KEY, guard)
    }

    /// This head's nodes with a key at least `from`, in key order.
    fn nodes_from<'g, N: NodeMap>(&'g self, map: &'g N, from: NodeKey, guard: &'g N::Guard) -> HeadNodes<'g, N> {
        let mut inline = self.inline.nodes();
        while inline.peek_key().is_some_and(|k| k < from) {
            inline.next();
        }
        HeadNodes { inline, map: self.spilled().then(|| self.range_from(map, NODE_TAG, from, 0, guard)), peeked: None }
    }

    /// This head's nodes of one backref identity (same `RefKey`, any seq:
    /// contiguous in §3.1 order), in key order.
    pub(crate) fn identity_nodes<'g, N: NodeMap>(
        &'g self,
        map: &'g N,
        key: RefKey,
        guard: &'g N::Guard,
    ) -> impl Iterator<Item = HeadNode<'g, N>> + use<'g, N> {
        self.nodes_from(map, NodeKey { key, seq: 0 }, guard)
            .take_while(move |n| n.key().key.cmp_identity(&key) == std::cmp::Ordering::Equal)
    }

    /// This head's late-ADD markers in `map`, in key order (only keys that
    /// are not inline have markers).
    pub(crate) fn markers<'g, N: NodeMap>(&self, map: &'g N, guard: &'g N::Guard) -> Option<MapRange<'g, N>> {
        self.spilled().then(|| self.range(map, MARK_TAG, 0, guard))
    }

    /// The node `key` of this head, if it exists (zero nodes included).
    pub(crate) fn node<'g, N: NodeMap>(
        &'g self,
        map: &'g N,
        key: NodeKey,
        guard: &'g N::Guard,
    ) -> Option<HeadNode<'g, N>> {
        if let Some(i) = self.inline.find(&key) {
            return Some(HeadNode::Inline(i));
        }
        if !self.spilled() {
            return None;
        }
        map.get(&self.ix(key), guard).map(HeadNode::Map)
    }

    /// Apply one signed change to the node `key` (insert or merge, §4.7).
    /// An inline node takes it when the key is inline or a slot is free
    /// (module `inline`); otherwise it goes to the [`NodeMap`], where a
    /// node killed meanwhile is helped out and the change retried into a
    /// fresh node (module `count`). Either way a zero node of another level
    /// is replaced (§4.6 step 3: a block re-allocated at a new level) and a
    /// node the change brings to 0 is killed and unlinked at once. Adders,
    /// and the runner when it puts counts back or folds a merge, all come
    /// through here. Returns the transition, whether a map entry was
    /// unlinked (the reclamation tally) and whether the node is inline.
    pub(crate) fn change_node<N: NodeMap>(
        &self,
        map: &N,
        key: NodeKey,
        delta: i64,
        level: u8,
        guard: &N::Guard,
    ) -> (Transition, bool, bool) {
        if let Placed::Inline { old } = self.inline.change(key, delta, level) {
            return (Transition::of(old, old + delta), false, true);
        }
        let (old, unlinked) = change_entry(map, self.ix(key), delta, Some(level), false, true, guard);
        (Transition::of(old, old + delta), unlinked, false)
    }

    /// Note a late ADD at `key` (see the module docs): called by the adder
    /// that made the node an ADD, still inside, while a runner holds the
    /// head. An inline node needs no marker: the runner looks at every
    /// inline node whenever add_epoch moved.
    fn note_late_add<N: NodeMap>(&self, map: &N, key: NodeKey, inline: bool, guard: &N::Guard) {
        if !inline {
            let ix = NodeIx { slot: self.slot(MARK_TAG), key };
            change_entry(map, ix, 1, None, true, false, guard);
        }
        // Release: after the marker is in the map; pairs with the runner's
        // Acquire load of add_epoch before each drop, which then finds it.
        self.add_epoch.fetch_add(1, Ordering::Release);
    }

    /// The live inline nodes with a non-zero count (the runner looks at
    /// them whenever late ADDs were noted: they have no markers).
    pub(crate) fn inline_nodes(&self) -> InlineNodes<'_> {
        self.inline.nodes()
    }

    /// Whether any node is non-zero.
    pub(crate) fn has_refs<N: NodeMap>(&self, map: &N, guard: &N::Guard) -> bool {
        self.nodes(map, guard).any(|n| n.peek() != 0)
    }

    /// Unlink every spilled node and marker of a closed head (nodes all
    /// zero: the close CAS proved no adder entered after the emptiness
    /// check; markers are only noted by adders inside, so none comes
    /// later). Their memory goes through the epoch like the head's; a head
    /// that never spilled touches no map. Returns how many live (not
    /// killed) entries it unlinked.
    pub(crate) fn unlink_nodes<N: NodeMap>(&self, map: &N, guard: &N::Guard) -> usize {
        debug_assert!(self.state.is_closed());
        if !self.spilled() {
            return 0;
        }
        self.range(map, MARK_TAG, 1, guard)
            // Relaxed: the head is closed, the count no longer changes; the
            // load only keeps killed nodes out of the retired tally.
            .filter(|n| !count::is_dead(n.value().count.load(Ordering::Relaxed)) && n.remove())
            .count()
    }

    /// Merge an update into the extent op (semantics.md §4.6 step 4).
    pub(crate) fn merge_op(&self, upd: &ExtentOp) {
        self.extent_op.merge(upd);
    }

    /// Put an op taken by a failed run back, merging a newer one over it.
    pub(crate) fn restore_op(&self, op: ExtentOp) {
        self.extent_op.restore(op);
    }

    pub(crate) fn snapshot<N: NodeMap>(&self, bytenr: u64, map: &N, guard: &N::Guard) -> HeadSnapshot {
        let mut nodes = Vec::new();
        for n in self.nodes(map, guard) {
            let c = n.peek();
            if c != 0 {
                nodes.push(NodeSnapshot {
                    key: n.key(),
                    action: if c > 0 { Action::Add } else { Action::Drop },
                    ref_mod: c.unsigned_abs(),
                    level: n.level(),
                });
            }
        }
        HeadSnapshot {
            bytenr,
            num_bytes: self.num_bytes(),
            is_data: self.is_data,
            is_system: self.is_system,
            ref_mod: self.ref_mod(),
            total_ref_mod: self.total_ref_mod(),
            must_insert_reserved: self.must_insert_reserved(),
            processing: self.state.load() & super::state::PROCESSING != 0,
            owning_root: self.owning_root(),
            reserved_bytes: self.reserved_bytes,
            extent_op: self.extent_op.get(),
            nodes,
        }
    }
}

impl Indexed for Head {
    fn state(&self) -> &HeadState {
        &self.state
    }
}

#[cfg(all(test, not(any(dref_loom, dref_shuttle))))]
mod tests {
    use super::*;

    /// The inline sizes behind docs/benchmarks.md's bytes-per-head and
    /// bytes-per-ref figures (a skiplist node adds 8 bytes of refcount and
    /// height plus 8 per tower level, 2 levels on average).
    #[test]
    fn inline_sizes() {
        let (head, ix, node) = (size_of::<Head>(), size_of::<NodeIx>(), size_of::<RefNode>());
        eprintln!("Head {head} B, NodeIx {ix} B, RefNode {node} B");
        // 96 bytes of head fields (the op slot's pending flag pads to 8) and
        // 200 of inline nodes (module `inline`: a membership word and four
        // slots of a word and a five-word key).
        assert!(head <= 296, "Head grew to {head} bytes");
        assert!(ix + node <= 64, "node key + value grew to {} bytes", ix + node);
    }
}
