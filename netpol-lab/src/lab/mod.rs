//! The emulated cluster: nodes, pods and external hosts in their network namespaces,
//! the servers for their ports, and probes between them (see the crate documentation).

pub mod services;
mod underlay;

use std::collections::BTreeMap;
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};

use crate::error::{Context, Result, bail};
use crate::netns::{self, NetnsWorker};
use crate::probe::{self, Probe, ProbeResult};
use crate::serve;
use crate::spec::{
    Family, GATEWAY_IPV4, GATEWAY_IPV6, Labels, MAX_NODES, NODE, NODE_NAME, PodSpec, Port, Stack,
    ipv6_image, labels,
};

/// A pod of the emulated cluster.
#[derive(Debug)]
pub struct Pod {
    pub namespace: String,
    pub name: String,
    pub labels: Labels,
    pub ports: Vec<Port>,
    /// `None` for a pod of an IPv6-only lab.
    pub ipv4: Option<Ipv4Addr>,
    pub ipv6: Option<Ipv6Addr>,
    /// The pod's network namespace.
    pub netns: String,
    /// Host-side veth, inside the node namespace.
    pub host_if: String,
    /// Index of its node in [`Lab::nodes`].
    pub node: usize,
    /// Annotations of its Pod object (none unless set with [`Lab::set_pod_annotation`]).
    pub annotations: Labels,
    /// A `hostNetwork` pod ([`PodSpec::host_network`]): `netns` is its node's, its
    /// addresses are the node's and `host_if` is empty.
    pub host_network: bool,
    worker: Arc<NetnsWorker>,
}

impl Pod {
    /// `namespace/name`, the pod's probe endpoint id.
    pub fn id(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }

    /// The IPv4 address of a pod of an IPv4 or dual-stack lab.
    ///
    /// # Panics
    /// For a pod without one (an IPv6-only lab): tests that speak IPv4 build IPv4 labs.
    pub fn v4(&self) -> Ipv4Addr {
        self.ipv4
            .unwrap_or_else(|| panic!("pod {} has no IPv4 address", self.id()))
    }

    /// Its addresses: IPv4 first.
    pub fn addresses(&self) -> Vec<IpAddr> {
        let v4 = self.ipv4.map(IpAddr::V4);
        v4.into_iter().chain(self.ipv6.map(IpAddr::V6)).collect()
    }
}

/// An endpoint outside the cluster ("host/NAME" in probes).
#[derive(Debug)]
pub struct Host {
    pub name: String,
    pub ipv4: Option<Ipv4Addr>,
    pub ipv6: Option<Ipv6Addr>,
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
    /// Whether its pods hang on the Linux bridge [`BRIDGE`] ([`Lab::set_bridged`]).
    pub bridged: bool,
    /// The labels of its Node object ([`Lab::set_node_labels`]).
    pub labels: Labels,
    worker: Arc<NetnsWorker>,
}

/// The bridge of a bridged node ([`Lab::set_bridged`]), as the bridge CNI plugin and
/// flannel name theirs.
pub const BRIDGE: &str = "cni0";
/// The bridge's subnets and addresses (the pods' gateways): pods of a bridged node need
/// addresses in them.
pub const BRIDGE_IPV4: (Ipv4Addr, u8) = (Ipv4Addr::new(10, 0, 0, 254), 24);
pub const BRIDGE_IPV6: (Ipv6Addr, u8) = (Ipv6Addr::new(0xfd10, 0, 0, 0, 0, 0, 0, 0xfe), 64);

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
    services: Vec<services::Service>,
    proxy_mode: services::ProxyMode,
    /// The families pods get addresses in when their spec names none.
    stack: Stack,
    /// Whether the nodes have their uplink (created with the first Service).
    uplinks: bool,
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
            services: Vec::new(),
            proxy_mode: services::ProxyMode::default(),
            stack: Stack::default(),
            uplinks: false,
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
            bridged: false,
            labels: Labels::new(),
            worker,
        });
        Ok(())
    }

    /// Makes node `node` a bridge-CNI node (the bridge plugin, flannel): its pods created
    /// from now on hang on the Linux bridge [`BRIDGE`] (addresses [`BRIDGE_IPV4`] and
    /// [`BRIDGE_IPV6`], the pods' gateways), with addresses in the bridge's subnets and no
    /// per-pod route: the node reaches them through the bridge's subnet routes.
    pub fn set_bridged(&mut self, node: usize) -> Result<()> {
        let Some(n) = self.nodes.get(node) else {
            bail!("no node {node} (the lab has {})", self.nodes.len());
        };
        if n.bridged {
            return Ok(());
        }
        if self.pods.iter().any(|p| p.node == node) {
            bail!("node {node} already has pods: make it bridged before adding them");
        }
        let ((v4, v4_len), (v6, v6_len)) = (BRIDGE_IPV4, BRIDGE_IPV6);
        netns::ip_batch(
            Some(&n.netns),
            &[
                format!("link add {BRIDGE} type bridge"),
                format!("addr add {v4}/{v4_len} dev {BRIDGE}"),
                format!("addr add {v6}/{v6_len} dev {BRIDGE} nodad"),
                format!("link set {BRIDGE} up"),
            ],
        )
        .with_context(|| format!("creating the bridge of node {node}"))?;
        self.nodes[node].bridged = true;
        Ok(())
    }

    /// Plumbs a pod of a bridged node: its veth's host end is a port of [`BRIDGE`], its
    /// addresses are in the bridge's subnets, its default routes lead to the bridge's.
    fn plumb_bridged(
        &self,
        node_ns: &str,
        netns: &str,
        node_if: &str,
        ipv4: Option<Ipv4Addr>,
        ipv6: Option<Ipv6Addr>,
    ) -> Result<()> {
        let ((gw4, len4), (gw6, len6)) = (BRIDGE_IPV4, BRIDGE_IPV6);
        let mut inner = vec!["link set lo up".to_string()];
        if let Some(ip) = ipv4 {
            let same = |a: Ipv4Addr| u32::from(a) >> (32 - len4);
            if same(ip) != same(gw4) || ip == gw4 {
                bail!("a pod of a bridged node needs an IPv4 address in {gw4}/{len4} (not {ip})");
            }
            inner.push(format!("addr add {ip}/{len4} dev eth0"));
        }
        if let Some(ip) = ipv6 {
            let same = |a: Ipv6Addr| u128::from(a) >> (128 - len6);
            if same(ip) != same(gw6) || ip == gw6 {
                bail!("a pod of a bridged node needs an IPv6 address in {gw6}/{len6} (not {ip})");
            }
            inner.push(format!("addr add {ip}/{len6} dev eth0 nodad"));
        }
        inner.push("link set eth0 up".into());
        if ipv4.is_some() {
            inner.push(format!("route add default via {gw4} dev eth0"));
        }
        if ipv6.is_some() {
            inner.push(format!("route add default via {gw6} dev eth0"));
        }
        netns::ip_batch(
            Some(node_ns),
            &[
                format!("link add {node_if} type veth peer name eth0 netns {netns}"),
                format!("link set {node_if} master {BRIDGE}"),
                format!("link set {node_if} up"),
            ],
        )
        .with_context(|| format!("wiring {netns} into the bridge"))?;
        netns::ip_batch(Some(netns), &inner).with_context(|| format!("configuring {netns}"))
    }

    /// Sets the address families of the pods created from now on (by default IPv4, with
    /// IPv6 only where a [`PodSpec`] names an address) and of the Services' ClusterIPs.
    pub fn set_stack(&mut self, stack: Stack) -> Result<()> {
        if !self.pods.is_empty() || !self.services.is_empty() {
            bail!("set the lab's stack before adding pods and Services");
        }
        self.stack = stack;
        Ok(())
    }

    /// The address families of the lab's pods ([`Lab::set_stack`]).
    pub fn stack(&self) -> Stack {
        self.stack
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

    /// Sets (replaces) the labels of node `node`'s Node object (rewrite the manifests or
    /// publish the objects afterwards): what ClusterNetworkPolicy `nodes` peers select.
    pub fn set_node_labels<K: Into<String>, V: Into<String>>(
        &mut self,
        node: usize,
        kv: impl IntoIterator<Item = (K, V)>,
    ) -> Result<()> {
        let count = self.nodes.len();
        let node = self
            .nodes
            .get_mut(node)
            .with_context(|| format!("no node {node} (the lab has {count})"))?;
        node.labels = labels(kv);
        Ok(())
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

    /// Sets an annotation of a pod's object (rewrite the manifests or publish the
    /// objects afterwards), e.g. to see what the agent makes of hostile ones.
    pub fn set_pod_annotation(
        &mut self,
        id: &str,
        key: impl Into<String>,
        value: impl Into<String>,
    ) -> Result<()> {
        let (ns, name) = id.split_once('/').context("pod ids are namespace/name")?;
        let pod = self
            .pods
            .iter_mut()
            .find(|p| p.namespace == ns && p.name == name)
            .with_context(|| format!("no pod {id}"))?;
        pod.annotations.insert(key.into(), value.into());
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

        if kind == 'p' && self.nodes[node].bridged {
            self.plumb_bridged(&node_ns, &netns, &node_if, ipv4, ipv6)?;
            return Ok((netns, node_if, worker));
        }
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
        if spec.host_network {
            return self.add_host_network_pod(spec);
        }
        let index = self.take_index();
        let auto = Self::auto_ipv4(index);
        let ipv4 = spec
            .ipv4
            .or_else(|| self.stack.has(Family::V4).then_some(auto));
        let ipv6 = spec
            .ipv6
            .or_else(|| self.stack.has(Family::V6).then(|| ipv6_image(auto)));
        let (netns, host_if, worker) = self.plumb(spec.node, 'p', index, ipv4, ipv6)?;
        self.route_from_other_nodes(spec.node, "add", ipv4, ipv6)
            .with_context(|| format!("routing to {}/{}", spec.namespace, spec.name))?;
        let addrs: Vec<IpAddr> = ipv4
            .map(IpAddr::V4)
            .into_iter()
            .chain(ipv6.map(IpAddr::V6))
            .collect();
        self.start_servers(&worker, &netns, &addrs, &spec.ports)
            .with_context(|| format!("serving ports of {}/{}", spec.namespace, spec.name))?;
        self.push_pod(spec, (ipv4, ipv6), netns, host_if, worker)
    }

    /// Records a plumbed and served pod (its namespace too) and updates the Services.
    fn push_pod(
        &mut self,
        spec: PodSpec,
        (ipv4, ipv6): (Option<Ipv4Addr>, Option<Ipv6Addr>),
        netns: String,
        host_if: String,
        worker: Arc<NetnsWorker>,
    ) -> Result<&Pod> {
        self.namespaces.entry(spec.namespace.clone()).or_default();
        self.pods.push(Pod {
            namespace: spec.namespace,
            name: spec.name,
            labels: spec.labels,
            ports: spec.ports,
            ipv4,
            ipv6,
            netns,
            host_if,
            node: spec.node,
            annotations: Labels::new(),
            host_network: spec.host_network,
            worker,
        });
        self.sync_services()?;
        Ok(self.pods.last().expect("just pushed"))
    }

    /// A `hostNetwork` pod: its servers listen on its node's addresses (of the lab's
    /// families), inside the node's namespace. Two of them on one node cannot serve the
    /// same port, as on a real node.
    fn add_host_network_pod(&mut self, spec: PodSpec) -> Result<&Pod> {
        let id = format!("{}/{}", spec.namespace, spec.name);
        let node = self
            .nodes
            .get(spec.node)
            .with_context(|| format!("pod {id}: no node {}", spec.node))?;
        if spec.ipv4.is_some() || spec.ipv6.is_some() {
            bail!("pod {id}: a hostNetwork pod has its node's addresses, not its own");
        }
        let ipv4 = self.stack.has(Family::V4).then_some(node.ipv4);
        let ipv6 = self.stack.has(Family::V6).then_some(node.ipv6);
        let (netns, worker) = (node.netns.clone(), node.worker.clone());
        let addrs: Vec<IpAddr> = ipv4
            .map(IpAddr::V4)
            .into_iter()
            .chain(ipv6.map(IpAddr::V6))
            .collect();
        let owner = host_network_owner(&id);
        self.start_servers(&worker, &owner, &addrs, &spec.ports)
            .with_context(|| format!("serving ports of {id} on its node"))?;
        self.push_pod(spec, (ipv4, ipv6), netns, String::new(), worker)
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
        if pod.host_network {
            self.servers.stop_owner(&host_network_owner(id));
            return self.sync_services();
        }
        self.servers.stop_owner(&pod.netns);
        netns::ip_batch(
            Some(&self.nodes[pod.node].netns),
            &[format!("link del {}", pod.host_if)],
        )
        .with_context(|| format!("deleting the veth of {id}"))?;
        self.route_from_other_nodes(pod.node, "del", pod.ipv4, pod.ipv6)?;
        let netns = pod.netns.clone();
        drop(pod); // Ends its worker thread, which lives in the netns.
        netns::delete_netns([netns.as_str()])?;
        self.created_netns.retain(|n| *n != netns);
        self.sync_services()
    }

    /// Creates an endpoint outside the cluster, in its own netns behind a veth to the
    /// node (not a pod: no manifest, no programs). Probe it as `host/NAME`.
    pub fn add_host(&mut self, name: &str, ip: IpAddr, ports: &[Port]) -> Result<&Host> {
        self.add_host_on(0, name, &[ip], ports)
    }

    /// [`Lab::add_host`] behind node `node`, with one or two addresses (at most one per
    /// family); the other nodes route it over the underlay.
    pub fn add_host_on(
        &mut self,
        node: usize,
        name: &str,
        addrs: &[IpAddr],
        ports: &[Port],
    ) -> Result<&Host> {
        if self.hosts.iter().any(|h| h.name == name) {
            bail!("host {name} already exists");
        }
        let mut v4 = None;
        let mut v6 = None;
        for addr in addrs {
            let taken = match *addr {
                IpAddr::V4(a) => v4.replace(a).is_some(),
                IpAddr::V6(a) => v6.replace(a).is_some(),
            };
            if taken {
                bail!("host {name}: at most one address per family");
            }
        }
        if addrs.is_empty() {
            bail!("host {name} needs an address");
        }
        let index = self.take_index();
        let (netns, node_if, worker) = self.plumb(node, 'h', index, v4, v6)?;
        self.route_from_other_nodes(node, "add", v4, v6)
            .with_context(|| format!("routing to host/{name}"))?;
        self.start_servers(&worker, &netns, addrs, ports)
            .with_context(|| format!("serving ports of host/{name}"))?;
        self.hosts.push(Host {
            name: name.to_owned(),
            ipv4: v4,
            ipv6: v6,
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
        owner: &str,
        addrs: &[IpAddr],
        ports: &[Port],
    ) -> Result<()> {
        let rt = self.runtime.as_ref().expect("runtime lives until drop");
        for port in ports {
            for &addr in addrs {
                self.servers
                    .start(rt, worker, owner, addr, port.port, port.protocol)?;
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
            return Ok((h.worker.clone(), h.ipv4, h.ipv6));
        }
        let p = self
            .pod(id)
            .with_context(|| format!("no pod {id} (endpoint ids: ns/pod, host/NAME, node)"))?;
        Ok((p.worker.clone(), p.ipv4, p.ipv6))
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

    /// How kube-proxy's rules are written on the nodes (iptables by default).
    pub fn set_proxy_mode(&mut self, mode: services::ProxyMode) -> Result<()> {
        self.proxy_mode = mode;
        self.sync_services()
    }

    /// Adds a Service (ClusterIPs from [`services::SERVICE_RANGE_V4`] and `_V6`) and
    /// writes kube-proxy's rules for it on every node. Probe it as `svc/NS/NAME` on a
    /// Service port.
    pub fn add_service(&mut self, spec: services::ServiceSpec) -> Result<&services::Service> {
        let id = format!("{}/{}", spec.namespace, spec.name);
        if self.service(&id).is_some() {
            bail!("Service {id} already exists");
        }
        let n = u32::try_from(self.services.len()).unwrap_or(u32::MAX) + 10;
        let (v4, _) = services::SERVICE_RANGE_V4;
        let (v6, _) = services::SERVICE_RANGE_V6;
        // An IPv6-only cluster's Services are IPv6 only; otherwise PreferDualStack.
        let ipv4 = (self.stack != Stack::Ipv6).then(|| Ipv4Addr::from(u32::from(v4) + n));
        let ipv6 = Some(Ipv6Addr::from(u128::from(v6) + u128::from(n)));
        self.namespaces.entry(spec.namespace.clone()).or_default();
        self.services.push(services::Service { spec, ipv4, ipv6 });
        self.sync_services()?;
        Ok(self.services.last().expect("just pushed"))
    }

    /// The lab's Services.
    pub fn services(&self) -> &[services::Service] {
        &self.services
    }

    /// A Service by `namespace/name`.
    pub fn service(&self, id: &str) -> Option<&services::Service> {
        self.services.iter().find(|s| s.id() == id)
    }

    /// Every Service port with its endpoints, per family (what kube-proxy programs).
    pub fn service_frontends(&self) -> Vec<services::Frontend> {
        services::frontends(&self.services, self.pods.iter())
    }

    /// Writes kube-proxy's rules for the current Services and pods on every node.
    fn sync_services(&mut self) -> Result<()> {
        if self.services.is_empty() {
            return Ok(());
        }
        if !self.uplinks {
            // A real node routes what is not translated out of its uplink (a default
            // route): kube-proxy's reject for Service ports without endpoints happens
            // in FORWARD, on the way there.
            let (v4, v4_len) = services::SERVICE_RANGE_V4;
            let (v6, v6_len) = services::SERVICE_RANGE_V6;
            for node in &self.nodes {
                netns::ip_batch(
                    Some(&node.netns),
                    &[
                        "link add uplink type veth peer name uplink-end".into(),
                        "link set uplink up".into(),
                        "link set uplink-end up".into(),
                        format!("route add {v4}/{v4_len} dev uplink"),
                        format!("route add {v6}/{v6_len} dev uplink"),
                    ],
                )
                .with_context(|| format!("giving {} an uplink", node.name))?;
            }
            self.uplinks = true;
        }
        let frontends = self.service_frontends();
        for node in &self.nodes {
            services::apply(&node.netns, self.proxy_mode, &frontends)
                .with_context(|| format!("kube-proxy's rules on {}", node.name))?;
        }
        Ok(())
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
            let (dst4, dst6) = match p.dst.strip_prefix("svc/") {
                Some(id) => {
                    let service = self
                        .service(id)
                        .with_context(|| format!("no Service {id}"))?;
                    (service.ipv4, service.ipv6)
                }
                None => {
                    let (_, dst4, dst6) = self.endpoint(&p.dst)?;
                    (dst4, dst6)
                }
            };
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

/// The owner of a `hostNetwork` pod's servers (they share the node's namespace with the
/// node's other servers).
fn host_network_owner(id: &str) -> String {
    format!("hostNetwork:{id}")
}
