//! netpol agent library: everything the `netpol-agent` binary does, testable.
//!
//! Data flows one way (see docs/ARCHITECTURE.md):
//! [`source`] → [`state`] → [`compile`] (pure) → [`datapath`] (kernel).

pub mod agent;
pub mod compile;
pub mod datapath;
pub mod node;
pub mod preview;
pub mod privileges;
pub mod reconcile;
pub mod source;
pub mod state;
pub mod telemetry;
