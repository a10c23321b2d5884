//! `cargo xtask conformance`: runs NetworkPolicy conformance cases
//! (../shared/conformance/FORMAT.md) against the real agent on emulated pods, with real
//! traffic.
//!
//! Each case gets its own [`Lab`] (node namespace, pod and host namespaces, servers for
//! every declared port) and its own agent in local mode. For every step the runner
//! rewrites the manifest directory, waits until the agent reports that the step's
//! generation is in the kernel, then probes every pair of every expectation at once
//! (one timeout per step, not per probe) and compares with the expected verdicts.
//!
//! With `--nodes N` the lab has N nodes joined by underlay links, one agent each (all
//! reading the same manifests, each programming the pods whose `spec.nodeName` is its
//! node), and the case's pods, then its hosts, are dealt to the nodes in turn (pod `i`
//! on node `i mod N`), so that most pairs cross nodes and both conntracks. FORMAT.md
//! has no node endpoint: probes run between pods and hosts only, so no verdict depends
//! on which node is "the" node.

pub mod case;
pub mod cluster;
mod kube;
#[cfg(test)]
mod oracle;
mod report;

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use netpol_lab::{AgentProcess, Family, Lab, ManifestDir, PodSpec, Port, Probe};
use serde::Serialize;
use serde_json::Value;

pub use case::Families;
use case::{
    Addresses, Case, ClusterPlan, METADATA_NAME, Protocol, Step, Verdict, expand_templates,
};
pub use report::print_failure;

/// Where the agent reads the cluster from.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum SourceKind {
    /// A manifest directory (local mode).
    #[default]
    Local,
    /// The Kubernetes API: the in-process API server double, over HTTP list/watch.
    Kube,
}

/// How probes travel between pods (FORMAT.md, "Worlds").
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum Via {
    /// To the destination pod's address.
    #[default]
    Direct,
    /// To the destination pod's own Service (ClusterIP, a Service port that differs from
    /// the target port), translated by kube-proxy's rules on the node; plus each pod to
    /// itself through its Service (hairpin).
    Service,
}

/// kube-proxy's mode on the emulated nodes (`--via service`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum ProxyMode {
    #[default]
    Iptables,
    Nftables,
}

/// How to run.
#[derive(Clone, Debug)]
pub struct Options {
    pub agent: PathBuf,
    /// Local mode or Kubernetes mode.
    pub source: SourceKind,
    /// Kubernetes mode: with every step, kill the watch streams, expire the history
    /// (410 Gone) or restart the API server double, in turn.
    pub faults: bool,
    /// Per-step probe timeout.
    pub timeout: Duration,
    /// How long to wait for the agent to apply a step.
    pub apply_timeout: Duration,
    /// Cases run at once (each in its own lab).
    pub jobs: usize,
    /// Nodes per lab, one agent each (local mode only when more than one).
    pub nodes: usize,
    pub via: Via,
    pub proxy_mode: ProxyMode,
    /// The address families of pods, hosts and probes.
    pub families: Families,
    pub json: Option<PathBuf>,
}

/// The outcome of one probe pair.
#[derive(Clone, Debug, Serialize)]
pub struct Cell {
    pub src: String,
    pub dst: String,
    pub expected: Verdict,
    /// `allowed`, `blocked`, or a broken outcome (one-way, rejected).
    pub observed: String,
    pub ok: bool,
}

/// The probes of one `expect` entry of a step over one address family.
#[derive(Clone, Debug, Serialize)]
pub struct ExpectResult {
    pub port: u16,
    pub protocol: String,
    /// `IPv4` or `IPv6`: the family every probe of `cells` used.
    pub family: &'static str,
    pub cells: Vec<Cell>,
}

impl ExpectResult {
    pub fn wrong(&self) -> usize {
        self.cells.iter().filter(|c| !c.ok).count()
    }
}

#[derive(Clone, Debug, Serialize)]
pub struct StepResult {
    pub index: usize,
    pub expects: Vec<ExpectResult>,
}

#[derive(Clone, Debug, Serialize)]
pub struct CaseResult {
    pub name: String,
    pub file: PathBuf,
    pub passed: bool,
    /// Not run: the case is written for other worlds (its `families`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub skipped: Option<String>,
    pub seconds: f64,
    pub probes: usize,
    /// Set when the case could not be run to the end (bad file, lab or agent failure).
    pub error: Option<String>,
    pub steps: Vec<StepResult>,
    /// The agent log's tail when the case failed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub agent_log: Option<String>,
}

#[derive(Debug, Serialize)]
pub struct Summary {
    pub passed: usize,
    pub failed: usize,
    /// Cases written for other worlds only.
    pub skipped: usize,
    pub seconds: f64,
    pub cases: Vec<CaseResult>,
}

/// The case directories `cargo xtask conformance` runs by default: the shared cases
/// (`../shared/conformance/cases`, always) and, where they exist, the shared
/// ClusterNetworkPolicy cases (`cnp`), ours (`tests/conformance`) and ours with
/// ClusterNetworkPolicy objects (`tests/conformance/cnp`).
pub fn default_case_dirs(root: &Path) -> Vec<PathBuf> {
    let mut dirs = vec![root.join("../shared/conformance/cases")];
    for dir in [
        root.join("../shared/conformance/cnp"),
        root.join("tests/conformance"),
        root.join("tests/conformance/cnp"),
    ] {
        if dir.is_dir() {
            dirs.push(dir);
        }
    }
    dirs
}

/// Case files named by `paths` (files, or directories of `*.yaml`), sorted, unique.
pub fn collect(paths: &[PathBuf]) -> Result<Vec<PathBuf>> {
    let mut files = Vec::new();
    for path in paths {
        if path.is_dir() {
            for entry in
                std::fs::read_dir(path).with_context(|| format!("reading {}", path.display()))?
            {
                let file = entry?.path();
                if matches!(
                    file.extension().and_then(|e| e.to_str()),
                    Some("yaml" | "yml")
                ) {
                    files.push(file);
                }
            }
        } else if path.is_file() {
            files.push(path.clone());
        } else {
            bail!("{}: no such case file or directory", path.display());
        }
    }
    files.sort();
    files.dedup();
    if files.is_empty() {
        bail!(
            "no case files in {}",
            paths
                .iter()
                .map(|p| p.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    Ok(files)
}

/// Runs every case, `jobs` at a time, printing a line per case as it finishes and the
/// truth tables of failures; returns the summary (also written as JSON if asked).
pub fn run(files: &[PathBuf], options: &Options) -> Result<Summary> {
    run_cases(files, options.jobs, options.json.as_deref(), |file| {
        run_case(file, options)
    })
}

/// The case loop of every backend: `run_one` for each file, `jobs` at a time, a line per
/// case as it finishes, truth tables of failures, the summary (and its JSON).
fn run_cases(
    files: &[PathBuf],
    jobs: usize,
    json: Option<&Path>,
    run_one: impl Fn(&Path) -> CaseResult + Sync,
) -> Result<Summary> {
    let started = Instant::now();
    let queue = Mutex::new(
        files
            .iter()
            .enumerate()
            .collect::<Vec<_>>()
            .into_iter()
            .rev()
            .collect::<Vec<_>>(),
    );
    let results = Mutex::new(BTreeMap::new());
    let total = files.len();
    let done = Mutex::new(0usize);
    std::thread::scope(|scope| {
        for _ in 0..jobs.clamp(1, total) {
            scope.spawn(|| {
                loop {
                    let Some((index, file)) = queue.lock().expect("not poisoned").pop() else {
                        return;
                    };
                    let result = run_one(file);
                    let mut done = done.lock().expect("not poisoned");
                    *done += 1;
                    report::print_case_line(*done, total, &result);
                    if !result.passed && result.skipped.is_none() {
                        print_failure(&result);
                    }
                    results.lock().expect("not poisoned").insert(index, result);
                }
            });
        }
    });
    let cases: Vec<CaseResult> = results
        .into_inner()
        .expect("not poisoned")
        .into_values()
        .collect();
    let passed = cases.iter().filter(|c| c.passed).count();
    let skipped = cases.iter().filter(|c| c.skipped.is_some()).count();
    let summary = Summary {
        passed,
        failed: cases.len() - passed - skipped,
        skipped,
        seconds: started.elapsed().as_secs_f64(),
        cases,
    };
    if let Some(path) = json {
        let json = serde_json::to_string_pretty(&summary)?;
        std::fs::write(path, json).with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(summary)
}

/// Runs one case to the end, turning every failure into a failed result.
pub fn run_case(file: &Path, options: &Options) -> CaseResult {
    run_case_with(file, options.families, |case, result| {
        Runner::new(case, options)?.run(case, result)
    })
}

/// Loads `file` and runs `body` on it unless the case is written for other worlds than
/// `families`; every failure becomes a failed result.
fn run_case_with(
    file: &Path,
    families: Families,
    body: impl FnOnce(&Case, &mut CaseResult) -> Result<()>,
) -> CaseResult {
    let started = Instant::now();
    let name = file
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    let mut result = CaseResult {
        name,
        file: file.to_path_buf(),
        passed: false,
        skipped: None,
        seconds: 0.0,
        probes: 0,
        error: None,
        steps: Vec::new(),
        agent_log: None,
    };
    let outcome = Case::load(file).and_then(|case| {
        result.name = case.name.clone();
        if !case.runs_in(families) {
            let listed: Vec<String> = case
                .families
                .iter()
                .flatten()
                .map(|f| f.to_string())
                .collect();
            result.skipped = Some(format!("written for --family {}", listed.join(", ")));
            return Ok(());
        }
        body(&case, &mut result)
    });
    if let Err(error) = outcome {
        result.error = Some(format!("{error:#}"));
    }
    result.passed = result.skipped.is_none()
        && result.error.is_none()
        && result
            .steps
            .iter()
            .all(|s| s.expects.iter().all(|e| e.wrong() == 0));
    result.seconds = started.elapsed().as_secs_f64();
    result
}

/// A probe endpoint (`ns/pod` or `host/name`) with what it serves.
#[derive(Clone, Debug)]
pub(crate) struct Endpoint {
    pub id: String,
    pub serves: Vec<(u16, netpol_lab::Protocol)>,
    /// Whether it probes others too: every endpoint but a `hostNetwork` pod, whose
    /// traffic is its node's (tests/conformance/README.md).
    pub source: bool,
}

impl Endpoint {
    pub fn new(id: String, serves: Vec<(u16, netpol_lab::Protocol)>) -> Self {
        Endpoint {
            id,
            serves,
            source: true,
        }
    }
}

pub(crate) type Endpoints = [Endpoint];

/// Checks one step: every source to every other endpoint that serves an expectation's
/// port and protocol, probed all at once by `probe` (one outcome per probe, in order),
/// compared with the expected verdicts. Shared by every backend.
pub(crate) fn check_step(
    step: &Step,
    index: usize,
    endpoints: &Endpoints,
    probe: impl FnOnce(&[Probe]) -> Result<Vec<netpol_lab::Outcome>>,
) -> Result<StepResult> {
    check_step_with(step, index, endpoints, &[Family::V4], false, probe)
}

/// The name reports and `--json` give a family.
pub fn family_name(family: Family) -> &'static str {
    match family {
        Family::V4 => "IPv4",
        Family::V6 => "IPv6",
    }
}

/// [`check_step`] over each of `families` (every pair probed once per family), with
/// each pod also probing itself when `hairpin` (through its own Service: always
/// allowed, a pod is never blocked from itself).
pub(crate) fn check_step_with(
    step: &Step,
    index: usize,
    endpoints: &Endpoints,
    families: &[Family],
    hairpin: bool,
    probe: impl FnOnce(&[Probe]) -> Result<Vec<netpol_lab::Outcome>>,
) -> Result<StepResult> {
    let mut probes = Vec::new();
    // (index into `expects`, verdict) per probe.
    let mut expected = Vec::new();
    let mut expects = Vec::new();
    for expect in &step.expect {
        let protocol = lab_protocol(expect.protocol);
        for &family in families {
            if expect.family.is_some_and(|only| only.lab() != family) {
                continue;
            }
            let e = expects.len();
            expects.push(ExpectResult {
                port: expect.port,
                protocol: expect.protocol.to_string(),
                family: family_name(family),
                cells: Vec::new(),
            });
            let new = |src: &String, dst: &String| Probe {
                family,
                ..Probe::new(src.clone(), dst.clone(), expect.port, protocol)
            };
            for Endpoint {
                id: dst, serves, ..
            } in endpoints
            {
                if !serves.contains(&(expect.port, protocol)) {
                    continue;
                }
                for src in endpoints.iter().filter(|e| e.source).map(|e| &e.id) {
                    if src == dst {
                        if hairpin && !src.starts_with("host/") {
                            probes.push(new(src, dst));
                            expected.push((e, Verdict::Allowed));
                        }
                        continue;
                    }
                    probes.push(new(src, dst));
                    expected.push((e, expect.verdict(src, dst)));
                }
            }
        }
    }
    let outcomes = probe(&probes)?;
    if outcomes.len() != probes.len() {
        bail!("{} outcomes for {} probes", outcomes.len(), probes.len());
    }
    for ((probe, outcome), (e, want)) in probes.into_iter().zip(outcomes).zip(expected) {
        let ok = outcome.matches(want == Verdict::Allowed);
        let cells: &mut Vec<Cell> = &mut expects[e].cells;
        cells.push(Cell {
            src: probe.src,
            dst: probe.dst,
            expected: want,
            observed: outcome.to_string(),
            ok,
        });
    }
    Ok(StepResult { index, expects })
}

/// A case's lab, agent and current policies.
struct Runner<'a> {
    /// One per node, started by the first sync. Declared first: fields drop in order,
    /// and the agents must stop before their lab goes away.
    agents: Vec<AgentProcess>,
    lab: Lab,
    /// The agent's manifest directory (local mode), or the staging directory whose
    /// rendering is published through the API server double (Kubernetes mode).
    manifests: ManifestDir,
    kube: Option<kube::KubeFeed>,
    policies: BTreeMap<PolicyName, Value>,
    /// The case applies ClusterNetworkPolicy objects in some step.
    has_cluster_network_policies: bool,
    options: &'a Options,
}

/// How a step names the policies it applies and deletes.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum PolicyName {
    /// A NetworkPolicy: namespace, name.
    Namespaced(String, String),
    /// A ClusterNetworkPolicy (`delete: [ClusterNetworkPolicy/<name>]`).
    Cluster(String),
}

/// The port of a pod's own Service in front of its container port `target` (FORMAT.md:
/// different from the target port, below 65536).
pub fn service_port(target: u16) -> u16 {
    if target <= 55_535 {
        target + 10_000
    } else {
        target - 10_000
    }
}

/// The Service of its own that `--via service` gives a pod: no selector (case steps
/// relabel pods), the pod as the only endpoint, one Service port per container port,
/// targeting the port by name where it has one.
fn own_service(pod: &case::PodDef) -> Result<netpol_lab::ServiceSpec> {
    let (ns, name) = case::split_pod(&pod.name)?;
    let mut spec = netpol_lab::ServiceSpec::new(ns, name).backends([pod.name.clone()]);
    for port in &pod.ports {
        let protocol = lab_protocol(port.protocol);
        spec = spec.port(netpol_lab::ServicePort {
            name: Some(format!("{}-{}", protocol.k8s().to_lowercase(), port.port)),
            protocol,
            port: service_port(port.port),
            target: match &port.name {
                Some(name) => netpol_lab::TargetPort::Name(name.clone()),
                None => netpol_lab::TargetPort::Number(port.port),
            },
        });
    }
    Ok(spec)
}

/// A probe to a pod, made to its Service instead (hosts and `hostNetwork` pods stay
/// direct).
fn through_service(probe: &Probe, lab: &Lab) -> Probe {
    let host_network = lab.pod(&probe.dst).is_some_and(|p| p.host_network);
    if probe.src.starts_with("host/") || probe.dst.starts_with("host/") || host_network {
        return probe.clone();
    }
    Probe {
        dst: format!("svc/{}", probe.dst),
        port: service_port(probe.port),
        ..probe.clone()
    }
}

/// The templates of a case write IPv4 addresses: an endpoint's own, or in an
/// IPv6-only lab the address whose image its IPv6 address is.
impl Addresses for Lab {
    fn ipv4_of(&self, endpoint: &str) -> Option<Ipv4Addr> {
        let (v4, v6) = match endpoint.strip_prefix("host/") {
            Some(name) => {
                let host = self.hosts().iter().find(|h| h.name == name)?;
                (host.ipv4, host.ipv6)
            }
            None => {
                let pod = self.pod(endpoint)?;
                (pod.ipv4, pod.ipv6)
            }
        };
        v4.or_else(|| v6.and_then(image_of))
    }

    fn ipv6_of(&self, endpoint: &str) -> Option<Ipv6Addr> {
        match endpoint.strip_prefix("host/") {
            Some(name) => self.hosts().iter().find(|h| h.name == name)?.ipv6,
            None => self.pod(endpoint)?.ipv6,
        }
    }
}

/// The IPv4 address whose image ([`netpol_lab::ipv6_image`]) `ip` is.
fn image_of(ip: Ipv6Addr) -> Option<Ipv4Addr> {
    let bits = u128::from(ip);
    (bits >> 32 == u128::from(netpol_lab::IPV6_IMAGE_PREFIX) >> 32)
        .then(|| Ipv4Addr::from(bits as u32))
}

fn lab_port(port: &case::PortDef) -> Port {
    let base = match port.protocol {
        Protocol::Tcp => Port::tcp(port.port),
        Protocol::Udp => Port::udp(port.port),
        Protocol::Sctp => Port::sctp(port.port),
    };
    match &port.name {
        Some(name) => base.named(name.clone()),
        None => base,
    }
}

fn lab_protocol(protocol: Protocol) -> netpol_lab::Protocol {
    match protocol {
        Protocol::Tcp => netpol_lab::Protocol::Tcp,
        Protocol::Udp => netpol_lab::Protocol::Udp,
        Protocol::Sctp => netpol_lab::Protocol::Sctp,
    }
}

/// `kubernetes.io/metadata.name` is the API server's to set: the lab adds it.
fn without_metadata_name(labels: &BTreeMap<String, String>) -> BTreeMap<String, String> {
    labels
        .iter()
        .filter(|(k, _)| k.as_str() != METADATA_NAME)
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect()
}

impl<'a> Runner<'a> {
    fn new(case: &Case, options: &'a Options) -> Result<Self> {
        let plan = ClusterPlan::of(case)?;
        if options.nodes > 1 && options.source != SourceKind::Local {
            bail!("more than one node needs the agents in local mode");
        }
        let mut lab = Lab::with_nodes(options.nodes)?;
        lab.set_stack(options.families.stack())?;
        // Pods, then hosts, dealt to the nodes in turn.
        let mut next_node = (0..options.nodes).cycle();
        for (ns, labels) in &plan.namespaces {
            lab.set_namespace_labels(ns, without_metadata_name(labels));
        }
        for node in 0..options.nodes {
            lab.set_node_labels(node, plan.node_labels.clone())?;
        }
        // hostNetwork pods one per node (they serve on the node's addresses).
        let host_network = plan.pods.iter().filter(|p| p.host_network).count();
        if host_network > options.nodes {
            bail!("{host_network} hostNetwork pods need as many nodes (--nodes {host_network})");
        }
        let mut next_host_network_node = 0..options.nodes;
        for pod in &plan.pods {
            let (ns, name) = case::split_pod(&pod.name)?;
            let node = if pod.host_network {
                next_host_network_node.next().expect("counted above")
            } else {
                next_node.next().expect("cycles forever")
            };
            let mut spec = PodSpec::new(ns, name)
                .ports(pod.ports.iter().map(lab_port))
                .on_node(node);
            spec.labels = pod.labels.clone();
            if pod.host_network {
                spec = spec.host_network();
            }
            lab.add_pod(spec)
                .with_context(|| format!("creating pod {}", pod.name))?;
        }
        if options.via == Via::Service {
            if options.proxy_mode == ProxyMode::Nftables {
                lab.set_proxy_mode(netpol_lab::ProxyMode::Nftables)?;
            }
            // Upstream probes hostNetwork pods at their address, as hosts.
            for pod in plan.pods.iter().filter(|p| !p.host_network) {
                lab.add_service(own_service(pod)?)
                    .with_context(|| format!("creating the Service of {}", pod.name))?;
            }
        }
        for host in &plan.hosts {
            let ports: Vec<Port> = host.ports.iter().map(lab_port).collect();
            let node = next_node.next().expect("cycles forever");
            let mut addrs = Vec::new();
            if lab.stack().has(Family::V4) {
                addrs.push(IpAddr::V4(host.ip));
            }
            if lab.stack().has(Family::V6) {
                addrs.push(IpAddr::V6(netpol_lab::ipv6_image(host.ip)));
            }
            lab.add_host_on(node, &host.name, &addrs, &ports)
                .with_context(|| format!("creating host/{}", host.name))?;
        }
        let manifests = ManifestDir::create(lab.workdir().join("manifests"))?;
        let kube = match options.source {
            SourceKind::Local => None,
            SourceKind::Kube => Some(kube::KubeFeed::start(&lab, options.faults)?),
        };
        Ok(Runner {
            lab,
            manifests,
            kube,
            agents: Vec::new(),
            policies: BTreeMap::new(),
            has_cluster_network_policies: case.steps.iter().any(|step| {
                step.apply.iter().any(|object| {
                    object.get("kind").and_then(Value::as_str) == Some("ClusterNetworkPolicy")
                })
            }),
            options,
        })
    }

    fn policies_yaml(&self) -> Result<String> {
        let mut out = String::new();
        for policy in self.policies.values() {
            out.push_str("---\n");
            out.push_str(&serde_norway::to_string(policy).context("rendering a policy")?);
        }
        Ok(out)
    }

    /// Writes the manifests and waits until the agent has them in the kernel.
    fn sync(&mut self) -> Result<()> {
        let yaml = self.policies_yaml()?;
        let mut generation = self.manifests.write(&self.lab, &yaml)?;
        if let Some(kube) = &mut self.kube {
            generation = kube.publish(&self.lab, self.manifests.path())?;
        }
        if self.agents.is_empty() {
            for node in 0..self.lab.nodes().len() {
                self.agents.push(match &self.kube {
                    None => AgentProcess::start_on(
                        &self.lab,
                        node,
                        &self.options.agent,
                        &self.manifests,
                    )?,
                    Some(kube) => AgentProcess::start_with_source_on(
                        &self.lab,
                        node,
                        &self.options.agent,
                        &kube.agent_args(),
                    )?,
                });
            }
        }
        let several = self.agents.len() > 1;
        for (node, agent) in self.agents.iter_mut().enumerate() {
            let on = if several {
                format!(" on {}", Lab::node_name(node))
            } else {
                String::new()
            };
            let status = agent
                .wait_generation(generation, self.options.apply_timeout)
                .map_err(|e| {
                    let e = anyhow::Error::new(e);
                    if several {
                        e.context(format!("node {node}"))
                    } else {
                        e
                    }
                })?;
            if status.invalid > 0 {
                bail!(
                    "the agent{on} rejected {} object(s) of this step; see its log",
                    status.invalid
                );
            }
        }
        Ok(())
    }

    fn apply_step(&mut self, case: &Case, step: &Step) -> Result<()> {
        for object in &step.apply {
            let object =
                case.object_for(&expand_templates(object, &self.lab)?, self.options.families);
            let kind = object
                .get("kind")
                .and_then(Value::as_str)
                .unwrap_or_default();
            let metadata = object.get("metadata");
            let name = metadata
                .and_then(|m| m.get("name"))
                .and_then(Value::as_str)
                .with_context(|| format!("apply: a {kind} without metadata.name"))?;
            let key = match kind {
                "NetworkPolicy" => {
                    let namespace = metadata
                        .and_then(|m| m.get("namespace"))
                        .and_then(Value::as_str)
                        .unwrap_or("default");
                    PolicyName::Namespaced(namespace.to_owned(), name.to_owned())
                }
                "ClusterNetworkPolicy" => PolicyName::Cluster(name.to_owned()),
                _ => bail!(
                    "apply: only NetworkPolicy and ClusterNetworkPolicy objects can be \
                     applied, not {kind:?}"
                ),
            };
            self.policies.insert(key, object.clone());
        }
        for target in &step.delete {
            let key = match target.strip_prefix("ClusterNetworkPolicy/") {
                Some(name) => PolicyName::Cluster(name.to_owned()),
                None => {
                    let (ns, name) =
                        case::split_pod(target).with_context(|| format!("delete: {target:?}"))?;
                    PolicyName::Namespaced(ns.to_owned(), name.to_owned())
                }
            };
            if self.policies.remove(&key).is_none() {
                bail!("delete: no policy {target}");
            }
        }
        if step.delete_all_policies {
            self.policies.clear();
        }
        for (pod, labels) in &step.pod_labels {
            self.lab.set_pod_labels(pod, labels.clone())?;
        }
        for (ns, labels) in &step.namespace_labels {
            if !self.lab.namespaces().contains_key(ns) {
                bail!("namespace_labels: no namespace {ns}");
            }
            self.lab
                .set_namespace_labels(ns, without_metadata_name(labels));
        }
        self.sync()
    }

    /// Which endpoints run on which node, for failure reports: `lab-node: x/a, y/b, ...`.
    fn placement(&self) -> String {
        let mut lines = Vec::new();
        for (n, node) in self.lab.nodes().iter().enumerate() {
            let pods = self
                .lab
                .pods()
                .iter()
                .filter(|p| p.node == n)
                .map(|p| p.id());
            let hosts = self.lab.hosts().iter().filter(|h| h.node == n);
            let names: Vec<String> = pods
                .chain(hosts.map(|h| format!("host/{}", h.name)))
                .collect();
            lines.push(format!("{}: {}", node.name, names.join(", ")));
        }
        format!("--- placement ---\n  {}", lines.join("\n  "))
    }

    /// Probe endpoints: pods, then hosts, with what they serve.
    fn endpoints(&self) -> Vec<Endpoint> {
        let pods = self.lab.pods().iter().map(|p| Endpoint {
            source: !p.host_network,
            ..Endpoint::new(
                p.id(),
                p.ports.iter().map(|q| (q.port, q.protocol)).collect(),
            )
        });
        let hosts = self.lab.hosts().iter().map(|h| {
            Endpoint::new(
                format!("host/{}", h.name),
                h.ports.iter().map(|q| (q.port, q.protocol)).collect(),
            )
        });
        pods.chain(hosts).collect()
    }

    fn check(&self, step: &Step, index: usize) -> Result<StepResult> {
        let via_service = self.options.via == Via::Service;
        // Upstream subjects hairpin traffic to ClusterNetworkPolicy (FORMAT.md): not
        // checked in cases that carry any.
        let hairpin = via_service && !self.has_cluster_network_policies;
        let families = self.lab.stack().families();
        check_step_with(
            step,
            index,
            &self.endpoints(),
            families,
            hairpin,
            |probes| {
                let probes: Vec<Probe> = if via_service {
                    probes
                        .iter()
                        .map(|p| through_service(p, &self.lab))
                        .collect()
                } else {
                    probes.to_vec()
                };
                let results = self.lab.probe_all(&probes, self.options.timeout)?;
                Ok(results.into_iter().map(|r| r.outcome).collect())
            },
        )
    }

    fn run(mut self, case: &Case, result: &mut CaseResult) -> Result<()> {
        // Step 0: the cluster without policies, so the agent is up before the first change.
        self.sync().context("starting the agent")?;
        let outcome = (|| -> Result<()> {
            for (index, step) in case.steps.iter().enumerate() {
                self.apply_step(case, step)
                    .with_context(|| format!("step {}", index + 1))?;
                let checked = self
                    .check(step, index + 1)
                    .with_context(|| format!("step {}", index + 1))?;
                result.probes += checked.expects.iter().map(|e| e.cells.len()).sum::<usize>();
                result.steps.push(checked);
            }
            Ok(())
        })();
        let failed = outcome.is_err()
            || result
                .steps
                .iter()
                .any(|s| s.expects.iter().any(|e| e.wrong() > 0));
        if failed && !self.agents.is_empty() {
            let mut logs: Vec<String> = self.agents.iter().map(|a| a.log_tail(30)).collect();
            if self.agents.len() > 1 {
                logs.insert(0, self.placement());
            }
            result.agent_log = Some(logs.join("\n"));
        }
        outcome
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_host_network_pod_is_probed_but_never_probes() {
        let case: Case = serde_norway::from_str(
            "name: t\n\
             cluster:\n  node_labels: {kubernetes.io/os: linux}\n  pods:\n\
             \x20   - {name: x/a, ports: [{port: 80}]}\n\
             \x20   - {name: x/b, ports: [{port: 80}]}\n\
             \x20   - {name: infra/agent, hostNetwork: true, ports: [{port: 80}]}\n\
             steps: [{expect: [{port: 80, protocol: TCP, default: allowed}]}]\n",
        )
        .unwrap();
        let plan = ClusterPlan::of(&case).unwrap();
        assert_eq!(plan.node_labels["kubernetes.io/os"], "linux");
        let endpoints: Vec<Endpoint> = plan
            .pods
            .iter()
            .map(|p| Endpoint {
                source: !p.host_network,
                ..Endpoint::new(p.name.clone(), vec![(80, netpol_lab::Protocol::Tcp)])
            })
            .collect();
        let mut seen = Vec::new();
        check_step_with(
            &case.steps[0],
            1,
            &endpoints,
            &[Family::V4],
            false,
            |probes| {
                seen = probes
                    .iter()
                    .map(|p| format!("{} -> {}", p.src, p.dst))
                    .collect();
                Ok(probes
                    .iter()
                    .map(|_| netpol_lab::Outcome::Allowed)
                    .collect())
            },
        )
        .unwrap();
        seen.sort();
        assert_eq!(
            seen,
            [
                "x/a -> infra/agent",
                "x/a -> x/b",
                "x/b -> infra/agent",
                "x/b -> x/a"
            ]
        );
    }
}
