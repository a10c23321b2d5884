//! Who holds each pod address, for naming the peers of flow records: the holder the
//! compile chooses ([`netpol_compile::state::address_owners`]), kept up to date with the
//! pods a snapshot changed, so that an apply costs O(changes) here, not O(pods).

use std::collections::btree_map::Entry;
use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use netpol_compile::state::{
    ClusterState, ObjectRef, PodInfo, claims_before, holds_pod_addresses, pod_ips,
};

/// Pod addresses and their holders. A pod's name (two shared strings) is copied, not
/// the strings; an address is one entry of `holders` unless several pods list it (rare:
/// a stale object beside the pod that has the address now), so at 150,000 pods the book
/// is ~8 MiB.
#[derive(Debug, Default)]
pub struct AddressBook {
    /// Each pod that holds pod addresses, as the book last read it (a pointer shared with
    /// the state's): the addresses it claimed are read from it again when it changes.
    listed: BTreeMap<ObjectRef, PodInfo>,
    /// The pod holding each address: of its claimants (the pods listing it), the one
    /// that claims before the others.
    holders: Holders,
    /// The other claimants of each address that more than one pod lists.
    others: BTreeMap<IpAddr, Vec<ObjectRef>>,
}

/// The holder of each address, IPv4 and IPv6 apart: an `IpAddr` key is 17 bytes, an
/// IPv4 address 4 (at 150,000 pods, ~2.5 MiB less).
#[derive(Debug, Default)]
struct Holders {
    v4: BTreeMap<[u8; 4], ObjectRef>,
    v6: BTreeMap<[u8; 16], ObjectRef>,
}

impl Holders {
    fn get(&self, ip: &IpAddr) -> Option<&ObjectRef> {
        match ip {
            IpAddr::V4(ip) => self.v4.get(&ip.octets()),
            IpAddr::V6(ip) => self.v6.get(&ip.octets()),
        }
    }

    fn get_mut(&mut self, ip: &IpAddr) -> Option<&mut ObjectRef> {
        match ip {
            IpAddr::V4(ip) => self.v4.get_mut(&ip.octets()),
            IpAddr::V6(ip) => self.v6.get_mut(&ip.octets()),
        }
    }

    /// Sets the holder of `ip`; returns the one it replaced.
    fn insert(&mut self, ip: IpAddr, holder: ObjectRef) -> Option<ObjectRef> {
        match ip {
            IpAddr::V4(ip) => self.v4.insert(ip.octets(), holder),
            IpAddr::V6(ip) => self.v6.insert(ip.octets(), holder),
        }
    }

    fn remove(&mut self, ip: &IpAddr) -> Option<ObjectRef> {
        match ip {
            IpAddr::V4(ip) => self.v4.remove(&ip.octets()),
            IpAddr::V6(ip) => self.v6.remove(&ip.octets()),
        }
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.v4.len() + self.v6.len()
    }

    #[cfg(test)]
    fn all(&self) -> BTreeMap<IpAddr, ObjectRef> {
        let v4 = self
            .v4
            .iter()
            .map(|(ip, obj)| (IpAddr::from(*ip), obj.clone()));
        let v6 = self
            .v6
            .iter()
            .map(|(ip, obj)| (IpAddr::from(*ip), obj.clone()));
        v4.chain(v6).collect()
    }
}

/// The holders of one family's addresses from `claims` (each address with a pod listing
/// it), built whole from a sorted list: the map's nodes are full (filled in key order one
/// entry at a time, they are left half empty). The claims after an address's first go to
/// `others`, to be chosen among by the caller.
fn holders_of<K: Ord + Copy + Into<IpAddr>>(
    mut claims: Vec<(K, &ObjectRef)>,
    others: &mut BTreeMap<IpAddr, Vec<ObjectRef>>,
) -> BTreeMap<K, ObjectRef> {
    claims.sort_unstable_by(|(a, x), (b, y)| a.cmp(b).then_with(|| x.cmp(y)));
    // An address's first claim stays; the others go to `others`, in the list's order.
    claims.dedup_by(|(ip, obj), (held, _)| {
        let again = ip == held;
        if again {
            others.entry((*ip).into()).or_default().push((*obj).clone());
        }
        again
    });
    claims
        .into_iter()
        .map(|(ip, obj)| (ip, obj.clone()))
        .collect()
}

/// The addresses `pod` claims, without repeats: none unless it holds pod addresses.
fn claimed(pod: &PodInfo) -> Vec<IpAddr> {
    if !holds_pod_addresses(pod) {
        return Vec::new();
    }
    let mut ips: Vec<IpAddr> = pod_ips(pod).collect();
    ips.sort();
    ips.dedup();
    ips
}

impl AddressBook {
    /// Every pod of `state`. Built a family at a time from sorted lists rather than pod
    /// by pod (see [`holders_of`]), each list counted first and made to measure; at
    /// 150,000 pods the heap is ~4 MiB above the finished book at most while it is built
    /// (6 with lists grown by doubling).
    pub fn of(state: &ClusterState) -> Self {
        let holding = || {
            state
                .pods
                .iter()
                .filter(|(_, pod)| holds_pod_addresses(pod))
        };
        // The lists are made to measure (counted first): grown by doubling, a list is up
        // to twice its length, and at 150,000 pods one of these is 2.4 MiB long.
        let mut count = [0, 0];
        for (_, pod) in holding() {
            for ip in claimed(pod) {
                count[usize::from(ip.is_ipv6())] += 1;
            }
        }
        let mut others = BTreeMap::new();
        let mut v4 = Vec::with_capacity(count[0]);
        let mut v6 = Vec::with_capacity(count[1]);
        for (obj, pod) in holding() {
            for ip in claimed(pod) {
                match ip {
                    IpAddr::V4(ip) => v4.push((ip.octets(), obj)),
                    IpAddr::V6(ip) => v6.push((ip.octets(), obj)),
                }
            }
        }
        let holders = Holders {
            v4: holders_of(v4, &mut others),
            v6: holders_of(v6, &mut others),
        };
        let listing = || holding().filter(|(_, pod)| pod_ips(pod).next().is_some());
        let mut listed = Vec::with_capacity(listing().count());
        listed.extend(listing().map(|(obj, pod)| (obj.clone(), pod.clone())));
        let listed = listed.into_iter().collect();
        let mut book = AddressBook {
            listed,
            holders,
            others,
        };
        let contested: Vec<IpAddr> = book.others.keys().copied().collect();
        for ip in contested {
            book.choose_holder(state, ip);
        }
        book
    }

    /// The pod holding `ip`.
    pub fn holder(&self, ip: &IpAddr) -> Option<&ObjectRef> {
        self.holders.get(ip)
    }

    /// Brings the book up to date with `state` for the pods `changed` (added, updated
    /// or deleted since the book last saw `state`).
    pub fn update<'a>(
        &mut self,
        state: &ClusterState,
        changed: impl IntoIterator<Item = &'a ObjectRef>,
    ) {
        let mut touched = BTreeSet::new();
        for obj in changed {
            let pod = state.pods.get(obj);
            let now = pod.map(claimed).unwrap_or_default();
            let (name, before) = match self.listed.remove_entry(obj) {
                Some((name, before)) => (name, claimed(&before)),
                None => (obj.clone(), Vec::new()),
            };
            for ip in before.iter().filter(|ip| !now.contains(ip)) {
                self.withdraw(*ip, &name);
            }
            for ip in now.iter().filter(|ip| !before.contains(ip)) {
                self.claim(*ip, &name);
            }
            // A pod's phase or creation time may change which claim wins, even where
            // its addresses did not change.
            touched.extend(before);
            touched.extend(now.iter().copied());
            if let Some(pod) = pod.filter(|_| !now.is_empty()) {
                self.listed.insert(name, pod.clone());
            }
        }
        for ip in touched {
            self.choose_holder(state, ip);
        }
    }

    /// `name` lists `ip` (the holder is chosen again by the caller).
    fn claim(&mut self, ip: IpAddr, name: &ObjectRef) {
        if self.holders.get(&ip).is_some() {
            self.others.entry(ip).or_default().push(name.clone());
        } else {
            self.holders.insert(ip, name.clone());
        }
    }

    /// `name` no longer lists `ip` (the holder is chosen again by the caller).
    fn withdraw(&mut self, ip: IpAddr, name: &ObjectRef) {
        if let Entry::Occupied(mut others) = self.others.entry(ip) {
            let list = others.get_mut();
            if let Some(at) = list.iter().position(|other| other == name) {
                list.swap_remove(at);
            } else if let Some(promoted) = list.pop() {
                // The holder withdrew: another claimant stands in until chosen again.
                self.holders.insert(ip, promoted);
            }
            if others.get().is_empty() {
                others.remove();
            }
            return;
        }
        self.holders.remove(&ip);
    }

    /// Puts first, in `holders`, the claimant of `ip` that claims before the others.
    fn choose_holder(&mut self, state: &ClusterState, ip: IpAddr) {
        let Some(others) = self.others.get_mut(&ip) else {
            return;
        };
        let holder = self
            .holders
            .get_mut(&ip)
            .expect("an address with claimants has a holder");
        let pod = |name: &ObjectRef| state.pods.get(name);
        for other in others.iter_mut() {
            let better = match (pod(other), pod(holder)) {
                (Some(a), Some(b)) => claims_before((other, a), (holder, b)),
                (Some(_), None) => true,
                (None, _) => false,
            };
            if better {
                std::mem::swap(other, holder);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::Pod;
    use proptest::prelude::*;

    fn pod(ips: &[u8], phase: &str, created: u8, host_network: bool) -> Pod {
        let ips: Vec<String> = ips.iter().map(|i| format!("10.0.0.{i}")).collect();
        serde_json::from_value(serde_json::json!({
            "metadata": {"creationTimestamp": format!("2026-01-01T00:00:{:02}Z", created % 60)},
            "spec": {"hostNetwork": host_network, "containers": []},
            "status": {
                "phase": phase,
                "podIP": ips.first(),
                "podIPs": ips.iter().map(|ip| serde_json::json!({"ip": ip})).collect::<Vec<_>>(),
            },
        }))
        .unwrap()
    }

    /// One change: pod `name` set to these addresses, phase, creation time and host
    /// network, or deleted.
    type PodChange = (u8, Option<(Vec<u8>, u8, u8, bool)>);

    fn change() -> impl Strategy<Value = PodChange> {
        (
            0u8..8,
            prop::option::weighted(
                0.8,
                (
                    prop::collection::vec(0u8..6, 0..3),
                    0u8..3,
                    0u8..4,
                    prop::bool::weighted(0.1),
                ),
            ),
        )
    }

    fn holders(book: &AddressBook) -> BTreeMap<IpAddr, ObjectRef> {
        book.holders.all()
    }

    proptest! {
        /// The book kept up to date change by change names the holders the compile
        /// chooses from the whole state.
        #[test]
        fn an_updated_book_names_the_holders_the_compile_chooses(
            changes in prop::collection::vec(change(), 1..40),
        ) {
            let mut state = ClusterState::default();
            let mut book = AddressBook::of(&state);
            for (name, pod_now) in changes {
                let obj = ObjectRef::new(["x", "y"][usize::from(name % 2)], format!("p{name}"));
                match pod_now {
                    Some((ips, phase, created, host_network)) => {
                        let phase = ["Running", "Pending", "Succeeded"][usize::from(phase)];
                        state.pods.insert(obj.clone(), pod(&ips, phase, created, host_network).into());
                    }
                    None => {
                        state.pods.remove(&obj);
                    }
                }
                book.update(&state, [&obj]);
                let expected: BTreeMap<IpAddr, ObjectRef> =
                    netpol_compile::state::address_owners(&state)
                        .into_iter()
                        .map(|(ip, obj)| (ip, obj.clone()))
                        .collect();
                prop_assert_eq!(holders(&book), expected.clone());
                // The book made whole has the same holders, pods and other claimants.
                let whole = AddressBook::of(&state);
                prop_assert_eq!(holders(&whole), expected);
                prop_assert!(whole.listed.keys().eq(book.listed.keys()));
                let others = |book: &AddressBook| -> BTreeMap<IpAddr, BTreeSet<ObjectRef>> {
                    let sets = book.others.iter().map(|(ip, o)| (*ip, o.iter().cloned().collect()));
                    sets.collect()
                };
                prop_assert_eq!(others(&whole), others(&book));
                // Each claim is in the book once: as the holder or as another claimant.
                let claims: usize = book.listed.values().map(|pod| claimed(pod).len()).sum();
                let kept = book.holders.len() + book.others.values().map(Vec::len).sum::<usize>();
                prop_assert_eq!(kept, claims);
                prop_assert!(book.others.values().all(|others| !others.is_empty()));
            }
            prop_assert_eq!(holders(&book), holders(&AddressBook::of(&state)));
        }
    }
}
