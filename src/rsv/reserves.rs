//! The delayed-refs block reserve, the global reserve and the metadata space
//! info with the rules of semantics.md §8, over any [`PairCell`].
//!
//! # Implementation details
//!
//! Each reserve and the space info is one [`PairCell`]; every rule is a pure
//! transition from [`super::state`]. Multi-cell operations (update = take from
//! the handle's local reserve then grow the delayed-refs reserve; release =
//! shrink then route the excess) are sequences of single-cell transitions,
//! exactly as the kernel takes one leaf lock at a time (L5, L6). Between
//! cells, bytes are always accounted in `bytes_may_use`, so invariant 23
//! (Σ reserved ≤ bytes_may_use) holds at every step.

#![forbid(unsafe_code)]

use super::cell::PairCell;
use super::handle::TransHandle;
use super::state::{FlushMode, RsvState, SpaceState};
use crate::domain::geometry::Geometry;
use crate::error::{Error, Result};

/// Block reserve types that decide where released excess goes (semantics.md §8.2).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum RsvType {
    /// The fs-wide delayed refs reserve (`DELREFS`).
    DelayedRefs,
    /// The global reserve.
    Global,
    /// Delayed items / per-handle reserve in v6.8 (`DELOPS`).
    DelayedOps,
}

/// Release routing rule (semantics.md §11.4): the v6.8 behaviour or the later fix.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum ReleaseRouting {
    /// v6.8: `DELOPS` excess (incl. per-handle reserves) goes to the global
    /// reserve; the delayed refs reserve's own excess goes to space info.
    #[default]
    V6_8,
    /// 2155d0c0a761: per-handle reserves are `DELREFS`; `DELREFS` excess goes
    /// to the global reserve, the rest tops up the delayed refs reserve.
    Fixed,
}

/// Configuration of the fs-wide reserves.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ReserveConfig {
    /// Size formulas.
    pub geometry: Geometry,
    /// Release routing rule.
    pub routing: ReleaseRouting,
    /// Total bytes of the metadata space info.
    pub space_total: u64,
    /// Size of the global reserve (filled at creation if it fits).
    pub global_size: u64,
}

impl Default for ReserveConfig {
    /// Default geometry, v6.8 routing, 1 PiB of metadata space, 512 MiB global reserve.
    fn default() -> Self {
        ReserveConfig {
            geometry: Geometry::default(),
            routing: ReleaseRouting::V6_8,
            space_total: 1 << 50,
            global_size: 512 << 20,
        }
    }
}

/// One block reserve.
#[derive(Debug)]
pub struct BlockRsv<C> {
    cell: C,
    ty: RsvType,
}

impl<C: PairCell> BlockRsv<C> {
    fn new(ty: RsvType, s: RsvState) -> Self {
        BlockRsv { cell: C::new((s.size, s.reserved)), ty }
    }

    /// The reserve's type.
    pub fn rsv_type(&self) -> RsvType {
        self.ty
    }

    /// A snapshot of `(size, reserved)`; `full` is [`RsvState::full`].
    pub fn state(&self) -> RsvState {
        let (size, reserved) = self.cell.load();
        RsvState { size, reserved }
    }

    /// Apply one transition atomically.
    pub fn apply<R>(&self, mut f: impl FnMut(RsvState) -> (RsvState, R)) -> R {
        self.cell.transition(|(size, reserved)| {
            let (n, r) = f(RsvState { size, reserved });
            ((n.size, n.reserved), r)
        })
    }
}

/// The metadata space info: `total` fixed, `(used, bytes_may_use)` in a cell.
#[derive(Debug)]
pub struct SpaceInfo<C> {
    total: u64,
    cell: C,
}

impl<C: PairCell> SpaceInfo<C> {
    /// Total bytes.
    pub fn total(&self) -> u64 {
        self.total
    }

    /// A snapshot.
    pub fn state(&self) -> SpaceState {
        let (used, may_use) = self.cell.load();
        SpaceState { used, may_use }
    }

    /// Reserve `n` bytes into `bytes_may_use` (semantics.md §8.8).
    pub fn reserve(&self, n: u64, mode: FlushMode) -> Result<()> {
        let total = self.total;
        self.cell.transition(|(used, may_use)| match (SpaceState { used, may_use }).reserve(total, n, mode) {
            Some(s) => ((s.used, s.may_use), Ok(())),
            None => ((used, may_use), Err(Error::NoSpace { wanted: n })),
        })
    }

    /// Return `n` bytes of `bytes_may_use`.
    pub fn free(&self, n: u64) -> Result<()> {
        if n == 0 {
            return Ok(());
        }
        self.cell.transition(|(used, may_use)| match (SpaceState { used, may_use }).free(n) {
            Some(s) => ((s.used, s.may_use), Ok(())),
            None => ((used, may_use), Err(Error::RsvUnderflow { what: "bytes_may_use", have: may_use, want: n })),
        })
    }
}

/// A snapshot of every reserve, for tests and reports.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ReservesSnapshot {
    /// The delayed refs reserve.
    pub delayed_refs: RsvState,
    /// The global reserve.
    pub global: RsvState,
    /// The metadata space info.
    pub space: SpaceState,
}

/// The fs-wide reserves the delayed-ref subsystem uses (semantics.md §2.7).
///
/// ```
/// use delayed_refs::{FlushMode, FsReserves, LockedCell, ReserveConfig};
/// let r: FsReserves<LockedCell> = FsReserves::new(ReserveConfig::default());
/// let mut h = r.start_transaction(2, FlushMode::FlushAll).unwrap();
/// h.delayed_ref_updates = 1; // as if one add queued a new node
/// r.update_delayed_refs_rsv(&mut h);
/// assert_eq!(r.snapshot().delayed_refs.size, r.geometry().delayed_ref_bytes(1));
/// r.delayed_refs_rsv_release(1, 0); // the node ran
/// r.end_transaction(h).unwrap();
/// assert_eq!(r.snapshot().delayed_refs.size, 0);
/// ```
#[derive(Debug)]
pub struct FsReserves<C> {
    config: ReserveConfig,
    /// The delayed refs reserve (`DELREFS`).
    pub delayed_refs: BlockRsv<C>,
    /// The global reserve.
    pub global: BlockRsv<C>,
    /// The metadata space info.
    pub space: SpaceInfo<C>,
}

impl<C: PairCell> FsReserves<C> {
    /// New reserves; the global reserve is filled if the space allows.
    pub fn new(config: ReserveConfig) -> Self {
        let global_reserved = if config.global_size <= config.space_total { config.global_size } else { 0 };
        FsReserves {
            config,
            delayed_refs: BlockRsv::new(RsvType::DelayedRefs, RsvState::default()),
            global: BlockRsv::new(RsvType::Global, RsvState { size: config.global_size, reserved: global_reserved }),
            space: SpaceInfo { total: config.space_total, cell: C::new((0, global_reserved)) },
        }
    }

    /// The configuration.
    pub fn config(&self) -> &ReserveConfig {
        &self.config
    }

    /// The size formulas.
    pub fn geometry(&self) -> &Geometry {
        &self.config.geometry
    }

    /// A snapshot of all reserves (not atomic across cells).
    pub fn snapshot(&self) -> ReservesSnapshot {
        ReservesSnapshot {
            delayed_refs: self.delayed_refs.state(),
            global: self.global.state(),
            space: self.space.state(),
        }
    }

    /// The type a per-handle reserve has under the configured routing.
    pub fn local_rsv_type(&self) -> RsvType {
        match self.config.routing {
            ReleaseRouting::V6_8 => RsvType::DelayedOps,
            ReleaseRouting::Fixed => RsvType::DelayedRefs,
        }
    }

    /// Send released excess of a reserve of type `ty` (not the global one)
    /// where the routing rule says (semantics.md §8.2 step 2, §11.4); what the
    /// target cannot take goes back to space info.
    fn route_excess(&self, ty: RsvType, excess: u64) {
        if excess == 0 {
            return;
        }
        let target = match (self.config.routing, ty) {
            (ReleaseRouting::V6_8, RsvType::DelayedOps) => &self.global,
            // The delayed refs reserve is its own target and is full after
            // its clamp: `top_up` gives it nothing, so all goes to space info.
            (ReleaseRouting::V6_8, _) => &self.delayed_refs,
            (ReleaseRouting::Fixed, RsvType::DelayedRefs) => &self.global,
            (ReleaseRouting::Fixed, _) => &self.delayed_refs,
        };
        let rest = target.apply(|s| s.top_up(excess));
        // Bytes leaving every reserve go back to bytes_may_use's owner; they
        // were counted there, so this cannot underflow.
        let _ = self.space.free(rest);
    }

    /// `btrfs_block_rsv_release` of the delayed refs reserve: shrink by `n`,
    /// route the excess; returns the excess (semantics.md §8.2).
    pub fn release_delayed_refs_bytes(&self, n: u64) -> u64 {
        let excess = self.delayed_refs.apply(|s| s.release(n));
        self.route_excess(RsvType::DelayedRefs, excess);
        excess
    }

    /// `btrfs_delayed_refs_rsv_release(nr_refs, nr_csums)`: release
    /// `C(nr_refs) + K(nr_csums)` (semantics.md §8.2). Returns the bytes released
    /// from `size` (what the runner counts as progress).
    pub fn delayed_refs_rsv_release(&self, nr_refs: u64, nr_csums: u64) -> u64 {
        let g = self.geometry();
        let n = g.delayed_ref_bytes(nr_refs).wrapping_add(g.csum_bytes(nr_csums));
        if n != 0 {
            self.release_delayed_refs_bytes(n);
        }
        n
    }

    /// `btrfs_update_delayed_refs_rsv` (semantics.md §8.3): move the handle's
    /// pending node and csum counts into the delayed refs reserve, backed by
    /// the handle's local reserve as far as it goes.
    pub fn update_delayed_refs_rsv(&self, h: &mut TransHandle) {
        let g = self.geometry();
        let n = g.delayed_ref_bytes(h.delayed_ref_updates).wrapping_add(g.csum_bytes(h.delayed_ref_csum_deletions));
        h.delayed_ref_updates = 0;
        h.delayed_ref_csum_deletions = 0;
        if n == 0 {
            return;
        }
        let (local, take) = h.local.take(n);
        h.local = local;
        self.grow_delayed_refs(n, take);
    }

    /// Grow the delayed refs reserve by `n`, `take` of it backed, and route
    /// the excess a grow past a wrapped size leaves (`RsvState::grow`).
    pub fn grow_delayed_refs(&self, n: u64, take: u64) {
        let excess = self.delayed_refs.apply(|s| s.grow(n, take));
        self.route_excess(RsvType::DelayedRefs, excess);
    }

    /// `btrfs_delayed_refs_rsv_refill` (semantics.md §8.7) with the re-check of §11.3.
    pub fn refill(&self, mode: FlushMode) -> Result<()> {
        let limit = self.geometry().delayed_ref_bytes(1);
        let want = self.delayed_refs.state().refill_want(limit);
        if want == 0 {
            return Ok(());
        }
        self.space.reserve(want, mode)?;
        let surplus = self.delayed_refs.apply(|s| s.refill_apply(want));
        let _ = self.space.free(surplus);
        Ok(())
    }

    /// `btrfs_migrate_to_delayed_refs_rsv` (semantics.md §8.6): `n` bytes already
    /// in `bytes_may_use` move in up to the gap; the rest is freed.
    pub fn migrate(&self, n: u64) {
        let free = self.delayed_refs.apply(|s| s.migrate(n));
        let _ = self.space.free(free);
    }

    /// `btrfs_inc_delayed_refs_rsv_bg_inserts` (semantics.md §8.4).
    pub fn inc_bg_inserts(&self) {
        self.grow_delayed_refs(self.geometry().insert_metadata_size(1), 0);
    }

    /// `btrfs_dec_delayed_refs_rsv_bg_inserts` (semantics.md §8.4).
    pub fn dec_bg_inserts(&self) {
        self.release_delayed_refs_bytes(self.geometry().insert_metadata_size(1));
    }

    /// `btrfs_inc_delayed_refs_rsv_bg_updates` (semantics.md §8.5).
    pub fn inc_bg_updates(&self) {
        self.grow_delayed_refs(self.geometry().metadata_size(1), 0);
    }

    /// `btrfs_dec_delayed_refs_rsv_bg_updates` (semantics.md §8.5).
    pub fn dec_bg_updates(&self) {
        self.release_delayed_refs_bytes(self.geometry().metadata_size(1));
    }

    /// `btrfs_check_space_for_delayed_refs` (semantics.md §8.1): true if over budget.
    pub fn check_space_for_delayed_refs(&self) -> bool {
        let g = self.global.state().reserved;
        let d = self.delayed_refs.state();
        d.size as i64 >= 0 && d.size >= g.saturating_add(d.reserved)
    }

    /// Start a handle (semantics.md §8.10): `I(n)` for the transaction reserve plus
    /// `C(n)` for delayed refs in one reservation; `n == 0` refills instead
    /// (with `FlushAll`).
    pub fn start_transaction(&self, num_items: u64, mode: FlushMode) -> Result<TransHandle> {
        let g = self.geometry();
        let mut h = TransHandle::default();
        if num_items == 0 {
            if mode == FlushMode::FlushAll && !self.delayed_refs.state().full() {
                self.refill(mode)?;
            }
            return Ok(h);
        }
        let trans = g.insert_metadata_size(num_items);
        let delayed = g.delayed_ref_bytes(num_items);
        self.space.reserve(trans.saturating_add(delayed), mode)?;
        h.trans_bytes = trans;
        h.local = RsvState { size: delayed, reserved: delayed };
        h.delayed_refs_bytes_reserved = delayed;
        Ok(h)
    }

    /// End a handle (`btrfs_trans_release_metadata`, semantics.md §8.10): return
    /// the transaction reserve and release the local reserve, whose unused
    /// bytes are routed by type (§11.4). Pending counts are flushed first.
    pub fn end_transaction(&self, mut h: TransHandle) -> Result<()> {
        self.update_delayed_refs_rsv(&mut h);
        self.space.free(h.trans_bytes)?;
        h.trans_bytes = 0;
        let (_local, excess) = h.local.release(h.delayed_refs_bytes_reserved);
        self.route_excess(self.local_rsv_type(), excess);
        Ok(())
    }

    /// Consume `n` bytes for a COW while running refs (semantics.md §8.9): the
    /// delayed refs reserve, else fresh space, else the global reserve, else
    /// the emergency reserve, else `NoSpace`. The bytes become `used`.
    pub fn use_block_rsv(&self, n: u64) -> Result<()> {
        let from_rsv = |r: &BlockRsv<C>| {
            r.apply(|s| match s.use_bytes(n) {
                Some(ns) => (ns, true),
                None => (s, false),
            })
        };
        let taken = from_rsv(&self.delayed_refs)
            || self.space.reserve(n, FlushMode::NoFlush).is_ok()
            || from_rsv(&self.global)
            || self.space.reserve(n, FlushMode::Emergency).is_ok();
        if !taken {
            return Err(Error::NoSpace { wanted: n });
        }
        self.space.cell.transition(|(used, may_use)| ((used + n, may_use.saturating_sub(n)), ()));
        Ok(())
    }
}
