//! The identity number of every IPCACHE key, as the allocations keep it between
//! compiles: a shared base list and the keys changed since.
//!
//! 150,000 pods have some 190,000 keys (4.5 MB as a sorted list). A change that moves a
//! few keys to another identity used to copy the whole list for the next allocations (a
//! tenth of a change's compile at that size); now it copies the changes made since the
//! list was last written whole, and writes it whole once they are many.

use std::cmp::Ordering;
use std::collections::BTreeMap;
use std::sync::Arc;

use netpol_common::Addr;

use crate::lpm::Lpm;

/// The changes kept beside the base list before it is written whole: one per this many
/// keys of the base (and [`FOLD_MIN`] at least). Each patch copies the changes
/// (a `BTreeMap` clone), each fold the list: a share of 1/64 keeps both to about a
/// sixty-fourth of the list's size per change.
const FOLD_SHARE: usize = 64;
const FOLD_MIN: usize = 256;

/// Dynamic identity number of every key of a dynamic identity (world keys are absent),
/// sorted by key. Equal when they hold the same numbers, however split.
#[derive(Clone, Debug, Default)]
pub(crate) struct Addresses {
    /// Sorted by key; shared with the allocations that wrote it.
    base: Arc<Vec<(Lpm<Addr>, u32)>>,
    /// Keys whose number differs from `base`'s: the number now, `None` when the key has
    /// none (gone, or the world's). Shared while no key moves.
    changed: Arc<BTreeMap<Lpm<Addr>, Option<u32>>>,
}

impl Addresses {
    /// Every key in `sorted` (sorted by key, without repeats).
    pub(crate) fn new(sorted: Vec<(Lpm<Addr>, u32)>) -> Self {
        debug_assert!(sorted.is_sorted_by(|(a, _), (b, _)| a < b));
        Addresses {
            base: Arc::new(sorted),
            changed: Arc::default(),
        }
    }

    /// The number of `key`.
    pub(crate) fn get(&self, key: &Lpm<Addr>) -> Option<u32> {
        match self.changed.get(key) {
            Some(&now) => now,
            None => self.in_base(key),
        }
    }

    fn in_base(&self, key: &Lpm<Addr>) -> Option<u32> {
        let at = self.base.binary_search_by_key(key, |&(k, _)| k);
        at.ok().map(|i| self.base[i].1)
    }

    /// Every key and its number, in key order.
    pub(crate) fn iter(&self) -> impl Iterator<Item = (Lpm<Addr>, u32)> + '_ {
        let mut base = self.base.iter().copied().peekable();
        let mut changed = self.changed.iter().map(|(&k, &n)| (k, n)).peekable();
        std::iter::from_fn(move || {
            loop {
                let order = match (base.peek(), changed.peek()) {
                    (None, None) => return None,
                    (Some(_), None) => Ordering::Less,
                    (None, Some(_)) => Ordering::Greater,
                    (Some((b, _)), Some((c, _))) => b.cmp(c),
                };
                let (key, number) = match order {
                    Ordering::Less => return base.next(),
                    Ordering::Equal => {
                        base.next();
                        changed.next()?
                    }
                    Ordering::Greater => changed.next()?,
                };
                if let Some(number) = number {
                    return Some((key, number));
                }
            }
        })
    }

    /// These numbers with each key of `changes` set to its number now (`None`: none).
    pub(crate) fn patched(
        &self,
        changes: impl IntoIterator<Item = (Lpm<Addr>, Option<u32>)>,
    ) -> Addresses {
        self.patched_folding_at(changes, (self.base.len() / FOLD_SHARE).max(FOLD_MIN))
    }

    /// [`Addresses::patched`], the list written whole once more than `fold_at` keys
    /// differ from the base.
    fn patched_folding_at(
        &self,
        changes: impl IntoIterator<Item = (Lpm<Addr>, Option<u32>)>,
        fold_at: usize,
    ) -> Addresses {
        let mut changed = BTreeMap::clone(&self.changed);
        for (key, now) in changes {
            if self.in_base(&key) == now {
                changed.remove(&key);
            } else {
                changed.insert(key, now);
            }
        }
        let patched = Addresses {
            base: Arc::clone(&self.base),
            changed: Arc::new(changed),
        };
        if patched.changed.len() <= fold_at {
            return patched;
        }
        Addresses::new(patched.iter().collect())
    }
}

impl PartialEq for Addresses {
    fn eq(&self, other: &Self) -> bool {
        (Arc::ptr_eq(&self.base, &other.base) && Arc::ptr_eq(&self.changed, &other.changed))
            || self.iter().eq(other.iter())
    }
}

impl Eq for Addresses {}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn key(i: u8) -> Lpm<Addr> {
        crate::lpm::host_key(std::net::IpAddr::from([10, 0, 0, i]))
    }

    proptest! {
        /// A chain of patches, folded early or late, holds what the list rewritten whole
        /// after every change holds.
        #[test]
        fn patched_addresses_hold_what_a_list_rewritten_whole_holds(
            first in prop::collection::btree_map(0u8..48, 1u32..6, 0..32),
            steps in prop::collection::vec(
                prop::collection::vec((0u8..48, prop::option::of(1u32..6)), 0..6),
                1..24,
            ),
            fold_at in 0usize..12,
        ) {
            let mut expected: BTreeMap<u8, u32> = first.clone();
            let mut addresses = Addresses::new(first.iter().map(|(&i, &n)| (key(i), n)).collect());
            for step in steps {
                let changes: Vec<(Lpm<Addr>, Option<u32>)> =
                    step.iter().map(|&(i, n)| (key(i), n)).collect();
                addresses = addresses.patched_folding_at(changes, fold_at);
                for (i, n) in step {
                    match n {
                        Some(n) => expected.insert(i, n),
                        None => expected.remove(&i),
                    };
                }
                let whole: Vec<(Lpm<Addr>, u32)> = expected.iter().map(|(&i, &n)| (key(i), n)).collect();
                prop_assert_eq!(addresses.iter().collect::<Vec<_>>(), whole.clone());
                prop_assert!(addresses == Addresses::new(whole));
                prop_assert!(addresses.changed.len() <= fold_at, "folded once past the share");
                for i in 0..48 {
                    prop_assert_eq!(addresses.get(&key(i)), expected.get(&i).copied());
                }
            }
        }
    }

    #[test]
    fn a_patch_copies_the_changes_not_the_list() {
        let list: Vec<(Lpm<Addr>, u32)> = (0..200).map(|i| (key(i), 7)).collect();
        let before = Addresses::new(list);
        let after = before.patched([(key(3), Some(8)), (key(250), Some(9)), (key(4), None)]);
        assert!(Arc::ptr_eq(&before.base, &after.base), "the base is shared");
        assert_eq!(after.changed.len(), 3);
        assert_eq!(
            [after.get(&key(3)), after.get(&key(4)), after.get(&key(250))],
            [Some(8), None, Some(9)]
        );
        // Moving a key back to its base number drops it from the changes.
        let back = after.patched([(key(3), Some(7))]);
        assert_eq!(back.changed.len(), 2);
        assert_eq!(back.get(&key(3)), Some(7));
    }
}
