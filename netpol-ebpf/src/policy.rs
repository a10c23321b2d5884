//! The policy decision for the first packet of a connection: one IPCACHE walk and a
//! fixed number of POLICY lookups, whatever the number of policies. The common case is
//! one hash lookup; the endpoint's flags add only the lookups that can hit (see
//! `PolicyKey`): a port-range walk, every port of the protocol, every protocol, each
//! again for identity 0 (any peer).
//!
//! The cluster admin's tiers (ClusterNetworkPolicy) come around NetworkPolicy, each only
//! for an endpoint with entries in it: the Admin tier's entry (Accept and Deny decide;
//! Pass and no entry go on), NetworkPolicy if it isolates the endpoint, the Baseline
//! tier's entry, else allowed. The compiler put the first matching rule of each tier in
//! every entry, so a tier costs the same lookups as NetworkPolicy does. A tier's entries
//! are keyed by the endpoint's group in it (`EndpointInfo::tier_groups`), not its id:
//! the endpoints the same policies select share them.

use aya_ebpf::maps::lpm_trie::Key;
use netpol_common::{
    Addr, DIR_INGRESS, ENDPOINT_AUDIT, ENDPOINT_EGRESS_ANY_PEER, ENDPOINT_EGRESS_ANY_PORT,
    ENDPOINT_EGRESS_ANY_PROTOCOL, ENDPOINT_EGRESS_ISOLATED, ENDPOINT_EGRESS_PORT_RANGES,
    ENDPOINT_INGRESS_ANY_PEER, ENDPOINT_INGRESS_ANY_PORT, ENDPOINT_INGRESS_ANY_PROTOCOL,
    ENDPOINT_INGRESS_ISOLATED, ENDPOINT_INGRESS_PORT_RANGES, EndpointInfo, IDENTITY_ANY,
    IDENTITY_WORLD, PEER_HOST, PEER_SERVICE, POLICY_PREFIX_FULL, PeerInfo, PolicyKey, PolicyValue,
    RULE_NONE, Reason, ServicePort, TIER_ADMIN, TIER_BASELINE, TIER_KIND_ANY_PORT,
    TIER_KIND_ANY_PROTOCOL, TIER_KIND_RANGES, VERDICT_ALLOW, VERDICT_DENY, judged,
    tier_group_of_word, tier_kinds,
};

use crate::maps::{IPCACHE, NODE_PORTS, PEERS, POLICY, POLICY_RANGES};

/// What IPCACHE's longest prefix for `addr` resolves to in PEERS; the world when no
/// prefix covers it.
#[inline(always)]
fn peer(addr: &Addr) -> PeerInfo {
    const WORLD: PeerInfo = PeerInfo {
        identity: IDENTITY_WORLD,
        flags: 0,
    };
    let Some(&slot) = IPCACHE.get(Key::new(addr.full_prefix_len(), *addr)) else {
        return WORLD;
    };
    match PEERS.get_ptr(slot) {
        // SAFETY: an element of an array map, 8-byte aligned (values are laid out at
        // multiples of 8); one load, as the agent stores it (`PeerInfo::to_word`).
        Some(info) => PeerInfo::from_word(unsafe { core::ptr::read_volatile(info.cast::<u64>()) }),
        None => WORLD,
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

    /// The kinds of a cluster admin's tier (`TIER_KIND_*` bits): no any-peer entries.
    #[inline(always)]
    fn of_tier(kinds: u32) -> Kinds {
        Kinds {
            any_peer: false,
            ranges: kinds & TIER_KIND_RANGES != 0,
            any_port: kinds & TIER_KIND_ANY_PORT != 0,
            any_protocol: kinds & TIER_KIND_ANY_PROTOCOL != 0,
        }
    }
}

/// [`most_specific`]'s result when no entry matches. A plain word rather than an
/// `Option` (see `verdict.rs`, `UNMARKED`): the rule in the low half, the verdict above.
const NO_ENTRY: u64 = u64::MAX;

#[inline(always)]
fn packed(value: &PolicyValue) -> u64 {
    u64::from(value.rule) | u64::from(value.verdict) << 32
}

#[inline(always)]
fn exact(key: &PolicyKey) -> u64 {
    // SAFETY: POLICY is only written from userspace; the value is copied at once.
    unsafe { POLICY.get(key) }.map_or(NO_ENTRY, packed)
}

/// The most specific entry for one identity, in the order a single trie over all of
/// them would rank them: the exact port, the longest port range, every port of the
/// protocol, every protocol; [`NO_ENTRY`] if none. A function of its own (a BPF-to-BPF
/// call): inlined at each use, its keys would not fit the stack of the programs that
/// call it.
#[inline(never)]
fn most_specific(key: &PolicyKey, kinds: &Kinds) -> u64 {
    let found = exact(key);
    if found != NO_ENTRY {
        return found;
    }
    if kinds.ranges
        && let Some(value) = POLICY_RANGES.get(Key::new(POLICY_PREFIX_FULL, *key))
    {
        return packed(value);
    }
    if kinds.any_port {
        let found = exact(&key.any_port());
        if found != NO_ENTRY {
            return found;
        }
    }
    if kinds.any_protocol {
        return exact(&key.any_protocol());
    }
    NO_ENTRY
}

/// NetworkPolicy's allowing rule: the exact identity first; identity 0 (any peer) only
/// where the endpoint has such entries in this direction.
#[inline(always)]
fn allowing_rule(mut key: PolicyKey, kinds: Kinds) -> Option<u32> {
    let found = most_specific(&key, &kinds);
    if found != NO_ENTRY {
        return Some(found as u32);
    }
    if !kinds.any_peer {
        return None;
    }
    key.identity = IDENTITY_ANY;
    let found = most_specific(&key, &kinds);
    (found != NO_ENTRY).then_some(found as u32)
}

/// [`netpol_policy_lookups`]'s result: the reason above, the rule in the low half. A
/// plain word, for a BPF-to-BPF call returns one register.
#[inline(always)]
const fn outcome(reason: Reason, rule: u32) -> u64 {
    (reason as u64) << 32 | rule as u64
}

/// [`tier_decision`]'s result when the tier lets the connection go on.
const GO_ON: u64 = u64::MAX;

/// A cluster admin's tier: the [`outcome`] of its entry for `key` (NetworkPolicy's
/// direction) in the endpoint's group of the tier (from `groups`, see
/// `EndpointInfo::tier_groups_word`), or [`GO_ON`] (no entry, no entries in the tier,
/// or Pass).
#[inline(always)]
fn tier_decision(key: &PolicyKey, tier: u8, flags: u32, groups: u64) -> u64 {
    let kinds = tier_kinds(flags, tier, key.direction);
    if kinds == 0 {
        return GO_ON;
    }
    let tiered = PolicyKey {
        endpoint: tier_group_of_word(groups, tier),
        direction: key.direction | tier,
        ..*key
    };
    let found = most_specific(&tiered, &Kinds::of_tier(kinds));
    if found == NO_ENTRY {
        return GO_ON;
    }
    let rule = found as u32;
    match (found >> 32) as u8 {
        VERDICT_ALLOW => outcome(Reason::ClusterAccepted, rule),
        VERDICT_DENY => outcome(Reason::ClusterDenied, rule),
        _ => GO_ON,
    }
}

/// The POLICY lookups for a new connection of an endpoint with `flags` and tier
/// `groups` (`EndpointInfo::tier_groups_word`) that some tier judges: the Admin tier,
/// NetworkPolicy if it isolates the endpoint, the Baseline tier, else not isolated.
///
/// A global function (BTF linkage global, hence `no_mangle` and the C ABI): the
/// verifier checks it once, for any key and flags, and its callers see an unknown
/// result. Inlined, or as a static BPF-to-BPF call, it was walked again for every state
/// of every caller, and `to_pod`, which decides up to three times per packet, went past
/// the verifier's million instructions (`netpol-agent/tests/verifier_budget.rs` watches
/// the margin). A global function's pointer argument may be null as far as the verifier
/// knows: that is a drop (`policy-denied`), though no caller passes null.
#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn netpol_policy_lookups(key: *const PolicyKey, flags: u32, groups: u64) -> u64 {
    // SAFETY: a valid pointer to a key on the caller's stack, or null (checked).
    let Some(key) = (unsafe { key.as_ref() }) else {
        return outcome(Reason::PolicyDenied, RULE_NONE);
    };
    let admin = tier_decision(key, TIER_ADMIN, flags, groups);
    if admin != GO_ON {
        return admin;
    }
    let isolated = if key.direction == DIR_INGRESS {
        ENDPOINT_INGRESS_ISOLATED
    } else {
        ENDPOINT_EGRESS_ISOLATED
    };
    if flags & isolated != 0 {
        return match allowing_rule(*key, Kinds::of(flags, key.direction)) {
            Some(rule) => outcome(Reason::PolicyAllowed, rule),
            None if flags & ENDPOINT_AUDIT != 0 => outcome(Reason::AuditAllowed, RULE_NONE),
            None => outcome(Reason::PolicyDenied, RULE_NONE),
        };
    }
    let baseline = tier_decision(key, TIER_BASELINE, flags, groups);
    if baseline != GO_ON {
        return baseline;
    }
    outcome(Reason::NotIsolated, RULE_NONE)
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
    if !judged(endpoint.flags, connection.direction) {
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
    let found = netpol_policy_lookups(&key, endpoint.flags, endpoint.tier_groups_word());
    Decision {
        // SAFETY: `lookups` puts only `Reason` discriminants in the high half.
        reason: unsafe { core::mem::transmute::<u32, Reason>((found >> 32) as u32) },
        rule: found as u32,
        identity,
    }
}
