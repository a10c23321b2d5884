//! The node as the agent's network namespace sees it: its own addresses (`getifaddrs`)
//! and its routes (an rtnetlink dump of every routing table, IPv4 and IPv6), from which
//! the datapath finds the host-side interface of a pod.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::os::fd::AsRawFd as _;

use netlink_packet_core::{
    NLM_F_DUMP, NLM_F_REQUEST, NetlinkHeader, NetlinkMessage, NetlinkPayload,
};
use netlink_packet_route::route::{RouteAddress, RouteAttribute, RouteMessage, RouteType};
use netlink_packet_route::{AddressFamily, RouteNetlinkMessage};
use nix::sys::socket::{
    AddressFamily as SocketFamily, MsgFlags, NetlinkAddr, SockFlag, SockProtocol, SockType, bind,
    recv, send, socket,
};

/// Every address configured on an interface of this network namespace.
pub fn addresses() -> std::io::Result<Vec<IpAddr>> {
    let mut addresses: Vec<IpAddr> = nix::ifaddrs::getifaddrs()
        .map_err(std::io::Error::from)?
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
    let fd = socket(
        SocketFamily::Netlink,
        SockType::Raw,
        SockFlag::SOCK_CLOEXEC,
        SockProtocol::NetlinkRoute,
    )?;
    bind(fd.as_raw_fd(), &NetlinkAddr::new(0, 0))?;
    let name_of = |index: u32| {
        nix::net::if_::if_indextoname(index)
            .ok()
            .map(|name| name.to_string_lossy().into_owned())
    };
    let mut routes = Vec::new();
    for (sequence, family) in [(1, AddressFamily::Inet), (2, AddressFamily::Inet6)] {
        for message in dump_routes(fd.as_raw_fd(), sequence, family)? {
            routes.extend(route_of(&message, name_of));
        }
    }
    Ok(routes)
}

/// One `RTM_GETROUTE` dump of `family` (every table: the dump is not filtered).
fn dump_routes(
    fd: std::os::fd::RawFd,
    sequence: u32,
    family: AddressFamily,
) -> std::io::Result<Vec<RouteMessage>> {
    let mut request = RouteMessage::default();
    request.header.address_family = family;
    let mut header = NetlinkHeader::default();
    header.flags = NLM_F_REQUEST | NLM_F_DUMP;
    header.sequence_number = sequence;
    let mut message = NetlinkMessage::new(
        header,
        NetlinkPayload::InnerMessage(RouteNetlinkMessage::GetRoute(request)),
    );
    message.finalize();
    let mut buffer = vec![0; message.buffer_len()];
    message.serialize(&mut buffer);
    send(fd, &buffer, MsgFlags::empty())?;

    let mut routes = Vec::new();
    let mut buffer = vec![0u8; 64 * 1024];
    loop {
        let received = recv(fd, &mut buffer, MsgFlags::empty())?;
        if received == 0 {
            return Ok(routes);
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
                NetlinkPayload::InnerMessage(RouteNetlinkMessage::NewRoute(route)) => {
                    routes.push(route);
                }
                NetlinkPayload::Done(_) => return Ok(routes),
                NetlinkPayload::Error(error) if error.code.is_some() => {
                    return Err(error.to_io());
                }
                _ => {}
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
}
