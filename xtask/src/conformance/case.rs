//! The conformance case format (../shared/conformance/FORMAT.md): parsing, the
//! standard cluster, templates, and the expected verdict of every probe pair.
//!
//! Pure data handling: nothing here touches namespaces or the agent.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::path::Path;

use anyhow::{Context, Result, bail};
use serde::Deserialize;

/// One case file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Case {
    pub name: String,
    #[serde(default)]
    pub source: Option<String>,
    #[serde(default)]
    pub cluster: Option<ClusterDef>,
    /// This repository's extension (tests/conformance/README.md): the worlds a case about
    /// address families themselves is written for. Such a case runs only there, writes
    /// each family's addresses itself (`{{ip6 ...}}`, `{{cidr6 ... N}}`) and its objects
    /// are applied exactly as written (no images, no doubling).
    #[serde(default)]
    pub families: Option<Vec<Families>>,
    pub steps: Vec<Step>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterDef {
    #[serde(default)]
    pub namespaces: Option<BTreeMap<String, NamespaceDef>>,
    #[serde(default)]
    pub pods: Option<Vec<PodEntry>>,
    #[serde(default)]
    pub hosts: Vec<HostDef>,
    /// This repository's extension (tests/conformance/README.md): the labels of every
    /// node's Node object, for ClusterNetworkPolicy `nodes` peers.
    #[serde(default)]
    pub node_labels: BTreeMap<String, String>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NamespaceDef {
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
}

/// `x/a` (restricting the standard cluster) or a full pod definition.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum PodEntry {
    Name(String),
    Def(PodDef),
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PodDef {
    pub name: String,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    #[serde(default)]
    pub ports: Vec<PortDef>,
    /// This repository's extension (tests/conformance/README.md): a `hostNetwork` pod,
    /// serving its ports on its node's addresses. Never a probe source.
    #[serde(default, rename = "hostNetwork")]
    pub host_network: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PortDef {
    #[serde(default)]
    pub name: Option<String>,
    pub port: u16,
    #[serde(default)]
    pub protocol: Protocol,
}

impl PortDef {
    /// The port as an entry of a container's `ports`.
    pub fn container_port(&self) -> serde_json::Value {
        let mut port = serde_json::json!({
            "containerPort": self.port,
            "protocol": self.protocol.to_string(),
        });
        if let Some(name) = &self.name {
            port["name"] = serde_json::json!(name);
        }
        port
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HostDef {
    pub name: String,
    pub ip: Ipv4Addr,
    #[serde(default)]
    pub ports: Vec<PortDef>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Deserialize)]
pub enum Protocol {
    #[default]
    #[serde(rename = "TCP")]
    Tcp,
    #[serde(rename = "UDP")]
    Udp,
    #[serde(rename = "SCTP")]
    Sctp,
}

impl std::fmt::Display for Protocol {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Protocol::Tcp => "TCP",
            Protocol::Udp => "UDP",
            Protocol::Sctp => "SCTP",
        })
    }
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Step {
    #[serde(default)]
    pub apply: Vec<serde_json::Value>,
    #[serde(default)]
    pub delete: Vec<String>,
    #[serde(default)]
    pub delete_all_policies: bool,
    #[serde(default)]
    pub pod_labels: BTreeMap<String, BTreeMap<String, String>>,
    #[serde(default)]
    pub namespace_labels: BTreeMap<String, BTreeMap<String, String>>,
    #[serde(default)]
    pub expect: Vec<Expect>,
}

/// `IPv4` or `IPv6`, as an expectation names a family.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub enum IpFamily {
    #[serde(rename = "IPv4")]
    Ipv4,
    #[serde(rename = "IPv6")]
    Ipv6,
}

impl IpFamily {
    pub fn lab(self) -> netpol_lab::Family {
        match self {
            IpFamily::Ipv4 => netpol_lab::Family::V4,
            IpFamily::Ipv6 => netpol_lab::Family::V6,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Verdict {
    Allowed,
    Blocked,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Expect {
    pub port: u16,
    #[serde(default)]
    pub protocol: Protocol,
    /// This repository's extension, for cases with `families`: the expectation holds
    /// for probes of this family only.
    #[serde(default)]
    pub family: Option<IpFamily>,
    pub default: Verdict,
    #[serde(default)]
    pub blocked: Vec<String>,
    #[serde(default)]
    pub allowed: Vec<String>,
}

impl Case {
    /// Whether the case runs in the world of `families`.
    pub fn runs_in(&self, families: Families) -> bool {
        self.families
            .as_ref()
            .is_none_or(|listed| listed.contains(&families))
    }

    /// How a step's objects are applied in the world of `families`: as written for a
    /// case that lists its families, else per FORMAT.md's worlds ([`for_families`]).
    pub fn object_for(&self, object: &serde_json::Value, families: Families) -> serde_json::Value {
        if self.families.is_some() {
            object.clone()
        } else {
            for_families(object, families)
        }
    }

    pub fn load(path: &Path) -> Result<Case> {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        let case: Case =
            serde_norway::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
        if case.steps.is_empty() {
            bail!("{}: a case needs at least one step", path.display());
        }
        let has_families = case.families.as_ref().is_some_and(|f| !f.is_empty());
        if case.families.is_some() && !has_families {
            bail!("{}: `families` lists no world", path.display());
        }
        if !has_families
            && case
                .steps
                .iter()
                .flat_map(|s| &s.expect)
                .any(|e| e.family.is_some())
        {
            bail!(
                "{}: an expectation names a family, so the case must list its `families`",
                path.display()
            );
        }
        for (i, step) in case.steps.iter().enumerate() {
            for expect in &step.expect {
                for pair in expect.blocked.iter().chain(&expect.allowed) {
                    PairPattern::parse(pair)
                        .with_context(|| format!("{}: steps[{i}]", path.display()))?;
                }
            }
        }
        Ok(case)
    }
}

/// A namespace, pod or host of the cluster a case runs on.
#[derive(Debug, Clone)]
pub struct ClusterPlan {
    pub namespaces: BTreeMap<String, BTreeMap<String, String>>,
    pub pods: Vec<PodDef>,
    pub hosts: Vec<HostDef>,
    /// The labels of every node.
    pub node_labels: BTreeMap<String, String>,
}

const STANDARD_NAMESPACES: [&str; 3] = ["x", "y", "z"];
const STANDARD_PODS: [&str; 3] = ["a", "b", "c"];

/// The label every namespace carries.
pub const METADATA_NAME: &str = "kubernetes.io/metadata.name";

fn standard_ports() -> Vec<PortDef> {
    let mut ports = Vec::new();
    for port in [80u16, 81] {
        for (protocol, suffix) in [
            (Protocol::Tcp, "tcp"),
            (Protocol::Udp, "udp"),
            (Protocol::Sctp, "sctp"),
        ] {
            ports.push(PortDef {
                name: Some(format!("serve-{port}-{suffix}")),
                port,
                protocol,
            });
        }
    }
    ports
}

impl ClusterPlan {
    /// The cluster of `case`: the standard one (possibly restricted) or its own.
    pub fn of(case: &Case) -> Result<ClusterPlan> {
        let def = case.cluster.clone().unwrap_or_default();
        let custom = def.namespaces.is_some()
            || def
                .pods
                .as_ref()
                .is_some_and(|pods| pods.iter().any(|p| matches!(p, PodEntry::Def(_))));
        let mut plan = if custom {
            let mut namespaces: BTreeMap<String, BTreeMap<String, String>> = def
                .namespaces
                .unwrap_or_default()
                .into_iter()
                .map(|(name, ns)| (name, ns.labels))
                .collect();
            let mut pods = Vec::new();
            for entry in def.pods.unwrap_or_default() {
                match entry {
                    PodEntry::Def(pod) => {
                        let (ns, _) = split_pod(&pod.name)?;
                        namespaces.entry(ns.to_owned()).or_default();
                        pods.push(pod);
                    }
                    PodEntry::Name(name) => {
                        bail!("pod {name:?}: a custom cluster lists pod definitions")
                    }
                }
            }
            ClusterPlan {
                namespaces,
                pods,
                hosts: def.hosts,
                node_labels: def.node_labels,
            }
        } else {
            let keep: Option<Vec<String>> = def.pods.map(|pods| {
                pods.into_iter()
                    .filter_map(|p| match p {
                        PodEntry::Name(name) => Some(name),
                        PodEntry::Def(_) => None,
                    })
                    .collect()
            });
            let mut namespaces = BTreeMap::new();
            let mut pods = Vec::new();
            for ns in STANDARD_NAMESPACES {
                namespaces.insert(
                    ns.to_owned(),
                    BTreeMap::from([("ns".to_owned(), ns.to_owned())]),
                );
                for pod in STANDARD_PODS {
                    let name = format!("{ns}/{pod}");
                    if keep.as_ref().is_some_and(|keep| !keep.contains(&name)) {
                        continue;
                    }
                    pods.push(PodDef {
                        name,
                        labels: BTreeMap::from([("pod".to_owned(), pod.to_owned())]),
                        ports: standard_ports(),
                        host_network: false,
                    });
                }
            }
            if let Some(keep) = keep {
                for name in keep {
                    if !pods.iter().any(|p| p.name == name) {
                        bail!("pod {name:?} is not one of the standard cluster's pods");
                    }
                }
            }
            ClusterPlan {
                namespaces,
                pods,
                hosts: def.hosts,
                node_labels: def.node_labels,
            }
        };
        for (name, labels) in plan.namespaces.iter_mut() {
            labels.insert(METADATA_NAME.to_owned(), name.clone());
        }
        Ok(plan)
    }
}

/// `ns/pod` -> (`ns`, `pod`).
pub fn split_pod(name: &str) -> Result<(&str, &str)> {
    match name.split_once('/') {
        Some((ns, pod)) if !ns.is_empty() && !pod.is_empty() && !pod.contains('/') => Ok((ns, pod)),
        _ => bail!("{name:?} is not <namespace>/<pod>"),
    }
}

/// An endpoint of a probe: a pod `ns/pod` or a host `host/name`.
pub type EndpointId = String;

/// One side of a pair pattern.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EndpointPattern {
    /// `*`: every pod and host.
    Any,
    /// `ns/*` or `host/*`.
    Group(String),
    /// `ns/pod` or `host/name`.
    Exact(String),
}

impl EndpointPattern {
    fn parse(text: &str) -> Result<Self> {
        let text = text.trim();
        if text == "*" {
            return Ok(EndpointPattern::Any);
        }
        let (group, name) = split_pod(text)?;
        Ok(if name == "*" {
            EndpointPattern::Group(group.to_owned())
        } else {
            EndpointPattern::Exact(text.to_owned())
        })
    }

    fn score(&self) -> u8 {
        match self {
            EndpointPattern::Any => 0,
            EndpointPattern::Group(_) => 1,
            EndpointPattern::Exact(_) => 2,
        }
    }

    fn matches(&self, endpoint: &str) -> bool {
        match self {
            EndpointPattern::Any => true,
            EndpointPattern::Group(group) => {
                endpoint.split_once('/').is_some_and(|(g, _)| g == group)
            }
            EndpointPattern::Exact(exact) => exact == endpoint,
        }
    }
}

/// `SRC -> DST`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PairPattern {
    pub src: EndpointPattern,
    pub dst: EndpointPattern,
}

impl PairPattern {
    pub fn parse(text: &str) -> Result<Self> {
        let (src, dst) = text
            .split_once("->")
            .with_context(|| format!("pair {text:?} has no '->'"))?;
        Ok(PairPattern {
            src: EndpointPattern::parse(src).with_context(|| format!("pair {text:?}"))?,
            dst: EndpointPattern::parse(dst).with_context(|| format!("pair {text:?}"))?,
        })
    }

    fn score(&self) -> u8 {
        self.src.score() + self.dst.score()
    }

    fn matches(&self, src: &str, dst: &str) -> bool {
        self.src.matches(src) && self.dst.matches(dst)
    }
}

impl Expect {
    /// The expected verdict of `src -> dst`: the most specific matching pattern wins,
    /// the later one among equals (`blocked` is read before `allowed`).
    pub fn verdict(&self, src: &str, dst: &str) -> Verdict {
        let mut best: Option<(u8, Verdict)> = None;
        let patterns = self
            .blocked
            .iter()
            .map(|p| (p, Verdict::Blocked))
            .chain(self.allowed.iter().map(|p| (p, Verdict::Allowed)));
        for (text, verdict) in patterns {
            let pattern = PairPattern::parse(text).expect("validated when the case was loaded");
            if pattern.matches(src, dst) {
                let score = pattern.score();
                if best.is_none_or(|(s, _)| score >= s) {
                    best = Some((score, verdict));
                }
            }
        }
        best.map_or(self.default, |(_, verdict)| verdict)
    }
}

/// Address lookups the templates need.
pub trait Addresses {
    fn ipv4_of(&self, endpoint: &str) -> Option<Ipv4Addr>;
    /// The endpoint's own IPv6 address (`{{ip6}}`, `{{cidr6}}`); none by default.
    fn ipv6_of(&self, _endpoint: &str) -> Option<std::net::Ipv6Addr> {
        None
    }
}

/// Expands `{{ip NS/POD}}`, `{{ip host/NAME}}` and `{{cidr NS/POD N}}` in every string of
/// `value`, and the IPv6 forms `{{ip6 ...}}` and `{{cidr6 ... N}}`.
pub fn expand_templates(
    value: &serde_json::Value,
    addresses: &dyn Addresses,
) -> Result<serde_json::Value> {
    use serde_json::Value;
    Ok(match value {
        Value::String(text) => Value::String(expand_string(text, addresses)?),
        Value::Array(items) => Value::Array(
            items
                .iter()
                .map(|v| expand_templates(v, addresses))
                .collect::<Result<_>>()?,
        ),
        Value::Object(fields) => Value::Object(
            fields
                .iter()
                .map(|(k, v)| Ok((k.clone(), expand_templates(v, addresses)?)))
                .collect::<Result<_>>()?,
        ),
        other => other.clone(),
    })
}

fn expand_string(text: &str, addresses: &dyn Addresses) -> Result<String> {
    let mut out = String::new();
    let mut rest = text;
    while let Some(start) = rest.find("{{") {
        out.push_str(&rest[..start]);
        let end = rest[start..]
            .find("}}")
            .with_context(|| format!("unclosed template in {text:?}"))?
            + start;
        let words: Vec<&str> = rest[start + 2..end].split_whitespace().collect();
        let address = |endpoint: &str| {
            addresses
                .ipv4_of(endpoint)
                .with_context(|| format!("template in {text:?}: no endpoint {endpoint:?}"))
        };
        let address6 = |endpoint: &str| {
            addresses.ipv6_of(endpoint).with_context(|| {
                format!("template in {text:?}: no endpoint {endpoint:?} with an IPv6 address")
            })
        };
        let bits = |bits: &str| -> Result<u8> {
            bits.parse()
                .with_context(|| format!("template in {text:?}: bad prefix length"))
        };
        match words.as_slice() {
            ["ip", endpoint] => out.push_str(&address(endpoint)?.to_string()),
            ["cidr", endpoint, n] => {
                let net = ipnet::Ipv4Net::new(address(endpoint)?, bits(n)?)
                    .with_context(|| format!("template in {text:?}: bad prefix length"))?;
                out.push_str(&net.trunc().to_string());
            }
            ["ip6", endpoint] => out.push_str(&address6(endpoint)?.to_string()),
            ["cidr6", endpoint, n] => {
                let net = ipnet::Ipv6Net::new(address6(endpoint)?, bits(n)?)
                    .with_context(|| format!("template in {text:?}: bad prefix length"))?;
                out.push_str(&net.trunc().to_string());
            }
            _ => bail!("unknown template {:?} in {text:?}", &rest[start..end + 2]),
        }
        rest = &rest[end + 2..];
    }
    out.push_str(rest);
    Ok(out)
}

/// The address families a case runs in (FORMAT.md, "Worlds"): `--family`.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum, serde::Serialize, Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum Families {
    /// IPv4 addresses only, as the cases are written.
    #[default]
    Ipv4,
    /// IPv6 addresses only: every IPv4 address a case writes stands for its image.
    Ipv6,
    /// One address of each family per pod and host, ipBlocks doubled, every probe made
    /// over both families.
    Dual,
}

impl Families {
    pub fn stack(self) -> netpol_lab::Stack {
        match self {
            Families::Ipv4 => netpol_lab::Stack::Ipv4,
            Families::Ipv6 => netpol_lab::Stack::Ipv6,
            Families::Dual => netpol_lab::Stack::Dual,
        }
    }
}

impl std::fmt::Display for Families {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Families::Ipv4 => "ipv4",
            Families::Ipv6 => "ipv6",
            Families::Dual => "dual",
        })
    }
}

/// The IPv6 image of an IPv4 prefix written `a.b.c.d/N`: `P:a.b.c.d/(96+N)`, host bits
/// kept as written; `None` for anything else (IPv6 prefixes stay as written).
fn ipv6_image_of_cidr(text: &str) -> Option<String> {
    let (addr, len) = text.split_once('/')?;
    let addr: Ipv4Addr = addr.parse().ok()?;
    let len: u8 = len.parse().ok().filter(|len| *len <= 32)?;
    Some(format!("{}/{}", netpol_lab::ipv6_image(addr), 96 + len))
}

fn is_ipv4_cidr(text: &str) -> bool {
    ipv6_image_of_cidr(text).is_some()
}

/// An object of a step (templates expanded) as the world of `families` applies it:
/// unchanged for IPv4; for IPv6 every IPv4 ipBlock `cidr`/`except` and CNP `networks`
/// entry replaced by its image; for dual stack every IPv4 ipBlock peer followed by its
/// image (each with the `except` entries of its own family) and every `networks` list
/// extended by the images of its IPv4 entries.
pub fn for_families(object: &serde_json::Value, families: Families) -> serde_json::Value {
    use serde_json::Value;
    let mut object = object.clone();
    if families == Families::Ipv4 {
        return object;
    }
    let Some(spec) = object.get_mut("spec") else {
        return object;
    };
    for (rules, peers) in [("ingress", "from"), ("egress", "to")] {
        let Some(Value::Array(rules)) = spec.get_mut(rules) else {
            continue;
        };
        for rule in rules {
            if let Some(Value::Array(list)) = rule.get_mut(peers) {
                *list = list
                    .iter()
                    .flat_map(|peer| peer_for_families(peer, families))
                    .collect();
                for peer in list.iter_mut() {
                    if let Some(Value::Array(networks)) = peer.get_mut("networks") {
                        networks_for_families(networks, families);
                    }
                }
            }
        }
    }
    object
}

/// One NetworkPolicy peer: itself, or its image(s) when it is an IPv4 ipBlock.
fn peer_for_families(peer: &serde_json::Value, families: Families) -> Vec<serde_json::Value> {
    use serde_json::Value;
    let Some(block) = peer.get("ipBlock") else {
        return vec![peer.clone()];
    };
    let Some(cidr) = block
        .get("cidr")
        .and_then(Value::as_str)
        .filter(|c| is_ipv4_cidr(c))
    else {
        return vec![peer.clone()];
    };
    let except: Vec<&str> = match block.get("except") {
        Some(Value::Array(items)) => items.iter().filter_map(Value::as_str).collect(),
        _ => Vec::new(),
    };
    let mut image = peer.clone();
    image["ipBlock"]["cidr"] = Value::from(ipv6_image_of_cidr(cidr).expect("an IPv4 prefix"));
    if block.get("except").is_some() {
        let images: Vec<Value> = except
            .iter()
            .map(|e| Value::from(ipv6_image_of_cidr(e).unwrap_or_else(|| (*e).to_owned())))
            .collect();
        image["ipBlock"]["except"] = Value::Array(images);
    }
    match families {
        Families::Ipv4 => vec![peer.clone()],
        Families::Ipv6 => vec![image],
        Families::Dual => {
            let mut original = peer.clone();
            if block.get("except").is_some() {
                let own: Vec<Value> = except
                    .iter()
                    .filter(|e| is_ipv4_cidr(e))
                    .map(|e| Value::from(*e))
                    .collect();
                original["ipBlock"]["except"] = Value::Array(own);
            }
            vec![original, image]
        }
    }
}

/// A CNP `networks` list in the world of `families` (`::/0` is kept as written).
fn networks_for_families(networks: &mut Vec<serde_json::Value>, families: Families) {
    use serde_json::Value;
    let images: Vec<Value> = networks
        .iter()
        .filter_map(Value::as_str)
        .filter_map(ipv6_image_of_cidr)
        .map(Value::from)
        .collect();
    match families {
        Families::Ipv4 => {}
        Families::Ipv6 => {
            networks.retain(|n| !n.as_str().is_some_and(is_ipv4_cidr));
            networks.extend(images);
        }
        Families::Dual => networks.extend(images),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn expect(default: Verdict, blocked: &[&str], allowed: &[&str]) -> Expect {
        Expect {
            port: 80,
            protocol: Protocol::Tcp,
            family: None,
            default,
            blocked: blocked.iter().map(|s| s.to_string()).collect(),
            allowed: allowed.iter().map(|s| s.to_string()).collect(),
        }
    }

    #[test]
    fn the_most_specific_pattern_wins() {
        let e = expect(Verdict::Allowed, &["* -> x/a"], &["y/* -> x/a"]);
        assert_eq!(e.verdict("y/b", "x/a"), Verdict::Allowed); // 1+2 beats 0+2
        assert_eq!(e.verdict("z/b", "x/a"), Verdict::Blocked);
        assert_eq!(e.verdict("z/b", "x/b"), Verdict::Allowed); // default
        let e = expect(Verdict::Blocked, &["x/a -> x/b"], &["x/* -> x/*"]);
        assert_eq!(e.verdict("x/a", "x/b"), Verdict::Blocked); // 4 beats 2
        assert_eq!(e.verdict("x/c", "x/b"), Verdict::Allowed);
        assert_eq!(e.verdict("y/c", "x/b"), Verdict::Blocked);
    }

    #[test]
    fn among_equals_the_later_wins_and_allowed_comes_after_blocked() {
        let e = expect(Verdict::Blocked, &["x/a -> *"], &["* -> x/b"]);
        // both score 2: "allowed" is read later
        assert_eq!(e.verdict("x/a", "x/b"), Verdict::Allowed);
        let e = expect(Verdict::Allowed, &["x/* -> *", "* -> y/*"], &[]);
        assert_eq!(e.verdict("x/a", "y/b"), Verdict::Blocked);
    }

    #[test]
    fn host_patterns() {
        let e = expect(
            Verdict::Allowed,
            &["* -> default/db"],
            &["host/backup -> default/db", "host/* -> x/a"],
        );
        assert_eq!(e.verdict("host/backup", "default/db"), Verdict::Allowed);
        assert_eq!(e.verdict("host/other", "default/db"), Verdict::Blocked);
        assert!(PairPattern::parse("x/a x/b").is_err());
        assert!(PairPattern::parse("x -> y/a").is_err());
    }

    struct Fixed;
    impl Addresses for Fixed {
        fn ipv4_of(&self, endpoint: &str) -> Option<Ipv4Addr> {
            match endpoint {
                "x/b" => Some(Ipv4Addr::new(10, 1, 2, 3)),
                "host/backup" => Some(Ipv4Addr::new(192, 168, 99, 10)),
                _ => None,
            }
        }
        fn ipv6_of(&self, endpoint: &str) -> Option<std::net::Ipv6Addr> {
            (endpoint == "x/b").then(|| "fd00:4::a01:203".parse().unwrap())
        }
    }

    #[test]
    fn ipv6_templates_give_the_endpoints_own_ipv6_address() {
        assert_eq!(
            expand_string("{{ip6 x/b}}", &Fixed).unwrap(),
            "fd00:4::a01:203"
        );
        assert_eq!(
            expand_string("{{cidr6 x/b 120}}", &Fixed).unwrap(),
            "fd00:4::a01:200/120"
        );
        let error = expand_string("{{ip6 host/backup}}", &Fixed).unwrap_err();
        assert!(format!("{error:#}").contains("with an IPv6 address"));
    }

    #[test]
    fn a_case_naming_families_runs_only_there_and_applies_objects_as_written() {
        let case: Case = serde_norway::from_str(
            "name: t\nfamilies: [dual]\nsteps: [{expect: [{port: 80, family: IPv6, default: allowed}]}]\n",
        )
        .unwrap();
        assert!(case.runs_in(Families::Dual));
        assert!(!case.runs_in(Families::Ipv4) && !case.runs_in(Families::Ipv6));
        let policy = policy_with_ip_block(serde_json::json!({"cidr": "10.0.0.0/8"}));
        assert_eq!(case.object_for(&policy, Families::Dual), policy);
        assert_eq!(case.steps[0].expect[0].family, Some(IpFamily::Ipv6));
    }

    #[test]
    fn an_expectation_naming_a_family_needs_the_case_to_list_its_families() {
        let dir = std::env::temp_dir().join(format!("netpol-case-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("t.yaml");
        std::fs::write(
            &file,
            "name: t\nsteps: [{expect: [{port: 80, family: IPv4, default: allowed}]}]\n",
        )
        .unwrap();
        let error = Case::load(&file).unwrap_err();
        std::fs::remove_dir_all(&dir).unwrap();
        assert!(format!("{error:#}").contains("must list its `families`"));
    }

    #[test]
    fn templates_expand_inside_strings() {
        let value = serde_json::json!({"cidr": "{{cidr x/b 4}}", "except": ["{{ip x/b}}/32"], "h": "{{ip host/backup}}", "n": 3});
        let out = expand_templates(&value, &Fixed).unwrap();
        assert_eq!(
            out,
            serde_json::json!({"cidr": "0.0.0.0/4", "except": ["10.1.2.3/32"], "h": "192.168.99.10", "n": 3})
        );
        let cidr16 = expand_string("{{cidr x/b 16}}", &Fixed).unwrap();
        assert_eq!(cidr16, "10.1.0.0/16");
        assert!(expand_string("{{ip x/zz}}", &Fixed).is_err());
        assert!(expand_string("{{ipv6 x/b}}", &Fixed).is_err());
    }

    fn policy_with_ip_block(block: serde_json::Value) -> serde_json::Value {
        serde_json::json!({
            "kind": "NetworkPolicy",
            "spec": {"podSelector": {}, "egress": [{"to": [{"podSelector": {}}, {"ipBlock": block}]}]},
        })
    }

    #[test]
    fn an_ipv4_world_applies_objects_as_written() {
        let policy = policy_with_ip_block(serde_json::json!({"cidr": "10.0.0.0/8"}));
        assert_eq!(for_families(&policy, Families::Ipv4), policy);
    }

    #[test]
    fn an_ipv6_world_replaces_every_ipv4_prefix_by_its_image_in_the_96() {
        let policy = policy_with_ip_block(
            serde_json::json!({"cidr": "10.0.0.0/8", "except": ["10.0.0.5/32", "10.1.2.3/24"]}),
        );
        let out = for_families(&policy, Families::Ipv6);
        let peers = &out["spec"]["egress"][0]["to"];
        assert_eq!(peers.as_array().unwrap().len(), 2);
        assert_eq!(peers[0], serde_json::json!({"podSelector": {}}));
        assert_eq!(
            peers[1]["ipBlock"],
            // fd00:4::a00:0 is fd00:4::10.0.0.0; host bits stay as written.
            serde_json::json!({"cidr": "fd00:4::a00:0/104", "except": ["fd00:4::a00:5/128", "fd00:4::a01:203/120"]})
        );
    }

    #[test]
    fn a_dual_world_doubles_each_ipv4_peer_with_the_excepts_of_its_own_family() {
        let policy = policy_with_ip_block(
            serde_json::json!({"cidr": "0.0.0.0/0", "except": ["192.168.99.10/32"]}),
        );
        let out = for_families(&policy, Families::Dual);
        let peers = out["spec"]["egress"][0]["to"].as_array().unwrap().clone();
        assert_eq!(peers.len(), 3);
        assert_eq!(
            peers[1]["ipBlock"],
            serde_json::json!({"cidr": "0.0.0.0/0", "except": ["192.168.99.10/32"]})
        );
        assert_eq!(
            peers[2]["ipBlock"],
            serde_json::json!({"cidr": "fd00:4::/96", "except": ["fd00:4::c0a8:630a/128"]})
        );
    }

    #[test]
    fn ipv6_prefixes_a_case_writes_stay_as_written_in_every_world() {
        let policy = policy_with_ip_block(serde_json::json!({"cidr": "::/0"}));
        for families in [Families::Ipv4, Families::Ipv6, Families::Dual] {
            assert_eq!(for_families(&policy, families), policy, "{families}");
        }
    }

    #[test]
    fn cnp_networks_gain_or_become_their_images_and_keep_the_ipv6_default() {
        let cnp = serde_json::json!({
            "kind": "ClusterNetworkPolicy",
            "spec": {"egress": [{"to": [{"networks": ["0.0.0.0/0", "::/0"]}, {"namespaces": {}}]}]},
        });
        let dual = for_families(&cnp, Families::Dual);
        assert_eq!(
            dual["spec"]["egress"][0]["to"][0]["networks"],
            serde_json::json!(["0.0.0.0/0", "::/0", "fd00:4::/96"])
        );
        let v6 = for_families(&cnp, Families::Ipv6);
        assert_eq!(
            v6["spec"]["egress"][0]["to"][0]["networks"],
            serde_json::json!(["::/0", "fd00:4::/96"])
        );
        assert_eq!(
            v6["spec"]["egress"][0]["to"][1],
            serde_json::json!({"namespaces": {}})
        );
    }

    #[test]
    fn standard_cluster_and_restriction() {
        let case: Case =
            serde_norway::from_str("name: t\ncluster: {pods: [x/a, y/b]}\nsteps: [{expect: []}]\n")
                .unwrap();
        let plan = ClusterPlan::of(&case).unwrap();
        assert_eq!(
            plan.pods
                .iter()
                .map(|p| p.name.as_str())
                .collect::<Vec<_>>(),
            ["x/a", "y/b"]
        );
        assert_eq!(plan.namespaces.len(), 3);
        assert_eq!(plan.namespaces["y"][METADATA_NAME], "y");
        assert_eq!(plan.namespaces["y"]["ns"], "y");
        assert_eq!(plan.pods[0].ports.len(), 6);
        assert_eq!(plan.pods[0].labels["pod"], "a");
    }

    #[test]
    fn every_shared_case_parses() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/conformance/cases");
        let Ok(entries) = std::fs::read_dir(&dir) else {
            eprintln!("skipped: no shared cases at {}", dir.display());
            return;
        };
        let mut count = 0;
        for entry in entries {
            let path = entry.unwrap().path();
            let case = Case::load(&path).unwrap();
            assert_eq!(
                Some(case.name.as_str()),
                path.file_stem().and_then(|s| s.to_str())
            );
            ClusterPlan::of(&case).unwrap();
            count += 1;
        }
        assert!(count > 0);
    }
}
