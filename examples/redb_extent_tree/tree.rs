//! `RedbExtentTree`: a durable extent tree in a redb database, written
//! against the backend contract (docs/backend.md).
//!
//! - **One write transaction per head** (`begin_head` .. `end_head`),
//!   committed without fsync (`Durability::None`), so two runners never
//!   wait on each other for longer than one head, and **one durable commit
//!   per run** (`end_run`, `Durability::Immediate`), which makes every head
//!   the run committed before it durable and records the run in a journal.
//!   After a crash the database is what the last durable commit left: the
//!   state at the end of the last completed run (docs/backend.md §4).
//! - **Lookups see applied refs at once**: a ref that `apply_ref` accepted
//!   is in its head's open transaction, which readers cannot see yet, so
//!   the extent's new refs and flags also go into an overlay that `lookup`
//!   reads first, until the head's transaction commits. Without it,
//!   `lookup_extent_info` (disk plus pending) would miss a ref that left the
//!   queue but is not committed.
//! - **Errors**: the strict rules of `MemExtentTree` (no item to add to, a
//!   backref below zero, a tree ref with a count other than 1) are checked
//!   before anything is written and come back as the matching
//!   `ExtentError`; a redb failure comes back as `ExtentError::Storage` and
//!   poisons the head's transaction, so that `end_head` refuses to commit a
//!   half-written head (an `Abort` for the caller, docs/backend.md §5).
//!
//! Shared by `examples/redb_extent_tree/main.rs` and the stress binary's
//! `--backend redb`.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use delayed_refs::{
    Action, Batch, BatchEnd, EXTENT_FLAG_DATA, EXTENT_FLAG_TREE_BLOCK, ExtentError, ExtentInfo, ExtentItem, ExtentOp,
    ExtentTree, OpRun, Pin, RefKey, RefRun,
};
use redb::{Database, Durability, ReadableTable, ReadableTableMetadata, TableDefinition, WriteTransaction};

/// bytenr -> (refs, flags, num_bytes, is_data, level).
const EXTENTS: TableDefinition<u64, (u64, u64, u64, bool, u8)> = TableDefinition::new("extents");
/// (bytenr, key kind, a, b, c) -> count.
const BACKREFS: TableDefinition<(u64, u8, u64, u64, u64), u64> = TableDefinition::new("backrefs");
/// Named counters: `last_run`, `label`, `transid`, `pinned_bytes`.
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
/// Journal: (transid, run id) -> refs that run applied (written by its
/// durable commit; run ids restart with each delayed-ref root).
const RUNS: TableDefinition<(u64, u64), u64> = TableDefinition::new("runs");

/// A backref as a redb key.
fn backref_key(bytenr: u64, key: &RefKey) -> (u64, u8, u64, u64, u64) {
    match *key {
        RefKey::TreeBlock { root } => (bytenr, 0, root, 0, 0),
        RefKey::SharedBlock { parent } => (bytenr, 1, parent, 0, 0),
        RefKey::ExtentData { root, objectid, offset } => (bytenr, 2, root, objectid, offset),
        RefKey::SharedData { parent } => (bytenr, 3, parent, 0, 0),
    }
}

/// The backref a redb key names.
fn ref_key((_, kind, a, b, c): (u64, u8, u64, u64, u64)) -> RefKey {
    match kind {
        0 => RefKey::TreeBlock { root: a },
        1 => RefKey::SharedBlock { parent: a },
        2 => RefKey::ExtentData { root: a, objectid: b, offset: c },
        _ => RefKey::SharedData { parent: a },
    }
}

/// A redb error, boxed (redb's error type is large).
pub type DbError = Box<redb::Error>;

/// Box a redb error.
fn db(e: impl Into<redb::Error>) -> DbError {
    Box::new(e.into())
}

/// A redb error as the backend's own failure.
fn storage(e: impl Into<redb::Error>) -> ExtentError {
    ExtentError::storage(e.into())
}

/// The run that wrote an overlay entry: (transid, run).
type Owner = (u64, u64);

/// The open transaction of one run's current head.
struct HeadTxn {
    txn: WriteTransaction,
    bytenr: u64,
    /// A write failed half-way: the transaction must not commit.
    poisoned: bool,
}

/// One run's state between `begin_run` and `end_run`.
#[derive(Default)]
struct RunState {
    head: Option<HeadTxn>,
    applied: u64,
    /// Head transactions this run committed (refs, ops or pins).
    committed_heads: u64,
}

/// A durable extent tree in one redb file (see the module docs).
pub struct RedbExtentTree {
    db: Database,
    runs: Mutex<HashMap<u64, RunState>>,
    /// Refs and flags of extents changed by a head transaction that has not
    /// committed yet (`None`: the item was deleted), with the run that owns
    /// the entry: `end_head` comes after the head was released, so the next
    /// run of the same extent may have written its own entry by then, which
    /// the first run's `end_head` must leave alone.
    overlay: Mutex<HashMap<u64, (Owner, Option<ExtentInfo>)>>,
    /// What `end_run` stamps as `label` with the run (the example's round).
    label: AtomicU64,
    applied: AtomicU64,
    durable_commits: AtomicU64,
}

impl RedbExtentTree {
    /// Create (or open) the database at `path`.
    pub fn open(path: &Path) -> Result<Self, DbError> {
        let database = Database::create(path).map_err(db)?;
        let txn = database.begin_write().map_err(db)?;
        txn.open_table(EXTENTS).map_err(db)?;
        txn.open_table(BACKREFS).map_err(db)?;
        txn.open_table(META).map_err(db)?;
        txn.open_table(RUNS).map_err(db)?;
        txn.commit().map_err(db)?;
        Ok(RedbExtentTree {
            db: database,
            runs: Mutex::new(HashMap::new()),
            overlay: Mutex::new(HashMap::new()),
            label: AtomicU64::new(0),
            applied: AtomicU64::new(0),
            durable_commits: AtomicU64::new(0),
        })
    }

    /// Set the label the next durable commits record (`meta.label`).
    pub fn set_label(&self, label: u64) {
        // Relaxed: the caller sets it before starting the run whose
        // end_run reads it; the run's thread start or the caller's own
        // program order orders the two.
        self.label.store(label, Ordering::Relaxed);
    }

    /// Refs applied through this handle (merged runs).
    pub fn applied_refs(&self) -> u64 {
        // Relaxed: statistics, exact once the runners are joined.
        self.applied.load(Ordering::Relaxed)
    }

    /// Durable commits made (one per run that applied anything).
    pub fn durable_commits(&self) -> u64 {
        self.durable_commits.load(Ordering::Relaxed)
    }

    /// A named counter of the committed state (`last_run`, `label`,
    /// `transid`, `pinned_bytes`), 0 if never written.
    pub fn meta(&self, name: &str) -> Result<u64, DbError> {
        let r = self.db.begin_read().map_err(db)?;
        Ok(r.open_table(META).map_err(db)?.get(name).map_err(db)?.map_or(0, |v| v.value()))
    }

    /// Runs in the journal, by (transid, run), and the refs they applied.
    pub fn journal(&self) -> Result<BTreeMap<(u64, u64), u64>, DbError> {
        let r = self.db.begin_read().map_err(db)?;
        let t = r.open_table(RUNS).map_err(db)?;
        let mut out = BTreeMap::new();
        for e in t.iter().map_err(db)? {
            let (k, v) = e.map_err(db)?;
            out.insert(k.value(), v.value());
        }
        Ok(out)
    }

    /// Every committed item with its backrefs, in the shape of
    /// `MemExtentTree::items`.
    pub fn items(&self) -> Result<BTreeMap<u64, ExtentItem>, DbError> {
        let r = self.db.begin_read().map_err(db)?;
        let mut out = BTreeMap::new();
        for e in r.open_table(EXTENTS).map_err(db)?.iter().map_err(db)? {
            let (k, v) = e.map_err(db)?;
            let (refs, flags, num_bytes, is_data, level) = v.value();
            let item = ExtentItem { num_bytes, is_data, refs, flags, level, key: None, backrefs: BTreeMap::new() };
            out.insert(k.value(), item);
        }
        for e in r.open_table(BACKREFS).map_err(db)?.iter().map_err(db)? {
            let (k, v) = e.map_err(db)?;
            let k = k.value();
            if let Some(item) = out.get_mut(&k.0) {
                item.backrefs.insert(ref_key(k), v.value());
            }
        }
        Ok(out)
    }

    /// Check the committed state on its own: every item's refs equal the sum
    /// of its backrefs, no backref without an item, no zero count.
    pub fn check_consistent(&self) -> Result<(), String> {
        let r = self.db.begin_read().map_err(|e| e.to_string())?;
        let items = self.items().map_err(|e| e.to_string())?;
        for (b, item) in &items {
            let sum: u64 = item.backrefs.values().sum();
            if sum != item.refs || item.refs == 0 {
                return Err(format!("extent {b}: refs {} but backrefs sum to {sum}", item.refs));
            }
        }
        let backrefs = r.open_table(BACKREFS).map_err(|e| e.to_string())?;
        let n = backrefs.len().map_err(|e| e.to_string())?;
        let counted: usize = items.values().map(|i| i.backrefs.len()).sum();
        if n as usize != counted {
            return Err(format!("{} backrefs belong to no item", n as usize - counted));
        }
        Ok(())
    }

    /// Drop `batch`'s overlay entry for `bytenr`, unless a later run of the
    /// extent owns it now.
    fn forget(&self, batch: Batch, bytenr: u64) {
        let mut overlay = self.overlay.lock().unwrap();
        if overlay.get(&bytenr).is_some_and(|(owner, _)| *owner == (batch.transid, batch.run)) {
            overlay.remove(&bytenr);
        }
    }

    /// Run `f` on the open head transaction of `batch`'s run.
    fn in_head<T>(
        &self,
        batch: Batch,
        f: impl FnOnce(&WriteTransaction) -> Result<T, ExtentError>,
    ) -> Result<T, ExtentError> {
        let mut runs = self.runs.lock().unwrap();
        let head = runs.get_mut(&batch.run).and_then(|r| r.head.as_mut()).ok_or_else(|| {
            ExtentError::storage(std::io::Error::other("a backend call outside begin_head..end_head"))
        })?;
        let r = f(&head.txn);
        if matches!(r, Err(ExtentError::Storage(_))) {
            head.poisoned = true;
        }
        r
    }

    /// Apply one merged ref inside `txn` (the rules of `MemExtentTree`:
    /// checked before anything is written). Returns the extent's new state.
    fn apply(txn: &WriteTransaction, run: &RefRun<'_>) -> Result<Option<ExtentInfo>, ExtentError> {
        let bytenr = run.bytenr;
        if !run.key.is_data() && run.ref_mod != 1 {
            return Err(ExtentError::TreeRefMod { bytenr, key: run.key, ref_mod: run.ref_mod });
        }
        if run.key.is_data() != run.is_data {
            return Err(ExtentError::KindMismatch { bytenr });
        }
        let mut extents = txn.open_table(EXTENTS).map_err(storage)?;
        let mut backrefs = txn.open_table(BACKREFS).map_err(storage)?;
        let bk = backref_key(bytenr, &run.key);
        let item = extents.get(bytenr).map_err(storage)?.map(|v| v.value());
        let have = backrefs.get(bk).map_err(storage)?.map_or(0, |v| v.value());
        let insert = matches!(run.action, Action::Add | Action::AddExtent) && run.insert_reserved;
        let (mut refs, mut flags, num_bytes, is_data, level) = match (item, insert) {
            (Some(_), true) => return Err(ExtentError::AlreadyExists { bytenr }),
            (None, true) => {
                let flags = if run.is_data { EXTENT_FLAG_DATA } else { EXTENT_FLAG_TREE_BLOCK };
                (0, flags, run.num_bytes, run.is_data, run.level)
            }
            (None, false) => return Err(ExtentError::MissingExtent { bytenr }),
            (Some(i), false) if i.3 != run.is_data => return Err(ExtentError::KindMismatch { bytenr }),
            (Some(i), false) => i,
        };
        let dropping = matches!(run.action, Action::Drop | Action::UpdateHead);
        if dropping && have < run.ref_mod {
            return Err(ExtentError::BackrefUnderflow { bytenr, key: run.key, have, drop: run.ref_mod });
        }
        if dropping {
            refs -= run.ref_mod;
            if have == run.ref_mod {
                backrefs.remove(bk).map_err(storage)?;
            } else {
                backrefs.insert(bk, have - run.ref_mod).map_err(storage)?;
            }
        } else {
            refs += run.ref_mod;
            backrefs.insert(bk, have + run.ref_mod).map_err(storage)?;
        }
        if refs == 0 {
            // The last ref frees the extent; nothing else is applied.
            extents.remove(bytenr).map_err(storage)?;
            return Ok(None);
        }
        if let Some(op) = run.extent_op {
            flags = with_op(flags, op);
        }
        extents.insert(bytenr, (refs, flags, num_bytes, is_data, level)).map_err(storage)?;
        Ok(Some(ExtentInfo { refs, flags }))
    }
}

/// The flags after an extent op.
fn with_op(flags: u64, op: &ExtentOp) -> u64 {
    if op.update_flags { flags | op.flags_to_set } else { flags }
}

impl ExtentTree for RedbExtentTree {
    fn apply_ref(&self, run: &RefRun<'_>) -> Result<(), ExtentError> {
        // The overlay entry is written before this call returns: until
        // then the root hides the taken ref from readers (the lock-free
        // root's seqlock window, the locked port's head token), after it a
        // lookup finds the new count here until the head's transaction
        // commits, and in the database after.
        let info = self.in_head(run.batch, |txn| Self::apply(txn, run))?;
        self.overlay.lock().unwrap().insert(run.bytenr, ((run.batch.transid, run.batch.run), info));
        if let Some(r) = self.runs.lock().unwrap().get_mut(&run.batch.run) {
            r.applied += 1;
        }
        self.applied.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    fn apply_extent_op(&self, run: &OpRun<'_>) -> Result<(), ExtentError> {
        let bytenr = run.bytenr;
        let info = self.in_head(run.batch, |txn| {
            let mut extents = txn.open_table(EXTENTS).map_err(storage)?;
            let Some(item) = extents.get(bytenr).map_err(storage)?.map(|v| v.value()) else {
                return Err(ExtentError::MissingExtent { bytenr });
            };
            let (refs, flags, num_bytes, is_data, level) = item;
            let flags = with_op(flags, run.op);
            extents.insert(bytenr, (refs, flags, num_bytes, is_data, level)).map_err(storage)?;
            Ok(ExtentInfo { refs, flags })
        })?;
        self.overlay.lock().unwrap().insert(bytenr, ((run.batch.transid, run.batch.run), Some(info)));
        Ok(())
    }

    fn pin_reserved(&self, pin: &Pin) -> Result<(), ExtentError> {
        let add = |txn: &WriteTransaction| -> Result<(), ExtentError> {
            let mut meta = txn.open_table(META).map_err(storage)?;
            let had = meta.get("pinned_bytes").map_err(storage)?.map_or(0, |v| v.value());
            meta.insert("pinned_bytes", had + pin.num_bytes).map_err(storage)?;
            Ok(())
        };
        if pin.batch.run != 0 {
            return self.in_head(pin.batch, add);
        }
        // Abort cleanup: no run, a transaction of its own.
        let txn = self.db.begin_write().map_err(storage)?;
        add(&txn)?;
        txn.commit().map_err(storage)
    }

    fn lookup(&self, bytenr: u64) -> Result<Option<ExtentInfo>, ExtentError> {
        if let Some((_, info)) = self.overlay.lock().unwrap().get(&bytenr) {
            return Ok(*info);
        }
        let r = self.db.begin_read().map_err(storage)?;
        let t = r.open_table(EXTENTS).map_err(storage)?;
        Ok(t.get(bytenr).map_err(storage)?.map(|v| {
            let (refs, flags, ..) = v.value();
            ExtentInfo { refs, flags }
        }))
    }

    fn begin_run(&self, batch: Batch) -> Result<(), ExtentError> {
        self.runs.lock().unwrap().insert(batch.run, RunState::default());
        Ok(())
    }

    fn begin_head(&self, batch: Batch, bytenr: u64) -> Result<(), ExtentError> {
        // One writer at a time: this waits while another runner's head
        // transaction is open (one head's worth of work).
        let mut txn = self.db.begin_write().map_err(storage)?;
        txn.set_durability(Durability::None);
        let mut runs = self.runs.lock().unwrap();
        let run = runs.entry(batch.run).or_default();
        run.head = Some(HeadTxn { txn, bytenr, poisoned: false });
        Ok(())
    }

    fn end_head(&self, batch: Batch, bytenr: u64, _end: BatchEnd) -> Result<(), ExtentError> {
        let head = self.runs.lock().unwrap().get_mut(&batch.run).and_then(|r| r.head.take());
        let Some(head) = head else { return Ok(()) };
        debug_assert_eq!(head.bytenr, bytenr);
        if head.poisoned {
            // Dropping the transaction aborts it; what this head applied
            // before the failure is lost with it, which only an abort of
            // the delayed-ref transaction can answer.
            drop(head.txn);
            self.forget(batch, bytenr);
            return Err(ExtentError::storage(std::io::Error::other("a write failed half-way; head aborted")));
        }
        // Whatever the end: refs that apply_ref accepted have left the queue.
        let committed = head.txn.commit().map_err(storage);
        self.forget(batch, bytenr);
        committed?;
        if let Some(r) = self.runs.lock().unwrap().get_mut(&batch.run) {
            r.committed_heads += 1;
        }
        Ok(())
    }

    fn end_run(&self, batch: Batch, _end: BatchEnd) -> Result<(), ExtentError> {
        let Some(state) = self.runs.lock().unwrap().remove(&batch.run) else { return Ok(()) };
        if state.committed_heads == 0 {
            return Ok(());
        }
        // The durable commit: it makes this run's head commits (and any
        // other committed before it) survive a crash, with the journal.
        let txn = self.db.begin_write().map_err(storage)?;
        {
            let mut meta = txn.open_table(META).map_err(storage)?;
            meta.insert("last_run", batch.run).map_err(storage)?;
            meta.insert("transid", batch.transid).map_err(storage)?;
            meta.insert("label", self.label.load(Ordering::Relaxed)).map_err(storage)?;
            let mut runs = txn.open_table(RUNS).map_err(storage)?;
            runs.insert((batch.transid, batch.run), state.applied).map_err(storage)?;
        }
        txn.commit().map_err(storage)?;
        self.durable_commits.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }
}
