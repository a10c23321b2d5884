//! `kubectl netpol explain --kernel`: what the kernels of the nodes a connection
//! crosses hold for it, beside what the cluster says. For each hook of the explanation
//! (the source pod's egress, the destination pod's ingress), `netpol-agent inspect` runs
//! in the agent's container on that pod's node (over `pods/exec`) and reads the pinned
//! maps; a hook where the kernel decides otherwise than the cluster is said, with what
//! explains it: a change the agent has not applied, a pod or policy the agent refused
//! (its status file lists them), a full map (entries against capacity), a live or
//! revoked conntrack entry.

use std::collections::BTreeMap;
use std::net::IpAddr;

use netpol_compile::state::ObjectRef;
use serde::{Deserialize, Serialize};

use super::PreviewError;
use super::cluster::{ClusterRead, Connection};
use super::explain::{Explanation, HookExplanation};
use super::flows::Agents;
use crate::telemetry::inspect::{KernelConnection, KernelHook, KernelView};

/// `netpol-agent inspect`'s output.
#[derive(Clone, Debug, Deserialize)]
struct Inspected {
    kernel: KernelView,
    status: Option<serde_json::Value>,
}

/// One hook as its node's kernel holds it.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct KernelCheck {
    /// `ingress` or `egress`.
    pub direction: String,
    /// `ns/name` of the pod whose hook it is.
    pub pod: String,
    pub node: Option<String>,
    /// `ns/name` of the agent pod asked.
    pub agent: Option<String>,
    /// What the cluster's objects say (the explanation's verdict at this hook).
    pub cluster_allowed: bool,
    /// What the kernel would do with a new connection; `None` when it could not be read.
    pub kernel: Option<KernelHook>,
    /// The agent's status file: what it has applied.
    pub status: Option<serde_json::Value>,
    /// The kernel's policy generation.
    pub generation: Option<u32>,
    pub conntrack: Vec<KernelConnection>,
    /// Whether the kernel agrees with the cluster (`None`: not known).
    pub agrees: Option<bool>,
    /// What explains a disagreement, or why the kernel could not be read.
    pub findings: Vec<String>,
}

/// The highest resourceVersion the explanation was computed from.
fn cluster_version(read: &ClusterRead) -> Option<u64> {
    read.lists
        .iter()
        .filter_map(|l| l.resource_version.as_deref()?.parse().ok())
        .max()
}

/// Asks the kernels of the nodes the hooks of `explanation` are on; `nodes` is the node
/// of each pod (what the explanation was computed from says).
pub async fn check(
    connection: &Connection,
    agents: &Agents,
    explanation: &Explanation,
    nodes: &BTreeMap<ObjectRef, String>,
    read: &ClusterRead,
) -> Result<Vec<KernelCheck>, PreviewError> {
    let pods = agents.pods(&connection.client).await?;
    let mut checks = Vec::new();
    for hook in &explanation.hooks {
        let node = nodes.get(&hook.pod).cloned();
        checks.push(check_hook(connection, agents, &pods, explanation, hook, node, read).await);
    }
    Ok(checks)
}

async fn check_hook(
    connection: &Connection,
    agents: &Agents,
    pods: &[(String, String)],
    explanation: &Explanation,
    hook: &HookExplanation,
    node: Option<String>,
    read: &ClusterRead,
) -> KernelCheck {
    let mut check = KernelCheck {
        direction: hook.direction.field().to_owned(),
        pod: hook.pod.to_string(),
        node,
        agent: None,
        cluster_allowed: hook.allowed(),
        kernel: None,
        status: None,
        generation: None,
        conntrack: Vec::new(),
        agrees: None,
        findings: Vec::new(),
    };
    let Some(node) = check.node.clone() else {
        check
            .findings
            .push("the pod has no node yet: no kernel holds it".into());
        return check;
    };
    let Some((_, agent)) = pods.iter().find(|(on, _)| *on == node) else {
        check.findings.push(format!(
            "no agent pod on node {node} (namespace {}, selector {})",
            agents.namespace, agents.selector
        ));
        return check;
    };
    check.agent = Some(agents.name(agent));
    let command = inspect_command(explanation.src.ip(), explanation.dst.ip(), explanation);
    let inspected = match agents.run(&connection.client, agent, command).await {
        Ok(out) => serde_json::from_str::<Inspected>(&out)
            .map_err(|error| format!("its answer cannot be read: {error}")),
        Err(error) => Err(error),
    };
    let inspected = match inspected {
        Ok(inspected) => inspected,
        Err(error) => {
            check.findings.push(format!(
                "the agent {} cannot be read: {error}",
                agents.name(agent)
            ));
            return check;
        }
    };
    let full_maps: Vec<String> = inspected
        .kernel
        .full_maps()
        .into_iter()
        .map(|(name, capacity)| format!("{name} is full ({capacity} of {capacity} entries)"))
        .collect();
    let kernel = inspected
        .kernel
        .hooks
        .into_iter()
        .find(|h| h.direction == check.direction);
    check.generation = Some(inspected.kernel.generation);
    check.conntrack = inspected.kernel.conntrack;
    check.status = inspected.status;
    // The agent's own account of what it could not program for this pod.
    let refused: Vec<String> = check
        .status
        .as_ref()
        .and_then(|s| s["refused"].as_array())
        .into_iter()
        .flatten()
        .filter_map(|line| line.as_str())
        .filter(|line| line.starts_with(&format!("Pod {}:", hook.pod)))
        .map(|line| format!("refused by the agent: {line}"))
        .collect();
    if let Some(kernel) = &kernel {
        let agrees = kernel.allowed == check.cluster_allowed && kernel.endpoint;
        check.agrees = Some(agrees);
        if !kernel.endpoint {
            check.findings.push(
                "the pod is not in this node's ENDPOINTS: not programmed on this node".into(),
            );
        }
        if !agrees || !kernel.endpoint {
            check.findings.extend(refused);
            check.findings.extend(full_maps);
        }
        if !agrees {
            let applied = check.status.as_ref().and_then(|s| s["generation"].as_u64());
            match (applied, cluster_version(read)) {
                (Some(applied), Some(cluster)) if applied < cluster => {
                    check.findings.push(format!(
                        "the agent has applied resourceVersion {applied}, the cluster is at \
                         {cluster}: a change not in the kernel yet"
                    ));
                }
                _ => {}
            }
            if let Some(pending) = check
                .status
                .as_ref()
                .and_then(|s| s["pending"].as_u64())
                .filter(|n| *n > 0)
            {
                check
                    .findings
                    .push(format!("{pending} pod interfaces wait to be programmed"));
            }
        }
    }
    for ct in &check.conntrack {
        let ends = format!(
            "{}:{} <-> {}:{}",
            ct.local, ct.local_port, ct.remote, ct.remote_port
        );
        if ct.revoked {
            check.findings.push(format!(
                "conntrack {ends}: revoked, its packets are dropped until it idles out"
            ));
        } else if !check.cluster_allowed {
            check.findings.push(format!(
                "conntrack {ends}: a live connection the cluster no longer allows (judged \
                 again at its next packet)"
            ));
        }
    }
    check.kernel = kernel;
    check
}

/// `netpol-agent inspect SRC DST PORT/PROTO`.
fn inspect_command(src: IpAddr, dst: IpAddr, explanation: &Explanation) -> Vec<String> {
    [
        "netpol-agent".to_owned(),
        "inspect".to_owned(),
        src.to_string(),
        dst.to_string(),
        explanation.port.to_string(),
    ]
    .into()
}

/// The checks for people, after the explanation.
pub fn text(checks: &[KernelCheck]) -> String {
    let mut out = String::new();
    for check in checks {
        let node = check.node.as_deref().unwrap_or("?");
        let verdict = |allowed: bool| if allowed { "allowed" } else { "dropped" };
        let head = format!(
            "kernel of node {node}, {} of {}",
            check.direction, check.pod
        );
        match (&check.kernel, check.agrees) {
            (Some(kernel), Some(true)) => out.push_str(&format!(
                "{head}: {} ({}), as the cluster says\n",
                verdict(kernel.allowed),
                kernel.reason
            )),
            (Some(kernel), _) => out.push_str(&format!(
                "{head}: {} ({}), the cluster says {}: the kernel DISAGREES\n",
                verdict(kernel.allowed),
                kernel.reason,
                verdict(check.cluster_allowed)
            )),
            (None, _) => out.push_str(&format!("{head}: not known\n")),
        }
        for finding in &check.findings {
            out.push_str(&format!("  {finding}\n"));
        }
    }
    out
}
