//! Peer identities and stable number allocation.
//!
//! An identity stands for a class of addresses that every peer in force treats alike.
//! Its [`IdentitySignature`] lists, in canonical text, the peers (selector pairs and
//! ipBlocks) that match the class and, for pods, how they resolve the named ports that
//! egress rules use.
//!
//! Numbers follow the addresses, not the signature: a class keeps the number most of its
//! addresses carried in the previous compile (see [`Allocations`]), so a policy that
//! comes into force and adds a peer matching whole classes renumbers nothing, and a pod
//! that moves between classes rewrites its own IPCACHE entries only.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use netpol_common::{Addr, IDENTITY_FIRST_DYNAMIC};

use super::lpm::Lpm;
use super::{Direction, RuleRef, RuleTable};
use crate::layered::Layered;
use crate::state::ObjectRef;

/// Dynamic identity number of every key of a dynamic identity (world keys are absent).
pub(crate) type Addresses = Layered<Lpm<Addr>, u32>;

/// The rules an allocation numbers.
pub(crate) enum Rules {
    /// The same rules as the previous allocations'.
    Same,
    /// Every rule in force.
    All(Vec<RuleRef>),
    /// The previous allocations' rules less those of `policies` (NetworkPolicies, and
    /// ClusterNetworkPolicies named with an empty namespace), plus `rules`: theirs now.
    Replaced {
        policies: BTreeSet<ObjectRef>,
        rules: Vec<RuleRef>,
    },
}

/// A rule table by rule and by id ([`Allocations::rules`], [`Allocations::rules_by_id`]).
type RuleTables = (Layered<RuleRef, u32>, RuleTable);

/// How a pod resolves a named port used by some egress rule.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct NamedPortResolution {
    pub name: String,
    pub protocol: u8,
    pub port: u16,
}

/// What a cluster admin's tier's entries of a local endpoint are made from, besides the
/// identities: the endpoints with the same key share one group of entries
/// ([`netpol_common::EndpointInfo::tier_groups`]), numbered by [`Allocations`].
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct TierGroupKey {
    /// [`netpol_common::TIER_ADMIN`] or [`netpol_common::TIER_BASELINE`].
    pub tier: u8,
    /// The ClusterNetworkPolicies of the tier whose subject the endpoints are, in the
    /// tier's order. By name: one replaced with the same subjects keeps the group, so its
    /// entries are written once for all of them and no endpoint moves.
    pub policies: Vec<String>,
    /// How the endpoints resolve the named ports those policies' ingress rules name.
    pub named_ports: Vec<NamedPortResolution>,
}

/// A tier group's number and its endpoints' ids (sorted).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TierGroup {
    pub number: u32,
    pub endpoints: Vec<u32>,
}

/// What an identity stands for. It keys the identity's number only when none of its
/// addresses had one (see [`Allocations`]).
///
/// The empty signature (no peer matches, no named port resolves) is
/// [`netpol_common::IDENTITY_WORLD`] and is never allocated.
#[derive(Clone, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct IdentitySignature {
    /// Canonical text of every peer in force that matches the class, sorted.
    pub peers: Vec<String>,
    /// Named ports resolved by the class's pods, sorted.
    pub named_ports: Vec<NamedPortResolution>,
}

impl IdentitySignature {
    pub fn is_world(&self) -> bool {
        self.peers.is_empty() && self.named_ports.is_empty()
    }
}

impl std::fmt::Display for IdentitySignature {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.is_world() {
            return f.write_str("matches no peer");
        }
        write!(f, "matches [{}]", self.peers.join("; "))?;
        if !self.named_ports.is_empty() {
            let ports: Vec<String> = self
                .named_ports
                .iter()
                .map(|n| format!("{}/{}={}", n.name, super::protocol_name(n.protocol), n.port))
                .collect();
            write!(f, ", named ports [{}]", ports.join(", "))?;
        }
        Ok(())
    }
}

/// Numbers handed out by the previous compile; a [`super::Compiler`] keeps them (or pass
/// [`super::Compiled::allocations`] back into the next [`super::compile`]) so ids stay
/// stable.
///
/// - Endpoint ids (from 1) are keyed by pod and rule ids (from 0) by [`RuleRef`]: kept
///   while the key exists, the lowest free number for a new key.
/// - Tier groups (from 1) are keyed by [`TierGroupKey`]: kept while the key exists; a
///   new key takes the number of a group whose key is gone and all of whose endpoints
///   it holds now (a ClusterNetworkPolicy of every pod replaced), else the lowest
///   number that no group held before or holds now. So no endpoint that still names a
///   group while the kernel's maps are brought over meets entries that were never its
///   own or its new ones.
/// - Identity numbers (from [`IDENTITY_FIRST_DYNAMIC`]) follow the IPCACHE keys: a class
///   of addresses takes the number most of its keys had (largest overlap first), else the
///   number its signature had, else the lowest free one.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Allocations {
    endpoints: BTreeMap<ObjectRef, u32>,
    /// Tier groups, numbered ([`Allocations::number_tier_groups`]).
    tier_groups: BTreeMap<TierGroupKey, TierGroup>,
    /// Signature of every dynamic identity in force → its number.
    identities: BTreeMap<IdentitySignature, u32>,
    /// Dynamic identity of every IPCACHE key (world keys are absent): shared with the
    /// next allocations while no key's number changes, patched when some do (150,000
    /// pods have some 190,000 keys, copied at every compile before).
    addresses: Addresses,
    /// Rule ids (`PolicyValue::rule`, the RULE_COUNTERS index), from 0, and the same by
    /// id: shared with the next allocations while the rules stay the same (15,000 policies
    /// have some 30,000 rules, whose names would be copied at every compile).
    rules: Layered<RuleRef, u32>,
    rules_by_id: RuleTable,
}

impl Allocations {
    /// Endpoint id of a local pod.
    pub fn endpoint_id(&self, pod: &ObjectRef) -> Option<u32> {
        self.endpoints.get(pod).copied()
    }

    /// Number of a tier group.
    pub fn tier_group(&self, key: &TierGroupKey) -> Option<u32> {
        self.tier_groups.get(key).map(|group| group.number)
    }

    pub fn tier_groups(&self) -> &BTreeMap<TierGroupKey, TierGroup> {
        &self.tier_groups
    }

    /// Numbers the tier groups `wanted` (each with its endpoints' ids; see
    /// [`Allocations`]), letting go of the others. Called on allocations whose endpoints
    /// are this compile's.
    pub(crate) fn number_tier_groups(&mut self, wanted: BTreeMap<TierGroupKey, Vec<u32>>) {
        let before = std::mem::take(&mut self.tier_groups);
        let live: BTreeSet<u32> = self.endpoints.values().copied().collect();
        // The key each endpoint is in now, per tier.
        let mut key_of: BTreeMap<(u8, u32), &TierGroupKey> = BTreeMap::new();
        for (key, endpoints) in &wanted {
            key_of.extend(endpoints.iter().map(|&id| ((key.tier, id), key)));
        }
        // A key there was keeps its number: its entries are what they were.
        let mut numbers: BTreeMap<&TierGroupKey, u32> = wanted
            .keys()
            .filter_map(|key| Some((key, before.get(key)?.number)))
            .collect();
        // A group whose key is gone passes its number on to the key that every one of its
        // endpoints still here is in, if there is one: they see their entries change in
        // place, as their own did before groups (the largest group first, then the lower
        // number). A group that splits passes it on to none: its endpoints that move
        // would meet the other part's entries before their own move.
        let mut heirs: Vec<(usize, u32, &TierGroupKey)> = Vec::new();
        for (old, group) in &before {
            if wanted.contains_key(old) {
                continue;
            }
            let mut keys = group
                .endpoints
                .iter()
                .filter(|id| live.contains(id))
                .map(|&id| key_of.get(&(old.tier, id)).copied());
            let Some(Some(heir)) = keys.next() else {
                continue;
            };
            if keys.all(|key| key == Some(heir)) {
                heirs.push((group.endpoints.len(), group.number, heir));
            }
        }
        heirs.sort_unstable_by_key(|&(size, number, _)| (std::cmp::Reverse(size), number));
        for (_, number, heir) in heirs {
            numbers.entry(heir).or_insert(number);
        }
        // The others: the lowest numbers that no group held before or holds now.
        let mut held: Vec<u32> = before
            .values()
            .map(|group| group.number)
            .chain(numbers.values().copied())
            .collect();
        held.sort_unstable();
        held.dedup();
        let mut free = free_numbers(held, 1);
        let numbered: Vec<(TierGroupKey, u32)> = wanted
            .keys()
            .map(|key| {
                let number = numbers.get(key).copied();
                let number = number.unwrap_or_else(|| free.next().expect("u32 ids exhausted"));
                (key.clone(), number)
            })
            .collect();
        self.tier_groups = numbered
            .into_iter()
            .zip(wanted.into_values())
            .map(|((key, number), endpoints)| (key, TierGroup { number, endpoints }))
            .collect();
    }

    /// Identity number of a signature.
    pub fn identity(&self, signature: &IdentitySignature) -> Option<u32> {
        self.identities.get(signature).copied()
    }

    /// Id of a rule of a valid policy (`PolicyValue::rule`).
    pub fn rule_id(&self, rule: &RuleRef) -> Option<u32> {
        self.rules.get(rule).copied()
    }

    pub fn endpoints(&self) -> &BTreeMap<ObjectRef, u32> {
        &self.endpoints
    }

    pub fn identities(&self) -> &BTreeMap<IdentitySignature, u32> {
        &self.identities
    }

    pub fn rules(&self) -> &Layered<RuleRef, u32> {
        &self.rules
    }

    /// [`Allocations::rules`] by id, shared (see [`crate::Compiled::rules`]).
    pub fn rules_by_id(&self) -> &RuleTable {
        &self.rules_by_id
    }

    /// [`Allocations::next_releasing`] of a copy of `self` (tests).
    #[cfg(test)]
    pub(crate) fn next<K: Iterator<Item = (Lpm<Addr>, usize)> + Clone>(
        &self,
        endpoints: impl IntoIterator<Item = ObjectRef>,
        classes: IdentityClasses<K>,
        rules: Rules,
    ) -> Allocations {
        Allocations::next_releasing(&mut Arc::new(self.clone()), endpoints, classes, rules)
    }

    /// Allocations for `endpoints`, the identity `classes` and `rules`: kept numbers for
    /// keys `this` knows, the lowest free ones for new keys (in key order); identity
    /// numbers by lineage (see [`Allocations`]). `this`'s numbers by key are let go (when
    /// nothing else holds them) once the identities' numbers are counted from them, before
    /// the new ones are listed: the two lists were held at once (4 MiB more at the peak of
    /// a renumbering at 150,000 pods).
    pub(crate) fn next_releasing<K>(
        this: &mut Arc<Allocations>,
        endpoints: impl IntoIterator<Item = ObjectRef>,
        classes: IdentityClasses<K>,
        rules: Rules,
    ) -> Allocations
    where
        K: Iterator<Item = (Lpm<Addr>, usize)> + Clone,
    {
        let numbers = this.identity_numbers(&classes);
        drop(Allocations::take_addresses(this));
        let addresses = Addresses::new(
            classes
                .keys
                .map(|(key, class)| (key, numbers[class]))
                .collect(),
        );
        let identities = classes.signatures.into_iter().zip(numbers).collect();
        this.with_identities(endpoints, (identities, addresses), rules)
    }

    /// The identities [`Allocations::next_releasing`] numbers for classes whose keys differ from
    /// those `self` numbered only by `changed` (sorted: each key with the index in
    /// `signatures` of its identity now, `None` when it has none, gone or the world's);
    /// `signatures` are the dynamic identities' (distinct, sorted), `sizes` their key
    /// counts. An identity none of whose keys changed keeps its number, which no other
    /// can claim (its keys carried no other); the others compete by lineage as there.
    /// `None` when one whose keys did not all change takes another number (its unchanged
    /// keys would change too: the caller numbers every key). The allocations are then
    /// [`Allocations::with_identities`]. The numbers by key are patched in place when
    /// nothing else holds `this` (`this` is then left without them): written whole, they
    /// were a second list of every key beside the first (8 MiB at the peak of a change
    /// at 150,000 pods).
    pub(crate) fn patched(
        this: &mut Arc<Allocations>,
        signatures: Vec<IdentitySignature>,
        sizes: &[usize],
        changed: &[(Lpm<Addr>, Option<usize>)],
    ) -> Option<Identities> {
        let prev: &Allocations = this;
        debug_assert!(changed.is_sorted_by_key(|&(key, _)| key));
        let previous: Vec<Option<u32>> = signatures
            .iter()
            .map(|s| prev.identities.get(s).copied())
            .collect();
        let number_before = |key: &Lpm<Addr>| prev.addresses.get(key).copied();
        // How many keys of each identity carried each number, for those some changed key
        // left or joined; the others' keys all carried their number.
        let mut overlap: Vec<Vec<(u32, usize)>> = vec![Vec::new(); signatures.len()];
        let mut joined = vec![0usize; signatures.len()];
        let mut left = BTreeSet::new();
        for &(key, now) in changed {
            let before = number_before(&key);
            left.extend(before);
            if let Some(i) = now {
                joined[i] += 1;
                if let Some(number) = before {
                    count(&mut overlap[i], number, 1);
                }
            }
        }
        let mut out: Vec<Option<u32>> = vec![None; signatures.len()];
        let mut used = BTreeSet::new();
        let mut candidates: Vec<(usize, u32, usize)> = Vec::new();
        for (i, counts) in overlap.iter_mut().enumerate() {
            let stayed = sizes[i].checked_sub(joined[i])?;
            let affected = joined[i] > 0 || previous[i].is_some_and(|n| left.contains(&n));
            if stayed > 0 {
                count(counts, previous[i]?, stayed);
            }
            if !affected {
                out[i] = previous[i];
                used.insert(previous[i]?);
                continue;
            }
            candidates.extend(counts.iter().map(|&(number, n)| (n, number, i)));
        }
        contest(candidates, &mut out, &mut used);
        let numbers = prev.fill_numbers(&signatures, out, used);
        // An identity that kept keys keeps its number, or every key of it changes.
        let renumbered =
            (0..signatures.len()).any(|i| sizes[i] > joined[i] && previous[i] != Some(numbers[i]));
        if renumbered {
            return None;
        }
        let identities = signatures
            .into_iter()
            .zip(&numbers)
            .map(|(s, &n)| (s, n))
            .collect();
        let unmoved = |&(key, now): &(Lpm<Addr>, Option<usize>)| {
            number_before(&key) == now.map(|i: usize| numbers[i])
        };
        if changed.iter().all(unmoved) {
            return Some((identities, prev.addresses.clone()));
        }
        let changes = changed
            .iter()
            .map(|&(key, now)| (key, now.map(|i| numbers[i])));
        let mut addresses =
            Allocations::take_addresses(this).unwrap_or_else(|| this.addresses.clone());
        addresses.patch(changes);
        Some((identities, addresses))
    }

    /// `this`'s numbers by key, taken out of it (which is left without them) when nothing
    /// else holds it; `None` when something does.
    fn take_addresses(this: &mut Arc<Allocations>) -> Option<Addresses> {
        Arc::get_mut(this).map(|own| std::mem::take(&mut own.addresses))
    }

    /// The allocations with `identities` (numbers by signature, and by key), and
    /// endpoint and rule numbers for `endpoints` and `rules` (see
    /// [`Allocations::next_releasing`]).
    pub(crate) fn with_identities(
        &self,
        endpoints: impl IntoIterator<Item = ObjectRef>,
        (identities, addresses): Identities,
        rules: Rules,
    ) -> Allocations {
        let (rules, rules_by_id) = self.numbered_rules(rules);
        Allocations {
            endpoints: allocate(
                &self.endpoints,
                sorted(endpoints),
                netpol_common::ENDPOINT_ID_FIRST,
            )
            .into_iter()
            .collect(),
            tier_groups: self.tier_groups.clone(),
            identities,
            addresses,
            rules,
            rules_by_id,
        }
    }

    /// The rule table for `rules`, by rule and by id: `self`'s own (shared) when the rules
    /// are the same.
    fn numbered_rules(&self, rules: Rules) -> RuleTables {
        let same = || (self.rules.clone(), self.rules_by_id.clone());
        match rules {
            Rules::Same => same(),
            Rules::All(rules) => {
                let rules = sorted(rules);
                if rules.len() == self.rules.len() && rules.iter().eq(self.rules.keys()) {
                    return same();
                }
                let ids = allocate(self.rules.iter(), rules, 0);
                let by_id = ids.iter().map(|(rule, id)| (*id, rule.clone())).collect();
                (Layered::new(ids), by_id)
            }
            Rules::Replaced { policies, rules } => {
                if policies.is_empty() {
                    return same();
                }
                self.replaced_rules(&policies, sorted(rules))
            }
        }
    }

    /// `self`'s rule table less the rules of `policies`, plus `rules` (sorted, theirs
    /// now), numbered as [`allocate`] numbers the whole list: a rule `self` has keeps its
    /// number, a new one takes the lowest free number (in rule order). Costs the rules of
    /// `policies` and a pass over the ids when some rule is new, not a copy of the table.
    fn replaced_rules(&self, policies: &BTreeSet<ObjectRef>, rules: Vec<RuleRef>) -> RuleTables {
        // The rules of `policies` in the table, with their ids.
        let mut freed: BTreeMap<RuleRef, u32> = BTreeMap::new();
        for policy in policies {
            // The first rule of `policy` in rule order (fields compared in order).
            let first = Direction::BOTH
                .map(|direction| RuleRef {
                    policy: policy.clone(),
                    direction,
                    index: 0,
                    cluster: None,
                })
                .into_iter()
                .min()
                .expect("two directions");
            let theirs = self.rules.iter_from(&first);
            let theirs = theirs.take_while(|(rule, _)| rule.policy == *policy);
            freed.extend(theirs.map(|(rule, &id)| (rule.clone(), id)));
        }
        // A rule of theirs now that the table has keeps its id; the others are new.
        let mut fresh = Vec::new();
        for rule in rules {
            if freed.remove(&rule).is_none() && self.rules.get(&rule).is_none() {
                fresh.push(rule);
            }
        }
        let gone: BTreeSet<u32> = freed.values().copied().collect();
        let mut by_rule: Vec<(RuleRef, Option<u32>)> =
            freed.into_keys().map(|rule| (rule, None)).collect();
        let mut by_id: Vec<(u32, Option<RuleRef>)> = gone.iter().map(|&id| (id, None)).collect();
        if !fresh.is_empty() {
            // The lowest numbers no rule holds, one per new rule, in rule order.
            let held = self.rules_by_id.iter().map(|(&id, _)| id);
            let free: Vec<u32> = free_numbers(held.filter(|id| !gone.contains(id)), 0)
                .take(fresh.len())
                .collect();
            assert_eq!(free.len(), fresh.len(), "u32 ids exhausted");
            for (rule, id) in fresh.into_iter().zip(free) {
                by_id.push((id, Some(rule.clone())));
                by_rule.push((rule, Some(id)));
            }
        }
        (self.rules.patched(by_rule), self.rules_by_id.patched(by_id))
    }

    /// A number for each class, by lineage (see [`Allocations`]). Deterministic: ties go
    /// to the lower number, then to the class listed first.
    fn identity_numbers<K>(&self, classes: &IdentityClasses<K>) -> Vec<u32>
    where
        K: Iterator<Item = (Lpm<Addr>, usize)> + Clone,
    {
        // How many keys of each class carried each previous number (both lists sorted).
        // A class's keys carried few numbers (most often one): a short list per class.
        let mut overlap: Vec<Vec<(u32, usize)>> = vec![Vec::new(); classes.signatures.len()];
        let mut previous = self.addresses.iter().peekable();
        for (key, class) in classes.keys.clone() {
            while previous.next_if(|(k, _)| **k < key).is_some() {}
            if let Some((_, &number)) = previous.next_if(|(k, _)| **k == key) {
                count(&mut overlap[class], number, 1);
            }
        }
        let candidates: Vec<(usize, u32, usize)> = overlap
            .into_iter()
            .enumerate()
            .flat_map(|(class, counts)| {
                counts
                    .into_iter()
                    .map(move |(number, n)| (n, number, class))
            })
            .collect();
        let mut out: Vec<Option<u32>> = vec![None; classes.signatures.len()];
        let mut used = BTreeSet::new();
        contest(candidates, &mut out, &mut used);
        self.fill_numbers(&classes.signatures, out, used)
    }

    /// `out` (numbers by lineage, `used` those taken) with a number for every identity:
    /// when none came by lineage, the number of the same signature if still free, else
    /// the lowest free one, in signature order.
    fn fill_numbers(
        &self,
        signatures: &[IdentitySignature],
        mut out: Vec<Option<u32>>,
        mut used: BTreeSet<u32>,
    ) -> Vec<u32> {
        for (class, signature) in signatures.iter().enumerate() {
            if out[class].is_none()
                && let Some(&number) = self.identities.get(signature)
                && used.insert(number)
            {
                out[class] = Some(number);
            }
        }
        let mut candidate = IDENTITY_FIRST_DYNAMIC;
        out.into_iter()
            .map(|number| {
                number.unwrap_or_else(|| {
                    while used.contains(&candidate) {
                        candidate = candidate.checked_add(1).expect("u32 ids exhausted");
                    }
                    used.insert(candidate);
                    candidate
                })
            })
            .collect()
    }
}

/// Identity numbers by signature, and of every key of a dynamic identity (sorted).
pub(crate) type Identities = (BTreeMap<IdentitySignature, u32>, Addresses);

/// The lineage contest: `candidates` (keys that carried the number, number, identity)
/// taken largest overlap first, then lower number, then identity listed first; an
/// identity without a number in `out` takes the candidate's unless `used` holds it.
fn contest(
    mut candidates: Vec<(usize, u32, usize)>,
    out: &mut [Option<u32>],
    used: &mut BTreeSet<u32>,
) {
    candidates.sort_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)).then(a.2.cmp(&b.2)));
    for (_, number, i) in candidates {
        if out[i].is_none() && !used.contains(&number) {
            out[i] = Some(number);
            used.insert(number);
        }
    }
}

/// Adds `n` to the count of `number` in `counts`.
fn count(counts: &mut Vec<(u32, usize)>, number: u32, n: usize) {
    match counts.iter_mut().find(|(known, _)| *known == number) {
        Some((_, count)) => *count += n,
        None => counts.push((number, n)),
    }
}

/// The identity classes of one compile.
pub(crate) struct IdentityClasses<K> {
    /// One per dynamic identity: distinct, sorted, never the world's.
    pub signatures: Vec<IdentitySignature>,
    /// Every IPCACHE key of a dynamic identity, sorted, with its index in `signatures`:
    /// walked twice, never copied (at 150,000 pods a list of them was 6 MiB more at the
    /// peak of a compile that numbers every key).
    pub keys: K,
}

/// `keys`, sorted and without duplicates.
fn sorted<K: Ord>(keys: impl IntoIterator<Item = K>) -> Vec<K> {
    let mut keys: Vec<K> = keys.into_iter().collect();
    if !keys.is_sorted() {
        keys.sort();
    }
    keys.dedup();
    keys
}

/// Numbers for `wanted` ([`sorted`]): those in `prev` keep theirs, the others take the
/// lowest numbers `>= first` not in use, in key order.
fn allocate<'p, K: Ord + 'p>(
    prev: impl IntoIterator<Item = (&'p K, &'p u32)>,
    wanted: Vec<K>,
    first: u32,
) -> Vec<(K, u32)> {
    debug_assert!(wanted.is_sorted() && wanted.windows(2).all(|w| w[0] != w[1]));
    // Kept numbers: both lists are sorted, so one merge finds them.
    let mut previous = prev.into_iter().peekable();
    let mut numbers: Vec<Option<u32>> = Vec::with_capacity(wanted.len());
    for key in &wanted {
        while previous.next_if(|(k, _)| *k < key).is_some() {}
        numbers.push(previous.next_if(|(k, _)| *k == key).map(|(_, &n)| n));
    }
    let mut used: Vec<u32> = numbers.iter().flatten().copied().collect();
    used.sort_unstable();
    let mut free = free_numbers(used, first);
    let mut next_free = || free.next().expect("u32 ids exhausted");
    let numbers: Vec<u32> = numbers
        .into_iter()
        .map(|n| n.unwrap_or_else(&mut next_free))
        .collect();
    wanted.into_iter().zip(numbers).collect()
}

/// The numbers `>= first` that `used` (sorted) does not hold, lowest first.
fn free_numbers(used: impl IntoIterator<Item = u32>, first: u32) -> impl Iterator<Item = u32> {
    let mut used = used.into_iter().peekable();
    let mut candidate = Some(first);
    std::iter::from_fn(move || {
        loop {
            let n = candidate?;
            candidate = n.checked_add(1);
            while used.next_if(|&u| u < n).is_some() {}
            if used.next_if_eq(&n).is_none() {
                return Some(n);
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Classes from (signature, keys), as the compiler lists them.
    fn classes(
        list: Vec<(IdentitySignature, Vec<Lpm<Addr>>)>,
    ) -> IdentityClasses<std::vec::IntoIter<(Lpm<Addr>, usize)>> {
        let mut signatures = Vec::new();
        let mut keys = Vec::new();
        for (i, (signature, listed)) in list.into_iter().enumerate() {
            signatures.push(signature);
            keys.extend(listed.into_iter().map(|k| (k, i)));
        }
        keys.sort();
        IdentityClasses {
            signatures,
            keys: keys.into_iter(),
        }
    }

    fn sig(peers: &[&str]) -> IdentitySignature {
        IdentitySignature {
            peers: peers.iter().map(|s| s.to_string()).collect(),
            named_ports: vec![],
        }
    }

    #[test]
    fn replacing_some_policies_rules_numbers_them_as_listing_every_rule_does() {
        let rule = |policy: &str, direction, index| {
            RuleRef::network_policy(ObjectRef::new("x", policy), direction, index)
        };
        let (i, e) = (Direction::Ingress, Direction::Egress);
        let with_rules = |rules: Vec<RuleRef>| {
            Allocations::default().with_identities([], Identities::default(), Rules::All(rules))
        };
        let before = with_rules(vec![
            rule("a", i, 0),
            rule("b", i, 0),
            rule("b", i, 1),
            rule("b", e, 0),
            rule("c", i, 0),
        ]);
        // b loses a rule and gains another, c goes, d comes: the numbers freed by b's
        // lost rule and by c go to the new rules in rule order, b's kept rules keep theirs.
        let now = vec![
            rule("a", i, 0),
            rule("b", i, 0),
            rule("b", e, 0),
            rule("b", e, 1),
            rule("d", i, 0),
        ];
        let listed = before.with_identities([], Identities::default(), Rules::All(now.clone()));
        let replaced = before.with_identities(
            [],
            Identities::default(),
            Rules::Replaced {
                policies: ["b", "c", "d"].map(|p| ObjectRef::new("x", p)).into(),
                rules: now.into_iter().filter(|r| r.policy.name != "a").collect(),
            },
        );
        assert_eq!(replaced, listed);
        let id = |r: &RuleRef| replaced.rule_id(r);
        assert_eq!(id(&rule("b", e, 0)), before.rule_id(&rule("b", e, 0)));
        assert_eq!(id(&rule("b", e, 1)), Some(2));
        assert_eq!(id(&rule("d", i, 0)), Some(4));
        assert_eq!(replaced.rules_by_id().len(), 5);
    }

    #[test]
    fn allocate_keeps_ids_and_fills_gaps() {
        let map = |list: Vec<(&'static str, u32)>| list.into_iter().collect::<BTreeMap<_, _>>();
        let first = map(allocate(&BTreeMap::new(), sorted(["a", "b", "c"]), 1));
        assert_eq!(first, BTreeMap::from([("a", 1), ("b", 2), ("c", 3)]));
        // "b" disappears, "d" and "e" appear: "d" takes the freed 2, "e" the next free 4.
        let second = map(allocate(&first, sorted(["a", "c", "d", "e"]), 1));
        assert_eq!(
            second,
            BTreeMap::from([("a", 1), ("c", 3), ("d", 2), ("e", 4)])
        );
        // "b" comes back: it is a new key now and takes the lowest free number.
        let third = map(allocate(&second, sorted(["a", "b", "c", "d", "e"]), 1));
        assert_eq!(third["b"], 5);
    }

    #[test]
    fn identities_start_at_first_dynamic() {
        let a = Allocations::default().next(
            [ObjectRef::new("x", "a")],
            classes(vec![(sig(&["p1"]), vec![]), (sig(&["p2"]), vec![])]),
            Rules::All(Vec::new()),
        );
        assert_eq!(a.endpoint_id(&ObjectRef::new("x", "a")), Some(1));
        assert_eq!(a.identity(&sig(&["p1"])), Some(IDENTITY_FIRST_DYNAMIC));
        assert_eq!(a.identity(&sig(&["p2"])), Some(IDENTITY_FIRST_DYNAMIC + 1));
        let b = a.next(
            [ObjectRef::new("x", "0"), ObjectRef::new("x", "a")],
            classes(vec![(sig(&["p0"]), vec![]), (sig(&["p2"]), vec![])]),
            Rules::All(Vec::new()),
        );
        assert_eq!(b.endpoint_id(&ObjectRef::new("x", "a")), Some(1));
        assert_eq!(b.endpoint_id(&ObjectRef::new("x", "0")), Some(2));
        assert_eq!(b.identity(&sig(&["p2"])), Some(IDENTITY_FIRST_DYNAMIC + 1));
        assert_eq!(b.identity(&sig(&["p0"])), Some(IDENTITY_FIRST_DYNAMIC));
        assert_eq!(b.identity(&sig(&["p1"])), None);
    }

    fn key(last: u8) -> Lpm<Addr> {
        super::super::host_key(std::net::IpAddr::from([10, 0, 0, last]))
    }

    #[test]
    fn allocations_nothing_else_holds_number_alike_and_let_their_old_numbers_go() {
        let first = Allocations::default().next(
            [],
            classes(vec![
                (sig(&["A"]), vec![key(1), key(2), key(3)]),
                (sig(&["B"]), vec![key(4)]),
            ]),
            Rules::All(Vec::new()),
        );
        let next = || {
            classes(vec![
                (sig(&["C"]), vec![key(1), key(2)]),
                (sig(&["B"]), vec![key(3), key(4)]),
            ])
        };
        let expected = first.next([], next(), Rules::All(Vec::new()));
        // Held elsewhere too: numbered the same, and left whole.
        let mut shared = Arc::new(first.clone());
        let other = Arc::clone(&shared);
        let numbered = Allocations::next_releasing(&mut shared, [], next(), Rules::All(Vec::new()));
        assert_eq!(numbered, expected);
        assert_eq!(*other, first);
        // Held by the caller alone: numbered the same, the old numbers by key let go.
        let mut own = Arc::new(first.clone());
        let numbered = Allocations::next_releasing(&mut own, [], next(), Rules::All(Vec::new()));
        assert_eq!(numbered, expected);
        assert!(own.addresses.is_empty());
        assert!(!first.addresses.is_empty());
    }

    #[test]
    fn identity_numbers_follow_the_addresses() {
        let d = IDENTITY_FIRST_DYNAMIC;
        let a = Allocations::default().next(
            [],
            classes(vec![
                (sig(&["A"]), vec![key(1), key(2), key(3)]),
                (sig(&["B"]), vec![key(4)]),
            ]),
            Rules::All(Vec::new()),
        );
        assert_eq!(a.identity(&sig(&["A"])), Some(d));
        assert_eq!(a.identity(&sig(&["B"])), Some(d + 1));
        // A peer matching 1, 2 and 4 comes into force: every signature changes. The
        // class {1, 2} keeps A's number (most of its keys had it), {3} takes the lowest
        // free one, {4} keeps B's.
        let b = a.next(
            [],
            classes(vec![
                (sig(&["A"]), vec![key(3)]),
                (sig(&["A", "C"]), vec![key(1), key(2)]),
                (sig(&["B", "C"]), vec![key(4)]),
            ]),
            Rules::All(Vec::new()),
        );
        assert_eq!(b.identity(&sig(&["A", "C"])), Some(d));
        assert_eq!(b.identity(&sig(&["B", "C"])), Some(d + 1));
        assert_eq!(b.identity(&sig(&["A"])), Some(d + 2));
        // Two classes claim number d with equal overlap: the one listed first wins. A class
        // without overlap takes its signature's number if free ({8} takes B,C's), else the
        // lowest free one ({2}: its signature's d is taken).
        let c = b.next(
            [],
            classes(vec![
                (sig(&["A"]), vec![key(1), key(9)]),
                (sig(&["A", "C"]), vec![key(2)]),
                (sig(&["B", "C"]), vec![key(8)]),
            ]),
            Rules::All(Vec::new()),
        );
        assert_eq!(c.identity(&sig(&["A"])), Some(d));
        assert_eq!(c.identity(&sig(&["A", "C"])), Some(d + 2));
        assert_eq!(c.identity(&sig(&["B", "C"])), Some(d + 1));
        assert_eq!(c.addresses.get(&key(9)), Some(&d));
    }

    #[test]
    fn signature_display() {
        assert_eq!(IdentitySignature::default().to_string(), "matches no peer");
        let s = IdentitySignature {
            peers: vec!["ipBlock 10.0.0.0/8".into()],
            named_ports: vec![NamedPortResolution {
                name: "http".into(),
                protocol: 6,
                port: 8080,
            }],
        };
        assert_eq!(
            s.to_string(),
            "matches [ipBlock 10.0.0.0/8], named ports [http/TCP=8080]"
        );
    }
    proptest::proptest! {
        /// Numbering only the identities whose keys moved gives the numbers that numbering
        /// every key gives, and falls back only when an identity that kept keys would
        /// take another number.
        #[test]
        fn numbering_the_moved_identities_equals_numbering_every_key(
            before in proptest::collection::vec(proptest::option::of(0usize..5), 1..40),
            moves in proptest::collection::vec(
                (0usize..40, proptest::option::of(0usize..6)),
                0..8,
            ),
        ) {
            let key = |i: usize| crate::lpm::host_key(std::net::IpAddr::from([10, 0, 0, i as u8]));
            // Key i has the signature `p{n}` for `Some(n)`, else the world's.
            let list = |of: &[Option<usize>]| {
                let names: BTreeSet<usize> = of.iter().flatten().copied().collect();
                let names: Vec<usize> = names.into_iter().collect();
                let index = |s: Option<usize>| names.binary_search(&s?).ok();
                let classes = IdentityClasses {
                    signatures: names.iter().map(|n| sig(&[&format!("p{n}")])).collect(),
                    keys: (0..of.len())
                        .filter_map(|i| Some((key(i), index(of[i])?)))
                        .collect::<Vec<_>>()
                        .into_iter(),
                };
                (classes, of.iter().map(|&s| index(s)).collect::<Vec<_>>())
            };
            let no_rules = || Rules::All(Vec::new());
            let (first, _) = list(&before);
            let prev = Allocations::default().next(Vec::new(), first, no_rules());
            let mut after = before.clone();
            after.resize(40, None);
            let mut moved = BTreeSet::new();
            for &(i, s) in &moves {
                after[i] = s;
                moved.insert(i);
            }
            let (classes, identity_of) = list(&after);
            let mut sizes = vec![0; classes.signatures.len()];
            for (_, i) in classes.keys.clone() {
                sizes[i] += 1;
            }
            let changed: Vec<(Lpm<Addr>, Option<usize>)> =
                moved.iter().map(|&i| (key(i), identity_of[i])).collect();
            let patched = Allocations::patched(
                &mut Arc::new(prev.clone()),
                classes.signatures.clone(),
                &sizes,
                &changed,
            );
            let full = prev.next(Vec::new(), classes, no_rules());
            match patched {
                Some((identities, addresses)) => {
                    proptest::prop_assert_eq!(&identities, &full.identities);
                    proptest::prop_assert_eq!(&addresses, &full.addresses);
                }
                None => {
                    // Some identity with a key that did not move took another number.
                    let renumbered = (0..after.len()).filter(|i| !moved.contains(i)).any(|i| {
                        let Some(n) = after[i] else { return false };
                        let s = sig(&[&format!("p{n}")]);
                        prev.identity(&s) != full.identity(&s)
                    });
                    proptest::prop_assert!(renumbered, "fell back with nothing renumbered");
                }
            }
        }
    }
}
