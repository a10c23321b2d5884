//! Where cluster state comes from. Sources only feed [`crate::state::ClusterState`];
//! they never touch the kernel.
//!
//! - [`local`]: a directory of manifests (the embedded default; no cluster needed).

pub mod local;
pub mod manifest;
