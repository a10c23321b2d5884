//! Step 5's POLICY map, kept from one compile to the next.
//!
//! An endpoint's entries depend on its number and on its [`EndpointInputs`]: the
//! policies that select it (the NetworkPolicies by direction, the ClusterNetworkPolicies
//! whose subject it is: the shared parsed values, whose rules keep their ids while they
//! exist), the ports it declares (ingress named ports resolve on it) and its view of the
//! identities: for each peer of those rules the identities it matches, for each egress
//! named port how each identity resolves it, and every identity where a tier's rule
//! applies to every peer. An endpoint whose inputs did not change keeps its entries, and
//! a compile in which no endpoint's entries changed hands out the previous map itself
//! (the same [`KeptMap`] version, shared, not copied): a change elsewhere in the cluster,
//! or one that moves no identity an endpoint's rules see, costs no POLICY work; one that
//! does makes a version naming the keys whose entries changed.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::Arc;

use netpol_common::{PolicyKey, PolicyValue};

use super::tiers::ClusterPolicy;
use crate::cache::PeerSlots;
use crate::kept_map::differences;
use crate::lpm::Lpm;
use crate::policy::{ParsedPolicy, Peer, PortMatch, PortSpec};
use crate::state::DeclaredPort;
use crate::{Direction, KeptMap};

/// POLICY's contents.
pub(crate) type PolicyMap = BTreeMap<Lpm<PolicyKey>, PolicyValue>;

/// What an endpoint's entries are made from, besides its number.
pub(super) struct EndpointInputs {
    /// The NetworkPolicies selecting it, by direction, in order.
    pub(super) policies: [Vec<Arc<ParsedPolicy>>; 2],
    /// The ClusterNetworkPolicies whose subject it is, in order.
    pub(super) cluster: Vec<Arc<ClusterPolicy>>,
    pub(super) ports: Arc<[DeclaredPort]>,
    /// Its view of the identities ([`View`]) through its NetworkPolicies, and through
    /// its ClusterNetworkPolicies (shared by the endpoints that have the same ones).
    pub(super) view: Vec<u32>,
    pub(super) cluster_view: Arc<Vec<u32>>,
}

impl PartialEq for EndpointInputs {
    fn eq(&self, other: &Self) -> bool {
        use super::same_shared as same;
        same(&self.policies[0], &other.policies[0])
            && same(&self.policies[1], &other.policies[1])
            && same(&self.cluster, &other.cluster)
            && (Arc::ptr_eq(&self.ports, &other.ports) || self.ports == other.ports)
            && self.view == other.view
            && (Arc::ptr_eq(&self.cluster_view, &other.cluster_view)
                || self.cluster_view == other.cluster_view)
    }
}

/// What the identities of a compile look like to one endpoint's rules, written out as
/// numbers ([`EndpointInputs::view`]).
pub(super) struct View<'a> {
    pub(super) peers: &'a PeerSlots,
    /// Identities of the classes each peer slot matches.
    pub(super) peer_identities: &'a HashMap<usize, BTreeSet<u32>>,
    /// Egress named ports in force, and how each identity resolves them.
    pub(super) egress_named_ports: &'a [(&'a str, u8)],
    pub(super) named_by_identity: &'a [BTreeMap<u32, u16>],
    /// Every identity (for the tiers' rules of every peer).
    pub(super) identities: &'a [u32],
}

/// Marks in a view: where a list starts, and what stands for a rule of every peer.
const LIST: u32 = u32::MAX;
const EVERY_PEER: u32 = u32::MAX - 1;

impl View<'_> {
    /// Writes what the identities are to a rule with `peers` and `ports` in `direction`
    /// (`tier`: a ClusterNetworkPolicy's, whose rules of every peer list every identity).
    pub(super) fn rule(
        &self,
        out: &mut Vec<u32>,
        direction: Direction,
        peers: Option<&[Peer]>,
        ports: Option<&[PortSpec]>,
        tier: bool,
    ) {
        match peers {
            None if tier => {
                out.push(LIST);
                out.extend_from_slice(self.identities);
            }
            None => out.push(EVERY_PEER),
            Some(list) => {
                for peer in list {
                    out.push(LIST);
                    let slot = self.peers.get(peer);
                    out.extend(self.peer_identities.get(&slot).into_iter().flatten());
                }
            }
        }
        if direction == Direction::Egress {
            for spec in ports.into_iter().flatten() {
                if let PortMatch::Named(name) = &spec.port {
                    out.push(LIST);
                    let wanted = (name.as_str(), spec.protocol);
                    let at = self.egress_named_ports.iter().position(|&n| n == wanted);
                    for (&identity, &port) in
                        at.map(|i| &self.named_by_identity[i]).into_iter().flatten()
                    {
                        out.extend([identity, u32::from(port)]);
                    }
                }
            }
        }
    }
}

/// An endpoint's entries, sorted by key.
type Entries = Box<[(Lpm<PolicyKey>, PolicyValue)]>;

struct KeptEndpoint {
    inputs: EndpointInputs,
    /// Its entries in the map.
    entries: Entries,
    /// Its kind flags ([`crate::policy_maps::kind`]).
    kinds: u32,
}

/// The POLICY map of the last compile, with what each endpoint's entries were made
/// from. Kept in the compiler's memo.
#[derive(Default)]
pub(crate) struct KeptPolicy {
    endpoints: HashMap<u32, KeptEndpoint>,
    map: KeptMap<Lpm<PolicyKey>, PolicyValue>,
}

/// One compile's changes to the kept map, applied by [`Update::finish`].
pub(super) struct Update<'k> {
    kept: &'k mut KeptPolicy,
    /// Endpoints whose entries are made again, with them and their kind flags.
    fresh: Vec<(u32, EndpointInputs, Entries, u32)>,
    /// Every endpoint of this compile.
    live: HashSet<u32>,
}

impl KeptPolicy {
    /// Starts a compile.
    pub(super) fn begin(&mut self) -> Update<'_> {
        Update {
            kept: self,
            fresh: Vec::new(),
            live: HashSet::new(),
        }
    }
}

impl Update<'_> {
    /// The kind flags of endpoint `id`, whose inputs are `inputs`, when its entries are
    /// kept (the same inputs as last time); `None`: make them, and hand them to
    /// [`Update::replace`].
    pub(super) fn kept(&mut self, id: u32, inputs: &EndpointInputs) -> Option<u32> {
        self.live.insert(id);
        let kept = self.kept.endpoints.get(&id)?;
        (kept.inputs == *inputs).then_some(kept.kinds)
    }

    /// The entries of endpoint `id` (named before by [`Update::kept`]) made from
    /// `inputs`: its NetworkPolicy entries and its tiers' (whose keys are none of the
    /// others', in any order, best in a few sorted runs); returns their kind flags.
    pub(super) fn replace(
        &mut self,
        id: u32,
        inputs: EndpointInputs,
        entries: PolicyMap,
        tiers: Vec<(Lpm<PolicyKey>, PolicyValue)>,
    ) -> u32 {
        let mut all: Vec<_> = entries.into_iter().chain(tiers).collect();
        // The stable sort merges sorted runs as it finds them: the map's entries and the
        // tiers' runs ([`super::tiers::TierEntries::emit`]) cost a merge, not a sort
        // (it was a fifth of a compile after a ClusterNetworkPolicy was replaced).
        all.sort_by_key(|&(key, _)| key);
        debug_assert!(all.windows(2).all(|w| w[0].0 < w[1].0), "a key twice");
        let kinds = all
            .iter()
            .fold(0, |kinds, (key, _)| kinds | crate::policy_maps::kind(key));
        self.fresh.push((id, inputs, all.into(), kinds));
        kinds
    }

    /// The map of this compile: the last one itself when no endpoint's entries changed.
    /// Each endpoint made again is compared with what it had, so the map changes by the
    /// entries that differ: a new identity seen by every endpoint's rules adds its few
    /// entries per endpoint, not all of them again.
    pub(super) fn finish(self) -> KeptMap<Lpm<PolicyKey>, PolicyValue> {
        let Update { kept, fresh, live } = self;
        let gone: Vec<u32> = kept
            .endpoints
            .keys()
            .filter(|id| !live.contains(id))
            .copied()
            .collect();
        let mut changes: Vec<(Lpm<PolicyKey>, Option<PolicyValue>)> = Vec::new();
        for id in gone {
            let endpoint = kept.endpoints.remove(&id).expect("listed above");
            changes.extend(endpoint.entries.iter().map(|&(key, _)| (key, None)));
        }
        for (id, inputs, entries, kinds) in fresh {
            let had = kept.endpoints.get(&id).map_or(&[][..], |e| &e.entries);
            differences(had.iter().copied(), entries.iter().copied(), &mut changes);
            let endpoint = KeptEndpoint {
                inputs,
                entries,
                kinds,
            };
            kept.endpoints.insert(id, endpoint);
        }
        kept.map.change(changes);
        kept.map.clone()
    }
}
