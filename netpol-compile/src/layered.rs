//! A sorted map kept between compiles as a shared base list and the keys changed since:
//! copying it for the next compile costs the changes, not the map.
//!
//! 150,000 pods have some 190,000 IPCACHE keys, each with its identity number (4.5 MB as
//! a sorted list), and 15,000 policies some 30,000 rules with their ids. A change that
//! moves a few keys, or replaces one policy's rules, used to copy the whole list or map
//! for the next allocations (at that size a tenth of a pod change's compile, 4 ms of a
//! policy change's). A [`Layered`] map copies the changes made since its list was last
//! written whole, and writes it whole again once they are many.

use std::cmp::Ordering;
use std::collections::BTreeMap;
use std::iter::Peekable;
use std::sync::Arc;

/// The changes kept beside the base list before it is written whole: one per this many
/// entries of the base (and [`FOLD_MIN`] at least). Each patch copies the changes (a
/// `BTreeMap` clone), each fold the list: a share of 1/64 keeps both to about a
/// sixty-fourth of the list per change.
const FOLD_SHARE: usize = 64;
const FOLD_MIN: usize = 256;

/// A map from `K` to `V`, sorted by key. Equal when they hold the same entries, however
/// split; cloned by two reference counts.
pub struct Layered<K, V> {
    /// Sorted by key, without repeats; shared with the maps patched from it.
    base: Arc<Vec<(K, V)>>,
    /// Keys whose value differs from `base`'s: the value now, `None` when the key is
    /// absent now. Shared while nothing changes.
    changed: Arc<BTreeMap<K, Option<V>>>,
    len: usize,
}

impl<K: Ord + Clone, V: Clone + PartialEq> Layered<K, V> {
    /// The map of `sorted` (sorted by key, without repeats).
    pub fn new(sorted: Vec<(K, V)>) -> Self {
        debug_assert!(sorted.is_sorted_by(|(a, _), (b, _)| a < b));
        Layered {
            len: sorted.len(),
            base: Arc::new(sorted),
            changed: Arc::default(),
        }
    }

    pub fn get(&self, key: &K) -> Option<&V> {
        match self.changed.get(key) {
            Some(now) => now.as_ref(),
            None => self.in_base(key),
        }
    }

    fn in_base(&self, key: &K) -> Option<&V> {
        let at = self.base.binary_search_by(|(k, _)| k.cmp(key));
        at.ok().map(|i| &self.base[i].1)
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Every entry, in key order.
    pub fn iter(&self) -> Iter<'_, K, V> {
        Merged {
            base: self.base.iter().peekable(),
            changed: self.changed.iter().peekable(),
        }
    }

    pub fn keys(&self) -> impl Iterator<Item = &K> {
        self.iter().map(|(k, _)| k)
    }

    pub fn values(&self) -> impl Iterator<Item = &V> {
        self.iter().map(|(_, v)| v)
    }

    /// The entries from `key` on (`key` included), in key order.
    pub fn iter_from<'a>(&'a self, key: &K) -> impl Iterator<Item = (&'a K, &'a V)> {
        let at = self.base.partition_point(|(k, _)| k < key);
        Merged {
            base: self.base[at..].iter().peekable(),
            changed: self.changed.range(key.clone()..).peekable(),
        }
    }

    /// Whether `other` is this very map (the same shared parts), as a map patched with
    /// nothing is: the cheap test for "unchanged".
    pub fn same(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.base, &other.base) && Arc::ptr_eq(&self.changed, &other.changed)
    }

    /// This map with each key of `changes` set to its value now (`None`: absent).
    pub fn patched(&self, changes: impl IntoIterator<Item = (K, Option<V>)>) -> Self {
        let mut patched = self.clone();
        patched.patch(changes);
        patched
    }

    /// Sets each key of `changes` to its value now (`None`: absent). What no other map
    /// shares is changed in place: the changes kept beside the list, and the list itself
    /// when it is written whole (no second list of 190,000 keys beside the first, as a
    /// copy of the patched map would hold until the old one is dropped).
    pub fn patch(&mut self, changes: impl IntoIterator<Item = (K, Option<V>)>) {
        self.patch_folding_at(changes, (self.base.len() / FOLD_SHARE).max(FOLD_MIN));
    }

    /// [`Layered::patch`], the list written whole once more than `fold_at` keys differ
    /// from the base.
    fn patch_folding_at(
        &mut self,
        changes: impl IntoIterator<Item = (K, Option<V>)>,
        fold_at: usize,
    ) {
        let base = &self.base;
        let in_base = |key: &K| {
            let at = base.binary_search_by(|(k, _)| k.cmp(key));
            at.ok().map(|i| &base[i].1)
        };
        let changed = Arc::make_mut(&mut self.changed);
        for (key, now) in changes {
            let before = match changed.get(&key) {
                Some(before) => before.is_some(),
                None => in_base(&key).is_some(),
            };
            self.len = self.len + usize::from(now.is_some()) - usize::from(before);
            if in_base(&key) == now.as_ref() {
                changed.remove(&key);
            } else {
                changed.insert(key, now);
            }
        }
        if changed.len() <= fold_at {
            return;
        }
        let changed = std::mem::take(&mut self.changed);
        let changed = Arc::try_unwrap(changed).unwrap_or_else(|shared| BTreeMap::clone(&shared));
        fold(Arc::make_mut(&mut self.base), changed);
        debug_assert_eq!(self.base.len(), self.len);
    }
}

/// `base` (sorted by key, without repeats) with each key of `changed` set to its value
/// (`None`: absent), in place: values set and entries removed in one pass, then the new
/// entries merged in from the back (each entry moves once; the list grows only by the
/// new entries).
fn fold<K: Ord + Clone, V: Clone>(base: &mut Vec<(K, V)>, changed: BTreeMap<K, Option<V>>) {
    let mut changes = changed.into_iter().peekable();
    let mut new = Vec::new();
    base.retain_mut(|(key, value)| {
        while let Some((k, now)) = changes.next_if(|(k, _)| k < key) {
            new.extend(now.map(|v| (k, v)));
        }
        match changes.next_if(|(k, _)| k == key) {
            None => true,
            Some((_, Some(now))) => {
                *value = now;
                true
            }
            Some((_, None)) => false,
        }
    });
    new.extend(changes.filter_map(|(k, now)| Some((k, now?))));
    // The list's tail takes copies of the new entries (their room), then from the back
    // each slot takes the larger of the old list's last unplaced entry and the last new
    // one.
    let mut old = base.len();
    base.extend_from_slice(&new);
    let mut slot = base.len();
    while let Some((key, _)) = new.last() {
        slot -= 1;
        if old > 0 && base[old - 1].0 > *key {
            base.swap(slot, old - 1);
            old -= 1;
        } else {
            base[slot] = new.pop().expect("a last entry");
        }
    }
}

/// Every entry of a [`Layered`] map, in key order.
pub type Iter<'a, K, V> = Merged<
    'a,
    K,
    V,
    std::slice::Iter<'a, (K, V)>,
    std::collections::btree_map::Iter<'a, K, Option<V>>,
>;

/// A base list and its changes merged, in key order.
pub struct Merged<'a, K, V, B, C>
where
    B: Iterator<Item = &'a (K, V)>,
    C: Iterator<Item = (&'a K, &'a Option<V>)>,
    K: 'a,
    V: 'a,
{
    base: Peekable<B>,
    changed: Peekable<C>,
}

impl<'a, K: Ord, V, B, C> Iterator for Merged<'a, K, V, B, C>
where
    B: Iterator<Item = &'a (K, V)>,
    C: Iterator<Item = (&'a K, &'a Option<V>)>,
{
    type Item = (&'a K, &'a V);

    fn next(&mut self) -> Option<Self::Item> {
        loop {
            let order = match (self.base.peek(), self.changed.peek()) {
                (None, None) => return None,
                (Some(_), None) => Ordering::Less,
                (None, Some(_)) => Ordering::Greater,
                (Some((b, _)), Some((c, _))) => b.cmp(c),
            };
            let (key, now) = match order {
                Ordering::Less => return self.base.next().map(|(k, v)| (k, v)),
                Ordering::Equal => {
                    self.base.next();
                    self.changed.next()?
                }
                Ordering::Greater => self.changed.next()?,
            };
            if let Some(value) = now {
                return Some((key, value));
            }
        }
    }
}

impl<'a, K: Ord + Clone, V: Clone + PartialEq> IntoIterator for &'a Layered<K, V> {
    type Item = (&'a K, &'a V);
    type IntoIter = Iter<'a, K, V>;

    fn into_iter(self) -> Self::IntoIter {
        self.iter()
    }
}

impl<K, V> Clone for Layered<K, V> {
    fn clone(&self) -> Self {
        Layered {
            base: Arc::clone(&self.base),
            changed: Arc::clone(&self.changed),
            len: self.len,
        }
    }
}

impl<K, V> Default for Layered<K, V> {
    fn default() -> Self {
        Layered {
            base: Arc::default(),
            changed: Arc::default(),
            len: 0,
        }
    }
}

impl<K: Ord + Clone, V: Clone + PartialEq> PartialEq for Layered<K, V> {
    fn eq(&self, other: &Self) -> bool {
        self.same(other) || (self.len == other.len && self.iter().eq(other.iter()))
    }
}

impl<K: Ord + Clone, V: Clone + Eq> Eq for Layered<K, V> {}

impl<K: Ord + Clone, V: Clone + PartialEq> PartialEq<BTreeMap<K, V>> for Layered<K, V> {
    fn eq(&self, other: &BTreeMap<K, V>) -> bool {
        self.len == other.len() && self.iter().eq(other.iter())
    }
}

impl<K: Ord + Clone, V: Clone + PartialEq> std::ops::Index<&K> for Layered<K, V> {
    type Output = V;

    /// The value of `key`; panics when it has none, as a map's index does.
    fn index(&self, key: &K) -> &V {
        self.get(key).expect("no entry for the key")
    }
}

impl<K, V> std::fmt::Debug for Layered<K, V>
where
    K: Ord + Clone + std::fmt::Debug,
    V: Clone + PartialEq + std::fmt::Debug,
{
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_map().entries(self.iter()).finish()
    }
}

impl<K: Ord + Clone, V: Clone + PartialEq> FromIterator<(K, V)> for Layered<K, V> {
    /// The map of `entries` (a later entry for a key replaces an earlier one).
    fn from_iter<I: IntoIterator<Item = (K, V)>>(entries: I) -> Self {
        let map: BTreeMap<K, V> = entries.into_iter().collect();
        Layered::new(map.into_iter().collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        /// A chain of patches, folded early or late, in place or beside a copy, holds what
        /// the map rewritten whole after every change holds, and reads from any key as it
        /// does.
        #[test]
        fn a_patched_map_holds_what_a_map_rewritten_whole_holds(
            first in prop::collection::btree_map(0u8..48, 1u32..6, 0..32),
            steps in prop::collection::vec(
                prop::collection::vec((0u8..48, prop::option::of(1u32..6)), 0..6),
                1..24,
            ),
            fold_at in 0usize..12,
            shared in prop::collection::vec(any::<bool>(), 24),
        ) {
            let mut expected: BTreeMap<u8, u32> = first.clone();
            let mut map = Layered::new(first.into_iter().collect());
            for (step, shared) in steps.into_iter().zip(shared) {
                // Patched in place, or beside a copy that must not change.
                let copy = shared.then(|| map.clone());
                let before: Vec<(u8, u32)> = map.iter().map(|(&k, &v)| (k, v)).collect();
                map.patch_folding_at(step.iter().copied(), fold_at);
                if let Some(copy) = copy {
                    let kept: Vec<(u8, u32)> = copy.iter().map(|(&k, &v)| (k, v)).collect();
                    prop_assert_eq!(kept, before, "a copy is not patched with the map");
                }
                for (key, now) in step {
                    match now {
                        Some(value) => expected.insert(key, value),
                        None => expected.remove(&key),
                    };
                }
                let whole: Vec<(u8, u32)> = expected.iter().map(|(&k, &v)| (k, v)).collect();
                let read: Vec<(u8, u32)> = map.iter().map(|(&k, &v)| (k, v)).collect();
                prop_assert_eq!(&read, &whole);
                prop_assert_eq!(map.len(), whole.len());
                prop_assert!(map == Layered::new(whole));
                prop_assert!(map.changed.len() <= fold_at, "folded once past the share");
                for key in 0..48 {
                    prop_assert_eq!(map.get(&key), expected.get(&key));
                    let from: Vec<(u8, u32)> = map.iter_from(&key).map(|(&k, &v)| (k, v)).collect();
                    let whole_from: Vec<(u8, u32)> =
                        expected.range(key..).map(|(&k, &v)| (k, v)).collect();
                    prop_assert_eq!(from, whole_from);
                }
            }
        }
    }

    #[test]
    fn a_map_nothing_shares_is_written_whole_in_its_own_list() {
        let mut list: Vec<(u32, u32)> = (0..1000).map(|k| (2 * k, 7)).collect();
        list.reserve(8);
        let mut map = Layered::new(list);
        let at = map.base.as_ptr();
        // Set, removed and new keys, past the fold: written whole, in the same list.
        map.patch_folding_at([(4, Some(8)), (6, None), (7, Some(9)), (5000, Some(1))], 2);
        assert!(map.changed.is_empty(), "folded");
        assert_eq!(map.base.as_ptr(), at, "in place");
        assert_eq!(
            [map.get(&4), map.get(&6), map.get(&7), map.get(&5000)],
            [Some(&8), None, Some(&9), Some(&1)]
        );
        assert_eq!(map.len(), 1001);
        // A map that shares its list with a copy is written into a list of its own.
        let copy = map.clone();
        map.patch_folding_at([(0, None), (1, Some(3)), (2, Some(3))], 2);
        assert_ne!(map.base.as_ptr(), copy.base.as_ptr());
        assert_eq!([copy.get(&0), copy.get(&1)], [Some(&7), None]);
        assert_eq!([map.get(&0), map.get(&1)], [None, Some(&3)]);
    }

    #[test]
    fn a_patch_copies_the_changes_not_the_list() {
        let before: Layered<u32, u32> = (0..1000).map(|k| (k, 7)).collect();
        let after = before.patched([(3, Some(8)), (2000, Some(9)), (4, None)]);
        assert!(Arc::ptr_eq(&before.base, &after.base), "the base is shared");
        assert_eq!(after.changed.len(), 3);
        assert_eq!(
            [after.get(&3), after.get(&4), after.get(&2000)],
            [Some(&8), None, Some(&9)]
        );
        assert_eq!(after.len(), 1000);
        // A key set back to its base value leaves the changes.
        let back = after.patched([(3, Some(7))]);
        assert_eq!(back.changed.len(), 2);
        assert!(!back.same(&after) && back.patched([]).changed.len() == 2);
    }
}
