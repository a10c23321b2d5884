//! Admission of NetworkPolicies, in one place: which version of each policy is in force.
//!
//! A policy is admitted as far as it can be read ([`Reading`](crate::policy::Reading)):
//! what cannot be read is reported field by field and never allows anything nor
//! isolates less (docs/SECURITY.md, "what the API server accepted never fails open").
//! The current object always wins over an earlier version, even a valid one: the API
//! server stored it, so an earlier version may allow what the policy no longer does.
//! Only when nothing of the current object can be read (no name or namespace, or a
//! source that could not read its metadata or podSelector,
//! [`ClusterState::unreadable_policies`](crate::state::ClusterState)) does the version
//! in force before stay, with a note saying so; there is then no other reading of whom
//! the policy selects. A deleted policy is forgotten. Reading itself happens once per
//! version of a policy, in the compiler's memo (`cache.rs`); admission only picks
//! between versions and reports.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use k8s_openapi::api::networking::v1::NetworkPolicy;

use crate::cache::PolicyEntry;
use crate::policy::ParsedPolicy;
use crate::state::{ObjectRef, UnreadablePart, is_staged};
use crate::{Diagnostic, Subject};

/// The policies in force after the last compile.
#[derive(Clone, Debug, Default)]
pub(crate) struct Admission {
    admitted: BTreeMap<ObjectRef, Admitted>,
    /// What the last [`Admission::update`] read besides the entries, and what it
    /// reported: the next one with the same input reports the same and admits nothing
    /// new ([`Admission::update_if_changed`]).
    last: Option<LastUpdate>,
}

#[derive(Clone, Debug)]
struct LastUpdate {
    /// [`CompileCache::sync_policies`](crate::cache::CompileCache::sync_policies)'s
    /// generation of the entries.
    entries: u64,
    unreadable: BTreeSet<ObjectRef>,
    parts: BTreeMap<ObjectRef, Vec<UnreadablePart>>,
    diagnostics: Vec<Diagnostic>,
}

/// A version of a policy in force, with what could be read of it.
#[derive(Clone, Debug)]
pub(crate) struct Admitted {
    pub policy: Arc<NetworkPolicy>,
    pub parsed: Arc<ParsedPolicy>,
    /// Whether all of it could be read.
    pub complete: bool,
    /// Whether the state's current object is staged ([`is_staged`]). Never for a policy
    /// the source could not read at all: it may no longer be staged, so the version kept
    /// in force is enforced (fails closed; SECURITY.md, "Staged policies").
    pub staged: bool,
}

impl Admitted {
    /// The version in force as a state would hold it: staged only if the state's object
    /// is (a version kept for an unreadable object loses its staged annotation).
    pub fn as_in_force(&self) -> Arc<NetworkPolicy> {
        if self.staged || !is_staged(&self.policy) {
            return Arc::clone(&self.policy);
        }
        let mut policy = NetworkPolicy::clone(&self.policy);
        if let Some(annotations) = policy.metadata.annotations.as_mut() {
            annotations.remove(crate::state::STAGED_ANNOTATION);
        }
        Arc::new(policy)
    }
}

impl Admission {
    /// [`Admission::update`], unless its input is the last update's: the entries of the
    /// same generation (`generation`, see
    /// [`CompileCache::sync_policies`](crate::cache::CompileCache::sync_policies)) and the
    /// same unreadable policies and parts. Then what it admitted stays, and its
    /// diagnostics are reported again. Returns whether it admitted anew.
    pub fn update_if_changed(
        &mut self,
        entries: &[PolicyEntry],
        generation: u64,
        unreadable: &BTreeSet<ObjectRef>,
        parts: &BTreeMap<ObjectRef, Vec<UnreadablePart>>,
        diagnostics: &mut Vec<Diagnostic>,
    ) -> bool {
        if let Some(last) = &self.last
            && last.entries == generation
            && last.unreadable == *unreadable
            && last.parts == *parts
        {
            diagnostics.extend(last.diagnostics.iter().cloned());
            return false;
        }
        let mut reported = Vec::new();
        self.update(entries, unreadable, parts, &mut reported);
        diagnostics.extend(reported.iter().cloned());
        self.last = Some(LastUpdate {
            entries: generation,
            unreadable: unreadable.clone(),
            parts: parts.clone(),
            diagnostics: reported,
        });
        true
    }

    /// The same versions in force, without the last update's input: the next update
    /// admits anew.
    #[cfg(test)]
    pub fn without_memo(&self) -> Admission {
        Admission {
            admitted: self.admitted.clone(),
            last: None,
        }
    }

    /// Admits this compile's policies: `entries` (one per policy of the state, read),
    /// `unreadable` (present, but nothing of them could be read) and `parts` (parts of
    /// policies of `entries` that their source could not read). Reports every field that
    /// cannot be read, and what it costs, in `diagnostics`.
    fn update(
        &mut self,
        entries: &[PolicyEntry],
        unreadable: &BTreeSet<ObjectRef>,
        parts: &BTreeMap<ObjectRef, Vec<UnreadablePart>>,
        diagnostics: &mut Vec<Diagnostic>,
    ) {
        let mut previous = std::mem::take(&mut self.admitted);
        let mut unnamed = Vec::new();
        for entry in entries {
            let subject = Subject::policy(&entry.obj);
            let holes = parts.get(&entry.obj).map(Vec::as_slice).unwrap_or_default();
            // What the source replaced is reported as the source saw it; what reading
            // says about the replacement would only mislead.
            diagnostics.extend(
                holes
                    .iter()
                    .map(|h| Diagnostic::new(subject.clone(), &h.field, &h.message)),
            );
            let replaced = |field: &str| holes.iter().any(|h| within(field, &h.replaced));
            diagnostics.extend(
                entry
                    .errors
                    .iter()
                    .chain(&entry.consequences)
                    .filter(|e| !replaced(&e.field))
                    .map(|e| Diagnostic::new(subject.clone(), &e.field, &e.message)),
            );
            match &entry.parsed {
                Some(parsed) => {
                    let admitted = Admitted {
                        policy: entry.policy.clone(),
                        parsed: parsed.clone(),
                        complete: entry.errors.is_empty() && holes.is_empty(),
                        staged: is_staged(&entry.policy),
                    };
                    self.admitted.insert(entry.obj.clone(), admitted);
                }
                None => unnamed.push((&entry.obj, is_staged(&entry.policy))),
            }
        }
        let unreadable = unreadable.iter().map(|obj| (obj, false));
        for (obj, staged) in unnamed.into_iter().chain(unreadable) {
            if !self.admitted.contains_key(obj)
                && let Some(mut last) = previous.remove(obj)
            {
                last.staged = staged;
                let note = if last.complete {
                    "the last valid version stays in force"
                } else {
                    "the last version read (in part) stays in force"
                };
                diagnostics.push(Diagnostic::new(Subject::policy(obj), "", note));
                self.admitted.insert(obj.clone(), last);
            }
        }
    }

    /// The policies in force, by name.
    pub fn admitted(&self) -> &BTreeMap<ObjectRef, Admitted> {
        &self.admitted
    }
}

/// Whether the field path `field` is `part` or lies inside it (`spec.ingress[1]` holds
/// `spec.ingress[1].from[0]`, not `spec.ingress[10]`).
fn within(field: &str, part: &str) -> bool {
    field
        .strip_prefix(part)
        .is_some_and(|rest| rest.is_empty() || rest.starts_with(['.', '[']))
}

#[cfg(test)]
mod tests {
    use super::within;

    #[test]
    fn a_field_lies_within_a_part_only_at_a_path_boundary() {
        assert!(within("spec.ingress[1]", "spec.ingress[1]"));
        assert!(within("spec.ingress[1].from[0]", "spec.ingress[1]"));
        assert!(within("spec.ingress[1].ports", "spec.ingress"));
        assert!(!within("spec.ingress[10]", "spec.ingress[1]"));
        assert!(!within("spec.ingressX", "spec.ingress"));
        assert!(!within("spec", "spec.ingress"));
    }
}
