//! From a run directory to replay plans: per segment the before and after
//! dumps, the add calls grouped into transactions ("batches"), and the
//! kernel's own runs as a second oracle.
//!
//! Transaction boundaries. A `btrfs_transaction_commit` event is emitted at
//! the very end of `btrfs_commit_transaction`, after the transaction was
//! unblocked: by then the next transaction may already have queued refs
//! (and even reallocated an extent the committing one freed, since the
//! unpinning happened before the event). In the commit critical section only
//! the committing task touches delayed refs, and once the next transaction
//! is unblocked it touches none, so a transaction ends at the committing
//! task's last delayed-ref event before its commit event; events of other
//! tasks after that point belong to the next transaction. If the committing
//! task had no delayed-ref event since the previous boundary, the commit
//! event itself is the boundary. As a safety net, an `ADD_DELAYED_EXTENT`
//! head for a bytenr that already has refs in the current batch also starts
//! a new batch (a "realloc drain": the extent was freed, committed and
//! reallocated); on runB this never triggers once boundaries are placed as
//! above.

#![forbid(unsafe_code)]

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};

use delayed_refs::{Action, BLOCK_FLAG_FULL_BACKREF, ExtentOp, GenericRef, RefKey};

use super::dump::{Dump, read_dump};
use super::events::{Event, EventKind, KpKind, RefFields, read_events};
use super::input::InputError;

/// One call to make on the implementation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OpKind {
    /// `add_tree_ref(gref, op)`.
    Tree {
        /// The ref.
        gref: GenericRef,
        /// The extent op of a newly allocated tree block.
        op: Option<ExtentOp>,
    },
    /// `add_data_ref(gref, reserved)`.
    Data {
        /// The ref.
        gref: GenericRef,
        /// Reserved bytes (`num_bytes` for a new extent).
        reserved: u64,
    },
    /// `add_extent_op(bytenr, num_bytes, op)`.
    ExtentOp {
        /// Extent length.
        num_bytes: u64,
        /// The op.
        op: ExtentOp,
    },
}

/// One add, in trace order within its batch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Op {
    /// The traced task that made the call.
    pub pid: u32,
    /// Extent start.
    pub bytenr: u64,
    /// The call.
    pub kind: OpKind,
}

/// Why a batch ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BatchEnd {
    /// A transaction commit (see the module docs for where it is placed).
    Commit,
    /// An extent was reallocated while the batch still held refs for it.
    Realloc,
    /// The end of the segment.
    SegmentEnd,
}

/// The adds of one transaction, drained with `run(RunMode::All)` at its end.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Batch {
    /// Adds in trace order.
    pub ops: Vec<Op>,
    /// Why it ended.
    pub end: BatchEnd,
}

/// One merged ref the kernel ran: a `run_delayed_*_ref` event and the
/// `kp_*` event that followed it on the same task.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KernelRun {
    /// The batch (transaction) the run happened in.
    pub batch: u32,
    /// Extent start.
    pub bytenr: u64,
    /// The backref.
    pub key: RefKey,
    /// Signed merged count (add > 0).
    pub signed: i64,
    /// The run inserted the extent item (first insert of a tree block, or
    /// `kp_alloc_file_extent`).
    pub insert: bool,
}

/// Figures about the plan of one segment.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct PlanStats {
    /// Events in the file.
    pub events: usize,
    /// `add_delayed_*_ref` events.
    pub ref_adds: usize,
    /// `UPDATE_DELAYED_HEAD` heads (extent ops).
    pub extent_ops: usize,
    /// `ADD_DELAYED_EXTENT` heads.
    pub new_extents: usize,
    /// Commit events.
    pub commits: usize,
    /// Batches (transactions as replayed).
    pub batches: usize,
    /// Batches cut by a reallocation (safety net, see module docs).
    pub realloc_drains: usize,
    /// Ref adds between a transaction's end and its commit event (they
    /// belong to the next transaction).
    pub late_adds: usize,
    /// Kernel runs.
    pub kernel_runs: usize,
    /// Kernel runs with no kprobe line (first insert of a tree block: ref_mod 1).
    pub kernel_runs_without_kp: usize,
    /// Kernel runs whose kprobe disagreed with the run's action (or a data
    /// run or a drop without kprobe): taken as recorded.
    pub kernel_run_oddities: usize,
    /// `kp_extent_op` events.
    pub kernel_extent_ops: usize,
    /// `kp_extent_op` events setting anything but exactly FULL_BACKREF.
    pub kernel_extent_ops_other: usize,
}

/// Everything needed to replay one segment.
#[derive(Debug)]
pub struct Segment {
    /// `NN_phase`.
    pub name: String,
    /// The name of the dump the segment starts from.
    pub before_name: String,
    /// The extent tree before the segment.
    pub before: Dump,
    /// The extent tree after the segment.
    pub after: Dump,
    /// The adds, by transaction.
    pub batches: Vec<Batch>,
    /// The kernel's runs.
    pub kernel_runs: Vec<KernelRun>,
    /// Bytenrs that received a ref add.
    pub touched_extents: BTreeSet<u64>,
    /// `(bytenr, key)` pairs that received a ref add.
    pub touched_keys: BTreeSet<(u64, RefKey)>,
    /// Figures.
    pub stats: PlanStats,
}

/// The extent op queued for a newly allocated tree block: v6.1
/// `btrfs_alloc_tree_block` sets `update_flags` with FULL_BACKREF for
/// relocation-tree blocks (the only ones allocated with a parent) and no
/// flags otherwise; skinny metadata means no key update.
pub fn new_block_op(parent: u64, level: u8) -> ExtentOp {
    ExtentOp::set_flags(if parent != 0 { BLOCK_FLAG_FULL_BACKREF } else { 0 }, level)
}

/// The extent op of an `UPDATE_DELAYED_HEAD` head: the head event carries no
/// flags; in v6.1 `btrfs_set_disk_extent_flags` is only ever called with
/// FULL_BACKREF, and every `kp_extent_op` in the trace says
/// `flags_to_set=0x100` (counted in [`PlanStats::kernel_extent_ops_other`]).
pub fn update_head_op(level: u8) -> ExtentOp {
    ExtentOp::set_flags(BLOCK_FLAG_FULL_BACKREF, level)
}

fn is_delayed_ref_event(k: &EventKind) -> bool {
    !matches!(k, EventKind::Commit | EventKind::Marker)
}

/// Positions after which a transaction ends, and the late-add count.
fn commit_cuts(events: &[Event]) -> (Vec<bool>, usize) {
    let mut cut_after = vec![false; events.len()];
    let mut last_dr: HashMap<u32, usize> = HashMap::new();
    let mut last_cut: Option<usize> = None;
    let mut adds_before = Vec::with_capacity(events.len() + 1);
    adds_before.push(0usize);
    for e in events {
        let n = *adds_before.last().unwrap_or(&0) + usize::from(matches!(e.kind, EventKind::AddRef(_)));
        adds_before.push(n);
    }
    let mut late = 0;
    for (i, e) in events.iter().enumerate() {
        if e.kind == EventKind::Commit {
            let pos = match last_dr.get(&e.pid) {
                Some(&j) if last_cut.is_none_or(|c| j > c) => j,
                _ => i,
            };
            late += adds_before[i] - adds_before[pos + 1];
            cut_after[pos] = true;
            last_cut = Some(pos);
        } else if is_delayed_ref_event(&e.kind) {
            last_dr.insert(e.pid, i);
        }
    }
    (cut_after, late)
}

struct PendingHead {
    bytenr: u64,
    num_bytes: u64,
    action: Action,
    is_data: bool,
    line: usize,
}

struct PendingRun {
    r: RefFields,
    batch: u32,
}

/// What [`plan_events`] makes of a segment's events.
#[derive(Debug)]
struct Planned {
    batches: Vec<Batch>,
    kernel_runs: Vec<KernelRun>,
    touched_extents: BTreeSet<u64>,
    touched_keys: BTreeSet<(u64, RefKey)>,
    stats: PlanStats,
}

/// Build the batches and kernel runs of one segment's events. Tree levels
/// (for extent ops) come from the before-dump and from tree ref events.
fn plan_events(file: &Path, events: &[Event], before: &Dump) -> Result<Planned, InputError> {
    let (cut_after, late_adds) = commit_cuts(events);
    let mut stats = PlanStats { events: events.len(), late_adds, ..PlanStats::default() };
    let mut levels: HashMap<u64, u8> =
        before.iter().filter(|(_, it)| !it.is_data).map(|(b, it)| (*b, it.level)).collect();
    let mut batches = vec![Batch { ops: Vec::new(), end: BatchEnd::SegmentEnd }];
    let mut in_batch: BTreeSet<u64> = BTreeSet::new();
    let mut heads: HashMap<u32, PendingHead> = HashMap::new();
    let mut runs: HashMap<u32, PendingRun> = HashMap::new();
    let mut kernel_runs = Vec::new();
    let mut touched_extents = BTreeSet::new();
    let mut touched_keys = BTreeSet::new();

    let finish = |p: PendingRun, kp: Option<(KpKind, u64)>, stats: &mut PlanStats, out: &mut Vec<KernelRun>| {
        let r = p.r;
        let (ref_mod, insert) = match kp {
            None => {
                stats.kernel_runs_without_kp += 1;
                if r.action != Action::Add || r.is_data() {
                    stats.kernel_run_oddities += 1;
                }
                (1, r.action == Action::Add)
            }
            Some((kind, m)) => {
                let expect_add = !matches!(kind, KpKind::FreeExtent);
                if expect_add != (r.action == Action::Add) {
                    stats.kernel_run_oddities += 1;
                }
                (m, kind == KpKind::AllocFileExtent)
            }
        };
        let m = i64::try_from(ref_mod).unwrap_or(i64::MAX);
        let signed = if r.action == Action::Add { m } else { -m };
        stats.kernel_runs += 1;
        out.push(KernelRun { batch: p.batch, bytenr: r.bytenr, key: r.key, signed, insert });
    };

    for (i, e) in events.iter().enumerate() {
        let batch_no = u32::try_from(batches.len() - 1).unwrap_or(u32::MAX);
        // A run event's kprobe follows on the same task; anything else ends it.
        if !matches!(e.kind, EventKind::Kp { .. })
            && let Some(p) = runs.remove(&e.pid)
        {
            finish(p, None, &mut stats, &mut kernel_runs);
        }
        match e.kind {
            EventKind::Head { bytenr, num_bytes, action, is_data } => {
                if let Some(prev) = heads.get(&e.pid) {
                    return Err(InputError::at(
                        file,
                        e.line,
                        format!(
                            "head event for {bytenr} on pid {}, but the head event at line {} (bytenr {}) \
                             had no ref event",
                            e.pid, prev.line, prev.bytenr
                        ),
                    ));
                }
                if action == Action::UpdateHead {
                    stats.extent_ops += 1;
                    let level = levels.get(&bytenr).copied().unwrap_or(0);
                    let op = Op { pid: e.pid, bytenr, kind: OpKind::ExtentOp { num_bytes, op: update_head_op(level) } };
                    if let Some(b) = batches.last_mut() {
                        b.ops.push(op);
                    }
                    in_batch.insert(bytenr);
                } else {
                    if action == Action::AddExtent {
                        stats.new_extents += 1;
                        if in_batch.contains(&bytenr) {
                            stats.realloc_drains += 1;
                            if let Some(b) = batches.last_mut() {
                                b.end = BatchEnd::Realloc;
                            }
                            batches.push(Batch { ops: Vec::new(), end: BatchEnd::SegmentEnd });
                            in_batch.clear();
                        }
                    }
                    heads.insert(e.pid, PendingHead { bytenr, num_bytes, action, is_data, line: e.line });
                }
            }
            EventKind::AddRef(r) => {
                stats.ref_adds += 1;
                let Some(h) = heads.remove(&e.pid) else {
                    return Err(InputError::at(
                        file,
                        e.line,
                        format!("ref event on pid {} without a head event", e.pid),
                    ));
                };
                if h.bytenr != r.bytenr || h.num_bytes != r.num_bytes || h.is_data != r.is_data() {
                    return Err(InputError::at(
                        file,
                        e.line,
                        format!(
                            "ref event for {} ({} bytes, data {}) after the head event at line {} for {} \
                             ({} bytes, data {})",
                            r.bytenr,
                            r.num_bytes,
                            r.is_data(),
                            h.line,
                            h.bytenr,
                            h.num_bytes,
                            h.is_data
                        ),
                    ));
                }
                let action = match (h.action, r.action) {
                    (Action::AddExtent, Action::Add) => Action::AddExtent,
                    (a, b) if a == b => a,
                    (a, b) => {
                        return Err(InputError::at(
                            file,
                            e.line,
                            format!("ref action {b:?} after a head event with {a:?} (line {})", h.line),
                        ));
                    }
                };
                let base = GenericRef::new(action, r.bytenr, r.num_bytes, r.parent, r.root);
                let kind = match r.key {
                    RefKey::TreeBlock { .. } | RefKey::SharedBlock { .. } => {
                        levels.insert(r.bytenr, r.level);
                        let op = (action == Action::AddExtent).then(|| new_block_op(r.parent, r.level));
                        OpKind::Tree { gref: base.tree(r.level, r.root, 0, true), op }
                    }
                    RefKey::ExtentData { .. } | RefKey::SharedData { .. } => OpKind::Data {
                        gref: base.data(r.root, r.owner, r.offset, 0, true),
                        reserved: if action == Action::AddExtent { r.num_bytes } else { 0 },
                    },
                };
                let gkey = match kind {
                    OpKind::Tree { gref, .. } | OpKind::Data { gref, .. } => gref.ref_key(),
                    OpKind::ExtentOp { .. } => r.key,
                };
                if gkey != r.key {
                    return Err(InputError::at(file, e.line, format!("ref key {:?} rebuilt as {gkey:?}", r.key)));
                }
                touched_extents.insert(r.bytenr);
                touched_keys.insert((r.bytenr, r.key));
                in_batch.insert(r.bytenr);
                if let Some(b) = batches.last_mut() {
                    b.ops.push(Op { pid: e.pid, bytenr: r.bytenr, kind });
                }
            }
            EventKind::RunRef(r) => {
                runs.insert(e.pid, PendingRun { r, batch: batch_no });
            }
            EventKind::Kp { kind, bytenr, ref_mod } => match runs.remove(&e.pid) {
                Some(p) if p.r.bytenr == bytenr => finish(p, Some((kind, ref_mod)), &mut stats, &mut kernel_runs),
                Some(p) => {
                    stats.kernel_run_oddities += 1;
                    finish(p, None, &mut stats, &mut kernel_runs);
                }
                None => stats.kernel_run_oddities += 1,
            },
            EventKind::ExtentOp { update_key, update_flags, flags_to_set } => {
                stats.kernel_extent_ops += 1;
                if update_key || !update_flags || flags_to_set != BLOCK_FLAG_FULL_BACKREF {
                    stats.kernel_extent_ops_other += 1;
                }
            }
            EventKind::Commit => stats.commits += 1,
            EventKind::RunHead { .. } | EventKind::DeleteHead { .. } | EventKind::Marker => {}
        }
        if cut_after[i] {
            if let Some(b) = batches.last_mut() {
                b.end = BatchEnd::Commit;
            }
            batches.push(Batch { ops: Vec::new(), end: BatchEnd::SegmentEnd });
            in_batch.clear();
        }
    }
    let mut left: Vec<_> = runs.into_values().collect();
    left.sort_by_key(|p| p.batch);
    for p in left {
        finish(p, None, &mut stats, &mut kernel_runs);
    }
    if let Some(h) = heads.values().min_by_key(|h| h.line) {
        return Err(InputError::at(file, h.line, format!("head event for {} has no ref event", h.bytenr)));
    }
    // A trailing batch with nothing in it (the segment ended on a commit) is dropped.
    if batches.len() > 1 && batches.last().is_some_and(|b| b.ops.is_empty()) {
        let last = u32::try_from(batches.len() - 1).unwrap_or(u32::MAX);
        if !kernel_runs.iter().any(|k| k.batch == last) {
            batches.pop();
        }
    }
    stats.batches = batches.len();
    Ok(Planned { batches, kernel_runs, touched_extents, touched_keys, stats })
}

fn segment_number(name: &str) -> Option<u32> {
    let (nn, _) = name.split_once('_')?;
    if nn.len() < 2 || !nn.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    nn.parse().ok()
}

/// The dump file for segment number `n` in `extents/`.
fn dump_file(dir: &Path, n: u32) -> Result<(String, PathBuf), InputError> {
    let prefix = format!("{n:02}_");
    let mut found = Vec::new();
    let rd = std::fs::read_dir(dir).map_err(|e| InputError::file(dir, format!("cannot list: {e}")))?;
    for ent in rd {
        let ent = ent.map_err(|e| InputError::file(dir, format!("cannot list: {e}")))?;
        let name = ent.file_name().to_string_lossy().into_owned();
        if let Some(stem) = name.strip_suffix(".jsonl.gz")
            && stem.starts_with(&prefix)
        {
            found.push((stem.to_string(), ent.path()));
        }
    }
    match found.len() {
        1 => Ok(found.remove(0)),
        0 => Err(InputError::file(dir, format!("no extent dump {prefix}*.jsonl.gz"))),
        _ => Err(InputError::file(dir, format!("several extent dumps {prefix}*.jsonl.gz"))),
    }
}

/// The event files of a run directory, in order: `(name, path)`.
pub fn event_files(run_dir: &Path) -> Result<Vec<(String, PathBuf)>, InputError> {
    let dir = run_dir.join("events");
    let rd = std::fs::read_dir(&dir).map_err(|e| InputError::file(&dir, format!("cannot list: {e}")))?;
    let mut files = Vec::new();
    for ent in rd {
        let ent = ent.map_err(|e| InputError::file(&dir, format!("cannot list: {e}")))?;
        let name = ent.file_name().to_string_lossy().into_owned();
        if let Some(stem) = name.strip_suffix(".tsv.gz") {
            if segment_number(stem).is_none() {
                return Err(InputError::file(&ent.path(), "event file name is not NN_phase.tsv.gz"));
            }
            files.push((stem.to_string(), ent.path()));
        }
    }
    files.sort();
    if files.is_empty() {
        return Err(InputError::file(&dir, "no NN_phase.tsv.gz event files"));
    }
    Ok(files)
}

/// Load and plan one segment.
pub fn load_segment(run_dir: &Path, name: &str, events_file: &Path) -> Result<Segment, InputError> {
    let n = segment_number(name).ok_or_else(|| InputError::file(events_file, "bad segment name"))?;
    if n == 0 {
        return Err(InputError::file(events_file, "segment 00 has no previous dump"));
    }
    let extents = run_dir.join("extents");
    let (before_name, before_path) = dump_file(&extents, n - 1)?;
    let (_, after_path) = dump_file(&extents, n)?;
    let before = read_dump(&before_path)?;
    let after = read_dump(&after_path)?;
    let events = read_events(events_file)?;
    let Planned { batches, kernel_runs, touched_extents, touched_keys, stats } =
        plan_events(events_file, &events, &before)?;
    Ok(Segment {
        name: name.to_string(),
        before_name,
        before,
        after,
        batches,
        kernel_runs,
        touched_extents,
        touched_keys,
        stats,
    })
}

/// Load and plan every segment of a run directory.
pub fn load_run(run_dir: &Path) -> Result<Vec<Segment>, InputError> {
    if !run_dir.is_dir() {
        return Err(InputError::file(run_dir, "not a directory"));
    }
    event_files(run_dir)?.iter().map(|(name, path)| load_segment(run_dir, name, path)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::replay::events::parse_line;

    fn ev(lines: &[&str]) -> Vec<Event> {
        lines.iter().enumerate().map(|(i, l)| parse_line(l, i + 2).unwrap()).collect()
    }

    fn row(idx: u64, pid: u32, event: &str, rest: &str) -> String {
        format!("{idx}\t0.0\t0\t{pid}\tx\t{event}\t{rest}")
    }

    #[test]
    fn pairs_heads_with_refs_and_splits_at_the_committers_last_event() {
        let lines = [
            row(1, 10, "add_delayed_ref_head", "100\t4096\tADD_DELAYED_EXTENT\t-\t-\t-\t-\t-\t-\t-\t0\t-\t-"),
            row(2, 10, "add_delayed_tree_ref", "100\t4096\tADD_DELAYED_REF\t0\t5\t0\t-\t-\tTREE_BLOCK_REF\t0\t0\t-\t-"),
            row(3, 20, "run_delayed_tree_ref", "100\t4096\tADD_DELAYED_REF\t0\t5\t0\t-\t-\tTREE_BLOCK_REF\t0\t0\t-\t-"),
            row(4, 20, "kp_delete_head", "100\t4096\t-\t-\t-\t-\t-\t-\t-\t-\t0\t0\t-"),
            // Next transaction's add before the commit event.
            row(5, 10, "add_delayed_ref_head", "200\t8192\tADD_DELAYED_EXTENT\t-\t-\t-\t-\t-\t-\t-\t1\t-\t-"),
            row(
                6,
                10,
                "add_delayed_data_ref",
                "200\t8192\tADD_DELAYED_REF\t0\t5\t-\t257\t0\tEXTENT_DATA_REF\t0\t1\t-\t-",
            ),
            row(7, 20, "btrfs_transaction_commit", &format!("{}gen=2", "-\t".repeat(12))),
            row(8, 10, "add_delayed_ref_head", "100\t4096\tUPDATE_DELAYED_HEAD\t-\t-\t-\t-\t-\t-\t-\t0\t-\t-"),
        ];
        let refs: Vec<&str> = lines.iter().map(String::as_str).collect();
        let events = ev(&refs);
        let Planned { batches, kernel_runs: runs, touched_extents: touched, stats: st, .. } =
            plan_events(Path::new("t"), &events, &Dump::new()).unwrap();
        assert_eq!(batches.len(), 2, "{batches:?}");
        assert_eq!(batches[0].end, BatchEnd::Commit);
        assert_eq!(batches[0].ops.len(), 1);
        let OpKind::Tree { gref, op } = batches[0].ops[0].kind else { panic!() };
        assert_eq!(gref.action, Action::AddExtent);
        assert_eq!(op, Some(new_block_op(0, 0)));
        assert_eq!(batches[1].ops.len(), 2, "late add and the extent op go to the next transaction");
        let OpKind::Data { gref, reserved } = batches[1].ops[0].kind else { panic!() };
        assert_eq!((gref.action, reserved), (Action::AddExtent, 8192));
        assert!(matches!(batches[1].ops[1].kind, OpKind::ExtentOp { num_bytes: 4096, .. }));
        assert_eq!(st.late_adds, 1);
        assert_eq!(
            runs,
            [KernelRun { batch: 0, bytenr: 100, key: RefKey::TreeBlock { root: 5 }, signed: 1, insert: true }]
        );
        assert_eq!(touched.len(), 2);
    }

    #[test]
    fn unpaired_heads_and_refs_are_input_errors() {
        let head = row(1, 10, "add_delayed_ref_head", "100\t4096\tDROP_DELAYED_REF\t-\t-\t-\t-\t-\t-\t-\t0\t-\t-");
        let r = row(
            2,
            11,
            "add_delayed_tree_ref",
            "100\t4096\tDROP_DELAYED_REF\t0\t5\t0\t-\t-\tTREE_BLOCK_REF\t0\t0\t-\t-",
        );
        let e = plan_events(Path::new("f"), &ev(&[&head, &r]), &Dump::new()).unwrap_err();
        assert_eq!(e.line, 3, "{e}");
        let e = plan_events(Path::new("f"), &ev(&[&head]), &Dump::new()).unwrap_err();
        assert!(e.msg.contains("no ref event"), "{e}");
        let add = r.replace("\t11\t", "\t10\t").replace("DROP", "ADD");
        let e = plan_events(Path::new("f"), &ev(&[&head, &add]), &Dump::new()).unwrap_err();
        assert!(e.msg.contains("ref action"), "{e}");
    }
}
