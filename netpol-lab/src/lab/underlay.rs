//! The underlay between nodes: a veth per pair of nodes, its addresses, and the routes
//! through it to every other node's pods, hosts and node address.

use std::net::{Ipv4Addr, Ipv6Addr};

use super::Lab;
use crate::error::{Context, Result};
use crate::netns;

impl Lab {
    /// Addresses of the underlay link between nodes `a` and `b`, as seen from `a`:
    /// ((own IPv4, peer IPv4), (own IPv6, peer IPv6)). Link `k` (one per pair) has
    /// 172.31.254.4k/30 and fd31:ff:k::/64; the lower node index takes `.1`/`::1`.
    pub(super) fn underlay_addrs(
        a: usize,
        b: usize,
    ) -> ((Ipv4Addr, Ipv4Addr), (Ipv6Addr, Ipv6Addr)) {
        let (lo, hi) = (a.min(b), a.max(b));
        let k = hi * (hi - 1) / 2 + lo;
        let (own, peer) = if a < b { (1, 2) } else { (2, 1) };
        let v4 = |host: usize| Ipv4Addr::new(172, 31, 254, (4 * k + host) as u8);
        let v6 = |host: usize| Ipv6Addr::new(0xfd31, 0xff, k as u16, 0, 0, 0, 0, host as u16);
        ((v4(own), v4(peer)), (v6(own), v6(peer)))
    }

    /// Joins nodes `a` and `b` with a veth (`ul<b>` in `a`, `ul<a>` in `b`), addresses
    /// on both ends and routes to each other's node addresses.
    pub(super) fn link_nodes(&mut self, a: usize, b: usize) -> Result<()> {
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
    pub(super) fn remote_routes(
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
    pub(super) fn route_from_other_nodes(
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
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec::{MAX_NODES, NODE_NAME};

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
