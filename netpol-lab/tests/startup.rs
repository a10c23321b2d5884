//! Tier 3: pod start-up. A pod's veth exists before the agent knows the pod (the CNI
//! plumbs it first; the API server tells the agent later). A policy that already exists
//! selects the new pod, so the pod must be isolated from its first packet.
//!
//! The agent attaches to every interface named like a pod's (`--pod-interface-prefix`)
//! as netlink reports it, and `--unprogrammed` decides what such a pod's traffic gets
//! until the agent has programmed it: `deny` (the default) drops it, `allow` passes it.
//!
//! Each new pod here sprays UDP datagrams at a listener the moment `add_pod` returns,
//! while the agent still knows nothing of it (its manifest is written only afterwards).
//! With `deny`, none may arrive, neither before the pod is programmed nor after (the
//! policy denies that destination), and the pod's allowed traffic must work once it is
//! programmed. With `allow`, the same spray gets through until the pod is programmed:
//! proof that the default, not luck, is what stopped it.

mod support;

use std::net::{SocketAddrV4, UdpSocket};
use std::time::{Duration, Instant};

use netpol_lab::{NetnsWorker, PodSpec, Port, Probe};
use support::{Cluster, agent_bin, standard_lab};

const POLICY: &str = r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata:
  name: new-pods
  namespace: x
spec:
  podSelector:
    matchLabels:
      role: new
  policyTypes: [Egress]
  egress:
  - to:
    - podSelector:
        matchLabels:
          pod: server
    ports:
    - protocol: TCP
      port: 80
"#;

/// Port of the listener in x/sink (not one the lab serves).
const SINK_PORT: u16 = 9999;
/// Datagrams per spray, one every 2 ms.
const SPRAY: u32 = 150;

/// A UDP socket in x/sink counting datagrams from one address.
struct Sink {
    socket: UdpSocket,
    _worker: NetnsWorker,
}

impl Sink {
    fn open(cluster: &Cluster) -> Self {
        let sink = cluster.lab.pod("x/sink").expect("x/sink");
        let worker = NetnsWorker::spawn(&sink.netns).expect("x/sink worker");
        let ip = sink.v4();
        let socket = worker
            .run(move || UdpSocket::bind(SocketAddrV4::new(ip, SINK_PORT)))
            .expect("worker")
            .expect("binding the sink");
        socket
            .set_read_timeout(Some(Duration::from_millis(50)))
            .expect("read timeout");
        Sink {
            socket,
            _worker: worker,
        }
    }

    /// Datagrams received until the socket has been quiet for 50 ms (bounded).
    fn drain(&self) -> u32 {
        let mut buf = [0u8; 64];
        let mut received = 0;
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            match self.socket.recv(&mut buf) {
                Ok(_) => received += 1,
                Err(_) => break,
            }
        }
        received
    }
}

/// Sends [`SPRAY`] datagrams from `pod` to the sink; returns how many arrived.
fn spray(cluster: &Cluster, sink: &Sink, pod: &str) -> u32 {
    let lab = &cluster.lab;
    let from = lab.pod(pod).expect("the new pod");
    let to = SocketAddrV4::new(lab.pod("x/sink").expect("x/sink").v4(), SINK_PORT);
    let worker = NetnsWorker::spawn(&from.netns).expect("sender worker");
    sink.drain();
    worker
        .run(move || -> std::io::Result<()> {
            let socket = UdpSocket::bind("0.0.0.0:0")?;
            for _ in 0..SPRAY {
                // ENETUNREACH and the like while the pod's link settles are fine: the
                // point is to try from the very start.
                let _ = socket.send_to(b"first packets", to);
                std::thread::sleep(Duration::from_millis(2));
            }
            Ok(())
        })
        .expect("worker")
        .expect("sending");
    sink.drain()
}

fn new_pod(name: &str) -> PodSpec {
    PodSpec::new("x", name)
        .label("pod", name)
        .label("role", "new")
        .port(Port::tcp(80))
}

/// Writes the manifests (now with the new pods) and waits for the agent.
fn program(cluster: &mut Cluster) {
    cluster.apply(POLICY);
}

/// The lab (x/server, x/sink), the policy in force, an agent started with `extra`.
fn cluster(agent: &std::path::Path, extra: &[&str]) -> Cluster {
    Cluster::start_with(standard_lab(&["x/server", "x/sink"]), agent, POLICY, extra)
}

#[test]
fn a_new_pod_is_isolated_from_its_first_packet() {
    let Some(agent) = agent_bin("a_new_pod_is_isolated_from_its_first_packet") else {
        return;
    };
    // The default is deny: nothing leaks, before or after the pod is programmed.
    let mut cluster = cluster(&agent, &[]);
    let sink = Sink::open(&cluster);
    let started = Instant::now();
    for i in 0..3 {
        let name = format!("new{i}");
        let id = format!("x/{name}");
        cluster.lab.add_pod(new_pod(&name)).expect("adding a pod");
        let before = spray(&cluster, &sink, &id);
        program(&mut cluster);
        let after = spray(&cluster, &sink, &id);
        assert_eq!(
            (before, after),
            (0, 0),
            "{id}: datagrams to a destination its policy denies arrived (before it was \
             programmed, after)\n{}",
            cluster.agent.log_tail(30)
        );
        cluster.check(&[
            (Probe::tcp(id.clone(), "x/server", 80), true),
            (Probe::tcp(id.clone(), "x/sink", 80), false),
        ]);
    }
    println!(
        "deny default: 3 new pods x {SPRAY} datagrams before and after programming: 0 \
         leaked ({:.1} s)",
        started.elapsed().as_secs_f64()
    );
}

#[test]
fn with_the_allow_default_an_unprogrammed_pod_is_open_until_programmed() {
    let Some(agent) =
        agent_bin("with_the_allow_default_an_unprogrammed_pod_is_open_until_programmed")
    else {
        return;
    };
    // The same race under the other default: the spray passes until the agent programs
    // the pod, then its policy applies. (This is what the deny test would see if the
    // default did not hold.)
    let mut cluster = cluster(&agent, &["--unprogrammed", "allow"]);
    let sink = Sink::open(&cluster);
    cluster.lab.add_pod(new_pod("late")).expect("adding a pod");
    let before = spray(&cluster, &sink, "x/late");
    program(&mut cluster);
    let after = spray(&cluster, &sink, "x/late");
    assert!(
        before > 0,
        "with --unprogrammed allow, an unprogrammed pod's datagrams should pass\n{}",
        cluster.agent.log_tail(30)
    );
    assert_eq!(after, 0, "x/late's policy applies once it is programmed");
    println!("allow default: {before}/{SPRAY} passed before programming, 0 after");
}
