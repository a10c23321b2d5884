use netpol_common::PROTO_TCP;
use serde_json::{Value, json};

use super::*;
use crate::testutil::{Cluster, ip};

/// x/a (TCP 80 named web) and x/b (TCP 8080 named web) in namespace x, y/c in y.
fn cluster() -> Cluster {
    Cluster::new()
        .ns("x", &[("ns", "x")])
        .ns("y", &[("ns", "y")])
        .pod(
            "x",
            "a",
            &[("app", "a")],
            &["10.0.0.1"],
            &[("web", 80, "TCP")],
        )
        .pod(
            "x",
            "b",
            &[("app", "b")],
            &["10.0.0.2"],
            &[("web", 8080, "TCP")],
        )
        .pod("y", "c", &[("app", "c")], &["10.0.1.1"], &[])
        .node_ips(&["10.0.9.9"])
}

/// A ClusterNetworkPolicy object.
fn cnp(name: &str, tier: &str, priority: u16, subject: Value, rules: Value) -> Value {
    let mut spec = json!({"tier": tier, "priority": priority, "subject": subject});
    for (direction, list) in rules.as_object().expect("rules by direction") {
        spec[direction] = list.clone();
    }
    json!({
        "apiVersion": "policy.networking.k8s.io/v1alpha2",
        "kind": "ClusterNetworkPolicy",
        "metadata": {"name": name},
        "spec": spec,
    })
}

fn with(mut cluster: Cluster, objects: &[Value]) -> Cluster {
    for object in objects {
        let name = object["metadata"]["name"]
            .as_str()
            .expect("name")
            .to_owned();
        cluster.state.cluster_policies.insert(name, object.clone());
    }
    cluster
}

fn ns(name: &str) -> Value {
    json!({"namespaces": {"matchLabels": {"ns": name}}})
}

fn tcp(port: u16) -> Value {
    json!([{"tcp": {"destinationPort": {"number": port}}}])
}

/// The verdict at the hook of `direction` for TCP `src -> dst:port`.
fn at(cluster: &Cluster, src: &str, dst: &str, port: u16, direction: Direction) -> TieredVerdict {
    TieredReference::new(&cluster.state).evaluate(ip(src), ip(dst), PROTO_TCP, port, direction)
}

fn ingress(cluster: &Cluster, src: &str, dst: &str, port: u16) -> TieredVerdict {
    at(cluster, src, dst, port, Direction::Ingress)
}

/// The policy and rule index that decided, or `None` when no CNP rule did.
fn cnp_rule(verdict: &TieredVerdict) -> Option<(String, usize, Action)> {
    match &verdict.decided_by {
        DecidedBy::Cnp { rule, action } => Some((rule.policy.clone(), rule.index, *action)),
        _ => None,
    }
}

fn decided(policy: &str, index: usize, action: Action) -> Option<(String, usize, Action)> {
    Some((policy.to_owned(), index, action))
}

#[test]
fn an_admin_deny_wins_over_a_networkpolicy_that_allows() {
    let c = with(
        cluster().policy(
            "x",
            "allow-y",
            json!({"podSelector": {}, "ingress": [{"from": [{"namespaceSelector": {}}]}]}),
        ),
        &[cnp(
            "deny-y",
            "Admin",
            10,
            ns("x"),
            json!({"ingress": [{"name": "no-y", "action": "Deny", "from": [ns("y")], "protocols": tcp(80)}]}),
        )],
    );
    let v = ingress(&c, "10.0.1.1", "10.0.0.1", 80);
    assert!(!v.allowed());
    assert_eq!(cnp_rule(&v), decided("deny-y", 0, Action::Deny));
    match &v.decided_by {
        DecidedBy::Cnp { rule, .. } => {
            assert_eq!(
                (rule.tier, rule.name.as_deref()),
                (Tier::Admin, Some("no-y"))
            );
        }
        other => panic!("{other:?}"),
    }
    // Another port: the NetworkPolicy decides.
    let v = ingress(&c, "10.0.1.1", "10.0.0.1", 81);
    assert!(v.allowed());
    assert!(matches!(
        v.decided_by,
        DecidedBy::NetworkPolicy(Verdict::Allowed(_))
    ));
}

#[test]
fn a_pass_goes_on_to_networkpolicy_and_then_to_the_baseline() {
    let admin = cnp(
        "pass-y",
        "Admin",
        5,
        ns("x"),
        json!({"ingress": [{"action": "Pass", "from": [ns("y")]}]}),
    );
    let baseline = cnp(
        "baseline-deny",
        "Baseline",
        5,
        ns("x"),
        json!({"ingress": [{"action": "Deny", "from": [{"namespaces": {}}]}]}),
    );
    // No NetworkPolicy: the Baseline denies.
    let c = with(cluster(), &[admin.clone(), baseline.clone()]);
    let v = ingress(&c, "10.0.1.1", "10.0.0.1", 80);
    assert!(!v.allowed());
    assert_eq!(cnp_rule(&v), decided("baseline-deny", 0, Action::Deny));
    assert_eq!(v.passed.len(), 1);
    assert_eq!(v.passed[0].policy, "pass-y");
    // A NetworkPolicy selecting x/a decides, and the Baseline is never consulted.
    let c = with(
        cluster().policy(
            "x",
            "allow-y",
            json!({"podSelector": {"matchLabels": {"app": "a"}},
                   "ingress": [{"from": [{"namespaceSelector": {"matchLabels": {"ns": "y"}}}]}]}),
        ),
        &[admin, baseline],
    );
    let v = ingress(&c, "10.0.1.1", "10.0.0.1", 80);
    assert!(v.allowed());
    assert!(matches!(
        v.decided_by,
        DecidedBy::NetworkPolicy(Verdict::Allowed(_))
    ));
    // x/b is selected by no NetworkPolicy: the Baseline decides for it.
    assert!(!ingress(&c, "10.0.1.1", "10.0.0.2", 80).allowed());
}

#[test]
fn lower_priorities_are_looked_at_first_and_rules_in_their_order() {
    let c = with(
        cluster(),
        &[
            cnp(
                "accept-y",
                "Admin",
                20,
                ns("x"),
                json!({"ingress": [{"action": "Accept", "from": [ns("y")]}]}),
            ),
            cnp(
                "ordered",
                "Admin",
                10,
                ns("x"),
                json!({"ingress": [
                    {"action": "Deny", "from": [ns("y")], "protocols": tcp(80)},
                    {"action": "Accept", "from": [ns("y")], "protocols": tcp(81)},
                    {"action": "Deny", "from": [ns("y")], "protocols": tcp(81)},
                ]}),
            ),
        ],
    );
    let at_port = |port| cnp_rule(&ingress(&c, "10.0.1.1", "10.0.0.1", port));
    assert_eq!(at_port(80), decided("ordered", 0, Action::Deny));
    assert_eq!(at_port(81), decided("ordered", 1, Action::Accept));
    assert_eq!(at_port(82), decided("accept-y", 0, Action::Accept));
}

#[test]
fn a_named_port_is_resolved_on_each_destination_pod() {
    let c = with(
        cluster(),
        &[cnp(
            "no-web",
            "Admin",
            1,
            ns("x"),
            json!({"ingress": [{"action": "Deny", "from": [ns("y")],
                                "protocols": [{"destinationNamedPort": "web"}]}]}),
        )],
    );
    let allowed = |dst, port| ingress(&c, "10.0.1.1", dst, port).allowed();
    assert!(!allowed("10.0.0.1", 80));
    assert!(allowed("10.0.0.1", 8080));
    assert!(!allowed("10.0.0.2", 8080));
    assert!(allowed("10.0.0.2", 80));
}

#[test]
fn networks_match_pod_addresses_and_an_egress_accept_leaves_the_ingress_side_to_decide() {
    let c = with(
        cluster().policy("x", "deny-all", json!({"podSelector": {}})),
        &[cnp(
            "out",
            "Admin",
            1,
            ns("y"),
            json!({"egress": [{"action": "Accept", "to": [{"networks": ["0.0.0.0/0"]}]}]}),
        )],
    );
    let egress = at(&c, "10.0.1.1", "10.0.0.1", 80, Direction::Egress);
    assert_eq!(cnp_rule(&egress), decided("out", 0, Action::Accept));
    let ingress_side = ingress(&c, "10.0.1.1", "10.0.0.1", 80);
    assert_eq!(
        ingress_side.decided_by,
        DecidedBy::NetworkPolicy(Verdict::Denied)
    );
    assert!(!TieredReference::new(&c.state).flow_allowed(
        ip("10.0.1.1"),
        ip("10.0.0.1"),
        PROTO_TCP,
        80
    ));
}

#[test]
fn a_pod_reaching_itself_and_its_node_reaching_it_are_never_denied_by_a_tier() {
    let deny_everything = json!({
        "ingress": [{"action": "Deny", "from": [{"namespaces": {}}]}],
        "egress": [{"action": "Deny", "to": [{"networks": ["0.0.0.0/0"]}]}],
    });
    let c = with(
        cluster(),
        &[cnp("lockdown", "Admin", 1, ns("x"), deny_everything)],
    );
    for direction in Direction::BOTH {
        let v = at(&c, "10.0.0.1", "10.0.0.1", 80, direction);
        assert_eq!(v.decided_by, DecidedBy::Itself);
    }
    // A pod peer never matches the node; nothing else here selects x/a's ingress.
    let v = ingress(&c, "10.0.9.9", "10.0.0.1", 80);
    assert_eq!(v.decided_by, DecidedBy::Default);
    // Towards another pod it holds.
    assert!(!ingress(&c, "10.0.1.1", "10.0.0.1", 80).allowed());
    assert!(!at(&c, "10.0.0.1", "10.0.1.1", 80, Direction::Egress).allowed());
}
