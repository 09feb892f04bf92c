//! A backend wrapper that fails, panics and pauses on purpose, for tests and
//! the stress binary's `--faults N`.

#![forbid(unsafe_code)]

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use super::{Batch, BatchEnd, ExtentInfo, ExtentTree, OpRun, Pin, RefRun};
use crate::error::ExtentError;

/// When a [`FaultyTree`] misbehaves. Calls are numbered from 1 across all
/// threads; whether call `n` fails, panics or pauses is a hash of `n` and
/// `seed`, so a schedule is reproducible for a given call order but never
/// periodic: a strict "every N-th call" would fall into step with a run's
/// own pattern of calls (with N = 2, every run would fail at its second
/// call and none would make progress).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct FaultConfig {
    /// Fail about one call in `fail_one_in` with an injected
    /// [`ExtentError::Storage`] (0: never).
    pub fail_one_in: u64,
    /// Panic (with an [`InjectedPanic`] payload) on about one call in
    /// `panic_one_in` (0: never). A call chosen for both panics.
    pub panic_one_in: u64,
    /// Pause about one call in `pause_one_in` (0: never).
    pub pause_one_in: u64,
    /// The longest pause; a pause lasts between 0 and this.
    pub max_pause: Duration,
    /// From this call number on (0: never), the first call that may panic
    /// (not a `lookup`) never returns: a stalled backend, to test that a
    /// caller's watchdog turns a stall into a failure.
    pub stall_at: u64,
    /// Seed of the choices.
    pub seed: u64,
}

impl FaultConfig {
    /// What `stress --faults n` uses: about one call in `n` fails, one in
    /// `7n` panics, and one in `n` pauses for up to 200 µs. `n == 0`
    /// injects nothing.
    pub fn every(n: u64) -> Self {
        FaultConfig {
            fail_one_in: n,
            panic_one_in: n.saturating_mul(7),
            pause_one_in: n,
            max_pause: Duration::from_micros(200),
            stall_at: 0,
            seed: 0x5eed,
        }
    }

    /// Whether this configuration injects anything.
    pub fn injects(&self) -> bool {
        self.fail_one_in > 0
            || self.panic_one_in > 0
            || self.stall_at > 0
            || (self.pause_one_in > 0 && !self.max_pause.is_zero())
    }
}

/// The payload of a panic a [`FaultyTree`] injects (`std::panic::panic_any`),
/// so a test or a panic hook can tell it from a real one.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct InjectedPanic {
    /// The call number that panicked.
    pub call: u64,
}

impl InjectedPanic {
    /// Install a process-wide panic hook that prints nothing for injected
    /// panics and hands every other panic to the hook that was installed
    /// before. Call it once, before the threads that may panic start.
    pub fn silence_reports() {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if info.payload().downcast_ref::<InjectedPanic>().is_none() {
                previous(info);
            }
        }));
    }
}

/// What a [`FaultyTree`] injected so far.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FaultStats {
    /// Calls that could fault.
    pub calls: u64,
    /// Injected errors.
    pub errors: u64,
    /// Injected panics.
    pub panics: u64,
    /// Pauses.
    pub pauses: u64,
}

/// A backend wrapper that injects failures into the calls whose failure the
/// contract promises to survive by a retry. A fault is injected *instead of*
/// the call (the wrapped backend is not called), so an injected error
/// changed nothing, as the contract requires. Faulted: [`ExtentTree::apply_ref`],
/// [`ExtentTree::apply_extent_op`], [`ExtentTree::begin_run`] and
/// [`ExtentTree::begin_head`] fail, panic and pause; [`ExtentTree::lookup`]
/// fails and pauses (a reader is not expected to catch panics). The end
/// hooks and [`ExtentTree::pin_reserved`] are passed through: their failure
/// means a transaction abort, which is not what a retry loop tests
/// (tests/backend_errors.rs covers those one by one).
///
/// ```
/// use delayed_refs::{Action, DataRef, DelayedRefs, FaultConfig, FaultyTree, LockFreeRefs, MemExtentTree,
///     Qgroup, Recovery, RunMode, TransHandle};
/// let refs = LockFreeRefs::new(Default::default());
/// let tree = FaultyTree::new(MemExtentTree::new(), FaultConfig { fail_one_in: 2, ..FaultConfig::every(0) });
/// let mut h = TransHandle::new();
/// for ino in 0..4 {
///     let action = if ino == 0 { Action::AddExtent } else { Action::Add };
///     let r = DataRef { action, bytenr: 1 << 20, num_bytes: 4096, owning_root: 5, root: 5, ino: 257 + ino,
///         offset: 0, qgroup: Qgroup::ACCOUNT };
///     refs.add_data_ref(&mut h, &r.build().unwrap(), 0).unwrap();
/// }
/// // Half the calls fail; the failing ref stays queued, so retrying converges.
/// loop {
///     match refs.run(&tree, RunMode::All) {
///         Ok(_) => break,
///         Err(e) => assert_eq!(e.recovery(), Recovery::Retry),
///     }
/// }
/// assert_eq!(tree.inner().lookup(1 << 20).unwrap().refs, 4);
/// assert!(tree.stats().errors > 0);
/// ```
#[derive(Debug)]
pub struct FaultyTree<B> {
    inner: B,
    config: FaultConfig,
    enabled: AtomicBool,
    stalled: AtomicBool,
    calls: AtomicU64,
    errors: AtomicU64,
    panics: AtomicU64,
    pauses: AtomicU64,
}

/// The error an injected failure carries (inside [`ExtentError::Storage`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, thiserror::Error)]
#[error("injected fault at call {call}")]
pub struct InjectedFault {
    /// The call number that failed.
    pub call: u64,
}

/// What one call does.
enum Fault {
    None,
    Error(u64),
    Panic(u64),
}

impl<B: ExtentTree> FaultyTree<B> {
    /// Wrap `inner`.
    pub fn new(inner: B, config: FaultConfig) -> Self {
        // A tree that injects nothing costs one load per call: not even
        // the call counter moves.
        FaultyTree {
            inner,
            config,
            enabled: AtomicBool::new(config.injects()),
            stalled: AtomicBool::new(false),
            calls: AtomicU64::new(0),
            errors: AtomicU64::new(0),
            panics: AtomicU64::new(0),
            pauses: AtomicU64::new(0),
        }
    }

    /// The wrapped backend (calls on it are never faulted).
    pub fn inner(&self) -> &B {
        &self.inner
    }

    /// Whether calls are being faulted now.
    pub fn is_injecting(&self) -> bool {
        // Relaxed: see `set_enabled`.
        self.enabled.load(Ordering::Relaxed)
    }

    /// Turn injection on or off (a final clean-up run, say).
    /// Turning it on with a configuration that injects nothing changes
    /// nothing but the call counter.
    pub fn set_enabled(&self, on: bool) {
        // Relaxed: a switch for later calls; it publishes nothing else.
        self.enabled.store(on, Ordering::Relaxed);
    }

    /// What was injected so far.
    pub fn stats(&self) -> FaultStats {
        // Relaxed: statistics, exact once the callers are joined.
        FaultStats {
            calls: self.calls.load(Ordering::Relaxed),
            errors: self.errors.load(Ordering::Relaxed),
            panics: self.panics.load(Ordering::Relaxed),
            pauses: self.pauses.load(Ordering::Relaxed),
        }
    }

    /// Number this call, pause if its hash says so, and say how it fails.
    fn next(&self, may_panic: bool) -> Fault {
        // Relaxed: the switch and the counters order nothing but themselves.
        if !self.enabled.load(Ordering::Relaxed) {
            return Fault::None;
        }
        let call = self.calls.fetch_add(1, Ordering::Relaxed) + 1;
        let c = &self.config;
        // One independent draw per kind of fault (distinct salts).
        let draw = |salt: u64, one_in: u64| one_in > 0 && splitmix64(call ^ c.seed ^ salt) % one_in == 0;
        if c.pause_one_in > 0 && !c.max_pause.is_zero() && draw(0x9a05e, c.pause_one_in) {
            self.pauses.fetch_add(1, Ordering::Relaxed);
            let nanos = splitmix64(call ^ c.seed) % (c.max_pause.as_nanos() as u64).max(1);
            std::thread::sleep(Duration::from_nanos(nanos));
        }
        // Relaxed: one stall in all, which the swap's atomicity decides.
        if may_panic && c.stall_at > 0 && call >= c.stall_at && !self.stalled.swap(true, Ordering::Relaxed) {
            loop {
                std::thread::sleep(Duration::from_secs(3600));
            }
        }
        if may_panic && draw(0x9a41c, c.panic_one_in) {
            self.panics.fetch_add(1, Ordering::Relaxed);
            return Fault::Panic(call);
        }
        if draw(0xfa11, c.fail_one_in) {
            self.errors.fetch_add(1, Ordering::Relaxed);
            return Fault::Error(call);
        }
        Fault::None
    }

    /// Inject, then (if nothing was injected) make the call.
    fn faulted<T>(&self, may_panic: bool, call: impl FnOnce() -> Result<T, ExtentError>) -> Result<T, ExtentError> {
        match self.next(may_panic) {
            Fault::None => call(),
            Fault::Error(call) => Err(ExtentError::storage(InjectedFault { call })),
            Fault::Panic(call) => std::panic::panic_any(InjectedPanic { call }),
        }
    }
}

/// A 64-bit mixer (splitmix64's finaliser), for the pause choices.
fn splitmix64(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

impl<B: ExtentTree> ExtentTree for FaultyTree<B> {
    fn apply_ref(&self, run: &RefRun<'_>) -> Result<(), ExtentError> {
        self.faulted(true, || self.inner.apply_ref(run))
    }

    fn apply_extent_op(&self, run: &OpRun<'_>) -> Result<(), ExtentError> {
        self.faulted(true, || self.inner.apply_extent_op(run))
    }

    fn pin_reserved(&self, pin: &Pin) -> Result<(), ExtentError> {
        self.inner.pin_reserved(pin)
    }

    fn lookup(&self, bytenr: u64) -> Result<Option<ExtentInfo>, ExtentError> {
        self.faulted(false, || self.inner.lookup(bytenr))
    }

    fn begin_run(&self, batch: Batch) -> Result<(), ExtentError> {
        self.faulted(true, || self.inner.begin_run(batch))
    }

    fn end_run(&self, batch: Batch, end: BatchEnd) -> Result<(), ExtentError> {
        self.inner.end_run(batch, end)
    }

    fn begin_head(&self, batch: Batch, bytenr: u64) -> Result<(), ExtentError> {
        self.faulted(true, || self.inner.begin_head(batch, bytenr))
    }

    fn end_head(&self, batch: Batch, bytenr: u64, end: BatchEnd) -> Result<(), ExtentError> {
        self.inner.end_head(batch, bytenr, end)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedule_is_seeded_and_about_one_in_n() {
        let config = FaultConfig { max_pause: Duration::ZERO, ..FaultConfig::every(10) };
        let outcomes = |seed: u64| {
            let t = FaultyTree::new(super::super::MemExtentTree::new(), FaultConfig { seed, ..config });
            let v: Vec<u8> = (1..=7000u64)
                .map(|i| {
                    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| t.begin_run(Batch::default()))) {
                        Ok(Ok(())) => 0,
                        Ok(Err(ExtentError::Storage(s))) => {
                            assert_eq!(s.downcast_ref::<InjectedFault>(), Some(&InjectedFault { call: i }));
                            1
                        }
                        Ok(Err(e)) => panic!("{e:?}"),
                        Err(p) => {
                            assert_eq!(p.downcast_ref::<InjectedPanic>(), Some(&InjectedPanic { call: i }));
                            2
                        }
                    }
                })
                .collect();
            (v, t.stats())
        };
        let (a, stats) = outcomes(1);
        assert_eq!(outcomes(1).0, a, "the same seed gives the same schedule");
        assert_ne!(outcomes(2).0, a, "another seed another");
        // Expected 700 errors and 100 panics in 7000 calls: well inside
        // these bounds for any seed that is not broken.
        assert!((500..900).contains(&stats.errors), "{stats:?}");
        assert!((50..160).contains(&stats.panics), "{stats:?}");
        assert_eq!(stats.calls, 7000);
        // Not periodic: failures are not all the same distance apart.
        let gaps: std::collections::BTreeSet<usize> = a
            .iter()
            .enumerate()
            .filter(|(_, o)| **o == 1)
            .map(|(i, _)| i)
            .collect::<Vec<_>>()
            .windows(2)
            .map(|w| w[1] - w[0])
            .collect();
        assert!(gaps.len() > 5, "{gaps:?}");
    }

    #[test]
    fn off_when_nothing_to_inject() {
        let t = FaultyTree::new(super::super::MemExtentTree::new(), FaultConfig::every(0));
        assert!(!t.is_injecting());
        assert!(t.begin_run(Batch::default()).is_ok());
        assert_eq!(t.stats(), FaultStats::default());
        let t = FaultyTree::new(
            super::super::MemExtentTree::new(),
            FaultConfig { fail_one_in: 1, ..FaultConfig::every(0) },
        );
        assert!(t.begin_run(Batch::default()).is_err());
        t.set_enabled(false);
        assert!(t.begin_run(Batch::default()).is_ok());
        assert_eq!(t.stats().calls, 1);
    }
}
