//! How the allow entries of [`Compiled::policy`](crate::Compiled) are laid out in the
//! kernel, and the kernel's lookup over that layout.
//!
//! The compiler thinks in one set of LPM keys over [`PolicyKey`] (a prefix length says
//! how much of protocol and port is wildcarded). The kernel holds them in two maps so
//! that the common case is one hash lookup, whatever the number of entries:
//!
//! - POLICY (hash): exact ports ([`POLICY_PREFIX_FULL`]), every port of a protocol
//!   ([`POLICY_PREFIX_ANY_PORT`], port [`PORT_ANY`](netpol_common::PORT_ANY)) and every
//!   protocol ([`POLICY_PREFIX_ANY_PROTO`], protocol and port 0). The masked key data is
//!   the hash key: masking is the wildcard encoding.
//! - POLICY_RANGES (LPM trie): every other prefix, i.e. port ranges.
//!
//! An endpoint's flags say, per direction, which kinds of entries it has ([`kind`]), and
//! the programs make only the lookups that can hit. [`lookup`] replays that sequence and
//! is what [`crate::model`] uses.

use std::collections::BTreeMap;

use netpol_common::{
    DIR_INGRESS, DIR_MASK, ENDPOINT_EGRESS_ANY_PEER, ENDPOINT_EGRESS_ANY_PORT,
    ENDPOINT_EGRESS_ANY_PROTOCOL, ENDPOINT_EGRESS_PORT_RANGES, ENDPOINT_INGRESS_ANY_PEER,
    ENDPOINT_INGRESS_ANY_PORT, ENDPOINT_INGRESS_ANY_PROTOCOL, ENDPOINT_INGRESS_PORT_RANGES,
    EndpointInfo, IDENTITY_ANY, POLICY_PREFIX_ANY_PORT, POLICY_PREFIX_ANY_PROTO,
    POLICY_PREFIX_FULL, PROTOCOL_ANY, PolicyKey, PolicyValue, TIER_ADMIN, TIER_BASELINE,
    TIER_KIND_ANY_PORT, TIER_KIND_ANY_PROTOCOL, TIER_KIND_EXACT, TIER_KIND_RANGES, TIER_KINDS,
    TIER_NETWORK_POLICY, tier_kinds, tier_kinds_shift,
};

use crate::lpm::Lpm;

/// Where one allow entry lives in the kernel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Slot {
    /// POLICY, under this key.
    Policy(PolicyKey),
    /// POLICY_RANGES, under this prefix.
    Ranges(Lpm<PolicyKey>),
}

/// The map and key of an allow entry.
pub fn slot(key: &Lpm<PolicyKey>) -> Slot {
    match key.prefix_len {
        POLICY_PREFIX_FULL | POLICY_PREFIX_ANY_PORT | POLICY_PREFIX_ANY_PROTO => {
            Slot::Policy(key.data)
        }
        _ => Slot::Ranges(*key),
    }
}

/// The allow entry a POLICY key stands for (inverse of [`slot`]).
pub fn from_policy(key: PolicyKey) -> Lpm<PolicyKey> {
    let prefix_len = if key.protocol == PROTOCOL_ANY {
        POLICY_PREFIX_ANY_PROTO
    } else if key.port == netpol_common::PORT_ANY {
        POLICY_PREFIX_ANY_PORT
    } else {
        POLICY_PREFIX_FULL
    };
    Lpm::new(prefix_len, key)
}

/// Whether `key` can be held at all: no entry names port 0 exactly or protocol 0 with
/// a port, since those keys are the wildcard encoding (they would allow more).
pub fn representable(key: &Lpm<PolicyKey>) -> bool {
    let wildcard_port = key.data.port == netpol_common::PORT_ANY;
    match key.prefix_len {
        POLICY_PREFIX_FULL => !wildcard_port && key.data.protocol != PROTOCOL_ANY,
        POLICY_PREFIX_ANY_PROTO => true,
        _ => key.data.protocol != PROTOCOL_ANY,
    }
}

/// Every flag [`kind`] can set.
pub const KIND_FLAGS: u32 = TIER_FLAGS
    | ENDPOINT_INGRESS_ANY_PEER
    | ENDPOINT_EGRESS_ANY_PEER
    | ENDPOINT_INGRESS_PORT_RANGES
    | ENDPOINT_EGRESS_PORT_RANGES
    | ENDPOINT_INGRESS_ANY_PORT
    | ENDPOINT_EGRESS_ANY_PORT
    | ENDPOINT_INGRESS_ANY_PROTOCOL
    | ENDPOINT_EGRESS_ANY_PROTOCOL;

/// Every flag of the groups of the cluster admin's tiers ([`tier_kinds`]).
pub const TIER_FLAGS: u32 = (TIER_KINDS << tier_kinds_shift(TIER_ADMIN, DIR_INGRESS))
    | (TIER_KINDS << tier_kinds_shift(TIER_ADMIN, netpol_common::DIR_EGRESS))
    | (TIER_KINDS << tier_kinds_shift(TIER_BASELINE, DIR_INGRESS))
    | (TIER_KINDS << tier_kinds_shift(TIER_BASELINE, netpol_common::DIR_EGRESS));

/// The endpoint flag that makes the programs look for entries like `key` (0 for exact
/// ports of an exact identity in NetworkPolicy's tier: always looked for when isolated).
pub fn kind(key: &Lpm<PolicyKey>) -> u32 {
    let tier = key.data.direction & !DIR_MASK;
    let direction = key.data.direction & DIR_MASK;
    if tier != TIER_NETWORK_POLICY {
        let kind = match key.prefix_len {
            POLICY_PREFIX_FULL => TIER_KIND_EXACT,
            POLICY_PREFIX_ANY_PORT => TIER_KIND_ANY_PORT,
            POLICY_PREFIX_ANY_PROTO => TIER_KIND_ANY_PROTOCOL,
            _ => TIER_KIND_RANGES,
        };
        return kind << tier_kinds_shift(tier, direction);
    }
    let ingress = direction == DIR_INGRESS;
    let pick = |ingress_flag, egress_flag| if ingress { ingress_flag } else { egress_flag };
    let mut flags = 0;
    if key.data.identity == IDENTITY_ANY {
        flags |= pick(ENDPOINT_INGRESS_ANY_PEER, ENDPOINT_EGRESS_ANY_PEER);
    }
    flags |= match key.prefix_len {
        POLICY_PREFIX_FULL => 0,
        POLICY_PREFIX_ANY_PORT => pick(ENDPOINT_INGRESS_ANY_PORT, ENDPOINT_EGRESS_ANY_PORT),
        POLICY_PREFIX_ANY_PROTO => {
            pick(ENDPOINT_INGRESS_ANY_PROTOCOL, ENDPOINT_EGRESS_ANY_PROTOCOL)
        }
        _ => pick(ENDPOINT_INGRESS_PORT_RANGES, ENDPOINT_EGRESS_PORT_RANGES),
    };
    flags
}

/// Whether `key` is one of `endpoint`'s entries: a NetworkPolicy entry of its id, or an
/// entry of its group in the key's tier ([`EndpointInfo::tier_groups`]).
pub fn belongs(key: &Lpm<PolicyKey>, endpoint: &EndpointInfo) -> bool {
    let tier = key.data.direction & !DIR_MASK;
    let owner = if tier == TIER_NETWORK_POLICY {
        endpoint.id
    } else {
        endpoint.tier_group(tier)
    };
    owner != 0 && key.data.endpoint == owner
}

/// The kind flags ([`kind`]) of `endpoint`'s entries in `policy` ([`belongs`]).
pub fn kinds(policy: &BTreeMap<Lpm<PolicyKey>, PolicyValue>, endpoint: &EndpointInfo) -> u32 {
    policy
        .keys()
        .filter(|key| belongs(key, endpoint))
        .fold(0, |kinds, key| kinds | kind(key))
}

/// The kernel's lookup: the entry allowing `key` (a packet's exact key) for an endpoint
/// with `flags`, as `netpol-ebpf/src/policy.rs` finds it in the two maps. The exact
/// identity first, then [`IDENTITY_ANY`] when flagged; for each, the exact port, the
/// longest port range, every port of the protocol, every protocol, each looked up only
/// when flagged.
pub fn lookup(
    policy: &BTreeMap<Lpm<PolicyKey>, PolicyValue>,
    key: PolicyKey,
    flags: u32,
) -> Option<&PolicyValue> {
    let ingress = key.direction == DIR_INGRESS;
    let has = |ingress_flag: u32, egress_flag: u32| {
        flags & if ingress { ingress_flag } else { egress_flag } != 0
    };
    let kinds = Kinds {
        ranges: has(ENDPOINT_INGRESS_PORT_RANGES, ENDPOINT_EGRESS_PORT_RANGES),
        any_port: has(ENDPOINT_INGRESS_ANY_PORT, ENDPOINT_EGRESS_ANY_PORT),
        any_protocol: has(ENDPOINT_INGRESS_ANY_PROTOCOL, ENDPOINT_EGRESS_ANY_PROTOCOL),
    };
    most_specific(policy, key, kinds).or_else(|| {
        has(ENDPOINT_INGRESS_ANY_PEER, ENDPOINT_EGRESS_ANY_PEER)
            .then(|| {
                let any_peer = PolicyKey {
                    identity: IDENTITY_ANY,
                    ..key
                };
                most_specific(policy, any_peer, kinds)
            })
            .flatten()
    })
}

/// The kernel's lookup in a cluster admin's tier ([`TIER_ADMIN`] or [`TIER_BASELINE`]):
/// the entry deciding `key` (a packet's exact key, NetworkPolicy's direction) for
/// `endpoint`, in its group of the tier, as `netpol-ebpf/src/policy.rs` finds it.
/// Nothing when the endpoint has no entries in the tier and direction; else the exact
/// port, the longest port range, every port of the protocol, every protocol, each looked
/// up only when flagged. Tiers have no any-peer entries: the compiler writes one entry
/// per identity, each holding the first rule (in the tier's order) that matches it there.
pub fn lookup_tier<'p>(
    policy: &'p BTreeMap<Lpm<PolicyKey>, PolicyValue>,
    key: PolicyKey,
    tier: u8,
    endpoint: &EndpointInfo,
) -> Option<&'p PolicyValue> {
    let kinds = tier_kinds(endpoint.flags, tier, key.direction);
    if kinds == 0 {
        return None;
    }
    let key = PolicyKey {
        endpoint: endpoint.tier_group(tier),
        direction: key.direction | tier,
        ..key
    };
    let kinds = Kinds {
        ranges: kinds & TIER_KIND_RANGES != 0,
        any_port: kinds & TIER_KIND_ANY_PORT != 0,
        any_protocol: kinds & TIER_KIND_ANY_PROTOCOL != 0,
    };
    most_specific(policy, key, kinds)
}

/// Which lookups after the exact port an endpoint's flags call for.
#[derive(Clone, Copy)]
struct Kinds {
    ranges: bool,
    any_port: bool,
    any_protocol: bool,
}

/// The most specific entry for one identity: the exact port, the longest port range,
/// every port of the protocol, every protocol, each after the first only when flagged.
fn most_specific(
    policy: &BTreeMap<Lpm<PolicyKey>, PolicyValue>,
    key: PolicyKey,
    kinds: Kinds,
) -> Option<&PolicyValue> {
    let hash = |k: PolicyKey| policy.get(&from_policy(k));
    hash(key)
        .or_else(|| kinds.ranges.then(|| range_walk(policy, &key)).flatten())
        .or_else(|| kinds.any_port.then(|| hash(key.any_port())).flatten())
        .or_else(|| {
            kinds
                .any_protocol
                .then(|| hash(key.any_protocol()))
                .flatten()
        })
}

/// POLICY_RANGES' longest-prefix match: over the prefixes that are not POLICY's.
fn range_walk<'a>(
    policy: &'a BTreeMap<Lpm<PolicyKey>, PolicyValue>,
    key: &PolicyKey,
) -> Option<&'a PolicyValue> {
    (POLICY_PREFIX_ANY_PROTO + 1..POLICY_PREFIX_FULL)
        .rev()
        .filter(|&len| len != POLICY_PREFIX_ANY_PORT)
        .find_map(|len| policy.get(&Lpm::new(len, *key)))
}

#[cfg(test)]
mod tests {
    use netpol_common::{DIR_EGRESS, PROTO_TCP, PROTO_UDP};

    use super::*;

    fn key(identity: u32, protocol: u8, port: u16) -> PolicyKey {
        PolicyKey {
            endpoint: 7,
            identity,
            direction: DIR_EGRESS,
            protocol,
            port: port.to_be_bytes(),
        }
    }

    fn allow(rule: u32) -> PolicyValue {
        PolicyValue::allow(rule)
    }

    #[test]
    fn every_entry_goes_to_one_map_and_comes_back_unchanged() {
        let entries = [
            Lpm::new(POLICY_PREFIX_FULL, key(3, PROTO_TCP, 80)),
            Lpm::new(POLICY_PREFIX_ANY_PORT, key(3, PROTO_UDP, 0)),
            Lpm::new(POLICY_PREFIX_ANY_PROTO, key(IDENTITY_ANY, 0, 0)),
            Lpm::new(POLICY_PREFIX_ANY_PORT + 6, key(3, PROTO_TCP, 1024)),
        ];
        for entry in entries {
            assert!(representable(&entry));
            match slot(&entry) {
                Slot::Policy(k) => assert_eq!(from_policy(k), entry),
                Slot::Ranges(lpm) => {
                    assert_eq!(lpm, entry);
                    assert_ne!(kind(&entry) & ENDPOINT_EGRESS_PORT_RANGES, 0);
                }
            }
        }
    }

    #[test]
    fn keys_that_spell_a_wildcard_are_not_representable_as_exact_entries() {
        assert!(!representable(&Lpm::new(
            POLICY_PREFIX_FULL,
            key(3, PROTO_TCP, 0)
        )));
        assert!(!representable(&Lpm::new(POLICY_PREFIX_FULL, key(3, 0, 80))));
        assert!(!representable(&Lpm::new(
            POLICY_PREFIX_ANY_PORT,
            key(3, 0, 0)
        )));
    }

    #[test]
    fn the_most_specific_entry_decides_and_unflagged_kinds_are_never_looked_up() {
        let mut policy = BTreeMap::new();
        policy.insert(
            Lpm::new(POLICY_PREFIX_FULL, key(3, PROTO_TCP, 8080)),
            allow(1),
        );
        // 8080..=8095
        policy.insert(
            Lpm::new(POLICY_PREFIX_ANY_PORT + 12, key(3, PROTO_TCP, 8080)),
            allow(2),
        );
        policy.insert(
            Lpm::new(POLICY_PREFIX_ANY_PORT, key(3, PROTO_TCP, 0)),
            allow(3),
        );
        policy.insert(
            Lpm::new(POLICY_PREFIX_ANY_PROTO, key(IDENTITY_ANY, 0, 0)),
            allow(4),
        );
        let endpoint = EndpointInfo {
            id: 7,
            ..EndpointInfo::default()
        };
        let flags = kinds(&policy, &endpoint);
        let rule = |identity, protocol, port, flags| {
            lookup(&policy, key(identity, protocol, port), flags).map(|v| v.rule)
        };
        assert_eq!(rule(3, PROTO_TCP, 8080, flags), Some(1));
        assert_eq!(rule(3, PROTO_TCP, 8081, flags), Some(2));
        assert_eq!(rule(3, PROTO_TCP, 9000, flags), Some(3));
        assert_eq!(
            rule(3, PROTO_UDP, 53, flags),
            Some(4),
            "any peer, any protocol"
        );
        assert_eq!(rule(9, PROTO_UDP, 53, flags), Some(4));
        // Without a kind's flag its entries are invisible, as in the kernel.
        let without = |flag: u32| flags & !flag;
        assert_eq!(
            rule(3, PROTO_TCP, 8081, without(ENDPOINT_EGRESS_PORT_RANGES)),
            Some(3)
        );
        assert_eq!(
            rule(3, PROTO_TCP, 9000, without(ENDPOINT_EGRESS_ANY_PORT)),
            Some(4)
        );
        assert_eq!(
            rule(9, PROTO_UDP, 53, without(ENDPOINT_EGRESS_ANY_PEER)),
            None
        );
        assert_eq!(
            rule(3, PROTO_UDP, 53, without(ENDPOINT_EGRESS_ANY_PROTOCOL)),
            None
        );
    }
}
