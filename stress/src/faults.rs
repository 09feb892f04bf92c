//! `--faults N`: the extent tree every workload runs on is a
//! [`FaultyTree`] over the strict in-memory tree; with `N > 0` about one
//! backend call in `N` fails, one in `7N` panics and one in `N` pauses
//! (`FaultConfig::every`). Runners, readers and the final drain retry what
//! the contract says to retry, so a round still ends with 0 lost / 0
//! doubled; a stall is caught by a watchdog that dumps the claimed heads.

use std::panic::{AssertUnwindSafe, catch_unwind, resume_unwind};
use std::sync::mpsc;
use std::time::Duration;

use delayed_refs::{DelayedRefs, Error, FaultConfig, FaultyTree, InjectedPanic, Recovery};

use crate::backend::{Backend, BackendKind};

/// The extent tree of the stress workloads.
pub type Tree = FaultyTree<Backend>;

/// A fresh tree of `kind` injecting faults in about one call in `faults`
/// (0: none), and stalling at call `stall_at` (0: never).
pub fn new_tree(kind: BackendKind, faults: u64, stall_at: u64) -> Tree {
    FaultyTree::new(Backend::new(kind), FaultConfig { stall_at, ..FaultConfig::every(faults) })
}

/// What one call under faults came to.
pub enum Outcome<T> {
    /// It returned.
    Done(T),
    /// An injected fault stopped it; nothing was lost, try again.
    Retry,
}

/// Call `f`, turning what fault injection causes into [`Outcome::Retry`]:
/// an error whose recovery is `Retry` and an injected panic (caught). Other
/// errors are returned; a real panic goes on.
pub fn retrying<T>(f: impl FnOnce() -> delayed_refs::Result<T>) -> Result<Outcome<T>, Error> {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(Ok(v)) => Ok(Outcome::Done(v)),
        Ok(Err(e)) if e.recovery() == Recovery::Retry => Ok(Outcome::Retry),
        Ok(Err(e)) => Err(e),
        Err(p) if p.downcast_ref::<InjectedPanic>().is_some() => Ok(Outcome::Retry),
        Err(p) => resume_unwind(p),
    }
}

/// The heads a runner holds, for a stall report.
pub fn claimed_heads<D: DelayedRefs>(refs: &D) -> String {
    let claimed: Vec<String> = refs
        .snapshot()
        .iter()
        .filter(|h| h.processing)
        .take(16)
        .map(|h| {
            format!(
                "  head {:#x}: ref_mod {}, {} nodes, op {}",
                h.bytenr,
                h.ref_mod,
                h.nodes.len(),
                h.extent_op.is_some()
            )
        })
        .collect();
    let c = refs.counters();
    format!(
        "counters: {} heads ({} ready), {} entries; claimed heads{}:\n{}",
        c.num_heads,
        c.num_heads_ready,
        c.num_entries,
        if claimed.len() == 16 { " (first 16)" } else { "" },
        if claimed.is_empty() { "  none".to_string() } else { claimed.join("\n") }
    )
}

/// Run `f`; if it has not returned after `limit`, print `what` and `dump()`
/// on stderr and end the process with exit code 3 (a stall is a failure,
/// never a hang).
pub fn watchdog<T>(what: &str, limit: Duration, dump: impl Fn() -> String + Sync, f: impl FnOnce() -> T) -> T {
    std::thread::scope(|s| {
        let (done, wait) = mpsc::channel::<()>();
        let dump = &dump;
        s.spawn(move || {
            if wait.recv_timeout(limit) == Err(mpsc::RecvTimeoutError::Timeout) {
                eprintln!("stress: stall: {what} did not finish within {limit:?}\n{}", dump());
                std::process::exit(3);
            }
        });
        let out = f();
        // The watchdog ends either way: by the message or by the disconnect.
        drop(done);
        out
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retrying_sorts_faults_from_real_errors() {
        InjectedPanic::silence_reports();
        let io = std::io::Error::other("gone");
        let storage = Error::Backend { bytenr: 1, source: delayed_refs::ExtentError::storage(io) };
        assert!(matches!(retrying::<()>(|| Err(storage.clone())), Ok(Outcome::Retry)));
        let corrupt = Error::TreeRefMod { bytenr: 1, key: delayed_refs::RefKey::TreeBlock { root: 5 }, ref_mod: 2 };
        assert!(matches!(retrying::<()>(|| Err(corrupt.clone())), Err(e) if e == corrupt));
        assert!(matches!(retrying::<()>(|| std::panic::panic_any(InjectedPanic { call: 1 })), Ok(Outcome::Retry)));
        assert!(matches!(retrying(|| Ok(7)), Ok(Outcome::Done(7))));
        let real = catch_unwind(|| retrying::<()>(|| panic!("a real bug")));
        assert!(real.is_err(), "a real panic is not swallowed");
    }

    #[test]
    fn watchdog_returns_what_finishes() {
        assert_eq!(watchdog("a quick job", Duration::from_secs(5), String::new, || 42), 42);
    }
}
