use serde_json::{Value, json};

use super::parse::parse_prefix;
use super::*;

/// A valid Admin policy with one rule of each action; `edit` changes it before reading.
fn cnp(edit: impl FnOnce(&mut Value)) -> Reading {
    let mut object = json!({
        "apiVersion": "policy.networking.k8s.io/v1alpha2",
        "kind": "ClusterNetworkPolicy",
        "metadata": {"name": "deny-from-y", "resourceVersion": "7"},
        "spec": {
            "tier": "Admin",
            "priority": 10,
            "subject": {"namespaces": {"matchLabels": {"ns": "x"}}},
            "ingress": [
                {"name": "deny-y", "action": "Deny",
                 "from": [{"namespaces": {"matchLabels": {"ns": "y"}}}],
                 "protocols": [{"tcp": {"destinationPort": {"number": 80}}}]},
                {"action": "Pass",
                 "from": [{"pods": {"namespaceSelector": {}, "podSelector": {"matchLabels": {"app": "b"}}}}]},
            ],
            "egress": [
                {"name": "web", "action": "Accept",
                 "to": [{"networks": ["10.0.0.1/8", "::/0"]}, {"pods": {"podSelector": {}}}],
                 "protocols": [
                     {"udp": {"destinationPort": {"range": {"start": 53, "end": 54}}}},
                     {"sctp": {"destinationPort": {"number": 9003}}}
                 ]},
            ],
        },
    });
    edit(&mut object);
    read_cnp(&object)
}

fn errors(reading: &Reading) -> Vec<String> {
    reading.errors.iter().map(ToString::to_string).collect()
}

fn parsed(reading: &Reading) -> &ParsedCnp {
    reading.parsed.as_ref().expect("a named policy is read")
}

#[test]
fn a_valid_policy_reads_in_full_with_every_field_in_place() {
    let r = cnp(|_| {});
    assert_eq!(errors(&r), Vec::<String>::new());
    let p = parsed(&r);
    assert_eq!(p.name, "deny-from-y");
    assert_eq!((p.tier, p.priority), (Tier::Admin, 10));
    assert!(
        p.subject.pods.is_none(),
        "a namespaces subject takes every pod"
    );
    assert_eq!(p.ingress.len(), 2);
    assert_eq!(p.ingress[0].name.as_deref(), Some("deny-y"));
    assert_eq!(p.ingress[0].action, Action::Deny);
    assert_eq!(
        p.ingress[0].protocols,
        Some(vec![CnpProtocol::Ports {
            protocol: PROTO_TCP,
            first: 80,
            last: 80
        }])
    );
    assert_eq!(p.ingress[1].action, Action::Pass);
    assert_eq!(
        p.ingress[1].protocols, None,
        "absent protocols: all traffic"
    );
    let egress = &p.egress[0];
    assert_eq!(egress.action, Action::Accept);
    let peers = egress.peers.as_ref().unwrap();
    assert_eq!(
        peers[0],
        CnpPeer::Networks(vec!["10.0.0.0/8".parse().unwrap(), "::/0".parse().unwrap()]),
        "host bits are masked"
    );
    assert!(matches!(
        &peers[1],
        CnpPeer::Pods(Pods { pods: Some(_), .. })
    ));
    assert_eq!(
        egress.protocols.as_deref(),
        Some(
            &[
                CnpProtocol::Ports {
                    protocol: PROTO_UDP,
                    first: 53,
                    last: 54
                },
                CnpProtocol::Ports {
                    protocol: PROTO_SCTP,
                    first: 9003,
                    last: 9003
                }
            ][..]
        )
    );
    assert!(validate_cnp(&json!({})).is_err());
}

/// A change to the valid policy of [`cnp`].
type Edit = Box<dyn FnOnce(&mut Value)>;

#[test]
fn what_the_crd_rejects_is_named_by_its_field() {
    let cases: Vec<(Edit, &str)> = vec![
        (
            Box::new(|o| o["spec"]["tier"] = json!("Cluster")),
            "spec.tier: must be \"Admin\" or \"Baseline\"",
        ),
        (
            Box::new(|o| o["spec"]["priority"] = json!(1001)),
            "spec.priority: must be an integer from 0 to 1000",
        ),
        (
            Box::new(|o| {
                o["spec"].as_object_mut().unwrap().remove("priority");
            }),
            "spec.priority: is required",
        ),
        (
            Box::new(|o| o["spec"]["subject"]["pods"] = json!({"podSelector": {}})),
            "spec.subject: must set exactly one of namespaces, pods, not namespaces and pods",
        ),
        (
            Box::new(|o| o["spec"]["subject"] = json!({})),
            "spec.subject: must set exactly one of namespaces, pods",
        ),
        (
            Box::new(|o| o["spec"]["colour"] = json!("red")),
            "spec.colour: unknown field",
        ),
        (
            Box::new(|o| o["spec"]["ingress"][0]["action"] = json!("Allow")),
            "spec.ingress[0].action: must be \"Accept\", \"Deny\" or \"Pass\"",
        ),
        (
            Box::new(|o| o["spec"]["ingress"][0]["from"] = json!([])),
            "spec.ingress[0].from: must have at least 1 item",
        ),
        (
            Box::new(|o| o["spec"]["ingress"][0]["from"][0] = json!({"networks": ["10.0.0.0/8"]})),
            "spec.ingress[0].from[0].networks: unknown field",
        ),
        (
            Box::new(|o| o["spec"]["ingress"][0]["name"] = json!("n".repeat(101))),
            "spec.ingress[0].name: must be at most 100 characters",
        ),
        (
            Box::new(|o| o["spec"]["ingress"][0]["protocols"][0] = json!({"tcp": {}})),
            "spec.ingress[0].protocols[0].tcp.destinationPort: is required",
        ),
        (
            Box::new(|o| {
                o["spec"]["ingress"][0]["protocols"][0] =
                    json!({"tcp": {"destinationPort": {"range": {"start": 90, "end": 90}}}});
            }),
            "spec.ingress[0].protocols[0].tcp.destinationPort.range: start port must be less than end port",
        ),
        (
            Box::new(|o| {
                o["spec"]["ingress"][0]["protocols"][0] =
                    json!({"udp": {"destinationPort": {"number": 0}}});
            }),
            "spec.ingress[0].protocols[0].udp.destinationPort.number: must be an integer from 1 to 65535",
        ),
        (
            Box::new(|o| {
                o["spec"]["ingress"][0]["protocols"][0] = json!({"tcp": {"destinationPort": {"number": 80}}, "destinationNamedPort": "web"});
            }),
            "spec.ingress[0].protocols[0]: must set exactly one of tcp, udp, sctp, destinationNamedPort, not tcp and destinationNamedPort",
        ),
        (
            Box::new(|o| {
                o["spec"]["ingress"][0]["protocols"][0] = json!({"destinationNamedPort": "Web_1"});
            }),
            "spec.ingress[0].protocols[0].destinationNamedPort: invalid port name \"Web_1\": must be an IANA_SVC_NAME",
        ),
        (
            Box::new(|o| {
                o["spec"]["egress"][0]["to"][0]["networks"] = json!(["10.0.0.0/8", "10.0.0.0/8"]);
            }),
            "spec.egress[0].to[0].networks[1]: duplicate value \"10.0.0.0/8\"",
        ),
        (
            Box::new(|o| o["spec"]["egress"][0]["to"][0]["networks"] = json!(["010.0.0.0/8"])),
            "spec.egress[0].to[0].networks[0]: invalid CIDR \"010.0.0.0/8\"",
        ),
        (
            Box::new(|o| {
                o["spec"]["egress"][0]["protocols"] = json!([{"destinationNamedPort": "web"}]);
            }),
            "spec.egress[0].protocols: a destinationNamedPort cannot be used with networks or nodes peers: they have no named ports",
        ),
        (
            Box::new(|o| o["spec"]["egress"][0]["to"][0] = json!({"domainNames": ["example.com"]})),
            "spec.egress[0].to[0].domainNames: domainNames peers are not supported by netpol (they need DNS interception); the rule denies everything instead",
        ),
        (
            Box::new(|o| {
                o["spec"]["ingress"][1]["from"][0]["pods"] = json!({"namespaceSelector": {}});
            }),
            "spec.ingress[1].from[0].pods.podSelector: is required",
        ),
        (
            Box::new(|o| {
                o["spec"]["subject"]["namespaces"] = json!({"matchLabels": {"bad key!": "x"}});
            }),
            "spec.subject.namespaces.matchLabels.bad key!",
        ),
        (
            Box::new(
                |o| o["spec"]["subject"]["namespaces"] = json!({"matchExpressions": [{"key": "a", "operator": "In", "values": ["b"], "extra": 1}]}),
            ),
            "spec.subject.namespaces.matchExpressions[0].extra: unknown field",
        ),
        (
            Box::new(|o| o["kind"] = json!("NetworkPolicy")),
            "kind: must be \"ClusterNetworkPolicy\"",
        ),
        (
            Box::new(|o| {
                o["spec"]["egress"] = json!(vec![
                    json!({"action": "Deny", "to": [{"namespaces": {}}]});
                    26
                ]);
            }),
            "spec.egress: must have at most 25 items",
        ),
    ];
    for (edit, expected) in cases {
        let r = cnp(edit);
        let errors = errors(&r);
        assert!(
            errors.iter().any(|e| e.starts_with(expected)),
            "expected `{expected}` among {errors:#?}"
        );
    }
}

#[test]
fn a_null_is_absent_as_the_api_server_prunes_it() {
    let r = cnp(|o| {
        o["spec"]["ingress"][1]["protocols"] = Value::Null;
        o["spec"]["ingress"][0]["name"] = Value::Null;
    });
    assert_eq!(errors(&r), Vec::<String>::new());
    assert_eq!(parsed(&r).ingress[0].name, None);
}

#[test]
fn a_rule_that_cannot_be_read_denies_everything_at_its_place() {
    // An Accept whose one peer cannot be read, and a Pass with a bad port: left out, the
    // Pass would let later Admin rules or NetworkPolicy decide; read as written, the
    // Accept would open more. Both deny every peer and protocol instead.
    let r = cnp(|o| {
        o["spec"]["egress"][0]["to"][0]["networks"] = json!(["10.0.0.0/33"]);
        o["spec"]["ingress"][1]["protocols"] =
            json!([{"tcp": {"destinationPort": {"number": 70000}}}]);
    });
    assert_eq!(r.errors.len(), 2, "{:#?}", r.errors);
    let p = parsed(&r);
    for rule in [&p.egress[0], &p.ingress[1]] {
        assert_eq!(rule.action, Action::Deny);
        assert_eq!((&rule.peers, &rule.protocols), (&None, &None));
    }
    assert_eq!(p.egress[0].name.as_deref(), Some("web"), "still named");
    // The rule before it reads as written.
    assert_eq!(p.ingress[0], cnp(|_| {}).parsed.unwrap().ingress[0]);
}

#[test]
fn a_subject_that_cannot_be_read_in_full_selects_at_least_the_pods_meant() {
    let r = cnp(|o| {
        o["spec"]["subject"] = json!({"pods": {
            "namespaceSelector": {"matchLabels": {"ns": "x"}},
            "podSelector": {"matchLabels": {"app": "web", "bad key!": "v"}},
        }});
    });
    assert_eq!(r.errors.len(), 1);
    let subject = &parsed(&r).subject;
    let labels = |pairs: &[(&str, &str)]| -> std::collections::BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    };
    assert!(subject.namespaces.matches(&labels(&[("ns", "x")])));
    let pods = subject.pods.as_ref().unwrap();
    assert!(
        pods.matches(&labels(&[("app", "web")])),
        "the readable requirement holds"
    );
    assert!(!pods.matches(&labels(&[("app", "db")])));
}

#[test]
fn an_unreadable_tier_or_priority_stands_first() {
    let r = cnp(|o| {
        o["spec"]["tier"] = json!(3);
        o["spec"]["priority"] = json!("high");
    });
    let p = parsed(&r);
    assert_eq!((p.tier, p.priority), (Tier::Admin, 0));
    assert_eq!(r.errors.len(), 2);
}

#[test]
fn only_a_policy_without_a_name_is_not_read() {
    let r = cnp(|o| o["metadata"] = json!({}));
    assert!(r.parsed.is_none());
    assert_eq!(errors(&r), ["metadata.name: is required"]);
    let r = cnp(|o| o["metadata"]["name"] = json!("Not_A_Subdomain"));
    assert_eq!(parsed(&r).name, "Not_A_Subdomain");
    assert!(errors(&r)[0].starts_with("metadata.name: must be a DNS subdomain"));
}

#[test]
fn networks_are_read_as_is_cidr_reads_them() {
    let net = |s: &str| parse_prefix(s).map(|n| n.to_string());
    assert_eq!(net("10.1.2.3/8").as_deref(), Some("10.0.0.0/8"));
    assert_eq!(net("0.0.0.0/0").as_deref(), Some("0.0.0.0/0"));
    assert_eq!(net("fd00::1/64").as_deref(), Some("fd00::/64"));
    assert!(
        matches!(parse_prefix("::ffff:10.0.0.0/104"), Some(IpNet::V6(_))),
        "an IPv4-mapped prefix stays IPv6"
    );
    for bad in [
        "010.0.0.0/8",
        "10.0.0.0/08",
        "10.0.0.0/33",
        "10.0.0.0",
        "10.0.0.0/",
        "fe80::1%eth0/64",
        "10.0.0.0/+8",
        "::/129",
        "::ffff:010.0.0.0/104",
    ] {
        assert_eq!(net(bad), None, "{bad}");
    }
}

#[test]
fn egress_peers_may_be_nodes_and_ingress_peers_may_not() {
    let r = cnp(|o| {
        o["spec"]["egress"][0]["to"] = json!([{"nodes": {"matchLabels": {"role": "infra"}}}]);
    });
    assert_eq!(errors(&r), Vec::<String>::new());
    assert!(matches!(
        parsed(&r).egress[0].peers.as_deref(),
        Some([CnpPeer::Nodes(_)])
    ));
    let r = cnp(|o| o["spec"]["ingress"][0]["from"] = json!([{"nodes": {}}]));
    assert!(errors(&r).contains(&"spec.ingress[0].from[0].nodes: unknown field".to_owned()));
}

use netpol_common::{PROTO_SCTP, PROTO_TCP, PROTO_UDP};
