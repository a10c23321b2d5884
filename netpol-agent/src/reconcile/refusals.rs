//! What did not fit in the kernel's maps, as diagnostics: logged once, reported through
//! the source (Kubernetes Events on pods) and exported as `netpol_refused{map}`.

use std::collections::BTreeSet;

use tracing::{info, warn};

use crate::datapath;
use crate::source::Source;
use crate::telemetry::flowlog;
use crate::telemetry::health::Health;
use netpol_compile::{Compiled, Diagnostic, Kind, ObjectName, Subject};

/// What did not fit in the maps: logged once, reported (Kubernetes Events on pods),
/// and exported as `netpol_refused{map}`.
#[derive(Default)]
pub(super) struct Refusals {
    reported: BTreeSet<String>,
}

impl Refusals {
    /// The refusals in force, one line each, in order (for the status file).
    pub(super) fn listed(&self, at_most: usize) -> Vec<String> {
        self.reported.iter().take(at_most).cloned().collect()
    }
}

impl Refusals {
    pub(super) fn update<S: Source>(
        &mut self,
        refused: &[datapath::Refusal],
        compiled: &Compiled,
        source: &mut S,
        health: &Health,
    ) {
        for map in [
            netpol_common::names::ENDPOINTS,
            netpol_common::names::POLICY,
            netpol_common::names::POLICY_RANGES,
            netpol_common::names::IPCACHE,
        ] {
            let count = refused.iter().filter(|r| r.map() == map).count();
            health
                .metrics
                .refused
                .get_or_create(&crate::telemetry::metrics::MapLabels { map: map.into() })
                .set(count as i64);
        }
        let diagnostics = refusal_diagnostics(refused, compiled);
        let mut current = BTreeSet::new();
        let mut new = Vec::new();
        for diagnostic in diagnostics {
            let message = diagnostic.to_string();
            if !self.reported.contains(&message) {
                warn!("refused: {message}");
                new.push(diagnostic);
            }
            current.insert(message);
        }
        for gone in self.reported.difference(&current) {
            info!("no longer refused: {gone}");
        }
        if !new.is_empty() {
            source.report(&new);
        }
        self.reported = current;
    }
}

/// One diagnostic per refusal, naming the pod (or the peer address) and the full map.
pub fn refusal_diagnostics(refused: &[datapath::Refusal], compiled: &Compiled) -> Vec<Diagnostic> {
    use datapath::Refusal;
    let pod = |id: u32| {
        let name = compiled
            .local_pods
            .iter()
            .find(|pod| pod.endpoint_id == id)
            .map_or(ObjectName::Endpoint(id), |pod| {
                ObjectName::Namespaced(pod.pod.clone())
            });
        Subject::Object {
            kind: Kind::Pod,
            name,
        }
    };
    refused
        .iter()
        .map(|refusal| match refusal {
            Refusal::Endpoint { id, capacity } => Diagnostic::new(
                pod(*id),
                "",
                format!(
                    "not programmed: ENDPOINTS is full (capacity {capacity}); its traffic is \
                     dropped until there is room"
                ),
            ),
            Refusal::Policy { id, map, capacity } => Diagnostic::new(
                pod(*id),
                "",
                format!(
                    "policy change not applied: {map} is full (capacity {capacity}); only \
                     what both the old and the new policy allow is allowed"
                ),
            ),
            Refusal::Peer { addr, capacity } => Diagnostic::new(
                Subject::Address(
                    flowlog::ip_of(addr).map_or_else(|| "?".into(), |ip| ip.to_string()),
                ),
                "",
                format!(
                    "not in IPCACHE (full, capacity {capacity}): treated as its enclosing \
                     ipBlock, so fewer rules match it"
                ),
            ),
        })
        .collect()
}
