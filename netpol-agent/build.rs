//! Builds the eBPF programs (netpol-ebpf, target bpfel-unknown-none, nightly + bpf-linker)
//! and places the object in OUT_DIR, where `datapath/load.rs` embeds it (`OBJECT`).
use anyhow::{Context as _, anyhow};

fn main() -> anyhow::Result<()> {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .ok_or_else(|| anyhow!("netpol-agent has no parent directory"))?
        .join("netpol-ebpf");
    let root = root.to_str().context("non-UTF-8 path to netpol-ebpf")?;
    println!("cargo:rerun-if-changed={root}/../netpol-common/src");
    // With AYA_BUILD_SKIP (e.g. for quick `cargo check`s without the BPF toolchain),
    // aya-build builds nothing; leave an empty object so the crate still compiles.
    // Loading it then fails with a clear error.
    if std::env::var_os("AYA_BUILD_SKIP")
        .is_some_and(|v| v == "1" || v.eq_ignore_ascii_case("true"))
    {
        let out = std::path::PathBuf::from(std::env::var_os("OUT_DIR").context("OUT_DIR not set")?);
        std::fs::write(out.join("netpol"), [])?;
    }
    // The nightly toolchain for the eBPF crate: `nightly`, or a pinned one such as
    // `nightly-2026-05-20` (deploy/Dockerfile sets it for reproducible images).
    println!("cargo:rerun-if-env-changed=NETPOL_EBPF_TOOLCHAIN");
    let pinned = std::env::var("NETPOL_EBPF_TOOLCHAIN").unwrap_or_default();
    let toolchain = match pinned.trim() {
        "" => aya_build::Toolchain::default(),
        name => aya_build::Toolchain::Custom(name),
    };
    aya_build::build_ebpf(
        [aya_build::Package {
            name: "netpol-ebpf",
            root_dir: root,
            ..Default::default()
        }],
        toolchain,
    )
}
