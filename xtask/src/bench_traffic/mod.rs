//! `cargo xtask bench traffic`: pod-to-pod TCP throughput, 1-byte request/response
//! latency and new-connection latency on an emulated node, with no enforcement, with
//! netpol enforcing 1,000 NetworkPolicies, and with the same policies enforced the
//! iptables + ipset way (as kube-router does); then both again with 10,000 policies that
//! all select the measured server; then pod to Service (kube-proxy's iptables rules on
//! the node) without enforcement and with netpol, the client egress-isolated so that
//! every connection is judged after translation. See docs/BENCHMARKS.md ("Traffic").
//!
//! - `setups.rs`: switching each setup's enforcement on and off, checked by probes;
//! - `measure.rs`: the servers in x/server and one measurement run from x/client;
//! - `policies.rs`: the generated policies; `iptables.rs`: their iptables + ipset form;
//! - `report.rs`: medians, the table and `target/bench/traffic.json`.

mod iptables;
mod measure;
mod policies;
mod report;
mod setups;

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use netpol_lab::{Lab, ManifestDir, PodSpec, Port};

use crate::ui;
use iptables::IptablesRules;
use measure::BenchServers;
use policies::{CLIENT_EGRESS, generate_policies, policies_yaml, server_policies};
use report::{Facts, Row};
use setups::{PolicySet, Setups, check_enforcement, names};

const STREAM_PORT: u16 = 5201;
const RR_PORT: u16 = 5202;
const PROBE_PORT: u16 = 80;
const POLICIES: usize = 1000;
/// Policies that select the server (the rest select other, absent, pods).
const SERVER_POLICIES: usize = 10;
const OTHER_NAMESPACES: usize = 20;
/// x/server's Service ports are its ports plus this.
const SERVICE_OFFSET: u16 = 10_000;

/// Sizes of one run.
#[derive(Clone, Copy, Debug)]
pub struct Sizes {
    pub runs: usize,
    pub stream_for: Duration,
    pub round_trips: usize,
    /// New connections per run.
    pub connections: usize,
    /// Policies selecting x/server in the scaled setups.
    pub scaled_policies: usize,
}

impl Sizes {
    pub fn new(smoke: bool) -> Self {
        if smoke {
            Self {
                runs: 1,
                stream_for: Duration::from_millis(200),
                round_trips: 300,
                connections: 50,
                scaled_policies: 100,
            }
        } else {
            Self {
                runs: 7,
                stream_for: Duration::from_secs(3),
                round_trips: 20_000,
                connections: 2_000,
                scaled_policies: 10_000,
            }
        }
    }
}

/// Runs the benchmark: prints the table, writes `target/bench/traffic.json`.
pub fn run(agent_bin: &Path, smoke: bool) -> Result<()> {
    if !nix::unistd::geteuid().is_root() {
        println!("traffic: skipped (needs root for the lab)");
        return Ok(());
    }
    let sizes = Sizes::new(smoke);
    let started = Instant::now();
    let mut lab = Lab::new()?;
    lab.set_namespace_labels("x", [("team", "x")]);
    for i in 0..OTHER_NAMESPACES {
        lab.set_namespace_labels(&format!("ns-{i}"), [("team", format!("t{}", i % 5))]);
    }
    lab.add_pod(
        PodSpec::new("x", "client")
            .label("app", "client")
            .label("tier", "frontend"),
    )?;
    lab.add_pod(
        PodSpec::new("x", "server")
            .label("app", "server")
            .label("tier", "backend")
            .port(Port::tcp(PROBE_PORT)),
    )?;
    // Not allowed by any policy: proves the policies are in force.
    lab.add_pod(PodSpec::new("x", "intruder").label("app", "intruder"))?;

    let mut service = netpol_lab::ServiceSpec::new("x", "server").select("app", "server");
    for port in [STREAM_PORT, RR_PORT, PROBE_PORT] {
        service = service.port(netpol_lab::ServicePort {
            name: Some(format!("tcp-{port}")),
            protocol: netpol_lab::Protocol::Tcp,
            port: port + SERVICE_OFFSET,
            target: netpol_lab::TargetPort::Number(port),
        });
    }
    let service_ip = lab
        .add_service(service)?
        .ipv4
        .expect("an IPv4 lab gives Services an IPv4 ClusterIP");
    let server = lab.pod("x/server").context("x/server")?;
    let server_ip = server.v4();
    let servers = BenchServers::start(&lab, server_ip)?;
    let policies = generate_policies();
    let rules = IptablesRules::generate(&lab, &policies, "KR")?;
    let mut manifests = ManifestDir::create(lab.workdir().join("manifests"))?;
    let generation = manifests.write(&lab, &policies_yaml(&policies)?)?;
    let scaled = server_policies(sizes.scaled_policies);
    let scaled_rules = IptablesRules::generate(&lab, &scaled, "KS")?;
    let mut scaled_manifests = ManifestDir::create(lab.workdir().join("manifests-scaled"))?;
    let scaled_generation = scaled_manifests.write(&lab, &policies_yaml(&scaled)?)?;
    let mut isolated_client = ManifestDir::create(lab.workdir().join("manifests-egress"))?;
    let isolated_generation = isolated_client.write(
        &lab,
        &format!("{}{CLIENT_EGRESS}", policies_yaml(&policies)?),
    )?;
    let mut setups = Setups {
        lab: &lab,
        server_ip,
        service_ip,
        isolated_client: &isolated_client,
        isolated_generation,
        sizes,
        agent_bin,
        policies: PolicySet::new(&manifests, generation, &rules),
        scaled: PolicySet::new(&scaled_manifests, scaled_generation, &scaled_rules),
    };

    // The setups take turns, one run each per round, and each round starts with the
    // next setup: drift in the machine (other tenants, frequency) spreads over all
    // three instead of landing on whichever was measured in its block.
    let names = names(sizes);
    let mut rows: Vec<Row> = names.iter().map(|name| Row::new(name.clone())).collect();
    check_enforcement(&lab, false, "none")?;
    for round in 0..sizes.runs {
        ui::step(&format!("traffic: round {} of {}", round + 1, sizes.runs));
        for k in 0..names.len() {
            let setup = (round + k) % names.len();
            setups.run(setup, &mut rows[setup])?;
        }
    }
    report::medians(&rows);
    let facts = Facts {
        smoke,
        sizes,
        policies: setups.policies.facts(),
        scaled: setups.scaled.facts(),
        started,
    };

    servers.stop();
    IptablesRules::unload(lab.node_netns())?;
    drop(lab);

    report::write(&rows, &facts)
}
