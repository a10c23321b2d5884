//! Step 2 of the compile: the live pods with their addresses (an address listed by
//! several belongs to the one [`claims_before`] the others: running, then created last,
//! then first in name order), and what the compiler reads from namespaces.

use std::borrow::Cow;
use std::collections::BTreeSet;
use std::collections::hash_map::Entry;
use std::net::IpAddr;

use crate::cache::{FastMap, PodEntry};
use crate::state::{
    ClusterState, Labels, NamespaceInfo, ObjectRef, PodInfo, claim_reason, claims_before,
    holds_pod_addresses,
};
use crate::{Diagnostic, Subject};

/// A live pod with an address, as peer and possibly as local endpoint.
#[derive(Clone)]
pub(super) struct PodView<'a> {
    pub(super) obj: &'a ObjectRef,
    pub(super) labels: &'a Labels,
    /// Index in the cache's pod entries (= in the state's pods).
    pub(super) index: usize,
    /// The addresses this pod holds when another pod holds some of the ones it lists;
    /// `None`: all of them.
    pub(super) kept: Option<Vec<IpAddr>>,
    pub(super) local: bool,
    /// The interface the operator named for the pod ([`ClusterState::pod_interfaces`]),
    /// never anything read from the pod object.
    pub(super) host_interface: Option<&'a String>,
}

impl PodView<'_> {
    /// The pod's addresses (see `kept`).
    pub(super) fn ips<'e>(&'e self, entries: &'e [Box<PodEntry>]) -> &'e [IpAddr] {
        self.kept.as_deref().unwrap_or(&entries[self.index].ips)
    }
}

/// Whether the namespace opted into audit mode (annotation `netpol.dev/audit: "true"`).
pub(super) fn audited_namespace(state: &ClusterState, namespace: &str) -> bool {
    state
        .namespaces
        .get(namespace)
        .is_some_and(NamespaceInfo::audited)
}

/// The live pods with an address, in state order; `entries` are the cache's pod entries
/// (one per pod of the state, same order). An address listed by several live pods
/// belongs to the one [`claims_before`] the others; the others are reported and keep
/// only the addresses they hold. `contested`: whether some address is listed by several
/// ([`PodCounts`](crate::cache::PodCounts)); when none is, nobody's owner is looked up.
pub(super) fn live_pods<'a>(
    state: &'a ClusterState,
    entries: &[Box<PodEntry>],
    contested: bool,
    diagnostics: &mut Vec<Diagnostic>,
) -> Vec<PodView<'a>> {
    if !contested {
        return uncontested_pods(state, entries);
    }
    // First pass: who holds each address (index into the state's pods).
    let pods: Vec<(&ObjectRef, &PodInfo)> = state.pods.iter().collect();
    let mut owner: FastMap<IpAddr, usize> = FastMap::default();
    owner.reserve(entries.len() * 2);
    for (index, ((obj, pod), entry)) in pods.iter().zip(entries).enumerate() {
        if !holds_pod_addresses(pod) {
            continue;
        }
        for ip in &entry.ips {
            match owner.entry(*ip) {
                Entry::Vacant(v) => {
                    v.insert(index);
                }
                Entry::Occupied(mut held) => {
                    if claims_before((obj, pod), pods[*held.get()]) {
                        held.insert(index);
                    }
                }
            }
        }
    }
    // Second pass: each live pod with the addresses it holds.
    debug_assert!(
        entries
            .iter()
            .filter(|e| e.holds)
            .map(|e| e.ips.len())
            .sum::<usize>()
            > owner.len(),
        "the counts said some address is contested"
    );
    let mut out = Vec::with_capacity(entries.len());
    for (index, ((obj, pod), entry)) in pods.iter().zip(entries).enumerate() {
        if !holds_pod_addresses(pod) {
            continue;
        }
        debug_assert_eq!(entry.local, state.node.is_local(pod));
        let mut ips = Cow::Borrowed(&entry.ips[..]);
        let mut removed = 0;
        for (i, ip) in entry.ips.iter().enumerate() {
            let holder = owner[ip];
            if holder == index {
                continue;
            }
            diagnostics.push(Diagnostic::new(
                Subject::pod(obj),
                "status.podIPs",
                format!(
                    "address {ip} is also used by Pod {}, which holds it ({}); ignored here",
                    pods[holder].0,
                    claim_reason(pods[holder], (obj, pod)),
                ),
            ));
            ips.to_mut().remove(i - removed);
            removed += 1;
        }
        if ips.is_empty() {
            continue;
        }
        out.push(PodView {
            obj,
            labels: pod.labels(),
            index,
            kept: match ips {
                Cow::Borrowed(_) => None,
                Cow::Owned(kept) => Some(kept),
            },
            local: entry.local,
            host_interface: entry.local.then(|| state.pod_interfaces.get(obj)).flatten(),
        });
    }
    out
}

/// [`live_pods`] when no address is listed by two pods holding addresses: every such pod
/// keeps all of its addresses.
fn uncontested_pods<'a>(state: &'a ClusterState, entries: &[Box<PodEntry>]) -> Vec<PodView<'a>> {
    let mut out = Vec::with_capacity(entries.len());
    for (index, ((obj, pod), entry)) in state.pods.iter().zip(entries).enumerate() {
        debug_assert_eq!(entry.holds, holds_pod_addresses(pod));
        debug_assert_eq!(entry.local, state.node.is_local(pod));
        if !entry.holds || entry.ips.is_empty() {
            continue;
        }
        out.push(PodView {
            obj,
            labels: pod.labels(),
            index,
            kept: None,
            local: entry.local,
            host_interface: entry.local.then(|| state.pod_interfaces.get(obj)).flatten(),
        });
    }
    out
}

/// [`live_pods`] on this node (`local`, the pods on it) when no address is listed by two
/// pods holding addresses: their views without a walk over every pod.
pub(super) fn local_live_pods<'a>(
    state: &'a ClusterState,
    entries: &[Box<PodEntry>],
    local: &'a BTreeSet<ObjectRef>,
) -> Vec<PodView<'a>> {
    let mut out = Vec::with_capacity(local.len());
    for obj in local {
        let (Some(pod), Ok(index)) = (
            state.pods.get(obj),
            entries.binary_search_by(|e| e.obj.cmp(obj)),
        ) else {
            debug_assert!(false, "{obj} is counted as local");
            continue;
        };
        let entry = &entries[index];
        debug_assert!(entry.local);
        if !entry.holds || entry.ips.is_empty() {
            continue;
        }
        out.push(PodView {
            obj,
            labels: pod.labels(),
            index,
            kept: None,
            local: true,
            host_interface: state.pod_interfaces.get(obj),
        });
    }
    out
}

/// What cannot be read of the addresses of the pods holding addresses (`unreadable`:
/// those with something that cannot be read), in state order.
pub(super) fn address_errors(
    entries: &[Box<PodEntry>],
    unreadable: &BTreeSet<ObjectRef>,
    diagnostics: &mut Vec<Diagnostic>,
) {
    for obj in unreadable {
        let Ok(at) = entries.binary_search_by(|e| e.obj.cmp(obj)) else {
            continue;
        };
        for (field, message) in entries[at].ip_errors() {
            diagnostics.push(Diagnostic::new(Subject::pod(obj), field, message));
        }
    }
}
