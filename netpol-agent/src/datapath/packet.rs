//! Crafted Ethernet frames for BPF_PROG_TEST_RUN (verdict tests, benchmarks, SCTP
//! probes). Only the fields the programs read are meaningful; checksums are left zero.

use std::net::IpAddr;

use netpol_common::{PROTO_ICMP, PROTO_ICMPV6, PROTO_SCTP, PROTO_TCP, PROTO_UDP, TCP_ACK, TCP_SYN};

/// Bytes of the Ethernet header every frame starts with.
const ETHERNET_LEN: usize = 14;

/// The transport part of a frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Transport {
    Tcp {
        sport: u16,
        dport: u16,
        flags: u8,
    },
    Udp {
        sport: u16,
        dport: u16,
    },
    Sctp {
        sport: u16,
        dport: u16,
    },
    /// ICMP or ICMPv6 (chosen by the address family).
    Icmp {
        kind: u8,
        code: u8,
        id: u16,
    },
    /// Any other protocol number, with `len` zero bytes of payload.
    Raw {
        protocol: u8,
        len: usize,
    },
}

impl Transport {
    pub const fn syn(sport: u16, dport: u16) -> Self {
        Transport::Tcp {
            sport,
            dport,
            flags: TCP_SYN,
        }
    }
    pub const fn syn_ack(sport: u16, dport: u16) -> Self {
        Transport::Tcp {
            sport,
            dport,
            flags: TCP_SYN | TCP_ACK,
        }
    }
    pub const fn ack(sport: u16, dport: u16) -> Self {
        Transport::Tcp {
            sport,
            dport,
            flags: TCP_ACK,
        }
    }
}

/// IPv6 extension headers to put in front of the transport header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ipv6Ext {
    HopByHop,
    Routing,
    DestinationOptions,
    /// Fragment header with the given offset (in 8-byte units) and more-fragments flag.
    Fragment {
        offset: u16,
        more: bool,
    },
}

/// A frame under construction.
#[derive(Clone, Debug)]
pub struct Frame {
    pub src: IpAddr,
    pub dst: IpAddr,
    pub transport: Transport,
    /// IPv4: fragment offset in 8-byte units (the transport header is omitted when > 0).
    pub ipv4_fragment_offset: u16,
    pub ipv6_ext: Vec<Ipv6Ext>,
    /// Cut the frame to this many bytes (malformed-packet tests).
    pub truncate: Option<usize>,
    /// IPv4 TTL / IPv6 hop limit (64 unless set).
    pub hop_limit: u8,
    /// Bytes after the transport header: e.g. the packet an ICMP error quotes
    /// ([`Frame::quoted`]).
    pub payload: Vec<u8>,
}

impl Frame {
    pub fn new(src: IpAddr, dst: IpAddr, transport: Transport) -> Self {
        Frame {
            src,
            dst,
            transport,
            ipv4_fragment_offset: 0,
            ipv6_ext: Vec::new(),
            truncate: None,
            hop_limit: 64,
            payload: Vec::new(),
        }
    }

    /// An ICMP (or ICMPv6) error of `kind` and `code` from `src` to `dst` quoting the
    /// IP packet of `about` (its IP header and transport header, as routers quote).
    pub fn icmp_error(src: IpAddr, dst: IpAddr, kind: u8, code: u8, about: &Frame) -> Frame {
        let mut frame = Frame::new(src, dst, Transport::Icmp { kind, code, id: 0 });
        frame.payload = about.build()[ETHERNET_LEN..].to_vec();
        frame
    }

    /// With this IPv4 TTL or IPv6 hop limit.
    pub fn with_hop_limit(mut self, hop_limit: u8) -> Frame {
        self.hop_limit = hop_limit;
        self
    }

    fn protocol(&self) -> u8 {
        match self.transport {
            Transport::Tcp { .. } => PROTO_TCP,
            Transport::Udp { .. } => PROTO_UDP,
            Transport::Sctp { .. } => PROTO_SCTP,
            Transport::Icmp { .. } if self.src.is_ipv6() => PROTO_ICMPV6,
            Transport::Icmp { .. } => PROTO_ICMP,
            Transport::Raw { protocol, .. } => protocol,
        }
    }

    fn transport_bytes(&self) -> Vec<u8> {
        match self.transport {
            Transport::Tcp {
                sport,
                dport,
                flags,
            } => {
                let mut h = vec![0u8; 20];
                h[0..2].copy_from_slice(&sport.to_be_bytes());
                h[2..4].copy_from_slice(&dport.to_be_bytes());
                h[12] = 5 << 4;
                h[13] = flags;
                h[14..16].copy_from_slice(&64240u16.to_be_bytes());
                h
            }
            Transport::Udp { sport, dport } => {
                let mut h = vec![0u8; 8];
                h[0..2].copy_from_slice(&sport.to_be_bytes());
                h[2..4].copy_from_slice(&dport.to_be_bytes());
                h[4..6].copy_from_slice(&8u16.to_be_bytes());
                h
            }
            Transport::Sctp { sport, dport } => {
                // Common header + an INIT chunk header.
                let mut h = vec![0u8; 12 + 20];
                h[0..2].copy_from_slice(&sport.to_be_bytes());
                h[2..4].copy_from_slice(&dport.to_be_bytes());
                h[12] = 1; // INIT
                h[14..16].copy_from_slice(&20u16.to_be_bytes());
                h
            }
            Transport::Icmp { kind, code, id } => {
                let mut h = vec![0u8; 8];
                h[0] = kind;
                h[1] = code;
                h[4..6].copy_from_slice(&id.to_be_bytes());
                h
            }
            Transport::Raw { len, .. } => vec![0u8; len],
        }
    }

    /// The bytes, starting with the Ethernet header.
    pub fn build(&self) -> Vec<u8> {
        let mut frame = vec![0x02, 0, 0, 0, 0, 0x02, 0x02, 0, 0, 0, 0, 0x01];
        let mut transport = self.transport_bytes();
        transport.extend_from_slice(&self.payload);
        match (self.src, self.dst) {
            (IpAddr::V4(src), IpAddr::V4(dst)) => {
                if self.ipv4_fragment_offset > 0 {
                    transport = vec![0u8; 16];
                }
                frame.extend_from_slice(&0x0800u16.to_be_bytes());
                let total = 20 + transport.len();
                let mut ip = vec![0u8; 20];
                ip[0] = 0x45;
                ip[2..4].copy_from_slice(&(total as u16).to_be_bytes());
                ip[6..8].copy_from_slice(&(self.ipv4_fragment_offset & 0x1fff).to_be_bytes());
                ip[8] = self.hop_limit;
                ip[9] = self.protocol();
                ip[12..16].copy_from_slice(&src.octets());
                ip[16..20].copy_from_slice(&dst.octets());
                frame.extend_from_slice(&ip);
            }
            (IpAddr::V6(src), IpAddr::V6(dst)) => {
                frame.extend_from_slice(&0x86ddu16.to_be_bytes());
                let mut ext = Vec::new();
                let mut next_headers: Vec<u8> = self
                    .ipv6_ext
                    .iter()
                    .map(|e| match e {
                        Ipv6Ext::HopByHop => 0,
                        Ipv6Ext::Routing => 43,
                        Ipv6Ext::DestinationOptions => 60,
                        Ipv6Ext::Fragment { .. } => 44,
                    })
                    .collect();
                next_headers.push(self.protocol());
                for (i, e) in self.ipv6_ext.iter().enumerate() {
                    let next = next_headers[i + 1];
                    match e {
                        Ipv6Ext::Fragment { offset, more } => {
                            let field = (offset << 3) | u16::from(*more);
                            ext.extend_from_slice(&[next, 0]);
                            ext.extend_from_slice(&field.to_be_bytes());
                            ext.extend_from_slice(&[0, 0, 0, 1]);
                            if *offset > 0 {
                                transport = vec![0u8; 16];
                            }
                        }
                        _ => ext.extend_from_slice(&[next, 0, 1, 4, 0, 0, 0, 0]),
                    }
                }
                let payload = (ext.len() + transport.len()) as u16;
                let mut ip = vec![0u8; 40];
                ip[0] = 0x60;
                ip[4..6].copy_from_slice(&payload.to_be_bytes());
                ip[6] = next_headers[0];
                ip[7] = self.hop_limit;
                ip[8..24].copy_from_slice(&src.octets());
                ip[24..40].copy_from_slice(&dst.octets());
                frame.extend_from_slice(&ip);
                frame.extend_from_slice(&ext);
            }
            _ => panic!("source and destination must be of one family"),
        }
        frame.extend_from_slice(&transport);
        if let Some(len) = self.truncate {
            frame.truncate(len);
        }
        frame
    }
}

/// An ARP request frame (not IP: the programs let it through).
pub fn arp_frame() -> Vec<u8> {
    let mut frame = vec![0xff; 6];
    frame.extend_from_slice(&[0x02, 0, 0, 0, 0, 1]);
    frame.extend_from_slice(&0x0806u16.to_be_bytes());
    frame.extend_from_slice(&[0, 1, 8, 0, 6, 4, 0, 1]);
    frame.extend_from_slice(&[0u8; 20]);
    frame
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ipv4_tcp_layout() {
        let f = Frame::new(
            "10.0.0.1".parse().unwrap(),
            "10.0.0.2".parse().unwrap(),
            Transport::syn(1234, 80),
        )
        .build();
        assert_eq!(f.len(), 14 + 20 + 20);
        assert_eq!(&f[12..14], &[0x08, 0x00]);
        assert_eq!(f[14 + 9], PROTO_TCP);
        assert_eq!(&f[34..38], &[0x04, 0xd2, 0x00, 0x50]);
        assert_eq!(f[34 + 13], TCP_SYN);
    }

    #[test]
    fn ipv6_extension_chain() {
        let mut frame = Frame::new(
            "fd00::1".parse().unwrap(),
            "fd00::2".parse().unwrap(),
            Transport::Udp {
                sport: 5,
                dport: 53,
            },
        );
        frame.ipv6_ext = vec![
            Ipv6Ext::HopByHop,
            Ipv6Ext::Fragment {
                offset: 0,
                more: true,
            },
        ];
        let f = frame.build();
        assert_eq!(f[14 + 6], 0); // hop-by-hop first
        assert_eq!(f[54], 44); // then fragment
        assert_eq!(f[62], PROTO_UDP); // then UDP
        assert_eq!(&f[70..74], &[0, 5, 0, 53]);
    }
}
