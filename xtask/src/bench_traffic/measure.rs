//! One measurement run: the bulk receiver and echo servers in x/server, a throughput
//! stream, 1-byte request/response round trips on one connection, and new connections
//! (connect, one round trip, close) from x/client.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use netpol_lab::Lab;

use super::report::Row;
use super::setups::Target;
use super::{RR_PORT, STREAM_PORT, Sizes};

const WRITE_SIZE: usize = 64 * 1024;

/// One run of `row`'s setup: a throughput stream, then request/response, from x/client
/// pinned to CPU 0 (the servers run on CPU 1).
pub(super) fn measure(lab: &Lab, target: Target, sizes: Sizes, row: &mut Row) -> Result<()> {
    let client = lab.worker("x/client")?;
    client.run(|| pin_to_cpu(0))?;
    let server = target.ip;
    let stream_addr = SocketAddr::new(server.into(), STREAM_PORT + target.port_offset);
    let conn =
        client.run(move || TcpStream::connect_timeout(&stream_addr, Duration::from_secs(2)))??;
    row.gbits.push(stream(conn, sizes.stream_for)?);
    let rr_addr = SocketAddr::new(server.into(), RR_PORT + target.port_offset);
    let conn =
        client.run(move || TcpStream::connect_timeout(&rr_addr, Duration::from_secs(2)))??;
    let (p50, p99) = request_response(conn, sizes.round_trips)?;
    row.p50_us.push(p50);
    row.p99_us.push(p99);
    let (p50, p99) = client.run(move || new_connections(rr_addr, sizes.connections))??;
    row.conn_p50_us.push(p50);
    row.conn_p99_us.push(p99);
    Ok(())
}

/// `count` new connections, one after the other: connect, one 1-byte round trip, close.
/// (p50, p99) of each one's time in µs. This is where an enforcer's cost per new
/// connection shows (the policy decision; for iptables every chain of the pod).
fn new_connections(addr: SocketAddr, count: usize) -> Result<(f64, f64)> {
    let mut times = Vec::with_capacity(count);
    let mut b = [1u8];
    for _ in 0..count {
        let t = Instant::now();
        let mut conn =
            TcpStream::connect_timeout(&addr, Duration::from_secs(2)).context("new connection")?;
        conn.set_nodelay(true)?;
        conn.write_all(&b)?;
        conn.read_exact(&mut b)?;
        times.push(t.elapsed().as_secs_f64() * 1e6);
        // Closed by the client: TIME_WAIT stays on the client's side, whose ports are
        // plentiful.
        drop(conn);
    }
    Ok(percentiles(times))
}

/// (p50, p99) of `times`.
fn percentiles(mut times: Vec<f64>) -> (f64, f64) {
    times.sort_by(f64::total_cmp);
    let pct = |p: f64| times[((times.len() as f64 * p) as usize).min(times.len() - 1)];
    (pct(0.50), pct(0.99))
}

/// Pins the calling thread to `cpu` when the machine has it (best effort: a bench on one
/// CPU still runs).
fn pin_to_cpu(cpu: usize) {
    let mut set = nix::sched::CpuSet::new();
    let online = std::thread::available_parallelism().map_or(1, usize::from);
    if cpu < online && set.set(cpu).is_ok() {
        let _ = nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &set);
    }
}

/// Writes 64 KiB chunks for `duration`, half-closes, waits for the receiver to close
/// (it has read everything): bits per second over the whole exchange, in Gbit/s.
fn stream(mut conn: TcpStream, duration: Duration) -> Result<f64> {
    let buf = vec![0x5au8; WRITE_SIZE];
    let start = Instant::now();
    let mut sent = 0u64;
    while start.elapsed() < duration {
        conn.write_all(&buf).context("stream write")?;
        sent += WRITE_SIZE as u64;
    }
    conn.shutdown(std::net::Shutdown::Write)?;
    let mut ack = [0u8; 8];
    conn.read_exact(&mut ack).context("stream byte count")?;
    let elapsed = start.elapsed().as_secs_f64();
    let received = u64::from_be_bytes(ack);
    if received != sent {
        bail!("the receiver got {received} of {sent} bytes");
    }
    Ok(sent as f64 * 8.0 / elapsed / 1e9)
}

/// `round_trips` 1-byte ping-pongs after 100 warm-up ones: (p50, p99) in µs.
fn request_response(mut conn: TcpStream, round_trips: usize) -> Result<(f64, f64)> {
    conn.set_nodelay(true)?;
    let mut b = [1u8];
    for _ in 0..100 {
        conn.write_all(&b)?;
        conn.read_exact(&mut b)?;
    }
    let mut times = Vec::with_capacity(round_trips);
    for _ in 0..round_trips {
        let t = Instant::now();
        conn.write_all(&b)?;
        conn.read_exact(&mut b)?;
        times.push(t.elapsed().as_secs_f64() * 1e6);
    }
    Ok(percentiles(times))
}

/// The bulk receiver and the echo server, bound inside x/server.
pub(super) struct BenchServers {
    stop: Arc<AtomicBool>,
    addrs: Vec<SocketAddr>,
    threads: Vec<JoinHandle<()>>,
    client: Arc<netpol_lab::NetnsWorker>,
}

impl BenchServers {
    pub fn start(lab: &Lab, ip: Ipv4Addr) -> Result<Self> {
        let worker = lab.worker("x/server")?;
        let stop = Arc::new(AtomicBool::new(false));
        let mut threads = Vec::new();
        let mut addrs = Vec::new();
        for (port, echo) in [(STREAM_PORT, false), (RR_PORT, true)] {
            let addr = SocketAddr::new(ip.into(), port);
            let listener = worker.run(move || TcpListener::bind(addr))??;
            let stop = stop.clone();
            addrs.push(addr);
            threads.push(std::thread::spawn(move || {
                pin_to_cpu(1);
                while let Ok((conn, _)) = listener.accept() {
                    if stop.load(Ordering::Relaxed) {
                        break;
                    }
                    let _ = if echo { echo_conn(conn) } else { sink(conn) };
                }
            }));
        }
        Ok(Self {
            stop,
            addrs,
            threads,
            client: lab.worker("x/client")?,
        })
    }

    /// Wakes the accept loops with one connection each (from x/client, which every
    /// setup allows) and joins them.
    pub fn stop(self) {
        self.stop.store(true, Ordering::Relaxed);
        for addr in self.addrs {
            let _ = self
                .client
                .run(move || TcpStream::connect_timeout(&addr, Duration::from_secs(1)));
        }
        for t in self.threads {
            let _ = t.join();
        }
    }
}

fn sink(mut conn: TcpStream) -> std::io::Result<()> {
    let mut buf = vec![0u8; 256 * 1024];
    let mut total = 0u64;
    loop {
        match conn.read(&mut buf)? {
            0 => break,
            n => total += n as u64,
        }
    }
    conn.write_all(&total.to_be_bytes())
}

fn echo_conn(mut conn: TcpStream) -> std::io::Result<()> {
    conn.set_nodelay(true)?;
    let mut b = [0u8; 1];
    loop {
        match conn.read(&mut b)? {
            0 => return Ok(()),
            _ => conn.write_all(&b)?,
        }
    }
}
