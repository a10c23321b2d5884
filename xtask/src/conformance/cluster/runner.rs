//! One case on the cluster: its namespaces, pods and hosts created, then step by step
//! its changes applied, the agents waited for, and its probes run and checked.

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde::Deserialize;
use serde_json::Value;

use super::command::{Kubectl, docker};
use super::guard::Cleanup;
use super::hosts::{HostContainer, Node, create_hosts};
use super::objects::{namespace_labels, namespace_object, pod_object, relabel};
use super::probe::{agnhost_connect, host_probe_command, pod_probe_command, run_probes};
use super::{AGNHOST, Options, STATUS_FILE, STEP_ANNOTATION};
use crate::conformance::case::{
    self, Addresses, Case, ClusterPlan, METADATA_NAME, PortDef, Step, expand_templates,
};
use crate::conformance::{CaseResult, Endpoint, check_step};
use netpol_lab::Probe;

/// The agent's status file (README.md, "Using the agent").
#[derive(Clone, Debug, Default, Deserialize, PartialEq, Eq)]
pub struct AgentStatus {
    pub generation: u64,
    #[serde(default)]
    pub invalid: usize,
    #[serde(default)]
    pub pending: Vec<String>,
}

impl AgentStatus {
    /// Whether this agent has resourceVersion `generation` in the kernel and none of
    /// `pods` (`ns/name`) waits for its interface.
    pub fn applied(&self, generation: u64, pods: &BTreeSet<String>) -> bool {
        self.generation >= generation
            && !self
                .pending
                .iter()
                .any(|p| pods.contains(p.split_whitespace().next().unwrap_or_default()))
    }
}

pub(super) struct ClusterRunner<'a> {
    options: &'a Options,
    kubectl: &'a Kubectl,
    nodes: &'a [Node],
    case: String,
    plan: ClusterPlan,
    pod_ips: BTreeMap<String, Ipv4Addr>,
    pod_labels: BTreeMap<String, BTreeMap<String, String>>,
    namespace_labels: BTreeMap<String, BTreeMap<String, String>>,
    hosts: Vec<HostContainer>,
    policies: BTreeSet<(String, String)>,
    steps: u64,
    cleanup: Cleanup<'a>,
}

impl Addresses for ClusterRunner<'_> {
    fn ipv4_of(&self, endpoint: &str) -> Option<Ipv4Addr> {
        match endpoint.strip_prefix("host/") {
            Some(name) => self.hosts.iter().find(|h| h.name == name).map(|h| h.ip),
            None => self.pod_ips.get(endpoint).copied(),
        }
    }
}

impl<'a> ClusterRunner<'a> {
    pub(super) fn new(
        case: &Case,
        options: &'a Options,
        kubectl: &'a Kubectl,
        nodes: &'a [Node],
    ) -> Result<Self> {
        let plan = ClusterPlan::of(case)?;
        if plan.pods.iter().any(|p| p.host_network) || !plan.node_labels.is_empty() {
            bail!(
                "hostNetwork pods and node_labels (tests/conformance/README.md) are run on \
                 emulated nodes only: on kind they would need the nodes relabelled and \
                 host ports free"
            );
        }
        Ok(Self {
            options,
            kubectl,
            nodes,
            case: case.name.clone(),
            pod_ips: BTreeMap::new(),
            pod_labels: plan
                .pods
                .iter()
                .map(|p| (p.name.clone(), p.labels.clone()))
                .collect(),
            namespace_labels: plan.namespaces.clone(),
            plan,
            hosts: Vec::new(),
            policies: BTreeSet::new(),
            steps: 0,
            cleanup: Cleanup {
                kubectl,
                namespaces: Vec::new(),
                borrowed: BTreeMap::new(),
                pods: Vec::new(),
                policies: BTreeSet::new(),
                containers: Vec::new(),
                routes: Vec::new(),
            },
        })
    }

    fn create_namespaces(&mut self) -> Result<()> {
        let existing: BTreeSet<String> = self
            .kubectl
            .run(&["get", "namespaces", "-o", "name"])?
            .lines()
            .filter_map(|l| l.trim().strip_prefix("namespace/").map(str::to_owned))
            .collect();
        let mut create = Vec::new();
        for (ns, labels) in &self.plan.namespaces {
            if existing.contains(ns) {
                let before = namespace_labels(self.kubectl, ns)?;
                self.cleanup.borrowed.insert(ns.clone(), before.clone());
                relabel(self.kubectl, "namespace", "", ns, &before, labels)?;
            } else {
                create.push(namespace_object(ns, labels, &self.case));
                self.cleanup.namespaces.push(ns.clone());
            }
        }
        if !create.is_empty() {
            self.kubectl.with_objects(&["create"], &create)?;
        }
        Ok(())
    }

    fn create_pods(&mut self) -> Result<()> {
        let schedulable: Vec<&Node> = self.nodes.iter().filter(|n| n.schedulable).collect();
        let mut objects = Vec::new();
        for (i, pod) in self.plan.pods.iter().enumerate() {
            let node = schedulable[i % schedulable.len()];
            objects.push(pod_object(pod, Some(&node.name), &self.case, AGNHOST)?);
            let (ns, name) = case::split_pod(&pod.name)?;
            if self.cleanup.borrowed.contains_key(ns) {
                self.cleanup.pods.push((ns.to_owned(), name.to_owned()));
            }
        }
        if objects.is_empty() {
            return Ok(());
        }
        // A new namespace's default ServiceAccount appears a moment after it; until
        // then pods are refused.
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            match self.kubectl.with_objects(&["apply"], &objects) {
                Ok(_) => break,
                Err(e)
                    if Instant::now() < deadline && format!("{e:#}").contains("serviceaccount") =>
                {
                    std::thread::sleep(Duration::from_secs(1));
                }
                Err(e) => return Err(e),
            }
        }
        let by_ns = self.pods_by_namespace();
        let timeout = format!("--timeout={}s", self.options.ready_timeout.as_secs());
        for (ns, names) in &by_ns {
            let mut args = vec!["wait", "-n", ns, "--for=condition=Ready", &timeout];
            let refs: Vec<String> = names.iter().map(|n| format!("pod/{n}")).collect();
            args.extend(refs.iter().map(String::as_str));
            self.kubectl.run(&args).context(
                "pods not Ready (is the agnhost image pullable? SCTP ports need the sctp module on the Docker host)",
            )?;
            let list: Value =
                serde_json::from_str(&self.kubectl.run(&["get", "pods", "-n", ns, "-o", "json"])?)?;
            for item in list["items"].as_array().into_iter().flatten() {
                let name = item["metadata"]["name"].as_str().unwrap_or_default();
                if let Some(ip) = item["status"]["podIP"]
                    .as_str()
                    .and_then(|ip| ip.parse().ok())
                {
                    self.pod_ips.insert(format!("{ns}/{name}"), ip);
                }
            }
            for name in names {
                if !self.pod_ips.contains_key(&format!("{ns}/{name}")) {
                    bail!("pod {ns}/{name} has no IPv4 address");
                }
            }
        }
        Ok(())
    }

    fn pods_by_namespace(&self) -> BTreeMap<String, Vec<String>> {
        let mut by_ns: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for pod in &self.plan.pods {
            if let Ok((ns, name)) = case::split_pod(&pod.name) {
                by_ns
                    .entry(ns.to_owned())
                    .or_default()
                    .push(name.to_owned());
            }
        }
        by_ns
    }
    fn create_hosts(&mut self) -> Result<()> {
        self.hosts = create_hosts(
            &self.plan.hosts,
            &self.options.docker_network,
            &self.case,
            self.nodes,
            &mut self.cleanup,
        )?;
        Ok(())
    }

    /// Bumps the step annotation, then waits until every node's agent reports it (and
    /// no pod of the case waits for its interface), then settles.
    fn sync(&mut self) -> Result<()> {
        self.steps += 1;
        let ns = self
            .plan
            .namespaces
            .keys()
            .next()
            .context("a case without namespaces")?
            .clone();
        let annotation = format!("{STEP_ANNOTATION}={}-{}", self.case, self.steps);
        let version = self.kubectl.run(&[
            "annotate",
            "namespace",
            &ns,
            &annotation,
            "--overwrite",
            "-o",
            "jsonpath={.metadata.resourceVersion}",
        ])?;
        let version: u64 = version
            .trim()
            .parse()
            .with_context(|| format!("resourceVersion {version:?} is not a number"))?;
        let pods: BTreeSet<String> = self.plan.pods.iter().map(|p| p.name.clone()).collect();
        let deadline = Instant::now() + self.options.apply_timeout;
        let mut waiting: Vec<String> = self.nodes.iter().map(|n| n.name.clone()).collect();
        let mut last = BTreeMap::new();
        while !waiting.is_empty() {
            let mut still = Vec::new();
            for node in waiting {
                let status = docker(&["exec", &node, "cat", STATUS_FILE])
                    .ok()
                    .and_then(|text| serde_json::from_str::<AgentStatus>(&text).ok());
                match status {
                    Some(status) if status.applied(version, &pods) => {
                        if status.invalid > 0 {
                            bail!(
                                "the agent on {node} rejected {} object(s) of this step; see its log",
                                status.invalid
                            );
                        }
                    }
                    other => {
                        last.insert(node.clone(), other);
                        still.push(node);
                    }
                }
            }
            waiting = still;
            if waiting.is_empty() {
                break;
            }
            if Instant::now() >= deadline {
                let detail: Vec<String> = waiting
                    .iter()
                    .map(|n| match &last[n] {
                        Some(s) => format!("{n} at {} (pending: {:?})", s.generation, s.pending),
                        None => format!("{n}: no readable {STATUS_FILE}"),
                    })
                    .collect();
                bail!(
                    "the agents did not report resourceVersion {version} within {:?}: {}",
                    self.options.apply_timeout,
                    detail.join(", ")
                );
            }
            std::thread::sleep(Duration::from_millis(250));
        }
        std::thread::sleep(self.options.settle);
        Ok(())
    }

    fn apply_step(&mut self, step: &Step) -> Result<()> {
        let mut objects = Vec::new();
        for object in &step.apply {
            let object = expand_templates(object, self)?;
            if object["kind"] != "NetworkPolicy" {
                bail!(
                    "apply: only NetworkPolicy objects can be applied, not {}",
                    object["kind"]
                );
            }
            let ns = object["metadata"]["namespace"]
                .as_str()
                .unwrap_or("default")
                .to_owned();
            let name = object["metadata"]["name"]
                .as_str()
                .context("apply: a NetworkPolicy without metadata.name")?
                .to_owned();
            self.policies.insert((ns.clone(), name.clone()));
            self.cleanup.policies.insert((ns, name));
            objects.push(object);
        }
        if !objects.is_empty() {
            self.kubectl.with_objects(&["apply"], &objects)?;
        }
        let mut delete: Vec<(String, String)> = Vec::new();
        for target in &step.delete {
            let (ns, name) =
                case::split_pod(target).with_context(|| format!("delete: {target:?}"))?;
            let key = (ns.to_owned(), name.to_owned());
            if !self.policies.remove(&key) {
                bail!("delete: no NetworkPolicy {target}");
            }
            delete.push(key);
        }
        if step.delete_all_policies {
            delete.extend(std::mem::take(&mut self.policies));
        }
        for (ns, name) in &delete {
            self.kubectl
                .run(&["delete", "networkpolicy", "-n", ns, name])?;
        }
        for (pod, labels) in &step.pod_labels {
            let old = self
                .pod_labels
                .get(pod)
                .with_context(|| format!("pod_labels: no pod {pod}"))?
                .clone();
            let (ns, name) = case::split_pod(pod)?;
            relabel(self.kubectl, "pod", ns, name, &old, labels)?;
            self.pod_labels.insert(pod.clone(), labels.clone());
        }
        for (ns, labels) in &step.namespace_labels {
            let old = self
                .namespace_labels
                .get(ns)
                .with_context(|| format!("namespace_labels: no namespace {ns}"))?
                .clone();
            relabel(self.kubectl, "namespace", "", ns, &old, labels)?;
            let mut labels = labels.clone();
            labels.insert(METADATA_NAME.to_owned(), ns.clone());
            self.namespace_labels.insert(ns.clone(), labels);
        }
        self.sync()
    }

    fn endpoints(&self) -> Vec<Endpoint> {
        let serves = |ports: &[PortDef]| {
            ports
                .iter()
                .map(|p| (p.port, crate::conformance::lab_protocol(p.protocol)))
                .collect()
        };
        let pods = self
            .plan
            .pods
            .iter()
            .map(|p| Endpoint::new(p.name.clone(), serves(&p.ports)));
        let hosts = self
            .hosts
            .iter()
            .map(|h| Endpoint::new(format!("host/{}", h.name), serves(&h.ports)));
        pods.chain(hosts).collect()
    }

    fn probe_commands(&self, probes: &[Probe]) -> Result<Vec<(&'static str, Vec<String>)>> {
        probes
            .iter()
            .map(|probe| {
                let ip = self
                    .ipv4_of(&probe.dst)
                    .with_context(|| format!("no address for {}", probe.dst))?;
                let connect =
                    agnhost_connect(ip, probe.port, probe.protocol, self.options.probe_timeout);
                match probe.src.strip_prefix("host/") {
                    Some(name) => {
                        let host = self
                            .hosts
                            .iter()
                            .find(|h| h.name == name)
                            .with_context(|| format!("no host {name}"))?;
                        Ok(host_probe_command(&host.container, &connect))
                    }
                    None => pod_probe_command(self.kubectl, &probe.src, &connect),
                }
            })
            .collect()
    }

    pub(super) fn run(&mut self, case: &Case, result: &mut CaseResult) -> Result<()> {
        self.create_namespaces().context("creating namespaces")?;
        self.create_pods().context("creating pods")?;
        self.create_hosts().context("creating hosts")?;
        self.sync()
            .context("waiting for the agents to program the pods")?;
        let wall = self.options.probe_timeout + Duration::from_secs(30);
        for (index, step) in case.steps.iter().enumerate() {
            self.apply_step(step)
                .with_context(|| format!("step {}", index + 1))?;
            let checked = check_step(step, index + 1, &self.endpoints(), |probes| {
                let commands = self.probe_commands(probes)?;
                Ok(run_probes(commands, self.options.parallel, wall))
            })
            .with_context(|| format!("step {}", index + 1))?;
            result.probes += checked.expects.iter().map(|e| e.cells.len()).sum::<usize>();
            result.steps.push(checked);
        }
        Ok(())
    }

    /// The agents' last log lines, for failure reports.
    pub(super) fn agent_logs(&self) -> Option<String> {
        self.kubectl
            .run(&[
                "logs",
                "-n",
                "kube-system",
                "-l",
                "app.kubernetes.io/name=netpol-agent",
                "--prefix",
                "--tail=15",
            ])
            .ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn agent_status_gates_the_step() {
        let status: AgentStatus = serde_json::from_str(
            r#"{"generation": 1234, "endpoints": 9, "policies": 1, "invalid": 0, "attached": 9,
                "pending": ["x/b (interface unknown)"]}"#,
        )
        .unwrap();
        let pods: BTreeSet<String> = ["x/a".to_owned(), "x/b".to_owned()].into();
        assert!(!status.applied(1234, &pods), "x/b is pending");
        let others: BTreeSet<String> = ["y/a".to_owned()].into();
        assert!(status.applied(1234, &others));
        assert!(status.applied(1200, &others));
        assert!(!status.applied(1235, &others));
    }
}
