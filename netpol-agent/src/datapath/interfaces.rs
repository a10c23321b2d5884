//! Which of the node's interfaces are what, from the kernel alone: the host-side
//! interface of each local pod, the interfaces named like pods', the interfaces that may
//! never carry a pod's programs, and the exit devices. Pure: [`crate::node`] reads what
//! the kernel says into a [`Kernel`], `attach.rs` acts on the [`Assignment`].
//!
//! A pod's interface is where the kernel delivers its addresses:
//! - a host route (/32, /128) to an interface that is not a bridge: ptp-style CNIs
//!   (Calico, Cilium, kindnet, the lab);
//! - on a Linux bridge (the bridge plugin, flannel: no per-pod route), the bridge port
//!   whose veth peer, in the pod's network namespace, carries the address; where the far
//!   end of a port cannot be read, the port the bridge's forwarding database holds for
//!   the MAC of the address's neighbour entry on that bridge (only a port named like a
//!   pod's, since nothing else vouches for it).
//!
//! No interface name comes from a pod object. In local mode the operator may name one
//! (`LocalPod::host_interface`), which is used only when it is named like a pod's
//! interface (`--pod-interface-prefix`), may carry pod programs ([`unfit`]) and is
//! neither another pod's nor contradicted by the kernel; otherwise it is refused with a
//! reason ([`RefusedName`]) and the kernel's answer stands.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use netpol_compile::LocalPod;
use netpol_compile::state::ObjectRef;

use crate::node::{FdbEntry, Link, Neighbour, Route};

/// What the kernel says about the node's interfaces, read once per reconciliation.
#[derive(Clone, Debug, Default)]
pub struct Kernel {
    pub links: Vec<Link>,
    pub routes: Vec<Route>,
    /// Neighbour entries (read only when some pod has no host route).
    pub neighbours: Vec<Neighbour>,
    /// Bridge forwarding database entries (idem).
    pub fdb: Vec<FdbEntry>,
    /// The addresses at the far end of bridge ports that are veths (their peers', in
    /// other network namespaces), by port index. A port missing here was not read.
    pub behind_ports: BTreeMap<u32, Vec<IpAddr>>,
}

impl Kernel {
    pub fn link(&self, index: u32) -> Option<&Link> {
        self.links.iter().find(|link| link.index == index)
    }

    pub fn link_named(&self, name: &str) -> Option<&Link> {
        self.links.iter().find(|link| link.name == name)
    }

    fn is_bridge(&self, index: u32) -> bool {
        self.link(index).is_some_and(|link| link.bridge)
    }

    /// The interface of the host route (/32, /128) of `ip`, if any ([`crate::node::interface_for`]).
    fn host_route(&self, ip: IpAddr) -> Option<&Link> {
        self.link_named(crate::node::interface_for(&self.routes, ip)?)
    }

    /// Whether the kernel has a host route for one of `ips` to an interface that is not
    /// a bridge: such a pod needs no look at neighbours, FDBs or veth peers.
    pub fn routes_to_a_port(&self, ips: &[IpAddr]) -> bool {
        ips.iter()
            .any(|ip| self.host_route(*ip).is_some_and(|link| !link.bridge))
    }

    /// Ports of bridges that are veths: `(port index, (peer namespace id, peer index))`.
    pub fn veth_bridge_ports(&self) -> impl Iterator<Item = (u32, (i32, u32))> + '_ {
        self.links.iter().filter_map(|link| {
            let master = link.master?;
            self.is_bridge(master).then_some((link.index, link.peer?))
        })
    }
}

/// Why an interface never gets a pod's programs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Unfit {
    Loopback,
    Bridge,
    /// It carries an address of a network the node is on ([`is_node_address`]).
    NodeAddress(ipnet::IpNet),
    /// A default route leads to it: the node's uplink.
    Uplink,
}

impl std::fmt::Display for Unfit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Unfit::Loopback => f.write_str("it is the loopback interface"),
            Unfit::Bridge => f.write_str("it is a bridge"),
            Unfit::NodeAddress(net) => write!(f, "it carries the node address {net}"),
            Unfit::Uplink => f.write_str("the node's default route leads to it"),
        }
    }
}

/// An address of a network the node is on: not link-local, with a network prefix (the
/// uplink's, an underlay's, a bridge's). A host-length address, such as the gateway
/// address the ptp plugin (kindnet) puts on every pod's veth, is not one.
pub fn is_node_address(net: &ipnet::IpNet) -> bool {
    let link_local = match net.addr() {
        IpAddr::V4(v4) => v4.is_link_local(),
        IpAddr::V6(v6) => v6.is_unicast_link_local(),
    };
    !link_local && net.prefix_len() < net.max_prefix_len()
}

/// Whether `link` may never carry a pod's programs, and why: loopback, a bridge, an
/// interface carrying a node address, the uplink. Programs there would judge the
/// node's own traffic as a pod's (and drop it as spoofed).
pub fn unfit(kernel: &Kernel, link: &Link) -> Option<Unfit> {
    if link.loopback || link.name == "lo" {
        return Some(Unfit::Loopback);
    }
    if link.bridge {
        return Some(Unfit::Bridge);
    }
    if let Some(net) = link.addresses.iter().find(|net| is_node_address(net)) {
        return Some(Unfit::NodeAddress(*net));
    }
    let uplink = kernel
        .routes
        .iter()
        .any(|route| route.destination.prefix_len() == 0 && route.interface == link.name);
    uplink.then_some(Unfit::Uplink)
}

/// Whether `name` is the host side of a pod's interface by the configured prefixes
/// (loopback never is).
pub fn is_pod_interface(name: &str, prefixes: &[String]) -> bool {
    name != "lo"
        && prefixes
            .iter()
            .any(|p| !p.is_empty() && name.starts_with(p.as_str()))
}

/// Index of an interface by name, `None` if it does not exist (now).
pub fn ifindex(name: &str) -> Option<u32> {
    nix::net::if_::if_nametoindex(name).ok()
}

/// How a pod's interface was found.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Via {
    /// The host route of one of its addresses.
    Route,
    /// A port of this bridge.
    Bridge(u32),
}

/// What the kernel says about one pod's interface.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Discovery {
    Found {
        index: u32,
        via: Via,
    },
    /// Nothing leads to the pod's addresses (yet): no host route, no bridge port.
    NotFound,
    /// Its addresses lead to several interfaces; none is taken as the pod's.
    Ambiguous(Vec<u32>),
    /// What leads to it may not carry pod programs.
    Unfit {
        index: u32,
        why: Unfit,
    },
}

/// The interface the kernel delivers the addresses `ips` to (see the module
/// documentation); `prefixes` name pods' interfaces (`--pod-interface-prefix`).
pub fn pod_interface(kernel: &Kernel, ips: &[IpAddr], prefixes: &[String]) -> Discovery {
    let mut found: BTreeMap<u32, Via> = BTreeMap::new();
    let mut refused = None;
    for &ip in ips {
        let candidates: Vec<(u32, Via)> = match kernel.host_route(ip) {
            Some(link) if !link.bridge => vec![(link.index, Via::Route)],
            _ => bridge_ports_of(kernel, ip, prefixes),
        };
        for (index, via) in candidates {
            match kernel.link(index).and_then(|link| unfit(kernel, link)) {
                None => {
                    found.insert(index, via);
                }
                Some(why) => refused = Some(Discovery::Unfit { index, why }),
            }
        }
    }
    match found.len() {
        0 => refused.unwrap_or(Discovery::NotFound),
        1 => {
            let (index, via) = found.pop_first().expect("one");
            Discovery::Found { index, via }
        }
        _ => Discovery::Ambiguous(found.into_keys().collect()),
    }
}

/// The bridge ports `ip` sits behind: those whose veth peer carries it; failing that,
/// the ports the FDB holds for the MAC of its neighbour entries on bridges, when the
/// port's far end is unknown and the port is named like a pod's.
fn bridge_ports_of(kernel: &Kernel, ip: IpAddr, prefixes: &[String]) -> Vec<(u32, Via)> {
    let behind: BTreeSet<(u32, Via)> = kernel
        .links
        .iter()
        .filter_map(|port| {
            let bridge = port.master.filter(|m| kernel.is_bridge(*m))?;
            let addresses = kernel.behind_ports.get(&port.index)?;
            addresses
                .contains(&ip)
                .then_some((port.index, Via::Bridge(bridge)))
        })
        .collect();
    if !behind.is_empty() {
        return behind.into_iter().collect();
    }
    let learned: BTreeSet<(u32, Via)> = kernel
        .neighbours
        .iter()
        .filter(|neighbour| neighbour.ip == ip && kernel.is_bridge(neighbour.interface))
        .flat_map(|neighbour| {
            kernel.fdb.iter().filter(move |entry| {
                entry.bridge == neighbour.interface
                    && entry.mac == neighbour.mac
                    && entry.port != entry.bridge
            })
        })
        .filter(|entry| !kernel.behind_ports.contains_key(&entry.port))
        .filter(|entry| {
            kernel.link(entry.port).is_some_and(|port| {
                port.master == Some(entry.bridge) && is_pod_interface(&port.name, prefixes)
            })
        })
        .map(|entry| (entry.port, Via::Bridge(entry.bridge)))
        .collect();
    learned.into_iter().collect()
}

/// An interface the operator named for a pod (local mode) that is not used.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RefusedName {
    pub pod: ObjectRef,
    pub interface: String,
    pub reason: String,
}

/// Where the programs go and whom each interface belongs to.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Assignment {
    /// Interfaces that get the pod programs: the local pods' and those named like
    /// pods' (`--pod-interface-prefix`), all fit ([`unfit`]), by name.
    pub interfaces: BTreeMap<String, u32>,
    /// The endpoints whose pods sit behind each interface (one, unless misconfigured).
    pub owners: BTreeMap<u32, Vec<u32>>,
    /// Pods whose interface is not found (yet), with why.
    pub pending: Vec<String>,
    /// Names the operator gave that are not used.
    pub refused_names: Vec<RefusedName>,
    /// Interfaces named like pods' that never get the programs, with why.
    pub unfit_named: Vec<(String, Unfit)>,
}

/// Assigns interfaces: those named like pods' that may carry pod programs and, with
/// `pods` (`None`: not known yet), each pod's interface ([`pod_interface`], or the one
/// the operator named when it passes every check).
pub fn assign(kernel: &Kernel, pods: Option<&[LocalPod]>, prefixes: &[String]) -> Assignment {
    let mut out = Assignment::default();
    for link in &kernel.links {
        if !is_pod_interface(&link.name, prefixes) {
            continue;
        }
        match unfit(kernel, link) {
            None => {
                out.interfaces.insert(link.name.clone(), link.index);
            }
            Some(why) => out.unfit_named.push((link.name.clone(), why)),
        }
    }
    let Some(pods) = pods else {
        return out;
    };
    let discovered: Vec<Discovery> = pods
        .iter()
        .map(|pod| pod_interface(kernel, &pod.ips, prefixes))
        .collect();
    let mut claimed: BTreeMap<u32, &ObjectRef> = BTreeMap::new();
    for (pod, discovery) in pods.iter().zip(&discovered) {
        if let Discovery::Found { index, .. } = discovery {
            claimed.insert(*index, &pod.pod);
        }
    }
    let name_of = |index: u32| {
        kernel
            .link(index)
            .map_or_else(|| format!("#{index}"), |link| link.name.clone())
    };
    for (pod, discovery) in pods.iter().zip(&discovered) {
        let from_kernel = match discovery {
            Discovery::Found { index, .. } => Some(*index),
            _ => None,
        };
        let mut chosen = from_kernel;
        if let Some(name) = &pod.host_interface {
            match check_named(kernel, pod, name, discovery, &claimed, prefixes) {
                Ok(Some(index)) => chosen = Some(index),
                Ok(None) => {
                    if from_kernel.is_none() {
                        out.pending
                            .push(format!("{} (interface {name} does not exist)", pod.pod));
                        continue;
                    }
                }
                Err(reason) => out.refused_names.push(RefusedName {
                    pod: pod.pod.clone(),
                    interface: name.clone(),
                    reason,
                }),
            }
        }
        match chosen {
            Some(index) => {
                out.interfaces.insert(name_of(index), index);
                out.owners.entry(index).or_default().push(pod.endpoint_id);
            }
            None => out.pending.push(format!(
                "{} ({})",
                pod.pod,
                match discovery {
                    Discovery::Ambiguous(indexes) => format!(
                        "its addresses lead to several interfaces: {}",
                        indexes
                            .iter()
                            .map(|i| name_of(*i))
                            .collect::<Vec<_>>()
                            .join(", ")
                    ),
                    Discovery::Unfit { index, why } => {
                        format!("its addresses lead to {}, but {why}", name_of(*index))
                    }
                    _ => "no host route or bridge port leads to it yet".to_owned(),
                }
            )),
        }
    }
    out
}

/// The interface the operator named for `pod`, if it may be its: `Ok(None)` when it does
/// not exist (yet), `Err` with the reason when it is refused.
fn check_named(
    kernel: &Kernel,
    pod: &LocalPod,
    name: &str,
    discovery: &Discovery,
    claimed: &BTreeMap<u32, &ObjectRef>,
    prefixes: &[String],
) -> Result<Option<u32>, String> {
    if !is_pod_interface(name, prefixes) {
        return Err(format!(
            "interface {name:?} is not named like a pod's interface (--pod-interface-prefix {})",
            prefixes.join(",")
        ));
    }
    let Some(link) = kernel.link_named(name) else {
        return Ok(None);
    };
    if let Some(why) = unfit(kernel, link) {
        return Err(format!(
            "interface {name:?} may not carry pod programs: {why}"
        ));
    }
    if let Some(other) = claimed.get(&link.index).filter(|other| ***other != pod.pod) {
        return Err(format!(
            "interface {name:?} is Pod {other}'s: the kernel delivers its addresses there"
        ));
    }
    match discovery {
        Discovery::Found { index, .. } if *index != link.index => Err(format!(
            "the kernel delivers the pod's addresses to {}, not {name:?}",
            kernel
                .link(*index)
                .map_or_else(|| format!("#{index}"), |l| l.name.clone())
        )),
        _ => Ok(Some(link.index)),
    }
}

/// The node's exit devices: every interface a route leads to (the uplink, overlay
/// devices such as `flannel.1` or `vxlan.calico`, bridges, links to other nodes or
/// hosts) but loopback and the pods' own interfaces. A Service connection that kube-proxy
/// translated to a backend on another node leaves through one of them.
pub fn exit_devices(
    routes: &[Route],
    pod_interfaces: &BTreeSet<&str>,
    prefixes: &[String],
) -> BTreeSet<String> {
    routes
        .iter()
        .map(|route| route.interface.as_str())
        .filter(|name| {
            *name != "lo" && !pod_interfaces.contains(name) && !is_pod_interface(name, prefixes)
        })
        .map(str::to_owned)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn route(destination: &str, interface: &str) -> Route {
        Route {
            destination: destination.parse().unwrap(),
            interface: interface.to_owned(),
        }
    }

    #[test]
    fn exit_devices_are_the_routed_interfaces_that_are_neither_pods_nor_loopback() {
        let routes = [
            route("0.0.0.0/0", "eth0"),
            route("10.244.1.0/24", "flannel.1"),
            route("10.244.0.7/32", "veth1234"),
            route("10.244.0.8/32", "pod-b"),
            route("169.254.1.1/32", "lo"),
            route("::/0", "eth0"),
        ];
        let pods = BTreeSet::from(["pod-b"]);
        let exits = exit_devices(&routes, &pods, &["veth".to_owned()]);
        assert_eq!(exits.into_iter().collect::<Vec<_>>(), ["eth0", "flannel.1"]);
    }

    #[test]
    fn pod_interfaces_are_recognised_by_prefix() {
        let prefixes = vec!["veth".to_string(), "cali".to_string(), String::new()];
        assert!(is_pod_interface("veth1a2b", &prefixes));
        assert!(is_pod_interface("cali0123", &prefixes));
        // An empty prefix matches nothing rather than everything.
        assert!(!is_pod_interface("eth0", &prefixes));
        assert!(!is_pod_interface("lo", &["l".to_string()]));
    }

    // --- A node as the kernel describes it -------------------------------------------

    const LO: u32 = 1;
    const ETH0: u32 = 2;
    const VETH_A: u32 = 3;
    const VETH_B: u32 = 4;
    const CNI0: u32 = 10;
    const VETH_C: u32 = 11;
    const VETH_D: u32 = 12;
    const TAP_E: u32 = 13;

    fn link(index: u32, name: &str, addresses: &[&str]) -> Link {
        Link {
            index,
            name: name.to_owned(),
            addresses: addresses.iter().map(|a| a.parse().unwrap()).collect(),
            ..Link::default()
        }
    }

    fn port(index: u32, name: &str, peer: Option<(i32, u32)>) -> Link {
        Link {
            master: Some(CNI0),
            peer,
            ..link(index, name, &["fe80::1/64"])
        }
    }

    fn mac(last: u8) -> Vec<u8> {
        vec![2, 0, 0, 0, 0, last]
    }

    fn ip(text: &str) -> IpAddr {
        text.parse().unwrap()
    }

    /// A node with an uplink, two routed pods (a, b: host routes to their veths; the
    /// ptp plugin's gateway address on a's veth), and a bridge cni0 with three ports:
    /// veths of c and d (their far ends readable) and a tap for e (not a veth).
    fn node() -> Kernel {
        Kernel {
            links: vec![
                Link {
                    loopback: true,
                    ..link(LO, "lo", &["127.0.0.1/8", "::1/128"])
                },
                link(ETH0, "eth0", &["192.168.1.5/24", "fe80::5/64"]),
                link(VETH_A, "veth-a", &["10.244.0.1/32", "fe80::1/64"]),
                link(VETH_B, "veth-b", &[]),
                Link {
                    bridge: true,
                    ..link(CNI0, "cni0", &["10.85.0.1/24"])
                },
                port(VETH_C, "veth-c", Some((1, 2))),
                port(VETH_D, "veth-d", Some((2, 2))),
                port(TAP_E, "veth-e", None),
            ],
            routes: vec![
                route("0.0.0.0/0", "eth0"),
                route("192.168.1.0/24", "eth0"),
                route("10.244.0.2/32", "veth-a"),
                route("10.244.0.3/32", "veth-b"),
                route("fd00::3/128", "veth-b"),
                route("10.85.0.0/24", "cni0"),
            ],
            neighbours: vec![
                Neighbour {
                    interface: CNI0,
                    ip: ip("10.85.0.3"),
                    mac: mac(3),
                },
                Neighbour {
                    interface: CNI0,
                    ip: ip("10.85.0.5"),
                    mac: mac(5),
                },
                Neighbour {
                    interface: ETH0,
                    ip: ip("192.168.1.1"),
                    mac: mac(1),
                },
            ],
            fdb: vec![
                FdbEntry {
                    mac: mac(3),
                    port: VETH_C,
                    bridge: CNI0,
                },
                FdbEntry {
                    mac: mac(5),
                    port: TAP_E,
                    bridge: CNI0,
                },
            ],
            behind_ports: BTreeMap::from([
                (VETH_C, vec![ip("127.0.0.1"), ip("10.85.0.3")]),
                (VETH_D, vec![ip("10.85.0.4")]),
            ]),
        }
    }

    fn prefixes() -> Vec<String> {
        vec!["veth".to_owned()]
    }

    fn discover(kernel: &Kernel, ips: &[&str]) -> Discovery {
        let ips: Vec<IpAddr> = ips.iter().map(|i| ip(i)).collect();
        pod_interface(kernel, &ips, &prefixes())
    }

    #[test]
    fn a_routed_pod_is_behind_the_interface_of_its_host_route() {
        let kernel = node();
        assert_eq!(
            discover(&kernel, &["10.244.0.2"]),
            Discovery::Found {
                index: VETH_A,
                via: Via::Route
            },
            "the ptp gateway's host address on the veth is no node address"
        );
        assert_eq!(
            discover(&kernel, &["10.244.0.3", "fd00::3"]),
            Discovery::Found {
                index: VETH_B,
                via: Via::Route
            }
        );
    }

    #[test]
    fn a_pod_on_a_bridge_is_behind_the_port_whose_peer_carries_its_address() {
        let kernel = node();
        // d has no neighbour entry (it never spoke): its port's far end says it is there.
        assert_eq!(
            discover(&kernel, &["10.85.0.4"]),
            Discovery::Found {
                index: VETH_D,
                via: Via::Bridge(CNI0)
            }
        );
        assert_eq!(
            discover(&kernel, &["10.85.0.3"]),
            Discovery::Found {
                index: VETH_C,
                via: Via::Bridge(CNI0)
            }
        );
        // The subnet route leads to the bridge itself, which is never a pod's interface.
        assert_eq!(discover(&kernel, &["10.85.0.9"]), Discovery::NotFound);
    }

    #[test]
    fn a_port_whose_far_end_is_unknown_is_found_through_the_neighbour_entry_and_the_fdb() {
        let kernel = node();
        // e's port is no veth: pod IP -> neighbour entry on cni0 -> MAC -> FDB -> port.
        assert_eq!(
            discover(&kernel, &["10.85.0.5"]),
            Discovery::Found {
                index: TAP_E,
                via: Via::Bridge(CNI0)
            }
        );
        // A port not named like a pod's is not taken on the FDB's word alone (an uplink
        // enslaved to the bridge: a pod could point its address's neighbour entry at
        // some outside MAC learned there).
        let mut renamed = node();
        renamed
            .links
            .iter_mut()
            .find(|l| l.index == TAP_E)
            .unwrap()
            .name = "eno1".into();
        assert_eq!(discover(&renamed, &["10.85.0.5"]), Discovery::NotFound);
    }

    #[test]
    fn a_poisoned_neighbour_entry_cannot_move_a_pod_onto_a_port_whose_far_end_says_otherwise() {
        let mut kernel = node();
        // A pod behind veth-d answers ARP for 10.85.0.6 with its own MAC (and the bridge
        // learned that MAC on veth-d): the far end of veth-d does not carry 10.85.0.6.
        kernel.neighbours.push(Neighbour {
            interface: CNI0,
            ip: ip("10.85.0.6"),
            mac: mac(4),
        });
        kernel.fdb.push(FdbEntry {
            mac: mac(4),
            port: VETH_D,
            bridge: CNI0,
        });
        assert_eq!(discover(&kernel, &["10.85.0.6"]), Discovery::NotFound);
        // Nor can it move c (whose far end is known): c's own port stands.
        kernel.neighbours[0].mac = mac(4);
        assert_eq!(
            discover(&kernel, &["10.85.0.3"]),
            Discovery::Found {
                index: VETH_C,
                via: Via::Bridge(CNI0)
            }
        );
    }

    #[test]
    fn an_address_behind_two_ports_is_nobodys() {
        let mut kernel = node();
        // The pod behind veth-d added c's address to its interface.
        kernel
            .behind_ports
            .get_mut(&VETH_D)
            .unwrap()
            .push(ip("10.85.0.3"));
        assert_eq!(
            discover(&kernel, &["10.85.0.3"]),
            Discovery::Ambiguous(vec![VETH_C, VETH_D])
        );
    }

    #[test]
    fn loopback_bridges_uplinks_and_interfaces_with_node_addresses_are_never_a_pods() {
        let mut kernel = node();
        kernel.routes.push(route("10.9.0.1/32", "lo"));
        kernel.routes.push(route("10.9.0.2/32", "eth0"));
        kernel.routes.push(route("10.9.0.3/32", "cni0"));
        let lo = kernel.link(LO).unwrap().clone();
        let eth0 = kernel.link(ETH0).unwrap().clone();
        let cni0 = kernel.link(CNI0).unwrap().clone();
        assert_eq!(unfit(&kernel, &lo), Some(Unfit::Loopback));
        assert_eq!(unfit(&kernel, &cni0), Some(Unfit::Bridge));
        assert_eq!(
            unfit(&kernel, &eth0),
            Some(Unfit::NodeAddress("192.168.1.5/24".parse().unwrap()))
        );
        // An uplink whose address is a host address (as on some clouds): the default
        // route says what it is.
        let mut bare = eth0.clone();
        bare.addresses = vec!["10.128.0.2/32".parse().unwrap()];
        assert_eq!(unfit(&kernel, &bare), Some(Unfit::Uplink));
        // Host routes leading there find nothing a pod's programs may go on (lo is not
        // even a route in `interface_for`).
        assert_eq!(discover(&kernel, &["10.9.0.1"]), Discovery::NotFound);
        assert_eq!(
            discover(&kernel, &["10.9.0.2"]),
            Discovery::Unfit {
                index: ETH0,
                why: Unfit::NodeAddress("192.168.1.5/24".parse().unwrap())
            }
        );
        assert_eq!(discover(&kernel, &["10.9.0.3"]), Discovery::NotFound);
    }

    fn local_pod(name: &str, endpoint_id: u32, ips: &[&str], named: Option<&str>) -> LocalPod {
        LocalPod {
            pod: ObjectRef::new("x", name),
            endpoint_id,
            ips: ips.iter().map(|i| ip(i)).collect(),
            host_interface: named.map(str::to_owned),
            ingress_policies: Vec::new(),
            egress_policies: Vec::new(),
        }
    }

    fn pods(named_by_a: Option<&str>) -> Vec<LocalPod> {
        vec![
            local_pod("a", 1, &["10.244.0.2"], named_by_a),
            local_pod("b", 2, &["10.244.0.3"], None),
            local_pod("c", 3, &["10.85.0.3"], None),
            local_pod("d", 4, &["10.85.0.4"], None),
        ]
    }

    #[test]
    fn every_pod_gets_its_interface_and_nothing_else_is_attached() {
        let kernel = node();
        let assignment = assign(&kernel, Some(&pods(None)), &prefixes());
        assert_eq!(
            assignment.interfaces,
            BTreeMap::from([
                ("veth-a".to_owned(), VETH_A),
                ("veth-b".to_owned(), VETH_B),
                ("veth-c".to_owned(), VETH_C),
                ("veth-d".to_owned(), VETH_D),
                ("veth-e".to_owned(), TAP_E),
            ])
        );
        assert_eq!(
            assignment.owners,
            BTreeMap::from([
                (VETH_A, vec![1]),
                (VETH_B, vec![2]),
                (VETH_C, vec![3]),
                (VETH_D, vec![4]),
            ])
        );
        assert!(assignment.pending.is_empty(), "{:?}", assignment.pending);
        assert!(assignment.refused_names.is_empty());
    }

    #[test]
    fn interfaces_named_like_pods_but_unfit_get_no_programs() {
        let kernel = node();
        // A prefix that also matches the uplink and the bridge.
        let prefixes = ["veth".to_owned(), "eth".to_owned(), "cni".to_owned()];
        let assignment = assign(&kernel, None, &prefixes);
        assert!(!assignment.interfaces.contains_key("eth0"));
        assert!(!assignment.interfaces.contains_key("cni0"));
        assert!(assignment.interfaces.contains_key("veth-a"));
        assert_eq!(
            assignment.unfit_named,
            [
                (
                    "eth0".to_owned(),
                    Unfit::NodeAddress("192.168.1.5/24".parse().unwrap())
                ),
                ("cni0".to_owned(), Unfit::Bridge)
            ]
        );
    }

    #[test]
    fn hostile_names_are_refused_and_change_nothing() {
        let kernel = node();
        let expected = assign(&kernel, Some(&pods(None)), &prefixes());
        for (named, why) in [
            ("eth0", "not named like a pod's interface"),
            ("lo", "not named like a pod's interface"),
            ("veth-b", "is Pod x/b's"),
            ("veth-d", "is Pod x/d's"),
            ("veth-e", "delivers the pod's addresses to veth-a"),
        ] {
            let assignment = assign(&kernel, Some(&pods(Some(named))), &prefixes());
            assert_eq!(assignment.interfaces, expected.interfaces, "{named}");
            assert_eq!(assignment.owners, expected.owners, "{named}");
            let [refused] = assignment.refused_names.as_slice() else {
                panic!("{named}: {:?}", assignment.refused_names);
            };
            assert_eq!(refused.pod, ObjectRef::new("x", "a"));
            assert_eq!(refused.interface, named);
            assert!(refused.reason.contains(why), "{named}: {}", refused.reason);
        }
        // Prefixes that match them do not make loopback, the uplink or a bridge fit.
        let wide = [
            "veth".to_owned(),
            "e".to_owned(),
            "l".to_owned(),
            "c".to_owned(),
        ];
        for (named, why) in [
            ("eth0", "carries the node address 192.168.1.5/24"),
            ("lo", "not named like a pod's interface"),
            ("cni0", "it is a bridge"),
        ] {
            let assignment = assign(&kernel, Some(&pods(Some(named))), &wide);
            assert!(!assignment.interfaces.contains_key(named), "{named}");
            assert_eq!(assignment.owners, expected.owners, "{named}");
            assert!(
                assignment.refused_names[0].reason.contains(why),
                "{named}: {}",
                assignment.refused_names[0].reason
            );
        }
    }

    #[test]
    fn a_name_the_kernel_agrees_with_or_cannot_contradict_is_used() {
        let mut kernel = node();
        let agreed = assign(&kernel, Some(&pods(Some("veth-a"))), &prefixes());
        assert!(agreed.refused_names.is_empty());
        assert_eq!(agreed.owners[&VETH_A], [1]);
        // Without a host route, the named interface is the pod's.
        kernel.routes.retain(|r| r.interface != "veth-a");
        kernel.links.push(link(20, "veth-z", &[]));
        let named = assign(&kernel, Some(&pods(Some("veth-z"))), &prefixes());
        assert!(named.refused_names.is_empty());
        assert_eq!(named.owners[&20], [1]);
        assert!(!named.owners.contains_key(&VETH_A));
        // A name that does not exist yet is pending, not refused.
        let missing = assign(&kernel, Some(&pods(Some("veth-new"))), &prefixes());
        assert!(missing.refused_names.is_empty());
        assert_eq!(missing.pending, ["x/a (interface veth-new does not exist)"]);
    }

    #[test]
    fn a_pod_nothing_leads_to_is_pending_with_the_reason() {
        let mut kernel = node();
        kernel.routes.push(route("10.9.0.2/32", "eth0"));
        let pods = [
            local_pod("gone", 7, &["10.85.0.99"], None),
            local_pod("odd", 8, &["10.9.0.2"], None),
        ];
        let assignment = assign(&kernel, Some(&pods), &prefixes());
        assert_eq!(
            assignment.pending,
            [
                "x/gone (no host route or bridge port leads to it yet)",
                "x/odd (its addresses lead to eth0, but it carries the node address \
                 192.168.1.5/24)"
            ]
        );
        assert!(assignment.owners.is_empty());
    }
}
