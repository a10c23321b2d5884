//! What the kernel holds for one connection, read from a running agent's pins
//! (`netpol-agent inspect`, which `kubectl netpol explain --kernel` runs in the agent's
//! container): the policy maps replayed by the model of the kernel's lookups, the
//! conntrack entries of the connection, and the policy generation. Read-only: nothing
//! is loaded, attached or written.

use std::net::IpAddr;
use std::path::Path;

use super::Error;
use super::maps::{KernelMap as _, PolicyMaps};
use super::peers::PeerMaps;
use crate::telemetry::inspect::{KernelConnection, KernelHook, KernelView};
use aya::maps::{Array, HashMap, LpmTrie, Map, MapData, MapError, MapInfo};
use netpol_common::{
    Addr, CT_REVOKED, CtKey, CtKey4, CtKey6, CtValue, DatapathState, EndpointInfo, ServicePort,
    names,
};
use netpol_compile::policy_maps;
use netpol_compile::{Compiled, Direction, model};

fn map_error(name: &'static str) -> impl Fn(MapError) -> Error {
    move |source| Error::Map { name, source }
}

fn pinned(dir: &Path, name: &'static str) -> Result<Map, Error> {
    let data = MapData::from_pin(dir.join("maps").join(name)).map_err(map_error(name))?;
    Map::from_map_data(data).map_err(map_error(name))
}

/// The policy maps of the agent pinned under `dir`, as a [`Compiled`] (maps only).
pub fn read_maps(dir: &Path) -> Result<(Compiled, u32), Error> {
    let endpoints: HashMap<MapData, Addr, EndpointInfo> =
        HashMap::try_from(pinned(dir, names::ENDPOINTS)?).map_err(map_error(names::ENDPOINTS))?;
    let ipcache = PeerMaps::read_pinned(&dir.join("maps")).map_err(map_error(names::IPCACHE))?;
    let node_ports: HashMap<MapData, ServicePort, u32> =
        HashMap::try_from(pinned(dir, names::NODE_PORTS)?).map_err(map_error(names::NODE_PORTS))?;
    let policy = PolicyMaps {
        exact: HashMap::try_from(pinned(dir, names::POLICY)?).map_err(map_error(names::POLICY))?,
        ranges: LpmTrie::try_from(pinned(dir, names::POLICY_RANGES)?)
            .map_err(map_error(names::POLICY_RANGES))?,
    };
    let state: Array<MapData, DatapathState> =
        Array::try_from(pinned(dir, names::STATE)?).map_err(map_error(names::STATE))?;
    let generation = state
        .get(&0, 0)
        .map_err(map_error(names::STATE))?
        .generation;
    let compiled = Compiled {
        endpoints: endpoints.read_all().map_err(map_error(names::ENDPOINTS))?,
        ipcache: ipcache.into(),
        policy: policy.read_all().map_err(map_error(names::POLICY))?.into(),
        node_ports: node_ports
            .read_all()
            .map_err(map_error(names::NODE_PORTS))?
            .into_keys()
            .collect(),
        ..Compiled::default()
    };
    Ok((compiled, generation))
}

/// What the kernel pinned under `dir` holds for a new connection `src -> dst` on
/// `protocol`/`port`, and the conntrack entries it has for it.
pub fn inspect(
    dir: &Path,
    src: IpAddr,
    dst: IpAddr,
    protocol: u8,
    port: u16,
) -> Result<KernelView, Error> {
    let (maps, generation) = read_maps(dir)?;
    let hooks = [Direction::Egress, Direction::Ingress]
        .into_iter()
        .map(|direction| {
            let decision = model::decide(&maps, src, dst, protocol, port, direction);
            KernelHook {
                direction: direction.field().to_owned(),
                endpoint: decision.endpoint.is_some(),
                reason: decision.reason.name().to_owned(),
                allowed: decision.allowed(),
                rule: decision.rule,
            }
        })
        .collect();
    let mut conntrack = Vec::new();
    // Each end's entry, keyed from its side: the source's (local = src) and the
    // destination's (local = dst, the port on its side).
    for (local, remote, port_local) in [(src, dst, false), (dst, src, true)] {
        conntrack.extend(connections(dir, local, remote, protocol, port, port_local)?);
    }
    let in_ranges = maps
        .policy
        .keys()
        .filter(|key| matches!(policy_maps::slot(key), policy_maps::Slot::Ranges(_)))
        .count();
    let counted = [
        (names::ENDPOINTS, maps.endpoints.len()),
        (names::IPCACHE, maps.ipcache.len()),
        (names::POLICY, maps.policy.len() - in_ranges),
        (names::POLICY_RANGES, in_ranges),
    ];
    let capacity = counted
        .iter()
        .filter_map(|(name, _)| {
            let info = MapInfo::from_pin(dir.join("maps").join(name)).ok()?;
            Some((name.to_string(), info.max_entries() as usize))
        })
        .collect();
    let entries = counted
        .into_iter()
        .map(|(name, n)| (name.to_owned(), n))
        .collect();
    Ok(KernelView {
        generation,
        entries,
        capacity,
        hooks,
        conntrack,
    })
}

/// The entries of CT4 or CT6 between `local` and `remote` on `protocol` whose
/// responder port is `port` (the local port when `port_local`, else the remote one).
fn connections(
    dir: &Path,
    local: IpAddr,
    remote: IpAddr,
    protocol: u8,
    port: u16,
    port_local: bool,
) -> Result<Vec<KernelConnection>, Error> {
    fn matching<A: aya::Pod + PartialEq>(
        map: Map,
        name: &'static str,
        ends: (A, A),
        wanted: impl Fn(&CtKey<A>) -> bool,
        ip: impl Fn(A) -> IpAddr,
    ) -> Result<Vec<KernelConnection>, Error>
    where
        CtKey<A>: aya::Pod,
    {
        let ct: HashMap<MapData, CtKey<A>, CtValue> =
            HashMap::try_from(map).map_err(map_error(name))?;
        let mut out = Vec::new();
        for entry in ct.iter() {
            let (key, value) = entry.map_err(map_error(name))?;
            if key.local == ends.0 && key.remote == ends.1 && wanted(&key) {
                out.push(KernelConnection {
                    local: ip(key.local),
                    remote: ip(key.remote),
                    local_port: key.local_port,
                    remote_port: key.remote_port,
                    protocol: key.protocol,
                    revoked: value.flags & CT_REVOKED != 0,
                    generation: value.generation,
                });
            }
        }
        Ok(out)
    }
    let wanted = |key_protocol: u8, local_port: u16, remote_port: u16| {
        key_protocol == protocol
            && if port_local {
                local_port == port
            } else {
                remote_port == port
            }
    };
    match (local, remote) {
        (IpAddr::V4(l), IpAddr::V4(r)) => matching(
            pinned(dir, names::CT4)?,
            names::CT4,
            (
                u32::from_ne_bytes(l.octets()),
                u32::from_ne_bytes(r.octets()),
            ),
            |k: &CtKey4| wanted(k.protocol, k.local_port, k.remote_port),
            |a: u32| IpAddr::from(a.to_ne_bytes()),
        ),
        (IpAddr::V6(l), IpAddr::V6(r)) => {
            let words = |a: std::net::Ipv6Addr| {
                let b = a.octets();
                std::array::from_fn(|i| {
                    u32::from_ne_bytes([b[4 * i], b[4 * i + 1], b[4 * i + 2], b[4 * i + 3]])
                })
            };
            matching(
                pinned(dir, names::CT6)?,
                names::CT6,
                (words(l), words(r)),
                |k: &CtKey6| wanted(k.protocol, k.local_port, k.remote_port),
                |a: [u32; 4]| {
                    let mut b = [0u8; 16];
                    for (i, w) in a.iter().enumerate() {
                        b[4 * i..4 * i + 4].copy_from_slice(&w.to_ne_bytes());
                    }
                    IpAddr::from(b)
                },
            )
        }
        _ => Ok(Vec::new()),
    }
}
