//! Tier 3: a connection whose permission is revoked stays stopped, from both ends, while
//! both ends keep trying; the server is not egress-isolated, so nothing but the revoked
//! conntrack entry keeps its packets from opening the connection again.
//!
//! Run as root with `NETPOL_AGENT_BIN` set (`cargo xtask test` does both).

mod support;

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use netpol_lab::{Family, Lab};
use support::{Cluster, agent_bin, standard_lab};

/// x/b accepts x/a on TCP 9100; x/b's egress is not isolated.
const B_FROM_A: &str = r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: b-from-a, namespace: x}
spec:
  podSelector: {matchLabels: {pod: b}}
  policyTypes: [Ingress]
  ingress:
    - from: [{podSelector: {matchLabels: {pod: a}}}]
      ports: [{port: 9100, protocol: TCP}]
"#;

/// The same policy, with x/a no longer admitted.
const B_FROM_NOBODY: &str = r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: b-from-a, namespace: x}
spec:
  podSelector: {matchLabels: {pod: b}}
  policyTypes: [Ingress]
"#;

/// How long both ends keep talking after the revocation.
const WATCH: Duration = Duration::from_secs(30);

/// Both ends of one connection from x/a to x/b:9100.
struct Connection {
    client: TcpStream,
    server: TcpStream,
}

fn connect(lab: &Lab, family: Family) -> Connection {
    let ip = lab.address("x/b", family).expect("x/b has an address");
    let at = SocketAddr::new(ip, 9100);
    let listener = lab
        .worker("x/b")
        .unwrap()
        .run(move || TcpListener::bind(at).expect("listening in x/b"))
        .unwrap();
    let client = lab
        .worker("x/a")
        .unwrap()
        .run(move || TcpStream::connect_timeout(&at, Duration::from_secs(5)))
        .unwrap()
        .expect("x/a connects to x/b while allowed");
    listener.set_nonblocking(false).expect("blocking listener");
    let (server, _) = listener.accept().expect("x/b accepts");
    for stream in [&client, &server] {
        stream
            .set_read_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        stream
            .set_write_timeout(Some(Duration::from_millis(200)))
            .unwrap();
    }
    Connection { client, server }
}

/// Writes a byte from `from` every 100 ms until `stop`, and counts what `to` reads.
fn talk(mut from: TcpStream, mut to: TcpStream, stop: Arc<AtomicBool>) -> Arc<AtomicUsize> {
    let read = Arc::new(AtomicUsize::new(0));
    let counted = read.clone();
    std::thread::spawn(move || {
        let mut buf = [0u8; 256];
        while !stop.load(Ordering::Relaxed) {
            let _ = from.write(b"x");
            match to.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => {
                    counted.fetch_add(n, Ordering::Relaxed);
                }
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
                Err(_) => break,
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    });
    read
}

#[test]
fn a_revoked_connection_stays_stopped_from_both_ends() {
    let Some(agent) = agent_bin("revocation") else {
        return;
    };
    let mut cluster = Cluster::start(standard_lab(&["x/a", "x/b"]), &agent);
    cluster.apply(B_FROM_A);
    let connections: Vec<(Family, Connection)> = [Family::V4, Family::V6]
        .into_iter()
        .map(|family| (family, connect(&cluster.lab, family)))
        .collect();
    // Both directions work while allowed.
    for (family, c) in &connections {
        let (mut client, mut server) = (&c.client, &c.server);
        client.write_all(b"ping").unwrap();
        let mut buf = [0u8; 4];
        server.read_exact(&mut buf).unwrap();
        server.write_all(b"pong").unwrap();
        client.read_exact(&mut buf).unwrap();
        assert_eq!(&buf, b"pong", "{family:?}");
    }

    cluster.apply(B_FROM_NOBODY);
    let stop = Arc::new(AtomicBool::new(false));
    let counts: Vec<(Family, Arc<AtomicUsize>, Arc<AtomicUsize>)> = connections
        .iter()
        .map(|(family, c)| {
            let a_to_b = talk(
                c.client.try_clone().unwrap(),
                c.server.try_clone().unwrap(),
                stop.clone(),
            );
            let b_to_a = talk(
                c.server.try_clone().unwrap(),
                c.client.try_clone().unwrap(),
                stop.clone(),
            );
            (*family, a_to_b, b_to_a)
        })
        .collect();
    let started = Instant::now();
    while started.elapsed() < WATCH {
        std::thread::sleep(Duration::from_millis(500));
        for (family, a_to_b, b_to_a) in &counts {
            let (ab, ba) = (
                a_to_b.load(Ordering::Relaxed),
                b_to_a.load(Ordering::Relaxed),
            );
            if ab + ba > 0 {
                stop.store(true, Ordering::Relaxed);
                eprintln!("{}", cluster.agent.log_tail(30));
                panic!(
                    "{family:?}: after the revocation x/b read {ab} bytes from x/a and x/a \
                     {ba} from x/b within {:?}",
                    started.elapsed()
                );
            }
        }
    }
    stop.store(true, Ordering::Relaxed);
}
