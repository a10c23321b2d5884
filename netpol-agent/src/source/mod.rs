//! Where cluster state comes from. Sources only feed [`netpol_compile::state::ClusterState`];
//! they never touch the kernel.
//!
//! A [`Source`] says when the cluster may have changed and fills a state on request:
//!
//! - [`local::LocalSource`]: a directory of manifests ([`local::ManifestDir`]), polled
//!   (the embedded default; no cluster needed).
//! - [`kube::KubeSource`]: the Kubernetes API ([`kube::ClusterWatch`]: watchers and
//!   reflector stores; the DaemonSet).

pub mod kube;
pub mod local;
pub mod manifest;

use std::future::Future;
use std::path::PathBuf;

use netpol_compile::Diagnostic;
use netpol_compile::state::{Changes, ClusterState};

/// Errors of the sources. Each variant is one metric label ([`Error::kind`]).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("manifest directory {path}: {source}")]
    Manifests {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("kubeconfig {path}: {source}")]
    Kubeconfig {
        path: PathBuf,
        source: ::kube::config::KubeconfigError,
    },
    #[error("no Kubernetes configuration (in-cluster or kubeconfig): {0}")]
    Infer(#[from] ::kube::config::InferConfigError),
    #[error("Kubernetes client: {0}")]
    Client(#[source] ::kube::Error),
    #[error("Kubernetes mode needs this node's name: --node-name or NODE_NAME")]
    NoNodeName,
    #[error("the watchers stopped")]
    WatchersGone,
}

impl Error {
    /// Stable label for metrics and logs.
    pub fn kind(&self) -> &'static str {
        match self {
            Error::Manifests { .. } => "manifests",
            Error::Kubeconfig { .. } | Error::Infer(_) => "config",
            Error::Client(_) => "client",
            Error::NoNodeName => "node_name",
            Error::WatchersGone => "watchers_gone",
        }
    }
}

/// What changed in the cluster, as a source reports it.
#[derive(Debug, Default)]
pub struct Update {
    /// Problems only the source can see (local mode: unreadable files and documents,
    /// missing names, duplicates); the compiler reports the rest.
    pub diagnostics: Vec<Diagnostic>,
    /// The generation to report once this state is in the kernel; `None`: unchanged.
    pub generation: Option<u64>,
    /// The pods, policies and namespaces this snapshot added, updated or deleted in the
    /// state, as far as the source can say.
    pub changes: Changes,
}

/// Where cluster state comes from.
pub trait Source {
    /// Waits (bounded by the source's own poll interval) for the next chance of a change;
    /// `Ok(true)` when the state changed since the last [`Source::snapshot`] and is
    /// complete. Never `true` before the source has a complete view.
    fn changed(&mut self) -> impl Future<Output = Result<bool, Error>> + Send;

    /// Fills `state` (objects and node context).
    fn snapshot(&mut self, state: &mut ClusterState) -> Result<Update, Error>;

    /// Publishes diagnostics that appeared with the last snapshot and compile, or with
    /// the last apply (already logged, see [`crate::reconcile`]), where the source has a
    /// channel for them (Kubernetes Events).
    fn report(&mut self, _new: &[Diagnostic]) {}

    /// When [`Source::changed`] said no: the generation the source reached through
    /// updates that changed nothing it gives (so the state in the kernel is already
    /// that generation's), if it moved. Reported as applied with no compile.
    fn unchanged_generation(&mut self) -> Option<u64> {
        None
    }
}
