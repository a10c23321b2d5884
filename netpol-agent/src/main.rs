//! `netpol-agent`: enforce Kubernetes NetworkPolicies with eBPF.
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context as _;
use clap::{Args, Parser, Subcommand};
use netpol_agent::agent::{self, LocalConfig};
use netpol_agent::datapath::Capacities;
use tracing_subscriber::EnvFilter;

#[derive(Parser, Debug)]
#[command(
    name = "netpol-agent",
    version,
    about = "Kubernetes NetworkPolicy enforcement in eBPF"
)]
#[command(args_conflicts_with_subcommands = true)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    run: RunArgs,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Enforce policies (the default command).
    Run(RunArgs),
}

#[derive(Args, Debug, Clone)]
struct RunArgs {
    /// Directory of Namespace, Pod and NetworkPolicy manifests (local mode).
    #[arg(long, value_name = "DIR")]
    manifests: Option<PathBuf>,
    /// bpffs directory for pinned maps and links.
    #[arg(long, value_name = "DIR", default_value = "/sys/fs/bpf/netpol")]
    bpffs_dir: PathBuf,
    /// Write a JSON status (generation applied, counts) here after each apply.
    #[arg(long, value_name = "FILE")]
    status_file: Option<PathBuf>,
    /// This node's name: only pods with this spec.nodeName are local.
    #[arg(long, value_name = "NAME", env = "NODE_NAME")]
    node_name: Option<String>,
    /// How often the manifest directory is checked for changes.
    #[arg(long, value_name = "MS", default_value_t = 100)]
    poll_ms: u64,
    /// How often interfaces are re-checked without a manifest change.
    #[arg(long, value_name = "MS", default_value_t = 1000)]
    resync_ms: u64,
    /// Capacity of the ENDPOINTS map (local pod addresses).
    #[arg(long)]
    max_endpoints: Option<u32>,
    /// Capacity of the IPCACHE map (pod IPs, node IPs, ipBlock prefixes).
    #[arg(long)]
    max_ipcache: Option<u32>,
    /// Capacity of the POLICY map.
    #[arg(long)]
    max_policy: Option<u32>,
    /// Capacity of the conntrack map.
    #[arg(long)]
    max_conntrack: Option<u32>,
    /// Log as JSON lines instead of text.
    #[arg(long)]
    log_json: bool,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let args = match cli.command {
        Some(Command::Run(args)) => args,
        None => cli.run,
    };
    let filter = EnvFilter::try_from_env("NETPOL_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    let subscriber = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_target(false);
    if args.log_json {
        subscriber.json().init();
    } else {
        subscriber.init();
    }

    let manifests = args
        .manifests
        .clone()
        .context("--manifests DIR is required (Kubernetes mode is not built yet)")?;
    let config = LocalConfig {
        manifests,
        bpffs_dir: args.bpffs_dir.clone(),
        status_file: args.status_file.clone(),
        node_name: args.node_name.clone(),
        capacities: Capacities {
            endpoints: args.max_endpoints,
            ipcache: args.max_ipcache,
            policy: args.max_policy,
            conntrack: args.max_conntrack,
        },
        poll: Duration::from_millis(args.poll_ms.max(10)),
        resync: Duration::from_millis(args.resync_ms.max(100)),
    };
    tracing::info!(manifests = %config.manifests.display(), bpffs = %config.bpffs_dir.display(), "netpol-agent starting");
    agent::run_local(config, shutdown_signal())
        .await
        .context("agent stopped")?;
    tracing::info!("netpol-agent stopped; programs detached, pins removed");
    Ok(())
}

async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(term) => term,
        Err(error) => {
            tracing::warn!(%error, "cannot watch SIGTERM; Ctrl-C only");
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}
