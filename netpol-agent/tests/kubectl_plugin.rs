//! `kubectl netpol` (the `kubectl-netpol` binary) run as a user would, against the API
//! server double (`netpol_lab::apiserver`, on 127.0.0.1) through a kubeconfig with
//! contexts: explain and matrix from the live cluster, read-only. No root.

use std::path::{Path, PathBuf};
use std::process::Output;

use netpol_lab::apiserver::ApiServer;
use serde_json::{Value, json};

/// The context of the kubeconfig that points at the double (not the current one).
const CONTEXT: &str = "kind-netpol";

fn namespace(name: &str, labels: Value) -> Value {
    json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name, "labels": labels}})
}

fn pod(ns: &str, name: &str, ip: &str, labels: Value) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": ns, "labels": labels},
        "spec": {"nodeName": "n1", "containers": [{"name": "c", "image": "nginx",
                 "ports": [{"name": "http", "containerPort": 80, "protocol": "TCP"}]}]},
        "status": {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}], "hostIP": "192.168.0.1"},
    })
}

/// x (env=prod): a, b, d; y (env=dev): c. b admits TCP/80 from a only (NetworkPolicy
/// x/isolate-b); the Admin tier denies dev → prod (ClusterNetworkPolicy no-dev); the
/// Service x/web (8080 → 80) has b as its backend.
async fn cluster() -> ApiServer {
    let server = ApiServer::start().await.expect("the double starts");
    server.apply(namespace("x", json!({"env": "prod"})));
    server.apply(namespace("y", json!({"env": "dev"})));
    server.apply(pod("x", "a", "10.1.0.1", json!({"app": "a"})));
    server.apply(pod("x", "b", "10.1.0.2", json!({"app": "b"})));
    server.apply(pod("x", "d", "10.1.0.4", json!({"app": "d"})));
    server.apply(pod("y", "c", "10.1.1.1", json!({"app": "c"})));
    server.apply(json!({
        "apiVersion": "v1", "kind": "Node", "metadata": {"name": "n1"},
        "status": {"addresses": [{"type": "InternalIP", "address": "192.168.0.1"}]},
    }));
    server.apply(json!({
        "apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
        "metadata": {"name": "isolate-b", "namespace": "x"},
        "spec": {"podSelector": {"matchLabels": {"app": "b"}},
                 "ingress": [{"from": [{"podSelector": {"matchLabels": {"app": "a"}}}],
                              "ports": [{"protocol": "TCP", "port": 80}]}]},
    }));
    server.apply(json!({
        "apiVersion": "policy.networking.k8s.io/v1alpha2", "kind": "ClusterNetworkPolicy",
        "metadata": {"name": "no-dev"},
        "spec": {"tier": "Admin", "priority": 10,
                 "subject": {"namespaces": {"matchLabels": {"env": "prod"}}},
                 "ingress": [{"name": "deny-dev", "action": "Deny",
                              "from": [{"namespaces": {"matchLabels": {"env": "dev"}}}]}]},
    }));
    server.apply(json!({
        "apiVersion": "v1", "kind": "Service", "metadata": {"name": "web", "namespace": "x"},
        "spec": {"type": "ClusterIP", "clusterIP": "10.96.0.10", "clusterIPs": ["10.96.0.10"],
                 "selector": {"app": "b"},
                 "ports": [{"name": "http", "port": 8080, "targetPort": 80, "protocol": "TCP"}]},
    }));
    server.apply(json!({
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": "web-1", "namespace": "x",
                     "labels": {"kubernetes.io/service-name": "web"}},
        "addressType": "IPv4",
        "ports": [{"name": "http", "port": 80, "protocol": "TCP"}],
        "endpoints": [{"addresses": ["10.1.0.2"], "conditions": {"ready": true}}],
    }));
    server
}

/// A scratch directory, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> TempDir {
        let dir = std::env::temp_dir().join(format!("netpol-kubectl-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }

    fn write(&self, name: &str, text: &str) -> PathBuf {
        let path = self.0.join(name);
        std::fs::write(&path, text).unwrap();
        path
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A kubeconfig whose current context points nowhere (a closed port of 127.0.0.1) and
/// whose context [`CONTEXT`] is the double's, with namespace x.
fn kubeconfig(dir: &TempDir, server: &ApiServer) -> PathBuf {
    dir.write(
        "kubeconfig",
        &format!(
            "apiVersion: v1\nkind: Config\n\
             clusters:\n\
             - name: double\n  cluster:\n    server: {}\n\
             - name: nowhere\n  cluster:\n    server: http://127.0.0.1:1\n\
             contexts:\n\
             - name: {CONTEXT}\n  context:\n    cluster: double\n    user: me\n    namespace: x\n\
             - name: elsewhere\n  context:\n    cluster: nowhere\n    user: me\n\
             current-context: elsewhere\n\
             users:\n- name: me\n  user: {{}}\n",
            server.url()
        ),
    )
}

/// Runs `kubectl-netpol ARGS --kubeconfig FILE --context kind-netpol` (the double keeps
/// serving meanwhile).
async fn kubectl_netpol(kubeconfig: &Path, args: &[&str]) -> Output {
    let mut all: Vec<&str> = args.to_vec();
    all.extend(["--context", CONTEXT]);
    run(&all, Some(kubeconfig), None).await
}

async fn run(args: &[&str], kubeconfig: Option<&Path>, env: Option<&Path>) -> Output {
    let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_kubectl-netpol"));
    command
        .args(args)
        .env("NO_COLOR", "1")
        .env_remove("KUBECONFIG")
        .env_remove("RUST_BACKTRACE");
    if let Some(file) = kubeconfig {
        command.arg("--kubeconfig").arg(file);
    }
    if let Some(file) = env {
        command.env("KUBECONFIG", file);
    }
    command.output().await.expect("kubectl-netpol runs")
}

fn stdout(output: &Output) -> String {
    assert!(
        output.status.success(),
        "kubectl-netpol failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout.clone()).unwrap()
}

fn json_of(output: &Output) -> Value {
    serde_json::from_str(&stdout(output)).expect("-o json prints JSON")
}

#[tokio::test(flavor = "current_thread")]
async fn explain_names_the_network_policy_rule_that_allows_and_the_one_that_isolates() {
    let server = cluster().await;
    let dir = TempDir::new("np");
    let config = kubeconfig(&dir, &server);

    let allowed = stdout(&kubectl_netpol(&config, &["explain", "x/a", "x/b", "80/TCP"]).await);
    assert!(
        allowed.starts_with("x/a (10.1.0.1) -> x/b (10.1.0.2) TCP/80: ALLOWED\n"),
        "{allowed}"
    );
    assert!(
        allowed.contains("→ allowed by NetworkPolicy x/isolate-b spec.ingress[0]"),
        "{allowed}"
    );

    let dropped = stdout(&kubectl_netpol(&config, &["explain", "x/d", "x/b", "80/TCP"]).await);
    assert!(dropped.contains("TCP/80: BLOCKED"), "{dropped}");
    assert!(
        dropped.contains("isolated by NetworkPolicy x/isolate-b"),
        "{dropped}"
    );
    assert!(
        dropped.contains("→ dropped: isolated, and no rule allows TCP/80 from x/d"),
        "{dropped}"
    );
}

#[tokio::test(flavor = "current_thread")]
async fn explain_names_the_cluster_network_policy_rule_of_the_admin_tier() {
    let server = cluster().await;
    let dir = TempDir::new("cnp");
    let config = kubeconfig(&dir, &server);
    let text = stdout(&kubectl_netpol(&config, &["explain", "y/c", "x/a", "80/TCP"]).await);
    assert!(
        text.contains("y/c (10.1.1.1) -> x/a (10.1.0.1) TCP/80: BLOCKED"),
        "{text}"
    );
    assert!(
        text.contains(
            "→ dropped by ClusterNetworkPolicy/no-dev (Admin, priority 10) ingress rule \"deny-dev\""
        ),
        "{text}"
    );
    // The other way round, nothing denies: a and c are isolated by nothing.
    let text = stdout(&kubectl_netpol(&config, &["explain", "x/a", "y/c", "80/TCP"]).await);
    assert!(text.contains("TCP/80: ALLOWED"), "{text}");
}

#[tokio::test(flavor = "current_thread")]
async fn json_output_parses_and_carries_each_lists_resource_version_and_count() {
    let server = cluster().await;
    let dir = TempDir::new("json");
    let config = kubeconfig(&dir, &server);
    let value =
        json_of(&kubectl_netpol(&config, &["explain", "x/d", "x/b", "80/TCP", "-o", "json"]).await);
    assert_eq!(value["allowed"], false);
    assert_eq!(value["hooks"][1]["verdict"]["verdict"], "denied");
    assert_eq!(value["hooks"][1]["isolated_by"][0], "x/isolate-b");
    let cluster = &value["cluster"];
    assert_eq!(cluster["context"], CONTEXT);
    assert_eq!(cluster["server"], server.url());
    let version = server.resource_version().to_string();
    let lists: Vec<(String, Value, Value)> = cluster["lists"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| {
            (
                l["resource"].as_str().unwrap().to_owned(),
                l["resource_version"].clone(),
                l["count"].clone(),
            )
        })
        .collect();
    let expected = [
        ("namespaces", 2),
        ("pods", 4),
        ("networkpolicies", 1),
        ("clusternetworkpolicies", 1),
        ("nodes", 1),
        ("services", 1),
        ("endpointslices", 1),
        ("servicecidrs", 0),
    ]
    .map(|(resource, count)| (resource.to_owned(), json!(version), json!(count)));
    assert_eq!(lists, expected);
}

#[tokio::test(flavor = "current_thread")]
async fn the_resource_versions_printed_are_the_api_servers() {
    let server = cluster().await;
    let dir = TempDir::new("versions");
    let config = kubeconfig(&dir, &server);
    let v = server.resource_version();
    let text = stdout(&kubectl_netpol(&config, &["explain", "x/a", "x/b", "80"]).await);
    let footer: String = text
        .split_once(&format!("read from cluster {CONTEXT}:"))
        .unwrap_or_else(|| panic!("no footer: {text}"))
        .1
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ");
    assert_eq!(
        footer,
        format!(
            "namespaces@{v} (2), pods@{v} (4), networkpolicies@{v} (1), \
             clusternetworkpolicies@{v} (1), nodes@{v} (1), services@{v} (1), \
             endpointslices@{v} (1), servicecidrs@{v} (0)"
        )
    );

    // A change is seen by the next run, at the new version.
    let newer = server.apply(pod("x", "e", "10.1.0.5", json!({"app": "e"})));
    let text = stdout(&kubectl_netpol(&config, &["matrix"]).await);
    assert!(text.contains(&format!("pods@{newer} (5)")), "{text}");
}

#[tokio::test(flavor = "current_thread")]
async fn a_bare_pod_name_is_in_the_namespace_of_n_or_else_of_the_context() {
    let server = cluster().await;
    let dir = TempDir::new("bare");
    let config = kubeconfig(&dir, &server);
    let with_n =
        stdout(&kubectl_netpol(&config, &["explain", "-n", "x", "a", "b", "80/TCP"]).await);
    assert!(
        with_n.starts_with("x/a (10.1.0.1) -> x/b (10.1.0.2) TCP/80: ALLOWED"),
        "{with_n}"
    );
    // The context's namespace is x.
    let from_context = stdout(&kubectl_netpol(&config, &["explain", "a", "b", "80/TCP"]).await);
    assert_eq!(from_context, with_n);
    // -n y: c is y/c, the other end names its namespace.
    let text =
        stdout(&kubectl_netpol(&config, &["-n", "y", "explain", "c", "x/a", "80/TCP"]).await);
    assert!(
        text.contains("y/c (10.1.1.1) -> x/a (10.1.0.1) TCP/80: BLOCKED"),
        "{text}"
    );
    // A bare name that is not there.
    let output = kubectl_netpol(&config, &["explain", "-n", "y", "a", "c", "80/TCP"]).await;
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("\"y/a\": no such pod; pods of the namespace: y/c"),
        "{stderr}"
    );
}

#[tokio::test(flavor = "current_thread")]
async fn a_service_destination_is_explained_for_its_backends() {
    let server = cluster().await;
    let dir = TempDir::new("svc");
    let config = kubeconfig(&dir, &server);
    let text = stdout(&kubectl_netpol(&config, &["explain", "a", "svc/web", "8080/TCP"]).await);
    assert!(
        text.starts_with("svc x/web TCP/8080 (http): 1 of 1 backends allowed"),
        "{text}"
    );
    assert!(
        text.contains("x/a (10.1.0.1) -> x/b (10.1.0.2) TCP/80: ALLOWED"),
        "{text}"
    );
    let text = stdout(&kubectl_netpol(&config, &["explain", "x/d", "10.96.0.10", "8080"]).await);
    assert!(
        text.starts_with("svc x/web at 10.96.0.10 TCP/8080 (http): 0 of 1 backends allowed"),
        "{text}"
    );
}

#[tokio::test(flavor = "current_thread")]
async fn matrix_shows_the_cells_of_the_namespaces_and_pods_asked_for() {
    let server = cluster().await;
    let dir = TempDir::new("matrix");
    let config = kubeconfig(&dir, &server);
    let text = stdout(&kubectl_netpol(&config, &["matrix", "-n", "x", "-n", "y"]).await);
    let expected = "\
pods of namespaces x, y: 4 of 4

TCP/80 (4 destinations)
  from \\ to  x/a  x/b  x/d  y/c
  x/a         -    ✓    ✓    ✓
  x/b         ✓    -    ✓    ✓
  x/d         ✓    ✗    -    ✓
  y/c         ✗    ✗    ✗    -
";
    assert!(text.starts_with(expected), "{text}");

    // The context's namespace by default; a selector narrows it.
    let value =
        json_of(&kubectl_netpol(&config, &["matrix", "-l", "app in (a,b)", "-o", "json"]).await);
    let pods: Vec<&str> = value["matrix"]["pods"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["pod"].as_str().unwrap())
        .collect();
    assert_eq!(pods, ["x/a", "x/b"]);
    assert_eq!(value["shown"]["namespaces"], json!(["x"]));
    assert_eq!(value["shown"]["selector"], "app in (a,b)");
    assert_eq!(
        value["matrix"]["tables"][0]["cells"],
        json!([[null, "allowed"], ["allowed", null]])
    );
    assert_eq!(value["diff"], Value::Null);

    let every = json_of(&kubectl_netpol(&config, &["matrix", "-A", "-o", "json"]).await);
    assert_eq!(every["matrix"]["pods"].as_array().unwrap().len(), 4);
    assert_eq!(every["shown"]["namespaces"], Value::Null);
}

#[tokio::test(flavor = "current_thread")]
async fn matrix_apply_reports_the_cells_a_policy_would_change_before_it_is_applied() {
    let server = cluster().await;
    let dir = TempDir::new("apply");
    let config = kubeconfig(&dir, &server);
    // Only d may reach a: b loses its way to a.
    let policy = dir.write(
        "p.yaml",
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\n\
         metadata: {name: only-d, namespace: x}\n\
         spec:\n  podSelector: {matchLabels: {app: a}}\n\
         \x20 ingress: [{from: [{podSelector: {matchLabels: {app: d}}}]}]\n",
    );
    let policy = policy.to_str().unwrap();
    let version = server.resource_version();
    let text = stdout(&kubectl_netpol(&config, &["matrix", "-n", "x", "--apply", policy]).await);
    assert!(text.contains("\n  x/b        ✓→✗   -    ✓\n"), "{text}");
    assert!(
        text.contains("changes:\n  x/b -> x/a TCP/80: ✓ → ✗ (newly blocked)\n"),
        "{text}"
    );
    assert!(
        text.contains("1 cell change: 1 newly blocked, 0 newly allowed"),
        "{text}"
    );

    let value = json_of(
        &kubectl_netpol(
            &config,
            &["matrix", "-n", "x", "--apply", policy, "-o", "json"],
        )
        .await,
    );
    assert_eq!(
        value["diff"]["changes"],
        json!([{
            "port": "TCP/80", "src": "x/b", "dst": "x/a", "before": "allowed", "after": "blocked",
        }])
    );
    assert!(value["before"].is_object());
    assert_eq!(
        server.resource_version(),
        version,
        "nothing was applied to the cluster"
    );

    // A file that cannot be read fails before the cluster is asked anything.
    let requests = server.requests().len();
    let output = kubectl_netpol(&config, &["matrix", "--apply", "/nonexistent/p.yaml"]).await;
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("/nonexistent/p.yaml"));
    assert_eq!(server.requests().len(), requests);
}

#[tokio::test(flavor = "current_thread")]
async fn the_plugin_only_ever_lists() {
    let server = cluster().await;
    let dir = TempDir::new("readonly");
    let config = kubeconfig(&dir, &server);
    let policy = dir.write(
        "p.yaml",
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\n\
         metadata: {name: deny, namespace: x}\nspec: {podSelector: {}}\n",
    );
    for args in [
        vec!["explain", "x/a", "x/b", "80/TCP"],
        vec!["explain", "a", "svc/web", "8080/TCP", "-o", "json"],
        vec!["matrix", "-A", "--apply", policy.to_str().unwrap()],
    ] {
        stdout(&kubectl_netpol(&config, &args).await);
    }
    let requests = server.requests();
    assert!(!requests.is_empty());
    let not_lists: Vec<_> = requests.iter().filter(|r| r.verb != "list").collect();
    assert!(not_lists.is_empty(), "{not_lists:?}");
    assert!(
        requests.iter().all(|r| r.namespace.is_none()),
        "cluster-wide lists"
    );

    // deploy/kubectl-netpol-viewer.yaml grants exactly these lists.
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/kubectl-netpol-viewer.yaml");
    let role: k8s_openapi::api::rbac::v1::ClusterRole =
        serde_norway::from_str(&std::fs::read_to_string(&path).unwrap()).expect("a ClusterRole");
    let rules = role.rules.unwrap_or_default();
    let granted: std::collections::BTreeSet<(String, String, String)> = rules
        .iter()
        .flat_map(|rule| {
            let groups = rule.api_groups.clone().unwrap_or_default();
            let resources = rule.resources.clone().unwrap_or_default();
            groups.into_iter().flat_map(move |group| {
                let verbs = rule.verbs.clone();
                resources.clone().into_iter().flat_map(move |resource| {
                    let group = group.clone();
                    verbs
                        .clone()
                        .into_iter()
                        .map(move |verb| (verb, group.clone(), resource.clone()))
                })
            })
        })
        .collect();
    let made: std::collections::BTreeSet<(String, String, String)> = requests
        .iter()
        .map(|r| (r.verb.clone(), r.group.clone(), r.resource.clone()))
        .collect();
    assert_eq!(
        granted, made,
        "the viewer role grants what the plugin lists, no more"
    );
}

#[tokio::test(flavor = "current_thread")]
async fn a_cluster_without_the_cluster_network_policy_crd_has_none() {
    let server = cluster().await;
    let dir = TempDir::new("nocrd");
    let config = kubeconfig(&dir, &server);
    server.fail("clusternetworkpolicies", "list", Some(404));
    let text = stdout(&kubectl_netpol(&config, &["explain", "y/c", "x/a", "80/TCP"]).await);
    assert!(text.contains("TCP/80: ALLOWED"), "{text}");
    assert!(
        text.contains("clusternetworkpolicies (not served)"),
        "{text}"
    );
}

#[tokio::test(flavor = "current_thread")]
async fn a_failed_list_names_its_kind_and_a_context_that_is_not_there_fails_plainly() {
    let server = cluster().await;
    let dir = TempDir::new("fail");
    let config = kubeconfig(&dir, &server);
    server.fail("endpointslices", "list", Some(403));
    let output = kubectl_netpol(&config, &["matrix"]).await;
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("listing endpointslices: "), "{stderr}");

    let output = run(&["matrix", "--context", "nope"], Some(&config), None).await;
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("kubeconfig"), "{stderr}");
    assert!(stderr.contains("nope"), "{stderr}");
}

#[tokio::test(flavor = "current_thread")]
async fn kubeconfig_comes_from_the_environment_with_its_current_context() {
    let server = cluster().await;
    let dir = TempDir::new("env");
    let config = dir.write("config", &server.kubeconfig());
    let text = stdout(&run(&["matrix", "-n", "y"], None, Some(&config)).await);
    assert!(text.contains("pods of namespace y: 1 of 4"), "{text}");
    assert!(text.contains("read from cluster double:"), "{text}");
}

/// `kubectl` on the PATH, if there is one.
fn kubectl() -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join("kubectl"))
        .find(|file| file.is_file())
}

#[tokio::test(flavor = "current_thread")]
async fn kubectl_runs_it_as_the_netpol_plugin_when_it_is_on_the_path() {
    let Some(kubectl) = kubectl() else {
        eprintln!("skipped: no kubectl on the PATH");
        return;
    };
    let server = cluster().await;
    let dir = TempDir::new("kubectl");
    let config = kubeconfig(&dir, &server);
    let plugin = PathBuf::from(env!("CARGO_BIN_EXE_kubectl-netpol"));
    let path = std::env::join_paths(
        std::iter::once(plugin.parent().unwrap().to_path_buf())
            .chain(std::env::split_paths(&std::env::var_os("PATH").unwrap())),
    )
    .unwrap();
    let output = tokio::process::Command::new(kubectl)
        .args([
            "netpol",
            "explain",
            "-n",
            "x",
            "a",
            "b",
            "80/TCP",
            "--context",
            CONTEXT,
        ])
        .arg("--kubeconfig")
        .arg(&config)
        .env("PATH", path)
        .env("NO_COLOR", "1")
        .env_remove("KUBECONFIG")
        .output()
        .await
        .unwrap();
    let text = stdout(&output);
    assert!(
        text.starts_with("x/a (10.1.0.1) -> x/b (10.1.0.2) TCP/80: ALLOWED"),
        "{text}"
    );
    assert!(
        text.contains(&format!("read from cluster {CONTEXT}:")),
        "{text}"
    );
}
