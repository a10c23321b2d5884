//! What `netpol-agent inspect` says of one connection (read by `datapath::inspect` from
//! the pinned maps; `kubectl netpol explain --kernel` compares it with the cluster).
//! Plain data, so the preview can read it without the datapath.

use std::collections::BTreeMap;
use std::net::IpAddr;

use serde::{Deserialize, Serialize};

/// The kernel's answer for one connection at one hook.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct KernelHook {
    /// `ingress` (the destination's hook) or `egress` (the source's).
    pub direction: String,
    /// Whether ENDPOINTS holds the address this hook judges (the pod is programmed
    /// on this node).
    pub endpoint: bool,
    /// The reason the programs would give a new connection, e.g. `policy-denied`.
    pub reason: String,
    pub allowed: bool,
    /// The rule id of the entry found (`RULE_NONE` = none).
    pub rule: u32,
}

/// A conntrack entry of the connection (any source port).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct KernelConnection {
    pub local: IpAddr,
    pub remote: IpAddr,
    pub local_port: u16,
    pub remote_port: u16,
    pub protocol: u8,
    /// Revoked: a policy change no longer allows it and its packets are dropped.
    pub revoked: bool,
    /// The policy generation it was last judged at.
    pub generation: u32,
}

/// Everything `inspect` says.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct KernelView {
    /// The policy generation in STATE (bumped after each map change).
    pub generation: u32,
    /// Entries per map.
    pub entries: BTreeMap<String, usize>,
    /// Capacity (max_entries) per map, for those whose entries are counted.
    #[serde(default)]
    pub capacity: BTreeMap<String, usize>,
    pub hooks: Vec<KernelHook>,
    pub conntrack: Vec<KernelConnection>,
}

impl KernelView {
    /// The maps holding as many entries as they can: nothing more fits.
    pub fn full_maps(&self) -> Vec<(&str, usize)> {
        self.capacity
            .iter()
            .filter(|(name, capacity)| {
                **capacity > 0 && self.entries.get(*name).is_some_and(|n| n >= *capacity)
            })
            .map(|(name, capacity)| (name.as_str(), *capacity))
            .collect()
    }
}
