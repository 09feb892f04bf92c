//! Smoke run: both implementations, 4 adders + 2 runners, then a full drain.
use delayed_refs::*;
use std::sync::atomic::{AtomicBool, Ordering};

fn go<D: DelayedRefs>() {
    let refs = D::new(FsConfig::default());
    let tree = MemExtentTree::new();
    tree.insert_item(
        1 << 40,
        ExtentItem {
            num_bytes: 4096,
            is_data: true,
            refs: 1,
            flags: EXTENT_FLAG_DATA,
            backrefs: [(RefKey::ExtentData { root: 5, objectid: 1, offset: 0 }, 1)].into(),
            ..Default::default()
        },
    );
    let stop = AtomicBool::new(false);
    let t0 = std::time::Instant::now();
    std::thread::scope(|s| {
        for r in 0..2 {
            let (refs, tree, stop) = (&refs, &tree, &stop);
            s.spawn(move || {
                let _ = r;
                while !stop.load(Ordering::Relaxed) {
                    refs.run(tree, RunMode::Ready).unwrap();
                }
            });
        }
        let adders: Vec<_> = (0..4u64)
            .map(|t| {
                let refs = &refs;
                s.spawn(move || {
                    let mut h = TransHandle::new();
                    for i in 0..5000u64 {
                        let b = ((t << 32) | (i + 1)) << 12;
                        refs.add_data_ref(
                            &mut h,
                            &GenericRef::new(Action::AddExtent, b, 4096, 0, 5).data(5, 257, i, 0, false),
                            4096,
                        )
                        .unwrap();
                        for k in 0..3 {
                            refs.add_data_ref(
                                &mut h,
                                &GenericRef::new(Action::Add, b, 4096, 0, 5).data(5, 300 + k, i, 0, false),
                                0,
                            )
                            .unwrap();
                        }
                        refs.add_data_ref(
                            &mut h,
                            &GenericRef::new(Action::Drop, b, 4096, 0, 5).data(5, 300, i, 0, false),
                            0,
                        )
                        .unwrap();
                        // hot head shared by everyone
                        refs.add_data_ref(
                            &mut h,
                            &GenericRef::new(Action::Add, 1 << 40, 4096, 0, 5).data(5, 7, t, 0, false),
                            0,
                        )
                        .unwrap();
                    }
                })
            })
            .collect();
        for a in adders {
            a.join().unwrap();
        }
        stop.store(true, Ordering::Relaxed);
    });
    refs.run(&tree, RunMode::All).unwrap_err_or_ok();
    let items = tree.items();
    let ok_regular = items.iter().filter(|(b, _)| **b != 1 << 40).all(|(_, it)| it.refs == 3 && it.backrefs.len() == 3);
    println!(
        "{}: {:?} items={} regular_ok={} hot={:?} rsv={:?} {:?}",
        D::NAME,
        t0.elapsed(),
        items.len(),
        ok_regular,
        tree.item(1 << 40).map(|i| i.refs),
        refs.fs().reserves.snapshot().delayed_refs,
        refs.counters()
    );
}

trait Okish {
    fn unwrap_err_or_ok(self);
}
impl<T: std::fmt::Debug> Okish for Result<T> {
    fn unwrap_err_or_ok(self) {
        if let Err(e) = self {
            println!("drain error: {e}");
        }
    }
}

fn main() {
    go::<LockedRefs>();
    go::<LockFreeRefs>();
}
