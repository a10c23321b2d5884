//! The Kubernetes objects a case is made of: its namespaces, its agnhost pods, and the
//! label changes of its steps.

use std::collections::BTreeMap;

use anyhow::Result;
use serde_json::{Value, json};

use super::command::Kubectl;
use super::{ANNOTATION, PROBE_CONTAINER, REPLY};
use crate::conformance::case::{self, METADATA_NAME, PodDef, PortDef, Protocol};

fn annotations(case: &str) -> Value {
    json!({ ANNOTATION: case })
}

/// A namespace of a case: its labels (with `kubernetes.io/metadata.name`, which the API
/// server would add anyway), annotated with the case.
pub fn namespace_object(name: &str, labels: &BTreeMap<String, String>, case: &str) -> Value {
    let mut labels = labels.clone();
    labels.insert(METADATA_NAME.to_owned(), name.to_owned());
    json!({
        "apiVersion": "v1",
        "kind": "Namespace",
        "metadata": {"name": name, "labels": labels, "annotations": annotations(case)},
    })
}

fn protocol_word(protocol: Protocol) -> &'static str {
    match protocol {
        Protocol::Tcp => "tcp",
        Protocol::Udp => "udp",
        Protocol::Sctp => "sctp",
    }
}

/// The porter variable that makes it serve `port`: `SERVE_PORT_80` (TCP),
/// `SERVE_UDP_PORT_80`, `SERVE_SCTP_PORT_80`.
pub fn porter_env(port: &PortDef) -> String {
    match port.protocol {
        Protocol::Tcp => format!("SERVE_PORT_{}", port.port),
        Protocol::Udp => format!("SERVE_UDP_PORT_{}", port.port),
        Protocol::Sctp => format!("SERVE_SCTP_PORT_{}", port.port),
    }
}

/// A pod of a case: a probe container, and one porter per protocol serving the declared
/// ports, which it lists as containerPorts (named ports included).
pub fn pod_object(pod: &PodDef, node: Option<&str>, case: &str, image: &str) -> Result<Value> {
    let (namespace, name) = case::split_pod(&pod.name)?;
    let mut containers = vec![json!({
        "name": PROBE_CONTAINER,
        "image": image,
        "imagePullPolicy": "IfNotPresent",
        "args": ["pause"],
    })];
    for protocol in [Protocol::Tcp, Protocol::Udp, Protocol::Sctp] {
        let ports: Vec<&PortDef> = pod
            .ports
            .iter()
            .filter(|p| p.protocol == protocol)
            .collect();
        if ports.is_empty() {
            continue;
        }
        let container_ports: Vec<Value> = ports.iter().map(|p| p.container_port()).collect();
        let env: Vec<Value> = ports
            .iter()
            .map(|p| json!({"name": porter_env(p), "value": REPLY}))
            .collect();
        containers.push(json!({
            "name": format!("serve-{}", protocol_word(protocol)),
            "image": image,
            "imagePullPolicy": "IfNotPresent",
            "args": ["porter"],
            "env": env,
            "ports": container_ports,
        }));
    }
    let mut spec = json!({
        "containers": containers,
        "terminationGracePeriodSeconds": 1,
        "automountServiceAccountToken": false,
        "enableServiceLinks": false,
    });
    if let Some(node) = node {
        spec["nodeName"] = json!(node);
    }
    Ok(json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": name,
            "namespace": namespace,
            "labels": pod.labels,
            "annotations": annotations(case),
        },
        "spec": spec,
    }))
}

/// `kubectl label` arguments turning `old` into `new` (`k=v` to set, `k-` to remove);
/// `kubernetes.io/metadata.name` is left alone. Empty: nothing changes.
pub fn label_changes(
    old: &BTreeMap<String, String>,
    new: &BTreeMap<String, String>,
) -> Vec<String> {
    let mut args = Vec::new();
    for (key, value) in new {
        if key != METADATA_NAME && old.get(key) != Some(value) {
            args.push(format!("{key}={value}"));
        }
    }
    for key in old.keys() {
        if key != METADATA_NAME && !new.contains_key(key) {
            args.push(format!("{key}-"));
        }
    }
    args
}

/// The labels namespace `ns` has now.
pub(super) fn namespace_labels(kubectl: &Kubectl, ns: &str) -> Result<BTreeMap<String, String>> {
    let object: Value =
        serde_json::from_str(&kubectl.run(&["get", "namespace", ns, "-o", "json"])?)?;
    Ok(serde_json::from_value(object["metadata"]["labels"].clone()).unwrap_or_default())
}

/// `kubectl label` of a pod or namespace from `old` to `new` (nothing when they agree).
pub(super) fn relabel(
    kubectl: &Kubectl,
    kind: &str,
    ns: &str,
    name: &str,
    old: &BTreeMap<String, String>,
    new: &BTreeMap<String, String>,
) -> Result<()> {
    let changes = label_changes(old, new);
    if changes.is_empty() {
        return Ok(());
    }
    let mut args = vec!["label", kind, "--overwrite"];
    if kind == "pod" {
        args.extend(["-n", ns, name]);
    } else {
        args.push(name);
    }
    args.extend(changes.iter().map(String::as_str));
    kubectl.run(&args).map(drop)
}

/// Gives namespace `ns` back `labels`, whatever it has now.
pub(super) fn restore_labels(
    kubectl: &Kubectl,
    ns: &str,
    labels: &BTreeMap<String, String>,
) -> Result<String> {
    let now = namespace_labels(kubectl, ns)?;
    relabel(kubectl, "namespace", "", ns, &now, labels)?;
    Ok(String::new())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeSet;

    use k8s_openapi::api::core::v1::{Namespace, Pod};

    use super::super::{AGNHOST, workspace};
    use crate::conformance::case::{Case, ClusterPlan};

    /// The first path present in `original` but lost in `typed` (an unknown field).
    fn unknown_field(original: &Value, typed: &Value, path: &str) -> Option<String> {
        match (original, typed) {
            (Value::Object(fields), Value::Object(known)) => fields.iter().find_map(|(k, v)| {
                let child = format!("{path}.{k}");
                match known.get(k) {
                    Some(t) => unknown_field(v, t, &child),
                    None => Some(child),
                }
            }),
            (Value::Array(items), Value::Array(known)) => items
                .iter()
                .zip(known)
                .enumerate()
                .find_map(|(i, (v, t))| unknown_field(v, t, &format!("{path}[{i}]"))),
            _ => None,
        }
    }

    fn strict<T: serde::de::DeserializeOwned + serde::Serialize>(value: &Value) -> T {
        let typed: T = serde_json::from_value(value.clone()).expect("a valid object");
        let round_trip = serde_json::to_value(&typed).unwrap();
        if let Some(field) = unknown_field(value, &round_trip, "") {
            panic!("unknown field {field}");
        }
        typed
    }

    #[test]
    fn pods_of_a_real_case_carry_labels_and_named_ports() {
        let file =
            workspace().join("tests/conformance/named-port-differs-between-destinations.yaml");
        let case = Case::load(&file).unwrap();
        let plan = ClusterPlan::of(&case).unwrap();
        let two = plan.pods.iter().find(|p| p.name == "app/two").unwrap();
        let object = pod_object(two, Some("kind-worker2"), &case.name, AGNHOST).unwrap();
        let pod: Pod = strict(&object);
        assert_eq!(pod.metadata.name.as_deref(), Some("two"));
        assert_eq!(pod.metadata.namespace.as_deref(), Some("app"));
        assert_eq!(pod.metadata.labels.as_ref().unwrap()["role"], "server");
        assert_eq!(
            pod.metadata.annotations.as_ref().unwrap()[ANNOTATION],
            "named-port-differs-between-destinations"
        );
        let spec = pod.spec.unwrap();
        assert_eq!(spec.node_name.as_deref(), Some("kind-worker2"));
        let names: Vec<&str> = spec.containers.iter().map(|c| c.name.as_str()).collect();
        assert_eq!(names, ["probe", "serve-tcp"]);
        let serve = &spec.containers[1];
        assert_eq!(serve.image.as_deref(), Some(AGNHOST));
        assert_eq!(serve.args.as_deref(), Some(&["porter".to_owned()][..]));
        let ports: Vec<(i32, Option<&str>, Option<&str>)> = serve
            .ports
            .as_ref()
            .unwrap()
            .iter()
            .map(|p| (p.container_port, p.name.as_deref(), p.protocol.as_deref()))
            .collect();
        // "web" is 9090 on this pod (8080 on app/one): the case depends on it.
        assert_eq!(
            ports,
            [(8080, None, Some("TCP")), (9090, Some("web"), Some("TCP"))]
        );
        let env: Vec<&str> = serve
            .env
            .as_ref()
            .unwrap()
            .iter()
            .map(|e| e.name.as_str())
            .collect();
        assert_eq!(env, ["SERVE_PORT_8080", "SERVE_PORT_9090"]);
        // A pod that serves nothing still has its probe container, and no porter.
        let client = plan.pods.iter().find(|p| p.name == "app/client").unwrap();
        let pod: Pod = strict(&pod_object(client, None, &case.name, AGNHOST).unwrap());
        let spec = pod.spec.unwrap();
        assert_eq!(spec.node_name, None);
        assert_eq!(spec.containers.len(), 1);
        assert_eq!(
            spec.containers[0].args.as_deref(),
            Some(&["pause".to_owned()][..])
        );
    }

    #[test]
    fn standard_cluster_pods_serve_every_protocol_on_named_ports() {
        let case: Case = serde_norway::from_str("name: t\nsteps: [{expect: []}]\n").unwrap();
        let plan = ClusterPlan::of(&case).unwrap();
        let pod: Pod = strict(&pod_object(&plan.pods[0], None, "t", AGNHOST).unwrap());
        let mut served = Vec::new();
        for container in &pod.spec.unwrap().containers[1..] {
            let env: BTreeSet<String> = container
                .env
                .iter()
                .flatten()
                .map(|e| e.name.clone())
                .collect();
            for port in container.ports.iter().flatten() {
                let protocol = port.protocol.clone().unwrap();
                let var = match protocol.as_str() {
                    "TCP" => format!("SERVE_PORT_{}", port.container_port),
                    other => format!("SERVE_{other}_PORT_{}", port.container_port),
                };
                assert!(
                    env.contains(&var),
                    "{} does not serve {var}",
                    container.name
                );
                served.push(port.name.clone().unwrap());
            }
        }
        served.sort();
        assert_eq!(
            served,
            [
                "serve-80-sctp",
                "serve-80-tcp",
                "serve-80-udp",
                "serve-81-sctp",
                "serve-81-tcp",
                "serve-81-udp"
            ]
        );
    }

    #[test]
    fn namespaces_keep_their_labels_and_get_the_metadata_name() {
        let labels = BTreeMap::from([("role".to_owned(), "client".to_owned())]);
        let ns: Namespace = strict(&namespace_object("client", &labels, "seed-stars"));
        let labels = ns.metadata.labels.unwrap();
        assert_eq!(labels["role"], "client");
        assert_eq!(labels[METADATA_NAME], "client");
        assert_eq!(labels.len(), 2);
        assert_eq!(ns.metadata.annotations.unwrap()[ANNOTATION], "seed-stars");
    }

    #[test]
    fn label_changes_replace_the_map_but_keep_the_metadata_name() {
        let map = |pairs: &[(&str, &str)]| -> BTreeMap<String, String> {
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect()
        };
        let old = map(&[("ns", "y"), ("gone", "1"), (METADATA_NAME, "y")]);
        let new = map(&[("ns", "y"), ("ns2", "updated")]);
        assert_eq!(label_changes(&old, &new), ["ns2=updated", "gone-"]);
        assert!(label_changes(&old, &old).is_empty());
        let changed = map(&[("ns", "z"), ("gone", "1")]);
        assert_eq!(label_changes(&old, &changed), ["ns=z"]);
    }
}
