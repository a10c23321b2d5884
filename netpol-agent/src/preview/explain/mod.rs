//! "Which policy dropped my packet?": one flow, explained step by step.
//!
//! A new flow from a pod crosses two hooks at most: the source pod's egress hook and the
//! destination pod's ingress hook. For each, [`explain`] records what the kernel would
//! decide (replayed over the compiled maps by [`model::decide`], so the verdict is the
//! datapath's), and why: whether the pod is isolated and by which policies, which
//! identity the peer has, and for every rule of those policies whether it matches or
//! which part (peer, protocol, port) does not. The per-rule reasoning is evaluated over
//! the Kubernetes objects by the reference evaluator's matchers
//! ([`reference`](netpol_compile::reference)), independently of the maps;
//! [`HookExplanation::analysis_agrees`] says whether it agrees with them (it always
//! should; tests assert it).
//!
//! [`Explanation`] is plain data (no I/O) with a `Display` impl for people and
//! `serde::Serialize` for machines, so a flow log can attach it to observed events.

use std::net::IpAddr;

use k8s_openapi::api::networking::v1::{NetworkPolicyPeer, NetworkPolicyPort};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use netpol_common::Reason;
use netpol_compile::state::PodInfo;
use serde::Serialize;

use super::text::{self, as_display};
use super::{PodAddresses, PortProtocol, PreviewError, SkippedPod, pod_addresses};
use netpol_compile::cnp::reference::{DecidedBy, TieredReference};
use netpol_compile::cnp::{Action, Tier};
use netpol_compile::state::{ClusterState, ObjectRef};
use netpol_compile::{Compiled, Direction, RuleRef, model, reference};

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
    /// When the cluster has staged NetworkPolicies (`netpol.dev/staged`): the same flow
    /// with them enforced, beside the verdict in force.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub staged: Option<Box<StagedExplanation>>,
}

/// The flow as it would be decided once the staged policies are enforced.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct StagedExplanation {
    /// Every staged policy of the cluster.
    #[serde(serialize_with = "text::display_list")]
    pub policies: Vec<ObjectRef>,
    /// The hooks, explained with the staged policies in force.
    pub hooks: Vec<HookExplanation>,
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
    /// The cluster admin's tiers on the way, when the cluster has ClusterNetworkPolicies:
    /// the Admin tier, then (if NetworkPolicy did not decide) the Baseline tier.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub tiers: Vec<TierStep>,
    /// Policies in force that select the pod with this policy type (empty: not
    /// isolated).
    #[serde(serialize_with = "text::display_list")]
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
        !matches!(
            self.verdict,
            HookVerdict::Denied | HookVerdict::ClusterDenied { .. }
        )
    }
}

/// The kernel's decision at one hook.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(tag = "verdict", rename_all = "kebab-case")]
pub enum HookVerdict {
    /// The pod is not on this node: its own node judges this hook.
    NotLocal,
    /// No policy isolates the pod in this direction.
    NotIsolated,
    /// Ingress from the pod's own node: always allowed (kubelet probes).
    FromNode,
    /// The pod reaching itself (through its own Service): never blocked.
    Itself,
    /// Allowed by this rule (the one the POLICY map entry names).
    Allowed {
        #[serde(serialize_with = "as_display")]
        rule: RuleRef,
    },
    /// No rule allows it, but the endpoint is in audit mode.
    AuditAllowed,
    /// Isolated, and no rule allows it: dropped.
    Denied,
    /// A ClusterNetworkPolicy rule accepted it (Admin tier, or Baseline where no
    /// NetworkPolicy isolates the pod).
    ClusterAccepted {
        #[serde(serialize_with = "as_display")]
        rule: RuleRef,
    },
    /// A ClusterNetworkPolicy rule denied it: dropped.
    ClusterDenied {
        #[serde(serialize_with = "as_display")]
        rule: RuleRef,
    },
}

impl HookVerdict {
    /// The verdict the model's `decision` stands for, its rule named from
    /// [`Compiled::rules`].
    pub fn of(compiled: &Compiled, decision: &model::Decision) -> HookVerdict {
        let rule = || compiled.rules.get(&decision.rule).cloned();
        match decision.reason {
            Reason::NotEndpoint => HookVerdict::NotLocal,
            Reason::NotIsolated => HookVerdict::NotIsolated,
            Reason::FromHost => HookVerdict::FromNode,
            Reason::Hairpin => HookVerdict::Itself,
            Reason::AuditAllowed => HookVerdict::AuditAllowed,
            // A POLICY value always names a rule of the table; be explicit anyway.
            Reason::PolicyAllowed => {
                rule().map_or(HookVerdict::Denied, |rule| HookVerdict::Allowed { rule })
            }
            Reason::ClusterAccepted => rule().map_or(HookVerdict::Denied, |rule| {
                HookVerdict::ClusterAccepted { rule }
            }),
            Reason::ClusterDenied => rule().map_or(HookVerdict::Denied, |rule| {
                HookVerdict::ClusterDenied { rule }
            }),
            _ => HookVerdict::Denied,
        }
    }
}

/// What one tier of ClusterNetworkPolicy made of the flow at a hook.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "step", rename_all = "kebab-case")]
pub enum TierStep {
    /// No rule of the tier's policies selecting the pod matches: on to the next step.
    NoMatch {
        #[serde(serialize_with = "as_display")]
        tier: Tier,
    },
    /// A Pass rule matched first: the rest of the tier is skipped.
    Passed {
        #[serde(serialize_with = "as_display")]
        tier: Tier,
        rule: String,
    },
    /// An Accept or Deny rule matched first.
    Decided {
        #[serde(serialize_with = "as_display")]
        tier: Tier,
        #[serde(serialize_with = "as_display")]
        action: Action,
        rule: String,
    },
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
    /// The policy isolates without rules in this direction (a "deny" policy, or one
    /// whose rules cannot be read).
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
    pub fn resolve(&self, text: &str) -> Result<Vec<Party>, PreviewError> {
        let fail = |reason: String| PreviewError::Endpoint {
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
        // A live cluster has thousands of pods: the namespace's, and only a few.
        let in_namespace: Vec<String> = self
            .pods
            .iter()
            .filter(|p| p.pod.namespace == namespace)
            .map(|p| p.pod.to_string())
            .collect();
        let (what, known) = if in_namespace.is_empty() {
            let all = self.pods.iter().map(|p| p.pod.to_string()).collect();
            ("known pods", all)
        } else {
            ("pods of the namespace", in_namespace)
        };
        Err(fail(format!("no such pod; {what}: {}", few(&known))))
    }
}

/// At most [`LISTED`] names, then how many more.
fn few(names: &[String]) -> String {
    match names.len() {
        0 => "none".to_owned(),
        n if n <= LISTED => names.join(", "),
        n => format!("{}, and {} more", names[..LISTED].join(", "), n - LISTED),
    }
}

/// Names listed in a message.
const LISTED: usize = 10;

/// `end` (an end of `explain`) with a bare pod name put in `namespace`, as kubectl's `-n`
/// does: `a` is `namespace/a`, `svc/web` is `svc/namespace/web`; addresses, `node` and
/// names with their namespace stay as they are.
pub fn in_namespace(end: &str, namespace: &str) -> String {
    if end == "node" || end.parse::<IpAddr>().is_ok() {
        return end.to_owned();
    }
    match end.strip_prefix("svc/") {
        Some(name) if !name.contains('/') => format!("svc/{namespace}/{name}"),
        Some(_) => end.to_owned(),
        None if end.contains('/') => end.to_owned(),
        None => format!("{namespace}/{end}"),
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
) -> Result<Vec<Explanation>, PreviewError> {
    let resolver = Resolver::new(state);
    let sources = resolver.resolve(src)?;
    let destinations = resolver.resolve(dst)?;
    if let (Some(a), Some(b)) = (sources[0].pod(), destinations[0].pod())
        && a == b
    {
        return Err(PreviewError::Endpoint {
            input: dst.to_string(),
            reason: "a pod reaching itself stays inside it (loopback): never filtered".into(),
        });
    }
    let staged = staged_view(state);
    let mut out = Vec::new();
    for s in &sources {
        for d in &destinations {
            if s.ip().is_ipv4() == d.ip().is_ipv4() {
                out.push(explain_parties(
                    state,
                    compiled,
                    staged.as_ref(),
                    s.clone(),
                    d.clone(),
                    port,
                ));
            }
        }
    }
    if out.is_empty() {
        return Err(PreviewError::Endpoint {
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
        staged_view(state).as_ref(),
        resolver.party(src),
        resolver.party(dst),
        port,
    )
}

/// The state with its staged policies enforced, and its compile: computed once per
/// question, shared by every flow it explains.
pub(super) type StagedView = (ClusterState, Compiled);

fn explain_parties(
    state: &ClusterState,
    compiled: &Compiled,
    staged: Option<&StagedView>,
    src: Party,
    dst: Party,
    port: PortProtocol,
) -> Explanation {
    let hooks = explain_hooks(state, compiled, &src, &dst, port);
    let allowed = hooks.iter().all(HookExplanation::allowed);
    let staged = staged.map(|(view, compiled)| {
        let hooks = explain_hooks(view, compiled, &src, &dst, port);
        Box::new(StagedExplanation {
            policies: view.staged_policies().cloned().collect(),
            allowed: hooks.iter().all(HookExplanation::allowed),
            hooks,
        })
    });
    Explanation {
        src,
        dst,
        port,
        hooks,
        allowed,
        staged,
    }
}

/// The hooks the flow crosses, in packet order, each explained over `compiled`.
fn explain_hooks(
    state: &ClusterState,
    compiled: &Compiled,
    src: &Party,
    dst: &Party,
    port: PortProtocol,
) -> Vec<HookExplanation> {
    let analysis = Analysis::new(state, src, dst, port);
    let mut hooks = Vec::new();
    if let Party::Pod { pod, .. } = src {
        hooks.push(analysis.hook(compiled, Direction::Egress, pod, dst));
    }
    if let Party::Pod { pod, .. } = dst {
        hooks.push(analysis.hook(compiled, Direction::Ingress, pod, src));
    }
    hooks
}

/// `state` with its staged policies enforced, compiled; `None` without staged policies.
pub(super) fn staged_view(state: &ClusterState) -> Option<StagedView> {
    if state.enforce_staged || state.staged_policies().next().is_none() {
        return None;
    }
    let view = ClusterState {
        enforce_staged: true,
        ..state.clone()
    };
    let compiled = netpol_compile::compile(&view, &Default::default());
    Some((view, compiled))
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

    fn pod_of(&self, party: &Party) -> Option<(&'a ObjectRef, &'a PodInfo)> {
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
        let verdict = HookVerdict::of(compiled, &decision);
        let (local, _) = direction.ends(self.src.ip(), self.dst.ip());
        let flags = compiled
            .endpoints
            .get(&netpol_compile::addr(local))
            .map_or(0, |e| e.flags);
        let (tiers, tiers_agree) = self.tier_steps(direction, flags, &verdict);
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
        let analysis_agrees = tiers_agree
            && match &verdict {
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
            tiers,
            isolated_by,
            peer_identity,
            rules,
            analysis_agrees,
        }
    }

    /// The tiers' steps, walked by the tiered reference over the objects, and whether
    /// they agree with the maps' verdict (a ClusterNetworkPolicy verdict names the rule
    /// the reference decided with; any other, no tier decided). None for an endpoint
    /// (`flags`) with no tier entries in this direction: no ClusterNetworkPolicy has a
    /// rule for it there, and the steps would only say so.
    fn tier_steps(
        &self,
        direction: Direction,
        flags: u32,
        verdict: &HookVerdict,
    ) -> (Vec<TierStep>, bool) {
        if !netpol_common::tiered(flags, direction.as_u8())
            || matches!(verdict, HookVerdict::NotLocal)
        {
            let agrees = !matches!(
                verdict,
                HookVerdict::ClusterAccepted { .. } | HookVerdict::ClusterDenied { .. }
            );
            return (Vec::new(), agrees);
        }
        let reference = TieredReference::new(self.state);
        let port = self.port;
        let want = reference.evaluate(
            self.src.ip(),
            self.dst.ip(),
            port.protocol,
            port.port,
            direction,
        );
        if matches!(want.decided_by, DecidedBy::Itself | DecidedBy::NotEndpoint) {
            return (Vec::new(), true);
        }
        let step = |tier: Tier| {
            if let Some(rule) = want.passed.iter().find(|r| r.tier == tier) {
                return TierStep::Passed {
                    tier,
                    rule: rule.to_string(),
                };
            }
            match &want.decided_by {
                DecidedBy::Cnp { rule, action } if rule.tier == tier => TierStep::Decided {
                    tier,
                    action: *action,
                    rule: rule.to_string(),
                },
                _ => TierStep::NoMatch { tier },
            }
        };
        let mut steps = vec![step(Tier::Admin)];
        let admin_decided = matches!(steps[0], TierStep::Decided { .. });
        let networkpolicy_decided = matches!(want.decided_by, DecidedBy::NetworkPolicy(_));
        if !admin_decided && !networkpolicy_decided {
            steps.push(step(Tier::Baseline));
        }
        let agrees = match (verdict, &want.decided_by) {
            (
                HookVerdict::ClusterAccepted { rule } | HookVerdict::ClusterDenied { rule },
                DecidedBy::Cnp { rule: want, action },
            ) => {
                want.names(rule)
                    && (*action == Action::Deny)
                        == matches!(verdict, HookVerdict::ClusterDenied { .. })
            }
            (HookVerdict::ClusterAccepted { .. } | HookVerdict::ClusterDenied { .. }, _) => false,
            (_, DecidedBy::Cnp { .. }) => false,
            _ => true,
        };
        (steps, agrees)
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
            // As far as the rules can be read: what cannot be read allows nothing.
            let rules = reference::readable_rules(obj, &np.object(), direction);
            if rules.is_empty() {
                out.push(RuleCheck {
                    policy: obj.clone(),
                    index: None,
                    result: RuleResult::NoRules,
                });
            }
            for rule in rules {
                let result =
                    self.check_rule(&obj.namespace, &rule.peers, &rule.ports, direction, peer);
                out.push(RuleCheck {
                    policy: obj.clone(),
                    index: Some(rule.index),
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
            && !peers.iter().any(|p| {
                reference::peer_matches(self.state, policy_namespace, p, peer.ip(), remote_pod)
            })
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
        let PortProtocol { protocol, port } = self.port;
        let dst = dst_pod.map(|(_, pod)| pod);
        if !ports.is_empty()
            && !ports
                .iter()
                .any(|p| reference::port_matches(p, protocol, port, dst))
        {
            let same_protocol: Vec<&NetworkPolicyPort> = ports
                .iter()
                .filter(|p| reference::protocol_of(p.protocol.as_deref()) == protocol)
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
}

/// A port entry, with what a named port resolves to on the destination.
fn describe_port(p: &NetworkPolicyPort, dst_pod: Option<(&ObjectRef, &PodInfo)>) -> String {
    let base = text::port(p);
    let Some(IntOrString::String(name)) = &p.port else {
        return base;
    };
    let protocol = reference::protocol_of(p.protocol.as_deref());
    match dst_pod {
        None => format!("{base}, a named port, but the destination is not a pod"),
        Some((obj, pod)) => match reference::named_port(pod, name, protocol) {
            Some(n) => format!("{base} = {n} on {obj}"),
            None => format!("{base}, which {obj} does not declare"),
        },
    }
}

mod display;
mod service;

pub use service::{BackendExplanation, ServiceExplanation, explain_service};
#[cfg(test)]
mod tests;
