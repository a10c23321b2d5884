//! The kernel's figures in the metrics: verdict and rule counters, map fill, conntrack
//! entries and event losses, copied from the datapath at most once a second (the
//! conntrack walk every ten seconds). The control loop calls
//! [`KernelRefresh::refresh_if_due`] at one place, after each pass that reached the
//! kernel.

use std::time::{Duration, Instant};

use super::health::Health;
use crate::datapath::Datapath;
use netpol_compile::Compiled;

/// How often the kernel's counters are copied into the metrics.
const METRICS_REFRESH: Duration = Duration::from_secs(1);
/// Counting conntrack entries walks the map: less often, and at most this many.
const CONNTRACK_COUNT_REFRESH: Duration = Duration::from_secs(10);
const CONNTRACK_COUNT_LIMIT: usize = 1 << 20;

/// When the kernel's figures were last copied into the metrics.
#[derive(Debug)]
pub struct KernelRefresh {
    last_metrics: Instant,
    last_conntrack_count: Instant,
}

impl Default for KernelRefresh {
    fn default() -> Self {
        // The first refresh walks conntrack at once; the first copy waits a period.
        KernelRefresh {
            last_metrics: Instant::now(),
            last_conntrack_count: Instant::now() - CONNTRACK_COUNT_REFRESH,
        }
    }
}

impl KernelRefresh {
    /// Copies the kernel's figures into `health`'s metrics when [`METRICS_REFRESH`] has
    /// passed since the last copy.
    pub fn refresh_if_due(&mut self, datapath: &Datapath, compiled: &Compiled, health: &Health) {
        if self.last_metrics.elapsed() < METRICS_REFRESH {
            return;
        }
        let walk_conntrack = self.last_conntrack_count.elapsed() >= CONNTRACK_COUNT_REFRESH;
        if walk_conntrack {
            self.last_conntrack_count = Instant::now();
        }
        refresh_kernel_metrics(datapath, compiled, health, walk_conntrack);
        self.last_metrics = Instant::now();
    }
}

/// Copies the kernel's figures into the metrics (errors are counted, never fatal).
fn refresh_kernel_metrics(
    datapath: &Datapath,
    compiled: &Compiled,
    health: &Health,
    walk_conntrack: bool,
) {
    let mut snapshot = crate::telemetry::metrics::KernelSnapshot::default();
    match datapath.counters_by_direction() {
        Ok(verdicts) => snapshot.verdicts = verdicts,
        Err(error) => health.metrics.error(error.kind()),
    }
    let rules = compiled
        .rules
        .iter()
        .filter_map(|(id, rule)| match datapath.rule_counter(*id) {
            Ok(counter) => Some((rule, counter)),
            Err(_) => None,
        });
    snapshot.rules = crate::telemetry::metrics::rule_series(rules);
    snapshot.maps = datapath
        .map_fill(walk_conntrack.then_some(CONNTRACK_COUNT_LIMIT))
        .into_iter()
        .map(|(name, entries, capacity)| (name.to_owned(), entries, capacity))
        .collect();
    let is_conntrack =
        |name: &str| [netpol_common::names::CT4, netpol_common::names::CT6].contains(&name);
    if walk_conntrack {
        let tables = snapshot
            .maps
            .iter()
            .filter(|(name, _, _)| is_conntrack(name));
        snapshot.conntrack_entries = Some(tables.map(|(_, n, _)| *n).sum());
    } else {
        // Keep the last count rather than dropping the series between walks.
        let previous = health.metrics.kernel_snapshot();
        snapshot.conntrack_entries = previous.conntrack_entries;
        let tables = previous
            .maps
            .into_iter()
            .filter(|(name, _, _)| is_conntrack(name));
        snapshot.maps.extend(tables);
    }
    match datapath.conntrack_created() {
        Ok(created) => snapshot.conntrack_created = created,
        Err(error) => health.metrics.error(error.kind()),
    }
    if let Ok((suppressed, lost)) = datapath.event_losses() {
        snapshot.events_suppressed = suppressed;
        snapshot.events_lost = lost;
    }
    health.metrics.set_kernel(snapshot);
}
