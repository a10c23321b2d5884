//! Text helpers shared by explain and matrix: how selectors, peers and ports are
//! written for people, and serializing with `Display`.

use std::collections::BTreeSet;

use k8s_openapi::api::networking::v1::{NetworkPolicyPeer, NetworkPolicyPort};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use netpol_compile::state::ObjectRef;

/// Serializes any `Display` value as a string (for `#[serde(serialize_with)]`).
pub(crate) fn as_display<T: std::fmt::Display, S: serde::Serializer>(
    value: &T,
    serializer: S,
) -> Result<S::Ok, S::Error> {
    serializer.collect_str(value)
}

/// Serializes objects as a list of `namespace/name` strings.
pub(crate) fn display_list<S: serde::Serializer>(
    list: &[ObjectRef],
    serializer: S,
) -> Result<S::Ok, S::Error> {
    serializer.collect_seq(list.iter().map(ToString::to_string))
}

/// One requirement, ordered like the compiler's canonical form (In, NotIn, Exists,
/// DoesNotExist; then key), so descriptions read like identity descriptions.
#[derive(PartialEq, Eq, PartialOrd, Ord)]
enum Requirement {
    In(String, BTreeSet<String>),
    NotIn(String, BTreeSet<String>),
    Exists(String),
    DoesNotExist(String),
    /// An operator the API server would reject (validated policies have none).
    Other(String),
}

/// A selector as the compiler writes it: `{app=web,tier in (a,b),!legacy}`; `{}` is
/// "everything".
pub(crate) fn selector(sel: &LabelSelector) -> String {
    let mut requirements = BTreeSet::new();
    for (key, value) in sel.match_labels.iter().flatten() {
        requirements.insert(Requirement::In(
            key.clone(),
            BTreeSet::from([value.clone()]),
        ));
    }
    for expr in sel.match_expressions.iter().flatten() {
        let values: BTreeSet<String> = expr.values.iter().flatten().cloned().collect();
        let key = expr.key.clone();
        requirements.insert(match expr.operator.as_str() {
            "In" => Requirement::In(key, values),
            "NotIn" => Requirement::NotIn(key, values),
            "Exists" => Requirement::Exists(key),
            "DoesNotExist" => Requirement::DoesNotExist(key),
            other => Requirement::Other(format!("{key} {other}")),
        });
    }
    let join = |values: &BTreeSet<String>| values.iter().cloned().collect::<Vec<_>>().join(",");
    let parts: Vec<String> = requirements
        .iter()
        .map(|r| match r {
            Requirement::In(key, values) if values.len() == 1 => format!("{key}={}", join(values)),
            Requirement::In(key, values) => format!("{key} in ({})", join(values)),
            Requirement::NotIn(key, values) => format!("{key} notin ({})", join(values)),
            Requirement::Exists(key) => key.clone(),
            Requirement::DoesNotExist(key) => format!("!{key}"),
            Requirement::Other(text) => text.clone(),
        })
        .collect();
    format!("{{{}}}", parts.join(","))
}

/// A peer of a rule written in `namespace`, e.g. `pods {role=frontend} in namespace
/// stars`, `pods {} in namespaces {role=client}`, `ipBlock 10.0.0.0/8 except 10.1.0.0/16`.
pub(crate) fn peer(namespace: &str, peer: &NetworkPolicyPeer) -> String {
    if let Some(block) = &peer.ip_block {
        let except: Vec<&str> = block.except.iter().flatten().map(String::as_str).collect();
        return if except.is_empty() {
            format!("ipBlock {}", block.cidr)
        } else {
            format!("ipBlock {} except {}", block.cidr, except.join(","))
        };
    }
    let pods = selector(&peer.pod_selector.clone().unwrap_or_default());
    match &peer.namespace_selector {
        None => format!("pods {pods} in namespace {namespace}"),
        Some(ns) => format!("pods {pods} in namespaces {}", selector(ns)),
    }
}

/// A port entry of a rule: `TCP/6379`, `TCP/8000-8080`, `UDP (any port)`, `TCP/http`.
pub(crate) fn port(p: &NetworkPolicyPort) -> String {
    let protocol = p.protocol.as_deref().unwrap_or("TCP");
    match (&p.port, p.end_port) {
        (None, _) => format!("{protocol} (any port)"),
        (Some(IntOrString::Int(start)), Some(end)) if end != *start => {
            format!("{protocol}/{start}-{end}")
        }
        (Some(IntOrString::Int(port)), _) => format!("{protocol}/{port}"),
        (Some(IntOrString::String(name)), _) => format!("{protocol}/{name}"),
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn selectors_peers_and_ports_read_like_the_compiler_writes_them() {
        let sel: LabelSelector = serde_json::from_value(json!({
            "matchLabels": {"app": "web"},
            "matchExpressions": [
                {"key": "legacy", "operator": "DoesNotExist"},
                {"key": "tier", "operator": "In", "values": ["b", "a"]}
            ]
        }))
        .unwrap();
        assert_eq!(selector(&sel), "{app=web,tier in (a,b),!legacy}");
        assert_eq!(selector(&LabelSelector::default()), "{}");

        let p: NetworkPolicyPeer =
            serde_json::from_value(json!({"podSelector": {"matchLabels": {"role": "frontend"}}}))
                .unwrap();
        assert_eq!(peer("stars", &p), "pods {role=frontend} in namespace stars");
        let p: NetworkPolicyPeer = serde_json::from_value(
            json!({"namespaceSelector": {"matchLabels": {"role": "client"}}}),
        )
        .unwrap();
        assert_eq!(peer("stars", &p), "pods {} in namespaces {role=client}");
        let p: NetworkPolicyPeer = serde_json::from_value(
            json!({"ipBlock": {"cidr": "10.0.0.0/8", "except": ["10.1.0.0/16"]}}),
        )
        .unwrap();
        assert_eq!(peer("x", &p), "ipBlock 10.0.0.0/8 except 10.1.0.0/16");

        let port_of = |v| serde_json::from_value::<NetworkPolicyPort>(v).unwrap();
        assert_eq!(port(&port_of(json!({"port": 80}))), "TCP/80");
        assert_eq!(
            port(&port_of(
                json!({"protocol": "UDP", "port": 8000, "endPort": 8080})
            )),
            "UDP/8000-8080"
        );
        assert_eq!(
            port(&port_of(json!({"protocol": "SCTP"}))),
            "SCTP (any port)"
        );
        assert_eq!(port(&port_of(json!({"port": "http"}))), "TCP/http");
    }
}
