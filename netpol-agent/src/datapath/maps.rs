//! Map synchronisation: the kernel maps are brought to the desired contents with the
//! fewest writes. Each map keeps a shadow of what the kernel holds (read back from the
//! kernel when the agent adopts pinned maps), so a sync costs O(changes) syscalls, not
//! O(map size).

use std::collections::BTreeMap;

use aya::Pod;
use std::os::fd::AsFd as _;

use aya::maps::{HashMap, IterableMap as _, LpmTrie, MapData, MapError, lpm_trie::Key};
use netpol_common::{Addr, EndpointInfo, PolicyKey, PolicyValue, ServicePort};

use netpol_compile::Lpm;
use netpol_compile::policy_maps::{Slot, from_policy, slot};

/// Counts of one sync, for logs and metrics.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SyncStats {
    pub inserted: usize,
    pub updated: usize,
    pub removed: usize,
}

impl SyncStats {
    pub fn writes(&self) -> usize {
        self.inserted + self.updated + self.removed
    }
}

impl std::ops::AddAssign for SyncStats {
    fn add_assign(&mut self, other: SyncStats) {
        self.inserted += other.inserted;
        self.updated += other.updated;
        self.removed += other.removed;
    }
}

/// What a sync has to write to a map.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Work<'a, K> {
    /// Nothing: the kernel holds the desired contents.
    Nothing,
    /// The entries of these keys only (sorted); the kernel holds the rest.
    Keys(&'a [K]),
    /// Every entry, compared with what the kernel holds.
    Whole,
}

/// One BPF map with the kernel-side operations the syncer needs.
pub trait KernelMap {
    type Key: Ord + Copy;
    type Value: PartialEq + Copy;
    /// What the shadow keeps of an entry: its value, and whatever else the map needs to
    /// find it again (PEERS: the slot; [`Plain`] otherwise).
    type Stored: Copy;
    fn value(stored: &Self::Stored) -> &Self::Value;
    /// Writes every entry (key, value, what the shadow had), in as few system calls as
    /// the map allows; returns what each left, in order.
    fn put_many(&mut self, entries: &[Write<Self>]) -> Result<Vec<Self::Stored>, MapError>;
    /// Removes every entry; keys the kernel lacks are no error.
    fn delete_many(&mut self, entries: &[(Self::Key, Self::Stored)]) -> Result<(), MapError>;
    fn read_all(&self) -> Result<BTreeMap<Self::Key, Self::Stored>, MapError>;
}

/// One entry for [`KernelMap::put_many`]: key, value, and what the shadow had.
pub type Write<M> = (
    <M as KernelMap>::Key,
    <M as KernelMap>::Value,
    Option<<M as KernelMap>::Stored>,
);

/// A map whose shadow keeps the value alone.
pub trait Plain {
    type Key: Ord + Copy;
    type Value: PartialEq + Copy;
    /// Every entry written, in one system call.
    fn put_all(&mut self, entries: &[(Self::Key, Self::Value)]) -> Result<(), MapError>;
    /// Every key removed, in as few system calls as missing keys allow (they are no
    /// error).
    fn delete_all(&mut self, keys: &[Self::Key]) -> Result<(), MapError>;
    fn read_all(&self) -> Result<BTreeMap<Self::Key, Self::Value>, MapError>;
}

impl<M: Plain> KernelMap for M {
    type Key = M::Key;
    type Value = M::Value;
    type Stored = M::Value;
    fn value(stored: &M::Value) -> &M::Value {
        stored
    }
    fn put_many(&mut self, entries: &[Write<Self>]) -> Result<Vec<M::Value>, MapError> {
        let entries: Vec<(M::Key, M::Value)> = entries
            .iter()
            .map(|&(key, value, _)| (key, value))
            .collect();
        self.put_all(&entries)?;
        Ok(entries.into_iter().map(|(_, value)| value).collect())
    }
    fn delete_many(&mut self, entries: &[(M::Key, M::Value)]) -> Result<(), MapError> {
        let keys: Vec<M::Key> = entries.iter().map(|&(key, _)| key).collect();
        self.delete_all(&keys)
    }
    fn read_all(&self) -> Result<BTreeMap<M::Key, M::Value>, MapError> {
        Plain::read_all(self)
    }
}

impl<K: Pod + Ord, V: Pod + PartialEq> Plain for HashMap<MapData, K, V> {
    type Key = K;
    type Value = V;
    fn put_all(&mut self, entries: &[(K, V)]) -> Result<(), MapError> {
        let (keys, values): (Vec<K>, Vec<V>) = entries.iter().copied().unzip();
        super::batch::update(self.map().fd().as_fd(), &keys, &values)
    }
    fn delete_all(&mut self, keys: &[K]) -> Result<(), MapError> {
        super::batch::delete(self.map().fd().as_fd(), keys)
    }
    fn read_all(&self) -> Result<BTreeMap<K, V>, MapError> {
        self.iter().collect()
    }
}

impl<K: Pod + Ord, V: Pod + PartialEq> Plain for LpmTrie<MapData, K, V> {
    type Key = Lpm<K>;
    type Value = V;
    fn put_all(&mut self, entries: &[(Lpm<K>, V)]) -> Result<(), MapError> {
        let (keys, values): (Vec<Key<K>>, Vec<V>) = entries
            .iter()
            .map(|(key, value)| (Key::new(key.prefix_len, key.data), *value))
            .unzip();
        super::batch::update(self.map().fd().as_fd(), &keys, &values)
    }
    fn delete_all(&mut self, keys: &[Lpm<K>]) -> Result<(), MapError> {
        let keys: Vec<Key<K>> = keys
            .iter()
            .map(|key| Key::new(key.prefix_len, key.data))
            .collect();
        super::batch::delete(self.map().fd().as_fd(), &keys)
    }
    fn read_all(&self) -> Result<BTreeMap<Lpm<K>, V>, MapError> {
        self.iter()
            .map(|entry| {
                entry.map(|(key, value)| {
                    (
                        Lpm {
                            prefix_len: key.prefix_len(),
                            data: key.data(),
                        },
                        value,
                    )
                })
            })
            .collect()
    }
}

/// A kernel map plus the shadow of its contents.
pub struct Synced<M: KernelMap> {
    pub name: &'static str,
    map: M,
    shadow: BTreeMap<M::Key, M::Stored>,
}

impl<M: KernelMap> Synced<M> {
    /// Adopts the map, reading what the kernel holds now (a pinned map may carry the
    /// previous agent's state).
    pub fn adopt(name: &'static str, map: M) -> Result<Self, MapError> {
        let shadow = map.read_all()?;
        Ok(Synced { name, map, shadow })
    }

    pub fn len(&self) -> usize {
        self.shadow.len()
    }

    pub fn is_empty(&self) -> bool {
        self.shadow.is_empty()
    }

    pub fn contents(&self) -> &BTreeMap<M::Key, M::Stored> {
        &self.shadow
    }

    /// Inserts and updates entries so that every desired entry is in the kernel.
    /// Stale entries stay until [`Synced::remove_stale`]: callers order the two phases
    /// across maps so that no packet sees a state that is more open than either the old
    /// or the new one.
    pub fn upsert(&mut self, desired: &BTreeMap<M::Key, M::Value>) -> Result<SyncStats, MapError> {
        self.upsert_work(desired, Work::Whole)
    }

    /// Removes entries that are not desired.
    pub fn remove_stale(
        &mut self,
        desired: &BTreeMap<M::Key, M::Value>,
    ) -> Result<SyncStats, MapError> {
        self.remove_work(desired, Work::Whole)
    }

    /// After a failed write, of which the kernel may have taken part (a batch stops at
    /// the first entry it cannot write): the shadow is what the kernel holds again, so
    /// that no entry the kernel took is forgotten (a stale allowing entry would stay).
    /// Returns `error`.
    fn reread(&mut self, error: MapError) -> MapError {
        match self.map.read_all() {
            Ok(shadow) => self.shadow = shadow,
            Err(reading) => tracing::warn!(
                map = self.name,
                error = %reading,
                "could not read a map back after a failed write"
            ),
        }
        error
    }

    /// [`Synced::upsert`] of what `work` names: nothing, the entries of its keys (the
    /// shadow holds `desired` but for them), or every entry.
    ///
    /// The entries to write go to the map [`WRITE_SHARE`] at a time, as the walk finds
    /// them, not in one list of every entry: the first write of IPCACHE at 150,000 pods
    /// held some 25 MiB of lists at once (the writes, what each left, the keys and
    /// values apart for the system call). The shadow takes what was written after the
    /// walk (a map's first write: each share as it is written); a write that fails reads
    /// the shadow back from the kernel, as before.
    pub fn upsert_work(
        &mut self,
        desired: &BTreeMap<M::Key, M::Value>,
        work: Work<'_, M::Key>,
    ) -> Result<SyncStats, MapError> {
        let Synced { map, shadow, .. } = self;
        // A map's first write builds its shadow from the shares as they are written:
        // kept in a list first, IPCACHE's 190,000 entries at 150,000 pods were two lists
        // of every entry (the written and the new, 16 MiB) beside the shadow being built.
        let mut writes = Writes {
            shadow: shadow.is_empty().then(BTreeMap::new),
            ..Writes::default()
        };
        match walked(work, desired.len()) {
            Work::Nothing => {}
            Work::Keys(keys) => {
                for key in keys {
                    if let Some(want) = desired.get(key) {
                        writes.stage(map, *key, want, shadow.get(key));
                    }
                }
            }
            // One ordered walk of both (not a lookup per entry): the shadow and the
            // desired contents are sorted by the same keys.
            Work::Whole => join(desired, shadow, |want, have| {
                if let Some((key, want)) = want {
                    writes.stage(map, *key, want, have.map(|(_, have)| have));
                }
            }),
        }
        writes.flush(map);
        let Writes {
            written,
            shadow,
            failed,
            stats,
            ..
        } = writes;
        if let Some(error) = failed {
            return Err(self.reread(error));
        }
        if let Some(shadow) = shadow {
            self.shadow = shadow;
            return Ok(stats);
        }
        if written.len() * WALK_SHARE <= self.shadow.len() {
            for (key, stored) in written {
                self.shadow.insert(key, stored);
            }
            return Ok(stats);
        }
        // Many: the entries the shadow has are set in one ordered walk of it (the
        // written keys are in key order), the new ones inserted after.
        let mut new = Vec::new();
        let mut held = self.shadow.iter_mut().peekable();
        for (key, stored) in written {
            while held.next_if(|(have, _)| **have < key).is_some() {}
            match held.next_if(|(have, _)| **have == key) {
                Some((_, slot)) => *slot = stored,
                None => new.push((key, stored)),
            }
        }
        if new.len() * WALK_SHARE <= self.shadow.len() {
            self.shadow.extend(new);
        } else {
            // Many new keys (a map's first write): the shadow is built again from both
            // in one sorted pass, which fills its nodes; inserted in key order, they
            // would be left half empty (IPCACHE's shadow: ~4 MiB more at 150,000 pods).
            let mut new: BTreeMap<M::Key, M::Stored> = new.into_iter().collect();
            self.shadow.append(&mut new);
        }
        Ok(stats)
    }

    /// [`Synced::remove_stale`] of what `work` names (see [`Synced::upsert_work`]).
    pub fn remove_work(
        &mut self,
        desired: &BTreeMap<M::Key, M::Value>,
        work: Work<'_, M::Key>,
    ) -> Result<SyncStats, MapError> {
        let stale: Vec<M::Key> = match walked(work, desired.len()) {
            Work::Nothing => Vec::new(),
            Work::Keys(keys) => keys
                .iter()
                .filter(|key| !desired.contains_key(key) && self.shadow.contains_key(key))
                .copied()
                .collect(),
            Work::Whole => absent_from(&self.shadow, desired)
                .into_iter()
                .copied()
                .collect(),
        };
        let stale: Vec<(M::Key, M::Stored)> = stale
            .into_iter()
            .filter_map(|key| Some((key, *self.shadow.get(&key)?)))
            .collect();
        self.map
            .delete_many(&stale)
            .map_err(|error| self.reread(error))?;
        for (key, _) in &stale {
            self.shadow.remove(key);
        }
        Ok(SyncStats {
            removed: stale.len(),
            ..SyncStats::default()
        })
    }
}

/// Entries handed to a map's [`KernelMap::put_many`] at a time by a sync.
pub const WRITE_SHARE: usize = 16_384;

/// The writes of one [`Synced::upsert_work`]: staged as the walk finds them and handed
/// to the map [`WRITE_SHARE`] at a time; what each left, in order; the first failure
/// (after which nothing more is written).
struct Writes<M: KernelMap> {
    pending: Vec<Write<M>>,
    /// What was written, in key order, for the shadow to take.
    written: Vec<(M::Key, M::Stored)>,
    /// The shadow of a map that held nothing, built as the shares are written.
    shadow: Option<BTreeMap<M::Key, M::Stored>>,
    failed: Option<MapError>,
    stats: SyncStats,
}

impl<M: KernelMap> Default for Writes<M> {
    fn default() -> Self {
        Writes {
            pending: Vec::new(),
            written: Vec::new(),
            shadow: None,
            failed: None,
            stats: SyncStats::default(),
        }
    }
}

impl<M: KernelMap> Writes<M> {
    /// Stages `key` when what the kernel has (`have`) is not `want`.
    fn stage(&mut self, map: &mut M, key: M::Key, want: &M::Value, have: Option<&M::Stored>) {
        if self.failed.is_some() {
            return;
        }
        match have {
            Some(have) if M::value(have) == want => return,
            Some(have) => {
                self.stats.updated += 1;
                self.pending.push((key, *want, Some(*have)));
            }
            None => {
                self.stats.inserted += 1;
                self.pending.push((key, *want, None));
            }
        }
        if self.pending.len() >= WRITE_SHARE {
            self.flush(map);
        }
    }

    /// Hands the staged writes to the map.
    fn flush(&mut self, map: &mut M) {
        if self.pending.is_empty() || self.failed.is_some() {
            return;
        }
        match map.put_many(&self.pending) {
            Ok(stored) => {
                let keys = self.pending.drain(..).map(|(key, _, _)| key);
                match &mut self.shadow {
                    // Each share's keys follow the last's: appended, the tree is built
                    // again full (nodes filled, none left half empty).
                    Some(shadow) => shadow.append(&mut keys.zip(stored).collect()),
                    None => self.written.extend(keys.zip(stored)),
                }
            }
            Err(error) => self.failed = Some(error),
        }
    }
}

/// A list of keys longer than one in this many of a map's entries is handled by one
/// ordered walk of the maps rather than a lookup per key (a renumbering of the peer
/// classes changes up to every address at once).
pub const WALK_SHARE: usize = 8;

/// `work`, or [`Work::Whole`] when it names too many of a map's `entries` keys to look
/// each up: comparing every entry in one walk writes the same entries (the keys it does
/// not name are the same in both).
pub fn walked<K>(work: Work<'_, K>, entries: usize) -> Work<'_, K> {
    match work {
        Work::Keys(keys) if keys.len() * WALK_SHARE > entries => Work::Whole,
        work => work,
    }
}

/// Walks two maps sorted by the same keys together, in key order: `f` gets each key's
/// entry in `a` and in `b` (at least one of them). O(|a| + |b|), sequential.
pub fn join<'a, 'b, K: Ord, A, B>(
    a: &'a BTreeMap<K, A>,
    b: &'b BTreeMap<K, B>,
    mut f: impl FnMut(Option<(&'a K, &'a A)>, Option<(&'b K, &'b B)>),
) {
    let (mut a, mut b) = (a.iter().peekable(), b.iter().peekable());
    loop {
        let order = match (a.peek(), b.peek()) {
            (None, None) => return,
            (Some(_), None) => std::cmp::Ordering::Less,
            (None, Some(_)) => std::cmp::Ordering::Greater,
            (Some((ka, _)), Some((kb, _))) => ka.cmp(kb),
        };
        match order {
            std::cmp::Ordering::Less => f(a.next(), None),
            std::cmp::Ordering::Greater => f(None, b.next()),
            std::cmp::Ordering::Equal => f(a.next(), b.next()),
        }
    }
}

/// The keys of `a` that `b` lacks, in order (one walk of both, see [`join`]).
pub fn absent_from<'a, K: Ord, A, B>(a: &'a BTreeMap<K, A>, b: &BTreeMap<K, B>) -> Vec<&'a K> {
    let mut out = Vec::new();
    join(a, b, |in_a, in_b| {
        if let (Some((key, _)), None) = (in_a, in_b) {
            out.push(key);
        }
    });
    out
}

pub type EndpointsMap = Synced<HashMap<MapData, Addr, EndpointInfo>>;
/// Host veth ifindex -> endpoint id.
pub type IfacesMap = Synced<HashMap<MapData, u32, u32>>;
pub type IpcacheMap = Synced<super::peers::PeerMaps>;
pub type PolicyMap = Synced<PolicyMaps>;

/// POLICY and POLICY_RANGES as one map of allow entries (the compiler's view): each
/// entry is written to the map its kind belongs in (`netpol_compile::policy_maps`).
pub struct PolicyMaps {
    pub exact: HashMap<MapData, PolicyKey, PolicyValue>,
    pub ranges: LpmTrie<MapData, PolicyKey, PolicyValue>,
}

impl Plain for PolicyMaps {
    type Key = Lpm<PolicyKey>;
    type Value = PolicyValue;
    fn put_all(&mut self, entries: &[(Lpm<PolicyKey>, PolicyValue)]) -> Result<(), MapError> {
        let (mut exact, mut ranges) = (Vec::new(), Vec::new());
        for (key, value) in entries {
            match slot(key) {
                Slot::Policy(key) => exact.push((key, *value)),
                Slot::Ranges(key) => ranges.push((key, *value)),
            }
        }
        self.ranges.put_all(&ranges)?;
        self.exact.put_all(&exact)
    }
    fn delete_all(&mut self, keys: &[Lpm<PolicyKey>]) -> Result<(), MapError> {
        let (mut exact, mut ranges) = (Vec::new(), Vec::new());
        for key in keys {
            match slot(key) {
                Slot::Policy(key) => exact.push(key),
                Slot::Ranges(key) => ranges.push(key),
            }
        }
        self.ranges.delete_all(&ranges)?;
        self.exact.delete_all(&exact)
    }
    fn read_all(&self) -> Result<BTreeMap<Lpm<PolicyKey>, PolicyValue>, MapError> {
        let mut all = Plain::read_all(&self.ranges)?;
        for (key, value) in Plain::read_all(&self.exact)? {
            all.insert(from_policy(key), value);
        }
        Ok(all)
    }
}
/// Ports kube-proxy translates on node addresses -> unused (1).
pub type NodePortsMap = Synced<HashMap<MapData, ServicePort, u32>>;

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// A map in memory that takes each batch in order, records its size, and refuses
    /// the entry numbered `refuse` (counted over every entry it was given), keeping
    /// those before it, as the kernel's batch update does.
    #[derive(Default)]
    struct Recording {
        kernel: BTreeMap<u32, u32>,
        batches: Vec<usize>,
        given: usize,
        refuse: Option<usize>,
    }

    impl Plain for Recording {
        type Key = u32;
        type Value = u32;
        fn put_all(&mut self, entries: &[(u32, u32)]) -> Result<(), MapError> {
            self.batches.push(entries.len());
            for &(key, value) in entries {
                if self.refuse == Some(self.given) {
                    return Err(MapError::OutOfBounds {
                        index: key,
                        max_entries: 0,
                    });
                }
                self.given += 1;
                self.kernel.insert(key, value);
            }
            Ok(())
        }
        fn delete_all(&mut self, keys: &[u32]) -> Result<(), MapError> {
            for key in keys {
                self.kernel.remove(key);
            }
            Ok(())
        }
        fn read_all(&self) -> Result<BTreeMap<u32, u32>, MapError> {
            Ok(self.kernel.clone())
        }
    }

    fn desired(n: u32) -> BTreeMap<u32, u32> {
        (0..n).map(|k| (k * 3, k % 7)).collect()
    }

    #[test]
    fn a_long_write_goes_to_the_map_a_share_at_a_time_and_the_shadow_holds_it_all() {
        let mut synced = Synced::adopt("test", Recording::default()).unwrap();
        let want = desired(40_000);
        let stats = synced.upsert(&want).unwrap();
        assert_eq!(stats.inserted, 40_000);
        assert_eq!(
            synced.map.batches,
            [WRITE_SHARE, WRITE_SHARE, 40_000 - 2 * WRITE_SHARE]
        );
        assert_eq!(synced.contents(), &want);
        assert_eq!(synced.map.kernel, want);
        // The same again: nothing to write.
        synced.map.batches.clear();
        assert_eq!(synced.upsert(&want).unwrap().writes(), 0);
        assert!(synced.map.batches.is_empty());
    }

    #[test]
    fn a_write_refused_partway_leaves_the_shadow_as_the_kernel_has_it() {
        let refused_at = WRITE_SHARE + 1_000;
        let recording = Recording {
            refuse: Some(refused_at),
            ..Recording::default()
        };
        let mut synced = Synced::adopt("test", recording).unwrap();
        let want = desired(40_000);
        assert!(synced.upsert(&want).is_err());
        assert_eq!(
            synced.map.batches.len(),
            2,
            "nothing written after the failure"
        );
        assert_eq!(synced.map.kernel.len(), refused_at);
        assert_eq!(
            synced.contents(),
            &synced.map.kernel,
            "the shadow read back"
        );
        // The next sync writes what the kernel lacks, and only that.
        synced.map.refuse = None;
        let stats = synced.upsert(&want).unwrap();
        assert_eq!(stats.inserted, 40_000 - refused_at);
        assert_eq!(synced.contents(), &want);
        assert_eq!(synced.map.kernel, want);
    }

    proptest! {
        /// The walk meets every key of either map once, in order, with its values,
        /// as looking each key up would.
        #[test]
        fn a_join_meets_each_key_once_in_order_with_its_values(
            a in prop::collection::btree_map(0u16..64, 0u8..4, 0..40),
            b in prop::collection::btree_map(0u16..64, 0u8..4, 0..40),
        ) {
            let mut met = Vec::new();
            join(&a, &b, |x, y| {
                let key = x.map(|(k, _)| *k).or(y.map(|(k, _)| *k)).expect("a key");
                if let (Some((ka, _)), Some((kb, _))) = (x, y) {
                    assert_eq!(ka, kb);
                }
                met.push((key, x.map(|(_, v)| *v), y.map(|(_, v)| *v)));
            });
            let mut keys: Vec<u16> = a.keys().chain(b.keys()).copied().collect();
            keys.sort();
            keys.dedup();
            let expected: Vec<_> = keys
                .into_iter()
                .map(|k| (k, a.get(&k).copied(), b.get(&k).copied()))
                .collect();
            prop_assert_eq!(met, expected);
            let absent: Vec<u16> = absent_from(&a, &b).into_iter().copied().collect();
            let naive: Vec<u16> = a.keys().filter(|k| !b.contains_key(k)).copied().collect();
            prop_assert_eq!(absent, naive);
        }
    }
}
