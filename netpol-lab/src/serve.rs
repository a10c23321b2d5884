//! Servers for the ports that pods and hosts declare. Listening sockets are created
//! inside the endpoint's namespace by its [`NetnsWorker`] and served on the lab's
//! tokio runtime.
//!
//! - TCP: accept, send one greeting byte ([`GREETING`]), close.
//! - UDP: echo every datagram; the first 8 bytes are the probe's token, which is
//!   recorded so a probe can tell "request lost" from "reply lost".
//! - SCTP: answer INIT with INIT-ACK from a raw socket (see `sctp.rs`); the INIT's
//!   initiate tag is recorded like a UDP token.

use std::net::{IpAddr, SocketAddr};

use socket2::{Domain, Socket, Type};
use tokio::io::AsyncWriteExt;
use tokio::task::JoinHandle;

use crate::error::{Context, Result};
use crate::netns::NetnsWorker;
use crate::sctp;
use crate::spec::Protocol;
use crate::wire::{GREETING, SeenTokens};

#[derive(Default)]
pub struct Servers {
    /// Each server task with its owner: the namespace it serves in, or for a
    /// `hostNetwork` pod (which shares its node's namespace) the pod.
    tasks: Vec<(String, JoinHandle<()>)>,
    udp_seen: SeenTokens,
}

fn bind(addr: SocketAddr, protocol: Protocol) -> std::io::Result<Socket> {
    let (ty, proto) = match protocol {
        Protocol::Tcp => (Type::STREAM, socket2::Protocol::TCP),
        Protocol::Udp => (Type::DGRAM, socket2::Protocol::UDP),
        Protocol::Sctp => return sctp::raw_socket(addr.ip(), true),
    };
    let socket = Socket::new(Domain::for_address(addr), ty, Some(proto))?;
    if addr.is_ipv6() {
        socket.set_only_v6(true)?;
    }
    socket.set_reuse_address(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    if protocol == Protocol::Tcp {
        socket.listen(1024)?;
    }
    Ok(socket)
}

impl Servers {
    pub fn udp_seen(&self) -> SeenTokens {
        self.udp_seen.clone()
    }

    /// Binds `ip:port` inside the worker's namespace and serves it on `rt`, on behalf
    /// of `owner` ([`Servers::stop_owner`]).
    pub fn start(
        &mut self,
        rt: &tokio::runtime::Runtime,
        worker: &NetnsWorker,
        owner: &str,
        ip: IpAddr,
        port: u16,
        protocol: Protocol,
    ) -> Result<()> {
        let addr = SocketAddr::new(ip, port);
        let socket = worker
            .run(move || bind(addr, protocol))?
            .with_context(|| format!("binding {protocol} {addr} in {}", worker.netns()))?;
        let _guard = rt.enter();
        let task = match protocol {
            Protocol::Tcp => {
                let listener = tokio::net::TcpListener::from_std(socket.into())?;
                rt.spawn(serve_tcp(listener))
            }
            Protocol::Udp => {
                let udp = tokio::net::UdpSocket::from_std(socket.into())?;
                rt.spawn(serve_udp(udp, self.udp_seen.clone()))
            }
            Protocol::Sctp => rt.spawn(sctp::serve(
                socket,
                ip.is_ipv4(),
                port,
                self.udp_seen.clone(),
            )),
        };
        self.tasks.push((owner.to_owned(), task));
        Ok(())
    }

    /// Stops every server; their sockets close when the tasks are dropped.
    pub fn stop(&mut self) {
        for (_, t) in self.tasks.drain(..) {
            t.abort();
        }
    }

    /// Stops the servers of one owner.
    pub fn stop_owner(&mut self, owner: &str) {
        self.tasks.retain(|(o, t)| {
            if o == owner {
                t.abort();
            }
            o != owner
        });
    }
}

async fn serve_tcp(listener: tokio::net::TcpListener) {
    loop {
        match listener.accept().await {
            Ok((mut stream, _)) => {
                tokio::spawn(async move {
                    let _ = stream.write_all(&[GREETING]).await;
                    let _ = stream.shutdown().await;
                });
            }
            // Transient (e.g. out of file descriptors): back off briefly.
            Err(_) => tokio::time::sleep(std::time::Duration::from_millis(10)).await,
        }
    }
}

async fn serve_udp(socket: tokio::net::UdpSocket, seen: SeenTokens) {
    let mut buf = [0u8; 1500];
    loop {
        match socket.recv_from(&mut buf).await {
            Ok((n, peer)) => {
                if n >= 8 {
                    let token = u64::from_be_bytes(buf[..8].try_into().expect("8 bytes"));
                    seen.lock().expect("not poisoned").insert(token);
                }
                let _ = socket.send_to(&buf[..n], peer).await;
            }
            Err(_) => tokio::time::sleep(std::time::Duration::from_millis(10)).await,
        }
    }
}
