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
