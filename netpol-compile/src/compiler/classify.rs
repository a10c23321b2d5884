//! Step 4b of the compile: every IPCACHE key (pod addresses, node addresses, Service
//! addresses and ranges, ipBlock prefixes) sorted into classes of addresses that every
//! peer in force treats alike.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::num::NonZeroU64;

use ipnet::IpNet;
use netpol_common::{Addr, PEER_HOST, PEER_SERVICE};

use super::pods::{PodView, live_pods};
use crate::cache::{BitSet, FastMap, PeerSlots, PodCounts, PodEntry};
use crate::lpm::{Lpm, host_key, key_net, net_key};
use crate::policy::Peer;
use crate::services::Frontends;
use crate::state::{ClusterState, ObjectRef};

type Labels = BTreeMap<String, String>;

/// What makes an address class: the peers in force it matches (slots) and the egress
/// named ports it resolves (index in the list of those in force, port).
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub(super) struct ClassKey {
    pub(super) peers: BitSet,
    pub(super) named_ports: Vec<(usize, u16)>,
}

impl ClassKey {
    /// The class of `pod`'s addresses outside every ipBlock in force: the peers in force
    /// it matches, and the egress named ports it resolves.
    fn set(&mut self, pod: &PodEntry, active: &BitSet) {
        self.peers
            .assign_union_within(&pod.memo.bits, &BitSet::default(), active);
        self.named_ports.clear();
        self.named_ports
            .extend_from_slice(pod.resolved_named_ports());
    }
}

/// A key's class (index in the class table) and flags; `None`: no key.
type ClassAndFlags = Option<(usize, u32)>;

/// A key's class and flags after a patch.
pub(super) type KeyChange = (Lpm<Addr>, ClassAndFlags);

pub(super) struct Classes<'a> {
    /// The classes some key has: index in the class table, and the class.
    pub(super) list: Vec<(usize, &'a ClassKey)>,
    /// Every IPCACHE key, sorted, with its class (index in the class table) and flags.
    pub(super) keys: &'a [(Lpm<Addr>, usize, u32)],
    /// How many keys each class of the table has.
    pub(super) counts: &'a [usize],
    /// The keys whose class or flags differ from the last compile's, sorted, when this
    /// compile patched the last compile's keys ([`KeptKeys`]); `None`: listed anew.
    pub(super) changed: Option<Vec<KeyChange>>,
    /// The class table's epoch: a class index names the same class throughout one.
    pub(super) epoch: u64,
}

/// The classes handed out, kept from one compile to the next (in the compiler's memo), so
/// a pod whose class inputs did not change keeps its class without building and hashing
/// its key ([`PodEntry::class`]). Cleared, with a new epoch that voids every pod's
/// remembered class, when the peers in force change or when it holds many more classes
/// than the last compile used.
#[derive(Default)]
pub(crate) struct ClassTable {
    list: Vec<ClassKey>,
    index: FastMap<ClassKey, usize>,
    /// Bumped at every clear; a pod's remembered class is valid in its epoch only.
    epoch: u64,
    /// The peers in force the classes were made with.
    active: BitSet,
    /// How many classes the last compile used.
    used: usize,
}

impl ClassTable {
    /// Starts a compile whose peers in force are `active`; sweeps the classes left over
    /// from earlier compiles once they outnumber those the last one used. A class
    /// depends on the peers in force: when they changed, the classes are made again,
    /// unless `kept` (the caller made again the classes of every pod that matches a slot
    /// that came into force or went out of it; the others' classes are the same).
    fn begin(&mut self, active: &BitSet, kept: bool) {
        let moved = *active != self.active && !kept;
        if moved || self.epoch == 0 || self.list.len() > 2 * self.used + 1024 {
            self.clear();
        }
        self.active = active.clone();
    }

    /// The slots in force now (`active`) and not in the last compile, or the reverse.
    pub(super) fn changed_slots(&self, active: &BitSet) -> Vec<usize> {
        let (now, before): (BTreeSet<usize>, BTreeSet<usize>) =
            (active.iter().collect(), self.active.iter().collect());
        now.symmetric_difference(&before).copied().collect()
    }

    fn clear(&mut self) {
        self.list.clear();
        self.index.clear();
        self.epoch += 1;
    }

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

/// An IPCACHE key as [`classify`] lists it: key, precedence, class, flags.
type Listed = (Lpm<Addr>, u8, usize, u32);

/// The order [`classify`] sorted its keys into, kept from one compile to the next (in
/// the compiler's memo): keys listed in the same sequence as last time (no address,
/// node, Service or prefix came or went; classes and flags may differ) are put in that
/// order again without sorting some 190,000 of them.
#[derive(Default)]
pub(crate) struct KeyOrder {
    /// Where each sorted key was listed, last time.
    order: Vec<u32>,
}

impl KeyOrder {
    /// `keys` sorted by (key, precedence); keys equal in both keep their listed order.
    ///
    /// The last order is tried first, and kept when what it gives is that sort: sorted,
    /// and each run of equal keys in listed order (the sort is stable, so it has one
    /// result). One pass over the keys through it checks that before anything is copied;
    /// no copy of the keys is kept to compare with (5 MiB at 150,000 pods).
    fn sort(&mut self, mut keys: Vec<Listed>) -> Vec<Listed> {
        let sort_key = |at: u32| {
            let (key, precedence, _, _) = keys[at as usize];
            (key, precedence)
        };
        let ordered = self.order.len() == keys.len()
            && self.order.windows(2).all(|at| {
                let (a, b) = (sort_key(at[0]), sort_key(at[1]));
                a < b || (a == b && at[0] < at[1])
            });
        if ordered {
            permute(&mut keys, &self.order);
            return keys;
        }
        // By (key, precedence, place in the list), compared as integers: the order of
        // `Lpm<Addr>`'s fields, then precedence and place packed in one word (32 bytes
        // an element, not 48: 3 MiB less at 150,000 pods).
        let mut sorted: Vec<(u64, u128, u64)> = keys
            .iter()
            .zip(0u32..)
            .map(|(&(key, precedence, _, _), at)| {
                let family_and_length =
                    (u64::from(key.prefix_len) << 32) | u64::from(key.data.family);
                (
                    family_and_length,
                    u128::from_be_bytes(key.data.bytes),
                    (u64::from(precedence) << 32) | u64::from(at),
                )
            })
            .collect();
        sorted.sort_unstable();
        // The place: the low word.
        self.order = sorted.into_iter().map(|(_, _, tail)| tail as u32).collect();
        permute(&mut keys, &self.order);
        keys
    }
}

/// Puts `items` in `order` (`items[i]` becomes what was at `order[i]`; `order` is a
/// permutation of the places) in place, one cycle of the permutation at a time: no second
/// list of the keys beside the first (7 MiB at 150,000 pods).
fn permute<T: Copy>(items: &mut [T], order: &[u32]) {
    debug_assert_eq!(items.len(), order.len());
    let mut placed = vec![false; items.len()];
    for start in 0..items.len() {
        if placed[start] {
            continue;
        }
        let first = items[start];
        let mut at = start;
        loop {
            placed[at] = true;
            let from = order[at] as usize;
            if from == start {
                items[at] = first;
                break;
            }
            items[at] = items[from];
            at = from;
        }
    }
}

/// The IPCACHE keys of the last compile with their classes, kept (in the compiler's memo)
/// so that a compile in which only some pods changed patches their keys instead of
/// listing and sorting every key again ([`classify`]).
#[derive(Default)]
pub(crate) struct KeptKeys {
    /// Every key, sorted, with its class (index in the class table) and flags.
    merged: Vec<(Lpm<Addr>, usize, u32)>,
    /// Keys per class of the table.
    counts: Vec<usize>,
    /// The keys that are no pod's (nodes, Services, prefixes), sorted.
    others: Vec<Listed>,
    /// The class table's epoch the keys were classified in; 0: none to patch (never
    /// classified, or some address was listed by two pods).
    epoch: u64,
    /// The version of the egress named ports in force they were classified with.
    named_ports: u64,
}

/// What may make the last compile's keys patchable: the pods named by this compile's
/// sync (and those of namespaces whose labels changed) with the addresses they listed
/// before, when nothing else that classifies pod addresses moved (no peer slot, no named
/// port in force; see the compiler).
pub(super) struct Moved<'a> {
    pub(super) pods: Option<&'a [(ObjectRef, Vec<IpAddr>)]>,
    /// Whether some address is listed by two pods holding addresses.
    pub(super) contested: bool,
    /// The addresses listed by pods holding addresses, now.
    pub(super) listed: &'a PodCounts,
    /// The version of the egress named ports in force.
    pub(super) named_ports: u64,
}

/// Classes of every pod address, node address, Service address and range, and ipBlock
/// prefix. Where keys coincide, the pod's class wins over the node's, the node's over a
/// Service's, and those over the prefix's; node addresses carry `PEER_HOST`, and Service
/// addresses, Service ranges and every other key inside a Service range `PEER_SERVICE`,
/// whatever their class (a node address never is a Service's). The pods' entries have
/// resolved the egress named ports in force ([`PodEntry::resolve_named_ports`]).
///
/// `pods`: every live pod, when the caller walked them. When only the pods of `moved`
/// changed since the last compile (same named ports and classes; no address listed by
/// two pods, then or now) and no key of theirs is anything else's, their keys are patched
/// into the kept ones ([`Classes::changed`]), with the keys of nodes, Services and
/// prefixes that changed (none a pod's; the Service ranges the same): the cost follows
/// what changed.
#[allow(clippy::too_many_arguments)]
pub(super) fn classify<'a>(
    state: &ClusterState,
    entries: &mut [Box<PodEntry>],
    pods: Option<&[PodView<'_>]>,
    peers: &PeerSlots,
    prefixes: &[(IpNet, BitSet)],
    services: &Frontends,
    (table, order, kept): (&'a mut ClassTable, &mut KeyOrder, &'a mut KeptKeys),
    moved: Moved<'_>,
) -> Classes<'a> {
    let active = &peers.active;
    table.begin(active, moved.pods.is_some());
    let mut others = other_keys(state, peers, prefixes, services, table);
    others.sort_unstable_by_key(|&(key, precedence, _, _)| (key, precedence));
    let patchable =
        kept.epoch == table.epoch && kept.named_ports == moved.named_ports && !moved.contested;
    let changed = match moved.pods.filter(|_| patchable) {
        Some(pods) => {
            let context = PatchContext {
                others: &others,
                listed: moved.listed,
                active,
                ranges: &services.ranges,
            };
            kept.patch(pods, entries, table, &context)
        }
        None => None,
    };
    if changed.is_none() {
        // Every key is listed again: the old list goes before the new one is built, not
        // after (6 MiB less at the peak of such a compile at 150,000 pods).
        kept.merged = Vec::new();
        // Every live pod, when the caller did not walk them (no address is contested).
        let walked;
        let pods = match pods {
            Some(pods) => pods,
            None => {
                walked = live_pods(state, entries, false, &mut Vec::new());
                &walked
            }
        };
        let merged = all_keys(entries, pods, &others, &services.ranges, table, order);
        kept.counts.clear();
        kept.counts.resize(table.list.len(), 0);
        for &(_, class, _) in &merged {
            kept.counts[class] += 1;
        }
        kept.merged = merged;
        kept.others = others;
        kept.epoch = if moved.contested { 0 } else { table.epoch };
        kept.named_ports = moved.named_ports;
    }
    table.used = kept.counts.iter().filter(|&&n| n > 0).count();
    let table: &'a ClassTable = table;
    let kept: &'a KeptKeys = kept;
    Classes {
        list: kept
            .counts
            .iter()
            .enumerate()
            .filter(|&(_, &n)| n > 0)
            .map(|(class, _)| (class, &table.list[class]))
            .collect(),
        keys: &kept.merged,
        counts: &kept.counts,
        changed,
        epoch: table.epoch,
    }
}

/// Every IPCACHE key, sorted, with its class (index in the table) and flags: the pods'
/// (of `pods`) merged with `others` ([`other_keys`], sorted).
fn all_keys(
    entries: &mut [Box<PodEntry>],
    pods: &[PodView<'_>],
    others: &[Listed],
    ranges: &BTreeSet<IpNet>,
    table: &mut ClassTable,
    order: &mut KeyOrder,
) -> Vec<(Lpm<Addr>, usize, u32)> {
    let active = table.active.clone();
    let mut keys: Vec<Listed> = Vec::with_capacity(entries.len() * 2 + others.len());
    // The pod's class, built in place for each pod (no allocation unless it is new).
    let mut pod_class = ClassKey::default();
    for pod in pods {
        let entry = &mut entries[pod.index];
        let kept = pod.kept.as_deref();
        pod_keys(entry, kept, table, &mut pod_class, &active, |key, class| {
            keys.push((key, 0, class, 0));
        });
    }
    keys.extend_from_slice(others);
    let mut keys = order.sort(keys);
    debug_assert!(keys.is_sorted_by_key(|&(key, precedence, _, _)| (key, precedence)));
    // A key listed more than once has the class of its first listing and the flags of
    // all of them. Merged in place, then narrowed in place (the two element types have
    // one size): a full classification at 150,000 pods held both lists at once, 7 MiB
    // more at its peak.
    keys.dedup_by(|later, kept| {
        let same = later.0 == kept.0;
        if same {
            kept.3 |= later.3;
        }
        same
    });
    let mut merged: Vec<(Lpm<Addr>, usize, u32)> = keys
        .into_iter()
        .map(|(key, _, class, flags)| (key, class, flags))
        .collect();
    if !ranges.is_empty() {
        for (key, _, flags) in &mut merged {
            *flags |= range_flags(key, *flags, ranges);
        }
    }
    // A node address is the node's, even in a Service range or named by a Service.
    for (_, _, flags) in &mut merged {
        if *flags & PEER_HOST != 0 {
            *flags &= !PEER_SERVICE;
        }
    }
    merged
}

/// `PEER_SERVICE` for a key inside a Service range that is no node's address (`flags`:
/// its flags so far): a key inside a range would otherwise hide the range's flag from the
/// longest match (an ipBlock /32 on a ClusterIP, say).
fn range_flags(key: &Lpm<Addr>, flags: u32, ranges: &BTreeSet<IpNet>) -> u32 {
    let inside = flags & PEER_HOST == 0
        && key_net(key).is_some_and(|net| ranges.iter().any(|range| range.contains(&net)));
    if inside { PEER_SERVICE } else { 0 }
}

/// The keys of one pod (its entry, and the addresses it holds when others hold some of
/// those it lists), each with its class: the pod's class, plus the ipBlocks in force
/// holding the address. The class is the one the pod had when nothing it depends on
/// changed since and no address of it is in an ipBlock in force (the common case).
fn pod_keys(
    entry: &mut PodEntry,
    kept: Option<&[IpAddr]>,
    table: &mut ClassTable,
    pod_class: &mut ClassKey,
    active: &BitSet,
    mut out: impl FnMut(Lpm<Addr>, usize),
) {
    if entry.ip_bits.is_empty() {
        let class = match entry.class {
            Some((epoch, class)) if epoch.get() == table.epoch => class as usize,
            _ => {
                pod_class.set(entry, active);
                let class = table.intern_ref(pod_class);
                let epoch = NonZeroU64::new(table.epoch).expect("begun: epochs count from 1");
                let index = u32::try_from(class).expect("fewer classes than pods' addresses");
                entry.class = Some((epoch, index));
                class
            }
        };
        for &ip in kept.unwrap_or(&entry.ips) {
            out(host_key(ip), class);
        }
        return;
    }
    pod_class.set(entry, active);
    let none = BitSet::default();
    // Interned only when some address has it: a class with no key is no identity.
    let mut pod_class_index = None;
    for &ip in kept.unwrap_or(&entry.ips) {
        let at = entry
            .ips
            .iter()
            .position(|&a| a == ip)
            .expect("own address");
        let blocks = entry.ip_bits[at].union_within(&none, active);
        let class = if blocks.is_empty() {
            *pod_class_index.get_or_insert_with(|| table.intern_ref(pod_class))
        } else {
            table.intern(ClassKey {
                peers: pod_class.peers.union_within(&blocks, active),
                named_ports: pod_class.named_ports.clone(),
            })
        };
        out(host_key(ip), class);
    }
}

/// The keys that are no pod's, as listed: node addresses (this node's always, carrying
/// `PEER_HOST`; the others' when a `nodes` peer is in force; matched by the ipBlocks
/// holding them and the `nodes` peers selecting their node), Service addresses and ranges
/// (matched by the ipBlocks holding them whole), and the ipBlocks' prefixes.
fn other_keys(
    state: &ClusterState,
    peers: &PeerSlots,
    prefixes: &[(IpNet, BitSet)],
    services: &Frontends,
    table: &mut ClassTable,
) -> Vec<Listed> {
    let active = &peers.active;
    let none = BitSet::default();
    let mut keys = Vec::new();
    let nodes_in_force = active
        .iter()
        .any(|slot| matches!(peers.slot(slot).peer, Peer::Nodes(_)));
    let mut node_addresses: Vec<(IpAddr, Option<&Labels>, u32)> = Vec::new();
    let own = state
        .node
        .name
        .as_ref()
        .and_then(|name| state.nodes.get(name));
    for &ip in &state.node.ips {
        node_addresses.push((ip, own.map(|n| &n.labels), PEER_HOST));
    }
    if nodes_in_force {
        for node in state.nodes.values() {
            for &ip in &node.ips {
                if !state.node.ips.contains(&ip) {
                    node_addresses.push((ip, Some(&node.labels), 0));
                }
            }
        }
    }
    for (ip, labels, flags) in node_addresses {
        let mut bits = BitSet::default();
        for slot in active.iter() {
            let matches = match &peers.slot(slot).peer {
                Peer::Block(b) => b.contains_addr(ip),
                Peer::Nodes(selector) => labels.is_some_and(|l| selector.matches(l)),
                Peer::Pods { .. } => false,
            };
            if matches {
                bits.insert(slot);
            }
        }
        let class = ClassKey {
            peers: bits,
            named_ports: vec![],
        };
        keys.push((host_key(ip), 1, table.intern(class), flags));
    }
    let blocks_containing = |net: &IpNet| {
        let mut bits = BitSet::default();
        for slot in active.iter() {
            if let Peer::Block(b) = &peers.slot(slot).peer
                && b.contains_prefix(net)
            {
                bits.insert(slot);
            }
        }
        ClassKey {
            peers: bits,
            named_ports: vec![],
        }
    };
    for &ip in &services.addresses {
        let class = table.intern(blocks_containing(&IpNet::from(ip)));
        keys.push((host_key(ip), 2, class, PEER_SERVICE));
    }
    for range in &services.ranges {
        let class = table.intern(blocks_containing(range));
        keys.push((net_key(range), 3, class, PEER_SERVICE));
    }
    for (prefix, bits) in prefixes {
        let class = ClassKey {
            peers: bits.union_within(&none, active),
            named_ports: vec![],
        };
        keys.push((net_key(prefix), 4, table.intern(class), 0));
    }
    keys
}

/// What [`KeptKeys::patch`] reads besides the pods that moved: the keys that are no
/// pod's as listed now (sorted), the addresses pods list now, the peers in force and the
/// Service ranges.
struct PatchContext<'a> {
    others: &'a [Listed],
    listed: &'a PodCounts,
    active: &'a BitSet,
    ranges: &'a BTreeSet<IpNet>,
}

impl KeptKeys {
    /// Whether some key of the last compile is an address in `block` (a pod's, a node's
    /// or a Service's). The addresses of a family are one run of the sorted keys: the
    /// run inside the cidr is searched, stepping over each except met (a block of the
    /// world but the private ranges holds none of the pods').
    pub(super) fn lists_inside(&self, block: &crate::policy::Block) -> bool {
        let after = |key: Lpm<Addr>| self.merged.partition_point(|&(k, _, _)| k <= key);
        let last = host_key(block.cidr.broadcast());
        let mut at = self
            .merged
            .partition_point(|&(key, _, _)| key < host_key(block.cidr.network()));
        // Each step passes one except: as many steps as excepts, and one more.
        for _ in 0..=block.except.len() {
            let Some(&(key, _, _)) = self.merged.get(at).filter(|&&(key, _, _)| key <= last) else {
                return false;
            };
            let Some(ip) = key_net(&key).map(|net| net.addr()) else {
                return true;
            };
            match block.except.iter().find(|except| except.contains(&ip)) {
                None => return true,
                Some(except) => at = after(host_key(except.broadcast())),
            }
        }
        // Unreachable (an except met is passed whole, and not met again); say so safely.
        true
    }

    /// The kept keys with those of `moved` (pods, each with the addresses it listed
    /// before) made again, and those of nodes, Services and prefixes that changed, and
    /// the keys that changed; `None`, leaving the keys to be listed anew, when a key of
    /// the pods is also a node's, a Service's or a prefix (the precedence between them is
    /// [`all_keys`]'s to decide) or another pod's, when a changed key of the others is
    /// some pod's, or when the Service ranges changed (they flag every key inside them).
    fn patch(
        &mut self,
        moved: &[(ObjectRef, Vec<IpAddr>)],
        entries: &mut [Box<PodEntry>],
        table: &mut ClassTable,
        context: &PatchContext<'_>,
    ) -> Option<Vec<KeyChange>> {
        let ranges = |others: &[Listed]| -> Vec<Lpm<Addr>> {
            let ranges = others
                .iter()
                .filter(|&&(_, precedence, _, _)| precedence == 3);
            ranges.map(|&(key, _, _, _)| key).collect()
        };
        if ranges(&self.others) != ranges(context.others) {
            return None;
        }
        // Each key of a moved pod: whether it was one of theirs before, and its class and
        // flags now.
        let mut wanted: BTreeMap<Lpm<Addr>, (bool, ClassAndFlags)> = BTreeMap::new();
        for (_, ips) in moved {
            wanted.extend(ips.iter().map(|&ip| (host_key(ip), (true, None))));
        }
        let mut pod_class = ClassKey::default();
        let mut twice = false;
        for (obj, _) in moved {
            let Ok(at) = entries.binary_search_by(|e| e.obj.cmp(obj)) else {
                continue;
            };
            let entry = &mut entries[at];
            if !entry.holds {
                continue;
            }
            pod_keys(
                entry,
                None,
                table,
                &mut pod_class,
                context.active,
                |key, class| {
                    let class_and_flags = (class, range_flags(&key, 0, context.ranges));
                    let (_, new) = wanted.entry(key).or_insert((false, None));
                    twice |= new.replace(class_and_flags).is_some();
                },
            );
        }
        let is_other = |others: &[Listed], key: &Lpm<Addr>| {
            let at = others.partition_point(|&(k, _, _, _)| k < *key);
            others.get(at).is_some_and(|&(k, _, _, _)| k == *key)
        };
        let old = |key: &Lpm<Addr>| {
            let at = self.merged.binary_search_by_key(key, |&(k, _, _)| k);
            at.ok().map(|i| (self.merged[i].1, self.merged[i].2))
        };
        let mut changes: Vec<KeyChange> = Vec::with_capacity(wanted.len());
        for (&key, &(theirs, new)) in &wanted {
            if is_other(&self.others, &key) || is_other(context.others, &key) {
                return None;
            }
            let old = old(&key);
            if old.is_some() != theirs {
                return None;
            }
            if old != new {
                changes.push((key, new));
            }
        }
        // Checked before anything is changed: each address listed by one moved pod, and
        // none held by a pod that did not move (the counts said none is contested), nor
        // one of theirs missing.
        if twice {
            return None;
        }
        for (key, new) in changed_others(&self.others, context.others, context.ranges) {
            let pods = key_net(&key).filter(|net| net.prefix_len() == net.max_prefix_len());
            if wanted.contains_key(&key) || pods.is_some_and(|net| context.listed.lists(net.addr()))
            {
                return None;
            }
            if old(&key) != new {
                changes.push((key, new));
            }
        }
        changes.sort_unstable_by_key(|&(key, _)| key);
        self.counts.resize(table.list.len(), 0);
        for &(key, new) in &changes {
            let at = self.merged.binary_search_by_key(&key, |&(k, _, _)| k);
            if let Ok(i) = at {
                let class = self.merged[i].1;
                self.counts[class] -= 1;
            }
            if let Some((class, _)) = new {
                self.counts[class] += 1;
            }
            match (at, new) {
                (Ok(i), Some((class, flags))) => self.merged[i] = (key, class, flags),
                (Ok(i), None) => drop(crate::sparing::remove(&mut self.merged, i)),
                (Err(i), Some((class, flags))) => {
                    crate::sparing::insert(&mut self.merged, i, (key, class, flags));
                }
                (Err(_), None) => {}
            }
        }
        self.others = context.others.to_vec();
        Some(changes)
    }
}

/// The keys that are no pod's whose listings differ between `before` and `now` (both
/// sorted by key and precedence), each with its class and flags as [`all_keys`] merges
/// them now (`None`: no longer listed): the class of the first listing, the flags of
/// all, `PEER_SERVICE` inside a Service range, none on a node's address.
fn changed_others(before: &[Listed], now: &[Listed], ranges: &BTreeSet<IpNet>) -> Vec<KeyChange> {
    let (mut before, mut now) = (before, now);
    let mut changes = Vec::new();
    loop {
        let next = match (before.first(), now.first()) {
            (None, None) => return changes,
            (Some(&(a, ..)), Some(&(b, ..))) => a.min(b),
            (Some(&(key, ..)), None) | (None, Some(&(key, ..))) => key,
        };
        let (was, rest) = before.split_at(before.partition_point(|&(k, ..)| k == next));
        before = rest;
        let (is, rest) = now.split_at(now.partition_point(|&(k, ..)| k == next));
        now = rest;
        if was == is {
            continue;
        }
        let merged = is.first().map(|&(key, _, class, _)| {
            let flags = is.iter().fold(0, |flags, &(_, _, _, f)| flags | f);
            let flags = flags | range_flags(&key, flags, ranges);
            let flags = if flags & PEER_HOST != 0 {
                flags & !PEER_SERVICE
            } else {
                flags
            };
            (class, flags)
        });
        changes.push((next, merged));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// `keys` sorted as `KeyOrder::sort` must: by (key, precedence), equal ones in
    /// listed order (a stable sort, written plainly).
    fn stable_sort(keys: &[Listed]) -> Vec<Listed> {
        let mut sorted = keys.to_vec();
        sorted.sort_by_key(|&(key, precedence, _, _)| (key, precedence));
        sorted
    }

    proptest! {
        /// In place, each item goes where the permutation says, as a copy made through
        /// it would have it.
        #[test]
        fn a_permutation_made_in_place_puts_each_item_where_a_copy_would(
            order in (0usize..200).prop_flat_map(|n| Just((0..n as u32).collect::<Vec<_>>()).prop_shuffle()),
        ) {
            let items: Vec<u32> = (0..order.len() as u32).map(|i| i * 7 + 3).collect();
            let copied: Vec<u32> = order.iter().map(|&at| items[at as usize]).collect();
            let mut permuted = items.clone();
            permute(&mut permuted, &order);
            prop_assert_eq!(permuted, copied);
        }
    }

    fn listed() -> impl Strategy<Value = Listed> {
        // Few addresses and precedences, so that equal keys are common.
        (0u8..6, 0u8..2, 0usize..4).prop_map(|(host, precedence, class)| {
            let ip = std::net::IpAddr::from([10, 0, 0, host]);
            (crate::lpm::host_key(ip), precedence, class, 0)
        })
    }

    proptest! {
        /// A kept order is used only where it sorts the keys: chains of key lists of
        /// the same length (a changed key, a moved class) come out as the stable sort.
        #[test]
        fn keys_come_out_sorted_whatever_order_was_kept(
            lists in prop::collection::vec(prop::collection::vec(listed(), 0..12), 1..8),
            repeat in prop::collection::vec(any::<bool>(), 8),
        ) {
            let mut order = KeyOrder::default();
            for (keys, again) in lists.iter().zip(&repeat) {
                let keys = if *again {
                    // The same keys with other classes: the kept order applies.
                    keys.iter().map(|&(k, p, c, f)| (k, p, c + 1, f)).collect()
                } else {
                    keys.clone()
                };
                prop_assert_eq!(order.sort(keys.clone()), stable_sort(&keys));
            }
        }
    }

    #[test]
    fn a_block_lists_an_address_when_a_kept_key_is_inside_it_and_outside_its_excepts() {
        let kept = |keys: &[&str]| {
            let mut merged: Vec<(Lpm<Addr>, usize, u32)> = keys
                .iter()
                .map(|k| match k.parse::<IpNet>() {
                    Ok(net) => (crate::lpm::net_key(&net), 0, 0),
                    Err(_) => (host_key(k.parse().expect("address")), 0, 0),
                })
                .collect();
            merged.sort_unstable();
            KeptKeys {
                merged,
                ..KeptKeys::default()
            }
        };
        let block = |cidr: &str, except: &[&str]| {
            let net = |s: &str| s.parse::<IpNet>().expect("prefix");
            crate::policy::Block::new(net(cidr), except.iter().map(|e| net(e)).collect())
        };
        let world_but_private = block("0.0.0.0/0", &["10.0.0.0/8", "192.168.0.0/16"]);
        let pods = kept(&[
            "10.64.0.1",
            "10.66.255.9",
            "192.168.3.4",
            "fd00::1",
            "10.0.0.0/24",
        ]);
        assert!(!pods.lists_inside(&world_but_private));
        let one_outside = kept(&["10.64.0.1", "11.0.0.1", "192.168.3.4"]);
        assert!(one_outside.lists_inside(&world_but_private));
        let between_excepts = kept(&["10.64.0.1", "172.16.0.1", "192.168.3.4"]);
        assert!(between_excepts.lists_inside(&world_but_private));
        // A prefix key inside is no address; an address of the other family is not in it.
        assert!(
            !kept(&["10.200.1.0/24", "::ffff:10.200.1.7"])
                .lists_inside(&block("10.200.1.0/24", &[]))
        );
        assert!(kept(&["10.200.1.255"]).lists_inside(&block("10.200.1.0/24", &[])));
        assert!(!kept(&["10.200.2.0"]).lists_inside(&block("10.200.1.0/24", &[])));
        assert!(!kept(&[]).lists_inside(&block("::/0", &[])));
        assert!(kept(&["fd00::1"]).lists_inside(&block("::/0", &["2001:db8::/32"])));
    }

    #[test]
    fn a_kept_order_that_no_longer_sorts_the_keys_is_not_used() {
        let key = |host: u8| crate::lpm::host_key(std::net::IpAddr::from([10, 0, 0, host]));
        let mut order = KeyOrder::default();
        // Kept: the second key first.
        let first = vec![(key(2), 0, 0, 0), (key(1), 0, 1, 0)];
        assert_eq!(order.sort(first.clone()), stable_sort(&first));
        // As many keys, already in order: the kept order would put 3 before 1.
        let second = vec![(key(1), 0, 0, 0), (key(3), 0, 1, 0)];
        assert_eq!(order.sort(second.clone()), second);
        // Equal keys: the kept order would put the one listed second first.
        order.sort(first);
        let tied = vec![(key(1), 0, 7, 0), (key(1), 0, 8, 0)];
        assert_eq!(order.sort(tied.clone()), tied);
    }
}
