//! Label selectors as kubectl's `-l/--selector` writes them, to choose the pods a preview
//! shows: `app=web`, `app==web`, `tier!=db`, `env in (prod,staging)`, `env notin (dev)`,
//! `release` (the label exists), `!canary` (it does not), joined by commas (all must
//! hold). The syntax is read here; keys and values are checked and the selector matched
//! by the compiler's own [`Selector`], as a `metav1.LabelSelector` of the same
//! requirements.

use std::collections::{BTreeMap, BTreeSet};
use std::str::FromStr;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{
    LabelSelector as K8sSelector, LabelSelectorRequirement,
};
use netpol_compile::{Selector, check_label_key, check_label_value};

use super::PreviewError;

/// A label selector in kubectl's syntax: every requirement must hold. Empty (`""`)
/// selects everything.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LabelSelector {
    /// The requirements as kubectl writes them, in the order given.
    terms: Vec<String>,
    selector: Selector,
}

impl LabelSelector {
    /// Whether `labels` meet every requirement.
    pub fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        self.selector.matches(labels)
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
        f.write_str(&self.terms.join(","))
    }
}

impl FromStr for LabelSelector {
    type Err = PreviewError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let mut terms = Vec::new();
        let mut expressions = Vec::new();
        for term in split_terms(text) {
            let (expression, written) =
                requirement(term).map_err(|reason| PreviewError::Selector {
                    input: text.to_owned(),
                    term: term.to_owned(),
                    reason,
                })?;
            expressions.push(expression);
            terms.push(written);
        }
        let selector = Selector::parse(&K8sSelector {
            match_expressions: Some(expressions),
            match_labels: None,
        })
        .map_err(|errors| PreviewError::Selector {
            input: text.to_owned(),
            term: text.to_owned(),
            reason: errors
                .into_iter()
                .map(|(_, m)| m)
                .collect::<Vec<_>>()
                .join("; "),
        })?;
        Ok(LabelSelector { terms, selector })
    }
}

/// The comma-separated terms of `text` (commas inside `(...)` belong to a value list);
/// blank terms are dropped, so `""` has none.
fn split_terms(text: &str) -> Vec<&str> {
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

/// One term as a `matchExpressions` entry, and as kubectl writes it back.
fn requirement(term: &str) -> Result<(LabelSelectorRequirement, String), String> {
    let expression =
        |key: &str, operator: &str, values: Option<BTreeSet<String>>| LabelSelectorRequirement {
            key: key.to_owned(),
            operator: operator.to_owned(),
            values: values.map(|v| v.into_iter().collect()),
        };
    let list = |values: &BTreeSet<String>| values.iter().cloned().collect::<Vec<_>>().join(",");
    if let Some(key) = term.strip_prefix('!') {
        let key = key.trim();
        check_label_key(key)?;
        return Ok((expression(key, "DoesNotExist", None), format!("!{key}")));
    }
    if let Some((head, rest)) = term.split_once('(') {
        let Some(rest) = rest.trim_end().strip_suffix(')') else {
            return Err("a value list ends with ')'".into());
        };
        let words: Vec<&str> = head.split_whitespace().collect();
        let [key, operator] = words[..] else {
            return Err("expected KEY in (V1,V2) or KEY notin (V1,V2)".into());
        };
        check_label_key(key)?;
        if rest.trim().is_empty() {
            return Err("the value list is empty".into());
        }
        let values: BTreeSet<String> = rest.split(',').map(|v| v.trim().to_owned()).collect();
        for value in &values {
            check_label_value(value)?;
        }
        let (operator, written) = match operator {
            "in" if values.len() == 1 => ("In", format!("{key}={}", list(&values))),
            "notin" if values.len() == 1 => ("NotIn", format!("{key}!={}", list(&values))),
            "in" => ("In", format!("{key} in ({})", list(&values))),
            "notin" => ("NotIn", format!("{key} notin ({})", list(&values))),
            other => return Err(format!("unknown operator {other:?}: in or notin")),
        };
        return Ok((expression(key, operator, Some(values)), written));
    }
    for (symbol, operator) in [("!=", "NotIn"), ("==", "In"), ("=", "In")] {
        if let Some((key, value)) = term.split_once(symbol) {
            let (key, value) = (key.trim(), value.trim());
            check_label_key(key)?;
            check_label_value(value)?;
            let written = match operator {
                "NotIn" => format!("{key}!={value}"),
                _ => format!("{key}={value}"),
            };
            let values = BTreeSet::from([value.to_owned()]);
            return Ok((expression(key, operator, Some(values)), written));
        }
    }
    if term.contains(['<', '>']) {
        return Err("numeric comparisons (gt, lt) are not supported".into());
    }
    check_label_key(term)?;
    Ok((expression(term, "Exists", None), term.to_owned()))
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
            ("app=we b", "invalid label value"),
            ("=web", "invalid label key"),
            ("env in prod", "invalid label key"),
            ("env in (prod", "ends with ')'"),
            ("env within (prod)", "unknown operator"),
            ("env in ()", "empty"),
            ("replicas>2", "not supported"),
            ("!", "invalid label key"),
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
