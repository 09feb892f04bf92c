//! A head's inline nodes: up to [`SLOTS`] ref nodes stored in the head
//! itself, so a small head's adds, runs and cancellations touch no shared
//! index (docs/protocols.md §j, "Inline nodes").
//!
//! # Implementation details
//!
//! Each slot is a *slot word* (generation and value, one `AtomicU64`) and
//! five key words (type and level, three fields, seq). The head's
//! *membership word* has one "published" bit per slot, a `SPILLED` bit and
//! a version above them that every change of the word bumps.
//!
//! Slot word values (the generation changes only at a claim):
//!
//! | value | meaning | who moves it on |
//! |---|---|---|
//! | `FREE(g)` | unused, not published | an inserter claims it: `CLAIMED(g+1)` |
//! | `CLAIMED(g)` | its claimer writes the key, then publishes the slot (membership CAS) | the claimer: `LIVE(g, 0)` after publishing, or `FREE(g)` after losing; anyone who sees it published: `LIVE(g, 0)` (helping) |
//! | `LIVE(g, c)` | a published node with count `c` (0: no pending ref) | adders and the runner: CAS `c → c'` at generation `g`; an inserter that finds no free slot: kill at `c = 0` (`reclaim_zero`) |
//! | `DEAD(g)` | killed at 0: absent | its killer unpublishes it (membership CAS), then stores `FREE(g)` |
//!
//! Membership word (one CAS per change, each bumps the version):
//!
//! | change | by | from |
//! |---|---|---|
//! | publish slot `i` | the claimer of slot `i` | exactly the word its key search read, `SPILLED` clear |
//! | unpublish slot `i` | the killer of slot `i` | any word (the bit is set: only this killer clears it) |
//! | set `SPILLED` | an inserter that found no free slot | exactly the word its key search read |
//!
//! Uniqueness: a key is in at most one live node of the head. An inserter
//! publishes key `K` only by a CAS from the membership word whose published
//! slots it read and found without a live `K`; any publish, unpublish or
//! spill in between changes the word (the version), so the CAS fails and
//! the search runs again. Once `SPILLED` is set no slot is published any
//! more (publishing needs it clear), so a key that is not live inline at
//! a word with `SPILLED` set goes to the head's range of the node map and
//! cannot appear inline later. `SPILLED` is never cleared.
//!
//! # Synchronization
//!
//! - Key words are written only by a slot's claimer, between its claim
//!   (a `Release` fence after the claim CAS) and its publish CAS
//!   (`Release`). A reader reads them only after an `Acquire` that
//!   synchronizes with the publish (the membership word showing the slot
//!   published while the slot word reads `CLAIMED(g)`) or with the commit
//!   to `LIVE(g, _)`, then re-reads the slot word after an `Acquire` fence:
//!   an unchanged generation proves no later claimer's key stores were read
//!   (the seqlock argument).
//! - Counts change by CAS at the generation the changer read, so a change
//!   never lands in a later node that reused the slot. A generation has 24
//!   bits: a thread would have to stall while the same slot is reused
//!   2^24 times for this to wrap.
//! - Live counts are limited to ±2^38 pending refs per key (one slot word
//!   holds generation and count).

#![forbid(unsafe_code)]

use crate::domain::key::{NodeKey, RefKey};
use crate::sync::{AtomicU64, Ordering, fence};

/// Inline slots per head (the benchmark workloads queue four keys per
/// head; 98% of the heads of a recorded kernel trace have at most three).
/// The loom models use two, so that two keys fill a head.
pub(crate) const SLOTS: usize = if cfg!(dref_loom) { 2 } else { 4 };

const VAL_BITS: u32 = 40;
const VAL_MASK: u64 = (1 << VAL_BITS) - 1;
const GEN_MASK: u64 = (1 << (64 - VAL_BITS)) - 1;
const FREE: i64 = -(1 << (VAL_BITS - 1));
const CLAIMED: i64 = FREE + 1;
const DEAD: i64 = FREE + 2;
/// Live counts stay inside `(-LIMIT, LIMIT)`.
const LIMIT: i64 = 1 << (VAL_BITS - 2);

/// Membership: bit `i` = slot `i` published.
const SPILLED: u64 = 1 << SLOTS;
const VERSION_ONE: u64 = 1 << (SLOTS + 1);

fn bit(i: usize) -> u64 {
    1 << i
}

/// A slot word, unpacked.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Word {
    generation: u64,
    val: i64,
}

impl Word {
    fn unpack(w: u64) -> Word {
        Word { generation: w >> VAL_BITS, val: ((w << (64 - VAL_BITS)) as i64) >> (64 - VAL_BITS) }
    }

    fn pack(self) -> u64 {
        (self.generation << VAL_BITS) | (self.val as u64 & VAL_MASK)
    }

    fn live(generation: u64, val: i64) -> u64 {
        Word { generation, val }.pack()
    }

    fn is_live(self) -> bool {
        self.val > DEAD
    }
}

/// One slot: its word and its key.
#[derive(Debug)]
struct Slot {
    word: AtomicU64,
    /// Type code and level, the three fields, the seq.
    key: [AtomicU64; 5],
}

impl Slot {
    fn new(word: Word, key: Option<(NodeKey, u8)>) -> Slot {
        let k = key.map_or([0; 5], |(k, level)| encode(k, level));
        Slot { word: AtomicU64::new(word.pack()), key: k.map(AtomicU64::new) }
    }
}

fn encode(k: NodeKey, level: u8) -> [u64; 5] {
    let [a, b, c] = k.key.fields();
    [k.key.ref_type() as u8 as u64 | (level as u64) << 8, a, b, c, k.seq]
}

/// Whether two encoded keys name the same key (the level is not part of it).
fn same_key(a: &[u64; 5], b: &[u64; 5]) -> bool {
    a[0] & 0xff == b[0] & 0xff && a[1..] == b[1..]
}

fn decode(w: [u64; 5]) -> Option<(NodeKey, u8)> {
    let key = RefKey::from_parts(w[0] as u8, [w[1], w[2], w[3]])?;
    Some((NodeKey { key, seq: w[4] }, (w[0] >> 8) as u8))
}

/// A head's inline nodes (see the module docs).
#[derive(Debug)]
pub(crate) struct InlineSet {
    members: AtomicU64,
    slots: [Slot; SLOTS],
}

/// Where [`InlineSet::change`] put a change.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Placed {
    /// Into an inline node whose count was `old`.
    Inline { old: i64 },
    /// Nowhere: the key is not inline and the set is spilled; the caller
    /// changes the head's node-map range.
    Map,
}

/// The node changed was killed or reused meanwhile: search again.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Stale;

/// One inline node as read at one generation.
#[derive(Clone, Copy, Debug)]
pub(crate) struct InlineRef<'h> {
    set: &'h InlineSet,
    i: usize,
    generation: u64,
    key: NodeKey,
    level: u8,
}

/// The live inline nodes of a head at one moment, in key order.
#[derive(Clone, Copy, Debug)]
pub(crate) struct InlineNodes<'h> {
    nodes: [Option<InlineRef<'h>>; SLOTS],
    next: usize,
}

impl<'h> Iterator for InlineNodes<'h> {
    type Item = InlineRef<'h>;

    fn next(&mut self) -> Option<InlineRef<'h>> {
        let n = self.nodes.get_mut(self.next)?.take()?;
        self.next += 1;
        Some(n)
    }
}

impl<'h> InlineNodes<'h> {
    /// The next node's key, without taking it.
    pub(crate) fn peek_key(&self) -> Option<NodeKey> {
        self.nodes.get(self.next).copied().flatten().map(|n| n.key)
    }
}

impl InlineSet {
    /// A set with `first` published in slot 0 (count 0), or an empty one.
    /// Built before the head is published, so no protocol step is needed.
    pub(crate) fn new(first: Option<(NodeKey, u8)>) -> InlineSet {
        let slot = |i: usize| match first {
            Some(k) if i == 0 => Slot::new(Word { generation: 1, val: 0 }, Some(k)),
            _ => Slot::new(Word { generation: 0, val: FREE }, None),
        };
        InlineSet { members: AtomicU64::new(first.map_or(0, |_| bit(0))), slots: std::array::from_fn(slot) }
    }

    fn members(&self) -> u64 {
        // Acquire: pairs with the publish CAS (Release, after the key
        // stores) and every other membership RMW (release sequence).
        self.members.load(Ordering::Acquire)
    }

    /// Whether keys that are not inline live in the node map.
    pub(crate) fn spilled(&self) -> bool {
        self.members() & SPILLED != 0
    }

    /// Read slot `i`'s node if it is live (and holds `want`, if given); a
    /// published `CLAIMED` slot is committed (`LIVE(g, 0)`) on its
    /// claimer's behalf first.
    ///
    /// With `want`, a slot whose key words do not spell `want` is skipped
    /// before the seqlock check: the key of a slot published in the
    /// membership word the caller read cannot change while it stays
    /// published, so a torn read means the slot was reused since, and the
    /// caller's publish from that word fails anyway.
    fn read(&self, i: usize, want: Option<&NodeKey>) -> Option<InlineRef<'_>> {
        let slot = &self.slots[i];
        // Acquire: pairs with the commit to LIVE (Release) or, for
        // CLAIMED, orders the membership load below after the claim.
        let mut w = Word::unpack(slot.word.load(Ordering::Acquire));
        if w.val == CLAIMED && self.members() & bit(i) == 0 {
            // Claimed, not (yet) published: not a node.
            return None;
        }
        if !w.is_live() && w.val != CLAIMED {
            return None;
        }
        let k = [0, 1, 2, 3, 4].map(|j| slot.key[j].load(Ordering::Relaxed));
        if want.is_some_and(|w| !same_key(&encode(*w, 0), &k)) {
            return None;
        }
        // Acquire fence: if a key load read a later claimer's store, the
        // re-read below sees that claim (its Release fence), and the
        // generation differs.
        fence(Ordering::Acquire);
        let w2 = Word::unpack(slot.word.load(Ordering::Relaxed));
        if w2.generation != w.generation || !(w2.is_live() || w2.val == CLAIMED) {
            return None;
        }
        if w2.val == CLAIMED {
            // Published: help its claimer commit it.
            let claimed = Word { generation: w.generation, val: CLAIMED }.pack();
            // AcqRel: Release hands the key stores we saw on to readers of LIVE.
            match slot.word.compare_exchange(claimed, Word::live(w.generation, 0), Ordering::AcqRel, Ordering::Acquire)
            {
                Ok(_) => {}
                Err(cur) => {
                    w = Word::unpack(cur);
                    if w.generation != w2.generation || !w.is_live() {
                        return None;
                    }
                }
            }
        }
        let (key, level) = decode(k)?;
        Some(InlineRef { set: self, i, generation: w.generation, key, level })
    }

    /// The live nodes with a non-zero count, in key order. A zero node is
    /// "no node" to every walker; its slot stays published (the next change
    /// of its key reuses it) until an inserter that finds no free slot
    /// reclaims it (`reclaim_zero`).
    pub(crate) fn nodes(&self) -> InlineNodes<'_> {
        let m = self.members();
        let mut nodes: [Option<InlineRef<'_>>; SLOTS] = [None; SLOTS];
        let mut n = 0;
        for i in 0..SLOTS {
            // Relaxed pre-check: `read` loads the word again with Acquire.
            if m & bit(i) != 0 && Word::unpack(self.slots[i].word.load(Ordering::Relaxed)).val != 0 {
                if let Some(r) = self.read(i, None) {
                    nodes[n] = Some(r);
                    n += 1;
                }
            }
        }
        nodes[..n].sort_unstable_by_key(|r| r.map(|r| r.key));
        InlineNodes { nodes, next: 0 }
    }

    /// The live node of `key`, if it is inline.
    pub(crate) fn find(&self, key: &NodeKey) -> Option<InlineRef<'_>> {
        let m = self.members();
        (0..SLOTS).filter(|&i| m & bit(i) != 0).find_map(|i| self.read(i, Some(key)))
    }

    /// Apply `delta` to the node of `key` (level `level`), inserting it
    /// if it is not live here and the set is not spilled; spills the set
    /// when no slot is free. A zero node of another level is killed first
    /// (a block re-allocated at a new level must not keep its old level).
    pub(crate) fn change(&self, key: NodeKey, delta: i64, level: u8) -> Placed {
        // Claims that lose to another inserter's are retried a few times
        // before the set spills; every retry follows another thread's step.
        let mut patience = 8;
        'search: loop {
            let m = self.members();
            let mut free = 0u64;
            for i in 0..SLOTS {
                if m & bit(i) == 0 {
                    free |= bit(i);
                    continue;
                }
                let Some(n) = self.read(i, Some(&key)) else { continue };
                if n.level != level && n.try_kill() {
                    continue 'search;
                }
                match n.change(delta) {
                    Ok(old) => return Placed::Inline { old },
                    Err(Stale) => continue 'search,
                }
            }
            if m & SPILLED != 0 {
                return Placed::Map;
            }
            let claimed = (0..SLOTS).filter(|&i| free & bit(i) != 0).find_map(|i| self.try_claim(i, key, level));
            let Some(n) = claimed else {
                if free == 0 && self.reclaim_zero(m) {
                    continue;
                }
                if free != 0 && patience > 0 {
                    patience -= 1;
                    crate::sync::spin_hint();
                    continue;
                }
                // AcqRel: as the publish CAS below.
                if self
                    .members
                    .compare_exchange(m, (m | SPILLED) + VERSION_ONE, Ordering::AcqRel, Ordering::Acquire)
                    .is_ok()
                {
                    return Placed::Map;
                }
                continue;
            };
            let slot = &self.slots[n.i];
            // AcqRel: Release publishes the key stores (after the claim's
            // fence) to readers that see the bit; success also proves that
            // nothing was published, unpublished or spilled since `m`.
            if self
                .members
                .compare_exchange(m, (m | bit(n.i)) + VERSION_ONE, Ordering::AcqRel, Ordering::Acquire)
                .is_err()
            {
                // Lost: nobody saw the slot published, nobody changed it.
                // Release: the next claimer's Acquire CAS reads FREE.
                slot.word.store(Word { generation: n.generation, val: FREE }.pack(), Ordering::Release);
                continue;
            }
            // Commit with the change itself; a helper may have committed first.
            let claimed = Word { generation: n.generation, val: CLAIMED }.pack();
            // AcqRel: Release hands the key on to readers of LIVE.
            if slot
                .word
                .compare_exchange(claimed, Word::live(n.generation, delta), Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
            {
                return Placed::Inline { old: 0 };
            }
            match n.change(delta) {
                Ok(old) => return Placed::Inline { old },
                Err(Stale) => continue,
            }
        }
    }

    /// Kill one published zero node of `m` and free its slot; true if one
    /// was freed (the membership word changed: search again).
    fn reclaim_zero(&self, m: u64) -> bool {
        (0..SLOTS).filter(|&i| m & bit(i) != 0).any(|i| {
            // Acquire: as in `read`; the kill's CAS decides.
            let w = Word::unpack(self.slots[i].word.load(Ordering::Acquire));
            w.val == 0 && self.kill(i, w.generation)
        })
    }

    /// Kill slot `i`'s node of `generation` if its count is 0, unpublish it
    /// and free the slot; true if this call did.
    fn kill(&self, i: usize, generation: u64) -> bool {
        let word = &self.slots[i].word;
        let (from, to) = (Word::live(generation, 0), Word { generation, val: DEAD }.pack());
        // AcqRel: ordered with every count change at this generation.
        if word.compare_exchange(from, to, Ordering::AcqRel, Ordering::Relaxed).is_err() {
            return false;
        }
        // The bit is set (a LIVE slot was published) and only this killer
        // clears it.
        let mut m = self.members();
        loop {
            debug_assert!(m & bit(i) != 0, "a live inline node is published");
            // AcqRel: orders the unpublish before the FREE store below.
            match self.members.compare_exchange_weak(
                m,
                (m & !bit(i)) + VERSION_ONE,
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                Ok(_) => break,
                Err(cur) => m = cur,
            }
        }
        // Release: a claimer that reads FREE sees the slot unpublished.
        word.store(Word { generation, val: FREE }.pack(), Ordering::Release);
        true
    }

    /// Claim free slot `i` and write `key` into it (not yet published).
    fn try_claim(&self, i: usize, key: NodeKey, level: u8) -> Option<InlineRef<'_>> {
        let slot = &self.slots[i];
        let w = Word::unpack(slot.word.load(Ordering::Acquire));
        if w.val != FREE {
            return None;
        }
        let generation = (w.generation + 1) & GEN_MASK;
        let claimed = Word { generation, val: CLAIMED }.pack();
        // AcqRel: Acquire reads the killer's FREE store (after its unpublish).
        slot.word.compare_exchange(w.pack(), claimed, Ordering::AcqRel, Ordering::Relaxed).ok()?;
        // Release fence: a reader whose key loads see the stores below
        // sees this claim when it re-reads the slot word (module docs).
        fence(Ordering::Release);
        for (j, v) in encode(key, level).into_iter().enumerate() {
            slot.key[j].store(v, Ordering::Relaxed);
        }
        Some(InlineRef { set: self, i, generation, key, level })
    }
}

impl<'h> InlineRef<'h> {
    /// The node's key.
    pub(crate) fn key(&self) -> NodeKey {
        self.key
    }

    /// The node's level (tree blocks).
    pub(crate) fn level(&self) -> u8 {
        self.level
    }

    fn word(&self) -> &'h AtomicU64 {
        &self.set.slots[self.i].word
    }

    /// The count, or 0 if the node was killed or its slot reused.
    pub(crate) fn peek(&self) -> i64 {
        // Acquire: pairs with the AcqRel count CASes.
        let w = Word::unpack(self.word().load(Ordering::Acquire));
        if w.generation == self.generation && w.is_live() { w.val } else { 0 }
    }

    /// Add `delta`; returns the old count.
    pub(crate) fn change(&self, delta: i64) -> Result<i64, Stale> {
        let mut cur = self.word().load(Ordering::Acquire);
        loop {
            let w = Word::unpack(cur);
            if w.generation != self.generation || !w.is_live() {
                return Err(Stale);
            }
            let new = w.val + delta;
            assert!(new.abs() < LIMIT, "more than 2^38 pending refs of one key");
            // AcqRel: one total order of count changes, takes and the kill.
            match self.word().compare_exchange_weak(
                cur,
                Word::live(self.generation, new),
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                Ok(_) => return Ok(w.val),
                Err(c) => cur = c,
            }
        }
    }

    /// Take exactly `v` (the value just peeked); false if it changed.
    pub(crate) fn try_take(&self, v: i64) -> bool {
        let (from, to) = (Word::live(self.generation, v), Word::live(self.generation, 0));
        // AcqRel: as `change`.
        self.word().compare_exchange(from, to, Ordering::AcqRel, Ordering::Acquire).is_ok()
    }

    /// Take whatever is there; returns it (0 if killed or reused).
    pub(crate) fn take_all(&self) -> i64 {
        loop {
            let v = self.peek();
            if v == 0 || self.try_take(v) {
                return v;
            }
        }
    }

    /// Kill the node if its count is 0, unpublish it and free its slot;
    /// true if this call did.
    pub(crate) fn try_kill(&self) -> bool {
        self.set.kill(self.i, self.generation)
    }
}

#[cfg(all(test, not(any(dref_loom, dref_shuttle))))]
mod tests {
    use super::*;

    fn k(ino: u64) -> NodeKey {
        NodeKey { key: RefKey::ExtentData { root: 5, objectid: ino, offset: 0 }, seq: 0 }
    }

    #[test]
    fn words_round_trip() {
        for (generation, val) in [(0, FREE), (GEN_MASK, DEAD), (7, -1), (1, LIMIT - 1), (3, CLAIMED)] {
            assert_eq!(Word::unpack(Word { generation, val }.pack()), Word { generation, val });
        }
        let key = NodeKey { key: RefKey::SharedBlock { parent: 1 << 40 }, seq: 9 };
        assert_eq!(decode(encode(key, 3)), Some((key, 3)));
    }

    #[test]
    fn insert_merge_cancel_reuse_and_spill() {
        let s = InlineSet::new(Some((k(1), 0)));
        assert_eq!(s.change(k(1), 1, 0), Placed::Inline { old: 0 });
        assert_eq!(s.change(k(1), 1, 0), Placed::Inline { old: 1 });
        for ino in 2..=4 {
            assert_eq!(s.change(k(ino), -1, 0), Placed::Inline { old: 0 });
        }
        assert_eq!(s.nodes().map(|n| n.key()).collect::<Vec<_>>(), (1..=4).map(k).collect::<Vec<_>>());
        // Cancel key 3: its zero node stays until a new key needs the slot.
        assert_eq!(s.change(k(3), 1, 0), Placed::Inline { old: -1 });
        assert_eq!(s.find(&k(3)).map(|n| n.peek()), Some(0));
        assert_eq!(s.nodes().count(), 3, "walks skip zero nodes");
        assert_eq!(s.change(k(5), 1, 0), Placed::Inline { old: 0 });
        assert!(s.find(&k(3)).is_none(), "key 5 reclaimed the zero slot");
        assert!(!s.spilled());
        // A sixth key while five... four are live: the set spills.
        assert_eq!(s.change(k(6), 1, 0), Placed::Map);
        assert!(s.spilled());
        // Live keys still merge inline; freed slots are not reused.
        assert_eq!(s.change(k(5), 1, 0), Placed::Inline { old: 1 });
        let n = s.find(&k(2)).unwrap();
        assert_eq!(n.take_all(), -1);
        assert!(n.try_kill());
        assert!(!n.try_kill(), "killed once");
        assert_eq!(s.change(k(7), 1, 0), Placed::Map);
        assert_eq!(s.nodes().map(|n| (n.key(), n.peek())).collect::<Vec<_>>(), vec![(k(1), 2), (k(4), -1), (k(5), 2)]);
    }

    #[test]
    fn a_zero_node_of_another_level_is_replaced() {
        let tree = |root| NodeKey { key: RefKey::TreeBlock { root }, seq: 0 };
        let s = InlineSet::new(Some((tree(5), 0)));
        assert_eq!(s.change(tree(5), 1, 1), Placed::Inline { old: 0 });
        assert_eq!(s.find(&tree(5)).unwrap().level(), 1);
        // Non-zero: merged whatever the level.
        assert_eq!(s.change(tree(5), 1, 2), Placed::Inline { old: 1 });
        assert_eq!(s.find(&tree(5)).unwrap().level(), 1);
    }

    #[test]
    fn a_stale_ref_changes_nothing() {
        let s = InlineSet::new(Some((k(1), 0)));
        let old = s.find(&k(1)).unwrap();
        assert!(old.try_kill());
        assert!(s.find(&k(1)).is_none());
        assert!(!old.try_kill());
        assert_eq!(s.change(k(2), 1, 0), Placed::Inline { old: 0 });
        assert_eq!(old.change(1), Err(Stale));
        assert!(!old.try_take(0));
        assert_eq!(old.peek(), 0);
        assert_eq!(s.find(&k(2)).unwrap().peek(), 1);
    }
}
