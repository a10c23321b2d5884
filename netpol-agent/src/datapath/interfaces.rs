//! Host-side interfaces of local pods and the node's own addresses, read from the
//! kernel of the agent's network namespace (`/proc/net/route`, `/proc/net/ipv6_route`,
//! `getifaddrs`). No netlink dependency: these files are the kernel's own tables.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// One route: destination prefix -> output interface.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Route {
    pub destination: ipnet::IpNet,
    pub interface: String,
}

/// Parses `/proc/net/route` (IPv4; addresses are little-endian hex).
pub fn parse_ipv4_routes(text: &str) -> Vec<Route> {
    text.lines()
        .skip(1)
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let (iface, dest, mask) = (fields.first()?, fields.get(1)?, fields.get(7)?);
            let dest = Ipv4Addr::from(u32::from_str_radix(dest, 16).ok()?.swap_bytes());
            let mask = u32::from_str_radix(mask, 16).ok()?.swap_bytes();
            let prefix = u8::try_from(mask.leading_ones()).ok()?;
            let destination = ipnet::Ipv4Net::new(dest, prefix).ok()?;
            Some(Route {
                destination: destination.into(),
                interface: (*iface).to_string(),
            })
        })
        .collect()
}

/// Parses `/proc/net/ipv6_route` (destination, prefix length in hex, ..., interface).
pub fn parse_ipv6_routes(text: &str) -> Vec<Route> {
    text.lines()
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let dest = u128::from_str_radix(fields.first()?, 16).ok()?;
            let prefix = u8::from_str_radix(fields.get(1)?, 16).ok()?;
            let iface = fields.get(9)?;
            let destination = ipnet::Ipv6Net::new(Ipv6Addr::from(dest), prefix).ok()?;
            Some(Route {
                destination: destination.into(),
                interface: (*iface).to_string(),
            })
        })
        .collect()
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

/// All routes of the current network namespace.
pub fn read_routes() -> std::io::Result<Vec<Route>> {
    let mut routes = parse_ipv4_routes(&std::fs::read_to_string("/proc/net/route")?);
    // A kernel without IPv6 has no such file; that is not an error.
    if let Ok(text) = std::fs::read_to_string("/proc/net/ipv6_route") {
        routes.extend(parse_ipv6_routes(&text));
    }
    Ok(routes)
}

/// Every address configured on an interface of this network namespace.
pub fn node_addresses() -> std::io::Result<Vec<IpAddr>> {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pod_interfaces_are_recognised_by_prefix() {
        let prefixes = vec!["veth".to_string(), "cali".to_string(), String::new()];
        assert!(is_pod_interface("veth1a2b", &prefixes));
        assert!(is_pod_interface("cali0123", &prefixes));
        // An empty prefix matches nothing rather than everything.
        assert!(!is_pod_interface("eth0", &prefixes));
        assert!(!is_pod_interface("lo", &["l".to_string()]));
    }

    #[test]
    fn ipv4_routes_resolve_pod_ips_to_their_veth() {
        let text = "Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT\n\
                    eth0\t00000000\t0101A8C0\t0003\t0\t0\t0\t00000000\t0\t0\t0\n\
                    vethab\t0200000A\t00000000\t0005\t0\t0\t0\tFFFFFFFF\t0\t0\t0\n\
                    cni0\t0000000A\t00000000\t0001\t0\t0\t0\t0000FFFF\t0\t0\t0\n";
        let routes = parse_ipv4_routes(text);
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
        let text = "fd000000000000000000000000000002 80 00000000000000000000000000000000 00 00000000000000000000000000000000 00000400 00000001 00000000 00000001  vethab\n\
                    fe800000000000000000000000000000 40 00000000000000000000000000000000 00 00000000000000000000000000000000 00000100 00000001 00000000 00000001  vethab\n\
                    00000000000000000000000000000000 00 00000000000000000000000000000000 00 00000000000000000000000000000000 ffffffff 00000001 00000000 00200200       lo\n";
        let routes = parse_ipv6_routes(text);
        assert_eq!(routes.len(), 3);
        assert_eq!(
            interface_for(&routes, "fd00::2".parse().unwrap()),
            Some("vethab")
        );
        assert_eq!(interface_for(&routes, "fd00::3".parse().unwrap()), None);
    }
}
