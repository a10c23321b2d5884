//! Tier 2: netpol's programs compose with other programs on the same TCX hooks (a
//! CNI's): they run first, so a program that returns OK or redirects cannot skip the
//! verdict, and they take the front back when a program is attached before them later.
//!
//! A node and two pods are network namespaces of this test (`np<pid>-…`, removed on
//! drop and swept when a run died); the datapath is opened and applied from a thread
//! inside the node namespace, and the traffic is real UDP between the pods.

use std::net::{SocketAddr, UdpSocket};
use std::path::{Path, PathBuf};
use std::time::Duration;

use aya::programs::SchedClassifier;
use aya::programs::links::LinkOrder;
use aya::programs::tc::{TcAttachOptions, TcAttachType};
use netpol_agent::datapath::{Capacities, Datapath};
use netpol_agent::source::manifest::parse_documents;
use netpol_compile::state::{ClusterState, NodeContext};
use netpol_compile::{Allocations, compile};
use netpol_lab::netns::{NetnsWorker, create_netns, delete_netns, ip_batch, sweep_stale, sysctl};

/// Pods a (10.210.0.1) and b (10.210.0.2); b accepts nothing.
const CLUSTER: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: x}
---
apiVersion: v1
kind: Pod
metadata: {name: a, namespace: x, labels: {app: a}}
spec: {containers: [{name: c}]}
status: {phase: Running, podIP: 10.210.0.1}
---
apiVersion: v1
kind: Pod
metadata: {name: b, namespace: x, labels: {app: b}}
spec: {containers: [{name: c}]}
status: {phase: Running, podIP: 10.210.0.2}
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: b-accepts-nothing, namespace: x}
spec: {podSelector: {matchLabels: {app: b}}, policyTypes: [Ingress]}
"#;

/// The node and pod namespaces, deleted on drop.
struct Namespaces {
    node: String,
    a: String,
    b: String,
}

impl Namespaces {
    fn create() -> Namespaces {
        let pid = std::process::id();
        let ns = Namespaces {
            node: format!("np{pid}-comp-node"),
            a: format!("np{pid}-comp-a"),
            b: format!("np{pid}-comp-b"),
        };
        for name in [&ns.node, &ns.a, &ns.b] {
            create_netns(name).unwrap();
        }
        // Routed veths, as Calico or Cilium make them: the pod's /32 routed to its
        // host-side interface, a link-local gateway.
        // The gateway is an address of the node: it answers ARP for it on every veth.
        let mut node = vec![
            "link set lo up".to_string(),
            "addr add 169.254.1.1/32 dev lo".into(),
        ];
        for (pod, ip, veth) in [
            (&ns.a, "10.210.0.1", "vcomp-a"),
            (&ns.b, "10.210.0.2", "vcomp-b"),
        ] {
            node.push(format!(
                "link add {veth} type veth peer name eth0 netns {pod}"
            ));
            node.push(format!("link set {veth} up"));
            node.push(format!("route add {ip}/32 dev {veth}"));
        }
        ip_batch(Some(&ns.node), &node).unwrap();
        // The pods' side is configured after their eth0 exists.
        for (pod, ip) in [(&ns.a, "10.210.0.1"), (&ns.b, "10.210.0.2")] {
            ip_batch(
                Some(pod),
                &[
                    "link set lo up".into(),
                    "link set eth0 up".into(),
                    format!("addr add {ip}/32 dev eth0"),
                    "route add 169.254.1.1 dev eth0".into(),
                    "route add default via 169.254.1.1 dev eth0".into(),
                ],
            )
            .unwrap();
        }
        let worker = NetnsWorker::spawn(&ns.node).unwrap();
        worker
            .run(|| {
                sysctl("net/ipv4/ip_forward", "1").unwrap();
                for veth in ["vcomp-a", "vcomp-b"] {
                    sysctl(&format!("net/ipv4/conf/{veth}/proxy_arp"), "1").unwrap();
                }
            })
            .unwrap();
        ns
    }
}

impl Drop for Namespaces {
    fn drop(&mut self) {
        let _ = delete_netns([self.node.as_str(), self.a.as_str(), self.b.as_str()]);
    }
}

/// The raw loader of the benchmark's floor program.
#[path = "../benches/datapath/floor.rs"]
mod floor;

/// Loads `r0 = 0 (TC_ACT_OK); exit`, a program that lets everything through and ends
/// the chain, as a CNI's might, pinned at `pin`.
fn load_pass_everything(pin: &Path) -> SchedClassifier {
    floor::load_constant_program(pin, "passes", 0).expect("loading a pass-everything program")
}

/// Whether a UDP datagram from pod a reaches pod b (bounded wait).
fn a_reaches_b(ns: &Namespaces, port: u16) -> bool {
    let b = NetnsWorker::spawn(&ns.b).unwrap();
    let socket = b
        .run(move || UdpSocket::bind(("10.210.0.2", port)).unwrap())
        .unwrap();
    socket
        .set_read_timeout(Some(Duration::from_millis(500)))
        .unwrap();
    let a = NetnsWorker::spawn(&ns.a).unwrap();
    let sender = a
        .run(|| UdpSocket::bind(("10.210.0.1", 0)).unwrap())
        .unwrap();
    let to: SocketAddr = ([10, 210, 0, 2], port).into();
    let mut buf = [0u8; 16];
    // A few tries: the first datagram may wait for neighbour resolution.
    (0..4).any(|_| {
        sender.send_to(b"hello", to).unwrap();
        socket.recv(&mut buf).is_ok_and(|n| &buf[..n] == b"hello")
    })
}

#[test]
fn netpol_runs_first_on_its_hooks_whatever_else_is_attached() {
    if !nix::unistd::Uid::effective().is_root() {
        eprintln!("skipped: needs root for namespaces and BPF");
        return;
    }
    sweep_stale();
    let ns = Namespaces::create();
    let dir = PathBuf::from(format!("/sys/fs/bpf/netpol-comp-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let pass_pin = dir.join("passes");

    let mut state = ClusterState {
        node: NodeContext {
            name: None,
            ips: vec!["10.210.9.1".parse().unwrap()],
        },
        ..ClusterState::default()
    };
    for object in parse_documents(CLUSTER, "test") {
        object.unwrap().insert_into(&mut state);
    }
    let compiled = compile(&state, &Allocations::default());

    // Without netpol the pods talk: the namespaces are wired right.
    assert!(a_reaches_b(&ns, 7001), "the test's network does not work");

    let node = NetnsWorker::spawn(&ns.node).unwrap();
    let (dir2, pin2) = (dir.clone(), pass_pin.clone());
    let datapath = node
        .run(move || {
            // A CNI's program is on b's veth before netpol comes (packets entering b
            // leave the node through it: TCX egress).
            let mut cni = load_pass_everything(&pin2);
            cni.attach_with_options(
                "vcomp-b",
                TcAttachType::Egress,
                TcAttachOptions::TcxOrder(LinkOrder::first()),
            )
            .unwrap();
            let mut datapath =
                Datapath::open(&dir2.join("netpol"), &Capacities::default()).unwrap();
            datapath.set_pod_interfaces(vec!["vcomp-".into()]);
            datapath.apply(&compiled).unwrap();
            (datapath, cni)
        })
        .unwrap();
    let (datapath, cni) = datapath;
    assert!(
        !a_reaches_b(&ns, 7002),
        "a program before netpol's skipped the verdict"
    );

    // A CNI that attaches again, in front: netpol takes the front back at its next look.
    let later_pin = dir.join("passes-too");
    let (datapath, cni) = node
        .run(move || {
            // (A program is on a hook at most once: another one, as a second CNI.)
            let mut later = load_pass_everything(&later_pin);
            let mut datapath = datapath;
            later
                .attach_with_options(
                    "vcomp-b",
                    TcAttachType::Egress,
                    TcAttachOptions::TcxOrder(LinkOrder::first()),
                )
                .unwrap();
            let (_, before) = SchedClassifier::query_tcx("vcomp-b", TcAttachType::Egress).unwrap();
            assert_eq!(before.len(), 3, "two CNI links and netpol's");
            datapath.attach_new_interfaces().unwrap();
            let (_, after) = SchedClassifier::query_tcx("vcomp-b", TcAttachType::Egress).unwrap();
            let first = after
                .first()
                .unwrap()
                .name_as_str()
                .unwrap_or_default()
                .to_owned();
            assert_eq!(
                first, "to_pod",
                "netpol's program is in front again: {after:?}"
            );
            assert_eq!(after.len(), 3, "the old link went with its pin");
            (datapath, (cni, later))
        })
        .unwrap();
    assert!(
        !a_reaches_b(&ns, 7003),
        "netpol lost the front of the chain"
    );

    node.run(move || {
        datapath.shutdown();
        drop(cni);
    })
    .unwrap();
    let _ = std::fs::remove_dir_all(&dir);
}
