//! How the agent runs, whatever the source: what `main.rs` reads from the command line
//! and both the run ([`crate::agent`]) and the loop ([`crate::reconcile`]) follow.

use std::path::PathBuf;
use std::time::Duration;

use crate::datapath::Capacities;

/// How the agent runs, whatever the source.
#[derive(Clone, Debug)]
pub struct Config {
    pub bpffs_dir: PathBuf,
    pub status_file: Option<PathBuf>,
    /// Unix socket serving the flow log (`netpol-agent flows`); `None`: no flow log.
    pub flow_socket: Option<PathBuf>,
    pub node_name: Option<String>,
    pub capacities: Capacities,
    /// What a clean exit (SIGTERM, Ctrl-C) does to the kernel state.
    pub on_exit: OnExit,
    /// Audit mode for every pod: would-be drops are logged and counted, not dropped.
    pub audit: bool,
    /// Traffic on an attached interface whose pod is not programmed yet is dropped
    /// (`true`) or passed unjudged.
    pub deny_unprogrammed: bool,
    /// Interfaces named with one of these prefixes get the programs when they appear.
    pub pod_interface_prefixes: Vec<String>,
    /// The skb mark bit(s) of pods' Service connections, judged after kube-proxy's
    /// translation (0: off).
    pub service_mark: u32,
    /// `Some`: the node's exit devices, by name; `None`: discovered from the routes.
    pub exit_interfaces: Option<Vec<String>>,
    /// Service ranges (`--service-cidr`), beside the cluster's ServiceCIDR objects.
    pub service_cidrs: Vec<ipnet::IpNet>,
    /// Longest wait for a change before the loop looks at interfaces again.
    pub poll: Duration,
    pub resync: Duration,
}

/// What happens to programs, links and maps when the agent exits cleanly.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum OnExit {
    /// Keep them pinned and attached: policies stay enforced while the agent is away
    /// (restarts, upgrades), and the next agent adopts them without a gap.
    #[default]
    Keep,
    /// Detach from every interface and remove every pinned object (uninstall).
    Detach,
}
