//! The conformance cases against a real cluster (`cargo xtask kind-e2e`): the same case
//! files, expected verdicts, comparison and reports as the emulated runner, with real
//! pods created through kubectl and probes run with `kubectl exec`.
//!
//! For each case, one at a time (cases reuse namespace names such as `x` and `default`):
//!
//! 1. its namespaces are created with their labels (namespaces that already exist, such
//!    as `default` or `kube-system`, are borrowed: labels set, restored afterwards);
//! 2. its pods are created, dealt in turn to the schedulable nodes (`spec.nodeName`, so
//!    most probes cross nodes). Each pod runs agnhost (the upstream e2e test image):
//!    a `probe` container (`agnhost pause`, the probe source) and one `agnhost porter`
//!    container per protocol serving every declared port, with the declared
//!    containerPorts (named ports included);
//! 3. hosts (endpoints outside the cluster) are Docker containers on the kind network:
//!    each gets its declared address on its loopback, routes to every node's pod CIDR
//!    (with that address as source) and to the other hosts, and every node gets a /32
//!    route to it, so host traffic crosses a node the way external traffic does;
//! 4. once the pods are Ready, every step is applied with kubectl (policies, label
//!    changes), then a namespace annotation is bumped and the runner waits until the
//!    agent on every node reports that resourceVersion in its status file (read with
//!    `docker exec <node> cat /run/netpol/status.json`), plus a short settle;
//! 5. every probe runs as `agnhost connect IP:PORT --protocol=... --timeout=...`, through
//!    `kubectl exec` (pods) or `docker exec` (hosts), a bounded number at a time;
//! 6. a guard deletes what the case created (namespaces, pods and policies in borrowed
//!    namespaces, host containers and node routes) and restores borrowed labels, also
//!    when the case fails. Leftovers of an interrupted run are swept at the start.
//!
//! What FORMAT.md cannot say on a real cluster: nothing. It has no node endpoint, so no
//! probe runs from a node. SCTP needs the `sctp` module on the Docker host (the porter
//! serving SCTP exits otherwise, and its pod never becomes Ready).

use std::collections::{BTreeMap, BTreeSet};
use std::io::{Read, Write};
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use netpol_lab::{self as lab, Outcome, Probe};
use serde::Deserialize;
use serde_json::{Value, json};

use super::case::{
    self, Addresses, Case, ClusterPlan, HostDef, METADATA_NAME, PodDef, PortDef, Protocol, Step,
    expand_templates,
};
use super::{CaseResult, Summary, check_step};
use crate::ui;

/// The upstream e2e test image (`agnhost porter` serves, `agnhost connect` probes);
/// the version the Kubernetes e2e suite pins.
pub const AGNHOST: &str = "registry.k8s.io/e2e-test-images/agnhost:2.52";
/// Marks every namespace, pod and container a case creates (an annotation, not a label:
/// labels are what policies select).
pub const ANNOTATION: &str = "netpol.dev/conformance";
/// Bumped after every step; its resourceVersion is what the agents must report.
const STEP_ANNOTATION: &str = "netpol.dev/conformance-step";
/// The container probes run in.
pub const PROBE_CONTAINER: &str = "probe";
/// The agent's status file on every node (deploy/netpol-agent.yaml).
const STATUS_FILE: &str = "/run/netpol/status.json";
/// What porter answers (UDP probes need a non-empty reply).
const REPLY: &str = "netpol";

/// How to run against the cluster.
#[derive(Clone, Debug)]
pub struct Options {
    /// kubectl context (`kind-<cluster>`); `None`: the current one.
    pub context: Option<String>,
    /// The Docker network of the nodes, where host containers go (`kind`).
    pub docker_network: String,
    /// `agnhost connect --timeout`, per probe.
    pub probe_timeout: Duration,
    /// Probes in flight at once (each is a kubectl or docker process).
    pub parallel: usize,
    /// How long pods may take to become Ready (first image pull included).
    pub ready_timeout: Duration,
    /// How long the agents may take to report a step.
    pub apply_timeout: Duration,
    /// Pause after every agent reported a step (watches of different kinds are separate
    /// streams; this covers an event of one arriving after a later one of another).
    pub settle: Duration,
    pub json: Option<PathBuf>,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            context: None,
            docker_network: "kind".into(),
            probe_timeout: Duration::from_secs(2),
            parallel: 8,
            ready_timeout: Duration::from_secs(180),
            apply_timeout: Duration::from_secs(60),
            settle: Duration::from_secs(1),
            json: None,
        }
    }
}

// ----- commands ---------------------------------------------------------------------

/// What a finished command printed.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Output {
    pub success: bool,
    pub stdout: String,
    pub stderr: String,
}

/// `program args...` as one line, for messages.
pub fn command_line(program: &str, args: &[String]) -> String {
    std::iter::once(program.to_owned())
        .chain(args.iter().cloned())
        .collect::<Vec<_>>()
        .join(" ")
}

/// Runs a command with a deadline, `stdin` written to it; fails only when it cannot be
/// started or times out (it is killed then).
pub fn output(
    program: &str,
    args: &[String],
    stdin: Option<&str>,
    timeout: Duration,
) -> Result<Output> {
    let mut child = Command::new(program)
        .args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("running {program} (is it installed?)"))?;
    let writer = stdin.map(|text| {
        let mut pipe = child.stdin.take().expect("piped");
        let text = text.to_owned();
        std::thread::spawn(move || {
            let _ = pipe.write_all(text.as_bytes());
        })
    });
    let read = |mut pipe: Box<dyn Read + Send>| {
        std::thread::spawn(move || {
            let mut text = String::new();
            let _ = pipe.read_to_string(&mut text);
            text
        })
    };
    let stdout = read(Box::new(child.stdout.take().expect("piped")));
    let stderr = read(Box::new(child.stderr.take().expect("piped")));
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break status;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            bail!(
                "`{}` timed out after {timeout:?}",
                command_line(program, args)
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    if let Some(writer) = writer {
        let _ = writer.join();
    }
    Ok(Output {
        success: status.success(),
        stdout: stdout.join().unwrap_or_default(),
        stderr: stderr.join().unwrap_or_default(),
    })
}

/// Like [`output`], but fails with the command's stderr unless it succeeds; returns
/// stdout.
pub fn exec(
    program: &str,
    args: &[String],
    stdin: Option<&str>,
    timeout: Duration,
) -> Result<String> {
    let out = output(program, args, stdin, timeout)?;
    if !out.success {
        bail!(
            "`{}` failed: {}",
            command_line(program, args),
            out.stderr.trim()
        );
    }
    Ok(out.stdout)
}

fn strings(args: &[&str]) -> Vec<String> {
    args.iter().map(|s| s.to_string()).collect()
}

/// kubectl with a fixed context.
#[derive(Clone, Debug, Default)]
pub struct Kubectl {
    pub context: Option<String>,
}

impl Kubectl {
    /// The full argument list: `--context C` first when set.
    pub fn args(&self, rest: &[&str]) -> Vec<String> {
        let mut args = Vec::new();
        if let Some(context) = &self.context {
            args.push("--context".to_owned());
            args.push(context.clone());
        }
        args.extend(strings(rest));
        args
    }

    pub fn run(&self, rest: &[&str]) -> Result<String> {
        exec("kubectl", &self.args(rest), None, Duration::from_secs(120))
    }

    /// `kubectl <rest> -f -` with `objects` as a List on stdin.
    pub fn with_objects(&self, rest: &[&str], objects: &[Value]) -> Result<String> {
        let list = json!({"apiVersion": "v1", "kind": "List", "items": objects});
        let mut rest = rest.to_vec();
        rest.extend(["-f", "-"]);
        exec(
            "kubectl",
            &self.args(&rest),
            Some(&list.to_string()),
            Duration::from_secs(120),
        )
    }
}

fn docker(args: &[&str]) -> Result<String> {
    exec("docker", &strings(args), None, Duration::from_secs(120))
}

// ----- nodes ------------------------------------------------------------------------

/// A node as the runner needs it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Node {
    pub name: String,
    pub internal_ip: Ipv4Addr,
    pub pod_cidrs: Vec<String>,
    /// No NoSchedule/NoExecute taint: case pods go there.
    pub schedulable: bool,
}

/// The nodes of `kubectl get nodes -o json`.
pub fn parse_nodes(json: &str) -> Result<Vec<Node>> {
    let list: Value = serde_json::from_str(json).context("parsing kubectl get nodes")?;
    let mut nodes = Vec::new();
    for item in list["items"].as_array().context("no items")? {
        let name = item["metadata"]["name"]
            .as_str()
            .context("a node without a name")?
            .to_owned();
        let internal_ip = item["status"]["addresses"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|a| a["type"] == "InternalIP")
            .find_map(|a| a["address"].as_str()?.parse::<Ipv4Addr>().ok())
            .with_context(|| format!("node {name} has no IPv4 InternalIP"))?;
        let mut pod_cidrs: Vec<String> = item["spec"]["podCIDRs"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|c| c.as_str().map(str::to_owned))
            .collect();
        if pod_cidrs.is_empty() {
            pod_cidrs.extend(item["spec"]["podCIDR"].as_str().map(str::to_owned));
        }
        pod_cidrs.retain(|c| !c.contains(':'));
        let schedulable = item["spec"]["unschedulable"] != true
            && !item["spec"]["taints"]
                .as_array()
                .into_iter()
                .flatten()
                .any(|t| t["effect"] == "NoSchedule" || t["effect"] == "NoExecute");
        nodes.push(Node {
            name,
            internal_ip,
            pod_cidrs,
            schedulable,
        });
    }
    Ok(nodes)
}

// ----- objects ----------------------------------------------------------------------

fn annotations(case: &str) -> Value {
    json!({ ANNOTATION: case })
}

/// A namespace of a case: its labels (with `kubernetes.io/metadata.name`, which the API
/// server would add anyway), annotated with the case.
pub fn namespace_object(name: &str, labels: &BTreeMap<String, String>, case: &str) -> Value {
    let mut labels = labels.clone();
    labels.insert(METADATA_NAME.to_owned(), name.to_owned());
    json!({
        "apiVersion": "v1",
        "kind": "Namespace",
        "metadata": {"name": name, "labels": labels, "annotations": annotations(case)},
    })
}

fn protocol_word(protocol: Protocol) -> &'static str {
    match protocol {
        Protocol::Tcp => "tcp",
        Protocol::Udp => "udp",
        Protocol::Sctp => "sctp",
    }
}

/// The porter variable that makes it serve `port`: `SERVE_PORT_80` (TCP),
/// `SERVE_UDP_PORT_80`, `SERVE_SCTP_PORT_80`.
pub fn porter_env(port: &PortDef) -> String {
    match port.protocol {
        Protocol::Tcp => format!("SERVE_PORT_{}", port.port),
        Protocol::Udp => format!("SERVE_UDP_PORT_{}", port.port),
        Protocol::Sctp => format!("SERVE_SCTP_PORT_{}", port.port),
    }
}

/// A pod of a case: a probe container, and one porter per protocol serving the declared
/// ports, which it lists as containerPorts (named ports included).
pub fn pod_object(pod: &PodDef, node: Option<&str>, case: &str, image: &str) -> Result<Value> {
    let (namespace, name) = case::split_pod(&pod.name)?;
    let mut containers = vec![json!({
        "name": PROBE_CONTAINER,
        "image": image,
        "imagePullPolicy": "IfNotPresent",
        "args": ["pause"],
    })];
    for protocol in [Protocol::Tcp, Protocol::Udp, Protocol::Sctp] {
        let ports: Vec<&PortDef> = pod
            .ports
            .iter()
            .filter(|p| p.protocol == protocol)
            .collect();
        if ports.is_empty() {
            continue;
        }
        let container_ports: Vec<Value> = ports
            .iter()
            .map(|p| {
                let mut port = json!({"containerPort": p.port, "protocol": p.protocol.to_string()});
                if let Some(name) = &p.name {
                    port["name"] = json!(name);
                }
                port
            })
            .collect();
        let env: Vec<Value> = ports
            .iter()
            .map(|p| json!({"name": porter_env(p), "value": REPLY}))
            .collect();
        containers.push(json!({
            "name": format!("serve-{}", protocol_word(protocol)),
            "image": image,
            "imagePullPolicy": "IfNotPresent",
            "args": ["porter"],
            "env": env,
            "ports": container_ports,
        }));
    }
    let mut spec = json!({
        "containers": containers,
        "terminationGracePeriodSeconds": 1,
        "automountServiceAccountToken": false,
        "enableServiceLinks": false,
    });
    if let Some(node) = node {
        spec["nodeName"] = json!(node);
    }
    Ok(json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": name,
            "namespace": namespace,
            "labels": pod.labels,
            "annotations": annotations(case),
        },
        "spec": spec,
    }))
}

/// `kubectl label` arguments turning `old` into `new` (`k=v` to set, `k-` to remove);
/// `kubernetes.io/metadata.name` is left alone. Empty: nothing changes.
pub fn label_changes(
    old: &BTreeMap<String, String>,
    new: &BTreeMap<String, String>,
) -> Vec<String> {
    let mut args = Vec::new();
    for (key, value) in new {
        if key != METADATA_NAME && old.get(key) != Some(value) {
            args.push(format!("{key}={value}"));
        }
    }
    for key in old.keys() {
        if key != METADATA_NAME && !new.contains_key(key) {
            args.push(format!("{key}-"));
        }
    }
    args
}

// ----- probes -----------------------------------------------------------------------

fn lab_protocol_word(protocol: lab::Protocol) -> &'static str {
    match protocol {
        lab::Protocol::Tcp => "tcp",
        lab::Protocol::Udp => "udp",
        lab::Protocol::Sctp => "sctp",
    }
}

/// `/agnhost connect IP:PORT --protocol=P --timeout=Nms`, as the upstream e2e suite
/// probes: TCP succeeds on a completed handshake, UDP when the datagram's reply comes
/// back, SCTP when the association is up and the server's message arrives.
pub fn agnhost_connect(
    ip: Ipv4Addr,
    port: u16,
    protocol: lab::Protocol,
    timeout: Duration,
) -> Vec<String> {
    vec![
        "/agnhost".into(),
        "connect".into(),
        format!("{ip}:{port}"),
        format!("--protocol={}", lab_protocol_word(protocol)),
        format!("--timeout={}ms", timeout.as_millis()),
    ]
}

/// `kubectl exec` of a probe from pod `ns/pod`: (program, arguments).
pub fn pod_probe_command(
    kubectl: &Kubectl,
    src: &str,
    connect: &[String],
) -> Result<(&'static str, Vec<String>)> {
    let (ns, pod) = case::split_pod(src)?;
    let mut args = kubectl.args(&["exec", "-n", ns, pod, "-c", PROBE_CONTAINER, "--"]);
    args.extend(connect.iter().cloned());
    Ok(("kubectl", args))
}

/// `docker exec` of a probe from a host container: (program, arguments).
pub fn host_probe_command(container: &str, connect: &[String]) -> (&'static str, Vec<String>) {
    let mut args = strings(&["exec", container]);
    args.extend(connect.iter().cloned());
    ("docker", args)
}

/// What a probe's command observed. agnhost exits 0 on success and otherwise prints
/// `TIMEOUT`, `REFUSED`, `DNS`, `OTHER` or `UNKNOWN` first on a line of stderr; only a
/// timeout is a block (a policy drops silently), anything else means the setup is
/// broken, including kubectl or docker failing before agnhost ran.
pub fn parse_probe(out: &Output) -> Outcome {
    if out.success {
        return Outcome::Allowed;
    }
    const CODES: [&str; 5] = ["TIMEOUT", "REFUSED", "DNS", "OTHER", "UNKNOWN"];
    let agnhost = out.stderr.lines().map(str::trim).find(|line| {
        CODES.iter().any(|c| {
            line.strip_prefix(c)
                .is_some_and(|r| r.is_empty() || r.starts_with(':'))
        })
    });
    match agnhost {
        Some(line) if line.starts_with("TIMEOUT") => Outcome::Blocked,
        Some(line) => Outcome::Rejected(line.to_owned()),
        None => {
            let first = out
                .stderr
                .lines()
                .map(str::trim)
                .find(|l| !l.is_empty() && !l.starts_with("command terminated with exit code"))
                .unwrap_or("failed without a message");
            Outcome::Rejected(format!("probe did not run: {first}"))
        }
    }
}

/// Runs `commands` (program, arguments), at most `parallel` at once, each bounded by
/// `timeout`; one outcome each, in order.
fn run_probes(
    commands: Vec<(&'static str, Vec<String>)>,
    parallel: usize,
    timeout: Duration,
) -> Vec<Outcome> {
    let next = AtomicUsize::new(0);
    let results = Mutex::new(vec![None; commands.len()]);
    std::thread::scope(|scope| {
        for _ in 0..parallel.clamp(1, commands.len().max(1)) {
            scope.spawn(|| {
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let Some((program, args)) = commands.get(i) else {
                        return;
                    };
                    let outcome = match output(program, args, None, timeout) {
                        Ok(out) => parse_probe(&out),
                        Err(e) => Outcome::Rejected(format!("{e:#}")),
                    };
                    results.lock().expect("not poisoned")[i] = Some(outcome);
                }
            });
        }
    });
    results
        .into_inner()
        .expect("not poisoned")
        .into_iter()
        .map(|o| o.expect("every probe ran"))
        .collect()
}

// ----- the agents' status -----------------------------------------------------------

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

// ----- hosts ------------------------------------------------------------------------

/// A host of a case: a Docker container on the nodes' network.
#[derive(Clone, Debug)]
struct HostContainer {
    name: String,
    container: String,
    ip: Ipv4Addr,
    docker_ip: Ipv4Addr,
    ports: Vec<PortDef>,
}

/// `docker run` arguments of a host container serving `host`'s ports.
pub fn host_run_args(container: &str, network: &str, case: &str, host: &HostDef) -> Vec<String> {
    let mut args = strings(&[
        "run",
        "--detach",
        "--rm",
        "--name",
        container,
        "--network",
        network,
        "--cap-add",
        "NET_ADMIN",
        "--label",
    ]);
    args.push(format!("{ANNOTATION}={case}"));
    for port in &host.ports {
        args.push("--env".into());
        args.push(format!("{}={REPLY}", porter_env(port)));
    }
    args.push(AGNHOST.into());
    args.push("porter".into());
    args
}

/// Inside the host container: its declared address, and routes to every node's pods
/// and to the other hosts, all with that address as source.
pub fn host_route_commands(
    ip: Ipv4Addr,
    nodes: &[Node],
    others: &[(Ipv4Addr, Ipv4Addr)],
) -> Vec<Vec<String>> {
    let mut commands = vec![strings(&[
        "ip",
        "addr",
        "add",
        &format!("{ip}/32"),
        "dev",
        "lo",
    ])];
    let src = ip.to_string();
    for node in nodes {
        for cidr in &node.pod_cidrs {
            let via = node.internal_ip.to_string();
            commands.push(strings(&[
                "ip", "route", "replace", cidr, "via", &via, "src", &src,
            ]));
        }
    }
    for (other, via) in others {
        let dst = format!("{other}/32");
        let via = via.to_string();
        commands.push(strings(&[
            "ip", "route", "replace", &dst, "via", &via, "src", &src,
        ]));
    }
    commands
}

// ----- the runner -------------------------------------------------------------------

/// Removes leftovers of an interrupted run: annotated namespaces, annotated pods in
/// other namespaces, labelled host containers.
fn sweep(kubectl: &Kubectl) -> Result<()> {
    let namespaces: Value =
        serde_json::from_str(&kubectl.run(&["get", "namespaces", "-o", "json"])?)?;
    let stale: Vec<String> = namespaces["items"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|ns| !ns["metadata"]["annotations"][ANNOTATION].is_null())
        .filter_map(|ns| ns["metadata"]["name"].as_str().map(str::to_owned))
        .collect();
    if !stale.is_empty() {
        ui::doing(&format!(
            "removing leftover namespaces {}",
            stale.join(", ")
        ));
        let mut args = vec!["delete", "namespace", "--wait=true", "--timeout=180s"];
        args.extend(stale.iter().map(String::as_str));
        kubectl.run(&args)?;
    }
    let pods: Value = serde_json::from_str(&kubectl.run(&["get", "pods", "-A", "-o", "json"])?)?;
    for pod in pods["items"].as_array().into_iter().flatten() {
        if pod["metadata"]["annotations"][ANNOTATION].is_null() {
            continue;
        }
        let (Some(ns), Some(name)) = (
            pod["metadata"]["namespace"].as_str(),
            pod["metadata"]["name"].as_str(),
        ) else {
            continue;
        };
        ui::doing(&format!("removing leftover pod {ns}/{name}"));
        kubectl.run(&[
            "delete",
            "pod",
            "-n",
            ns,
            name,
            "--wait=true",
            "--timeout=60s",
        ])?;
    }
    let containers = docker(&["ps", "-aq", "--filter", &format!("label={ANNOTATION}")])?;
    for id in containers.split_whitespace() {
        docker(&["rm", "-f", id])?;
    }
    Ok(())
}

/// Runs every case on the cluster, one at a time; prints like the emulated runner.
pub fn run(files: &[PathBuf], options: &Options) -> Result<Summary> {
    let kubectl = Kubectl {
        context: options.context.clone(),
    };
    sweep(&kubectl).context("removing leftovers of an earlier run")?;
    let nodes = parse_nodes(&kubectl.run(&["get", "nodes", "-o", "json"])?)?;
    if !nodes.iter().any(|n| n.schedulable) {
        bail!("no schedulable node in the cluster");
    }
    super::run_cases(files, 1, options.json.as_deref(), |file| {
        super::run_case_with(file, |case, result| {
            let mut runner = ClusterRunner::new(case, options, &kubectl, &nodes)?;
            let outcome = runner.run(case, result);
            let failed = outcome.is_err()
                || result
                    .steps
                    .iter()
                    .any(|s| s.expects.iter().any(|e| e.wrong() > 0));
            if failed {
                result.agent_log = runner.agent_logs();
            }
            outcome
        })
    })
}

/// What a case created or changed, undone on drop (also when the case fails).
struct Cleanup<'a> {
    kubectl: &'a Kubectl,
    /// Namespaces the case created: deleted with everything in them.
    namespaces: Vec<String>,
    /// Borrowed namespaces and their labels before the case.
    borrowed: BTreeMap<String, BTreeMap<String, String>>,
    /// Pods and policies the case put into borrowed namespaces.
    pods: Vec<(String, String)>,
    policies: BTreeSet<(String, String)>,
    /// Host containers, and `(node, host ip)` routes on the nodes.
    containers: Vec<String>,
    routes: Vec<(String, Ipv4Addr)>,
}

impl Cleanup<'_> {
    fn undo(&mut self) -> Result<()> {
        let mut errors = Vec::new();
        let mut note = |r: Result<String>| {
            if let Err(e) = r {
                errors.push(format!("{e:#}"));
            }
        };
        for (node, ip) in self.routes.drain(..) {
            note(docker(&[
                "exec",
                &node,
                "ip",
                "route",
                "del",
                &format!("{ip}/32"),
            ]));
        }
        for container in self.containers.drain(..) {
            note(docker(&["rm", "-f", &container]));
        }
        for (ns, name) in std::mem::take(&mut self.policies) {
            if self.borrowed.contains_key(&ns) {
                note(self.kubectl.run(&[
                    "delete",
                    "networkpolicy",
                    "-n",
                    &ns,
                    &name,
                    "--ignore-not-found",
                ]));
            }
        }
        for (ns, name) in self.pods.drain(..) {
            note(self.kubectl.run(&[
                "delete",
                "pod",
                "-n",
                &ns,
                &name,
                "--ignore-not-found",
                "--wait=true",
                "--timeout=60s",
            ]));
        }
        for (ns, labels) in std::mem::take(&mut self.borrowed) {
            let annotation = format!("{STEP_ANNOTATION}-");
            note(
                self.kubectl
                    .run(&["annotate", "namespace", &ns, &annotation]),
            );
            note(restore_labels(self.kubectl, &ns, &labels));
        }
        if !self.namespaces.is_empty() {
            let mut args = vec![
                "delete",
                "namespace",
                "--ignore-not-found",
                "--wait=true",
                "--timeout=180s",
            ];
            args.extend(self.namespaces.iter().map(String::as_str));
            note(self.kubectl.run(&args));
            self.namespaces.clear();
        }
        if !errors.is_empty() {
            bail!("cleaning up: {}", errors.join("; "));
        }
        Ok(())
    }
}

impl Drop for Cleanup<'_> {
    fn drop(&mut self) {
        if let Err(e) = self.undo() {
            ui::note(&ui::red(&format!("{e:#}")));
        }
    }
}

fn namespace_labels(kubectl: &Kubectl, ns: &str) -> Result<BTreeMap<String, String>> {
    let object: Value =
        serde_json::from_str(&kubectl.run(&["get", "namespace", ns, "-o", "json"])?)?;
    Ok(serde_json::from_value(object["metadata"]["labels"].clone()).unwrap_or_default())
}

fn relabel(
    kubectl: &Kubectl,
    kind: &str,
    ns: &str,
    name: &str,
    old: &BTreeMap<String, String>,
    new: &BTreeMap<String, String>,
) -> Result<()> {
    let changes = label_changes(old, new);
    if changes.is_empty() {
        return Ok(());
    }
    let mut args = vec!["label", kind, "--overwrite"];
    if kind == "pod" {
        args.extend(["-n", ns, name]);
    } else {
        args.push(name);
    }
    args.extend(changes.iter().map(String::as_str));
    kubectl.run(&args).map(drop)
}

fn restore_labels(
    kubectl: &Kubectl,
    ns: &str,
    labels: &BTreeMap<String, String>,
) -> Result<String> {
    let now = namespace_labels(kubectl, ns)?;
    relabel(kubectl, "namespace", "", ns, &now, labels)?;
    Ok(String::new())
}

struct ClusterRunner<'a> {
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
    fn new(
        case: &Case,
        options: &'a Options,
        kubectl: &'a Kubectl,
        nodes: &'a [Node],
    ) -> Result<Self> {
        let plan = ClusterPlan::of(case)?;
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
        let network = self.options.docker_network.clone();
        for host in &self.plan.hosts {
            let container = format!("netpol-conformance-{}", host.name);
            let args = host_run_args(&container, &network, &self.case, host);
            exec("docker", &args, None, Duration::from_secs(300))?;
            self.cleanup.containers.push(container.clone());
            let format =
                format!("{{{{(index .NetworkSettings.Networks \"{network}\").IPAddress}}}}");
            let docker_ip: Ipv4Addr = docker(&["inspect", "-f", &format, &container])?
                .trim()
                .parse()
                .with_context(|| format!("the address of {container} on network {network}"))?;
            self.hosts.push(HostContainer {
                name: host.name.clone(),
                container,
                ip: host.ip,
                docker_ip,
                ports: host.ports.clone(),
            });
        }
        for host in &self.hosts {
            let others: Vec<(Ipv4Addr, Ipv4Addr)> = self
                .hosts
                .iter()
                .filter(|h| h.name != host.name)
                .map(|h| (h.ip, h.docker_ip))
                .collect();
            for command in host_route_commands(host.ip, self.nodes, &others) {
                let mut args = strings(&["exec", &host.container]);
                args.extend(command);
                exec("docker", &args, None, Duration::from_secs(60))?;
            }
            for node in self.nodes {
                let dst = format!("{}/32", host.ip);
                docker(&[
                    "exec",
                    &node.name,
                    "ip",
                    "route",
                    "replace",
                    &dst,
                    "via",
                    &host.docker_ip.to_string(),
                ])?;
                self.cleanup.routes.push((node.name.clone(), host.ip));
            }
        }
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

    fn endpoints(&self) -> Vec<(String, Vec<(u16, lab::Protocol)>)> {
        let serves = |ports: &[PortDef]| {
            ports
                .iter()
                .map(|p| (p.port, super::lab_protocol(p.protocol)))
                .collect()
        };
        let pods = self
            .plan
            .pods
            .iter()
            .map(|p| (p.name.clone(), serves(&p.ports)));
        let hosts = self
            .hosts
            .iter()
            .map(|h| (format!("host/{}", h.name), serves(&h.ports)));
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

    fn run(&mut self, case: &Case, result: &mut CaseResult) -> Result<()> {
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
    fn agent_logs(&self) -> Option<String> {
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
    use std::path::Path;

    use k8s_openapi::api::core::v1::{Namespace, Pod};

    fn workspace() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
    }

    /// The first path present in `original` but lost in `typed` (an unknown field).
    fn unknown_field(original: &Value, typed: &Value, path: &str) -> Option<String> {
        match (original, typed) {
            (Value::Object(fields), Value::Object(known)) => fields.iter().find_map(|(k, v)| {
                let child = format!("{path}.{k}");
                match known.get(k) {
                    Some(t) => unknown_field(v, t, &child),
                    None => Some(child),
                }
            }),
            (Value::Array(items), Value::Array(known)) => items
                .iter()
                .zip(known)
                .enumerate()
                .find_map(|(i, (v, t))| unknown_field(v, t, &format!("{path}[{i}]"))),
            _ => None,
        }
    }

    fn strict<T: serde::de::DeserializeOwned + serde::Serialize>(value: &Value) -> T {
        let typed: T = serde_json::from_value(value.clone()).expect("a valid object");
        let round_trip = serde_json::to_value(&typed).unwrap();
        if let Some(field) = unknown_field(value, &round_trip, "") {
            panic!("unknown field {field}");
        }
        typed
    }

    #[test]
    fn pods_of_a_real_case_carry_labels_and_named_ports() {
        let file =
            workspace().join("tests/conformance/named-port-differs-between-destinations.yaml");
        let case = Case::load(&file).unwrap();
        let plan = ClusterPlan::of(&case).unwrap();
        let two = plan.pods.iter().find(|p| p.name == "app/two").unwrap();
        let object = pod_object(two, Some("kind-worker2"), &case.name, AGNHOST).unwrap();
        let pod: Pod = strict(&object);
        assert_eq!(pod.metadata.name.as_deref(), Some("two"));
        assert_eq!(pod.metadata.namespace.as_deref(), Some("app"));
        assert_eq!(pod.metadata.labels.as_ref().unwrap()["role"], "server");
        assert_eq!(
            pod.metadata.annotations.as_ref().unwrap()[ANNOTATION],
            "named-port-differs-between-destinations"
        );
        let spec = pod.spec.unwrap();
        assert_eq!(spec.node_name.as_deref(), Some("kind-worker2"));
        let names: Vec<&str> = spec.containers.iter().map(|c| c.name.as_str()).collect();
        assert_eq!(names, ["probe", "serve-tcp"]);
        let serve = &spec.containers[1];
        assert_eq!(serve.image.as_deref(), Some(AGNHOST));
        assert_eq!(serve.args.as_deref(), Some(&["porter".to_owned()][..]));
        let ports: Vec<(i32, Option<&str>, Option<&str>)> = serve
            .ports
            .as_ref()
            .unwrap()
            .iter()
            .map(|p| (p.container_port, p.name.as_deref(), p.protocol.as_deref()))
            .collect();
        // "web" is 9090 on this pod (8080 on app/one): the case depends on it.
        assert_eq!(
            ports,
            [(8080, None, Some("TCP")), (9090, Some("web"), Some("TCP"))]
        );
        let env: Vec<&str> = serve
            .env
            .as_ref()
            .unwrap()
            .iter()
            .map(|e| e.name.as_str())
            .collect();
        assert_eq!(env, ["SERVE_PORT_8080", "SERVE_PORT_9090"]);
        // A pod that serves nothing still has its probe container, and no porter.
        let client = plan.pods.iter().find(|p| p.name == "app/client").unwrap();
        let pod: Pod = strict(&pod_object(client, None, &case.name, AGNHOST).unwrap());
        let spec = pod.spec.unwrap();
        assert_eq!(spec.node_name, None);
        assert_eq!(spec.containers.len(), 1);
        assert_eq!(
            spec.containers[0].args.as_deref(),
            Some(&["pause".to_owned()][..])
        );
    }

    #[test]
    fn standard_cluster_pods_serve_every_protocol_on_named_ports() {
        let case: Case = serde_norway::from_str("name: t\nsteps: [{expect: []}]\n").unwrap();
        let plan = ClusterPlan::of(&case).unwrap();
        let pod: Pod = strict(&pod_object(&plan.pods[0], None, "t", AGNHOST).unwrap());
        let mut served = Vec::new();
        for container in &pod.spec.unwrap().containers[1..] {
            let env: BTreeSet<String> = container
                .env
                .iter()
                .flatten()
                .map(|e| e.name.clone())
                .collect();
            for port in container.ports.iter().flatten() {
                let protocol = port.protocol.clone().unwrap();
                let var = match protocol.as_str() {
                    "TCP" => format!("SERVE_PORT_{}", port.container_port),
                    other => format!("SERVE_{other}_PORT_{}", port.container_port),
                };
                assert!(
                    env.contains(&var),
                    "{} does not serve {var}",
                    container.name
                );
                served.push(port.name.clone().unwrap());
            }
        }
        served.sort();
        assert_eq!(
            served,
            [
                "serve-80-sctp",
                "serve-80-tcp",
                "serve-80-udp",
                "serve-81-sctp",
                "serve-81-tcp",
                "serve-81-udp"
            ]
        );
    }

    #[test]
    fn namespaces_keep_their_labels_and_get_the_metadata_name() {
        let labels = BTreeMap::from([("role".to_owned(), "client".to_owned())]);
        let ns: Namespace = strict(&namespace_object("client", &labels, "seed-stars"));
        let labels = ns.metadata.labels.unwrap();
        assert_eq!(labels["role"], "client");
        assert_eq!(labels[METADATA_NAME], "client");
        assert_eq!(labels.len(), 2);
        assert_eq!(ns.metadata.annotations.unwrap()[ANNOTATION], "seed-stars");
    }

    #[test]
    fn probe_command_lines() {
        let kubectl = Kubectl {
            context: Some("kind-netpol-e2e".into()),
        };
        let ip = Ipv4Addr::new(10, 244, 1, 7);
        let connect = agnhost_connect(ip, 81, lab::Protocol::Udp, Duration::from_secs(2));
        let (program, args) = pod_probe_command(&kubectl, "x/a", &connect).unwrap();
        assert_eq!(
            command_line(program, &args),
            "kubectl --context kind-netpol-e2e exec -n x a -c probe -- \
             /agnhost connect 10.244.1.7:81 --protocol=udp --timeout=2000ms"
        );
        let connect = agnhost_connect(ip, 80, lab::Protocol::Sctp, Duration::from_millis(1500));
        let (program, args) = host_probe_command("netpol-conformance-backup", &connect);
        assert_eq!(
            command_line(program, &args),
            "docker exec netpol-conformance-backup /agnhost connect 10.244.1.7:80 --protocol=sctp --timeout=1500ms"
        );
        let connect = agnhost_connect(ip, 80, lab::Protocol::Tcp, Duration::from_secs(1));
        let (_, args) = pod_probe_command(&Kubectl::default(), "default/db", &connect).unwrap();
        assert_eq!(args[..6], ["exec", "-n", "default", "db", "-c", "probe"]);
        assert!(args.contains(&"--protocol=tcp".to_owned()));
        assert!(pod_probe_command(&kubectl, "nopod", &connect).is_err());
    }

    fn failed(stderr: &str) -> Output {
        Output {
            success: false,
            stdout: String::new(),
            stderr: stderr.into(),
        }
    }

    #[test]
    fn probe_results() {
        let ok = Output {
            success: true,
            ..Output::default()
        };
        assert_eq!(parse_probe(&ok), Outcome::Allowed);
        assert_eq!(
            parse_probe(&failed("TIMEOUT\ncommand terminated with exit code 1\n")),
            Outcome::Blocked
        );
        assert_eq!(
            parse_probe(&failed(
                "TIMEOUT: read udp 10.244.1.3:40001->10.244.2.4:80: i/o timeout\n"
            )),
            Outcome::Blocked
        );
        assert_eq!(
            parse_probe(&failed("REFUSED\ncommand terminated with exit code 1\n")),
            Outcome::Rejected("REFUSED".into())
        );
        assert_eq!(
            parse_probe(&failed(
                "OTHER: dial tcp 10.244.2.4:80: connect: no route to host\n"
            )),
            Outcome::Rejected("OTHER: dial tcp 10.244.2.4:80: connect: no route to host".into())
        );
        // kubectl failing before agnhost runs is not a block.
        let outcome = parse_probe(&failed(
            "Error from server (NotFound): pods \"a\" not found\n",
        ));
        assert_eq!(
            outcome,
            Outcome::Rejected(
                "probe did not run: Error from server (NotFound): pods \"a\" not found".into()
            )
        );
        assert!(!outcome.matches(false) && !outcome.matches(true));
        // A word merely starting like a code is not one.
        assert!(matches!(
            parse_probe(&failed("TIMEOUTS happen\n")),
            Outcome::Rejected(_)
        ));
    }

    #[test]
    fn commands_time_out_and_report_output() {
        let out = output(
            "sh",
            &strings(&["-c", "cat; echo oops >&2; exit 3"]),
            Some("in"),
            Duration::from_secs(10),
        )
        .unwrap();
        assert_eq!(
            out,
            Output {
                success: false,
                stdout: "in".into(),
                stderr: "oops\n".into()
            }
        );
        let started = Instant::now();
        let err = output("sleep", &strings(&["5"]), None, Duration::from_millis(200)).unwrap_err();
        assert!(format!("{err}").contains("timed out"), "{err}");
        assert!(started.elapsed() < Duration::from_secs(3));
        let err = exec(
            "sh",
            &strings(&["-c", "echo bad >&2; false"]),
            None,
            Duration::from_secs(10),
        )
        .unwrap_err();
        assert!(format!("{err}").ends_with("failed: bad"), "{err}");
    }

    #[test]
    fn probes_run_in_order_with_a_bound() {
        let commands = vec![
            ("sh", strings(&["-c", "sleep 0.2"])),
            ("sh", strings(&["-c", "echo TIMEOUT >&2; exit 1"])),
            ("sh", strings(&["-c", "echo REFUSED >&2; exit 1"])),
            ("sleep", strings(&["5"])),
        ];
        let outcomes = run_probes(commands, 2, Duration::from_secs(1));
        assert_eq!(
            outcomes[..3],
            [
                Outcome::Allowed,
                Outcome::Blocked,
                Outcome::Rejected("REFUSED".into())
            ]
        );
        assert!(matches!(&outcomes[3], Outcome::Rejected(e) if e.contains("timed out")));
    }

    const NODES: &str = r#"{"items": [
      {"metadata": {"name": "netpol-e2e-control-plane"},
       "spec": {"podCIDR": "10.244.0.0/24", "podCIDRs": ["10.244.0.0/24"],
                "taints": [{"key": "node-role.kubernetes.io/control-plane", "effect": "NoSchedule"}]},
       "status": {"addresses": [{"type": "InternalIP", "address": "172.18.0.3"},
                                {"type": "Hostname", "address": "netpol-e2e-control-plane"}]}},
      {"metadata": {"name": "netpol-e2e-worker"},
       "spec": {"podCIDR": "10.244.1.0/24", "podCIDRs": ["10.244.1.0/24", "fd00:10:244:1::/64"]},
       "status": {"addresses": [{"type": "InternalIP", "address": "fc00:f853:ccd:e793::2"},
                                {"type": "InternalIP", "address": "172.18.0.2"}]}}
    ]}"#;

    #[test]
    fn nodes_from_kubectl() {
        let nodes = parse_nodes(NODES).unwrap();
        assert_eq!(
            nodes,
            [
                Node {
                    name: "netpol-e2e-control-plane".into(),
                    internal_ip: Ipv4Addr::new(172, 18, 0, 3),
                    pod_cidrs: vec!["10.244.0.0/24".into()],
                    schedulable: false,
                },
                Node {
                    name: "netpol-e2e-worker".into(),
                    internal_ip: Ipv4Addr::new(172, 18, 0, 2),
                    pod_cidrs: vec!["10.244.1.0/24".into()],
                    schedulable: true,
                },
            ]
        );
        assert!(
            parse_nodes(r#"{"items": [{"metadata": {"name": "n"}, "spec": {}, "status": {}}]}"#)
                .is_err()
        );
    }

    #[test]
    fn host_containers_and_routes() {
        let case =
            Case::load(&workspace().join("tests/conformance/ipblock-except-edges.yaml")).unwrap();
        let plan = ClusterPlan::of(&case).unwrap();
        let host = &plan.hosts[0];
        let args = host_run_args("netpol-conformance-first", "kind", &case.name, host);
        let line = command_line("docker", &args);
        assert_eq!(
            line,
            format!(
                "docker run --detach --rm --name netpol-conformance-first --network kind --cap-add NET_ADMIN \
                 --label {ANNOTATION}=ipblock-except-edges --env SERVE_PORT_80={REPLY} {AGNHOST} porter"
            )
        );
        let nodes = parse_nodes(NODES).unwrap();
        let other = (Ipv4Addr::new(192, 168, 51, 1), Ipv4Addr::new(172, 18, 0, 9));
        let commands: Vec<String> = host_route_commands(host.ip, &nodes, &[other])
            .iter()
            .map(|c| c.join(" "))
            .collect();
        assert_eq!(
            commands,
            [
                "ip addr add 192.168.50.1/32 dev lo",
                "ip route replace 10.244.0.0/24 via 172.18.0.3 src 192.168.50.1",
                "ip route replace 10.244.1.0/24 via 172.18.0.2 src 192.168.50.1",
                "ip route replace 192.168.51.1/32 via 172.18.0.9 src 192.168.50.1",
            ]
        );
    }

    #[test]
    fn label_changes_replace_the_map_but_keep_the_metadata_name() {
        let map = |pairs: &[(&str, &str)]| -> BTreeMap<String, String> {
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect()
        };
        let old = map(&[("ns", "y"), ("gone", "1"), (METADATA_NAME, "y")]);
        let new = map(&[("ns", "y"), ("ns2", "updated")]);
        assert_eq!(label_changes(&old, &new), ["ns2=updated", "gone-"]);
        assert!(label_changes(&old, &old).is_empty());
        let changed = map(&[("ns", "z"), ("gone", "1")]);
        assert_eq!(label_changes(&old, &changed), ["ns=z"]);
    }

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

    /// The shared comparison with this backend's outcomes: a case's first step against
    /// probes that all connect fails exactly the cells its policy blocks.
    #[test]
    fn steps_are_checked_by_the_shared_code() {
        let file = workspace().join("../shared/conformance/cases/default-deny-ingress.yaml");
        let Ok(case) = Case::load(&file) else {
            eprintln!("skipped: no shared cases at {}", file.display());
            return;
        };
        let plan = ClusterPlan::of(&case).unwrap();
        let endpoints: Vec<(String, Vec<(u16, lab::Protocol)>)> = plan
            .pods
            .iter()
            .map(|p| {
                let serves = p
                    .ports
                    .iter()
                    .map(|q| (q.port, super::super::lab_protocol(q.protocol)));
                (p.name.clone(), serves.collect())
            })
            .collect();
        let step = &case.steps[0];
        let result = check_step(step, 1, &endpoints, |probes| {
            Ok(probes
                .iter()
                .map(|_| {
                    parse_probe(&Output {
                        success: true,
                        ..Output::default()
                    })
                })
                .collect())
        })
        .unwrap();
        let expected_blocked: usize = step
            .expect
            .iter()
            .map(|e| {
                let cells = result.expects.iter().find(|r| r.port == e.port).unwrap();
                cells
                    .cells
                    .iter()
                    .filter(|c| e.verdict(&c.src, &c.dst) == case::Verdict::Blocked)
                    .count()
            })
            .sum();
        let wrong: usize = result.expects.iter().map(|e| e.wrong()).sum();
        assert!(expected_blocked > 0);
        assert_eq!(wrong, expected_blocked);
    }
}
