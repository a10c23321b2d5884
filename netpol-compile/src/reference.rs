//! A straightforward reference evaluator of NetworkPolicy semantics.
//!
//! It answers "is this new flow allowed at this hook?" directly over the Kubernetes
//! objects in a [`ClusterState`]: no identities, no prefixes, no maps, written to be
//! obviously right rather than fast. The compiler and [`super::model`] must agree with
//! it on every input; the differential property test checks that. Only validation
//! ([`validate_policy`]) is shared, so that both sides leave out the same objects.

use std::collections::BTreeMap;
use std::net::IpAddr;

use ipnet::IpNet;
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::api::networking::v1::{NetworkPolicy, NetworkPolicyPeer, NetworkPolicyPort};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use netpol_common::{PROTO_SCTP, PROTO_TCP, PROTO_UDP};

use super::{Direction, RuleRef, validate_policy};
use crate::state::{ClusterState, ObjectRef};

/// The reference verdict for one hook.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// The address judged at this hook is not a local pod: nothing to enforce here.
    NotEndpoint,
    /// No policy isolates the pod in this direction.
    NotIsolated,
    /// Ingress from the pod's own node.
    FromHost,
    /// Allowed by these rules (every one that matches).
    Allowed(Vec<RuleRef>),
    Denied,
}

impl Verdict {
    pub fn allowed(&self) -> bool {
        !matches!(self, Verdict::Denied)
    }
}

/// The verdict for a new flow `src -> dst` at `direction`'s hook of the pod that owns
/// `dst` (ingress) or `src` (egress).
pub fn evaluate(
    state: &ClusterState,
    src: IpAddr,
    dst: IpAddr,
    protocol: u8,
    port: u16,
    direction: Direction,
) -> Verdict {
    Reference::new(state).evaluate(src, dst, protocol, port, direction)
}

/// Whether a new flow passes both hooks on this node.
pub fn flow_allowed(
    state: &ClusterState,
    src: IpAddr,
    dst: IpAddr,
    protocol: u8,
    port: u16,
) -> bool {
    Reference::new(state).flow_allowed(src, dst, protocol, port)
}

/// The reference evaluator over one state, with the valid policies picked once.
pub struct Reference<'a> {
    state: &'a ClusterState,
    valid: Vec<(&'a ObjectRef, &'a NetworkPolicy)>,
}

impl<'a> Reference<'a> {
    pub fn new(state: &'a ClusterState) -> Self {
        let valid = state
            .policies
            .iter()
            .filter(|(_, np)| validate_policy(np).is_ok())
            .collect();
        Reference { state, valid }
    }

    /// Whether a new flow passes both hooks on this node.
    pub fn flow_allowed(&self, src: IpAddr, dst: IpAddr, protocol: u8, port: u16) -> bool {
        self.evaluate(src, dst, protocol, port, Direction::Egress)
            .allowed()
            && self
                .evaluate(src, dst, protocol, port, Direction::Ingress)
                .allowed()
    }

    /// See [`evaluate`].
    pub fn evaluate(
        &self,
        src: IpAddr,
        dst: IpAddr,
        protocol: u8,
        port: u16,
        direction: Direction,
    ) -> Verdict {
        let state = self.state;
        let (local, remote) = match direction {
            Direction::Ingress => (dst, src),
            Direction::Egress => (src, dst),
        };
        let Some((pod_ref, pod)) = pod_with_ip(state, local) else {
            return Verdict::NotEndpoint;
        };
        if !state.node.is_local(pod) {
            return Verdict::NotEndpoint;
        }
        let selecting: Vec<(&ObjectRef, &NetworkPolicy)> = self
            .valid
            .iter()
            .copied()
            .filter(|(_, np)| np.metadata.namespace.as_deref() == Some(pod_ref.namespace.as_str()))
            .filter(|(_, np)| {
                let spec = np.spec.clone().unwrap_or_default();
                selector_matches(&spec.pod_selector.unwrap_or_default(), pod_labels(pod))
            })
            .filter(|(_, np)| has_policy_type(np, direction))
            .collect();
        if selecting.is_empty() {
            return Verdict::NotIsolated;
        }
        if direction == Direction::Ingress && state.node.ips.contains(&src) {
            return Verdict::FromHost;
        }
        // The pod at the far end, if the far end is a pod; and the destination pod.
        let remote_pod = pod_with_ip(state, remote);
        let dst_pod = match direction {
            Direction::Ingress => Some(pod),
            Direction::Egress => remote_pod.map(|(_, p)| p),
        };
        let mut allowing = Vec::new();
        for (obj, np) in selecting {
            let spec = np.spec.clone().unwrap_or_default();
            let rules: Vec<RuleParts> = match direction {
                Direction::Ingress => spec
                    .ingress
                    .unwrap_or_default()
                    .into_iter()
                    .map(|r| (r.from, r.ports))
                    .collect(),
                Direction::Egress => spec
                    .egress
                    .unwrap_or_default()
                    .into_iter()
                    .map(|r| (r.to, r.ports))
                    .collect(),
            };
            for (index, (peers, ports)) in rules.into_iter().enumerate() {
                let peer_ok = match peers.as_deref() {
                    None | Some([]) => true,
                    Some(list) => list
                        .iter()
                        .any(|peer| peer_matches(state, &obj.namespace, peer, remote, remote_pod)),
                };
                let port_ok = match ports.as_deref() {
                    None | Some([]) => true,
                    Some(list) => list
                        .iter()
                        .any(|p| port_matches(p, protocol, port, dst_pod)),
                };
                if peer_ok && port_ok {
                    allowing.push(RuleRef {
                        policy: obj.clone(),
                        direction,
                        index,
                    });
                }
            }
        }
        if allowing.is_empty() {
            Verdict::Denied
        } else {
            Verdict::Allowed(allowing)
        }
    }
}

/// A rule's peers (`from` or `to`) and ports.
type RuleParts = (
    Option<Vec<NetworkPolicyPeer>>,
    Option<Vec<NetworkPolicyPort>>,
);

static EMPTY: BTreeMap<String, String> = BTreeMap::new();

fn pod_labels(pod: &Pod) -> &BTreeMap<String, String> {
    pod.metadata.labels.as_ref().unwrap_or(&EMPTY)
}

/// The pod network pod (running or pending, not hostNetwork) owning `ip`.
fn pod_with_ip(state: &ClusterState, ip: IpAddr) -> Option<(&ObjectRef, &Pod)> {
    state.pods.iter().find(|(_, pod)| {
        let Some(status) = &pod.status else {
            return false;
        };
        if matches!(status.phase.as_deref(), Some("Succeeded" | "Failed")) {
            return false;
        }
        if pod.spec.as_ref().and_then(|s| s.host_network) == Some(true) {
            return false;
        }
        let mut ips = status
            .pod_ips
            .iter()
            .flatten()
            .map(|p| p.ip.as_str())
            .chain(status.pod_ip.as_deref());
        ips.any(|s| s.parse::<IpAddr>() == Ok(ip))
    })
}

fn has_policy_type(np: &NetworkPolicy, direction: Direction) -> bool {
    let spec = np.spec.clone().unwrap_or_default();
    let types = spec.policy_types.unwrap_or_default();
    if types.is_empty() {
        match direction {
            Direction::Ingress => true,
            Direction::Egress => !spec.egress.unwrap_or_default().is_empty(),
        }
    } else {
        let wanted = match direction {
            Direction::Ingress => "Ingress",
            Direction::Egress => "Egress",
        };
        types.iter().any(|t| t == wanted)
    }
}

fn selector_matches(sel: &LabelSelector, labels: &BTreeMap<String, String>) -> bool {
    for (k, v) in sel.match_labels.iter().flatten() {
        if labels.get(k) != Some(v) {
            return false;
        }
    }
    for expr in sel.match_expressions.iter().flatten() {
        let values = expr.values.clone().unwrap_or_default();
        let value = labels.get(&expr.key);
        let ok = match expr.operator.as_str() {
            "In" => value.is_some_and(|v| values.contains(v)),
            "NotIn" => !value.is_some_and(|v| values.contains(v)),
            "Exists" => value.is_some(),
            "DoesNotExist" => value.is_none(),
            _ => false,
        };
        if !ok {
            return false;
        }
    }
    true
}

/// Deliberately not `ClusterState::namespace_labels`: the reference shares no code with
/// what it checks.
fn namespace_labels(state: &ClusterState, name: &str) -> BTreeMap<String, String> {
    let mut labels = state
        .namespaces
        .get(name)
        .and_then(|ns| ns.metadata.labels.clone())
        .unwrap_or_default();
    labels
        .entry("kubernetes.io/metadata.name".into())
        .or_insert_with(|| name.to_string());
    labels
}

fn in_cidr(cidr: &str, ip: IpAddr) -> bool {
    cidr.parse::<IpNet>()
        .is_ok_and(|net| net.trunc().contains(&ip))
}

/// Whether the far end (`ip`, and its pod if it is one) is one of `peer`.
pub fn peer_matches(
    state: &ClusterState,
    policy_namespace: &str,
    peer: &NetworkPolicyPeer,
    ip: IpAddr,
    pod: Option<(&ObjectRef, &Pod)>,
) -> bool {
    if let Some(block) = &peer.ip_block {
        return in_cidr(&block.cidr, ip) && !block.except.iter().flatten().any(|e| in_cidr(e, ip));
    }
    let Some((obj, pod)) = pod else { return false };
    let namespace_ok = match &peer.namespace_selector {
        None => obj.namespace == policy_namespace,
        Some(sel) => selector_matches(sel, &namespace_labels(state, &obj.namespace)),
    };
    let pod_ok = match &peer.pod_selector {
        None => true,
        Some(sel) => selector_matches(sel, pod_labels(pod)),
    };
    namespace_ok && pod_ok
}

/// The protocol number of a policy's or container port's protocol (TCP when absent, 0
/// when unknown).
pub fn protocol_of(name: Option<&str>) -> u8 {
    match name.unwrap_or("TCP") {
        "TCP" => PROTO_TCP,
        "UDP" => PROTO_UDP,
        "SCTP" => PROTO_SCTP,
        _ => 0,
    }
}

/// Whether a flow to `port`/`protocol` of `dst_pod` (named ports resolve there) is one of
/// the entry `p`.
pub fn port_matches(p: &NetworkPolicyPort, protocol: u8, port: u16, dst_pod: Option<&Pod>) -> bool {
    if protocol_of(p.protocol.as_deref()) != protocol {
        return false;
    }
    match &p.port {
        None => true,
        Some(IntOrString::Int(start)) => {
            let end = p.end_port.unwrap_or(*start);
            (*start..=end).contains(&i32::from(port))
        }
        Some(IntOrString::String(name)) => {
            let Some(pod) = dst_pod else { return false };
            named_port(pod, name, protocol) == Some(i32::from(port))
        }
    }
}

/// The port a named container port resolves to on `pod`: the first container port with
/// this name and protocol.
pub fn named_port(pod: &Pod, name: &str, protocol: u8) -> Option<i32> {
    let containers = pod.spec.iter().flat_map(|s| s.containers.iter());
    containers
        .flat_map(|c| c.ports.iter().flatten())
        .find(|cp| {
            cp.name.as_deref() == Some(name) && protocol_of(cp.protocol.as_deref()) == protocol
        })
        .map(|cp| cp.container_port)
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::testutil::{Cluster, ip};

    #[test]
    fn reference_basics() {
        let c = Cluster::new()
            .ns("x", &[])
            .ns("y", &[("team", "a")])
            .pod(
                "x",
                "a",
                &[("app", "a")],
                &["10.0.0.1"],
                &[("http", 8080, "TCP")],
            )
            .pod("x", "b", &[("app", "b")], &["10.0.0.2"], &[])
            .pod("y", "c", &[], &["10.0.1.3"], &[])
            .policy(
                "x",
                "allow",
                json!({"podSelector": {"matchLabels": {"app": "a"}},
                "ingress": [{"from": [{"podSelector": {}}], "ports": [{"port": "http"}]},
                            {"from": [{"namespaceSelector": {"matchLabels": {"team": "a"}}}]}]}),
            )
            .node_ips(&["10.0.9.9"])
            .state;
        let eval =
            |src, dst, port| evaluate(&c, ip(src), ip(dst), PROTO_TCP, port, Direction::Ingress);
        let rule = |index| RuleRef {
            policy: ObjectRef::new("x", "allow"),
            direction: Direction::Ingress,
            index,
        };
        assert_eq!(
            eval("10.0.0.2", "10.0.0.1", 8080),
            Verdict::Allowed(vec![rule(0)])
        );
        assert_eq!(eval("10.0.0.2", "10.0.0.1", 80), Verdict::Denied);
        assert_eq!(
            eval("10.0.1.3", "10.0.0.1", 80),
            Verdict::Allowed(vec![rule(1)])
        );
        assert_eq!(eval("10.0.9.9", "10.0.0.1", 80), Verdict::FromHost);
        assert_eq!(eval("10.0.0.1", "10.0.0.2", 80), Verdict::NotIsolated);
        assert_eq!(eval("10.0.0.1", "10.0.0.7", 80), Verdict::NotEndpoint);
    }
}
