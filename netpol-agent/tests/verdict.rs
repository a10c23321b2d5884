//! Tier 2: verdicts of the real eBPF programs, run by the kernel with
//! BPF_PROG_TEST_RUN on crafted frames, with maps filled by the real compiler.
//!
//! Needs root (CAP_BPF) and a bpffs at /sys/fs/bpf; `cargo xtask test` provides both.
//! Each test loads its own copy of the programs under a unique bpffs directory and
//! removes it afterwards.

use std::net::IpAddr;
use std::path::PathBuf;

use netpol_agent::datapath::packet::{Frame, Ipv6Ext, Transport, arp_frame};
use netpol_agent::datapath::{Capacities, Datapath, HookKind};
use netpol_agent::source::manifest::parse_documents;
use netpol_common::Reason;
use netpol_compile::state::{ClusterState, NodeContext, ObjectRef};
use netpol_compile::{self as compile, Allocations, policy_maps};

/// The cluster every test starts from. Namespace x: a, b (serves 80-90 and dns/53 UDP),
/// c (names its port `web` = 8080); namespace y: d. a and b are dual-stack.
const CLUSTER: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: x, labels: {kubernetes.io/metadata.name: x, team: red}}
---
apiVersion: v1
kind: Namespace
metadata: {name: y, labels: {kubernetes.io/metadata.name: y, team: blue}}
---
apiVersion: v1
kind: Pod
metadata: {name: a, namespace: x, labels: {app: a}}
spec: {containers: [{name: c}]}
status: {podIP: 10.1.0.1, podIPs: [{ip: 10.1.0.1}, {ip: "fd00::1"}]}
---
apiVersion: v1
kind: Pod
metadata: {name: b, namespace: x, labels: {app: b}}
spec: {containers: [{name: c, ports: [{name: dns, containerPort: 53, protocol: UDP}]}]}
status: {podIP: 10.1.0.2, podIPs: [{ip: 10.1.0.2}, {ip: "fd00::2"}]}
---
apiVersion: v1
kind: Pod
metadata: {name: c, namespace: x, labels: {app: c}}
spec: {containers: [{name: c, ports: [{name: web, containerPort: 8080}]}]}
status: {podIP: 10.1.0.3}
---
apiVersion: v1
kind: Pod
metadata: {name: d, namespace: y, labels: {app: d}}
spec: {containers: [{name: c, ports: [{name: web, containerPort: 9090}]}]}
status: {podIP: 10.2.0.1}
"#;

/// b: ingress from a on TCP 80-90, from 192.168.0.0/16 except 192.168.1.0/24 on its
/// named port dns (UDP 53), from namespace team=blue on SCTP 7; egress denied.
/// c: egress to namespace y on named port `web` (resolves to 9090 on d) and anything
/// to ipBlock 172.16.0.0/12.
const POLICIES: &str = r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: b-ingress, namespace: x}
spec:
  podSelector: {matchLabels: {app: b}}
  policyTypes: [Ingress, Egress]
  ingress:
    - from: [{podSelector: {matchLabels: {app: a}}}]
      ports: [{protocol: TCP, port: 80, endPort: 90}]
    - from: [{ipBlock: {cidr: 192.168.0.0/16, except: [192.168.1.0/24]}}, {ipBlock: {cidr: "fd00:99::/64", except: ["fd00:99::/96"]}}]
      ports: [{protocol: UDP, port: dns}]
    - from: [{namespaceSelector: {matchLabels: {team: blue}}}]
      ports: [{protocol: SCTP, port: 7}]
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: c-egress, namespace: x}
spec:
  podSelector: {matchLabels: {app: c}}
  policyTypes: [Egress]
  egress:
    - to: [{namespaceSelector: {matchLabels: {team: blue}}}]
      ports: [{port: web}]
    - to: [{ipBlock: {cidr: 172.16.0.0/12}}]
"#;

const NODE_IP: &str = "10.99.0.1";

fn state(manifests: &[&str]) -> ClusterState {
    let mut state = ClusterState {
        node: NodeContext {
            name: None,
            ips: vec![NODE_IP.parse().unwrap()],
        },
        ..ClusterState::default()
    };
    for text in manifests {
        for object in parse_documents(text, "test") {
            object
                .expect("test manifests are valid")
                .insert_into(&mut state);
        }
    }
    state
}

/// A loaded datapath under a unique bpffs directory, removed on drop.
struct Loaded {
    datapath: Option<Datapath>,
    compiled: compile::Compiled,
    dir: PathBuf,
}

impl Loaded {
    fn new(tag: &str, manifests: &[&str]) -> Option<Loaded> {
        Self::with_capacities(tag, manifests, &Capacities::default())
    }

    fn with_capacities(tag: &str, manifests: &[&str], capacities: &Capacities) -> Option<Loaded> {
        if !nix::unistd::Uid::effective().is_root() {
            eprintln!("skipped: BPF_PROG_TEST_RUN needs root (run via `cargo xtask test`)");
            return None;
        }
        let dir = PathBuf::from(format!(
            "/sys/fs/bpf/netpol-verdict-{tag}-{}",
            std::process::id()
        ));
        let mut datapath = Datapath::open(&dir, capacities).expect("load programs");
        let dir = dir.clone();
        let compiled = compile::compile(&state(manifests), &Allocations::default());
        assert!(
            compiled.diagnostics.is_empty(),
            "{:?}",
            compiled.diagnostics
        );
        let report = datapath.sync_maps(&compiled).expect("write maps");
        if capacities.endpoints.is_none() && capacities.policy.is_none() {
            assert!(report.refused.is_empty(), "{:?}", report.refused);
        }
        Some(Loaded {
            datapath: Some(datapath),
            compiled,
            dir,
        })
    }

    fn run(&self, hook: HookKind, frame: &Frame) -> bool {
        self.run_bytes(hook, &frame.build())
    }

    fn run_bytes(&self, hook: HookKind, bytes: &[u8]) -> bool {
        let verdict = self
            .datapath
            .as_ref()
            .unwrap()
            .test_run(hook, bytes, 1)
            .expect("test run");
        assert!(
            verdict.action == -1 || verdict.action == 2,
            "unexpected TC action {}",
            verdict.action
        );
        verdict.allowed()
    }

    /// The endpoint id the compiler gave pod `ns/name`.
    fn endpoint_id(&self, pod: &str) -> u32 {
        self.compiled
            .local_pods
            .iter()
            .find(|p| p.pod.to_string() == pod)
            .unwrap_or_else(|| panic!("{pod} is not a local pod"))
            .endpoint_id
    }

    /// One of the loaded object's maps, opened through its pin.
    fn pinned(&self, name: &str) -> aya::maps::MapData {
        aya::maps::MapData::from_pin(self.dir.join("maps").join(name)).expect("pinned map")
    }

    /// Jiffies per second as the agent wrote them to STATE.
    fn jiffies_hz(&self) -> u64 {
        let state: aya::maps::Array<_, netpol_common::DatapathState> =
            aya::maps::Array::try_from(aya::maps::Map::Array(self.pinned("STATE"))).unwrap();
        u64::from(state.get(&0, 0).unwrap().jiffies_hz)
    }

    fn counter(&self, reason: Reason) -> u64 {
        let counters = self.datapath.as_ref().unwrap().counters().unwrap();
        counters
            .iter()
            .find(|(r, _)| *r == reason)
            .unwrap()
            .1
            .packets
    }
}

impl Drop for Loaded {
    fn drop(&mut self) {
        if let Some(datapath) = self.datapath.take() {
            datapath.shutdown();
        }
    }
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

use HookKind::{FromPod, ToPod};

#[test]
fn tcp_port_range_from_a_selected_pod_ipv4() {
    let Some(dp) = Loaded::new("range4", &[CLUSTER, POLICIES]) else {
        return;
    };
    for (port, expected) in [(79, false), (80, true), (85, true), (90, true), (91, false)] {
        let syn = Frame::new(
            ip("10.1.0.1"),
            ip("10.1.0.2"),
            Transport::syn(40000 + port, port),
        );
        assert_eq!(dp.run(ToPod, &syn), expected, "a -> b TCP {port}");
    }
    // c is in the same namespace but not selected by the peer.
    assert!(!dp.run(
        ToPod,
        &Frame::new(ip("10.1.0.3"), ip("10.1.0.2"), Transport::syn(40001, 80))
    ));
    // UDP on an allowed TCP port is not allowed.
    assert!(!dp.run(
        ToPod,
        &Frame::new(
            ip("10.1.0.1"),
            ip("10.1.0.2"),
            Transport::Udp {
                sport: 1,
                dport: 80
            }
        )
    ));
    // a itself is not isolated: anything reaches it.
    assert!(dp.run(
        ToPod,
        &Frame::new(ip("10.2.0.1"), ip("10.1.0.1"), Transport::syn(40002, 22))
    ));
}

#[test]
fn tcp_port_range_from_a_selected_pod_ipv6() {
    let Some(dp) = Loaded::new("range6", &[CLUSTER, POLICIES]) else {
        return;
    };
    assert!(dp.run(
        ToPod,
        &Frame::new(ip("fd00::1"), ip("fd00::2"), Transport::syn(40000, 88))
    ));
    assert!(!dp.run(
        ToPod,
        &Frame::new(ip("fd00::1"), ip("fd00::2"), Transport::syn(40000, 91))
    ));
    // An address outside every pod and ipBlock is the world: denied.
    assert!(!dp.run(
        ToPod,
        &Frame::new(ip("fd00::77"), ip("fd00::2"), Transport::syn(40000, 88))
    ));
}

#[test]
fn ipblock_except_edges_and_named_udp_port() {
    let Some(dp) = Loaded::new("ipblock", &[CLUSTER, POLICIES]) else {
        return;
    };
    let udp = |src: &str, dst: &str, dport| {
        Frame::new(ip(src), ip(dst), Transport::Udp { sport: 5353, dport })
    };
    for (src, expected) in [
        ("192.168.0.255", true),
        ("192.168.1.0", false),
        ("192.168.1.255", false),
        ("192.168.2.0", true),
        ("192.168.255.255", true),
        ("192.169.0.1", false),
    ] {
        assert_eq!(
            dp.run(ToPod, &udp(src, "10.1.0.2", 53)),
            expected,
            "{src} -> b UDP 53"
        );
    }
    // The named port resolves to 53 only.
    assert!(!dp.run(ToPod, &udp("192.168.0.1", "10.1.0.2", 54)));
    // IPv6 ipBlock with except.
    assert!(dp.run(ToPod, &udp("fd00:99::1:0:0:1", "fd00::2", 53)));
    assert!(!dp.run(ToPod, &udp("fd00:99::1", "fd00::2", 53)));
}

#[test]
fn sctp_from_a_namespace_selector() {
    let Some(dp) = Loaded::new("sctp", &[CLUSTER, POLICIES]) else {
        return;
    };
    let init = |src: &str, dport| {
        Frame::new(
            ip(src),
            ip("10.1.0.2"),
            Transport::Sctp { sport: 3000, dport },
        )
    };
    assert!(
        dp.run(ToPod, &init("10.2.0.1", 7)),
        "y/d (team=blue) -> b SCTP 7"
    );
    assert!(!dp.run(ToPod, &init("10.2.0.1", 8)));
    assert!(
        !dp.run(ToPod, &init("10.1.0.1", 7)),
        "x/a is not in a team=blue namespace"
    );
}

#[test]
fn egress_named_port_resolves_on_the_destination_and_any_protocol_to_an_ipblock() {
    let Some(dp) = Loaded::new("egress", &[CLUSTER, POLICIES]) else {
        return;
    };
    // c -> d on `web`: 9090 on d (c's own `web` is 8080 and does not count).
    assert!(dp.run(
        FromPod,
        &Frame::new(ip("10.1.0.3"), ip("10.2.0.1"), Transport::syn(40000, 9090))
    ));
    assert!(!dp.run(
        FromPod,
        &Frame::new(ip("10.1.0.3"), ip("10.2.0.1"), Transport::syn(40000, 8080))
    ));
    // To 172.16.0.0/12: any protocol, ICMP included.
    let echo = Frame::new(
        ip("10.1.0.3"),
        ip("172.20.1.1"),
        Transport::Icmp {
            kind: 8,
            code: 0,
            id: 7,
        },
    );
    assert!(dp.run(FromPod, &echo));
    assert!(dp.run(
        FromPod,
        &Frame::new(
            ip("10.1.0.3"),
            ip("172.31.0.1"),
            Transport::Raw {
                protocol: 47,
                len: 8
            }
        )
    ));
    // Elsewhere: nothing.
    assert!(!dp.run(
        FromPod,
        &Frame::new(ip("10.1.0.3"), ip("10.1.0.1"), Transport::syn(40000, 80))
    ));
    assert!(!dp.run(
        FromPod,
        &Frame::new(
            ip("10.1.0.3"),
            ip("8.8.8.8"),
            Transport::Icmp {
                kind: 8,
                code: 0,
                id: 7
            }
        )
    ));
}

#[test]
fn conntrack_lets_replies_through_both_ways() {
    let Some(dp) = Loaded::new("ct", &[CLUSTER, POLICIES]) else {
        return;
    };
    // b is egress-isolated with no egress rules: it cannot open anything...
    assert!(!dp.run(
        FromPod,
        &Frame::new(ip("10.1.0.2"), ip("10.1.0.1"), Transport::syn(5000, 80))
    ));
    // ...and a SYN-ACK that answers no SYN is dropped too.
    assert!(!dp.run(
        FromPod,
        &Frame::new(
            ip("10.1.0.2"),
            ip("10.1.0.1"),
            Transport::syn_ack(80, 41000)
        )
    ));
    // a opens b:80 (allowed) -> b's reply passes although b is egress-isolated.
    assert!(dp.run(
        ToPod,
        &Frame::new(ip("10.1.0.1"), ip("10.1.0.2"), Transport::syn(41000, 80))
    ));
    assert!(dp.run(
        FromPod,
        &Frame::new(
            ip("10.1.0.2"),
            ip("10.1.0.1"),
            Transport::syn_ack(80, 41000)
        )
    ));
    assert!(dp.run(
        ToPod,
        &Frame::new(ip("10.1.0.1"), ip("10.1.0.2"), Transport::ack(41000, 80))
    ));
    assert!(dp.run(
        FromPod,
        &Frame::new(ip("10.1.0.2"), ip("10.1.0.1"), Transport::ack(80, 41000))
    ));
    assert!(dp.counter(Reason::Reply) >= 2);
    assert!(dp.counter(Reason::Established) >= 1);
    // The same for UDP, and for IPv6.
    assert!(dp.run(
        ToPod,
        &Frame::new(
            ip("192.168.5.5"),
            ip("10.1.0.2"),
            Transport::Udp {
                sport: 6000,
                dport: 53
            }
        )
    ));
    assert!(dp.run(
        FromPod,
        &Frame::new(
            ip("10.1.0.2"),
            ip("192.168.5.5"),
            Transport::Udp {
                sport: 53,
                dport: 6000
            }
        )
    ));
    assert!(!dp.run(
        FromPod,
        &Frame::new(
            ip("10.1.0.2"),
            ip("192.168.5.5"),
            Transport::Udp {
                sport: 53,
                dport: 6001
            }
        )
    ));
    assert!(dp.run(
        ToPod,
        &Frame::new(ip("fd00::1"), ip("fd00::2"), Transport::syn(42000, 80))
    ));
    assert!(dp.run(
        FromPod,
        &Frame::new(ip("fd00::2"), ip("fd00::1"), Transport::syn_ack(80, 42000))
    ));
    // ICMP echo replies of an allowed echo request.
    assert!(dp.run(
        FromPod,
        &Frame::new(
            ip("10.1.0.3"),
            ip("172.16.0.9"),
            Transport::Icmp {
                kind: 8,
                code: 0,
                id: 99
            }
        )
    ));
    // c is not ingress-isolated, so try an isolated direction: d -> c replies are not
    // needed; instead check b answering an echo it never got is dropped.
    assert!(!dp.run(
        FromPod,
        &Frame::new(
            ip("10.1.0.2"),
            ip("10.1.0.1"),
            Transport::Icmp {
                kind: 0,
                code: 0,
                id: 5
            }
        )
    ));
}

#[test]
fn each_pod_of_a_node_local_connection_keeps_its_own_entry() {
    let Some(dp) = Loaded::new("ct-local", &[CLUSTER, POLICIES]) else {
        return;
    };
    // a -> b:80: a is not egress-isolated, b allows a. Both hooks run on the same test
    // interface, so only the (local, remote) order tells the two entries apart.
    let syn = Frame::new(ip("10.1.0.1"), ip("10.1.0.2"), Transport::syn(43000, 80));
    assert!(dp.run(FromPod, &syn), "a's egress (not isolated)");
    assert!(dp.run(ToPod, &syn), "b's ingress (allowed)");
    let syn_ack = Frame::new(
        ip("10.1.0.2"),
        ip("10.1.0.1"),
        Transport::syn_ack(80, 43000),
    );
    let replies = dp.counter(Reason::Reply);
    assert!(dp.run(FromPod, &syn_ack), "b's reply leaves b");
    assert!(dp.run(ToPod, &syn_ack), "b's reply reaches a");
    assert_eq!(
        dp.counter(Reason::Reply),
        replies + 2,
        "both from conntrack"
    );
    // d -> b:80 passes d's egress (d is not isolated, so d keeps an entry) but b's
    // ingress drops it. b's SYN-ACK must not ride d's entry: b is egress-isolated and
    // has no connection to answer.
    let syn = Frame::new(ip("10.2.0.1"), ip("10.1.0.2"), Transport::syn(44000, 80));
    assert!(dp.run(FromPod, &syn), "d's egress (not isolated)");
    assert!(!dp.run(ToPod, &syn), "b's ingress does not allow d");
    let syn_ack = Frame::new(
        ip("10.1.0.2"),
        ip("10.2.0.1"),
        Transport::syn_ack(80, 44000),
    );
    assert!(
        !dp.run(FromPod, &syn_ack),
        "b never accepted this connection"
    );
}

#[test]
fn an_idle_connection_expires_after_its_timeout() {
    let Some(dp) = Loaded::new("ct-expiry", &[CLUSTER, POLICIES]) else {
        return;
    };
    let hz = dp.jiffies_hz();
    let mut ct: aya::maps::HashMap<_, netpol_common::CtKey4, netpol_common::CtValue> =
        aya::maps::HashMap::try_from(aya::maps::Map::LruHashMap(dp.pinned("CT4"))).unwrap();
    // a opens b:80; b's entry is aged by `idle_secs` before b answers. A connection
    // that has not seen its reply lives CT_TIMEOUT_TCP_OPENING_SECS (60 s).
    let mut answered_after = |port: u16, idle_secs: u64| {
        let syn = Frame::new(ip("10.1.0.1"), ip("10.1.0.2"), Transport::syn(port, 80));
        assert!(dp.run(ToPod, &syn));
        let key = ct
            .keys()
            .map(Result::unwrap)
            .find(|key| key.remote_port == port)
            .expect("b's entry for the connection");
        let mut entry = ct.get(&key, 0).unwrap();
        entry.last_seen_jiffies -= idle_secs * hz;
        ct.insert(key, entry, 0).unwrap();
        let syn_ack = Frame::new(ip("10.1.0.2"), ip("10.1.0.1"), Transport::syn_ack(80, port));
        dp.run(FromPod, &syn_ack)
    };
    assert!(answered_after(45000, 59), "59 s idle: still open");
    assert!(
        !answered_after(45001, 61),
        "61 s idle: expired, b may not open anything"
    );
}

#[test]
fn the_tick_rate_in_state_is_the_kernels() {
    let Some(dp) = Loaded::new("hz", &[CLUSTER]) else {
        return;
    };
    // Independently of the agent's measurement: /proc/timer_list shows jiffies and the
    // monotonic time; two snapshots 300 ms apart.
    let snapshot = || -> Option<(u64, u64)> {
        let text = std::fs::read_to_string("/proc/timer_list").ok()?;
        let now = text.lines().find_map(|l| {
            l.strip_prefix("now at ")?
                .strip_suffix(" nsecs")?
                .parse::<u64>()
                .ok()
        })?;
        let jiffies = text
            .lines()
            .find_map(|l| l.strip_prefix("jiffies: ")?.trim().parse::<u64>().ok())?;
        Some((jiffies, now))
    };
    let Some((j0, t0)) = snapshot() else {
        eprintln!("skipped: /proc/timer_list is not readable here");
        return;
    };
    std::thread::sleep(std::time::Duration::from_millis(300));
    let (j1, t1) = snapshot().expect("/proc/timer_list");
    let reference = (j1 - j0) as f64 * 1e9 / (t1 - t0) as f64;
    let hz = dp.jiffies_hz() as f64;
    assert!(
        (hz - reference).abs() <= reference * 0.05,
        "STATE says {hz} jiffies per second, /proc/timer_list {reference:.1}"
    );
}

#[test]
fn a_reset_closes_the_connection_for_new_syns_only() {
    let Some(dp) = Loaded::new("rst", &[CLUSTER, POLICIES]) else {
        return;
    };
    assert!(dp.run(
        ToPod,
        &Frame::new(ip("10.1.0.1"), ip("10.1.0.2"), Transport::syn(43000, 80))
    ));
    let rst = Transport::Tcp {
        sport: 80,
        dport: 43000,
        flags: netpol_common::TCP_RST | netpol_common::TCP_ACK,
    };
    assert!(dp.run(FromPod, &Frame::new(ip("10.1.0.2"), ip("10.1.0.1"), rst)));
    // After the reset b may not reuse the tuple to open a connection of its own.
    assert!(!dp.run(
        FromPod,
        &Frame::new(ip("10.1.0.2"), ip("10.1.0.1"), Transport::syn(80, 43000))
    ));
}

#[test]
fn node_traffic_and_non_ip_and_neighbour_discovery_pass() {
    let Some(dp) = Loaded::new("infra", &[CLUSTER, POLICIES]) else {
        return;
    };
    // kubelet probes from the node reach an ingress-isolated pod on any port.
    assert!(dp.run(
        ToPod,
        &Frame::new(ip(NODE_IP), ip("10.1.0.2"), Transport::syn(50000, 8081))
    ));
    assert!(dp.run(
        ToPod,
        &Frame::new(
            ip(NODE_IP),
            ip("10.1.0.2"),
            Transport::Udp {
                sport: 1,
                dport: 99
            }
        )
    ));
    assert!(dp.run_bytes(ToPod, &arp_frame()));
    // Neighbour solicitation to b's address, from the link.
    let ns = Frame::new(ip("fe80::1"), ip("fd00::2"), icmp(135)).with_hop_limit(255);
    assert!(dp.run(ToPod, &ns));
    assert!(dp.counter(Reason::NetworkControl) >= 1);
    assert!(dp.counter(Reason::FromHost) >= 2);
}

fn icmp(kind: u8) -> Transport {
    Transport::Icmp {
        kind,
        code: 0,
        id: 0,
    }
}

#[test]
fn neighbour_discovery_and_mld_pass_only_as_the_link_uses_them() {
    let Some(mut dp) = Loaded::new("nd", &[CLUSTER, POLICIES]) else {
        return;
    };
    // b is isolated both ways and allows no ICMPv6 from anyone.
    let nd = |src: &str, dst: &str, kind: u8, hops: u8| {
        Frame::new(ip(src), ip(dst), icmp(kind)).with_hop_limit(hops)
    };
    // Solicitations and advertisements on the link: hop limit 255, a link-local or
    // unspecified source or a link-local or multicast destination.
    assert!(dp.run(ToPod, &nd("fe80::1", "fd00::2", 135, 255)));
    assert!(dp.run(ToPod, &nd("fe80::1", "fd00::2", 136, 255)));
    assert!(dp.run(FromPod, &nd("fd00::2", "ff02::1:ff00:1", 135, 255)));
    assert!(dp.run(FromPod, &nd("fd00::2", "fe80::1", 136, 255)));
    assert!(dp.run(FromPod, &nd("::", "ff02::1:ff00:2", 135, 255)));
    assert_eq!(dp.counter(Reason::NetworkControl), 5);
    // A solicitation that was forwarded (hop limit below 255) is invalid where it
    // arrives (RFC 4861, 7.1).
    assert!(!dp.run(ToPod, &nd("fe80::1", "fd00::2", 135, 254)));
    assert_eq!(dp.counter(Reason::Malformed), 1);
    // The same types otherwise are judged like any other packet: b allows none of them.
    assert!(!dp.run(FromPod, &nd("fd00::2", "ff02::1:ff00:1", 135, 64)));
    // Between global unicast addresses from an interface bound to no pod (see
    // `neighbour_discovery_between_pods_of_a_bridge_passes_only_on_the_link`):
    assert!(!dp.run(FromPod, &nd("fd00::2", "fd00::1", 136, 255)));
    // An MLD report that is not link-local.
    assert!(!dp.run(FromPod, &nd("fd00::2", "ff02::16", 143, 1)));
    assert_eq!(dp.counter(Reason::NetworkControl), 5);
    assert_eq!(dp.counter(Reason::PolicyDenied), 3);

    // MLD from a link-local address on the veth bound to c: hop limit 1 to a group.
    let c = dp.endpoint_id("x/c");
    dp.datapath
        .as_mut()
        .unwrap()
        .bind_interface(TEST_RUN_IFINDEX, c)
        .unwrap();
    assert!(dp.run(FromPod, &nd("fe80::3", "ff02::16", 143, 1)));
    assert!(dp.run(FromPod, &nd("::", "ff02::16", 143, 1)));
    // With another hop limit it is no MLD the link needs: a link-local source may not
    // send it (nor anything else but ND and DHCP).
    assert!(!dp.run(FromPod, &nd("fe80::3", "ff02::16", 143, 64)));
    assert!(!dp.run(FromPod, &nd("fe80::3", "fd00::1", 128, 64)));
    assert_eq!(dp.counter(Reason::Spoofed), 2);
}

#[test]
fn neighbour_discovery_between_pods_of_a_bridge_passes_only_on_the_link() {
    let Some(mut dp) = Loaded::new("nd-bridge", &[CLUSTER, POLICIES]) else {
        return;
    };
    // b is isolated both ways and allows no ICMPv6; its veth is a port of the bridge a
    // shares. Pods of one bridge resolve each other's global addresses directly.
    let b = dp.endpoint_id("x/b");
    dp.datapath
        .as_mut()
        .unwrap()
        .bind_interface(TEST_RUN_IFINDEX, b)
        .unwrap();
    let nd = |src: &str, dst: &str, kind: u8, hops: u8| {
        Frame::new(ip(src), ip(dst), icmp(kind)).with_hop_limit(hops)
    };
    // b answers a's solicitation and checks a is still there, from its own address to a
    // pod of this node; a's messages arrive at b straight from the link.
    assert!(dp.run(FromPod, &nd("fd00::2", "fd00::1", 136, 255)));
    assert!(dp.run(FromPod, &nd("fd00::2", "fd00::1", 135, 255)));
    assert!(dp.run(ToPod, &nd("fd00::1", "fd00::2", 136, 255)));
    assert!(dp.run(ToPod, &nd("fd00::1", "fd00::2", 135, 255)));
    assert_eq!(dp.counter(Reason::NetworkControl), 4);
    // Routed on the way (hop limit lowered), the same message is invalid at b.
    assert!(!dp.run(ToPod, &nd("fd00::1", "fd00::2", 136, 254)));
    assert_eq!(dp.counter(Reason::Malformed), 1);
    // Towards an address that is no pod of this node it leaves the link: judged, and
    // b's egress allows nothing.
    assert!(!dp.run(FromPod, &nd("fd00::2", "fd00:77::1", 136, 255)));
    assert!(!dp.run(FromPod, &nd("fd00::2", "fd00::1", 136, 64)));
    assert_eq!(dp.counter(Reason::PolicyDenied), 2);
    // From another pod's address on b's veth: spoofed, never network control.
    assert!(!dp.run(FromPod, &nd("fd00::1", "fd00::2", 136, 255)));
    assert_eq!(dp.counter(Reason::Spoofed), 1);
    assert_eq!(dp.counter(Reason::NetworkControl), 4);
}

#[test]
fn link_local_sources_leave_a_pod_only_for_dhcp_and_neighbour_discovery() {
    let Some(mut dp) = Loaded::new("linklocal", &[CLUSTER]) else {
        return;
    };
    let c = dp.endpoint_id("x/c");
    dp.datapath
        .as_mut()
        .unwrap()
        .bind_interface(TEST_RUN_IFINDEX, c)
        .unwrap();
    let udp = |sport, dport| Transport::Udp { sport, dport };
    // Arbitrary traffic from a link-local or unspecified address is spoofed: it would
    // reach other pods unjudged by c's policy.
    assert!(!dp.run(
        FromPod,
        &Frame::new(ip("fe80::5"), ip("fd00::1"), Transport::syn(52000, 80))
    ));
    assert!(!dp.run(
        FromPod,
        &Frame::new(ip("169.254.3.3"), ip("10.2.0.1"), udp(5000, 53))
    ));
    assert!(!dp.run(
        FromPod,
        &Frame::new(ip("0.0.0.0"), ip("10.2.0.1"), udp(68, 53))
    ));
    assert_eq!(dp.counter(Reason::Spoofed), 3);
    // DHCP and DHCPv6 clients and neighbour discovery are how a pod gets an address.
    assert!(dp.run(
        FromPod,
        &Frame::new(ip("0.0.0.0"), ip("255.255.255.255"), udp(68, 67))
    ));
    assert!(dp.run(
        FromPod,
        &Frame::new(ip("fe80::5"), ip("ff02::1:2"), udp(546, 547))
    ));
    assert!(dp.run(
        FromPod,
        &Frame::new(ip("fe80::5"), ip("ff02::2"), icmp(133)).with_hop_limit(255)
    ));
    assert_eq!(dp.counter(Reason::Spoofed), 3);
}

#[test]
fn later_fragments_leaving_a_pod_carry_its_own_address() {
    let Some(mut dp) = Loaded::new("frag-spoof", &[CLUSTER]) else {
        return;
    };
    let c = dp.endpoint_id("x/c");
    dp.datapath
        .as_mut()
        .unwrap()
        .bind_interface(TEST_RUN_IFINDEX, c)
        .unwrap();
    let later = |src: &str, dst: &str| {
        let mut frame = Frame::new(ip(src), ip(dst), Transport::Udp { sport: 1, dport: 2 });
        if frame.src.is_ipv6() {
            frame.ipv6_ext = vec![Ipv6Ext::Fragment {
                offset: 185,
                more: false,
            }];
        } else {
            frame.ipv4_fragment_offset = 185;
        }
        frame
    };
    // c's own address: a later fragment passes (its first fragment was judged).
    assert!(dp.run(FromPod, &later("10.1.0.3", "10.2.0.1")));
    // Anyone else's, or no pod's, leaving c's veth: spoofed, as a first fragment is.
    assert!(!dp.run(FromPod, &later("10.1.0.1", "10.2.0.1")));
    assert!(!dp.run(FromPod, &later("10.9.9.9", "10.2.0.1")));
    assert!(!dp.run(FromPod, &later("fd00::1", "fd00::2")));
    assert!(!dp.run(FromPod, &later("fe80::3", "fd00::2")));
    assert_eq!(dp.counter(Reason::Spoofed), 4);
    // Towards a pod, later fragments are not the receiving veth's to vouch for.
    assert!(dp.run(ToPod, &later("10.2.0.1", "10.1.0.1")));
}

#[test]
fn ipv6_extension_headers_are_skipped() {
    let Some(dp) = Loaded::new("ext", &[CLUSTER, POLICIES]) else {
        return;
    };
    let mut frame = Frame::new(ip("fd00::1"), ip("fd00::2"), Transport::syn(44000, 85));
    frame.ipv6_ext = vec![
        Ipv6Ext::HopByHop,
        Ipv6Ext::DestinationOptions,
        Ipv6Ext::Routing,
        Ipv6Ext::Fragment {
            offset: 0,
            more: true,
        },
    ];
    assert!(
        dp.run(ToPod, &frame),
        "allowed port behind four extension headers"
    );
    let mut denied = Frame::new(ip("fd00::1"), ip("fd00::2"), Transport::syn(44001, 95));
    denied.ipv6_ext = vec![Ipv6Ext::HopByHop, Ipv6Ext::DestinationOptions];
    assert!(
        !dp.run(ToPod, &denied),
        "denied port behind extension headers"
    );
    // More extension headers than the parser follows: malformed, dropped.
    let mut long = Frame::new(ip("fd00::1"), ip("fd00::2"), Transport::syn(44002, 85));
    long.ipv6_ext = vec![Ipv6Ext::DestinationOptions; 9];
    assert!(!dp.run(ToPod, &long));
    assert!(dp.counter(Reason::Malformed) >= 1);
}

#[test]
fn fragments_and_malformed_packets() {
    let Some(dp) = Loaded::new("frag", &[CLUSTER, POLICIES]) else {
        return;
    };
    // A later fragment carries no ports; its first fragment was judged.
    let mut later = Frame::new(
        ip("10.2.0.1"),
        ip("10.1.0.2"),
        Transport::Udp { sport: 1, dport: 2 },
    );
    later.ipv4_fragment_offset = 185;
    assert!(dp.run(ToPod, &later));
    // Offset 1 (8 bytes) can only rewrite transport ports: dropped (RFC 1858).
    later.ipv4_fragment_offset = 1;
    assert!(!dp.run(ToPod, &later));
    // A truncated TCP header towards an endpoint is dropped...
    let mut short = Frame::new(ip("10.1.0.1"), ip("10.1.0.2"), Transport::syn(1, 80));
    short.truncate = Some(14 + 20 + 6);
    assert!(!dp.run(ToPod, &short));
    // ...and so is an IPv4 header claiming to be shorter than 20 bytes.
    let mut bad_ihl = Frame::new(ip("10.1.0.1"), ip("10.1.0.2"), Transport::syn(1, 80)).build();
    bad_ihl[14] = 0x44;
    assert!(!dp.run_bytes(ToPod, &bad_ihl));
    assert!(dp.counter(Reason::Malformed) >= 3);
}

#[test]
fn without_policies_everything_passes_and_decisions_follow_updates() {
    let Some(mut dp) = Loaded::new("update", &[CLUSTER]) else {
        return;
    };
    let syn = Frame::new(ip("10.1.0.3"), ip("10.1.0.2"), Transport::syn(45000, 81));
    assert!(dp.run(ToPod, &syn));
    assert!(dp.counter(Reason::NotIsolated) >= 1);
    // Apply the policies: a new connection from c to b is now denied.
    let compiled = compile::compile(&state(&[CLUSTER, POLICIES]), &Allocations::default());
    dp.datapath.as_mut().unwrap().sync_maps(&compiled).unwrap();
    let syn = Frame::new(ip("10.1.0.3"), ip("10.1.0.2"), Transport::syn(45001, 81));
    assert!(!dp.run(ToPod, &syn));
    assert!(dp.counter(Reason::PolicyDenied) >= 1);
    // And back.
    let compiled = compile::compile(&state(&[CLUSTER]), &compiled.allocations);
    dp.datapath.as_mut().unwrap().sync_maps(&compiled).unwrap();
    assert_eq!(
        dp.datapath.as_ref().unwrap().map_sizes().2,
        0,
        "no POLICY entries left"
    );
    let syn = Frame::new(ip("10.1.0.3"), ip("10.1.0.2"), Transport::syn(45002, 81));
    assert!(dp.run(ToPod, &syn));
}

#[test]
fn revoking_a_permission_stops_established_connections_and_keeps_the_rest() {
    let Some(mut dp) = Loaded::new("revoke", &[CLUSTER, POLICIES]) else {
        return;
    };
    // Two connections into b: a -> b:80 (to be revoked) and 192.168.0.1 -> b:53/UDP (kept).
    assert!(dp.run(
        ToPod,
        &Frame::new(ip("10.1.0.1"), ip("10.1.0.2"), Transport::syn(46000, 80))
    ));
    let dns = |src: &str, dst: &str, sport, dport| {
        Frame::new(ip(src), ip(dst), Transport::Udp { sport, dport })
    };
    assert!(dp.run(ToPod, &dns("192.168.0.1", "10.1.0.2", 6000, 53)));
    let generation = dp.datapath.as_ref().unwrap().generation();

    // The same policies, but a may now only use 8080.
    let narrowed = POLICIES.replace(
        "ports: [{protocol: TCP, port: 80, endPort: 90}]",
        "ports: [{protocol: TCP, port: 8080}]",
    );
    let compiled = compile::compile(&state(&[CLUSTER, &narrowed]), &Allocations::default());
    dp.datapath.as_mut().unwrap().sync_maps(&compiled).unwrap();
    assert_ne!(
        dp.datapath.as_ref().unwrap().generation(),
        generation,
        "a policy change bumps the generation"
    );

    // The revoked connection stops, replies included, and stays stopped.
    assert!(!dp.run(
        FromPod,
        &Frame::new(
            ip("10.1.0.2"),
            ip("10.1.0.1"),
            Transport::syn_ack(80, 46000)
        )
    ));
    assert!(!dp.run(
        ToPod,
        &Frame::new(ip("10.1.0.1"), ip("10.1.0.2"), Transport::ack(46000, 80))
    ));
    // The connection the new policy still allows goes on.
    assert!(dp.run(FromPod, &dns("10.1.0.2", "192.168.0.1", 53, 6000)));
    assert!(dp.run(ToPod, &dns("192.168.0.1", "10.1.0.2", 6000, 53)));
}

#[test]
fn drops_and_new_connections_are_reported_with_their_rule() {
    use netpol_common::{DIR_INGRESS, RULE_NONE, VerdictEvent};
    let Some(mut dp) = Loaded::new("events", &[CLUSTER, POLICIES]) else {
        return;
    };
    let mut events = dp
        .datapath
        .as_mut()
        .unwrap()
        .take_events()
        .expect("ring buffer");
    assert!(!dp.run(
        ToPod,
        &Frame::new(ip("10.1.0.3"), ip("10.1.0.2"), Transport::syn(47000, 80))
    ));
    assert!(dp.run(
        ToPod,
        &Frame::new(ip("10.1.0.1"), ip("10.1.0.2"), Transport::syn(47001, 85))
    ));
    // A reply of a known connection is not an event.
    assert!(dp.run(
        FromPod,
        &Frame::new(
            ip("10.1.0.2"),
            ip("10.1.0.1"),
            Transport::syn_ack(85, 47001)
        )
    ));

    let mut seen = Vec::new();
    while let Some(item) = events.next() {
        assert_eq!(item.len(), std::mem::size_of::<VerdictEvent>());
        // SAFETY: the kernel wrote a VerdictEvent; read_unaligned copes with alignment.
        seen.push(unsafe { std::ptr::read_unaligned(item.as_ptr().cast::<VerdictEvent>()) });
    }
    assert_eq!(seen.len(), 2, "{seen:?}");
    let b = dp
        .compiled
        .local_pods
        .iter()
        .find(|p| p.pod == ObjectRef::new("x", "b"))
        .unwrap();

    let denied = &seen[0];
    assert_eq!(denied.reason, Reason::PolicyDenied as u8);
    assert_eq!(denied.src, netpol_common::Addr::v4([10, 1, 0, 3]));
    assert_eq!(
        (denied.sport, denied.dport, denied.protocol),
        (47000, 80, 6)
    );
    assert_eq!(denied.direction, DIR_INGRESS);
    assert_eq!(denied.endpoint, b.endpoint_id);
    assert_eq!(denied.rule, RULE_NONE);
    assert_ne!(denied.peer_identity, 0, "the peer's identity was looked up");

    let allowed = &seen[1];
    assert_eq!(allowed.reason, Reason::PolicyAllowed as u8);
    let rule = &dp.compiled.rules[&allowed.rule];
    assert_eq!(
        rule.to_string(),
        "NetworkPolicy x/b-ingress spec.ingress[0]"
    );
    // The SYN and the SYN-ACK of that connection count for the rule.
    let counted = dp
        .datapath
        .as_ref()
        .unwrap()
        .rule_counter(allowed.rule)
        .unwrap();
    assert_eq!(counted.packets, 2);
    assert_eq!(
        dp.datapath.as_ref().unwrap().event_losses().unwrap(),
        (0, 0)
    );
}

#[test]
fn events_are_rate_limited_in_the_kernel() {
    let Some(mut dp) = Loaded::new("ratelimit", &[CLUSTER, POLICIES]) else {
        return;
    };
    let mut events = dp
        .datapath
        .as_mut()
        .unwrap()
        .take_events()
        .expect("ring buffer");
    let denied = Frame::new(ip("10.1.0.3"), ip("10.1.0.2"), Transport::syn(48000, 80)).build();
    // One BPF_PROG_TEST_RUN call runs the program 5,000 times on one CPU, far faster than
    // the bucket refills (2,000 per second, 1,000 at most in the bucket).
    let verdict = dp
        .datapath
        .as_ref()
        .unwrap()
        .test_run(ToPod, &denied, 5_000)
        .unwrap();
    assert!(!verdict.allowed());
    let mut received = 0u64;
    while events.next().is_some() {
        received += 1;
    }
    let (suppressed, lost) = dp.datapath.as_ref().unwrap().event_losses().unwrap();
    assert_eq!(lost, 0);
    assert_eq!(received + suppressed, 5_000);
    assert!(
        (1_000..1_200).contains(&received),
        "received {received} events"
    );
}

#[test]
fn counters_are_kept_per_direction() {
    use netpol_common::{DIR_EGRESS, DIR_INGRESS};
    let Some(dp) = Loaded::new("directions", &[CLUSTER, POLICIES]) else {
        return;
    };
    assert!(!dp.run(
        ToPod,
        &Frame::new(ip("10.1.0.3"), ip("10.1.0.2"), Transport::syn(49000, 80))
    ));
    assert!(!dp.run(
        FromPod,
        &Frame::new(ip("10.1.0.3"), ip("10.1.0.1"), Transport::syn(49001, 80))
    ));
    assert!(!dp.run(
        FromPod,
        &Frame::new(ip("10.1.0.3"), ip("10.1.0.2"), Transport::syn(49002, 80))
    ));
    let counters = dp
        .datapath
        .as_ref()
        .unwrap()
        .counters_by_direction()
        .unwrap();
    let denied = |direction| {
        counters
            .iter()
            .find(|(r, d, _)| *r == Reason::PolicyDenied && *d == direction)
            .unwrap()
            .2
            .packets
    };
    assert_eq!(denied(DIR_INGRESS), 1);
    assert_eq!(denied(DIR_EGRESS), 2);
}

#[test]
fn audit_mode_counts_and_reports_would_be_drops_but_lets_them_through() {
    use netpol_common::VerdictEvent;
    let audited = CLUSTER.replace(
        "metadata: {name: x, labels:",
        "metadata: {name: x, annotations: {netpol.dev/audit: \"true\"}, labels:",
    );
    assert_ne!(audited, CLUSTER, "the fixture has namespace x");
    let Some(mut dp) = Loaded::new("audit", &[&audited, POLICIES]) else {
        return;
    };
    let mut events = dp
        .datapath
        .as_mut()
        .unwrap()
        .take_events()
        .expect("ring buffer");
    // c -> b:80 is denied by b-ingress; in audit it passes, and so does the reply.
    assert!(dp.run(
        ToPod,
        &Frame::new(ip("10.1.0.3"), ip("10.1.0.2"), Transport::syn(50000, 80))
    ));
    assert!(dp.run(
        FromPod,
        &Frame::new(
            ip("10.1.0.2"),
            ip("10.1.0.3"),
            Transport::syn_ack(80, 50000)
        )
    ));
    assert_eq!(dp.counter(Reason::AuditAllowed), 1);
    assert_eq!(dp.counter(Reason::PolicyDenied), 0);
    let item = events.next().expect("an event for the would-be drop");
    // SAFETY: the kernel wrote a VerdictEvent.
    let event = unsafe { std::ptr::read_unaligned(item.as_ptr().cast::<VerdictEvent>()) };
    assert_eq!(event.reason, Reason::AuditAllowed as u8);
    assert_eq!(event.dport, 80);
}

#[test]
fn a_rule_id_given_to_another_rule_counts_from_zero() {
    let Some(mut dp) = Loaded::new("ruleids", &[CLUSTER, POLICIES]) else {
        return;
    };
    assert!(dp.run(
        ToPod,
        &Frame::new(ip("10.1.0.1"), ip("10.1.0.2"), Transport::syn(51000, 85))
    ));
    let (&id, _) = dp
        .compiled
        .rules
        .iter()
        .find(|(_, r)| r.to_string() == "NetworkPolicy x/b-ingress spec.ingress[0]")
        .unwrap();
    assert_eq!(
        dp.datapath
            .as_ref()
            .unwrap()
            .rule_counter(id)
            .unwrap()
            .packets,
        1
    );

    // b-ingress goes away and a new policy arrives: its rule takes the freed lowest id.
    let only_c = POLICIES.split("---").nth(1).unwrap();
    let newcomer = "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: a-open, namespace: x}\n\
                    spec: {podSelector: {matchLabels: {app: a}}, ingress: [{}]}\n";
    let compiled = compile::compile(
        &state(&[CLUSTER, only_c, newcomer]),
        &dp.compiled.allocations,
    );
    assert_eq!(
        compiled.rules[&id].to_string(),
        "NetworkPolicy x/a-open spec.ingress[0]"
    );
    dp.datapath.as_mut().unwrap().sync_maps(&compiled).unwrap();
    assert_eq!(
        dp.datapath
            .as_ref()
            .unwrap()
            .rule_counter(id)
            .unwrap()
            .packets,
        0,
        "the new rule starts at zero"
    );
}

/// BPF_PROG_TEST_RUN delivers packets on loopback (ifindex 1): tests bind it as if it
/// were a pod's veth.
const TEST_RUN_IFINDEX: u32 = 1;

#[test]
fn a_pod_cannot_leave_with_an_address_that_is_not_its_own() {
    let Some(mut dp) = Loaded::new("spoof", &[CLUSTER]) else {
        return;
    };
    // The veth is c's (endpoint 3 = the third local pod, in name order).
    let c = dp.endpoint_id("x/c");
    dp.datapath
        .as_mut()
        .unwrap()
        .bind_interface(TEST_RUN_IFINDEX, c)
        .unwrap();
    // Not an endpoint's address: dropped, even though no policy isolates anyone.
    assert!(!dp.run(
        FromPod,
        &Frame::new(ip("10.9.9.9"), ip("10.2.0.1"), Transport::syn(52000, 80))
    ));
    assert!(!dp.run(
        FromPod,
        &Frame::new(ip("fd00::99"), ip("fd00::1"), Transport::syn(52000, 80))
    ));
    assert_eq!(dp.counter(Reason::Spoofed), 2);
    // Link-local and unspecified sources are how ND and DHCP talk: they pass.
    assert!(dp.run(
        FromPod,
        &Frame::new(
            ip("fe80::5"),
            ip("ff02::2"),
            Transport::Udp {
                sport: 546,
                dport: 547
            }
        )
    ));
    assert!(dp.run(
        FromPod,
        &Frame::new(
            ip("0.0.0.0"),
            ip("255.255.255.255"),
            Transport::Udp {
                sport: 68,
                dport: 67
            }
        )
    ));
    // Towards a pod, an unknown destination is simply not ours to judge.
    assert!(dp.run(
        ToPod,
        &Frame::new(ip("10.2.0.1"), ip("10.9.9.9"), Transport::syn(52001, 80))
    ));
    // The pod's own address is fine.
    assert!(dp.run(
        FromPod,
        &Frame::new(ip("10.1.0.3"), ip("10.2.0.1"), Transport::syn(52002, 80))
    ));
}

#[test]
fn an_interface_the_agent_has_not_programmed_follows_the_default() {
    let Some(mut dp) = Loaded::new("unprogrammed", &[CLUSTER, POLICIES]) else {
        return;
    };
    // A pod the agent does not know yet (10.1.0.9) on an unbound veth.
    let unknown_out = Frame::new(ip("10.1.0.9"), ip("10.2.0.1"), Transport::syn(53000, 80));
    let unknown_in = Frame::new(ip("10.2.0.1"), ip("10.1.0.9"), Transport::syn(53001, 80));
    // allow: passed unjudged, both ways.
    dp.datapath
        .as_mut()
        .unwrap()
        .set_unprogrammed_default(false)
        .unwrap();
    assert!(dp.run(FromPod, &unknown_out));
    assert!(dp.run(ToPod, &unknown_in));
    // deny: dropped both ways, counted as unprogrammed.
    dp.datapath
        .as_mut()
        .unwrap()
        .set_unprogrammed_default(true)
        .unwrap();
    assert!(!dp.run(
        FromPod,
        &Frame::new(ip("10.1.0.9"), ip("10.2.0.1"), Transport::syn(53002, 80))
    ));
    assert!(!dp.run(
        ToPod,
        &Frame::new(ip("10.2.0.1"), ip("10.1.0.9"), Transport::syn(53003, 80))
    ));
    assert_eq!(dp.counter(Reason::Unprogrammed), 2);
    // A known pod whose veth is not bound yet (being programmed) gets its own policy,
    // whatever the default: b is isolated and allows a on TCP 80-90 only.
    assert!(dp.run(
        ToPod,
        &Frame::new(ip("10.1.0.1"), ip("10.1.0.2"), Transport::syn(53004, 80))
    ));
    assert!(!dp.run(
        ToPod,
        &Frame::new(ip("10.1.0.1"), ip("10.1.0.2"), Transport::syn(53005, 91))
    ));
    assert_eq!(dp.counter(Reason::Unprogrammed), 2);
    // A veth whose pod was refused (a map was full) drops everything, even traffic the
    // policy would allow.
    dp.datapath
        .as_mut()
        .unwrap()
        .bind_interface(TEST_RUN_IFINDEX, netpol_common::IFACE_REFUSED)
        .unwrap();
    assert!(!dp.run(
        ToPod,
        &Frame::new(ip("10.1.0.1"), ip("10.1.0.2"), Transport::syn(53006, 80))
    ));
    assert_eq!(dp.counter(Reason::Refused), 1);
}

#[test]
fn a_full_endpoints_map_leaves_the_newest_pods_unprogrammed() {
    // a and b have two addresses each, c and d one: room for a and b only.
    let capacities = Capacities {
        endpoints: Some(4),
        ..Capacities::default()
    };
    let Some(mut dp) = Loaded::with_capacities("full-endpoints", &[CLUSTER, POLICIES], &capacities)
    else {
        return;
    };
    let (c, d) = (dp.endpoint_id("x/c"), dp.endpoint_id("y/d"));
    let datapath = dp.datapath.as_mut().unwrap();
    let report = datapath.sync_maps(&dp.compiled).unwrap();
    let refused: Vec<u32> = report.refused.iter().filter_map(|r| r.endpoint()).collect();
    assert_eq!(refused, vec![c, d], "{:?}", report.refused);
    assert_eq!(datapath.map_sizes().0, 4);
    datapath.set_unprogrammed_default(true).unwrap();
    // c is not programmed: its packets are not judged by any policy but by the default.
    assert!(!dp.run(
        FromPod,
        &Frame::new(ip("10.1.0.3"), ip("10.2.0.1"), Transport::syn(54000, 80))
    ));
    assert_eq!(dp.counter(Reason::Unprogrammed), 1);
    // a and b are enforced as usual.
    assert!(dp.run(
        ToPod,
        &Frame::new(ip("10.1.0.1"), ip("10.1.0.2"), Transport::syn(54001, 80))
    ));
    assert!(!dp.run(
        ToPod,
        &Frame::new(ip("10.1.0.1"), ip("10.1.0.2"), Transport::syn(54002, 91))
    ));
}

/// b's ingress from a moves from TCP 80-90 to TCP 85-99 while neither POLICY nor
/// POLICY_RANGES has room for the new entries: b keeps only entries both versions share
/// (none of these ports, the prefixes differ), so it allows less than either version,
/// never more; the other endpoints' policies are untouched. Once room is made, the
/// change goes through.
#[test]
fn a_full_policy_map_narrows_the_changed_endpoint_and_nothing_else() {
    const WIDER: &str = r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: b-ingress, namespace: x}
spec:
  podSelector: {matchLabels: {app: b}}
  policyTypes: [Ingress, Egress]
  ingress:
    - from: [{podSelector: {matchLabels: {app: a}}}]
      ports: [{protocol: TCP, port: 85, endPort: 99}]
    - from: [{ipBlock: {cidr: 192.168.0.0/16, except: [192.168.1.0/24]}}, {ipBlock: {cidr: "fd00:99::/64", except: ["fd00:99::/96"]}}]
      ports: [{protocol: UDP, port: dns}]
    - from: [{namespaceSelector: {matchLabels: {team: blue}}}]
      ports: [{protocol: SCTP, port: 7}]
"#;
    // c also reaches TCP 1000-1100 of 172.16.0.0/12: port ranges of another endpoint.
    const C_RANGES: &str = r#"
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: c-ranges, namespace: x}
spec:
  podSelector: {matchLabels: {app: c}}
  policyTypes: [Egress]
  egress:
    - to: [{ipBlock: {cidr: 172.16.0.0/12}}]
      ports: [{protocol: TCP, port: 1000, endPort: 1100}]
"#;
    let c_egress = POLICIES.split("---").nth(1).unwrap();
    // Exactly the room the original policies need, in each of the two maps.
    let original = compile::compile(
        &state(&[CLUSTER, POLICIES, C_RANGES]),
        &Allocations::default(),
    );
    let ranges = original
        .policy
        .keys()
        .filter(|k| matches!(policy_maps::slot(k), policy_maps::Slot::Ranges(_)))
        .count() as u32;
    let exact = original.policy.len() as u32 - ranges;
    let capacities = Capacities {
        policy: Some(exact),
        policy_ranges: Some(ranges),
        ..Capacities::default()
    };
    let Some(mut dp) =
        Loaded::with_capacities("full-policy", &[CLUSTER, POLICIES, C_RANGES], &capacities)
    else {
        return;
    };
    let syn = |port: u16| {
        Frame::new(
            ip("10.1.0.1"),
            ip("10.1.0.2"),
            Transport::syn(55000 + port, port),
        )
    };
    let c_to_d =
        |sport: u16| Frame::new(ip("10.1.0.3"), ip("10.2.0.1"), Transport::syn(sport, 9090));
    assert!(dp.run(ToPod, &syn(85)));

    let wider = compile::compile(
        &state(&[CLUSTER, WIDER, &format!("---{c_egress}"), C_RANGES]),
        &dp.compiled.allocations,
    );
    let b = dp.endpoint_id("x/b");
    let report = dp.datapath.as_mut().unwrap().sync_maps(&wider).unwrap();
    // 85..=99 is port 85 exactly and three port prefixes (80..=90 was two and port 90).
    // The first round narrows b to what both versions share, which frees b's old
    // entries; in the second, POLICY has room for port 85 but POLICY_RANGES, with room
    // for two, cannot take three new prefixes.
    assert_eq!(
        report.refused,
        vec![netpol_agent::datapath::Refusal::Policy {
            id: b,
            map: netpol_common::names::POLICY_RANGES,
            capacity: ranges
        }]
    );
    for (port, old, new) in [(80, true, false), (85, true, true), (95, false, true)] {
        assert!(
            !dp.run(ToPod, &syn(port)),
            "port {port} (old policy: {old}, new: {new}) must be closed while refused"
        );
    }
    // Other rules of b and other endpoints keep their state: c still reaches d's web.
    assert!(dp.run(FromPod, &c_to_d(56000)));
    // The same compiled map again: the kernel holds less than it (narrowed), so it is
    // compared again, not taken as written, and refused the same way.
    let again = dp.datapath.as_mut().unwrap().sync_maps(&wider).unwrap();
    assert_eq!(again.refused, report.refused);
    assert!(!dp.run(ToPod, &syn(95)));

    // Without c's policies there is room in both maps: the change goes through as written.
    let room = compile::compile(&state(&[CLUSTER, WIDER]), &wider.allocations);
    let report = dp.datapath.as_mut().unwrap().sync_maps(&room).unwrap();
    assert!(report.refused.is_empty(), "{:?}", report.refused);
    for (port, allowed) in [
        (80, false),
        (85, true),
        (95, true),
        (99, true),
        (100, false),
    ] {
        assert_eq!(dp.run(ToPod, &syn(port)), allowed, "port {port}");
    }
}

#[test]
fn pins_of_maps_this_build_does_not_define_or_changed_are_replaced_at_load() {
    if !nix::unistd::Uid::effective().is_root() {
        eprintln!("skipped: loading programs needs root (run via `cargo xtask test`)");
        return;
    }
    /// Removes the bpffs directory however the test ends.
    struct RemoveDir(PathBuf);
    impl Drop for RemoveDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
    let dir = RemoveDir(PathBuf::from(format!(
        "/sys/fs/bpf/netpol-verdict-pins-{}",
        std::process::id()
    )));
    let maps = dir.0.join("maps");
    let first = Datapath::open(&dir.0, &Capacities::default()).expect("load programs");
    // Every map the object pins has the layout the agent checks pins against.
    let layouts = netpol_agent::datapath::map_layouts();
    let layout_of = |name: &str| {
        let info = aya::maps::MapInfo::from_pin(maps.join(name)).expect("pinned map");
        (info.map_type().ok(), info.key_size(), info.value_size())
    };
    let mut pinned: Vec<String> = std::fs::read_dir(&maps)
        .expect("maps directory")
        .map(|entry| entry.unwrap().file_name().into_string().unwrap())
        .collect();
    pinned.sort();
    let mut known: Vec<String> = layouts.iter().map(|l| l.0.to_owned()).collect();
    known.sort();
    assert_eq!(pinned, known, "pinned maps vs the layout table");
    for (name, map_type, key, value) in layouts {
        assert_eq!(layout_of(name), (Some(map_type), key, value), "{name}");
    }
    // What an older build leaves behind: a pinned map under a name this build does not
    // define (the single conntrack map `CT` became CT4 and CT6), and one whose layout
    // changed (STATE grew from 8 to 16 bytes): here IFACES pinned as STATE.
    let older = aya::maps::MapData::from_pin(maps.join("COUNTERS")).expect("open a pinned map");
    older
        .pin(maps.join("CT"))
        .expect("pin it under an old name");
    std::fs::remove_file(maps.join("STATE")).unwrap();
    let ifaces = aya::maps::MapData::from_pin(maps.join("IFACES")).expect("open a pinned map");
    ifaces.pin(maps.join("STATE")).expect("pin it as STATE");
    drop(first); // keeps every pin, as an agent that exits with `--on-exit keep`
    let second = Datapath::open(&dir.0, &Capacities::default()).expect("adopt the pins");
    assert!(!maps.join("CT").exists(), "the old map's pin is gone");
    assert_eq!(
        layout_of("STATE"),
        (Some(aya::maps::MapType::Array), 4, 16),
        "STATE was replaced by one of this build's layout"
    );
    for name in ["CT4", "CT6", "COUNTERS", "ENDPOINTS", "IFACES"] {
        assert!(maps.join(name).exists(), "{name} is still pinned");
    }
    second.shutdown();
}

/// A change that moves a few addresses reaches the kernel by the IPCACHE and POLICY keys
/// it changed (the kernel holds the versions the compiler changed): afterwards the kernel
/// holds exactly the compiled maps, and the verdicts follow.
#[test]
fn a_change_reaches_the_kernel_by_the_keys_it_changed() {
    let Some(mut dp) = Loaded::new("ipcache-keys", &[CLUSTER, POLICIES]) else {
        return;
    };
    let a_to_b = Frame::new(ip("10.1.0.1"), ip("10.1.0.2"), Transport::syn(55085, 85));
    let mut compiler = compile::Compiler::new();
    let first = compiler.compile(&state(&[CLUSTER, POLICIES]));
    dp.datapath.as_mut().unwrap().sync_maps(&first).unwrap();
    assert!(dp.run(ToPod, &a_to_b));
    let slots_before = slots(&dp);
    // a is no longer app a: b's rule for app a no longer admits it.
    let relabelled = CLUSTER.replace("labels: {app: a}", "labels: {app: z}");
    let second = compiler.compile(&state(&[&relabelled, POLICIES]));
    let changed = second
        .ipcache
        .changes_since(first.ipcache.version())
        .expect("the compiler made it from the first");
    let a_keys = [
        compile::host_key(ip("10.1.0.1")),
        compile::host_key(ip("fd00::1")),
    ];
    assert_eq!(changed, a_keys, "a's two addresses, nothing else");
    // b's entries for a's identity go.
    let policy_changed = second.policy.changes_since(first.policy.version());
    assert!(policy_changed.is_some_and(|keys| !keys.is_empty()));
    dp.datapath.as_mut().unwrap().sync_maps(&second).unwrap();
    let (kernel, _) = netpol_agent::datapath::inspect::read_maps(&dp.dir).unwrap();
    assert_eq!(kernel.ipcache, second.ipcache);
    assert_eq!(kernel.policy, second.policy);
    assert!(!dp.run(ToPod, &a_to_b));
    // a's addresses moved to another identity in PEERS: IPCACHE was not written.
    assert_ne!(
        a_keys.map(|key| first.ipcache.get(&key)),
        a_keys.map(|key| second.ipcache.get(&key)),
        "a was renumbered"
    );
    assert_eq!(slots(&dp), slots_before, "every prefix kept its slot");
    // And back: the kernel follows the keys again.
    let third = compiler.compile(&state(&[CLUSTER, POLICIES]));
    assert_eq!(
        third.ipcache.changes_since(second.ipcache.version()),
        Some(&a_keys[..])
    );
    dp.datapath.as_mut().unwrap().sync_maps(&third).unwrap();
    let (kernel, _) = netpol_agent::datapath::inspect::read_maps(&dp.dir).unwrap();
    assert_eq!(kernel.ipcache, third.ipcache);
    assert_eq!(kernel.policy, third.policy);
    assert!(dp.run(ToPod, &a_to_b));
}

/// IPCACHE as the kernel holds it: each prefix's slot in PEERS.
fn slots(dp: &Loaded) -> std::collections::BTreeMap<(u32, netpol_common::Addr), u32> {
    use aya::maps::{LpmTrie, Map, MapData};
    let pin = dp.dir.join("maps").join(netpol_common::names::IPCACHE);
    let trie: LpmTrie<MapData, netpol_common::Addr, u32> =
        LpmTrie::try_from(Map::LpmTrie(MapData::from_pin(pin).unwrap())).unwrap();
    trie.iter()
        .map(|entry| {
            let (key, slot) = entry.unwrap();
            ((key.prefix_len(), key.data()), slot)
        })
        .collect()
}

/// A prefix's slot freed by one sync is handed out again only by a later one: a packet
/// that read it from IPCACHE just before the prefix went may still load it, and must
/// not find another prefix's identity there. Nor is it lost: the next sync reuses it.
#[test]
fn a_slot_freed_in_one_sync_is_reused_only_in_a_later_one() {
    let Some(mut dp) = Loaded::new("peer-slots", &[]) else {
        return;
    };
    let host = |last: u8, identity: u32| {
        let key = compile::host_key(ip(&format!("10.9.0.{last}")));
        (key, netpol_common::PeerInfo { identity, flags: 0 })
    };
    let sync =
        |dp: &mut Loaded,
         entries: &[(compile::Lpm<netpol_common::Addr>, netpol_common::PeerInfo)]| {
            let compiled = compile::Compiled {
                ipcache: entries
                    .iter()
                    .copied()
                    .collect::<std::collections::BTreeMap<_, _>>()
                    .into(),
                ..compile::Compiled::default()
            };
            dp.datapath.as_mut().unwrap().sync_maps(&compiled).unwrap();
        };
    let slot_of = |dp: &Loaded, last: u8| {
        let key = compile::host_key(ip(&format!("10.9.0.{last}")));
        slots(dp)[&(key.prefix_len, key.data)]
    };
    sync(&mut dp, &[host(1, 7), host(2, 8)]);
    let freed = slot_of(&dp, 2);
    // 2 goes and 3 comes in the same sync: 3 gets another slot.
    sync(&mut dp, &[host(1, 7), host(3, 9)]);
    assert_ne!(slot_of(&dp, 3), freed, "reused in the sync that freed it");
    assert_ne!(slot_of(&dp, 3), slot_of(&dp, 1));
    // The next sync hands it out again.
    sync(&mut dp, &[host(1, 7), host(3, 9), host(4, 10)]);
    assert_eq!(slot_of(&dp, 4), freed, "the freed slot was not reused");
    let (kernel, _) = netpol_agent::datapath::inspect::read_maps(&dp.dir).unwrap();
    let want: std::collections::BTreeMap<_, _> =
        [host(1, 7), host(3, 9), host(4, 10)].into_iter().collect();
    assert_eq!(*kernel.ipcache, want);
}

/// POLICY written in batches: a batch that fails part of the way (the map filled up
/// behind the agent's back) leaves the agent knowing what the kernel took, so a later
/// sync removes those entries too; removing keys the kernel no longer has is no error.
#[test]
fn a_batch_that_fails_half_way_leaves_no_entry_unknown() {
    use aya::maps::{HashMap, Map, MapData};
    use netpol_common::{PolicyKey, PolicyValue};
    const CAPACITY: u32 = 64;
    let capacities = Capacities {
        policy: Some(CAPACITY),
        ..Capacities::default()
    };
    let Some(mut dp) = Loaded::with_capacities("policy-batch", &[], &capacities) else {
        return;
    };
    // Twenty exact entries of endpoint 1.
    let entries: std::collections::BTreeMap<_, _> = (0..20)
        .map(|identity| {
            let key = PolicyKey {
                endpoint: 1,
                identity: 100 + identity,
                direction: netpol_common::DIR_INGRESS,
                protocol: netpol_common::PROTO_TCP,
                port: 80u16.to_be_bytes(),
            };
            let key = compile::Lpm::new(netpol_common::POLICY_PREFIX_FULL, key);
            assert!(matches!(
                policy_maps::slot(&key),
                policy_maps::Slot::Policy(_)
            ));
            (
                key,
                PolicyValue {
                    rule: identity,
                    ..PolicyValue::default()
                },
            )
        })
        .collect();
    let compiled = compile::Compiled {
        policy: entries.into(),
        ..compile::Compiled::default()
    };
    // Someone else's entries fill POLICY but for a few.
    let pin = dp.dir.join("maps").join(netpol_common::names::POLICY);
    let mut policy: HashMap<MapData, PolicyKey, PolicyValue> =
        HashMap::try_from(Map::HashMap(MapData::from_pin(&pin).unwrap())).unwrap();
    let filler = |i: u32| PolicyKey {
        endpoint: 4000 + i,
        ..PolicyKey::default()
    };
    let fillers = CAPACITY - 3;
    for i in 0..fillers {
        policy.insert(filler(i), PolicyValue::default(), 0).unwrap();
    }
    let full = dp.datapath.as_mut().unwrap().sync_maps(&compiled);
    assert!(full.is_err(), "POLICY was full");
    // The others' entries go; a sync to no policy at all must leave POLICY empty,
    // including the entries the failed batch wrote before it stopped.
    for i in 0..fillers {
        policy.remove(&filler(i)).unwrap();
    }
    let none = compile::Compiled::default();
    dp.datapath.as_mut().unwrap().sync_maps(&none).unwrap();
    let left: Vec<PolicyKey> = policy.keys().map(Result::unwrap).collect();
    assert_eq!(left, Vec::new(), "entries the agent lost track of");
}

/// IPCACHE written in batches: a batch that fails part of the way (IPCACHE filled up
/// behind the agent's back) hands back the slots it took for prefixes the kernel did
/// not take, so once there is room again every prefix gets one and resolves as
/// compiled.
#[test]
fn an_ipcache_batch_that_fails_half_way_loses_no_slot() {
    use aya::maps::{LpmTrie, Map, MapData, lpm_trie::Key};
    const CAPACITY: u32 = 32;
    let capacities = Capacities {
        ipcache: Some(CAPACITY),
        ..Capacities::default()
    };
    let Some(mut dp) = Loaded::with_capacities("ipcache-batch", &[], &capacities) else {
        return;
    };
    let host = |last: u8| compile::host_key(ip(&format!("10.9.0.{last}")));
    let compiled = compile::Compiled {
        ipcache: (1..=20)
            .map(|last| {
                (
                    host(last),
                    netpol_common::PeerInfo {
                        identity: 100 + u32::from(last),
                        flags: 0,
                    },
                )
            })
            .collect::<std::collections::BTreeMap<_, _>>()
            .into(),
        ..compile::Compiled::default()
    };
    // Someone else's prefixes fill IPCACHE but for a few.
    let pin = dp.dir.join("maps").join(netpol_common::names::IPCACHE);
    let mut trie: LpmTrie<MapData, netpol_common::Addr, u32> =
        LpmTrie::try_from(Map::LpmTrie(MapData::from_pin(&pin).unwrap())).unwrap();
    let filler = |last: u8| {
        let key = compile::host_key(ip(&format!("10.200.0.{last}")));
        Key::new(key.prefix_len, key.data)
    };
    let fillers = CAPACITY as u8 - 3;
    for last in 0..fillers {
        trie.insert(&filler(last), CAPACITY - 1, 0).unwrap();
    }
    assert!(
        dp.datapath.as_mut().unwrap().sync_maps(&compiled).is_err(),
        "IPCACHE was full"
    );
    for last in 0..fillers {
        trie.remove(&filler(last)).unwrap();
    }
    dp.datapath.as_mut().unwrap().sync_maps(&compiled).unwrap();
    let (kernel, _) = netpol_agent::datapath::inspect::read_maps(&dp.dir).unwrap();
    assert_eq!(kernel.ipcache, compiled.ipcache);
}

/// The agent maps PEERS only as far as the slots in use reach, growing the mapping as
/// prefixes come: 20,000 prefixes (beyond the first chunks) are stored where the
/// programs find them, when they come and when all of them move at once.
#[test]
fn prefixes_beyond_the_first_mapped_slots_resolve_as_compiled() {
    let Some(mut dp) = Loaded::new("peers-grow", &[]) else {
        return;
    };
    let ipcache = |shift: u32| -> std::collections::BTreeMap<_, _> {
        (0..20_000u32)
            .map(|n| {
                let key = compile::host_key(IpAddr::from([10, 50, (n >> 8) as u8, n as u8]));
                let info = netpol_common::PeerInfo {
                    identity: 100 + (n + shift) % 7,
                    flags: 0,
                };
                (key, info)
            })
            .collect()
    };
    for shift in [0, 1] {
        let compiled = compile::Compiled {
            ipcache: ipcache(shift).into(),
            ..compile::Compiled::default()
        };
        dp.datapath.as_mut().unwrap().sync_maps(&compiled).unwrap();
        let (kernel, _) = netpol_agent::datapath::inspect::read_maps(&dp.dir).unwrap();
        assert_eq!(kernel.ipcache, compiled.ipcache, "shift {shift}");
    }
}

/// IPCACHE names slots of PEERS: pinned without it (or with a PEERS of another
/// capacity), its slots would resolve to nothing or to other prefixes, so both are
/// created afresh, and the first sync writes every prefix again.
#[test]
fn an_ipcache_pinned_without_its_peers_is_replaced_with_them() {
    let Some(mut dp) = Loaded::new("unpaired-peers", &[CLUSTER, POLICIES]) else {
        return;
    };
    let a_to_b = Frame::new(ip("10.1.0.1"), ip("10.1.0.2"), Transport::syn(55085, 85));
    assert!(dp.run(ToPod, &a_to_b));
    let maps = dp.dir.join("maps");
    let peers = maps.join(netpol_common::names::PEERS);
    let trie = aya::maps::MapInfo::from_pin(maps.join(netpol_common::names::IPCACHE))
        .unwrap()
        .id();
    std::fs::remove_file(&peers).unwrap();
    // Keeps every pin, as an agent that exits with `--on-exit keep`.
    drop(dp.datapath.take());
    dp.datapath = Some(Datapath::open(&dp.dir, &Capacities::default()).expect("adopt the pins"));
    let replaced = aya::maps::MapInfo::from_pin(maps.join(netpol_common::names::IPCACHE))
        .unwrap()
        .id();
    assert_ne!(trie, replaced, "IPCACHE was adopted without its PEERS");
    assert!(peers.exists());
    let (kernel, _) = netpol_agent::datapath::inspect::read_maps(&dp.dir).unwrap();
    assert!(kernel.ipcache.is_empty());
    let compiled = dp.compiled.clone();
    dp.datapath.as_mut().unwrap().sync_maps(&compiled).unwrap();
    let (kernel, _) = netpol_agent::datapath::inspect::read_maps(&dp.dir).unwrap();
    assert_eq!(kernel.ipcache, compiled.ipcache);
    assert!(dp.run(ToPod, &a_to_b));
}

/// IPCACHE full: a new pod's address is left out (it resolves to the world, which b's
/// rule for app a does not admit), and once another pod's removal makes room, the next
/// sync writes it although it is not among the keys that change then: the kernel held
/// less than the compiled map, so the whole map is compared.
#[test]
fn an_address_left_out_of_a_full_ipcache_is_written_once_room_is_made() {
    const E: &str = r#"
---
apiVersion: v1
kind: Pod
metadata: {name: e, namespace: x, labels: {app: a}}
spec: {containers: [{name: c}]}
status: {podIP: 10.1.0.9}
"#;
    let full = compile::compile(&state(&[CLUSTER, POLICIES]), &Allocations::default());
    let capacities = Capacities {
        ipcache: Some(full.ipcache.len() as u32),
        ..Capacities::default()
    };
    let Some(mut dp) = Loaded::with_capacities("ipcache-full", &[CLUSTER, POLICIES], &capacities)
    else {
        return;
    };
    let e_to_b = Frame::new(ip("10.1.0.9"), ip("10.1.0.2"), Transport::syn(55085, 85));
    let mut compiler = compile::Compiler::new();
    let cluster = format!("{CLUSTER}{E}");
    let first = compiler.compile(&state(&[&cluster, POLICIES]));
    let report = dp.datapath.as_mut().unwrap().sync_maps(&first).unwrap();
    assert_eq!(
        report.refused,
        vec![netpol_agent::datapath::Refusal::Peer {
            addr: compile::addr(ip("10.1.0.9")),
            capacity: full.ipcache.len() as u32,
        }]
    );
    assert!(!dp.run(ToPod, &e_to_b), "e's address is not known yet");
    // d goes: its address makes room.
    let without_d = cluster.replace("name: d, namespace: y", "name: d, namespace: gone");
    let without_d: String = without_d
        .split("---")
        .filter(|doc| !doc.contains("namespace: gone"))
        .collect::<Vec<_>>()
        .join("---");
    let second = compiler.compile(&state(&[&without_d, POLICIES]));
    let e_key = compile::host_key(ip("10.1.0.9"));
    let changed = second.ipcache.changes_since(first.ipcache.version());
    assert!(changed.is_some_and(|keys| !keys.contains(&e_key)));
    let report = dp.datapath.as_mut().unwrap().sync_maps(&second).unwrap();
    assert!(report.refused.is_empty(), "{:?}", report.refused);
    let (kernel, _) = netpol_agent::datapath::inspect::read_maps(&dp.dir).unwrap();
    assert_eq!(kernel.ipcache, second.ipcache);
    assert!(dp.run(ToPod, &e_to_b));
}

/// A Service address of the tests (a ClusterIP), and its port.
const SERVICE_IP: &str = "10.96.0.10";
const SERVICE_PORT: u16 = 10080;
const NODE_PORT: u16 = 30080;
const MARK: u32 = netpol_common::SERVICE_MARK_DEFAULT;

/// The cluster with SERVICE_IP known as a Service address and NODE_PORT as a node port
/// (as the compiler marks them; kube-proxy's translation is what the tests play).
fn with_services(tag: &str, manifests: &[&str]) -> Option<Loaded> {
    let mut dp = Loaded::new(tag, manifests)?;
    let mut compiled = compile::compile(&state(manifests), &Allocations::default());
    add_service_addresses(&mut compiled);
    dp.datapath.as_mut().unwrap().sync_maps(&compiled).unwrap();
    dp.compiled = compiled;
    Some(dp)
}

fn add_service_addresses(compiled: &mut compile::Compiled) {
    let mut ipcache = (*compiled.ipcache).clone();
    ipcache.insert(
        compile::host_key(ip(SERVICE_IP)),
        netpol_common::PeerInfo {
            identity: netpol_common::IDENTITY_WORLD,
            flags: netpol_common::PEER_SERVICE,
        },
    );
    compiled.ipcache = ipcache.into();
    compiled.node_ports.insert(netpol_common::ServicePort {
        port: NODE_PORT,
        protocol: netpol_common::PROTO_TCP,
        _pad: 0,
    });
}

impl Loaded {
    /// Runs `hook` on a packet carrying `mark`: (allowed, the mark the program left).
    fn run_marked(&self, hook: HookKind, frame: &Frame, mark: u32) -> (bool, u32) {
        let verdict = self
            .datapath
            .as_ref()
            .unwrap()
            .test_run_marked(hook, &frame.build(), 1, mark)
            .expect("test run");
        (verdict.allowed(), verdict.mark)
    }
}

#[test]
fn a_connection_to_a_service_is_judged_on_the_backend_after_translation() {
    let Some(dp) = with_services("svc", &[CLUSTER, POLICIES]) else {
        return;
    };
    // c may reach namespace y on its named port web (d: 9090), nothing in x.
    let to_service = Frame::new(
        ip("10.1.0.3"),
        ip(SERVICE_IP),
        Transport::syn(47000, SERVICE_PORT),
    );
    assert_eq!(
        dp.run_marked(FromPod, &to_service, 0),
        (true, MARK),
        "from_pod lets the connection to the Service through, marked"
    );
    // The model agrees, here and for a pod that is not egress-isolated.
    let defers = |src: &str| {
        compile::model::defers_to_service(
            &dp.compiled,
            ip(src),
            ip(SERVICE_IP),
            netpol_common::PROTO_TCP,
            SERVICE_PORT,
        )
    };
    assert!(defers("10.1.0.3"));
    assert!(!defers("10.1.0.1"));
    // kube-proxy chose d: allowed (veth scrubs the mark on the way into d).
    let to_d = Frame::new(ip("10.1.0.3"), ip("10.2.0.1"), Transport::syn(47000, 9090));
    assert!(dp.run_marked(ToPod, &to_d, MARK).0);
    // kube-proxy chose a (not isolated, so its ingress allows anything): c's egress
    // does not allow a, so the connection is dropped...
    let to_a = Frame::new(ip("10.1.0.3"), ip("10.1.0.1"), Transport::syn(47001, 9090));
    assert!(!dp.run_marked(ToPod, &to_a, MARK).0);
    // ...which only the mark decides: the same packet unmarked is a's ingress alone.
    assert!(dp.run_marked(ToPod, &to_a, 0).0);
    // The port compared is the backend's (target) port, not the Service's.
    let to_d_service_port = Frame::new(
        ip("10.1.0.3"),
        ip("10.2.0.1"),
        Transport::syn(47002, SERVICE_PORT),
    );
    assert!(!dp.run_marked(ToPod, &to_d_service_port, MARK).0);
    // The connection to d goes on: marked packets of it, and the replies both ways.
    assert!(
        dp.run_marked(
            ToPod,
            &Frame::new(ip("10.1.0.3"), ip("10.2.0.1"), Transport::ack(47000, 9090)),
            MARK
        )
        .0
    );
    assert!(dp.run(
        FromPod,
        &Frame::new(
            ip("10.2.0.1"),
            ip("10.1.0.3"),
            Transport::syn_ack(9090, 47000)
        )
    ));
    let reply = Frame::new(
        ip(SERVICE_IP),
        ip("10.1.0.3"),
        Transport::syn_ack(SERVICE_PORT, 47000),
    );
    assert!(dp.run(ToPod, &reply), "the un-translated reply reaches c");
    // Every later packet of c's connection to the Service carries the mark.
    let ack = Frame::new(
        ip("10.1.0.3"),
        ip(SERVICE_IP),
        Transport::ack(47000, SERVICE_PORT),
    );
    assert_eq!(dp.run_marked(FromPod, &ack, 0), (true, MARK));
}

#[test]
fn a_pod_that_is_not_egress_isolated_pays_nothing_for_services() {
    let Some(dp) = with_services("svc-free", &[CLUSTER, POLICIES]) else {
        return;
    };
    let to_service = Frame::new(
        ip("10.1.0.1"),
        ip(SERVICE_IP),
        Transport::syn(47100, SERVICE_PORT),
    );
    assert_eq!(dp.run_marked(FromPod, &to_service, 0), (true, 0));
}

#[test]
fn leave_node_judges_marked_connections_to_backends_elsewhere() {
    use HookKind::LeaveNode;
    let Some(dp) = with_services("svc-leave", &[CLUSTER, POLICIES]) else {
        return;
    };
    // c may reach 172.16.0.0/12, nothing else outside.
    let allowed = Frame::new(ip("10.1.0.3"), ip("172.16.5.5"), Transport::syn(47200, 443));
    let denied = Frame::new(ip("10.1.0.3"), ip("8.8.8.8"), Transport::syn(47201, 443));
    assert_eq!(dp.run_marked(LeaveNode, &allowed, MARK), (true, 0));
    assert!(!dp.run_marked(LeaveNode, &denied, MARK).0);
    // Unmarked traffic on an exit device is not ours: it passes untouched.
    assert_eq!(dp.run_marked(LeaveNode, &denied, 0x4000), (true, 0x4000));
    // The allowed connection goes on from conntrack.
    let ack = Frame::new(ip("10.1.0.3"), ip("172.16.5.5"), Transport::ack(47200, 443));
    assert!(dp.run_marked(LeaveNode, &ack, MARK).0);
    // A marked packet whose source is no longer a pod (masqueraded by something other
    // than kube-proxy's hairpin rule) cannot be judged: dropped, never let through.
    let masqueraded = Frame::new(ip(NODE_IP), ip("172.16.5.5"), Transport::syn(47202, 443));
    assert!(!dp.run_marked(LeaveNode, &masqueraded, MARK).0);
    assert!(dp.counter(Reason::Masqueraded) >= 1);
}

#[test]
fn a_pod_reaching_itself_through_its_service_is_never_blocked() {
    let Some(dp) = with_services("svc-hairpin", &[CLUSTER, POLICIES]) else {
        return;
    };
    // b denies all egress and admits TCP 80 from a only.
    let to_service = Frame::new(
        ip("10.1.0.2"),
        ip(SERVICE_IP),
        Transport::syn(47300, SERVICE_PORT),
    );
    assert_eq!(dp.run_marked(FromPod, &to_service, 0), (true, MARK));
    let to_itself = Frame::new(ip("10.1.0.2"), ip("10.1.0.2"), Transport::syn(47300, 22));
    assert!(dp.run_marked(ToPod, &to_itself, MARK).0);
    assert!(dp.counter(Reason::Hairpin) >= 1);
    // Another pod on that port is still b's ingress decision.
    let from_c = Frame::new(ip("10.1.0.3"), ip("10.1.0.2"), Transport::syn(47301, 22));
    assert!(!dp.run_marked(ToPod, &from_c, 0).0);
    // A policy change re-checks the connection, and it is still b's own.
    let narrowed = POLICIES.replace("port: 80, endPort: 90", "port: 81, endPort: 90");
    let mut compiled = compile::compile(&state(&[CLUSTER, &narrowed]), &Allocations::default());
    add_service_addresses(&mut compiled);
    let mut dp = dp;
    dp.datapath.as_mut().unwrap().sync_maps(&compiled).unwrap();
    let ack = Frame::new(ip("10.1.0.2"), ip("10.1.0.2"), Transport::ack(47300, 22));
    assert!(dp.run_marked(ToPod, &ack, MARK).0);
}

#[test]
fn node_ports_on_node_addresses_are_service_traffic() {
    let Some(dp) = with_services("svc-nodeport", &[CLUSTER, POLICIES]) else {
        return;
    };
    let node_port = Frame::new(
        ip("10.1.0.3"),
        ip(NODE_IP),
        Transport::syn(47400, NODE_PORT),
    );
    assert_eq!(dp.run_marked(FromPod, &node_port, 0), (true, MARK));
    let tcp = netpol_common::PROTO_TCP;
    let defers = |port| {
        compile::model::defers_to_service(&dp.compiled, ip("10.1.0.3"), ip(NODE_IP), tcp, port)
    };
    assert!(defers(NODE_PORT), "the model agrees on the node port");
    assert!(!defers(22));
    // Any other port of the node is the node itself, which c's egress does not allow.
    let ssh = Frame::new(ip("10.1.0.3"), ip(NODE_IP), Transport::syn(47401, 22));
    assert_eq!(dp.run_marked(FromPod, &ssh, 0), (false, 0));
}

#[test]
fn revoking_the_backends_permission_stops_a_live_service_connection() {
    let Some(mut dp) = with_services("svc-revoke", &[CLUSTER, POLICIES]) else {
        return;
    };
    let syn = Frame::new(
        ip("10.1.0.3"),
        ip(SERVICE_IP),
        Transport::syn(47500, SERVICE_PORT),
    );
    assert!(dp.run_marked(FromPod, &syn, 0).0);
    let to_d = |t| Frame::new(ip("10.1.0.3"), ip("10.2.0.1"), t);
    assert!(
        dp.run_marked(ToPod, &to_d(Transport::syn(47500, 9090)), MARK)
            .0
    );
    assert!(
        dp.run_marked(ToPod, &to_d(Transport::ack(47500, 9090)), MARK)
            .0
    );

    // c loses its permission to namespace y.
    let narrowed = POLICIES.replace("ports: [{port: web}]", "ports: [{port: 1}]");
    let mut compiled = compile::compile(&state(&[CLUSTER, &narrowed]), &Allocations::default());
    add_service_addresses(&mut compiled);
    dp.datapath.as_mut().unwrap().sync_maps(&compiled).unwrap();

    // The Service side still passes from_pod (marked); the backend's hook stops it.
    let ack = Frame::new(
        ip("10.1.0.3"),
        ip(SERVICE_IP),
        Transport::ack(47500, SERVICE_PORT),
    );
    assert_eq!(dp.run_marked(FromPod, &ack, 0), (true, MARK));
    assert!(
        !dp.run_marked(ToPod, &to_d(Transport::ack(47500, 9090)), MARK)
            .0
    );
}

/// b accepts a on TCP 80 and is not egress-isolated: its replies need no entry, so only
/// a revoked entry can keep a revoked connection stopped.
const B_FROM_A_ONLY: &str = r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: b-from-a, namespace: x}
spec:
  podSelector: {matchLabels: {app: b}}
  policyTypes: [Ingress]
  ingress: [{from: [{podSelector: {matchLabels: {app: a}}}], ports: [{protocol: TCP, port: 80}]}]
"#;

impl Loaded {
    fn resync(&mut self, manifests: &[&str]) {
        let compiled = compile::compile(&state(manifests), &self.compiled.allocations);
        self.datapath
            .as_mut()
            .unwrap()
            .sync_maps(&compiled)
            .unwrap();
        self.compiled = compiled;
    }

    /// Empties CT4 and CT6, as LRU eviction or a fresh agent would.
    fn lose_conntrack(&self) {
        use aya::maps::{HashMap, Map};
        use netpol_common::{CtKey4, CtKey6, CtValue};
        let mut ct4: HashMap<_, CtKey4, CtValue> =
            HashMap::try_from(Map::LruHashMap(self.pinned("CT4"))).unwrap();
        for key in ct4.keys().collect::<Result<Vec<_>, _>>().unwrap() {
            ct4.remove(&key).unwrap();
        }
        let mut ct6: HashMap<_, CtKey6, CtValue> =
            HashMap::try_from(Map::LruHashMap(self.pinned("CT6"))).unwrap();
        for key in ct6.keys().collect::<Result<Vec<_>, _>>().unwrap() {
            ct6.remove(&key).unwrap();
        }
    }
}

#[test]
fn a_revoked_connection_stays_revoked_from_both_ends() {
    let Some(mut dp) = Loaded::new("revoked", &[CLUSTER, B_FROM_A_ONLY]) else {
        return;
    };
    for (a, b, sport) in [
        ("10.1.0.1", "10.1.0.2", 47000),
        ("fd00::1", "fd00::2", 47001),
    ] {
        let to_b = |t| Frame::new(ip(a), ip(b), t);
        let from_b = |t| Frame::new(ip(b), ip(a), t);
        assert!(dp.run(ToPod, &to_b(Transport::syn(sport, 80))));
        assert!(dp.run(FromPod, &from_b(Transport::syn_ack(80, sport))));
        assert!(dp.run(ToPod, &to_b(Transport::ack(sport, 80))));
    }
    let before = dp.counter(Reason::Revoked);
    // a may now only use port 81.
    dp.resync(&[CLUSTER, &B_FROM_A_ONLY.replace("port: 80", "port: 81")]);
    for (a, b, sport) in [
        ("10.1.0.1", "10.1.0.2", 47000),
        ("fd00::1", "fd00::2", 47001),
    ] {
        let to_b = |t| Frame::new(ip(a), ip(b), t);
        let from_b = |t| Frame::new(ip(b), ip(a), t);
        // Every packet of it, from either end, again and again: b's replies would
        // otherwise open a connection of b's own (b may send anything).
        for _ in 0..3 {
            assert!(!dp.run(FromPod, &from_b(Transport::ack(80, sport))));
            assert!(!dp.run(ToPod, &to_b(Transport::ack(sport, 80))));
        }
        // A SYN on the tuple is judged afresh: still denied, and nothing changes.
        assert!(!dp.run(ToPod, &to_b(Transport::syn(sport, 80))));
        assert!(!dp.run(FromPod, &from_b(Transport::ack(80, sport))));
    }
    assert_eq!(dp.counter(Reason::Revoked) - before, 2 * 7);
    // A policy that allows it again lets the connection go on.
    dp.resync(&[CLUSTER, B_FROM_A_ONLY]);
    for (a, b, sport) in [
        ("10.1.0.1", "10.1.0.2", 47000),
        ("fd00::1", "fd00::2", 47001),
    ] {
        assert!(dp.run(
            FromPod,
            &Frame::new(ip(b), ip(a), Transport::ack(80, sport))
        ));
        assert!(dp.run(ToPod, &Frame::new(ip(a), ip(b), Transport::ack(sport, 80))));
    }
}

/// a may reach b on TCP 80-90 and nothing else; b (POLICIES) accepts a on 80-90 and
/// sends nothing: both are isolated both ways.
const A_TO_B_ONLY: &str = r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: a-to-b, namespace: x}
spec:
  podSelector: {matchLabels: {app: a}}
  policyTypes: [Ingress, Egress]
  egress: [{to: [{podSelector: {matchLabels: {app: b}}}], ports: [{protocol: TCP, port: 80, endPort: 90}]}]
"#;

#[test]
fn an_allowed_connection_survives_its_lost_entries_and_nothing_else_does() {
    let Some(dp) = Loaded::new("lost", &[CLUSTER, POLICIES, A_TO_B_ONLY]) else {
        return;
    };
    for (a, b, sport) in [
        ("10.1.0.1", "10.1.0.2", 48000),
        ("fd00::1", "fd00::2", 48001),
    ] {
        let a_to_b = |t| Frame::new(ip(a), ip(b), t);
        let b_to_a = |t| Frame::new(ip(b), ip(a), t);
        // The handshake through both pods' hooks (a leaves, b receives; and back).
        assert!(dp.run(FromPod, &a_to_b(Transport::syn(sport, 80))));
        assert!(dp.run(ToPod, &a_to_b(Transport::syn(sport, 80))));
        assert!(dp.run(FromPod, &b_to_a(Transport::syn_ack(80, sport))));
        assert!(dp.run(ToPod, &b_to_a(Transport::syn_ack(80, sport))));
        dp.lose_conntrack();
        // Mid-stream, the server speaks first: each pod's policy allows the connection
        // the other way, so these are replies, and the entries are made again.
        let resumed = dp.counter(Reason::Resumed);
        assert!(dp.run(FromPod, &b_to_a(Transport::ack(80, sport))));
        assert!(dp.run(ToPod, &b_to_a(Transport::ack(80, sport))));
        assert_eq!(dp.counter(Reason::Resumed) - resumed, 2);
        assert!(dp.run(FromPod, &a_to_b(Transport::ack(sport, 80))));
        assert!(dp.run(ToPod, &a_to_b(Transport::ack(sport, 80))));
        assert!(dp.run(FromPod, &b_to_a(Transport::ack(80, sport))));
        assert_eq!(
            dp.counter(Reason::Resumed) - resumed,
            2,
            "entries made again"
        );
        // A mid-stream packet that no allowed connection explains either way: b never
        // accepts a on 95, a never dials b on 95.
        assert!(!dp.run(FromPod, &b_to_a(Transport::ack(95, sport + 10))));
        assert!(!dp.run(ToPod, &b_to_a(Transport::ack(95, sport + 10))));
        assert!(!dp.run(ToPod, &a_to_b(Transport::ack(sport + 10, 95))));
        // A datagram is never taken for a reply.
        let dns = Transport::Udp {
            sport: 53,
            dport: sport,
        };
        assert!(!dp.run(ToPod, &Frame::new(ip(b), ip(a), dns)));
    }
    // Nor is a SYN (it opens a connection, judged as such).
    assert!(!dp.run(
        FromPod,
        &Frame::new(ip("10.1.0.2"), ip("10.1.0.1"), Transport::syn(80, 48100))
    ));
}

#[test]
fn icmp_errors_about_a_tracked_connection_pass_both_ways_and_others_are_judged() {
    let Some(dp) = Loaded::new("icmp-errors", &[CLUSTER, POLICIES]) else {
        return;
    };
    // a -> b:80, allowed at b's veth (b is isolated both ways; nothing lets ICMP in or
    // out of b).
    for (a, b, router, too_big, sport) in [
        ("10.1.0.1", "10.1.0.2", "10.77.0.1", (3, 4), 49000),
        ("fd00::1", "fd00::2", "fd00:77::1", (2, 0), 49001),
    ] {
        let syn = Frame::new(ip(a), ip(b), Transport::syn(sport, 80));
        let syn_ack = Frame::new(ip(b), ip(a), Transport::syn_ack(80, sport));
        assert!(dp.run(ToPod, &syn));
        assert!(dp.run(FromPod, &syn_ack));
        let related = dp.counter(Reason::Related);
        // A router on the path says b's packets are too big (PMTU discovery)...
        let (kind, code) = too_big;
        assert!(dp.run(
            ToPod,
            &Frame::icmp_error(ip(router), ip(b), kind, code, &syn_ack)
        ));
        // ...and b tells a about a's packet (say, unreachable).
        let unreachable = if syn.src.is_ipv6() { 1 } else { 3 };
        assert!(dp.run(
            FromPod,
            &Frame::icmp_error(ip(b), ip(a), unreachable, 3, &syn)
        ));
        assert_eq!(dp.counter(Reason::Related) - related, 2);
        // An error about no connection of b's is new traffic: dropped.
        let stranger = Frame::new(ip(b), ip(a), Transport::syn_ack(80, sport + 100));
        assert!(!dp.run(
            ToPod,
            &Frame::icmp_error(ip(router), ip(b), kind, code, &stranger)
        ));
        // So is one addressed to b about another pod's connection.
        let other = Frame::new(ip(a), ip(b), Transport::syn_ack(80, sport));
        assert!(!dp.run(
            ToPod,
            &Frame::icmp_error(ip(router), ip(b), kind, code, &other)
        ));
        assert_eq!(dp.counter(Reason::Related) - related, 2);
    }
}

#[test]
fn a_pod_spraying_new_flows_cannot_break_another_pods_established_connection() {
    let capacities = Capacities {
        conntrack: Some(64),
        ..Capacities::default()
    };
    let Some(dp) = Loaded::with_capacities("spray", &[CLUSTER, POLICIES, A_TO_B_ONLY], &capacities)
    else {
        return;
    };
    let a_to_b = |t| Frame::new(ip("10.1.0.1"), ip("10.1.0.2"), t);
    let b_to_a = |t| Frame::new(ip("10.1.0.2"), ip("10.1.0.1"), t);
    assert!(dp.run(FromPod, &a_to_b(Transport::syn(48500, 80))));
    assert!(dp.run(ToPod, &a_to_b(Transport::syn(48500, 80))));
    assert!(dp.run(FromPod, &b_to_a(Transport::syn_ack(80, 48500))));
    assert!(dp.run(ToPod, &b_to_a(Transport::syn_ack(80, 48500))));
    let created = dp.datapath.as_ref().unwrap().conntrack_created().unwrap();
    // d (not isolated) opens a thousand connections to c (not isolated), each answered
    // (so its entry is in use, as a busy spray's are): 64 fit.
    for sport in 20_000..21_000 {
        assert!(dp.run(
            ToPod,
            &Frame::new(ip("10.2.0.1"), ip("10.1.0.3"), Transport::syn(sport, 8080))
        ));
        assert!(dp.run(
            FromPod,
            &Frame::new(
                ip("10.1.0.3"),
                ip("10.2.0.1"),
                Transport::syn_ack(8080, sport)
            )
        ));
    }
    let now = dp.datapath.as_ref().unwrap().conntrack_created().unwrap();
    assert_eq!(now - created, 1000, "every new key is counted");
    // a and b's connection goes on both ways, whatever the spray evicted.
    assert!(dp.run(FromPod, &b_to_a(Transport::ack(80, 48500))));
    assert!(dp.run(ToPod, &b_to_a(Transport::ack(80, 48500))));
    assert!(dp.run(FromPod, &a_to_b(Transport::ack(48500, 80))));
    assert!(dp.run(ToPod, &a_to_b(Transport::ack(48500, 80))));
    assert!(
        dp.counter(Reason::Resumed) >= 1,
        "the spray evicted the connection's entries"
    );
}

/// An Admin-tier ClusterNetworkPolicy over namespace x: a's traffic into b is denied on
/// TCP 80, whatever b's NetworkPolicy says.
const ADMIN_DENIES_A_INTO_B: &str = r#"
apiVersion: policy.networking.k8s.io/v1alpha2
kind: ClusterNetworkPolicy
metadata: {name: no-a-into-b}
spec:
  tier: Admin
  priority: 10
  subject: {pods: {namespaceSelector: {matchLabels: {team: red}}, podSelector: {matchLabels: {app: b}}}}
  ingress:
    - name: no-a
      action: Deny
      from: [{pods: {namespaceSelector: {}, podSelector: {matchLabels: {app: a}}}}]
      protocols: [{tcp: {destinationPort: {number: 80}}}]
"#;

#[test]
fn an_admin_deny_revokes_what_a_network_policy_allowed_and_its_removal_restores_it() {
    let Some(mut dp) = Loaded::new("admin-revokes", &[CLUSTER, B_FROM_A_ONLY]) else {
        return;
    };
    for (a, b, sport) in [
        ("10.1.0.1", "10.1.0.2", 48000),
        ("fd00::1", "fd00::2", 48001),
    ] {
        let to_b = |t| Frame::new(ip(a), ip(b), t);
        let from_b = |t| Frame::new(ip(b), ip(a), t);
        assert!(dp.run(ToPod, &to_b(Transport::syn(sport, 80))));
        assert!(dp.run(FromPod, &from_b(Transport::syn_ack(80, sport))));
        assert!(dp.run(ToPod, &to_b(Transport::ack(sport, 80))));
    }
    let (revoked, denied) = (
        dp.counter(Reason::Revoked),
        dp.counter(Reason::ClusterDenied),
    );
    dp.resync(&[CLUSTER, B_FROM_A_ONLY, ADMIN_DENIES_A_INTO_B]);
    for (a, b, sport) in [
        ("10.1.0.1", "10.1.0.2", 48000),
        ("fd00::1", "fd00::2", 48001),
    ] {
        let to_b = |t| Frame::new(ip(a), ip(b), t);
        let from_b = |t| Frame::new(ip(b), ip(a), t);
        // The open connection is revoked from both ends...
        assert!(!dp.run(ToPod, &to_b(Transport::ack(sport, 80))));
        assert!(!dp.run(FromPod, &from_b(Transport::ack(80, sport))));
        // ... and a new one is denied by the Admin tier, though b-from-a allows it.
        assert!(!dp.run(ToPod, &to_b(Transport::syn(sport + 10, 80))));
    }
    assert_eq!(dp.counter(Reason::Revoked) - revoked, 4);
    assert_eq!(dp.counter(Reason::ClusterDenied) - denied, 2);
    // Gone again: the connection goes on.
    dp.resync(&[CLUSTER, B_FROM_A_ONLY]);
    for (a, b, sport) in [
        ("10.1.0.1", "10.1.0.2", 48000),
        ("fd00::1", "fd00::2", 48001),
    ] {
        assert!(dp.run(ToPod, &Frame::new(ip(a), ip(b), Transport::ack(sport, 80))));
        assert!(dp.run(
            FromPod,
            &Frame::new(ip(b), ip(a), Transport::ack(80, sport))
        ));
    }
}

/// An Admin-tier Accept lets a into b on TCP 81, which no NetworkPolicy allows: the
/// connection's replies pass too.
#[test]
fn an_admin_accept_opens_a_connection_whose_replies_pass() {
    let accept = ADMIN_DENIES_A_INTO_B
        .replace("action: Deny", "action: Accept")
        .replace("number: 80", "number: 81");
    let Some(dp) = Loaded::new("admin-accepts", &[CLUSTER, B_FROM_A_ONLY, &accept]) else {
        return;
    };
    let (a, b) = ("10.1.0.1", "10.1.0.2");
    let accepted = dp.counter(Reason::ClusterAccepted);
    assert!(dp.run(ToPod, &Frame::new(ip(a), ip(b), Transport::syn(48100, 81))));
    assert_eq!(dp.counter(Reason::ClusterAccepted) - accepted, 1);
    assert!(dp.run(
        FromPod,
        &Frame::new(ip(b), ip(a), Transport::syn_ack(81, 48100))
    ));
    assert!(dp.run(ToPod, &Frame::new(ip(a), ip(b), Transport::ack(48100, 81))));
    // Port 82: neither the Accept nor b-from-a.
    assert!(!dp.run(ToPod, &Frame::new(ip(a), ip(b), Transport::syn(48101, 82))));
}

/// An Admin-tier ClusterNetworkPolicy over every pod of namespace x: TCP 80 from
/// namespace y is denied. Baseline: c alone may not be reached on TCP 81 from anywhere.
const ADMIN_GUARDS_X: &str = r#"
apiVersion: policy.networking.k8s.io/v1alpha2
kind: ClusterNetworkPolicy
metadata: {name: guard-x}
spec:
  tier: Admin
  priority: 10
  subject: {namespaces: {matchLabels: {team: red}}}
  ingress:
    - name: not-from-blue
      action: Deny
      from: [{namespaces: {matchLabels: {team: blue}}}]
      protocols: [{tcp: {destinationPort: {number: 80}}}]
---
apiVersion: policy.networking.k8s.io/v1alpha2
kind: ClusterNetworkPolicy
metadata: {name: c-closed}
spec:
  tier: Baseline
  priority: 10
  subject: {pods: {namespaceSelector: {}, podSelector: {matchLabels: {app: c}}}}
  ingress:
    - name: not-81
      action: Deny
      from: [{namespaces: {}}]
      protocols: [{tcp: {destinationPort: {number: 81}}}]
"#;

#[test]
fn the_pods_one_tier_group_holds_are_judged_by_its_one_set_of_entries() {
    use netpol_common::{TIER_ADMIN, TIER_BASELINE};
    let Some(dp) = Loaded::new("tier-group", &[CLUSTER, ADMIN_GUARDS_X]) else {
        return;
    };
    // a, b and c (namespace x) are one Admin group, with one entry: the deny for d's
    // identity. c alone has a Baseline group.
    let info = |address: &str| dp.compiled.endpoints[&compile::addr(ip(address))];
    let group = info("10.1.0.1").tier_group(TIER_ADMIN);
    assert_ne!(group, 0);
    for address in ["10.1.0.2", "10.1.0.3"] {
        assert_eq!(info(address).tier_group(TIER_ADMIN), group, "{address}");
    }
    assert_eq!(info("10.1.0.1").tier_group(TIER_BASELINE), 0);
    assert_ne!(info("10.1.0.3").tier_group(TIER_BASELINE), 0);
    let admin: Vec<_> = dp
        .compiled
        .policy
        .keys()
        .filter(|key| key.data.direction & TIER_ADMIN != 0)
        .collect();
    assert_eq!(admin.len(), 1, "{admin:?}");
    // The kernel finds it through each pod's group: d into a, b and c on TCP 80 is
    // denied; a into b is not (a is no peer of the rule); d is no subject.
    let denied = dp.counter(Reason::ClusterDenied);
    for (port, dst) in [
        (48200, "10.1.0.1"),
        (48201, "10.1.0.2"),
        (48202, "10.1.0.3"),
    ] {
        let syn = Frame::new(ip("10.2.0.1"), ip(dst), Transport::syn(port, 80));
        assert!(!dp.run(ToPod, &syn), "d into {dst}");
    }
    assert_eq!(dp.counter(Reason::ClusterDenied) - denied, 3);
    let a_into_b = Frame::new(ip("10.1.0.1"), ip("10.1.0.2"), Transport::syn(48203, 80));
    assert!(dp.run(ToPod, &a_into_b));
    let a_into_d = Frame::new(ip("10.1.0.1"), ip("10.2.0.1"), Transport::syn(48204, 80));
    assert!(dp.run(ToPod, &a_into_d));
    // The Baseline group is c's alone: a into c on 81 is denied, a into b is not.
    let a_into = |dst: &str, port| Frame::new(ip("10.1.0.1"), ip(dst), Transport::syn(port, 81));
    assert!(!dp.run(ToPod, &a_into("10.1.0.3", 48205)));
    assert!(dp.run(ToPod, &a_into("10.1.0.2", 48206)));
}
