//! Parsing Kubernetes manifests strictly: typed objects (k8s-openapi), with unknown
//! fields and type errors reported by their path, e.g.
//! `NetworkPolicy x/db: spec.ingress[0].from[0].NamespaceSelector: unknown field`.
//!
//! The Kubernetes API server drops unknown fields with a warning; a policy that loses a
//! misspelt selector silently allows more than its author meant, so here an unknown
//! field rejects the object.

use k8s_openapi::api::core::v1::{Namespace, Pod};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use serde::de::DeserializeOwned;
use serde_json::Value;

use netpol_compile::state::ObjectRef;
use netpol_compile::{Diagnostic, Kind, ObjectName, Subject};

/// One object of a manifest.
#[derive(Clone, Debug)]
pub enum Object {
    Namespace(Box<Namespace>),
    Pod(Box<Pod>),
    NetworkPolicy(Box<NetworkPolicy>),
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
                state
                    .namespaces
                    .insert(ns.metadata.name.clone().unwrap_or_default(), *ns);
            }
            Object::Pod(pod) => {
                state.pods.insert(key(&pod.metadata), *pod);
            }
            Object::NetworkPolicy(policy) => {
                state.policies.insert(key(&policy.metadata), *policy);
            }
        }
    }

    pub fn kind(&self) -> &'static str {
        match self {
            Object::Namespace(_) => "Namespace",
            Object::Pod(_) => "Pod",
            Object::NetworkPolicy(_) => "NetworkPolicy",
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
        "Namespace" | "Pod" => "v1",
        "NetworkPolicy" => "networking.k8s.io/v1",
        "" => return Err(fail("kind", "missing".into())),
        other => {
            return Err(fail(
                "kind",
                format!("unsupported kind {other:?} (expected Namespace, Pod or NetworkPolicy)"),
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
        _ => typed(&value).map(|policy| Object::NetworkPolicy(Box::new(policy))),
    }
    .map_err(|(field, message)| fail(&field, message))
}

/// `namespace/name` or `name` as written in the object, for messages.
fn written_name(value: &Value) -> Option<ObjectName> {
    let metadata = value.get("metadata");
    let get = |key| metadata.and_then(|m| m.get(key)).and_then(Value::as_str);
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

    #[test]
    fn misspelt_namespace_selector_is_named() {
        // The seed tutorial's `NamespaceSelector:` (capital N).
        let text = "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: accounts, namespace: prod}\n\
                    spec:\n  podSelector: {}\n  ingress:\n  - from:\n    - NamespaceSelector: {matchLabels: {team: a}}\n";
        let error = one(text).unwrap_err();
        assert_eq!(error.subject.to_string(), "NetworkPolicy prod/accounts");
        assert_eq!(
            error.object(),
            Some((&Kind::NetworkPolicy, &ObjectRef::new("prod", "accounts")))
        );
        assert_eq!(error.field, "spec.ingress[0].from[0].NamespaceSelector");
        assert_eq!(error.message, "unknown field");
    }

    #[test]
    fn ports_written_as_a_mapping_inside_the_peer_is_rejected() {
        // The seed tutorial's `ports: port: 3111` nested in the peer.
        let text = "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: p, namespace: x}\n\
                    spec:\n  podSelector: {}\n  ingress:\n  - from:\n    - podSelector: {}\n      ports:\n        port: 3111\n";
        let error = one(text).unwrap_err();
        assert_eq!(error.field, "spec.ingress[0].from[0].ports");
    }

    #[test]
    fn type_errors_carry_their_path() {
        let text = "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: p, namespace: x}\n\
                    spec:\n  podSelector: {}\n  ingress:\n  - ports: {port: 80}\n";
        let error = one(text).unwrap_err();
        assert_eq!(error.field, "spec.ingress[0].ports");
        assert!(error.message.contains("sequence"), "{}", error.message);
    }

    #[test]
    fn wrong_kind_and_version_and_bad_yaml() {
        assert_eq!(
            one("apiVersion: v1\nkind: Service\nmetadata: {name: s}\n")
                .unwrap_err()
                .field,
            "kind"
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
    fn null_fields_are_not_unknown() {
        let text =
            "apiVersion: v1\nkind: Namespace\nmetadata: {name: x, creationTimestamp: null}\n";
        assert!(one(text).is_ok());
    }
}
