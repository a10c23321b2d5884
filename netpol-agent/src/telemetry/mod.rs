//! Live observability of a running agent: the flow log (verdict events named after pods
//! and rules), the Prometheus metrics (including the kernel's counters, refreshed by
//! [`kernel::KernelRefresh`]) and the health endpoints that serve them.

pub mod flowlog;
pub mod health;
pub mod inspect;
pub mod kernel;
pub mod metrics;
