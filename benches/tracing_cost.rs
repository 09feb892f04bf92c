#![allow(missing_docs)] // criterion_group! generates undocumented items
//! The cost of the `tracing` feature's events (src/trace.rs) on one thread:
//! 4096 data refs added (1024 heads x 4) and run, both implementations.
//! Run it twice and compare (docs/benchmarks.md, "tracing"):
//!
//! ```text
//! cargo bench --bench tracing_cost -- --save-baseline off
//! cargo bench --bench tracing_cost --features tracing -- --baseline off
//! ```
//!
//! With the feature off the event macros expand to empty blocks; with it on
//! and no subscriber installed each event costs a disabled-callsite check.

use std::hint::black_box;
use std::time::Duration;

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use delayed_refs::{
    Action, DelayedRefs, FsConfig, GenericRef, LockFreeRefs, LockedRefs, MemExtentTree, RunMode, TransHandle,
};

const REFS: u64 = 4096;

fn add_and_run<D: DelayedRefs>() {
    let refs = D::new(FsConfig::default());
    let tree = MemExtentTree::new();
    let mut h = TransHandle::new();
    for i in 0..REFS {
        let bytenr = (i / 4 + 1) << 12;
        let (action, reserved) = if i % 4 == 0 { (Action::AddExtent, 4096) } else { (Action::Add, 0) };
        let r = GenericRef::new(action, bytenr, 4096, 0, 5).data(5, 257, i % 4, 0, false);
        black_box(refs.add_data_ref(&mut h, &r, reserved).unwrap());
    }
    black_box(refs.run(&tree, RunMode::All).unwrap());
}

fn bench(c: &mut Criterion) {
    let mut g = c.benchmark_group("tracing_cost");
    g.sample_size(20).warm_up_time(Duration::from_secs(1)).measurement_time(Duration::from_secs(3));
    g.throughput(Throughput::Elements(REFS));
    // The same ids in both builds, so `--baseline off` compares them.
    g.bench_function(BenchmarkId::new("locked", 1), |b| b.iter(add_and_run::<LockedRefs>));
    g.bench_function(BenchmarkId::new("lockfree", 1), |b| b.iter(add_and_run::<LockFreeRefs>));
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
