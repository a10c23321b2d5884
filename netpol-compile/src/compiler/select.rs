//! Step 2 of a compile: which policies select each local endpoint, kept from the last
//! compile for the pods whose inputs are the same.
//!
//! A local pod's NetworkPolicies depend on its labels and the policies in force of its
//! namespace; its ClusterNetworkPolicies on its labels, its namespace's labels and the
//! ClusterNetworkPolicies read. Matching every local pod against every
//! ClusterNetworkPolicy and looking its namespace up among 15,000 policies was a sixth of
//! a compile with nothing to do at 150,000 pods; most changes move none of those inputs.

use std::collections::HashMap;
use std::sync::Arc;

use super::pods::PodView;
use super::tiers::ClusterPolicy;
use super::{Endpoint, Policies, same_shared};
use crate::Direction;
use crate::cache::Namespaces;
use crate::state::{Labels, ObjectRef};

/// What selected each local pod in the last compile, and what that was read from.
#[derive(Default)]
pub(crate) struct Selection {
    /// The policies in force it was made with (their shared lists: the same lists are
    /// the same policies).
    policies: Option<Policies>,
    /// The ClusterNetworkPolicies it was made with (the memo's shared values, in order).
    cluster: Vec<Arc<ClusterPolicy>>,
    by_pod: HashMap<ObjectRef, Selected>,
}

struct Selected {
    labels: Labels,
    /// The version of its namespace's entry (`None`: the namespace is not known).
    namespace: Option<u64>,
    selected_by: [Vec<usize>; 2],
    cluster_selected: Vec<usize>,
}

/// The local pods among `pods`, each with the policies in force of its namespace that
/// select it, per direction, and the ClusterNetworkPolicies whose subject it is. What
/// `memo` holds for a pod is taken when its inputs are the same; `memo` then holds this
/// compile's selection.
pub(super) fn select_endpoints(
    pods: &[PodView<'_>],
    policies: &Policies,
    cluster_policies: &[Arc<ClusterPolicy>],
    namespaces: &Namespaces,
    memo: &mut Selection,
) -> Vec<Endpoint> {
    let same_policies = memo.policies.as_ref().is_some_and(|last| last.is(policies));
    let same_cluster = same_shared(&memo.cluster, cluster_policies);
    let mut last = std::mem::take(&mut memo.by_pod);
    let mut endpoints = Vec::new();
    for (pod, p) in pods.iter().enumerate().filter(|(_, p)| p.local) {
        let namespace = namespaces.get(p.obj.namespace.as_str());
        let version = namespace.map(|ns| ns.version);
        let kept = last.remove(p.obj).filter(|s| s.labels == *p.labels);
        let selected_by = match &kept {
            Some(kept) if same_policies => kept.selected_by.clone(),
            _ => selected_by(p, policies),
        };
        let cluster_selected = match (&kept, namespace) {
            (Some(kept), _) if same_cluster && kept.namespace == version => {
                kept.cluster_selected.clone()
            }
            (_, Some(ns)) => (0..cluster_policies.len())
                .filter(|&i| cluster_policies[i].selects(p.labels, &ns.labels))
                .collect(),
            (_, None) => Vec::new(),
        };
        memo.by_pod.insert(
            p.obj.clone(),
            Selected {
                labels: p.labels.clone(),
                namespace: version,
                selected_by: selected_by.clone(),
                cluster_selected: cluster_selected.clone(),
            },
        );
        endpoints.push(Endpoint {
            pod,
            selected_by,
            cluster_selected,
        });
    }
    memo.policies = Some(policies.clone());
    memo.cluster = cluster_policies.to_vec();
    endpoints
}

/// The policies in force of `p`'s namespace that select it, per direction (0 ingress,
/// 1 egress).
fn selected_by(p: &PodView<'_>, policies: &Policies) -> [Vec<usize>; 2] {
    let mut selected_by = [Vec::new(), Vec::new()];
    for i in policies.in_namespace(&p.obj.namespace) {
        let policy = policies.parsed(i);
        if policy.pod_selector.matches(p.labels) {
            for (d, direction) in Direction::BOTH.into_iter().enumerate() {
                if policy.rules(direction).is_some() {
                    selected_by[d].push(i);
                }
            }
        }
    }
    selected_by
}
