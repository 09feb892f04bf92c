//! Ref identity and the node order (semantics.md §2.2, §3.1).

#![forbid(unsafe_code)]

use std::cmp::Ordering;

use super::kind::RefType;

/// The identity of a backref, without the tree-mod-log seq (semantics.md §2.2).
///
/// A tree ref's `level` is deliberately not part of the identity.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum RefKey {
    /// `TREE_BLOCK_REF` keyed by the referencing root.
    TreeBlock {
        /// Referencing root id.
        root: u64,
    },
    /// `EXTENT_DATA_REF` keyed by (root, inode, file offset - extent offset).
    ExtentData {
        /// Referencing root id.
        root: u64,
        /// Inode number.
        objectid: u64,
        /// File offset minus extent offset.
        offset: u64,
    },
    /// `SHARED_BLOCK_REF` keyed by the parent tree block.
    SharedBlock {
        /// Parent block bytenr.
        parent: u64,
    },
    /// `SHARED_DATA_REF` keyed by the parent tree block.
    SharedData {
        /// Parent block bytenr.
        parent: u64,
    },
}

impl RefKey {
    /// The key type of this identity.
    pub fn ref_type(&self) -> RefType {
        match self {
            RefKey::TreeBlock { .. } => RefType::TreeBlock,
            RefKey::ExtentData { .. } => RefType::ExtentData,
            RefKey::SharedBlock { .. } => RefType::SharedBlock,
            RefKey::SharedData { .. } => RefType::SharedData,
        }
    }

    /// Whether this is a data backref.
    pub fn is_data(&self) -> bool {
        self.ref_type().is_data()
    }

    /// The identity with type code `ty` (`RefType as u8`) and `fields` (as
    /// [`RefKey::fields`] gives them); `None` for an unknown type code.
    pub(crate) fn from_parts(ty: u8, fields: [u64; 3]) -> Option<RefKey> {
        let [a, b, c] = fields;
        Some(match ty {
            t if t == RefType::TreeBlock as u8 => RefKey::TreeBlock { root: a },
            t if t == RefType::ExtentData as u8 => RefKey::ExtentData { root: a, objectid: b, offset: c },
            t if t == RefType::SharedBlock as u8 => RefKey::SharedBlock { parent: a },
            t if t == RefType::SharedData as u8 => RefKey::SharedData { parent: a },
            _ => return None,
        })
    }

    /// The type-specific fields in comparison order (§3.1 step 2); unused
    /// slots are zero and only ever compared against refs of the same type.
    pub(crate) fn fields(&self) -> [u64; 3] {
        match *self {
            RefKey::TreeBlock { root } => [root, 0, 0],
            RefKey::ExtentData { root, objectid, offset } => [root, objectid, offset],
            RefKey::SharedBlock { parent } | RefKey::SharedData { parent } => [parent, 0, 0],
        }
    }

    /// Compare two identities: type code, then the type's fields (§3.1 steps 1-2).
    pub fn cmp_identity(&self, other: &RefKey) -> Ordering {
        (self.ref_type() as u8).cmp(&(other.ref_type() as u8)).then_with(|| self.fields().cmp(&other.fields()))
    }
}

impl PartialOrd for RefKey {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for RefKey {
    fn cmp(&self, other: &Self) -> Ordering {
        self.cmp_identity(other)
    }
}

/// The identity of a queued node: backref identity plus tree-mod-log seq.
///
/// Its `Ord` is the insertion order `comp_refs(.., check_seq = true)`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct NodeKey {
    /// Backref identity.
    pub key: RefKey,
    /// Tree-mod-log seq at creation; 0 for non-fs-tree roots.
    pub seq: u64,
}

/// The node comparator of semantics.md §3.1. `check_seq = true` is the insertion
/// order (equal ⇒ same node ⇒ merge); `false` finds "same backref, other seq"
/// for the merge pass (§5.1).
///
/// A sign slip in the kernel's version of this function (semantics.md §11.2) broke
/// antisymmetry; `tests/comparator.rs` checks the order laws as properties.
pub fn comp_refs(a: &NodeKey, b: &NodeKey, check_seq: bool) -> Ordering {
    let ord = a.key.cmp_identity(&b.key);
    if ord != Ordering::Equal || !check_seq {
        return ord;
    }
    a.seq.cmp(&b.seq)
}

impl PartialOrd for NodeKey {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for NodeKey {
    fn cmp(&self, other: &Self) -> Ordering {
        comp_refs(self, other, true)
    }
}
