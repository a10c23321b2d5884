//! The results: one row per setup (medians over the rounds), the Markdown table with the
//! ratios to no enforcement and the targets, and `target/bench/traffic.json`.

use std::fmt::Write as _;
use std::time::{Duration, Instant};

use anyhow::Result;
use serde_json::json;

use super::{POLICIES, SERVER_POLICIES, Sizes};
use crate::ui;

/// One measured setup: medians over the runs.
#[derive(Clone, Debug)]
pub(super) struct Row {
    pub setup: String,
    pub gbits: Vec<f64>,
    pub p50_us: Vec<f64>,
    pub p99_us: Vec<f64>,
    /// New connections (connect, one round trip, close): per-run p50 and p99.
    pub conn_p50_us: Vec<f64>,
    pub conn_p99_us: Vec<f64>,
}

impl Row {
    pub fn new(setup: String) -> Self {
        Row {
            setup,
            gbits: Vec::new(),
            p50_us: Vec::new(),
            p99_us: Vec::new(),
            conn_p50_us: Vec::new(),
            conn_p99_us: Vec::new(),
        }
    }
}

fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    if s.is_empty() {
        return f64::NAN;
    }
    let n = s.len();
    if n % 2 == 1 {
        s[n / 2]
    } else {
        (s[n / 2 - 1] + s[n / 2]) / 2.0
    }
}

impl Row {
    fn gbit(&self) -> f64 {
        median(&self.gbits)
    }
    fn p50(&self) -> f64 {
        median(&self.p50_us)
    }
    fn p99(&self) -> f64 {
        median(&self.p99_us)
    }
    fn conn_p50(&self) -> f64 {
        median(&self.conn_p50_us)
    }
    fn conn_p99(&self) -> f64 {
        median(&self.conn_p99_us)
    }
}

/// One line per setup with its medians, as the rounds end.
pub(super) fn medians(rows: &[Row]) {
    for row in rows {
        ui::ok(&format!(
            "{}: {:.2} Gbit/s, RR p50 {:.1} µs, p99 {:.1} µs, new connection p50 {:.0} µs, \
             p99 {:.0} µs (medians of {} runs)",
            row.setup,
            row.gbit(),
            row.p50(),
            row.p99(),
            row.conn_p50(),
            row.conn_p99(),
            row.gbits.len()
        ));
    }
}

/// What the report states about one set of policies.
#[derive(Clone, Copy)]
pub(super) struct SetFacts {
    /// Chains, rules, ipsets and ipset members of its iptables form.
    pub counts: (usize, usize, usize, usize),
    /// How long loading the iptables rules took.
    pub iptables_load: Duration,
    /// The longest wait for the agent's first complete generation.
    pub agent_ready: Duration,
}

impl SetFacts {
    /// One line of the method text.
    fn line(&self, label: &str) -> String {
        let (chains, rules, sets, members) = self.counts;
        format!(
            "iptables ({label}): {chains} chains, {rules} rules, {sets} ipsets ({members} \
             members) loaded in {:.0?}; agent ready in {:.0?}",
            self.iptables_load, self.agent_ready
        )
    }

    fn iptables_json(&self) -> serde_json::Value {
        let (chains, rules, sets, members) = self.counts;
        json!({
            "chains": chains, "rules": rules, "ipsets": sets, "ipset_members": members,
            "load_ms": self.iptables_load.as_secs_f64() * 1e3,
        })
    }

    fn agent_ready_ms(&self) -> f64 {
        self.agent_ready.as_secs_f64() * 1e3
    }
}

/// What the report states beside the measurements.
pub(super) struct Facts {
    pub smoke: bool,
    pub sizes: Sizes,
    /// The 1,000 policies, and those that all select the server.
    pub policies: SetFacts,
    pub scaled: SetFacts,
    /// When the benchmark started.
    pub started: Instant,
}

/// Prints the table (`rows` in the order of `setups::names`) and writes
/// `target/bench/traffic.json`.
pub(super) fn write(rows: &[Row], facts: &Facts) -> Result<()> {
    use super::setups::{
        IPTABLES, IPTABLES_SCALED, NETPOL, NETPOL_SCALED, NONE, SERVICE_NETPOL, SERVICE_NONE,
    };
    let Facts {
        smoke,
        sizes,
        policies,
        scaled,
        started,
    } = *facts;
    let base = rows[NONE].clone();
    // Reported in this order: the floor, netpol, then the iptables way beside it.
    let mut out = String::new();
    let _ = writeln!(
        out,
        "\n| setup | throughput (Gbit/s) | RR p50 (µs) | RR p99 (µs) | new connection p50 (µs) | new connection p99 (µs) |\n|:---|---:|---:|---:|---:|---:|"
    );
    for r in rows {
        let _ = writeln!(
            out,
            "| {} | {:.2} ({:.2}×) | {:.1} ({:.2}×) | {:.1} ({:.2}×) | {:.0} ({:.2}×) | {:.0} ({:.2}×) |",
            r.setup,
            r.gbit(),
            r.gbit() / base.gbit(),
            r.p50(),
            r.p50() / base.p50(),
            r.p99(),
            r.p99() / base.p99(),
            r.conn_p50(),
            r.conn_p50() / base.conn_p50(),
            r.conn_p99(),
            r.conn_p99() / base.conn_p99(),
        );
    }
    let netpol = &rows[NETPOL];
    // A new connection with every policy selecting the server, against 1,000 policies
    // of which 10 do: what the policy count costs each enforcer.
    let scaling = |small: usize, big: usize| rows[big].conn_p50() / rows[small].conn_p50();
    let _ = writeln!(
        out,
        "new connection p50, {} policies selecting the server / 1,000 policies: netpol {:.2}×, \
         iptables + ipset {:.2}×",
        ui::thousands(sizes.scaled_policies),
        scaling(NETPOL, NETPOL_SCALED),
        scaling(IPTABLES, IPTABLES_SCALED),
    );
    let tput_ok = netpol.gbit() >= 0.95 * base.gbit();
    let p99_ok = netpol.p99() <= 1.1 * base.p99();
    // Through the Service: netpol against no enforcement through the same Service.
    let (service_base, service_netpol) = (&rows[SERVICE_NONE], &rows[SERVICE_NETPOL]);
    let _ = writeln!(
        out,
        "through a Service, netpol / none through the same Service: throughput {:.2}×, RR p50 {:.2}×, p99 {:.2}×",
        service_netpol.gbit() / service_base.gbit(),
        service_netpol.p50() / service_base.p50(),
        service_netpol.p99() / service_base.p99(),
    );
    // The same ratios round by round (each setup against "none" of its own round), then
    // the median: drift between rounds cancels out. Shown beside the targets, which are
    // judged on the ratios of the medians above.
    let paired = |row: &Row, values: fn(&Row) -> &Vec<f64>| {
        median(
            &values(row)
                .iter()
                .zip(values(&base))
                .map(|(v, b)| v / b)
                .collect::<Vec<_>>(),
        )
    };
    for r in &rows[1..] {
        let _ = writeln!(
            out,
            "{}: per-round ratios to none, median: throughput {:.2}×, RR p50 {:.2}×, p99 {:.2}×, \
             new connection p50 {:.2}×",
            r.setup,
            paired(r, |r| &r.gbits),
            paired(r, |r| &r.p50_us),
            paired(r, |r| &r.p99_us),
            paired(r, |r| &r.conn_p50_us),
        );
    }
    let _ = writeln!(
        out,
        "\nmethod: x/client -> x/server over veths through the node namespace; throughput: \
         64 KiB writes for {:?}; RR: {} 1-byte round trips on one connection \
         (TCP_NODELAY), per-run p50/p99; new connections: {} per run, each connect + one \
         1-byte round trip + close. {} rounds, the setups taking turns within each \
         round (rotated), medians over rounds; client on CPU 0, servers on CPU 1.\n\
         targets: netpol throughput >= 0.95x none: {} ; netpol p99 <= 1.1x none: {}\n\
         {}\n{}; total {:.1?}",
        sizes.stream_for,
        sizes.round_trips,
        sizes.connections,
        sizes.runs,
        if tput_ok { "met" } else { "MISSED" },
        if p99_ok { "met" } else { "MISSED" },
        policies.line("1,000 policies"),
        scaled.line(&format!(
            "{} policies selecting the server",
            ui::thousands(sizes.scaled_policies)
        )),
        started.elapsed(),
    );
    println!("{out}");

    let json = json!({
        "smoke": smoke,
        "policies": POLICIES,
        "policies_selecting_server": SERVER_POLICIES,
        "stream_seconds": sizes.stream_for.as_secs_f64(),
        "round_trips": sizes.round_trips,
        "connections": sizes.connections,
        "scaled_policies_selecting_server": sizes.scaled_policies,
        "runs": sizes.runs,
        "iptables": policies.iptables_json(),
        "agent_ready_ms": policies.agent_ready_ms(),
        "scaled": {
            "iptables": scaled.iptables_json(),
            "agent_ready_ms": scaled.agent_ready_ms(),
            "new_connection_p50_scaling": {
                "netpol": scaling(NETPOL, NETPOL_SCALED),
                "iptables": scaling(IPTABLES, IPTABLES_SCALED),
            },
        },
        "targets": {"netpol_throughput_ge_0.95": tput_ok, "netpol_p99_le_1.1": p99_ok},
        "setups": rows.iter().map(|r| json!({
            "setup": r.setup,
            "gbit_s": r.gbit(), "gbit_s_runs": r.gbits,
            "gbit_ratio": r.gbit() / base.gbit(),
            "rr_p50_us": r.p50(), "rr_p50_runs": r.p50_us, "rr_p50_ratio": r.p50() / base.p50(),
            "rr_p99_us": r.p99(), "rr_p99_runs": r.p99_us, "rr_p99_ratio": r.p99() / base.p99(),
            "new_connection_p50_us": r.conn_p50(), "new_connection_p50_runs": r.conn_p50_us,
            "new_connection_p99_us": r.conn_p99(), "new_connection_p99_runs": r.conn_p99_us,
            "paired_ratio_medians": {
                "gbit_s": paired(r, |r| &r.gbits),
                "rr_p50": paired(r, |r| &r.p50_us),
                "rr_p99": paired(r, |r| &r.p99_us),
                "new_connection_p50": paired(r, |r| &r.conn_p50_us),
            },
        })).collect::<Vec<_>>(),
    });
    let dir = crate::cargo::workspace_root().join("target/bench");
    std::fs::create_dir_all(&dir)?;
    let path = dir.join("traffic.json");
    std::fs::write(&path, serde_json::to_string_pretty(&json)?)?;
    println!("wrote {}", path.display());
    Ok(())
}
