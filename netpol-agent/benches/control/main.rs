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

mod changes;
mod cluster;
#[path = "../common/mod.rs"]
mod common;
mod measure;
mod report;

use std::time::Instant;

use cluster::cluster;
use measure::{measure_compile, propagation};
use report::report;

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
