//! Differential test: the faithful locked port (`LockedRefs`) is the oracle
//! for the lock-free implementation (`LockFreeRefs`) and for the sharded
//! port (`ShardedRefs`).
//!
//! Proptest generates random single-threaded operation sequences; every
//! operation is applied to both implementations side by side, each with its
//! own fs state (reserves, seq tracker), its own `MemExtentTree` and its own
//! transaction handle. Operations: tree refs and data refs (adds, drops,
//! `AddExtent` with must_insert_reserved and reserved bytes, re-allocation of
//! a cancelled allocation, semantics.md §4.1, §4.2, §4.6 step 3, §11.11), extent ops
//! (§4.8), `run_one`, `run(Ready)`, `run(Bytes)`, `run(All)` (§6.5),
//! `check_ref_cleanup` (§7.2), `destroy` (§7.3), tree-mod-log blockers
//! registered and dropped plus seq bumps (§5.3), handle renewal through
//! `start_transaction`/`end_transaction` (§8.10), and calls with bad
//! input, which must fail with the same typed error on both sides and
//! change nothing.
//!
//! The generator keeps every history valid for the strict extent tree: it
//! models the true count (disk plus queued) of every backref, drops only what
//! exists, starts an extent with `AddExtent` only when it has no refs and no
//! item in either tree, and keeps tree backrefs at 0 or 1 (so a tree ref
//! never runs with a count other than 1, §11.14).
//!
//! What is compared after every step:
//!
//! - while the two sides are *in step* (the normal case): the whole
//!   `snapshot()` (heads, nodes with actions, counts, levels and seqs,
//!   flags, extent ops), `counters()`, the reserves (delayed-refs reserve,
//!   global reserve, space info) and the handle's local reserve, the qgroup
//!   records (§9), every extent-tree item, the pinned bytes, the number of
//!   applied runs, `find_head` and `lookup_extent_info` of every extent, and
//!   the exact return value of every call (including `RunStats`);
//! - once a run has held a head back because of a blocker, the two sides
//!   may legitimately have run *different* refs of that head: the locked port
//!   runs ADDs in FIFO order, the lock-free one in key order (semantics.md §3.4;
//!   docs/kernel-mapping.md). Until both indexes are empty again the test
//!   compares what must still agree: the set of heads and their
//!   run-independent fields (size, kind, `total_ref_mod`, owning root,
//!   reserved bytes), `num_heads`, `num_heads_ready`, `pending_csums`, the
//!   qgroup records, disk plus queued count of every backref (invariant 12)
//!   and the `lookup_extent_info` refcount (invariant 18). While diverged,
//!   `run(Bytes)`, `check_ref_cleanup` and `destroy` are skipped (their
//!   effect depends on which refs are left). From then on for the rest of
//!   the case the reserves, the pinned bytes and the number of applied runs
//!   are not compared either: the node counts, and so the reserve charges,
//!   differed, and an allocation cancelled on one side may have been
//!   inserted and then freed by a drop on the other;
//! - on both sides and at every step: disk plus queued per backref equals the
//!   model, and so does `lookup_extent_info` (invariants 12, 18).
//!
//! At the end blockers are dropped, both sides `run(All)`, and the extent
//! trees must be equal to each other and to the model, every counter zero
//! (invariant 26), and every reserved byte back in the space info.
//!
//! The sharded port is compared the same way, in two modes (`Mode`): with
//! one shard it must equal the port call by call, every outcome and every
//! view after every step, hold-backs included (`sharded_one_shard_*`); with
//! 16 shards (`sharded_many_shards_*`) runs select heads in another order,
//! so only what does not depend on which head a run selects is compared:
//! every call while both sides hold the same heads and extents (`run_one`
//! and `run(Bytes)` only for success and, from the same state, whether a
//! head was found), and at every step the model (invariants 12, 18), the
//! qgroup records, each side's counters and `find_head` against its own
//! snapshot (invariants 1-4, 20), and in the end the extent trees. Once
//! the two sides held different state, the reserves are no longer compared
//! for the case, and the final trees only up to the items' flags and key:
//! an extent op queued on a cancelled allocation is applied if the block is
//! allocated again before the cancelled head runs, and discarded if the
//! head runs first (§6.11 step 1, §11.11a), and which comes first is a
//! matter of selection order.
//!
//! Cases: 2048 per proptest by default (`DREF_DIFF_CASES`), from a fixed seed
//! (`DREF_DIFF_SEED`); a failure prints the seed and the shrunk sequence.
//! `differential_realloc_at_another_level` is a fixed case for one
//! divergence the generator keeps away from (it uses one level per tree
//! extent): re-allocating a cancelled tree block at another level.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use delayed_refs::{
    Action, AddOutcome, CleanupOutcome, Counters, DelayedRefs, DestroyStats, DiskKey, Error, ExtentInfo, ExtentItem,
    ExtentOp, FlushMode, FsConfig, FsShared, GenericRef, HeadOutcome, HeadSnapshot, LockFreeRefs, LockedRefs,
    MemExtentTree, QgroupRecord, RefKey, ReleaseRouting, ReserveConfig, ReservesSnapshot, RsvState, RunMode, RunStats,
    ShardedRefs, TransHandle, roots,
};
use proptest::prelude::*;
use proptest::test_runner::{Config, RngAlgorithm, TestCaseError, TestError, TestRng, TestRunner};

const TREE_EXTS: usize = 3;
const DATA_EXTS: usize = 3;
const TREE_NB: u64 = 16 * 1024;
/// Data extent sizes: one csum leaf, a single sector, several leaves.
const DATA_SIZES: [u64; DATA_EXTS] = [128 * 1024, 4096, 8 << 20];
const P1: u64 = 1 << 40;
const P2: u64 = (1 << 40) + TREE_NB;

/// (root, parent) of the tree backrefs: fs trees (carry a seq), the extent
/// tree and the chunk tree (seq 0; the chunk tree makes a system head), and
/// shared refs.
const TREE_KEYS: [(u64, u64); 6] = [(5, 0), (256, 0), (2, 0), (roots::CHUNK_TREE, 0), (5, P1), (257, P2)];
/// (root, ino, offset, parent) of the data backrefs.
const DATA_KEYS: [(u64, u64, u64, u64); 6] = [
    (5, 257, 0, 0),
    (5, 257, 4096, 0),
    (256, 258, 0, 0),
    (roots::DATA_RELOC, 257, 0, 0),
    (5, 260, 0, P1),
    (256, 300, 0, P2),
];

fn tree_bytenr(i: usize) -> u64 {
    (1 << 20) * (i as u64 + 1)
}

fn data_bytenr(i: usize) -> u64 {
    (1 << 30) + i as u64 * (16 << 20)
}

/// One generated operation, in terms of indices (so shrinking stays valid).
#[derive(Clone, Debug)]
enum Op {
    /// Toggle tree backref `key` of tree extent `ext`; `op` = extent op (flag bit, key).
    Tree {
        ext: usize,
        key: usize,
        op: Option<(u8, Option<u8>)>,
    },
    /// Add (or drop, if `drop` and present) data backref `key` of data extent `ext`;
    /// `rsv` picks the reserved bytes of an `AddExtent`.
    Data {
        ext: usize,
        key: usize,
        drop: bool,
        rsv: usize,
    },
    /// An extent op on a live tree extent.
    Extent {
        ext: usize,
        bit: u8,
        key: Option<u8>,
        flags: bool,
    },
    RunOne,
    RunReady,
    /// `run(Bytes(n · C(1)))` (skipped while a blocker is registered: it
    /// would spin, §11.15; and while the sides are diverged).
    RunBytes(u64),
    /// `run(All)` (skipped while a blocker is registered).
    RunAll,
    /// `check_ref_cleanup` of extent `ext` (tree extents first, then data;
    /// skipped while the sides are diverged).
    Cleanup(usize),
    Register,
    Unregister(usize),
    Bump,
    /// End the handle and start a new one with this many items (0 = refill).
    Renew(u64),
    /// Abort: `destroy` (only while the sides are in step).
    Destroy,
    /// A call with bad input (kind, extent).
    Bad(usize, usize),
}

fn op_strategy(blockers: bool) -> BoxedStrategy<Op> {
    let mut arms: Vec<(u32, BoxedStrategy<Op>)> = vec![
        (
            8,
            (0..TREE_EXTS, 0..TREE_KEYS.len(), prop::option::weighted(0.3, (0u8..4, prop::option::of(0u8..3))))
                .prop_map(|(ext, key, op)| Op::Tree { ext, key, op })
                .boxed(),
        ),
        (
            8,
            (0..DATA_EXTS, 0..DATA_KEYS.len(), any::<bool>(), 0usize..3)
                .prop_map(|(ext, key, drop, rsv)| Op::Data { ext, key, drop, rsv })
                .boxed(),
        ),
        (
            2,
            (0..TREE_EXTS, 0u8..4, prop::option::of(0u8..3), any::<bool>())
                .prop_map(|(ext, bit, key, flags)| Op::Extent { ext, bit, key, flags })
                .boxed(),
        ),
        (3, Just(Op::RunOne).boxed()),
        (1, Just(Op::RunReady).boxed()),
        (1, (1u64..4).prop_map(Op::RunBytes).boxed()),
        (1, Just(Op::RunAll).boxed()),
        (2, (0..TREE_EXTS + DATA_EXTS).prop_map(Op::Cleanup).boxed()),
        (1, Just(Op::Bump).boxed()),
        (1, (0u64..4).prop_map(Op::Renew).boxed()),
        (1, Just(Op::Destroy).boxed()),
        (1, (0usize..BAD_KINDS, 0..TREE_EXTS.max(DATA_EXTS)).prop_map(|(k, e)| Op::Bad(k, e)).boxed()),
    ];
    if blockers {
        arms.push((2, Just(Op::Register).boxed()));
        arms.push((2, any::<usize>().prop_map(Op::Unregister).boxed()));
    }
    prop::strategy::Union::new_weighted(arms).boxed()
}

/// One concrete call, identical for both sides.
#[derive(Clone, Debug)]
enum Step {
    TreeRef(GenericRef, Option<ExtentOp>),
    DataRef(GenericRef, u64),
    ExtOp(u64, u64, ExtentOp),
    RunOne,
    Run(RunMode),
    Cleanup(u64),
    Renew(u64),
    Destroy,
}

/// What one call returned.
#[derive(Clone, Debug, PartialEq)]
enum Outcome {
    Add(Result<AddOutcome, Error>),
    Unit(Result<(), Error>),
    RunOne(Result<Option<(u64, HeadOutcome, RunStats)>, Error>),
    Run(Result<RunStats, Error>),
    Cleanup(CleanupOutcome),
    Destroy(DestroyStats),
}

/// One implementation with its backend and handle.
struct Side<D: DelayedRefs> {
    refs: D,
    tree: MemExtentTree,
    h: Option<TransHandle>,
    may_use0: u64,
}

impl<D: DelayedRefs> Side<D> {
    fn new(refs: D) -> Self {
        let may_use0 = refs.fs().reserves.snapshot().space.may_use;
        let h = Some(refs.fs().reserves.start_transaction(4, FlushMode::FlushAll).unwrap());
        Side { refs, tree: MemExtentTree::new(), h, may_use0 }
    }

    fn exec(&mut self, step: &Step) -> Outcome {
        let refs = &self.refs;
        let h = self.h.as_mut().expect("a handle is open");
        match step {
            Step::TreeRef(g, op) => Outcome::Add(refs.add_tree_ref(h, g, *op)),
            Step::DataRef(g, rsv) => Outcome::Add(refs.add_data_ref(h, g, *rsv)),
            Step::ExtOp(b, nb, op) => Outcome::Unit(refs.add_extent_op(h, *b, *nb, *op)),
            Step::RunOne => Outcome::RunOne(refs.run_one(&self.tree)),
            Step::Run(mode) => Outcome::Run(refs.run(&self.tree, *mode)),
            Step::Cleanup(b) => Outcome::Cleanup(refs.check_ref_cleanup(*b)),
            Step::Renew(n) => {
                let r = &refs.fs().reserves;
                let old = self.h.take().expect("a handle is open");
                let ended = r.end_transaction(old);
                let started = r.start_transaction(*n, FlushMode::FlushAll);
                let res = match (ended, started) {
                    (Ok(()), Ok(nh)) => {
                        self.h = Some(nh);
                        Ok(())
                    }
                    (Err(e), _) | (_, Err(e)) => Err(e),
                };
                if self.h.is_none() {
                    self.h = Some(TransHandle::new());
                }
                Outcome::Unit(res)
            }
            Step::Destroy => Outcome::Destroy(refs.destroy(&self.tree)),
        }
    }

    fn view(&self, exts: &[Ext]) -> View {
        View {
            snap: self.refs.snapshot(),
            counters: self.refs.counters(),
            reserves: self.refs.fs().reserves.snapshot(),
            local: self.h.as_ref().map(|h| h.local_rsv()).unwrap_or_default(),
            qgroups: self.refs.qgroup_records(),
            items: self.tree.items(),
            pinned: self.tree.pinned_bytes(),
            applied: self.tree.applied_refs(),
            lookups: exts.iter().map(|e| self.refs.lookup_extent_info(&self.tree, e.bytenr).unwrap()).collect(),
            finds: exts.iter().map(|e| self.refs.find_head(e.bytenr)).collect(),
        }
    }
}

/// Everything observable about one side at a quiescent point.
#[derive(Clone, Debug, PartialEq)]
struct View {
    snap: Vec<HeadSnapshot>,
    counters: Counters,
    reserves: ReservesSnapshot,
    local: RsvState,
    qgroups: Vec<QgroupRecord>,
    items: BTreeMap<u64, ExtentItem>,
    pinned: u64,
    applied: u64,
    lookups: Vec<Option<ExtentInfo>>,
    finds: Vec<Option<HeadSnapshot>>,
}

/// Model of one extent: the true count of every backref (disk plus queued).
#[derive(Clone, Debug)]
struct Ext {
    bytenr: u64,
    num_bytes: u64,
    is_data: bool,
    level: u8,
    counts: BTreeMap<RefKey, u64>,
}

impl Ext {
    fn total(&self) -> u64 {
        self.counts.values().sum()
    }

    fn bump(&mut self, key: RefKey, action: Action) {
        common::bump(&mut self.counts, key, action);
    }
}

fn ext_op(bit: u8, key: Option<u8>, flags: bool, level: u8) -> ExtentOp {
    let update_flags = flags || key.is_none();
    ExtentOp {
        key: DiskKey { objectid: 256 + key.unwrap_or(0) as u64, item_type: 1, offset: 0 },
        level,
        update_key: key.is_some(),
        update_flags,
        flags_to_set: if update_flags { 0x1000 << bit } else { 0 },
    }
}

fn fail(msg: String) -> TestCaseError {
    TestCaseError::fail(msg)
}

/// `Err` unless `a == b`.
macro_rules! same {
    ($a:expr, $b:expr, $($ctx:tt)+) => {{
        let (a, b) = (&$a, &$b);
        if a != b {
            return Err(fail(format!("{}\n  locked: {:?}\n  other:  {:?}", format!($($ctx)+), a, b)));
        }
    }};
}

/// Adds whose outcome may depend on which refs already ran: the success of
/// the call, and the qgroup record it inserted (records are per bytenr and
/// never run), or else the same error.
fn compare_adds(
    step: &Step,
    a: &Result<AddOutcome, Error>,
    b: &Result<AddOutcome, Error>,
) -> Result<(), TestCaseError> {
    same!(a.is_ok(), b.is_ok(), "add result of {step:?}");
    if let (Ok(a), Ok(b)) = (a, b) {
        same!(a.qgroup_record_inserted, b.qgroup_record_inserted, "qgroup record of {step:?}");
    } else {
        same!(a, b, "add error of {step:?}");
    }
    Ok(())
}

/// `Err` unless the condition holds.
macro_rules! ensure {
    ($c:expr, $($ctx:tt)+) => {{
        if !$c {
            return Err(fail(format!($($ctx)+)));
        }
    }};
}

const BAD_KINDS: usize = 10;

/// The bad-input call of kind `k` on extent index `e`, if it applies now
/// (a kind mismatch needs an existing head: without one the call would
/// create a bogus head instead of failing). Returns the step and the error
/// both sides must return.
fn bad_step(k: usize, e: usize, m: &[Ext], heads: &BTreeSet<u64>) -> Option<(Step, Error)> {
    let t = &m[e % TREE_EXTS];
    let d = &m[TREE_EXTS + e % DATA_EXTS];
    let tg = GenericRef::new(Action::Add, t.bytenr, TREE_NB, 0, 5).tree(t.level, 5, 0, false);
    let dg = GenericRef::new(Action::Add, d.bytenr, d.num_bytes, 0, 5).data(5, 257, 0, 0, false);
    let op = ExtentOp::set_flags(0x100, 0);
    Some(match k {
        0 => (Step::TreeRef(GenericRef { num_bytes: 0, ..tg }, None), Error::ZeroLength { bytenr: t.bytenr }),
        1 => (Step::DataRef(GenericRef { num_bytes: 0, ..dg }, 0), Error::ZeroLength { bytenr: d.bytenr }),
        2 => (
            Step::TreeRef(GenericRef { action: Action::UpdateHead, ..tg }, None),
            Error::BadAction { call: "add_tree_ref", action: Action::UpdateHead, what: "(use add_extent_op)" },
        ),
        3 => (
            Step::DataRef(GenericRef { action: Action::UpdateHead, ..dg }, 0),
            Error::BadAction { call: "add_data_ref", action: Action::UpdateHead, what: "(use add_extent_op)" },
        ),
        4 => (
            Step::TreeRef(dg, None),
            Error::BadAction { call: "add_tree_ref", action: Action::Add, what: "with a data payload" },
        ),
        5 => (Step::DataRef(tg, 4096), Error::ReservedOnMetadata { bytenr: t.bytenr, reserved: 4096 }),
        6 => (
            Step::DataRef(tg, 0),
            Error::BadAction { call: "add_data_ref", action: Action::Add, what: "with a tree payload" },
        ),
        7 if heads.contains(&t.bytenr) => {
            // A data ref on a tree block's head (§4.6 step 1: the kernel BUGs).
            let g = GenericRef::new(Action::Add, t.bytenr, TREE_NB, 0, 5).data(5, 257, 0, 0, false);
            (Step::DataRef(g, 0), Error::DataMismatch { bytenr: t.bytenr, head_is_data: false })
        }
        8 if heads.contains(&d.bytenr) => {
            let g = GenericRef::new(Action::Add, d.bytenr, d.num_bytes, 0, 5).tree(0, 5, 0, false);
            (Step::TreeRef(g, None), Error::DataMismatch { bytenr: d.bytenr, head_is_data: true })
        }
        9 if heads.contains(&d.bytenr) => {
            // An extent op on a data head (invariant 15).
            (Step::ExtOp(d.bytenr, d.num_bytes, op), Error::DataMismatch { bytenr: d.bytenr, head_is_data: true })
        }
        _ => return None,
    })
}

/// What the other side must agree with the locked port on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    /// The lock-free root: everything, until a run holds a head back (it
    /// runs a held head's ADDs in key order, the port in FIFO order); then
    /// the run-independent view until both indexes are empty again.
    LockFree,
    /// The sharded port with one shard: every call and every view, always
    /// (it is the port's own code on one root).
    Exact,
    /// The sharded port with many shards: runs select heads in another
    /// order (round robin over shards, then inside each), so `run_one` and
    /// `run(Bytes)` may run other heads than the port. Everything that does
    /// not depend on which head a run selects must agree: every other call
    /// while the sides hold the same state, and at every step the model
    /// (disk plus queued per backref, the reader's count), the qgroup
    /// records, each side's counters against its own snapshot, and in the
    /// end the extent trees.
    OrderFree,
}

/// The state of one case.
struct Case<F: DelayedRefs> {
    l: Side<LockedRefs>,
    f: Side<F>,
    mode: Mode,
    m: Vec<Ext>,
    /// The sides may hold different state: in `LockFree` mode a run held a
    /// head back, so the sides may have run different refs of it; in
    /// `OrderFree` mode their snapshots or extent trees differ.
    diverged: bool,
    /// The sides ran different refs at some point (a consequence of
    /// `diverged`): the reserves (node counts differed), the number of
    /// applied runs and the pinned bytes (an allocation cancelled on one
    /// side may have been inserted and then freed by a drop on the other)
    /// are no longer comparable for this case.
    rsv_diverged: bool,
}

impl<F: DelayedRefs> Case<F> {
    fn new(config: FsConfig, other: F, mode: Mode) -> Self {
        let mut m: Vec<Ext> = (0..TREE_EXTS)
            .map(|i| Ext {
                bytenr: tree_bytenr(i),
                num_bytes: TREE_NB,
                is_data: false,
                level: i as u8,
                counts: BTreeMap::new(),
            })
            .collect();
        m.extend((0..DATA_EXTS).map(|i| Ext {
            bytenr: data_bytenr(i),
            num_bytes: DATA_SIZES[i],
            is_data: true,
            level: 0,
            counts: BTreeMap::new(),
        }));
        let l = Side::new(LockedRefs::new(config));
        Case { l, f: Side::new(other), mode, m, diverged: false, rsv_diverged: false }
    }

    /// Whether extent `i` may start with `AddExtent`: no refs, no item anywhere.
    fn allocatable(&self, i: usize) -> bool {
        let b = self.m[i].bytenr;
        self.m[i].total() == 0 && self.l.tree.item(b).is_none() && self.f.tree.item(b).is_none()
    }

    /// The bytenrs with a head on both sides.
    fn heads(&self) -> BTreeSet<u64> {
        let other: BTreeSet<u64> = self.f.refs.snapshot().iter().map(|h| h.bytenr).collect();
        self.l.refs.snapshot().iter().map(|h| h.bytenr).filter(|b| other.contains(b)).collect()
    }

    /// Turn a generated op into a concrete call (and update the model), or
    /// `None` to skip it.
    fn plan(&mut self, op: &Op, blockers: bool) -> Option<Step> {
        Some(match *op {
            Op::Tree { ext, key, op } => {
                let (root, parent) = TREE_KEYS[key];
                let i = ext % TREE_EXTS;
                let e = &self.m[i];
                let g = GenericRef::new(Action::Add, e.bytenr, TREE_NB, parent, 5).tree(e.level, root, 0, false);
                let k = g.ref_key();
                let action = if e.counts.contains_key(&k) {
                    Action::Drop
                } else if e.total() == 0 {
                    if !self.allocatable(i) {
                        return None;
                    }
                    Action::AddExtent
                } else {
                    Action::Add
                };
                let stays_live = action != Action::Drop || e.total() > 1;
                let xop = op.filter(|_| stays_live).map(|(b, key)| ext_op(b, key, true, e.level));
                self.m[i].bump(k, action);
                Step::TreeRef(GenericRef { action, ..g }, xop)
            }
            Op::Data { ext, key, drop, rsv } => {
                let (root, ino, offset, parent) = DATA_KEYS[key];
                let i = TREE_EXTS + ext % DATA_EXTS;
                let e = &self.m[i];
                let g =
                    GenericRef::new(Action::Add, e.bytenr, e.num_bytes, parent, root).data(root, ino, offset, 0, false);
                let k = g.ref_key();
                let (action, reserved) = if drop && e.counts.contains_key(&k) {
                    (Action::Drop, 0)
                } else if e.total() == 0 {
                    if !self.allocatable(i) {
                        return None;
                    }
                    (Action::AddExtent, [0, e.num_bytes, 4096][rsv % 3])
                } else {
                    (Action::Add, 0)
                };
                self.m[i].bump(k, action);
                Step::DataRef(GenericRef { action, ..g }, reserved)
            }
            Op::Extent { ext, bit, key, flags } => {
                let e = &self.m[ext % TREE_EXTS];
                if e.total() == 0 {
                    return None;
                }
                Step::ExtOp(e.bytenr, TREE_NB, ext_op(bit, key, flags, e.level))
            }
            Op::RunOne => Step::RunOne,
            Op::RunReady => Step::Run(RunMode::Ready),
            Op::RunBytes(n) => {
                // While diverged the byte goal is reached after a different
                // number of heads on each side: skip (in `OrderFree` mode
                // its outcome is compared loosely anyway).
                if blockers || (self.diverged && self.mode != Mode::OrderFree) {
                    return None;
                }
                let c = self.l.refs.fs().reserves.geometry().delayed_ref_bytes(1);
                Step::Run(RunMode::Bytes(n * c))
            }
            Op::RunAll => {
                if blockers {
                    return None;
                }
                Step::Run(RunMode::All)
            }
            Op::Cleanup(i) => {
                // While diverged one side may still hold a ref the other
                // already ran, so "node-less" differs: skip.
                if self.diverged {
                    return None;
                }
                Step::Cleanup(self.m[i % self.m.len()].bytenr)
            }
            Op::Renew(n) => Step::Renew(n),
            Op::Destroy => {
                if self.diverged {
                    return None;
                }
                Step::Destroy
            }
            Op::Register | Op::Unregister(_) | Op::Bump | Op::Bad(..) => unreachable!("handled by the caller"),
        })
    }

    /// Compare the two outcomes of one call.
    fn compare_outcome(
        &self,
        step: &Step,
        lo: &Outcome,
        fo: &Outcome,
        was_diverged: bool,
    ) -> Result<(), TestCaseError> {
        // Which head these select depends on the selection order.
        let selects = matches!(step, Step::RunOne | Step::Run(RunMode::Bytes(_)));
        if self.mode == Mode::OrderFree && (was_diverged || selects) {
            return Self::compare_order_free(step, lo, fo, was_diverged);
        }
        if !was_diverged {
            same!(lo, fo, "outcome of {step:?}");
            return Ok(());
        }
        // Diverged: only what does not depend on which refs already ran.
        match (lo, fo) {
            (Outcome::Add(a), Outcome::Add(b)) => compare_adds(step, a, b)?,
            (Outcome::RunOne(a), Outcome::RunOne(b)) => {
                let key = |r: &Result<Option<(u64, HeadOutcome, RunStats)>, Error>| {
                    r.as_ref().map(|o| o.map(|(b, out, s)| (b, out, s.heads, s.held_back, s.heads_deleted))).ok()
                };
                same!(key(a), key(b), "run_one of {step:?} (head, outcome, heads, held back, deleted)");
            }
            (Outcome::Run(a), Outcome::Run(b)) => {
                let key =
                    |r: &Result<RunStats, Error>| r.as_ref().map(|s| (s.heads, s.held_back, s.heads_deleted)).ok();
                same!(key(a), key(b), "run of {step:?} (heads, held back, deleted)");
            }
            _ => same!(lo, fo, "outcome of {step:?}"),
        }
        Ok(())
    }

    /// `OrderFree` mode: the outcomes of a call that selects heads, or of
    /// any call while the sides hold different state. Only the success of
    /// the call, the qgroup record an add inserted (records are per bytenr
    /// and never run) and, from the same state, whether `run_one` found an
    /// unprocessed head must agree.
    fn compare_order_free(step: &Step, lo: &Outcome, fo: &Outcome, was_diverged: bool) -> Result<(), TestCaseError> {
        match (lo, fo) {
            (Outcome::Add(a), Outcome::Add(b)) => compare_adds(step, a, b)?,
            (Outcome::Unit(a), Outcome::Unit(b)) => same!(a, b, "result of {step:?}"),
            (Outcome::RunOne(a), Outcome::RunOne(b)) => {
                same!(a.is_ok(), b.is_ok(), "run_one of {step:?} succeeded");
                if !was_diverged {
                    let found = |r: &Result<Option<_>, Error>| r.as_ref().map(|o| o.is_some()).ok();
                    same!(found(a), found(b), "run_one of {step:?} found a head");
                }
            }
            (Outcome::Run(a), Outcome::Run(b)) => same!(a.is_ok(), b.is_ok(), "run of {step:?} succeeded"),
            _ => same!(lo, fo, "outcome of {step:?}"),
        }
        Ok(())
    }

    /// One side's merged views against its own snapshot: invariants 1-4 and
    /// 20, and `find_head` of every extent equal to its snapshot entry.
    fn self_check(&self, name: &str, v: &View) -> Result<(), TestCaseError> {
        let c = &v.counters;
        ensure!(c.num_heads == v.snap.len() as u64, "{name}: invariant 1: {c:?}, {} heads", v.snap.len());
        let ready = v.snap.iter().filter(|h| !h.processing).count() as u64;
        ensure!(c.num_heads_ready == ready, "{name}: invariant 2: {c:?}, {ready} ready");
        let nodes: u64 = v.snap.iter().map(|h| h.nodes.len() as u64).sum();
        ensure!(c.num_entries == v.snap.len() as u64 + nodes, "{name}: invariant 3: {c:?}, {nodes} nodes");
        ensure!(v.snap.windows(2).all(|w| w[0].bytenr < w[1].bytenr), "{name}: invariant 4: snapshot order");
        let csums: u64 = v.snap.iter().filter(|h| h.is_data && h.total_ref_mod < 0).map(|h| h.num_bytes).sum();
        ensure!(c.pending_csums == csums, "{name}: invariant 20: {c:?}, {csums} csum bytes");
        for (e, found) in self.m.iter().zip(&v.finds) {
            let in_snap = v.snap.iter().find(|h| h.bytenr == e.bytenr);
            ensure!(found.as_ref() == in_snap, "{name}: find_head({:#x}) disagrees with the snapshot", e.bytenr);
        }
        Ok(())
    }

    /// Disk plus queued per backref and the reader's refcount equal the
    /// model on one side (invariants 12, 18).
    fn check_model(&self, name: &str, v: &View) -> Result<(), TestCaseError> {
        let heads: BTreeMap<u64, &HeadSnapshot> = v.snap.iter().map(|h| (h.bytenr, h)).collect();
        let ours: BTreeSet<u64> = self.m.iter().map(|e| e.bytenr).collect();
        ensure!(heads.keys().all(|b| ours.contains(b)), "{name}: a head for an unknown bytenr: {:?}", heads.keys());
        ensure!(v.items.keys().all(|b| ours.contains(b)), "{name}: an item for an unknown bytenr");
        for (i, e) in self.m.iter().enumerate() {
            let head = heads.get(&e.bytenr);
            let disk = v.items.get(&e.bytenr).map(|it| it.backrefs.clone()).unwrap_or_default();
            for (k, have, want) in common::disk_plus_queued(&e.counts, &disk, head.copied()) {
                ensure!(
                    have == want,
                    "{name}: invariant 12: {k:?} of {:#x}: disk+queued {have}, model {want}",
                    e.bytenr
                );
            }
            let seen = v.lookups[i].map(|x| x.refs).unwrap_or(0);
            ensure!(seen == e.total(), "{name}: invariant 18: lookup of {:#x} = {seen}, model {}", e.bytenr, e.total());
            if let Some(it) = v.items.get(&e.bytenr) {
                ensure!(it.refs == it.backrefs.values().sum::<u64>(), "{name}: item refs != Σ backrefs");
                ensure!(
                    it.is_data == e.is_data && it.num_bytes == e.num_bytes,
                    "{name}: item kind/size of {:#x}",
                    e.bytenr
                );
            }
        }
        Ok(())
    }

    /// Compare the two sides' views.
    fn compare_views(&self, lv: &View, fv: &View) -> Result<(), TestCaseError> {
        self.check_model("locked", lv)?;
        self.check_model(F::NAME, fv)?;
        self.self_check("locked", lv)?;
        self.self_check(F::NAME, fv)?;
        same!(lv.qgroups, fv.qgroups, "qgroup records (§9)");
        if !self.rsv_diverged {
            same!(lv.reserves, fv.reserves, "reserves (§8)");
            same!(lv.local, fv.local, "handle local reserve (§8.3)");
        }
        if !self.diverged {
            same!(lv.counters, fv.counters, "counters (§2.5)");
            for (a, b) in lv.snap.iter().zip(&fv.snap) {
                same!(a, b, "head {:#x}", a.bytenr);
            }
            same!(lv.snap, fv.snap, "snapshot (head set)");
            same!(lv.items, fv.items, "extent trees");
            if !self.rsv_diverged {
                same!(lv.pinned, fv.pinned, "pinned bytes (§6.11 step 4)");
                same!(lv.applied, fv.applied, "applied refs");
            }
            same!(lv.lookups, fv.lookups, "lookup_extent_info (§7.1)");
            same!(lv.finds, fv.finds, "find_head (§6.1)");
            return Ok(());
        }
        if self.mode == Mode::OrderFree {
            // Other heads ran on each side: the head sets, the counters and
            // the reader's flags differ legitimately, and so may the flags of an extent (see
            // the final check in `run_case_with`). The model and self checks
            // above hold: both readers return the model's count.
            return Ok(());
        }
        let c = |c: &Counters| (c.num_heads, c.num_heads_ready, c.pending_csums);
        same!(c(&lv.counters), c(&fv.counters), "counters (num_heads, num_heads_ready, pending_csums)");
        let fixed = |s: &[HeadSnapshot]| {
            s.iter()
                .map(|h| {
                    (h.bytenr, h.num_bytes, h.is_data, h.is_system, h.total_ref_mod, h.owning_root, h.reserved_bytes)
                })
                .collect::<Vec<_>>()
        };
        same!(fixed(&lv.snap), fixed(&fv.snap), "heads (run-independent fields)");
        let refs = |l: &[Option<ExtentInfo>]| l.iter().map(|x| x.map(|i| i.refs)).collect::<Vec<_>>();
        same!(refs(&lv.lookups), refs(&fv.lookups), "lookup_extent_info refs (§7.1)");
        for (i, e) in self.m.iter().enumerate() {
            if lv.items.contains_key(&e.bytenr) && fv.items.contains_key(&e.bytenr) {
                same!(lv.lookups[i], fv.lookups[i], "lookup_extent_info of {:#x}", e.bytenr);
            }
        }
        let present = |l: &[Option<HeadSnapshot>]| l.iter().map(|x| x.is_some()).collect::<Vec<_>>();
        same!(present(&lv.finds), present(&fv.finds), "find_head presence");
        Ok(())
    }
}

fn held_back(o: &Outcome) -> bool {
    match o {
        Outcome::RunOne(Ok(Some((_, out, s)))) => *out == HeadOutcome::HeldBack || s.held_back > 0,
        Outcome::Run(Ok(s)) => s.held_back > 0,
        _ => false,
    }
}

/// The implementation compared with the locked port, and how.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Other {
    /// `LockFreeRefs` (mode `LockFree`).
    LockFree,
    /// `ShardedRefs` with this many shards (mode `Exact` for 1, else `OrderFree`).
    Sharded(usize),
}

fn run_case(config: FsConfig, ops: &[Op], other: Other) -> Result<(), TestCaseError> {
    match other {
        Other::LockFree => run_case_with(Case::new(config, LockFreeRefs::new(config), Mode::LockFree), ops),
        Other::Sharded(n) => {
            let refs = ShardedRefs::with_shards(Arc::new(FsShared::new(config)), n);
            let mode = if n == 1 { Mode::Exact } else { Mode::OrderFree };
            run_case_with(Case::new(config, refs, mode), ops)
        }
    }
}

fn run_case_with<F: DelayedRefs>(mut c: Case<F>, ops: &[Op]) -> Result<(), TestCaseError> {
    // Blockers of both sides, registered and dropped in lockstep.
    let (lseq, fseq) = (c.l.refs.fs().clone(), c.f.refs.fs().clone());
    let mut blockers = Vec::new();
    for (i, op) in ops.iter().enumerate() {
        let ctx = |e: TestCaseError| fail(format!("step {i} ({op:?}): {e}"));
        match *op {
            Op::Register => {
                let (a, b) = (lseq.seq.register(), fseq.seq.register());
                same!(a.seq(), b.seq(), "step {i}: blocker seq");
                blockers.push((a, b));
            }
            Op::Unregister(k) => {
                if !blockers.is_empty() {
                    let k = k % blockers.len();
                    drop(blockers.remove(k));
                }
            }
            Op::Bump => {
                same!(lseq.seq.bump(), fseq.seq.bump(), "step {i}: seq bump");
            }
            Op::Bad(kind, e) => {
                let Some((step, want)) = bad_step(kind, e, &c.m, &c.heads()) else { continue };
                let (lb, fb) = (c.l.view(&c.m), c.f.view(&c.m));
                let (lo, fo) = (c.l.exec(&step), c.f.exec(&step));
                let err = |o: &Outcome| match o {
                    Outcome::Add(r) => r.clone().err(),
                    Outcome::Unit(r) => r.clone().err(),
                    _ => None,
                };
                same!(err(&lo), err(&fo), "step {i}: error of bad call {step:?}");
                ensure!(err(&lo) == Some(want.clone()), "step {i}: {step:?} returned {lo:?}, want {want:?}");
                same!(lb, c.l.view(&c.m), "step {i}: locked changed by a failed call {step:?}");
                same!(fb, c.f.view(&c.m), "step {i}: {} changed by a failed call {step:?}", F::NAME);
            }
            _ => {
                let blocked = !blockers.is_empty();
                let Some(step) = c.plan(op, blocked) else { continue };
                let (lo, fo) = (c.l.exec(&step), c.f.exec(&step));
                let was_diverged = c.diverged;
                if c.mode == Mode::LockFree && (held_back(&lo) || held_back(&fo)) {
                    c.diverged = true;
                }
                c.compare_outcome(&step, &lo, &fo, was_diverged || c.diverged).map_err(ctx)?;
                if let Step::Destroy = step {
                    // Abort: everything unrun is gone; the true counts are the disk's.
                    for e in &mut c.m {
                        e.counts = c.l.tree.item(e.bytenr).map(|it| it.backrefs).unwrap_or_default();
                    }
                }
            }
        }
        if c.diverged {
            c.rsv_diverged = true;
        }
        let (lv, fv) = (c.l.view(&c.m), c.f.view(&c.m));
        if c.mode == Mode::OrderFree {
            // In step exactly while both hold the same heads and extents
            // (the reserves stay out of the comparison once they were not).
            c.diverged = lv.snap != fv.snap || lv.items != fv.items;
            if c.diverged {
                c.rsv_diverged = true;
            }
        } else if c.diverged && lv.snap.is_empty() && fv.snap.is_empty() {
            // Both indexes are empty: the sides are in step again (except
            // the reserves, whose node counts differed meanwhile).
            c.diverged = false;
        }
        c.compare_views(&lv, &fv).map_err(ctx)?;
    }

    // The end of the transaction: drop the blockers and drain both sides.
    drop(blockers);
    let (lo, fo) = (c.l.exec(&Step::Run(RunMode::All)), c.f.exec(&Step::Run(RunMode::All)));
    let was_diverged = c.diverged;
    c.compare_outcome(&Step::Run(RunMode::All), &lo, &fo, was_diverged)
        .map_err(|e| fail(format!("final run(All): {e}")))?;
    ensure!(matches!(lo, Outcome::Run(Ok(_))), "final run(All) failed: {lo:?}");
    let (lv, fv) = (c.l.view(&c.m), c.f.view(&c.m));
    // `OrderFree`, once the sides were apart: an extent op queued on an
    // allocation that was then cancelled is applied if the block is
    // allocated again before the cancelled head runs, and discarded if the
    // head runs first (§6.11 step 1, §11.11a). Which came first depends on
    // the selection order, so the items' flags and key may differ; the rest
    // of every item must not.
    c.diverged = c.mode == Mode::OrderFree && c.rsv_diverged && lv.items != fv.items;
    c.compare_views(&lv, &fv).map_err(|e| fail(format!("after the final run(All): {e}")))?;
    if c.diverged {
        let shape = |items: &BTreeMap<u64, ExtentItem>| {
            items
                .iter()
                .map(|(b, it)| (*b, it.num_bytes, it.is_data, it.refs, it.level, it.backrefs.clone()))
                .collect::<Vec<_>>()
        };
        same!(shape(&lv.items), shape(&fv.items), "after the final run(All): extent trees but flags and key");
    }
    for (name, v) in [("locked", &lv), (F::NAME, &fv)] {
        ensure!(v.snap.is_empty(), "{name}: invariant 26: index not empty");
        ensure!(v.counters == Counters::default(), "{name}: invariant 26: counters {:?}", v.counters);
        ensure!(v.reserves.delayed_refs.size == 0, "{name}: invariant 26: delayed refs rsv {:?}", v.reserves);
        for e in &c.m {
            let got = v.items.get(&e.bytenr).map(|it| it.backrefs.clone()).unwrap_or_default();
            ensure!(got == e.counts, "{name}: extent {:#x}: tree {got:?}, model {:?}", e.bytenr, e.counts);
        }
    }
    // Every reserved byte goes back to the space info.
    let lr = &c.l.refs.fs().reserves;
    lr.end_transaction(c.l.h.take().unwrap()).map_err(|e| fail(format!("locked end_transaction: {e}")))?;
    let fr = &c.f.refs.fs().reserves;
    fr.end_transaction(c.f.h.take().unwrap()).map_err(|e| fail(format!("{} end_transaction: {e}", F::NAME)))?;
    ensure!(lr.snapshot().space.may_use == c.l.may_use0, "locked: reserved bytes not returned: {:?}", lr.snapshot());
    ensure!(
        fr.snapshot().space.may_use == c.f.may_use0,
        "{}: reserved bytes not returned: {:?}",
        F::NAME,
        fr.snapshot()
    );
    if !c.rsv_diverged {
        same!(lr.snapshot(), fr.snapshot(), "reserves after end_transaction");
    }
    Ok(())
}

fn config_strategy() -> impl Strategy<Value = FsConfig> {
    (any::<bool>(), any::<bool>()).prop_map(|(qgroups, fixed)| FsConfig {
        reserves: ReserveConfig {
            routing: if fixed { ReleaseRouting::Fixed } else { ReleaseRouting::V6_8 },
            ..ReserveConfig::default()
        },
        qgroups,
        pending_limit: 0,
    })
}

fn run_differential(with_blockers: bool, seed_salt: u8, other: Other) {
    let cases = std::env::var("DREF_DIFF_CASES").ok().and_then(|s| s.parse().ok()).unwrap_or(2048);
    let seed: u64 = std::env::var("DREF_DIFF_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or(0xd1ff);
    let mut bytes = [0u8; 32];
    bytes[..8].copy_from_slice(&seed.to_le_bytes());
    bytes[8] = seed_salt;
    let rng = TestRng::from_seed(RngAlgorithm::ChaCha, &bytes);
    let mut runner = TestRunner::new_with_rng(Config { cases, failure_persistence: None, ..Config::default() }, rng);
    let strategy = (config_strategy(), prop::collection::vec(op_strategy(with_blockers), 1..120));
    let res = runner.run(&strategy, |(config, ops)| run_case(config, &ops, other));
    match res {
        Ok(()) => {}
        Err(TestError::Fail(reason, (config, ops))) => panic!(
            "differential failure against {other:?} (DREF_DIFF_SEED={seed}): {reason}\nminimal case: {config:?}\n{ops:#?}"
        ),
        Err(e) => panic!("differential test against {other:?} aborted (DREF_DIFF_SEED={seed}): {e}"),
    }
}

/// No blockers: the two sides must agree on every observable value after
/// every single step, including the exact figures of every run.
#[test]
fn differential_without_blockers() {
    run_differential(false, 1, Other::LockFree);
}

/// With tree-mod-log blockers (§5.2, §5.3): exact agreement until a head
/// is held back, then the run-order-independent view until both indexes
/// are empty again.
#[test]
fn differential_with_blockers() {
    run_differential(true, 2, Other::LockFree);
}

/// Shards of the many-shard differential: more than the 6 extents, so some
/// shards stay empty and some may hold two extents.
const MANY_SHARDS: usize = 16;

/// `ShardedRefs` with one shard is the port, call by call: every outcome
/// and every view after every step, hold-backs included.
#[test]
fn sharded_one_shard_without_blockers() {
    run_differential(false, 3, Other::Sharded(1));
}

/// The same with tree-mod-log blockers (held-back heads run the same refs:
/// one shard runs the port's own head code).
#[test]
fn sharded_one_shard_with_blockers() {
    run_differential(true, 4, Other::Sharded(1));
}

/// `ShardedRefs` with many shards: everything that does not depend on
/// which head a run selects (see `Mode::OrderFree`).
#[test]
fn sharded_many_shards_without_blockers() {
    run_differential(false, 5, Other::Sharded(MANY_SHARDS));
}

/// The same with tree-mod-log blockers.
#[test]
fn sharded_many_shards_with_blockers() {
    run_differential(true, 6, Other::Sharded(MANY_SHARDS));
}

/// A fixed sequence covering a cancelled allocation, a re-allocation of it
/// (§11.11a), a hold-back, a cleanup and an abort, independent of the generator.
#[test]
fn differential_fixed_sequence() {
    use Op::*;
    let ops = [
        Data { ext: 0, key: 0, drop: false, rsv: 1 },
        Data { ext: 0, key: 0, drop: true, rsv: 0 },
        Data { ext: 0, key: 2, drop: false, rsv: 2 },
        Tree { ext: 0, key: 0, op: Some((1, Some(2))) },
        Tree { ext: 0, key: 0, op: None },
        Cleanup(0),
        Tree { ext: 1, key: 2, op: Some((0, None)) },
        Tree { ext: 1, key: 0, op: None },
        RunOne,
        Register,
        Tree { ext: 1, key: 1, op: None },
        Bump,
        Data { ext: 0, key: 4, drop: false, rsv: 0 },
        RunReady,
        Unregister(0),
        Extent { ext: 1, bit: 2, key: Some(1), flags: true },
        Bad(7, 1),
        Bad(8, 0),
        RunAll,
        Tree { ext: 2, key: 3, op: Some((3, None)) },
        Data { ext: 1, key: 1, drop: false, rsv: 1 },
        Destroy,
        RunBytes(2),
        Renew(0),
        Tree { ext: 2, key: 3, op: None },
    ];
    let config = FsConfig { qgroups: true, ..FsConfig::default() };
    for other in [Other::LockFree, Other::Sharded(1), Other::Sharded(MANY_SHARDS)] {
        if let Err(e) = run_case(config, &ops, other) {
            panic!("against {other:?}: {e}");
        }
    }
}

/// A tree block whose allocation was cancelled in this transaction (its
/// head keeps must_insert_reserved and no node) is allocated again, now as
/// a block of another level, before the head ran (semantics.md §11.11a, §4.6 step 3).
/// The first node reached zero and was dropped (§4.7, §4.9), so the new ADD
/// is a new node with the new level, and the inserted item must carry it.
/// Both sides must agree on the queued node and on the item.
#[test]
fn differential_realloc_at_another_level() {
    fn queue<D: DelayedRefs>(refs: &D) {
        let mut h = TransHandle::new();
        let b = tree_bytenr(0);
        let g = |action, level| GenericRef::new(action, b, TREE_NB, 0, 5).tree(level, 5, 0, false);
        let op = |level| Some(ExtentOp::set_flags(0x100, level));
        refs.add_tree_ref(&mut h, &g(Action::AddExtent, 0), op(0)).unwrap();
        refs.add_tree_ref(&mut h, &g(Action::Drop, 0), None).unwrap();
        refs.add_tree_ref(&mut h, &g(Action::AddExtent, 1), op(1)).unwrap();
    }
    let (l, f) = (LockedRefs::new(FsConfig::default()), LockFreeRefs::new(FsConfig::default()));
    let (lt, ft) = (MemExtentTree::new(), MemExtentTree::new());
    queue(&l);
    queue(&f);
    let levels = |s: &[HeadSnapshot]| s.iter().flat_map(|h| h.nodes.iter().map(|n| n.level)).collect::<Vec<_>>();
    assert_eq!(levels(&l.snapshot()), vec![1], "locked: the re-created node carries the new level");
    let f_queued = levels(&f.snapshot());
    l.run(&lt, RunMode::All).unwrap();
    f.run(&ft, RunMode::All).unwrap();
    let item_level = |t: &MemExtentTree| t.item(tree_bytenr(0)).map(|i| i.level);
    assert_eq!(item_level(&lt), Some(1));
    assert_eq!(
        (f_queued, item_level(&ft)),
        (vec![1], Some(1)),
        "lockfree: (queued node level, inserted item level) of the re-allocated block; locked has ([1], Some(1))"
    );
}
