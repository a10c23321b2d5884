//! The Markdown tables, the targets and `target/bench/datapath.json`.

use serde_json::{Value, json};

use crate::common::{self, thousands};
use crate::scenarios::Scenario;
use crate::{Config, Measured};

fn single_runs_json(m: &Measured) -> Value {
    let keys = [
        "empty_program",
        "netpol_arp",
        "new_flow_allowed_syn_ct_insert",
        "service_new_leave_node",
        "service_established_leave_node",
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

/// An established packet may cost at most this much more than the empty program.
const ESTABLISHED_LIMIT_NS: f64 = 25.0;
/// A new flow at the largest POLICY size may cost at most this multiple of the smallest.
const NEW_FLOW_SCALING_LIMIT: f64 = 1.15;

pub fn report(config: &Config, machine: &Value, scenarios: &[Scenario], results: &[Measured]) {
    let sizes: Vec<String> = results
        .iter()
        .map(|m| {
            format!(
                "POLICY {} ({} Admin tier)",
                thousands(m.policy_entries),
                thousands(m.tier_entries)
            )
        })
        .collect();
    println!(
        "\n## Datapath: ns per packet (BPF_PROG_TEST_RUN){}\n",
        common::smoke_label(config.smoke)
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
        (
            "Service: new flow, exit device",
            "repeat = 1, leave_node, marked RST to port 85 on another node: CT miss + ENDPOINTS + IPCACHE + POLICY, mark cleared",
        ),
        (
            "Service: established, exit device",
            "repeat = 1, leave_node, marked ACK to a backend on another node: CT hit, mark cleared",
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
    let (service_est, service_new) = (idx("service_established_to_pod"), idx("service_new_to_pod"));
    let (denied_ranges, rst_ranges) = (
        idx("new_flow_denied_ranges"),
        idx("new_flow_allowed_ranges_rst"),
    );
    let (admin_denied, admin_pass) = (idx("new_flow_admin_denied"), idx("new_flow_admin_pass_rst"));
    let first = &results[0];
    let last = &results[results.len() - 1];
    let worst_service_gap = results
        .iter()
        .map(|m| m.repeated[service_est].median - m.repeated[est].median)
        .fold(f64::MIN, f64::max);
    let worst_gap = results
        .iter()
        .map(|m| m.repeated[est].median - m.repeated[empty].median)
        .fold(f64::MIN, f64::max);
    // Sizes are measured one after the other, so drift of the machine between them
    // would show as scaling: each figure is taken relative to the empty program of its
    // own rounds first (the ratio column), and the ratios are compared.
    let relative = |m: &Measured, i: usize| m.repeated[i].median / m.repeated[empty].median;
    let scaling = |i: usize| relative(last, i) / relative(first, i);
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
            format!("≤ {ESTABLISHED_LIMIT_NS} ns"),
            met(worst_gap <= ESTABLISHED_LIMIT_NS).into(),
        ],
        vec![
            "Service established (backend's veth) − direct established (worst size)".to_string(),
            format!("{worst_service_gap:.0} ns"),
            "≤ 10 ns".into(),
            met(worst_service_gap <= 10.0).into(),
        ],
        vec![
            format!("Service new flow (backend's veth): POLICY {hi} / POLICY {lo}"),
            format!("{:.2}×", scaling(service_new)),
            "≤ 1.5×".into(),
            met(scaling(service_new) <= 1.5).into(),
        ],
        vec![
            format!("new flow denied: POLICY {hi} / POLICY {lo}"),
            format!("{:.2}×", scaling(denied)),
            format!("≤ {NEW_FLOW_SCALING_LIMIT}×"),
            met(scaling(denied) <= NEW_FLOW_SCALING_LIMIT).into(),
        ],
        vec![
            format!("new flow allowed (RST): POLICY {hi} / POLICY {lo}"),
            format!("{:.2}×", scaling(rst)),
            format!("≤ {NEW_FLOW_SCALING_LIMIT}×"),
            met(scaling(rst) <= NEW_FLOW_SCALING_LIMIT).into(),
        ],
        vec![
            format!("new flow denied by the Admin tier: POLICY {hi} / POLICY {lo}"),
            format!("{:.2}×", scaling(admin_denied)),
            format!("≤ {NEW_FLOW_SCALING_LIMIT}×"),
            met(scaling(admin_denied) <= NEW_FLOW_SCALING_LIMIT).into(),
        ],
        vec![
            format!("new flow, Admin Pass then NetworkPolicy allows: POLICY {hi} / POLICY {lo}"),
            format!("{:.2}×", scaling(admin_pass)),
            format!("≤ {NEW_FLOW_SCALING_LIMIT}×"),
            met(scaling(admin_pass) <= NEW_FLOW_SCALING_LIMIT).into(),
        ],
        vec![
            format!("new flow denied, endpoint with port ranges: POLICY {hi} / POLICY {lo}"),
            format!("{:.2}×", scaling(denied_ranges)),
            "(information)".into(),
            "-".into(),
        ],
        vec![
            format!("new flow allowed by a port range: POLICY {hi} / POLICY {lo}"),
            format!("{:.2}×", scaling(rst_ranges)),
            "(information)".into(),
            "-".into(),
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
            "scaling": "(scenario / empty program) at the largest POLICY size over the same at the smallest: drift between sizes cancels",
        },
        "sizes": results.iter().map(|m| json!({
            "policy_entries": m.policy_entries,
            "tier_entries": m.tier_entries,
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
            "established_minus_floor_ns": {"value": worst_gap, "limit": ESTABLISHED_LIMIT_NS, "met": worst_gap <= ESTABLISHED_LIMIT_NS},
            "new_flow_denied_scaling": {"value": scaling(denied), "limit": NEW_FLOW_SCALING_LIMIT, "met": scaling(denied) <= NEW_FLOW_SCALING_LIMIT,
                "from_policy_entries": first.policy_entries, "to_policy_entries": last.policy_entries},
            "new_flow_allowed_rst_scaling": {"value": scaling(rst), "limit": NEW_FLOW_SCALING_LIMIT, "met": scaling(rst) <= NEW_FLOW_SCALING_LIMIT},
            "new_flow_admin_denied_scaling": {"value": scaling(admin_denied), "limit": NEW_FLOW_SCALING_LIMIT, "met": scaling(admin_denied) <= NEW_FLOW_SCALING_LIMIT},
            "new_flow_admin_pass_scaling": {"value": scaling(admin_pass), "limit": NEW_FLOW_SCALING_LIMIT, "met": scaling(admin_pass) <= NEW_FLOW_SCALING_LIMIT},
            "new_flow_denied_ranges_scaling": {"value": scaling(denied_ranges)},
            "new_flow_allowed_ranges_scaling": {"value": scaling(rst_ranges)},
            "allowed_syn_above_floor_scaling": {"value": syn_scaling},
        },
    });
    common::write_json("datapath", &json);
}
