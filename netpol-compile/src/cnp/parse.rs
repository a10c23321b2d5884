//! Validation and normalisation of one ClusterNetworkPolicy (see the parent module).
//!
//! The object is read from its JSON form, as the source has it, so that unknown fields
//! are seen and named. A `null` counts as absent (the API server prunes it).

use std::str::FromStr;

use ipnet::IpNet;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use netpol_common::{PROTO_SCTP, PROTO_TCP, PROTO_UDP};
use serde_json::{Map, Value};

use super::{API_VERSION, Action, CnpPeer, CnpProtocol, CnpRule, KIND, ParsedCnp, Pods, Tier};
use crate::policy::{FieldError, is_valid_port_name};
use crate::selector::Selector;

/// Most rules per direction, peers per rule, protocols per rule and networks per peer.
const MAX_ITEMS: usize = 25;
/// Longest rule name.
const MAX_RULE_NAME: usize = 100;
/// Longest `networks` entry (the CRD's `maxLength`).
const MAX_CIDR_LEN: usize = 43;
/// Highest priority number.
const MAX_PRIORITY: i64 = 1000;

/// What can be read of a ClusterNetworkPolicy, and what cannot.
///
/// The rule (docs/SECURITY.md): what cannot be read never allows anything and never
/// denies less. A rule that cannot be read in full becomes a Deny of every peer and
/// protocol at its place (whatever its action was: leaving out a Deny or a Pass, or a
/// peer of one, would let through what the admin meant to stop); requirements of the
/// subject that cannot be read are left out (they are ANDed, so at least the pods meant
/// stay selected); an unreadable tier is Admin and an unreadable priority 0 (first).
#[derive(Clone, Debug)]
// Until the compiler gains the tiers, only validation and the tests read `parsed`.
#[cfg_attr(not(test), allow(dead_code))]
pub(crate) struct Reading {
    /// `None` when the object has no name: nothing can refer to it.
    pub parsed: Option<ParsedCnp>,
    /// Every field that cannot be read.
    pub errors: Vec<FieldError>,
}

/// Reads `object`, a whole ClusterNetworkPolicy.
pub(crate) fn read_cnp(object: &Value) -> Reading {
    let mut r = Reader::default();
    let top = r.object(
        object,
        "",
        &["apiVersion", "kind", "metadata", "spec", "status"],
    );
    let top = top.unwrap_or(&EMPTY);
    for (field, want) in [("apiVersion", API_VERSION), ("kind", KIND)] {
        if let Some(v) = get(top, field)
            && v.as_str() != Some(want)
        {
            r.error(field, format!("must be {want:?}"));
        }
    }
    let name = read_name(&mut r, get(top, "metadata"));
    let spec = match get(top, "spec") {
        Some(spec) => r
            .object(
                spec,
                "spec",
                &["tier", "priority", "subject", "ingress", "egress"],
            )
            .unwrap_or(&EMPTY),
        None => {
            r.error("spec", "is required");
            &EMPTY
        }
    };
    let tier = match get(spec, "tier").map(Value::as_str) {
        Some(Some("Admin")) => Tier::Admin,
        Some(Some("Baseline")) => Tier::Baseline,
        None => {
            r.error("spec.tier", "is required");
            Tier::Admin
        }
        Some(_) => {
            r.error("spec.tier", "must be \"Admin\" or \"Baseline\"");
            Tier::Admin
        }
    };
    let priority = match get(spec, "priority").map(Value::as_i64) {
        Some(Some(p)) if (0..=MAX_PRIORITY).contains(&p) => p as u16,
        None => {
            r.error("spec.priority", "is required");
            0
        }
        Some(_) => {
            r.error(
                "spec.priority",
                format!("must be an integer from 0 to {MAX_PRIORITY}"),
            );
            0
        }
    };
    let subject = match get(spec, "subject") {
        Some(subject) => r.subject(subject, "spec.subject"),
        None => {
            r.error("spec.subject", "is required");
            Pods::everything()
        }
    };
    let ingress = r.rules(get(spec, "ingress"), "spec.ingress", Side::Ingress);
    let egress = r.rules(get(spec, "egress"), "spec.egress", Side::Egress);
    Reading {
        parsed: name.map(|name| ParsedCnp {
            name,
            tier,
            priority,
            subject,
            ingress,
            egress,
        }),
        errors: r.errors,
    }
}

static EMPTY: std::sync::LazyLock<Map<String, Value>> = std::sync::LazyLock::new(Map::new);

/// `map[key]`, a `null` being absent.
fn get<'a>(map: &'a Map<String, Value>, key: &str) -> Option<&'a Value> {
    map.get(key).filter(|v| !v.is_null())
}

fn read_name(r: &mut Reader, metadata: Option<&Value>) -> Option<String> {
    let Some(Value::Object(metadata)) = metadata else {
        r.error("metadata.name", "is required");
        return None;
    };
    match get(metadata, "name").map(Value::as_str) {
        Some(Some(name)) if is_dns_subdomain(name) => Some(name.to_owned()),
        Some(Some(name)) if !name.is_empty() => {
            r.error(
                "metadata.name",
                "must be a DNS subdomain: at most 253 lowercase alphanumeric characters, '-' \
                 or '.', starting and ending with an alphanumeric character",
            );
            // Still a name the API server stored under: enforce what it says.
            Some(name.to_owned())
        }
        _ => {
            r.error("metadata.name", "is required");
            None
        }
    }
}

fn is_dns_subdomain(name: &str) -> bool {
    name.len() <= 253
        && name.split('.').all(|label| {
            let b = label.as_bytes();
            !b.is_empty()
                && b.iter()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
                && b[0] != b'-'
                && b[b.len() - 1] != b'-'
        })
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Side {
    Ingress,
    Egress,
}

#[derive(Default)]
struct Reader {
    errors: Vec<FieldError>,
}

impl Reader {
    fn error(&mut self, field: impl Into<String>, message: impl Into<String>) {
        self.errors.push(FieldError::new(field, message));
    }

    /// `value` as an object whose fields are all in `known`.
    fn object<'a>(
        &mut self,
        value: &'a Value,
        path: &str,
        known: &[&str],
    ) -> Option<&'a Map<String, Value>> {
        let Value::Object(map) = value else {
            self.error(path, "must be an object");
            return None;
        };
        for key in map.keys() {
            if !known.contains(&key.as_str()) {
                self.error(join(path, key), "unknown field");
            }
        }
        Some(map)
    }

    /// `value` as a list of 1..=`MAX_ITEMS` entries (`min` 0 allows an empty one).
    fn list<'a>(&mut self, value: &'a Value, path: &str, min: usize) -> &'a [Value] {
        let Value::Array(items) = value else {
            self.error(path, "must be a list");
            return &[];
        };
        if items.len() < min {
            self.error(path, format!("must have at least {min} item"));
        }
        if items.len() > MAX_ITEMS {
            self.error(path, format!("must have at most {MAX_ITEMS} items"));
        }
        items
    }

    /// Exactly one of `fields` set in `map`: its name and value.
    fn one_of<'a>(
        &mut self,
        map: &'a Map<String, Value>,
        path: &str,
        fields: &[&'static str],
    ) -> Option<(&'static str, &'a Value)> {
        let set: Vec<(&'static str, &Value)> = fields
            .iter()
            .filter_map(|f| get(map, f).map(|v| (*f, v)))
            .collect();
        match set.as_slice() {
            [one] => Some(*one),
            [] => {
                self.error(
                    path,
                    format!("must set exactly one of {}", fields.join(", ")),
                );
                None
            }
            more => {
                let names: Vec<&str> = more.iter().map(|(f, _)| *f).collect();
                self.error(
                    path,
                    format!(
                        "must set exactly one of {}, not {}",
                        fields.join(", "),
                        names.join(" and ")
                    ),
                );
                None
            }
        }
    }

    /// A LabelSelector; what cannot be read of it is left out (see [`Selector::read`]).
    fn selector(&mut self, value: &Value, path: &str) -> Selector {
        let Some(map) = self.object(value, path, &["matchLabels", "matchExpressions"]) else {
            return Selector::default();
        };
        if let Some(exprs) = get(map, "matchExpressions") {
            let exprs_path = join(path, "matchExpressions");
            if let Value::Array(exprs) = exprs {
                for (i, e) in exprs.iter().enumerate() {
                    self.object(
                        e,
                        &format!("{exprs_path}[{i}]"),
                        &["key", "operator", "values"],
                    );
                }
            }
        }
        match serde_json::from_value::<LabelSelector>(value.clone()) {
            Ok(selector) => {
                let (selector, errors) = Selector::read(&selector);
                for (field, message) in errors {
                    self.error(join(path, &field), message);
                }
                selector
            }
            Err(e) => {
                self.error(path, format!("is not a label selector: {e}"));
                Selector::default()
            }
        }
    }

    /// `pods: {namespaceSelector, podSelector}`.
    fn namespaced_pods(&mut self, value: &Value, path: &str) -> Pods {
        let Some(map) = self.object(value, path, &["namespaceSelector", "podSelector"]) else {
            return Pods::everything();
        };
        let namespaces = match get(map, "namespaceSelector") {
            Some(v) => self.selector(v, &join(path, "namespaceSelector")),
            None => Selector::default(),
        };
        let pods = match get(map, "podSelector") {
            Some(v) => self.selector(v, &join(path, "podSelector")),
            None => {
                self.error(join(path, "podSelector"), "is required");
                Selector::default()
            }
        };
        Pods {
            namespaces,
            pods: Some(pods),
        }
    }

    fn subject(&mut self, value: &Value, path: &str) -> Pods {
        let Some(map) = self.object(value, path, &["namespaces", "pods"]) else {
            return Pods::everything();
        };
        match self.one_of(map, path, &["namespaces", "pods"]) {
            Some(("namespaces", v)) => Pods {
                namespaces: self.selector(v, &join(path, "namespaces")),
                pods: None,
            },
            Some((_, v)) => self.namespaced_pods(v, &join(path, "pods")),
            None => Pods::everything(),
        }
    }

    fn rules(&mut self, value: Option<&Value>, path: &str, side: Side) -> Vec<CnpRule> {
        let Some(value) = value else {
            return Vec::new();
        };
        let items = self.list(value, path, 0);
        items
            .iter()
            .enumerate()
            .map(|(index, item)| {
                let before = self.errors.len();
                let rule = self.rule(item, &format!("{path}[{index}]"), index, side);
                if self.errors.len() == before {
                    rule
                } else {
                    // Fail closed: the rule denies everything at its place.
                    CnpRule {
                        index,
                        name: rule.name,
                        action: Action::Deny,
                        peers: None,
                        protocols: None,
                    }
                }
            })
            .collect()
    }

    fn rule(&mut self, value: &Value, path: &str, index: usize, side: Side) -> CnpRule {
        let peers_field = match side {
            Side::Ingress => "from",
            Side::Egress => "to",
        };
        let map = self
            .object(value, path, &["name", "action", peers_field, "protocols"])
            .unwrap_or(&EMPTY);
        let name = match get(map, "name") {
            Some(Value::String(name)) => {
                if name.chars().count() > MAX_RULE_NAME {
                    self.error(
                        join(path, "name"),
                        format!("must be at most {MAX_RULE_NAME} characters"),
                    );
                }
                Some(name.clone())
            }
            Some(_) => {
                self.error(join(path, "name"), "must be a string");
                None
            }
            None => None,
        };
        let action = match get(map, "action").map(Value::as_str) {
            Some(Some("Accept")) => Action::Accept,
            Some(Some("Deny")) => Action::Deny,
            Some(Some("Pass")) => Action::Pass,
            None => {
                self.error(join(path, "action"), "is required");
                Action::Deny
            }
            Some(_) => {
                self.error(
                    join(path, "action"),
                    "must be \"Accept\", \"Deny\" or \"Pass\"",
                );
                Action::Deny
            }
        };
        let peers_path = join(path, peers_field);
        let peers: Vec<CnpPeer> = match get(map, peers_field) {
            Some(v) => {
                let items = self.list(v, &peers_path, 1);
                items
                    .iter()
                    .enumerate()
                    .filter_map(|(i, p)| self.peer(p, &format!("{peers_path}[{i}]"), side))
                    .collect()
            }
            None => {
                self.error(&peers_path, "is required");
                Vec::new()
            }
        };
        let protocols = get(map, "protocols").map(|v| {
            let protocols_path = join(path, "protocols");
            let items = self.list(v, &protocols_path, 1);
            items
                .iter()
                .enumerate()
                .filter_map(|(i, p)| self.protocol(p, &format!("{protocols_path}[{i}]")))
                .collect::<Vec<_>>()
        });
        let named = protocols
            .iter()
            .flatten()
            .any(|p| matches!(p, CnpProtocol::Named(_)));
        if named
            && peers
                .iter()
                .any(|p| matches!(p, CnpPeer::Networks(_) | CnpPeer::Nodes(_)))
        {
            self.error(
                join(path, "protocols"),
                "a destinationNamedPort cannot be used with networks or nodes peers: they \
                 have no named ports",
            );
        }
        CnpRule {
            index,
            name,
            action,
            peers: Some(peers),
            protocols,
        }
    }

    fn peer(&mut self, value: &Value, path: &str, side: Side) -> Option<CnpPeer> {
        let fields: &[&'static str] = match side {
            Side::Ingress => &["namespaces", "pods"],
            Side::Egress => &["namespaces", "pods", "networks", "nodes", "domainNames"],
        };
        let map = self.object(value, path, fields)?;
        let (field, v) = self.one_of(map, path, fields)?;
        let field_path = join(path, field);
        match field {
            "namespaces" => Some(CnpPeer::Pods(Pods {
                namespaces: self.selector(v, &field_path),
                pods: None,
            })),
            "pods" => Some(CnpPeer::Pods(self.namespaced_pods(v, &field_path))),
            "networks" => self.networks(v, &field_path).map(CnpPeer::Networks),
            "nodes" => Some(CnpPeer::Nodes(self.selector(v, &field_path))),
            _ => {
                self.error(
                    field_path,
                    "domainNames peers are not supported by netpol (they need DNS \
                     interception); the rule denies everything instead",
                );
                None
            }
        }
    }

    fn networks(&mut self, value: &Value, path: &str) -> Option<Vec<IpNet>> {
        let items = self.list(value, path, 1);
        let mut out: Vec<IpNet> = Vec::new();
        let mut written: Vec<&str> = Vec::new();
        for (i, item) in items.iter().enumerate() {
            let entry_path = format!("{path}[{i}]");
            let Some(text) = item.as_str() else {
                self.error(entry_path, "must be a string");
                continue;
            };
            if text.len() > MAX_CIDR_LEN {
                self.error(
                    &entry_path,
                    format!("must be at most {MAX_CIDR_LEN} characters"),
                );
            }
            if written.contains(&text) {
                self.error(&entry_path, format!("duplicate value {text:?}"));
                continue;
            }
            written.push(text);
            match parse_prefix(text) {
                Some(net) => out.push(net),
                None => self.error(entry_path, format!("invalid CIDR {text:?}")),
            }
        }
        Some(out)
    }

    fn protocol(&mut self, value: &Value, path: &str) -> Option<CnpProtocol> {
        const FIELDS: &[&str] = &["tcp", "udp", "sctp", "destinationNamedPort"];
        let map = self.object(value, path, FIELDS)?;
        let (field, v) = self.one_of(map, path, FIELDS)?;
        let field_path = join(path, field);
        let protocol = match field {
            "tcp" => PROTO_TCP,
            "udp" => PROTO_UDP,
            "sctp" => PROTO_SCTP,
            _ => {
                return match v.as_str() {
                    Some(name) if is_valid_port_name(name) => {
                        Some(CnpProtocol::Named(name.to_owned()))
                    }
                    _ => {
                        self.error(
                            field_path,
                            format!("invalid port name {v}: must be an IANA_SVC_NAME"),
                        );
                        None
                    }
                };
            }
        };
        let map = self.object(v, &field_path, &["destinationPort"])?;
        let Some(port) = get(map, "destinationPort") else {
            self.error(join(&field_path, "destinationPort"), "is required");
            return None;
        };
        let port_path = join(&field_path, "destinationPort");
        let port_map = self.object(port, &port_path, &["number", "range"])?;
        let (kind, v) = self.one_of(port_map, &port_path, &["number", "range"])?;
        let (first, last) = if kind == "number" {
            let n = self.port_number(v, &join(&port_path, "number"))?;
            (n, n)
        } else {
            let range_path = join(&port_path, "range");
            let range = self.object(v, &range_path, &["start", "end"])?;
            let mut end = |field: &str| match get(range, field) {
                Some(v) => self.port_number(v, &join(&range_path, field)),
                None => {
                    self.error(join(&range_path, field), "is required");
                    None
                }
            };
            let (start, stop) = (end("start"), end("end"));
            let (start, stop) = (start?, stop?);
            if start >= stop {
                self.error(range_path, "start port must be less than end port");
                return None;
            }
            (start, stop)
        };
        Some(CnpProtocol::Ports {
            protocol,
            first,
            last,
        })
    }

    fn port_number(&mut self, value: &Value, path: &str) -> Option<u16> {
        match value.as_i64() {
            Some(n) if (1..=65535).contains(&n) => Some(n as u16),
            _ => {
                self.error(path, "must be an integer from 1 to 65535");
                None
            }
        }
    }
}

/// `a.b`, or `b` at the root.
fn join(path: &str, field: &str) -> String {
    if path.is_empty() {
        field.to_owned()
    } else {
        format!("{path}.{field}")
    }
}

/// A CIDR as CEL's `isCIDR` accepts it (Go's `netip.ParsePrefix`: no leading zeros in
/// IPv4 octets or in the length, no zone), with host bits masked, as the API's
/// `networks` are matched. An IPv4-mapped IPv6 prefix stays IPv6 (netip compares the two
/// families apart), so it matches no IPv4 address.
pub(crate) fn parse_prefix(text: &str) -> Option<IpNet> {
    let (address, length) = text.split_once('/')?;
    if length.is_empty()
        || !length.bytes().all(|b| b.is_ascii_digit())
        || (length.len() > 1 && length.starts_with('0'))
        || address.contains('%')
        || leading_zero_octet(address)
    {
        return None;
    }
    IpNet::from_str(text).ok().map(|net| net.trunc())
}

/// Whether the dotted IPv4 part of `address` (all of it, or the tail of an IPv6
/// address) has an octet written with a leading zero, which netip refuses.
fn leading_zero_octet(address: &str) -> bool {
    let dotted = address.rsplit(':').next().unwrap_or(address);
    dotted.contains('.')
        && dotted
            .split('.')
            .any(|octet| octet.len() > 1 && octet.starts_with('0'))
}

impl Pods {
    /// Every pod of every namespace.
    pub(crate) fn everything() -> Pods {
        Pods {
            namespaces: Selector::default(),
            pods: None,
        }
    }
}
