//! Actions, ref key types and root ids (semantics.md §1.3).

#![forbid(unsafe_code)]

/// What a queued change does to an extent's reference count (semantics.md §1.3).
///
/// Nodes only ever carry [`Action::Add`] or [`Action::Drop`]; the other two
/// actions exist on the input side only.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[repr(u8)]
pub enum Action {
    /// Add one backref (`ADD_DELAYED_REF`).
    Add = 1,
    /// Drop one backref (`DROP_DELAYED_REF`).
    Drop = 2,
    /// Add the first backref of a freshly allocated extent whose item is not
    /// yet in the extent tree (`ADD_DELAYED_EXTENT`, sets must_insert_reserved).
    AddExtent = 3,
    /// Queue only an extent op on the head (`UPDATE_DELAYED_HEAD`).
    UpdateHead = 4,
}

impl Action {
    /// The signed contribution of one call with this action to a head's
    /// `ref_mod` / `total_ref_mod` (semantics.md §4.4 step 2).
    pub fn count_mod(self) -> i64 {
        match self {
            Action::Add | Action::AddExtent => 1,
            Action::Drop => -1,
            Action::UpdateHead => 0,
        }
    }

    /// The action a node created by this call carries (semantics.md §4.3).
    pub fn node_action(self) -> Action {
        match self {
            Action::AddExtent => Action::Add,
            a => a,
        }
    }

    /// The kernel's trace spelling of this action.
    pub fn trace_name(self) -> &'static str {
        match self {
            Action::Add => "ADD_DELAYED_REF",
            Action::Drop => "DROP_DELAYED_REF",
            Action::AddExtent => "ADD_DELAYED_EXTENT",
            Action::UpdateHead => "UPDATE_DELAYED_HEAD",
        }
    }
}

/// On-disk backref key types (semantics.md §1.3). The discriminants are the key type
/// codes, which are also the first field of the node order (§3.1).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[repr(u8)]
pub enum RefType {
    /// `TREE_BLOCK_REF`: a tree block referenced by a root.
    TreeBlock = 176,
    /// `EXTENT_DATA_REF`: a data extent referenced by (root, inode, offset).
    ExtentData = 178,
    /// `SHARED_BLOCK_REF`: a tree block referenced by a parent block.
    SharedBlock = 182,
    /// `SHARED_DATA_REF`: a data extent referenced by a parent block.
    SharedData = 184,
}

impl RefType {
    /// Whether this type belongs to a data extent.
    pub fn is_data(self) -> bool {
        matches!(self, RefType::ExtentData | RefType::SharedData)
    }

    /// The type for a tree (`is_data == false`) or data ref with this parent
    /// (semantics.md §1.3 "type choice").
    pub fn choose(is_data: bool, parent: u64) -> RefType {
        match (is_data, parent != 0) {
            (false, false) => RefType::TreeBlock,
            (false, true) => RefType::SharedBlock,
            (true, false) => RefType::ExtentData,
            (true, true) => RefType::SharedData,
        }
    }

    /// Parse a key type code.
    pub fn from_code(code: u8) -> Option<RefType> {
        Some(match code {
            176 => RefType::TreeBlock,
            178 => RefType::ExtentData,
            182 => RefType::SharedBlock,
            184 => RefType::SharedData,
            _ => return None,
        })
    }
}

/// Well-known root ids (semantics.md §1.3).
pub mod roots {
    /// The chunk tree: refs rooted here mark a head `is_system`.
    pub const CHUNK_TREE: u64 = 3;
    /// The default subvolume.
    pub const FS_TREE: u64 = 5;
    /// First id available to subvolumes.
    pub const FIRST_FREE: u64 = 256;
    /// Log trees (-6 as u64).
    pub const TREE_LOG: u64 = (-6i64) as u64;
    /// Relocation trees (-8 as u64).
    pub const TREE_RELOC: u64 = (-8i64) as u64;
    /// The data relocation tree (-9 as u64).
    pub const DATA_RELOC: u64 = (-9i64) as u64;
}

/// Whether `root` is a subvolume tree whose refs carry a tree-mod-log seq and
/// qgroup accounting (semantics.md §1.3): 5, or at least 256 with qgroup level 0.
pub fn is_fstree(root: u64) -> bool {
    root == roots::FS_TREE || ((root as i64) >= roots::FIRST_FREE as i64 && root >> 48 == 0)
}

/// Extent item flag: the item describes data.
pub const EXTENT_FLAG_DATA: u64 = 0x1;
/// Extent item flag: the item describes a tree block.
pub const EXTENT_FLAG_TREE_BLOCK: u64 = 0x2;
/// Tree block flag: backrefs are kept by parent (`FULL_BACKREF`).
pub const BLOCK_FLAG_FULL_BACKREF: u64 = 0x100;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fstree_ids() {
        assert!(is_fstree(5));
        assert!(is_fstree(256));
        assert!(is_fstree((1 << 48) - 1));
        assert!(!is_fstree(1 << 48));
        assert!(!is_fstree(roots::CHUNK_TREE));
        assert!(!is_fstree(255));
        assert!(!is_fstree(roots::TREE_RELOC));
        assert!(!is_fstree(roots::DATA_RELOC));
        assert!(!is_fstree(roots::TREE_LOG));
    }

    #[test]
    fn type_choice() {
        assert_eq!(RefType::choose(false, 0), RefType::TreeBlock);
        assert_eq!(RefType::choose(false, 9), RefType::SharedBlock);
        assert_eq!(RefType::choose(true, 0), RefType::ExtentData);
        assert_eq!(RefType::choose(true, 9), RefType::SharedData);
        for t in [176u8, 178, 182, 184] {
            assert_eq!(RefType::from_code(t).unwrap() as u8, t);
        }
        assert_eq!(RefType::from_code(172), None);
    }

    #[test]
    fn count_mods() {
        assert_eq!(Action::Add.count_mod(), 1);
        assert_eq!(Action::AddExtent.count_mod(), 1);
        assert_eq!(Action::Drop.count_mod(), -1);
        assert_eq!(Action::UpdateHead.count_mod(), 0);
        assert_eq!(Action::AddExtent.node_action(), Action::Add);
    }
}
