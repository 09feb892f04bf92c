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
/// This is the kernel-shaped form, kept for the port-faithful API: start with
/// [`GenericRef::new`], then finish with [`GenericRef::tree`] or
/// [`GenericRef::data`]. To write a ref by hand, prefer the typed builders
/// [`TreeRef`](crate::TreeRef), [`SharedBlockRef`](crate::SharedBlockRef),
/// [`DataRef`](crate::DataRef) and [`SharedDataRef`](crate::SharedDataRef),
/// which name every field and check them.
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
    /// Start a ref (`btrfs_init_generic_ref`):
    ///
    /// - `action`: what to queue;
    /// - `bytenr`, `num_bytes`: the extent;
    /// - `parent`: the referencing tree block for a shared backref, 0 for a
    ///   keyed one (the backref type follows from it, semantics.md §1.3);
    /// - `owning_root`: the root that owns the extent (0 allowed on drops).
    ///
    /// Finish it with [`GenericRef::tree`] or [`GenericRef::data`]. Until then
    /// it is a tree ref of root 0: `add_tree_ref` refuses it when `parent` is 0
    /// ([`Error::MissingRoot`](crate::Error::MissingRoot)) and `add_data_ref`
    /// refuses any tree payload ([`Error::BadAction`](crate::Error::BadAction)).
    /// A shared block ref (`parent != 0`) without `.tree()` cannot be told
    /// apart from one of root 0, so it is accepted; the typed builders
    /// ([`SharedBlockRef`](crate::SharedBlockRef)) rule that out.
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

    /// Make it a tree ref (`btrfs_init_tree_ref`):
    ///
    /// - `level`: the block's level (0 for leaves); not part of the backref;
    /// - `root`: the referencing tree (for a shared ref, the tree the block
    ///   belongs to: it decides the tree-mod-log seq and qgroup accounting);
    /// - `mod_root`: the root whose change caused the ref, or 0 for `root`
    ///   itself (relocation passes the relocation tree);
    /// - `skip`: never create a qgroup record for it.
    ///
    /// `skip_qgroup` becomes [`skip_qgroup(root, mod_root, skip)`](skip_qgroup).
    pub fn tree(mut self, level: u8, root: u64, mod_root: u64, skip: bool) -> Self {
        self.payload = RefPayload::Tree { level, root };
        self.skip_qgroup = skip_qgroup(root, mod_root, skip);
        self
    }

    /// Make it a data ref (`btrfs_init_data_ref`):
    ///
    /// - `root`: the referencing tree (subvolume);
    /// - `ino`: the inode number of the file;
    /// - `offset`: the file offset minus the offset inside the extent (the
    ///   key offset of the file extent item minus its extent offset);
    /// - `mod_root`: the root whose change caused the ref, or 0 for `root`
    ///   itself;
    /// - `skip`: never create a qgroup record for it.
    ///
    /// For a shared data ref (`parent != 0`) only `root` matters beyond the
    /// parent: `ino` and `offset` are not part of the backref.
    /// `skip_qgroup` becomes [`skip_qgroup(root, mod_root, skip)`](skip_qgroup).
    ///
    /// ```
    /// use delayed_refs::{Action, GenericRef, RefKey};
    /// // Inode 257 of subvolume 256 references the extent at file offset 0.
    /// let r = GenericRef::new(Action::Add, 1 << 30, 8192, 0, 256).data(256, 257, 0, 0, false);
    /// assert_eq!(r.ref_key(), RefKey::ExtentData { root: 256, objectid: 257, offset: 0 });
    /// ```
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
