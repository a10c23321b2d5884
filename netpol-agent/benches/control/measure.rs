//! The measurements: cold compiles per size, and change propagation into real kernel
//! maps against a no-change baseline.

use std::collections::BTreeMap;
use std::time::Instant;

use netpol_agent::datapath::{Capacities, Datapath};
use netpol_compile::state::{Changes, ClusterState};
use netpol_compile::{Compiled, Compiler};

use crate::changes::{ChangeKind, change};
use crate::common::{self, Summary, ms};
use crate::{Config, Size};

pub struct SizeResult {
    pub size: Size,
    pub local: usize,
    pub rules: usize,
    pub compile: Summary,
    pub endpoints: usize,
    pub ipcache: usize,
    pub policy: usize,
    pub identities: usize,
}

/// The cold compiles of `state`; also the last result and the compiler that made it.
pub fn measure_compile(
    state: &ClusterState,
    size: Size,
    runs: usize,
) -> (SizeResult, Compiled, Compiler) {
    let mut times = Vec::with_capacity(runs);
    let mut last = None;
    for _ in 0..runs {
        // One compiler at a time, as the agent holds: the last run's goes first.
        drop(last.take());
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

/// One kind of change: where its time went and what it wrote.
pub struct KindSummary {
    pub kind: ChangeKind,
    /// Compile + apply.
    pub total: Summary,
    pub compile: Summary,
    pub apply: Summary,
    /// Kernel map writes.
    pub writes: Summary,
    /// IPCACHE and POLICY entries changed.
    pub ipcache: Summary,
    pub policy: Summary,
}

/// The samples of one kind of change, as [`KindSummary`] sums them up.
#[derive(Default)]
struct KindSamples {
    total: Vec<f64>,
    compile: Vec<f64>,
    apply: Vec<f64>,
    writes: Vec<f64>,
    ipcache: Vec<f64>,
    policy: Vec<f64>,
}

pub struct Propagation {
    pub per_kind: Vec<KindSummary>,
    pub total: Summary,
    pub compile: Summary,
    pub apply: Summary,
    pub writes: Summary,
    pub noop: Summary,
    pub noop_compile: Summary,
    pub noop_apply: Summary,
    pub memory_after_apply: (f64, f64),
    pub kernel_sizes: (usize, usize, usize),
}

/// Changes `state` `config.changes` times, each followed by a compile and an apply into
/// real kernel maps under `dir`; the state and the compiler are dropped at the end.
pub fn propagation(
    config: &Config,
    dir: &std::path::Path,
    mut state: ClusterState,
    size: Size,
    mut compiled: Compiled,
    mut compiler: Compiler,
) -> Propagation {
    // Room for the largest size (150,000 pods: about 190,000 IPCACHE keys).
    let capacities = Capacities {
        ipcache: Some(1 << 20),
        policy: Some(1 << 20),
        ..Capacities::default()
    };
    let mut datapath = Datapath::open(dir, &capacities).expect("load the programs");
    datapath.sync_maps(&compiled).expect("initial apply");
    let memory_after_apply = common::memory_mib();

    // Baseline: the same loop without a change.
    let (mut noop, mut noop_compile, mut noop_apply) = (vec![], vec![], vec![]);
    for _ in 0..config.noop_runs {
        let t0 = Instant::now();
        let next = compiler.compile_changed(&state, &Changes::NONE);
        let t1 = Instant::now();
        let report = datapath.sync_maps(&next).expect("apply");
        let t2 = Instant::now();
        assert_eq!(report.maps.writes(), 0, "no change, no writes");
        noop.push(ms(t2 - t0));
        noop_compile.push(ms(t1 - t0));
        noop_apply.push(ms(t2 - t1));
        compiled = next;
    }

    let mut by_kind: BTreeMap<ChangeKind, KindSamples> = BTreeMap::new();
    let started = Instant::now();
    for i in 0..config.changes {
        let (kind, changes) = change(&mut state, size, i);
        // As the agent's loop: the last result is released before the compile (its
        // maps are the compiler's, updated in place when nobody else holds them), and
        // the compiler is told which pods, policies and namespaces changed.
        let ipcache_before = compiled.ipcache.version();
        let policy_before = compiled.policy.version();
        drop(std::mem::take(&mut compiled));
        let t0 = Instant::now();
        let next = compiler.compile_changed(&state, &changes);
        let t1 = Instant::now();
        let report = datapath.sync_maps(&next).expect("apply");
        let t2 = Instant::now();
        assert!(next.diagnostics.is_empty(), "{:?}", next.diagnostics);
        let entry = by_kind.entry(kind).or_default();
        entry.total.push(ms(t2 - t0));
        entry.compile.push(ms(t1 - t0));
        entry.apply.push(ms(t2 - t1));
        entry.writes.push(report.maps.writes() as f64);
        // Which map the writes went to (outside the timed part).
        let ipcache_changed = next.ipcache.changes_since(ipcache_before);
        let policy_changed = next.policy.changes_since(policy_before);
        let made_from_the_last = "the compiler made it from the last result";
        entry
            .ipcache
            .push(ipcache_changed.expect(made_from_the_last).len() as f64);
        entry
            .policy
            .push(policy_changed.expect(made_from_the_last).len() as f64);
        compiled = next;
        assert!(report.refused.is_empty(), "{:?}", report.refused);
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
    // Every change's samples, whatever its kind.
    let all = |of: fn(&KindSamples) -> &Vec<f64>| {
        let samples: Vec<f64> = by_kind.values().flat_map(of).copied().collect();
        Summary::of(&samples)
    };
    let (total, compile, apply, writes) = (
        all(|k| &k.total),
        all(|k| &k.compile),
        all(|k| &k.apply),
        all(|k| &k.writes),
    );
    Propagation {
        per_kind: by_kind
            .into_iter()
            .map(|(kind, samples)| KindSummary {
                kind,
                total: Summary::of(&samples.total),
                compile: Summary::of(&samples.compile),
                apply: Summary::of(&samples.apply),
                writes: Summary::of(&samples.writes),
                ipcache: Summary::of(&samples.ipcache),
                policy: Summary::of(&samples.policy),
            })
            .collect(),
        total,
        compile,
        apply,
        writes,
        noop: Summary::of(&noop),
        noop_compile: Summary::of(&noop_compile),
        noop_apply: Summary::of(&noop_apply),
        memory_after_apply,
        kernel_sizes,
    }
}
