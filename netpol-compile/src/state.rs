//! The cluster as the agent knows it: typed Kubernetes objects, one store.
//!
//! The agent's sources fill it with the objects as they are; the compiler only reads it.
//! No I/O here.

use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::api::core::v1::{Namespace, Pod};
use k8s_openapi::api::networking::v1::NetworkPolicy;

/// `namespace/name` of a namespaced object.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ObjectRef {
    pub namespace: String,
    pub name: String,
}

impl ObjectRef {
    pub fn new(namespace: impl Into<String>, name: impl Into<String>) -> Self {
        ObjectRef {
            namespace: namespace.into(),
            name: name.into(),
        }
    }
}

impl std::fmt::Display for ObjectRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// Namespace annotation turning on audit mode for its pods: `"true"` means would-be
/// drops are logged and counted as `audit` but let through.
pub const AUDIT_ANNOTATION: &str = "netpol.dev/audit";

/// Annotation naming a pod's host-side interface (local mode; optional).
pub const HOST_INTERFACE_ANNOTATION: &str = "netpol.dev/host-interface";

/// Everything the compiler needs to know, and nothing else.
#[derive(Clone, Debug, Default)]
pub struct ClusterState {
    /// By name.
    pub namespaces: BTreeMap<String, Namespace>,
    pub pods: BTreeMap<ObjectRef, Pod>,
    /// As the source has them, valid or not: the compiler admits them.
    pub policies: BTreeMap<ObjectRef, NetworkPolicy>,
    /// NetworkPolicies the source saw but could not read (local mode: a manifest
    /// document naming one that does not parse). Like a policy whose new version is
    /// invalid, such a policy keeps its last valid version in force.
    pub unreadable_policies: BTreeSet<ObjectRef>,
    pub node: NodeContext,
    /// Audit mode for every pod (the agent's `--audit`); namespaces can opt in alone
    /// with [`AUDIT_ANNOTATION`].
    pub audit_all: bool,
}

/// The label the API server puts on every namespace: its name.
pub const NAMESPACE_NAME_LABEL: &str = "kubernetes.io/metadata.name";

impl ClusterState {
    /// A namespace's labels, with [`NAMESPACE_NAME_LABEL`] as the API server sets it
    /// (also for namespaces the state does not hold, which then have only that label).
    pub fn namespace_labels(&self, name: &str) -> BTreeMap<String, String> {
        let mut labels = self
            .namespaces
            .get(name)
            .and_then(|ns| ns.metadata.labels.clone())
            .unwrap_or_default();
        labels
            .entry(NAMESPACE_NAME_LABEL.to_owned())
            .or_insert_with(|| name.to_owned());
        labels
    }
}

/// The addresses listed in `status.podIPs`, then `status.podIP`, that parse, in order
/// (the same address may come twice).
pub fn pod_ips(pod: &Pod) -> impl Iterator<Item = std::net::IpAddr> + '_ {
    let status = pod.status.as_ref();
    let listed = status
        .and_then(|s| s.pod_ips.as_deref())
        .unwrap_or_default()
        .iter()
        .map(|p| p.ip.as_str());
    listed
        .chain(status.and_then(|s| s.pod_ip.as_deref()))
        .filter_map(|text| text.parse().ok())
}

/// The node this agent enforces on.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NodeContext {
    /// `None`: every pod in the state runs on this node (local mode default).
    /// `Some(n)`: only pods whose `spec.nodeName` is `n` are local; the rest are peers.
    pub name: Option<String>,
    /// Addresses of this node: traffic from them to local pods always passes.
    pub ips: Vec<std::net::IpAddr>,
}

impl NodeContext {
    pub fn is_local(&self, pod: &Pod) -> bool {
        match &self.name {
            None => true,
            Some(name) => pod.spec.as_ref().and_then(|s| s.node_name.as_deref()) == Some(name),
        }
    }
}
