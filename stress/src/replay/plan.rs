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
//!
//! Tree-mod-log blockers. A `kp_get_seq_entry` (with `seq_in` 0) and the
//! `kp_get_seq` after it on the same task register a blocker; the
//! `kp_put_seq` with the same seq, `elem` and task removes it. Both become
//! ops in event order ([`OpKind::GetSeq`], [`OpKind::PutSeq`]); every ref op
//! carries the seq of its event. A `kp_check_seq` becomes an
//! [`OpKind::CheckSeq`] holding whether the `kp_held_back` after it on the
//! same task held the ref back. Every `run_delayed_ref_head` and every
//! `kp_held_back` is a point where the kernel finished with a head
//! ([`OpKind::KernelRun`]).
//!
//! Qgroup records. A `btrfs_qgroup_trace_extent` right before a head event
//! for the same bytenr on the same task marks that head: the kernel created
//! (or found) a qgroup extent record for it, so the replayed ref is built
//! with `skip_qgroup` false, the others with true. Other
//! `btrfs_qgroup_trace_extent` rows (records the kernel traces outside
//! delayed-ref adds, e.g. while dropping a snapshot) are counted.

#![forbid(unsafe_code)]

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};

use delayed_refs::{Action, BLOCK_FLAG_FULL_BACKREF, ExtentOp, GenericRef, RefKey, is_fstree};

use super::dump::{Dump, read_dump};
use super::events::{Event, EventFile, EventKind, KpKind, RefFields, read_events};
use super::input::InputError;
use super::nodesize::{self, NodeSize};

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
    /// Register tree-mod-log blocker `id` (numbered per segment) at `seq`.
    GetSeq {
        /// The blocker's seq.
        seq: u64,
        /// The blocker, for its put.
        id: u32,
    },
    /// Remove blocker `id`.
    PutSeq {
        /// The blocker.
        id: u32,
    },
    /// The kernel checked a ref with this seq against the lowest blocker.
    CheckSeq {
        /// The ref's seq.
        seq: u64,
        /// The kernel held it back.
        held: bool,
    },
    /// The kernel finished with a head here (ran it or held it back): a
    /// sequential replay runs one head of its own.
    KernelRun,
}

impl OpKind {
    /// Whether this is an add call on an extent (tree, data or extent op).
    pub fn is_extent(&self) -> bool {
        matches!(self, OpKind::Tree { .. } | OpKind::Data { .. } | OpKind::ExtentOp { .. })
    }

    /// The ref of a tree or data add.
    pub fn gref(&self) -> Option<&GenericRef> {
        match self {
            OpKind::Tree { gref, .. } | OpKind::Data { gref, .. } => Some(gref),
            _ => None,
        }
    }
}

/// One add (or blocker event), in trace order within its batch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Op {
    /// The traced task that made the call.
    pub pid: u32,
    /// Extent start (0 for blocker events).
    pub bytenr: u64,
    /// The tree-mod-log seq the kernel gave a tree or data ref (0 otherwise).
    pub seq: u64,
    /// The call.
    pub kind: OpKind,
}

impl Op {
    /// The seq the implementation must read when it queues this op, if it
    /// reads one: tree and data refs of fs-tree roots (other roots always
    /// queue with seq 0).
    pub fn fs_seq(&self) -> Option<u64> {
        self.kind.gref().filter(|g| is_fstree(g.ref_root())).map(|_| self.seq)
    }
}

/// Why a batch ended.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum BatchEnd {
    /// A transaction commit (see the module docs for where it is placed).
    Commit,
    /// An extent was reallocated while the batch still held refs for it.
    Realloc,
    /// The end of the segment.
    #[default]
    SegmentEnd,
}

/// The adds of one transaction, drained with `run(RunMode::All)` at its end.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Batch {
    /// Adds in trace order.
    pub ops: Vec<Op>,
    /// Why it ended.
    pub end: BatchEnd,
    /// Heads the kernel created (or found) a qgroup extent record for:
    /// bytenr and length.
    pub qgroup: BTreeMap<u64, u64>,
    /// Records the kernel traced outside delayed-ref adds (not replayed).
    pub qgroup_other: BTreeSet<u64>,
    /// Records the kernel accounted (`btrfs_qgroup_account_extents`).
    pub qgroup_accounted: BTreeSet<u64>,
}

impl Batch {
    fn new() -> Self {
        Batch::default()
    }
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
    /// Ref adds with a seq other than 0.
    pub seq_refs: usize,
    /// Of those, refs of roots that are not fs trees: the implementations
    /// queue those with seq 0 (the kernel does too; none in the recordings).
    pub seq_refs_not_fstree: usize,
    /// Blockers registered (`kp_get_seq` with a new `elem`).
    pub blocker_gets: usize,
    /// `kp_get_seq` of an `elem` that already had a seq (`seq_in` != 0):
    /// nothing registered.
    pub blocker_gets_reused: usize,
    /// Blockers registered from a `kp_get_seq` without its
    /// `kp_get_seq_entry` (elem unknown: the put pairs by seq and task).
    pub blocker_gets_without_entry: usize,
    /// Blockers removed (`kp_put_seq` paired by seq, elem and task).
    pub blocker_puts: usize,
    /// `kp_put_seq` without a registered blocker of that seq, elem and task.
    pub blocker_puts_unpaired: usize,
    /// Blockers still registered at a transaction end (released there).
    pub blockers_open_at_end: usize,
    /// `kp_check_seq` rows.
    pub kernel_checks: usize,
    /// `kp_held_back` rows.
    pub kernel_held_back: usize,
    /// `kp_held_back` rows without a `kp_check_seq` right before on the task.
    pub held_back_unpaired: usize,
    /// Points where the kernel finished with a head (sequential pacing).
    pub kernel_run_points: usize,
    /// Heads marked by `btrfs_qgroup_trace_extent`.
    pub qgroup_marked_heads: usize,
    /// `btrfs_qgroup_trace_extent` rows not right before their head.
    pub qgroup_other_marks: usize,
    /// Transactions with `btrfs_qgroup_account_extents` rows.
    pub qgroup_account_batches: usize,
    /// Of those, the ones whose accounted records are exactly the marked
    /// heads plus the other marks (a check of the pairing on the trace).
    pub qgroup_account_consistent: usize,
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
    /// Rows of events the replay does not use, by event name.
    pub other_events: BTreeMap<String, u64>,
}

/// A run directory, loaded.
#[derive(Debug)]
pub struct Run {
    /// The segments, in order.
    pub segments: Vec<Segment>,
    /// The node size (`None`: nothing said, and nothing needed it).
    pub nodesize: Option<NodeSize>,
    /// Whether the recording shows qgroup activity: then the replayed roots
    /// keep qgroup records (`FsConfig::qgroups`).
    pub qgroups: bool,
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

/// Delayed-ref activity of a task, for placing transaction ends: everything
/// but commits and markers (adds, runs, blocker probes, qgroup records).
fn is_delayed_ref_event(k: &EventKind) -> bool {
    !matches!(k, EventKind::Commit | EventKind::Marker | EventKind::Other)
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
    /// Marked by a `btrfs_qgroup_trace_extent` right before: its length.
    qgroup: Option<u64>,
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
    let mut batches = vec![Batch::new()];
    let mut in_batch: BTreeSet<u64> = BTreeSet::new();
    let mut heads: HashMap<u32, PendingHead> = HashMap::new();
    let mut runs: HashMap<u32, PendingRun> = HashMap::new();
    // Blockers: the `elem` of a task's pending get, the registered ones by
    // (seq, elem, task), the next id.
    let mut get_entries: HashMap<u32, (u64, u64)> = HashMap::new();
    let mut live: HashMap<(u64, Option<u64>, u32), Vec<u32>> = HashMap::new();
    let mut next_id = 0u32;
    // A task's last kp_check_seq: (batch, op index, seq).
    let mut checks: HashMap<u32, (usize, usize, u64)> = HashMap::new();
    // A task's pending qgroup mark: (bytenr, num_bytes).
    let mut marks: HashMap<u32, (u64, u64)> = HashMap::new();
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
        if !matches!(e.kind, EventKind::Kp { .. }) {
            if let Some(p) = runs.remove(&e.pid) {
                finish(p, None, &mut stats, &mut kernel_runs);
            }
        }
        // A check's kp_held_back follows on the same task; anything else
        // means the ref passed.
        if !matches!(e.kind, EventKind::HeldBack { .. }) {
            checks.remove(&e.pid);
        }
        // A qgroup mark belongs to the head event right after it on the task.
        let mut marked: Option<u64> = None;
        if let Some((mb, mn)) = marks.remove(&e.pid) {
            match e.kind {
                EventKind::Head { bytenr, action, .. } if bytenr == mb && action != Action::UpdateHead => {
                    marked = Some(mn);
                }
                _ => {
                    stats.qgroup_other_marks += 1;
                    if let Some(b) = batches.last_mut() {
                        b.qgroup_other.insert(mb);
                    }
                }
            }
        }
        let cur = batches.len() - 1;
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
                    let op = Op {
                        pid: e.pid,
                        bytenr,
                        seq: 0,
                        kind: OpKind::ExtentOp { num_bytes, op: update_head_op(level) },
                    };
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
                            batches.push(Batch::new());
                            in_batch.clear();
                        }
                    }
                    heads.insert(
                        e.pid,
                        PendingHead { bytenr, num_bytes, action, is_data, line: e.line, qgroup: marked },
                    );
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
                // Only a marked head makes a qgroup record (skip_qgroup false).
                let skip = h.qgroup.is_none();
                let kind = match r.key {
                    RefKey::TreeBlock { .. } | RefKey::SharedBlock { .. } => {
                        levels.insert(r.bytenr, r.level);
                        let op = (action == Action::AddExtent).then(|| new_block_op(r.parent, r.level));
                        OpKind::Tree { gref: base.tree(r.level, r.root, 0, skip), op }
                    }
                    RefKey::ExtentData { .. } | RefKey::SharedData { .. } => OpKind::Data {
                        gref: base.data(r.root, r.owner, r.offset, 0, skip),
                        reserved: if action == Action::AddExtent { r.num_bytes } else { 0 },
                    },
                };
                let gkey = kind.gref().map_or(r.key, GenericRef::ref_key);
                if gkey != r.key {
                    return Err(InputError::at(file, e.line, format!("ref key {:?} rebuilt as {gkey:?}", r.key)));
                }
                touched_extents.insert(r.bytenr);
                touched_keys.insert((r.bytenr, r.key));
                in_batch.insert(r.bytenr);
                if r.seq != 0 {
                    stats.seq_refs += 1;
                    if !is_fstree(r.root) {
                        stats.seq_refs_not_fstree += 1;
                    }
                }
                if let Some(b) = batches.last_mut() {
                    if let Some(n) = h.qgroup {
                        stats.qgroup_marked_heads += 1;
                        b.qgroup.insert(r.bytenr, n);
                    }
                    b.ops.push(Op { pid: e.pid, bytenr: r.bytenr, seq: r.seq, kind });
                }
            }
            EventKind::RunRef(r) => {
                runs.insert(e.pid, PendingRun { r, batch: batch_no });
            }
            EventKind::GetSeqEntry { elem, seq_in } => {
                get_entries.insert(e.pid, (elem, seq_in));
            }
            EventKind::GetSeq { seq } => {
                // Without its entry row (probe not enabled) the elem is
                // unknown: the put then pairs by seq and task alone.
                let elem = match get_entries.remove(&e.pid) {
                    Some((_, seq_in)) if seq_in != 0 => {
                        stats.blocker_gets_reused += 1;
                        None
                    }
                    Some((elem, _)) => Some(Some(elem)),
                    None => {
                        stats.blocker_gets_without_entry += 1;
                        Some(None)
                    }
                };
                if let Some(elem) = elem {
                    stats.blocker_gets += 1;
                    let id = next_id;
                    next_id += 1;
                    live.entry((seq, elem, e.pid)).or_default().push(id);
                    batches[cur].ops.push(Op { pid: e.pid, bytenr: 0, seq: 0, kind: OpKind::GetSeq { seq, id } });
                }
            }
            EventKind::PutSeq { seq, elem } => {
                let mut id = live.get_mut(&(seq, Some(elem), e.pid)).and_then(Vec::pop);
                if id.is_none() {
                    id = live.get_mut(&(seq, None, e.pid)).and_then(Vec::pop);
                }
                live.retain(|_, v| !v.is_empty());
                match id {
                    Some(id) => {
                        stats.blocker_puts += 1;
                        batches[cur].ops.push(Op { pid: e.pid, bytenr: 0, seq: 0, kind: OpKind::PutSeq { id } });
                    }
                    None => stats.blocker_puts_unpaired += 1,
                }
            }
            EventKind::CheckSeq { seq } => {
                stats.kernel_checks += 1;
                checks.insert(e.pid, (cur, batches[cur].ops.len(), seq));
                batches[cur].ops.push(Op {
                    pid: e.pid,
                    bytenr: 0,
                    seq: 0,
                    kind: OpKind::CheckSeq { seq, held: false },
                });
            }
            EventKind::HeldBack { seq } => {
                stats.kernel_held_back += 1;
                match checks.remove(&e.pid) {
                    Some((b, o, checked)) => {
                        if seq.is_some_and(|s| s != checked) {
                            return Err(InputError::at(
                                file,
                                e.line,
                                format!("kp_held_back for seq {seq:?} after a kp_check_seq of seq {checked}"),
                            ));
                        }
                        if let OpKind::CheckSeq { held, .. } = &mut batches[b].ops[o].kind {
                            *held = true;
                        }
                    }
                    None => stats.held_back_unpaired += 1,
                }
                stats.kernel_run_points += 1;
                batches[cur].ops.push(Op { pid: e.pid, bytenr: 0, seq: 0, kind: OpKind::KernelRun });
            }
            EventKind::RunHead { .. } => {
                stats.kernel_run_points += 1;
                batches[cur].ops.push(Op { pid: e.pid, bytenr: 0, seq: 0, kind: OpKind::KernelRun });
            }
            EventKind::QgroupTrace { bytenr, num_bytes } => {
                marks.insert(e.pid, (bytenr, num_bytes));
            }
            EventKind::QgroupAccount { bytenr } => {
                batches[cur].qgroup_accounted.insert(bytenr);
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
            EventKind::DeleteHead { .. } | EventKind::Marker | EventKind::Other => {}
        }
        if cut_after[i] {
            if let Some(b) = batches.last_mut() {
                b.end = BatchEnd::Commit;
            }
            batches.push(Batch::new());
            in_batch.clear();
        }
    }
    for (mb, _) in marks.into_values() {
        stats.qgroup_other_marks += 1;
        if let Some(b) = batches.last_mut() {
            b.qgroup_other.insert(mb);
        }
    }
    stats.blockers_open_at_end = open_at_batch_end(&batches);
    for b in &batches {
        if !b.qgroup_accounted.is_empty() {
            stats.qgroup_account_batches += 1;
            let traced: BTreeSet<u64> = b.qgroup.keys().chain(b.qgroup_other.iter()).copied().collect();
            if traced == b.qgroup_accounted {
                stats.qgroup_account_consistent += 1;
            }
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
    if batches.len() > 1 && batches.last().is_some_and(|b| b.ops.is_empty() && b.qgroup_other.is_empty()) {
        let last = u32::try_from(batches.len() - 1).unwrap_or(u32::MAX);
        if !kernel_runs.iter().any(|k| k.batch == last) {
            batches.pop();
        }
    }
    stats.batches = batches.len();
    Ok(Planned { batches, kernel_runs, touched_extents, touched_keys, stats })
}

/// Blockers registered in a batch and not removed in it.
fn open_at_batch_end(batches: &[Batch]) -> usize {
    batches
        .iter()
        .map(|b| {
            let mut open = BTreeSet::new();
            for op in &b.ops {
                match op.kind {
                    OpKind::GetSeq { id, .. } => {
                        open.insert(id);
                    }
                    OpKind::PutSeq { id } => {
                        open.remove(&id);
                    }
                    _ => {}
                }
            }
            open.len()
        })
        .sum()
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

/// Plan one segment from its parsed events; `nodesize` for the dumps.
fn plan_segment(
    run_dir: &Path,
    name: &str,
    events_file: &Path,
    events: EventFile,
    nodesize: Option<u64>,
) -> Result<Segment, InputError> {
    let n = segment_number(name).ok_or_else(|| InputError::file(events_file, "bad segment name"))?;
    if n == 0 {
        return Err(InputError::file(events_file, "segment 00 has no previous dump"));
    }
    let extents = run_dir.join("extents");
    let (before_name, before_path) = dump_file(&extents, n - 1)?;
    let (_, after_path) = dump_file(&extents, n)?;
    let before = read_dump(&before_path, nodesize)?;
    let after = read_dump(&after_path, nodesize)?;
    let Planned { batches, kernel_runs, touched_extents, touched_keys, mut stats } =
        plan_events(events_file, &events.events, &before)?;
    stats.events += events.other.values().sum::<u64>() as usize;
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
        other_events: events.other,
    })
}

/// Load and plan one segment; `nodesize` as for [`load_run`] (the node size
/// is decided from this segment's events alone).
#[cfg(test)]
pub fn load_segment(
    run_dir: &Path,
    name: &str,
    events_file: &Path,
    nodesize: Option<u64>,
) -> Result<Segment, InputError> {
    let events = read_events(events_file)?;
    let ns = nodesize::detect(run_dir, nodesize, &[(events_file.to_path_buf(), &events)])?;
    plan_segment(run_dir, name, events_file, events, ns.map(|n| n.bytes))
}

/// Load and plan every segment of a run directory. `nodesize` overrides the
/// node size the recording states ([`nodesize::detect`]).
pub fn load_run(run_dir: &Path, nodesize: Option<u64>) -> Result<Run, InputError> {
    if !run_dir.is_dir() {
        return Err(InputError::file(run_dir, "not a directory"));
    }
    let files = event_files(run_dir)?;
    let mut parsed = Vec::with_capacity(files.len());
    for (name, path) in files {
        let ev = read_events(&path)?;
        parsed.push((name, path, ev));
    }
    let refs: Vec<(PathBuf, &EventFile)> = parsed.iter().map(|(_, p, e)| (p.clone(), e)).collect();
    let ns = nodesize::detect(run_dir, nodesize, &refs)?;
    let qgroups = parsed.iter().any(|(_, _, e)| {
        e.other.keys().any(|k| k.contains("qgroup"))
            || e.events
                .iter()
                .any(|ev| matches!(ev.kind, EventKind::QgroupTrace { .. } | EventKind::QgroupAccount { .. }))
    });
    let bytes = ns.as_ref().map(|n| n.bytes);
    let segments = parsed
        .into_iter()
        .map(|(name, path, ev)| plan_segment(run_dir, &name, &path, ev, bytes))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(Run { segments, nodesize: ns, qgroups })
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

    /// Blocker gets pair with puts by seq, elem and task; a check takes the
    /// kp_held_back right after it on its task; a qgroup mark right before a
    /// head on its task marks that head's ref; every ref keeps its seq.
    #[test]
    fn blockers_checks_and_qgroup_marks() {
        let dash = |n: usize| "-\t".repeat(n);
        let get_entry =
            |idx, pid, elem: &str| row(idx, pid, "kp_get_seq_entry", &format!("{}elem={elem},seq_in=0", dash(12)));
        let get = |idx, pid, seq: u64| row(idx, pid, "kp_get_seq", &format!("{}{seq}\t-\t-\tcaller=x", dash(9)));
        let put = |idx, pid, seq: u64, elem: &str| {
            row(idx, pid, "kp_put_seq", &format!("{}{seq}\t-\t-\telem={elem}", dash(9)))
        };
        let check = |idx, pid, seq: u64| row(idx, pid, "kp_check_seq", &format!("{}{seq}\t-\t-\t-", dash(9)));
        let held = |idx, pid, seq: u64| row(idx, pid, "kp_held_back", &format!("{}{seq}\t-\t-\tret=1", dash(9)));
        let mark = |idx, pid, b: u64| row(idx, pid, "btrfs_qgroup_trace_extent", &format!("{b}\t4096\t{}-", dash(10)));
        let head = |idx, pid, b: u64| {
            row(idx, pid, "add_delayed_ref_head", &format!("{b}\t4096\tADD_DELAYED_EXTENT\t{}0\t-\t-", dash(7)))
        };
        let tref = |idx, pid, b: u64, seq: u64| {
            row(
                idx,
                pid,
                "add_delayed_tree_ref",
                &format!("{b}\t4096\tADD_DELAYED_REF\t0\t5\t0\t-\t-\tTREE_BLOCK_REF\t{seq}\t0\t-\t-"),
            )
        };
        let lines = [
            get_entry(1, 7, "0x10"),
            get(2, 7, 1),
            get_entry(3, 8, "0x20"),
            get(4, 8, 2),
            mark(5, 10, 100),
            head(6, 10, 100),
            tref(7, 10, 100, 2),
            head(8, 11, 200),
            tref(9, 11, 200, 2),
            mark(10, 12, 300),
            check(11, 20, 2),
            held(12, 20, 2),
            check(13, 20, 1),
            put(14, 8, 2, "0x20"),
            put(15, 7, 1, "0x99"),
            put(16, 7, 1, "0x10"),
        ];
        let refs: Vec<&str> = lines.iter().map(String::as_str).collect();
        let Planned { batches, stats, .. } = plan_events(Path::new("t"), &ev(&refs), &Dump::new()).unwrap();
        assert_eq!(batches.len(), 1);
        let kinds: Vec<OpKind> = batches[0].ops.iter().map(|o| o.kind).collect();
        assert_eq!(kinds[0], OpKind::GetSeq { seq: 1, id: 0 });
        assert_eq!(kinds[1], OpKind::GetSeq { seq: 2, id: 1 });
        assert_eq!(kinds[4], OpKind::CheckSeq { seq: 2, held: true });
        assert_eq!(kinds[5], OpKind::KernelRun);
        assert_eq!(kinds[6], OpKind::CheckSeq { seq: 1, held: false });
        assert_eq!(kinds[7], OpKind::PutSeq { id: 1 });
        assert_eq!(kinds[8], OpKind::PutSeq { id: 0 }, "the put of elem 0x99 pairs with nothing");
        let OpKind::Tree { gref, .. } = kinds[2] else { panic!("{kinds:?}") };
        assert!(!gref.skip_qgroup, "marked");
        assert_eq!(batches[0].ops[2].seq, 2);
        let OpKind::Tree { gref, .. } = kinds[3] else { panic!("{kinds:?}") };
        assert!(gref.skip_qgroup, "not marked");
        assert_eq!(batches[0].qgroup.keys().copied().collect::<Vec<_>>(), [100]);
        assert_eq!(batches[0].qgroup_other.iter().copied().collect::<Vec<_>>(), [300]);
        assert_eq!(
            (stats.blocker_gets, stats.blocker_puts, stats.blocker_puts_unpaired, stats.blockers_open_at_end),
            (2, 2, 1, 0)
        );
        assert_eq!((stats.kernel_checks, stats.kernel_held_back, stats.kernel_run_points), (2, 1, 1));
        assert_eq!((stats.qgroup_marked_heads, stats.qgroup_other_marks, stats.seq_refs), (1, 1, 2));

        // A kp_held_back naming another seq than its check is malformed.
        let bad = [check(1, 20, 2), held(2, 20, 3)];
        let refs: Vec<&str> = bad.iter().map(String::as_str).collect();
        let e = plan_events(Path::new("f"), &ev(&refs), &Dump::new()).unwrap_err();
        assert_eq!(e.line, 3, "{e}");
        // A get without its entry row pairs with a put by seq and task.
        let lone = [get(1, 7, 4), put(2, 7, 4, "0x30")];
        let refs: Vec<&str> = lone.iter().map(String::as_str).collect();
        let p = plan_events(Path::new("f"), &ev(&refs), &Dump::new()).unwrap();
        assert_eq!((p.stats.blocker_gets_without_entry, p.stats.blocker_puts), (1, 1));
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
