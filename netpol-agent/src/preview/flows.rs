//! `kubectl netpol flows`: the flow logs of the agents on every (or the chosen) node,
//! merged. Each agent's log is read where it is, with `netpol-agent flows --json` run in
//! the agent's container over the API server's `pods/exec` (no port of the agent is
//! opened for it, and the user needs `create pods/exec` on the agent pods, which only a
//! cluster operator should have). A node whose agent cannot be reached is named.

use std::time::Duration;

use k8s_openapi::api::core::v1::{Node, Pod};
use kube::api::{Api, AttachParams, ListParams};
use serde::Serialize;
use tokio::io::AsyncBufReadExt as _;
use tokio::sync::mpsc;

use super::PreviewError;
use super::cluster::Connection;
use crate::telemetry::flowlog::{FlowFilter, FlowRecord};

/// Where the agents run and what is asked of them.
#[derive(Clone, Debug, Default)]
pub struct FlowsRequest {
    /// Only these nodes (empty: every node).
    pub nodes: Vec<String>,
    /// First what the agents kept from this long ago on.
    pub since: Option<Duration>,
    /// Which records (applied by each agent and again here).
    pub filter: FlowFilter,
    pub agents: Agents,
}

/// Where the agents run: their pods are found by namespace and label selector, and
/// commands run in their container.
#[derive(Clone, Debug)]
pub struct Agents {
    /// The agents' namespace (the DaemonSet's: `kube-system`).
    pub namespace: String,
    /// The label selector of the agent pods.
    pub selector: String,
    /// The agent's container.
    pub container: String,
}

impl Default for Agents {
    fn default() -> Self {
        Agents {
            namespace: "kube-system".into(),
            selector: "app.kubernetes.io/name=netpol-agent".into(),
            container: "agent".into(),
        }
    }
}

impl Agents {
    /// The agent pod of each node: a running one first, else any (its exec then says
    /// why it fails).
    pub async fn pods(&self, client: &kube::Client) -> Result<Vec<(String, String)>, PreviewError> {
        let pods = Api::<Pod>::namespaced(client.clone(), &self.namespace)
            .list(&ListParams::default().labels(&self.selector))
            .await
            .map_err(|error| PreviewError::List {
                resource: "pods",
                error,
            })?
            .items;
        let running = |pod: &Pod| {
            pod.status
                .as_ref()
                .and_then(|s| s.phase.as_deref())
                .is_some_and(|phase| phase == "Running")
        };
        let mut by_node: std::collections::BTreeMap<String, (bool, String)> = Default::default();
        for pod in &pods {
            let (Some(node), Some(name)) = (
                pod.spec.as_ref().and_then(|s| s.node_name.clone()),
                pod.metadata.name.clone(),
            ) else {
                continue;
            };
            let candidate = (running(pod), name);
            let keep = by_node.get(&node).is_some_and(|kept| kept.0 >= candidate.0);
            if !keep {
                by_node.insert(node, candidate);
            }
        }
        Ok(by_node
            .into_iter()
            .map(|(node, (_, pod))| (node, pod))
            .collect())
    }

    /// `ns/name` of an agent pod.
    pub fn name(&self, pod: &str) -> String {
        format!("{}/{pod}", self.namespace)
    }

    /// Starts `command` in the agent pod `pod` (its output and errors piped); the error
    /// says what the API server said.
    pub async fn exec(
        &self,
        client: &kube::Client,
        pod: &str,
        command: Vec<String>,
    ) -> Result<kube::api::AttachedProcess, String> {
        let params = AttachParams::default()
            .container(self.container.clone())
            .stdin(false)
            .stdout(true)
            .stderr(true);
        Api::<Pod>::namespaced(client.clone(), &self.namespace)
            .exec(pod, command, &params)
            .await
            .map_err(|error| super::kube_error(&error))
    }

    /// Runs `command` in the agent pod `pod` and returns its standard output; the
    /// error says what the API server or the command said.
    pub async fn run(
        &self,
        client: &kube::Client,
        pod: &str,
        command: Vec<String>,
    ) -> Result<String, String> {
        use tokio::io::AsyncReadExt as _;
        let mut process = self.exec(client, pod, command).await?;
        let (mut out, mut err) = (String::new(), String::new());
        if let Some(mut stdout) = process.stdout() {
            let _ = stdout.read_to_string(&mut out).await;
        }
        if let Some(mut stderr) = process.stderr() {
            let _ =
                tokio::time::timeout(Duration::from_secs(1), stderr.read_to_string(&mut err)).await;
        }
        let status = match process.take_status() {
            Some(status) => status.await,
            None => None,
        };
        match status {
            Some(status) if status.status.as_deref() != Some("Success") => Err(format!(
                "{}{}",
                status
                    .message
                    .unwrap_or_else(|| "the command failed".into()),
                match err.trim() {
                    "" => String::new(),
                    said => format!(": {said}"),
                }
            )),
            _ => Ok(out),
        }
    }
}

/// What the merged stream says.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum FlowsEvent {
    /// A record of the agent on `node`.
    Record {
        node: String,
        record: Box<FlowRecord>,
    },
    /// The agent of `node` fell behind and skipped records.
    Lagged { node: String, skipped: u64 },
    /// The agent of `node` cannot be read: no agent pod there, or the exec failed.
    Unreachable {
        node: String,
        /// `ns/name` of its agent pod, when there is one.
        pod: Option<String>,
        reason: String,
    },
    /// The agent's stream of `node` ended (the agent stopped or was replaced).
    Ended { node: String, reason: String },
}

/// The `netpol-agent flows` command line run in each agent's container.
pub fn agent_command(request: &FlowsRequest) -> Vec<String> {
    let mut command: Vec<String> = ["netpol-agent", "flows", "--json"].map(String::from).into();
    if let Some(since) = request.since {
        command.extend(["--since".into(), format!("{}s", since.as_secs_f64())]);
    }
    let filter = &request.filter;
    let options = [
        ("--pod", filter.pod.clone()),
        ("--namespace", filter.namespace.clone()),
        ("--verdict", filter.verdict.clone()),
        ("--port", filter.port.map(|p| p.to_string())),
    ];
    for (flag, value) in options {
        if let Some(value) = value {
            command.extend([flag.to_owned(), value]);
        }
    }
    command
}

/// The nodes asked for (all of the cluster's when none are) and, for each, the
/// running agent pod on it, if any. A node asked for that the cluster does not have is
/// an error.
async fn agents(
    connection: &Connection,
    request: &FlowsRequest,
) -> Result<Vec<(String, Option<String>)>, PreviewError> {
    let client = connection.client.clone();
    let nodes: Vec<String> = Api::<Node>::all(client.clone())
        .list(&ListParams::default())
        .await
        .map_err(|error| PreviewError::List {
            resource: "nodes",
            error,
        })?
        .items
        .into_iter()
        .filter_map(|n| n.metadata.name)
        .collect();
    for asked in &request.nodes {
        if !nodes.contains(asked) {
            return Err(PreviewError::Endpoint {
                input: asked.clone(),
                reason: "the cluster has no node of this name".into(),
            });
        }
    }
    let pods = request.agents.pods(&client).await?;
    Ok(nodes
        .into_iter()
        .filter(|node| request.nodes.is_empty() || request.nodes.contains(node))
        .map(|node| {
            let pod = pods
                .iter()
                .find(|(on, _)| *on == node)
                .map(|(_, pod)| pod.clone());
            (node, pod)
        })
        .collect())
}

/// Follows the agents of the nodes asked for, sending what they say to `sink` until
/// every stream has ended (or the receiver is dropped). Fails only when the nodes and
/// agents cannot be listed; an agent that cannot be read is a [`FlowsEvent::Unreachable`].
pub async fn follow(
    connection: &Connection,
    request: &FlowsRequest,
    sink: mpsc::Sender<FlowsEvent>,
) -> Result<(), PreviewError> {
    let agents = agents(connection, request).await?;
    let mut tasks = tokio::task::JoinSet::new();
    for (node, pod) in agents {
        let sink = sink.clone();
        let Some(pod) = pod else {
            let reason = format!(
                "no agent pod on this node (namespace {}, selector {})",
                request.agents.namespace, request.agents.selector
            );
            let _ = sink
                .send(FlowsEvent::Unreachable {
                    node,
                    pod: None,
                    reason,
                })
                .await;
            continue;
        };
        let client = connection.client.clone();
        let request = request.clone();
        tasks.spawn(async move { follow_agent(&client, &request, node, pod, sink).await });
    }
    while tasks.join_next().await.is_some() {}
    Ok(())
}

/// One agent's stream, until it ends.
async fn follow_agent(
    client: &kube::Client,
    request: &FlowsRequest,
    node: String,
    pod: String,
    sink: mpsc::Sender<FlowsEvent>,
) {
    let name = request.agents.name(&pod);
    let command = agent_command(request);
    let mut process = match request.agents.exec(client, &pod, command).await {
        Ok(process) => process,
        Err(reason) => {
            let _ = sink
                .send(FlowsEvent::Unreachable {
                    node,
                    pod: Some(name),
                    reason,
                })
                .await;
            return;
        }
    };
    let Some(stdout) = process.stdout() else {
        return;
    };
    let mut stderr = process.stderr();
    let mut lines = tokio::io::BufReader::new(stdout).lines();
    while let Ok(Some(line)) = lines.next_line().await {
        let event = match serde_json::from_str::<FlowRecord>(&line) {
            Ok(record) if request.filter.matches(&record) => FlowsEvent::Record {
                node: node.clone(),
                record: Box::new(record),
            },
            Ok(_) => continue,
            Err(_) => match serde_json::from_str::<serde_json::Value>(&line)
                .ok()
                .and_then(|v| v["lagged"].as_u64())
            {
                Some(skipped) => FlowsEvent::Lagged {
                    node: node.clone(),
                    skipped,
                },
                None => continue,
            },
        };
        if sink.send(event).await.is_err() {
            return;
        }
    }
    // The stream ended: say why, with what the command printed on stderr.
    let mut said = String::new();
    if let Some(stderr) = stderr.as_mut() {
        use tokio::io::AsyncReadExt as _;
        let _ = tokio::time::timeout(
            Duration::from_secs(1),
            stderr.take(4096).read_to_string(&mut said),
        )
        .await;
    }
    let status = match process.take_status() {
        Some(status) => tokio::time::timeout(Duration::from_secs(1), status)
            .await
            .ok()
            .flatten(),
        None => None,
    };
    let mut reason = status
        .and_then(|s| s.message)
        .unwrap_or_else(|| "the agent's flow stream ended".into());
    let said = said.trim();
    if !said.is_empty() {
        reason = format!("{reason}: {said}");
    }
    let _ = sink
        .send(FlowsEvent::Ended {
            node,
            reason: format!("{name}: {reason}"),
        })
        .await;
}

/// `12:03:04.123Z`: the UTC time of day of Unix seconds (`?` when unknown).
pub fn time_of_day(unix: f64) -> String {
    if unix <= 0.0 {
        return "?".into();
    }
    let millis = (unix * 1000.0) as u64 % 86_400_000;
    let (h, m) = (millis / 3_600_000, millis / 60_000 % 60);
    let (s, ms) = (millis / 1000 % 60, millis % 1000);
    format!("{h:02}:{m:02}:{s:02}.{ms:03}Z")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_agent_is_asked_for_what_the_user_asked_and_filters_travel_with_it() {
        let request = FlowsRequest {
            since: Some(Duration::from_secs(300)),
            filter: FlowFilter {
                pod: Some("x/a".into()),
                verdict: Some("dropped".into()),
                port: Some(80),
                ..FlowFilter::default()
            },
            ..FlowsRequest::default()
        };
        assert_eq!(
            agent_command(&request),
            [
                "netpol-agent",
                "flows",
                "--json",
                "--since",
                "300s",
                "--pod",
                "x/a",
                "--verdict",
                "dropped",
                "--port",
                "80"
            ]
        );
        assert_eq!(
            agent_command(&FlowsRequest::default()),
            ["netpol-agent", "flows", "--json"]
        );
    }

    #[test]
    fn time_of_day_is_utc_with_milliseconds() {
        // 2026-12-04T13:45:06.789Z
        assert_eq!(time_of_day(1_796_391_906.789), "13:45:06.789Z");
        assert_eq!(time_of_day(0.0), "?");
    }
}
