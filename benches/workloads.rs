#![allow(missing_docs)] // criterion_group! generates undocumented items
//! criterion benches: W4 add-only and W3 hot head, both implementations,
//! 1/2/4/8/16 threads (BRIEF §5). Each iteration spawns the threads, which
//! each queue `ADDS_PER_THREAD` adds; throughput is reported per add.
//! Ratios against the locked port come from the same run (docs/benchmarks.md).

use std::hint::black_box;

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use delayed_refs::{Action, DelayedRefs, FsConfig, GenericRef, LockFreeRefs, LockedRefs, TransHandle};

const ADDS_PER_THREAD: u64 = 4096;
const THREADS: [u64; 5] = [1, 2, 4, 8, 16];

/// W4: each thread adds 4 refs to each of its own heads (merge throughput, no runners).
fn add_only<D: DelayedRefs>(threads: u64) {
    let refs = D::new(FsConfig::default());
    std::thread::scope(|s| {
        for t in 0..threads {
            let refs = &refs;
            s.spawn(move || {
                let mut h = TransHandle::new();
                for i in 0..ADDS_PER_THREAD {
                    let head = (t << 32) | (i / 4);
                    let r = GenericRef::new(Action::Add, (head + 1) << 12, 4096, 0, 5).data(5, 257, i % 4, 0, false);
                    black_box(refs.add_data_ref(&mut h, &r, 0).unwrap());
                }
            });
        }
    });
}

/// W3: every thread adds to one hot head (its own keys under it).
fn hot<D: DelayedRefs>(threads: u64) {
    let refs = D::new(FsConfig::default());
    std::thread::scope(|s| {
        for t in 0..threads {
            let refs = &refs;
            s.spawn(move || {
                let mut h = TransHandle::new();
                for i in 0..ADDS_PER_THREAD {
                    let r = GenericRef::new(Action::Add, 1 << 30, 4096, 0, 5).data(5, 1000 + t, i % 64, 0, false);
                    black_box(refs.add_data_ref(&mut h, &r, 0).unwrap());
                }
            });
        }
    });
}

fn bench(c: &mut Criterion) {
    for (name, f_locked, f_lockfree) in [
        ("W4_add_only", add_only::<LockedRefs> as fn(u64), add_only::<LockFreeRefs> as fn(u64)),
        ("W3_hot_head", hot::<LockedRefs> as fn(u64), hot::<LockFreeRefs> as fn(u64)),
    ] {
        let mut g = c.benchmark_group(name);
        g.sample_size(10);
        for t in THREADS {
            g.throughput(Throughput::Elements(t * ADDS_PER_THREAD));
            g.bench_with_input(BenchmarkId::new("locked", t), &t, |b, &t| b.iter(|| f_locked(t)));
            g.bench_with_input(BenchmarkId::new("lockfree", t), &t, |b, &t| b.iter(|| f_lockfree(t)));
        }
        g.finish();
    }
}

criterion_group!(benches, bench);
criterion_main!(benches);
