//! Tier 3: a pod cannot send with another pod's address. Pod x/a crafts a UDP datagram
//! with x/b's source address towards x/c's echo server; were it let through, x/c would
//! echo it to x/b. The agent binds each veth to its pod, so the datagram is dropped as
//! spoofed, while x/a's honest datagrams and x/b's own still get their echo.
//!
//! And least privilege: once running, every thread of the agent holds CAP_BPF and
//! CAP_NET_ADMIN only (effective, permitted and bounding sets), with no_new_privs, and
//! still attaches to new pods; its HTTP endpoints are on the node's loopback.

mod support;

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, UdpSocket};
use std::os::unix::fs::PermissionsExt as _;
use std::time::Duration;

use netpol_lab::NetnsWorker;
use support::{
    AGENT_TIMEOUT, Cluster, HEALTH, agent_bin, http_get, receives, send_raw, standard_lab,
};

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
    let echo = SocketAddrV4::new(c.v4(), 80);
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
    let at_b = listen(&worker_b, b.v4(), 40_001);
    let at_a = listen(&worker_a, a.v4(), 40_002);

    // Honest datagrams (crafted the same way) get their echo: the path works.
    send_raw(
        &worker_a,
        SocketAddrV4::new(a.v4(), 40_002),
        echo,
        b"honest-from-a",
    );
    assert!(
        receives(&at_a, b"honest-from-a"),
        "x/a's own datagram is echoed"
    );
    send_raw(
        &worker_b,
        SocketAddrV4::new(b.v4(), 40_001),
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
            SocketAddrV4::new(b.v4(), 40_001),
            echo,
            b"spoofed-by-a",
        );
    }
    assert!(
        !receives(&at_b, b"spoofed-by-a"),
        "a datagram with x/b's address sent by x/a got through"
    );
}

/// A status line of `/proc/<pid>/task/<tid>/status`, e.g. `CapEff`, as a number.
fn status_field(path: &std::path::Path, field: &str) -> u64 {
    let text = std::fs::read_to_string(path).expect("reading a task status");
    let value = text
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .unwrap_or_else(|| panic!("no {field} in {}", path.display()))
        .trim();
    u64::from_str_radix(value, if field == "NoNewPrivs" { 10 } else { 16 }).expect(field)
}

#[test]
fn the_running_agent_keeps_only_bpf_and_net_admin_and_is_not_reachable_from_pods() {
    let Some(agent) = agent_bin("the_running_agent_keeps_only_bpf_and_net_admin") else {
        return;
    };
    let mut cluster = Cluster::start_with(
        standard_lab(&["x/a", "x/b"]),
        &agent,
        "",
        &["--health-addr", HEALTH],
    );
    // A pod created now is attached to with what is left (CAP_NET_ADMIN, CAP_BPF).
    cluster
        .lab
        .add_pod(support::standard_pod("x", "late", 9))
        .expect("adding a pod");
    let generation = cluster
        .manifests
        .write(&cluster.lab, "")
        .expect("writing manifests");
    let status = cluster
        .agent
        .wait_generation(generation, AGENT_TIMEOUT)
        .expect("agent applied the new pod");
    assert_eq!(status.attached, 3, "x/late's veth got the programs");
    let (lab, process) = (&cluster.lab, &cluster.agent);

    // Every thread of the agent, the async runtime's included.
    const CAP_NET_ADMIN: u64 = 1 << 12;
    const CAP_BPF: u64 = 1 << 39;
    let pid = process.pid().expect("agent pid");
    let tasks: Vec<_> = std::fs::read_dir(format!("/proc/{pid}/task"))
        .expect("agent tasks")
        .map(|t| t.expect("task").path().join("status"))
        .collect();
    assert!(tasks.len() > 1, "the agent has its runtime threads");
    for task in &tasks {
        for field in ["CapEff", "CapPrm", "CapBnd"] {
            assert_eq!(
                status_field(task, field),
                CAP_BPF | CAP_NET_ADMIN,
                "{field} of {}",
                task.display()
            );
        }
        assert_eq!(status_field(task, "CapInh"), 0);
        assert_eq!(status_field(task, "CapAmb"), 0);
        assert_eq!(status_field(task, "NoNewPrivs"), 1);
    }

    // Its HTTP endpoints listen on the node's loopback only: a pod reaching for the
    // node's address on that port finds nothing.
    let (ip, port) = HEALTH.split_once(':').unwrap();
    assert_eq!(ip, "127.0.0.1");
    let port: u16 = port.parse().unwrap();
    let worker = NetnsWorker::spawn(&lab.pod("x/a").unwrap().netns).expect("x/a worker");
    let reached = worker
        .run(move || {
            std::net::TcpStream::connect_timeout(
                &SocketAddr::from((netpol_lab::NODE_IPV4, port)),
                Duration::from_secs(1),
            )
            .is_ok()
        })
        .expect("worker");
    assert!(
        !reached,
        "a pod reached the agent's HTTP port on the node address"
    );
    // ...while from the node itself it answers.
    let node = NetnsWorker::spawn(lab.node_netns()).expect("node worker");
    assert_eq!(http_get(&node, "/healthz").0, "HTTP/1.1 200 OK");
    // The flow socket is root's alone.
    let mode = std::fs::metadata(process.flow_socket())
        .expect("flow socket")
        .permissions()
        .mode();
    assert_eq!(mode & 0o077, 0, "flow socket mode {mode:o}");
    println!(
        "{} agent threads: CapEff = CapPrm = CapBnd = BPF + NET_ADMIN, NoNewPrivs; HTTP on \
         loopback only; flow socket {:o}",
        tasks.len(),
        mode & 0o777
    );
}
