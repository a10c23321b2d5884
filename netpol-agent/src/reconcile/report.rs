//! The one place diagnostics of the source and the compiler leave the agent.

use std::collections::BTreeSet;

use netpol_compile::{Diagnostic, ObjectName, Subject};
use tracing::warn;

use crate::source::Source;
use crate::telemetry::health::Health;
use crate::telemetry::metrics::FieldLabels;

/// Each distinct diagnostic is logged once while it lasts and handed to
/// [`Source::report`] (Events in Kubernetes mode); their number is the `invalid_objects`
/// metric and the status file's `invalid`, and the fields they name are the
/// `invalid_fields` metric's series.
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
        let mut current = Vec::new();
        for diagnostic in diagnostics {
            current.push(diagnostic);
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
        health.metrics.invalid_fields.clear();
        for diagnostic in &current {
            if let Some(labels) = field_labels(diagnostic) {
                health.metrics.invalid_fields.get_or_create(&labels).set(1);
            }
        }
    }

    /// How many distinct diagnostics are current.
    pub fn len(&self) -> usize {
        self.current.len()
    }
}

/// The labels of `netpol_invalid_fields` for a diagnostic that names an object's field.
fn field_labels(diagnostic: &Diagnostic) -> Option<FieldLabels> {
    let Subject::Object { kind, name } = &diagnostic.subject else {
        return None;
    };
    if diagnostic.field.is_empty() {
        return None;
    }
    let object = match name {
        ObjectName::Namespaced(obj) => obj.to_string(),
        ObjectName::Cluster(name) => name.clone(),
        ObjectName::In(origin) => format!("in {origin}"),
        ObjectName::Endpoint(id) => format!("endpoint {id}"),
    };
    Some(FieldLabels {
        kind: kind.to_string(),
        object,
        field: diagnostic.field.clone(),
    })
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use netpol_compile::state::{ClusterState, ObjectRef};

    use super::*;
    use crate::source::{Error, Update};

    /// A source that keeps what it is asked to report.
    #[derive(Default)]
    struct Collect(Vec<Diagnostic>);

    impl Source for Collect {
        async fn changed(&mut self) -> Result<bool, Error> {
            Ok(false)
        }

        fn snapshot(&mut self, _state: &mut ClusterState) -> Result<Update, Error> {
            Ok(Update::default())
        }

        fn report(&mut self, new: &[Diagnostic]) {
            self.0.extend_from_slice(new);
        }
    }

    #[test]
    fn the_fields_that_cannot_be_read_are_series_of_the_metric_while_they_last() {
        let health = Health::new(Duration::from_secs(60));
        let mut source = Collect::default();
        let mut reporter = Reporter::default();
        let policy = Subject::policy(&ObjectRef::new("x", "p"));
        let field = Diagnostic::new(
            policy.clone(),
            "spec.ingress[0].from[1].ipBlock.except[0]",
            "invalid CIDR \"x\"",
        );
        let note = Diagnostic::new(policy, "", "the last valid version stays in force");
        reporter.publish([&field, &note], &mut source, &health);
        assert_eq!(source.0, [field.clone(), note.clone()]);
        let text = health.metrics.render();
        let series: Vec<&str> = text
            .lines()
            .filter(|l| l.starts_with("netpol_invalid_fields{"))
            .collect();
        assert_eq!(
            series,
            [
                r#"netpol_invalid_fields{kind="NetworkPolicy",object="x/p",field="spec.ingress[0].from[1].ipBlock.except[0]"} 1"#
            ]
        );
        assert!(text.contains("netpol_invalid_objects 2"), "{text}");
        // Fixed: the series goes.
        reporter.publish([], &mut source, &health);
        let text = health.metrics.render();
        assert!(!text.contains("netpol_invalid_fields{"), "{text}");
    }
}
