//! The Kubernetes path: the real agent binary in Kubernetes mode against the API server
//! double (`netpol_lab::apiserver`) serving the synthetic cluster over HTTP list/watch.
//! Measured: the time from the agent's start to its first complete sync reaching the
//! kernel (its status file reports the double's resourceVersion), its memory then and
//! at the end, and the time from a watch event being served to the status file reporting
//! its version, per kind of change.
//!
//! The agent runs in the bench's private network namespace (no interfaces: its local
//! pods have no veth, so they are compiled and their entries written, and reported
//! pending), with the bench's bpffs directory and `--on-exit detach`.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use netpol_compile::state::{ClusterState, NamespaceInfo, ObjectRef, PodInfo};
use netpol_lab::apiserver::ApiServer;
use serde_json::{Value, json};

use crate::churn::{Churn, churn};
use crate::cluster::ns_name;
use crate::common::{Summary, memory_of, ms};
use crate::{Config, NODE, Size};

/// How long the first sync and one change may take before the run is abandoned.
const SYNC_DEADLINE: Duration = Duration::from_secs(300);
const CHANGE_DEADLINE: Duration = Duration::from_secs(60);

/// The kinds of watch events measured, in turn.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Event {
    LabelFlip,
    PolicyAdded,
    PodCreated,
    PodDeleted,
    NamespaceLabel,
    /// A pod's status conditions: nothing the agent keeps (no compile).
    Conditions,
}

impl Event {
    pub const ALL: [Event; 6] = [
        Event::LabelFlip,
        Event::PolicyAdded,
        Event::PodCreated,
        Event::PodDeleted,
        Event::NamespaceLabel,
        Event::Conditions,
    ];

    pub fn label(self) -> &'static str {
        match self {
            Event::LabelFlip => "pod label flipped",
            Event::PolicyAdded => "policy added",
            Event::PodCreated => "pod created",
            Event::PodDeleted => "pod deleted",
            Event::NamespaceLabel => "namespace label flipped",
            Event::Conditions => "pod conditions (nothing kept)",
        }
    }
}

pub struct KubePath {
    /// Agent start → its status reports the whole cluster's resourceVersion.
    pub first_sync: Duration,
    /// The agent's VmRSS after the first sync, and its VmHWM after the changes (MiB).
    pub rss_synced: f64,
    pub peak_rss: f64,
    /// Watch event served → status file reporting its version, per kind (ms).
    pub per_kind: Vec<(Event, Summary)>,
    /// Every kind but `Conditions`.
    pub changes: Summary,
    /// Minutes of churn, then everything it added taken back (the largest size only).
    pub churn: Option<Churn>,
}

/// The agent binary this bench was built with.
fn agent_bin() -> &'static str {
    env!("CARGO_BIN_EXE_netpol-agent")
}

/// `kind`/`apiVersion` added to a typed object's JSON.
fn object<T: serde::Serialize>(kind: &str, api_version: &str, typed: &T) -> Value {
    let mut value = serde_json::to_value(typed).expect("serializable");
    value["kind"] = json!(kind);
    value["apiVersion"] = json!(api_version);
    value
}

/// The Namespace object the API server holds for what the agent keeps of it.
fn namespace_object(name: &str, namespace: &NamespaceInfo) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Namespace",
        "metadata": {"name": name, "labels": namespace.labels().to_map()},
        "spec": {"finalizers": ["kubernetes"]},
        "status": {"phase": "Active"},
    })
}

/// The Pod object the API server holds for what the agent keeps of it: with what a
/// real Pod carries besides (an image, resources, environment, conditions, managed
/// fields), which the agent must skip as it reads.
fn pod_object(key: &ObjectRef, pod: &PodInfo) -> Value {
    let ports: Vec<Value> = pod
        .ports()
        .iter()
        .map(|p| json!({"name": p.name, "containerPort": p.container_port, "protocol": p.protocol.as_deref().unwrap_or("TCP")}))
        .collect();
    let ips: Vec<Value> = pod.listed_ips().map(|ip| json!({"ip": ip})).collect();
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {
            "namespace": key.namespace, "name": key.name, "labels": pod.labels().to_map(),
            "annotations": {"kubectl.kubernetes.io/restartedAt": "2026-11-30T10:00:00Z"},
            "ownerReferences": [{"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": format!("{}-rs", key.namespace), "uid": "6b1f0c2e-0000-4000-8000-000000000000", "controller": true}],
            "managedFields": [{"manager": "kubelet", "operation": "Update", "apiVersion": "v1", "fieldsType": "FieldsV1",
                               "fieldsV1": {"f:status": {"f:conditions": {}, "f:containerStatuses": {}, "f:podIP": {}, "f:podIPs": {}}}}],
        },
        "spec": {
            "nodeName": pod.node_name(), "hostNetwork": pod.host_network(),
            "serviceAccountName": "default", "restartPolicy": "Always", "dnsPolicy": "ClusterFirst",
            "containers": [{
                "name": "main", "image": "registry.example/app:1.27.3", "ports": ports,
                "env": [{"name": "LOG_LEVEL", "value": "info"}, {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}}],
                "resources": {"requests": {"cpu": "100m", "memory": "128Mi"}, "limits": {"memory": "256Mi"}},
                "volumeMounts": [{"name": "kube-api-access", "mountPath": "/var/run/secrets/kubernetes.io/serviceaccount", "readOnly": true}],
            }],
            "volumes": [{"name": "kube-api-access", "projected": {"sources": [{"serviceAccountToken": {"path": "token", "expirationSeconds": 3607}}]}}],
        },
        "status": {
            "phase": pod.phase(), "podIP": pod.pod_ip(), "podIPs": ips, "hostIP": "10.255.0.1",
            "conditions": [{"type": "Ready", "status": "True"}, {"type": "ContainersReady", "status": "True"}, {"type": "PodScheduled", "status": "True"}],
            "containerStatuses": [{"name": "main", "ready": true, "restartCount": 0, "image": "registry.example/app:1.27.3", "imageID": "registry.example/app@sha256:0000", "started": true, "state": {"running": {"startedAt": "2026-11-30T10:00:01Z"}}}],
        },
    })
}

/// Node `k`'s Node object: `NODE` is this one (10.255.0.1, as the state's node context).
fn node_object(k: usize) -> Value {
    let (name, ip) = if k == 0 {
        (NODE.to_owned(), "10.255.0.1".to_owned())
    } else {
        (
            format!("node-{k}"),
            format!("10.254.{}.{}", k / 250, k % 250 + 1),
        )
    };
    json!({
        "apiVersion": "v1", "kind": "Node",
        "metadata": {"name": name, "labels": {"kubernetes.io/os": "linux"}},
        "status": {"addresses": [{"type": "InternalIP", "address": ip}]},
    })
}

/// Serves `state` from the double: every object as the API server has it.
fn publish(server: &ApiServer, state: &ClusterState, size: Size) {
    for k in 0..size.nodes() {
        server.apply(node_object(k));
    }
    for (name, namespace) in &state.namespaces {
        server.apply(namespace_object(name, namespace));
    }
    for policy in state.policies.values() {
        server.apply(object(
            "NetworkPolicy",
            "networking.k8s.io/v1",
            &policy.object(),
        ));
    }
    for policy in state.cluster_policies.values() {
        server.apply(policy.clone());
    }
    for (key, pod) in &state.pods {
        server.apply(pod_object(key, pod));
    }
}

/// The agent's status generation, once its status file exists.
fn status_generation(path: &Path) -> Option<u64> {
    let text = std::fs::read_to_string(path).ok()?;
    let status: Value = serde_json::from_str(&text).ok()?;
    status["generation"].as_u64()
}

/// Waits until the status reports `version` (polled every 100 µs); the time it took.
pub fn wait_status(
    agent: &mut Child,
    path: &Path,
    version: u64,
    started: Instant,
    deadline: Duration,
) -> Result<Duration, String> {
    loop {
        if status_generation(path).is_some_and(|g| g >= version) {
            return Ok(started.elapsed());
        }
        if let Ok(Some(exit)) = agent.try_wait() {
            return Err(format!("the agent exited ({exit})"));
        }
        if started.elapsed() > deadline {
            return Err(format!(
                "the agent did not report version {version} within {deadline:?}"
            ));
        }
        std::thread::sleep(Duration::from_micros(100));
    }
}

/// The agent process; stopped (SIGTERM, then killed) when dropped.
pub struct Agent(pub Child);

impl Agent {
    pub fn pid(&self) -> u32 {
        self.0.id()
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let pid = nix::unistd::Pid::from_raw(self.0.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.0.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The objects the changes work on, as last served.
pub struct Served {
    pub pods: Vec<(ObjectRef, Value)>,
    local: Vec<usize>,
    namespaces: BTreeMap<String, Value>,
}

impl Served {
    fn of(state: &ClusterState) -> Served {
        let pods: Vec<(ObjectRef, Value)> = state
            .pods
            .iter()
            .map(|(key, pod)| (key.clone(), pod_object(key, pod)))
            .collect();
        let local = state
            .pods
            .values()
            .enumerate()
            .filter(|(_, pod)| state.node.is_local(pod))
            .map(|(i, _)| i)
            .collect();
        let namespaces = state
            .namespaces
            .iter()
            .map(|(name, ns)| (name.clone(), namespace_object(name, ns)))
            .collect();
        Served {
            pods,
            local,
            namespaces,
        }
    }

    /// A new pod: a copy of pod `index` in its namespace, named `name`, at `ip`.
    pub fn copy_of(&self, index: usize, name: &str, ip: &str) -> (ObjectRef, Value) {
        let (key, template) = &self.pods[index];
        let mut pod = template.clone();
        pod["metadata"]["name"] = json!(name);
        pod["metadata"]["namespace"] = json!(key.namespace);
        pod["metadata"]["uid"] = Value::Null;
        pod["status"]["podIP"] = json!(ip);
        pod["status"]["podIPs"] = json!([{"ip": ip}]);
        (ObjectRef::new(&key.namespace, name), pod)
    }

    /// A local pod (`n` even) or any pod; never one deleted before.
    pub fn pick(&self, n: usize) -> usize {
        let i = if n.is_multiple_of(2) && !self.local.is_empty() {
            self.local[(n * 7) % self.local.len()]
        } else {
            (n * 7919) % self.pods.len()
        };
        i.min(self.pods.len() - 1)
    }
}

/// Makes change `i` in the double; returns its kind and the resourceVersion it got.
fn change(server: &ApiServer, served: &mut Served, size: Size, i: usize) -> (Event, u64) {
    let event = Event::ALL[i % Event::ALL.len()];
    let n = i / Event::ALL.len();
    let version = match event {
        Event::LabelFlip => {
            let index = served.pick(n);
            let pod = &mut served.pods[index].1;
            let app = pod["metadata"]["labels"]["app"].as_str().unwrap_or("app-0");
            let digit: usize = app.trim_start_matches("app-").parse().unwrap_or(0);
            pod["metadata"]["labels"]["app"] = json!(format!("app-{}", (digit + 1) % 10));
            server.apply(pod.clone())
        }
        Event::PolicyAdded => {
            let ns = if n.is_multiple_of(2) && !served.local.is_empty() {
                let i = served.local[(n * 7) % served.local.len()];
                served.pods[i].0.namespace.to_string()
            } else {
                ns_name((n * 7 + 1) % size.namespaces)
            };
            server.apply(json!({
                "apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
                "metadata": {"name": format!("added-{i}"), "namespace": ns},
                "spec": {
                    "podSelector": {"matchLabels": {"app": format!("app-{}", n % 10)}},
                    "ingress": [{"from": [{"podSelector": {"matchLabels": {"app": format!("app-{}", (n + 3) % 10)}}}],
                                 "ports": [{"port": 7000 + i}]}],
                },
            }))
        }
        Event::PodCreated => {
            // A copy of an existing pod (this node's for even `n`) under a new name
            // and address.
            let ip = format!("10.250.{}.{}", (i / 256) % 256, i % 256);
            let (key, pod) = served.copy_of(served.pick(n), &format!("new-{i}"), &ip);
            let version = server.apply(pod.clone());
            served.pods.push((key, pod));
            version
        }
        Event::PodDeleted => {
            let index = served.pick(n + 1);
            let (key, _) = served.pods.swap_remove(index);
            served.local.retain(|&l| l != index);
            let moved = served.pods.len();
            for l in &mut served.local {
                if *l == moved {
                    *l = index;
                }
            }
            server
                .delete("Pod", Some(&key.namespace), &key.name)
                .expect("the pod was served")
        }
        Event::NamespaceLabel => {
            let name = ns_name((n * 11) % size.namespaces);
            let ns = served.namespaces.get_mut(&name).expect("namespace");
            let team = ns["metadata"]["labels"]["team"]
                .as_str()
                .unwrap_or("team-0");
            let digit: usize = team.trim_start_matches("team-").parse().unwrap_or(0);
            ns["metadata"]["labels"]["team"] = json!(format!("team-{}", (digit + 1) % 10));
            server.apply(ns.clone())
        }
        Event::Conditions => {
            let index = served.pick(n);
            let pod = &mut served.pods[index].1;
            let ready = if n.is_multiple_of(2) { "True" } else { "False" };
            pod["status"]["conditions"] = json!([{"type": "Ready", "status": ready}]);
            server.apply(pod.clone())
        }
    };
    (event, version)
}

/// Runs the agent against the double serving `state`; `None` (with the reason printed)
/// when it cannot run here.
pub fn kube_path(
    config: &Config,
    dir: &Path,
    state: &ClusterState,
    size: Size,
    churn: Option<Duration>,
) -> Option<KubePath> {
    match run(config, dir, state, size, churn) {
        Ok(result) => Some(result),
        Err(reason) => {
            eprintln!("Kubernetes path skipped at {} pods: {reason}", size.pods());
            None
        }
    }
}

fn run(
    config: &Config,
    dir: &Path,
    state: &ClusterState,
    size: Size,
    churn_for: Option<Duration>,
) -> Result<KubePath, String> {
    // The private namespace's loopback carries the double.
    let up = Command::new("ip")
        .args(["link", "set", "lo", "up"])
        .status()
        .map_err(|e| format!("ip link set lo up: {e}"))?;
    if !up.success() {
        return Err("ip link set lo up failed".into());
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    let _entered = runtime.enter();
    let server = runtime
        .block_on(ApiServer::start())
        .map_err(|e| format!("starting the API server double: {e}"))?;
    publish(&server, state, size);
    std::fs::create_dir_all(dir).map_err(|e| e.to_string())?;
    let work = tempdir(dir)?;
    let kubeconfig = work.join("kubeconfig");
    std::fs::write(&kubeconfig, server.kubeconfig()).map_err(|e| e.to_string())?;
    let status = work.join("status.json");
    let log = std::fs::File::create(work.join("agent.log")).map_err(|e| e.to_string())?;

    // Its metrics say how many entries each map holds (the churn's before and after).
    let metrics = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map_err(|e| format!("a free port for the agent's metrics: {e}"))?;
    let version = server.resource_version();
    let started = Instant::now();
    let child = Command::new(agent_bin())
        .arg("run")
        .arg("--kubeconfig")
        .arg(&kubeconfig)
        .args(["--node-name", NODE, "--no-events", "--on-exit", "detach"])
        // The pipeline, not the batching: events are measured one at a time.
        .args(["--debounce-ms", "1", "--max-delay-ms", "20", "--poll-ms", "20"])
        .args(["--max-ipcache", "1048576", "--max-policy", "1048576"])
        .arg("--bpffs-dir")
        .arg(dir.join("agent"))
        .arg("--status-file")
        .arg(&status)
        .arg("--flow-socket")
        .arg(work.join("flows.sock"))
        .arg("--health-addr")
        .arg(metrics.to_string())
        // Info: each `applied` line says where the time of a change went.
        .env("NETPOL_LOG", "info")
        .stdin(Stdio::null())
        .stdout(log.try_clone().map_err(|e| e.to_string())?)
        .stderr(log)
        .spawn()
        .map_err(|e| format!("starting {}: {e}", agent_bin()))?;
    let pid = child.id();
    let mut agent = Agent(child);
    let measured = measure(
        config, &server, &mut agent, &status, state, size, started, version,
    )
    .and_then(|(measured, served)| {
        let churned = churn_for
            .map(|duration| churn(&server, &served, &mut agent, &status, metrics, duration))
            .transpose()?;
        Ok((measured, churned))
    });
    let (_, peak_rss) = memory_of(&pid.to_string());
    drop(agent);
    // Kept whatever happened: it says where the time went, or why the agent stopped.
    keep_log(&work.join("agent.log"), size);
    let _ = std::fs::remove_dir_all(&work);
    let ((first_sync, rss_synced, per_kind), churn) = measured?;
    let changes: Vec<f64> = per_kind
        .iter()
        .filter(|(e, _)| **e != Event::Conditions)
        .flat_map(|(_, v)| v.iter().copied())
        .collect();
    Ok(KubePath {
        first_sync,
        rss_synced,
        peak_rss,
        per_kind: per_kind
            .into_iter()
            .map(|(e, v)| (e, Summary::of(&v)))
            .collect(),
        changes: Summary::of(&changes),
        churn,
    })
}

/// The first sync, the RSS then (MiB), and each change's time (ms) by kind.
type Measured = (Duration, f64, BTreeMap<Event, Vec<f64>>);

/// Measures the running agent: see [`Measured`]; and the objects as it left them.
#[allow(clippy::too_many_arguments)]
fn measure(
    config: &Config,
    server: &ApiServer,
    agent: &mut Agent,
    status: &Path,
    state: &ClusterState,
    size: Size,
    started: Instant,
    version: u64,
) -> Result<(Measured, Served), String> {
    let first_sync = wait_status(&mut agent.0, status, version, started, SYNC_DEADLINE)
        .map_err(|e| format!("first sync: {e}"))?;
    let (rss_synced, _) = memory_of(&agent.0.id().to_string());
    let mut served = Served::of(state);
    let mut per_kind: BTreeMap<Event, Vec<f64>> = BTreeMap::new();
    let count = if config.smoke { 12 } else { 240 };
    for i in 0..count {
        let t = Instant::now();
        let (event, version) = change(server, &mut served, size, i);
        let took = wait_status(&mut agent.0, status, version, t, CHANGE_DEADLINE)
            .map_err(|e| format!("{}: {e}", event.label()))?;
        per_kind.entry(event).or_default().push(ms(took));
    }
    Ok(((first_sync, rss_synced, per_kind), served))
}

/// Keeps the agent's log as `target/bench/control-agent-<pods>.log`.
fn keep_log(log: &Path, size: Size) {
    let dir = crate::common::target_dir().join("bench");
    let kept = dir.join(format!("control-agent-{}.log", size.pods()));
    match std::fs::create_dir_all(&dir).and_then(|()| std::fs::copy(log, &kept)) {
        Ok(_) => eprintln!("agent log: {}", kept.display()),
        Err(error) => eprintln!("cannot keep the agent log as {}: {error}", kept.display()),
    }
}

/// A fresh directory for the agent's files (kubeconfig, status, log, socket), named
/// `netpol-bench-<size>-<pid>`: the lab's sweep of stale directories reads the owner
/// from the last part, and leaves those of live processes alone.
fn tempdir(under: &Path) -> Result<std::path::PathBuf, String> {
    let dir = std::env::temp_dir().join(format!(
        "netpol-bench-{}-{}",
        under
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default(),
        std::process::id(),
    ));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    Ok(dir)
}
