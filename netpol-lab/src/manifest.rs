//! The agent's local-mode manifest directory (README.md ("Using the agent")): Namespace and Pod
//! objects describing the lab, NetworkPolicies given as YAML, and the `.generation`
//! counter written last.

use std::path::{Path, PathBuf};

use crate::error::{Context, Result};
use serde_json::{Value, json};

use crate::lab::{Lab, Pod};

/// Annotation naming the pod's host-side veth in the node namespace.
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
    docs.extend(
        lab.pods()
            .iter()
            .map(|pod| pod_object(pod, &lab.nodes()[pod.node].name)),
    );
    let mut out = String::new();
    for doc in docs {
        out.push_str("---\n");
        out.push_str(&serde_norway::to_string(&doc).context("rendering YAML")?);
    }
    Ok(out)
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
    let mut ips = vec![json!({"ip": pod.ipv4.to_string()})];
    ips.extend(pod.ipv6.map(|ip| json!({"ip": ip.to_string()})));
    json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": pod.name,
            "namespace": pod.namespace,
            "labels": pod.labels,
            "annotations": {HOST_INTERFACE_ANNOTATION: pod.host_if},
        },
        "spec": {
            "nodeName": node_name,
            "containers": [{"name": "server", "image": "netpol.dev/lab-server", "ports": ports}],
        },
        "status": {
            "phase": "Running",
            "podIP": pod.ipv4.to_string(),
            "podIPs": ips,
        },
    })
}
