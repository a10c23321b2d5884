//! Reading manifests for the preview commands: the manifest directory exactly as local
//! mode reads it, and NetworkPolicies and ClusterNetworkPolicies to apply on top of it
//! (`--apply`).

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use super::PreviewError;
use crate::source::local::ManifestDir;
use crate::source::manifest::{self, Object};
use netpol_compile::state::{ClusterState, NodeContext, ObjectRef, Policy, UnreadablePart};
use netpol_compile::{Diagnostic, Kind, ObjectName, Subject};

/// A cluster state read from manifests, and the problems found on the way.
#[derive(Clone, Debug, Default)]
pub struct Loaded {
    pub state: ClusterState,
    /// Problems reading the objects, as local mode reports them (the compiler reports
    /// invalid policies).
    pub diagnostics: Vec<Diagnostic>,
}

/// Reads `dir` the way the agent's local mode does ([`ManifestDir`]); the compiler
/// admits the policies and reports the invalid ones. Every pod is
/// treated as local (a preview of the whole cluster); `node_ips` are the node's
/// addresses (traffic from them to pods always passes).
pub fn load_manifests(dir: &Path, node_ips: &[IpAddr]) -> Result<Loaded, PreviewError> {
    let io = |source| PreviewError::Io {
        path: dir.to_path_buf(),
        source,
    };
    if !dir.is_dir() {
        return Err(io(std::io::Error::new(
            std::io::ErrorKind::NotADirectory,
            "not a directory",
        )));
    }
    let snapshot = ManifestDir::new(dir).read().map_err(io)?;
    let mut state = ClusterState {
        node: NodeContext {
            name: None,
            ips: node_ips.to_vec(),
        },
        ..ClusterState::default()
    };
    let (diagnostics, _generation) = snapshot.into_state(&mut state);
    Ok(Loaded { state, diagnostics })
}

/// NetworkPolicies (by `namespace/name`) and ClusterNetworkPolicies (by name) to create
/// or replace, read from files or directories in order: a later definition of the same
/// policy replaces an earlier one.
/// A policy is applied as the agent would enforce it: as far as it can be read (the
/// compile of the result reports what cannot be).
#[derive(Clone, Debug, Default)]
pub struct Overlay {
    pub policies: BTreeMap<ObjectRef, Policy>,
    /// Parts of `policies` their documents did not let be read.
    pub unreadable_parts: BTreeMap<ObjectRef, Vec<UnreadablePart>>,
    /// ClusterNetworkPolicies as written, by name.
    pub cluster_policies: BTreeMap<String, serde_json::Value>,
    /// Documents that could not be read at all (nothing is applied for them, as the
    /// agent keeps the version in force) and objects of other kinds (ignored).
    pub diagnostics: Vec<Diagnostic>,
}

impl Overlay {
    /// Reads every path: a file, or a directory whose `*.yaml`, `*.yml` and `*.json`
    /// files (not hidden) are read in name order, as local mode does.
    pub fn read(paths: &[PathBuf]) -> Result<Overlay, PreviewError> {
        let mut overlay = Overlay::default();
        for path in paths {
            for file in manifest_files(path)? {
                let text = std::fs::read_to_string(&file).map_err(|source| PreviewError::Io {
                    path: file.clone(),
                    source,
                })?;
                let origin = file.display().to_string();
                overlay.add_text(&text, &origin);
            }
        }
        Ok(overlay)
    }

    /// Adds the objects of one manifest text; `origin` names it in messages.
    pub fn add_text(&mut self, text: &str, origin: &str) {
        for parsed in manifest::parse_documents(text, origin) {
            let (mut policy, unreadable) = match parsed {
                Err(diagnostic) => {
                    self.diagnostics.push(diagnostic);
                    continue;
                }
                Ok(Object::NetworkPolicy(policy)) => (policy, Vec::new()),
                Ok(Object::NetworkPolicyInPart { policy, unreadable }) => (policy, unreadable),
                Ok(Object::ClusterNetworkPolicy { name, object }) => {
                    self.cluster_policies.insert(name, *object);
                    continue;
                }
                Ok(other) => {
                    self.diagnostics.push(Diagnostic::new(
                        Subject::Object {
                            kind: Kind::of(other.kind()),
                            name: ObjectName::In(origin.to_owned()),
                        },
                        "kind",
                        "only NetworkPolicy and ClusterNetworkPolicy objects can be applied; ignored",
                    ));
                    continue;
                }
            };
            let key = ObjectRef::of_policy(&mut policy);
            if unreadable.is_empty() {
                self.unreadable_parts.remove(&key);
            } else {
                self.unreadable_parts.insert(key.clone(), unreadable);
            }
            self.policies.insert(key, Policy::from(*policy));
        }
    }

    /// `state` with the overlay's policies created or replaced.
    pub fn apply_to(&self, state: &ClusterState) -> ClusterState {
        let mut out = state.clone();
        for (key, policy) in &self.policies {
            out.policies.insert(key.clone(), policy.clone());
            out.unreadable_policies.remove(key);
            match self.unreadable_parts.get(key) {
                Some(parts) => out.unreadable_parts.insert(key.clone(), parts.clone()),
                None => out.unreadable_parts.remove(key),
            };
        }
        for (name, object) in &self.cluster_policies {
            out.cluster_policies.insert(name.clone(), object.clone());
        }
        out
    }
}

/// `path` itself, or the manifest files directly inside it.
fn manifest_files(path: &Path) -> Result<Vec<PathBuf>, PreviewError> {
    let io = |source| PreviewError::Io {
        path: path.to_path_buf(),
        source,
    };
    let meta = std::fs::metadata(path).map_err(io)?;
    if !meta.is_dir() {
        return Ok(vec![path.to_path_buf()]);
    }
    let mut files: Vec<PathBuf> = std::fs::read_dir(path)
        .map_err(io)?
        .filter_map(|entry| entry.ok().map(|e| e.path()))
        .filter(|p| {
            let name = p.file_name().and_then(|n| n.to_str()).unwrap_or_default();
            let extension = p.extension().and_then(|e| e.to_str()).unwrap_or_default();
            !name.starts_with('.') && matches!(extension, "yaml" | "yml" | "json") && p.is_file()
        })
        .collect();
    files.sort();
    Ok(files)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overlay_applies_policies_as_far_as_they_can_be_read_and_reports_the_rest() {
        let mut overlay = Overlay::default();
        overlay.add_text(
            "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: ok}\n\
             spec: {podSelector: {}}\n---\n\
             apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: bad, namespace: x}\n\
             spec: {podSelector: {}, ingress: [{ports: [{port: 90, endPort: 80}]}]}\n---\n\
             apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: part, namespace: x}\n\
             spec: {podSelector: {}, ingress: [{from: [{podSelectr: {}}]}]}\n---\n\
             apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: lost, namespace: x}\n\
             spec: {podSelectr: {}}\n---\n\
             apiVersion: v1\nkind: Namespace\nmetadata: {name: z}\n",
            "extra.yaml",
        );
        assert_eq!(
            overlay.policies.keys().cloned().collect::<Vec<_>>(),
            [
                ObjectRef::new("default", "ok"),
                ObjectRef::new("x", "bad"),
                ObjectRef::new("x", "part"),
            ]
        );
        assert_eq!(
            overlay.unreadable_parts[&ObjectRef::new("x", "part")][0].field,
            "spec.ingress[0].from[0].podSelectr"
        );
        let messages: Vec<String> = overlay
            .diagnostics
            .iter()
            .map(ToString::to_string)
            .collect();
        assert_eq!(
            messages,
            [
                "NetworkPolicy x/lost: spec.podSelectr: unknown field",
                "Namespace in extra.yaml: kind: only NetworkPolicy and ClusterNetworkPolicy \
                 objects can be applied; ignored"
            ]
        );
        let state = overlay.apply_to(&ClusterState::default());
        assert_eq!(state.unreadable_parts.len(), 1);
    }
}
