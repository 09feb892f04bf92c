//! The independent oracle: the sum of every operation that was successfully
//! queued, per bytenr and per backref key, compared with the final extent tree.

use std::collections::BTreeMap;

use delayed_refs::{BLOCK_FLAG_FULL_BACKREF, ExtentItem, RefKey};

/// How many mismatch descriptions a comparison keeps.
const MAX_SAMPLES: usize = 8;

/// What the tree must hold for one extent.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct ExpectedExtent {
    /// Net count per backref key (zero counts are ignored).
    backrefs: BTreeMap<RefKey, u64>,
    /// An extent op setting `BLOCK_FLAG_FULL_BACKREF` was queued (tree blocks).
    full_backref: bool,
}

/// The expected extent tree, built from the workers' own records of the
/// operations they queued successfully.
#[derive(Clone, Debug, Default)]
pub struct Oracle {
    extents: BTreeMap<u64, ExpectedExtent>,
}

/// Differences between the extent tree and the oracle.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TreeDiff {
    /// Refs the oracle expects but the tree lacks (a lost add or a doubled drop).
    pub lost: u64,
    /// Refs the tree holds beyond the oracle (a doubled add or a lost drop).
    pub doubled: u64,
    /// Tree blocks whose `FULL_BACKREF` flag disagrees with the queued extent ops.
    pub flag_mismatches: u64,
    /// The first few mismatches, described.
    pub samples: Vec<String>,
}

impl TreeDiff {
    fn note(&mut self, msg: impl FnOnce() -> String) {
        if self.samples.len() < MAX_SAMPLES {
            self.samples.push(msg());
        }
    }
}

impl Oracle {
    /// An empty oracle.
    pub fn new() -> Self {
        Self::default()
    }

    /// Expect `count` more refs of `key` on the extent at `bytenr`.
    pub fn add_ref(&mut self, bytenr: u64, key: RefKey, count: u64) {
        if count > 0 {
            *self.extents.entry(bytenr).or_default().backrefs.entry(key).or_insert(0) += count;
        }
    }

    /// Expect the tree block at `bytenr` to carry `BLOCK_FLAG_FULL_BACKREF`.
    pub fn expect_full_backref(&mut self, bytenr: u64) {
        self.extents.entry(bytenr).or_default().full_backref = true;
    }

    /// Compare an extent tree's items with the oracle, ref by ref.
    pub fn compare(&self, items: &BTreeMap<u64, ExtentItem>) -> TreeDiff {
        let mut diff = TreeDiff::default();
        let empty = BTreeMap::new();
        for (&bytenr, exp) in self.extents.iter().filter(|(_, e)| !e.backrefs.is_empty()) {
            let got = items.get(&bytenr).map_or(&empty, |i| &i.backrefs);
            for (key, &want) in &exp.backrefs {
                let have = got.get(key).copied().unwrap_or(0);
                if have < want {
                    diff.lost += want - have;
                    diff.note(|| format!("bytenr {bytenr} {key:?}: tree {have}, queued {want}"));
                }
            }
            if let Some(item) = items.get(&bytenr) {
                if !item.is_data && exp.full_backref != (item.flags & BLOCK_FLAG_FULL_BACKREF != 0) {
                    diff.flag_mismatches += 1;
                    diff.note(|| {
                        format!("bytenr {bytenr}: flags {:#x}, FULL_BACKREF queued {}", item.flags, exp.full_backref)
                    });
                }
            }
        }
        for (&bytenr, item) in items {
            let want = self.extents.get(&bytenr).map_or(&empty, |e| &e.backrefs);
            for (key, &have) in &item.backrefs {
                let w = want.get(key).copied().unwrap_or(0);
                if have > w {
                    diff.doubled += have - w;
                    diff.note(|| format!("bytenr {bytenr} {key:?}: tree {have}, queued {w}"));
                }
            }
        }
        diff
    }
}

#[cfg(test)]
mod tests {
    use delayed_refs::{Action, ExtentTree, MemExtentTree, RefRun};

    use super::*;

    fn data_key(ino: u64) -> RefKey {
        RefKey::ExtentData { root: 5, objectid: ino, offset: 0 }
    }

    fn insert(tree: &MemExtentTree, bytenr: u64, key: RefKey, ref_mod: u64, insert_reserved: bool) {
        let run = RefRun {
            bytenr,
            num_bytes: 4096,
            is_data: true,
            key,
            level: 0,
            action: Action::Add,
            ref_mod,
            insert_reserved,
            extent_op: None,
            owning_root: 5,
            batch: Default::default(),
        };
        tree.apply_ref(&run).unwrap();
    }

    #[test]
    fn equal_tree_is_clean() {
        let tree = MemExtentTree::new();
        insert(&tree, 4096, data_key(257), 2, true);
        let mut o = Oracle::new();
        o.add_ref(4096, data_key(257), 2);
        o.add_ref(8192, data_key(258), 0);
        assert_eq!(o.compare(&tree.items()), TreeDiff::default());
    }

    #[test]
    fn lost_and_doubled_are_counted() {
        let tree = MemExtentTree::new();
        insert(&tree, 4096, data_key(257), 1, true);
        insert(&tree, 4096, data_key(258), 3, false);
        insert(&tree, 1 << 20, data_key(259), 1, true);
        let mut o = Oracle::new();
        o.add_ref(4096, data_key(257), 2);
        o.add_ref(4096, data_key(258), 1);
        let d = o.compare(&tree.items());
        assert_eq!((d.lost, d.doubled), (1, 3));
        assert!(!d.samples.is_empty());
    }
}
