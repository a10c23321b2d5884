//! NetworkPolicies as the agent lists, watches and keeps them: each object of a page or
//! a watch event is trimmed ([`super::trim::network_policy`]) and kept as a [`Policy`]
//! (its compact text, shared with the state) with the metadata the reflector and Events
//! need; the typed object lives only while its page is read.

use std::borrow::Cow;

use ::kube::Resource;
use k8s_openapi::NamespaceResourceScope;
use k8s_openapi::api::networking::v1::NetworkPolicy;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use netpol_compile::state::Policy;
use serde::Deserialize;

/// A NetworkPolicy of the API: its identity (name, namespace, uid, resourceVersion) and
/// the [`Policy`] the compiler reads.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(from = "NetworkPolicy")]
pub(crate) struct WatchedPolicy {
    metadata: ObjectMeta,
    pub(crate) policy: Policy,
}

impl From<NetworkPolicy> for WatchedPolicy {
    fn from(mut object: NetworkPolicy) -> Self {
        super::trim::network_policy(&mut object);
        let meta = &object.metadata;
        WatchedPolicy {
            metadata: ObjectMeta {
                name: meta.name.clone(),
                namespace: meta.namespace.clone(),
                uid: meta.uid.clone(),
                resource_version: meta.resource_version.clone(),
                ..ObjectMeta::default()
            },
            policy: Policy::new(&object),
        }
    }
}

impl Resource for WatchedPolicy {
    type DynamicType = ();
    type Scope = NamespaceResourceScope;

    fn kind(_: &()) -> Cow<'_, str> {
        "NetworkPolicy".into()
    }

    fn group(_: &()) -> Cow<'_, str> {
        "networking.k8s.io".into()
    }

    fn version(_: &()) -> Cow<'_, str> {
        "v1".into()
    }

    fn plural(_: &()) -> Cow<'_, str> {
        "networkpolicies".into()
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
    use super::*;
    use k8s_openapi::Resource as _;

    #[test]
    fn a_watched_policy_is_addressed_as_the_api_serves_networkpolicies() {
        assert_eq!(WatchedPolicy::kind(&()), NetworkPolicy::KIND);
        assert_eq!(WatchedPolicy::group(&()), NetworkPolicy::GROUP);
        assert_eq!(WatchedPolicy::version(&()), NetworkPolicy::VERSION);
        assert_eq!(WatchedPolicy::plural(&()), NetworkPolicy::URL_PATH_SEGMENT);
    }

    #[test]
    fn a_watched_policy_keeps_what_trimming_keeps_and_its_identity() {
        let watched: WatchedPolicy = serde_json::from_value(serde_json::json!({
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
        assert!(watched.policy.is_staged());
        let kept = watched.policy.object();
        let mut expected: NetworkPolicy = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "p", "namespace": "x", "uid": "u-1",
                         "annotations": {"netpol.dev/staged": "true"}},
            "spec": {"podSelector": {"matchLabels": {"app": "db"}},
                     "ingress": [{"ports": [{"port": "http"}]}]},
        }))
        .expect("a NetworkPolicy");
        expected.metadata.resource_version = None;
        assert_eq!(kept, expected);
    }
}
