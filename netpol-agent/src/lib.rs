//! netpol agent library: everything the `netpol-agent` binary does, testable.
//!
//! Data flows one way (see docs/ARCHITECTURE.md):
//! [`source`] → [`netpol_compile::state`] → [`netpol_compile`] (pure, its own crate) →
//! [`datapath`] (kernel).

pub mod agent;
pub mod config;
pub mod datapath;
pub mod node;
pub mod preview;
pub mod privileges;
pub mod reconcile;
pub mod source;
pub mod telemetry;

/// jemalloc's options, for the agent's binary and for the control bench that measures the
/// agent's work in its own process (each exports them as `_rjem_malloc_conf`): pages
/// freed are given back to the kernel at once, so a compile's or a page's transient memory
/// does not stay resident; a compile pays for it in page faults (docs/BENCHMARKS.md,
/// stops 41 and 45).
pub const JEMALLOC_OPTIONS: &std::ffi::CStr = c"dirty_decay_ms:0,muzzy_decay_ms:0";
