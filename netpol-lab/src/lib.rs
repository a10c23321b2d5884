//! Emulated clusters made of network namespaces, for demos, tier-3 tests, the
//! conformance runner and benchmarks, and ([`apiserver`]) a Kubernetes API server double
//! that feeds an agent in Kubernetes mode over the real list/watch protocol.
//!
//! ```text
//!                        node netns  np<pid>-<lab>-node      (node 0, "lab-node")
//!   pod netns            (forwarding on; node address 172.31.255.1 on lo)
//!   np<pid>-<lab>-p<i>
//!   eth0 10.0.0.i/32 ──veth── v<i>   proxy_arp (no delay), fe80::1/64,
//!                                    route 10.0.0.i/32 dev v<i>
//!   default via 169.254.1.1 onlink
//!   default via fe80::1
//!
//!   host netns           (an endpoint outside the cluster: no programs, no manifest)
//!   np<pid>-<lab>-h<i>
//!   eth0 <ip>/32 ──────veth── x<i>
//!
//!                                    ul1  172.31.254.1/30, fd31:ff:0::1/64
//!                                     │   route <node 1's pods, hosts, node address>
//!                                     │         via 172.31.254.2 src 172.31.255.1
//!                                   veth (underlay)
//!                                     │
//!                        node netns  ul0  172.31.254.2/30, fd31:ff:0::2/64
//!                        np<pid>-<lab>-node1                 (node 1, "lab-node-1")
//!                        (node address 172.31.255.2 on lo; its own pods v<i>, hosts x<i>)
//! ```
//!
//! Pods are routed Calico-style: a /32 (and /128) on the pod's `eth0`, a default route to
//! the link-local gateway 169.254.1.1 answered by proxy ARP on the host veth (and to
//! `fe80::1` for IPv6), and a host route per pod in the node namespace. The agent runs
//! in the node namespace and attaches to the host veths. A bridged node
//! ([`Lab::set_bridged`]) is a bridge-CNI node instead (the bridge plugin, flannel): its
//! pods' veths are ports of the Linux bridge [`BRIDGE`] (10.0.0.254/24, fd10::fe/64, the
//! pods' gateways), pods have addresses in those subnets and no route of their own. Pod
//! objects name no interface (tests may add annotations with [`Lab::set_pod_annotation`]).
//!
//! [`Lab::with_nodes`] makes several nodes (one agent each, see
//! [`AgentProcess::start_on`]): node `n` has its own namespace, name ([`Lab::node_name`])
//! and addresses, and every pair of nodes is joined by an underlay veth `ul<m>` (named
//! after the node at the other end: never the agents' pod prefix `v`) with a /30 and a
//! /64, plus a route on every other node for each pod, host and node address (no
//! encapsulation, no NAT: a pod's packets reach a remote pod with its own source address).
//! [`PodSpec::on_node`] and [`Lab::add_host_on`] place endpoints; the default is node 0,
//! so [`Lab::new`] is the single-node lab. Probe endpoint `node` is node 0 and `node<n>`
//! node `n`; a node's traffic is host traffic (always allowed) only towards its own pods,
//! and a peer like any outside address elsewhere, as in Kubernetes.
//!
//! Every pod and host serves its declared ports from this process (TCP: accept and send
//! one greeting byte; UDP: echo), and [`Lab::probe`] / [`Lab::probe_all`] send real
//! traffic between them. Nothing ever touches the root network namespace, and
//! everything is removed when the [`Lab`] is dropped, panics included. Leftovers of
//! crashed runs are swept by the next [`Lab::new`]. An [`AgentProcess`] must be dropped
//! before its lab: declare it after the lab.
//!
//! Typical use:
//!
//! ```no_run
//! use std::time::Duration;
//! use netpol_lab::{AgentProcess, Lab, ManifestDir, PodSpec, Port, Probe};
//! # fn main() -> netpol_lab::Result<()> {
//! let mut lab = Lab::new()?;
//! lab.set_namespace_labels("x", [("team", "a")]);
//! lab.add_pod(PodSpec::new("x", "a").label("pod", "a").port(Port::tcp(80)))?;
//! lab.add_pod(PodSpec::new("x", "b").label("pod", "b").port(Port::tcp(80)))?;
//! let mut manifests = ManifestDir::create(lab.workdir().join("manifests"))?;
//! let generation = manifests.write(&lab, "")?;
//! let mut agent = AgentProcess::start(&lab, "target/release/netpol-agent".as_ref(), &manifests)?;
//! agent.wait_generation(generation, Duration::from_secs(10))?;
//! let result = lab.probe(&Probe::tcp("x/a", "x/b", 80), Duration::from_secs(1))?;
//! assert!(result.outcome.is_allowed());
//! # Ok(()) }
//! ```

mod agent;
pub mod apiserver;
pub mod dns;
mod error;
mod lab;
mod manifest;
pub mod netns;
mod probe;
mod sctp;
mod serve;
mod spec;
mod wire;

pub use agent::{AgentProcess, AgentStatus};
pub use error::{Error, Result};
pub use lab::services::{ProxyMode, Service, ServicePort, ServiceSpec, TargetPort};
pub use lab::{BRIDGE, BRIDGE_IPV4, BRIDGE_IPV6, Host, Lab, Node, Pod};
pub use manifest::{HOST_INTERFACE_ANNOTATION, ManifestDir, cluster_objects, service_objects};
pub use netns::NetnsWorker;
pub use probe::{Probe, ProbeResult};
pub use spec::{
    Family, GATEWAY_IPV4, GATEWAY_IPV6, IPV6_IMAGE_PREFIX, Labels, MAX_NODES, NODE, NODE_IPV4,
    NODE_IPV6, NODE_NAME, PodSpec, Port, Protocol, Stack, ipv6_image,
};
pub use wire::Outcome;

/// Environment variable through which tests find the agent binary.
pub const AGENT_BIN_ENV: &str = "NETPOL_AGENT_BIN";
