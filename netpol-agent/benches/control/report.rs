//! The Markdown tables, the targets and `target/bench/control.json`.

use serde_json::{Value, json};

use crate::cluster::CLUSTER_POLICIES;
use crate::common::{self, Summary, thousands};
use crate::kube_path::{Event, KubePath};
use crate::measure::{Propagation, SizeResult};
use crate::{Config, LOCAL_PODS, PODS_PER_NAMESPACE, POLICIES_PER_NAMESPACE, SizeRun};

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

fn mib(v: f64) -> String {
    format!("{v:.0} MiB")
}

pub fn report(config: &Config, machine: &Value, runs: &[SizeRun], rss_start: f64) {
    let smoke = common::smoke_label(config.smoke);

    println!("\n## Control plane: compile, maps and memory per cluster size{smoke}\n");
    println!(
        "{PODS_PER_NAMESPACE} pods and {POLICIES_PER_NAMESPACE} policies per namespace, and \
         {CLUSTER_POLICIES} ClusterNetworkPolicies (both tiers); {LOCAL_PODS} pods on this \
         node. Compile: a fresh `Compiler`'s first compile, median \
         of {} runs. Memory: this process (the state, the compiler's memo, the last result, \
         the maps' shadows), VmRSS after the cold compiles and the peak VmHWM after the \
         changes; the process started at {rss_start:.0} MiB.\n",
        config.compile_runs
    );
    let rows: Vec<Vec<String>> = runs
        .iter()
        .map(|run| {
            let r = &run.compile;
            vec![
                thousands(r.size.pods()),
                thousands(r.size.namespaces),
                thousands(r.size.policies()),
                r.local.to_string(),
                fmt_ms(r.compile.median),
                format!("{:.1} s", run.build.as_secs_f64()),
                mib(run.rss_state),
                mib(run.after_compile.0),
                mib(run.after_changes.1),
                thousands(r.endpoints),
                thousands(r.ipcache),
                thousands(r.policy),
                thousands(r.identities),
            ]
        })
        .collect();
    common::table(
        &[
            "pods",
            "namespaces",
            "policies",
            "local pods",
            "cold compile",
            "state built in",
            "RSS: state",
            "RSS: + compile",
            "peak RSS",
            "ENDPOINTS",
            "IPCACHE",
            "POLICY",
            "identities",
        ],
        &rows,
    );

    if runs.iter().any(|run| run.propagation.is_some()) {
        println!(
            "\n## Control plane: one change → kernel maps ({} changes per size){smoke}\n",
            config.changes
        );
        println!(
            "Time from a change in the state to the kernel maps holding it: `compile` by the \
             same `Compiler` (allocations and memo kept, told which pods, policies and \
             namespaces changed) + `Datapath::apply` into real maps. p50 / p99 per kind of change; the baseline \
             is the same loop with no change (median of {} runs, no map writes).\n",
            config.noop_runs
        );
        let mut header = vec!["change".to_string()];
        header.extend(
            runs.iter()
                .map(|run| format!("{} pods", thousands(run.compile.size.pods()))),
        );
        let header: Vec<&str> = header.iter().map(String::as_str).collect();
        let cell = |s: &Summary| format!("{} / {}", fmt_ms(s.median), fmt_ms(s.p99));
        let props: Vec<Option<&Propagation>> =
            runs.iter().map(|run| run.propagation.as_ref()).collect();
        let row = |name: &str, f: &dyn Fn(&Propagation) -> String| {
            let mut row = vec![name.to_string()];
            row.extend(props.iter().map(|p| p.map_or("-".into(), f)));
            row
        };
        let mut rows = vec![row("no change (baseline)", &|p| cell(&p.noop))];
        let kinds = crate::changes::ChangeKind::ALL;
        for kind in kinds {
            rows.push(row(kind.name(), &|p| {
                p.per_kind
                    .iter()
                    .find(|k| k.kind == kind)
                    .map_or("-".into(), |k| cell(&k.total))
            }));
        }
        rows.push(row("all changes", &|p| cell(&p.total)));
        rows.push(row("all changes: compile", &|p| cell(&p.compile)));
        rows.push(row("all changes: apply", &|p| cell(&p.apply)));
        rows.push(row("map writes per change: median (max)", &|p| {
            format!("{:.0} ({:.0})", p.writes.median, p.writes.max)
        }));
        common::table(&header, &rows);

        println!(
            "\nWhere each kind's time goes: the compile and the apply (p50 / p99 each), and \
             the kernel map writes (median, max).\n"
        );
        let mut rows = Vec::new();
        for kind in kinds {
            rows.push(row(kind.name(), &|p| {
                p.per_kind
                    .iter()
                    .find(|k| k.kind == kind)
                    .map_or("-".into(), |k| {
                        format!(
                            "compile {} · apply {} · writes {} ({})",
                            cell(&k.compile),
                            cell(&k.apply),
                            thousands(k.writes.median as usize),
                            thousands(k.writes.max as usize)
                        )
                    })
            }));
        }
        common::table(&header, &rows);
    } else {
        println!("\n(change propagation skipped: needs root and bpffs)");
    }

    kube_tables(config, runs);
    churn_table(config, runs);
    targets(config, runs);
    write_json(config, machine, runs, rss_start);
}

/// The agent in Kubernetes mode against the API server double.
fn kube_tables(config: &Config, runs: &[SizeRun]) {
    if runs.iter().all(|run| run.kube.is_none()) {
        println!("\n(the Kubernetes path was skipped: needs root, bpffs and `ip`)");
        return;
    }
    let smoke = common::smoke_label(config.smoke);
    println!(
        "\n## The agent in Kubernetes mode: first sync, memory, watch event → kernel{smoke}\n"
    );
    println!(
        "The release agent (`--kubeconfig`, `--debounce-ms 1 --max-delay-ms 20`) against the \
         API server double serving the same cluster over HTTP list/watch (kube-rs lists in \
         pages of 500). First sync: from the agent's start to its status file reporting the \
         double's resourceVersion (every list, compile and map write done). RSS: the \
         agent's VmRSS then, and its VmHWM after the changes. Then one watch event at a \
         time, from the double serving it to the status file reporting its version, p50 / \
         p99 per kind; \"pod conditions\" is an update of nothing the agent keeps.\n"
    );
    let mut header = vec!["".to_string()];
    header.extend(
        runs.iter()
            .map(|run| format!("{} pods", thousands(run.compile.size.pods()))),
    );
    let header: Vec<&str> = header.iter().map(String::as_str).collect();
    let cell = |s: &Summary| format!("{} / {}", fmt_ms(s.median), fmt_ms(s.p99));
    let row = |name: &str, f: &dyn Fn(&KubePath) -> String| {
        let mut row = vec![name.to_string()];
        row.extend(
            runs.iter()
                .map(|run| run.kube.as_ref().map_or("-".into(), f)),
        );
        row
    };
    let mut rows = vec![
        row("first sync", &|k| {
            format!("{:.2} s", k.first_sync.as_secs_f64())
        }),
        row("agent RSS after the first sync", &|k| mib(k.rss_synced)),
        row("agent peak RSS", &|k| mib(k.peak_rss)),
    ];
    for event in Event::ALL {
        rows.push(row(event.label(), &|k| {
            k.per_kind
                .iter()
                .find(|(e, _)| *e == event)
                .map_or("-".into(), |(_, s)| cell(s))
        }));
    }
    rows.push(row("every change (conditions aside)", &|k| {
        cell(&k.changes)
    }));
    common::table(&header, &rows);
}

/// The churn at the largest size: memory and map entries before, during and after.
fn churn_table(config: &Config, runs: &[SizeRun]) {
    let Some((run, churn)) = runs
        .iter()
        .rev()
        .find_map(|run| Some((run, run.kube.as_ref()?.churn.as_ref()?)))
    else {
        return;
    };
    let smoke = if config.smoke { " — SMOKE" } else { "" };
    println!(
        "\n## Churn: {:.0} s at {} pods{smoke}\n",
        churn.duration.as_secs_f64(),
        thousands(run.compile.size.pods())
    );
    println!(
        "The same agent, after the changes above: a pod created every 10 ms (one in a \
         hundred on this node) and the one created 1,000 before deleted ({} pods came and \
         went), a served pod's label \
         flipped and back every 100 ms ({} updates), a policy replaced every second ({}). \
         Then everything the churn added is deleted; \"after\" is once the agent's \
         status reports that (it took {:.2} s to catch up).\n",
        thousands(churn.created),
        thousands(churn.label_flips),
        thousands(churn.policies_replaced),
        churn.settle.as_secs_f64(),
    );
    let during: Vec<f64> = churn.rss_samples.iter().map(|&(_, rss)| rss).collect();
    let at = |fraction: f64| {
        let i = ((during.len() as f64 * fraction) as usize).min(during.len().saturating_sub(1));
        during.get(i).map_or("-".into(), |&rss| mib(rss))
    };
    let mut rows = vec![
        vec!["agent RSS before".into(), mib(churn.rss_before)],
        vec!["agent RSS, a third into the churn".into(), at(1.0 / 3.0)],
        vec!["agent RSS, two thirds in".into(), at(2.0 / 3.0)],
        vec!["agent RSS at the end of the churn".into(), at(1.0)],
        vec![
            "agent RSS, highest sample".into(),
            during
                .iter()
                .copied()
                .fold(None, |m: Option<f64>, v| Some(m.map_or(v, |m| m.max(v))))
                .map_or("-".into(), mib),
        ],
        vec!["agent RSS after".into(), mib(churn.rss_after)],
    ];
    for (map, before) in &churn.entries_before {
        let after = churn.entries_after.get(map).copied().unwrap_or(0);
        rows.push(vec![
            format!("{map} entries, before → after"),
            format!(
                "{} → {}",
                thousands(*before as usize),
                thousands(after as usize)
            ),
        ]);
    }
    common::table(&["", "value"], &rows);
}

/// The targets of issue 16 at the smallest and the largest size (full runs).
fn targets(config: &Config, runs: &[SizeRun]) {
    println!("\n## Control plane targets\n");
    let met = |ok: bool| if ok { "met" } else { "MISSED" };
    // The targets are for 10,000 and 150,000 pods: only the sizes run that are
    // those (smoke mode: the smallest and largest, to exercise the report).
    let (small, big) = if config.smoke {
        (runs.first(), runs.last())
    } else {
        (
            runs.iter().find(|r| r.compile.size.pods() <= 10_020),
            runs.iter().find(|r| r.compile.size.pods() >= 150_000),
        )
    };
    let pods = |run: &SizeRun| thousands(run.compile.size.pods());
    let mut rows = Vec::new();
    if let Some(big) = big {
        rows.push(vec![
            format!("cold compile, {} pods", pods(big)),
            fmt_ms(big.compile.compile.median),
            "≤ 2,000 ms".into(),
            met(big.compile.compile.median <= 2000.0).into(),
        ]);
    }
    for (run, limit) in [(small, 60.0), (big, 200.0)] {
        if let Some(run) = run {
            rows.push(vec![
                format!("peak RSS of this process, {} pods", pods(run)),
                mib(run.after_changes.1),
                format!("≤ {limit:.0} MiB"),
                met(run.after_changes.1 <= limit).into(),
            ]);
        }
    }
    for (run, limit) in [(small, 5.0), (big, 10.0)] {
        if let Some((run, p)) = run.and_then(|run| Some((run, run.propagation.as_ref()?))) {
            rows.push(vec![
                format!("one change → kernel maps, p99, {} pods", pods(run)),
                fmt_ms(p.total.p99),
                format!("≤ {limit:.0} ms"),
                met(p.total.p99 <= limit).into(),
            ]);
        }
    }
    if let Some((big, k)) = big.and_then(|run| Some((run, run.kube.as_ref()?))) {
        rows.push(vec![
            format!("watch event → kernel, p99, {} pods", pods(big)),
            fmt_ms(k.changes.p99),
            "≤ 30 ms".into(),
            met(k.changes.p99 <= 30.0).into(),
        ]);
        rows.push(vec![
            format!("agent peak RSS, Kubernetes mode, {} pods", pods(big)),
            mib(k.peak_rss),
            "≤ 200 MiB".into(),
            met(k.peak_rss <= 200.0).into(),
        ]);
        rows.push(vec![
            format!("first sync, {} pods", pods(big)),
            format!("{:.2} s", k.first_sync.as_secs_f64()),
            "≤ 15 s".into(),
            met(k.first_sync.as_secs_f64() <= 15.0).into(),
        ]);
    }
    if let Some((small, k)) = small.and_then(|run| Some((run, run.kube.as_ref()?))) {
        rows.push(vec![
            format!("agent peak RSS, Kubernetes mode, {} pods", pods(small)),
            mib(k.peak_rss),
            "≤ 60 MiB".into(),
            met(k.peak_rss <= 60.0).into(),
        ]);
    }
    if rows.is_empty() {
        println!("(no size run is one the targets concern: 10,000 or 150,000 pods)");
        return;
    }
    common::table(&["target", "measured", "limit", "status"], &rows);
    if config.smoke {
        println!("\n(smoke sizes: the targets concern the full sizes)");
    }
}

fn write_json(config: &Config, machine: &Value, runs: &[SizeRun], rss_start: f64) {
    let size_json = |r: &SizeResult| {
        json!({
            "pods": r.size.pods(), "namespaces": r.size.namespaces, "policies": r.size.policies(),
            "rules": r.rules, "local_pods": r.local,
            "compile_ms": r.compile.json(),
            "endpoints": r.endpoints, "ipcache": r.ipcache, "policy": r.policy,
            "identities": r.identities,
        })
    };
    let propagation_json = |p: &Propagation| {
        json!({
            "changes": p.total.n,
            "total_ms": p.total.json(),
            "compile_ms": p.compile.json(),
            "apply_ms": p.apply.json(),
            "map_writes": p.writes.json(),
            "baseline_noop_ms": p.noop.json(),
            "baseline_noop_compile_ms": p.noop_compile.json(),
            "baseline_noop_apply_ms": p.noop_apply.json(),
            "p50_ratio_to_noop": p.total.median / p.noop.median,
            "per_kind": p.per_kind.iter().map(|k| json!({
                "kind": k.kind.name(), "total_ms": k.total.json(),
                "compile_ms": k.compile.json(), "apply_ms": k.apply.json(),
                "map_writes": k.writes.json(),
                "ipcache_changed": k.ipcache.json(), "policy_changed": k.policy.json(),
            })).collect::<Vec<_>>(),
            "kernel_map_sizes": {"endpoints": p.kernel_sizes.0, "ipcache": p.kernel_sizes.1, "policy": p.kernel_sizes.2},
            "rss_after_first_apply_mib": p.memory_after_apply.0,
        })
    };
    let json = json!({
        "bench": "control",
        "mode": if config.smoke { "smoke" } else { "full" },
        "machine": machine,
        "method": {
            "compile": "wall clock of a fresh Compiler's first compile, median of runs",
            "memory": "VmRSS/VmHWM of the bench process from /proc/self/status; sizes run smallest first, each dropped before the next",
            "propagation": "state change, then compile by the same Compiler (allocations and memo kept, told which pods, policies and namespaces changed) + Datapath::apply into real kernel maps (private netns, unique bpffs dir); baseline: the same loop without a change",
            "cluster": format!("{PODS_PER_NAMESPACE} pods and {POLICIES_PER_NAMESPACE} policies per namespace (a window over ten shapes), {CLUSTER_POLICIES} ClusterNetworkPolicies (six shapes, both tiers), {LOCAL_PODS} local pods; label selectors with matchExpressions (In, NotIn, Exists), namespace selectors, ipBlocks with excepts (IPv4 and IPv6), named ports (ingress and egress), port ranges, SCTP; 1 pod in 4 dual-stack"),
        },
        "start_rss_mib": rss_start,
        "sizes": runs.iter().map(|run| json!({
            "compile": size_json(&run.compile),
            "state_build_s": run.build.as_secs_f64(),
            "rss_mib": {
                "state": run.rss_state,
                "after_compile": run.after_compile.0,
                "after_changes": run.after_changes.0,
                "peak": run.after_changes.1,
            },
            "propagation": run.propagation.as_ref().map(propagation_json),
            "kubernetes_path": run.kube.as_ref().map(|k| json!({
                "first_sync_s": k.first_sync.as_secs_f64(),
                "agent_rss_after_sync_mib": k.rss_synced,
                "agent_peak_rss_mib": k.peak_rss,
                "watch_event_to_status_ms": k.changes.json(),
                "per_kind": k.per_kind.iter().map(|(e, s)| json!({
                    "kind": e.label(), "ms": s.json(),
                })).collect::<Vec<_>>(),
                "churn": k.churn.as_ref().map(|c| json!({
                    "seconds": c.duration.as_secs_f64(),
                    "pods_created_and_deleted": c.created,
                    "label_updates": c.label_flips,
                    "policies_replaced": c.policies_replaced,
                    "rss_before_mib": c.rss_before,
                    "rss_samples": c.rss_samples,
                    "rss_after_mib": c.rss_after,
                    "map_entries_before": c.entries_before,
                    "map_entries_after": c.entries_after,
                    "settle_s": c.settle.as_secs_f64(),
                })),
            })),
        })).collect::<Vec<_>>(),
    });
    common::write_json("control", &json);
}
