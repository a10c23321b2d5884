//! Shared scaffolding for the tier-3 network-namespace tests.

#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, UdpSocket};
use std::path::{Path, PathBuf};
use std::time::Duration;

use netpol_lab::apiserver::ApiServer;
use netpol_lab::{
    AgentProcess, Family, Lab, ManifestDir, NODE, NetnsWorker, PodSpec, Port, Probe, Protocol,
};
use serde_json::{Value, json};

pub const PROBE_TIMEOUT: Duration = Duration::from_secs(1);
pub const AGENT_TIMEOUT: Duration = Duration::from_secs(30);

/// Whether this process may build labs; prints why not.
pub fn can_run(test: &str) -> bool {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("{test}: skipped: network-namespace tests need root");
        return false;
    }
    true
}

/// The agent under test, from `NETPOL_AGENT_BIN`; prints a skip notice when unset.
pub fn agent_bin(test: &str) -> Option<PathBuf> {
    if !can_run(test) {
        return None;
    }
    match std::env::var_os(netpol_lab::AGENT_BIN_ENV) {
        Some(p) => Some(PathBuf::from(p)),
        None => {
            eprintln!("{test}: skipped: NETPOL_AGENT_BIN is not set; run via `cargo xtask test`");
            None
        }
    }
}

/// Pod `ns/name` with label `pod=<name>`, serving TCP 80, TCP 81 and UDP 80, dual-stack:
/// 10.0.0.<i> and fd10::<i>.
pub fn standard_pod(ns: &str, name: &str, i: u8) -> PodSpec {
    PodSpec::new(ns, name)
        .label("pod", name)
        .ports([
            Port::tcp(80).named("serve-80-tcp"),
            Port::tcp(81).named("serve-81-tcp"),
            Port::udp(80).named("serve-80-udp"),
        ])
        .ipv4(Ipv4Addr::new(10, 0, 0, i))
        .ipv6(Ipv6Addr::new(0xfd10, 0, 0, 0, 0, 0, 0, i as u16))
}

/// A lab with namespaces `x` and `y` (labelled `ns=<name>`) and the given standard pods.
pub fn standard_lab(pods: &[&str]) -> Lab {
    let mut lab = Lab::new().expect("creating the lab");
    for ns in ["x", "y"] {
        lab.set_namespace_labels(ns, [("ns", ns)]);
    }
    for (i, id) in pods.iter().enumerate() {
        let (ns, name) = id.split_once('/').expect("ns/pod");
        lab.add_pod(standard_pod(ns, name, i as u8 + 1))
            .expect("adding a pod");
    }
    lab
}

/// The lab with its manifests and a running agent.
pub struct Cluster {
    // Field order is drop order: the agent stops before the lab goes away.
    pub agent: AgentProcess,
    pub manifests: ManifestDir,
    pub lab: Lab,
}

impl Cluster {
    /// Writes the manifests (no policies), starts `agent` and waits until it is ready.
    pub fn start(lab: Lab, agent: &std::path::Path) -> Self {
        let mut manifests =
            ManifestDir::create(lab.workdir().join("manifests")).expect("manifest dir");
        let generation = manifests.write(&lab, "").expect("writing manifests");
        let mut agent = AgentProcess::start(&lab, agent, &manifests).expect("starting the agent");
        agent
            .wait_generation(generation, AGENT_TIMEOUT)
            .expect("agent ready");
        Self {
            agent,
            manifests,
            lab,
        }
    }

    /// Writes the manifests with `policies_yaml`, starts `agent` with `extra` arguments
    /// after `--manifests DIR`, and waits until it applied them.
    pub fn start_with(
        lab: Lab,
        agent: &std::path::Path,
        policies_yaml: &str,
        extra: &[&str],
    ) -> Self {
        let mut manifests =
            ManifestDir::create(lab.workdir().join("manifests")).expect("manifest dir");
        let generation = manifests
            .write(&lab, policies_yaml)
            .expect("writing manifests");
        let mut args = vec![
            std::ffi::OsString::from("--manifests"),
            manifests.path().as_os_str().to_owned(),
        ];
        args.extend(extra.iter().map(std::ffi::OsString::from));
        let mut agent =
            AgentProcess::start_with_source(&lab, agent, &args).expect("starting the agent");
        agent
            .wait_generation(generation, AGENT_TIMEOUT)
            .expect("agent applied the manifests");
        Self {
            agent,
            manifests,
            lab,
        }
    }

    /// Rewrites the manifests with these policies and waits until the agent applied them.
    pub fn apply(&mut self, policies_yaml: &str) {
        let generation = self
            .manifests
            .write(&self.lab, policies_yaml)
            .expect("writing manifests");
        let status = self
            .agent
            .wait_generation(generation, AGENT_TIMEOUT)
            .expect("agent applied the change");
        assert_eq!(status.invalid, 0, "the agent rejected a policy: {status:?}");
    }

    /// [`check`] with the agent's log on failure.
    pub fn check(&self, expectations: &[(Probe, bool)]) {
        check(&self.lab, expectations, Some(&self.agent));
    }
}

/// Every probe from each source to each pod except itself, over TCP 80, TCP 81 and
/// UDP 80, both families when both ends have them.
pub fn all_probes(lab: &Lab, sources: &[&str]) -> Vec<Probe> {
    let mut probes = Vec::new();
    for &src in sources {
        for dst in lab.pods() {
            let dst_id = dst.id();
            if dst_id == src {
                continue;
            }
            for (port, proto) in [
                (80, Protocol::Tcp),
                (81, Protocol::Tcp),
                (80, Protocol::Udp),
            ] {
                let p = Probe::new(src, dst_id.clone(), port, proto);
                let src_has_v6 = src == NODE || lab.pod(src).is_some_and(|p| p.ipv6.is_some());
                if src_has_v6 && dst.ipv6.is_some() {
                    probes.push(p.clone().v6());
                }
                probes.push(p);
            }
        }
    }
    probes
}

/// Every pod id of the lab plus the node.
pub fn sources(lab: &Lab) -> Vec<String> {
    lab.pods()
        .iter()
        .map(|p| p.id())
        .chain([NODE.to_string()])
        .collect()
}

/// Runs all probes concurrently and fails with a readable list of every cell that
/// differs from its expectation (`true` = allowed).
pub fn check(lab: &Lab, expectations: &[(Probe, bool)], agent: Option<&AgentProcess>) {
    let probes: Vec<Probe> = expectations.iter().map(|(p, _)| p.clone()).collect();
    let results = lab.probe_all(&probes, PROBE_TIMEOUT).expect("probing");
    let wrong: Vec<String> = results
        .iter()
        .zip(expectations)
        .filter(|(r, (_, allowed))| !r.outcome.matches(*allowed))
        .map(|(r, (p, allowed))| {
            format!(
                "  {p}: expected {}, observed {}",
                if *allowed { "allowed" } else { "blocked" },
                r.outcome
            )
        })
        .collect();
    if !wrong.is_empty() {
        panic!(
            "{} of {} probes differ from the expectation:\n{}\n{}",
            wrong.len(),
            expectations.len(),
            wrong.join("\n"),
            agent.map(|a| a.log_tail(40)).unwrap_or_default()
        );
    }
}

/// Pairs every probe with the verdict the scenario predicts.
pub fn expect(probes: Vec<Probe>, allowed: impl Fn(&Probe) -> bool) -> Vec<(Probe, bool)> {
    probes
        .into_iter()
        .map(|p| {
            let a = allowed(&p);
            (p, a)
        })
        .collect()
}

/// Namespace part of an endpoint id (`x/a` -> `x`; `node` -> `node`).
pub fn ns_of(id: &str) -> &str {
    id.split_once('/').map_or(id, |(ns, _)| ns)
}

pub fn is_v6(p: &Probe) -> bool {
    p.family == Family::V6
}

/// The node-local health/metrics address (`--health-addr`, inside the node namespace).
pub const HEALTH: &str = "127.0.0.1:9808";

/// `GET path` from [`HEALTH`] inside the node namespace; returns (status line, body).
pub fn http_get(node: &NetnsWorker, path: &'static str) -> (String, String) {
    node.run(move || -> std::io::Result<(String, String)> {
        let mut stream =
            std::net::TcpStream::connect_timeout(&HEALTH.parse().unwrap(), Duration::from_secs(2))?;
        stream.set_read_timeout(Some(Duration::from_secs(2)))?;
        write!(stream, "GET {path} HTTP/1.1\r\nHost: node\r\n\r\n")?;
        let mut response = String::new();
        stream.read_to_string(&mut response)?;
        let (head, body) = response.split_once("\r\n\r\n").unwrap_or((&response, ""));
        Ok((
            head.lines().next().unwrap_or_default().to_owned(),
            body.to_owned(),
        ))
    })
    .expect("node worker")
    .expect("HTTP request")
}

/// The value of one exact series (`name{labels}`) in an OpenMetrics text.
pub fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|line| line.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

/// x/b accepts ingress only from x/c.
pub const B_ONLY_FROM_C: &str = r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: b-only-from-c, namespace: x}
spec:
  podSelector: {matchLabels: {pod: b}}
  ingress:
    - from: [{podSelector: {matchLabels: {pod: c}}}]
"#;

/// The lab with a running agent in Kubernetes mode, fed by the API server double
/// (listening on 127.0.0.1 inside node 0's namespace, where the agent runs).
pub struct KubeCluster {
    // Field order is drop order: the agent, then the double, then its runtime, then the lab.
    pub agent: AgentProcess,
    server: ApiServer,
    runtime: tokio::runtime::Runtime,
    pub lab: Lab,
}

impl KubeCluster {
    /// Starts the double with node 0's Node object and the lab's objects plus
    /// `policies`, then the agent (`--kubeconfig`, then `extra`), and waits until it has
    /// all of it in the kernel.
    pub fn start(lab: Lab, agent: &Path, policies: &[Value], extra: &[&str]) -> Self {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("the double's runtime");
        let listener = lab
            .worker(NODE)
            .expect("node worker")
            .run(|| std::net::TcpListener::bind("127.0.0.1:0"))
            .expect("node worker")
            .expect("binding the double in the node namespace");
        let server = {
            let _entered = runtime.enter();
            ApiServer::start_on(listener).expect("starting the double")
        };
        server.apply(json!({
            "apiVersion": "v1", "kind": "Node",
            "metadata": {"name": netpol_lab::NODE_NAME},
            "status": {"addresses": [
                {"type": "InternalIP", "address": netpol_lab::NODE_IPV4.to_string()},
                {"type": "InternalIP", "address": netpol_lab::NODE_IPV6.to_string()},
            ]},
        }));
        let kubeconfig = lab.workdir().join("kubeconfig");
        std::fs::write(&kubeconfig, server.kubeconfig()).expect("writing the kubeconfig");
        let mut args = vec![
            std::ffi::OsString::from("--kubeconfig"),
            kubeconfig.into_os_string(),
        ];
        args.extend(extra.iter().map(std::ffi::OsString::from));
        let agent =
            AgentProcess::start_with_source(&lab, agent, &args).expect("starting the agent");
        let mut cluster = KubeCluster {
            agent,
            server,
            runtime,
            lab,
        };
        cluster.publish(policies);
        cluster
    }

    /// Replaces every Namespace, Pod and NetworkPolicy in the double with the lab's and
    /// `policies`, and waits until the agent reports the double's resourceVersion.
    pub fn publish(&mut self, policies: &[Value]) {
        let objects = netpol_lab::cluster_objects(&self.lab);
        let of_kind = |kind: &str| -> Vec<Value> {
            objects
                .iter()
                .filter(|o| o["kind"] == kind)
                .cloned()
                .collect()
        };
        let version = {
            let _entered = self.runtime.enter();
            self.server.replace_all("Namespace", of_kind("Namespace"));
            self.server.replace_all("Pod", of_kind("Pod"));
            self.server.replace_all("NetworkPolicy", policies.to_vec())
        };
        self.agent
            .wait_generation(version, AGENT_TIMEOUT)
            .expect("the agent applied the objects");
    }

    /// [`check`] with the agent's log on failure.
    pub fn check(&self, expectations: &[(Probe, bool)]) {
        check(&self.lab, expectations, Some(&self.agent));
    }
}

/// A NetworkPolicy object from its YAML.
pub fn policy_object(yaml: &str) -> Value {
    serde_norway::from_str(yaml).expect("a policy in YAML")
}

/// An IPv4 + UDP packet (IP_HDRINCL): the kernel fills the IP checksum and length; a UDP
/// checksum of 0 means "none" in IPv4.
pub fn udp_packet(src: SocketAddrV4, dst: SocketAddrV4, payload: &[u8]) -> Vec<u8> {
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
pub fn send_raw(from: &NetnsWorker, src: SocketAddrV4, dst: SocketAddrV4, payload: &'static [u8]) {
    from.run(move || -> std::io::Result<()> {
        let raw = socket2::Socket::new(
            socket2::Domain::IPV4,
            socket2::Type::RAW,
            Some(socket2::Protocol::from(libc::IPPROTO_RAW)),
        )?;
        raw.send_to(&udp_packet(src, dst, payload), &SocketAddr::V4(dst).into())?;
        Ok(())
    })
    .expect("worker")
    .expect("sending the crafted datagram");
}

/// Whether `socket` receives `payload` within a second.
pub fn receives(socket: &UdpSocket, payload: &[u8]) -> bool {
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

/// A UDP socket bound to `ip:port` in `worker`'s namespace, reading with a short timeout.
pub fn listen_udp(worker: &NetnsWorker, ip: Ipv4Addr, port: u16) -> UdpSocket {
    let socket = worker
        .run(move || UdpSocket::bind(SocketAddrV4::new(ip, port)))
        .expect("worker")
        .expect("binding a UDP socket");
    socket
        .set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    socket
}

/// Whether pod `spoofer` gets a datagram carrying pod `victim`'s address through to pod
/// `echo`'s UDP echo server on port 80 (which would echo it to `victim`). Before that it
/// checks that the path works: `spoofer`'s datagram with its own address is echoed.
pub fn borrows_address(lab: &Lab, spoofer: &str, victim: &str, echo: &str) -> bool {
    let (s, v, e) = (
        lab.pod(spoofer).unwrap(),
        lab.pod(victim).unwrap(),
        lab.pod(echo).unwrap(),
    );
    let echo = SocketAddrV4::new(e.v4(), 80);
    let worker_s = NetnsWorker::spawn(&s.netns).expect("spoofer worker");
    let worker_v = NetnsWorker::spawn(&v.netns).expect("victim worker");
    let at_v = listen_udp(&worker_v, v.v4(), 40_011);
    let at_s = listen_udp(&worker_s, s.v4(), 40_012);
    send_raw(
        &worker_s,
        SocketAddrV4::new(s.v4(), 40_012),
        echo,
        b"honest",
    );
    assert!(
        receives(&at_s, b"honest"),
        "{spoofer}'s own datagram to {echo} is echoed"
    );
    for _ in 0..3 {
        send_raw(
            &worker_s,
            SocketAddrV4::new(v.v4(), 40_011),
            echo,
            b"borrowed",
        );
    }
    receives(&at_v, b"borrowed")
}
