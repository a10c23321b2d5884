//! Peer identities and stable number allocation.
//!
//! An identity stands for a class of addresses that every peer in force treats alike.
//! Its [`IdentitySignature`] lists, in canonical text, the peers (selector pairs and
//! ipBlocks) that match the class and, for pods, how they resolve the named ports that
//! egress rules use. The signature is the identity's allocation key, so numbers survive
//! recompiles for as long as the class exists.

use std::collections::{BTreeMap, BTreeSet};

use netpol_common::IDENTITY_FIRST_DYNAMIC;

use crate::state::ObjectRef;

/// How a pod resolves a named port used by some egress rule.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct NamedPortResolution {
    pub name: String,
    pub protocol: u8,
    pub port: u16,
}

/// What an identity stands for; its allocation key.
///
/// The empty signature (no peer matches, no named port resolves) is
/// [`netpol_common::IDENTITY_WORLD`] and is never allocated.
#[derive(Clone, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct IdentitySignature {
    /// Canonical text of every peer in force that matches the class, sorted.
    pub peers: Vec<String>,
    /// Named ports resolved by the class's pods, sorted.
    pub named_ports: Vec<NamedPortResolution>,
}

impl IdentitySignature {
    pub fn is_world(&self) -> bool {
        self.peers.is_empty() && self.named_ports.is_empty()
    }
}

impl std::fmt::Display for IdentitySignature {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.is_world() {
            return f.write_str("matches no peer");
        }
        write!(f, "matches [{}]", self.peers.join("; "))?;
        if !self.named_ports.is_empty() {
            let ports: Vec<String> = self
                .named_ports
                .iter()
                .map(|n| format!("{}/{}={}", n.name, super::protocol_name(n.protocol), n.port))
                .collect();
            write!(f, ", named ports [{}]", ports.join(", "))?;
        }
        Ok(())
    }
}

/// Numbers handed out by the previous compile; pass [`super::Compiled::allocations`]
/// back into the next [`super::compile`] so ids stay stable.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Allocations {
    endpoints: BTreeMap<ObjectRef, u32>,
    identities: BTreeMap<IdentitySignature, u32>,
}

impl Allocations {
    /// Endpoint id of a local pod.
    pub fn endpoint_id(&self, pod: &ObjectRef) -> Option<u32> {
        self.endpoints.get(pod).copied()
    }

    /// Identity number of a signature.
    pub fn identity(&self, signature: &IdentitySignature) -> Option<u32> {
        self.identities.get(signature).copied()
    }

    pub fn endpoints(&self) -> &BTreeMap<ObjectRef, u32> {
        &self.endpoints
    }

    pub fn identities(&self) -> &BTreeMap<IdentitySignature, u32> {
        &self.identities
    }

    /// Allocations for `endpoints` and `identities`: kept numbers for keys `self` knows,
    /// the lowest free ones for new keys (in key order).
    pub(crate) fn next(
        &self,
        endpoints: impl IntoIterator<Item = ObjectRef>,
        identities: impl IntoIterator<Item = IdentitySignature>,
    ) -> Allocations {
        Allocations {
            endpoints: allocate(&self.endpoints, endpoints, 1),
            identities: allocate(&self.identities, identities, IDENTITY_FIRST_DYNAMIC),
        }
    }
}

/// Numbers for `wanted`: those in `prev` keep theirs, the others take the lowest numbers
/// `>= first` not in use, in key order.
fn allocate<K: Ord + Clone>(
    prev: &BTreeMap<K, u32>,
    wanted: impl IntoIterator<Item = K>,
    first: u32,
) -> BTreeMap<K, u32> {
    let wanted: BTreeSet<K> = wanted.into_iter().collect();
    let mut out = BTreeMap::new();
    let mut used = BTreeSet::new();
    for key in &wanted {
        if let Some(&id) = prev.get(key) {
            out.insert(key.clone(), id);
            used.insert(id);
        }
    }
    let mut candidate = first;
    for key in wanted {
        if out.contains_key(&key) {
            continue;
        }
        while used.contains(&candidate) {
            candidate = candidate.checked_add(1).expect("u32 ids exhausted");
        }
        out.insert(key, candidate);
        used.insert(candidate);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sig(peers: &[&str]) -> IdentitySignature {
        IdentitySignature {
            peers: peers.iter().map(|s| s.to_string()).collect(),
            named_ports: vec![],
        }
    }

    #[test]
    fn allocate_keeps_ids_and_fills_gaps() {
        let first = allocate(&BTreeMap::new(), ["a", "b", "c"], 1);
        assert_eq!(first, BTreeMap::from([("a", 1), ("b", 2), ("c", 3)]));
        // "b" disappears, "d" and "e" appear: "d" takes the freed 2, "e" the next free 4.
        let second = allocate(&first, ["a", "c", "d", "e"], 1);
        assert_eq!(
            second,
            BTreeMap::from([("a", 1), ("c", 3), ("d", 2), ("e", 4)])
        );
        // "b" comes back: it is a new key now and takes the lowest free number.
        let third = allocate(&second, ["a", "b", "c", "d", "e"], 1);
        assert_eq!(third["b"], 5);
    }

    #[test]
    fn identities_start_at_first_dynamic() {
        let a =
            Allocations::default().next([ObjectRef::new("x", "a")], [sig(&["p1"]), sig(&["p2"])]);
        assert_eq!(a.endpoint_id(&ObjectRef::new("x", "a")), Some(1));
        assert_eq!(a.identity(&sig(&["p1"])), Some(IDENTITY_FIRST_DYNAMIC));
        assert_eq!(a.identity(&sig(&["p2"])), Some(IDENTITY_FIRST_DYNAMIC + 1));
        let b = a.next(
            [ObjectRef::new("x", "0"), ObjectRef::new("x", "a")],
            [sig(&["p0"]), sig(&["p2"])],
        );
        assert_eq!(b.endpoint_id(&ObjectRef::new("x", "a")), Some(1));
        assert_eq!(b.endpoint_id(&ObjectRef::new("x", "0")), Some(2));
        assert_eq!(b.identity(&sig(&["p2"])), Some(IDENTITY_FIRST_DYNAMIC + 1));
        assert_eq!(b.identity(&sig(&["p0"])), Some(IDENTITY_FIRST_DYNAMIC));
        assert_eq!(b.identity(&sig(&["p1"])), None);
    }

    #[test]
    fn signature_display() {
        assert_eq!(IdentitySignature::default().to_string(), "matches no peer");
        let s = IdentitySignature {
            peers: vec!["ipBlock 10.0.0.0/8".into()],
            named_ports: vec![NamedPortResolution {
                name: "http".into(),
                protocol: 6,
                port: 8080,
            }],
        };
        assert_eq!(
            s.to_string(),
            "matches [ipBlock 10.0.0.0/8], named ports [http/TCP=8080]"
        );
    }
}
