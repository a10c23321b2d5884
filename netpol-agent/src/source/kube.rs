//! Kubernetes mode: cluster state from the API server, through kube-rs watchers, the
//! agent's own compact store for pods, NetworkPolicies and Namespaces, and reflector
//! stores for the other kinds.
//!
//! [`KubeSource`] is the [`Source`]; it reads a [`ClusterWatch`] (the watchers and their
//! stores) and adds the node context. The rooms: [`settings`] (what is watched, how),
//! [`incidents`] (failures, one log line per incident, and the backoff), [`watch`] (one
//! watcher task), [`watches`] (the stores, batching and snapshots), [`changes`] (what
//! changed since the last snapshot: a snapshot copies only that), [`store`] (the compact
//! store: by name, what the agent keeps of each object), [`pod`] (pods read straight into
//! `PodInfo`), [`compact`] (NetworkPolicies and Namespaces read as their compact `Policy`
//! and `NamespaceInfo`), [`events`]
//! (diagnostics published as Kubernetes Events), `streams` and `trim`.
//!
//! One watcher per resource: Namespaces, Pods and NetworkPolicies of the whole cluster
//! (peers live everywhere) and this node's Node object (its addresses). Each runs list +
//! watch with bookmarks, resumes from the last resourceVersion when a stream breaks,
//! re-lists when the version has expired (410 Gone, as an ERROR event or as the HTTP
//! status of the watch request) and backs off exponentially on errors. Objects are
//! trimmed ([`trim`]) before they enter the stores; pods are parsed into what is kept
//! of them ([`pod`]), never built whole.
//!
//! Never a partial view: [`ClusterWatch::changed`] reports no change before every watcher
//! has completed its initial list, and a re-list replaces a store atomically when it is
//! complete (the store keeps the old contents meanwhile). Afterwards bursts of events are
//! batched (quiet for `debounce`, at most `max_delay` after the first).
//!
//! Failures are logged once per incident, one line for all the resources it hit, e.g.
//! `Kubernetes API: watch streams broke (namespaces, pods): ...; resuming from the last
//! resourceVersion`; repeats within [`incidents::INCIDENT_QUIET`] go to debug.
//!
//! Objects are mirrored as they are; the compiler admits policies, as far as they can be
//! read (docs/SECURITY.md). What the compiler reports about a
//! NetworkPolicy (invalid) or a Pod (not programmed) is published, when enabled, as
//! `events.k8s.io/v1` Events on the object ([`ClusterWatch::report`]).

mod changes;
mod compact;
mod events;
mod incidents;
pub(crate) mod pod;
mod settings;
mod store;
mod streams;
pub(crate) mod trim;
mod watch;
mod watches;

use std::path::Path;
use std::time::Duration;

use ::kube::config::{KubeConfigOptions, Kubeconfig};
use netpol_compile::Diagnostic;
use netpol_compile::state::{ClusterState, NodeContext};

pub use settings::Settings;
pub use watches::{ClusterWatch, Snapshot};

use super::{Error, Source, Update};

/// Kubernetes mode's [`Source`]: the API server's objects, through a [`ClusterWatch`].
pub struct KubeSource {
    watch: ClusterWatch,
    node_name: String,
    poll: Duration,
}

impl KubeSource {
    /// `poll`: longest wait in [`Source::changed`].
    pub fn new(watch: ClusterWatch, node_name: String, poll: Duration) -> Self {
        KubeSource {
            watch,
            node_name,
            poll,
        }
    }
}

impl Source for KubeSource {
    async fn changed(&mut self) -> Result<bool, Error> {
        self.watch.changed(self.poll).await
    }

    fn snapshot(&mut self, state: &mut ClusterState) -> Result<Update, Error> {
        let snapshot = self.watch.snapshot(state);
        // No interface name ever comes from the API: pods' host interfaces are found
        // from the kernel alone (a pod object naming one, e.g. the node's uplink, would
        // otherwise choose what the agent attaches to).
        state.pod_interfaces.clear();
        // The Node object's addresses, and the addresses of this network namespace
        // (the agent runs with hostNetwork): bridge CNIs source host-to-pod traffic
        // from the bridge's address, which no Node object lists.
        let mut ips = snapshot.node_ips;
        ips.extend(crate::node::addresses_or_none());
        ips.sort();
        ips.dedup();
        state.node = NodeContext {
            name: Some(self.node_name.clone()),
            ips,
        };
        Ok(Update {
            diagnostics: Vec::new(),
            generation: snapshot.generation,
            changes: snapshot.changes,
        })
    }

    fn report(&mut self, new: &[Diagnostic]) {
        self.watch.report(new);
    }

    fn unchanged_generation(&mut self) -> Option<u64> {
        self.watch.unchanged_generation()
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

/// The API resource of ClusterNetworkPolicies (`policy.networking.k8s.io/v1alpha2`,
/// `clusternetworkpolicies`), read as `DynamicObject`s: the compiler reads their `spec`.
pub(crate) fn cluster_policy_resource() -> ::kube::api::ApiResource {
    ::kube::api::ApiResource::from_gvk_with_plural(
        &::kube::api::GroupVersionKind::gvk(
            "policy.networking.k8s.io",
            "v1alpha2",
            netpol_compile::cnp::KIND,
        ),
        "clusternetworkpolicies",
    )
}

/// Log directives the binary adds to its default filter: kube-client warns about every
/// broken watch stream itself (`eof in poll`, one line per stream); the source reports
/// those as one line per incident instead.
pub const LOG_DIRECTIVES: &str = "kube_client::client=error";
