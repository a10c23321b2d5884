//! Local mode: cluster state from a directory of manifests, re-read when it changes.
//!
//! [`LocalSource`] is the [`Source`]: it polls a [`ManifestDir`] (a cheap fingerprint
//! every `poll` interval) and reads it when the fingerprint changed; the status file's
//! generation is the directory's `.generation`.
//!
//! Files: every `*.yaml`, `*.yml` and `*.json` directly in the directory (hidden files
//! are skipped). `.generation`, when present, holds the change counter that the agent
//! echoes in its status file once the kernel has the change (see docs/ARCHITECTURE.md).
//!
//! The objects are mirrored as they are; the compiler admits policies, as far as they
//! can be read (docs/SECURITY.md). What only the reader can see is reported here:
//! unreadable files and documents, missing names, duplicates. A NetworkPolicy document
//! that does not parse strictly but whose metadata and podSelector do is read in part
//! ([`manifest::read_policy_in_part`]): its unreadable parts are listed in
//! [`Snapshot::unreadable_parts`] and the compiler reports them. One whose metadata or
//! podSelector does not parse is listed in [`Snapshot::unreadable_policies`], so that
//! the version in force before, if any, stays.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use k8s_openapi::api::core::v1::{Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::api::networking::v1::{NetworkPolicy, ServiceCIDR};
use netpol_compile::state::{
    Changes, ClusterState, HOST_INTERFACE_ANNOTATION, NamespaceInfo, NodeContext, ObjectRef,
    PodInfo, Policy, UnreadablePart,
};
use netpol_compile::{Diagnostic, Kind, ObjectName, Subject};

use super::manifest::{self, Object};
use super::{Error, Source, Update};

/// Local mode's [`Source`]: the manifest directory, polled.
pub struct LocalSource {
    dir: ManifestDir,
    node_name: Option<String>,
    ticker: tokio::time::Interval,
    fingerprint: Option<Fingerprint>,
    current: Option<Fingerprint>,
}

impl LocalSource {
    pub fn new(dir: impl Into<PathBuf>, node_name: Option<String>, poll: Duration) -> Self {
        let mut ticker = tokio::time::interval(poll);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        LocalSource {
            dir: ManifestDir::new(dir),
            node_name,
            ticker,
            fingerprint: None,
            current: None,
        }
    }

    fn error(&self, source: std::io::Error) -> Error {
        Error::Manifests {
            path: self.dir.dir().to_path_buf(),
            source,
        }
    }
}

impl Source for LocalSource {
    async fn changed(&mut self) -> Result<bool, Error> {
        self.ticker.tick().await;
        let current = self.dir.fingerprint().map_err(|e| self.error(e))?;
        let changed = self.fingerprint.as_ref() != Some(&current);
        self.current = Some(current);
        Ok(changed)
    }

    fn snapshot(&mut self, state: &mut ClusterState) -> Result<Update, Error> {
        let snapshot = self.dir.read().map_err(|e| self.error(e))?;
        self.fingerprint = self.current.take();
        state.node = NodeContext {
            name: self.node_name.clone(),
            ips: crate::node::addresses_or_none(),
        };
        let (diagnostics, generation) = snapshot.into_state(state);
        Ok(Update {
            diagnostics,
            generation,
            // The directory is read whole.
            changes: Changes::ANY,
        })
    }
}

/// Identity of a file's contents for change detection.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct Fingerprint(Vec<(PathBuf, u64, Option<SystemTime>)>);

/// What one read of the directory produced.
#[derive(Debug, Default)]
pub struct Snapshot {
    pub namespaces: BTreeMap<String, NamespaceInfo>,
    pub pods: BTreeMap<ObjectRef, Pod>,
    pub policies: BTreeMap<ObjectRef, Policy>,
    pub services: BTreeMap<ObjectRef, Service>,
    pub endpoint_slices: BTreeMap<ObjectRef, EndpointSlice>,
    pub service_cidrs: BTreeMap<String, ServiceCIDR>,
    /// ClusterNetworkPolicies as written, by name.
    pub cluster_policies: BTreeMap<String, serde_json::Value>,
    /// Nodes' labels and addresses, by name.
    pub nodes: BTreeMap<String, netpol_compile::state::NodePeer>,
    /// NetworkPolicies named by a document of which not even whom the policy selects
    /// can be read (its metadata or podSelector).
    pub unreadable_policies: BTreeSet<ObjectRef>,
    /// Parts of policies of `policies` that could not be read (see
    /// [`manifest::read_policy_in_part`]).
    pub unreadable_parts: BTreeMap<ObjectRef, Vec<UnreadablePart>>,
    /// Problems only the reader sees (files, documents, names); the compiler reports
    /// the rest.
    pub diagnostics: Vec<Diagnostic>,
    /// Content of `.generation`, if any.
    pub generation: Option<u64>,
}

impl Snapshot {
    /// Fills the object part of `state` (the node context is the caller's), and the
    /// interfaces the manifests name for pods (`netpol.dev/host-interface`: local mode
    /// is the only source of such names; the datapath checks each against the kernel).
    pub fn into_state(self, state: &mut ClusterState) -> (Vec<Diagnostic>, Option<u64>) {
        state.pod_interfaces = named_interfaces(&self.pods);
        state.namespaces = self.namespaces;
        state.pods = self
            .pods
            .iter()
            .map(|(key, pod)| (key.clone(), PodInfo::of(pod)))
            .collect();
        state.policies = self.policies;
        state.services = self.services;
        state.endpoint_slices = self.endpoint_slices;
        state.service_cidrs = self.service_cidrs;
        state.cluster_policies = self.cluster_policies;
        state.nodes = self.nodes;
        state.unreadable_policies = self.unreadable_policies;
        state.unreadable_parts = self.unreadable_parts;
        (self.diagnostics, self.generation)
    }
}

/// The interface each pod's manifest names with [`HOST_INTERFACE_ANNOTATION`].
fn named_interfaces(pods: &BTreeMap<ObjectRef, Pod>) -> BTreeMap<ObjectRef, String> {
    pods.iter()
        .filter_map(|(name, pod)| {
            let interface = pod
                .metadata
                .annotations
                .as_ref()?
                .get(HOST_INTERFACE_ANNOTATION)?;
            Some((name.clone(), interface.clone()))
        })
        .collect()
}

/// Reads the manifest directory.
pub struct ManifestDir {
    dir: PathBuf,
}

const GENERATION_FILE: &str = ".generation";

impl ManifestDir {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        ManifestDir { dir: dir.into() }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn manifest_files(&self) -> std::io::Result<Vec<PathBuf>> {
        let mut files: Vec<PathBuf> = std::fs::read_dir(&self.dir)?
            .filter_map(|entry| entry.ok().map(|e| e.path()))
            .filter(|path| {
                let name = path
                    .file_name()
                    .and_then(|n| n.to_str())
                    .unwrap_or_default();
                let extension = path
                    .extension()
                    .and_then(|e| e.to_str())
                    .unwrap_or_default();
                !name.starts_with('.')
                    && matches!(extension, "yaml" | "yml" | "json")
                    && path.is_file()
            })
            .collect();
        files.sort();
        Ok(files)
    }

    /// Cheap check for changes: names, sizes and modification times.
    pub fn fingerprint(&self) -> std::io::Result<Fingerprint> {
        let mut files = self.manifest_files()?;
        files.push(self.dir.join(GENERATION_FILE));
        Ok(Fingerprint(
            files
                .into_iter()
                .filter_map(|path| {
                    let meta = std::fs::metadata(&path).ok()?;
                    Some((path, meta.len(), meta.modified().ok()))
                })
                .collect(),
        ))
    }

    /// Reads the whole directory.
    pub fn read(&self) -> std::io::Result<Snapshot> {
        // `.generation` first: writers update it after the manifests, so a read that
        // overlaps a write reports at most the generation of what it read, never a
        // newer one with older files.
        let mut snapshot = Snapshot {
            generation: std::fs::read_to_string(self.dir.join(GENERATION_FILE))
                .ok()
                .and_then(|text| text.trim().parse().ok()),
            ..Snapshot::default()
        };
        let mut seen: BTreeMap<(&'static str, ObjectName), String> = BTreeMap::new();
        for path in self.manifest_files()? {
            let origin = path
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            let text = match std::fs::read_to_string(&path) {
                Ok(text) => text,
                Err(error) => {
                    snapshot.diagnostics.push(Diagnostic::new(
                        Subject::File {
                            origin,
                            document: None,
                        },
                        "",
                        format!("cannot read: {error}"),
                    ));
                    continue;
                }
            };
            for parsed in manifest::parse_documents(&text, &origin) {
                let object = match parsed {
                    Ok(object) => object,
                    Err(diagnostic) => {
                        if let Some((Kind::NetworkPolicy, policy)) = diagnostic.object() {
                            snapshot.unreadable_policies.insert(policy.clone());
                        }
                        snapshot.diagnostics.push(diagnostic);
                        continue;
                    }
                };
                let kind = object.kind();
                let Some(name) = name_of(&object) else {
                    snapshot.diagnostics.push(Diagnostic::new(
                        Subject::Object {
                            kind: Kind::of(kind),
                            name: ObjectName::In(origin.clone()),
                        },
                        "metadata.name",
                        "missing",
                    ));
                    continue;
                };
                if let Some(first) = seen.get(&(kind, name.clone())) {
                    snapshot.diagnostics.push(Diagnostic::new(
                        Subject::Object {
                            kind: Kind::of(kind),
                            name,
                        },
                        "metadata.name",
                        format!("defined again in {origin} (first in {first}); the first is used"),
                    ));
                    continue;
                }
                seen.insert((kind, name), origin.clone());
                object.insert_into_snapshot(&mut snapshot);
            }
        }
        Ok(snapshot)
    }
}

impl Object {
    /// Adds the object to `snapshot` as it is (namespace `default` when missing).
    fn insert_into_snapshot(self, snapshot: &mut Snapshot) {
        match self {
            Object::Namespace(ns) => {
                let name = ns.metadata.name.clone().unwrap_or_default();
                snapshot.namespaces.insert(name, NamespaceInfo::of(&ns));
            }
            Object::Pod(mut pod) => {
                let namespace = pod
                    .metadata
                    .namespace
                    .get_or_insert_with(|| "default".into())
                    .clone();
                let name = pod.metadata.name.clone().unwrap_or_default();
                snapshot.pods.insert(ObjectRef::new(namespace, name), *pod);
            }
            Object::NetworkPolicy(policy) => {
                insert_policy(snapshot, policy, Vec::new());
            }
            Object::NetworkPolicyInPart { policy, unreadable } => {
                insert_policy(snapshot, policy, unreadable);
            }
            Object::Service(service) => {
                let key = namespaced_key(&service.metadata);
                snapshot.services.insert(key, *service);
            }
            Object::EndpointSlice(slice) => {
                let key = namespaced_key(&slice.metadata);
                snapshot.endpoint_slices.insert(key, *slice);
            }
            Object::ServiceCIDR(cidr) => {
                let name = cidr.metadata.name.clone().unwrap_or_default();
                snapshot.service_cidrs.insert(name, *cidr);
            }
            Object::ClusterNetworkPolicy { name, object } => {
                snapshot.cluster_policies.insert(name, *object);
            }
            Object::Node(node) => {
                let name = node.metadata.name.clone().unwrap_or_default();
                snapshot
                    .nodes
                    .insert(name, netpol_compile::state::NodePeer::of(&node));
            }
        }
    }
}

/// Adds a policy (namespace `default` when missing) and the parts of it that could not
/// be read.
fn insert_policy(
    snapshot: &mut Snapshot,
    mut policy: Box<NetworkPolicy>,
    unreadable: Vec<UnreadablePart>,
) {
    let key = ObjectRef::of_policy(&mut policy);
    if !unreadable.is_empty() {
        snapshot.unreadable_parts.insert(key.clone(), unreadable);
    }
    snapshot.policies.insert(key, Policy::from(*policy));
}

fn namespaced_key(
    metadata: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta,
) -> ObjectRef {
    ObjectRef::new(
        metadata.namespace.as_deref().unwrap_or("default"),
        metadata.name.clone().unwrap_or_default(),
    )
}

/// The object's name (`namespace/name` for namespaced kinds, `default` when the
/// namespace is missing); `None` when it has none.
fn name_of(object: &Object) -> Option<ObjectName> {
    let (metadata, namespaced) = match object {
        Object::Namespace(ns) => (&ns.metadata, false),
        Object::Pod(pod) => (&pod.metadata, true),
        Object::NetworkPolicy(policy) | Object::NetworkPolicyInPart { policy, .. } => {
            (&policy.metadata, true)
        }
        Object::Service(service) => (&service.metadata, true),
        Object::EndpointSlice(slice) => (&slice.metadata, true),
        Object::ServiceCIDR(cidr) => (&cidr.metadata, false),
        Object::Node(node) => (&node.metadata, false),
        Object::ClusterNetworkPolicy { name, .. } => {
            return Some(ObjectName::Cluster(name.clone()));
        }
    };
    let name = metadata.name.as_deref().filter(|n| !n.is_empty())?;
    Some(if namespaced {
        ObjectName::Namespaced(ObjectRef::new(
            metadata.namespace.as_deref().unwrap_or("default"),
            name,
        ))
    } else {
        ObjectName::Cluster(name.to_owned())
    })
}

#[cfg(test)]
mod tests {
    use netpol_compile::{Compiled, Compiler, Direction};

    use super::*;

    fn write(dir: &Path, name: &str, text: &str) {
        std::fs::write(dir.join(name), text).unwrap();
    }

    const GOOD: &str = "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: p, namespace: x}\n\
                        spec: {podSelector: {}, policyTypes: [Ingress]}\n";
    const BROKEN: &str = "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: p, namespace: x}\n\
                          spec: {podSelector: {}, ingress: [{ports: [{port: 90, endPort: 80}]}]}\n";
    const OTHER: &str = "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: q, namespace: x}\n\
                         spec: {podSelector: {}}\n";

    fn tempdir(tag: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("netpol-local-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    /// The snapshot as the agent's loop compiles it: source diagnostics first.
    fn compile(compiler: &mut Compiler, snapshot: Snapshot) -> (Compiled, Vec<String>) {
        let mut state = ClusterState::default();
        let (mut diagnostics, _) = snapshot.into_state(&mut state);
        let compiled = compiler.compile(&state);
        diagnostics.extend(compiled.diagnostics.iter().cloned());
        (
            compiled,
            diagnostics.iter().map(ToString::to_string).collect(),
        )
    }

    #[test]
    fn a_broken_update_is_enforced_as_far_as_it_can_be_read_and_the_others_stay() {
        let dir = tempdir("keep");
        write(&dir, "p.yaml", GOOD);
        write(&dir, "q.yaml", OTHER);
        let source = ManifestDir::new(&dir);
        let mut compiler = Compiler::new();
        let (first, messages) = compile(&mut compiler, source.read().unwrap());
        assert_eq!(first.policies.len(), 2);
        assert!(messages.is_empty(), "{messages:?}");

        write(&dir, "p.yaml", BROKEN);
        let snapshot = source.read().unwrap();
        assert_eq!(
            snapshot.policies.len(),
            2,
            "the source mirrors both as they are"
        );
        let (second, messages) = compile(&mut compiler, snapshot);
        assert_eq!(second.policies.len(), 2, "both policies stay in force");
        // The new version, not the last valid one: its rule cannot be read and allows
        // nothing.
        let p = compiler.policy(&ObjectRef::new("x", "p")).unwrap();
        assert_eq!(p.spec.as_ref().unwrap().policy_types, None);
        assert!(second.rules.is_empty());
        assert!(
            messages
                .iter()
                .any(|m| m.starts_with("NetworkPolicy x/p: spec.ingress[0].ports[0].endPort")),
            "{messages:?}"
        );
        assert!(
            !messages.iter().any(|m| m.contains("stays in force")),
            "{messages:?}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn an_unreadable_update_keeps_the_last_valid_version() {
        let dir = tempdir("unreadable");
        write(&dir, "p.yaml", GOOD);
        let source = ManifestDir::new(&dir);
        let mut compiler = Compiler::new();
        compile(&mut compiler, source.read().unwrap());

        write(&dir, "p.yaml", &GOOD.replace("podSelector", "PodSelector"));
        let snapshot = source.read().unwrap();
        assert!(snapshot.policies.is_empty());
        assert_eq!(
            snapshot.unreadable_policies.iter().collect::<Vec<_>>(),
            [&ObjectRef::new("x", "p")]
        );
        let (compiled, messages) = compile(&mut compiler, snapshot);
        assert_eq!(*compiled.policies, [ObjectRef::new("x", "p")]);
        assert!(
            messages
                .iter()
                .any(|m| m.starts_with("NetworkPolicy x/p: spec.PodSelector")),
            "{messages:?}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_policy_broken_from_the_start_is_enforced_as_far_as_it_can_be_read() {
        let dir = tempdir("fresh");
        write(&dir, "p.yaml", BROKEN);
        write(&dir, "q.yaml", OTHER);
        write(&dir, ".generation", "7\n");
        let snapshot = ManifestDir::new(&dir).read().unwrap();
        assert_eq!(snapshot.generation, Some(7));
        let (compiled, _) = compile(&mut Compiler::new(), snapshot);
        assert_eq!(
            *compiled.policies,
            [ObjectRef::new("x", "p"), ObjectRef::new("x", "q")]
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// Namespace x: pods a (app=a, serves http on 8080) and b (app=b).
    const PODS: &str = "apiVersion: v1\nkind: Pod\nmetadata: {name: a, namespace: x, labels: {app: a}}\n\
        spec: {containers: [{name: c, ports: [{name: http, containerPort: 8080}]}]}\nstatus: {phase: Running, podIP: 10.0.0.1}\n---\n\
        apiVersion: v1\nkind: Pod\nmetadata: {name: b, namespace: x, labels: {app: b}}\n\
        spec: {containers: [{name: c}]}\nstatus: {phase: Running, podIP: 10.0.0.2}\n";

    /// Compiles PODS with one policy document; returns the maps and the messages.
    fn with_policy(tag: &str, policy: &str) -> (Compiled, Vec<String>) {
        let dir = tempdir(tag);
        write(&dir, "pods.yaml", PODS);
        write(&dir, "p.yaml", policy);
        let snapshot = ManifestDir::new(&dir).read().unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
        compile(&mut Compiler::new(), snapshot)
    }

    fn passes(c: &Compiled, src: &str, dst: &str, port: u16, direction: Direction) -> bool {
        let ip = |s: &str| s.parse().unwrap();
        !netpol_compile::model::decide(c, ip(src), ip(dst), 6, port, direction)
            .reason
            .is_drop()
    }

    const HEAD: &str = "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: p, namespace: x}\n";

    #[test]
    fn nodes_in_manifests_are_what_a_cluster_network_policy_nodes_peer_selects() {
        let nodes = "apiVersion: v1\nkind: Node\nmetadata: {name: n1, labels: {role: control-plane}}\n\
            status: {addresses: [{type: InternalIP, address: 10.0.9.1}, {type: Hostname, address: n1}]}\n---\n\
            apiVersion: v1\nkind: Node\nmetadata: {name: n2, labels: {role: worker}}\n\
            status: {addresses: [{type: InternalIP, address: 10.0.9.2}]}\n";
        let cnp = "apiVersion: policy.networking.k8s.io/v1alpha2\nkind: ClusterNetworkPolicy\n\
            metadata: {name: no-control-plane}\n\
            spec: {tier: Admin, priority: 1, subject: {namespaces: {}},\n\
              egress: [{action: Deny, to: [{nodes: {matchLabels: {role: control-plane}}}]}]}\n";
        let (c, messages) = with_policy("nodes", &format!("{nodes}---\n{cnp}"));
        assert!(messages.is_empty(), "{messages:?}");
        assert!(!passes(&c, "10.0.0.1", "10.0.9.1", 6443, Direction::Egress));
        assert!(passes(&c, "10.0.0.1", "10.0.9.2", 10250, Direction::Egress));
    }

    #[test]
    fn a_peer_with_an_unknown_field_is_left_out_of_its_rule_and_named() {
        // The misspelt namespaceSelector read strictly would be no peer at all: "any".
        let (c, messages) = with_policy(
            "peer",
            &format!(
                "{HEAD}spec:\n  podSelector: {{matchLabels: {{app: b}}}}\n  ingress:\n  - from:\n    \
                 - podSelector: {{matchLabels: {{app: a}}}}\n    - NamespaceSelector: {{matchLabels: {{team: z}}}}\n"
            ),
        );
        assert_eq!(
            messages,
            [
                "NetworkPolicy x/p: spec.ingress[0].from[1].NamespaceSelector: unknown field: this peer \
              cannot be read and is left out of the rule"
            ]
        );
        assert!(passes(&c, "10.0.0.1", "10.0.0.2", 80, Direction::Ingress));
        assert!(!passes(&c, "10.9.9.9", "10.0.0.2", 80, Direction::Ingress));
    }

    #[test]
    fn a_rule_or_port_that_does_not_parse_allows_nothing_and_the_pod_stays_isolated() {
        for (tag, rule) in [
            ("rule", "  - form: [{podSelector: {}}]\n"),
            ("list", "  - from: {podSelector: {}}\n"),
            ("port", "  - ports: [{port: 80, endport: 90}]\n"),
            ("portlist", "  - ports: {port: 80}\n"),
            ("section", "    from: []\n"),
        ] {
            let rules = if tag == "section" {
                format!("  ingress:\n{rule}")
                    .replace("  ingress:\n    from: []\n", "  ingress: {from: []}\n")
            } else {
                format!("  ingress:\n{rule}")
            };
            let (c, messages) = with_policy(
                tag,
                &format!("{HEAD}spec:\n  podSelector: {{matchLabels: {{app: b}}}}\n{rules}"),
            );
            // What could not be read, and (for a list) that the rule is left out.
            assert!(
                !messages.is_empty()
                    && messages
                        .iter()
                        .all(|m| m.starts_with("NetworkPolicy x/p: spec.ingress")),
                "{tag}: {messages:?}"
            );
            assert!(
                !passes(&c, "10.0.0.1", "10.0.0.2", 80, Direction::Ingress),
                "{tag}"
            );
            assert!(
                passes(&c, "10.0.0.2", "10.0.0.1", 80, Direction::Ingress),
                "{tag}: a is not selected"
            );
        }
    }

    #[test]
    fn policy_types_that_do_not_parse_isolate_both_directions() {
        let (c, messages) = with_policy(
            "types",
            &format!(
                "{HEAD}spec:\n  podSelector: {{matchLabels: {{app: b}}}}\n  policyTypes: Egress\n"
            ),
        );
        assert_eq!(messages.len(), 1, "{messages:?}");
        assert!(
            messages[0].starts_with("NetworkPolicy x/p: spec.policyTypes: "),
            "{messages:?}"
        );
        assert!(!passes(&c, "10.0.0.1", "10.0.0.2", 80, Direction::Ingress));
        assert!(!passes(&c, "10.0.0.2", "10.0.0.1", 80, Direction::Egress));
    }

    #[test]
    fn an_unknown_spec_field_may_be_a_misspelt_egress_so_egress_is_isolated() {
        let (c, messages) = with_policy(
            "egres",
            &format!(
                "{HEAD}spec:\n  podSelector: {{matchLabels: {{app: b}}}}\n  egres: [{{to: [{{podSelector: {{}}}}]}}]\n"
            ),
        );
        assert_eq!(
            messages,
            [
                "NetworkPolicy x/p: spec.egres: unknown field: it may be a misspelt egress, so the \
              policy isolates egress too"
            ]
        );
        assert!(!passes(&c, "10.0.0.2", "10.0.0.1", 80, Direction::Egress));
        assert!(!passes(&c, "10.0.0.1", "10.0.0.2", 80, Direction::Ingress));
        // With policyTypes saying what is isolated, the field is only left out.
        let (c, messages) = with_policy(
            "egres-typed",
            &format!(
                "{HEAD}spec:\n  podSelector: {{matchLabels: {{app: b}}}}\n  policyTypes: [Ingress]\n  egres: []\n"
            ),
        );
        assert_eq!(
            messages,
            ["NetworkPolicy x/p: spec.egres: unknown field: left out"]
        );
        assert!(passes(&c, "10.0.0.2", "10.0.0.1", 80, Direction::Egress));
    }

    #[test]
    fn without_readable_metadata_or_pod_selector_the_document_cannot_be_read() {
        for (tag, document) in [
            (
                "meta",
                "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: p, namespce: x}\nspec: {podSelector: {}}\n",
            ),
            (
                "selector",
                &*format!("{HEAD}spec: {{podSelector: {{matchLabel: {{app: b}}}}}}\n"),
            ),
            (
                "misspelt",
                &*format!("{HEAD}spec: {{podSelectr: {{}}, ingress: []}}\n"),
            ),
            ("top", &*format!("{HEAD}specs: {{podSelector: {{}}}}\n")),
        ] {
            let (c, messages) = with_policy(tag, document);
            assert!(c.policies.is_empty(), "{tag}");
            assert_eq!(messages.len(), 1, "{tag}: {messages:?}");
        }
    }

    #[test]
    fn the_interface_a_manifest_names_for_a_pod_reaches_the_compiled_pod() {
        let dir = tempdir("named");
        write(
            &dir,
            "pods.yaml",
            "apiVersion: v1\nkind: Pod\nmetadata: {name: a, namespace: x, annotations: \
             {netpol.dev/host-interface: veth-a}}\nspec: {containers: [{name: c}]}\n\
             status: {podIP: 10.0.0.1}\n---\n\
             apiVersion: v1\nkind: Pod\nmetadata: {name: b, namespace: x}\n\
             spec: {containers: [{name: c}]}\nstatus: {podIP: 10.0.0.2}\n",
        );
        let (compiled, messages) =
            compile(&mut Compiler::new(), ManifestDir::new(&dir).read().unwrap());
        assert!(messages.is_empty(), "{messages:?}");
        let named: Vec<_> = compiled
            .local_pods
            .iter()
            .map(|pod| (pod.pod.name.as_str(), pod.host_interface.as_deref()))
            .collect();
        assert_eq!(named, [("a", Some("veth-a")), ("b", None)]);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn duplicates_keep_the_first_and_say_so() {
        let dir = tempdir("dup");
        write(&dir, "a.yaml", GOOD);
        write(&dir, "b.yaml", GOOD);
        let snapshot = ManifestDir::new(&dir).read().unwrap();
        assert_eq!(snapshot.policies.len(), 1);
        assert_eq!(snapshot.diagnostics.len(), 1);
        assert!(snapshot.diagnostics[0].message.contains("first in a.yaml"));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
