//! Prometheus metrics (`/metrics`, OpenMetrics text).
//!
//! Two kinds of figures:
//! - the agent's own (change-to-kernel latency, invalid objects, errors by kind), kept
//!   in prometheus-client metrics and updated where they happen;
//! - the kernel's (packets and bytes per verdict reason and direction, per policy rule,
//!   conntrack entries, map fill levels, event losses), read from the maps by the
//!   control loop into a [`KernelSnapshot`] and encoded at scrape time.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use netpol_common::{Counter as KernelCounter, DIR_INGRESS, Reason};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

/// What the kernel maps said at the last refresh.
#[derive(Clone, Debug, Default)]
pub struct KernelSnapshot {
    /// (reason, `DIR_*`, counter)
    pub verdicts: Vec<(Reason, u8, KernelCounter)>,
    /// Per rule with traffic.
    pub rules: Vec<RuleSeries>,
    /// (map, entries, capacity)
    pub maps: Vec<(String, u64, u64)>,
    pub conntrack_entries: Option<u64>,
    /// Conntrack entries the programs created (see `COUNTER_CT_CREATED`).
    pub conntrack_created: u64,
    pub events_suppressed: u64,
    pub events_lost: u64,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct VerdictLabels {
    direction: &'static str,
    reason: &'static str,
    verdict: &'static str,
}

/// One rule's counters, with its labels.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RuleSeries {
    /// `NetworkPolicy`, or a ClusterNetworkPolicy tier: `Admin`, `Baseline`.
    pub tier: &'static str,
    /// `ns/name` of a NetworkPolicy, the name of a ClusterNetworkPolicy.
    pub policy: String,
    /// `spec.ingress[0]`.
    pub rule: String,
    pub counter: KernelCounter,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RuleLabels {
    tier: &'static str,
    policy: String,
    rule: String,
}

/// Labels of [`Metrics::errors`]: the `kind()` of an error enum variant.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ErrorLabels {
    pub kind: String,
}

/// Labels of [`Metrics::invalid_fields`]: a field of an object that cannot be read.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct FieldLabels {
    /// `NetworkPolicy`, `Pod`, ...
    pub kind: String,
    /// `namespace/name` (or the name, or the file it was read from).
    pub object: String,
    /// The field's path, e.g. `spec.ingress[0].from[1].ipBlock.except[0]`.
    pub field: String,
}

/// Labels of per-map series: map fill, and [`Metrics::refused`] (the map that was full).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct MapLabels {
    pub map: String,
}

/// Labels of [`Metrics::staged`]: a staged NetworkPolicy and what it would change.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StagedLabels {
    /// `ns/name`.
    pub policy: String,
    /// `staged-drop` or `staged-allow`.
    pub verdict: String,
}

/// The verdict a reason stands for, as a label.
pub fn verdict_of(reason: Reason) -> &'static str {
    match reason {
        Reason::AuditAllowed => "audit",
        r if r.is_drop() => "dropped",
        _ => "allowed",
    }
}

#[derive(Debug, Default)]
struct KernelCollector {
    snapshot: Arc<Mutex<KernelSnapshot>>,
}

fn encode_counter_family<L: EncodeLabelSet + std::fmt::Debug>(
    encoder: &mut DescriptorEncoder<'_>,
    name: &str,
    help: &str,
    series: impl IntoIterator<Item = (L, u64)>,
) -> Result<(), std::fmt::Error> {
    let mut metric =
        encoder.encode_descriptor(name, help, None, ConstCounter::new(0u64).metric_type())?;
    for (labels, value) in series {
        ConstCounter::new(value).encode(metric.encode_family(&labels)?)?;
    }
    Ok(())
}

fn encode_gauge_family<L: EncodeLabelSet + std::fmt::Debug>(
    encoder: &mut DescriptorEncoder<'_>,
    name: &str,
    help: &str,
    series: impl IntoIterator<Item = (L, i64)>,
) -> Result<(), std::fmt::Error> {
    let mut metric =
        encoder.encode_descriptor(name, help, None, ConstGauge::new(0i64).metric_type())?;
    for (labels, value) in series {
        ConstGauge::new(value).encode(metric.encode_family(&labels)?)?;
    }
    Ok(())
}

impl Collector for KernelCollector {
    fn encode(&self, mut encoder: DescriptorEncoder<'_>) -> Result<(), std::fmt::Error> {
        let snapshot = self.snapshot.lock().map(|s| s.clone()).unwrap_or_default();
        let verdict_labels = |reason: Reason, direction: u8| VerdictLabels {
            direction: if direction == DIR_INGRESS {
                "ingress"
            } else {
                "egress"
            },
            reason: reason.name(),
            verdict: verdict_of(reason),
        };
        encode_counter_family(
            &mut encoder,
            "netpol_packets",
            "Packets judged by the TC programs, by direction (from the pod's point of view), reason and verdict",
            snapshot
                .verdicts
                .iter()
                .map(|(r, d, c)| (verdict_labels(*r, *d), c.packets)),
        )?;
        encode_counter_family(
            &mut encoder,
            "netpol_bytes",
            "Bytes judged by the TC programs, by direction, reason and verdict",
            snapshot
                .verdicts
                .iter()
                .map(|(r, d, c)| (verdict_labels(*r, *d), c.bytes)),
        )?;
        let rule_labels = |series: &RuleSeries| RuleLabels {
            tier: series.tier,
            policy: series.policy.clone(),
            rule: series.rule.clone(),
        };
        encode_counter_family(
            &mut encoder,
            "netpol_rule_packets",
            "Packets each rule decided: of connections a NetworkPolicy rule allowed, of \
             those a ClusterNetworkPolicy rule accepted or denied (label tier)",
            snapshot
                .rules
                .iter()
                .map(|series| (rule_labels(series), series.counter.packets)),
        )?;
        encode_counter_family(
            &mut encoder,
            "netpol_rule_bytes",
            "Bytes each rule decided (see netpol_rule_packets)",
            snapshot
                .rules
                .iter()
                .map(|series| (rule_labels(series), series.counter.bytes)),
        )?;
        let map_labels = |map: &str| MapLabels {
            map: map.to_owned(),
        };
        let gauge = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
        encode_gauge_family(
            &mut encoder,
            "netpol_map_entries",
            "Entries in each BPF map",
            snapshot
                .maps
                .iter()
                .map(|(m, n, _)| (map_labels(m), gauge(*n))),
        )?;
        encode_gauge_family(
            &mut encoder,
            "netpol_map_capacity",
            "Capacity (max_entries) of each BPF map",
            snapshot
                .maps
                .iter()
                .map(|(m, _, c)| (map_labels(m), gauge(*c))),
        )?;
        if let Some(entries) = snapshot.conntrack_entries {
            let metric = encoder.encode_descriptor(
                "netpol_conntrack_entries",
                "Connections in the conntrack map",
                None,
                ConstGauge::new(0i64).metric_type(),
            )?;
            ConstGauge::new(gauge(entries)).encode(metric)?;
            // Entries leave conntrack only by LRU eviction (expired ones stay until
            // evicted or reused), so what was created and is no longer there was
            // evicted. An estimate: entries made by programs older than the counter
            // are not counted.
            let metric = encoder.encode_descriptor(
                "netpol_conntrack_evictions",
                "Conntrack entries evicted to make room (estimated: created minus present)",
                None,
                ConstCounter::new(0u64).metric_type(),
            )?;
            ConstCounter::new(snapshot.conntrack_created.saturating_sub(entries)).encode(metric)?;
        }
        for (name, help, value) in [
            (
                "netpol_conntrack_created",
                "Conntrack entries created by the programs",
                snapshot.conntrack_created,
            ),
            (
                "netpol_events_suppressed",
                "Verdict events not sent: in-kernel rate limit",
                snapshot.events_suppressed,
            ),
            (
                "netpol_events_lost",
                "Verdict events not sent: ring buffer full",
                snapshot.events_lost,
            ),
        ] {
            let metric = encoder.encode_descriptor(
                name,
                help,
                None,
                ConstCounter::new(0u64).metric_type(),
            )?;
            ConstCounter::new(value).encode(metric)?;
        }
        Ok(())
    }
}

/// Every metric the agent exports.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    kernel: Arc<Mutex<KernelSnapshot>>,
    /// Seconds from a change being seen to the kernel holding it.
    pub propagation: Histogram,
    /// Distinct problems with objects of the state now in force (each logged).
    pub invalid_objects: Gauge,
    /// The fields those problems name, 1 each, now.
    pub invalid_fields: Family<FieldLabels, Gauge>,
    /// Applies of a changed state to the kernel.
    pub applies: Counter,
    /// Batches of updates that changed nothing the agent keeps (reported applied with
    /// no compile).
    pub unchanged_updates: Counter,
    /// Errors by kind (the variant of the module's Error enum).
    pub errors: Family<ErrorLabels, Counter>,
    /// Endpoints (ENDPOINTS, POLICY) or peer addresses (IPCACHE) not fully programmed
    /// because the map was full, now.
    pub refused: Family<MapLabels, Gauge>,
    /// New connections a staged NetworkPolicy would drop or allow, unlike the
    /// policies in force (counted from the verdict events the flow log reads).
    pub staged: Family<StagedLabels, Counter>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::default();
        // 1 ms .. ~16 s
        let propagation = Histogram::new(
            prometheus_client::metrics::histogram::exponential_buckets(0.001, 2.0, 15),
        );
        registry.register(
            "netpol_change_propagation_seconds",
            "Time from a change being seen to the kernel maps holding it",
            propagation.clone(),
        );
        let invalid_objects = Gauge::default();
        registry.register(
            "netpol_invalid_objects",
            "Objects rejected as invalid (named in the logs)",
            invalid_objects.clone(),
        );
        let invalid_fields = Family::<FieldLabels, Gauge>::default();
        registry.register(
            "netpol_invalid_fields",
            "Fields of objects that cannot be read (what cannot be read allows nothing), \
             1 each, named in the logs and Events",
            invalid_fields.clone(),
        );
        let applies = Counter::default();
        registry.register(
            "netpol_applies",
            "Changed states applied to the kernel",
            applies.clone(),
        );
        let unchanged_updates = Counter::default();
        registry.register(
            "netpol_unchanged_updates",
            "Batches of object updates that changed nothing the agent keeps of them (a \
             pod's conditions, a node's heartbeat): reported applied without a compile",
            unchanged_updates.clone(),
        );
        let errors = Family::<ErrorLabels, Counter>::default();
        registry.register("netpol_errors", "Errors by kind", errors.clone());
        let refused = Family::<MapLabels, Gauge>::default();
        registry.register(
            "netpol_refused",
            "Endpoints or peer addresses not fully programmed because the map was full \
             (the change is refused in the closing direction)",
            refused.clone(),
        );
        let staged = Family::<StagedLabels, Counter>::default();
        registry.register(
            "netpol_staged_connections",
            "New connections a staged NetworkPolicy (netpol.dev/staged) would drop or \
             allow unlike the policies in force, from the verdict events (rate-limited \
             like them)",
            staged.clone(),
        );
        let kernel = Arc::new(Mutex::new(KernelSnapshot::default()));
        registry.register_collector(Box::new(KernelCollector {
            snapshot: kernel.clone(),
        }));
        Metrics {
            registry,
            refused,
            kernel,
            propagation,
            invalid_objects,
            invalid_fields,
            applies,
            unchanged_updates,
            errors,
            staged,
        }
    }

    /// Counts one error of `kind`.
    pub fn error(&self, kind: &str) {
        self.errors
            .get_or_create(&ErrorLabels {
                kind: kind.to_owned(),
            })
            .inc();
    }

    /// Replaces the kernel figures.
    pub fn set_kernel(&self, snapshot: KernelSnapshot) {
        if let Ok(mut current) = self.kernel.lock() {
            *current = snapshot;
        }
    }

    /// The kernel figures of the last refresh.
    pub fn kernel_snapshot(&self) -> KernelSnapshot {
        self.kernel.lock().map(|s| s.clone()).unwrap_or_default()
    }

    /// The OpenMetrics text exposition.
    pub fn render(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

/// Sums rule counters per (tier, policy, rule) for the snapshot, dropping idle rules.
pub fn rule_series<'a>(
    counters: impl IntoIterator<Item = (&'a netpol_compile::RuleRef, KernelCounter)>,
) -> Vec<RuleSeries> {
    let mut out: BTreeMap<(&'static str, String, String), KernelCounter> = BTreeMap::new();
    for (rule, counter) in counters {
        if counter.packets == 0 {
            continue;
        }
        let (tier, policy) = match &rule.cluster {
            None => ("NetworkPolicy", rule.policy.to_string()),
            Some(cluster) => (
                match cluster.tier {
                    netpol_compile::cnp::Tier::Admin => "Admin",
                    netpol_compile::cnp::Tier::Baseline => "Baseline",
                },
                rule.policy.name.to_string(),
            ),
        };
        let key = (
            tier,
            policy,
            format!("spec.{}[{}]", rule.direction.field(), rule.index),
        );
        let entry = out.entry(key).or_default();
        entry.packets += counter.packets;
        entry.bytes += counter.bytes;
    }
    out.into_iter()
        .map(|((tier, policy, rule), counter)| RuleSeries {
            tier,
            policy,
            rule,
            counter,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use netpol_common::DIR_EGRESS;

    #[test]
    fn exposition_parses_and_carries_the_kernel_figures() {
        let metrics = Metrics::new();
        metrics.propagation.observe(0.012);
        metrics.invalid_objects.set(2);
        metrics
            .invalid_fields
            .get_or_create(&FieldLabels {
                kind: "NetworkPolicy".into(),
                object: "x/p".into(),
                field: "spec.ingress[0].from[1]".into(),
            })
            .set(1);
        metrics.error("map");
        metrics.set_kernel(KernelSnapshot {
            verdicts: vec![
                (
                    Reason::PolicyDenied,
                    DIR_INGRESS,
                    KernelCounter {
                        packets: 7,
                        bytes: 420,
                    },
                ),
                (
                    Reason::Established,
                    DIR_EGRESS,
                    KernelCounter {
                        packets: 3,
                        bytes: 180,
                    },
                ),
            ],
            rules: vec![RuleSeries {
                tier: "NetworkPolicy",
                policy: "x/web".into(),
                rule: "spec.ingress[0]".into(),
                counter: KernelCounter {
                    packets: 5,
                    bytes: 300,
                },
            }],
            maps: vec![("POLICY".into(), 12, 262_144)],
            conntrack_entries: Some(4),
            conntrack_created: 10,
            events_suppressed: 1,
            events_lost: 0,
        });
        let text = metrics.render();
        let lines: Vec<&str> = text.lines().collect();
        let value = |series: &str| {
            lines
                .iter()
                .find(|l| l.starts_with(series))
                .unwrap_or_else(|| panic!("no {series} in\n{text}"))
                .rsplit(' ')
                .next()
                .unwrap()
                .to_owned()
        };
        assert_eq!(
            value(
                r#"netpol_packets_total{direction="ingress",reason="policy-denied",verdict="dropped"}"#
            ),
            "7"
        );
        assert_eq!(
            value(
                r#"netpol_bytes_total{direction="egress",reason="established",verdict="allowed"}"#
            ),
            "180"
        );
        assert_eq!(
            value(
                r#"netpol_rule_packets_total{tier="NetworkPolicy",policy="x/web",rule="spec.ingress[0]"}"#
            ),
            "5"
        );
        assert_eq!(value(r#"netpol_map_capacity{map="POLICY"}"#), "262144");
        assert_eq!(value("netpol_conntrack_entries"), "4");
        assert_eq!(value("netpol_conntrack_created_total"), "10");
        assert_eq!(value("netpol_conntrack_evictions_total"), "6");
        assert_eq!(value(r#"netpol_errors_total{kind="map"}"#), "1");
        assert_eq!(value("netpol_change_propagation_seconds_count"), "1");
        assert_eq!(value("netpol_invalid_objects"), "2");
        assert_eq!(
            value(
                r#"netpol_invalid_fields{kind="NetworkPolicy",object="x/p",field="spec.ingress[0].from[1]"}"#
            ),
            "1"
        );
        assert!(text.ends_with("# EOF\n"));
        // A Prometheus text-format parser reads it back.
        let scrape = prometheus_parse::Scrape::parse(lines.iter().map(|l| Ok(l.to_string())))
            .expect("parses");
        let denied = scrape
            .samples
            .iter()
            .find(|s| {
                s.metric == "netpol_packets_total"
                    && s.labels.get("reason") == Some("policy-denied")
            })
            .expect("the drop counter is there");
        // (OpenMetrics names the family without `_total`; this classic-format parser then
        // reads the sample as untyped, which is fine: the value is what matters.)
        assert!(
            matches!(denied.value, prometheus_parse::Value::Counter(v) | prometheus_parse::Value::Untyped(v) if v == 7.0),
            "{denied:?}"
        );
        // Every sample line is `name{labels} value` with a numeric value, and every
        // family is announced by # TYPE before its samples.
        let mut typed = std::collections::BTreeSet::new();
        for line in &lines {
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                typed.insert(rest.split(' ').next().unwrap().to_owned());
            } else if !line.starts_with('#') {
                let (series, number) = line.rsplit_once(' ').unwrap();
                assert!(number.parse::<f64>().is_ok(), "bad value in {line}");
                let name = series.split('{').next().unwrap();
                assert!(
                    typed.iter().any(|family| name.starts_with(family.as_str())),
                    "{name} has no # TYPE"
                );
            }
        }
    }
}
