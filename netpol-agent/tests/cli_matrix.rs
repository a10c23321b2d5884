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
