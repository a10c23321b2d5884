//! Churn at scale: the Kubernetes-mode agent under a steady stream of changes for
//! minutes (pods created and deleted at 100/s, labels flipped, policies replaced), then
//! everything the churn added removed again: its memory and map entries should come
//! back to where they were.
//!
//! The stream is paced by the clock (one tick per 10 ms: a pod created, one in a hundred
//! on this node, the one created 1,000 ticks before deleted; every 10th tick a served pod's label flipped, back on
//! the next; every 100th a policy replaced). The agent batches what arrives while it
//! compiles, as it would on a real cluster. RSS is sampled every 10 s (ten times at
//! least).

use std::collections::BTreeMap;
use std::io::{Read as _, Write as _};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::time::{Duration, Instant};

use netpol_lab::apiserver::ApiServer;
use serde_json::json;

use crate::common::memory_of;
use crate::kube_path::{Agent, Served, wait_status};

/// Pods the churn keeps alive at once: each one lives this many ticks.
const WINDOW: usize = 1_000;
/// One churned pod in this many is on this node.
const LOCAL_EVERY: usize = 100;
const TICK: Duration = Duration::from_millis(10);
const SAMPLE_EVERY: Duration = Duration::from_secs(10);
/// How long the agent may take to catch up once the churn stops.
const SETTLE_DEADLINE: Duration = Duration::from_secs(300);
/// How long the agent may take to serve its first map figures.
const METRICS_DEADLINE: Duration = Duration::from_secs(10);
/// The agent's map figures are copied from the kernel once a second: after the churn,
/// figures this much younger than the last change are read.
const METRICS_AGE: Duration = Duration::from_millis(2_500);

pub struct Churn {
    pub duration: Duration,
    pub created: usize,
    pub label_flips: usize,
    pub policies_replaced: usize,
    /// The agent's VmRSS before (MiB), every [`SAMPLE_EVERY`] during (seconds, MiB),
    /// and once it has caught up with the churn's end.
    pub rss_before: f64,
    pub rss_samples: Vec<(f64, f64)>,
    pub rss_after: f64,
    /// `netpol_map_entries` by map, before and after.
    pub entries_before: BTreeMap<String, u64>,
    pub entries_after: BTreeMap<String, u64>,
    /// From the churn's last change to the status reporting it.
    pub settle: Duration,
}

/// Runs the churn for `duration` against the agent (whose metrics are on `metrics`).
pub fn churn(
    server: &ApiServer,
    served: &Served,
    agent: &mut Agent,
    status: &Path,
    metrics: SocketAddr,
    duration: Duration,
) -> Result<Churn, String> {
    let pid = agent.pid().to_string();
    // Figures younger than the last change measured before.
    std::thread::sleep(METRICS_AGE);
    let (rss_before, _) = memory_of(&pid);
    let entries_before = map_entries(metrics)?;
    let pod = |k: usize| {
        // One in a hundred on this node (1/s, about what a node of the cluster gets at
        // 100/s cluster-wide, with a margin), the rest anywhere (`pick` of an odd
        // number: any pod; of an even one: this node's).
        let local = k.is_multiple_of(LOCAL_EVERY);
        let ip = format!("10.{}.{}.{}", 251 + k / 65_536, (k / 256) % 256, k % 256);
        let index = served.pick(2 * k + usize::from(!local));
        served.copy_of(index, &format!("churn-{k}"), &ip)
    };
    let policy = |m: usize, namespace: &str| {
        json!({
            "apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
            "metadata": {"name": format!("churn-{m}"), "namespace": namespace},
            "spec": {
                "podSelector": {"matchLabels": {"app": format!("app-{}", m % 10)}},
                "ingress": [{"from": [{"podSelector": {"matchLabels": {"role": "frontend"}}}],
                             "ports": [{"port": 9000 + m % 1000}]}],
            },
        })
    };
    let mut live: std::collections::VecDeque<(String, String)> = Default::default();
    let mut flipped: Option<serde_json::Value> = None;
    let mut last_policy: Option<(String, String)> = None;
    let (mut created, mut label_flips, mut policies_replaced) = (0, 0, 0);
    let mut rss_samples = Vec::new();
    // Ten samples at least, however short the churn.
    let sample_every = (duration / 10).min(SAMPLE_EVERY);
    let mut next_sample = sample_every;
    let started = Instant::now();
    let mut tick = 0usize;
    while started.elapsed() < duration {
        let due = TICK * u32::try_from(tick).unwrap_or(u32::MAX);
        if let Some(wait) = due.checked_sub(started.elapsed()) {
            std::thread::sleep(wait);
        }
        let (key, object) = pod(tick);
        server.apply(object);
        live.push_back((key.namespace.to_string(), key.name.to_string()));
        created += 1;
        if live.len() > WINDOW
            && let Some((namespace, name)) = live.pop_front()
        {
            let _ = server.delete("Pod", Some(&namespace), &name);
        }
        if tick.is_multiple_of(10) {
            // Forward on one tick, back on the next tenth: the served pods end as they
            // began.
            let object = match flipped.take() {
                Some(original) => original,
                None => {
                    let (_, original) = &served.pods[served.pick(tick / 10)];
                    flipped = Some(original.clone());
                    let mut changed = original.clone();
                    changed["metadata"]["labels"]["churn"] = json!(format!("flip-{tick}"));
                    changed
                }
            };
            server.apply(object);
            label_flips += 1;
        }
        if tick.is_multiple_of(100) {
            let m = tick / 100;
            let namespace = served.pods[served.pick(m)].0.namespace.to_string();
            server.apply(policy(m, &namespace));
            if let Some((namespace, name)) = last_policy.replace((namespace, format!("churn-{m}")))
            {
                let _ = server.delete("NetworkPolicy", Some(&namespace), &name);
            }
            policies_replaced += 1;
        }
        if started.elapsed() >= next_sample {
            rss_samples.push((started.elapsed().as_secs_f64(), memory_of(&pid).0));
            next_sample += sample_every;
        }
        tick += 1;
    }
    let churned = started.elapsed();
    // Take back everything the churn added.
    for (namespace, name) in live.drain(..) {
        let _ = server.delete("Pod", Some(&namespace), &name);
    }
    if let Some(original) = flipped.take() {
        server.apply(original);
    }
    if let Some((namespace, name)) = last_policy.take() {
        let _ = server.delete("NetworkPolicy", Some(&namespace), &name);
    }
    let ended = Instant::now();
    let version = server.resource_version();
    let settle = wait_status(&mut agent.0, status, version, ended, SETTLE_DEADLINE)
        .map_err(|e| format!("after the churn: {e}"))?;
    std::thread::sleep(METRICS_AGE);
    let (rss_after, _) = memory_of(&pid);
    let entries_after = map_entries(metrics)?;
    Ok(Churn {
        duration: churned,
        created,
        label_flips,
        policies_replaced,
        rss_before,
        rss_samples,
        rss_after,
        entries_before,
        entries_after,
        settle,
    })
}

/// `netpol_map_entries` by map, from the agent's `/metrics`, once it has them (the agent
/// copies them from the kernel once a second).
fn map_entries(metrics: SocketAddr) -> Result<BTreeMap<String, u64>, String> {
    let deadline = Instant::now() + METRICS_DEADLINE;
    loop {
        match read_map_entries(metrics) {
            Ok(entries) => return Ok(entries),
            Err(error) if Instant::now() >= deadline => return Err(error),
            Err(_) => std::thread::sleep(Duration::from_millis(100)),
        }
    }
}

fn read_map_entries(metrics: SocketAddr) -> Result<BTreeMap<String, u64>, String> {
    let mut stream = TcpStream::connect_timeout(&metrics, Duration::from_secs(5))
        .map_err(|e| format!("metrics on {metrics}: {e}"))?;
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .map_err(|e| e.to_string())?;
    write!(stream, "GET /metrics HTTP/1.0\r\nHost: {metrics}\r\n\r\n")
        .map_err(|e| e.to_string())?;
    let mut text = String::new();
    stream
        .read_to_string(&mut text)
        .map_err(|e| format!("reading /metrics: {e}"))?;
    let entries: BTreeMap<String, u64> = text
        .lines()
        .filter_map(|line| {
            let rest = line.strip_prefix("netpol_map_entries{map=\"")?;
            let (map, value) = rest.split_once("\"} ")?;
            Some((map.to_owned(), value.trim().parse().ok()?))
        })
        .collect();
    if entries.is_empty() {
        let start: String = text.chars().take(300).collect();
        return Err(format!("/metrics has no netpol_map_entries: {start:?}"));
    }
    Ok(entries)
}
