//! Adders that share a few hot extents (`hot`, `wide`): the extents are
//! allocated once before the threads start, and each thread adds and later
//! drops refs under its own data keys, keeping a window of live refs.

use std::collections::VecDeque;

use delayed_refs::{Action, DelayedRefs, RefKey, RunMode, TransHandle};

use crate::faults::{self, Outcome, Tree};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

use super::Adder;
use super::history::{OpLog, TRACK_EVERY};
use super::ops::{DATA_BYTES, ROOT, bytenr_of, extent_of, queue_ref};
use crate::oracle::Oracle;

/// The key that keeps every shared extent allocated.
const BASE_KEY: RefKey = RefKey::ExtentData { root: ROOT, objectid: 1, offset: 0 };

/// Allocate `heads` shared extents and run them, so they exist on disk before
/// the adders start. Returns their bytenrs and the oracle of their base refs.
pub fn setup<D: DelayedRefs>(refs: &D, tree: &Tree, heads: usize) -> Result<(Vec<u64>, Oracle), String> {
    let mut trans = TransHandle::new();
    let mut oracle = Oracle::new();
    let bytenrs: Vec<u64> = (0..heads.max(1) as u64).map(|h| bytenr_of(0, h)).collect();
    for &b in &bytenrs {
        queue_ref(refs, &mut trans, Action::Add, b, &BASE_KEY, true)?;
        oracle.add_ref(b, BASE_KEY, 1);
    }
    while let Outcome::Retry = faults::retrying(|| refs.run(tree, RunMode::All))
        .map_err(|e| format!("setup run: {}", crate::out::Chain(&e)))?
    {}
    Ok((bytenrs, oracle))
}

/// Whether the calls on shared head `bytenr` go into the linearizability
/// history: every `TRACK_EVERY`-th head, the first included.
pub fn tracked(bytenr: u64) -> bool {
    extent_of(bytenr) % TRACK_EVERY as u64 == 0
}

/// One adder thread on the shared extents.
#[derive(Debug)]
pub struct SharedAdder {
    owner: u64,
    rng: SmallRng,
    heads: Vec<u64>,
    window: usize,
    /// Live refs in the order they were added (a key may appear twice).
    live: VecDeque<(u64, RefKey)>,
    next: u64,
}

impl SharedAdder {
    /// Adder `tid` over `heads`, keeping about `window` refs live.
    pub fn new(tid: usize, heads: &[u64], window: usize, seed: u64) -> Self {
        let owner = tid as u64 + 1;
        let rng = SmallRng::seed_from_u64(seed ^ owner.wrapping_mul(0xD1B5_4A32_D192_ED03));
        let window = window.max(1);
        SharedAdder { owner, rng, heads: heads.to_vec(), window, live: VecDeque::with_capacity(window + 1), next: 0 }
    }
}

impl Adder for SharedAdder {
    fn step<D: DelayedRefs>(&mut self, refs: &D, trans: &mut TransHandle, log: &mut OpLog<'_>) -> Result<(), String> {
        if self.live.len() >= self.window {
            let (b, key) = self.live[0];
            log.call(b, -1, tracked(b), || queue_ref(refs, trans, Action::Drop, b, &key, false))?;
            self.live.pop_front();
        } else if !self.live.is_empty() && self.rng.gen_range(0..100u32) < 20 {
            // Another ref under a live key: a merge into its node if still queued.
            let (b, key) = self.live[self.rng.gen_range(0..self.live.len())];
            log.call(b, 1, tracked(b), || queue_ref(refs, trans, Action::Add, b, &key, false))?;
            self.live.push_back((b, key));
        } else {
            let b = self.heads[self.rng.gen_range(0..self.heads.len())];
            let key = RefKey::ExtentData { root: ROOT, objectid: 1000 + self.owner, offset: self.next * DATA_BYTES };
            log.call(b, 1, tracked(b), || queue_ref(refs, trans, Action::Add, b, &key, false))?;
            self.next += 1;
            self.live.push_back((b, key));
        }
        Ok(())
    }

    fn expect(&self, oracle: &mut Oracle) {
        for &(b, key) in &self.live {
            oracle.add_ref(b, key, 1);
        }
    }
}
