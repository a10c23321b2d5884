//! What `kubectl netpol` asks of the agents, against the API server double and two
//! emulated nodes, each with its agent. The plugin finds the agent pods and runs
//! `netpol-agent` in their container over `pods/exec`; the double runs it where that
//! agent's container would: beside it, on its socket, pins and status file.
//! - `flows`: each agent's flow log, merged; a node whose agent cannot be read is named.
//! - `explain --kernel`: what each node's kernel holds for the connection, and where it
//!   disagrees with the cluster.
//!
//! Needs root and `NETPOL_AGENT_BIN` (`cargo xtask test` gives both).

use std::io::{BufRead as _, BufReader};
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use netpol_lab::apiserver::{ApiServer, ExecHandler};
use netpol_lab::{AgentProcess, Lab, ManifestDir, PodSpec, Port, Probe};
use serde_json::{Value, json};

/// Every pod of x admits nothing.
const DENY_INGRESS: &str = r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: deny-ingress, namespace: x}
spec:
  podSelector: {}
  policyTypes: [Ingress]
"#;

fn agent_bin() -> Option<PathBuf> {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("kubectl_agents: skipped: network-namespace tests need root");
        return None;
    }
    let bin = std::env::var_os(netpol_lab::AGENT_BIN_ENV).map(PathBuf::from);
    if bin.is_none() {
        eprintln!(
            "kubectl_agents: skipped: NETPOL_AGENT_BIN is not set; run via `cargo xtask test`"
        );
    }
    bin
}

fn agent_pod(name: &str, node: &str) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": "kube-system",
                     "labels": {"app.kubernetes.io/name": "netpol-agent"}},
        "spec": {"nodeName": node, "hostNetwork": true,
                 "containers": [{"name": "agent", "image": "netpol-agent:latest"}]},
        "status": {"phase": "Running"},
    })
}

/// Two nodes with their agents; field order is drop order (agents before the lab).
struct TwoNodes {
    agents: Vec<AgentProcess>,
    manifests: ManifestDir,
    lab: Lab,
}

impl TwoNodes {
    /// x/a on node 0, x/b on node 1, every ingress of x denied.
    fn start(agent: &Path) -> Self {
        let mut lab = Lab::with_nodes(2).expect("a two-node lab");
        for (name, i, node) in [("a", 1, 0), ("b", 2, 1)] {
            lab.add_pod(
                PodSpec::new("x", name)
                    .label("pod", name)
                    .ports([Port::tcp(80).named("http")])
                    .ipv4(Ipv4Addr::new(10, 0, 0, i))
                    .on_node(node),
            )
            .expect("adding a pod");
        }
        let mut manifests =
            ManifestDir::create(lab.workdir().join("manifests")).expect("manifest dir");
        let generation = manifests.write(&lab, DENY_INGRESS).expect("manifests");
        let agents = (0..2)
            .map(|n| {
                let mut agent =
                    AgentProcess::start_on(&lab, n, agent, &manifests).expect("an agent");
                agent
                    .wait_generation(generation, Duration::from_secs(30))
                    .expect("the agent applied the policy");
                agent
            })
            .collect();
        TwoNodes {
            agents,
            manifests,
            lab,
        }
    }
}

impl TwoNodes {
    /// What the double runs for an exec into `netpol-agent-<n>` (container `agent`):
    /// the command's `netpol-agent ...` as that node's agent would run it in its
    /// container, pointed at that agent's socket, pins and status file.
    fn exec_handler(&self, agent: &Path) -> ExecHandler {
        let places: Vec<(PathBuf, PathBuf, PathBuf)> = self
            .agents
            .iter()
            .map(|a| {
                (
                    a.flow_socket(),
                    a.bpffs_dir().to_path_buf(),
                    a.status_path().to_path_buf(),
                )
            })
            .collect();
        let agent = agent.to_path_buf();
        Arc::new(move |exec| {
            let node: usize = exec.pod.strip_prefix("netpol-agent-")?.parse().ok()?;
            let (socket, pins, status) = places.get(node)?;
            let (program, args) = exec.command.split_first()?;
            if program != "netpol-agent" || exec.container.as_deref() != Some("agent") {
                return None;
            }
            let mut command = tokio::process::Command::new(&agent);
            command.args(args);
            match args.first().map(String::as_str) {
                Some("flows") => {
                    command.arg("--socket").arg(socket);
                }
                Some("inspect") => {
                    command
                        .arg("--bpffs-dir")
                        .arg(pins)
                        .arg("--status-file")
                        .arg(status);
                }
                _ => {}
            }
            Some(command)
        })
    }
}

#[test]
fn cluster_wide_flows_merge_both_nodes_drops_and_name_the_node_whose_agent_cannot_be_read() {
    let Some(agent) = agent_bin() else {
        return;
    };
    let cluster = TwoNodes::start(&agent);
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let server = runtime.block_on(ApiServer::start()).expect("the double");
    for node in ["node-0", "node-1", "node-2", "node-3"] {
        server.apply(json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": node}}));
    }
    // node-2's agent pod cannot be exec'd into; node-3 has none.
    for (pod, node) in [
        ("netpol-agent-0", "node-0"),
        ("netpol-agent-1", "node-1"),
        ("netpol-agent-2", "node-2"),
    ] {
        server.apply(agent_pod(pod, node));
    }
    server.on_exec(cluster.exec_handler(&agent));
    let dir = std::env::temp_dir().join(format!("netpol-kubectl-flows-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let kubeconfig = dir.join("kubeconfig");
    std::fs::write(&kubeconfig, server.kubeconfig()).unwrap();

    // A drop on node 1 before the plugin starts: it comes from node 1's history.
    let probe = |src: &str, dst: &str| {
        let result = cluster
            .lab
            .probe(&Probe::tcp(src, dst, 80), Duration::from_secs(1))
            .expect("probe");
        assert!(
            result.outcome.is_blocked(),
            "{src} -> {dst}: {}",
            result.outcome
        );
    };
    probe("x/a", "x/b");
    let mut plugin = Command::new(env!("CARGO_BIN_EXE_kubectl-netpol"))
        .args([
            "flows",
            "-o",
            "json",
            "--since",
            "5m",
            "--verdict",
            "dropped",
        ])
        .arg("--kubeconfig")
        .arg(&kubeconfig)
        .env("NO_COLOR", "1")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("kubectl-netpol flows");
    let (tx, rx) = std::sync::mpsc::channel::<(bool, String)>();
    for (is_stdout, pipe) in [
        (
            true,
            Box::new(plugin.stdout.take().unwrap()) as Box<dyn std::io::Read + Send>,
        ),
        (false, Box::new(plugin.stderr.take().unwrap())),
    ] {
        let tx = tx.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(pipe).lines().map_while(Result::ok) {
                if tx.send((is_stdout, line)).is_err() {
                    return;
                }
            }
        });
    }

    let mut drops: Vec<Value> = Vec::new();
    let mut errors = Vec::new();
    let mut probed_live = false;
    let deadline = Instant::now() + Duration::from_secs(30);
    let seen = |drops: &[Value], node: &str, src: &str| {
        drops
            .iter()
            .any(|r| r["node"] == node && r["src"]["name"] == src)
    };
    while Instant::now() < deadline
        && !(seen(&drops, "node-1", "x/a") && seen(&drops, "node-0", "x/b") && errors.len() >= 2)
    {
        let Ok((is_stdout, line)) = rx.recv_timeout(Duration::from_millis(200)) else {
            continue;
        };
        if is_stdout {
            drops.push(serde_json::from_str(&line).expect("a JSON record per line"));
        } else {
            errors.push(line);
        }
        // Once node 1's history arrived the streams are open: a live drop on node 0.
        if !probed_live && seen(&drops, "node-1", "x/a") {
            probed_live = true;
            probe("x/b", "x/a");
        }
    }
    let _ = plugin.kill();
    let _ = plugin.wait();
    let _ = std::fs::remove_dir_all(&dir);
    for agent in &cluster.agents {
        eprintln!("{}", agent.log_tail(10));
    }
    assert!(
        seen(&drops, "node-1", "x/a"),
        "node 1's drop (replayed): {drops:?} {errors:?}"
    );
    assert!(
        seen(&drops, "node-0", "x/b"),
        "node 0's drop (live): {drops:?} {errors:?}"
    );
    for record in &drops {
        assert_eq!(record["verdict"], "dropped", "{record}");
        assert_eq!(
            record["isolated_by"],
            json!(["NetworkPolicy x/deny-ingress"]),
            "{record}"
        );
        assert!(
            record["wall"].as_f64().unwrap() > 1.7e9,
            "Unix time: {record}"
        );
    }
    let said = errors.join("\n");
    assert!(
        said.contains("node node-2: its agent kube-system/netpol-agent-2 cannot be read"),
        "{said}"
    );
    assert!(
        said.contains("node node-3: no agent pod on this node"),
        "{said}"
    );
    // What the plugin asked of the API server: lists and execs, nothing else.
    let requests = server.requests();
    assert!(
        requests
            .iter()
            .all(|r| r.verb == "list" || (r.verb == "create" && r.resource == "pods/exec")),
        "{requests:?}"
    );
    let execs: Vec<_> = requests
        .iter()
        .filter(|r| r.resource == "pods/exec")
        .collect();
    assert_eq!(execs.len(), 3, "one exec per agent pod: {execs:?}");
    // deploy/: the viewer's ClusterRole and the flows Role (in the agents' namespace)
    // allow every one of them.
    let deploy = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy");
    let read = |file: &str| std::fs::read_to_string(deploy.join(file)).unwrap();
    let viewer: k8s_openapi::api::rbac::v1::ClusterRole =
        serde_norway::from_str(&read("kubectl-netpol-viewer.yaml")).unwrap();
    let flows: k8s_openapi::api::rbac::v1::Role =
        serde_norway::from_str(&read("kubectl-netpol-flows.yaml")).unwrap();
    let role_namespace = flows.metadata.namespace.clone();
    let allows = |rules: &[k8s_openapi::api::rbac::v1::PolicyRule],
                  r: &netpol_lab::apiserver::Request| {
        rules.iter().any(|rule| {
            rule.api_groups.iter().flatten().any(|g| *g == r.group)
                && rule.resources.iter().flatten().any(|x| *x == r.resource)
                && rule.verbs.contains(&r.verb)
        })
    };
    for request in &requests {
        let by_viewer = allows(viewer.rules.as_deref().unwrap_or_default(), request);
        let by_flows = request.namespace == role_namespace
            && allows(flows.rules.as_deref().unwrap_or_default(), request);
        assert!(by_viewer || by_flows, "not granted: {request:?}");
    }
    drop(server);
    drop(runtime);
}

fn pod_object(name: &str, ip: &str, node: &str) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": "x", "labels": {"pod": name}},
        "spec": {"nodeName": node, "containers": [{"name": "c", "image": "nginx"}]},
        "status": {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}]},
    })
}

/// The API server double as the plugin reads the cluster of [`TwoNodes`]: namespace x,
/// the two Node objects, an agent pod on each (exec'd as [`TwoNodes::exec_handler`]
/// says) and `pods` (name, address, node); with a kubeconfig for it in a fresh
/// directory. Dropping it stops the double and removes the directory.
struct Double {
    kubeconfig: PathBuf,
    dir: PathBuf,
    server: ApiServer,
    _runtime: tokio::runtime::Runtime,
}

impl Drop for Double {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl TwoNodes {
    fn double(&self, agent: &Path, tag: &str, pods: &[(&str, &str, &str)]) -> Double {
        let runtime = tokio::runtime::Runtime::new().unwrap();
        let server = runtime.block_on(ApiServer::start()).expect("the double");
        server.apply(json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "x"}}));
        for (n, node) in ["node-0", "node-1"].into_iter().enumerate() {
            server.apply(json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": node}}));
            server.apply(agent_pod(&format!("netpol-agent-{n}"), node));
        }
        for (name, ip, node) in pods {
            server.apply(pod_object(name, ip, node));
        }
        server.on_exec(self.exec_handler(agent));
        let dir = std::env::temp_dir().join(format!("netpol-kubectl-{tag}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let kubeconfig = dir.join("kubeconfig");
        std::fs::write(&kubeconfig, server.kubeconfig()).unwrap();
        Double {
            kubeconfig,
            dir,
            server,
            _runtime: runtime,
        }
    }
}

#[test]
fn explain_with_the_kernel_says_where_a_node_holds_other_than_the_cluster() {
    let Some(agent) = agent_bin() else {
        return;
    };
    // The agents enforce DENY_INGRESS; the cluster (the double) does not have it yet.
    let cluster = TwoNodes::start(&agent);
    let double = cluster.double(
        &agent,
        "kernel",
        &[("a", "10.0.0.1", "node-0"), ("b", "10.0.0.2", "node-1")],
    );
    let (server, kubeconfig) = (&double.server, &double.kubeconfig);
    let explain = |output: &str| explain_kernel(kubeconfig, ["x/a", "x/b", "80/TCP"], output);

    // The cluster allows x/a -> x/b; node-1's kernel drops it at x/b's ingress.
    let value: Value = serde_json::from_str(&explain("json")).unwrap();
    assert_eq!(value["allowed"], true, "{value:#}");
    let kernel = value["kernel"].as_array().expect("kernel checks");
    assert_eq!(kernel.len(), 2, "{value:#}");
    let egress = &kernel[0];
    assert_eq!(
        (
            egress["direction"].as_str(),
            egress["node"].as_str(),
            egress["agrees"].as_bool()
        ),
        (Some("egress"), Some("node-0"), Some(true)),
        "{egress:#}"
    );
    assert_eq!(egress["kernel"]["reason"], "not-isolated");
    let ingress = &kernel[1];
    assert_eq!(
        (
            ingress["direction"].as_str(),
            ingress["node"].as_str(),
            ingress["agrees"].as_bool()
        ),
        (Some("ingress"), Some("node-1"), Some(false)),
        "{ingress:#}"
    );
    assert_eq!(ingress["agent"], "kube-system/netpol-agent-1");
    assert_eq!(ingress["kernel"]["reason"], "policy-denied");
    assert_eq!(ingress["kernel"]["endpoint"], true);
    let findings = ingress["findings"].to_string();
    assert!(
        findings.contains("the agent has applied resourceVersion 1, the cluster is at"),
        "{findings}"
    );
    let text = explain("text");
    println!("{text}");
    assert!(
        text.contains(
            "kernel of node node-1, ingress of x/b: dropped (policy-denied), the cluster says \
             allowed: the kernel DISAGREES"
        ),
        "{text}"
    );
    assert!(
        text.contains(
            "kernel of node node-0, egress of x/a: allowed (not-isolated), as the cluster says"
        ),
        "{text}"
    );

    // Once the cluster has the policy too, both agree.
    server.apply(json!({
        "apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
        "metadata": {"name": "deny-ingress", "namespace": "x"},
        "spec": {"podSelector": {}, "policyTypes": ["Ingress"]},
    }));
    let value: Value = serde_json::from_str(&explain("json")).unwrap();
    assert_eq!(value["allowed"], false, "{value:#}");
    for check in value["kernel"].as_array().unwrap() {
        assert_eq!(check["agrees"], true, "{check:#}");
    }
}

/// Only x/b admits nothing.
const DENY_B: &str = r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: deny-b, namespace: x}
spec:
  podSelector: {matchLabels: {pod: b}}
  policyTypes: [Ingress]
"#;

/// `kubectl-netpol explain SRC DST PORT --kernel -o OUTPUT` against `kubeconfig`: its
/// standard output (the command must succeed).
fn explain_kernel(kubeconfig: &Path, [src, dst, port]: [&str; 3], output: &str) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_kubectl-netpol"))
        .args(["explain", src, dst, port, "--kernel", "-o", output])
        .arg("--kubeconfig")
        .arg(kubeconfig)
        .env("NO_COLOR", "1")
        .output()
        .expect("kubectl-netpol explain --kernel");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("UTF-8")
}

/// [`explain_kernel`] as JSON.
fn explain_kernel_json(kubeconfig: &Path, connection: [&str; 3]) -> Value {
    serde_json::from_str(&explain_kernel(kubeconfig, connection, "json")).expect("JSON")
}

/// The check of the hook in `direction` (`ingress` or `egress`).
fn hook<'v>(value: &'v Value, direction: &str) -> &'v Value {
    value["kernel"]
        .as_array()
        .and_then(|checks| checks.iter().find(|c| c["direction"] == direction))
        .unwrap_or_else(|| panic!("no {direction} check in {value:#}"))
}

#[test]
fn explain_with_the_kernel_names_a_refused_pod_a_full_map_and_a_revoked_connection() {
    let Some(agent) = agent_bin() else {
        return;
    };
    // x/a on node 0; x/b and x/c on node 1, whose agent has room for one address.
    let mut lab = Lab::with_nodes(2).expect("a two-node lab");
    for (name, i, node) in [("a", 1, 0), ("b", 2, 1), ("c", 3, 1)] {
        lab.add_pod(
            PodSpec::new("x", name)
                .label("pod", name)
                .ports([Port::tcp(80)])
                .ipv4(Ipv4Addr::new(10, 0, 0, i))
                .on_node(node),
        )
        .expect("adding a pod");
    }
    let mut manifests = ManifestDir::create(lab.workdir().join("manifests")).expect("manifests");
    let generation = manifests.write(&lab, "").expect("manifests");
    let agents: Vec<AgentProcess> = [&[][..], &["--max-endpoints", "1"][..]]
        .into_iter()
        .enumerate()
        .map(|(node, extra)| {
            let mut source = vec![
                "--manifests".into(),
                manifests.path().as_os_str().to_owned(),
            ];
            source.extend(extra.iter().map(std::ffi::OsString::from));
            let mut agent =
                AgentProcess::start_with_source_on(&lab, node, &agent, &source).expect("an agent");
            agent
                .wait_generation(generation, Duration::from_secs(30))
                .expect("the agent applied the cluster");
            agent
        })
        .collect();
    let mut nodes = TwoNodes {
        agents,
        manifests,
        lab,
    };
    let lab = &nodes.lab;

    // A connection x/a -> x/b:9100 while nothing isolates x/b.
    let at = std::net::SocketAddr::from(([10, 0, 0, 2], 9100));
    let listener = lab
        .worker("x/b")
        .unwrap()
        .run(move || std::net::TcpListener::bind(at).expect("listening in x/b"))
        .unwrap();
    let mut client = lab
        .worker("x/a")
        .unwrap()
        .run(move || std::net::TcpStream::connect_timeout(&at, Duration::from_secs(5)))
        .unwrap()
        .expect("x/a connects to x/b while allowed");
    let (_server, _) = listener.accept().expect("x/b accepts");

    // The agents then enforce DENY_B, as the cluster does.
    let generation = nodes.manifests.write(lab, DENY_B).expect("manifests");
    for agent in &mut nodes.agents {
        agent
            .wait_generation(generation, Duration::from_secs(30))
            .expect("the agent applied the policy");
    }
    let double = nodes.double(
        &agent,
        "refused",
        &[
            ("a", "10.0.0.1", "node-0"),
            ("b", "10.0.0.2", "node-1"),
            ("c", "10.0.0.3", "node-1"),
        ],
    );
    double.server.apply(json!({
        "apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
        "metadata": {"name": "deny-b", "namespace": "x"},
        "spec": {"podSelector": {"matchLabels": {"pod": "b"}}, "policyTypes": ["Ingress"]},
    }));
    let kubeconfig = &double.kubeconfig;

    // x/c did not fit on node 1: the cluster allows x/a -> x/c, its kernel cannot.
    let value = explain_kernel_json(kubeconfig, ["x/a", "x/c", "80/TCP"]);
    assert_eq!(value["allowed"], true, "{value:#}");
    let ingress = hook(&value, "ingress");
    assert_eq!(ingress["agrees"], false, "{ingress:#}");
    assert_eq!(ingress["kernel"]["endpoint"], false, "{ingress:#}");
    let findings = ingress["findings"].to_string();
    for said in [
        "not in this node's ENDPOINTS",
        "refused by the agent: Pod x/c: not programmed: ENDPOINTS is full (capacity 1)",
        "ENDPOINTS is full (1 of 1 entries)",
    ] {
        assert!(findings.contains(said), "{said:?} in {findings}");
    }
    assert_eq!(hook(&value, "egress")["agrees"], true, "{value:#}");

    // The connection to x/b outlived the policy: its next packet revokes it, and the
    // kernel check of x/b's ingress shows the revoked entry (bounded wait).
    let deadline = Instant::now() + Duration::from_secs(20);
    let findings = loop {
        use std::io::Write as _;
        let _ = client.write(b"x");
        let value = explain_kernel_json(kubeconfig, ["x/a", "x/b", "9100/TCP"]);
        assert_eq!(value["allowed"], false, "{value:#}");
        let ingress = hook(&value, "ingress");
        assert_eq!(ingress["agrees"], true, "{ingress:#}");
        let findings = ingress["findings"].to_string();
        if findings.contains("revoked") || Instant::now() > deadline {
            break findings;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    assert!(
        findings.contains("conntrack 10.0.0.2:9100 <-> 10.0.0.1:")
            && findings.contains("revoked, its packets are dropped until it idles out"),
        "{findings}"
    );
    drop(double);
    drop(nodes);
}
