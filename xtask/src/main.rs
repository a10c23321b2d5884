//! `cargo xtask <command>`: see `cargo xtask --help`.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use xtask::{bench, cargo, conformance, demo, fuzz, kind, prereqs, ui};

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
    /// Every test tier: cargo test --workspace, the network-namespace tests, the demo,
    /// benchmark smoke runs, the conformance cases in every world (local and Kubernetes
    /// mode, two nodes, through Services, IPv6 only, dual stack), then a fuzz smoke run
    /// (its target built in the background meanwhile). Every stage runs even if an
    /// earlier one failed; the failures are listed at the end, before the total
    /// `N passed, M failed` of the conformance cases.
    /// Installs chromium first, for the headless-browser test of `matrix --html`; where
    /// that fails the test is skipped, and the run says so before its last line.
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
        /// Install cargo-fuzz where missing and build the target, nothing else (the
        /// background build `cargo xtask test` starts; apt and rustup are its caller's).
        #[arg(long, hide = true)]
        build_only: bool,
    },
}

#[derive(clap::Args)]
struct ConformanceArgs {
    /// Case files or directories [default: ../shared/conformance/cases and cnp,
    /// tests/conformance and tests/conformance/cnp].
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
          value_parser = clap::value_parser!(u16).range(1..=netpol_lab::MAX_NODES as i64))]
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
    /// How probes reach pods: `direct` (the pod's address) or `service` (the pod's own
    /// ClusterIP Service on a Service port that differs from the target port, translated
    /// by kube-proxy's rules on the node; hairpin probes too).
    #[arg(long, value_enum, default_value = "direct")]
    via: conformance::Via,
    /// With `--via service`: kube-proxy's iptables or nftables mode.
    #[arg(long, value_enum, default_value = "iptables")]
    proxy_mode: conformance::ProxyMode,
    /// Address families: `ipv4` (as the cases are written), `ipv6` (every IPv4 address
    /// of a case stands for its image in fd00:4::/96) or `dual` (both, ipBlocks doubled,
    /// every probe made over both families).
    #[arg(long, value_enum, default_value = "ipv4")]
    family: conformance::Families,
}

/// Runs the cases and prints `N passed, M failed` last; the caller decides what failed
/// cases mean.
fn conformance(args: ConformanceArgs) -> anyhow::Result<conformance::Summary> {
    let paths = if args.paths.is_empty() {
        conformance::default_case_dirs(cargo::workspace_root())
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
    let via = match (args.via, args.proxy_mode) {
        (conformance::Via::Direct, _) => String::new(),
        (conformance::Via::Service, conformance::ProxyMode::Iptables) => {
            ", through Services (kube-proxy iptables mode)".to_owned()
        }
        (conformance::Via::Service, conformance::ProxyMode::Nftables) => {
            ", through Services (kube-proxy nftables mode)".to_owned()
        }
    };
    let family = match args.family {
        conformance::Families::Ipv4 => "",
        conformance::Families::Ipv6 => ", IPv6 only",
        conformance::Families::Dual => ", dual stack",
    };
    xtask::ui::step(&format!(
        "conformance: {} {plural}, {} at a time, agent in {source}{nodes}{via}{family}",
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
        via: args.via,
        proxy_mode: args.proxy_mode,
        families: args.family,
        json: args.json,
    };
    let summary = conformance::run(&files, &options)?;
    let mut world = Vec::new();
    if args.source == conformance::SourceKind::Kube {
        world.push("Kubernetes mode".to_owned());
    }
    if args.nodes > 1 {
        world.push(format!("{} nodes", args.nodes));
    }
    if args.via == conformance::Via::Service {
        world.push("through Services".to_owned());
    }
    match args.family {
        conformance::Families::Ipv4 => {}
        conformance::Families::Ipv6 => world.push("IPv6".to_owned()),
        conformance::Families::Dual => world.push("dual stack".to_owned()),
    }
    let label = match world.is_empty() {
        true => String::new(),
        false => format!(" ({})", world.join(", ")),
    };
    println!("conformance{label}: {:.0}s", summary.seconds);
    if summary.skipped > 0 {
        println!(
            "{} case(s) skipped: written for other --family worlds",
            summary.skipped
        );
    }
    println!("{} passed, {} failed", summary.passed, summary.failed);
    Ok(summary)
}

/// Fails if any case of `summary` failed.
fn all_passed(summary: &conformance::Summary) -> anyhow::Result<()> {
    if summary.failed > 0 {
        anyhow::bail!("{} conformance case(s) failed", summary.failed);
    }
    Ok(())
}

/// One world `cargo xtask test` runs the conformance cases in (FORMAT.md, "Worlds").
struct World {
    name: &'static str,
    source: conformance::SourceKind,
    nodes: u16,
    via: conformance::Via,
    proxy_mode: conformance::ProxyMode,
    family: conformance::Families,
}

impl World {
    /// IPv4, one node, the agent in local mode, probes to the pods' own addresses.
    fn new(name: &'static str) -> Self {
        World {
            name,
            source: conformance::SourceKind::Local,
            nodes: 1,
            via: conformance::Via::Direct,
            proxy_mode: conformance::ProxyMode::Iptables,
            family: conformance::Families::Ipv4,
        }
    }

    fn kube(self) -> Self {
        World {
            source: conformance::SourceKind::Kube,
            ..self
        }
    }

    fn nodes(self, nodes: u16) -> Self {
        World { nodes, ..self }
    }

    fn via_service(self, proxy_mode: conformance::ProxyMode) -> Self {
        World {
            via: conformance::Via::Service,
            proxy_mode,
            ..self
        }
    }

    fn family(self, family: conformance::Families) -> Self {
        World { family, ..self }
    }
}

/// `cargo xtask test`: every stage, each run even if an earlier one failed. Prints the
/// failed stages, then the conformance cases of every world as `N passed, M failed` (the
/// last line; a stage that failed other than by its cases adds one to M); fails if any
/// stage failed.
fn test(agent: &std::path::Path) -> anyhow::Result<()> {
    use conformance::{Families, ProxyMode};
    let mut failures: Vec<String> = Vec::new();
    let mut stages = 0;
    let mut record = |stage: &str, result: anyhow::Result<()>| {
        stages += 1;
        if let Err(e) = result {
            failures.push(format!("{stage}: {e:#}"));
        }
    };
    // Only the tests need a browser (the headless test of `matrix --html`); without one
    // that test is skipped, which is said now and again at the end.
    let chromium = prereqs::ensure_chromium();
    if let Err(e) = &chromium {
        ui::warn(&format!(
            "chromium could not be installed ({e:#}): the browser test of matrix --html \
             will be SKIPPED"
        ));
    }
    // The fuzz target builds in the background, at the lowest CPU priority, from now
    // until its smoke run after the conformance worlds (their probes mostly wait).
    let fuzz_build = prereqs::ensure_fuzz_toolchain().and_then(|()| fuzz::BackgroundBuild::start());
    record("cargo test tiers", cargo::test_all(agent, chromium.is_ok()));
    // The README's first command, as a new user runs it (without waiting for Ctrl-C).
    record(
        "demo (cargo xtask run --once)",
        demo::run(&demo::RunOptions {
            once: true,
            keep: false,
            agent: Some(agent.to_owned()),
        }),
    );
    for name in bench::ALL {
        record(&format!("benchmark {name} (smoke)"), bench::one(name, true));
    }
    // The same cases in every world: the agent in local mode, in Kubernetes mode (fed
    // over HTTP list/watch by the API server double) and across two nodes (two agents,
    // pods dealt to both); through Services (kube-proxy's rules on the nodes, iptables
    // and nftables mode); IPv6 only and dual stack, on one node and on two.
    let worlds = [
        World::new("local mode"),
        World::new("Kubernetes mode").kube(),
        World::new("2 nodes").nodes(2),
        World::new("through Services, Kubernetes mode")
            .kube()
            .via_service(ProxyMode::Iptables),
        World::new("through Services, 2 nodes, nftables")
            .nodes(2)
            .via_service(ProxyMode::Nftables),
        World::new("IPv6, Kubernetes mode")
            .kube()
            .family(Families::Ipv6),
        World::new("IPv6, 2 nodes, through Services")
            .nodes(2)
            .family(Families::Ipv6)
            .via_service(ProxyMode::Iptables),
        World::new("dual stack").family(Families::Dual),
        World::new("dual stack, 2 nodes")
            .nodes(2)
            .family(Families::Dual),
    ];
    let (mut passed, mut failed, mut case_failures) = (0, 0, 0);
    for world in worlds {
        let stage = format!("conformance ({})", world.name);
        let summary = conformance(ConformanceArgs {
            paths: Vec::new(),
            json: None,
            agent: Some(agent.to_owned()),
            jobs: 2,
            timeout_ms: 1000,
            source: world.source,
            faults: false,
            nodes: world.nodes,
            via: world.via,
            proxy_mode: world.proxy_mode,
            family: world.family,
        });
        if let Ok(summary) = &summary {
            passed += summary.passed;
            failed += summary.failed;
            case_failures += usize::from(summary.failed > 0);
        }
        record(&stage, summary.and_then(|s| all_passed(&s)));
    }
    record(
        "fuzz (smoke)",
        fuzz_build
            .and_then(fuzz::BackgroundBuild::wait)
            .and_then(|()| fuzz::fuzz(fuzz::SMOKE_SECS)),
    );
    // A stage that failed other than by failing cases (a test tier, a smoke, a
    // conformance run that could not start) counts once in the closing line, so the
    // line never reads "0 failed" when something did.
    failed += failures.len() - case_failures;
    if let Err(e) = &chromium {
        ui::step("skipped (not passed):");
        ui::warn(&format!(
            "the browser test of matrix --html (netpol-agent/tests/matrix_html.rs): no \
             chromium ({e:#})"
        ));
    }
    if !failures.is_empty() {
        ui::step(&format!("{} of {stages} stages failed:", failures.len()));
        for failure in &failures {
            println!("  {failure}");
        }
    }
    println!("{passed} passed, {failed} failed");
    if !failures.is_empty() {
        anyhow::bail!("{} of {stages} stages failed", failures.len());
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
            .and_then(|agent| test(&agent)),
        Cmd::Conformance(args) => prereqs::ensure()
            .and_then(|()| conformance(args))
            .and_then(|summary| all_passed(&summary)),
        Cmd::Bench { which, smoke } => prereqs::ensure().and_then(|()| bench::run(&which, smoke)),
        Cmd::KindE2e(options) => kind::run(&options),
        Cmd::Fuzz {
            build_only: true, ..
        } => prereqs::ensure_cargo_fuzz().and_then(|()| fuzz::build_target()),
        Cmd::Fuzz { secs, .. } => fuzz::run(secs),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
