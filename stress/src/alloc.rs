//! The binary's global allocator: the system allocator plus counters of live
//! heap bytes and blocks, so `mem` and `stress` can report memory.
//!
//! What is counted is the size each caller asked for (`Layout::size`), not
//! what malloc spends on it: headers, rounding to 16 bytes, alignment padding
//! and free-list fragmentation are not included. [`chunk_estimate`] gives a
//! glibc-style estimate of the footprint of a block size, for the per-size
//! table.
//!
//! The counters are striped over cache-padded cells, one stripe per thread
//! (modulo [`STRIPES`]), so counting costs two uncontended relaxed RMWs per
//! allocation and per free, not writes to one shared cache line. A block
//! freed on another thread than the one that allocated it makes the two
//! stripes drift apart; only their sum means anything. Sums are exact when no
//! other thread allocates meanwhile, and a racy snapshot otherwise.
//!
//! A per-size table of live blocks ([`SizeTable`]) can be switched on for a
//! single-threaded measurement; it is off (one relaxed load per call)
//! otherwise.
//!
//! [`Uncounted`] buffers (the stress run's own fixed-size instrumentation:
//! the linearizability histories) are left out of [`live`], so the figures
//! stay those of the implementation and the workload.

#![allow(unsafe_code)]

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicUsize, Ordering};

/// Counter stripes (threads beyond this share stripes).
pub const STRIPES: usize = 64;

/// Sizes at or above this share the last row of the size table.
const TABLE_SIZES: usize = 4096;

/// One stripe of the counters, alone on its cache lines.
#[repr(align(128))]
struct Stripe {
    bytes: AtomicI64,
    blocks: AtomicI64,
}

impl Stripe {
    const fn new() -> Self {
        Stripe { bytes: AtomicI64::new(0), blocks: AtomicI64::new(0) }
    }
}

static COUNTERS: [Stripe; STRIPES] = [const { Stripe::new() }; STRIPES];
static NEXT_STRIPE: AtomicUsize = AtomicUsize::new(0);
static TABLE_ON: AtomicBool = AtomicBool::new(false);
static TABLE: [AtomicI64; TABLE_SIZES + 1] = [const { AtomicI64::new(0) }; TABLE_SIZES + 1];
/// Bytes and blocks of live [`Uncounted`] buffers, subtracted by [`live`].
static UNCOUNTED_BYTES: AtomicI64 = AtomicI64::new(0);
static UNCOUNTED_BLOCKS: AtomicI64 = AtomicI64::new(0);

thread_local! {
    // Const-initialized and without a destructor: reading it never allocates
    // and works during thread teardown, as an allocator needs.
    static MY_STRIPE: Cell<usize> = const { Cell::new(usize::MAX) };
}

/// This thread's stripe.
fn stripe() -> &'static Stripe {
    let i = MY_STRIPE
        .try_with(|c| {
            let mut i = c.get();
            if i == usize::MAX {
                i = NEXT_STRIPE.fetch_add(1, Ordering::Relaxed) % STRIPES;
                c.set(i);
            }
            i
        })
        .unwrap_or(0);
    &COUNTERS[i]
}

/// glibc's chunk size for a request of `size` bytes: the size plus an 8-byte
/// header, rounded up to 16, at least 32. Larger alignments are assumed to
/// cost the same (glibc gives the alignment slack back to its free lists).
pub const fn chunk_estimate(size: usize) -> usize {
    let c = (size + 8 + 15) & !15;
    if c < 32 { 32 } else { c }
}

/// Count `n` blocks (+1 allocated, -1 freed) of `size` bytes.
#[inline]
fn note(size: usize, n: i64) {
    let s = stripe();
    s.bytes.fetch_add(n * size as i64, Ordering::Relaxed);
    s.blocks.fetch_add(n, Ordering::Relaxed);
    if TABLE_ON.load(Ordering::Relaxed) {
        TABLE[size.min(TABLE_SIZES)].fetch_add(n, Ordering::Relaxed);
    }
}

/// The system allocator, counting.
#[derive(Debug)]
pub struct Counting;

// SAFETY: every method forwards its arguments unchanged to `System`, which
// implements `GlobalAlloc` correctly; the counting around the calls only
// touches statics and a const-initialized thread-local, never allocates, and
// never unwinds.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: the caller upholds `alloc`'s contract for `layout`.
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            note(layout.size(), 1);
        }
        p
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: the caller upholds `alloc_zeroed`'s contract for `layout`.
        let p = unsafe { System.alloc_zeroed(layout) };
        if !p.is_null() {
            note(layout.size(), 1);
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: the caller passes a block this allocator (that is,
        // `System`) gave out, with the layout it was allocated with.
        unsafe { System.dealloc(ptr, layout) };
        note(layout.size(), -1);
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: the caller upholds `realloc`'s contract; the block came
        // from `System` through this allocator.
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            note(layout.size(), -1);
            note(new_size, 1);
        }
        p
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

/// Live heap figures at one moment.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Live {
    /// Requested bytes of live blocks.
    pub bytes: i64,
    /// Live blocks.
    pub blocks: i64,
}

impl Live {
    /// `self - earlier`.
    pub fn since(self, earlier: Live) -> Live {
        Live { bytes: self.bytes - earlier.bytes, blocks: self.blocks - earlier.blocks }
    }
}

/// Sum the stripes now, less the live [`Uncounted`] buffers.
pub fn live() -> Live {
    let mut l =
        Live { bytes: -UNCOUNTED_BYTES.load(Ordering::Relaxed), blocks: -UNCOUNTED_BLOCKS.load(Ordering::Relaxed) };
    for s in &COUNTERS {
        l.bytes += s.bytes.load(Ordering::Relaxed);
        l.blocks += s.blocks.load(Ordering::Relaxed);
    }
    l
}

/// A fixed-length heap buffer that [`live`] leaves out: its bytes are
/// subtracted from right before it is allocated until right after it is
/// freed, so a reading taken while it is filled or freed does not see it
/// either. For the stress run's own instrumentation, allocated once per
/// round; it never grows.
#[derive(Debug)]
pub struct Uncounted<T> {
    buf: Box<[T]>,
    bytes: i64,
    blocks: i64,
}

impl<T: Clone> Uncounted<T> {
    /// `len` copies of `value`.
    pub fn filled(len: usize, value: T) -> Self {
        let bytes = i64::try_from(len.saturating_mul(size_of::<T>())).unwrap_or(i64::MAX);
        let blocks = i64::from(bytes > 0);
        UNCOUNTED_BYTES.fetch_add(bytes, Ordering::Relaxed);
        UNCOUNTED_BLOCKS.fetch_add(blocks, Ordering::Relaxed);
        // `vec![_; len]` allocates exactly `len` elements: the boxed slice
        // is that same block, of `len * size_of::<T>()` bytes.
        Uncounted { buf: vec![value; len].into_boxed_slice(), bytes, blocks }
    }
}

impl<T> std::ops::Deref for Uncounted<T> {
    type Target = [T];

    fn deref(&self) -> &[T] {
        &self.buf
    }
}

impl<T> std::ops::DerefMut for Uncounted<T> {
    fn deref_mut(&mut self) -> &mut [T] {
        &mut self.buf
    }
}

impl<T> Drop for Uncounted<T> {
    fn drop(&mut self) {
        drop(std::mem::take(&mut self.buf));
        UNCOUNTED_BYTES.fetch_sub(self.bytes, Ordering::Relaxed);
        UNCOUNTED_BLOCKS.fetch_sub(self.blocks, Ordering::Relaxed);
    }
}

/// Live heap bytes now (requested sizes).
pub fn live_bytes() -> i64 {
    live().bytes
}

/// Live blocks per requested size, counted while a `SizeTable` exists.
/// Only meaningful while one thread allocates.
#[derive(Debug)]
pub struct SizeTable(());

impl SizeTable {
    /// Zero the table and start counting.
    pub fn start() -> SizeTable {
        for c in &TABLE {
            c.store(0, Ordering::Relaxed);
        }
        TABLE_ON.store(true, Ordering::SeqCst);
        SizeTable(())
    }

    /// Move the net blocks per size since the start or the last take into
    /// `out` (indexed by size, [`TABLE_LEN`] long) and zero the table. The
    /// last row stands for every size from it up. Allocates nothing, so it
    /// can sit between two readings of [`live`].
    pub fn take_into(&self, out: &mut [i64]) {
        for (o, c) in out.iter_mut().zip(&TABLE) {
            *o = c.swap(0, Ordering::Relaxed);
        }
    }
}

/// Rows of a size table (see [`SizeTable::take_into`]).
pub const TABLE_LEN: usize = TABLE_SIZES + 1;

/// The non-zero rows of a table filled by [`SizeTable::take_into`], as
/// (size, net blocks).
pub fn nonzero_rows(table: &[i64]) -> Vec<(usize, i64)> {
    table.iter().enumerate().filter(|(_, n)| **n != 0).map(|(s, n)| (s, *n)).collect()
}

impl Drop for SizeTable {
    fn drop(&mut self) {
        TABLE_ON.store(false, Ordering::SeqCst);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunk_estimates_follow_glibc() {
        assert_eq!(chunk_estimate(1), 32);
        assert_eq!(chunk_estimate(24), 32);
        assert_eq!(chunk_estimate(25), 48);
        assert_eq!(chunk_estimate(40), 48);
        assert_eq!(chunk_estimate(120), 128);
    }

    #[test]
    fn an_uncounted_buffer_is_left_out() {
        // Other tests allocate (and make uncounted buffers) concurrently:
        // only check that this one is subtracted while it lives.
        let b = Uncounted::filled(8 << 20, 7u64);
        assert!(UNCOUNTED_BYTES.load(Ordering::Relaxed) >= 64 << 20);
        assert!(UNCOUNTED_BLOCKS.load(Ordering::Relaxed) >= 1);
        assert_eq!((b.len(), b[3]), (8 << 20, 7));
        drop(b);
    }

    #[test]
    fn a_box_is_counted() {
        // Other tests allocate concurrently: only check that a large block
        // shows up at all.
        let before = live_bytes();
        let b = vec![0u8; 64 << 20];
        assert!(live_bytes() - before > 32 << 20);
        drop(b);
    }
}
