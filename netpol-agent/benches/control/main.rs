//! Control plane: compile time, map sizes, memory, and change propagation into real
//! kernel maps, on synthetic clusters of 10,000, 50,000 and 150,000 pods (30 pods and 3
//! policies per namespace: 5,000 namespaces and 15,000 policies at the top), 110 of the
//! pods on this node at every size.
//!
//! `cargo bench -p netpol-agent --bench control [-- --smoke]` (root for the kernel part;
//! without root the compile part still runs). Prints Markdown, writes
//! `target/bench/control.json`, and keeps the Kubernetes-mode agent's log of each size as
//! `target/bench/control-agent-<pods>.log` (its `applied` lines time each phase).
//! `NETPOL_BENCH_PODS=150000` runs only the sizes named.
//!
//! Method:
//! - Sizes run one after the other, smallest first, each in full before the next one's
//!   cluster is built (so the process's peak resident memory after a size is that
//!   size's peak).
//! - The cluster is built from JSON through k8s-openapi's serde (as the manifest source
//!   does); building is not timed as compile.
//! - Compile time: wall clock of a fresh `Compiler`'s first compile, median of the runs.
//! - Memory: VmRSS / VmHWM from /proc/self/status after the state is built, after the
//!   cold compiles, and after the changes (the agent holds the state, the compiler's
//!   memo, the last result and the maps' shadows).
//! - Propagation: a change is made to the in-memory state (in turn: a pod label flipped,
//!   a policy added, a pod created, a pod deleted, a namespace label flipped), then a
//!   compile by the same `Compiler` and `Datapath::apply` into real kernel maps under
//!   `/sys/fs/bpf/netpol-bench-<pid>/<size>` (in a private network namespace, so nothing
//!   is attached). Time = compile + apply, per change; p50 and p99. Baseline: the same
//!   loop with no change (no map writes). The `Compiler` keeps its allocations and memo
//!   and is told which pods, policies and namespaces changed (`Compiler::compile_changed`, as the agent's loop
//!   tells it what its Kubernetes source reports), so this is the path the agent takes
//!   after a change.

mod changes;
mod churn;
mod cluster;
#[path = "../common/mod.rs"]
mod common;
mod kube_path;
mod measure;
mod report;

use std::time::{Duration, Instant};

use cluster::cluster;
use kube_path::{KubePath, kube_path};
use measure::{Propagation, SizeResult, measure_compile, propagation};
use report::report;

/// The agent's allocator with the agent's options (`src/main.rs`), so that what this
/// process measures in itself (the compile and the apply, its memory) is what the agent
/// would see, not glibc's malloc.
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

#[unsafe(export_name = "_rjem_malloc_conf")]
static MALLOC_CONF: Option<&std::ffi::c_char> =
    // SAFETY: a pointer to the first byte of a static NUL-terminated string.
    Some(unsafe { &*netpol_agent::JEMALLOC_OPTIONS.as_ptr() });

const NODE: &str = "node-0";
const PODS_PER_NAMESPACE: usize = 30;
const POLICIES_PER_NAMESPACE: usize = 3;
/// Pods on this node at every size (150,000 pods on about 1,360 nodes).
const LOCAL_PODS: usize = 110;

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
    /// Nodes of the cluster: this one and enough others for `LOCAL_PODS` each.
    fn nodes(self) -> usize {
        (self.pods() / LOCAL_PODS).max(2)
    }
}

struct Config {
    smoke: bool,
    /// Smallest first.
    sizes: Vec<Size>,
    compile_runs: usize,
    changes: usize,
    noop_runs: usize,
    /// Churn against the Kubernetes-mode agent at the largest size.
    churn: Duration,
}

impl Config {
    fn new(smoke: bool) -> Config {
        if smoke {
            Config {
                smoke,
                sizes: [2, 4, 8].map(|namespaces| Size { namespaces }).to_vec(),
                compile_runs: 3,
                changes: 15,
                noop_runs: 3,
                churn: Duration::from_secs(2),
            }
        } else {
            Config {
                smoke,
                // 10,020, 50,010 and 150,000 pods, or those of NETPOL_BENCH_PODS.
                sizes: chosen_sizes().unwrap_or_else(|| {
                    [334, 1_667, 5_000]
                        .map(|namespaces| Size { namespaces })
                        .to_vec()
                }),
                compile_runs: 3,
                changes: 250,
                noop_runs: 10,
                churn: churn_duration(),
            }
        }
    }
}

/// 10 minutes, or `NETPOL_BENCH_CHURN_S` seconds (0: no churn).
fn churn_duration() -> Duration {
    let seconds = std::env::var("NETPOL_BENCH_CHURN_S")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(600);
    Duration::from_secs(seconds)
}

/// `NETPOL_BENCH_PODS=10000,150000`: only these sizes (rounded to whole namespaces), to
/// look at one size while working on it. The report is the same, with fewer columns.
fn chosen_sizes() -> Option<Vec<Size>> {
    let text = std::env::var("NETPOL_BENCH_PODS").ok()?;
    let mut sizes: Vec<Size> = text
        .split(',')
        .filter_map(|pods| match pods.trim().replace('_', "").parse::<usize>() {
            Ok(pods) if pods >= PODS_PER_NAMESPACE => Some(Size {
                namespaces: pods.div_ceil(PODS_PER_NAMESPACE),
            }),
            _ => {
                eprintln!("NETPOL_BENCH_PODS: ignoring {pods:?} (a number of pods, at least 30)");
                None
            }
        })
        .collect();
    sizes.sort_by_key(|s| s.namespaces);
    (!sizes.is_empty()).then_some(sizes)
}

/// Everything measured at one size.
struct SizeRun {
    compile: SizeResult,
    build: Duration,
    /// VmRSS (MiB) once the state is built, and (VmRSS, VmHWM) after the cold compiles
    /// and after the changes.
    rss_state: f64,
    after_compile: (f64, f64),
    after_changes: (f64, f64),
    propagation: Option<Propagation>,
    /// The agent in Kubernetes mode against the API server double.
    kube: Option<KubePath>,
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

    let mut runs = Vec::new();
    for (i, &size) in config.sizes.iter().enumerate() {
        let t = Instant::now();
        let state = cluster(size);
        let build = t.elapsed();
        let (rss_state, _) = common::memory_mib();
        let (compile, compiled, compiler) = measure_compile(&state, size, config.compile_runs);
        let after_compile = common::memory_mib();
        eprintln!(
            "{} pods: compiled ({:.1} s)",
            common::thousands(size.pods()),
            started.elapsed().as_secs_f64()
        );
        let propagation = dir.as_ref().map(|dir| {
            let dir = dir.path.join(format!("size-{i}"));
            propagation(&config, &dir, state, size, compiled, compiler)
        });
        let after_changes = common::memory_mib();
        eprintln!(
            "{} pods: changes propagated ({:.1} s)",
            common::thousands(size.pods()),
            started.elapsed().as_secs_f64()
        );
        // Last: the double's objects would count in this process's peak RSS above.
        let kube = dir.as_ref().and_then(|dir| {
            let dir = dir.path.join(format!("kube-{i}"));
            let last = i + 1 == config.sizes.len();
            let churn = (last && !config.churn.is_zero()).then_some(config.churn);
            kube_path(&config, &dir, &cluster(size), size, churn)
        });
        eprintln!(
            "{} pods: Kubernetes path measured ({:.1} s)",
            common::thousands(size.pods()),
            started.elapsed().as_secs_f64()
        );
        runs.push(SizeRun {
            compile,
            build,
            rss_state,
            after_compile,
            after_changes,
            propagation,
            kube,
        });
    }

    report(&config, &machine, &runs, rss_start);
    drop(dir);
}
