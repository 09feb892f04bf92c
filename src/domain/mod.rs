//! Domain types shared by both implementations.

#![forbid(unsafe_code)]

pub mod builders;
pub mod extent_op;
pub mod generic_ref;
pub mod geometry;
pub mod key;
pub mod kind;
pub mod merge;
pub mod qgroup;
pub mod seq;
