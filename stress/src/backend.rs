//! `--backend`: the extent tree under the workloads. `mem` (the default) is
//! the strict in-memory tree; `redb` is the durable tree of
//! `examples/redb_extent_tree` (one redb transaction per head, a durable
//! commit per run) in a fresh file under the temporary directory, removed
//! when the round ends. Both are checked against the same oracle.

use std::collections::BTreeMap;
use std::path::PathBuf;

use delayed_refs::{
    Batch, BatchEnd, ExtentError, ExtentInfo, ExtentItem, ExtentTree, MemExtentTree, OpRun, Pin, RefRun,
};

#[path = "../../examples/redb_extent_tree/tree.rs"]
#[allow(dead_code)]
mod redb_tree;

use redb_tree::RedbExtentTree;

/// The flag's values.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum BackendKind {
    /// The strict in-memory extent tree.
    #[default]
    Mem,
    /// A redb database file (examples/redb_extent_tree/tree.rs).
    Redb,
}

/// One round's extent tree.
pub enum Backend {
    /// In memory.
    Mem(MemExtentTree),
    /// In a redb file, removed on drop.
    Redb(RedbExtentTree, PathBuf),
}

impl BackendKind {
    /// The flag's spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            BackendKind::Mem => "mem",
            BackendKind::Redb => "redb",
        }
    }
}

impl Backend {
    /// A fresh, empty tree of `kind`.
    pub fn new(kind: BackendKind) -> Backend {
        match kind {
            BackendKind::Mem => Backend::Mem(MemExtentTree::new()),
            BackendKind::Redb => {
                let nanos =
                    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos());
                let path =
                    std::env::temp_dir().join(format!("delayed-refs-stress-{}-{nanos}.redb", std::process::id()));
                let t =
                    RedbExtentTree::open(&path).unwrap_or_else(|e| panic!("stress: redb at {}: {e}", path.display()));
                Backend::Redb(t, path)
            }
        }
    }

    /// Every item with its backrefs (the committed state for redb).
    pub fn items(&self) -> BTreeMap<u64, ExtentItem> {
        match self {
            Backend::Mem(t) => t.items(),
            Backend::Redb(t, _) => t.items().unwrap_or_else(|e| panic!("stress: reading redb: {e}")),
        }
    }

    /// Refs applied so far.
    pub fn applied_refs(&self) -> u64 {
        match self {
            Backend::Mem(t) => t.applied_refs(),
            Backend::Redb(t, _) => t.applied_refs(),
        }
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        if let Backend::Redb(_, path) = self {
            let _ = std::fs::remove_file(path);
        }
    }
}

/// Forward one call to whichever tree it is.
macro_rules! both {
    ($self:ident, $t:ident => $call:expr) => {
        match $self {
            Backend::Mem($t) => $call,
            Backend::Redb($t, _) => $call,
        }
    };
}

impl ExtentTree for Backend {
    fn apply_ref(&self, run: &RefRun<'_>) -> Result<(), ExtentError> {
        both!(self, t => t.apply_ref(run))
    }

    fn apply_extent_op(&self, run: &OpRun<'_>) -> Result<(), ExtentError> {
        both!(self, t => t.apply_extent_op(run))
    }

    fn pin_reserved(&self, pin: &Pin) -> Result<(), ExtentError> {
        both!(self, t => t.pin_reserved(pin))
    }

    fn lookup(&self, bytenr: u64) -> Result<Option<ExtentInfo>, ExtentError> {
        both!(self, t => ExtentTree::lookup(t, bytenr))
    }

    fn begin_run(&self, batch: Batch) -> Result<(), ExtentError> {
        both!(self, t => t.begin_run(batch))
    }

    fn end_run(&self, batch: Batch, end: BatchEnd) -> Result<(), ExtentError> {
        both!(self, t => t.end_run(batch, end))
    }

    fn begin_head(&self, batch: Batch, bytenr: u64) -> Result<(), ExtentError> {
        both!(self, t => t.begin_head(batch, bytenr))
    }

    fn end_head(&self, batch: Batch, bytenr: u64, end: BatchEnd) -> Result<(), ExtentError> {
        both!(self, t => t.end_head(batch, bytenr, end))
    }
}
