//! What an emulated cluster is made of, before it exists: node names and addresses,
//! protocols, ports and pod specifications.

use std::collections::BTreeMap;
use std::fmt;
use std::net::{Ipv4Addr, Ipv6Addr};

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

/// The address families of a lab's pods and hosts (FORMAT.md "Worlds").
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub enum Stack {
    /// IPv4 addresses; a pod may be given an IPv6 one too ([`PodSpec::ipv6`]).
    #[default]
    Ipv4,
    /// IPv6 addresses only: no pod, host or Service has an IPv4 address.
    Ipv6,
    /// One address of each family for every pod and host.
    Dual,
}

impl Stack {
    /// Whether pods get an address of `family` when none is given.
    pub fn has(self, family: Family) -> bool {
        matches!(
            (self, family),
            (Stack::Ipv4 | Stack::Dual, Family::V4) | (Stack::Ipv6 | Stack::Dual, Family::V6)
        )
    }

    /// The families of its probes, in order.
    pub fn families(self) -> &'static [Family] {
        match self {
            Stack::Ipv4 => &[Family::V4],
            Stack::Ipv6 => &[Family::V6],
            Stack::Dual => &[Family::V4, Family::V6],
        }
    }
}

/// The /96 that holds the IPv6 image of every IPv4 address the lab hands out
/// (`fd00:4::a.b.c.d` for `a.b.c.d`, FORMAT.md's "IPv6 only" world): an IPv6 or
/// dual-stack pod whose IPv4 address would be `10.0.0.7` gets `fd00:4::a00:7`.
pub const IPV6_IMAGE_PREFIX: Ipv6Addr = Ipv6Addr::new(0xfd00, 4, 0, 0, 0, 0, 0, 0);

/// The IPv6 image of an IPv4 address in [`IPV6_IMAGE_PREFIX`].
pub fn ipv6_image(ip: Ipv4Addr) -> Ipv6Addr {
    Ipv6Addr::from(u128::from(IPV6_IMAGE_PREFIX) | u128::from(u32::from(ip)))
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

pub(crate) fn labels<K: Into<String>, V: Into<String>>(
    kv: impl IntoIterator<Item = (K, V)>,
) -> Labels {
    kv.into_iter().map(|(k, v)| (k.into(), v.into())).collect()
}

/// What to create with [`Lab::add_pod`].
#[derive(Clone, Debug)]
pub struct PodSpec {
    pub namespace: String,
    pub name: String,
    pub labels: Labels,
    pub ports: Vec<Port>,
    /// `None`: the lab picks the next free address in 10.0.0.0/8, unless its
    /// [`Stack`] is IPv6 only.
    pub ipv4: Option<Ipv4Addr>,
    /// `None`: the image of the pod's automatic IPv4 address ([`ipv6_image`]) when the
    /// lab's [`Stack`] has IPv6, else no IPv6 address.
    pub ipv6: Option<Ipv6Addr>,
    /// Index of the node the pod runs on (0 unless [`PodSpec::on_node`]).
    pub node: usize,
    /// A `hostNetwork` pod ([`PodSpec::host_network`]): it has no network namespace
    /// of its own and serves its ports on its node's addresses.
    pub host_network: bool,
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
            host_network: false,
        }
    }

    /// Makes it a `hostNetwork` pod, as a DaemonSet of node agents or a node-local
    /// server would be: it shares its node's network namespace and addresses (no veth,
    /// no address of its own), so policies never select it and its traffic is the
    /// node's.
    pub fn host_network(mut self) -> Self {
        self.host_network = true;
        self
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
