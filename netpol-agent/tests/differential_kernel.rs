//! A sample of the differential cases through the real programs (BPF_PROG_TEST_RUN).
//!
//! Clusters come from the same strategy as netpol-compile's
//! `compiled_maps_agree_with_reference` ([`case`], feature `testing`), and
//! each asks the same questions: its 16 random flows and the sweep of every local
//! endpoint against every address ([`sweep`]), each in both
//! directions. One [`Datapath`] serves the whole run and is re-synced per case, so
//! `sync_maps` applies only the difference from the previous cluster (with allocations
//! carried over, as the agent does). Per case:
//!
//! 1. The kernel's ENDPOINTS, IPCACHE and POLICY, read back from the pins, must equal
//!    the compiled maps (the diff path converged).
//! 2. Re-check: every connection the previous case allowed sends one more packet on its
//!    tuple. A sync that changed anything bumped the policy generation, so conntrack
//!    re-judges the connection under the new maps: it must pass exactly when the
//!    reference allows it in the new cluster, or when its local address is no longer an
//!    endpoint. (A sync that changed nothing leaves the generation, and the connection
//!    passes unjudged: the same maps allowed it, and model and reference agree.) A
//!    connection that passed without an entry (its local address was no endpoint's)
//!    sends a packet conntrack does not know: a TCP ACK also passes when the reference
//!    allows the connection the other way (it is a reply; see `Reason::Resumed`).
//! 3. CT is emptied, then each question becomes a first packet (TCP SYN, UDP, SCTP
//!    INIT; IPv4 or IPv6; mixed-family questions are skipped) with a source port unique
//!    in the case and distinct from every destination port, so no earlier connection
//!    can pass it as established or as a reply. Ingress questions run `to_pod` with the
//!    endpoint as destination, egress ones `from_pod` with it as source. The verdict
//!    must be the reference's, except that a packet leaving a pod from an address that
//!    is no local endpoint's is spoofed and dropped (the reference says "not an
//!    endpoint": policy does not apply).
//!
//! BPF_PROG_TEST_RUN delivers packets on loopback (ifindex 1), which the agent never
//! binds; an unbound interface is "unprogrammed" and judged by `--unprogrammed`, not by
//! policy. So before each first packet loopback is bound (IFACES) as the veth of the
//! pod whose hook judges it: the endpoint that owns the local address, or, when the
//! local address is no endpoint's, `IFACE_SHARED` (a bound veth whose addresses are not
//! checked against one pod), where policy says "not an endpoint" as the reference does.
//!
//! On a disagreement proptest shrinks the case, and the panic shows the smallest
//! cluster found as one line per object, the question, and the verdicts of the kernel
//! (with the reason it counted), the reference and the userspace model; then whether a
//! freshly loaded datapath synced with only that cluster disagrees too (a compile or
//! program bug) or not (a bug that needs the history of earlier syncs: diff path,
//! conntrack). The numbers of cases and questions are printed on stderr outside the
//! test harness's capture, so CI logs show them.
//!
//! Why a test of the agent: netpol-compile is pure (no aya, no kernel), so the sample
//! through the real programs lives here, and draws from exactly the generators the model
//! is checked with, which netpol-compile exports behind its `testing` feature (enabled
//! only in the agent's dev-dependencies). The test runs only as root with the eBPF
//! object built, skips with a note otherwise, and fails when `CI` is set and the
//! datapath cannot be opened, so CI never passes without it.

use std::cell::{Cell, RefCell};
use std::collections::BTreeSet;
use std::io::Write as _;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Instant;

use aya::maps::{HashMap, LpmTrie, Map, MapData};
use netpol_common::{
    CtKey, CtKey4, CtKey6, CtValue, IFACE_SHARED, PROTO_SCTP, PROTO_TCP, PROTO_UDP, names,
};
use proptest::test_runner::{Config, TestCaseError, TestError, TestRunner};

use netpol_agent::datapath::maps::KernelMap;
use netpol_agent::datapath::packet::{Frame, Transport};
use netpol_agent::datapath::peers::PeerMaps;
use netpol_agent::datapath::{Capacities, Datapath, HookKind, chain};
use netpol_compile::cnp::reference::{DecidedBy, TieredReference, TieredVerdict};
use netpol_compile::differential::{Case, Scenario, case, sweep};
use netpol_compile::reference::Verdict;
use netpol_compile::{Compiled, Compiler, Direction, addr, model, policy_maps, protocol_name};

/// Clusters per run: about 10 s of CPU (twice that in wall time on two busy cores).
const CASES: u32 = 2000;
/// Bounds on shrinking a failure.
const SHRINK_MS: u32 = 60_000;
const SHRINK_ITERATIONS: u32 = 20_000;
/// Where BPF_PROG_TEST_RUN delivers packets: loopback.
const TEST_RUN_IFINDEX: u32 = 1;

/// One question: a new flow judged at one endpoint's hook.
#[derive(Clone, Copy, Debug)]
struct Query {
    src: IpAddr,
    dst: IpAddr,
    protocol: u8,
    port: u16,
    direction: Direction,
}

impl Query {
    fn hook(&self) -> HookKind {
        match self.direction {
            Direction::Ingress => HookKind::ToPod,
            Direction::Egress => HookKind::FromPod,
        }
    }

    /// The first packet of the flow (`follow_up`: a later packet of the initiator).
    fn frame(&self, sport: u16, follow_up: bool) -> Vec<u8> {
        let transport = match self.protocol {
            PROTO_TCP if follow_up => Transport::ack(sport, self.port),
            PROTO_TCP => Transport::syn(sport, self.port),
            PROTO_UDP => Transport::Udp {
                sport,
                dport: self.port,
            },
            PROTO_SCTP => Transport::Sctp {
                sport,
                dport: self.port,
            },
            other => unreachable!("the generators only probe TCP, UDP and SCTP, not {other}"),
        };
        Frame::new(self.src, self.dst, transport).build()
    }

    fn show(&self, sport: u16) -> String {
        format!(
            "{} ({}) {} {} -> {}",
            self.direction,
            self.hook().program(),
            protocol_name(self.protocol),
            SocketAddr::new(self.src, sport),
            SocketAddr::new(self.dst, self.port),
        )
    }
}

/// The questions of a case, in the order the model's test asks them, and how many
/// mixed-family ones (no packet can carry them) were left out.
fn queries((s, flows, probes): &Case, compiled: &Compiled) -> (Vec<Query>, usize) {
    let random = flows
        .iter()
        .map(|&(a, b, (protocol, port))| (s.addresses[a], s.addresses[b], protocol, port));
    let is_endpoint = |ip| compiled.endpoints.contains_key(&addr(ip));
    let swept = sweep(&s.addresses, probes, is_endpoint);
    let (same, mixed): (Vec<_>, Vec<_>) = random
        .chain(swept)
        .partition(|(src, dst, _, _)| src.is_ipv4() == dst.is_ipv4());
    let queries = same
        .into_iter()
        .flat_map(|(src, dst, protocol, port)| {
            Direction::BOTH.map(|direction| Query {
                src,
                dst,
                protocol,
                port,
                direction,
            })
        })
        .collect();
    (queries, 2 * mixed.len())
}

/// The IFACES binding of the veth `query` arrives on: the endpoint owning its local
/// address, or a veth of no single pod.
fn binding(compiled: &Compiled, query: &Query) -> u32 {
    let local = match query.direction {
        Direction::Ingress => query.dst,
        Direction::Egress => query.src,
    };
    compiled
        .endpoints
        .get(&addr(local))
        .map_or(IFACE_SHARED, |endpoint| endpoint.id)
}

/// What the kernel must do with a first packet, given the reference verdict.
fn expected(reference: &TieredVerdict, query: &Query) -> bool {
    match reference.decided_by {
        // Leaving a pod with an address that is no endpoint's: spoofed.
        DecidedBy::NotEndpoint if query.direction == Direction::Egress => {
            addr(query.src).is_link_local_or_unspecified()
        }
        _ => reference.allowed(),
    }
}

/// What conntrack must do with a packet of a connection allowed under an earlier
/// policy: re-judged under the current one, passed if its endpoint is gone.
fn expected_recheck(reference: &TieredVerdict) -> bool {
    matches!(reference.decided_by, DecidedBy::NotEndpoint) || reference.allowed()
}

fn show_reference(verdict: &TieredVerdict) -> String {
    let passed: Vec<String> = verdict
        .passed
        .iter()
        .map(|r| {
            format!(
                " (passed by {} spec.{}[{}])",
                r.policy,
                r.direction.field(),
                r.index
            )
        })
        .collect();
    let decided = match &verdict.decided_by {
        DecidedBy::NotEndpoint => "not an endpoint".into(),
        DecidedBy::Itself => "itself".into(),
        DecidedBy::Default => "no tier decides: allowed".into(),
        DecidedBy::Cnp { rule, action } => format!(
            "{action} by ClusterNetworkPolicy/{} ({}, priority {}) spec.{}[{}]",
            rule.policy,
            rule.tier,
            rule.priority,
            rule.direction.field(),
            rule.index
        ),
        DecidedBy::NetworkPolicy(verdict) => show_network_policy(verdict),
    };
    decided + &passed.concat()
}

fn show_network_policy(verdict: &Verdict) -> String {
    match verdict {
        Verdict::Allowed(rules) => {
            let rules: Vec<String> = rules.iter().map(ToString::to_string).collect();
            format!("allowed by {}", rules.join(", "))
        }
        Verdict::NotEndpoint => "not an endpoint".into(),
        Verdict::NotIsolated => "not isolated".into(),
        Verdict::FromHost => "from the node".into(),
        Verdict::Itself => "itself".into(),
        Verdict::Denied => "denied".into(),
    }
}

fn show_model(compiled: &Compiled, query: &Query) -> String {
    let d = model::decide(
        compiled,
        query.src,
        query.dst,
        query.protocol,
        query.port,
        query.direction,
    );
    match compiled.rules.get(&d.rule) {
        Some(rule) => format!("{:?} by {rule}", d.reason),
        None => format!("{:?}", d.reason),
    }
}

fn pass(allowed: bool) -> &'static str {
    if allowed { "passes" } else { "dropped" }
}

/// The cluster, one line per object (node, namespaces, pods, policies), and what the
/// compiler left out.
fn show_cluster(s: &Scenario, compiled: &Compiled) -> String {
    let state = &s.state;
    let mut out = format!(
        "  node {} {:?}\n",
        state.node.name.as_deref().unwrap_or("-"),
        state.node.ips
    );
    for (name, ns) in &state.namespaces {
        out += &format!(
            "  Namespace {name} labels {}\n",
            json(&ns.labels().to_map())
        );
    }
    for (obj, pod) in &state.pods {
        let ips: Vec<&str> = pod.listed_ips().collect();
        let ports: Vec<String> = pod
            .ports()
            .iter()
            .map(|p| {
                format!(
                    "{}={}/{}",
                    p.name.as_deref().unwrap_or("-"),
                    p.container_port,
                    p.protocol.as_deref().unwrap_or("TCP")
                )
            })
            .collect();
        out += &format!(
            "  Pod {obj} labels {} ips {ips:?} node {} phase {} created {} ports {ports:?}{}\n",
            json(&pod.labels().to_map()),
            pod.node_name().unwrap_or("-"),
            pod.phase().unwrap_or("-"),
            json(&pod.created()),
            if pod.host_network() {
                " hostNetwork"
            } else {
                ""
            },
        );
    }
    for (obj, np) in &state.policies {
        out += &format!("  NetworkPolicy {obj} spec {}\n", json(&np.object().spec));
    }
    for diagnostic in &compiled.diagnostics {
        out += &format!("  left out: {diagnostic}\n");
    }
    out
}

/// Compact JSON, for [`show_cluster`].
fn json<T: serde::Serialize>(value: &T) -> String {
    serde_json::to_string(value).unwrap_or_else(|e| format!("<{e}>"))
}

/// Lines on stderr that the test harness does not capture (it captures `eprintln!`).
fn say(text: &str) {
    let _ = writeln!(std::io::stderr(), "{text}");
}

/// The datapath of the run, under a unique bpffs directory removed on drop.
struct Kernel {
    datapath: Option<Datapath>,
    dir: PathBuf,
    ct4: HashMap<MapData, CtKey4, CtValue>,
    ct6: HashMap<MapData, CtKey6, CtValue>,
    /// Carried from case to case, as the agent's loop keeps its compiler.
    compiler: Compiler,
    /// Connections the previous case allowed, with their source ports and whether
    /// conntrack keeps an entry for them (none where the local address was no
    /// endpoint's: nothing to judge).
    open: Vec<(Query, u16, bool)>,
    /// What loopback is bound to now.
    bound: Option<u32>,
    queries: u64,
    rechecks: u64,
    skipped: u64,
}

impl Drop for Kernel {
    fn drop(&mut self) {
        if let Some(datapath) = self.datapath.take() {
            datapath.shutdown();
        }
    }
}

/// Loads the programs under `dir`, or says why not.
fn load(dir: &Path) -> Result<Datapath, String> {
    if !nix::unistd::Uid::effective().is_root() {
        return Err("BPF_PROG_TEST_RUN needs root (run via `cargo xtask test`)".into());
    }
    Datapath::open(dir, &Capacities::default()).map_err(|e| {
        let _ = std::fs::remove_dir_all(dir);
        chain(&e)
    })
}

/// A map of the datapath under `dir`, opened from its pin.
fn pinned<M>(dir: &Path, name: &str, wrap: fn(MapData) -> Map) -> M
where
    M: TryFrom<Map, Error = aya::maps::MapError>,
{
    let data = MapData::from_pin(dir.join("maps").join(name))
        .unwrap_or_else(|e| panic!("pinned map {name}: {e}"));
    M::try_from(wrap(data)).unwrap_or_else(|e| panic!("pinned map {name}: {e}"))
}

/// The kernel's verdict on `frame` and the reason it counted.
fn verdict_and_reason(
    datapath: &Datapath,
    hook: HookKind,
    frame: &[u8],
) -> Result<(bool, String), String> {
    let before = datapath.counters().map_err(|e| chain(&e))?;
    let allowed = verdict(datapath, hook, frame)?;
    let after = datapath.counters().map_err(|e| chain(&e))?;
    let reason = before
        .iter()
        .zip(&after)
        .find(|((_, b), (_, a))| a.packets > b.packets)
        .map_or("no counter moved".into(), |(_, (r, _))| format!("{r:?}"));
    Ok((allowed, reason))
}

/// Whether the kernel lets `frame` pass.
fn verdict(datapath: &Datapath, hook: HookKind, frame: &[u8]) -> Result<bool, String> {
    let verdict = datapath.test_run(hook, frame, 1).map_err(|e| chain(&e))?;
    match verdict.action {
        -1 | 2 => Ok(verdict.allowed()),
        other => Err(format!("unexpected TC action {other}")),
    }
}

impl Kernel {
    /// `None` (with a note) where the datapath cannot be loaded, unless `CI` is set.
    fn open() -> Option<Kernel> {
        let dir = PathBuf::from(format!(
            "/sys/fs/bpf/netpol-differential-{}",
            std::process::id()
        ));
        match Kernel::at(dir) {
            Ok(kernel) => Some(kernel),
            Err(why) if std::env::var_os("CI").is_some_and(|v| !v.is_empty()) => {
                panic!("CI is set but the kernel sample cannot run: {why}")
            }
            Err(why) => {
                say(&format!("kernel sample skipped: {why}"));
                None
            }
        }
    }

    /// A datapath loaded under `dir` (bpffs refuses names with dots).
    fn at(dir: PathBuf) -> Result<Kernel, String> {
        let datapath = load(&dir)?;
        let ct4 = pinned(&dir, names::CT4, Map::LruHashMap);
        let ct6 = pinned(&dir, names::CT6, Map::LruHashMap);
        Ok(Kernel {
            datapath: Some(datapath),
            dir,
            ct4,
            ct6,
            compiler: Compiler::new(),
            open: Vec::new(),
            bound: None,
            queries: 0,
            rechecks: 0,
            skipped: 0,
        })
    }

    fn datapath(&self) -> &Datapath {
        self.datapath.as_ref().expect("open until dropped")
    }

    /// Binds loopback as the veth of the pod that owns `query`'s local address.
    fn bind(&mut self, binding: u32) -> Result<(), String> {
        if self.bound != Some(binding) {
            self.datapath
                .as_mut()
                .expect("open until dropped")
                .bind_interface(TEST_RUN_IFINDEX, binding)
                .map_err(|e| chain(&e))?;
            self.bound = Some(binding);
        }
        Ok(())
    }

    /// Whether conntrack has an entry for `query`'s connection from `sport`.
    fn tracks(&self, query: &Query, sport: u16) -> Result<bool, String> {
        let (local, remote, local_port, remote_port) = match query.direction {
            Direction::Ingress => (query.dst, query.src, query.port, sport),
            Direction::Egress => (query.src, query.dst, sport, query.port),
        };
        let words = |ip: IpAddr| -> [u32; 4] {
            match ip {
                IpAddr::V4(v4) => [u32::from_ne_bytes(v4.octets()), 0, 0, 0],
                IpAddr::V6(v6) => {
                    let o = v6.octets();
                    std::array::from_fn(|i| {
                        u32::from_ne_bytes([o[4 * i], o[4 * i + 1], o[4 * i + 2], o[4 * i + 3]])
                    })
                }
            }
        };
        fn key<A>(local: A, remote: A, ports: (u16, u16), protocol: u8) -> CtKey<A> {
            CtKey {
                local,
                remote,
                local_port: ports.0,
                remote_port: ports.1,
                protocol,
                _pad0: 0,
                _pad1: 0,
                ifindex: TEST_RUN_IFINDEX,
            }
        }
        let ports = (local_port, remote_port);
        let found = if local.is_ipv4() {
            let key = key(words(local)[0], words(remote)[0], ports, query.protocol);
            self.ct4.get(&key, 0)
        } else {
            let key = key(words(local), words(remote), ports, query.protocol);
            self.ct6.get(&key, 0)
        };
        match found {
            Ok(_) => Ok(true),
            Err(aya::maps::MapError::KeyNotFound) => Ok(false),
            Err(e) => Err(format!("reading conntrack: {e}")),
        }
    }

    fn clear_conntrack(&mut self) -> Result<(), String> {
        fn clear<K: aya::Pod>(
            name: &str,
            map: &mut HashMap<MapData, K, CtValue>,
        ) -> Result<(), String> {
            let keys: Vec<K> = map
                .keys()
                .collect::<Result<_, _>>()
                .map_err(|e| format!("{name} keys: {e}"))?;
            for key in keys {
                map.remove(&key)
                    .map_err(|e| format!("{name} remove: {e}"))?;
            }
            Ok(())
        }
        clear(names::CT4, &mut self.ct4)?;
        clear(names::CT6, &mut self.ct6)
    }

    /// The kernel's four policy maps equal `compiled`'s.
    fn maps_match(&self, compiled: &Compiled) -> Result<(), String> {
        fn compare<K: Ord + std::fmt::Debug, V: PartialEq + std::fmt::Debug>(
            name: &str,
            kernel: &std::collections::BTreeMap<K, V>,
            want: &std::collections::BTreeMap<K, V>,
        ) -> Result<(), String> {
            if kernel == want {
                return Ok(());
            }
            let stale: Vec<_> = kernel
                .iter()
                .filter(|(k, v)| want.get(k) != Some(v))
                .collect();
            let missing: Vec<_> = want
                .iter()
                .filter(|(k, v)| kernel.get(k) != Some(v))
                .collect();
            Err(format!(
                "kernel {name} differs from the compiled map: {} stale or changed {:?}, {} \
                 missing {:?}",
                stale.len(),
                stale.iter().take(3).collect::<Vec<_>>(),
                missing.len(),
                missing.iter().take(3).collect::<Vec<_>>()
            ))
        }
        let read = |e: aya::maps::MapError| format!("reading a pinned map: {e}");
        let endpoints: HashMap<MapData, _, _> = pinned(&self.dir, names::ENDPOINTS, Map::HashMap);
        compare(
            names::ENDPOINTS,
            &endpoints.read_all().map_err(read)?,
            &compiled.endpoints,
        )?;
        // IPCACHE through PEERS: what each prefix resolves to.
        compare(
            names::IPCACHE,
            &PeerMaps::read_pinned(&self.dir.join("maps")).map_err(read)?,
            &compiled.ipcache,
        )?;
        // POLICY and POLICY_RANGES, each against its share of the compiled entries.
        let mut exact = std::collections::BTreeMap::new();
        let mut ranges = std::collections::BTreeMap::new();
        for (key, value) in compiled.policy.iter() {
            match policy_maps::slot(key) {
                policy_maps::Slot::Policy(key) => exact.insert(key, *value),
                policy_maps::Slot::Ranges(key) => ranges.insert(key, *value),
            };
        }
        let policy: HashMap<MapData, _, _> = pinned(&self.dir, names::POLICY, Map::HashMap);
        compare(names::POLICY, &policy.read_all().map_err(read)?, &exact)?;
        let policy_ranges: LpmTrie<MapData, _, _> =
            pinned(&self.dir, names::POLICY_RANGES, Map::LpmTrie);
        compare(
            names::POLICY_RANGES,
            &policy_ranges.read_all().map_err(read)?,
            &ranges,
        )
    }

    /// One case through the kernel; `Err` carries the reproduction.
    fn check(&mut self, case: &Case) -> Result<(), TestCaseError> {
        let s = &case.0;
        let compiled = self.compiler.compile(&s.state);
        let fail = |what: String| {
            TestCaseError::fail(format!("{what}\ncluster:\n{}", show_cluster(s, &compiled)))
        };
        let datapath = self.datapath.as_mut().expect("open until dropped");
        let report = datapath
            .sync_maps(&compiled)
            .map_err(|e| fail(format!("sync_maps: {}", chain(&e))))?;
        if !report.refused.is_empty() {
            return Err(fail(format!("refused: {:?}", report.refused)));
        }
        self.maps_match(&compiled).map_err(&fail)?;
        // What the maps enforce: the policies in force after this case, as in the
        // agent (each as far as it can be read).
        let admitted = self.compiler.admitted(&s.state);
        let reference = TieredReference::new(&admitted);

        // Connections of the previous case, re-judged under this one.
        for (query, sport, tracked) in std::mem::take(&mut self.open) {
            let want = reference.evaluate(
                query.src,
                query.dst,
                query.protocol,
                query.port,
                query.direction,
            );
            // Without an entry the packet (a TCP ACK) is a reply when the local pod's
            // policy allows the connection the other way.
            let reply = !tracked
                && query.protocol == PROTO_TCP
                && reference
                    .evaluate(
                        query.dst,
                        query.src,
                        query.protocol,
                        sport,
                        query.direction.reverse(),
                    )
                    .allowed();
            let frame = query.frame(sport, true);
            let got = verdict(self.datapath(), query.hook(), &frame).map_err(&fail)?;
            self.rechecks += 1;
            if got != (expected_recheck(&want) || reply) {
                return Err(fail(format!(
                    "re-check disagreement: a connection allowed under the previous cluster, \
                     {}, sends its next packet after this cluster is synced:\n  kernel {}\n  \
                     reference (this cluster) {}: {}\n  model (this cluster) {}",
                    query.show(sport),
                    pass(got),
                    pass(expected_recheck(&want)),
                    show_reference(&want),
                    show_model(&compiled, &query),
                )));
            }
        }
        self.clear_conntrack().map_err(&fail)?;

        // First packets.
        let (all, mixed) = queries(case, &compiled);
        self.skipped += mixed as u64;
        let dports: BTreeSet<u16> = all.iter().map(|q| q.port).collect();
        let mut sports = (1024..=u16::MAX).filter(|p| !dports.contains(p));
        for query in all {
            let sport = sports.next().expect("enough source ports");
            let want = reference.evaluate(
                query.src,
                query.dst,
                query.protocol,
                query.port,
                query.direction,
            );
            let frame = query.frame(sport, false);
            self.bind(binding(&compiled, &query)).map_err(&fail)?;
            let got = verdict(self.datapath(), query.hook(), &frame).map_err(&fail)?;
            self.queries += 1;
            if got != expected(&want, &query) {
                return Err(fail(
                    self.disagreement(&compiled, &query, sport, &want, got),
                ));
            }
            if got {
                let tracked = self.tracks(&query, sport).map_err(&fail)?;
                self.open.push((query, sport, tracked));
            }
        }
        Ok(())
    }

    /// The report of a first packet the kernel judged unlike the reference.
    fn disagreement(
        &mut self,
        compiled: &Compiled,
        query: &Query,
        sport: u16,
        want: &TieredVerdict,
        got: bool,
    ) -> String {
        // Again, alone, for the reason the kernel counts.
        let frame = query.frame(sport, false);
        let again = match self
            .clear_conntrack()
            .and_then(|()| verdict_and_reason(self.datapath(), query.hook(), &frame))
        {
            Ok((allowed, reason)) => format!("{} ({reason})", pass(allowed)),
            Err(e) => format!("unknown: {e}"),
        };
        format!(
            "kernel/reference disagreement on the first packet of {}:\n  kernel {}, again \
             alone {}\n  reference {}: {}\n  model {}",
            query.show(sport),
            pass(got),
            again,
            pass(expected(want, query)),
            show_reference(want),
            show_model(compiled, query),
        )
    }
}

#[test]
fn kernel_verdicts_agree_with_reference() {
    let Some(kernel) = Kernel::open() else {
        return;
    };
    let kernel = RefCell::new(kernel);
    let cases = Cell::new(0u64);
    let started = Instant::now();
    let mut runner = TestRunner::new(Config {
        cases: CASES,
        failure_persistence: None,
        max_shrink_time: SHRINK_MS,
        max_shrink_iters: SHRINK_ITERATIONS,
        ..Config::default()
    });
    let result = runner.run(&case(), |case| {
        cases.set(cases.get() + 1);
        kernel.borrow_mut().check(&case)
    });
    let k = kernel.borrow();
    say(&format!(
        "kernel sample: {} cases, {} first packets and {} re-checked connections through \
         BPF_PROG_TEST_RUN in {:.1} s ({} mixed-family questions skipped)",
        cases.get(),
        k.queries,
        k.rechecks,
        started.elapsed().as_secs_f64(),
        k.skipped,
    ));
    let dir = k.dir.clone();
    drop(k);
    drop(kernel);
    match result {
        Ok(()) => {}
        Err(TestError::Fail(why, minimal)) => {
            // Once, for the smallest case: does it need the history of earlier syncs?
            let fresh =
                Kernel::at(PathBuf::from(format!("{}-fresh", dir.display()))).map(|mut fresh| {
                    match fresh.check(&minimal) {
                        Ok(()) => "agrees with the reference on every question of this case: the \
                               disagreement needs the history of earlier cases (diff path, \
                               conntrack)"
                            .to_string(),
                        Err(TestCaseError::Fail(why) | TestCaseError::Reject(why)) => format!(
                            "disagrees too: {}",
                            why.message().lines().next().unwrap_or_default()
                        ),
                    }
                });
            let fresh = fresh.unwrap_or_else(|e| format!("could not be loaded: {e}"));
            panic!("{why}\na freshly loaded datapath synced with only this cluster {fresh}")
        }
        Err(TestError::Abort(why)) => panic!("aborted: {why}"),
    }
}
