//! Step 4a of the compile: bringing the memos of pods and ipBlock prefixes up to date
//! with the peers in force (see `cache.rs`).

use std::collections::{BTreeMap, BTreeSet, HashMap};

use ipnet::IpNet;

use crate::cache::{BitSet, Memo, PeerSlots, PodEntry};
use crate::policy::{NamespaceMatch, Peer};
use crate::state::Labels;

/// What bringing a memo up to date needs: the peer slots, this compile's number, the
/// slots freed by it and whether any of them or of the slots it added is an ipBlock.
pub(super) struct MemoContext<'a> {
    pub(super) peers: &'a PeerSlots,
    pub(super) now: u64,
    pub(super) freed: &'a [usize],
    /// Whether an ipBlock is among the slots added or freed: else an up-to-date pod's
    /// ipBlocks per address stay as they are.
    pub(super) blocks_moved: bool,
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
        memo.at = std::num::NonZeroU64::new(self.now);
        debug_assert!(memo.at.is_some(), "compiles are numbered from 1");
    }

    /// A pod's matches: selector peers from its labels and its namespace's (whose
    /// version is `version`), ipBlocks per address.
    pub(super) fn refresh_pod(
        &self,
        entry: &mut PodEntry,
        namespace: &str,
        (labels, namespace_labels): (&Labels, &BTreeMap<String, String>),
        version: u64,
    ) {
        let current = entry.memo.current(self.peers.last_moved);
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
            Peer::Block(_) | Peer::Nodes(_) => false,
        });
        entry.namespace_version = version;
        let slots_moved = !self.freed.is_empty() || !self.peers.added.is_empty();
        if full || slots_moved {
            // What the pod's class is made of may have changed (`classify.rs`).
            entry.class = None;
        }
        // ipBlocks per address; an empty list when no address is in one (the common
        // case: nothing to read per pod).
        if !current || (slots_moved && self.blocks_moved) {
            let mut ip_bits = if current && !entry.ip_bits.is_empty() {
                std::mem::take(&mut entry.ip_bits)
            } else {
                vec![BitSet::default(); entry.ips.len()].into_boxed_slice()
            };
            for (bits, &ip) in ip_bits.iter_mut().zip(&entry.ips) {
                let mut memo = Memo {
                    bits: std::mem::take(bits),
                    at: None,
                };
                self.refresh(&mut memo, !current, |peer| match peer {
                    Peer::Block(b) => b.contains_addr(ip),
                    Peer::Pods { .. } | Peer::Nodes(_) => false,
                });
                *bits = memo.bits;
            }
            if ip_bits.iter().all(BitSet::is_empty) {
                ip_bits = Box::default();
            }
            entry.ip_bits = ip_bits;
        }
    }

    /// The prefixes of the ipBlocks in force, each with the ipBlocks containing it
    /// wholly; keeps their memos for the next compile (and only theirs).
    pub(super) fn refresh_prefixes(
        &self,
        memos: &mut HashMap<IpNet, Memo>,
    ) -> Vec<(IpNet, BitSet)> {
        let prefixes: BTreeSet<IpNet> = self
            .peers
            .active
            .iter()
            .filter_map(|slot| match &self.peers.slot(slot).peer {
                Peer::Block(b) => Some(b),
                Peer::Pods { .. } | Peer::Nodes(_) => None,
            })
            .flat_map(|b| std::iter::once(b.cidr).chain(b.except.iter().copied()))
            .collect();
        memos.retain(|prefix, _| prefixes.contains(prefix));
        prefixes
            .into_iter()
            .map(|prefix| {
                let memo = memos.entry(prefix).or_default();
                let full = !memo.current(self.peers.last_moved);
                self.refresh(memo, full, |peer| match peer {
                    Peer::Block(b) => b.contains_prefix(&prefix),
                    Peer::Pods { .. } | Peer::Nodes(_) => false,
                });
                (prefix, memo.bits.clone())
            })
            .collect()
    }
}
