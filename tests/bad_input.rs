//! Bad input gets a typed error and changes nothing already queued (the
//! error contract of `src/error.rs`; semantics.md §4.4 step 1, §4.6 step 1, §11.14,
//! §6.10): every case compares `snapshot()`, `counters()`, the reserves and
//! the qgroup records before and after.
//!
//! Every test is generic over `D: DelayedRefs`; see `common::for_each_impl!`.

#[macro_use]
mod common;

use common::*;
use delayed_refs::{
    Action, DelayedRefs, Error, ExtentError, ExtentOp, FlushMode, FsConfig, GenericRef, HeadOutcome, MemExtentTree,
    RefKey, RunMode, TransHandle,
};

const X: u64 = 1 << 30;
const Y: u64 = 2 << 30;

/// A root with some state queued on X (tree) and Y (data), qgroups on.
fn populated<D: DelayedRefs>() -> (D, TransHandle) {
    let refs = D::new(FsConfig { qgroups: true, ..FsConfig::default() });
    let mut h = TransHandle::new();
    refs.add_tree_ref(&mut h, &tref(Action::AddExtent, X, 5, 0), Some(ExtentOp::set_flags(0x100, 0))).unwrap();
    refs.add_data_ref(&mut h, &dref(Action::Add, Y, 5, 257, 0, 0), 0).unwrap();
    refs.add_data_ref(&mut h, &dref(Action::Drop, Y, 5, 258, 0, 0), 0).unwrap();
    refs.add_data_ref(&mut h, &dref(Action::Drop, Y, 5, 259, 0, 0), 0).unwrap();
    (refs, h)
}

fn unchanged<D: DelayedRefs>(refs: &D, before: &Observed, h: &TransHandle, what: &str) {
    assert_eq!(&observe(refs), before, "{}: {what} changed queued state", D::NAME);
    assert_eq!((h.delayed_ref_updates, h.delayed_ref_csum_deletions), (0, 0), "{what}: handle counters");
    check_quiescent(refs);
}

/// `num_bytes == 0` on every entry point, on a new and an existing bytenr.
fn zero_length<D: DelayedRefs>() {
    let (refs, mut h) = populated::<D>();
    let before = observe(&refs);
    for b in [X, Y, 7 << 30] {
        let mut t = tref(Action::Add, b, 6, 0);
        t.num_bytes = 0;
        assert_eq!(refs.add_tree_ref(&mut h, &t, None), Err(Error::ZeroLength { bytenr: b }));
        let mut d = dref(Action::AddExtent, b, 5, 300, 0, 0);
        d.num_bytes = 0;
        assert_eq!(refs.add_data_ref(&mut h, &d, 4096), Err(Error::ZeroLength { bytenr: b }));
        assert_eq!(refs.add_extent_op(&mut h, b, 0, ExtentOp::set_flags(1, 0)), Err(Error::ZeroLength { bytenr: b }));
        unchanged(&refs, &before, &h, "zero length");
    }
}

/// Data/metadata mismatch with an existing head (§4.6 step 1: the kernel
/// BUGs), checked before anything changes, including the qgroup record a
/// data ref with a reservation would otherwise absorb (§9).
fn data_metadata_mismatch<D: DelayedRefs>() {
    let (refs, mut h) = populated::<D>();
    let before = observe(&refs);
    assert_eq!(before.qgroups.len(), 2);
    let r = refs.add_data_ref(&mut h, &dref(Action::AddExtent, X, 256, 300, 0, 0), 8192);
    assert_eq!(r, Err(Error::DataMismatch { bytenr: X, head_is_data: false }));
    unchanged(&refs, &before, &h, "data ref on a tree head");
    let mut t = tref(Action::Add, Y, 5, 0);
    t.num_bytes = DATA_NB;
    assert_eq!(refs.add_tree_ref(&mut h, &t, None), Err(Error::DataMismatch { bytenr: Y, head_is_data: true }));
    unchanged(&refs, &before, &h, "tree ref on a data head");
    assert_eq!(
        refs.add_extent_op(&mut h, Y, DATA_NB, ExtentOp::set_flags(0x100, 0)),
        Err(Error::DataMismatch { bytenr: Y, head_is_data: true }),
        "only metadata heads carry extent ops (§2.3, invariant 15)"
    );
    unchanged(&refs, &before, &h, "extent op on a data head");
}

/// Reserved bytes with a metadata payload (§4.4 step 1), the wrong payload
/// for the entry point, and `UpdateHead` passed as a ref (it only exists as
/// an extent op, §1.3, §4.8).
fn bad_actions_and_payloads<D: DelayedRefs>() {
    let (refs, mut h) = populated::<D>();
    let before = observe(&refs);
    let t = tref(Action::AddExtent, 7 << 30, 5, 0);
    assert_eq!(refs.add_data_ref(&mut h, &t, 4096), Err(Error::ReservedOnMetadata { bytenr: 7 << 30, reserved: 4096 }));
    assert_eq!(
        refs.add_data_ref(&mut h, &tref(Action::Add, X, 6, 0), 4096),
        Err(Error::ReservedOnMetadata { bytenr: X, reserved: 4096 })
    );
    unchanged(&refs, &before, &h, "reserved on metadata");
    assert!(matches!(
        refs.add_data_ref(&mut h, &tref(Action::Add, X, 6, 0), 0),
        Err(Error::BadAction { call: "add_data_ref", action: Action::Add, .. })
    ));
    assert!(matches!(
        refs.add_tree_ref(&mut h, &dref(Action::Add, Y, 5, 300, 0, 0), None),
        Err(Error::BadAction { call: "add_tree_ref", action: Action::Add, .. })
    ));
    unchanged(&refs, &before, &h, "wrong payload");
    for b in [X, 7 << 30] {
        assert!(matches!(
            refs.add_tree_ref(&mut h, &tref(Action::UpdateHead, b, 5, 0), Some(ExtentOp::set_flags(1, 0))),
            Err(Error::BadAction { call: "add_tree_ref", action: Action::UpdateHead, .. })
        ));
    }
    for b in [Y, 7 << 30] {
        assert!(matches!(
            refs.add_data_ref(&mut h, &dref(Action::UpdateHead, b, 5, 257, 0, 0), 0),
            Err(Error::BadAction { call: "add_data_ref", action: Action::UpdateHead, .. })
        ));
    }
    unchanged(&refs, &before, &h, "UpdateHead as a ref");
    // `GenericRef::new` without `.tree()`/`.data()`: a keyed tree ref of
    // root 0, refused by both entry points (semantics.md §4.10).
    let unfinished = GenericRef::new(Action::Add, X, TREE_NB, 0, 5);
    assert_eq!(refs.add_tree_ref(&mut h, &unfinished, None), Err(Error::MissingRoot { bytenr: X }));
    assert!(matches!(
        refs.add_data_ref(&mut h, &unfinished, 0),
        Err(Error::BadAction { call: "add_data_ref", action: Action::Add, .. })
    ));
    unchanged(&refs, &before, &h, "unfinished generic ref");
}

/// A tree ref whose merged count is not 1 at run time (§11.14, invariant 14:
/// -EUCLEAN): `run` and `run_one` fail with `TreeRefMod` and the node stays
/// queued with its count, the head unselected.
fn tree_ref_mod_at_run<D: DelayedRefs>() {
    let refs = D::new(FsConfig::default());
    let tree = Recording::new(MemExtentTree::new());
    load_item(&tree.inner, X, TREE_NB, false, &[(RefKey::TreeBlock { root: 5 }, 1)]);
    let mut h = TransHandle::new();
    refs.add_tree_ref(&mut h, &tref(Action::Add, X, 6, 0), None).unwrap();
    assert!(refs.add_tree_ref(&mut h, &tref(Action::Add, X, 6, 0), None).unwrap().merged);
    let before = observe(&refs);
    assert_eq!(before.snapshot[0].nodes[0].ref_mod, 2);
    let want = Error::TreeRefMod { bytenr: X, key: RefKey::TreeBlock { root: 6 }, ref_mod: 2 };
    assert_eq!(refs.run(&tree, RunMode::All).unwrap_err(), want);
    unchanged(&refs, &before, &h, "TreeRefMod via run");
    assert_eq!(refs.run_one(&tree).unwrap_err(), want);
    unchanged(&refs, &before, &h, "TreeRefMod via run_one");
    assert!(tree.events().is_empty(), "nothing applied");
    assert_eq!(tree.inner.item(X).unwrap().refs, 1);
    let st = refs.destroy(&tree.inner);
    assert_eq!(st.nodes, 1);
    check_empty(&refs);
}

/// Reservation underflow is a typed error that changes nothing (§8).
fn reservation_underflow<D: DelayedRefs>() {
    let refs = D::new(FsConfig::default());
    let r = &refs.fs().reserves;
    let g = *r.geometry();
    let mut unbacked = TransHandle::new();
    assert!(matches!(unbacked.use_local(1), Err(Error::RsvUnderflow { have: 0, want: 1, .. })));
    let before = r.snapshot();
    let mut h = r.start_transaction(1, FlushMode::FlushAll).unwrap();
    let c1 = g.delayed_ref_bytes(1);
    assert_eq!(h.local_rsv().reserved, c1);
    assert!(matches!(h.use_local(c1 + 1), Err(Error::RsvUnderflow { have, want, .. }) if have == c1 && want == c1 + 1));
    assert_eq!(h.local_rsv().reserved, c1, "a failed use changes nothing");
    h.use_local(c1 - 10).unwrap();
    assert_eq!(h.local_rsv().reserved, 10);
    assert!(h.use_local(11).is_err());
    let s = r.snapshot();
    let too_much = s.space.may_use + 1;
    assert!(matches!(r.space.free(too_much), Err(Error::RsvUnderflow { want, .. }) if want == too_much));
    assert_eq!(r.snapshot(), s, "a failed free changes nothing");
    r.end_transaction(h).unwrap();
    assert_eq!(r.snapshot().space.used, before.space.used);
}

/// A backend error (a drop of an extent with no item, an insert of an item
/// that exists, an extent op on a missing item) is `Error::Backend` and puts
/// everything back: the ref, must_insert_reserved and the extent op stay
/// queued (§6.10; error contract). Fixing the tree lets the run finish.
fn backend_error_keeps_refs<D: DelayedRefs>() {
    let refs = D::new(FsConfig::default());
    let tree = MemExtentTree::new();
    let mut h = TransHandle::new();
    refs.add_data_ref(&mut h, &dref(Action::Drop, X, 5, 257, 0, 0), 0).unwrap();
    let before = observe(&refs);
    let err = refs.run(&tree, RunMode::All).unwrap_err();
    assert_eq!(err, Error::Backend { bytenr: X, source: ExtentError::MissingExtent { bytenr: X } });
    unchanged(&refs, &before, &h, "backend error");
    assert!(refs.run_one(&tree).is_err());
    unchanged(&refs, &before, &h, "backend error via run_one");
    load_item(&tree, X, DATA_NB, true, &[(RefKey::ExtentData { root: 5, objectid: 257, offset: 0 }, 1)]);
    refs.run(&tree, RunMode::All).unwrap();
    assert!(tree.item(X).is_none());
    check_empty(&refs);

    // must_insert_reserved and the op are restored after a failed insert.
    let op = ExtentOp::set_flags(0x100, 0);
    refs.add_tree_ref(&mut h, &tref(Action::AddExtent, Y, 5, 0), Some(op)).unwrap();
    load_item(&tree, Y, TREE_NB, false, &[(RefKey::TreeBlock { root: 9 }, 1)]);
    let before = observe(&refs);
    assert!(before.snapshot[0].must_insert_reserved);
    assert_eq!(
        refs.run(&tree, RunMode::All),
        Err(Error::Backend { bytenr: Y, source: ExtentError::AlreadyExists { bytenr: Y } })
    );
    unchanged(&refs, &before, &h, "failed insert");
    assert_eq!(tree.item(Y).unwrap().refs, 1);
    assert_eq!(refs.destroy(&tree).pinned_bytes, TREE_NB);
    check_empty(&refs);

    // Mid-head failure: the add ran, the failing drop stays.
    let tree = MemExtentTree::new();
    load_item(&tree, X, DATA_NB, true, &[(RefKey::ExtentData { root: 5, objectid: 1, offset: 0 }, 1)]);
    refs.add_data_ref(&mut h, &dref(Action::Add, X, 5, 2, 0, 0), 0).unwrap();
    refs.add_data_ref(&mut h, &dref(Action::Drop, X, 5, 3, 0, 0), 0).unwrap();
    assert!(matches!(
        refs.run(&tree, RunMode::All),
        Err(Error::Backend { bytenr: X, source: ExtentError::BackrefUnderflow { have: 0, drop: 1, .. } })
    ));
    let snap = check_quiescent(&refs);
    assert_eq!(snap.len(), 1);
    assert_eq!(snap[0].nodes.len(), 1);
    assert_eq!(
        (snap[0].nodes[0].action, snap[0].nodes[0].key.key),
        (Action::Drop, RefKey::ExtentData { root: 5, objectid: 3, offset: 0 })
    );
    assert_eq!((snap[0].ref_mod, snap[0].total_ref_mod), (-1, 0));
    assert!(!snap[0].processing);
    assert_eq!(tree.item(X).unwrap().refs, 2, "the add was applied once");
    refs.destroy(&tree);
    check_empty(&refs);

    // An extent op on a missing item stays on its head.
    let op = ExtentOp::set_flags(0x100, 0);
    refs.add_extent_op(&mut h, Y + (1 << 30), TREE_NB, op).unwrap();
    let before = observe(&refs);
    assert!(matches!(refs.run_one(&tree), Err(Error::Backend { source: ExtentError::MissingExtent { .. }, .. })));
    unchanged(&refs, &before, &h, "failed extent op");
    load_item(&tree, Y + (1 << 30), TREE_NB, false, &[(RefKey::TreeBlock { root: 5 }, 1)]);
    let (_, outcome, st) = refs.run_one(&tree).unwrap().unwrap();
    assert_eq!((outcome, st.extent_ops), (HeadOutcome::Deleted, 1));
    assert_eq!(tree.item(Y + (1 << 30)).unwrap().flags & 0x100, 0x100);
    check_empty(&refs);
}

/// Errors are values: a `GenericRef` built for one call is not consumed or
/// altered, and the same call succeeds once the input is fixed.
fn retry_after_error<D: DelayedRefs>() {
    let refs = D::new(FsConfig::default());
    let mut h = TransHandle::new();
    let mut g: GenericRef = dref(Action::AddExtent, X, 5, 257, 0, 0);
    g.num_bytes = 0;
    assert!(refs.add_data_ref(&mut h, &g, DATA_NB).is_err());
    g.num_bytes = DATA_NB;
    assert!(!refs.add_data_ref(&mut h, &g, DATA_NB).unwrap().merged);
    assert_eq!(check_quiescent(&refs).len(), 1);
    refs.run(&MemExtentTree::new(), RunMode::All).unwrap();
    check_empty(&refs);
}

for_each_impl!(
    zero_length,
    data_metadata_mismatch,
    bad_actions_and_payloads,
    tree_ref_mod_at_run,
    reservation_underflow,
    backend_error_keeps_refs,
    retry_after_error,
);
