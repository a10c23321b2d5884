//! Idempotent installation of what building and running netpol needs. Every check is
//! cheap when the item is already there; only missing items are installed.

use std::path::Path;
use std::process::{Command, Stdio};

use anyhow::{Context, Result, bail};

use crate::ui;

/// LLVM that bpf-linker is built against (matches stable rustc's LLVM).
const LLVM_DEB: &str = "llvm-22-dev";
const LLVM_BIN: &str = "/usr/lib/llvm-22/bin";
const BPF_LINKER_SERIES: &str = "0.13";
const BPFFS: &str = "/sys/fs/bpf";

/// Checks and, where missing, installs: llvm-22-dev, iproute2, iptables, ipset, nftables, nightly rust-src,
/// bpf-linker 0.13 (LLVM 22) and a bpffs mount at /sys/fs/bpf.
pub fn ensure() -> Result<()> {
    ui::step("prerequisites");
    let mut apt = Apt::default();
    apt.ensure(LLVM_DEB)?;
    apt.ensure("iproute2")?;
    // The iptables + ipset baseline of `cargo xtask bench traffic`, and kube-proxy's
    // rules in the lab (iptables and nftables modes).
    apt.ensure("iptables")?;
    apt.ensure("ipset")?;
    apt.ensure("nftables")?;
    ensure_rust_src()?;
    ensure_bpf_linker()?;
    ensure_bpffs()?;
    Ok(())
}

/// Debian's chromium, where the headless-browser test of `matrix --html` finds it.
pub const CHROMIUM: &str = "/usr/bin/chromium";

/// What only `cargo xtask test` needs, installed where missing: Debian's chromium, for
/// the headless-browser test of `matrix --html` (`netpol-agent/tests/matrix_html.rs`).
/// An error means that test will be skipped: the caller says so.
pub fn ensure_chromium() -> Result<()> {
    ui::step("test prerequisites");
    Apt::default().ensure("chromium")?;
    match probe(CHROMIUM, &["--version"]) {
        Some(version) => {
            ui::ok(version.trim());
            Ok(())
        }
        None => bail!("{CHROMIUM} --version fails after installing chromium"),
    }
}

/// cargo-fuzz series installed for `cargo xtask fuzz` (and the smoke run of `test`).
const CARGO_FUZZ_SERIES: &str = "0.13";

/// What `cargo xtask fuzz` needs, installed where missing: a C++ compiler (libfuzzer-sys
/// builds libFuzzer), the nightly toolchain and cargo-fuzz.
pub fn ensure_fuzz() -> Result<()> {
    ensure_fuzz_toolchain()?;
    ensure_cargo_fuzz()
}

/// The part of [`ensure_fuzz`] that uses apt and rustup: a C++ compiler and the nightly
/// toolchain. `cargo xtask test` runs it in the foreground (apt allows one user at a
/// time), and installs cargo-fuzz with the target's background build.
pub fn ensure_fuzz_toolchain() -> Result<()> {
    ui::step("fuzzing prerequisites");
    Apt::default().ensure("g++")?;
    ensure_rust_src()
}

/// `Some(version)` when `cargo fuzz --version` works (`cargo-fuzz 0.13.2`).
fn cargo_fuzz_version() -> Option<String> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let out = probe(&cargo, &["fuzz", "--version"])?;
    out.split_whitespace().nth(1).map(str::to_owned)
}

/// cargo-fuzz of [`CARGO_FUZZ_SERIES`], installed with `cargo install` where missing.
pub fn ensure_cargo_fuzz() -> Result<()> {
    match cargo_fuzz_version() {
        Some(v) if in_series(&v, CARGO_FUZZ_SERIES) => {
            ui::ok(&format!("cargo-fuzz {v} already installed"));
            return Ok(());
        }
        Some(v) => ui::doing(&format!(
            "replacing cargo-fuzz {v} with {CARGO_FUZZ_SERIES}.x"
        )),
        None => ui::doing(&format!("installing cargo-fuzz {CARGO_FUZZ_SERIES}.x")),
    }
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    run(Command::new(cargo).args([
        "install",
        "cargo-fuzz",
        "--version",
        &format!("~{CARGO_FUZZ_SERIES}"),
        "--locked",
        "--force",
    ]))?;
    match cargo_fuzz_version() {
        Some(v) if in_series(&v, CARGO_FUZZ_SERIES) => Ok(()),
        other => bail!(
            "cargo-fuzz is not usable after installing it (found {other:?}); is ~/.cargo/bin on PATH?"
        ),
    }
}

/// Runs a command quietly; returns stdout when it succeeds, `None` when it fails or
/// does not exist.
fn probe(program: &str, args: &[&str]) -> Option<String> {
    let out = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Runs a command with inherited output; fails unless it succeeds.
fn run(cmd: &mut Command) -> Result<()> {
    let status = cmd.status().with_context(|| format!("running {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed ({status})");
    }
    Ok(())
}

fn require_root(what: &str) -> Result<()> {
    if !nix::unistd::geteuid().is_root() {
        bail!("installing {what} needs root; rerun as root or install it yourself");
    }
    Ok(())
}

/// apt-get, with `apt-get update` run at most once per invocation.
#[derive(Default)]
struct Apt {
    updated: bool,
}

impl Apt {
    fn installed(package: &str) -> bool {
        probe("dpkg-query", &["-W", "-f=${Status}", package])
            .is_some_and(|s| s.trim() == "install ok installed")
    }

    fn ensure(&mut self, package: &str) -> Result<()> {
        if Self::installed(package) {
            ui::ok(&format!("{package} already installed"));
            return Ok(());
        }
        require_root(package)?;
        if !self.updated {
            ui::doing("apt-get update");
            run(Command::new("apt-get").args(["update", "-q"]))?;
            self.updated = true;
        }
        ui::doing(&format!("installing {package}"));
        run(Command::new("apt-get")
            .args(["install", "-y", "-q", "--no-install-recommends", package])
            .env("DEBIAN_FRONTEND", "noninteractive"))?;
        if !Self::installed(package) {
            bail!("{package} is still not installed after apt-get install");
        }
        Ok(())
    }
}

fn ensure_rust_src() -> Result<()> {
    match probe("rustup", &["+nightly", "component", "list", "--installed"]) {
        Some(list) if list.lines().any(|l| l.trim() == "rust-src") => {
            ui::ok("nightly toolchain with rust-src already installed");
        }
        Some(_) => {
            ui::doing("adding rust-src to the nightly toolchain");
            run(Command::new("rustup").args([
                "component",
                "add",
                "rust-src",
                "--toolchain",
                "nightly",
            ]))?;
        }
        None => {
            ui::doing("installing the nightly toolchain with rust-src");
            run(Command::new("rustup").args([
                "toolchain",
                "install",
                "nightly",
                "--profile",
                "minimal",
                "--component",
                "rust-src",
            ]))?;
        }
    }
    Ok(())
}

/// `Some(version)` when `bpf-linker --version` works.
fn bpf_linker_version() -> Option<String> {
    let out = probe("bpf-linker", &["--version"])?;
    out.split_whitespace().nth(1).map(str::to_owned)
}

fn in_series(version: &str, series: &str) -> bool {
    version == series || version.starts_with(&format!("{series}."))
}

fn ensure_bpf_linker() -> Result<()> {
    match bpf_linker_version() {
        Some(v) if in_series(&v, BPF_LINKER_SERIES) => {
            ui::ok(&format!("bpf-linker {v} already installed"));
            return Ok(());
        }
        Some(v) => ui::doing(&format!(
            "replacing bpf-linker {v} with {BPF_LINKER_SERIES}.x (LLVM 22)"
        )),
        None => ui::doing(&format!(
            "installing bpf-linker {BPF_LINKER_SERIES}.x (LLVM 22)"
        )),
    }
    if !Path::new(LLVM_BIN).join("llvm-config").exists() {
        bail!("{LLVM_BIN}/llvm-config is missing; is {LLVM_DEB} installed?");
    }
    // llvm-sys finds LLVM through llvm-config on PATH.
    let path = match std::env::var_os("PATH") {
        Some(p) => {
            let mut dirs = vec![Path::new(LLVM_BIN).to_path_buf()];
            dirs.extend(std::env::split_paths(&p));
            std::env::join_paths(dirs)?
        }
        None => LLVM_BIN.into(),
    };
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    run(Command::new(cargo)
        .args([
            "install",
            "bpf-linker",
            "--version",
            &format!("~{BPF_LINKER_SERIES}"),
            "--locked",
            "--force",
            "--no-default-features",
            "--features",
            "llvm-22",
        ])
        .env("PATH", path))?;
    match bpf_linker_version() {
        Some(v) if in_series(&v, BPF_LINKER_SERIES) => Ok(()),
        other => bail!(
            "bpf-linker is not usable after installing it (found {other:?}); is ~/.cargo/bin on PATH?"
        ),
    }
}

fn bpffs_mounted() -> bool {
    use nix::sys::statfs::{BPF_FS_MAGIC, statfs};
    statfs(BPFFS).is_ok_and(|s| s.filesystem_type() == BPF_FS_MAGIC)
}

fn ensure_bpffs() -> Result<()> {
    if bpffs_mounted() {
        ui::ok(&format!("bpffs already mounted at {BPFFS}"));
        return Ok(());
    }
    require_root("bpffs")?;
    ui::doing(&format!("mounting bpffs at {BPFFS}"));
    nix::mount::mount(
        Some("bpf"),
        BPFFS,
        Some("bpf"),
        nix::mount::MsFlags::empty(),
        Some("mode=0700"),
    )
    .with_context(|| format!("mount -t bpf bpf {BPFFS}"))?;
    if !bpffs_mounted() {
        bail!("{BPFFS} is still not a bpffs after mounting");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::in_series;

    #[test]
    fn version_series() {
        assert!(in_series("0.13.0", "0.13"));
        assert!(in_series("0.13", "0.13"));
        assert!(!in_series("0.130.1", "0.13"));
        assert!(!in_series("0.12.9", "0.13"));
    }
}
