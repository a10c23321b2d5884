//! Tier 4: the Kubernetes source with the real kube-rs client against the in-process API
//! server double (`netpol_lab::apiserver`): initial sync gating, updates and deletes, 410 Gone,
//! killed watch streams and a restarted server, each logged as one line. No root.

use std::io::Write as _;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use netpol_agent::source::kube::{ClusterWatch, Settings};
use netpol_compile::Compiler;
use netpol_compile::state::{Changes, ClusterState, ObjectRef};
use netpol_lab::apiserver::ApiServer;
use serde_json::{Value, json};

const NODE: &str = "node-1";
const WAIT: Duration = Duration::from_secs(15);

fn namespace(name: &str, labels: Value) -> Value {
    json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name, "labels": labels}})
}

fn pod(ns: &str, name: &str, node: &str, ip: &str, labels: Value) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": ns, "labels": labels,
                     "annotations": {"kubectl.kubernetes.io/last-applied-configuration": "{}"}},
        "spec": {"nodeName": node, "containers": [{"name": "c", "image": "nginx",
                 "ports": [{"name": "http", "containerPort": 80, "protocol": "TCP"}]}]},
        "status": {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}], "hostIP": "192.168.0.1"},
    })
}

fn policy(ns: &str, name: &str, spec: Value) -> Value {
    json!({"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
           "metadata": {"name": name, "namespace": ns}, "spec": spec})
}

fn node(name: &str, ip: &str) -> Value {
    json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": name},
           "status": {"addresses": [{"type": "InternalIP", "address": ip},
                                    {"type": "Hostname", "address": name}]}})
}

/// A double holding a small cluster: two namespaces, three pods on two nodes, a policy.
async fn cluster() -> ApiServer {
    let server = ApiServer::start().await.expect("the double starts");
    server.apply(namespace("x", json!({"team": "a"})));
    server.apply(namespace("y", json!({})));
    server.apply(pod("x", "a", NODE, "10.0.0.1", json!({"app": "a"})));
    server.apply(pod("x", "b", NODE, "10.0.0.2", json!({"app": "b"})));
    server.apply(pod("y", "c", "node-2", "10.0.1.1", json!({"app": "c"})));
    server.apply(node(NODE, "192.168.0.1"));
    server.apply(node("node-2", "192.168.0.2"));
    server.apply(policy(
        "x",
        "deny",
        json!({"podSelector": {}, "policyTypes": ["Ingress"]}),
    ));
    server
}

fn settings() -> Settings {
    let mut settings = Settings::new(NODE);
    settings.debounce = Duration::from_millis(20);
    settings.max_delay = Duration::from_millis(200);
    settings.backoff_initial = Duration::from_millis(50);
    settings.backoff_max = Duration::from_millis(400);
    settings
}

fn source(server: &ApiServer) -> ClusterWatch {
    let config = kube::Config::new(server.url().parse().expect("a URL"));
    ClusterWatch::start(config, settings()).expect("the source starts")
}

/// Takes snapshots on every change until `done` holds for the state (bounded).
async fn wait_for(
    source: &mut ClusterWatch,
    state: &mut ClusterState,
    what: &str,
    done: impl Fn(&ClusterState) -> bool,
) -> Option<u64> {
    let deadline = tokio::time::Instant::now() + WAIT;
    let mut generation = None;
    loop {
        if source
            .changed(Duration::from_millis(100))
            .await
            .expect("watchers run")
        {
            generation = source.snapshot(state).generation.or(generation);
            if done(state) {
                return generation;
            }
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}; state: {} namespaces, {} pods, {} policies",
            state.namespaces.len(),
            state.pods.len(),
            state.policies.len()
        );
    }
}

/// Drives the source (so its logs are flushed) for `period` without expecting changes.
async fn idle(source: &mut ClusterWatch, state: &mut ClusterState, period: Duration) {
    let deadline = tokio::time::Instant::now() + period;
    while tokio::time::Instant::now() < deadline {
        if source.changed(Duration::from_millis(50)).await.unwrap() {
            source.snapshot(state);
        }
    }
}

async fn wait_watches(server: &ApiServer, count: usize) {
    let deadline = tokio::time::Instant::now() + WAIT;
    while server.open_watches() < count {
        assert!(
            tokio::time::Instant::now() < deadline,
            "watches did not open"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn label(state: &ClusterState, ns: &str, name: &str, key: &str) -> Option<String> {
    state
        .pods
        .get(&ObjectRef::new(ns, name))?
        .labels()
        .get(key)
        .map(str::to_owned)
}

/// Captures this thread's logs (the tests run on a current-thread runtime, so the
/// watcher tasks log here too).
#[derive(Clone, Default)]
struct Logs(Arc<Mutex<Vec<u8>>>);

impl Logs {
    fn install(&self) -> tracing::subscriber::DefaultGuard {
        let writer = self.clone();
        let filter = tracing_subscriber::EnvFilter::new(format!(
            "info,{}",
            netpol_agent::source::kube::LOG_DIRECTIVES
        ));
        let subscriber = tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_ansi(false)
            .with_writer(move || writer.clone())
            .finish();
        tracing::subscriber::set_default(subscriber)
    }

    fn warnings(&self) -> Vec<String> {
        let text = String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned();
        text.lines()
            .filter(|l| l.contains(" WARN "))
            .map(str::to_owned)
            .collect()
    }
}

impl std::io::Write for Logs {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().write(buf)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[tokio::test(flavor = "current_thread")]
async fn nothing_before_every_initial_list_then_the_trimmed_cluster() {
    let server = cluster().await;
    server.fail("pods", "list", Some(503));
    let mut source = source(&server);
    let mut state = ClusterState::default();
    // Namespaces, policies and the node list fine; pods do not: no view at all.
    for _ in 0..10 {
        assert!(
            !source.changed(Duration::from_millis(50)).await.unwrap(),
            "a change reported before every initial list completed"
        );
    }
    assert!(!source.is_synced());
    server.fail("pods", "list", None);
    let generation = wait_for(&mut source, &mut state, "the initial lists", |s| {
        s.pods.len() == 3
    })
    .await;
    assert_eq!(generation, Some(server.resource_version()));
    assert_eq!(
        state.namespaces.keys().collect::<Vec<_>>(),
        ["x", "y"],
        "all namespaces"
    );
    assert_eq!(state.policies.len(), 1);
    let a = &state.pods[&ObjectRef::new("x", "a")];
    assert_eq!(a.ports()[0].name.as_deref(), Some("http"));
    assert_eq!(a.node_name(), Some(NODE));
    assert!(
        state.pod_interfaces.is_empty(),
        "no pod annotation names an interface in Kubernetes mode"
    );
    let snapshot = source.snapshot(&mut state);
    assert_eq!(
        snapshot.node_ips,
        ["192.168.0.1".parse::<std::net::IpAddr>().unwrap()],
        "only this node's addresses"
    );
}

#[tokio::test(flavor = "current_thread")]
async fn sidecar_ports_and_creation_times_survive_trimming_and_reach_the_compiler() {
    let server = cluster().await;
    // x/a gets a native sidecar serving "metrics"; x/z, a newer pod, has a's address
    // now (x/a's object is stale).
    let mut a = pod("x", "a", NODE, "10.0.0.1", json!({"app": "a"}));
    a["metadata"]["creationTimestamp"] = json!("2025-01-01T00:00:00Z");
    a["spec"]["initContainers"] = json!([
        {"name": "setup", "image": "busybox", "ports": [{"name": "setup", "containerPort": 81}]},
        {"name": "proxy", "image": "envoy", "restartPolicy": "Always",
         "ports": [{"name": "metrics", "containerPort": 9090}]},
    ]);
    server.apply(a);
    let mut z = pod("x", "z", NODE, "10.0.0.1", json!({"app": "z"}));
    z["metadata"]["creationTimestamp"] = json!("2025-01-02T00:00:00Z");
    server.apply(z);
    server.apply(policy(
        "x",
        "metrics",
        json!({"podSelector": {}, "ingress": [{"ports": [{"port": "metrics"}, {"port": "setup"}]}]}),
    ));
    let mut source = source(&server);
    let mut state = ClusterState::default();
    wait_for(&mut source, &mut state, "the cluster", |s| {
        s.pods.len() == 4 && s.policies.len() == 2
    })
    .await;
    let a = &state.pods[&ObjectRef::new("x", "a")];
    let ports: Vec<_> = a.ports().iter().map(|p| p.name.as_deref()).collect();
    assert_eq!(
        ports,
        [Some("http"), Some("metrics")],
        "the container's port, then the native sidecar's; not the setup container's"
    );
    assert!(a.created().is_some());

    let compiled = Compiler::new().compile(&state);
    let holder = compiled
        .local_pods
        .iter()
        .find(|p| p.ips.contains(&"10.0.0.1".parse().unwrap()))
        .expect("someone holds 10.0.0.1");
    assert_eq!(holder.pod, ObjectRef::new("x", "z"), "the newer pod");
    // 10.0.0.1 is x/z's, which declares no "metrics" port: a's sidecar port is not
    // admitted on an address a no longer holds.
    let to = |dst: &str, port| {
        netpol_compile::model::lookup(
            &compiled,
            "10.9.9.9".parse().unwrap(),
            dst.parse().unwrap(),
            6,
            port,
            netpol_compile::Direction::Ingress,
        )
    };
    assert_eq!(to("10.0.0.1", 9090), None, "x/z has no metrics port");
    // Give a its own address again: its sidecar's port is admitted, the setup port not.
    let mut a = pod("x", "a", NODE, "10.0.0.5", json!({"app": "a"}));
    a["spec"]["initContainers"] = json!([
        {"name": "setup", "image": "busybox", "ports": [{"name": "setup", "containerPort": 81}]},
        {"name": "proxy", "image": "envoy", "restartPolicy": "Always",
         "ports": [{"name": "metrics", "containerPort": 9090}]},
    ]);
    server.apply(a);
    wait_for(&mut source, &mut state, "a's new address", |s| {
        s.pods[&ObjectRef::new("x", "a")].pod_ip() == Some("10.0.0.5")
    })
    .await;
    let compiled = Compiler::new().compile(&state);
    let to = |port| {
        netpol_compile::model::lookup(
            &compiled,
            "10.9.9.9".parse().unwrap(),
            "10.0.0.5".parse().unwrap(),
            6,
            port,
            netpol_compile::Direction::Ingress,
        )
    };
    assert!(to(9090).is_some(), "the sidecar's named port is admitted");
    assert_eq!(to(81), None, "an ordinary init container's port is not");
}

#[tokio::test(flavor = "current_thread")]
async fn updates_and_deletes_flow_through_in_batches() {
    let server = cluster().await;
    let mut source = source(&server);
    let mut state = ClusterState::default();
    wait_for(&mut source, &mut state, "sync", |s| s.pods.len() == 3).await;

    // A burst: one batch, and the generation is the last version.
    server.apply(pod(
        "x",
        "a",
        NODE,
        "10.0.0.1",
        json!({"app": "a", "v": "2"}),
    ));
    server.apply(pod("x", "d", NODE, "10.0.0.4", json!({"app": "d"})));
    server.delete("Pod", Some("y"), "c");
    server.delete("NetworkPolicy", Some("x"), "deny");
    server.apply(namespace("z", json!({})));
    let expected = server.resource_version();
    let generation = wait_for(&mut source, &mut state, "the burst", |s| {
        s.pods.len() == 3
            && s.policies.is_empty()
            && s.namespaces.len() == 3
            && label(s, "x", "a", "v").as_deref() == Some("2")
            && !s.pods.contains_key(&ObjectRef::new("y", "c"))
    })
    .await;
    assert_eq!(generation, Some(expected), "the deletion's version counts");
}

#[tokio::test(flavor = "current_thread")]
async fn a_large_initial_list_arrives_in_pages_of_one_version() {
    let server = cluster().await;
    for i in 0..1_234u32 {
        let ip = format!("10.1.{}.{}", i / 250, i % 250 + 1);
        server.apply(pod(
            "big",
            &format!("p{i}"),
            "node-2",
            &ip,
            json!({"app": "big"}),
        ));
    }
    // The pages of one list: a later change does not show in them, they all carry the
    // first page's version, and a compaction expires the token.
    let client = kube::Client::try_from(kube::Config::new(server.url().parse().unwrap())).unwrap();
    let pods: kube::Api<k8s_openapi::api::core::v1::Pod> = kube::Api::all(client);
    let first = pods
        .list(&kube::api::ListParams::default().limit(500))
        .await
        .expect("first page");
    assert_eq!(first.items.len(), 500);
    let version = first.metadata.resource_version.clone();
    server.apply(pod("big", "late", "node-2", "10.2.0.1", json!({})));
    let token = first.metadata.continue_.clone().expect("more pages");
    let second = pods
        .list(
            &kube::api::ListParams::default()
                .limit(500)
                .continue_token(&token),
        )
        .await
        .expect("second page");
    assert_eq!(second.metadata.resource_version, version);
    let token = second.metadata.continue_.clone().expect("a third page");
    let third = pods
        .list(
            &kube::api::ListParams::default()
                .limit(500)
                .continue_token(&token),
        )
        .await
        .expect("third page");
    assert_eq!(
        third.items.len(),
        1_237 - 1_000,
        "the snapshot of the first page"
    );
    assert!(third.metadata.continue_.is_none());
    let again = pods
        .list(&kube::api::ListParams::default().limit(1_000))
        .await
        .expect("a new list");
    let token = again.metadata.continue_.clone().expect("more pages");
    server.compact();
    let expired = pods
        .list(
            &kube::api::ListParams::default()
                .limit(1_000)
                .continue_token(&token),
        )
        .await;
    assert!(
        matches!(&expired, Err(kube::Error::Api(status)) if status.code == 410),
        "{expired:?}"
    );

    // The agent's watchers list in pages (kube-rs asks for 500) and get everything.
    let before = server.requests().len();
    let mut source = source(&server);
    let mut state = ClusterState::default();
    wait_for(&mut source, &mut state, "sync", |s| s.pods.len() == 1_238).await;
    let pod_lists = server.requests()[before..]
        .iter()
        .filter(|r| r.verb == "list" && r.resource == "pods")
        .count();
    assert_eq!(pod_lists, 3, "1,238 pods in pages of 500");
}

#[tokio::test(flavor = "current_thread")]
async fn an_update_of_only_what_trimming_drops_moves_the_version_without_a_change() {
    let server = cluster().await;
    let mut source = source(&server);
    let mut state = ClusterState::default();
    wait_for(&mut source, &mut state, "sync", |s| s.pods.len() == 3).await;

    // A pod's conditions and a node's heartbeat: nothing the agent keeps.
    let mut ready = pod("x", "a", NODE, "10.0.0.1", json!({"app": "a"}));
    ready["status"]["conditions"] = json!([{"type": "Ready", "status": "True"}]);
    server.apply(ready);
    let mut heartbeat = node("node-2", "192.168.0.2");
    heartbeat["status"]["conditions"] = json!([{"type": "Ready", "status": "True",
        "lastHeartbeatTime": "2026-12-04T12:00:00Z"}]);
    server.apply(heartbeat);
    let expected = server.resource_version();
    let deadline = tokio::time::Instant::now() + WAIT;
    let reached = loop {
        let changed = source
            .changed(Duration::from_millis(100))
            .await
            .expect("watchers run");
        assert!(
            !changed,
            "an update of only what trimming drops is no change"
        );
        if let Some(generation) = source.unchanged_generation()
            && generation >= expected
        {
            break generation;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the version never moved"
        );
    };
    assert_eq!(reached, expected);
    assert_eq!(source.unchanged_generation(), None, "reported once");

    // A label is kept: a change, whose snapshot carries the version.
    server.apply(pod(
        "x",
        "a",
        NODE,
        "10.0.0.1",
        json!({"app": "a", "v": "2"}),
    ));
    let expected = server.resource_version();
    let generation = wait_for(&mut source, &mut state, "the label", |s| {
        label(s, "x", "a", "v").as_deref() == Some("2")
    })
    .await;
    assert_eq!(generation, Some(expected));
    assert_eq!(
        source.unchanged_generation(),
        None,
        "the snapshot covered it"
    );
}

#[tokio::test(flavor = "current_thread")]
async fn an_invalid_update_is_enforced_as_far_as_it_can_be_read_and_reported() {
    let server = cluster().await;
    let mut source = source(&server);
    let mut state = ClusterState::default();
    // As the agent's loop: the source mirrors the objects, the compiler admits them.
    let mut compiler = Compiler::new();
    wait_for(&mut source, &mut state, "sync", |s| s.policies.len() == 1).await;
    compiler.compile(&state);
    // An ingress rule allowing 10.0.0.0/8 (written with leading zeros, as the API
    // server accepts) on 80, and one whose only port cannot be read (endPort below
    // port: the API server's validation would reject it; the agent must not trust that
    // a store it reads never holds such an object).
    server.apply(policy(
        "x",
        "deny",
        json!({"podSelector": {}, "ingress": [
            {"from": [{"ipBlock": {"cidr": "010.0.0.0/8"}}], "ports": [{"port": 80}]},
            {"ports": [{"port": 90, "endPort": 80}]},
        ]}),
    ));
    let deadline = tokio::time::Instant::now() + WAIT;
    let (compiled, diagnostics) = loop {
        if source.changed(Duration::from_millis(100)).await.unwrap() {
            source.snapshot(&mut state);
            let compiled = compiler.compile(&state);
            if !compiled.diagnostics.is_empty() {
                assert_eq!(*compiled.policies, [ObjectRef::new("x", "deny")]);
                let diagnostics = compiled.diagnostics.clone();
                break (compiled, diagnostics);
            }
        }
        assert!(tokio::time::Instant::now() < deadline, "no diagnostics");
    };
    let text: Vec<String> = diagnostics.iter().map(ToString::to_string).collect();
    assert!(
        text.iter()
            .any(|t| t.starts_with("NetworkPolicy x/deny: spec.ingress[1].ports[0].endPort")),
        "{text:?}"
    );
    // The stored object is in force, as far as it can be read: not the last valid
    // version, and the rule that cannot be read allows nothing.
    let kept = compiler
        .policy(&ObjectRef::new("x", "deny"))
        .expect("in force");
    assert_eq!(kept, state.policies[&ObjectRef::new("x", "deny")].object());
    let passes = |src: &str, port| {
        netpol_compile::model::lookup(
            &compiled,
            src.parse().unwrap(),
            "10.0.0.1".parse().unwrap(),
            6,
            port,
            netpol_compile::Direction::Ingress,
        )
        .is_some()
    };
    assert!(passes("10.7.0.1", 80), "010.0.0.0/8 is 10.0.0.0/8");
    assert!(!passes("8.7.0.1", 80), "not the octal 8.0.0.0/8");
    assert!(
        !passes("10.7.0.1", 85),
        "the rule that cannot be read allows nothing"
    );
    // ... and an Event on the policy names the field.
    source.report(&diagnostics);
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let events = server.events();
        if let Some(event) = events.first() {
            assert_eq!(event["regarding"]["name"], "deny");
            assert_eq!(event["regarding"]["kind"], "NetworkPolicy");
            assert_eq!(event["reason"], "InvalidNetworkPolicy");
            assert!(
                event["note"]
                    .as_str()
                    .unwrap()
                    .contains("spec.ingress[1].ports[0].endPort"),
                "{event}"
            );
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "no Event");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "current_thread")]
async fn gone_relists_and_logs_one_line() {
    let logs = Logs::default();
    let _guard = logs.install();
    let server = cluster().await;
    let mut source = source(&server);
    let mut state = ClusterState::default();
    wait_for(&mut source, &mut state, "sync", |s| s.pods.len() == 3).await;
    wait_watches(&server, 4).await;

    // History lost and every watch told 410 Gone, with a change the watchers can only
    // learn from a fresh list.
    server.apply(pod(
        "x",
        "b",
        NODE,
        "10.0.0.2",
        json!({"app": "b", "v": "2"}),
    ));
    server.expire();
    server.delete("Pod", Some("x"), "a");
    wait_for(&mut source, &mut state, "the re-list", |s| {
        !s.pods.contains_key(&ObjectRef::new("x", "a"))
            && label(s, "x", "b", "v").as_deref() == Some("2")
    })
    .await;
    idle(&mut source, &mut state, Duration::from_millis(300)).await;
    assert_eq!(state.pods.len(), 2);
    assert_eq!(state.policies.len(), 1, "the rest unchanged");
    let warnings = logs.warnings();
    assert_eq!(warnings.len(), 1, "{warnings:#?}");
    assert!(warnings[0].contains("410 Gone"), "{}", warnings[0]);
    assert!(warnings[0].contains("re-listing"), "{}", warnings[0]);
}

#[tokio::test(flavor = "current_thread")]
async fn a_watch_refused_with_http_410_relists() {
    let logs = Logs::default();
    let _guard = logs.install();
    let server = cluster().await;
    let mut source = source(&server);
    let mut state = ClusterState::default();
    wait_for(&mut source, &mut state, "sync", |s| s.pods.len() == 3).await;
    wait_watches(&server, 4).await;
    // The next watch requests of pods get HTTP 410; only a new list gets past it.
    server.fail("pods", "watch", Some(410));
    server.kill_watches();
    server.apply(pod("x", "e", NODE, "10.0.0.5", json!({})));
    tokio::time::sleep(Duration::from_millis(200)).await;
    server.fail("pods", "watch", None);
    wait_for(&mut source, &mut state, "the new pod", |s| {
        s.pods.len() == 4
    })
    .await;
    let warnings = logs.warnings();
    assert!(
        (1..=2).contains(&warnings.len()),
        "one line for the broken streams, at most one for the 410: {warnings:#?}"
    );
}

#[tokio::test(flavor = "current_thread")]
async fn killed_watch_streams_resume_and_log_one_line() {
    let logs = Logs::default();
    let _guard = logs.install();
    let server = cluster().await;
    let mut source = source(&server);
    let mut state = ClusterState::default();
    wait_for(&mut source, &mut state, "sync", |s| s.pods.len() == 3).await;
    wait_watches(&server, 4).await;

    server.kill_watches();
    server.apply(pod("x", "e", NODE, "10.0.0.5", json!({})));
    wait_for(&mut source, &mut state, "the new pod", |s| {
        s.pods.len() == 4
    })
    .await;
    idle(&mut source, &mut state, Duration::from_millis(300)).await;
    let warnings = logs.warnings();
    assert_eq!(warnings.len(), 1, "{warnings:#?}");
    assert!(
        warnings[0].contains("watch streams broke"),
        "{}",
        warnings[0]
    );
    assert!(
        !server.requests().iter().skip(8).any(|r| r.verb == "list"),
        "resumed from the last version, no re-list: {:?}",
        server.requests()
    );
}

#[tokio::test(flavor = "current_thread")]
async fn a_restarted_server_leaves_the_state_correct_and_logs_one_line() {
    let logs = Logs::default();
    let _guard = logs.install();
    let mut server = cluster().await;
    let mut source = source(&server);
    let mut state = ClusterState::default();
    wait_for(&mut source, &mut state, "sync", |s| s.pods.len() == 3).await;
    wait_watches(&server, 4).await;

    server.stop();
    // Changes while the server is away (written to etcd through another apiserver).
    server.delete("Pod", Some("x"), "b");
    server.apply(policy("y", "allow", json!({"podSelector": {}})));
    idle(&mut source, &mut state, Duration::from_millis(800)).await;
    assert_eq!(
        state.pods.len(),
        3,
        "the last view stays while the server is away"
    );
    server.restart().await.expect("the double restarts");
    wait_for(&mut source, &mut state, "the changes made meanwhile", |s| {
        s.pods.len() == 2 && s.policies.len() == 2
    })
    .await;
    idle(&mut source, &mut state, Duration::from_millis(300)).await;
    let warnings = logs.warnings();
    assert_eq!(warnings.len(), 1, "{warnings:#?}");
    assert!(source.failures() >= 4, "every watcher noticed");
    let _ = std::io::stderr().flush();
}

#[tokio::test(flavor = "current_thread")]
async fn services_reach_the_state_and_a_cluster_without_servicecidrs_still_syncs() {
    let server = cluster().await;
    // An API server older than 1.33: ServiceCIDRs are not served at all.
    server.fail("servicecidrs", "list", Some(404));
    server.apply(json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": "db", "namespace": "x", "managedFields": [{"manager": "kubectl"}]},
        "spec": {"clusterIP": "10.96.0.10", "clusterIPs": ["10.96.0.10"], "selector": {"app": "b"},
                 "sessionAffinity": "None", "ports": [{"name": "sql", "port": 5432, "targetPort": 5432}]},
    }));
    server.apply(json!({
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": "db-1", "namespace": "x", "labels": {"kubernetes.io/service-name": "db"}},
        "addressType": "IPv4",
        "ports": [{"name": "sql", "port": 5432, "protocol": "TCP"}],
        "endpoints": [{"addresses": ["10.0.0.2"], "targetRef": {"kind": "Pod", "namespace": "x", "name": "b"}}],
    }));
    let mut source = source(&server);
    let mut state = ClusterState::default();
    wait_for(&mut source, &mut state, "the Service", |s| {
        s.services.contains_key(&ObjectRef::new("x", "db"))
            && s.endpoint_slices.contains_key(&ObjectRef::new("x", "db-1"))
    })
    .await;
    assert!(source.is_synced(), "synced without ServiceCIDRs");
    // Trimmed to what the compiler reads.
    let service = &state.services[&ObjectRef::new("x", "db")];
    assert!(service.metadata.managed_fields.is_none());
    assert_eq!(
        service.spec.as_ref().unwrap().session_affinity,
        None,
        "fields nobody reads are dropped"
    );
    // The API becomes available: its ranges arrive (the watcher retries with backoff).
    server.fail("servicecidrs", "list", None);
    server.apply(json!({
        "apiVersion": "networking.k8s.io/v1", "kind": "ServiceCIDR",
        "metadata": {"name": "kubernetes"}, "spec": {"cidrs": ["10.96.0.0/16"]},
    }));
    wait_for(&mut source, &mut state, "the ServiceCIDR", |s| {
        s.service_cidrs.contains_key("kubernetes")
    })
    .await;
    let compiled = netpol_compile::compile(&state, &Default::default());
    assert!(
        compiled.diagnostics.is_empty(),
        "{:?}",
        compiled.diagnostics
    );
}

#[tokio::test(flavor = "current_thread")]
async fn cluster_network_policies_arrive_and_a_cluster_without_the_crd_still_syncs() {
    let server = cluster().await;
    // The CRD is not installed: the API server does not serve the resource.
    server.fail("clusternetworkpolicies", "list", Some(404));
    let mut source = source(&server);
    let mut state = ClusterState::default();
    wait_for(&mut source, &mut state, "the first sync", |s| {
        s.pods.len() == 3
    })
    .await;
    assert!(source.is_synced(), "synced without ClusterNetworkPolicies");
    assert!(state.cluster_policies.is_empty());
    // Every node's labels and addresses, for `nodes` peers; this node's addresses too.
    assert_eq!(
        state.nodes["node-2"].ips,
        ["192.168.0.2".parse::<std::net::IpAddr>().unwrap()]
    );
    assert_eq!(state.nodes.len(), 2);
    // Installed, with a policy: it arrives (the watcher retries with backoff), trimmed.
    server.fail("clusternetworkpolicies", "list", None);
    server.apply(json!({
        "apiVersion": "policy.networking.k8s.io/v1alpha2", "kind": "ClusterNetworkPolicy",
        "metadata": {"name": "deny-y", "managedFields": [{"manager": "kubectl"}]},
        "spec": {"tier": "Admin", "priority": 10,
                 "subject": {"namespaces": {"matchLabels": {"team": "a"}}},
                 "ingress": [{"name": "no-y", "action": "Deny",
                              "from": [{"namespaces": {"matchLabels": {"kubernetes.io/metadata.name": "y"}}}]}]},
        "status": {"conditions": []},
    }));
    wait_for(&mut source, &mut state, "the ClusterNetworkPolicy", |s| {
        s.cluster_policies.contains_key("deny-y")
    })
    .await;
    let object = &state.cluster_policies["deny-y"];
    assert!(
        object.pointer("/metadata/managedFields").is_none(),
        "{object}"
    );
    assert!(object.get("status").is_none(), "{object}");
    let compiled = netpol_compile::compile(&state, &Default::default());
    assert!(
        compiled.diagnostics.is_empty(),
        "{:?}",
        compiled.diagnostics
    );
    // It is in force: y/c (10.0.1.1) is denied into x/a by the Admin tier.
    let decision = netpol_compile::model::decide(
        &compiled,
        "10.0.1.1".parse().unwrap(),
        "10.0.0.1".parse().unwrap(),
        netpol_common::PROTO_TCP,
        80,
        netpol_compile::Direction::Ingress,
    );
    assert_eq!(decision.reason, netpol_common::Reason::ClusterDenied);

    // An object the API server stored but that cannot be read in full (a priority out
    // of range, as an older CRD would let through) is enforced as far as it can be
    // read and named in an Event on it.
    server.apply(json!({
        "apiVersion": "policy.networking.k8s.io/v1alpha2", "kind": "ClusterNetworkPolicy",
        "metadata": {"name": "odd"},
        "spec": {"tier": "Baseline", "priority": 5000, "subject": {"namespaces": {}}},
    }));
    wait_for(
        &mut source,
        &mut state,
        "the odd ClusterNetworkPolicy",
        |s| s.cluster_policies.contains_key("odd"),
    )
    .await;
    let compiled = netpol_compile::compile(&state, &Default::default());
    assert_eq!(compiled.diagnostics.len(), 1, "{:?}", compiled.diagnostics);
    source.report(&compiled.diagnostics);
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let events = server.events();
        if let Some(event) = events.first() {
            assert_eq!(event["regarding"]["name"], "odd");
            assert_eq!(event["regarding"]["kind"], "ClusterNetworkPolicy");
            assert_eq!(event["reason"], "InvalidClusterNetworkPolicy");
            assert!(
                event["note"].as_str().unwrap().contains("spec.priority"),
                "{event}"
            );
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "no Event");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The objects of `state` the source fills, for comparing two states.
fn objects(state: &ClusterState) -> String {
    format!(
        "{:#?}",
        (
            &state.namespaces,
            &state.pods,
            &state.policies,
            &state.services,
            &state.endpoint_slices,
            &state.service_cidrs,
            &state.cluster_policies,
            &state.nodes,
        )
    )
}

/// A snapshot copies only the objects that changed since the last one: after random
/// creates, updates and deletes of every kind the source watches (with broken streams
/// and an expired history among them, so that re-lists replace whole stores), the state
/// kept by those snapshots equals the state read whole from the same stores, and the
/// pods, policies and namespaces they say they changed include every one that did.
#[tokio::test(flavor = "current_thread")]
async fn snapshots_of_what_changed_add_up_to_the_whole_cluster() {
    let server = cluster().await;
    let mut source = source(&server);
    let mut state = ClusterState::default();
    wait_for(&mut source, &mut state, "sync", |s| s.pods.len() == 3).await;

    // xorshift64: reproducible without a dependency.
    let mut seed = 0x9e37_79b9_7f4a_7c15_u64;
    let mut next = move |n: u64| {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed % n
    };
    // Rounds whose snapshots named the objects of a kind they changed (the others
    // re-listed it), per kind: pods, policies, namespaces, ClusterNetworkPolicies.
    let mut rounds_said = [0; 4];
    for round in 0..6 {
        // What the snapshots of this round say they changed.
        let before = state.clone();
        let mut said = Changes::NONE;
        let mut note = |changed: Changes| said.extend(changed);
        for step in 0..40 {
            let ns = ["x", "y", "z"][next(3) as usize];
            let name = format!("p{}", next(8));
            match next(10) {
                0..=2 => {
                    let ip = format!("10.1.{}.{}", next(4), next(250) + 1);
                    let node = [NODE, "node-2"][next(2) as usize];
                    let app = format!("a{}", next(3));
                    server.apply(pod(ns, &name, node, &ip, json!({"app": app})));
                }
                3 => {
                    server.delete("Pod", Some(ns), &name);
                }
                4 => {
                    server.apply(namespace(ns, json!({"team": format!("t{}", next(3))})));
                }
                5 => {
                    let port = 80 + next(3);
                    server.apply(policy(
                        ns,
                        &format!("np{}", next(3)),
                        json!({"podSelector": {}, "ingress": [{"ports": [{"port": port}]}]}),
                    ));
                }
                6 => {
                    server.delete("NetworkPolicy", Some(ns), &format!("np{}", next(3)));
                }
                7 => {
                    let mut object = node(["node-2", "node-3"][next(2) as usize], "192.168.0.9");
                    object["metadata"]["labels"] = json!({"zone": format!("z{}", next(2))});
                    server.apply(object);
                }
                8 => {
                    let name = format!("cnp{}", next(3));
                    if next(4) == 0 {
                        server.delete("ClusterNetworkPolicy", None, &name);
                    } else {
                        server.apply(json!({
                            "apiVersion": "policy.networking.k8s.io/v1alpha2",
                            "kind": "ClusterNetworkPolicy",
                            "metadata": {"name": name},
                            "spec": {"tier": "Admin", "priority": next(50),
                                     "subject": {"namespaces": {}},
                                     "ingress": [{"action": "Deny", "from": [{"namespaces": {}}]}]},
                        }));
                    }
                }
                _ => {
                    server.apply(json!({
                        "apiVersion": "v1", "kind": "Service",
                        "metadata": {"name": format!("s{}", next(3)), "namespace": ns},
                        "spec": {"clusterIP": format!("10.96.0.{}", next(200) + 1),
                                 "ports": [{"port": 80 + next(2), "protocol": "TCP"}]},
                    }));
                }
            }
            // Some snapshots in the middle of the burst, as the agent's loop takes them.
            if step % 7 == 0 && source.changed(Duration::from_millis(5)).await.unwrap() {
                note(source.snapshot(&mut state).changes);
            }
        }
        match round {
            2 => server.kill_watches(),
            4 => server.expire(),
            _ => {}
        }
        let version = server.resource_version();
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            if source.changed(Duration::from_millis(50)).await.unwrap() {
                let snapshot = source.snapshot(&mut state);
                note(snapshot.changes);
                if snapshot.generation >= Some(version) {
                    break;
                }
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "round {round}: the source did not reach version {version}"
            );
        }
        rounds_said[0] += all_said(round, &said.pods, &before.pods, &state.pods);
        rounds_said[1] += all_said(round, &said.policies, &before.policies, &state.policies);
        rounds_said[2] += all_said(
            round,
            &said.namespaces,
            &before.namespaces,
            &state.namespaces,
        );
        rounds_said[3] += all_said(
            round,
            &said.cluster_policies,
            &before.cluster_policies,
            &state.cluster_policies,
        );
        let mut whole = ClusterState::default();
        source.reread_all();
        source.snapshot(&mut whole);
        assert_eq!(objects(&state), objects(&whole), "round {round}");
    }
    assert!(state.pods.len() > 3, "the changes reached the state");
    assert!(
        rounds_said.iter().all(|&n| n >= 4),
        "only re-lists read every object: [pods, policies, namespaces, cluster policies] \
         named theirs in {rounds_said:?} of 6 rounds"
    );
}

/// Checks that `said` (`None`: every object) names every key whose object differs
/// between `before` and `after`; returns 1 when it named them, 0 when it said "every".
fn all_said<K: Ord + std::fmt::Display, V: PartialEq>(
    round: usize,
    said: &Option<std::collections::BTreeSet<K>>,
    before: &std::collections::BTreeMap<K, V>,
    after: &std::collections::BTreeMap<K, V>,
) -> usize {
    let Some(said) = said else { return 0 };
    for key in before.keys().chain(after.keys()) {
        if before.get(key) != after.get(key) {
            assert!(said.contains(key), "round {round}: {key} changed, unsaid");
        }
    }
    1
}
