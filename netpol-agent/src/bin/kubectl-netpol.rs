//! `kubectl netpol`: the preview commands (`explain`, `matrix`) over the live cluster of
//! the user's kubeconfig, read-only (list requests only), and `flows`, the agents' flow
//! logs merged (over pods/exec). A kubectl plugin: installed as
//! `kubectl-netpol` on the PATH, kubectl runs it for `kubectl netpol ...`.
//!
//! Thin: parses the arguments and prints; the work is `netpol_agent::preview::plugin`.

use std::net::IpAddr;
use std::path::PathBuf;

use anyhow::Context as _;
use clap::{Args, Parser, Subcommand, ValueEnum};
use netpol_agent::preview::PortProtocol;
use netpol_agent::preview::cluster::{self, Connection};
use netpol_agent::preview::matrix::{AddressFamily, MatrixOptions, Style};
use netpol_agent::preview::plugin::{self, ExplainRequest, MatrixRequest, Namespaces};
use netpol_agent::preview::selector::LabelSelector;
use netpol_agent::preview::terminal::{color, emit};
use tracing_subscriber::EnvFilter;

#[derive(Parser, Debug)]
#[command(
    name = "kubectl-netpol",
    bin_name = "kubectl netpol",
    version,
    about = "NetworkPolicy and ClusterNetworkPolicy answers from the live cluster",
    long_about = "NetworkPolicy and ClusterNetworkPolicy answers from the live cluster: who can \
                  reach whom, and which rule decides, computed by netpol's compiler from one \
                  list of Namespaces, Pods, NetworkPolicies, ClusterNetworkPolicies, Nodes, \
                  Services, EndpointSlices and ServiceCIDRs (explain and matrix are read-only: \
                  list requests only; every answer says which objects it was computed from, \
                  each list's resourceVersion and count). flows follows the agents' flow \
                  logs on every node, read over pods/exec."
)]
struct Cli {
    #[command(flatten)]
    cluster: ClusterArgs,
    #[command(subcommand)]
    command: Command,
}

/// What kubectl's own flags mean here; accepted before or after the subcommand.
#[derive(Args, Debug)]
struct ClusterArgs {
    /// The kubeconfig file [default: KUBECONFIG, then ~/.kube/config, then the
    /// in-cluster configuration of a pod].
    #[arg(long, global = true, value_name = "FILE")]
    kubeconfig: Option<PathBuf>,
    /// The kubeconfig context [default: its current context].
    #[arg(long, global = true, value_name = "NAME")]
    context: Option<String>,
    /// explain: the namespace of bare pod (and `svc/NAME`) names; matrix: a namespace
    /// to show (repeatable) [default: the context's namespace].
    #[arg(short = 'n', long = "namespace", global = true, value_name = "NS")]
    namespaces: Vec<String>,
    /// Output format.
    #[arg(short = 'o', long, global = true, value_enum, default_value_t = Output::Text)]
    output: Output,
    /// An address of the node: traffic from it to pods always passes (repeatable).
    /// explain without it: `node` is the node of the pod at the other end.
    #[arg(long = "node-ip", global = true, value_name = "IP")]
    node_ips: Vec<IpAddr>,
}

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
enum Output {
    Text,
    Json,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Explain, step by step, whether SRC can open a connection to DST on PORT/PROTO, and
    /// which policy rule allows it or why none does.
    Explain(ExplainArgs),
    /// Who can reach whom: one table per port, rows are source pods, columns the pods
    /// that declare the port; with --apply, the cells a policy would change.
    Matrix(MatrixArgs),
    /// Follow the flow logs of the agents on every node (or --node), merged: drops and
    /// new connections with the deciding rule, read from each agent over pods/exec.
    Flows(FlowsArgs),
}

#[derive(Args, Debug)]
struct FlowsArgs {
    /// Only the agents of these nodes (repeatable) [default: every node].
    #[arg(long = "node", value_name = "NODE")]
    nodes: Vec<String>,
    /// First what each agent kept from this long ago on (90s, 5m, 2h), then live.
    #[arg(long, value_name = "DURATION", value_parser = netpol_agent::telemetry::flowlog::parse_since)]
    since: Option<std::time::Duration>,
    /// Only flows from, to or decided for this pod (NS/NAME, or NAME in -n's namespace).
    #[arg(long, value_name = "POD")]
    pod: Option<String>,
    /// Only this verdict; staged-drop and staged-allow: what staged policies would change.
    #[arg(long, value_parser = ["dropped", "allowed", "audit", "staged-drop", "staged-allow"])]
    verdict: Option<String>,
    /// Only this destination port.
    #[arg(long)]
    port: Option<u16>,
    #[command(flatten)]
    agents: AgentArgs,
}

/// Where the agents are (flows, explain --kernel).
#[derive(Args, Debug)]
struct AgentArgs {
    /// The agents' namespace.
    #[arg(long, value_name = "NS", default_value = "kube-system")]
    agent_namespace: String,
    /// The agent pods' label selector.
    #[arg(
        long,
        value_name = "SELECTOR",
        default_value = "app.kubernetes.io/name=netpol-agent"
    )]
    agent_selector: String,
}

impl AgentArgs {
    fn agents(&self) -> netpol_agent::preview::flows::Agents {
        netpol_agent::preview::flows::Agents {
            namespace: self.agent_namespace.clone(),
            selector: self.agent_selector.clone(),
            ..Default::default()
        }
    }
}

#[derive(Args, Debug)]
struct ExplainArgs {
    /// Source: a pod (NAME in -n's namespace, or NS/NAME), `node`, or an IP address.
    src: String,
    /// Destination: as SRC, or a Service (`svc/NAME`, `svc/NS/NAME`, or its address),
    /// explained for each of its backends (PORT/PROTO is then the Service port).
    dst: String,
    /// Destination port and protocol, e.g. 80/TCP, 53/UDP, ICMP.
    #[arg(value_name = "PORT/PROTO")]
    port: PortProtocol,
    /// Also ask the agents on the two pods' nodes what their kernels hold for the
    /// connection (`netpol-agent inspect` over pods/exec), and say where they disagree
    /// with the cluster.
    #[arg(long)]
    kernel: bool,
    #[command(flatten)]
    agents: AgentArgs,
}

#[derive(Args, Debug)]
struct MatrixArgs {
    /// Show the pods of every namespace.
    #[arg(short = 'A', long)]
    all_namespaces: bool,
    /// Show only the pods this label selector chooses, e.g. `app=web,tier in (a,b)`.
    #[arg(short = 'l', long, value_name = "SELECTOR")]
    selector: Option<LabelSelector>,
    /// NetworkPolicies and ClusterNetworkPolicies to create or replace (files or
    /// directories; repeatable, in order): shows the cells they would change, before
    /// they are applied.
    #[arg(long, value_name = "FILE_OR_DIR")]
    apply: Vec<PathBuf>,
    /// Only these ports, e.g. 80/TCP, 53/UDP (repeatable). Default: every declared port.
    #[arg(long, value_name = "PORT/PROTO")]
    port: Vec<PortProtocol>,
    /// Every pod shown is a destination of every port, whether it declares it or not.
    #[arg(long)]
    all_destinations: bool,
    /// Only this address family (ipv4 or ipv6). Default: both, a cell allowed over one
    /// and not the other showing `~`.
    #[arg(long, value_name = "ipv4|ipv6")]
    family: Option<AddressFamily>,
}

fn main() {
    let cli = Cli::parse();
    if let Err(error) = start(cli) {
        eprintln!("error: {}", one_line(&error));
        std::process::exit(1);
    }
}

/// The error and its causes on one line, each cause once (most errors here already
/// quote their source).
fn one_line(error: &anyhow::Error) -> String {
    let mut out = error.to_string();
    for cause in error.chain().skip(1) {
        let text = cause.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
    }
    out
}

fn start(cli: Cli) -> anyhow::Result<()> {
    // kube-client logs a failed upgrade (an exec) as an error of its own; the command
    // reports every failure itself, once.
    let filter = EnvFilter::try_from_env("NETPOL_LOG")
        .unwrap_or_else(|_| EnvFilter::new("warn,kube_client=off"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_target(false)
        .with_writer(std::io::stderr)
        .init();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(run(cli))
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let args = &cli.cluster;
    match &cli.command {
        Command::Explain(explain) => {
            let namespace = match args.namespaces.as_slice() {
                [] => None,
                [one] => Some(one.clone()),
                [..] => anyhow::bail!("explain takes one namespace (-n), not several"),
            };
            let connection = connect(args).await?;
            let request = ExplainRequest {
                src: explain.src.clone(),
                dst: explain.dst.clone(),
                port: explain.port,
                namespace,
                node_ips: args.node_ips.clone(),
            };
            let answer = plugin::explain(&connection, &request).await?;
            warn(&answer.warnings);
            let checks = match (explain.kernel, &answer.explained) {
                (false, _) => None,
                (true, plugin::Explained::Flows(flows)) => {
                    let agents = explain.agents.agents();
                    let mut checks = Vec::new();
                    for flow in flows {
                        checks.extend(
                            netpol_agent::preview::kernel::check(
                                &connection,
                                &agents,
                                flow,
                                &answer.nodes,
                                &answer.read,
                            )
                            .await?,
                        );
                    }
                    Some(checks)
                }
                (true, plugin::Explained::Service(_)) => anyhow::bail!(
                    "--kernel explains a connection to a pod; name the backend pod instead of \
                     the Service"
                ),
            };
            match args.output {
                Output::Json => {
                    let mut value = answer.json();
                    if let Some(checks) = &checks {
                        value["kernel"] = serde_json::to_value(checks)?;
                    }
                    emit(&format!("{}\n", serde_json::to_string_pretty(&value)?));
                }
                Output::Text => {
                    emit(&answer.text());
                    if let Some(checks) = &checks {
                        emit(&format!(
                            "\n{}",
                            netpol_agent::preview::kernel::text(checks)
                        ));
                    }
                }
            }
        }
        Command::Matrix(matrix) => {
            let namespaces = match (matrix.all_namespaces, args.namespaces.as_slice()) {
                (true, []) => Namespaces::All,
                (true, _) => anyhow::bail!("-A (--all-namespaces) and -n exclude each other"),
                (false, []) => Namespaces::Context,
                (false, list) => Namespaces::Only(list.to_vec()),
            };
            let request = MatrixRequest {
                namespaces,
                selector: matrix.selector.clone(),
                apply: matrix.apply.clone(),
                options: MatrixOptions {
                    ports: matrix.port.clone(),
                    all_destinations: matrix.all_destinations,
                    family: matrix.family,
                    pods: None,
                },
                node_ips: args.node_ips.clone(),
            };
            let connection = connect(args).await?;
            let answer = plugin::matrix(&connection, &request).await?;
            warn(&answer.warnings);
            match args.output {
                Output::Json => emit(&format!(
                    "{}\n",
                    serde_json::to_string_pretty(&answer.json())?
                )),
                Output::Text => emit(&answer.text(Style { color: color() })),
            }
        }
        Command::Flows(flows) => return follow_flows(args, flows).await,
    }
    Ok(())
}

/// `kubectl netpol flows`: every agent's records as they come, one line each (or one
/// JSON object with its `node`); what cannot be read is said on stderr, and fails the
/// command once every stream has ended.
async fn follow_flows(args: &ClusterArgs, flows: &FlowsArgs) -> anyhow::Result<()> {
    use netpol_agent::preview::flows::{self, FlowsEvent, FlowsRequest};
    use netpol_agent::telemetry::flowlog::FlowFilter;
    let namespace = match args.namespaces.as_slice() {
        [] => None,
        [one] => Some(one.clone()),
        [..] => anyhow::bail!("flows takes one namespace (-n), not several"),
    };
    let pod = flows
        .pod
        .as_ref()
        .map(|pod| match (&namespace, pod.contains('/')) {
            (Some(ns), false) => format!("{ns}/{pod}"),
            _ => pod.clone(),
        });
    let request = FlowsRequest {
        nodes: flows.nodes.clone(),
        since: flows.since,
        filter: FlowFilter {
            // A pod named alone is in -n's namespace; -n alone filters by namespace.
            namespace: namespace.filter(|_| pod.is_none()),
            pod,
            verdict: flows.verdict.clone(),
            port: flows.port,
        },
        agents: flows.agents.agents(),
    };
    let connection = connect(args).await?;
    let (sink, mut events) = tokio::sync::mpsc::channel(1024);
    let follow = flows::follow(&connection, &request, sink);
    let print = async {
        let mut unreadable = Vec::new();
        while let Some(event) = events.recv().await {
            match event {
                FlowsEvent::Record { node, record } => match args.output {
                    Output::Json => {
                        let mut value = serde_json::to_value(&record).unwrap_or_default();
                        value["node"] = serde_json::Value::String(node);
                        emit(&format!("{value}\n"));
                    }
                    Output::Text => emit(&format!(
                        "{} {node:<16} {}\n",
                        flows::time_of_day(record.wall),
                        record.summary()
                    )),
                },
                FlowsEvent::Lagged { node, skipped } => {
                    eprintln!(
                        "warning: node {node}: {skipped} records skipped (its agent's stream fell behind)"
                    );
                }
                FlowsEvent::Unreachable { node, pod, reason } => {
                    match pod {
                        Some(pod) => eprintln!(
                            "error: node {node}: its agent {pod} cannot be read: {reason}"
                        ),
                        None => eprintln!("error: node {node}: {reason}"),
                    }
                    unreadable.push(node);
                }
                FlowsEvent::Ended { node, reason } => {
                    eprintln!("warning: node {node}: {reason}");
                }
            }
        }
        unreadable
    };
    let (followed, unreadable) = tokio::join!(follow, print);
    followed?;
    if !unreadable.is_empty() {
        anyhow::bail!("the flows of {} could not be read", unreadable.join(", "));
    }
    Ok(())
}

async fn connect(args: &ClusterArgs) -> anyhow::Result<Connection> {
    Ok(cluster::connect(args.kubeconfig.as_deref(), args.context.as_deref()).await?)
}

fn warn(warnings: &[String]) {
    for warning in warnings {
        eprintln!("warning: {warning}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kubectl_flags_are_accepted_before_and_after_the_subcommand() {
        let cli = Cli::try_parse_from([
            "kubectl-netpol",
            "--context",
            "kind-netpol",
            "matrix",
            "-n",
            "x",
            "--namespace",
            "y",
            "-o",
            "json",
            "-l",
            "app=web",
        ])
        .unwrap();
        assert_eq!(cli.cluster.context.as_deref(), Some("kind-netpol"));
        assert_eq!(cli.cluster.namespaces, ["x", "y"]);
        assert_eq!(cli.cluster.output, Output::Json);
        let Command::Matrix(matrix) = cli.command else {
            panic!("not matrix");
        };
        assert_eq!(matrix.selector.unwrap().to_string(), "app=web");

        let cli = Cli::try_parse_from([
            "kubectl-netpol",
            "-n",
            "x",
            "explain",
            "a",
            "b",
            "80/TCP",
            "--kubeconfig",
            "/tmp/k",
        ])
        .unwrap();
        assert_eq!(cli.cluster.namespaces, ["x"]);
        assert_eq!(cli.cluster.kubeconfig, Some(PathBuf::from("/tmp/k")));
        assert!(matches!(cli.command, Command::Explain(_)));
    }

    #[test]
    fn flows_takes_nodes_since_and_the_filters_of_netpol_agent_flows() {
        let cli = Cli::try_parse_from([
            "kubectl-netpol",
            "flows",
            "--node",
            "n1",
            "--node",
            "n2",
            "--since",
            "5m",
            "--verdict",
            "staged-drop",
            "-o",
            "json",
        ])
        .unwrap();
        let Command::Flows(flows) = cli.command else {
            panic!("not flows");
        };
        assert_eq!(flows.nodes, ["n1", "n2"]);
        assert_eq!(flows.since, Some(std::time::Duration::from_secs(300)));
        assert_eq!(flows.verdict.as_deref(), Some("staged-drop"));
        assert_eq!(flows.agents.agents().namespace, "kube-system");
        assert!(Cli::try_parse_from(["kubectl-netpol", "flows", "--since", "5d"]).is_err());
        assert!(Cli::try_parse_from(["kubectl-netpol", "flows", "--verdict", "maybe"]).is_err());
    }

    #[test]
    fn an_error_reads_as_one_line_each_cause_once() {
        let inner = std::io::Error::other("connection refused");
        let error = anyhow::Error::new(inner)
            .context("client error (Connect)")
            .context("listing pods: client error (Connect)");
        assert_eq!(
            one_line(&error),
            "listing pods: client error (Connect): connection refused"
        );
    }

    #[test]
    fn a_bad_selector_or_output_is_refused_while_parsing() {
        assert!(Cli::try_parse_from(["kubectl-netpol", "matrix", "-l", "a in (b"]).is_err());
        assert!(Cli::try_parse_from(["kubectl-netpol", "matrix", "-o", "yaml"]).is_err());
    }
}
