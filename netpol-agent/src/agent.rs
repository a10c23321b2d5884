//! The agent's run: source → state → compile → datapath, one direction.
//!
//! A [`Source`] ([`crate::source`]) says when the cluster may have changed and fills a [`ClusterState`];
//! the [`Reconciler`] (the control loop) then compiles and applies (the datapath writes
//! only differences) and writes the status file. Every `resync` it also re-checks
//! interfaces, so veths that appear after their pod was declared get their programs;
//! with pods pending it re-checks on every poll. Nothing is applied before the source's
//! first complete state.
//!
//! - Local mode ([`run_local`]): polls the manifest directory (cheap fingerprint every
//!   `poll` interval); the status file's generation is the directory's `.generation`.
//! - Kubernetes mode ([`run_kube`]): watchers feed reflector stores; changes are batched
//!   (debounce, bounded latency); the generation is the highest resourceVersion applied.

use std::path::PathBuf;
use std::sync::Arc;

use tracing::info;

use crate::config::{Config, OnExit};
use crate::datapath::{self, Datapath};
use crate::reconcile::{self, Reconciler};
use crate::source::kube::{self as kube_source, ClusterWatch, KubeSource};
use crate::source::local::LocalSource;
use crate::source::{self, Source};
use crate::telemetry::flowlog::{self, SharedResolver};
use crate::telemetry::health::Health;

/// Errors that stop the agent. Each variant is one metric label.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Datapath(#[from] datapath::Error),
    #[error(transparent)]
    FlowLog(#[from] flowlog::Error),
    #[error(transparent)]
    Source(#[from] source::Error),
    #[error(transparent)]
    Reconcile(#[from] reconcile::Error),
}

/// Runs local mode on the manifest directory `manifests` until `shutdown` resolves;
/// then leaves or removes the kernel state as `config.on_exit` says.
pub async fn run_local(
    config: Config,
    datapath: Datapath,
    manifests: PathBuf,
    health: Arc<Health>,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), Error> {
    let source = LocalSource::new(manifests, config.node_name.clone(), config.poll);
    run(&config, datapath, source, &health, shutdown).await
}

/// How the agent runs in Kubernetes mode, besides [`Config`].
#[derive(Clone, Debug)]
pub struct KubeConfig {
    /// `None`: in-cluster (or `KUBECONFIG`, `~/.kube/config`).
    pub kubeconfig: Option<PathBuf>,
    pub settings: kube_source::Settings,
}

/// Runs Kubernetes mode until `shutdown` resolves. `config.node_name` is required.
pub async fn run_kube(
    config: Config,
    datapath: Datapath,
    kube: KubeConfig,
    health: Arc<Health>,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), Error> {
    let node_name = config.node_name.clone().ok_or(source::Error::NoNodeName)?;
    let client_config = kube_source::config(kube.kubeconfig.as_deref()).await?;
    let watch = ClusterWatch::start(client_config, kube.settings)?;
    let source = KubeSource::new(watch, node_name, config.poll);
    run(&config, datapath, source, &health, shutdown).await
}

/// Loads (or adopts the pinned) programs and maps under `config.bpffs_dir` and sets
/// the unprogrammed default and the pod interface prefixes: everything that needs
/// privileges beyond enforcement's (see [`crate::privileges`]).
pub fn open_datapath(config: &Config) -> Result<Datapath, Error> {
    let mut datapath = Datapath::open(&config.bpffs_dir, &config.capacities)?;
    datapath.set_unprogrammed_default(config.deny_unprogrammed)?;
    datapath.set_pod_interfaces(config.pod_interface_prefixes.clone());
    datapath.set_exit_interfaces(config.exit_interfaces.clone());
    datapath.set_service_mark(config.service_mark)?;
    Ok(datapath)
}

/// Runs the control loop over `source` until `shutdown` resolves; then leaves or removes
/// the kernel state as `config.on_exit` says.
pub async fn run<S: Source>(
    config: &Config,
    datapath: Datapath,
    source: S,
    health: &Health,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), Error> {
    let mut datapath = datapath;
    let resolver = SharedResolver::default();
    let result = match start_flow_log(config, &mut datapath, &resolver, health) {
        Ok(_server) => Reconciler::new(config, source, &mut datapath, &resolver, health)
            .run(shutdown)
            .await
            .map_err(Error::from),
        Err(error) => Err(error),
    };
    health.set_ready(false);
    match config.on_exit {
        OnExit::Keep => datapath.release(),
        OnExit::Detach => datapath.shutdown(),
    }
    result
}

/// Starts the event reader and the flow socket; the server lives as long as the value.
fn start_flow_log(
    config: &Config,
    datapath: &mut Datapath,
    resolver: &SharedResolver,
    health: &Health,
) -> Result<Option<flowlog::Server>, Error> {
    let (Some(path), Some(events)) = (&config.flow_socket, datapath.take_events()) else {
        return Ok(None);
    };
    let feed = flowlog::FlowFeed::new(flowlog::FlowFeed::HISTORY);
    flowlog::spawn_reader(
        events,
        resolver.clone(),
        feed.clone(),
        health.metrics.staged.clone(),
    )?;
    let server = flowlog::Server::start(path, &feed)?;
    info!(socket = %path.display(), "flow log listening");
    Ok(Some(server))
}
