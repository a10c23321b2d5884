//! Tier 3: a full map. The agent runs with room for two dual-stack pods in ENDPOINTS
//! (`--max-endpoints 4`) and the lab has three. The third pod cannot be programmed, so
//! its veth is refused: nothing gets in or out (the closing direction). The other two are
//! enforced as usual, including a policy, and the refusal is reported: a log line naming
//! the pod and the map, and `netpol_refused{map="ENDPOINTS"}`.

mod support;

use std::time::{Duration, Instant};

use netpol_lab::{NetnsWorker, Probe};
use support::{B_ONLY_FROM_C, Cluster, HEALTH, agent_bin, check, http_get, sample, standard_lab};

#[test]
fn a_pod_that_does_not_fit_is_refused_and_everything_else_enforced() {
    let Some(agent_path) =
        agent_bin("a_pod_that_does_not_fit_is_refused_and_everything_else_enforced")
    else {
        return;
    };
    // b accepts only c: a -> b is denied by policy, not by the full map.
    let cluster = Cluster::start_with(
        standard_lab(&["x/a", "x/b", "x/c"]),
        &agent_path,
        B_ONLY_FROM_C,
        &["--max-endpoints", "4", "--health-addr", HEALTH],
    );
    let (lab, agent) = (&cluster.lab, &cluster.agent);

    check(
        lab,
        &[
            // a and b (the two that fit) are enforced as written.
            (Probe::tcp("x/b", "x/a", 80), true),
            (Probe::tcp("x/a", "x/b", 80), false),
            // c did not fit: refused both ways, even where b's policy would allow it.
            (Probe::tcp("x/c", "x/b", 80), false),
            (Probe::tcp("x/a", "x/c", 80), false),
            (Probe::udp("x/c", "x/a", 80), false),
        ],
        Some(agent),
    );

    let log = std::fs::read_to_string(agent.log_path()).expect("agent log");
    assert!(
        log.lines()
            .any(|l| l.contains("refused: Pod x/c") && l.contains("ENDPOINTS is full")),
        "the log names the refused pod and the full map:\n{}",
        agent.log_tail(20)
    );
    // The gauge is set when the refusal is found; the packet counters are copied from
    // the kernel once a second: wait for both, within a bound.
    let node = NetnsWorker::spawn(lab.node_netns()).expect("node worker");
    let series = r#"netpol_refused{map="ENDPOINTS"}"#;
    let refused_packets = |body: &str| -> f64 {
        body.lines()
            .filter(|l| l.starts_with("netpol_packets_total") && l.contains(r#"reason="refused""#))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    let body = loop {
        let (_, body) = http_get(&node, "/metrics");
        let done = sample(&body, series).is_some_and(|v| v >= 1.0) && refused_packets(&body) >= 1.0;
        if done || Instant::now() >= deadline {
            break body;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let value = sample(&body, series).unwrap_or_else(|| panic!("no {series} in /metrics:\n{body}"));
    assert_eq!(value, 1.0, "{series}");
    assert!(
        refused_packets(&body) >= 1.0,
        "packets dropped as refused are counted:\n{body}"
    );
    println!("ENDPOINTS full: x/c refused (log, {series} = {value}), x/a and x/b enforced");
}
