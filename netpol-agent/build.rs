//! Builds the eBPF programs (netpol-ebpf, target bpfel-unknown-none, nightly + bpf-linker)
//! and places the object in OUT_DIR, where `datapath::loader` embeds it.
use anyhow::{Context as _, anyhow};

fn main() -> anyhow::Result<()> {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .ok_or_else(|| anyhow!("netpol-agent has no parent directory"))?
        .join("netpol-ebpf");
    let root = root.to_str().context("non-UTF-8 path to netpol-ebpf")?;
    println!("cargo:rerun-if-changed={root}/../netpol-common/src");
    aya_build::build_ebpf(
        [aya_build::Package {
            name: "netpol-ebpf",
            root_dir: root,
            ..Default::default()
        }],
        aya_build::Toolchain::default(),
    )
}
