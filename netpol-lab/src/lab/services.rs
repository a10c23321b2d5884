//! Services of the emulated cluster and kube-proxy's translation of them.
//!
//! Every node gets kube-proxy's rules for every Service, the way its iptables mode
//! writes them (`pkg/proxy/iptables/proxier.go` upstream): `PREROUTING` and `OUTPUT`
//! jump to `KUBE-SERVICES`, which sends each ClusterIP:port to its `KUBE-SVC-*` chain;
//! that marks traffic from outside the pod range for masquerade (`KUBE-MARK-MASQ`,
//! 0x4000) and picks an endpoint at random (`-m statistic --mode random --probability
//! 1/n`, 1/(n-1), ...); each `KUBE-SEP-*` chain marks a pod reaching itself for
//! masquerade (hairpin) and DNATs to the endpoint's address and target port;
//! `KUBE-POSTROUTING` masquerades marked packets (`--random-fully`). A Service port
//! without endpoints is rejected in the filter table, as kube-proxy does. The tables are
//! replaced whole (`iptables-restore`) at every change, IPv4 and IPv6 alike.
//!
//! The rules live in the node's network namespace only.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::Write as _;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::process::{Command, Stdio};

use crate::error::{Context, Result, bail};
use crate::spec::{Labels, Protocol};

/// kube-proxy's masquerade mark.
pub const MASQUERADE_MARK: u32 = 0x4000;

/// The lab's default Service ranges: outside the pod (10.0.0.0/8, fd00::/64-style) and
/// node (172.31.0.0/16, fd31::/16) ranges.
pub const SERVICE_RANGE_V4: (Ipv4Addr, u8) = (Ipv4Addr::new(198, 18, 0, 0), 16);
pub const SERVICE_RANGE_V6: (Ipv6Addr, u8) = (Ipv6Addr::new(0xfd96, 0, 0, 0, 0, 0, 0, 0), 112);

/// The pod range kube-proxy is told (`--cluster-cidr`): traffic to a Service from
/// outside it is masqueraded.
pub const POD_RANGE_V4: &str = "10.0.0.0/8";
pub const POD_RANGE_V6: &str = "fd00::/8";

/// Where a Service port sends its traffic on each endpoint.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TargetPort {
    Number(u16),
    /// A container port name, resolved on each endpoint pod.
    Name(String),
}

/// One port of a Service.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServicePort {
    pub name: Option<String>,
    pub protocol: Protocol,
    pub port: u16,
    pub target: TargetPort,
}

/// What a Service is made of: its pods are the pods of its namespace that carry every
/// label of `selector`, or, for a Service without a selector, the pods listed in
/// `backends` (whose EndpointSlices someone other than the controller writes).
#[derive(Clone, Debug)]
pub struct ServiceSpec {
    pub namespace: String,
    pub name: String,
    pub selector: Labels,
    /// `Some`: no selector; exactly these pods (`namespace/name`), whatever their labels.
    pub backends: Option<Vec<String>>,
    pub ports: Vec<ServicePort>,
}

impl ServiceSpec {
    pub fn new(namespace: impl Into<String>, name: impl Into<String>) -> Self {
        ServiceSpec {
            namespace: namespace.into(),
            name: name.into(),
            selector: Labels::new(),
            backends: None,
            ports: Vec::new(),
        }
    }

    /// A Service without a selector whose endpoints are these pods.
    pub fn backends(mut self, pods: impl IntoIterator<Item = String>) -> Self {
        self.backends = Some(pods.into_iter().collect());
        self
    }

    pub fn select(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.selector.insert(key.into(), value.into());
        self
    }

    pub fn port(mut self, port: ServicePort) -> Self {
        self.ports.push(port);
        self
    }
}

/// A Service of the lab, with its ClusterIPs.
#[derive(Clone, Debug)]
pub struct Service {
    pub spec: ServiceSpec,
    /// `None` in an IPv6-only lab.
    pub ipv4: Option<Ipv4Addr>,
    pub ipv6: Option<Ipv6Addr>,
}

impl Service {
    /// `namespace/name`; probe it as `svc/namespace/name`.
    pub fn id(&self) -> String {
        format!("{}/{}", self.spec.namespace, self.spec.name)
    }
}

/// How kube-proxy writes its rules.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ProxyMode {
    #[default]
    Iptables,
    Nftables,
}

/// One endpoint of one Service port.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Endpoint {
    pub ip: IpAddr,
    pub port: u16,
    /// `namespace/name` of the pod.
    pub pod: String,
}

/// A Service port with its endpoints in one family, as the rules need it.
#[derive(Clone, Debug)]
pub struct Frontend {
    pub service: String,
    pub port: ServicePort,
    pub cluster_ip: IpAddr,
    pub endpoints: Vec<Endpoint>,
}

fn proto(protocol: Protocol) -> &'static str {
    match protocol {
        Protocol::Tcp => "tcp",
        Protocol::Udp => "udp",
        Protocol::Sctp => "sctp",
    }
}

/// A chain name suffix as kube-proxy makes them: a hash of what the chain is for.
fn chain_hash(what: &str) -> String {
    // FNV-1a, 64 bits, printed in base 32 as upstream prints its SHA-256 prefix.
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in what.bytes() {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    const ALPHABET: &[u8; 32] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567";
    (0..16)
        .map(|i| ALPHABET[((hash >> (i * 4)) & 31) as usize] as char)
        .collect()
}

fn host(ip: IpAddr) -> String {
    match ip {
        IpAddr::V4(ip) => format!("{ip}/32"),
        IpAddr::V6(ip) => format!("{ip}/128"),
    }
}

fn socket(ip: IpAddr, port: u16) -> String {
    match ip {
        IpAddr::V4(ip) => format!("{ip}:{port}"),
        IpAddr::V6(ip) => format!("[{ip}]:{port}"),
    }
}

/// kube-proxy's iptables-mode tables (nat and filter) for one family, as
/// `iptables-restore` input.
pub fn iptables_rules(frontends: &[Frontend], ipv6: bool) -> String {
    let pod_range = if ipv6 { POD_RANGE_V6 } else { POD_RANGE_V4 };
    let reject = if ipv6 {
        "icmp6-port-unreachable"
    } else {
        "icmp-port-unreachable"
    };
    let mut chains = vec![
        "KUBE-SERVICES".to_owned(),
        "KUBE-POSTROUTING".to_owned(),
        "KUBE-MARK-MASQ".to_owned(),
    ];
    let mut rules = String::new();
    let mut filter = String::new();
    let mark = format!("{MASQUERADE_MARK:#x}");
    let _ = writeln!(
        rules,
        "-A PREROUTING -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES"
    );
    let _ = writeln!(
        rules,
        "-A OUTPUT -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES"
    );
    let _ = writeln!(
        rules,
        "-A POSTROUTING -m comment --comment \"kubernetes postrouting rules\" -j KUBE-POSTROUTING"
    );
    let _ = writeln!(rules, "-A KUBE-MARK-MASQ -j MARK --set-xmark {mark}/{mark}");
    let _ = writeln!(
        rules,
        "-A KUBE-POSTROUTING -m mark ! --mark {mark}/{mark} -j RETURN"
    );
    let _ = writeln!(rules, "-A KUBE-POSTROUTING -j MARK --set-xmark {mark}/0x0");
    let _ = writeln!(
        rules,
        "-A KUBE-POSTROUTING -m comment --comment \"kubernetes service traffic requiring SNAT\" -j MASQUERADE --random-fully"
    );
    for frontend in frontends.iter().filter(|f| f.cluster_ip.is_ipv6() == ipv6) {
        let p = proto(frontend.port.protocol);
        let port_name = frontend.port.name.as_deref().unwrap_or("");
        let comment = format!("{}:{port_name}", frontend.service);
        let dst = host(frontend.cluster_ip);
        let dport = frontend.port.port;
        if frontend.endpoints.is_empty() {
            let _ = writeln!(
                filter,
                "-A KUBE-SERVICES -d {dst} -p {p} -m comment --comment \"{comment} has no endpoints\" -m {p} --dport {dport} -j REJECT --reject-with {reject}"
            );
            continue;
        }
        let svc = format!(
            "KUBE-SVC-{}",
            chain_hash(&format!("{comment}/{p}/{}", frontend.cluster_ip))
        );
        chains.push(svc.clone());
        let _ = writeln!(
            rules,
            "-A KUBE-SERVICES -d {dst} -p {p} -m comment --comment \"{comment} cluster IP\" -m {p} --dport {dport} -j {svc}"
        );
        let _ = writeln!(
            rules,
            "-A {svc} ! -s {pod_range} -d {dst} -p {p} -m comment --comment \"{comment} cluster IP\" -m {p} --dport {dport} -j KUBE-MARK-MASQ"
        );
        let n = frontend.endpoints.len();
        for (i, endpoint) in frontend.endpoints.iter().enumerate() {
            let target = socket(endpoint.ip, endpoint.port);
            let sep = format!("KUBE-SEP-{}", chain_hash(&format!("{svc}/{target}")));
            chains.push(sep.clone());
            let statistic = if i + 1 < n {
                format!(
                    " -m statistic --mode random --probability {:.10}",
                    1.0 / (n - i) as f64
                )
            } else {
                String::new()
            };
            let _ = writeln!(
                rules,
                "-A {svc} -m comment --comment \"{comment} -> {target}\"{statistic} -j {sep}"
            );
            let _ = writeln!(
                rules,
                "-A {sep} -s {} -m comment --comment \"{comment}\" -j KUBE-MARK-MASQ",
                host(endpoint.ip)
            );
            let _ = writeln!(
                rules,
                "-A {sep} -p {p} -m comment --comment \"{comment}\" -m {p} -j DNAT --to-destination {target}"
            );
        }
    }
    let mut out = String::from("*nat\n");
    for chain in &chains {
        let _ = writeln!(out, ":{chain} - [0:0]");
    }
    out.push_str(&rules);
    out.push_str("COMMIT\n*filter\n:KUBE-SERVICES - [0:0]\n");
    out.push_str("-A FORWARD -m conntrack --ctstate NEW -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n");
    out.push_str("-A OUTPUT -m conntrack --ctstate NEW -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n");
    out.push_str(&filter);
    out.push_str("COMMIT\n");
    out
}

/// kube-proxy's nftables-mode table for one family, as `nft -f` input: a verdict map
/// from destination, protocol and port to each Service port's chain, endpoint choice by
/// `numgen random mod n`, the same masquerade mark and hairpin rule, and a reject for
/// Service ports without endpoints.
pub fn nftables_rules(frontends: &[Frontend], ipv6: bool) -> String {
    let family = if ipv6 { "ip6" } else { "ip" };
    let pod_range = if ipv6 { POD_RANGE_V6 } else { POD_RANGE_V4 };
    let addr = if ipv6 { "ip6" } else { "ip" };
    let mark = format!("{MASQUERADE_MARK:#x}");
    let mut chains = String::new();
    let mut map = Vec::new();
    let mut no_endpoints = Vec::new();
    for frontend in frontends.iter().filter(|f| f.cluster_ip.is_ipv6() == ipv6) {
        let p = proto(frontend.port.protocol);
        let port_name = frontend.port.name.as_deref().unwrap_or("");
        let comment = format!("{}:{port_name}", frontend.service);
        let key = format!("{} . {p} . {}", frontend.cluster_ip, frontend.port.port);
        if frontend.endpoints.is_empty() {
            no_endpoints.push(key);
            continue;
        }
        let svc = format!(
            "service-{}",
            chain_hash(&format!("{comment}/{p}/{}", frontend.cluster_ip))
        );
        let mut picks = Vec::new();
        for (i, endpoint) in frontend.endpoints.iter().enumerate() {
            let target = socket(endpoint.ip, endpoint.port);
            let ep = format!("endpoint-{}", chain_hash(&format!("{svc}/{target}")));
            let _ = writeln!(
                chains,
                "  chain {ep} {{\n    {addr} saddr {} jump mark-for-masquerade\n    meta l4proto {p} dnat to {target}\n  }}",
                endpoint.ip
            );
            picks.push(format!("{i} : goto {ep}"));
        }
        let _ = writeln!(
            chains,
            "  chain {svc} {{\n    {addr} daddr {} {p} dport {} {addr} saddr != {pod_range} jump mark-for-masquerade\n    numgen random mod {} vmap {{ {} }}\n  }}",
            frontend.cluster_ip,
            frontend.port.port,
            frontend.endpoints.len(),
            picks.join(", ")
        );
        map.push(format!("{key} : goto {svc}"));
    }
    let addr_type = if ipv6 { "ipv6_addr" } else { "ipv4_addr" };
    let mut out = format!(
        "table {family} kube-proxy\ndelete table {family} kube-proxy\ntable {family} kube-proxy {{\n"
    );
    let _ = writeln!(
        out,
        "  map service-ips {{\n    type {addr_type} . inet_proto . inet_service : verdict\n{}  }}",
        if map.is_empty() {
            String::new()
        } else {
            format!("    elements = {{ {} }}\n", map.join(", "))
        }
    );
    let _ = writeln!(
        out,
        "  set no-endpoint-services {{\n    type {addr_type} . inet_proto . inet_service\n{}  }}",
        if no_endpoints.is_empty() {
            String::new()
        } else {
            format!("    elements = {{ {} }}\n", no_endpoints.join(", "))
        }
    );
    let _ = writeln!(
        out,
        "  chain mark-for-masquerade {{\n    mark set mark or {mark}\n  }}"
    );
    let _ = writeln!(
        out,
        "  chain masquerading {{\n    mark and {mark} == 0 return\n    mark set mark xor {mark}\n    masquerade fully-random\n  }}"
    );
    let _ = writeln!(
        out,
        "  chain services {{\n    {addr} daddr . meta l4proto . th dport vmap @service-ips\n  }}"
    );
    let _ = writeln!(
        out,
        "  chain nat-prerouting {{\n    type nat hook prerouting priority -100; policy accept;\n    jump services\n  }}"
    );
    let _ = writeln!(
        out,
        "  chain nat-output {{\n    type nat hook output priority -100; policy accept;\n    jump services\n  }}"
    );
    let _ = writeln!(
        out,
        "  chain nat-postrouting {{\n    type nat hook postrouting priority 100; policy accept;\n    jump masquerading\n  }}"
    );
    let _ = writeln!(
        out,
        "  chain filter-forward {{\n    type filter hook forward priority -110; policy accept;\n    ct state new {addr} daddr . meta l4proto . th dport @no-endpoint-services reject\n  }}"
    );
    let _ = writeln!(
        out,
        "  chain filter-output {{\n    type filter hook output priority -110; policy accept;\n    ct state new {addr} daddr . meta l4proto . th dport @no-endpoint-services reject\n  }}"
    );
    out.push_str(&chains);
    out.push_str("}\n");
    out
}

/// Replaces kube-proxy's rules in network namespace `netns` with those for
/// `frontends`, both families.
pub fn apply(netns: &str, mode: ProxyMode, frontends: &[Frontend]) -> Result<()> {
    for ipv6 in [false, true] {
        let (program, args, text): (&str, &[&str], String) = match mode {
            ProxyMode::Iptables => (
                if ipv6 {
                    "ip6tables-restore"
                } else {
                    "iptables-restore"
                },
                &[],
                iptables_rules(frontends, ipv6),
            ),
            ProxyMode::Nftables => ("nft", &["-f", "-"], nftables_rules(frontends, ipv6)),
        };
        let mut child = Command::new("ip")
            .args(["netns", "exec", netns, program])
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("running {program} in {netns}"))?;
        child
            .stdin
            .take()
            .expect("piped")
            .write_all(text.as_bytes())
            .with_context(|| format!("writing to {program}"))?;
        let output = child
            .wait_with_output()
            .with_context(|| format!("waiting for {program}"))?;
        if !output.status.success() {
            bail!(
                "{program} in {netns} failed: {}\n{text}",
                String::from_utf8_lossy(&output.stderr).trim()
            );
        }
    }
    Ok(())
}

/// The endpoints of every Service port, per family, from the pods that match.
pub fn frontends<'a>(
    services: &[Service],
    pods: impl Iterator<Item = &'a crate::lab::Pod> + Clone,
) -> Vec<Frontend> {
    let mut out = Vec::new();
    for service in services {
        let spec = &service.spec;
        for port in &spec.ports {
            let mut by_family: BTreeMap<bool, Vec<Endpoint>> = BTreeMap::new();
            for pod in pods.clone() {
                let picked = match &spec.backends {
                    Some(backends) => backends.contains(&pod.id()),
                    None => {
                        pod.namespace == spec.namespace
                            && spec
                                .selector
                                .iter()
                                .all(|(k, v)| pod.labels.get(k) == Some(v))
                    }
                };
                if !picked {
                    continue;
                }
                let target = match &port.target {
                    TargetPort::Number(n) => Some(*n),
                    TargetPort::Name(name) => pod
                        .ports
                        .iter()
                        .find(|p| p.name.as_deref() == Some(name) && p.protocol == port.protocol)
                        .map(|p| p.port),
                };
                let Some(target) = target else { continue };
                for ip in pod.addresses() {
                    by_family.entry(ip.is_ipv6()).or_default().push(Endpoint {
                        ip,
                        port: target,
                        pod: pod.id(),
                    });
                }
            }
            let cluster_ips = service.ipv4.map(IpAddr::V4).into_iter();
            for cluster_ip in cluster_ips.chain(service.ipv6.map(IpAddr::V6)) {
                let ipv6 = cluster_ip.is_ipv6();
                out.push(Frontend {
                    service: service.id(),
                    port: port.clone(),
                    cluster_ip,
                    endpoints: by_family.remove(&ipv6).unwrap_or_default(),
                });
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frontend(endpoints: usize, protocol: Protocol) -> Frontend {
        Frontend {
            service: "x/db".into(),
            port: ServicePort {
                name: Some("sql".into()),
                protocol,
                port: 15432,
                target: TargetPort::Name("sql".into()),
            },
            cluster_ip: "198.18.0.10".parse().unwrap(),
            endpoints: (0..endpoints)
                .map(|i| Endpoint {
                    ip: format!("10.0.0.{}", i + 1).parse().unwrap(),
                    port: 5432,
                    pod: format!("x/db-{i}"),
                })
                .collect(),
        }
    }

    #[test]
    fn three_endpoints_are_chosen_with_kube_proxys_probabilities() {
        let rules = iptables_rules(&[frontend(3, Protocol::Tcp)], false);
        let probabilities: Vec<&str> = rules
            .lines()
            .filter_map(|l| l.split("--probability ").nth(1))
            .map(|rest| rest.split(' ').next().unwrap())
            .collect();
        assert_eq!(probabilities, ["0.3333333333", "0.5000000000"]);
        assert_eq!(rules.matches("-j DNAT --to-destination 10.0.0.").count(), 3);
        // Hairpin: a pod reaching itself is masqueraded; outsiders too.
        assert!(
            rules.contains("-s 10.0.0.2/32 -m comment --comment \"x/db:sql\" -j KUBE-MARK-MASQ")
        );
        assert!(rules.contains("! -s 10.0.0.0/8 -d 198.18.0.10/32 -p tcp"));
        assert!(rules.contains("-j MASQUERADE --random-fully"));
        assert!(!rules.contains("REJECT"));
    }

    #[test]
    fn a_service_port_without_endpoints_is_rejected_not_translated() {
        let rules = iptables_rules(&[frontend(0, Protocol::Udp)], false);
        assert!(rules.contains(
            "-A KUBE-SERVICES -d 198.18.0.10/32 -p udp -m comment --comment \"x/db:sql has no endpoints\" -m udp --dport 15432 -j REJECT --reject-with icmp-port-unreachable"
        ));
        assert!(!rules.contains("DNAT"));
        let nft = nftables_rules(&[frontend(0, Protocol::Udp)], false);
        assert!(nft.contains("198.18.0.10 . udp . 15432"));
        assert!(!nft.contains("dnat"));
    }

    #[test]
    fn one_endpoint_needs_no_random_choice_and_each_family_gets_its_own_rules() {
        let rules = iptables_rules(&[frontend(1, Protocol::Sctp)], false);
        assert!(!rules.contains("statistic"));
        assert!(rules.contains("-p sctp -m comment --comment \"x/db:sql\" -m sctp -j DNAT --to-destination 10.0.0.1:5432"));
        let v6 = iptables_rules(&[frontend(1, Protocol::Sctp)], true);
        assert!(
            !v6.contains("198.18.0.10"),
            "an IPv4 frontend has no IPv6 rules"
        );
        let nft = nftables_rules(&[frontend(2, Protocol::Tcp)], false);
        assert!(nft.contains("numgen random mod 2 vmap"));
        assert!(nft.contains("ip saddr 10.0.0.1 jump mark-for-masquerade"));
    }
}
