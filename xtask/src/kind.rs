//! `cargo xtask kind-e2e`: the agent as a cluster operator installs it, on a kind
//! cluster (needs Docker, kind and kubectl; these machines have no Docker engine, so
//! this never runs in CI here: the manifests are validated by
//! netpol-agent/tests/kube_deploy.rs instead).
//!
//! 1. `kind create cluster` with deploy/kind-cluster.yaml (unless it exists);
//! 2. `docker build` deploy/Dockerfile, `kind load docker-image`;
//! 3. `kubectl apply -f deploy/netpol-agent.yaml`, the image set to the one built,
//!    `kubectl rollout status` (readiness = every initial list is in the kernel);
//! 4. enforcement with real pods: a client reaches a server; a default-deny ingress
//!    policy stops it; deleting the policy lets it through again.
//!
//! Every command is bounded by a timeout. The cluster is deleted at the end unless
//! `--keep`.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::{cargo, ui};

#[derive(Clone, Debug, clap::Args)]
pub struct Options {
    /// Name of the kind cluster.
    #[arg(long, default_value = "netpol-e2e")]
    pub cluster: String,
    /// Image tag to build and load.
    #[arg(long, default_value = "netpol-agent:e2e")]
    pub image: String,
    /// Keep the cluster afterwards.
    #[arg(long)]
    pub keep: bool,
}

const NS: &str = "netpol-e2e";
const AGNHOST: &str = "registry.k8s.io/e2e-test-images/agnhost:2.53";

/// Runs a command with a deadline; returns its stdout. Fails with its stderr.
fn exec(program: &str, args: &[&str], timeout: Duration) -> Result<String> {
    let mut child = Command::new(program)
        .args(args)
        .current_dir(cargo::workspace_root())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("running {program} (is it installed?)"))?;
    let deadline = Instant::now() + timeout;
    loop {
        if child.try_wait()?.is_some() {
            break;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            bail!("{program} {} timed out after {timeout:?}", args.join(" "));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let out = child.wait_with_output()?;
    if !out.status.success() {
        bail!(
            "{program} {} failed ({}): {}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn kubectl(args: &[&str]) -> Result<String> {
    exec("kubectl", args, Duration::from_secs(180))
}

/// Whether `client` can open a TCP connection to `ip:80` (agnhost connect, 3 s).
fn connects(ip: &str) -> bool {
    let target = format!("{ip}:80");
    kubectl(&[
        "-n",
        NS,
        "exec",
        "client",
        "--",
        "/agnhost",
        "connect",
        &target,
        "--timeout=3s",
    ])
    .is_ok()
}

/// Polls `connects` until it equals `want` (policies apply within a second or two).
fn expect_connect(ip: &str, want: bool, what: &str) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        if connects(ip) == want {
            ui::ok(what);
            return Ok(());
        }
        std::thread::sleep(Duration::from_secs(1));
    }
    bail!("{what}: not observed within 30 s")
}

fn run_e2e(options: &Options) -> Result<()> {
    for tool in ["docker", "kind", "kubectl"] {
        exec(tool, &["version"], Duration::from_secs(30)).with_context(|| {
            format!("kind-e2e needs {tool} (and a Docker engine); see deploy/README.md")
        })?;
    }
    let root = cargo::workspace_root();
    let deploy = |file: &str| root.join("deploy").join(file).display().to_string();
    let clusters = exec("kind", &["get", "clusters"], Duration::from_secs(30))?;
    if !clusters.lines().any(|c| c.trim() == options.cluster) {
        ui::step(&format!("creating kind cluster {}", options.cluster));
        exec(
            "kind",
            &[
                "create",
                "cluster",
                "--name",
                &options.cluster,
                "--config",
                &deploy("kind-cluster.yaml"),
                "--wait",
                "120s",
            ],
            Duration::from_secs(600),
        )?;
    }
    ui::step(&format!("building {}", options.image));
    exec(
        "docker",
        &[
            "build",
            "-t",
            &options.image,
            "-f",
            &deploy("Dockerfile"),
            ".",
        ],
        Duration::from_secs(3600),
    )?;
    exec(
        "kind",
        &[
            "load",
            "docker-image",
            &options.image,
            "--name",
            &options.cluster,
        ],
        Duration::from_secs(600),
    )?;
    ui::step("deploying deploy/netpol-agent.yaml");
    kubectl(&["apply", "-f", &deploy("netpol-agent.yaml")])?;
    kubectl(&[
        "-n",
        "kube-system",
        "set",
        "image",
        "daemonset/netpol-agent",
        &format!("agent={}", options.image),
    ])?;
    kubectl(&[
        "-n",
        "kube-system",
        "rollout",
        "status",
        "daemonset/netpol-agent",
        "--timeout=180s",
    ])?;
    ui::ok("netpol-agent ready on every node");

    ui::step("enforcement with real pods");
    let _ = kubectl(&["create", "namespace", NS]);
    for name in ["server", "client"] {
        let args = if name == "server" {
            "--command -- /agnhost netexec --http-port=80"
        } else {
            "--command -- /agnhost pause"
        };
        let mut command = vec![
            "-n",
            NS,
            "run",
            name,
            "--image",
            AGNHOST,
            "--labels",
            if name == "server" {
                "app=server"
            } else {
                "app=client"
            },
        ];
        command.extend(args.split(' '));
        let _ = kubectl(&command);
    }
    kubectl(&[
        "-n",
        NS,
        "wait",
        "--for=condition=Ready",
        "pod/server",
        "pod/client",
        "--timeout=120s",
    ])?;
    let ip = kubectl(&[
        "-n",
        NS,
        "get",
        "pod",
        "server",
        "-o",
        "jsonpath={.status.podIP}",
    ])?;
    let ip = ip.trim().to_owned();
    expect_connect(&ip, true, "client reaches server without policies")?;
    let policy = root.join("target").join("kind-e2e-deny.yaml");
    std::fs::write(
        &policy,
        format!(
            "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {{name: deny, namespace: {NS}}}\n\
             spec: {{podSelector: {{matchLabels: {{app: server}}}}, policyTypes: [Ingress]}}\n"
        ),
    )?;
    let policy = policy.display().to_string();
    kubectl(&["apply", "-f", &policy])?;
    expect_connect(&ip, false, "a default-deny ingress policy stops it")?;
    kubectl(&["delete", "-f", &policy])?;
    expect_connect(&ip, true, "deleting the policy lets it through again")?;
    Ok(())
}

/// Runs the end-to-end check, then deletes the cluster unless `--keep`.
pub fn run(options: &Options) -> Result<()> {
    let result = run_e2e(options);
    if !options.keep {
        let _ = exec(
            "kind",
            &["delete", "cluster", "--name", &options.cluster],
            Duration::from_secs(300),
        );
    }
    result
}
