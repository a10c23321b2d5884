//! The agent's control loop: source → state → compile → datapath, one direction.
//!
//! A [`Source`] says when the cluster may have changed and fills a [`ClusterState`];
//! the loop then compiles and applies (the datapath writes only differences) and writes
//! the status file. Every `resync` it also re-checks interfaces, so veths that appear
//! after their pod was declared get their programs; with pods pending it re-checks on
//! every poll. Nothing is applied before the source's first complete state.
//!
//! - Local mode ([`run_local`]): polls the manifest directory (cheap fingerprint every
//!   `poll` interval); the status file's generation is the directory's `.generation`.
//! - Kubernetes mode ([`run_kube`]): watchers feed reflector stores; changes are batched
//!   (debounce, bounded latency); the generation is the highest resourceVersion applied.

use std::collections::BTreeSet;
use std::future::Future;
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Serialize;
use tracing::{debug, info, warn};

use crate::datapath::{self, Capacities, Datapath, interfaces};
use crate::flowlog::{self, Resolver, SharedResolver};
use crate::health::Health;
use crate::source::kube::{self as kube_source, KubeSource};
use crate::source::local::{Fingerprint, ManifestDir};
use netpol_compile::state::{ClusterState, NodeContext};
use netpol_compile::{Compiled, Compiler, Diagnostic, Kind, ObjectName, Subject};

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
    #[error(transparent)]
    Kube(#[from] kube_source::Error),
    #[error("status file {path}: {source}")]
    Status {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// How the agent runs, whatever the source.
#[derive(Clone, Debug)]
pub struct Config {
    pub bpffs_dir: PathBuf,
    pub status_file: Option<PathBuf>,
    /// Unix socket serving the flow log (`netpol-agent flows`); `None`: no flow log.
    pub flow_socket: Option<PathBuf>,
    pub node_name: Option<String>,
    pub capacities: Capacities,
    /// What a clean exit (SIGTERM, Ctrl-C) does to the kernel state.
    pub on_exit: OnExit,
    /// Audit mode for every pod: would-be drops are logged and counted, not dropped.
    pub audit: bool,
    /// Traffic on an attached interface whose pod is not programmed yet is dropped
    /// (`true`) or passed unjudged.
    pub deny_unprogrammed: bool,
    /// Interfaces named with one of these prefixes get the programs when they appear.
    pub pod_interface_prefixes: Vec<String>,
    /// Longest wait for a change before the loop looks at interfaces again.
    pub poll: Duration,
    pub resync: Duration,
}

/// What the agent has put into the kernel, written to `--status-file` after each apply.
#[derive(Clone, Debug, Default, Serialize, PartialEq, Eq)]
pub struct Status {
    /// `.generation` of the manifest set now in the kernel (0 when there is none); in
    /// Kubernetes mode the highest resourceVersion of the objects in the kernel.
    pub generation: u64,
    pub endpoints: usize,
    pub policies: usize,
    pub invalid: usize,
    pub attached: usize,
    pub pending: Vec<String>,
}

/// What changed in the cluster, as a source reports it.
#[derive(Debug, Default)]
pub struct Update {
    /// Problems only the source can see (local mode: unreadable files and documents,
    /// missing names, duplicates); the compiler reports the rest.
    pub diagnostics: Vec<Diagnostic>,
    /// The generation to report once this state is in the kernel; `None`: unchanged.
    pub generation: Option<u64>,
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
    /// the last apply (already logged, see [`Reporter`]), where the source has a channel
    /// for them (Kubernetes Events).
    fn report(&mut self, _new: &[Diagnostic]) {}
}

/// The one place diagnostics of the source and the compiler leave the agent: each
/// distinct one is logged once while it lasts and handed to [`Source::report`] (Events
/// in Kubernetes mode); their number is the `invalid_objects` metric and the status
/// file's `invalid`.
#[derive(Default)]
struct Reporter {
    /// The messages of the current diagnostics.
    current: BTreeSet<String>,
}

impl Reporter {
    /// Publishes `diagnostics` (those of one snapshot and its compile); returns how many
    /// distinct ones there are.
    fn publish<'a, S: Source>(
        &mut self,
        diagnostics: impl IntoIterator<Item = &'a Diagnostic>,
        source: &mut S,
        health: &Health,
    ) -> usize {
        let mut messages = BTreeSet::new();
        let mut new = Vec::new();
        for diagnostic in diagnostics {
            let message = diagnostic.to_string();
            if !self.current.contains(&message) && !messages.contains(&message) {
                warn!("invalid object: {message}");
                new.push(diagnostic.clone());
            }
            messages.insert(message);
        }
        source.report(&new);
        self.current = messages;
        health
            .metrics
            .invalid_objects
            .set(self.current.len() as i64);
        self.current.len()
    }
}

/// Local mode: the manifest directory, polled.
pub struct LocalManifests {
    source: ManifestDir,
    node_name: Option<String>,
    ticker: tokio::time::Interval,
    fingerprint: Option<Fingerprint>,
    current: Option<Fingerprint>,
}

impl LocalManifests {
    pub fn new(dir: impl Into<PathBuf>, node_name: Option<String>, poll: Duration) -> Self {
        let mut ticker = tokio::time::interval(poll);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        LocalManifests {
            source: ManifestDir::new(dir),
            node_name,
            ticker,
            fingerprint: None,
            current: None,
        }
    }

    fn error(&self, source: std::io::Error) -> Error {
        Error::Manifests {
            path: self.source.dir().to_path_buf(),
            source,
        }
    }
}

impl Source for LocalManifests {
    async fn changed(&mut self) -> Result<bool, Error> {
        self.ticker.tick().await;
        let current = self.source.fingerprint().map_err(|e| self.error(e))?;
        let changed = self.fingerprint.as_ref() != Some(&current);
        self.current = Some(current);
        Ok(changed)
    }

    fn snapshot(&mut self, state: &mut ClusterState) -> Result<Update, Error> {
        let snapshot = self.source.read().map_err(|e| self.error(e))?;
        self.fingerprint = self.current.take();
        state.node = NodeContext {
            name: self.node_name.clone(),
            ips: local_addresses(),
        };
        let (diagnostics, generation) = snapshot.into_state(state);
        Ok(Update {
            diagnostics,
            generation,
        })
    }
}

/// Kubernetes mode: the API server's objects, through [`KubeSource`].
pub struct KubeWatch {
    source: KubeSource,
    node_name: String,
    poll: Duration,
}

impl KubeWatch {
    pub fn new(source: KubeSource, node_name: String, poll: Duration) -> Self {
        KubeWatch {
            source,
            node_name,
            poll,
        }
    }
}

impl Source for KubeWatch {
    async fn changed(&mut self) -> Result<bool, Error> {
        Ok(self.source.changed(self.poll).await?)
    }

    fn snapshot(&mut self, state: &mut ClusterState) -> Result<Update, Error> {
        let snapshot = self.source.snapshot(state);
        // The Node object's addresses, and the addresses of this network namespace
        // (the agent runs with hostNetwork): bridge CNIs source host-to-pod traffic
        // from the bridge's address, which no Node object lists.
        let mut ips = snapshot.node_ips;
        ips.extend(local_addresses());
        ips.sort();
        ips.dedup();
        state.node = NodeContext {
            name: Some(self.node_name.clone()),
            ips,
        };
        Ok(Update {
            diagnostics: Vec::new(),
            generation: snapshot.generation,
        })
    }

    fn report(&mut self, new: &[Diagnostic]) {
        self.source.report(new);
    }
}

fn local_addresses() -> Vec<IpAddr> {
    interfaces::node_addresses().unwrap_or_else(|error| {
        warn!(%error, "cannot list node addresses");
        Vec::new()
    })
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

/// Runs local mode on the manifest directory `manifests` until `shutdown` resolves;
/// then leaves or removes the kernel state as `config.on_exit` says.
pub async fn run_local(
    config: Config,
    datapath: Datapath,
    manifests: PathBuf,
    health: Arc<Health>,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), Error> {
    let source = LocalManifests::new(manifests, config.node_name.clone(), config.poll);
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
    let node_name = config
        .node_name
        .clone()
        .ok_or(kube_source::Error::NoNodeName)?;
    let client_config = kube_source::config(kube.kubeconfig.as_deref()).await?;
    let source = KubeSource::start(client_config, kube.settings)?;
    let source = KubeWatch::new(source, node_name, config.poll);
    run(&config, datapath, source, &health, shutdown).await
}

/// Loads (or adopts the pinned) programs and maps under `config.bpffs_dir` and sets
/// the unprogrammed default and the pod interface prefixes: everything that needs
/// privileges beyond enforcement's (see [`crate::privileges`]).
pub fn open_datapath(config: &Config) -> Result<Datapath, Error> {
    let mut datapath = Datapath::open(&config.bpffs_dir, &config.capacities)?;
    datapath.set_unprogrammed_default(config.deny_unprogrammed)?;
    datapath.set_pod_interfaces(config.pod_interface_prefixes.clone());
    Ok(datapath)
}

/// Runs the control loop over `source` until `shutdown` resolves; then leaves or removes
/// the kernel state as `config.on_exit` says.
pub async fn run<S: Source>(
    config: &Config,
    datapath: Datapath,
    mut source: S,
    health: &Health,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), Error> {
    let mut datapath = datapath;
    let resolver = SharedResolver::default();
    let result = match start_flow_log(config, &mut datapath, &resolver) {
        Ok(_server) => {
            reconcile_loop(
                config,
                &mut source,
                &mut datapath,
                &resolver,
                health,
                shutdown,
            )
            .await
        }
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

async fn reconcile_loop<S: Source>(
    config: &Config,
    source: &mut S,
    datapath: &mut Datapath,
    resolver: &SharedResolver,
    health: &Health,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), Error> {
    tokio::pin!(shutdown);
    let mut state = ClusterState::default();
    let mut compiler = Compiler::new();
    let mut compiled = Compiled::default();
    // Nothing reaches the kernel before the source's first complete state: until then
    // `compiled` is empty and applying it would clear maps adopted from a previous agent.
    let mut primed = false;
    let mut generation = 0;
    let mut reporter = Reporter::default();
    let mut last_resync = Instant::now();
    let mut status = Status::default();
    let mut apply_failed = false;
    let mut last_metrics = Instant::now();
    let mut last_conntrack_count = Instant::now() - CONNTRACK_COUNT_REFRESH;
    let mut refusals = Refusals::default();
    let links = subscribe_links(config);
    if links.is_some() {
        // Pod interfaces that exist already are covered before anything else is known
        // (the unprogrammed default applies to them until their pods are programmed).
        attach_new_interfaces(datapath, health);
    }
    loop {
        health.beat();
        let (changed, links_changed) = tokio::select! {
            _ = &mut shutdown => return Ok(()),
            () = wait_links(links.as_ref()) => (false, true),
            changed = source.changed() => (changed?, false),
        };
        if links_changed && !primed {
            attach_new_interfaces(datapath, health);
            continue;
        }
        // A state the kernel refused is tried again at the resync interval.
        let changed = changed || (apply_failed && last_resync.elapsed() >= config.resync);
        if !primed && !changed {
            continue;
        }
        if !changed
            && !links_changed
            && last_resync.elapsed() < config.resync
            && status.pending.is_empty()
        {
            continue;
        }
        last_resync = Instant::now();
        if changed {
            let started = Instant::now();
            let update = source.snapshot(&mut state)?;
            state.audit_all = config.audit;
            compiled = compiler.compile(&state);
            let diagnostics = update.diagnostics.iter().chain(&compiled.diagnostics);
            let invalid = reporter.publish(diagnostics, source, health);
            generation = update.generation.unwrap_or(generation);
            let Some(report) = apply(datapath, &compiled, health) else {
                apply_failed = true;
                continue;
            };
            apply_failed = false;
            health.metrics.applies.inc();
            health
                .metrics
                .propagation
                .observe(started.elapsed().as_secs_f64());
            primed = true;
            health.set_ready(true);
            refusals.update(&report.refused, &compiled, source, health);
            if let Ok(mut current) = resolver.write() {
                *current = std::sync::Arc::new(Resolver::new(&state, &compiled));
            }
            info!(
                generation,
                pods = state.pods.len(),
                policies = compiled.policies.len(),
                endpoints = compiled.local_pods.len(),
                invalid,
                map_writes = report.maps.writes(),
                attached = report.attached.len(),
                detached = report.detached.len(),
                elapsed_ms = started.elapsed().as_secs_f64() * 1e3,
                "applied"
            );
            status = Status {
                generation,
                endpoints: compiled.local_pods.len(),
                policies: compiled.policies.len(),
                invalid,
                attached: datapath.attached().count(),
                pending: report.pending,
            };
        } else {
            let Some(report) = apply(datapath, &compiled, health) else {
                continue;
            };
            if !report.attached.is_empty() || !report.detached.is_empty() {
                info!(attached = ?report.attached, detached = ?report.detached, "interfaces changed");
            }
            debug!(pending = report.pending.len(), "resync");
            refusals.update(&report.refused, &compiled, source, health);
            status.attached = datapath.attached().count();
            status.pending = report.pending;
        }
        if last_metrics.elapsed() >= METRICS_REFRESH {
            let walk_conntrack = last_conntrack_count.elapsed() >= CONNTRACK_COUNT_REFRESH;
            if walk_conntrack {
                last_conntrack_count = Instant::now();
            }
            refresh_kernel_metrics(datapath, &compiled, health, walk_conntrack);
            last_metrics = Instant::now();
        }
        if let Some(path) = &config.status_file {
            write_status(path, &status).map_err(|source| Error::Status {
                path: path.clone(),
                source,
            })?;
        }
    }
}

/// Link notifications, when pod interfaces are attached by name prefix.
fn subscribe_links(config: &Config) -> Option<datapath::links::LinkEvents> {
    if config.pod_interface_prefixes.is_empty() {
        return None;
    }
    match datapath::links::LinkEvents::subscribe() {
        Ok(links) => Some(links),
        Err(error) => {
            warn!(%error, "no netlink link notifications; new interfaces are found at resync");
            None
        }
    }
}

async fn wait_links(links: Option<&datapath::links::LinkEvents>) {
    match links {
        Some(links) => links.changed().await,
        None => std::future::pending().await,
    }
}

fn attach_new_interfaces(datapath: &mut Datapath, health: &Health) {
    match datapath.attach_new_interfaces() {
        Ok(report) if !report.attached.is_empty() => {
            info!(attached = ?report.attached, "pod interfaces covered before their pods are known");
        }
        Ok(_) => {}
        Err(error) => {
            health.metrics.error(error.kind());
            warn!(
                error = datapath::chain(&error),
                "attaching to new interfaces failed"
            );
        }
    }
}

/// What did not fit in the maps: logged once, reported (Kubernetes Events on pods),
/// and exported as `netpol_refused{map}`.
#[derive(Default)]
struct Refusals {
    reported: BTreeSet<String>,
}

impl Refusals {
    fn update<S: Source>(
        &mut self,
        refused: &[datapath::Refusal],
        compiled: &Compiled,
        source: &mut S,
        health: &Health,
    ) {
        for map in [
            netpol_common::names::ENDPOINTS,
            netpol_common::names::POLICY,
            netpol_common::names::IPCACHE,
        ] {
            let count = refused.iter().filter(|r| r.map() == map).count();
            health
                .metrics
                .refused
                .get_or_create(&crate::metrics::MapLabels { map: map.into() })
                .set(count as i64);
        }
        let diagnostics = refusal_diagnostics(refused, compiled);
        let mut current = BTreeSet::new();
        let mut new = Vec::new();
        for diagnostic in diagnostics {
            let message = diagnostic.to_string();
            if !self.reported.contains(&message) {
                warn!("refused: {message}");
                new.push(diagnostic);
            }
            current.insert(message);
        }
        for gone in self.reported.difference(&current) {
            info!("no longer refused: {gone}");
        }
        if !new.is_empty() {
            source.report(&new);
        }
        self.reported = current;
    }
}

/// One diagnostic per refusal, naming the pod (or the peer address) and the full map.
pub fn refusal_diagnostics(refused: &[datapath::Refusal], compiled: &Compiled) -> Vec<Diagnostic> {
    use datapath::Refusal;
    let pod = |id: u32| {
        let name = compiled
            .local_pods
            .iter()
            .find(|pod| pod.endpoint_id == id)
            .map_or(ObjectName::Endpoint(id), |pod| {
                ObjectName::Namespaced(pod.pod.clone())
            });
        Subject::Object {
            kind: Kind::Pod,
            name,
        }
    };
    refused
        .iter()
        .map(|refusal| match refusal {
            Refusal::Endpoint { id, capacity } => Diagnostic::new(
                pod(*id),
                "",
                format!(
                    "not programmed: ENDPOINTS is full (capacity {capacity}); its traffic is \
                     dropped until there is room"
                ),
            ),
            Refusal::Policy { id, capacity } => Diagnostic::new(
                pod(*id),
                "",
                format!(
                    "policy change not applied: POLICY is full (capacity {capacity}); only \
                     what both the old and the new policy allow is allowed"
                ),
            ),
            Refusal::Peer { addr, capacity } => Diagnostic::new(
                Subject::Address(
                    flowlog::ip_of(addr).map_or_else(|| "?".into(), |ip| ip.to_string()),
                ),
                "",
                format!(
                    "not in IPCACHE (full, capacity {capacity}): treated as its enclosing \
                     ipBlock, so fewer rules match it"
                ),
            ),
        })
        .collect()
}

/// Applies `compiled`; a refusal (e.g. a full map) is logged and counted, never fatal:
/// what is in the kernel stays enforced, and the caller tries again later.
fn apply(
    datapath: &mut Datapath,
    compiled: &Compiled,
    health: &Health,
) -> Option<datapath::ApplyReport> {
    match datapath.apply(compiled) {
        Ok(report) => Some(report),
        Err(error) => {
            health.metrics.error(error.kind());
            warn!(
                error = datapath::chain(&error),
                "applying to the kernel failed; will retry"
            );
            None
        }
    }
}

/// How often the kernel's counters are copied into the metrics.
const METRICS_REFRESH: Duration = Duration::from_secs(1);
/// Counting conntrack entries walks the map: less often, and at most this many.
const CONNTRACK_COUNT_REFRESH: Duration = Duration::from_secs(10);
const CONNTRACK_COUNT_LIMIT: usize = 1 << 20;

/// Copies the kernel's figures into the metrics (errors are counted, never fatal).
fn refresh_kernel_metrics(
    datapath: &Datapath,
    compiled: &Compiled,
    health: &Health,
    walk_conntrack: bool,
) {
    let mut snapshot = crate::metrics::KernelSnapshot::default();
    match datapath.counters_by_direction() {
        Ok(verdicts) => snapshot.verdicts = verdicts,
        Err(error) => health.metrics.error(error.kind()),
    }
    let rules = compiled
        .rules
        .iter()
        .filter_map(|(id, rule)| match datapath.rule_counter(*id) {
            Ok(counter) => Some((rule, counter)),
            Err(_) => None,
        });
    snapshot.rules = crate::metrics::rule_series(rules);
    snapshot.maps = datapath
        .map_fill(walk_conntrack.then_some(CONNTRACK_COUNT_LIMIT))
        .into_iter()
        .map(|(name, entries, capacity)| (name.to_owned(), entries, capacity))
        .collect();
    let is_conntrack =
        |name: &str| [netpol_common::names::CT4, netpol_common::names::CT6].contains(&name);
    if walk_conntrack {
        let tables = snapshot
            .maps
            .iter()
            .filter(|(name, _, _)| is_conntrack(name));
        snapshot.conntrack_entries = Some(tables.map(|(_, n, _)| *n).sum());
    } else {
        // Keep the last count rather than dropping the series between walks.
        let previous = health.metrics.kernel_snapshot();
        snapshot.conntrack_entries = previous.conntrack_entries;
        let tables = previous
            .maps
            .into_iter()
            .filter(|(name, _, _)| is_conntrack(name));
        snapshot.maps.extend(tables);
    }
    if let Ok((suppressed, lost)) = datapath.event_losses() {
        snapshot.events_suppressed = suppressed;
        snapshot.events_lost = lost;
    }
    health.metrics.set_kernel(snapshot);
}

/// Writes the status atomically (temporary file, then rename).
fn write_status(path: &std::path::Path, status: &Status) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    let json = serde_json::to_vec_pretty(status).map_err(std::io::Error::other)?;
    std::fs::write(&tmp, json)?;
    std::fs::rename(&tmp, path)
}
