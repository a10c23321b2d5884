//! The cluster admin's tiers: ClusterNetworkPolicies compiled into POLICY entries.
//!
//! Within a tier, the first rule that matches decides (policies by priority, then name;
//! rules in order), so the compiler resolves the order, not the kernel: per tier group
//! (the local endpoints the same policies of the tier select, see
//! [`crate::TierGroupKey`]), direction and peer identity it cuts each protocol's ports
//! into the intervals where the same rule matches first, and writes one entry per
//! interval (an exact port, a port-range prefix, every port) holding that rule and its
//! verdict (Accept, Deny, Pass). A rule for every protocol becomes the every-protocol
//! entry, and intervals it decides anyway are left to it. The entries of one identity
//! never overlap, so the kernel's most-specific lookup
//! ([`crate::policy_maps::lookup_tier`]) finds the first matching rule in a fixed number
//! of lookups, whatever the number of policies.
//!
//! A rule for every peer (one that could not be read, denying at its place) gets an
//! entry for every identity, the world included: tiers have no any-peer entries, which
//! would rank below every identity's own entries whatever their order.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;

use netpol_common::{
    IDENTITY_ANY, IDENTITY_WORLD, POLICY_PREFIX_ANY_PORT, POLICY_PREFIX_ANY_PROTO, PROTO_SCTP,
    PROTO_TCP, PROTO_UDP, PolicyKey, PolicyValue, TIER_ADMIN, TIER_BASELINE, VERDICT_ALLOW,
    VERDICT_DENY, VERDICT_PASS,
};

use crate::cache::{PeerSlots, PodEntry};
use crate::cnp::{Action, CnpPeer, CnpProtocol, ParsedCnp, Pods, Tier, read_cnp};
use crate::diagnostics::{Diagnostic, Kind, ObjectName, Subject};
use crate::identity::Allocations;
use crate::lpm::Lpm;
use crate::policy::{Block, NamespaceMatch, Peer, PortMatch, PortSpec};
use crate::ports::port_prefixes;
use crate::state::{ClusterState, ObjectRef};
use crate::{ClusterRule, Direction, LabelSet, RuleRef};

/// One ClusterNetworkPolicy, ready to compile.
pub(crate) struct ClusterPolicy {
    pub(crate) name: String,
    /// [`TIER_ADMIN`] or [`TIER_BASELINE`].
    pub(crate) tier: u8,
    pub(crate) subject: Pods,
    /// Ingress, then egress rules, in order.
    pub(crate) rules: [Vec<TierRule>; 2],
}

/// One rule of a ClusterNetworkPolicy: what it matches and what it does.
pub(crate) struct TierRule {
    pub(crate) rule: RuleRef,
    /// `VERDICT_*`.
    pub(crate) verdict: u8,
    /// `None`: every peer.
    pub(crate) peers: Option<Vec<Peer>>,
    /// `None`: every protocol and port.
    pub(crate) ports: Option<Vec<PortSpec>>,
}

/// The subject of a diagnostic about the ClusterNetworkPolicy `name`.
pub(crate) fn subject(name: &str) -> Subject {
    Subject::Object {
        kind: Kind::ClusterNetworkPolicy,
        name: ObjectName::Cluster(name.to_string()),
    }
}

/// One ClusterNetworkPolicy as read, kept by the compiler's memo: the object it was
/// read from, what can be read of it (with its place in the order) and its diagnostics.
pub(crate) struct ReadCnp {
    object: serde_json::Value,
    policy: Option<(Order, Arc<ClusterPolicy>)>,
    diagnostics: Vec<Diagnostic>,
}

/// Where a policy comes in the kernel's order: tier, priority, name.
type Order = (Tier, u16, String);

impl ReadCnp {
    /// Reads `object`, stored under `key`.
    fn of(key: &str, object: &serde_json::Value) -> ReadCnp {
        let reading = read_cnp(object);
        let name = reading.parsed.as_ref().map_or(key, |p| &p.name);
        let diagnostics = reading
            .errors
            .into_iter()
            .map(|e| Diagnostic::new(subject(name), e.field, e.message))
            .collect();
        let policy = reading.parsed.map(|p| {
            let order = (p.tier, p.priority, p.name.clone());
            (order, Arc::new(ClusterPolicy::from(p)))
        });
        ReadCnp {
            object: object.clone(),
            policy,
            diagnostics,
        }
    }
}

/// Every ClusterNetworkPolicy of `state`, as far as it can be read, in the order the
/// kernel looks at them: the Admin tier, then the Baseline tier, each by priority, then
/// name. What cannot be read is reported in `diagnostics` (and never allows anything:
/// see `cnp::parse::Reading`). `memo` keeps each object's reading until it changes.
pub(crate) fn read(
    state: &ClusterState,
    memo: &mut HashMap<String, ReadCnp>,
    changed: Option<&BTreeSet<String>>,
    diagnostics: &mut Vec<Diagnostic>,
) -> Vec<Arc<ClusterPolicy>> {
    fn read_anew(memo: &mut HashMap<String, ReadCnp>, key: &str, object: &serde_json::Value) {
        if memo.get(key).is_none_or(|read| read.object != *object) {
            memo.insert(key.to_owned(), ReadCnp::of(key, object));
        }
    }
    match changed {
        // Told which changed: only those are compared (a deep comparison of every
        // object was a tenth of a compile with nothing to do at 150,000 pods).
        Some(changed) => {
            for key in changed {
                match state.cluster_policies.get(key) {
                    Some(object) => read_anew(memo, key, object),
                    None => drop(memo.remove(key)),
                }
            }
        }
        None => {
            for (key, object) in &state.cluster_policies {
                read_anew(memo, key, object);
            }
            memo.retain(|name, _| state.cluster_policies.contains_key(name));
        }
    }
    debug_assert!(
        memo.len() == state.cluster_policies.len()
            && state.cluster_policies.keys().all(|k| memo.contains_key(k)),
        "the memo follows the state's ClusterNetworkPolicies"
    );
    for key in state.cluster_policies.keys() {
        diagnostics.extend(memo[key].diagnostics.iter().cloned());
    }
    let mut ordered: Vec<(&Order, &Arc<ClusterPolicy>)> = memo
        .values()
        .filter_map(|read| read.policy.as_ref().map(|(order, policy)| (order, policy)))
        .collect();
    ordered.sort_by(|a, b| a.0.cmp(b.0));
    ordered.into_iter().map(|(_, p)| p.clone()).collect()
}

impl From<ParsedCnp> for ClusterPolicy {
    fn from(p: ParsedCnp) -> Self {
        let tier = match p.tier {
            Tier::Admin => TIER_ADMIN,
            Tier::Baseline => TIER_BASELINE,
        };
        let rules = Direction::BOTH.map(|direction| {
            let list = match direction {
                Direction::Ingress => &p.ingress,
                Direction::Egress => &p.egress,
            };
            list.iter()
                .map(|rule| TierRule {
                    rule: RuleRef {
                        policy: ObjectRef::new("", p.name.clone()),
                        direction,
                        index: rule.index,
                        cluster: Some(ClusterRule {
                            tier: p.tier,
                            priority: p.priority,
                            action: rule.action,
                            name: rule.name.clone(),
                        }),
                    },
                    verdict: match rule.action {
                        Action::Accept => VERDICT_ALLOW,
                        Action::Deny => VERDICT_DENY,
                        Action::Pass => VERDICT_PASS,
                    },
                    peers: rule
                        .peers
                        .as_ref()
                        .map(|peers| peers.iter().flat_map(peers_of).collect()),
                    ports: rule
                        .protocols
                        .as_ref()
                        .map(|protocols| protocols.iter().flat_map(ports_of).collect()),
                })
                .collect()
        });
        ClusterPolicy {
            name: p.name,
            tier,
            subject: p.subject,
            rules,
        }
    }
}

/// The compiler's peers for one `from`/`to` entry. A network holds what its prefix holds
/// (IPv4-mapped IPv6 addresses in an IPv6 one): unlike an ipBlock, no Go
/// `IPNet.Contains` reading is part of the API.
fn peers_of(peer: &CnpPeer) -> Vec<Peer> {
    match peer {
        CnpPeer::Pods(pods) => vec![Peer::Pods {
            namespaces: NamespaceMatch::Selector(pods.namespaces.clone()),
            pods: pods.pods.clone().unwrap_or_default(),
        }],
        CnpPeer::Networks(nets) => nets
            .iter()
            .map(|&cidr| {
                Peer::Block(Block {
                    cidr,
                    except: Vec::new(),
                })
            })
            .collect(),
        CnpPeer::Nodes(nodes) => vec![Peer::Nodes(nodes.clone())],
    }
}

/// The compiler's port specs for one entry of `protocols`: a named port stands for that
/// name in each protocol (the destination's containerPort gives both).
fn ports_of(protocol: &CnpProtocol) -> Vec<PortSpec> {
    match protocol {
        CnpProtocol::Ports {
            protocol,
            first,
            last,
        } => vec![PortSpec {
            protocol: *protocol,
            port: PortMatch::Range(*first, *last),
        }],
        CnpProtocol::Named(name) => [PROTO_TCP, PROTO_UDP, PROTO_SCTP]
            .map(|protocol| PortSpec {
                protocol,
                port: PortMatch::Named(name.clone()),
            })
            .into(),
    }
}

impl ClusterPolicy {
    /// Whether the policy's subject is the pod with `labels` in a namespace with
    /// `namespace_labels` (the compiler's endpoints are never host-network pods).
    pub(crate) fn selects(
        &self,
        labels: &(impl LabelSet + ?Sized),
        namespace_labels: &BTreeMap<String, String>,
    ) -> bool {
        self.subject.namespaces.matches(namespace_labels)
            && self
                .subject
                .pods
                .as_ref()
                .is_none_or(|pods| pods.matches(labels))
    }

    /// Every rule, by direction, in order.
    pub(crate) fn rules(&self, direction: Direction) -> &[TierRule] {
        &self.rules[direction.index()]
    }
}

/// The ports a rule matches for one peer identity.
enum Ports {
    Every,
    /// (protocol, first, last).
    Ranges(Vec<(u8, u16, u16)>),
}

/// A cell's outcome: the rule id and its verdict.
type Outcome = (u32, u8);

/// An entry of some identity: protocol, port, prefix length and outcome.
type Cell = (u8, u16, u32, Outcome);

/// A rule as [`TierContext::emit`] reads it: with its id and the identities it matches.
type ReadRule<'r> = (&'r TierRule, u32, &'r [u32]);

/// The tiers' POLICY entries of the local endpoints, made per tier group: they depend
/// on an endpoint only through the policies of the tier that select it and (ingress)
/// how it resolves the named ports those policies name.
pub(super) struct TierEntries<'a> {
    policies: &'a [Arc<ClusterPolicy>],
    allocations: &'a Allocations,
    peers: &'a PeerSlots,
    /// Identities of the classes each peer slot matches.
    peer_identities: &'a HashMap<usize, BTreeSet<u32>>,
    /// Every identity there is, the world included (for rules of every peer).
    all_identities: Vec<u32>,
    /// Egress named ports in force, and how each identity resolves them.
    egress_named_ports: &'a [(&'a str, u8)],
    named_by_identity: &'a [BTreeMap<u32, u16>],
    /// Per policy (by index) and direction, once read for some group: each rule's id
    /// and the identities its peers match (empty for a rule of every peer), in order.
    rules_read: Vec<[Option<Box<[RuleRead]>>; 2]>,
}

/// A rule's id and the identities its peers match.
type RuleRead = (u32, Vec<u32>);

impl<'a> TierEntries<'a> {
    pub(super) fn new(
        policies: &'a [Arc<ClusterPolicy>],
        allocations: &'a Allocations,
        peers: &'a PeerSlots,
        peer_identities: &'a HashMap<usize, BTreeSet<u32>>,
        identities: impl Iterator<Item = u32>,
        egress_named_ports: &'a [(&'a str, u8)],
        named_by_identity: &'a [BTreeMap<u32, u16>],
    ) -> Self {
        TierEntries {
            policies,
            allocations,
            peers,
            peer_identities,
            all_identities: all_identities(identities),
            egress_named_ports,
            named_by_identity,
            rules_read: vec![[None, None]; policies.len()],
        }
    }

    /// Every identity there is, the world included (what a rule of every peer matches).
    pub(super) fn all_identities(&self) -> &[u32] {
        &self.all_identities
    }

    /// Adds the entries of tier group `group` to `out`: the endpoints like `pod`, subject
    /// of the policies `selecting` (all of `tier`, in order); one run sorted by key per
    /// direction (each key once).
    pub(super) fn emit(
        &mut self,
        group: u32,
        tier: u8,
        pod: &PodEntry,
        selecting: &[usize],
        out: &mut Vec<(Lpm<PolicyKey>, PolicyValue)>,
    ) {
        debug_assert!(selecting.iter().all(|&i| self.policies[i].tier == tier));
        for direction in Direction::BOTH {
            self.read_rules(direction, selecting);
            let mut cells = self.cells_of(tier, direction, selecting, pod);
            cells.sort_unstable_by_key(|&(key, _)| key);
            out.extend(cells.into_iter().map(|(mut cell, value)| {
                cell.data.endpoint = group;
                (cell, value)
            }));
        }
    }

    /// Reads the rules of the policies `selecting` in `direction` that no earlier
    /// group's did: their ids, and the identities their peers match.
    fn read_rules(&mut self, direction: Direction, selecting: &[usize]) {
        let d = direction.index();
        for &i in selecting {
            if self.rules_read[i][d].is_some() {
                continue;
            }
            let read = self.policies[i].rules(direction).iter().map(|rule| {
                let id = self.allocations.rule_id(&rule.rule).expect("allocated");
                let identities = match &rule.peers {
                    None => Vec::new(),
                    Some(list) => {
                        super::emit::identities_of(list, self.peers, self.peer_identities)
                            .into_iter()
                            .collect()
                    }
                };
                (id, identities)
            });
            self.rules_read[i][d] = Some(read.collect());
        }
    }

    /// The entries (endpoint 0) of a pod like `pod` that the policies `selecting` (all
    /// of `tier`) select, in `direction`.
    fn cells_of(
        &self,
        tier: u8,
        direction: Direction,
        selecting: &[usize],
        pod: &PodEntry,
    ) -> Vec<(Lpm<PolicyKey>, PolicyValue)> {
        let d = direction.index();
        let rules: Vec<ReadRule<'_>> = selecting
            .iter()
            .flat_map(|&i| {
                let read = self.rules_read[i][d].as_deref().expect("read above");
                let rules = self.policies[i].rules(direction).iter().zip(read);
                rules.map(|(rule, (id, identities))| {
                    let identities = match rule.peers {
                        None => &self.all_identities,
                        Some(_) => identities,
                    };
                    (rule, *id, identities.as_slice())
                })
            })
            .collect();
        let ctx = TierContext {
            direction,
            tier,
            pod,
            entries: self,
        };
        ctx.emit(&rules)
    }
}

/// The named ports (name, protocol) the ingress rules of `policies[i]` for each `i` of
/// `selecting` name, sorted, each once.
pub(super) fn ingress_names<'a>(
    policies: &'a [Arc<ClusterPolicy>],
    selecting: &[usize],
) -> Vec<(&'a str, u8)> {
    let mut named: Vec<(&'a str, u8)> = selecting
        .iter()
        .flat_map(|&i| policies[i].rules(Direction::Ingress))
        .flat_map(|rule| rule.ports.iter().flatten())
        .filter_map(|spec| match &spec.port {
            PortMatch::Named(name) => Some((name.as_str(), spec.protocol)),
            PortMatch::All | PortMatch::Range(..) => None,
        })
        .collect();
    named.sort_unstable();
    named.dedup();
    named
}

/// How many identity lists of rules for every port [`TierContext::emit`] remembers to
/// pass over a later rule with the same list at once.
const DECIDING_REMEMBERED: usize = 16;

/// What turning the rules of one tier into entries in one direction needs.
struct TierContext<'a> {
    direction: Direction,
    tier: u8,
    /// The local pod.
    pod: &'a PodEntry,
    entries: &'a TierEntries<'a>,
}

impl TierContext<'_> {
    /// Entries for `rules` (with their ids and the identities they match), in the tier's
    /// order, with endpoint 0.
    ///
    /// An identity's entries follow from the rules whose peers match it; unless an
    /// egress named port resolves on it, they are the same for every identity matched by
    /// the same rules, so they are cut once per such list and stamped per identity (a
    /// rule of every peer is matched by all of them).
    fn emit(&self, rules: &[ReadRule<'_>]) -> Vec<(Lpm<PolicyKey>, PolicyValue)> {
        let mut out = Vec::new();
        // Per identity, the rules whose peers match it, in order, up to the first that
        // matches every port: nothing after it decides (a large cluster's tiers repeat
        // such rules, a Pass to every pod in dozens of policies, and a rule whose peers
        // are those of one already passed, for every port, is not looked at). As
        // (identity, rule) pairs, sorted, so that each identity's rules are one slice of
        // `ats` (a map of lists was a tenth of a compile after a ClusterNetworkPolicy
        // was replaced).
        let all = self.entries.all_identities();
        let mut decided = vec![false; all.len()];
        let mut deciding: Vec<&[u32]> = Vec::new();
        let mut pairs: Vec<(u32, usize)> = Vec::new();
        for (at, &(rule, _, identities)) in rules.iter().enumerate() {
            if deciding.contains(&identities) {
                continue;
            }
            let every_port = rule.ports.is_none();
            for &identity in identities {
                match all.binary_search(&identity) {
                    Ok(i) if decided[i] => {}
                    Ok(i) => {
                        pairs.push((identity, at));
                        decided[i] = every_port;
                    }
                    Err(_) => pairs.push((identity, at)),
                }
            }
            // A few remembered are enough for the repeated ones and keep the check short.
            if every_port && deciding.len() < DECIDING_REMEMBERED {
                deciding.push(identities);
            }
        }
        pairs.sort_unstable();
        let ats: Vec<usize> = pairs.iter().map(|&(_, at)| at).collect();
        let resolves_on_peer = |rule: &TierRule| {
            self.direction == Direction::Egress
                && rule
                    .ports
                    .iter()
                    .flatten()
                    .any(|spec| matches!(spec.port, PortMatch::Named(_)))
        };
        let mut alike: HashMap<&[usize], Vec<Cell>> = HashMap::new();
        let mut rest = ats.as_slice();
        for run in pairs.chunk_by(|a, b| a.0 == b.0) {
            let identity = run[0].0;
            let matching;
            (matching, rest) = rest.split_at(run.len());
            let own;
            let cells = if matching.iter().any(|&at| resolves_on_peer(rules[at].0)) {
                own = self.cells(rules, matching, identity);
                &own
            } else {
                alike
                    .entry(matching)
                    .or_insert_with(|| self.cells(rules, matching, identity))
            };
            for &(protocol, port, prefix_len, outcome) in cells {
                self.insert(&mut out, identity, protocol, port, prefix_len, outcome);
            }
        }
        out
    }

    /// The cells of a peer of `identity` matched by the rules at `matching` (indices
    /// into `rules`, in order): first match wins.
    fn cells(&self, rules: &[ReadRule<'_>], matching: &[usize], identity: u32) -> Vec<Cell> {
        let mut out = Vec::new();
        let mut ranges: Vec<((u8, u16, u16), Outcome)> = Vec::new();
        let mut every: Option<Outcome> = None;
        for &at in matching {
            let (rule, id, _) = rules[at];
            match self.ports(rule, identity) {
                Ports::Every => {
                    // Matches everything left: nothing after it decides.
                    every = Some((id, rule.verdict));
                    break;
                }
                Ports::Ranges(list) => {
                    ranges.extend(list.into_iter().map(|r| (r, (id, rule.verdict))));
                }
            }
        }
        if let Some(outcome) = every {
            out.push((0, 0, POLICY_PREFIX_ANY_PROTO, outcome));
        }
        let protocols: BTreeSet<u8> = ranges.iter().map(|((p, _, _), _)| *p).collect();
        for protocol in protocols {
            let of_protocol: Vec<(u16, u16, Outcome)> = ranges
                .iter()
                .filter(|((p, _, _), _)| *p == protocol)
                .map(|&((_, first, last), outcome)| (first, last, outcome))
                .collect();
            for (first, last, outcome) in first_match_intervals(&of_protocol) {
                if Some(outcome) == every {
                    continue;
                }
                for block in port_prefixes(first, last) {
                    let prefix_len = POLICY_PREFIX_ANY_PORT + block.bits;
                    out.push((protocol, block.value, prefix_len, outcome));
                }
            }
        }
        out
    }

    /// What `rule` matches of a connection with a peer of `identity`. Named ports are
    /// resolved on the destination: the local pod for ingress, the peer for egress.
    fn ports(&self, rule: &TierRule, identity: u32) -> Ports {
        let Some(specs) = &rule.ports else {
            return Ports::Every;
        };
        let mut out = Vec::new();
        for spec in specs {
            match &spec.port {
                PortMatch::All => out.push((spec.protocol, 0, u16::MAX)),
                PortMatch::Range(first, last) => out.push((spec.protocol, *first, *last)),
                PortMatch::Named(name) => {
                    let port = match self.direction {
                        Direction::Ingress => self.pod.named_port(name, spec.protocol),
                        Direction::Egress => {
                            let entries = self.entries;
                            entries
                                .egress_named_ports
                                .iter()
                                .position(|&n| n == (name.as_str(), spec.protocol))
                                .and_then(|i| entries.named_by_identity[i].get(&identity).copied())
                        }
                    };
                    if let Some(port) = port {
                        out.push((spec.protocol, port, port));
                    }
                }
            }
        }
        Ports::Ranges(out)
    }

    fn insert(
        &self,
        out: &mut Vec<(Lpm<PolicyKey>, PolicyValue)>,
        identity: u32,
        protocol: u8,
        port: u16,
        prefix_len: u32,
        (rule, verdict): Outcome,
    ) {
        let key = Lpm::new(
            prefix_len,
            PolicyKey {
                endpoint: 0,
                identity,
                direction: self.direction.as_u8() | self.tier,
                protocol,
                port: port.to_be_bytes(),
            },
        );
        // As for NetworkPolicy: port 0 and protocol 0 are the wildcard encoding.
        if crate::policy_maps::representable(&key) {
            out.push((key, PolicyValue::new(rule, verdict)));
        }
    }
}

/// The ports of one protocol cut where the first matching range changes: `ranges` in
/// rule order, each `(first, last, outcome)`; the result is disjoint, ascending, with
/// adjacent intervals of one outcome merged, and leaves out ports no range holds.
fn first_match_intervals(ranges: &[(u16, u16, Outcome)]) -> Vec<(u16, u16, Outcome)> {
    let mut cuts: Vec<u32> = ranges
        .iter()
        .flat_map(|&(first, last, _)| [u32::from(first), u32::from(last) + 1])
        .collect();
    cuts.sort_unstable();
    cuts.dedup();
    let mut out: Vec<(u16, u16, Outcome)> = Vec::new();
    for pair in cuts.windows(2) {
        let (first, last) = (pair[0], pair[1] - 1);
        let Some(&(_, _, outcome)) = ranges
            .iter()
            .find(|&&(f, l, _)| u32::from(f) <= first && last <= u32::from(l))
        else {
            continue;
        };
        let (first, last) = (first as u16, last as u16);
        match out.last_mut() {
            Some(prev) if prev.2 == outcome && u32::from(prev.1) + 1 == u32::from(first) => {
                prev.1 = last;
            }
            _ => out.push((first, last, outcome)),
        }
    }
    out
}

/// Every identity of `identities` (the compile's numbering) and the world, but not
/// `IDENTITY_ANY`, which no packet has.
fn all_identities(identities: impl Iterator<Item = u32>) -> Vec<u32> {
    let mut all: Vec<u32> = identities
        .filter(|&identity| identity != IDENTITY_ANY)
        .chain([IDENTITY_WORLD])
        .collect();
    all.sort_unstable();
    all.dedup();
    all
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_matching_range_decides_each_port_and_equal_neighbours_merge() {
        let a = (1, VERDICT_DENY);
        let b = (2, VERDICT_ALLOW);
        let c = (3, VERDICT_DENY);
        // a: 80; b: 1-1000; c: 500-2000.
        let cut = first_match_intervals(&[(80, 80, a), (1, 1000, b), (500, 2000, c)]);
        assert_eq!(
            cut,
            vec![(1, 79, b), (80, 80, a), (81, 1000, b), (1001, 2000, c)]
        );
        assert_eq!(
            first_match_intervals(&[(10, 20, a), (21, 30, a)]),
            vec![(10, 30, a)]
        );
        assert_eq!(
            first_match_intervals(&[(0, u16::MAX, a)]),
            vec![(0, u16::MAX, a)]
        );
        assert!(first_match_intervals(&[]).is_empty());
    }
}
