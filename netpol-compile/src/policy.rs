//! The normalised form of a NetworkPolicy; [`parse`] validates and builds it.
//!
//! [`parse::parse_policy`] is the single place that interprets a `networking.k8s.io/v1`
//! NetworkPolicy: it returns every [`FieldError`] and a [`ParsedPolicy`] of what can be
//! read ([`Reading`]: what cannot be read never allows anything and never isolates
//! less), with defaults applied (policyTypes, protocol TCP, empty selectors), CIDRs read
//! as the API server reads them (`cidr.rs`) and selectors parsed. Checks follow the API
//! server's validation (`ValidateNetworkPolicy`) for everything the compiler relies on;
//! unknown fields are the source layer's business (it sees the raw document).

mod cidr;
mod parse;

use std::net::IpAddr;

use ipnet::IpNet;
use netpol_common::{PROTO_SCTP, PROTO_TCP, PROTO_UDP};

use super::Direction;
use super::selector::Selector;

#[allow(unused_imports)] // named in documentation
pub(crate) use self::parse::Reading;
pub(crate) use self::parse::parse_policy;
pub use self::parse::validate_policy;

/// One problem with one field of an object.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct FieldError {
    /// JSON path from the object root, e.g. `spec.ingress[0].ports[1].endPort`.
    pub field: String,
    pub message: String,
}

impl FieldError {
    pub(crate) fn new(field: impl Into<String>, message: impl Into<String>) -> Self {
        FieldError {
            field: field.into(),
            message: message.into(),
        }
    }
}

/// What can be read of a NetworkPolicy (see [`Reading`]), with defaults applied.
#[derive(Clone, Debug)]
pub(crate) struct ParsedPolicy {
    pub namespace: String,
    pub pod_selector: Selector,
    /// `None`: the policy does not have policyType Ingress (its ingress rules, if any,
    /// are ignored, as the API server does). The rules that can be read, in order.
    pub ingress: Option<Vec<ParsedRule>>,
    pub egress: Option<Vec<ParsedRule>>,
}

impl ParsedPolicy {
    pub fn rules(&self, direction: Direction) -> Option<&[ParsedRule]> {
        match direction {
            Direction::Ingress => self.ingress.as_deref(),
            Direction::Egress => self.egress.as_deref(),
        }
    }
}

#[derive(Clone, Debug)]
pub(crate) struct ParsedRule {
    /// Its place in `spec.ingress`/`spec.egress`: rules that cannot be read are left
    /// out of the list, so the position may be smaller.
    pub index: usize,
    /// `None`: any peer (absent or empty `from`/`to`).
    pub peers: Option<Vec<Peer>>,
    /// `None`: every protocol and port (absent or empty `ports`).
    pub ports: Option<Vec<PortSpec>>,
}

/// One entry of `from`/`to`.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(crate) enum Peer {
    Pods {
        namespaces: NamespaceMatch,
        pods: Selector,
    },
    Block(Block),
    /// The addresses of the nodes whose labels match (ClusterNetworkPolicy `nodes`).
    Nodes(Selector),
}

#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(crate) enum NamespaceMatch {
    /// No namespaceSelector: the policy's own namespace.
    Named(String),
    Selector(Selector),
}

/// An ipBlock with masked prefixes, as Go's `IPNet.Contains` reads it (see `cidr.rs`).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(crate) struct Block {
    pub cidr: IpNet,
    /// Sorted, without duplicates. An IPv6 `cidr` covering the IPv4-mapped range
    /// `::ffff:0:0/96` has it here too: Go's `Contains` compares those addresses as IPv4,
    /// so no IPv6 network holds them.
    pub except: Vec<IpNet>,
}

impl Block {
    pub fn new(cidr: IpNet, mut except: Vec<IpNet>) -> Block {
        if let IpNet::V6(v6) = cidr
            && v6.contains(&cidr::mapped_range())
        {
            except.push(IpNet::V6(cidr::mapped_range()));
        }
        except.sort();
        except.dedup();
        Block { cidr, except }
    }

    pub fn contains_addr(&self, addr: IpAddr) -> bool {
        self.cidr.contains(&addr) && !self.except.iter().any(|e| e.contains(&addr))
    }

    /// Whether every address of `prefix` is in the block.
    pub fn contains_prefix(&self, prefix: &IpNet) -> bool {
        self.cidr.contains(prefix) && !self.except.iter().any(|e| e.contains(prefix))
    }
}

impl Peer {
    /// Canonical text; equal for peers that select the same thing however written.
    pub fn canonical(&self) -> String {
        match self {
            Peer::Pods {
                namespaces: NamespaceMatch::Named(ns),
                pods,
            } => {
                format!("pods {} in namespace {ns}", pods.canonical())
            }
            Peer::Pods {
                namespaces: NamespaceMatch::Selector(ns),
                pods,
            } => {
                format!("pods {} in namespaces {}", pods.canonical(), ns.canonical())
            }
            Peer::Nodes(nodes) => format!("nodes {}", nodes.canonical()),
            Peer::Block(b) if b.except.is_empty() => format!("ipBlock {}", b.cidr),
            Peer::Block(b) => {
                let except: Vec<String> = b.except.iter().map(ToString::to_string).collect();
                format!("ipBlock {} except {}", b.cidr, except.join(","))
            }
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(crate) struct PortSpec {
    pub protocol: u8,
    pub port: PortMatch,
}

#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(crate) enum PortMatch {
    /// No `port`: every port of the protocol.
    All,
    /// `port` with optional `endPort`, inclusive.
    Range(u16, u16),
    /// A named port, resolved on the destination pod.
    Named(String),
}

/// Protocol name (`TCP`, `UDP`, `SCTP`) to IP protocol number.
pub(crate) fn protocol_number(name: &str) -> Option<u8> {
    match name {
        "TCP" => Some(PROTO_TCP),
        "UDP" => Some(PROTO_UDP),
        "SCTP" => Some(PROTO_SCTP),
        _ => None,
    }
}

/// IANA_SVC_NAME as Kubernetes checks it (`validation.IsValidPortName`).
pub(crate) fn is_valid_port_name(name: &str) -> bool {
    let b = name.as_bytes();
    !b.is_empty()
        && b.len() <= 15
        && b.iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
        && b.iter().any(|c| c.is_ascii_lowercase())
        && b[0] != b'-'
        && b[b.len() - 1] != b'-'
        && !name.contains("--")
}
