//! What the agent keeps of a NetworkPolicy: the object as its source handed it, as one
//! compact text.
//!
//! A k8s-openapi `NetworkPolicy` is made of maps and options: a one-label selector's
//! `BTreeMap` alone is a ~540-byte node, and the bench's policy shapes cost ~2.2 KiB each
//! (15,000 of them were ~33 MiB of the agent at 150,000 pods). Its JSON text, as
//! serde_json writes the typed object, is a few hundred bytes. The compiler reads a
//! policy's content only when the policy changed (it keeps the parsed form), so the
//! typed object is made again from the text there, and where a tool reads the policy
//! (the reference evaluator, explain); everything else (is it staged, is it the same
//! policy) is answered without it.

use std::fmt;
use std::sync::Arc;

use k8s_openapi::api::networking::v1::NetworkPolicy;

use super::is_staged;

/// A NetworkPolicy as the state keeps it (see the module's documentation). Equal when
/// the objects are. One shared value: a copy is a reference count, so a source's store
/// and the state hold one policy, and the compiler knows an unchanged one by
/// [`Policy::same`].
#[derive(Clone, PartialEq, Eq)]
pub struct Policy(Arc<Fields>);

#[derive(PartialEq, Eq)]
struct Fields {
    /// serde_json's text of the object.
    text: Box<str>,
    /// [`is_staged`] of the object.
    staged: bool,
}

impl Policy {
    /// The object, read back from its text.
    pub fn object(&self) -> NetworkPolicy {
        // The text is serde_json's own writing of a typed NetworkPolicy, which it reads
        // back as it was (tests below hold it for every kind of field).
        serde_json::from_str(&self.0.text).unwrap_or_else(|error| {
            unreachable!("a NetworkPolicy's own JSON text is read back: {error}")
        })
    }

    /// Whether the policy is staged ([`super::STAGED_ANNOTATION`] is `"true"`).
    pub fn is_staged(&self) -> bool {
        self.0.staged
    }

    /// Whether `other` is this very value (a copy of it), not only an equal one.
    pub fn same(&self, other: &Policy) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }

    /// The policy as it is in force when it is no longer staged: without
    /// [`super::STAGED_ANNOTATION`].
    pub fn unstaged(&self) -> Policy {
        if !self.is_staged() {
            return self.clone();
        }
        let mut object = self.object();
        if let Some(annotations) = object.metadata.annotations.as_mut() {
            annotations.remove(super::STAGED_ANNOTATION);
        }
        Policy::from(object)
    }
}

impl From<NetworkPolicy> for Policy {
    /// Keeps `object` as it is (a source trims it first if it drops fields), but for
    /// its `metadata.resourceVersion` and `managedFields`: they decide nothing, and
    /// without them two versions of a policy that differ only there are equal.
    fn from(mut object: NetworkPolicy) -> Self {
        object.metadata.resource_version = None;
        object.metadata.managed_fields = None;
        let text = serde_json::to_string(&object)
            .unwrap_or_else(|error| unreachable!("a NetworkPolicy is written as JSON: {error}"));
        Policy(Arc::new(Fields {
            text: text.into_boxed_str(),
            staged: is_staged(&object),
        }))
    }
}

impl fmt::Debug for Policy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("Policy").field(&self.0.text).finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn object(value: serde_json::Value) -> NetworkPolicy {
        serde_json::from_value(value).expect("a NetworkPolicy")
    }

    /// Every kind of field a NetworkPolicy has, in one object.
    fn every_field() -> NetworkPolicy {
        object(json!({
            "metadata": {"name": "p", "namespace": "x", "uid": "0a1b",
                         "resourceVersion": "12", "labels": {"team": "a"},
                         "annotations": {"netpol.dev/staged": "true"},
                         "creationTimestamp": "2026-01-02T03:04:05Z"},
            "spec": {
                "podSelector": {"matchLabels": {"app": "db"},
                                "matchExpressions": [{"key": "tier", "operator": "NotIn",
                                                      "values": ["a", "b"]},
                                                     {"key": "x", "operator": "Exists"}]},
                "policyTypes": ["Ingress", "Egress"],
                "ingress": [{"from": [{"podSelector": {}},
                                      {"namespaceSelector": {"matchLabels": {"e": "p"}},
                                       "podSelector": {"matchLabels": {"r": "f"}}},
                                      {"ipBlock": {"cidr": "10.0.0.0/8",
                                                   "except": ["10.1.0.0/16"]}}],
                             "ports": [{"port": "http"}, {"port": 80, "protocol": "UDP"},
                                       {"port": 5000, "endPort": 5999}, {"protocol": "SCTP"}]},
                            {}],
                "egress": [{"to": [{"ipBlock": {"cidr": "2001:db8::/32"}}]}],
            },
        }))
    }

    #[test]
    fn a_kept_policy_reads_back_the_object_it_was_made_of() {
        let mut without_version = every_field();
        without_version.metadata.resource_version = None;
        for np in [
            without_version,
            object(json!({"metadata": {"name": "p", "namespace": "x"},
                          "spec": {"podSelector": {}}})),
            NetworkPolicy::default(),
        ] {
            assert_eq!(Policy::from(np.clone()).object(), np);
        }
    }

    #[test]
    fn a_kept_policy_is_smaller_than_the_object() {
        let np = every_field();
        let text = Policy::from(np.clone()).0.text.len();
        // The object's one-label maps alone (five of them) are ~540 bytes each.
        assert!(text < 900, "{text} bytes of text");
    }

    #[test]
    fn a_staged_policy_is_known_staged_and_unstaged_in_force() {
        let staged = Policy::from(every_field());
        assert!(staged.is_staged());
        let in_force = staged.unstaged();
        assert!(!in_force.is_staged());
        let mut expected = every_field();
        expected.metadata.resource_version = None;
        expected.metadata.annotations = Some(Default::default());
        assert_eq!(in_force.object(), expected);
        assert_eq!(staged.object().metadata.uid.as_deref(), Some("0a1b"));
    }

    #[test]
    fn policies_are_equal_when_their_objects_are() {
        let a = Policy::from(every_field());
        let mut changed = every_field();
        changed.spec.as_mut().unwrap().policy_types = Some(vec!["Ingress".into()]);
        let mut moved = every_field();
        moved.metadata.resource_version = Some("13".into());
        assert_eq!(
            a,
            Policy::from(moved),
            "the resourceVersion decides nothing"
        );
        assert_ne!(a, Policy::from(changed));
    }
}
