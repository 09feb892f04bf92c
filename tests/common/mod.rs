//! Shared helpers for the integration tests: ref builders, a recording
//! extent-tree wrapper, a state observer for "nothing changed" checks, and the
//! quiescent-invariant checks of semantics.md §10.
//!
//! Every test is written once as `fn case<D: DelayedRefs>()` and instantiated
//! per implementation by [`for_each_impl!`]. The single `mod lockfree` line
//! in the macro below gives the lock-free implementation the same tests in
//! every file, and the `mod sharded` line the sharded locked port
//! (`ShardedRefs`); commenting them out leaves the locked port alone.

#![allow(dead_code, unused_macros, unused_imports)]

use std::collections::BTreeMap;
use std::sync::Mutex;

use delayed_refs::{
    Action, BLOCK_FLAG_FULL_BACKREF, Counters, DelayedRefs, EXTENT_FLAG_DATA, EXTENT_FLAG_TREE_BLOCK, ExtentError,
    ExtentInfo, ExtentItem, ExtentOp, ExtentTree, GenericRef, Geometry, HeadSnapshot, MemExtentTree, OpRun, Pin,
    QgroupRecord, RefKey, RefRun, ReservesSnapshot, TransHandle, is_fstree,
};

/// Instantiate generic test fns `fn name<D: DelayedRefs>()` as `#[test]`s,
/// one module per implementation.
macro_rules! for_each_impl {
    ($($name:ident),+ $(,)?) => {
        mod locked {
            $( #[test] fn $name() { super::$name::<::delayed_refs::LockedRefs>(); } )+
        }
        // The lock-free implementation: this one line runs every test file
        // against it (comment it out to test the locked port alone).
        mod lockfree { $( #[test] fn $name() { super::$name::<::delayed_refs::LockFreeRefs>(); } )+ }
        // The locked port sharded by bytenr (16 shards): this one line runs
        // every test file against it too.
        mod sharded { $( #[test] fn $name() { super::$name::<::delayed_refs::ShardedRefs>(); } )+ }
    };
}

/// Extent `i` of the backend-failure tests: 1 MiB apart from 1 GiB.
pub fn extent(i: u64) -> u64 {
    (1 << 30) + i * (1 << 20)
}

/// A 4 KiB data ref of extent `i` from inode `256 + ino` of root 5.
pub fn extent_ref(action: Action, i: u64, ino: u64) -> GenericRef {
    GenericRef::new(action, extent(i), 4096, 0, 5).data(5, 256 + ino, 0, 0, false)
}

/// Queue `heads` data extents of `refs` refs each, the first allocating
/// (the backend-failure tests' starting point).
pub fn queue_extents<D: DelayedRefs>(refs: &D, heads: u64, per_head: u64) {
    let mut h = TransHandle::new();
    for i in 0..heads {
        refs.add_data_ref(&mut h, &extent_ref(Action::AddExtent, i, 0), 4096).unwrap();
        for ino in 1..per_head {
            refs.add_data_ref(&mut h, &extent_ref(Action::Add, i, ino), 0).unwrap();
        }
    }
}

/// Length of a tree block in these tests (default node size).
pub const TREE_NB: u64 = 16384;
/// Length of a data extent in these tests (one csum leaf: L = 1).
pub const DATA_NB: u64 = 128 * 1024;

/// The four ref kinds (semantics.md §1.3 type choice).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// TREE_BLOCK_REF (176).
    TreeBlock,
    /// EXTENT_DATA_REF (178).
    ExtentData,
    /// SHARED_BLOCK_REF (182).
    SharedBlock,
    /// SHARED_DATA_REF (184).
    SharedData,
}

/// All four kinds.
pub const KINDS: [Kind; 4] = [Kind::TreeBlock, Kind::ExtentData, Kind::SharedBlock, Kind::SharedData];

impl Kind {
    /// Whether the kind is a data ref.
    pub fn is_data(self) -> bool {
        matches!(self, Kind::ExtentData | Kind::SharedData)
    }

    /// Extent length used for this kind.
    pub fn nb(self) -> u64 {
        if self.is_data() { DATA_NB } else { TREE_NB }
    }

    /// A ref of this kind; `i` varies the identity (root/inode/parent).
    pub fn gref(self, action: Action, bytenr: u64, i: u64) -> GenericRef {
        match self {
            Kind::TreeBlock => tref(action, bytenr, 256 + i, 0),
            Kind::SharedBlock => tref(action, bytenr, 256, (1 << 40) + i * TREE_NB),
            Kind::ExtentData => dref(action, bytenr, 256, 257 + i, 0, 0),
            Kind::SharedData => dref(action, bytenr, 256, 257, 0, (1 << 40) + i * TREE_NB),
        }
    }
}

/// A level-0 tree ref of `root` (shared by `parent` if non-zero), owned by `root`.
pub fn tref(action: Action, bytenr: u64, root: u64, parent: u64) -> GenericRef {
    GenericRef::new(action, bytenr, TREE_NB, parent, root).tree(0, root, 0, false)
}

/// A data ref of `(root, ino, offset)` (shared by `parent` if non-zero).
pub fn dref(action: Action, bytenr: u64, root: u64, ino: u64, offset: u64, parent: u64) -> GenericRef {
    GenericRef::new(action, bytenr, DATA_NB, parent, root).data(root, ino, offset, 0, false)
}

/// Queue `gref` through the entry point its payload needs (reserved = its
/// length for a data `AddExtent`, else 0; no extent op).
pub fn add<D: DelayedRefs>(refs: &D, h: &mut TransHandle, gref: &GenericRef) -> delayed_refs::AddOutcome {
    let r = if gref.is_data() {
        let reserved = if gref.action == Action::AddExtent { gref.num_bytes } else { 0 };
        refs.add_data_ref(h, gref, reserved)
    } else {
        refs.add_tree_ref(h, gref, None)
    };
    r.unwrap_or_else(|e| panic!("{}: add {gref:?} failed: {e}", D::NAME))
}

/// Load an extent item with the given backrefs into the tree (a before-image).
pub fn load_item(tree: &MemExtentTree, bytenr: u64, num_bytes: u64, is_data: bool, backrefs: &[(RefKey, u64)]) {
    let backrefs: BTreeMap<RefKey, u64> = backrefs.iter().copied().collect();
    let refs = backrefs.values().sum();
    tree.insert_item(
        bytenr,
        ExtentItem {
            num_bytes,
            is_data,
            refs,
            flags: if is_data { EXTENT_FLAG_DATA } else { EXTENT_FLAG_TREE_BLOCK },
            level: 0,
            key: None,
            backrefs,
        },
    );
}

/// An owned copy of one [`RefRun`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RunRecord {
    pub bytenr: u64,
    pub num_bytes: u64,
    pub is_data: bool,
    pub key: RefKey,
    pub level: u8,
    pub action: Action,
    pub ref_mod: u64,
    pub insert_reserved: bool,
    pub extent_op: Option<ExtentOp>,
    pub owning_root: u64,
}

impl RunRecord {
    fn of(r: &RefRun<'_>) -> Self {
        RunRecord {
            bytenr: r.bytenr,
            num_bytes: r.num_bytes,
            is_data: r.is_data,
            key: r.key,
            level: r.level,
            action: r.action,
            ref_mod: r.ref_mod,
            insert_reserved: r.insert_reserved,
            extent_op: r.extent_op.copied(),
            owning_root: r.owning_root,
        }
    }
}

/// One backend call seen by [`Recording`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    /// `apply_ref`, and whether the inner tree accepted it.
    Ref(RunRecord, bool),
    /// `apply_extent_op`, and whether the inner tree accepted it.
    Op { bytenr: u64, op: ExtentOp, ok: bool },
    /// `pin_reserved`.
    Pin { bytenr: u64, num_bytes: u64, is_data: bool },
}

/// Logs every backend call and delegates to the inner tree.
#[derive(Debug, Default)]
pub struct Recording<B = MemExtentTree> {
    pub inner: B,
    log: Mutex<Vec<Event>>,
}

impl<B> Recording<B> {
    /// Wrap a tree.
    pub fn new(inner: B) -> Self {
        Recording { inner, log: Mutex::new(Vec::new()) }
    }

    /// Every call so far.
    pub fn events(&self) -> Vec<Event> {
        self.log.lock().unwrap().clone()
    }

    /// Take and clear the log.
    pub fn take(&self) -> Vec<Event> {
        std::mem::take(&mut *self.log.lock().unwrap())
    }

    /// The successful ref runs so far, in order.
    pub fn runs(&self) -> Vec<RunRecord> {
        self.events()
            .into_iter()
            .filter_map(|e| match e {
                Event::Ref(r, true) => Some(r),
                _ => None,
            })
            .collect()
    }

    /// The successful ref runs of one extent, in order.
    pub fn runs_of(&self, bytenr: u64) -> Vec<RunRecord> {
        self.runs().into_iter().filter(|r| r.bytenr == bytenr).collect()
    }
}

impl<B: ExtentTree> ExtentTree for Recording<B> {
    fn apply_ref(&self, run: &RefRun<'_>) -> Result<(), ExtentError> {
        let r = self.inner.apply_ref(run);
        self.log.lock().unwrap().push(Event::Ref(RunRecord::of(run), r.is_ok()));
        r
    }

    fn apply_extent_op(&self, run: &OpRun<'_>) -> Result<(), ExtentError> {
        let r = self.inner.apply_extent_op(run);
        self.log.lock().unwrap().push(Event::Op { bytenr: run.bytenr, op: *run.op, ok: r.is_ok() });
        r
    }

    fn pin_reserved(&self, pin: &Pin) -> Result<(), ExtentError> {
        let r = self.inner.pin_reserved(pin);
        self.log.lock().unwrap().push(Event::Pin {
            bytenr: pin.bytenr,
            num_bytes: pin.num_bytes,
            is_data: pin.is_data,
        });
        r
    }

    fn lookup(&self, bytenr: u64) -> Result<Option<ExtentInfo>, ExtentError> {
        ExtentTree::lookup(&self.inner, bytenr)
    }
}

/// Calls a hook before every `apply_ref` (to add refs while a run is in
/// progress, as COWing the extent tree does), then delegates.
pub struct Hooked<'a, B> {
    pub inner: &'a B,
    pub hook: Box<dyn Fn(&RefRun<'_>) + Send + Sync + 'a>,
}

impl<B: ExtentTree> ExtentTree for Hooked<'_, B> {
    fn apply_ref(&self, run: &RefRun<'_>) -> Result<(), ExtentError> {
        (self.hook)(run);
        self.inner.apply_ref(run)
    }

    fn apply_extent_op(&self, run: &OpRun<'_>) -> Result<(), ExtentError> {
        self.inner.apply_extent_op(run)
    }

    fn pin_reserved(&self, pin: &Pin) -> Result<(), ExtentError> {
        self.inner.pin_reserved(pin)
    }

    fn lookup(&self, bytenr: u64) -> Result<Option<ExtentInfo>, ExtentError> {
        ExtentTree::lookup(self.inner, bytenr)
    }
}

/// Everything observable about a root, for "nothing changed" comparisons.
#[derive(Clone, Debug, PartialEq)]
pub struct Observed {
    pub snapshot: Vec<HeadSnapshot>,
    pub counters: Counters,
    pub reserves: ReservesSnapshot,
    pub qgroups: Vec<QgroupRecord>,
}

/// Observe a root at quiescence.
pub fn observe<D: DelayedRefs>(refs: &D) -> Observed {
    Observed {
        snapshot: refs.snapshot(),
        counters: refs.counters(),
        reserves: refs.fs().reserves.snapshot(),
        qgroups: refs.qgroup_records(),
    }
}

/// Signed count of a node (semantics.md notation `sgn · ref_mod`).
pub fn signed(n: &delayed_refs::NodeSnapshot) -> i64 {
    match n.action {
        Action::Add => n.ref_mod as i64,
        Action::Drop => -(n.ref_mod as i64),
        a => panic!("node with action {a:?} (invariant 7)"),
    }
}

/// Invariant 12 for one extent: for every backref key the model, the disk
/// item or the head mentions, `(disk + queued, model)` counts.
pub fn disk_plus_queued(
    model: &BTreeMap<RefKey, u64>,
    disk: &BTreeMap<RefKey, u64>,
    head: Option<&HeadSnapshot>,
) -> Vec<(RefKey, i64, i64)> {
    let mut keys: std::collections::BTreeSet<RefKey> = model.keys().chain(disk.keys()).copied().collect();
    keys.extend(head.iter().flat_map(|h| h.nodes.iter()).map(|n| n.key.key));
    keys.into_iter()
        .map(|k| {
            let queued: i64 = head.iter().flat_map(|h| h.nodes.iter()).filter(|n| n.key.key == k).map(signed).sum();
            let have = disk.get(&k).copied().unwrap_or(0) as i64 + queued;
            (k, have, model.get(&k).copied().unwrap_or(0) as i64)
        })
        .collect()
}

/// `K(L(num_bytes))`: the csum-deletion reservation of one data head.
pub fn csum_rsv(g: &Geometry, num_bytes: u64) -> u64 {
    g.csum_bytes(g.csum_leaves(num_bytes))
}

/// Invariant 21 for a root that is the only user of its reserves:
/// `C(nodes) + Σ K(L(num_bytes))` over data heads with `total_ref_mod < 0`.
pub fn expected_delayed_size(snap: &[HeadSnapshot], g: &Geometry) -> u64 {
    let nodes: u64 = snap.iter().map(|h| h.nodes.len() as u64).sum();
    let csums: u64 = snap.iter().filter(|h| h.is_data && h.total_ref_mod < 0).map(|h| csum_rsv(g, h.num_bytes)).sum();
    g.delayed_ref_bytes(nodes) + csums
}

/// Check every invariant of semantics.md §10 observable at quiescence through the API
/// for a root that is the only user of its fs reserves (1-4, 7, 8, 10, 15,
/// 20-23 and the §4.3 seq rule). Returns the snapshot it checked.
pub fn check_quiescent<D: DelayedRefs>(refs: &D) -> Vec<HeadSnapshot> {
    let snap = refs.snapshot();
    let c = refs.counters();
    let rs = refs.fs().reserves.snapshot();
    let g = *refs.fs().reserves.geometry();
    let name = D::NAME;
    // Invariant 1.
    assert_eq!(c.num_heads, snap.len() as u64, "{name}: invariant 1 num_heads == |index|");
    // Invariant 2.
    let ready = snap.iter().filter(|h| !h.processing).count() as u64;
    assert_eq!(c.num_heads_ready, ready, "{name}: invariant 2 num_heads_ready");
    // Invariant 3.
    let nodes: u64 = snap.iter().map(|h| h.nodes.len() as u64).sum();
    assert_eq!(c.num_entries, snap.len() as u64 + nodes, "{name}: invariant 3 num_entries");
    // Invariant 4: at most one indexed head per bytenr, snapshot by bytenr.
    for w in snap.windows(2) {
        assert!(w[0].bytenr < w[1].bytenr, "{name}: invariant 4 heads not strictly ordered: {snap:#?}");
    }
    for h in &snap {
        // Invariant 7.
        for n in &h.nodes {
            assert!(n.ref_mod >= 1, "{name}: invariant 7 ref_mod >= 1: {h:#?}");
            assert!(matches!(n.action, Action::Add | Action::Drop), "{name}: invariant 7 action: {h:#?}");
            assert_eq!(n.key.key.is_data(), h.is_data, "{name}: invariant 7 node kind matches head: {h:#?}");
            // §4.3: only fs-tree roots carry a seq.
            match n.key.key {
                RefKey::TreeBlock { root } | RefKey::ExtentData { root, .. } if !is_fstree(root) => {
                    assert_eq!(n.key.seq, 0, "{name}: §4.3 non-fs-tree ref with a seq: {h:#?}")
                }
                _ => {}
            }
        }
        // Invariant 8: strictly ordered by comp_refs(check_seq = true).
        for w in h.nodes.windows(2) {
            assert!(w[0].key < w[1].key, "{name}: invariant 8 nodes not strictly ordered: {h:#?}");
        }
        // Invariant 10.
        let sum: i64 = h.nodes.iter().map(signed).sum();
        assert_eq!(h.ref_mod, sum, "{name}: invariant 10 head ref_mod == Σ signed nodes: {h:#?}");
        // Invariant 15.
        if h.extent_op.is_some() {
            assert!(!h.is_data, "{name}: invariant 15 extent op on a data head: {h:#?}");
        }
    }
    // Invariant 20.
    let csums: u64 = snap.iter().filter(|h| h.is_data && h.total_ref_mod < 0).map(|h| h.num_bytes).sum();
    assert_eq!(c.pending_csums, csums, "{name}: invariant 20 pending_csums");
    // Invariant 21.
    assert_eq!(rs.delayed_refs.size, expected_delayed_size(&snap, &g), "{name}: invariant 21 delayed refs rsv size");
    // Invariant 22.
    for (what, r) in [("delayed_refs", rs.delayed_refs), ("global", rs.global)] {
        if (r.size as i64) >= 0 {
            assert!(r.reserved <= r.size, "{name}: invariant 22 {what} reserved > size: {r:?}");
        }
    }
    // Invariant 23 and no over-commit.
    assert!(
        rs.delayed_refs.reserved + rs.global.reserved <= rs.space.may_use,
        "{name}: invariant 23 Σ reserved <= bytes_may_use: {rs:?}"
    );
    assert!(rs.space.used + rs.space.may_use <= refs.fs().reserves.space.total(), "{name}: over-commit: {rs:?}");
    snap
}

/// Invariant 26: nothing left, and no delayed-ref bytes in the reserve.
pub fn check_empty<D: DelayedRefs>(refs: &D) {
    let c = refs.counters();
    assert_eq!(c, Counters::default(), "{}: invariant 26 counters", D::NAME);
    assert!(refs.snapshot().is_empty(), "{}: invariant 26 index empty", D::NAME);
    let rs = refs.fs().reserves.snapshot();
    assert_eq!(rs.delayed_refs.size, 0, "{}: invariant 26 delayed refs rsv size", D::NAME);
    assert_eq!(rs.delayed_refs.reserved, 0, "{}: invariant 22 reserved <= size 0", D::NAME);
}

/// One backref count of the tests' models (disk plus queued): `Drop` takes
/// one away and forgets the key at zero, anything else adds one.
pub fn bump(counts: &mut BTreeMap<RefKey, u64>, key: RefKey, action: Action) {
    let c = counts.entry(key).or_insert(0);
    if action == Action::Drop {
        *c -= 1;
        if *c == 0 {
            counts.remove(&key);
        }
    } else {
        *c += 1;
    }
}

/// What one extent must look like at the end of a multi-threaded test: the
/// oracle side of the comparison with the extent tree.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Want {
    pub is_data: bool,
    pub num_bytes: u64,
    pub level: u8,
    pub counts: BTreeMap<RefKey, u64>,
    pub flags: u64,
}

impl Want {
    /// The refs the model holds (every backref count).
    pub fn total(&self) -> u64 {
        self.counts.values().sum()
    }

    /// Apply one queued ref change to the model ([`bump`]).
    pub fn bump(&mut self, key: RefKey, action: Action) {
        bump(&mut self.counts, key, action);
    }

    /// What the extent tree holds for one item, in the same shape; checks
    /// that its ref count is the sum of its backrefs.
    pub fn of(item: &ExtentItem) -> Want {
        assert_eq!(item.refs, item.backrefs.values().sum::<u64>(), "refs = sum of backrefs");
        Want {
            is_data: item.is_data,
            num_bytes: item.num_bytes,
            level: item.level,
            counts: item.backrefs.clone(),
            flags: item.flags,
        }
    }
}

/// The extents where the tree (`got`) differs from the oracle (`want`),
/// one line pair each; extents only the tree has are not listed.
pub fn oracle_diff(want: &BTreeMap<u64, Want>, got: &BTreeMap<u64, Want>) -> Vec<String> {
    want.iter()
        .filter(|(b, w)| got.get(b) != Some(w))
        .map(|(b, w)| format!("extent {b:#x}:\n   want {w:?}\n    got {:?}", got.get(b)))
        .collect()
}

/// A transaction handle renewed every 64 uses through `start_transaction` /
/// `end_transaction` (semantics.md §8.10), as a long-running adder would.
#[derive(Debug, Default)]
pub struct RenewingHandle {
    h: Option<TransHandle>,
    in_batch: u64,
}

impl RenewingHandle {
    /// The handle for the next call.
    pub fn get<C: delayed_refs::PairCell>(&mut self, r: &delayed_refs::FsReserves<C>) -> &mut TransHandle {
        if self.in_batch >= 64 {
            if let Some(h) = self.h.take() {
                r.end_transaction(h).unwrap();
            }
            self.in_batch = 0;
        }
        self.in_batch += 1;
        self.h.get_or_insert_with(|| r.start_transaction(8, delayed_refs::FlushMode::FlushAll).unwrap())
    }

    /// End the current transaction, if any.
    pub fn finish<C: delayed_refs::PairCell>(&mut self, r: &delayed_refs::FsReserves<C>) {
        if let Some(h) = self.h.take() {
            r.end_transaction(h).unwrap();
        }
    }
}
