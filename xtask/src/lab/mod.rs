//! Emulated clusters made of network namespaces, for demos, tier-3 tests, the
//! conformance runner and benchmarks.
//!
//! ```text
//!                        node netns  np<pid>-<lab>-node
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
//! ```
//!
//! Pods are routed Calico-style: a /32 (and /128) on the pod's `eth0`, a default route to
//! the link-local gateway 169.254.1.1 answered by proxy ARP on the host veth (and to
//! `fe80::1` for IPv6), and a host route per pod in the node namespace. The agent runs
//! in the node namespace and attaches to the host veths.
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

/// The node's name, as written into `spec.nodeName` and passed as `--node-name`.
pub const NODE_NAME: &str = "lab-node";
/// Probe endpoint id of the node's own network namespace.
pub const NODE: &str = "node";
/// IPv4 address of the node (on loopback inside the node namespace).
pub const NODE_IPV4: Ipv4Addr = Ipv4Addr::new(172, 31, 255, 1);
/// IPv6 address of the node.
pub const NODE_IPV6: Ipv6Addr = Ipv6Addr::new(0xfd31, 0, 0, 0, 0, 0, 0, 1);
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
        }
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

/// A pod of the emulated node.
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
    worker: Arc<NetnsWorker>,
}

static LABS_IN_PROCESS: AtomicU32 = AtomicU32::new(0);

/// An emulated node with its pods and external hosts. Dropping it removes everything.
pub struct Lab {
    id: String,
    /// `np<pid>-<seq>`: prefix of every namespace of this lab (the sweep parses the pid).
    netns_prefix: String,
    node_netns: String,
    node_worker: Arc<NetnsWorker>,
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
            .field("node_netns", &self.node_netns)
            .field("pods", &self.pods.len())
            .field("hosts", &self.hosts.len())
            .finish()
    }
}

impl Lab {
    /// Sweeps leftovers of dead runs, then creates the node namespace: loopback up,
    /// IPv4/IPv6 forwarding, DAD off, and the node addresses on loopback.
    pub fn new() -> Result<Self> {
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
        let node_netns = format!("{netns_prefix}-node");
        let workdir = std::env::temp_dir().join(format!("netpol-{id}"));

        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("lab-io")
            .enable_all()
            .build()
            .context("starting the lab's tokio runtime")?;

        netns::create_netns(&node_netns)?;
        // From here on, Drop cleans up whatever exists.
        let worker = match NetnsWorker::spawn(&node_netns) {
            Ok(w) => Arc::new(w),
            Err(e) => {
                let _ = netns::delete_netns([node_netns.as_str()]);
                return Err(e);
            }
        };
        let lab = Lab {
            id,
            netns_prefix,
            node_netns: node_netns.clone(),
            node_worker: worker,
            namespaces: BTreeMap::new(),
            pods: Vec::new(),
            hosts: Vec::new(),
            created_netns: vec![node_netns.clone()],
            next_index: 1,
            workdir,
            keep_workdir: false,
            servers: serve::Servers::default(),
            runtime: Some(runtime),
        };
        std::fs::create_dir_all(&lab.workdir)
            .with_context(|| format!("creating {}", lab.workdir.display()))?;

        lab.node_worker.run(|| -> Result<()> {
            netns::sysctl("net/ipv4/ip_forward", "1")?;
            netns::sysctl("net/ipv6/conf/all/forwarding", "1")?;
            netns::sysctl("net/ipv6/conf/default/forwarding", "1")?;
            netns::sysctl("net/ipv6/conf/all/accept_dad", "0")?;
            netns::sysctl("net/ipv6/conf/default/accept_dad", "0")?;
            Ok(())
        })??;
        netns::ip_batch(
            Some(&node_netns),
            &[
                "link set lo up".into(),
                // The node's own addresses live on loopback (no dummy driver needed).
                format!("addr add {NODE_IPV4}/32 dev lo"),
                format!("addr add {NODE_IPV6}/128 dev lo nodad"),
                // Proxy ARP answers for the pods' gateway only if the node routes it
                // out of another interface than the asking veth.
                format!("route add {GATEWAY_IPV4}/32 dev lo"),
            ],
        )
        .context("setting up the node namespace")?;
        Ok(lab)
    }

    /// Unique id of this lab (`lab<seq>-<pid>`); agents pin under `/sys/fs/bpf/netpol-<id>`.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The node's network namespace (where the agent runs).
    pub fn node_netns(&self) -> &str {
        &self.node_netns
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

    /// bpffs directory the agent of this lab pins into.
    pub fn pin_dir(&self) -> PathBuf {
        Path::new(netns::BPFFS).join(format!("netpol-{}", self.id))
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

    /// Creates a namespace-and-veth pair towards the node, returns (netns, node-side ifname, worker).
    fn plumb(
        &mut self,
        kind: char,
        index: u32,
        ipv4: Option<Ipv4Addr>,
        ipv6: Option<Ipv6Addr>,
    ) -> Result<(String, String, Arc<NetnsWorker>)> {
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

        let mut node = vec![
            format!("link add {node_if} type veth peer name eth0 netns {netns}"),
            format!("link set {node_if} up"),
        ];
        let mut inner = vec!["link set lo up".to_string()];
        if let Some(ip) = ipv4 {
            node.push(format!("route add {ip}/32 dev {node_if}"));
            inner.push(format!("addr add {ip}/32 dev eth0"));
        }
        if let Some(ip) = ipv6 {
            node.push(format!("addr add {GATEWAY_IPV6}/64 dev {node_if} nodad"));
            node.push(format!("route add {ip}/128 dev {node_if}"));
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
        netns::ip_batch(Some(&self.node_netns), &node)
            .with_context(|| format!("wiring {netns} into the node"))?;
        let iface = node_if.clone();
        self.node_worker
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
        let (netns, host_if, worker) = self.plumb('p', index, Some(ipv4), spec.ipv6)?;
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
            Some(&self.node_netns),
            &[format!("link del {}", pod.host_if)],
        )
        .with_context(|| format!("deleting the veth of {id}"))?;
        let netns = pod.netns.clone();
        drop(pod); // Ends its worker thread, which lives in the netns.
        netns::delete_netns([netns.as_str()])?;
        self.created_netns.retain(|n| *n != netns);
        Ok(())
    }

    /// Creates an endpoint outside the cluster, in its own netns behind a veth to the
    /// node (not a pod: no manifest, no programs). Probe it as `host/NAME`.
    pub fn add_host(&mut self, name: &str, ip: IpAddr, ports: &[Port]) -> Result<&Host> {
        if self.hosts.iter().any(|h| h.name == name) {
            bail!("host {name} already exists");
        }
        let index = self.take_index();
        let (v4, v6) = match ip {
            IpAddr::V4(a) => (Some(a), None),
            IpAddr::V6(a) => (None, Some(a)),
        };
        let (netns, node_if, worker) = self.plumb('h', index, v4, v6)?;
        self.start_servers(&worker, &[ip], ports)
            .with_context(|| format!("serving ports of host/{name}"))?;
        self.hosts.push(Host {
            name: name.to_owned(),
            ip,
            ports: ports.to_vec(),
            netns,
            node_if,
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

    /// Resolves a probe endpoint id: `ns/pod`, `host/NAME` or [`NODE`].
    fn endpoint(&self, id: &str) -> Result<(Arc<NetnsWorker>, Option<Ipv4Addr>, Option<Ipv6Addr>)> {
        if id == NODE {
            return Ok((self.node_worker.clone(), Some(NODE_IPV4), Some(NODE_IPV6)));
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

    /// The address of an endpoint (`ns/pod`, `host/NAME` or [`NODE`]) in one family.
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
        if let Err(e) = netns::delete_netns(self.created_netns.iter().map(String::as_str)) {
            eprintln!("lab {}: {e:#}", self.id);
        }
        let pin = self.pin_dir();
        if pin.exists() {
            let _ = std::fs::remove_dir_all(&pin);
        }
        if !self.keep_workdir {
            let _ = std::fs::remove_dir_all(&self.workdir);
        }
    }
}
