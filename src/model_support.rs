//! What the loom and shuttle models share: the engine on the mock stores,
//! a small strict extent tree built from the `sync` shim (so the model
//! checker sees the happens-before a backend gives), and ref builders.
//!
//! Nothing here re-implements the engine: the models call
//! [`Engine`](crate::lockfree::root::Engine)'s own add, run, reader,
//! cleanup and destroy methods.

use std::collections::BTreeMap;

use crate::api::{FsConfig, FsShared};
use crate::domain::generic_ref::GenericRef;
use crate::domain::geometry::Geometry;
use crate::domain::key::RefKey;
use crate::domain::kind::Action;
use crate::error::ExtentError;
use crate::extent_tree::{ExtentInfo, ExtentTree, OpRun, Pin, RefRun};
use crate::lockfree::root::Engine;
use crate::lockfree::store::mock::MockStores;
use crate::rsv::reserves::{ReleaseRouting, ReserveConfig};
use crate::sync::Mutex;

/// The lock-free engine on the loom/shuttle-visible stores.
pub(crate) type ModelRefs = Engine<MockStores>;

/// Length of the models' extents.
pub(crate) const NB: u64 = 4096;

/// A fresh engine with reserves small enough for loom's 32-bit cells.
pub(crate) fn engine() -> ModelRefs {
    let reserves = ReserveConfig {
        geometry: Geometry { nodesize: 4096, sectorsize: 4096, csum_size: 4, free_space_tree: false },
        routing: ReleaseRouting::V6_8,
        space_total: 1 << 28,
        global_size: 0,
    };
    Engine::with_fs(std::sync::Arc::new(FsShared::new(FsConfig { reserves, qgroups: false, pending_limit: 0 })))
}

/// A data ref of inode `ino` (root 5) on `bytenr`.
pub(crate) fn data(action: Action, bytenr: u64, ino: u64) -> GenericRef {
    GenericRef::new(action, bytenr, NB, 0, 5).data(5, ino, 0, 0, false)
}

/// A level-0 tree ref of `root` on `bytenr`.
pub(crate) fn tree(action: Action, bytenr: u64, root: u64) -> GenericRef {
    GenericRef::new(action, bytenr, NB, 0, root).tree(0, root, 0, false)
}

/// A strict extent tree of backref counts: adding to a missing extent,
/// inserting an existing one and dropping below zero are errors (nothing
/// changes); an extent whose count reaches 0 is deleted.
#[derive(Debug)]
pub(crate) struct ModelTree {
    items: Mutex<BTreeMap<u64, BTreeMap<RefKey, u64>>>,
}

impl ModelTree {
    pub(crate) fn new() -> Self {
        ModelTree { items: Mutex::new(BTreeMap::new()) }
    }

    /// Put an extent on disk with these backrefs (a before-image).
    pub(crate) fn load(&self, bytenr: u64, backrefs: &[(RefKey, u64)]) {
        self.items.lock().unwrap().insert(bytenr, backrefs.iter().copied().collect());
    }

    /// The extent's backrefs, if it has an item.
    pub(crate) fn backrefs(&self, bytenr: u64) -> Option<BTreeMap<RefKey, u64>> {
        self.items.lock().unwrap().get(&bytenr).cloned()
    }

    /// The extent's total count (0 without an item).
    #[cfg_attr(dref_shuttle, allow(dead_code))]
    pub(crate) fn refs(&self, bytenr: u64) -> u64 {
        self.backrefs(bytenr).map_or(0, |b| b.values().sum())
    }
}

impl ExtentTree for ModelTree {
    fn apply_ref(&self, run: &RefRun<'_>) -> Result<(), ExtentError> {
        let mut items = self.items.lock().unwrap();
        let bytenr = run.bytenr;
        match run.action {
            Action::Drop => {
                let item = items.get_mut(&bytenr).ok_or(ExtentError::MissingExtent { bytenr })?;
                let have = item.get(&run.key).copied().unwrap_or(0);
                if have < run.ref_mod {
                    return Err(ExtentError::BackrefUnderflow { bytenr, key: run.key, have, drop: run.ref_mod });
                }
                if have == run.ref_mod {
                    item.remove(&run.key);
                } else {
                    item.insert(run.key, have - run.ref_mod);
                }
                if item.is_empty() {
                    items.remove(&bytenr);
                }
            }
            _ => {
                if run.insert_reserved {
                    if items.contains_key(&bytenr) {
                        return Err(ExtentError::AlreadyExists { bytenr });
                    }
                    items.insert(bytenr, BTreeMap::new());
                }
                let item = items.get_mut(&bytenr).ok_or(ExtentError::MissingExtent { bytenr })?;
                *item.entry(run.key).or_insert(0) += run.ref_mod;
            }
        }
        Ok(())
    }

    fn apply_extent_op(&self, run: &OpRun<'_>) -> Result<(), ExtentError> {
        let bytenr = run.bytenr;
        match self.items.lock().unwrap().contains_key(&bytenr) {
            true => Ok(()),
            false => Err(ExtentError::MissingExtent { bytenr }),
        }
    }

    fn pin_reserved(&self, _: &Pin) -> Result<(), ExtentError> {
        Ok(())
    }

    fn lookup(&self, bytenr: u64) -> Result<Option<ExtentInfo>, ExtentError> {
        let items = self.items.lock().unwrap();
        Ok(items.get(&bytenr).map(|b| ExtentInfo { refs: b.values().sum(), flags: 0 }))
    }
}

/// Drain everything single-threaded and check the quiescent state: no
/// head, no entry, the reserve back to empty.
pub(crate) fn drain_and_check(refs: &ModelRefs, tree: &ModelTree) {
    refs.run(tree, crate::api::RunMode::All).expect("the final run fails");
    let c = refs.counters();
    assert_eq!((c.num_heads, c.num_entries, c.num_heads_ready), (0, 0, 0), "counters after the drain: {c:?}");
    assert!(refs.snapshot().is_empty(), "a head survived the drain");
    let rsv = refs.fs.reserves.snapshot();
    assert_eq!(rsv.delayed_refs.size, 0, "delayed-refs reserve not back to 0: {rsv:?}");
}
