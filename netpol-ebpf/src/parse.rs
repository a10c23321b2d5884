//! Header parsing: Ethernet, IPv4, IPv6 (extension headers skipped, bounded), and the
//! first bytes of TCP, UDP, SCTP, ICMP and ICMPv6.
//!
//! Fields are read by direct packet access when they lie in the linear part of the
//! skb (the verifier checks every access against `data_end`), and with
//! `bpf_skb_load_bytes` otherwise, so a header in a paged fragment is still read and a
//! short packet is an error, never an out-of-bounds read.
//!
//! Header layouts are `network-types`' (`EthHdr`, `Ipv4Hdr`, `Ipv6Hdr`, `TcpHdr`,
//! `UdpHdr`, `SctpHdr`, `IcmpHdr`): only the fields used are read, at their offsets in
//! those types, never a whole header.

use core::mem::offset_of;

use aya_ebpf::programs::TcContext;
use netpol_common::{
    Addr, FAMILY_IPV4, FAMILY_IPV6, PROTO_ICMP, PROTO_ICMPV6, PROTO_SCTP, PROTO_TCP, PROTO_UDP,
};
use network_types::{
    eth::{EthHdr, EtherType},
    icmp::{IcmpEcho, IcmpHdr, IcmpV6Hdr},
    ip::{IpProto, Ipv4Hdr, Ipv6Hdr},
    sctp::SctpHdr,
    tcp::TcpHdr,
    udp::UdpHdr,
};

/// The EtherType as it lies in the frame (network byte order), read as a `u16`.
const ETHER_TYPE: usize = offset_of!(EthHdr, ether_type);
const ETH_P_IP: u16 = EtherType::Ipv4 as u16;
const ETH_P_IPV6: u16 = EtherType::Ipv6 as u16;

const IPV6_NEXT_HEADER: usize = EthHdr::LEN + offset_of!(Ipv6Hdr, next_hdr);
const NEXTHDR_HOP: u8 = IpProto::HopOpt as u8;
const NEXTHDR_ROUTING: u8 = IpProto::Ipv6Route as u8;
const NEXTHDR_FRAGMENT: u8 = IpProto::Ipv6Frag as u8;
const NEXTHDR_AUTH: u8 = IpProto::Ah as u8;
const NEXTHDR_DEST: u8 = IpProto::Ipv6Opts as u8;

/// Source and destination port (network byte order), where UDP and SCTP headers alike
/// have them.
const SPORT: usize = offset_of!(UdpHdr, src);
const DPORT: usize = offset_of!(UdpHdr, dst);
const _: () = assert!(offset_of!(SctpHdr, src) == SPORT && offset_of!(SctpHdr, dst) == DPORT);
const TCP_SPORT: usize = offset_of!(TcpHdr, source);
const TCP_DPORT: usize = offset_of!(TcpHdr, dest);
/// The TCP flags: the second byte of the 16 bits shared by data offset and flags.
const TCP_FLAGS: usize = offset_of!(TcpHdr, _bitfield_1) + 1;
/// ICMP and ICMPv6 share the layout read here: the type, and an echo's identifier.
const ICMP_TYPE: usize = offset_of!(IcmpHdr, type_);
const ICMP_ECHO_ID: usize = offset_of!(IcmpHdr, data) + offset_of!(IcmpEcho, id);
const _: () = assert!(
    offset_of!(IcmpV6Hdr, type_) == ICMP_TYPE
        && offset_of!(IcmpV6Hdr, data) == offset_of!(IcmpHdr, data)
);
/// More extension headers than this and the packet is treated as malformed.
const MAX_EXT_HEADERS: usize = 8;

/// A packet that could not be parsed.
pub struct Malformed;

/// An address family: how its addresses travel through the pipeline.
///
/// Addresses stay in the words they were read as (network byte order in memory) until a
/// map keyed by [`Addr`] needs them, so the common path (conntrack) never builds the
/// 20-byte form, and no byte array is moved byte by byte.
pub trait Family: Sized {
    type Raw: Copy + PartialEq + 'static;
    /// The ICMP protocol of the family (ICMP or ICMPv6).
    const ICMP: u8;
    /// The address as map keys carry it.
    fn addr(raw: &Self::Raw) -> Addr;
    /// Link-local (169.254/16, fe80::/10) or unspecified (0.0.0.0, ::).
    fn link_local_or_unspecified(raw: &Self::Raw) -> bool;
    /// Link-local or multicast (224/4, ff00::/8).
    fn link_local_or_multicast(raw: &Self::Raw) -> bool;
    /// The IP header (and the transport ports) an ICMP error quotes, at `offset`.
    fn quoted(ctx: &TcContext, offset: usize) -> Result<Quoted<Self>, Malformed>;
}

/// IPv4: one word.
pub struct V4;
/// IPv6: four words.
pub struct V6;

impl Family for V4 {
    type Raw = u32;
    const ICMP: u8 = PROTO_ICMP;

    #[inline(always)]
    fn addr(raw: &u32) -> Addr {
        Addr {
            family: FAMILY_IPV4,
            bytes: words_to_bytes([*raw, 0, 0, 0]),
        }
    }

    #[inline(always)]
    fn link_local_or_unspecified(raw: &u32) -> bool {
        let [a, b, _, _] = raw.to_ne_bytes();
        *raw == 0 || (a == 169 && b == 254)
    }

    #[inline(always)]
    fn link_local_or_multicast(raw: &u32) -> bool {
        let [a, b, _, _] = raw.to_ne_bytes();
        a & 0xf0 == 224 || (a == 169 && b == 254)
    }

    #[inline(always)]
    fn quoted(ctx: &TcContext, offset: usize) -> Result<Quoted<V4>, Malformed> {
        // The whole fixed header in one read (at a variable offset, single bytes are
        // beyond what the verifier can follow).
        let header: [u8; Ipv4Hdr::LEN] = load(ctx, offset)?;
        let version_ihl = header[offset_of!(Ipv4Hdr, vihl)];
        let header_len = usize::from(version_ihl & 0x0f) * 4;
        if version_ihl >> 4 != 4 || header_len < Ipv4Hdr::LEN {
            return Err(Malformed);
        }
        let word = |at: usize| {
            u32::from_ne_bytes([header[at], header[at + 1], header[at + 2], header[at + 3]])
        };
        let src = word(offset_of!(Ipv4Hdr, src_addr));
        let dst = word(offset_of!(Ipv4Hdr, dst_addr));
        quoted_ports(
            ctx,
            offset + header_len,
            src,
            dst,
            header[offset_of!(Ipv4Hdr, proto)],
        )
    }
}

impl Family for V6 {
    type Raw = [u32; 4];
    const ICMP: u8 = PROTO_ICMPV6;

    #[inline(always)]
    fn addr(raw: &[u32; 4]) -> Addr {
        Addr {
            family: FAMILY_IPV6,
            bytes: words_to_bytes(*raw),
        }
    }

    #[inline(always)]
    fn link_local_or_unspecified(raw: &[u32; 4]) -> bool {
        let [a, b, _, _] = raw[0].to_ne_bytes();
        (a == 0xfe && b & 0xc0 == 0x80) || (raw[0] | raw[1] | raw[2] | raw[3]) == 0
    }

    #[inline(always)]
    fn link_local_or_multicast(raw: &[u32; 4]) -> bool {
        let [a, b, _, _] = raw[0].to_ne_bytes();
        a == 0xff || (a == 0xfe && b & 0xc0 == 0x80)
    }

    /// Only a quoted header followed directly by its transport header is read (a quote
    /// with extension headers is not recognised: the error is judged as new traffic).
    #[inline(always)]
    fn quoted(ctx: &TcContext, offset: usize) -> Result<Quoted<V6>, Malformed> {
        // Version to hop limit, in one read.
        let head: [u8; 8] = load(ctx, offset)?;
        if head[offset_of!(Ipv6Hdr, vcf)] >> 4 != 6 {
            return Err(Malformed);
        }
        let protocol = head[offset_of!(Ipv6Hdr, next_hdr)];
        let src: [u32; 4] = load(ctx, offset + offset_of!(Ipv6Hdr, src_addr))?;
        let dst: [u32; 4] = load(ctx, offset + offset_of!(Ipv6Hdr, dst_addr))?;
        quoted_ports(ctx, offset + Ipv6Hdr::LEN, src, dst, protocol)
    }
}

/// The packet an ICMP error is about, as its sender sent it: addresses, protocol and
/// ports keyed as conntrack keys that packet (an echo request's identifier as its
/// source port).
#[derive(Clone, Copy)]
pub struct Quoted<F: Family> {
    pub src: F::Raw,
    pub dst: F::Raw,
    pub protocol: u8,
    pub sport: u16,
    pub dport: u16,
}

#[inline(always)]
fn quoted_ports<F: Family>(
    ctx: &TcContext,
    offset: usize,
    src: F::Raw,
    dst: F::Raw,
    protocol: u8,
) -> Result<Quoted<F>, Malformed> {
    // RFC 792 and 4443 quote at least the first 8 bytes of the transport header: the
    // ports of TCP, UDP and SCTP, an echo's type and identifier.
    let header: [u8; 8] = load(ctx, offset)?;
    let first = u16::from_be_bytes([header[0], header[1]]);
    let second = u16::from_be_bytes([header[2], header[3]]);
    let (sport, dport) = match protocol {
        PROTO_TCP | PROTO_UDP | PROTO_SCTP => (first, second),
        PROTO_ICMP | PROTO_ICMPV6 => {
            let id = u16::from_be_bytes([header[ICMP_ECHO_ID], header[ICMP_ECHO_ID + 1]]);
            match (protocol, header[ICMP_TYPE]) {
                (PROTO_ICMP, 8) | (PROTO_ICMPV6, 128) => (id, 0),
                _ => return Err(Malformed),
            }
        }
        _ => return Err(Malformed),
    };
    Ok(Quoted {
        src,
        dst,
        protocol,
        sport,
        dport,
    })
}

/// The bytes of four words as they lie in memory.
#[inline(always)]
fn words_to_bytes(words: [u32; 4]) -> [u8; 16] {
    let [a, b, c, d] = words.map(u32::to_ne_bytes);
    [
        a[0], a[1], a[2], a[3], b[0], b[1], b[2], b[3], c[0], c[1], c[2], c[3], d[0], d[1], d[2],
        d[3],
    ]
}

/// What the policy pipeline needs to know about an IP packet of family `F`.
pub struct Packet<F: Family> {
    pub src: F::Raw,
    pub dst: F::Raw,
    pub protocol: u8,
    /// Byte 13 of the TCP header, 0 otherwise.
    pub tcp_flags: u8,
    /// ICMP / ICMPv6 type, 0 otherwise.
    pub icmp_type: u8,
    /// IPv6: the hop limit (ND requires 255, MLD 1); IPv4: 0.
    pub hop_limit: u8,
    /// Where the transport header starts in the frame (an ICMP error's quote follows its
    /// header: [`Packet::quoted`]); 0 for a later fragment.
    pub transport_offset: u16,
    /// Not the first fragment: no transport header.
    pub later_fragment: bool,
    /// Host byte order. ICMP echo: the identifier, on the requester's side.
    pub sport: u16,
    pub dport: u16,
}

/// A parsed frame.
pub enum Parsed {
    V4(Packet<V4>),
    V6(Packet<V6>),
    /// Not IPv4 or IPv6 (ARP, LLDP, ...).
    Other,
}

/// Offsets beyond this are never direct-accessed (keeps the verifier's range small).
const MAX_DIRECT_OFFSET: usize = 256;

#[inline(always)]
fn load<T: Copy>(ctx: &TcContext, offset: usize) -> Result<T, Malformed> {
    let start = ctx.data();
    let end = ctx.data_end();
    if offset <= MAX_DIRECT_OFFSET && start + offset + core::mem::size_of::<T>() <= end {
        // SAFETY: the bounds check above is against the packet's linear data, and the
        // verifier re-checks it; T is plain bytes and integers (read unaligned).
        return Ok(unsafe { ((start + offset) as *const T).read_unaligned() });
    }
    ctx.load::<T>(offset).map_err(|_| Malformed)
}

#[inline(always)]
pub fn parse(ctx: &TcContext) -> Result<Parsed, Malformed> {
    let ethertype = load::<u16>(ctx, ETHER_TYPE)?;
    match ethertype {
        ETH_P_IP => parse_ipv4(ctx).map(Parsed::V4),
        ETH_P_IPV6 => parse_ipv6(ctx).map(Parsed::V6),
        _ => Ok(Parsed::Other),
    }
}

#[inline(always)]
fn parse_ipv4(ctx: &TcContext) -> Result<Packet<V4>, Malformed> {
    let at = |field: usize| EthHdr::LEN + field;
    let version_ihl: u8 = load(ctx, at(offset_of!(Ipv4Hdr, vihl)))?;
    if version_ihl >> 4 != 4 {
        return Err(Malformed);
    }
    let header_len = usize::from(version_ihl & 0x0f) * 4;
    if header_len < Ipv4Hdr::LEN {
        return Err(Malformed);
    }
    let frag = u16::from_be(load::<u16>(ctx, at(offset_of!(Ipv4Hdr, frags)))?);
    let fragment_offset = frag & 0x1fff;
    // RFC 1858: a fragment at offset 8 bytes can only serve to overwrite TCP ports/flags.
    if fragment_offset == 1 {
        return Err(Malformed);
    }
    let protocol: u8 = load(ctx, at(offset_of!(Ipv4Hdr, proto)))?;
    let src: u32 = load(ctx, at(offset_of!(Ipv4Hdr, src_addr)))?;
    let dst: u32 = load(ctx, at(offset_of!(Ipv4Hdr, dst_addr)))?;
    let mut packet = Packet {
        src,
        dst,
        protocol,
        sport: 0,
        dport: 0,
        tcp_flags: 0,
        icmp_type: 0,
        hop_limit: 0,
        transport_offset: 0,
        later_fragment: fragment_offset != 0,
    };
    if !packet.later_fragment {
        parse_transport(ctx, EthHdr::LEN + header_len, &mut packet)?;
    }
    Ok(packet)
}

#[inline(always)]
fn parse_ipv6(ctx: &TcContext) -> Result<Packet<V6>, Malformed> {
    let at = |field: usize| EthHdr::LEN + field;
    let version: u8 = load(ctx, at(offset_of!(Ipv6Hdr, vcf)))?;
    if version >> 4 != 6 {
        return Err(Malformed);
    }
    // The next header and the hop limit, in one read.
    let [mut next, hop_limit]: [u8; 2] = load(ctx, IPV6_NEXT_HEADER)?;
    let src: [u32; 4] = load(ctx, at(offset_of!(Ipv6Hdr, src_addr)))?;
    let dst: [u32; 4] = load(ctx, at(offset_of!(Ipv6Hdr, dst_addr)))?;
    let mut offset = EthHdr::LEN + Ipv6Hdr::LEN;
    let mut later_fragment = false;
    let mut done = false;
    for _ in 0..MAX_EXT_HEADERS {
        match next {
            NEXTHDR_HOP | NEXTHDR_ROUTING | NEXTHDR_DEST => {
                let header: [u8; 2] = load(ctx, offset)?;
                next = header[0];
                offset += (usize::from(header[1]) + 1) * 8;
            }
            NEXTHDR_AUTH => {
                let header: [u8; 2] = load(ctx, offset)?;
                next = header[0];
                offset += (usize::from(header[1]) + 2) * 4;
            }
            NEXTHDR_FRAGMENT => {
                let header: [u8; 4] = load(ctx, offset)?;
                next = header[0];
                offset += 8;
                if u16::from_be_bytes([header[2], header[3]]) >> 3 != 0 {
                    later_fragment = true;
                    done = true;
                    break;
                }
            }
            _ => {
                done = true;
                break;
            }
        }
    }
    if !done {
        return Err(Malformed);
    }
    let mut packet = Packet {
        src,
        dst,
        protocol: next,
        sport: 0,
        dport: 0,
        tcp_flags: 0,
        icmp_type: 0,
        hop_limit,
        transport_offset: 0,
        later_fragment,
    };
    if !later_fragment {
        parse_transport(ctx, offset, &mut packet)?;
    }
    Ok(packet)
}

#[inline(always)]
fn parse_transport<F: Family>(
    ctx: &TcContext,
    offset: usize,
    packet: &mut Packet<F>,
) -> Result<(), Malformed> {
    match packet.protocol {
        PROTO_TCP => {
            // Up to the flags, in one read.
            let header: [u8; TCP_FLAGS + 1] = load(ctx, offset)?;
            packet.sport = u16::from_be_bytes([header[TCP_SPORT], header[TCP_SPORT + 1]]);
            packet.dport = u16::from_be_bytes([header[TCP_DPORT], header[TCP_DPORT + 1]]);
            packet.tcp_flags = header[TCP_FLAGS];
        }
        PROTO_UDP | PROTO_SCTP => {
            // Both ports, in one read.
            let header: [u8; DPORT + 2] = load(ctx, offset)?;
            packet.sport = u16::from_be_bytes([header[SPORT], header[SPORT + 1]]);
            packet.dport = u16::from_be_bytes([header[DPORT], header[DPORT + 1]]);
        }
        PROTO_ICMP | PROTO_ICMPV6 => {
            let header: [u8; IcmpHdr::LEN] = load(ctx, offset)?;
            let icmp_type = header[ICMP_TYPE];
            packet.icmp_type = icmp_type;
            let id = u16::from_be_bytes([header[ICMP_ECHO_ID], header[ICMP_ECHO_ID + 1]]);
            // Echo request and reply share the identifier: key the request as
            // (id -> 0) and the reply as (0 -> id) so conntrack sees one flow.
            match (packet.protocol, icmp_type) {
                (PROTO_ICMP, 8) | (PROTO_ICMPV6, 128) => packet.sport = id,
                (PROTO_ICMP, 0) | (PROTO_ICMPV6, 129) => packet.dport = id,
                _ => {}
            }
            packet.transport_offset = offset as u16;
        }
        _ => {}
    }
    Ok(())
}

impl<F: Family> Packet<F> {
    /// IPv6 neighbour discovery (RS, RA, NS, NA, redirect) and MLD, as the link uses
    /// them: sent on the link (ND: hop limit 255, which no router forwards, RFC 4861;
    /// MLD: hop limit 1 to a multicast group from a link-local or unspecified address,
    /// RFC 3810), between link-local, unspecified or multicast addresses. ND may carry
    /// a global source towards a multicast or link-local address (Linux solicits with
    /// the address of the packet that needs the neighbour), and a global destination
    /// from a link-local source (the answer to such a solicitation). Anything else with
    /// these types is judged like other traffic.
    #[inline(always)]
    pub fn is_network_control(&self) -> bool {
        if self.protocol != PROTO_ICMPV6 || self.later_fragment {
            return false;
        }
        match self.icmp_type {
            133..=137 => {
                self.hop_limit == 255
                    && (F::link_local_or_unspecified(&self.src)
                        || F::link_local_or_multicast(&self.dst))
            }
            130..=132 | 143 => {
                self.hop_limit == 1
                    && F::link_local_or_unspecified(&self.src)
                    && F::link_local_or_multicast(&self.dst)
            }
            _ => false,
        }
    }

    /// A neighbour solicitation or advertisement between two addresses that are neither
    /// link-local nor multicast: what pods on one bridge (the bridge plugin, flannel)
    /// send each other to resolve and check their global addresses (Linux solicits with
    /// the address that needs the neighbour, and answers from the solicited one). Valid
    /// only as sent on the link, with hop limit 255; the hooks decide where that holds
    /// (`verdict::on_link_neighbour`).
    #[inline(always)]
    pub fn is_neighbour_message(&self) -> bool {
        self.protocol == PROTO_ICMPV6 && !self.later_fragment && matches!(self.icmp_type, 135 | 136)
    }

    /// An ICMP error about a packet: destination unreachable (fragmentation needed
    /// included), time exceeded, parameter problem; ICMPv6 also packet too big.
    #[inline(always)]
    pub fn is_icmp_error(&self) -> bool {
        self.protocol == F::ICMP
            && !self.later_fragment
            && if F::ICMP == PROTO_ICMP {
                matches!(self.icmp_type, 3 | 11 | 12)
            } else {
                matches!(self.icmp_type, 1..=4)
            }
    }

    /// The packet an ICMP error quotes, read only when the hook needs it (never on the
    /// established path). `None` for anything else, or a quote that cannot be read: no
    /// error of a known connection, the packet is judged as new traffic.
    #[inline(always)]
    pub fn quoted(&self, ctx: &TcContext) -> Option<Quoted<F>> {
        if !self.is_icmp_error() {
            return None;
        }
        F::quoted(ctx, usize::from(self.transport_offset) + IcmpHdr::LEN).ok()
    }

    /// DHCP (client to server) or DHCPv6 (client to servers and relays): what a pod
    /// sends before it has an address.
    #[inline(always)]
    pub fn is_dhcp_client(&self) -> bool {
        self.protocol == PROTO_UDP
            && !self.later_fragment
            && matches!((self.sport, self.dport), (68, 67) | (546, 547))
    }
}
