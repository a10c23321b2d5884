//! What changed in the stores since the last snapshot, so that a snapshot copies only
//! those objects into the state (O(changes), not O(cluster)).
//!
//! The watcher tasks record an object's key before they publish the resourceVersion that
//! covers it; [`ClusterWatch::snapshot`](super::ClusterWatch::snapshot) reads the version
//! first and takes the record after. So every change up to the version a snapshot
//! reports is in the record it takes (the status file never claims a version whose
//! objects the state lacks); a change recorded but not yet covered by that version is
//! copied early, which is harmless.
//!
//! A completed list (the first, or a re-list after a broken watch) replaces a store as a
//! whole: it is recorded as [`Changed::All`], and the next snapshot rebuilds that
//! resource from the store.

use std::collections::{BTreeMap, BTreeSet};
use std::hash::Hash;
use std::sync::{Arc, Mutex};

use ::kube::runtime::reflector::{Lookup, ObjectRef as StoreRef, Store};
use netpol_compile::state::ObjectRef;

use super::settings::Watched;

/// An object's place in its store: (namespace, or empty when cluster-scoped; name).
pub(super) type Key = (String, String);

/// What changed in one resource's store.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) enum Changed {
    /// The store was replaced (a completed list): every object.
    All,
    /// These objects were added, updated or deleted.
    Objects(BTreeSet<Key>),
}

/// Changes recorded by the watcher tasks, per resource. Shared with them.
#[derive(Debug)]
pub(super) struct Changes {
    pending: Mutex<BTreeMap<Watched, Changed>>,
}

impl Default for Changes {
    /// Everything is to be read: the first snapshot fills the state from every store.
    fn default() -> Self {
        Changes {
            pending: Mutex::new(
                Watched::ALL
                    .into_iter()
                    .map(|w| (w, Changed::All))
                    .collect(),
            ),
        }
    }
}

impl Changes {
    /// One object of `watched` was added, updated or deleted.
    pub(super) fn object<K: Lookup>(&self, watched: Watched, object: &K) {
        let key = key_of(object);
        let mut pending = self.lock();
        match pending
            .entry(watched)
            .or_insert_with(|| Changed::Objects(BTreeSet::new()))
        {
            Changed::All => {}
            Changed::Objects(keys) => {
                keys.insert(key);
            }
        }
    }

    /// The store of `watched` was replaced as a whole.
    pub(super) fn all(&self, watched: Watched) {
        self.lock().insert(watched, Changed::All);
    }

    /// Every store is to be read again by the next snapshot.
    pub(super) fn everything(&self) {
        let mut pending = self.lock();
        for watched in Watched::ALL {
            pending.insert(watched, Changed::All);
        }
    }

    /// What was recorded since the last call, emptied.
    pub(super) fn take(&self) -> BTreeMap<Watched, Changed> {
        std::mem::take(&mut *self.lock())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<Watched, Changed>> {
        // Nothing panics while holding it; a poisoned record is still a record.
        self.pending
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

fn key_of<K: Lookup>(object: &K) -> Key {
    (
        object
            .namespace()
            .map(|n| n.into_owned())
            .unwrap_or_default(),
        object.name().map(|n| n.into_owned()).unwrap_or_default(),
    )
}

/// An object's key as its store hands it to a snapshot: its names, or the state's own
/// key when the store keeps one (the state then shares it: one copy of each name).
#[derive(Clone, Copy, Debug)]
pub(super) enum StoredKey<'a> {
    /// (namespace, or empty when cluster-scoped; name).
    Names(&'a str, &'a str),
    Shared(&'a ObjectRef),
}

impl<'a> From<&'a Key> for StoredKey<'a> {
    fn from((namespace, name): &'a Key) -> Self {
        StoredKey::Names(namespace, name)
    }
}

/// How a resource's objects are keyed in [`netpol_compile::state::ClusterState`].
pub(super) trait StateKey: Ord + Sized {
    /// `None` for an object without the names its key needs.
    fn of(key: StoredKey<'_>) -> Option<Self>;
}

impl StateKey for String {
    fn of(key: StoredKey<'_>) -> Option<Self> {
        let name = match key {
            StoredKey::Names(_, name) => name,
            StoredKey::Shared(obj) => obj.name.as_str(),
        };
        (!name.is_empty()).then(|| name.to_owned())
    }
}

impl StateKey for ObjectRef {
    fn of(key: StoredKey<'_>) -> Option<Self> {
        let named = |namespace: &str, name: &str| !namespace.is_empty() && !name.is_empty();
        match key {
            StoredKey::Names(namespace, name) => {
                named(namespace, name).then(|| ObjectRef::new(namespace, name))
            }
            StoredKey::Shared(obj) => named(&obj.namespace, &obj.name).then(|| obj.clone()),
        }
    }
}

/// A watcher's store as a snapshot reads it.
pub(super) trait StoreRead {
    type Object;

    /// Calls `visit` with every object and its key.
    fn each(&self, visit: &mut dyn FnMut(StoredKey<'_>, &Self::Object));

    /// `read` of the object at `key` (and its key as stored), if there is one.
    fn read<T>(&self, key: &Key, read: impl FnOnce(StoredKey<'_>, &Self::Object) -> T)
    -> Option<T>;
}

/// A kube-rs reflector store and its resource's dynamic type.
pub(super) struct Reflected<'a, K>
where
    K: Lookup + Clone + 'static,
    K::DynamicType: Eq + Hash + Clone,
{
    pub(super) store: &'a Store<K>,
    pub(super) dyntype: &'a K::DynamicType,
}

impl<K> StoreRead for Reflected<'_, K>
where
    K: Lookup + Clone + 'static,
    K::DynamicType: Eq + Hash + Clone,
{
    /// The store's own shared object: a state may keep it as it is.
    type Object = Arc<K>;

    fn each(&self, visit: &mut dyn FnMut(StoredKey<'_>, &Arc<K>)) {
        for object in self.store.state() {
            let (namespace, name) = (object.namespace(), object.name());
            let names = (namespace.as_deref(), name.as_deref());
            let key = StoredKey::Names(names.0.unwrap_or_default(), names.1.unwrap_or_default());
            visit(key, &object);
        }
    }

    fn read<T>(&self, key: &Key, read: impl FnOnce(StoredKey<'_>, &Arc<K>) -> T) -> Option<T> {
        let (namespace, name) = key;
        let mut store_ref = StoreRef::<K>::new_with(name, self.dyntype.clone());
        if !namespace.is_empty() {
            store_ref = store_ref.within(namespace);
        }
        self.store
            .get(&store_ref)
            .map(|object| read(key.into(), &object))
    }
}

/// Brings `map` (one resource's objects in the state) up to date with `store` for what
/// `changed` says, converting each object with `convert` (`None`: left out).
pub(super) fn refresh<R, S, V>(
    store: &R,
    changed: Option<Changed>,
    map: &mut BTreeMap<S, V>,
    convert: impl Fn(&R::Object) -> Option<V>,
) where
    R: StoreRead,
    S: StateKey,
{
    match changed {
        None => {}
        Some(Changed::All) => {
            map.clear();
            store.each(&mut |key, object| {
                if let Some(state_key) = S::of(key)
                    && let Some(value) = convert(object)
                {
                    map.insert(state_key, value);
                }
            });
        }
        Some(Changed::Objects(keys)) => {
            for key in keys {
                let Some(state_key) = S::of((&key).into()) else {
                    continue;
                };
                // Stored under the store's own key when it keeps one: shared, not a
                // copy of the names.
                let read = |stored: StoredKey<'_>, object: &R::Object| {
                    Some((S::of(stored)?, convert(object)?))
                };
                match store.read(&key, read).flatten() {
                    Some((stored_key, value)) => {
                        map.remove(&state_key);
                        map.insert(stored_key, value);
                    }
                    None => {
                        map.remove(&state_key);
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ::kube::runtime::reflector::store::Writer;
    use ::kube::runtime::watcher::Event;
    use k8s_openapi::api::core::v1::Pod;

    fn pod(namespace: &str, name: &str, ip: &str) -> Pod {
        serde_json::from_value(serde_json::json!({
            "metadata": {"namespace": namespace, "name": name},
            "status": {"podIP": ip},
        }))
        .unwrap()
    }

    fn ip(pod: &Arc<Pod>) -> Option<String> {
        pod.status.as_ref()?.pod_ip.clone()
    }

    #[test]
    fn a_snapshot_copies_the_recorded_objects_and_forgets_the_deleted_ones() {
        let mut writer: Writer<Pod> = Writer::default();
        let store = writer.as_reader();
        let reflected = Reflected {
            store: &store,
            dyntype: &(),
        };
        let changes = Changes::default();
        for (name, address) in [("a", "10.0.0.1"), ("b", "10.0.0.2")] {
            writer.apply_watcher_event(&Event::Apply(pod("x", name, address)));
        }
        let mut map: BTreeMap<ObjectRef, String> = BTreeMap::new();
        let mut taken = changes.take();
        refresh(&reflected, taken.remove(&Watched::Pods), &mut map, ip);
        assert_eq!(map.len(), 2, "the first snapshot reads the whole store");

        // b is updated, a deleted; c exists in the store but its change was not
        // recorded (yet): it waits for its record.
        writer.apply_watcher_event(&Event::Apply(pod("x", "b", "10.0.0.3")));
        changes.object(Watched::Pods, &pod("x", "b", "10.0.0.3"));
        writer.apply_watcher_event(&Event::Delete(pod("x", "a", "10.0.0.1")));
        changes.object(Watched::Pods, &pod("x", "a", "10.0.0.1"));
        writer.apply_watcher_event(&Event::Apply(pod("x", "c", "10.0.0.4")));
        let mut taken = changes.take();
        refresh(&reflected, taken.remove(&Watched::Pods), &mut map, ip);
        assert_eq!(
            map,
            BTreeMap::from([(ObjectRef::new("x", "b"), "10.0.0.3".to_owned())])
        );

        changes.all(Watched::Pods);
        changes.object(Watched::Pods, &pod("x", "b", "10.0.0.3"));
        let mut taken = changes.take();
        assert_eq!(
            taken.get(&Watched::Pods),
            Some(&Changed::All),
            "All absorbs keys"
        );
        refresh(&reflected, taken.remove(&Watched::Pods), &mut map, ip);
        assert_eq!(map.len(), 2, "a replaced store is read whole: {map:?}");
        assert!(changes.take().is_empty(), "taking empties the record");
    }
}
