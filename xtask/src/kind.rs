//! `cargo xtask kind-e2e`: the agent as a cluster operator installs it, on a kind
//! cluster, checked by the conformance cases (needs Docker, kind and kubectl; these
//! machines have no Docker engine, so this never runs in CI here: the manifests are
//! validated by netpol-agent/tests/kube_deploy.rs, the generated objects and probe
//! commands by the unit tests of conformance/cluster/).
//!
//! 1. fails fast, naming every missing tool, unless docker (with an engine), kind and
//!    kubectl answer;
//! 2. `kind create cluster` with deploy/kind-cluster.yaml (unless it exists), then
//!    kindnet's own NetworkPolicy enforcement (on by default since kind v0.24) turned off
//!    (`--network-policy=false`), so that the cases see what netpol alone allows;
//! 3. `docker build` deploy/Dockerfile, `kind load docker-image`;
//! 4. `kubectl apply -f deploy/netpol-agent.yaml`, the image set to the one built,
//!    `kubectl rollout status` (readiness = every initial list is in the kernel);
//! 5. the conformance cases (all, or the given paths) on the cluster
//!    ([`conformance::cluster`]), reported like `cargo xtask conformance`.
//!
//! Every command is bounded by a timeout. The cluster is deleted at the end unless
//! `--keep`.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::conformance::{self, cluster, cluster::command};
use crate::{cargo, ui};

#[derive(Clone, Debug, clap::Args)]
pub struct Options {
    /// Case files or directories [default: ../shared/conformance/cases and tests/conformance].
    pub paths: Vec<PathBuf>,
    /// Name of the kind cluster.
    #[arg(long, default_value = "netpol-e2e")]
    pub cluster: String,
    /// Image tag to build and load.
    #[arg(long, default_value = "netpol-agent:e2e")]
    pub image: String,
    /// Keep the cluster afterwards (a later run reuses it).
    #[arg(long)]
    pub keep: bool,
    /// Probes in flight at once (each a `kubectl exec`).
    #[arg(long, value_name = "N", default_value_t = 8)]
    pub parallel: usize,
    /// Timeout of each probe (`agnhost connect --timeout`), in milliseconds.
    #[arg(long, value_name = "MS", default_value_t = 2000)]
    pub probe_timeout_ms: u64,
    /// Write a machine-readable report here.
    #[arg(long, value_name = "FILE")]
    pub json: Option<PathBuf>,
}

fn strings(args: &[&str]) -> Vec<String> {
    args.iter().map(|s| s.to_string()).collect()
}

fn exec(program: &str, args: &[&str], timeout: Duration) -> Result<String> {
    command::exec(program, &strings(args), None, timeout)
}

/// What the preflight found for one tool: `Ok(version)` or why it cannot be used.
pub type ToolCheck = (&'static str, Result<String, String>);

/// The tools kind-e2e needs, asked for their versions (`docker version` also needs the
/// engine to answer).
pub fn check_tools() -> Vec<ToolCheck> {
    let ask = |program: &'static str, args: &[&str], missing: &str| -> ToolCheck {
        let out = command::output(program, &strings(args), None, Duration::from_secs(30));
        let result = match out {
            Err(_) => Err(missing.to_owned()),
            Ok(out) if out.success => Ok(out.stdout.trim().to_owned()),
            Ok(out) => Err(out
                .stderr
                .lines()
                .find(|l| !l.trim().is_empty())
                .unwrap_or("failed")
                .trim()
                .to_owned()),
        };
        (program, result)
    };
    vec![
        ask(
            "docker",
            &["version", "--format", "{{.Server.Version}}"],
            "not found on PATH (https://docs.docker.com/engine/install/)",
        ),
        ask(
            "kind",
            &["version"],
            "not found on PATH (https://kind.sigs.k8s.io/docs/user/quick-start/#installation)",
        ),
        ask(
            "kubectl",
            &["version", "--client"],
            "not found on PATH (https://kubernetes.io/docs/tasks/tools/)",
        ),
    ]
}

/// `None` when every tool works; otherwise the message to fail with.
pub fn preflight_message(checks: &[ToolCheck]) -> Option<String> {
    if checks.iter().all(|(_, r)| r.is_ok()) {
        return None;
    }
    let mut message =
        String::from("kind-e2e needs Docker with a running engine, kind and kubectl:");
    for (tool, result) in checks {
        let line = match result {
            Ok(version) => format!("ok ({})", version.lines().next().unwrap_or_default()),
            Err(why) if *tool == "docker" && !why.starts_with("not found") => {
                format!("no Docker engine answers: {why}")
            }
            Err(why) => why.clone(),
        };
        message.push_str(&format!("\n  {tool}: {line}"));
    }
    message.push_str("\nit cannot run here; see deploy/README.md (\"With kind\")");
    Some(message)
}

fn default_paths() -> Vec<PathBuf> {
    let root = cargo::workspace_root();
    let mut paths = vec![root.join("../shared/conformance/cases")];
    let own = root.join("tests/conformance");
    if own.is_dir() {
        paths.push(own);
    }
    paths
}

fn run_e2e(options: &Options, files: &[PathBuf]) -> Result<()> {
    let root = cargo::workspace_root();
    let deploy = |file: &str| root.join("deploy").join(file).display().to_string();
    let clusters = exec("kind", &["get", "clusters"], Duration::from_secs(30))?;
    if clusters.lines().any(|c| c.trim() == options.cluster) {
        ui::ok(&format!("kind cluster {} exists", options.cluster));
    } else {
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
    let context = format!("kind-{}", options.cluster);
    let kubectl = command::Kubectl {
        context: Some(context.clone()),
    };
    disable_kindnet_policies(&kubectl, &options.cluster)?;
    ui::step(&format!("building {}", options.image));
    let dockerfile = deploy("Dockerfile");
    let root_dir = root.display().to_string();
    exec(
        "docker",
        &["build", "-t", &options.image, "-f", &dockerfile, &root_dir],
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
    kubectl.run(&["apply", "-f", &deploy("netpol-agent.yaml")])?;
    kubectl.run(&[
        "-n",
        "kube-system",
        "set",
        "image",
        "daemonset/netpol-agent",
        &format!("agent={}", options.image),
    ])?;
    // A rebuilt image under the same tag: restart so every node runs it.
    kubectl.run(&[
        "-n",
        "kube-system",
        "rollout",
        "restart",
        "daemonset/netpol-agent",
    ])?;
    kubectl.run(&[
        "-n",
        "kube-system",
        "rollout",
        "status",
        "daemonset/netpol-agent",
        "--timeout=180s",
    ])?;
    ui::ok("netpol-agent ready on every node");

    let plural = if files.len() == 1 { "case" } else { "cases" };
    ui::step(&format!(
        "conformance: {} {plural} on kind cluster {}, one at a time, probes with kubectl exec ({} at once)",
        files.len(),
        options.cluster,
        options.parallel
    ));
    let run_options = cluster::Options {
        context: Some(context),
        probe_timeout: Duration::from_millis(options.probe_timeout_ms),
        parallel: options.parallel,
        json: options.json.clone(),
        ..cluster::Options::default()
    };
    let summary = cluster::run(files, &run_options)?;
    println!("conformance (kind): {:.0}s", summary.seconds);
    println!("{} passed, {} failed", summary.passed, summary.failed);
    if summary.failed > 0 {
        bail!("{} conformance case(s) failed on kind", summary.failed);
    }
    Ok(())
}

/// kindnet's DaemonSet and container: since kind v0.24 kindnet enforces NetworkPolicy
/// itself (kube-network-policies, on by default), which would hide any over-allowing by
/// netpol from the conformance cases.
const KINDNET: &str = "daemonset/kindnet";
const KINDNET_CONTAINER: &str = "kindnet-cni";
/// kindnetd's switch for its NetworkPolicy controller.
const KINDNET_NO_POLICY: &str = "--network-policy=false";
/// The nftables table kindnet's policy controller creates on each node (not removed when
/// the controller is switched off).
const KINDNET_POLICY_TABLE: &str = "kindnet-network-policies";

/// The JSON patch giving kindnet's first container `--network-policy=false`, from its
/// current `args` (`None`: it has none); `None` when it has the flag already.
fn kindnet_patch(args: Option<&[String]>) -> Option<String> {
    let path = "/spec/template/spec/containers/0/args";
    let patch = match args {
        Some(args) if args.iter().any(|a| a == KINDNET_NO_POLICY) => return None,
        Some(_) => {
            serde_json::json!([{"op": "add", "path": format!("{path}/-"), "value": KINDNET_NO_POLICY}])
        }
        None => serde_json::json!([{"op": "add", "path": path, "value": [KINDNET_NO_POLICY]}]),
    };
    Some(patch.to_string())
}

/// Makes the cluster's CNI enforce no NetworkPolicy, so that only netpol does: kindnet
/// restarted with `--network-policy=false` (and its leftover nftables table removed from
/// every node). A cluster without kindnet is left alone, with a note.
fn disable_kindnet_policies(kubectl: &command::Kubectl, cluster: &str) -> Result<()> {
    let container = kubectl.run(&[
        "-n",
        "kube-system",
        "get",
        KINDNET,
        "--ignore-not-found",
        "-o",
        "jsonpath={.spec.template.spec.containers[0].name}",
    ])?;
    if container.trim().is_empty() {
        ui::note("no kindnet DaemonSet: the CNI must enforce no NetworkPolicy itself");
        return Ok(());
    }
    if container.trim() != KINDNET_CONTAINER {
        bail!("kindnet's first container is {container:?}, not {KINDNET_CONTAINER}");
    }
    let args = kubectl.run(&[
        "-n",
        "kube-system",
        "get",
        KINDNET,
        "-o",
        "jsonpath={.spec.template.spec.containers[0].args}",
    ])?;
    let args: Option<Vec<String>> = match args.trim() {
        "" => None,
        json => Some(serde_json::from_str(json).with_context(|| format!("kindnet's args {json}"))?),
    };
    let Some(patch) = kindnet_patch(args.as_deref()) else {
        ui::ok("kindnet enforces no NetworkPolicy");
        return Ok(());
    };
    ui::step("turning kindnet's own NetworkPolicy enforcement off");
    kubectl.run(&[
        "-n",
        "kube-system",
        "patch",
        KINDNET,
        "--type=json",
        "-p",
        &patch,
    ])?;
    kubectl.run(&[
        "-n",
        "kube-system",
        "rollout",
        "status",
        KINDNET,
        "--timeout=180s",
    ])?;
    let nodes = exec(
        "kind",
        &["get", "nodes", "--name", cluster],
        Duration::from_secs(30),
    )?;
    for node in nodes.lines().map(str::trim).filter(|n| !n.is_empty()) {
        if let Err(error) = exec(
            "docker",
            &[
                "exec",
                node,
                "nft",
                "delete",
                "table",
                "inet",
                KINDNET_POLICY_TABLE,
            ],
            Duration::from_secs(30),
        ) {
            ui::note(&format!(
                "{node}: no {KINDNET_POLICY_TABLE} table removed: {error:#}"
            ));
        }
    }
    ui::ok("kindnet enforces no NetworkPolicy");
    Ok(())
}

/// Checks the tools, runs the cases on a kind cluster, then deletes the cluster unless
/// `--keep`.
pub fn run(options: &Options) -> Result<()> {
    if let Some(message) = preflight_message(&check_tools()) {
        bail!(message);
    }
    let paths = if options.paths.is_empty() {
        default_paths()
    } else {
        options.paths.clone()
    };
    let files = conformance::collect(&paths)?;
    let started = Instant::now();
    let result = run_e2e(options, &files);
    if options.keep {
        ui::note(&format!(
            "kept kind cluster {} (kind delete cluster --name {})",
            options.cluster, options.cluster
        ));
    } else {
        ui::step(&format!("deleting kind cluster {}", options.cluster));
        if let Err(e) = exec(
            "kind",
            &["delete", "cluster", "--name", &options.cluster],
            Duration::from_secs(300),
        ) {
            ui::note(&ui::red(&format!("{e:#}")));
        }
    }
    result.with_context(|| format!("kind-e2e after {:.0}s", started.elapsed().as_secs_f64()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kindnet_is_told_to_enforce_no_network_policy_once() {
        assert_eq!(
            kindnet_patch(None).unwrap(),
            r#"[{"op":"add","path":"/spec/template/spec/containers/0/args","value":["--network-policy=false"]}]"#
        );
        let args = vec!["--v=2".to_owned()];
        assert_eq!(
            kindnet_patch(Some(&args)).unwrap(),
            r#"[{"op":"add","path":"/spec/template/spec/containers/0/args/-","value":"--network-policy=false"}]"#
        );
        let done = vec!["--v=2".to_owned(), KINDNET_NO_POLICY.to_owned()];
        assert_eq!(kindnet_patch(Some(&done)), None);
    }

    #[test]
    fn preflight_names_every_missing_tool() {
        let checks: Vec<ToolCheck> = vec![
            (
                "docker",
                Err("Cannot connect to the Docker daemon at unix:///var/run/docker.sock. Is the docker daemon running?".into()),
            ),
            ("kind", Err("not found on PATH (https://kind.sigs.k8s.io/docs/user/quick-start/#installation)".into())),
            ("kubectl", Ok("Client Version: v1.32.4\nKustomize Version: v5.5.0".into())),
        ];
        let message = preflight_message(&checks).unwrap();
        assert_eq!(
            message,
            "kind-e2e needs Docker with a running engine, kind and kubectl:\n  \
             docker: no Docker engine answers: Cannot connect to the Docker daemon at unix:///var/run/docker.sock. Is the docker daemon running?\n  \
             kind: not found on PATH (https://kind.sigs.k8s.io/docs/user/quick-start/#installation)\n  \
             kubectl: ok (Client Version: v1.32.4)\n\
             it cannot run here; see deploy/README.md (\"With kind\")"
        );
        let ok: Vec<ToolCheck> = vec![
            ("docker", Ok("28.2.2".into())),
            ("kind", Ok("kind v0.27.0".into())),
        ];
        assert_eq!(preflight_message(&ok), None);
    }
}
