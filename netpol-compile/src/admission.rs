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

use crate::cache::PolicyEntry;
use crate::policy::ParsedPolicy;
use crate::state::{ObjectRef, Policy, UnreadablePart};
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
    /// What was reported of each entry (entries with nothing to report left out), in
    /// the entries' order.
    reported: BTreeMap<ObjectRef, Vec<Diagnostic>>,
    /// The policies whose earlier version stays in force, each with its note, after the
    /// entries' reports.
    kept: Vec<(ObjectRef, Diagnostic)>,
}

impl LastUpdate {
    /// Everything the update reported, in order.
    fn diagnostics(&self) -> impl Iterator<Item = &Diagnostic> {
        let kept = self.kept.iter().map(|(_, note)| note);
        self.reported.values().flatten().chain(kept)
    }
}

/// What an update reported: of each entry (by name, entries with nothing to report
/// left out), and the notes of the policies whose earlier version stays in force.
type Reports = (
    BTreeMap<ObjectRef, Vec<Diagnostic>>,
    Vec<(ObjectRef, Diagnostic)>,
);

/// What [`CompileCache::sync_policies`](crate::cache::CompileCache::sync_policies) did to
/// the entries: their generation before and after, and whether only the policies it was
/// told of changed (no walk over every entry).
#[derive(Clone, Copy, Debug)]
pub(crate) struct PolicySync {
    pub before: u64,
    pub generation: u64,
    pub told: bool,
}

/// A version of a policy in force, with what could be read of it.
#[derive(Clone, Debug)]
pub(crate) struct Admitted {
    pub policy: Policy,
    pub parsed: Arc<ParsedPolicy>,
    /// Whether all of it could be read.
    pub complete: bool,
    /// Whether the state's current object is staged ([`Policy::is_staged`]). Never for a
    /// policy the source could not read at all: it may no longer be staged, so the version
    /// kept in force is enforced (fails closed; SECURITY.md, "Staged policies").
    pub staged: bool,
}

impl Admitted {
    /// The version in force as a state would hold it: staged only if the state's object
    /// is (a version kept for an unreadable object loses its staged annotation).
    pub fn as_in_force(&self) -> Policy {
        if self.staged || !self.policy.is_staged() {
            return self.policy.clone();
        }
        self.policy.unstaged()
    }
}

impl Admission {
    /// [`Admission::update`], unless its input is the last update's: the entries of the
    /// same generation (`sync`, see
    /// [`CompileCache::sync_policies`](crate::cache::CompileCache::sync_policies)) and the
    /// same unreadable policies and parts. Then what it admitted stays, and its
    /// diagnostics are reported again. When only the policies of `changed` moved since
    /// the last update (the entries it read, then a sync told of them), only they are
    /// admitted anew ([`Admission::update_changed`]). Returns whether it admitted anew.
    pub fn update_if_changed(
        &mut self,
        entries: &[PolicyEntry],
        (sync, changed): (PolicySync, Option<&BTreeSet<ObjectRef>>),
        unreadable: &BTreeSet<ObjectRef>,
        parts: &BTreeMap<ObjectRef, Vec<UnreadablePart>>,
        diagnostics: &mut Vec<Diagnostic>,
    ) -> bool {
        let same_input = |last: &LastUpdate| last.unreadable == *unreadable && last.parts == *parts;
        if let Some(last) = &self.last
            && last.entries == sync.generation
            && same_input(last)
        {
            diagnostics.extend(last.diagnostics().cloned());
            return false;
        }
        if let (Some(changed), Some(last)) = (changed, &self.last)
            && sync.told
            && last.entries == sync.before
            && same_input(last)
            && self.update_changed(entries, changed, parts)
        {
            let last = self.last.as_mut().expect("checked above");
            last.entries = sync.generation;
            diagnostics.extend(last.diagnostics().cloned());
            return true;
        }
        let (reported, kept) = self.update(entries, unreadable, parts);
        let last = LastUpdate {
            entries: sync.generation,
            unreadable: unreadable.clone(),
            parts: parts.clone(),
            reported,
            kept,
        };
        diagnostics.extend(last.diagnostics().cloned());
        self.last = Some(last);
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
    /// policies of `entries` that their source could not read). Returns what it reports
    /// of each entry (every field that cannot be read, and what it costs), and the notes
    /// of the policies whose earlier version stays in force.
    fn update(
        &mut self,
        entries: &[PolicyEntry],
        unreadable: &BTreeSet<ObjectRef>,
        parts: &BTreeMap<ObjectRef, Vec<UnreadablePart>>,
    ) -> Reports {
        let mut previous = std::mem::take(&mut self.admitted);
        let mut reported = BTreeMap::new();
        let mut unnamed = Vec::new();
        for entry in entries {
            let report = report(entry, parts);
            if !report.is_empty() {
                reported.insert(entry.obj.clone(), report);
            }
            match admit(entry, parts) {
                Some(admitted) => drop(self.admitted.insert(entry.obj.clone(), admitted)),
                None => unnamed.push((&entry.obj, entry.policy.is_staged())),
            }
        }
        let mut kept = Vec::new();
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
                kept.push((obj.clone(), Diagnostic::new(Subject::policy(obj), "", note)));
                self.admitted.insert(obj.clone(), last);
            }
        }
        (reported, kept)
    }

    /// [`Admission::update`] for the policies of `changed` only, the others' admission
    /// and reports kept: what it would admit and report when everything else is the
    /// last update's input. Declines (returns `false`, nothing changed) when a policy of
    /// `changed` has an earlier version kept in force, or has no name to admit it by:
    /// which version then stays is the whole update's question.
    fn update_changed(
        &mut self,
        entries: &[PolicyEntry],
        changed: &BTreeSet<ObjectRef>,
        parts: &BTreeMap<ObjectRef, Vec<UnreadablePart>>,
    ) -> bool {
        let Some(last) = self.last.as_mut() else {
            return false;
        };
        let found: Vec<Option<&PolicyEntry>> = changed
            .iter()
            .map(|obj| {
                let at = entries.binary_search_by(|e| e.obj.cmp(obj));
                at.ok().map(|at| &entries[at])
            })
            .collect();
        let unnamed = found.iter().flatten().any(|entry| entry.parsed.is_none());
        if unnamed || last.kept.iter().any(|(obj, _)| changed.contains(obj)) {
            return false;
        }
        for (obj, entry) in changed.iter().zip(found) {
            self.admitted.remove(obj);
            last.reported.remove(obj);
            let Some(entry) = entry else {
                continue;
            };
            let report = report(entry, parts);
            if !report.is_empty() {
                last.reported.insert(obj.clone(), report);
            }
            let admitted = admit(entry, parts).expect("a named entry is admitted");
            self.admitted.insert(obj.clone(), admitted);
        }
        true
    }

    /// The policies in force, by name.
    pub fn admitted(&self) -> &BTreeMap<ObjectRef, Admitted> {
        &self.admitted
    }
}

/// What is reported of `entry`: the parts its source could not read (as the source saw
/// them), then every field that cannot be read and what it costs, except inside those.
fn report(
    entry: &PolicyEntry,
    parts: &BTreeMap<ObjectRef, Vec<UnreadablePart>>,
) -> Vec<Diagnostic> {
    let holes = parts.get(&entry.obj).map(Vec::as_slice).unwrap_or_default();
    if holes.is_empty() && entry.errors.is_empty() && entry.consequences.is_empty() {
        return Vec::new();
    }
    let subject = Subject::policy(&entry.obj);
    // What the source replaced is reported as the source saw it; what reading says
    // about the replacement would only mislead.
    let replaced = |field: &str| holes.iter().any(|h| within(field, &h.replaced));
    let holes = holes
        .iter()
        .map(|h| Diagnostic::new(subject.clone(), &h.field, &h.message));
    let errors = entry
        .errors
        .iter()
        .chain(&entry.consequences)
        .filter(|e| !replaced(&e.field))
        .map(|e| Diagnostic::new(subject.clone(), &e.field, &e.message));
    holes.chain(errors).collect()
}

/// The version of `entry` in force, `None` when nothing of it can be enforced (no name
/// or namespace).
fn admit(
    entry: &PolicyEntry,
    parts: &BTreeMap<ObjectRef, Vec<UnreadablePart>>,
) -> Option<Admitted> {
    let parsed = entry.parsed.as_ref()?;
    let holes = parts.get(&entry.obj).is_some_and(|holes| !holes.is_empty());
    Some(Admitted {
        policy: entry.policy.clone(),
        parsed: parsed.clone(),
        complete: entry.errors.is_empty() && !holes,
        staged: entry.policy.is_staged(),
    })
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
    use super::*;
    use crate::testutil::policy;
    use serde_json::json;

    /// One step: the policies, those the source could not read, and the policies the
    /// sync was told of (`None`: it walked them all).
    type Step<'a> = (
        Vec<(&'a str, serde_json::Value)>,
        Vec<&'a str>,
        Option<Vec<&'a str>>,
    );

    fn obj(name: &str) -> ObjectRef {
        ObjectRef::new("ns", name)
    }

    /// Runs `steps` through an admission told of the changes and one that reads them
    /// all; both admit the same versions and report the same, at every step.
    fn told_equals_whole(steps: &[Step<'_>]) {
        let (mut told, mut whole) = (Admission::default(), Admission::default());
        let parts = BTreeMap::new();
        for (generation, (policies, unreadable, changed)) in (1u64..).zip(steps) {
            let entries: Vec<PolicyEntry> = policies
                .iter()
                .map(|(name, spec)| {
                    let np = policy("ns", name, spec.clone()).into();
                    PolicyEntry::new(&obj(name), &np)
                })
                .collect();
            let unreadable: BTreeSet<ObjectRef> = unreadable.iter().map(|n| obj(n)).collect();
            let changed: Option<BTreeSet<ObjectRef>> =
                changed.as_ref().map(|c| c.iter().map(|n| obj(n)).collect());
            let sync = PolicySync {
                before: generation - 1,
                generation,
                told: changed.is_some(),
            };
            let (mut a, mut b) = (Vec::new(), Vec::new());
            told.update_if_changed(
                &entries,
                (sync, changed.as_ref()),
                &unreadable,
                &parts,
                &mut a,
            );
            whole.update_if_changed(&entries, (sync, None), &unreadable, &parts, &mut b);
            assert_eq!(a, b, "step {generation}: reports");
            let versions = |admission: &Admission| -> Vec<(ObjectRef, bool, bool)> {
                let admitted = admission.admitted().iter();
                admitted
                    .map(|(o, a)| (o.clone(), a.complete, a.staged))
                    .collect()
            };
            assert_eq!(
                versions(&told),
                versions(&whole),
                "step {generation}: in force"
            );
        }
    }

    #[test]
    fn admitting_the_changed_policies_equals_admitting_them_all() {
        let valid = json!({"podSelector": {}, "ingress": [{"ports": [{"port": 80}]}]});
        let broken = json!({"podSelector": {}, "ingress": [{"ports": [{"port": "no such"}]}]});
        told_equals_whole(&[
            (
                vec![("a", valid.clone()), ("b", broken.clone())],
                vec![],
                None,
            ),
            // b repaired, c added with an error, a deleted.
            (
                vec![("b", valid.clone()), ("c", broken.clone())],
                vec![],
                Some(vec!["a", "b", "c"]),
            ),
            // b unreadable: its version stays in force, with a note.
            (vec![("c", broken.clone())], vec!["b"], Some(vec!["b"])),
            // b read again while still listed unreadable, c repaired.
            (
                vec![("b", broken.clone()), ("c", valid.clone())],
                vec!["b"],
                Some(vec!["b", "c"]),
            ),
            (vec![("b", broken), ("c", valid)], vec![], Some(vec!["b"])),
        ]);
    }

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
