//! Parsing Kubernetes manifests strictly: typed objects (k8s-openapi), with unknown
//! fields and type errors reported by their path, e.g.
//! `NetworkPolicy x/db: spec.ingress[0].from[0].NamespaceSelector: unknown field`.
//!
//! The Kubernetes API server drops unknown fields with a warning; a policy that loses a
//! misspelt selector silently allows more than its author meant, so here an unknown
//! field rejects the object.

use k8s_openapi::api::core::v1::{Namespace, Node, Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::api::networking::v1::{
    NetworkPolicy, NetworkPolicyPeer, NetworkPolicyPort, ServiceCIDR,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta};
use serde::de::DeserializeOwned;
use serde_json::Value;

use netpol_compile::state::{NamespaceInfo, ObjectRef, PodInfo, Policy, UnreadablePart};
use netpol_compile::{Diagnostic, Kind, ObjectName, Subject};

/// One object of a manifest.
#[derive(Clone, Debug)]
pub enum Object {
    Namespace(Box<Namespace>),
    Pod(Box<Pod>),
    NetworkPolicy(Box<NetworkPolicy>),
    /// A NetworkPolicy whose metadata and podSelector could be read, but not all of the
    /// rest: each part that could not be read is replaced by a value validation rejects
    /// at the same path, and listed (see [`read_policy_in_part`]).
    NetworkPolicyInPart {
        policy: Box<NetworkPolicy>,
        unreadable: Vec<UnreadablePart>,
    },
    Service(Box<Service>),
    EndpointSlice(Box<EndpointSlice>),
    ServiceCIDR(Box<ServiceCIDR>),
    /// A Node: its labels and addresses are what ClusterNetworkPolicy `nodes` peers
    /// select.
    Node(Box<Node>),
    /// A ClusterNetworkPolicy as written (the compiler reads it, as strictly as the
    /// CRD's validation: `netpol_compile::cnp`), and its name (`metadata.name`).
    ClusterNetworkPolicy {
        name: String,
        object: Box<Value>,
    },
}

impl Object {
    /// Adds (or replaces) the object in `state`, as is, under its namespace and name
    /// (`default` when the namespace is missing). Validation is the compiler's business.
    pub fn insert_into(self, state: &mut netpol_compile::state::ClusterState) {
        let key = |meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta| {
            ObjectRef::new(
                meta.namespace.clone().unwrap_or_else(|| "default".into()),
                meta.name.clone().unwrap_or_default(),
            )
        };
        match self {
            Object::Namespace(ns) => {
                state.namespaces.insert(
                    ns.metadata.name.clone().unwrap_or_default(),
                    NamespaceInfo::of(&ns),
                );
            }
            Object::Pod(pod) => {
                state.pods.insert(key(&pod.metadata), PodInfo::of(&pod));
            }
            Object::NetworkPolicy(policy) => {
                let key = key(&policy.metadata);
                state.unreadable_parts.remove(&key);
                state.policies.insert(key, Policy::from(*policy));
            }
            Object::NetworkPolicyInPart { policy, unreadable } => {
                let key = key(&policy.metadata);
                state.unreadable_parts.insert(key.clone(), unreadable);
                state.policies.insert(key, Policy::from(*policy));
            }
            Object::Service(service) => {
                state.services.insert(key(&service.metadata), *service);
            }
            Object::EndpointSlice(slice) => {
                state.endpoint_slices.insert(key(&slice.metadata), *slice);
            }
            Object::ServiceCIDR(cidr) => {
                state
                    .service_cidrs
                    .insert(cidr.metadata.name.clone().unwrap_or_default(), *cidr);
            }
            Object::ClusterNetworkPolicy { name, object } => {
                state.cluster_policies.insert(name, *object);
            }
            Object::Node(node) => {
                let name = node.metadata.name.clone().unwrap_or_default();
                state
                    .nodes
                    .insert(name, netpol_compile::state::NodePeer::of(&node));
            }
        }
    }

    pub fn kind(&self) -> &'static str {
        match self {
            Object::Namespace(_) => "Namespace",
            Object::Pod(_) => "Pod",
            Object::NetworkPolicy(_) | Object::NetworkPolicyInPart { .. } => "NetworkPolicy",
            Object::Service(_) => "Service",
            Object::EndpointSlice(_) => "EndpointSlice",
            Object::ServiceCIDR(_) => "ServiceCIDR",
            Object::ClusterNetworkPolicy { .. } => "ClusterNetworkPolicy",
            Object::Node(_) => "Node",
        }
    }
}

/// An object as read from a file, or the reason it could not be.
pub type Parsed = Result<Object, Diagnostic>;

/// Parses every YAML document of `text` (JSON is YAML too). `origin` names the file in
/// messages about documents that have no usable name.
pub fn parse_documents(text: &str, origin: &str) -> Vec<Parsed> {
    let mut out = Vec::new();
    for (index, document) in serde_norway::Deserializer::from_str(text).enumerate() {
        let value = match <Value as serde::Deserialize>::deserialize(document) {
            Ok(Value::Null) => continue, // empty document, e.g. a trailing `---`
            Ok(value) => value,
            Err(error) => {
                out.push(Err(Diagnostic::new(
                    Subject::File {
                        origin: origin.to_owned(),
                        document: Some(index + 1),
                    },
                    "",
                    format!("not valid YAML: {error}"),
                )));
                // The YAML stream cannot be resumed after a syntax error.
                break;
            }
        };
        if let Some(Value::Array(items)) = value.get("items")
            && value
                .get("kind")
                .and_then(Value::as_str)
                .is_some_and(|k| k.ends_with("List"))
        {
            out.extend(items.iter().cloned().map(|item| parse_object(item, origin)));
        } else {
            out.push(parse_object(value, origin));
        }
    }
    out
}

/// Parses one object from its JSON form.
fn parse_object(value: Value, origin: &str) -> Parsed {
    let kind = value
        .get("kind")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_owned();
    let subject = Subject::Object {
        kind: Kind::of(&kind),
        name: written_name(&value).unwrap_or_else(|| ObjectName::In(origin.to_owned())),
    };
    let fail = |field: &str, message: String| Diagnostic::new(subject.clone(), field, message);
    let api_version = value
        .get("apiVersion")
        .and_then(Value::as_str)
        .unwrap_or_default();
    let expected = match kind.as_str() {
        "Namespace" | "Pod" | "Service" | "Node" => "v1",
        "NetworkPolicy" | "ServiceCIDR" => "networking.k8s.io/v1",
        "EndpointSlice" => "discovery.k8s.io/v1",
        "ClusterNetworkPolicy" => netpol_compile::cnp::API_VERSION,
        "" => return Err(fail("kind", "missing".into())),
        other => {
            return Err(fail(
                "kind",
                format!(
                    "unsupported kind {other:?} (expected Namespace, Pod, NetworkPolicy, \
                     Service, EndpointSlice, ServiceCIDR, ClusterNetworkPolicy or Node)"
                ),
            ));
        }
    };
    if api_version != expected {
        return Err(fail(
            "apiVersion",
            format!("{api_version:?} is not {expected:?}"),
        ));
    }
    match kind.as_str() {
        "Namespace" => typed(&value).map(|ns| Object::Namespace(Box::new(ns))),
        "Pod" => typed(&value).map(|pod| Object::Pod(Box::new(pod))),
        "Service" => typed(&value).map(|s| Object::Service(Box::new(s))),
        "EndpointSlice" => typed(&value).map(|s| Object::EndpointSlice(Box::new(s))),
        "ServiceCIDR" => typed(&value).map(|c| Object::ServiceCIDR(Box::new(c))),
        "Node" => typed(&value).map(|n| Object::Node(Box::new(n))),
        "ClusterNetworkPolicy" => match value
            .pointer("/metadata/name")
            .and_then(Value::as_str)
            .filter(|name| !name.is_empty())
        {
            Some(name) => Ok(Object::ClusterNetworkPolicy {
                name: name.to_owned(),
                object: Box::new(value.clone()),
            }),
            None => Err(("metadata.name".to_owned(), "missing".to_owned())),
        },
        _ => match typed(&value) {
            Ok(policy) => Ok(Object::NetworkPolicy(Box::new(policy))),
            Err(error) => match read_policy_in_part(&value) {
                Some((policy, unreadable)) => Ok(Object::NetworkPolicyInPart {
                    policy: Box::new(policy),
                    unreadable,
                }),
                None => Err(error),
            },
        },
    }
    .map_err(|(field, message)| fail(&field, message))
}

/// What can be read of a NetworkPolicy that does not parse strictly, when whom it
/// selects can be read: its metadata and `spec.podSelector`, each strictly (a misspelt
/// `namespace` would move the policy, a misspelt selector would widen it), and no
/// unknown field outside `spec`. Every other part that cannot be read (a value of the
/// wrong type, an unknown field) is replaced by a value validation rejects at the same
/// path, so that the compiler leaves it out as anything that cannot be read (never
/// allowing more, never isolating less, docs/SECURITY.md), and listed with the field
/// that failed:
///
/// - an entry of `from`/`to` by `{}` (no peer), of `ports` by `{endPort: 0}` (an end
///   without a port): it is left out of its rule;
/// - a rule, or its `from`/`to`/`ports` list, by a rule whose only peer is `{}`: the
///   rule allows nothing;
/// - `ingress`/`egress` by a list of such a rule: the direction's rules allow nothing;
/// - `policyTypes` by `[""]`: it may have named either direction, so both are isolated;
/// - an unknown field of `spec` may be a misspelt `egress`: when neither `policyTypes`
///   nor an egress rule decides egress, a rule allowing nothing is added to `egress`,
///   so that egress is isolated.
///
/// `None` when whom the policy selects cannot be read, or nothing is wrong.
pub fn read_policy_in_part(value: &Value) -> Option<(NetworkPolicy, Vec<UnreadablePart>)> {
    let object = value.as_object()?;
    if object
        .keys()
        .any(|k| !matches!(k.as_str(), "apiVersion" | "kind" | "metadata" | "spec"))
    {
        return None;
    }
    typed::<ObjectMeta>(object.get("metadata")?).ok()?;
    let Some(Value::Object(spec)) = object.get("spec") else {
        return None;
    };
    let selector = spec.get("podSelector").filter(|s| !s.is_null());
    if let Some(selector) = selector {
        typed::<LabelSelector>(selector).ok()?;
    }
    let mut parts = Vec::new();
    let mut read = serde_json::Map::new();
    if let Some(selector) = selector {
        read.insert("podSelector".into(), selector.clone());
    }
    let types_read = match spec.get("policyTypes").filter(|t| !t.is_null()) {
        None => false,
        Some(types) => {
            match typed::<Vec<String>>(types) {
                Ok(_) => {
                    read.insert("policyTypes".into(), types.clone());
                }
                Err((field, message)) => {
                    parts.push(UnreadablePart {
                        field: join("spec.policyTypes", &field),
                        message: format!(
                            "{message}: it may name either direction, so the policy isolates both"
                        ),
                        replaced: "spec.policyTypes".into(),
                    });
                    read.insert("policyTypes".into(), serde_json::json!([""]));
                }
            }
            true
        }
    };
    for (section, peers_field) in [("ingress", "from"), ("egress", "to")] {
        let path = format!("spec.{section}");
        match spec.get(section).filter(|v| !v.is_null()) {
            None => {}
            Some(Value::Array(rules)) => {
                let rules = rules
                    .iter()
                    .enumerate()
                    .map(|(i, rule)| {
                        read_rule(rule, &format!("{path}[{i}]"), peers_field, &mut parts)
                    })
                    .collect();
                read.insert(section.into(), Value::Array(rules));
            }
            Some(_) => {
                let (field, message) = typed::<Vec<Value>>(&spec[section])
                    .err()
                    .unwrap_or_default();
                parts.push(UnreadablePart {
                    field: join(&path, &field),
                    message: format!(
                        "{message}: none of its rules can be read, they allow nothing"
                    ),
                    replaced: path.clone(),
                });
                read.insert(
                    section.into(),
                    Value::Array(vec![nothing_rule(peers_field)]),
                );
            }
        }
    }
    for key in spec.keys() {
        if matches!(
            key.as_str(),
            "podSelector" | "policyTypes" | "ingress" | "egress"
        ) {
            continue;
        }
        // Without a podSelector, this may be a misspelt one: whom the policy selects is
        // then unknown.
        selector?;
        let egress_decided = types_read
            || read
                .get("egress")
                .and_then(Value::as_array)
                .is_some_and(|rules| !rules.is_empty());
        let field = format!("spec.{key}");
        if egress_decided {
            parts.push(UnreadablePart {
                field: field.clone(),
                message: "unknown field: left out".into(),
                replaced: field,
            });
        } else {
            let rules = read
                .entry("egress")
                .or_insert_with(|| Value::Array(Vec::new()));
            let rules = rules.as_array_mut()?;
            parts.push(UnreadablePart {
                field,
                message:
                    "unknown field: it may be a misspelt egress, so the policy isolates egress too"
                        .into(),
                replaced: format!("spec.egress[{}]", rules.len()),
            });
            rules.push(nothing_rule("to"));
        }
    }
    if parts.is_empty() {
        return None;
    }
    let mut whole = value.clone();
    whole["spec"] = Value::Object(read);
    let policy: NetworkPolicy = typed(&whole).ok()?;
    Some((policy, parts))
}

/// A rule that allows nothing: its only peer is no peer.
fn nothing_rule(peers_field: &str) -> Value {
    serde_json::json!({ peers_field: [{}] })
}

/// One rule at `path`, with the parts that cannot be read replaced (see
/// [`read_policy_in_part`]).
fn read_rule(
    rule: &Value,
    path: &str,
    peers_field: &str,
    parts: &mut Vec<UnreadablePart>,
) -> Value {
    let whole_rule = |parts: &mut Vec<UnreadablePart>, field: String, message: String| {
        parts.push(UnreadablePart {
            field,
            message: format!("{message}: the rule cannot be read and allows nothing"),
            replaced: path.to_owned(),
        });
        nothing_rule(peers_field)
    };
    let Value::Object(fields) = rule else {
        let message = if rule.is_null() {
            "a rule may not be null".to_owned()
        } else {
            "invalid type: expected a map".to_owned()
        };
        return whole_rule(parts, path.to_owned(), message);
    };
    if let Some(key) = fields
        .keys()
        .find(|k| k.as_str() != peers_field && k.as_str() != "ports")
    {
        return whole_rule(parts, format!("{path}.{key}"), "unknown field".into());
    }
    let mut out = serde_json::Map::new();
    for (list, placeholder, what) in [
        (peers_field, serde_json::json!({}), "peer"),
        ("ports", serde_json::json!({"endPort": 0}), "port"),
    ] {
        let list_path = format!("{path}.{list}");
        match fields.get(list).filter(|v| !v.is_null()) {
            None => {}
            Some(Value::Array(entries)) => {
                let entries = entries
                    .iter()
                    .enumerate()
                    .map(|(i, entry)| {
                        let entry_path = format!("{list_path}[{i}]");
                        let checked = if what == "peer" {
                            typed::<NetworkPolicyPeer>(entry).map(|_| ())
                        } else {
                            typed::<NetworkPolicyPort>(entry).map(|_| ())
                        };
                        match checked {
                            Ok(()) => entry.clone(),
                            Err((field, message)) => {
                                parts.push(UnreadablePart {
                                    field: join(&entry_path, &field),
                                    message: format!(
                                        "{message}: this {what} cannot be read and is left out of the rule"
                                    ),
                                    replaced: entry_path,
                                });
                                placeholder.clone()
                            }
                        }
                    })
                    .collect();
                out.insert(list.into(), Value::Array(entries));
            }
            Some(other) => {
                let (field, message) = typed::<Vec<Value>>(other).err().unwrap_or_default();
                parts.push(UnreadablePart {
                    field: join(&list_path, &field),
                    message: format!("{message}: none of its {what}s can be read"),
                    replaced: list_path,
                });
                out.insert(list.into(), Value::Array(vec![placeholder]));
            }
        }
    }
    Value::Object(out)
}

/// `path` followed by the relative path `field` (as `typed` reports it).
fn join(path: &str, field: &str) -> String {
    if field.is_empty() {
        path.to_owned()
    } else if field.starts_with('[') {
        format!("{path}{field}")
    } else {
        format!("{path}.{field}")
    }
}

/// `namespace/name` or `name` as written in the object, for messages.
fn written_name(value: &Value) -> Option<ObjectName> {
    let metadata = value.get("metadata");
    // An empty name names nothing: the file does.
    let get = |key| {
        metadata
            .and_then(|m| m.get(key))
            .and_then(Value::as_str)
            .filter(|text| !text.is_empty())
    };
    match (get("namespace"), get("name")) {
        (Some(ns), Some(name)) => Some(ObjectName::Namespaced(ObjectRef::new(ns, name))),
        (None, Some(name)) => Some(ObjectName::Cluster(name.to_owned())),
        _ => None,
    }
}

/// Deserializes with the failing field's path, then rejects unknown fields.
fn typed<T: DeserializeOwned + serde::Serialize>(value: &Value) -> Result<T, (String, String)> {
    let object: T = serde_path_to_error::deserialize(value).map_err(|error| {
        let path = error.path().to_string();
        (
            if path == "." { String::new() } else { path },
            error.into_inner().to_string(),
        )
    })?;
    let round_trip = serde_json::to_value(&object).map_err(|e| (String::new(), e.to_string()))?;
    if let Some(field) = unknown_field(value, &round_trip, String::new()) {
        return Err((field, "unknown field".to_owned()));
    }
    Ok(object)
}

/// The first path present (and not null) in `original` but absent after a round trip
/// through the typed object.
fn unknown_field(original: &Value, round_trip: &Value, path: String) -> Option<String> {
    match (original, round_trip) {
        (Value::Object(fields), Value::Object(known)) => fields.iter().find_map(|(key, value)| {
            let child = if path.is_empty() {
                key.clone()
            } else {
                format!("{path}.{key}")
            };
            match known.get(key) {
                _ if value.is_null() => None,
                Some(known_value) => unknown_field(value, known_value, child),
                None => Some(child),
            }
        }),
        (Value::Array(items), Value::Array(known)) => {
            items
                .iter()
                .zip(known)
                .enumerate()
                .find_map(|(i, (item, known_item))| {
                    unknown_field(item, known_item, format!("{path}[{i}]"))
                })
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn one(text: &str) -> Parsed {
        let mut all = parse_documents(text, "test.yaml");
        assert_eq!(all.len(), 1, "{all:?}");
        all.remove(0)
    }

    #[test]
    fn parses_the_three_kinds_across_documents() {
        let text = "apiVersion: v1\nkind: Namespace\nmetadata: {name: x}\n---\n\
                    apiVersion: v1\nkind: Pod\nmetadata: {name: a, namespace: x}\nspec: {containers: [{name: c}]}\n---\n\
                    apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: p, namespace: x}\nspec: {podSelector: {}}\n---\n";
        let kinds: Vec<_> = parse_documents(text, "t")
            .into_iter()
            .map(|p| p.unwrap().kind())
            .collect();
        assert_eq!(kinds, ["Namespace", "Pod", "NetworkPolicy"]);
    }

    /// The parts of a policy document that could not be read.
    fn unreadable(text: &str) -> Vec<UnreadablePart> {
        match one(text) {
            Ok(Object::NetworkPolicyInPart { unreadable, .. }) => unreadable,
            other => panic!("not read in part: {other:?}"),
        }
    }

    #[test]
    fn misspelt_namespace_selector_is_named() {
        // The seed tutorial's `NamespaceSelector:` (capital N): the peer is replaced by
        // no peer, which the compiler leaves out of the rule.
        let text = "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: accounts, namespace: prod}\n\
                    spec:\n  podSelector: {}\n  ingress:\n  - from:\n    - NamespaceSelector: {matchLabels: {team: a}}\n";
        let Ok(Object::NetworkPolicyInPart { policy, unreadable }) = one(text) else {
            panic!("not read in part");
        };
        assert_eq!(policy.metadata.name.as_deref(), Some("accounts"));
        assert_eq!(
            unreadable,
            [UnreadablePart {
                field: "spec.ingress[0].from[0].NamespaceSelector".into(),
                message: "unknown field: this peer cannot be read and is left out of the rule"
                    .into(),
                replaced: "spec.ingress[0].from[0]".into(),
            }]
        );
        let from = policy.spec.unwrap().ingress.unwrap()[0]
            .from
            .clone()
            .unwrap();
        assert_eq!(from, [NetworkPolicyPeer::default()]);
    }

    #[test]
    fn ports_written_as_a_mapping_inside_the_peer_is_named() {
        // The seed tutorial's `ports: port: 3111` nested in the peer.
        let text = "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: p, namespace: x}\n\
                    spec:\n  podSelector: {}\n  ingress:\n  - from:\n    - podSelector: {}\n      ports:\n        port: 3111\n";
        assert_eq!(unreadable(text)[0].field, "spec.ingress[0].from[0].ports");
    }

    #[test]
    fn a_document_whose_metadata_or_selector_cannot_be_read_is_not_read_at_all() {
        for (text, field) in [
            (
                "metadata: {name: p, namespace: x, lables: {}}\nspec: {podSelector: {}, ingress: [{form: []}]}\n",
                "metadata.lables",
            ),
            (
                "metadata: {name: p, namespace: x}\nspec: {podSelector: {matchLabel: {}}}\n",
                "spec.podSelector.matchLabel",
            ),
            (
                "metadata: {name: p, namespace: x}\nspec: {podSelectr: {}}\n",
                "spec.podSelectr",
            ),
            (
                "metadata: {name: p, namespace: x}\nspec: {podSelector: {}}\nstatus: {}\n",
                "status",
            ),
            (
                "metadata: {name: p, namespace: x}\nspec: [podSelector]\n",
                "spec",
            ),
        ] {
            let text = format!("apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\n{text}");
            let error = one(&text).unwrap_err();
            assert_eq!(error.field, field, "{text}");
        }
    }

    #[test]
    fn services_their_slices_and_service_cidrs_are_read_strictly() {
        let text = "apiVersion: v1\nkind: Service\nmetadata: {name: db, namespace: x}\n\
                    spec: {clusterIP: 10.96.0.10, ports: [{port: 5432}]}\n---\n\
                    apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {name: db-1, namespace: x}\n\
                    addressType: IPv4\nendpoints: [{addresses: [10.0.0.1]}]\n---\n\
                    apiVersion: networking.k8s.io/v1\nkind: ServiceCIDR\nmetadata: {name: kubernetes}\n\
                    spec: {cidrs: [10.96.0.0/16]}\n";
        let kinds: Vec<_> = parse_documents(text, "t")
            .into_iter()
            .map(|p| p.unwrap().kind())
            .collect();
        assert_eq!(kinds, ["Service", "EndpointSlice", "ServiceCIDR"]);
        let typo = "apiVersion: v1\nkind: Service\nmetadata: {name: db, namespace: x}\n\
                    spec: {clusterIP: 10.96.0.10, port: [{port: 5432}]}\n";
        let error = one(typo).unwrap_err();
        assert_eq!(error.subject.to_string(), "Service x/db");
        assert_eq!(error.field, "spec.port");
    }

    #[test]
    fn type_errors_carry_their_path() {
        let text = "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: p, namespace: x}\n\
                    spec:\n  podSelector: {}\n  ingress:\n  - ports: {port: 80}\n";
        let part = &unreadable(text)[0];
        assert_eq!(part.field, "spec.ingress[0].ports");
        assert!(part.message.contains("sequence"), "{}", part.message);
        let text = "apiVersion: v1\nkind: Pod\nmetadata: {name: a, namespace: x}\nspec: {containers: {}}\n";
        assert_eq!(one(text).unwrap_err().field, "spec.containers");
    }

    #[test]
    fn wrong_kind_and_version_and_bad_yaml() {
        assert_eq!(
            one("apiVersion: v1\nkind: ConfigMap\nmetadata: {name: s}\n")
                .unwrap_err()
                .field,
            "kind"
        );
        assert_eq!(
            one("apiVersion: v1\nkind: EndpointSlice\nmetadata: {name: s}\n")
                .unwrap_err()
                .field,
            "apiVersion"
        );
        assert_eq!(
            one(
                "apiVersion: networking.k8s.io/v1beta1\nkind: NetworkPolicy\nmetadata: {name: s}\n"
            )
            .unwrap_err()
            .field,
            "apiVersion"
        );
        let error = one("kind: [unclosed\n").unwrap_err();
        assert!(error.message.starts_with("not valid YAML"), "{error}");
    }

    #[test]
    fn an_object_with_an_empty_name_is_named_by_its_file() {
        let error = one("apiVersion: v1\nkind: Gadget\nmetadata: {name: \"\"}\n").unwrap_err();
        assert_eq!(error.subject.to_string(), "Gadget in test.yaml");
        let error = one("apiVersion: v1\nkind: Gadget\nmetadata: {name: g, namespace: \"\"}\n")
            .unwrap_err();
        assert_eq!(error.subject.to_string(), "Gadget g");
    }

    #[test]
    fn null_fields_are_not_unknown() {
        let text =
            "apiVersion: v1\nkind: Namespace\nmetadata: {name: x, creationTimestamp: null}\n";
        assert!(one(text).is_ok());
    }
}
