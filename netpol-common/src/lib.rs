//! Map keys and values shared by the kernel programs (`netpol-ebpf`) and the agent.
//!
//! Every type is `#[repr(C)]` with explicit padding fields, so both sides agree on the
//! byte layout and no uninitialised padding ever reaches a map key. Sizes are checked
//! at compile time at the bottom of this file.
//!
//! Addresses are stored as [`Addr`]: a family word followed by 16 address bytes
//! (IPv4 uses the first four). The family word is part of every LPM prefix, so an IPv6
//! `::/0` never covers IPv4 addresses and vice versa.
#![cfg_attr(not(test), no_std)]

/// Peer identity used in POLICY keys for rules that allow any peer (no `from`/`to`).
pub const IDENTITY_ANY: u32 = 0;
/// Peer identity of addresses no IPCACHE prefix covers ("the world", outside every
/// ipBlock and not a known pod).
pub const IDENTITY_WORLD: u32 = 1;
/// First identity handed out by the compiler.
pub const IDENTITY_FIRST_DYNAMIC: u32 = 16;

pub const FAMILY_IPV4: u32 = 4;
pub const FAMILY_IPV6: u32 = 6;

/// Bits of the family word that precede the address in an LPM key.
pub const ADDR_FAMILY_BITS: u32 = 32;

/// An IPv4 or IPv6 address as stored in map keys.
///
/// Ordered by family, then address (as the bytes compare): the agent keeps sorted maps
/// of hundreds of thousands of addresses, so the order compares two words instead of
/// calling `memcmp` on the bytes.
#[repr(C)]
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug, Default)]
pub struct Addr {
    /// [`FAMILY_IPV4`] or [`FAMILY_IPV6`].
    pub family: u32,
    /// Network byte order; IPv4 in `bytes[..4]`, the rest zero.
    pub bytes: [u8; 16],
}

impl Addr {
    /// The address as two big-endian words: they order as the bytes do.
    fn words(&self) -> (u64, u64) {
        let [
            a0,
            a1,
            a2,
            a3,
            a4,
            a5,
            a6,
            a7,
            b0,
            b1,
            b2,
            b3,
            b4,
            b5,
            b6,
            b7,
        ] = self.bytes;
        (
            u64::from_be_bytes([a0, a1, a2, a3, a4, a5, a6, a7]),
            u64::from_be_bytes([b0, b1, b2, b3, b4, b5, b6, b7]),
        )
    }
}

impl Ord for Addr {
    fn cmp(&self, other: &Self) -> core::cmp::Ordering {
        (self.family, self.words()).cmp(&(other.family, other.words()))
    }
}

impl PartialOrd for Addr {
    fn partial_cmp(&self, other: &Self) -> Option<core::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Addr {
    pub const fn v4(octets: [u8; 4]) -> Self {
        let mut bytes = [0u8; 16];
        bytes[0] = octets[0];
        bytes[1] = octets[1];
        bytes[2] = octets[2];
        bytes[3] = octets[3];
        Addr {
            family: FAMILY_IPV4,
            bytes,
        }
    }

    pub const fn v6(bytes: [u8; 16]) -> Self {
        Addr {
            family: FAMILY_IPV6,
            bytes,
        }
    }

    /// Link-local (169.254.0.0/16, fe80::/10) or unspecified (0.0.0.0, ::): addresses a
    /// pod may legitimately send from without them being its own.
    pub const fn is_link_local_or_unspecified(&self) -> bool {
        let b = &self.bytes;
        if self.family == FAMILY_IPV4 {
            (b[0] == 169 && b[1] == 254) || (b[0] == 0 && b[1] == 0 && b[2] == 0 && b[3] == 0)
        } else {
            (b[0] == 0xfe && b[1] & 0xc0 == 0x80)
                || (b[0]
                    | b[1]
                    | b[2]
                    | b[3]
                    | b[4]
                    | b[5]
                    | b[6]
                    | b[7]
                    | b[8]
                    | b[9]
                    | b[10]
                    | b[11]
                    | b[12]
                    | b[13]
                    | b[14]
                    | b[15])
                    == 0
        }
    }

    /// Prefix length of an LPM key that covers exactly this address.
    pub const fn full_prefix_len(&self) -> u32 {
        if self.family == FAMILY_IPV4 {
            ADDR_FAMILY_BITS + 32
        } else {
            ADDR_FAMILY_BITS + 128
        }
    }
}

/// Value of ENDPOINTS (HASH, key [`Addr`]): one entry per address of each local pod.
#[repr(C)]
#[derive(Clone, Copy, PartialEq, Eq, Debug, Default)]
pub struct EndpointInfo {
    /// Node-local endpoint id, the first field of every NetworkPolicy POLICY key of this
    /// pod.
    pub id: u32,
    /// `ENDPOINT_*` flags.
    pub flags: u32,
    /// The endpoint's group in each cluster admin's tier ([`TIER_ADMIN`], then
    /// [`TIER_BASELINE`]; [`EndpointInfo::tier_group`]): the first field of that tier's
    /// POLICY keys, shared by every local endpoint the same ClusterNetworkPolicies select
    /// (and, for ingress named ports, that resolves them alike), so a tier's entries are
    /// written once per group, not once per endpoint. 0 when no policy of the tier
    /// selects the endpoint.
    pub tier_groups: [u32; 2],
}

impl EndpointInfo {
    /// The endpoint's group in `tier` ([`TIER_ADMIN`] or [`TIER_BASELINE`]).
    #[inline(always)]
    pub const fn tier_group(&self, tier: u8) -> u32 {
        self.tier_groups[tier_index(tier)]
    }

    /// [`EndpointInfo::tier_groups`] as one word, the Admin tier's in the low half (how
    /// the programs pass them to their policy lookups).
    #[inline(always)]
    pub const fn tier_groups_word(&self) -> u64 {
        self.tier_groups[0] as u64 | (self.tier_groups[1] as u64) << 32
    }
}

/// The group of `tier` in [`EndpointInfo::tier_groups_word`]'s `word`.
#[inline(always)]
pub const fn tier_group_of_word(word: u64, tier: u8) -> u32 {
    (word >> (32 * tier_index(tier))) as u32
}

/// Where `tier` ([`TIER_ADMIN`] or [`TIER_BASELINE`]) is in [`EndpointInfo::tier_groups`].
#[inline(always)]
pub const fn tier_index(tier: u8) -> usize {
    if tier == TIER_ADMIN { 0 } else { 1 }
}

/// Some policy with policyTypes Ingress selects the pod.
pub const ENDPOINT_INGRESS_ISOLATED: u32 = 1 << 0;
/// Some policy with policyTypes Egress selects the pod.
pub const ENDPOINT_EGRESS_ISOLATED: u32 = 1 << 1;
/// Would-be drops are counted and let through.
pub const ENDPOINT_AUDIT: u32 = 1 << 2;
/// Some POLICY entry of the endpoint allows any peer ([`IDENTITY_ANY`]) for ingress: only
/// then is the second POLICY lookup (with identity 0) worth making.
pub const ENDPOINT_INGRESS_ANY_PEER: u32 = 1 << 3;
/// The same for egress.
pub const ENDPOINT_EGRESS_ANY_PEER: u32 = 1 << 4;
/// Some ingress entry of the endpoint is a port range (in POLICY_RANGES): only then is
/// that trie walked.
pub const ENDPOINT_INGRESS_PORT_RANGES: u32 = 1 << 5;
/// The same for egress.
pub const ENDPOINT_EGRESS_PORT_RANGES: u32 = 1 << 6;
/// Some ingress entry of the endpoint allows every port of a protocol ([`PORT_ANY`]):
/// only then is that POLICY lookup made.
pub const ENDPOINT_INGRESS_ANY_PORT: u32 = 1 << 7;
/// The same for egress.
pub const ENDPOINT_EGRESS_ANY_PORT: u32 = 1 << 8;
/// Some ingress entry of the endpoint allows every protocol ([`PROTOCOL_ANY`]): only
/// then is that POLICY lookup made.
pub const ENDPOINT_INGRESS_ANY_PROTOCOL: u32 = 1 << 9;
/// The same for egress.
pub const ENDPOINT_EGRESS_ANY_PROTOCOL: u32 = 1 << 10;

/// The tier of a POLICY entry, in the high bits of [`PolicyKey::direction`]: NetworkPolicy
/// allow entries (0), and the cluster admin's tiers of ClusterNetworkPolicy, whose entries
/// carry a [`PolicyValue::verdict`]. A new connection is looked up in the Admin tier, then
/// (if isolated) NetworkPolicy, then the Baseline tier: each a fixed number of lookups.
pub const TIER_NETWORK_POLICY: u8 = 0;
/// See [`TIER_NETWORK_POLICY`].
pub const TIER_ADMIN: u8 = 1 << 2;
/// See [`TIER_NETWORK_POLICY`].
pub const TIER_BASELINE: u8 = 2 << 2;
/// The bits of [`PolicyKey::direction`] that hold [`DIR_INGRESS`] or [`DIR_EGRESS`].
pub const DIR_MASK: u8 = 0b11;

/// A tier's kinds of entries, per direction, are a group of four endpoint flags (from bit
/// 11; [`tier_kinds`]): an endpoint with no entries in a tier has an empty group and pays
/// nothing for it. Exact ports (looked up whenever the group is not empty).
pub const TIER_KIND_EXACT: u32 = 1;
/// Port ranges (POLICY_RANGES).
pub const TIER_KIND_RANGES: u32 = 2;
/// Every port of a protocol.
pub const TIER_KIND_ANY_PORT: u32 = 4;
/// Every protocol.
pub const TIER_KIND_ANY_PROTOCOL: u32 = 8;
/// Every `TIER_KIND_*` bit.
pub const TIER_KINDS: u32 = 0xf;
const TIER_KINDS_FIRST_BIT: u32 = 11;

/// Where the group of flags of `tier` ([`TIER_ADMIN`] or [`TIER_BASELINE`]) in
/// `direction` starts among an endpoint's flags.
#[inline(always)]
pub const fn tier_kinds_shift(tier: u8, direction: u8) -> u32 {
    let group =
        if tier == TIER_ADMIN { 0 } else { 2 } + if direction == DIR_INGRESS { 0 } else { 1 };
    TIER_KINDS_FIRST_BIT + 4 * group
}

/// The `TIER_KIND_*` flags of `tier` in `direction` among an endpoint's `flags`.
#[inline(always)]
pub const fn tier_kinds(flags: u32, tier: u8, direction: u8) -> u32 {
    (flags >> tier_kinds_shift(tier, direction)) & TIER_KINDS
}

/// Whether an endpoint with `flags` has entries of a ClusterNetworkPolicy tier in
/// `direction`.
#[inline(always)]
pub const fn tiered(flags: u32, direction: u8) -> bool {
    tier_kinds(flags, TIER_ADMIN, direction) != 0
        || tier_kinds(flags, TIER_BASELINE, direction) != 0
}

/// Whether a new connection of an endpoint with `flags` in `direction` is looked up at
/// all: NetworkPolicy isolates it there, or some ClusterNetworkPolicy tier has entries.
#[inline(always)]
pub const fn judged(flags: u32, direction: u8) -> bool {
    let isolated = if direction == DIR_INGRESS {
        ENDPOINT_INGRESS_ISOLATED
    } else {
        ENDPOINT_EGRESS_ISOLATED
    };
    flags & isolated != 0 || tiered(flags, direction)
}

const _: () = assert!(tier_kinds_shift(TIER_BASELINE, DIR_EGRESS) + 4 <= 32);
const _: () = assert!(tier_kinds_shift(TIER_ADMIN, DIR_INGRESS) > 10);

/// What a peer address resolves to: the value of PEERS (ARRAY, mappable) at the slot
/// IPCACHE (LPM_TRIE, key data [`Addr`], prefix `ADDR_FAMILY_BITS + n`) gives the
/// longest matching prefix. The indirection lets the agent move an address to another
/// identity with one store into its mapping of PEERS rather than a trie update: a
/// change of the peer classes renumbers up to every pod address at once.
#[repr(C)]
#[derive(Clone, Copy, PartialEq, Eq, Debug, Default)]
pub struct PeerInfo {
    pub identity: u32,
    /// `PEER_*` flags.
    pub flags: u32,
}

impl PeerInfo {
    /// The entry as one word with its memory layout (the agent stores it, the programs
    /// load it, in one access: a reader never sees one field new and the other old).
    #[inline(always)]
    pub const fn to_word(self) -> u64 {
        // SAFETY: two u32 fields without padding (size asserted below): any 8 bytes.
        unsafe { core::mem::transmute::<PeerInfo, u64>(self) }
    }

    /// The inverse of [`PeerInfo::to_word`].
    #[inline(always)]
    pub const fn from_word(word: u64) -> PeerInfo {
        // SAFETY: as in `to_word`; every bit pattern is a valid `PeerInfo`.
        unsafe { core::mem::transmute::<u64, PeerInfo>(word) }
    }
}

/// Value of IPCACHE: the index of the address's [`PeerInfo`] in PEERS.
pub type PeerSlot = u32;

/// The address belongs to this node: traffic from it to a local pod always passes
/// (kubelet probes).
pub const PEER_HOST: u32 = 1 << 0;
/// The address is a Service's (a ClusterIP, an externalIP, a load-balancer ingress IP)
/// or lies in a Service range: kube-proxy translates connections to it after
/// `from_pod`, so a pod's egress to it is judged after translation, on the backend.
pub const PEER_SERVICE: u32 = 1 << 1;

/// Direction of a policy decision, from the pod's point of view.
pub const DIR_INGRESS: u8 = 1;
pub const DIR_EGRESS: u8 = 2;

pub const PROTO_ICMP: u8 = 1;
pub const PROTO_TCP: u8 = 6;
pub const PROTO_UDP: u8 = 17;
pub const PROTO_ICMPV6: u8 = 58;
pub const PROTO_SCTP: u8 = 132;

/// Key of POLICY (HASH) and key data of POLICY_RANGES (LPM_TRIE): what an endpoint
/// allows, from which peer identity, in which direction, to which protocol and port.
///
/// The common case is one hash lookup: POLICY holds exact ports, every port of one
/// protocol (`port` [`PORT_ANY`]) and every protocol (`protocol` [`PROTOCOL_ANY`], `port`
/// [`PORT_ANY`]); no rule names port 0 or protocol 0, so these never collide with a
/// packet's own key. Port ranges live in POLICY_RANGES, whose fields are matched in
/// order, so its prefix lengths are `POLICY_PREFIX_ANY_PORT + n` with `0 < n < 16`
/// (ports sharing the top `n` bits). An endpoint's flags say which of the further
/// lookups can hit ([`ENDPOINT_INGRESS_PORT_RANGES`], [`ENDPOINT_INGRESS_ANY_PORT`],
/// [`ENDPOINT_INGRESS_ANY_PROTOCOL`] and their egress twins), so a packet pays only for
/// the kinds of entries its endpoint has. The agent's logical view of both maps is one
/// set of LPM keys over this layout: [`POLICY_PREFIX_ANY_PROTO`], [`POLICY_PREFIX_ANY_PORT`]
/// and [`POLICY_PREFIX_FULL`] go to POLICY (masked, which is the wildcard encoding), the
/// prefixes between to POLICY_RANGES.
#[repr(C)]
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Debug, Default)]
pub struct PolicyKey {
    /// The endpoint's id ([`EndpointInfo::id`]) for NetworkPolicy; its group in the
    /// tier ([`EndpointInfo::tier_groups`]) for a cluster admin's tier.
    pub endpoint: u32,
    pub identity: u32,
    /// [`DIR_INGRESS`] or [`DIR_EGRESS`], with the entry's tier ([`TIER_ADMIN`],
    /// [`TIER_BASELINE`]; 0 for NetworkPolicy).
    pub direction: u8,
    pub protocol: u8,
    /// Destination port, network byte order (so LPM prefixes are port prefixes).
    pub port: [u8; 2],
}

pub const POLICY_PREFIX_ANY_PROTO: u32 = 32 + 32 + 8;
pub const POLICY_PREFIX_ANY_PORT: u32 = POLICY_PREFIX_ANY_PROTO + 8;
pub const POLICY_PREFIX_FULL: u32 = POLICY_PREFIX_ANY_PORT + 16;
/// `PolicyKey::protocol` of an entry for every protocol (and every port).
pub const PROTOCOL_ANY: u8 = 0;
/// `PolicyKey::port` of an entry for every port of its protocol.
pub const PORT_ANY: [u8; 2] = [0, 0];

impl PolicyKey {
    /// The POLICY key of an entry for every port of this key's protocol.
    #[inline(always)]
    pub fn any_port(mut self) -> PolicyKey {
        self.port = PORT_ANY;
        self
    }

    /// The POLICY key of an entry for every protocol.
    #[inline(always)]
    pub fn any_protocol(mut self) -> PolicyKey {
        self.protocol = PROTOCOL_ANY;
        self.port = PORT_ANY;
        self
    }
}

/// Value of POLICY and POLICY_RANGES: which rule decides the traffic, and how.
#[repr(C)]
#[derive(Clone, Copy, PartialEq, Eq, Debug, Default)]
pub struct PolicyValue {
    /// Index into the agent's rule table (policy, direction, rule number).
    pub rule: u32,
    /// [`VERDICT_ALLOW`] (every NetworkPolicy entry, a ClusterNetworkPolicy Accept),
    /// [`VERDICT_DENY`] or [`VERDICT_PASS`] (on to the next tier).
    pub verdict: u8,
    pub _pad: [u8; 3],
}

/// See [`PolicyValue::verdict`].
pub const VERDICT_ALLOW: u8 = 0;
/// See [`PolicyValue::verdict`].
pub const VERDICT_DENY: u8 = 1;
/// See [`PolicyValue::verdict`].
pub const VERDICT_PASS: u8 = 2;

impl PolicyValue {
    /// An entry of `rule` with `verdict`.
    pub const fn new(rule: u32, verdict: u8) -> PolicyValue {
        PolicyValue {
            rule,
            verdict,
            _pad: [0; 3],
        }
    }

    /// An allow entry of `rule`.
    pub const fn allow(rule: u32) -> PolicyValue {
        PolicyValue::new(rule, VERDICT_ALLOW)
    }
}

/// Key of the conntrack maps (LRU_HASH): a connection as one endpoint's hooks see it,
/// with addresses `A` as they lie in the packet (network byte order in memory).
///
/// The ends are stored from the endpoint's point of view (local, remote), so both
/// directions of a connection find the same key with no comparison: the packet's source
/// is the local end on egress and the remote end on ingress. The two pods of a node-local
/// connection each have their own entry (their local ends differ).
#[repr(C)]
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug, Default)]
pub struct CtKey<A> {
    pub local: A,
    pub remote: A,
    /// Host byte order. ICMP echo: the identifier on the requester's end, 0 on the other.
    pub local_port: u16,
    pub remote_port: u16,
    pub protocol: u8,
    pub _pad0: u8,
    pub _pad1: u16,
    /// The host veth the entry belongs to: a pod sending with another pod's addresses
    /// never finds that pod's connections.
    pub ifindex: u32,
}

/// Key of CT4: 20 bytes, hashed and compared on every IPv4 packet.
pub type CtKey4 = CtKey<u32>;
/// Key of CT6: 44 bytes (a map of its own keeps the IPv4 key short).
pub type CtKey6 = CtKey<[u32; 4]>;

/// Value of CT4 and CT6.
///
/// An established packet writes to it only when something changes (a TCP flag, the
/// clock's tick), so the two CPUs that usually carry a connection's two
/// directions do not pass its cache line back and forth on every packet. Packets and
/// bytes are counted per CPU, by reason and by rule (COUNTERS, RULE_COUNTERS).
#[repr(C)]
#[derive(Clone, Copy, PartialEq, Eq, Debug, Default)]
pub struct CtValue {
    /// Jiffies (see [`DatapathState::jiffies_hz`]) when the connection was opened.
    pub created_jiffies: u64,
    /// Jiffies when a packet of it was last seen.
    pub last_seen_jiffies: u64,
    /// Rule that allowed the connection ([`RULE_NONE`] when the endpoint was not
    /// isolated).
    pub rule: u32,
    /// `CT_*` flags.
    pub flags: u32,
    /// [`DatapathState::generation`] when the connection was last judged by policy.
    /// A packet that finds an older generation re-checks the connection against the
    /// policy in force, so revoking a permission also stops established connections.
    pub generation: u32,
    /// Service bookkeeping. With [`CT_SERVICE`] (`from_pod`'s entry of a connection to a
    /// Service): the pod's endpoint id, stamped on each of its packets for the hook after
    /// translation. With [`CT_SERVICE_EGRESS`]: the rule that allowed the source pod's
    /// egress to the backend ([`RULE_NONE`] when none did, e.g. a pod reaching itself).
    pub service: u32,
}

/// Value of STATE (ARRAY, one entry at index 0): written by the agent.
#[repr(C)]
#[derive(Clone, Copy, PartialEq, Eq, Debug, Default)]
pub struct DatapathState {
    /// Bumped by the agent after every change of ENDPOINTS, IPCACHE or POLICY.
    pub generation: u32,
    /// `STATE_*` flags.
    pub flags: u32,
    /// The kernel's tick rate (CONFIG_HZ), measured by the agent: conntrack timestamps
    /// are jiffies. 0 until the agent has written it; the programs then assume
    /// [`JIFFIES_HZ_FALLBACK`].
    pub jiffies_hz: u32,
    /// The skb mark bit(s) `from_pod` sets on a connection to a Service address, for the
    /// hook after kube-proxy's translation (0: Service handling off). See
    /// [`SERVICE_MARK_DEFAULT`].
    pub service_mark: u32,
}

/// The default Service mark: one bit that kube-proxy (0x4000 masquerade, 0x8000 drop),
/// Calico (0xffff0000), Cilium (0x0f00 and the upper half), kube-router (0x10000,
/// 0x20000), Weave (0x20000, 0x40000), the AWS VPC CNI (0x80) and Istio (0x539, 0x111,
/// 0x222) leave alone. The skb mark never crosses a network namespace (veth scrubs it),
/// so a pod cannot set it.
pub const SERVICE_MARK_DEFAULT: u32 = 0x0040_0000;

/// Tick rate the programs assume while STATE has none: the highest CONFIG_HZ Linux
/// offers, so that timeouts can only come out longer than configured, never shorter
/// (a live connection is never cut short).
pub const JIFFIES_HZ_FALLBACK: u64 = 1000;

/// Traffic on an interface the agent attached to but has not bound to a programmed pod
/// (a veth that appeared before its pod was known) is dropped as
/// [`Reason::Unprogrammed`]. Without the flag it passes unjudged (but still not with a
/// spoofed source).
pub const STATE_DENY_UNPROGRAMMED: u32 = 1 << 0;

/// The first endpoint id the compiler hands out: 0 is never an endpoint.
pub const ENDPOINT_ID_FIRST: u32 = 1;
/// Never a value of IFACES (below [`ENDPOINT_ID_FIRST`]): what the programs take for an
/// interface without an entry, i.e. not bound to a pod.
pub const IFACE_UNBOUND: u32 = 0;
/// Value of IFACES for a veth whose pod the agent refused to program (a map would have
/// overflowed): everything on it is dropped as [`Reason::Refused`].
pub const IFACE_REFUSED: u32 = u32::MAX;
/// Value of IFACES for a veth several pods claim (a misconfiguration): their policies
/// apply, the interface is not used for anti-spoofing.
pub const IFACE_SHARED: u32 = u32::MAX - 1;

/// The opening packet went to the pod (ingress): the remote end initiated it.
pub const CT_INGRESS: u32 = 1 << 1;
/// A packet of the reply direction was seen (TCP: the handshake completed).
pub const CT_SEEN_REPLY: u32 = 1 << 2;
pub const CT_FIN_INITIATOR: u32 = 1 << 3;
pub const CT_FIN_RESPONDER: u32 = 1 << 4;
pub const CT_RST: u32 = 1 << 5;
/// `from_pod`'s entry of a pod's connection to a Service address: every packet of it
/// leaving the pod carries the Service mark, so the hook after kube-proxy's translation
/// sees which packets still await (or have had) the egress decision on the backend.
pub const CT_SERVICE: u32 = 1 << 6;
/// An entry made after kube-proxy's translation (the backend's veth or an exit device)
/// that also stands for the source pod's egress decision on the backend: the rule in
/// `service` allowed it, and a policy change re-checks that side too.
pub const CT_SERVICE_EGRESS: u32 = 1 << 7;
/// A connection a policy change no longer allows: every packet of it is dropped, in
/// both directions, until the entry times out (dropped packets keep it alive) or a
/// policy change allows it again or a SYN that policy allows opens the tuple afresh.
/// Forgetting it instead would let the next packet from the far end open the
/// connection again as if that end had initiated it.
pub const CT_REVOKED: u32 = 1 << 8;

/// TCP flags as found in byte 13 of the TCP header.
pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
pub const TCP_ACK: u8 = 0x10;

/// Conntrack lifetimes: an idle entry older than this no longer lets packets through.
pub const CT_TIMEOUT_TCP_OPENING_SECS: u64 = 60;
pub const CT_TIMEOUT_TCP_ESTABLISHED_SECS: u64 = 6 * 3600;
pub const CT_TIMEOUT_TCP_CLOSING_SECS: u64 = 10;
pub const CT_TIMEOUT_OTHER_SECS: u64 = 60;

/// `PolicyValue::rule` / `CtValue::rule` when no rule was involved.
pub const RULE_NONE: u32 = u32::MAX;

/// Why a packet got its verdict: the index into COUNTERS and the `reason` of events.
#[repr(u32)]
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Reason {
    /// Neither address is a local endpoint (or not IP at all): not ours to judge.
    NotEndpoint = 0,
    /// Part of a connection conntrack already allowed, original direction.
    Established = 1,
    /// Part of a connection conntrack already allowed, reply direction.
    Reply = 2,
    /// The pod is not isolated in this direction.
    NotIsolated = 3,
    /// A rule allowed a new connection.
    PolicyAllowed = 4,
    /// From the pod's own node (kubelet probes).
    FromHost = 5,
    /// Isolated and no rule allows it.
    PolicyDenied = 6,
    /// Would have been denied; let through because the endpoint is in audit mode.
    AuditAllowed = 7,
    /// The headers could not be parsed.
    Malformed = 8,
    /// A later fragment of an IP packet. Only first fragments carry ports; they are
    /// judged, and a datagram whose first fragment was dropped cannot be reassembled.
    Fragment = 9,
    /// IPv6 neighbour discovery and MLD: the link cannot work without them.
    NetworkControl = 10,
    /// Leaving a pod with a source address that is not a local endpoint's (nor
    /// link-local or unspecified): spoofed, dropped.
    Spoofed = 11,
    /// On a pod interface the agent has not programmed yet (the pod's veth appeared
    /// before the agent knew the pod), under the deny default
    /// ([`STATE_DENY_UNPROGRAMMED`]).
    Unprogrammed = 12,
    /// On the interface of a pod the agent refused to program because a map was full.
    Refused = 13,
    /// A pod's new connection to a Service address (`from_pod`): let through with the
    /// Service mark; its egress is judged after kube-proxy's translation, on the backend.
    ToService = 14,
    /// A pod reaching itself (through its own Service): never blocked.
    Hairpin = 15,
    /// A marked connection leaving the node whose source is no longer a local pod (kube-
    /// proxy masqueraded it, as `--masquerade-all` does): its egress cannot be judged on
    /// the backend, so it is dropped rather than let through unjudged.
    Masqueraded = 16,
    /// A packet of a connection that a policy change revoked (conntrack keeps the
    /// entry as [`CT_REVOKED`]): dropped in both directions.
    Revoked = 17,
    /// A TCP packet that opens nothing (no SYN) of a connection conntrack has no entry
    /// for (lost to LRU eviction, or the agent restarted): the receiving pod's policy
    /// allows the connection the other way, so it is its reply; the entry is made again.
    Resumed = 18,
    /// An ICMP error (unreachable, packet too big, time exceeded, parameter problem)
    /// about a packet of a tracked connection: passes like the connection's replies.
    Related = 19,
    /// A ClusterNetworkPolicy rule (Admin or Baseline tier) accepted a new connection.
    ClusterAccepted = 20,
    /// A ClusterNetworkPolicy rule (Admin or Baseline tier) denied a new connection.
    ClusterDenied = 21,
}

pub const REASON_COUNT: u32 = 22;

impl Reason {
    pub const ALL: [Reason; REASON_COUNT as usize] = [
        Reason::NotEndpoint,
        Reason::Established,
        Reason::Reply,
        Reason::NotIsolated,
        Reason::PolicyAllowed,
        Reason::FromHost,
        Reason::PolicyDenied,
        Reason::AuditAllowed,
        Reason::Malformed,
        Reason::Fragment,
        Reason::NetworkControl,
        Reason::Spoofed,
        Reason::Unprogrammed,
        Reason::Refused,
        Reason::ToService,
        Reason::Hairpin,
        Reason::Masqueraded,
        Reason::Revoked,
        Reason::Resumed,
        Reason::Related,
        Reason::ClusterAccepted,
        Reason::ClusterDenied,
    ];

    pub const fn is_drop(self) -> bool {
        matches!(
            self,
            Reason::PolicyDenied
                | Reason::ClusterDenied
                | Reason::Malformed
                | Reason::Spoofed
                | Reason::Unprogrammed
                | Reason::Refused
                | Reason::Masqueraded
                | Reason::Revoked
        )
    }

    pub const fn name(self) -> &'static str {
        match self {
            Reason::NotEndpoint => "not-endpoint",
            Reason::Established => "established",
            Reason::Reply => "reply",
            Reason::NotIsolated => "not-isolated",
            Reason::PolicyAllowed => "policy-allowed",
            Reason::FromHost => "from-host",
            Reason::PolicyDenied => "policy-denied",
            Reason::AuditAllowed => "audit-allowed",
            Reason::Malformed => "malformed",
            Reason::Fragment => "fragment",
            Reason::NetworkControl => "network-control",
            Reason::Spoofed => "spoofed",
            Reason::Unprogrammed => "unprogrammed",
            Reason::Refused => "refused",
            Reason::ToService => "to-service",
            Reason::Hairpin => "hairpin",
            Reason::Masqueraded => "masqueraded",
            Reason::Revoked => "revoked",
            Reason::Resumed => "resumed",
            Reason::Related => "related",
            Reason::ClusterAccepted => "cluster-accepted",
            Reason::ClusterDenied => "cluster-denied",
        }
    }
}

/// Index of COUNTERS for a reason seen in a direction ([`DIR_INGRESS`] or
/// [`DIR_EGRESS`]): ingress reasons first, then egress.
pub const fn counter_index(reason: Reason, direction: u8) -> u32 {
    reason as u32
        + if direction == DIR_EGRESS {
            REASON_COUNT
        } else {
            0
        }
}

/// Index of COUNTERS after the reasons: conntrack entries created (an insert of a key
/// that was not in CT4 or CT6; `packets` counts them). Against the entries in the maps
/// it tells how many LRU eviction took.
pub const COUNTER_CT_CREATED: u32 = 2 * REASON_COUNT;

/// Entries of COUNTERS.
pub const COUNTER_SLOTS: u32 = 2 * REASON_COUNT + 1;

/// Key of NODE_PORTS (HASH, value `u32`, unused): a port on which kube-proxy translates
/// connections to this node's addresses (a NodePort, or a Service port of an externalIP
/// that is a node address). A pod's connection to a node address on such a port is
/// Service traffic.
#[repr(C)]
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Debug, Default)]
pub struct ServicePort {
    /// Host byte order.
    pub port: u16,
    pub protocol: u8,
    pub _pad: u8,
}

/// Value of COUNTERS (PERCPU_ARRAY indexed by [`counter_index`]).
#[repr(C)]
#[derive(Clone, Copy, PartialEq, Eq, Debug, Default)]
pub struct Counter {
    pub packets: u64,
    pub bytes: u64,
}

/// An entry of EVENTS (RINGBUF): a dropped packet or a newly allowed connection.
#[repr(C)]
#[derive(Clone, Copy, PartialEq, Eq, Debug, Default)]
pub struct VerdictEvent {
    /// `bpf_ktime_get_ns` (CLOCK_MONOTONIC).
    pub timestamp_ns: u64,
    pub src: Addr,
    pub dst: Addr,
    /// Host byte order; 0 where the protocol has none.
    pub sport: u16,
    pub dport: u16,
    pub protocol: u8,
    /// [`DIR_INGRESS`] or [`DIR_EGRESS`], from the endpoint's point of view.
    pub direction: u8,
    /// A [`Reason`] as u8.
    pub reason: u8,
    pub _pad0: u8,
    /// The local endpoint (0 when unknown, e.g. malformed packets).
    pub endpoint: u32,
    /// Identity of the peer as IPCACHE gave it (0 when not looked up).
    pub peer_identity: u32,
    /// Rule that allowed it, or [`RULE_NONE`].
    pub rule: u32,
    /// Interface the packet was seen on.
    pub ifindex: u32,
    /// Packet length.
    pub len: u32,
    pub _pad1: u32,
}

/// Reasons that produce an event (everything else is either part of a known connection
/// or not ours to judge).
pub const fn reason_emits_event(reason: Reason) -> bool {
    matches!(
        reason,
        Reason::PolicyDenied
            | Reason::ClusterDenied
            | Reason::ClusterAccepted
            | Reason::AuditAllowed
            | Reason::PolicyAllowed
            | Reason::NotIsolated
            | Reason::FromHost
            | Reason::Malformed
            | Reason::Spoofed
            | Reason::Unprogrammed
            | Reason::Refused
            | Reason::ToService
            | Reason::Hairpin
            | Reason::Masqueraded
            | Reason::Revoked
            | Reason::Resumed
    )
}

/// In-kernel rate limit of events, per CPU: a token bucket refilled at this rate...
pub const EVENTS_PER_SECOND_PER_CPU: u64 = 2_000;
/// ...holding at most this many tokens.
pub const EVENTS_BURST: u64 = 1_000;

/// Value of EVENT_BUDGET (PERCPU_ARRAY, one entry): the token bucket.
#[repr(C)]
#[derive(Clone, Copy, PartialEq, Eq, Debug, Default)]
pub struct EventBudget {
    pub tokens: u64,
    pub last_refill_ns: u64,
    /// Events not sent because the bucket was empty.
    pub suppressed: u64,
    /// Events not sent because the ring buffer was full.
    pub lost: u64,
}

/// Names of the maps and programs in the object file; the agent pins them under these.
pub mod names {
    pub const ENDPOINTS: &str = "ENDPOINTS";
    pub const IPCACHE: &str = "IPCACHE";
    pub const PEERS: &str = "PEERS";
    pub const POLICY: &str = "POLICY";
    pub const POLICY_RANGES: &str = "POLICY_RANGES";
    pub const CT4: &str = "CT4";
    pub const CT6: &str = "CT6";
    pub const COUNTERS: &str = "COUNTERS";
    pub const STATE: &str = "STATE";
    pub const EVENTS: &str = "EVENTS";
    pub const EVENT_BUDGET: &str = "EVENT_BUDGET";
    pub const RULE_COUNTERS: &str = "RULE_COUNTERS";
    pub const IFACES: &str = "IFACES";
    pub const NODE_PORTS: &str = "NODE_PORTS";
    /// Returns the low 32 bits of jiffies; run by the agent (BPF_PROG_TEST_RUN, never
    /// attached) to measure the kernel's tick rate.
    pub const PROG_JIFFIES: &str = "jiffies";
    /// TC ingress of the host-side veth: packets leaving the pod (its egress policy).
    pub const PROG_FROM_POD: &str = "from_pod";
    /// TC egress of the host-side veth: packets entering the pod (its ingress policy).
    pub const PROG_TO_POD: &str = "to_pod";
    /// TC egress of the node's exit devices (uplink, overlay, links to hosts): the
    /// egress decision, after kube-proxy's translation, of pods' Service connections
    /// whose backend is not on this node.
    pub const PROG_LEAVE_NODE: &str = "leave_node";
}

/// Default capacities (the agent can override them at load time).
pub mod capacity {
    pub const ENDPOINTS: u32 = 4096;
    /// Each of IPCACHE and PEERS (a slot of PEERS per IPCACHE entry).
    pub const IPCACHE: u32 = 262_144;
    pub const POLICY: u32 = 262_144;
    /// Port-range entries (most rules name single ports).
    pub const POLICY_RANGES: u32 = 65_536;
    /// Each of CT4 and CT6.
    pub const CT: u32 = 262_144;
    /// Host-side interfaces bound to their pod (IFACES).
    pub const IFACES: u32 = ENDPOINTS;
    /// Ports kube-proxy translates on node addresses (NodePorts: at most 2,768 per
    /// protocol in the default range, three protocols).
    pub const NODE_PORTS: u32 = 16_384;
    /// Rules with their own packet/byte counters (rule indices beyond are not counted).
    pub const RULE_COUNTERS: u32 = 65_536;
    /// Bytes of the EVENTS ring buffer (a power of two, a multiple of the page size).
    pub const EVENTS_BYTES: u32 = 1 << 20;
}

#[cfg(feature = "user")]
mod user {
    // SAFETY: every type is #[repr(C)], Copy, built only of integers and byte arrays,
    // with all padding spelled out as fields; any bit pattern is valid.
    unsafe impl aya::Pod for super::Addr {}
    unsafe impl aya::Pod for super::EndpointInfo {}
    unsafe impl aya::Pod for super::PeerInfo {}
    unsafe impl aya::Pod for super::PolicyKey {}
    unsafe impl aya::Pod for super::PolicyValue {}
    unsafe impl aya::Pod for super::CtKey4 {}
    unsafe impl aya::Pod for super::CtKey6 {}
    unsafe impl aya::Pod for super::CtValue {}
    unsafe impl aya::Pod for super::Counter {}
    unsafe impl aya::Pod for super::DatapathState {}
    unsafe impl aya::Pod for super::VerdictEvent {}
    unsafe impl aya::Pod for super::EventBudget {}
    unsafe impl aya::Pod for super::ServicePort {}
}

// Layout checks: no implicit padding anywhere.
const _: () = {
    use core::mem::size_of;
    assert!(IFACE_UNBOUND < ENDPOINT_ID_FIRST);
    assert!(size_of::<Addr>() == 20);
    assert!(size_of::<EndpointInfo>() == 16);
    assert!(size_of::<PeerInfo>() == 8);
    assert!(size_of::<PolicyKey>() == 12);
    assert!(size_of::<PolicyValue>() == 8);
    assert!(size_of::<CtKey4>() == 20);
    assert!(size_of::<CtKey6>() == 44);
    assert!(size_of::<CtValue>() == 32);
    assert!(size_of::<DatapathState>() == 16);
    assert!(size_of::<VerdictEvent>() == 80);
    assert!(size_of::<EventBudget>() == 32);
    assert!(size_of::<Counter>() == 16);
    assert!(size_of::<ServicePort>() == 4);
    assert!(POLICY_PREFIX_FULL as usize == size_of::<PolicyKey>() * 8);
};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_order_by_family_then_bytes() {
        let mut addrs = [
            Addr::default(),
            Addr::v4([10, 0, 0, 1]),
            Addr::v4([10, 0, 0, 2]),
            Addr::v4([9, 255, 255, 255]),
            Addr::v4([255, 0, 0, 0]),
        ]
        .to_vec();
        for (i, byte) in [0, 7, 8, 15].into_iter().enumerate() {
            let mut bytes = [0; 16];
            bytes[byte] = 0x80 >> i;
            addrs.push(Addr {
                family: FAMILY_IPV6,
                bytes,
            });
            bytes[0] = 0xfd;
            addrs.push(Addr {
                family: FAMILY_IPV6,
                bytes,
            });
        }
        for a in &addrs {
            for b in &addrs {
                let bytewise = (a.family, a.bytes).cmp(&(b.family, b.bytes));
                assert_eq!(a.cmp(b), bytewise, "{a:?} vs {b:?}");
                assert_eq!(a.partial_cmp(b), Some(bytewise));
            }
        }
    }
}
