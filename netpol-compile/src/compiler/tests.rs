//! Unit tests of [`compile`]: each asserts map entries derived by hand from the rule
//! under test.

use std::collections::BTreeMap;

use netpol_common::{
    Addr, DIR_EGRESS, DIR_INGRESS, ENDPOINT_EGRESS_ISOLATED, ENDPOINT_INGRESS_ISOLATED,
    EndpointInfo, IDENTITY_ANY, IDENTITY_FIRST_DYNAMIC, IDENTITY_WORLD, PEER_HOST,
    POLICY_PREFIX_ANY_PORT, POLICY_PREFIX_ANY_PROTO, POLICY_PREFIX_FULL, PROTO_SCTP, PROTO_TCP,
    PROTO_UDP, PeerInfo, Reason, TIER_ADMIN,
};
use serde_json::json;

use super::*;
use crate::lpm::{host_key, net_key};
use crate::testutil::{Cluster, ip};
use crate::{Subject, addr, model};

const D: u32 = IDENTITY_FIRST_DYNAMIC;

/// One POLICY entry, readable: (endpoint, identity, direction, protocol, port, prefix, rule).
type Entry = (u32, u32, u8, u8, u16, u32, u32);

fn entries(c: &Compiled) -> Vec<Entry> {
    c.policy
        .iter()
        .map(|(k, v)| {
            let d = &k.data;
            (
                d.endpoint,
                d.identity,
                d.direction,
                d.protocol,
                u16::from_be_bytes(d.port),
                k.prefix_len,
                v.rule,
            )
        })
        .collect()
}

fn run(c: Cluster) -> Compiled {
    let compiled = compile(&c.state, &Allocations::default());
    assert!(
        compiled.diagnostics.is_empty(),
        "{:?}",
        compiled.diagnostics
    );
    compiled
}

fn ep(c: &Compiled, ns: &str, name: &str) -> u32 {
    c.allocations
        .endpoint_id(&ObjectRef::new(ns, name))
        .expect("endpoint")
}

/// The tier group (`tier`) of the local pod at `address`.
fn tier_group(c: &Compiled, address: &str, tier: u8) -> u32 {
    c.endpoints[&addr(ip(address))].tier_group(tier)
}

fn peer(c: &Compiled, address: &str) -> PeerInfo {
    c.ipcache[&host_key(ip(address))]
}

fn identity(c: &Compiled, address: &str) -> u32 {
    peer(c, address).identity
}

fn prefix(c: &Compiled, cidr: &str) -> PeerInfo {
    c.ipcache[&net_key(&cidr.parse().unwrap())]
}

/// Namespace x with pods a (10.0.0.1), b (10.0.0.2); namespace y with pod c (10.0.1.3).
fn basic() -> Cluster {
    Cluster::new()
        .ns("x", &[("team", "a")])
        .ns("y", &[("team", "b")])
        .pod("x", "a", &[("app", "web")], &["10.0.0.1"], &[])
        .pod("x", "b", &[("app", "db")], &["10.0.0.2"], &[])
        .pod("y", "c", &[("app", "web")], &["10.0.1.3"], &[])
}

/// [`basic`] with x/b (app=db) admitting x/a (app=web).
fn allow_web() -> Cluster {
    basic().policy(
        "x",
        "p",
        json!({"podSelector": {"matchLabels": {"app": "db"}},
            "ingress": [{"from": [{"podSelector": {"matchLabels": {"app": "web"}}}]}]}),
    )
}

#[test]
fn a_change_that_moves_no_identity_keeps_the_policy_map_itself() {
    let mut compiler = Compiler::new();
    let first = compiler.compile(&allow_web().state);
    assert!(!first.policy.is_empty());
    // A new endpoint no policy selects, whose address joins an identity there is.
    let more = allow_web().pod("y", "d", &[("app", "web")], &["10.0.1.4"], &[]);
    let second = compiler.compile(&more.state);
    assert_eq!(first.policy.version(), second.policy.version(), "kept");
    assert_ne!(first.ipcache, second.ipcache);
    assert_eq!(second, compile(&more.state, &first.allocations));
    // x/a is no longer app=web: the identity x/b admits from changes, and so does POLICY.
    let moved = more.pod("x", "a", &[("app", "api")], &["10.0.0.1"], &[]);
    let third = compiler.compile(&moved.state);
    assert_ne!(second.policy.version(), third.policy.version());
    assert_eq!(third, compile(&moved.state, &second.allocations));
}

#[test]
fn a_peer_slot_freed_and_given_to_another_peer_names_the_new_peer_in_signatures() {
    use crate::state::Changes;
    // x/p lets app=a and app=c reach x/d, then goes; x/q, letting app=b reach x/d, comes
    // after the slots of x/p's peers were freed, and takes one of them. The class of x/b
    // (that one slot) is the class x/a had, by its key: its signature must name app=b.
    let cluster = || {
        Cluster::new()
            .ns("x", &[])
            .pod("x", "a", &[("app", "a")], &["10.0.0.1"], &[])
            .pod("x", "b", &[("app", "b")], &["10.0.0.2"], &[])
            .pod("x", "d", &[("app", "db")], &["10.0.0.3"], &[])
    };
    let from = |apps: &[&str]| {
        let peers: Vec<_> = apps
            .iter()
            .map(|app| json!({"podSelector": {"matchLabels": {"app": app}}}))
            .collect();
        json!({"podSelector": {"matchLabels": {"app": "db"}}, "ingress": [{"from": peers}]})
    };
    let told = |policy: &str| Changes {
        policies: Some([ObjectRef::new("x", policy)].into()),
        ..Changes::NONE
    };
    let mut compiler = Compiler::new();
    let first = compiler.compile(&cluster().policy("x", "p", from(&["a", "c"])).state);
    let none = cluster().state;
    let gone = compiler.compile_changed(&none, &told("p"));
    assert_eq!(gone, compile(&none, &first.allocations));
    let q = cluster().policy("x", "q", from(&["b"])).state;
    let third = compiler.compile_changed(&q, &told("q"));
    assert_eq!(third, compile(&q, &gone.allocations));
    let b = &third.identities[&identity(&third, "10.0.0.2")].signature;
    assert_eq!(b.peers.len(), 1);
    assert!(b.peers[0].contains("app=b"), "{b:?}");
}

#[test]
fn a_compile_told_nothing_changed_still_sees_the_node_renamed() {
    let mut compiler = Compiler::new();
    let mut state = allow_web().state;
    let every_pod_local = compiler.compile(&state);
    assert!(!every_pod_local.local_pods.is_empty());
    // The pods name no node: on a node with a name, none of them is local.
    state.node.name = Some("n1".into());
    let none_local = compiler.compile_changed(&state, &crate::state::Changes::NONE);
    assert!(none_local.local_pods.is_empty());
    assert_eq!(none_local, compile(&state, &every_pod_local.allocations));
    state.node.name = None;
    let again = compiler.compile_changed(&state, &crate::state::Changes::NONE);
    assert_eq!(again, compile(&state, &none_local.allocations));
}

#[test]
fn no_policies_endpoints_and_pod_ips_only() {
    let mut pending = crate::testutil::pod("x", "pending", &[], &["10.0.0.9"], &[]);
    pending.status.as_mut().unwrap().phase = Some("Pending".into());
    let mut done = crate::testutil::pod("x", "done", &[], &["10.0.0.8"], &[]);
    done.status.as_mut().unwrap().phase = Some("Succeeded".into());
    let mut failed = crate::testutil::pod("x", "failed", &[], &["10.0.0.10"], &[]);
    failed.status.as_mut().unwrap().phase = Some("Failed".into());
    let mut host = crate::testutil::pod("x", "host", &[], &["192.168.0.1"], &[]);
    host.spec.as_mut().unwrap().host_network = Some(true);
    let c = run(basic()
        .pod("x", "dual", &[], &["10.0.0.4", "fd00::4"], &[])
        .pod("x", "noip", &[], &[], &[])
        .raw_pod(pending)
        .raw_pod(done)
        .raw_pod(failed)
        .raw_pod(host));

    // Ids in pod order: x/a, x/b, x/dual, x/pending, y/c.
    let expected: BTreeMap<Addr, EndpointInfo> = [
        ("10.0.0.1", 1),
        ("10.0.0.2", 2),
        ("10.0.0.4", 3),
        ("fd00::4", 3),
        ("10.0.0.9", 4),
        ("10.0.1.3", 5),
    ]
    .into_iter()
    .map(|(a, id)| {
        (
            addr(ip(a)),
            EndpointInfo {
                id,
                ..EndpointInfo::default()
            },
        )
    })
    .collect();
    assert_eq!(c.endpoints, expected);

    // Every live pod IP is in IPCACHE, as "world" since no peer is in force.
    let world = PeerInfo {
        identity: IDENTITY_WORLD,
        flags: 0,
    };
    let expected: BTreeMap<Lpm<Addr>, PeerInfo> = [
        "10.0.0.1", "10.0.0.2", "10.0.0.4", "fd00::4", "10.0.0.9", "10.0.1.3",
    ]
    .into_iter()
    .map(|a| (host_key(ip(a)), world))
    .collect();
    assert_eq!(*c.ipcache, expected);
    assert_eq!(
        c.ipcache
            .keys()
            .find(|k| k.data.family == 6)
            .unwrap()
            .prefix_len,
        32 + 128
    );
    assert!(c.policy.is_empty());
    assert!(c.rules.is_empty());
    assert_eq!(c.local_pods.len(), 5);
    assert_eq!(c.local_pods[2].ips, [ip("10.0.0.4"), ip("fd00::4")]);
}

#[test]
fn default_deny_ingress_isolates_the_namespace_only() {
    let c = run(basic().policy("x", "deny", json!({"podSelector": {}})));
    assert_eq!(
        c.endpoints[&addr(ip("10.0.0.1"))],
        EndpointInfo {
            id: 1,
            flags: ENDPOINT_INGRESS_ISOLATED,
            tier_groups: [0, 0],
        }
    );
    assert_eq!(
        c.endpoints[&addr(ip("10.0.0.2"))],
        EndpointInfo {
            id: 2,
            flags: ENDPOINT_INGRESS_ISOLATED,
            tier_groups: [0, 0],
        }
    );
    assert_eq!(
        c.endpoints[&addr(ip("10.0.1.3"))],
        EndpointInfo {
            id: 3,
            ..EndpointInfo::default()
        }
    );
    assert!(c.policy.is_empty());
    assert!(c.rules.is_empty());
    let a = &c.local_pods[0];
    assert_eq!(a.ingress_policies, [ObjectRef::new("x", "deny")]);
    assert!(a.egress_policies.is_empty());
    assert!(c.local_pods[2].ingress_policies.is_empty());
}

#[test]
fn policy_types_defaulting() {
    let flags = |spec: serde_json::Value| {
        let c = run(basic().policy("x", "p", spec));
        c.endpoints[&addr(ip("10.0.0.1"))].flags
            & (ENDPOINT_INGRESS_ISOLATED | ENDPOINT_EGRESS_ISOLATED)
    };
    let both = ENDPOINT_INGRESS_ISOLATED | ENDPOINT_EGRESS_ISOLATED;
    assert_eq!(flags(json!({})), ENDPOINT_INGRESS_ISOLATED);
    assert_eq!(flags(json!({"egress": []})), ENDPOINT_INGRESS_ISOLATED);
    assert_eq!(flags(json!({"egress": [{}]})), both);
    assert_eq!(flags(json!({"policyTypes": [], "egress": [{}]})), both);
    assert_eq!(
        flags(json!({"policyTypes": ["Egress"]})),
        ENDPOINT_EGRESS_ISOLATED
    );
    assert_eq!(
        flags(json!({"policyTypes": ["Egress"], "ingress": [{}]})),
        ENDPOINT_EGRESS_ISOLATED
    );
    assert_eq!(flags(json!({"policyTypes": ["Ingress", "Egress"]})), both);
    // A policy selecting other pods does not isolate.
    assert_eq!(
        flags(json!({"podSelector": {"matchLabels": {"app": "db"}}})),
        0
    );
}

/// Endpoints whose rules allow any peer in a direction are flagged, so the kernel makes
/// the second (identity 0) POLICY lookup only for them.
#[test]
fn endpoints_with_any_peer_rules_are_flagged_per_direction() {
    use netpol_common::{ENDPOINT_EGRESS_ANY_PEER, ENDPOINT_INGRESS_ANY_PEER};
    let any = |spec: serde_json::Value| {
        let c = run(basic().policy("x", "p", spec));
        c.endpoints[&addr(ip("10.0.0.1"))].flags
            & (ENDPOINT_INGRESS_ANY_PEER | ENDPOINT_EGRESS_ANY_PEER)
    };
    assert_eq!(any(json!({"ingress": [{}]})), ENDPOINT_INGRESS_ANY_PEER);
    assert_eq!(
        any(
            json!({"policyTypes": ["Egress"], "egress": [{"ports": [{"port": 53, "protocol": "UDP"}]}]})
        ),
        ENDPOINT_EGRESS_ANY_PEER
    );
    assert_eq!(
        any(json!({"ingress": [{"from": [{"podSelector": {}}]}]})),
        0,
        "a pod selector is no 'any peer'"
    );
    assert_eq!(any(json!({})), 0);
}

#[test]
fn rules_without_peers_or_ports() {
    // ingress: [{}] allows everything; egress: [{ports: []}] too; the ingress rule of a
    // policy without policyType Ingress is ignored entirely.
    let c = run(basic()
        .policy(
            "x",
            "p",
            json!({"podSelector": {"matchLabels": {"app": "web"}},
            "ingress": [{"from": []}], "egress": [{"ports": []}]}),
        )
        .policy(
            "x",
            "q",
            json!({"podSelector": {"matchLabels": {"app": "db"}},
            "policyTypes": ["Egress"], "ingress": [{}]}),
        ));
    let any = POLICY_PREFIX_ANY_PROTO;
    assert_eq!(
        entries(&c),
        [
            (1, IDENTITY_ANY, DIR_INGRESS, 0, 0, any, 0),
            (1, IDENTITY_ANY, DIR_EGRESS, 0, 0, any, 1),
        ]
    );
    assert_eq!(
        c.rules,
        BTreeMap::from([
            (
                0,
                RuleRef::network_policy(ObjectRef::new("x", "p"), Direction::Ingress, 0)
            ),
            (
                1,
                RuleRef::network_policy(ObjectRef::new("x", "p"), Direction::Egress, 0)
            ),
        ])
    );
    assert_eq!(
        c.endpoints[&addr(ip("10.0.0.2"))].flags,
        ENDPOINT_EGRESS_ISOLATED
    );
}

#[test]
fn ports_protocols_and_ranges() {
    let c = run(basic().policy(
        "x",
        "p",
        json!({"podSelector": {"matchLabels": {"app": "db"}},
        "ingress": [{"ports": [
            {"port": 80},
            {"protocol": "UDP"},
            {"port": 1000, "endPort": 1003},
            {"port": 53, "protocol": "SCTP"},
            {"port": 65534, "endPort": 65535, "protocol": "UDP"},
            {"port": 1, "endPort": 3},
        ]}]}),
    ));
    let b = 2;
    let any_port = POLICY_PREFIX_ANY_PORT;
    let full = POLICY_PREFIX_FULL;
    let mut expected = vec![
        (b, IDENTITY_ANY, DIR_INGRESS, PROTO_TCP, 80, full, 0),
        (b, IDENTITY_ANY, DIR_INGRESS, PROTO_UDP, 0, any_port, 0),
        // 1000..=1003 is the aligned block 1000/14.
        (
            b,
            IDENTITY_ANY,
            DIR_INGRESS,
            PROTO_TCP,
            1000,
            any_port + 14,
            0,
        ),
        (b, IDENTITY_ANY, DIR_INGRESS, PROTO_SCTP, 53, full, 0),
        // 65534..=65535 is 65534/15 (and covered by "UDP any port" anyway).
        (
            b,
            IDENTITY_ANY,
            DIR_INGRESS,
            PROTO_UDP,
            65534,
            any_port + 15,
            0,
        ),
        // 1..=3: 1/16 and 2/15.
        (b, IDENTITY_ANY, DIR_INGRESS, PROTO_TCP, 1, full, 0),
        (b, IDENTITY_ANY, DIR_INGRESS, PROTO_TCP, 2, any_port + 15, 0),
    ];
    expected.sort();
    let mut got = entries(&c);
    got.sort();
    assert_eq!(got, expected);

    let check = |proto, port| {
        model::lookup(
            &c,
            ip("8.8.8.8"),
            ip("10.0.0.2"),
            proto,
            port,
            Direction::Ingress,
        )
        .is_some()
    };
    assert!(check(PROTO_TCP, 80) && !check(PROTO_TCP, 81));
    assert!(check(PROTO_UDP, 12345));
    assert!(check(PROTO_TCP, 1003) && !check(PROTO_TCP, 1004) && !check(PROTO_TCP, 999));
    assert!(check(PROTO_SCTP, 53) && !check(PROTO_SCTP, 80) && !check(PROTO_UDP + 1, 80));
    assert!(check(PROTO_TCP, 1) && check(PROTO_TCP, 3) && !check(PROTO_TCP, 4));
}

#[test]
fn pod_selector_peer_gets_one_identity() {
    // x/b allows ingress from app=web pods of its own namespace: x/a only, not y/c.
    let cluster = basic().policy(
        "x",
        "p",
        json!({"podSelector": {"matchLabels": {"app": "db"}},
        "ingress": [{"from": [{"podSelector": {"matchLabels": {"app": "web"}}}]}]}),
    );
    let state = cluster.state.clone();
    let c = run(cluster);
    assert_eq!(identity(&c, "10.0.0.1"), D);
    assert_eq!(identity(&c, "10.0.0.2"), IDENTITY_WORLD);
    assert_eq!(identity(&c, "10.0.1.3"), IDENTITY_WORLD);
    assert_eq!(
        entries(&c),
        [(2, D, DIR_INGRESS, 0, 0, POLICY_PREFIX_ANY_PROTO, 0)]
    );
    let info = &c.identities[&D];
    assert_eq!(info.signature.peers, ["pods {app=web} in namespace x"]);
    assert_eq!(c.members(&state, D), ["pod x/a 10.0.0.1"]);
    assert_eq!(info.description, "matches [pods {app=web} in namespace x]");
}

#[test]
fn namespace_selector_alone_and_with_pod_selector() {
    // Peer 1: every pod of namespaces team=b (y/c, y/d). Peer 2: app=web pods of
    // namespaces team in (a, b) (x/a, y/c). Classes: x/a {2}, y/c {1, 2}, y/d {1},
    // x/b {} (world).
    let c = run(basic()
        .pod("y", "d", &[("app", "db")], &["10.0.1.4"], &[])
        .policy("x", "p", json!({"podSelector": {"matchLabels": {"app": "db"}},
            "ingress": [{"from": [
                {"namespaceSelector": {"matchLabels": {"team": "b"}}},
                {"namespaceSelector": {"matchExpressions": [{"key": "team", "operator": "In", "values": ["a", "b"]}]},
                 "podSelector": {"matchLabels": {"app": "web"}}},
            ]}]})));
    let (a, cc, d) = (
        identity(&c, "10.0.0.1"),
        identity(&c, "10.0.1.3"),
        identity(&c, "10.0.1.4"),
    );
    assert_eq!(identity(&c, "10.0.0.2"), IDENTITY_WORLD);
    let mut ids = vec![a, cc, d];
    ids.sort();
    assert_eq!(ids, [D, D + 1, D + 2], "three distinct identities");
    let b = ep(&c, "x", "b");
    let mut expected: Vec<Entry> = [a, cc, d]
        .iter()
        .map(|&i| (b, i, DIR_INGRESS, 0, 0, POLICY_PREFIX_ANY_PROTO, 0))
        .collect();
    expected.sort();
    assert_eq!(entries(&c), expected);
    assert_eq!(
        c.identities[&d].signature.peers,
        ["pods {} in namespaces {team=b}"]
    );
    assert_eq!(
        c.identities[&cc].signature.peers,
        [
            "pods {app=web} in namespaces {team in (a,b)}",
            "pods {} in namespaces {team=b}"
        ]
    );
}

#[test]
fn namespace_name_label_is_implicit() {
    // Namespace y has no kubernetes.io/metadata.name label in the state; the API server
    // would have set it, so selecting on it must work.
    let c = run(basic().policy("x", "p", json!({"podSelector": {"matchLabels": {"app": "db"}},
        "ingress": [{"from": [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "y"}}}]}]})));
    assert_eq!(identity(&c, "10.0.1.3"), D);
    assert_eq!(identity(&c, "10.0.0.1"), IDENTITY_WORLD);
}

#[test]
fn ip_block_with_except() {
    // x/a may send to 10.0.0.0/16 except 10.0.1.0/24. Classes: the /16 and x/a's and
    // x/b's addresses (inside, not excepted) share one identity; the /24 and y/c's
    // address (excepted) are world.
    let cluster = basic().node_ips(&["10.0.0.254"]).policy(
        "x",
        "p",
        json!({"podSelector": {"matchLabels": {"app": "web"}}, "policyTypes": ["Egress"],
            "egress": [{"to": [{"ipBlock": {"cidr": "10.0.0.0/16", "except": ["10.0.1.0/24"]}}]}]}),
    );
    let state = cluster.state.clone();
    let c = run(cluster);
    let block = PeerInfo {
        identity: D,
        flags: 0,
    };
    let world = PeerInfo {
        identity: IDENTITY_WORLD,
        flags: 0,
    };
    let expected: BTreeMap<Lpm<Addr>, PeerInfo> = [
        (net_key(&"10.0.0.0/16".parse().unwrap()), block),
        (net_key(&"10.0.1.0/24".parse().unwrap()), world),
        (host_key(ip("10.0.0.1")), block),
        (host_key(ip("10.0.0.2")), block),
        (host_key(ip("10.0.1.3")), world),
        (
            host_key(ip("10.0.0.254")),
            PeerInfo {
                identity: D,
                flags: PEER_HOST,
            },
        ),
    ]
    .into_iter()
    .collect();
    assert_eq!(*c.ipcache, expected);
    // Members in key order (shorter prefixes first).
    assert_eq!(
        c.members(&state, D),
        [
            "10.0.0.0/16",
            "pod x/a 10.0.0.1",
            "pod x/b 10.0.0.2",
            "node 10.0.0.254"
        ]
    );
    assert_eq!(
        c.members(&state, IDENTITY_WORLD),
        [
            "every address no IPCACHE entry covers",
            "10.0.1.0/24",
            "pod y/c 10.0.1.3"
        ]
    );
    assert_eq!(
        entries(&c),
        [(1, D, DIR_EGRESS, 0, 0, POLICY_PREFIX_ANY_PROTO, 0)]
    );

    let allowed = |dst| {
        model::lookup(
            &c,
            ip("10.0.0.1"),
            ip(dst),
            PROTO_TCP,
            80,
            Direction::Egress,
        )
    };
    assert_eq!(allowed("10.0.200.1"), Some(0));
    assert_eq!(allowed("10.0.0.2"), Some(0));
    assert_eq!(allowed("10.0.1.3"), None);
    assert_eq!(allowed("10.0.1.200"), None);
    assert_eq!(allowed("10.1.0.1"), None);
    assert_eq!(allowed("fd00::1"), None);
}

#[test]
fn overlapping_ip_blocks_get_identities_by_containment() {
    // Peers: A = 10.0.0.0/8 except 10.1.0.0/16, B = 10.1.0.0/16 except 10.1.2.0/24.
    // Prefix classes: /8 {A}, 10.1.0.0/16 {B}, 10.1.2.0/24 {} (world).
    let c = run(Cluster::new()
        .ns("x", &[])
        .pod("x", "a", &[], &["192.168.0.1"], &[])
        .policy(
            "x",
            "p",
            json!({"ingress": [{"from": [
            {"ipBlock": {"cidr": "10.0.0.0/8", "except": ["10.1.0.0/16"]}},
            {"ipBlock": {"cidr": "10.1.0.0/16", "except": ["10.1.2.0/24"]}},
        ], "ports": [{"port": 443}]}]}),
        ));
    let a = prefix(&c, "10.0.0.0/8").identity;
    let b = prefix(&c, "10.1.0.0/16").identity;
    assert_ne!(a, b);
    assert!(a >= D && b >= D);
    assert_eq!(prefix(&c, "10.1.2.0/24").identity, IDENTITY_WORLD);
    assert_eq!(identity(&c, "192.168.0.1"), IDENTITY_WORLD);
    assert_eq!(c.ipcache.len(), 4);
    let mut expected = vec![
        (1, a, DIR_INGRESS, PROTO_TCP, 443, POLICY_PREFIX_FULL, 0),
        (1, b, DIR_INGRESS, PROTO_TCP, 443, POLICY_PREFIX_FULL, 0),
    ];
    expected.sort();
    assert_eq!(entries(&c), expected);
    let from = |src| {
        model::lookup(
            &c,
            ip(src),
            ip("192.168.0.1"),
            PROTO_TCP,
            443,
            Direction::Ingress,
        )
    };
    assert_eq!(from("10.200.0.1"), Some(0));
    assert_eq!(from("10.1.3.1"), Some(0));
    assert_eq!(from("10.1.2.1"), None);
}

#[test]
fn cidr_host_bits_are_masked_and_v6_works() {
    let c = run(Cluster::new()
        .ns("x", &[])
        .pod("x", "a", &[], &["10.0.0.1", "fd00::1"], &[])
        .policy(
            "x",
            "p",
            json!({"ingress": [{"from": [
                {"ipBlock": {"cidr": "10.0.0.1/8"}},
                {"ipBlock": {"cidr": "fd00::1/64", "except": ["fd00::1/128"]}},
            ]}]}),
        ));
    let v4 = prefix(&c, "10.0.0.0/8");
    let v6 = prefix(&c, "fd00::/64");
    assert_eq!(
        c.ipcache.keys().map(|k| k.prefix_len).collect::<Vec<_>>(),
        [40, 64, 96, 160]
    );
    assert_ne!(v4.identity, v6.identity);
    // The pod's v4 address is in the v4 block; its v6 address is the except.
    assert_eq!(identity(&c, "10.0.0.1"), v4.identity);
    assert_eq!(identity(&c, "fd00::1"), IDENTITY_WORLD);
    let from = |src| model::lookup(&c, ip(src), ip("fd00::1"), PROTO_UDP, 5, Direction::Ingress);
    assert_eq!(from("fd00::2"), Some(0));
    assert_eq!(from("fd00:1::2"), None);
    assert_eq!(from("11.9.9.9"), None);
}

#[test]
fn named_ports_resolve_on_the_local_pod_for_ingress() {
    let c = run(Cluster::new()
        .ns("x", &[])
        .pod("x", "a", &[], &["10.0.0.1"], &[("http", 8080, "TCP"), ("dns", 53, "UDP")])
        .pod("x", "b", &[], &["10.0.0.2"], &[("http", 9090, "TCP")])
        .pod("x", "c", &[], &["10.0.0.3"], &[])
        .policy("x", "p", json!({"ingress": [{"ports": [{"port": "http"}, {"port": "dns"}, {"port": "dns", "protocol": "UDP"}]}]})));
    let full = POLICY_PREFIX_FULL;
    assert_eq!(
        entries(&c),
        [
            (1, IDENTITY_ANY, DIR_INGRESS, PROTO_TCP, 8080, full, 0),
            (1, IDENTITY_ANY, DIR_INGRESS, PROTO_UDP, 53, full, 0),
            (2, IDENTITY_ANY, DIR_INGRESS, PROTO_TCP, 9090, full, 0),
        ]
    );
    // No egress rule uses a named port: resolutions do not split identities.
    assert!(
        c.identities
            .values()
            .all(|i| i.signature.named_ports.is_empty())
    );
}

#[test]
fn named_ports_resolve_on_each_peer_for_egress() {
    // x/s may send to any pod of x on "http". x/a serves http on 8080, x/b on 9090, x/c
    // not at all (so it shares a class with x/s). 8.8.8.8 is not a pod: never.
    let c = run(Cluster::new()
        .ns("x", &[])
        .pod("x", "a", &[], &["10.0.0.1"], &[("http", 8080, "TCP")])
        .pod("x", "b", &[], &["10.0.0.2"], &[("http", 9090, "TCP"), ("http", 7070, "UDP")])
        .pod("x", "c", &[], &["10.0.0.3"], &[])
        .pod("x", "s", &[("role", "client")], &["10.0.0.4"], &[])
        .policy("x", "p", json!({"podSelector": {"matchLabels": {"role": "client"}}, "policyTypes": ["Egress"],
            "egress": [{"to": [{"podSelector": {}}], "ports": [{"port": "http"}]},
                       {"to": [{"ipBlock": {"cidr": "0.0.0.0/0"}}], "ports": [{"port": "http", "protocol": "UDP"}]}]})));
    let (a, b, cc, s) = (
        identity(&c, "10.0.0.1"),
        identity(&c, "10.0.0.2"),
        identity(&c, "10.0.0.3"),
        identity(&c, "10.0.0.4"),
    );
    assert_eq!(cc, s);
    assert!(a != b && a != cc && b != cc);
    assert_eq!(
        c.identities[&a].signature.named_ports,
        [NamedPortResolution {
            name: "http".into(),
            protocol: PROTO_TCP,
            port: 8080
        }]
    );
    let sender = ep(&c, "x", "s");
    let full = POLICY_PREFIX_FULL;
    let mut expected = vec![
        (sender, a, DIR_EGRESS, PROTO_TCP, 8080, full, 0),
        (sender, b, DIR_EGRESS, PROTO_TCP, 9090, full, 0),
        // Rule 1: UDP "http" via the ipBlock: only x/b resolves it.
        (sender, b, DIR_EGRESS, PROTO_UDP, 7070, full, 1),
    ];
    expected.sort();
    assert_eq!(entries(&c), expected);
    let to = |dst, proto, port| {
        model::lookup(&c, ip("10.0.0.4"), ip(dst), proto, port, Direction::Egress)
    };
    assert_eq!(to("10.0.0.1", PROTO_TCP, 8080), Some(0));
    assert_eq!(to("10.0.0.1", PROTO_TCP, 9090), None);
    assert_eq!(to("10.0.0.2", PROTO_TCP, 9090), Some(0));
    assert_eq!(to("10.0.0.3", PROTO_TCP, 8080), None);
    assert_eq!(to("10.0.0.2", PROTO_UDP, 7070), Some(1));
    assert_eq!(to("8.8.8.8", PROTO_UDP, 7070), None);
}

#[test]
fn a_tiers_egress_named_port_resolves_on_each_peer_matched_by_the_same_rules() {
    // One Admin rule denies y/c's egress to every pod of x on "web": x/a serves it on 80,
    // x/b on 8080. Both are matched by the same rules, and each keeps its own port.
    let mut cluster = Cluster::new()
        .ns("x", &[("ns", "x")])
        .ns("y", &[("ns", "y")])
        .pod("x", "a", &[], &["10.0.0.1"], &[("web", 80, "TCP")])
        .pod("x", "b", &[], &["10.0.0.2"], &[("web", 8080, "TCP")])
        .pod("y", "c", &[], &["10.0.1.1"], &[]);
    cluster.state.cluster_policies.insert(
        "no-web".into(),
        json!({
            "apiVersion": "policy.networking.k8s.io/v1alpha2",
            "kind": "ClusterNetworkPolicy",
            "metadata": {"name": "no-web"},
            "spec": {"tier": "Admin", "priority": 1,
                     "subject": {"namespaces": {"matchLabels": {"ns": "y"}}},
                     "egress": [{"action": "Deny",
                                 "to": [{"namespaces": {"matchLabels": {"ns": "x"}}}],
                                 "protocols": [{"destinationNamedPort": "web"}]}]},
        }),
    );
    let c = run(cluster);
    let sender = tier_group(&c, "10.0.1.1", TIER_ADMIN);
    let ports_to = |address: &str| -> Vec<(u8, u16)> {
        let peer = identity(&c, address);
        entries(&c)
            .into_iter()
            .filter(|&(endpoint, identity, direction, ..)| {
                endpoint == sender && identity == peer && direction == DIR_EGRESS | TIER_ADMIN
            })
            .map(|(_, _, _, protocol, port, ..)| (protocol, port))
            .collect()
    };
    assert_ne!(identity(&c, "10.0.0.1"), identity(&c, "10.0.0.2"));
    assert_eq!(ports_to("10.0.0.1"), [(PROTO_TCP, 80)]);
    assert_eq!(ports_to("10.0.0.2"), [(PROTO_TCP, 8080)]);
}

/// A ClusterNetworkPolicy of the Admin tier, as the API server holds it.
fn admin_policy(name: &str, priority: u16, spec: serde_json::Value) -> serde_json::Value {
    let mut spec = spec;
    spec["tier"] = json!("Admin");
    spec["priority"] = json!(priority);
    json!({
        "apiVersion": "policy.networking.k8s.io/v1alpha2",
        "kind": "ClusterNetworkPolicy",
        "metadata": {"name": name},
        "spec": spec,
    })
}

/// [`basic`] with two Admin policies: "guard" (every pod: no SSH from namespaces of team
/// b, port `ssh`) and "db" (pods app=db: Postgres from everyone).
fn guarded(ssh: u16) -> Cluster {
    let mut cluster = basic();
    let policies = &mut cluster.state.cluster_policies;
    policies.insert(
        "guard".into(),
        admin_policy(
            "guard",
            1,
            json!({"subject": {"namespaces": {}},
                   "ingress": [{"action": "Deny",
                                "from": [{"namespaces": {"matchLabels": {"team": "b"}}}],
                                "protocols": [{"tcp": {"destinationPort": {"number": ssh}}}]}]}),
        ),
    );
    policies.insert(
        "db".into(),
        admin_policy(
            "db",
            2,
            json!({"subject": {"pods": {"namespaceSelector": {},
                                        "podSelector": {"matchLabels": {"app": "db"}}}},
                   "ingress": [{"action": "Accept",
                                "from": [{"namespaces": {}}],
                                "protocols": [{"tcp": {"destinationPort": {"number": 5432}}}]}]}),
        ),
    );
    cluster
}

#[test]
fn a_tier_rule_for_every_port_decides_its_peers_and_leaves_the_others_to_later_rules() {
    // Every pod's ingress, in order: deny team b on 22; pass team a on every port (twice:
    // the second never decides); deny everyone on every port.
    let mut cluster = basic();
    let every = |action: &str, from: serde_json::Value, ports: Option<serde_json::Value>| {
        let mut rule = json!({"action": action, "from": [from]});
        if let Some(ports) = ports {
            rule["protocols"] = ports;
        }
        json!({"subject": {"namespaces": {}}, "ingress": [rule]})
    };
    let (team_a, team_b) = (
        json!({"namespaces": {"matchLabels": {"team": "a"}}}),
        json!({"namespaces": {"matchLabels": {"team": "b"}}}),
    );
    let ssh = json!([{"tcp": {"destinationPort": {"number": 22}}}]);
    for (name, priority, spec) in [
        ("deny-b-ssh", 1, every("Deny", team_b, Some(ssh))),
        ("pass-a", 2, every("Pass", team_a.clone(), None)),
        ("pass-a-again", 3, every("Pass", team_a, None)),
        (
            "deny-all",
            4,
            every("Deny", json!({"namespaces": {}}), None),
        ),
    ] {
        let policy = admin_policy(name, priority, spec);
        cluster.state.cluster_policies.insert(name.into(), policy);
    }
    let c = run(cluster);
    let decided = |src, port| {
        let d = model::decide(
            &c,
            ip(src),
            ip("10.0.0.1"),
            PROTO_TCP,
            port,
            Direction::Ingress,
        );
        let by = c
            .rules
            .get(&d.rule)
            .map(|rule| rule.policy.name.to_string());
        (d.reason, by)
    };
    let by = |name: &str| Some(name.to_string());
    assert_eq!(
        decided("10.0.1.3", 22),
        (Reason::ClusterDenied, by("deny-b-ssh"))
    );
    assert_eq!(
        decided("10.0.1.3", 80),
        (Reason::ClusterDenied, by("deny-all"))
    );
    assert_eq!(decided("10.0.0.2", 22).0, Reason::NotIsolated);
    assert_eq!(decided("10.0.0.2", 80).0, Reason::NotIsolated);
    // Team a's identities: the first pass, one entry for every protocol, nothing else.
    let group = tier_group(&c, "10.0.0.1", TIER_ADMIN);
    let of_b: Vec<Entry> = entries(&c)
        .into_iter()
        .filter(|&(endpoint, peer, ..)| endpoint == group && peer == identity(&c, "10.0.0.2"))
        .collect();
    assert_eq!(of_b.len(), 1, "{of_b:?}");
    let rule = c.rules.get(&of_b[0].6).map(|r| r.policy.name.to_string());
    assert_eq!(rule, by("pass-a"));
}

#[test]
fn endpoints_the_same_cluster_network_policies_select_share_one_tier_group() {
    let c = run(guarded(22));
    // x/a and y/c: "guard" alone; x/b: "guard" and "db". No Baseline policy.
    let (a, b, cc) = (
        tier_group(&c, "10.0.0.1", TIER_ADMIN),
        tier_group(&c, "10.0.0.2", TIER_ADMIN),
        tier_group(&c, "10.0.1.3", TIER_ADMIN),
    );
    assert_ne!(a, 0);
    assert_eq!(a, cc);
    assert_ne!(a, b);
    assert_ne!(b, 0);
    for info in c.endpoints.values() {
        assert_eq!(info.tier_group(netpol_common::TIER_BASELINE), 0);
    }
    // Each group's entries once: the deny for the identity of y/c, and for x/b the
    // accept for every identity too.
    let tiered: Vec<Entry> = entries(&c)
        .into_iter()
        .filter(|&(_, _, direction, ..)| direction & TIER_ADMIN != 0)
        .collect();
    let of = |group: u32| tiered.iter().filter(|e| e.0 == group).count();
    assert_eq!(of(a), 1, "{tiered:?}");
    assert!(of(b) > 1, "{tiered:?}");
    assert_eq!(of(a) + of(b), tiered.len(), "{tiered:?}");
    // The kernel's lookups find them through each endpoint's group.
    let decide = |src, dst, port| {
        model::decide(&c, ip(src), ip(dst), PROTO_TCP, port, Direction::Ingress).reason
    };
    assert_eq!(decide("10.0.1.3", "10.0.0.1", 22), Reason::ClusterDenied);
    assert_eq!(decide("10.0.1.3", "10.0.0.2", 22), Reason::ClusterDenied);
    assert_eq!(decide("10.0.0.1", "10.0.1.3", 22), Reason::NotIsolated);
    assert_eq!(
        decide("10.0.1.3", "10.0.0.2", 5432),
        Reason::ClusterAccepted
    );
    assert_eq!(decide("10.0.1.3", "10.0.0.1", 5432), Reason::NotIsolated);
}

#[test]
fn a_cluster_network_policy_replaced_rewrites_its_groups_entries_and_moves_no_endpoint() {
    let mut compiler = Compiler::new();
    let first = compiler.compile(&guarded(22).state);
    let replaced = guarded(2222);
    let second = compiler.compile(&replaced.state);
    assert_eq!(second, compile(&replaced.state, &first.allocations));
    assert_eq!(
        second.endpoints, first.endpoints,
        "no endpoint changes group"
    );
    // Per group, the deny on 22 goes and the one on 2222 comes: four keys, not four per
    // endpoint.
    let changed = second
        .policy
        .changes_since(first.policy.version())
        .expect("changes since the last version");
    let groups = [
        tier_group(&first, "10.0.0.1", TIER_ADMIN),
        tier_group(&first, "10.0.0.2", TIER_ADMIN),
    ];
    let mut seen: Vec<(u32, u16)> = changed
        .iter()
        .map(|key| {
            assert_eq!(key.data.direction, DIR_INGRESS | TIER_ADMIN);
            (key.data.endpoint, u16::from_be_bytes(key.data.port))
        })
        .collect();
    seen.sort_unstable();
    let mut expected: Vec<(u32, u16)> = groups
        .iter()
        .flat_map(|&group| [(group, 22), (group, 2222)])
        .collect();
    expected.sort_unstable();
    assert_eq!(seen, expected);
    let denied = |c: &Compiled, port| {
        model::decide(
            c,
            ip("10.0.1.3"),
            ip("10.0.0.1"),
            PROTO_TCP,
            port,
            Direction::Ingress,
        )
        .reason
    };
    assert_eq!(denied(&second, 2222), Reason::ClusterDenied);
    assert_eq!(denied(&second, 22), Reason::NotIsolated);
}

#[test]
fn a_new_tier_group_takes_no_number_of_a_group_whose_endpoints_went_elsewhere() {
    // "db" goes and "web" (app=web pods) comes: x/b moves to the group x/a and y/c had,
    // x/a and y/c to a new one. While the kernel is brought over, an endpoint still
    // naming an old group must find that group's old entries, not a new group's: the
    // new one takes neither number.
    let mut compiler = Compiler::new();
    let first = compiler.compile(&guarded(22).state);
    let mut moved = guarded(22);
    let policies = &mut moved.state.cluster_policies;
    policies.remove("db");
    policies.insert(
        "web".into(),
        admin_policy(
            "web",
            3,
            json!({"subject": {"pods": {"namespaceSelector": {},
                                        "podSelector": {"matchLabels": {"app": "web"}}}},
                   "ingress": [{"action": "Accept", "from": [{"namespaces": {}}],
                                "protocols": [{"tcp": {"destinationPort": {"number": 80}}}]}]}),
        ),
    );
    let second = compiler.compile(&moved.state);
    assert_eq!(second, compile(&moved.state, &first.allocations));
    let before: Vec<u32> = first
        .allocations
        .tier_groups()
        .values()
        .map(|g| g.number)
        .collect();
    let web = tier_group(&second, "10.0.0.1", TIER_ADMIN);
    assert!(!before.contains(&web), "{web} was in use: {before:?}");
    assert_eq!(web, tier_group(&second, "10.0.1.3", TIER_ADMIN));
    // x/b is selected by "guard" alone now: the group x/a and y/c had, kept.
    assert_eq!(
        tier_group(&second, "10.0.0.2", TIER_ADMIN),
        tier_group(&first, "10.0.0.1", TIER_ADMIN)
    );
    let groups: std::collections::BTreeSet<u32> = second
        .policy
        .keys()
        .filter(|key| key.data.direction & TIER_ADMIN != 0)
        .map(|key| key.data.endpoint)
        .collect();
    assert_eq!(
        groups.len(),
        2,
        "the old groups' entries are gone: {groups:?}"
    );
}

/// An Admin policy of every pod of the namespaces `subject` selects, denying `port`
/// from everywhere.
fn deny_port(
    name: &str,
    priority: u16,
    subject: serde_json::Value,
    port: u16,
) -> serde_json::Value {
    admin_policy(
        name,
        priority,
        json!({"subject": {"namespaces": subject},
               "ingress": [{"action": "Deny", "from": [{"namespaces": {}}],
                            "protocols": [{"tcp": {"destinationPort": {"number": port}}}]}]}),
    )
}

#[test]
fn a_tier_group_whose_endpoints_all_move_to_one_new_key_passes_its_number_on() {
    // "base" joins "guard" on every pod; then "guard" goes: every group's key changes,
    // and every group's endpoints move together, so no endpoint changes group.
    let with_base = || {
        let mut cluster = guarded(22);
        cluster
            .state
            .cluster_policies
            .insert("base".into(), deny_port("base", 0, json!({}), 23));
        cluster
    };
    let mut compiler = Compiler::new();
    let first = compiler.compile(&with_base().state);
    let mut without_guard = with_base();
    without_guard.state.cluster_policies.remove("guard");
    let second = compiler.compile(&without_guard.state);
    assert_eq!(second, compile(&without_guard.state, &first.allocations));
    let groups = |c: &Compiled| -> Vec<u32> {
        c.endpoints
            .values()
            .map(|info| info.tier_group(TIER_ADMIN))
            .collect()
    };
    assert_eq!(groups(&second), groups(&first));
    let keys: Vec<Vec<String>> = second
        .allocations
        .tier_groups()
        .keys()
        .map(|key| key.policies.clone())
        .collect();
    assert_eq!(keys, [vec!["base"], vec!["base", "db"]]);
    // The groups' entries changed in place (the identities moved too: "guard"'s peer
    // left), under the numbers they had.
    let changed = second.policy.changes_since(first.policy.version()).unwrap();
    assert!(!changed.is_empty());
    assert!(
        changed
            .iter()
            .all(|key| key.data.direction & TIER_ADMIN != 0
                && groups(&first).contains(&key.data.endpoint)),
        "{changed:?}"
    );
}

#[test]
fn a_tier_group_that_splits_passes_its_number_to_neither_part() {
    // x/a and y/c are one group ("base", "guard"); then "base" selects only x and
    // "guard" only y: x/a and y/c each take a new group, neither the old one's number.
    let policies = |base: serde_json::Value, guard: serde_json::Value| {
        let mut cluster = basic();
        let all = &mut cluster.state.cluster_policies;
        all.insert("base".into(), deny_port("base", 0, base, 23));
        all.insert("guard".into(), deny_port("guard", 1, guard, 22));
        cluster
    };
    let mut compiler = Compiler::new();
    let first = compiler.compile(&policies(json!({}), json!({})).state);
    let shared = tier_group(&first, "10.0.0.1", TIER_ADMIN);
    assert_eq!(shared, tier_group(&first, "10.0.1.3", TIER_ADMIN));
    let split = policies(
        json!({"matchLabels": {"team": "a"}}),
        json!({"matchLabels": {"team": "b"}}),
    );
    let second = compiler.compile(&split.state);
    assert_eq!(second, compile(&split.state, &first.allocations));
    let (a, c) = (
        tier_group(&second, "10.0.0.1", TIER_ADMIN),
        tier_group(&second, "10.0.1.3", TIER_ADMIN),
    );
    assert_ne!(a, c);
    assert_ne!(a, shared);
    assert_ne!(c, shared);
}

#[test]
fn pods_resolving_a_tiers_ingress_named_port_differently_are_in_different_groups() {
    // "metrics" (every pod) accepts scrapes on the named port "metrics": x/a serves it on
    // 9090, x/b on 9100, y/c not at all, y/d on 9090 like x/a.
    let mut cluster = Cluster::new()
        .ns("x", &[])
        .ns("y", &[])
        .pod("x", "a", &[], &["10.0.0.1"], &[("metrics", 9090, "TCP")])
        .pod("x", "b", &[], &["10.0.0.2"], &[("metrics", 9100, "TCP")])
        .pod("y", "c", &[], &["10.0.1.3"], &[("http", 80, "TCP")])
        .pod("y", "d", &[], &["10.0.1.4"], &[("metrics", 9090, "TCP")]);
    cluster.state.cluster_policies.insert(
        "metrics".into(),
        admin_policy(
            "metrics",
            1,
            json!({"subject": {"namespaces": {}},
                   "ingress": [{"action": "Accept", "from": [{"namespaces": {}}],
                                "protocols": [{"destinationNamedPort": "metrics"}]}]}),
        ),
    );
    let c = run(cluster);
    let group = |address| tier_group(&c, address, TIER_ADMIN);
    let groups = [group("10.0.0.1"), group("10.0.0.2"), group("10.0.1.3")];
    assert!(groups.iter().all(|&g| g != 0));
    assert_ne!(groups[0], groups[1]);
    assert_ne!(groups[0], groups[2]);
    assert_ne!(groups[1], groups[2]);
    assert_eq!(group("10.0.1.4"), groups[0]);
    let scraped = |dst, port| {
        model::decide(
            &c,
            ip("10.0.1.3"),
            ip(dst),
            PROTO_TCP,
            port,
            Direction::Ingress,
        )
        .reason
    };
    assert_eq!(scraped("10.0.0.1", 9090), Reason::ClusterAccepted);
    assert_eq!(scraped("10.0.0.1", 9100), Reason::NotIsolated);
    assert_eq!(scraped("10.0.0.2", 9100), Reason::ClusterAccepted);
    assert_eq!(scraped("10.0.0.2", 9090), Reason::NotIsolated);
    assert_eq!(scraped("10.0.1.4", 9090), Reason::ClusterAccepted);
}

#[test]
fn ports_of_native_sidecars_are_named_ports_and_those_of_other_init_containers_are_not() {
    use crate::testutil::{pod, with_init_container};
    // x/a serves "metrics" from a native sidecar (restartPolicy: Always); its ordinary
    // init container's "setup" port is gone once the pod runs. x/s may send to pods of
    // x on "metrics" and "setup"; x/a admits "metrics" and "setup".
    let a = with_init_container(
        with_init_container(
            pod("x", "a", &[("app", "a")], &["10.0.0.1"], &[]),
            false,
            &[("setup", 81, "TCP")],
        ),
        true,
        &[("metrics", 9090, "TCP")],
    );
    let c = run(Cluster::new()
        .ns("x", &[])
        .raw_pod(a)
        .pod("x", "s", &[("role", "client")], &["10.0.0.4"], &[])
        .policy("x", "in", json!({"podSelector": {"matchLabels": {"app": "a"}},
            "ingress": [{"ports": [{"port": "metrics"}, {"port": "setup"}]}]}))
        .policy("x", "out", json!({"podSelector": {"matchLabels": {"role": "client"}}, "policyTypes": ["Egress"],
            "egress": [{"to": [{"podSelector": {}}], "ports": [{"port": "metrics"}, {"port": "setup"}]}]})));
    let to_a = |src, port, direction| {
        model::lookup(&c, ip(src), ip("10.0.0.1"), PROTO_TCP, port, direction)
    };
    assert_eq!(to_a("10.0.0.4", 9090, Direction::Ingress), Some(0));
    assert_eq!(to_a("10.0.0.4", 9090, Direction::Egress), Some(1));
    for direction in Direction::BOTH {
        assert_eq!(to_a("10.0.0.4", 81, direction), None, "{direction}");
    }
}

#[test]
fn a_containers_port_wins_over_a_sidecars_of_the_same_name() {
    use crate::testutil::{pod, with_init_container};
    let a = with_init_container(
        pod("x", "a", &[], &["10.0.0.1"], &[("http", 8080, "TCP")]),
        true,
        &[("http", 9090, "TCP")],
    );
    let c = run(Cluster::new().ns("x", &[]).raw_pod(a).policy(
        "x",
        "in",
        json!({"ingress": [{"ports": [{"port": "http"}]}]}),
    ));
    let to_a = |port| {
        model::lookup(
            &c,
            ip("10.9.9.9"),
            ip("10.0.0.1"),
            PROTO_TCP,
            port,
            Direction::Ingress,
        )
    };
    assert_eq!(to_a(8080), Some(0));
    assert_eq!(to_a(9090), None);
}

/// Pods "old" and "new" both listing 10.0.0.1 (and "new" also fd00::1), with the
/// given phases and creation times; a policy isolates pods labelled `app: old`.
fn two_pods_one_address(old: (&str, Option<&str>), new: (&str, Option<&str>)) -> Compiled {
    use crate::testutil::{pod, with_phase};
    let c = Cluster::new()
        .ns("x", &[])
        .raw_pod(with_phase(
            pod("x", "old", &[("app", "old")], &["10.0.0.1"], &[]),
            old.0,
            old.1,
        ))
        .raw_pod(with_phase(
            pod("x", "new", &[("app", "new")], &["10.0.0.1", "fd00::1"], &[]),
            new.0,
            new.1,
        ))
        .policy(
            "x",
            "p",
            json!({"podSelector": {"matchLabels": {"app": "old"}}}),
        );
    compile(&c.state, &Allocations::default())
}

fn diagnostics(c: &Compiled) -> Vec<String> {
    c.diagnostics.iter().map(ToString::to_string).collect()
}

#[test]
fn of_two_pods_with_one_address_the_running_one_holds_it() {
    // "new" sorts first by name and was created last, yet "old" is the one running.
    let c = two_pods_one_address(
        ("Running", Some("2025-01-01T00:00:00Z")),
        ("Pending", Some("2025-01-02T00:00:00Z")),
    );
    assert_eq!(c.endpoints[&addr(ip("10.0.0.1"))].id, ep(&c, "x", "old"));
    assert_eq!(
        c.endpoints[&addr(ip("10.0.0.1"))].flags,
        ENDPOINT_INGRESS_ISOLATED
    );
    assert_eq!(c.endpoints[&addr(ip("fd00::1"))].id, ep(&c, "x", "new"));
    assert_eq!(
        diagnostics(&c),
        [
            "Pod x/new: status.podIPs: address 10.0.0.1 is also used by Pod x/old, which holds it (it is running); ignored here"
        ]
    );
}

#[test]
fn of_two_running_pods_with_one_address_the_one_created_last_holds_it() {
    let c = two_pods_one_address(
        ("Running", Some("2025-01-01T00:00:00Z")),
        ("Running", Some("2025-01-02T00:00:00Z")),
    );
    assert_eq!(c.endpoints[&addr(ip("10.0.0.1"))].id, ep(&c, "x", "new"));
    assert_eq!(
        c.endpoints[&addr(ip("10.0.0.1"))].flags,
        0,
        "x/new is not isolated"
    );
    assert_eq!(c.allocations.endpoint_id(&ObjectRef::new("x", "old")), None);
    assert_eq!(
        diagnostics(&c),
        [
            "Pod x/old: status.podIPs: address 10.0.0.1 is also used by Pod x/new, which holds it (it was created later); ignored here"
        ]
    );
    // An object without a creation time is the older one.
    let c = two_pods_one_address(("Running", Some("2025-01-01T00:00:00Z")), ("Running", None));
    assert_eq!(c.endpoints[&addr(ip("10.0.0.1"))].id, ep(&c, "x", "old"));
}

#[test]
fn of_two_pods_alike_with_one_address_the_first_by_name_holds_it() {
    let at = Some("2025-01-01T00:00:00Z");
    let c = two_pods_one_address(("Running", at), ("Running", at));
    assert_eq!(c.endpoints[&addr(ip("10.0.0.1"))].id, ep(&c, "x", "new"));
    assert_eq!(
        diagnostics(&c),
        [
            "Pod x/old: status.podIPs: address 10.0.0.1 is also used by Pod x/new, which holds it (it comes first in name order); ignored here"
        ]
    );
}

#[test]
fn a_finished_pod_holds_no_address() {
    // "old" finished (its object still lists 10.0.0.1, and it was even created after
    // "new"): "new" holds the address, though it is not running yet.
    for phase in ["Succeeded", "Failed"] {
        let c = two_pods_one_address(
            (phase, Some("2025-01-03T00:00:00Z")),
            ("Pending", Some("2025-01-02T00:00:00Z")),
        );
        assert_eq!(c.endpoints[&addr(ip("10.0.0.1"))].id, ep(&c, "x", "new"));
        assert_eq!(c.endpoints[&addr(ip("10.0.0.1"))].flags, 0);
        assert!(c.diagnostics.is_empty(), "{:?}", c.diagnostics);
    }
}

#[test]
fn a_pod_that_holds_its_address_again_is_matched_by_the_peers_that_came_meanwhile() {
    use crate::state::Changes;
    use crate::testutil::{pod, with_phase};
    // x/a runs, finishes, and (in a state a source may well hand over) runs again; while
    // it holds no address a policy comes whose peer selects it. The compile that sees it
    // run again must match it against that peer, as a compile from scratch does.
    let cluster = |phase: &str| {
        Cluster::new()
            .ns("x", &[])
            .raw_pod(with_phase(
                pod("x", "a", &[("app", "web")], &["10.0.0.1"], &[]),
                phase,
                None,
            ))
            .pod("x", "d", &[("app", "db")], &["10.0.0.3"], &[])
    };
    let told = |pods: &[&str], policies: &[&str]| Changes {
        pods: Some(pods.iter().map(|&p| ObjectRef::new("x", p)).collect()),
        policies: Some(policies.iter().map(|&p| ObjectRef::new("x", p)).collect()),
        ..Changes::NONE
    };
    let mut compiler = Compiler::new();
    compiler.compile(&cluster("Running").state);
    compiler.compile_changed(&cluster("Succeeded").state, &told(&["a"], &[]));
    let allow_web = |c: Cluster| {
        c.policy(
            "x",
            "p",
            json!({"podSelector": {"matchLabels": {"app": "db"}},
                "ingress": [{"from": [{"podSelector": {"matchLabels": {"app": "web"}}}]}]}),
        )
    };
    let added =
        compiler.compile_changed(&allow_web(cluster("Succeeded")).state, &told(&[], &["p"]));
    let again = allow_web(cluster("Running")).state;
    let running = compiler.compile_changed(&again, &told(&["a"], &[]));
    assert_eq!(running, compile(&again, &added.allocations));
    assert_ne!(
        identity(&running, "10.0.0.1"),
        identity(&running, "10.0.0.3")
    );
}

#[test]
fn node_ips_are_host_peers_with_ip_block_identity() {
    let c = run(basic().node_ips(&["10.0.0.254", "192.168.7.1"]).policy(
        "x",
        "p",
        json!({"ingress": [{"from": [{"ipBlock": {"cidr": "192.168.0.0/16"}}]}]}),
    ));
    assert_eq!(
        peer(&c, "10.0.0.254"),
        PeerInfo {
            identity: IDENTITY_WORLD,
            flags: PEER_HOST
        }
    );
    let block = prefix(&c, "192.168.0.0/16").identity;
    assert_eq!(
        peer(&c, "192.168.7.1"),
        PeerInfo {
            identity: block,
            flags: PEER_HOST
        }
    );
    let d = model::decide(
        &c,
        ip("10.0.0.254"),
        ip("10.0.0.1"),
        PROTO_TCP,
        80,
        Direction::Ingress,
    );
    assert_eq!(d.reason, netpol_common::Reason::FromHost);
    // Egress to the node is judged by policy like any address (x has no egress policy).
    assert!(
        model::lookup(
            &c,
            ip("10.0.0.1"),
            ip("10.0.0.254"),
            PROTO_TCP,
            80,
            Direction::Egress
        )
        .is_some()
    );
}

#[test]
fn same_key_keeps_the_lowest_rule() {
    let c = run(basic()
        .policy(
            "x",
            "a-first",
            json!({"podSelector": {"matchLabels": {"app": "db"}},
            "ingress": [{"ports": [{"port": 80}]}, {"ports": [{"port": 80}, {"port": 81}]}]}),
        )
        .policy(
            "x",
            "b-second",
            json!({"podSelector": {}, "ingress": [{"ports": [{"port": 81}]}]}),
        ));
    let full = POLICY_PREFIX_FULL;
    let mut expected = vec![
        (1, IDENTITY_ANY, DIR_INGRESS, PROTO_TCP, 81, full, 2),
        (2, IDENTITY_ANY, DIR_INGRESS, PROTO_TCP, 80, full, 0),
        (2, IDENTITY_ANY, DIR_INGRESS, PROTO_TCP, 81, full, 1),
    ];
    expected.sort();
    assert_eq!(entries(&c), expected);
    assert_eq!(c.rules[&2].policy, ObjectRef::new("x", "b-second"));
}

#[test]
fn local_pods_and_remote_peers() {
    let mut remote = crate::testutil::pod("x", "remote", &[("app", "web")], &["10.0.5.5"], &[]);
    remote.spec.as_mut().unwrap().node_name = Some("other".into());
    let mut a = crate::testutil::pod("x", "a", &[("app", "web")], &["10.0.0.1"], &[]);
    a.spec.as_mut().unwrap().node_name = Some("me".into());
    let mut b = crate::testutil::pod("x", "b", &[("app", "db")], &["10.0.0.2"], &[]);
    b.spec.as_mut().unwrap().node_name = Some("me".into());
    let mut cluster = Cluster::new()
        .node_name("me")
        .ns("x", &[])
        .raw_pod(remote)
        .raw_pod(a)
        .raw_pod(b)
        .policy("x", "p", json!({"podSelector": {"matchLabels": {"app": "db"}},
            "ingress": [{"from": [{"podSelector": {"matchLabels": {"app": "web"}}}]}], "egress": [{}]}));
    // The interface local mode's operator named for x/a.
    cluster
        .state
        .pod_interfaces
        .insert(ObjectRef::new("x", "a"), "veth-a".into());
    let c = run(cluster);
    assert_eq!(c.endpoints.len(), 2);
    assert!(!c.endpoints.contains_key(&addr(ip("10.0.5.5"))));
    assert_eq!(identity(&c, "10.0.5.5"), D, "remote pods are peers");
    assert_eq!(identity(&c, "10.0.0.1"), D);
    assert_eq!(
        c.local_pods,
        [
            LocalPod {
                pod: ObjectRef::new("x", "a"),
                endpoint_id: 1,
                ips: vec![ip("10.0.0.1")],
                host_interface: Some("veth-a".into()),
                ingress_policies: vec![],
                egress_policies: vec![],
            },
            LocalPod {
                pod: ObjectRef::new("x", "b"),
                endpoint_id: 2,
                ips: vec![ip("10.0.0.2")],
                host_interface: None,
                ingress_policies: vec![ObjectRef::new("x", "p")],
                egress_policies: vec![ObjectRef::new("x", "p")],
            },
        ]
    );
}

#[test]
fn a_pods_own_annotation_names_no_interface() {
    // Whatever a pod object says, the interface the datapath gets for it comes only from
    // the operator's `pod_interfaces` (local mode's source), never from the object:
    // Kubernetes mode leaves that map empty.
    let mut hostile = crate::testutil::pod("x", "a", &[], &["10.0.0.1"], &[]);
    hostile.metadata.annotations = Some(
        [(
            crate::state::HOST_INTERFACE_ANNOTATION.to_string(),
            "eth0".to_string(),
        )]
        .into(),
    );
    let c = run(Cluster::new().ns("x", &[]).raw_pod(hostile));
    assert_eq!(c.local_pods.len(), 1);
    assert_eq!(c.local_pods[0].host_interface, None);
}

#[test]
fn policies_selecting_no_local_pod_add_no_peers() {
    // The only policy selects nothing local: no identities, no prefixes.
    let c = run(basic().policy(
        "x",
        "p",
        json!({"podSelector": {"matchLabels": {"app": "none"}},
        "ingress": [{"from": [{"ipBlock": {"cidr": "10.0.0.0/8"}}, {"podSelector": {}}]}]}),
    ));
    assert!(c.ipcache.values().all(|p| p.identity == IDENTITY_WORLD));
    assert_eq!(c.ipcache.len(), 3);
    assert_eq!(
        c.rules.len(),
        1,
        "the rule table still lists every valid rule"
    );
}

#[test]
fn entries_scale_with_identities_not_pods() {
    // 60 client pods all match the same peer: one identity, one entry per endpoint.
    let mut cluster = basic();
    for i in 0..60 {
        cluster = cluster.pod(
            "y",
            &format!("client{i}"),
            &[("role", "client")],
            &[&format!("10.1.0.{i}")],
            &[],
        );
    }
    let c = run(cluster.policy("x", "p", json!({"podSelector": {},
        "ingress": [{"from": [{"namespaceSelector": {}, "podSelector": {"matchLabels": {"role": "client"}}}],
                     "ports": [{"port": 80}, {"port": 443}]}]})));
    assert_eq!(c.ipcache.len(), 63);
    assert!((0..60).all(|i| identity(&c, &format!("10.1.0.{i}")) == D));
    let full = POLICY_PREFIX_FULL;
    let mut expected = vec![];
    for endpoint in [1, 2] {
        for port in [80, 443] {
            expected.push((endpoint, D, DIR_INGRESS, PROTO_TCP, port, full, 0));
        }
    }
    assert_eq!(entries(&c), expected);
}

#[test]
fn duplicate_pod_ip_is_reported_and_first_owner_wins() {
    let c = compile(
        &basic().pod("x", "z", &[], &["10.0.0.1"], &[]).state,
        &Allocations::default(),
    );
    assert_eq!(c.diagnostics.len(), 1);
    assert_eq!(
        c.diagnostics[0].subject,
        Subject::pod(&ObjectRef::new("x", "z"))
    );
    assert_eq!(c.endpoints[&addr(ip("10.0.0.1"))].id, ep(&c, "x", "a"));
    assert_eq!(c.allocations.endpoint_id(&ObjectRef::new("x", "z")), None);
}

#[test]
fn invalid_pod_ip_is_reported() {
    let mut p = crate::testutil::pod("x", "a", &[], &["10.0.0.1"], &[]);
    p.status
        .as_mut()
        .unwrap()
        .pod_ips
        .as_mut()
        .unwrap()
        .push(k8s_openapi::api::core::v1::PodIP {
            ip: "not-an-ip".into(),
        });
    let c = compile(&Cluster::new().raw_pod(p).state, &Allocations::default());
    assert_eq!(
        c.diagnostics
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>(),
        ["Pod x/a: status.podIPs[1].ip: invalid IP address \"not-an-ip\""]
    );
    assert_eq!(c.endpoints.len(), 1);
}

#[test]
fn an_unreadable_pod_address_written_otherwise_is_reported_as_written_now() {
    use crate::state::Changes;
    let with = |bad: &str| {
        let mut p = crate::testutil::pod("x", "a", &[], &["10.0.0.1"], &[]);
        let ips = p.status.as_mut().unwrap().pod_ips.as_mut().unwrap();
        ips.push(k8s_openapi::api::core::v1::PodIP { ip: bad.into() });
        Cluster::new().raw_pod(p).state
    };
    let reported =
        |c: &Compiled| -> Vec<String> { c.diagnostics.iter().map(ToString::to_string).collect() };
    let told = Changes {
        pods: Some([ObjectRef::new("x", "a")].into()),
        ..Changes::NONE
    };
    let mut compiler = Compiler::new();
    let first = compiler.compile(&with("not-an-ip"));
    assert_eq!(
        reported(&first),
        ["Pod x/a: status.podIPs[1].ip: invalid IP address \"not-an-ip\""]
    );
    // The pod's entry is kept only when what it read is the same: the text too.
    let second = compiler.compile_changed(&with("10.0.0.999"), &told);
    assert_eq!(
        reported(&second),
        ["Pod x/a: status.podIPs[1].ip: invalid IP address \"10.0.0.999\""]
    );
    assert_eq!(second, compile(&with("10.0.0.999"), &first.allocations));
    let fixed = Cluster::new().pod("x", "a", &[], &["10.0.0.1"], &[]).state;
    assert!(
        compiler
            .compile_changed(&fixed, &told)
            .diagnostics
            .is_empty()
    );
}

#[test]
fn allocations_are_stable_across_compiles() {
    let cluster = basic().policy(
        "x",
        "p",
        json!({"podSelector": {"matchLabels": {"app": "db"}},
        "ingress": [{"from": [{"podSelector": {"matchLabels": {"app": "web"}}}]}]}),
    );
    let first = run(cluster);
    // A pod sorting before everyone, matching the peer, and a new policy peer.
    let second = compile(
        &basic()
            .pod("a", "first", &[], &["10.0.3.1"], &[])
            .pod("x", "0", &[("app", "web")], &["10.0.0.100"], &[])
            .policy(
                "x",
                "p",
                json!({"podSelector": {"matchLabels": {"app": "db"}},
                "ingress": [{"from": [{"podSelector": {"matchLabels": {"app": "web"}}}]}]}),
            )
            .state,
        &first.allocations,
    );
    for (name, id) in [("x/a", 1), ("x/b", 2), ("y/c", 3)] {
        let (ns, n) = name.split_once('/').unwrap();
        assert_eq!(ep(&second, ns, n), id, "{name}");
    }
    assert_eq!(ep(&second, "a", "first"), 4);
    assert_eq!(ep(&second, "x", "0"), 5);
    assert_eq!(identity(&second, "10.0.0.1"), identity(&first, "10.0.0.1"));
    assert_eq!(
        identity(&second, "10.0.0.100"),
        identity(&first, "10.0.0.1")
    );
    // Deleting x/a frees id 1; the next new pod takes it.
    let mut state = basic().state;
    state.pods.remove(&ObjectRef::new("x", "a"));
    let third = compile(&state, &second.allocations);
    let fourth = compile(
        &basic().pod("z", "new", &[], &["10.0.9.9"], &[]).state,
        &third.allocations,
    );
    assert_eq!(ep(&fourth, "x", "a"), 1);
    assert_eq!(ep(&fourth, "z", "new"), 4);
}

#[test]
fn rule_ids_survive_a_policy_added_before_them() {
    // x/m (two ingress rules) selects x/b; then x/a, which sorts before x/m, is added
    // with an ingress and an egress rule selecting x/a.
    let m = json!({"podSelector": {"matchLabels": {"app": "db"}},
        "ingress": [{"ports": [{"port": 80}]}, {"ports": [{"port": 81}]}]});
    let first = run(basic().policy("x", "m", m.clone()));
    let rule = |policy: &str, direction, index| {
        RuleRef::network_policy(ObjectRef::new("x", policy), direction, index)
    };
    assert_eq!(
        first.rules,
        BTreeMap::from([
            (0, rule("m", Direction::Ingress, 0)),
            (1, rule("m", Direction::Ingress, 1))
        ])
    );
    let added = basic().policy("x", "m", m.clone()).policy(
        "x",
        "a",
        json!({"podSelector": {"matchLabels": {"app": "web"}},
            "ingress": [{"ports": [{"port": 90}]}], "egress": [{"ports": [{"port": 53, "protocol": "UDP"}]}]}),
    );
    let second = compile(&added.state, &first.allocations);
    assert_eq!(
        second.rules,
        BTreeMap::from([
            (0, rule("m", Direction::Ingress, 0)),
            (1, rule("m", Direction::Ingress, 1)),
            (2, rule("a", Direction::Ingress, 0)),
            (3, rule("a", Direction::Egress, 0)),
        ])
    );
    // Every entry of x/m is untouched; the only new entries are x/a's (endpoint 1).
    let full = POLICY_PREFIX_FULL;
    assert_eq!(
        entries(&first),
        [
            (2, IDENTITY_ANY, DIR_INGRESS, PROTO_TCP, 80, full, 0),
            (2, IDENTITY_ANY, DIR_INGRESS, PROTO_TCP, 81, full, 1),
        ]
    );
    let mut expected = entries(&first);
    expected.extend([
        (1, IDENTITY_ANY, DIR_INGRESS, PROTO_TCP, 90, full, 2),
        (1, IDENTITY_ANY, DIR_EGRESS, PROTO_UDP, 53, full, 3),
    ]);
    expected.sort();
    assert_eq!(entries(&second), expected);

    // x/m goes away: its ids are freed, x/a keeps 2 and 3, and the next new rule takes
    // the lowest free id, 0.
    let mut state = added.state.clone();
    state.policies.remove(&ObjectRef::new("x", "m"));
    let third = compile(&state, &second.allocations);
    assert_eq!(
        third.rules.keys().copied().collect::<Vec<_>>(),
        [2, 3],
        "{:?}",
        third.rules
    );
    state.policies.insert(
        ObjectRef::new("x", "z"),
        crate::testutil::policy("x", "z", json!({"ingress": [{}]})).into(),
    );
    let fourth = compile(&state, &third.allocations);
    assert_eq!(fourth.rules[&0], rule("z", Direction::Ingress, 0));
    assert_eq!(
        fourth.allocations.rule_id(&rule("a", Direction::Egress, 0)),
        Some(3)
    );
}

#[test]
fn an_unchanged_rule_table_is_shared_between_compiles_and_a_changed_one_is_not() {
    let mut c = basic().policy(
        "x",
        "m",
        json!({"podSelector": {}, "ingress": [{"ports": [{"port": 80}]}]}),
    );
    let first = compile(&c.state, &Allocations::default());
    // A pod's label changes: the rules do not.
    let web = ObjectRef::new("x", "a");
    c.state
        .pods
        .get_mut(&web)
        .unwrap()
        .set_label("tier", Some("front"));
    let second = compile(&c.state, &first.allocations);
    assert!(first.rules.same(&second.rules));
    // A policy is added: a new table, with the new rule and the old ids.
    c = c.policy("x", "n", json!({"podSelector": {}, "egress": [{}]}));
    let third = compile(&c.state, &second.allocations);
    assert!(!second.rules.same(&third.rules));
    assert_eq!(third.rules.len(), 2);
    assert_eq!(third.rules[&0], second.rules[&0]);
    assert_eq!(
        third
            .allocations
            .rules()
            .iter()
            .map(|(r, &id)| (id, r))
            .collect::<Vec<_>>(),
        third
            .rules
            .iter()
            .map(|(&id, r)| (id, r))
            .collect::<Vec<_>>(),
        "the table by id is the allocation's, inverted"
    );
}

/// Entries that differ between two maps: (key, before, after).
fn changes<K: Ord + Copy, V: PartialEq + Copy>(
    before: &BTreeMap<K, V>,
    after: &BTreeMap<K, V>,
) -> Vec<(K, Option<V>, Option<V>)> {
    let keys: std::collections::BTreeSet<K> = before.keys().chain(after.keys()).copied().collect();
    keys.into_iter()
        .filter(|k| before.get(k) != after.get(k))
        .map(|k| (k, before.get(&k).copied(), after.get(&k).copied()))
        .collect()
}

#[test]
fn label_flips_and_new_peers_write_only_the_entries_they_imply() {
    // x/b allows ingress from app=web and app=api pods of x. Identities in signature
    // order: {app=api} (x/e) is D, {app=web} (x/a, x/c) is D + 1; x/b and x/d are world.
    let p = json!({"podSelector": {"matchLabels": {"app": "db"}},
        "ingress": [{"from": [{"podSelector": {"matchLabels": {"app": "web"}}},
                              {"podSelector": {"matchLabels": {"app": "api"}}}]}]});
    let cluster = |d: &str, a: &str| {
        Cluster::new()
            .ns("x", &[])
            .pod("x", "a", &[("app", a)], &["10.0.0.1"], &[])
            .pod("x", "b", &[("app", "db")], &["10.0.0.2"], &[])
            .pod("x", "c", &[("app", "web")], &["10.0.0.3"], &[])
            .pod("x", "d", &[("app", d)], &["10.0.0.4"], &[])
            .pod("x", "e", &[("app", "api")], &["10.0.0.5"], &[])
            .policy("x", "p", p.clone())
    };
    let at = |c: &Compiled, a: &str| PeerInfo {
        identity: identity(c, a),
        flags: 0,
    };
    let pi = |identity| PeerInfo { identity, flags: 0 };
    let world = pi(IDENTITY_WORLD);
    let first = run(cluster("other", "web"));
    assert_eq!(
        [
            at(&first, "10.0.0.5"),
            at(&first, "10.0.0.1"),
            at(&first, "10.0.0.3")
        ],
        [pi(D), pi(D + 1), pi(D + 1)]
    );
    let any = POLICY_PREFIX_ANY_PROTO;
    assert_eq!(
        entries(&first),
        [
            (2, D, DIR_INGRESS, 0, 0, any, 0),
            (2, D + 1, DIR_INGRESS, 0, 0, any, 0)
        ]
    );

    // x/d becomes app=web: it joins D + 1; nothing else changes.
    let second = compile(&cluster("web", "web").state, &first.allocations);
    assert_eq!(
        changes(&first.ipcache, &second.ipcache),
        [(host_key(ip("10.0.0.4")), Some(world), Some(pi(D + 1)))]
    );
    assert_eq!(second.policy, first.policy);
    assert_eq!(second.endpoints, first.endpoints);

    // x/a becomes app=api: it moves from D + 1 (which x/c and x/d keep) to D.
    let third_cluster = cluster("web", "api");
    let third = compile(&third_cluster.state, &second.allocations);
    assert_eq!(
        changes(&second.ipcache, &third.ipcache),
        [(host_key(ip("10.0.0.1")), Some(pi(D + 1)), Some(pi(D)))]
    );
    assert_eq!(third.policy, first.policy);

    // A policy selecting x/c and x/d brings `namespaceSelector: {}` into force, which
    // matches every pod: every signature changes, but the classes {a, e} and {c, d}
    // keep their numbers; only x/b, no longer world, takes a new one (D + 2). POLICY
    // gains the new rule's entries (id 1) for x/c (3) and x/d (4), nothing else.
    let fourth = compile(
        &third_cluster
            .policy(
                "x",
                "q",
                json!({"podSelector": {"matchLabels": {"app": "web"}},
                    "ingress": [{"from": [{"namespaceSelector": {}}]}]}),
            )
            .state,
        &third.allocations,
    );
    assert_eq!(
        changes(&third.ipcache, &fourth.ipcache),
        [(host_key(ip("10.0.0.2")), Some(world), Some(pi(D + 2)))]
    );
    let policy_changes: Vec<(Entry, bool, bool)> = changes(&third.policy, &fourth.policy)
        .into_iter()
        .map(|(k, before, after)| {
            let v = after.or(before).unwrap();
            let d = k.data;
            let entry = (
                d.endpoint,
                d.identity,
                d.direction,
                d.protocol,
                0,
                k.prefix_len,
                v.rule,
            );
            (entry, before.is_some(), after.is_some())
        })
        .collect();
    let mut expected = vec![];
    for endpoint in [3, 4] {
        for identity in [D, D + 1, D + 2] {
            expected.push(((endpoint, identity, DIR_INGRESS, 0, 0, any, 1), false, true));
        }
    }
    assert_eq!(policy_changes, expected);
    // Isolated, with entries for every protocol.
    let isolated = EndpointInfo {
        id: 0,
        flags: ENDPOINT_INGRESS_ISOLATED | netpol_common::ENDPOINT_INGRESS_ANY_PROTOCOL,
        tier_groups: [0, 0],
    };
    assert_eq!(
        changes(&third.endpoints, &fourth.endpoints)
            .into_iter()
            .map(|(k, _, after)| (k, after.map(|e| e.flags)))
            .collect::<Vec<_>>(),
        [
            (addr(ip("10.0.0.3")), Some(isolated.flags)),
            (addr(ip("10.0.0.4")), Some(isolated.flags))
        ]
    );
}

#[test]
fn audit_mode_per_namespace_annotation_and_for_the_whole_agent() {
    use netpol_common::ENDPOINT_AUDIT;
    let cluster = || {
        let mut c = Cluster::new()
            .ns("x", &[])
            .ns("y", &[])
            .pod("x", "a", &[], &["10.0.0.1"], &[])
            .pod("y", "b", &[], &["10.0.0.2"], &[])
            .policy("x", "deny", json!({"podSelector": {}}));
        let mut x = crate::testutil::namespace("x", &[]);
        let annotations = [(crate::state::AUDIT_ANNOTATION.to_owned(), "true".to_owned())];
        x.metadata.annotations = Some(annotations.into());
        c.state.namespaces.insert("x".into(), x.into());
        c
    };
    let c = run(cluster());
    let a = c.endpoints[&addr(ip("10.0.0.1"))];
    let b = c.endpoints[&addr(ip("10.0.0.2"))];
    assert_eq!(
        a.flags,
        ENDPOINT_INGRESS_ISOLATED | ENDPOINT_AUDIT,
        "x is annotated"
    );
    assert_eq!(b.flags, 0, "y is not");
    // The denied flow is let through in audit, and the model says so.
    let decision = model::decide(
        &c,
        ip("10.0.0.2"),
        ip("10.0.0.1"),
        PROTO_TCP,
        80,
        Direction::Ingress,
    );
    assert_eq!(decision.reason, netpol_common::Reason::AuditAllowed);

    let mut all = cluster();
    all.state.audit_all = true;
    let c = run(all);
    assert_eq!(
        c.endpoints[&addr(ip("10.0.0.2"))].flags,
        ENDPOINT_AUDIT,
        "--audit covers every pod"
    );
}

#[test]
fn a_staged_policy_is_validated_but_enforced_only_in_the_staged_view() {
    let cluster = || {
        let c = Cluster::new()
            .ns("x", &[])
            .pod("x", "a", &[("app", "a")], &["10.0.0.1"], &[])
            .pod("x", "b", &[("app", "b")], &["10.0.0.2"], &[])
            .policy(
                "x",
                "deny",
                json!({"podSelector": {"matchLabels": {"app": "a"}}}),
            )
            .policy(
                "x",
                "bad",
                json!({"podSelector": {}, "ingress": [{"ports": [{"port": 0}]}]}),
            );
        c.staged("x", "deny", "true").staged("x", "bad", "true")
    };
    let full = |c: Cluster| compile(&c.state, &Allocations::default());
    let decide = |c: &Compiled| {
        model::decide(
            c,
            ip("10.0.0.2"),
            ip("10.0.0.1"),
            PROTO_TCP,
            80,
            Direction::Ingress,
        )
    };

    let enforced = full(cluster());
    assert_eq!(enforced.endpoints[&addr(ip("10.0.0.1"))].flags, 0);
    assert_eq!(decide(&enforced).reason, netpol_common::Reason::NotIsolated);
    assert!(enforced.policies.is_empty(), "{:?}", enforced.policies);
    assert!(
        enforced
            .diagnostics
            .iter()
            .any(|d| d.to_string().contains("x/bad")),
        "a staged policy is validated like any other: {:?}",
        enforced.diagnostics
    );
    assert!(crate::reference::flow_allowed(
        &cluster().state,
        ip("10.0.0.2"),
        ip("10.0.0.1"),
        PROTO_TCP,
        80
    ));

    let staged_cluster = || {
        let mut c = cluster();
        c.state.enforce_staged = true;
        c
    };
    let staged_view = full(staged_cluster());
    assert_eq!(
        staged_view.endpoints[&addr(ip("10.0.0.1"))].flags,
        ENDPOINT_INGRESS_ISOLATED
    );
    assert_eq!(
        decide(&staged_view).reason,
        netpol_common::Reason::PolicyDenied
    );
    assert!(!crate::reference::flow_allowed(
        &staged_cluster().state,
        ip("10.0.0.2"),
        ip("10.0.0.1"),
        PROTO_TCP,
        80
    ));

    // Any other value of the annotation enforces the policy.
    let other = cluster().staged("x", "deny", "yes");
    assert_eq!(
        decide(&full(other)).reason,
        netpol_common::Reason::PolicyDenied
    );
}

mod services {
    use netpol_common::{PEER_SERVICE, ServicePort};

    use super::*;

    fn with_services() -> Cluster {
        basic()
            .node_ips(&["10.99.0.1"])
            .policy(
                "x",
                "to-outside",
                json!({"podSelector": {}, "policyTypes": ["Egress"],
                    "egress": [{"to": [{"ipBlock": {"cidr": "10.96.0.0/12", "except": ["10.96.0.128/25"]}}]}]}),
            )
            .service(
                "x",
                "db",
                json!({"clusterIPs": ["10.96.0.10", "fd00:96::10"], "externalIPs": ["10.99.0.1", "192.0.2.7"],
                    "type": "LoadBalancer",
                    "ports": [{"port": 5432, "targetPort": 5432, "nodePort": 30432},
                              {"name": "dns", "port": 53, "protocol": "UDP", "nodePort": 30053}]}),
                json!({"loadBalancer": {"ingress": [{"ip": "198.51.100.9"}]}}),
            )
            .service("x", "headless", json!({"clusterIP": "None", "ports": [{"port": 80}]}), json!({}))
    }

    #[test]
    fn every_frontend_address_of_a_service_is_flagged_in_both_families() {
        let c = run(with_services());
        for address in ["10.96.0.10", "fd00:96::10", "192.0.2.7", "198.51.100.9"] {
            assert_eq!(peer(&c, address).flags, PEER_SERVICE, "{address}");
        }
        // A ClusterIP keeps the identity of what contains it: the ipBlock does.
        let in_block = identity(&c, "10.96.0.10");
        assert_ne!(in_block, IDENTITY_WORLD);
        assert_eq!(prefix(&c, "10.96.0.0/12").identity, in_block);
        assert_eq!(identity(&c, "192.0.2.7"), IDENTITY_WORLD);
    }

    #[test]
    fn a_node_address_named_by_a_service_stays_the_nodes_and_gives_node_ports() {
        let c = run(with_services());
        assert_eq!(peer(&c, "10.99.0.1").flags, PEER_HOST);
        let port = |port, protocol| ServicePort {
            port,
            protocol,
            _pad: 0,
        };
        let expected = [
            port(53, PROTO_UDP),
            port(5432, PROTO_TCP),
            port(30053, PROTO_UDP),
            port(30432, PROTO_TCP),
        ];
        assert_eq!(c.node_ports.iter().copied().collect::<Vec<_>>(), expected);
    }

    #[test]
    fn a_service_range_flags_every_key_inside_it_and_nothing_outside() {
        let c = run(with_services().service_cidr("kubernetes", &["10.96.0.0/16"]));
        assert_eq!(prefix(&c, "10.96.0.0/16").flags, PEER_SERVICE);
        // The ipBlock's except lies inside the range: the longest match must keep it.
        assert_eq!(prefix(&c, "10.96.0.128/25").flags, PEER_SERVICE);
        // The ipBlock itself is wider than the range.
        assert_eq!(prefix(&c, "10.96.0.0/12").flags, 0);
        assert_eq!(peer(&c, "10.0.0.1").flags, 0, "pods are not Services");
    }

    #[test]
    fn the_agents_service_cidrs_count_like_servicecidr_objects() {
        let mut cluster = basic();
        cluster.state.configured_service_cidrs = vec!["10.96.0.0/16".parse().unwrap()];
        let c = run(cluster);
        assert_eq!(prefix(&c, "10.96.0.0/16").flags, PEER_SERVICE);
    }

    #[test]
    fn an_address_that_does_not_parse_is_reported_and_nothing_else_is_lost() {
        let cluster = with_services()
            .service(
                "x",
                "bad",
                json!({"clusterIPs": ["10.96.0.20", "not-an-ip"], "externalIPs": ["192.0.2.8", "300.1.1.1"]}),
                json!({}),
            )
            .service_cidr("broken", &["10.97.0.0/33"]);
        let c = compile(&cluster.state, &Allocations::default());
        let messages: Vec<String> = c.diagnostics.iter().map(ToString::to_string).collect();
        assert_eq!(
            messages,
            [
                "Service x/bad: spec.clusterIPs[1]: \"not-an-ip\" is not an IP address",
                "Service x/bad: spec.externalIPs[1]: \"300.1.1.1\" is not an IP address",
                "ServiceCIDR broken: spec.cidrs[0]: \"10.97.0.0/33\" is not a CIDR",
            ]
        );
        assert_eq!(peer(&c, "10.96.0.20").flags, PEER_SERVICE);
        assert_eq!(peer(&c, "192.0.2.8").flags, PEER_SERVICE);
        assert_eq!(peer(&c, "10.96.0.10").flags, PEER_SERVICE);
    }
}

/// What the API server accepted never fails open: policies read in part, and CIDRs read
/// as the API server reads them.
mod unreadable {
    use super::*;
    use crate::state::UnreadablePart;

    fn compiled(c: Cluster) -> Compiled {
        compile(&c.state, &Allocations::default())
    }

    fn messages(c: &Compiled) -> Vec<String> {
        c.diagnostics.iter().map(ToString::to_string).collect()
    }

    /// Whether a new TCP flow `src -> dst` on `port` passes the hook of `direction`.
    fn passes(c: &Compiled, src: &str, dst: &str, port: u16, direction: Direction) -> bool {
        !model::decide(c, ip(src), ip(dst), PROTO_TCP, port, direction)
            .reason
            .is_drop()
    }

    #[test]
    fn a_policy_read_in_part_isolates_whom_it_selects_and_names_the_field() {
        // "bad" selects every pod of x; its only rule's only port cannot be read, so the
        // rule allows nothing, and the pods are isolated all the same.
        let c = compiled(
            basic()
                .policy(
                    "x",
                    "bad",
                    json!({"ingress": [{"ports": [{"port": 80, "endPort": 79}]}]}),
                )
                .policy(
                    "x",
                    "good",
                    json!({"podSelector": {"matchLabels": {"app": "db"}}}),
                ),
        );
        assert_eq!(
            messages(&c),
            [
                "NetworkPolicy x/bad: spec.ingress[0].ports[0].endPort: 79 must be greater than or equal to port 80",
                "NetworkPolicy x/bad: spec.ingress[0].ports[0]: cannot be read: this port is left out of the rule",
                "NetworkPolicy x/bad: spec.ingress[0]: none of its ports can be read: the rule is left out (it allows nothing)",
            ]
        );
        for pod in ["10.0.0.1", "10.0.0.2"] {
            assert_eq!(
                c.endpoints[&addr(ip(pod))].flags,
                ENDPOINT_INGRESS_ISOLATED,
                "{pod}"
            );
            assert!(
                !passes(&c, "10.0.1.3", pod, 80, Direction::Ingress),
                "{pod}"
            );
        }
        assert!(
            c.rules.is_empty(),
            "no rule of either policy allows anything"
        );
        assert_eq!(c.policies.len(), 2);
    }

    #[test]
    fn a_peer_or_port_that_cannot_be_read_is_left_out_and_the_rest_of_the_rule_stays() {
        // From x/a (app=web) or an ipBlock whose except cannot be read, on 80 or a port
        // whose protocol cannot be read.
        let c = compiled(basic().policy(
            "x",
            "p",
            json!({"podSelector": {"matchLabels": {"app": "db"}},
                "ingress": [{"from": [{"podSelector": {"matchLabels": {"app": "web"}}},
                                     {"ipBlock": {"cidr": "10.0.0.0/8", "except": ["10.0.1.0/33"]}}],
                             "ports": [{"port": 80}, {"port": 81, "protocol": "ICMP"}]}]}),
        ));
        let fields: Vec<&str> = c.diagnostics.iter().map(|d| d.field.as_str()).collect();
        assert_eq!(
            fields,
            [
                "spec.ingress[0].from[1].ipBlock.except[0]",
                "spec.ingress[0].ports[1].protocol",
                "spec.ingress[0].from[1]",
                "spec.ingress[0].ports[1]",
            ]
        );
        assert!(passes(&c, "10.0.0.1", "10.0.0.2", 80, Direction::Ingress));
        assert!(!passes(&c, "10.0.0.1", "10.0.0.2", 81, Direction::Ingress));
        // The ipBlock is gone: y/c (10.0.1.3), which it would have excepted, and
        // anything else in 10/8 are denied.
        assert!(!passes(&c, "10.0.1.3", "10.0.0.2", 80, Direction::Ingress));
        assert!(!passes(&c, "10.0.7.7", "10.0.0.2", 80, Direction::Ingress));
        assert_eq!(c.rules.values().map(|r| r.index).collect::<Vec<_>>(), [0]);
    }

    #[test]
    fn a_rule_whose_peers_all_cannot_be_read_allows_nothing_while_the_others_do() {
        // Rule 0's only peer cannot be read: as "any peer" it would open everything.
        let c = compiled(basic().policy(
            "x",
            "p",
            json!({"podSelector": {"matchLabels": {"app": "db"}}, "policyTypes": ["Ingress", "Egress"],
                "ingress": [{"from": [{"ipBlock": {"cidr": "10.0.0.0/8", "except": ["11.0.0.0/16"]}}]},
                            {"ports": [{"port": 5432}]}],
                "egress": [{"to": [{"podSelector": {"matchExpressions": [{"key": "app", "operator": "Is"}]}}]}]}),
        ));
        assert!(!passes(&c, "10.0.0.1", "10.0.0.2", 80, Direction::Ingress));
        assert!(passes(&c, "10.0.0.1", "10.0.0.2", 5432, Direction::Ingress));
        assert!(!passes(&c, "10.0.0.2", "10.0.0.1", 80, Direction::Egress));
        // Rule ids only for rules in force, under their own index.
        let rules: Vec<String> = c.rules.values().map(ToString::to_string).collect();
        assert_eq!(rules, ["NetworkPolicy x/p spec.ingress[1]"]);
    }

    #[test]
    fn a_pod_selector_that_cannot_be_read_in_full_isolates_at_least_whom_it_meant_without_rules() {
        // app=web AND an expression that cannot be read: at least the app=web pods are
        // meant (x/a); they are isolated, and none gets the rule (which could open a
        // pod that other policies isolate).
        let c = compiled(
            basic()
                .policy(
                    "x",
                    "p",
                    json!({"podSelector": {"matchLabels": {"app": "web"},
                        "matchExpressions": [{"key": "tier", "operator": "Exists", "values": ["x"]}]},
                        "ingress": [{}]}),
                )
                .policy("x", "db", json!({"podSelector": {"matchLabels": {"app": "db"}}})),
        );
        assert_eq!(
            c.endpoints[&addr(ip("10.0.0.1"))].flags,
            ENDPOINT_INGRESS_ISOLATED
        );
        assert!(!passes(&c, "10.0.1.3", "10.0.0.1", 80, Direction::Ingress));
        assert!(!passes(&c, "10.0.1.3", "10.0.0.2", 80, Direction::Ingress));
        assert!(
            messages(&c)
                .iter()
                .any(|m| m
                    .starts_with("NetworkPolicy x/p: spec.podSelector: cannot be read in full")),
            "{:?}",
            messages(&c)
        );
    }

    #[test]
    fn a_policy_type_that_cannot_be_read_isolates_both_directions() {
        let c = compiled(basic().policy(
            "x",
            "p",
            json!({"podSelector": {"matchLabels": {"app": "web"}}, "policyTypes": ["Ingress", "egress"],
                "ingress": [{}]}),
        ));
        assert_eq!(
            c.endpoints[&addr(ip("10.0.0.1"))].flags,
            ENDPOINT_INGRESS_ISOLATED
                | ENDPOINT_EGRESS_ISOLATED
                | netpol_common::ENDPOINT_INGRESS_ANY_PEER
                | netpol_common::ENDPOINT_INGRESS_ANY_PROTOCOL
        );
        assert!(passes(&c, "10.0.1.3", "10.0.0.1", 80, Direction::Ingress));
        assert!(!passes(&c, "10.0.0.1", "10.0.1.3", 80, Direction::Egress));
    }

    #[test]
    fn cidrs_are_read_as_the_api_server_reads_them() {
        // Leading zeros are decimal, host bits are masked, a prefix length may have
        // leading zeros, an IPv4-mapped value is the IPv4 network: 10.0.0.0/8 except
        // 10.0.1.0/24.
        for (cidr, except) in [
            ("010.0.0.0/8", "010.000.001.000/24"),
            ("10.9.9.9/08", "10.0.1.7/024"),
            ("::ffff:10.0.0.0/104", "::ffff:10.0.1.0/120"),
            ("10.0.0.0/8", "::ffff:a00:100/120"),
        ] {
            let c = run(basic().policy(
                "x",
                "p",
                json!({"podSelector": {"matchLabels": {"app": "web"}}, "policyTypes": ["Egress"],
                    "egress": [{"to": [{"ipBlock": {"cidr": cidr, "except": [except]}}]}]}),
            ));
            let to = |dst| passes(&c, "10.0.0.1", dst, 80, Direction::Egress);
            assert!(to("10.0.0.2"), "{cidr} except {except}");
            assert!(to("10.200.0.1"), "{cidr} except {except}");
            assert!(!to("10.0.1.3"), "{cidr} except {except}");
            assert!(!to("8.0.0.1"), "{cidr} except {except}: not octal");
            assert!(!to("11.0.0.1"), "{cidr} except {except}");
            assert!(
                !to("::ffff:10.0.0.2"),
                "{cidr} except {except}: an IPv6 packet"
            );
        }
    }

    #[test]
    fn an_ipv6_block_holds_no_ipv4_mapped_address() {
        let c = run(basic().policy(
            "x",
            "p",
            json!({"podSelector": {"matchLabels": {"app": "web"}}, "policyTypes": ["Egress"],
                "egress": [{"to": [{"ipBlock": {"cidr": "::/0"}}]}]}),
        ));
        let to = |dst| passes(&c, "10.0.0.1", dst, 80, Direction::Egress);
        assert!(to("fd00::1"));
        assert!(to("::fffe:10.0.0.2"));
        assert!(!to("::ffff:10.0.0.2"));
        assert!(!to("10.0.0.2"));
    }

    #[test]
    fn the_current_object_wins_over_the_last_valid_version() {
        let mut compiler = Compiler::new();
        let c = compiler.compile(&allow_web().state);
        assert!(passes(&c, "10.0.0.1", "10.0.0.2", 80, Direction::Ingress));
        // The API server stored a version that no longer admits app=web, with a peer the
        // agent cannot read: the last valid version would keep app=web allowed.
        let update = basic().policy(
            "x",
            "p",
            json!({"podSelector": {"matchLabels": {"app": "db"}},
                "ingress": [{"from": [{"namespaceSelector": {"matchLabels": {"team": "b"}}},
                                     {"ipBlock": {"cidr": "10.0.0.0/8", "except": ["10.0.0.0/4"]}}]}]}),
        );
        let c = compiler.compile(&update.state);
        assert!(!passes(&c, "10.0.0.1", "10.0.0.2", 80, Direction::Ingress));
        assert!(passes(&c, "10.0.1.3", "10.0.0.2", 80, Direction::Ingress));
        let kept = compiler.policy(&ObjectRef::new("x", "p")).unwrap();
        assert_eq!(
            kept,
            update.state.policies[&ObjectRef::new("x", "p")].object()
        );
        assert!(!messages(&c).iter().any(|m| m.contains("stays in force")));
    }

    #[test]
    fn a_policy_that_cannot_be_read_at_all_keeps_the_version_in_force_before() {
        let mut compiler = Compiler::new();
        compiler.compile(&allow_web().state);
        let mut state = basic().state;
        state.unreadable_policies.insert(ObjectRef::new("x", "p"));
        let c = compiler.compile(&state);
        assert!(passes(&c, "10.0.0.1", "10.0.0.2", 80, Direction::Ingress));
        assert!(!passes(&c, "10.0.1.3", "10.0.0.2", 80, Direction::Ingress));
        assert_eq!(
            messages(&c),
            ["NetworkPolicy x/p: the last valid version stays in force"]
        );
        // Without a version before, there is nothing to enforce.
        let c = Compiler::new().compile(&state);
        assert!(c.policies.is_empty() && c.diagnostics.is_empty());
    }

    #[test]
    fn a_staged_policy_that_cannot_be_read_at_all_keeps_its_version_before_enforced() {
        // It may no longer be staged: the version kept in force closes what it closes.
        let staged = allow_web().staged("x", "p", "true");
        let mut compiler = Compiler::new();
        let c = compiler.compile(&staged.state);
        assert!(c.policies.is_empty(), "staged, not in force");
        assert!(passes(&c, "10.0.1.3", "10.0.0.2", 80, Direction::Ingress));

        let mut state = basic().state;
        state.unreadable_policies.insert(ObjectRef::new("x", "p"));
        let c = compiler.compile(&state);
        assert_eq!(*c.policies, [ObjectRef::new("x", "p")]);
        assert!(passes(&c, "10.0.0.1", "10.0.0.2", 80, Direction::Ingress));
        assert!(!passes(&c, "10.0.1.3", "10.0.0.2", 80, Direction::Ingress));
        // The state as admitted says the same to the reference evaluator.
        let admitted = compiler.admitted(&state);
        assert!(admitted.in_force(&ObjectRef::new("x", "p")));
    }

    #[test]
    fn what_the_source_could_not_read_is_reported_as_it_saw_it() {
        // The source replaced an unreadable peer with `{}`: the diagnostics name the
        // field it could not read, never the replacement.
        let mut c = basic().policy(
            "x",
            "p",
            json!({"podSelector": {"matchLabels": {"app": "db"}},
                "ingress": [{"from": [{"podSelector": {"matchLabels": {"app": "web"}}}, {}]}]}),
        );
        c.state.unreadable_parts.insert(
            ObjectRef::new("x", "p"),
            vec![UnreadablePart {
                field: "spec.ingress[0].from[1].NamespaceSelector".into(),
                message: "unknown field: this peer is left out of the rule".into(),
                replaced: "spec.ingress[0].from[1]".into(),
            }],
        );
        let c = compiled(c);
        assert_eq!(
            messages(&c),
            [
                "NetworkPolicy x/p: spec.ingress[0].from[1].NamespaceSelector: unknown field: this peer is left out of the rule"
            ]
        );
        assert!(passes(&c, "10.0.0.1", "10.0.0.2", 80, Direction::Ingress));
        assert!(!passes(&c, "10.0.1.3", "10.0.0.2", 80, Direction::Ingress));
    }
}
