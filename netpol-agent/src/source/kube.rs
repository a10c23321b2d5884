//! Kubernetes mode: cluster state from the API server, through kube-rs watchers and
//! reflector stores.
//!
//! One watcher per resource: Namespaces, Pods and NetworkPolicies of the whole cluster
//! (peers live everywhere) and this node's Node object (its addresses). Each runs list +
//! watch with bookmarks, resumes from the last resourceVersion when a stream breaks,
//! re-lists when the version has expired (410 Gone, as an ERROR event or as the HTTP
//! status of the watch request) and backs off exponentially on errors. Objects are
//! trimmed ([`trim`]) before they enter the stores.
//!
//! Never a partial view: [`KubeSource::changed`] reports no change before every watcher
//! has completed its initial list, and a re-list replaces a store atomically when it is
//! complete (the store keeps the old contents meanwhile). Afterwards bursts of events are
//! batched (quiet for `debounce`, at most `max_delay` after the first).
//!
//! Failures are logged once per incident, one line for all the resources it hit, e.g.
//! `Kubernetes API: watch streams broke (namespaces, pods): ...; resuming from the last
//! resourceVersion`; repeats within [`INCIDENT_QUIET`] go to debug.
//!
//! Objects are mirrored as they are; the compiler admits policies (a policy whose update
//! is invalid keeps its last valid version). What the compiler reports about a
//! NetworkPolicy (invalid) or a Pod (not programmed) is published, when enabled, as
//! `events.k8s.io/v1` Events on the object ([`KubeSource::report`]).

mod streams;
mod trim;

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Debug;
use std::hash::Hash;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use ::kube::api::Api;
use ::kube::config::{KubeConfigOptions, Kubeconfig};
use ::kube::runtime::events::{Event as KubeEvent, EventType, Recorder, Reporter};
use ::kube::runtime::reflector::store::Writer;
use ::kube::runtime::reflector::{Lookup, Store};
use ::kube::runtime::watcher::{self, Event};
use ::kube::{Client, Resource};
use futures::StreamExt as _;
use k8s_openapi::api::core::v1::{Namespace, Node, ObjectReference, Pod};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use serde::de::DeserializeOwned;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tracing::{debug, info, warn};

use netpol_compile::state::{ClusterState, ObjectRef};
use netpol_compile::{Diagnostic, Kind};

/// Errors of the Kubernetes source. Each variant is one metric label ([`Error::kind`]).
#[derive(Debug, thiserror::Error)]
pub enum Error {
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
            Error::Kubeconfig { .. } | Error::Infer(_) => "config",
            Error::Client(_) => "client",
            Error::NoNodeName => "node_name",
            Error::WatchersGone => "watchers_gone",
        }
    }
}

/// The client configuration from `kubeconfig`, or else inferred as every controller
/// does (`KUBECONFIG`, `~/.kube/config`, then the in-cluster service account).
pub async fn config(kubeconfig: Option<&Path>) -> Result<::kube::Config, Error> {
    match kubeconfig {
        Some(path) => {
            let file = Kubeconfig::read_from(path).map_err(|source| Error::Kubeconfig {
                path: path.to_path_buf(),
                source,
            })?;
            ::kube::Config::from_custom_kubeconfig(file, &KubeConfigOptions::default())
                .await
                .map_err(|source| Error::Kubeconfig {
                    path: path.to_path_buf(),
                    source,
                })
        }
        None => Ok(::kube::Config::infer().await?),
    }
}

/// Log directives the binary adds to its default filter: kube-client warns about every
/// broken watch stream itself (`eof in poll`, one line per stream); the source reports
/// those as one line per incident instead.
pub const LOG_DIRECTIVES: &str = "kube_client::client=error";

/// The watched resources.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Watched {
    Namespaces,
    Pods,
    NetworkPolicies,
    /// This node's Node object.
    Node,
}

impl Watched {
    pub const ALL: [Watched; 4] = [
        Watched::Namespaces,
        Watched::Pods,
        Watched::NetworkPolicies,
        Watched::Node,
    ];

    /// The API resource name.
    pub fn resource(self) -> &'static str {
        match self {
            Watched::Namespaces => "namespaces",
            Watched::Pods => "pods",
            Watched::NetworkPolicies => "networkpolicies",
            Watched::Node => "nodes",
        }
    }
}

impl std::fmt::Display for Watched {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.resource())
    }
}

/// How the source behaves.
#[derive(Clone, Debug)]
pub struct Settings {
    /// `spec.nodeName` of the local pods; also selects the Node object.
    pub node_name: String,
    /// A batch of changes closes after this long without a new one...
    pub debounce: Duration,
    /// ...or this long after its first change, whichever comes first.
    pub max_delay: Duration,
    /// First delay after a failed request; doubles up to `backoff_max`.
    pub backoff_initial: Duration,
    pub backoff_max: Duration,
    /// Publish invalid policies as Kubernetes Events on the policy.
    pub events: bool,
    /// Name of the reporting instance in Events (the pod name).
    pub instance: Option<String>,
}

impl Settings {
    pub fn new(node_name: impl Into<String>) -> Self {
        Settings {
            node_name: node_name.into(),
            debounce: Duration::from_millis(50),
            max_delay: Duration::from_millis(500),
            backoff_initial: Duration::from_millis(200),
            backoff_max: Duration::from_secs(10),
            events: true,
            instance: None,
        }
    }
}

/// A repeated failure of one resource within this window belongs to the same incident
/// (logged once); the backoff never waits longer, so a lasting outage is one line.
pub const INCIDENT_QUIET: Duration = Duration::from_secs(30);

/// How often the wait for the initial lists is reported.
const WAITING_REPORT: Duration = Duration::from_secs(30);

/// Bound on publishing one Event.
const EVENT_TIMEOUT: Duration = Duration::from_secs(10);

/// What the watcher tasks tell the source.
#[derive(Debug)]
enum Signal {
    /// An object was added, modified or deleted.
    Changed(Watched),
    /// A (re-)list completed and replaced the store.
    Synced(Watched),
    Failed(Watched, Failure),
}

/// Why a request failed, for one log line per incident.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Failure {
    /// The resource version expired: the watcher re-lists.
    Gone(String),
    /// An established watch stream broke: the watcher resumes from its version.
    Stream(String),
    /// No answer (connection refused, timeout, TLS...).
    Unreachable(String),
    /// The API server answered with an error status.
    Api(u16, String),
    Other(String),
}

impl Failure {
    fn of(error: &watcher::Error) -> Self {
        use ::kube::Error as K;
        match error {
            watcher::Error::WatchError(status) if status.code == 410 => {
                Failure::Gone(status.message.clone())
            }
            watcher::Error::WatchError(status) => Failure::Api(status.code, status.message.clone()),
            watcher::Error::WatchStartFailed(K::Api(status))
            | watcher::Error::InitialListFailed(K::Api(status))
                if status.code == 410 =>
            {
                Failure::Gone(status.message.clone())
            }
            watcher::Error::WatchStartFailed(K::Api(status))
            | watcher::Error::InitialListFailed(K::Api(status))
            | watcher::Error::WatchFailed(K::Api(status)) => {
                Failure::Api(status.code, status.message.clone())
            }
            watcher::Error::WatchFailed(error) => Failure::Stream(chain(error)),
            watcher::Error::WatchStartFailed(error) | watcher::Error::InitialListFailed(error) => {
                Failure::Unreachable(chain(error))
            }
            watcher::Error::NoResourceVersion => Failure::Other(error.to_string()),
        }
    }

    /// Groups failures of several resources into one line.
    fn class(&self) -> u8 {
        match self {
            Failure::Gone(_) => 0,
            Failure::Stream(_) => 1,
            Failure::Unreachable(_) => 2,
            Failure::Api(..) => 3,
            Failure::Other(_) => 4,
        }
    }

    fn line(&self, resources: &str) -> String {
        match self {
            Failure::Gone(message) => format!(
                "Kubernetes API: watch of {resources} expired (410 Gone: {message}); re-listing, \
                 enforcement stays as it is until the new list is complete"
            ),
            Failure::Stream(message) => format!(
                "Kubernetes API: watch streams broke ({resources}): {message}; resuming from \
                 the last resourceVersion"
            ),
            Failure::Unreachable(message) => format!(
                "Kubernetes API: unreachable for {resources}: {message}; retrying with backoff, \
                 enforcement stays as it is"
            ),
            Failure::Api(403, message) => format!(
                "Kubernetes API: forbidden to read {resources} (check the ClusterRole): {message}"
            ),
            Failure::Api(code, message) => {
                format!("Kubernetes API: error {code} for {resources}: {message}; retrying")
            }
            Failure::Other(message) => {
                format!("Kubernetes API: {resources}: {message}; re-listing")
            }
        }
    }
}

/// Open failure incidents per resource, and the lines not yet logged.
#[derive(Default)]
struct Incidents {
    /// Resource → time of its last failure.
    open: BTreeMap<Watched, Instant>,
    /// Class → (first failure, resources) to log at the end of the batch.
    pending: BTreeMap<u8, (Failure, BTreeSet<Watched>)>,
    /// Failures in total (all logged or not).
    failures: u64,
}

impl Incidents {
    fn failed(&mut self, watched: Watched, failure: Failure) {
        self.failures += 1;
        let now = Instant::now();
        let new = self
            .open
            .insert(watched, now)
            .is_none_or(|last| now.duration_since(last) > INCIDENT_QUIET);
        if new {
            self.pending
                .entry(failure.class())
                .or_insert_with(|| (failure, BTreeSet::new()))
                .1
                .insert(watched);
        } else {
            debug!(resource = %watched, ?failure, "Kubernetes API: still failing");
        }
    }

    fn succeeded(&mut self, watched: Watched) {
        if self.open.remove(&watched).is_some() {
            debug!(resource = %watched, "Kubernetes API: watch recovered");
        }
    }

    fn flush(&mut self) {
        for (_, (failure, resources)) in std::mem::take(&mut self.pending) {
            let names: Vec<&str> = resources.iter().map(|r| r.resource()).collect();
            warn!("{}", failure.line(&names.join(", ")));
        }
    }
}

/// Exponential backoff, reset by a success or by a long quiet time.
struct Backoff {
    initial: Duration,
    max: Duration,
    next: Duration,
    last_failure: Option<Instant>,
}

impl Backoff {
    fn new(initial: Duration, max: Duration) -> Self {
        Backoff {
            initial,
            max,
            next: initial,
            last_failure: None,
        }
    }

    fn succeeded(&mut self) {
        self.next = self.initial;
        self.last_failure = None;
    }

    fn failed(&mut self) -> Duration {
        let now = Instant::now();
        if self
            .last_failure
            .is_some_and(|last| now.duration_since(last) > INCIDENT_QUIET)
        {
            self.next = self.initial;
        }
        self.last_failure = Some(now);
        let delay = self.next;
        self.next = (self.next * 2).min(self.max);
        delay
    }
}

/// The reflector stores, read by [`KubeSource::snapshot`].
#[derive(Clone)]
struct Stores {
    namespaces: Store<Namespace>,
    pods: Store<Pod>,
    policies: Store<NetworkPolicy>,
    node: Store<Node>,
}

/// Cluster state from the Kubernetes API. Dropping it stops the watchers.
pub struct KubeSource {
    settings: Settings,
    stores: Stores,
    signals: mpsc::UnboundedReceiver<Signal>,
    tasks: Vec<JoinHandle<()>>,
    /// Highest resourceVersion in the stores (when numeric, as etcd revisions are).
    resource_version: Arc<AtomicU64>,
    synced: BTreeSet<Watched>,
    /// A change arrived since the last snapshot.
    dirty: bool,
    incidents: Incidents,
    started: Instant,
    last_waiting_report: Instant,
    recorder: Option<Recorder>,
}

impl Drop for KubeSource {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

impl KubeSource {
    /// Builds the client and starts the watchers (on the current tokio runtime).
    pub fn start(config: ::kube::Config, settings: Settings) -> Result<Self, Error> {
        let (tx, signals) = mpsc::unbounded_channel();
        let client: Client = ::kube::client::ClientBuilder::try_from(config)
            .map_err(Error::Client)?
            .with_layer(&streams::WatchStreamLayer {
                signals: tx.clone(),
            })
            .build();
        let resource_version = Arc::new(AtomicU64::new(0));
        let mut tasks = Vec::new();
        let node_selector = format!("metadata.name={}", settings.node_name);
        let context = |watched| WatchContext {
            watched,
            tx: tx.clone(),
            resource_version: resource_version.clone(),
            backoff: Backoff::new(settings.backoff_initial, settings.backoff_max),
        };
        let (namespaces, writer) = ::kube::runtime::reflector::store();
        tasks.push(tokio::spawn(watch(
            Api::<Namespace>::all(client.clone()),
            watcher::Config::default(),
            writer,
            trim::namespace,
            context(Watched::Namespaces),
        )));
        let (pods, writer) = ::kube::runtime::reflector::store();
        tasks.push(tokio::spawn(watch(
            Api::<Pod>::all(client.clone()),
            watcher::Config::default(),
            writer,
            trim::pod,
            context(Watched::Pods),
        )));
        let (policies, writer) = ::kube::runtime::reflector::store();
        tasks.push(tokio::spawn(watch(
            Api::<NetworkPolicy>::all(client.clone()),
            watcher::Config::default(),
            writer,
            trim::network_policy,
            context(Watched::NetworkPolicies),
        )));
        let (node, writer) = ::kube::runtime::reflector::store();
        tasks.push(tokio::spawn(watch(
            Api::<Node>::all(client.clone()),
            watcher::Config::default().fields(&node_selector),
            writer,
            trim::node,
            context(Watched::Node),
        )));
        let recorder = settings.events.then(|| {
            Recorder::new(
                client,
                Reporter {
                    controller: "netpol-agent".into(),
                    instance: settings.instance.clone(),
                },
            )
        });
        let now = Instant::now();
        Ok(KubeSource {
            settings,
            stores: Stores {
                namespaces,
                pods,
                policies,
                node,
            },
            signals,
            tasks,
            resource_version,
            synced: BTreeSet::new(),
            dirty: false,
            incidents: Incidents::default(),
            started: now,
            last_waiting_report: now,
            recorder,
        })
    }

    /// Every watcher has completed its initial list.
    pub fn is_synced(&self) -> bool {
        self.synced.len() == Watched::ALL.len()
    }

    /// Failures seen so far (logged or not).
    pub fn failures(&self) -> u64 {
        self.incidents.failures
    }

    /// Waits at most `timeout` for changes, then batches a burst (see [`Settings`]).
    /// `true` when the state changed since the last [`KubeSource::snapshot`] and every
    /// initial list is complete.
    pub async fn changed(&mut self, timeout: Duration) -> Result<bool, Error> {
        let first = match tokio::time::timeout(timeout, self.signals.recv()).await {
            Err(_elapsed) => None,
            Ok(None) => return Err(Error::WatchersGone),
            Ok(Some(signal)) => Some(signal),
        };
        if let Some(signal) = first {
            self.handle(signal);
            let limit = Instant::now() + self.settings.max_delay;
            loop {
                let until = (Instant::now() + self.settings.debounce).min(limit);
                match tokio::time::timeout_at(until, self.signals.recv()).await {
                    Err(_elapsed) => break,
                    Ok(None) => return Err(Error::WatchersGone),
                    Ok(Some(signal)) => self.handle(signal),
                }
                if Instant::now() >= limit {
                    break;
                }
            }
        }
        self.incidents.flush();
        if !self.is_synced() && self.last_waiting_report.elapsed() >= WAITING_REPORT {
            self.last_waiting_report = Instant::now();
            let missing: Vec<&str> = Watched::ALL
                .iter()
                .filter(|w| !self.synced.contains(w))
                .map(|w| w.resource())
                .collect();
            warn!(
                waited_s = self.started.elapsed().as_secs(),
                "Kubernetes API: still waiting for the initial list of {}; nothing is \
                 programmed before every list is complete",
                missing.join(", ")
            );
        }
        let changed = self.dirty && self.is_synced();
        if changed {
            self.dirty = false;
        }
        Ok(changed)
    }

    fn handle(&mut self, signal: Signal) {
        match signal {
            Signal::Changed(watched) => {
                self.dirty = true;
                self.incidents.succeeded(watched);
            }
            Signal::Synced(watched) => {
                self.dirty = true;
                self.incidents.succeeded(watched);
                let was_synced = self.is_synced();
                if self.synced.insert(watched) && !was_synced && self.is_synced() {
                    info!(
                        namespaces = self.stores.namespaces.len(),
                        pods = self.stores.pods.len(),
                        policies = self.stores.policies.len(),
                        node = self.stores.node.len(),
                        elapsed_ms = self.started.elapsed().as_secs_f64() * 1e3,
                        "Kubernetes API: initial lists complete"
                    );
                } else if was_synced {
                    debug!(resource = %watched, "re-listed");
                }
            }
            Signal::Failed(watched, failure) => self.incidents.failed(watched, failure),
        }
    }

    /// Fills the objects of `state` from the stores and returns the addresses of this
    /// node from its Node object and the highest resourceVersion the snapshot contains
    /// (the status file's generation in Kubernetes mode).
    pub fn snapshot(&mut self, state: &mut ClusterState) -> Snapshot {
        // Read first: the stores hold at least everything up to this version.
        let generation = self.resource_version.load(Ordering::Acquire);
        state.namespaces = self
            .stores
            .namespaces
            .state()
            .into_iter()
            .filter_map(|ns| Some((ns.metadata.name.clone()?, (*ns).clone())))
            .collect();
        state.pods = self
            .stores
            .pods
            .state()
            .into_iter()
            .filter_map(|pod| Some((object_ref(&pod.metadata)?, (*pod).clone())))
            .collect();
        state.policies = self
            .stores
            .policies
            .state()
            .into_iter()
            .filter_map(|policy| Some((object_ref(&policy.metadata)?, (*policy).clone())))
            .collect();
        let node_ips = self
            .stores
            .node
            .state()
            .iter()
            .filter(|node| node.metadata.name.as_deref() == Some(&self.settings.node_name))
            .flat_map(|node| node_addresses(node))
            .collect();
        Snapshot {
            node_ips,
            generation: (generation > 0).then_some(generation),
        }
    }

    /// Publishes Events for new diagnostics about NetworkPolicies (invalid) and Pods
    /// (not fully programmed: a map was full), in the background, each bounded by a
    /// timeout; failures are logged at debug level.
    pub fn report(&self, diagnostics: &[Diagnostic]) {
        let Some(recorder) = &self.recorder else {
            return;
        };
        let mut notes: BTreeMap<(Subject, ObjectRef), Vec<String>> = BTreeMap::new();
        for diagnostic in diagnostics {
            let (subject, key) = match diagnostic.object() {
                Some((Kind::NetworkPolicy, key)) => (Subject::Policy, key),
                Some((Kind::Pod, key)) => (Subject::Pod, key),
                _ => continue,
            };
            let text = if diagnostic.field.is_empty() {
                diagnostic.message.clone()
            } else {
                format!("{}: {}", diagnostic.field, diagnostic.message)
            };
            notes.entry((subject, key.clone())).or_default().push(text);
        }
        for ((subject, key), notes) in notes {
            let reference = match subject {
                Subject::Policy => self.reference::<NetworkPolicy>(&self.stores.policies, &key),
                Subject::Pod => self.reference::<Pod>(&self.stores.pods, &key),
            };
            let mut note = notes.join("; ");
            // The API server limits an Event's note to 1 kB.
            if note.len() > 1000 {
                let mut end = 1000;
                while !note.is_char_boundary(end) {
                    end -= 1;
                }
                note.truncate(end);
            }
            let event = KubeEvent {
                type_: EventType::Warning,
                reason: subject.reason().into(),
                note: Some(note),
                action: "Enforce".into(),
                secondary: None,
            };
            let recorder = recorder.clone();
            tokio::spawn(async move {
                match tokio::time::timeout(EVENT_TIMEOUT, recorder.publish(&event, &reference))
                    .await
                {
                    Ok(Ok(())) => debug!(object = %key, "Event published"),
                    Ok(Err(error)) => {
                        debug!(object = %key, error = %chain(&error), "cannot publish the Event");
                    }
                    Err(_elapsed) => debug!(object = %key, "publishing the Event timed out"),
                }
            });
        }
    }

    fn reference<K>(&self, store: &Store<K>, key: &ObjectRef) -> ObjectReference
    where
        K: k8s_openapi::Resource
            + k8s_openapi::Metadata<Ty = k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta>
            + Lookup
            + Clone
            + 'static,
        K::DynamicType: Eq + Hash + Clone,
    {
        let uid = store
            .state()
            .into_iter()
            .find(|o| object_ref(o.metadata()).as_ref() == Some(key))
            .and_then(|o| o.metadata().uid.clone());
        ObjectReference {
            api_version: Some(K::API_VERSION.into()),
            kind: Some(K::KIND.into()),
            namespace: Some(key.namespace.clone()),
            name: Some(key.name.clone()),
            uid,
            ..ObjectReference::default()
        }
    }
}

/// What an Event is about.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Subject {
    Policy,
    Pod,
}

impl Subject {
    fn reason(self) -> &'static str {
        match self {
            Subject::Policy => "InvalidNetworkPolicy",
            Subject::Pod => "NetworkPolicyNotProgrammed",
        }
    }
}

/// What one [`KubeSource::snapshot`] produced besides the objects.
#[derive(Clone, Debug, Default)]
pub struct Snapshot {
    /// InternalIP and ExternalIP addresses of this node's Node object.
    pub node_ips: Vec<IpAddr>,
    /// Highest resourceVersion contained (`None` before any object was seen).
    pub generation: Option<u64>,
}

fn object_ref(
    metadata: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta,
) -> Option<ObjectRef> {
    Some(ObjectRef::new(
        metadata.namespace.clone()?,
        metadata.name.clone()?,
    ))
}

/// The InternalIP and ExternalIP addresses of a Node.
pub fn node_addresses(node: &Node) -> Vec<IpAddr> {
    let mut ips: Vec<IpAddr> = node
        .status
        .iter()
        .flat_map(|status| status.addresses.iter().flatten())
        .filter(|address| matches!(address.type_.as_str(), "InternalIP" | "ExternalIP"))
        .filter_map(|address| address.address.parse().ok())
        .collect();
    ips.sort();
    ips.dedup();
    ips
}

/// What a watcher task needs besides its API and store.
struct WatchContext {
    watched: Watched,
    tx: mpsc::UnboundedSender<Signal>,
    resource_version: Arc<AtomicU64>,
    backoff: Backoff,
}

/// Runs one watcher into its store until the source is dropped.
async fn watch<K>(
    api: Api<K>,
    config: watcher::Config,
    mut writer: Writer<K>,
    trim: fn(&mut K),
    mut context: WatchContext,
) where
    K: Resource + Lookup + Clone + DeserializeOwned + Debug + Send + Sync + 'static,
    <K as Lookup>::DynamicType: Eq + Hash + Clone,
{
    let watched = context.watched;
    loop {
        let mut stream = watcher::watcher(api.clone(), config.clone()).boxed();
        // Highest version of a list in progress: counted once the list is complete.
        let mut listing = 0u64;
        while let Some(item) = stream.next().await {
            let signal = match item {
                Ok(event) => {
                    context.backoff.succeeded();
                    let event = event.modify(|object: &mut K| {
                        let version = numeric_version(object);
                        listing = listing.max(version);
                        trim(object);
                    });
                    writer.apply_watcher_event(&event);
                    match &event {
                        Event::Init => {
                            listing = 0;
                            None
                        }
                        Event::InitApply(_) => None,
                        Event::InitDone => {
                            context
                                .resource_version
                                .fetch_max(std::mem::take(&mut listing), Ordering::AcqRel);
                            Some(Signal::Synced(watched))
                        }
                        Event::Apply(_) | Event::Delete(_) => {
                            context
                                .resource_version
                                .fetch_max(std::mem::take(&mut listing), Ordering::AcqRel);
                            Some(Signal::Changed(watched))
                        }
                    }
                }
                Err(error) => {
                    let failure = Failure::of(&error);
                    // kube's watcher retries a watch refused with HTTP 410 from the same
                    // version forever: start over with a fresh list instead.
                    let relist = matches!(
                        &error,
                        watcher::Error::WatchStartFailed(::kube::Error::Api(status)) if status.code == 410
                    );
                    if context.tx.send(Signal::Failed(watched, failure)).is_err() {
                        return;
                    }
                    tokio::time::sleep(context.backoff.failed()).await;
                    if relist {
                        break;
                    }
                    None
                }
            };
            if let Some(signal) = signal
                && context.tx.send(signal).is_err()
            {
                return;
            }
        }
    }
}

/// `metadata.resourceVersion` as a number (0 when absent or opaque).
fn numeric_version<K: Resource>(object: &K) -> u64 {
    ::kube::ResourceExt::resource_version(object)
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// An error with its sources, `outer: inner: innermost` (repeats dropped).
fn chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(inner) = source {
        let inner_text = inner.to_string();
        if !text.contains(&inner_text) {
            text.push_str(": ");
            text.push_str(&inner_text);
        }
        source = inner.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn incidents_log_once_per_class_and_reopen_after_quiet() {
        let mut incidents = Incidents::default();
        incidents.failed(Watched::Pods, Failure::Stream("eof".into()));
        incidents.failed(Watched::Namespaces, Failure::Stream("eof".into()));
        incidents.failed(Watched::Pods, Failure::Unreachable("refused".into()));
        assert_eq!(incidents.pending.len(), 1);
        let (_, resources) = &incidents.pending[&1];
        assert_eq!(
            resources.iter().copied().collect::<Vec<_>>(),
            [Watched::Namespaces, Watched::Pods]
        );
        incidents.flush();
        assert!(incidents.pending.is_empty());
        incidents.succeeded(Watched::Pods);
        incidents.failed(Watched::Pods, Failure::Gone("too old".into()));
        assert_eq!(
            incidents.pending.len(),
            1,
            "a recovered resource opens a new incident"
        );
        assert_eq!(incidents.failures, 4);
    }

    #[test]
    fn backoff_doubles_up_to_the_maximum_and_resets() {
        let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_millis(350));
        let delays: Vec<_> = (0..4).map(|_| backoff.failed().as_millis()).collect();
        assert_eq!(delays, [100, 200, 350, 350]);
        backoff.succeeded();
        assert_eq!(backoff.failed(), Duration::from_millis(100));
    }

    #[test]
    fn failure_lines_name_the_resources() {
        let line = Failure::Gone("too old resource version: 3 (9)".into()).line("pods, nodes");
        assert!(line.starts_with("Kubernetes API: watch of pods, nodes expired (410 Gone"));
    }
}
