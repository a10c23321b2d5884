//! Who holds each pod address, for naming the peers of flow records: the holder the
//! compile chooses ([`netpol_compile::state::address_owners`]), kept up to date with the
//! pods a snapshot changed, so that an apply costs O(changes) here, not O(pods).

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::sync::Arc;

use netpol_compile::state::{ClusterState, ObjectRef, claims_before, holds_pod_addresses, pod_ips};

/// Pod addresses and their holders. Each pod's name is kept once, shared by the three
/// indexes: at 150,000 pods the book is ~40 MiB, not the ~160 MiB of a name per entry.
#[derive(Debug, Default)]
pub struct AddressBook {
    /// The addresses each pod that holds pod addresses lists (without repeats).
    listed: BTreeMap<Arc<ObjectRef>, Box<[IpAddr]>>,
    /// (address, pod) for every address every such pod lists.
    claims: BTreeSet<(IpAddr, Arc<ObjectRef>)>,
    /// The pod holding each address: of its claimants, the one that claims before the
    /// others.
    holders: BTreeMap<IpAddr, Arc<ObjectRef>>,
}

impl AddressBook {
    /// Every pod of `state`.
    pub fn of(state: &ClusterState) -> Self {
        let mut book = AddressBook::default();
        book.update(state, state.pods.keys());
        book
    }

    /// The pod holding `ip`.
    pub fn holder(&self, ip: &IpAddr) -> Option<&ObjectRef> {
        self.holders.get(ip).map(|obj| &**obj)
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
            let now: Vec<IpAddr> = match state.pods.get(obj) {
                Some(pod) if holds_pod_addresses(pod) => {
                    let mut ips: Vec<IpAddr> = pod_ips(pod).collect();
                    ips.sort();
                    ips.dedup();
                    ips
                }
                _ => Vec::new(),
            };
            let (name, before) = match self.listed.remove_entry(obj) {
                Some((name, before)) => (name, before.into_vec()),
                None => (Arc::new(obj.clone()), Vec::new()),
            };
            for ip in before.iter().filter(|ip| !now.contains(ip)) {
                self.claims.remove(&(*ip, name.clone()));
            }
            for ip in now.iter().filter(|ip| !before.contains(ip)) {
                self.claims.insert((*ip, name.clone()));
            }
            // A pod's phase or creation time may change which claim wins, even where
            // its addresses did not change.
            touched.extend(before);
            touched.extend(now.iter().copied());
            if !now.is_empty() {
                self.listed.insert(name, now.into_boxed_slice());
            }
        }
        let first_name = Arc::new(ObjectRef::new("", ""));
        for ip in touched {
            let mut claimants = self
                .claims
                .range((ip, first_name.clone())..)
                .take_while(|(claimed, _)| *claimed == ip)
                .filter_map(|(_, name)| Some((name, state.pods.get(&**name)?)));
            let holder = claimants.next().map(|first| {
                claimants.fold(first, |held, claim| {
                    if claims_before((claim.0, claim.1), (held.0, held.1)) {
                        claim
                    } else {
                        held
                    }
                })
            });
            match holder {
                Some((name, _)) => {
                    self.holders.insert(ip, name.clone());
                }
                None => {
                    self.holders.remove(&ip);
                }
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
        book.holders
            .iter()
            .map(|(ip, obj)| (*ip, (**obj).clone()))
            .collect()
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
                prop_assert_eq!(holders(&book), expected);
            }
            prop_assert_eq!(holders(&book), holders(&AddressBook::of(&state)));
        }
    }
}
