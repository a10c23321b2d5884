//! `cargo xtask <command>`: see `cargo xtask --help`.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use xtask::{cargo, conformance, demo, fuzz, kind, prereqs};

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
    /// Every test tier: cargo test --workspace, the network-namespace tests, benchmark and
    /// fuzz smoke runs, then the conformance cases in local mode, in Kubernetes mode and
    /// across two nodes.
    Test,
    /// Run NetworkPolicy conformance cases (FORMAT.md) on emulated pods with real traffic.
    Conformance(ConformanceArgs),
    /// Benchmarks: tables on stdout, JSON in target/bench/ (see docs/BENCHMARKS.md).
    Bench {
        /// Which benchmark: datapath (BPF_PROG_TEST_RUN), control (compile and apply at
        /// 10k pods), traffic (pod-to-pod TCP through the lab: none, netpol, iptables),
        /// or all.
        #[arg(value_parser = ["datapath", "control", "traffic", "all"], default_value = "all")]
        which: String,
        /// Tiny sizes, a few seconds: proves the benchmarks still work (CI).
        #[arg(long)]
        smoke: bool,
    },
    /// End-to-end on a real cluster (needs Docker, kind and kubectl): create a kind
    /// cluster, build and load the agent image, deploy deploy/, wait for the DaemonSet,
    /// then run the conformance cases with real pods (see deploy/README.md).
    KindE2e(kind::Options),
    /// Fuzz manifest parsing and compiling (cargo-fuzz, nightly; fuzz/): prints the inputs
    /// run and the corpus size; fails on a crash (the input lands in fuzz/artifacts/).
    Fuzz {
        /// How long to fuzz, in seconds.
        #[arg(long, value_name = "N", default_value_t = fuzz::DEFAULT_SECS)]
        secs: u64,
    },
}

#[derive(clap::Args)]
struct ConformanceArgs {
    /// Case files or directories [default: ../shared/conformance/cases and tests/conformance].
    paths: Vec<PathBuf>,
    /// Write a machine-readable report here.
    #[arg(long, value_name = "FILE")]
    json: Option<PathBuf>,
    /// Use this agent binary instead of building one.
    #[arg(long, value_name = "PATH")]
    agent: Option<PathBuf>,
    /// Cases run at once, each on its own emulated node(s).
    #[arg(long, default_value_t = 2)]
    jobs: usize,
    /// Emulated nodes per case, joined by underlay links, one agent each; the case's pods
    /// are dealt to them in turn so that most probes cross nodes (local mode only).
    #[arg(long, value_name = "N", default_value_t = 1,
          value_parser = clap::value_parser!(u16).range(1..=xtask::lab::MAX_NODES as i64))]
    nodes: u16,
    /// Probe timeout per step, in milliseconds (blocked probes wait this long, together).
    #[arg(long, value_name = "MS", default_value_t = 1000)]
    timeout_ms: u64,
    /// Where the agent reads the cluster: `local` (a manifest directory) or `kube`
    /// (Kubernetes mode, fed over HTTP list/watch by the in-process API server double).
    #[arg(long, value_enum, default_value = "local")]
    source: conformance::SourceKind,
    /// With `--source kube`: at every step, kill the watch streams, expire the history
    /// (410 Gone) or restart the API server double, in turn; enforcement must stay right.
    #[arg(long, requires = "source")]
    faults: bool,
}

/// Runs the cases and prints `N passed, M failed` last; fails if any case failed.
fn conformance(args: ConformanceArgs) -> anyhow::Result<()> {
    let paths = if args.paths.is_empty() {
        let root = cargo::workspace_root();
        let mut paths = vec![root.join("../shared/conformance/cases")];
        let own = root.join("tests/conformance");
        if own.is_dir() {
            paths.push(own);
        }
        paths
    } else {
        args.paths
    };
    let files = conformance::collect(&paths)?;
    let agent = match args.agent {
        Some(agent) => agent,
        None => cargo::build_agent()?,
    };
    let plural = if files.len() == 1 { "case" } else { "cases" };
    let source = match args.source {
        conformance::SourceKind::Local => "local mode",
        conformance::SourceKind::Kube => "Kubernetes mode (API server double)",
    };
    if args.nodes > 1 && args.source != conformance::SourceKind::Local {
        anyhow::bail!("--nodes {} needs --source local", args.nodes);
    }
    let nodes = match args.nodes {
        1 => String::new(),
        n => format!(", {n} nodes (one agent each)"),
    };
    xtask::ui::step(&format!(
        "conformance: {} {plural}, {} at a time, agent in {source}{nodes}",
        files.len(),
        args.jobs
    ));
    let options = conformance::Options {
        agent,
        source: args.source,
        faults: args.faults,
        timeout: std::time::Duration::from_millis(args.timeout_ms),
        apply_timeout: std::time::Duration::from_secs(30),
        jobs: args.jobs,
        nodes: args.nodes.into(),
        json: args.json,
    };
    let summary = conformance::run(&files, &options)?;
    let label = match args.nodes {
        1 => String::new(),
        n => format!(" ({n} nodes)"),
    };
    println!("conformance{label}: {:.0}s", summary.seconds);
    println!("{} passed, {} failed", summary.passed, summary.failed);
    if summary.failed > 0 {
        anyhow::bail!("{} conformance case(s) failed", summary.failed);
    }
    Ok(())
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
            .and_then(|agent| {
                let tiers = cargo::test_all(&agent)
                    .and(cargo::bench("all", true))
                    .and(fuzz::run(fuzz::SMOKE_SECS));
                let run = |source, nodes| {
                    conformance(ConformanceArgs {
                        paths: Vec::new(),
                        json: None,
                        agent: Some(agent.clone()),
                        jobs: 2,
                        timeout_ms: 1000,
                        source,
                        faults: false,
                        nodes,
                    })
                };
                // The same cases with the agent in local mode, then in Kubernetes mode
                // (fed over HTTP list/watch by the API server double), then across two
                // nodes (two agents, pods dealt to both).
                let local = run(conformance::SourceKind::Local, 1);
                let kube = run(conformance::SourceKind::Kube, 1);
                let two_nodes = run(conformance::SourceKind::Local, 2);
                tiers.and(local).and(kube).and(two_nodes)
            }),
        Cmd::Conformance(args) => prereqs::ensure().and_then(|()| conformance(args)),
        Cmd::Bench { which, smoke } => prereqs::ensure().and_then(|()| cargo::bench(&which, smoke)),
        Cmd::KindE2e(options) => kind::run(&options),
        Cmd::Fuzz { secs } => fuzz::run(secs),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
