//! Pure transitions of block reserves and space info (semantics.md §8).
//!
//! Every rule of §8 is a function from one snapshot to the next plus an
//! output. Both implementations apply the same functions: the locked port
//! under a mutex, the lock-free one in a CAS loop over one 128-bit word, so
//! each transition is atomic over `(size, reserved)` (lock L5) and `full` is
//! always derived from the snapshot it describes.

#![forbid(unsafe_code)]

/// A block reserve's `(size, reserved)` pair. `size` uses wrapping arithmetic:
/// it may transiently wrap below zero (semantics.md §11.12).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct RsvState {
    /// Target size of the reserve.
    pub size: u64,
    /// Bytes actually held (also counted in the space info's `bytes_may_use`).
    pub reserved: u64,
}

impl RsvState {
    /// `full`, derived: the reserve holds at least its size.
    pub fn full(&self) -> bool {
        self.reserved >= self.size
    }

    /// Bytes missing to be full (0 when full or when `size` has wrapped).
    pub fn gap(&self) -> u64 {
        if self.size as i64 >= 0 { self.size.saturating_sub(self.reserved) } else { 0 }
    }

    /// `block_rsv_release_bytes` (semantics.md §8.2 step 2): shrink `size` by `n`
    /// (`u64::MAX` = everything), clamp `reserved`, return the excess.
    pub fn release(self, n: u64) -> (RsvState, u64) {
        let n = if n == u64::MAX { self.size } else { n };
        let size = self.size.wrapping_sub(n);
        if (size as i64) >= 0 && self.reserved >= size {
            (RsvState { size, reserved: size }, self.reserved - size)
        } else {
            (RsvState { size, reserved: self.reserved }, 0)
        }
    }

    /// Grow by `n` bytes of size of which `take` are backed (semantics.md §8.3
    /// step 3); returns the excess. A grow that brings a wrapped `size` back
    /// (a runner released the node's bytes before its adder grew them,
    /// §11.12) can leave `reserved` above `size`; it clamps and returns the
    /// difference exactly as the release would have done in the other
    /// order, so `reserved <= size` holds at quiescence (invariant 22). The
    /// kernel leaves that excess in place until the next release.
    pub fn grow(self, n: u64, take: u64) -> (RsvState, u64) {
        let size = self.size.wrapping_add(n);
        let reserved = self.reserved.wrapping_add(take);
        if (size as i64) >= 0 && reserved > size {
            (RsvState { size, reserved: size }, reserved - size)
        } else {
            (RsvState { size, reserved }, 0)
        }
    }

    /// Take up to `n` backed bytes out (semantics.md §8.3 step 2); returns the amount.
    pub fn take(self, n: u64) -> (RsvState, u64) {
        let t = n.min(self.reserved);
        (RsvState { size: self.size, reserved: self.reserved - t }, t)
    }

    /// Top up from released excess (semantics.md §8.2): adds at most the gap;
    /// returns what did not fit. A full reserve takes nothing.
    pub fn top_up(self, bytes: u64) -> (RsvState, u64) {
        let give = bytes.min(self.gap());
        (RsvState { size: self.size, reserved: self.reserved + give }, bytes - give)
    }

    /// Refill step 1 (semantics.md §8.7): how much to ask space info for.
    pub fn refill_want(self, limit: u64) -> u64 {
        self.gap().min(limit)
    }

    /// Refill step 4, the re-check (semantics.md §8.7, §11.3): apply `want`
    /// reserved bytes against the gap *now*; return the surplus to free.
    pub fn refill_apply(self, want: u64) -> (RsvState, u64) {
        self.top_up(want)
    }

    /// `btrfs_migrate_to_delayed_refs_rsv` (semantics.md §8.6); returns bytes to free.
    pub fn migrate(self, n: u64) -> (RsvState, u64) {
        self.top_up(n)
    }

    /// Consume `n` backed bytes (`use_bytes`, semantics.md §8.9); `None` if short.
    pub fn use_bytes(self, n: u64) -> Option<RsvState> {
        (self.reserved >= n).then(|| RsvState { size: self.size, reserved: self.reserved - n })
    }
}

/// The space info counters that change: `(used, bytes_may_use)`; `total` is
/// fixed per space info.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct SpaceState {
    /// Bytes used by allocated extents.
    pub used: u64,
    /// Bytes promised to reserves (`bytes_may_use`).
    pub may_use: u64,
}

/// How hard a reservation may try (semantics.md §8.8). Without a reclaim engine in
/// this crate, every mode but `Emergency` succeeds iff the bytes fit.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum FlushMode {
    /// Fail at once if the bytes do not fit.
    NoFlush,
    /// May flush (here: same as `NoFlush`, there is nothing to flush).
    FlushAll,
    /// Fits iff `n <= total - used`, ignoring `bytes_may_use`.
    Emergency,
}

impl SpaceState {
    /// Try to reserve `n` bytes (semantics.md §8.8).
    pub fn reserve(self, total: u64, n: u64, mode: FlushMode) -> Option<SpaceState> {
        let committed = match mode {
            FlushMode::Emergency => self.used,
            FlushMode::NoFlush | FlushMode::FlushAll => self.used.checked_add(self.may_use)?,
        };
        (committed.checked_add(n)? <= total).then(|| SpaceState { used: self.used, may_use: self.may_use + n })
    }

    /// Return `n` bytes of `bytes_may_use`; `None` on underflow.
    pub fn free(self, n: u64) -> Option<SpaceState> {
        Some(SpaceState { used: self.used, may_use: self.may_use.checked_sub(n)? })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn release_clamps_and_returns_excess() {
        let s = RsvState { size: 100, reserved: 80 };
        let (n, ex) = s.release(30);
        assert_eq!((n, ex), (RsvState { size: 70, reserved: 70 }, 10));
        assert!(n.full());
        let (n, ex) = s.release(10);
        assert_eq!((n, ex), (RsvState { size: 90, reserved: 80 }, 0));
        assert!(!n.full());
        let (n, ex) = s.release(u64::MAX);
        assert_eq!((n, ex), (RsvState { size: 0, reserved: 0 }, 80));
    }

    #[test]
    fn size_wraps_and_recovers() {
        // Spec §11.12: a runner's release may precede the adder's grow.
        let s = RsvState { size: 0, reserved: 0 };
        let (w, ex) = s.release(64);
        assert_eq!(ex, 0);
        assert_eq!(w.size, 0u64.wrapping_sub(64));
        assert!(!w.full(), "a wrapped size is not full");
        assert_eq!(w.gap(), 0, "nothing to refill while wrapped");
        let back = w.grow(64, 0);
        assert_eq!(back, (RsvState { size: 0, reserved: 0 }, 0));
        // The adder's grow brings backed bytes: they are excess once the
        // size is back, and leave in the same transition (invariant 22).
        let s = RsvState { size: 0, reserved: 10 };
        let (w, _) = s.release(64);
        assert_eq!(w, RsvState { size: 0u64.wrapping_sub(64), reserved: 10 });
        assert_eq!(w.grow(64, 64), (RsvState { size: 0, reserved: 0 }, 74));
        assert_eq!(w.grow(100, 20), (RsvState { size: 36, reserved: 30 }, 0));
    }

    #[test]
    fn refill_recheck_returns_surplus() {
        // Spec §11.3: two refillers saw the same gap of 50.
        let s = RsvState { size: 100, reserved: 50 };
        assert_eq!(s.refill_want(1000), 50);
        assert_eq!(s.refill_want(20), 20);
        let (a, free_a) = s.refill_apply(50);
        assert_eq!((a.reserved, free_a), (100, 0));
        let (b, free_b) = a.refill_apply(50);
        assert_eq!((b.reserved, free_b), (100, 50));
        assert!(b.reserved <= b.size, "invariant 24");
    }

    #[test]
    fn take_top_up_use() {
        let s = RsvState { size: 10, reserved: 4 };
        assert_eq!(s.take(9), (RsvState { size: 10, reserved: 0 }, 4));
        assert_eq!(s.top_up(9), (RsvState { size: 10, reserved: 10 }, 3));
        assert_eq!(s.use_bytes(5), None);
        assert_eq!(s.use_bytes(4), Some(RsvState { size: 10, reserved: 0 }));
        assert_eq!(s.migrate(2), (RsvState { size: 10, reserved: 6 }, 0));
    }

    #[test]
    fn space_reserve_modes() {
        let s = SpaceState { used: 50, may_use: 40 };
        assert!(s.reserve(100, 10, FlushMode::NoFlush).is_some());
        assert!(s.reserve(100, 11, FlushMode::FlushAll).is_none());
        assert!(s.reserve(100, 50, FlushMode::Emergency).is_some());
        assert!(s.reserve(100, 51, FlushMode::Emergency).is_none());
        assert!(s.free(41).is_none());
        assert_eq!(s.free(40).unwrap().may_use, 0);
    }
}
