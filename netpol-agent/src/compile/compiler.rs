//! [`compile`]: the steps from cluster state to map contents.
//!
//! 1. Validate and normalise every policy; give each rule of a valid one its id.
//! 2. Collect live pods (not Succeeded/Failed, not hostNetwork, with an IP) and pick the
//!    local ones as endpoints; find the policies selecting each endpoint.
//! 3. The peers in force are the peers of rules of policies that select some local
//!    endpoint in that direction; the named ports in force are those of such egress rules.
//! 4. Classify every IPCACHE key (pod IPs, node IPs, ipBlock prefixes) by the peers it
//!    matches and the named ports it resolves; each class is an identity.
//! 5. Emit POLICY entries per endpoint, direction, rule, identity and port prefix.
//!
//! Per-object work (parsing, reading pods, matching pods against peers) is memoised in a
//! `CompileCache` (`cache.rs`) carried by the allocations; it never changes a result.

use std::borrow::Cow;
use std::collections::hash_map::Entry;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::IpAddr;

use ipnet::IpNet;
use k8s_openapi::api::core::v1::Pod;
use netpol_common::{
    Addr, ENDPOINT_AUDIT, ENDPOINT_EGRESS_ISOLATED, ENDPOINT_INGRESS_ISOLATED, EndpointInfo,
    IDENTITY_ANY, IDENTITY_WORLD, PEER_HOST, POLICY_PREFIX_ANY_PORT, POLICY_PREFIX_ANY_PROTO,
    PeerInfo, PolicyKey, PolicyValue,
};

use super::cache::{BitSet, CompileCache, FastMap, Memo, PeerSlots, PodEntry};
use super::identity::{Allocations, IdentityClasses, IdentitySignature, NamedPortResolution};
use super::lpm::{Lpm, host_key, net_key};
use super::policy::{NamespaceMatch, ParsedPolicy, ParsedRule, Peer, PortMatch};
use super::ports::port_prefixes;
use super::{Compiled, Diagnostic, Direction, IdentityInfo, LocalPod, RuleRef};
use crate::state::{ClusterState, HOST_INTERFACE_ANNOTATION, ObjectRef};

static NO_LABELS: BTreeMap<String, String> = BTreeMap::new();

/// Compiles `state` into desired map contents. `prev` is the previous result's
/// [`Compiled::allocations`] (or the default), so endpoint ids, rule ids and identity
/// numbers stay stable while what they stand for exists.
///
/// Pure in its result: the memo that `prev` carries (`compile/cache.rs`) only makes the
/// compile after a small change fast.
pub fn compile(state: &ClusterState, prev: &Allocations) -> Compiled {
    let handle = prev.cache();
    let mut cache = handle.take();
    let compiled = compile_with(state, prev, &mut cache);
    handle.put(cache);
    compiled
}

fn compile_with(state: &ClusterState, prev: &Allocations, cache: &mut CompileCache) -> Compiled {
    let now = cache.begin();
    cache.sync_policies(&state.policies);
    cache.sync_pods(&state.pods);
    let namespaces = namespace_labels(state);
    let namespace_versions = cache.sync_namespaces(&namespaces);
    let CompileCache {
        policies: policy_entries,
        pods: pod_entries,
        peers,
        prefixes,
        ..
    } = cache;
    let mut diagnostics = Vec::new();

    // 1. Policies and rule ids.
    let mut policies: Vec<(&ObjectRef, &ParsedPolicy)> = Vec::new();
    for entry in policy_entries.iter() {
        match &entry.parsed {
            Ok(parsed) => policies.push((&entry.obj, parsed)),
            Err(errors) => diagnostics.extend(errors.iter().map(|e| Diagnostic {
                object: format!("NetworkPolicy {}", entry.obj),
                field: e.field.clone(),
                message: e.message.clone(),
            })),
        }
    }
    let rule_refs = policies.iter().flat_map(|&(obj, parsed)| {
        Direction::BOTH.into_iter().flat_map(move |direction| {
            let count = parsed.rules(direction).map_or(0, <[ParsedRule]>::len);
            (0..count).map(move |index| RuleRef {
                policy: obj.clone(),
                direction,
                index,
            })
        })
    });
    let mut by_namespace: HashMap<&str, Vec<usize>> = HashMap::new();
    for (i, (_, policy)) in policies.iter().enumerate() {
        by_namespace.entry(&policy.namespace).or_default().push(i);
    }

    // 2. Pods.
    let pods = live_pods(state, pod_entries, &mut diagnostics);
    let endpoints: Vec<Endpoint> = pods
        .iter()
        .enumerate()
        .filter(|(_, p)| p.local)
        .map(|(pod, p)| {
            let mut selected_by = [Vec::new(), Vec::new()];
            let candidates = by_namespace.get(p.obj.namespace.as_str());
            for &i in candidates.into_iter().flatten() {
                let policy = policies[i].1;
                if policy.pod_selector.matches(p.labels) {
                    for (d, direction) in Direction::BOTH.into_iter().enumerate() {
                        if policy.rules(direction).is_some() {
                            selected_by[d].push(i);
                        }
                    }
                }
            }
            Endpoint { pod, selected_by }
        })
        .collect();

    // 3. Peers and named ports in force.
    let mut in_force = [BTreeSet::new(), BTreeSet::new()];
    for ep in &endpoints {
        for (set, selected_by) in in_force.iter_mut().zip(&ep.selected_by) {
            set.extend(selected_by.iter().copied());
        }
    }
    let mut egress_named_ports = BTreeSet::new();
    for (d, direction) in Direction::BOTH.into_iter().enumerate() {
        for &i in &in_force[d] {
            for rule in policies[i].1.rules(direction).unwrap_or_default() {
                for peer in rule.peers.iter().flatten() {
                    peers.intern(peer);
                }
                if direction == Direction::Egress {
                    for spec in rule.ports.iter().flatten() {
                        if let PortMatch::Named(name) = &spec.port {
                            egress_named_ports.insert((name.as_str(), spec.protocol));
                        }
                    }
                }
            }
        }
    }
    let egress_named_ports: Vec<(&str, u8)> = egress_named_ports.into_iter().collect();
    let freed = peers.collect_garbage();

    // 4. Classify IPCACHE keys.
    let context = MemoContext {
        peers,
        now,
        freed: &freed,
    };
    let mut namespace: Option<(&str, u64, &BTreeMap<String, String>)> = None;
    for pod in &pods {
        let name = pod.obj.namespace.as_str();
        // Pods come sorted by namespace: one lookup per namespace.
        let (version, namespace_labels) = match namespace {
            Some((known, version, labels)) if known == name => (version, labels),
            _ => {
                let (version, labels) = (namespace_versions[name], &namespaces[name]);
                namespace = Some((name, version, labels));
                (version, labels)
            }
        };
        let entry = &mut pod_entries[pod.index];
        context.refresh_pod(entry, name, (pod.labels, namespace_labels), version);
    }
    let prefixes = context.refresh_prefixes(prefixes);
    let pod_entries: &[PodEntry] = pod_entries;
    let peers: &PeerSlots = peers;
    let classes = classify(
        state,
        pod_entries,
        &pods,
        peers,
        &prefixes,
        &egress_named_ports,
    );
    let signatures: Vec<IdentitySignature> = classes
        .list
        .iter()
        .map(|class| IdentitySignature {
            peers: {
                let mut v: Vec<String> = class
                    .peers
                    .iter()
                    .map(|slot| peers.slot(slot).canonical.clone())
                    .collect();
                v.sort();
                v
            },
            named_ports: class
                .named_ports
                .iter()
                .map(|&(i, port)| NamedPortResolution {
                    name: egress_named_ports[i].0.to_string(),
                    protocol: egress_named_ports[i].1,
                    port,
                })
                .collect(),
        })
        .collect();
    // Dynamic identities: one per distinct signature, in signature order.
    let mut dynamic: Vec<&IdentitySignature> =
        signatures.iter().filter(|s| !s.is_world()).collect();
    dynamic.sort();
    dynamic.dedup();
    let class_identity: Vec<Option<usize>> = signatures
        .iter()
        .map(|s| dynamic.binary_search(&s).ok())
        .collect();
    let identity_classes = IdentityClasses {
        signatures: dynamic.iter().map(|&s| s.clone()).collect(),
        keys: classes
            .keys
            .iter()
            .filter_map(|&(key, class, _)| class_identity[class].map(|i| (key, i)))
            .collect(),
    };
    let allocations = prev.next(
        endpoints.iter().map(|ep| pods[ep.pod].obj.clone()),
        identity_classes,
        rule_refs,
    );
    let identity_of: Vec<u32> = signatures
        .iter()
        .map(|s| {
            if s.is_world() {
                IDENTITY_WORLD
            } else {
                allocations.identity(s).expect("allocated above")
            }
        })
        .collect();

    let ipcache: BTreeMap<Lpm<Addr>, PeerInfo> = classes
        .keys
        .iter()
        .map(|&(key, class, flags)| {
            let identity = identity_of[class];
            (key, PeerInfo { identity, flags })
        })
        .collect();
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
    for (class, &identity) in classes.list.iter().zip(&identity_of) {
        for slot in class.peers.iter() {
            peer_identities.entry(slot).or_default().insert(identity);
        }
        for &(i, port) in &class.named_ports {
            named_by_identity[i].insert(identity, port);
        }
    }

    // 5. ENDPOINTS and POLICY. Rule ids, in the order of `policies` (the allocation map
    // is ordered by policy, direction and index, as `rule_refs` listed them).
    let mut ids = allocations.rules().iter();
    let rule_ids: Vec<[Vec<u32>; 2]> = policies
        .iter()
        .map(|&(obj, parsed)| {
            Direction::BOTH.map(|direction| {
                let count = parsed.rules(direction).map_or(0, <[ParsedRule]>::len);
                (0..count)
                    .map(|index| {
                        let (rule, &id) = ids.next().expect("every rule has an id");
                        debug_assert!(
                            rule.policy == *obj
                                && rule.direction == direction
                                && rule.index == index
                        );
                        id
                    })
                    .collect()
            })
        })
        .collect();
    let rules: BTreeMap<u32, RuleRef> = allocations
        .rules()
        .iter()
        .map(|(rule, &id)| (id, rule.clone()))
        .collect();
    let mut endpoint_map = BTreeMap::new();
    let mut policy = BTreeMap::new();
    let mut local_pods = Vec::new();
    for ep in &endpoints {
        let pod = &pods[ep.pod];
        let id = allocations.endpoint_id(pod.obj).expect("allocated above");
        let mut flags = 0;
        if !ep.selected_by[0].is_empty() {
            flags |= ENDPOINT_INGRESS_ISOLATED;
        }
        if !ep.selected_by[1].is_empty() {
            flags |= ENDPOINT_EGRESS_ISOLATED;
        }
        if state.audit_all || audited_namespace(state, &pod.obj.namespace) {
            flags |= ENDPOINT_AUDIT;
        }
        let entry = &pod_entries[pod.index];
        for ip in pod.ips(pod_entries) {
            endpoint_map.insert(super::lpm::addr(*ip), EndpointInfo { id, flags });
        }
        for (d, direction) in Direction::BOTH.into_iter().enumerate() {
            for &i in &ep.selected_by[d] {
                let rules_of_policy = policies[i].1.rules(direction).unwrap_or_default();
                for (rule, &rule_id) in rules_of_policy.iter().zip(&rule_ids[i][d]) {
                    let ctx = RuleContext {
                        endpoint: id,
                        direction,
                        rule: rule_id,
                        pod: entry,
                        peers,
                        peer_identities: &peer_identities,
                        egress_named_ports: &egress_named_ports,
                        named_by_identity: &named_by_identity,
                    };
                    ctx.emit(rule, &mut policy);
                }
            }
        }
        local_pods.push(LocalPod {
            pod: pod.obj.clone(),
            endpoint_id: id,
            ips: pod.ips(pod_entries).to_vec(),
            host_interface: pod.host_interface.cloned(),
            ingress_policies: ep.selected_by[0]
                .iter()
                .map(|&i| policies[i].0.clone())
                .collect(),
            egress_policies: ep.selected_by[1]
                .iter()
                .map(|&i| policies[i].0.clone())
                .collect(),
        });
    }

    // Endpoints with rules for any peer get the second POLICY lookup; the others are
    // decided by one (a denied new flow costs one trie walk instead of two).
    let mut any_peer: BTreeMap<u32, u32> = BTreeMap::new();
    for key in policy.keys() {
        if key.data.identity == IDENTITY_ANY {
            *any_peer.entry(key.data.endpoint).or_default() |= match key.data.direction {
                netpol_common::DIR_INGRESS => netpol_common::ENDPOINT_INGRESS_ANY_PEER,
                _ => netpol_common::ENDPOINT_EGRESS_ANY_PEER,
            };
        }
    }
    for info in endpoint_map.values_mut() {
        info.flags |= any_peer.get(&info.id).copied().unwrap_or(0);
    }

    Compiled {
        endpoints: endpoint_map,
        ipcache,
        policy,
        local_pods,
        rules,
        identities,
        diagnostics,
        allocations,
    }
}

/// A live pod with an address, as peer and possibly as local endpoint.
struct PodView<'a> {
    obj: &'a ObjectRef,
    labels: &'a BTreeMap<String, String>,
    /// Index in the cache's pod entries (= in the state's pods).
    index: usize,
    /// The addresses this pod owns when another pod listed some of its addresses first;
    /// `None`: all of them.
    kept: Option<Vec<IpAddr>>,
    local: bool,
    host_interface: Option<&'a String>,
}

impl PodView<'_> {
    /// The pod's addresses (see `kept`).
    fn ips<'e>(&'e self, entries: &'e [PodEntry]) -> &'e [IpAddr] {
        self.kept.as_deref().unwrap_or(&entries[self.index].ips)
    }
}

/// A local endpoint: index into the pod list, policies selecting it per direction
/// (indices into the valid policy list; 0 ingress, 1 egress).
struct Endpoint {
    pod: usize,
    selected_by: [Vec<usize>; 2],
}

/// Whether the namespace opted into audit mode (annotation `netpol.dev/audit: "true"`).
fn audited_namespace(state: &ClusterState, namespace: &str) -> bool {
    state
        .namespaces
        .get(namespace)
        .and_then(|ns| ns.metadata.annotations.as_ref())
        .and_then(|annotations| annotations.get(crate::state::AUDIT_ANNOTATION))
        .is_some_and(|value| value == "true")
}

/// Labels of every namespace, with `kubernetes.io/metadata.name` as the API server sets it.
fn namespace_labels(state: &ClusterState) -> BTreeMap<String, BTreeMap<String, String>> {
    let mut out: BTreeMap<String, BTreeMap<String, String>> = BTreeMap::new();
    // Pods come sorted by namespace: look each of their namespaces up once.
    let mut pod_namespaces: Vec<&String> = state.pods.keys().map(|p| &p.namespace).collect();
    pod_namespaces.dedup();
    for name in state.namespaces.keys().chain(pod_namespaces) {
        if !out.contains_key(name) {
            out.insert(name.clone(), state.namespace_labels(name));
        }
    }
    out
}

/// Whether the pod takes part at all: not finished and not in the host's network.
pub(crate) fn is_live_pod_network(pod: &Pod) -> bool {
    let phase = pod.status.as_ref().and_then(|s| s.phase.as_deref());
    let host_network = pod
        .spec
        .as_ref()
        .and_then(|s| s.host_network)
        .unwrap_or(false);
    !matches!(phase, Some("Succeeded" | "Failed")) && !host_network
}

/// The live pods with an address, in state order; `entries` are the cache's pod entries
/// (one per pod of the state, same order). An address listed by an earlier pod is
/// reported and left out.
fn live_pods<'a>(
    state: &'a ClusterState,
    entries: &[PodEntry],
    diagnostics: &mut Vec<Diagnostic>,
) -> Vec<PodView<'a>> {
    let mut owner: FastMap<IpAddr, &ObjectRef> = FastMap::default();
    owner.reserve(entries.len() * 2);
    let mut out = Vec::with_capacity(entries.len());
    for (index, ((obj, pod), entry)) in state.pods.iter().zip(entries).enumerate() {
        if !is_live_pod_network(pod) {
            continue;
        }
        for (field, message) in &entry.ip_errors {
            diagnostics.push(Diagnostic {
                object: format!("Pod {obj}"),
                field: field.clone(),
                message: message.clone(),
            });
        }
        let mut ips = Cow::Borrowed(entry.ips.as_slice());
        let mut removed = 0;
        for (i, ip) in entry.ips.iter().enumerate() {
            match owner.entry(*ip) {
                Entry::Vacant(v) => {
                    v.insert(obj);
                }
                Entry::Occupied(other) => {
                    diagnostics.push(Diagnostic {
                        object: format!("Pod {obj}"),
                        field: "status.podIPs".into(),
                        message: format!(
                            "address {ip} is also used by Pod {}; ignored here",
                            other.get()
                        ),
                    });
                    ips.to_mut().remove(i - removed);
                    removed += 1;
                }
            }
        }
        if ips.is_empty() {
            continue;
        }
        out.push(PodView {
            obj,
            labels: pod.metadata.labels.as_ref().unwrap_or(&NO_LABELS),
            index,
            kept: match ips {
                Cow::Borrowed(_) => None,
                Cow::Owned(kept) => Some(kept),
            },
            local: state.node.is_local(pod),
            host_interface: pod
                .metadata
                .annotations
                .as_ref()
                .and_then(|a| a.get(HOST_INTERFACE_ANNOTATION)),
        });
    }
    out
}

/// What bringing a memo up to date needs: the peer slots, this compile's number and the
/// slots freed by it.
struct MemoContext<'a> {
    peers: &'a PeerSlots,
    now: u64,
    freed: &'a [usize],
}

impl MemoContext<'_> {
    /// Brings `memo` up to date: every allocated slot when it was not current, otherwise
    /// only those freed (cleared) or added by this compile. `matches` decides one slot.
    fn refresh(&self, memo: &mut Memo, full: bool, matches: impl Fn(&Peer) -> bool) {
        if full {
            memo.bits.clear();
            for (slot, s) in self.peers.allocated() {
                if matches(&s.peer) {
                    memo.bits.insert(slot);
                }
            }
        } else {
            for &slot in self.freed {
                memo.bits.remove(slot);
            }
            for (slot, s) in self.peers.added() {
                if matches(&s.peer) {
                    memo.bits.insert(slot);
                }
            }
        }
        memo.at = Some(self.now);
    }

    /// A pod's matches: selector peers from its labels and its namespace's (whose
    /// version is `version`), ipBlocks per address.
    fn refresh_pod(
        &self,
        entry: &mut PodEntry,
        namespace: &str,
        (labels, namespace_labels): (&BTreeMap<String, String>, &BTreeMap<String, String>),
        version: u64,
    ) {
        let current = entry.memo.current(self.now);
        let full = !current || entry.namespace_version != version;
        self.refresh(&mut entry.memo, full, |peer| match peer {
            Peer::Pods {
                namespaces,
                pods: selector,
            } => {
                let namespace_ok = match namespaces {
                    NamespaceMatch::Named(name) => name == namespace,
                    NamespaceMatch::Selector(s) => s.matches(namespace_labels),
                };
                namespace_ok && selector.matches(labels)
            }
            Peer::Block(_) => false,
        });
        entry.namespace_version = version;
        if !current {
            entry.ip_bits = vec![BitSet::default(); entry.ips.len()];
        }
        for (bits, &ip) in entry.ip_bits.iter_mut().zip(&entry.ips) {
            let mut memo = Memo {
                bits: std::mem::take(bits),
                at: None,
            };
            self.refresh(&mut memo, !current, |peer| match peer {
                Peer::Block(b) => b.contains_addr(ip),
                Peer::Pods { .. } => false,
            });
            *bits = memo.bits;
        }
    }

    /// The prefixes of the ipBlocks in force, each with the ipBlocks containing it
    /// wholly; keeps their memos for the next compile (and only theirs).
    fn refresh_prefixes(&self, memos: &mut HashMap<IpNet, Memo>) -> Vec<(IpNet, BitSet)> {
        let prefixes: BTreeSet<IpNet> = self
            .peers
            .active
            .iter()
            .filter_map(|slot| match &self.peers.slot(slot).peer {
                Peer::Block(b) => Some(b),
                Peer::Pods { .. } => None,
            })
            .flat_map(|b| std::iter::once(b.cidr).chain(b.except.iter().copied()))
            .collect();
        memos.retain(|prefix, _| prefixes.contains(prefix));
        prefixes
            .into_iter()
            .map(|prefix| {
                let memo = memos.entry(prefix).or_default();
                let full = !memo.current(self.now);
                self.refresh(memo, full, |peer| match peer {
                    Peer::Block(b) => b.contains_prefix(&prefix),
                    Peer::Pods { .. } => false,
                });
                (prefix, memo.bits.clone())
            })
            .collect()
    }
}

/// What makes an address class: the peers in force it matches (slots) and the egress
/// named ports it resolves (index in the list of those in force, port).
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
struct ClassKey {
    peers: BitSet,
    named_ports: Vec<(usize, u16)>,
}

struct Classes {
    /// The distinct classes that some key has.
    list: Vec<ClassKey>,
    /// Every IPCACHE key, sorted, with its class (index in `list`) and flags.
    keys: Vec<(Lpm<Addr>, usize, u32)>,
}

#[derive(Default)]
struct ClassTable {
    list: Vec<ClassKey>,
    index: FastMap<ClassKey, usize>,
}

impl ClassTable {
    fn intern_ref(&mut self, key: &ClassKey) -> usize {
        if let Some(&i) = self.index.get(key) {
            return i;
        }
        self.list.push(key.clone());
        self.index.insert(key.clone(), self.list.len() - 1);
        self.list.len() - 1
    }

    fn intern(&mut self, key: ClassKey) -> usize {
        self.intern_ref(&key)
    }
}

/// Classes of every pod address, node address and ipBlock prefix. Where keys coincide,
/// the pod's class wins over the node's, and the node's over the prefix's; node
/// addresses carry `PEER_HOST` whatever their class.
fn classify(
    state: &ClusterState,
    entries: &[PodEntry],
    pods: &[PodView<'_>],
    peers: &PeerSlots,
    prefixes: &[(IpNet, BitSet)],
    egress_named_ports: &[(&str, u8)],
) -> Classes {
    let active = &peers.active;
    let none = BitSet::default();
    let mut table = ClassTable::default();
    // (key, precedence, class, flags)
    let mut keys: Vec<(Lpm<Addr>, u8, usize, u32)> = Vec::with_capacity(entries.len() * 2);
    for pod in pods {
        let entry = &entries[pod.index];
        let named_ports: Vec<(usize, u16)> = egress_named_ports
            .iter()
            .enumerate()
            .filter_map(|(i, &(name, protocol))| {
                entry.named_port(name, protocol).map(|port| (i, port))
            })
            .collect();
        // The pod's class; an address inside some ipBlock in force adds to it.
        let pod_class = ClassKey {
            peers: entry.memo.bits.union_within(&none, active),
            named_ports,
        };
        // Interned only when some address has it: a class with no key is no identity.
        let mut pod_class_index = None;
        for &ip in pod.ips(entries) {
            let at = entry
                .ips
                .iter()
                .position(|&a| a == ip)
                .expect("own address");
            let blocks = entry.ip_bits[at].union_within(&none, active);
            let class = if blocks.is_empty() {
                *pod_class_index.get_or_insert_with(|| table.intern_ref(&pod_class))
            } else {
                table.intern_ref(&ClassKey {
                    peers: pod_class.peers.union_within(&blocks, active),
                    named_ports: pod_class.named_ports.clone(),
                })
            };
            keys.push((host_key(ip), 0, class, 0));
        }
    }
    for &ip in &state.node.ips {
        let mut bits = BitSet::default();
        for slot in active.iter() {
            if let Peer::Block(b) = &peers.slot(slot).peer
                && b.contains_addr(ip)
            {
                bits.insert(slot);
            }
        }
        let class = ClassKey {
            peers: bits,
            named_ports: vec![],
        };
        keys.push((host_key(ip), 1, table.intern(class), PEER_HOST));
    }
    for (prefix, bits) in prefixes {
        let class = ClassKey {
            peers: bits.union_within(&none, active),
            named_ports: vec![],
        };
        keys.push((net_key(prefix), 2, table.intern(class), 0));
    }
    keys.sort_unstable_by_key(|&(key, precedence, _, _)| (key, precedence));
    let mut merged: Vec<(Lpm<Addr>, usize, u32)> = Vec::with_capacity(keys.len());
    for (key, _, class, flags) in keys {
        match merged.last_mut() {
            Some(last) if last.0 == key => last.2 |= flags,
            _ => merged.push((key, class, flags)),
        }
    }
    // A class whose every key another took (a node address that is a pod's, a /32
    // ipBlock equal to an address) is no identity: keep only classes with keys.
    let mut renumber: Vec<Option<usize>> = vec![None; table.list.len()];
    let mut list = Vec::with_capacity(table.list.len());
    for (_, class, _) in &mut merged {
        *class = *renumber[*class].get_or_insert_with(|| {
            list.push(std::mem::take(&mut table.list[*class]));
            list.len() - 1
        });
    }
    Classes { list, keys: merged }
}

/// Everything needed to turn one rule into POLICY entries for one endpoint.
struct RuleContext<'a> {
    endpoint: u32,
    direction: Direction,
    rule: u32,
    /// The local pod.
    pod: &'a PodEntry,
    peers: &'a PeerSlots,
    /// Identities of the classes each peer slot matches.
    peer_identities: &'a HashMap<usize, BTreeSet<u32>>,
    /// Egress named ports in force, and how each identity resolves them.
    egress_named_ports: &'a [(&'a str, u8)],
    named_by_identity: &'a [BTreeMap<u32, u16>],
}

impl RuleContext<'_> {
    fn emit(&self, rule: &ParsedRule, out: &mut BTreeMap<Lpm<PolicyKey>, PolicyValue>) {
        let identities: BTreeSet<u32> = match &rule.peers {
            None => BTreeSet::from([IDENTITY_ANY]),
            Some(list) => list
                .iter()
                .flat_map(|p| {
                    let slot = self.peers.get(p);
                    self.peer_identities
                        .get(&slot)
                        .into_iter()
                        .flatten()
                        .copied()
                })
                .collect(),
        };
        let Some(ports) = &rule.ports else {
            for &identity in &identities {
                self.insert(out, identity, 0, 0, POLICY_PREFIX_ANY_PROTO);
            }
            return;
        };
        for spec in ports {
            match &spec.port {
                PortMatch::All => {
                    for &identity in &identities {
                        self.insert(out, identity, spec.protocol, 0, POLICY_PREFIX_ANY_PORT);
                    }
                }
                PortMatch::Range(lo, hi) => {
                    for block in port_prefixes(*lo, *hi) {
                        for &identity in &identities {
                            self.insert(
                                out,
                                identity,
                                spec.protocol,
                                block.value,
                                POLICY_PREFIX_ANY_PORT + block.bits,
                            );
                        }
                    }
                }
                PortMatch::Named(name) => match self.direction {
                    // Resolved on the destination: the local pod itself.
                    Direction::Ingress => {
                        if let Some(port) = self.pod.named_port(name, spec.protocol) {
                            for &identity in &identities {
                                self.insert(
                                    out,
                                    identity,
                                    spec.protocol,
                                    port,
                                    POLICY_PREFIX_ANY_PORT + 16,
                                );
                            }
                        }
                    }
                    // Resolved on the destination: each peer, through its identity.
                    Direction::Egress => {
                        let wanted = (name.as_str(), spec.protocol);
                        let resolved = self
                            .egress_named_ports
                            .iter()
                            .position(|&n| n == wanted)
                            .map(|i| &self.named_by_identity[i]);
                        for (&identity, &port) in resolved.into_iter().flatten() {
                            if identities.contains(&IDENTITY_ANY) || identities.contains(&identity)
                            {
                                self.insert(
                                    out,
                                    identity,
                                    spec.protocol,
                                    port,
                                    POLICY_PREFIX_ANY_PORT + 16,
                                );
                            }
                        }
                    }
                },
            }
        }
    }

    fn insert(
        &self,
        out: &mut BTreeMap<Lpm<PolicyKey>, PolicyValue>,
        identity: u32,
        protocol: u8,
        port: u16,
        prefix_len: u32,
    ) {
        let key = PolicyKey {
            endpoint: self.endpoint,
            identity,
            direction: self.direction.as_u8(),
            protocol,
            port: port.to_be_bytes(),
        };
        let value = out.entry(Lpm::new(prefix_len, key)).or_insert(PolicyValue {
            rule: self.rule,
            _pad: 0,
        });
        value.rule = value.rule.min(self.rule);
    }
}

#[cfg(test)]
mod tests;
