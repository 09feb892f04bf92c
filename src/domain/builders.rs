//! Typed ref builders: one struct per backref type, every field named, checked
//! by [`build`](TreeRef::build) before a [`GenericRef`] exists.
//!
//! [`GenericRef::new`] takes four `u64` in a row and must be finished with
//! [`GenericRef::tree`] or [`GenericRef::data`]; it mirrors the kernel's
//! `btrfs_init_generic_ref` for the port-faithful API. These builders are the
//! way to write a ref by hand:
//!
//! | backref (semantics.md §1.3) | builder | identity fields |
//! |---|---|---|
//! | tree block | [`TreeRef`] | owning tree `root` (and `level`, not part of the identity) |
//! | shared block | [`SharedBlockRef`] | `parent` block (and `level`) |
//! | extent data | [`DataRef`] | `root`, `ino`, `offset` |
//! | shared data | [`SharedDataRef`] | `parent` block |
//!
//! The structs have no `Default`, so a struct literal names every field; the
//! qgroup inputs are grouped in [`Qgroup`]. `build` (or `GenericRef::try_from`)
//! checks what the type alone cannot: a zero length, a head update passed as a
//! ref, a root or parent of 0, a level beyond the tree height. The errors are
//! the crate's [`Error`] variants, the same that the add calls return.
//!
//! ```
//! use delayed_refs::{Action, DataRef, DelayedRefs, ExtentTree, FsConfig, LockFreeRefs, MemExtentTree, Qgroup, RunMode,
//!     TransHandle, TreeRef};
//! let refs = LockFreeRefs::new(FsConfig::default());
//! let tree = MemExtentTree::new();
//! let mut h = TransHandle::new();
//!
//! // A new tree block of subvolume 256, level 0.
//! let block = TreeRef {
//!     action: Action::AddExtent,
//!     bytenr: 1 << 30,
//!     num_bytes: 16384,
//!     owning_root: 256,
//!     root: 256,
//!     level: 0,
//!     qgroup: Qgroup::ACCOUNT,
//! }
//! .build()?;
//! refs.add_tree_ref(&mut h, &block, None)?;
//!
//! // A new data extent referenced by inode 257 of subvolume 256 at file offset 0.
//! let extent = DataRef {
//!     action: Action::AddExtent,
//!     bytenr: 2 << 30,
//!     num_bytes: 131072,
//!     owning_root: 256,
//!     root: 256,
//!     ino: 257,
//!     offset: 0,
//!     qgroup: Qgroup::ACCOUNT,
//! }
//! .build()?;
//! refs.add_data_ref(&mut h, &extent, 131072)?;
//!
//! refs.run(&tree, RunMode::All)?;
//! assert_eq!(tree.lookup(1 << 30).unwrap().refs, 1);
//! assert_eq!(tree.lookup(2 << 30).unwrap().refs, 1);
//! # Ok::<(), delayed_refs::Error>(())
//! ```

#![forbid(unsafe_code)]

use super::generic_ref::{GenericRef, RefPayload};
use super::geometry::MAX_LEVEL;
use super::kind::Action;
use crate::error::{Error, Result};

/// The qgroup inputs of a ref (the kernel's `mod_root` and `skip_qgroup`
/// arguments of `btrfs_init_tree_ref` / `btrfs_init_data_ref`).
///
/// A ref creates a qgroup extent record (when full accounting is on) unless
/// `skip` is set, its root is not an fs tree, or `mod_root` is set and is
/// not an fs tree (semantics.md §2.1; [`skip_qgroup`](super::generic_ref::skip_qgroup)).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Qgroup {
    /// The root whose change caused this ref (relocation passes the
    /// relocation tree), or 0 when it is the ref's own root.
    pub mod_root: u64,
    /// Never create a qgroup record for this ref.
    pub skip: bool,
}

impl Qgroup {
    /// Account the ref normally: `mod_root` 0, no skip.
    pub const ACCOUNT: Qgroup = Qgroup { mod_root: 0, skip: false };
    /// Never account the ref.
    pub const SKIP: Qgroup = Qgroup { mod_root: 0, skip: true };

    /// Account the ref as modified by `mod_root`.
    pub const fn modified_by(mod_root: u64) -> Qgroup {
        Qgroup { mod_root, skip: false }
    }
}

fn check_common(call: &'static str, action: Action, bytenr: u64, num_bytes: u64) -> Result<()> {
    if num_bytes == 0 {
        return Err(Error::ZeroLength { bytenr });
    }
    if action == Action::UpdateHead {
        return Err(Error::BadAction { call, action, what: "(a head update is an extent op: use add_extent_op)" });
    }
    Ok(())
}

/// A shared ref names its parent block and the tree that block is in.
fn check_shared(bytenr: u64, parent: u64, root: u64) -> Result<()> {
    if parent == 0 {
        return Err(Error::MissingParent { bytenr });
    }
    if root == 0 {
        return Err(Error::MissingRoot { bytenr });
    }
    Ok(())
}

fn check_level(bytenr: u64, level: u8) -> Result<()> {
    if u64::from(level) >= MAX_LEVEL {
        return Err(Error::BadLevel { bytenr, level });
    }
    Ok(())
}

/// A tree block backref (`TREE_BLOCK_REF`): block `bytenr` is referenced by
/// the tree `root` itself. For [`DelayedRefs::add_tree_ref`](crate::DelayedRefs::add_tree_ref).
///
/// ```
/// use delayed_refs::{Action, Error, Qgroup, RefKey, TreeRef};
/// let r = TreeRef { action: Action::Add, bytenr: 1 << 20, num_bytes: 16384, owning_root: 5, root: 5, level: 1,
///     qgroup: Qgroup::ACCOUNT };
/// let g = r.build().unwrap();
/// assert_eq!(g.ref_key(), RefKey::TreeBlock { root: 5 });
/// assert_eq!(g.level(), 1);
/// assert_eq!(TreeRef { root: 0, ..r }.build(), Err(Error::MissingRoot { bytenr: 1 << 20 }));
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct TreeRef {
    /// Add, drop, or add a newly allocated block (`AddExtent`).
    pub action: Action,
    /// Block start.
    pub bytenr: u64,
    /// Block size (the node size).
    pub num_bytes: u64,
    /// Root that owns the block; 0 is allowed on drops when unknown.
    pub owning_root: u64,
    /// The referencing tree (non-zero); part of the backref identity.
    pub root: u64,
    /// Block level, below the maximum tree height (8); not part of the identity.
    pub level: u8,
    /// Qgroup inputs.
    pub qgroup: Qgroup,
}

impl TreeRef {
    /// Check and convert: [`Error::ZeroLength`], [`Error::BadAction`] for
    /// `UpdateHead`, [`Error::MissingRoot`] for `root == 0`,
    /// [`Error::BadLevel`] for `level >= 8`.
    pub fn build(self) -> Result<GenericRef> {
        check_common("TreeRef::build", self.action, self.bytenr, self.num_bytes)?;
        if self.root == 0 {
            return Err(Error::MissingRoot { bytenr: self.bytenr });
        }
        check_level(self.bytenr, self.level)?;
        Ok(GenericRef::new(self.action, self.bytenr, self.num_bytes, 0, self.owning_root).tree(
            self.level,
            self.root,
            self.qgroup.mod_root,
            self.qgroup.skip,
        ))
    }
}

/// A shared block backref (`SHARED_BLOCK_REF`): block `bytenr` is referenced
/// by the tree block at `parent` (full backrefs, after a snapshot or during
/// relocation). For [`DelayedRefs::add_tree_ref`](crate::DelayedRefs::add_tree_ref).
///
/// `root` is the tree the block belongs to: it is not part of the backref,
/// but decides the tree-mod-log seq (fs trees only), qgroup accounting and
/// whether the head is a system (chunk tree) head.
///
/// ```
/// use delayed_refs::{Action, Error, Qgroup, RefKey, SharedBlockRef};
/// let r = SharedBlockRef { action: Action::Drop, bytenr: 1 << 20, num_bytes: 16384, owning_root: 256,
///     parent: 3 << 20, root: 256, level: 0, qgroup: Qgroup::ACCOUNT };
/// assert_eq!(r.build().unwrap().ref_key(), RefKey::SharedBlock { parent: 3 << 20 });
/// assert_eq!(SharedBlockRef { parent: 0, ..r }.build(), Err(Error::MissingParent { bytenr: 1 << 20 }));
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct SharedBlockRef {
    /// Add, drop, or add a newly allocated block (`AddExtent`).
    pub action: Action,
    /// Block start.
    pub bytenr: u64,
    /// Block size (the node size).
    pub num_bytes: u64,
    /// Root that owns the block; 0 is allowed on drops when unknown.
    pub owning_root: u64,
    /// The referencing parent block (non-zero); the backref identity.
    pub parent: u64,
    /// The tree the block belongs to (non-zero; see above).
    pub root: u64,
    /// Block level, below the maximum tree height (8); not part of the identity.
    pub level: u8,
    /// Qgroup inputs.
    pub qgroup: Qgroup,
}

impl SharedBlockRef {
    /// Check and convert: [`Error::ZeroLength`], [`Error::BadAction`] for
    /// `UpdateHead`, [`Error::MissingParent`] for `parent == 0`,
    /// [`Error::MissingRoot`] for `root == 0`, [`Error::BadLevel`] for
    /// `level >= 8`.
    pub fn build(self) -> Result<GenericRef> {
        check_common("SharedBlockRef::build", self.action, self.bytenr, self.num_bytes)?;
        check_shared(self.bytenr, self.parent, self.root)?;
        check_level(self.bytenr, self.level)?;
        Ok(GenericRef::new(self.action, self.bytenr, self.num_bytes, self.parent, self.owning_root).tree(
            self.level,
            self.root,
            self.qgroup.mod_root,
            self.qgroup.skip,
        ))
    }
}

/// An extent data backref (`EXTENT_DATA_REF`): data extent `bytenr` is
/// referenced by file `ino` of tree `root` at `offset` (the file offset minus
/// the offset inside the extent, so all file extents of one reflinked range
/// share a backref). For [`DelayedRefs::add_data_ref`](crate::DelayedRefs::add_data_ref).
///
/// ```
/// use delayed_refs::{Action, DataRef, Error, Qgroup, RefKey};
/// let r = DataRef { action: Action::Add, bytenr: 1 << 30, num_bytes: 8192, owning_root: 256, root: 256, ino: 257,
///     offset: 4096, qgroup: Qgroup::ACCOUNT };
/// assert_eq!(r.build().unwrap().ref_key(), RefKey::ExtentData { root: 256, objectid: 257, offset: 4096 });
/// assert_eq!(DataRef { num_bytes: 0, ..r }.build(), Err(Error::ZeroLength { bytenr: 1 << 30 }));
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct DataRef {
    /// Add, drop, or add a newly allocated extent (`AddExtent`).
    pub action: Action,
    /// Extent start.
    pub bytenr: u64,
    /// Extent length.
    pub num_bytes: u64,
    /// Root that owns the extent (for the data relocation tree, the source
    /// root); 0 is allowed on drops when unknown.
    pub owning_root: u64,
    /// The referencing tree (non-zero); part of the identity.
    pub root: u64,
    /// Inode number; part of the identity.
    pub ino: u64,
    /// File offset minus extent offset; part of the identity.
    pub offset: u64,
    /// Qgroup inputs.
    pub qgroup: Qgroup,
}

impl DataRef {
    /// Check and convert: [`Error::ZeroLength`], [`Error::BadAction`] for
    /// `UpdateHead`, [`Error::MissingRoot`] for `root == 0`.
    pub fn build(self) -> Result<GenericRef> {
        check_common("DataRef::build", self.action, self.bytenr, self.num_bytes)?;
        if self.root == 0 {
            return Err(Error::MissingRoot { bytenr: self.bytenr });
        }
        Ok(GenericRef::new(self.action, self.bytenr, self.num_bytes, 0, self.owning_root).data(
            self.root,
            self.ino,
            self.offset,
            self.qgroup.mod_root,
            self.qgroup.skip,
        ))
    }
}

/// A shared data backref (`SHARED_DATA_REF`): data extent `bytenr` is
/// referenced by a file extent item in the leaf at `parent`. For
/// [`DelayedRefs::add_data_ref`](crate::DelayedRefs::add_data_ref).
///
/// `root` is the tree the leaf belongs to: not part of the backref, but it
/// decides the tree-mod-log seq and qgroup accounting.
///
/// ```
/// use delayed_refs::{Action, Error, Qgroup, RefKey, SharedDataRef};
/// let r = SharedDataRef { action: Action::Add, bytenr: 1 << 30, num_bytes: 8192, owning_root: 256,
///     parent: 5 << 20, root: 256, qgroup: Qgroup::SKIP };
/// let g = r.build().unwrap();
/// assert_eq!(g.ref_key(), RefKey::SharedData { parent: 5 << 20 });
/// assert!(g.skip_qgroup);
/// assert_eq!(SharedDataRef { root: 0, ..r }.build(), Err(Error::MissingRoot { bytenr: 1 << 30 }));
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct SharedDataRef {
    /// Add, drop, or add a newly allocated extent (`AddExtent`).
    pub action: Action,
    /// Extent start.
    pub bytenr: u64,
    /// Extent length.
    pub num_bytes: u64,
    /// Root that owns the extent; 0 is allowed on drops when unknown.
    pub owning_root: u64,
    /// The referencing leaf (non-zero); the backref identity.
    pub parent: u64,
    /// The tree the leaf belongs to (non-zero; see above).
    pub root: u64,
    /// Qgroup inputs.
    pub qgroup: Qgroup,
}

impl SharedDataRef {
    /// Check and convert: [`Error::ZeroLength`], [`Error::BadAction`] for
    /// `UpdateHead`, [`Error::MissingParent`] for `parent == 0`,
    /// [`Error::MissingRoot`] for `root == 0`.
    pub fn build(self) -> Result<GenericRef> {
        check_common("SharedDataRef::build", self.action, self.bytenr, self.num_bytes)?;
        check_shared(self.bytenr, self.parent, self.root)?;
        Ok(GenericRef::new(self.action, self.bytenr, self.num_bytes, self.parent, self.owning_root).data(
            self.root,
            0,
            0,
            self.qgroup.mod_root,
            self.qgroup.skip,
        ))
    }
}

macro_rules! try_from_builder {
    ($($t:ty),*) => {$(
        impl TryFrom<$t> for GenericRef {
            type Error = Error;
            fn try_from(b: $t) -> Result<GenericRef> {
                b.build()
            }
        }
    )*};
}
try_from_builder!(TreeRef, SharedBlockRef, DataRef, SharedDataRef);

/// Whether a generic ref's payload was never set: [`GenericRef::new`] without
/// [`GenericRef::tree`] or [`GenericRef::data`] leaves a tree payload of root 0.
pub(crate) fn unfinished_tree_ref(gref: &GenericRef) -> bool {
    gref.parent == 0 && matches!(gref.payload, RefPayload::Tree { root: 0, .. })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::key::RefKey;
    use crate::domain::kind::roots;

    const B: u64 = 1 << 30;

    fn tree() -> TreeRef {
        TreeRef {
            action: Action::Add,
            bytenr: B,
            num_bytes: 16384,
            owning_root: 5,
            root: 5,
            level: 2,
            qgroup: Qgroup::ACCOUNT,
        }
    }
    fn shared_block() -> SharedBlockRef {
        SharedBlockRef {
            action: Action::Drop,
            bytenr: B,
            num_bytes: 16384,
            owning_root: 256,
            parent: 7 << 20,
            root: 256,
            level: 0,
            qgroup: Qgroup::ACCOUNT,
        }
    }
    fn data() -> DataRef {
        DataRef {
            action: Action::AddExtent,
            bytenr: B,
            num_bytes: 4096,
            owning_root: 256,
            root: 256,
            ino: 257,
            offset: 8192,
            qgroup: Qgroup::ACCOUNT,
        }
    }
    fn shared_data() -> SharedDataRef {
        SharedDataRef {
            action: Action::Add,
            bytenr: B,
            num_bytes: 4096,
            owning_root: 256,
            parent: 9 << 20,
            root: 256,
            qgroup: Qgroup::ACCOUNT,
        }
    }

    #[test]
    fn builders_equal_the_kernel_shaped_calls() {
        assert_eq!(tree().build(), Ok(GenericRef::new(Action::Add, B, 16384, 0, 5).tree(2, 5, 0, false)));
        assert_eq!(
            shared_block().build(),
            Ok(GenericRef::new(Action::Drop, B, 16384, 7 << 20, 256).tree(0, 256, 0, false))
        );
        assert_eq!(
            data().build(),
            Ok(GenericRef::new(Action::AddExtent, B, 4096, 0, 256).data(256, 257, 8192, 0, false))
        );
        assert_eq!(
            shared_data().build(),
            Ok(GenericRef::new(Action::Add, B, 4096, 9 << 20, 256).data(256, 0, 0, 0, false))
        );
        assert_eq!(tree().build().unwrap().ref_key(), RefKey::TreeBlock { root: 5 });
        assert_eq!(shared_block().build().unwrap().ref_key(), RefKey::SharedBlock { parent: 7 << 20 });
        assert_eq!(data().build().unwrap().ref_key(), RefKey::ExtentData { root: 256, objectid: 257, offset: 8192 });
        assert_eq!(shared_data().build().unwrap().ref_key(), RefKey::SharedData { parent: 9 << 20 });
        assert_eq!(GenericRef::try_from(tree()), tree().build());
        assert_eq!(GenericRef::try_from(shared_data()), shared_data().build());
    }

    #[test]
    fn qgroup_inputs() {
        assert!(!tree().build().unwrap().skip_qgroup);
        assert!(TreeRef { qgroup: Qgroup::SKIP, ..tree() }.build().unwrap().skip_qgroup);
        assert!(DataRef { qgroup: Qgroup::modified_by(roots::TREE_RELOC), ..data() }.build().unwrap().skip_qgroup);
        assert!(!DataRef { qgroup: Qgroup::modified_by(257), ..data() }.build().unwrap().skip_qgroup);
        assert!(TreeRef { root: roots::CHUNK_TREE, ..tree() }.build().unwrap().skip_qgroup, "not an fs tree");
    }

    #[test]
    fn zero_length() {
        let e = Err(Error::ZeroLength { bytenr: B });
        assert_eq!(TreeRef { num_bytes: 0, ..tree() }.build(), e);
        assert_eq!(SharedBlockRef { num_bytes: 0, ..shared_block() }.build(), e);
        assert_eq!(DataRef { num_bytes: 0, ..data() }.build(), e);
        assert_eq!(SharedDataRef { num_bytes: 0, ..shared_data() }.build(), e);
    }

    #[test]
    fn head_update_is_not_a_ref() {
        let u = Action::UpdateHead;
        let bad = |r: Result<GenericRef>, call: &str| {
            assert!(
                matches!(r, Err(Error::BadAction { call: c, action: Action::UpdateHead, .. }) if c == call),
                "{r:?}"
            );
        };
        bad(TreeRef { action: u, ..tree() }.build(), "TreeRef::build");
        bad(SharedBlockRef { action: u, ..shared_block() }.build(), "SharedBlockRef::build");
        bad(DataRef { action: u, ..data() }.build(), "DataRef::build");
        bad(SharedDataRef { action: u, ..shared_data() }.build(), "SharedDataRef::build");
    }

    #[test]
    fn missing_root_and_parent() {
        let root = Err(Error::MissingRoot { bytenr: B });
        assert_eq!(TreeRef { root: 0, ..tree() }.build(), root);
        assert_eq!(SharedBlockRef { root: 0, ..shared_block() }.build(), root);
        assert_eq!(DataRef { root: 0, ..data() }.build(), root);
        assert_eq!(SharedDataRef { root: 0, ..shared_data() }.build(), root);
        let parent = Err(Error::MissingParent { bytenr: B });
        assert_eq!(SharedBlockRef { parent: 0, ..shared_block() }.build(), parent);
        assert_eq!(SharedDataRef { parent: 0, ..shared_data() }.build(), parent);
    }

    #[test]
    fn level_below_tree_height() {
        assert!(TreeRef { level: 7, ..tree() }.build().is_ok());
        assert_eq!(TreeRef { level: 8, ..tree() }.build(), Err(Error::BadLevel { bytenr: B, level: 8 }));
        assert_eq!(
            SharedBlockRef { level: 200, ..shared_block() }.build(),
            Err(Error::BadLevel { bytenr: B, level: 200 })
        );
    }

    #[test]
    fn unfinished_generic_ref_is_detected() {
        assert!(unfinished_tree_ref(&GenericRef::new(Action::Add, B, 16384, 0, 5)));
        assert!(!unfinished_tree_ref(&tree().build().unwrap()));
        assert!(!unfinished_tree_ref(&shared_block().build().unwrap()));
        assert!(!unfinished_tree_ref(&data().build().unwrap()));
    }
}
