//! Own connection tracking in an LRU hash, so that replies of allowed connections pass
//! in both directions and established connections cost one lookup.
//!
//! Both directions of a connection share one key: the two (address, port) ends are
//! stored in a canonical order. `local_b` records which end is the endpoint whose hook
//! made the entry, so the two pods of a node-local connection each keep their own.

use netpol_common::{
    Addr, CT_FIN_INITIATOR, CT_FIN_RESPONDER, CT_INGRESS, CT_INITIATOR_B, CT_RST, CT_SEEN_REPLY,
    CT_TIMEOUT_OTHER_NS, CT_TIMEOUT_TCP_CLOSING_NS, CT_TIMEOUT_TCP_ESTABLISHED_NS,
    CT_TIMEOUT_TCP_OPENING_NS, CtKey, CtValue, DIR_EGRESS, DIR_INGRESS, PROTO_TCP, RULE_NONE,
    Reason, TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN,
};

use crate::{maps::CT, parse::Packet, policy::Connection};

/// A packet's conntrack key and which end of it sent the packet.
pub struct Flow {
    pub key: CtKey,
    /// The packet's source is end a of the key.
    pub src_is_a: bool,
}

#[inline(always)]
fn words(addr: &Addr) -> (u64, u64) {
    let b = &addr.bytes;
    (
        u64::from_be_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]]),
        u64::from_be_bytes([b[8], b[9], b[10], b[11], b[12], b[13], b[14], b[15]]),
    )
}

impl Flow {
    #[inline(always)]
    pub fn of(packet: &Packet, direction: u8, ifindex: u32) -> Flow {
        let src = (words(&packet.src), packet.sport);
        let dst = (words(&packet.dst), packet.dport);
        let src_is_a = src <= dst;
        let (addr_a, port_a, addr_b, port_b) = if src_is_a {
            (packet.src, packet.sport, packet.dst, packet.dport)
        } else {
            (packet.dst, packet.dport, packet.src, packet.sport)
        };
        // From the pod (egress) the local end is the source, towards it the destination.
        let local_is_src = direction == DIR_EGRESS;
        let local_b = if local_is_src { !src_is_a } else { src_is_a };
        Flow {
            key: CtKey {
                addr_a,
                addr_b,
                port_a,
                port_b,
                protocol: packet.protocol,
                local_b: u8::from(local_b),
                _pad: [0; 2],
                ifindex,
            },
            src_is_a,
        }
    }
}

#[inline(always)]
fn closing(flags: u32) -> bool {
    flags & CT_RST != 0
        || flags & (CT_FIN_INITIATOR | CT_FIN_RESPONDER) == (CT_FIN_INITIATOR | CT_FIN_RESPONDER)
}

#[inline(always)]
fn lifetime(protocol: u8, flags: u32) -> u64 {
    if protocol != PROTO_TCP {
        CT_TIMEOUT_OTHER_NS
    } else if closing(flags) {
        CT_TIMEOUT_TCP_CLOSING_NS
    } else if flags & CT_SEEN_REPLY == 0 {
        CT_TIMEOUT_TCP_OPENING_NS
    } else {
        CT_TIMEOUT_TCP_ESTABLISHED_NS
    }
}

/// The connection an entry describes, as the policy sees it.
#[inline(always)]
fn connection<'a>(key: &'a CtKey, flags: u32) -> Connection<'a> {
    let initiator_b = flags & CT_INITIATOR_B != 0;
    let local_b = key.local_b != 0;
    let peer = if local_b { &key.addr_a } else { &key.addr_b };
    let port = if initiator_b { key.port_a } else { key.port_b };
    let direction = if flags & CT_INGRESS != 0 {
        DIR_INGRESS
    } else {
        DIR_EGRESS
    };
    Connection {
        direction,
        peer,
        protocol: key.protocol,
        port,
    }
}

/// What conntrack knows about a packet of a live connection.
pub struct Tracked {
    pub reason: Reason,
    /// The rule that allowed the connection (for per-rule counters), or `RULE_NONE`.
    pub rule: u32,
}

/// The verdict conntrack gives on its own: `Some` for a packet of a live connection.
///
/// An entry made under an older policy generation is first re-judged by `recheck`
/// (the connection as policy sees it -> allowing rule or `None`): a connection the
/// current policy no longer allows is forgotten and its packet dropped.
#[inline(always)]
pub fn track(
    flow: &Flow,
    packet: &Packet,
    now: u64,
    len: u32,
    generation: u32,
    recheck: impl FnOnce(&Connection) -> Option<u32>,
) -> Option<Tracked> {
    let entry = CT.get_ptr_mut(flow.key)?;
    // SAFETY: the pointer comes from a successful lookup; LRU entries stay valid for the
    // duration of the program (RCU). Racing updates of counters may lose increments.
    let entry = unsafe { &mut *entry };
    let mut flags = entry.flags;
    if now.saturating_sub(entry.last_seen_ns) > lifetime(packet.protocol, flags) {
        return None;
    }
    let tcp = packet.protocol == PROTO_TCP;
    // A new SYN on a closed connection's tuple opens a new connection: judge it afresh.
    if tcp && closing(flags) && packet.tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN {
        return None;
    }
    if entry.generation != generation {
        match recheck(&connection(&flow.key, flags)) {
            Some(rule) => {
                entry.rule = rule;
                entry.generation = generation;
            }
            None => {
                let _ = CT.remove(flow.key);
                return Some(Tracked {
                    reason: Reason::PolicyDenied,
                    rule: RULE_NONE,
                });
            }
        }
    }
    let from_initiator = flow.src_is_a != (flags & CT_INITIATOR_B != 0);
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
    entry.flags = flags;
    entry.last_seen_ns = now;
    entry.packets += 1;
    entry.bytes += u64::from(len);
    let reason = if from_initiator {
        Reason::Established
    } else {
        Reason::Reply
    };
    Some(Tracked {
        reason,
        rule: entry.rule,
    })
}

/// Record a connection whose first packet was allowed.
#[inline(always)]
pub fn open(
    flow: &Flow,
    packet: &Packet,
    direction: u8,
    rule: u32,
    generation: u32,
    now: u64,
    len: u32,
) {
    if packet.protocol == PROTO_TCP && packet.tcp_flags & TCP_RST != 0 {
        return;
    }
    let mut flags = if flow.src_is_a { 0 } else { CT_INITIATOR_B };
    if direction == DIR_INGRESS {
        flags |= CT_INGRESS;
    }
    let value = CtValue {
        created_ns: now,
        last_seen_ns: now,
        packets: 1,
        bytes: u64::from(len),
        rule,
        flags,
        generation,
        _pad: 0,
    };
    // A full LRU evicts the least recently used entry; an error here only means the
    // next packet is judged by policy again.
    let _ = CT.insert(flow.key, value, 0);
}
