//! DNS, the real thing: an authoritative server for a handful of names (UDP and TCP, as
//! a cluster's DNS pod serves them), and name resolution from a pod by the C library's
//! own resolver (`getent` under `ip netns exec`, which gives the pod its own
//! `resolv.conf` from `/etc/netns/<pod netns>/`).
//!
//! The server answers A and AAAA questions for its names, NXDOMAIN for other names and
//! NOTIMP for anything but a standard query of one question; it never recurses.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use socket2::{Domain, Socket, Type};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::task::JoinHandle;

use crate::error::{Context, Error, Result};
use crate::netns::NetnsWorker;

const TYPE_A: u16 = 1;
const TYPE_AAAA: u16 = 28;
const CLASS_IN: u16 = 1;
const RCODE_NXDOMAIN: u8 = 3;
const RCODE_NOTIMP: u8 = 4;
const RCODE_FORMERR: u8 = 1;
/// TTL of every answer, seconds.
const TTL: u32 = 5;

/// Names the server knows, lower-case and without the final dot.
pub type Zone = BTreeMap<String, Vec<IpAddr>>;

/// A DNS server for `zone` on `ip:port`, UDP and TCP, inside a namespace. Dropping it
/// stops it.
pub struct DnsServer {
    tasks: Vec<JoinHandle<()>>,
}

impl Drop for DnsServer {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

impl DnsServer {
    /// Binds both sockets inside `worker`'s namespace and serves them on `rt`.
    pub fn start(
        rt: &tokio::runtime::Runtime,
        worker: &NetnsWorker,
        addr: SocketAddr,
        zone: Zone,
    ) -> Result<DnsServer> {
        let bind = move |ty: Type| -> std::io::Result<Socket> {
            let socket = Socket::new(Domain::for_address(addr), ty, None)?;
            if addr.is_ipv6() {
                socket.set_only_v6(true)?;
            }
            socket.set_reuse_address(true)?;
            socket.set_nonblocking(true)?;
            socket.bind(&addr.into())?;
            if ty == Type::STREAM {
                socket.listen(128)?;
            }
            Ok(socket)
        };
        let udp = worker
            .run(move || bind(Type::DGRAM))?
            .with_context(|| format!("binding DNS on UDP {addr} in {}", worker.netns()))?;
        let tcp = worker
            .run(move || bind(Type::STREAM))?
            .with_context(|| format!("binding DNS on TCP {addr} in {}", worker.netns()))?;
        let _guard = rt.enter();
        let zone = std::sync::Arc::new(zone);
        let udp = tokio::net::UdpSocket::from_std(udp.into())?;
        let tcp = tokio::net::TcpListener::from_std(tcp.into())?;
        Ok(DnsServer {
            tasks: vec![
                rt.spawn(serve_udp(udp, zone.clone())),
                rt.spawn(serve_tcp(tcp, zone)),
            ],
        })
    }
}

async fn serve_udp(socket: tokio::net::UdpSocket, zone: std::sync::Arc<Zone>) {
    let mut buf = [0u8; 512];
    loop {
        match socket.recv_from(&mut buf).await {
            Ok((n, peer)) => {
                if let Some(reply) = answer(&zone, &buf[..n]) {
                    let _ = socket.send_to(&reply, peer).await;
                }
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
        }
    }
}

async fn serve_tcp(listener: tokio::net::TcpListener, zone: std::sync::Arc<Zone>) {
    loop {
        let Ok((mut stream, _)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(10)).await;
            continue;
        };
        let zone = zone.clone();
        tokio::spawn(async move {
            // Messages are framed by a two-byte length (RFC 1035 4.2.2); a client may
            // send several on one connection.
            for _ in 0..16 {
                let Ok(len) = stream.read_u16().await else {
                    return;
                };
                let mut message = vec![0u8; usize::from(len)];
                if stream.read_exact(&mut message).await.is_err() {
                    return;
                }
                let Some(reply) = answer(&zone, &message) else {
                    return;
                };
                let len = u16::try_from(reply.len()).unwrap_or(u16::MAX);
                if stream.write_u16(len).await.is_err() || stream.write_all(&reply).await.is_err() {
                    return;
                }
            }
        });
    }
}

/// The question of a query: its name (as written, for the echo) and type.
struct Question<'a> {
    /// The question section as it lies in the query (name, type, class).
    raw: &'a [u8],
    name: String,
    qtype: u16,
    qclass: u16,
}

fn question(query: &[u8]) -> Option<Question<'_>> {
    let mut at = 12;
    let mut labels = Vec::new();
    loop {
        let len = usize::from(*query.get(at)?);
        at += 1;
        if len == 0 {
            break;
        }
        // No compression in a question we answer; labels are at most 63 bytes.
        if len > 63 || labels.len() > 127 {
            return None;
        }
        let label = query.get(at..at + len)?;
        labels.push(String::from_utf8_lossy(label).to_ascii_lowercase());
        at += len;
    }
    let qtype = u16::from_be_bytes(query.get(at..at + 2)?.try_into().ok()?);
    let qclass = u16::from_be_bytes(query.get(at + 2..at + 4)?.try_into().ok()?);
    Some(Question {
        raw: &query[12..at + 4],
        name: labels.join("."),
        qtype,
        qclass,
    })
}

/// The reply to one query, `None` for a message that is not a query at all.
fn answer(zone: &Zone, query: &[u8]) -> Option<Vec<u8>> {
    if query.len() < 12 || query[2] & 0x80 != 0 {
        return None;
    }
    let opcode = (query[2] >> 3) & 0x0f;
    let questions = u16::from_be_bytes([query[4], query[5]]);
    let mut reply = Vec::with_capacity(512);
    reply.extend_from_slice(&query[..2]);
    // QR, opcode and RD echoed; AA set.
    reply.push(0x80 | (query[2] & 0x79) | 0x04);
    let header_end = |reply: &mut Vec<u8>, rcode: u8, qd: u16, an: u16| {
        reply.push(rcode);
        for count in [qd, an, 0, 0] {
            reply.extend_from_slice(&count.to_be_bytes());
        }
    };
    let parsed = if opcode == 0 && questions == 1 {
        question(query)
    } else {
        None
    };
    let Some(q) = parsed else {
        let rcode = if opcode == 0 && questions == 1 {
            RCODE_FORMERR
        } else {
            RCODE_NOTIMP
        };
        header_end(&mut reply, rcode, 0, 0);
        return Some(reply);
    };
    let Some(addresses) = zone.get(q.name.trim_end_matches('.')) else {
        header_end(&mut reply, RCODE_NXDOMAIN, 1, 0);
        reply.extend_from_slice(q.raw);
        return Some(reply);
    };
    let records: Vec<&IpAddr> = addresses
        .iter()
        .filter(|ip| {
            q.qclass == CLASS_IN
                && match q.qtype {
                    TYPE_A => ip.is_ipv4(),
                    TYPE_AAAA => ip.is_ipv6(),
                    _ => false,
                }
        })
        .collect();
    header_end(&mut reply, 0, 1, records.len() as u16);
    reply.extend_from_slice(q.raw);
    for ip in records {
        // The name as a pointer to the question's (offset 12).
        reply.extend_from_slice(&[0xc0, 12]);
        reply.extend_from_slice(&q.qtype.to_be_bytes());
        reply.extend_from_slice(&CLASS_IN.to_be_bytes());
        reply.extend_from_slice(&TTL.to_be_bytes());
        match ip {
            IpAddr::V4(v4) => {
                reply.extend_from_slice(&4u16.to_be_bytes());
                reply.extend_from_slice(&v4.octets());
            }
            IpAddr::V6(v6) => {
                reply.extend_from_slice(&16u16.to_be_bytes());
                reply.extend_from_slice(&v6.octets());
            }
        }
    }
    Some(reply)
}

/// The longest a resolution may take (see [`resolve`]).
pub const RESOLVE_TIMEOUT: Duration = Duration::from_secs(5);

/// How the C library's resolver reaches the server.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Transport {
    Udp,
    /// `options use-vc`: every query over TCP.
    Tcp,
}

/// Resolves `name` (IPv4) from inside network namespace `netns` with the C library's
/// resolver (`getent ahostsv4`), asking only `server`, one attempt with a one-second
/// timeout. `Ok(addresses)` (empty when the name does not resolve or the server cannot
/// be reached; the resolver does not tell the two apart).
pub fn resolve(
    netns: &str,
    server: IpAddr,
    name: &str,
    transport: Transport,
) -> Result<Vec<IpAddr>> {
    let conf = ResolvConf::write(netns, server, transport)?;
    let output = Command::new("timeout")
        .args(["10", "ip", "netns", "exec", netns, "getent", "ahostsv4"])
        .arg(name)
        .output()
        .with_context(|| format!("running getent in {netns}"))?;
    drop(conf);
    // getent: 0 found, 2 not found; timeout(1): 124.
    match output.status.code() {
        Some(0) | Some(2) => {}
        Some(124) => return Ok(Vec::new()),
        other => {
            return Err(Error::Failed(format!(
                "getent ahostsv4 {name} in {netns} ended with {other:?}: {}",
                String::from_utf8_lossy(&output.stderr).trim()
            )));
        }
    }
    let mut addresses: Vec<IpAddr> = String::from_utf8_lossy(&output.stdout)
        .lines()
        .filter_map(|line| line.split_whitespace().next()?.parse().ok())
        .collect();
    addresses.sort();
    addresses.dedup();
    Ok(addresses)
}

/// `/etc/netns/<netns>/resolv.conf`, which `ip netns exec` bind-mounts over
/// `/etc/resolv.conf` for the command it runs; removed on drop.
struct ResolvConf {
    dir: PathBuf,
}

impl ResolvConf {
    fn write(netns: &str, server: IpAddr, transport: Transport) -> Result<ResolvConf> {
        let dir = PathBuf::from("/etc/netns").join(netns);
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let conf = ResolvConf { dir };
        let vc = match transport {
            Transport::Udp => "",
            Transport::Tcp => " use-vc",
        };
        std::fs::write(
            conf.dir.join("resolv.conf"),
            format!("nameserver {server}\noptions timeout:1 attempts:1 ndots:0{vc}\n"),
        )
        .context("writing resolv.conf")?;
        Ok(conf)
    }
}

impl Drop for ResolvConf {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn query(name: &str, qtype: u16) -> Vec<u8> {
        let mut q = vec![0x12, 0x34, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0];
        for label in name.split('.') {
            q.push(label.len() as u8);
            q.extend_from_slice(label.as_bytes());
        }
        q.push(0);
        q.extend_from_slice(&qtype.to_be_bytes());
        q.extend_from_slice(&CLASS_IN.to_be_bytes());
        q
    }

    fn zone() -> Zone {
        Zone::from([(
            "db.test".to_owned(),
            vec!["10.0.0.5".parse().unwrap(), "fd00::5".parse().unwrap()],
        )])
    }

    #[test]
    fn an_a_question_for_a_known_name_gets_its_address() {
        let reply = answer(&zone(), &query("DB.test", TYPE_A)).unwrap();
        assert_eq!(&reply[..2], &[0x12, 0x34], "the id is echoed");
        assert_eq!(reply[2] & 0x80, 0x80, "a response");
        assert_eq!(reply[3] & 0x0f, 0, "NOERROR");
        assert_eq!(u16::from_be_bytes([reply[6], reply[7]]), 1, "one answer");
        assert_eq!(&reply[reply.len() - 4..], &[10, 0, 0, 5]);
        let aaaa = answer(&zone(), &query("db.test", TYPE_AAAA)).unwrap();
        assert_eq!(u16::from_be_bytes([aaaa[6], aaaa[7]]), 1);
        assert_eq!(aaaa[aaaa.len() - 1], 5);
    }

    #[test]
    fn an_unknown_name_is_nxdomain_and_garbage_gets_no_answer_or_an_error() {
        let reply = answer(&zone(), &query("other.test", TYPE_A)).unwrap();
        assert_eq!(reply[3] & 0x0f, RCODE_NXDOMAIN);
        assert_eq!(answer(&zone(), &[1, 2, 3]), None);
        let mut truncated = query("db.test", TYPE_A);
        truncated.truncate(16);
        assert_eq!(
            answer(&zone(), &truncated).unwrap()[3] & 0x0f,
            RCODE_FORMERR
        );
        let mut inverse = query("db.test", TYPE_A);
        inverse[2] = 0x08;
        assert_eq!(answer(&zone(), &inverse).unwrap()[3] & 0x0f, RCODE_NOTIMP);
    }
}
