//! Step 4b of the compile: every IPCACHE key (pod addresses, node addresses, Service
//! addresses and ranges, ipBlock prefixes) sorted into classes of addresses that every
//! peer in force treats alike.

use std::collections::BTreeMap;
use std::net::IpAddr;

use ipnet::IpNet;
use netpol_common::{Addr, PEER_HOST, PEER_SERVICE};

use super::pods::PodView;
use crate::cache::{BitSet, FastMap, PeerSlots, PodEntry};
use crate::lpm::{Lpm, host_key, key_net, net_key};
use crate::policy::Peer;
use crate::services::Frontends;
use crate::state::ClusterState;

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

pub(super) struct Classes {
    /// The distinct classes that some key has.
    pub(super) list: Vec<ClassKey>,
    /// Every IPCACHE key, sorted, with its class (index in `list`) and flags.
    pub(super) keys: Vec<(Lpm<Addr>, usize, u32)>,
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
}

impl ClassTable {
    /// Starts a compile whose peers in force are `active`.
    fn begin(&mut self, active: &BitSet) {
        if *active != self.active || self.epoch == 0 {
            self.clear();
            self.active = active.clone();
        }
    }

    fn clear(&mut self) {
        self.list.clear();
        self.index.clear();
        self.epoch += 1;
    }

    /// Ends a compile that used `used` classes: sweeps the ones left over from earlier
    /// compiles once they outnumber those.
    fn end(&mut self, used: usize) {
        if self.list.len() > 2 * used + 1024 {
            self.clear();
        }
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
    /// The keys and precedences as listed last time.
    listed: Vec<(Lpm<Addr>, u8)>,
    /// Where each sorted key was listed.
    order: Vec<u32>,
}

impl KeyOrder {
    /// `keys` sorted by (key, precedence); keys equal in both keep their listed order.
    fn sort(&mut self, keys: Vec<Listed>) -> Vec<Listed> {
        let same = self.listed.len() == keys.len()
            && self
                .listed
                .iter()
                .zip(&keys)
                .all(|(&(a, pa), &(b, pb, _, _))| a == b && pa == pb);
        if !same {
            // By (key, precedence, place in the list), compared as integers: the order
            // of `Lpm<Addr>`'s fields.
            let mut sorted: Vec<(u64, u128, u8, u32)> = keys
                .iter()
                .zip(0u32..)
                .map(|(&(key, precedence, _, _), at)| {
                    let family_and_length =
                        (u64::from(key.prefix_len) << 32) | u64::from(key.data.family);
                    (
                        family_and_length,
                        u128::from_be_bytes(key.data.bytes),
                        precedence,
                        at,
                    )
                })
                .collect();
            sorted.sort_unstable();
            self.order = sorted.into_iter().map(|(_, _, _, at)| at).collect();
            self.listed = keys.iter().map(|&(key, p, _, _)| (key, p)).collect();
        }
        self.order.iter().map(|&at| keys[at as usize]).collect()
    }
}

/// Classes of every pod address, node address, Service address and range, and ipBlock
/// prefix. Where keys coincide, the pod's class wins over the node's, the node's over a
/// Service's, and those over the prefix's; node addresses carry `PEER_HOST`, and Service
/// addresses, Service ranges and every other key inside a Service range `PEER_SERVICE`,
/// whatever their class (a node address never is a Service's). The pods' entries have
/// resolved the egress named ports in force ([`PodEntry::resolve_named_ports`]).
#[allow(clippy::too_many_arguments)]
pub(super) fn classify(
    state: &ClusterState,
    entries: &mut [PodEntry],
    pods: &[PodView<'_>],
    peers: &PeerSlots,
    prefixes: &[(IpNet, BitSet)],
    services: &Frontends,
    table: &mut ClassTable,
    order: &mut KeyOrder,
    now: u64,
) -> Classes {
    let active = &peers.active;
    let none = BitSet::default();
    table.begin(active);
    let mut keys: Vec<Listed> = Vec::with_capacity(entries.len() * 2);
    // The pod's class, built in place for each pod (no allocation unless it is new).
    let mut pod_class = ClassKey::default();
    for pod in pods {
        let entry = &mut entries[pod.index];
        // No address of the pod in an ipBlock in force: one class for all of them, the
        // one it had if nothing it depends on changed since.
        if entry.ip_bits.is_empty() {
            let class = match entry.class {
                Some((epoch, at, class)) if epoch == table.epoch && entry.changed_at <= at => class,
                _ => {
                    pod_class.set(entry, active);
                    let class = table.intern_ref(&pod_class);
                    entry.class = Some((table.epoch, now, class));
                    class
                }
            };
            let ips = pod.ips(entries);
            keys.extend(ips.iter().map(|&ip| (host_key(ip), 0, class, 0)));
            continue;
        }
        // The pod's class; an address inside some ipBlock in force adds to it.
        let entry = &entries[pod.index];
        pod_class.set(entry, active);
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
                table.intern(ClassKey {
                    peers: pod_class.peers.union_within(&blocks, active),
                    named_ports: pod_class.named_ports.clone(),
                })
            };
            keys.push((host_key(ip), 0, class, 0));
        }
    }
    // Node addresses: this node's always (they carry `PEER_HOST`), the others' when a
    // `nodes` peer is in force; matched by the ipBlocks holding them and the `nodes`
    // peers selecting their node.
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
    // Service addresses and ranges: matched by the ipBlocks that contain them whole.
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
    let keys = order.sort(keys);
    debug_assert!(keys.is_sorted_by_key(|&(key, precedence, _, _)| (key, precedence)));
    let mut merged: Vec<(Lpm<Addr>, usize, u32)> = Vec::with_capacity(keys.len());
    for (key, _, class, flags) in keys {
        match merged.last_mut() {
            Some(last) if last.0 == key => last.2 |= flags,
            _ => merged.push((key, class, flags)),
        }
    }
    // A key inside a Service range would otherwise hide the range's flag from the
    // longest match (an ipBlock /32 on a ClusterIP, say).
    if !services.ranges.is_empty() {
        for (key, _, flags) in &mut merged {
            if *flags & PEER_HOST == 0
                && let Some(net) = key_net(key)
                && services.ranges.iter().any(|range| range.contains(&net))
            {
                *flags |= PEER_SERVICE;
            }
        }
    }
    // A node address is the node's, even in a Service range or named by a Service.
    for (_, _, flags) in &mut merged {
        if *flags & PEER_HOST != 0 {
            *flags &= !PEER_SERVICE;
        }
    }
    // A class whose every key another took (a node address that is a pod's, a /32
    // ipBlock equal to an address) is no identity: keep only classes with keys.
    let mut renumber: Vec<Option<usize>> = vec![None; table.list.len()];
    let mut list = Vec::new();
    for (_, class, _) in &mut merged {
        *class = *renumber[*class].get_or_insert_with(|| {
            list.push(table.list[*class].clone());
            list.len() - 1
        });
    }
    table.end(list.len());
    Classes { list, keys: merged }
}
