//! IPCACHE and PEERS as one map of peer prefixes (the compiler's view, prefix ->
//! [`PeerInfo`]). IPCACHE gives each prefix a slot, kept while the prefix is in it;
//! PEERS holds the slot's identity and flags, and the agent writes it through its own
//! mapping of the array. Moving a prefix to another identity is one store, not a
//! system call and a trie node: a change of the peer classes (a new pod selected by a
//! policy shape that was in force nowhere on this node) renumbers up to every pod
//! address of the cluster at once.
//!
//! A slot freed by a sync is handed out again by a later one, never by the sync that
//! freed it: a packet that read it from IPCACHE just before its prefix went may still
//! load it, and must find what the prefix had, not another prefix's identity. Removals
//! come after every write of a sync (`Datapath::write_maps`), so this holds by order,
//! but for one case: IPCACHE at its capacity, where the sync's second round admits the
//! addresses that the first left out into the room its removals made.

use std::collections::BTreeMap;
use std::os::fd::{AsFd as _, AsRawFd as _, OwnedFd};
use std::path::Path;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU64, Ordering};

use aya::maps::{LpmTrie, Map, MapData, MapError};
use aya::sys::SyscallError;
use netpol_common::{Addr, PeerInfo, PeerSlot, names};
use netpol_compile::Lpm;

use super::maps::{KernelMap, Plain as _, Write};

/// What the agent keeps of one prefix: what it resolves to, and where that is stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Peer {
    pub info: PeerInfo,
    pub slot: PeerSlot,
}

/// IPCACHE (prefix -> slot) and PEERS (slot -> [`PeerInfo`], mapped into the agent).
pub struct PeerMaps {
    trie: LpmTrie<MapData, Addr, PeerSlot>,
    peers: Mapped,
    /// Slots from here up to the capacity were never handed out.
    fresh: PeerSlot,
    /// Slots free to hand out.
    free: Vec<PeerSlot>,
}

impl PeerMaps {
    /// Adopts IPCACHE and PEERS as the kernel holds them ([`PeerMaps::recount`]).
    pub fn new(trie: LpmTrie<MapData, Addr, PeerSlot>, peers: &MapData) -> Result<Self, MapError> {
        let mut maps = PeerMaps {
            trie,
            peers: Mapped::new(peers, Access::Write)?,
            fresh: 0,
            free: Vec::new(),
        };
        maps.recount()?;
        Ok(maps)
    }

    /// What each prefix of IPCACHE pinned under `maps_dir` resolves to in PEERS, read
    /// without writing anything (tools, tests).
    pub fn read_pinned(maps_dir: &Path) -> Result<BTreeMap<Lpm<Addr>, PeerInfo>, MapError> {
        let trie: LpmTrie<MapData, Addr, PeerSlot> = LpmTrie::try_from(Map::LpmTrie(
            MapData::from_pin(maps_dir.join(names::IPCACHE))?,
        ))?;
        let mut peers = Mapped::new(
            &MapData::from_pin(maps_dir.join(names::PEERS))?,
            Access::Read,
        )?;
        // The whole array: a tool reads it once.
        peers.reach(PeerSlot::MAX)?;
        resolve(&trie, &peers).map(|entries| {
            entries
                .into_iter()
                .map(|(key, peer)| (key, peer.info))
                .collect()
        })
    }

    /// The free slots as IPCACHE has them: at adoption, and after a write that failed
    /// part of the way (the slots handed out for prefixes it did not take would be
    /// lost). A prefix whose slot is out of range or shared with another prefix (this
    /// agent writes no such thing; someone else might) is given a slot of its own with
    /// what it resolves to now, while slots last: freeing a shared slot with one of its
    /// prefixes would hand out a slot another prefix still names.
    fn recount(&mut self) -> Result<(), MapError> {
        let mut used = vec![false; self.peers.slots as usize];
        let mut misplaced = Vec::new();
        for entry in self.trie.iter() {
            let (key, slot) = entry?;
            match used.get_mut(slot as usize) {
                Some(taken @ false) => *taken = true,
                _ => misplaced.push((key, slot)),
            }
        }
        (self.fresh, self.free) = free_slots(&used);
        // Every slot in use is below `fresh`, a shared one too (an out-of-range one
        // resolves to nothing: the next sync writes what the prefix should resolve to).
        if let Some(last) = self.fresh.checked_sub(1) {
            self.peers.reach(last)?;
        }
        for (key, slot) in misplaced {
            let info = self.peers.load(slot).unwrap_or_default();
            let own = self.allocate()?;
            self.peers.store(own, info);
            self.trie.insert(&key, own, 0)?;
        }
        Ok(())
    }

    /// After a failed write: [`PeerMaps::recount`], returning the write's error.
    fn recounted(&mut self, error: MapError) -> MapError {
        if let Err(recounting) = self.recount() {
            tracing::warn!(error = %recounting, "could not recount the slots of PEERS");
        }
        error
    }

    fn allocate(&mut self) -> Result<PeerSlot, MapError> {
        if let Some(slot) = self.free.pop() {
            return Ok(slot);
        }
        if self.fresh < self.peers.slots {
            self.peers.reach(self.fresh)?;
            self.fresh += 1;
            return Ok(self.fresh - 1);
        }
        // The datapath admits no more prefixes than IPCACHE's capacity, PEERS's too.
        Err(MapError::OutOfBounds {
            index: self.fresh,
            max_entries: self.peers.slots,
        })
    }
}

impl KernelMap for PeerMaps {
    type Key = Lpm<Addr>;
    type Value = PeerInfo;
    type Stored = Peer;

    fn value(stored: &Peer) -> &PeerInfo {
        &stored.info
    }

    fn read_all(&self) -> Result<BTreeMap<Lpm<Addr>, Peer>, MapError> {
        resolve(&self.trie, &self.peers)
    }

    /// Stores for the prefixes IPCACHE has; slots, then IPCACHE in one batch, for the
    /// new ones.
    fn put_many(&mut self, entries: &[Write<Self>]) -> Result<Vec<Peer>, MapError> {
        let mut stored = Vec::with_capacity(entries.len());
        let mut new = Vec::new();
        for &(key, info, had) in entries {
            let slot = match had {
                Some(Peer { slot, .. }) => slot,
                None => {
                    let slot = self.allocate().map_err(|e| self.recounted(e))?;
                    new.push((key, slot));
                    slot
                }
            };
            self.peers.store(slot, info);
            stored.push(Peer { info, slot });
        }
        self.trie.put_all(&new).map_err(|e| self.recounted(e))?;
        Ok(stored)
    }

    fn delete_many(&mut self, entries: &[(Lpm<Addr>, Peer)]) -> Result<(), MapError> {
        let keys: Vec<Lpm<Addr>> = entries.iter().map(|&(key, _)| key).collect();
        self.trie.delete_all(&keys).map_err(|e| self.recounted(e))?;
        self.free.extend(entries.iter().map(|(_, peer)| peer.slot));
        Ok(())
    }
}

/// From which slots were used: the first never used, and the free ones below it.
fn free_slots(used: &[bool]) -> (PeerSlot, Vec<PeerSlot>) {
    let fresh = used
        .iter()
        .rposition(|&u| u)
        .map_or(0, |last| last as PeerSlot + 1);
    let free = (0..fresh).rev().filter(|&s| !used[s as usize]).collect();
    (fresh, free)
}

/// Every prefix of `trie` with its slot and what the slot holds.
fn resolve(
    trie: &LpmTrie<MapData, Addr, PeerSlot>,
    peers: &Mapped,
) -> Result<BTreeMap<Lpm<Addr>, Peer>, MapError> {
    trie.iter()
        .map(|entry| {
            let (key, slot) = entry?;
            let info = peers.load(slot).ok_or(MapError::OutOfBounds {
                index: slot,
                max_entries: peers.slots,
            })?;
            let key = Lpm {
                prefix_len: key.prefix_len(),
                data: key.data(),
            };
            Ok((key, Peer { info, slot }))
        })
        .collect()
}

/// How the agent maps PEERS.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Access {
    Read,
    Write,
}

/// PEERS mapped into the agent: one 8-byte word per slot, mapped as far as the slots in
/// use reach (a mapping's pages all count as the agent's memory from the start; the
/// capacity may be a million slots).
struct Mapped {
    fd: OwnedFd,
    access: Access,
    /// The map's slots (its capacity).
    slots: u32,
    /// The mapping of the first `mapped` slots, and its length in bytes.
    mapping: Option<(NonNull<AtomicU64>, usize)>,
    mapped: u32,
}

// SAFETY: the mapping is shared memory accessed only through atomics; it is owned by
// this value and unmapped once, when replaced or on drop.
unsafe impl Send for Mapped {}
unsafe impl Sync for Mapped {}

/// Slots the mapping grows by (64 KiB).
const MAPPED_CHUNK: u32 = 8192;

/// `BPF_F_MMAPABLE` (include/uapi/linux/bpf.h): PEERS is created with it.
pub(super) const MMAPABLE: u32 = 1 << 10;

impl Mapped {
    fn new(map: &MapData, access: Access) -> Result<Mapped, MapError> {
        let info = map.info()?;
        if info.value_size() as usize != size_of::<u64>() {
            return Err(MapError::InvalidValueSize {
                size: info.value_size() as usize,
                expected: size_of::<u64>(),
            });
        }
        if info.map_flags() & MMAPABLE == 0 {
            return Err(mmap_error(std::io::Error::other(
                "the map was not created mappable",
            )));
        }
        let fd = map.fd().as_fd().try_clone_to_owned().map_err(mmap_error)?;
        Ok(Mapped {
            fd,
            access,
            slots: info.max_entries(),
            mapping: None,
            mapped: 0,
        })
    }

    /// Maps at least the slots up to `slot` (within the capacity).
    fn reach(&mut self, slot: PeerSlot) -> Result<(), MapError> {
        if slot < self.mapped || self.mapped == self.slots {
            return Ok(());
        }
        let slots = (slot / MAPPED_CHUNK + 1)
            .saturating_mul(MAPPED_CHUNK)
            .min(self.slots);
        // SAFETY: sysconf has no preconditions.
        let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) }.max(4096) as usize;
        let bytes = (slots as usize * size_of::<u64>()).div_ceil(page) * page;
        // SAFETY: a new shared mapping of the start of the map's value area (array
        // values of 8 bytes are laid out back to back from offset 0; the kernel accepts
        // any length up to the whole area); nothing else refers to it.
        let address = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                bytes,
                match self.access {
                    Access::Read => libc::PROT_READ,
                    Access::Write => libc::PROT_READ | libc::PROT_WRITE,
                },
                libc::MAP_SHARED,
                self.fd.as_raw_fd(),
                0,
            )
        };
        if address == libc::MAP_FAILED {
            return Err(mmap_error(std::io::Error::last_os_error()));
        }
        let words = NonNull::new(address.cast::<AtomicU64>())
            .ok_or_else(|| mmap_error(std::io::Error::other("mapped at address 0")))?;
        self.unmap();
        self.mapping = Some((words, bytes));
        self.mapped = slots;
        Ok(())
    }

    fn unmap(&mut self) {
        if let Some((words, bytes)) = self.mapping.take() {
            // SAFETY: a mapping made by `reach`, unmapped once (taken out of `self`).
            unsafe { libc::munmap(words.as_ptr().cast(), bytes) };
        }
    }

    fn word(&self, slot: PeerSlot) -> Option<&AtomicU64> {
        let (words, _) = self.mapping?;
        // SAFETY: in bounds of the mapping, which lives as long as `self` (replaced only
        // through `&mut self`); the kernel aligns it to a page.
        (slot < self.mapped).then(|| unsafe { words.add(slot as usize).as_ref() })
    }

    fn load(&self, slot: PeerSlot) -> Option<PeerInfo> {
        self.word(slot)
            .map(|word| PeerInfo::from_word(word.load(Ordering::Acquire)))
    }

    fn store(&self, slot: PeerSlot, info: PeerInfo) {
        if let Some(word) = self.word(slot) {
            word.store(info.to_word(), Ordering::Release);
        }
    }
}

fn mmap_error(io_error: std::io::Error) -> MapError {
    MapError::SyscallError(SyscallError {
        call: "mmap",
        io_error,
    })
}

impl Drop for Mapped {
    fn drop(&mut self) {
        self.unmap();
    }
}
