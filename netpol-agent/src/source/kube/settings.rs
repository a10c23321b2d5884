//! What the Kubernetes source watches, and how it behaves.

use std::time::Duration;

/// The watched resources.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Watched {
    Namespaces,
    Pods,
    NetworkPolicies,
    /// This node's Node object.
    Node,
    Services,
    EndpointSlices,
    /// ServiceCIDR objects (networking.k8s.io/v1, Kubernetes 1.33+): optional, see
    /// [`Watched::REQUIRED`].
    ServiceCidrs,
    /// ClusterNetworkPolicies (policy.networking.k8s.io/v1alpha2, a CRD): required, but
    /// a cluster that does not serve them (the CRD is not installed) has none, which the
    /// watch reports as an empty list.
    ClusterNetworkPolicies,
}

impl Watched {
    pub const ALL: [Watched; 8] = [
        Watched::Namespaces,
        Watched::Pods,
        Watched::NetworkPolicies,
        Watched::Node,
        Watched::Services,
        Watched::EndpointSlices,
        Watched::ServiceCidrs,
        Watched::ClusterNetworkPolicies,
    ];

    /// What must be listed before anything is programmed. ServiceCIDRs are not: a
    /// cluster that does not serve them (older than 1.33, or the API turned off) has its
    /// Service ranges from `--service-cidr`, and its ClusterIPs from the Services.
    /// ClusterNetworkPolicies are: an admin's Deny must hold from the first program.
    pub const REQUIRED: [Watched; 7] = [
        Watched::Namespaces,
        Watched::Pods,
        Watched::NetworkPolicies,
        Watched::Node,
        Watched::Services,
        Watched::EndpointSlices,
        Watched::ClusterNetworkPolicies,
    ];

    /// The API resource name.
    pub fn resource(self) -> &'static str {
        match self {
            Watched::Namespaces => "namespaces",
            Watched::Pods => "pods",
            Watched::NetworkPolicies => "networkpolicies",
            Watched::Node => "nodes",
            Watched::Services => "services",
            Watched::EndpointSlices => "endpointslices",
            Watched::ServiceCidrs => "servicecidrs",
            Watched::ClusterNetworkPolicies => "clusternetworkpolicies",
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
