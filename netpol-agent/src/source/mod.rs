//! Where cluster state comes from. Sources only feed [`netpol_compile::state::ClusterState`];
//! they never touch the kernel.
//!
//! - [`local`]: a directory of manifests (the embedded default; no cluster needed).
//! - [`kube`]: the Kubernetes API (watchers and reflector stores; the DaemonSet).

pub mod kube;
pub mod local;
pub mod manifest;
