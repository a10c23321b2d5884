//! Live observability of a running agent: the flow log (verdict events named after pods
//! and rules, the pods' addresses kept in an [`addresses::AddressBook`]), the Prometheus metrics (including the kernel's counters, refreshed by
//! [`kernel::KernelRefresh`]) and the health endpoints that serve them.

pub mod addresses;
pub mod flowlog;
pub mod health;
pub mod inspect;
pub mod kernel;
pub mod metrics;
