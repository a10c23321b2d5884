//! Trimming watched objects to what the compiler, the flow log and Events need, before
//! they enter the reflector stores: on a large cluster most of a Pod is container specs,
//! managed fields and status conditions, none of which decide a verdict.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{
    Container, Namespace, Node, NodeStatus, Pod, PodSpec, PodStatus, Service, ServiceSpec,
    ServiceStatus,
};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::api::networking::v1::{NetworkPolicy, ServiceCIDR};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

/// Annotations kept on namespaces and policies: ours (`netpol.dev/…`, e.g. the audit
/// switch); the rest (e.g. the `kubectl.kubernetes.io/last-applied-configuration` copy
/// of the object) is dropped. Pods keep none.
const KEPT_ANNOTATION_PREFIX: &str = "netpol.dev/";

/// Identity, labels, `netpol.dev/` annotations, the resource version and the creation
/// time.
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
        // Of two pods listing one address, the one created last holds it.
        creation_timestamp: meta.creation_timestamp.take(),
        ..ObjectMeta::default()
    };
}

/// metadata without annotations (nothing a pod object says about itself beyond its
/// labels decides anything: in particular no `netpol.dev/host-interface`, so no pod
/// chooses what the agent attaches to); spec.nodeName, spec.hostNetwork,
/// spec.containers[].{name,ports}, the native sidecars among spec.initContainers
/// (`restartPolicy: Always`: their ports are named ports too) with name, ports and
/// restartPolicy; status.phase, status.podIP, status.podIPs.
pub fn pod(pod: &mut Pod) {
    metadata(&mut pod.metadata);
    pod.metadata.annotations = None;
    pod.spec = pod.spec.take().map(|spec| {
        let sidecars: Vec<Container> = spec
            .init_containers
            .into_iter()
            .flatten()
            .filter(|c| c.restart_policy.as_deref() == Some("Always"))
            .map(|c| Container {
                name: c.name,
                ports: c.ports,
                restart_policy: c.restart_policy,
                ..Container::default()
            })
            .collect();
        PodSpec {
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
            init_containers: (!sidecars.is_empty()).then_some(sidecars),
            ..PodSpec::default()
        }
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

/// metadata; spec.{clusterIP(s), externalIPs, ports, selector, type}; the load
/// balancer's ingress addresses.
pub fn service(service: &mut Service) {
    metadata(&mut service.metadata);
    service.spec = service.spec.take().map(|spec| ServiceSpec {
        cluster_ip: spec.cluster_ip,
        cluster_ips: spec.cluster_ips,
        external_ips: spec.external_ips,
        ports: spec.ports,
        selector: spec.selector,
        type_: spec.type_,
        ..ServiceSpec::default()
    });
    service.status = service.status.take().map(|status| ServiceStatus {
        load_balancer: status.load_balancer,
        ..ServiceStatus::default()
    });
}

/// metadata (the service-name label), address type, ports and endpoints as they are.
pub fn endpoint_slice(slice: &mut EndpointSlice) {
    metadata(&mut slice.metadata);
}

/// metadata and spec.cidrs.
pub fn service_cidr(cidr: &mut ServiceCIDR) {
    metadata(&mut cidr.metadata);
    cidr.status = None;
}

/// A ClusterNetworkPolicy keeps its metadata's essentials and its `spec`, which the
/// compiler reads (and checks) as it is; `status` goes. Its apiVersion and kind are set
/// (list items come without them), so the object reads whole.
pub fn cluster_policy(policy: &mut ::kube::api::DynamicObject) {
    metadata(&mut policy.metadata);
    if let Some(data) = policy.data.as_object_mut() {
        data.retain(|field, _| field == "spec");
    }
    policy.types = Some(::kube::api::TypeMeta {
        api_version: netpol_compile::cnp::API_VERSION.into(),
        kind: netpol_compile::cnp::KIND.into(),
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pods_keep_exactly_what_the_compiler_reads_and_no_annotation() {
        let mut object: Pod = serde_json::from_value(serde_json::json!({
            "metadata": {
                "name": "a", "namespace": "x", "labels": {"app": "web"}, "resourceVersion": "7",
                "creationTimestamp": "2025-01-02T03:04:05Z", "generateName": "a-",
                "annotations": {"netpol.dev/host-interface": "veth1", "kubectl.kubernetes.io/last-applied-configuration": "{}"},
                "managedFields": [{"manager": "kubectl"}],
            },
            "spec": {
                "nodeName": "n1", "hostNetwork": false, "serviceAccountName": "sa",
                "containers": [{"name": "c", "image": "nginx", "ports": [{"name": "http", "containerPort": 80}]}],
                "initContainers": [
                    {"name": "setup", "image": "busybox", "ports": [{"name": "setup", "containerPort": 81}]},
                    {"name": "proxy", "image": "envoy", "restartPolicy": "Always",
                     "ports": [{"name": "proxy", "containerPort": 15001}]},
                ],
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
                    "creationTimestamp": "2025-01-02T03:04:05Z",
                },
                "spec": {
                    "nodeName": "n1", "hostNetwork": false,
                    "containers": [{"name": "c", "ports": [{"name": "http", "containerPort": 80}]}],
                    "initContainers": [{"name": "proxy", "restartPolicy": "Always",
                        "ports": [{"name": "proxy", "containerPort": 15001}]}],
                },
                "status": {"phase": "Running", "podIP": "10.0.0.1", "podIPs": [{"ip": "10.0.0.1"}]},
            })
        );
    }
}
