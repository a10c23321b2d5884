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
    pub setup: &'static str,
    pub gbits: Vec<f64>,
    pub p50_us: Vec<f64>,
    pub p99_us: Vec<f64>,
}

impl Row {
    pub fn new(setup: &'static str) -> Self {
        Row {
            setup,
            gbits: Vec::new(),
            p50_us: Vec::new(),
            p99_us: Vec::new(),
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
}

/// One line per setup with its medians, as the rounds end.
pub(super) fn medians(rows: &[Row]) {
    for row in rows {
        ui::ok(&format!(
            "{}: {:.2} Gbit/s, RR p50 {:.1} µs, p99 {:.1} µs (medians of {} runs)",
            row.setup,
            row.gbit(),
            row.p50(),
            row.p99(),
            row.gbits.len()
        ));
    }
}

/// What the report states beside the measurements.
pub(super) struct Facts {
    pub smoke: bool,
    pub sizes: Sizes,
    /// Chains, rules, ipsets and ipset members of the iptables setup.
    pub iptables_counts: (usize, usize, usize, usize),
    /// The longest load of the iptables rules.
    pub iptables_load: Duration,
    /// The longest wait for the agent's first complete generation.
    pub agent_ready: Duration,
    /// When the benchmark started.
    pub started: Instant,
}

/// Prints the table (`rows` in order: none, netpol, iptables, then none and netpol
/// through a Service) and writes
/// `target/bench/traffic.json`.
pub(super) fn write(rows: &[Row], facts: &Facts) -> Result<()> {
    let Facts {
        smoke,
        sizes,
        iptables_counts,
        iptables_load,
        agent_ready,
        started,
    } = *facts;
    let base = rows[0].clone();
    // Reported in this order: the floor, netpol, then the iptables way beside it.
    let mut out = String::new();
    let _ = writeln!(
        out,
        "\n| setup | throughput (Gbit/s) | RR p50 (µs) | RR p99 (µs) |\n|:---|---:|---:|---:|"
    );
    for r in rows {
        let _ = writeln!(
            out,
            "| {} | {:.2} ({:.2}×) | {:.1} ({:.2}×) | {:.1} ({:.2}×) |",
            r.setup,
            r.gbit(),
            r.gbit() / base.gbit(),
            r.p50(),
            r.p50() / base.p50(),
            r.p99(),
            r.p99() / base.p99()
        );
    }
    let netpol = &rows[1];
    let tput_ok = netpol.gbit() >= 0.95 * base.gbit();
    let p99_ok = netpol.p99() <= 1.1 * base.p99();
    // Through the Service: netpol against no enforcement through the same Service.
    let (service_base, service_netpol) = (&rows[3], &rows[4]);
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
            "{}: per-round ratios to none, median: throughput {:.2}×, RR p50 {:.2}×, p99 {:.2}×",
            r.setup,
            paired(r, |r| &r.gbits),
            paired(r, |r| &r.p50_us),
            paired(r, |r| &r.p99_us),
        );
    }
    let _ = writeln!(
        out,
        "\nmethod: x/client -> x/server over veths through the node namespace; throughput: \
         64 KiB writes for {:?}; RR: {} 1-byte round trips on one connection \
         (TCP_NODELAY), per-run p50/p99. {} rounds, the setups taking turns within each \
         round (rotated), medians over rounds; client on CPU 0, servers on CPU 1.\n\
         targets: netpol throughput >= 0.95x none: {} ; netpol p99 <= 1.1x none: {}\n\
         iptables: {} chains, {} rules, {} ipsets ({} members) loaded in {:.0?}; \
         agent ready (1,000 policies) in {:.0?}; total {:.1?}",
        sizes.stream_for,
        sizes.round_trips,
        sizes.runs,
        if tput_ok { "met" } else { "MISSED" },
        if p99_ok { "met" } else { "MISSED" },
        iptables_counts.0,
        iptables_counts.1,
        iptables_counts.2,
        iptables_counts.3,
        iptables_load,
        agent_ready,
        started.elapsed(),
    );
    println!("{out}");

    let json = json!({
        "smoke": smoke,
        "policies": POLICIES,
        "policies_selecting_server": SERVER_POLICIES,
        "stream_seconds": sizes.stream_for.as_secs_f64(),
        "round_trips": sizes.round_trips,
        "runs": sizes.runs,
        "iptables": {
            "chains": iptables_counts.0, "rules": iptables_counts.1,
            "ipsets": iptables_counts.2, "ipset_members": iptables_counts.3,
            "load_ms": iptables_load.as_secs_f64() * 1e3,
        },
        "agent_ready_ms": agent_ready.as_secs_f64() * 1e3,
        "targets": {"netpol_throughput_ge_0.95": tput_ok, "netpol_p99_le_1.1": p99_ok},
        "setups": rows.iter().map(|r| json!({
            "setup": r.setup,
            "gbit_s": r.gbit(), "gbit_s_runs": r.gbits,
            "gbit_ratio": r.gbit() / base.gbit(),
            "rr_p50_us": r.p50(), "rr_p50_runs": r.p50_us, "rr_p50_ratio": r.p50() / base.p50(),
            "rr_p99_us": r.p99(), "rr_p99_runs": r.p99_us, "rr_p99_ratio": r.p99() / base.p99(),
            "paired_ratio_medians": {
                "gbit_s": paired(r, |r| &r.gbits),
                "rr_p50": paired(r, |r| &r.p50_us),
                "rr_p99": paired(r, |r| &r.p99_us),
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
