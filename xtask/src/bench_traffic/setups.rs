//! The three setups measured: no enforcement, netpol enforcing the policies, and the
//! same policies as iptables + ipset rules. Each run switches its enforcement on, checks
//! it is in force, measures, switches it off and checks the node is back to none.

use std::ffi::OsString;
use std::net::Ipv4Addr;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use netpol_lab::{AgentProcess, Lab, ManifestDir, Probe};

use super::iptables::IptablesRules;
use super::measure::measure;
use super::report::Row;
use super::{PROBE_PORT, Sizes};
use crate::ui;

/// The setups, in the order they are reported.
pub(super) const NAMES: [&str; 3] = ["none", "netpol (1,000 policies)", "iptables + ipset"];

/// What the setups need to switch enforcement on and off, and how long that took.
pub(super) struct Setups<'a> {
    pub lab: &'a Lab,
    pub server_ip: Ipv4Addr,
    pub sizes: Sizes,
    pub agent_bin: &'a Path,
    /// Where the agent reads the cluster and the policies from.
    pub manifests: &'a ManifestDir,
    /// The generation the agent reaches once it enforces every policy.
    pub generation: u64,
    pub rules: &'a IptablesRules,
    /// The longest wait for the agent's first complete generation.
    pub agent_ready: Duration,
    /// The longest load of the iptables rules.
    pub iptables_load: Duration,
}

impl Setups<'_> {
    /// One run of setup `setup` (an index of [`NAMES`]) into `row`.
    pub fn run(&mut self, setup: usize, row: &mut Row) -> Result<()> {
        match setup {
            0 => measure(self.lab, self.server_ip, self.sizes, row),
            1 => self.netpol(row),
            _ => self.iptables(row),
        }
    }

    fn netpol(&mut self, row: &mut Row) -> Result<()> {
        let lab = self.lab;
        let started = Instant::now();
        // Detach on exit: after the run the node is back to no enforcement.
        let source = [
            OsString::from("--manifests"),
            self.manifests.path().as_os_str().to_owned(),
            OsString::from("--on-exit"),
            OsString::from("detach"),
        ];
        let mut agent = AgentProcess::start_with_source(lab, self.agent_bin, &source)?;
        agent
            .wait_generation(self.generation, Duration::from_secs(60))
            .with_context(|| format!("agent log:\n{}", agent.log_tail(30)))?;
        self.agent_ready = self.agent_ready.max(started.elapsed());
        check_enforcement(lab, true, "netpol")?;
        measure(lab, self.server_ip, self.sizes, row)?;
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

    fn iptables(&mut self, row: &mut Row) -> Result<()> {
        let lab = self.lab;
        let started = Instant::now();
        self.rules.load(lab.node_netns())?;
        self.iptables_load = self.iptables_load.max(started.elapsed());
        check_enforcement(lab, true, "iptables")?;
        measure(lab, self.server_ip, self.sizes, row)?;
        IptablesRules::unload(lab.node_netns())?;
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
