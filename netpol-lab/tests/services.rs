//! Tier 3: connections through Services, translated by kube-proxy's own rules
//! (iptables mode) in the node namespace, with the real agent: the egress decision is
//! taken on the backend kube-proxy picked. Each test states what would break if the
//! decision were taken on the Service address (`--service-mark 0` turns it off).

mod support;

use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use netpol_lab::dns::{self, DnsServer, Transport, Zone};
use netpol_lab::{Lab, NetnsWorker, PodSpec, Protocol, ServicePort, ServiceSpec, TargetPort};
use support::*;

/// Port on which the backends of these tests name themselves.
const NAME_PORT: u16 = 9000;

/// A server in a pod that answers every connection with the pod's name; stops on drop.
struct NameServer {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl NameServer {
    fn start(worker: &NetnsWorker, ip: Ipv4Addr, name: &'static str) -> NameServer {
        let listener = worker
            .run(move || TcpListener::bind(SocketAddr::new(IpAddr::V4(ip), NAME_PORT)))
            .expect("worker")
            .expect("binding the name server");
        listener.set_nonblocking(true).unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let stopping = stop.clone();
        let thread = std::thread::spawn(move || {
            while !stopping.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((mut stream, _)) => {
                        let _ = stream.write_all(name.as_bytes());
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(5)),
                }
            }
        });
        NameServer {
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for NameServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// One connection from `worker`'s namespace to `target`: the name the backend sent, or
/// `Err` (timeout, refusal) with what happened.
fn name_at(worker: &NetnsWorker, target: SocketAddr) -> Result<String, String> {
    worker
        .run(move || {
            let mut stream = TcpStream::connect_timeout(&target, Duration::from_millis(700))
                .map_err(|e| e.kind().to_string())?;
            stream
                .set_read_timeout(Some(Duration::from_millis(700)))
                .map_err(|e| e.to_string())?;
            let mut name = String::new();
            stream
                .read_to_string(&mut name)
                .map_err(|e| e.kind().to_string())?;
            Ok(name)
        })
        .expect("worker")
}

/// x/client (10.0.0.1), and two backends labelled `tier=db` (10.0.0.2 and 10.0.0.3, on
/// the nodes given) behind Service x/db (port 19000 to their name servers).
fn client_and_db_backends(lab: &mut Lab, backends: [(&'static str, usize); 2]) -> Vec<NameServer> {
    lab.add_pod(pod("x", "client", 1)).unwrap();
    let mut servers = Vec::new();
    for (i, (name, node)) in (2u8..).zip(backends) {
        lab.add_pod(pod("x", name, i).label("tier", "db").on_node(node))
            .unwrap();
        let worker = lab.worker(&format!("x/{name}")).unwrap();
        servers.push(NameServer::start(&worker, Ipv4Addr::new(10, 0, 0, i), name));
    }
    lab.add_service(
        ServiceSpec::new("x", "db")
            .select("tier", "db")
            .port(name_port("names")),
    )
    .unwrap();
    servers
}

fn pod(ns: &str, name: &str, i: u8) -> PodSpec {
    standard_pod(ns, name, i).label("app", name)
}

fn name_port(name: &str) -> ServicePort {
    ServicePort {
        name: Some(name.to_owned()),
        protocol: Protocol::Tcp,
        port: 19000,
        target: TargetPort::Number(NAME_PORT),
    }
}

/// client may reach `app=good` on the name port, nothing else.
const CLIENT_TO_GOOD: &str = r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: client-to-good, namespace: x}
spec:
  podSelector: {matchLabels: {app: client}}
  policyTypes: [Egress]
  egress:
    - to: [{podSelector: {matchLabels: {app: good}}}]
      ports: [{protocol: TCP, port: 9000}]
"#;

#[test]
fn a_service_whose_backends_get_different_verdicts_reaches_only_the_allowed_one() {
    let Some(agent) = agent_bin("a_service_whose_backends_get_different_verdicts_...") else {
        return;
    };
    let mut lab = Lab::new().expect("lab");
    let _names = client_and_db_backends(&mut lab, [("good", 0), ("bad", 0)]);
    let cluster = Cluster::start_with(lab, &agent, CLIENT_TO_GOOD, &[]);
    let lab = &cluster.lab;
    let service = SocketAddr::new(
        IpAddr::V4(
            lab.service("x/db")
                .unwrap()
                .ipv4
                .expect("an IPv4 ClusterIP"),
        ),
        19000,
    );
    let client = lab.worker("x/client").unwrap();

    let mut reached_good = 0;
    let mut failed = 0;
    for _ in 0..40 {
        match name_at(&client, service) {
            Ok(name) => {
                assert_eq!(
                    name, "good",
                    "a connection reached the backend the policy denies"
                );
                reached_good += 1;
            }
            Err(_) => failed += 1,
        }
    }
    // kube-proxy picks each backend with probability 1/2: both outcomes occur (the
    // chance that 40 picks are all one backend is 2^-39).
    assert!(
        reached_good > 0,
        "no connection reached the allowed backend"
    );
    assert!(
        failed > 0,
        "no connection was dropped: the denied backend was never judged"
    );
    // The allowed backend directly: allowed; the denied one directly: dropped.
    assert_eq!(
        name_at(&client, "10.0.0.2:9000".parse().unwrap()).as_deref(),
        Ok("good")
    );
    assert!(name_at(&client, "10.0.0.3:9000".parse().unwrap()).is_err());
}

/// good isolates itself completely: nothing in, nothing out.
const GOOD_ISOLATED: &str = r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: isolate-good, namespace: x}
spec:
  podSelector: {matchLabels: {app: good}}
  policyTypes: [Ingress, Egress]
"#;

#[test]
fn a_pod_reaching_itself_through_its_own_service_is_always_allowed() {
    let Some(agent) = agent_bin("a_pod_reaching_itself_through_its_own_service_...") else {
        return;
    };
    let mut lab = Lab::new().expect("lab");
    lab.add_pod(pod("x", "good", 2)).unwrap();
    lab.add_pod(pod("x", "other", 3)).unwrap();
    lab.add_service(
        ServiceSpec::new("x", "self")
            .select("app", "good")
            .port(name_port("names")),
    )
    .unwrap();
    let _good = NameServer::start(
        &lab.worker("x/good").unwrap(),
        Ipv4Addr::new(10, 0, 0, 2),
        "good",
    );
    let cluster = Cluster::start_with(lab, &agent, GOOD_ISOLATED, &[]);
    let lab = &cluster.lab;
    let service = SocketAddr::new(
        IpAddr::V4(
            lab.service("x/self")
                .unwrap()
                .ipv4
                .expect("an IPv4 ClusterIP"),
        ),
        19000,
    );
    // kube-proxy masquerades the hairpin connection to the node's address.
    for _ in 0..3 {
        assert_eq!(
            name_at(&lab.worker("x/good").unwrap(), service).as_deref(),
            Ok("good"),
            "the pod could not reach itself through its Service"
        );
    }
    // Anyone else is still kept out by good's ingress policy.
    assert!(name_at(&lab.worker("x/other").unwrap(), service).is_err());
}

#[test]
fn a_service_without_endpoints_is_refused_by_kube_proxy_not_dropped() {
    let Some(agent) = agent_bin("a_service_without_endpoints_is_refused_...") else {
        return;
    };
    let mut lab = Lab::new().expect("lab");
    lab.add_pod(pod("x", "client", 1)).unwrap();
    lab.add_service(
        ServiceSpec::new("x", "empty")
            .select("app", "nobody")
            .port(name_port("names")),
    )
    .unwrap();
    let cluster = Cluster::start_with(lab, &agent, CLIENT_TO_GOOD, &[]);
    let lab = &cluster.lab;
    let service = SocketAddr::new(
        IpAddr::V4(
            lab.service("x/empty")
                .unwrap()
                .ipv4
                .expect("an IPv4 ClusterIP"),
        ),
        19000,
    );
    // kube-proxy rejects it: the client learns at once, as without any policy. Judged
    // on the Service address instead, the policy would drop it silently.
    let outcome = name_at(&lab.worker("x/client").unwrap(), service);
    assert_eq!(
        outcome,
        Err(std::io::ErrorKind::ConnectionRefused.to_string())
    );
}

const KUBE_SYSTEM_DNS: &str = "kube-system/coredns";

/// Default deny egress for namespace x, and the usual rule that lets `app=resolver`
/// reach cluster DNS.
const DNS_POLICIES: &str = r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: default-deny-egress, namespace: x}
spec:
  podSelector: {}
  policyTypes: [Egress]
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: allow-dns, namespace: x}
spec:
  podSelector: {matchLabels: {app: resolver}}
  policyTypes: [Egress]
  egress:
    - to:
        - namespaceSelector: {matchLabels: {kubernetes.io/metadata.name: kube-system}}
          podSelector: {matchLabels: {k8s-app: kube-dns}}
      ports:
        - {protocol: UDP, port: 53}
        - {protocol: TCP, port: 53}
"#;

#[test]
fn cluster_dns_behind_its_service_resolves_for_a_pod_with_the_allow_dns_rule_only() {
    let Some(agent) = agent_bin("cluster_dns_behind_its_service_resolves_...") else {
        return;
    };
    let mut lab = Lab::new().expect("lab");
    lab.add_pod(pod("x", "resolver", 1)).unwrap();
    lab.add_pod(pod("x", "other", 2)).unwrap();
    lab.add_pod(
        PodSpec::new("kube-system", "coredns")
            .label("k8s-app", "kube-dns")
            .ipv4(Ipv4Addr::new(10, 0, 0, 53)),
    )
    .unwrap();
    let dns_port = |name: &str, protocol| ServicePort {
        name: Some(name.to_owned()),
        protocol,
        port: 53,
        target: TargetPort::Number(53),
    };
    lab.add_service(
        ServiceSpec::new("kube-system", "kube-dns")
            .select("k8s-app", "kube-dns")
            .port(dns_port("dns", Protocol::Udp))
            .port(dns_port("dns-tcp", Protocol::Tcp)),
    )
    .unwrap();
    let answer: IpAddr = "10.0.0.2".parse().unwrap();
    let zone = Zone::from([("db.x.svc.cluster.local".to_owned(), vec![answer])]);
    // The server answers on this runtime's own thread.
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let _dns = DnsServer::start(
        &runtime,
        &lab.worker(KUBE_SYSTEM_DNS).unwrap(),
        "10.0.0.53:53".parse().unwrap(),
        zone,
    )
    .expect("DNS server");
    let cluster = Cluster::start_with(lab, &agent, DNS_POLICIES, &[]);
    let lab = &cluster.lab;
    let server = IpAddr::V4(
        lab.service("kube-system/kube-dns")
            .unwrap()
            .ipv4
            .expect("an IPv4 ClusterIP"),
    );
    let name = "db.x.svc.cluster.local.";
    for transport in [Transport::Udp, Transport::Tcp] {
        let resolver = &lab.pod("x/resolver").unwrap().netns;
        assert_eq!(
            dns::resolve(resolver, server, name, transport).unwrap(),
            [answer],
            "x/resolver over {transport:?}"
        );
        let other = &lab.pod("x/other").unwrap().netns;
        assert_eq!(
            dns::resolve(other, server, name, transport).unwrap(),
            Vec::<IpAddr>::new(),
            "x/other has no DNS rule, over {transport:?}"
        );
    }
    drop(cluster);
    drop(runtime);
}

#[test]
fn the_lab_translates_services_to_every_backend_in_both_proxy_modes() {
    if !can_run("the_lab_translates_services_to_every_backend_in_both_proxy_modes") {
        return;
    }
    let mut lab = Lab::with_nodes(2).expect("lab");
    let _names = client_and_db_backends(&mut lab, [("near", 0), ("far", 1)]);
    let service = SocketAddr::new(
        IpAddr::V4(
            lab.service("x/db")
                .unwrap()
                .ipv4
                .expect("an IPv4 ClusterIP"),
        ),
        19000,
    );
    let client = lab.worker("x/client").unwrap();
    for mode in [
        netpol_lab::ProxyMode::Iptables,
        netpol_lab::ProxyMode::Nftables,
    ] {
        lab.set_proxy_mode(mode).expect("kube-proxy's rules");
        let mut seen = std::collections::BTreeSet::new();
        for _ in 0..40 {
            seen.insert(name_at(&client, service).expect("no enforcement: always reached"));
        }
        assert_eq!(
            seen.into_iter().collect::<Vec<_>>(),
            ["far", "near"],
            "{mode:?}"
        );
    }
}

#[test]
fn ports_of_the_standard_pods_are_reachable_through_a_service_port_that_differs() {
    if !can_run("ports_of_the_standard_pods_are_reachable_through_a_service_port_...") {
        return;
    }
    let mut lab = Lab::new().expect("lab");
    lab.add_pod(pod("x", "a", 1)).unwrap();
    lab.add_pod(pod("x", "b", 2)).unwrap();
    lab.add_service(
        ServiceSpec::new("x", "b")
            .select("app", "b")
            .port(ServicePort {
                name: Some("web".into()),
                protocol: Protocol::Tcp,
                port: 10080,
                target: TargetPort::Name("serve-80-tcp".into()),
            })
            .port(ServicePort {
                name: Some("udp".into()),
                protocol: Protocol::Udp,
                port: 10080,
                target: TargetPort::Number(80),
            }),
    )
    .unwrap();
    for probe in [
        netpol_lab::Probe::tcp("x/a", "svc/x/b", 10080),
        netpol_lab::Probe::udp("x/a", "svc/x/b", 10080),
        netpol_lab::Probe::tcp("x/a", "svc/x/b", 10080).v6(),
    ] {
        let result = lab.probe(&probe, PROBE_TIMEOUT).unwrap();
        assert!(result.outcome.is_allowed(), "{probe}: {result:?}");
    }
}
