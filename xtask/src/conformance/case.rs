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
    pub default: Verdict,
    #[serde(default)]
    pub blocked: Vec<String>,
    #[serde(default)]
    pub allowed: Vec<String>,
}

impl Case {
    pub fn load(path: &Path) -> Result<Case> {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        let case: Case =
            serde_norway::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
        if case.steps.is_empty() {
            bail!("{}: a case needs at least one step", path.display());
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
}

/// Expands `{{ip NS/POD}}`, `{{ip host/NAME}}` and `{{cidr NS/POD N}}` in every string of
/// `value`.
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
        match words.as_slice() {
            ["ip", endpoint] => out.push_str(&address(endpoint)?.to_string()),
            ["cidr", endpoint, bits] => {
                let bits: u8 = bits
                    .parse()
                    .with_context(|| format!("template in {text:?}: bad prefix length"))?;
                let net = ipnet::Ipv4Net::new(address(endpoint)?, bits)
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

#[cfg(test)]
mod tests {
    use super::*;

    fn expect(default: Verdict, blocked: &[&str], allowed: &[&str]) -> Expect {
        Expect {
            port: 80,
            protocol: Protocol::Tcp,
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
