//! Property tests of the node order (semantics.md §3.1): `comp_refs` and `Ord for
//! NodeKey` must be a total order (antisymmetric, transitive), agree with
//! `==`, ignore the seq when `check_seq == false`, and order the types
//! 176 < 178 < 182 < 184 with unsigned fields. A sign slip in the kernel's
//! comparator (semantics.md §11.2, Linux 6.10-6.12) broke antisymmetry and aborted
//! transactions; these properties would have caught it.
//!
//! The comparator lives in the shared domain model, so these tests are not
//! per implementation.

use std::cmp::Ordering;

use delayed_refs::{NodeKey, RefKey, RefType, comp_refs};
use proptest::prelude::*;

/// Field values: tiny ones (so identities collide) and ones across the sign
/// boundary of i64 (so a signed comparison would be caught).
fn field() -> impl Strategy<Value = u64> {
    prop_oneof![
        4 => 0u64..3,
        1 => prop::sample::select(vec![i64::MAX as u64, 1u64 << 63, u64::MAX]),
    ]
}

fn ref_key() -> impl Strategy<Value = RefKey> {
    prop_oneof![
        field().prop_map(|root| RefKey::TreeBlock { root }),
        (field(), field(), field()).prop_map(|(root, objectid, offset)| RefKey::ExtentData { root, objectid, offset }),
        field().prop_map(|parent| RefKey::SharedBlock { parent }),
        field().prop_map(|parent| RefKey::SharedData { parent }),
    ]
}

fn node_key() -> impl Strategy<Value = NodeKey> {
    (ref_key(), field()).prop_map(|(key, seq)| NodeKey { key, seq })
}

/// An independent model of §3.1: (type code, type fields in order, seq),
/// compared lexicographically as unsigned integers.
fn model(k: &NodeKey, check_seq: bool) -> (u8, u64, u64, u64, u64) {
    let seq = if check_seq { k.seq } else { 0 };
    match k.key {
        RefKey::TreeBlock { root } => (176, root, 0, 0, seq),
        RefKey::ExtentData { root, objectid, offset } => (178, root, objectid, offset, seq),
        RefKey::SharedBlock { parent } => (182, parent, 0, 0, seq),
        RefKey::SharedData { parent } => (184, parent, 0, 0, seq),
    }
}

fn type_code(k: &RefKey) -> u8 {
    match k {
        RefKey::TreeBlock { .. } => 176,
        RefKey::ExtentData { .. } => 178,
        RefKey::SharedBlock { .. } => 182,
        RefKey::SharedData { .. } => 184,
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2048, ..ProptestConfig::default() })]

    /// Antisymmetry: cmp(a, b) == reverse(cmp(b, a)), both modes and `Ord`.
    #[test]
    fn antisymmetric(a in node_key(), b in node_key()) {
        for check_seq in [true, false] {
            prop_assert_eq!(comp_refs(&a, &b, check_seq), comp_refs(&b, &a, check_seq).reverse());
        }
        prop_assert_eq!(a.cmp(&b), b.cmp(&a).reverse());
        prop_assert_eq!(a.key.cmp(&b.key), b.key.cmp(&a.key).reverse());
    }

    /// Transitivity of <=, < and == in both modes.
    #[test]
    fn transitive(a in node_key(), b in node_key(), c in node_key()) {
        for check_seq in [true, false] {
            let ab = comp_refs(&a, &b, check_seq);
            let bc = comp_refs(&b, &c, check_seq);
            let ac = comp_refs(&a, &c, check_seq);
            if ab != Ordering::Greater && bc != Ordering::Greater {
                prop_assert_ne!(ac, Ordering::Greater, "a <= b <= c but a > c ({})", check_seq);
            }
            if ab == Ordering::Less && bc != Ordering::Greater {
                prop_assert_eq!(ac, Ordering::Less);
            }
            if ab == Ordering::Equal && bc == Ordering::Equal {
                prop_assert_eq!(ac, Ordering::Equal);
            }
            if ab == Ordering::Equal {
                prop_assert_eq!(ac, bc, "equal elements compare alike to a third");
            }
        }
    }

    /// Equal iff equal: insertion order identifies exactly (key, seq);
    /// `check_seq = false` identifies exactly the backref.
    #[test]
    fn equal_iff_eq(a in node_key(), b in node_key()) {
        prop_assert_eq!(comp_refs(&a, &b, true) == Ordering::Equal, a == b);
        prop_assert_eq!(a.cmp(&b) == Ordering::Equal, a == b);
        prop_assert_eq!(comp_refs(&a, &b, false) == Ordering::Equal, a.key == b.key);
        prop_assert_eq!(a.key.cmp(&b.key) == Ordering::Equal, a.key == b.key);
        prop_assert_eq!(comp_refs(&a, &a, true), Ordering::Equal);
    }

    /// `Ord for NodeKey` is `comp_refs(.., check_seq = true)`; `Ord for RefKey`
    /// is `comp_refs(.., false)`; both match the independent model of §3.1.
    #[test]
    fn matches_model(a in node_key(), b in node_key()) {
        prop_assert_eq!(a.cmp(&b), comp_refs(&a, &b, true));
        prop_assert_eq!(a.partial_cmp(&b), Some(comp_refs(&a, &b, true)));
        prop_assert_eq!(a.key.cmp(&b.key), comp_refs(&a, &b, false));
        for check_seq in [true, false] {
            prop_assert_eq!(comp_refs(&a, &b, check_seq), model(&a, check_seq).cmp(&model(&b, check_seq)));
        }
    }

    /// `check_seq = false` ignores the seq entirely; `true` refines it.
    #[test]
    fn seq_only_breaks_ties(a in node_key(), b in node_key(), s1 in field(), s2 in field()) {
        let a2 = NodeKey { seq: s1, ..a };
        let b2 = NodeKey { seq: s2, ..b };
        prop_assert_eq!(comp_refs(&a, &b, false), comp_refs(&a2, &b2, false));
        let loose = comp_refs(&a, &b, false);
        if loose != Ordering::Equal {
            prop_assert_eq!(comp_refs(&a, &b, true), loose);
        } else {
            prop_assert_eq!(comp_refs(&a, &b, true), a.seq.cmp(&b.seq));
        }
    }

    /// Type order 176 < 178 < 182 < 184 dominates every field (§3.1 step 1).
    #[test]
    fn type_dominates_fields(a in node_key(), b in node_key()) {
        let (ta, tb) = (type_code(&a.key), type_code(&b.key));
        prop_assert_eq!(a.key.ref_type() as u8, ta);
        if ta != tb {
            for check_seq in [true, false] {
                prop_assert_eq!(comp_refs(&a, &b, check_seq), ta.cmp(&tb));
            }
        }
    }

    /// Sorting with `Ord` yields a sequence sorted under `comp_refs` with no
    /// adjacent pair out of order, and dedup by `==` matches dedup by Equal.
    #[test]
    fn sort_is_consistent(mut v in prop::collection::vec(node_key(), 0..24)) {
        v.sort();
        for w in v.windows(2) {
            prop_assert_ne!(comp_refs(&w[0], &w[1], true), Ordering::Greater);
            prop_assert_ne!(comp_refs(&w[0], &w[1], false), Ordering::Greater);
        }
        let mut by_eq = v.clone();
        by_eq.dedup();
        let mut by_cmp = v.clone();
        by_cmp.dedup_by(|x, y| comp_refs(x, y, true) == Ordering::Equal);
        prop_assert_eq!(by_eq, by_cmp);
    }
}

/// The fixed type codes and their order (§1.3, §3.1).
#[test]
fn type_codes_and_order() {
    assert_eq!(RefType::TreeBlock as u8, 176);
    assert_eq!(RefType::ExtentData as u8, 178);
    assert_eq!(RefType::SharedBlock as u8, 182);
    assert_eq!(RefType::SharedData as u8, 184);
    let big = u64::MAX;
    let keys = [
        RefKey::TreeBlock { root: big },
        RefKey::ExtentData { root: 0, objectid: 0, offset: 0 },
        RefKey::ExtentData { root: big, objectid: big, offset: big },
        RefKey::SharedBlock { parent: 0 },
        RefKey::SharedBlock { parent: big },
        RefKey::SharedData { parent: 0 },
    ];
    for w in keys.windows(2) {
        let a = NodeKey { key: w[0], seq: big };
        let b = NodeKey { key: w[1], seq: 0 };
        assert_eq!(comp_refs(&a, &b, true), Ordering::Less, "{a:?} < {b:?}");
        assert_eq!(comp_refs(&a, &b, false), Ordering::Less, "{a:?} < {b:?}");
    }
}

/// Fields compare unsigned and in the documented order (§3.1 step 2):
/// EXTENT_DATA by root, then objectid, then offset.
#[test]
fn fields_unsigned_and_ordered() {
    let k = |root, objectid, offset| NodeKey { key: RefKey::ExtentData { root, objectid, offset }, seq: 0 };
    let hi = 1u64 << 63;
    assert!(k(1, 0, 0) < k(hi, 0, 0), "unsigned: 2^63 is large");
    assert!(k(1, hi, 0) > k(1, 5, u64::MAX), "objectid before offset");
    assert!(k(0, u64::MAX, u64::MAX) < k(1, 0, 0), "root first");
    let t = |root| NodeKey { key: RefKey::TreeBlock { root }, seq: 0 };
    assert!(t(5) < t(hi));
    let s = |seq| NodeKey { key: RefKey::SharedBlock { parent: 4096 }, seq };
    assert!(s(1) < s(hi));
    assert_eq!(comp_refs(&s(1), &s(hi), false), Ordering::Equal);
}
