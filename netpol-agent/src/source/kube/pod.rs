//! Pods as the agent lists and watches them: each object of a page or a watch event is
//! parsed straight into what the agent keeps ([`PodInfo`]) and the metadata the watch
//! needs, so no full Pod object is ever built, not even during the initial list.

use std::borrow::Cow;

use ::kube::Resource;
use k8s_openapi::NamespaceResourceScope;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use netpol_compile::state::{PodDocument, PodInfo};
use serde::Deserialize;

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

#[cfg(test)]
mod tests {
    use k8s_openapi::api::core::v1::Pod;
    use serde_json::json;

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
}
