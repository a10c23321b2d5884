//! Own connection tracking in LRU hashes, so that replies of allowed connections pass
//! in both directions and established connections cost one lookup.
//!
//! A connection is keyed from its endpoint's point of view, (local end, remote end), so
//! both directions of it build the same key by plain field selection: the packet's
//! source is the local end on egress (`from_pod`) and the remote end on ingress
//! (`to_pod`). IPv4 and IPv6 have a map each (CT4, CT6), so the key hashed on every
//! IPv4 packet is 20 bytes.

use aya_ebpf::{helpers::generated::bpf_jiffies64, maps::LruHashMap};
use netpol_common::{
    COUNTER_CT_CREATED, CT_FIN_INITIATOR, CT_FIN_RESPONDER, CT_INGRESS, CT_REVOKED, CT_RST,
    CT_SEEN_REPLY, CT_SERVICE, CT_SERVICE_EGRESS, CT_TIMEOUT_OTHER_SECS,
    CT_TIMEOUT_TCP_CLOSING_SECS, CT_TIMEOUT_TCP_ESTABLISHED_SECS, CT_TIMEOUT_TCP_OPENING_SECS,
    CtKey, CtKey4, CtKey6, CtValue, DIR_EGRESS, DIR_INGRESS, JIFFIES_HZ_FALLBACK, PROTO_TCP,
    RULE_NONE, Reason, TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN,
};

use crate::{
    maps::{COUNTERS, CT4, CT6},
    parse::{Family, Packet, Quoted, V4, V6},
    policy::Connection,
};

/// The conntrack key of family `T`.
pub type CtKeyOf<T> = CtKey<<T as Family>::Raw>;

/// An address family's conntrack table: its map, keyed by [`CtKey`] of its addresses.
pub trait Table: Family + Sized {
    fn map() -> &'static LruHashMap<CtKey<Self::Raw>, CtValue>;

    /// The key of `packet` as seen by the endpoint whose hook runs.
    #[inline(always)]
    fn key(packet: &Packet<Self>, ends: Ends, ifindex: u32) -> CtKey<Self::Raw> {
        let (local, remote) = ends.addresses(packet);
        let (local_port, remote_port) = ends.ports(packet);
        CtKey {
            local,
            remote,
            local_port,
            remote_port,
            protocol: packet.protocol,
            _pad0: 0,
            _pad1: 0,
            ifindex,
        }
    }
}

/// The key, as the endpoint whose hook runs keys its connection, of the packet an ICMP
/// error quotes: that packet travelled the other way (the endpoint sent what a router
/// or the far end complains about, or is complaining about what it received).
#[inline(always)]
pub fn quoted_key<T: Table>(quoted: &Quoted<T>, ends: Ends, ifindex: u32) -> CtKey<T::Raw> {
    let (local, remote, local_port, remote_port) = if ends.local_is_src {
        (quoted.dst, quoted.src, quoted.dport, quoted.sport)
    } else {
        (quoted.src, quoted.dst, quoted.sport, quoted.dport)
    };
    CtKey {
        local,
        remote,
        local_port,
        remote_port,
        protocol: quoted.protocol,
        _pad0: 0,
        _pad1: 0,
        ifindex,
    }
}

impl Table for V4 {
    #[inline(always)]
    fn map() -> &'static LruHashMap<CtKey4, CtValue> {
        &CT4
    }
}

impl Table for V6 {
    #[inline(always)]
    fn map() -> &'static LruHashMap<CtKey6, CtValue> {
        &CT6
    }
}

/// Which end of a packet is the endpoint's: fixed by the hook.
#[derive(Clone, Copy)]
pub struct Ends {
    /// Egress (`from_pod`): the local end sent the packet.
    pub local_is_src: bool,
}

impl Ends {
    #[inline(always)]
    pub fn of(direction: u8) -> Ends {
        Ends {
            local_is_src: direction == DIR_EGRESS,
        }
    }

    /// (local, remote) addresses.
    #[inline(always)]
    pub fn addresses<F: Family>(self, packet: &Packet<F>) -> (F::Raw, F::Raw) {
        if self.local_is_src {
            (packet.src, packet.dst)
        } else {
            (packet.dst, packet.src)
        }
    }

    /// (local, remote) ports.
    #[inline(always)]
    pub fn ports<F: Family>(self, packet: &Packet<F>) -> (u16, u16) {
        if self.local_is_src {
            (packet.sport, packet.dport)
        } else {
            (packet.dport, packet.sport)
        }
    }
}

/// Conntrack's clock: jiffies. The verifier turns `bpf_jiffies64` into one load, where
/// the coarse clock helper cost ~15 ns per packet.
pub struct Clock {
    now: u64,
    /// Jiffies per second.
    hz: u64,
}

impl Clock {
    /// `hz` as the agent wrote it in STATE (0: not yet).
    #[inline(always)]
    pub fn now(hz: u32) -> Clock {
        Clock {
            // SAFETY: a helper without preconditions.
            now: unsafe { bpf_jiffies64() },
            hz: if hz == 0 {
                JIFFIES_HZ_FALLBACK
            } else {
                u64::from(hz)
            },
        }
    }

    /// Whether an entry last seen at `then` has outlived `lifetime_secs`.
    #[inline(always)]
    fn expired(&self, then: u64, lifetime_secs: u64) -> bool {
        self.now.saturating_sub(then) > lifetime_secs * self.hz
    }
}

#[inline(always)]
fn closing(flags: u32) -> bool {
    flags & CT_RST != 0
        || flags & (CT_FIN_INITIATOR | CT_FIN_RESPONDER) == (CT_FIN_INITIATOR | CT_FIN_RESPONDER)
}

#[inline(always)]
fn lifetime_secs(protocol: u8, flags: u32) -> u64 {
    if protocol != PROTO_TCP {
        CT_TIMEOUT_OTHER_SECS
    } else if closing(flags) {
        CT_TIMEOUT_TCP_CLOSING_SECS
    } else if flags & CT_SEEN_REPLY == 0 {
        CT_TIMEOUT_TCP_OPENING_SECS
    } else {
        CT_TIMEOUT_TCP_ESTABLISHED_SECS
    }
}

/// The connection an entry describes, as the policy sees it: who opened it decides the
/// direction and which end's port is the responder's.
#[inline(always)]
fn connection<F: Family>(packet: &Packet<F>, ends: Ends, flags: u32) -> Connection {
    let (_, peer) = ends.addresses(packet);
    let (local_port, remote_port) = ends.ports(packet);
    let (direction, port) = if flags & CT_INGRESS != 0 {
        (DIR_INGRESS, local_port)
    } else {
        (DIR_EGRESS, remote_port)
    };
    Connection {
        direction,
        peer: F::addr(&peer),
        protocol: packet.protocol,
        port,
        defer_services: false,
    }
}

/// What conntrack knows about a packet of a live connection.
pub struct Tracked {
    pub reason: Reason,
    /// The rule that allowed the connection (for per-rule counters), or `RULE_NONE`.
    pub rule: u32,
    /// The entry's `service` word (see [`CtValue::service`]).
    pub service: u32,
    /// The entry's `CT_*` flags.
    pub flags: u32,
}

/// A connection the current policy still allows, as a re-check found it.
pub struct Rechecked {
    pub rule: u32,
    /// The entry's `service` word (see [`CtValue::service`]).
    pub service: u32,
    /// `CT_*` flags the entry gains (e.g. [`CT_SERVICE`] when the pod became egress
    /// isolated while connected to a Service).
    pub add_flags: u32,
}

/// The verdict conntrack gives on its own: `Some` for a packet of a live (or revoked)
/// connection.
///
/// An entry made under an older policy generation is first re-judged by `recheck`
/// (the connection as policy sees it, and the entry's flags -> what allows it now, or
/// `None`): a connection the current policy no longer allows is kept as revoked
/// ([`CT_REVOKED`]), and its packets are dropped in both directions until the entry
/// times out, a later policy allows it again, or a SYN opens the tuple afresh (judged
/// by policy: `None` is returned for it).
#[inline(always)]
pub fn track<T: Table>(
    key: &CtKey<T::Raw>,
    packet: &Packet<T>,
    ends: Ends,
    clock: &Clock,
    generation: u32,
    recheck: impl FnOnce(Connection, u32) -> Option<Rechecked>,
) -> Option<Tracked> {
    let entry = T::map().get_ptr_mut(key)?;
    // SAFETY: the pointer comes from a successful lookup; LRU entries stay valid for the
    // duration of the program (RCU). Two CPUs racing on one entry may lose a flag
    // update, never more (the next packet sets it again).
    let entry = unsafe { &mut *entry };
    let old_flags = entry.flags;
    if clock.expired(
        entry.last_seen_jiffies,
        lifetime_secs(packet.protocol, old_flags),
    ) {
        return None;
    }
    let tcp = packet.protocol == PROTO_TCP;
    // A new SYN on a closed or revoked connection's tuple opens a new connection: judge
    // it afresh (a denied one leaves the entry as it is).
    if tcp
        && (closing(old_flags) || old_flags & CT_REVOKED != 0)
        && packet.tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN
    {
        return None;
    }
    let mut flags = old_flags;
    if entry.generation != generation {
        match recheck(connection(packet, ends, old_flags), old_flags) {
            Some(now) => {
                entry.rule = now.rule;
                entry.service = now.service;
                entry.generation = generation;
                flags = (flags & !CT_REVOKED) | now.add_flags;
            }
            None => {
                entry.generation = generation;
                entry.flags = old_flags | CT_REVOKED;
                entry.last_seen_jiffies = clock.now;
                return Some(revoked(old_flags));
            }
        }
    } else if old_flags & CT_REVOKED != 0 {
        // Dropped packets keep the entry (and so the revocation) alive.
        if entry.last_seen_jiffies != clock.now {
            entry.last_seen_jiffies = clock.now;
        }
        return Some(revoked(old_flags));
    }
    // The initiator is the local end unless the connection came in (ingress).
    let from_initiator = ends.local_is_src == (old_flags & CT_INGRESS == 0);
    if !from_initiator {
        flags |= CT_SEEN_REPLY;
    }
    if tcp {
        if packet.tcp_flags & TCP_RST != 0 {
            flags |= CT_RST;
        }
        if packet.tcp_flags & TCP_FIN != 0 {
            flags |= if from_initiator {
                CT_FIN_INITIATOR
            } else {
                CT_FIN_RESPONDER
            };
        }
    }
    // Write only what changed: the flags a few times per connection, the timestamp
    // once per tick.
    if flags != old_flags {
        entry.flags = flags;
    }
    if entry.last_seen_jiffies != clock.now {
        entry.last_seen_jiffies = clock.now;
    }
    let reason = if from_initiator {
        Reason::Established
    } else {
        Reason::Reply
    };
    Some(Tracked {
        reason,
        rule: entry.rule,
        service: entry.service,
        flags,
    })
}

#[inline(always)]
fn revoked(flags: u32) -> Tracked {
    Tracked {
        reason: Reason::Revoked,
        rule: RULE_NONE,
        service: RULE_NONE,
        flags: flags | CT_REVOKED,
    }
}

/// Whether an ICMP error whose quoted packet has the conntrack key `key` belongs to a
/// live connection (neither expired nor revoked). Read only: an error refreshes
/// nothing.
#[inline(always)]
pub fn is_related<T: Table>(key: &CtKey<T::Raw>, clock: &Clock) -> bool {
    // SAFETY: the value is copied at once.
    match unsafe { T::map().get(key) } {
        Some(entry) => {
            entry.flags & CT_REVOKED == 0
                && !clock.expired(
                    entry.last_seen_jiffies,
                    lifetime_secs(key.protocol, entry.flags),
                )
        }
        None => false,
    }
}

/// Records on a live entry that the source pod's egress to the backend was judged after
/// translation (a connection that was already open when its pod became egress isolated).
#[inline(always)]
pub fn add_service_egress<T: Table>(key: &CtKey<T::Raw>, egress_rule: u32) {
    if let Some(entry) = T::map().get_ptr_mut(key) {
        // SAFETY: as in `track`.
        let entry = unsafe { &mut *entry };
        entry.service = egress_rule;
        entry.flags |= CT_SERVICE_EGRESS;
    }
}

/// Revokes a live connection: its packets are dropped from now on (see [`track`]).
#[inline(always)]
pub fn revoke<T: Table>(key: &CtKey<T::Raw>) {
    if let Some(entry) = T::map().get_ptr_mut(key) {
        // SAFETY: as in `track`.
        let entry = unsafe { &mut *entry };
        entry.flags |= CT_REVOKED;
    }
}

/// What a new entry records beside its key.
pub struct Opening {
    /// Who opened the connection, from the endpoint's point of view.
    pub direction: u8,
    pub rule: u32,
    /// [`CT_SERVICE`] or [`CT_SERVICE_EGRESS`], or 0.
    pub service_flags: u32,
    /// See [`CtValue::service`].
    pub service: u32,
}

/// Record a connection whose first packet was allowed.
#[inline(always)]
pub fn open<T: Table>(
    key: &CtKey<T::Raw>,
    packet: &Packet<T>,
    opening: &Opening,
    generation: u32,
    clock: &Clock,
) {
    if packet.protocol == PROTO_TCP && packet.tcp_flags & TCP_RST != 0 {
        return;
    }
    let direction = if opening.direction == DIR_INGRESS {
        CT_INGRESS
    } else {
        0
    };
    let value = CtValue {
        created_jiffies: clock.now,
        last_seen_jiffies: clock.now,
        rule: opening.rule,
        flags: direction | (opening.service_flags & (CT_SERVICE | CT_SERVICE_EGRESS)),
        generation,
        service: opening.service,
    };
    // A full LRU evicts the least recently used entry; an error here only means the
    // next packet is judged by policy again. A new key is counted (against the entries
    // in the map, the agent tells evictions); a tuple opened again is overwritten.
    if T::map().insert(key, value, BPF_NOEXIST).is_ok() {
        if let Some(created) = COUNTERS.get_ptr_mut(COUNTER_CT_CREATED) {
            // SAFETY: per-CPU slot, no concurrent writer.
            unsafe { (*created).packets += 1 };
        }
    } else {
        let _ = T::map().insert(key, value, 0);
    }
}

/// `BPF_NOEXIST`: insert only a key that is not in the map.
const BPF_NOEXIST: u64 = 1;
