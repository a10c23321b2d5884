//! [`Compiler`]: the steps from cluster state to map contents, one function each.
//!
//! 1. [`policies_in_force`]: read and normalise every policy that changed (in the
//!    memo), and admit what can be read of each (`admission.rs`).
//! 2. [`select_endpoints`] (`select.rs`): collect live pods (not Succeeded/Failed, not hostNetwork,
//!    with an IP; an address listed by several belongs to the running one, then the one
//!    created last; `pods.rs`) and pick the local ones as endpoints; find the policies
//!    selecting each endpoint.
//! 3. [`peers_in_force`]: the peers in force are the peers of rules of policies that
//!    select some local endpoint in that direction; the named ports in force are those of
//!    such egress rules.
//! 4. [`number_identities`]: classify every IPCACHE key (pod IPs, node IPs, ipBlock
//!    prefixes) by the peers it matches and the named ports it resolves (`memo.rs`,
//!    `classify.rs`); each class is an identity. Endpoints, rules and identities get
//!    their numbers ([`Allocations`]).
//! 5. [`emit_maps`]: number the tier groups (the endpoints the same ClusterNetworkPolicies
//!    of a tier select), and emit ENDPOINTS and POLICY entries per endpoint, direction,
//!    rule, identity and port prefix (`emit.rs`), and the tiers' entries per tier group
//!    (`tiers.rs`).
//!
//! Per-object work (parsing, reading pods, matching pods against peers) is memoised in a
//! `CompileCache` (`cache.rs`) that the [`Compiler`] keeps; it never changes a result.

mod classify;
mod emit;
mod kept_policy;
mod memo;
mod pods;
mod select;
mod tiers;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;

use netpol_common::{
    Addr, ENDPOINT_AUDIT, ENDPOINT_EGRESS_ISOLATED, ENDPOINT_INGRESS_ISOLATED, EndpointInfo,
    IDENTITY_ANY, IDENTITY_WORLD, PeerInfo, PolicyKey, PolicyValue, TIER_ADMIN, TIER_BASELINE,
};

use self::classify::{ClassKey, Classes, Moved, classify};
pub(crate) use self::classify::{ClassTable, KeptKeys, KeyOrder};
use self::emit::RuleContext;
pub(crate) use self::kept_policy::KeptPolicy;
use self::kept_policy::{EndpointInputs, GroupInputs, PolicyMap, Update, View};
use self::memo::MemoContext;
use self::pods::{PodView, address_errors, audited_namespace, live_pods, local_live_pods};
pub(crate) use self::select::Selection;
use self::select::select_endpoints;
pub(crate) use self::tiers::ReadCnp;
use self::tiers::{ClusterPolicy, TierEntries};
use crate::admission::Admission;
use crate::cache::{
    BitSet, CompileCache, NamedPort, Namespaces, PeerSlots, PodEntry, pods_in_namespace,
};
use crate::identity::{
    Allocations, IdentityClasses, IdentitySignature, NamedPortResolution, Rules, TierGroupKey,
};
use crate::lpm::Lpm;
use crate::policy::{NamespaceMatch, ParsedPolicy, Peer};
use crate::state::{Changes, ClusterState, ObjectRef, Policy};
use crate::{Compiled, Direction, IdentityInfo, KeptMap, LocalPod, RuleRef, RuleTable};
use k8s_openapi::api::networking::v1::NetworkPolicy;

/// The compiler and what it keeps from one compile to the next: the numbers it handed
/// out ([`Allocations`]: endpoint ids, rule ids and identity numbers stay stable while
/// what they stand for exists), the version of each policy in force (admission, see
/// the crate documentation), and a memo of per-object work that makes the compile after
/// a small change fast (it never changes a result). Owned by the caller: the agent's
/// loop keeps one for its lifetime.
#[derive(Default)]
pub struct Compiler {
    allocations: Arc<Allocations>,
    admission: Admission,
    cache: CompileCache,
}

impl Compiler {
    pub fn new() -> Self {
        Compiler::default()
    }

    /// Compiles `state` into desired map contents, keeping the numbers of the previous
    /// compile where they still apply.
    pub fn compile(&mut self, state: &ClusterState) -> Compiled {
        self.compile_changed(state, &Changes::ANY)
    }

    /// [`Compiler::compile`], told which pods, policies and namespaces may have changed
    /// since this compiler's last compile: the memo entries of the others are kept
    /// without reading their objects, the largest part of a compile after one change at
    /// scale. The result is the same as [`Compiler::compile`]'s as long as every object
    /// that changed is named (callers pass what their source reports; an object left
    /// out keeps its stale entry).
    pub fn compile_changed(&mut self, state: &ClusterState, changes: &Changes) -> Compiled {
        let compiled = compile_with(
            state,
            &mut self.allocations,
            &mut self.admission,
            &mut self.cache,
            changes,
        );
        self.allocations = Arc::clone(&compiled.allocations);
        compiled
    }

    /// The numbers handed out by the last compile.
    pub fn allocations(&self) -> &Allocations {
        &self.allocations
    }

    /// The version of a policy in force after the last compile: the current one, read
    /// as far as it can be, unless nothing of it can be read (then the one before).
    pub fn policy(&self, obj: &ObjectRef) -> Option<NetworkPolicy> {
        self.admission
            .admitted()
            .get(obj)
            .map(|a| a.policy.object())
    }

    /// `state` (the state of the last compile) as admitted: its policies replaced by the
    /// versions in force (see [`Compiler::policy`]), so that what reads policies from a
    /// state, such as the reference evaluator, sees what the maps enforce.
    pub fn admitted(&self, state: &ClusterState) -> ClusterState {
        let policies: BTreeMap<ObjectRef, Policy> = self
            .admission
            .admitted()
            .iter()
            .map(|(obj, admitted)| (obj.clone(), admitted.as_in_force()))
            .collect();
        // The source's notes on what it could not read hold for the objects it read.
        let unreadable_parts = state
            .unreadable_parts
            .iter()
            .filter(|(obj, _)| policies.get(*obj) == state.policies.get(*obj))
            .map(|(obj, parts)| (obj.clone(), parts.clone()))
            .collect();
        ClusterState {
            policies,
            unreadable_policies: Default::default(),
            unreadable_parts,
            ..state.clone()
        }
    }

    /// The same compiler with an empty memo: its next compile does all the work.
    #[cfg(test)]
    pub(crate) fn without_memo(&self) -> Compiler {
        Compiler {
            allocations: self.allocations.clone(),
            admission: self.admission.without_memo(),
            cache: CompileCache::default(),
        }
    }
}

/// Compiles `state` from scratch (no memo, no earlier versions of policies), keeping
/// the numbers of `prev` (the previous result's [`Compiled::allocations`], or the
/// default) where they still apply.
pub fn compile(state: &ClusterState, prev: &Allocations) -> Compiled {
    compile_with(
        state,
        &mut Arc::new(prev.clone()),
        &mut Admission::default(),
        &mut CompileCache::default(),
        &Changes::ANY,
    )
}

fn compile_with(
    state: &ClusterState,
    prev: &mut Arc<Allocations>,
    admission: &mut Admission,
    cache: &mut CompileCache,
    changes: &Changes,
) -> Compiled {
    let now = cache.begin();
    let policy_sync = cache.sync_policies(&state.policies, changes.policies.as_ref());
    let pods_named = cache.sync_pods(&state.pods, changes.pods.as_ref(), &state.node);
    // A namespace's entry moves with its object and with the pods living in it.
    let namespaces_named = match (pods_named, &changes.pods, &changes.namespaces) {
        (true, Some(pods), Some(namespaces)) => Some(
            namespaces
                .iter()
                .map(String::as_str)
                .chain(pods.iter().map(|obj| obj.namespace.as_str()))
                .collect::<BTreeSet<&str>>(),
        ),
        _ => None,
    };
    // Only the pods named (with those of the namespaces whose labels changed) may
    // classify otherwise than last time, unless (checked below) a peer slot or a named
    // port moved.
    let pods_moved = cache.sync_namespaces(state, namespaces_named.as_ref()) && pods_named;
    let contested = cache.pod_counts.contested();
    let contested_before = std::mem::replace(&mut cache.contested, contested);
    let CompileCache {
        policies: policy_entries,
        pods: pod_entries,
        peers,
        prefixes,
        cluster_policies: cluster_memo,
        namespaces,
        named_ports,
        pod_counts,
        classes: class_table,
        signatures: signature_memo,
        key_order,
        policies_read,
        kept_policy,
        ipcache: kept_ipcache,
        keys: kept_keys,
        pods_before,
        selection,
        in_blocks,
        ..
    } = cache;
    let namespaces: &Namespaces = namespaces;
    let mut diagnostics = Vec::new();

    let admitted_anew = admission.update_if_changed(
        policy_entries,
        (policy_sync, changes.policies.as_ref()),
        &state.unreadable_policies,
        &state.unreadable_parts,
        &mut diagnostics,
    );
    let cluster_policies = tiers::read(
        state,
        cluster_memo,
        changes.cluster_policies.as_ref(),
        &mut diagnostics,
    );
    let same_policies = !admitted_anew && policies_read.enforce_staged(state.enforce_staged);
    let same_rules = same_policies && policies_read.same_rules(&cluster_policies, prev);
    let policies = match policies_read.policies().filter(|_| same_policies) {
        Some(policies) => policies.clone(),
        None => policies_in_force(admission, state),
    };
    address_errors(pod_entries, &pod_counts.unreadable, &mut diagnostics);
    // Every live pod when this compile walks them all (some address is listed by two
    // pods, now or in the last compile, or the source could not say which pods
    // changed); else, until a walk proves needed, only the pods on this node.
    let mut all = (contested || contested_before || !pods_moved)
        .then(|| live_pods(state, pod_entries, contested, &mut diagnostics));
    let pods: Vec<PodView<'_>> = match &all {
        Some(all) => all.iter().filter(|p| p.local).cloned().collect(),
        None => local_live_pods(state, pod_entries, &pod_counts.local),
    };
    let frontends = crate::services::frontends(state, &mut diagnostics);
    let endpoints = select_endpoints(&pods, &policies, &cluster_policies, namespaces, selection);
    let egress_named_ports = peers_in_force(&endpoints, &policies, &cluster_policies, peers);
    let freed_peers = peers.collect_garbage();
    let freed: Vec<usize> = freed_peers.iter().map(|&(slot, _)| slot).collect();
    let named_ports_before = named_ports.version();
    let named_ports_version = named_ports.sync(&egress_named_ports);
    let slots_moved = !freed.is_empty() || !peers.added.is_empty();
    // Quiet: the pods the source named, and those a peer matches that came into force,
    // went out of it or was freed, are the only ones whose matches or classes may have
    // moved (the memos of the others are current, see `Memo::current`; theirs are
    // brought up to date below).
    let quiet = all.is_none() && named_ports_version == named_ports_before;
    if quiet {
        let changed = class_table.changed_slots(&peers.active);
        let kept = changed.into_iter().filter(|slot| !freed.contains(slot));
        let kept = kept.map(|slot| (slot, &peers.slot(slot).peer));
        let slots = kept.chain(freed_peers.iter().map(|(slot, peer)| (*slot, peer)));
        let known = |slot: usize| !peers.added.contains(&slot);
        let (entries, namespaces) = (&*pod_entries, namespaces);
        let last = LastCompile {
            entries,
            namespaces,
            in_blocks,
            keys: kept_keys,
        };
        matched_by_slots(slots, known, &last, pods_before);
    }

    let context = MemoContext {
        peers,
        now,
        freed: &freed,
        blocks_moved: peers.added().any(|(_, s)| matches!(s.peer, Peer::Block(_)))
            || freed_peers
                .iter()
                .any(|(_, peer)| matches!(peer, Peer::Block(_))),
    };
    if quiet {
        for (obj, _) in pods_before.iter() {
            let at = pod_entries.binary_search_by(|e| e.obj.cmp(obj));
            let (Some(pod), Ok(at)) = (state.pods.get(obj), at) else {
                continue;
            };
            // Its class is made again; its memo brought up to date even when it holds no
            // address (it may match a slot allocated now).
            let entry = &mut pod_entries[at];
            entry.class = None;
            let ns = &namespaces[obj.namespace.as_str()];
            let in_a_block = !entry.ip_bits.is_empty();
            context.refresh_pod(
                entry,
                &obj.namespace,
                (pod.labels(), &ns.labels),
                ns.version,
            );
            in_blocks.follow(entry, in_a_block);
            entry.resolve_named_ports(&egress_named_ports, named_ports_version);
        }
    } else {
        let all = all.get_or_insert_with(|| live_pods(state, pod_entries, false, &mut diagnostics));
        // Pods come sorted by namespace, and the counts say how many each has: a pod's
        // namespace is known by its index, with one lookup per namespace and no name read
        // per pod.
        let mut spans = pod_counts.namespaces();
        let mut span_end = 0;
        let mut namespace: Option<(&str, &crate::cache::NamespaceEntry)> = None;
        for pod in all.iter() {
            while pod.index >= span_end {
                let (name, count) = spans.next().expect("every pod's namespace is counted");
                span_end += count;
                namespace = Some((name, &namespaces[name]));
            }
            let (name, ns) = namespace.expect("set above");
            debug_assert_eq!(name, pod.obj.namespace);
            let entry = &mut pod_entries[pod.index];
            let in_a_block = !entry.ip_bits.is_empty();
            context.refresh_pod(entry, name, (pod.labels, &ns.labels), ns.version);
            in_blocks.follow(entry, in_a_block);
            entry.resolve_named_ports(&egress_named_ports, named_ports_version);
        }
    }
    let prefixes = context.refresh_prefixes(prefixes);
    // A quiet compile brought every memo a new or freed slot matches up to date.
    if slots_moved && !quiet {
        peers.last_moved = now;
    }
    let peers: &PeerSlots = peers;
    let moved = Moved {
        pods: quiet.then_some(pods_before.as_slice()),
        contested,
        listed: pod_counts,
        named_ports: named_ports_version,
    };
    let classes = classify(
        state,
        pod_entries,
        all.as_deref(),
        peers,
        &prefixes,
        &frontends,
        (class_table, key_order, kept_keys),
        moved,
    );
    let pod_entries: &[Box<PodEntry>] = pod_entries;
    let signatures = signature_memo.list(&classes, slots_moved, named_ports_version, |class| {
        signature(class, peers, &egress_named_ports)
    });
    let numbered = number_identities(
        prev,
        (&classes, &signatures),
        kept_ipcache,
        &egress_named_ports,
        endpoints
            .iter()
            .map(|ep| pods[ep.pod].obj.clone())
            .collect(),
        policies_read.rules(same_rules, &policies, &cluster_policies, prev),
    );

    let mut numbered = numbered;
    let (endpoint_map, policy, local_pods) = emit_maps(
        state,
        &policies,
        &cluster_policies,
        &pods,
        &endpoints,
        pod_entries,
        peers,
        &egress_named_ports,
        &mut numbered,
        kept_policy.begin(),
    );
    let Numbered {
        allocations,
        ipcache,
        identities,
        ..
    } = numbered;
    let allocations = Arc::new(allocations);
    let rules = allocations.rules_by_id().clone();
    let in_force = Arc::clone(&policies.names);
    policies_read.record(state.enforce_staged, cluster_policies, policies, &rules);
    Compiled {
        endpoints: endpoint_map,
        ipcache,
        policy,
        local_pods,
        rules,
        identities,
        policies: in_force,
        diagnostics,
        node_ports: frontends.node_ports,
        allocations,
    }
}

/// The policies in force and the rule table of the last compile (kept in the memo), with
/// what they were made from. A compile whose
/// admission admitted nothing anew, with the same [`ClusterState::enforce_staged`], has
/// the same policies in force; with the same ClusterNetworkPolicies too it has the same
/// rules, and keeps the previous rule table without listing and sorting some 30,000
/// rules again.
#[derive(Default)]
pub(crate) struct PoliciesRead {
    last: Option<LastRead>,
}

struct LastRead {
    enforce_staged: bool,
    /// The ClusterNetworkPolicies read (the memo's shared values, in order).
    cluster: Vec<Arc<ClusterPolicy>>,
    policies: Policies,
    /// [`Allocations::rules_by_id`].
    table: RuleTable,
}

impl LastRead {
    /// The policies whose versions in force differ between this read and `policies` and
    /// `cluster` (a NetworkPolicy by name and parsed version, a ClusterNetworkPolicy by
    /// what was read), and their rules now.
    fn replaced(
        &self,
        policies: &Policies,
        cluster: &[Arc<ClusterPolicy>],
    ) -> (BTreeSet<ObjectRef>, Vec<RuleRef>) {
        use std::cmp::Ordering;
        let mut replaced = BTreeSet::new();
        let mut rules = Vec::new();
        // NetworkPolicies: both lists in name order.
        let (before, now) = (&self.policies, policies);
        let same = before.is(now);
        let (mut i, mut j) = if same {
            (before.names.len(), now.names.len())
        } else {
            (0, 0)
        };
        loop {
            let order = match (before.names.get(i), now.names.get(j)) {
                (None, None) => break,
                (Some(_), None) => Ordering::Less,
                (None, Some(_)) => Ordering::Greater,
                (Some(a), Some(b)) => a.cmp(b),
            };
            if order != Ordering::Greater {
                i += 1;
            }
            if order != Ordering::Less {
                j += 1;
            }
            match order {
                Ordering::Equal if Arc::ptr_eq(&before.parsed[i - 1], &now.parsed[j - 1]) => {}
                Ordering::Less => drop(replaced.insert(before.names[i - 1].clone())),
                Ordering::Equal | Ordering::Greater => {
                    replaced.insert(now.names[j - 1].clone());
                    rules.extend(now.rule_refs_of(j - 1));
                }
            }
        }
        // ClusterNetworkPolicies: by what was read (the memo's shared values).
        let read = |list: &[Arc<ClusterPolicy>]| -> BTreeSet<*const ClusterPolicy> {
            list.iter().map(Arc::as_ptr).collect()
        };
        let (read_before, read_now) = (read(&self.cluster), read(cluster));
        for p in &self.cluster {
            if !read_now.contains(&Arc::as_ptr(p)) {
                let theirs = cluster_rules(std::slice::from_ref(p));
                replaced.extend(theirs.map(|rule| rule.policy.clone()));
            }
        }
        for p in cluster {
            if !read_before.contains(&Arc::as_ptr(p)) {
                for rule in cluster_rules(std::slice::from_ref(p)) {
                    replaced.insert(rule.policy.clone());
                    rules.push(rule.clone());
                }
            }
        }
        (replaced, rules)
    }
}

/// Every rule of the ClusterNetworkPolicies `cluster`.
fn cluster_rules(cluster: &[Arc<ClusterPolicy>]) -> impl Iterator<Item = &RuleRef> {
    cluster
        .iter()
        .flat_map(|p| p.rules.iter().flatten().map(|r| &r.rule))
}

impl PoliciesRead {
    /// Whether the last compile had `enforce_staged` too.
    fn enforce_staged(&self, enforce_staged: bool) -> bool {
        self.last
            .as_ref()
            .is_some_and(|last| last.enforce_staged == enforce_staged)
    }

    /// Whether the last compile read the same ClusterNetworkPolicies and numbered its
    /// rules into `prev`.
    fn same_rules(&self, cluster: &[Arc<ClusterPolicy>], prev: &Allocations) -> bool {
        self.last.as_ref().is_some_and(|last| {
            last.table.same(prev.rules_by_id()) && same_shared(&last.cluster, cluster)
        })
    }

    /// The rules in force for [`Allocations::with_identities`] (`same`: those of the last
    /// compile, numbered into `prev`): when the last compile numbered its rules into
    /// `prev`, the rules of the policies whose versions in force differ from its own
    /// (a NetworkPolicy by name and version, a ClusterNetworkPolicy by what was read),
    /// unless they are many; else every rule in force.
    fn rules(
        &self,
        same: bool,
        policies: &Policies,
        cluster: &[Arc<ClusterPolicy>],
        prev: &Allocations,
    ) -> Rules {
        if same {
            return Rules::Same;
        }
        let last = self
            .last
            .as_ref()
            .filter(|last| last.table.same(prev.rules_by_id()));
        let replaced = last.map(|last| last.replaced(policies, cluster));
        // Past a quarter of the policies (and a few), sorting every rule costs no more.
        let few = |(replaced, _): &(BTreeSet<ObjectRef>, _)| {
            replaced.len() <= ((policies.names.len() + cluster.len()) / 4).max(64)
        };
        match replaced.filter(few) {
            Some((policies, rules)) => Rules::Replaced { policies, rules },
            None => Rules::All(
                policies
                    .rule_refs()
                    .chain(cluster_rules(cluster).cloned())
                    .collect(),
            ),
        }
    }

    /// The last compile's policies in force.
    fn policies(&self) -> Option<&Policies> {
        self.last.as_ref().map(|last| &last.policies)
    }

    fn record(
        &mut self,
        enforce_staged: bool,
        cluster: Vec<Arc<ClusterPolicy>>,
        policies: Policies,
        table: &RuleTable,
    ) {
        self.last = Some(LastRead {
            enforce_staged,
            cluster,
            policies,
            table: table.clone(),
        });
    }
}

/// The policies in force, in name order (so those of a namespace are together): shared,
/// so that a compile with the same policies in force reuses the last one's.
#[derive(Clone)]
struct Policies {
    /// [`Compiled::policies`].
    names: Arc<[ObjectRef]>,
    parsed: Arc<[Arc<ParsedPolicy>]>,
}

impl Policies {
    /// Whether `other` is these very lists (shared, so the same policies in force).
    fn is(&self, other: &Policies) -> bool {
        Arc::ptr_eq(&self.names, &other.names) && Arc::ptr_eq(&self.parsed, &other.parsed)
    }

    fn parsed(&self, i: usize) -> &ParsedPolicy {
        &self.parsed[i]
    }

    /// The policies of `namespace` (indices).
    fn in_namespace(&self, namespace: &str) -> std::ops::Range<usize> {
        let start = self
            .names
            .partition_point(|n| n.namespace.as_str() < namespace);
        let count = self.names[start..].partition_point(|n| n.namespace == namespace);
        start..start + count
    }

    /// Every rule in force of every policy, by policy, direction and index.
    fn rule_refs(&self) -> impl Iterator<Item = RuleRef> + '_ {
        (0..self.names.len()).flat_map(|i| self.rule_refs_of(i))
    }

    /// The rules in force of the `i`-th policy, by direction and index.
    fn rule_refs_of(&self, i: usize) -> impl Iterator<Item = RuleRef> + '_ {
        let (obj, parsed) = (&self.names[i], &self.parsed[i]);
        Direction::BOTH.into_iter().flat_map(move |direction| {
            let rules = parsed.rules(direction).unwrap_or_default();
            rules
                .iter()
                .map(move |rule| RuleRef::network_policy(obj.clone(), direction, rule.index))
        })
    }
}

/// Step 1: the policies in force (admitted by `admission` for this compile).
/// The admitted policies less the staged ones (unless the state compiles those too):
/// a staged policy is validated and reported like any other, and enforced by nothing.
fn policies_in_force(admission: &Admission, state: &ClusterState) -> Policies {
    // `ClusterState::in_force` of each: admission noted whether the state's object is
    // staged (a policy the source could not read at all is not).
    let (names, parsed): (Vec<ObjectRef>, Vec<Arc<ParsedPolicy>>) = admission
        .admitted()
        .iter()
        .filter(|(_, admitted)| state.enforce_staged || !admitted.staged)
        .map(|(obj, admitted)| (obj.clone(), Arc::clone(&admitted.parsed)))
        .unzip();
    // A policy's key names its namespace (the source keys it by its metadata).
    debug_assert!(
        names
            .iter()
            .zip(&parsed)
            .all(|(n, p)| n.namespace == p.namespace)
    );
    Policies {
        names: names.into(),
        parsed: parsed.into(),
    }
}

/// A local endpoint: index into the pod list, policies selecting it per direction
/// (indices into the list of policies in force; 0 ingress, 1 egress).
struct Endpoint {
    pod: usize,
    selected_by: [Vec<usize>; 2],
    /// The ClusterNetworkPolicies whose subject it is (indices, in their order).
    cluster_selected: Vec<usize>,
}

/// Whether two lists hold the same shared values, compared by address: the memo holds
/// them, so an address is never another value's while they are compared.
fn same_shared<T>(a: &[Arc<T>], b: &[Arc<T>]) -> bool {
    a.len() == b.len() && a.iter().zip(b).all(|(a, b)| Arc::ptr_eq(a, b))
}

/// Step 3: interns the peers of the rules in force (of NetworkPolicies and of
/// ClusterNetworkPolicies whose subject is some local endpoint) into `peers` and returns
/// the egress named ports in force, sorted.
fn peers_in_force<'a>(
    endpoints: &[Endpoint],
    policies: &'a Policies,
    cluster_policies: &'a [Arc<ClusterPolicy>],
    peers: &mut PeerSlots,
) -> Vec<(&'a str, u8)> {
    let mut in_force = [BTreeSet::new(), BTreeSet::new()];
    for ep in endpoints {
        for (set, selected_by) in in_force.iter_mut().zip(&ep.selected_by) {
            set.extend(selected_by.iter().copied());
        }
    }
    let mut egress_named_ports = BTreeSet::new();
    for (d, direction) in Direction::BOTH.into_iter().enumerate() {
        for &i in &in_force[d] {
            for rule in policies.parsed(i).rules(direction).unwrap_or_default() {
                let (list, ports) = (rule.peers.as_deref(), rule.ports.as_deref());
                emit::intern_rule(list, ports, direction, peers, &mut egress_named_ports);
            }
        }
    }
    let cluster_in_force: BTreeSet<usize> = endpoints
        .iter()
        .flat_map(|ep| ep.cluster_selected.iter().copied())
        .collect();
    for i in cluster_in_force {
        for direction in Direction::BOTH {
            for rule in cluster_policies[i].rules(direction) {
                let (list, ports) = (rule.peers.as_deref(), rule.ports.as_deref());
                emit::intern_rule(list, ports, direction, peers, &mut egress_named_ports);
            }
        }
    }
    egress_named_ports.into_iter().collect()
}

/// What the last compile left that [`matched_by_slots`] reads: the pod entries, the
/// namespaces, the pods held in some ipBlock, the IPCACHE keys.
struct LastCompile<'a> {
    entries: &'a [Box<PodEntry>],
    namespaces: &'a Namespaces,
    in_blocks: &'a crate::cache::InBlocks,
    keys: &'a self::classify::KeptKeys,
}

/// Adds to `moved` (pods with the addresses they listed before) every pod entry that a
/// peer of `slots` may match (those already named keep theirs): the pods whose matches or
/// classes the slots coming into force, going out of it, allocated or freed change. A pod
/// peer matches by labels; an ipBlock the pods with an address in it; a `nodes` peer no
/// pod (the keys it moves are no pod's: `classify` patches them). Only the peer matches
/// of pods holding addresses are kept up to date (no other is classified; one that
/// starts to hold them is matched afresh): the others need not be found.
///
/// A slot `known` (allocated before this compile) is in the ipBlock matches of every
/// entry with an address in its block (`PodEntry::ip_bits`, brought up to date whenever
/// slots are allocated or freed): its pods are found among those of `in_blocks`. A block
/// allocated now is looked for in every entry's addresses, unless no key of the last
/// compile lies inside it (the addresses of pods holding them that this compile did not
/// name are all keys of the last one).
fn matched_by_slots<'p>(
    slots: impl Iterator<Item = (usize, &'p Peer)>,
    known: impl Fn(usize) -> bool,
    last: &LastCompile<'_>,
    moved: &mut Vec<(ObjectRef, Vec<std::net::IpAddr>)>,
) {
    let LastCompile {
        entries,
        namespaces,
        in_blocks,
        keys,
    } = *last;
    let mut slots = slots.peekable();
    if slots.peek().is_none() {
        return;
    }
    let mut named: BTreeSet<ObjectRef> = moved.iter().map(|(obj, _)| obj.clone()).collect();
    let mut add = |entry: &PodEntry| {
        if named.insert(entry.obj.clone()) {
            moved.push((entry.obj.clone(), entry.held_ips()));
        }
    };
    let (mut known_blocks, mut new_blocks) = (Vec::new(), Vec::new());
    for (slot, peer) in slots {
        let (in_namespaces, selector) = match peer {
            Peer::Pods { namespaces, pods } => (namespaces, pods),
            Peer::Nodes(_) => continue,
            Peer::Block(_) if known(slot) => {
                known_blocks.push(slot);
                continue;
            }
            Peer::Block(block) => {
                if keys.lists_inside(block) {
                    new_blocks.push(block);
                }
                continue;
            }
        };
        let selected: Vec<&str> = match in_namespaces {
            NamespaceMatch::Named(name) => vec![name.as_str()],
            NamespaceMatch::Selector(s) => namespaces
                .iter()
                .filter(|(_, ns)| s.matches(&ns.labels))
                .map(|(name, _)| name.as_str())
                .collect(),
        };
        for name in selected {
            for entry in pods_in_namespace(entries, name) {
                if entry.holds && selector.matches(entry.labels()) {
                    add(entry);
                }
            }
        }
    }
    if !known_blocks.is_empty() {
        for obj in in_blocks.iter() {
            let at = entries.binary_search_by(|e| e.obj.cmp(obj));
            let entry = &entries[at.expect("in_blocks follows the entries")];
            let inside = |bits: &BitSet| known_blocks.iter().any(|&slot| bits.contains(slot));
            if entry.holds && entry.ip_bits.iter().any(inside) {
                add(entry);
            }
        }
    }
    // One pass over every entry's addresses for the ipBlocks allocated now that hold
    // some address.
    if !new_blocks.is_empty() {
        for entry in entries.iter().filter(|entry| entry.holds) {
            let inside = |&ip: &std::net::IpAddr| new_blocks.iter().any(|b| b.contains_addr(ip));
            if entry.ips.iter().any(inside) {
                add(entry);
            }
        }
    }
}

/// What step 4 decided: the numbers, the IPCACHE, what each identity stands for, and
/// what step 5 needs to find the identities of a rule.
struct Numbered {
    allocations: Allocations,
    ipcache: KeptMap<Lpm<Addr>, PeerInfo>,
    identities: BTreeMap<u32, IdentityInfo>,
    /// Identities of the classes each peer slot matches.
    peer_identities: HashMap<usize, BTreeSet<u32>>,
    /// Per egress named port in force: how each identity resolves it.
    named_by_identity: Vec<BTreeMap<u32, u16>>,
}

/// Step 4: an identity per class (the world for the class matching nothing), numbered
/// by lineage from `prev`, together with the endpoint and rule numbers (`rules`: `None`
/// for `prev`'s). IPCACHE is `ipcache` (the last compile's) brought up to date: by the
/// keys that changed when the classes were patched and no identity took another number
/// ([`Allocations::patched`]), else by every key.
fn number_identities(
    prev: &mut Arc<Allocations>,
    (classes, signatures): (&Classes<'_>, &[&IdentitySignature]),
    ipcache: &mut KeptMap<Lpm<Addr>, PeerInfo>,
    egress_named_ports: &[(&str, u8)],
    endpoints: Vec<ObjectRef>,
    rules: Rules,
) -> Numbered {
    // Dynamic identities: one per distinct signature, in signature order.
    let mut dynamic: Vec<&IdentitySignature> = signatures
        .iter()
        .copied()
        .filter(|s| !s.is_world())
        .collect();
    dynamic.sort();
    dynamic.dedup();
    // The dynamic identity (index in `dynamic`) of each class of the table.
    let mut class_identity: Vec<Option<usize>> = vec![None; classes.counts.len()];
    for ((class, _), signature) in classes.list.iter().zip(signatures) {
        class_identity[*class] = dynamic.binary_search(signature).ok();
    }
    let dynamic: Vec<IdentitySignature> = dynamic.into_iter().cloned().collect();
    let patched = classes.changed.as_ref().and_then(|changed| {
        let mut sizes = vec![0; dynamic.len()];
        for (class, _) in &classes.list {
            if let Some(i) = class_identity[*class] {
                sizes[i] += classes.counts[*class];
            }
        }
        let changed: Vec<(Lpm<Addr>, Option<usize>)> = changed
            .iter()
            .map(|&(key, now)| (key, now.and_then(|(class, _)| class_identity[class])))
            .collect();
        Allocations::patched(prev, dynamic.clone(), &sizes, &changed)
    });
    let (allocations, changed) = match patched {
        Some(identities) => (
            prev.with_identities(endpoints, identities, rules),
            classes.changed.as_deref(),
        ),
        None => {
            let identity_classes = IdentityClasses {
                signatures: dynamic,
                keys: classes
                    .keys
                    .iter()
                    .filter_map(|&(key, class, _)| class_identity[class].map(|i| (key, i))),
            };
            let next = Allocations::next_releasing(prev, endpoints, identity_classes, rules);
            (next, None)
        }
    };
    // The identity number of each class of the table: the allocations number exactly
    // the dynamic identities, in signature order.
    let numbers: Vec<u32> = allocations.identities().values().copied().collect();
    let mut identity_of: Vec<u32> = vec![IDENTITY_WORLD; classes.counts.len()];
    for (class, _) in &classes.list {
        if let Some(i) = class_identity[*class] {
            identity_of[*class] = numbers[i];
        }
    }
    debug_assert!(classes.list.iter().zip(signatures).all(|(&(class, _), s)| {
        s.is_world() || allocations.identity(s) == Some(identity_of[class])
    }));
    let info = |(class, flags)| PeerInfo {
        identity: identity_of[class],
        flags,
    };
    let ipcache = match changed {
        Some(changed) => ipcache.change(changed.iter().map(|&(key, now)| (key, now.map(info)))),
        None => ipcache.update(
            classes
                .keys
                .iter()
                .map(|&(key, class, flags)| (key, info((class, flags)))),
        ),
    }
    .clone();
    let mut identities: BTreeMap<u32, IdentityInfo> = BTreeMap::new();
    identities.insert(
        IDENTITY_ANY,
        IdentityInfo {
            signature: IdentitySignature::default(),
            description: "any peer (rules without from/to)".into(),
        },
    );
    identities.insert(
        IDENTITY_WORLD,
        IdentityInfo {
            signature: IdentitySignature::default(),
            description: "the world: matches no peer".into(),
        },
    );
    for (signature, &identity) in allocations.identities() {
        identities.insert(
            identity,
            IdentityInfo {
                signature: signature.clone(),
                description: signature.to_string(),
            },
        );
    }

    // Identities by peer slot, and named port resolutions by identity (egress).
    let mut peer_identities: HashMap<usize, BTreeSet<u32>> = HashMap::new();
    let mut named_by_identity: Vec<BTreeMap<u32, u16>> =
        vec![BTreeMap::new(); egress_named_ports.len()];
    for &(class_index, class) in &classes.list {
        let identity = identity_of[class_index];
        for slot in class.peers.iter() {
            peer_identities.entry(slot).or_default().insert(identity);
        }
        for &(i, port) in &class.named_ports {
            named_by_identity[i].insert(identity, port);
        }
    }
    Numbered {
        allocations,
        ipcache,
        identities,
        peer_identities,
        named_by_identity,
    }
}

/// The identity signature of each class of the class table, kept from one compile to
/// the next (in the compiler's memo): a signature is text (every peer's canonical form,
/// each named port's name), and most compiles see the same classes as the last. Made
/// again when a class index, a peer slot or the list of egress named ports may name
/// something else: a new class table epoch, a slot allocated or freed, a new list.
#[derive(Default)]
pub(crate) struct Signatures {
    /// (class table epoch, egress named ports version) the signatures were made for.
    made_for: (u64, u64),
    by_class: Vec<Option<IdentitySignature>>,
}

impl Signatures {
    /// The signature of each class of `classes.list` (in its order), made by `make` for
    /// those the memo lacks; the memo is emptied first unless it was made for the same
    /// class table epoch and list of egress named ports (`named_ports`, its version),
    /// with no slot allocated or freed since (`slots_moved`).
    fn list(
        &mut self,
        classes: &Classes<'_>,
        slots_moved: bool,
        named_ports: u64,
        make: impl Fn(&ClassKey) -> IdentitySignature,
    ) -> Vec<&IdentitySignature> {
        let made_for = (classes.epoch, named_ports);
        if slots_moved || self.made_for != made_for {
            self.by_class.clear();
            self.made_for = made_for;
        }
        for &(class, key) in &classes.list {
            if self.by_class.len() <= class {
                self.by_class.resize(class + 1, None);
            }
            if self.by_class[class].is_none() {
                self.by_class[class] = Some(make(key));
            }
        }
        let made = |&(class, _): &(usize, &ClassKey)| self.by_class[class].as_ref();
        classes
            .list
            .iter()
            .map(|c| made(c).expect("made above"))
            .collect()
    }
}

/// The signature of `class`: the canonical text of the peers it matches
/// (sorted) and its resolution of the egress named ports.
fn signature(
    class: &ClassKey,
    peers: &PeerSlots,
    egress_named_ports: &[(&str, u8)],
) -> IdentitySignature {
    let mut matched: Vec<String> = class
        .peers
        .iter()
        .map(|slot| peers.slot(slot).canonical.clone())
        .collect();
    matched.sort();
    IdentitySignature {
        peers: matched,
        named_ports: class
            .named_ports
            .iter()
            .map(|&(i, port)| NamedPortResolution {
                name: egress_named_ports[i].0.to_string(),
                protocol: egress_named_ports[i].1,
                port,
            })
            .collect(),
    }
}

/// A tier group as this compile finds it ([`TierGroupKey`]): the endpoints like `pod`
/// that the policies `selecting` of the key's tier select.
struct FoundGroup<'a> {
    key: TierGroupKey,
    /// Indices into the ClusterNetworkPolicies in force, in their order.
    selecting: Vec<usize>,
    /// The first endpoint's pod (ingress named ports resolve on it, alike for all).
    pod: &'a PodEntry,
    /// The endpoints' ids, sorted.
    endpoints: Vec<u32>,
}

/// The tier groups of `endpoints` (whose ids are `ids`), and each endpoint's (indices
/// into them) in the Admin, then the Baseline tier.
fn tier_groups<'a>(
    endpoints: &[Endpoint],
    ids: &[u32],
    pods: &[PodView<'_>],
    pod_entries: &'a [Box<PodEntry>],
    cluster_policies: &[Arc<ClusterPolicy>],
) -> (Vec<FoundGroup<'a>>, Vec<[Option<usize>; 2]>) {
    let mut groups: Vec<FoundGroup<'a>> = Vec::new();
    let mut found: HashMap<(u8, Vec<usize>, Vec<NamedPort<'a>>), usize> = HashMap::new();
    let of_endpoints = endpoints
        .iter()
        .zip(ids)
        .map(|(ep, &id)| {
            let pod = &pod_entries[pods[ep.pod].index];
            [TIER_ADMIN, TIER_BASELINE].map(|tier| {
                let selecting: Vec<usize> = ep
                    .cluster_selected
                    .iter()
                    .copied()
                    .filter(|&i| cluster_policies[i].tier == tier)
                    .collect();
                if selecting.is_empty() {
                    return None;
                }
                // Ingress named ports resolve on the pod: the key holds how it resolves
                // the ones these rules name (most name none), so pods that differ only
                // in others share a group.
                let named = tiers::ingress_names(cluster_policies, &selecting);
                let named_ports: Vec<NamedPort<'a>> = pod
                    .named_ports()
                    .filter(|n| named.contains(&(n.name, n.protocol)))
                    .collect();
                let at = *found
                    .entry((tier, selecting, named_ports))
                    .or_insert_with_key(|(tier, selecting, named_ports)| {
                        let key = TierGroupKey {
                            tier: *tier,
                            policies: selecting
                                .iter()
                                .map(|&i| cluster_policies[i].name.clone())
                                .collect(),
                            named_ports: named_ports
                                .iter()
                                .map(|n| NamedPortResolution {
                                    name: n.name.to_owned(),
                                    protocol: n.protocol,
                                    port: n.port,
                                })
                                .collect(),
                        };
                        groups.push(FoundGroup {
                            key,
                            selecting: selecting.clone(),
                            pod,
                            endpoints: Vec::new(),
                        });
                        groups.len() - 1
                    });
                groups[at].endpoints.push(id);
                Some(at)
            })
        })
        .collect();
    for group in &mut groups {
        group.endpoints.sort_unstable();
    }
    (groups, of_endpoints)
}

type Maps = (
    BTreeMap<Addr, EndpointInfo>,
    KeptMap<Lpm<PolicyKey>, PolicyValue>,
    Vec<LocalPod>,
);

/// Step 5: ENDPOINTS and POLICY, the tier groups' numbers, and the local endpoints by
/// pod. POLICY entries are made only for the endpoints and tier groups whose inputs
/// changed since `update`'s last compile (`kept_policy.rs`).
#[allow(clippy::too_many_arguments)]
fn emit_maps(
    state: &ClusterState,
    policies: &Policies,
    cluster_policies: &[Arc<ClusterPolicy>],
    pods: &[PodView<'_>],
    endpoints: &[Endpoint],
    pod_entries: &[Box<PodEntry>],
    peers: &PeerSlots,
    egress_named_ports: &[(&str, u8)],
    numbered: &mut Numbered,
    mut update: Update<'_>,
) -> Maps {
    let ids: Vec<u32> = endpoints
        .iter()
        .map(|ep| {
            let id = numbered.allocations.endpoint_id(pods[ep.pod].obj);
            id.expect("allocated above")
        })
        .collect();
    // The tier groups first (their keys need no numbers), then their numbers.
    let (groups, endpoint_groups) =
        tier_groups(endpoints, &ids, pods, pod_entries, cluster_policies);
    let wanted = groups
        .iter()
        .map(|group| (group.key.clone(), group.endpoints.clone()))
        .collect();
    numbered.allocations.number_tier_groups(wanted);
    let numbered: &Numbered = numbered;
    let allocations = &numbered.allocations;
    // Rule ids of the policies selecting some endpoint whose entries are made, per
    // direction, in rule order.
    let mut rule_ids: HashMap<usize, [Vec<u32>; 2]> = HashMap::new();
    let mut tier_entries = TierEntries::new(
        cluster_policies,
        allocations,
        peers,
        &numbered.peer_identities,
        numbered.identities.keys().copied(),
        egress_named_ports,
        &numbered.named_by_identity,
    );
    let identities: Vec<u32> = tier_entries.all_identities().to_vec();
    let view = View {
        peers,
        peer_identities: &numbered.peer_identities,
        egress_named_ports,
        named_by_identity: &numbered.named_by_identity,
        identities: &identities,
    };
    // Each tier group's number and kind flags.
    let mut views = HashMap::new();
    let groups: Vec<(u32, u32)> = groups
        .into_iter()
        .map(|group| {
            let id = allocations.tier_group(&group.key).expect("numbered above");
            let inputs = GroupInputs {
                view: cluster_view(&group.selecting, cluster_policies, &view, &mut views),
                cluster: group
                    .selecting
                    .iter()
                    .map(|&i| Arc::clone(&cluster_policies[i]))
                    .collect(),
                key: group.key,
            };
            let kinds = match update.kept_group(id, &inputs) {
                Some(kinds) => kinds,
                None => {
                    let mut entries = Vec::new();
                    let (tier, pod) = (inputs.key.tier, group.pod);
                    tier_entries.emit(id, tier, pod, &group.selecting, &mut entries);
                    update.replace_group(id, inputs, entries)
                }
            };
            (id, kinds)
        })
        .collect();
    let mut endpoint_map = BTreeMap::new();
    let mut local_pods = Vec::new();
    for ((ep, in_groups), &id) in endpoints.iter().zip(endpoint_groups).zip(&ids) {
        let pod = &pods[ep.pod];
        let entry = &pod_entries[pod.index];
        let inputs = endpoint_inputs(ep, entry, policies, &view);
        let kinds = match update.kept_endpoint(id, &inputs) {
            Some(kinds) => kinds,
            None => {
                let mut entries = PolicyMap::new();
                for (d, direction) in Direction::BOTH.into_iter().enumerate() {
                    for &i in &ep.selected_by[d] {
                        let ids = rule_ids
                            .entry(i)
                            .or_insert_with(|| rule_ids_of(policies, i, allocations));
                        let rules_of_policy =
                            policies.parsed(i).rules(direction).unwrap_or_default();
                        for (rule, &rule_id) in rules_of_policy.iter().zip(&ids[d]) {
                            let ctx = RuleContext {
                                endpoint: id,
                                direction,
                                rule: rule_id,
                                pod: entry,
                                peers,
                                peer_identities: &numbered.peer_identities,
                                egress_named_ports,
                                named_by_identity: &numbered.named_by_identity,
                            };
                            ctx.emit(rule, &mut entries);
                        }
                    }
                }
                update.replace_endpoint(id, inputs, entries)
            }
        };
        // Each endpoint is flagged with the kinds of entries it has (any peer, port
        // ranges, every port, every protocol), its tier groups' included: the programs
        // make only the lookups that can hit, so a denied new flow of an endpoint with
        // exact ports only costs one hash lookup.
        let mut flags = kinds;
        let tier_groups = in_groups.map(|at| {
            at.map_or(0, |at| {
                let (group, kinds) = groups[at];
                flags |= kinds;
                group
            })
        });
        if !ep.selected_by[0].is_empty() {
            flags |= ENDPOINT_INGRESS_ISOLATED;
        }
        if !ep.selected_by[1].is_empty() {
            flags |= ENDPOINT_EGRESS_ISOLATED;
        }
        if state.audit_all || audited_namespace(state, &pod.obj.namespace) {
            flags |= ENDPOINT_AUDIT;
        }
        let info = EndpointInfo {
            id,
            flags,
            tier_groups,
        };
        for ip in pod.ips(pod_entries) {
            endpoint_map.insert(crate::lpm::addr(*ip), info);
        }
        let names = |d: usize| {
            ep.selected_by[d]
                .iter()
                .map(|&i| policies.names[i].clone())
                .collect()
        };
        local_pods.push(LocalPod {
            pod: pod.obj.clone(),
            endpoint_id: id,
            ips: pod.ips(pod_entries).to_vec(),
            host_interface: pod.host_interface.cloned(),
            ingress_policies: names(0),
            egress_policies: names(1),
        });
    }
    (endpoint_map, update.finish(), local_pods)
}

/// What the NetworkPolicy entries of `ep` (the local pod `entry`) are made from.
fn endpoint_inputs(
    ep: &Endpoint,
    entry: &PodEntry,
    policies: &Policies,
    view: &View<'_>,
) -> EndpointInputs {
    let mut seen = Vec::new();
    let selecting = Direction::BOTH.map(|direction| {
        let d = direction.index();
        ep.selected_by[d]
            .iter()
            .map(|&i| {
                let parsed = &policies.parsed[i];
                for rule in parsed.rules(direction).unwrap_or_default() {
                    let (peers, ports) = (rule.peers.as_deref(), rule.ports.as_deref());
                    view.rule(&mut seen, direction, peers, ports, false);
                }
                Arc::clone(parsed)
            })
            .collect()
    });
    EndpointInputs {
        policies: selecting,
        ports: Arc::clone(entry.ports()),
        view: seen,
    }
}

/// The view of the identities through the ClusterNetworkPolicies `selecting`: each
/// policy's is written once per compile in `of_policy` (by index) and copied into every
/// group it selects (a policy for every namespace is in every group of its tier).
fn cluster_view(
    selecting: &[usize],
    cluster_policies: &[Arc<ClusterPolicy>],
    view: &View<'_>,
    of_policy: &mut HashMap<usize, Vec<u32>>,
) -> Vec<u32> {
    let mut seen = Vec::new();
    for &i in selecting {
        let written = of_policy.entry(i).or_insert_with(|| {
            let mut written = Vec::new();
            for direction in Direction::BOTH {
                for rule in cluster_policies[i].rules(direction) {
                    let (peers, ports) = (rule.peers.as_deref(), rule.ports.as_deref());
                    view.rule(&mut written, direction, peers, ports, true);
                }
            }
            written
        });
        seen.extend_from_slice(written);
    }
    seen
}

/// The rule ids of policy `i` in force, per direction, in rule order.
fn rule_ids_of(policies: &Policies, i: usize, allocations: &Allocations) -> [Vec<u32>; 2] {
    let (obj, parsed) = (&policies.names[i], policies.parsed(i));
    Direction::BOTH.map(|direction| {
        let rules = parsed.rules(direction).unwrap_or_default();
        rules
            .iter()
            .map(|rule| {
                let rule = RuleRef::network_policy(obj.clone(), direction, rule.index);
                allocations.rule_id(&rule).expect("every rule has an id")
            })
            .collect()
    })
}

#[cfg(test)]
mod tests;
