//! Step 5 of the compile: POLICY entries for one rule of one endpoint.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use netpol_common::{
    IDENTITY_ANY, POLICY_PREFIX_ANY_PORT, POLICY_PREFIX_ANY_PROTO, PolicyKey, PolicyValue,
};

use crate::Direction;
use crate::cache::{PeerSlots, PodEntry};
use crate::lpm::Lpm;
use crate::policy::{ParsedRule, Peer, PortMatch, PortSpec};
use crate::ports::port_prefixes;

/// Everything needed to turn one rule into POLICY entries for one endpoint.
pub(super) struct RuleContext<'a> {
    pub(super) endpoint: u32,
    pub(super) direction: Direction,
    pub(super) rule: u32,
    /// The local pod.
    pub(super) pod: &'a PodEntry,
    pub(super) peers: &'a PeerSlots,
    /// Identities of the classes each peer slot matches.
    pub(super) peer_identities: &'a HashMap<usize, BTreeSet<u32>>,
    /// Egress named ports in force, and how each identity resolves them.
    pub(super) egress_named_ports: &'a [(&'a str, u8)],
    pub(super) named_by_identity: &'a [BTreeMap<u32, u16>],
}

/// The identities of the classes any of `list` (peers interned by this compile) matches.
pub(super) fn identities_of(
    list: &[Peer],
    peers: &PeerSlots,
    peer_identities: &HashMap<usize, BTreeSet<u32>>,
) -> BTreeSet<u32> {
    list.iter()
        .flat_map(|p| {
            peer_identities
                .get(&peers.get(p))
                .into_iter()
                .flatten()
                .copied()
        })
        .collect()
}

/// Interns the peers of a rule in force and notes its egress named ports.
pub(super) fn intern_rule<'a>(
    peers: Option<&[Peer]>,
    ports: Option<&'a [PortSpec]>,
    direction: Direction,
    slots: &mut PeerSlots,
    egress_named_ports: &mut BTreeSet<(&'a str, u8)>,
) {
    for peer in peers.into_iter().flatten() {
        slots.intern(peer);
    }
    if direction == Direction::Egress {
        for spec in ports.into_iter().flatten() {
            if let PortMatch::Named(name) = &spec.port {
                egress_named_ports.insert((name.as_str(), spec.protocol));
            }
        }
    }
}

impl RuleContext<'_> {
    pub(super) fn emit(&self, rule: &ParsedRule, out: &mut BTreeMap<Lpm<PolicyKey>, PolicyValue>) {
        let identities: BTreeSet<u32> = match &rule.peers {
            None => BTreeSet::from([IDENTITY_ANY]),
            Some(list) => identities_of(list, self.peers, self.peer_identities),
        };
        let Some(ports) = &rule.ports else {
            for &identity in &identities {
                self.insert(out, identity, 0, 0, POLICY_PREFIX_ANY_PROTO);
            }
            return;
        };
        for spec in ports {
            match &spec.port {
                PortMatch::All => {
                    for &identity in &identities {
                        self.insert(out, identity, spec.protocol, 0, POLICY_PREFIX_ANY_PORT);
                    }
                }
                PortMatch::Range(lo, hi) => {
                    for block in port_prefixes(*lo, *hi) {
                        for &identity in &identities {
                            self.insert(
                                out,
                                identity,
                                spec.protocol,
                                block.value,
                                POLICY_PREFIX_ANY_PORT + block.bits,
                            );
                        }
                    }
                }
                PortMatch::Named(name) => match self.direction {
                    // Resolved on the destination: the local pod itself.
                    Direction::Ingress => {
                        if let Some(port) = self.pod.named_port(name, spec.protocol) {
                            for &identity in &identities {
                                self.insert(
                                    out,
                                    identity,
                                    spec.protocol,
                                    port,
                                    POLICY_PREFIX_ANY_PORT + 16,
                                );
                            }
                        }
                    }
                    // Resolved on the destination: each peer, through its identity.
                    Direction::Egress => {
                        let wanted = (name.as_str(), spec.protocol);
                        let resolved = self
                            .egress_named_ports
                            .iter()
                            .position(|&n| n == wanted)
                            .map(|i| &self.named_by_identity[i]);
                        for (&identity, &port) in resolved.into_iter().flatten() {
                            if identities.contains(&IDENTITY_ANY) || identities.contains(&identity)
                            {
                                self.insert(
                                    out,
                                    identity,
                                    spec.protocol,
                                    port,
                                    POLICY_PREFIX_ANY_PORT + 16,
                                );
                            }
                        }
                    }
                },
            }
        }
    }

    fn insert(
        &self,
        out: &mut BTreeMap<Lpm<PolicyKey>, PolicyValue>,
        identity: u32,
        protocol: u8,
        port: u16,
        prefix_len: u32,
    ) {
        let key = PolicyKey {
            endpoint: self.endpoint,
            identity,
            direction: self.direction.as_u8(),
            protocol,
            port: port.to_be_bytes(),
        };
        let key = Lpm::new(prefix_len, key);
        // Port 0 and protocol 0 spell the kernel's wildcards; no rule can name them (the
        // API rejects them) and none may come to mean "every port" here.
        if !crate::policy_maps::representable(&key) {
            return;
        }
        let value = out.entry(key).or_insert(PolicyValue::allow(self.rule));
        value.rule = value.rule.min(self.rule);
    }
}
