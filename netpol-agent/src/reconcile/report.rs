//! The one place diagnostics of the source and the compiler leave the agent.

use std::collections::BTreeSet;

use netpol_compile::Diagnostic;
use tracing::warn;

use crate::source::Source;
use crate::telemetry::health::Health;

/// Each distinct diagnostic is logged once while it lasts and handed to
/// [`Source::report`] (Events in Kubernetes mode); their number is the `invalid_objects`
/// metric and the status file's `invalid`.
#[derive(Default)]
pub struct Reporter {
    /// The messages of the current diagnostics.
    current: BTreeSet<String>,
}

impl Reporter {
    /// Publishes `diagnostics` (those of one snapshot and its compile): the ones not seen
    /// before are logged and reported; those now gone are forgotten.
    pub fn publish<'a, S: Source>(
        &mut self,
        diagnostics: impl IntoIterator<Item = &'a Diagnostic>,
        source: &mut S,
        health: &Health,
    ) {
        let mut messages = BTreeSet::new();
        let mut new = Vec::new();
        for diagnostic in diagnostics {
            let message = diagnostic.to_string();
            if !self.current.contains(&message) && !messages.contains(&message) {
                warn!("invalid object: {message}");
                new.push(diagnostic.clone());
            }
            messages.insert(message);
        }
        source.report(&new);
        self.current = messages;
        health.metrics.invalid_objects.set(self.len() as i64);
    }

    /// How many distinct diagnostics are current.
    pub fn len(&self) -> usize {
        self.current.len()
    }
}
