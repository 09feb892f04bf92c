//! The synchronization shim: every atomic and lock the crate's own protocols
//! use comes from here, so `--cfg dref_loom` swaps them for loom's and
//! `--cfg dref_shuttle` for shuttle's.
//!
//! Dependencies (crossbeam-epoch, crossbeam-skiplist, arc-swap) are modelled
//! by neither tool: under the models the lock-free engine runs on the mock
//! stores of `lockfree::store` and the mutex-backed extent-op slot of
//! `lockfree::op_slot`, both built from this shim, so the engine's real
//! add, run, reader, cleanup and destroy code is what the models schedule.

#![allow(unused_imports)]

#[cfg(not(any(dref_loom, dref_shuttle)))]
pub(crate) use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU8, AtomicU64, AtomicUsize, Ordering, fence};
#[cfg(not(any(dref_loom, dref_shuttle)))]
pub(crate) use std::sync::{Arc, Mutex, MutexGuard};

#[cfg(dref_loom)]
pub(crate) use loom::sync::atomic::{AtomicBool, AtomicI64, AtomicU8, AtomicU64, AtomicUsize, Ordering, fence};
#[cfg(dref_loom)]
pub(crate) use loom::sync::{Arc, Mutex, MutexGuard};

#[cfg(all(dref_shuttle, not(dref_loom)))]
pub(crate) use shuttle::sync::atomic::{AtomicBool, AtomicI64, AtomicU8, AtomicU64, AtomicUsize, Ordering, fence};
#[cfg(all(dref_shuttle, not(dref_loom)))]
pub(crate) use shuttle::sync::{Arc, Mutex, MutexGuard};

/// Spin-loop hint that yields to the model checker's scheduler.
#[inline]
pub(crate) fn spin_hint() {
    #[cfg(dref_loom)]
    loom::thread::yield_now();
    #[cfg(all(dref_shuttle, not(dref_loom)))]
    shuttle::thread::yield_now();
    #[cfg(not(any(dref_loom, dref_shuttle)))]
    std::hint::spin_loop();
}

/// Yield the thread (back-off in retry loops).
#[inline]
#[allow(dead_code)]
pub(crate) fn yield_now() {
    #[cfg(dref_loom)]
    loom::thread::yield_now();
    #[cfg(all(dref_shuttle, not(dref_loom)))]
    shuttle::thread::yield_now();
    #[cfg(not(any(dref_loom, dref_shuttle)))]
    std::thread::yield_now();
}
