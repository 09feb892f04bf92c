//! Building and queueing single refs from a backref key, the shapes every
//! workload uses, and the bytenr layout.

use delayed_refs::{Action, DelayedRefs, ExtentOp, GenericRef, RefKey, TransHandle};

/// Length of every data extent.
pub const DATA_BYTES: u64 = 4096;
/// Length of every tree block.
pub const TREE_BYTES: u64 = 16384;
/// Owning and referencing root of every ref (the default subvolume).
pub const ROOT: u64 = 5;
/// Level of every tree block.
pub const LEVEL: u8 = 0;

/// The bytenr of extent number `extent` of `owner` (0: shared heads, else
/// adder thread id + 1). Owners below 2^12 and extents below 2^36 never collide.
pub fn bytenr_of(owner: u64, extent: u64) -> u64 {
    debug_assert!(owner < 1 << 12 && extent < 1 << 36);
    ((owner << 36) | extent) << 16
}

/// The extent number of a bytenr made by [`bytenr_of`].
pub fn extent_of(bytenr: u64) -> u64 {
    (bytenr >> 16) & ((1 << 36) - 1)
}

/// The extent length for a key's kind.
pub fn num_bytes_of(key: &RefKey) -> u64 {
    if key.is_data() { DATA_BYTES } else { TREE_BYTES }
}

/// The generic ref that queues `action` for `key` on the extent at `bytenr`.
pub fn generic_ref(action: Action, bytenr: u64, key: &RefKey) -> GenericRef {
    let n = num_bytes_of(key);
    match *key {
        RefKey::ExtentData { root, objectid, offset } => {
            GenericRef::new(action, bytenr, n, 0, ROOT).data(root, objectid, offset, 0, false)
        }
        RefKey::SharedData { parent } => GenericRef::new(action, bytenr, n, parent, ROOT).data(ROOT, 0, 0, 0, false),
        RefKey::TreeBlock { root } => GenericRef::new(action, bytenr, n, 0, ROOT).tree(LEVEL, root, 0, false),
        RefKey::SharedBlock { parent } => GenericRef::new(action, bytenr, n, parent, ROOT).tree(LEVEL, ROOT, 0, false),
    }
}

/// Queue one ref. `first` makes it the allocating ref of a new extent
/// (`AddExtent`: reserved bytes for data, a flags op for tree blocks).
pub fn queue_ref<D: DelayedRefs>(
    refs: &D,
    trans: &mut TransHandle,
    action: Action,
    bytenr: u64,
    key: &RefKey,
    first: bool,
) -> Result<(), String> {
    let action = if first { Action::AddExtent } else { action };
    let gref = generic_ref(action, bytenr, key);
    let r = if key.is_data() {
        refs.add_data_ref(trans, &gref, if first { DATA_BYTES } else { 0 })
    } else {
        refs.add_tree_ref(trans, &gref, first.then(|| ExtentOp::set_flags(0, LEVEL)))
    };
    r.map(|_| ()).map_err(|e| format!("{action:?} {key:?} at {bytenr}: {}", crate::out::Chain(&e)))
}

/// Queue an extent op that sets `flags` on the tree block at `bytenr`.
pub fn queue_flags<D: DelayedRefs>(refs: &D, trans: &mut TransHandle, bytenr: u64, flags: u64) -> Result<(), String> {
    refs.add_extent_op(trans, bytenr, TREE_BYTES, ExtentOp::set_flags(flags, LEVEL))
        .map_err(|e| format!("extent op {flags:#x} at {bytenr}: {}", crate::out::Chain(&e)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generic_refs_round_trip_their_key() {
        for key in [
            RefKey::ExtentData { root: 5, objectid: 257, offset: 4096 },
            RefKey::SharedData { parent: 1 << 30 },
            RefKey::TreeBlock { root: 256 },
            RefKey::SharedBlock { parent: 1 << 30 },
        ] {
            let g = generic_ref(Action::Add, 1 << 20, &key);
            assert_eq!(g.ref_key(), key);
            assert_eq!(g.is_data(), key.is_data());
        }
    }

    #[test]
    fn bytenrs_do_not_collide() {
        assert_ne!(bytenr_of(0, 1), bytenr_of(1, 0));
        assert_eq!(bytenr_of(1, 0) % DATA_BYTES, 0);
        assert!(bytenr_of((1 << 12) - 1, (1 << 36) - 1) > bytenr_of(1, 0));
        assert_eq!(extent_of(bytenr_of(7, 12345)), 12345);
        assert_eq!(extent_of(bytenr_of(0, (1 << 36) - 1)), (1 << 36) - 1);
    }
}
