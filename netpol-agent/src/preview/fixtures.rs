//! Cluster states for the preview tests, written as manifests.

use std::net::IpAddr;

use crate::source::manifest::parse_documents;
use netpol_compile::state::ClusterState;

/// A state from manifest text (every object must parse), with the node's addresses.
pub fn state(yaml: &str, node_ips: &[&str]) -> ClusterState {
    let mut state = ClusterState::default();
    state.node.ips = node_ips
        .iter()
        .map(|s| s.parse::<IpAddr>().unwrap())
        .collect();
    add(&mut state, yaml);
    state
}

/// Adds (or replaces) the objects of `yaml`.
pub fn add(state: &mut ClusterState, yaml: &str) {
    for object in parse_documents(yaml, "test.yaml") {
        object.expect("test manifest").insert_into(state);
    }
}

/// The Calico stars demo: namespaces, pods and the ports they serve.
pub const STARS: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: stars}
---
apiVersion: v1
kind: Namespace
metadata: {name: client, labels: {role: client}}
---
apiVersion: v1
kind: Namespace
metadata: {name: management-ui, labels: {role: management-ui}}
---
apiVersion: v1
kind: Pod
metadata: {name: frontend, namespace: stars, labels: {role: frontend}}
spec: {containers: [{name: main, ports: [{name: http, containerPort: 80, protocol: TCP}]}]}
status: {phase: Running, podIP: 10.0.0.1}
---
apiVersion: v1
kind: Pod
metadata: {name: backend, namespace: stars, labels: {role: backend}}
spec: {containers: [{name: main, ports: [{name: redis, containerPort: 6379, protocol: TCP}]}]}
status: {phase: Running, podIP: 10.0.0.2}
---
apiVersion: v1
kind: Pod
metadata: {name: client, namespace: client, labels: {role: client}}
spec: {containers: [{name: main, ports: [{name: client, containerPort: 9000, protocol: TCP}]}]}
status: {phase: Running, podIP: 10.0.1.1}
---
apiVersion: v1
kind: Pod
metadata: {name: management-ui, namespace: management-ui, labels: {role: management-ui}}
spec: {containers: [{name: main, ports: [{name: ui, containerPort: 9001, protocol: TCP}]}]}
status: {phase: Running, podIP: 10.0.2.1}
"#;

/// The stars demo's policies: backend accepts TCP 6379 only from role=frontend pods of
/// stars; frontend accepts TCP 80 only from namespaces labelled role=client.
pub const STARS_POLICIES: &str = r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: backend-policy, namespace: stars}
spec:
  podSelector: {matchLabels: {role: backend}}
  ingress:
    - from: [{podSelector: {matchLabels: {role: frontend}}}]
      ports: [{protocol: TCP, port: 6379}]
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: frontend-policy, namespace: stars}
spec:
  podSelector: {matchLabels: {role: frontend}}
  ingress:
    - from: [{namespaceSelector: {matchLabels: {role: client}}}]
      ports: [{protocol: TCP, port: 80}]
"#;

/// The stars demo with its policies, the node at 10.0.9.9.
pub fn stars_with_policies() -> ClusterState {
    let mut s = state(STARS, &["10.0.9.9"]);
    add(&mut s, STARS_POLICIES);
    s
}
