//! Tier 3: "which policy dropped my packet?" end to end. A real agent, real traffic, and
//! the answers an operator reads: the flow log, /metrics, /healthz and /readyz.

mod support;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

use netpol_lab::{NetnsWorker, Probe};
use support::{
    B_ONLY_FROM_C, Cluster, HEALTH, KubeCluster, PROBE_TIMEOUT, agent_bin, http_get, policy_object,
    sample, standard_lab,
};

/// `netpol-agent flows --json --since 1h ARGS` following an agent, its lines on a
/// channel; killed on drop. `--since` replays what the agent saw before the client
/// connected, so no traffic is missed and nothing waits for the connection.
struct Flows {
    child: std::process::Child,
    lines: std::sync::mpsc::Receiver<String>,
}

impl Flows {
    fn follow(agent: &std::path::Path, socket: &std::path::Path, args: &[&str]) -> Self {
        let mut child = Command::new(agent)
            .args(["flows", "--json", "--since", "1h"])
            .args(args)
            .arg("--socket")
            .arg(socket)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("netpol-agent flows");
        let stdout = child.stdout.take().expect("piped");
        let (tx, lines) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    return;
                }
            }
        });
        Flows { child, lines }
    }
}

impl Drop for Flows {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn a_dropped_probe_is_named_in_the_flow_log_and_counted_in_metrics() {
    let Some(agent_path) =
        agent_bin("a_dropped_probe_is_named_in_the_flow_log_and_counted_in_metrics")
    else {
        return;
    };
    let cluster = Cluster::start_with(
        standard_lab(&["x/a", "x/b", "x/c"]),
        &agent_path,
        B_ONLY_FROM_C,
        &["--health-addr", HEALTH],
    );
    let (lab, agent) = (&cluster.lab, &cluster.agent);
    let node = NetnsWorker::spawn(lab.node_netns()).expect("node worker");

    let (status, _) = http_get(&node, "/readyz");
    assert_eq!(
        status, "HTTP/1.1 200 OK",
        "ready once the state is in the kernel"
    );
    let (status, _) = http_get(&node, "/healthz");
    assert_eq!(status, "HTTP/1.1 200 OK");

    // Follow the flow log while x/a is dropped by x/b's policy and x/c is let in.
    let flows = Flows::follow(&agent_path, &agent.flow_socket(), &["--pod", "x/b"]);
    let results = lab
        .probe_all(
            &[Probe::tcp("x/a", "x/b", 80), Probe::tcp("x/c", "x/b", 80)],
            PROBE_TIMEOUT,
        )
        .expect("probes");
    assert!(
        results[0].outcome.is_blocked(),
        "x/a -> x/b: {}",
        results[0].outcome
    );
    assert!(
        results[1].outcome.is_allowed(),
        "x/c -> x/b: {}",
        results[1].outcome
    );

    let mut drop_record = None;
    let mut allow_record = None;
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while (drop_record.is_none() || allow_record.is_none()) && std::time::Instant::now() < deadline
    {
        let Ok(line) = flows.lines.recv_timeout(Duration::from_millis(200)) else {
            continue;
        };
        let record: serde_json::Value = serde_json::from_str(&line).expect("a JSON flow record");
        let from = record["src"]["name"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        if record["verdict"] == "dropped" && from == "x/a" {
            drop_record = Some(record);
        } else if record["verdict"] == "allowed"
            && from == "x/c"
            && record["direction"] == "ingress"
        {
            allow_record = Some(record);
        }
    }
    drop(flows);
    let dropped = drop_record.expect("the drop of x/a -> x/b reached the flow log");
    assert_eq!(dropped["dst"]["name"], "x/b");
    assert_eq!(dropped["dport"], 80);
    assert_eq!(dropped["reason"], "policy-denied");
    assert_eq!(
        dropped["isolated_by"],
        serde_json::json!(["NetworkPolicy x/b-only-from-c"])
    );
    let allowed = allow_record.expect("the new connection x/c -> x/b reached the flow log");
    assert_eq!(
        allowed["rule"],
        "NetworkPolicy x/b-only-from-c spec.ingress[0]"
    );

    // The counters move with traffic (the agent copies them every second).
    let series =
        r#"netpol_packets_total{direction="ingress",reason="policy-denied",verdict="dropped"}"#;
    let read = |node: &NetnsWorker| {
        let (status, body) = http_get(node, "/metrics");
        assert_eq!(status, "HTTP/1.1 200 OK");
        sample(&body, series).unwrap_or(0.0)
    };
    let wait_for = |node: &NetnsWorker, at_least: f64| {
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        loop {
            let value = read(node);
            if value >= at_least || std::time::Instant::now() > deadline {
                return value;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    };
    let before = wait_for(&node, 1.0);
    assert!(before >= 1.0, "the dropped SYN is counted: {before}");
    let again = lab
        .probe(&Probe::tcp("x/a", "x/b", 81), PROBE_TIMEOUT)
        .expect("probe");
    assert!(again.outcome.is_blocked());
    let after = wait_for(&node, before + 1.0);
    assert!(
        after >= before + 1.0,
        "a new drop moves the counter: {before} -> {after}"
    );

    let (_, body) = http_get(&node, "/metrics");
    let rule = r#"netpol_rule_packets_total{tier="NetworkPolicy",policy="x/b-only-from-c",rule="spec.ingress[0]"}"#;
    assert!(
        sample(&body, rule).unwrap_or(0.0) >= 1.0,
        "per-rule counter in\n{body}"
    );
    assert!(sample(&body, r#"netpol_map_entries{map="ENDPOINTS"}"#).unwrap_or(0.0) >= 3.0);
    assert!(body.contains("netpol_change_propagation_seconds_count"));
    assert!(body.ends_with("# EOF\n"));
    let scrape = prometheus_parse_lines(&body);
    assert!(scrape > 10, "{scrape} samples");
    drop(cluster);
}

/// x/b would accept ingress only from x/c (staged); x/c accepts none, and would accept
/// x/a's (staged).
const STAGED: &str = r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: b-only-from-c, namespace: x, annotations: {netpol.dev/staged: "true"}}
spec:
  podSelector: {matchLabels: {pod: b}}
  ingress:
    - from: [{podSelector: {matchLabels: {pod: c}}}]
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: c-closed, namespace: x}
spec:
  podSelector: {matchLabels: {pod: c}}
  policyTypes: [Ingress]
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: c-from-a, namespace: x, annotations: {netpol.dev/staged: "true"}}
spec:
  podSelector: {matchLabels: {pod: c}}
  ingress:
    - from: [{podSelector: {matchLabels: {pod: a}}}]
"#;

#[test]
fn a_staged_policy_changes_no_verdict_and_its_would_be_verdicts_are_reported_until_enforced() {
    let Some(agent_path) = agent_bin(
        "a_staged_policy_changes_no_verdict_and_its_would_be_verdicts_are_reported_until_enforced",
    ) else {
        return;
    };
    let mut cluster = Cluster::start_with(
        standard_lab(&["x/a", "x/b", "x/c"]),
        &agent_path,
        STAGED,
        &["--health-addr", HEALTH],
    );
    let node = NetnsWorker::spawn(cluster.lab.node_netns()).expect("node worker");
    let flows = Flows::follow(
        &agent_path,
        &cluster.agent.flow_socket(),
        &["--namespace", "x"],
    );

    // The kernel enforces what is in force alone: x/c closed, x/b open.
    let a_to_b = Probe::tcp("x/a", "x/b", 80);
    let a_to_c = Probe::tcp("x/a", "x/c", 80);
    cluster.check(&[
        (a_to_b.clone(), true),
        (Probe::tcp("x/c", "x/b", 80), true),
        (a_to_c.clone(), false),
        (Probe::tcp("x/b", "x/c", 80), false),
    ]);

    // What the staged policies would change is in the flow log, naming them.
    let mut staged_drop = None;
    let mut staged_allow = None;
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while (staged_drop.is_none() || staged_allow.is_none()) && std::time::Instant::now() < deadline
    {
        let Ok(line) = flows.lines.recv_timeout(Duration::from_millis(200)) else {
            continue;
        };
        let record: serde_json::Value = serde_json::from_str(&line).expect("a JSON flow record");
        let ends = (
            record["src"]["name"]
                .as_str()
                .unwrap_or_default()
                .to_owned(),
            record["dst"]["name"]
                .as_str()
                .unwrap_or_default()
                .to_owned(),
        );
        match (
            ends.0.as_str(),
            ends.1.as_str(),
            record["staged"]["verdict"].as_str(),
        ) {
            ("x/a", "x/b", Some("staged-drop")) => staged_drop = Some(record),
            ("x/a", "x/c", Some("staged-allow")) => staged_allow = Some(record),
            ("x/c", "x/b", Some(verdict)) => panic!("x/c -> x/b is {verdict} in {record}"),
            _ => {}
        }
    }
    drop(flows);
    let dropped = staged_drop.expect("x/a -> x/b reported as staged-drop");
    assert_eq!(dropped["verdict"], "allowed");
    assert_eq!(
        dropped["staged"]["policies"],
        serde_json::json!(["NetworkPolicy x/b-only-from-c"])
    );
    let allowed = staged_allow.expect("x/a -> x/c reported as staged-allow");
    assert_eq!(allowed["verdict"], "dropped");
    assert_eq!(
        allowed["staged"]["rule"],
        "NetworkPolicy x/c-from-a spec.ingress[0]"
    );
    let (_, body) = http_get(&node, "/metrics");
    for (policy, verdict) in [
        ("x/b-only-from-c", "staged-drop"),
        ("x/c-from-a", "staged-allow"),
    ] {
        let series =
            format!(r#"netpol_staged_connections_total{{policy="{policy}",verdict="{verdict}"}}"#);
        assert!(
            sample(&body, &series).unwrap_or(0.0) >= 1.0,
            "{series} in\n{body}"
        );
    }

    // Without the annotation they are enforced.
    cluster.apply(&STAGED.replace(
        r#"annotations: {netpol.dev/staged: "true"}"#,
        "annotations: {}",
    ));
    cluster.check(&[
        (a_to_b, false),
        (Probe::tcp("x/c", "x/b", 80), true),
        (a_to_c, true),
        (Probe::tcp("x/b", "x/c", 80), false),
    ]);
    drop(cluster);
}

#[test]
fn in_kubernetes_mode_an_update_of_nothing_the_agent_keeps_is_applied_without_a_compile() {
    let Some(agent) = agent_bin(
        "in_kubernetes_mode_an_update_of_nothing_the_agent_keeps_is_applied_without_a_compile",
    ) else {
        return;
    };
    let mut cluster = KubeCluster::start(
        standard_lab(&["x/a", "x/b", "x/c"]),
        &agent,
        &[policy_object(B_ONLY_FROM_C)],
        &["--health-addr", HEALTH],
    );
    let node = NetnsWorker::spawn(cluster.lab.node_netns()).expect("node worker");
    let counter = |series: &str| {
        let (_, body) = http_get(&node, "/metrics");
        sample(&body, series).unwrap_or(0.0)
    };
    let applies = counter("netpol_applies_total");

    // Pods keep no annotations: the version moves, the state does not. `publish` waits
    // until the status reports the new version.
    cluster
        .lab
        .set_pod_annotation("x/a", "example.com/owner", "team-a")
        .expect("x/a");
    cluster.publish(&[policy_object(B_ONLY_FROM_C)]);
    assert_eq!(
        counter("netpol_applies_total"),
        applies,
        "no compile, no apply"
    );
    assert!(counter("netpol_unchanged_updates_total") >= 1.0);

    // A label is kept: compiled and applied.
    cluster
        .lab
        .set_pod_labels("x/a", [("pod", "a"), ("team", "a")])
        .expect("x/a");
    cluster.publish(&[policy_object(B_ONLY_FROM_C)]);
    assert_eq!(counter("netpol_applies_total"), applies + 1.0);
    let probe = Probe::tcp("x/c", "x/b", 80);
    cluster.check(&[(probe, true)]);
}

/// Counts the sample lines of an exposition, failing on any line that is neither a
/// comment nor `series value`.
fn prometheus_parse_lines(text: &str) -> usize {
    text.lines()
        .filter(|line| !line.starts_with('#'))
        .map(|line| {
            let (_, value) = line
                .rsplit_once(' ')
                .unwrap_or_else(|| panic!("not a sample: {line}"));
            value
                .parse::<f64>()
                .unwrap_or_else(|_| panic!("bad value: {line}"));
        })
        .count()
}
