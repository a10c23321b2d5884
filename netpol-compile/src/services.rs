//! Services as the datapath and the operators' tools need them.
//!
//! - [`frontends`]: what a pod can dial that kube-proxy translates after `from_pod` —
//!   Service addresses (ClusterIPs of every family, externalIPs, load-balancer ingress
//!   IPs), Service ranges (ServiceCIDR objects and the agent's `--service-cidr`), and the
//!   ports kube-proxy translates on the node's own addresses (NodePorts, and the ports of
//!   an externalIP that is a node address). The compiler flags the addresses and ranges
//!   in IPCACHE and writes the ports to NODE_PORTS.
//! - [`ServiceIndex`]: a frontend `(address, port, protocol)` → its Service, and a
//!   Service port → its backends (from the EndpointSlices, or the Service's selector
//!   when it has none), for the flow log and `explain`.
//!
//! An address that does not parse is reported naming the object and field, and only that
//! address is left out.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use ipnet::IpNet;
use k8s_openapi::api::core::v1::{Service, ServicePort as KubeServicePort};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use netpol_common::{PROTO_SCTP, PROTO_TCP, PROTO_UDP, ServicePort};

use crate::diagnostics::{Diagnostic, Kind, ObjectName, Subject};
use crate::state::{ClusterState, ObjectRef, PodInfo, is_terminal, pod_ips};

/// What kube-proxy translates, as the datapath needs it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Frontends {
    /// Service addresses that are not node addresses.
    pub addresses: BTreeSet<IpAddr>,
    /// Service ranges.
    pub ranges: BTreeSet<IpNet>,
    /// Ports translated on node addresses.
    pub node_ports: BTreeSet<ServicePort>,
}

/// The protocol number of a Service port (`TCP` when absent, as the API server
/// defaults it), or `None` for a protocol kube-proxy does not translate.
pub fn protocol_number(protocol: Option<&str>) -> Option<u8> {
    match protocol.unwrap_or("TCP") {
        "TCP" => Some(PROTO_TCP),
        "UDP" => Some(PROTO_UDP),
        "SCTP" => Some(PROTO_SCTP),
        _ => None,
    }
}

fn subject(kind: &str, name: ObjectName) -> Subject {
    Subject::Object {
        kind: Kind::of(kind),
        name,
    }
}

/// The frontend addresses of one Service, each with the field it came from; addresses
/// that do not parse are reported.
fn service_addresses(
    key: &ObjectRef,
    service: &Service,
    diagnostics: &mut Vec<Diagnostic>,
) -> Vec<IpAddr> {
    let mut out = Vec::new();
    let mut take = |field: String, text: &str| {
        if text.is_empty() || text == "None" {
            return;
        }
        match text.parse::<IpAddr>() {
            Ok(ip) => out.push(ip),
            Err(_) => diagnostics.push(Diagnostic::new(
                subject("Service", ObjectName::Namespaced(key.clone())),
                field,
                format!("{text:?} is not an IP address"),
            )),
        }
    };
    if let Some(spec) = &service.spec {
        match &spec.cluster_ips {
            Some(ips) if !ips.is_empty() => {
                for (i, ip) in ips.iter().enumerate() {
                    take(format!("spec.clusterIPs[{i}]"), ip);
                }
            }
            _ => {
                if let Some(ip) = &spec.cluster_ip {
                    take("spec.clusterIP".into(), ip);
                }
            }
        }
        for (i, ip) in spec.external_ips.iter().flatten().enumerate() {
            take(format!("spec.externalIPs[{i}]"), ip);
        }
    }
    let ingress = service
        .status
        .as_ref()
        .and_then(|s| s.load_balancer.as_ref())
        .and_then(|lb| lb.ingress.as_ref());
    for (i, entry) in ingress.into_iter().flatten().enumerate() {
        if let Some(ip) = &entry.ip {
            take(format!("status.loadBalancer.ingress[{i}].ip"), ip);
        }
    }
    out.sort();
    out.dedup();
    out
}

/// The Service ports of `service` kube-proxy translates: (index, port, protocol number).
fn ports(service: &Service) -> impl Iterator<Item = (usize, &KubeServicePort, u8)> {
    service
        .spec
        .iter()
        .flat_map(|spec| spec.ports.iter().flatten())
        .enumerate()
        .filter_map(|(i, port)| Some((i, port, protocol_number(port.protocol.as_deref())?)))
}

/// Every frontend of the cluster (see the module documentation).
pub fn frontends(state: &ClusterState, diagnostics: &mut Vec<Diagnostic>) -> Frontends {
    let mut out = Frontends::default();
    let node_ips: BTreeSet<IpAddr> = state.node.ips.iter().copied().collect();
    for (key, service) in &state.services {
        for ip in service_addresses(key, service, diagnostics) {
            if node_ips.contains(&ip) {
                // kube-proxy translates only the Service's ports on it: the rest of the
                // node's traffic stays the node's.
                out.node_ports
                    .extend(ports(service).filter_map(|(_, port, protocol)| {
                        Some(ServicePort {
                            port: u16::try_from(port.port).ok()?,
                            protocol,
                            _pad: 0,
                        })
                    }));
            } else {
                out.addresses.insert(ip);
            }
        }
        for (_, port, protocol) in ports(service) {
            if let Some(node_port) = port.node_port.and_then(|p| u16::try_from(p).ok())
                && node_port != 0
            {
                out.node_ports.insert(ServicePort {
                    port: node_port,
                    protocol,
                    _pad: 0,
                });
            }
        }
    }
    for (name, cidr) in &state.service_cidrs {
        let cidrs = cidr.spec.as_ref().and_then(|s| s.cidrs.as_ref());
        for (i, text) in cidrs.into_iter().flatten().enumerate() {
            match text.parse::<IpNet>() {
                Ok(net) => {
                    out.ranges.insert(net.trunc());
                }
                Err(_) => diagnostics.push(Diagnostic::new(
                    subject("ServiceCIDR", ObjectName::Cluster(name.clone())),
                    format!("spec.cidrs[{i}]"),
                    format!("{text:?} is not a CIDR"),
                )),
            }
        }
    }
    out.ranges
        .extend(state.configured_service_cidrs.iter().map(IpNet::trunc));
    out
}

/// A backend of a Service port.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Backend {
    pub ip: IpAddr,
    /// The pod behind it, when the EndpointSlice (or the selector) names one.
    pub pod: Option<ObjectRef>,
    /// The port kube-proxy translates to (the target port on this backend).
    pub port: u16,
}

/// A Service port as a frontend: which Service, which of its ports.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Frontend {
    pub service: ObjectRef,
    /// The Service port's name (`""` when unnamed).
    pub port_name: String,
    pub protocol: u8,
}

/// Services by frontend, and their backends (see the module documentation).
#[derive(Clone, Debug, Default)]
pub struct ServiceIndex {
    frontends: BTreeMap<(IpAddr, u16, u8), Frontend>,
    backends: BTreeMap<(ObjectRef, String, u8), Vec<Backend>>,
}

impl ServiceIndex {
    pub fn new(state: &ClusterState) -> ServiceIndex {
        let mut index = ServiceIndex::default();
        let mut ignored = Vec::new();
        for (key, service) in &state.services {
            let addresses = service_addresses(key, service, &mut ignored);
            for (_, port, protocol) in ports(service) {
                let name = port.name.clone().unwrap_or_default();
                let frontend = Frontend {
                    service: key.clone(),
                    port_name: name.clone(),
                    protocol,
                };
                if let Ok(number) = u16::try_from(port.port) {
                    for &ip in &addresses {
                        index
                            .frontends
                            .insert((ip, number, protocol), frontend.clone());
                    }
                }
                if let Some(node_port) = port.node_port.and_then(|p| u16::try_from(p).ok()) {
                    for &ip in &state.node.ips {
                        index
                            .frontends
                            .insert((ip, node_port, protocol), frontend.clone());
                    }
                }
                let backends = backends(state, key, service, port, protocol);
                index
                    .backends
                    .insert((key.clone(), name, protocol), backends);
            }
        }
        index
    }

    /// The Service port a pod dials at `ip:port`.
    pub fn frontend(&self, ip: IpAddr, port: u16, protocol: u8) -> Option<&Frontend> {
        self.frontends.get(&(ip, port, protocol))
    }

    /// Every frontend, for tools that list them.
    pub fn frontends(&self) -> impl Iterator<Item = ((IpAddr, u16, u8), &Frontend)> {
        self.frontends.iter().map(|(k, v)| (*k, v))
    }

    /// The backends of a Service port (by the port's name and protocol).
    pub fn backends(&self, service: &ObjectRef, port_name: &str, protocol: u8) -> &[Backend] {
        self.backends
            .get(&(service.clone(), port_name.to_owned(), protocol))
            .map_or(&[], Vec::as_slice)
    }

    /// The Service ports of `service`: (name, protocol).
    pub fn ports_of<'a>(
        &'a self,
        service: &'a ObjectRef,
    ) -> impl Iterator<Item = (&'a str, u8)> + 'a {
        self.backends
            .keys()
            .filter(move |(s, _, _)| s == service)
            .map(|(_, name, protocol)| (name.as_str(), *protocol))
    }
}

/// The EndpointSlices of `service` (label `kubernetes.io/service-name`).
const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

fn backends(
    state: &ClusterState,
    key: &ObjectRef,
    service: &Service,
    port: &KubeServicePort,
    protocol: u8,
) -> Vec<Backend> {
    let name = port.name.clone().unwrap_or_default();
    let mut out = Vec::new();
    let mut any_slice = false;
    for (slice_key, slice) in &state.endpoint_slices {
        let owned = slice_key.namespace == key.namespace
            && slice
                .metadata
                .labels
                .as_ref()
                .and_then(|l| l.get(SERVICE_NAME_LABEL))
                .is_some_and(|name| *name == key.name);
        if !owned {
            continue;
        }
        any_slice = true;
        let target = slice.ports.iter().flatten().find(|p| {
            p.name.clone().unwrap_or_default() == name
                && protocol_number(p.protocol.as_deref()) == Some(protocol)
        });
        let Some(target) = target
            .and_then(|p| p.port)
            .and_then(|p| u16::try_from(p).ok())
        else {
            continue;
        };
        for endpoint in slice.endpoints.iter().flatten() {
            if endpoint.conditions.as_ref().and_then(|c| c.ready) == Some(false) {
                continue;
            }
            let pod = endpoint
                .target_ref
                .as_ref()
                .filter(|r| r.kind.as_deref() == Some("Pod"))
                .and_then(|r| {
                    Some(ObjectRef::new(
                        r.namespace
                            .clone()
                            .unwrap_or_else(|| key.namespace.to_string()),
                        r.name.clone()?,
                    ))
                });
            for address in &endpoint.addresses {
                if let Ok(ip) = address.parse() {
                    out.push(Backend {
                        ip,
                        pod: pod.clone(),
                        port: target,
                    });
                }
            }
        }
    }
    if !any_slice {
        out = selected_backends(state, key, service, port, protocol);
    }
    out.sort();
    out.dedup();
    out
}

/// Without EndpointSlices: the pods the Service's selector picks in its namespace, with
/// the target port resolved on each (a named `targetPort` by the pod's container ports).
fn selected_backends(
    state: &ClusterState,
    key: &ObjectRef,
    service: &Service,
    port: &KubeServicePort,
    protocol: u8,
) -> Vec<Backend> {
    let Some(selector) = service.spec.as_ref().and_then(|s| s.selector.as_ref()) else {
        return Vec::new();
    };
    if selector.is_empty() {
        return Vec::new();
    }
    let mut out = Vec::new();
    for (pod_key, pod) in state
        .pods
        .range(ObjectRef::new(key.namespace.clone(), "")..)
    {
        if pod_key.namespace != key.namespace {
            break;
        }
        // A finished pod serves nothing (the endpoints controller leaves it out too).
        if is_terminal(pod) {
            continue;
        }
        let labels = pod.labels();
        let selected = selector.iter().all(|(k, v)| labels.get(k) == Some(v));
        if !selected {
            continue;
        }
        let Some(target) = target_port(pod, port, protocol) else {
            continue;
        };
        for ip in pod_ips(pod) {
            out.push(Backend {
                ip,
                pod: Some(pod_key.clone()),
                port: target,
            });
        }
    }
    out
}

/// The port a Service port translates to on `pod`: `targetPort` as a number, or the
/// port of that name and protocol of its containers or native sidecars
/// ([`PodInfo::ports`]); the Service port when absent.
pub fn target_port(pod: &PodInfo, port: &KubeServicePort, protocol: u8) -> Option<u16> {
    match &port.target_port {
        None => u16::try_from(port.port).ok(),
        Some(IntOrString::Int(n)) => u16::try_from(*n).ok(),
        Some(IntOrString::String(name)) => pod
            .ports()
            .iter()
            .find(|p| {
                p.name.as_deref() == Some(name.as_str())
                    && protocol_number(p.protocol.as_deref()) == Some(protocol)
            })
            .and_then(|p| u16::try_from(p.container_port).ok()),
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::testutil::{Cluster, ip};

    fn cluster() -> Cluster {
        let mut c = Cluster::new()
            .ns("db", &[])
            .pod("db", "a", &[("app", "db")], &["10.0.0.1"], &[])
            .pod("db", "b", &[("app", "db")], &["10.0.0.2"], &[])
            .node_ips(&["10.99.0.1"])
            .service(
                "db",
                "db",
                json!({"clusterIP": "10.96.0.10", "selector": {"app": "db"},
                    "ports": [{"name": "sql", "port": 15432, "targetPort": "sql", "nodePort": 30432}]}),
                json!({}),
            );
        // b names its port `sql` 5433; a has no such port (kube-proxy skips it).
        let b = c.state.pods.get_mut(&ObjectRef::new("db", "b")).unwrap();
        b.set_ports(vec![crate::state::DeclaredPort::new(
            Some("sql"),
            5433,
            None,
        )]);
        c
    }

    #[test]
    fn a_frontend_names_its_service_port_on_the_clusterip_and_the_node_port() {
        let index = ServiceIndex::new(&cluster().state);
        let on_ip = index.frontend(ip("10.96.0.10"), 15432, PROTO_TCP).unwrap();
        assert_eq!(on_ip.service, ObjectRef::new("db", "db"));
        assert_eq!(on_ip.port_name, "sql");
        assert!(index.frontend(ip("10.99.0.1"), 30432, PROTO_TCP).is_some());
        assert!(index.frontend(ip("10.96.0.10"), 15432, PROTO_UDP).is_none());
    }

    #[test]
    fn without_slices_the_selector_picks_backends_and_resolves_a_named_target_port() {
        let index = ServiceIndex::new(&cluster().state);
        let backends = index.backends(&ObjectRef::new("db", "db"), "sql", PROTO_TCP);
        assert_eq!(
            backends,
            [Backend {
                ip: ip("10.0.0.2"),
                pod: Some(ObjectRef::new("db", "b")),
                port: 5433,
            }]
        );
    }

    #[test]
    fn a_named_target_port_resolves_on_native_sidecars_and_finished_pods_are_no_backends() {
        use crate::testutil::with_init_container;
        let mut c = cluster();
        // a serves `sql` from a native sidecar only; b has finished.
        let a = crate::testutil::pod("db", "a", &[("app", "db")], &["10.0.0.1"], &[]);
        let a = with_init_container(a, true, &[("sql", 5434, "TCP")]);
        c.state.pods.insert(ObjectRef::new("db", "a"), a.into());
        let b = c.state.pods.get_mut(&ObjectRef::new("db", "b")).unwrap();
        b.set_phase(Some("Succeeded"));
        let index = ServiceIndex::new(&c.state);
        let backends = index.backends(&ObjectRef::new("db", "db"), "sql", PROTO_TCP);
        assert_eq!(
            backends,
            [Backend {
                ip: ip("10.0.0.1"),
                pod: Some(ObjectRef::new("db", "a")),
                port: 5434,
            }]
        );
    }

    #[test]
    fn endpoint_slices_decide_the_backends_when_there_are_any() {
        let mut c = cluster();
        let slice = serde_json::from_value(json!({
            "metadata": {"namespace": "db", "name": "db-1", "labels": {"kubernetes.io/service-name": "db"}},
            "addressType": "IPv4",
            "ports": [{"name": "sql", "port": 6000, "protocol": "TCP"}],
            "endpoints": [
                {"addresses": ["10.0.0.1"], "targetRef": {"kind": "Pod", "namespace": "db", "name": "a"}},
                {"addresses": ["192.0.2.1"]},
                {"addresses": ["10.0.0.9"], "conditions": {"ready": false}},
            ],
        }))
        .unwrap();
        c.state
            .endpoint_slices
            .insert(ObjectRef::new("db", "db-1"), slice);
        let index = ServiceIndex::new(&c.state);
        let backends = index.backends(&ObjectRef::new("db", "db"), "sql", PROTO_TCP);
        assert_eq!(
            backends,
            [
                Backend {
                    ip: ip("10.0.0.1"),
                    pod: Some(ObjectRef::new("db", "a")),
                    port: 6000,
                },
                Backend {
                    ip: ip("192.0.2.1"),
                    pod: None,
                    port: 6000,
                },
            ]
        );
    }
}
