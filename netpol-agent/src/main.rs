//! `netpol-agent`: enforce Kubernetes NetworkPolicies with eBPF.
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use clap::{Args, Parser, Subcommand};
use netpol_agent::datapath::Capacities;
use netpol_agent::preview::PortProtocol;
use netpol_agent::preview::explain::explain_between;
use netpol_agent::preview::load::{Loaded, Overlay, load_manifests};
use netpol_agent::preview::matrix::{
    self, AddressFamily, Matrix, MatrixOptions, MatrixReport, Style,
};
use netpol_agent::preview::terminal::{color, emit};
use netpol_agent::source::kube::Settings;
use netpol_agent::telemetry::health::Health;
use netpol_agent::{agent, config};
use netpol_compile::{Allocations, Compiled, Kind, compile};
use tracing_subscriber::EnvFilter;

/// jemalloc: the agent holds millions of small values at 150,000 pods (names, label sets,
/// pod fields, map shadows), where glibc's malloc adds a header to each and fragments;
/// with jemalloc the bench's agent peaked at 389 MiB instead of 412 and synced in 5.3 s
/// instead of 6.6 (docs/BENCHMARKS.md).
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// jemalloc's options ([`netpol_agent::JEMALLOC_OPTIONS`]), read when it starts (before
/// `main`): pages freed are given back to
/// the kernel at once instead of after ten seconds, so a compile's or a page's transient
/// memory does not stay resident. In the bench, three runs of each alternating: agent
/// RSS after the first sync 313 -> 296 MiB and peak 335-339 -> 323-324 at 150,000 pods,
/// peak 70 -> 56 MiB at 10,020, with no change in the watch event -> kernel times beyond
/// their spread (docs/BENCHMARKS.md). `_RJEM_MALLOC_CONF` still overrides it.
#[unsafe(export_name = "_rjem_malloc_conf")]
static MALLOC_CONF: Option<&std::ffi::c_char> =
    // SAFETY: a pointer to the first byte of a static NUL-terminated string.
    Some(unsafe { &*netpol_agent::JEMALLOC_OPTIONS.as_ptr() });

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
    Run(Box<RunArgs>),
    /// Follow the verdict events of a running agent (drops and new connections), with
    /// pods and policy rules named.
    Flows(FlowsArgs),
    /// Preview who can reach whom under the manifests' policies (no cluster, no root).
    ///
    /// One table per port: rows are source pods, columns the pods that declare the port.
    /// With --apply, also shows which cells the extra or replacing policies change.
    /// With --html FILE, writes the matrix as a page to open in a browser.
    Matrix(MatrixArgs),
    /// Explain, step by step, whether SRC can open a connection to DST on PORT/PROTO,
    /// and which policy rule allows it or why none does (no cluster, no root).
    Explain(ExplainArgs),
    /// What this node's kernel holds for a connection, read from a running agent's pins
    /// (read-only): each hook's verdict for a new connection, the conntrack entries and
    /// the policy generation, with the agent's status. `kubectl netpol explain --kernel`
    /// runs it in the agent's container.
    Inspect(InspectArgs),
}

#[derive(Args, Debug)]
struct InspectArgs {
    /// Source address.
    src: IpAddr,
    /// Destination address.
    dst: IpAddr,
    /// Destination port and protocol, e.g. 80/TCP.
    #[arg(value_name = "PORT/PROTO")]
    port: netpol_agent::preview::PortProtocol,
    /// The agent's bpffs directory.
    #[arg(long, value_name = "DIR", default_value = "/sys/fs/bpf/netpol")]
    bpffs_dir: PathBuf,
    /// The agent's status file (what it has applied).
    #[arg(long, value_name = "FILE", default_value = "/run/netpol/status.json")]
    status_file: PathBuf,
}

/// Where a preview's cluster comes from (matrix, explain).
#[derive(Args, Debug, Clone)]
struct PreviewArgs {
    /// Directory of Namespace, Pod and NetworkPolicy manifests, read as local mode does.
    #[arg(long, value_name = "DIR")]
    manifests: PathBuf,
    /// An address of the node: traffic from it to pods always passes (repeatable).
    #[arg(long = "node-ip", value_name = "IP")]
    node_ips: Vec<IpAddr>,
    /// Print JSON instead of text.
    #[arg(long)]
    json: bool,
}

#[derive(Args, Debug, Clone)]
struct MatrixArgs {
    #[command(flatten)]
    preview: PreviewArgs,
    /// NetworkPolicies and ClusterNetworkPolicies to create or replace (files or
    /// directories; repeatable, in order).
    #[arg(long, value_name = "FILE_OR_DIR")]
    apply: Vec<PathBuf>,
    /// Only these ports, e.g. 80/TCP, 53/UDP (repeatable). Default: every declared port.
    #[arg(long, value_name = "PORT/PROTO")]
    port: Vec<PortProtocol>,
    /// Every pod is a destination of every port, whether it declares the port or not.
    #[arg(long)]
    all_destinations: bool,
    /// Only this address family (ipv4 or ipv6). Default: both, a cell allowed over one
    /// and not the other showing `~`.
    #[arg(long, value_name = "ipv4|ipv6")]
    family: Option<AddressFamily>,
    /// Write the matrix as one self-contained HTML page to FILE (colours, counts, the
    /// deciding rule of each cell on hover and click) instead of printing the text
    /// (--json still prints JSON).
    #[arg(long, value_name = "FILE")]
    html: Option<PathBuf>,
}

#[derive(Args, Debug, Clone)]
struct ExplainArgs {
    /// Source: namespace/pod, `node`, or an IP address.
    src: String,
    /// Destination: namespace/pod, `node`, an IP address, or a Service (`svc/NS/NAME`,
    /// or its address), explained for each of its backends after kube-proxy's
    /// translation (PORT/PROTO is then the Service port).
    dst: String,
    /// Destination port and protocol, e.g. 80/TCP, 53/UDP, ICMP.
    #[arg(value_name = "PORT/PROTO")]
    port: PortProtocol,
    #[command(flatten)]
    preview: PreviewArgs,
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
    /// Only this verdict; staged-drop and staged-allow: connections the staged policies
    /// (annotation netpol.dev/staged) would decide otherwise.
    #[arg(long, value_parser = ["dropped", "allowed", "audit", "staged-drop", "staged-allow"])]
    verdict: Option<String>,
    /// Only this destination port.
    #[arg(long)]
    port: Option<u16>,
    /// First the records of this long ago on (90s, 5m, 2h; the agent keeps the last
    /// 10,000), then the live ones.
    #[arg(long, value_name = "DURATION", value_parser = netpol_agent::telemetry::flowlog::parse_since)]
    since: Option<std::time::Duration>,
    /// One JSON object per line.
    #[arg(long)]
    json: bool,
}

#[derive(Args, Debug, Clone)]
struct RunArgs {
    /// Directory of Namespace, Pod and NetworkPolicy manifests (local mode).
    #[arg(long, value_name = "DIR", conflicts_with_all = ["kube", "kubeconfig"])]
    manifests: Option<PathBuf>,
    /// Kubernetes mode: watch the API server (in-cluster configuration, or KUBECONFIG,
    /// or ~/.kube/config). Needs --node-name (NODE_NAME).
    #[arg(long)]
    kube: bool,
    /// Kubernetes mode with this kubeconfig file.
    #[arg(long, value_name = "FILE")]
    kubeconfig: Option<PathBuf>,
    /// Kubernetes mode: batch changes until none arrived for this long...
    #[arg(long, value_name = "MS", default_value_t = 50)]
    debounce_ms: u64,
    /// ...or for at most this long after the first.
    #[arg(long, value_name = "MS", default_value_t = 500)]
    max_delay_ms: u64,
    /// Kubernetes mode: do not publish invalid policies as Events (logs only).
    #[arg(long)]
    no_events: bool,
    /// This agent's pod name, named in the Events it publishes.
    #[arg(long, value_name = "NAME", env = "POD_NAME")]
    pod_name: Option<String>,
    /// Serve /healthz (liveness) and /readyz (readiness) on this address, e.g. 0.0.0.0:9808.
    #[arg(long, value_name = "ADDR")]
    health_addr: Option<SocketAddr>,
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
    /// How often the manifest directory is checked for changes (Kubernetes mode: the
    /// longest wait for a change before interfaces are looked at).
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
    /// Capacity of the POLICY map (exact ports, whole protocols).
    #[arg(long)]
    max_policy: Option<u32>,
    /// Capacity of the POLICY_RANGES map (port ranges).
    #[arg(long)]
    max_policy_ranges: Option<u32>,
    /// Capacity of each conntrack map (CT4 for IPv4 connections, CT6 for IPv6).
    #[arg(long)]
    max_conntrack: Option<u32>,
    /// Audit mode for every pod: would-be drops are logged and counted as `audit` but
    /// let through (namespaces opt in alone with the annotation netpol.dev/audit="true").
    #[arg(long)]
    audit: bool,
    /// On a clean exit: `keep` leaves programs, links and maps pinned so enforcement goes
    /// on (fail-static, seamless restarts); `detach` removes everything (uninstall).
    #[arg(long, value_enum, default_value = "keep")]
    on_exit: OnExitArg,
    /// Traffic of a pod whose veth exists before the agent has programmed the pod (it
    /// just started, or the agent is catching up): `deny` drops it until the pod's
    /// policies are in the kernel, so a pod a policy selects is isolated from its first
    /// packet; `allow` lets it through unjudged meanwhile.
    #[arg(long, value_enum, default_value = "deny")]
    unprogrammed: UnprogrammedArg,
    /// Name prefixes of pods' host-side interfaces, comma-separated: these get the
    /// programs the moment they appear (netlink), before their pod is known. Empty:
    /// attach only to interfaces of known pods.
    #[arg(
        long,
        value_name = "PREFIX,...",
        value_delimiter = ',',
        default_value = "veth,cali,lxc"
    )]
    pod_interface_prefix: Vec<String>,
    /// The skb mark bit that `from_pod` puts on a pod's connection to a Service, so
    /// that its egress is judged after kube-proxy's translation, on the real backend
    /// (hex or decimal). Pick a bit nothing else on the node uses: the default is clear
    /// of kube-proxy, Calico's iptables data plane (default mask), the AWS VPC CNI and
    /// Istio, not of Calico's eBPF data plane or Cilium (docs/SECURITY.md has the table).
    /// 0 turns it off: Service addresses are then judged as they are (nothing selects
    /// them).
    #[arg(long, value_name = "BIT", default_value = "0x400000", value_parser = parse_mark)]
    service_mark: u32,
    /// The node's exit devices (uplink, overlay such as flannel.1), comma-separated,
    /// where Service connections translated to backends on other nodes are judged.
    /// Default: every interface a route leads to that is neither loopback nor a pod's.
    #[arg(long, value_name = "IFACE,...", value_delimiter = ',')]
    exit_interface: Option<Vec<String>>,
    /// The cluster's Service ranges (kube-apiserver's --service-cluster-ip-range),
    /// comma-separated: addresses a pod dials there are judged after kube-proxy's
    /// translation. Needed only where the cluster has no ServiceCIDR objects
    /// (networking.k8s.io/v1) and for ClusterIPs the agent has not seen yet.
    #[arg(long, value_name = "CIDR,...", value_delimiter = ',')]
    service_cidr: Vec<ipnet::IpNet>,
    /// Keep every capability the agent was started with (by default it keeps only
    /// CAP_BPF and CAP_NET_ADMIN once the programs are loaded).
    #[arg(long)]
    keep_capabilities: bool,
    /// Log as JSON lines instead of text.
    #[arg(long)]
    log_json: bool,
}

/// A mark of one bit (or 0), in hex (`0x...`) or decimal.
fn parse_mark(text: &str) -> Result<u32, String> {
    let value = match text.strip_prefix("0x").or_else(|| text.strip_prefix("0X")) {
        Some(hex) => u32::from_str_radix(hex, 16),
        None => text.parse(),
    }
    .map_err(|error| format!("not a 32-bit number: {error}"))?;
    if value.count_ones() > 1 {
        return Err(format!(
            "{value:#x} has {} bits set; the Service mark is one bit",
            value.count_ones()
        ));
    }
    Ok(value)
}

#[derive(clap::ValueEnum, Clone, Copy, Debug)]
enum UnprogrammedArg {
    Deny,
    Allow,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug)]
enum OnExitArg {
    Keep,
    Detach,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let args = match cli.command {
        Some(Command::Run(args)) => *args,
        Some(Command::Flows(args)) => return runtime()?.block_on(flows(args)),
        Some(Command::Matrix(args)) => return matrix_command(&args),
        Some(Command::Explain(args)) => return explain_command(&args),
        Some(Command::Inspect(args)) => return inspect_command(&args),
        None => cli.run,
    };
    let filter = EnvFilter::try_from_env("NETPOL_LOG").unwrap_or_else(|_| {
        EnvFilter::new(format!(
            "info,{}",
            netpol_agent::source::kube::LOG_DIRECTIVES
        ))
    });
    // Colour only for a person at a terminal: a log file or a collector gets plain text.
    let subscriber = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_target(false)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stdout()));
    if args.log_json {
        subscriber.json().init();
    } else {
        subscriber.init();
    }

    unblock_stop_signals();
    let config = agent_config(&args);
    // Privileged start-up, on the only thread: load or adopt the programs, then keep
    // only the capabilities enforcement needs. Every thread started later (the async
    // runtime's included) inherits the reduced sets.
    let datapath = agent::open_datapath(&config).context("opening the datapath")?;
    if args.keep_capabilities {
        tracing::warn!("--keep-capabilities: running with every capability it was given");
    } else {
        let dropped = netpol_agent::privileges::keep_only(&netpol_agent::privileges::ENFORCEMENT)
            .context("dropping capabilities")?;
        tracing::info!(
            kept = ?netpol_agent::privileges::names(dropped.after),
            dropped = dropped.before.count_ones() - dropped.after.count_ones(),
            bounding_set = dropped.bounding,
            "capabilities dropped"
        );
    }
    runtime()?.block_on(serve(args, config, datapath))
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")
}

fn agent_config(args: &RunArgs) -> config::Config {
    let flow_socket = Some(
        args.flow_socket
            .clone()
            .unwrap_or_else(|| default_flow_socket(&args.bpffs_dir)),
    );
    let capacities = Capacities {
        endpoints: args.max_endpoints,
        ipcache: args.max_ipcache,
        policy: args.max_policy,
        policy_ranges: args.max_policy_ranges,
        conntrack: args.max_conntrack,
    };
    let on_exit = match args.on_exit {
        OnExitArg::Keep => config::OnExit::Keep,
        OnExitArg::Detach => config::OnExit::Detach,
    };
    let poll = Duration::from_millis(args.poll_ms.max(10));
    let resync = Duration::from_millis(args.resync_ms.max(100));
    config::Config {
        bpffs_dir: args.bpffs_dir.clone(),
        status_file: args.status_file.clone(),
        flow_socket,
        node_name: args.node_name.clone(),
        capacities,
        on_exit,
        audit: args.audit,
        deny_unprogrammed: matches!(args.unprogrammed, UnprogrammedArg::Deny),
        pod_interface_prefixes: args
            .pod_interface_prefix
            .iter()
            .map(|p| p.trim().to_owned())
            .filter(|p| !p.is_empty())
            .collect(),
        service_mark: args.service_mark,
        exit_interfaces: args.exit_interface.clone(),
        service_cidrs: args.service_cidr.clone(),
        poll,
        resync,
    }
}

async fn serve(
    args: RunArgs,
    config: config::Config,
    datapath: netpol_agent::datapath::Datapath,
) -> anyhow::Result<()> {
    let health = Arc::new(Health::default());
    if let Some(addr) = args.health_addr {
        netpol_agent::telemetry::health::serve(addr, health.clone()).await?;
    }
    if args.kube || args.kubeconfig.is_some() {
        let node_name = args
            .node_name
            .clone()
            .context("Kubernetes mode needs --node-name (or NODE_NAME, from the downward API)")?;
        let mut settings = Settings::new(node_name);
        settings.debounce = Duration::from_millis(args.debounce_ms);
        settings.max_delay = Duration::from_millis(args.max_delay_ms.max(args.debounce_ms));
        settings.events = !args.no_events;
        settings.instance = args.pod_name.clone();
        let kube = agent::KubeConfig {
            kubeconfig: args.kubeconfig.clone(),
            settings,
        };
        tracing::info!(
            kubeconfig = %kube.kubeconfig.as_deref().map_or_else(|| "in-cluster or inferred".into(), |p| p.display().to_string()),
            node = %args.node_name.as_deref().unwrap_or_default(),
            bpffs = %config.bpffs_dir.display(),
            "netpol-agent starting in Kubernetes mode"
        );
        agent::run_kube(config, datapath, kube, health, shutdown_signal())
            .await
            .context("agent stopped")?;
        tracing::info!("netpol-agent stopped");
        return Ok(());
    }
    let manifests = args
        .manifests
        .clone()
        .context("--manifests DIR (local mode) or --kube [--kubeconfig FILE] is required")?;
    tracing::info!(manifests = %manifests.display(), bpffs = %config.bpffs_dir.display(), "netpol-agent starting");
    agent::run_local(config, datapath, manifests, health, shutdown_signal())
        .await
        .context("agent stopped")?;
    tracing::info!("netpol-agent stopped");
    Ok(())
}

async fn flows(args: FlowsArgs) -> anyhow::Result<()> {
    let socket = args
        .socket
        .unwrap_or_else(|| default_flow_socket(&args.bpffs_dir));
    let filter = netpol_agent::telemetry::flowlog::FlowFilter {
        pod: args.pod,
        namespace: args.namespace,
        verdict: args.verdict,
        port: args.port,
    };
    let request = args
        .since
        .map(netpol_agent::telemetry::flowlog::FlowRequest::since)
        .unwrap_or_default();
    let mut out = std::io::stdout();
    netpol_agent::telemetry::flowlog::follow(&socket, &request, &filter, args.json, &mut out)
        .await
        .with_context(|| format!("following {} (is the agent running?)", socket.display()))
}

/// `netpol-agent inspect`: one JSON document, `{"kernel": ..., "status": ...}`.
fn inspect_command(args: &InspectArgs) -> anyhow::Result<()> {
    let kernel = netpol_agent::datapath::inspect::inspect(
        &args.bpffs_dir,
        args.src,
        args.dst,
        args.port.protocol,
        args.port.port,
    )
    .with_context(|| {
        format!(
            "reading the maps pinned under {} (is the agent running, and are you root?)",
            args.bpffs_dir.display()
        )
    })?;
    // The status may be missing (an agent without --status-file): the kernel still answers.
    let status = std::fs::read_to_string(&args.status_file)
        .ok()
        .and_then(|text| serde_json::from_str::<serde_json::Value>(&text).ok());
    println!(
        "{}",
        serde_json::to_string_pretty(&serde_json::json!({"kernel": kernel, "status": status}))?
    );
    Ok(())
}

/// One socket per agent instance: named after its bpffs directory.
fn default_flow_socket(bpffs_dir: &std::path::Path) -> PathBuf {
    let name = bpffs_dir
        .file_name()
        .map_or_else(|| "netpol".into(), |n| n.to_string_lossy().into_owned());
    PathBuf::from("/run/netpol").join(format!("{name}.sock"))
}

/// A parent may start the agent with SIGTERM blocked (a blocked signal mask is
/// inherited across exec): the signal would stay pending, and the agent would run on
/// until SIGKILL without its `--on-exit` clean-up. Called on the only thread, so every
/// thread started later inherits the unblocked mask.
fn unblock_stop_signals() {
    use nix::sys::signal::{SigSet, Signal};
    let mut set = SigSet::empty();
    set.add(Signal::SIGTERM);
    set.add(Signal::SIGINT);
    if let Err(error) = set.thread_unblock() {
        tracing::warn!(%error, "cannot unblock SIGTERM and SIGINT; they may not stop the agent");
    }
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

/// Reads and compiles the manifests; prints the diagnostics on stderr.
fn preview(args: &PreviewArgs) -> anyhow::Result<(Loaded, Compiled)> {
    let loaded = load_manifests(&args.manifests, &args.node_ips)?;
    let compiled = compile(&loaded.state, &Allocations::default());
    report_diagnostics(loaded.diagnostics.iter().chain(&compiled.diagnostics));
    Ok((loaded, compiled))
}

fn report_diagnostics<'a>(diagnostics: impl IntoIterator<Item = &'a netpol_compile::Diagnostic>) {
    for d in diagnostics {
        eprintln!("warning: {d}");
    }
}

fn matrix_command(args: &MatrixArgs) -> anyhow::Result<()> {
    let (loaded, compiled) = preview(&args.preview)?;
    let options = MatrixOptions {
        ports: args.port.clone(),
        all_destinations: args.all_destinations,
        family: args.family,
        pods: None,
    };
    let before = Matrix::new(&loaded.state, &compiled, &options);
    let report = if args.apply.is_empty() {
        MatrixReport::of(before)
    } else {
        let overlay = Overlay::read(&args.apply)?;
        report_diagnostics(&overlay.diagnostics);
        let state = overlay.apply_to(&loaded.state);
        let after_compiled = compile(&state, &compiled.allocations);
        // Invalid policies of the directory were reported with the first compile.
        report_diagnostics(after_compiled.diagnostics.iter().filter(|d| {
            !(matches!(d.object(), Some((Kind::NetworkPolicy, _)))
                && compiled.diagnostics.contains(d))
        }));
        let after = Matrix::new(&state, &after_compiled, &options);
        MatrixReport::applied(before, after)
    };
    if let Some(path) = &args.html {
        let mut source = format!("manifests {}", args.preview.manifests.display());
        for extra in &args.apply {
            source = format!("{source} + --apply {}", extra.display());
        }
        std::fs::write(path, matrix::html::render(&report, &source))
            .with_context(|| format!("writing {}", path.display()))?;
        let (tables, cells) = (report.matrix.tables.len(), report.matrix.cells().count());
        let plural = |n: usize| if n == 1 { "" } else { "s" };
        eprintln!(
            "wrote {}: {tables} table{}, {cells} cell{}",
            path.display(),
            plural(tables),
            plural(cells)
        );
    }
    if args.preview.json {
        emit(&format!("{}\n", serde_json::to_string_pretty(&report)?));
    } else if args.html.is_none() {
        emit(&matrix::render(
            &report.matrix,
            report.diff.as_ref(),
            Style { color: color() },
        ));
    }
    Ok(())
}

fn explain_command(args: &ExplainArgs) -> anyhow::Result<()> {
    let (loaded, compiled) = preview(&args.preview)?;
    if let Some(service) = netpol_agent::preview::explain::explain_service(
        &loaded.state,
        &compiled,
        &args.src,
        &args.dst,
        args.port,
    )? {
        if args.preview.json {
            emit(&format!("{}\n", serde_json::to_string_pretty(&service)?));
        } else {
            emit(&service.to_string());
        }
        return Ok(());
    }
    let explanations = explain_between(&loaded.state, &compiled, &args.src, &args.dst, args.port)?;
    if args.preview.json {
        let value = if explanations.len() == 1 {
            serde_json::to_value(&explanations[0])?
        } else {
            serde_json::to_value(&explanations)?
        };
        emit(&format!("{}\n", serde_json::to_string_pretty(&value)?));
    } else {
        let texts: Vec<String> = explanations.iter().map(ToString::to_string).collect();
        emit(&texts.join("\n"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_service_mark_is_the_one_the_programs_document() {
        let args = Cli::try_parse_from(["netpol-agent", "run"]).expect("defaults parse");
        let Some(Command::Run(run)) = args.command else {
            panic!("not a run");
        };
        assert_eq!(run.service_mark, netpol_common::SERVICE_MARK_DEFAULT);
    }

    #[test]
    fn a_service_mark_is_one_bit_in_hex_or_decimal() {
        assert_eq!(parse_mark("0x10"), Ok(16));
        assert_eq!(parse_mark("64"), Ok(64));
        assert_eq!(parse_mark("0"), Ok(0));
        assert!(parse_mark("0x4001").unwrap_err().contains("one bit"));
        assert!(parse_mark("mark").is_err());
    }
}
