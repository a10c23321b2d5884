//! Diagnostics: typed problems with objects, e.g.
//! `NetworkPolicy x/foo: spec.ingress[0].ports[0].endPort: must be >= port`.
//!
//! The subject is data ([`Subject`]), so whoever publishes a diagnostic (a log line, a
//! Kubernetes Event on the object, a count) reads the kind and name from it instead of
//! parsing the text back.

use crate::state::ObjectRef;

/// A problem with an object. Displays as `<subject>: <field>: <message>` (without the
/// field part when the field is empty).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Diagnostic {
    pub subject: Subject,
    /// JSON path inside the object; may be empty.
    pub field: String,
    pub message: String,
}

impl Diagnostic {
    pub fn new(subject: Subject, field: impl Into<String>, message: impl Into<String>) -> Self {
        Diagnostic {
            subject,
            field: field.into(),
            message: message.into(),
        }
    }

    /// The namespaced object this is about, with its kind, if it names one.
    pub fn object(&self) -> Option<(&Kind, &ObjectRef)> {
        match &self.subject {
            Subject::Object {
                kind,
                name: ObjectName::Namespaced(object),
            } => Some((kind, object)),
            _ => None,
        }
    }
}

impl std::fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.field.is_empty() {
            write!(f, "{}: {}", self.subject, self.message)
        } else {
            write!(f, "{}: {}: {}", self.subject, self.field, self.message)
        }
    }
}

/// What a [`Diagnostic`] is about.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Subject {
    /// An object: `NetworkPolicy x/p`, `Namespace x`, `Pod in a.yaml` (no usable name),
    /// `Pod (endpoint 3)`.
    Object { kind: Kind, name: ObjectName },
    /// A manifest file, or one of its documents (from 1): `a.yaml`, `a.yaml document 2`.
    File {
        origin: String,
        document: Option<usize>,
    },
    /// A peer address: `address 10.0.0.1`.
    Address(String),
}

impl Subject {
    /// A namespaced object of `kind`.
    pub fn object(kind: Kind, object: ObjectRef) -> Self {
        Subject::Object {
            kind,
            name: ObjectName::Namespaced(object),
        }
    }

    pub fn policy(object: &ObjectRef) -> Self {
        Subject::object(Kind::NetworkPolicy, object.clone())
    }

    pub fn pod(object: &ObjectRef) -> Self {
        Subject::object(Kind::Pod, object.clone())
    }
}

impl std::fmt::Display for Subject {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Subject::Object { kind, name } => match name {
                ObjectName::Namespaced(object) => write!(f, "{kind} {object}"),
                ObjectName::Cluster(name) => write!(f, "{kind} {name}"),
                ObjectName::In(origin) => write!(f, "{kind} in {origin}"),
                ObjectName::Endpoint(id) => write!(f, "{kind} (endpoint {id})"),
            },
            Subject::File {
                origin,
                document: None,
            } => f.write_str(origin),
            Subject::File {
                origin,
                document: Some(n),
            } => write!(f, "{origin} document {n}"),
            Subject::Address(address) => write!(f, "address {address}"),
        }
    }
}

/// The kind of an object, as its manifest says.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Kind {
    NetworkPolicy,
    Pod,
    Namespace,
    Service,
    EndpointSlice,
    ServiceCIDR,
    ClusterNetworkPolicy,
    /// Any other kind (unsupported in manifests), or `object` when none is given.
    Other(String),
}

impl Kind {
    /// The kind named `kind` (`object` for the empty name).
    pub fn of(kind: &str) -> Kind {
        match kind {
            "NetworkPolicy" => Kind::NetworkPolicy,
            "Pod" => Kind::Pod,
            "Namespace" => Kind::Namespace,
            "Service" => Kind::Service,
            "EndpointSlice" => Kind::EndpointSlice,
            "ServiceCIDR" => Kind::ServiceCIDR,
            "ClusterNetworkPolicy" => Kind::ClusterNetworkPolicy,
            "" => Kind::Other("object".into()),
            other => Kind::Other(other.into()),
        }
    }
}

impl std::fmt::Display for Kind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Kind::NetworkPolicy => "NetworkPolicy",
            Kind::Pod => "Pod",
            Kind::Namespace => "Namespace",
            Kind::Service => "Service",
            Kind::EndpointSlice => "EndpointSlice",
            Kind::ServiceCIDR => "ServiceCIDR",
            Kind::ClusterNetworkPolicy => "ClusterNetworkPolicy",
            Kind::Other(kind) => kind,
        })
    }
}

/// How a diagnostic names its object.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum ObjectName {
    /// `namespace/name`.
    Namespaced(ObjectRef),
    /// A cluster-scoped name (a Namespace), or a name given without a namespace.
    Cluster(String),
    /// No usable name: the file it was read from.
    In(String),
    /// A local pod known only by its endpoint id.
    Endpoint(u32),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn diagnostic_display() {
        let d = Diagnostic::new(
            Subject::policy(&ObjectRef::new("x", "foo")),
            "spec.ingress[0].ports[0].endPort",
            "must be >= port",
        );
        assert_eq!(
            d.to_string(),
            "NetworkPolicy x/foo: spec.ingress[0].ports[0].endPort: must be >= port"
        );
        let d = Diagnostic::new(Subject::pod(&ObjectRef::new("x", "a")), "", "m");
        assert_eq!(d.to_string(), "Pod x/a: m");
    }

    #[test]
    fn subjects_display_as_the_messages_always_named_them() {
        let shown = |subject: Subject| subject.to_string();
        assert_eq!(
            shown(Subject::Object {
                kind: Kind::Namespace,
                name: ObjectName::Cluster("x".into())
            }),
            "Namespace x"
        );
        assert_eq!(
            shown(Subject::Object {
                kind: Kind::of(""),
                name: ObjectName::In("a.yaml".into())
            }),
            "object in a.yaml"
        );
        assert_eq!(
            shown(Subject::Object {
                kind: Kind::Pod,
                name: ObjectName::Endpoint(3)
            }),
            "Pod (endpoint 3)"
        );
        assert_eq!(
            shown(Subject::File {
                origin: "a.yaml".into(),
                document: Some(2)
            }),
            "a.yaml document 2"
        );
        assert_eq!(
            shown(Subject::Address("10.0.0.1".into())),
            "address 10.0.0.1"
        );
    }
}
