//! The agent's control loop: source → state → compile → datapath, one direction.
//!
//! Local mode polls the manifest directory (cheap fingerprint every `poll` interval) and
//! re-applies on change; every `resync` it also re-checks interfaces, so veths that
//! appear after their pod was declared get their programs.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use serde::Serialize;
use tracing::{debug, info, warn};

use crate::compile::{self, Allocations, Compiled};
use crate::datapath::{self, Capacities, Datapath, interfaces};
use crate::flowlog::{self, Resolver, SharedResolver};
use crate::source::local::{Fingerprint, LocalSource};
use crate::state::{ClusterState, NodeContext};

/// Errors that stop the agent. Each variant is one metric label.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Datapath(#[from] datapath::Error),
    #[error(transparent)]
    FlowLog(#[from] flowlog::Error),
    #[error("manifest directory {path}: {source}")]
    Manifests {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("status file {path}: {source}")]
    Status {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// How the agent runs in local mode.
#[derive(Clone, Debug)]
pub struct LocalConfig {
    pub manifests: PathBuf,
    pub bpffs_dir: PathBuf,
    pub status_file: Option<PathBuf>,
    /// Unix socket serving the flow log (`netpol-agent flows`); `None`: no flow log.
    pub flow_socket: Option<PathBuf>,
    pub node_name: Option<String>,
    pub capacities: Capacities,
    /// What a clean exit (SIGTERM, Ctrl-C) does to the kernel state.
    pub on_exit: OnExit,
    pub poll: Duration,
    pub resync: Duration,
}

/// What happens to programs, links and maps when the agent exits cleanly.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum OnExit {
    /// Keep them pinned and attached: policies stay enforced while the agent is away
    /// (restarts, upgrades), and the next agent adopts them without a gap.
    #[default]
    Keep,
    /// Detach from every interface and remove every pinned object (uninstall).
    Detach,
}

/// What the agent has put into the kernel, written to `--status-file` after each apply.
#[derive(Clone, Debug, Default, Serialize, PartialEq, Eq)]
pub struct Status {
    /// `.generation` of the manifest set now in the kernel (0 when there is none).
    pub generation: u64,
    pub endpoints: usize,
    pub policies: usize,
    pub invalid: usize,
    pub attached: usize,
    pub pending: Vec<String>,
}

/// Runs local mode until `shutdown` resolves; then leaves or removes the kernel state
/// as `config.on_exit` says.
pub async fn run_local(
    config: LocalConfig,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), Error> {
    let mut source = LocalSource::new(&config.manifests);
    let mut datapath = Datapath::open(&config.bpffs_dir, &config.capacities)?;
    let resolver = SharedResolver::default();
    let result = match start_flow_log(&config, &mut datapath, &resolver) {
        Ok(_server) => {
            reconcile_loop(&config, &mut source, &mut datapath, &resolver, shutdown).await
        }
        Err(error) => Err(error),
    };
    match config.on_exit {
        OnExit::Keep => datapath.release(),
        OnExit::Detach => datapath.shutdown(),
    }
    result
}

/// Starts the event reader and the flow socket; the server lives as long as the value.
fn start_flow_log(
    config: &LocalConfig,
    datapath: &mut Datapath,
    resolver: &SharedResolver,
) -> Result<Option<flowlog::Server>, Error> {
    let (Some(path), Some(events)) = (&config.flow_socket, datapath.take_events()) else {
        return Ok(None);
    };
    let (sender, _) = tokio::sync::broadcast::channel(4096);
    flowlog::spawn_reader(events, resolver.clone(), sender.clone())?;
    let server = flowlog::Server::start(path, &sender)?;
    info!(socket = %path.display(), "flow log listening");
    Ok(Some(server))
}

async fn reconcile_loop(
    config: &LocalConfig,
    source: &mut LocalSource,
    datapath: &mut Datapath,
    resolver: &SharedResolver,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), Error> {
    tokio::pin!(shutdown);
    let mut state = ClusterState::default();
    let mut allocations = Allocations::default();
    let mut compiled = Compiled::default();
    let mut fingerprint: Option<Fingerprint> = None;
    let mut generation = 0;
    let mut reported: BTreeSet<String> = BTreeSet::new();
    let mut last_resync = Instant::now();
    let mut status = Status::default();
    let mut ticker = tokio::time::interval(config.poll);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = &mut shutdown => return Ok(()),
            _ = ticker.tick() => {}
        }
        let manifests_error = |source| Error::Manifests {
            path: config.manifests.clone(),
            source,
        };
        let current = source.fingerprint().map_err(manifests_error)?;
        let changed = fingerprint.as_ref() != Some(&current);
        if !changed && last_resync.elapsed() < config.resync && status.pending.is_empty() {
            continue;
        }
        last_resync = Instant::now();
        if changed {
            let started = Instant::now();
            let snapshot = source.read().map_err(manifests_error)?;
            fingerprint = Some(current);
            state.node = NodeContext {
                name: config.node_name.clone(),
                ips: interfaces::node_addresses().unwrap_or_else(|error| {
                    warn!(%error, "cannot list node addresses");
                    Vec::new()
                }),
            };
            let (mut diagnostics, new_generation) = snapshot.into_state(&mut state);
            compiled = compile::compile(&state, &allocations);
            allocations = compiled.allocations.clone();
            diagnostics.extend(compiled.diagnostics.iter().cloned());
            let messages: BTreeSet<String> = diagnostics.iter().map(ToString::to_string).collect();
            for message in messages.difference(&reported) {
                warn!("invalid object: {message}");
            }
            reported = messages;
            generation = new_generation.unwrap_or(generation);
            let report = datapath.apply(&compiled)?;
            if let Ok(mut current) = resolver.write() {
                *current = std::sync::Arc::new(Resolver::new(&state, &compiled));
            }
            info!(
                generation,
                pods = state.pods.len(),
                policies = state.policies.len(),
                endpoints = compiled.local_pods.len(),
                invalid = reported.len(),
                map_writes = report.maps.writes(),
                attached = report.attached.len(),
                detached = report.detached.len(),
                elapsed_ms = started.elapsed().as_secs_f64() * 1e3,
                "applied"
            );
            status = Status {
                generation,
                endpoints: compiled.local_pods.len(),
                policies: state.policies.len(),
                invalid: reported.len(),
                attached: datapath.attached().count(),
                pending: report.pending,
            };
        } else {
            let report = datapath.apply(&compiled)?;
            if !report.attached.is_empty() || !report.detached.is_empty() {
                info!(attached = ?report.attached, detached = ?report.detached, "interfaces changed");
            }
            debug!(pending = report.pending.len(), "resync");
            status.attached = datapath.attached().count();
            status.pending = report.pending;
        }
        if let Some(path) = &config.status_file {
            write_status(path, &status).map_err(|source| Error::Status {
                path: path.clone(),
                source,
            })?;
        }
    }
}

/// Writes the status atomically (temporary file, then rename).
fn write_status(path: &std::path::Path, status: &Status) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    let json = serde_json::to_vec_pretty(status).map_err(std::io::Error::other)?;
    std::fs::write(&tmp, json)?;
    std::fs::rename(&tmp, path)
}
