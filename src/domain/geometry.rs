//! Reservation size formulas C, K, L, I, M for a configurable geometry (semantics.md §1.2).

#![forbid(unsafe_code)]

/// `BTRFS_MAX_LEVEL`.
pub const MAX_LEVEL: u64 = 8;
/// Size of a leaf header (semantics.md §1.2: 101 bytes).
pub const LEAF_HEADER: u64 = 101;
/// Size of an item header (semantics.md §1.2: 25 bytes).
pub const ITEM_HEADER: u64 = 25;

/// Filesystem geometry the formulas depend on.
///
/// ```
/// use delayed_refs::Geometry;
/// let g = Geometry { nodesize: 16384, sectorsize: 4096, csum_size: 4, free_space_tree: true };
/// assert_eq!(g.delayed_ref_bytes(1), 512 * 1024); // C(1)
/// assert_eq!(g.csum_leaves(128 * 1024), 1);       // L(128 KiB)
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Geometry {
    /// Tree node size `NS` in bytes.
    pub nodesize: u32,
    /// Data sector size in bytes (a power of two).
    pub sectorsize: u32,
    /// Checksum size in bytes (crc32c: 4).
    pub csum_size: u32,
    /// The free-space tree mount option (doubles `C`).
    pub free_space_tree: bool,
}

impl Default for Geometry {
    /// 16 KiB nodes, 4 KiB sectors, crc32c, free-space tree on.
    fn default() -> Self {
        Geometry { nodesize: 16384, sectorsize: 4096, csum_size: 4, free_space_tree: true }
    }
}

impl Geometry {
    /// `I(n)`: bytes to insert `n` items (`NS * MAXL * 2 * n`).
    pub fn insert_metadata_size(&self, n: u64) -> u64 {
        (self.nodesize as u64).wrapping_mul(MAX_LEVEL * 2).wrapping_mul(n)
    }

    /// `M(n)`: bytes to modify `n` items (`NS * MAXL * n`).
    pub fn metadata_size(&self, n: u64) -> u64 {
        (self.nodesize as u64).wrapping_mul(MAX_LEVEL).wrapping_mul(n)
    }

    /// `C(n)`: delayed-ref reservation for `n` nodes (`I(n)`, doubled with the
    /// free-space tree).
    pub fn delayed_ref_bytes(&self, n: u64) -> u64 {
        let i = self.insert_metadata_size(n);
        if self.free_space_tree { i.wrapping_mul(2) } else { i }
    }

    /// `K(n)`: reservation for deleting `n` csum leaves (`M(n)`).
    pub fn csum_bytes(&self, n: u64) -> u64 {
        self.metadata_size(n)
    }

    /// Checksums that fit one leaf.
    pub fn csums_per_leaf(&self) -> u64 {
        ((self.nodesize as u64).saturating_sub(LEAF_HEADER + ITEM_HEADER) / self.csum_size.max(1) as u64).max(1)
    }

    /// `L(b)`: csum leaves covering `b` bytes of data.
    pub fn csum_leaves(&self, bytes: u64) -> u64 {
        let sectors = bytes >> self.sectorsize.max(1).trailing_zeros();
        sectors.div_ceil(self.csums_per_leaf())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn worked_numbers_of_semantics_1_2() {
        let g = Geometry::default();
        assert_eq!(g.delayed_ref_bytes(1), 512 * 1024);
        assert_eq!(g.csum_bytes(1), 128 * 1024);
        assert_eq!(g.csum_leaves(128 * 1024), 1);
        assert_eq!(g.csum_bytes(g.csum_leaves(128 * 1024)), 128 * 1024);
        assert_eq!(g.insert_metadata_size(3), 3 * 16384 * 16);
        assert_eq!(g.metadata_size(2), 2 * 16384 * 8);
    }

    #[test]
    fn without_free_space_tree_and_small_nodes() {
        let g = Geometry { nodesize: 4096, sectorsize: 4096, csum_size: 4, free_space_tree: false };
        assert_eq!(g.delayed_ref_bytes(1), 4096 * 16);
        assert_eq!(g.csums_per_leaf(), (4096 - 126) / 4);
        assert_eq!(g.csum_leaves(0), 0);
        assert_eq!(g.csum_leaves(4096), 1);
        assert_eq!(g.csum_leaves(4096 * 992), 1);
        assert_eq!(g.csum_leaves(4096 * 993), 2);
    }
}
