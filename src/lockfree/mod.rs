//! The lock-free implementation.
//!
//! # Implementation details
//!
//! - Heads live inline in a `crossbeam_skiplist::base::SkipList<u64, Head>`
//!   reclaimed by the root's own epoch collector; hot paths use guards, never
//!   refcounted lookups, and never replace a head (protocols.md §g, crossbeam-skiplist rules).
//! - Each head has a lifecycle word (module `state`). Its first four keys'
//!   ref nodes, with signed counts, live in the head itself (module
//!   `inline`); further keys go to one root-level skiplist of all spilled
//!   nodes keyed by (slot = head generation << 1 | range tag, key), with a
//!   late-ADD marker range before each head's node range (modules `head`,
//!   `count`). A common add is one head-index search; creating a head, one
//!   more (the insert's own).
//! - The index-level lifecycle steps are written once against an internal
//!   trait (module `index`), so loom and Miri can run them on a mock index.
//! - Reserves are [`crate::AtomicCell`]s (128-bit CAS loops); counters are striped.
//! - Qgroup records (off by default) sit in a small mutex-protected map:
//!   insert-if-absent per bytenr is all they need (L10), and they are off the
//!   add path unless full accounting is on.
//!
//! # Synchronization
//!
//! See docs/protocols.md for every atomic word's state table and orderings:
//! add vs close (hazard 1), claim vs claim (hazard 2), take vs merge
//! (hazard 3), readers (hazard 4), reserves (hazard 5), inline nodes (§j).

#![forbid(unsafe_code)]

pub(crate) mod count;
mod counters;
#[cfg(not(any(dref_loom, dref_shuttle)))]
mod epoch;
pub(crate) mod head;
pub(crate) mod index;
mod inline;
mod op_slot;
mod retire_seq;
pub(crate) mod root;
mod run;
pub(crate) mod state;
pub(crate) mod store;

#[cfg(not(any(dref_loom, dref_shuttle)))]
pub use root::LockFreeRefs;
