//! The changes whose propagation is measured: a pod label flipped, a policy added, a pod
//! created, in turn.

use std::collections::BTreeMap;

use netpol_compile::state::{ClusterState, ObjectRef};
use serde_json::json;

use crate::Size;
use crate::cluster::{ns_name, pod, policy};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ChangeKind {
    LabelFlip,
    PolicyAdded,
    PodCreated,
}

impl ChangeKind {
    pub const ALL: [ChangeKind; 3] = [
        ChangeKind::LabelFlip,
        ChangeKind::PolicyAdded,
        ChangeKind::PodCreated,
    ];
    pub fn name(self) -> &'static str {
        match self {
            ChangeKind::LabelFlip => "pod label flipped",
            ChangeKind::PolicyAdded => "policy added",
            ChangeKind::PodCreated => "pod created",
        }
    }
}

/// Applies change number `i` to `state`. Half the flips and created pods, and the
/// policies added in namespaces with local pods, touch this node's endpoints.
pub fn change(state: &mut ClusterState, size: Size, i: usize) -> ChangeKind {
    let kind = ChangeKind::ALL[i % 3];
    let n = i / 3;
    match kind {
        ChangeKind::LabelFlip => {
            let keys: Vec<ObjectRef> = if n.is_multiple_of(2) {
                let local: Vec<&ObjectRef> = state
                    .pods
                    .iter()
                    .filter(|(_, p)| state.node.is_local(p))
                    .map(|(k, _)| k)
                    .collect();
                vec![local[(n * 7) % local.len()].clone()]
            } else {
                let k = state.pods.keys().nth((n * 7919) % state.pods.len());
                k.into_iter().cloned().collect()
            };
            let pod = state.pods.get_mut(&keys[0]).expect("pod");
            let labels = pod.metadata.labels.get_or_insert_with(BTreeMap::new);
            let app = labels.get("app").cloned().unwrap_or_default();
            let digit: usize = app.trim_start_matches("app-").parse().unwrap_or(0);
            labels.insert("app".into(), format!("app-{}", (digit + 1) % 10));
        }
        ChangeKind::PolicyAdded => {
            // Half of them in a namespace with local pods (the policy is then in force).
            let ns = if n.is_multiple_of(2) {
                let local: Vec<&String> = state
                    .pods
                    .iter()
                    .filter(|(_, p)| state.node.is_local(p))
                    .map(|(k, _)| &k.namespace)
                    .collect();
                local[(n * 7) % local.len()].clone()
            } else {
                ns_name((n * 7 + 1) % size.namespaces)
            };
            let name = format!("added-{i}");
            let spec = json!({
                "podSelector": {"matchLabels": {"app": format!("app-{}", n % 10)}},
                "ingress": [{"from": [{"podSelector": {"matchLabels": {"app": format!("app-{}", (n + 3) % 10)}}}],
                             "ports": [{"port": 7000 + i}]}],
            });
            let p = policy(&ns, &name, spec);
            state.policies.insert(ObjectRef::new(ns, name), p);
        }
        ChangeKind::PodCreated => {
            let ns = (n * 13) % size.namespaces;
            let g = 200_000 + i;
            let ip = format!("10.250.{}.{}", (i / 256) % 256, i % 256);
            let name = format!("new-{i}");
            let p = pod(ns, &name, n, &[ip], n.is_multiple_of(2), g);
            state.pods.insert(ObjectRef::new(ns_name(ns), name), p);
        }
    }
    kind
}
