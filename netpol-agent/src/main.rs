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
    /// Follow the verdict events of a running agent (drops and new connections), with
    /// pods and policy rules named.
    Flows(FlowsArgs),
}

#[derive(Args, Debug, Clone)]
struct FlowsArgs {
    /// The agent's flow socket [default: /run/netpol/<name of --bpffs-dir>.sock].
    #[arg(long, value_name = "PATH")]
    socket: Option<PathBuf>,
    /// The agent's bpffs directory (names the default socket).
    #[arg(long, value_name = "DIR", default_value = "/sys/fs/bpf/netpol")]
    bpffs_dir: PathBuf,
    /// Only flows from, to or decided for this pod (ns/name).
    #[arg(long, value_name = "NS/NAME")]
    pod: Option<String>,
    /// Only flows with an end in this namespace.
    #[arg(long, value_name = "NS")]
    namespace: Option<String>,
    /// Only this verdict.
    #[arg(long, value_parser = ["dropped", "allowed", "audit"])]
    verdict: Option<String>,
    /// Only this destination port.
    #[arg(long)]
    port: Option<u16>,
    /// One JSON object per line.
    #[arg(long)]
    json: bool,
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
    /// Unix socket of the flow log [default: /run/netpol/<name of --bpffs-dir>.sock].
    #[arg(long, value_name = "PATH")]
    flow_socket: Option<PathBuf>,
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
        Some(Command::Flows(args)) => return flows(args).await,
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
        flow_socket: Some(args.flow_socket.clone().unwrap_or_else(|| default_flow_socket(&args.bpffs_dir))),
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

async fn flows(args: FlowsArgs) -> anyhow::Result<()> {
    let socket = args.socket.unwrap_or_else(|| default_flow_socket(&args.bpffs_dir));
    let filter = netpol_agent::flowlog::FlowFilter {
        pod: args.pod,
        namespace: args.namespace,
        verdict: args.verdict,
        port: args.port,
    };
    let mut out = std::io::stdout();
    netpol_agent::flowlog::follow(&socket, &filter, args.json, &mut out)
        .await
        .with_context(|| format!("following {} (is the agent running?)", socket.display()))
}

/// One socket per agent instance: named after its bpffs directory.
fn default_flow_socket(bpffs_dir: &std::path::Path) -> PathBuf {
    let name = bpffs_dir.file_name().map_or_else(|| "netpol".into(), |n| n.to_string_lossy().into_owned());
    PathBuf::from("/run/netpol").join(format!("{name}.sock"))
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
