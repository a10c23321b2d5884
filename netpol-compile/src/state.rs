//! The cluster as the agent knows it: typed Kubernetes objects, one store.
//!
//! The agent's sources fill it with the objects as they are; the compiler only reads it.
//! No I/O here.

use std::collections::{BTreeMap, BTreeSet};

use arcstr::ArcStr;
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::api::networking::v1::{NetworkPolicy, ServiceCIDR};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

mod intern;
mod labels;
mod namespace;
mod pod;
mod policy;

pub use labels::Labels;
pub use namespace::NamespaceInfo;
pub use pod::{DeclaredPort, PodDocument, PodIdentity, PodInfo};
pub use policy::Policy;

/// What may have changed in a [`ClusterState`] since a compiler's last compile of it, as
/// its source knows: each set names the objects added, updated or deleted since then,
/// `None` that any of that kind may have (the compiler then compares them all). A
/// compile told of changes reads only those objects: one left out keeps its stale memo.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Changes {
    pub pods: Option<BTreeSet<ObjectRef>>,
    pub policies: Option<BTreeSet<ObjectRef>>,
    /// Namespace objects, by name.
    pub namespaces: Option<BTreeSet<String>>,
    /// ClusterNetworkPolicies, by their key in [`ClusterState::cluster_policies`].
    pub cluster_policies: Option<BTreeSet<String>>,
}

impl Changes {
    /// Any object may have changed (a source that cannot tell, or the first compile).
    pub const ANY: Changes = Changes {
        pods: None,
        policies: None,
        namespaces: None,
        cluster_policies: None,
    };

    /// No object changed.
    pub const NONE: Changes = Changes {
        pods: Some(BTreeSet::new()),
        policies: Some(BTreeSet::new()),
        namespaces: Some(BTreeSet::new()),
        cluster_policies: Some(BTreeSet::new()),
    };

    /// Adds the changes of `later` (a compile that did not happen in between).
    pub fn extend(&mut self, later: Changes) {
        fn union<K: Ord>(known: &mut Option<BTreeSet<K>>, later: Option<BTreeSet<K>>) {
            match (known.as_mut(), later) {
                (Some(known), Some(later)) => known.extend(later),
                _ => *known = None,
            }
        }
        union(&mut self.pods, later.pods);
        union(&mut self.policies, later.policies);
        union(&mut self.namespaces, later.namespaces);
        union(&mut self.cluster_policies, later.cluster_policies);
    }
}

/// `namespace/name` of a namespaced object. Its copies (a pod's entry, a rule's
/// reference, the policies in force) share the two names.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ObjectRef {
    pub namespace: Name,
    pub name: Name,
}

/// A name or a namespace, shared: a copy costs a reference count, not an allocation.
/// One thin pointer (`ArcStr`: the count and length live with the text), so an
/// [`ObjectRef`] is 16 bytes; every pod's key has several copies. Ordered, compared and
/// shown as the text.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Name(ArcStr);

impl Name {
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// `name`, shared with every other `Name` made by this function from an equal text
    /// (interned): for the names many objects repeat, such as the namespace of each of
    /// 150,000 pods (5,000 copies, not 150,000).
    pub fn interned(name: &str) -> Name {
        Name(intern::name(name))
    }
}

impl std::ops::Deref for Name {
    type Target = str;
    fn deref(&self) -> &str {
        &self.0
    }
}

impl std::borrow::Borrow<str> for Name {
    fn borrow(&self) -> &str {
        &self.0
    }
}

impl AsRef<str> for Name {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Display for Name {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Display::fmt(&*self.0, f)
    }
}

impl std::fmt::Debug for Name {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Debug::fmt(&*self.0, f)
    }
}

impl From<&str> for Name {
    fn from(s: &str) -> Self {
        Name(ArcStr::from(s))
    }
}

impl From<String> for Name {
    fn from(s: String) -> Self {
        Name(ArcStr::from(s))
    }
}

impl From<&String> for Name {
    fn from(s: &String) -> Self {
        Name(ArcStr::from(s.as_str()))
    }
}

impl From<&Name> for Name {
    fn from(name: &Name) -> Self {
        name.clone()
    }
}

impl serde::Serialize for Name {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.0)
    }
}

impl From<Name> for String {
    fn from(name: Name) -> Self {
        name.0.to_string()
    }
}

impl PartialEq<str> for Name {
    fn eq(&self, other: &str) -> bool {
        *self.0 == *other
    }
}

impl PartialEq<&str> for Name {
    fn eq(&self, other: &&str) -> bool {
        *self.0 == **other
    }
}

impl PartialEq<String> for Name {
    fn eq(&self, other: &String) -> bool {
        *self.0 == **other
    }
}

impl PartialEq<Name> for str {
    fn eq(&self, other: &Name) -> bool {
        *self == *other.0
    }
}

impl PartialEq<Name> for &str {
    fn eq(&self, other: &Name) -> bool {
        **self == *other.0
    }
}

impl PartialEq<Name> for String {
    fn eq(&self, other: &Name) -> bool {
        **self == *other.0
    }
}

impl ObjectRef {
    pub fn new(namespace: impl Into<Name>, name: impl Into<Name>) -> Self {
        ObjectRef {
            namespace: namespace.into(),
            name: name.into(),
        }
    }

    /// The key of a manifest's policy, whose namespace defaults to `default` (as
    /// `kubectl apply` does): the default is written into the object too.
    pub fn of_policy(policy: &mut NetworkPolicy) -> Self {
        let namespace = policy
            .metadata
            .namespace
            .get_or_insert_with(|| "default".into())
            .clone();
        ObjectRef::new(namespace, policy.metadata.name.clone().unwrap_or_default())
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

/// NetworkPolicy annotation staging the policy: `"true"` means it is read, validated
/// and evaluated beside the policies in force, but not enforced. Connections it would
/// newly drop or newly allow are reported (`staged-drop`, `staged-allow`); removing the
/// annotation enforces it.
pub const STAGED_ANNOTATION: &str = "netpol.dev/staged";

/// Whether `policy` is staged ([`STAGED_ANNOTATION`] is `"true"`).
pub fn is_staged(policy: &NetworkPolicy) -> bool {
    policy
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(STAGED_ANNOTATION))
        .is_some_and(|v| v == "true")
}

/// A part of a policy its source could not read (see
/// [`ClusterState::unreadable_parts`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UnreadablePart {
    /// The field that could not be read, from the object root, e.g.
    /// `spec.ingress[0].from[1].NamespaceSelector`.
    pub field: String,
    /// What is wrong, and what it costs.
    pub message: String,
    /// The part of the object replaced for it, e.g. `spec.ingress[0].from[1]` (a
    /// field path, possibly one the document did not have).
    pub replaced: String,
}

/// Annotation naming a pod's host-side interface: read by local mode's source only (into
/// [`ClusterState::pod_interfaces`]); the compiler never reads it, so in Kubernetes mode no
/// interface name comes from a pod object.
pub const HOST_INTERFACE_ANNOTATION: &str = "netpol.dev/host-interface";

/// Everything the compiler needs to know, and nothing else.
#[derive(Clone, Debug, Default)]
pub struct ClusterState {
    /// What decides verdicts of each namespace ([`NamespaceInfo`]), by name.
    pub namespaces: BTreeMap<String, NamespaceInfo>,
    /// What decides verdicts of each pod ([`PodInfo`]), not the objects.
    pub pods: BTreeMap<ObjectRef, PodInfo>,
    /// Host-side interfaces named for pods by the operator (local mode's manifests,
    /// [`HOST_INTERFACE_ANNOTATION`]), by pod. Only local mode's source fills it; in
    /// Kubernetes mode it stays empty and interfaces are found from the kernel alone.
    /// The datapath still checks each name before using it.
    pub pod_interfaces: BTreeMap<ObjectRef, String>,
    /// As the source has them, valid or not: the compiler admits them. Kept compact
    /// ([`Policy`]: the object's text, read back where a policy's content is read).
    /// Shared: a source that keeps the policy (a store) hands out the same one, and the
    /// compiler knows an unchanged policy by [`Policy::same`].
    pub policies: BTreeMap<ObjectRef, Policy>,
    /// NetworkPolicies the source saw but could not read at all (local mode: a manifest
    /// document naming one whose metadata or podSelector does not parse). Such a policy
    /// keeps the version in force before, if any.
    pub unreadable_policies: BTreeSet<ObjectRef>,
    /// Parts of policies of `policies` the source could not read (local mode: a value of
    /// the wrong type, an unknown field). The object holds, in place of each, a value
    /// that validation rejects at the same path, so that it is left out as anything
    /// that cannot be read is; the diagnostics name the real field.
    pub unreadable_parts: BTreeMap<ObjectRef, Vec<UnreadablePart>>,
    pub node: NodeContext,
    /// Services, their EndpointSlices and the cluster's Service ranges, as the source has
    /// them: kube-proxy translates connections to their addresses after `from_pod`.
    pub services: BTreeMap<ObjectRef, Service>,
    pub endpoint_slices: BTreeMap<ObjectRef, EndpointSlice>,
    /// ServiceCIDR objects (cluster-scoped), by name.
    pub service_cidrs: BTreeMap<String, ServiceCIDR>,
    /// Service ranges the agent was given (`--service-cidr`): for clusters that have no
    /// ServiceCIDR objects.
    pub configured_service_cidrs: Vec<ipnet::IpNet>,
    /// Audit mode for every pod (the agent's `--audit`); namespaces can opt in alone
    /// with [`AUDIT_ANNOTATION`].
    pub audit_all: bool,
    /// Compile staged NetworkPolicies ([`STAGED_ANNOTATION`]) as if they were in force:
    /// the view the agent compares the kernel's verdicts with. Off, they are left out.
    pub enforce_staged: bool,
    /// ClusterNetworkPolicies (cluster-scoped), by name, as the source has them (JSON,
    /// valid or not: they are read by `cnp::read_cnp`).
    pub cluster_policies: BTreeMap<String, serde_json::Value>,
    /// The cluster's nodes, by name: what ClusterNetworkPolicy `nodes` peers select.
    pub nodes: BTreeMap<String, NodePeer>,
}

/// What a `nodes` peer needs of a Node: its labels and its InternalIP and ExternalIP
/// addresses.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NodePeer {
    pub labels: BTreeMap<String, String>,
    pub ips: Vec<std::net::IpAddr>,
}

/// The InternalIP and ExternalIP addresses of a Node, sorted, without duplicates.
pub fn node_addresses(node: &k8s_openapi::api::core::v1::Node) -> Vec<std::net::IpAddr> {
    let mut ips: Vec<std::net::IpAddr> = node
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

impl NodePeer {
    /// The labels and addresses of a Node object.
    pub fn of(node: &k8s_openapi::api::core::v1::Node) -> NodePeer {
        NodePeer {
            labels: node.metadata.labels.clone().unwrap_or_default(),
            ips: node_addresses(node),
        }
    }
}

/// The label the API server puts on every namespace: its name.
pub const NAMESPACE_NAME_LABEL: &str = "kubernetes.io/metadata.name";

impl ClusterState {
    /// The staged NetworkPolicies ([`STAGED_ANNOTATION`]).
    pub fn staged_policies(&self) -> impl Iterator<Item = &ObjectRef> {
        self.policies
            .iter()
            .filter(|(_, np)| np.is_staged())
            .map(|(obj, _)| obj)
    }

    /// Whether the policy `obj` is in force in this view: it exists and is not staged,
    /// or staged policies are compiled as enforced ([`ClusterState::enforce_staged`]).
    pub fn in_force(&self, obj: &ObjectRef) -> bool {
        self.enforce_staged || !self.policies.get(obj).is_some_and(|p| p.is_staged())
    }

    /// A namespace's labels, with [`NAMESPACE_NAME_LABEL`] as the API server sets it
    /// (also for namespaces the state does not hold, which then have only that label).
    pub fn namespace_labels(&self, name: &str) -> BTreeMap<String, String> {
        let mut labels = self
            .namespaces
            .get(name)
            .map(|ns| ns.labels().to_map())
            .unwrap_or_default();
        labels
            .entry(NAMESPACE_NAME_LABEL.to_owned())
            .or_insert_with(|| name.to_owned());
        labels
    }
}

/// The addresses listed in `status.podIPs`, then `status.podIP`, that parse, in order
/// (the same address may come twice).
pub fn pod_ips(pod: &PodInfo) -> impl Iterator<Item = std::net::IpAddr> + '_ {
    pod.listed_ips()
        .chain(pod.pod_ip())
        .filter_map(|text| text.parse().ok())
}

/// Whether the pod has finished (phase `Succeeded` or `Failed`). A finished pod holds no
/// address any more: the API keeps its `status.podIPs`, but the network has already
/// given them back and may have handed them to a new pod.
pub fn is_terminal(pod: &PodInfo) -> bool {
    matches!(pod.phase(), Some("Succeeded" | "Failed"))
}

/// Whether the pod takes part in pod traffic with addresses of its own: not finished
/// and not in the host's network (a hostNetwork pod's addresses are the node's).
pub fn holds_pod_addresses(pod: &PodInfo) -> bool {
    !is_terminal(pod) && !pod.host_network()
}

/// Whether pod `a` holds an address that pod `b` also lists (both
/// [`holds_pod_addresses`]): a stale object and the pod that has the address now. The
/// running pod holds it, then the one created last (the other is an older object the
/// API has not caught up with), then the first in name order, so the choice never
/// depends on the order objects arrived in.
pub fn claims_before(a: (&ObjectRef, &PodInfo), b: (&ObjectRef, &PodInfo)) -> bool {
    claim_order(a, b).0.is_gt()
}

/// Why `a` holds an address that `b` also lists when [`claims_before`] says so: `it is
/// running`, `it was created later` or `it comes first in name order`.
pub fn claim_reason(a: (&ObjectRef, &PodInfo), b: (&ObjectRef, &PodInfo)) -> &'static str {
    claim_order(a, b).1
}

fn claim_order(
    a: (&ObjectRef, &PodInfo),
    b: (&ObjectRef, &PodInfo),
) -> (std::cmp::Ordering, &'static str) {
    fn running(pod: &PodInfo) -> bool {
        pod.phase() == Some("Running")
    }
    fn created(pod: &PodInfo) -> Option<Time> {
        pod.created()
    }
    let by_phase = running(a.1).cmp(&running(b.1));
    if by_phase.is_ne() {
        return (by_phase, "it is running");
    }
    let by_age = created(a.1).cmp(&created(b.1));
    if by_age.is_ne() {
        return (by_age, "it was created later");
    }
    (b.0.cmp(a.0), "it comes first in name order")
}

/// Who holds each pod address: every address of every pod that
/// [`holds_pod_addresses`], an address listed by several going to the one
/// [`claims_before`] the others.
pub fn address_owners(state: &ClusterState) -> BTreeMap<std::net::IpAddr, &ObjectRef> {
    let mut owners: BTreeMap<std::net::IpAddr, (&ObjectRef, &PodInfo)> = BTreeMap::new();
    for (obj, pod) in &state.pods {
        if !holds_pod_addresses(pod) {
            continue;
        }
        for ip in pod_ips(pod) {
            let claim = owners.entry(ip).or_insert((obj, pod));
            if claims_before((obj, pod), *claim) {
                *claim = (obj, pod);
            }
        }
    }
    owners.into_iter().map(|(ip, (obj, _))| (ip, obj)).collect()
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
    pub fn is_local(&self, pod: &PodInfo) -> bool {
        match &self.name {
            None => true,
            Some(name) => pod.node_name() == Some(name),
        }
    }
}
