//! What the compiler reports about NetworkPolicies, ClusterNetworkPolicies and Pods,
//! published as Kubernetes Events on the objects.

use std::collections::BTreeMap;
use std::time::Duration;

use ::kube::Resource;
use ::kube::runtime::events::{Event as KubeEvent, EventType};
use k8s_openapi::api::core::v1::ObjectReference;
use k8s_openapi::api::networking::v1::NetworkPolicy;
use tracing::debug;

use netpol_compile::state::ObjectRef;
use netpol_compile::{Diagnostic, Kind, ObjectName, Subject as DiagnosticSubject};

use super::incidents::chain;
use super::pod::WatchedPod;
use super::watches::ClusterWatch;

/// Bound on publishing one Event.
const EVENT_TIMEOUT: Duration = Duration::from_secs(10);

impl ClusterWatch {
    /// Publishes Events for new diagnostics about NetworkPolicies (invalid) and Pods
    /// (not fully programmed: a map was full), in the background, each bounded by a
    /// timeout; failures are logged at debug level.
    pub fn report(&self, diagnostics: &[Diagnostic]) {
        let Some(recorder) = &self.recorder else {
            return;
        };
        let mut notes: BTreeMap<(Subject, ObjectRef), Vec<String>> = BTreeMap::new();
        for diagnostic in diagnostics {
            let (subject, key) = match (diagnostic.object(), &diagnostic.subject) {
                (Some((Kind::NetworkPolicy, key)), _) => (Subject::Policy, key.clone()),
                (Some((Kind::Pod, key)), _) => (Subject::Pod, key.clone()),
                (
                    _,
                    DiagnosticSubject::Object {
                        kind: Kind::ClusterNetworkPolicy,
                        name: ObjectName::Cluster(name),
                    },
                ) => (Subject::ClusterPolicy, ObjectRef::new("", name.clone())),
                _ => continue,
            };
            let text = if diagnostic.field.is_empty() {
                diagnostic.message.clone()
            } else {
                format!("{}: {}", diagnostic.field, diagnostic.message)
            };
            notes.entry((subject, key)).or_default().push(text);
        }
        for ((subject, key), notes) in notes {
            let reference = match subject {
                Subject::Policy => self.policy_reference(&key),
                Subject::Pod => {
                    namespaced_reference::<WatchedPod>(&key, self.stores.pods.uid(&key))
                }
                Subject::ClusterPolicy => self.cluster_policy_reference(&key.name),
            };
            let mut note = notes.join("; ");
            // The API server limits an Event's note to 1 kB.
            if note.len() > 1000 {
                let mut end = 1000;
                while !note.is_char_boundary(end) {
                    end -= 1;
                }
                note.truncate(end);
            }
            let event = KubeEvent {
                type_: EventType::Warning,
                reason: subject.reason().into(),
                note: Some(note),
                action: "Enforce".into(),
                secondary: None,
            };
            let recorder = recorder.clone();
            tokio::spawn(async move {
                match tokio::time::timeout(EVENT_TIMEOUT, recorder.publish(&event, &reference))
                    .await
                {
                    Ok(Ok(())) => debug!(object = %key, "Event published"),
                    Ok(Err(error)) => {
                        debug!(object = %key, error = %chain(&error), "cannot publish the Event");
                    }
                    Err(_elapsed) => debug!(object = %key, "publishing the Event timed out"),
                }
            });
        }
    }

    fn cluster_policy_reference(&self, name: &str) -> ObjectReference {
        let uid = self
            .stores
            .cluster_policies
            .state()
            .into_iter()
            .find(|o| o.metadata.name.as_deref() == Some(name))
            .and_then(|o| o.metadata.uid.clone());
        ObjectReference {
            api_version: Some(netpol_compile::cnp::API_VERSION.into()),
            kind: Some(netpol_compile::cnp::KIND.into()),
            name: Some(name.to_owned()),
            uid,
            ..ObjectReference::default()
        }
    }

    fn policy_reference(&self, key: &ObjectRef) -> ObjectReference {
        let uid = self
            .stores
            .policies
            .get(key, |policy| policy.object().metadata.uid)
            .flatten();
        namespaced_reference::<NetworkPolicy>(key, uid)
    }
}

/// The reference to the object `key` of kind `K` (its uid, when the store has it).
fn namespaced_reference<K: Resource<DynamicType = ()>>(
    key: &ObjectRef,
    uid: Option<String>,
) -> ObjectReference {
    ObjectReference {
        api_version: Some(K::api_version(&()).into_owned()),
        kind: Some(K::kind(&()).into_owned()),
        namespace: Some(key.namespace.to_string()),
        name: Some(key.name.to_string()),
        uid,
        ..ObjectReference::default()
    }
}

/// What an Event is about.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(super) enum Subject {
    Policy,
    ClusterPolicy,
    Pod,
}

impl Subject {
    fn reason(self) -> &'static str {
        match self {
            Subject::Policy => "InvalidNetworkPolicy",
            Subject::ClusterPolicy => "InvalidClusterNetworkPolicy",
            Subject::Pod => "NetworkPolicyNotProgrammed",
        }
    }
}
