//! The nodes, and hosts (endpoints outside the cluster) as Docker containers on the
//! nodes' network: each with its declared address and routes to the pods and the other
//! hosts, and a route to it on every node.

use std::net::Ipv4Addr;
use std::time::Duration;

use anyhow::{Context, Result};
use serde_json::Value;

use super::command::{docker, exec, strings};
use super::guard::Cleanup;
use super::objects::porter_env;
use super::{AGNHOST, ANNOTATION, REPLY};
use crate::conformance::case::{HostDef, PortDef};

/// A node as the runner needs it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Node {
    pub name: String,
    pub internal_ip: Ipv4Addr,
    pub pod_cidrs: Vec<String>,
    /// No NoSchedule/NoExecute taint: case pods go there.
    pub schedulable: bool,
}

/// The nodes of `kubectl get nodes -o json`.
pub fn parse_nodes(json: &str) -> Result<Vec<Node>> {
    let list: Value = serde_json::from_str(json).context("parsing kubectl get nodes")?;
    let mut nodes = Vec::new();
    for item in list["items"].as_array().context("no items")? {
        let name = item["metadata"]["name"]
            .as_str()
            .context("a node without a name")?
            .to_owned();
        let internal_ip = item["status"]["addresses"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|a| a["type"] == "InternalIP")
            .find_map(|a| a["address"].as_str()?.parse::<Ipv4Addr>().ok())
            .with_context(|| format!("node {name} has no IPv4 InternalIP"))?;
        let mut pod_cidrs: Vec<String> = item["spec"]["podCIDRs"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|c| c.as_str().map(str::to_owned))
            .collect();
        if pod_cidrs.is_empty() {
            pod_cidrs.extend(item["spec"]["podCIDR"].as_str().map(str::to_owned));
        }
        pod_cidrs.retain(|c| !c.contains(':'));
        let schedulable = item["spec"]["unschedulable"] != true
            && !item["spec"]["taints"]
                .as_array()
                .into_iter()
                .flatten()
                .any(|t| t["effect"] == "NoSchedule" || t["effect"] == "NoExecute");
        nodes.push(Node {
            name,
            internal_ip,
            pod_cidrs,
            schedulable,
        });
    }
    Ok(nodes)
}

/// A host of a case: a Docker container on the nodes' network.
#[derive(Clone, Debug)]
pub(super) struct HostContainer {
    /// Its name in the case (`host/<name>` in probes).
    pub(super) name: String,
    pub(super) container: String,
    /// Its declared address.
    pub(super) ip: Ipv4Addr,
    /// Its address on the Docker network, where the nodes route its declared one.
    pub(super) docker_ip: Ipv4Addr,
    pub(super) ports: Vec<PortDef>,
}

/// `docker run` arguments of a host container serving `host`'s ports.
pub fn host_run_args(container: &str, network: &str, case: &str, host: &HostDef) -> Vec<String> {
    let mut args = strings(&[
        "run",
        "--detach",
        "--rm",
        "--name",
        container,
        "--network",
        network,
        "--cap-add",
        "NET_ADMIN",
        "--label",
    ]);
    args.push(format!("{ANNOTATION}={case}"));
    for port in &host.ports {
        args.push("--env".into());
        args.push(format!("{}={REPLY}", porter_env(port)));
    }
    args.push(AGNHOST.into());
    args.push("porter".into());
    args
}

/// Inside the host container: its declared address, and routes to every node's pods
/// and to the other hosts, all with that address as source.
pub fn host_route_commands(
    ip: Ipv4Addr,
    nodes: &[Node],
    others: &[(Ipv4Addr, Ipv4Addr)],
) -> Vec<Vec<String>> {
    let mut commands = vec![strings(&[
        "ip",
        "addr",
        "add",
        &format!("{ip}/32"),
        "dev",
        "lo",
    ])];
    let src = ip.to_string();
    for node in nodes {
        for cidr in &node.pod_cidrs {
            let via = node.internal_ip.to_string();
            commands.push(strings(&[
                "ip", "route", "replace", cidr, "via", &via, "src", &src,
            ]));
        }
    }
    for (other, via) in others {
        let dst = format!("{other}/32");
        let via = via.to_string();
        commands.push(strings(&[
            "ip", "route", "replace", &dst, "via", &via, "src", &src,
        ]));
    }
    commands
}

/// Starts a container for each host of a case on `network`, gives it its address and
/// routes, and routes every node to it; what it starts and routes is recorded in
/// `cleanup` as it goes.
pub(super) fn create_hosts(
    defs: &[HostDef],
    network: &str,
    case: &str,
    nodes: &[Node],
    cleanup: &mut Cleanup<'_>,
) -> Result<Vec<HostContainer>> {
    let mut hosts = Vec::new();
    for host in defs {
        let container = format!("netpol-conformance-{}", host.name);
        let args = host_run_args(&container, network, case, host);
        exec("docker", &args, None, Duration::from_secs(300))?;
        cleanup.containers.push(container.clone());
        let format = format!("{{{{(index .NetworkSettings.Networks \"{network}\").IPAddress}}}}");
        let docker_ip: Ipv4Addr = docker(&["inspect", "-f", &format, &container])?
            .trim()
            .parse()
            .with_context(|| format!("the address of {container} on network {network}"))?;
        hosts.push(HostContainer {
            name: host.name.clone(),
            container,
            ip: host.ip,
            docker_ip,
            ports: host.ports.clone(),
        });
    }
    for host in &hosts {
        let others: Vec<(Ipv4Addr, Ipv4Addr)> = hosts
            .iter()
            .filter(|h| h.name != host.name)
            .map(|h| (h.ip, h.docker_ip))
            .collect();
        for command in host_route_commands(host.ip, nodes, &others) {
            let mut args = strings(&["exec", &host.container]);
            args.extend(command);
            exec("docker", &args, None, Duration::from_secs(60))?;
        }
        for node in nodes {
            let dst = format!("{}/32", host.ip);
            docker(&[
                "exec",
                &node.name,
                "ip",
                "route",
                "replace",
                &dst,
                "via",
                &host.docker_ip.to_string(),
            ])?;
            cleanup.routes.push((node.name.clone(), host.ip));
        }
    }
    Ok(hosts)
}

#[cfg(test)]
mod tests {
    use super::*;

    use super::super::command::command_line;
    use super::super::workspace;
    use crate::conformance::case::{Case, ClusterPlan};

    const NODES: &str = r#"{"items": [
      {"metadata": {"name": "netpol-e2e-control-plane"},
       "spec": {"podCIDR": "10.244.0.0/24", "podCIDRs": ["10.244.0.0/24"],
                "taints": [{"key": "node-role.kubernetes.io/control-plane", "effect": "NoSchedule"}]},
       "status": {"addresses": [{"type": "InternalIP", "address": "172.18.0.3"},
                                {"type": "Hostname", "address": "netpol-e2e-control-plane"}]}},
      {"metadata": {"name": "netpol-e2e-worker"},
       "spec": {"podCIDR": "10.244.1.0/24", "podCIDRs": ["10.244.1.0/24", "fd00:10:244:1::/64"]},
       "status": {"addresses": [{"type": "InternalIP", "address": "fc00:f853:ccd:e793::2"},
                                {"type": "InternalIP", "address": "172.18.0.2"}]}}
    ]}"#;

    #[test]
    fn nodes_from_kubectl() {
        let nodes = parse_nodes(NODES).unwrap();
        assert_eq!(
            nodes,
            [
                Node {
                    name: "netpol-e2e-control-plane".into(),
                    internal_ip: Ipv4Addr::new(172, 18, 0, 3),
                    pod_cidrs: vec!["10.244.0.0/24".into()],
                    schedulable: false,
                },
                Node {
                    name: "netpol-e2e-worker".into(),
                    internal_ip: Ipv4Addr::new(172, 18, 0, 2),
                    pod_cidrs: vec!["10.244.1.0/24".into()],
                    schedulable: true,
                },
            ]
        );
        assert!(
            parse_nodes(r#"{"items": [{"metadata": {"name": "n"}, "spec": {}, "status": {}}]}"#)
                .is_err()
        );
    }

    #[test]
    fn host_containers_and_routes() {
        let case =
            Case::load(&workspace().join("tests/conformance/ipblock-except-edges.yaml")).unwrap();
        let plan = ClusterPlan::of(&case).unwrap();
        let host = &plan.hosts[0];
        let args = host_run_args("netpol-conformance-first", "kind", &case.name, host);
        let line = command_line("docker", &args);
        assert_eq!(
            line,
            format!(
                "docker run --detach --rm --name netpol-conformance-first --network kind --cap-add NET_ADMIN \
                 --label {ANNOTATION}=ipblock-except-edges --env SERVE_PORT_80={REPLY} {AGNHOST} porter"
            )
        );
        let nodes = parse_nodes(NODES).unwrap();
        let other = (Ipv4Addr::new(192, 168, 51, 1), Ipv4Addr::new(172, 18, 0, 9));
        let commands: Vec<String> = host_route_commands(host.ip, &nodes, &[other])
            .iter()
            .map(|c| c.join(" "))
            .collect();
        assert_eq!(
            commands,
            [
                "ip addr add 192.168.50.1/32 dev lo",
                "ip route replace 10.244.0.0/24 via 172.18.0.3 src 192.168.50.1",
                "ip route replace 10.244.1.0/24 via 172.18.0.2 src 192.168.50.1",
                "ip route replace 192.168.51.1/32 via 172.18.0.9 src 192.168.50.1",
            ]
        );
    }
}
