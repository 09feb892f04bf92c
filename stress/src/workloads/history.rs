//! Linearizability histories of a round: the adders' count-changing calls
//! and the reader threads' `lookup_extent_info` calls on sampled extents,
//! with when they ran, checked after the round by
//! [`delayed_refs::lincheck`].
//!
//! **What is tracked.** Every [`TRACK_EVERY`]-th extent: slot `i` of a slot
//! adder when `i % TRACK_EVERY == 0` (whichever bytenr the slot holds; it
//! publishes a new one to the readers when it moves), and shared head `h`
//! of `hot`/`wide` when `h % TRACK_EVERY == 0`. Adders record the calls that
//! change a tracked extent's count and succeeded (`Add`/`AddExtent` +1,
//! `Drop` -1; extent ops change no count); readers read random tracked
//! extents.
//!
//! **Timestamps** come from one logical clock: a counter bumped with a
//! `SeqCst` `fetch_add` right before and right after each recorded call.
//! All stamps are read-modify-writes of one atomic, so their order is a
//! total order that agrees with happens-before: a call stamped `resp`
//! before another call's `inv` happened before that call (the later stamp
//! reads from the earlier one's release sequence). No clock skew or store
//! buffering can make a call look earlier or later than it ran.
//!
//! **Memory.** The buffers have a fixed capacity, are allocated once per
//! round before the timed phase, and are left out of the live-heap figures
//! ([`Uncounted`]); the check sorts them in place. An adder whose buffer is
//! full stops recording and *cuts* the history at that call's `inv`: reads
//! that returned before the cut are checked (every call they could have
//! seen is recorded), later ones are not. Each reader keeps a uniform
//! sample (reservoir) of its reads made before the cut.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};

use delayed_refs::lincheck::{self, OpRecord, ReadRecord};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

use crate::alloc::Uncounted;
use crate::stats::LinFigures;

/// One extent in this many is tracked.
pub const TRACK_EVERY: usize = 8;

/// Bytes of op records per round, over all adders (about 630,000 records).
const OP_BUDGET_BYTES: usize = 24 << 20;

/// Bytes of read records per round, over all readers (about 260,000 records).
const READ_BUDGET_BYTES: usize = 8 << 20;

/// How many violations a round describes.
const MAX_SAMPLES: usize = 5;

/// An atomic alone on its cache lines.
#[derive(Debug)]
#[repr(align(128))]
struct Padded(AtomicU64);

/// The shared logical clock and the cut.
#[derive(Debug)]
struct Clock {
    now: Padded,
    /// The `inv` stamp of the first call an adder could not record.
    cutoff: Padded,
}

impl Clock {
    fn new() -> Clock {
        Clock { now: Padded(AtomicU64::new(0)), cutoff: Padded(AtomicU64::new(u64::MAX)) }
    }

    /// The next timestamp.
    #[inline]
    fn stamp(&self) -> u64 {
        self.now.0.fetch_add(1, Ordering::SeqCst)
    }

    /// Cut the history at `at` (the earliest cut wins).
    fn cut(&self, at: u64) {
        self.cutoff.0.fetch_min(at, Ordering::SeqCst);
    }

    /// The cut so far (`u64::MAX`: none). A stale value only records reads
    /// that the check then leaves out.
    fn cutoff(&self) -> u64 {
        self.cutoff.0.load(Ordering::Relaxed)
    }
}

/// The tracked bytenrs the readers pick from.
#[derive(Debug)]
struct Targets(Vec<AtomicU64>);

impl Targets {
    fn pick(&self, rng: &mut SmallRng) -> Option<u64> {
        if self.0.is_empty() {
            return None;
        }
        Some(self.0[rng.gen_range(0..self.0.len())].load(Ordering::Relaxed))
    }
}

/// One round's history buffers, clock and base counts.
#[derive(Debug)]
pub struct History {
    clock: Clock,
    targets: Targets,
    /// Per adder: its first entry in `targets`.
    target_bases: Vec<usize>,
    /// Count of each extent when the timed phase starts (absent: 0).
    base: BTreeMap<u64, i64>,
    ops: Uncounted<OpRecord>,
    reads: Uncounted<ReadRecord>,
    op_cap: usize,
    read_cap: usize,
    adders: usize,
    readers: usize,
    seed: u64,
}

impl History {
    /// Buffers for `adders` adders and `readers` readers (none at all for 0
    /// readers: then nothing is recorded or checked). `targets`: the tracked
    /// bytenrs the readers start with; adder `t` publishes a moved slot
    /// `k` (its `k`-th tracked slot) at `targets[target_bases[t] + k]`.
    /// `base`: each extent's count before the timed phase (absent: 0).
    pub fn new(
        adders: usize,
        readers: usize,
        targets: Vec<u64>,
        target_bases: Vec<usize>,
        base: BTreeMap<u64, i64>,
        seed: u64,
    ) -> History {
        let on = readers > 0 && adders > 0 && !targets.is_empty();
        let op_cap = if on { OP_BUDGET_BYTES / size_of::<OpRecord>() / adders } else { 0 };
        let read_cap = if on { READ_BUDGET_BYTES / size_of::<ReadRecord>() / readers } else { 0 };
        History {
            clock: Clock::new(),
            targets: Targets(targets.into_iter().map(AtomicU64::new).collect()),
            target_bases,
            base,
            ops: Uncounted::filled(op_cap * adders, OpRecord::default()),
            reads: Uncounted::filled(read_cap * readers, ReadRecord::default()),
            op_cap,
            read_cap,
            adders,
            readers,
            seed,
        }
    }

    /// One op log per adder and one read log per reader, over disjoint parts
    /// of the buffers.
    pub fn logs(&mut self) -> (Vec<OpLog<'_>>, Vec<ReadLog<'_>>) {
        let (clock, targets, bases) = (&self.clock, &self.targets, &self.target_bases);
        let mut rest: &mut [OpRecord] = &mut self.ops;
        let mut op_logs = Vec::with_capacity(self.adders);
        for t in 0..self.adders {
            let n = self.op_cap.min(rest.len());
            let (buf, tail) = std::mem::take(&mut rest).split_at_mut(n);
            rest = tail;
            let target_base = bases.get(t).copied().unwrap_or(usize::MAX);
            op_logs.push(OpLog { clock, targets, target_base, thread: t, on: !buf.is_empty(), buf, len: 0 });
        }
        let mut rest: &mut [ReadRecord] = &mut self.reads;
        let mut read_logs = Vec::with_capacity(self.readers);
        for r in 0..self.readers {
            let n = self.read_cap.min(rest.len());
            let (buf, tail) = std::mem::take(&mut rest).split_at_mut(n);
            rest = tail;
            let rng = SmallRng::seed_from_u64(self.seed ^ (r as u64 + 1).wrapping_mul(0x94D0_49BB_1331_11EB));
            read_logs.push(ReadLog { clock, targets, on: !buf.is_empty(), buf, len: 0, seen: 0, rng });
        }
        (op_logs, read_logs)
    }

    /// Check the recorded reads: `op_lens[t]` records of adder `t` and
    /// `read_lens[r]` of reader `r` were filled. Returns the figures and the
    /// number of violations.
    pub fn check(&mut self, op_lens: &[usize], read_lens: &[usize]) -> (LinFigures, u64) {
        let mut n = 0;
        for (t, &len) in op_lens.iter().enumerate().take(self.adders) {
            let start = t * self.op_cap;
            self.ops.copy_within(start..start + len.min(self.op_cap), n);
            n += len.min(self.op_cap);
        }
        let cutoff = self.clock.cutoff();
        let mut m = 0;
        for (r, &len) in read_lens.iter().enumerate().take(self.readers) {
            let start = r * self.read_cap;
            for i in start..start + len.min(self.read_cap) {
                let rec = self.reads[i];
                if rec.resp < cutoff {
                    self.reads[m] = rec;
                    m += 1;
                }
            }
        }
        let base = &self.base;
        let v =
            lincheck::check_in_place(|b| base.get(&b).copied().unwrap_or(0), &mut self.ops[..n], &mut self.reads[..m]);
        let figures = LinFigures {
            reads_checked: m as u64,
            ops_recorded: n as u64,
            cut: cutoff != u64::MAX,
            samples: v.iter().take(MAX_SAMPLES).map(|x| x.to_string()).collect(),
        };
        (figures, v.len() as u64)
    }
}

/// One adder's part of the history.
#[derive(Debug)]
pub struct OpLog<'h> {
    clock: &'h Clock,
    targets: &'h Targets,
    target_base: usize,
    thread: usize,
    buf: &'h mut [OpRecord],
    len: usize,
    /// Recording (off once the buffer is full, or with no readers).
    on: bool,
}

impl OpLog<'_> {
    /// Make `call`, which changes the count of the extent at `bytenr` by
    /// `delta` if it succeeds; stamp and record it when `tracked`.
    #[inline]
    pub fn call<T, E>(
        &mut self,
        bytenr: u64,
        delta: i64,
        tracked: bool,
        call: impl FnOnce() -> Result<T, E>,
    ) -> Result<T, E> {
        if !(tracked && self.on) {
            return call();
        }
        let inv = self.clock.stamp();
        let r = call();
        let resp = self.clock.stamp();
        if r.is_ok() {
            if let Some(slot) = self.buf.get_mut(self.len) {
                *slot = OpRecord { bytenr, thread: self.thread, delta, inv, resp };
                self.len += 1;
            } else {
                // Not recorded: reads that returned before `inv` cannot have seen it.
                self.on = false;
                self.clock.cut(inv);
            }
        }
        r
    }

    /// This adder's `k`-th tracked slot now holds the extent at `bytenr`.
    pub fn retarget(&self, k: usize, bytenr: u64) {
        if let Some(t) = self.targets.0.get(self.target_base.saturating_add(k)) {
            t.store(bytenr, Ordering::Relaxed);
        }
    }

    /// Records filled.
    pub fn len(&self) -> usize {
        self.len
    }
}

/// One reader's part of the history.
#[derive(Debug)]
pub struct ReadLog<'h> {
    clock: &'h Clock,
    targets: &'h Targets,
    buf: &'h mut [ReadRecord],
    len: usize,
    /// Reads made while recording (the reservoir's population).
    seen: u64,
    /// Recording (off once the history is cut, or with no buffer).
    on: bool,
    rng: SmallRng,
}

impl ReadLog<'_> {
    /// Read a random tracked extent with `read` (its count, 0 for none);
    /// stamp and record the read if the reservoir samples it. `false` if
    /// there is nothing to read.
    #[inline]
    pub fn read(&mut self, read: impl FnOnce(u64) -> i64) -> bool {
        let Some(bytenr) = self.targets.pick(&mut self.rng) else { return false };
        let slot = if !self.on {
            None
        } else if self.len < self.buf.len() {
            Some(self.len)
        } else {
            let j = self.rng.gen_range(0..=self.seen);
            usize::try_from(j).ok().filter(|&j| j < self.buf.len())
        };
        self.seen += u64::from(self.on);
        let Some(i) = slot else {
            std::hint::black_box(read(bytenr));
            return true;
        };
        let inv = self.clock.stamp();
        let value = read(bytenr);
        let resp = self.clock.stamp();
        if inv >= self.clock.cutoff() {
            self.on = false;
        } else {
            self.buf[i] = ReadRecord { bytenr, inv, resp, value };
            self.len = self.len.max(i + 1);
        }
        true
    }

    /// Records filled.
    pub fn len(&self) -> usize {
        self.len
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_op_log_cuts_the_history() {
        let mut h = History::new(1, 1, vec![4096], vec![0], BTreeMap::new(), 1);
        let cap = h.op_cap;
        let (mut ops, mut reads) = h.logs();
        let (op, rd) = (&mut ops[0], &mut reads[0]);
        assert!(rd.read(|_| 0));
        for _ in 0..cap {
            op.call(4096, 1, true, || Ok::<(), ()>(())).unwrap();
        }
        assert!(rd.read(|_| cap as i64));
        // Untracked, failed and unrecordable calls.
        op.call(4096, 1, false, || Ok::<(), ()>(())).unwrap();
        op.call(4096, 1, true, || Err::<(), ()>(())).unwrap_err();
        op.call(4096, 1, true, || Ok::<(), ()>(())).unwrap();
        assert!(!op.on);
        // A read after the cut is not recorded.
        assert!(rd.read(|_| 0));
        let lens = (vec![op.len()], vec![rd.len()]);
        assert_eq!(lens, (vec![cap], vec![2]));
        drop((ops, reads));
        let (fig, violations) = h.check(&lens.0, &lens.1);
        assert_eq!((fig.reads_checked, fig.ops_recorded, violations), (2, cap as u64, 0));
        assert!(fig.cut);
    }

    #[test]
    fn a_wrong_read_is_reported() {
        let base = BTreeMap::from([(4096, 3)]);
        let mut h = History::new(1, 1, vec![4096], vec![0], base, 1);
        let (mut ops, mut reads) = h.logs();
        ops[0].call(4096, -1, true, || Ok::<(), ()>(())).unwrap();
        reads[0].read(|_| 3);
        reads[0].read(|_| 2);
        let lens = (vec![ops[0].len()], vec![reads[0].len()]);
        drop((ops, reads));
        let (fig, violations) = h.check(&lens.0, &lens.1);
        assert_eq!((fig.reads_checked, violations, fig.cut), (2, 1, false));
        assert!(fig.samples[0].contains("read 3") && fig.samples[0].contains("allowed [2, 2]"), "{:?}", fig.samples);
    }

    #[test]
    fn no_readers_record_nothing() {
        let mut h = History::new(2, 0, vec![4096], vec![0, 0], BTreeMap::new(), 1);
        let (mut ops, reads) = h.logs();
        assert!(reads.is_empty());
        ops[1].call(4096, 1, true, || Ok::<(), ()>(())).unwrap();
        assert_eq!(ops[1].len(), 0);
        ops[1].retarget(0, 8192);
        drop((ops, reads));
        assert_eq!(h.check(&[0, 0], &[]).0.reads_checked, 0);
    }
}
