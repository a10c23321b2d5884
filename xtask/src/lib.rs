//! Developer tasks for netpol (`cargo xtask …`) and the `lab`: emulated clusters made
//! of network namespaces, shared by the demo, the tier-3 tests, the conformance runner
//! and the benchmarks.

pub mod bench_traffic;
pub mod cargo;
pub mod conformance;
pub mod demo;
pub mod fuzz;
pub mod kind;
pub mod lab;
pub mod matrix;
pub mod prereqs;
pub mod ui;
