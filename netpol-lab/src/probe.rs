//! Reachability probes with real traffic. Client sockets are created inside the source
//! endpoint's namespace, then driven concurrently on the lab's runtime.

use std::fmt;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use socket2::{Domain, Socket, Type};
use tokio::io::AsyncReadExt;
use tokio::sync::Semaphore;

use crate::netns::NetnsWorker;
use crate::sctp;
use crate::spec::{Family, Protocol};
use crate::wire::{GREETING, Outcome, SeenTokens, next_token};

/// Most probes in flight at once.
const MAX_IN_FLIGHT: usize = 128;
/// How often a UDP probe resends its datagram while waiting for the echo.
const UDP_RESEND: Duration = Duration::from_millis(200);

/// One probe: can `src` reach `dst:port/protocol` over `family`?
///
/// Endpoint ids are `ns/pod`, `host/NAME` or `node` (the node's own namespace).
///
/// - TCP is allowed when the three-way handshake completes *and* the server's one-byte
///   greeting arrives: data flows both ways on the established connection, so replies
///   of the allowed flow pass.
/// - UDP is allowed when the datagram reaches the server and its echo comes back.
/// - SCTP is allowed when an INIT gets its INIT-ACK back (crafted; see `sctp.rs`).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Probe {
    pub src: String,
    pub dst: String,
    pub port: u16,
    pub protocol: Protocol,
    pub family: Family,
}

impl Probe {
    pub fn new(
        src: impl Into<String>,
        dst: impl Into<String>,
        port: u16,
        protocol: Protocol,
    ) -> Self {
        Self {
            src: src.into(),
            dst: dst.into(),
            port,
            protocol,
            family: Family::V4,
        }
    }

    pub fn tcp(src: impl Into<String>, dst: impl Into<String>, port: u16) -> Self {
        Self::new(src, dst, port, Protocol::Tcp)
    }

    pub fn udp(src: impl Into<String>, dst: impl Into<String>, port: u16) -> Self {
        Self::new(src, dst, port, Protocol::Udp)
    }

    /// The same probe over IPv6.
    pub fn v6(mut self) -> Self {
        self.family = Family::V6;
        self
    }
}

impl fmt::Display for Probe {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} -> {}:{}/{}",
            self.src, self.dst, self.port, self.protocol
        )?;
        if self.family == Family::V6 {
            f.write_str(" (IPv6)")?;
        }
        Ok(())
    }
}

/// A probe and what it observed.
#[derive(Clone, Debug)]
pub struct ProbeResult {
    pub probe: Probe,
    pub outcome: Outcome,
    pub elapsed: Duration,
}

pub(crate) struct Resolved {
    pub probe: Probe,
    pub src: Arc<NetnsWorker>,
    pub dst: SocketAddr,
}

pub(crate) async fn run_all(
    probes: Vec<Resolved>,
    timeout: Duration,
    seen: SeenTokens,
) -> Vec<ProbeResult> {
    let permits = Arc::new(Semaphore::new(MAX_IN_FLIGHT));
    let tasks: Vec<_> = probes
        .into_iter()
        .map(|r| {
            let permits = permits.clone();
            let seen = seen.clone();
            tokio::spawn(async move {
                let _permit = permits.acquire_owned().await.expect("never closed");
                let start = Instant::now();
                let outcome = run_one(&r, timeout, &seen).await;
                ProbeResult {
                    probe: r.probe,
                    outcome,
                    elapsed: start.elapsed(),
                }
            })
        })
        .collect();
    let mut results = Vec::with_capacity(tasks.len());
    for t in tasks {
        results.push(t.await.expect("probe tasks do not panic"));
    }
    results
}

fn new_socket(dst: SocketAddr, protocol: Protocol) -> std::io::Result<Socket> {
    let ty = match protocol {
        Protocol::Tcp => Type::STREAM,
        Protocol::Udp => Type::DGRAM,
        Protocol::Sctp => return sctp::raw_socket(dst.ip(), false),
    };
    let s = Socket::new(Domain::for_address(dst), ty, None)?;
    s.set_nonblocking(true)?;
    Ok(s)
}

fn rejected(e: std::io::Error) -> Outcome {
    Outcome::Rejected(e.to_string())
}

async fn run_one(r: &Resolved, timeout: Duration, seen: &SeenTokens) -> Outcome {
    let (dst, protocol) = (r.dst, r.probe.protocol);
    let socket = match r.src.run_async(move || new_socket(dst, protocol)).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => return rejected(e),
        Err(e) => return Outcome::Rejected(format!("{e:#}")),
    };
    let deadline = tokio::time::Instant::now() + timeout;
    match protocol {
        Protocol::Tcp => tcp(socket, dst, deadline).await,
        Protocol::Udp => udp(socket, dst, deadline, seen).await,
        Protocol::Sctp => {
            // Tokens are shared with UDP; SCTP tags are their low 32 bits.
            let tag = next_token() as u32;
            sctp::probe(socket, dst, deadline, seen, tag).await
        }
    }
}

async fn tcp(socket: Socket, dst: SocketAddr, deadline: tokio::time::Instant) -> Outcome {
    let socket = tokio::net::TcpSocket::from_std_stream(socket.into());
    let mut stream = match tokio::time::timeout_at(deadline, socket.connect(dst)).await {
        Err(_) => return Outcome::Blocked,
        Ok(Err(e)) => return rejected(e),
        Ok(Ok(s)) => s,
    };
    let mut byte = [0u8; 1];
    match tokio::time::timeout_at(deadline, stream.read_exact(&mut byte)).await {
        Ok(Ok(_)) if byte[0] == GREETING => Outcome::Allowed,
        Ok(Ok(_)) => Outcome::Rejected(format!("unexpected greeting {:#04x}", byte[0])),
        Ok(Err(e)) => rejected(e),
        Err(_) => Outcome::OneWay,
    }
}

async fn udp(
    socket: Socket,
    dst: SocketAddr,
    deadline: tokio::time::Instant,
    seen: &SeenTokens,
) -> Outcome {
    let socket = match tokio::net::UdpSocket::from_std(socket.into()) {
        Ok(s) => s,
        Err(e) => return rejected(e),
    };
    if let Err(e) = socket.connect(dst).await {
        return rejected(e);
    }
    let token = next_token();
    let msg = token.to_be_bytes();
    let mut buf = [0u8; 64];
    loop {
        if let Err(e) = socket.send(&msg).await {
            return rejected(e);
        }
        let resend_at = (tokio::time::Instant::now() + UDP_RESEND).min(deadline);
        // Wait for our echo until the next resend; ignore stray datagrams.
        loop {
            match tokio::time::timeout_at(resend_at, socket.recv(&mut buf)).await {
                Ok(Ok(n)) if n == msg.len() && buf[..n] == msg => return Outcome::Allowed,
                Ok(Ok(_)) => continue,
                Ok(Err(e)) => return rejected(e),
                Err(_) => break,
            }
        }
        if tokio::time::Instant::now() >= deadline {
            let reached = seen.lock().expect("not poisoned").contains(&token);
            return if reached {
                Outcome::OneWay
            } else {
                Outcome::Blocked
            };
        }
    }
}
