//! Differential property test: [`compile`] + [`model`] against [`reference`] and, for
//! the cluster admin's tiers, [`crate::cnp::reference`].
//!
//! Random small clusters (namespaces and pods with random labels, phases, creation
//! times, IPs (sometimes one listed by two pods) and named ports (sometimes of native
//! sidecars or of ordinary init containers), policies with random selectors, ipBlocks
//! around the pod IPs, ports, end ports, named ports and policyTypes variants; in half
//! the clusters ClusterNetworkPolicies of both tiers with random subjects, priorities
//! (ties included), actions, peers, networks, port numbers, ranges and named ports) and
//! random flows, including non-pod addresses and the node's own address. Every verdict
//! of the kernel model over the compiled maps must equal the reference verdict, and the
//! rule the model reports must be one the reference says allows the flow. The agent's
//! `tests/differential_kernel.rs` puts a sample of the same cases ([`case`], [`sweep`];
//! feature `testing`) through the real programs (BPF_PROG_TEST_RUN, root only).

#[cfg(test)]
use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

#[cfg(test)]
use netpol_common::Reason;
use netpol_common::{PROTO_SCTP, PROTO_TCP, PROTO_UDP};
use proptest::prelude::*;
use proptest::sample::select;
use serde_json::{Value, json};

#[cfg(test)]
use super::cnp::reference::{DecidedBy, TieredReference};
#[cfg(test)]
use super::reference::Verdict;
use super::testutil::{Cluster, labels};
#[cfg(test)]
use super::{Allocations, Compiled, Compiler, Direction, KeptMap, compile, model};
use crate::state::ClusterState;

const NAMESPACES: [&str; 3] = ["x", "y", "z"];
const NODE_IP: &str = "10.0.2.254";
/// The other node's address: a `nodes` peer may select it.
const OTHER_NODE_IP: &str = "10.0.2.253";
/// Addresses that are never pods.
const OUTSIDE: [&str; 6] = [
    "10.0.0.200",
    "10.0.1.77",
    "192.168.1.1",
    "8.8.8.8",
    "fd00::99",
    // IPv4-mapped: in no ipBlock, whatever it maps.
    "::ffff:10.0.1.1",
];
const PORT_NAMES: [&str; 3] = ["http", "dns", "metrics"];
const PORTS: [u16; 5] = [53, 80, 81, 8080, 8081];

fn label_set(
    keys: &'static [&'static str],
) -> impl Strategy<Value = Vec<(&'static str, &'static str)>> {
    proptest::collection::vec((select(keys), select(&["a", "b"][..])), 0..=2)
}

fn protocol_name() -> impl Strategy<Value = &'static str> {
    select(&["TCP", "TCP", "TCP", "UDP", "SCTP"][..])
}

#[derive(Clone, Debug)]
struct PodSpec {
    ns: usize,
    labels: Vec<(&'static str, &'static str)>,
    subnet: u8,
    v6: bool,
    ports: Vec<(&'static str, u16, &'static str)>,
    local: bool,
    phase: &'static str,
    host_network: bool,
    /// Ports of an init container: a native sidecar (`restartPolicy: Always`) or not.
    init_ports: Vec<(&'static str, u16, &'static str)>,
    sidecar: bool,
    /// Day of creation, if the object says.
    created: Option<u8>,
    /// Lists the previous pod's IPv4 address instead of its own (a stale object and a
    /// new pod).
    shares_address: bool,
}

fn pod_spec() -> impl Strategy<Value = PodSpec> {
    (
        0..3usize,
        label_set(&["app", "tier"]),
        0..3u8,
        prop::bool::weighted(0.3),
        proptest::collection::vec(
            (select(&PORT_NAMES[..]), select(&PORTS[..]), protocol_name()),
            0..=3,
        ),
        prop::bool::weighted(0.8),
        select(
            &[
                "Running",
                "Running",
                "Running",
                "Pending",
                "Succeeded",
                "Failed",
            ][..],
        ),
        prop::bool::weighted(0.05),
        (
            proptest::collection::vec(
                (select(&PORT_NAMES[..]), select(&PORTS[..]), protocol_name()),
                0..=2,
            ),
            prop::bool::weighted(0.7),
            prop::option::of(0..3u8),
            prop::bool::weighted(0.15),
        ),
    )
        .prop_map(
            |(
                ns,
                labels,
                subnet,
                v6,
                ports,
                local,
                phase,
                host_network,
                (init_ports, sidecar, created, shares_address),
            )| PodSpec {
                ns,
                labels,
                subnet,
                v6,
                ports,
                local,
                phase,
                host_network,
                init_ports,
                sidecar,
                created,
                shares_address,
            },
        )
}

/// A selector as JSON: often empty, otherwise matchLabels and/or matchExpressions
/// over `keys`.
fn selector(keys: &'static [&'static str]) -> impl Strategy<Value = Value> {
    let expr = (
        select(keys),
        select(&["In", "NotIn", "Exists", "DoesNotExist"][..]),
    )
        .prop_flat_map(|(key, op)| {
            let values = if matches!(op, "In" | "NotIn") {
                proptest::collection::btree_set(select(&["a", "b"][..]), 1..=2)
                    .prop_map(|s| Some(s.into_iter().collect::<Vec<_>>()))
                    .boxed()
            } else {
                Just(None).boxed()
            };
            values.prop_map(move |values| match values {
                Some(v) => json!({"key": key, "operator": op, "values": v}),
                None => json!({"key": key, "operator": op}),
            })
        });
    let some = (
        label_set(keys),
        proptest::collection::vec(expr, 0..=2),
        any::<bool>(),
    )
        .prop_map(|(ml, exprs, empty_labels)| {
            let mut sel = serde_json::Map::new();
            if !ml.is_empty() || empty_labels {
                sel.insert("matchLabels".into(), labels(&ml));
            }
            if !exprs.is_empty() {
                sel.insert("matchExpressions".into(), Value::Array(exprs));
            }
            Value::Object(sel)
        })
        .boxed();
    // One that cannot be read in full (an operator that does not exist, values where
    // none may be) besides requirements that can.
    let broken = (
        some.clone(),
        select(vec![
            json!({"key": keys[0], "operator": "Is", "values": ["a"]}),
            json!({"key": keys[0], "operator": "Exists", "values": ["a"]}),
            json!({"key": "bad key", "operator": "Exists"}),
        ]),
    )
        .prop_map(|(mut sel, expr)| {
            let exprs = sel
                .as_object_mut()
                .unwrap()
                .entry("matchExpressions")
                .or_insert_with(|| json!([]));
            exprs.as_array_mut().unwrap().push(expr);
            sel
        });
    prop_oneof![6 => Just(json!({})), 12 => some, 1 => broken]
}

/// An address the ipBlocks are built around.
fn block_address() -> impl Strategy<Value = String> {
    prop_oneof![
        (0..3u8, 1..9u8).prop_map(|(s, h)| format!("10.0.{s}.{h}")),
        select(&OUTSIDE[..4]).prop_map(String::from),
        Just(NODE_IP.to_string()),
    ]
}

/// How an IPv4 CIDR is written: every form the API server accepts reads the same.
#[derive(Clone, Copy, Debug)]
enum Spelling {
    Plain,
    /// `010.000.001.005/024`: leading zeros, decimal all the same.
    LeadingZeros,
    /// `::ffff:10.0.1.5/120`: IPv4-mapped IPv6, the IPv4 network.
    Mapped,
}

fn spell(address: &str, len: u8, spelling: Spelling) -> String {
    match spelling {
        Spelling::Plain => format!("{address}/{len}"),
        Spelling::LeadingZeros => {
            let parts: Vec<String> = address.split('.').map(|p| format!("0{p}")).collect();
            format!("{}/0{len}", parts.join("."))
        }
        Spelling::Mapped => format!("::ffff:{address}/{}", u16::from(len) + 96),
    }
}

fn spelling() -> impl Strategy<Value = Spelling> {
    prop_oneof![
        6 => Just(Spelling::Plain),
        1 => Just(Spelling::LeadingZeros),
        1 => Just(Spelling::Mapped),
    ]
}

fn ip_block() -> impl Strategy<Value = Value> {
    let v4 = (
        (block_address(), spelling()),
        select(&[0u8, 8, 16, 23, 24, 30, 32][..]),
        proptest::collection::vec((block_address(), 1..=32u8, spelling()), 0..=2),
        // An except that cannot be read (not inside cidr, or not a CIDR): the whole
        // peer cannot.
        prop::option::weighted(
            0.1,
            select(&["192.0.2.0/24", "10.0.0.0/33", "10.0.0.0"][..]),
        ),
    )
        .prop_map(|((base, cidr_spelling), len, excepts, broken)| {
            let cidr: ipnet::IpNet = format!("{base}/{len}").parse().expect("cidr");
            let mut except: Vec<String> = excepts
                .into_iter()
                .filter_map(|(addr, extra, spelling)| {
                    let e: ipnet::IpNet =
                        format!("{addr}/{}", (len + extra).min(32)).parse().ok()?;
                    let written = spell(&e.network().to_string(), e.prefix_len(), spelling);
                    (e.prefix_len() > len && cidr.contains(&e)).then_some(written)
                })
                .collect();
            except.extend(broken.map(String::from));
            // Host bits are allowed in cidr: use the unmasked base address.
            json!({"cidr": spell(&base, len, cidr_spelling), "except": except})
        });
    let v6 = (select(&[0u8, 64, 120, 128][..]), 1..7u8).prop_map(|(len, h)| {
        let except = if len < 128 {
            vec![format!("fd00::{h}/128")]
        } else {
            vec![]
        };
        let cidr = if len == 0 {
            "::/0".to_string()
        } else {
            format!("fd00::{h}/{len}")
        };
        json!({"cidr": cidr, "except": except})
    });
    prop_oneof![4 => v4, 1 => v6]
}

fn peer() -> impl Strategy<Value = Value> {
    prop_oneof![
        4 => selector(&["app", "tier"]).prop_map(|s| json!({"podSelector": s})),
        4 => selector(&["team", "ns"]).prop_map(|s| json!({"namespaceSelector": s})),
        4 => (selector(&["app", "tier"]), selector(&["team", "ns"]))
            .prop_map(|(p, n)| json!({"podSelector": p, "namespaceSelector": n})),
        8 => ip_block().prop_map(|b| json!({"ipBlock": b})),
        // Peers that cannot be read: none, or two at once.
        1 => select(vec![
            json!({}),
            json!({"podSelector": {}, "ipBlock": {"cidr": "10.0.0.0/8"}}),
        ]),
    ]
}

fn port() -> impl Strategy<Value = Value> {
    let protocol = prop_oneof![Just(None), protocol_name().prop_map(Some)];
    let number = prop_oneof![
        1 => Just(json!({})),
        1 => select(&PORTS[..]).prop_map(|p| json!({"port": p})),
        1 => (select(&PORTS[..]), select(&[0u16, 1, 100, 8000][..]))
            .prop_map(|(p, d)| json!({"port": p, "endPort": p + d})),
        2 => select(&PORT_NAMES[..]).prop_map(|n| json!({"port": n})),
        // Cannot be read: left out of the rule by both sides.
        1 => Just(json!({"port": 81, "endPort": 80})),
    ];
    let protocol = prop_oneof![9 => protocol, 1 => Just(Some("ICMP"))];
    (protocol, number).prop_map(|(protocol, mut p)| {
        if let Some(proto) = protocol {
            p["protocol"] = json!(proto);
        }
        p
    })
}

/// `None`, `[]`, or a few items.
fn optional_list<S: Strategy<Value = Value> + 'static>(
    item: S,
    max: usize,
) -> impl Strategy<Value = Option<Value>> {
    prop_oneof![
        1 => Just(None),
        1 => Just(Some(json!([]))),
        4 => proptest::collection::vec(item, 1..=max).prop_map(|v| Some(Value::Array(v))),
    ]
}

fn rule(peers_field: &'static str) -> impl Strategy<Value = Value> {
    (optional_list(peer(), 2), optional_list(port(), 2)).prop_map(move |(peers, ports)| {
        let mut r = serde_json::Map::new();
        if let Some(p) = peers {
            r.insert(peers_field.into(), p);
        }
        if let Some(p) = ports {
            r.insert("ports".into(), p);
        }
        Value::Object(r)
    })
}

fn policy_spec() -> impl Strategy<Value = (usize, Value)> {
    const TYPES: [Option<&[&str]>; 6] = [
        None,
        Some(&["Ingress"]),
        Some(&["Egress"]),
        Some(&["Ingress", "Egress"]),
        Some(&[]),
        // Cannot be read: isolates both ways.
        Some(&["Ingress", "egress"]),
    ];
    let types = select(&TYPES[..]);
    (
        0..3usize,
        selector(&["app", "tier"]),
        types,
        optional_list(rule("from"), 2),
        optional_list(rule("to"), 2),
    )
        .prop_map(|(ns, pod_selector, types, ingress, egress)| {
            let mut spec = serde_json::Map::new();
            spec.insert("podSelector".into(), pod_selector);
            if let Some(t) = types {
                spec.insert("policyTypes".into(), json!(t));
            }
            if let Some(i) = ingress {
                spec.insert("ingress".into(), i);
            }
            if let Some(e) = egress {
                spec.insert("egress".into(), e);
            }
            (ns, Value::Object(spec))
        })
}

/// Pods as ClusterNetworkPolicy names them: `namespaces`, or `pods` with both selectors.
fn cnp_pods() -> impl Strategy<Value = Value> {
    prop_oneof![
        selector(&["team", "ns"]).prop_map(|n| json!({"namespaces": n})),
        (selector(&["team", "ns"]), selector(&["app", "tier"]))
            .prop_map(|(n, p)| { json!({"pods": {"namespaceSelector": n, "podSelector": p}}) }),
    ]
}

/// A `networks` entry: around the pod, node and outside addresses, or IPv6.
fn cnp_network() -> impl Strategy<Value = String> {
    prop_oneof![
        4 => (block_address(), select(&[0u8, 8, 16, 24, 30, 32][..])).prop_map(|(a, len)| {
            let net: ipnet::IpNet = format!("{a}/{len}").parse().expect("cidr");
            net.trunc().to_string()
        }),
        1 => select(&["::/0", "fd00::/120", "fd00::2/128"][..]).prop_map(String::from),
    ]
}

fn cnp_peer(egress: bool) -> BoxedStrategy<Value> {
    let pods = cnp_pods();
    if egress {
        prop_oneof![
            3 => pods,
            2 => proptest::collection::vec(cnp_network(), 1..=2)
                .prop_map(|nets| json!({"networks": nets})),
            1 => selector(&["zone", "role"]).prop_map(|s| json!({"nodes": s})),
        ]
        .boxed()
    } else {
        pods.boxed()
    }
}

fn cnp_protocol() -> impl Strategy<Value = Value> {
    let port = prop_oneof![
        2 => select(&PORTS[..]).prop_map(|p| json!({"number": p})),
        1 => (select(&PORTS[..]), select(&[1u16, 100, 8000][..]))
            .prop_map(|(p, d)| json!({"range": {"start": p, "end": p + d}})),
    ];
    prop_oneof![
        3 => (select(&["tcp", "tcp", "udp", "sctp"][..]), port)
            .prop_map(|(proto, port)| json!({proto: {"destinationPort": port}})),
        1 => select(&PORT_NAMES[..]).prop_map(|n| json!({"destinationNamedPort": n})),
    ]
}

fn cnp_rule(egress: bool) -> impl Strategy<Value = Value> {
    (
        select(&["Accept", "Deny", "Pass"][..]),
        proptest::collection::vec(cnp_peer(egress), 1..=2),
        prop::option::of(proptest::collection::vec(cnp_protocol(), 1..=2)),
        prop::option::weighted(0.3, select(&["first", "second"][..])),
    )
        .prop_map(move |(action, peers, protocols, name)| {
            let mut r = serde_json::Map::new();
            r.insert("action".into(), json!(action));
            r.insert(if egress { "to" } else { "from" }.into(), json!(peers));
            if let Some(p) = protocols {
                r.insert("protocols".into(), json!(p));
            }
            if let Some(n) = name {
                r.insert("name".into(), json!(n));
            }
            Value::Object(r)
        })
}

/// A ClusterNetworkPolicy's `spec`: either tier, priorities that tie often.
fn cnp_spec() -> impl Strategy<Value = Value> {
    (
        select(&["Admin", "Admin", "Baseline"][..]),
        select(&[0u16, 10, 10, 1000][..]),
        cnp_pods(),
        proptest::collection::vec(cnp_rule(false), 0..=2),
        proptest::collection::vec(cnp_rule(true), 0..=2),
    )
        .prop_map(|(tier, priority, subject, ingress, egress)| {
            let mut spec = serde_json::Map::new();
            spec.insert("tier".into(), json!(tier));
            spec.insert("priority".into(), json!(priority));
            spec.insert("subject".into(), subject);
            if !ingress.is_empty() {
                spec.insert("ingress".into(), json!(ingress));
            }
            if !egress.is_empty() {
                spec.insert("egress".into(), json!(egress));
            }
            Value::Object(spec)
        })
}

/// A whole ClusterNetworkPolicy object.
fn cnp_object(name: &str, spec: Value) -> Value {
    json!({
        "apiVersion": crate::cnp::API_VERSION,
        "kind": crate::cnp::KIND,
        "metadata": {"name": name},
        "spec": spec,
    })
}

/// A random cluster and the addresses worth asking about (its pods', the node's and
/// some that are never pods').
#[derive(Clone, Debug)]
pub struct Scenario {
    pub state: ClusterState,
    pub addresses: Vec<IpAddr>,
}

fn scenario() -> impl Strategy<Value = Scenario> {
    (
        2..=3usize,
        proptest::collection::vec(label_set(&["team", "ns"]), 3),
        proptest::collection::vec(pod_spec(), 2..=6),
        proptest::collection::vec(policy_spec(), 0..=4),
        prop_oneof![
            1 => Just(Vec::new()),
            1 => proptest::collection::vec(cnp_spec(), 1..=3),
        ],
        proptest::collection::vec(label_set(&["zone", "role"]), 2),
    )
        .prop_map(
            |(n_ns, ns_labels, pods, policies, cluster_policies, node_labels)| {
                let mut c = Cluster::new().node_name("n1").node_ips(&[NODE_IP]);
                for (i, name) in NAMESPACES.iter().take(n_ns).enumerate() {
                    c = c.ns(name, &ns_labels[i]);
                }
                let mut addresses: Vec<IpAddr> =
                    OUTSIDE.iter().map(|s| s.parse().unwrap()).collect();
                addresses.push(NODE_IP.parse().unwrap());
                addresses.push(OTHER_NODE_IP.parse().unwrap());
                for (name, ip, labels) in [
                    ("n1", NODE_IP, &node_labels[0]),
                    ("n2", OTHER_NODE_IP, &node_labels[1]),
                ] {
                    let labels = labels
                        .iter()
                        .map(|&(k, v)| (k.to_string(), v.to_string()))
                        .collect();
                    let node = crate::state::NodePeer {
                        labels,
                        ips: vec![ip.parse().unwrap()],
                    };
                    c.state.nodes.insert(name.to_string(), node);
                }
                let mut previous_v4 = None;
                for (i, p) in pods.iter().enumerate() {
                    let ns = NAMESPACES[p.ns % n_ns];
                    let own_v4 = format!("10.0.{}.{}", p.subnet, i + 1);
                    let v4 = match &previous_v4 {
                        Some(previous) if p.shares_address => String::clone(previous),
                        _ => own_v4,
                    };
                    let v6 = format!("fd00::{}", i + 1);
                    let mut ips = vec![v4.as_str()];
                    if p.v6 {
                        ips.push(&v6);
                    }
                    let mut pod =
                        super::testutil::pod(ns, &format!("p{i}"), &p.labels, &ips, &p.ports);
                    if !p.init_ports.is_empty() {
                        pod = super::testutil::with_init_container(pod, p.sidecar, &p.init_ports);
                    }
                    let created = p
                        .created
                        .map(|day| format!("2025-01-0{}T00:00:00Z", day + 1));
                    pod = super::testutil::with_phase(pod, p.phase, created.as_deref());
                    let spec = pod.spec.as_mut().unwrap();
                    spec.node_name = Some(if p.local { "n1" } else { "n2" }.into());
                    spec.host_network = p.host_network.then_some(true);
                    addresses.extend(ips.iter().map(|s| s.parse::<IpAddr>().unwrap()));
                    c = c.raw_pod(pod);
                    previous_v4 = Some(v4);
                }
                for (i, (ns, spec)) in policies.into_iter().enumerate() {
                    c = c.policy(NAMESPACES[ns % n_ns], &format!("np{i}"), spec);
                }
                for (i, spec) in cluster_policies.into_iter().enumerate() {
                    let name = format!("cnp{i}");
                    let object = cnp_object(&name, spec);
                    c.state.cluster_policies.insert(name, object);
                }
                Scenario {
                    state: c.state,
                    addresses,
                }
            },
        )
}

/// A protocol and destination port.
fn probe() -> impl Strategy<Value = (u8, u16)> {
    (
        select(&[PROTO_TCP, PROTO_TCP, PROTO_UDP, PROTO_SCTP][..]),
        prop_oneof![6 => select(&PORTS[..]), 1 => any::<u16>()],
    )
}

/// Any two addresses (pods or not) and a probe.
fn flow(n_addresses: usize) -> impl Strategy<Value = (usize, usize, (u8, u16))> {
    (0..n_addresses, 0..n_addresses, probe())
}

/// The model's decision on one side of a flow against the tiered reference's: the same
/// outcome, and the rule the model names is the deciding one (a ClusterNetworkPolicy
/// rule) or one of those the reference says allow it (NetworkPolicy).
#[cfg(test)]
fn check(
    reference: &TieredReference<'_>,
    compiled: &Compiled,
    src: IpAddr,
    dst: IpAddr,
    protocol: u8,
    port: u16,
) -> Result<(), TestCaseError> {
    for direction in Direction::BOTH {
        let got = model::decide(compiled, src, dst, protocol, port, direction);
        let want = reference.evaluate(src, dst, protocol, port, direction);
        let context = || {
            format!(
                "{direction} {src} -> {dst} proto {protocol} port {port}: model {got:?}, reference {want:?}"
            )
        };
        let rule = compiled.rules.get(&got.rule);
        match (&want.decided_by, got.reason) {
            (DecidedBy::NotEndpoint, Reason::NotEndpoint)
            | (DecidedBy::Itself, Reason::Hairpin)
            | (DecidedBy::Default, Reason::NotIsolated | Reason::FromHost)
            | (DecidedBy::NetworkPolicy(Verdict::FromHost), Reason::FromHost)
            | (DecidedBy::NetworkPolicy(Verdict::Denied), Reason::PolicyDenied) => {}
            (DecidedBy::NetworkPolicy(Verdict::Allowed(rules)), Reason::PolicyAllowed) => {
                prop_assert!(
                    rule.is_some_and(|r| rules.contains(r)),
                    "wrong rule {:?}: {}",
                    rule,
                    context()
                );
            }
            (
                DecidedBy::Cnp {
                    rule: want_rule,
                    action,
                },
                Reason::ClusterAccepted | Reason::ClusterDenied,
            ) => {
                prop_assert_eq!(
                    *action == crate::cnp::Action::Deny,
                    got.reason == Reason::ClusterDenied,
                    "{}",
                    context()
                );
                let same = rule.is_some_and(|r| want_rule.names(r));
                prop_assert!(same, "wrong rule {:?}: {}", rule, context());
            }
            _ => prop_assert!(false, "{}", context()),
        }
    }
    Ok(())
}

/// What [`compiled_maps_agree_with_reference`] asks about one cluster: 16 random flows
/// (indices into the addresses) and 3 probes for the endpoint sweep ([`sweep`]). The
/// kernel sample (the agent's `tests/differential_kernel.rs`) draws from the same strategy.
pub type Case = (Scenario, Vec<(usize, usize, (u8, u16))>, Vec<(u8, u16)>);

pub fn case() -> impl Strategy<Value = Case> {
    scenario().prop_flat_map(|s| {
        let n = s.addresses.len();
        (
            Just(s),
            proptest::collection::vec(flow(n), 16),
            proptest::collection::vec(probe(), 3),
        )
    })
}

/// Every endpoint (an address `is_endpoint` accepts) against every address, both ways,
/// the probes taken in turn: `(src, dst, protocol, port)`.
pub fn sweep(
    addresses: &[IpAddr],
    probes: &[(u8, u16)],
    is_endpoint: impl Fn(IpAddr) -> bool,
) -> Vec<(IpAddr, IpAddr, u8, u16)> {
    let mut out = Vec::new();
    for (i, &endpoint) in addresses.iter().enumerate() {
        if !is_endpoint(endpoint) {
            continue;
        }
        for (j, &peer) in addresses.iter().enumerate() {
            let (protocol, port) = probes[(i + j) % probes.len()];
            out.push((peer, endpoint, protocol, port));
            let (protocol, port) = probes[(i + j + 1) % probes.len()];
            out.push((endpoint, peer, protocol, port));
        }
    }
    out
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

    #[test]
    fn compiled_maps_agree_with_reference((s, flows, probes) in case()) {
        let compiled = compile(&s.state, &Allocations::default());
        // No dead weight: every identity but ANY and WORLD carries some IPCACHE entry,
        // and POLICY names no other (but the world, in a tier's rule for every peer).
        let carried: BTreeSet<u32> = compiled.ipcache.values().map(|p| p.identity).collect();
        for id in compiled.identities.keys() {
            prop_assert!(*id <= netpol_common::IDENTITY_WORLD || carried.contains(id), "identity {} has no address", id);
        }
        for k in compiled.policy.keys() {
            let tiered = k.data.direction & !netpol_common::DIR_MASK != 0;
            prop_assert!(
                k.data.identity == netpol_common::IDENTITY_ANY
                    || (tiered && k.data.identity == netpol_common::IDENTITY_WORLD)
                    || carried.contains(&k.data.identity)
            );
        }
        let reference = TieredReference::new(&s.state);
        for (a, b, (protocol, port)) in flows {
            let (src, dst) = (s.addresses[a], s.addresses[b]);
            check(&reference, &compiled, src, dst, protocol, port)?;
            prop_assert_eq!(
                model::flow_allowed(&compiled, src, dst, protocol, port),
                reference.flow_allowed(src, dst, protocol, port)
            );
        }
        // Every local endpoint against every address, both ways, on two probes.
        let is_endpoint = |ip| compiled.endpoints.contains_key(&super::addr(ip));
        for (src, dst, protocol, port) in sweep(&s.addresses, &probes, is_endpoint) {
            check(&reference, &compiled, src, dst, protocol, port)?;
        }
    }

    /// Recompiling with the previous allocations after adding an unrelated pod keeps
    /// every id, and yields the same maps as far as the old objects go.
    #[test]
    fn allocations_survive_unrelated_pod(s in scenario()) {
        let first = compile(&s.state, &Allocations::default());
        let mut grown = s.state.clone();
        let extra = super::testutil::pod("unrelated", "zz", &[("nobody", "selects-me")], &["172.31.0.1"], &[]);
        grown.pods.insert(crate::state::ObjectRef::new("unrelated", "zz"), extra.into());
        let second = compile(&grown, &first.allocations);
        for (pod, id) in first.allocations.endpoints() {
            prop_assert_eq!(second.allocations.endpoint_id(pod), Some(*id));
        }
        for (sig, id) in first.allocations.identities() {
            prop_assert_eq!(second.allocations.identity(sig), Some(*id));
        }
        // The same endpoints, isolated alike; a new identity may bring the first entry of
        // a kind (every protocol, say) and so a kind flag, never take one away.
        let kinds = crate::policy_maps::KIND_FLAGS;
        prop_assert_eq!(first.endpoints.len(), second.endpoints.len());
        for (addr, before) in &first.endpoints {
            let after = second.endpoints.get(addr);
            prop_assert_eq!(after.map(|e| (e.id, e.flags & !kinds)), Some((before.id, before.flags & !kinds)));
            prop_assert_eq!(after.map(|e| e.flags & before.flags & kinds), Some(before.flags & kinds));
        }
        // Selectors like `namespaceSelector: {}` may match the new pod and add entries
        // for a new identity; nothing that was there changes.
        for (k, v) in first.policy.iter() {
            prop_assert_eq!(second.policy.get(k), Some(v));
        }
        let new_keys: BTreeSet<_> = second.ipcache.keys().filter(|k| !first.ipcache.contains_key(k)).collect();
        prop_assert!(new_keys.len() <= 1);
        for (k, v) in &first.ipcache {
            prop_assert_eq!(second.ipcache.get(k), Some(v));
        }
    }
}

/// One small change to a state, as the agent sees them one by one.
#[cfg(test)]
#[derive(Clone, Debug)]
enum Change {
    /// Set (or remove, with `None`) a label of the n-th pod.
    PodLabel(usize, &'static str, Option<&'static str>),
    /// Set a label of the n-th namespace.
    NamespaceLabel(usize, &'static str, &'static str),
    /// Delete the Namespace object of the n-th of x, y, z, w (its pods stay), or create
    /// it with this team label when there is none.
    ToggleNamespace(usize, &'static str),
    /// Remove the n-th policy.
    RemovePolicy(usize),
    /// Add a policy (namespace index, spec).
    AddPolicy(usize, Value),
    /// Give every rule of the n-th policy this one port (same peers, other ports).
    PolicyPort(usize, u16),
    /// Move the n-th pod to the other node (local or not).
    MovePod(usize),
    /// Give the n-th pod another IPv4 address (possibly one another pod has).
    PodAddress(usize, u8),
    /// Remove the n-th pod.
    RemovePod(usize),
    /// Add a pod (namespace index, possibly of no Namespace object; labels; IPv4 host
    /// part, possibly another pod's; local or not).
    AddPod(usize, Vec<(&'static str, &'static str)>, u8, bool),
    /// Set the phase of the n-th pod (a finished pod holds no address).
    PodPhase(usize, &'static str),
    /// Replace the declared ports of the n-th pod with one named port.
    PodNamedPort(usize, &'static str, u16, &'static str),
    /// Add (or replace) a ClusterNetworkPolicy.
    PutClusterPolicy(usize, Value),
    /// Remove the n-th ClusterNetworkPolicy.
    RemoveClusterPolicy(usize),
    /// Give every rule of the n-th ClusterNetworkPolicy this action (same subject and
    /// peers, other verdicts).
    ClusterPolicyAction(usize, &'static str),
    /// Stage (or enforce) the n-th policy (`netpol.dev/staged`).
    StagePolicy(usize, bool),
    /// Compile staged policies as enforced, or not.
    EnforceStaged(bool),
    /// The source could no longer read the n-th policy at all: it is gone from the
    /// policies and listed as unreadable.
    UnreadablePolicy(usize),
    /// The source could not read a part of the n-th policy (its first ingress rule).
    UnreadablePart(usize),
    /// The source reads every policy again: nothing is unreadable.
    AllReadable,
    /// Put Service `svc{n}` (namespace x) with this ClusterIP: outside, a pod's, a
    /// node's, or IPv6.
    PutService(usize, &'static str),
    /// Remove the n-th Service.
    RemoveService(usize),
    /// The agent's Service ranges (none, one around outside addresses, or one holding
    /// pods).
    ServiceRanges(&'static [&'static str]),
    /// The other node's address: its own, an outside one, or a pod's.
    OtherNodeAddress(&'static str),
}

#[cfg(test)]
fn change() -> impl Strategy<Value = Change> {
    prop_oneof![
        3 => (any::<usize>(), select(&["app", "tier"][..]), prop::option::of(select(&["a", "b"][..])))
            .prop_map(|(i, k, v)| Change::PodLabel(i, k, v)),
        1 => (any::<usize>(), select(&["team", "ns"][..]), select(&["a", "b"][..]))
            .prop_map(|(i, k, v)| Change::NamespaceLabel(i, k, v)),
        1 => (any::<usize>(), select(&["a", "b"][..])).prop_map(|(i, v)| Change::ToggleNamespace(i, v)),
        1 => any::<usize>().prop_map(Change::RemovePolicy),
        2 => policy_spec().prop_map(|(ns, spec)| Change::AddPolicy(ns, spec)),
        1 => (any::<usize>(), select(&PORTS[..])).prop_map(|(i, port)| Change::PolicyPort(i, port)),
        1 => any::<usize>().prop_map(Change::MovePod),
        1 => (any::<usize>(), 1..9u8).prop_map(|(i, h)| Change::PodAddress(i, h)),
        1 => any::<usize>().prop_map(Change::RemovePod),
        1 => (0..4usize, label_set(&["app", "tier"]), 1..9u8, any::<bool>())
            .prop_map(|(ns, labels, host, local)| Change::AddPod(ns, labels, host, local)),
        1 => (any::<usize>(), select(&["Running", "Pending", "Succeeded", "Failed"][..]))
            .prop_map(|(i, phase)| Change::PodPhase(i, phase)),
        1 => (any::<usize>(), select(&PORT_NAMES[..]), select(&PORTS[..]), protocol_name())
            .prop_map(|(i, name, port, protocol)| Change::PodNamedPort(i, name, port, protocol)),
        1 => (0..4usize, cnp_spec()).prop_map(|(i, spec)| Change::PutClusterPolicy(i, spec)),
        1 => any::<usize>().prop_map(Change::RemoveClusterPolicy),
        1 => (any::<usize>(), select(&["Accept", "Deny", "Pass"][..]))
            .prop_map(|(i, action)| Change::ClusterPolicyAction(i, action)),
        2 => (any::<usize>(), any::<bool>()).prop_map(|(i, staged)| Change::StagePolicy(i, staged)),
        2 => any::<bool>().prop_map(Change::EnforceStaged),
        1 => any::<usize>().prop_map(Change::UnreadablePolicy),
        1 => any::<usize>().prop_map(Change::UnreadablePart),
        1 => Just(Change::AllReadable),
    ]
}

/// A change of what the compiler reads whole at every compile (Services, Service ranges,
/// nodes: no [`crate::state::Changes`] names them), beside which the pod side's keys are
/// patched.
#[cfg(test)]
fn frontend_change() -> impl Strategy<Value = Change> {
    const SERVICE_ADDRESSES: [&str; 6] = [
        "10.0.0.200",
        "10.0.1.3",
        "10.0.1.5",
        OTHER_NODE_IP,
        "fd00::2",
        "10.96.0.10",
    ];
    const RANGES: [&[&str]; 3] = [&[], &["10.0.0.192/26"], &["10.0.1.0/29", "fd00::/125"]];
    prop_oneof![
        2 => (0..3usize, select(&SERVICE_ADDRESSES[..]))
            .prop_map(|(i, address)| Change::PutService(i, address)),
        1 => any::<usize>().prop_map(Change::RemoveService),
        1 => select(&RANGES[..]).prop_map(Change::ServiceRanges),
        1 => select(&[OTHER_NODE_IP, "10.0.0.77", "10.0.1.4", "fd00::3"][..])
            .prop_map(Change::OtherNodeAddress),
    ]
}

#[cfg(test)]
fn apply(state: &mut ClusterState, change: &Change, step: usize) {
    use crate::state::ObjectRef;
    let nth_pod = |state: &ClusterState, i: usize| {
        state.pods.keys().nth(i % state.pods.len().max(1)).cloned()
    };
    match change {
        Change::PodLabel(i, key, value) => {
            if let Some(obj) = nth_pod(state, *i) {
                let pod = state.pods.get_mut(&obj).unwrap();
                pod.set_label(key, value.as_deref());
            }
        }
        Change::NamespaceLabel(i, key, value) => {
            let n = state.namespaces.len().max(1);
            if let Some(ns) = state.namespaces.values_mut().nth(i % n) {
                *ns = ns.with_labels(ns.labels().with(key, Some(value)));
            }
        }
        Change::ToggleNamespace(i, team) => {
            let name = ["x", "y", "z", "w"][i % 4];
            if state.namespaces.remove(name).is_none() {
                let object = super::testutil::namespace(name, &[("team", team)]);
                state.namespaces.insert(name.to_string(), object.into());
            }
        }
        Change::RemovePolicy(i) => {
            let n = state.policies.len().max(1);
            if let Some(obj) = state.policies.keys().nth(i % n).cloned() {
                state.policies.remove(&obj);
            }
        }
        Change::AddPolicy(ns, spec) => {
            let ns = NAMESPACES[ns % state.namespaces.len().max(1)];
            let name = format!("added{step}");
            state.policies.insert(
                ObjectRef::new(ns, &name),
                super::testutil::policy(ns, &name, spec.clone()).into(),
            );
        }
        Change::PolicyPort(i, port) => {
            let n = state.policies.len().max(1);
            if let Some(obj) = state.policies.keys().nth(i % n).cloned() {
                let mut object = serde_json::to_value(state.policies[&obj].object()).unwrap();
                for direction in ["ingress", "egress"] {
                    let rules = object["spec"][direction].as_array_mut();
                    for rule in rules.into_iter().flatten() {
                        rule["ports"] = json!([{ "protocol": "TCP", "port": port }]);
                    }
                }
                let policy: k8s_openapi::api::networking::v1::NetworkPolicy =
                    serde_json::from_value(object).unwrap();
                state.policies.insert(obj, policy.into());
            }
        }
        Change::MovePod(i) => {
            if let Some(obj) = nth_pod(state, *i) {
                let pod = state.pods.get_mut(&obj).unwrap();
                let other = if pod.node_name() == Some("n1") {
                    "n2"
                } else {
                    "n1"
                };
                pod.set_node_name(Some(other));
            }
        }
        Change::PodAddress(i, host) => {
            if let Some(obj) = nth_pod(state, *i) {
                let ip = format!("10.0.1.{host}");
                let pod = state.pods.get_mut(&obj).unwrap();
                pod.set_addresses(&[&ip], Some(&ip));
            }
        }
        Change::RemovePod(i) => {
            if let Some(obj) = nth_pod(state, *i) {
                state.pods.remove(&obj);
            }
        }
        Change::AddPod(ns, labels, host, local) => {
            // "w" has no Namespace object: its pods still have a namespace to select.
            let ns = ["x", "y", "z", "w"][*ns % 4];
            let name = format!("added{step}");
            let ip = format!("10.0.1.{host}");
            let mut pod: crate::state::PodInfo =
                super::testutil::pod(ns, &name, labels, &[&ip], &[]).into();
            pod.set_node_name(Some(if *local { "n1" } else { "n2" }));
            state.pods.insert(ObjectRef::new(ns, &name), pod);
        }
        Change::PodPhase(i, phase) => {
            if let Some(obj) = nth_pod(state, *i) {
                state.pods.get_mut(&obj).unwrap().set_phase(Some(phase));
            }
        }
        Change::PodNamedPort(i, name, port, protocol) => {
            if let Some(obj) = nth_pod(state, *i) {
                let declared =
                    crate::state::DeclaredPort::new(Some(name), (*port).into(), Some(protocol));
                state.pods.get_mut(&obj).unwrap().set_ports(vec![declared]);
            }
        }
        Change::PutClusterPolicy(i, spec) => {
            let name = format!("cnp{i}");
            let object = cnp_object(&name, spec.clone());
            state.cluster_policies.insert(name, object);
        }
        Change::RemoveClusterPolicy(i) => {
            let n = state.cluster_policies.len().max(1);
            if let Some(name) = state.cluster_policies.keys().nth(i % n).cloned() {
                state.cluster_policies.remove(&name);
            }
        }
        Change::ClusterPolicyAction(i, action) => {
            let n = state.cluster_policies.len().max(1);
            if let Some(object) = state.cluster_policies.values_mut().nth(i % n) {
                for direction in ["ingress", "egress"] {
                    let rules = object["spec"][direction].as_array_mut();
                    for rule in rules.into_iter().flatten() {
                        rule["action"] = json!(action);
                    }
                }
            }
        }
        Change::StagePolicy(i, staged) => {
            let n = state.policies.len().max(1);
            if let Some(policy) = state.policies.values_mut().nth(i % n) {
                let value = if *staged { "true" } else { "false" };
                super::testutil::set_staged(policy, value);
            }
        }
        Change::EnforceStaged(enforce) => state.enforce_staged = *enforce,
        Change::UnreadablePolicy(i) => {
            let n = state.policies.len().max(1);
            if let Some(obj) = state.policies.keys().nth(i % n).cloned() {
                state.policies.remove(&obj);
                state.unreadable_parts.remove(&obj);
                state.unreadable_policies.insert(obj);
            }
        }
        Change::UnreadablePart(i) => {
            let n = state.policies.len().max(1);
            if let Some(obj) = state.policies.keys().nth(i % n).cloned() {
                let part = crate::state::UnreadablePart {
                    field: "spec.ingress[0].from[0].namespaceSelector".into(),
                    message: "cannot be read".into(),
                    replaced: "spec.ingress[0]".into(),
                };
                state.unreadable_parts.entry(obj).or_default().push(part);
            }
        }
        Change::AllReadable => {
            state.unreadable_policies.clear();
            state.unreadable_parts.clear();
        }
        Change::PutService(i, address) => {
            let name = format!("svc{i}");
            let spec =
                json!({"clusterIP": address, "clusterIPs": [address], "ports": [{"port": 80}]});
            let object = json!({"metadata": {"namespace": "x", "name": name}, "spec": spec});
            let service = serde_json::from_value(object).unwrap();
            state.services.insert(ObjectRef::new("x", &name), service);
        }
        Change::RemoveService(i) => {
            let n = state.services.len().max(1);
            if let Some(obj) = state.services.keys().nth(i % n).cloned() {
                state.services.remove(&obj);
            }
        }
        Change::ServiceRanges(ranges) => {
            let ranges = ranges.iter().map(|r| r.parse().unwrap());
            state.configured_service_cidrs = ranges.collect();
        }
        Change::OtherNodeAddress(address) => {
            if let Some(node) = state.nodes.get_mut("n2") {
                node.ips = vec![address.parse().unwrap()];
            }
        }
    }
}

/// What `now` (a compiler's result) says of how it was made from `before` (the same
/// compiler's previous result) is true: the keys it names are exactly those whose
/// entries differ (none named when made from the empty map), and the same version holds
/// the same entries.
#[cfg(test)]
fn lineage_holds<K, V>(before: &KeptMap<K, V>, now: &KeptMap<K, V>) -> Result<(), TestCaseError>
where
    K: Ord + Copy + std::fmt::Debug,
    V: PartialEq + Copy,
{
    let differ: BTreeSet<K> = before
        .keys()
        .chain(now.keys())
        .filter(|key| before.get(key) != now.get(key))
        .copied()
        .collect();
    let differ: Vec<K> = differ.into_iter().collect();
    let named = now.changes_since(before.version());
    if before.is_empty() && !differ.is_empty() {
        // Made from the empty map: every key is new, and no list is kept.
        prop_assert_eq!(named, None);
    } else {
        prop_assert_eq!(named, Some(&differ[..]));
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 500, ..ProptestConfig::default() })]

    /// A chain of small changes compiled by one [`Compiler`] (with its memo) gives, at
    /// every step, exactly what compiling the same state from scratch (same numbers, no
    /// memo) gives; and the maps still agree with the reference.
    #[test]
    fn cache_never_changes_results(
        (s, changes, flows) in scenario().prop_flat_map(|s| {
            let n = s.addresses.len();
            (Just(s), proptest::collection::vec(change(), 1..8), proptest::collection::vec(flow(n), 4))
        })
    ) {
        let mut state = s.state.clone();
        let mut compiler = Compiler::default();
        let mut last = compiler.compile(&state);
        for (step, change) in changes.iter().enumerate() {
            apply(&mut state, change, step);
            let cold = compiler.without_memo().compile(&state);
            let warm = compiler.compile(&state);
            prop_assert_eq!(&warm, &cold, "after {:?}", change);
            lineage_holds(&last.ipcache, &warm.ipcache)?;
            lineage_holds(&last.policy, &warm.policy)?;
            last = warm.clone();
            // The versions in force: a policy the source cannot read keeps its last one.
            let admitted = compiler.admitted(&state);
            let reference = TieredReference::new(&admitted);
            for &(a, b, (protocol, port)) in &flows {
                let (src, dst) = (s.addresses[a], s.addresses[b]);
                check(&reference, &warm, src, dst, protocol, port)?;
            }
        }
    }

    /// A compiler told which pods, policies and namespaces changed at each step (as the
    /// Kubernetes source says) reads only those, and gives at every step exactly what a
    /// compiler that reads every object gives.
    #[test]
    fn a_compile_told_which_objects_changed_equals_one_that_reads_them_all(
        (s, changes) in scenario().prop_flat_map(|s| {
            let change = prop_oneof![5 => change(), 1 => frontend_change()];
            (Just(s), proptest::collection::vec(change, 1..10))
        })
    ) {
        /// The keys whose values differ between `before` and `after`.
        fn differ<K: Ord + Clone, V: PartialEq>(
            before: &BTreeMap<K, V>,
            after: &BTreeMap<K, V>,
        ) -> BTreeSet<K> {
            before
                .keys()
                .chain(after.keys())
                .filter(|key| before.get(*key) != after.get(*key))
                .cloned()
                .collect()
        }
        let mut state = s.state.clone();
        let mut told = Compiler::default();
        let mut reads_all = Compiler::default();
        told.compile_changed(&state, &crate::state::Changes::ANY);
        reads_all.compile(&state);
        for (step, change) in changes.iter().enumerate() {
            let before = state.clone();
            apply(&mut state, change, step);
            let changed = crate::state::Changes {
                pods: Some(differ(&before.pods, &state.pods)),
                policies: Some(differ(&before.policies, &state.policies)),
                namespaces: Some(differ(&before.namespaces, &state.namespaces)),
                cluster_policies: Some(differ(&before.cluster_policies, &state.cluster_policies)),
            };
            let incremental = told.compile_changed(&state, &changed);
            let full = reads_all.compile(&state);
            prop_assert_eq!(&incremental, &full, "after {:?}", change);
        }
    }
}
