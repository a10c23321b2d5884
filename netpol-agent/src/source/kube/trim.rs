//! Trimming watched objects to what the compiler, the flow log and Events need, before
//! they enter the reflector stores: managed fields, the last-applied copy and status
//! decide no verdict. Pods, the bulk of a cluster, are not trimmed here: they are read
//! straight into their compact form ([`super::pod`]); NetworkPolicies are trimmed, then
//! kept as their text, and Namespaces as their labels ([`super::compact`]).

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{
    Namespace, Node, NodeStatus, Service, ServiceSpec, ServiceStatus,
};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::api::networking::v1::{NetworkPolicy, ServiceCIDR};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

/// Annotations kept on namespaces and policies: ours (`netpol.dev/…`, e.g. the audit
/// switch); the rest (e.g. the `kubectl.kubernetes.io/last-applied-configuration` copy
/// of the object) is dropped.
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
