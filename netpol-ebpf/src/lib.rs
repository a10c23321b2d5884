//! Marker library so that `netpol-agent` can name this crate as a build dependency
//! (cargo then rebuilds the agent when the programs change). The programs are the
//! `netpol` binary target, built for `bpfel-unknown-none` by the agent's build script.
#![no_std]
