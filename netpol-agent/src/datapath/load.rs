//! Loading: the programs and maps of this build, adopted from their pins when an earlier
//! agent left them, after unpinning what an older build left in a layout this one cannot
//! use (the layout table, [`map_layouts`]).

use std::collections::BTreeMap;
use std::path::Path;

use aya::maps::{Array, HashMap, LpmTrie, MapData, MapError, PerCpuArray, RingBuf};
use aya::{Ebpf, EbpfLoader};
use netpol_common::{DatapathState, names};
use tracing::{info, warn};

use super::maps::{self, Synced};
use super::peers::PeerMaps;
use super::{Capacities, Datapath, Error, Result, clock, program};

/// The programs, built by `build.rs` from `netpol-ebpf`.
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/netpol"));

impl Datapath {
    /// Loads (or adopts, when pinned state exists under `dir`) the maps and programs.
    pub fn open(dir: &Path, capacities: &Capacities) -> Result<Self> {
        let bpffs = |path: &Path| {
            let path = path.to_path_buf();
            move |source| Error::Bpffs { path, source }
        };
        if OBJECT.is_empty() {
            return Err(Error::NoPrograms);
        }
        ensure_bpffs(dir)?;
        let maps_dir = dir.join("maps");
        let links_dir = dir.join("links");
        std::fs::create_dir_all(&maps_dir).map_err(bpffs(&maps_dir))?;
        std::fs::create_dir_all(&links_dir).map_err(bpffs(&links_dir))?;

        let mut loader = EbpfLoader::new();
        loader.default_map_pin_directory(&maps_dir);
        for (name, capacity) in [
            (names::ENDPOINTS, capacities.endpoints),
            (names::IPCACHE, capacities.ipcache),
            (names::PEERS, capacities.ipcache),
            (names::POLICY, capacities.policy),
            (names::POLICY_RANGES, capacities.policy_ranges),
            (names::CT4, capacities.conntrack),
            (names::CT6, capacities.conntrack),
        ] {
            if let Some(capacity) = capacity {
                loader.map_max_entries(name, capacity);
            }
        }
        // One IFACES entry per pod veth: never fewer than ENDPOINTS can hold.
        if let Some(endpoints) = capacities.endpoints {
            loader.map_max_entries(
                names::IFACES,
                endpoints.max(netpol_common::capacity::IFACES),
            );
        }
        unpin_incompatible_maps(&maps_dir);
        unpin_unpaired_peers(&maps_dir);
        let mut ebpf = loader.load(OBJECT)?;
        for name in [
            names::PROG_FROM_POD,
            names::PROG_TO_POD,
            names::PROG_LEAVE_NODE,
            names::PROG_JIFFIES,
        ] {
            program(&mut ebpf, name)?
                .load()
                .map_err(|source| Error::Program { name, source })?;
        }
        let jiffies_hz = clock::kernel_hz(program(&mut ebpf, names::PROG_JIFFIES)?)?;

        let endpoints = adopt(&mut ebpf, names::ENDPOINTS, HashMap::try_from)?;
        let ipcache = {
            let map_err = |name| move |source| Error::Map { name, source };
            let trie = LpmTrie::try_from(take_map(&mut ebpf, names::IPCACHE)?)
                .map_err(map_err(names::IPCACHE))?;
            let aya::maps::Map::Array(peers) = take_map(&mut ebpf, names::PEERS)? else {
                return Err(Error::MissingMap(names::PEERS));
            };
            let maps = PeerMaps::new(trie, &peers).map_err(map_err(names::PEERS))?;
            Synced::adopt(names::IPCACHE, maps).map_err(map_err(names::IPCACHE))?
        };
        let ifaces = adopt(&mut ebpf, names::IFACES, HashMap::try_from)?;
        let node_ports = adopt(&mut ebpf, names::NODE_PORTS, HashMap::try_from)?;
        let policy = {
            let map_err = |name| move |source| Error::Map { name, source };
            let exact = HashMap::try_from(take_map(&mut ebpf, names::POLICY)?)
                .map_err(map_err(names::POLICY))?;
            let ranges = LpmTrie::try_from(take_map(&mut ebpf, names::POLICY_RANGES)?)
                .map_err(map_err(names::POLICY_RANGES))?;
            Synced::adopt(names::POLICY, maps::PolicyMaps { exact, ranges })
                .map_err(map_err(names::POLICY))?
        };
        let counters = take_map(&mut ebpf, names::COUNTERS)?;
        let counters = PerCpuArray::try_from(counters).map_err(|source| Error::Map {
            name: names::COUNTERS,
            source,
        })?;
        let state = take_map(&mut ebpf, names::STATE)?;
        let state: Array<MapData, DatapathState> =
            Array::try_from(state).map_err(|source| Error::Map {
                name: names::STATE,
                source,
            })?;
        let DatapathState {
            generation,
            flags: state_flags,
            service_mark,
            ..
        } = state.get(&0, 0).map_err(|source| Error::Map {
            name: names::STATE,
            source,
        })?;
        let map_err = |name| move |source| Error::Map { name, source };
        let rule_counters = PerCpuArray::try_from(take_map(&mut ebpf, names::RULE_COUNTERS)?)
            .map_err(map_err(names::RULE_COUNTERS))?;
        let event_budget = PerCpuArray::try_from(take_map(&mut ebpf, names::EVENT_BUDGET)?)
            .map_err(map_err(names::EVENT_BUDGET))?;
        let events = RingBuf::try_from(take_map(&mut ebpf, names::EVENTS)?)
            .map_err(map_err(names::EVENTS))?;
        info!(
            dir = %dir.display(),
            generation,
            endpoints = endpoints.len(),
            ipcache = ipcache.len(),
            policy = policy.len(),
            jiffies_hz,
            "datapath loaded"
        );
        let mut datapath = Datapath {
            ebpf,
            dir: dir.to_path_buf(),
            endpoints,
            ifaces,
            node_ports,
            ipcache,
            policy,
            // Adopted maps are compared with the first compile's in full.
            policy_written: None,
            ipcache_written: None,
            counters,
            state,
            capacities: [
                capacities
                    .endpoints
                    .unwrap_or(netpol_common::capacity::ENDPOINTS),
                capacities
                    .ipcache
                    .unwrap_or(netpol_common::capacity::IPCACHE),
                capacities.policy.unwrap_or(netpol_common::capacity::POLICY),
                capacities
                    .policy_ranges
                    .unwrap_or(netpol_common::capacity::POLICY_RANGES),
                capacities.conntrack.unwrap_or(netpol_common::capacity::CT),
            ],
            rule_counters,
            counted_rules: Default::default(),
            event_budget,
            events: Some(events),
            generation,
            state_flags,
            attachments: BTreeMap::new(),
            exits: BTreeMap::new(),
            exit_interfaces: None,
            no_routes: false,
            pod_interface_prefixes: Vec::new(),
            refused_endpoints: Default::default(),
            port_peers: Default::default(),
            unfit_reported: Default::default(),
            jiffies_hz,
            // Kept from the pins (a restart never changes what live connections carry)
            // until the agent's configuration sets it.
            service_mark: if service_mark == 0 {
                netpol_common::SERVICE_MARK_DEFAULT
            } else {
                service_mark
            },
        };
        // Before anything is attached: conntrack times entries with it.
        datapath.write_state()?;
        Ok(datapath)
    }
}

/// Pins only work on bpffs: check the nearest existing ancestor of `dir`.
fn ensure_bpffs(dir: &Path) -> Result<()> {
    const BPF_FS_MAGIC: i64 = 0xcafe_4a11;
    let existing = dir
        .ancestors()
        .find(|p| p.exists())
        .unwrap_or(Path::new("/"));
    let on_bpffs = nix::sys::statfs::statfs(existing)
        .map(|fs| fs.filesystem_type().0 == BPF_FS_MAGIC)
        .unwrap_or(false);
    if on_bpffs {
        Ok(())
    } else {
        Err(Error::NotBpffs(dir.to_path_buf()))
    }
}

/// The layout of every map this build pins: (name, type, key size, value size).
pub fn map_layouts() -> [(&'static str, aya::maps::MapType, u32, u32); 14] {
    use aya::maps::MapType::{Array, Hash, LpmTrie, LruHash, PerCpuArray, RingBuf};
    use netpol_common as c;
    fn size<T>() -> u32 {
        std::mem::size_of::<T>() as u32
    }
    // LPM trie keys carry their prefix length first.
    let lpm = |data: u32| 4 + data;
    [
        (
            names::ENDPOINTS,
            Hash,
            size::<c::Addr>(),
            size::<c::EndpointInfo>(),
        ),
        (
            names::IPCACHE,
            LpmTrie,
            lpm(size::<c::Addr>()),
            size::<c::PeerSlot>(),
        ),
        (names::PEERS, Array, 4, size::<c::PeerInfo>()),
        (
            names::POLICY,
            Hash,
            size::<c::PolicyKey>(),
            size::<c::PolicyValue>(),
        ),
        (
            names::POLICY_RANGES,
            LpmTrie,
            lpm(size::<c::PolicyKey>()),
            size::<c::PolicyValue>(),
        ),
        (
            names::CT4,
            LruHash,
            size::<c::CtKey4>(),
            size::<c::CtValue>(),
        ),
        (
            names::CT6,
            LruHash,
            size::<c::CtKey6>(),
            size::<c::CtValue>(),
        ),
        (names::COUNTERS, PerCpuArray, 4, size::<c::Counter>()),
        (names::STATE, Array, 4, size::<c::DatapathState>()),
        (names::EVENTS, RingBuf, 0, 0),
        (
            names::EVENT_BUDGET,
            PerCpuArray,
            4,
            size::<c::EventBudget>(),
        ),
        (names::RULE_COUNTERS, PerCpuArray, 4, size::<c::Counter>()),
        (names::IFACES, Hash, 4, 4),
        (names::NODE_PORTS, Hash, size::<c::ServicePort>(), 4),
    ]
}

/// max_entries that this build fixes (indexed by something the build defines): a pin
/// with another size is replaced like one whose layout changed.
fn fixed_capacity(name: &str) -> Option<u32> {
    (name == names::COUNTERS).then_some(netpol_common::COUNTER_SLOTS)
}

/// Unpins what an older build left under `maps_dir` that this build cannot adopt: maps
/// it no longer defines (the single conntrack map `CT` became CT4 and CT6) and maps whose
/// type, key or value size changed (see [`map_layouts`]), so the loader creates them
/// afresh instead of handing the programs a map they cannot use. Programs still attached
/// from that build keep the old maps alive until they are replaced; a new STATE starts
/// from generation 0, which makes conntrack re-check every connection (always safe).
fn unpin_incompatible_maps(maps_dir: &Path) {
    let Ok(entries) = std::fs::read_dir(maps_dir) else {
        return;
    };
    let layouts = map_layouts();
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        let expected = layouts
            .iter()
            .find(|layout| layout.0 == name)
            .map(|&(_, map_type, key, value)| (Some(map_type), key, value));
        let info = aya::maps::MapInfo::from_pin(entry.path()).ok();
        let pinned = info
            .as_ref()
            .map(|info| (info.map_type().ok(), info.key_size(), info.value_size()));
        let capacity_ok = fixed_capacity(name)
            .is_none_or(|fixed| info.as_ref().map(|info| info.max_entries()) == Some(fixed));
        if expected.is_some() && pinned == expected && capacity_ok {
            continue;
        }
        match std::fs::remove_file(entry.path()) {
            Ok(()) => info!(
                map = name,
                ?pinned,
                ?expected,
                "unpinned a map this build does not define or whose layout changed"
            ),
            Err(error) => warn!(map = name, %error, "could not unpin an incompatible map"),
        }
    }
}

/// IPCACHE names slots of PEERS: the two are adopted together or not at all. One
/// pinned without the other, or PEERS with another capacity than IPCACHE, or not
/// mappable (no build pins such a pair; a person might), would hand the programs slots
/// that resolve to nothing or to another prefix's identity: both are unpinned, to be
/// created afresh.
fn unpin_unpaired_peers(maps_dir: &Path) {
    use super::peers::MMAPABLE;
    let info = |name: &str| aya::maps::MapInfo::from_pin(maps_dir.join(name)).ok();
    let (trie, peers) = (info(names::IPCACHE), info(names::PEERS));
    let paired = match (&trie, &peers) {
        (None, None) => return,
        (Some(trie), Some(peers)) => {
            trie.max_entries() == peers.max_entries() && peers.map_flags() & MMAPABLE != 0
        }
        _ => false,
    };
    if paired {
        return;
    }
    for name in [names::IPCACHE, names::PEERS] {
        match std::fs::remove_file(maps_dir.join(name)) {
            Ok(()) => info!(map = name, "unpinned: IPCACHE and PEERS were not a pair"),
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => {}
            Err(error) => warn!(map = name, %error, "could not unpin an unpaired map"),
        }
    }
}

fn take_map(ebpf: &mut Ebpf, name: &'static str) -> Result<aya::maps::Map> {
    ebpf.take_map(name).ok_or(Error::MissingMap(name))
}

fn adopt<M: maps::KernelMap>(
    ebpf: &mut Ebpf,
    name: &'static str,
    convert: impl FnOnce(aya::maps::Map) -> std::result::Result<M, MapError>,
) -> Result<Synced<M>> {
    let map = convert(take_map(ebpf, name)?).map_err(|source| Error::Map { name, source })?;
    Synced::adopt(name, map).map_err(|source| Error::Map { name, source })
}
