//! NetworkPolicies and Namespaces as the agent lists, watches and keeps them: each object
//! of a page or a watch event is read into its compact form ([`Compact`]: a [`Policy`],
//! a [`NamespaceInfo`], shared with the state) beside the metadata the watcher needs; the
//! typed object lives only while its page is read, and the store
//! ([`super::store::CompactStore`]) keeps the compact value alone.

use std::borrow::Cow;
use std::fmt::Debug;

use ::kube::Resource;
use k8s_openapi::Metadata;
use k8s_openapi::api::core::v1::Namespace;
use k8s_openapi::api::networking::v1::NetworkPolicy;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use netpol_compile::state::{NamespaceInfo, Policy};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Deserializer};

use super::store::Compacted;

/// What the agent keeps of an object of kind [`Compact::Object`].
pub(crate) trait Compact: Clone + Debug + PartialEq + Send + Sync + 'static {
    type Object: k8s_openapi::Resource + Metadata<Ty = ObjectMeta> + DeserializeOwned;

    /// What is kept of `object` (trimmed first where the kept form is the object's).
    fn of(object: Self::Object) -> Self;
}

impl Compact for Policy {
    type Object = NetworkPolicy;

    fn of(mut object: NetworkPolicy) -> Self {
        super::trim::network_policy(&mut object);
        Policy::from(object)
    }
}

impl Compact for NamespaceInfo {
    type Object = Namespace;

    fn of(object: Namespace) -> Self {
        NamespaceInfo::of(&object)
    }
}

/// An object of the API: its identity (name, namespace, uid, resourceVersion: what the
/// watcher needs) and what the compiler reads of it.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct Kept<T> {
    metadata: ObjectMeta,
    pub(crate) value: T,
}

impl<T: Compact> Kept<T> {
    fn of(object: T::Object) -> Self {
        let meta = object.metadata();
        let metadata = ObjectMeta {
            name: meta.name.clone(),
            namespace: meta.namespace.clone(),
            uid: meta.uid.clone(),
            resource_version: meta.resource_version.clone(),
            ..ObjectMeta::default()
        };
        Kept {
            metadata,
            value: T::of(object),
        }
    }
}

impl<'de, T: Compact> Deserialize<'de> for Kept<T> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        T::Object::deserialize(deserializer).map(Kept::of)
    }
}

impl<T: Compact> Resource for Kept<T> {
    type DynamicType = ();
    type Scope = <T::Object as k8s_openapi::Resource>::Scope;

    fn kind(_: &()) -> Cow<'_, str> {
        <T::Object as k8s_openapi::Resource>::KIND.into()
    }

    fn group(_: &()) -> Cow<'_, str> {
        <T::Object as k8s_openapi::Resource>::GROUP.into()
    }

    fn version(_: &()) -> Cow<'_, str> {
        <T::Object as k8s_openapi::Resource>::VERSION.into()
    }

    fn plural(_: &()) -> Cow<'_, str> {
        <T::Object as k8s_openapi::Resource>::URL_PATH_SEGMENT.into()
    }

    fn meta(&self) -> &ObjectMeta {
        &self.metadata
    }

    fn meta_mut(&mut self) -> &mut ObjectMeta {
        &mut self.metadata
    }
}

impl<T: Compact> Compacted for Kept<T> {
    type Value = T;

    fn value(&self) -> &T {
        &self.value
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn watched_objects_are_addressed_as_the_api_serves_their_kind() {
        assert_eq!(
            Kept::<Policy>::url_path(&(), None),
            "/apis/networking.k8s.io/v1/networkpolicies"
        );
        assert_eq!(
            Kept::<Policy>::url_path(&(), Some("x")),
            "/apis/networking.k8s.io/v1/namespaces/x/networkpolicies"
        );
        assert_eq!(
            Kept::<NamespaceInfo>::url_path(&(), None),
            "/api/v1/namespaces"
        );
        assert_eq!(Kept::<Policy>::kind(&()), "NetworkPolicy");
    }

    #[test]
    fn a_watched_policy_keeps_what_trimming_keeps_and_its_identity() {
        let watched: Kept<Policy> = serde_json::from_value(json!({
            "apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
            "metadata": {"name": "p", "namespace": "x", "uid": "u-1", "resourceVersion": "7",
                         "labels": {"team": "a"},
                         "annotations": {"netpol.dev/staged": "true",
                                         "kubectl.kubernetes.io/last-applied-configuration": "{}"},
                         "managedFields": [{"manager": "kubectl"}]},
            "spec": {"podSelector": {"matchLabels": {"app": "db"}},
                     "ingress": [{"ports": [{"port": "http"}]}]},
        }))
        .expect("a NetworkPolicy");
        assert_eq!(watched.meta().uid.as_deref(), Some("u-1"));
        assert_eq!(watched.meta().resource_version.as_deref(), Some("7"));
        assert!(watched.value.is_staged());
        let expected: NetworkPolicy = serde_json::from_value(json!({
            "metadata": {"name": "p", "namespace": "x", "uid": "u-1",
                         "annotations": {"netpol.dev/staged": "true"}},
            "spec": {"podSelector": {"matchLabels": {"app": "db"}},
                     "ingress": [{"ports": [{"port": "http"}]}]},
        }))
        .expect("a NetworkPolicy");
        assert_eq!(watched.value.object(), expected);
    }

    #[test]
    fn a_watched_namespace_keeps_its_labels_audit_switch_and_identity() {
        let watched: Kept<NamespaceInfo> = serde_json::from_value(json!({
            "apiVersion": "v1", "kind": "Namespace",
            "metadata": {"name": "x", "uid": "u-2", "resourceVersion": "9",
                         "labels": {"team": "a"},
                         "annotations": {"netpol.dev/audit": "true"}},
            "spec": {"finalizers": ["kubernetes"]},
            "status": {"phase": "Active"},
        }))
        .expect("a Namespace");
        assert_eq!(watched.meta().name.as_deref(), Some("x"));
        assert_eq!(watched.meta().resource_version.as_deref(), Some("9"));
        assert!(watched.value.audited());
        assert_eq!(watched.value.labels().get("team"), Some("a"));
    }
}
