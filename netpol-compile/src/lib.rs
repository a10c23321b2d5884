//! The pure core of netpol: the cluster state ([`state`]), the compiler from
//! [`ClusterState`] to the desired BPF map contents, its model of the kernel lookup
//! ([`model`]), the reference evaluator ([`reference`]) and diagnostics.
//!
//! No I/O happens here, and Cargo enforces it: this crate depends on no aya, no kube
//! client and no tokio. A [`Compiler`] (or the cold [`compile`]) reads the typed
//! Kubernetes objects and returns [`Compiled`], which the agent's `datapath/` diffs
//! against the kernel. Semantics are exactly those
//! of `networking.k8s.io/v1` NetworkPolicy:
//!
//! - A pod is isolated in a direction when some policy of its namespace selects it
//!   with that policy type (policyTypes defaulting: Ingress always, Egress when egress
//!   rules exist). What is allowed is the union of the rules of those policies.
//! - Peers are classified into *identities*: two addresses share an identity when every
//!   peer in force (selector pairs and ipBlocks of policies that select a local pod)
//!   treats them alike and, for egress named ports, they resolve names alike. IPCACHE
//!   maps every pod IP, node IP, ipBlock cidr and except prefix to its identity; the
//!   kernel's longest-prefix match then decides ipBlock membership exactly.
//! - POLICY holds, per local endpoint, direction, allowing rule, matched identity (or
//!   [`IDENTITY_ANY`](netpol_common::IDENTITY_ANY)) and port prefix, the id of the
//!   rule ([`Compiled::rules`]; stable while the rule exists). Its size grows with endpoints × identities they allow, never
//!   with pods × rules of the cluster.
//!
//! Admission happens here, once: each policy is read when it changes, as the API server
//! reads it, and what cannot be read is reported in [`Compiled::diagnostics`] and never
//! allows anything nor isolates less (docs/SECURITY.md): a peer, port or rule that
//! cannot be read is left out, a podSelector that cannot be read in full isolates at
//! least the pods meant, without rules. The current object always wins; only when
//! nothing of it can be read does the version a [`Compiler`] had in force stay.
//! Everything else keeps working. [`model::lookup`] replays the kernel's decision over a
//! [`Compiled`], and [`reference`] evaluates the same semantics directly over the
//! objects, so the two can be compared (see the differential property test).

mod admission;
mod cache;
pub mod cnp;
mod compiler;
mod diagnostics;
#[cfg(any(test, feature = "testing"))]
pub mod differential;
mod identity;
mod kept_map;
pub mod layered;
mod lpm;
pub mod model;
mod policy;
pub mod policy_maps;
mod ports;
pub mod reference;
mod selector;
pub mod services;
mod sparing;
pub mod state;
#[cfg(any(test, feature = "testing"))]
pub mod testutil;

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::Arc;

use netpol_common::{
    Addr, DIR_EGRESS, DIR_INGRESS, EndpointInfo, IDENTITY_WORLD, PeerInfo, PolicyKey, PolicyValue,
};

use crate::state::{ClusterState, ObjectRef};

pub use compiler::{Compiler, compile};
pub use diagnostics::{Diagnostic, Kind, ObjectName, Subject};
pub use identity::{Allocations, IdentitySignature, NamedPortResolution, TierGroup, TierGroupKey};
pub use kept_map::KeptMap;
pub use lpm::{Lpm, LpmData, addr, host_key, key_net, net_key};
pub use policy::{FieldError, validate_policy};
pub use ports::{PortPrefix, port_prefixes};
/// Label selectors, validated as the API server does and matched (the compiler's own).
pub use selector::{
    LabelSet, Selector, check_key as check_label_key, check_value as check_label_value,
};

/// Direction of a rule or decision, from the selected pod's point of view.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Direction {
    Ingress,
    Egress,
}

impl Direction {
    pub const BOTH: [Direction; 2] = [Direction::Ingress, Direction::Egress];

    /// The `DIR_*` value used in POLICY keys.
    pub fn as_u8(self) -> u8 {
        match self {
            Direction::Ingress => DIR_INGRESS,
            Direction::Egress => DIR_EGRESS,
        }
    }

    /// `(local, remote)` of a flow `src -> dst` judged at this direction's hook: the
    /// local end is the destination for ingress, the source for egress.
    pub fn ends<T>(self, src: T, dst: T) -> (T, T) {
        match self {
            Direction::Ingress => (dst, src),
            Direction::Egress => (src, dst),
        }
    }

    /// This direction's place in per-direction arrays (ingress, then egress: the order
    /// of [`Direction::BOTH`]).
    pub fn index(self) -> usize {
        match self {
            Direction::Ingress => 0,
            Direction::Egress => 1,
        }
    }

    /// The other direction.
    pub fn reverse(self) -> Direction {
        match self {
            Direction::Ingress => Direction::Egress,
            Direction::Egress => Direction::Ingress,
        }
    }

    /// The `spec` field holding this direction's rules.
    pub fn field(self) -> &'static str {
        match self {
            Direction::Ingress => "ingress",
            Direction::Egress => "egress",
        }
    }
}

impl std::fmt::Display for Direction {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Direction::Ingress => "Ingress",
            Direction::Egress => "Egress",
        })
    }
}

/// Desired contents of the maps, plus what explaining and reporting need.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Compiled {
    /// ENDPOINTS: every address of every local, non-hostNetwork, live pod with an IP.
    pub endpoints: BTreeMap<Addr, EndpointInfo>,
    /// IPCACHE: pod IPs, node IPs, ipBlock cidr and except prefixes. Kept by the
    /// [`Compiler`] from one compile to the next, with its version and the keys it
    /// changed ([`KeptMap`]).
    pub ipcache: KeptMap<Lpm<Addr>, PeerInfo>,
    /// POLICY: allow entries; the value is the id of the rule, see [`Compiled::rules`].
    /// Kept by the [`Compiler`] as IPCACHE is ([`KeptMap`]): the same version as the
    /// previous result's when no endpoint's entries changed.
    pub policy: KeptMap<Lpm<PolicyKey>, PolicyValue>,
    /// The local endpoints, by pod.
    pub local_pods: Vec<LocalPod>,
    /// Rule table: id (`PolicyValue::rule`, also the RULE_COUNTERS index) → rule, for
    /// every rule in force (of every policy, as far as it can be read). A rule keeps its id while it exists; a new rule
    /// takes the lowest free id (see [`Allocations`]). Shared with the allocations, and
    /// from one compile to the next while the rules stay the same
    /// ([`layered::Layered::same`]); patched, not copied, when some policies' rules change.
    pub rules: RuleTable,
    /// What each identity stands for (including `IDENTITY_ANY` and `IDENTITY_WORLD`).
    pub identities: BTreeMap<u32, IdentityInfo>,
    /// The policies in force, in order: every policy of the state as far as it can be
    /// read, and the version in force before of one that cannot be read at all (see
    /// [`Compiler`]).
    pub policies: Arc<[ObjectRef]>,
    /// Problems with objects; the objects concerned are left out (wholly or partly).
    pub diagnostics: Vec<Diagnostic>,
    /// NODE_PORTS: ports kube-proxy translates on this node's addresses (NodePorts, and
    /// Service ports of externalIPs that are node addresses).
    pub node_ports: std::collections::BTreeSet<netpol_common::ServicePort>,
    /// Pass back into the next [`compile`] to keep ids stable. Shared with the
    /// [`Compiler`] that made them (at 150,000 pods they number about 190,000 addresses).
    pub allocations: std::sync::Arc<Allocations>,
}

/// One local endpoint.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LocalPod {
    pub pod: ObjectRef,
    pub endpoint_id: u32,
    pub ips: Vec<IpAddr>,
    /// The host-side interface the operator named for the pod
    /// ([`state::ClusterState::pod_interfaces`]: local mode only; never from the pod
    /// object). The datapath checks it against the kernel before using it.
    pub host_interface: Option<String>,
    /// Policies in force selecting the pod with policy type Ingress.
    pub ingress_policies: Vec<ObjectRef>,
    /// Policies in force selecting the pod with policy type Egress.
    pub egress_policies: Vec<ObjectRef>,
}

/// The rules in force by id ([`Compiled::rules`]).
pub type RuleTable = layered::Layered<u32, RuleRef>;

/// A rule of a policy: `spec.<direction>[index]` of `policy`, a NetworkPolicy or (with
/// `cluster`) a ClusterNetworkPolicy, whose `policy` has an empty namespace.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct RuleRef {
    pub policy: ObjectRef,
    pub direction: Direction,
    pub index: usize,
    /// A ClusterNetworkPolicy's rule: its tier, priority, action and name.
    pub cluster: Option<ClusterRule>,
}

/// What names a ClusterNetworkPolicy's rule besides its place.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ClusterRule {
    pub tier: cnp::Tier,
    pub priority: u16,
    pub action: cnp::Action,
    /// The rule's `name`, if it has one.
    pub name: Option<String>,
}

impl RuleRef {
    /// `spec.<direction>[index]` of the NetworkPolicy `policy`.
    pub fn network_policy(policy: ObjectRef, direction: Direction, index: usize) -> RuleRef {
        RuleRef {
            policy,
            direction,
            index,
            cluster: None,
        }
    }

    /// The kind and name of the policy: `NetworkPolicy x/p`,
    /// `ClusterNetworkPolicy/deny-sys (Admin, priority 10)`.
    pub fn policy_name(&self) -> String {
        match &self.cluster {
            None => format!("NetworkPolicy {}", self.policy),
            Some(c) => format!(
                "ClusterNetworkPolicy/{} ({}, priority {})",
                self.policy.name, c.tier, c.priority
            ),
        }
    }
}

impl std::fmt::Display for RuleRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let field = self.direction.field();
        match &self.cluster {
            None => write!(
                f,
                "NetworkPolicy {} spec.{field}[{}]",
                self.policy, self.index
            ),
            Some(ClusterRule {
                name: Some(name), ..
            }) => {
                write!(f, "{} {field} rule {name:?}", self.policy_name())
            }
            Some(_) => write!(f, "{} spec.{field}[{}]", self.policy_name(), self.index),
        }
    }
}

/// What an identity stands for. Its members are listed on demand by
/// [`Compiled::members`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IdentityInfo {
    pub signature: IdentitySignature,
    /// One line for humans, e.g. `matches [pods {app=web} in namespace x]`.
    pub description: String,
}

impl Compiled {
    /// The IPCACHE entries carrying `identity`, in key order, for humans: `pod x/a
    /// 10.0.0.1`, `node 10.0.0.254`, `10.0.0.0/8`; the world's list starts with `every
    /// address no IPCACHE entry covers`. `state` must be the state this was compiled
    /// from (it names the pods); built on demand, as only explaining needs it.
    pub fn members(&self, state: &ClusterState, identity: u32) -> Vec<String> {
        // An address belongs to the pod that holds it, as in the compile.
        let owners = crate::state::address_owners(state);
        let mut out = Vec::new();
        if identity == IDENTITY_WORLD {
            out.push("every address no IPCACHE entry covers".to_string());
        }
        for (key, info) in &self.ipcache {
            let Some(net) = key_net(key).filter(|_| info.identity == identity) else {
                continue;
            };
            let ip = net.addr();
            let host = net.prefix_len() == net.max_prefix_len();
            out.push(match owners.get(&ip) {
                Some(pod) if host => format!("pod {pod} {ip}"),
                None if host && state.node.ips.contains(&ip) => format!("node {ip}"),
                _ => net.to_string(),
            });
        }
        out
    }
}

/// `TCP`, `UDP`, `SCTP`, or the number.
pub fn protocol_name(protocol: u8) -> String {
    match protocol {
        netpol_common::PROTO_TCP => "TCP".into(),
        netpol_common::PROTO_UDP => "UDP".into(),
        netpol_common::PROTO_SCTP => "SCTP".into(),
        n => n.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rule_ref_display() {
        let r = RuleRef::network_policy(ObjectRef::new("x", "p"), Direction::Egress, 2);
        assert_eq!(r.to_string(), "NetworkPolicy x/p spec.egress[2]");
        let mut cluster = RuleRef {
            policy: ObjectRef::new("", "deny-kube-system"),
            direction: Direction::Ingress,
            index: 0,
            cluster: Some(ClusterRule {
                tier: cnp::Tier::Admin,
                priority: 10,
                action: cnp::Action::Deny,
                name: Some("deny-sys".into()),
            }),
        };
        assert_eq!(
            cluster.to_string(),
            "ClusterNetworkPolicy/deny-kube-system (Admin, priority 10) ingress rule \"deny-sys\""
        );
        cluster.cluster.as_mut().unwrap().name = None;
        assert_eq!(
            cluster.to_string(),
            "ClusterNetworkPolicy/deny-kube-system (Admin, priority 10) spec.ingress[0]"
        );
    }
}
