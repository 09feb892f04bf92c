//! A strict in-memory extent tree, sharded by bytenr.

#![forbid(unsafe_code)]

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};

use parking_lot::Mutex;

use super::{ExtentInfo, ExtentTree, OpRun, Pin, RefRun};
use crate::domain::extent_op::{DiskKey, ExtentOp};
use crate::domain::key::RefKey;
use crate::domain::kind::{Action, EXTENT_FLAG_DATA, EXTENT_FLAG_TREE_BLOCK};
use crate::error::ExtentError;

const SHARDS: usize = 64;

/// One extent item with every backref and its count.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct ExtentItem {
    /// Extent length.
    pub num_bytes: u64,
    /// Data extent (else tree block).
    pub is_data: bool,
    /// Reference count: always the sum of the backref counts.
    pub refs: u64,
    /// Flags (`EXTENT_FLAG_*`, `BLOCK_FLAG_FULL_BACKREF`).
    pub flags: u64,
    /// Tree block level (0 for data).
    pub level: u8,
    /// Key written by an extent op, if any.
    pub key: Option<DiskKey>,
    /// Backrefs and their counts (no zero counts).
    pub backrefs: BTreeMap<RefKey, u64>,
}

/// A strict in-memory [`ExtentTree`] (semantics.md §6.10): a new item is inserted
/// only under must_insert_reserved; adding to a missing extent, dropping a
/// backref below zero and a tree ref with `ref_mod != 1` are errors; an item
/// whose refs reach 0 is deleted. Errors change nothing.
///
/// ```
/// use delayed_refs::{Action, ExtentTree, MemExtentTree, RefKey, RefRun};
/// let t = MemExtentTree::new();
/// let key = RefKey::ExtentData { root: 5, objectid: 257, offset: 0 };
/// let mut run = RefRun { bytenr: 1 << 20, num_bytes: 4096, is_data: true, key, level: 0,
///     action: Action::Add, ref_mod: 2, insert_reserved: true, extent_op: None, owning_root: 5,
///     batch: Default::default() };
/// t.apply_ref(&run).unwrap();
/// assert_eq!(t.lookup(1 << 20).unwrap().refs, 2);
/// run.action = Action::Drop;
/// run.insert_reserved = false;
/// t.apply_ref(&run).unwrap();
/// assert!(t.lookup(1 << 20).is_none());
/// ```
#[derive(Debug)]
pub struct MemExtentTree {
    shards: Vec<Mutex<BTreeMap<u64, ExtentItem>>>,
    pinned_bytes: AtomicU64,
    applied_refs: AtomicU64,
}

impl Default for MemExtentTree {
    fn default() -> Self {
        Self::new()
    }
}

impl MemExtentTree {
    /// An empty tree.
    pub fn new() -> Self {
        MemExtentTree {
            shards: (0..SHARDS).map(|_| Mutex::new(BTreeMap::new())).collect(),
            pinned_bytes: AtomicU64::new(0),
            applied_refs: AtomicU64::new(0),
        }
    }

    fn shard(&self, bytenr: u64) -> &Mutex<BTreeMap<u64, ExtentItem>> {
        let h = (bytenr >> 12).wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 58;
        &self.shards[h as usize % SHARDS]
    }

    /// Insert or replace an item directly (loading a before-image).
    pub fn insert_item(&self, bytenr: u64, item: ExtentItem) {
        self.shard(bytenr).lock().insert(bytenr, item);
    }

    /// The extent's refs and flags, `None` if it has no item: the
    /// [`ExtentTree::lookup`] of this tree, which cannot fail, without the
    /// `Result`.
    pub fn lookup(&self, bytenr: u64) -> Option<ExtentInfo> {
        self.shard(bytenr).lock().get(&bytenr).map(|i| ExtentInfo { refs: i.refs, flags: i.flags })
    }

    /// A copy of one item.
    pub fn item(&self, bytenr: u64) -> Option<ExtentItem> {
        self.shard(bytenr).lock().get(&bytenr).cloned()
    }

    /// A copy of every item, by bytenr (not atomic across shards).
    pub fn items(&self) -> BTreeMap<u64, ExtentItem> {
        let mut all = BTreeMap::new();
        for s in &self.shards {
            all.extend(s.lock().iter().map(|(k, v)| (*k, v.clone())));
        }
        all
    }

    /// Number of items.
    pub fn len(&self) -> usize {
        self.shards.iter().map(|s| s.lock().len()).sum()
    }

    /// Whether the tree holds no item.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Bytes pinned by cancelled reservations.
    pub fn pinned_bytes(&self) -> u64 {
        self.pinned_bytes.load(Ordering::Relaxed)
    }

    /// Refs applied so far (merged runs, not individual adds).
    pub fn applied_refs(&self) -> u64 {
        self.applied_refs.load(Ordering::Relaxed)
    }
}

fn apply_op(item: &mut ExtentItem, op: &ExtentOp) {
    if op.update_flags {
        item.flags |= op.flags_to_set;
    }
    if op.update_key {
        item.key = Some(op.key);
    }
}

impl ExtentTree for MemExtentTree {
    fn apply_ref(&self, run: &RefRun<'_>) -> Result<(), ExtentError> {
        let bytenr = run.bytenr;
        if !run.key.is_data() && run.ref_mod != 1 {
            return Err(ExtentError::TreeRefMod { bytenr, key: run.key, ref_mod: run.ref_mod });
        }
        if run.key.is_data() != run.is_data {
            return Err(ExtentError::KindMismatch { bytenr });
        }
        let mut shard = self.shard(bytenr).lock();
        match run.action {
            Action::Add | Action::AddExtent if run.insert_reserved => {
                if shard.contains_key(&bytenr) {
                    return Err(ExtentError::AlreadyExists { bytenr });
                }
                let mut item = ExtentItem {
                    num_bytes: run.num_bytes,
                    is_data: run.is_data,
                    refs: run.ref_mod,
                    flags: if run.is_data { EXTENT_FLAG_DATA } else { EXTENT_FLAG_TREE_BLOCK },
                    level: run.level,
                    key: None,
                    backrefs: BTreeMap::from([(run.key, run.ref_mod)]),
                };
                if let Some(op) = run.extent_op {
                    apply_op(&mut item, op);
                }
                shard.insert(bytenr, item);
            }
            Action::Add | Action::AddExtent => {
                let item = shard.get_mut(&bytenr).ok_or(ExtentError::MissingExtent { bytenr })?;
                if item.is_data != run.is_data {
                    return Err(ExtentError::KindMismatch { bytenr });
                }
                *item.backrefs.entry(run.key).or_insert(0) += run.ref_mod;
                item.refs += run.ref_mod;
                if let Some(op) = run.extent_op {
                    apply_op(item, op);
                }
            }
            Action::Drop | Action::UpdateHead => {
                let item = shard.get_mut(&bytenr).ok_or(ExtentError::MissingExtent { bytenr })?;
                if item.is_data != run.is_data {
                    return Err(ExtentError::KindMismatch { bytenr });
                }
                let have = item.backrefs.get(&run.key).copied().unwrap_or(0);
                if have < run.ref_mod {
                    return Err(ExtentError::BackrefUnderflow { bytenr, key: run.key, have, drop: run.ref_mod });
                }
                if have == run.ref_mod {
                    item.backrefs.remove(&run.key);
                } else {
                    item.backrefs.insert(run.key, have - run.ref_mod);
                }
                item.refs -= run.ref_mod;
                if item.refs == 0 {
                    // The last ref frees the extent; nothing else is applied.
                    shard.remove(&bytenr);
                } else if let Some(op) = run.extent_op {
                    apply_op(item, op);
                }
            }
        }
        self.applied_refs.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    fn apply_extent_op(&self, run: &OpRun<'_>) -> Result<(), ExtentError> {
        let bytenr = run.bytenr;
        let mut shard = self.shard(bytenr).lock();
        let item = shard.get_mut(&bytenr).ok_or(ExtentError::MissingExtent { bytenr })?;
        apply_op(item, run.op);
        Ok(())
    }

    fn pin_reserved(&self, pin: &Pin) -> Result<(), ExtentError> {
        self.pinned_bytes.fetch_add(pin.num_bytes, Ordering::Relaxed);
        Ok(())
    }

    fn lookup(&self, bytenr: u64) -> Result<Option<ExtentInfo>, ExtentError> {
        Ok(MemExtentTree::lookup(self, bytenr))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(action: Action, key: RefKey, ref_mod: u64, insert: bool) -> RefRun<'static> {
        RefRun {
            bytenr: 4096,
            num_bytes: 4096,
            is_data: key.is_data(),
            key,
            level: 0,
            action,
            ref_mod,
            insert_reserved: insert,
            extent_op: None,
            owning_root: 5,
            batch: Default::default(),
        }
    }

    #[test]
    fn strict_rules() {
        let t = MemExtentTree::new();
        let tk = RefKey::TreeBlock { root: 5 };
        assert_eq!(t.apply_ref(&run(Action::Add, tk, 1, false)), Err(ExtentError::MissingExtent { bytenr: 4096 }));
        assert!(matches!(t.apply_ref(&run(Action::Add, tk, 2, true)), Err(ExtentError::TreeRefMod { .. })));
        t.apply_ref(&run(Action::Add, tk, 1, true)).unwrap();
        assert_eq!(t.apply_ref(&run(Action::Add, tk, 1, true)), Err(ExtentError::AlreadyExists { bytenr: 4096 }));
        let other = RefKey::SharedBlock { parent: 8192 };
        assert!(matches!(t.apply_ref(&run(Action::Drop, other, 1, false)), Err(ExtentError::BackrefUnderflow { .. })));
        t.apply_ref(&run(Action::Add, other, 1, false)).unwrap();
        let it = t.item(4096).unwrap();
        assert_eq!(it.refs, 2);
        assert_eq!(it.refs, it.backrefs.values().sum::<u64>());
        t.apply_ref(&run(Action::Drop, tk, 1, false)).unwrap();
        t.apply_ref(&run(Action::Drop, other, 1, false)).unwrap();
        assert!(t.is_empty(), "refs reached 0: item deleted");
        let op = ExtentOp::set_flags(0x100, 0);
        let op_run = OpRun { bytenr: 4096, num_bytes: 4096, is_data: false, op: &op, batch: Default::default() };
        assert!(t.apply_extent_op(&op_run).is_err());
    }
}
