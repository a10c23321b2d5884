//! Label selectors as kubectl's `-l/--selector` writes them, to choose the pods a preview
//! shows: `app=web`, `app==web`, `tier!=db`, `env in (prod,staging)`, `env notin (dev)`,
//! `release` (the label exists), `!canary` (it does not), joined by commas (all must
//! hold).

use std::collections::{BTreeMap, BTreeSet};
use std::str::FromStr;

use super::PreviewError;

/// One requirement of a [`LabelSelector`].
#[derive(Clone, Debug, PartialEq, Eq)]
enum Requirement {
    In(String, BTreeSet<String>),
    /// Also holds when the label is absent (as `!=` does in Kubernetes).
    NotIn(String, BTreeSet<String>),
    Exists(String),
    DoesNotExist(String),
}

impl Requirement {
    fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        match self {
            Requirement::In(key, values) => labels.get(key).is_some_and(|v| values.contains(v)),
            Requirement::NotIn(key, values) => labels.get(key).is_none_or(|v| !values.contains(v)),
            Requirement::Exists(key) => labels.contains_key(key),
            Requirement::DoesNotExist(key) => !labels.contains_key(key),
        }
    }
}

impl std::fmt::Display for Requirement {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let set = |values: &BTreeSet<String>| values.iter().cloned().collect::<Vec<_>>().join(",");
        match self {
            Requirement::In(key, values) if values.len() == 1 => write!(f, "{key}={}", set(values)),
            Requirement::NotIn(key, values) if values.len() == 1 => {
                write!(f, "{key}!={}", set(values))
            }
            Requirement::In(key, values) => write!(f, "{key} in ({})", set(values)),
            Requirement::NotIn(key, values) => write!(f, "{key} notin ({})", set(values)),
            Requirement::Exists(key) => f.write_str(key),
            Requirement::DoesNotExist(key) => write!(f, "!{key}"),
        }
    }
}

/// A label selector in kubectl's syntax: every requirement must hold. Empty (`""`)
/// selects everything.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LabelSelector {
    requirements: Vec<Requirement>,
}

impl LabelSelector {
    /// Whether `labels` meet every requirement.
    pub fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        self.requirements.iter().all(|r| r.matches(labels))
    }

    /// Whether the labels of an object (`None`: it has none) meet every requirement.
    pub fn matches_object(&self, labels: Option<&BTreeMap<String, String>>) -> bool {
        match labels {
            Some(labels) => self.matches(labels),
            None => self.matches(&BTreeMap::new()),
        }
    }
}

/// The requirements in the order given, as kubectl writes them.
impl std::fmt::Display for LabelSelector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let parts: Vec<String> = self.requirements.iter().map(ToString::to_string).collect();
        f.write_str(&parts.join(","))
    }
}

impl FromStr for LabelSelector {
    type Err = PreviewError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let requirements = terms(text)
            .into_iter()
            .map(|term| {
                requirement(term).map_err(|reason| PreviewError::Selector {
                    input: text.to_owned(),
                    term: term.to_owned(),
                    reason,
                })
            })
            .collect::<Result<_, _>>()?;
        Ok(LabelSelector { requirements })
    }
}

/// The comma-separated terms of `text` (commas inside `(...)` belong to a value list);
/// blank terms are dropped, so `""` has none.
fn terms(text: &str) -> Vec<&str> {
    let mut out = Vec::new();
    let mut depth = 0usize;
    let mut start = 0;
    for (i, c) in text.char_indices() {
        match c {
            '(' => depth += 1,
            ')' => depth = depth.saturating_sub(1),
            ',' if depth == 0 => {
                out.push(&text[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    out.push(&text[start..]);
    out.into_iter()
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .collect()
}

fn requirement(term: &str) -> Result<Requirement, String> {
    if let Some(key) = term.strip_prefix('!') {
        return Ok(Requirement::DoesNotExist(key_of(key.trim())?));
    }
    if let Some((head, list)) = term.split_once('(') {
        let Some(list) = list.trim_end().strip_suffix(')') else {
            return Err("a value list ends with ')'".into());
        };
        let words: Vec<&str> = head.split_whitespace().collect();
        let [key, operator] = words[..] else {
            return Err("expected KEY in (V1,V2) or KEY notin (V1,V2)".into());
        };
        let values: BTreeSet<String> = list
            .split(',')
            .map(|v| value_of(v.trim()))
            .collect::<Result<_, _>>()?;
        if values.is_empty() || list.trim().is_empty() {
            return Err("the value list is empty".into());
        }
        let key = key_of(key)?;
        return match operator {
            "in" => Ok(Requirement::In(key, values)),
            "notin" => Ok(Requirement::NotIn(key, values)),
            other => Err(format!("unknown operator {other:?}: in or notin")),
        };
    }
    for (operator, negated) in [("!=", true), ("==", false), ("=", false)] {
        if let Some((key, value)) = term.split_once(operator) {
            let key = key_of(key.trim())?;
            let values = BTreeSet::from([value_of(value.trim())?]);
            return Ok(if negated {
                Requirement::NotIn(key, values)
            } else {
                Requirement::In(key, values)
            });
        }
    }
    if term.contains(['<', '>']) {
        return Err("numeric comparisons (gt, lt) are not supported".into());
    }
    Ok(Requirement::Exists(key_of(term)?))
}

/// A label key: `[prefix/]name` of letters, digits, `-`, `_`, `.` (the prefix a DNS
/// name).
fn key_of(key: &str) -> Result<String, String> {
    let name_ok = |s: &str| {
        !s.is_empty()
            && s.len() <= 63
            && s.chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
    };
    let ok = match key.split_once('/') {
        Some((prefix, name)) => {
            !prefix.is_empty()
                && prefix.len() <= 253
                && prefix
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.'))
                && name_ok(name)
        }
        None => name_ok(key),
    };
    if ok {
        Ok(key.to_owned())
    } else {
        Err(format!("{key:?} is not a label key"))
    }
}

/// A label value: empty, or up to 63 letters, digits, `-`, `_`, `.`.
fn value_of(value: &str) -> Result<String, String> {
    if value.len() <= 63
        && value
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
    {
        Ok(value.to_owned())
    } else {
        Err(format!("{value:?} is not a label value"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    fn selects(selector: &str, pairs: &[(&str, &str)]) -> bool {
        selector
            .parse::<LabelSelector>()
            .unwrap_or_else(|e| panic!("{selector}: {e}"))
            .matches(&labels(pairs))
    }

    #[test]
    fn equality_and_inequality_read_as_kubectl_reads_them() {
        assert!(selects("app=web", &[("app", "web")]));
        assert!(selects("app==web", &[("app", "web"), ("tier", "fe")]));
        assert!(!selects("app=web", &[("app", "db")]));
        assert!(!selects("app=web", &[]));
        assert!(selects("app!=web", &[("app", "db")]));
        assert!(
            selects("app!=web", &[]),
            "!= holds where the label is absent"
        );
        assert!(!selects("app!=web", &[("app", "web")]));
    }

    #[test]
    fn set_and_existence_requirements_all_hold_together() {
        let selector = "env in (prod, staging),tier notin (db),release,!canary";
        assert!(selects(selector, &[("env", "prod"), ("release", "1")]));
        assert!(selects(
            selector,
            &[("env", "staging"), ("tier", "fe"), ("release", "")]
        ));
        assert!(!selects(selector, &[("env", "dev"), ("release", "1")]));
        assert!(!selects(
            selector,
            &[("env", "prod"), ("tier", "db"), ("release", "1")]
        ));
        assert!(!selects(selector, &[("env", "prod")]), "release is missing");
        assert!(!selects(
            selector,
            &[("env", "prod"), ("release", "1"), ("canary", "yes")]
        ));
        assert_eq!(
            selector.parse::<LabelSelector>().unwrap().to_string(),
            "env in (prod,staging),tier!=db,release,!canary"
        );
    }

    #[test]
    fn an_empty_selector_selects_everything() {
        assert!(selects("", &[]));
        assert!(selects(" , ", &[("a", "b")]));
        assert!(
            LabelSelector::default().matches_object(None),
            "an object without labels"
        );
        assert!(
            !"app=web"
                .parse::<LabelSelector>()
                .unwrap()
                .matches_object(None)
        );
    }

    #[test]
    fn prefixed_keys_are_label_keys() {
        assert!(selects(
            "app.kubernetes.io/name=web",
            &[("app.kubernetes.io/name", "web")]
        ));
    }

    #[test]
    fn a_malformed_selector_is_refused_with_the_term_at_fault() {
        for (bad, reason) in [
            ("app=we b", "not a label value"),
            ("=web", "not a label key"),
            ("env in prod", "not a label key"),
            ("env in (prod", "ends with ')'"),
            ("env within (prod)", "unknown operator"),
            ("env in ()", "empty"),
            ("replicas>2", "not supported"),
            ("!", "not a label key"),
        ] {
            let error = bad.parse::<LabelSelector>().unwrap_err().to_string();
            assert!(error.contains(reason), "{bad}: {error}");
            assert!(
                error.starts_with(&format!("label selector {bad:?}: ")),
                "{bad}: {error}"
            );
        }
        let error = "app=web,env in (prod".parse::<LabelSelector>().unwrap_err();
        assert_eq!(
            error.to_string(),
            "label selector \"app=web,env in (prod\": \"env in (prod\": a value list ends with ')'"
        );
    }
}
