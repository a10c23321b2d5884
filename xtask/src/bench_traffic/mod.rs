//! `cargo xtask bench traffic`: pod-to-pod TCP throughput and 1-byte request/response
//! latency on an emulated node, with no enforcement, with netpol enforcing 1,000
//! NetworkPolicies, and with the same policies enforced the iptables + ipset way (as
//! kube-router does). See docs/BENCHMARKS.md ("Traffic").

use std::fmt::Write as _;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use netpol_lab::{AgentProcess, Lab, ManifestDir, PodSpec, Port, Probe};
use serde_json::json;

use crate::ui;

const STREAM_PORT: u16 = 5201;
const RR_PORT: u16 = 5202;
const PROBE_PORT: u16 = 80;
const POLICIES: usize = 1000;
/// Policies that select the server (the rest select other, absent, pods).
const SERVER_POLICIES: usize = 10;
const OTHER_NAMESPACES: usize = 20;
const WRITE_SIZE: usize = 64 * 1024;
const MARK: &str = "0x10000/0x10000";

/// Sizes of one run.
#[derive(Clone, Copy, Debug)]
pub struct Sizes {
    pub runs: usize,
    pub stream_for: Duration,
    pub round_trips: usize,
}

impl Sizes {
    pub fn new(smoke: bool) -> Self {
        if smoke {
            Self {
                runs: 1,
                stream_for: Duration::from_millis(200),
                round_trips: 300,
            }
        } else {
            Self {
                runs: 7,
                stream_for: Duration::from_secs(3),
                round_trips: 20_000,
            }
        }
    }
}

/// One measured setup: medians over the runs.
#[derive(Clone, Debug)]
struct Row {
    setup: &'static str,
    gbits: Vec<f64>,
    p50_us: Vec<f64>,
    p99_us: Vec<f64>,
}

impl Row {
    fn new(setup: &'static str) -> Self {
        Row {
            setup,
            gbits: Vec::new(),
            p50_us: Vec::new(),
            p99_us: Vec::new(),
        }
    }
}

fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    if s.is_empty() {
        return f64::NAN;
    }
    let n = s.len();
    if n % 2 == 1 {
        s[n / 2]
    } else {
        (s[n / 2 - 1] + s[n / 2]) / 2.0
    }
}

impl Row {
    fn gbit(&self) -> f64 {
        median(&self.gbits)
    }
    fn p50(&self) -> f64 {
        median(&self.p50_us)
    }
    fn p99(&self) -> f64 {
        median(&self.p99_us)
    }
}

/// Runs the benchmark: prints the table, writes `target/bench/traffic.json`.
pub fn run(agent_bin: &Path, smoke: bool) -> Result<()> {
    if !nix::unistd::geteuid().is_root() {
        println!("traffic: skipped (needs root for the lab)");
        return Ok(());
    }
    let sizes = Sizes::new(smoke);
    let started = Instant::now();
    let mut lab = Lab::new()?;
    lab.set_namespace_labels("x", [("team", "x")]);
    for i in 0..OTHER_NAMESPACES {
        lab.set_namespace_labels(&format!("ns-{i}"), [("team", format!("t{}", i % 5))]);
    }
    lab.add_pod(
        PodSpec::new("x", "client")
            .label("app", "client")
            .label("tier", "frontend"),
    )?;
    lab.add_pod(
        PodSpec::new("x", "server")
            .label("app", "server")
            .label("tier", "backend")
            .port(Port::tcp(PROBE_PORT)),
    )?;
    // Not allowed by any policy: proves the policies are in force.
    lab.add_pod(PodSpec::new("x", "intruder").label("app", "intruder"))?;

    let server = lab.pod("x/server").context("x/server")?;
    let server_ip = server.ipv4;
    let servers = BenchServers::start(&lab, server_ip)?;
    let policies = generate_policies();
    let rules = IptablesRules::generate(&lab, &policies)?;
    let iptables_counts = (rules.chains, rules.rules, rules.sets, rules.set_members);
    let mut manifests = ManifestDir::create(lab.workdir().join("manifests"))?;
    let generation = manifests.write(&lab, &policies_yaml(&policies)?)?;
    let mut iptables_load = Duration::ZERO;
    let mut agent_ready = Duration::ZERO;

    // The setups take turns, one run each per round, and each round starts with the
    // next setup: drift in the machine (other tenants, frequency) spreads over all
    // three instead of landing on whichever was measured in its block.
    let names = ["none", "netpol (1,000 policies)", "iptables + ipset"];
    let mut rows: Vec<Row> = names.iter().map(|name| Row::new(name)).collect();
    check_enforcement(&lab, false, "none")?;
    for round in 0..sizes.runs {
        ui::step(&format!("traffic: round {} of {}", round + 1, sizes.runs));
        for k in 0..names.len() {
            let setup = (round + k) % names.len();
            match setup {
                0 => {
                    measure(&lab, server_ip, sizes, &mut rows[0])?;
                }
                1 => {
                    let started = Instant::now();
                    // Detach on exit: after the run the node is back to no enforcement.
                    let source = [
                        std::ffi::OsString::from("--manifests"),
                        manifests.path().as_os_str().to_owned(),
                        std::ffi::OsString::from("--on-exit"),
                        std::ffi::OsString::from("detach"),
                    ];
                    let mut agent = AgentProcess::start_with_source(&lab, agent_bin, &source)?;
                    agent
                        .wait_generation(generation, Duration::from_secs(60))
                        .with_context(|| format!("agent log:\n{}", agent.log_tail(30)))?;
                    agent_ready = agent_ready.max(started.elapsed());
                    check_enforcement(&lab, true, "netpol")?;
                    measure(&lab, server_ip, sizes, &mut rows[1])?;
                    let exit = agent.stop()?;
                    // The kernel releases the links as the last references go: allow it
                    // a moment (bounded).
                    let deadline = Instant::now() + Duration::from_secs(3);
                    let mut detached = check_enforcement(&lab, false, "none, agent detached");
                    while detached.is_err() && Instant::now() < deadline {
                        std::thread::sleep(Duration::from_millis(100));
                        detached = check_enforcement(&lab, false, "none, agent detached");
                    }
                    detached.with_context(|| {
                        format!("agent exit {exit:?}, log:\n{}", agent.log_tail(15))
                    })?;
                    drop(agent);
                }
                _ => {
                    let started = Instant::now();
                    rules.load(lab.node_netns())?;
                    iptables_load = iptables_load.max(started.elapsed());
                    check_enforcement(&lab, true, "iptables")?;
                    measure(&lab, server_ip, sizes, &mut rows[2])?;
                    IptablesRules::unload(lab.node_netns())?;
                    check_enforcement(&lab, false, "none, after removing the iptables rules")?;
                }
            }
        }
    }
    for row in &rows {
        ui::ok(&format!(
            "{}: {:.2} Gbit/s, RR p50 {:.1} µs, p99 {:.1} µs (medians of {} runs)",
            row.setup,
            row.gbit(),
            row.p50(),
            row.p99(),
            row.gbits.len()
        ));
    }

    servers.stop();
    drop(lab);

    let base = rows[0].clone();
    // Reported in this order: the floor, netpol, then the iptables way beside it.
    let mut out = String::new();
    let _ = writeln!(
        out,
        "\n| setup | throughput (Gbit/s) | RR p50 (µs) | RR p99 (µs) |\n|:---|---:|---:|---:|"
    );
    for r in &rows {
        let _ = writeln!(
            out,
            "| {} | {:.2} ({:.2}×) | {:.1} ({:.2}×) | {:.1} ({:.2}×) |",
            r.setup,
            r.gbit(),
            r.gbit() / base.gbit(),
            r.p50(),
            r.p50() / base.p50(),
            r.p99(),
            r.p99() / base.p99()
        );
    }
    let netpol = &rows[1];
    let tput_ok = netpol.gbit() >= 0.95 * base.gbit();
    let p99_ok = netpol.p99() <= 1.1 * base.p99();
    // The same ratios round by round (each setup against "none" of its own round), then
    // the median: drift between rounds cancels out. Shown beside the targets, which are
    // judged on the ratios of the medians above.
    let paired = |row: &Row, values: fn(&Row) -> &Vec<f64>| {
        median(
            &values(row)
                .iter()
                .zip(values(&base))
                .map(|(v, b)| v / b)
                .collect::<Vec<_>>(),
        )
    };
    for r in &rows[1..] {
        let _ = writeln!(
            out,
            "{}: per-round ratios to none, median: throughput {:.2}×, RR p50 {:.2}×, p99 {:.2}×",
            r.setup,
            paired(r, |r| &r.gbits),
            paired(r, |r| &r.p50_us),
            paired(r, |r| &r.p99_us),
        );
    }
    let _ = writeln!(
        out,
        "\nmethod: x/client -> x/server over veths through the node namespace; throughput: \
         64 KiB writes for {:?}; RR: {} 1-byte round trips on one connection \
         (TCP_NODELAY), per-run p50/p99. {} rounds, the setups taking turns within each \
         round (rotated), medians over rounds; client on CPU 0, servers on CPU 1.\n\
         targets: netpol throughput >= 0.95x none: {} ; netpol p99 <= 1.1x none: {}\n\
         iptables: {} chains, {} rules, {} ipsets ({} members) loaded in {:.0?}; \
         agent ready (1,000 policies) in {:.0?}; total {:.1?}",
        sizes.stream_for,
        sizes.round_trips,
        sizes.runs,
        if tput_ok { "met" } else { "MISSED" },
        if p99_ok { "met" } else { "MISSED" },
        iptables_counts.0,
        iptables_counts.1,
        iptables_counts.2,
        iptables_counts.3,
        iptables_load,
        agent_ready,
        started.elapsed(),
    );
    println!("{out}");

    let json = json!({
        "smoke": smoke,
        "policies": POLICIES,
        "policies_selecting_server": SERVER_POLICIES,
        "stream_seconds": sizes.stream_for.as_secs_f64(),
        "round_trips": sizes.round_trips,
        "runs": sizes.runs,
        "iptables": {
            "chains": iptables_counts.0, "rules": iptables_counts.1,
            "ipsets": iptables_counts.2, "ipset_members": iptables_counts.3,
            "load_ms": iptables_load.as_secs_f64() * 1e3,
        },
        "agent_ready_ms": agent_ready.as_secs_f64() * 1e3,
        "targets": {"netpol_throughput_ge_0.95": tput_ok, "netpol_p99_le_1.1": p99_ok},
        "setups": rows.iter().map(|r| json!({
            "setup": r.setup,
            "gbit_s": r.gbit(), "gbit_s_runs": r.gbits,
            "gbit_ratio": r.gbit() / base.gbit(),
            "rr_p50_us": r.p50(), "rr_p50_runs": r.p50_us, "rr_p50_ratio": r.p50() / base.p50(),
            "rr_p99_us": r.p99(), "rr_p99_runs": r.p99_us, "rr_p99_ratio": r.p99() / base.p99(),
            "paired_ratio_medians": {
                "gbit_s": paired(r, |r| &r.gbits),
                "rr_p50": paired(r, |r| &r.p50_us),
                "rr_p99": paired(r, |r| &r.p99_us),
            },
        })).collect::<Vec<_>>(),
    });
    let dir = crate::cargo::workspace_root().join("target/bench");
    std::fs::create_dir_all(&dir)?;
    let path = dir.join("traffic.json");
    std::fs::write(&path, serde_json::to_string_pretty(&json)?)?;
    println!("wrote {}", path.display());
    Ok(())
}

/// Allowed: x/client -> x/server:80. Under enforcement, x/intruder -> x/server:80 must be
/// blocked; without, allowed.
fn check_enforcement(lab: &Lab, enforced: bool, what: &str) -> Result<()> {
    let probes = [
        Probe::tcp("x/client", "x/server", PROBE_PORT),
        Probe::tcp("x/intruder", "x/server", PROBE_PORT),
    ];
    let results = lab.probe_all(&probes, Duration::from_millis(300))?;
    if !results[0].outcome.is_allowed() {
        bail!("{what}: x/client -> x/server:80 was {}", results[0].outcome);
    }
    let intruder_ok = if enforced {
        results[1].outcome.is_blocked()
    } else {
        results[1].outcome.is_allowed()
    };
    if !intruder_ok {
        bail!(
            "{what}: x/intruder -> x/server:80 was {} (expected {})",
            results[1].outcome,
            if enforced { "blocked" } else { "allowed" }
        );
    }
    ui::ok(&format!(
        "{what}: client allowed, intruder {}",
        if enforced { "blocked" } else { "allowed" }
    ));
    Ok(())
}

/// One run of `row`'s setup: a throughput stream, then request/response, from x/client
/// pinned to CPU 0 (the servers run on CPU 1).
fn measure(lab: &Lab, server: Ipv4Addr, sizes: Sizes, row: &mut Row) -> Result<()> {
    let client = lab.worker("x/client")?;
    client.run(|| pin_to_cpu(0))?;
    let stream_addr = SocketAddr::new(server.into(), STREAM_PORT);
    let conn =
        client.run(move || TcpStream::connect_timeout(&stream_addr, Duration::from_secs(2)))??;
    row.gbits.push(stream(conn, sizes.stream_for)?);
    let rr_addr = SocketAddr::new(server.into(), RR_PORT);
    let conn =
        client.run(move || TcpStream::connect_timeout(&rr_addr, Duration::from_secs(2)))??;
    let (p50, p99) = request_response(conn, sizes.round_trips)?;
    row.p50_us.push(p50);
    row.p99_us.push(p99);
    Ok(())
}

/// Pins the calling thread to `cpu` when the machine has it (best effort: a bench on one
/// CPU still runs).
fn pin_to_cpu(cpu: usize) {
    let mut set = nix::sched::CpuSet::new();
    let online = std::thread::available_parallelism().map_or(1, usize::from);
    if cpu < online && set.set(cpu).is_ok() {
        let _ = nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &set);
    }
}

/// Writes 64 KiB chunks for `duration`, half-closes, waits for the receiver to close
/// (it has read everything): bits per second over the whole exchange, in Gbit/s.
fn stream(mut conn: TcpStream, duration: Duration) -> Result<f64> {
    let buf = vec![0x5au8; WRITE_SIZE];
    let start = Instant::now();
    let mut sent = 0u64;
    while start.elapsed() < duration {
        conn.write_all(&buf).context("stream write")?;
        sent += WRITE_SIZE as u64;
    }
    conn.shutdown(std::net::Shutdown::Write)?;
    let mut ack = [0u8; 8];
    conn.read_exact(&mut ack).context("stream byte count")?;
    let elapsed = start.elapsed().as_secs_f64();
    let received = u64::from_be_bytes(ack);
    if received != sent {
        bail!("the receiver got {received} of {sent} bytes");
    }
    Ok(sent as f64 * 8.0 / elapsed / 1e9)
}

/// `round_trips` 1-byte ping-pongs after 100 warm-up ones: (p50, p99) in µs.
fn request_response(mut conn: TcpStream, round_trips: usize) -> Result<(f64, f64)> {
    conn.set_nodelay(true)?;
    let mut b = [1u8];
    for _ in 0..100 {
        conn.write_all(&b)?;
        conn.read_exact(&mut b)?;
    }
    let mut times = Vec::with_capacity(round_trips);
    for _ in 0..round_trips {
        let t = Instant::now();
        conn.write_all(&b)?;
        conn.read_exact(&mut b)?;
        times.push(t.elapsed().as_secs_f64() * 1e6);
    }
    times.sort_by(f64::total_cmp);
    let pct = |p: f64| times[((times.len() as f64 * p) as usize).min(times.len() - 1)];
    Ok((pct(0.50), pct(0.99)))
}

/// The bulk receiver and the echo server, bound inside x/server.
struct BenchServers {
    stop: Arc<AtomicBool>,
    addrs: Vec<SocketAddr>,
    threads: Vec<JoinHandle<()>>,
    client: Arc<netpol_lab::NetnsWorker>,
}

impl BenchServers {
    fn start(lab: &Lab, ip: Ipv4Addr) -> Result<Self> {
        let worker = lab.worker("x/server")?;
        let stop = Arc::new(AtomicBool::new(false));
        let mut threads = Vec::new();
        let mut addrs = Vec::new();
        for (port, echo) in [(STREAM_PORT, false), (RR_PORT, true)] {
            let addr = SocketAddr::new(ip.into(), port);
            let listener = worker.run(move || TcpListener::bind(addr))??;
            let stop = stop.clone();
            addrs.push(addr);
            threads.push(std::thread::spawn(move || {
                pin_to_cpu(1);
                while let Ok((conn, _)) = listener.accept() {
                    if stop.load(Ordering::Relaxed) {
                        break;
                    }
                    let _ = if echo { echo_conn(conn) } else { sink(conn) };
                }
            }));
        }
        Ok(Self {
            stop,
            addrs,
            threads,
            client: lab.worker("x/client")?,
        })
    }

    /// Wakes the accept loops with one connection each (from x/client, which every
    /// setup allows) and joins them.
    fn stop(self) {
        self.stop.store(true, Ordering::Relaxed);
        for addr in self.addrs {
            let _ = self
                .client
                .run(move || TcpStream::connect_timeout(&addr, Duration::from_secs(1)));
        }
        for t in self.threads {
            let _ = t.join();
        }
    }
}

fn sink(mut conn: TcpStream) -> std::io::Result<()> {
    let mut buf = vec![0u8; 256 * 1024];
    let mut total = 0u64;
    loop {
        match conn.read(&mut buf)? {
            0 => break,
            n => total += n as u64,
        }
    }
    conn.write_all(&total.to_be_bytes())
}

fn echo_conn(mut conn: TcpStream) -> std::io::Result<()> {
    conn.set_nodelay(true)?;
    let mut b = [0u8; 1];
    loop {
        match conn.read(&mut b)? {
            0 => return Ok(()),
            _ => conn.write_all(&b)?,
        }
    }
}

// ---------------------------------------------------------------------------------------
// Policies

type Labels = Vec<(String, String)>;

/// A peer of an ingress rule.
#[derive(Clone, Debug)]
enum Peer {
    /// Pods matching `pod` labels in namespaces matching `ns` labels (`None`: the
    /// policy's namespace).
    Pods {
        ns: Option<Labels>,
        pod: Labels,
    },
    Cidr(String),
}

#[derive(Clone, Debug)]
struct Rule {
    from: Vec<Peer>,
    ports: Vec<u16>,
}

#[derive(Clone, Debug)]
struct Policy {
    namespace: String,
    name: String,
    selector: Labels,
    ingress: Vec<Rule>,
}

fn l(pairs: &[(&str, String)]) -> Labels {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), v.clone()))
        .collect()
}

/// 1,000 ingress policies: 10 select x/server (each allows x/client among other peers
/// and ports), the others select absent pods in x and 20 other namespaces with the same
/// shapes (pod and namespace selectors, ipBlocks, 1-3 rules, 1-4 ports).
fn generate_policies() -> Vec<Policy> {
    let mut out = Vec::with_capacity(POLICIES);
    for i in 0..SERVER_POLICIES {
        out.push(Policy {
            namespace: "x".into(),
            name: format!("server-{i}"),
            selector: l(&[("app", "server".into())]),
            ingress: vec![
                Rule {
                    from: vec![
                        Peer::Pods {
                            ns: None,
                            pod: l(&[("app", "client".into())]),
                        },
                        Peer::Pods {
                            ns: None,
                            pod: l(&[("app", format!("web-{i}"))]),
                        },
                        Peer::Pods {
                            ns: Some(l(&[("team", format!("t{}", i % 5))])),
                            pod: l(&[("tier", "frontend".into())]),
                        },
                    ],
                    ports: vec![PROBE_PORT, STREAM_PORT, RR_PORT, 8000 + i as u16],
                },
                Rule {
                    from: vec![Peer::Cidr(format!("192.168.{i}.0/24"))],
                    ports: vec![9000 + i as u16],
                },
            ],
        });
    }
    for i in SERVER_POLICIES..POLICIES {
        let namespace = if i % 4 == 0 {
            "x".to_owned()
        } else {
            format!("ns-{}", i % OTHER_NAMESPACES)
        };
        let mut ingress = vec![Rule {
            from: vec![Peer::Pods {
                ns: None,
                pod: l(&[("app", format!("svc-{}", i + 1))]),
            }],
            ports: (0..1 + i % 4).map(|k| 8080 + k as u16).collect(),
        }];
        if i % 2 == 0 {
            ingress.push(Rule {
                from: vec![Peer::Pods {
                    ns: Some(l(&[("team", format!("t{}", i % 5))])),
                    pod: l(&[("tier", "frontend".into())]),
                }],
                ports: vec![443],
            });
        }
        if i % 3 == 0 {
            ingress.push(Rule {
                from: vec![Peer::Cidr(format!("10.{}.{}.0/24", 100 + i / 256, i % 256))],
                ports: vec![9100 + (i % 50) as u16],
            });
        }
        out.push(Policy {
            namespace,
            name: format!("svc-{i}"),
            selector: l(&[("app", format!("svc-{i}"))]),
            ingress,
        });
    }
    out
}

fn match_labels(labels: &Labels) -> serde_json::Value {
    json!({"matchLabels": labels.iter().map(|(k, v)| (k.clone(), json!(v))).collect::<serde_json::Map<_, _>>()})
}

fn policies_yaml(policies: &[Policy]) -> Result<String> {
    let mut out = String::new();
    for p in policies {
        let ingress: Vec<_> = p
            .ingress
            .iter()
            .map(|r| {
                let from: Vec<_> = r
                    .from
                    .iter()
                    .map(|peer| match peer {
                        Peer::Pods { ns: None, pod } => json!({"podSelector": match_labels(pod)}),
                        Peer::Pods { ns: Some(ns), pod } => json!({
                            "namespaceSelector": match_labels(ns),
                            "podSelector": match_labels(pod),
                        }),
                        Peer::Cidr(c) => json!({"ipBlock": {"cidr": c}}),
                    })
                    .collect();
                let ports: Vec<_> = r
                    .ports
                    .iter()
                    .map(|port| json!({"protocol": "TCP", "port": port}))
                    .collect();
                json!({"from": from, "ports": ports})
            })
            .collect();
        let doc = json!({
            "apiVersion": "networking.k8s.io/v1",
            "kind": "NetworkPolicy",
            "metadata": {"name": p.name, "namespace": p.namespace},
            "spec": {
                "podSelector": match_labels(&p.selector),
                "policyTypes": ["Ingress"],
                "ingress": ingress,
            },
        });
        out.push_str("---\n");
        out.push_str(&serde_norway::to_string(&doc).context("rendering YAML")?);
    }
    Ok(out)
}

// ---------------------------------------------------------------------------------------
// iptables + ipset, the kube-router way

/// The rule set kube-router would program on this node for these policies: per policy a
/// `KUBE-NWPLCY-<n>` chain and ipsets (the selected pods as destination set, one source
/// set per peer group), one rule per (rule, port); per local pod selected by a policy a
/// `KUBE-POD-FW-<n>` chain jumping to its policies' chains and dropping what no rule
/// marked; FORWARD accepts ESTABLISHED/RELATED first, then sends traffic to a
/// selected pod's veth to its pod chain.
struct IptablesRules {
    restore: String,
    ipset: String,
    chains: usize,
    rules: usize,
    sets: usize,
    set_members: usize,
}

impl IptablesRules {
    fn generate(lab: &Lab, policies: &[Policy]) -> Result<Self> {
        let ns_labels = |ns: &str| -> Labels {
            let mut v: Labels = lab
                .namespaces()
                .get(ns)
                .map(|m| m.iter().map(|(k, v)| (k.clone(), v.clone())).collect())
                .unwrap_or_default();
            v.push(("kubernetes.io/metadata.name".into(), ns.into()));
            v
        };
        let subset = |want: &Labels, have: &Labels| want.iter().all(|kv| have.contains(kv));
        let pod_labels = |p: &netpol_lab::Pod| -> Labels {
            p.labels
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect()
        };

        let mut ipset = String::new();
        let mut filter = String::from("*filter\n:KUBE-ROUTER-FORWARD - [0:0]\n");
        let mut body = String::new();
        let (mut chains, mut rules, mut sets, mut members) = (1usize, 0usize, 0usize, 0usize);
        // pod id -> policy chains selecting it
        let mut selected: Vec<(String, String, Vec<String>)> = Vec::new();
        for (n, p) in policies.iter().enumerate() {
            let chain = format!("KUBE-NWPLCY-{n}");
            let dst_set = format!("KUBE-DST-{n}");
            let _ = writeln!(filter, ":{chain} - [0:0]");
            chains += 1;
            let _ = writeln!(ipset, "create {dst_set} hash:ip family inet hashsize 64");
            sets += 1;
            for pod in lab.pods() {
                if pod.namespace == p.namespace && subset(&p.selector, &pod_labels(pod)) {
                    let _ = writeln!(ipset, "add {dst_set} {}", pod.ipv4);
                    members += 1;
                    match selected.iter_mut().find(|(id, ..)| *id == pod.id()) {
                        Some((.., v)) => v.push(chain.clone()),
                        None => selected.push((pod.id(), pod.host_if.clone(), vec![chain.clone()])),
                    }
                }
            }
            for (r, rule) in p.ingress.iter().enumerate() {
                for (g, peer) in rule.from.iter().enumerate() {
                    let src_set = format!("KUBE-SRC-{n}-{r}-{g}");
                    sets += 1;
                    match peer {
                        Peer::Cidr(c) => {
                            let _ = writeln!(ipset, "create {src_set} hash:net family inet");
                            let _ = writeln!(ipset, "add {src_set} {c}");
                            members += 1;
                        }
                        Peer::Pods { ns, pod: want } => {
                            let _ =
                                writeln!(ipset, "create {src_set} hash:ip family inet hashsize 64");
                            for pod in lab.pods() {
                                let ns_ok = match ns {
                                    None => pod.namespace == p.namespace,
                                    Some(sel) => subset(sel, &ns_labels(&pod.namespace)),
                                };
                                if ns_ok && subset(want, &pod_labels(pod)) {
                                    let _ = writeln!(ipset, "add {src_set} {}", pod.ipv4);
                                    members += 1;
                                }
                            }
                        }
                    }
                    for port in &rule.ports {
                        let _ = writeln!(
                            body,
                            "-A {chain} -p tcp --dport {port} -m set --match-set {src_set} src \
                             -m set --match-set {dst_set} dst -j MARK --set-xmark {MARK}"
                        );
                        rules += 1;
                    }
                }
                let _ = writeln!(body, "-A {chain} -m mark --mark {MARK} -j RETURN");
                rules += 1;
            }
        }
        if !selected.iter().any(|(id, ..)| id == "x/server") {
            bail!("no generated policy selects x/server");
        }
        let mut forward = String::new();
        let _ = writeln!(
            forward,
            "-A FORWARD -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT\n\
             -A FORWARD -j KUBE-ROUTER-FORWARD"
        );
        rules += 2;
        for (k, (id, host_if, policy_chains)) in selected.iter().enumerate() {
            let chain = format!("KUBE-POD-FW-{k}");
            let _ = writeln!(filter, ":{chain} - [0:0]");
            chains += 1;
            let _ = writeln!(
                forward,
                "-A KUBE-ROUTER-FORWARD -o {host_if} -m comment --comment {id} -j {chain}"
            );
            let _ = writeln!(
                body,
                "-A {chain} -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT\n\
                 -A {chain} -m conntrack --ctstate INVALID -j DROP"
            );
            rules += 2;
            for pc in policy_chains {
                let _ = writeln!(body, "-A {chain} -j {pc}");
                rules += 1;
            }
            let _ = writeln!(
                body,
                "-A {chain} -m mark ! --mark {MARK} -j DROP\n\
                 -A {chain} -j MARK --set-xmark 0x0/{}\n\
                 -A {chain} -j ACCEPT",
                MARK.split('/').nth(1).expect("mask")
            );
            rules += 3;
        }
        let restore = format!("{filter}{forward}{body}COMMIT\n");
        Ok(Self {
            restore,
            ipset,
            chains,
            rules,
            sets,
            set_members: members,
        })
    }

    fn load(&self, netns: &str) -> Result<()> {
        pipe(netns, &["ipset", "restore"], &self.ipset)?;
        pipe(netns, &["iptables-restore", "--noflush"], &self.restore)
    }

    /// Flushes and deletes the chains and sets (deleting the node netns would too).
    fn unload(netns: &str) -> Result<()> {
        pipe(netns, &["iptables-restore"], "*filter\nCOMMIT\n")?;
        pipe(netns, &["ipset", "destroy"], "")
    }
}

fn pipe(netns: &str, cmd: &[&str], stdin: &str) -> Result<()> {
    let mut child = Command::new("ip")
        .args(["netns", "exec", netns])
        .args(cmd)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("running {cmd:?} in {netns}"))?;
    child
        .stdin
        .take()
        .expect("piped")
        .write_all(stdin.as_bytes())?;
    let out = child.wait_with_output()?;
    if !out.status.success() {
        bail!(
            "{cmd:?} in {netns} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}
