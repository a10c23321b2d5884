//! Tier 3: a pod cannot send with another pod's address. Pod x/a crafts a UDP datagram
//! with x/b's source address towards x/c's echo server; were it let through, x/c would
//! echo it to x/b. The agent binds each veth to its pod, so the datagram is dropped as
//! spoofed, while x/a's honest datagrams and x/b's own still get their echo.

mod support;

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, UdpSocket};
use std::time::Duration;

use socket2::{Domain, Protocol, Socket, Type};
use support::{Cluster, agent_bin, standard_lab};
use xtask::lab::NetnsWorker;

/// An IPv4 + UDP packet (IP_HDRINCL): the kernel fills the IP checksum and length; a UDP
/// checksum of 0 means "none" in IPv4.
fn udp_packet(src: SocketAddrV4, dst: SocketAddrV4, payload: &[u8]) -> Vec<u8> {
    let total = 20 + 8 + payload.len();
    let mut p = vec![0u8; 20];
    p[0] = 0x45;
    p[2..4].copy_from_slice(&(total as u16).to_be_bytes());
    p[8] = 64;
    p[9] = 17;
    p[12..16].copy_from_slice(&src.ip().octets());
    p[16..20].copy_from_slice(&dst.ip().octets());
    p.extend_from_slice(&src.port().to_be_bytes());
    p.extend_from_slice(&dst.port().to_be_bytes());
    p.extend_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
    p.extend_from_slice(&[0, 0]);
    p.extend_from_slice(payload);
    p
}

/// Sends `payload` from `from`'s namespace with source `src` (raw, any address).
fn send_raw(from: &NetnsWorker, src: SocketAddrV4, dst: SocketAddrV4, payload: &'static [u8]) {
    from.run(move || -> std::io::Result<()> {
        let raw = Socket::new(
            Domain::IPV4,
            Type::RAW,
            Some(Protocol::from(libc::IPPROTO_RAW)),
        )?;
        raw.send_to(&udp_packet(src, dst, payload), &SocketAddr::V4(dst).into())?;
        Ok(())
    })
    .expect("worker")
    .expect("sending the crafted datagram");
}

/// Whether `socket` receives `payload` within a second.
fn receives(socket: &UdpSocket, payload: &[u8]) -> bool {
    let deadline = std::time::Instant::now() + Duration::from_secs(1);
    let mut buf = [0u8; 64];
    while std::time::Instant::now() < deadline {
        match socket.recv(&mut buf) {
            Ok(n) if &buf[..n] == payload => return true,
            Ok(_) => continue,
            Err(_) => return false,
        }
    }
    false
}

#[test]
fn a_pod_cannot_borrow_another_pods_address() {
    let Some(agent) = agent_bin("a_pod_cannot_borrow_another_pods_address") else {
        return;
    };
    let cluster = Cluster::start(standard_lab(&["x/a", "x/b", "x/c"]), &agent);
    let lab = &cluster.lab;
    let (a, b, c) = (
        lab.pod("x/a").unwrap(),
        lab.pod("x/b").unwrap(),
        lab.pod("x/c").unwrap(),
    );
    let echo = SocketAddrV4::new(c.ipv4, 80);
    let worker_a = NetnsWorker::spawn(&a.netns).expect("x/a worker");
    let worker_b = NetnsWorker::spawn(&b.netns).expect("x/b worker");
    let listen = |worker: &NetnsWorker, ip: Ipv4Addr, port: u16| {
        let socket = worker
            .run(move || UdpSocket::bind(SocketAddrV4::new(ip, port)))
            .expect("worker")
            .expect("binding a UDP socket");
        socket
            .set_read_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        socket
    };
    // x/b listens where x/c's echo of a datagram "from" x/b would arrive.
    let at_b = listen(&worker_b, b.ipv4, 40_001);
    let at_a = listen(&worker_a, a.ipv4, 40_002);

    // Honest datagrams (crafted the same way) get their echo: the path works.
    send_raw(
        &worker_a,
        SocketAddrV4::new(a.ipv4, 40_002),
        echo,
        b"honest-from-a",
    );
    assert!(
        receives(&at_a, b"honest-from-a"),
        "x/a's own datagram is echoed"
    );
    send_raw(
        &worker_b,
        SocketAddrV4::new(b.ipv4, 40_001),
        echo,
        b"honest-from-b",
    );
    assert!(
        receives(&at_b, b"honest-from-b"),
        "x/b's own datagram is echoed"
    );

    // x/a borrowing x/b's address: dropped on x/a's veth, so x/b hears nothing.
    for _ in 0..3 {
        send_raw(
            &worker_a,
            SocketAddrV4::new(b.ipv4, 40_001),
            echo,
            b"spoofed-by-a",
        );
    }
    assert!(
        !receives(&at_b, b"spoofed-by-a"),
        "a datagram with x/b's address sent by x/a got through"
    );
}
