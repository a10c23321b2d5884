//! Failures of the watchers: one log line per incident, and the backoff between retries.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use ::kube::runtime::utils::ResetTimerBackoff;
use ::kube::runtime::watcher::{self, ExponentialBackoff};
use tokio::time::Instant;
use tracing::{debug, warn};

use super::settings::Watched;

/// A repeated failure of one resource within this window belongs to the same incident
/// (logged once); the backoff never waits longer, so a lasting outage is one line.
pub(super) const INCIDENT_QUIET: Duration = Duration::from_secs(30);

/// What the watcher tasks tell the source.
#[derive(Debug)]
pub(super) enum Signal {
    /// An object was added, modified or deleted.
    Changed(Watched),
    /// An object was modified in nothing the agent keeps of it (its trimmed form is
    /// the same, resourceVersion aside: a pod's conditions, a node's heartbeat): the
    /// version moved, the state did not.
    Unchanged(Watched),
    /// A (re-)list completed and replaced the store.
    Synced(Watched),
    Failed(Watched, Failure),
}

/// Why a request failed, for one log line per incident.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(super) enum Failure {
    /// The resource version expired: the watcher re-lists.
    Gone(String),
    /// An established watch stream broke: the watcher resumes from its version.
    Stream(String),
    /// No answer (connection refused, timeout, TLS...).
    Unreachable(String),
    /// The API server answered with an error status.
    Api(u16, String),
    Other(String),
}

impl Failure {
    pub(super) fn of(error: &watcher::Error) -> Self {
        use ::kube::Error as K;
        match error {
            watcher::Error::WatchError(status) if status.code == 410 => {
                Failure::Gone(status.message.clone())
            }
            watcher::Error::WatchError(status) => Failure::Api(status.code, status.message.clone()),
            watcher::Error::WatchStartFailed(K::Api(status))
            | watcher::Error::InitialListFailed(K::Api(status))
                if status.code == 410 =>
            {
                Failure::Gone(status.message.clone())
            }
            watcher::Error::WatchStartFailed(K::Api(status))
            | watcher::Error::InitialListFailed(K::Api(status))
            | watcher::Error::WatchFailed(K::Api(status)) => {
                Failure::Api(status.code, status.message.clone())
            }
            watcher::Error::WatchFailed(error) => Failure::Stream(chain(error)),
            watcher::Error::WatchStartFailed(error) | watcher::Error::InitialListFailed(error) => {
                Failure::Unreachable(chain(error))
            }
            watcher::Error::NoResourceVersion => Failure::Other(error.to_string()),
        }
    }

    /// Groups failures of several resources into one line.
    fn class(&self) -> u8 {
        match self {
            Failure::Gone(_) => 0,
            Failure::Stream(_) => 1,
            Failure::Unreachable(_) => 2,
            Failure::Api(..) => 3,
            Failure::Other(_) => 4,
        }
    }

    fn line(&self, resources: &str) -> String {
        match self {
            Failure::Gone(message) => format!(
                "Kubernetes API: watch of {resources} expired (410 Gone: {message}); re-listing, \
                 enforcement stays as it is until the new list is complete"
            ),
            Failure::Stream(message) => format!(
                "Kubernetes API: watch streams broke ({resources}): {message}; resuming from \
                 the last resourceVersion"
            ),
            Failure::Unreachable(message) => format!(
                "Kubernetes API: unreachable for {resources}: {message}; retrying with backoff, \
                 enforcement stays as it is"
            ),
            Failure::Api(403, message) => format!(
                "Kubernetes API: forbidden to read {resources} (check the ClusterRole): {message}"
            ),
            Failure::Api(code, message) => {
                format!("Kubernetes API: error {code} for {resources}: {message}; retrying")
            }
            Failure::Other(message) => {
                format!("Kubernetes API: {resources}: {message}; re-listing")
            }
        }
    }
}

/// Open failure incidents per resource, and the lines not yet logged.
#[derive(Default)]
pub(super) struct Incidents {
    /// Resource → time of its last failure.
    open: BTreeMap<Watched, Instant>,
    /// Class → (first failure, resources) to log at the end of the batch.
    pending: BTreeMap<u8, (Failure, BTreeSet<Watched>)>,
    /// Failures in total (all logged or not).
    pub(super) failures: u64,
}

impl Incidents {
    pub(super) fn failed(&mut self, watched: Watched, failure: Failure) {
        self.failures += 1;
        let now = Instant::now();
        let new = self
            .open
            .insert(watched, now)
            .is_none_or(|last| now.duration_since(last) > INCIDENT_QUIET);
        if new {
            self.pending
                .entry(failure.class())
                .or_insert_with(|| (failure, BTreeSet::new()))
                .1
                .insert(watched);
        } else {
            debug!(resource = %watched, ?failure, "Kubernetes API: still failing");
        }
    }

    pub(super) fn succeeded(&mut self, watched: Watched) {
        if self.open.remove(&watched).is_some() {
            debug!(resource = %watched, "Kubernetes API: watch recovered");
        }
    }

    pub(super) fn flush(&mut self) {
        for (_, (failure, resources)) in std::mem::take(&mut self.pending) {
            let names: Vec<&str> = resources.iter().map(|r| r.resource()).collect();
            warn!("{}", failure.line(&names.join(", ")));
        }
    }
}

/// Exponential backoff: doubles from the first delay up to the maximum; reset by a
/// success (`reset`) or by a quiet time longer than [`INCIDENT_QUIET`].
pub(super) type Backoff = ResetTimerBackoff<ExponentialBackoff>;

/// The backoff of one watcher: `initial`, doubling up to `max`, without end.
pub(super) fn backoff(initial: Duration, max: Duration) -> Backoff {
    let exponential = backon::ExponentialBuilder::new()
        .with_min_delay(initial)
        .with_max_delay(max)
        .with_factor(2.0)
        .without_max_times();
    ResetTimerBackoff::new(ExponentialBackoff::from(exponential), INCIDENT_QUIET)
}

/// An error with its sources, `outer: inner: innermost` (repeats dropped).
pub(super) fn chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(inner) = source {
        let inner_text = inner.to_string();
        if !text.contains(&inner_text) {
            text.push_str(": ");
            text.push_str(&inner_text);
        }
        source = inner.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use ::kube::runtime::utils::Backoff as _;

    use super::*;

    #[test]
    fn incidents_log_once_per_class_and_reopen_after_quiet() {
        let mut incidents = Incidents::default();
        incidents.failed(Watched::Pods, Failure::Stream("eof".into()));
        incidents.failed(Watched::Namespaces, Failure::Stream("eof".into()));
        incidents.failed(Watched::Pods, Failure::Unreachable("refused".into()));
        assert_eq!(incidents.pending.len(), 1);
        let (_, resources) = &incidents.pending[&1];
        assert_eq!(
            resources.iter().copied().collect::<Vec<_>>(),
            [Watched::Namespaces, Watched::Pods]
        );
        incidents.flush();
        assert!(incidents.pending.is_empty());
        incidents.succeeded(Watched::Pods);
        incidents.failed(Watched::Pods, Failure::Gone("too old".into()));
        assert_eq!(
            incidents.pending.len(),
            1,
            "a recovered resource opens a new incident"
        );
        assert_eq!(incidents.failures, 4);
    }

    #[test]
    fn backoff_doubles_up_to_the_maximum_and_resets() {
        let mut backoff = backoff(Duration::from_millis(100), Duration::from_millis(350));
        let delays: Vec<_> = (0..4)
            .map(|_| backoff.next().unwrap().as_millis())
            .collect();
        assert_eq!(delays, [100, 200, 350, 350]);
        backoff.reset();
        assert_eq!(backoff.next(), Some(Duration::from_millis(100)));
    }

    #[test]
    fn failure_lines_name_the_resources() {
        let line = Failure::Gone("too old resource version: 3 (9)".into()).line("pods, nodes");
        assert!(line.starts_with("Kubernetes API: watch of pods, nodes expired (410 Gone"));
    }
}
