//! `cargo xtask <command>`: see `cargo xtask --help`.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use xtask::{cargo, demo, prereqs};

#[derive(Parser)]
#[command(
    name = "cargo xtask",
    bin_name = "cargo xtask",
    about = "Developer tasks for netpol",
    version
)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Install what is missing: llvm-22-dev, iproute2, nightly rust-src, bpf-linker, bpffs.
    Prereqs,
    /// Build the agent (release, with its eBPF programs) and print its path.
    Build,
    /// The "stars" demo: an emulated node, the agent, reachability before and after policies.
    Run {
        /// Exit after the report instead of running until Ctrl-C.
        #[arg(long)]
        once: bool,
        /// Keep the work directory (manifests, agent log) after exit.
        #[arg(long)]
        keep: bool,
        /// Use this agent binary instead of building one.
        #[arg(long, value_name = "PATH")]
        agent: Option<PathBuf>,
    },
    /// Every test tier: cargo test --workspace, then the network-namespace tests.
    Test,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Cmd::Prereqs => prereqs::ensure(),
        Cmd::Build => prereqs::ensure()
            .and_then(|()| cargo::build_agent())
            .map(|path| println!("{}", path.display())),
        Cmd::Run { once, keep, agent } => demo::run(&demo::RunOptions { once, keep, agent }),
        Cmd::Test => prereqs::ensure()
            .and_then(|()| cargo::build_agent())
            .and_then(|agent| cargo::test_all(&agent)),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
