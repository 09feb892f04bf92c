//! Block reserves, space info and the per-handle reserve (spec §3.20).

#![forbid(unsafe_code)]

pub mod cell;
pub mod handle;
pub mod reserves;
pub mod state;
