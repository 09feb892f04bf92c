//! Block reserves, space info and the per-handle reserve (semantics.md §8).

#![forbid(unsafe_code)]

pub mod cell;
pub mod handle;
pub mod reserves;
pub mod state;
