//! Events mirroring the kernel's delayed-ref tracepoints, behind the
//! `tracing` feature.
//!
//! | event name | emitted when | fields |
//! |---|---|---|
//! | `add_delayed_ref_head` | every add call (ref or extent op), after the head update | bytenr, num_bytes, action, is_data |
//! | `run_delayed_ref_head` | a run retires a head | bytenr, num_bytes, action, is_data |
//! | `add_delayed_tree_ref` / `add_delayed_data_ref` | a ref add was queued | see below |
//! | `run_delayed_tree_ref` / `run_delayed_data_ref` | a merged ref was applied to the backend | see below |
//!
//! Ref fields: bytenr, num_bytes, action (the kernel's action names), parent
//! (0 unless shared), ref_root (0 when shared), level (tree refs) or owner
//! and offset (data refs), type (the backref key type), seq, ref_mod.
//! Target: `delayed_refs`, level TRACE.
//!
//! With the feature off every macro expands to an empty block: no code, no
//! argument evaluation (the `tracing_cost` bench measures both builds).

#![forbid(unsafe_code)]

/// Emit a head event: `trace_head!(add|run, bytenr, num_bytes, action, is_data)`.
#[macro_export]
#[doc(hidden)]
macro_rules! trace_head {
    (add, $($arg:expr),+ $(,)?) => {{
        #[cfg(feature = "tracing")]
        $crate::trace::emit::head(false, $($arg),+);
    }};
    (run, $($arg:expr),+ $(,)?) => {{
        #[cfg(feature = "tracing")]
        $crate::trace::emit::head(true, $($arg),+);
    }};
}

/// Emit a ref event: `trace_ref!(add|run, bytenr, num_bytes, action, key, level, ref_mod)`.
#[macro_export]
#[doc(hidden)]
macro_rules! trace_ref {
    (add, $($arg:expr),+ $(,)?) => {{
        #[cfg(feature = "tracing")]
        $crate::trace::emit::node(false, $($arg),+);
    }};
    (run, $($arg:expr),+ $(,)?) => {{
        #[cfg(feature = "tracing")]
        $crate::trace::emit::node(true, $($arg),+);
    }};
}

#[cfg(feature = "tracing")]
#[doc(hidden)]
pub mod emit {
    use crate::domain::key::{NodeKey, RefKey};
    use crate::domain::kind::Action;

    /// `add_delayed_ref_head` / `run_delayed_ref_head`.
    pub fn head(run: bool, bytenr: u64, num_bytes: u64, action: Action, is_data: bool) {
        let action = action.trace_name();
        if run {
            tracing::event!(name: "run_delayed_ref_head", target: "delayed_refs", tracing::Level::TRACE,
                bytenr, num_bytes, action, is_data);
        } else {
            tracing::event!(name: "add_delayed_ref_head", target: "delayed_refs", tracing::Level::TRACE,
                bytenr, num_bytes, action, is_data);
        }
    }

    /// `{add,run}_delayed_{tree,data}_ref`.
    pub fn node(run: bool, bytenr: u64, num_bytes: u64, action: Action, key: NodeKey, level: u8, ref_mod: u64) {
        let action = action.trace_name();
        let ty = key.key.ref_type() as u8;
        let seq = key.seq;
        // (tree?, parent, ref_root, owner, offset) as the tracepoints print them.
        let (tree, parent, ref_root, owner, offset) = match key.key {
            RefKey::TreeBlock { root } => (true, 0, root, 0, 0),
            RefKey::SharedBlock { parent } => (true, parent, 0, 0, 0),
            RefKey::ExtentData { root, objectid, offset } => (false, 0, root, objectid, offset),
            RefKey::SharedData { parent } => (false, parent, 0, 0, 0),
        };
        match (tree, run) {
            (true, true) => {
                tracing::event!(name: "run_delayed_tree_ref", target: "delayed_refs", tracing::Level::TRACE,
                bytenr, num_bytes, action, parent, ref_root, level, r#type = ty, seq, ref_mod)
            }
            (true, false) => {
                tracing::event!(name: "add_delayed_tree_ref", target: "delayed_refs", tracing::Level::TRACE,
                bytenr, num_bytes, action, parent, ref_root, level, r#type = ty, seq, ref_mod)
            }
            (false, true) => {
                tracing::event!(name: "run_delayed_data_ref", target: "delayed_refs", tracing::Level::TRACE,
                bytenr, num_bytes, action, parent, ref_root, owner, offset, r#type = ty, seq, ref_mod)
            }
            (false, false) => {
                tracing::event!(name: "add_delayed_data_ref", target: "delayed_refs", tracing::Level::TRACE,
                bytenr, num_bytes, action, parent, ref_root, owner, offset, r#type = ty, seq, ref_mod)
            }
        }
    }
}
