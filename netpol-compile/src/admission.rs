//! Admission of NetworkPolicies, in one place: which version of each policy is in force.
//!
//! A valid policy is admitted as it is. An invalid one is reported field by field and
//! left out, unless a valid version of it was admitted before: that version stays in
//! force (as the API server keeps the stored object when an update is rejected), with a
//! note saying so. The same holds for a policy the source saw but could not read
//! ([`ClusterState::unreadable_policies`](crate::state::ClusterState)). A deleted policy
//! is forgotten. Validation itself happens once per version of a policy, in the
//! compiler's memo (`cache.rs`); admission only picks between versions.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use k8s_openapi::api::networking::v1::NetworkPolicy;

use crate::cache::PolicyEntry;
use crate::policy::ParsedPolicy;
use crate::state::ObjectRef;
use crate::{Diagnostic, Subject};

/// The policies in force after the last compile.
#[derive(Clone, Debug, Default)]
pub(crate) struct Admission {
    admitted: BTreeMap<ObjectRef, Admitted>,
}

/// A version of a policy that was valid, with its normalised form.
#[derive(Clone, Debug)]
pub(crate) struct Admitted {
    pub policy: Arc<NetworkPolicy>,
    pub parsed: Arc<ParsedPolicy>,
}

impl Admission {
    /// Admits this compile's policies: `entries` (one per policy of the state, parsed)
    /// and `unreadable` (present, but unreadable). Reports every invalid one in
    /// `diagnostics`.
    pub fn update(
        &mut self,
        entries: &[PolicyEntry],
        unreadable: &BTreeSet<ObjectRef>,
        diagnostics: &mut Vec<Diagnostic>,
    ) {
        let mut previous = std::mem::take(&mut self.admitted);
        let mut rejected = Vec::new();
        for entry in entries {
            match &entry.parsed {
                Ok(parsed) => {
                    let admitted = Admitted {
                        policy: entry.policy.clone(),
                        parsed: parsed.clone(),
                    };
                    self.admitted.insert(entry.obj.clone(), admitted);
                }
                Err(errors) => {
                    let subject = Subject::policy(&entry.obj);
                    diagnostics.extend(errors.iter().map(|error| {
                        Diagnostic::new(subject.clone(), &error.field, &error.message)
                    }));
                    rejected.push(&entry.obj);
                }
            }
        }
        for obj in rejected.into_iter().chain(unreadable) {
            if !self.admitted.contains_key(obj)
                && let Some(last) = previous.remove(obj)
            {
                diagnostics.push(Diagnostic::new(
                    Subject::policy(obj),
                    "",
                    "the last valid version stays in force",
                ));
                self.admitted.insert(obj.clone(), last);
            }
        }
    }

    /// The policies in force, by name.
    pub fn admitted(&self) -> &BTreeMap<ObjectRef, Admitted> {
        &self.admitted
    }
}
