//! An adder that owns a disjoint set of extents ("slots") and keeps its own
//! model of the refs it queued on each, so every drop drops a live ref and
//! every tree ref key is queued at most once per extent.
//!
//! A slot's extent is allocated by an `AddExtent` ref, gets more refs, loses
//! them, and once it has none left is retired: with runners at work the slot
//! moves to a fresh bytenr (a freed bytenr is never re-allocated while its
//! freeing drop may still be queued); with no runner the slot re-allocates
//! the same bytenr, which merges into the still-queued head.

use delayed_refs::{Action, BLOCK_FLAG_FULL_BACKREF, DelayedRefs, RefKey, TransHandle};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

use super::Adder;
use super::history::{OpLog, TRACK_EVERY};
use super::ops::{ROOT, TREE_BYTES, bytenr_of, queue_flags, queue_ref};
use crate::oracle::Oracle;

/// Refs each extent gets before it is dropped ("~4 refs per head").
pub const REFS_PER_HEAD: u32 = 4;

/// How a slot moves through its extent's life.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pattern {
    /// Data refs only: `REFS_PER_HEAD` distinct adds, then drops in order.
    Cycle,
    /// Data and tree extents (odd slots are tree blocks), adds, re-adds of
    /// data keys, drops in random order and `FULL_BACKREF` extent ops.
    Mixed,
}

/// One extent an adder owns and the refs it queued on it.
#[derive(Clone, Debug)]
struct Slot {
    bytenr: u64,
    tree: bool,
    /// Its count-changing calls go into the linearizability history
    /// (every `TRACK_EVERY`-th slot, whichever bytenr it holds).
    tracked: bool,
    /// Adds queued on the current extent.
    adds: u32,
    /// `Cycle`: the extent is being emptied.
    dropping: bool,
    /// Live refs: key and count (data keys may be added more than once).
    live: Vec<(RefKey, u64)>,
    /// Keys handed out by this slot so far (never reused).
    next_key: u64,
    /// A `FULL_BACKREF` extent op was queued for this bytenr.
    op_queued: bool,
}

/// The next operation of a slot.
#[derive(Clone, Copy, Debug)]
enum Op {
    /// Add one ref; `first` allocates the extent.
    Add { key: RefKey, first: bool, new_key: bool },
    /// Drop one ref of the live entry at this index.
    Drop { idx: usize },
    /// Set `FULL_BACKREF` with an extent op.
    Flags,
}

/// An adder thread's extents and its model of their refs.
#[derive(Debug)]
pub struct SlotAdder {
    owner: u64,
    rng: SmallRng,
    slots: Vec<Slot>,
    next_extent: u64,
    reuse: bool,
    pattern: Pattern,
}

impl SlotAdder {
    /// Adder number `tid` with `heads` extents. `reuse`: re-allocate a freed
    /// bytenr (only safe when no runner works concurrently).
    pub fn new(tid: usize, heads: usize, seed: u64, reuse: bool, pattern: Pattern) -> Self {
        let owner = tid as u64 + 1;
        let heads = heads.max(1);
        let slots = (0..heads)
            .map(|i| Slot {
                bytenr: bytenr_of(owner, i as u64),
                tree: pattern == Pattern::Mixed && i % 2 == 1,
                tracked: i % TRACK_EVERY == 0,
                adds: 0,
                dropping: false,
                live: Vec::with_capacity(REFS_PER_HEAD as usize),
                next_key: 0,
                op_queued: false,
            })
            .collect();
        let rng = SmallRng::seed_from_u64(seed ^ owner.wrapping_mul(0x9E37_79B9_7F4A_7C15));
        SlotAdder { owner, rng, slots, next_extent: heads as u64, reuse, pattern }
    }

    /// Number of slots.
    pub fn slots(&self) -> usize {
        self.slots.len()
    }

    /// The bytenrs of the tracked slots, in slot order: tracked slot `i`
    /// is this adder's `i / TRACK_EVERY`-th target ([`OpLog::retarget`]).
    pub fn tracked_bytenrs(&self) -> impl Iterator<Item = u64> + '_ {
        self.slots.iter().filter(|s| s.tracked).map(|s| s.bytenr)
    }

    /// A key this slot has never handed out.
    fn new_key(slot: &Slot, pattern: Pattern) -> RefKey {
        let n = slot.next_key;
        match (slot.tree, n) {
            (true, 0) => RefKey::TreeBlock { root: ROOT },
            (true, _) => RefKey::SharedBlock { parent: (1 << 40) + n * TREE_BYTES },
            (false, _) if pattern == Pattern::Mixed && n % 4 == 3 => {
                RefKey::SharedData { parent: (1 << 40) + n * TREE_BYTES }
            }
            (false, _) => RefKey::ExtentData { root: ROOT, objectid: 257 + n, offset: 0 },
        }
    }

    fn plan(&mut self, i: usize) -> Op {
        let pattern = self.pattern;
        let s = &self.slots[i];
        let fresh = |s: &Slot| Op::Add { key: Self::new_key(s, pattern), first: s.adds == 0, new_key: true };
        if s.adds == 0 || s.live.is_empty() {
            return fresh(s);
        }
        match pattern {
            Pattern::Cycle if s.dropping => Op::Drop { idx: 0 },
            Pattern::Cycle => fresh(s),
            Pattern::Mixed => {
                let r = self.rng.gen_range(0..100u32);
                if s.tree && !s.op_queued && r < 8 {
                    Op::Flags
                } else if s.adds < REFS_PER_HEAD && r < 60 {
                    if !s.tree && r < 20 {
                        let idx = self.rng.gen_range(0..s.live.len());
                        Op::Add { key: s.live[idx].0, first: false, new_key: false }
                    } else {
                        fresh(s)
                    }
                } else {
                    Op::Drop { idx: self.rng.gen_range(0..s.live.len()) }
                }
            }
        }
    }

    fn commit(&mut self, i: usize, op: Op) {
        let s = &mut self.slots[i];
        match op {
            Op::Add { key, new_key, .. } => {
                s.adds += 1;
                if new_key {
                    s.next_key += 1;
                }
                match s.live.iter_mut().find(|(k, _)| *k == key) {
                    Some((_, c)) => *c += 1,
                    None => s.live.push((key, 1)),
                }
                if self.pattern == Pattern::Cycle && s.adds >= REFS_PER_HEAD {
                    s.dropping = true;
                }
            }
            Op::Drop { idx } => {
                s.live[idx].1 -= 1;
                if s.live[idx].1 == 0 {
                    s.live.remove(idx);
                }
            }
            Op::Flags => s.op_queued = true,
        }
        if s.live.is_empty() && !matches!(op, Op::Flags) {
            s.adds = 0;
            s.dropping = false;
            if !self.reuse {
                s.bytenr = bytenr_of(self.owner, self.next_extent);
                s.op_queued = false;
                self.next_extent += 1;
            }
        }
    }

    /// Queue the next operation of slot `i`, recording it in `log` if the
    /// slot is tracked; the model changes only if it succeeded.
    pub fn step_slot<D: DelayedRefs>(
        &mut self,
        i: usize,
        refs: &D,
        trans: &mut TransHandle,
        log: &mut OpLog<'_>,
    ) -> Result<(), String> {
        let op = self.plan(i);
        let s = &self.slots[i];
        let (b, tracked) = (s.bytenr, s.tracked);
        match op {
            Op::Add { key, first, .. } => {
                log.call(b, 1, tracked, || queue_ref(refs, trans, Action::Add, b, &key, first))?
            }
            Op::Drop { idx } => {
                let key = s.live[idx].0;
                log.call(b, -1, tracked, || queue_ref(refs, trans, Action::Drop, b, &key, false))?
            }
            Op::Flags => queue_flags(refs, trans, b, BLOCK_FLAG_FULL_BACKREF)?,
        }
        self.commit(i, op);
        let now = self.slots[i].bytenr;
        if tracked && now != b {
            log.retarget(i / TRACK_EVERY, now);
        }
        Ok(())
    }
}

impl Adder for SlotAdder {
    fn step<D: DelayedRefs>(&mut self, refs: &D, trans: &mut TransHandle, log: &mut OpLog<'_>) -> Result<(), String> {
        let i = self.rng.gen_range(0..self.slots.len());
        self.step_slot(i, refs, trans, log)
    }

    fn expect(&self, oracle: &mut Oracle) {
        for s in &self.slots {
            for &(key, count) in &s.live {
                oracle.add_ref(s.bytenr, key, count);
            }
            if s.tree && s.op_queued && !s.live.is_empty() {
                oracle.expect_full_backref(s.bytenr);
            }
        }
    }
}
