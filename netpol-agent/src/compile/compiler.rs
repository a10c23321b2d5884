//! [`compile`]: the steps from cluster state to map contents.
//!
//! 1. Validate and normalise every policy; number the rules of the valid ones.
//! 2. Collect live pods (not Succeeded/Failed, not hostNetwork, with an IP) and pick the
//!    local ones as endpoints; find the policies selecting each endpoint.
//! 3. The peers in force are the peers of rules of policies that select some local
//!    endpoint in that direction; the named ports in force are those of such egress rules.
//! 4. Classify every IPCACHE key (pod IPs, node IPs, ipBlock prefixes) by the peers it
//!    matches and the named ports it resolves; each class is an identity.
//! 5. Emit POLICY entries per endpoint, direction, rule, identity and port prefix.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use ipnet::IpNet;
use k8s_openapi::api::core::v1::Pod;
use netpol_common::{
    Addr, ENDPOINT_EGRESS_ISOLATED, ENDPOINT_INGRESS_ISOLATED, EndpointInfo, IDENTITY_ANY,
    IDENTITY_WORLD, PEER_HOST, POLICY_PREFIX_ANY_PORT, POLICY_PREFIX_ANY_PROTO, PeerInfo,
    PolicyKey, PolicyValue,
};

use super::identity::{Allocations, IdentitySignature, NamedPortResolution};
use super::lpm::{Lpm, host_key, net_key};
use super::policy::{
    Block, NamespaceMatch, ParsedRule, Peer, PortMatch, parse_policy, protocol_number,
};
use super::ports::port_prefixes;
use super::{Compiled, Diagnostic, Direction, IdentityInfo, LocalPod, RuleRef};
use crate::state::{ClusterState, HOST_INTERFACE_ANNOTATION, ObjectRef};

/// Label every namespace carries (the API server sets it).
pub(crate) const NAMESPACE_NAME_LABEL: &str = "kubernetes.io/metadata.name";

static NO_LABELS: BTreeMap<String, String> = BTreeMap::new();

/// Compiles `state` into desired map contents. `prev` is the previous result's
/// [`Compiled::allocations`] (or the default), so endpoint ids and identity numbers
/// stay stable while what they stand for exists.
pub fn compile(state: &ClusterState, prev: &Allocations) -> Compiled {
    let mut diagnostics = Vec::new();

    // 1. Policies and the rule table.
    let mut policies = Vec::new();
    for (obj, np) in &state.policies {
        match parse_policy(np) {
            Ok(parsed) => policies.push((obj.clone(), parsed)),
            Err(errors) => diagnostics.extend(errors.into_iter().map(|e| Diagnostic {
                object: format!("NetworkPolicy {obj}"),
                field: e.field,
                message: e.message,
            })),
        }
    }
    let mut rules = Vec::new();
    // rule_base[policy index][direction] = index in `rules` of the first rule.
    let mut rule_base = Vec::new();
    for (obj, parsed) in &policies {
        let mut base = [0usize; 2];
        for (d, direction) in Direction::BOTH.into_iter().enumerate() {
            base[d] = rules.len();
            for index in 0..parsed.rules(direction).map_or(0, <[ParsedRule]>::len) {
                rules.push(RuleRef {
                    policy: obj.clone(),
                    direction,
                    index,
                });
            }
        }
        rule_base.push(base);
    }

    // 2. Pods.
    let namespaces = namespace_labels(state);
    let pods = live_pods(state, &mut diagnostics);
    let endpoints: Vec<Endpoint> = pods
        .iter()
        .enumerate()
        .filter(|(_, p)| p.local)
        .map(|(pod, p)| {
            let mut selected_by = [Vec::new(), Vec::new()];
            for (i, (_, policy)) in policies.iter().enumerate() {
                if policy.namespace == p.obj.namespace && policy.pod_selector.matches(p.labels) {
                    for (d, direction) in Direction::BOTH.into_iter().enumerate() {
                        if policy.rules(direction).is_some() {
                            selected_by[d].push(i);
                        }
                    }
                }
            }
            Endpoint { pod, selected_by }
        })
        .collect();

    // 3. Peers and named ports in force.
    let mut in_force = [BTreeSet::new(), BTreeSet::new()];
    for ep in &endpoints {
        for (set, selected_by) in in_force.iter_mut().zip(&ep.selected_by) {
            set.extend(selected_by.iter().copied());
        }
    }
    let mut peers = PeerTable::default();
    let mut egress_named_ports = BTreeSet::new();
    for (d, direction) in Direction::BOTH.into_iter().enumerate() {
        for &i in &in_force[d] {
            for rule in policies[i].1.rules(direction).unwrap_or_default() {
                for peer in rule.peers.iter().flatten() {
                    peers.intern(peer);
                }
                if direction == Direction::Egress {
                    for spec in rule.ports.iter().flatten() {
                        if let PortMatch::Named(name) = &spec.port {
                            egress_named_ports.insert((name.clone(), spec.protocol));
                        }
                    }
                }
            }
        }
    }

    // 4. Classify IPCACHE keys.
    let classes = classify(state, &pods, &namespaces, &peers, &egress_named_ports);
    let signature_of = |class: &ClassKey| IdentitySignature {
        peers: {
            let mut v: Vec<String> = class
                .peers
                .iter()
                .map(|&i| peers.list[i].canonical())
                .collect();
            v.sort();
            v
        },
        named_ports: class.named_ports.clone(),
    };
    let signatures: BTreeMap<&ClassKey, IdentitySignature> = classes
        .keys
        .values()
        .map(|(class, _)| (class, signature_of(class)))
        .collect();
    let allocations = prev.next(
        endpoints.iter().map(|ep| pods[ep.pod].obj.clone()),
        signatures.values().filter(|s| !s.is_world()).cloned(),
    );
    let identity_of = |class: &ClassKey| {
        let sig = &signatures[class];
        if sig.is_world() {
            IDENTITY_WORLD
        } else {
            allocations.identity(sig).expect("allocated above")
        }
    };

    let mut ipcache = BTreeMap::new();
    let mut identities: BTreeMap<u32, IdentityInfo> = BTreeMap::new();
    identities.insert(
        IDENTITY_ANY,
        IdentityInfo {
            signature: IdentitySignature::default(),
            description: "any peer (rules without from/to)".into(),
            members: vec![],
        },
    );
    identities.insert(
        IDENTITY_WORLD,
        IdentityInfo {
            signature: IdentitySignature::default(),
            description: "the world: matches no peer".into(),
            members: vec!["every address no IPCACHE entry covers".into()],
        },
    );
    for (key, (class, entry)) in &classes.keys {
        let identity = identity_of(class);
        ipcache.insert(
            *key,
            PeerInfo {
                identity,
                flags: entry.flags,
            },
        );
        let info = identities.entry(identity).or_insert_with(|| IdentityInfo {
            signature: signatures[class].clone(),
            description: signatures[class].to_string(),
            members: vec![],
        });
        info.members.push(entry.member.clone());
    }

    // Identities by peer, and named port resolutions by identity (egress).
    let mut peer_identities: Vec<BTreeSet<u32>> = vec![BTreeSet::new(); peers.list.len()];
    let mut named_by_identity: BTreeMap<(String, u8), BTreeMap<u32, u16>> = BTreeMap::new();
    for class in signatures.keys() {
        let identity = identity_of(class);
        for &p in &class.peers {
            peer_identities[p].insert(identity);
        }
        for n in &class.named_ports {
            named_by_identity
                .entry((n.name.clone(), n.protocol))
                .or_default()
                .insert(identity, n.port);
        }
    }

    // 5. ENDPOINTS and POLICY.
    let mut endpoint_map = BTreeMap::new();
    let mut policy = BTreeMap::new();
    let mut local_pods = Vec::new();
    for ep in &endpoints {
        let pod = &pods[ep.pod];
        let id = allocations.endpoint_id(pod.obj).expect("allocated above");
        let mut flags = 0;
        if !ep.selected_by[0].is_empty() {
            flags |= ENDPOINT_INGRESS_ISOLATED;
        }
        if !ep.selected_by[1].is_empty() {
            flags |= ENDPOINT_EGRESS_ISOLATED;
        }
        for ip in &pod.ips {
            endpoint_map.insert(super::lpm::addr(*ip), EndpointInfo { id, flags });
        }
        for (d, direction) in Direction::BOTH.into_iter().enumerate() {
            for &i in &ep.selected_by[d] {
                let rules_of_policy = policies[i].1.rules(direction).unwrap_or_default();
                for (r, rule) in rules_of_policy.iter().enumerate() {
                    let ctx = RuleContext {
                        endpoint: id,
                        direction,
                        rule: (rule_base[i][d] + r) as u32,
                        pod,
                        peers: &peers,
                        peer_identities: &peer_identities,
                        named_by_identity: &named_by_identity,
                    };
                    ctx.emit(rule, &mut policy);
                }
            }
        }
        local_pods.push(LocalPod {
            pod: pod.obj.clone(),
            endpoint_id: id,
            ips: pod.ips.clone(),
            host_interface: pod.host_interface.clone(),
            ingress_policies: ep.selected_by[0]
                .iter()
                .map(|&i| policies[i].0.clone())
                .collect(),
            egress_policies: ep.selected_by[1]
                .iter()
                .map(|&i| policies[i].0.clone())
                .collect(),
        });
    }

    Compiled {
        endpoints: endpoint_map,
        ipcache,
        policy,
        local_pods,
        rules,
        identities,
        diagnostics,
        allocations,
    }
}

/// A live pod with an address, as peer and possibly as local endpoint.
struct PodView<'a> {
    obj: &'a ObjectRef,
    labels: &'a BTreeMap<String, String>,
    ips: Vec<IpAddr>,
    /// Container ports by (name, protocol).
    named_ports: BTreeMap<(String, u8), u16>,
    local: bool,
    host_interface: Option<String>,
}

/// A local endpoint: index into the pod list, policies selecting it per direction
/// (indices into the valid policy list; 0 ingress, 1 egress).
struct Endpoint {
    pod: usize,
    selected_by: [Vec<usize>; 2],
}

/// Labels of every namespace, with `kubernetes.io/metadata.name` as the API server sets it.
fn namespace_labels(state: &ClusterState) -> BTreeMap<String, BTreeMap<String, String>> {
    let mut out: BTreeMap<String, BTreeMap<String, String>> = BTreeMap::new();
    let names = state
        .namespaces
        .keys()
        .chain(state.pods.keys().map(|p| &p.namespace));
    for name in names {
        if out.contains_key(name) {
            continue;
        }
        let mut labels = state
            .namespaces
            .get(name)
            .and_then(|ns| ns.metadata.labels.clone())
            .unwrap_or_default();
        labels
            .entry(NAMESPACE_NAME_LABEL.to_string())
            .or_insert_with(|| name.clone());
        out.insert(name.clone(), labels);
    }
    out
}

/// Pod addresses from `status.podIPs` and `status.podIP`, de-duplicated, in order.
pub(crate) fn pod_ips(pod: &Pod) -> (Vec<IpAddr>, Vec<(String, String)>) {
    let mut ips = Vec::new();
    let mut errors = Vec::new();
    let Some(status) = &pod.status else {
        return (ips, errors);
    };
    let listed = status
        .pod_ips
        .iter()
        .flatten()
        .enumerate()
        .map(|(i, p)| (format!("status.podIPs[{i}].ip"), &p.ip));
    for (field, text) in listed.chain(
        status
            .pod_ip
            .iter()
            .map(|ip| ("status.podIP".to_string(), ip)),
    ) {
        match text.parse::<IpAddr>() {
            Ok(ip) if !ips.contains(&ip) => ips.push(ip),
            Ok(_) => {}
            Err(_) => errors.push((field, format!("invalid IP address {text:?}"))),
        }
    }
    (ips, errors)
}

/// Whether the pod takes part at all: not finished and not in the host's network.
pub(crate) fn is_live_pod_network(pod: &Pod) -> bool {
    let phase = pod.status.as_ref().and_then(|s| s.phase.as_deref());
    let host_network = pod
        .spec
        .as_ref()
        .and_then(|s| s.host_network)
        .unwrap_or(false);
    !matches!(phase, Some("Succeeded" | "Failed")) && !host_network
}

/// Named container ports of a pod: (name, protocol) -> port; the first definition wins.
pub(crate) fn container_named_ports(pod: &Pod) -> BTreeMap<(String, u8), u16> {
    let mut out = BTreeMap::new();
    let containers = pod.spec.iter().flat_map(|s| s.containers.iter());
    for port in containers.flat_map(|c| c.ports.iter().flatten()) {
        let Some(name) = port.name.as_ref() else {
            continue;
        };
        let Some(protocol) = protocol_number(port.protocol.as_deref().unwrap_or("TCP")) else {
            continue;
        };
        let Ok(number) = u16::try_from(port.container_port) else {
            continue;
        };
        if number != 0 {
            out.entry((name.clone(), protocol)).or_insert(number);
        }
    }
    out
}

fn live_pods<'a>(state: &'a ClusterState, diagnostics: &mut Vec<Diagnostic>) -> Vec<PodView<'a>> {
    let mut owner: BTreeMap<IpAddr, &ObjectRef> = BTreeMap::new();
    let mut out = Vec::new();
    for (obj, pod) in &state.pods {
        if !is_live_pod_network(pod) {
            continue;
        }
        let (mut ips, errors) = pod_ips(pod);
        let object = format!("Pod {obj}");
        for (field, message) in errors {
            diagnostics.push(Diagnostic {
                object: object.clone(),
                field,
                message,
            });
        }
        ips.retain(|ip| match owner.get(ip) {
            Some(other) => {
                diagnostics.push(Diagnostic {
                    object: object.clone(),
                    field: "status.podIPs".into(),
                    message: format!("address {ip} is also used by Pod {other}; ignored here"),
                });
                false
            }
            None => {
                owner.insert(*ip, obj);
                true
            }
        });
        if ips.is_empty() {
            continue;
        }
        out.push(PodView {
            obj,
            labels: pod.metadata.labels.as_ref().unwrap_or(&NO_LABELS),
            ips,
            named_ports: container_named_ports(pod),
            local: state.node.is_local(pod),
            host_interface: pod
                .metadata
                .annotations
                .as_ref()
                .and_then(|a| a.get(HOST_INTERFACE_ANNOTATION))
                .cloned(),
        });
    }
    out
}

/// The distinct peers in force, numbered.
#[derive(Default)]
struct PeerTable {
    list: Vec<Peer>,
    index: BTreeMap<Peer, usize>,
}

impl PeerTable {
    fn intern(&mut self, peer: &Peer) -> usize {
        if let Some(&i) = self.index.get(peer) {
            return i;
        }
        self.list.push(peer.clone());
        self.index.insert(peer.clone(), self.list.len() - 1);
        self.list.len() - 1
    }

    fn get(&self, peer: &Peer) -> usize {
        self.index[peer]
    }

    fn blocks(&self) -> impl Iterator<Item = (usize, &Block)> {
        self.list.iter().enumerate().filter_map(|(i, p)| match p {
            Peer::Block(b) => Some((i, b)),
            Peer::Pods { .. } => None,
        })
    }
}

/// What makes an address class: the peers it matches and the named ports it resolves.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct ClassKey {
    peers: BTreeSet<usize>,
    named_ports: Vec<NamedPortResolution>,
}

struct KeyEntry {
    flags: u32,
    member: String,
}

struct Classes {
    keys: BTreeMap<Lpm<Addr>, (ClassKey, KeyEntry)>,
}

fn classify(
    state: &ClusterState,
    pods: &[PodView<'_>],
    namespaces: &BTreeMap<String, BTreeMap<String, String>>,
    peers: &PeerTable,
    egress_named_ports: &BTreeSet<(String, u8)>,
) -> Classes {
    let blocks_containing_addr = |ip: IpAddr| -> BTreeSet<usize> {
        peers
            .blocks()
            .filter(|(_, b)| b.contains_addr(ip))
            .map(|(i, _)| i)
            .collect()
    };
    let mut keys = BTreeMap::new();

    for pod in pods {
        let ns_labels = namespaces.get(&pod.obj.namespace).unwrap_or(&NO_LABELS);
        let selected: BTreeSet<usize> = peers
            .list
            .iter()
            .enumerate()
            .filter(|(_, peer)| match peer {
                Peer::Pods {
                    namespaces: ns,
                    pods: sel,
                } => {
                    let ns_ok = match ns {
                        NamespaceMatch::Named(name) => *name == pod.obj.namespace,
                        NamespaceMatch::Selector(s) => s.matches(ns_labels),
                    };
                    ns_ok && sel.matches(pod.labels)
                }
                Peer::Block(_) => false,
            })
            .map(|(i, _)| i)
            .collect();
        let named_ports: Vec<NamedPortResolution> = egress_named_ports
            .iter()
            .filter_map(|(name, protocol)| {
                pod.named_ports
                    .get(&(name.clone(), *protocol))
                    .map(|&port| NamedPortResolution {
                        name: name.clone(),
                        protocol: *protocol,
                        port,
                    })
            })
            .collect();
        for &ip in &pod.ips {
            let mut class_peers = selected.clone();
            class_peers.extend(blocks_containing_addr(ip));
            let class = ClassKey {
                peers: class_peers,
                named_ports: named_ports.clone(),
            };
            keys.insert(
                host_key(ip),
                (
                    class,
                    KeyEntry {
                        flags: 0,
                        member: format!("pod {} {ip}", pod.obj),
                    },
                ),
            );
        }
    }

    for &ip in &state.node.ips {
        let entry = keys.entry(host_key(ip)).or_insert_with(|| {
            let class = ClassKey {
                peers: blocks_containing_addr(ip),
                named_ports: vec![],
            };
            (
                class,
                KeyEntry {
                    flags: 0,
                    member: format!("node {ip}"),
                },
            )
        });
        entry.1.flags |= PEER_HOST;
    }

    let prefixes: BTreeSet<IpNet> = peers
        .blocks()
        .flat_map(|(_, b)| std::iter::once(b.cidr).chain(b.except.iter().copied()))
        .collect();
    for prefix in prefixes {
        keys.entry(net_key(&prefix)).or_insert_with(|| {
            let class_peers = peers
                .blocks()
                .filter(|(_, b)| b.contains_prefix(&prefix))
                .map(|(i, _)| i)
                .collect();
            (
                ClassKey {
                    peers: class_peers,
                    named_ports: vec![],
                },
                KeyEntry {
                    flags: 0,
                    member: prefix.to_string(),
                },
            )
        });
    }
    Classes { keys }
}

/// Everything needed to turn one rule into POLICY entries for one endpoint.
struct RuleContext<'a> {
    endpoint: u32,
    direction: Direction,
    rule: u32,
    pod: &'a PodView<'a>,
    peers: &'a PeerTable,
    peer_identities: &'a [BTreeSet<u32>],
    named_by_identity: &'a BTreeMap<(String, u8), BTreeMap<u32, u16>>,
}

impl RuleContext<'_> {
    fn emit(&self, rule: &ParsedRule, out: &mut BTreeMap<Lpm<PolicyKey>, PolicyValue>) {
        let identities: BTreeSet<u32> = match &rule.peers {
            None => BTreeSet::from([IDENTITY_ANY]),
            Some(list) => list
                .iter()
                .flat_map(|p| self.peer_identities[self.peers.get(p)].iter().copied())
                .collect(),
        };
        let Some(ports) = &rule.ports else {
            for &identity in &identities {
                self.insert(out, identity, 0, 0, POLICY_PREFIX_ANY_PROTO);
            }
            return;
        };
        for spec in ports {
            match &spec.port {
                PortMatch::All => {
                    for &identity in &identities {
                        self.insert(out, identity, spec.protocol, 0, POLICY_PREFIX_ANY_PORT);
                    }
                }
                PortMatch::Range(lo, hi) => {
                    for block in port_prefixes(*lo, *hi) {
                        for &identity in &identities {
                            self.insert(
                                out,
                                identity,
                                spec.protocol,
                                block.value,
                                POLICY_PREFIX_ANY_PORT + block.bits,
                            );
                        }
                    }
                }
                PortMatch::Named(name) => match self.direction {
                    // Resolved on the destination: the local pod itself.
                    Direction::Ingress => {
                        if let Some(&port) =
                            self.pod.named_ports.get(&(name.clone(), spec.protocol))
                        {
                            for &identity in &identities {
                                self.insert(
                                    out,
                                    identity,
                                    spec.protocol,
                                    port,
                                    POLICY_PREFIX_ANY_PORT + 16,
                                );
                            }
                        }
                    }
                    // Resolved on the destination: each peer, through its identity.
                    Direction::Egress => {
                        let resolved = self.named_by_identity.get(&(name.clone(), spec.protocol));
                        for (&identity, &port) in resolved.into_iter().flatten() {
                            if identities.contains(&IDENTITY_ANY) || identities.contains(&identity)
                            {
                                self.insert(
                                    out,
                                    identity,
                                    spec.protocol,
                                    port,
                                    POLICY_PREFIX_ANY_PORT + 16,
                                );
                            }
                        }
                    }
                },
            }
        }
    }

    fn insert(
        &self,
        out: &mut BTreeMap<Lpm<PolicyKey>, PolicyValue>,
        identity: u32,
        protocol: u8,
        port: u16,
        prefix_len: u32,
    ) {
        let key = PolicyKey {
            endpoint: self.endpoint,
            identity,
            direction: self.direction.as_u8(),
            protocol,
            port: port.to_be_bytes(),
        };
        let value = out.entry(Lpm::new(prefix_len, key)).or_insert(PolicyValue {
            rule: self.rule,
            _pad: 0,
        });
        value.rule = value.rule.min(self.rule);
    }
}

#[cfg(test)]
mod tests;
