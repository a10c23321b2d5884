//! The policy decision for the first packet of a connection: one IPCACHE walk and a
//! fixed number of POLICY lookups, whatever the number of policies. The common case is
//! one hash lookup; the endpoint's flags add only the lookups that can hit (see
//! `PolicyKey`): a port-range walk, every port of the protocol, every protocol, each
//! again for identity 0 (any peer).

use aya_ebpf::maps::lpm_trie::Key;
use netpol_common::{
    Addr, DIR_INGRESS, ENDPOINT_AUDIT, ENDPOINT_EGRESS_ANY_PEER, ENDPOINT_EGRESS_ANY_PORT,
    ENDPOINT_EGRESS_ANY_PROTOCOL, ENDPOINT_EGRESS_ISOLATED, ENDPOINT_EGRESS_PORT_RANGES,
    ENDPOINT_INGRESS_ANY_PEER, ENDPOINT_INGRESS_ANY_PORT, ENDPOINT_INGRESS_ANY_PROTOCOL,
    ENDPOINT_INGRESS_ISOLATED, ENDPOINT_INGRESS_PORT_RANGES, EndpointInfo, IDENTITY_ANY,
    IDENTITY_WORLD, PEER_HOST, PEER_SERVICE, POLICY_PREFIX_FULL, PeerInfo, PolicyKey, RULE_NONE,
    Reason, ServicePort,
};

use crate::maps::{IPCACHE, NODE_PORTS, POLICY, POLICY_RANGES};

#[inline(always)]
fn peer(addr: &Addr) -> PeerInfo {
    match IPCACHE.get(Key::new(addr.full_prefix_len(), *addr)) {
        Some(info) => *info,
        None => PeerInfo {
            identity: IDENTITY_WORLD,
            flags: 0,
        },
    }
}

/// The endpoint flags of one direction: which kinds of POLICY entries it has.
#[derive(Clone, Copy)]
struct Kinds {
    any_peer: bool,
    ranges: bool,
    any_port: bool,
    any_protocol: bool,
}

impl Kinds {
    #[inline(always)]
    fn of(flags: u32, direction: u8) -> Kinds {
        let [any_peer, ranges, any_port, any_protocol] = if direction == DIR_INGRESS {
            [
                ENDPOINT_INGRESS_ANY_PEER,
                ENDPOINT_INGRESS_PORT_RANGES,
                ENDPOINT_INGRESS_ANY_PORT,
                ENDPOINT_INGRESS_ANY_PROTOCOL,
            ]
        } else {
            [
                ENDPOINT_EGRESS_ANY_PEER,
                ENDPOINT_EGRESS_PORT_RANGES,
                ENDPOINT_EGRESS_ANY_PORT,
                ENDPOINT_EGRESS_ANY_PROTOCOL,
            ]
        };
        Kinds {
            any_peer: flags & any_peer != 0,
            ranges: flags & ranges != 0,
            any_port: flags & any_port != 0,
            any_protocol: flags & any_protocol != 0,
        }
    }
}

#[inline(always)]
fn exact(key: &PolicyKey) -> Option<u32> {
    // SAFETY: POLICY is only written from userspace; the rule is copied at once.
    unsafe { POLICY.get(key) }.map(|value| value.rule)
}

/// The most specific entry for one identity, in the order a single trie over all of
/// them would rank them: the exact port, the longest port range, every port of the
/// protocol, every protocol. A function of its own (a BPF-to-BPF call): inlined twice,
/// its keys would not fit the stack of the programs that call it.
#[inline(never)]
fn most_specific(key: &PolicyKey, kinds: &Kinds) -> Option<u32> {
    if let Some(rule) = exact(key) {
        return Some(rule);
    }
    if kinds.ranges
        && let Some(value) = POLICY_RANGES.get(Key::new(POLICY_PREFIX_FULL, *key))
    {
        return Some(value.rule);
    }
    if kinds.any_port
        && let Some(rule) = exact(&key.any_port())
    {
        return Some(rule);
    }
    if kinds.any_protocol {
        return exact(&key.any_protocol());
    }
    None
}

/// The exact identity first; identity 0 (any peer) only where the endpoint has such
/// entries in this direction.
#[inline(always)]
fn allowing_rule(mut key: PolicyKey, kinds: Kinds) -> Option<u32> {
    if let Some(rule) = most_specific(&key, &kinds) {
        return Some(rule);
    }
    if !kinds.any_peer {
        return None;
    }
    key.identity = IDENTITY_ANY;
    most_specific(&key, &kinds)
}

/// What the policy decision needs to know about a connection, from the point of view
/// of the local endpoint: who the peer is and which port the responder listens on.
pub struct Connection {
    /// [`DIR_INGRESS`]: the peer opened it; egress: the pod did.
    pub direction: u8,
    pub peer: Addr,
    pub protocol: u8,
    pub port: u16,
    /// Egress seen before kube-proxy's translation (`from_pod`) with Service handling
    /// on: a connection to a Service address is deferred ([`Reason::ToService`]) to the
    /// hook after translation instead of being judged on the Service address.
    pub defer_services: bool,
}

/// Whether kube-proxy will translate a connection to `peer` (an egress seen before
/// translation): a Service address, or a node address on a node port.
#[inline(always)]
fn to_service(peer: &PeerInfo, connection: &Connection) -> bool {
    if peer.flags & PEER_SERVICE != 0 {
        return true;
    }
    if peer.flags & PEER_HOST == 0 {
        return false;
    }
    let key = ServicePort {
        port: connection.port,
        protocol: connection.protocol,
        _pad: 0,
    };
    // SAFETY: NODE_PORTS is only written from userspace; only presence is read.
    unsafe { NODE_PORTS.get(key) }.is_some()
}

/// The outcome of [`decide`].
pub struct Decision {
    pub reason: Reason,
    /// The allowing rule, or `RULE_NONE`.
    pub rule: u32,
    /// The peer's identity (0 when the decision did not need it).
    pub identity: u32,
}

/// Verdict, deciding rule and peer identity for a connection.
#[inline(always)]
pub fn decide(endpoint: &EndpointInfo, connection: &Connection) -> Decision {
    let isolated = if connection.direction == DIR_INGRESS {
        ENDPOINT_INGRESS_ISOLATED
    } else {
        ENDPOINT_EGRESS_ISOLATED
    };
    if endpoint.flags & isolated == 0 {
        return Decision {
            reason: Reason::NotIsolated,
            rule: RULE_NONE,
            identity: 0,
        };
    }
    let peer = peer(&connection.peer);
    let identity = peer.identity;
    if connection.defer_services && to_service(&peer, connection) {
        return Decision {
            reason: Reason::ToService,
            rule: RULE_NONE,
            identity,
        };
    }
    if connection.direction == DIR_INGRESS && peer.flags & PEER_HOST != 0 {
        return Decision {
            reason: Reason::FromHost,
            rule: RULE_NONE,
            identity,
        };
    }
    let key = PolicyKey {
        endpoint: endpoint.id,
        identity,
        direction: connection.direction,
        protocol: connection.protocol,
        port: connection.port.to_be_bytes(),
    };
    let kinds = Kinds::of(endpoint.flags, connection.direction);
    let (reason, rule) = match allowing_rule(key, kinds) {
        Some(rule) => (Reason::PolicyAllowed, rule),
        None if endpoint.flags & ENDPOINT_AUDIT != 0 => (Reason::AuditAllowed, RULE_NONE),
        None => (Reason::PolicyDenied, RULE_NONE),
    };
    Decision {
        reason,
        rule,
        identity,
    }
}
