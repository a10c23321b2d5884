//! Tier 3 across two nodes: two node namespaces joined by an underlay link, one agent
//! each, pods on both. A cross-node connection passes the client's egress policy on its
//! node and the server's ingress policy on the other, and its replies pass both
//! conntracks; either side alone blocks what it does not allow.
//!
//! Run as root with `NETPOL_AGENT_BIN` set (`cargo xtask test` does both).

mod support;

use std::path::Path;

use netpol_lab::{AgentProcess, Lab, ManifestDir, NODE, Probe};
use support::{AGENT_TIMEOUT, agent_bin, check, standard_pod};

/// x/a and x/c on node 0; y/b and y/e on node 1.
const PLACEMENT: [(&str, u8, usize); 4] =
    [("x/a", 1, 0), ("y/b", 2, 1), ("x/c", 3, 0), ("y/e", 4, 1)];

/// x/a may only talk to y/b (TCP 80 and 81); y/b admits x/a on 80 and x/c on 81.
const POLICIES: &str = r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: a-egress, namespace: x}
spec:
  podSelector: {matchLabels: {pod: a}}
  policyTypes: [Egress]
  egress:
    - to:
        - namespaceSelector: {matchLabels: {ns: y}}
          podSelector: {matchLabels: {pod: b}}
      ports: [{port: 80, protocol: TCP}, {port: 81, protocol: TCP}]
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: b-ingress, namespace: y}
spec:
  podSelector: {matchLabels: {pod: b}}
  policyTypes: [Ingress]
  ingress:
    - from:
        - namespaceSelector: {matchLabels: {ns: x}}
          podSelector: {matchLabels: {pod: a}}
      ports: [{port: 80, protocol: TCP}]
    - from:
        - namespaceSelector: {matchLabels: {ns: x}}
          podSelector: {matchLabels: {pod: c}}
      ports: [{port: 81, protocol: TCP}]
"#;

/// Two nodes with their agents; field order is drop order (agents before the lab).
struct TwoNodes {
    agents: Vec<AgentProcess>,
    manifests: ManifestDir,
    lab: Lab,
}

impl TwoNodes {
    fn start(agent: &Path) -> Self {
        let mut lab = Lab::with_nodes(2).expect("creating a two-node lab");
        for ns in ["x", "y"] {
            lab.set_namespace_labels(ns, [("ns", ns)]);
        }
        for (id, i, node) in PLACEMENT {
            let (ns, name) = id.split_once('/').expect("ns/pod");
            lab.add_pod(standard_pod(ns, name, i).on_node(node))
                .expect("adding a pod");
        }
        let manifests = ManifestDir::create(lab.workdir().join("manifests")).expect("manifest dir");
        let agents = (0..2)
            .map(|n| AgentProcess::start_on(&lab, n, agent, &manifests).expect("starting an agent"))
            .collect();
        let mut cluster = Self {
            agents,
            manifests,
            lab,
        };
        cluster.apply("");
        cluster
    }

    /// Writes the manifests and waits until both agents applied them; each programs
    /// only its own node's two pods.
    fn apply(&mut self, policies: &str) {
        let generation = self
            .manifests
            .write(&self.lab, policies)
            .expect("writing manifests");
        for (n, agent) in self.agents.iter_mut().enumerate() {
            let status = agent
                .wait_generation(generation, AGENT_TIMEOUT)
                .unwrap_or_else(|e| panic!("agent on node {n}: {e:#}"));
            assert_eq!(status.invalid, 0, "agent on node {n}: {status:?}");
            assert_eq!(
                status.endpoints, 2,
                "agent on node {n} programs its own pods only"
            );
        }
    }

    /// Probes both families; on a failure shows both agents' logs.
    fn check(&self, expectations: &[(Probe, bool)]) {
        let both: Vec<(Probe, bool)> = expectations
            .iter()
            .flat_map(|(p, allowed)| [(p.clone(), *allowed), (p.clone().v6(), *allowed)])
            .collect();
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            check(&self.lab, &both, None);
        }));
        if let Err(panic) = result {
            for agent in &self.agents {
                eprintln!("{}", agent.log_tail(30));
            }
            std::panic::resume_unwind(panic);
        }
    }
}

#[test]
fn cross_node_connections_pass_both_nodes_policies_and_conntracks() {
    let Some(agent) = agent_bin("two_nodes") else {
        return;
    };
    let mut cluster = TwoNodes::start(&agent);
    let node1 = Lab::node_endpoint(1);
    let tcp = |src: &str, dst: &str, port| Probe::tcp(src, dst, port);

    // No policies: the underlay routes everything, both ways, both families.
    cluster.check(&[
        (tcp("x/a", "y/b", 80), true),
        (tcp("y/b", "x/a", 80), true),
        (tcp("x/c", "y/e", 81), true),
        (tcp(NODE, "y/b", 80), true),
        (tcp(&node1, "x/a", 80), true),
    ]);

    cluster.apply(POLICIES);
    cluster.check(&[
        // Egress on node 0, ingress on node 1; the SYN-ACK and the greeting byte come
        // back through node 1's and node 0's conntrack.
        (tcp("x/a", "y/b", 80), true),
        // Node 0's egress allows 81, node 1's ingress does not.
        (tcp("x/a", "y/b", 81), false),
        // Node 1 would admit it (y/e is not isolated); node 0's egress does not.
        (tcp("x/a", "y/e", 80), false),
        (tcp("x/c", "y/b", 81), true),
        (tcp("x/c", "y/b", 80), false),
        // Into x/a from node 1: x/a's replies leave an egress-isolated pod as replies.
        (tcp("y/e", "x/a", 80), true),
        // x/a is isolated for egress only: y/b reaches it on any port.
        (tcp("y/b", "x/a", 81), true),
        // A node's traffic is host traffic for its own pods only: node 1 reaches y/b,
        // node 0 is just another address to node 1's agent.
        (tcp(&node1, "y/b", 80), true),
        (tcp(NODE, "y/b", 80), false),
        (tcp(NODE, "x/a", 80), true),
    ]);
}

/// x/a may only send to y/b on TCP 9000 and accepts nothing; y/b accepts x/a on 9000 and
/// sends nothing: both isolated both ways.
const TRANSFER: &str = r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: a-sends-to-b, namespace: x}
spec:
  podSelector: {matchLabels: {pod: a}}
  policyTypes: [Ingress, Egress]
  egress:
    - to: [{namespaceSelector: {matchLabels: {ns: y}}, podSelector: {matchLabels: {pod: b}}}]
      ports: [{port: 9000, protocol: TCP}]
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: b-hears-a, namespace: y}
spec:
  podSelector: {matchLabels: {pod: b}}
  policyTypes: [Ingress, Egress]
  ingress:
    - from: [{namespaceSelector: {matchLabels: {ns: x}}, podSelector: {matchLabels: {pod: a}}}]
      ports: [{port: 9000, protocol: TCP}]
"#;

/// Sends `len` bytes from x/a to y/b:9000 over `family`'s addresses and returns how
/// many y/b read before the sender finished or gave up (every wait bounded).
fn transfer(lab: &Lab, family: netpol_lab::Family, len: usize) -> usize {
    use std::io::{Read, Write};
    use std::net::{SocketAddr, TcpListener, TcpStream};
    use std::time::Duration;
    let server_ip = lab.address("y/b", family).expect("y/b has an address");
    let listen = SocketAddr::new(server_ip, 9000);
    let listener = lab
        .worker("y/b")
        .unwrap()
        .run(move || TcpListener::bind(listen).expect("listening in y/b"))
        .unwrap();
    let reader = std::thread::spawn(move || {
        let (mut stream, _) = listener.accept().expect("accepting");
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let mut total = 0;
        let mut buf = vec![0u8; 64 * 1024];
        while let Ok(n) = stream.read(&mut buf) {
            if n == 0 {
                break;
            }
            total += n;
        }
        total
    });
    let stream = lab
        .worker("x/a")
        .unwrap()
        .run(move || TcpStream::connect_timeout(&listen, Duration::from_secs(5)))
        .unwrap();
    if let Ok(mut stream) = stream {
        stream
            .set_write_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let chunk = vec![0x5au8; 64 * 1024];
        let mut sent = 0;
        while sent < len {
            if stream.write_all(&chunk).is_err() {
                break;
            }
            sent += chunk.len();
        }
        drop(stream);
    } else {
        // Unblock the accept so that the reader ends.
        let _ = lab
            .worker("x/a")
            .unwrap()
            .run(move || TcpStream::connect_timeout(&listen, Duration::from_secs(1)));
    }
    reader.join().unwrap()
}

#[test]
fn path_mtu_discovery_works_for_pods_isolated_both_ways() {
    let Some(agent) = agent_bin("two_nodes") else {
        return;
    };
    let mut cluster = TwoNodes::start(&agent);
    cluster.apply(TRANSFER);
    // y/b's node forwards into a link of 1280 bytes: it answers a's full-size segments
    // with "fragmentation needed" / "packet too big", from an address x/a's policy does
    // not admit. Only as errors of a's connection may they reach a.
    let b = cluster.lab.pod("y/b").expect("y/b");
    let node1 = cluster.lab.nodes()[b.node].netns.clone();
    netpol_lab::netns::ip_batch(Some(&node1), &[format!("link set {} mtu 1280", b.host_if)])
        .expect("narrowing y/b's link");
    const LEN: usize = 4 << 20;
    for family in [netpol_lab::Family::V4, netpol_lab::Family::V6] {
        let got = transfer(&cluster.lab, family, LEN);
        if got < LEN {
            for agent in &cluster.agents {
                eprintln!("{}", agent.log_tail(30));
            }
        }
        assert!(got >= LEN, "{family:?}: y/b read {got} of {LEN} bytes");
    }
}
