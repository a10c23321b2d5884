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
//!   the same shapes (97 more endpoints, 100,000 pod /32s and /24 ipBlocks, POLICY and
//!   POLICY_RANGES entries spread over 100 endpoints, 250 identities, both directions,
//!   TCP/UDP, exact ports and one in ten a port prefix, one in five an Admin-tier
//!   ClusterNetworkPolicy entry) are written through the pinned maps (`MapData::from_pin`)
//!   to reach the sizes. Filler identities are >= 1000, so no decision changes: each
//!   scenario's verdict and counted reason are checked at every size.
//! - A new flow cannot be repeated on one frame (the first run creates the CT entry), so
//!   new-flow cost is measured on frames that create none: a SYN that policy DROPS
//!   (CT miss, IFACES, ENDPOINTS hit, IPCACHE hit, one POLICY hash miss: the server's
//!   rules name exact ports for exact peers, so its flags call for no other lookup), and
//!   an allowed TCP RST (conntrack `open` creates no entry for RST: CT miss, IFACES,
//!   ENDPOINTS, IPCACHE, one POLICY hash hit); the same two on an endpoint whose rule is a
//!   port range (a POLICY_RANGES walk after the hash miss). The full allowed SYN, including the CT
//!   insert, is measured with single runs (`repeat = 1`) over distinct tuples against a
//!   single-run floor.

#[path = "../common/mod.rs"]
mod common;
mod filler;
mod floor;
mod programs;
mod report;
mod scenarios;

use netpol_agent::datapath::packet::arp_frame;
use netpol_agent::datapath::{Capacities, Datapath, HookKind};
use netpol_common::TCP_ACK;
use netpol_compile::{self as compile, Allocations};

use common::{Summary, thousands};
use filler::{FILLER_IDENTITY, Filler};
use floor::load_empty_program;
use programs::Bench;
use report::report;
use scenarios::{
    CALLER, CLIENT, MARK, Prog, SERVER, SERVICE, SERVICE_PORT, Scenario, add_service, scenarios,
    state, tcp,
};

struct Config {
    smoke: bool,
    policy_sizes: Vec<usize>,
    ipcache_size: usize,
    rounds: usize,
    /// Untimed rounds before each size's measured ones.
    warmup_rounds: usize,
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
                warmup_rounds: 1,
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
                warmup_rounds: 5,
                repeat: 100_000,
                single_runs: 2_000,
                profile: None,
            }
        }
    }
}

/// Per size and scenario: the samples (ns per packet, one per round).
struct Measured {
    policy_entries: usize,
    /// Of those, ClusterNetworkPolicy (Admin tier) entries.
    tier_entries: usize,
    ipcache_entries: usize,
    repeated: Vec<Summary>,
    /// Single runs: (empty program, netpol ARP, allowed SYN with CT insert).
    single: [Summary; 5],
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

    let mut compiled = compile::compile(&state(), &Allocations::default());
    add_service(&mut compiled);
    assert!(
        compiled.diagnostics.is_empty(),
        "{:?}",
        compiled.diagnostics
    );
    assert_eq!(compiled.local_pods.len(), 4);
    assert!(
        compiled
            .local_pods
            .iter()
            .all(|p| p.endpoint_id as usize <= compiled.local_pods.len()),
        "the filler assumes the compiled endpoints come first (1 to 4)"
    );
    assert!(compiled.identities.keys().all(|&id| id < FILLER_IDENTITY));
    bench.datapath.sync_maps(&compiled).expect("apply");
    let core_policy = compiled.policy.len();
    let core_tier = compiled
        .policy
        .keys()
        .filter(|k| k.data.direction & !netpol_common::DIR_MASK != 0)
        .count();
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
        // The established Service connections: to the ClusterIP (from_pod), then after
        // translation to the local server (to_pod) and to the client on another node
        // (leave_node).
        let service_syn = tcp(CALLER, SERVICE, 41000, SERVICE_PORT, netpol_common::TCP_SYN);
        let (action, _) = bench.run(Prog::Netpol(HookKind::FromPod), &service_syn, 1);
        assert_eq!(action, -1);
        let to_server = tcp(CALLER, SERVER, 41000, 80, netpol_common::TCP_SYN);
        let to_client = tcp(CALLER, CLIENT, 41001, 80, netpol_common::TCP_SYN);
        assert_eq!(
            bench
                .run_marked(Prog::Netpol(HookKind::ToPod), &to_server, 1, MARK)
                .0,
            -1
        );
        assert_eq!(
            bench
                .run_marked(Prog::Netpol(HookKind::LeaveNode), &to_client, 1, MARK)
                .0,
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

        // Untimed rounds first: the first size otherwise pays for a cold machine (caches,
        // clock ramp-up), which showed as 10-30% on every scenario of that column.
        for _ in 0..config.warmup_rounds {
            for s in &scenarios {
                bench.run_marked(s.prog, &s.frame, config.repeat, s.mark);
            }
        }
        let mut samples = vec![Vec::with_capacity(config.rounds); scenarios.len()];
        for _ in 0..config.rounds {
            for (s, out) in scenarios.iter().zip(&mut samples) {
                let (action, ns) = bench.run_marked(s.prog, &s.frame, config.repeat, s.mark);
                assert_eq!(action, s.action, "{}", s.name);
                out.push(ns);
            }
        }

        // Allowed SYNs that open a CT entry: one run each, distinct tuples.
        let mut single = [Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new()];
        let arp = arp_frame();
        for _ in 0..config.single_runs {
            single[0].push(bench.run(Prog::Empty, &arp, 1).1);
            single[1].push(bench.run(Prog::Netpol(HookKind::ToPod), &arp, 1).1);
            let frame = tcp(CLIENT, SERVER, sport_next, 80, netpol_common::TCP_SYN);
            sport_next = sport_next.wrapping_add(1).max(1024);
            let (action, ns) = bench.run(Prog::Netpol(HookKind::ToPod), &frame, 1);
            assert_eq!(action, -1, "allowed SYN");
            single[2].push(ns);
            // leave_node clears the mark, so a repeated run would measure an unmarked
            // packet: marked packets on exit devices are single runs.
            let leave = Prog::Netpol(HookKind::LeaveNode);
            let new_rst = tcp(CALLER, CLIENT, 41004, 85, netpol_common::TCP_RST);
            let (action, ns) = bench.run_marked(leave, &new_rst, 1, MARK);
            assert_eq!(action, -1, "marked RST to a remote backend");
            single[3].push(ns);
            let ack = tcp(CALLER, CLIENT, 41001, 80, TCP_ACK);
            let (action, ns) = bench.run_marked(leave, &ack, 1, MARK);
            assert_eq!(
                action, -1,
                "marked ACK of the established remote connection"
            );
            single[4].push(ns);
        }

        results.push(Measured {
            policy_entries,
            tier_entries: core_tier + filler.tier_written,
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
        bench.run_marked(s.prog, &s.frame, 1_000_000, s.mark);
        calls += 1;
    }
    eprintln!("profiled {key}: {calls} calls of 1,000,000 runs");
}
