//! Benchmark orchestration: `cargo bench` for the agent's benchmarks (datapath, control)
//! and the lab traffic benchmark (`bench_traffic/`), which runs in this process.

use anyhow::{Context, Result, bail};

use crate::cargo::{build_agent, cargo};
use crate::{bench_traffic, ui};

/// Every benchmark, in the order `all` runs them.
pub const ALL: [&str; 3] = ["datapath", "control", "traffic"];

/// The benchmarks named by `which` (one of [`ALL`] or `all`), one after the other;
/// `smoke` runs tiny sizes. Every one runs even if an earlier one failed; the error names
/// each that failed.
pub fn run(which: &str, smoke: bool) -> Result<()> {
    let names: Vec<&str> = match which {
        "all" => ALL.to_vec(),
        name if ALL.contains(&name) => vec![name],
        other => bail!("unknown benchmark {other:?} (datapath, control, traffic, all)"),
    };
    let failed: Vec<String> = names
        .iter()
        .filter_map(|name| one(name, smoke).err().map(|e| format!("{e:#}")))
        .collect();
    if !failed.is_empty() {
        bail!("{}", failed.join("; "));
    }
    Ok(())
}

/// One benchmark (a name of [`ALL`]).
pub fn one(name: &str, smoke: bool) -> Result<()> {
    ui::step(&format!(
        "benchmark {name}{}",
        if smoke { " (smoke)" } else { "" }
    ));
    if name == "traffic" {
        // Runs in this process: the lab, the release agent, iptables (bench_traffic/).
        let agent = build_agent()?;
        return bench_traffic::run(&agent, smoke).context("benchmark traffic failed");
    }
    let mut cmd = cargo();
    if smoke {
        // A smoke run proves the bench still works, not how fast: it is built with the
        // test profile and the workspace's features, so it shares the build of tiers 1–2
        // (`cargo test --workspace`) instead of compiling every crate again optimised.
        cmd.args([
            "test",
            "--workspace",
            "--exclude",
            "netpol-lab",
            "--bench",
            name,
        ])
        .args(["--", "--smoke"]);
    } else {
        cmd.args(["bench", "-p", "netpol-agent", "--bench", name]);
    }
    let status = cmd.status().context("running cargo")?;
    if !status.success() {
        bail!("benchmark {name} failed ({status})");
    }
    Ok(())
}
