//! "Which policy dropped my packet?": one flow, explained step by step.
//!
//! A new flow from a pod crosses two hooks at most: the source pod's egress hook and the
//! destination pod's ingress hook. For each, [`explain`] records what the kernel would
//! decide (replayed over the compiled maps by [`model::decide`], so the verdict is the
//! datapath's), and why: whether the pod is isolated and by which policies, which
//! identity the peer has, and for every rule of those policies whether it matches or
//! which part (peer, protocol, port) does not. The per-rule reasoning is evaluated
//! independently over the Kubernetes objects; [`HookExplanation::analysis_agrees`]
//! says whether it agrees with the maps (it always should; tests assert it).
//!
//! [`Explanation`] is plain data (no I/O) with a `Display` impl for people and
//! `serde::Serialize` for machines, so a flow log can attach it to observed events.

use std::collections::BTreeMap;
use std::net::IpAddr;

use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::api::networking::v1::{NetworkPolicy, NetworkPolicyPeer, NetworkPolicyPort};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use netpol_common::{PROTO_SCTP, PROTO_TCP, PROTO_UDP, Reason};
use serde::Serialize;

use super::text::{self, as_display};
use super::{ObserveError, PodAddresses, PortProtocol, SkippedPod, pod_addresses};
use netpol_compile::state::{ClusterState, ObjectRef};
use netpol_compile::{Compiled, Direction, RuleRef, model};

/// One end of a flow.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Party {
    /// A pod (live, in the pod network) and the address used.
    Pod {
        #[serde(serialize_with = "as_display")]
        pod: ObjectRef,
        ip: IpAddr,
    },
    /// An address of the node (`--node-ip`).
    Node { ip: IpAddr },
    /// Any other address: outside the cluster, or not known to the state.
    Outside { ip: IpAddr },
}

impl Party {
    pub fn ip(&self) -> IpAddr {
        match self {
            Party::Pod { ip, .. } | Party::Node { ip } | Party::Outside { ip } => *ip,
        }
    }

    pub fn pod(&self) -> Option<&ObjectRef> {
        match self {
            Party::Pod { pod, .. } => Some(pod),
            _ => None,
        }
    }

    /// Short name: `x/a`, `node 10.0.0.254`, `8.8.8.8`.
    pub fn name(&self) -> String {
        match self {
            Party::Pod { pod, .. } => pod.to_string(),
            Party::Node { ip } => format!("node {ip}"),
            Party::Outside { ip } => ip.to_string(),
        }
    }
}

/// `x/a (10.0.0.1)`, `node (10.0.0.254)`, `8.8.8.8 (not a pod)`.
impl std::fmt::Display for Party {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Party::Pod { pod, ip } => write!(f, "{pod} ({ip})"),
            Party::Node { ip } => write!(f, "node ({ip})"),
            Party::Outside { ip } => write!(f, "{ip} (not a pod)"),
        }
    }
}

/// A flow, explained.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Explanation {
    pub src: Party,
    pub dst: Party,
    pub port: PortProtocol,
    /// The hooks the flow crosses, in packet order: the source pod's egress, then the
    /// destination pod's ingress (each only when that end is a pod).
    pub hooks: Vec<HookExplanation>,
    /// The kernel's verdict: every hook allows it. Equals [`model::flow_allowed`].
    pub allowed: bool,
}

/// What one hook decides, and why.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct HookExplanation {
    /// From the pod's point of view: `Egress` for the source, `Ingress` for the destination.
    #[serde(serialize_with = "as_display")]
    pub direction: Direction,
    /// The pod whose hook this is.
    #[serde(serialize_with = "as_display")]
    pub pod: ObjectRef,
    /// The other end.
    pub peer: Party,
    /// The flow's destination port and protocol.
    pub port: PortProtocol,
    /// The decision replayed over the compiled maps.
    pub verdict: HookVerdict,
    /// Valid policies that select the pod with this policy type (empty: not isolated).
    #[serde(serialize_with = "display_list")]
    pub isolated_by: Vec<ObjectRef>,
    /// The peer's identity, when the pod is isolated and the maps were consulted.
    pub peer_identity: Option<PeerIdentity>,
    /// Every rule of `isolated_by` in this direction (in policy and rule order).
    pub rules: Vec<RuleCheck>,
    /// Whether the per-rule reasoning agrees with `verdict` (a rule matches iff the
    /// maps allow, and the rule the maps name is among the matching ones).
    pub analysis_agrees: bool,
}

impl HookExplanation {
    pub fn allowed(&self) -> bool {
        !matches!(self.verdict, HookVerdict::Denied)
    }
}

/// The kernel's decision at one hook.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "verdict", rename_all = "kebab-case")]
pub enum HookVerdict {
    /// The pod is not on this node: its own node judges this hook.
    NotLocal,
    /// No policy isolates the pod in this direction.
    NotIsolated,
    /// Ingress from the pod's own node: always allowed (kubelet probes).
    FromNode,
    /// Allowed by this rule (the one the POLICY map entry names).
    Allowed {
        #[serde(serialize_with = "as_display")]
        rule: RuleRef,
    },
    /// No rule allows it, but the endpoint is in audit mode.
    AuditAllowed,
    /// Isolated, and no rule allows it: dropped.
    Denied,
}

/// A peer identity as the compiler numbered and described it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct PeerIdentity {
    pub id: u32,
    /// E.g. `matches [pods {app=web} in namespace x]`.
    pub description: String,
}

/// One rule of an isolating policy, checked against the flow.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct RuleCheck {
    #[serde(serialize_with = "as_display")]
    pub policy: ObjectRef,
    /// `spec.<direction>[index]`; `None` when the policy has no rules in this direction.
    pub index: Option<usize>,
    pub result: RuleResult,
}

/// Whether a rule matches the flow.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "result", rename_all = "kebab-case")]
pub enum RuleResult {
    Matches,
    /// The policy isolates without rules in this direction (a "deny" policy).
    NoRules,
    /// Every part of the rule that does not match.
    NoMatch {
        mismatches: Vec<Mismatch>,
    },
}

/// A part of a rule that does not match, with what it would need.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "part", rename_all = "kebab-case")]
pub enum Mismatch {
    /// None of `from`/`to` matches the peer; `needs` lists them.
    Peer { needs: Vec<String> },
    /// No port entry has the flow's protocol; `needs` lists the entries.
    Protocol { needs: Vec<String> },
    /// Entries of the protocol exist but none covers the port; `needs` lists them.
    Port { needs: Vec<String> },
}

fn display_list<S: serde::Serializer>(list: &[ObjectRef], s: S) -> Result<S::Ok, S::Error> {
    s.collect_seq(list.iter().map(ToString::to_string))
}

/// Finds pods, the node and outside addresses by name or address.
pub struct Resolver<'a> {
    state: &'a ClusterState,
    pods: Vec<PodAddresses>,
    skipped: Vec<SkippedPod>,
}

impl<'a> Resolver<'a> {
    pub fn new(state: &'a ClusterState) -> Self {
        let (pods, skipped) = pod_addresses(state);
        Resolver {
            state,
            pods,
            skipped,
        }
    }

    /// What `ip` is: a pod's address, the node's, or anything else.
    pub fn party(&self, ip: IpAddr) -> Party {
        if let Some(p) = self.pods.iter().find(|p| p.ips.contains(&ip)) {
            Party::Pod {
                pod: p.pod.clone(),
                ip,
            }
        } else if self.state.node.ips.contains(&ip) {
            Party::Node { ip }
        } else {
            Party::Outside { ip }
        }
    }

    /// `ns/pod` (one party per address of the pod), `node` (each node address), or an
    /// IP address.
    pub fn resolve(&self, text: &str) -> Result<Vec<Party>, ObserveError> {
        let fail = |reason: String| ObserveError::Endpoint {
            input: text.to_string(),
            reason,
        };
        if let Ok(ip) = text.parse::<IpAddr>() {
            return Ok(vec![self.party(ip)]);
        }
        if text == "node" {
            if self.state.node.ips.is_empty() {
                return Err(fail("no node address is known: pass --node-ip".into()));
            }
            return Ok(self
                .state
                .node
                .ips
                .iter()
                .map(|&ip| Party::Node { ip })
                .collect());
        }
        let Some((namespace, name)) = text.split_once('/') else {
            return Err(fail(
                "expected namespace/pod, `node`, or an IP address".into(),
            ));
        };
        let wanted = ObjectRef::new(namespace, name);
        if let Some(p) = self.pods.iter().find(|p| p.pod == wanted) {
            return Ok(p
                .ips
                .iter()
                .map(|&ip| Party::Pod {
                    pod: p.pod.clone(),
                    ip,
                })
                .collect());
        }
        if let Some(s) = self.skipped.iter().find(|s| s.pod == wanted) {
            return Err(fail(format!(
                "the pod takes no part in pod traffic ({})",
                s.reason
            )));
        }
        let known: Vec<String> = self.pods.iter().map(|p| p.pod.to_string()).collect();
        Err(fail(format!(
            "no such pod; known pods: {}",
            if known.is_empty() {
                "none".to_string()
            } else {
                known.join(", ")
            }
        )))
    }
}

/// Explains a flow between two named ends (see [`Resolver::resolve`]): one explanation
/// per address pair of the same family (a dual-stack pod has one per family).
pub fn explain_between(
    state: &ClusterState,
    compiled: &Compiled,
    src: &str,
    dst: &str,
    port: PortProtocol,
) -> Result<Vec<Explanation>, ObserveError> {
    let resolver = Resolver::new(state);
    let sources = resolver.resolve(src)?;
    let destinations = resolver.resolve(dst)?;
    if let (Some(a), Some(b)) = (sources[0].pod(), destinations[0].pod())
        && a == b
    {
        return Err(ObserveError::Endpoint {
            input: dst.to_string(),
            reason: "a pod reaching itself stays inside it (loopback): never filtered".into(),
        });
    }
    let mut out = Vec::new();
    for s in &sources {
        for d in &destinations {
            if s.ip().is_ipv4() == d.ip().is_ipv4() {
                out.push(explain_parties(state, compiled, s.clone(), d.clone(), port));
            }
        }
    }
    if out.is_empty() {
        return Err(ObserveError::Endpoint {
            input: format!("{src} -> {dst}"),
            reason: "the two ends have no address family in common".into(),
        });
    }
    Ok(out)
}

/// Explains the new flow `src -> dst` on `port`.
pub fn explain(
    state: &ClusterState,
    compiled: &Compiled,
    src: IpAddr,
    dst: IpAddr,
    port: PortProtocol,
) -> Explanation {
    let resolver = Resolver::new(state);
    explain_parties(
        state,
        compiled,
        resolver.party(src),
        resolver.party(dst),
        port,
    )
}

fn explain_parties(
    state: &ClusterState,
    compiled: &Compiled,
    src: Party,
    dst: Party,
    port: PortProtocol,
) -> Explanation {
    let analysis = Analysis::new(state, &src, &dst, port);
    let mut hooks = Vec::new();
    if let Party::Pod { pod, .. } = &src {
        hooks.push(analysis.hook(compiled, Direction::Egress, pod, &dst));
    }
    if let Party::Pod { pod, .. } = &dst {
        hooks.push(analysis.hook(compiled, Direction::Ingress, pod, &src));
    }
    let allowed = hooks.iter().all(HookExplanation::allowed);
    Explanation {
        src,
        dst,
        port,
        hooks,
        allowed,
    }
}

/// The independent, per-rule evaluation of one flow over the objects.
struct Analysis<'a> {
    state: &'a ClusterState,
    src: &'a Party,
    dst: &'a Party,
    port: PortProtocol,
}

impl<'a> Analysis<'a> {
    fn new(state: &'a ClusterState, src: &'a Party, dst: &'a Party, port: PortProtocol) -> Self {
        Analysis {
            state,
            src,
            dst,
            port,
        }
    }

    fn pod_of(&self, party: &Party) -> Option<(&'a ObjectRef, &'a Pod)> {
        party.pod().and_then(|p| self.state.pods.get_key_value(p))
    }

    fn hook(
        &self,
        compiled: &Compiled,
        direction: Direction,
        pod: &ObjectRef,
        peer: &Party,
    ) -> HookExplanation {
        let port = self.port;
        let decision = model::decide(
            compiled,
            self.src.ip(),
            self.dst.ip(),
            port.protocol,
            port.port,
            direction,
        );
        let isolated_by = compiled
            .local_pods
            .iter()
            .find(|lp| lp.pod == *pod)
            .map(|lp| match direction {
                Direction::Ingress => lp.ingress_policies.clone(),
                Direction::Egress => lp.egress_policies.clone(),
            })
            .unwrap_or_default();
        let verdict = match decision.reason {
            Reason::NotEndpoint => HookVerdict::NotLocal,
            Reason::NotIsolated => HookVerdict::NotIsolated,
            Reason::FromHost => HookVerdict::FromNode,
            Reason::AuditAllowed => HookVerdict::AuditAllowed,
            Reason::PolicyAllowed => match compiled.rules.get(&decision.rule) {
                Some(rule) => HookVerdict::Allowed { rule: rule.clone() },
                // A POLICY value always names a rule of the table; be explicit anyway.
                None => HookVerdict::Denied,
            },
            _ => HookVerdict::Denied,
        };
        let consulted = matches!(
            verdict,
            HookVerdict::Allowed { .. } | HookVerdict::AuditAllowed | HookVerdict::Denied
        );
        let peer_identity = consulted.then(|| {
            let id = decision.peer.identity;
            PeerIdentity {
                id,
                description: compiled
                    .identities
                    .get(&id)
                    .map(|i| i.description.clone())
                    .unwrap_or_else(|| "unknown identity".into()),
            }
        });
        let rules = if consulted {
            self.check_policies(&isolated_by, direction, peer)
        } else {
            Vec::new()
        };
        let matching = |rule: &RuleRef| {
            rules.iter().any(|r| {
                r.policy == rule.policy
                    && r.index == Some(rule.index)
                    && r.result == RuleResult::Matches
            })
        };
        let any_match = rules.iter().any(|r| r.result == RuleResult::Matches);
        let analysis_agrees = match &verdict {
            HookVerdict::Allowed { rule } => matching(rule),
            HookVerdict::Denied | HookVerdict::AuditAllowed => !any_match,
            _ => true,
        };
        HookExplanation {
            direction,
            pod: pod.clone(),
            peer: peer.clone(),
            port,
            verdict,
            isolated_by,
            peer_identity,
            rules,
            analysis_agrees,
        }
    }

    fn check_policies(
        &self,
        policies: &[ObjectRef],
        direction: Direction,
        peer: &Party,
    ) -> Vec<RuleCheck> {
        let mut out = Vec::new();
        for obj in policies {
            let Some(np) = self.state.policies.get(obj) else {
                continue;
            };
            let rules = rules_of(np, direction);
            if rules.is_empty() {
                out.push(RuleCheck {
                    policy: obj.clone(),
                    index: None,
                    result: RuleResult::NoRules,
                });
            }
            for (index, (peers, ports)) in rules.into_iter().enumerate() {
                let result = self.check_rule(&obj.namespace, &peers, &ports, direction, peer);
                out.push(RuleCheck {
                    policy: obj.clone(),
                    index: Some(index),
                    result,
                });
            }
        }
        out
    }

    fn check_rule(
        &self,
        policy_namespace: &str,
        peers: &[NetworkPolicyPeer],
        ports: &[NetworkPolicyPort],
        direction: Direction,
        peer: &Party,
    ) -> RuleResult {
        let mut mismatches = Vec::new();
        let remote_pod = self.pod_of(peer);
        if !peers.is_empty()
            && !peers
                .iter()
                .any(|p| self.peer_matches(policy_namespace, p, peer.ip(), remote_pod))
        {
            mismatches.push(Mismatch::Peer {
                needs: peers
                    .iter()
                    .map(|p| text::peer(policy_namespace, p))
                    .collect(),
            });
        }
        // Named ports resolve on the destination: the pod itself for ingress, the peer
        // for egress.
        let dst_pod = match direction {
            Direction::Ingress => self.pod_of(self.dst),
            Direction::Egress => remote_pod,
        };
        if !ports.is_empty() && !ports.iter().any(|p| self.port_matches(p, dst_pod)) {
            let same_protocol: Vec<&NetworkPolicyPort> = ports
                .iter()
                .filter(|p| protocol_number(p.protocol.as_deref()) == Some(self.port.protocol))
                .collect();
            if same_protocol.is_empty() {
                mismatches.push(Mismatch::Protocol {
                    needs: ports.iter().map(text::port).collect(),
                });
            } else {
                mismatches.push(Mismatch::Port {
                    needs: same_protocol
                        .into_iter()
                        .map(|p| describe_port(p, dst_pod))
                        .collect(),
                });
            }
        }
        if mismatches.is_empty() {
            RuleResult::Matches
        } else {
            RuleResult::NoMatch { mismatches }
        }
    }

    fn peer_matches(
        &self,
        policy_namespace: &str,
        peer: &NetworkPolicyPeer,
        ip: IpAddr,
        pod: Option<(&ObjectRef, &Pod)>,
    ) -> bool {
        if let Some(block) = &peer.ip_block {
            let within = |cidr: &str| {
                cidr.parse::<ipnet::IpNet>()
                    .is_ok_and(|net| net.trunc().contains(&ip))
            };
            return within(&block.cidr) && !block.except.iter().flatten().any(|e| within(e));
        }
        let Some((obj, pod)) = pod else {
            return false;
        };
        let namespace_ok = match &peer.namespace_selector {
            None => obj.namespace == policy_namespace,
            Some(sel) => selector_matches(sel, &self.state.namespace_labels(&obj.namespace)),
        };
        let pod_ok = peer.pod_selector.as_ref().is_none_or(|sel| {
            selector_matches(sel, &pod.metadata.labels.clone().unwrap_or_default())
        });
        namespace_ok && pod_ok
    }

    fn port_matches(&self, p: &NetworkPolicyPort, dst_pod: Option<(&ObjectRef, &Pod)>) -> bool {
        if protocol_number(p.protocol.as_deref()) != Some(self.port.protocol) {
            return false;
        }
        let wanted = i32::from(self.port.port);
        match &p.port {
            None => true,
            Some(IntOrString::Int(start)) => {
                (*start..=p.end_port.unwrap_or(*start)).contains(&wanted)
            }
            Some(IntOrString::String(name)) => {
                named_port(dst_pod.map(|(_, pod)| pod), name, self.port.protocol) == Some(wanted)
            }
        }
    }
}

/// A rule's peers and ports (empty = any), per direction; none when the policy does
/// not have the policy type (its rules are then ignored, as by the API server).
fn rules_of(
    np: &NetworkPolicy,
    direction: Direction,
) -> Vec<(Vec<NetworkPolicyPeer>, Vec<NetworkPolicyPort>)> {
    let spec = np.spec.clone().unwrap_or_default();
    match direction {
        Direction::Ingress => spec
            .ingress
            .unwrap_or_default()
            .into_iter()
            .map(|r| (r.from.unwrap_or_default(), r.ports.unwrap_or_default()))
            .collect(),
        Direction::Egress => spec
            .egress
            .unwrap_or_default()
            .into_iter()
            .map(|r| (r.to.unwrap_or_default(), r.ports.unwrap_or_default()))
            .collect(),
    }
}

fn protocol_number(name: Option<&str>) -> Option<u8> {
    match name.unwrap_or("TCP") {
        "TCP" => Some(PROTO_TCP),
        "UDP" => Some(PROTO_UDP),
        "SCTP" => Some(PROTO_SCTP),
        _ => None,
    }
}

/// The port a named container port resolves to on `pod`: the first container port with
/// that name and protocol.
fn named_port(pod: Option<&Pod>, name: &str, protocol: u8) -> Option<i32> {
    pod?.spec
        .iter()
        .flat_map(|s| s.containers.iter())
        .flat_map(|c| c.ports.iter().flatten())
        .find(|cp| {
            cp.name.as_deref() == Some(name)
                && protocol_number(cp.protocol.as_deref()) == Some(protocol)
        })
        .map(|cp| cp.container_port)
}

/// A port entry, with what a named port resolves to on the destination.
fn describe_port(p: &NetworkPolicyPort, dst_pod: Option<(&ObjectRef, &Pod)>) -> String {
    let base = text::port(p);
    let Some(IntOrString::String(name)) = &p.port else {
        return base;
    };
    let protocol = protocol_number(p.protocol.as_deref()).unwrap_or(PROTO_TCP);
    match dst_pod {
        None => format!("{base}, a named port, but the destination is not a pod"),
        Some((obj, pod)) => match named_port(Some(pod), name, protocol) {
            Some(n) => format!("{base} = {n} on {obj}"),
            None => format!("{base}, which {obj} does not declare"),
        },
    }
}

fn selector_matches(sel: &LabelSelector, labels: &BTreeMap<String, String>) -> bool {
    let labels_ok = sel
        .match_labels
        .iter()
        .flatten()
        .all(|(k, v)| labels.get(k) == Some(v));
    let expressions_ok = sel.match_expressions.iter().flatten().all(|e| {
        let values = e.values.as_deref().unwrap_or_default();
        let value = labels.get(&e.key);
        match e.operator.as_str() {
            "In" => value.is_some_and(|v| values.contains(v)),
            "NotIn" => !value.is_some_and(|v| values.contains(v)),
            "Exists" => value.is_some(),
            "DoesNotExist" => value.is_none(),
            _ => false,
        }
    });
    labels_ok && expressions_ok
}

impl std::fmt::Display for Explanation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let verdict = if self.allowed { "ALLOWED" } else { "BLOCKED" };
        writeln!(f, "{} -> {} {}: {verdict}", self.src, self.dst, self.port)?;
        if !matches!(self.src, Party::Pod { .. }) {
            writeln!(
                f,
                "  egress: {} is not a pod: no egress policy applies",
                self.src.name()
            )?;
        }
        for hook in &self.hooks {
            write!(f, "{hook}")?;
            if hook.direction == Direction::Egress && !matches!(self.dst, Party::Pod { .. }) {
                writeln!(
                    f,
                    "  ingress: {} is not a pod: no ingress policy applies",
                    self.dst.name()
                )?;
            }
        }
        if self.hooks.is_empty() {
            writeln!(
                f,
                "  ingress: {} is not a pod: no ingress policy applies",
                self.dst.name()
            )?;
        }
        Ok(())
    }
}

impl std::fmt::Display for HookExplanation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let field = self.direction.field();
        let (towards, peer) = match self.direction {
            Direction::Ingress => ("from", self.peer.name()),
            Direction::Egress => ("to", self.peer.name()),
        };
        write!(f, "  {field} of {}: ", self.pod)?;
        match &self.verdict {
            HookVerdict::NotLocal => {
                return writeln!(f, "not on this node: its own node decides → allowed here");
            }
            HookVerdict::NotIsolated => {
                return writeln!(
                    f,
                    "not isolated (no NetworkPolicy with policyTypes {} selects it) → allowed",
                    self.direction
                );
            }
            _ => {}
        }
        let names: Vec<String> = self.isolated_by.iter().map(ToString::to_string).collect();
        writeln!(f, "isolated by NetworkPolicy {}", names.join(", "))?;
        if let Some(identity) = &self.peer_identity {
            writeln!(
                f,
                "    peer {peer} has identity {} = {}",
                identity.id, identity.description
            )?;
        }
        for rule in &self.rules {
            write!(f, "    NetworkPolicy {}", rule.policy)?;
            if let Some(index) = rule.index {
                write!(f, " spec.{field}[{index}]")?;
            }
            match &rule.result {
                RuleResult::Matches => writeln!(f, ": matches")?,
                RuleResult::NoRules => writeln!(f, ": no {field} rules")?,
                RuleResult::NoMatch { mismatches } => {
                    let parts: Vec<String> = mismatches.iter().map(ToString::to_string).collect();
                    writeln!(f, ": {}", parts.join("; "))?;
                }
            }
        }
        let port = self.port;
        match &self.verdict {
            HookVerdict::FromNode => writeln!(
                f,
                "  → allowed: traffic from the pod's own node always passes (kubelet probes)"
            )?,
            HookVerdict::Allowed { rule } => writeln!(f, "  → allowed by {rule}")?,
            HookVerdict::AuditAllowed => writeln!(
                f,
                "  → allowed in audit mode: no rule allows {port} {towards} {peer}"
            )?,
            HookVerdict::Denied => writeln!(
                f,
                "  → dropped: isolated, and no rule allows {port} {towards} {peer}"
            )?,
            HookVerdict::NotLocal | HookVerdict::NotIsolated => {}
        }
        if !self.analysis_agrees {
            writeln!(
                f,
                "  ! the per-rule reasoning above disagrees with the compiled maps; the verdict \
                 is the maps' (please report this)"
            )?;
        }
        Ok(())
    }
}

impl std::fmt::Display for Mismatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let (part, needs) = match self {
            Mismatch::Peer { needs } => ("peer", needs),
            Mismatch::Protocol { needs } => ("protocol", needs),
            Mismatch::Port { needs } => ("port", needs),
        };
        if needs.len() == 1 {
            write!(f, "{part} does not match (needs {})", needs[0])
        } else {
            write!(
                f,
                "{part} does not match (needs one of: {})",
                needs.join("; ")
            )
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::observe::fixtures::{self, STARS};
    use netpol_compile::{Allocations, compile, reference};

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    /// Explains by name, and checks the verdict against the kernel model and the
    /// reference evaluator, and the per-rule reasoning against the maps.
    fn explain_checked(state: &ClusterState, src: &str, dst: &str, port: &str) -> Explanation {
        let compiled = compile(state, &Allocations::default());
        let port: PortProtocol = port.parse().unwrap();
        let mut all = explain_between(state, &compiled, src, dst, port).unwrap();
        assert_eq!(all.len(), 1);
        let e = all.remove(0);
        let (s, d) = (e.src.ip(), e.dst.ip());
        assert_eq!(
            e.allowed,
            model::flow_allowed(&compiled, s, d, port.protocol, port.port),
            "{e}"
        );
        assert_eq!(
            e.allowed,
            reference::flow_allowed(state, s, d, port.protocol, port.port),
            "{e}"
        );
        assert!(e.hooks.iter().all(|h| h.analysis_agrees), "{e}");
        e
    }

    #[test]
    fn blocked_by_isolation_names_the_rule_and_the_peer_it_needs() {
        let e = explain_checked(
            &fixtures::stars_with_policies(),
            "client/client",
            "stars/backend",
            "6379/TCP",
        );
        assert_eq!(
            e.to_string(),
            "\
client/client (10.0.1.1) -> stars/backend (10.0.0.2) TCP/6379: BLOCKED
  egress of client/client: not isolated (no NetworkPolicy with policyTypes Egress selects it) → allowed
  ingress of stars/backend: isolated by NetworkPolicy stars/backend-policy
    peer client/client has identity 17 = matches [pods {} in namespaces {role=client}]
    NetworkPolicy stars/backend-policy spec.ingress[0]: peer does not match (needs pods {role=frontend} in namespace stars)
  → dropped: isolated, and no rule allows TCP/6379 from client/client
"
        );
        assert_eq!(e.hooks[1].verdict, HookVerdict::Denied);
    }

    #[test]
    fn allowed_names_the_allowing_rule() {
        let e = explain_checked(
            &fixtures::stars_with_policies(),
            "client/client",
            "stars/frontend",
            "TCP/80",
        );
        assert!(e.allowed);
        let rule = RuleRef {
            policy: ObjectRef::new("stars", "frontend-policy"),
            direction: Direction::Ingress,
            index: 0,
        };
        assert_eq!(e.hooks[1].verdict, HookVerdict::Allowed { rule });
        let text = e.to_string();
        assert!(text.contains("NetworkPolicy stars/frontend-policy spec.ingress[0]: matches"));
        assert!(
            text.ends_with("  → allowed by NetworkPolicy stars/frontend-policy spec.ingress[0]\n")
        );
    }

    #[test]
    fn blocked_by_port_and_by_protocol() {
        let state = fixtures::stars_with_policies();
        let e = explain_checked(&state, "stars/frontend", "stars/backend", "80");
        assert!(!e.allowed);
        assert_eq!(
            e.hooks[1].rules[0].result,
            RuleResult::NoMatch {
                mismatches: vec![Mismatch::Port {
                    needs: vec!["TCP/6379".into()]
                }]
            }
        );
        let e = explain_checked(&state, "stars/frontend", "stars/backend", "6379/UDP");
        assert!(!e.allowed);
        assert!(
            e.to_string()
                .contains("spec.ingress[0]: protocol does not match (needs TCP/6379)"),
            "{e}"
        );
        // Wrong peer and wrong port: both are named.
        let e = explain_checked(&state, "client/client", "stars/backend", "80");
        assert!(e.to_string().contains(
            "peer does not match (needs pods {role=frontend} in namespace stars); \
             port does not match (needs TCP/6379)"
        ));
    }

    #[test]
    fn node_traffic_always_passes_and_outside_addresses_are_the_world() {
        let state = fixtures::stars_with_policies();
        let e = explain_checked(&state, "node", "stars/backend", "80/TCP");
        assert!(e.allowed);
        assert_eq!(e.src, Party::Node { ip: ip("10.0.9.9") });
        assert_eq!(e.hooks.len(), 1);
        assert_eq!(e.hooks[0].verdict, HookVerdict::FromNode);
        assert_eq!(
            e.to_string(),
            "\
node (10.0.9.9) -> stars/backend (10.0.0.2) TCP/80: ALLOWED
  egress: node 10.0.9.9 is not a pod: no egress policy applies
  ingress of stars/backend: isolated by NetworkPolicy stars/backend-policy
  → allowed: traffic from the pod's own node always passes (kubelet probes)
"
        );

        let e = explain_checked(&state, "203.0.113.7", "stars/frontend", "80/TCP");
        assert!(!e.allowed);
        let hook = &e.hooks[0];
        assert_eq!(
            hook.peer_identity.as_ref().unwrap().id,
            netpol_common::IDENTITY_WORLD
        );
        assert!(
            e.to_string()
                .contains("    peer 203.0.113.7 has identity 1 = the world: matches no peer\n")
        );

        // Towards the outside only the source's egress hook counts.
        let e = explain_checked(&state, "stars/backend", "203.0.113.7", "443");
        assert!(e.allowed);
        assert_eq!(
            e.dst,
            Party::Outside {
                ip: ip("203.0.113.7")
            }
        );
        assert!(e.to_string().contains("ingress: 203.0.113.7 is not a pod"));
    }

    #[test]
    fn deny_policies_egress_ip_blocks_and_named_ports() {
        let mut state = fixtures::state(STARS, &[]);
        fixtures::add(
            &mut state,
            r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: deny-all, namespace: stars}
spec: {podSelector: {}, policyTypes: [Ingress, Egress]}
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: frontend-out, namespace: stars}
spec:
  podSelector: {matchLabels: {role: frontend}}
  policyTypes: [Egress]
  egress:
    - to: [{ipBlock: {cidr: 10.0.0.0/16, except: [10.0.2.0/24]}}]
      ports: [{port: redis}, {port: 9000}]
"#,
        );
        // Named port `redis` resolves on the destination (backend declares 6379).
        let e = explain_checked(&state, "stars/frontend", "stars/backend", "6379");
        assert!(!e.allowed, "backend's ingress is denied by deny-all");
        assert!(e.hooks[0].allowed(), "{e}");
        let text = e.to_string();
        assert!(
            text.contains("→ allowed by NetworkPolicy stars/frontend-out spec.egress[0]"),
            "{text}"
        );
        assert!(
            text.contains("    NetworkPolicy stars/deny-all: no egress rules\n"),
            "{text}"
        );
        assert!(
            text.contains("    NetworkPolicy stars/deny-all: no ingress rules\n"),
            "{text}"
        );

        // 9000 to client: allowed by port number and ipBlock.
        let e = explain_checked(&state, "stars/frontend", "client/client", "9000");
        assert!(e.allowed, "{e}");
        // To management-ui: inside the except.
        let e = explain_checked(
            &state,
            "stars/frontend",
            "management-ui/management-ui",
            "9000",
        );
        assert!(!e.allowed);
        assert!(
            e.to_string()
                .contains("peer does not match (needs ipBlock 10.0.0.0/16 except 10.0.2.0/24)")
        );
        // The named port does not resolve on client (it declares no `redis`).
        let e = explain_checked(&state, "stars/frontend", "client/client", "6379");
        assert!(!e.allowed);
        assert!(
            e.to_string()
                .contains("port does not match (needs one of: TCP/redis, which client/client does not declare; TCP/9000)"),
            "{e}"
        );
    }

    #[test]
    fn every_pair_agrees_with_the_model_and_the_reference() {
        let mut states = vec![
            fixtures::state(STARS, &["10.0.9.9"]),
            fixtures::stars_with_policies(),
        ];
        let mut extra = fixtures::stars_with_policies();
        fixtures::add(
            &mut extra,
            r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: client-out, namespace: client}
spec:
  podSelector: {}
  egress:
    - to: [{namespaceSelector: {matchExpressions: [{key: role, operator: NotIn, values: [management-ui]}]}}]
      ports: [{port: 80}, {port: 6000, endPort: 6400}]
"#,
        );
        states.push(extra);
        let ports = ["80", "6379", "9000", "9001", "53/UDP", "ICMP"];
        let ends = [
            "client/client",
            "management-ui/management-ui",
            "stars/backend",
            "stars/frontend",
            "10.0.9.9",
            "198.51.100.1",
        ];
        for state in &states {
            for src in ends {
                for dst in ends {
                    if src == dst {
                        continue;
                    }
                    for port in ports {
                        explain_checked(state, src, dst, port);
                    }
                }
            }
        }
    }

    #[test]
    fn names_that_do_not_resolve_are_errors() {
        let state = fixtures::stars_with_policies();
        let compiled = compile(&state, &Allocations::default());
        let port = PortProtocol::tcp(80);
        let err = |src: &str, dst: &str| {
            explain_between(&state, &compiled, src, dst, port)
                .unwrap_err()
                .to_string()
        };
        assert!(
            err("stars/nope", "stars/backend").contains("no such pod; known pods: client/client")
        );
        assert!(err("stars", "stars/backend").contains("expected namespace/pod"));
        assert!(err("stars/backend", "stars/backend").contains("loopback"));
        assert!(err("stars/backend", "fd00::1").contains("no address family in common"));
    }

    #[test]
    fn json_is_structured() {
        let e = explain_checked(
            &fixtures::stars_with_policies(),
            "stars/frontend",
            "stars/backend",
            "80",
        );
        let v = serde_json::to_value(&e).unwrap();
        assert_eq!(v["allowed"], false);
        assert_eq!(v["src"]["kind"], "pod");
        assert_eq!(v["src"]["pod"], "stars/frontend");
        assert_eq!(v["port"], "TCP/80");
        let ingress = &v["hooks"][1];
        assert_eq!(ingress["direction"], "Ingress");
        assert_eq!(ingress["verdict"]["verdict"], "denied");
        assert_eq!(ingress["isolated_by"][0], "stars/backend-policy");
        assert_eq!(ingress["rules"][0]["result"]["result"], "no-match");
        assert_eq!(
            ingress["rules"][0]["result"]["mismatches"][0],
            serde_json::json!({"part": "port", "needs": ["TCP/6379"]})
        );
    }
}
