//! The locked port sharded by bytenr: what a user would build instead of a
//! lock-free structure, and the third benchmark peer.
//!
//! [`ShardedRefs`] holds N complete [`LockedRefs`] roots (the shards) over
//! one shared fs state (`Arc<FsShared<LockedCell>>`: reserves, tree-mod-log
//! seq tracker, qgroup flag). Every operation on one extent goes to the shard
//! its bytenr hashes to; runs rotate over the shards; the whole-root views
//! (counters, snapshot, qgroup records) are merged from the shards.
//!
//! It answers the question "why not shard the lock?" with the project's own
//! numbers (docs/benchmarks.md): on the add side N root locks contend N times
//! less than one, while a head keeps the port's head lock and run token, and
//! the reserves and the seq tracker stay shared.
//!
//! # Implementation details
//!
//! - **Routing.** A bytenr goes to shard `⌊mix(bytenr) · N / 2⁶⁴⌋`, where
//!   `mix` is the splitmix64 finalizer (two multiplies, three shifts) and the
//!   product is the high half of a 64 × 64-bit multiply ("fastrange"), so any
//!   N ≥ 1 works, not only powers of two. Bytenrs are multiples of the sector
//!   size (their low 12 or more bits are zero) and extents allocated together
//!   are adjacent, so the bits must be mixed; the finalizer also decorrelates
//!   the shard from the port's own per-stripe `heads_created` counters, which
//!   use the top bits of a Fibonacci hash of the bytenr: with that same hash
//!   for routing, a shard would see only 2 of its 32 stripes.
//! - **Shard count.** [`DEFAULT_SHARDS`] = 16 for [`DelayedRefs::new`] and
//!   [`DelayedRefs::with_fs`]; [`ShardedRefs::with_shards`] takes any N ≥ 1.
//!   16 is what the issue that introduced this type measured, and it makes
//!   two adders on random extents meet on one root lock 1/16 of the time,
//!   while a whole-root view (counters, snapshot, the emptiness check of
//!   `run(All)`) still takes only 16 uncontended locks. One shard is exactly
//!   the port, call by call (tests/differential.rs checks this).
//! - **One extent, one shard.** Adds, `find_head`, `lookup_extent_info` and
//!   `check_ref_cleanup` of a bytenr are the port's own calls on its shard,
//!   and a qgroup record lives in the shard of its bytenr. Everything the
//!   port guarantees per extent (one head per bytenr, one runner per head,
//!   adds before drops, a reader never sees a ref taken but not applied)
//!   therefore holds unchanged.
//! - **Selection** ([`run_one`](DelayedRefs::run_one)): a shared cursor
//!   (`AtomicUsize`) picks the first shard to try (`fetch_add`, so runners
//!   that call at once start at different shards), and the call tries every
//!   shard once from there; the shard that had work moves the cursor past
//!   itself, so one runner alone visits the non-empty shards in turn, one
//!   head each, and skips empty stretches. Inside a shard the port's own
//!   round-robin cursor selects. So selection is round robin over shards,
//!   then over heads: a head that stays ready (held back by a seq blocker)
//!   does not starve the others, as with the port, but heads are not
//!   selected in global bytenr order, and a result that depends on which
//!   head a run picks holds only for one shard. `Ok(None)` means every shard
//!   had no unprocessed head when it was asked (not at one common instant).
//! - **Run modes across shards** ([`run`](DelayedRefs::run)):
//!   - [`RunMode::Ready`]: at the start the run reads every shard's
//!     `num_heads_ready` (one lock each) as that shard's budget, then runs
//!     heads one shard at a time in rotation, at most its budget from each
//!     shard; a shard whose `run_one` finds nothing has its budget dropped.
//!     So a Ready run never runs more heads than were ready when it started,
//!     and never runs a head in a shard that had no ready head then: heads
//!     added after the start are not run, except that inside one shard the
//!     port's cursor may pick a newer head in place of an older one (the
//!     port's own Ready has the same property on its one root, and so does
//!     the kernel's, §6.5: the count is taken at the start). The
//!     alternative, one budget equal to the sum spent in rotation, would
//!     spend budget on shards whose heads were all added after the start
//!     whenever another shard ran dry, so it was not taken.
//!   - [`RunMode::Bytes`]`(n)`: heads in rotation (as `run_one`) until the
//!     summed bytes-released estimate reaches `n`, or a whole sweep of the
//!     shards found no unprocessed head. The estimate per head is the
//!     port's, so the goal means the same bytes as on one root.
//!   - [`RunMode::All`]: heads in rotation until a sweep finds every shard's
//!     index empty (refs added meanwhile included); it yields while other
//!     runners or seq blockers hold the rest, like the port.
//! - **Merged views.** [`counters`](DelayedRefs::counters) sums the shards'
//!   counters (`num_entries` and `pending_csums` with wrapping adds, so a
//!   transiently negative count sums as it would as one signed value);
//!   [`snapshot`](DelayedRefs::snapshot) and
//!   [`qgroup_records`](DelayedRefs::qgroup_records) concatenate the shards'
//!   and sort by bytenr (a bytenr is in one shard only, so the result is
//!   strictly ordered). [`destroy`](DelayedRefs::destroy) destroys every
//!   shard in turn and sums the figures; [`reclaim`](DelayedRefs::reclaim)
//!   and [`release_thread`](DelayedRefs::release_thread) are forwarded to
//!   every shard (the port frees eagerly, so both are no-ops today).
//! - **Memory.** A head and a ref cost what they cost in the port (`mem`:
//!   the same bytes per head and per ref). A fresh root is N padded port
//!   roots. Like the port's one head map, each shard's head map keeps its
//!   first leaf (192 bytes) once it has held a head, so after `run(All)` and
//!   `reclaim()` a root is back at its baseline once every shard has been
//!   used; a root measured after a warm-up that touched one shard holds up
//!   to (N − 1) × 192 bytes more, a fixed amount that does not grow with the
//!   work. Dropping the root frees everything.
//!
//! # Synchronization
//!
//! - Each shard is a [`LockedRefs`] with the port's three locks (root lock
//!   L1, head lock L2, run token L3) and its lock order (L1 → L2; L3 before
//!   L2 and only by try-lock while L1 is held); see `crate::locked`.
//! - No code here holds a lock of two shards at once: every call is one
//!   shard's call, or a sequence of one-shard calls. Sharding adds no lock
//!   order edge. A backend called by a runner of shard i (which holds that
//!   head's run token) may add refs to shard j, which takes shard j's L1 and
//!   L2: the same "token, then root lock" nesting the port already allows on
//!   its one root.
//! - The fs state is shared by all shards: the reserves are leaf locks
//!   (`LockedCell`), the seq tracker is the crate's `SeqTracker`. Adds and
//!   runs of different shards contend there and nowhere else.
//! - The rotation cursor is an `AtomicUsize` changed with `fetch_add` and
//!   `store` (Relaxed): it only spreads runners over the shards and orders
//!   nothing; any value is correct, and a lost update between two runners
//!   only changes which shard is tried first.
//! - Cross-shard views are a sequence of per-shard views, each taken under
//!   that shard's root lock: exact at quiescence (no thread inside an
//!   operation), otherwise a sum of values taken at different instants, each
//!   consistent for its shard. The shard array itself is immutable after
//!   construction; each shard is cache-line padded so that two shards' root
//!   locks never share a line.

#![forbid(unsafe_code)]

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use crossbeam_utils::CachePadded;

use crate::api::{
    self, AddOutcome, CleanupOutcome, Counters, DelayedRefs, DestroyStats, FsShared, HeadOutcome, HeadSnapshot,
    RunMode, RunStats,
};
use crate::batch::{BatchIds, RunScope, run_batch};
use crate::domain::extent_op::ExtentOp;
use crate::domain::generic_ref::GenericRef;
use crate::domain::qgroup::QgroupRecord;
use crate::error::Result;
use crate::extent_tree::{ExtentInfo, ExtentTree};
use crate::locked::LockedRefs;
use crate::rsv::cell::LockedCell;
use crate::rsv::handle::TransHandle;

/// Shards of [`ShardedRefs`] made by [`DelayedRefs::new`] and
/// [`DelayedRefs::with_fs`] (see the module docs for the choice).
pub const DEFAULT_SHARDS: usize = 16;

/// The splitmix64 finalizer: every input bit affects every output bit.
fn mix(bytenr: u64) -> u64 {
    let mut x = bytenr;
    x ^= x >> 30;
    x = x.wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x ^= x >> 27;
    x = x.wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

/// The shard of `bytenr` among `n`: the high half of `mix(bytenr) · n`.
fn shard_index(bytenr: u64, n: usize) -> usize {
    ((u128::from(mix(bytenr)) * n as u128) >> 64) as usize
}

/// The locked port sharded by bytenr: N [`LockedRefs`] roots over one shared
/// fs state, heads routed by a hash of the bytenr, runs rotating over the
/// shards (see the module docs for what each operation means across shards,
/// and for the synchronization).
///
/// ```
/// use std::sync::Arc;
/// use delayed_refs::{Action, DelayedRefs, ExtentTree, FsConfig, FsShared, GenericRef, MemExtentTree, RunMode,
///     ShardedRefs, TransHandle};
///
/// let refs = ShardedRefs::with_shards(Arc::new(FsShared::new(FsConfig::default())), 4);
/// let tree = MemExtentTree::new();
/// let mut h = TransHandle::new();
/// for i in 0..32u64 {
///     let r = GenericRef::new(Action::AddExtent, (1 + i) << 20, 4096, 0, 5).data(5, 257, i, 0, false);
///     refs.add_data_ref(&mut h, &r, 4096).unwrap();
/// }
/// // Counters and snapshots are merged over the shards; snapshots by bytenr.
/// assert_eq!(refs.counters().num_heads, 32);
/// let snap = refs.snapshot();
/// assert!(snap.windows(2).all(|w| w[0].bytenr < w[1].bytenr));
/// // A Ready run runs the heads that were ready when it started.
/// assert_eq!(refs.run(&tree, RunMode::Ready).unwrap().heads, 32);
/// assert_eq!(tree.lookup(1 << 20).unwrap().refs, 1);
/// assert_eq!(refs.counters(), Default::default());
/// ```
#[derive(Debug)]
pub struct ShardedRefs {
    fs: Arc<FsShared<LockedCell>>,
    shards: Box<[CachePadded<LockedRefs>]>,
    /// Where the next rotation starts (a spreading hint, see the module docs).
    cursor: AtomicUsize,
    /// One run batch spans the shards a run visits.
    batches: BatchIds,
}

impl ShardedRefs {
    /// A root of `shards` locked-port shards over `fs`.
    ///
    /// # Panics
    ///
    /// If `shards` is 0.
    pub fn with_shards(fs: Arc<FsShared<LockedCell>>, shards: usize) -> Self {
        Self::with_shards_for(fs, shards, 0)
    }

    /// [`with_shards`](Self::with_shards) for transaction `transid`.
    pub fn with_shards_for(fs: Arc<FsShared<LockedCell>>, shards: usize, transid: u64) -> Self {
        assert!(shards >= 1, "ShardedRefs needs at least one shard");
        let shards = (0..shards).map(|_| CachePadded::new(LockedRefs::for_transaction(fs.clone(), transid))).collect();
        ShardedRefs { fs, shards, cursor: AtomicUsize::new(0), batches: BatchIds::new(transid) }
    }

    /// The number of shards.
    pub fn shard_count(&self) -> usize {
        self.shards.len()
    }

    /// The shard `bytenr` is routed to (`0..shard_count()`).
    pub fn shard_of(&self, bytenr: u64) -> usize {
        shard_index(bytenr, self.shards.len())
    }

    fn shard(&self, bytenr: u64) -> &LockedRefs {
        &self.shards[self.shard_of(bytenr)]
    }

    /// The first shard of the next rotation.
    fn rotation_start(&self) -> usize {
        // Relaxed: a hint that spreads runners; it orders nothing.
        self.cursor.fetch_add(1, Ordering::Relaxed) % self.shards.len()
    }

    /// `RunMode::Ready` across shards (see the module docs): every shard's
    /// ready count at the start is its budget.
    fn run_ready<B: ExtentTree + ?Sized>(&self, scope: &RunScope<'_, B>) -> Result<RunStats> {
        let n = self.shards.len();
        let mut budget: Vec<u64> = self.shards.iter().map(|s| s.counters().num_heads_ready).collect();
        let start = self.rotation_start();
        let mut stats = RunStats::default();
        while budget.iter().any(|&b| b > 0) {
            for k in 0..n {
                let i = (start + k) % n;
                if budget[i] == 0 {
                    continue;
                }
                match self.shards[i].run_one_in(scope)? {
                    Some((_, _, s)) => {
                        stats.absorb(&s);
                        budget[i] -= 1;
                    }
                    None => budget[i] = 0,
                }
            }
        }
        Ok(stats)
    }

    /// Select and run one head of some shard, round-robin across shards,
    /// inside `scope`'s hooks.
    fn run_one_in<B: ExtentTree + ?Sized>(
        &self,
        scope: &RunScope<'_, B>,
    ) -> Result<Option<(u64, HeadOutcome, RunStats)>> {
        let n = self.shards.len();
        let start = self.rotation_start();
        for k in 0..n {
            let i = (start + k) % n;
            if let Some(r) = self.shards[i].run_one_in(scope)? {
                if k > 0 {
                    // Past the shard that had work, as the port's cursor moves
                    // past the head it selected (Relaxed: a hint, see above).
                    self.cursor.store(i + 1, Ordering::Relaxed);
                }
                return Ok(Some(r));
            }
        }
        Ok(None)
    }

    /// Every shard's index is empty (each checked under its own lock, in turn).
    fn is_empty(&self) -> bool {
        self.shards.iter().all(|s| s.counters().num_heads == 0)
    }
}

impl DelayedRefs for ShardedRefs {
    type Cell = LockedCell;
    const NAME: &'static str = "sharded";

    fn for_transaction(fs: Arc<FsShared<LockedCell>>, transid: u64) -> Self {
        ShardedRefs::with_shards_for(fs, DEFAULT_SHARDS, transid)
    }

    fn transid(&self) -> u64 {
        self.batches.transid()
    }

    fn fs(&self) -> &Arc<FsShared<LockedCell>> {
        &self.fs
    }

    fn add_tree_ref(&self, trans: &mut TransHandle, gref: &GenericRef, op: Option<ExtentOp>) -> Result<AddOutcome> {
        self.shard(gref.bytenr).add_tree_ref(trans, gref, op)
    }

    fn add_data_ref(&self, trans: &mut TransHandle, gref: &GenericRef, reserved: u64) -> Result<AddOutcome> {
        self.shard(gref.bytenr).add_data_ref(trans, gref, reserved)
    }

    fn add_extent_op(&self, trans: &mut TransHandle, bytenr: u64, num_bytes: u64, op: ExtentOp) -> Result<()> {
        self.shard(bytenr).add_extent_op(trans, bytenr, num_bytes, op)
    }

    fn find_head(&self, bytenr: u64) -> Option<HeadSnapshot> {
        self.shard(bytenr).find_head(bytenr)
    }

    fn run_one<B: ExtentTree + ?Sized>(&self, backend: &B) -> Result<Option<(u64, HeadOutcome, RunStats)>> {
        run_batch(backend, self.batches.next(), |scope| self.run_one_in(scope))
    }

    fn run<B: ExtentTree + ?Sized>(&self, backend: &B, mode: RunMode) -> Result<RunStats> {
        run_batch(backend, self.batches.next(), |scope| match mode {
            RunMode::Ready => self.run_ready(scope),
            RunMode::Bytes(_) | RunMode::All => {
                api::drive_run(mode, 0, || Ok(self.run_one_in(scope)?.map(|(_, _, s)| s)), || self.is_empty())
            }
        })
    }

    fn lookup_extent_info<B: ExtentTree + ?Sized>(&self, backend: &B, bytenr: u64) -> Result<Option<ExtentInfo>> {
        self.shard(bytenr).lookup_extent_info(backend, bytenr)
    }

    fn check_ref_cleanup(&self, bytenr: u64) -> CleanupOutcome {
        self.shard(bytenr).check_ref_cleanup(bytenr)
    }

    fn destroy<B: ExtentTree + ?Sized>(&self, backend: &B) -> DestroyStats {
        let mut total = DestroyStats::default();
        for s in self.shards.iter() {
            let d = s.destroy(backend);
            total.heads += d.heads;
            total.nodes += d.nodes;
            total.pinned_bytes += d.pinned_bytes;
            total.pin_failures += d.pin_failures;
        }
        total
    }

    fn counters(&self) -> Counters {
        self.shards.iter().map(|s| s.counters()).fold(Counters::default(), |a, c| Counters {
            num_heads: a.num_heads + c.num_heads,
            num_heads_ready: a.num_heads_ready + c.num_heads_ready,
            num_entries: a.num_entries.wrapping_add(c.num_entries),
            pending_csums: a.pending_csums.wrapping_add(c.pending_csums),
        })
    }

    fn snapshot(&self) -> Vec<HeadSnapshot> {
        let mut v: Vec<HeadSnapshot> = self.shards.iter().flat_map(|s| s.snapshot()).collect();
        v.sort_unstable_by_key(|h| h.bytenr);
        v
    }

    fn qgroup_records(&self) -> Vec<QgroupRecord> {
        let mut v: Vec<QgroupRecord> = self.shards.iter().flat_map(|s| s.qgroup_records()).collect();
        v.sort_unstable_by_key(|r| r.bytenr);
        v
    }

    fn reclaim(&self) {
        for s in self.shards.iter() {
            s.reclaim();
        }
    }

    fn release_thread(&self) {
        for s in self.shards.iter() {
            s.release_thread();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::FsConfig;

    #[test]
    fn routing_is_in_range_and_spreads_aligned_bytenrs() {
        for n in [1usize, 2, 3, 7, 16, 64] {
            let mut hits = vec![0u32; n];
            for i in 0..4096u64 {
                let s = shard_index((1 << 30) + i * 4096, n);
                assert!(s < n, "shard {s} of {n}");
                hits[s] += 1;
            }
            // 4096 adjacent sector-aligned extents: every shard gets at least
            // half its fair share (a plain modulo or a shift would not).
            let fair = 4096 / n as u32;
            assert!(hits.iter().all(|&h| h >= fair / 2), "{n} shards: {hits:?}");
        }
        let refs = ShardedRefs::new(FsConfig::default());
        assert_eq!(refs.shard_count(), DEFAULT_SHARDS);
        assert_eq!(refs.shard_of(1 << 20), shard_index(1 << 20, DEFAULT_SHARDS));
    }

    /// A backend that queues a new head in `target` shard before every ref
    /// it applies, as a COW of the extent tree queues refs mid-run.
    struct Adding<'a> {
        refs: &'a ShardedRefs,
        inner: crate::MemExtentTree,
        fresh: std::sync::Mutex<Vec<u64>>,
        trans: std::sync::Mutex<TransHandle>,
    }

    impl ExtentTree for Adding<'_> {
        fn apply_ref(&self, run: &crate::RefRun<'_>) -> std::result::Result<(), crate::ExtentError> {
            if let Some(b) = self.fresh.lock().unwrap().pop() {
                let g = data_ref(b);
                self.refs.add_data_ref(&mut self.trans.lock().unwrap(), &g, 4096).unwrap();
            }
            self.inner.apply_ref(run)
        }

        fn apply_extent_op(&self, run: &crate::OpRun<'_>) -> std::result::Result<(), crate::ExtentError> {
            self.inner.apply_extent_op(run)
        }

        fn pin_reserved(&self, pin: &crate::Pin) -> std::result::Result<(), crate::ExtentError> {
            self.inner.pin_reserved(pin)
        }

        fn lookup(&self, bytenr: u64) -> std::result::Result<Option<ExtentInfo>, crate::ExtentError> {
            ExtentTree::lookup(&self.inner, bytenr)
        }
    }

    fn data_ref(bytenr: u64) -> GenericRef {
        GenericRef::new(crate::Action::AddExtent, bytenr, 4096, 0, 5).data(5, 257, 0, 0, false)
    }

    /// `n` sector-aligned bytenrs routed to shard `shard` of `refs`, from `from` up.
    fn bytenrs_in(refs: &ShardedRefs, shard: usize, from: u64, n: usize) -> Vec<u64> {
        (0u64..).map(|i| from + i * 4096).filter(|&b| refs.shard_of(b) == shard).take(n).collect()
    }

    /// A Ready run runs at most each shard's ready count at its start, and
    /// nothing in a shard that had no ready head then, even when every ref
    /// it applies queues a new head (here in an empty shard, and in the
    /// shard being run, above the heads it had).
    #[test]
    fn ready_does_not_run_heads_added_after_the_start() {
        let refs = ShardedRefs::with_shards(Arc::new(FsShared::new(FsConfig::default())), 4);
        let old = bytenrs_in(&refs, 0, 1 << 30, 8);
        // Added in this order, alternating between the empty shard 1 and
        // shard 0 (above its old heads); the backend pops from the end.
        let (empty, run) = (bytenrs_in(&refs, 1, 1 << 30, 8), bytenrs_in(&refs, 0, 1 << 40, 8));
        let fresh: Vec<u64> = empty.iter().zip(&run).flat_map(|(a, b)| [*a, *b]).collect();
        let backend = Adding {
            refs: &refs,
            inner: crate::MemExtentTree::new(),
            fresh: std::sync::Mutex::new(fresh.iter().rev().copied().collect()),
            trans: std::sync::Mutex::new(TransHandle::new()),
        };
        let mut h = TransHandle::new();
        for &b in &old {
            refs.add_data_ref(&mut h, &data_ref(b), 4096).unwrap();
        }
        let st = refs.run(&backend, RunMode::Ready).unwrap();
        assert_eq!(st.heads, old.len() as u64, "as many heads as were ready at the start");
        let added = &fresh[..old.len()];
        assert!(added.iter().all(|&b| refs.find_head(b).is_some()), "no head added after the start ran");
        assert_eq!(refs.counters().num_heads, old.len() as u64, "every ref run queued one new head");
        assert!(old.iter().all(|&b| refs.find_head(b).is_none()), "every old head ran");
        // The new heads run on the next call.
        assert!(backend.fresh.lock().unwrap().len() == fresh.len() - old.len());
        let st = refs.run(&backend, RunMode::All).unwrap();
        assert_eq!(st.heads, fresh.len() as u64);
        assert_eq!(refs.counters(), Counters::default());
    }

    /// `Bytes(n)` stops once the estimate reaches `n`; `run_one` visits the
    /// shards in turn, so a head that stays ready (held back) does not keep
    /// the others from running.
    #[test]
    fn bytes_goal_and_rotation() {
        let refs = ShardedRefs::with_shards(Arc::new(FsShared::new(FsConfig::default())), 4);
        let tree = crate::MemExtentTree::new();
        let mut h = TransHandle::new();
        let bytenrs: Vec<u64> = (0..4).flat_map(|s| bytenrs_in(&refs, s, 1 << 30, 3)).collect();
        for &b in &bytenrs {
            refs.add_data_ref(&mut h, &data_ref(b), 4096).unwrap();
        }
        let one = refs.fs().reserves.geometry().delayed_ref_bytes(1);
        let st = refs.run(&tree, RunMode::Bytes(3 * one)).unwrap();
        assert_eq!((st.heads, st.refs), (3, 3), "one ref per head: three heads reach 3 C(1)");
        // One runner alone: four run_one calls visit the four shards.
        let mut shards: Vec<usize> =
            (0..4).map(|_| refs.shard_of(refs.run_one(&tree).unwrap().expect("heads left").0)).collect();
        shards.sort_unstable();
        shards.dedup();
        assert_eq!(shards.len(), 4, "one head from each shard");
        refs.run(&tree, RunMode::All).unwrap();
        assert_eq!(tree.len(), bytenrs.len());
        assert_eq!(refs.counters(), Counters::default());
    }

    #[test]
    #[should_panic(expected = "at least one shard")]
    fn zero_shards_is_refused() {
        let _ = ShardedRefs::with_shards(Arc::new(FsShared::new(FsConfig::default())), 0);
    }
}
