//! Per-packet cost of the real TC programs, measured by the kernel with
//! BPF_PROG_TEST_RUN on crafted frames, while POLICY grows from 10 to 100,000 entries
//! (IPCACHE holds 100,000 entries throughout).
//!
//! `cargo bench -p netpol-agent --bench datapath [-- --smoke]` (root; bpffs at
//! /sys/fs/bpf). Prints Markdown, writes `target/bench/datapath.json`.
//!
//! Method:
//! - Every figure is the kernel's own mean time per run of one `BPF_PROG_TEST_RUN`
//!   call with `repeat` runs on one frame; the bench takes the median over `rounds`
//!   calls, rounds interleaving all scenarios so that drift hits them alike.
//! - The floor is a two-instruction program (`r0 = -1; exit`, i.e. TC_ACT_UNSPEC),
//!   loaded with a raw `BPF_PROG_LOAD` as a SchedClassifier and run the same way; netpol
//!   on an ARP frame (parse only) and on an IP frame whose local address is not an
//!   endpoint (CT miss, IFACES, ENDPOINTS miss) are reported beside it.
//! - Map contents: a small cluster compiled by the real compiler and applied with
//!   `Datapath::apply` holds every entry the measured packets hit; synthetic entries of
//!   the same shapes (99 more endpoints, 100,000 pod /32s and /24 ipBlocks, POLICY
//!   entries spread over 100 endpoints, 250 identities, both directions, TCP/UDP, exact
//!   ports and port prefixes) are written through the pinned maps (`MapData::from_pin`)
//!   to reach the sizes. Filler identities are >= 1000, so no decision changes: each
//!   scenario's verdict and counted reason are checked at every size.
//! - A new flow cannot be repeated on one frame (the first run creates the CT entry), so
//!   new-flow cost is measured on frames that create none: a SYN that policy DROPS
//!   (CT miss, IFACES, ENDPOINTS hit, IPCACHE hit, POLICY miss for the peer identity; the
//!   server has no any-peer rules, so no second lookup), and an allowed TCP RST (conntrack
//!   `open` creates no entry for RST: CT miss, IFACES, ENDPOINTS, IPCACHE, one POLICY hit). The full allowed SYN, including the CT
//!   insert, is measured with single runs (`repeat = 1`) over distinct tuples against a
//!   single-run floor.

mod common;

use std::net::IpAddr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::Path;

use aya::maps::lpm_trie::Key;
use aya::maps::{HashMap, LpmTrie, Map, MapData};
use aya::programs::{SchedClassifier, TestRun, TestRunOptions};
use netpol_agent::datapath::packet::{Frame, Transport, arp_frame};
use netpol_agent::datapath::{Capacities, Datapath, HookKind};
use netpol_agent::source::manifest::parse_documents;
use netpol_common::{
    Addr, DIR_EGRESS, DIR_INGRESS, ENDPOINT_EGRESS_ISOLATED, ENDPOINT_INGRESS_ISOLATED,
    EndpointInfo, POLICY_PREFIX_ANY_PORT, PROTO_TCP, PROTO_UDP, PeerInfo, PolicyKey, PolicyValue,
    Reason, TCP_ACK, TCP_RST, names,
};
use netpol_compile::state::{ClusterState, NodeContext};
use netpol_compile::{self as compile, Allocations, Compiled};
use serde_json::{Value, json};

use common::{Summary, thousands};

/// The measured cluster: `server` (local, node-0) accepts TCP 80-90 from `client`.
const CLUSTER: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: bench, labels: {team: perf}}
---
apiVersion: v1
kind: Pod
metadata: {name: server, namespace: bench, labels: {app: server}}
spec: {nodeName: node-0, containers: [{name: c, ports: [{name: http, containerPort: 8080}]}]}
status: {phase: Running, podIP: 10.0.0.1}
---
apiVersion: v1
kind: Pod
metadata: {name: client, namespace: bench, labels: {app: client}}
spec: {nodeName: node-1, containers: [{name: c}]}
status: {phase: Running, podIP: 10.0.0.2}
---
apiVersion: v1
kind: Pod
metadata: {name: other, namespace: bench, labels: {app: other}}
spec: {nodeName: node-1, containers: [{name: c}]}
status: {phase: Running, podIP: 10.0.0.3}
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: server-ingress, namespace: bench}
spec:
  podSelector: {matchLabels: {app: server}}
  policyTypes: [Ingress]
  ingress:
    - from: [{podSelector: {matchLabels: {app: client}}}]
      ports: [{protocol: TCP, port: 80, endPort: 90}]
"#;

const SERVER: &str = "10.0.0.1";
const CLIENT: &str = "10.0.0.2";
const NOT_LOCAL: &str = "10.0.0.3";

struct Config {
    smoke: bool,
    policy_sizes: Vec<usize>,
    ipcache_size: usize,
    rounds: usize,
    repeat: u32,
    single_runs: usize,
    /// `NETPOL_BENCH_PROFILE=<scenario key>`: after filling the maps to the largest size,
    /// run only that scenario for about 5 s (for `perf record`), print nothing else.
    profile: Option<String>,
}

impl Config {
    fn new(smoke: bool) -> Config {
        let mut config = Config::sized(smoke);
        config.profile = std::env::var("NETPOL_BENCH_PROFILE").ok();
        config
    }

    fn sized(smoke: bool) -> Config {
        if smoke {
            Config {
                smoke,
                policy_sizes: vec![10, 1_000],
                ipcache_size: 1_000,
                rounds: 3,
                repeat: 1_000,
                single_runs: 50,
                profile: None,
            }
        } else {
            Config {
                smoke,
                policy_sizes: vec![10, 1_000, 10_000, 100_000],
                ipcache_size: 100_000,
                rounds: 21,
                repeat: 100_000,
                single_runs: 2_000,
                profile: None,
            }
        }
    }
}

/// What runs a frame: netpol's program of a hook, or the empty floor program.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Prog {
    Netpol(HookKind),
    Empty,
}

struct Scenario {
    key: &'static str,
    name: &'static str,
    method: &'static str,
    prog: Prog,
    frame: Vec<u8>,
    /// Expected TC action and counted reason (none for the empty program).
    action: i32,
    reason: Option<Reason>,
}

fn ip(s: &str) -> IpAddr {
    s.parse().expect("IP")
}

fn tcp(src: &str, dst: &str, sport: u16, dport: u16, flags: u8) -> Vec<u8> {
    Frame::new(
        ip(src),
        ip(dst),
        Transport::Tcp {
            sport,
            dport,
            flags,
        },
    )
    .build()
}

fn scenarios() -> Vec<Scenario> {
    use HookKind::{FromPod, ToPod};
    const PASS: i32 = -1;
    const SHOT: i32 = 2;
    vec![
        Scenario {
            key: "empty_program",
            name: "floor: empty TC program",
            method: "`r0 = -1; exit` (raw BPF_PROG_LOAD), any frame",
            prog: Prog::Empty,
            frame: arp_frame(),
            action: PASS,
            reason: None,
        },
        Scenario {
            key: "netpol_arp",
            name: "floor: netpol, non-IP frame",
            method: "to_pod, ARP request: Ethernet parse only",
            prog: Prog::Netpol(ToPod),
            frame: arp_frame(),
            action: PASS,
            reason: Some(Reason::NotEndpoint),
        },
        Scenario {
            key: "netpol_not_endpoint",
            name: "floor: netpol, IP, not an endpoint",
            method: "to_pod, TCP SYN to a non-local pod: parse + CT miss + IFACES + ENDPOINTS miss",
            prog: Prog::Netpol(ToPod),
            frame: tcp(CLIENT, NOT_LOCAL, 40000, 80, netpol_common::TCP_SYN),
            action: PASS,
            reason: Some(Reason::NotEndpoint),
        },
        Scenario {
            key: "established",
            name: "established flow (CT hit)",
            method: "to_pod, ACK of a tuple whose SYN and SYN-ACK passed: CT hit (ENDPOINTS not needed)",
            prog: Prog::Netpol(ToPod),
            frame: tcp(CLIENT, SERVER, 40000, 80, TCP_ACK),
            action: PASS,
            reason: Some(Reason::Established),
        },
        Scenario {
            key: "established_reply",
            name: "established flow, reply (CT hit)",
            method: "from_pod, server's ACK on the same tuple: CT hit (ENDPOINTS not needed)",
            prog: Prog::Netpol(FromPod),
            frame: tcp(SERVER, CLIENT, 80, 40000, TCP_ACK),
            action: PASS,
            reason: Some(Reason::Reply),
        },
        Scenario {
            key: "new_flow_denied",
            name: "new flow, denied",
            method: "to_pod, SYN to port 91: CT miss + IFACES + ENDPOINTS + IPCACHE + 1 POLICY miss (no any-peer rules; no CT entry)",
            prog: Prog::Netpol(ToPod),
            frame: tcp(CLIENT, SERVER, 40001, 91, netpol_common::TCP_SYN),
            action: SHOT,
            reason: Some(Reason::PolicyDenied),
        },
        Scenario {
            key: "new_flow_allowed_rst",
            name: "new flow, allowed (RST)",
            method: "to_pod, RST to port 85: CT miss + IFACES + ENDPOINTS + IPCACHE + 1 POLICY hit (RST opens no CT entry)",
            prog: Prog::Netpol(ToPod),
            frame: tcp(CLIENT, SERVER, 40002, 85, TCP_RST),
            action: PASS,
            reason: Some(Reason::PolicyAllowed),
        },
    ]
}

// ---------------------------------------------------------------------------------------
// The floor program, loaded without an object file.

/// `BPF_PROG_LOAD` attributes up to `prog_name` (the kernel zero-fills the rest).
#[repr(C)]
struct ProgLoadAttr {
    prog_type: u32,
    insn_cnt: u32,
    insns: u64,
    license: u64,
    log_level: u32,
    log_size: u32,
    log_buf: u64,
    kern_version: u32,
    prog_flags: u32,
    prog_name: [u8; 16],
}

/// `BPF_OBJ_PIN` attributes.
#[repr(C)]
struct ObjPinAttr {
    pathname: u64,
    bpf_fd: u32,
    file_flags: u32,
}

const BPF_PROG_LOAD: libc::c_long = 5;
const BPF_OBJ_PIN: libc::c_long = 6;
const BPF_PROG_TYPE_SCHED_CLS: u32 = 3;

/// Loads `r0 = -1 (TC_ACT_UNSPEC); exit` as a SchedClassifier, pins it at `pin` and
/// opens it through aya, so it runs through exactly the same test-run path as netpol.
fn load_empty_program(pin: &Path) -> std::io::Result<SchedClassifier> {
    // struct bpf_insn { u8 code; u8 dst:4, src:4; s16 off; s32 imm; }
    let insns: [[u8; 8]; 2] = [
        // BPF_ALU64 | BPF_MOV | BPF_K, dst r0, imm -1
        [0xb7, 0x00, 0, 0, 0xff, 0xff, 0xff, 0xff],
        // BPF_JMP | BPF_EXIT
        [0x95, 0x00, 0, 0, 0, 0, 0, 0],
    ];
    let license = c"GPL";
    let mut name = [0u8; 16];
    name[..5].copy_from_slice(b"floor");
    let attr = ProgLoadAttr {
        prog_type: BPF_PROG_TYPE_SCHED_CLS,
        insn_cnt: insns.len() as u32,
        insns: insns.as_ptr() as u64,
        license: license.as_ptr() as u64,
        log_level: 0,
        log_size: 0,
        log_buf: 0,
        kern_version: 0,
        prog_flags: 0,
        prog_name: name,
    };
    // SAFETY: `attr` and everything it points to outlive the call; the kernel reads
    // `size_of::<ProgLoadAttr>()` bytes and treats the rest of `union bpf_attr` as zero.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_PROG_LOAD,
            &attr as *const ProgLoadAttr,
            std::mem::size_of::<ProgLoadAttr>() as u32,
        )
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: a fresh descriptor the kernel just returned; nothing else owns it.
    let fd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
    let path = std::ffi::CString::new(pin.as_os_str().as_encoded_bytes()).expect("no NUL");
    let attr = ObjPinAttr {
        pathname: path.as_ptr() as u64,
        bpf_fd: fd.as_raw_fd() as u32,
        file_flags: 0,
    };
    // SAFETY: as above.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_OBJ_PIN,
            &attr as *const ObjPinAttr,
            std::mem::size_of::<ObjPinAttr>() as u32,
        )
    };
    if rc < 0 {
        return Err(std::io::Error::last_os_error());
    }
    drop(fd);
    SchedClassifier::from_pin(pin).map_err(std::io::Error::other)
}

// ---------------------------------------------------------------------------------------

struct Bench {
    datapath: Datapath,
    empty: SchedClassifier,
}

impl Bench {
    /// (TC action, kernel mean ns per run).
    fn run(&self, prog: Prog, frame: &[u8], repeat: u32) -> (i32, f64) {
        match prog {
            Prog::Netpol(hook) => {
                let v = self
                    .datapath
                    .test_run(hook, frame, repeat)
                    .expect("test run");
                (v.action, v.duration.as_nanos() as f64)
            }
            Prog::Empty => {
                let r = self
                    .empty
                    .test_run(TestRunOptions {
                        data_in: Some(frame),
                        repeat,
                        ..TestRunOptions::new()
                    })
                    .expect("test run of the floor program");
                (r.return_value as i32, r.duration.as_nanos() as f64)
            }
        }
    }

    fn counted(&self) -> Vec<u64> {
        let counters = self.datapath.counters().expect("counters");
        counters.iter().map(|(_, c)| c.packets).collect()
    }

    /// Runs a scenario once and checks its verdict and the reason it was counted under.
    fn verify(&self, s: &Scenario) {
        let before = self.counted();
        let (action, _) = self.run(s.prog, &s.frame, 1);
        let after = self.counted();
        assert_eq!(action, s.action, "{}: TC action", s.name);
        if let Some(reason) = s.reason {
            let moved: Vec<Reason> = Reason::ALL
                .iter()
                .zip(before.iter().zip(&after))
                .filter(|(_, (b, a))| a > b)
                .map(|(r, _)| *r)
                .collect();
            assert_eq!(moved, vec![reason], "{}: counted reason", s.name);
        }
    }
}

/// Synthetic map filler through the pinned maps.
struct Filler {
    endpoints: HashMap<MapData, Addr, EndpointInfo>,
    ipcache: LpmTrie<MapData, Addr, PeerInfo>,
    policy: LpmTrie<MapData, PolicyKey, PolicyValue>,
    policy_written: usize,
}

/// Filler identities start here, above every identity the compiler hands out for the
/// small cluster, so no filler entry ever decides a measured packet.
const FILLER_IDENTITY: u32 = 1000;
const FILLER_ENDPOINTS: u32 = 100;

impl Filler {
    fn open(maps: &Path) -> Filler {
        let pinned = |name: &str| MapData::from_pin(maps.join(name)).expect("pinned map");
        Filler {
            endpoints: HashMap::try_from(Map::HashMap(pinned(names::ENDPOINTS))).expect("map"),
            ipcache: LpmTrie::try_from(Map::LpmTrie(pinned(names::IPCACHE))).expect("map"),
            policy: LpmTrie::try_from(Map::LpmTrie(pinned(names::POLICY))).expect("map"),
            policy_written: 0,
        }
    }

    /// 99 more local endpoints (ids 2..=100), as on a node with 100 pods.
    fn endpoints(&mut self, compiled: &Compiled) {
        for id in 2..=FILLER_ENDPOINTS {
            let addr = Addr::v4([10, 0, 1, id as u8]);
            let info = EndpointInfo {
                id,
                flags: ENDPOINT_INGRESS_ISOLATED | ENDPOINT_EGRESS_ISOLATED,
            };
            assert!(!compiled.endpoints.contains_key(&addr));
            self.endpoints.insert(addr, info, 0).expect("ENDPOINTS");
        }
    }

    /// IPCACHE up to `total`: pod /32s next to the measured ones (10.1.0.0 upwards) and,
    /// every 100th, a /24 ipBlock (172.16.0.0/14 region).
    fn ipcache(&mut self, already: usize, total: usize) {
        for i in 0..total.saturating_sub(already) {
            let n = i as u32;
            let identity = FILLER_IDENTITY + n % 500;
            let (prefix, octets) = if i % 100 == 99 {
                let j = n / 100;
                (32 + 24, [172, 16 + (j >> 8) as u8, j as u8, 0])
            } else {
                let a = (10u32 << 24) | (1 << 16) | n;
                (32 + 32, a.to_be_bytes())
            };
            let key = Key::new(prefix, Addr::v4(octets));
            let value = PeerInfo { identity, flags: 0 };
            self.ipcache.insert(&key, value, 0).expect("IPCACHE");
        }
    }

    /// POLICY up to `total` entries (`core` of them from the compiler): entry i goes to
    /// endpoint 1 + i % 100 (endpoint 1 is the measured server), then identity, direction
    /// and protocol vary; one in ten is a /8 port prefix, the rest exact ports.
    fn policy(&mut self, core: usize, total: usize) {
        let want = total.saturating_sub(core);
        while self.policy_written < want {
            let i = self.policy_written as u32;
            let endpoint = 1 + i % FILLER_ENDPOINTS;
            let rest = i / FILLER_ENDPOINTS;
            let identity = FILLER_IDENTITY + rest % 250 + 250 * (rest / 1000);
            let direction = if (rest / 250).is_multiple_of(2) {
                DIR_INGRESS
            } else {
                DIR_EGRESS
            };
            let protocol = if (rest / 500).is_multiple_of(2) {
                PROTO_TCP
            } else {
                PROTO_UDP
            };
            let (port, bits) = if rest % 10 == 9 {
                (0x1f00u16, 8)
            } else {
                (1000 + (rest % 997) as u16, 16)
            };
            let key = PolicyKey {
                endpoint,
                identity,
                direction,
                protocol,
                port: port.to_be_bytes(),
            };
            let value = PolicyValue {
                rule: 100_000 + i,
                _pad: 0,
            };
            self.policy
                .insert(&Key::new(POLICY_PREFIX_ANY_PORT + bits, key), value, 0)
                .expect("POLICY");
            self.policy_written += 1;
        }
    }
}

fn state() -> ClusterState {
    let mut state = ClusterState {
        node: NodeContext {
            name: Some("node-0".into()),
            ips: vec![ip("10.99.0.1")],
        },
        ..ClusterState::default()
    };
    for object in parse_documents(CLUSTER, "bench") {
        object
            .expect("bench manifests are valid")
            .insert_into(&mut state);
    }
    state
}

/// Per size and scenario: the samples (ns per packet, one per round).
struct Measured {
    policy_entries: usize,
    ipcache_entries: usize,
    repeated: Vec<Summary>,
    /// Single runs: (empty program, netpol ARP, allowed SYN with CT insert).
    single: [Summary; 3],
}

fn main() {
    common::check_args();
    let config = Config::new(common::smoke());
    let Some(dir) = common::prepare_kernel_side() else {
        return;
    };
    let machine = common::machine();
    common::print_machine(&machine);

    let datapath = Datapath::open(&dir.path, &Capacities::default()).expect("load the programs");
    let empty = load_empty_program(&dir.path.join("floor")).expect("load the floor program");
    let mut bench = Bench { datapath, empty };

    let compiled = compile::compile(&state(), &Allocations::default());
    assert!(
        compiled.diagnostics.is_empty(),
        "{:?}",
        compiled.diagnostics
    );
    assert_eq!(compiled.local_pods.len(), 1);
    assert_eq!(
        compiled.local_pods[0].endpoint_id, 1,
        "the filler assumes the server is endpoint 1"
    );
    assert!(compiled.identities.keys().all(|&id| id < FILLER_IDENTITY));
    bench.datapath.sync_maps(&compiled).expect("apply");
    let core_policy = compiled.policy.len();
    let core_ipcache = compiled.ipcache.len();

    let mut filler = Filler::open(&dir.path.join("maps"));
    filler.endpoints(&compiled);
    filler.ipcache(core_ipcache, config.ipcache_size);

    let scenarios = scenarios();
    let syn_ack = tcp(SERVER, CLIENT, 80, 40000, netpol_common::TCP_SYN | TCP_ACK);
    let syn = tcp(CLIENT, SERVER, 40000, 80, netpol_common::TCP_SYN);
    let mut sport_next: u16 = 1024;
    let mut results = Vec::new();
    let started = std::time::Instant::now();
    for &size in &config.policy_sizes {
        filler.policy(core_policy, size);
        // Sizes as the kernel holds them (the agent's shadow only knows its own writes).
        let policy_entries = core_policy + filler.policy_written;
        let ipcache_entries = core_ipcache.max(config.ipcache_size);

        // The established connection: SYN in, SYN-ACK out.
        assert_eq!(bench.run(Prog::Netpol(HookKind::ToPod), &syn, 1).0, -1);
        assert_eq!(
            bench.run(Prog::Netpol(HookKind::FromPod), &syn_ack, 1).0,
            -1
        );
        for s in &scenarios {
            bench.verify(s);
        }

        if let Some(key) = &config.profile {
            if size == *config.policy_sizes.last().unwrap() {
                profile(&bench, &scenarios, key);
                bench.datapath.shutdown();
                return;
            }
            continue;
        }

        let mut samples = vec![Vec::with_capacity(config.rounds); scenarios.len()];
        for _ in 0..config.rounds {
            for (s, out) in scenarios.iter().zip(&mut samples) {
                let (action, ns) = bench.run(s.prog, &s.frame, config.repeat);
                assert_eq!(action, s.action, "{}", s.name);
                out.push(ns);
            }
        }

        // Allowed SYNs that open a CT entry: one run each, distinct tuples.
        let mut single = [Vec::new(), Vec::new(), Vec::new()];
        let arp = arp_frame();
        for _ in 0..config.single_runs {
            single[0].push(bench.run(Prog::Empty, &arp, 1).1);
            single[1].push(bench.run(Prog::Netpol(HookKind::ToPod), &arp, 1).1);
            let frame = tcp(CLIENT, SERVER, sport_next, 80, netpol_common::TCP_SYN);
            sport_next = sport_next.wrapping_add(1).max(1024);
            let (action, ns) = bench.run(Prog::Netpol(HookKind::ToPod), &frame, 1);
            assert_eq!(action, -1, "allowed SYN");
            single[2].push(ns);
        }

        results.push(Measured {
            policy_entries,
            ipcache_entries,
            repeated: samples.iter().map(|v| Summary::of(v)).collect(),
            single: single.map(|v| Summary::of(&v)),
        });
        eprintln!(
            "measured POLICY {} entries ({:.1} s so far)",
            thousands(policy_entries),
            started.elapsed().as_secs_f64()
        );
    }

    report(&config, &machine, &scenarios, &results);
    bench.datapath.shutdown();
    drop(bench.empty);
    drop(dir);
}

/// Runs one scenario for about 5 s so that `perf record` sees mostly it.
fn profile(bench: &Bench, scenarios: &[Scenario], key: &str) {
    let Some(s) = scenarios.iter().find(|s| s.key == key) else {
        let keys: Vec<&str> = scenarios.iter().map(|s| s.key).collect();
        panic!("NETPOL_BENCH_PROFILE={key}: not a scenario; one of {keys:?}");
    };
    let started = std::time::Instant::now();
    let mut calls = 0u32;
    while started.elapsed() < std::time::Duration::from_secs(5) {
        bench.run(s.prog, &s.frame, 1_000_000);
        calls += 1;
    }
    eprintln!("profiled {key}: {calls} calls of 1,000,000 runs");
}

fn single_runs_json(m: &Measured) -> Value {
    let keys = [
        "empty_program",
        "netpol_arp",
        "new_flow_allowed_syn_ct_insert",
    ];
    let list: Vec<Value> = keys
        .iter()
        .zip(&m.single)
        .map(|(k, r)| {
            json!({
                "key": k, "ns_per_packet": r.json(), "baseline": "empty_program (single run)",
                "ratio_to_baseline": r.median / m.single[0].median,
            })
        })
        .collect();
    Value::Array(list)
}

fn report(config: &Config, machine: &Value, scenarios: &[Scenario], results: &[Measured]) {
    let sizes: Vec<String> = results
        .iter()
        .map(|m| format!("POLICY {}", thousands(m.policy_entries)))
        .collect();
    println!(
        "\n## Datapath: ns per packet (BPF_PROG_TEST_RUN){}\n",
        if config.smoke { " — SMOKE sizes" } else { "" }
    );
    println!(
        "Each cell: median over {} calls of the kernel's mean time per run (repeat = {}), \
         then (×ratio) against the empty TC program measured in the same rounds. \
         IPCACHE holds {} entries at every size.\n",
        config.rounds,
        thousands(config.repeat as usize),
        thousands(results[0].ipcache_entries)
    );
    let mut header = vec!["scenario", "method"];
    header.extend(sizes.iter().map(String::as_str));
    let mut rows = Vec::new();
    for (i, s) in scenarios.iter().enumerate() {
        let mut row = vec![s.name.to_string(), s.method.to_string()];
        for m in results {
            let floor = m.repeated[0].median;
            let v = m.repeated[i].median;
            row.push(format!("{v:.0} ns ({:.2}×)", v / floor));
        }
        rows.push(row);
    }
    let single_names = [
        (
            "floor, single run: empty program",
            "repeat = 1, ARP frame; baseline of this block",
        ),
        (
            "floor, single run: netpol, non-IP",
            "repeat = 1, to_pod, ARP frame",
        ),
        (
            "new flow, allowed SYN (CT insert)",
            "repeat = 1, to_pod, a SYN of a distinct tuple each run: ENDPOINTS + CT miss + IPCACHE + 1 POLICY hit + CT insert",
        ),
    ];
    for (k, (name, method)) in single_names.iter().enumerate() {
        let mut row = vec![name.to_string(), method.to_string()];
        for m in results {
            let floor = m.single[0].median;
            let v = m.single[k].median;
            row.push(format!("{v:.0} ns ({:.2}×)", v / floor));
        }
        rows.push(row);
    }
    common::table(&header, &rows);
    println!(
        "\nSingle runs: median over {} runs per size (each includes the kernel's \
         per-call timer overhead, present in the single-run floor too).",
        thousands(config.single_runs)
    );

    // Targets.
    let idx = |key: &str| scenarios.iter().position(|s| s.key == key).unwrap();
    let (empty, est, denied, rst) = (
        idx("empty_program"),
        idx("established"),
        idx("new_flow_denied"),
        idx("new_flow_allowed_rst"),
    );
    let first = &results[0];
    let last = &results[results.len() - 1];
    let worst_gap = results
        .iter()
        .map(|m| m.repeated[est].median - m.repeated[empty].median)
        .fold(f64::MIN, f64::max);
    let scaling = |i: usize| last.repeated[i].median / first.repeated[i].median;
    let syn_scaling = (last.single[2].median - last.single[0].median)
        / (first.single[2].median - first.single[0].median);
    let met = |ok: bool| if ok { "met" } else { "MISSED" };
    println!("\n## Datapath targets\n");
    let (lo, hi) = (
        thousands(first.policy_entries),
        thousands(last.policy_entries),
    );
    let targets = vec![
        vec![
            "established flow − empty program (worst size)".to_string(),
            format!("{worst_gap:.0} ns"),
            "≤ 60 ns".into(),
            met(worst_gap <= 60.0).into(),
        ],
        vec![
            format!("new flow denied: POLICY {hi} / POLICY {lo}"),
            format!("{:.2}×", scaling(denied)),
            "≤ 1.5×".into(),
            met(scaling(denied) <= 1.5).into(),
        ],
        vec![
            format!("new flow allowed (RST): POLICY {hi} / POLICY {lo}"),
            format!("{:.2}×", scaling(rst)),
            "≤ 1.5×".into(),
            met(scaling(rst) <= 1.5).into(),
        ],
        vec![
            format!("allowed SYN above single-run floor: POLICY {hi} / POLICY {lo}"),
            format!("{syn_scaling:.2}×"),
            "(information)".into(),
            "-".into(),
        ],
    ];
    common::table(&["target", "measured", "limit", "status"], &targets);

    let json = json!({
        "bench": "datapath",
        "mode": if config.smoke { "smoke" } else { "full" },
        "machine": machine,
        "method": {
            "timing": "BPF_PROG_TEST_RUN: kernel mean ns per run over `repeat` runs of one frame; median over `rounds` calls, scenarios interleaved per round",
            "rounds": config.rounds,
            "repeat": config.repeat,
            "single_runs": config.single_runs,
            "maps": "compiler output for a small cluster + synthetic entries of the same shapes written through the pinned maps; filler identities >= 1000 never decide a measured packet; verdict and counted reason checked at every size",
            "floor": "two-instruction SchedClassifier (r0 = -1; exit) loaded with raw BPF_PROG_LOAD",
        },
        "sizes": results.iter().map(|m| json!({
            "policy_entries": m.policy_entries,
            "ipcache_entries": m.ipcache_entries,
            "scenarios": scenarios.iter().zip(&m.repeated).map(|(s, r)| json!({
                "key": s.key, "name": s.name, "method": s.method,
                "ns_per_packet": r.json(),
                "baseline": "empty_program",
                "ratio_to_baseline": r.median / m.repeated[0].median,
                "ns_above_baseline": r.median - m.repeated[0].median,
            })).collect::<Vec<_>>(),
            "single_runs": single_runs_json(m),
        })).collect::<Vec<_>>(),
        "targets": {
            "established_minus_floor_ns": {"value": worst_gap, "limit": 60.0, "met": worst_gap <= 60.0},
            "new_flow_denied_scaling": {"value": scaling(denied), "limit": 1.5, "met": scaling(denied) <= 1.5,
                "from_policy_entries": first.policy_entries, "to_policy_entries": last.policy_entries},
            "new_flow_allowed_rst_scaling": {"value": scaling(rst), "limit": 1.5, "met": scaling(rst) <= 1.5},
            "allowed_syn_above_floor_scaling": {"value": syn_scaling},
        },
    });
    common::write_json("datapath", &json);
}
