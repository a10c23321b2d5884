//! Answers to "what does the policy do?" without a cluster and without the kernel.
//!
//! Everything here reads a [`ClusterState`] and its [`Compiled`](netpol_compile::Compiled)
//! form, the very maps the datapath would write, and never performs I/O except
//! [`load`], which reads manifests the way local mode does, and [`cluster`], which lists
//! a cluster's objects (for [`plugin`], the commands of `kubectl netpol`):
//!
//! - [`explain`]: one flow, step by step: which hooks it crosses, whether each pod is
//!   isolated and by which policies, the peer's identity, and per rule why it matches
//!   or not. The verdict is the kernel's decision replayed by
//!   [`compile::model`](netpol_compile::model); the per-rule reasoning is an
//!   independent evaluation over the objects that must agree with it.
//! - [`matrix`]: the reachability matrix of every pod pair for each served port, and
//!   the cells a set of new or replaced NetworkPolicies would change.
//!
//! The state comes from a manifest directory ([`load`]) or, for the `kubectl netpol`
//! plugin, from one list of each kind a live API server serves ([`cluster`], read-only).
//!
//! The types are plain data with `Display` (for people) and `serde::Serialize` (for
//! `--json`), so callers such as the command line or a flow log stay thin.

pub mod cluster;
pub mod explain;
#[cfg(test)]
mod fixtures;
pub mod flows;
pub mod kernel;
pub mod load;
pub mod matrix;
pub mod plugin;
pub mod selector;
pub mod terminal;
mod text;

use std::net::IpAddr;
use std::path::PathBuf;
use std::str::FromStr;

use netpol_common::{PROTO_ICMP, PROTO_ICMPV6, PROTO_SCTP, PROTO_TCP, PROTO_UDP};
use netpol_compile::state::PodInfo;
use serde::Serialize;

use netpol_compile::protocol_name;
use netpol_compile::state::{ClusterState, ObjectRef};

/// What can go wrong while observing.
#[derive(Debug, thiserror::Error)]
pub enum PreviewError {
    #[error("cannot read {}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "invalid port {0:?}: expected PORT/PROTOCOL (80/TCP, 53/UDP, 3868/SCTP), a bare port \
         (TCP), or ICMP"
    )]
    Port(String),
    #[error("{input:?}: {reason}")]
    Endpoint { input: String, reason: String },
    #[error(
        "label selector {input:?}: {}{reason}",
        if term == input { String::new() } else { format!("{term:?}: ") }
    )]
    Selector {
        input: String,
        /// The requirement at fault.
        term: String,
        reason: String,
    },
    #[error("kubeconfig{}: {source}", path.as_ref().map(|p| format!(" {}", p.display())).unwrap_or_default())]
    Kubeconfig {
        /// The file named on the command line; `None`: `KUBECONFIG` or `~/.kube/config`.
        path: Option<PathBuf>,
        #[source]
        source: kube::config::KubeconfigError,
    },
    #[error(
        "no Kubernetes configuration: no kubeconfig ({kubeconfig}) and not in a cluster \
         ({in_cluster})"
    )]
    NoConfig {
        kubeconfig: kube::config::KubeconfigError,
        in_cluster: kube::config::InClusterError,
    },
    // The client's errors are written out whole, their causes included, and not chained
    // again as sources (a cause would be printed twice).
    #[error("Kubernetes client: {}", kube_error(.0))]
    Client(kube::Error),
    #[error("listing {resource}: {}", kube_error(error))]
    List {
        /// The API resource, e.g. `pods`.
        resource: &'static str,
        error: kube::Error,
    },
}

/// A kube-rs error for people: the API server's answer as `Forbidden (HTTP 403):
/// message`, anything else with its chain of causes, each once.
fn kube_error(error: &kube::Error) -> String {
    if let kube::Error::Api(status) = error {
        return format!(
            "{} (HTTP {}): {}",
            status.reason, status.code, status.message
        );
    }
    let mut out = error.to_string();
    let mut cause = std::error::Error::source(error);
    while let Some(next) = cause {
        let text = next.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        cause = next.source();
    }
    out
}

/// A destination port and protocol, e.g. `TCP/80`. ICMP and ICMPv6 have port 0.
///
/// Ordered by port, then protocol number (so `TCP/53` comes before `UDP/53`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PortProtocol {
    pub port: u16,
    /// IP protocol number (`PROTO_TCP`, `PROTO_UDP`, ...).
    pub protocol: u8,
}

impl PortProtocol {
    pub fn tcp(port: u16) -> Self {
        PortProtocol {
            port,
            protocol: PROTO_TCP,
        }
    }

    pub fn udp(port: u16) -> Self {
        PortProtocol {
            port,
            protocol: PROTO_UDP,
        }
    }
}

impl std::fmt::Display for PortProtocol {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.protocol {
            PROTO_ICMP => f.write_str("ICMP"),
            PROTO_ICMPV6 => f.write_str("ICMPv6"),
            p => write!(f, "{}/{}", protocol_name(p), self.port),
        }
    }
}

impl Serialize for PortProtocol {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

/// Accepts `80/TCP`, `TCP/80`, `80` (TCP), any case, and `ICMP`/`ICMPv6`.
impl FromStr for PortProtocol {
    type Err = PreviewError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let bad = || PreviewError::Port(text.to_string());
        let protocol_of = |name: &str| match name.to_ascii_uppercase().as_str() {
            "TCP" => Some(PROTO_TCP),
            "UDP" => Some(PROTO_UDP),
            "SCTP" => Some(PROTO_SCTP),
            _ => None,
        };
        let port_of = |s: &str| s.parse::<u16>().ok().filter(|p| *p != 0);
        let trimmed = text.trim();
        match trimmed.to_ascii_uppercase().as_str() {
            "ICMP" => {
                return Ok(PortProtocol {
                    port: 0,
                    protocol: PROTO_ICMP,
                });
            }
            "ICMPV6" => {
                return Ok(PortProtocol {
                    port: 0,
                    protocol: PROTO_ICMPV6,
                });
            }
            _ => {}
        }
        let (port, protocol) = match trimmed.split_once('/') {
            None => (port_of(trimmed), Some(PROTO_TCP)),
            Some((a, b)) => match port_of(a) {
                Some(port) => (Some(port), protocol_of(b)),
                None => (port_of(b), protocol_of(a)),
            },
        };
        match (port, protocol) {
            (Some(port), Some(protocol)) => Ok(PortProtocol { port, protocol }),
            _ => Err(bad()),
        }
    }
}

/// A live pod-network pod and its addresses, the way the compiler sees it: not
/// `Succeeded`/`Failed`, not `hostNetwork`, valid addresses from `status.podIPs` and
/// `status.podIP`, an address listed by two pods belonging to the one that holds it
/// ([`address_owners`](netpol_compile::state::address_owners): the running one, then
/// the one created last, then the first in name order).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodAddresses {
    pub pod: ObjectRef,
    pub ips: Vec<IpAddr>,
}

/// Why a pod of the state takes no part in pod-to-pod traffic.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct SkippedPod {
    #[serde(serialize_with = "text::as_display")]
    pub pod: ObjectRef,
    pub reason: String,
}

/// The pods that have addresses (in name order) and the ones left out, with why.
pub fn pod_addresses(state: &ClusterState) -> (Vec<PodAddresses>, Vec<SkippedPod>) {
    let owner = netpol_compile::state::address_owners(state);
    let mut pods = Vec::new();
    let mut skipped = Vec::new();
    for (obj, pod) in &state.pods {
        let skip = |reason: &str| SkippedPod {
            pod: obj.clone(),
            reason: reason.to_string(),
        };
        if pod.host_network() {
            skipped.push(skip("hostNetwork: it uses the node's addresses"));
            continue;
        }
        if let Some(phase @ ("Succeeded" | "Failed")) = pod.phase() {
            skipped.push(skip(&format!("phase {phase}: no longer running")));
            continue;
        }
        let listed = listed_ips(pod);
        if listed.is_empty() {
            skipped.push(skip("no address in status.podIP(s)"));
            continue;
        }
        let ips: Vec<IpAddr> = listed
            .into_iter()
            .filter(|ip| owner.get(ip) == Some(&obj))
            .collect();
        if ips.is_empty() {
            skipped.push(skip("every address it lists is held by another pod"));
            continue;
        }
        pods.push(PodAddresses {
            pod: obj.clone(),
            ips,
        });
    }
    (pods, skipped)
}

/// Valid, distinct addresses of `status.podIPs` then `status.podIP`, in order.
fn listed_ips(pod: &PodInfo) -> Vec<IpAddr> {
    let mut out = Vec::new();
    for ip in netpol_compile::state::pod_ips(pod) {
        if !out.contains(&ip) {
            out.push(ip);
        }
    }
    out
}

/// The (port, protocol) pairs a pod's containers and native sidecars declare
/// (`containerPort`, default TCP).
pub fn served_ports(pod: &PodInfo) -> Vec<PortProtocol> {
    let mut out: Vec<PortProtocol> = pod
        .ports()
        .iter()
        .filter_map(|p| {
            let port = u16::try_from(p.container_port).ok().filter(|p| *p != 0)?;
            let protocol = match p.protocol.as_deref().unwrap_or("TCP") {
                "TCP" => PROTO_TCP,
                "UDP" => PROTO_UDP,
                "SCTP" => PROTO_SCTP,
                _ => return None,
            };
            Some(PortProtocol { port, protocol })
        })
        .collect();
    out.sort();
    out.dedup();
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn port_protocol_parses_both_orders_and_defaults_to_tcp() {
        let p = |s: &str| s.parse::<PortProtocol>().unwrap();
        assert_eq!(p("80/TCP"), PortProtocol::tcp(80));
        assert_eq!(p("tcp/80"), PortProtocol::tcp(80));
        assert_eq!(p("80"), PortProtocol::tcp(80));
        assert_eq!(p("53/udp"), PortProtocol::udp(53));
        assert_eq!(
            p("SCTP/3868"),
            PortProtocol {
                port: 3868,
                protocol: PROTO_SCTP
            }
        );
        assert_eq!(p("icmp").to_string(), "ICMP");
        assert_eq!(p("53/UDP").to_string(), "UDP/53");
        for bad in ["", "0/TCP", "80/TPC", "x/80", "70000", "80/TCP/1"] {
            assert!(bad.parse::<PortProtocol>().is_err(), "{bad}");
        }
    }

    #[test]
    fn native_sidecars_serve_their_ports_and_other_init_containers_do_not() {
        let pod: k8s_openapi::api::core::v1::Pod = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "a", "namespace": "x"},
            "spec": {
                "containers": [{"name": "c", "ports": [{"containerPort": 80}]}],
                "initContainers": [
                    {"name": "setup", "ports": [{"containerPort": 81}]},
                    {"name": "proxy", "restartPolicy": "Always",
                     "ports": [{"containerPort": 15001}, {"containerPort": 53, "protocol": "UDP"}]},
                ],
            },
        }))
        .unwrap();
        assert_eq!(
            served_ports(&PodInfo::of(&pod)),
            [
                PortProtocol::udp(53),
                PortProtocol::tcp(80),
                PortProtocol::tcp(15001)
            ]
        );
    }

    #[test]
    fn an_address_listed_by_two_pods_goes_to_the_running_one() {
        let pod = |name: &str, phase: &str, ips: &[&str]| -> k8s_openapi::api::core::v1::Pod {
            serde_json::from_value(serde_json::json!({
                "metadata": {"name": name, "namespace": "x"},
                "spec": {"containers": [{"name": "c"}]},
                "status": {"phase": phase, "podIPs": ips.iter().map(|ip| serde_json::json!({"ip": ip})).collect::<Vec<_>>()},
            }))
            .unwrap()
        };
        let mut state = ClusterState::default();
        for p in [
            pod("a", "Pending", &["10.0.0.1"]),
            pod("b", "Running", &["10.0.0.1", "fd00::2"]),
            pod("c", "Pending", &["fd00::2"]),
        ] {
            let key = ObjectRef::new("x", p.metadata.name.clone().unwrap());
            state.pods.insert(key, PodInfo::of(&p));
        }
        let (pods, skipped) = pod_addresses(&state);
        assert_eq!(
            pods,
            [PodAddresses {
                pod: ObjectRef::new("x", "b"),
                ips: vec!["10.0.0.1".parse().unwrap(), "fd00::2".parse().unwrap()],
            }]
        );
        let skipped: Vec<&str> = skipped.iter().map(|s| s.pod.name.as_str()).collect();
        assert_eq!(skipped, ["a", "c"]);
    }

    #[test]
    fn ordering_is_by_port_then_protocol() {
        let mut v = vec![
            PortProtocol::udp(53),
            PortProtocol::tcp(80),
            PortProtocol::tcp(53),
        ];
        v.sort();
        assert_eq!(
            v,
            [
                PortProtocol::tcp(53),
                PortProtocol::udp(53),
                PortProtocol::tcp(80)
            ]
        );
    }
}
