//! Builders for cluster states in tests.

use std::net::IpAddr;

use k8s_openapi::api::core::v1::{Namespace, Pod};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use serde_json::{Value, json};

use crate::state::{ClusterState, ObjectRef};

/// A container port: (name, port, protocol).
pub type PortDef<'a> = (&'a str, u16, &'a str);

pub fn ip(s: &str) -> IpAddr {
    s.parse().expect("test IP")
}

pub fn labels(pairs: &[(&str, &str)]) -> Value {
    Value::Object(
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), Value::String(v.to_string())))
            .collect(),
    )
}

pub fn namespace(name: &str, label_pairs: &[(&str, &str)]) -> Namespace {
    serde_json::from_value(json!({"metadata": {"name": name, "labels": labels(label_pairs)}}))
        .expect("namespace")
}

/// A running pod with `ips` and named container ports.
pub fn pod(
    ns: &str,
    name: &str,
    label_pairs: &[(&str, &str)],
    ips: &[&str],
    ports: &[PortDef<'_>],
) -> Pod {
    let ports: Vec<Value> = ports
        .iter()
        .map(|(n, p, proto)| json!({"name": n, "containerPort": p, "protocol": proto}))
        .collect();
    let pod_ips: Vec<Value> = ips.iter().map(|ip| json!({"ip": ip})).collect();
    let mut status = json!({"phase": "Running", "podIPs": pod_ips});
    if let Some(first) = ips.first() {
        status["podIP"] = json!(first);
    }
    serde_json::from_value(json!({
        "metadata": {"namespace": ns, "name": name, "labels": labels(label_pairs)},
        "spec": {"containers": [{"name": "main", "ports": ports}]},
        "status": status,
    }))
    .expect("pod")
}

/// `pod` with one more init container declaring `ports`: a native sidecar
/// (`restartPolicy: Always`) when `sidecar`, else one that runs to completion first.
pub fn with_init_container(mut pod: Pod, sidecar: bool, ports: &[PortDef<'_>]) -> Pod {
    let ports: Vec<Value> = ports
        .iter()
        .map(|(n, p, proto)| json!({"name": n, "containerPort": p, "protocol": proto}))
        .collect();
    let spec = pod.spec.as_mut().expect("a test pod has a spec");
    let init = spec.init_containers.get_or_insert_default();
    let mut container = json!({"name": format!("init{}", init.len()), "ports": ports});
    if sidecar {
        container["restartPolicy"] = json!("Always");
    }
    init.push(serde_json::from_value(container).expect("container"));
    pod
}

/// `pod` in `phase`, created at `created` (RFC 3339), when given.
pub fn with_phase(mut pod: Pod, phase: &str, created: Option<&str>) -> Pod {
    pod.status.as_mut().expect("a test pod has a status").phase = Some(phase.into());
    pod.metadata.creation_timestamp =
        created.map(|t| serde_json::from_value(json!(t)).expect("an RFC 3339 time"));
    pod
}

pub fn policy(ns: &str, name: &str, spec: Value) -> NetworkPolicy {
    serde_json::from_value(json!({"metadata": {"namespace": ns, "name": name}, "spec": spec}))
        .expect("policy")
}

/// Sets `netpol.dev/staged` on `policy` to `value` (`"true"` stages it).
pub fn set_staged(policy: &mut crate::state::Policy, value: &str) {
    let mut object = policy.object();
    object
        .metadata
        .annotations
        .get_or_insert_default()
        .insert(crate::state::STAGED_ANNOTATION.into(), value.into());
    *policy = object.into();
}

/// A state builder.
#[derive(Default)]
pub struct Cluster {
    pub state: ClusterState,
}

impl Cluster {
    pub fn new() -> Self {
        Cluster::default()
    }

    pub fn ns(mut self, name: &str, label_pairs: &[(&str, &str)]) -> Self {
        self.state
            .namespaces
            .insert(name.into(), namespace(name, label_pairs).into());
        self
    }

    pub fn pod(
        mut self,
        ns: &str,
        name: &str,
        label_pairs: &[(&str, &str)],
        ips: &[&str],
        ports: &[PortDef<'_>],
    ) -> Self {
        self.state.pods.insert(
            ObjectRef::new(ns, name),
            pod(ns, name, label_pairs, ips, ports).into(),
        );
        self
    }

    pub fn raw_pod(mut self, pod: Pod) -> Self {
        let obj = ObjectRef::new(
            pod.metadata.namespace.clone().unwrap_or_default(),
            pod.metadata.name.clone().unwrap_or_default(),
        );
        self.state.pods.insert(obj, pod.into());
        self
    }

    pub fn policy(mut self, ns: &str, name: &str, spec: Value) -> Self {
        self.state
            .policies
            .insert(ObjectRef::new(ns, name), policy(ns, name, spec).into());
        self
    }

    /// Sets `netpol.dev/staged` on the policy `ns/name` ([`set_staged`]).
    pub fn staged(mut self, ns: &str, name: &str, value: &str) -> Self {
        let policy = self.state.policies.get_mut(&ObjectRef::new(ns, name));
        set_staged(policy.expect("a policy of the cluster"), value);
        self
    }

    /// A Service from its JSON `spec` (and `status`, when given).
    pub fn service(mut self, ns: &str, name: &str, spec: Value, status: Value) -> Self {
        let service = serde_json::from_value(
            json!({"metadata": {"namespace": ns, "name": name}, "spec": spec, "status": status}),
        )
        .expect("service");
        self.state
            .services
            .insert(ObjectRef::new(ns, name), service);
        self
    }

    /// A ServiceCIDR with these ranges.
    pub fn service_cidr(mut self, name: &str, cidrs: &[&str]) -> Self {
        let cidr =
            serde_json::from_value(json!({"metadata": {"name": name}, "spec": {"cidrs": cidrs}}))
                .expect("servicecidr");
        self.state.service_cidrs.insert(name.to_owned(), cidr);
        self
    }

    pub fn node_ips(mut self, ips: &[&str]) -> Self {
        self.state.node.ips = ips.iter().map(|s| ip(s)).collect();
        self
    }

    pub fn node_name(mut self, name: &str) -> Self {
        self.state.node.name = Some(name.into());
        self
    }
}
