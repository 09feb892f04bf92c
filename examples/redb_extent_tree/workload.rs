//! The example's deterministic workload: round `k` queues, for each of
//! `extents` data extents, one new ref and (from round 3) the drop of the
//! ref round `k - 2` added; round 1 allocates the extents. The refs a round
//! queues do not depend on how threads interleave, so the state after `k`
//! rounds can be rebuilt anywhere (`expected`).

use std::collections::BTreeMap;

use delayed_refs::{
    Action, DataRef, DelayedRefs, ExtentItem, FsConfig, LockedRefs, MemExtentTree, Qgroup, RunMode, TransHandle,
};

/// Extent `i`'s start.
pub fn bytenr(i: u64) -> u64 {
    (1 << 30) + i * (1 << 20)
}

/// The ops of round `k` (from 1) on the extents `range`, in queue order.
pub fn round_ops(k: u64, range: std::ops::Range<u64>) -> Vec<DataRef> {
    let mut ops = Vec::new();
    for i in range {
        let data = |action, ino| DataRef {
            action,
            bytenr: bytenr(i),
            num_bytes: 4096,
            owning_root: 5,
            root: 5,
            ino,
            offset: 0,
            qgroup: Qgroup::ACCOUNT,
        };
        ops.push(data(if k == 1 { Action::AddExtent } else { Action::Add }, 1000 + k));
        if k >= 3 {
            ops.push(data(Action::Drop, 1000 + k - 2));
        }
    }
    ops
}

/// Queue round `k`'s ops on `range`.
pub fn queue<D: DelayedRefs>(refs: &D, k: u64, range: std::ops::Range<u64>) -> delayed_refs::Result<()> {
    let mut h = TransHandle::new();
    for op in round_ops(k, range) {
        let reserved = if op.action == Action::AddExtent { 4096 } else { 0 };
        refs.add_data_ref(&mut h, &op.build()?, reserved)?;
    }
    Ok(())
}

/// Queue round `k` from `adders` threads, each on its share of the extents.
pub fn queue_round<D: DelayedRefs>(refs: &D, k: u64, extents: u64, adders: u64) {
    let per = extents.div_ceil(adders.max(1));
    std::thread::scope(|s| {
        for a in 0..adders.max(1) {
            let range = (a * per).min(extents)..((a + 1) * per).min(extents);
            s.spawn(move || queue(refs, k, range).expect("valid refs"));
        }
    });
}

/// The extent tree after `rounds` rounds on `extents` extents, rebuilt on
/// the locked port and the in-memory tree.
pub fn expected(rounds: u64, extents: u64) -> BTreeMap<u64, ExtentItem> {
    let refs = LockedRefs::new(FsConfig::default());
    let tree = MemExtentTree::new();
    for k in 1..=rounds {
        queue(&refs, k, 0..extents).expect("the workload is valid");
        refs.run(&tree, RunMode::All).expect("the in-memory tree accepts the workload");
    }
    tree.items()
}

/// Compare two extent trees by refs, flags and backrefs (the database does
/// not store extent-op keys).
pub fn same_items(got: &BTreeMap<u64, ExtentItem>, want: &BTreeMap<u64, ExtentItem>) -> Result<(), String> {
    if got.len() != want.len() {
        return Err(format!("{} items, expected {}", got.len(), want.len()));
    }
    for (b, w) in want {
        let Some(g) = got.get(b) else { return Err(format!("extent {b:#x} missing")) };
        if (g.refs, g.flags, &g.backrefs) != (w.refs, w.flags, &w.backrefs) {
            return Err(format!(
                "extent {b:#x}: {} refs {:?}, expected {} refs {:?}",
                g.refs, g.backrefs, w.refs, w.backrefs
            ));
        }
    }
    Ok(())
}
