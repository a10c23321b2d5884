//! The changes whose propagation is measured, in turn: a pod label flipped, a policy
//! added, a pod created, a pod deleted, a namespace label flipped, a
//! ClusterNetworkPolicy replaced.

use netpol_compile::state::{Changes, ClusterState, ObjectRef};
use serde_json::json;

use crate::Size;
use crate::cluster::{CLUSTER_POLICIES, cluster_policy, ns_name, pod, policy};

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum ChangeKind {
    LabelFlip,
    PolicyAdded,
    PodCreated,
    PodDeleted,
    NamespaceLabel,
    ClusterPolicyReplaced,
}

impl ChangeKind {
    pub const ALL: [ChangeKind; 6] = [
        ChangeKind::LabelFlip,
        ChangeKind::PolicyAdded,
        ChangeKind::PodCreated,
        ChangeKind::PodDeleted,
        ChangeKind::NamespaceLabel,
        ChangeKind::ClusterPolicyReplaced,
    ];
    pub fn name(self) -> &'static str {
        match self {
            ChangeKind::LabelFlip => "pod label flipped",
            ChangeKind::PolicyAdded => "policy added",
            ChangeKind::PodCreated => "pod created",
            ChangeKind::PodDeleted => "pod deleted",
            ChangeKind::NamespaceLabel => "namespace label flipped",
            ChangeKind::ClusterPolicyReplaced => "ClusterNetworkPolicy replaced",
        }
    }
}

/// A local pod (`n` even) or any pod, chosen by `n`.
fn pick_pod(state: &ClusterState, n: usize) -> ObjectRef {
    if n.is_multiple_of(2) {
        let local: Vec<&ObjectRef> = state
            .pods
            .iter()
            .filter(|(_, p)| state.node.is_local(p))
            .map(|(k, _)| k)
            .collect();
        local[(n * 7) % local.len()].clone()
    } else {
        let k = state.pods.keys().nth((n * 7919) % state.pods.len());
        k.cloned().expect("pods")
    }
}

/// Applies change number `i` to `state`; returns its kind and the pods, policies and
/// namespaces it changed (as the Kubernetes source reports them to the compiler). Half the flips, created and
/// deleted pods, and the policies added in namespaces with local pods, touch this node's
/// endpoints.
pub fn change(state: &mut ClusterState, size: Size, i: usize) -> (ChangeKind, Changes) {
    let kind = ChangeKind::ALL[i % ChangeKind::ALL.len()];
    let n = i / ChangeKind::ALL.len();
    let mut changes = Changes::NONE;
    let pods = changes.pods.as_mut().expect("named");
    match kind {
        ChangeKind::LabelFlip => {
            let key = pick_pod(state, n);
            let pod = state.pods.get_mut(&key).expect("pod");
            let app = pod.labels().get("app").unwrap_or_default();
            let digit: usize = app.trim_start_matches("app-").parse().unwrap_or(0);
            pod.set_label("app", Some(&format!("app-{}", (digit + 1) % 10)));
            pods.insert(key);
        }
        ChangeKind::PolicyAdded => {
            // Half of them in a namespace with local pods (the policy is then in force).
            let ns = if n.is_multiple_of(2) {
                let local: Vec<&str> = state
                    .pods
                    .iter()
                    .filter(|(_, p)| state.node.is_local(p))
                    .map(|(k, _)| k.namespace.as_str())
                    .collect();
                local[(n * 7) % local.len()].to_owned()
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
            let key = ObjectRef::new(ns, name);
            state.policies.insert(key.clone(), p.into());
            changes.policies.as_mut().expect("named").insert(key);
        }
        ChangeKind::PodCreated => {
            let ns = (n * 13) % size.namespaces;
            let g = 200_000 + i;
            let ip = format!("10.250.{}.{}", (i / 256) % 256, i % 256);
            let name = format!("new-{i}");
            let p = pod(ns, &name, n, &[ip], n.is_multiple_of(2), g, size.nodes());
            let key = ObjectRef::new(ns_name(ns), name);
            state.pods.insert(key.clone(), p.into());
            pods.insert(key);
        }
        ChangeKind::PodDeleted => {
            let key = pick_pod(state, n + 1);
            state.pods.remove(&key);
            pods.insert(key);
        }
        ChangeKind::NamespaceLabel => {
            let ns = ns_name((n * 11) % size.namespaces);
            let namespace = state.namespaces.get_mut(&ns).expect("namespace");
            let labels = namespace.labels();
            let team = labels.get("team").unwrap_or_default();
            let digit: usize = team.trim_start_matches("team-").parse().unwrap_or(0);
            let team = format!("team-{}", (digit + 1) % 10);
            *namespace = namespace.with_labels(labels.with("team", Some(&team)));
            changes.namespaces.as_mut().expect("named").insert(ns);
        }
        ChangeKind::ClusterPolicyReplaced => {
            // Its place takes the next shape's policy (a new tier, subject and rules).
            let k = (n * 37) % CLUSTER_POLICIES;
            let (_, mut object) = cluster_policy(k + 1);
            let name = format!("cnp-{k:03}");
            object["metadata"]["name"] = json!(name);
            state.cluster_policies.insert(name.clone(), object);
            changes
                .cluster_policies
                .as_mut()
                .expect("named")
                .insert(name);
        }
    }
    (kind, changes)
}
