//! The reference evaluator with the cluster admin's tiers: one side of a new connection
//! is decided by the Admin tier, then NetworkPolicy ([`crate::reference`]), then the
//! Baseline tier, then the default, allow (FORMAT.md, "Semantics the cases rely on").
//!
//! Like the NetworkPolicy reference, it is written to be obviously right rather than
//! fast: every question walks the objects. It shares only the reading of each object
//! ([`read_cnp`], as the NetworkPolicy reference shares validation) and is meant to be
//! compared with the compiler and the kernel's programs once they know the tiers.

use std::net::IpAddr;

use super::{Action, CnpPeer, CnpProtocol, CnpRule, ParsedCnp, Pods, Tier, read_cnp};
use crate::Direction;
use crate::reference::{Reference, Verdict, named_port, pod_with_ip};
use crate::state::{ClusterState, ObjectRef, PodInfo};

/// A rule of a ClusterNetworkPolicy, by place.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CnpRuleRef {
    pub tier: Tier,
    pub policy: String,
    pub priority: u16,
    pub direction: Direction,
    /// Its index in `ingress`/`egress`.
    pub index: usize,
    /// Its `name`, if it has one.
    pub name: Option<String>,
}

impl CnpRuleRef {
    /// Whether `rule` (the compiler's numbering of rules) is this rule.
    pub fn names(&self, rule: &crate::RuleRef) -> bool {
        rule.policy.name == self.policy
            && rule.direction == self.direction
            && rule.index == self.index
            && rule.cluster.as_ref().is_some_and(|c| c.tier == self.tier)
    }
}

/// `ClusterNetworkPolicy/deny-sys (Admin, priority 10) ingress rule "deny-sys"`, or
/// `... spec.ingress[0]` for a rule without a name: as [`crate::RuleRef`] reads.
impl std::fmt::Display for CnpRuleRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "ClusterNetworkPolicy/{} ({}, priority {}) ",
            self.policy, self.tier, self.priority
        )?;
        let field = self.direction.field();
        match &self.name {
            Some(name) => write!(f, "{field} rule {name:?}"),
            None => write!(f, "spec.{field}[{}]", self.index),
        }
    }
}

/// What decided one side of a new connection.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DecidedBy {
    /// The address judged at this hook is not a local pod: nothing to enforce here.
    NotEndpoint,
    /// The pod reaching itself: never subject.
    Itself,
    /// A ClusterNetworkPolicy rule that accepted or denied it.
    Cnp { rule: CnpRuleRef, action: Action },
    /// NetworkPolicy: a policy selects the pod for this direction (the verdict is final),
    /// or the pod's own node reaching it.
    NetworkPolicy(Verdict),
    /// Nothing did: allowed.
    Default,
}

/// The tiered verdict for one hook, with the Pass rules it went through on the way.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TieredVerdict {
    pub decided_by: DecidedBy,
    /// Pass rules that sent the decision on to the next tier, in order (at most one per
    /// tier).
    pub passed: Vec<CnpRuleRef>,
}

impl TieredVerdict {
    pub fn allowed(&self) -> bool {
        match &self.decided_by {
            DecidedBy::Cnp { action, .. } => *action != Action::Deny,
            DecidedBy::NetworkPolicy(verdict) => verdict.allowed(),
            DecidedBy::NotEndpoint | DecidedBy::Itself | DecidedBy::Default => true,
        }
    }
}

/// What a tier made of a connection.
enum TierOutcome {
    Decided(CnpRuleRef, Action),
    Passed(CnpRuleRef),
    NoMatch,
}

/// The tiered evaluator over one state.
pub struct TieredReference<'a> {
    state: &'a ClusterState,
    networkpolicy: Reference<'a>,
    /// Each tier's policies in the order they are looked at: by priority, then by name
    /// (equal priorities may go either way; cases never depend on it).
    admin: Vec<ParsedCnp>,
    baseline: Vec<ParsedCnp>,
}

impl<'a> TieredReference<'a> {
    pub fn new(state: &'a ClusterState) -> Self {
        let mut admin = Vec::new();
        let mut baseline = Vec::new();
        for object in state.cluster_policies.values() {
            let Some(parsed) = read_cnp(object).parsed else {
                continue;
            };
            match parsed.tier {
                Tier::Admin => admin.push(parsed),
                Tier::Baseline => baseline.push(parsed),
            }
        }
        for tier in [&mut admin, &mut baseline] {
            tier.sort_by(|a, b| (a.priority, &a.name).cmp(&(b.priority, &b.name)));
        }
        TieredReference {
            state,
            networkpolicy: Reference::new(state),
            admin,
            baseline,
        }
    }

    /// Whether a new flow passes both hooks on this node.
    pub fn flow_allowed(&self, src: IpAddr, dst: IpAddr, protocol: u8, port: u16) -> bool {
        Direction::BOTH
            .into_iter()
            .all(|direction| self.evaluate(src, dst, protocol, port, direction).allowed())
    }

    /// The verdict for a new flow `src -> dst` at `direction`'s hook of the local pod
    /// that owns `dst` (ingress) or `src` (egress).
    pub fn evaluate(
        &self,
        src: IpAddr,
        dst: IpAddr,
        protocol: u8,
        port: u16,
        direction: Direction,
    ) -> TieredVerdict {
        let (local, remote) = direction.ends(src, dst);
        let decided = |decided_by, passed| TieredVerdict { decided_by, passed };
        let Some(pod) = pod_with_ip(self.state, local).filter(|(_, p)| self.state.node.is_local(p))
        else {
            return decided(DecidedBy::NotEndpoint, Vec::new());
        };
        if remote == local {
            return decided(DecidedBy::Itself, Vec::new());
        }
        let connection = Connection {
            local: pod,
            remote,
            remote_pod: pod_with_ip(self.state, remote),
            protocol,
            port,
            direction,
        };
        let mut passed = Vec::new();
        match self.tier(&self.admin, &connection) {
            TierOutcome::Decided(rule, action) => {
                return decided(DecidedBy::Cnp { rule, action }, passed);
            }
            TierOutcome::Passed(rule) => passed.push(rule),
            TierOutcome::NoMatch => {}
        }
        let verdict = self
            .networkpolicy
            .evaluate(src, dst, protocol, port, direction);
        if verdict != Verdict::NotIsolated {
            return decided(DecidedBy::NetworkPolicy(verdict), passed);
        }
        match self.tier(&self.baseline, &connection) {
            TierOutcome::Decided(rule, action) => decided(DecidedBy::Cnp { rule, action }, passed),
            TierOutcome::Passed(rule) => {
                passed.push(rule);
                decided(DecidedBy::Default, passed)
            }
            TierOutcome::NoMatch => decided(DecidedBy::Default, passed),
        }
    }

    /// The first rule of the tier's policies that select the local pod and whose peer
    /// and protocols match.
    fn tier(&self, policies: &[ParsedCnp], connection: &Connection<'_>) -> TierOutcome {
        let (_, local_pod) = connection.local;
        for policy in policies {
            if !self.selects(&policy.subject, connection.local) {
                continue;
            }
            let rules = match connection.direction {
                Direction::Ingress => &policy.ingress,
                Direction::Egress => &policy.egress,
            };
            for rule in rules {
                if !self.rule_matches(rule, connection, local_pod) {
                    continue;
                }
                let at = CnpRuleRef {
                    tier: policy.tier,
                    policy: policy.name.clone(),
                    priority: policy.priority,
                    direction: connection.direction,
                    index: rule.index,
                    name: rule.name.clone(),
                };
                return match rule.action {
                    Action::Pass => TierOutcome::Passed(at),
                    action => TierOutcome::Decided(at, action),
                };
            }
        }
        TierOutcome::NoMatch
    }

    /// Whether `pods` (a subject, or a `namespaces`/`pods` peer) selects the pod.
    fn selects(&self, pods: &Pods, (obj, pod): (&ObjectRef, &PodInfo)) -> bool {
        pods.namespaces
            .matches(&self.state.namespace_labels(&obj.namespace))
            && pods
                .pods
                .as_ref()
                .is_none_or(|selector| selector.matches(pod.labels()))
    }

    fn rule_matches(
        &self,
        rule: &CnpRule,
        connection: &Connection<'_>,
        local_pod: &PodInfo,
    ) -> bool {
        let peer_ok = match &rule.peers {
            // Every peer (a rule that could not be read, denying at its place); the
            // node's own addresses stay out of ingress rules, as they are out of every
            // peer an ingress rule can name.
            None => {
                connection.direction == Direction::Egress
                    || !self.state.node.ips.contains(&connection.remote)
            }
            Some(peers) => peers.iter().any(|peer| match peer {
                CnpPeer::Pods(pods) => connection
                    .remote_pod
                    .is_some_and(|remote| self.selects(pods, remote)),
                CnpPeer::Networks(nets) => nets.iter().any(|net| net.contains(&connection.remote)),
                // The addresses (InternalIP, ExternalIP) of the nodes whose labels match.
                CnpPeer::Nodes(selector) => self.state.nodes.values().any(|node| {
                    selector.matches(&node.labels) && node.ips.contains(&connection.remote)
                }),
            }),
        };
        if !peer_ok {
            return false;
        }
        let Some(protocols) = &rule.protocols else {
            return true;
        };
        // Named ports are looked up on the destination: the local pod for ingress, the
        // remote one (if a pod) for egress.
        let destination = match connection.direction {
            Direction::Ingress => Some(local_pod),
            Direction::Egress => connection.remote_pod.map(|(_, pod)| pod),
        };
        protocols.iter().any(|protocol| match protocol {
            CnpProtocol::Ports {
                protocol,
                first,
                last,
            } => *protocol == connection.protocol && (*first..=*last).contains(&connection.port),
            CnpProtocol::Named(name) => destination.is_some_and(|pod| {
                named_port(pod, name, connection.protocol)
                    .is_some_and(|number| number == i32::from(connection.port))
            }),
        })
    }
}

/// One side of a new connection.
struct Connection<'a> {
    local: (&'a ObjectRef, &'a PodInfo),
    remote: IpAddr,
    remote_pod: Option<(&'a ObjectRef, &'a PodInfo)>,
    protocol: u8,
    port: u16,
    direction: Direction,
}

#[cfg(test)]
mod tests;
