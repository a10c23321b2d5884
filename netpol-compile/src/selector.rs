//! Label selectors (`metav1.LabelSelector`): validation, matching and a canonical form.
//!
//! A selector is parsed once into [`Selector`], which matches label maps and renders a
//! canonical string (sorted, de-duplicated) used in identity signatures: two selectors
//! written differently but with the same requirements render the same string.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;

use crate::state::Name;

/// Labels a selector matches: a namespace's or a node's map, a pod's
/// [`Labels`](crate::state::Labels).
pub trait LabelSet {
    /// The value of `key`.
    fn label(&self, key: &str) -> Option<&str>;
}

impl LabelSet for BTreeMap<String, String> {
    fn label(&self, key: &str) -> Option<&str> {
        self.get(key).map(String::as_str)
    }
}

/// One requirement of a selector. `matchLabels` entries become `In` with one value.
/// Keys and values are interned (the same few strings recur in thousands of policies)
/// and the values a sorted, de-duplicated slice: a requirement is ~40 bytes, where
/// `String`s in a `BTreeSet` (a node of room for eleven, even for one value) took ~400.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(crate) enum Requirement {
    In(Name, Values),
    NotIn(Name, Values),
    Exists(Name),
    DoesNotExist(Name),
}

/// The values of an `In` or `NotIn` requirement: sorted, without repeats.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(crate) struct Values(Box<[Name]>);

impl Values {
    fn of<'a>(values: impl IntoIterator<Item = &'a String>) -> Values {
        let mut values: Vec<Name> = values.into_iter().map(|v| Name::interned(v)).collect();
        values.sort_unstable();
        values.dedup();
        Values(values.into())
    }

    fn contains(&self, value: &str) -> bool {
        self.0.binary_search_by(|v| v.as_str().cmp(value)).is_ok()
    }

    fn len(&self) -> usize {
        self.0.len()
    }

    fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    fn join(&self) -> String {
        let values: Vec<&str> = self.0.iter().map(Name::as_str).collect();
        values.join(",")
    }
}

impl Requirement {
    fn matches(&self, labels: &(impl LabelSet + ?Sized)) -> bool {
        match self {
            Requirement::In(key, values) => labels.label(key).is_some_and(|v| values.contains(v)),
            Requirement::NotIn(key, values) => {
                labels.label(key).is_none_or(|v| !values.contains(v))
            }
            Requirement::Exists(key) => labels.label(key).is_some(),
            Requirement::DoesNotExist(key) => labels.label(key).is_none(),
        }
    }

    fn render(&self) -> String {
        match self {
            Requirement::In(key, values) if values.len() == 1 => {
                format!("{key}={}", values.join())
            }
            Requirement::In(key, values) => format!("{key} in ({})", values.join()),
            Requirement::NotIn(key, values) => format!("{key} notin ({})", values.join()),
            Requirement::Exists(key) => key.to_string(),
            Requirement::DoesNotExist(key) => format!("!{key}"),
        }
    }
}

/// `[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?`, at most 63 characters (a label "name").
fn is_label_name(s: &str) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && b.len() <= 63
        && b[0].is_ascii_alphanumeric()
        && b[b.len() - 1].is_ascii_alphanumeric()
        && b.iter()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'-' | b'_' | b'.'))
}

/// A DNS subdomain (RFC 1123), as label key prefixes must be.
fn is_dns_subdomain(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 253
        && s.split('.').all(|part| {
            let b = part.as_bytes();
            !b.is_empty()
                && b[0].is_ascii_alphanumeric()
                && b[b.len() - 1].is_ascii_alphanumeric()
                && b.iter()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
        })
}

/// A label key: `[prefix/]name` (`validation.IsQualifiedName`).
pub fn check_key(key: &str) -> Result<(), String> {
    let ok = match key.split_once('/') {
        Some((prefix, name)) => is_dns_subdomain(prefix) && is_label_name(name),
        None => is_label_name(key),
    };
    if ok {
        Ok(())
    } else {
        Err(format!(
            "invalid label key {key:?}: must be an optional DNS subdomain prefix and '/', then at most 63 \
             alphanumeric characters, '-', '_' or '.', starting and ending with an alphanumeric character"
        ))
    }
}

/// A label value: empty or a label name (`validation.IsValidLabelValue`).
pub fn check_value(value: &str) -> Result<(), String> {
    if value.is_empty() || is_label_name(value) {
        Ok(())
    } else {
        Err(format!(
            "invalid label value {value:?}: must be empty or at most 63 alphanumeric characters, '-', '_' \
             or '.', starting and ending with an alphanumeric character"
        ))
    }
}

/// A validated label selector: the AND of its requirements (sorted, without repeats).
/// Empty matches everything.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Selector {
    requirements: Box<[Requirement]>,
}

impl Selector {
    /// Parses and validates `sel`. Errors are `(field relative to the selector, message)`.
    pub fn parse(sel: &LabelSelector) -> Result<Selector, Vec<(String, String)>> {
        let (selector, errors) = Selector::read(sel);
        if errors.is_empty() {
            Ok(selector)
        } else {
            Err(errors)
        }
    }

    /// Reads what can be read of `sel`: the selector of its valid requirements (which
    /// selects at least every pod `sel` would: requirements are ANDed), and the errors of
    /// the others, as [`Selector::parse`] reports them.
    ///
    /// As the API server, values of `matchExpressions` need not be valid label values:
    /// it accepts them in objects stored before they were checked, on every update
    /// (`AllowInvalidLabelValueInSelector`). Such a value matches no label.
    pub(crate) fn read(sel: &LabelSelector) -> (Selector, Vec<(String, String)>) {
        let mut requirements = Vec::new();
        let mut errors = Vec::new();
        for (key, value) in sel.match_labels.iter().flatten() {
            let path = format!("matchLabels.{key}");
            let before = errors.len();
            if let Err(m) = check_key(key) {
                errors.push((path.clone(), m));
            }
            if let Err(m) = check_value(value) {
                errors.push((path, m));
            }
            if errors.len() == before {
                requirements.push(Requirement::In(Name::interned(key), Values::of([value])));
            }
        }
        for (i, expr) in sel.match_expressions.iter().flatten().enumerate() {
            let values = Values::of(expr.values.iter().flatten());
            let values_path = format!("matchExpressions[{i}].values");
            let key = Name::interned(&expr.key);
            let before = errors.len();
            if let Err(m) = check_key(&key) {
                errors.push((format!("matchExpressions[{i}].key"), m));
            }
            let requirement = match expr.operator.as_str() {
                "In" | "NotIn" if values.is_empty() => {
                    errors.push((
                        values_path,
                        format!("must be non-empty when operator is {}", expr.operator),
                    ));
                    continue;
                }
                "Exists" | "DoesNotExist" if !values.is_empty() => {
                    errors.push((
                        values_path,
                        format!("may not be specified when operator is {}", expr.operator),
                    ));
                    continue;
                }
                "In" => Requirement::In(key, values),
                "NotIn" => Requirement::NotIn(key, values),
                "Exists" => Requirement::Exists(key),
                "DoesNotExist" => Requirement::DoesNotExist(key),
                other => {
                    errors.push((
                        format!("matchExpressions[{i}].operator"),
                        format!(
                            "unsupported operator {other:?}: must be In, NotIn, Exists or DoesNotExist"
                        ),
                    ));
                    continue;
                }
            };
            if errors.len() == before {
                requirements.push(requirement);
            }
        }
        requirements.sort_unstable();
        requirements.dedup();
        let requirements = requirements.into();
        (Selector { requirements }, errors)
    }

    pub fn matches(&self, labels: &(impl LabelSet + ?Sized)) -> bool {
        self.requirements.iter().all(|r| r.matches(labels))
    }

    /// Canonical text, e.g. `{app=web,tier in (a,b),!legacy}`; `{}` selects everything.
    pub(crate) fn canonical(&self) -> String {
        let parts: Vec<String> = self.requirements.iter().map(Requirement::render).collect();
        format!("{{{}}}", parts.join(","))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelectorRequirement;

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn expr(key: &str, op: &str, values: Option<&[&str]>) -> LabelSelectorRequirement {
        LabelSelectorRequirement {
            key: key.into(),
            operator: op.into(),
            values: values.map(|v| v.iter().map(|s| s.to_string()).collect()),
        }
    }

    fn sel(match_labels: &[(&str, &str)], exprs: Vec<LabelSelectorRequirement>) -> LabelSelector {
        LabelSelector {
            match_labels: if match_labels.is_empty() {
                None
            } else {
                Some(labels(match_labels))
            },
            match_expressions: if exprs.is_empty() { None } else { Some(exprs) },
        }
    }

    #[test]
    fn empty_selector_matches_everything() {
        let s = Selector::parse(&LabelSelector::default()).unwrap();
        assert!(s.matches(&labels(&[])));
        assert!(s.matches(&labels(&[("a", "b")])));
        assert_eq!(s.canonical(), "{}");
    }

    #[test]
    fn match_labels_and_expressions_are_anded() {
        let s = Selector::parse(&sel(
            &[("app", "web")],
            vec![
                expr("tier", "In", Some(&["a", "b"])),
                expr("legacy", "DoesNotExist", None),
            ],
        ))
        .unwrap();
        assert!(s.matches(&labels(&[("app", "web"), ("tier", "a")])));
        assert!(s.matches(&labels(&[("app", "web"), ("tier", "b"), ("x", "y")])));
        assert!(!s.matches(&labels(&[("app", "web"), ("tier", "c")])));
        assert!(!s.matches(&labels(&[("app", "web")])));
        assert!(!s.matches(&labels(&[("app", "db"), ("tier", "a")])));
        assert!(!s.matches(&labels(&[("app", "web"), ("tier", "a"), ("legacy", "")])));
    }

    #[test]
    fn notin_and_doesnotexist_match_absent_keys() {
        let s = Selector::parse(&sel(&[], vec![expr("env", "NotIn", Some(&["prod"]))])).unwrap();
        assert!(s.matches(&labels(&[])));
        assert!(s.matches(&labels(&[("env", "dev")])));
        assert!(!s.matches(&labels(&[("env", "prod")])));
        let s = Selector::parse(&sel(&[], vec![expr("env", "DoesNotExist", None)])).unwrap();
        assert!(s.matches(&labels(&[])));
        assert!(!s.matches(&labels(&[("env", "")])));
        let s = Selector::parse(&sel(&[], vec![expr("env", "Exists", Some(&[]))])).unwrap();
        assert!(s.matches(&labels(&[("env", "")])));
        assert!(!s.matches(&labels(&[("other", "")])));
    }

    #[test]
    fn invalid_requirements_are_reported_with_their_field() {
        let errs = Selector::parse(&sel(
            &[],
            vec![
                expr("a", "In", Some(&[])),
                expr("b", "NotIn", None),
                expr("c", "Exists", Some(&["x"])),
                expr("d", "Equals", Some(&["x"])),
                expr("e", "in", Some(&["x"])),
            ],
        ))
        .unwrap_err();
        let fields: Vec<&str> = errs.iter().map(|(f, _)| f.as_str()).collect();
        assert_eq!(
            fields,
            [
                "matchExpressions[0].values",
                "matchExpressions[1].values",
                "matchExpressions[2].values",
                "matchExpressions[3].operator",
                "matchExpressions[4].operator",
            ]
        );
    }

    #[test]
    fn invalid_keys_and_values_are_reported() {
        let errs = Selector::parse(&sel(
            &[
                ("bad key", "v"),
                ("k", "bad,value"),
                ("example.com/ok", "fine_1.2-x"),
            ],
            vec![
                expr("-k", "Exists", None),
                // Accepted, as the API server does for stored objects: matches no label.
                expr("k", "In", Some(&["ok", "(x)"])),
            ],
        ))
        .unwrap_err();
        let fields: Vec<&str> = errs.iter().map(|(f, _)| f.as_str()).collect();
        assert_eq!(
            fields,
            [
                "matchLabels.bad key",
                "matchLabels.k",
                "matchExpressions[0].key",
            ]
        );
        for good in [
            "a",
            "app.kubernetes.io/name",
            "kubernetes.io/metadata.name",
            "A_b-C.d",
        ] {
            assert!(check_key(good).is_ok(), "{good}");
        }
        for bad in ["", "/a", "a/", "UPPER.com/a", "a/b/c", &"x".repeat(64)] {
            assert!(check_key(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn reading_keeps_the_valid_requirements_and_so_selects_at_least_as_much() {
        let (s, errs) = Selector::read(&sel(
            &[("app", "web"), ("bad key", "v")],
            vec![
                expr("tier", "Equals", Some(&["a"])),
                expr("env", "In", Some(&["prod"])),
            ],
        ));
        assert_eq!(errs.len(), 2);
        assert_eq!(s.canonical(), "{app=web,env=prod}");
        let (s, errs) = Selector::read(&sel(&[], vec![expr("x", "Exists", Some(&["v"]))]));
        assert_eq!(errs.len(), 1);
        assert_eq!(s.canonical(), "{}");
    }

    #[test]
    fn canonical_form_ignores_spelling() {
        let a = Selector::parse(&sel(&[("app", "web")], vec![])).unwrap();
        let b = Selector::parse(&sel(&[], vec![expr("app", "In", Some(&["web", "web"]))])).unwrap();
        assert_eq!(a.canonical(), b.canonical());
        assert_eq!(a.canonical(), "{app=web}");
        let c = Selector::parse(&sel(
            &[],
            vec![
                expr("t", "In", Some(&["b", "a"])),
                expr("x", "Exists", None),
            ],
        ))
        .unwrap();
        assert_eq!(c.canonical(), "{t in (a,b),x}");
    }

    #[test]
    fn selectors_are_compact_and_share_their_strings_with_every_other_selector() {
        // 15,000 policies hold ~45,000 selectors at the top of the range.
        assert!(std::mem::size_of::<Requirement>() <= 40);
        assert_eq!(std::mem::size_of::<Selector>(), 16);
        let a = Selector::parse(&sel(&[("app", "web")], vec![])).unwrap();
        let b = Selector::parse(&sel(&[], vec![expr("app", "In", Some(&["db", "web"]))])).unwrap();
        let (Requirement::In(key_a, values_a), Requirement::In(key_b, values_b)) =
            (&a.requirements[0], &b.requirements[0])
        else {
            panic!("In requirements: {a:?} {b:?}");
        };
        assert_eq!(key_a.as_str().as_ptr(), key_b.as_str().as_ptr(), "one key");
        assert_eq!(
            values_a.0[0].as_str().as_ptr(),
            values_b.0[1].as_str().as_ptr(),
            "one value web"
        );
        assert!(b.matches(&labels(&[("app", "db")])) && !a.matches(&labels(&[("app", "db")])));
    }
}
