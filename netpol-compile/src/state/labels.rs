//! A pod's labels, compact: sorted (key, value) pairs whose strings are shared with
//! every other pod's ([`super::intern`]), the set itself shared with every pod that has
//! the same one (the replicas of a Deployment). Four labels take ~150 bytes for a pod
//! with a set of its own, 8 for one that shares it; a `BTreeMap` of them took ~570.

use std::collections::BTreeMap;
use std::sync::Arc;

use super::intern::{self, Label};
use crate::selector::LabelSet;

/// A pod's labels.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct Labels(Arc<[Label]>);

impl Labels {
    /// The value of `key`.
    pub fn get(&self, key: &str) -> Option<&str> {
        self.0
            .binary_search_by(|(k, _)| (**k).cmp(key))
            .ok()
            .map(|i| &*self.0[i].1)
    }

    pub fn contains_key(&self, key: &str) -> bool {
        self.get(key).is_some()
    }

    /// (key, value), by key.
    pub fn iter(&self) -> impl ExactSizeIterator<Item = (&str, &str)> {
        self.0.iter().map(|(k, v)| (&**k, &**v))
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// As a map (for what reads labels as `metav1` does: previews, the reference).
    pub fn to_map(&self) -> BTreeMap<String, String> {
        self.iter()
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect()
    }

    /// These labels with `key` set to `value` (`None`: removed).
    pub fn with(&self, key: &str, value: Option<&str>) -> Labels {
        let mut map = self.to_map();
        match value {
            Some(value) => map.insert(key.to_owned(), value.to_owned()),
            None => map.remove(key),
        };
        Labels::from(&map)
    }
}

impl From<&BTreeMap<String, String>> for Labels {
    /// The shared copy of `map`'s labels.
    fn from(map: &BTreeMap<String, String>) -> Self {
        let pairs: Vec<Label> = map
            .iter()
            .map(|(k, v)| (intern::name(k), intern::name(v)))
            .collect();
        Labels(intern::label_set(pairs))
    }
}

impl LabelSet for Labels {
    fn label(&self, key: &str) -> Option<&str> {
        self.get(key)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use arcstr::ArcStr;

    fn map(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn labels_read_as_the_map_they_came_from() {
        let m = map(&[("app", "web"), ("tier", ""), ("a", "1")]);
        let labels = Labels::from(&m);
        assert_eq!(labels.to_map(), m);
        assert_eq!(labels.get("app"), Some("web"));
        assert_eq!(labels.get("tier"), Some(""));
        assert_eq!(labels.get("ap"), None);
        assert!(labels.contains_key("a") && !labels.contains_key("b"));
        assert_eq!(labels.len(), 3);
        let keys: Vec<&str> = labels.iter().map(|(k, _)| k).collect();
        assert_eq!(keys, ["a", "app", "tier"]);
        assert_eq!(
            labels.with("app", None).to_map(),
            map(&[("tier", ""), ("a", "1")])
        );
        assert_eq!(labels.with("b", Some("2")).get("b"), Some("2"));
        assert!(Labels::default().is_empty());
    }

    #[test]
    fn a_label_and_a_name_are_thin_pointers() {
        // Every bench pod has a label set of its own, and four copies of its name.
        assert_eq!(
            std::mem::size_of::<Label>(),
            2 * std::mem::size_of::<usize>()
        );
        let object = std::mem::size_of::<crate::state::ObjectRef>();
        assert_eq!(object, 2 * std::mem::size_of::<usize>());
    }

    #[test]
    fn equal_label_sets_are_one_copy_and_equal_strings_are_shared() {
        let a = Labels::from(&map(&[("app", "web"), ("hash", "1")]));
        let b = Labels::from(&map(&[("app", "web"), ("hash", "1")]));
        let c = Labels::from(&map(&[("app", "web"), ("hash", "2")]));
        assert!(Arc::ptr_eq(&a.0, &b.0));
        assert!(ArcStr::ptr_eq(&a.0[0].0, &c.0[0].0), "key app shared");
        assert!(ArcStr::ptr_eq(&a.0[0].1, &c.0[0].1), "value web shared");
    }
}
