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
//! The objects are mirrored as they are; the compiler admits policies (and keeps the
//! last valid version of one whose update is invalid). What only the reader can see is
//! reported here: unreadable files and documents, missing names, duplicates. A
//! NetworkPolicy whose document does not parse is listed in
//! [`Snapshot::unreadable_policies`], so that its last valid version stays in force.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use k8s_openapi::api::core::v1::{Namespace, Pod};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use netpol_compile::state::{ClusterState, NodeContext, ObjectRef};
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
        })
    }
}

/// Identity of a file's contents for change detection.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct Fingerprint(Vec<(PathBuf, u64, Option<SystemTime>)>);

/// What one read of the directory produced.
#[derive(Debug, Default)]
pub struct Snapshot {
    pub namespaces: BTreeMap<String, Namespace>,
    pub pods: BTreeMap<ObjectRef, Pod>,
    pub policies: BTreeMap<ObjectRef, NetworkPolicy>,
    /// NetworkPolicies named by a document that does not parse.
    pub unreadable_policies: BTreeSet<ObjectRef>,
    /// Problems only the reader sees (files, documents, names); the compiler reports
    /// the rest.
    pub diagnostics: Vec<Diagnostic>,
    /// Content of `.generation`, if any.
    pub generation: Option<u64>,
}

impl Snapshot {
    /// Fills the object part of `state` (the node context is the caller's).
    pub fn into_state(self, state: &mut ClusterState) -> (Vec<Diagnostic>, Option<u64>) {
        state.namespaces = self.namespaces;
        state.pods = self.pods;
        state.policies = self.policies;
        state.unreadable_policies = self.unreadable_policies;
        (self.diagnostics, self.generation)
    }
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
                snapshot.namespaces.insert(name, *ns);
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
            Object::NetworkPolicy(mut policy) => {
                let namespace = policy
                    .metadata
                    .namespace
                    .get_or_insert_with(|| "default".into())
                    .clone();
                let name = policy.metadata.name.clone().unwrap_or_default();
                snapshot
                    .policies
                    .insert(ObjectRef::new(namespace, name), *policy);
            }
        }
    }
}

/// The object's name (`namespace/name` for namespaced kinds, `default` when the
/// namespace is missing); `None` when it has none.
fn name_of(object: &Object) -> Option<ObjectName> {
    let (metadata, namespaced) = match object {
        Object::Namespace(ns) => (&ns.metadata, false),
        Object::Pod(pod) => (&pod.metadata, true),
        Object::NetworkPolicy(policy) => (&policy.metadata, true),
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
    use netpol_compile::{Compiled, Compiler};

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
    fn a_broken_update_keeps_the_last_valid_version_and_the_others() {
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
        let p = compiler.policy(&ObjectRef::new("x", "p")).unwrap();
        assert_eq!(
            p.spec.as_ref().unwrap().policy_types.as_deref(),
            Some(&["Ingress".to_string()][..])
        );
        assert!(
            messages
                .iter()
                .any(|m| m.starts_with("NetworkPolicy x/p: spec.ingress[0].ports[0].endPort")),
            "{messages:?}"
        );
        assert!(
            messages.contains(&"NetworkPolicy x/p: the last valid version stays in force".into()),
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
        assert_eq!(compiled.policies, [ObjectRef::new("x", "p")]);
        assert!(
            messages
                .iter()
                .any(|m| m.starts_with("NetworkPolicy x/p: spec.PodSelector")),
            "{messages:?}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_policy_broken_from_the_start_is_left_out_alone() {
        let dir = tempdir("fresh");
        write(&dir, "p.yaml", BROKEN);
        write(&dir, "q.yaml", OTHER);
        write(&dir, ".generation", "7\n");
        let snapshot = ManifestDir::new(&dir).read().unwrap();
        assert_eq!(snapshot.generation, Some(7));
        let (compiled, _) = compile(&mut Compiler::new(), snapshot);
        assert_eq!(compiled.policies, [ObjectRef::new("x", "q")]);
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
