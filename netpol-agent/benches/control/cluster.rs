//! The synthetic cluster: namespaces, pods (some on this node, some dual-stack),
//! policies of the shapes real clusters carry, three per namespace in rotation over ten
//! shapes, and [`CLUSTER_POLICIES`] ClusterNetworkPolicies of both tiers in rotation over
//! six shapes.

use k8s_openapi::api::core::v1::{Namespace, Pod};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use netpol_compile::state::{ClusterState, NodeContext, ObjectRef};
use serde_json::{Value, json};

use crate::{LOCAL_PODS, NODE, PODS_PER_NAMESPACE, POLICIES_PER_NAMESPACE, Size};

const ROLES: [&str; 5] = ["frontend", "backend", "db", "cache", "worker"];
const ENVS: [&str; 3] = ["prod", "staging", "dev"];

pub fn ns_name(i: usize) -> String {
    format!("ns-{i:04}")
}

/// Whether pod `g` of `pods` runs on this node: `LOCAL_PODS` of them (all of them in
/// tiny clusters), spread over namespaces, apps and roles.
fn is_local(g: usize, pods: usize) -> bool {
    let stride = (pods / LOCAL_PODS).max(1);
    g % stride == (g / stride * 7) % stride
}

fn pod_ip(g: usize) -> String {
    format!("10.{}.{}.{}", 64 + g / 65536, (g / 256) % 256, g % 256)
}

fn namespace(i: usize) -> Namespace {
    let mut labels = json!({"team": format!("team-{}", i % 10), "env": ENVS[i % 3]});
    if i.is_multiple_of(20) {
        labels["monitoring"] = json!("enabled");
    }
    serde_json::from_value(json!({"metadata": {"name": ns_name(i), "labels": labels}}))
        .expect("namespace")
}

/// Pod `j` of namespace `ns`; elsewhere than this node, on one of `nodes - 1` others.
pub fn pod(
    ns: usize,
    name: &str,
    j: usize,
    ips: &[String],
    local: bool,
    node: usize,
    nodes: usize,
) -> Pod {
    let role = ROLES[(j % 10) / 2];
    let mut ports = vec![
        json!({"name": "http", "containerPort": 8080}),
        json!({"name": "metrics", "containerPort": 9090}),
    ];
    if role == "backend" {
        ports.push(json!({"name": "grpc", "containerPort": 50051}));
    }
    if j % 10 == 5 {
        ports.push(json!({"name": "dns", "containerPort": 53, "protocol": "UDP"}));
    }
    let pod_ips: Vec<Value> = ips.iter().map(|ip| json!({"ip": ip})).collect();
    let node = if local {
        NODE.to_string()
    } else {
        format!("node-{}", 1 + node % nodes.saturating_sub(1).max(1))
    };
    serde_json::from_value(json!({
        "metadata": {"namespace": ns_name(ns), "name": name, "labels": {
            "app": format!("app-{}", j % 10),
            "role": role,
            "version": format!("v{}", j % 3),
            "pod-template-hash": format!("{:08x}", (ns * 31 + j % 10) * 2654435761usize % (1 << 32)),
        }},
        "spec": {"nodeName": node, "containers": [{"name": "main", "ports": ports}]},
        "status": {"phase": "Running", "podIP": ips[0], "podIPs": pod_ips},
    }))
    .expect("pod")
}

/// The ten shapes real clusters carry, for namespace `i`.
fn policies(i: usize) -> Vec<(String, Value)> {
    let a = |k: usize| format!("app-{}", (i + k) % 10);
    vec![
        (
            "default-deny-ingress".into(),
            json!({"podSelector": {}, "policyTypes": ["Ingress"]}),
        ),
        (
            "frontend-to-app".into(),
            json!({
                "podSelector": {"matchLabels": {"app": a(1)}},
                "ingress": [{"from": [{"podSelector": {"matchLabels": {"role": "frontend"}}}],
                             "ports": [{"port": "http"}]}],
            }),
        ),
        (
            "from-team".into(),
            json!({
                "podSelector": {"matchExpressions": [{"key": "app", "operator": "In", "values": [a(2), a(3)]}]},
                "ingress": [{"from": [{
                    "namespaceSelector": {"matchLabels": {"team": format!("team-{}", (i + 1) % 10)}},
                    "podSelector": {"matchExpressions": [{"key": "role", "operator": "In", "values": ["frontend", "backend"]}]},
                }], "ports": [{"port": 8080}, {"port": 8443}]}],
            }),
        ),
        (
            "from-office".into(),
            json!({
                "podSelector": {"matchLabels": {"role": "frontend"}},
                "ingress": [{"from": [
                    {"ipBlock": {"cidr": "192.168.0.0/16", "except": [format!("192.168.{}.0/24", i % 256)]}},
                    {"ipBlock": {"cidr": "2001:db8::/32", "except": [format!("2001:db8:{:x}::/48", i)]}},
                ], "ports": [{"port": 443}, {"port": 80}]}],
            }),
        ),
        (
            "egress-grpc-dns".into(),
            json!({
                "podSelector": {"matchLabels": {"app": a(4)}},
                "policyTypes": ["Egress"],
                "egress": [
                    {"to": [{"namespaceSelector": {"matchExpressions": [{"key": "env", "operator": "In", "values": ["prod"]}]}}],
                     "ports": [{"port": "grpc"}]},
                    {"to": [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "ns-0000"}}}],
                     "ports": [{"port": 53, "protocol": "UDP"}, {"port": 53, "protocol": "TCP"}]},
                ],
            }),
        ),
        (
            "db-ports".into(),
            json!({
                "podSelector": {"matchLabels": {"role": "db"}},
                "ingress": [{"from": [{"podSelector": {"matchLabels": {"role": "backend"}}}],
                             "ports": [{"port": 5000, "endPort": 5999}, {"port": 30000, "endPort": 32767}]}],
            }),
        ),
        (
            "monitoring".into(),
            json!({
                "podSelector": {"matchExpressions": [{"key": "version", "operator": "NotIn", "values": ["v2"]}]},
                "ingress": [{"from": [{
                    "namespaceSelector": {"matchExpressions": [{"key": "monitoring", "operator": "Exists"}]},
                    "podSelector": {"matchLabels": {"app": "app-9"}},
                }], "ports": [{"port": "metrics"}]}],
            }),
        ),
        (
            "internet-egress".into(),
            json!({
                "podSelector": {"matchLabels": {"role": "frontend"}},
                "policyTypes": ["Egress"],
                "egress": [{"to": [{"ipBlock": {"cidr": "0.0.0.0/0",
                    "except": ["10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16"]}}],
                    "ports": [{"port": 443}]}],
            }),
        ),
        (
            "all-namespaces-web".into(),
            json!({
                "podSelector": {"matchLabels": {"app": a(0)}},
                "ingress": [{"from": [{"namespaceSelector": {}}], "ports": [{"port": 80}]}],
            }),
        ),
        (
            "backend-egress".into(),
            json!({
                "podSelector": {"matchLabels": {"role": "backend"}},
                "policyTypes": ["Egress"],
                "egress": [
                    {"to": [{"podSelector": {}}]},
                    {"to": [{"ipBlock": {"cidr": format!("10.200.{}.0/24", i % 256)}}],
                     "ports": [{"protocol": "SCTP", "port": 3868}]},
                ],
            }),
        ),
    ]
}

pub fn policy(ns: &str, name: &str, spec: Value) -> NetworkPolicy {
    serde_json::from_value(json!({"metadata": {"namespace": ns, "name": name}, "spec": spec}))
        .expect("policy")
}

/// ClusterNetworkPolicies at every size.
pub const CLUSTER_POLICIES: usize = 200;

/// ClusterNetworkPolicy number `k` (Admin tier for four of six shapes: a cluster
/// admin's guard rails; Baseline defaults for the rest), as the API server holds it.
pub fn cluster_policy(k: usize) -> (String, Value) {
    let team = format!("team-{}", k % 10);
    let (tier, spec) = match k % 6 {
        0 => (
            "Admin",
            json!({
                "subject": {"namespaces": {"matchLabels": {"team": team}}},
                "ingress": [{"name": "no-dev-to-db", "action": "Deny",
                             "from": [{"namespaces": {"matchLabels": {"env": "dev"}}}],
                             "protocols": [{"tcp": {"destinationPort": {"number": 5432}}}]}],
            }),
        ),
        1 => (
            "Admin",
            json!({
                "subject": {"namespaces": {"matchLabels": {"env": "prod"}}},
                "egress": [{"name": "no-metadata", "action": "Deny",
                            "to": [{"networks": ["169.254.169.254/32"]}]},
                           {"name": "pods-decide", "action": "Pass",
                            "to": [{"namespaces": {}}]}],
            }),
        ),
        2 => (
            "Admin",
            json!({
                "subject": {"pods": {"namespaceSelector": {"matchLabels": {"team": team}},
                                     "podSelector": {"matchLabels": {"role": "db"}}}},
                "ingress": [{"name": "scrape", "action": "Accept",
                             "from": [{"pods": {"namespaceSelector": {"matchLabels": {"monitoring": "enabled"}},
                                                "podSelector": {}}}],
                             "protocols": [{"destinationNamedPort": "metrics"}]}],
            }),
        ),
        3 => (
            "Admin",
            json!({
                "subject": {"namespaces": {}},
                "ingress": [{"name": "team-ports", "action": "Pass",
                             "from": [{"namespaces": {"matchLabels": {"team": team}}}],
                             "protocols": [{"tcp": {"destinationPort": {"range": {"start": 8000, "end": 8999}}}}]}],
            }),
        ),
        4 => (
            "Baseline",
            json!({
                "subject": {"namespaces": {"matchLabels": {"env": "staging"}}},
                "ingress": [{"name": "no-dev", "action": "Deny",
                             "from": [{"namespaces": {"matchLabels": {"env": "dev"}}}]}],
            }),
        ),
        _ => (
            "Baseline",
            json!({
                "subject": {"namespaces": {}},
                "egress": [{"name": "dns", "action": "Accept",
                            "to": [{"pods": {"namespaceSelector": {}, "podSelector": {"matchLabels": {"app": "app-5"}}}}],
                            "protocols": [{"udp": {"destinationPort": {"number": 53}}}]}],
            }),
        ),
    };
    let mut spec = spec;
    spec["tier"] = json!(tier);
    spec["priority"] = json!(k % 1000);
    let name = format!("cnp-{k:03}");
    let object = json!({
        "apiVersion": netpol_compile::cnp::API_VERSION,
        "kind": netpol_compile::cnp::KIND,
        "metadata": {"name": name},
        "spec": spec,
    });
    (name, object)
}

pub fn cluster(size: Size) -> ClusterState {
    let mut state = ClusterState {
        node: NodeContext {
            name: Some(NODE.into()),
            ips: vec!["10.255.0.1".parse().expect("IP")],
        },
        ..ClusterState::default()
    };
    for i in 0..size.namespaces {
        state.namespaces.insert(ns_name(i), namespace(i).into());
        // POLICIES_PER_NAMESPACE of the ten shapes, a different window in each namespace.
        let shapes = policies(i);
        for k in 0..POLICIES_PER_NAMESPACE {
            let (name, spec) = shapes[(i * POLICIES_PER_NAMESPACE + k) % shapes.len()].clone();
            let ns = ns_name(i);
            let p = policy(&ns, &name, spec);
            state.policies.insert(ObjectRef::new(ns, name), p.into());
        }
    }
    for g in 0..size.pods() {
        let (ns, j) = (g / PODS_PER_NAMESPACE, g % PODS_PER_NAMESPACE);
        let mut ips = vec![pod_ip(g)];
        if g % 4 == 0 {
            ips.push(format!("fd00:10::{:x}:{:x}", g >> 16, g & 0xffff));
        }
        let name = format!("app-{}-{g}", j % 10);
        let p = pod(
            ns,
            &name,
            j,
            &ips,
            is_local(g, size.pods()),
            g,
            size.nodes(),
        );
        state
            .pods
            .insert(ObjectRef::new(ns_name(ns), name), p.into());
    }
    for k in 0..CLUSTER_POLICIES {
        let (name, object) = cluster_policy(k);
        state.cluster_policies.insert(name, object);
    }
    state
}
