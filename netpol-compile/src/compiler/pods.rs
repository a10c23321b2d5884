//! Step 2 of the compile: the live pods with their addresses (an address belongs to
//! the first pod listing it), and what the compiler reads from namespaces.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::collections::hash_map::Entry;
use std::net::IpAddr;

use k8s_openapi::api::core::v1::Pod;

use crate::cache::{FastMap, PodEntry};
use crate::state::{ClusterState, HOST_INTERFACE_ANNOTATION, ObjectRef};
use crate::{Diagnostic, Subject};

static NO_LABELS: BTreeMap<String, String> = BTreeMap::new();

/// A live pod with an address, as peer and possibly as local endpoint.
pub(super) struct PodView<'a> {
    pub(super) obj: &'a ObjectRef,
    pub(super) labels: &'a BTreeMap<String, String>,
    /// Index in the cache's pod entries (= in the state's pods).
    pub(super) index: usize,
    /// The addresses this pod owns when another pod listed some of its addresses first;
    /// `None`: all of them.
    pub(super) kept: Option<Vec<IpAddr>>,
    pub(super) local: bool,
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
pub(super) fn live_pods<'a>(
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
            diagnostics.push(Diagnostic::new(Subject::pod(obj), field, message));
        }
        let mut ips = Cow::Borrowed(entry.ips.as_slice());
        let mut removed = 0;
        for (i, ip) in entry.ips.iter().enumerate() {
            match owner.entry(*ip) {
                Entry::Vacant(v) => {
                    v.insert(obj);
                }
                Entry::Occupied(other) => {
                    diagnostics.push(Diagnostic::new(
                        Subject::pod(obj),
                        "status.podIPs",
                        format!(
                            "address {ip} is also used by Pod {}; ignored here",
                            other.get()
                        ),
                    ));
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
