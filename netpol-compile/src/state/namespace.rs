//! What the agent keeps of a Namespace: its labels (peers select namespaces by them)
//! and whether it opts into audit mode ([`super::AUDIT_ANNOTATION`]); nothing else of the
//! object decides a verdict.

use k8s_openapi::api::core::v1::Namespace;

use super::{AUDIT_ANNOTATION, Labels};

/// A Namespace as the state keeps it: its labels interned and shared (namespaces of one
/// team or environment carry equal sets), and its audit switch.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NamespaceInfo {
    /// `metadata.labels` (absent and empty are the same).
    labels: Labels,
    /// `metadata.annotations["netpol.dev/audit"]` is `"true"`.
    audited: bool,
}

impl NamespaceInfo {
    pub fn of(namespace: &Namespace) -> NamespaceInfo {
        let meta = &namespace.metadata;
        NamespaceInfo {
            labels: meta.labels.as_ref().map(Labels::from).unwrap_or_default(),
            audited: meta
                .annotations
                .as_ref()
                .and_then(|annotations| annotations.get(AUDIT_ANNOTATION))
                .is_some_and(|value| value == "true"),
        }
    }

    /// `metadata.labels`.
    pub fn labels(&self) -> &Labels {
        &self.labels
    }

    /// Whether the namespace opted into audit mode.
    pub fn audited(&self) -> bool {
        self.audited
    }

    /// The namespace with `labels` instead of its own.
    pub fn with_labels(&self, labels: Labels) -> NamespaceInfo {
        NamespaceInfo {
            labels,
            audited: self.audited,
        }
    }
}

impl From<Namespace> for NamespaceInfo {
    fn from(namespace: Namespace) -> Self {
        NamespaceInfo::of(&namespace)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn namespace(value: serde_json::Value) -> Namespace {
        serde_json::from_value(value).expect("a Namespace")
    }

    #[test]
    fn a_namespace_keeps_its_labels_and_its_audit_switch() {
        let kept = NamespaceInfo::of(&namespace(serde_json::json!({
            "metadata": {"name": "x", "labels": {"team": "a", "env": "prod"},
                         "annotations": {"netpol.dev/audit": "true", "other": "y"}},
            "spec": {"finalizers": ["kubernetes"]},
        })));
        let labels: Vec<(&str, &str)> = kept.labels().iter().collect();
        assert_eq!(labels, [("env", "prod"), ("team", "a")]);
        assert!(kept.audited());
    }

    #[test]
    fn only_true_turns_audit_on_and_no_labels_are_empty_labels() {
        for (annotations, audited) in [
            (serde_json::json!({"netpol.dev/audit": "false"}), false),
            (serde_json::json!({"netpol.dev/audit": "True"}), false),
            (serde_json::json!({}), false),
        ] {
            let kept = NamespaceInfo::of(&namespace(serde_json::json!({
                "metadata": {"name": "x", "annotations": annotations},
            })));
            assert_eq!(kept.audited(), audited);
            assert!(kept.labels().is_empty());
        }
    }

    #[test]
    fn namespaces_with_equal_labels_and_switch_are_equal() {
        let a = NamespaceInfo::of(&namespace(
            serde_json::json!({"metadata": {"name": "a", "labels": {"team": "t"}}}),
        ));
        let b = NamespaceInfo::of(&namespace(
            serde_json::json!({"metadata": {"name": "b", "labels": {"team": "t"}}}),
        ));
        assert_eq!(a, b, "the name is the key, not part of the value");
    }
}
