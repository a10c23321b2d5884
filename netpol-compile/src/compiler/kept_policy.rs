//! Step 5's POLICY map, kept from one compile to the next.
//!
//! An endpoint's entries depend on its number, the policies that select it (the
//! NetworkPolicies by direction, the ClusterNetworkPolicies whose subject it is), the
//! ports it declares (ingress named ports resolve on it) and what the compile's
//! identities stand for (the identities of each peer, the egress named ports each
//! resolves, every identity for the tiers' rules of every peer). While the policies and
//! rules in force and the identities stay the same (the [`Context`]), an endpoint whose
//! own inputs did not change keeps its entries, and a compile in which no endpoint's
//! entries changed hands out the previous map itself (shared, not copied): a change of a
//! pod elsewhere in the cluster, or of one that moves no identity, costs no POLICY work.
//! Anything else in the context voids every kept entry.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;

use netpol_common::{PolicyKey, PolicyValue};

use crate::lpm::Lpm;
use crate::state::DeclaredPort;

/// POLICY's contents.
pub(crate) type PolicyMap = BTreeMap<Lpm<PolicyKey>, PolicyValue>;

/// What every endpoint's entries are made with, besides the endpoint's own inputs and
/// the rules in force.
#[derive(PartialEq)]
pub(super) struct Context {
    /// Identities of the classes each peer slot matches.
    pub(super) peer_identities: HashMap<usize, BTreeSet<u32>>,
    /// Egress named ports in force, and how each identity resolves them.
    pub(super) egress_named_ports: Vec<(String, u8)>,
    pub(super) named_by_identity: Vec<BTreeMap<u32, u16>>,
    /// Every identity number.
    pub(super) identities: Vec<u32>,
}

/// One endpoint's own inputs: indices in this compile's policies in force and
/// ClusterNetworkPolicies (stable while the rules are), and its declared ports.
pub(super) struct EndpointInputs {
    pub(super) selected_by: [Vec<usize>; 2],
    pub(super) cluster_selected: Vec<usize>,
    pub(super) ports: Arc<[DeclaredPort]>,
}

impl PartialEq for EndpointInputs {
    fn eq(&self, other: &Self) -> bool {
        self.selected_by == other.selected_by
            && self.cluster_selected == other.cluster_selected
            && (Arc::ptr_eq(&self.ports, &other.ports) || self.ports == other.ports)
    }
}

struct KeptEndpoint {
    inputs: EndpointInputs,
    /// Its keys in the map.
    keys: Box<[Lpm<PolicyKey>]>,
    /// Its kind flags ([`crate::policy_maps::kind`]).
    kinds: u32,
}

/// The POLICY map of the last compile, with what each endpoint's entries were made
/// from. Kept in the compiler's memo.
#[derive(Default)]
pub(crate) struct KeptPolicy {
    /// `None`: nothing is kept (no compile yet).
    context: Option<Context>,
    entries: KeptEntries,
}

#[derive(Default)]
struct KeptEntries {
    endpoints: HashMap<u32, KeptEndpoint>,
    map: Arc<PolicyMap>,
}

/// One compile's changes to the kept map, applied by [`Update::finish`].
pub(super) struct Update<'k> {
    kept: &'k mut KeptEntries,
    /// Endpoints whose entries are made again, with them and their kind flags.
    fresh: Vec<(u32, EndpointInputs, PolicyMap, u32)>,
    /// Every endpoint of this compile.
    live: Vec<u32>,
}

impl KeptPolicy {
    /// Starts a compile whose rules in force are those of the last compile
    /// (`same_rules`) or not, with `context`: what is kept holds only when both are the
    /// same as then. Returns the context in force and the update to make.
    pub(super) fn begin(&mut self, same_rules: bool, context: Context) -> (&Context, Update<'_>) {
        if !same_rules || self.context.as_ref() != Some(&context) {
            self.entries.endpoints.clear();
            self.entries.map = Arc::default();
            self.context = Some(context);
        }
        let update = Update {
            kept: &mut self.entries,
            fresh: Vec::new(),
            live: Vec::new(),
        };
        (self.context.as_ref().expect("set above"), update)
    }
}

impl Update<'_> {
    /// The kind flags of endpoint `id`, whose inputs are `inputs`, when its entries are
    /// kept (the same inputs as last time); `None`: make them, and hand them to
    /// [`Update::replace`].
    pub(super) fn kept(&mut self, id: u32, inputs: &EndpointInputs) -> Option<u32> {
        self.live.push(id);
        let kept = self.kept.endpoints.get(&id)?;
        (kept.inputs == *inputs).then_some(kept.kinds)
    }

    /// The entries of endpoint `id` (named before by [`Update::kept`]) made from
    /// `inputs`; returns their kind flags.
    pub(super) fn replace(&mut self, id: u32, inputs: EndpointInputs, entries: PolicyMap) -> u32 {
        let kinds = entries
            .keys()
            .fold(0, |kinds, key| kinds | crate::policy_maps::kind(key));
        self.fresh.push((id, inputs, entries, kinds));
        kinds
    }

    /// The map of this compile: the last one itself when no endpoint's entries changed.
    pub(super) fn finish(self) -> Arc<PolicyMap> {
        let Update { kept, fresh, live } = self;
        let live: BTreeSet<u32> = live.into_iter().collect();
        let gone: Vec<u32> = kept
            .endpoints
            .keys()
            .copied()
            .filter(|id| !live.contains(id))
            .collect();
        let has_keys = |id: &u32| kept.endpoints.get(id).is_some_and(|e| !e.keys.is_empty());
        let unchanged = gone.iter().all(|id| !has_keys(id))
            && fresh
                .iter()
                .all(|(id, _, entries, _)| entries.is_empty() && !has_keys(id));
        if unchanged {
            for id in &gone {
                kept.endpoints.remove(id);
            }
            for (id, inputs, _, kinds) in fresh {
                let keys = Box::default();
                kept.endpoints.insert(
                    id,
                    KeptEndpoint {
                        inputs,
                        keys,
                        kinds,
                    },
                );
            }
            return Arc::clone(&kept.map);
        }
        // Copied here only if the last result still holds it.
        let map = Arc::make_mut(&mut kept.map);
        let replaced = fresh.iter().map(|&(id, ..)| id);
        for id in gone.iter().copied().chain(replaced) {
            if let Some(old) = kept.endpoints.remove(&id) {
                for key in &old.keys {
                    map.remove(key);
                }
            }
        }
        for (id, inputs, entries, kinds) in fresh {
            let keys = entries.keys().copied().collect();
            map.extend(entries);
            kept.endpoints.insert(
                id,
                KeptEndpoint {
                    inputs,
                    keys,
                    kinds,
                },
            );
        }
        Arc::clone(&kept.map)
    }
}
