//! ClusterNetworkPolicy (`policy.networking.k8s.io/v1alpha2`, network-policy-api v0.2):
//! the cluster admin's tiers. [`parse::read_cnp`] is the single place that interprets
//! one object; it returns every [`FieldError`] and a [`ParsedCnp`] of what can be read.
//!
//! Validation is as strict as the CRD's (its OpenAPI schema and CEL rules): unknown
//! fields, required fields, the enums, every exactly-one-of, bounds and list sizes,
//! `start < end`, `isCIDR`, `networks` as a set, `tcp`/`udp`/`sctp` without a
//! `destinationPort`, and a named port beside a `networks` or `nodes` peer. Label keys
//! and values of selectors and port names are checked as Kubernetes checks them
//! elsewhere: a selector that cannot be built selects nothing we could enforce.
//! `domainNames` peers (experimental, need DNS) are reported as not supported.
//!
//! What cannot be read never fails open ([`parse::Reading`]): an object the API server
//! accepted but this reader cannot read in part is still enforced, with each rule that
//! cannot be read in full turned into a Deny of everything at its place, a subject whose
//! requirements cannot all be read widened to at least the pods meant, an unreadable
//! tier read as Admin and an unreadable priority as 0. Only an object without a name is
//! dropped: nothing could refer to it.

pub(crate) mod parse;
pub mod reference;
#[cfg(test)]
mod tests;

use ipnet::IpNet;

use crate::policy::FieldError;
use crate::selector::Selector;

#[allow(unused_imports)] // named in documentation
pub(crate) use self::parse::Reading;
pub(crate) use self::parse::read_cnp;

/// The API group and version of ClusterNetworkPolicy.
pub const API_VERSION: &str = "policy.networking.k8s.io/v1alpha2";
/// The kind.
pub const KIND: &str = "ClusterNetworkPolicy";

/// Checks `object` (a whole ClusterNetworkPolicy, as JSON) the way the API server
/// would: every field that cannot be read.
pub fn validate_cnp(object: &serde_json::Value) -> Result<(), Vec<FieldError>> {
    let reading = read_cnp(object);
    if reading.errors.is_empty() {
        Ok(())
    } else {
        Err(reading.errors)
    }
}

/// `spec.tier`: which side of NetworkPolicy the policy stands on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Tier {
    /// Before NetworkPolicy: a namespace owner's policy cannot override it.
    Admin,
    /// After NetworkPolicy: applies only where no NetworkPolicy selects the pod.
    Baseline,
}

impl std::fmt::Display for Tier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Tier::Admin => "Admin",
            Tier::Baseline => "Baseline",
        })
    }
}

/// A rule's `action`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Action {
    /// Allowed, replies included; nothing later in this direction is looked at.
    Accept,
    /// Dropped silently.
    Deny,
    /// Skip the rest of this tier.
    Pass,
}

impl std::fmt::Display for Action {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Action::Accept => "Accept",
            Action::Deny => "Deny",
            Action::Pass => "Pass",
        })
    }
}

/// What can be read of one ClusterNetworkPolicy (see [`Reading`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct ParsedCnp {
    pub name: String,
    pub tier: Tier,
    /// 0..=1000; a lower number is looked at first.
    pub priority: u16,
    pub subject: Pods,
    /// The rules of each direction, in order.
    pub ingress: Vec<CnpRule>,
    pub egress: Vec<CnpRule>,
}

/// Pods chosen by namespace labels and pod labels: `subject` and the `namespaces` and
/// `pods` peers. Host-network pods are never among them.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(crate) struct Pods {
    pub namespaces: Selector,
    /// `None`: every pod of those namespaces (`namespaces:`).
    pub pods: Option<Selector>,
}

/// One rule of `ingress` or `egress`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct CnpRule {
    /// Its place in the list.
    pub index: usize,
    /// `name`, if given.
    pub name: Option<String>,
    pub action: Action,
    /// `None`: every peer (only for a rule that could not be read, turned into a Deny).
    pub peers: Option<Vec<CnpPeer>>,
    /// `None`: every protocol and port (`protocols` absent).
    pub protocols: Option<Vec<CnpProtocol>>,
}

/// One entry of `from`/`to`.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(crate) enum CnpPeer {
    /// `namespaces` or `pods`: pods only, never hosts.
    Pods(Pods),
    /// `networks` (egress): addresses, pod addresses included. Host bits are masked.
    Networks(Vec<IpNet>),
    /// `nodes` (egress): the addresses of the nodes whose labels match.
    Nodes(Selector),
}

/// One entry of `protocols`.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(crate) enum CnpProtocol {
    /// `tcp`/`udp`/`sctp` with a destination port number or range (both ends included).
    Ports { protocol: u8, first: u16, last: u16 },
    /// `destinationNamedPort`: resolved on each destination pod (the containerPort of
    /// that name gives number and protocol); never matches a host.
    Named(String),
}
