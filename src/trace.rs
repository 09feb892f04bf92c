//! Events mirroring the kernel's delayed-ref tracepoints, behind the
//! `tracing` feature. With the feature off every macro expands to nothing.

#![forbid(unsafe_code)]

/// Emit a head event (`add_delayed_ref_head` / `run_delayed_ref_head`).
#[macro_export]
#[doc(hidden)]
macro_rules! trace_head {
    ($name:literal, $bytenr:expr, $num_bytes:expr, $action:expr, $is_data:expr) => {{
        #[cfg(feature = "tracing")]
        ::tracing::trace!(target: "delayed_refs", event = $name, bytenr = $bytenr, num_bytes = $num_bytes,
            action = $action.trace_name(), is_data = $is_data);
    }};
}

/// Emit a ref event (`add_delayed_{tree,data}_ref` / `run_delayed_{tree,data}_ref`).
#[macro_export]
#[doc(hidden)]
macro_rules! trace_ref {
    ($name:literal, $bytenr:expr, $num_bytes:expr, $action:expr, $key:expr, $ref_mod:expr) => {{
        #[cfg(feature = "tracing")]
        ::tracing::trace!(target: "delayed_refs", event = $name, bytenr = $bytenr, num_bytes = $num_bytes,
            action = $action.trace_name(), key = ?$key.key, seq = $key.seq, ref_mod = $ref_mod);
    }};
}
