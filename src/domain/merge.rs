//! The merge pass's arithmetic (semantics.md §5.1), shared by both implementations.

#![forbid(unsafe_code)]

/// Fold a run of nodes with one backref identity, sorted by seq and all older
/// than the lowest blocker, the way the kernel's `merge_ref` does pairwise:
/// the first node absorbs same-action successors; against an opposite
/// action the node with the larger count survives; a node reaching zero is
/// dropped. `signed[i]` is node i's signed count (ADD > 0, DROP < 0).
///
/// Returns the surviving node's index in `signed` and its signed count, or
/// `None` if everything cancelled. The signed sum is preserved.
///
/// ```
/// use delayed_refs::domain::merge::merge_run;
/// assert_eq!(merge_run(&[2, -1]), Some((0, 1)));
/// assert_eq!(merge_run(&[1, -3]), Some((1, -2)));
/// assert_eq!(merge_run(&[1, -1, 4]), Some((2, 4)));
/// assert_eq!(merge_run(&[1, -1]), None);
/// ```
pub fn merge_run(signed: &[i64]) -> Option<(usize, i64)> {
    let mut live: std::collections::VecDeque<(usize, i64)> =
        signed.iter().copied().enumerate().filter(|(_, s)| *s != 0).collect();
    while live.len() >= 2 {
        let (r, nx) = (live[0], live[1]);
        if (r.1 > 0) == (nx.1 > 0) {
            live[0].1 += nx.1;
            live.remove(1);
        } else if r.1.unsigned_abs() < nx.1.unsigned_abs() {
            live[1].1 += r.1;
            live.remove(0);
        } else {
            live[0].1 += nx.1;
            live.remove(1);
            if live[0].1 == 0 {
                live.remove(0);
            }
        }
    }
    live.front().copied()
}

#[cfg(test)]
mod tests {
    use super::merge_run;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn preserves_signed_sum(v in proptest::collection::vec(prop_oneof![1i64..4, -3i64..0], 0..8)) {
            let sum: i64 = v.iter().sum();
            match merge_run(&v) {
                None => prop_assert_eq!(sum, 0),
                Some((i, s)) => {
                    prop_assert_eq!(s, sum);
                    prop_assert!(s != 0);
                    prop_assert!(i < v.len());
                }
            }
        }
    }
}
