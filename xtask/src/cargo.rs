//! Driving cargo: building the agent and running the test tiers.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{Context, Result, bail};
use netpol_lab::AGENT_BIN_ENV;

use crate::ui;

/// The workspace root (the parent of this crate).
pub fn workspace_root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives in the workspace root")
}

/// A `cargo` command run from the workspace root (the cargo that runs us, if any).
pub fn cargo() -> Command {
    let mut cmd = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    cmd.current_dir(workspace_root());
    cmd
}

/// `cargo build --release -p netpol-agent` (its build script builds the eBPF programs
/// with nightly); returns the path of the binary.
pub fn build_agent() -> Result<PathBuf> {
    ui::step("building netpol-agent (release)");
    let mut child = cargo()
        .args(["build", "--release", "-p", "netpol-agent"])
        .args(["--message-format", "json-render-diagnostics"])
        .stdout(Stdio::piped())
        .spawn()
        .context("running cargo build")?;
    let stdout = child.stdout.take().expect("stdout is piped");
    let mut binary = None;
    for line in BufReader::new(stdout).lines() {
        let line = line?;
        let Ok(msg) = serde_json::from_str::<serde_json::Value>(&line) else {
            continue;
        };
        if msg["reason"] == "compiler-artifact"
            && msg["target"]["name"] == "netpol-agent"
            && let Some(exe) = msg["executable"].as_str()
        {
            binary = Some(PathBuf::from(exe));
        }
    }
    let status = child.wait()?;
    if !status.success() {
        bail!("building netpol-agent failed ({status})");
    }
    let binary = binary.context("cargo did not report the netpol-agent executable")?;
    ui::ok(&format!("{}", binary.display()));
    Ok(binary)
}

/// Set for the tests when chromium is installed: the browser test of `matrix --html`
/// (`netpol-agent/tests/matrix_html.rs`, same name there) then fails where it would
/// otherwise be skipped for want of a browser.
const REQUIRE_CHROMIUM_ENV: &str = "NETPOL_TEST_REQUIRE_CHROMIUM";

/// Runs `cargo test ARGS --no-fail-fast` with the agent path in the environment, output
/// streamed: a failing test binary does not keep the others of its tier from running.
/// Returns whether it passed.
fn cargo_test(args: &[&str], agent: &Path, chromium: bool) -> Result<bool> {
    let mut cmd = cargo();
    cmd.arg("test")
        .args(args)
        .arg("--no-fail-fast")
        .env(AGENT_BIN_ENV, agent);
    if chromium {
        cmd.env(REQUIRE_CHROMIUM_ENV, "1");
    }
    let status = cmd.status().context("running cargo test")?;
    Ok(status.success())
}

/// Tiers 1–2 (`cargo test --workspace` without netpol-lab: unit, property and verdict
/// tests), then tier 3 (netpol-lab: the lab's own tests and the network-namespace tests
/// with the real agent). Both always run; the error names every tier that failed.
/// `chromium`: the browser test must find chromium (it was installed).
pub fn test_all(agent: &Path, chromium: bool) -> Result<()> {
    ui::step("tiers 1–2: cargo test --workspace --exclude netpol-lab");
    let unit = cargo_test(&["--workspace", "--exclude", "netpol-lab"], agent, chromium)?;
    ui::step("tier 3: network-namespace tests (cargo test -p netpol-lab)");
    let netns = cargo_test(&["-p", "netpol-lab"], agent, chromium)?;
    match (unit, netns) {
        (true, true) => Ok(()),
        (false, true) => bail!("tiers 1–2 failed"),
        (true, false) => bail!("tier 3 failed"),
        (false, false) => bail!("tiers 1–2 and tier 3 failed"),
    }
}
