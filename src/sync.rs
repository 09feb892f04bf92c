//! The synchronization shim: every atomic and lock the crate's own protocols
//! use comes from here, so `--cfg dref_loom` swaps them for loom's.
//!
//! Dependencies (crossbeam-epoch, crossbeam-skiplist, arc-swap) are not
//! modelled by loom: the models (`loom_models`) drive the protocol modules
//! (`lockfree::state`, `lockfree::count`, `rsv`) directly, and the head
//! index's lifecycle steps (`lockfree::index`) through a mock index built
//! from this shim's `Mutex` and `Arc`.

#![allow(unused_imports)]

#[cfg(not(dref_loom))]
pub(crate) use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU8, AtomicU64, AtomicUsize, Ordering, fence};
#[cfg(not(dref_loom))]
pub(crate) use std::sync::{Arc, Mutex, MutexGuard};

#[cfg(dref_loom)]
pub(crate) use loom::sync::atomic::{AtomicBool, AtomicI64, AtomicU8, AtomicU64, AtomicUsize, Ordering, fence};
#[cfg(dref_loom)]
pub(crate) use loom::sync::{Arc, Mutex, MutexGuard};

/// Spin-loop hint that yields to loom's scheduler under the model.
#[inline]
pub(crate) fn spin_hint() {
    #[cfg(dref_loom)]
    loom::thread::yield_now();
    #[cfg(not(dref_loom))]
    std::hint::spin_loop();
}

/// Yield the thread (back-off in retry loops).
#[inline]
#[allow(dead_code)]
pub(crate) fn yield_now() {
    #[cfg(dref_loom)]
    loom::thread::yield_now();
    #[cfg(not(dref_loom))]
    std::thread::yield_now();
}
