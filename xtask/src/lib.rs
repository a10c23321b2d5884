//! Developer tasks for netpol (`cargo xtask …`): a command runner over cargo and the
//! namespace lab (`netpol-lab`): prerequisites, build, demo, test and benchmark
//! orchestration, the conformance runner and the kind runner.

pub mod bench;
pub mod bench_traffic;
pub mod cargo;
pub mod conformance;
pub mod demo;
pub mod fuzz;
pub mod kind;
pub mod matrix;
pub mod prereqs;
pub mod ui;
