//! The caller's description of one ref change (semantics.md §2.1) and its builders.

#![forbid(unsafe_code)]

use super::key::{NodeKey, RefKey};
use super::kind::{Action, RefType, is_fstree};

/// Payload of a generic ref: what kind of extent and the backref fields.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum RefPayload {
    /// Metadata (tree block) ref.
    Tree {
        /// Tree block level (not part of the identity).
        level: u8,
        /// Referencing root.
        root: u64,
    },
    /// Data ref.
    Data {
        /// Referencing root.
        root: u64,
        /// Inode number.
        ino: u64,
        /// File offset minus extent offset.
        offset: u64,
    },
}

/// One requested ref change (`struct btrfs_ref`, semantics.md §2.1). Caller-owned,
/// never stored by the structure.
///
/// ```
/// use delayed_refs::{Action, GenericRef, RefKey};
/// let r = GenericRef::new(Action::Add, 1 << 20, 4096, 0, 5).tree(0, 5, 0, false);
/// assert_eq!(r.ref_key(), RefKey::TreeBlock { root: 5 });
/// assert!(!r.skip_qgroup);
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct GenericRef {
    /// What to do.
    pub action: Action,
    /// Extent start.
    pub bytenr: u64,
    /// Extent length.
    pub num_bytes: u64,
    /// Parent block for shared refs, else 0.
    pub parent: u64,
    /// Root that owns the extent (may be 0 for frees).
    pub owning_root: u64,
    /// Kind-specific fields.
    pub payload: RefPayload,
    /// Do not create a qgroup record for this ref.
    pub skip_qgroup: bool,
}

impl GenericRef {
    /// Start a ref (`btrfs_init_generic_ref`); finish it with [`GenericRef::tree`]
    /// or [`GenericRef::data`]. Until then it is a level-0 tree ref of root 0.
    pub fn new(action: Action, bytenr: u64, num_bytes: u64, parent: u64, owning_root: u64) -> Self {
        GenericRef {
            action,
            bytenr,
            num_bytes,
            parent,
            owning_root,
            payload: RefPayload::Tree { level: 0, root: 0 },
            skip_qgroup: true,
        }
    }

    /// Make it a tree ref (`btrfs_init_tree_ref`).
    pub fn tree(mut self, level: u8, root: u64, mod_root: u64, skip: bool) -> Self {
        self.payload = RefPayload::Tree { level, root };
        self.skip_qgroup = skip_qgroup(root, mod_root, skip);
        self
    }

    /// Make it a data ref (`btrfs_init_data_ref`).
    pub fn data(mut self, root: u64, ino: u64, offset: u64, mod_root: u64, skip: bool) -> Self {
        self.payload = RefPayload::Data { root, ino, offset };
        self.skip_qgroup = skip_qgroup(root, mod_root, skip);
        self
    }

    /// Whether this is a data ref.
    pub fn is_data(&self) -> bool {
        matches!(self.payload, RefPayload::Data { .. })
    }

    /// The referencing root.
    pub fn ref_root(&self) -> u64 {
        match self.payload {
            RefPayload::Tree { root, .. } | RefPayload::Data { root, .. } => root,
        }
    }

    /// The tree level (0 for data).
    pub fn level(&self) -> u8 {
        match self.payload {
            RefPayload::Tree { level, .. } => level,
            RefPayload::Data { .. } => 0,
        }
    }

    /// The backref identity this ref queues (type from `parent`, semantics.md §1.3).
    pub fn ref_key(&self) -> RefKey {
        let parent = self.parent;
        match (RefType::choose(self.is_data(), parent), self.payload) {
            (RefType::TreeBlock, RefPayload::Tree { root, .. }) => RefKey::TreeBlock { root },
            (RefType::SharedBlock, _) => RefKey::SharedBlock { parent },
            (RefType::ExtentData, RefPayload::Data { root, ino, offset }) => {
                RefKey::ExtentData { root, objectid: ino, offset }
            }
            (RefType::SharedData, _) => RefKey::SharedData { parent },
            _ => unreachable!("RefType::choose follows the payload kind"),
        }
    }

    /// The node identity at creation: fs-tree refs take the current
    /// tree-mod-log seq, others 0 (semantics.md §4.3).
    pub fn node_key(&self, current_seq: u64) -> NodeKey {
        let seq = if is_fstree(self.ref_root()) { current_seq } else { 0 };
        NodeKey { key: self.ref_key(), seq }
    }
}

/// `skip_qgroup` as computed by the init helpers (semantics.md §2.1).
pub fn skip_qgroup(root: u64, mod_root: u64, skip: bool) -> bool {
    skip || !(is_fstree(root) && (mod_root == 0 || is_fstree(mod_root)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::kind::roots;

    #[test]
    fn builders_choose_types() {
        let t = GenericRef::new(Action::Add, 4096, 4096, 0, 5).tree(1, 5, 0, false);
        assert_eq!(t.ref_key(), RefKey::TreeBlock { root: 5 });
        let s = GenericRef::new(Action::Add, 4096, 4096, 8192, 5).tree(1, 5, 0, false);
        assert_eq!(s.ref_key(), RefKey::SharedBlock { parent: 8192 });
        let d = GenericRef::new(Action::Drop, 4096, 4096, 0, 256).data(256, 257, 0, 0, false);
        assert_eq!(d.ref_key(), RefKey::ExtentData { root: 256, objectid: 257, offset: 0 });
        let sd = GenericRef::new(Action::Add, 4096, 4096, 1 << 30, 256).data(256, 257, 0, 0, false);
        assert_eq!(sd.ref_key(), RefKey::SharedData { parent: 1 << 30 });
        assert!(d.is_data() && !t.is_data());
        assert_eq!(t.level(), 1);
    }

    #[test]
    fn seq_only_for_fs_trees() {
        let fs = GenericRef::new(Action::Add, 1, 1, 0, 5).tree(0, 5, 0, false);
        assert_eq!(fs.node_key(42).seq, 42);
        let ext = GenericRef::new(Action::Add, 1, 1, 0, 2).tree(0, 2, 0, false);
        assert_eq!(ext.node_key(42).seq, 0);
    }

    #[test]
    fn skip_qgroup_rule() {
        assert!(!skip_qgroup(5, 0, false));
        assert!(!skip_qgroup(256, 257, false));
        assert!(skip_qgroup(256, 257, true));
        assert!(skip_qgroup(2, 0, false), "extent tree is not an fs tree");
        assert!(skip_qgroup(256, roots::TREE_RELOC, false), "reloc mod_root");
    }
}
