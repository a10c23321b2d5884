//! The agent's local-mode manifest directory (README.md ("Using the agent")): Namespace and Pod
//! objects describing the lab, NetworkPolicies given as YAML, and the `.generation`
//! counter written last.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use crate::error::{Context, Result};
use serde_json::{Value, json};

use crate::lab::{Lab, Node, Pod};

/// Annotation naming a pod's host-side interface, which local mode's operator may set
/// (the lab's pod objects carry none by default: the agent finds interfaces from the
/// kernel; tests set it with [`Lab::set_pod_annotation`]).
pub const HOST_INTERFACE_ANNOTATION: &str = "netpol.dev/host-interface";

/// A manifest directory and its generation counter.
#[derive(Debug)]
pub struct ManifestDir {
    path: PathBuf,
    generation: u64,
}

impl ManifestDir {
    /// Creates (or reuses) the directory. Nothing is written until [`ManifestDir::write`].
    pub fn create(path: impl Into<PathBuf>) -> Result<Self> {
        let path = path.into();
        std::fs::create_dir_all(&path).with_context(|| format!("creating {}", path.display()))?;
        Ok(Self {
            path,
            generation: 0,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The last generation written (0: none yet).
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// Writes the lab's namespaces and pods (`cluster.yaml`) and the given policies
    /// (`policies.yaml`, verbatim; blank means none), then bumps `.generation`.
    /// Returns the new generation; wait for it with
    /// [`AgentProcess::wait_generation`](crate::AgentProcess::wait_generation).
    pub fn write(&mut self, lab: &Lab, policies_yaml: &str) -> Result<u64> {
        write_atomic(&self.path.join("cluster.yaml"), &cluster_yaml(lab)?)?;
        let policies = self.path.join("policies.yaml");
        if policies_yaml.trim().is_empty() {
            if policies.exists() {
                std::fs::remove_file(&policies)
                    .with_context(|| format!("removing {}", policies.display()))?;
            }
        } else {
            write_atomic(&policies, policies_yaml)?;
        }
        self.generation += 1;
        write_atomic(
            &self.path.join(".generation"),
            &format!("{}\n", self.generation),
        )?;
        Ok(self.generation)
    }
}

/// Writes through a hidden temporary file (which the agent ignores) and a rename.
fn write_atomic(path: &Path, contents: &str) -> Result<()> {
    let name = path.file_name().expect("a file path").to_string_lossy();
    let tmp = path.with_file_name(format!(".{}.tmp", name.trim_start_matches('.')));
    std::fs::write(&tmp, contents).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("renaming to {}", path.display()))
}

/// All Namespace and Pod objects of the lab as one multi-document YAML string.
fn cluster_yaml(lab: &Lab) -> Result<String> {
    let mut out = String::new();
    for doc in cluster_objects(lab) {
        out.push_str("---\n");
        out.push_str(&serde_norway::to_string(&doc).context("rendering YAML")?);
    }
    Ok(out)
}

/// The lab's Nodes, Namespaces, Pods and Service objects ([`service_objects`]) as the
/// API server has them (what `cluster.yaml` holds).
pub fn cluster_objects(lab: &Lab) -> Vec<Value> {
    let mut docs: Vec<Value> = lab
        .namespaces()
        .iter()
        .map(|(name, labels)| {
            let mut labels = labels.clone();
            labels.insert("kubernetes.io/metadata.name".into(), name.clone());
            json!({
                "apiVersion": "v1",
                "kind": "Namespace",
                "metadata": {"name": name, "labels": labels},
            })
        })
        .collect();
    docs.extend(lab.nodes().iter().map(node_object));
    docs.extend(
        lab.pods()
            .iter()
            .map(|pod| pod_object(pod, &lab.nodes()[pod.node].name)),
    );
    docs.extend(service_objects(lab));
    docs
}

/// A port of an EndpointSlice: (name, target port, protocol).
type SlicePort = (Option<String>, u16, &'static str);

/// The lab's Services as the API server has them: its ServiceCIDR, and for each Service
/// the Service (both ClusterIPs) and an
/// EndpointSlice per family, as the EndpointSlice controller writes them (endpoints
/// with their pod and node, ports with the target port resolved per endpoint).
pub fn service_objects(lab: &Lab) -> Vec<Value> {
    let frontends = lab.service_frontends();
    let mut out = Vec::new();
    if !lab.services().is_empty() {
        let (v4, v4_len) = crate::lab::services::SERVICE_RANGE_V4;
        let (v6, v6_len) = crate::lab::services::SERVICE_RANGE_V6;
        let mut cidrs = Vec::new();
        if lab.stack() != crate::Stack::Ipv6 {
            cidrs.push(format!("{v4}/{v4_len}"));
        }
        cidrs.push(format!("{v6}/{v6_len}"));
        out.push(json!({
            "apiVersion": "networking.k8s.io/v1",
            "kind": "ServiceCIDR",
            "metadata": {"name": "kubernetes"},
            "spec": {"cidrs": cidrs},
        }));
    }
    for service in lab.services() {
        let spec = &service.spec;
        let ports: Vec<Value> = spec
            .ports
            .iter()
            .map(|p| {
                let mut port = json!({"port": p.port, "protocol": p.protocol.k8s()});
                if let Some(name) = &p.name {
                    port["name"] = json!(name);
                }
                port["targetPort"] = match &p.target {
                    crate::lab::services::TargetPort::Number(n) => json!(n),
                    crate::lab::services::TargetPort::Name(name) => json!(name),
                };
                port
            })
            .collect();
        let cluster_ips: Vec<IpAddr> = service
            .ipv4
            .map(IpAddr::V4)
            .into_iter()
            .chain(service.ipv6.map(IpAddr::V6))
            .collect();
        let families: Vec<&str> = cluster_ips
            .iter()
            .map(|ip| if ip.is_ipv6() { "IPv6" } else { "IPv4" })
            .collect();
        let mut object = json!({
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"name": spec.name, "namespace": spec.namespace},
            "spec": {
                "type": "ClusterIP",
                "clusterIP": cluster_ips.first().map(ToString::to_string),
                "clusterIPs": cluster_ips.iter().map(ToString::to_string).collect::<Vec<_>>(),
                "ipFamilies": families,
                "ipFamilyPolicy": if cluster_ips.len() > 1 { "PreferDualStack" } else { "SingleStack" },
                "ports": ports,
            },
        });
        if spec.backends.is_none() {
            object["spec"]["selector"] = json!(spec.selector);
        }
        out.push(object);
        for (family, ipv6) in [("IPv4", false), ("IPv6", true)] {
            if !cluster_ips.iter().any(|ip| ip.is_ipv6() == ipv6) {
                continue;
            }
            // One slice per family and target port (a named port can differ per pod).
            let mut slices: BTreeMap<Vec<SlicePort>, Vec<Value>> = BTreeMap::new();
            let mut per_pod: BTreeMap<String, (IpAddr, Vec<SlicePort>)> = BTreeMap::new();
            for frontend in frontends
                .iter()
                .filter(|f| f.service == service.id() && f.cluster_ip.is_ipv6() == ipv6)
            {
                for endpoint in &frontend.endpoints {
                    per_pod
                        .entry(endpoint.pod.clone())
                        .or_insert_with(|| (endpoint.ip, Vec::new()))
                        .1
                        .push((
                            frontend.port.name.clone(),
                            endpoint.port,
                            frontend.port.protocol.k8s(),
                        ));
                }
            }
            for (pod_id, (ip, ports)) in per_pod {
                let pod = lab.pod(&pod_id).expect("an endpoint's pod exists");
                slices.entry(ports).or_default().push(json!({
                    "addresses": [ip.to_string()],
                    "conditions": {"ready": true},
                    "nodeName": lab.nodes()[pod.node].name,
                    "targetRef": {"kind": "Pod", "namespace": pod.namespace, "name": pod.name},
                }));
            }
            if slices.is_empty() {
                slices.insert(Vec::new(), Vec::new());
            }
            for (i, (ports, endpoints)) in slices.into_iter().enumerate() {
                let ports: Vec<Value> = ports
                    .into_iter()
                    .map(|(name, port, protocol)| {
                        json!({"name": name.unwrap_or_default(), "port": port, "protocol": protocol})
                    })
                    .collect();
                out.push(json!({
                    "apiVersion": "discovery.k8s.io/v1",
                    "kind": "EndpointSlice",
                    "metadata": {
                        "name": format!("{}-{}-{i}", spec.name, family.to_lowercase()),
                        "namespace": spec.namespace,
                        "labels": {"kubernetes.io/service-name": spec.name},
                    },
                    "addressType": family,
                    "endpoints": endpoints,
                    "ports": ports,
                }));
            }
        }
    }
    out
}

/// A Node as the kubelet registers it: its labels and its addresses (both families:
/// the node has both on its loopback whatever the pods' stack).
fn node_object(node: &Node) -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {"name": node.name, "labels": node.labels},
        "status": {"addresses": [
            {"type": "InternalIP", "address": node.ipv4.to_string()},
            {"type": "InternalIP", "address": node.ipv6.to_string()},
            {"type": "Hostname", "address": node.name},
        ]},
    })
}

fn pod_object(pod: &Pod, node_name: &str) -> Value {
    let ports: Vec<Value> = pod
        .ports
        .iter()
        .map(|p| {
            let mut port = json!({"containerPort": p.port, "protocol": p.protocol.k8s()});
            if let Some(name) = &p.name {
                port["name"] = json!(name);
            }
            port
        })
        .collect();
    let addresses = pod.addresses();
    let ips: Vec<Value> = addresses
        .iter()
        .map(|ip| json!({"ip": ip.to_string()}))
        .collect();
    let mut metadata = json!({
        "name": pod.name,
        "namespace": pod.namespace,
        "labels": pod.labels,
    });
    if !pod.annotations.is_empty() {
        metadata["annotations"] = json!(pod.annotations);
    }
    let mut spec = json!({
        "nodeName": node_name,
        "containers": [{"name": "server", "image": "netpol.dev/lab-server", "ports": ports}],
    });
    if pod.host_network {
        spec["hostNetwork"] = json!(true);
    }
    json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": metadata,
        "spec": spec,
        "status": {
            "phase": "Running",
            "podIP": addresses.first().map(ToString::to_string),
            "podIPs": ips,
        },
    })
}
