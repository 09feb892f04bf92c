#![allow(missing_docs)] // criterion_group! generates undocumented items
//! criterion benches of the W1-W4 workloads (docs/benchmarks.md), every implementation
//! (`locked`, `sharded`: the locked port sharded by bytenr, `lockfree`) in
//! every group, 1/2/4/8/16 threads, ratios from the same run
//! (docs/benchmarks.md):
//!
//! - `W1_spread`: adders on many heads (about 4 refs each) while runners run
//!   `RunMode::Ready`; a final drain. With T threads: T/2 adders and T/2
//!   runners (1 thread: add, then drain).
//! - `W2_drain`: a prefilled index of 4096 heads x 4 refs drained by the
//!   commit drain on a rayon pool of T threads (prefill not timed).
//! - `tree_drain`: 4096 tree blocks x 4 tree backrefs run by one thread
//!   with `run(All)` (metadata heads: merge pass and per-identity folds).
//! - `W3_hot_head`: every thread adds its own keys under one head.
//! - `W4_add_only`: each thread adds 4 refs to each of its own heads.
//! - `wide_head`: one head, every add a new distinct key.
//! - `wide_scaling`: one thread adding N distinct keys to one head, N =
//!   1k/10k/100k: per-add time must grow like log N, not N.
//! - `late_adds`: one head with N queued drops, run by one thread whose
//!   backend queues a new ADD on the same head at every drop, so each ADD
//!   arrives while the runner is in its drop phase and must run before the
//!   next drop (semantics.md §3.3, §11.18), N = 1k/10k: per-ref time must not grow
//!   like N (a runner that rescans the head for every late ADD is O(N²)).
//!
//! Throughput is reported per add (per ref for W2).

use std::hint::black_box;
use std::time::Duration;

use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use criterion::{BatchSize, Bencher, BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use delayed_refs::{
    Action, DelayedRefs, ExtentError, ExtentInfo, ExtentTree, FsConfig, GenericRef, LockFreeRefs, LockedRefs,
    MemExtentTree, OpRun, Pin, RefRun, RunMode, ShardedRefs, TransHandle,
};

const ADDS_PER_THREAD: u64 = 4096;
const THREADS: [u64; 5] = [1, 2, 4, 8, 16];
const NB: u64 = 4096;
const TREE_NB: u64 = 16384;

fn data_ref(action: Action, bytenr: u64, owner: u64, offset: u64) -> GenericRef {
    GenericRef::new(action, bytenr, NB, 0, 5).data(5, owner, offset, 0, false)
}

/// W1: `adders` threads queue refs over their own heads, 4 per head, the
/// first allocating the extent; `runners` threads run meanwhile.
fn spread<D: DelayedRefs>(adders: u64, runners: u64) {
    let refs = D::new(FsConfig::default());
    let tree = MemExtentTree::new();
    let done = std::sync::atomic::AtomicU64::new(0);
    std::thread::scope(|s| {
        for t in 0..adders {
            let (refs, done) = (&refs, &done);
            s.spawn(move || {
                let mut h = TransHandle::new();
                for i in 0..ADDS_PER_THREAD {
                    let bytenr = ((t << 32) | (i / 4)) * NB + NB;
                    let (action, reserved) = if i % 4 == 0 { (Action::AddExtent, NB) } else { (Action::Add, 0) };
                    black_box(refs.add_data_ref(&mut h, &data_ref(action, bytenr, 257, i % 4), reserved).unwrap());
                }
                done.fetch_add(1, std::sync::atomic::Ordering::Release);
            });
        }
        for _ in 0..runners {
            let (refs, tree, done) = (&refs, &tree, &done);
            s.spawn(move || {
                while done.load(std::sync::atomic::Ordering::Acquire) < adders {
                    black_box(refs.run(tree, RunMode::Ready).unwrap());
                }
            });
        }
    });
    refs.run(&tree, RunMode::All).unwrap();
    assert_eq!(tree.len() as u64, adders * ADDS_PER_THREAD / 4);
}

fn w1<D: DelayedRefs>(threads: u64) {
    let adders = (threads / 2).max(1);
    spread::<D>(adders, threads - adders);
}

/// W2 setup: 4096 heads with 4 refs each, queued single-threaded.
fn prefilled<D: DelayedRefs>() -> (D, MemExtentTree) {
    let refs = D::new(FsConfig::default());
    let mut h = TransHandle::new();
    for i in 0..4096 * 4u64 {
        let bytenr = (i / 4) * NB + NB;
        let (action, reserved) = if i % 4 == 0 { (Action::AddExtent, NB) } else { (Action::Add, 0) };
        refs.add_data_ref(&mut h, &data_ref(action, bytenr, 257, i % 4), reserved).unwrap();
    }
    (refs, MemExtentTree::new())
}

/// 4096 tree blocks x 4 tree backrefs (the first allocates the block), not run.
fn prefilled_tree<D: DelayedRefs>() -> (D, MemExtentTree) {
    let refs = D::new(FsConfig::default());
    let mut h = TransHandle::new();
    for i in 0..4096 * 4u64 {
        let bytenr = (i / 4) * TREE_NB + TREE_NB;
        let action = if i % 4 == 0 { Action::AddExtent } else { Action::Add };
        let root = 256 + i % 4;
        let g = GenericRef::new(action, bytenr, TREE_NB, 0, root).tree(0, root, 0, false);
        refs.add_tree_ref(&mut h, &g, None).unwrap();
    }
    (refs, MemExtentTree::new())
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
                    black_box(refs.add_data_ref(&mut h, &data_ref(Action::Add, 1 << 30, 1000 + t, i % 64), 0).unwrap());
                }
            });
        }
    });
}

/// W4: each thread adds 4 refs to each of its own heads (no runners).
fn add_only<D: DelayedRefs>(threads: u64) {
    let refs = D::new(FsConfig::default());
    std::thread::scope(|s| {
        for t in 0..threads {
            let refs = &refs;
            s.spawn(move || {
                let mut h = TransHandle::new();
                for i in 0..ADDS_PER_THREAD {
                    let bytenr = ((t << 32) | (i / 4)) * NB + NB;
                    black_box(refs.add_data_ref(&mut h, &data_ref(Action::Add, bytenr, 257, i % 4), 0).unwrap());
                }
            });
        }
    });
}

/// Wide head: one head, every add a distinct key.
fn wide<D: DelayedRefs>(threads: u64) {
    let refs = D::new(FsConfig::default());
    std::thread::scope(|s| {
        for t in 0..threads {
            let refs = &refs;
            s.spawn(move || {
                let mut h = TransHandle::new();
                for i in 0..ADDS_PER_THREAD {
                    black_box(refs.add_data_ref(&mut h, &data_ref(Action::Add, 1 << 30, 1000 + t, i), 0).unwrap());
                }
            });
        }
    });
}

/// One thread, `n` distinct keys on one head.
fn wide_n<D: DelayedRefs>(n: u64) {
    let refs = D::new(FsConfig::default());
    let mut h = TransHandle::new();
    for i in 0..n {
        black_box(refs.add_data_ref(&mut h, &data_ref(Action::Add, 1 << 30, 257, i), 0).unwrap());
    }
}

const LATE_BYTENR: u64 = 1 << 30;

/// One head whose extent holds `n` data backrefs on disk, with a drop of
/// each queued (not timed).
fn late_setup<D: DelayedRefs>(n: u64) -> (D, MemExtentTree) {
    let refs = D::new(FsConfig::default());
    let tree = MemExtentTree::new();
    let mut h = TransHandle::new();
    for i in 0..n {
        let (action, reserved) = if i == 0 { (Action::AddExtent, NB) } else { (Action::Add, 0) };
        refs.add_data_ref(&mut h, &data_ref(action, LATE_BYTENR, 257, i), reserved).unwrap();
    }
    refs.run(&tree, RunMode::All).unwrap();
    for i in 0..n {
        refs.add_data_ref(&mut h, &data_ref(Action::Drop, LATE_BYTENR, 257, i), 0).unwrap();
    }
    (refs, tree)
}

/// A backend that queues a new ADD on the same head before applying each
/// drop (as COWing the extent tree queues refs while the runner runs).
struct LateAdder<'a, D> {
    refs: &'a D,
    tree: &'a MemExtentTree,
    next: AtomicU64,
    trans: Mutex<TransHandle>,
}

impl<D: DelayedRefs> ExtentTree for LateAdder<'_, D> {
    fn apply_ref(&self, run: &RefRun<'_>) -> Result<(), ExtentError> {
        if run.action == Action::Drop {
            let off = self.next.fetch_add(1, Ordering::Relaxed);
            let r = data_ref(Action::Add, LATE_BYTENR, 258, off);
            self.refs.add_data_ref(&mut self.trans.lock().unwrap(), &r, 0).unwrap();
        }
        self.tree.apply_ref(run)
    }

    fn apply_extent_op(&self, run: &OpRun<'_>) -> Result<(), ExtentError> {
        self.tree.apply_extent_op(run)
    }

    fn pin_reserved(&self, pin: &Pin) -> Result<(), ExtentError> {
        self.tree.pin_reserved(pin)
    }

    fn lookup(&self, bytenr: u64) -> Result<Option<ExtentInfo>, ExtentError> {
        ExtentTree::lookup(self.tree, bytenr)
    }
}

/// Run the prefilled head to the end: `n` drops and `n` late adds.
fn late_run<D: DelayedRefs>((refs, tree): (D, MemExtentTree), n: u64) -> (D, MemExtentTree) {
    {
        let next = AtomicU64::new(0);
        let backend = LateAdder { refs: &refs, tree: &tree, next, trans: Mutex::new(TransHandle::new()) };
        refs.run(&backend, RunMode::All).unwrap();
    }
    assert_eq!(tree.lookup(LATE_BYTENR).map(|i| i.refs), Some(n), "every drop and late add ran");
    (refs, tree)
}

fn late_group(c: &mut Criterion) {
    let mut g = c.benchmark_group("late_adds");
    g.sample_size(10).warm_up_time(Duration::from_secs(1)).measurement_time(Duration::from_secs(3));
    for n in [1_000u64, 10_000] {
        g.throughput(Throughput::Elements(2 * n));
        g.bench_with_input(BenchmarkId::new("locked", n), &n, |b, &n| {
            b.iter_batched(|| late_setup::<LockedRefs>(n), |x| late_run(x, n), BatchSize::PerIteration)
        });
        g.bench_with_input(BenchmarkId::new("sharded", n), &n, |b, &n| {
            b.iter_batched(|| late_setup::<ShardedRefs>(n), |x| late_run(x, n), BatchSize::PerIteration)
        });
        g.bench_with_input(BenchmarkId::new("lockfree", n), &n, |b, &n| {
            b.iter_batched(|| late_setup::<LockFreeRefs>(n), |x| late_run(x, n), BatchSize::PerIteration)
        });
    }
    g.finish();
}

/// One workload of `threads -> ()` for the three implementations, per
/// thread count (locked, sharded, lockfree interleaved).
struct Workload {
    locked: fn(u64),
    sharded: fn(u64),
    lockfree: fn(u64),
}

/// The [`Workload`] of a generic workload function.
macro_rules! workload {
    ($f:ident) => {
        Workload { locked: $f::<LockedRefs>, sharded: $f::<ShardedRefs>, lockfree: $f::<LockFreeRefs> }
    };
}

fn group(c: &mut Criterion, name: &str, w: Workload, adds: fn(u64) -> u64) {
    let mut g = c.benchmark_group(name);
    g.sample_size(10).warm_up_time(Duration::from_secs(1)).measurement_time(Duration::from_secs(3));
    for t in THREADS {
        g.throughput(Throughput::Elements(adds(t)));
        for (id, f) in [("locked", w.locked), ("sharded", w.sharded), ("lockfree", w.lockfree)] {
            g.bench_with_input(BenchmarkId::new(id, t), &t, |b, &t| b.iter(|| f(t)));
        }
    }
    g.finish();
}

/// Time `drain` on a root `prefill` built (prefill and teardown not timed).
fn bench_drain<D: DelayedRefs>(
    b: &mut Bencher<'_>,
    prefill: fn() -> (D, MemExtentTree),
    drain: impl Fn(&D, &MemExtentTree) -> delayed_refs::Result<()>,
) {
    b.iter_batched(
        prefill,
        |(refs, tree)| {
            drain(&refs, &tree).unwrap();
            (refs, tree)
        },
        BatchSize::PerIteration,
    )
}

fn drain_group(c: &mut Criterion) {
    let mut g = c.benchmark_group("W2_drain");
    g.sample_size(10).warm_up_time(Duration::from_secs(1)).measurement_time(Duration::from_secs(3));
    g.throughput(Throughput::Elements(4096 * 4));
    for t in THREADS {
        let pool = rayon::ThreadPoolBuilder::new().num_threads(t as usize).build().unwrap();
        g.bench_with_input(BenchmarkId::new("locked", t), &t, |b, _| {
            bench_drain(b, prefilled::<LockedRefs>, |r, tree| r.commit_drain(tree, &pool).map(drop))
        });
        g.bench_with_input(BenchmarkId::new("sharded", t), &t, |b, _| {
            bench_drain(b, prefilled::<ShardedRefs>, |r, tree| r.commit_drain(tree, &pool).map(drop))
        });
        g.bench_with_input(BenchmarkId::new("lockfree", t), &t, |b, _| {
            bench_drain(b, prefilled::<LockFreeRefs>, |r, tree| r.commit_drain(tree, &pool).map(drop))
        });
    }
    g.finish();
}

/// One thread running `run(All)` over metadata heads: the per-ref cost of the
/// run side on tree refs (merge pass, per-identity fold before each take).
fn tree_drain_group(c: &mut Criterion) {
    let mut g = c.benchmark_group("tree_drain");
    g.sample_size(10).warm_up_time(Duration::from_secs(1)).measurement_time(Duration::from_secs(3));
    g.throughput(Throughput::Elements(4096 * 4));
    g.bench_function("locked", |b| {
        bench_drain(b, prefilled_tree::<LockedRefs>, |r, t| r.run(t, RunMode::All).map(drop))
    });
    g.bench_function("sharded", |b| {
        bench_drain(b, prefilled_tree::<ShardedRefs>, |r, t| r.run(t, RunMode::All).map(drop))
    });
    g.bench_function("lockfree", |b| {
        bench_drain(b, prefilled_tree::<LockFreeRefs>, |r, t| r.run(t, RunMode::All).map(drop))
    });
    g.finish();
}

fn scaling_group(c: &mut Criterion) {
    let mut g = c.benchmark_group("wide_scaling");
    g.sample_size(10).warm_up_time(Duration::from_secs(1)).measurement_time(Duration::from_secs(3));
    for n in [1_000u64, 10_000, 100_000] {
        g.throughput(Throughput::Elements(n));
        g.bench_with_input(BenchmarkId::new("locked", n), &n, |b, &n| b.iter(|| wide_n::<LockedRefs>(n)));
        g.bench_with_input(BenchmarkId::new("sharded", n), &n, |b, &n| b.iter(|| wide_n::<ShardedRefs>(n)));
        g.bench_with_input(BenchmarkId::new("lockfree", n), &n, |b, &n| b.iter(|| wide_n::<LockFreeRefs>(n)));
    }
    g.finish();
}

fn bench(c: &mut Criterion) {
    let every = |t: u64| t * ADDS_PER_THREAD;
    group(c, "W1_spread", workload!(w1), |t| (t / 2).max(1) * ADDS_PER_THREAD);
    drain_group(c);
    tree_drain_group(c);
    group(c, "W3_hot_head", workload!(hot), every);
    group(c, "W4_add_only", workload!(add_only), every);
    group(c, "wide_head", workload!(wide), every);
    scaling_group(c);
    late_group(c);
}

criterion_group!(benches, bench);
criterion_main!(benches);
