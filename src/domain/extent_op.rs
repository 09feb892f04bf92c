//! Extent ops: pending in-place edits of an extent item (semantics.md §2.3, §4.6 step 4).

#![forbid(unsafe_code)]

/// A disk key written into a non-skinny tree block's info.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct DiskKey {
    /// Object id.
    pub objectid: u64,
    /// Key type.
    pub item_type: u8,
    /// Offset.
    pub offset: u64,
}

/// A pending edit of an extent item (semantics.md §2.3). Only metadata heads carry one.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct ExtentOp {
    /// Key to write when `update_key` is set.
    pub key: DiskKey,
    /// Tree block level (used to find the METADATA_ITEM); not merged.
    pub level: u8,
    /// Write `key`.
    pub update_key: bool,
    /// OR `flags_to_set` into the item's flags.
    pub update_flags: bool,
    /// Flags to set, e.g. [`crate::BLOCK_FLAG_FULL_BACKREF`].
    pub flags_to_set: u64,
}

impl ExtentOp {
    /// An op that only sets flags.
    pub fn set_flags(flags: u64, level: u8) -> ExtentOp {
        ExtentOp { update_flags: true, flags_to_set: flags, level, ..ExtentOp::default() }
    }

    /// Merge a later op into this one (semantics.md §4.6 step 4): a later key
    /// replaces the key, flags accumulate, `level` stays. The merge is
    /// commutative in the flags and last-writer-wins in the key.
    pub fn merge(&mut self, upd: &ExtentOp) {
        if upd.update_key {
            self.key = upd.key;
            self.update_key = true;
        }
        if upd.update_flags {
            self.flags_to_set |= upd.flags_to_set;
            self.update_flags = true;
        }
    }

    /// The merge of an optional existing op with an update (adopt if none).
    pub fn merged(existing: Option<&ExtentOp>, upd: &ExtentOp) -> ExtentOp {
        match existing {
            None => *upd,
            Some(e) => {
                let mut m = *e;
                m.merge(upd);
                m
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn merge_accumulates_flags_and_replaces_key() {
        let mut a = ExtentOp::set_flags(0x100, 1);
        let k = DiskKey { objectid: 7, item_type: 1, offset: 2 };
        a.merge(&ExtentOp { key: k, update_key: true, level: 5, ..Default::default() });
        assert!(a.update_key && a.update_flags);
        assert_eq!(a.key, k);
        assert_eq!(a.level, 1, "level is not merged");
        a.merge(&ExtentOp::set_flags(0x2, 0));
        assert_eq!(a.flags_to_set, 0x102);
        assert_eq!(ExtentOp::merged(None, &a), a);
    }
}
