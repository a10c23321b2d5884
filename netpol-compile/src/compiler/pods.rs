//! Step 2 of the compile: the live pods with their addresses (an address listed by
//! several belongs to the one [`claims_before`] the others: running, then created last,
//! then first in name order), and what the compiler reads from namespaces.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::collections::hash_map::Entry;
use std::net::IpAddr;

use crate::cache::{FastMap, PodEntry};
use crate::state::{
    ClusterState, Labels, ObjectRef, PodInfo, claim_reason, claims_before, holds_pod_addresses,
};
use crate::{Diagnostic, Subject};

/// A live pod with an address, as peer and possibly as local endpoint.
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
    pub(super) fn ips<'e>(&'e self, entries: &'e [PodEntry]) -> &'e [IpAddr] {
        self.kept.as_deref().unwrap_or(&entries[self.index].ips)
    }
}

/// Whether the namespace opted into audit mode (annotation `netpol.dev/audit: "true"`).
pub(super) fn audited_namespace(state: &ClusterState, namespace: &str) -> bool {
    state
        .namespaces
        .get(namespace)
        .and_then(|ns| ns.metadata.annotations.as_ref())
        .and_then(|annotations| annotations.get(crate::state::AUDIT_ANNOTATION))
        .is_some_and(|value| value == "true")
}

/// Labels of every namespace, with `kubernetes.io/metadata.name` as the API server sets it.
pub(super) fn namespace_labels(state: &ClusterState) -> BTreeMap<String, BTreeMap<String, String>> {
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

/// The live pods with an address, in state order; `entries` are the cache's pod entries
/// (one per pod of the state, same order). An address listed by several live pods
/// belongs to the one [`claims_before`] the others; the others are reported and keep
/// only the addresses they hold.
pub(super) fn live_pods<'a>(
    state: &'a ClusterState,
    entries: &[PodEntry],
    diagnostics: &mut Vec<Diagnostic>,
) -> Vec<PodView<'a>> {
    // First pass: who holds each address (index into the state's pods).
    let pods: Vec<(&ObjectRef, &PodInfo)> = state.pods.iter().collect();
    let mut owner: FastMap<IpAddr, usize> = FastMap::default();
    owner.reserve(entries.len() * 2);
    for (index, ((obj, pod), entry)) in pods.iter().zip(entries).enumerate() {
        if !holds_pod_addresses(pod) {
            continue;
        }
        for (field, message) in &entry.ip_errors {
            diagnostics.push(Diagnostic::new(Subject::pod(obj), field, message));
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
    let mut out = Vec::with_capacity(entries.len());
    for (index, ((obj, pod), entry)) in pods.iter().zip(entries).enumerate() {
        if !holds_pod_addresses(pod) {
            continue;
        }
        let mut ips = Cow::Borrowed(entry.ips.as_slice());
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
            local: state.node.is_local(pod),
            host_interface: state.pod_interfaces.get(obj),
        });
    }
    out
}
