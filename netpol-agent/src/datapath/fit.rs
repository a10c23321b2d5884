//! Making the compiled state fit the kernel maps: when a map would overflow, the change
//! is refused for the endpoints (or peers) it concerns, always in the closing direction,
//! and everything else is applied. Pure: no I/O, tested below.
//!
//! A sync first adds (so the map holds the old and the new entries at once), then
//! removes. The peak it needs is `|kernel ∪ desired|`; entries already in the kernel
//! never need room. What does not fit:
//!
//! - **ENDPOINTS**: a new pod is not programmed at all; its veth is bound to
//!   [`netpol_common::IFACE_REFUSED`] and every packet on it is dropped (`refused`).
//! - **POLICY** and **POLICY_RANGES** (each with its own room): an endpoint keeps only the
//!   allow entries that are both in the kernel and desired (the intersection allows no
//!   more than the new policy), under its new isolation flags: a subset of what the
//!   policy allows, never more. A tier group's entries (shared by the endpoints the same
//!   ClusterNetworkPolicies select) are admitted or narrowed together, and a narrowed
//!   group is reported for each endpoint in it.
//! - **IPCACHE**: a new pod or node address is left out; it resolves to the ipBlock
//!   prefix around it (or to the world), whose peers are a subset of the pod's own, so
//!   fewer rules match. A new ipBlock prefix that does not fit cannot be left out safely
//!   (an `except` left out would open its range), so the whole change is refused instead
//!   and the kernel keeps the previous state.
//!
//! Admission is deterministic: lower endpoint ids (older pods, usually) and lower
//! addresses first.

use std::borrow::Cow;
use std::collections::{BTreeMap, BTreeSet};

use netpol_common::{
    Addr, DIR_MASK, EndpointInfo, PeerInfo, PolicyKey, PolicyValue, TIER_NETWORK_POLICY, names,
};

use netpol_compile::policy_maps::{Slot, slot};

use super::maps::{Work, absent_from, join};
use super::peers::Peer;
use netpol_compile::{Compiled, Lpm};

/// What could not be admitted.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// The endpoint is not programmed (ENDPOINTS full): its traffic is dropped.
    Endpoint { id: u32, capacity: u32 },
    /// The endpoint keeps only allow entries both old and new (`map`, POLICY or
    /// POLICY_RANGES, is full).
    Policy {
        id: u32,
        map: &'static str,
        capacity: u32,
    },
    /// The peer address resolves to its enclosing prefix (IPCACHE full).
    Peer { addr: Addr, capacity: u32 },
}

impl Refusal {
    /// The map that was full.
    pub fn map(&self) -> &'static str {
        match self {
            Refusal::Endpoint { .. } => names::ENDPOINTS,
            Refusal::Policy { map, .. } => map,
            Refusal::Peer { .. } => names::IPCACHE,
        }
    }

    /// The endpoint concerned, if any.
    pub fn endpoint(&self) -> Option<u32> {
        match self {
            Refusal::Endpoint { id, .. } | Refusal::Policy { id, .. } => Some(*id),
            Refusal::Peer { .. } => None,
        }
    }
}

/// The contents to write: `compiled`'s, minus what was refused.
#[derive(Debug)]
pub struct Fitted<'a> {
    pub endpoints: Cow<'a, BTreeMap<Addr, EndpointInfo>>,
    pub ipcache: Cow<'a, BTreeMap<Lpm<Addr>, PeerInfo>>,
    /// What IPCACHE needs written ([`Kernel::ipcache_version`]).
    pub ipcache_work: Work<'a, Lpm<Addr>>,
    pub policy: Cow<'a, BTreeMap<Lpm<PolicyKey>, PolicyValue>>,
    /// What POLICY and POLICY_RANGES need written ([`Kernel::policy_version`]).
    pub policy_work: Work<'a, Lpm<PolicyKey>>,
    pub refused: Vec<Refusal>,
}

/// An ipBlock prefix would not fit in IPCACHE: the change cannot be applied safely.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error(
    "IPCACHE is full (capacity {capacity}): {missing} more ipBlock prefixes do not fit; \
     the previous state stays in force"
)]
pub struct PrefixOverflow {
    pub capacity: u32,
    pub missing: usize,
}

/// What the kernel holds now.
pub struct Kernel<'a> {
    pub endpoints: &'a BTreeMap<Addr, EndpointInfo>,
    pub ipcache: &'a BTreeMap<Lpm<Addr>, Peer>,
    pub policy: &'a BTreeMap<Lpm<PolicyKey>, PolicyValue>,
    /// The version of the compiled POLICY ([`netpol_compile::KeptMap`]) that `policy` is
    /// exactly (the last sync wrote it whole), if known: see `ipcache_version`.
    pub policy_version: Option<u64>,
    /// The version of the compiled IPCACHE ([`netpol_compile::KeptMap`]) that `ipcache`
    /// is exactly (the last sync wrote it whole), if known: a compiled IPCACHE that
    /// knows its changes since is written by those keys alone.
    pub ipcache_version: Option<u64>,
}

/// `[ENDPOINTS, IPCACHE, POLICY, POLICY_RANGES]` max_entries.
pub fn fit<'a>(
    compiled: &'a Compiled,
    kernel: &Kernel<'_>,
    [endpoints_cap, ipcache_cap, policy_cap, ranges_cap]: [u32; 4],
) -> Result<Fitted<'a>, PrefixOverflow> {
    let mut refused = Vec::new();

    // ENDPOINTS: new keys, grouped by endpoint.
    let mut endpoints = Cow::Borrowed(&compiled.endpoints);
    let room = free(kernel.endpoints.len(), endpoints_cap);
    let mut new_by_endpoint: BTreeMap<u32, [usize; 1]> = BTreeMap::new();
    join(&compiled.endpoints, kernel.endpoints, |wanted, held| {
        if let (Some((_, info)), None) = (wanted, held) {
            new_by_endpoint.entry(info.id).or_default()[0] += 1;
        }
    });
    let refused_endpoints: BTreeSet<u32> = admit(new_by_endpoint, [room]).into_keys().collect();
    if !refused_endpoints.is_empty() {
        endpoints
            .to_mut()
            .retain(|_, info| !refused_endpoints.contains(&info.id));
        refused.extend(refused_endpoints.iter().map(|&id| Refusal::Endpoint {
            id,
            capacity: endpoints_cap,
        }));
    }

    // POLICY and POLICY_RANGES: entries of refused endpoints go, and those of the tier
    // groups only they were in; then new keys, grouped by owner, counted against the
    // room of the map each goes to.
    let mut policy = Cow::Borrowed(compiled.policy.as_ref());
    if !refused_endpoints.is_empty() {
        let groups: BTreeSet<u32> = endpoints
            .values()
            .flat_map(|info| info.tier_groups)
            .collect();
        policy.to_mut().retain(|key, _| match owner(key) {
            Owner::Endpoint(id) => !refused_endpoints.contains(&id),
            Owner::Group(group) => groups.contains(&group),
        });
    }
    // The kernel holding the version the compiled map was made from (or this one),
    // only the keys changed since can be new.
    let policy_changed = kernel
        .policy_version
        .filter(|_| refused_endpoints.is_empty())
        .and_then(|version| compiled.policy.changes_since(version));
    let map_of = |key: &Lpm<PolicyKey>| usize::from(matches!(slot(key), Slot::Ranges(_)));
    let mut used = [0, 0];
    let mut new_by_owner: BTreeMap<Owner, [usize; 2]> = BTreeMap::new();
    if policy_changed != Some(&[]) {
        for key in kernel.policy.keys() {
            used[map_of(key)] += 1;
        }
        for key in absent(&policy, kernel.policy, policy_changed) {
            new_by_owner.entry(owner(key)).or_default()[map_of(key)] += 1;
        }
    }
    let room = [free(used[0], policy_cap), free(used[1], ranges_cap)];
    let narrowed = admit(new_by_owner, room);
    if !narrowed.is_empty() {
        policy.to_mut().retain(|key, _| {
            !narrowed.contains_key(&owner(key)) || kernel.policy.contains_key(key)
        });
        let full = [
            (names::POLICY, policy_cap),
            (names::POLICY_RANGES, ranges_cap),
        ];
        // Each endpoint narrowed, once per map: on its own, or in a tier group.
        let mut concerned: BTreeSet<(u32, usize)> = BTreeSet::new();
        for (&owner, &map) in &narrowed {
            match owner {
                Owner::Endpoint(id) => {
                    concerned.insert((id, map));
                }
                Owner::Group(group) => concerned.extend(
                    endpoints
                        .values()
                        .filter(|info| info.tier_groups.contains(&group))
                        .map(|info| (info.id, map)),
                ),
            }
        }
        refused.extend(concerned.into_iter().map(|(id, map)| Refusal::Policy {
            id,
            map: full[map].0,
            capacity: full[map].1,
        }));
    }

    // IPCACHE: ipBlock prefixes must all fit; addresses are admitted while room lasts.
    // The kernel holding a version the compiled map knows its changes since, only the
    // keys changed can be new.
    let mut ipcache = Cow::Borrowed(compiled.ipcache.as_ref());
    let ipcache_changed = kernel
        .ipcache_version
        .and_then(|version| compiled.ipcache.changes_since(version));
    let room = free(kernel.ipcache.len(), ipcache_cap);
    let (new_prefixes, new_hosts): (Vec<&Lpm<Addr>>, Vec<&Lpm<Addr>>) =
        absent(&compiled.ipcache, kernel.ipcache, ipcache_changed)
            .into_iter()
            .partition(|key| key.prefix_len < key.data.full_prefix_len());
    if new_prefixes.len() > room {
        return Err(PrefixOverflow {
            capacity: ipcache_cap,
            missing: new_prefixes.len() - room,
        });
    }
    let host_room = room - new_prefixes.len();
    if new_hosts.len() > host_room {
        let left_out: BTreeSet<Lpm<Addr>> = new_hosts[host_room..].iter().map(|k| **k).collect();
        ipcache.to_mut().retain(|key, _| !left_out.contains(key));
        refused.extend(left_out.iter().map(|key| Refusal::Peer {
            addr: key.data,
            capacity: ipcache_cap,
        }));
    }

    Ok(Fitted {
        endpoints,
        ipcache_work: work(ipcache_changed, matches!(ipcache, Cow::Borrowed(_))),
        ipcache,
        policy_work: work(policy_changed, matches!(policy, Cow::Borrowed(_))),
        policy,
        refused,
    })
}

/// The keys of `desired` the kernel lacks: among `changed` (the keys changed since the
/// version the kernel holds) when known, else among all.
fn absent<'a, K: Ord, V, W>(
    desired: &'a BTreeMap<K, V>,
    kernel: &BTreeMap<K, W>,
    changed: Option<&'a [K]>,
) -> Vec<&'a K> {
    match changed {
        // A lookup per key, unless they are many ([`super::maps::walked`]).
        Some(keys) if keys.len() * super::maps::WALK_SHARE <= desired.len() => keys
            .iter()
            .filter(|key| desired.contains_key(key) && !kernel.contains_key(key))
            .collect(),
        _ => absent_from(desired, kernel),
    }
}

/// What is left to write of a map whose keys changed since the version the kernel holds
/// are `changed` (when known): nothing, those keys, or the whole map, when the kernel's
/// version is unknown or something of the compiled map was refused (`whole`: nothing was,
/// the kernel will hold the compiled map).
fn work<K>(changed: Option<&[K]>, whole: bool) -> Work<'_, K> {
    match changed {
        Some([]) if whole => Work::Nothing,
        Some(keys) if whole => Work::Keys(keys),
        _ => Work::Whole,
    }
}

fn free(used: usize, capacity: u32) -> usize {
    (capacity as usize).saturating_sub(used)
}

/// Who a POLICY entry belongs to: an endpoint (its NetworkPolicy entries), or a tier
/// group (see [`EndpointInfo::tier_groups`]). Endpoints are admitted before groups.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Owner {
    Endpoint(u32),
    Group(u32),
}

fn owner(key: &Lpm<PolicyKey>) -> Owner {
    if key.data.direction & !DIR_MASK == TIER_NETWORK_POLICY {
        Owner::Endpoint(key.data.endpoint)
    } else {
        Owner::Group(key.data.endpoint)
    }
}

/// Admits owners (an endpoint id, say → new entries in each of `N` maps) in order while
/// they fit in every map's `room`; returns those that do not, each with the first map
/// that lacked room.
fn admit<K: Ord, const N: usize>(
    new_by_owner: BTreeMap<K, [usize; N]>,
    mut room: [usize; N],
) -> BTreeMap<K, usize> {
    let mut refused = BTreeMap::new();
    for (owner, needed) in new_by_owner {
        match (0..N).find(|&map| needed[map] > room[map]) {
            Some(map) => {
                refused.insert(owner, map);
            }
            None => {
                for map in 0..N {
                    room[map] -= needed[map];
                }
            }
        }
    }
    refused
}

#[cfg(test)]
mod tests {
    use netpol_common::{
        DIR_INGRESS, ENDPOINT_INGRESS_ISOLATED, POLICY_PREFIX_FULL, PROTO_TCP, RULE_NONE,
    };

    use super::*;

    fn addr(last: u8) -> Addr {
        Addr::v4([10, 0, 0, last])
    }

    fn endpoint(id: u32) -> EndpointInfo {
        EndpointInfo {
            tier_groups: [0, 0],
            id,
            flags: ENDPOINT_INGRESS_ISOLATED,
        }
    }

    fn allow(endpoint: u32, identity: u32, port: u16) -> (Lpm<PolicyKey>, PolicyValue) {
        let key = PolicyKey {
            endpoint,
            identity,
            direction: DIR_INGRESS,
            protocol: PROTO_TCP,
            port: port.to_be_bytes(),
        };
        (Lpm::new(POLICY_PREFIX_FULL, key), PolicyValue::allow(0))
    }

    fn host(last: u8, identity: u32) -> (Lpm<Addr>, PeerInfo) {
        let a = addr(last);
        (
            Lpm::new(a.full_prefix_len(), a),
            PeerInfo { identity, flags: 0 },
        )
    }

    fn prefix(third: u8, bits: u32, identity: u32) -> (Lpm<Addr>, PeerInfo) {
        (
            Lpm::new(
                netpol_common::ADDR_FAMILY_BITS + bits,
                Addr::v4([10, 1, third, 0]),
            ),
            PeerInfo { identity, flags: 0 },
        )
    }

    struct Maps {
        endpoints: BTreeMap<Addr, EndpointInfo>,
        ipcache: BTreeMap<Lpm<Addr>, Peer>,
        policy: BTreeMap<Lpm<PolicyKey>, PolicyValue>,
    }

    /// IPCACHE entries as the kernel holds them, each in a slot of its own.
    fn held(entries: &[(Lpm<Addr>, PeerInfo)]) -> BTreeMap<Lpm<Addr>, Peer> {
        (0..)
            .zip(entries)
            .map(|(slot, &(key, info))| (key, Peer { info, slot }))
            .collect()
    }

    impl Maps {
        fn kernel(&self) -> Kernel<'_> {
            Kernel {
                endpoints: &self.endpoints,
                ipcache: &self.ipcache,
                policy: &self.policy,
                policy_version: None,
                ipcache_version: None,
            }
        }
    }

    fn compiled(
        endpoints: &[(u8, u32)],
        ipcache: &[(Lpm<Addr>, PeerInfo)],
        policy: &[(Lpm<PolicyKey>, PolicyValue)],
    ) -> Compiled {
        Compiled {
            endpoints: endpoints
                .iter()
                .map(|&(last, id)| (addr(last), endpoint(id)))
                .collect(),
            ipcache: ipcache.iter().copied().collect(),
            policy: policy.iter().copied().collect(),
            ..Compiled::default()
        }
    }

    fn empty() -> Maps {
        Maps {
            endpoints: BTreeMap::new(),
            ipcache: BTreeMap::new(),
            policy: BTreeMap::new(),
        }
    }

    #[test]
    fn everything_fits_nothing_is_copied() {
        let c = compiled(&[(1, 1)], &[host(1, 16)], &[allow(1, 16, 80)]);
        let maps = empty();
        let fitted = fit(&c, &maps.kernel(), [1, 1, 1, 1]).unwrap();
        assert!(fitted.refused.is_empty());
        assert!(matches!(fitted.endpoints, Cow::Borrowed(_)));
        assert!(matches!(fitted.policy, Cow::Borrowed(_)));
        assert!(matches!(fitted.ipcache, Cow::Borrowed(_)));
    }

    #[test]
    fn new_endpoints_beyond_capacity_are_refused_whole_with_their_policy() {
        // Endpoint 2 has two addresses and only one slot is left after endpoint 1.
        let c = compiled(
            &[(1, 1), (2, 2), (3, 2), (4, 3)],
            &[],
            &[allow(1, 16, 80), allow(2, 16, 80), allow(3, 16, 80)],
        );
        let fitted = fit(&c, &empty().kernel(), [2, 100, 100, 100]).unwrap();
        // 1 fits (1 slot), 2 needs 2 (only 1 left): refused; 3 takes the last slot.
        assert_eq!(
            fitted.refused,
            vec![Refusal::Endpoint { id: 2, capacity: 2 }]
        );
        let ids: Vec<u32> = fitted.endpoints.values().map(|e| e.id).collect();
        assert_eq!(ids, vec![1, 3]);
        assert!(fitted.policy.keys().all(|k| k.data.endpoint != 2));
        assert_eq!(fitted.policy.len(), 2);
    }

    #[test]
    fn endpoints_already_in_the_kernel_need_no_room() {
        let mut maps = empty();
        maps.endpoints.insert(addr(1), endpoint(1));
        maps.endpoints.insert(addr(9), endpoint(9)); // stale: removed after the adds
        let c = compiled(&[(1, 1), (2, 2)], &[], &[]);
        // Peak is {1, 9, 2}: 3 entries.
        let fitted = fit(&c, &maps.kernel(), [3, 10, 10, 10]).unwrap();
        assert!(fitted.refused.is_empty());
        let fitted = fit(&c, &maps.kernel(), [2, 10, 10, 10]).unwrap();
        assert_eq!(fitted.refused[0].endpoint(), Some(2));
    }

    #[test]
    fn policy_overflow_narrows_to_entries_both_old_and_new() {
        let mut maps = empty();
        // Endpoint 1 allowed ports 80 and 81; the new policy allows 80 and 82..=84.
        maps.policy.extend([allow(1, 16, 80), allow(1, 16, 81)]);
        let c = compiled(
            &[(1, 1)],
            &[],
            &[
                allow(1, 16, 80),
                allow(1, 16, 82),
                allow(1, 16, 83),
                allow(1, 16, 84),
            ],
        );
        let fitted = fit(&c, &maps.kernel(), [10, 10, 4, 10]).unwrap();
        assert_eq!(
            fitted.refused,
            vec![Refusal::Policy {
                id: 1,
                map: names::POLICY,
                capacity: 4
            }]
        );
        // Only port 80: allowed before and after. 81 (revoked) is never kept.
        let ports: Vec<[u8; 2]> = fitted.policy.keys().map(|k| k.data.port).collect();
        assert_eq!(ports, vec![80u16.to_be_bytes()]);
    }

    #[test]
    fn policy_overflow_admits_lower_ids_first() {
        let c = compiled(
            &[(1, 1), (2, 2)],
            &[],
            &[allow(1, 16, 80), allow(2, 16, 80), allow(2, 16, 81)],
        );
        let fitted = fit(&c, &empty().kernel(), [10, 10, 2, 10]).unwrap();
        assert_eq!(
            fitted.refused,
            vec![Refusal::Policy {
                id: 2,
                map: names::POLICY,
                capacity: 2
            }]
        );
        assert_eq!(fitted.policy.len(), 1);
        // Endpoint 2 stays programmed (and isolated): it is the policy that narrowed.
        assert_eq!(fitted.endpoints.len(), 2);
    }

    /// An Admin tier deny of `group`.
    fn tier_deny(group: u32, identity: u32, port: u16) -> (Lpm<PolicyKey>, PolicyValue) {
        let (mut key, _) = allow(group, identity, port);
        key.data.direction |= netpol_common::TIER_ADMIN;
        (key, PolicyValue::new(0, netpol_common::VERDICT_DENY))
    }

    /// [`compiled`] whose endpoints are in Admin tier groups: (address, id, group).
    fn compiled_in_groups(
        endpoints: &[(u8, u32, u32)],
        policy: &[(Lpm<PolicyKey>, PolicyValue)],
    ) -> Compiled {
        let mut c = compiled(&[], &[], policy);
        for &(last, id, group) in endpoints {
            let info = EndpointInfo {
                tier_groups: [group, 0],
                ..endpoint(id)
            };
            c.endpoints.insert(addr(last), info);
        }
        c
    }

    #[test]
    fn a_tier_group_that_does_not_fit_is_narrowed_for_every_endpoint_in_it() {
        // Endpoints 1 and 2 share group 1 (two new entries), endpoint 3 is alone in group
        // 2 (one); one entry of room: group 1 does not fit, group 2 does.
        let c = compiled_in_groups(
            &[(1, 1, 1), (2, 2, 1), (3, 3, 2)],
            &[
                tier_deny(1, 16, 22),
                tier_deny(1, 17, 22),
                tier_deny(2, 16, 22),
            ],
        );
        let fitted = fit(&c, &empty().kernel(), [10, 10, 1, 10]).unwrap();
        let refusal = |id| Refusal::Policy {
            id,
            map: names::POLICY,
            capacity: 1,
        };
        assert_eq!(fitted.refused, vec![refusal(1), refusal(2)]);
        let kept: Vec<u32> = fitted.policy.keys().map(|k| k.data.endpoint).collect();
        assert_eq!(kept, vec![2]);
    }

    #[test]
    fn a_refused_endpoints_tier_group_stays_while_another_endpoint_is_in_it() {
        // Endpoint 2 does not fit in ENDPOINTS; group 1 stays for endpoint 1, group 2
        // (endpoint 2's alone) goes with it.
        let c = compiled_in_groups(
            &[(1, 1, 1), (2, 2, 2), (3, 2, 1)],
            &[tier_deny(1, 16, 22), tier_deny(2, 16, 22)],
        );
        let fitted = fit(&c, &empty().kernel(), [1, 10, 10, 10]).unwrap();
        assert_eq!(
            fitted.refused,
            vec![Refusal::Endpoint { id: 2, capacity: 1 }]
        );
        let kept: Vec<u32> = fitted.policy.keys().map(|k| k.data.endpoint).collect();
        assert_eq!(kept, vec![1]);
    }

    #[test]
    fn port_ranges_have_their_own_room() {
        // Endpoint 1: one exact port and a range of two prefixes; POLICY_RANGES holds one.
        let range = |endpoint, port: u16| {
            let (key, value) = allow(endpoint, 16, port);
            (
                Lpm::new(netpol_common::POLICY_PREFIX_ANY_PORT + 15, key.data),
                value,
            )
        };
        let c = compiled(
            &[(1, 1), (2, 2)],
            &[],
            &[
                allow(1, 16, 80),
                range(1, 8080),
                range(1, 8082),
                allow(2, 16, 80),
            ],
        );
        let fitted = fit(&c, &empty().kernel(), [10, 10, 10, 1]).unwrap();
        assert_eq!(
            fitted.refused,
            vec![Refusal::Policy {
                id: 1,
                map: names::POLICY_RANGES,
                capacity: 1
            }]
        );
        // Endpoint 2 needs no range: it is admitted whole.
        assert_eq!(
            fitted
                .policy
                .keys()
                .map(|k| k.data.endpoint)
                .collect::<Vec<_>>(),
            vec![2]
        );
        assert!(
            fit(&c, &empty().kernel(), [10, 10, 2, 2])
                .unwrap()
                .refused
                .is_empty()
        );
    }

    #[test]
    fn ipcache_leaves_out_new_addresses_but_never_prefixes() {
        let c = compiled(&[], &[prefix(0, 24, 17), host(1, 16), host(2, 16)], &[]);
        let fitted = fit(&c, &empty().kernel(), [10, 2, 10, 10]).unwrap();
        assert_eq!(
            fitted.refused,
            vec![Refusal::Peer {
                addr: addr(2),
                capacity: 2
            }]
        );
        assert!(fitted.ipcache.contains_key(&prefix(0, 24, 17).0));

        let c = compiled(
            &[],
            &[prefix(0, 24, 17), prefix(1, 24, 18), host(1, 16)],
            &[],
        );
        let error = fit(&c, &empty().kernel(), [10, 1, 10, 10]).unwrap_err();
        assert_eq!(
            error,
            PrefixOverflow {
                capacity: 1,
                missing: 1
            }
        );
        assert!(error.to_string().contains("IPCACHE is full"));
    }

    /// The kernel holding version `first` of the compiled IPCACHE (`first` entries),
    /// and the compiled map made from it (`next` entries).
    fn ipcache_versions(
        first: &[(Lpm<Addr>, PeerInfo)],
        next: &[(Lpm<Addr>, PeerInfo)],
    ) -> (Maps, u64, Compiled) {
        let mut kept = netpol_compile::KeptMap::default();
        kept.update(first.to_vec());
        let version = kept.version();
        let maps = Maps {
            ipcache: held(first),
            ..empty()
        };
        kept.update(next.to_vec());
        let c = Compiled {
            ipcache: kept,
            ..Compiled::default()
        };
        (maps, version, c)
    }

    #[test]
    fn an_ipcache_made_from_the_kernels_version_is_written_by_the_keys_it_changed() {
        let first = [prefix(0, 24, 17), host(1, 16), host(2, 16)];
        let next = [prefix(0, 24, 17), host(1, 18), host(3, 16)];
        let (maps, version, c) = ipcache_versions(&first, &next);
        let kernel = Kernel {
            ipcache_version: Some(version),
            ..maps.kernel()
        };
        let fitted = fit(&c, &kernel, [10, 10, 10, 10]).unwrap();
        let changed = [host(1, 0).0, host(2, 0).0, host(3, 0).0];
        assert_eq!(fitted.ipcache_work, Work::Keys(&changed));
        // The kernel holding the compiled version itself: nothing to write.
        let kernel = Kernel {
            ipcache_version: Some(c.ipcache.version()),
            ..maps.kernel()
        };
        let fitted = fit(&c, &kernel, [10, 10, 10, 10]).unwrap();
        assert_eq!(fitted.ipcache_work, Work::Nothing);
    }

    #[test]
    fn an_ipcache_of_another_lineage_or_narrowed_is_compared_whole() {
        let first = [prefix(0, 24, 17), host(1, 16)];
        let next = [prefix(0, 24, 17), host(1, 16), host(2, 16), host(3, 16)];
        let (maps, version, c) = ipcache_versions(&first, &next);
        // Some other version in the kernel (or none known).
        for other in [None, Some(version + 1_000_000)] {
            let kernel = Kernel {
                ipcache_version: other,
                ..maps.kernel()
            };
            let fitted = fit(&c, &kernel, [10, 10, 10, 10]).unwrap();
            assert_eq!(fitted.ipcache_work, Work::Whole);
        }
        // Made from the kernel's version, but the room is for one new address of two:
        // what is written is not the compiled map, so the whole is compared.
        let kernel = Kernel {
            ipcache_version: Some(version),
            ..maps.kernel()
        };
        let fitted = fit(&c, &kernel, [10, 3, 10, 10]).unwrap();
        assert_eq!(
            fitted.refused,
            vec![Refusal::Peer {
                addr: addr(3),
                capacity: 3
            }]
        );
        assert_eq!(fitted.ipcache_work, Work::Whole);
    }

    #[test]
    fn policy_made_from_the_kernels_version_is_written_by_its_keys_unless_refused() {
        let mut kept = netpol_compile::KeptMap::default();
        kept.update([allow(1, 16, 80), allow(2, 16, 80)]);
        let version = kept.version();
        let maps = Maps {
            policy: kept.iter().map(|(k, v)| (*k, *v)).collect(),
            endpoints: [(addr(1), endpoint(1))].into_iter().collect(),
            ..empty()
        };
        // Endpoint 2 gets port 81 instead of 80.
        kept.change([
            (allow(2, 16, 80).0, None),
            (allow(2, 16, 81).0, Some(allow(2, 16, 81).1)),
        ]);
        let c = Compiled {
            endpoints: [(addr(1), endpoint(1)), (addr(2), endpoint(2))]
                .into_iter()
                .collect(),
            policy: kept,
            ..Compiled::default()
        };
        let kernel = Kernel {
            policy_version: Some(version),
            ..maps.kernel()
        };
        let fitted = fit(&c, &kernel, [10, 10, 10, 10]).unwrap();
        let changed = [allow(2, 16, 80).0, allow(2, 16, 81).0];
        assert_eq!(fitted.policy_work, Work::Keys(&changed));
        // No room for endpoint 2: its entries are refused, so the whole map is compared.
        let fitted = fit(&c, &kernel, [1, 10, 10, 10]).unwrap();
        assert_eq!(
            fitted.refused,
            vec![Refusal::Endpoint { id: 2, capacity: 1 }]
        );
        assert_eq!(fitted.policy_work, Work::Whole);
        // The kernel holding the compiled version: nothing to write.
        let kernel = Kernel {
            policy_version: Some(c.policy.version()),
            ..maps.kernel()
        };
        let fitted = fit(&c, &kernel, [10, 10, 10, 10]).unwrap();
        assert_eq!(fitted.policy_work, Work::Nothing);
    }

    #[test]
    fn rule_none_values_are_irrelevant_to_fitting() {
        // Values never need room: only keys count.
        let mut maps = empty();
        maps.policy
            .insert(allow(1, 16, 80).0, PolicyValue::allow(RULE_NONE));
        let c = compiled(&[(1, 1)], &[], &[allow(1, 16, 80)]);
        assert!(
            fit(&c, &maps.kernel(), [1, 1, 1, 1])
                .unwrap()
                .refused
                .is_empty()
        );
    }
}
