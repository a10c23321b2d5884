//! Memo of per-object compile work, kept across compiles.
//!
//! Every change is a full [`compile`](super::compile), but most of its inputs did not
//! change: parsing 2,000 policies, reading 10,000 pods (IP strings, named container
//! ports) and matching every pod against every peer in force would be repeated for one
//! flipped label. [`CompileCache`] keeps those results together with the inputs they
//! were computed from; each compile revalidates the entries against the state (an entry
//! whose inputs differ is recomputed) and brings the selector matches up to date:
//!
//! - a compile told which pods, policies and namespaces changed
//!   ([`Compiler::compile_changed`](super::Compiler::compile_changed),
//!   [`Changes`](crate::state::Changes)) visits only their entries; else it walks them all;
//! - a policy is reparsed when its name, namespace, spec or staged annotation changed
//!   (the same shared object, the common case, is known by its pointer); the entries'
//!   generation tells admission and the compile that none did, and they keep the
//!   policies in force and the rule table of the last compile;
//! - a pod is re-read when its labels, IP strings or declared ports changed, and
//!   [`PodCounts`] (addresses listed by several pods, pods per namespace) follow;
//! - a namespace's labels are compared when its object or its pods changed (in one
//!   ordered walk when the caller cannot say), and a pod's resolution of the egress
//!   named ports in force is redone only when that list changes;
//! - a pod's peer matches are recomputed when the pod or its namespace's labels changed,
//!   when it starts to hold addresses (those of pods holding none are not kept up to
//!   date), or when the pod was not classified by the previous compile; otherwise only
//!   peers that came into force since are matched against it. The same holds for ipBlock
//!   prefixes; the pods with an address in some ipBlock are listed ([`InBlocks`]).
//!
//! The cache never decides anything: a compile with it gives exactly the result of a
//! compile without it (`cache_never_changes_results` checks chains of random changes).
//! It lives in the [`Compiler`](super::Compiler) next to the allocations, owned by the
//! caller (the agent's loop, a benchmark); the cold [`compile`](super::compile) starts
//! from an empty one.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::hash::{BuildHasherDefault, Hasher};
use std::net::IpAddr;
use std::num::NonZeroU64;
use std::sync::Arc;

use ipnet::IpNet;

use super::policy::{FieldError, ParsedPolicy, Peer, parse_policy, protocol_number};
use crate::admission::PolicySync;
use crate::state::{
    ClusterState, DeclaredPort, Labels, NAMESPACE_NAME_LABEL, Name, NamespaceInfo, NodeContext,
    ObjectRef, PodInfo, Policy, holds_pod_addresses,
};

/// A fast, unkeyed hasher (FxHash) for maps keyed by addresses and peer-slot sets,
/// which no object author chooses freely; maps keyed by names keep the default.
#[derive(Clone, Copy, Default)]
pub(crate) struct FxHasher {
    hash: u64,
}

impl FxHasher {
    fn add(&mut self, word: u64) {
        self.hash = (self.hash.rotate_left(5) ^ word).wrapping_mul(0x51_7c_c1_b7_27_22_0a_95);
    }
}

impl Hasher for FxHasher {
    fn write(&mut self, bytes: &[u8]) {
        for chunk in bytes.chunks(8) {
            let mut word = [0u8; 8];
            word[..chunk.len()].copy_from_slice(chunk);
            self.add(u64::from_le_bytes(word));
        }
    }

    fn write_u8(&mut self, n: u8) {
        self.add(n.into());
    }

    fn write_u32(&mut self, n: u32) {
        self.add(n.into());
    }

    fn write_u64(&mut self, n: u64) {
        self.add(n);
    }

    fn write_usize(&mut self, n: usize) {
        self.add(n as u64);
    }

    /// Mixed (splitmix64's finaliser): the multiply-rotate steps leave the low bits,
    /// which pick the bucket, depending on the low input bits only.
    fn finish(&self) -> u64 {
        let mut z = self.hash;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
}

/// A `HashMap` with [`FxHasher`].
pub(crate) type FastMap<K, V> = HashMap<K, V, BuildHasherDefault<FxHasher>>;

/// How many pods list each address, IPv4 and IPv6 apart: an `IpAddr` with its count is
/// 24 bytes (17, padded), these are 8 and 20 (at 150,000 pods, ~3 MiB less).
#[derive(Clone, Debug, Default)]
struct AddressCounts {
    v4: FastMap<[u8; 4], u32>,
    v6: FastMap<[u8; 16], u32>,
}

impl AddressCounts {
    /// Counts one more pod listing `ip`; returns how many do.
    fn add(&mut self, ip: IpAddr) -> u32 {
        let count = match ip {
            IpAddr::V4(ip) => self.v4.entry(ip.octets()).or_default(),
            IpAddr::V6(ip) => self.v6.entry(ip.octets()).or_default(),
        };
        *count += 1;
        *count
    }

    /// Counts one pod less listing `ip` (forgotten when none does); returns how many
    /// do, `None` when it was not counted.
    fn remove(&mut self, ip: IpAddr) -> Option<u32> {
        fn less<K: Eq + std::hash::Hash>(map: &mut FastMap<K, u32>, key: K) -> Option<u32> {
            let count = map.get_mut(&key)?;
            *count -= 1;
            let left = *count;
            if left == 0 {
                map.remove(&key);
            }
            Some(left)
        }
        match ip {
            IpAddr::V4(ip) => less(&mut self.v4, ip.octets()),
            IpAddr::V6(ip) => less(&mut self.v6, ip.octets()),
        }
    }

    fn contains(&self, ip: IpAddr) -> bool {
        match ip {
            IpAddr::V4(ip) => self.v4.contains_key(&ip.octets()),
            IpAddr::V6(ip) => self.v6.contains_key(&ip.octets()),
        }
    }
}

/// A set of small integers (peer slots), as bits.
///
/// Kept trimmed (no trailing zero words), so equal sets are equal values and hash alike.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub(crate) struct BitSet {
    words: Vec<u64>,
}

impl BitSet {
    pub fn insert(&mut self, i: usize) {
        let word = i / 64;
        if word >= self.words.len() {
            self.words.resize(word + 1, 0);
        }
        self.words[word] |= 1 << (i % 64);
    }

    pub fn remove(&mut self, i: usize) {
        if let Some(w) = self.words.get_mut(i / 64) {
            *w &= !(1 << (i % 64));
            self.trim();
        }
    }

    pub fn contains(&self, i: usize) -> bool {
        self.words
            .get(i / 64)
            .is_some_and(|w| w & (1 << (i % 64)) != 0)
    }

    pub fn clear(&mut self) {
        self.words.clear();
    }

    pub fn is_empty(&self) -> bool {
        self.words.is_empty()
    }

    /// `(self ∪ extra) ∩ mask`.
    pub fn union_within(&self, extra: &BitSet, mask: &BitSet) -> BitSet {
        let mut out = BitSet::default();
        out.assign_union_within(self, extra, mask);
        out
    }

    /// `self = (a ∪ extra) ∩ mask`, reusing `self`'s storage.
    pub fn assign_union_within(&mut self, a: &BitSet, extra: &BitSet, mask: &BitSet) {
        let len = a.words.len().max(extra.words.len()).min(mask.words.len());
        let word = |v: &[u64], i: usize| v.get(i).copied().unwrap_or(0);
        self.words.clear();
        self.words
            .extend((0..len).map(|i| (word(&a.words, i) | word(&extra.words, i)) & mask.words[i]));
        self.trim();
    }

    /// The members, ascending.
    pub fn iter(&self) -> impl Iterator<Item = usize> + '_ {
        self.words.iter().enumerate().flat_map(|(w, &bits)| {
            let mut bits = bits;
            std::iter::from_fn(move || {
                (bits != 0).then(|| {
                    let i = bits.trailing_zeros() as usize;
                    bits &= bits - 1;
                    w * 64 + i
                })
            })
        })
    }

    fn trim(&mut self) {
        while self.words.last() == Some(&0) {
            self.words.pop();
        }
    }
}

/// A namespace's labels as selectors see them (with `kubernetes.io/metadata.name`), and
/// their version: it changes whenever the labels do.
pub(crate) struct NamespaceEntry {
    pub labels: BTreeMap<String, String>,
    pub version: u64,
}

/// Every namespace of the state and every namespace some pod lives in, by name.
pub(crate) type Namespaces = BTreeMap<String, NamespaceEntry>;

impl NamespaceEntry {
    /// The entry of namespace `name` as `state` has it, with the next of `versions`.
    fn new(versions: &mut u64, state: &ClusterState, name: &str) -> Self {
        *versions += 1;
        NamespaceEntry {
            labels: state.namespace_labels(name),
            version: *versions,
        }
    }
}

/// Kept with the pod entries, in step with them: how many pods holding addresses list
/// each address (so a compile knows without a pass over every pod whether any address
/// is listed by two), and how many pods each namespace has.
#[derive(Default)]
pub(crate) struct PodCounts {
    addresses: AddressCounts,
    /// Addresses listed by more than one pod.
    contested: usize,
    namespaces: BTreeMap<Name, usize>,
    /// The pods on this node.
    pub local: BTreeSet<ObjectRef>,
    /// The pods holding addresses that list some address that cannot be read.
    pub unreadable: BTreeSet<ObjectRef>,
}

impl PodCounts {
    fn add(&mut self, entry: &PodEntry) {
        match self.namespaces.get_mut(&entry.obj.namespace) {
            Some(count) => *count += 1,
            None => {
                self.namespaces.insert(entry.obj.namespace.clone(), 1);
            }
        }
        if entry.local {
            self.local.insert(entry.obj.clone());
        }
        if !entry.holds {
            return;
        }
        if entry.unreadable {
            self.unreadable.insert(entry.obj.clone());
        }
        for &ip in &entry.ips {
            if self.addresses.add(ip) == 2 {
                self.contested += 1;
            }
        }
    }

    fn remove(&mut self, entry: &PodEntry) {
        if let Some(count) = self.namespaces.get_mut(&entry.obj.namespace) {
            *count -= 1;
            if *count == 0 {
                self.namespaces.remove(&entry.obj.namespace);
            }
        }
        if entry.local {
            self.local.remove(&entry.obj);
        }
        if !entry.holds {
            return;
        }
        if entry.unreadable {
            self.unreadable.remove(&entry.obj);
        }
        for &ip in &entry.ips {
            match self.addresses.remove(ip) {
                None => debug_assert!(false, "{ip} was counted"),
                Some(1) => self.contested -= 1,
                Some(_) => {}
            }
        }
    }

    /// Every namespace with pods and how many it has, in order (the order of the pods).
    pub fn namespaces(&self) -> impl Iterator<Item = (&str, usize)> {
        self.namespaces
            .iter()
            .map(|(name, &count)| (name.as_str(), count))
    }

    /// Whether a pod holding addresses lists `ip`.
    pub fn lists(&self, ip: IpAddr) -> bool {
        self.addresses.contains(ip)
    }

    /// Whether some address is listed by more than one pod holding addresses.
    pub fn contested(&self) -> bool {
        self.contested > 0
    }
}

/// What one compile leaves for the next. See the module documentation.
#[derive(Default)]
pub(crate) struct CompileCache {
    /// Number of compiles run with this cache; memo entries record the compile that
    /// last brought them up to date.
    pub compiles: u64,
    /// One entry per policy of the last state, in state order.
    pub policies: Vec<PolicyEntry>,
    /// See [`CompileCache::sync_policies`] (0: never synced).
    policies_generation: u64,
    /// One entry per pod of the last state, in state order; each in its own allocation,
    /// so that inserting or removing one moves 8 bytes per entry after it, not 160 (a
    /// pod created or deleted among 150,000 moved 12 MiB on average).
    #[allow(clippy::vec_box)]
    pub pods: Vec<Box<PodEntry>>,
    /// The node whose pods the entries' `local` flags name (`None`: never synced).
    local_node: Option<Option<String>>,
    /// Counts over [`CompileCache::pods`].
    pub pod_counts: PodCounts,
    /// Namespace labels (with the implicit name label) and their version.
    pub namespaces: Namespaces,
    versions: u64,
    pub named_ports: NamedPortsInForce,
    pub peers: PeerSlots,
    /// ipBlock cidr and except prefixes: the block slots containing each.
    pub prefixes: HashMap<IpNet, Memo>,
    /// ClusterNetworkPolicies as read last time, by name, with the object they were
    /// read from: read again only when it changes.
    pub cluster_policies: HashMap<String, crate::compiler::ReadCnp>,
    /// The address classes handed out, and their epoch (see [`PodEntry::class`]).
    pub classes: crate::compiler::ClassTable,
    /// The identity signature of each class of the table, as last made.
    pub signatures: crate::compiler::Signatures,
    /// The order the IPCACHE keys were sorted into last time.
    pub key_order: crate::compiler::KeyOrder,
    /// The POLICY map of the last compile, by endpoint.
    pub kept_policy: crate::compiler::KeptPolicy,
    /// IPCACHE as the last compile made it.
    pub ipcache: crate::KeptMap<crate::Lpm<netpol_common::Addr>, netpol_common::PeerInfo>,
    /// The policies in force and the rule table of the last compile.
    pub policies_read: crate::compiler::PoliciesRead,
    /// What selected each local pod in the last compile.
    pub selection: crate::compiler::Selection,
    /// Whether the last compile found some address listed by two pods holding
    /// addresses (the first compile walks every pod anyway).
    pub contested: bool,
    /// The IPCACHE keys of the last compile, by class.
    pub keys: crate::compiler::KeptKeys,
    /// The pods this compile's sync named, and those of the namespaces whose labels it
    /// found changed, each with the addresses its entry listed before (none when it had
    /// no entry or held none).
    pub pods_before: Vec<(ObjectRef, Vec<IpAddr>)>,
    /// The pods whose entries hold ipBlock matches (`PodEntry::ip_bits` not empty).
    pub in_blocks: InBlocks,
}

/// The pods whose entries hold ipBlock matches, kept in step with the entries: so that an
/// ipBlock coming into force, going out of it or freed finds the pods with an address in
/// it without a pass over every pod's addresses (most hold none: a block is mostly
/// outside the cluster's pod range).
#[derive(Default)]
pub(crate) struct InBlocks(BTreeSet<ObjectRef>);

impl InBlocks {
    /// Follows `entry` after its ipBlock matches were made again; `had`: whether it held
    /// some before.
    pub fn follow(&mut self, entry: &PodEntry, had: bool) {
        match (had, !entry.ip_bits.is_empty()) {
            (false, true) => {
                self.0.insert(entry.obj.clone());
            }
            (true, false) => {
                self.0.remove(&entry.obj);
            }
            _ => {}
        }
    }

    /// Forgets `entry`, whose ipBlock matches go with it (the entry removed, or made
    /// anew).
    fn forget(&mut self, entry: &PodEntry) {
        if !entry.ip_bits.is_empty() {
            self.0.remove(&entry.obj);
        }
    }

    pub fn iter(&self) -> impl Iterator<Item = &ObjectRef> {
        self.0.iter()
    }
}

impl CompileCache {
    /// Starts a compile: returns its number.
    pub fn begin(&mut self) -> u64 {
        self.compiles += 1;
        self.peers.begin();
        self.pods_before.clear();
        self.compiles
    }

    /// Brings [`CompileCache::policies`] in line with `policies`, reparsing what changed,
    /// and returns their generation: a number that changes with every change of an entry
    /// (one added, reparsed or removed) and that no other cache of this process uses.
    ///
    /// `changed`, when the caller knows, names the policies added, updated or deleted
    /// since the last sync: only their entries are visited (the walk over every entry is
    /// the fallback when the entries no longer number the policies).
    pub fn sync_policies(
        &mut self,
        policies: &BTreeMap<ObjectRef, Policy>,
        changed: Option<&BTreeSet<ObjectRef>>,
    ) -> PolicySync {
        let before = self.policies_generation;
        let (entries_changed, told) = match changed {
            Some(changed) => self.sync_changed_policies(policies, changed),
            None => (self.sync_policy_entries(policies), false),
        };
        debug_assert!(
            self.policies.iter().map(|e| &e.obj).eq(policies.keys()),
            "the policy entries follow the state"
        );
        if entries_changed || self.policies_generation == 0 {
            static GENERATIONS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
            self.policies_generation =
                GENERATIONS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        PolicySync {
            before,
            generation: self.policies_generation,
            told,
        }
    }

    /// Returns whether any entry changed.
    fn sync_policy_entries(&mut self, policies: &BTreeMap<ObjectRef, Policy>) -> bool {
        let before = self.policies.len();
        let mut old = std::mem::take(&mut self.policies).into_iter().peekable();
        let mut changed = false;
        for (obj, np) in policies {
            let entry = match next_entry(&mut old, |e| e.obj.cmp(obj)) {
                Some(e) if e.matches(np) => e,
                _ => {
                    changed = true;
                    PolicyEntry::new(obj, np)
                }
            };
            self.policies.push(entry);
        }
        // Every entry kept is a distinct old one: with none new, as many means none gone.
        changed || self.policies.len() != before
    }

    /// Visits the entries of `changed` only (found by binary search); returns whether any
    /// entry changed, and whether only those of `changed` may have (no walk over every
    /// entry was needed).
    fn sync_changed_policies(
        &mut self,
        policies: &BTreeMap<ObjectRef, Policy>,
        changed: &BTreeSet<ObjectRef>,
    ) -> (bool, bool) {
        let mut any = false;
        for obj in changed {
            let at = self.policies.binary_search_by(|e| e.obj.cmp(obj));
            match (policies.get(obj), at) {
                (Some(np), Ok(i)) if self.policies[i].matches(np) => {}
                (Some(np), Ok(i)) => self.policies[i] = PolicyEntry::new(obj, np),
                (Some(np), Err(i)) => self.policies.insert(i, PolicyEntry::new(obj, np)),
                (None, Ok(i)) => drop(self.policies.remove(i)),
                (None, Err(_)) => continue,
            }
            any = true;
        }
        if self.policies.len() != policies.len() {
            any |= self.sync_policy_entries(policies);
            return (any, false);
        }
        (any, true)
    }

    /// Brings [`CompileCache::pods`] in line with `pods`, re-reading what changed: the
    /// pods of `changed` when the caller knows which changed since the last sync (the
    /// others' entries are kept unread and unvisited), else every pod, compared with its
    /// entry. Returns whether only the pods of `changed` were visited (`false` after a
    /// walk over every pod, which may have found changes elsewhere).
    ///
    /// Every entry also says whether its pod runs on `node`: all of them are looked at
    /// when the node's name is not the one of the last sync.
    pub fn sync_pods(
        &mut self,
        pods: &BTreeMap<ObjectRef, PodInfo>,
        changed: Option<&BTreeSet<ObjectRef>>,
        node: &NodeContext,
    ) -> bool {
        let same_node = self.local_node.as_ref() == Some(&node.name);
        let named_only = match changed.filter(|_| same_node) {
            Some(changed) => self.sync_changed_pods(pods, changed, node),
            None => {
                self.sync_every_pod(pods, node);
                self.local_node = Some(node.name.clone());
                false
            }
        };
        debug_assert!(
            self.pods.iter().map(|e| &e.obj).eq(pods.keys()),
            "the pod entries follow the state"
        );
        named_only
    }

    fn sync_every_pod(&mut self, pods: &BTreeMap<ObjectRef, PodInfo>, node: &NodeContext) {
        let mut old = std::mem::take(&mut self.pods).into_iter().peekable();
        self.pods = crate::sparing::with_room(pods.len());
        self.pod_counts = PodCounts::default();
        self.in_blocks = InBlocks::default();
        for (obj, pod) in pods {
            let entry = match next_entry(&mut old, |e| e.obj.cmp(obj)) {
                Some(mut e) if e.matches(pod) => {
                    e.read_placement(pod, node);
                    e
                }
                _ => Box::new(PodEntry::new(obj, pod, node)),
            };
            self.pod_counts.add(&entry);
            self.in_blocks.follow(&entry, false);
            self.pods.push(entry);
        }
    }

    /// Visits the entries of `changed` only (found by binary search); falls back to
    /// [`CompileCache::sync_every_pod`] when the entries no longer number the pods (a
    /// caller that left an added or deleted pod out); returns `false` then.
    fn sync_changed_pods(
        &mut self,
        pods: &BTreeMap<ObjectRef, PodInfo>,
        changed: &BTreeSet<ObjectRef>,
        node: &NodeContext,
    ) -> bool {
        for obj in changed {
            let at = self.pods.binary_search_by(|e| e.obj.cmp(obj));
            let before = at.map_or_else(|_| Vec::new(), |i| self.pods[i].held_ips());
            self.pods_before.push((obj.clone(), before));
            // The state's key, not the caller's copy of it: an entry shares the names.
            match (pods.get_key_value(obj), at) {
                (Some((obj, pod)), Ok(i)) => {
                    let entry = &mut self.pods[i];
                    self.pod_counts.remove(entry);
                    if entry.matches(pod) {
                        entry.read_placement(pod, node);
                    } else {
                        self.in_blocks.forget(entry);
                        **entry = PodEntry::new(obj, pod, node);
                    }
                    self.pod_counts.add(entry);
                }
                (Some((obj, pod)), Err(i)) => {
                    let entry = Box::new(PodEntry::new(obj, pod, node));
                    self.pod_counts.add(&entry);
                    crate::sparing::insert(&mut self.pods, i, entry);
                }
                (None, Ok(i)) => {
                    let entry = crate::sparing::remove(&mut self.pods, i);
                    self.pod_counts.remove(&entry);
                    self.in_blocks.forget(&entry);
                }
                (None, Err(_)) => {}
            }
        }
        if self.pods.len() != pods.len() {
            self.sync_every_pod(pods, node);
            return false;
        }
        true
    }

    /// Brings [`CompileCache::namespaces`] in line with `state`: every namespace object
    /// and every namespace with pods, with the labels selectors see. A namespace whose
    /// labels changed gets a new version. `named`, when the caller knows, names every
    /// namespace whose object or pods may have changed since the last sync: only those
    /// are looked at. Else one ordered walk, no lookup by name.
    ///
    /// The pods of a namespace whose labels changed join [`CompileCache::pods_before`]
    /// (with the addresses they list) when it names the namespace; `false` when some
    /// namespace's labels changed and the walk did not say which.
    pub fn sync_namespaces(
        &mut self,
        state: &ClusterState,
        named: Option<&BTreeSet<&str>>,
    ) -> bool {
        if let Some(named) = named {
            for &name in named {
                if self.sync_namespace(state, name) {
                    self.note_pods_of(name);
                }
            }
            debug_assert!(
                self.namespaces
                    .keys()
                    .eq(namespace_names(state, &self.pod_counts).map(|(name, _)| name)),
                "the namespace entries follow the state"
            );
            return true;
        }
        // The common case, nothing changed, is known by one walk that copies nothing.
        let mut known = self.namespaces.iter();
        let unchanged = namespace_names(state, &self.pod_counts).all(|(name, object)| {
            known.next().is_some_and(|(known, entry)| {
                known == name && same_namespace_labels(&entry.labels, labels_of(object), name)
            })
        }) && known.next().is_none();
        if unchanged {
            return true;
        }
        let mut old = std::mem::take(&mut self.namespaces).into_iter().peekable();
        let mut namespaces = Vec::with_capacity(state.namespaces.len());
        for (name, object) in namespace_names(state, &self.pod_counts) {
            let entry = match next_entry(&mut old, |(known, _): &(String, NamespaceEntry)| {
                known.as_str().cmp(name)
            }) {
                Some((_, entry))
                    if same_namespace_labels(&entry.labels, labels_of(object), name) =>
                {
                    entry
                }
                _ => NamespaceEntry::new(&mut self.versions, state, name),
            };
            namespaces.push((name.to_owned(), entry));
        }
        self.namespaces = namespaces.into_iter().collect();
        false
    }

    /// The entry of one namespace, as [`CompileCache::sync_namespaces`]' walk makes it;
    /// whether its labels changed (a namespace with no pods left that goes needs none).
    fn sync_namespace(&mut self, state: &ClusterState, name: &str) -> bool {
        let object = state.namespaces.get(name);
        if object.is_none() && !self.pod_counts.namespaces.contains_key(name) {
            self.namespaces.remove(name);
            return false;
        }
        let kept = self
            .namespaces
            .get(name)
            .is_some_and(|entry| same_namespace_labels(&entry.labels, labels_of(object), name));
        if !kept {
            let entry = NamespaceEntry::new(&mut self.versions, state, name);
            self.namespaces.insert(name.to_owned(), entry);
        }
        !kept
    }

    /// Adds the pods of namespace `name` that [`CompileCache::pods_before`] does not name
    /// yet, with the addresses they list (their entries are those of the last compile).
    fn note_pods_of(&mut self, name: &str) {
        let named: BTreeSet<&ObjectRef> = self.pods_before.iter().map(|(obj, _)| obj).collect();
        let added: Vec<(ObjectRef, Vec<IpAddr>)> = pods_in_namespace(&self.pods, name)
            .iter()
            .filter(|e| !named.contains(&e.obj))
            .map(|e| (e.obj.clone(), e.held_ips()))
            .collect();
        self.pods_before.extend(added);
    }
}

/// The entries (in state order) of the pods of namespace `name`.
pub(crate) fn pods_in_namespace<'e>(
    entries: &'e [Box<PodEntry>],
    name: &str,
) -> &'e [Box<PodEntry>] {
    let start = entries.partition_point(|e| e.obj.namespace.as_str() < name);
    let end = start + entries[start..].partition_point(|e| e.obj.namespace == name);
    &entries[start..end]
}

/// Every namespace of `state` and every namespace some pod lives in, in name order, with
/// its object if the state has one.
fn namespace_names<'a>(
    state: &'a ClusterState,
    counts: &'a PodCounts,
) -> impl Iterator<Item = (&'a str, Option<&'a NamespaceInfo>)> {
    let mut objects = state
        .namespaces
        .iter()
        .map(|(name, ns)| (name.as_str(), ns))
        .peekable();
    let mut with_pods = counts.namespaces.keys().map(Name::as_str).peekable();
    std::iter::from_fn(move || match (objects.peek(), with_pods.peek()) {
        (Some((a, _)), Some(b)) if *a == *b => {
            with_pods.next();
            objects.next().map(|(name, ns)| (name, Some(ns)))
        }
        (Some((a, _)), Some(b)) if a > b => with_pods.next().map(|name| (name, None)),
        (Some(_), _) => objects.next().map(|(name, ns)| (name, Some(ns))),
        (None, _) => with_pods.next().map(|name| (name, None)),
    })
}

fn labels_of(object: Option<&NamespaceInfo>) -> Option<&Labels> {
    object.map(NamespaceInfo::labels)
}

/// Whether `cached` holds the labels selectors see on namespace `name` whose object has
/// `labels`: those, and the name label unless they set it.
fn same_namespace_labels(
    cached: &BTreeMap<String, String>,
    labels: Option<&Labels>,
    name: &str,
) -> bool {
    let own_name = labels.is_some_and(|l| l.contains_key(NAMESPACE_NAME_LABEL));
    if !own_name && cached.get(NAMESPACE_NAME_LABEL).map(String::as_str) != Some(name) {
        return false;
    }
    let cached = cached
        .iter()
        .filter(|(key, _)| own_name || key.as_str() != NAMESPACE_NAME_LABEL)
        .map(|(key, value)| (key.as_str(), value.as_str()));
    cached.eq(labels.into_iter().flat_map(Labels::iter))
}

/// The egress named ports in force in the last compile, and their version: pod entries
/// keep their resolution of them with the version it was made for.
#[derive(Default)]
pub(crate) struct NamedPortsInForce {
    list: Vec<(String, u8)>,
    version: u64,
}

impl NamedPortsInForce {
    /// The version of the list the last [`NamedPortsInForce::sync`] left.
    pub fn version(&self) -> u64 {
        self.version
    }

    /// Records the egress named ports in force; returns their version, which changes
    /// whenever the list does (never 0, the version of no resolution).
    pub fn sync(&mut self, in_force: &[(&str, u8)]) -> u64 {
        let known = self
            .list
            .iter()
            .map(|(name, protocol)| (name.as_str(), *protocol));
        if !known.eq(in_force.iter().copied()) || self.version == 0 {
            self.list = in_force
                .iter()
                .map(|&(name, protocol)| (name.to_owned(), protocol))
                .collect();
            self.version += 1;
        }
        self.version
    }
}

/// In a merge of sorted lists: drops the old entries ordered before the wanted key
/// (`order` compares an entry with it) and takes the one equal to it, if any.
pub(crate) fn next_entry<T>(
    old: &mut std::iter::Peekable<impl Iterator<Item = T>>,
    order: impl Fn(&T) -> std::cmp::Ordering,
) -> Option<T> {
    loop {
        match order(old.peek()?) {
            std::cmp::Ordering::Less => {
                old.next();
            }
            std::cmp::Ordering::Equal => return old.next(),
            std::cmp::Ordering::Greater => return None,
        }
    }
}

/// A policy and what could be read of it ([`Reading`](crate::policy::Reading)).
pub(crate) struct PolicyEntry {
    pub obj: ObjectRef,
    /// The policy as parsed.
    pub policy: Policy,
    /// `None` when nothing of it can be enforced (no name or namespace).
    pub parsed: Option<Arc<ParsedPolicy>>,
    /// Every field that cannot be read, and what that costs.
    pub errors: Vec<FieldError>,
    pub consequences: Vec<FieldError>,
}

impl PolicyEntry {
    pub(crate) fn new(obj: &ObjectRef, np: &Policy) -> Self {
        let reading = parse_policy(&np.object());
        PolicyEntry {
            obj: obj.clone(),
            policy: np.clone(),
            parsed: reading.parsed.map(Arc::new),
            errors: reading.errors,
            consequences: reading.consequences,
        }
    }

    /// Whether `np` is what the entry was read from: the same policy (a source that
    /// kept it), or an equal one.
    fn matches(&self, np: &Policy) -> bool {
        self.policy.same(np) || self.policy == *np
    }
}

/// A named container port: the first definition of each (name, protocol) wins.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) struct NamedPort<'a> {
    pub name: &'a str,
    pub protocol: u8,
    pub port: u16,
}

/// A pod's parsed addresses, de-duplicated, in order: one (most pods) kept in place,
/// more (dual-stack pods) in a box of their own. At 150,000 pods, ~4 MiB less than a box
/// each.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Ips {
    One(IpAddr),
    Many(Box<[IpAddr]>),
}

impl std::ops::Deref for Ips {
    type Target = [IpAddr];

    fn deref(&self) -> &[IpAddr] {
        match self {
            Ips::One(ip) => std::slice::from_ref(ip),
            Ips::Many(ips) => ips,
        }
    }
}

impl<'a> IntoIterator for &'a Ips {
    type Item = &'a IpAddr;
    type IntoIter = std::slice::Iter<'a, IpAddr>;

    fn into_iter(self) -> Self::IntoIter {
        self.iter()
    }
}

impl From<Vec<IpAddr>> for Ips {
    fn from(ips: Vec<IpAddr>) -> Ips {
        match ips[..] {
            [ip] => Ips::One(ip),
            _ => Ips::Many(ips.into()),
        }
    }
}

/// One address a pod lists, as read.
enum Address {
    Parsed(IpAddr),
    /// (field, message).
    Invalid((String, String)),
}

/// The addresses of `status.podIPs`, then `status.podIP`, as read.
fn read_addresses(pod: &PodInfo) -> impl Iterator<Item = Address> + '_ {
    let listed = pod.listed_ips().len();
    let texts = pod.listed_ips().chain(pod.pod_ip());
    texts
        .enumerate()
        .map(move |(i, text)| match text.parse::<IpAddr>() {
            Ok(ip) => Address::Parsed(ip),
            Err(_) => {
                let field = if i < listed {
                    format!("status.podIPs[{i}].ip")
                } else {
                    "status.podIP".to_string()
                };
                Address::Invalid((field, format!("invalid IP address {text:?}")))
            }
        })
}

/// What the compiler reads from a pod besides phase, hostNetwork, node and annotations
/// (cheap, read from the state each time), what it derives from it, and its peer matches.
pub(crate) struct PodEntry {
    pub obj: ObjectRef,
    /// The pod as last read (the state's own shared value): its labels, declared ports
    /// and the addresses that cannot be read are read from it.
    pod: PodInfo,
    /// Parsed addresses, de-duplicated, in order.
    pub ips: Ips,
    /// Whether some address the pod lists cannot be read ([`PodEntry::ip_errors`]).
    pub unreadable: bool,
    /// Peer matches, valid when `memo.at` is the previous compile or this one: pod
    /// selector peers in `memo.bits`; ipBlocks containing each of `ips` in `ip_bits` (empty
    /// when none contains any of them).
    pub memo: Memo,
    pub ip_bits: Box<[BitSet]>,
    /// Namespace label version `memo.bits` was computed with.
    pub namespace_version: u64,
    /// Whether the pod holds its addresses ([`holds_pod_addresses`]): counted in
    /// [`PodCounts`].
    pub holds: bool,
    /// Whether the pod runs on the compile's node ([`NodeContext::is_local`]).
    pub local: bool,
    /// How the pod resolves the egress named ports in force (index in their list, port),
    /// and the version of that list it was resolved for.
    resolved: (u64, Box<[(usize, u16)]>),
    /// The pod's class (the class table's epoch, from 1, and its index in the table),
    /// when its addresses are in no ipBlock in force (`classify.rs`); forgotten when what
    /// it is made of changes (its peer matches, its named port resolutions).
    pub class: Option<(NonZeroU64, u32)>,
}

impl PodEntry {
    /// Reads again what the entry says of the pod beyond its labels, addresses and ports
    /// (which [`PodEntry::matches`] compares): whether it holds its addresses, and
    /// whether it runs on `node`.
    fn read_placement(&mut self, pod: &PodInfo, node: &NodeContext) {
        // The state's value now (equal in what `matches` compares): the one it replaced
        // is not kept alive here.
        self.pod = pod.clone();
        let holds = holds_pod_addresses(pod);
        if holds && !self.holds {
            // Peer matches are kept up to date for pods holding addresses only (no
            // other is classified): one that starts to hold them is matched afresh.
            self.memo.at = None;
        }
        self.holds = holds;
        self.local = node.is_local(pod);
    }

    fn new(obj: &ObjectRef, pod: &PodInfo, node: &NodeContext) -> Self {
        let mut ips = Vec::new();
        let mut unreadable = false;
        for address in read_addresses(pod) {
            match address {
                Address::Parsed(ip) if !ips.contains(&ip) => ips.push(ip),
                Address::Parsed(_) => {}
                Address::Invalid(_) => unreadable = true,
            }
        }
        PodEntry {
            obj: obj.clone(),
            pod: pod.clone(),
            ips: ips.into(),
            unreadable,
            memo: Memo::default(),
            ip_bits: Box::default(),
            namespace_version: 0,
            holds: holds_pod_addresses(pod),
            local: node.is_local(pod),
            resolved: (0, Box::default()),
            class: None,
        }
    }

    /// Whether `pod` holds what the entry was read from: the same labels and ports, and
    /// addresses that read the same (compared as they are read, without allocating but
    /// for the messages of those that cannot be read).
    fn matches(&self, pod: &PodInfo) -> bool {
        // Both shared: equal pointers are equal values without a look inside.
        if self.pod.labels() != pod.labels() || self.pod.shared_ports() != pod.shared_ports() {
            return false;
        }
        // What cannot be read is read from the pod kept (the one given, once kept):
        // whether there is some is all the entry says of it.
        let (mut ips, mut unreadable) = (0, false);
        for address in read_addresses(pod) {
            match address {
                Address::Parsed(ip) if self.ips[..ips].contains(&ip) => {}
                Address::Parsed(ip) if self.ips.get(ips) == Some(&ip) => ips += 1,
                Address::Parsed(_) => return false,
                Address::Invalid(_) => unreadable = true,
            }
        }
        ips == self.ips.len() && unreadable == self.unreadable
    }

    /// (field, message) of every address the pod lists that cannot be read, in order:
    /// read again from the pod (few pods have any, and only diagnostics read them).
    pub fn ip_errors(&self) -> impl Iterator<Item = (String, String)> + '_ {
        let unreadable = self
            .unreadable
            .then(|| read_addresses(&self.pod))
            .into_iter();
        unreadable.flatten().filter_map(|address| match address {
            Address::Parsed(_) => None,
            Address::Invalid(error) => Some(error),
        })
    }

    /// The port a named port resolves to on this pod: the first declared port of that
    /// name and protocol with a number (`FindPort`'s order).
    pub fn named_port(&self, name: &str, protocol: u8) -> Option<u16> {
        self.named_ports()
            .find(|n| n.name == name && n.protocol == protocol)
            .map(|n| n.port)
    }

    /// The labels the entry was read with (the pod's).
    pub fn labels(&self) -> &Labels {
        self.pod.labels()
    }

    /// The addresses the pod lists when it holds addresses (none when it does not).
    pub fn held_ips(&self) -> Vec<IpAddr> {
        if self.holds {
            self.ips.to_vec()
        } else {
            Vec::new()
        }
    }

    /// The ports the pod declares (the state's shared list).
    pub fn ports(&self) -> &Arc<[DeclaredPort]> {
        self.pod.shared_ports()
    }

    /// The named ports the pod declares, the first definition of each (name, protocol).
    pub fn named_ports(&self) -> impl Iterator<Item = NamedPort<'_>> {
        let mut seen: Vec<(&str, u8)> = Vec::new();
        self.ports().iter().filter_map(move |declared| {
            let name = declared.name.as_deref()?;
            let protocol = protocol_number(declared.protocol.as_deref().unwrap_or("TCP"))?;
            let port = u16::try_from(declared.container_port).ok()?;
            if port == 0 || seen.contains(&(name, protocol)) {
                return None;
            }
            seen.push((name, protocol));
            Some(NamedPort {
                name,
                protocol,
                port,
            })
        })
    }

    /// Resolves the egress named ports in force (`in_force`, whose version from
    /// [`NamedPortsInForce::sync`] is `version`), unless already done for them; a
    /// resolution that differs from the last one forgets the pod's class.
    pub fn resolve_named_ports(&mut self, in_force: &[(&str, u8)], version: u64) {
        if self.resolved.0 == version {
            return;
        }
        let resolved: Box<[(usize, u16)]> = if self.ports().is_empty() {
            Box::default()
        } else {
            in_force
                .iter()
                .enumerate()
                .filter_map(|(i, &(name, protocol))| {
                    self.named_port(name, protocol).map(|port| (i, port))
                })
                .collect()
        };
        if resolved != self.resolved.1 {
            self.class = None;
        }
        self.resolved = (version, resolved);
    }

    /// The egress named ports in force this pod resolves, as of the last
    /// [`PodEntry::resolve_named_ports`]: (index in their list, port).
    pub fn resolved_named_ports(&self) -> &[(usize, u16)] {
        &self.resolved.1
    }
}

/// Matched peer slots of one pod or prefix, and the compile they are valid for (compiles
/// are numbered from 1, [`CompileCache::begin`]).
#[derive(Clone, Debug, Default)]
pub(crate) struct Memo {
    pub bits: BitSet,
    pub at: Option<NonZeroU64>,
}

impl Memo {
    /// Whether the bits are up to date with the slots as the last compile left them:
    /// brought up to date since the last compile that allocated or freed slots
    /// (`last_moved`, [`PeerSlots::last_moved`]).
    pub fn current(&self, last_moved: u64) -> bool {
        self.at.is_some_and(|at| at.get() >= last_moved)
    }
}

/// Slots of peers out of force are kept (so a peer that comes back is not matched
/// against every pod again) until they outnumber those in force and this many. Tests
/// collect eagerly, to exercise the path.
const IDLE_SLOTS_KEPT: usize = if cfg!(test) { 1 } else { 64 };

/// One peer in force, or recently in force.
pub(crate) struct Slot {
    pub peer: Peer,
    /// [`Peer::canonical`], rendered once.
    pub canonical: String,
}

/// Stable small numbers for peers, so matches can be kept as bits across compiles.
#[derive(Default)]
pub(crate) struct PeerSlots {
    index: HashMap<Peer, usize>,
    slots: Vec<Option<Slot>>,
    free: BTreeSet<usize>,
    /// Slots allocated by this compile: to be matched against entries that are
    /// otherwise up to date.
    pub added: Vec<usize>,
    /// The last compile that allocated or freed slots (0: none).
    pub last_moved: u64,
    /// Slots of the peers in force in this compile.
    pub active: BitSet,
}

impl PeerSlots {
    fn begin(&mut self) {
        self.added.clear();
        self.active.clear();
    }

    /// The slot of `peer`, allocated if needed, and marked in force.
    pub fn intern(&mut self, peer: &Peer) -> usize {
        let slot = match self.index.get(peer) {
            Some(&slot) => slot,
            None => {
                let slot = self.free.pop_first().unwrap_or(self.slots.len());
                let entry = Slot {
                    peer: peer.clone(),
                    canonical: peer.canonical(),
                };
                if slot == self.slots.len() {
                    self.slots.push(Some(entry));
                } else {
                    self.slots[slot] = Some(entry);
                }
                self.index.insert(peer.clone(), slot);
                self.added.push(slot);
                slot
            }
        };
        self.active.insert(slot);
        slot
    }

    /// The slot of a peer interned by this compile.
    pub fn get(&self, peer: &Peer) -> usize {
        self.index[peer]
    }

    pub fn slot(&self, slot: usize) -> &Slot {
        self.slots[slot].as_ref().expect("allocated slot")
    }

    /// Every allocated slot (in force or not).
    pub fn allocated(&self) -> impl Iterator<Item = (usize, &Slot)> {
        self.slots
            .iter()
            .enumerate()
            .filter_map(|(i, s)| s.as_ref().map(|s| (i, s)))
    }

    /// Slots allocated by this compile.
    pub fn added(&self) -> impl Iterator<Item = (usize, &Slot)> {
        self.added.iter().map(|&i| (i, self.slot(i)))
    }

    /// Frees the slots of peers no longer in force once they outnumber those in force
    /// (and [`IDLE_SLOTS_KEPT`]); returns them with their peers, for the caller to clear
    /// in up-to-date memos.
    pub fn collect_garbage(&mut self) -> Vec<(usize, Peer)> {
        let allocated = self.index.len();
        let active = self.active.iter().count();
        if allocated - active <= active.max(IDLE_SLOTS_KEPT) {
            return Vec::new();
        }
        let idle: Vec<usize> = self
            .allocated()
            .map(|(i, _)| i)
            .filter(|&i| !self.active.contains(i))
            .collect();
        let mut freed = Vec::with_capacity(idle.len());
        for i in idle {
            if let Some(slot) = self.slots[i].take() {
                self.index.remove(&slot.peer);
                freed.push((i, slot.peer));
            }
            self.free.insert(i);
        }
        freed
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pod_entry_stays_small_at_150000_of_them_it_is_most_of_the_compilers_memory() {
        // Each field that holds a list is a boxed slice (no room to spare), not a `Vec`;
        // the labels, ports and unreadable addresses are read from the pod it keeps. An
        // entry is allocated on its own (so a pod created or deleted moves pointers, not
        // entries): 160 bytes is the allocator's size class it fills, the next is 192.
        let size = std::mem::size_of::<PodEntry>();
        assert!(size <= 160, "a PodEntry is {size} bytes");
        // One address in place, no allocation of its own.
        assert_eq!(std::mem::size_of::<Ips>(), 24);
        let one = Ips::from(vec![IpAddr::from([10, 0, 0, 1])]);
        assert!(matches!(one, Ips::One(_)) && one.len() == 1);
    }

    #[test]
    fn a_pod_whose_unreadable_address_goes_is_no_longer_counted_unreadable() {
        let pod = |ips: &[&str]| {
            let mut p = crate::testutil::pod("x", "a", &[], &["10.0.0.1"], &[]);
            let listed = p.status.as_mut().unwrap().pod_ips.as_mut().unwrap();
            listed.extend(
                ips.iter()
                    .map(|ip| k8s_openapi::api::core::v1::PodIP { ip: ip.to_string() }),
            );
            let pods: BTreeMap<ObjectRef, PodInfo> =
                [(ObjectRef::new("x", "a"), PodInfo::of(&p))].into();
            pods
        };
        let named: BTreeSet<ObjectRef> = [ObjectRef::new("x", "a")].into();
        let node = NodeContext::default();
        let messages = |cache: &CompileCache| -> Vec<String> {
            let errors = cache.pods[0].ip_errors();
            errors.map(|(_, message)| message).collect()
        };
        let mut cache = CompileCache::default();
        cache.sync_pods(&pod(&["bad"]), None, &node);
        assert_eq!(cache.pod_counts.unreadable.len(), 1);
        assert_eq!(messages(&cache), ["invalid IP address \"bad\""]);
        // The same readable addresses: only what cannot be read went.
        cache.sync_pods(&pod(&[]), Some(&named), &node);
        assert!(cache.pod_counts.unreadable.is_empty());
        assert!(messages(&cache).is_empty());
        cache.sync_pods(&pod(&["worse"]), Some(&named), &node);
        assert_eq!(messages(&cache), ["invalid IP address \"worse\""]);
        // Still unreadable, written otherwise: the entry stays, and reads the pod now.
        cache.sync_pods(&pod(&["other"]), Some(&named), &node);
        assert_eq!(messages(&cache), ["invalid IP address \"other\""]);
    }

    #[test]
    fn bitset_basics() {
        let mut a = BitSet::default();
        for i in [0, 3, 64, 130] {
            a.insert(i);
        }
        assert_eq!(a.iter().collect::<Vec<_>>(), [0, 3, 64, 130]);
        assert!(a.contains(64) && !a.contains(65) && !a.contains(1000));
        a.remove(130);
        a.remove(64);
        let mut b = BitSet::default();
        b.insert(3);
        b.insert(0);
        assert_eq!(a, b, "trimmed after removals");
        let mut mask = BitSet::default();
        mask.insert(3);
        mask.insert(200);
        let mut extra = BitSet::default();
        extra.insert(200);
        extra.insert(7);
        assert_eq!(
            a.union_within(&extra, &mask).iter().collect::<Vec<_>>(),
            [3, 200]
        );
        assert!(a.union_within(&extra, &BitSet::default()).is_empty());
    }
}
