//! Validation and normalisation of one NetworkPolicy (see the parent module).

use k8s_openapi::api::networking::v1::{
    IPBlock, NetworkPolicy, NetworkPolicyPeer, NetworkPolicyPort,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use netpol_common::PROTO_TCP;

use super::{
    Block, FieldError, NamespaceMatch, ParsedPolicy, ParsedRule, Peer, PortMatch, PortSpec, cidr,
    is_valid_port_name, protocol_number,
};
use crate::selector::Selector;

/// Checks `p` the way the API server would (minus unknown fields): every field that
/// cannot be read.
pub fn validate_policy(p: &NetworkPolicy) -> Result<(), Vec<FieldError>> {
    let reading = parse_policy(p);
    if reading.errors.is_empty() {
        Ok(())
    } else {
        Err(reading.errors)
    }
}

/// What can be read of a policy, and what cannot.
///
/// The rule (docs/SECURITY.md): what cannot be read never allows anything, and never
/// isolates less. A peer or port entry that cannot be read is left out of its list (the
/// entries of a list are alternatives, so the rule allows less); a rule whose peers or
/// ports all cannot be read is left out (an empty list would mean "any"); the
/// requirements of `spec.podSelector` that cannot be read are left out (requirements
/// are ANDed, so the pods selected are at least those meant) and then none of the
/// policy's rules apply (they would be given to pods not meant); a `policyTypes` entry
/// that cannot be read makes the policy isolate both directions.
#[derive(Clone, Debug)]
pub(crate) struct Reading {
    /// `None` when the policy has no name or namespace: nothing can be enforced for it.
    pub parsed: Option<ParsedPolicy>,
    /// Every field that cannot be read.
    pub errors: Vec<FieldError>,
    /// What the errors cost: the part left out, and how.
    pub consequences: Vec<FieldError>,
}

pub(crate) fn parse_policy(p: &NetworkPolicy) -> Reading {
    let mut errors = Vec::new();
    let mut consequences = Vec::new();
    let mut named = true;
    if p.metadata.name.as_deref().unwrap_or("").is_empty() {
        errors.push(FieldError::new("metadata.name", "is required"));
        named = false;
    }
    let namespace = p.metadata.namespace.clone().unwrap_or_default();
    if namespace.is_empty() {
        errors.push(FieldError::new("metadata.namespace", "is required"));
        named = false;
    }
    let spec = p.spec.clone().unwrap_or_default();

    let before = errors.len();
    let pod_selector = read_selector(spec.pod_selector.as_ref(), "spec.podSelector", &mut errors);
    let exact_selector = errors.len() == before;

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
                    other => {
                        errors.push(FieldError::new(
                            format!("spec.policyTypes[{i}]"),
                            format!("unsupported value {other:?}: must be Ingress or Egress"),
                        ));
                        consequences.push(FieldError::new(
                            format!("spec.policyTypes[{i}]"),
                            "cannot be read: it may mean either direction, so the policy \
                             isolates both",
                        ));
                        has_ingress = true;
                        has_egress = true;
                    }
                }
            }
        }
    }

    let mut ingress = Vec::new();
    for (i, rule) in spec.ingress.iter().flatten().enumerate() {
        let path = format!("spec.ingress[{i}]");
        let parts = RuleParts {
            namespace: &namespace,
            path: &path,
            peers_field: "from",
            index: i,
        };
        let read = parts.read(
            rule.from.as_deref(),
            rule.ports.as_deref(),
            &mut errors,
            &mut consequences,
        );
        ingress.extend(read);
    }
    let mut egress = Vec::new();
    for (i, rule) in spec.egress.iter().flatten().enumerate() {
        let path = format!("spec.egress[{i}]");
        let parts = RuleParts {
            namespace: &namespace,
            path: &path,
            peers_field: "to",
            index: i,
        };
        let read = parts.read(
            rule.to.as_deref(),
            rule.ports.as_deref(),
            &mut errors,
            &mut consequences,
        );
        egress.extend(read);
    }
    if !exact_selector {
        consequences.push(FieldError::new(
            "spec.podSelector",
            "cannot be read in full: every pod the requirements that can be read select is \
             isolated, with none of the policy's rules",
        ));
        ingress.clear();
        egress.clear();
    }

    let parsed = named.then(|| ParsedPolicy {
        namespace,
        pod_selector,
        ingress: has_ingress.then_some(ingress),
        egress: has_egress.then_some(egress),
    });
    Reading {
        parsed,
        errors,
        consequences,
    }
}

/// What can be read of `sel` (absent: the empty selector); errors under `path`.
fn read_selector(
    sel: Option<&LabelSelector>,
    path: &str,
    errors: &mut Vec<FieldError>,
) -> Selector {
    let Some(sel) = sel else {
        return Selector::default();
    };
    let (selector, errs) = Selector::read(sel);
    errors.extend(
        errs.into_iter()
            .map(|(f, m)| FieldError::new(format!("{path}.{f}"), m)),
    );
    selector
}

/// Where one rule sits in its policy.
struct RuleParts<'a> {
    namespace: &'a str,
    /// `spec.ingress[0]`.
    path: &'a str,
    /// `from` or `to`.
    peers_field: &'a str,
    index: usize,
}

impl RuleParts<'_> {
    /// The rule as far as it can be read; `None` when it cannot allow anything.
    fn read(
        &self,
        peers: Option<&[NetworkPolicyPeer]>,
        ports: Option<&[NetworkPolicyPort]>,
        errors: &mut Vec<FieldError>,
        consequences: &mut Vec<FieldError>,
    ) -> Option<ParsedRule> {
        let path = self.path;
        let mut readable = true;
        let peers = match peers {
            None | Some([]) => None,
            Some(list) => {
                let mut read = Vec::new();
                for (i, peer) in list.iter().enumerate() {
                    let field = format!("{path}.{}[{i}]", self.peers_field);
                    match parse_peer(self.namespace, peer, &field, errors) {
                        Some(peer) => read.push(peer),
                        None => consequences.push(FieldError::new(
                            field,
                            "cannot be read: this peer is left out of the rule",
                        )),
                    }
                }
                readable &= !read.is_empty();
                Some(read)
            }
        };
        let ports = match ports {
            None | Some([]) => None,
            Some(list) => {
                let mut read = Vec::new();
                for (i, port) in list.iter().enumerate() {
                    let field = format!("{path}.ports[{i}]");
                    match parse_port(port, &field, errors) {
                        Some(port) => read.push(port),
                        None => consequences.push(FieldError::new(
                            field,
                            "cannot be read: this port is left out of the rule",
                        )),
                    }
                }
                readable &= !read.is_empty();
                Some(read)
            }
        };
        if !readable {
            consequences.push(FieldError::new(
                path,
                format!(
                    "none of its {} can be read: the rule is left out (it allows nothing)",
                    if peers.as_ref().is_some_and(Vec::is_empty) {
                        self.peers_field
                    } else {
                        "ports"
                    }
                ),
            ));
            return None;
        }
        Some(ParsedRule {
            index: self.index,
            peers,
            ports,
        })
    }
}

/// One peer; `None` (with its errors) when any part of it cannot be read.
fn parse_peer(
    namespace: &str,
    peer: &NetworkPolicyPeer,
    path: &str,
    errors: &mut Vec<FieldError>,
) -> Option<Peer> {
    let before = errors.len();
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
    let pods = read_selector(
        peer.pod_selector.as_ref(),
        &format!("{path}.podSelector"),
        errors,
    );
    let namespaces = match &peer.namespace_selector {
        None => NamespaceMatch::Named(namespace.to_string()),
        Some(sel) => NamespaceMatch::Selector(read_selector(
            Some(sel),
            &format!("{path}.namespaceSelector"),
            errors,
        )),
    };
    (errors.len() == before).then_some(Peer::Pods { namespaces, pods })
}

/// An ipBlock as the API server validates it (`ValidateIPBlock`): `cidr` and every
/// `except` parse as `ParseCIDRSloppy` parses them, and each `except`'s address is in
/// `cidr` with a longer prefix as written. `None` when any of it cannot be read: an
/// `except` left out would allow what it excludes.
fn parse_ip_block(block: &IPBlock, path: &str, errors: &mut Vec<FieldError>) -> Option<Block> {
    let Some(cidr) = cidr::parse(&block.cidr) else {
        let message = if block.cidr.is_empty() {
            "is required".to_string()
        } else {
            format!("invalid CIDR {:?}", block.cidr)
        };
        errors.push(FieldError::new(format!("{path}.cidr"), message));
        return None;
    };
    let mut except = Vec::new();
    let mut ok = true;
    for (i, e) in block.except.iter().flatten().enumerate() {
        let field = format!("{path}.except[{i}]");
        match cidr::parse(e) {
            None => {
                errors.push(FieldError::new(field, format!("invalid CIDR {e:?}")));
                ok = false;
            }
            Some(net) if net.net.max_prefix_len() != cidr.net.max_prefix_len() => {
                errors.push(FieldError::new(
                    field,
                    format!(
                        "{e:?} is not of the same IP family as cidr {:?}",
                        block.cidr
                    ),
                ));
                ok = false;
            }
            Some(net)
                if !(cidr::contains_address(&cidr.net, &net.net)
                    && cidr.written_len < net.written_len) =>
            {
                errors.push(FieldError::new(
                    field,
                    format!("{e:?} must be a strict subset of cidr {:?}", block.cidr),
                ));
                ok = false;
            }
            Some(net) => except.push(net.net),
        }
    }
    ok.then(|| Block::new(cidr.net, except))
}

/// One port entry; `None` (with its errors) when any part of it cannot be read.
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

    /// The reading of a policy that can be read in full.
    fn complete(p: NetworkPolicy) -> ParsedPolicy {
        let reading = parse_policy(&p);
        assert_eq!(reading.errors, [], "{p:?}");
        reading.parsed.expect("a named policy")
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
    fn every_cidr_form_the_api_server_accepts_is_read() {
        let block = |cidr: &str, except: &[&str]| {
            let p = complete(np(
                json!({"ingress": [{"from": [{"ipBlock": {"cidr": cidr, "except": except}}]}]}),
            ));
            match &p.ingress.unwrap()[0].peers.as_ref().unwrap()[0] {
                Peer::Block(b) => (
                    b.cidr.to_string(),
                    b.except.iter().map(ToString::to_string).collect::<Vec<_>>(),
                ),
                other => panic!("{other:?}"),
            }
        };
        assert_eq!(
            block("010.0.0.0/08", &["010.001.000.000/16"]),
            ("10.0.0.0/8".into(), vec!["10.1.0.0/16".into()])
        );
        // IPv4-mapped values are IPv4 networks, on either side: the subset test compares
        // addresses as Go does and prefix lengths as written.
        assert_eq!(
            block("10.0.0.0/8", &["::ffff:10.1.0.0/112"]),
            ("10.0.0.0/8".into(), vec!["10.1.0.0/16".into()])
        );
        assert_eq!(
            block("::ffff:10.0.0.0/104", &["::ffff:10.1.0.0/112"]),
            ("10.0.0.0/8".into(), vec!["10.1.0.0/16".into()])
        );
        // ... so an except may even cover all of cidr (the block is then empty).
        assert_eq!(
            block("10.0.0.0/16", &["::ffff:10.0.0.0/104"]),
            ("10.0.0.0/16".into(), vec!["10.0.0.0/8".into()])
        );
        // An IPv6 block covering the IPv4-mapped range excludes it, as Go's Contains.
        assert_eq!(
            block("::/0", &["fd00::/8"]),
            (
                "::/0".into(),
                vec!["::ffff:0.0.0.0/96".into(), "fd00::/8".into()]
            )
        );
        assert_eq!(block("fd00::/8", &[]), ("fd00::/8".into(), vec![]));
        assert_eq!(
            fields(json!({"ingress": [{"from": [
                {"ipBlock": {"cidr": "::ffff:10.0.0.0/104", "except": ["10.1.0.0/16"]}},
                {"ipBlock": {"cidr": "::/0", "except": ["::ffff:10.1.0.0/112"]}},
                {"ipBlock": {"cidr": ""}},
            ]}]})),
            [
                "spec.ingress[0].from[0].ipBlock.except[0]",
                "spec.ingress[0].from[1].ipBlock.except[0]",
                "spec.ingress[0].from[2].ipBlock.cidr",
            ]
        );
    }

    #[test]
    fn what_cannot_be_read_is_left_out_never_widened() {
        let reading = parse_policy(&np(json!({
            "podSelector": {"matchLabels": {"app": "a"}},
            "policyTypes": ["Egress"],
            "egress": [
                {"to": [{"podSelector": {}}, {"ipBlock": {"cidr": "10.0.0.0/8", "except": ["bogus"]}}]},
                {"to": [{}], "ports": [{"port": 53}]},
                {"ports": [{"port": 0}, {"port": 80}]},
                {"ports": [{"port": "Bad"}]},
            ],
        })));
        let parsed = reading.parsed.unwrap();
        let rules = parsed.egress.unwrap();
        let shape: Vec<(usize, Option<usize>, Option<usize>)> = rules
            .iter()
            .map(|r| {
                (
                    r.index,
                    r.peers.as_ref().map(Vec::len),
                    r.ports.as_ref().map(Vec::len),
                )
            })
            .collect();
        assert_eq!(shape, [(0, Some(1), None), (2, None, Some(1))]);
        let consequences: Vec<&str> = reading
            .consequences
            .iter()
            .map(|c| c.field.as_str())
            .collect();
        assert_eq!(
            consequences,
            [
                "spec.egress[0].to[1]",
                "spec.egress[1].to[0]",
                "spec.egress[1]",
                "spec.egress[2].ports[0]",
                "spec.egress[3].ports[0]",
                "spec.egress[3]",
            ]
        );
        assert!(parsed.ingress.is_none());
    }

    #[test]
    fn cidr_with_host_bits_is_masked() {
        let p = complete(np(
            json!({"ingress": [{"from": [{"ipBlock": {"cidr": "10.1.2.3/8",
            "except": ["10.1.2.3/16"]}}]}]}),
        ));
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

        let parsed = |spec| complete(np(spec));
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
        let p = complete(np(
            json!({"ingress": [{"from": [], "ports": []}, {"ports": [{}, {"port": 53, "protocol": "UDP"}]}]}),
        ));
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
