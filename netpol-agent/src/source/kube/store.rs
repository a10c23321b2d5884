//! The agent's own store for the kinds it keeps compact (pods, NetworkPolicies,
//! Namespaces): each object by name, its compact value alone ([`PodInfo`],
//! [`Policy`](netpol_compile::state::Policy), [`NamespaceInfo`](netpol_compile::state::NamespaceInfo)),
//! shared with the state. A kube-rs reflector keeps, beside each object, its metadata and
//! a key of four owned strings: ~900 bytes a policy, ~18 MiB for the 15,000 policies and
//! 5,000 namespaces of the 150,000-pod bench, where a slot here is a name and a pointer.

use std::collections::HashMap;
use std::sync::{Arc, RwLock, RwLockReadGuard, RwLockWriteGuard};

use ::kube::Resource;
use ::kube::runtime::watcher::Event;
use netpol_compile::state::{Name, ObjectRef, PodInfo};

use super::changes::{Key, StoreRead, StoredKey};
use super::watch::Keeper;

/// A watched object read compact: its key and what the agent keeps of it.
pub(super) trait Compacted: Resource {
    type Value: Clone + PartialEq;

    /// The object's key (namespace empty when cluster-scoped): its namespace shared with
    /// the other objects of the namespace.
    fn key(&self) -> ObjectRef {
        let meta = self.meta();
        ObjectRef::new(
            Name::interned(meta.namespace.as_deref().unwrap_or_default()),
            meta.name.as_deref().unwrap_or_default(),
        )
    }

    fn value(&self) -> &Self::Value;
}

/// The objects a watcher has read, by name; shared with the snapshot and Events.
#[derive(Debug)]
pub(super) struct CompactStore<V> {
    objects: Arc<RwLock<HashMap<ObjectRef, V>>>,
}

impl<V> Clone for CompactStore<V> {
    fn clone(&self) -> Self {
        CompactStore {
            objects: self.objects.clone(),
        }
    }
}

impl<V> Default for CompactStore<V> {
    fn default() -> Self {
        CompactStore {
            objects: Arc::default(),
        }
    }
}

/// The pods the watcher has read.
pub(super) type PodStore = CompactStore<PodInfo>;

impl<V> CompactStore<V> {
    fn locked(&self) -> RwLockReadGuard<'_, HashMap<ObjectRef, V>> {
        // Every write completes before it lets go: a poisoned map is still whole.
        self.objects
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn locked_mut(&self) -> RwLockWriteGuard<'_, HashMap<ObjectRef, V>> {
        self.objects
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    pub(super) fn len(&self) -> usize {
        self.locked().len()
    }

    /// What `read` makes of the object `key`, if the store holds it.
    pub(super) fn get<T>(&self, key: &ObjectRef, read: impl FnOnce(&V) -> T) -> Option<T> {
        self.locked().get(key).map(read)
    }

    /// The writer for the store's watcher: what a list brings replaces the store when the
    /// list completes, as a reflector does.
    pub(super) fn writer(&self) -> CompactWriter<V> {
        CompactWriter {
            store: self.clone(),
            listing: None,
        }
    }
}

impl PodStore {
    /// The uid of the pod `key`, if the store holds it.
    pub(super) fn uid(&self, key: &ObjectRef) -> Option<String> {
        self.get(key, PodInfo::uid).flatten()
    }
}

impl<V> StoreRead for CompactStore<V> {
    type Object = V;

    fn each(&self, visit: &mut dyn FnMut(StoredKey<'_>, &V)) {
        for (key, object) in self.locked().iter() {
            visit(StoredKey::Shared(key), object);
        }
    }

    fn read<T>(
        &self,
        (namespace, name): &Key,
        read: impl FnOnce(StoredKey<'_>, &V) -> T,
    ) -> Option<T> {
        let key = ObjectRef::new(namespace.as_str(), name.as_str());
        let objects = self.locked();
        let (stored, object) = objects.get_key_value(&key)?;
        Some(read(StoredKey::Shared(stored), object))
    }
}

/// Applies a watcher's events to a [`CompactStore`].
pub(super) struct CompactWriter<V> {
    store: CompactStore<V>,
    /// The objects of a list in progress.
    listing: Option<HashMap<ObjectRef, V>>,
}

impl<W: Compacted> Keeper<W> for CompactWriter<W::Value> {
    fn apply(&mut self, event: &Event<W>) {
        match event {
            Event::Init => self.listing = Some(HashMap::new()),
            Event::InitApply(object) => {
                self.listing
                    .get_or_insert_default()
                    .insert(object.key(), object.value().clone());
            }
            Event::InitDone => {
                let listed = self.listing.take().unwrap_or_default();
                *self.store.locked_mut() = listed;
            }
            Event::Apply(object) => {
                self.store
                    .locked_mut()
                    .insert(object.key(), object.value().clone());
            }
            Event::Delete(object) => {
                self.store.locked_mut().remove(&object.key());
            }
        }
    }

    fn holds(&self, object: &W) -> bool {
        // The value says whether it is the same object (a pod's uid is in its info, a
        // policy's in its kept text): one made again under the same name is news.
        self.store
            .locked()
            .get(&object.key())
            .is_some_and(|kept| kept == object.value())
    }
}

#[cfg(test)]
mod tests {
    use netpol_compile::state::{NamespaceInfo, Policy};
    use serde_json::json;

    use super::super::compact::Kept;
    use super::*;

    fn policy(uid: &str, version: &str, app: &str, last_applied: &str) -> Kept<Policy> {
        serde_json::from_value(json!({
            "metadata": {"namespace": "x", "name": "p", "uid": uid, "resourceVersion": version,
                         "annotations": {"kubectl.kubernetes.io/last-applied-configuration": last_applied}},
            "spec": {"podSelector": {"matchLabels": {"app": app}}},
        }))
        .expect("a NetworkPolicy")
    }

    fn namespace(name: &str, team: &str) -> Kept<NamespaceInfo> {
        serde_json::from_value(json!({
            "metadata": {"name": name, "uid": format!("u-{name}"), "resourceVersion": "1",
                         "labels": {"team": team}},
        }))
        .expect("a Namespace")
    }

    #[test]
    fn a_policy_store_keeps_the_compact_policy_by_name_and_knows_a_policy_made_again() {
        let store: CompactStore<Policy> = CompactStore::default();
        let mut writer = store.writer();
        writer.apply(&Event::Apply(policy("u-1", "1", "db", "{}")));
        let key = ObjectRef::new("x", "p");
        let uid = store.get(&key, |policy| policy.object().metadata.uid);
        assert_eq!(uid.flatten().as_deref(), Some("u-1"));
        assert!(
            writer.holds(&policy("u-1", "2", "db", r#"{"more": 1}"#)),
            "only the version and what trimming drops changed"
        );
        assert!(
            !writer.holds(&policy("u-1", "2", "web", "{}")),
            "its selector"
        );
        assert!(
            !writer.holds(&policy("u-2", "2", "db", "{}")),
            "made again under the same name"
        );
        let read = store.read(&("x".into(), "p".into()), |stored, policy| {
            let StoredKey::Shared(stored) = stored else {
                panic!("the store hands out its own key");
            };
            (stored.clone(), policy.object().spec.expect("a spec"))
        });
        let (stored, spec) = read.expect("stored");
        assert_eq!(stored, key);
        assert_eq!(
            spec.pod_selector.and_then(|s| s.match_labels),
            Some([("app".to_owned(), "db".to_owned())].into())
        );
        writer.apply(&Event::Delete(policy("u-1", "3", "db", "{}")));
        assert_eq!(store.len(), 0);
    }

    #[test]
    fn a_namespace_is_kept_under_its_name_alone_and_a_list_replaces_the_store_when_complete() {
        let store: CompactStore<NamespaceInfo> = CompactStore::default();
        let mut writer = store.writer();
        writer.apply(&Event::Apply(namespace("a", "red")));
        writer.apply(&Event::<Kept<NamespaceInfo>>::Init);
        writer.apply(&Event::InitApply(namespace("b", "blue")));
        let team = |name: &str| {
            store
                .get(&ObjectRef::new("", name), |ns| {
                    ns.labels().get("team").map(str::to_owned)
                })
                .flatten()
        };
        assert_eq!(team("a").as_deref(), Some("red"), "the old list until done");
        assert_eq!(team("b"), None);
        writer.apply(&Event::<Kept<NamespaceInfo>>::InitDone);
        assert_eq!(team("a"), None);
        assert_eq!(team("b").as_deref(), Some("blue"));
        assert!(writer.holds(&namespace("b", "blue")));
        assert!(!writer.holds(&namespace("b", "green")));
    }
}
