//! Synthetic map contents of the measured shapes, written through the pinned maps.

use std::path::Path;

use aya::maps::lpm_trie::Key;
use aya::maps::{Array, HashMap, LpmTrie, Map, MapData};
use netpol_common::{
    Addr, DIR_EGRESS, DIR_INGRESS, ENDPOINT_EGRESS_ISOLATED, ENDPOINT_INGRESS_ISOLATED,
    EndpointInfo, POLICY_PREFIX_ANY_PORT, PROTO_TCP, PROTO_UDP, PeerInfo, PeerSlot, PolicyKey,
    PolicyValue, TIER_ADMIN, VERDICT_DENY, names,
};
use netpol_compile::Compiled;

/// Synthetic map filler through the pinned maps.
pub struct Filler {
    endpoints: HashMap<MapData, Addr, EndpointInfo>,
    ipcache: LpmTrie<MapData, Addr, PeerSlot>,
    peers: Array<MapData, PeerInfo>,
    policy: HashMap<MapData, PolicyKey, PolicyValue>,
    policy_ranges: LpmTrie<MapData, PolicyKey, PolicyValue>,
    pub policy_written: usize,
    /// Of those, Admin-tier (ClusterNetworkPolicy) entries.
    pub tier_written: usize,
}

/// Filler identities start here, above every identity the compiler hands out for the
/// small cluster, so no filler entry ever decides a measured packet.
pub const FILLER_IDENTITY: u32 = 1000;
const FILLER_ENDPOINTS: u32 = 100;
/// The filler endpoints' Admin tier groups: filler endpoint `n`'s is this plus `n`, far
/// above the few the compiler hands out from 1 on.
const FILLER_GROUP: u32 = 1_000_000;
const FILLER_IDENTITIES: u32 = 500;

impl Filler {
    pub fn open(maps: &Path) -> Filler {
        let pinned = |name: &str| MapData::from_pin(maps.join(name)).expect("pinned map");
        Filler {
            endpoints: HashMap::try_from(Map::HashMap(pinned(names::ENDPOINTS))).expect("map"),
            ipcache: LpmTrie::try_from(Map::LpmTrie(pinned(names::IPCACHE))).expect("map"),
            peers: Array::try_from(Map::Array(pinned(names::PEERS))).expect("map"),
            policy: HashMap::try_from(Map::HashMap(pinned(names::POLICY))).expect("map"),
            policy_ranges: LpmTrie::try_from(Map::LpmTrie(pinned(names::POLICY_RANGES)))
                .expect("map"),
            policy_written: 0,
            tier_written: 0,
        }
    }

    /// More local endpoints (ids after the compiled ones, up to 100), as on a node with
    /// 100 pods.
    pub fn endpoints(&mut self, compiled: &Compiled) {
        let first = compiled.local_pods.len() as u32 + 1;
        for id in first..=FILLER_ENDPOINTS {
            let addr = Addr::v4([10, 0, 1, id as u8]);
            let info = EndpointInfo {
                id,
                flags: ENDPOINT_INGRESS_ISOLATED | ENDPOINT_EGRESS_ISOLATED,
                tier_groups: [FILLER_GROUP + id, 0],
            };
            assert!(!compiled.endpoints.contains_key(&addr));
            self.endpoints.insert(addr, info, 0).expect("ENDPOINTS");
        }
    }

    /// IPCACHE up to `total`: pod /32s next to the measured ones (10.1.0.0 upwards) and,
    /// every 100th, a /24 ipBlock (172.16.0.0/14 region). Their 500 identities take the
    /// last 500 slots of PEERS, far above the few the agent hands out from the first on.
    pub fn ipcache(&mut self, already: usize, total: usize) {
        let last = self.peers.len() - 1;
        let slot = |n: u32| last - n % FILLER_IDENTITIES;
        for n in 0..FILLER_IDENTITIES {
            let info = PeerInfo {
                identity: FILLER_IDENTITY + n,
                flags: 0,
            };
            self.peers.set(slot(n), info, 0).expect("PEERS");
        }
        for i in 0..total.saturating_sub(already) {
            let n = i as u32;
            let (prefix, octets) = if i % 100 == 99 {
                let j = n / 100;
                (32 + 24, [172, 16 + (j >> 8) as u8, j as u8, 0])
            } else {
                let a = (10u32 << 24) | (1 << 16) | n;
                (32 + 32, a.to_be_bytes())
            };
            let key = Key::new(prefix, Addr::v4(octets));
            self.ipcache.insert(&key, slot(n), 0).expect("IPCACHE");
        }
    }

    /// POLICY and POLICY_RANGES up to `total` entries together (`core` of them from the
    /// compiler): entry i goes to endpoint 1 + i % 100 (the measured endpoints among
    /// them), then identity, direction and protocol vary; one in ten is a /8 port prefix
    /// (POLICY_RANGES), the rest exact ports (POLICY); one in five is an Admin-tier
    /// entry (a ClusterNetworkPolicy Deny) instead of a NetworkPolicy one. The
    /// endpoints' flags stay as compiled, so the measured exact-port endpoints never walk
    /// the ranges.
    pub fn policy(&mut self, core: usize, total: usize) {
        let want = total.saturating_sub(core);
        while self.policy_written < want {
            let i = self.policy_written as u32;
            let endpoint = 1 + i % FILLER_ENDPOINTS;
            let rest = i / FILLER_ENDPOINTS;
            let identity = FILLER_IDENTITY + rest % 250 + 250 * (rest / 1000);
            let direction = if (rest / 250).is_multiple_of(2) {
                DIR_INGRESS
            } else {
                DIR_EGRESS
            };
            let protocol = if (rest / 500).is_multiple_of(2) {
                PROTO_TCP
            } else {
                PROTO_UDP
            };
            let (port, bits) = if rest % 10 == 9 {
                (0x1f00u16, 8)
            } else {
                (1000 + (rest % 997) as u16, 16)
            };
            let tiered = rest % 5 == 4;
            let key = PolicyKey {
                endpoint: if tiered {
                    FILLER_GROUP + endpoint
                } else {
                    endpoint
                },
                identity,
                direction: if tiered {
                    direction | TIER_ADMIN
                } else {
                    direction
                },
                protocol,
                port: port.to_be_bytes(),
            };
            let value = if tiered {
                self.tier_written += 1;
                PolicyValue::new(100_000 + i, VERDICT_DENY)
            } else {
                PolicyValue::allow(100_000 + i)
            };
            if bits == 16 {
                self.policy.insert(key, value, 0).expect("POLICY");
            } else {
                self.policy_ranges
                    .insert(&Key::new(POLICY_PREFIX_ANY_PORT + bits, key), value, 0)
                    .expect("POLICY_RANGES");
            }
            self.policy_written += 1;
        }
    }
}
