//! Interning: pods of one Deployment carry the same labels, node name, phase and
//! container ports, so each distinct value is kept once and shared.
//!
//! An interner holds one strong reference per distinct value; values no pod holds any
//! more are dropped when the table has doubled since it was last swept, so a sweep costs
//! O(1) per intern call, amortised.

use std::collections::HashSet;
use std::hash::Hash;
use std::sync::{Arc, LazyLock, Mutex};

use super::pod::DeclaredPort;

/// Smallest table worth sweeping.
const FIRST_SWEEP: usize = 1024;

pub(super) struct Interner<T: ?Sized> {
    table: Mutex<Table<T>>,
}

struct Table<T: ?Sized> {
    values: HashSet<Arc<T>>,
    sweep_at: usize,
}

impl<T: ?Sized + Eq + Hash> Interner<T> {
    fn new() -> Self {
        Interner {
            table: Mutex::new(Table {
                values: HashSet::new(),
                sweep_at: FIRST_SWEEP,
            }),
        }
    }

    /// The shared copy of a value equal to `key`, if one is held.
    fn get<Q>(&self, key: &Q) -> Option<Arc<T>>
    where
        Arc<T>: std::borrow::Borrow<Q>,
        Q: ?Sized + Eq + Hash,
    {
        self.lock().values.get(key).cloned()
    }

    /// `value`, or the shared copy of an equal one held already.
    fn insert(&self, value: Arc<T>) -> Arc<T> {
        let mut table = self.lock();
        if let Some(shared) = table.values.get(&value) {
            return shared.clone();
        }
        if table.values.len() >= table.sweep_at {
            table.values.retain(|v| Arc::strong_count(v) > 1);
            table.sweep_at = (table.values.len() * 2).max(FIRST_SWEEP);
        }
        table.values.insert(value.clone());
        value
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Table<T>> {
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

/// A label: (key, value).
pub(super) type Label = (Arc<str>, Arc<str>);

pub(super) static LABEL_SETS: LazyLock<Interner<[Label]>> = LazyLock::new(Interner::new);
pub(super) static NAMES: LazyLock<Interner<str>> = LazyLock::new(Interner::new);
pub(super) static PORTS: LazyLock<Interner<[DeclaredPort]>> = LazyLock::new(Interner::new);

/// The shared copy of a pod's label set (its strings interned already).
pub(super) fn label_set(pairs: Vec<Label>) -> Arc<[Label]> {
    LABEL_SETS
        .get(pairs.as_slice())
        .unwrap_or_else(|| LABEL_SETS.insert(Arc::from(pairs)))
}

/// The shared copy of a string: a node name, a phase, a label key or value.
pub(super) fn name(name: &str) -> Arc<str> {
    NAMES
        .get(name)
        .unwrap_or_else(|| NAMES.insert(Arc::from(name)))
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
        let interner: Interner<str> = Interner::new();
        let intern = |name: &str| {
            interner
                .get(name)
                .unwrap_or_else(|| interner.insert(Arc::from(name)))
        };
        let a = intern("node-1");
        let b = intern("node-1");
        assert!(Arc::ptr_eq(&a, &b));
        for i in 0..FIRST_SWEEP * 3 {
            intern(&format!("gone-{i}"));
        }
        assert!(
            interner.len() <= FIRST_SWEEP * 2,
            "{} values kept",
            interner.len()
        );
        let c = intern("node-1");
        assert!(Arc::ptr_eq(&a, &c), "a held value survives the sweeps");
    }
}
