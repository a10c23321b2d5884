//! A straightforward reference evaluator of NetworkPolicy semantics.
//!
//! It answers "is this new flow allowed at this hook?" directly over the Kubernetes
//! objects in a [`ClusterState`]: no identities, no prefixes, no maps, written to be
//! obviously right rather than fast. The compiler and [`super::model`] must agree with
//! it on every input; the differential property test checks that. Only validation
//! ([`validate_policy`]: which fields cannot be read) is shared; what follows from a
//! field that cannot be read (docs/SECURITY.md) is decided here on its own, from the
//! paths of those fields: an entry of `from`/`to`/`ports` that cannot be read is left
//! out, and a rule with none left allows nothing; a requirement of the podSelector that
//! cannot be read is ignored, and then the policy isolates without rules; an unknown
//! policyTypes entry isolates both directions. CIDRs are read here too, as Go reads
//! them, by a second implementation ([`go_cidr`]).

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::net::IpAddr;

use ipnet::IpNet;
use k8s_openapi::api::networking::v1::{NetworkPolicy, NetworkPolicyPeer, NetworkPolicyPort};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use netpol_common::{PROTO_SCTP, PROTO_TCP, PROTO_UDP};

use super::{Direction, RuleRef, validate_policy};
use crate::LabelSet;
use crate::state::{ClusterState, ObjectRef, PodInfo};

/// The reference verdict for one hook.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// The address judged at this hook is not a local pod: nothing to enforce here.
    NotEndpoint,
    /// No policy isolates the pod in this direction.
    NotIsolated,
    /// Ingress from the pod's own node.
    FromHost,
    /// The pod reaching itself (through its own Service): never blocked.
    Itself,
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

/// A policy annotated `netpol.dev/staged: "true"` is evaluated only when the state asks
/// for staged policies to be enforced (read here on its own, not through the compiler's
/// helper).
fn staged(np: &NetworkPolicy) -> bool {
    np.metadata
        .annotations
        .as_ref()
        .is_some_and(|a| a.get("netpol.dev/staged").map(String::as_str) == Some("true"))
}

/// The reference evaluator over one state, with each policy's unreadable fields found
/// once.
pub struct Reference<'a> {
    state: &'a ClusterState,
    policies: Vec<Readable<'a>>,
}

impl<'a> Reference<'a> {
    pub fn new(state: &'a ClusterState) -> Self {
        let policies = state
            .policies
            .iter()
            .map(|(obj, np)| (obj, np.object()))
            .filter(|(_, np)| state.enforce_staged || !staged(np))
            .filter_map(|(obj, np)| Readable::new(obj, Cow::Owned(np)))
            .collect();
        Reference { state, policies }
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
        let (local, remote) = direction.ends(src, dst);
        let Some((pod_ref, pod)) = pod_with_ip(state, local) else {
            return Verdict::NotEndpoint;
        };
        if !state.node.is_local(pod) {
            return Verdict::NotEndpoint;
        }
        if remote == local {
            return Verdict::Itself;
        }
        let selecting: Vec<&Readable<'_>> = self
            .policies
            .iter()
            .filter(|p| p.np.metadata.namespace.as_deref() == Some(pod_ref.namespace.as_str()))
            .filter(|p| p.selects(pod.labels()))
            .filter(|p| p.isolates(direction))
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
        for policy in selecting {
            for rule in policy.rules(direction) {
                let peer_ok = rule.peers.is_empty()
                    || rule.peers.iter().any(|peer| {
                        peer_matches(state, &policy.obj.namespace, peer, remote, remote_pod)
                    });
                let port_ok = rule.ports.is_empty()
                    || rule
                        .ports
                        .iter()
                        .any(|p| port_matches(p, protocol, port, dst_pod));
                if peer_ok && port_ok {
                    allowing.push(RuleRef::network_policy(
                        policy.obj.clone(),
                        direction,
                        rule.index,
                    ));
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

/// A policy with the paths of the fields that cannot be read.
struct Readable<'a> {
    obj: &'a ObjectRef,
    np: Cow<'a, NetworkPolicy>,
    unreadable: Vec<String>,
}

impl<'a> Readable<'a> {
    /// `None` when nothing of the policy can be enforced (no name or namespace).
    fn new(obj: &'a ObjectRef, np: Cow<'a, NetworkPolicy>) -> Option<Self> {
        let unreadable: Vec<String> = match validate_policy(&np) {
            Ok(()) => Vec::new(),
            Err(errors) => errors.into_iter().map(|e| e.field).collect(),
        };
        if unreadable.iter().any(|f| f.starts_with("metadata.")) {
            return None;
        }
        Some(Readable {
            obj,
            np,
            unreadable,
        })
    }

    /// Whether some field that cannot be read is `part` or inside it.
    fn cannot_read(&self, part: &str) -> bool {
        self.unreadable.iter().any(|field| {
            field == part
                || (field.len() > part.len()
                    && field.starts_with(part)
                    && matches!(field.as_bytes()[part.len()], b'.' | b'['))
        })
    }

    fn spec(&self) -> k8s_openapi::api::networking::v1::NetworkPolicySpec {
        self.np.spec.clone().unwrap_or_default()
    }

    /// Whether the podSelector's requirements that can be read all hold.
    fn selects(&self, labels: &(impl LabelSet + ?Sized)) -> bool {
        let sel = self.spec().pod_selector.unwrap_or_default();
        let labels_ok = sel.match_labels.iter().flatten().all(|(k, v)| {
            self.unreadable
                .contains(&format!("spec.podSelector.matchLabels.{k}"))
                || labels.label(k) == Some(v.as_str())
        });
        let expressions_ok = sel
            .match_expressions
            .iter()
            .flatten()
            .enumerate()
            .all(|(i, expr)| {
                self.cannot_read(&format!("spec.podSelector.matchExpressions[{i}]"))
                    || requirement_holds(expr, labels)
            });
        labels_ok && expressions_ok
    }

    /// policyTypes: the entries, an entry that is neither meaning both; none: Ingress,
    /// and Egress with egress rules.
    fn isolates(&self, direction: Direction) -> bool {
        let spec = self.spec();
        let types = spec.policy_types.unwrap_or_default();
        if types.is_empty() {
            return match direction {
                Direction::Ingress => true,
                Direction::Egress => !spec.egress.unwrap_or_default().is_empty(),
            };
        }
        let wanted = match direction {
            Direction::Ingress => "Ingress",
            Direction::Egress => "Egress",
        };
        types
            .iter()
            .any(|t| t == wanted || !matches!(t.as_str(), "Ingress" | "Egress"))
    }

    /// The rules of `direction` that can allow something, each with the entries that
    /// can be read; none when the podSelector cannot be read in full.
    fn rules(&self, direction: Direction) -> Vec<ReadableRule> {
        if self.cannot_read("spec.podSelector") || !self.isolates(direction) {
            return Vec::new();
        }
        let spec = self.spec();
        let (field, peers_field, rules): (&str, &str, Vec<RuleParts>) = match direction {
            Direction::Ingress => (
                "ingress",
                "from",
                spec.ingress
                    .unwrap_or_default()
                    .into_iter()
                    .map(|r| (r.from, r.ports))
                    .collect(),
            ),
            Direction::Egress => (
                "egress",
                "to",
                spec.egress
                    .unwrap_or_default()
                    .into_iter()
                    .map(|r| (r.to, r.ports))
                    .collect(),
            ),
        };
        let mut out = Vec::new();
        for (index, (peers, ports)) in rules.into_iter().enumerate() {
            let path = format!("spec.{field}[{index}]");
            let (Some(peers), Some(ports)) = (
                self.keep(peers.unwrap_or_default(), &format!("{path}.{peers_field}")),
                self.keep(ports.unwrap_or_default(), &format!("{path}.ports")),
            ) else {
                continue;
            };
            out.push(ReadableRule {
                index,
                peers,
                ports,
            });
        }
        out
    }
}

impl Readable<'_> {
    /// The entries of the list at `path` that can be read; `None` when it had entries
    /// and none can be.
    fn keep<T>(&self, list: Vec<T>, path: &str) -> Option<Vec<T>> {
        let total = list.len();
        let kept: Vec<T> = list
            .into_iter()
            .enumerate()
            .filter(|(i, _)| !self.cannot_read(&format!("{path}[{i}]")))
            .map(|(_, entry)| entry)
            .collect();
        (total == 0 || !kept.is_empty()).then_some(kept)
    }
}

/// A rule's peers (`from` or `to`) and ports.
type RuleParts = (
    Option<Vec<NetworkPolicyPeer>>,
    Option<Vec<NetworkPolicyPort>>,
);

/// A rule as far as it can be read.
#[derive(Clone, Debug, PartialEq)]
pub struct ReadableRule {
    /// Its index in `spec.ingress`/`spec.egress`.
    pub index: usize,
    /// The peers that can be read (empty: any peer).
    pub peers: Vec<NetworkPolicyPeer>,
    /// The ports that can be read (empty: any port).
    pub ports: Vec<NetworkPolicyPort>,
}

/// The rules of `np` in `direction` as the reference reads them: those that can allow
/// something, with their entries that can be read; none when `np` does not isolate in
/// `direction`, cannot be read at all, or its podSelector cannot be read in full.
pub fn readable_rules(
    obj: &ObjectRef,
    np: &NetworkPolicy,
    direction: Direction,
) -> Vec<ReadableRule> {
    Readable::new(obj, Cow::Borrowed(np)).map_or_else(Vec::new, |p| p.rules(direction))
}

/// The pod network pod (not finished, not hostNetwork) holding `ip`: of several listing
/// it, the running one, then the one created last, then the first by name.
pub(crate) fn pod_with_ip(state: &ClusterState, ip: IpAddr) -> Option<(&ObjectRef, &PodInfo)> {
    let listing = state.pods.iter().filter(|(_, pod)| {
        if matches!(pod.phase(), Some("Succeeded" | "Failed")) {
            return false;
        }
        if pod.host_network() {
            return false;
        }
        let mut ips = pod.listed_ips().chain(pod.pod_ip());
        ips.any(|s| s.parse::<IpAddr>() == Ok(ip))
    });
    // Later names lose ties: `max_by_key` keeps the last maximum, so rank by the
    // reversed name.
    listing.max_by_key(|(obj, pod)| {
        (
            pod.phase() == Some("Running"),
            pod.created(),
            std::cmp::Reverse((*obj).clone()),
        )
    })
}

fn selector_matches(sel: &LabelSelector, labels: &(impl LabelSet + ?Sized)) -> bool {
    sel.match_labels
        .iter()
        .flatten()
        .all(|(k, v)| labels.label(k) == Some(v.as_str()))
        && sel
            .match_expressions
            .iter()
            .flatten()
            .all(|expr| requirement_holds(expr, labels))
}

fn requirement_holds(
    expr: &k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelectorRequirement,
    labels: &(impl LabelSet + ?Sized),
) -> bool {
    let values = expr.values.as_deref().unwrap_or_default();
    let value = labels.label(&expr.key);
    match expr.operator.as_str() {
        "In" => value.is_some_and(|v| values.iter().any(|x| x == v)),
        "NotIn" => !value.is_some_and(|v| values.iter().any(|x| x == v)),
        "Exists" => value.is_some(),
        "DoesNotExist" => value.is_none(),
        _ => false,
    }
}

/// Deliberately not `ClusterState::namespace_labels`: the reference shares no code with
/// what it checks.
fn namespace_labels(state: &ClusterState, name: &str) -> BTreeMap<String, String> {
    let mut labels: BTreeMap<String, String> = state
        .namespaces
        .get(name)
        .map(|ns| ns.labels().iter())
        .into_iter()
        .flatten()
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
    labels
        .entry("kubernetes.io/metadata.name".into())
        .or_insert_with(|| name.to_string());
    labels
}

/// A CIDR value as Go 1.16's `net.ParseCIDR` (the API server's `ParseCIDRSloppy`)
/// reads it, and as `IPNet.Contains` compares it: the network, masked, IPv4 for an
/// IPv4-mapped value of at least 96 bits. Written apart from the compiler's reader: the
/// text is brought to the form the standard library parses (leading zeros dropped),
/// then parsed.
pub fn go_cidr(text: &str) -> Option<IpNet> {
    let (address, length) = text.split_once('/')?;
    let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    if !digits(length) {
        return None;
    }
    let length: u8 = match length.trim_start_matches('0') {
        "" => 0,
        rest => rest.parse().ok().filter(|l| *l <= 128)?,
    };
    // Decimal parts of an IPv4 address, without their leading zeros.
    let v4 = |s: &str| -> Option<std::net::Ipv4Addr> {
        let parts: Vec<&str> = s.split('.').collect();
        if parts.len() != 4 || !parts.iter().all(|p| digits(p)) {
            return None;
        }
        let short: Vec<&str> = parts
            .iter()
            .map(|p| match p.trim_start_matches('0') {
                "" => "0",
                rest => rest,
            })
            .collect();
        short.join(".").parse().ok()
    };
    if let Some(addr) = v4(address) {
        let net = ipnet::Ipv4Net::new(addr, length).ok()?;
        return Some(IpNet::V4(net.trunc()));
    }
    // IPv6: hex groups without their excess leading zeros, an IPv4 tail as above.
    let groups: Vec<&str> = address.split(':').collect();
    let last = groups.len() - 1;
    let mut normal = Vec::new();
    for (i, group) in groups.iter().enumerate() {
        if group.contains('.') {
            if i != last {
                return None;
            }
            normal.push(v4(group)?.to_string());
        } else if group.is_empty() {
            normal.push(String::new());
        } else {
            if !group.bytes().all(|b| b.is_ascii_hexdigit()) {
                return None;
            }
            let short = group.trim_start_matches('0');
            normal.push(if short.is_empty() { "0" } else { short }.to_string());
        }
    }
    let addr: std::net::Ipv6Addr = normal.join(":").parse().ok()?;
    match addr.to_ipv4_mapped() {
        Some(v4) if length >= 96 => Some(IpNet::V4(
            ipnet::Ipv4Net::new(v4, length - 96).ok()?.trunc(),
        )),
        _ => Some(IpNet::V6(ipnet::Ipv6Net::new(addr, length).ok()?.trunc())),
    }
}

/// Whether `ip` is in `cidr` as Go compares them, except that an IPv4-mapped IPv6
/// address is in no block (Go would compare it as IPv4; an IPv6 network never holds it).
fn in_cidr(cidr: &str, ip: IpAddr) -> bool {
    if let IpAddr::V6(v6) = ip
        && v6.to_ipv4_mapped().is_some()
    {
        return false;
    }
    go_cidr(cidr).is_some_and(|net| net.contains(&ip))
}

/// Whether the far end (`ip`, and its pod if it is one) is one of `peer`.
pub fn peer_matches(
    state: &ClusterState,
    policy_namespace: &str,
    peer: &NetworkPolicyPeer,
    ip: IpAddr,
    pod: Option<(&ObjectRef, &PodInfo)>,
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
        Some(sel) => selector_matches(sel, pod.labels()),
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
pub fn port_matches(
    p: &NetworkPolicyPort,
    protocol: u8,
    port: u16,
    dst_pod: Option<&PodInfo>,
) -> bool {
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

/// The port a named container port resolves to on `pod`: the first port with this name
/// and protocol of its containers, else of its native sidecars (init containers with
/// `restartPolicy: Always`).
pub fn named_port(pod: &PodInfo, name: &str, protocol: u8) -> Option<i32> {
    // The ports are in lookup order: containers first, then native sidecars.
    pod.ports()
        .iter()
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
        let rule = |index| {
            RuleRef::network_policy(ObjectRef::new("x", "allow"), Direction::Ingress, index)
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

    #[test]
    fn a_native_sidecars_port_is_a_named_port_and_a_containers_comes_first() {
        use crate::testutil::{pod, with_init_container};
        let p = PodInfo::of(&with_init_container(
            with_init_container(
                pod("x", "a", &[], &["10.0.0.1"], &[("http", 8080, "TCP")]),
                false,
                &[("setup", 81, "TCP")],
            ),
            true,
            &[("metrics", 9090, "TCP"), ("http", 9091, "TCP")],
        ));
        assert_eq!(named_port(&p, "metrics", PROTO_TCP), Some(9090));
        assert_eq!(named_port(&p, "http", PROTO_TCP), Some(8080));
        assert_eq!(named_port(&p, "setup", PROTO_TCP), None);
        assert_eq!(named_port(&p, "metrics", PROTO_UDP), None);
    }

    #[test]
    fn an_address_belongs_to_the_running_then_newest_then_first_named_live_pod() {
        use crate::testutil::{pod, with_phase};
        let claim = |old: (&str, Option<&str>), new: (&str, Option<&str>)| {
            let c = Cluster::new()
                .raw_pod(with_phase(
                    pod("x", "old", &[], &["10.0.0.1"], &[]),
                    old.0,
                    old.1,
                ))
                .raw_pod(with_phase(
                    pod("x", "new", &[], &["10.0.0.1"], &[]),
                    new.0,
                    new.1,
                ))
                .state;
            pod_with_ip(&c, ip("10.0.0.1")).map(|(obj, _)| obj.name.clone())
        };
        let (day1, day2) = (Some("2025-01-01T00:00:00Z"), Some("2025-01-02T00:00:00Z"));
        assert_eq!(
            claim(("Running", day1), ("Pending", day2)).as_deref(),
            Some("old")
        );
        assert_eq!(
            claim(("Running", day1), ("Running", day2)).as_deref(),
            Some("new")
        );
        assert_eq!(
            claim(("Running", day2), ("Running", None)).as_deref(),
            Some("old")
        );
        assert_eq!(
            claim(("Running", day1), ("Running", day1)).as_deref(),
            Some("new")
        );
        assert_eq!(
            claim(("Succeeded", day2), ("Pending", day1)).as_deref(),
            Some("new")
        );
        assert_eq!(claim(("Failed", day2), ("Succeeded", day1)), None);
    }

    #[test]
    fn cidrs_read_as_go_reads_them() {
        let net = |t: &str| go_cidr(t).map(|n| n.to_string());
        assert_eq!(net("010.0.0.0/8").as_deref(), Some("10.0.0.0/8"));
        assert_eq!(net("10.1.2.3/08").as_deref(), Some("10.0.0.0/8"));
        assert_eq!(net("0010.0.0.0/00").as_deref(), Some("0.0.0.0/0"));
        assert_eq!(net("::ffff:10.0.0.0/104").as_deref(), Some("10.0.0.0/8"));
        assert_eq!(net("::ffff:010.1.0.0/112").as_deref(), Some("10.1.0.0/16"));
        assert_eq!(net("::ffff:10.0.0.0/80").as_deref(), Some("::/80"));
        assert_eq!(net("00fd00::1/064").as_deref(), Some("fd00::/64"));
        for bad in [
            "10.0.0.0/33",
            "10.0.0.0/+8",
            "10.0.0.0/99999999999",
            "256.0.0.0/8",
            "10.0.0/8",
            "10.0.0.0",
            "fd00::1%eth0/64",
            "10000::/8",
            "::1.2.3.4:5/128",
            "fd00::/129",
        ] {
            assert_eq!(net(bad), None, "{bad}");
        }
        assert!(in_cidr("::ffff:10.0.0.0/104", ip("10.0.0.1")));
        assert!(!in_cidr("::/0", ip("::ffff:10.0.0.1")));
        assert!(!in_cidr("0.0.0.0/0", ip("::ffff:10.0.0.1")));
    }

    #[test]
    fn rules_are_read_without_what_cannot_be_read() {
        let np = crate::testutil::policy(
            "x",
            "p",
            json!({"policyTypes": ["Ingress"], "ingress": [
                {"from": [{"podSelector": {}}, {}], "ports": [{"port": 80}, {"endPort": 9}]},
                {"from": [{}]},
                {"ports": [{"protocol": "ICMP"}]},
                {},
            ]}),
        );
        let obj = ObjectRef::new("x", "p");
        let rules = readable_rules(&obj, &np, Direction::Ingress);
        let read: Vec<(usize, usize, usize)> = rules
            .iter()
            .map(|r| (r.index, r.peers.len(), r.ports.len()))
            .collect();
        assert_eq!(read, [(0, 1, 1), (3, 0, 0)]);
        assert!(readable_rules(&obj, &np, Direction::Egress).is_empty());
    }
}
