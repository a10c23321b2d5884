//! Step 5's POLICY map, kept from one compile to the next.
//!
//! The map's entries have two kinds of owners. An endpoint's NetworkPolicy entries
//! depend on its number and on its [`EndpointInputs`]: the NetworkPolicies that select
//! it by direction (the shared parsed values, whose rules keep their ids while they
//! exist), the ports it declares (ingress named ports resolve on it) and its view of the
//! identities: for each peer of those rules the identities it matches, for each egress
//! named port how each identity resolves it. A tier group's entries (the endpoints the
//! same ClusterNetworkPolicies of a tier select share them) depend on its number and on
//! its [`GroupInputs`]: its key, those policies, and its view of the identities through
//! them (every identity where a rule applies to every peer). An owner whose inputs did
//! not change keeps its entries, and a compile in which no owner's entries changed hands
//! out the previous map itself (the same [`KeptMap`] version, shared, not copied): a
//! change elsewhere in the cluster, or one that moves no identity an owner's rules see,
//! costs no POLICY work; one that does makes a version naming the keys whose entries
//! changed.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::Arc;

use netpol_common::{PolicyKey, PolicyValue};

use super::tiers::ClusterPolicy;
use crate::cache::PeerSlots;
use crate::identity::TierGroupKey;
use crate::kept_map::differences;
use crate::lpm::Lpm;
use crate::policy::{ParsedPolicy, Peer, PortMatch, PortSpec};
use crate::state::DeclaredPort;
use crate::{Direction, KeptMap};

/// POLICY's contents.
pub(crate) type PolicyMap = BTreeMap<Lpm<PolicyKey>, PolicyValue>;

/// What an endpoint's NetworkPolicy entries are made from, besides its number.
pub(super) struct EndpointInputs {
    /// The NetworkPolicies selecting it, by direction, in order.
    pub(super) policies: [Vec<Arc<ParsedPolicy>>; 2],
    pub(super) ports: Arc<[DeclaredPort]>,
    /// Its view of the identities through its NetworkPolicies ([`View`]).
    pub(super) view: Vec<u32>,
}

impl PartialEq for EndpointInputs {
    fn eq(&self, other: &Self) -> bool {
        use super::same_shared as same;
        same(&self.policies[0], &other.policies[0])
            && same(&self.policies[1], &other.policies[1])
            && (Arc::ptr_eq(&self.ports, &other.ports) || self.ports == other.ports)
            && self.view == other.view
    }
}

/// What a tier group's entries are made from, besides its number: its key, the
/// ClusterNetworkPolicies it names (the shared parsed values) and its view of the
/// identities through them.
pub(super) struct GroupInputs {
    pub(super) key: TierGroupKey,
    pub(super) cluster: Vec<Arc<ClusterPolicy>>,
    pub(super) view: Vec<u32>,
}

impl PartialEq for GroupInputs {
    fn eq(&self, other: &Self) -> bool {
        super::same_shared(&self.cluster, &other.cluster)
            && self.key == other.key
            && self.view == other.view
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

/// An owner's entries, sorted by key.
type Entries = Box<[(Lpm<PolicyKey>, PolicyValue)]>;

/// The entries of one owner (an endpoint, or a tier group) and what they were made from.
struct Kept<I> {
    inputs: I,
    entries: Entries,
    /// Their kind flags ([`crate::policy_maps::kind`]).
    kinds: u32,
}

/// The POLICY map of the last compile, with what each owner's entries were made from:
/// an endpoint's NetworkPolicy entries, a tier group's entries. Kept in the compiler's
/// memo.
#[derive(Default)]
pub(crate) struct KeptPolicy {
    endpoints: HashMap<u32, Kept<EndpointInputs>>,
    groups: HashMap<u32, Kept<GroupInputs>>,
    map: KeptMap<Lpm<PolicyKey>, PolicyValue>,
}

/// One compile's entries of one kind of owner: those made again, and every live one.
struct Made<I> {
    fresh: Vec<(u32, Kept<I>)>,
    live: HashSet<u32>,
}

impl<I> Default for Made<I> {
    fn default() -> Self {
        Made {
            fresh: Vec::new(),
            live: HashSet::new(),
        }
    }
}

impl<I: PartialEq> Made<I> {
    /// The kind flags of owner `id` when `kept` holds its entries made from `inputs`.
    fn kept(&mut self, kept: &HashMap<u32, Kept<I>>, id: u32, inputs: &I) -> Option<u32> {
        self.live.insert(id);
        let kept = kept.get(&id)?;
        (kept.inputs == *inputs).then_some(kept.kinds)
    }

    fn replace(&mut self, id: u32, inputs: I, entries: Entries) -> u32 {
        debug_assert!(
            entries.windows(2).all(|w| w[0].0 < w[1].0),
            "sorted, each key once"
        );
        let kinds = entries
            .iter()
            .fold(0, |kinds, (key, _)| kinds | crate::policy_maps::kind(key));
        let made = Kept {
            inputs,
            entries,
            kinds,
        };
        self.fresh.push((id, made));
        kinds
    }

    /// Moves the entries made into `kept`, listing in `changes` those that differ from
    /// what `kept` had, and the entries of the owners gone.
    fn finish(
        self,
        kept: &mut HashMap<u32, Kept<I>>,
        changes: &mut Vec<(Lpm<PolicyKey>, Option<PolicyValue>)>,
    ) {
        let Made { fresh, live } = self;
        let gone: Vec<u32> = kept
            .keys()
            .filter(|id| !live.contains(id))
            .copied()
            .collect();
        for id in gone {
            let owner = kept.remove(&id).expect("listed above");
            changes.extend(owner.entries.iter().map(|&(key, _)| (key, None)));
        }
        for (id, made) in fresh {
            let had = kept.get(&id).map_or(&[][..], |e| &e.entries);
            differences(had.iter().copied(), made.entries.iter().copied(), changes);
            kept.insert(id, made);
        }
    }
}

/// One compile's changes to the kept map, applied by [`Update::finish`].
pub(super) struct Update<'k> {
    kept: &'k mut KeptPolicy,
    endpoints: Made<EndpointInputs>,
    groups: Made<GroupInputs>,
}

impl KeptPolicy {
    /// Starts a compile.
    pub(super) fn begin(&mut self) -> Update<'_> {
        Update {
            kept: self,
            endpoints: Made::default(),
            groups: Made::default(),
        }
    }
}

impl Update<'_> {
    /// The kind flags of endpoint `id`'s NetworkPolicy entries, made from `inputs`, when
    /// they are kept (the same inputs as last time); `None`: make them, and hand them to
    /// [`Update::replace_endpoint`].
    pub(super) fn kept_endpoint(&mut self, id: u32, inputs: &EndpointInputs) -> Option<u32> {
        self.endpoints.kept(&self.kept.endpoints, id, inputs)
    }

    /// The NetworkPolicy entries of endpoint `id` (named before by
    /// [`Update::kept_endpoint`]) made from `inputs`; returns their kind flags.
    pub(super) fn replace_endpoint(
        &mut self,
        id: u32,
        inputs: EndpointInputs,
        entries: PolicyMap,
    ) -> u32 {
        let entries: Entries = entries.into_iter().collect();
        self.endpoints.replace(id, inputs, entries)
    }

    /// [`Update::kept_endpoint`] for tier group `id`.
    pub(super) fn kept_group(&mut self, id: u32, inputs: &GroupInputs) -> Option<u32> {
        self.groups.kept(&self.kept.groups, id, inputs)
    }

    /// The entries of tier group `id` (named before by [`Update::kept_group`]) made from
    /// `inputs` (each key once, in any order, best in a few sorted runs); returns their
    /// kind flags.
    pub(super) fn replace_group(
        &mut self,
        id: u32,
        inputs: GroupInputs,
        mut entries: Vec<(Lpm<PolicyKey>, PolicyValue)>,
    ) -> u32 {
        // The stable sort merges sorted runs as it finds them: a tier's runs per
        // direction ([`super::tiers::TierEntries::emit`]) cost a merge, not a sort.
        entries.sort_by_key(|&(key, _)| key);
        self.groups.replace(id, inputs, entries.into())
    }

    /// The map of this compile: the last one itself when no owner's entries changed.
    /// Each owner made again is compared with what it had, so the map changes by the
    /// entries that differ: a new identity seen by every endpoint's rules adds its few
    /// entries per endpoint, not all of them again.
    pub(super) fn finish(self) -> KeptMap<Lpm<PolicyKey>, PolicyValue> {
        let Update {
            kept,
            endpoints,
            groups,
        } = self;
        let mut changes: Vec<(Lpm<PolicyKey>, Option<PolicyValue>)> = Vec::new();
        endpoints.finish(&mut kept.endpoints, &mut changes);
        groups.finish(&mut kept.groups, &mut changes);
        kept.map.change(changes);
        kept.map.clone()
    }
}
