//! The `matrix` and `explain` commands, run as a user would (no root, no cluster).

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

const CLUSTER: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: client, labels: {role: client}}
---
apiVersion: v1
kind: Pod
metadata: {name: frontend, namespace: stars, labels: {role: frontend}}
spec: {containers: [{name: main, image: web, ports: [{name: http, containerPort: 80}]}]}
status: {phase: Running, podIP: 10.0.0.1}
---
apiVersion: v1
kind: Pod
metadata: {name: backend, namespace: stars, labels: {role: backend}}
spec: {containers: [{name: main, image: redis, ports: [{name: redis, containerPort: 6379}]}]}
status: {phase: Running, podIP: 10.0.0.2}
---
apiVersion: v1
kind: Pod
metadata: {name: client, namespace: client, labels: {role: client}}
spec: {containers: [{name: main, image: client, ports: [{containerPort: 9000}]}]}
status: {phase: Running, podIP: 10.0.1.1}
"#;

const BACKEND_POLICY: &str = r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: backend-policy, namespace: stars}
spec:
  podSelector: {matchLabels: {role: backend}}
  ingress:
    - from: [{podSelector: {matchLabels: {role: frontend}}}]
      ports: [{protocol: TCP, port: 6379}]
"#;

const BROKEN_POLICY: &str = r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: broken, namespace: stars}
spec:
  podSelector: {}
  ingress: [{ports: [{port: 90, endPort: 80}]}]
"#;

struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> TempDir {
        let dir = std::env::temp_dir().join(format!("netpol-cli-{tag}-{}", std::process::id()));
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

fn run(args: &[&str], manifests: &Path) -> Output {
    let output = Command::new(env!("CARGO_BIN_EXE_netpol-agent"))
        .args(args)
        .arg("--manifests")
        .arg(manifests)
        .env("NO_COLOR", "1")
        .output()
        .expect("run netpol-agent");
    assert!(
        output.status.success(),
        "{args:?}: {}\n{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    output
}

fn stdout(output: &Output) -> String {
    String::from_utf8(output.stdout.clone()).unwrap()
}

#[test]
fn matrix_shows_the_policy_and_reports_broken_objects_on_stderr() {
    let dir = TempDir::new("matrix");
    dir.write("cluster.yaml", CLUSTER);
    dir.write("backend.yaml", BACKEND_POLICY);
    dir.write("broken.yaml", BROKEN_POLICY);
    let output = run(&["matrix"], &dir.0);
    let text = stdout(&output);
    assert!(!text.contains('\x1b'), "no colours when piped");
    assert!(
        text.contains(
            "TCP/6379 (1 destination)\n\
             \x20 from \\ to       stars/backend\n\
             \x20 client/client         ✗\n\
             \x20 stars/backend         -\n\
             \x20 stars/frontend        ✓\n"
        ),
        "{text}"
    );
    assert!(text.contains("legend:"));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("NetworkPolicy stars/broken: spec.ingress[0].ports[0].endPort"),
        "{stderr}"
    );
}

#[test]
fn matrix_apply_marks_the_changes_and_counts_them() {
    let dir = TempDir::new("apply");
    let manifests = dir.0.join("manifests");
    std::fs::create_dir_all(&manifests).unwrap();
    std::fs::write(manifests.join("cluster.yaml"), CLUSTER).unwrap();
    let extra = dir.write("backend.yaml", BACKEND_POLICY);
    let output = run(
        &[
            "matrix",
            "--port",
            "6379/TCP",
            "--apply",
            extra.to_str().unwrap(),
        ],
        &manifests,
    );
    let text = stdout(&output);
    assert!(text.contains("✓→✗"), "{text}");
    assert!(text.contains("client/client -> stars/backend TCP/6379: ✓ → ✗ (newly blocked)"));
    assert!(
        text.contains("1 cell change: 1 newly blocked, 0 newly allowed"),
        "{text}"
    );
    assert!(!text.contains("TCP/80 "), "only the requested port: {text}");

    let output = run(
        &["matrix", "--json", "--apply", extra.to_str().unwrap()],
        &manifests,
    );
    let json: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(json["diff"]["newly_blocked"], 1);
    assert_eq!(json["diff"]["changes"][0]["src"], "client/client");
    assert_eq!(json["diff"]["changes"][0]["after"], "blocked");
    assert_eq!(json["matrix"]["pods"].as_array().unwrap().len(), 3);
}

#[test]
fn matrix_html_writes_one_page_with_the_cells_of_json_and_prints_no_text() {
    let dir = TempDir::new("html");
    let manifests = dir.0.join("manifests");
    std::fs::create_dir_all(&manifests).unwrap();
    std::fs::write(manifests.join("cluster.yaml"), CLUSTER).unwrap();
    let extra = dir.write("backend.yaml", BACKEND_POLICY);
    let page = dir.0.join("matrix.html");
    let output = run(
        &[
            "matrix",
            "--html",
            page.to_str().unwrap(),
            "--apply",
            extra.to_str().unwrap(),
        ],
        &manifests,
    );
    assert_eq!(stdout(&output), "", "the page, not the text");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains(&format!("wrote {}: 3 tables, 6 cells", page.display())),
        "{stderr}"
    );
    let html = std::fs::read_to_string(&page).unwrap();
    assert!(html.starts_with("<!DOCTYPE html>"));
    let json: serde_json::Value = serde_json::from_slice(
        &run(
            &["matrix", "--json", "--apply", extra.to_str().unwrap()],
            &manifests,
        )
        .stdout,
    )
    .unwrap();
    let cells = |state: &str| {
        json["matrix"]["tables"]
            .as_array()
            .unwrap()
            .iter()
            .flat_map(|t| t["cells"].as_array().unwrap())
            .flat_map(|row| row.as_array().unwrap())
            .filter(|c| *c == state)
            .count()
    };
    assert_eq!(
        html.matches("<td class=\"cell allowed").count(),
        cells("allowed")
    );
    assert_eq!(
        html.matches("<td class=\"cell blocked").count(),
        cells("blocked")
    );
    assert_eq!(
        html.matches("<td class=\"cell blocked changed newly-blocked")
            .count(),
        1
    );
    assert!(html.contains(
        "ingress of stars/backend: isolated by NetworkPolicy stars/backend-policy; no rule allows it"
    ));

    // With --json too, both are written.
    let both = run(
        &["matrix", "--json", "--html", page.to_str().unwrap()],
        &manifests,
    );
    let json: serde_json::Value = serde_json::from_slice(&both.stdout).unwrap();
    assert_eq!(json["diff"], serde_json::Value::Null);
    assert!(
        !std::fs::read_to_string(&page)
            .unwrap()
            .contains(" changed ")
    );
}

#[test]
fn explain_names_the_rule() {
    let dir = TempDir::new("explain");
    dir.write("cluster.yaml", CLUSTER);
    dir.write("backend.yaml", BACKEND_POLICY);
    let text = stdout(&run(
        &["explain", "client/client", "stars/backend", "6379/TCP"],
        &dir.0,
    ));
    assert!(
        text.starts_with(
            "client/client (10.0.1.1) -> stars/backend (10.0.0.2) TCP/6379: BLOCKED\n"
        )
    );
    assert!(text.contains(
        "NetworkPolicy stars/backend-policy spec.ingress[0]: peer does not match \
         (needs pods {role=frontend} in namespace stars)"
    ));

    let text = stdout(&run(
        &["explain", "10.0.0.1", "stars/backend", "6379", "--json"],
        &dir.0,
    ));
    let json: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(json["allowed"], true);
    assert_eq!(
        json["hooks"][1]["verdict"]["rule"],
        "NetworkPolicy stars/backend-policy spec.ingress[0]"
    );

    let text = stdout(&run(
        &[
            "explain",
            "node",
            "stars/backend",
            "80/TCP",
            "--node-ip",
            "10.0.9.9",
        ],
        &dir.0,
    ));
    assert!(
        text.contains("traffic from the pod's own node always passes"),
        "{text}"
    );
}

#[test]
fn explain_rejects_unknown_pods_with_a_clear_message() {
    let dir = TempDir::new("unknown");
    dir.write("cluster.yaml", CLUSTER);
    let output = Command::new(env!("CARGO_BIN_EXE_netpol-agent"))
        .args([
            "explain",
            "stars/nope",
            "stars/backend",
            "80/TCP",
            "--manifests",
        ])
        .arg(&dir.0)
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("\"stars/nope\": no such pod"), "{stderr}");
}

/// Two dual-stack pods; b admits TCP/80 from an IPv6 block holding a's IPv6 address.
const DUAL_STACK: &str = r#"
apiVersion: v1
kind: Pod
metadata: {name: a, namespace: x, labels: {pod: a}}
spec: {containers: [{name: main, ports: [{containerPort: 80}]}]}
status: {phase: Running, podIPs: [{ip: 10.0.0.1}, {ip: "fd00::1"}]}
---
apiVersion: v1
kind: Pod
metadata: {name: b, namespace: x, labels: {pod: b}}
spec: {containers: [{name: main, ports: [{containerPort: 80}]}]}
status: {phase: Running, podIPs: [{ip: 10.0.0.2}, {ip: "fd00::2"}]}
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: from-v6, namespace: x}
spec:
  podSelector: {matchLabels: {pod: b}}
  ingress: [{from: [{ipBlock: {cidr: "fd00::/64"}}], ports: [{port: 80}]}]
"#;

#[test]
fn matrix_family_previews_one_family_and_explain_takes_ipv6_addresses() {
    let dir = TempDir::new("family");
    dir.write("cluster.yaml", DUAL_STACK);
    let cell = |args: &[&str]| {
        let json: serde_json::Value = serde_json::from_slice(&run(args, &dir.0).stdout).unwrap();
        let m = &json["matrix"];
        let a = m["pods"]
            .as_array()
            .unwrap()
            .iter()
            .position(|p| p["pod"] == "x/a")
            .unwrap();
        // The only table is TCP/80; b is its second destination.
        (m["family"].clone(), m["tables"][0]["cells"][a][1].clone())
    };
    assert_eq!(
        cell(&["matrix", "--json"]),
        (serde_json::Value::Null, "partial".into())
    );
    assert_eq!(
        cell(&["matrix", "--json", "--family", "ipv4"]),
        ("IPv4".into(), "blocked".into())
    );
    assert_eq!(
        cell(&["matrix", "--json", "--family", "ipv6"]),
        ("IPv6".into(), "allowed".into())
    );
    let text = stdout(&run(&["matrix", "--family", "ipv6"], &dir.0));
    assert!(text.starts_with("over IPv6 only\n"), "{text}");

    // By name: one explanation per family; by address: that family only.
    let text = stdout(&run(&["explain", "x/a", "x/b", "80/TCP"], &dir.0));
    assert!(
        text.contains("x/a (10.0.0.1) -> x/b (10.0.0.2) TCP/80: BLOCKED"),
        "{text}"
    );
    assert!(
        text.contains("x/a (fd00::1) -> x/b (fd00::2) TCP/80: ALLOWED"),
        "{text}"
    );
    let text = stdout(&run(&["explain", "fd00::1", "fd00::2", "80/TCP"], &dir.0));
    assert!(
        text.starts_with("x/a (fd00::1) -> x/b (fd00::2) TCP/80: ALLOWED"),
        "{text}"
    );
    assert!(
        text.contains("NetworkPolicy x/from-v6 spec.ingress[0]"),
        "{text}"
    );
    assert!(!text.contains("10.0.0.1"), "{text}");
    let text = stdout(&run(&["explain", "x/a", "fd00::2", "80/TCP"], &dir.0));
    assert!(!text.contains("10.0.0.1"), "{text}");

    let output = Command::new(env!("CARGO_BIN_EXE_netpol-agent"))
        .args(["matrix", "--family", "ipv5", "--manifests"])
        .arg(&dir.0)
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("ipv4 or ipv6"), "{stderr}");
}

const ADMIN_DENY_CLIENTS: &str = r#"
apiVersion: policy.networking.k8s.io/v1alpha2
kind: ClusterNetworkPolicy
metadata: {name: no-clients}
spec:
  tier: Admin
  priority: 5
  subject: {namespaces: {matchLabels: {kubernetes.io/metadata.name: stars}}}
  ingress:
    - name: clients
      action: Deny
      from: [{namespaces: {matchLabels: {role: client}}}]
"#;

#[test]
fn matrix_apply_previews_a_cluster_network_policy_and_explain_names_its_tier() {
    let dir = TempDir::new("cnp");
    let manifests = dir.0.join("manifests");
    std::fs::create_dir_all(&manifests).unwrap();
    std::fs::write(manifests.join("cluster.yaml"), CLUSTER).unwrap();
    let extra = dir.write("admin.yaml", ADMIN_DENY_CLIENTS);
    let output = run(
        &[
            "matrix",
            "--port",
            "80/TCP",
            "--apply",
            extra.to_str().unwrap(),
        ],
        &manifests,
    );
    let text = stdout(&output);
    assert!(
        text.contains("client/client -> stars/frontend TCP/80: ✓ → ✗ (newly blocked)"),
        "{text}"
    );
    // Only frontend serves TCP/80.
    assert!(
        text.contains("1 cell change: 1 newly blocked, 0 newly allowed"),
        "{text}"
    );
    std::fs::copy(&extra, manifests.join("admin.yaml")).unwrap();
    let text = stdout(&run(
        &["explain", "client/client", "stars/frontend", "80/TCP"],
        &manifests,
    ));
    assert!(
        text.contains(
            "    Admin tier: Deny by ClusterNetworkPolicy/no-clients (Admin, priority 5) \
             ingress rule \"clients\"\n"
        ),
        "{text}"
    );
}
