//! The conformance cases against the reference evaluators, without a kernel: every
//! case of ../shared/conformance (`cases/` and `cnp/`) and of tests/conformance, step by
//! step, every probe pair of every expectation, in the IPv4 world. The reference with
//! tiers (`netpol_compile::cnp::reference`) and the NetworkPolicy reference under it are
//! written apart from the compiler; here they meet the expectations the cases were
//! written with (upstream's, for the `cnp-*` cases), so an error in either shows before
//! the compiler is compared with them.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use netpol_compile::cnp::reference::TieredReference;
use netpol_compile::state::{ClusterState, NodePeer, ObjectRef};
use serde_json::{Value, json};

use super::case::{
    Addresses, Case, ClusterPlan, PortDef, Protocol, Verdict, expand_templates, split_pod,
};

/// Addresses of a case's pods (10.0.0.1 upwards, in plan order; a `hostNetwork` pod
/// has the address of its node, one node per such pod, as the runner places them),
/// hosts (their own) and nodes.
struct Plan {
    plan: ClusterPlan,
    pods: BTreeMap<String, Ipv4Addr>,
    /// Node names and addresses: at least one, one per `hostNetwork` pod.
    nodes: Vec<(String, Ipv4Addr)>,
}

impl Plan {
    fn of(case: &Case) -> Result<Plan> {
        let plan = ClusterPlan::of(case)?;
        let host_network = plan.pods.iter().filter(|p| p.host_network).count();
        let nodes: Vec<(String, Ipv4Addr)> = (0..host_network.max(1))
            .map(|n| (netpol_lab::Lab::node_name(n), netpol_lab::Lab::node_ipv4(n)))
            .collect();
        let mut next_node = nodes.iter().map(|(_, ip)| *ip);
        let pods = plan
            .pods
            .iter()
            .enumerate()
            .map(|(i, pod)| {
                let ip = if pod.host_network {
                    next_node.next().expect("one node per hostNetwork pod")
                } else {
                    Ipv4Addr::from(0x0a00_0000 | (i as u32 + 1))
                };
                (pod.name.clone(), ip)
            })
            .collect();
        Ok(Plan { plan, pods, nodes })
    }

    /// Every probe endpoint (pods, then hosts) with its address and whether it is a
    /// probe source (not a `hostNetwork` pod).
    fn endpoints(&self) -> Vec<(String, Ipv4Addr, bool)> {
        let pods = self.plan.pods.iter().map(|p| {
            let ip = self.pods[&p.name];
            (p.name.clone(), ip, !p.host_network)
        });
        let hosts = self
            .plan
            .hosts
            .iter()
            .map(|h| (format!("host/{}", h.name), h.ip, true));
        pods.chain(hosts).collect()
    }

    /// Whether `endpoint` serves `port`/`protocol`.
    fn serves(&self, endpoint: &str, port: u16, protocol: Protocol) -> bool {
        let ports = match endpoint.strip_prefix("host/") {
            Some(name) => self
                .plan
                .hosts
                .iter()
                .find(|h| h.name == name)
                .map(|h| &h.ports),
            None => self
                .plan
                .pods
                .iter()
                .find(|p| p.name == endpoint)
                .map(|p| &p.ports),
        };
        ports
            .into_iter()
            .flatten()
            .any(|p| p.port == port && p.protocol == protocol)
    }
}

impl Addresses for Plan {
    fn ipv4_of(&self, endpoint: &str) -> Option<Ipv4Addr> {
        match endpoint.strip_prefix("host/") {
            Some(name) => self
                .plan
                .hosts
                .iter()
                .find(|h| h.name == name)
                .map(|h| h.ip),
            None => self.pods.get(endpoint).copied(),
        }
    }
}

fn protocol_number(protocol: Protocol) -> u8 {
    match protocol {
        Protocol::Tcp => netpol_common::PROTO_TCP,
        Protocol::Udp => netpol_common::PROTO_UDP,
        Protocol::Sctp => netpol_common::PROTO_SCTP,
    }
}

/// The cluster state of `plan` with the labels of the moment.
fn state(
    plan: &Plan,
    namespaces: &BTreeMap<String, BTreeMap<String, String>>,
    pod_labels: &BTreeMap<String, BTreeMap<String, String>>,
) -> Result<ClusterState> {
    let mut state = ClusterState::default();
    for (name, ip) in &plan.nodes {
        let peer = NodePeer {
            labels: plan.plan.node_labels.clone(),
            ips: vec![IpAddr::V4(*ip)],
        };
        state.nodes.insert(name.clone(), peer);
    }
    for (name, labels) in namespaces {
        let ns = json!({"metadata": {"name": name, "labels": labels}});
        let ns: k8s_openapi::api::core::v1::Namespace = serde_json::from_value(ns)?;
        state.namespaces.insert(name.clone(), ns.into());
    }
    for pod in &plan.plan.pods {
        let (ns, name) = split_pod(&pod.name)?;
        let ip = plan.pods[&pod.name].to_string();
        let ports: Vec<Value> = pod.ports.iter().map(PortDef::container_port).collect();
        let object = json!({
            "metadata": {"namespace": ns, "name": name, "labels": pod_labels[&pod.name]},
            "spec": {"containers": [{"name": "main", "ports": ports}], "hostNetwork": pod.host_network},
            "status": {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}]},
        });
        state
            .pods
            .insert(ObjectRef::new(ns, name), serde_json::from_value(object)?);
    }
    Ok(state)
}

/// Runs one case through the references: the probes compared, and every disagreement,
/// described.
fn check_case(path: &Path) -> Result<(usize, Vec<String>)> {
    let case = Case::load(path)?;
    if case.families.is_some() {
        // Written for other worlds, with their own addresses.
        return Ok((0, Vec::new()));
    }
    let plan = Plan::of(&case)?;
    let mut namespaces = plan.plan.namespaces.clone();
    let mut pod_labels: BTreeMap<String, BTreeMap<String, String>> = plan
        .plan
        .pods
        .iter()
        .map(|p| (p.name.clone(), p.labels.clone()))
        .collect();
    let mut policies: BTreeMap<(String, String), Value> = BTreeMap::new();
    let mut cluster_policies: BTreeMap<String, Value> = BTreeMap::new();
    let mut disagreements = Vec::new();
    let mut probes = 0;
    for (s, step) in case.steps.iter().enumerate() {
        for object in &step.apply {
            let object = expand_templates(object, &plan)?;
            let name = object["metadata"]["name"]
                .as_str()
                .unwrap_or_default()
                .to_owned();
            match object["kind"].as_str() {
                Some("ClusterNetworkPolicy") => {
                    // A case applies only what the API server accepts.
                    if let Err(errors) = netpol_compile::cnp::validate_cnp(&object) {
                        let errors: Vec<String> = errors.iter().map(|e| e.to_string()).collect();
                        bail!(
                            "steps[{s}]: ClusterNetworkPolicy {name}: {}",
                            errors.join("; ")
                        );
                    }
                    cluster_policies.insert(name, object);
                }
                Some("NetworkPolicy") => {
                    let ns = object["metadata"]["namespace"]
                        .as_str()
                        .unwrap_or("default")
                        .to_owned();
                    policies.insert((ns, name), object);
                }
                other => bail!("steps[{s}]: cannot apply a {other:?}"),
            }
        }
        for name in &step.delete {
            match name.strip_prefix("ClusterNetworkPolicy/") {
                Some(cnp) => {
                    cluster_policies.remove(cnp);
                }
                None => {
                    let (ns, policy) = split_pod(name)?;
                    policies.remove(&(ns.to_owned(), policy.to_owned()));
                }
            }
        }
        if step.delete_all_policies {
            policies.clear();
            cluster_policies.clear();
        }
        for (pod, labels) in &step.pod_labels {
            pod_labels.insert(pod.clone(), labels.clone());
        }
        for (ns, labels) in &step.namespace_labels {
            let mut labels = labels.clone();
            labels.insert(super::case::METADATA_NAME.to_owned(), ns.clone());
            namespaces.insert(ns.clone(), labels);
        }
        let mut state = state(&plan, &namespaces, &pod_labels)?;
        for ((ns, name), object) in &policies {
            let policy: k8s_openapi::api::networking::v1::NetworkPolicy =
                serde_json::from_value(object.clone())
                    .with_context(|| format!("steps[{s}]: NetworkPolicy {ns}/{name}"))?;
            state
                .policies
                .insert(ObjectRef::new(ns, name), policy.into());
        }
        state.cluster_policies = cluster_policies.clone();
        let reference = TieredReference::new(&state);
        let endpoints = plan.endpoints();
        for expect in &step.expect {
            let protocol = protocol_number(expect.protocol);
            for (src, src_ip, _) in endpoints.iter().filter(|e| e.2) {
                for (dst, dst_ip, _) in &endpoints {
                    if src == dst || !plan.serves(dst, expect.port, expect.protocol) {
                        continue;
                    }
                    probes += 1;
                    let want = expect.verdict(src, dst);
                    let got = reference.flow_allowed(
                        IpAddr::V4(*src_ip),
                        IpAddr::V4(*dst_ip),
                        protocol,
                        expect.port,
                    );
                    if got != (want == Verdict::Allowed) {
                        disagreements.push(format!(
                            "{}: steps[{s}] {src} -> {dst} {}/{}: expected {want:?}, the \
                             reference says {}",
                            case.name,
                            expect.protocol,
                            expect.port,
                            if got { "allowed" } else { "blocked" }
                        ));
                    }
                }
            }
        }
    }
    Ok((probes, disagreements))
}

/// Every case file of `dir`, sorted.
fn cases_in(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .flatten()
                .map(|e| e.path())
                .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
                .collect()
        })
        .unwrap_or_default();
    files.sort();
    files
}

#[test]
fn the_references_agree_with_every_case_in_the_ipv4_world() {
    let root = crate::cargo::workspace_root();
    let shared = root.join("../shared/conformance");
    let dirs = super::default_case_dirs(root);
    let files: Vec<PathBuf> = dirs.iter().flat_map(|d| cases_in(d)).collect();
    assert!(
        files.iter().any(|f| f.starts_with(shared.join("cnp"))),
        "no ClusterNetworkPolicy cases found under {}",
        shared.display()
    );
    let mut disagreements = Vec::new();
    let mut probes = 0;
    for file in &files {
        match check_case(file) {
            Ok((compared, found)) => {
                probes += compared;
                disagreements.extend(found);
            }
            Err(error) => disagreements.push(format!("{}: {error:#}", file.display())),
        }
    }
    eprintln!("{probes} probes of {} case files compared", files.len());
    assert!(probes > 1_000, "too few probes compared: {probes}");
    assert!(
        disagreements.is_empty(),
        "{} disagreements in {} case files:\n{}",
        disagreements.len(),
        files.len(),
        disagreements.join("\n")
    );
}
