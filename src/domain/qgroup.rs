//! Qgroup extent records: at most one per bytenr per transaction (semantics.md §2.8, §9).

#![forbid(unsafe_code)]

/// A qgroup extent record (`btrfs_qgroup_extent_record`, without `old_roots`,
/// which belongs to backref walking and is outside this crate).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct QgroupRecord {
    /// Extent start.
    pub bytenr: u64,
    /// Extent length.
    pub num_bytes: u64,
    /// Qgroup data reservation to free at commit.
    pub data_rsv: u64,
    /// Root the data reservation belongs to.
    pub data_rsv_refroot: u64,
}

impl QgroupRecord {
    /// Build the record an add would insert (semantics.md §4.4 step 4).
    pub fn new(bytenr: u64, num_bytes: u64, ref_root: u64, reserved: u64) -> Self {
        let (data_rsv, data_rsv_refroot) = if ref_root != 0 && reserved != 0 { (reserved, ref_root) } else { (0, 0) };
        QgroupRecord { bytenr, num_bytes, data_rsv, data_rsv_refroot }
    }

    /// Fold a duplicate into the existing record (semantics.md §9): the
    /// reservation is copied only when the existing record has none.
    pub fn absorb(&mut self, dup: &QgroupRecord) {
        if dup.data_rsv != 0 && self.data_rsv == 0 {
            self.data_rsv = dup.data_rsv;
            self.data_rsv_refroot = dup.data_rsv_refroot;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn absorb_copies_reservation_once() {
        let mut r = QgroupRecord::new(1, 2, 5, 0);
        assert_eq!(r.data_rsv, 0);
        r.absorb(&QgroupRecord::new(1, 2, 256, 4096));
        assert_eq!((r.data_rsv, r.data_rsv_refroot), (4096, 256));
        r.absorb(&QgroupRecord::new(1, 2, 257, 8192));
        assert_eq!((r.data_rsv, r.data_rsv_refroot), (4096, 256));
        assert_eq!(QgroupRecord::new(1, 2, 0, 9).data_rsv, 0);
    }
}
