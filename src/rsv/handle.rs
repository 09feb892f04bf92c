//! The per-thread transaction handle state (semantics.md §2.6, lock L11: none needed).

#![forbid(unsafe_code)]

use super::state::RsvState;
use crate::error::{Error, Result};

/// A transaction handle's delayed-ref state. One thread uses a handle at a
/// time, so nothing here is atomic. Obtain one from
/// [`crate::FsReserves::start_transaction`] (backed) or `Default` (unbacked).
#[derive(Debug, Default)]
pub struct TransHandle {
    /// New nodes inserted since the last reserve update (merges do not count).
    pub delayed_ref_updates: u64,
    /// Csum leaves whose deletion became necessary since the last update.
    pub delayed_ref_csum_deletions: u64,
    pub(crate) local: RsvState,
    pub(crate) delayed_refs_bytes_reserved: u64,
    pub(crate) trans_bytes: u64,
}

impl TransHandle {
    /// An unbacked handle (like joining a transaction without reserving).
    pub fn new() -> Self {
        Self::default()
    }

    /// The handle's local delayed-refs reserve.
    pub fn local_rsv(&self) -> RsvState {
        self.local
    }

    /// Bytes that went into the local reserve at start.
    pub fn delayed_refs_bytes_reserved(&self) -> u64 {
        self.delayed_refs_bytes_reserved
    }

    /// Consume `n` backed bytes from the local reserve; a typed error on underflow.
    pub fn use_local(&mut self, n: u64) -> Result<()> {
        match self.local.use_bytes(n) {
            Some(s) => {
                self.local = s;
                Ok(())
            }
            None => Err(Error::RsvUnderflow { what: "handle local reserve", have: self.local.reserved, want: n }),
        }
    }
}
