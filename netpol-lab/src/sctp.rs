//! SCTP without an SCTP stack: this kernel has no SCTP module, so probes craft packets.
//!
//! A probe sends an INIT chunk from a raw socket in the source namespace; the server, a
//! raw socket bound to the destination address, answers INIT-ACK with the probe's
//! initiate tag as verification tag. "Allowed" means the INIT-ACK came back: the INIT
//! crossed both hooks and so did its reply. A raw socket that receives the packet keeps
//! the kernel from answering "protocol unreachable", so a dropped INIT is silence.

use std::mem::MaybeUninit;
use std::net::{IpAddr, SocketAddr};

use socket2::{Domain, Socket, Type};
use tokio::io::Interest;
use tokio::io::unix::AsyncFd;

use crate::wire::{Outcome, SeenTokens};

const IPPROTO_SCTP: i32 = 132;
const CHUNK_INIT: u8 = 1;
const CHUNK_INIT_ACK: u8 = 2;

/// CRC32c (Castagnoli), as SCTP's checksum (RFC 9260 appendix B).
fn crc32c(data: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &byte in data {
        crc ^= u32::from(byte);
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0x82f6_3b78
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

/// A packet with one INIT or INIT-ACK chunk (no parameters, no cookie: enough for a
/// peer that only needs to see the chunk type and tags).
fn packet(sport: u16, dport: u16, vtag: u32, chunk: u8, initiate_tag: u32) -> Vec<u8> {
    let mut p = Vec::with_capacity(32);
    p.extend_from_slice(&sport.to_be_bytes());
    p.extend_from_slice(&dport.to_be_bytes());
    p.extend_from_slice(&vtag.to_be_bytes());
    p.extend_from_slice(&[0; 4]); // checksum, filled below
    p.extend_from_slice(&[chunk, 0]);
    p.extend_from_slice(&20u16.to_be_bytes());
    p.extend_from_slice(&initiate_tag.to_be_bytes());
    p.extend_from_slice(&65_535u32.to_be_bytes()); // a_rwnd
    p.extend_from_slice(&1u16.to_be_bytes()); // outbound streams
    p.extend_from_slice(&1u16.to_be_bytes()); // inbound streams
    p.extend_from_slice(&initiate_tag.to_be_bytes()); // initial TSN
    // The checksum is stored little-endian (RFC 9260 appendix B).
    let sum = crc32c(&p);
    p[8..12].copy_from_slice(&sum.to_le_bytes());
    p
}

/// The fields of an SCTP packet with one chunk that a probe or server looks at.
#[derive(Debug, PartialEq, Eq)]
struct Parsed {
    sport: u16,
    dport: u16,
    vtag: u32,
    chunk: u8,
    initiate_tag: u32,
}

/// Parses what a raw socket returns: IPv4 raw sockets include the IP header, IPv6 ones
/// do not.
fn parse(buf: &[u8], ipv4: bool) -> Option<Parsed> {
    let sctp = if ipv4 {
        let ihl = usize::from(buf.first()? & 0x0f) * 4;
        buf.get(ihl..)?
    } else {
        buf
    };
    let be16 = |i: usize| Some(u16::from_be_bytes([*sctp.get(i)?, *sctp.get(i + 1)?]));
    let be32 = |i: usize| Some(u32::from_be_bytes(sctp.get(i..i + 4)?.try_into().ok()?));
    Some(Parsed {
        sport: be16(0)?,
        dport: be16(2)?,
        vtag: be32(4)?,
        chunk: *sctp.get(12)?,
        initiate_tag: be32(16)?,
    })
}

/// A raw SCTP socket in the calling thread's namespace.
pub(crate) fn raw_socket(ip: IpAddr, bind: bool) -> std::io::Result<Socket> {
    let domain = if ip.is_ipv4() {
        Domain::IPV4
    } else {
        Domain::IPV6
    };
    let socket = Socket::new(
        domain,
        Type::RAW,
        Some(socket2::Protocol::from(IPPROTO_SCTP)),
    )?;
    socket.set_nonblocking(true)?;
    if bind {
        socket.bind(&SocketAddr::new(ip, 0).into())?;
    }
    Ok(socket)
}

fn register(socket: Socket) -> std::io::Result<AsyncFd<Socket>> {
    // SAFETY: the socket moves into the AsyncFd, which owns and finally closes it.
    unsafe { AsyncFd::register_with_interest(socket, Interest::READABLE) }
        .map_err(std::io::Error::from)
}

async fn recv(
    fd: &AsyncFd<Socket>,
    buf: &mut [MaybeUninit<u8>],
) -> std::io::Result<(usize, IpAddr)> {
    loop {
        let mut guard = fd.readable().await?;
        match guard.try_io(|inner| inner.get_ref().recv_from(buf)) {
            Ok(result) => {
                let (n, from) = result?;
                let ip = from
                    .as_socket()
                    .map(|a| a.ip())
                    .ok_or_else(|| std::io::Error::other("no address"))?;
                return Ok((n, ip));
            }
            Err(_would_block) => continue,
        }
    }
}

fn bytes(buf: &[MaybeUninit<u8>], n: usize) -> Vec<u8> {
    // SAFETY: recv_from initialised the first n bytes.
    buf[..n]
        .iter()
        .map(|b| unsafe { b.assume_init() })
        .collect()
}

/// Answers every INIT to `port` on the socket's address with an INIT-ACK.
pub(crate) async fn serve(socket: Socket, ipv4: bool, port: u16, seen: SeenTokens) {
    let Ok(fd) = register(socket) else { return };
    let mut buf = [MaybeUninit::<u8>::uninit(); 2048];
    loop {
        let Ok((n, from)) = recv(&fd, &mut buf).await else {
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
            continue;
        };
        let data = bytes(&buf, n);
        let Some(init) = parse(&data, ipv4) else {
            continue;
        };
        if init.chunk != CHUNK_INIT || init.dport != port {
            continue;
        }
        seen.lock()
            .expect("not poisoned")
            .insert(u64::from(init.initiate_tag));
        let reply = packet(
            port,
            init.sport,
            init.initiate_tag,
            CHUNK_INIT_ACK,
            init.initiate_tag ^ 0x5a5a_5a5a,
        );
        let _ = fd
            .get_ref()
            .send_to(&reply, &SocketAddr::new(from, 0).into());
    }
}

/// Sends INIT to `dst` from `socket` and waits for the INIT-ACK until `deadline`,
/// resending every 200 ms (as a real SCTP stack would retransmit).
pub(crate) async fn probe(
    socket: Socket,
    dst: SocketAddr,
    deadline: tokio::time::Instant,
    seen: &SeenTokens,
    tag: u32,
) -> Outcome {
    let fd = match register(socket) {
        Ok(fd) => fd,
        Err(e) => return Outcome::Rejected(e.to_string()),
    };
    let ipv4 = dst.is_ipv4();
    // A source port from the tag keeps concurrent probes apart.
    let sport = 32_768 + (tag % 28_000) as u16;
    let init = packet(sport, dst.port(), 0, CHUNK_INIT, tag);
    let mut buf = [MaybeUninit::<u8>::uninit(); 2048];
    loop {
        if let Err(e) = fd
            .get_ref()
            .send_to(&init, &SocketAddr::new(dst.ip(), 0).into())
        {
            return Outcome::Rejected(e.to_string());
        }
        let resend_at =
            (tokio::time::Instant::now() + std::time::Duration::from_millis(200)).min(deadline);
        loop {
            match tokio::time::timeout_at(resend_at, recv(&fd, &mut buf)).await {
                Ok(Ok((n, from))) if from == dst.ip() => {
                    let data = bytes(&buf, n);
                    if let Some(answer) = parse(&data, ipv4)
                        && answer.chunk == CHUNK_INIT_ACK
                        && answer.vtag == tag
                        && answer.sport == dst.port()
                        && answer.dport == sport
                    {
                        return Outcome::Allowed;
                    }
                }
                Ok(Ok(_)) => {}
                Ok(Err(e)) => return Outcome::Rejected(e.to_string()),
                Err(_) => break,
            }
        }
        if tokio::time::Instant::now() >= deadline {
            let reached = seen.lock().expect("not poisoned").contains(&u64::from(tag));
            return if reached {
                Outcome::OneWay
            } else {
                Outcome::Blocked
            };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc32c_matches_the_rfc_test_vector() {
        // RFC 3720 B.4: 32 bytes of zeros.
        assert_eq!(crc32c(&[0u8; 32]), 0x8a91_36aa);
        assert_eq!(crc32c(b"123456789"), 0xe306_9283);
    }

    #[test]
    fn init_round_trips_through_the_parser() {
        let p = packet(40_000, 80, 0, CHUNK_INIT, 0xdead_beef);
        assert_eq!(p.len(), 32);
        let parsed = parse(&p, false).unwrap();
        assert_eq!(
            parsed,
            Parsed {
                sport: 40_000,
                dport: 80,
                vtag: 0,
                chunk: CHUNK_INIT,
                initiate_tag: 0xdead_beef
            }
        );
        let mut with_ip = vec![0x45u8];
        with_ip.extend_from_slice(&[0u8; 19]);
        with_ip.extend_from_slice(&p);
        assert_eq!(parse(&with_ip, true).unwrap().dport, 80);
        assert!(parse(&p[..10], false).is_none());
    }
}
