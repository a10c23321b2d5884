//! Pods as the agent lists, watches and keeps them: each object of a page or a watch
//! event is parsed straight into what the agent keeps ([`PodInfo`]) and the metadata the
//! watch needs ([`WatchedPod`]), so no full Pod object is ever built, not even during
//! the initial list; the watcher keeps them in a [`PodStore`](super::store::PodStore), by
//! name with their uid, without a kube-rs reflector's per-object metadata and keys.

use std::borrow::Cow;

use ::kube::Resource;
use k8s_openapi::NamespaceResourceScope;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use netpol_compile::state::{PodDocument, PodInfo};
use serde::Deserialize;

use super::store::Compacted;

/// A Pod of the API: its identity (name, namespace, uid, resourceVersion: what the
/// reflector and Events need) and the [`PodInfo`] the compiler reads.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(from = "PodDocument")]
pub(crate) struct WatchedPod {
    metadata: ObjectMeta,
    pub(crate) info: PodInfo,
}

impl From<PodDocument> for WatchedPod {
    fn from(document: PodDocument) -> Self {
        let (identity, info) = PodInfo::from_parts(document);
        WatchedPod {
            metadata: ObjectMeta {
                name: identity.name,
                namespace: identity.namespace,
                uid: identity.uid,
                resource_version: identity.resource_version,
                ..ObjectMeta::default()
            },
            info,
        }
    }
}

impl Resource for WatchedPod {
    type DynamicType = ();
    type Scope = NamespaceResourceScope;

    fn kind(_: &()) -> Cow<'_, str> {
        "Pod".into()
    }

    fn group(_: &()) -> Cow<'_, str> {
        "".into()
    }

    fn version(_: &()) -> Cow<'_, str> {
        "v1".into()
    }

    fn plural(_: &()) -> Cow<'_, str> {
        "pods".into()
    }

    fn meta(&self) -> &ObjectMeta {
        &self.metadata
    }

    fn meta_mut(&mut self) -> &mut ObjectMeta {
        &mut self.metadata
    }
}

impl Compacted for WatchedPod {
    type Value = PodInfo;

    fn value(&self) -> &PodInfo {
        &self.info
    }
}

#[cfg(test)]
mod tests {
    use k8s_openapi::api::core::v1::Pod;
    use serde_json::json;

    use std::collections::BTreeMap;

    use ::kube::runtime::watcher::Event;
    use netpol_compile::state::ObjectRef;

    use super::super::changes::{Changed, StoreRead, StoredKey, refresh};
    use super::super::store::PodStore;
    use super::super::watch::Keeper;
    use super::*;

    #[test]
    fn a_watched_pod_is_addressed_as_a_pod_and_keeps_what_a_pod_object_would() {
        assert_eq!(
            WatchedPod::url_path(&(), Some("x")),
            Pod::url_path(&(), Some("x"))
        );
        assert_eq!(WatchedPod::api_version(&()), Pod::api_version(&()));
        let document = json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": "a", "namespace": "x", "uid": "u", "resourceVersion": "7",
                         "labels": {"app": "a"}, "annotations": {"big": "x"},
                         "managedFields": [{"manager": "kubelet"}]},
            "spec": {"nodeName": "n1", "containers": [{"name": "c", "image": "i",
                     "ports": [{"name": "http", "containerPort": 80}]}]},
            "status": {"phase": "Running", "podIP": "10.0.0.1", "hostIP": "192.0.2.1"},
        });
        let watched: WatchedPod = serde_json::from_value(document.clone()).unwrap();
        let object: Pod = serde_json::from_value(document).unwrap();
        assert_eq!(watched.info, PodInfo::of(&object));
        assert_eq!(watched.meta().name.as_deref(), Some("a"));
        assert_eq!(watched.meta().namespace.as_deref(), Some("x"));
        assert_eq!(watched.meta().uid.as_deref(), Some("u"));
        assert_eq!(watched.meta().resource_version.as_deref(), Some("7"));
        assert_eq!(watched.meta().annotations, None, "nothing else is kept");
    }

    fn watched(name: &str, app: &str, version: &str) -> WatchedPod {
        serde_json::from_value(json!({
            "metadata": {"name": name, "namespace": "x", "uid": format!("uid-{name}"),
                         "resourceVersion": version, "labels": {"app": app}},
            "status": {"phase": "Running", "podIP": "10.0.0.1",
                       "conditions": [{"type": "Ready", "status": version}]},
        }))
        .unwrap()
    }

    fn names(store: &PodStore) -> Vec<String> {
        let mut names = Vec::new();
        store.each(&mut |key, _| {
            if let StoredKey::Shared(obj) = key {
                names.push(obj.name.to_string());
            }
        });
        names.sort();
        names
    }

    #[test]
    fn the_pods_of_a_namespace_share_its_name_and_the_state_shares_the_stores_keys() {
        let store = PodStore::default();
        let mut writer = store.writer();
        writer.apply(&Event::Apply(watched("a", "web", "1")));
        writer.apply(&Event::Apply(watched("b", "db", "2")));
        let mut keys = Vec::new();
        store.each(&mut |key, _| {
            if let StoredKey::Shared(obj) = key {
                keys.push(obj.clone());
            }
        });
        assert_eq!(keys.len(), 2);
        let text = |obj: &ObjectRef| obj.namespace.as_str().as_ptr();
        assert_eq!(text(&keys[0]), text(&keys[1]), "one copy of the namespace");

        let mut state: BTreeMap<ObjectRef, PodInfo> = BTreeMap::new();
        let changed = [("x".to_owned(), "a".to_owned())].into();
        refresh(&store, Some(Changed::Objects(changed)), &mut state, |pod| {
            Some(pod.clone())
        });
        let (kept, _) = state.first_key_value().expect("a");
        let stored = keys.iter().find(|obj| obj.name == "a").expect("a");
        assert_eq!(kept.name.as_str().as_ptr(), stored.name.as_str().as_ptr());
        refresh(&store, Some(Changed::All), &mut state, |pod| {
            Some(pod.clone())
        });
        for kept in state.keys() {
            let stored = keys
                .iter()
                .find(|obj| obj.name == kept.name)
                .expect("stored");
            assert_eq!(kept.name.as_str().as_ptr(), stored.name.as_str().as_ptr());
        }
    }

    #[test]
    fn the_pod_store_applies_watch_events_and_replaces_itself_when_a_list_completes() {
        let store = PodStore::default();
        let mut writer = store.writer();
        writer.apply(&Event::<WatchedPod>::Init);
        writer.apply(&Event::InitApply(watched("a", "web", "1")));
        writer.apply(&Event::InitApply(watched("b", "db", "2")));
        assert!(names(&store).is_empty(), "a list shows when it is complete");
        writer.apply(&Event::<WatchedPod>::InitDone);
        assert_eq!(names(&store), ["a", "b"]);
        assert_eq!(
            store.uid(&ObjectRef::new("x", "a")).as_deref(),
            Some("uid-a")
        );

        assert!(
            writer.holds(&watched("a", "web", "3")),
            "a new version that changed only what is not kept changes nothing"
        );
        assert!(!writer.holds(&watched("a", "api", "3")), "a label changed");
        let mut again = watched("a", "web", "3");
        again.metadata.uid = Some("uid-a-again".into());
        again.info = serde_json::from_value(json!({
            "metadata": {"name": "a", "namespace": "x", "uid": "uid-a-again",
                         "labels": {"app": "web"}},
            "status": {"phase": "Running", "podIP": "10.0.0.1"},
        }))
        .unwrap();
        assert!(!writer.holds(&again), "made again under the same name");
        assert_eq!(
            std::mem::size_of::<(ObjectRef, PodInfo)>(),
            24,
            "a slot of the store: a name and a pointer"
        );
        assert!(!writer.holds(&watched("c", "web", "3")), "a new pod");
        writer.apply(&Event::Apply(watched("a", "api", "3")));
        let app = store.read(&("x".into(), "a".into()), |_, pod| {
            pod.labels().get("app").map(str::to_owned)
        });
        assert_eq!(app, Some(Some("api".into())));
        writer.apply(&Event::Delete(watched("b", "db", "4")));
        assert_eq!(names(&store), ["a"]);

        // A re-list that no longer has a, and has c: the old content until it completes.
        writer.apply(&Event::<WatchedPod>::Init);
        writer.apply(&Event::InitApply(watched("c", "web", "5")));
        assert_eq!(names(&store), ["a"]);
        writer.apply(&Event::<WatchedPod>::InitDone);
        assert_eq!(names(&store), ["c"]);
        assert_eq!(store.len(), 1);
    }
}
