//! The watchers' stores: started together, batched into changes, read as snapshots.

use std::collections::BTreeSet;
use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use ::kube::Client;
use ::kube::api::{Api, DynamicObject};
use ::kube::runtime::events::{Recorder, Reporter};
use ::kube::runtime::reflector::Store;
use ::kube::runtime::watcher;
use k8s_openapi::api::core::v1::{Node, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::api::networking::v1::ServiceCIDR;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tracing::{debug, info, warn};

use netpol_compile::state::{
    ClusterState, NamespaceInfo, NodePeer, PodInfo, Policy, node_addresses,
};

use super::changes::{Changed, Changes, Reflected, StateKey, refresh};
use super::compact::Kept;
use super::incidents::{self, Incidents, Signal};
use super::pod::WatchedPod;
use super::settings::{Settings, Watched};
use super::store::{CompactStore, PodStore};
use super::watch::{Reflector, WatchContext, watch};
use super::{streams, trim};
use crate::source::Error;

/// How often the wait for the initial lists is reported.
const WAITING_REPORT: Duration = Duration::from_secs(30);

/// The stores, read by [`ClusterWatch::snapshot`]: the agent's own for the kinds of
/// which it keeps many objects, kube-rs reflectors for the others.
#[derive(Clone)]
pub(super) struct Stores {
    pub(super) namespaces: CompactStore<NamespaceInfo>,
    pub(super) pods: PodStore,
    pub(super) policies: CompactStore<Policy>,
    pub(super) node: Store<Node>,
    pub(super) services: Store<Service>,
    pub(super) endpoint_slices: Store<EndpointSlice>,
    pub(super) service_cidrs: Store<ServiceCIDR>,
    pub(super) cluster_policies: Store<DynamicObject>,
}

/// Cluster state from the Kubernetes API. Dropping it stops the watchers.
pub struct ClusterWatch {
    settings: Settings,
    pub(super) stores: Stores,
    signals: mpsc::UnboundedReceiver<Signal>,
    tasks: Vec<JoinHandle<()>>,
    /// Highest resourceVersion in the stores (when numeric, as etcd revisions are).
    resource_version: Arc<AtomicU64>,
    /// The objects changed since the last snapshot (recorded by the watcher tasks).
    changes: Arc<Changes>,
    cluster_policy: ::kube::api::ApiResource,
    synced: BTreeSet<Watched>,
    /// A change arrived since the last snapshot.
    dirty: bool,
    /// Only updates that changed nothing the agent keeps arrived since the last
    /// snapshot or [`ClusterWatch::unchanged_generation`]: the version moved alone.
    moved: bool,
    incidents: Incidents,
    started: Instant,
    last_waiting_report: Instant,
    pub(super) recorder: Option<Recorder>,
}

impl Drop for ClusterWatch {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

impl ClusterWatch {
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
        let changes = Arc::new(Changes::default());
        let mut tasks = Vec::new();
        let context = |watched| WatchContext {
            watched,
            tx: tx.clone(),
            resource_version: resource_version.clone(),
            changes: changes.clone(),
            backoff: incidents::backoff(settings.backoff_initial, settings.backoff_max),
            absent_is_empty: watched == Watched::ClusterNetworkPolicies,
        };
        let namespaces = CompactStore::default();
        tasks.push(tokio::spawn(watch(
            Api::<Kept<NamespaceInfo>>::all(client.clone()),
            watcher::Config::default(),
            namespaces.writer(),
            // Read compact: nothing more to drop.
            |_| {},
            context(Watched::Namespaces),
        )));
        let pods = PodStore::default();
        tasks.push(tokio::spawn(watch(
            Api::<WatchedPod>::all(client.clone()),
            watcher::Config::default(),
            pods.writer(),
            // Read trimmed: nothing more to drop.
            |_| {},
            context(Watched::Pods),
        )));
        let policies = CompactStore::default();
        tasks.push(tokio::spawn(watch(
            Api::<Kept<Policy>>::all(client.clone()),
            watcher::Config::default(),
            policies.writer(),
            // Read compact: nothing more to drop.
            |_| {},
            context(Watched::NetworkPolicies),
        )));
        let (node, writer) = ::kube::runtime::reflector::store();
        tasks.push(tokio::spawn(watch(
            // Every node: ClusterNetworkPolicy `nodes` peers select them by label.
            Api::<Node>::all(client.clone()),
            watcher::Config::default(),
            Reflector::new(writer, ()),
            trim::node,
            context(Watched::Node),
        )));
        let (services, writer) = ::kube::runtime::reflector::store();
        tasks.push(tokio::spawn(watch(
            Api::<Service>::all(client.clone()),
            watcher::Config::default(),
            Reflector::new(writer, ()),
            trim::service,
            context(Watched::Services),
        )));
        let (endpoint_slices, writer) = ::kube::runtime::reflector::store();
        tasks.push(tokio::spawn(watch(
            Api::<EndpointSlice>::all(client.clone()),
            watcher::Config::default(),
            Reflector::new(writer, ()),
            trim::endpoint_slice,
            context(Watched::EndpointSlices),
        )));
        let (service_cidrs, writer) = ::kube::runtime::reflector::store();
        tasks.push(tokio::spawn(watch(
            Api::<ServiceCIDR>::all(client.clone()),
            watcher::Config::default(),
            Reflector::new(writer, ()),
            trim::service_cidr,
            context(Watched::ServiceCidrs),
        )));
        let cluster_policy = super::cluster_policy_resource();
        let writer = ::kube::runtime::reflector::store::Writer::new(cluster_policy.clone());
        let cluster_policies = writer.as_reader();
        tasks.push(tokio::spawn(watch(
            Api::<DynamicObject>::all_with(client.clone(), &cluster_policy),
            watcher::Config::default(),
            Reflector::new(writer, cluster_policy.clone()),
            trim::cluster_policy,
            context(Watched::ClusterNetworkPolicies),
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
        Ok(ClusterWatch {
            settings,
            stores: Stores {
                namespaces,
                pods,
                policies,
                node,
                services,
                endpoint_slices,
                service_cidrs,
                cluster_policies,
            },
            signals,
            tasks,
            resource_version,
            changes,
            cluster_policy,
            synced: BTreeSet::new(),
            dirty: false,
            moved: false,
            incidents: Incidents::default(),
            started: now,
            last_waiting_report: now,
            recorder,
        })
    }

    /// Every watcher has completed its initial list.
    pub fn is_synced(&self) -> bool {
        Watched::REQUIRED.iter().all(|w| self.synced.contains(w))
    }

    /// Failures seen so far (logged or not).
    pub fn failures(&self) -> u64 {
        self.incidents.failures
    }

    /// Waits at most `timeout` for changes, then batches a burst (see [`Settings`]).
    /// `true` when the state changed since the last [`ClusterWatch::snapshot`] and every
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
            let missing: Vec<&str> = Watched::REQUIRED
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

    /// The resourceVersion reached by updates that changed nothing the agent keeps,
    /// when no change is waiting for a snapshot: what the kernel holds is already the
    /// state at that version, so it can be reported as applied without a compile.
    pub fn unchanged_generation(&mut self) -> Option<u64> {
        if !self.moved || self.dirty || !self.is_synced() {
            return None;
        }
        self.moved = false;
        Some(self.resource_version.load(Ordering::Acquire))
    }

    fn handle(&mut self, signal: Signal) {
        match signal {
            Signal::Changed(watched) => {
                self.dirty = true;
                self.incidents.succeeded(watched);
            }
            Signal::Unchanged(watched) => {
                self.moved = true;
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

    /// Brings the objects of `state` up to date with the stores and returns the
    /// addresses of this node from its Node object and the highest resourceVersion the
    /// snapshot contains (the status file's generation in Kubernetes mode).
    ///
    /// Only what changed since the last snapshot is copied ([`super::changes`]): `state`
    /// must be the one the previous snapshots filled (the agent keeps one), or call
    /// [`ClusterWatch::reread_all`] first.
    pub fn snapshot(&mut self, state: &mut ClusterState) -> Snapshot {
        // Read first: the stores hold at least everything up to this version, and the
        // record taken below names every object those changes touched.
        let generation = self.resource_version.load(Ordering::Acquire);
        self.moved = false;
        let mut changed = self.changes.take();
        let changes = netpol_compile::state::Changes {
            pods: state_keys(changed.get(&Watched::Pods)),
            policies: state_keys(changed.get(&Watched::NetworkPolicies)),
            namespaces: state_keys(changed.get(&Watched::Namespaces)),
            cluster_policies: state_keys(changed.get(&Watched::ClusterNetworkPolicies)),
        };
        let stores = &self.stores;
        refresh(
            &stores.namespaces,
            changed.remove(&Watched::Namespaces),
            &mut state.namespaces,
            |namespace: &NamespaceInfo| Some(namespace.clone()),
        );
        refresh(
            &stores.pods,
            changed.remove(&Watched::Pods),
            &mut state.pods,
            |pod: &PodInfo| Some(pod.clone()),
        );
        refresh(
            &stores.policies,
            changed.remove(&Watched::NetworkPolicies),
            &mut state.policies,
            |policy: &Policy| Some(policy.clone()),
        );
        refresh(
            &Reflected {
                store: &stores.services,
                dyntype: &(),
            },
            changed.remove(&Watched::Services),
            &mut state.services,
            cloned,
        );
        refresh(
            &Reflected {
                store: &stores.endpoint_slices,
                dyntype: &(),
            },
            changed.remove(&Watched::EndpointSlices),
            &mut state.endpoint_slices,
            cloned,
        );
        refresh(
            &Reflected {
                store: &stores.service_cidrs,
                dyntype: &(),
            },
            changed.remove(&Watched::ServiceCidrs),
            &mut state.service_cidrs,
            cloned,
        );
        refresh(
            &Reflected {
                store: &stores.cluster_policies,
                dyntype: &self.cluster_policy,
            },
            changed.remove(&Watched::ClusterNetworkPolicies),
            &mut state.cluster_policies,
            |policy: &Arc<DynamicObject>| serde_json::to_value(&**policy).ok(),
        );
        refresh(
            &Reflected {
                store: &stores.node,
                dyntype: &(),
            },
            changed.remove(&Watched::Node),
            &mut state.nodes,
            |node: &Arc<Node>| Some(NodePeer::of(node)),
        );
        let this_node = ::kube::runtime::reflector::ObjectRef::new(&self.settings.node_name);
        let node_ips = stores
            .node
            .get(&this_node)
            .map(|node| node_addresses(&node))
            .unwrap_or_default();
        Snapshot {
            node_ips,
            generation: (generation > 0).then_some(generation),
            changes,
        }
    }

    /// The next [`ClusterWatch::snapshot`] copies every object, not only those changed:
    /// for a state that is not the one the previous snapshots filled.
    pub fn reread_all(&mut self) {
        self.changes.everything();
    }
}

/// The state keeps a copy of the stores' objects as they are.
fn cloned<K: Clone>(object: &Arc<K>) -> Option<K> {
    Some(K::clone(object))
}

/// What one [`ClusterWatch::snapshot`] produced besides the objects.
#[derive(Clone, Debug, Default)]
pub struct Snapshot {
    /// InternalIP and ExternalIP addresses of this node's Node object.
    pub node_ips: Vec<IpAddr>,
    /// Highest resourceVersion contained (`None` before any object was seen).
    pub generation: Option<u64>,
    /// The pods, policies and namespaces this snapshot added, updated or deleted in the
    /// state (`None` for a kind whose list it read whole).
    pub changes: netpol_compile::state::Changes,
}

/// The state keys of the objects `changed` names (`None`: every object, after a list).
fn state_keys<K: StateKey>(changed: Option<&Changed>) -> Option<BTreeSet<K>> {
    match changed {
        None => Some(BTreeSet::new()),
        Some(Changed::All) => None,
        Some(Changed::Objects(keys)) => Some(keys.iter().filter_map(|k| K::of(k.into())).collect()),
    }
}
