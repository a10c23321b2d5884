//! Trimming watched objects to what the compiler, the flow log and Events need, before
//! they enter the reflector stores: on a large cluster most of a Pod is container specs,
//! managed fields and status conditions, none of which decide a verdict.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{Container, Namespace, Node, NodeStatus, Pod, PodSpec, PodStatus};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

/// Annotations kept on pods: ours (`netpol.dev/…`); the rest (e.g. the
/// `kubectl.kubernetes.io/last-applied-configuration` copy of the object) is dropped.
const KEPT_ANNOTATION_PREFIX: &str = "netpol.dev/";

/// Identity, labels, `netpol.dev/` annotations and the resource version.
fn metadata(meta: &mut ObjectMeta) {
    let annotations: Option<BTreeMap<String, String>> = meta.annotations.take().map(|all| {
        all.into_iter()
            .filter(|(key, _)| key.starts_with(KEPT_ANNOTATION_PREFIX))
            .collect()
    });
    *meta = ObjectMeta {
        name: meta.name.take(),
        namespace: meta.namespace.take(),
        labels: meta.labels.take(),
        annotations: annotations.filter(|a| !a.is_empty()),
        resource_version: meta.resource_version.take(),
        uid: meta.uid.take(),
        ..ObjectMeta::default()
    };
}

/// metadata; spec.nodeName, spec.hostNetwork, spec.containers[].{name,ports};
/// status.phase, status.podIP, status.podIPs.
pub fn pod(pod: &mut Pod) {
    metadata(&mut pod.metadata);
    pod.spec = pod.spec.take().map(|spec| PodSpec {
        node_name: spec.node_name,
        host_network: spec.host_network,
        containers: spec
            .containers
            .into_iter()
            .map(|c| Container {
                name: c.name,
                ports: c.ports,
                ..Container::default()
            })
            .collect(),
        ..PodSpec::default()
    });
    pod.status = pod.status.take().map(|status| PodStatus {
        phase: status.phase,
        pod_ip: status.pod_ip,
        pod_ips: status.pod_ips,
        ..PodStatus::default()
    });
}

/// metadata only (labels select namespaces).
pub fn namespace(namespace: &mut Namespace) {
    metadata(&mut namespace.metadata);
    namespace.spec = None;
    namespace.status = None;
}

/// metadata and the whole spec.
pub fn network_policy(policy: &mut NetworkPolicy) {
    metadata(&mut policy.metadata);
    policy.metadata.labels = None;
}

/// metadata and status.addresses.
pub fn node(node: &mut Node) {
    metadata(&mut node.metadata);
    node.spec = None;
    node.status = node.status.take().map(|status| NodeStatus {
        addresses: status.addresses,
        ..NodeStatus::default()
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pods_keep_exactly_what_the_compiler_reads() {
        let mut object: Pod = serde_json::from_value(serde_json::json!({
            "metadata": {
                "name": "a", "namespace": "x", "labels": {"app": "web"}, "resourceVersion": "7",
                "annotations": {"netpol.dev/host-interface": "veth1", "kubectl.kubernetes.io/last-applied-configuration": "{}"},
                "managedFields": [{"manager": "kubectl"}],
            },
            "spec": {
                "nodeName": "n1", "hostNetwork": false, "serviceAccountName": "sa",
                "containers": [{"name": "c", "image": "nginx", "ports": [{"name": "http", "containerPort": 80}]}],
            },
            "status": {"phase": "Running", "podIP": "10.0.0.1", "podIPs": [{"ip": "10.0.0.1"}], "hostIP": "192.168.0.1"},
        }))
        .unwrap();
        pod(&mut object);
        let value = serde_json::to_value(&object).unwrap();
        assert_eq!(
            value,
            serde_json::json!({
                "apiVersion": "v1", "kind": "Pod",
                "metadata": {
                    "name": "a", "namespace": "x", "labels": {"app": "web"}, "resourceVersion": "7",
                    "annotations": {"netpol.dev/host-interface": "veth1"},
                },
                "spec": {
                    "nodeName": "n1", "hostNetwork": false,
                    "containers": [{"name": "c", "ports": [{"name": "http", "containerPort": 80}]}],
                },
                "status": {"phase": "Running", "podIP": "10.0.0.1", "podIPs": [{"ip": "10.0.0.1"}]},
            })
        );
    }
}
