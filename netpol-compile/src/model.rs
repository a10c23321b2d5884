//! A userspace model of the kernel's policy decision over [`Compiled`] maps.
//!
//! It performs exactly the lookups the TC programs perform for the first packet of a
//! flow (conntrack aside): ENDPOINTS exact match on the endpoint's address, IPCACHE
//! longest-prefix match on the peer's address (a miss is `IDENTITY_WORLD`), then the
//! POLICY and POLICY_RANGES lookups the endpoint's flags call for, on `{endpoint,
//! identity, direction, protocol, port}` and, on a miss, on the same key with
//! `IDENTITY_ANY` ([`crate::policy_maps::lookup`]). The cluster admin's tiers come
//! around NetworkPolicy: the Admin tier's entry first (Accept and Deny decide, Pass and
//! no entry go on), NetworkPolicy if it isolates the pod, then the Baseline tier's, then
//! allow ([`crate::policy_maps::lookup_tier`]). Traffic from the endpoint's node
//! (`PEER_HOST`) to the pod always passes. The compiler's tests, the datapath's tests
//! and explain reuse it.
//!
//! [`decide`] is the decision on the real peer. A pod's connection to a Service is
//! decided that way too, after kube-proxy's translation, on the backend;
//! [`defers_to_service`] models `from_pod`'s step before it.

use std::net::IpAddr;

use netpol_common::{
    DIR_EGRESS, ENDPOINT_AUDIT, ENDPOINT_EGRESS_ISOLATED, ENDPOINT_INGRESS_ISOLATED,
    IDENTITY_WORLD, PEER_HOST, PEER_SERVICE, PeerInfo, PolicyKey, RULE_NONE, Reason, ServicePort,
    TIER_ADMIN, TIER_BASELINE, VERDICT_ALLOW, VERDICT_DENY, judged,
};

use super::lpm::{self, addr};
use super::{Compiled, Direction};

/// The outcome of one decision, with the lookups that led to it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Decision {
    pub reason: Reason,
    /// Id ([`Compiled::rules`]) of the rule that allowed it, or [`RULE_NONE`].
    pub rule: u32,
    /// The endpoint id, when the endpoint address is in ENDPOINTS.
    pub endpoint: Option<u32>,
    /// The peer's IPCACHE result (`IDENTITY_WORLD`, no flags on a miss).
    pub peer: PeerInfo,
}

impl Decision {
    pub fn allowed(&self) -> bool {
        !self.reason.is_drop()
    }
}

/// Whether `from_pod` lets the new flow `src -> dst` through unjudged, marked for the
/// decision after kube-proxy's translation: `src` is an endpoint judged for egress
/// (isolated, or with ClusterNetworkPolicy entries) and
/// `dst` a Service address (IPCACHE flag `PEER_SERVICE`) or a node address on a port of
/// NODE_PORTS.
pub fn defers_to_service(
    compiled: &Compiled,
    src: IpAddr,
    dst: IpAddr,
    protocol: u8,
    dport: u16,
) -> bool {
    let Some(endpoint) = compiled.endpoints.get(&addr(src)) else {
        return false;
    };
    if !judged(endpoint.flags, DIR_EGRESS) {
        return false;
    }
    let Some(peer) = lpm::lookup(&compiled.ipcache, &addr(dst)) else {
        return false;
    };
    peer.flags & PEER_SERVICE != 0
        || (peer.flags & PEER_HOST != 0
            && compiled.node_ports.contains(&ServicePort {
                port: dport,
                protocol,
                _pad: 0,
            }))
}

/// The decision for a new flow `src -> dst` (`dport` = destination port, 0 for protocols
/// without ports) judged at `direction`'s hook: for [`Direction::Ingress`] the endpoint
/// is `dst` (packets entering the pod), for [`Direction::Egress`] it is `src`.
pub fn decide(
    compiled: &Compiled,
    src: IpAddr,
    dst: IpAddr,
    protocol: u8,
    dport: u16,
    direction: Direction,
) -> Decision {
    let (local, remote) = direction.ends(src, dst);
    let no_peer = PeerInfo {
        identity: IDENTITY_WORLD,
        flags: 0,
    };
    let Some(endpoint) = compiled.endpoints.get(&addr(local)) else {
        return Decision {
            reason: Reason::NotEndpoint,
            rule: RULE_NONE,
            endpoint: None,
            peer: no_peer,
        };
    };
    let peer = lpm::lookup(&compiled.ipcache, &addr(remote))
        .copied()
        .unwrap_or(no_peer);
    let decision = |reason, rule| Decision {
        reason,
        rule,
        endpoint: Some(endpoint.id),
        peer,
    };

    if remote == local {
        // A pod is never blocked from itself.
        return decision(Reason::Hairpin, RULE_NONE);
    }
    let isolated = match direction {
        Direction::Ingress => ENDPOINT_INGRESS_ISOLATED,
        Direction::Egress => ENDPOINT_EGRESS_ISOLATED,
    };
    if !judged(endpoint.flags, direction.as_u8()) {
        return decision(Reason::NotIsolated, RULE_NONE);
    }
    if direction == Direction::Ingress && peer.flags & PEER_HOST != 0 {
        return decision(Reason::FromHost, RULE_NONE);
    }
    let key = PolicyKey {
        endpoint: endpoint.id,
        identity: peer.identity,
        direction: direction.as_u8(),
        protocol,
        port: dport.to_be_bytes(),
    };
    let tier = |tier| {
        let value = crate::policy_maps::lookup_tier(&compiled.policy, key, tier, endpoint)?;
        match value.verdict {
            VERDICT_ALLOW => Some(decision(Reason::ClusterAccepted, value.rule)),
            VERDICT_DENY => Some(decision(Reason::ClusterDenied, value.rule)),
            _ => None,
        }
    };
    if let Some(decided) = tier(TIER_ADMIN) {
        return decided;
    }
    if endpoint.flags & isolated != 0 {
        return match crate::policy_maps::lookup(&compiled.policy, key, endpoint.flags) {
            Some(value) => decision(Reason::PolicyAllowed, value.rule),
            None if endpoint.flags & ENDPOINT_AUDIT != 0 => {
                decision(Reason::AuditAllowed, RULE_NONE)
            }
            None => decision(Reason::PolicyDenied, RULE_NONE),
        };
    }
    tier(TIER_BASELINE).unwrap_or_else(|| decision(Reason::NotIsolated, RULE_NONE))
}

/// `Some(rule)` when the flow is allowed at `direction`'s hook (`RULE_NONE` when no rule
/// was needed: not an endpoint, not isolated, from the node), `None` when dropped.
pub fn lookup(
    compiled: &Compiled,
    src: IpAddr,
    dst: IpAddr,
    protocol: u8,
    dport: u16,
    direction: Direction,
) -> Option<u32> {
    let d = decide(compiled, src, dst, protocol, dport, direction);
    d.allowed().then_some(d.rule)
}

/// Whether a new flow passes both hooks it crosses on this node: the source pod's
/// egress hook and the destination pod's ingress hook (either may be absent).
pub fn flow_allowed(
    compiled: &Compiled,
    src: IpAddr,
    dst: IpAddr,
    protocol: u8,
    dport: u16,
) -> bool {
    lookup(compiled, src, dst, protocol, dport, Direction::Egress).is_some()
        && lookup(compiled, src, dst, protocol, dport, Direction::Ingress).is_some()
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use netpol_common::{
        Addr, DIR_INGRESS, EndpointInfo, IDENTITY_ANY, POLICY_PREFIX_ANY_PORT, PROTO_TCP,
        PROTO_UDP, PolicyValue,
    };

    use super::*;
    use crate::lpm::{Lpm, host_key, net_key};

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    /// Hand-built maps: endpoint 10.0.0.1 (id 3) isolated for ingress only, with a rule
    /// for any peer.
    fn maps() -> Compiled {
        let mut c = Compiled::default();
        c.endpoints.insert(
            Addr::v4([10, 0, 0, 1]),
            EndpointInfo {
                id: 3,
                flags: ENDPOINT_INGRESS_ISOLATED | netpol_common::ENDPOINT_INGRESS_ANY_PEER,
                tier_groups: [0, 0],
            },
        );
        c.ipcache = [
            (
                host_key(ip("10.0.0.2")),
                PeerInfo {
                    identity: 20,
                    flags: 0,
                },
            ),
            (
                net_key(&"192.168.0.0/16".parse().unwrap()),
                PeerInfo {
                    identity: 21,
                    flags: 0,
                },
            ),
            (
                host_key(ip("10.0.0.254")),
                PeerInfo {
                    identity: IDENTITY_WORLD,
                    flags: PEER_HOST,
                },
            ),
        ]
        .into_iter()
        .collect();
        let key = |identity, protocol, port: u16, prefix| {
            Lpm::new(
                prefix,
                PolicyKey {
                    endpoint: 3,
                    identity,
                    direction: DIR_INGRESS,
                    protocol,
                    port: port.to_be_bytes(),
                },
            )
        };
        let mut policy = BTreeMap::new();
        // identity 20: TCP 8080-8083 (rule 0); anyone: UDP 53 (rule 1); identity 21: TCP any (rule 2).
        policy.insert(
            key(20, PROTO_TCP, 8080, POLICY_PREFIX_ANY_PORT + 14),
            PolicyValue::allow(0),
        );
        policy.insert(
            key(IDENTITY_ANY, PROTO_UDP, 53, POLICY_PREFIX_ANY_PORT + 16),
            PolicyValue::allow(1),
        );
        policy.insert(
            key(21, PROTO_TCP, 0, POLICY_PREFIX_ANY_PORT),
            PolicyValue::allow(2),
        );
        c.policy = policy.into();
        // The kinds of entries it has, as the compiler flags them.
        for info in c.endpoints.values_mut() {
            info.flags |= crate::policy_maps::kinds(&c.policy, info);
        }
        c
    }

    #[test]
    fn kernel_lookups() {
        let c = maps();
        let ep = ip("10.0.0.1");
        let tcp = |src, port| lookup(&c, ip(src), ep, PROTO_TCP, port, Direction::Ingress);
        assert_eq!(tcp("10.0.0.2", 8080), Some(0));
        assert_eq!(tcp("10.0.0.2", 8083), Some(0));
        assert_eq!(tcp("10.0.0.2", 8084), None);
        assert_eq!(tcp("192.168.3.4", 1), Some(2));
        assert_eq!(tcp("172.16.0.1", 8080), None, "world");
        // Identity first, then IDENTITY_ANY.
        assert_eq!(
            lookup(&c, ip("10.0.0.2"), ep, PROTO_UDP, 53, Direction::Ingress),
            Some(1)
        );
        assert_eq!(
            lookup(&c, ip("8.8.8.8"), ep, PROTO_UDP, 53, Direction::Ingress),
            Some(1)
        );
        assert_eq!(
            lookup(&c, ip("8.8.8.8"), ep, PROTO_UDP, 54, Direction::Ingress),
            None
        );
        // Without the any-peer flag the identity-0 lookup is not made (the compiler sets
        // the flag wherever such entries exist).
        let mut unflagged = c.clone();
        for info in unflagged.endpoints.values_mut() {
            info.flags &= !netpol_common::ENDPOINT_INGRESS_ANY_PEER;
        }
        assert_eq!(
            lookup(
                &unflagged,
                ip("8.8.8.8"),
                ep,
                PROTO_UDP,
                53,
                Direction::Ingress
            ),
            None
        );
        // From the node: always.
        let d = decide(
            &c,
            ip("10.0.0.254"),
            ep,
            PROTO_TCP,
            9999,
            Direction::Ingress,
        );
        assert_eq!((d.reason, d.rule), (Reason::FromHost, RULE_NONE));
        // Egress of the endpoint is not isolated.
        let d = decide(&c, ep, ip("1.1.1.1"), PROTO_TCP, 1, Direction::Egress);
        assert_eq!(d.reason, Reason::NotIsolated);
        // Not an endpoint at all.
        let d = decide(
            &c,
            ip("10.0.0.2"),
            ip("10.0.0.9"),
            PROTO_TCP,
            1,
            Direction::Ingress,
        );
        assert_eq!((d.reason, d.endpoint), (Reason::NotEndpoint, None));
        assert!(flow_allowed(&c, ip("10.0.0.2"), ep, PROTO_TCP, 8081));
        assert!(!flow_allowed(&c, ip("10.0.0.2"), ep, PROTO_TCP, 80));
    }

    #[test]
    fn audit_lets_denied_traffic_through() {
        let mut c = maps();
        c.endpoints.get_mut(&Addr::v4([10, 0, 0, 1])).unwrap().flags |= ENDPOINT_AUDIT;
        let d = decide(
            &c,
            ip("172.16.0.1"),
            ip("10.0.0.1"),
            PROTO_TCP,
            80,
            Direction::Ingress,
        );
        assert_eq!(d.reason, Reason::AuditAllowed);
        assert!(d.allowed());
    }
}
