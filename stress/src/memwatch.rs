//! Live heap memory over time during `stress`: a sampler thread reads the
//! counting allocator ([`crate::alloc`]) every [`TICK`], keeps each
//! implementation's peak and a time series, and prints a `mem` line to
//! stderr at a fixed interval (above the progress bar when one is shown).
//!
//! The series is allocated up front for the expected length of the run, so
//! the sampler itself does not make the heap grow while it watches it.

use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use indicatif::ProgressBar;
use serde::Serialize;

use crate::alloc;

/// How often the sampler reads the live bytes (and updates the peaks).
pub const TICK: Duration = Duration::from_millis(50);

/// Every how many ticks a reading is kept in the series.
const KEEP_EVERY: u64 = 2;

/// Series capacity beyond the expected run length, in kept samples.
const SLACK: usize = 2400;

/// Bytes in a MiB.
const MIB: f64 = 1024.0 * 1024.0;

/// One kept reading.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Sample {
    /// Seconds since the watch started.
    pub t: f64,
    /// Live heap bytes.
    pub live: i64,
    /// The implementation whose round was running, by index.
    pub impl_idx: usize,
    /// That round's number (from 1).
    pub round: usize,
}

/// What is running now.
#[derive(Clone, Copy, Debug)]
struct Phase {
    impl_idx: usize,
    name: &'static str,
    round: usize,
    rounds: usize,
}

#[derive(Debug)]
struct State {
    stop: bool,
    phase: Option<Phase>,
    bar: Option<ProgressBar>,
    series: Vec<Sample>,
    peaks: Vec<i64>,
    dropped: u64,
}

#[derive(Debug)]
struct Shared {
    state: Mutex<State>,
    wake: Condvar,
    start: Instant,
    print_every: Duration,
    /// Print above the progress bar (else plain stderr).
    via_bar: bool,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The sampler thread and its findings.
#[derive(Debug)]
pub struct MemWatch {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

/// What the watch saw, once stopped.
#[derive(Clone, Debug)]
pub struct Watched {
    /// Kept readings, in time order.
    pub series: Vec<Sample>,
    /// Per implementation: the highest reading while its rounds ran.
    pub peaks: Vec<i64>,
}

fn mib(b: i64) -> f64 {
    b as f64 / MIB
}

/// The `mem` line for one reading.
fn line(t: f64, live: i64, phase: Option<Phase>) -> String {
    match phase {
        Some(p) => format!("mem t={t:.1}s live={:.1} MiB ({} round {}/{})", mib(live), p.name, p.round, p.rounds),
        None => format!("mem t={t:.1}s live={:.1} MiB", mib(live)),
    }
}

fn emit(shared: &Shared, bar: Option<ProgressBar>, text: &str) {
    match bar {
        Some(b) if shared.via_bar && !b.is_hidden() => b.println(text),
        _ => eprintln!("{text}"),
    }
}

fn sampler(shared: &Shared) {
    let mut tick: u64 = 0;
    let mut next_print = Duration::ZERO;
    let mut st = shared.lock();
    loop {
        let now = shared.start.elapsed();
        let live = alloc::live_bytes();
        let t = now.as_secs_f64();
        if let Some(p) = st.phase {
            st.peaks[p.impl_idx] = st.peaks[p.impl_idx].max(live);
            if tick % KEEP_EVERY == 0 {
                if st.series.len() < st.series.capacity() {
                    st.series.push(Sample { t, live, impl_idx: p.impl_idx, round: p.round });
                } else {
                    st.dropped += 1;
                }
            }
        }
        tick += 1;
        let due = now >= next_print;
        if due || st.stop {
            let text = line(t, live, st.phase);
            let bar = st.bar.clone();
            let stop = st.stop;
            drop(st);
            emit(shared, bar, &if stop { format!("{text} (end)") } else { text });
            if stop {
                return;
            }
            while next_print <= now {
                next_print += shared.print_every;
            }
            st = shared.lock();
        }
        if st.stop {
            continue;
        }
        st = shared.wake.wait_timeout(st, TICK).unwrap_or_else(|e| e.into_inner()).0;
    }
}

impl MemWatch {
    /// Start sampling for `impls` implementations over a run expected to
    /// last about `expected`; print a line every `print_every`, above the
    /// progress bars when `via_bar`.
    pub fn start(impls: usize, expected: Duration, print_every: Duration, via_bar: bool) -> MemWatch {
        let kept_per_sec = 1.0 / (TICK.as_secs_f64() * KEEP_EVERY as f64);
        // Checks and drains run beyond the timed seconds: room for half as much again.
        let cap = (expected.as_secs_f64() * 1.5 * kept_per_sec) as usize + SLACK;
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                stop: false,
                phase: None,
                bar: None,
                series: Vec::with_capacity(cap),
                peaks: vec![i64::MIN; impls],
                dropped: 0,
            }),
            wake: Condvar::new(),
            start: Instant::now(),
            print_every: print_every.max(TICK),
            via_bar,
        });
        let s = Arc::clone(&shared);
        let thread = std::thread::Builder::new()
            .name("memwatch".into())
            .spawn(move || sampler(&s))
            .expect("spawn the memory sampler");
        MemWatch { shared, thread: Some(thread) }
    }

    /// From now on readings belong to round `round` of `rounds` of
    /// implementation `impl_idx` (`name`), whose progress bar is `bar`.
    pub fn enter(&self, impl_idx: usize, name: &'static str, round: usize, rounds: usize, bar: &ProgressBar) {
        let mut st = self.shared.lock();
        st.phase = Some(Phase { impl_idx, name, round, rounds });
        st.bar = Some(bar.clone());
    }

    /// Readings from now on belong to no implementation.
    pub fn leave(&self) {
        let mut st = self.shared.lock();
        st.phase = None;
        st.bar = None;
    }

    /// Stop the sampler (it prints a last line) and hand over what it saw.
    pub fn finish(mut self) -> Watched {
        self.shared.lock().stop = true;
        self.shared.wake.notify_all();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let mut st = self.shared.lock();
        if st.dropped > 0 {
            eprintln!("memwatch: series full, {} readings not kept (peaks still cover them)", st.dropped);
        }
        Watched { series: std::mem::take(&mut st.series), peaks: std::mem::take(&mut st.peaks) }
    }
}

impl Drop for MemWatch {
    fn drop(&mut self) {
        if let Some(t) = self.thread.take() {
            self.shared.lock().stop = true;
            self.shared.wake.notify_all();
            let _ = t.join();
        }
    }
}

/// Relative tolerance of the in-round comparison. The locked port's backlog
/// of pending refs moves by a third or more from one second to the next on
/// `spread`; a 25% tolerance flagged 5-8 of 20 rounds.
pub const ROUND_REL: f64 = 0.5;
/// Absolute tolerance of the in-round comparison, in bytes.
pub const ROUND_GROW_ABS: i64 = 8 << 20;
/// Fewest readings for a round to be checked (0.9 s).
pub const ROUND_MIN_READINGS: usize = 9;
/// Tolerance of the across-rounds comparisons, in bytes.
pub const ACROSS_ABS: i64 = 1 << 20;

/// How the flatness verdict is defined (printed with it).
pub const FLAT_DEFINITION: &str = "flat = (1) in fewer than half of the rounds with >= 9 readings (every 100 ms) \
the median of the round's last third of readings exceeds the median of its middle third by more than \
max(50% of it, 8 MiB) (none, if one round was checked): within a round memory levels off; (2) after each round's \
final run(All) + reclaim(), the root holds at most 1 MiB beyond its fresh size (retained: what dropping it \
released, less what creating it took); (3) between rounds, once a round's root, tree and threads are gone \
(floor), live bytes grow by at most 1 MiB from the first round to the last. end_grow (the live bytes after \
run(All) + reclaim(), extent tree and oracle included, last round less first) is shown, not judged";

/// The flatness verdict of one implementation.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Flatness {
    /// Readings of this implementation.
    pub samples: usize,
    /// Rounds with enough readings for the in-round comparison.
    pub rounds_checked: usize,
    /// Checked rounds whose last third exceeded their middle third.
    pub rounds_growing: usize,
    /// Largest last-third less middle-third median over checked rounds.
    pub max_in_round_growth_bytes: i64,
    /// Largest `mem_root_retained_bytes` of a round.
    pub max_root_retained_bytes: i64,
    /// End-of-round live bytes, last round less first round (shown, not
    /// judged: they include the extent tree and the oracle, which differ
    /// from round to round).
    pub end_growth_bytes: i64,
    /// Between-rounds live bytes, last round less first round.
    pub floor_growth_bytes: i64,
    /// The verdict.
    pub flat: bool,
}

/// The median live bytes of `s` (0 when empty).
fn median(s: &[Sample]) -> i64 {
    let mut v: Vec<i64> = s.iter().map(|x| x.live).collect();
    v.sort_unstable();
    match v.len() {
        0 => 0,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2,
    }
}

/// Last less first (0 for fewer than two values).
fn growth(v: &[i64]) -> i64 {
    match (v.first(), v.last()) {
        (Some(f), Some(l)) if v.len() > 1 => l - f,
        _ => 0,
    }
}

/// Per round of one implementation: its readings, with end, floor and
/// retained bytes in round order.
#[derive(Clone, Copy, Debug)]
pub struct RoundMem<'a> {
    /// End-of-round live bytes per round.
    pub ends: &'a [i64],
    /// Between-rounds live bytes per round.
    pub floors: &'a [i64],
    /// Root-retained bytes per round.
    pub retained: &'a [i64],
}

/// The verdict for implementation `impl_idx` from the series and its
/// per-round figures.
pub fn flatness(series: &[Sample], impl_idx: usize, rounds: RoundMem<'_>) -> Flatness {
    let mine: Vec<Sample> = series.iter().copied().filter(|s| s.impl_idx == impl_idx).collect();
    let (mut checked, mut growing, mut worst) = (0, 0, i64::MIN);
    let mut i = 0;
    while i < mine.len() {
        let r = mine[i].round;
        let n = mine[i..].iter().take_while(|s| s.round == r).count();
        let round = &mine[i..i + n];
        i += n;
        if n < ROUND_MIN_READINGS {
            continue;
        }
        let (mid, last) = (median(&round[n / 3..2 * n / 3]), median(&round[2 * n / 3..]));
        let tol = ((mid as f64 * ROUND_REL) as i64).max(ROUND_GROW_ABS);
        checked += 1;
        worst = worst.max(last - mid);
        if last - mid > tol {
            growing += 1;
        }
    }
    let retained = rounds.retained.iter().copied().max().unwrap_or(0);
    let (end_growth, floor_growth) = (growth(rounds.ends), growth(rounds.floors));
    Flatness {
        samples: mine.len(),
        rounds_checked: checked,
        rounds_growing: growing,
        max_in_round_growth_bytes: if checked > 0 { worst } else { 0 },
        max_root_retained_bytes: retained,
        end_growth_bytes: end_growth,
        floor_growth_bytes: floor_growth,
        flat: 2 * growing < checked.max(1) && retained <= ACROSS_ABS && floor_growth <= ACROSS_ABS,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `rounds` rounds of 30 readings each: a rise to a plateau, plus
    /// `grow` bytes per reading for ever.
    fn rounds(rounds: usize, grow: i64) -> Vec<Sample> {
        let mut v = Vec::new();
        for r in 0..rounds {
            for k in 0..30i64 {
                let t = (r * 30) as f64 * 0.1 + k as f64 * 0.1;
                let live = (10 << 20) + k.min(5) * (4 << 20) + grow * k;
                v.push(Sample { t, live, impl_idx: 0, round: r + 1 });
            }
        }
        v
    }

    const QUIET: RoundMem<'static> = RoundMem { ends: &[5, 5, 5], floors: &[7, 7, 7], retained: &[0, 0, 0] };

    #[test]
    fn a_plateau_is_flat_and_a_ramp_is_not() {
        let f = flatness(&rounds(3, 0), 0, QUIET);
        assert!(f.flat && f.rounds_checked == 3 && f.rounds_growing == 0, "{f:?}");
        let f = flatness(&rounds(3, 8 << 20), 0, QUIET);
        assert!(!f.flat && f.rounds_growing == 3, "{f:?}");
        let f = flatness(&rounds(1, 8 << 20), 0, RoundMem { ends: &[5], floors: &[7], retained: &[0] });
        assert!(!f.flat, "a single growing round: {f:?}");
    }

    #[test]
    fn round_figures_count() {
        let s = rounds(3, 0);
        let f = flatness(&s, 0, RoundMem { ends: &[0, 64 << 20], floors: &[7, 7], retained: &[0, 0] });
        assert!(f.flat && f.end_growth_bytes == 64 << 20, "end growth is not judged: {f:?}");
        let f = flatness(&s, 0, RoundMem { ends: &[5, 5], floors: &[7, 2 << 20], retained: &[0, 0] });
        assert!(!f.flat, "floor growth: {f:?}");
        let f = flatness(&s, 0, RoundMem { ends: &[5, 5], floors: &[7, 7], retained: &[0, 100 << 20] });
        assert!(!f.flat && f.max_root_retained_bytes == 100 << 20, "retained: {f:?}");
    }

    #[test]
    fn other_implementations_and_short_rounds_do_not_count() {
        let mut s = rounds(2, 0);
        s.push(Sample { t: 99.0, live: 1 << 40, impl_idx: 1, round: 1 });
        assert!(flatness(&s, 0, QUIET).flat);
        let f = flatness(&s, 1, QUIET);
        assert_eq!((f.samples, f.rounds_checked), (1, 0));
        assert!(f.flat);
    }

    #[test]
    fn the_watch_samples_and_stops() {
        let w = MemWatch::start(1, Duration::from_secs(1), Duration::from_secs(60), false);
        w.enter(0, "locked", 1, 1, &ProgressBar::hidden());
        std::thread::sleep(TICK * 5);
        w.leave();
        let seen = w.finish();
        assert!(!seen.series.is_empty());
        assert!(seen.peaks[0] > 0);
    }
}
