//! Control plane: compile time, map sizes, memory, and change propagation into real
//! kernel maps, on a synthetic cluster of 10,000 pods in 200 namespaces with 2,000
//! policies of realistic shapes, 100 of the pods on this node.
//!
//! `cargo bench -p netpol-agent --bench control [-- --smoke]` (root for the kernel part;
//! without root the compile part still runs). Prints Markdown, writes
//! `target/bench/control.json`.
//!
//! Method:
//! - The cluster is built once per size from JSON through k8s-openapi's serde (as the
//!   manifest source does); building is not timed as compile.
//! - Compile time: wall clock of a fresh `Compiler`'s first compile, median of
//!   the runs; ratio against the same compile at 1/4 of the size (2,500 pods, 50
//!   namespaces, 500 policies, 25 local pods), measured in the same process.
//! - Map entries at 2,500 / 5,000 / 10,000 pods (namespaces, policies and local pods
//!   scaled alike): growth ratios beside the growth of pods × rules.
//! - Memory: VmRSS / VmHWM from /proc/self/status after the state is built, after the
//!   full compiles, and after the maps are applied (the agent holds all three).
//! - Propagation: a change is made to the in-memory state (a pod label flipped, a policy
//!   added, a pod created, in turn), then a compile by the same `Compiler` and
//!   `Datapath::apply` into real kernel maps under `/sys/fs/bpf/netpol-bench-<pid>` (in
//!   a private network namespace, so nothing is attached). Time = compile + apply, per
//!   change; p50 and p99. Baseline: the same loop with no change (no map writes). The
//!   `Compiler` keeps its allocations and memo (as in the agent's loop), so this is the
//!   incremental path; the compile times above are cold (a fresh `Compiler` each).

mod common;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{Namespace, Pod};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use netpol_agent::datapath::{Capacities, Datapath};
use netpol_compile::state::{ClusterState, NodeContext, ObjectRef};
use netpol_compile::{Compiled, Compiler};
use serde_json::{Value, json};

use common::{Summary, ms, thousands};

const NODE: &str = "node-0";
const PODS_PER_NAMESPACE: usize = 50;
const POLICIES_PER_NAMESPACE: usize = 10;
/// Pods on this node at every size (a node's share of a 10,000-pod, 100-node cluster).
const LOCAL_PODS: usize = 100;
const NODES: usize = 100;

/// One synthetic cluster size.
#[derive(Clone, Copy, Debug)]
struct Size {
    namespaces: usize,
}

impl Size {
    fn pods(self) -> usize {
        self.namespaces * PODS_PER_NAMESPACE
    }
    fn policies(self) -> usize {
        self.namespaces * POLICIES_PER_NAMESPACE
    }
}

struct Config {
    smoke: bool,
    /// Largest last; the first is 1/4 of the last.
    sizes: [Size; 3],
    compile_runs: usize,
    changes: usize,
    noop_runs: usize,
}

impl Config {
    fn new(smoke: bool) -> Config {
        if smoke {
            Config {
                smoke,
                sizes: [1, 2, 4].map(|namespaces| Size { namespaces }),
                compile_runs: 3,
                changes: 12,
                noop_runs: 3,
            }
        } else {
            Config {
                smoke,
                sizes: [50, 100, 200].map(|namespaces| Size { namespaces }),
                compile_runs: 5,
                changes: 200,
                noop_runs: 10,
            }
        }
    }
}

// ---------------------------------------------------------------------------------------
// The synthetic cluster

const ROLES: [&str; 5] = ["frontend", "backend", "db", "cache", "worker"];
const ENVS: [&str; 3] = ["prod", "staging", "dev"];

fn ns_name(i: usize) -> String {
    format!("ns-{i:03}")
}

/// Whether pod `g` of `pods` runs on this node: `LOCAL_PODS` of them (all of them in
/// tiny clusters), spread over namespaces, apps and roles.
fn is_local(g: usize, pods: usize) -> bool {
    let stride = (pods / LOCAL_PODS).max(1);
    g % stride == (g / stride * 7) % stride
}

fn pod_ip(g: usize) -> String {
    format!("10.{}.{}.{}", 64 + g / 65536, (g / 256) % 256, g % 256)
}

fn namespace(i: usize) -> Namespace {
    let mut labels = json!({"team": format!("team-{}", i % 10), "env": ENVS[i % 3]});
    if i.is_multiple_of(20) {
        labels["monitoring"] = json!("enabled");
    }
    serde_json::from_value(json!({"metadata": {"name": ns_name(i), "labels": labels}}))
        .expect("namespace")
}

fn pod(ns: usize, name: &str, j: usize, ips: &[String], local: bool, node: usize) -> Pod {
    let role = ROLES[(j % 10) / 2];
    let mut ports = vec![
        json!({"name": "http", "containerPort": 8080}),
        json!({"name": "metrics", "containerPort": 9090}),
    ];
    if role == "backend" {
        ports.push(json!({"name": "grpc", "containerPort": 50051}));
    }
    if j % 10 == 5 {
        ports.push(json!({"name": "dns", "containerPort": 53, "protocol": "UDP"}));
    }
    let pod_ips: Vec<Value> = ips.iter().map(|ip| json!({"ip": ip})).collect();
    let node = if local {
        NODE.to_string()
    } else {
        format!("node-{}", 1 + node % (NODES - 1))
    };
    serde_json::from_value(json!({
        "metadata": {"namespace": ns_name(ns), "name": name, "labels": {
            "app": format!("app-{}", j % 10),
            "role": role,
            "version": format!("v{}", j % 3),
            "pod-template-hash": format!("{:08x}", (ns * 31 + j % 10) * 2654435761usize % (1 << 32)),
        }},
        "spec": {"nodeName": node, "containers": [{"name": "main", "ports": ports}]},
        "status": {"phase": "Running", "podIP": ips[0], "podIPs": pod_ips},
    }))
    .expect("pod")
}

/// Ten policies per namespace, of the shapes real clusters carry.
fn policies(i: usize) -> Vec<(String, Value)> {
    let a = |k: usize| format!("app-{}", (i + k) % 10);
    vec![
        (
            "default-deny-ingress".into(),
            json!({"podSelector": {}, "policyTypes": ["Ingress"]}),
        ),
        (
            "frontend-to-app".into(),
            json!({
                "podSelector": {"matchLabels": {"app": a(1)}},
                "ingress": [{"from": [{"podSelector": {"matchLabels": {"role": "frontend"}}}],
                             "ports": [{"port": "http"}]}],
            }),
        ),
        (
            "from-team".into(),
            json!({
                "podSelector": {"matchExpressions": [{"key": "app", "operator": "In", "values": [a(2), a(3)]}]},
                "ingress": [{"from": [{
                    "namespaceSelector": {"matchLabels": {"team": format!("team-{}", (i + 1) % 10)}},
                    "podSelector": {"matchExpressions": [{"key": "role", "operator": "In", "values": ["frontend", "backend"]}]},
                }], "ports": [{"port": 8080}, {"port": 8443}]}],
            }),
        ),
        (
            "from-office".into(),
            json!({
                "podSelector": {"matchLabels": {"role": "frontend"}},
                "ingress": [{"from": [
                    {"ipBlock": {"cidr": "192.168.0.0/16", "except": [format!("192.168.{}.0/24", i % 256)]}},
                    {"ipBlock": {"cidr": "2001:db8::/32", "except": [format!("2001:db8:{:x}::/48", i)]}},
                ], "ports": [{"port": 443}, {"port": 80}]}],
            }),
        ),
        (
            "egress-grpc-dns".into(),
            json!({
                "podSelector": {"matchLabels": {"app": a(4)}},
                "policyTypes": ["Egress"],
                "egress": [
                    {"to": [{"namespaceSelector": {"matchExpressions": [{"key": "env", "operator": "In", "values": ["prod"]}]}}],
                     "ports": [{"port": "grpc"}]},
                    {"to": [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "ns-000"}}}],
                     "ports": [{"port": 53, "protocol": "UDP"}, {"port": 53, "protocol": "TCP"}]},
                ],
            }),
        ),
        (
            "db-ports".into(),
            json!({
                "podSelector": {"matchLabels": {"role": "db"}},
                "ingress": [{"from": [{"podSelector": {"matchLabels": {"role": "backend"}}}],
                             "ports": [{"port": 5000, "endPort": 5999}, {"port": 30000, "endPort": 32767}]}],
            }),
        ),
        (
            "monitoring".into(),
            json!({
                "podSelector": {"matchExpressions": [{"key": "version", "operator": "NotIn", "values": ["v2"]}]},
                "ingress": [{"from": [{
                    "namespaceSelector": {"matchExpressions": [{"key": "monitoring", "operator": "Exists"}]},
                    "podSelector": {"matchLabels": {"app": "app-9"}},
                }], "ports": [{"port": "metrics"}]}],
            }),
        ),
        (
            "internet-egress".into(),
            json!({
                "podSelector": {"matchLabels": {"role": "frontend"}},
                "policyTypes": ["Egress"],
                "egress": [{"to": [{"ipBlock": {"cidr": "0.0.0.0/0",
                    "except": ["10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16"]}}],
                    "ports": [{"port": 443}]}],
            }),
        ),
        (
            "all-namespaces-web".into(),
            json!({
                "podSelector": {"matchLabels": {"app": a(0)}},
                "ingress": [{"from": [{"namespaceSelector": {}}], "ports": [{"port": 80}]}],
            }),
        ),
        (
            "backend-egress".into(),
            json!({
                "podSelector": {"matchLabels": {"role": "backend"}},
                "policyTypes": ["Egress"],
                "egress": [
                    {"to": [{"podSelector": {}}]},
                    {"to": [{"ipBlock": {"cidr": format!("10.200.{}.0/24", i % 256)}}],
                     "ports": [{"protocol": "SCTP", "port": 3868}]},
                ],
            }),
        ),
    ]
}

fn policy(ns: &str, name: &str, spec: Value) -> NetworkPolicy {
    serde_json::from_value(json!({"metadata": {"namespace": ns, "name": name}, "spec": spec}))
        .expect("policy")
}

fn cluster(size: Size) -> ClusterState {
    let mut state = ClusterState {
        node: NodeContext {
            name: Some(NODE.into()),
            ips: vec!["10.255.0.1".parse().expect("IP")],
        },
        ..ClusterState::default()
    };
    for i in 0..size.namespaces {
        state.namespaces.insert(ns_name(i), namespace(i));
        for (name, spec) in policies(i) {
            let ns = ns_name(i);
            let p = policy(&ns, &name, spec);
            state.policies.insert(ObjectRef::new(ns, name), p);
        }
    }
    for g in 0..size.pods() {
        let (ns, j) = (g / PODS_PER_NAMESPACE, g % PODS_PER_NAMESPACE);
        let mut ips = vec![pod_ip(g)];
        if g % 4 == 0 {
            ips.push(format!("fd00:10::{g:x}"));
        }
        let name = format!("app-{}-{g}", j % 10);
        let p = pod(ns, &name, j, &ips, is_local(g, size.pods()), g);
        state.pods.insert(ObjectRef::new(ns_name(ns), name), p);
    }
    state
}

// ---------------------------------------------------------------------------------------
// Changes

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum ChangeKind {
    LabelFlip,
    PolicyAdded,
    PodCreated,
}

impl ChangeKind {
    const ALL: [ChangeKind; 3] = [
        ChangeKind::LabelFlip,
        ChangeKind::PolicyAdded,
        ChangeKind::PodCreated,
    ];
    fn name(self) -> &'static str {
        match self {
            ChangeKind::LabelFlip => "pod label flipped",
            ChangeKind::PolicyAdded => "policy added",
            ChangeKind::PodCreated => "pod created",
        }
    }
}

/// Applies change number `i` to `state`. Half the flips and created pods, and the
/// policies added in namespaces with local pods, touch this node's endpoints.
fn change(state: &mut ClusterState, size: Size, i: usize) -> ChangeKind {
    let kind = ChangeKind::ALL[i % 3];
    let n = i / 3;
    match kind {
        ChangeKind::LabelFlip => {
            let keys: Vec<ObjectRef> = if n.is_multiple_of(2) {
                let local: Vec<&ObjectRef> = state
                    .pods
                    .iter()
                    .filter(|(_, p)| state.node.is_local(p))
                    .map(|(k, _)| k)
                    .collect();
                vec![local[(n * 7) % local.len()].clone()]
            } else {
                let k = state.pods.keys().nth((n * 7919) % state.pods.len());
                k.into_iter().cloned().collect()
            };
            let pod = state.pods.get_mut(&keys[0]).expect("pod");
            let labels = pod.metadata.labels.get_or_insert_with(BTreeMap::new);
            let app = labels.get("app").cloned().unwrap_or_default();
            let digit: usize = app.trim_start_matches("app-").parse().unwrap_or(0);
            labels.insert("app".into(), format!("app-{}", (digit + 1) % 10));
        }
        ChangeKind::PolicyAdded => {
            // Half of them in a namespace with local pods (the policy is then in force).
            let ns = if n.is_multiple_of(2) {
                let local: Vec<&String> = state
                    .pods
                    .iter()
                    .filter(|(_, p)| state.node.is_local(p))
                    .map(|(k, _)| &k.namespace)
                    .collect();
                local[(n * 7) % local.len()].clone()
            } else {
                ns_name((n * 7 + 1) % size.namespaces)
            };
            let name = format!("added-{i}");
            let spec = json!({
                "podSelector": {"matchLabels": {"app": format!("app-{}", n % 10)}},
                "ingress": [{"from": [{"podSelector": {"matchLabels": {"app": format!("app-{}", (n + 3) % 10)}}}],
                             "ports": [{"port": 7000 + i}]}],
            });
            let p = policy(&ns, &name, spec);
            state.policies.insert(ObjectRef::new(ns, name), p);
        }
        ChangeKind::PodCreated => {
            let ns = (n * 13) % size.namespaces;
            let g = 200_000 + i;
            let ip = format!("10.250.{}.{}", (i / 256) % 256, i % 256);
            let name = format!("new-{i}");
            let p = pod(ns, &name, n, &[ip], n.is_multiple_of(2), g);
            state.pods.insert(ObjectRef::new(ns_name(ns), name), p);
        }
    }
    kind
}

// ---------------------------------------------------------------------------------------

struct SizeResult {
    size: Size,
    local: usize,
    rules: usize,
    compile: Summary,
    endpoints: usize,
    ipcache: usize,
    policy: usize,
    identities: usize,
}

/// The cold compiles of `state`; also the last result and the compiler that made it.
fn measure_compile(
    state: &ClusterState,
    size: Size,
    runs: usize,
) -> (SizeResult, Compiled, Compiler) {
    let mut times = Vec::with_capacity(runs);
    let mut last = None;
    for _ in 0..runs {
        let mut compiler = Compiler::new();
        let t = Instant::now();
        let compiled = compiler.compile(state);
        times.push(ms(t.elapsed()));
        last = Some((compiled, compiler));
    }
    let (compiled, compiler) = last.expect("runs > 0");
    assert!(
        compiled.diagnostics.is_empty(),
        "synthetic cluster must be valid: {:?}",
        &compiled.diagnostics[..compiled.diagnostics.len().min(5)]
    );
    let result = SizeResult {
        size,
        local: compiled.local_pods.len(),
        rules: compiled.rules.len(),
        compile: Summary::of(&times),
        endpoints: compiled.endpoints.len(),
        ipcache: compiled.ipcache.len(),
        policy: compiled.policy.len(),
        identities: compiled.identities.len(),
    };
    (result, compiled, compiler)
}

struct Propagation {
    /// Per kind: total time, map writes, IPCACHE and POLICY entries changed.
    per_kind: Vec<(ChangeKind, Summary, Summary, Summary, Summary)>,
    total: Summary,
    compile: Summary,
    apply: Summary,
    writes: Summary,
    noop: Summary,
    noop_compile: Summary,
    noop_apply: Summary,
    memory_after_apply: (f64, f64),
    kernel_sizes: (usize, usize, usize),
}

fn propagation(
    config: &Config,
    dir: &std::path::Path,
    mut state: ClusterState,
    size: Size,
    mut compiled: Compiled,
    mut compiler: Compiler,
) -> Propagation {
    let mut datapath = Datapath::open(dir, &Capacities::default()).expect("load the programs");
    datapath.sync_maps(&compiled).expect("initial apply");
    let memory_after_apply = common::memory_mib();

    // Baseline: the same loop without a change.
    let (mut noop, mut noop_compile, mut noop_apply) = (vec![], vec![], vec![]);
    for _ in 0..config.noop_runs {
        let t0 = Instant::now();
        let next = compiler.compile(&state);
        let t1 = Instant::now();
        let report = datapath.sync_maps(&next).expect("apply");
        let t2 = Instant::now();
        assert_eq!(report.maps.writes(), 0, "no change, no writes");
        noop.push(ms(t2 - t0));
        noop_compile.push(ms(t1 - t0));
        noop_apply.push(ms(t2 - t1));
        compiled = next;
    }

    type Samples = (Vec<f64>, Vec<f64>, Vec<f64>, Vec<f64>);
    let mut by_kind: BTreeMap<usize, Samples> = BTreeMap::new();
    let (mut total, mut compile_t, mut apply_t, mut writes) = (vec![], vec![], vec![], vec![]);
    let started = Instant::now();
    for i in 0..config.changes {
        let kind = change(&mut state, size, i);
        let t0 = Instant::now();
        let next = compiler.compile(&state);
        let t1 = Instant::now();
        let report = datapath.sync_maps(&next).expect("apply");
        let t2 = Instant::now();
        assert!(next.diagnostics.is_empty(), "{:?}", next.diagnostics);
        total.push(ms(t2 - t0));
        compile_t.push(ms(t1 - t0));
        apply_t.push(ms(t2 - t1));
        writes.push(report.maps.writes() as f64);
        let entry = by_kind.entry(kind as usize).or_default();
        entry.0.push(ms(t2 - t0));
        entry.1.push(report.maps.writes() as f64);
        // Which map the writes went to (outside the timed part).
        entry
            .2
            .push(changed(&compiled.ipcache, &next.ipcache) as f64);
        entry.3.push(changed(&compiled.policy, &next.policy) as f64);
        compiled = next;
        if i % 50 == 49 {
            eprintln!(
                "{} changes applied ({:.1} s)",
                i + 1,
                started.elapsed().as_secs_f64()
            );
        }
    }
    let kernel_sizes = datapath.map_sizes();
    assert_eq!(
        kernel_sizes,
        (
            compiled.endpoints.len(),
            compiled.ipcache.len(),
            compiled.policy.len()
        )
    );
    datapath.shutdown();
    Propagation {
        per_kind: by_kind
            .into_iter()
            .map(|(k, (t, w, i, p))| {
                let s = Summary::of;
                (ChangeKind::ALL[k], s(&t), s(&w), s(&i), s(&p))
            })
            .collect(),
        total: Summary::of(&total),
        compile: Summary::of(&compile_t),
        apply: Summary::of(&apply_t),
        writes: Summary::of(&writes),
        noop: Summary::of(&noop),
        noop_compile: Summary::of(&noop_compile),
        noop_apply: Summary::of(&noop_apply),
        memory_after_apply,
        kernel_sizes,
    }
}

/// Entries added, removed or changed between two versions of a map.
fn changed<K: Ord, V: PartialEq>(before: &BTreeMap<K, V>, after: &BTreeMap<K, V>) -> usize {
    let (mut a, mut b) = (before.iter().peekable(), after.iter().peekable());
    let mut n = 0;
    loop {
        match (a.peek(), b.peek()) {
            (None, None) => return n,
            (Some(_), None) => {
                a.next();
                n += 1;
            }
            (None, Some(_)) => {
                b.next();
                n += 1;
            }
            (Some((ka, va)), Some((kb, vb))) => match ka.cmp(kb) {
                std::cmp::Ordering::Less => {
                    a.next();
                    n += 1;
                }
                std::cmp::Ordering::Greater => {
                    b.next();
                    n += 1;
                }
                std::cmp::Ordering::Equal => {
                    n += usize::from(va != vb);
                    a.next();
                    b.next();
                }
            },
        }
    }
}

fn main() {
    common::check_args();
    let config = Config::new(common::smoke());
    // Before any thread starts: private netns, cleanup hooks.
    let dir = common::prepare_kernel_side();
    let machine = common::machine();
    common::print_machine(&machine);
    let started = Instant::now();

    let (rss_start, _) = common::memory_mib();
    let largest = config.sizes[2];
    let t = Instant::now();
    let state = cluster(largest);
    let build = t.elapsed();
    let (rss_state, _) = common::memory_mib();
    let (big, compiled, compiler) = measure_compile(&state, largest, config.compile_runs.max(5));
    let memory_after_compile = common::memory_mib();
    eprintln!(
        "{} pods compiled ({:.1} s)",
        largest.pods(),
        started.elapsed().as_secs_f64()
    );

    let prop = dir
        .as_ref()
        .map(|dir| propagation(&config, &dir.path, state, largest, compiled, compiler));
    eprintln!(
        "propagation done ({:.1} s)",
        started.elapsed().as_secs_f64()
    );

    let mut results = Vec::new();
    for &size in &config.sizes[..2] {
        let state = cluster(size);
        results.push(measure_compile(&state, size, config.compile_runs.max(5)).0);
    }
    results.push(big);

    report(
        &config,
        &machine,
        &results,
        build,
        (rss_start, rss_state),
        memory_after_compile,
        prop.as_ref(),
    );
    drop(dir);
}

/// Milliseconds with the digits that matter.
fn fmt_ms(v: f64) -> String {
    if v < 10.0 {
        format!("{v:.2} ms")
    } else if v < 100.0 {
        format!("{v:.1} ms")
    } else {
        format!("{v:.0} ms")
    }
}

fn report(
    config: &Config,
    machine: &Value,
    results: &[SizeResult],
    build: Duration,
    (rss_start, rss_state): (f64, f64),
    (rss_compile, hwm_compile): (f64, f64),
    prop: Option<&Propagation>,
) {
    let smoke = if config.smoke { " — SMOKE sizes" } else { "" };
    let base = &results[0];
    let big = &results[results.len() - 1];

    println!("\n## Control plane: compile and map sizes{smoke}\n");
    println!(
        "Compile (cold): wall clock of a fresh `Compiler`'s first compile, median of {} runs \
         (p25–p75 in brackets); ratio against the {}-pod compile measured in the same process. \
         Each size scales namespaces and policies with pods ({} pods and {} policies per \
         namespace); this node runs every (pods / {})-th pod: {} of them at every full size, all \
         of them below 200 pods.\n",
        config.compile_runs.max(5),
        thousands(base.size.pods()),
        PODS_PER_NAMESPACE,
        POLICIES_PER_NAMESPACE,
        LOCAL_PODS,
        LOCAL_PODS
    );
    let header = [
        "pods",
        "namespaces",
        "policies",
        "rules",
        "local pods",
        "compile (median)",
        "compile ratio",
        "ENDPOINTS",
        "IPCACHE",
        "POLICY",
        "identities",
    ];
    let rows: Vec<Vec<String>> = results
        .iter()
        .map(|r| {
            vec![
                thousands(r.size.pods()),
                r.size.namespaces.to_string(),
                thousands(r.size.policies()),
                thousands(r.rules),
                r.local.to_string(),
                format!(
                    "{} [{}–{}]",
                    fmt_ms(r.compile.median),
                    fmt_ms(r.compile.p25),
                    fmt_ms(r.compile.p75)
                ),
                format!("{:.2}×", r.compile.median / base.compile.median),
                thousands(r.endpoints),
                thousands(r.ipcache),
                thousands(r.policy),
                thousands(r.identities),
            ]
        })
        .collect();
    common::table(&header, &rows);

    println!("\nGrowth between sizes (each step doubles pods, namespaces and policies):\n");
    let mut growth = Vec::new();
    for w in results.windows(2) {
        let (a, b) = (&w[0], &w[1]);
        let r = |x: usize, y: usize| format!("{:.2}×", y as f64 / x as f64);
        growth.push(vec![
            format!(
                "{} → {}",
                thousands(a.size.pods()),
                thousands(b.size.pods())
            ),
            r(a.size.pods(), b.size.pods()),
            r(a.size.pods() * a.rules, b.size.pods() * b.rules),
            r(a.endpoints, b.endpoints),
            r(a.ipcache, b.ipcache),
            r(a.policy, b.policy),
            format!("{:.2}×", b.compile.median / a.compile.median),
        ]);
    }
    common::table(
        &[
            "pods",
            "pods",
            "pods × rules",
            "ENDPOINTS",
            "IPCACHE",
            "POLICY",
            "compile time",
        ],
        &growth,
    );

    println!("\n## Control plane: memory (this process, /proc/self/status)\n");
    let mut mem = vec![
        vec![
            "start".to_string(),
            format!("{rss_start:.1} MiB"),
            "-".into(),
        ],
        vec![
            format!(
                "cluster state built ({} pods, {:.1} s)",
                thousands(big.size.pods()),
                build.as_secs_f64()
            ),
            format!("{rss_state:.1} MiB"),
            "-".into(),
        ],
        vec![
            format!("after {} full compiles", config.compile_runs.max(5)),
            format!("{rss_compile:.1} MiB"),
            format!("{hwm_compile:.1} MiB"),
        ],
    ];
    if let Some(p) = prop {
        mem.push(vec![
            "after apply (maps' shadow copies held)".into(),
            format!("{:.1} MiB", p.memory_after_apply.0),
            format!("{:.1} MiB", p.memory_after_apply.1),
        ]);
    }
    common::table(&["point", "VmRSS", "VmHWM (peak so far)"], &mem);
    let peak = prop.map_or(hwm_compile, |p| p.memory_after_apply.1);

    if let Some(p) = prop {
        println!(
            "\n## Control plane: change → kernel maps ({} changes, {} pods){smoke}\n",
            config.changes,
            thousands(big.size.pods())
        );
        println!(
            "Time from a change in the state to the kernel maps holding it: `compile` (with the \
             same `Compiler`, which keeps its allocations and memo) + `Datapath::apply` into real \
             maps. Ratio against the same loop with no change (median of {} runs, 0 map writes). \
             The last column splits the entries the change rewrote by map (computed untimed).\n",
            config.noop_runs
        );
        let f = |s: &Summary| fmt_ms(s.median);
        let mut rows = vec![vec![
            "no change (baseline)".into(),
            "-".into(),
            f(&p.noop),
            fmt_ms(p.noop.p99),
            "1.00×".into(),
            format!(
                "compile {:.1} + apply {:.2}",
                p.noop_compile.median, p.noop_apply.median
            ),
            "0".into(),
            "-".into(),
        ]];
        for (kind, t, w, ipcache, policy) in &p.per_kind {
            rows.push(vec![
                kind.name().into(),
                t.n.to_string(),
                f(t),
                fmt_ms(t.p99),
                format!("{:.2}×", t.median / p.noop.median),
                "-".into(),
                format!("{:.0} (max {:.0})", w.median, w.max),
                format!(
                    "{:.0} / {:.0} (max {:.0} / {:.0})",
                    ipcache.median, policy.median, ipcache.max, policy.max
                ),
            ]);
        }
        rows.push(vec![
            "all changes".into(),
            p.total.n.to_string(),
            f(&p.total),
            fmt_ms(p.total.p99),
            format!("{:.2}×", p.total.median / p.noop.median),
            format!(
                "compile {:.1} (p99 {:.1}) + apply {:.2} (p99 {:.2})",
                p.compile.median, p.compile.p99, p.apply.median, p.apply.p99
            ),
            format!("{:.0} (max {:.0})", p.writes.median, p.writes.max),
            "-".into(),
        ]);
        common::table(
            &[
                "change",
                "n",
                "p50",
                "p99",
                "p50 ratio",
                "phases (median)",
                "map writes",
                "IPCACHE / POLICY entries changed",
            ],
            &rows,
        );
        println!(
            "\nKernel maps after the changes: ENDPOINTS {}, IPCACHE {}, POLICY {} (equal to the \
             last compile).",
            p.kernel_sizes.0, p.kernel_sizes.1, p.kernel_sizes.2
        );
    } else {
        println!("\n(change propagation skipped: needs root and bpffs)");
    }

    println!("\n## Control plane targets\n");
    let met = |ok: bool| if ok { "met" } else { "MISSED" };
    let mut targets = vec![
        vec![
            format!("full compile, {} pods", thousands(big.size.pods())),
            fmt_ms(big.compile.median),
            "≤ 2,000 ms".into(),
            met(big.compile.median <= 2000.0).into(),
        ],
        vec![
            "resident memory (peak VmHWM)".into(),
            format!("{peak:.1} MiB"),
            "≤ 150 MiB".into(),
            met(peak <= 150.0).into(),
        ],
    ];
    if let Some(p) = prop {
        targets.push(vec![
            "single change → kernel maps, p99".into(),
            fmt_ms(p.total.p99),
            "≤ 50 ms".into(),
            met(p.total.p99 <= 50.0).into(),
        ]);
    }
    let map_growth = {
        let (a, b) = (base, big);
        let pods = b.size.pods() as f64 / a.size.pods() as f64;
        let worst = [
            (a.endpoints, b.endpoints),
            (a.ipcache, b.ipcache),
            (a.policy, b.policy),
        ]
        .iter()
        .map(|&(x, y)| y as f64 / x as f64)
        .fold(0.0, f64::max);
        (pods, worst)
    };
    targets.push(vec![
        format!(
            "map entries grow with pods ({} → {} pods: {:.1}×; pods × rules {:.1}×)",
            thousands(base.size.pods()),
            thousands(big.size.pods()),
            map_growth.0,
            (big.size.pods() * big.rules) as f64 / (base.size.pods() * base.rules) as f64
        ),
        format!("largest map growth {:.2}×", map_growth.1),
        format!("≈ {:.1}× (linear)", map_growth.0),
        met(map_growth.1 <= map_growth.0 * 1.25).into(),
    ]);
    common::table(&["target", "measured", "limit", "status"], &targets);

    let size_json = |r: &SizeResult| {
        json!({
            "pods": r.size.pods(), "namespaces": r.size.namespaces, "policies": r.size.policies(),
            "rules": r.rules, "local_pods": r.local,
            "compile_ms": r.compile.json(),
            "compile_ratio_to_quarter_size": r.compile.median / base.compile.median,
            "endpoints": r.endpoints, "ipcache": r.ipcache, "policy": r.policy,
            "identities": r.identities,
        })
    };
    let json = json!({
        "bench": "control",
        "mode": if config.smoke { "smoke" } else { "full" },
        "machine": machine,
        "method": {
            "compile": "wall clock of a fresh Compiler's first compile, median of runs; baseline: the 1/4-size cluster in the same process",
            "memory": "VmRSS/VmHWM of the bench process from /proc/self/status",
            "propagation": "state change, then compile by the same Compiler (allocations and memo kept) + Datapath::apply into real kernel maps (private netns, unique bpffs dir); baseline: the same loop without a change",
            "cluster": "50 pods and 10 policies per namespace; 1 pod in 100 local; label selectors with matchExpressions (In, NotIn, Exists), namespace selectors, ipBlocks with excepts (IPv4 and IPv6), named ports (ingress and egress), port ranges, SCTP; 1 pod in 4 dual-stack",
        },
        "cluster_build_s": build.as_secs_f64(),
        "sizes": results.iter().map(size_json).collect::<Vec<_>>(),
        "memory_mib": {
            "start_rss": rss_start, "state_rss": rss_state,
            "after_compile_rss": rss_compile, "after_compile_hwm": hwm_compile,
            "after_apply": prop.map(|p| json!({"rss": p.memory_after_apply.0, "hwm": p.memory_after_apply.1})),
        },
        "propagation": prop.map(|p| json!({
            "changes": p.total.n,
            "total_ms": p.total.json(),
            "compile_ms": p.compile.json(),
            "apply_ms": p.apply.json(),
            "map_writes": p.writes.json(),
            "baseline_noop_ms": p.noop.json(),
            "baseline_noop_compile_ms": p.noop_compile.json(),
            "baseline_noop_apply_ms": p.noop_apply.json(),
            "p50_ratio_to_noop": p.total.median / p.noop.median,
            "per_kind": p.per_kind.iter().map(|(k, t, w, i, pol)| json!({
                "kind": k.name(), "total_ms": t.json(), "map_writes": w.json(),
                "ipcache_changed": i.json(), "policy_changed": pol.json(),
            })).collect::<Vec<_>>(),
            "kernel_map_sizes": {"endpoints": p.kernel_sizes.0, "ipcache": p.kernel_sizes.1, "policy": p.kernel_sizes.2},
        })),
        "targets": {
            "full_compile_ms": {"value": big.compile.median, "limit": 2000.0, "met": big.compile.median <= 2000.0},
            "peak_memory_mib": {"value": peak, "limit": 150.0, "met": peak <= 150.0},
            "propagation_p99_ms": prop.map(|p| json!({"value": p.total.p99, "limit": 50.0, "met": p.total.p99 <= 50.0})),
            "map_growth": {"pods_ratio": map_growth.0, "largest_map_ratio": map_growth.1},
        },
    });
    common::write_json("control", &json);
}
