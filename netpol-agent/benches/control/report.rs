//! The Markdown tables, the targets and `target/bench/control.json`.

use std::time::Duration;

use serde_json::{Value, json};

use crate::common::{self, Summary, thousands};
use crate::measure::{Propagation, SizeResult};
use crate::{Config, LOCAL_PODS, PODS_PER_NAMESPACE, POLICIES_PER_NAMESPACE};

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

pub fn report(
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
