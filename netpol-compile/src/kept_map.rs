//! [`KeptMap`]: a compiled map that the compiler keeps from one compile to the next,
//! with a version naming its contents and the keys by which it differs from the version
//! it was made from, so that the datapath writes what changed without comparing every
//! entry.

use std::collections::BTreeMap;
use std::fmt;
use std::ops::Deref;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

/// Versions handed out in this process; 0 names the empty map.
static VERSIONS: AtomicU64 = AtomicU64::new(1);

/// Changes adding or removing more than one key in this many of a map's are made by
/// building the map again.
const WALK_SHARE: usize = 8;

fn next_version() -> u64 {
    VERSIONS.fetch_add(1, Ordering::Relaxed)
}

/// A map's contents, shared (not copied) with the compiler's memo and with the results
/// that hold the same contents, together with:
///
/// - its **version**: two maps with the same version hold the same entries (versions are
///   unique within the process; 0 is the empty map's), so whoever wrote one version whole
///   knows, by the number alone, that a result with the same version needs no write;
/// - the **change** it was made by, when the compiler knows it: the version it was made
///   from and the keys whose entries differ (added, changed or removed), sorted; not
///   kept for a map made from the empty one (every key is new).
///
/// Results compare by contents: how a map was made says nothing about what it holds.
#[derive(Clone)]
pub struct KeptMap<K, V> {
    map: Arc<BTreeMap<K, V>>,
    version: u64,
    changed: Option<(u64, Arc<[K]>)>,
}

impl<K, V> Default for KeptMap<K, V> {
    fn default() -> Self {
        KeptMap {
            map: Arc::default(),
            version: 0,
            changed: None,
        }
    }
}

impl<K: Ord + Copy, V: PartialEq + Copy> KeptMap<K, V> {
    /// The version naming these contents.
    pub fn version(&self) -> u64 {
        self.version
    }

    /// The keys whose entries differ between the map of `version` and this one (sorted),
    /// when known: `Some(&[])` when `version` is this one's.
    pub fn changes_since(&self, version: u64) -> Option<&[K]> {
        if version == self.version {
            return Some(&[]);
        }
        match &self.changed {
            Some((from, keys)) if *from == version => Some(keys),
            _ => None,
        }
    }

    /// The map holding `entries` (sorted by key, no key twice): this one when they are
    /// its entries; else its next version, made by the keys that differ (in place when
    /// nothing else holds the contents, which are otherwise copied first), or built anew
    /// from sorted entries when more than a quarter of them differ.
    pub fn update<I>(&mut self, entries: I) -> &Self
    where
        I: IntoIterator<Item = (K, V)>,
    {
        let entries = entries.into_iter();
        // From the empty map every entry is a change: the list is made to measure (grown
        // by doubling, IPCACHE's at 150,000 pods was 8 MiB where 6 hold it).
        let mut changes: Vec<(K, Option<V>)> = if self.map.is_empty() {
            Vec::with_capacity(entries.size_hint().0)
        } else {
            Vec::new()
        };
        let held = self.map.iter().map(|(&key, &value)| (key, value));
        differences(held, entries, &mut changes);
        self.commit(changes)
    }

    /// The map with the entries of `changes` (a key's value, `None` to remove it; a key
    /// named twice takes its last): this one when they are its entries already, else its
    /// next version (as [`KeptMap::update`] makes it).
    pub fn change<I>(&mut self, changes: I) -> &Self
    where
        I: IntoIterator<Item = (K, Option<V>)>,
    {
        let mut wanted: Vec<(K, Option<V>)> = changes.into_iter().collect();
        // Sorted, each key once with its last value (the sort is stable).
        wanted.sort_by_key(|&(key, _)| key);
        wanted.dedup_by(|later, earlier| {
            let same = later.0 == earlier.0;
            if same {
                *earlier = *later;
            }
            same
        });
        // What really changes: a lookup each when few, else one walk along the map.
        let changes = if wanted.len() < self.map.len() / 8 {
            wanted
                .into_iter()
                .filter(|(key, value)| self.map.get(key) != value.as_ref())
                .collect()
        } else {
            let mut held = self.map.iter().peekable();
            wanted
                .into_iter()
                .filter(|(key, value)| {
                    while held.next_if(|(k, _)| *k < key).is_some() {}
                    let old = held.peek().filter(|(k, _)| *k == key).map(|(_, v)| *v);
                    old != value.as_ref()
                })
                .collect()
        };
        self.commit(changes)
    }

    /// Makes the next version by `changes` (sorted, each a real change), if any.
    fn commit(&mut self, mut changes: Vec<(K, Option<V>)>) -> &Self {
        if changes.is_empty() {
            return self;
        }
        debug_assert!(changes.is_sorted_by_key(|(k, _)| *k));
        let before = std::mem::replace(&mut self.version, next_version());
        if self.map.is_empty() {
            // Made from the empty map, every change adds a key: the map is built from
            // them, and no list of them is kept (whoever writes it writes every entry;
            // IPCACHE's first compile at 150,000 pods: a 4 MiB list kept until the next
            // change, and two more copies of the entries while it was built).
            self.map = Arc::new(
                changes
                    .into_iter()
                    .filter_map(|(k, v)| Some((k, v?)))
                    .collect(),
            );
            self.changed = None;
            return self;
        }
        let keys: Arc<[K]> = changes.iter().map(|&(k, _)| k).collect();
        if changes.len() <= self.map.len() / 4 {
            Self::apply(Arc::make_mut(&mut self.map), &changes);
        } else if let Some(map) = Arc::get_mut(&mut self.map) {
            // Many, and nothing else holds the map: new values of keys it has are set in
            // one walk of it, with no second map beside it (IPCACHE renumbered at 150,000
            // pods: some 190,000 entries, and 13 MiB more at the peak of the compile when
            // it was built again); the keys that come or go (left in `changes`) are then
            // added and removed, or the map built again when they are many (so that its
            // nodes are full).
            Self::set_held(map, &mut changes);
            if changes.len() * WALK_SHARE <= map.len() {
                Self::apply(map, &changes);
            } else {
                *map = Self::merged(map, &changes);
            }
        } else {
            self.map = Arc::new(Self::merged(&self.map, &changes));
        }
        self.changed = Some((before, keys));
        self
    }

    /// Sets, adds and removes the entries of `changes`, one lookup each.
    fn apply(map: &mut BTreeMap<K, V>, changes: &[(K, Option<V>)]) {
        for &(key, value) in changes {
            match value {
                Some(value) => drop(map.insert(key, value)),
                None => drop(map.remove(&key)),
            }
        }
    }

    /// Sets the new values `changes` (sorted) gives keys `map` has, in one walk of it;
    /// leaves in `changes` the others (keys added or removed), in order.
    fn set_held(map: &mut BTreeMap<K, V>, changes: &mut Vec<(K, Option<V>)>) {
        let mut held = map.iter_mut().peekable();
        changes.retain(|&(key, value)| {
            while held.next_if(|(k, _)| **k < key).is_some() {}
            match (held.next_if(|(k, _)| **k == key), value) {
                (Some((_, slot)), Some(value)) => {
                    *slot = value;
                    false
                }
                _ => true,
            }
        });
    }

    /// `map` with `changes`, built from sorted entries: the kept ones and the changed
    /// ones merged.
    fn merged(map: &BTreeMap<K, V>, changes: &[(K, Option<V>)]) -> BTreeMap<K, V> {
        let mut all = Vec::with_capacity(map.len() + changes.len());
        let mut changed = changes.iter().peekable();
        for (&key, &value) in map {
            while let Some(&(k, v)) = changed.next_if(|(k, _)| *k < key) {
                all.extend(v.map(|v| (k, v)));
            }
            match changed.next_if(|(k, _)| *k == key) {
                Some(&(_, v)) => all.extend(v.map(|v| (key, v))),
                None => all.push((key, value)),
            }
        }
        all.extend(changed.filter_map(|&(k, v)| Some((k, v?))));
        all.into_iter().collect()
    }
}

impl<K: Ord, V> From<BTreeMap<K, V>> for KeptMap<K, V> {
    /// A map of its own: a new version, made from nothing known.
    fn from(map: BTreeMap<K, V>) -> Self {
        KeptMap {
            version: if map.is_empty() { 0 } else { next_version() },
            map: Arc::new(map),
            changed: None,
        }
    }
}

impl<K: Ord, V> FromIterator<(K, V)> for KeptMap<K, V> {
    fn from_iter<I: IntoIterator<Item = (K, V)>>(iter: I) -> Self {
        BTreeMap::from_iter(iter).into()
    }
}

impl<K, V> Deref for KeptMap<K, V> {
    type Target = BTreeMap<K, V>;

    fn deref(&self) -> &BTreeMap<K, V> {
        &self.map
    }
}

impl<'a, K, V> IntoIterator for &'a KeptMap<K, V> {
    type Item = (&'a K, &'a V);
    type IntoIter = std::collections::btree_map::Iter<'a, K, V>;

    fn into_iter(self) -> Self::IntoIter {
        self.map.iter()
    }
}

impl<K, V> AsRef<BTreeMap<K, V>> for KeptMap<K, V> {
    fn as_ref(&self) -> &BTreeMap<K, V> {
        &self.map
    }
}

impl<K: PartialEq, V: PartialEq> PartialEq for KeptMap<K, V> {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.map, &other.map) || self.map == other.map
    }
}

impl<K: Eq, V: Eq> Eq for KeptMap<K, V> {}

impl<K: fmt::Debug, V: fmt::Debug> fmt::Debug for KeptMap<K, V> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.map.fmt(f)
    }
}

/// Adds to `out` the changes that make `old` into `new` (both sorted by key, no key
/// twice): `None` for a key only `old` has, the new value for one that is new or whose
/// value differs.
pub(crate) fn differences<K: Ord + Copy, V: PartialEq + Copy>(
    old: impl IntoIterator<Item = (K, V)>,
    new: impl IntoIterator<Item = (K, V)>,
    out: &mut Vec<(K, Option<V>)>,
) {
    let mut old = old.into_iter().peekable();
    for (key, value) in new {
        while let Some((gone, _)) = old.next_if(|(k, _)| *k < key) {
            out.push((gone, None));
        }
        match old.next_if(|(k, _)| *k == key) {
            Some((_, was)) if was == value => {}
            _ => out.push((key, Some(value))),
        }
    }
    out.extend(old.map(|(gone, _)| (gone, None)));
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entries(list: &[(u32, u32)]) -> Vec<(u32, u32)> {
        list.to_vec()
    }

    #[test]
    fn the_same_entries_keep_the_version_and_the_contents_themselves() {
        let mut kept = KeptMap::default();
        kept.update(entries(&[(1, 10), (2, 20)]));
        let before = kept.clone();
        kept.update(entries(&[(1, 10), (2, 20)]));
        assert_eq!(kept.version(), before.version());
        assert!(Arc::ptr_eq(&kept.map, &before.map));
        assert_eq!(kept.changes_since(before.version()), Some(&[][..]));
    }

    #[test]
    fn a_new_version_names_exactly_the_keys_added_changed_and_removed() {
        let big: Vec<(u32, u32)> = (0..100).map(|k| (k * 2, k)).collect();
        let mut kept = KeptMap::default();
        kept.update(big.clone());
        let first = kept.version();
        let mut next = big.clone();
        next[3].1 = 1000; // key 6 changed
        next.remove(10); // key 20 removed
        next.insert(1, (1, 1)); // key 1 added between 0 and 2
        next.push((1001, 5)); // key 1001 added after everything
        next.remove(0); // key 0 removed, ahead of everything
        kept.update(next.clone());
        assert_ne!(kept.version(), first);
        assert_eq!(kept.changes_since(first), Some(&[0, 1, 6, 20, 1001][..]));
        assert_eq!(*kept, next.into_iter().collect::<BTreeMap<_, _>>());
        // Only from the version it was made from.
        assert_eq!(kept.changes_since(first + 1_000_000), None);
    }

    #[test]
    fn a_map_made_from_the_empty_one_keeps_no_list_of_its_keys() {
        let mut kept: KeptMap<u32, u32> = KeptMap::default();
        let empty = kept.version();
        kept.update(entries(&[(1, 10), (2, 20)]));
        assert_ne!(kept.version(), empty);
        assert_eq!(kept.changes_since(empty), None, "every key is new");
        let first = kept.version();
        kept.update(entries(&[(1, 10)]));
        assert_eq!(kept.changes_since(first), Some(&[2][..]));
    }

    #[test]
    fn contents_shared_with_a_result_are_copied_before_they_change() {
        let mut kept = KeptMap::default();
        kept.update((0..100).map(|k| (k, k)).collect::<Vec<_>>());
        let result = kept.clone();
        kept.update(
            (0..100)
                .map(|k| (k, if k == 7 { 0 } else { k }))
                .collect::<Vec<_>>(),
        );
        assert_eq!(result.get(&7), Some(&7), "the earlier result is unchanged");
        assert_eq!(kept.get(&7), Some(&0));
    }

    #[test]
    fn many_changes_build_the_map_again_with_the_same_contents() {
        let mut kept = KeptMap::default();
        kept.update((0..100).map(|k| (k, k)).collect::<Vec<_>>());
        let first = kept.version();
        let next: Vec<(u32, u32)> = (50..200).map(|k| (k, k + 1)).collect();
        kept.update(next.clone());
        assert_eq!(*kept, next.into_iter().collect::<BTreeMap<_, _>>());
        let changed = kept
            .changes_since(first)
            .expect("made from the first")
            .len();
        assert_eq!(changed, 200, "50 removed, 150 added or changed");
    }

    #[test]
    fn a_change_names_only_the_keys_whose_entries_it_really_changes() {
        for size in [4, 100] {
            let mut kept = KeptMap::default();
            kept.update((0..size).map(|k| (k, k)).collect::<Vec<_>>());
            let first = kept.version();
            // 1 removed and put back as it was, 2 removed, 3 changed, size + 1 added, a
            // key absent removed.
            let changes = [
                (1, None),
                (1, Some(1)),
                (2, None),
                (3, Some(30)),
                (size + 1, Some(0)),
                (size + 7, None),
            ];
            kept.change(changes);
            assert_eq!(kept.changes_since(first), Some(&[2, 3, size + 1][..]));
            let mut want: BTreeMap<u32, u32> = (0..size).map(|k| (k, k)).collect();
            want.remove(&2);
            want.insert(3, 30);
            want.insert(size + 1, 0);
            assert_eq!(*kept, want, "{size} entries");
            // Nothing that changes anything: the same version.
            let second = kept.version();
            kept.change([(3, Some(30)), (size + 7, None)]);
            assert_eq!(kept.version(), second);
        }
    }

    #[test]
    fn maps_compare_by_contents_whatever_their_versions() {
        let a: KeptMap<u32, u32> = [(1, 1)].into_iter().collect();
        let b: KeptMap<u32, u32> = [(1, 1)].into_iter().collect();
        assert_ne!(a.version(), b.version());
        assert_eq!(a, b);
    }

    #[test]
    fn an_endpoint_made_again_changes_the_map_by_the_entries_that_differ() {
        let old = [(1, 'a'), (2, 'b'), (4, 'd'), (6, 'f')];
        let new = [(0, 'z'), (2, 'b'), (4, 'x'), (5, 'e')];
        let mut out = Vec::new();
        differences(old, new, &mut out);
        assert_eq!(
            out,
            vec![
                (0, Some('z')),
                (1, None),
                (4, Some('x')),
                (5, Some('e')),
                (6, None)
            ]
        );
        out.clear();
        differences(new, new, &mut out);
        assert!(out.is_empty(), "the same entries change nothing");
        differences([], old, &mut out);
        assert_eq!(out.len(), old.len(), "an endpoint that had none adds all");
    }

    #[test]
    fn many_new_values_are_set_where_the_map_is_when_nothing_else_holds_it() {
        let mut kept = KeptMap::default();
        kept.update((0..1000).map(|k| (k, 0)).collect::<Vec<_>>());
        let first = kept.version();
        let at = Arc::as_ptr(&kept.map);
        // 600 renumbered, one added, one removed: no second map is built.
        let mut next: Vec<(u32, u32)> = (0..1000).map(|k| (k, u32::from(k < 600))).collect();
        next.remove(999);
        next.push((5000, 7));
        kept.update(next.clone());
        assert_eq!(*kept, next.into_iter().collect::<BTreeMap<_, _>>());
        assert_eq!(Arc::as_ptr(&kept.map), at, "set in place");
        assert_eq!(kept.changes_since(first).map(<[u32]>::len), Some(602));
    }

    #[test]
    fn many_new_values_leave_a_map_another_holds_as_it_was() {
        let mut kept = KeptMap::default();
        kept.update((0..1000).map(|k| (k, 0)).collect::<Vec<_>>());
        let result = kept.clone();
        kept.update((0..1000).map(|k| (k, 1)).collect::<Vec<_>>());
        assert!(
            result.values().all(|&v| v == 0),
            "the earlier result is unchanged"
        );
        assert!(kept.values().all(|&v| v == 1));
    }

    proptest::proptest! {
        /// However many entries a change sets, adds or removes, and whether another
        /// holds the map or not, the next version holds the map with the changes made
        /// one by one, and names exactly the keys whose entries differ.
        #[test]
        fn a_change_of_any_size_makes_the_map_the_changes_make_one_by_one(
            before in proptest::collection::btree_map(0u16..400, 0u8..4, 0..300),
            sets in proptest::collection::vec((0usize..300, 0u8..4), 0..300),
            others in proptest::collection::vec((0u16..400, proptest::option::of(0u8..4)), 0..40),
            shared: bool,
        ) {
            // New values of keys the map has (most of a renumbering), and any others.
            let keys: Vec<u16> = before.keys().copied().collect();
            let mut changes: Vec<(u16, Option<u8>)> = Vec::new();
            if !keys.is_empty() {
                changes.extend(sets.iter().map(|&(i, v)| (keys[i % keys.len()], Some(v))));
            }
            changes.extend(others);
            let mut kept = KeptMap::default();
            kept.update(before.clone());
            let first = kept.version();
            let other = shared.then(|| kept.clone());
            let mut expected = before.clone();
            for &(key, value) in &changes {
                match value {
                    Some(value) => expected.insert(key, value),
                    None => expected.remove(&key),
                };
            }
            kept.change(changes.clone());
            proptest::prop_assert_eq!(&*kept, &expected);
            let differ: Vec<u16> = before
                .keys()
                .chain(expected.keys())
                .copied()
                .collect::<std::collections::BTreeSet<u16>>()
                .into_iter()
                .filter(|key| before.get(key) != expected.get(key))
                .collect();
            let named = kept.changes_since(first).map(<[u16]>::to_vec);
            if before.is_empty() && !differ.is_empty() {
                // Made from the empty map: every key is new, and no list is kept.
                proptest::prop_assert_eq!(named, None);
            } else {
                proptest::prop_assert_eq!(named, Some(differ));
            }
            if let Some(other) = other {
                proptest::prop_assert_eq!(&*other, &before);
            }
        }
    }
}
