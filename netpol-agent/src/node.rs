//! The node as the agent's network namespace sees it: its own addresses (`getifaddrs`),
//! and rtnetlink dumps of its routes (every routing table, IPv4 and IPv6), interfaces
//! (kind, bridge, veth peer, addresses), neighbour entries and bridge forwarding
//! databases, from which the datapath finds the host-side interface of a pod
//! (`datapath/interfaces.rs`), and the addresses of a veth peer's namespace.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::os::fd::AsRawFd as _;

use netlink_packet_core::{
    NLM_F_DUMP, NLM_F_REQUEST, NetlinkHeader, NetlinkMessage, NetlinkPayload,
};
use netlink_packet_route::address::{AddressAttribute, AddressMessage};
use netlink_packet_route::link::{InfoKind, LinkAttribute, LinkFlags, LinkInfo, LinkMessage};
use netlink_packet_route::neighbour::{
    NeighbourAddress, NeighbourAttribute, NeighbourMessage, NeighbourState,
};
use netlink_packet_route::route::{RouteAddress, RouteAttribute, RouteMessage, RouteType};
use netlink_packet_route::{AddressFamily, RouteNetlinkMessage};
use nix::sys::socket::{
    AddressFamily as SocketFamily, MsgFlags, NetlinkAddr, SockFlag, SockProtocol, SockType, bind,
    recv, send, socket,
};

/// Interfaces whose addresses are not the node's own: kube-proxy's IPVS mode puts every
/// ClusterIP on the dummy `kube-ipvs0` so that the kernel accepts them locally, but they
/// are Service addresses (judged after translation), never node addresses (always
/// allowed towards pods).
pub const SERVICE_ADDRESS_INTERFACES: [&str; 1] = ["kube-ipvs0"];

/// Every address configured on an interface of this network namespace, but those of
/// [`SERVICE_ADDRESS_INTERFACES`].
pub fn addresses() -> std::io::Result<Vec<IpAddr>> {
    let mut addresses: Vec<IpAddr> = nix::ifaddrs::getifaddrs()
        .map_err(std::io::Error::from)?
        .filter(|ifaddr| !SERVICE_ADDRESS_INTERFACES.contains(&ifaddr.interface_name.as_str()))
        .filter_map(|ifaddr| {
            let address = ifaddr.address?;
            if let Some(v4) = address.as_sockaddr_in() {
                Some(IpAddr::V4(v4.ip()))
            } else {
                address.as_sockaddr_in6().map(|v6| IpAddr::V6(v6.ip()))
            }
        })
        .collect();
    addresses.sort();
    addresses.dedup();
    Ok(addresses)
}

/// [`addresses`] for a source's node context: none when they cannot be listed (logged),
/// so that a failure costs the node addresses, not the snapshot.
pub fn addresses_or_none() -> Vec<IpAddr> {
    addresses().unwrap_or_else(|error| {
        tracing::warn!(%error, "cannot list node addresses");
        Vec::new()
    })
}

/// One route: destination prefix -> output interface.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Route {
    pub destination: ipnet::IpNet,
    pub interface: String,
}

/// The interface of the host route (/32 or /128) of `ip`: how ptp-style CNIs (Calico,
/// Cilium, kindnet, the lab) reach a pod through its host-side veth. Shorter prefixes
/// never count: a default or subnet route leads to an uplink or a bridge, and programs
/// must never be attached there.
pub fn interface_for(routes: &[Route], ip: IpAddr) -> Option<&str> {
    routes
        .iter()
        .find(|route| {
            route.interface != "lo"
                && route.destination.addr() == ip
                && route.destination.prefix_len() == route.destination.max_prefix_len()
        })
        .map(|route| route.interface.as_str())
}

/// The route a netlink route message describes, when it forwards to one interface:
/// unicast routes of any table; local, broadcast, unreachable and other kinds, and
/// multipath routes without a single output interface, are none. `name_of` names an
/// interface index.
pub fn route_of(message: &RouteMessage, name_of: impl Fn(u32) -> Option<String>) -> Option<Route> {
    if message.header.kind != RouteType::Unicast {
        return None;
    }
    let mut destination = match message.header.address_family {
        AddressFamily::Inet => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
        AddressFamily::Inet6 => IpAddr::V6(Ipv6Addr::UNSPECIFIED),
        _ => return None,
    };
    let mut interface = None;
    for attribute in &message.attributes {
        match attribute {
            RouteAttribute::Destination(RouteAddress::Inet(ip)) => destination = (*ip).into(),
            RouteAttribute::Destination(RouteAddress::Inet6(ip)) => destination = (*ip).into(),
            RouteAttribute::Oif(index) => interface = Some(*index),
            _ => {}
        }
    }
    let destination =
        ipnet::IpNet::new(destination, message.header.destination_prefix_length).ok()?;
    Some(Route {
        destination,
        interface: name_of(interface?)?,
    })
}

/// All routes of the current network namespace, from every routing table.
pub fn read_routes() -> std::io::Result<Vec<Route>> {
    let mut socket = Rtnl::open(false)?;
    let name_of = |index: u32| {
        nix::net::if_::if_indextoname(index)
            .ok()
            .map(|name| name.to_string_lossy().into_owned())
    };
    let mut routes = Vec::new();
    for family in [AddressFamily::Inet, AddressFamily::Inet6] {
        let mut request = RouteMessage::default();
        request.header.address_family = family;
        for message in socket.dump(RouteNetlinkMessage::GetRoute(request))? {
            if let RouteNetlinkMessage::NewRoute(route) = message {
                routes.extend(route_of(&route, name_of));
            }
        }
    }
    Ok(routes)
}

/// A network interface of this namespace, as rtnetlink describes it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Link {
    pub index: u32,
    pub name: String,
    pub loopback: bool,
    /// A Linux bridge (`IFLA_INFO_KIND` "bridge").
    pub bridge: bool,
    /// The bridge (or bond, VRF) it is a port of (`IFLA_MASTER`).
    pub master: Option<u32>,
    /// Its peer in another network namespace (veth): `(namespace id as this namespace
    /// numbers it, the peer's index there)`.
    pub peer: Option<(i32, u32)>,
    /// Its addresses with their prefix lengths.
    pub addresses: Vec<ipnet::IpNet>,
}

/// The link a netlink link message describes (without addresses).
pub fn link_of(message: &LinkMessage) -> Option<Link> {
    let mut link = Link {
        index: message.header.index,
        loopback: message.header.flags.contains(LinkFlags::Loopback),
        ..Link::default()
    };
    let (mut peer_index, mut peer_netns) = (None, None);
    for attribute in &message.attributes {
        match attribute {
            LinkAttribute::IfName(name) => link.name.clone_from(name),
            LinkAttribute::Controller(master) => link.master = Some(*master),
            LinkAttribute::Link(index) => peer_index = Some(*index),
            LinkAttribute::LinkNetNsId(id) => peer_netns = Some(*id),
            LinkAttribute::LinkInfo(infos) => {
                link.bridge |= infos
                    .iter()
                    .any(|info| matches!(info, LinkInfo::Kind(InfoKind::Bridge)));
            }
            _ => {}
        }
    }
    link.peer = peer_netns.zip(peer_index);
    (!link.name.is_empty()).then_some(link)
}

/// An address a netlink address message describes: `(interface index, address with its
/// prefix length)`. For IPv4 the local address (`IFA_LOCAL`: on point-to-point links
/// `IFA_ADDRESS` is the other end's).
pub fn address_of(message: &AddressMessage) -> Option<(u32, ipnet::IpNet)> {
    let mut address = None;
    let mut local = None;
    for attribute in &message.attributes {
        match attribute {
            AddressAttribute::Address(ip) => address = Some(*ip),
            AddressAttribute::Local(ip) => local = Some(*ip),
            _ => {}
        }
    }
    let ip = local.or(address)?;
    let net = ipnet::IpNet::new(ip, message.header.prefix_len).ok()?;
    Some((message.header.index, net))
}

/// Every interface of this namespace with its addresses.
pub fn read_links() -> std::io::Result<Vec<Link>> {
    let mut socket = Rtnl::open(false)?;
    let mut links: Vec<Link> = socket
        .dump(RouteNetlinkMessage::GetLink(LinkMessage::default()))?
        .iter()
        .filter_map(|message| match message {
            RouteNetlinkMessage::NewLink(link) => link_of(link),
            _ => None,
        })
        .collect();
    for family in [AddressFamily::Inet, AddressFamily::Inet6] {
        let mut request = AddressMessage::default();
        request.header.family = family;
        for message in socket.dump(RouteNetlinkMessage::GetAddress(request))? {
            let RouteNetlinkMessage::NewAddress(message) = message else {
                continue;
            };
            if let Some((index, net)) = address_of(&message)
                && let Some(link) = links.iter_mut().find(|link| link.index == index)
            {
                link.addresses.push(net);
            }
        }
    }
    Ok(links)
}

/// The addresses of the interfaces of another network namespace, the one this namespace
/// numbers `netns_id` (a veth's peer namespace, [`Link::peer`]): `(index there,
/// address)`. rtnetlink reads it without entering it (`IFA_TARGET_NETNSID`, strict
/// checking; CAP_NET_ADMIN over that namespace).
pub fn read_peer_addresses(netns_id: i32) -> std::io::Result<Vec<(u32, IpAddr)>> {
    let mut socket = Rtnl::open(true)?;
    let mut addresses = Vec::new();
    for family in [AddressFamily::Inet, AddressFamily::Inet6] {
        let mut request = AddressMessage::default();
        request.header.family = family;
        request
            .attributes
            .push(AddressAttribute::TargetNetNsId(netns_id));
        for message in socket.dump(RouteNetlinkMessage::GetAddress(request))? {
            let RouteNetlinkMessage::NewAddress(message) = message else {
                continue;
            };
            // Only answers that say they come from that namespace: a kernel that
            // ignored the target would describe this namespace instead.
            let from_target = message
                .attributes
                .contains(&AddressAttribute::TargetNetNsId(netns_id));
            if from_target && let Some((index, net)) = address_of(&message) {
                addresses.push((index, net.addr()));
            }
        }
    }
    Ok(addresses)
}

/// A neighbour (ARP or NDP) entry with a link-layer address.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Neighbour {
    /// The interface it was learned on.
    pub interface: u32,
    pub ip: IpAddr,
    pub mac: Vec<u8>,
}

/// The neighbour entry a netlink neighbour message describes, when it holds a usable
/// link-layer address (not failed, not incomplete).
pub fn neighbour_of(message: &NeighbourMessage) -> Option<Neighbour> {
    if matches!(
        message.header.state,
        NeighbourState::Failed | NeighbourState::Incomplete | NeighbourState::None
    ) {
        return None;
    }
    let mut ip = None;
    let mut mac = None;
    for attribute in &message.attributes {
        match attribute {
            NeighbourAttribute::Destination(NeighbourAddress::Inet(v4)) => ip = Some((*v4).into()),
            NeighbourAttribute::Destination(NeighbourAddress::Inet6(v6)) => {
                ip = Some((*v6).into());
            }
            NeighbourAttribute::LinkLayerAddress(address) if address.len() == 6 => {
                mac = Some(address.clone());
            }
            _ => {}
        }
    }
    Some(Neighbour {
        interface: message.header.ifindex,
        ip: ip?,
        mac: mac?,
    })
}

/// Every IPv4 and IPv6 neighbour entry of this namespace with a link-layer address.
pub fn read_neighbours() -> std::io::Result<Vec<Neighbour>> {
    let mut socket = Rtnl::open(false)?;
    let mut neighbours = Vec::new();
    for family in [AddressFamily::Inet, AddressFamily::Inet6] {
        let mut request = NeighbourMessage::default();
        request.header.family = family;
        for message in socket.dump(RouteNetlinkMessage::GetNeighbour(request))? {
            if let RouteNetlinkMessage::NewNeighbour(message) = message {
                neighbours.extend(neighbour_of(&message));
            }
        }
    }
    Ok(neighbours)
}

/// A learned (or static) entry of a bridge's forwarding database: frames to `mac` leave
/// through `port`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FdbEntry {
    pub mac: Vec<u8>,
    /// The bridge port.
    pub port: u32,
    /// The bridge.
    pub bridge: u32,
}

/// The bridge FDB entry a netlink `AF_BRIDGE` neighbour message describes: entries of a
/// bridge's own table (`NDA_MASTER`), but its local ones (`permanent`: the ports' own
/// addresses, not what sits behind them).
pub fn fdb_entry_of(message: &NeighbourMessage) -> Option<FdbEntry> {
    if message.header.state == NeighbourState::Permanent {
        return None;
    }
    let mut bridge = None;
    let mut mac = None;
    for attribute in &message.attributes {
        match attribute {
            NeighbourAttribute::Controller(index) => bridge = Some(*index),
            NeighbourAttribute::LinkLayerAddress(address) if address.len() == 6 => {
                mac = Some(address.clone());
            }
            _ => {}
        }
    }
    Some(FdbEntry {
        mac: mac?,
        port: message.header.ifindex,
        bridge: bridge?,
    })
}

/// Every bridge FDB entry of this namespace ([`fdb_entry_of`]).
pub fn read_fdb() -> std::io::Result<Vec<FdbEntry>> {
    let mut socket = Rtnl::open(false)?;
    let mut request = NeighbourMessage::default();
    request.header.family = AddressFamily::Bridge;
    Ok(socket
        .dump(RouteNetlinkMessage::GetNeighbour(request))?
        .iter()
        .filter_map(|message| match message {
            RouteNetlinkMessage::NewNeighbour(message) => fdb_entry_of(message),
            _ => None,
        })
        .collect())
}

/// A route netlink socket for dumps.
struct Rtnl {
    fd: std::os::fd::OwnedFd,
    sequence: u32,
}

impl Rtnl {
    /// `strict`: the kernel checks dump requests strictly and honours their filters
    /// (`NETLINK_GET_STRICT_CHK`), which targeting another namespace needs.
    fn open(strict: bool) -> std::io::Result<Self> {
        let fd = socket(
            SocketFamily::Netlink,
            SockType::Raw,
            SockFlag::SOCK_CLOEXEC,
            SockProtocol::NetlinkRoute,
        )?;
        if strict {
            let on: libc::c_int = 1;
            // SAFETY: a valid socket, a pointer to an int and its size.
            let result = unsafe {
                libc::setsockopt(
                    fd.as_raw_fd(),
                    libc::SOL_NETLINK,
                    libc::NETLINK_GET_STRICT_CHK,
                    (&raw const on).cast(),
                    std::mem::size_of::<libc::c_int>() as libc::socklen_t,
                )
            };
            if result != 0 {
                return Err(std::io::Error::last_os_error());
            }
        }
        bind(fd.as_raw_fd(), &NetlinkAddr::new(0, 0))?;
        Ok(Rtnl { fd, sequence: 0 })
    }

    /// One dump request; every message of the answer.
    fn dump(&mut self, request: RouteNetlinkMessage) -> std::io::Result<Vec<RouteNetlinkMessage>> {
        self.sequence += 1;
        let sequence = self.sequence;
        let fd = self.fd.as_raw_fd();
        let mut header = NetlinkHeader::default();
        header.flags = NLM_F_REQUEST | NLM_F_DUMP;
        header.sequence_number = sequence;
        let mut message = NetlinkMessage::new(header, NetlinkPayload::InnerMessage(request));
        message.finalize();
        let mut buffer = vec![0; message.buffer_len()];
        message.serialize(&mut buffer);
        send(fd, &buffer, MsgFlags::empty())?;

        let mut messages = Vec::new();
        let mut buffer = vec![0u8; 64 * 1024];
        loop {
            let received = recv(fd, &mut buffer, MsgFlags::empty())?;
            if received == 0 {
                return Ok(messages);
            }
            let mut offset = 0;
            while offset + 4 <= received {
                let length = u32::from_ne_bytes(
                    buffer[offset..offset + 4]
                        .try_into()
                        .expect("four bytes make a u32"),
                ) as usize;
                if length < 16 || offset + length > received {
                    break;
                }
                let parsed = NetlinkMessage::<RouteNetlinkMessage>::deserialize(
                    &buffer[offset..offset + length],
                );
                offset += length.next_multiple_of(4);
                let Ok(parsed) = parsed else { continue };
                if parsed.header.sequence_number != sequence {
                    continue;
                }
                match parsed.payload {
                    NetlinkPayload::InnerMessage(inner) => messages.push(inner),
                    NetlinkPayload::Done(_) => return Ok(messages),
                    NetlinkPayload::Error(error) if error.code.is_some() => {
                        return Err(error.to_io());
                    }
                    _ => {}
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A route message as the kernel would send it.
    fn message(kind: RouteType, table: u8, destination: ipnet::IpNet, oif: u32) -> RouteMessage {
        let mut message = RouteMessage::default();
        message.header.address_family = match destination {
            ipnet::IpNet::V4(_) => AddressFamily::Inet,
            ipnet::IpNet::V6(_) => AddressFamily::Inet6,
        };
        message.header.destination_prefix_length = destination.prefix_len();
        message.header.table = table;
        message.header.kind = kind;
        if destination.prefix_len() > 0 {
            message
                .attributes
                .push(RouteAttribute::Destination(destination.addr().into()));
        }
        message.attributes.push(RouteAttribute::Table(table.into()));
        message.attributes.push(RouteAttribute::Oif(oif));
        message
    }

    fn names(index: u32) -> Option<String> {
        let name = match index {
            1 => "lo",
            2 => "eth0",
            3 => "vethab",
            4 => "cni0",
            _ => return None,
        };
        Some(name.to_owned())
    }

    fn routes(messages: &[RouteMessage]) -> Vec<Route> {
        messages.iter().filter_map(|m| route_of(m, names)).collect()
    }

    /// The main and the local routing table (`RT_TABLE_MAIN`, `RT_TABLE_LOCAL`).
    const MAIN: u8 = 254;
    const LOCAL: u8 = 255;

    #[test]
    fn ipv4_routes_resolve_pod_ips_to_their_veth() {
        let routes = routes(&[
            message(RouteType::Unicast, MAIN, "0.0.0.0/0".parse().unwrap(), 2),
            message(RouteType::Unicast, MAIN, "10.0.0.2/32".parse().unwrap(), 3),
            message(RouteType::Unicast, MAIN, "10.0.0.0/16".parse().unwrap(), 4),
        ]);
        assert_eq!(routes.len(), 3);
        assert_eq!(
            interface_for(&routes, "10.0.0.2".parse().unwrap()),
            Some("vethab")
        );
        // Subnet and default routes never name a pod's interface: programs must not land
        // on a bridge or the uplink.
        assert_eq!(interface_for(&routes, "10.0.7.9".parse().unwrap()), None);
        assert_eq!(interface_for(&routes, "8.8.8.8".parse().unwrap()), None);
    }

    #[test]
    fn ipv6_routes_resolve_pod_ips_to_their_veth() {
        let routes = routes(&[
            message(RouteType::Unicast, MAIN, "fd00::2/128".parse().unwrap(), 3),
            message(RouteType::Unicast, MAIN, "fe80::/64".parse().unwrap(), 3),
            message(RouteType::Unicast, MAIN, "::/0".parse().unwrap(), 1),
        ]);
        assert_eq!(routes.len(), 3);
        assert_eq!(
            interface_for(&routes, "fd00::2".parse().unwrap()),
            Some("vethab")
        );
        assert_eq!(interface_for(&routes, "fd00::3".parse().unwrap()), None);
    }

    #[test]
    fn routes_of_every_table_count_but_local_and_unreachable_routes_do_not() {
        let routes = routes(&[
            // A CNI that keeps pod routes in a table of its own.
            message(RouteType::Unicast, 100, "10.0.0.5/32".parse().unwrap(), 3),
            // The local table's route to the node's own address.
            message(RouteType::Local, LOCAL, "10.0.0.1/32".parse().unwrap(), 2),
            message(
                RouteType::Unreachable,
                MAIN,
                "10.0.0.6/32".parse().unwrap(),
                2,
            ),
            // An interface that is gone by the time it is named.
            message(RouteType::Unicast, MAIN, "10.0.0.7/32".parse().unwrap(), 99),
        ]);
        assert_eq!(
            routes,
            vec![Route {
                destination: "10.0.0.5/32".parse().unwrap(),
                interface: "vethab".into(),
            }]
        );
        assert_eq!(
            interface_for(&routes, "10.0.0.5".parse().unwrap()),
            Some("vethab")
        );
        assert_eq!(interface_for(&routes, "10.0.0.1".parse().unwrap()), None);
    }

    #[test]
    fn the_routing_tables_of_this_namespace_can_be_read() {
        // Whatever this namespace holds, the dump completes; every route has a name.
        let routes = read_routes().unwrap();
        assert!(routes.iter().all(|route| !route.interface.is_empty()));
    }

    #[test]
    fn addresses_on_kube_ipvs0_are_services_not_the_nodes() {
        if !nix::unistd::geteuid().is_root() {
            eprintln!("skipped: needs root for a network namespace of its own");
            return;
        }
        // A thread in a network namespace of its own, so nothing touches the caller's.
        let found = std::thread::spawn(|| {
            nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET).expect("unshare");
            // kube-proxy's kube-ipvs0 is a dummy device; this machine's kernel has no
            // dummy driver, and only the name matters: a veth pair stands in.
            for command in [
                "link add kube-ipvs0 type veth peer name uplink",
                "addr add 10.96.0.10/32 dev kube-ipvs0",
                "addr add 10.99.0.1/24 dev uplink",
            ] {
                let status = std::process::Command::new("ip")
                    .args(command.split(' '))
                    .status()
                    .expect("ip");
                assert!(status.success(), "ip {command}");
            }
            addresses().unwrap()
        })
        .join()
        .unwrap();
        assert!(found.contains(&"10.99.0.1".parse().unwrap()), "{found:?}");
        assert!(!found.contains(&"10.96.0.10".parse().unwrap()), "{found:?}");
    }
}

#[cfg(test)]
mod kernel_tests {
    use super::*;

    /// Runs `ip` with `command` (split on spaces) in the calling thread's namespace.
    fn ip(command: &str) {
        let status = std::process::Command::new("ip")
            .args(command.split(' '))
            .status()
            .expect("ip");
        assert!(status.success(), "ip {command}");
    }

    type Job = Box<dyn FnOnce() + Send>;

    #[test]
    fn links_neighbours_bridge_ports_and_peer_addresses_can_be_read() {
        if !nix::unistd::geteuid().is_root() {
            eprintln!("skipped: needs root for network namespaces of its own");
            return;
        }
        // The "pod": a thread in a namespace of its own, holding the veth's far end.
        let (to_pod, jobs) = std::sync::mpsc::channel::<Job>();
        let (pod_tid_tx, pod_tid) = std::sync::mpsc::channel();
        let pod = std::thread::spawn(move || {
            nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET).expect("unshare");
            pod_tid_tx.send(nix::unistd::gettid().as_raw()).unwrap();
            while let Ok(job) = jobs.recv() {
                job();
            }
        });
        let pod_tid = pod_tid.recv().unwrap();
        let seen = std::thread::spawn(move || {
            nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET).expect("unshare");
            ip("link add br7 type bridge");
            ip("addr add 10.77.0.1/24 dev br7");
            ip("link set br7 up");
            ip(&format!(
                "link add vp7 type veth peer name eth0 netns {pod_tid}"
            ));
            ip("link set vp7 master br7");
            ip("link set vp7 up");
            let (done, wait) = std::sync::mpsc::channel();
            to_pod
                .send(Box::new(move || {
                    ip("link set lo up");
                    ip("link set eth0 address 02:00:00:00:07:02");
                    ip("addr add 10.77.0.2/24 dev eth0");
                    ip("link set eth0 up");
                    done.send(()).unwrap();
                }))
                .unwrap();
            wait.recv().unwrap();
            // The pod speaks (a datagram to the bridge's address, after ARP): the node
            // learns its neighbour entry on br7, the bridge its MAC on vp7.
            let mut found = None;
            for _ in 0..500 {
                to_pod
                    .send(Box::new(|| {
                        let socket = std::net::UdpSocket::bind("10.77.0.2:0").unwrap();
                        let _ = socket.send_to(b"hello", "10.77.0.1:9");
                    }))
                    .unwrap();
                let neighbours = read_neighbours().unwrap();
                let fdb = read_fdb().unwrap();
                if neighbours
                    .iter()
                    .any(|n| n.ip == IpAddr::from([10, 77, 0, 2]))
                    && fdb.iter().any(|e| e.mac == [2, 0, 0, 0, 7, 2])
                {
                    found = Some((neighbours, fdb));
                    break;
                }
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
            let (neighbours, fdb) = found.expect("the pod's neighbour and FDB entries appear");
            let links = read_links().unwrap();
            let vp7 = links.iter().find(|l| l.name == "vp7").unwrap().clone();
            let (netns_id, peer) = vp7.peer.expect("a veth has a peer");
            let peer_addresses = read_peer_addresses(netns_id).unwrap();
            // Only now may the pod's thread end (and its namespace with it).
            drop(to_pod);
            (links, neighbours, fdb, peer, peer_addresses)
        })
        .join()
        .unwrap();
        pod.join().unwrap();
        let (links, neighbours, fdb, peer, peer_addresses) = seen;
        let br7 = links.iter().find(|l| l.name == "br7").unwrap();
        let vp7 = links.iter().find(|l| l.name == "vp7").unwrap();
        let lo = links.iter().find(|l| l.name == "lo").unwrap();
        assert!(br7.bridge && !br7.loopback);
        assert!(br7.addresses.contains(&"10.77.0.1/24".parse().unwrap()));
        assert!(!vp7.bridge && vp7.master == Some(br7.index));
        assert!(lo.loopback && !lo.bridge);
        assert!(neighbours.contains(&Neighbour {
            interface: br7.index,
            ip: "10.77.0.2".parse().unwrap(),
            mac: vec![2, 0, 0, 0, 7, 2],
        }));
        assert!(fdb.contains(&FdbEntry {
            mac: vec![2, 0, 0, 0, 7, 2],
            port: vp7.index,
            bridge: br7.index,
        }));
        // The bridge's and the port's own addresses are not what sits behind a port.
        assert!(
            fdb.iter()
                .all(|e| e.port != br7.index || e.bridge != br7.index)
        );
        assert!(
            peer_addresses.contains(&(peer, "10.77.0.2".parse().unwrap())),
            "{peer_addresses:?}"
        );
        assert!(
            !peer_addresses
                .iter()
                .any(|(_, ip)| *ip == IpAddr::from([10, 77, 0, 1])),
            "the node's own addresses are not the peer's: {peer_addresses:?}"
        );
    }
}
