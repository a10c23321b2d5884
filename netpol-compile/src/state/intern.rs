//! Interning: pods of one Deployment carry the same labels, node name, phase and
//! container ports, so each distinct value is kept once and shared.
//!
//! An interner holds one strong reference per distinct value; values no pod holds any
//! more are dropped when the table has doubled since it was last swept, so a sweep costs
//! O(1) per intern call, amortised.

use std::borrow::Borrow;
use std::collections::HashSet;
use std::hash::Hash;
use std::sync::{Arc, LazyLock, Mutex};

use arcstr::ArcStr;

use super::pod::DeclaredPort;

/// Smallest table worth sweeping.
const FIRST_SWEEP: usize = 1024;

/// A handle to a shared value, whose holders can be counted.
pub(super) trait Shared: Clone + Eq + Hash {
    /// How many handles to the value there are (the table's own included).
    fn holders(&self) -> usize;
}

impl<T: ?Sized + Eq + Hash> Shared for Arc<T> {
    fn holders(&self) -> usize {
        Arc::strong_count(self)
    }
}

impl Shared for ArcStr {
    fn holders(&self) -> usize {
        // `None`: a literal, held by the program itself.
        ArcStr::strong_count(self).unwrap_or(usize::MAX)
    }
}

pub(super) struct Interner<H> {
    table: Mutex<Table<H>>,
}

struct Table<H> {
    values: HashSet<H>,
    sweep_at: usize,
}

impl<H: Shared> Interner<H> {
    fn new() -> Self {
        Interner {
            table: Mutex::new(Table {
                values: HashSet::new(),
                sweep_at: FIRST_SWEEP,
            }),
        }
    }

    /// The shared copy of a value equal to `key`, if one is held.
    fn get<Q>(&self, key: &Q) -> Option<H>
    where
        H: Borrow<Q>,
        Q: ?Sized + Eq + Hash,
    {
        self.lock().values.get(key).cloned()
    }

    /// `value`, or the shared copy of an equal one held already.
    fn insert(&self, value: H) -> H {
        let mut table = self.lock();
        if let Some(shared) = table.values.get(&value) {
            return shared.clone();
        }
        if table.values.len() >= table.sweep_at {
            table.values.retain(|v| v.holders() > 1);
            table.sweep_at = (table.values.len() * 2).max(FIRST_SWEEP);
        }
        table.values.insert(value.clone());
        value
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Table<H>> {
        // A poisoned table is still a valid table: every operation on it is complete.
        self.table
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Distinct values held (including some no pod holds any more, until a sweep).
    #[cfg(test)]
    pub(super) fn len(&self) -> usize {
        self.lock().values.len()
    }
}

/// A label: (key, value), each one thin pointer (a set of four labels is 80 bytes with
/// its counts, not 144: every pod of the bench has a set of its own).
pub(super) type Label = (ArcStr, ArcStr);

pub(super) static LABEL_SETS: LazyLock<Interner<Arc<[Label]>>> = LazyLock::new(Interner::new);
pub(super) static NAMES: LazyLock<Interner<ArcStr>> = LazyLock::new(Interner::new);
pub(super) static PORTS: LazyLock<Interner<Arc<[DeclaredPort]>>> = LazyLock::new(Interner::new);

/// The shared copy of a pod's label set (its strings interned already).
pub(super) fn label_set(pairs: Vec<Label>) -> Arc<[Label]> {
    LABEL_SETS
        .get(pairs.as_slice())
        .unwrap_or_else(|| LABEL_SETS.insert(Arc::from(pairs)))
}

/// The shared copy of a string: a node name, a phase, a label key or value.
pub(super) fn name(name: &str) -> ArcStr {
    NAMES
        .get(name)
        .unwrap_or_else(|| NAMES.insert(ArcStr::from(name)))
}

/// The shared copy of a pod's declared container ports.
pub(super) fn ports(ports: Vec<DeclaredPort>) -> Arc<[DeclaredPort]> {
    PORTS
        .get(ports.as_slice())
        .unwrap_or_else(|| PORTS.insert(Arc::from(ports)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn equal_values_share_one_copy_and_unheld_ones_are_swept() {
        let interner: Interner<ArcStr> = Interner::new();
        let intern = |name: &str| {
            interner
                .get(name)
                .unwrap_or_else(|| interner.insert(ArcStr::from(name)))
        };
        let a = intern("node-1");
        let b = intern("node-1");
        assert!(ArcStr::ptr_eq(&a, &b));
        for i in 0..FIRST_SWEEP * 3 {
            intern(&format!("gone-{i}"));
        }
        assert!(
            interner.len() <= FIRST_SWEEP * 2,
            "{} values kept",
            interner.len()
        );
        let c = intern("node-1");
        assert!(ArcStr::ptr_eq(&a, &c), "a held value survives the sweeps");
    }
}
