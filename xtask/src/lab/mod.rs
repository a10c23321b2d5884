//! Emulated clusters made of network namespaces, for demos, tier-3 tests, the
//! conformance runner and benchmarks.
//!
//! ```text
//!                        node netns  np<pid>-<lab>-node      (node 0, "lab-node")
//!   pod netns            (forwarding on; node address 172.31.255.1 on lo)
//!   np<pid>-<lab>-p<i>
//!   eth0 10.0.0.i/32 ──veth── v<i>   proxy_arp (no delay), fe80::1/64,
//!                                    route 10.0.0.i/32 dev v<i>
//!   default via 169.254.1.1 onlink
//!   default via fe80::1
//!
//!   host netns           (an endpoint outside the cluster: no programs, no manifest)
//!   np<pid>-<lab>-h<i>
//!   eth0 <ip>/32 ──────veth── x<i>
//!
//!                                    ul1  172.31.254.1/30, fd31:ff:0::1/64
//!                                     │   route <node 1's pods, hosts, node address>
//!                                     │         via 172.31.254.2 src 172.31.255.1
//!                                   veth (underlay)
//!                                     │
//!                        node netns  ul0  172.31.254.2/30, fd31:ff:0::2/64
//!                        np<pid>-<lab>-node1                 (node 1, "lab-node-1")
//!                        (node address 172.31.255.2 on lo; its own pods v<i>, hosts x<i>)
//! ```
//!
//! Pods are routed Calico-style: a /32 (and /128) on the pod's `eth0`, a default route to
//! the link-local gateway 169.254.1.1 answered by proxy ARP on the host veth (and to
//! `fe80::1` for IPv6), and a host route per pod in the node namespace. The agent runs
//! in the node namespace and attaches to the host veths.
//!
//! [`Lab::with_nodes`] makes several nodes (one agent each, see
//! [`AgentProcess::start_on`]): node `n` has its own namespace, name ([`Lab::node_name`])
//! and addresses, and every pair of nodes is joined by an underlay veth `ul<m>` (named
//! after the node at the other end: never the agents' pod prefix `v`) with a /30 and a
//! /64, plus a route on every other node for each pod, host and node address (no
//! encapsulation, no NAT: a pod's packets reach a remote pod with its own source address).
//! [`PodSpec::on_node`] and [`Lab::add_host_on`] place endpoints; the default is node 0,
//! so [`Lab::new`] is the single-node lab. Probe endpoint `node` is node 0 and `node<n>`
//! node `n`; a node's traffic is host traffic (always allowed) only towards its own pods,
//! and a peer like any outside address elsewhere, as in Kubernetes.
//!
//! Every pod and host serves its declared ports from this process (TCP: accept and send
//! one greeting byte; UDP: echo), and [`Lab::probe`] / [`Lab::probe_all`] send real
//! traffic between them. Nothing ever touches the root network namespace, and
//! everything is removed when the [`Lab`] is dropped, panics included. Leftovers of
//! crashed runs are swept by the next [`Lab::new`]. An [`AgentProcess`] must be dropped
//! before its lab: declare it after the lab.
//!
//! Typical use:
//!
//! ```no_run
//! use std::time::Duration;
//! use xtask::lab::{AgentProcess, Lab, ManifestDir, PodSpec, Port, Probe};
//! # fn main() -> anyhow::Result<()> {
//! let mut lab = Lab::new()?;
//! lab.set_namespace_labels("x", [("team", "a")]);
//! lab.add_pod(PodSpec::new("x", "a").label("pod", "a").port(Port::tcp(80)))?;
//! lab.add_pod(PodSpec::new("x", "b").label("pod", "b").port(Port::tcp(80)))?;
//! let mut manifests = ManifestDir::create(lab.workdir().join("manifests"))?;
//! let generation = manifests.write(&lab, "")?;
//! let mut agent = AgentProcess::start(&lab, "target/release/netpol-agent".as_ref(), &manifests)?;
//! agent.wait_generation(generation, Duration::from_secs(10))?;
//! let result = lab.probe(&Probe::tcp("x/a", "x/b", 80), Duration::from_secs(1))?;
//! assert!(result.outcome.is_allowed());
//! # Ok(()) }
//! ```

mod agent;
mod manifest;
pub mod netns;
mod probe;
mod sctp;
mod serve;

use std::collections::BTreeMap;
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};

use anyhow::{Context, Result, bail};

pub use agent::{AgentProcess, AgentStatus};
pub use manifest::ManifestDir;
pub use netns::NetnsWorker;
pub use probe::{Outcome, Probe, ProbeResult};

/// The (first) node's name, as written into `spec.nodeName` and passed as `--node-name`;
/// node `n` > 0 is `lab-node-<n>` ([`Lab::node_name`]).
pub const NODE_NAME: &str = "lab-node";
/// Probe endpoint id of the (first) node's own network namespace; node `n` > 0 is
/// `node<n>` ([`Lab::node_endpoint`]).
pub const NODE: &str = "node";
/// IPv4 address of the (first) node (on loopback inside the node namespace); node `n`
/// has 172.31.255.(n+1).
pub const NODE_IPV4: Ipv4Addr = Ipv4Addr::new(172, 31, 255, 1);
/// IPv6 address of the (first) node; node `n` has fd31::(n+1).
pub const NODE_IPV6: Ipv6Addr = Ipv6Addr::new(0xfd31, 0, 0, 0, 0, 0, 0, 1);
/// Most nodes [`Lab::with_nodes`] makes (every pair gets an underlay link).
pub const MAX_NODES: usize = 8;
/// Gateway that pods route through (answered by proxy ARP on the host veth).
pub const GATEWAY_IPV4: Ipv4Addr = Ipv4Addr::new(169, 254, 1, 1);
/// IPv6 gateway: the host veth's link-local address.
pub const GATEWAY_IPV6: Ipv6Addr = Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 1);

/// Transport protocol of a port or probe.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Protocol {
    Tcp,
    Udp,
    /// Crafted INIT / INIT-ACK over raw sockets (see `sctp.rs`).
    Sctp,
}

impl Protocol {
    /// Kubernetes spelling: `TCP` / `UDP`.
    pub fn k8s(self) -> &'static str {
        match self {
            Protocol::Tcp => "TCP",
            Protocol::Udp => "UDP",
            Protocol::Sctp => "SCTP",
        }
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.k8s())
    }
}

/// IP family of a probe.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub enum Family {
    #[default]
    V4,
    V6,
}

/// A port an endpoint serves (a container port for pods).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Port {
    pub name: Option<String>,
    pub port: u16,
    pub protocol: Protocol,
}

impl Port {
    pub fn tcp(port: u16) -> Self {
        Self {
            name: None,
            port,
            protocol: Protocol::Tcp,
        }
    }

    pub fn udp(port: u16) -> Self {
        Self {
            name: None,
            port,
            protocol: Protocol::Udp,
        }
    }

    pub fn sctp(port: u16) -> Self {
        Self {
            name: None,
            port,
            protocol: Protocol::Sctp,
        }
    }

    /// Gives the port a name (`containerPorts[].name`), for named-port policies.
    pub fn named(mut self, name: impl Into<String>) -> Self {
        self.name = Some(name.into());
        self
    }
}

/// Labels, sorted for stable output.
pub type Labels = BTreeMap<String, String>;

fn labels<K: Into<String>, V: Into<String>>(kv: impl IntoIterator<Item = (K, V)>) -> Labels {
    kv.into_iter().map(|(k, v)| (k.into(), v.into())).collect()
}

/// What to create with [`Lab::add_pod`].
#[derive(Clone, Debug)]
pub struct PodSpec {
    pub namespace: String,
    pub name: String,
    pub labels: Labels,
    pub ports: Vec<Port>,
    /// `None`: the lab picks the next free address in 10.0.0.0/8.
    pub ipv4: Option<Ipv4Addr>,
    /// `None`: IPv4 only.
    pub ipv6: Option<Ipv6Addr>,
    /// Index of the node the pod runs on (0 unless [`PodSpec::on_node`]).
    pub node: usize,
}

impl PodSpec {
    pub fn new(namespace: impl Into<String>, name: impl Into<String>) -> Self {
        Self {
            namespace: namespace.into(),
            name: name.into(),
            labels: Labels::new(),
            ports: Vec::new(),
            ipv4: None,
            ipv6: None,
            node: 0,
        }
    }

    /// Runs the pod on node `node` of a [`Lab::with_nodes`] lab.
    pub fn on_node(mut self, node: usize) -> Self {
        self.node = node;
        self
    }

    pub fn label(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.labels.insert(key.into(), value.into());
        self
    }

    pub fn port(mut self, port: Port) -> Self {
        self.ports.push(port);
        self
    }

    pub fn ports(mut self, ports: impl IntoIterator<Item = Port>) -> Self {
        self.ports.extend(ports);
        self
    }

    pub fn ipv4(mut self, ip: Ipv4Addr) -> Self {
        self.ipv4 = Some(ip);
        self
    }

    pub fn ipv6(mut self, ip: Ipv6Addr) -> Self {
        self.ipv6 = Some(ip);
        self
    }
}

/// A pod of the emulated cluster.
#[derive(Debug)]
pub struct Pod {
    pub namespace: String,
    pub name: String,
    pub labels: Labels,
    pub ports: Vec<Port>,
    pub ipv4: Ipv4Addr,
    pub ipv6: Option<Ipv6Addr>,
    /// The pod's network namespace.
    pub netns: String,
    /// Host-side veth, inside the node namespace.
    pub host_if: String,
    /// Index of its node in [`Lab::nodes`].
    pub node: usize,
    worker: Arc<NetnsWorker>,
}

impl Pod {
    /// `namespace/name`, the pod's probe endpoint id.
    pub fn id(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }
}

/// An endpoint outside the cluster ("host/NAME" in probes).
#[derive(Debug)]
pub struct Host {
    pub name: String,
    pub ip: IpAddr,
    pub ports: Vec<Port>,
    pub netns: String,
    /// The node-side veth towards the host.
    pub node_if: String,
    /// Index of the node it hangs off in [`Lab::nodes`].
    pub node: usize,
    worker: Arc<NetnsWorker>,
}

/// An emulated node: a network namespace that forwards between its pods' veths, its
/// hosts' veths and the underlay links to the other nodes.
#[derive(Debug)]
pub struct Node {
    /// `spec.nodeName` of its pods, and its agent's `--node-name`.
    pub name: String,
    pub netns: String,
    /// The node's addresses (on loopback).
    pub ipv4: Ipv4Addr,
    pub ipv6: Ipv6Addr,
    worker: Arc<NetnsWorker>,
}

static LABS_IN_PROCESS: AtomicU32 = AtomicU32::new(0);

/// An emulated cluster (one node unless [`Lab::with_nodes`]) with its pods and external
/// hosts. Dropping it removes everything.
pub struct Lab {
    id: String,
    /// `np<pid>-<seq>`: prefix of every namespace of this lab (the sweep parses the pid).
    netns_prefix: String,
    nodes: Vec<Node>,
    namespaces: BTreeMap<String, Labels>,
    pods: Vec<Pod>,
    hosts: Vec<Host>,
    created_netns: Vec<String>,
    next_index: u32,
    workdir: PathBuf,
    keep_workdir: bool,
    servers: serve::Servers,
    // Declared last: dropped after the servers' sockets and the workers.
    runtime: Option<tokio::runtime::Runtime>,
}

impl fmt::Debug for Lab {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Lab")
            .field("id", &self.id)
            .field("nodes", &self.nodes.len())
            .field("pods", &self.pods.len())
            .field("hosts", &self.hosts.len())
            .finish()
    }
}

impl Lab {
    /// Sweeps leftovers of dead runs, then creates the node namespace: loopback up,
    /// IPv4/IPv6 forwarding, DAD off, and the node addresses on loopback.
    pub fn new() -> Result<Self> {
        Self::with_nodes(1)
    }

    /// [`Lab::new`] with `nodes` nodes (1 to [`MAX_NODES`]), every pair joined by an
    /// underlay link (see the module documentation).
    pub fn with_nodes(nodes: usize) -> Result<Self> {
        if !(1..=MAX_NODES).contains(&nodes) {
            bail!("a lab has 1 to {MAX_NODES} nodes, not {nodes}");
        }
        if !nix::unistd::geteuid().is_root() {
            bail!("the lab needs root (network namespaces, veths, BPF)");
        }
        let swept = netns::sweep_stale();
        for ns in &swept.namespaces {
            eprintln!("lab: removed stale network namespace {ns}");
        }
        for d in &swept.dirs {
            eprintln!("lab: removed stale directory {}", d.display());
        }

        let pid = std::process::id();
        let seq = LABS_IN_PROCESS.fetch_add(1, Ordering::Relaxed);
        let id = format!("lab{seq}-{pid}");
        let netns_prefix = format!("np{pid}-{seq}");
        let workdir = std::env::temp_dir().join(format!("netpol-{id}"));

        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("lab-io")
            .enable_all()
            .build()
            .context("starting the lab's tokio runtime")?;

        // From here on, Drop cleans up whatever exists.
        let mut lab = Lab {
            id,
            netns_prefix,
            nodes: Vec::new(),
            namespaces: BTreeMap::new(),
            pods: Vec::new(),
            hosts: Vec::new(),
            created_netns: Vec::new(),
            next_index: 1,
            workdir,
            keep_workdir: false,
            servers: serve::Servers::default(),
            runtime: Some(runtime),
        };
        std::fs::create_dir_all(&lab.workdir)
            .with_context(|| format!("creating {}", lab.workdir.display()))?;
        for n in 0..nodes {
            lab.add_node(n)
                .with_context(|| format!("creating node {n}"))?;
        }
        for b in 0..nodes {
            for a in 0..b {
                lab.link_nodes(a, b)
                    .with_context(|| format!("linking nodes {a} and {b}"))?;
            }
        }
        Ok(lab)
    }

    /// Creates node `n`'s namespace: forwarding on, DAD off, its addresses on loopback.
    fn add_node(&mut self, n: usize) -> Result<()> {
        let netns = match n {
            0 => format!("{}-node", self.netns_prefix),
            _ => format!("{}-node{n}", self.netns_prefix),
        };
        netns::create_netns(&netns)?;
        self.created_netns.push(netns.clone());
        let worker = Arc::new(NetnsWorker::spawn(&netns)?);
        worker.run(|| -> Result<()> {
            netns::sysctl("net/ipv4/ip_forward", "1")?;
            netns::sysctl("net/ipv6/conf/all/forwarding", "1")?;
            netns::sysctl("net/ipv6/conf/default/forwarding", "1")?;
            netns::sysctl("net/ipv6/conf/all/accept_dad", "0")?;
            netns::sysctl("net/ipv6/conf/default/accept_dad", "0")?;
            Ok(())
        })??;
        let (ipv4, ipv6) = (Self::node_ipv4(n), Self::node_ipv6(n));
        netns::ip_batch(
            Some(&netns),
            &[
                "link set lo up".into(),
                // The node's own addresses live on loopback (no dummy driver needed).
                format!("addr add {ipv4}/32 dev lo"),
                format!("addr add {ipv6}/128 dev lo nodad"),
                // Proxy ARP answers for the pods' gateway only if the node routes it
                // out of another interface than the asking veth.
                format!("route add {GATEWAY_IPV4}/32 dev lo"),
            ],
        )
        .context("setting up the node namespace")?;
        self.nodes.push(Node {
            name: Self::node_name(n),
            netns,
            ipv4,
            ipv6,
            worker,
        });
        Ok(())
    }

    /// Addresses of the underlay link between nodes `a` and `b`, as seen from `a`:
    /// ((own IPv4, peer IPv4), (own IPv6, peer IPv6)). Link `k` (one per pair) has
    /// 172.31.254.4k/30 and fd31:ff:k::/64; the lower node index takes `.1`/`::1`.
    fn underlay_addrs(a: usize, b: usize) -> ((Ipv4Addr, Ipv4Addr), (Ipv6Addr, Ipv6Addr)) {
        let (lo, hi) = (a.min(b), a.max(b));
        let k = hi * (hi - 1) / 2 + lo;
        let (own, peer) = if a < b { (1, 2) } else { (2, 1) };
        let v4 = |host: usize| Ipv4Addr::new(172, 31, 254, (4 * k + host) as u8);
        let v6 = |host: usize| Ipv6Addr::new(0xfd31, 0xff, k as u16, 0, 0, 0, 0, host as u16);
        ((v4(own), v4(peer)), (v6(own), v6(peer)))
    }

    /// Joins nodes `a` and `b` with a veth (`ul<b>` in `a`, `ul<a>` in `b`), addresses
    /// on both ends and routes to each other's node addresses.
    fn link_nodes(&mut self, a: usize, b: usize) -> Result<()> {
        netns::ip_batch(
            Some(&self.nodes[a].netns),
            &[format!(
                "link add ul{b} type veth peer name ul{a} netns {}",
                self.nodes[b].netns
            )],
        )?;
        for (me, peer) in [(a, b), (b, a)] {
            let ((v4, _), (v6, _)) = Self::underlay_addrs(me, peer);
            let mut lines = vec![
                format!("link set ul{peer} up"),
                format!("addr add {v4}/30 dev ul{peer}"),
                format!("addr add {v6}/64 dev ul{peer} nodad"),
            ];
            let (node4, node6) = (Self::node_ipv4(peer), Self::node_ipv6(peer));
            lines.extend(self.remote_routes(me, peer, "add", Some(node4), Some(node6)));
            netns::ip_batch(Some(&self.nodes[me].netns), &lines)?;
        }
        Ok(())
    }

    /// `route <op>` lines for node `me` towards addresses living on node `owner`: via
    /// the underlay link, with `me`'s node address as the source of its own traffic.
    fn remote_routes(
        &self,
        me: usize,
        owner: usize,
        op: &str,
        ipv4: Option<Ipv4Addr>,
        ipv6: Option<Ipv6Addr>,
    ) -> Vec<String> {
        let ((_, peer4), (_, peer6)) = Self::underlay_addrs(me, owner);
        let node = &self.nodes[me];
        let mut lines = Vec::new();
        if let Some(ip) = ipv4 {
            lines.push(format!(
                "route {op} {ip}/32 via {peer4} dev ul{owner} src {}",
                node.ipv4
            ));
        }
        if let Some(ip) = ipv6 {
            lines.push(format!(
                "route {op} {ip}/128 via {peer6} dev ul{owner} src {}",
                node.ipv6
            ));
        }
        lines
    }

    /// Routes the addresses of an endpoint on node `owner` from every other node.
    fn route_from_other_nodes(
        &self,
        owner: usize,
        op: &str,
        ipv4: Option<Ipv4Addr>,
        ipv6: Option<Ipv6Addr>,
    ) -> Result<()> {
        for me in (0..self.nodes.len()).filter(|&m| m != owner) {
            let lines = self.remote_routes(me, owner, op, ipv4, ipv6);
            netns::ip_batch(Some(&self.nodes[me].netns), &lines)
                .with_context(|| format!("routing from {}", self.nodes[me].name))?;
        }
        Ok(())
    }

    /// Name of node `n`: [`NODE_NAME`] for node 0, `lab-node-<n>` for the others.
    pub fn node_name(n: usize) -> String {
        match n {
            0 => NODE_NAME.to_owned(),
            _ => format!("{NODE_NAME}-{n}"),
        }
    }

    /// Probe endpoint id of node `n`'s namespace: [`NODE`] for node 0, `node<n>` else.
    pub fn node_endpoint(n: usize) -> String {
        match n {
            0 => NODE.to_owned(),
            _ => format!("{NODE}{n}"),
        }
    }

    /// IPv4 address of node `n`: 172.31.255.(n+1).
    pub fn node_ipv4(n: usize) -> Ipv4Addr {
        Ipv4Addr::new(172, 31, 255, n as u8 + 1)
    }

    /// IPv6 address of node `n`: fd31::(n+1).
    pub fn node_ipv6(n: usize) -> Ipv6Addr {
        Ipv6Addr::new(0xfd31, 0, 0, 0, 0, 0, 0, n as u16 + 1)
    }

    /// Unique id of this lab (`lab<seq>-<pid>`); agents pin under `/sys/fs/bpf/netpol-<id>`.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The nodes, by index.
    pub fn nodes(&self) -> &[Node] {
        &self.nodes
    }

    /// The (first) node's network namespace (where its agent runs).
    pub fn node_netns(&self) -> &str {
        &self.nodes[0].netns
    }

    /// Scratch directory for this lab's files (manifests, logs); removed on drop unless
    /// [`Lab::keep_workdir`] was called.
    pub fn workdir(&self) -> &Path {
        &self.workdir
    }

    /// Keep the work directory after the lab is dropped (for inspection).
    pub fn keep_workdir(&mut self, keep: bool) {
        self.keep_workdir = keep;
    }

    /// bpffs directory the (first) node's agent pins into.
    pub fn pin_dir(&self) -> PathBuf {
        self.node_pin_dir(0)
    }

    /// bpffs directory node `n`'s agent pins into: `netpol-<id>` for node 0,
    /// `netpol-lab<seq>n<n>-<pid>` for the others (the sweep still finds the pid).
    pub fn node_pin_dir(&self, n: usize) -> PathBuf {
        let name = match n {
            0 => format!("netpol-{}", self.id),
            _ => {
                let (lab, pid) = self.id.rsplit_once('-').expect("lab<seq>-<pid>");
                format!("netpol-{lab}n{n}-{pid}")
            }
        };
        Path::new(netns::BPFFS).join(name)
    }

    /// Sets (replaces) a namespace's labels, creating the namespace if needed.
    /// `kubernetes.io/metadata.name` is always added in manifests.
    pub fn set_namespace_labels<K: Into<String>, V: Into<String>>(
        &mut self,
        namespace: &str,
        kv: impl IntoIterator<Item = (K, V)>,
    ) {
        self.namespaces.insert(namespace.to_owned(), labels(kv));
    }

    /// Namespaces and their labels (without `kubernetes.io/metadata.name`).
    pub fn namespaces(&self) -> &BTreeMap<String, Labels> {
        &self.namespaces
    }

    /// Pods in creation order.
    pub fn pods(&self) -> &[Pod] {
        &self.pods
    }

    /// External hosts in creation order.
    pub fn hosts(&self) -> &[Host] {
        &self.hosts
    }

    /// A pod by `namespace/name`.
    pub fn pod(&self, id: &str) -> Option<&Pod> {
        let (ns, name) = id.split_once('/')?;
        self.pods
            .iter()
            .find(|p| p.namespace == ns && p.name == name)
    }

    /// Replaces a pod's labels (rewrite the manifests afterwards).
    pub fn set_pod_labels<K: Into<String>, V: Into<String>>(
        &mut self,
        id: &str,
        kv: impl IntoIterator<Item = (K, V)>,
    ) -> Result<()> {
        let (ns, name) = id.split_once('/').context("pod ids are namespace/name")?;
        let pod = self
            .pods
            .iter_mut()
            .find(|p| p.namespace == ns && p.name == name)
            .with_context(|| format!("no pod {id}"))?;
        pod.labels = labels(kv);
        Ok(())
    }

    fn take_index(&mut self) -> u32 {
        let i = self.next_index;
        self.next_index += 1;
        i
    }

    /// Address the lab gives the `index`-th pod when none is specified: 10.0.0.0/8.
    pub fn auto_ipv4(index: u32) -> Ipv4Addr {
        let [_, b, c, d] = index.to_be_bytes();
        Ipv4Addr::new(10, b, c, d)
    }

    /// A matching IPv6 address in fd10::/64, for dual-stack pods.
    pub fn auto_ipv6(index: u32) -> Ipv6Addr {
        Ipv6Addr::new(0xfd10, 0, 0, 0, 0, 0, (index >> 16) as u16, index as u16)
    }

    /// Creates a namespace-and-veth pair towards node `node`, returns (netns, node-side
    /// ifname, worker).
    fn plumb(
        &mut self,
        node: usize,
        kind: char,
        index: u32,
        ipv4: Option<Ipv4Addr>,
        ipv6: Option<Ipv6Addr>,
    ) -> Result<(String, String, Arc<NetnsWorker>)> {
        let Some(node_ns) = self.nodes.get(node).map(|n| n.netns.clone()) else {
            bail!("no node {node} (the lab has {})", self.nodes.len());
        };
        let netns = format!("{}-{kind}{index}", self.netns_prefix);
        // Interface names are per namespace, so short names cannot collide.
        let node_if = format!("{}{index}", if kind == 'p' { 'v' } else { 'x' });

        netns::create_netns(&netns)?;
        self.created_netns.push(netns.clone());
        let worker = Arc::new(NetnsWorker::spawn(&netns)?);
        worker.run(|| -> Result<()> {
            // Addresses must be usable at once: no duplicate address detection.
            netns::sysctl("net/ipv6/conf/all/accept_dad", "0")?;
            netns::sysctl("net/ipv6/conf/default/accept_dad", "0")?;
            Ok(())
        })??;

        let mut on_node = vec![
            format!("link add {node_if} type veth peer name eth0 netns {netns}"),
            format!("link set {node_if} up"),
        ];
        let mut inner = vec!["link set lo up".to_string()];
        if let Some(ip) = ipv4 {
            on_node.push(format!("route add {ip}/32 dev {node_if}"));
            inner.push(format!("addr add {ip}/32 dev eth0"));
        }
        if let Some(ip) = ipv6 {
            on_node.push(format!("addr add {GATEWAY_IPV6}/64 dev {node_if} nodad"));
            on_node.push(format!("route add {ip}/128 dev {node_if}"));
            inner.push(format!("addr add {ip}/128 dev eth0 nodad"));
        }
        inner.push("link set eth0 up".into());
        if ipv4.is_some() {
            inner.push(format!(
                "route add default via {GATEWAY_IPV4} dev eth0 onlink"
            ));
        }
        if ipv6.is_some() {
            inner.push(format!("route add default via {GATEWAY_IPV6} dev eth0"));
        }
        netns::ip_batch(Some(&node_ns), &on_node)
            .with_context(|| format!("wiring {netns} into the node"))?;
        let iface = node_if.clone();
        self.nodes[node]
            .worker
            .run(move || -> Result<()> {
                netns::sysctl(&format!("net/ipv4/conf/{iface}/proxy_arp"), "1")?;
                // Proxy ARP answers broadcast requests after a random delay of up to
                // 0.8 s by default; answer at once (as Calico does).
                netns::sysctl(&format!("net/ipv4/neigh/{iface}/proxy_delay"), "0")
            })?
            .context("enabling proxy ARP")?;
        netns::ip_batch(Some(&netns), &inner).with_context(|| format!("configuring {netns}"))?;
        Ok((netns, node_if, worker))
    }

    /// Creates a pod: its own netns, a veth to the node, addresses, routes, and servers
    /// for its ports. The pod's namespace is created (unlabelled) if unknown.
    pub fn add_pod(&mut self, spec: PodSpec) -> Result<&Pod> {
        if self
            .pod(&format!("{}/{}", spec.namespace, spec.name))
            .is_some()
        {
            bail!("pod {}/{} already exists", spec.namespace, spec.name);
        }
        let index = self.take_index();
        let ipv4 = spec.ipv4.unwrap_or_else(|| Self::auto_ipv4(index));
        let (netns, host_if, worker) = self.plumb(spec.node, 'p', index, Some(ipv4), spec.ipv6)?;
        self.route_from_other_nodes(spec.node, "add", Some(ipv4), spec.ipv6)
            .with_context(|| format!("routing to {}/{}", spec.namespace, spec.name))?;
        let mut addrs = vec![IpAddr::V4(ipv4)];
        addrs.extend(spec.ipv6.map(IpAddr::V6));
        self.start_servers(&worker, &addrs, &spec.ports)
            .with_context(|| format!("serving ports of {}/{}", spec.namespace, spec.name))?;
        self.namespaces.entry(spec.namespace.clone()).or_default();
        self.pods.push(Pod {
            namespace: spec.namespace,
            name: spec.name,
            labels: spec.labels,
            ports: spec.ports,
            ipv4,
            ipv6: spec.ipv6,
            netns,
            host_if,
            node: spec.node,
            worker,
        });
        Ok(self.pods.last().expect("just pushed"))
    }

    /// Deletes a pod: stops its servers, deletes its host veth (the pod's end goes with
    /// it) and its netns; it leaves the manifests at the next write. The name may be
    /// used again; addresses and interface names of removed pods are not reused.
    pub fn remove_pod(&mut self, id: &str) -> Result<()> {
        let (ns, name) = id.split_once('/').context("pod ids are namespace/name")?;
        let i = self
            .pods
            .iter()
            .position(|p| p.namespace == ns && p.name == name)
            .with_context(|| format!("no pod {id}"))?;
        let pod = self.pods.remove(i);
        self.servers.stop_netns(&pod.netns);
        netns::ip_batch(
            Some(&self.nodes[pod.node].netns),
            &[format!("link del {}", pod.host_if)],
        )
        .with_context(|| format!("deleting the veth of {id}"))?;
        self.route_from_other_nodes(pod.node, "del", Some(pod.ipv4), pod.ipv6)?;
        let netns = pod.netns.clone();
        drop(pod); // Ends its worker thread, which lives in the netns.
        netns::delete_netns([netns.as_str()])?;
        self.created_netns.retain(|n| *n != netns);
        Ok(())
    }

    /// Creates an endpoint outside the cluster, in its own netns behind a veth to the
    /// node (not a pod: no manifest, no programs). Probe it as `host/NAME`.
    pub fn add_host(&mut self, name: &str, ip: IpAddr, ports: &[Port]) -> Result<&Host> {
        self.add_host_on(0, name, ip, ports)
    }

    /// [`Lab::add_host`] behind node `node`; the other nodes route it over the underlay.
    pub fn add_host_on(
        &mut self,
        node: usize,
        name: &str,
        ip: IpAddr,
        ports: &[Port],
    ) -> Result<&Host> {
        if self.hosts.iter().any(|h| h.name == name) {
            bail!("host {name} already exists");
        }
        let index = self.take_index();
        let (v4, v6) = match ip {
            IpAddr::V4(a) => (Some(a), None),
            IpAddr::V6(a) => (None, Some(a)),
        };
        let (netns, node_if, worker) = self.plumb(node, 'h', index, v4, v6)?;
        self.route_from_other_nodes(node, "add", v4, v6)
            .with_context(|| format!("routing to host/{name}"))?;
        self.start_servers(&worker, &[ip], ports)
            .with_context(|| format!("serving ports of host/{name}"))?;
        self.hosts.push(Host {
            name: name.to_owned(),
            ip,
            ports: ports.to_vec(),
            netns,
            node_if,
            node,
            worker,
        });
        Ok(self.hosts.last().expect("just pushed"))
    }

    fn start_servers(
        &mut self,
        worker: &NetnsWorker,
        addrs: &[IpAddr],
        ports: &[Port],
    ) -> Result<()> {
        let rt = self.runtime.as_ref().expect("runtime lives until drop");
        for port in ports {
            for &addr in addrs {
                self.servers
                    .start(rt, worker, addr, port.port, port.protocol)?;
            }
        }
        Ok(())
    }

    /// Resolves a probe endpoint id: `ns/pod`, `host/NAME`, [`NODE`] or `node<n>`.
    fn endpoint(&self, id: &str) -> Result<(Arc<NetnsWorker>, Option<Ipv4Addr>, Option<Ipv6Addr>)> {
        let node = match id.strip_prefix(NODE) {
            Some("") => Some(0),
            Some(n) if n.bytes().all(|b| b.is_ascii_digit()) => n.parse().ok(),
            _ => None,
        };
        if let Some(n) = node {
            let node: &Node = self
                .nodes
                .get(n)
                .with_context(|| format!("no node {n} (the lab has {})", self.nodes.len()))?;
            return Ok((node.worker.clone(), Some(node.ipv4), Some(node.ipv6)));
        }
        if let Some(name) = id.strip_prefix("host/") {
            let h = self
                .hosts
                .iter()
                .find(|h| h.name == name)
                .with_context(|| format!("no host {id}"))?;
            return Ok(match h.ip {
                IpAddr::V4(a) => (h.worker.clone(), Some(a), None),
                IpAddr::V6(a) => (h.worker.clone(), None, Some(a)),
            });
        }
        let p = self
            .pod(id)
            .with_context(|| format!("no pod {id} (endpoint ids: ns/pod, host/NAME, node)"))?;
        Ok((p.worker.clone(), Some(p.ipv4), p.ipv6))
    }

    /// Writes this lab's namespaces, pods and `policies_yaml` into `dir` and bumps its
    /// generation; see [`ManifestDir::write`].
    pub fn write_manifests(&self, dir: &mut ManifestDir, policies_yaml: &str) -> Result<u64> {
        dir.write(self, policies_yaml)
    }

    /// The address of an endpoint (`ns/pod`, `host/NAME`, [`NODE`] or `node<n>`) in one
    /// family.
    pub fn address(&self, id: &str, family: Family) -> Option<IpAddr> {
        let (_, v4, v6) = self.endpoint(id).ok()?;
        match family {
            Family::V4 => v4.map(IpAddr::V4),
            Family::V6 => v6.map(IpAddr::V6),
        }
    }

    /// The worker thread living in an endpoint's namespace, to run arbitrary code there
    /// (e.g. create sockets for a benchmark): `lab.worker("x/a")?.run(|| ...)`.
    pub fn worker(&self, id: &str) -> Result<Arc<NetnsWorker>> {
        Ok(self.endpoint(id)?.0)
    }

    /// Runs one probe. See [`Probe`] for what allowed means.
    pub fn probe(&self, probe: &Probe, timeout: std::time::Duration) -> Result<ProbeResult> {
        Ok(self
            .probe_all(std::slice::from_ref(probe), timeout)?
            .pop()
            .expect("one result per probe"))
    }

    /// Runs many probes concurrently (at most 128 in flight), each bounded by
    /// `timeout`, so a batch of blocked probes takes about one timeout, not one each.
    /// Results are in the order of `probes`.
    ///
    /// Blocking: call it from synchronous code (from async code, use
    /// `spawn_blocking`); the lab drives the traffic on its own runtime.
    pub fn probe_all(
        &self,
        probes: &[Probe],
        timeout: std::time::Duration,
    ) -> Result<Vec<ProbeResult>> {
        let mut resolved = Vec::with_capacity(probes.len());
        for p in probes {
            let (src, src4, src6) = self.endpoint(&p.src)?;
            let (_, dst4, dst6) = self.endpoint(&p.dst)?;
            let (dst, has_src) = match p.family {
                Family::V4 => (dst4.map(IpAddr::V4), src4.is_some()),
                Family::V6 => (dst6.map(IpAddr::V6), src6.is_some()),
            };
            let Some(dst) = dst.filter(|_| has_src) else {
                bail!("probe {p}: both ends need an {:?} address", p.family);
            };
            resolved.push(probe::Resolved {
                probe: p.clone(),
                src,
                dst: std::net::SocketAddr::new(dst, p.port),
            });
        }
        let rt = self.runtime.as_ref().expect("runtime lives until drop");
        Ok(rt.block_on(probe::run_all(resolved, timeout, self.servers.udp_seen())))
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        // Stop serving (closes listening sockets), then stop the namespace workers,
        // then delete the namespaces (which also removes veths and their programs).
        self.servers.stop();
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_timeout(std::time::Duration::from_secs(2));
        }
        self.pods.clear();
        self.hosts.clear();
        let nodes = self.nodes.len();
        self.nodes.clear();
        if let Err(e) = netns::delete_netns(self.created_netns.iter().map(String::as_str)) {
            eprintln!("lab {}: {e:#}", self.id);
        }
        for n in 0..nodes.max(1) {
            let pin = self.node_pin_dir(n);
            if pin.exists() {
                let _ = std::fs::remove_dir_all(&pin);
            }
        }
        if !self.keep_workdir {
            let _ = std::fs::remove_dir_all(&self.workdir);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn underlay_links_get_their_own_subnets() {
        let ((a, a_peer), (a6, a6_peer)) = Lab::underlay_addrs(0, 1);
        assert_eq!(
            (a, a_peer),
            (
                "172.31.254.1".parse().unwrap(),
                "172.31.254.2".parse().unwrap()
            )
        );
        assert_eq!(Lab::underlay_addrs(1, 0), ((a_peer, a), (a6_peer, a6)));
        let mut seen = std::collections::BTreeSet::new();
        for b in 0..MAX_NODES {
            for a in 0..b {
                let ((own, _), (own6, _)) = Lab::underlay_addrs(a, b);
                assert!(
                    seen.insert(own.octets()[3] / 4),
                    "link {a}-{b} reuses a /30"
                );
                assert!(seen.len() < 64 && own6.segments()[2] as usize == seen.len() - 1);
            }
        }
        assert_eq!(Lab::node_name(0), NODE_NAME);
        assert_eq!(Lab::node_name(1), "lab-node-1");
        assert_eq!(Lab::node_endpoint(1), "node1");
    }
}
