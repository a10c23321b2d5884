//! The setups measured: no enforcement, netpol enforcing the policies, and the same
//! policies as iptables + ipset rules, at 1,000 policies (10 selecting the server) and at
//! 10,000 (all selecting it); then through a Service. Each run switches its enforcement
//! on, checks it is in force, measures, switches it off and checks the node is back to
//! none.

use std::ffi::OsString;
use std::net::Ipv4Addr;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use netpol_lab::{AgentProcess, Lab, ManifestDir, Probe};

use super::iptables::IptablesRules;
use super::measure::measure;
use super::report::{Row, SetFacts};
use super::{PROBE_PORT, SERVICE_OFFSET, Sizes};
use crate::ui;

/// Indices of the setups in [`names`] (the order they are reported in).
pub(super) const NONE: usize = 0;
pub(super) const NETPOL: usize = 1;
pub(super) const IPTABLES: usize = 2;
pub(super) const NETPOL_SCALED: usize = 3;
pub(super) const IPTABLES_SCALED: usize = 4;
pub(super) const SERVICE_NONE: usize = 5;
pub(super) const SERVICE_NETPOL: usize = 6;

/// The setups, in the order they are reported.
pub(super) fn names(sizes: Sizes) -> Vec<String> {
    let scaled = crate::ui::thousands(sizes.scaled_policies);
    vec![
        "none".into(),
        "netpol (1,000 policies)".into(),
        "iptables + ipset (1,000 policies)".into(),
        format!("netpol ({scaled} policies selecting the server)"),
        format!("iptables + ipset ({scaled} policies selecting the server)"),
        "through a Service: none".into(),
        "through a Service: netpol (client egress-isolated)".into(),
    ]
}

/// One set of policies, as the agent reads them and as iptables rules, with what
/// switching it on took.
pub(super) struct PolicySet<'a> {
    /// Where the agent reads the cluster and the policies from.
    pub manifests: &'a ManifestDir,
    /// The generation the agent reaches once it enforces every policy.
    pub generation: u64,
    pub rules: &'a IptablesRules,
    /// Whether the rules' chains and sets exist (loaded once; runs switch them on and
    /// off).
    loaded: bool,
    /// How long loading the iptables rules took.
    iptables_load: Duration,
    /// The longest wait for the agent's first complete generation.
    agent_ready: Duration,
}

impl<'a> PolicySet<'a> {
    pub fn new(manifests: &'a ManifestDir, generation: u64, rules: &'a IptablesRules) -> Self {
        PolicySet {
            manifests,
            generation,
            rules,
            loaded: false,
            iptables_load: Duration::ZERO,
            agent_ready: Duration::ZERO,
        }
    }

    /// What the report states about this set.
    pub fn facts(&self) -> SetFacts {
        let r = self.rules;
        SetFacts {
            counts: (r.chains, r.rules, r.sets, r.set_members),
            iptables_load: self.iptables_load,
            agent_ready: self.agent_ready,
        }
    }
}

/// What the setups need to switch enforcement on and off, and how long that took.
pub(super) struct Setups<'a> {
    pub lab: &'a Lab,
    pub server_ip: Ipv4Addr,
    /// x/server's ClusterIP (its ports plus `SERVICE_OFFSET`).
    pub service_ip: Ipv4Addr,
    /// The policies plus x/client's egress policy, and their generation.
    pub isolated_client: &'a ManifestDir,
    pub isolated_generation: u64,
    pub sizes: Sizes,
    pub agent_bin: &'a Path,
    /// The 1,000 policies, 10 of them selecting the server.
    pub policies: PolicySet<'a>,
    /// The policies that all select the server.
    pub scaled: PolicySet<'a>,
}

impl<'a> Setups<'a> {
    /// One run of setup `setup` (an index of [`names`]) into `row`.
    pub fn run(&mut self, setup: usize, row: &mut Row) -> Result<()> {
        let direct = Target::direct(self.server_ip);
        let service = Target::service(self.service_ip);
        match setup {
            NONE => measure(self.lab, direct, self.sizes, row),
            NETPOL => self.netpol(direct, false, row),
            IPTABLES => self.iptables(false, row),
            NETPOL_SCALED => self.netpol(direct, true, row),
            IPTABLES_SCALED => self.iptables(true, row),
            SERVICE_NONE => measure(self.lab, service, self.sizes, row),
            _ => self.netpol(service, false, row),
        }
    }

    fn set(&mut self, scaled: bool) -> &mut PolicySet<'a> {
        if scaled {
            &mut self.scaled
        } else {
            &mut self.policies
        }
    }

    fn netpol(&mut self, target: Target, scaled: bool, row: &mut Row) -> Result<()> {
        let lab = self.lab;
        let started = Instant::now();
        let (manifests, generation) = if target.via_service {
            (self.isolated_client, self.isolated_generation)
        } else {
            let set = self.set(scaled);
            (set.manifests, set.generation)
        };
        // Detach on exit: after the run the node is back to no enforcement.
        let source = [
            OsString::from("--manifests"),
            manifests.path().as_os_str().to_owned(),
            OsString::from("--on-exit"),
            OsString::from("detach"),
        ];
        let mut agent = AgentProcess::start_with_source(lab, self.agent_bin, &source)?;
        agent
            .wait_generation(generation, Duration::from_secs(60))
            .with_context(|| format!("agent log:\n{}", agent.log_tail(30)))?;
        let set = self.set(scaled);
        set.agent_ready = set.agent_ready.max(started.elapsed());
        check_enforcement(lab, true, "netpol")?;
        if target.via_service {
            check_through_service(lab)?;
        }
        measure(lab, target, self.sizes, row)?;
        let exit = agent.stop()?;
        // The kernel releases the links as the last references go: allow it a moment
        // (bounded).
        let deadline = Instant::now() + Duration::from_secs(3);
        let mut detached = check_enforcement(lab, false, "none, agent detached");
        while detached.is_err() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(100));
            detached = check_enforcement(lab, false, "none, agent detached");
        }
        detached.with_context(|| format!("agent exit {exit:?}, log:\n{}", agent.log_tail(15)))?;
        drop(agent);
        Ok(())
    }

    fn iptables(&mut self, scaled: bool, row: &mut Row) -> Result<()> {
        let lab = self.lab;
        let netns = lab.node_netns();
        let set = self.set(scaled);
        let rules = set.rules;
        if !set.loaded {
            let started = Instant::now();
            rules.load(netns)?;
            set.iptables_load = started.elapsed();
            set.loaded = true;
        }
        rules.enable(netns)?;
        check_enforcement(lab, true, "iptables")?;
        measure(lab, Target::direct(self.server_ip), self.sizes, row)?;
        rules.disable(netns)?;
        check_enforcement(lab, false, "none, after removing the iptables rules")
    }
}

/// Allowed: x/client -> x/server:80. Under enforcement, x/intruder -> x/server:80 must be
/// blocked; without, allowed.
pub(super) fn check_enforcement(lab: &Lab, enforced: bool, what: &str) -> Result<()> {
    let probes = [
        Probe::tcp("x/client", "x/server", PROBE_PORT),
        Probe::tcp("x/intruder", "x/server", PROBE_PORT),
    ];
    let results = lab.probe_all(&probes, Duration::from_millis(300))?;
    if !results[0].outcome.is_allowed() {
        bail!("{what}: x/client -> x/server:80 was {}", results[0].outcome);
    }
    let intruder_ok = if enforced {
        results[1].outcome.is_blocked()
    } else {
        results[1].outcome.is_allowed()
    };
    if !intruder_ok {
        bail!(
            "{what}: x/intruder -> x/server:80 was {} (expected {})",
            results[1].outcome,
            if enforced { "blocked" } else { "allowed" }
        );
    }
    ui::ok(&format!(
        "{what}: client allowed, intruder {}",
        if enforced { "blocked" } else { "allowed" }
    ));
    Ok(())
}

/// Where x/client connects: x/server itself, or its Service.
#[derive(Clone, Copy, Debug)]
pub(super) struct Target {
    pub ip: Ipv4Addr,
    /// Added to the benchmark ports.
    pub port_offset: u16,
    pub via_service: bool,
}

impl Target {
    fn direct(ip: Ipv4Addr) -> Self {
        Target {
            ip,
            port_offset: 0,
            via_service: false,
        }
    }

    fn service(ip: Ipv4Addr) -> Self {
        Target {
            ip,
            port_offset: SERVICE_OFFSET,
            via_service: true,
        }
    }
}

/// With x/client egress-isolated: its connection through the Service is allowed (judged
/// on x/server's port 80), x/intruder's (blocked by x/server's ingress) is not.
fn check_through_service(lab: &Lab) -> Result<()> {
    let port = PROBE_PORT + SERVICE_OFFSET;
    let probes = [
        Probe::tcp("x/client", "svc/x/server", port),
        Probe::tcp("x/intruder", "svc/x/server", port),
    ];
    let results = lab.probe_all(&probes, Duration::from_millis(300))?;
    if !results[0].outcome.is_allowed() || !results[1].outcome.is_blocked() {
        bail!(
            "through the Service: x/client was {}, x/intruder {} (expected allowed, blocked)",
            results[0].outcome,
            results[1].outcome
        );
    }
    ui::ok("through the Service: client allowed, intruder blocked");
    Ok(())
}
