//! Local mode: cluster state from a directory of manifests, re-read when it changes.
//!
//! Files: every `*.yaml`, `*.yml` and `*.json` directly in the directory (hidden files
//! are skipped). `.generation`, when present, holds the change counter that the agent
//! echoes in its status file once the kernel has the change (see docs/ARCHITECTURE.md).
//!
//! A broken object never takes others down: it is reported, and where an earlier
//! version of the same object was valid, that version stays in force (as the API
//! server would keep the stored object when an update is rejected).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use k8s_openapi::api::core::v1::{Namespace, Pod};
use k8s_openapi::api::networking::v1::NetworkPolicy;

use super::manifest::{self, Object};
use netpol_compile::state::{ClusterState, ObjectRef};
use netpol_compile::{Diagnostic, validate_policy};

/// Identity of a file's contents for change detection.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct Fingerprint(Vec<(PathBuf, u64, Option<SystemTime>)>);

/// What one read of the directory produced.
#[derive(Debug, Default)]
pub struct Snapshot {
    pub namespaces: BTreeMap<String, Namespace>,
    pub pods: BTreeMap<ObjectRef, Pod>,
    pub policies: BTreeMap<ObjectRef, NetworkPolicy>,
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
        (self.diagnostics, self.generation)
    }
}

/// The manifest directory and the last valid version of each object seen in it.
pub struct LocalSource {
    dir: PathBuf,
    last_valid_policies: BTreeMap<ObjectRef, NetworkPolicy>,
}

const GENERATION_FILE: &str = ".generation";

impl LocalSource {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        LocalSource {
            dir: dir.into(),
            last_valid_policies: BTreeMap::new(),
        }
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
    pub fn read(&mut self) -> std::io::Result<Snapshot> {
        // `.generation` first: writers update it after the manifests, so a read that
        // overlaps a write reports at most the generation of what it read, never a
        // newer one with older files.
        let mut snapshot = Snapshot {
            generation: std::fs::read_to_string(self.dir.join(GENERATION_FILE))
                .ok()
                .and_then(|text| text.trim().parse().ok()),
            ..Snapshot::default()
        };
        let mut seen: BTreeMap<(&'static str, String), String> = BTreeMap::new();
        let mut rejected_policies: Vec<ObjectRef> = Vec::new();
        for path in self.manifest_files()? {
            let origin = path
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            let text = match std::fs::read_to_string(&path) {
                Ok(text) => text,
                Err(error) => {
                    snapshot.diagnostics.push(Diagnostic {
                        object: origin,
                        field: String::new(),
                        message: format!("cannot read: {error}"),
                    });
                    continue;
                }
            };
            for parsed in manifest::parse_documents(&text, &origin) {
                let object = match parsed {
                    Ok(object) => object,
                    Err(diagnostic) => {
                        if let Some(policy) = policy_ref_of(&diagnostic) {
                            rejected_policies.push(policy);
                        }
                        snapshot.diagnostics.push(diagnostic);
                        continue;
                    }
                };
                let kind = object.kind();
                let key = match name_of(&object) {
                    Ok(key) => key,
                    Err(message) => {
                        snapshot.diagnostics.push(Diagnostic {
                            object: format!("{kind} in {origin}"),
                            field: "metadata.name".into(),
                            message,
                        });
                        continue;
                    }
                };
                if let Some(first) = seen.get(&(kind, key.clone())) {
                    snapshot.diagnostics.push(Diagnostic {
                        object: format!("{kind} {key}"),
                        field: "metadata.name".into(),
                        message: format!(
                            "defined again in {origin} (first in {first}); the first is used"
                        ),
                    });
                    continue;
                }
                seen.insert((kind, key), origin.clone());
                self.admit(object, &mut snapshot, &mut rejected_policies);
            }
        }
        // A policy whose new version is broken keeps its last valid version.
        for policy in rejected_policies {
            if !snapshot.policies.contains_key(&policy)
                && let Some(previous) = self.last_valid_policies.get(&policy)
            {
                snapshot.diagnostics.push(Diagnostic {
                    object: format!("NetworkPolicy {policy}"),
                    field: String::new(),
                    message: "the last valid version stays in force".into(),
                });
                snapshot.policies.insert(policy, previous.clone());
            }
        }
        self.last_valid_policies = snapshot.policies.clone();
        Ok(snapshot)
    }

    fn admit(&self, object: Object, snapshot: &mut Snapshot, rejected: &mut Vec<ObjectRef>) {
        match object {
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
                let key =
                    ObjectRef::new(namespace, policy.metadata.name.clone().unwrap_or_default());
                match validate_policy(&policy) {
                    Ok(()) => {
                        snapshot.policies.insert(key, *policy);
                    }
                    Err(errors) => {
                        for error in errors {
                            snapshot.diagnostics.push(Diagnostic {
                                object: format!("NetworkPolicy {key}"),
                                field: error.field,
                                message: error.message,
                            });
                        }
                        rejected.push(key);
                    }
                }
            }
        }
    }
}

fn name_of(object: &Object) -> Result<String, String> {
    let (metadata, namespaced) = match object {
        Object::Namespace(ns) => (&ns.metadata, false),
        Object::Pod(pod) => (&pod.metadata, true),
        Object::NetworkPolicy(policy) => (&policy.metadata, true),
    };
    let name = metadata
        .name
        .as_deref()
        .filter(|n| !n.is_empty())
        .ok_or("missing")?;
    Ok(if namespaced {
        format!(
            "{}/{name}",
            metadata.namespace.as_deref().unwrap_or("default")
        )
    } else {
        name.to_owned()
    })
}

/// `ns/name` of a NetworkPolicy a parse diagnostic is about.
fn policy_ref_of(diagnostic: &Diagnostic) -> Option<ObjectRef> {
    let name = diagnostic.object.strip_prefix("NetworkPolicy ")?;
    let (namespace, name) = name.split_once('/')?;
    Some(ObjectRef::new(namespace, name))
}

#[cfg(test)]
mod tests {
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

    #[test]
    fn a_broken_update_keeps_the_last_valid_version_and_the_others() {
        let dir = tempdir("keep");
        write(&dir, "p.yaml", GOOD);
        write(&dir, "q.yaml", OTHER);
        let mut source = LocalSource::new(&dir);
        let first = source.read().unwrap();
        assert_eq!(first.policies.len(), 2);
        assert!(first.diagnostics.is_empty(), "{:?}", first.diagnostics);

        write(&dir, "p.yaml", BROKEN);
        let second = source.read().unwrap();
        assert_eq!(second.policies.len(), 2, "both policies stay in force");
        let p = &second.policies[&ObjectRef::new("x", "p")];
        assert_eq!(
            p.spec.as_ref().unwrap().policy_types.as_deref(),
            Some(&["Ingress".to_string()][..])
        );
        let messages: Vec<String> = second.diagnostics.iter().map(ToString::to_string).collect();
        assert!(
            messages
                .iter()
                .any(|m| m.starts_with("NetworkPolicy x/p: spec.ingress[0].ports[0].endPort")),
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
        let snapshot = LocalSource::new(&dir).read().unwrap();
        assert_eq!(
            snapshot.policies.keys().cloned().collect::<Vec<_>>(),
            [ObjectRef::new("x", "q")]
        );
        assert_eq!(snapshot.generation, Some(7));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn duplicates_keep_the_first_and_say_so() {
        let dir = tempdir("dup");
        write(&dir, "a.yaml", GOOD);
        write(&dir, "b.yaml", GOOD);
        let snapshot = LocalSource::new(&dir).read().unwrap();
        assert_eq!(snapshot.policies.len(), 1);
        assert_eq!(snapshot.diagnostics.len(), 1);
        assert!(snapshot.diagnostics[0].message.contains("first in a.yaml"));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
