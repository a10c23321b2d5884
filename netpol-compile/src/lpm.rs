//! LPM trie keys as the kernel sees them.
//!
//! A `BPF_MAP_TYPE_LPM_TRIE` key is `{ u32 prefixlen; data }` and the kernel compares the
//! first `prefixlen` bits of `data` in memory order (most significant bit of byte 0
//! first). [`LpmData`] gives each key type its in-memory bytes, so masking here is
//! bit-for-bit what the trie does; [`Lpm::new`] always stores masked data, so two
//! keys that the kernel would treat as one entry are equal here too.

use std::net::IpAddr;

use netpol_common::{Addr, PolicyKey};

/// Largest key data [`LpmData`] supports, in bytes.
pub const MAX_KEY_BYTES: usize = 32;

/// Data part of an LPM key.
pub trait LpmData: Copy + Ord {
    /// Size of the data in bits: the longest possible prefix.
    const BITS: u32;
    /// The key's bytes as laid out in memory (`#[repr(C)]`, native endianness), in the
    /// first `BITS / 8` bytes of the buffer.
    fn to_bytes(&self) -> [u8; MAX_KEY_BYTES];
    /// Inverse of [`LpmData::to_bytes`].
    fn from_bytes(bytes: &[u8; MAX_KEY_BYTES]) -> Self;

    /// The key with every bit after the first `prefix_len` cleared.
    fn masked(&self, prefix_len: u32) -> Self {
        let mut bytes = self.to_bytes();
        for (i, b) in bytes
            .iter_mut()
            .enumerate()
            .take(Self::BITS.div_ceil(8) as usize)
        {
            let start = i as u32 * 8;
            if start >= prefix_len {
                *b = 0;
            } else if start + 8 > prefix_len {
                *b &= 0xffu8 << (start + 8 - prefix_len);
            }
        }
        Self::from_bytes(&bytes)
    }
}

impl LpmData for Addr {
    const BITS: u32 = 32 + 128;

    fn to_bytes(&self) -> [u8; MAX_KEY_BYTES] {
        let mut v = [0; MAX_KEY_BYTES];
        v[0..4].copy_from_slice(&self.family.to_ne_bytes());
        v[4..20].copy_from_slice(&self.bytes);
        v
    }

    fn from_bytes(b: &[u8; MAX_KEY_BYTES]) -> Self {
        let mut bytes = [0u8; 16];
        bytes.copy_from_slice(&b[4..20]);
        Addr {
            family: u32::from_ne_bytes(b[0..4].try_into().expect("4 bytes")),
            bytes,
        }
    }
}

impl LpmData for PolicyKey {
    const BITS: u32 = netpol_common::POLICY_PREFIX_FULL;

    fn to_bytes(&self) -> [u8; MAX_KEY_BYTES] {
        let mut v = [0; MAX_KEY_BYTES];
        v[0..4].copy_from_slice(&self.endpoint.to_ne_bytes());
        v[4..8].copy_from_slice(&self.identity.to_ne_bytes());
        v[8..12].copy_from_slice(&[self.direction, self.protocol, self.port[0], self.port[1]]);
        v
    }

    fn from_bytes(b: &[u8; MAX_KEY_BYTES]) -> Self {
        PolicyKey {
            endpoint: u32::from_ne_bytes(b[0..4].try_into().expect("4 bytes")),
            identity: u32::from_ne_bytes(b[4..8].try_into().expect("4 bytes")),
            direction: b[8],
            protocol: b[9],
            port: [b[10], b[11]],
        }
    }
}

/// An LPM trie key: the first `prefix_len` bits of `data` (the rest are zero).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Lpm<K> {
    pub prefix_len: u32,
    pub data: K,
}

impl<K: LpmData> Lpm<K> {
    /// A key covering the first `prefix_len` bits of `data`, masked.
    pub fn new(prefix_len: u32, data: K) -> Self {
        assert!(
            prefix_len <= K::BITS,
            "prefix {prefix_len} longer than the key"
        );
        Lpm {
            prefix_len,
            data: data.masked(prefix_len),
        }
    }

    /// Whether `key` falls under this prefix.
    pub fn covers(&self, key: &K) -> bool {
        key.masked(self.prefix_len) == self.data
    }
}

/// Map key [`Addr`] of an address.
pub fn addr(ip: IpAddr) -> Addr {
    match ip {
        IpAddr::V4(v4) => Addr::v4(v4.octets()),
        IpAddr::V6(v6) => Addr::v6(v6.octets()),
    }
}

/// IPCACHE key of one address (a /32 or /128).
pub fn host_key(ip: IpAddr) -> Lpm<Addr> {
    let a = addr(ip);
    Lpm::new(a.full_prefix_len(), a)
}

/// IPCACHE key of a prefix.
pub fn net_key(net: &ipnet::IpNet) -> Lpm<Addr> {
    Lpm::new(
        netpol_common::ADDR_FAMILY_BITS + u32::from(net.prefix_len()),
        addr(net.network()),
    )
}

/// The prefix an IPCACHE key covers (inverse of [`net_key`]); `None` for a key of no
/// known family.
pub fn key_net(key: &Lpm<Addr>) -> Option<ipnet::IpNet> {
    let bits = key
        .prefix_len
        .checked_sub(netpol_common::ADDR_FAMILY_BITS)?;
    let b = key.data.bytes;
    let net = match key.data.family {
        netpol_common::FAMILY_IPV4 => {
            ipnet::IpNet::new(IpAddr::from([b[0], b[1], b[2], b[3]]), bits as u8)
        }
        netpol_common::FAMILY_IPV6 => ipnet::IpNet::new(IpAddr::from(b), bits as u8),
        _ => return None,
    };
    net.ok()
}

/// Longest-prefix-match lookup, as `bpf_map_lookup_elem` on an LPM trie does it.
pub fn lookup<'a, K: LpmData, V>(
    map: &'a std::collections::BTreeMap<Lpm<K>, V>,
    key: &K,
) -> Option<&'a V> {
    // Small maps: one pass over the entries is cheaper than one probe per length.
    if map.len() <= K::BITS as usize {
        lookup_scan(map, key)
    } else {
        lookup_probe(map, key)
    }
}

fn lookup_scan<'a, K: LpmData, V>(
    map: &'a std::collections::BTreeMap<Lpm<K>, V>,
    key: &K,
) -> Option<&'a V> {
    map.iter()
        .filter(|(prefix, _)| prefix.covers(key))
        .max_by_key(|(prefix, _)| prefix.prefix_len)
        .map(|(_, v)| v)
}

fn lookup_probe<'a, K: LpmData, V>(
    map: &'a std::collections::BTreeMap<Lpm<K>, V>,
    key: &K,
) -> Option<&'a V> {
    (0..=K::BITS).rev().find_map(|len| {
        map.get(&Lpm {
            prefix_len: len,
            data: key.masked(len),
        })
    })
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use netpol_common::{FAMILY_IPV4, FAMILY_IPV6};

    #[test]
    fn addr_keys() {
        let k = host_key("10.1.2.3".parse().unwrap());
        assert_eq!(k.prefix_len, 64);
        assert_eq!(k.data, Addr::v4([10, 1, 2, 3]));
        let k = net_key(&"10.1.0.0/16".parse().unwrap());
        assert_eq!(k.prefix_len, 48);
        assert_eq!(k.data, Addr::v4([10, 1, 0, 0]));
        let k = host_key("fd00::1".parse().unwrap());
        assert_eq!(k.prefix_len, 160);
        assert_eq!(k.data.family, FAMILY_IPV6);
        let k = net_key(&"0.0.0.0/0".parse().unwrap());
        assert_eq!((k.prefix_len, k.data.family), (32, FAMILY_IPV4));
        for net in [
            "0.0.0.0/0",
            "10.1.0.0/16",
            "10.1.2.3/32",
            "fd00::/8",
            "fd00::1/128",
        ] {
            let net: ipnet::IpNet = net.parse().unwrap();
            assert_eq!(key_net(&net_key(&net)), Some(net));
        }
        assert_eq!(
            key_net(&host_key("10.1.2.3".parse().unwrap())),
            Some("10.1.2.3/32".parse().unwrap())
        );
    }

    #[test]
    fn masking_clears_bits_after_prefix() {
        let a = Addr::v4([10, 255, 255, 255]);
        assert_eq!(a.masked(32 + 12).bytes[..4], [10, 240, 0, 0]);
        assert_eq!(a.masked(32).bytes, [0; 16]);
        assert_eq!(a.masked(32).family, FAMILY_IPV4);
        let k = PolicyKey {
            endpoint: 7,
            identity: 9,
            direction: 1,
            protocol: 6,
            port: [0x1f, 0x90],
        };
        assert_eq!(
            k.masked(netpol_common::POLICY_PREFIX_ANY_PROTO),
            PolicyKey {
                endpoint: 7,
                identity: 9,
                direction: 1,
                protocol: 0,
                port: [0, 0]
            }
        );
        assert_eq!(
            k.masked(netpol_common::POLICY_PREFIX_ANY_PORT + 4).port,
            [0x10, 0]
        );
        assert_eq!(k.masked(netpol_common::POLICY_PREFIX_FULL), k);
    }

    proptest::proptest! {
        #[test]
        fn scan_and_probe_agree(
            prefixes in proptest::collection::vec((proptest::prelude::any::<[u8; 4]>(), 0..=32u32), 0..200),
            probes in proptest::collection::vec(proptest::prelude::any::<[u8; 4]>(), 1..20),
        ) {
            let map: BTreeMap<Lpm<Addr>, usize> = prefixes
                .iter()
                .enumerate()
                .map(|(i, (a, len))| (Lpm::new(32 + len, Addr::v4(*a)), i))
                .collect();
            for p in probes {
                // Also probe the prefixes' own addresses, so hits are common.
                for a in [p, prefixes.first().map_or(p, |x| x.0)] {
                    let key = Addr::v4(a);
                    proptest::prop_assert_eq!(lookup_scan(&map, &key), lookup_probe(&map, &key));
                }
            }
        }
    }

    #[test]
    fn lookup_prefers_longest_prefix_and_keeps_families_apart() {
        let mut m = BTreeMap::new();
        m.insert(net_key(&"10.0.0.0/8".parse().unwrap()), "8");
        m.insert(net_key(&"10.1.0.0/16".parse().unwrap()), "16");
        m.insert(host_key("10.1.0.5".parse().unwrap()), "32");
        m.insert(net_key(&"::/0".parse().unwrap()), "v6 any");
        let get = |ip: &str| lookup(&m, &addr(ip.parse().unwrap())).copied();
        assert_eq!(get("10.1.0.5"), Some("32"));
        assert_eq!(get("10.1.0.6"), Some("16"));
        assert_eq!(get("10.2.0.6"), Some("8"));
        assert_eq!(get("11.0.0.1"), None);
        assert_eq!(get("fe80::1"), Some("v6 any"));
    }
}
