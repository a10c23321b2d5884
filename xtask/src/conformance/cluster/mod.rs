//! The conformance cases against a real cluster (`cargo xtask kind-e2e`): the same case
//! files, expected verdicts, comparison and reports as the emulated runner, with real
//! pods created through kubectl and probes run with `kubectl exec`.
//!
//! For each case, one at a time (cases reuse namespace names such as `x` and `default`):
//!
//! 1. its namespaces are created with their labels (namespaces that already exist, such
//!    as `default` or `kube-system`, are borrowed: labels set, restored afterwards);
//! 2. its pods are created, dealt in turn to the schedulable nodes (`spec.nodeName`, so
//!    most probes cross nodes). Each pod runs agnhost (the upstream e2e test image):
//!    a `probe` container (`agnhost pause`, the probe source) and one `agnhost porter`
//!    container per protocol serving every declared port, with the declared
//!    containerPorts (named ports included);
//! 3. hosts (endpoints outside the cluster) are Docker containers on the kind network:
//!    each gets its declared address on its loopback, routes to every node's pod CIDR
//!    (with that address as source) and to the other hosts, and every node gets a /32
//!    route to it, so host traffic crosses a node the way external traffic does;
//! 4. once the pods are Ready, every step is applied with kubectl (policies, label
//!    changes), then a namespace annotation is bumped and the runner waits until the
//!    agent on every node reports that resourceVersion in its status file (read with
//!    `docker exec <node> cat /run/netpol/status.json`), plus a short settle;
//! 5. every probe runs as `agnhost connect IP:PORT --protocol=... --timeout=...`, through
//!    `kubectl exec` (pods) or `docker exec` (hosts), a bounded number at a time;
//! 6. a guard deletes what the case created (namespaces, pods and policies in borrowed
//!    namespaces, host containers and node routes) and restores borrowed labels, also
//!    when the case fails. Leftovers of an interrupted run are swept at the start.
//!
//! What FORMAT.md cannot say on a real cluster: nothing. It has no node endpoint, so no
//! probe runs from a node. SCTP needs the `sctp` module on the Docker host (the porter
//! serving SCTP exits otherwise, and its pod never becomes Ready).
//!
//! The rooms: [`command`] runs kubectl and docker with deadlines; [`objects`] builds the
//! Kubernetes objects (namespaces, agnhost pods) and label changes; [`hosts`] reads the
//! nodes and puts hosts into containers with their routes; [`probe`] builds the agnhost
//! probe command lines, reads their results and runs them a bounded number at a time;
//! [`guard`] undoes what a case changed and sweeps what an interrupted run left;
//! [`runner`] runs one case, step by step.

pub mod command;
pub mod guard;
pub mod hosts;
pub mod objects;
pub mod probe;
pub mod runner;

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result, bail};

use super::Summary;
use command::Kubectl;
use guard::sweep;
use hosts::parse_nodes;
use runner::ClusterRunner;

/// The upstream e2e test image (`agnhost porter` serves, `agnhost connect` probes);
/// the version the Kubernetes e2e suite pins.
pub const AGNHOST: &str = "registry.k8s.io/e2e-test-images/agnhost:2.52";
/// Marks every namespace, pod and container a case creates (an annotation, not a label:
/// labels are what policies select).
pub const ANNOTATION: &str = "netpol.dev/conformance";
/// Bumped after every step; its resourceVersion is what the agents must report.
const STEP_ANNOTATION: &str = "netpol.dev/conformance-step";
/// The container probes run in.
pub const PROBE_CONTAINER: &str = "probe";
/// The agent's status file on every node (deploy/netpol-agent.yaml).
const STATUS_FILE: &str = "/run/netpol/status.json";
/// What porter answers (UDP probes need a non-empty reply).
const REPLY: &str = "netpol";

/// How to run against the cluster.
#[derive(Clone, Debug)]
pub struct Options {
    /// kubectl context (`kind-<cluster>`); `None`: the current one.
    pub context: Option<String>,
    /// The Docker network of the nodes, where host containers go (`kind`).
    pub docker_network: String,
    /// `agnhost connect --timeout`, per probe.
    pub probe_timeout: Duration,
    /// Probes in flight at once (each is a kubectl or docker process).
    pub parallel: usize,
    /// How long pods may take to become Ready (first image pull included).
    pub ready_timeout: Duration,
    /// How long the agents may take to report a step.
    pub apply_timeout: Duration,
    /// Pause after every agent reported a step (watches of different kinds are separate
    /// streams; this covers an event of one arriving after a later one of another).
    pub settle: Duration,
    pub json: Option<PathBuf>,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            context: None,
            docker_network: "kind".into(),
            probe_timeout: Duration::from_secs(2),
            parallel: 8,
            ready_timeout: Duration::from_secs(180),
            apply_timeout: Duration::from_secs(60),
            settle: Duration::from_secs(1),
            json: None,
        }
    }
}

/// Runs every case on the cluster, one at a time; prints like the emulated runner.
pub fn run(files: &[PathBuf], options: &Options) -> Result<Summary> {
    let kubectl = Kubectl {
        context: options.context.clone(),
    };
    sweep(&kubectl).context("removing leftovers of an earlier run")?;
    let nodes = parse_nodes(&kubectl.run(&["get", "nodes", "-o", "json"])?)?;
    if !nodes.iter().any(|n| n.schedulable) {
        bail!("no schedulable node in the cluster");
    }
    super::run_cases(files, 1, options.json.as_deref(), |file| {
        super::run_case_with(file, super::Families::Ipv4, |case, result| {
            let mut runner = ClusterRunner::new(case, options, &kubectl, &nodes)?;
            let outcome = runner.run(case, result);
            let failed = outcome.is_err()
                || result
                    .steps
                    .iter()
                    .any(|s| s.expects.iter().any(|e| e.wrong() > 0));
            if failed {
                result.agent_log = runner.agent_logs();
            }
            outcome
        })
    })
}

/// The workspace root, for tests that load case files.
#[cfg(test)]
fn workspace() -> PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}
