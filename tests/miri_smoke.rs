//! A small concurrent run of both implementations, sized for Miri, TSan and
//! valgrind (tiers T6, T7 (README.md, \"Verification\")): two adders and one runner on shared and
//! private heads, then a full drain; the extent tree must equal the sum of
//! all adds and every counter and the reserve must return to zero.

use delayed_refs::*;

fn smoke<D: DelayedRefs>(per_thread: u64) {
    let refs = D::new(FsConfig::default());
    let tree = MemExtentTree::new();
    let hot = 1u64 << 30;
    let mut h = TransHandle::new();
    let first = GenericRef::new(Action::AddExtent, hot, 4096, 0, 5).data(5, 1, 0, 0, false);
    refs.add_data_ref(&mut h, &first, 4096).unwrap();
    std::thread::scope(|s| {
        for t in 0..2u64 {
            let refs = &refs;
            s.spawn(move || {
                let mut h = TransHandle::new();
                for i in 0..per_thread {
                    let b = ((t + 1) << 40) + (i << 12);
                    let r = GenericRef::new(Action::AddExtent, b, 4096, 0, 5).data(5, 2, i, 0, false);
                    refs.add_data_ref(&mut h, &r, 4096).unwrap();
                    let r = GenericRef::new(Action::Add, hot, 4096, 0, 5).data(5, 10 + t, i, 0, false);
                    refs.add_data_ref(&mut h, &r, 0).unwrap();
                }
            });
        }
        let (refs, tree) = (&refs, &tree);
        s.spawn(move || {
            for _ in 0..per_thread {
                refs.run(tree, RunMode::Ready).unwrap();
            }
        });
    });
    refs.run(&tree, RunMode::All).unwrap();
    assert_eq!(tree.item(hot).unwrap().refs, 1 + 2 * per_thread);
    assert_eq!(tree.len() as u64, 1 + 2 * per_thread);
    assert_eq!(refs.counters(), Counters::default());
    assert_eq!(refs.fs().reserves.snapshot().delayed_refs.size, 0);
}

/// Adds per adder thread: tiny under Miri, `SMOKE_PER_THREAD` when set
/// (the TSan and valgrind tiers raise it for more interleavings).
fn per_thread() -> u64 {
    if cfg!(miri) {
        return 3;
    }
    std::env::var("SMOKE_PER_THREAD").ok().and_then(|v| v.parse().ok()).unwrap_or(200)
}

#[test]
fn smoke_locked() {
    smoke::<LockedRefs>(per_thread());
}

#[test]
fn smoke_lockfree() {
    smoke::<LockFreeRefs>(per_thread());
}
