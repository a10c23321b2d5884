//! What is measured: the small cluster compiled into the maps, and the scenarios (a
//! program and a frame with its skb mark, with the verdict and counted reason expected).

use std::net::IpAddr;

use netpol_agent::datapath::HookKind;
use netpol_agent::datapath::packet::{Frame, Transport, arp_frame};
use netpol_agent::source::manifest::parse_documents;
use netpol_common::{Reason, TCP_ACK, TCP_RST};
use netpol_compile::state::{ClusterState, NodeContext};

/// The measured cluster: `server` (local, node-0) accepts TCP 80 and 85 from `client`
/// and `caller`; `caller` (local, egress-isolated) may reach `server` and `client`
/// (node-1) on TCP 80 and 85, also through the Service address [`SERVICE`] (kube-proxy's
/// translation is what the scenarios play: the hook after it sees the backend and the
/// mark). Exact ports are the common case; `ranged` (local) accepts TCP 80-90 from
/// `client`, the case of an endpoint with port ranges. `guarded` (local) is the subject
/// of an Admin-tier ClusterNetworkPolicy that denies `client` on TCP 91 and passes the
/// rest of its traffic on to NetworkPolicy, which allows TCP 85.
const CLUSTER: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: bench, labels: {team: perf}}
---
apiVersion: v1
kind: Pod
metadata: {name: server, namespace: bench, labels: {app: server}}
spec: {nodeName: node-0, containers: [{name: c, ports: [{name: http, containerPort: 8080}]}]}
status: {phase: Running, podIP: 10.0.0.1}
---
apiVersion: v1
kind: Pod
metadata: {name: client, namespace: bench, labels: {app: client}}
spec: {nodeName: node-1, containers: [{name: c}]}
status: {phase: Running, podIP: 10.0.0.2}
---
apiVersion: v1
kind: Pod
metadata: {name: other, namespace: bench, labels: {app: other}}
spec: {nodeName: node-1, containers: [{name: c}]}
status: {phase: Running, podIP: 10.0.0.3}
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: server-ingress, namespace: bench}
spec:
  podSelector: {matchLabels: {app: server}}
  policyTypes: [Ingress]
  ingress:
    - from: [{podSelector: {matchLabels: {app: client}}}]
      ports: [{protocol: TCP, port: 80}, {protocol: TCP, port: 85}]
    - from: [{podSelector: {matchLabels: {app: caller}}}]
      ports: [{protocol: TCP, port: 80}, {protocol: TCP, port: 85}]
---
apiVersion: v1
kind: Pod
metadata: {name: caller, namespace: bench, labels: {app: caller}}
spec: {nodeName: node-0, containers: [{name: c}]}
status: {phase: Running, podIP: 10.0.0.4}
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: caller-egress, namespace: bench}
spec:
  podSelector: {matchLabels: {app: caller}}
  policyTypes: [Egress]
  egress:
    - to: [{podSelector: {matchLabels: {app: server}}}, {podSelector: {matchLabels: {app: client}}}]
      ports: [{protocol: TCP, port: 80}, {protocol: TCP, port: 85}]
---
apiVersion: v1
kind: Pod
metadata: {name: ranged, namespace: bench, labels: {app: ranged}}
spec: {nodeName: node-0, containers: [{name: c}]}
status: {phase: Running, podIP: 10.0.0.5}
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: ranged-ingress, namespace: bench}
spec:
  podSelector: {matchLabels: {app: ranged}}
  policyTypes: [Ingress]
  ingress:
    - from: [{podSelector: {matchLabels: {app: client}}}]
      ports: [{protocol: TCP, port: 80, endPort: 90}]
---
apiVersion: v1
kind: Pod
metadata: {name: guarded, namespace: bench, labels: {app: guarded}}
spec: {nodeName: node-0, containers: [{name: c}]}
status: {phase: Running, podIP: 10.0.0.6}
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: guarded-ingress, namespace: bench}
spec:
  podSelector: {matchLabels: {app: guarded}}
  policyTypes: [Ingress]
  ingress:
    - from: [{podSelector: {matchLabels: {app: client}}}]
      ports: [{protocol: TCP, port: 85}]
---
apiVersion: policy.networking.k8s.io/v1alpha2
kind: ClusterNetworkPolicy
metadata: {name: guard}
spec:
  tier: Admin
  priority: 10
  subject: {pods: {namespaceSelector: {}, podSelector: {matchLabels: {app: guarded}}}}
  ingress:
    - name: deny-91
      action: Deny
      from: [{pods: {namespaceSelector: {}, podSelector: {matchLabels: {app: client}}}}]
      protocols: [{tcp: {destinationPort: {number: 91}}}]
    - name: pass-the-rest
      action: Pass
      from: [{pods: {namespaceSelector: {}, podSelector: {matchLabels: {app: client}}}}]
"#;

pub const SERVER: &str = "10.0.0.1";
pub const CLIENT: &str = "10.0.0.2";
const NOT_LOCAL: &str = "10.0.0.3";
pub const CALLER: &str = "10.0.0.4";
const RANGED: &str = "10.0.0.5";
const GUARDED: &str = "10.0.0.6";
/// A ClusterIP, and the Service port in front of the backends' 80.
pub const SERVICE: &str = "10.96.0.1";
pub const SERVICE_PORT: u16 = 10080;
pub const MARK: u32 = netpol_common::SERVICE_MARK_DEFAULT;

/// What runs a frame: netpol's program of a hook, or the empty floor program.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Prog {
    Netpol(HookKind),
    Empty,
}

pub struct Scenario {
    pub key: &'static str,
    pub name: &'static str,
    pub method: &'static str,
    pub prog: Prog,
    pub frame: Vec<u8>,
    /// The skb mark the frame arrives with (the Service mark after `from_pod`).
    pub mark: u32,
    /// Expected TC action and counted reason (none for the empty program).
    pub action: i32,
    pub reason: Option<Reason>,
}

fn ip(s: &str) -> IpAddr {
    s.parse().expect("IP")
}

pub fn tcp(src: &str, dst: &str, sport: u16, dport: u16, flags: u8) -> Vec<u8> {
    Frame::new(
        ip(src),
        ip(dst),
        Transport::Tcp {
            sport,
            dport,
            flags,
        },
    )
    .build()
}

pub fn scenarios() -> Vec<Scenario> {
    use HookKind::{FromPod, LeaveNode, ToPod};
    const PASS: i32 = -1;
    const SHOT: i32 = 2;
    vec![
        Scenario {
            key: "empty_program",
            name: "floor: empty TC program",
            method: "`r0 = -1; exit` (raw BPF_PROG_LOAD), any frame",
            prog: Prog::Empty,
            frame: arp_frame(),
            mark: 0,
            action: PASS,
            reason: None,
        },
        Scenario {
            key: "netpol_arp",
            name: "floor: netpol, non-IP frame",
            method: "to_pod, ARP request: Ethernet parse only",
            prog: Prog::Netpol(ToPod),
            frame: arp_frame(),
            mark: 0,
            action: PASS,
            reason: Some(Reason::NotEndpoint),
        },
        Scenario {
            key: "netpol_not_endpoint",
            name: "floor: netpol, IP, not an endpoint",
            method: "to_pod, TCP SYN to a non-local pod: parse + CT miss + IFACES + ENDPOINTS miss",
            prog: Prog::Netpol(ToPod),
            frame: tcp(CLIENT, NOT_LOCAL, 40000, 80, netpol_common::TCP_SYN),
            mark: 0,
            action: PASS,
            reason: Some(Reason::NotEndpoint),
        },
        Scenario {
            key: "established",
            name: "established flow (CT hit)",
            method: "to_pod, ACK of a tuple whose SYN and SYN-ACK passed: CT hit (ENDPOINTS not needed)",
            prog: Prog::Netpol(ToPod),
            frame: tcp(CLIENT, SERVER, 40000, 80, TCP_ACK),
            mark: 0,
            action: PASS,
            reason: Some(Reason::Established),
        },
        Scenario {
            key: "established_reply",
            name: "established flow, reply (CT hit)",
            method: "from_pod, server's ACK on the same tuple: CT hit (ENDPOINTS not needed)",
            prog: Prog::Netpol(FromPod),
            frame: tcp(SERVER, CLIENT, 80, 40000, TCP_ACK),
            mark: 0,
            action: PASS,
            reason: Some(Reason::Reply),
        },
        Scenario {
            key: "new_flow_denied",
            name: "new flow, denied",
            method: "to_pod, SYN to port 91: CT miss + IFACES + ENDPOINTS + IPCACHE + 1 POLICY hash miss (exact ports only; no CT entry)",
            prog: Prog::Netpol(ToPod),
            frame: tcp(CLIENT, SERVER, 40001, 91, netpol_common::TCP_SYN),
            mark: 0,
            action: SHOT,
            reason: Some(Reason::PolicyDenied),
        },
        Scenario {
            key: "new_flow_allowed_rst",
            name: "new flow, allowed (RST)",
            method: "to_pod, RST to port 85: CT miss + IFACES + ENDPOINTS + IPCACHE + 1 POLICY hash hit (RST opens no CT entry)",
            prog: Prog::Netpol(ToPod),
            frame: tcp(CLIENT, SERVER, 40002, 85, TCP_RST),
            mark: 0,
            action: PASS,
            reason: Some(Reason::PolicyAllowed),
        },
        Scenario {
            key: "new_flow_denied_ranges",
            name: "new flow, denied, endpoint with port ranges",
            method: "to_pod, SYN to port 91 of `ranged`: as above + a POLICY_RANGES walk (miss)",
            prog: Prog::Netpol(ToPod),
            frame: tcp(CLIENT, RANGED, 40003, 91, netpol_common::TCP_SYN),
            mark: 0,
            action: SHOT,
            reason: Some(Reason::PolicyDenied),
        },
        Scenario {
            key: "new_flow_allowed_ranges_rst",
            name: "new flow, allowed by a port range (RST)",
            method: "to_pod, RST to port 85 of `ranged`: POLICY hash miss + POLICY_RANGES hit",
            prog: Prog::Netpol(ToPod),
            frame: tcp(CLIENT, RANGED, 40004, 85, TCP_RST),
            mark: 0,
            action: PASS,
            reason: Some(Reason::PolicyAllowed),
        },
        Scenario {
            key: "new_flow_admin_denied",
            name: "new flow, denied by the Admin tier",
            method: "to_pod, SYN to port 91 of `guarded`: CT miss + IFACES + ENDPOINTS + IPCACHE + 1 POLICY hash hit (Admin tier, Deny)",
            prog: Prog::Netpol(ToPod),
            frame: tcp(CLIENT, GUARDED, 40005, 91, netpol_common::TCP_SYN),
            mark: 0,
            action: SHOT,
            reason: Some(Reason::ClusterDenied),
        },
        Scenario {
            key: "new_flow_admin_pass_rst",
            name: "new flow, Admin Pass then NetworkPolicy allows (RST)",
            method: "to_pod, RST to port 85 of `guarded`: Admin tier hash miss + every-protocol hit (Pass) + NetworkPolicy hash hit",
            prog: Prog::Netpol(ToPod),
            frame: tcp(CLIENT, GUARDED, 40006, 85, TCP_RST),
            mark: 0,
            action: PASS,
            reason: Some(Reason::PolicyAllowed),
        },
        Scenario {
            key: "service_established_from_pod",
            name: "Service: established, from_pod",
            method: "from_pod, ACK of a connection to the ClusterIP: CT hit (CT_SERVICE), mark set",
            prog: Prog::Netpol(FromPod),
            frame: tcp(CALLER, SERVICE, 41000, SERVICE_PORT, TCP_ACK),
            mark: 0,
            action: PASS,
            reason: Some(Reason::Established),
        },
        Scenario {
            key: "service_established_to_pod",
            name: "Service: established, backend's veth",
            method: "to_pod, marked ACK after translation: CT hit (CT_SERVICE_EGRESS)",
            prog: Prog::Netpol(ToPod),
            frame: tcp(CALLER, SERVER, 41000, 80, TCP_ACK),
            mark: MARK,
            action: PASS,
            reason: Some(Reason::Established),
        },
        Scenario {
            key: "service_new_from_pod",
            name: "Service: new flow, from_pod",
            method: "from_pod, RST to the ClusterIP: CT miss + IFACES + ENDPOINTS + IPCACHE (Service), mark set",
            prog: Prog::Netpol(FromPod),
            frame: tcp(CALLER, SERVICE, 41002, SERVICE_PORT, TCP_RST),
            mark: 0,
            action: PASS,
            reason: Some(Reason::ToService),
        },
        Scenario {
            key: "service_new_to_pod",
            name: "Service: new flow, backend's veth",
            method: "to_pod, marked RST to port 85: CT miss + the caller's egress (ENDPOINTS + IPCACHE + POLICY) + the server's ingress (IFACES + ENDPOINTS + IPCACHE + POLICY)",
            prog: Prog::Netpol(ToPod),
            frame: tcp(CALLER, SERVER, 41003, 85, TCP_RST),
            mark: MARK,
            action: PASS,
            reason: Some(Reason::PolicyAllowed),
        },
        Scenario {
            key: "leave_node_unmarked",
            name: "exit device, any other packet",
            method: "leave_node, unmarked: STATE + the mark test, what all other traffic leaving the node pays",
            prog: Prog::Netpol(LeaveNode),
            frame: tcp(CLIENT, NOT_LOCAL, 40000, 80, TCP_ACK),
            mark: 0,
            action: PASS,
            reason: Some(Reason::NotEndpoint),
        },
    ]
}

/// Makes [`SERVICE`] a Service address in the compiled maps (as the compiler does for
/// a Service's ClusterIP).
pub fn add_service(compiled: &mut netpol_compile::Compiled) {
    let mut ipcache = (*compiled.ipcache).clone();
    ipcache.insert(
        netpol_compile::host_key(ip(SERVICE)),
        netpol_common::PeerInfo {
            identity: netpol_common::IDENTITY_WORLD,
            flags: netpol_common::PEER_SERVICE,
        },
    );
    compiled.ipcache = ipcache.into();
}

pub fn state() -> ClusterState {
    let mut state = ClusterState {
        node: NodeContext {
            name: Some("node-0".into()),
            ips: vec![ip("10.99.0.1")],
        },
        ..ClusterState::default()
    };
    for object in parse_documents(CLUSTER, "bench") {
        object
            .expect("bench manifests are valid")
            .insert_into(&mut state);
    }
    state
}
