//! deploy/ without a cluster: every manifest parses into its k8s-openapi type with no
//! unknown field, the DaemonSet has what the agent needs, and the ClusterRole allows
//! every API call the agent makes (the request log of a run against the API server
//! double) and nothing it does not need.

use std::path::{Path, PathBuf};
use std::time::Duration;

use k8s_openapi::api::apps::v1::DaemonSet;
use k8s_openapi::api::core::v1::ServiceAccount;
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding, PolicyRule};
use netpol_agent::source::kube::{ClusterWatch, Settings};
use netpol_compile::state::ClusterState;
use netpol_lab::apiserver::{ApiServer, Request};
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::{Value, json};

fn deploy_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy")
}

/// Every YAML document of a file, as JSON values.
fn documents(path: &Path) -> Vec<Value> {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_norway::Deserializer::from_str(&text)
        .map(|doc| <Value as serde::Deserialize>::deserialize(doc).expect("valid YAML"))
        .filter(|v| !v.is_null())
        .collect()
}

/// The first path present in `original` but lost in `typed` (an unknown field).
fn unknown_field(original: &Value, typed: &Value, path: &str) -> Option<String> {
    match (original, typed) {
        (Value::Object(fields), Value::Object(known)) => fields.iter().find_map(|(k, v)| {
            let child = format!("{path}.{k}");
            match known.get(k) {
                _ if v.is_null() => None,
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

fn strict<T: DeserializeOwned + Serialize>(value: &Value) -> T {
    let name = format!("{} {}", value["kind"], value["metadata"]["name"]);
    let typed: T = serde_path_to_error::deserialize(value)
        .unwrap_or_else(|e| panic!("{name}: {}: {}", e.path(), e.inner()));
    let round_trip = serde_json::to_value(&typed).unwrap();
    if let Some(field) = unknown_field(value, &round_trip, "") {
        panic!("{name}: unknown field {field}");
    }
    typed
}

struct Deploy {
    service_account: ServiceAccount,
    role: ClusterRole,
    binding: ClusterRoleBinding,
    daemonset: DaemonSet,
}

fn deploy() -> Deploy {
    let mut service_account = None;
    let mut role = None;
    let mut binding = None;
    let mut daemonset = None;
    let mut files = 0;
    for entry in std::fs::read_dir(deploy_dir()).expect("deploy/ exists") {
        let path = entry.unwrap().path();
        if !matches!(
            path.extension().and_then(|e| e.to_str()),
            Some("yaml" | "yml")
        ) {
            continue;
        }
        files += 1;
        // The roles of the plugin's users are not the agent's: each is checked against
        // the requests the plugin makes (tests/kubectl_plugin.rs, tests/kubectl_agents.rs);
        // here only that they read strictly.
        let name = path
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or_default();
        if name.starts_with("kubectl-netpol-") {
            for doc in documents(&path) {
                match doc["kind"].as_str().unwrap_or_default() {
                    "ClusterRole" => drop(strict::<ClusterRole>(&doc)),
                    "Role" => drop(strict::<k8s_openapi::api::rbac::v1::Role>(&doc)),
                    kind => panic!(
                        "{}: unexpected {kind} for the plugin's users",
                        path.display()
                    ),
                }
            }
            continue;
        }
        for doc in documents(&path) {
            let api_version = doc["apiVersion"].as_str().unwrap_or_default();
            match (api_version, doc["kind"].as_str().unwrap_or_default()) {
                ("v1", "ServiceAccount") => service_account = Some(strict(&doc)),
                ("rbac.authorization.k8s.io/v1", "ClusterRole") => role = Some(strict(&doc)),
                ("rbac.authorization.k8s.io/v1", "ClusterRoleBinding") => {
                    binding = Some(strict(&doc));
                }
                ("apps/v1", "DaemonSet") => daemonset = Some(strict(&doc)),
                ("kind.x-k8s.io/v1alpha4", "Cluster") => {
                    assert!(doc["nodes"].as_array().is_some_and(|n| n.len() >= 2));
                }
                (api_version, kind) => {
                    panic!("{}: unexpected {api_version} {kind}", path.display())
                }
            }
        }
    }
    assert!(files >= 2, "the manifests and the kind config");
    Deploy {
        service_account: service_account.expect("a ServiceAccount"),
        role: role.expect("a ClusterRole"),
        binding: binding.expect("a ClusterRoleBinding"),
        daemonset: daemonset.expect("a DaemonSet"),
    }
}

#[test]
fn the_daemonset_runs_the_agent_as_the_issue_says() {
    let deploy = deploy();
    let sa = deploy.service_account.metadata.name.as_deref().unwrap();
    let sa_ns = deploy
        .service_account
        .metadata
        .namespace
        .as_deref()
        .unwrap();
    let ds = &deploy.daemonset;
    assert_eq!(ds.metadata.namespace.as_deref(), Some(sa_ns));
    let pod = ds.spec.template.spec.as_ref().unwrap();
    assert_eq!(pod.service_account_name.as_deref(), Some(sa));
    assert_eq!(pod.host_network, Some(true));
    let tolerations = pod.tolerations.as_ref().unwrap();
    assert!(
        tolerations
            .iter()
            .any(|t| t.operator.as_deref() == Some("Exists") && t.key.is_none()),
        "tolerates every taint"
    );
    let agent = &pod.containers[0];
    let args = agent.args.as_ref().unwrap();
    assert!(args.iter().any(|a| a == "--kube"));
    let env = agent.env.as_ref().unwrap();
    let node_name = env.iter().find(|e| e.name == "NODE_NAME").unwrap();
    assert_eq!(
        node_name
            .value_from
            .as_ref()
            .unwrap()
            .field_ref
            .as_ref()
            .unwrap()
            .field_path,
        "spec.nodeName"
    );
    let security = agent.security_context.as_ref().unwrap();
    assert_ne!(
        security.privileged,
        Some(true),
        "capabilities, not privileged"
    );
    let caps = security.capabilities.as_ref().unwrap();
    assert_eq!(caps.drop.as_deref(), Some(&["ALL".to_owned()][..]));
    let mut added = caps.add.clone().unwrap();
    added.sort();
    assert_eq!(added, ["BPF", "NET_ADMIN", "PERFMON", "SYS_RESOURCE"]);
    let mounts = agent.volume_mounts.as_ref().unwrap();
    assert!(mounts.iter().any(|m| m.mount_path == "/sys/fs/bpf"));
    let volumes = pod.volumes.as_ref().unwrap();
    let bpffs = volumes.iter().find(|v| v.name == "bpffs").unwrap();
    assert_eq!(bpffs.host_path.as_ref().unwrap().path, "/sys/fs/bpf");
    // The probes hit the health server the args start.
    let health_port = args
        .iter()
        .find_map(|a| a.strip_prefix("--health-addr="))
        .and_then(|addr| addr.rsplit(':').next())
        .and_then(|p| p.parse::<i32>().ok())
        .expect("--health-addr=HOST:PORT");
    let port = agent
        .ports
        .as_ref()
        .unwrap()
        .iter()
        .find(|p| p.name.as_deref() == Some("health"))
        .unwrap();
    assert_eq!(port.container_port, health_port);
    // On the node's loopback only (hostNetwork): pods cannot reach it.
    let health_host = args
        .iter()
        .find_map(|a| a.strip_prefix("--health-addr="))
        .and_then(|addr| addr.rsplit_once(':'))
        .map(|(host, _)| host)
        .unwrap();
    assert_eq!(health_host, "127.0.0.1");
    for (probe, path) in [
        (agent.readiness_probe.as_ref(), "/readyz"),
        (agent.liveness_probe.as_ref(), "/healthz"),
    ] {
        let get = probe.unwrap().http_get.as_ref().unwrap();
        assert_eq!(get.path.as_deref(), Some(path));
        assert_eq!(get.host.as_deref(), Some(health_host));
    }
    // The binding gives the role to the service account.
    assert_eq!(
        deploy.binding.role_ref.name,
        deploy.role.metadata.name.clone().unwrap()
    );
    let subject = &deploy.binding.subjects.as_ref().unwrap()[0];
    assert_eq!(
        (subject.name.as_str(), subject.namespace.as_deref()),
        (sa, Some(sa_ns))
    );
}

fn allows(rules: &[PolicyRule], request: &Request) -> bool {
    rules.iter().any(|rule| {
        let has = |list: &Option<Vec<String>>, item: &str| {
            list.as_ref()
                .is_some_and(|l| l.iter().any(|x| x == item || x == "*"))
        };
        has(&rule.api_groups, &request.group)
            && has(&rule.resources, &request.resource)
            && rule.verbs.iter().any(|v| v == &request.verb)
    })
}

#[tokio::test(flavor = "current_thread")]
async fn the_cluster_role_covers_every_call_the_agent_makes_and_no_more() {
    let rules = deploy().role.rules.unwrap_or_default();
    // Read-only except Events.
    for rule in &rules {
        let events = rule.resources.iter().flatten().all(|r| r == "events");
        for verb in &rule.verbs {
            let allowed: &[&str] = if events {
                &["create", "patch"]
            } else {
                &["get", "list", "watch"]
            };
            assert!(allowed.contains(&verb.as_str()), "{rule:?} grants {verb}");
        }
    }

    // A run against the double: initial lists, watches, an update, an invalid policy
    // (an Event), a killed stream (re-watch).
    let server = ApiServer::start().await.unwrap();
    server.apply(json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "x"}}));
    server.apply(json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": "n1"}}));
    server.apply(
        json!({"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
        "metadata": {"name": "p", "namespace": "x"},
        "spec": {"podSelector": {}, "ingress": [{"ports": [{"port": 90, "endPort": 80}]}]}}),
    );
    let mut settings = Settings::new("n1");
    settings.debounce = Duration::from_millis(10);
    let config = kube::Config::new(server.url().parse().unwrap());
    let mut source = ClusterWatch::start(config, settings).unwrap();
    let mut state = ClusterState::default();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    loop {
        if source.changed(Duration::from_millis(100)).await.unwrap() {
            // As the agent's loop: the compiler reports the invalid policy.
            source.snapshot(&mut state);
            let compiled = netpol_compile::compile(&state, &Default::default());
            source.report(&compiled.diagnostics);
        }
        if !server.events().is_empty() {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "no Event published");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    server.kill_watches();
    server.apply(json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "y"}}));
    while state.namespaces.len() < 2 {
        if source.changed(Duration::from_millis(100)).await.unwrap() {
            source.snapshot(&mut state);
        }
        assert!(tokio::time::Instant::now() < deadline, "no re-watch");
    }

    let mut calls = server.requests();
    calls.sort();
    calls.dedup_by(|a, b| (&a.verb, &a.group, &a.resource) == (&b.verb, &b.group, &b.resource));
    let seen: Vec<String> = calls
        .iter()
        .map(|c| format!("{} {}/{}", c.verb, c.group, c.resource))
        .collect();
    for verb in ["list", "watch"] {
        for resource in [
            "pods",
            "namespaces",
            "networkpolicies",
            "nodes",
            "services",
            "endpointslices",
            "servicecidrs",
        ] {
            assert!(
                calls
                    .iter()
                    .any(|c| c.verb == verb && c.resource == resource),
                "{verb} {resource} not exercised: {seen:?}"
            );
        }
    }
    assert!(
        calls
            .iter()
            .any(|c| c.verb == "create" && c.resource == "events"),
        "{seen:?}"
    );
    for call in &calls {
        assert!(
            allows(&rules, call),
            "the ClusterRole does not allow {call:?}"
        );
    }
}
