//! The two oracles: the kernel's extent-tree dump after a segment, and the
//! kernel's own runs during it.

#![forbid(unsafe_code)]

use std::collections::{BTreeMap, BTreeSet};

use delayed_refs::{ExtentItem, RefKey};

use super::engine::ImplRun;
use super::plan::{KernelRun, Segment};

/// At most this many mismatch descriptions are kept per segment.
const MAX_EXAMPLES: usize = 10;

/// The replayed tree against the after-dump.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TreeCmp {
    /// Extents (bytenrs) that agree: absent from both, or present in both
    /// with equal refs, kind, flags, length and (tree blocks) level.
    pub extents_matched: u64,
    /// Bytenrs in the before-dump, the after-dump, the replayed tree or any
    /// ref event of the segment.
    pub extents_total: u64,
    /// `(bytenr, backref)` pairs with equal counts (absent = 0).
    pub backrefs_matched: u64,
    /// Pairs in either dump, the replayed tree or any ref event.
    pub backrefs_total: u64,
    /// Extents present in both whose refs agree but flags do not.
    pub flag_mismatches: u64,
    /// The first few mismatches, described.
    pub examples: Vec<String>,
}

fn describe(it: Option<&ExtentItem>) -> String {
    match it {
        None => "absent".into(),
        Some(i) => format!(
            "{} {} bytes refs {} flags {:#x} level {} backrefs {:?}",
            if i.is_data { "data" } else { "tree" },
            i.num_bytes,
            i.refs,
            i.flags,
            i.level,
            i.backrefs
        ),
    }
}

fn same_item(a: &ExtentItem, b: &ExtentItem) -> bool {
    a.refs == b.refs
        && a.is_data == b.is_data
        && a.flags == b.flags
        && a.num_bytes == b.num_bytes
        && (a.is_data || a.level == b.level)
}

/// Compare the replayed tree `items` with the segment's after-dump.
pub fn compare_tree(seg: &Segment, items: &BTreeMap<u64, ExtentItem>) -> TreeCmp {
    let mut out = TreeCmp::default();
    let bytenrs: BTreeSet<u64> = seg
        .before
        .keys()
        .chain(seg.after.keys())
        .chain(items.keys())
        .chain(seg.touched_extents.iter())
        .copied()
        .collect();
    for b in &bytenrs {
        let (got, want) = (items.get(b), seg.after.get(b));
        let ok = match (got, want) {
            (None, None) => true,
            (Some(g), Some(w)) => {
                if g.refs == w.refs && g.flags != w.flags {
                    out.flag_mismatches += 1;
                }
                same_item(g, w)
            }
            _ => false,
        };
        out.extents_total += 1;
        if ok {
            out.extents_matched += 1;
        } else if out.examples.len() < MAX_EXAMPLES {
            out.examples.push(format!("extent {b}: replay {} | dump {}", describe(got), describe(want)));
        }
    }
    let keys_of = |d: &BTreeMap<u64, ExtentItem>| -> Vec<(u64, RefKey)> {
        d.iter().flat_map(|(b, it)| it.backrefs.keys().map(move |k| (*b, *k))).collect()
    };
    let mut keys: BTreeSet<(u64, RefKey)> = seg.touched_keys.clone();
    keys.extend(keys_of(&seg.before));
    keys.extend(keys_of(&seg.after));
    keys.extend(keys_of(items));
    let count = |d: &BTreeMap<u64, ExtentItem>, b: &u64, k: &RefKey| {
        d.get(b).and_then(|it| it.backrefs.get(k)).copied().unwrap_or(0)
    };
    for (b, k) in &keys {
        let (got, want) = (count(items, b, k), count(&seg.after, b, k));
        out.backrefs_total += 1;
        if got == want {
            out.backrefs_matched += 1;
        } else if out.examples.len() < MAX_EXAMPLES {
            out.examples.push(format!("backref {b} {k:?}: replay {got} | dump {want}"));
        }
    }
    out
}

/// The implementation's runs against the kernel's, per transaction.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RunCmp {
    /// Kernel runs.
    pub kernel_runs: u64,
    /// Kernel runs whose `(transaction, bytenr, backref)` group the
    /// implementation ran with the same net count.
    pub agree: u64,
    /// Kernel runs in groups that disagree with the implementation in one
    /// transaction and by the opposite amount in the next: a run the kernel
    /// made before the add event reached the trace buffer, across a
    /// transaction boundary (the README's add/run tracing race).
    pub tolerated: u64,
    /// Kernel runs in groups that disagree.
    pub disagree: u64,
    /// Groups only the implementation ran (with a non-zero net), not tolerated.
    pub impl_only: u64,
    /// Groups where each side ran exactly one merged ref and they were equal
    /// (count, direction and insert): the strictest form of agreement.
    pub single_exact: u64,
    /// Groups where each side ran one equal merged ref but only one side's
    /// run carried must_insert_reserved: another add of the same head ran
    /// first (the kernel runs a head's adds oldest first, semantics.md §3.4).
    pub insert_carrier_differs: u64,
    /// Groups where the kernel ran several refs (it ran before every add of
    /// the transaction was queued; only the net can be compared).
    pub multi_kernel_groups: u64,
    /// The first few disagreements, described.
    pub examples: Vec<String>,
}

#[derive(Clone, Copy, Debug, Default)]
struct Side {
    net: i64,
    count: u64,
    insert: bool,
}

impl Side {
    fn add(&mut self, signed: i64, insert: bool) {
        self.net += signed;
        self.count += 1;
        self.insert |= insert;
    }
}

/// A disagreeing group: its transaction, kernel net minus implementation
/// net, and both sides.
#[derive(Clone, Copy, Debug)]
struct Bad {
    batch: u32,
    diff: i64,
    k: Side,
    i: Side,
}

/// Compare per `(transaction, bytenr, backref)` group.
pub fn compare_runs(kernel: &[KernelRun], imp: &[ImplRun]) -> RunCmp {
    let mut groups: BTreeMap<(u64, RefKey, u32), (Side, Side)> = BTreeMap::new();
    for k in kernel {
        groups.entry((k.bytenr, k.key, k.batch)).or_default().0.add(k.signed, k.insert);
    }
    for r in imp {
        groups.entry((r.bytenr, r.key, r.batch)).or_default().1.add(r.signed, r.insert);
    }
    let mut out = RunCmp { kernel_runs: kernel.len() as u64, ..RunCmp::default() };
    let mut bad: BTreeMap<(u64, RefKey), Vec<Bad>> = BTreeMap::new();
    for (&(bytenr, key, batch), &(k, i)) in &groups {
        if k.count > 1 {
            out.multi_kernel_groups += 1;
        }
        if k.net == i.net {
            if k.count == 0 {
                continue;
            }
            out.agree += k.count;
            if k.count == 1 && i.count == 1 {
                if k.insert == i.insert {
                    out.single_exact += 1;
                } else {
                    out.insert_carrier_differs += 1;
                }
            }
        } else {
            bad.entry((bytenr, key)).or_default().push(Bad { batch, diff: k.net - i.net, k, i });
        }
    }
    for ((bytenr, key), list) in bad {
        // Groups are in transaction order: pair a group with a later one of
        // the next transaction that differs by the opposite amount.
        let mut used = vec![false; list.len()];
        for a in 0..list.len() {
            if used[a] {
                continue;
            }
            if let Some(b) = (a + 1..list.len())
                .find(|&b| !used[b] && list[b].batch == list[a].batch + 1 && list[b].diff == -list[a].diff)
            {
                used[a] = true;
                used[b] = true;
                out.tolerated += list[a].k.count + list[b].k.count;
            }
        }
        for (n, g) in list.iter().enumerate() {
            if used[n] {
                continue;
            }
            if g.k.count == 0 {
                out.impl_only += 1;
            } else {
                out.disagree += g.k.count;
            }
            if out.examples.len() < MAX_EXAMPLES {
                out.examples.push(format!(
                    "transaction {} extent {bytenr} {key:?}: kernel net {} in {} runs (insert {}), \
                     implementation net {} in {} runs (insert {})",
                    g.batch, g.k.net, g.k.count, g.k.insert, g.i.net, g.i.count, g.i.insert
                ));
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn k(batch: u32, signed: i64, insert: bool) -> KernelRun {
        KernelRun { batch, bytenr: 4096, key: RefKey::TreeBlock { root: 5 }, signed, insert }
    }

    fn i(batch: u32, signed: i64, insert: bool) -> ImplRun {
        ImplRun { batch, bytenr: 4096, key: RefKey::TreeBlock { root: 5 }, signed, insert }
    }

    #[test]
    fn nets_per_transaction() {
        // The kernel inserted then freed in one transaction; the implementation cancelled.
        let c = compare_runs(&[k(0, 1, true), k(0, -1, false)], &[]);
        assert_eq!((c.agree, c.disagree, c.multi_kernel_groups), (2, 0, 1));
        let c = compare_runs(&[k(0, 1, true)], &[i(0, 1, true)]);
        assert_eq!((c.agree, c.single_exact), (1, 1));
        let c = compare_runs(&[k(0, 1, true)], &[i(0, 1, false)]);
        assert_eq!((c.agree, c.disagree, c.insert_carrier_differs), (1, 0, 1), "insert carried elsewhere");
        let c = compare_runs(&[k(0, 1, false)], &[i(0, -1, false)]);
        assert_eq!((c.agree, c.disagree), (0, 1));
        let c = compare_runs(&[], &[i(0, 1, false)]);
        assert_eq!(c.impl_only, 1);
    }

    #[test]
    fn a_race_across_a_boundary_is_tolerated() {
        let c = compare_runs(&[k(0, 1, false)], &[i(1, 1, false)]);
        assert_eq!((c.agree, c.tolerated, c.disagree, c.impl_only), (0, 1, 0, 0));
        let c = compare_runs(&[k(0, 1, false)], &[i(2, 1, false)]);
        assert_eq!((c.tolerated, c.disagree, c.impl_only), (0, 1, 1));
    }
}
