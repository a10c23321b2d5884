//! Validation and normalisation of one NetworkPolicy (see the parent module).

use ipnet::IpNet;
use k8s_openapi::api::networking::v1::{
    IPBlock, NetworkPolicy, NetworkPolicyPeer, NetworkPolicyPort,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use netpol_common::PROTO_TCP;

use super::{
    Block, FieldError, NamespaceMatch, ParsedPolicy, ParsedRule, Peer, PortMatch, PortSpec,
    is_valid_port_name, protocol_number,
};
use crate::selector::Selector;

/// Checks `p` the way the API server would (minus unknown fields).
pub fn validate_policy(p: &NetworkPolicy) -> Result<(), Vec<FieldError>> {
    parse_policy(p).map(|_| ())
}

pub(crate) fn parse_policy(p: &NetworkPolicy) -> Result<ParsedPolicy, Vec<FieldError>> {
    let mut errors = Vec::new();
    if p.metadata.name.as_deref().unwrap_or("").is_empty() {
        errors.push(FieldError::new("metadata.name", "is required"));
    }
    let namespace = p.metadata.namespace.clone().unwrap_or_default();
    if namespace.is_empty() {
        errors.push(FieldError::new("metadata.namespace", "is required"));
    }
    let spec = p.spec.clone().unwrap_or_default();

    let pod_selector = parse_selector(spec.pod_selector.as_ref(), "spec.podSelector", &mut errors);

    // policyTypes defaulting: Ingress always, Egress when there are egress rules.
    let (mut has_ingress, mut has_egress) = (false, false);
    match spec.policy_types.as_deref() {
        None | Some([]) => {
            has_ingress = true;
            has_egress = spec.egress.as_ref().is_some_and(|e| !e.is_empty());
        }
        Some(types) => {
            if types.len() > 2 {
                errors.push(FieldError::new(
                    "spec.policyTypes",
                    "may not specify more than two policyTypes",
                ));
            }
            for (i, t) in types.iter().enumerate() {
                match t.as_str() {
                    "Ingress" => has_ingress = true,
                    "Egress" => has_egress = true,
                    other => errors.push(FieldError::new(
                        format!("spec.policyTypes[{i}]"),
                        format!("unsupported value {other:?}: must be Ingress or Egress"),
                    )),
                }
            }
        }
    }

    let mut ingress = Vec::new();
    for (i, rule) in spec.ingress.iter().flatten().enumerate() {
        let path = format!("spec.ingress[{i}]");
        ingress.push(parse_rule(
            &namespace,
            rule.from.as_deref(),
            rule.ports.as_deref(),
            &path,
            "from",
            &mut errors,
        ));
    }
    let mut egress = Vec::new();
    for (i, rule) in spec.egress.iter().flatten().enumerate() {
        let path = format!("spec.egress[{i}]");
        egress.push(parse_rule(
            &namespace,
            rule.to.as_deref(),
            rule.ports.as_deref(),
            &path,
            "to",
            &mut errors,
        ));
    }

    if !errors.is_empty() {
        return Err(errors);
    }
    Ok(ParsedPolicy {
        namespace,
        pod_selector,
        ingress: has_ingress.then_some(ingress),
        egress: has_egress.then_some(egress),
    })
}

fn parse_selector(
    sel: Option<&LabelSelector>,
    path: &str,
    errors: &mut Vec<FieldError>,
) -> Selector {
    let Some(sel) = sel else {
        return Selector::default();
    };
    Selector::parse(sel).unwrap_or_else(|errs| {
        errors.extend(
            errs.into_iter()
                .map(|(f, m)| FieldError::new(format!("{path}.{f}"), m)),
        );
        Selector::default()
    })
}

fn parse_rule(
    namespace: &str,
    peers: Option<&[NetworkPolicyPeer]>,
    ports: Option<&[NetworkPolicyPort]>,
    path: &str,
    peers_field: &str,
    errors: &mut Vec<FieldError>,
) -> ParsedRule {
    let peers = match peers {
        None | Some([]) => None,
        Some(list) => Some(
            list.iter()
                .enumerate()
                .filter_map(|(i, peer)| {
                    parse_peer(
                        namespace,
                        peer,
                        &format!("{path}.{peers_field}[{i}]"),
                        errors,
                    )
                })
                .collect(),
        ),
    };
    let ports = match ports {
        None | Some([]) => None,
        Some(list) => Some(
            list.iter()
                .enumerate()
                .filter_map(|(i, port)| parse_port(port, &format!("{path}.ports[{i}]"), errors))
                .collect(),
        ),
    };
    ParsedRule { peers, ports }
}

fn parse_peer(
    namespace: &str,
    peer: &NetworkPolicyPeer,
    path: &str,
    errors: &mut Vec<FieldError>,
) -> Option<Peer> {
    let set = [
        peer.pod_selector.is_some(),
        peer.namespace_selector.is_some(),
        peer.ip_block.is_some(),
    ]
    .iter()
    .filter(|s| **s)
    .count();
    if set == 0 {
        errors.push(FieldError::new(
            path,
            "must specify a peer (podSelector, namespaceSelector or ipBlock)",
        ));
        return None;
    }
    if let Some(block) = &peer.ip_block {
        if set > 1 {
            errors.push(FieldError::new(
                path,
                "may not specify ipBlock together with another peer",
            ));
            return None;
        }
        return parse_ip_block(block, &format!("{path}.ipBlock"), errors).map(Peer::Block);
    }
    let pods = parse_selector(
        peer.pod_selector.as_ref(),
        &format!("{path}.podSelector"),
        errors,
    );
    let namespaces = match &peer.namespace_selector {
        None => NamespaceMatch::Named(namespace.to_string()),
        Some(sel) => NamespaceMatch::Selector(parse_selector(
            Some(sel),
            &format!("{path}.namespaceSelector"),
            errors,
        )),
    };
    Some(Peer::Pods { namespaces, pods })
}

fn parse_cidr(text: &str) -> Result<IpNet, String> {
    text.parse::<IpNet>()
        .map(|n| n.trunc())
        .map_err(|_| format!("invalid CIDR {text:?}"))
}

fn parse_ip_block(block: &IPBlock, path: &str, errors: &mut Vec<FieldError>) -> Option<Block> {
    let cidr = match parse_cidr(&block.cidr) {
        Ok(c) => c,
        Err(m) => {
            errors.push(FieldError::new(format!("{path}.cidr"), m));
            return None;
        }
    };
    let mut except = Vec::new();
    let mut ok = true;
    for (i, e) in block.except.iter().flatten().enumerate() {
        let field = format!("{path}.except[{i}]");
        match parse_cidr(e) {
            Err(m) => {
                errors.push(FieldError::new(field, m));
                ok = false;
            }
            Ok(net) if net.max_prefix_len() != cidr.max_prefix_len() => {
                errors.push(FieldError::new(
                    field,
                    format!(
                        "{e:?} is not of the same IP family as cidr {:?}",
                        block.cidr
                    ),
                ));
                ok = false;
            }
            Ok(net) if !(cidr.contains(&net) && net.prefix_len() > cidr.prefix_len()) => {
                errors.push(FieldError::new(
                    field,
                    format!("{e:?} must be a strict subset of cidr {:?}", block.cidr),
                ));
                ok = false;
            }
            Ok(net) => except.push(net),
        }
    }
    except.sort();
    except.dedup();
    ok.then_some(Block { cidr, except })
}

fn parse_port(
    port: &NetworkPolicyPort,
    path: &str,
    errors: &mut Vec<FieldError>,
) -> Option<PortSpec> {
    let before = errors.len();
    let protocol = match port.protocol.as_deref() {
        None => Some(PROTO_TCP),
        Some(name) => {
            let n = protocol_number(name);
            if n.is_none() {
                errors.push(FieldError::new(
                    format!("{path}.protocol"),
                    format!("unsupported protocol {name:?}: must be TCP, UDP or SCTP"),
                ));
            }
            n
        }
    };
    let in_range = |v: i32| (1..=65535).contains(&v);
    let port_match = match (&port.port, port.end_port) {
        (None, None) => Some(PortMatch::All),
        (None, Some(_)) => {
            errors.push(FieldError::new(
                format!("{path}.endPort"),
                "may not be specified when port is not specified",
            ));
            None
        }
        (Some(IntOrString::String(name)), end) => {
            if !is_valid_port_name(name) {
                errors.push(FieldError::new(
                    format!("{path}.port"),
                    format!(
                        "invalid port name {name:?}: must be at most 15 characters of lowercase letters, \
                         digits and '-', with at least one letter, no leading, trailing or double '-'"
                    ),
                ));
            }
            if end.is_some() {
                errors.push(FieldError::new(
                    format!("{path}.endPort"),
                    "may not be specified when port is a named port",
                ));
            }
            Some(PortMatch::Named(name.clone()))
        }
        (Some(IntOrString::Int(p)), end) => {
            let p = *p;
            if !in_range(p) {
                errors.push(FieldError::new(
                    format!("{path}.port"),
                    format!("{p} must be between 1 and 65535"),
                ));
            }
            match end {
                None => Some(PortMatch::Range(p as u16, p as u16)),
                Some(e) if !in_range(e) => {
                    errors.push(FieldError::new(
                        format!("{path}.endPort"),
                        format!("{e} must be between 1 and 65535"),
                    ));
                    None
                }
                Some(e) if e < p => {
                    errors.push(FieldError::new(
                        format!("{path}.endPort"),
                        format!("{e} must be greater than or equal to port {p}"),
                    ));
                    None
                }
                Some(e) => Some(PortMatch::Range(p as u16, e as u16)),
            }
        }
    };
    if errors.len() != before {
        return None;
    }
    Some(PortSpec {
        protocol: protocol?,
        port: port_match?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use netpol_common::PROTO_UDP;
    use serde_json::json;

    fn policy(v: serde_json::Value) -> NetworkPolicy {
        serde_json::from_value(v).expect("test policy must deserialize")
    }

    fn np(spec: serde_json::Value) -> NetworkPolicy {
        policy(json!({"metadata": {"name": "p", "namespace": "x"}, "spec": spec}))
    }

    fn errors(spec: serde_json::Value) -> Vec<(String, String)> {
        validate_policy(&np(spec))
            .unwrap_err()
            .into_iter()
            .map(|e| (e.field, e.message))
            .collect()
    }

    fn fields(spec: serde_json::Value) -> Vec<String> {
        errors(spec).into_iter().map(|(f, _)| f).collect()
    }

    #[test]
    fn valid_policy_passes() {
        let p = np(json!({
            "podSelector": {"matchLabels": {"app": "web"}},
            "policyTypes": ["Ingress", "Egress"],
            "ingress": [{"from": [{"podSelector": {}}, {"namespaceSelector": {"matchExpressions": [
                {"key": "ns", "operator": "In", "values": ["y"]}]}}],
                "ports": [{"port": 80}, {"port": "http", "protocol": "UDP"}, {"port": 1000, "endPort": 2000}, {"protocol": "SCTP"}]}],
            "egress": [{"to": [{"ipBlock": {"cidr": "10.0.0.1/8", "except": ["10.1.0.0/16"]}}]},
                       {"to": [{"ipBlock": {"cidr": "fd00::/8", "except": ["fd00::/16"]}}]}],
        }));
        assert_eq!(validate_policy(&p), Ok(()));
    }

    #[test]
    fn missing_metadata() {
        let p = policy(json!({"metadata": {}, "spec": {}}));
        let f: Vec<String> = validate_policy(&p)
            .unwrap_err()
            .into_iter()
            .map(|e| e.field)
            .collect();
        assert_eq!(f, ["metadata.name", "metadata.namespace"]);
    }

    #[test]
    fn bad_cidr_and_except() {
        assert_eq!(
            fields(
                json!({"egress": [{"to": [{"ipBlock": {"cidr": "10.0.0.0/33"}}, {"ipBlock": {"cidr": "10.0.0.0"}}]}]})
            ),
            [
                "spec.egress[0].to[0].ipBlock.cidr",
                "spec.egress[0].to[1].ipBlock.cidr"
            ]
        );
        assert_eq!(
            fields(
                json!({"egress": [{}, {"to": [{"podSelector": {}}, {"ipBlock": {"cidr": "10.0.0.0/8",
                "except": ["10.1.0.0/16", "11.0.0.0/16", "10.0.0.0/8", "10.0.0.0/4", "fd00::/16", "bogus"]}}]}]})
            ),
            [
                "spec.egress[1].to[1].ipBlock.except[1]",
                "spec.egress[1].to[1].ipBlock.except[2]",
                "spec.egress[1].to[1].ipBlock.except[3]",
                "spec.egress[1].to[1].ipBlock.except[4]",
                "spec.egress[1].to[1].ipBlock.except[5]",
            ]
        );
        let errs = errors(
            json!({"ingress": [{"from": [{"ipBlock": {"cidr": "10.0.0.0/8", "except": ["fd00::/16"]}}]}]}),
        );
        assert!(errs[0].1.contains("family"), "{errs:?}");
        let errs = errors(
            json!({"ingress": [{"from": [{"ipBlock": {"cidr": "10.0.0.0/8", "except": ["10.0.0.0/8"]}}]}]}),
        );
        assert!(errs[0].1.contains("strict subset"), "{errs:?}");
    }

    #[test]
    fn cidr_with_host_bits_is_masked() {
        let p = parse_policy(&np(
            json!({"ingress": [{"from": [{"ipBlock": {"cidr": "10.1.2.3/8",
            "except": ["10.1.2.3/16"]}}]}]}),
        ))
        .unwrap();
        let peers = p.ingress.unwrap()[0].peers.clone().unwrap();
        assert_eq!(
            peers,
            [Peer::Block(Block {
                cidr: "10.0.0.0/8".parse().unwrap(),
                except: vec!["10.1.0.0/16".parse().unwrap()]
            })]
        );
    }

    #[test]
    fn port_errors() {
        assert_eq!(
            fields(json!({"ingress": [{"ports": [
                {"port": 80, "endPort": 79},
                {"port": "http", "endPort": 90},
                {"endPort": 90},
                {"port": 0},
                {"port": 65536},
                {"port": 80, "protocol": "ICMP"},
                {"port": 80, "protocol": "tcp"},
                {"port": 80, "endPort": 65536},
                {"port": 80, "endPort": 80},
            ]}]})),
            [
                "spec.ingress[0].ports[0].endPort",
                "spec.ingress[0].ports[1].endPort",
                "spec.ingress[0].ports[2].endPort",
                "spec.ingress[0].ports[3].port",
                "spec.ingress[0].ports[4].port",
                "spec.ingress[0].ports[5].protocol",
                "spec.ingress[0].ports[6].protocol",
                "spec.ingress[0].ports[7].endPort",
            ]
        );
    }

    #[test]
    fn port_names() {
        for good in [
            "http",
            "h",
            "a1",
            "web-80",
            "abcdefghijklmno",
            "1a",
            "a-b-c",
        ] {
            assert!(is_valid_port_name(good), "{good}");
        }
        for bad in [
            "",
            "HTTP",
            "80",
            "-http",
            "http-",
            "ht--tp",
            "abcdefghijklmnop",
            "h_t",
            "h.t",
            "1-2",
        ] {
            assert!(!is_valid_port_name(bad), "{bad}");
        }
        assert_eq!(
            fields(json!({"egress": [{"ports": [{"port": "Bad_Name"}]}]})),
            ["spec.egress[0].ports[0].port"]
        );
    }

    #[test]
    fn selector_and_peer_errors() {
        assert_eq!(
            fields(json!({
                "podSelector": {"matchExpressions": [{"key": "a", "operator": "Exists", "values": ["x"]}]},
                "ingress": [{"from": [
                    {},
                    {"podSelector": {}, "ipBlock": {"cidr": "10.0.0.0/8"}},
                    {"namespaceSelector": {"matchExpressions": [{"key": "a", "operator": "Foo"}]}},
                    {"podSelector": {"matchExpressions": [{"key": "a", "operator": "In", "values": []}]}},
                ]}],
            })),
            [
                "spec.podSelector.matchExpressions[0].values",
                "spec.ingress[0].from[0]",
                "spec.ingress[0].from[1]",
                "spec.ingress[0].from[2].namespaceSelector.matchExpressions[0].operator",
                "spec.ingress[0].from[3].podSelector.matchExpressions[0].values",
            ]
        );
    }

    #[test]
    fn policy_types() {
        assert_eq!(
            fields(json!({"policyTypes": ["Ingress", "egress"]})),
            ["spec.policyTypes[1]"]
        );
        assert_eq!(
            fields(json!({"policyTypes": ["Ingress", "Egress", "Ingress"]})),
            ["spec.policyTypes"]
        );

        let parsed = |spec| parse_policy(&np(spec)).unwrap();
        // Defaulting: Ingress always, Egress only with non-empty egress rules.
        let p = parsed(json!({}));
        assert!(p.ingress.is_some() && p.egress.is_none());
        let p = parsed(json!({"egress": []}));
        assert!(p.ingress.is_some() && p.egress.is_none());
        let p = parsed(json!({"egress": [{}]}));
        assert!(p.ingress.is_some() && p.egress.is_some());
        let p = parsed(json!({"policyTypes": [], "egress": [{}]}));
        assert!(p.ingress.is_some() && p.egress.is_some());
        let p = parsed(json!({"policyTypes": ["Egress"], "ingress": [{}]}));
        assert!(p.ingress.is_none() && p.egress.as_deref().is_some_and(|e| e.is_empty()));
    }

    #[test]
    fn defaults() {
        let p = parse_policy(&np(json!({"ingress": [{"from": [], "ports": []}, {"ports": [{}, {"port": 53, "protocol": "UDP"}]}]})))
            .unwrap();
        let rules = p.ingress.unwrap();
        assert!(rules[0].peers.is_none() && rules[0].ports.is_none());
        assert_eq!(
            rules[1].ports.as_deref().unwrap(),
            [
                PortSpec {
                    protocol: PROTO_TCP,
                    port: PortMatch::All
                },
                PortSpec {
                    protocol: PROTO_UDP,
                    port: PortMatch::Range(53, 53)
                }
            ]
        );
    }

    #[test]
    fn field_error_display() {
        let e = FieldError::new("spec.ingress[0]", "bad");
        assert_eq!(e.to_string(), "spec.ingress[0]: bad");
    }
}
