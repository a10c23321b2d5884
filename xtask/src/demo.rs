//! `cargo xtask run`: the Calico "stars" demo on an emulated node.
//!
//! Four dual-stack pods in three namespaces, the agent in local mode, a reachability
//! matrix per address family before and after two policies, checked against what the
//! demo's own definition says ([`ACCESS`]), never against observed output.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use netpol_lab::{
    AgentProcess, Family, Lab, ManifestDir, NODE, PodSpec, Port, Probe, ProbeResult, Protocol,
    Stack,
};

use crate::matrix::{Column, Matrix};
use crate::{cargo, prereqs, ui};

/// Options of `cargo xtask run`.
#[derive(Clone, Debug, Default)]
pub struct RunOptions {
    /// Exit after the report instead of running until Ctrl-C.
    pub once: bool,
    /// Keep the work directory (manifests, agent log, status file) after exit.
    pub keep: bool,
    /// Use this agent binary instead of building one.
    pub agent: Option<PathBuf>,
}

/// A namespace of the demo and its labels.
struct DemoNamespace {
    name: &'static str,
    labels: &'static [(&'static str, &'static str)],
}

/// A pod of the demo: `role` label and the one TCP port it serves.
struct DemoPod {
    namespace: &'static str,
    name: &'static str,
    role: &'static str,
    port: u16,
}

const NAMESPACES: &[DemoNamespace] = &[
    DemoNamespace {
        name: "stars",
        labels: &[],
    },
    DemoNamespace {
        name: "client",
        labels: &[("role", "client")],
    },
    DemoNamespace {
        name: "management-ui",
        labels: &[("role", "management-ui")],
    },
];

const PODS: &[DemoPod] = &[
    DemoPod {
        namespace: "stars",
        name: "frontend",
        role: "frontend",
        port: 80,
    },
    DemoPod {
        namespace: "stars",
        name: "backend",
        role: "backend",
        port: 6379,
    },
    DemoPod {
        namespace: "client",
        name: "client",
        role: "client",
        port: 9000,
    },
    DemoPod {
        namespace: "management-ui",
        name: "management-ui",
        role: "management-ui",
        port: 9001,
    },
];

/// Who may reach a protected pod's port once the demo policies are in force.
enum Admit {
    /// Pods with this `role` in the destination's own namespace.
    PodsInOwnNamespaceWithRole(&'static str),
    /// Any pod in a namespace labelled with this `role`.
    NamespacesWithRole(&'static str),
}

impl Admit {
    fn describe(&self) -> String {
        match self {
            Admit::PodsInOwnNamespaceWithRole(role) => {
                format!("pods labelled role={role} in its own namespace")
            }
            Admit::NamespacesWithRole(role) => {
                format!("pods in namespaces labelled role={role}")
            }
        }
    }
}

/// The demo's intent, one line per policy: destination pod and who it admits on its
/// port. Pods not listed stay open. Traffic from the node always passes.
const ACCESS: &[(&str, Admit)] = &[
    (
        "stars/backend",
        Admit::PodsInOwnNamespaceWithRole("frontend"),
    ),
    ("stars/frontend", Admit::NamespacesWithRole("client")),
];

/// The same intent as Kubernetes objects.
const POLICIES: &str = r#"apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata:
  name: backend-policy
  namespace: stars
spec:
  podSelector:
    matchLabels:
      role: backend
  ingress:
    - from:
        - podSelector:
            matchLabels:
              role: frontend
      ports:
        - protocol: TCP
          port: 6379
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata:
  name: frontend-policy
  namespace: stars
spec:
  podSelector:
    matchLabels:
      role: frontend
  ingress:
    - from:
        - namespaceSelector:
            matchLabels:
              role: client
      ports:
        - protocol: TCP
          port: 80
"#;

const AGENT_READY: Duration = Duration::from_secs(60);
const PROBE_TIMEOUT: Duration = Duration::from_secs(1);

fn demo_pod(id: &str) -> Option<&'static DemoPod> {
    PODS.iter()
        .find(|p| id.split_once('/') == Some((p.namespace, p.name)))
}

fn namespace_role(name: &str) -> Option<&'static str> {
    NAMESPACES
        .iter()
        .find(|n| n.name == name)?
        .labels
        .iter()
        .find(|(k, _)| *k == "role")
        .map(|(_, v)| *v)
}

/// Whether `src` may reach `dst` (on the port `dst` serves), from the definition.
fn expected(src: &str, dst: &str, policies: bool) -> bool {
    if !policies || src == NODE {
        return true;
    }
    let Some((_, admit)) = ACCESS.iter().find(|(d, _)| *d == dst) else {
        return true;
    };
    let (Some(s), Some(d)) = (demo_pod(src), demo_pod(dst)) else {
        return false;
    };
    match admit {
        Admit::PodsInOwnNamespaceWithRole(role) => s.namespace == d.namespace && s.role == *role,
        Admit::NamespacesWithRole(role) => namespace_role(s.namespace) == Some(*role),
    }
}

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

/// Ctrl-C and SIGTERM set a flag instead of killing us, so that Drop cleans up.
fn install_signal_handlers() -> Result<()> {
    use nix::sys::signal::{SaFlags, SigAction, SigHandler, SigSet, Signal, sigaction};
    let action = SigAction::new(
        SigHandler::Handler(on_signal),
        SaFlags::SA_RESTART,
        SigSet::empty(),
    );
    for sig in [Signal::SIGINT, Signal::SIGTERM] {
        // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
        unsafe { sigaction(sig, &action) }.context("installing a signal handler")?;
    }
    Ok(())
}

fn interrupted() -> bool {
    INTERRUPTED.load(Ordering::SeqCst)
}

fn check_interrupted() -> Result<()> {
    if interrupted() {
        bail!("interrupted");
    }
    Ok(())
}

/// Runs the demo. Returns an error (non-zero exit) if a cell differs from the
/// expectation.
pub fn run(opts: &RunOptions) -> Result<()> {
    install_signal_handlers()?;
    prereqs::ensure()?;
    check_interrupted()?;
    let agent_bin = match &opts.agent {
        Some(path) => path.clone(),
        None => cargo::build_agent()?,
    };
    check_interrupted()?;

    ui::step("creating the emulated node");
    let mut lab = Lab::new()?;
    lab.keep_workdir(opts.keep);
    // Dual stack, as EKS, GKE and bare-metal clusters run: every pod, the node and the
    // Service have an address of each family, and the policies must hold on both.
    lab.set_stack(Stack::Dual)?;
    for ns in NAMESPACES {
        lab.set_namespace_labels(ns.name, ns.labels.iter().copied());
    }
    for p in PODS {
        let pod = lab.add_pod(
            PodSpec::new(p.namespace, p.name)
                .label("role", p.role)
                .port(Port::tcp(p.port)),
        )?;
        ui::note(&format!(
            "{:<28} {:<11} {:<15} serves TCP {:<5} {}",
            pod.id(),
            show(pod.ipv4),
            show(pod.ipv6),
            p.port,
            ui::dim(&format!("netns {}, veth {}", pod.netns, pod.host_if))
        ));
    }
    let service = lab.add_service(
        netpol_lab::ServiceSpec::new("stars", "frontend")
            .select("role", "frontend")
            .port(netpol_lab::ServicePort {
                name: Some("http".into()),
                protocol: Protocol::Tcp,
                port: SERVICE_PORT,
                target: netpol_lab::TargetPort::Number(80),
            }),
    )?;
    ui::note(&format!(
        "{:<28} {:<11} {:<15} Service port TCP {SERVICE_PORT} -> stars/frontend:80 {}",
        format!("svc/{}", service.id()),
        show(service.ipv4),
        show(service.ipv6),
        ui::dim("(kube-proxy's iptables rules on the node)")
    ));
    ui::note(&ui::dim(&format!("node netns {}", lab.node_netns())));
    check_interrupted()?;

    ui::step(&format!("starting {}", agent_bin.display()));
    let mut manifests = ManifestDir::create(lab.workdir().join("manifests"))?;
    let generation = manifests.write(&lab, "")?;
    let mut agent = AgentProcess::start(&lab, &agent_bin, &manifests)?;
    let status = agent.wait_generation_unless(generation, AGENT_READY, interrupted)?;
    ui::ok(&format!(
        "agent reports generation {} ({} endpoints, {} attached)",
        status.generation, status.endpoints, status.attached
    ));
    check_interrupted()?;

    let rows: Vec<String> = PODS
        .iter()
        .map(|p| format!("{}/{}", p.namespace, p.name))
        .chain([NODE.to_string()])
        .collect();
    let columns: Vec<Column> = PODS
        .iter()
        .map(|p| Column {
            dst: format!("{}/{}", p.namespace, p.name),
            port: p.port,
            protocol: Protocol::Tcp,
        })
        .collect();
    let probes = Matrix::probes(&rows, &columns);

    ui::step("reachability before policies");
    let before = observe(&lab, &probes, &rows, &columns, false)?;
    check_interrupted()?;

    ui::step("applying backend-policy and frontend-policy");
    ui::note(
        "backend-policy:  stars/backend accepts TCP 6379 only from role=frontend pods in stars",
    );
    ui::note(
        "frontend-policy: stars/frontend accepts TCP 80 only from namespaces labelled role=client",
    );
    let generation = manifests.write(&lab, POLICIES)?;
    let status = agent.wait_generation_unless(generation, AGENT_READY, interrupted)?;
    ui::ok(&format!(
        "agent reports generation {} ({} policies, {} invalid)",
        status.generation, status.policies, status.invalid
    ));

    ui::step("reachability after policies");
    let after = observe(&lab, &probes, &rows, &columns, true)?;

    ui::step("verdict");
    ui::note("expected after the policies (from the demo definition in xtask/src/demo.rs):");
    for (dst, admit) in ACCESS {
        let port = demo_pod(dst).map_or(0, |p| p.port);
        ui::note(&format!("  {dst}:{port} admits only {}", admit.describe()));
    }
    ui::note("  every other pod stays open; the node reaches every pod");
    let denied: Vec<String> = probes
        .iter()
        .filter(|p| !expected(&p.src, &p.dst, true))
        .map(|p| format!("{} -> {}:{}", p.src, p.dst, p.port))
        .collect();
    ui::note(&format!(
        "  so {} of {} cells of each family turn ✗: {}",
        denied.len(),
        probes.len(),
        denied.join(", ")
    ));
    let mut mismatches_through_service = 0;
    let mut mismatches = Vec::new();
    let mut checked = 0;
    for (family, matrix) in before.iter().chain(&after) {
        checked += matrix.checked();
        mismatches.extend(matrix.mismatches().into_iter().map(|m| (*family, m)));
    }
    if mismatches.is_empty() {
        ui::ok(&format!(
            "all {checked} cells match the expectation, over IPv4 and over IPv6"
        ));
    } else {
        for (family, m) in &mismatches {
            println!(
                "  {} {} -> {}:{} over {}: expected {}, observed {}",
                ui::red("✗"),
                m.src,
                m.column.dst,
                m.column.port,
                family_name(*family),
                if m.expected { "allowed" } else { "blocked" },
                m.outcome
            );
        }
    }
    ui::note(&ui::dim(
        "replies: every ✓ is a completed TCP handshake plus the server's greeting byte, so \
         traffic of allowed connections flows back in the reverse direction too",
    ));
    check_interrupted()?;

    ui::step("through a Service");
    ui::note(&format!(
        "frontend-policy names port 80; pods dial svc/stars/frontend on {SERVICE_PORT}, and \
         kube-proxy translates after netpol's first hook: the verdict is taken on the backend"
    ));
    let through = [
        ("client/client", true),
        ("management-ui/management-ui", false),
    ];
    for ((src, allowed), family) in through
        .into_iter()
        .flat_map(|t| [(t, Family::V4), (t, Family::V6)])
    {
        let probe = over(Probe::tcp(src, "svc/stars/frontend", SERVICE_PORT), family);
        let outcome = lab.probe(&probe, PROBE_TIMEOUT)?.outcome;
        let line = format!(
            "{src} -> svc/stars/frontend:{SERVICE_PORT} -> stars/frontend:80 over {}: \
             {outcome} (expected {})",
            family_name(family),
            if allowed { "allowed" } else { "blocked" }
        );
        if outcome.matches(allowed) {
            ui::ok(&line);
        } else {
            println!("  {} {line}", ui::red("✗"));
            mismatches_through_service += 1;
        }
    }
    check_interrupted()?;

    let why = explain_a_drop(&lab, &agent, &agent_bin, &manifests, &after);
    if let Err(e) = &why {
        println!("  {} {e:#}", ui::red("✗"));
    }

    if !opts.once {
        ui::step("running; press Ctrl-C to stop and clean up");
        ui::note(&format!("agent log:  {}", agent.log_path().display()));
        ui::note(&format!("manifests:  {}", manifests.path().display()));
        ui::note(&format!(
            "explore:    ip netns exec {} ip route",
            lab.node_netns()
        ));
        while !interrupted() {
            std::thread::sleep(Duration::from_millis(200));
            if let Some(exit) = agent.exited()? {
                println!("{}", agent.log_tail(20));
                bail!("the agent exited unexpectedly ({exit})");
            }
        }
        println!();
    }

    ui::step("cleaning up");
    drop(agent);
    let workdir = lab.workdir().to_path_buf();
    drop(lab);
    if opts.keep {
        ui::ok(&format!("namespaces removed; kept {}", workdir.display()));
    } else {
        ui::ok("namespaces, pins and files removed");
    }
    if !mismatches.is_empty() {
        bail!(
            "{} of {checked} cells differ from the expectation",
            mismatches.len()
        );
    }
    if mismatches_through_service > 0 {
        bail!(
            "{mismatches_through_service} connection(s) through the Service differ from the expectation"
        );
    }
    why.context("answering \"which policy dropped my packet?\"")
}

/// The Service port in front of stars/frontend's port 80.
const SERVICE_PORT: u16 = 8080;

/// The matrix of each address family, in order.
type Observed = Vec<(Family, Matrix)>;

/// Probes every cell over both families at once, and prints a table per family.
fn observe(
    lab: &Lab,
    probes: &[Probe],
    rows: &[String],
    columns: &[Column],
    policies: bool,
) -> Result<Observed> {
    let both: Vec<Probe> = [Family::V4, Family::V6]
        .into_iter()
        .flat_map(|family| probes.iter().map(move |p| over(p.clone(), family)))
        .collect();
    let results = lab.probe_all(&both, PROBE_TIMEOUT)?;
    let mut out = Vec::new();
    for family in [Family::V4, Family::V6] {
        let of: Vec<ProbeResult> = results
            .iter()
            .filter(|r| r.probe.family == family)
            .cloned()
            .collect();
        let matrix = Matrix::new(rows.to_vec(), columns.to_vec(), &of, |s, c| {
            Some(expected(s, &c.dst, policies))
        });
        ui::note(&ui::bold(&format!("over {}", family_name(family))));
        print!("{}", matrix.render());
        out.push((family, matrix));
    }
    Ok(out)
}

/// `probe` over `family`.
fn over(probe: Probe, family: Family) -> Probe {
    match family {
        Family::V4 => probe,
        Family::V6 => probe.v6(),
    }
}

fn family_name(family: Family) -> &'static str {
    match family {
        Family::V4 => "IPv4",
        Family::V6 => "IPv6",
    }
}

/// An optional address, or `-`.
fn show(ip: Option<impl std::fmt::Display>) -> String {
    ip.map_or_else(|| "-".to_owned(), |ip| ip.to_string())
}

/// The blocked pair the demo explains.
const WHY_SRC: &str = "client/client";
const WHY_DST: &str = "stars/backend";
const WHY_PORT: u16 = 6379;

/// Answers "which policy dropped my packet?" three ways for one blocked probe (over
/// IPv6): the live flow log, `explain` (both families), and the `matrix` preview of each
/// family, which must reproduce every observed pod-to-pod cell from the manifests alone.
fn explain_a_drop(
    lab: &Lab,
    agent: &AgentProcess,
    agent_bin: &std::path::Path,
    manifests: &ManifestDir,
    observed: &Observed,
) -> Result<()> {
    use std::io::{BufRead, BufReader};
    use std::process::{Command, Stdio};

    ui::step(&format!(
        "which policy dropped {WHY_SRC} -> {WHY_DST}:{WHY_PORT} over IPv6?"
    ));
    // 1. The flow log of the running agent, while the blocked probe is retried.
    let mut flows = Command::new(agent_bin)
        .args([
            "flows",
            "--verdict",
            "dropped",
            "--pod",
            WHY_DST,
            "--port",
            &WHY_PORT.to_string(),
        ])
        .arg("--socket")
        .arg(agent.flow_socket())
        .env("NO_COLOR", "1")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .context("starting netpol-agent flows")?;
    let stdout = flows.stdout.take().context("flows has no stdout")?;
    let (lines, received) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if lines.send(line).is_err() {
                return;
            }
        }
    });
    // The client connects once the socket is there; give it a moment, then probe.
    std::thread::sleep(Duration::from_millis(300));
    let probe = Probe::tcp(WHY_SRC, WHY_DST, WHY_PORT).v6();
    let result = lab.probe(&probe, PROBE_TIMEOUT)?;
    let flow_line = received.recv_timeout(Duration::from_secs(3));
    let _ = flows.kill();
    let _ = flows.wait();
    if !result.outcome.is_blocked() {
        bail!(
            "{probe} was expected to be blocked but was {}",
            result.outcome
        );
    }
    let flow_line = flow_line.context("no drop reached `netpol-agent flows` within 3 s")?;
    ui::note(&format!("{} {}", ui::bold("flows:  "), flow_line.trim()));
    if !flow_line.contains("NetworkPolicy stars/backend-policy") {
        bail!("the flow log does not name the isolating policy: {flow_line}");
    }

    // 2. explain, from the manifests with the same compiler.
    let explain = Command::new(agent_bin)
        .args(["explain", WHY_SRC, WHY_DST, &format!("{WHY_PORT}/TCP")])
        .arg("--manifests")
        .arg(manifests.path())
        .env("NO_COLOR", "1")
        .output()
        .context("running netpol-agent explain")?;
    let text = String::from_utf8_lossy(&explain.stdout);
    ui::note(&ui::bold("explain:"));
    for line in text.lines() {
        ui::note(format!("  {line}").trim_end());
    }
    if !explain.status.success()
        || !text.contains("BLOCKED")
        || !text.contains("stars/backend-policy")
    {
        bail!(
            "explain does not give the same answer (exit {})",
            explain.status
        );
    }

    // 3. matrix, from the manifests alone, against every observed pod-to-pod cell of
    // each family.
    for (family, matrix) in observed {
        let compared = compare_matrix(agent_bin, manifests, *family, matrix)?;
        ui::ok(&format!(
            "`netpol-agent matrix --family {}` reproduces all {compared} observed pod-to-pod \
             cells from the manifests alone",
            family_name(*family).to_ascii_lowercase()
        ));
    }
    Ok(())
}

/// Runs `matrix --json --family F` over the demo's manifests and compares each of its
/// cells with the observed one; the number of cells compared.
fn compare_matrix(
    agent_bin: &std::path::Path,
    manifests: &ManifestDir,
    family: Family,
    observed: &Matrix,
) -> Result<usize> {
    let name = family_name(family).to_ascii_lowercase();
    let matrix = std::process::Command::new(agent_bin)
        .args(["matrix", "--json", "--family", &name])
        .arg("--manifests")
        .arg(manifests.path())
        .output()
        .context("running netpol-agent matrix")?;
    let json: serde_json::Value =
        serde_json::from_slice(&matrix.stdout).context("matrix --json output")?;
    let table = &json["matrix"];
    let pods: Vec<String> = table["pods"]
        .as_array()
        .context("matrix JSON has no pods")?
        .iter()
        .map(|p| p["pod"].as_str().unwrap_or_default().to_owned())
        .collect();
    let mut compared = 0;
    let mut differ = Vec::new();
    for port_table in table["tables"]
        .as_array()
        .context("matrix JSON has no tables")?
    {
        // "TCP/80"
        let port: u16 = port_table["port"]
            .as_str()
            .and_then(|p| p.split('/').find_map(|part| part.parse().ok()))
            .context("matrix JSON port")?;
        let destinations = port_table["destinations"]
            .as_array()
            .context("destinations")?;
        for (row, cells) in port_table["cells"]
            .as_array()
            .context("cells")?
            .iter()
            .enumerate()
        {
            for (col, cell) in cells.as_array().context("cells row")?.iter().enumerate() {
                let Some(reach) = cell.as_str() else { continue };
                let dst = &pods[destinations[col].as_u64().context("destination index")? as usize];
                let column = Column {
                    dst: dst.clone(),
                    port,
                    protocol: Protocol::Tcp,
                };
                let Some(seen) = observed.cell(&pods[row], &column) else {
                    continue;
                };
                compared += 1;
                if (reach == "allowed") != seen.outcome.is_allowed() {
                    differ.push(format!("{} -> {dst}:{port}", pods[row]));
                }
            }
        }
    }
    if compared == 0 || !differ.is_empty() {
        bail!(
            "`matrix --family {name}` disagrees with the traffic observed over {} on {} of \
             {compared} cells: {}",
            family_name(family),
            differ.len(),
            differ.join(", ")
        );
    }
    Ok(compared)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expectations_follow_the_definition() {
        // Before: everything open.
        assert!(expected("client/client", "stars/backend", false));
        // After: backend only from frontend (same namespace, role=frontend).
        assert!(expected("stars/frontend", "stars/backend", true));
        assert!(!expected("client/client", "stars/backend", true));
        assert!(!expected(
            "management-ui/management-ui",
            "stars/backend",
            true
        ));
        // After: frontend only from namespaces labelled role=client.
        assert!(expected("client/client", "stars/frontend", true));
        assert!(!expected("stars/backend", "stars/frontend", true));
        assert!(!expected(
            "management-ui/management-ui",
            "stars/frontend",
            true
        ));
        // Unprotected pods and the node.
        assert!(expected("stars/backend", "client/client", true));
        assert!(expected(NODE, "stars/backend", true));
    }

    #[test]
    fn policies_parse_and_name_both_pods() {
        for doc in POLICIES.split("\n---\n") {
            let v: serde_json::Value = serde_norway::from_str(doc).expect("valid YAML");
            assert_eq!(v["kind"], "NetworkPolicy");
            let role = v["spec"]["podSelector"]["matchLabels"]["role"]
                .as_str()
                .unwrap();
            let dst = PODS
                .iter()
                .find(|p| p.role == role)
                .expect("selects a demo pod");
            assert!(
                ACCESS
                    .iter()
                    .any(|(d, _)| *d == format!("{}/{}", dst.namespace, dst.name))
            );
        }
    }
}
