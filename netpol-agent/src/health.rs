//! Liveness, readiness and metrics over HTTP, for the kubelet's probes and Prometheus.
//!
//! - `GET /healthz` (or `/livez`): 200 while the control loop turns (it beats at least
//!   every poll interval), 503 when it has not beaten for [`Health::stall`].
//! - `GET /readyz`: 200 once the first complete state is in the kernel (in Kubernetes
//!   mode: after every initial list), 503 before.
//! - `GET /metrics`: Prometheus metrics (OpenMetrics text; see `metrics.rs`).
//!
//! A minimal HTTP/1.1 responder on a tokio listener: one request per connection, every
//! read and write bounded by a timeout.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};
use tracing::{debug, info};

/// Errors of the health server. Each variant is one metric label.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("health endpoint {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
}

/// Bound on reading a request and writing the answer.
const IO_TIMEOUT: Duration = Duration::from_secs(5);
/// Requests larger than this are refused.
const MAX_REQUEST: usize = 8 * 1024;

/// What the probes report; shared between the control loop and the server.
#[derive(Debug)]
pub struct Health {
    started: Instant,
    /// Milliseconds since `started` of the last beat.
    beat_ms: AtomicU64,
    ready: AtomicBool,
    stall: Duration,
    /// Served on `/metrics`.
    pub metrics: crate::metrics::Metrics,
}

impl Default for Health {
    fn default() -> Self {
        Health::new(Duration::from_secs(60))
    }
}

impl Health {
    /// Live while the loop beats at least every `stall`.
    pub fn new(stall: Duration) -> Self {
        Health {
            started: Instant::now(),
            beat_ms: AtomicU64::new(0),
            ready: AtomicBool::new(false),
            stall,
            metrics: crate::metrics::Metrics::new(),
        }
    }

    /// The control loop is alive.
    pub fn beat(&self) {
        let now = u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.beat_ms.store(now, Ordering::Relaxed);
    }

    pub fn set_ready(&self, ready: bool) {
        self.ready.store(ready, Ordering::Relaxed);
    }

    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Relaxed)
    }

    pub fn is_live(&self) -> bool {
        let beat = Duration::from_millis(self.beat_ms.load(Ordering::Relaxed));
        self.started.elapsed().saturating_sub(beat) < self.stall
    }

    pub fn stall(&self) -> Duration {
        self.stall
    }
}

/// Binds `addr` and serves the probes in the background until the runtime stops.
/// Returns the bound address (useful with port 0).
pub async fn serve(addr: SocketAddr, health: Arc<Health>) -> Result<SocketAddr, Error> {
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|source| Error::Bind { addr, source })?;
    let bound = listener
        .local_addr()
        .map_err(|source| Error::Bind { addr, source })?;
    info!(addr = %bound, "health and metrics endpoints: /healthz, /readyz, /metrics");
    tokio::spawn(async move {
        loop {
            match listener.accept().await {
                Ok((stream, _)) => {
                    let health = health.clone();
                    tokio::spawn(async move {
                        if let Err(error) = answer(stream, &health).await {
                            debug!(%error, "health request");
                        }
                    });
                }
                Err(error) => {
                    debug!(%error, "health accept");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    });
    Ok(bound)
}

async fn answer(mut stream: TcpStream, health: &Health) -> std::io::Result<()> {
    let mut request = Vec::with_capacity(512);
    let mut buf = [0u8; 1024];
    let read = async {
        while !request.windows(4).any(|w| w == b"\r\n\r\n") && request.len() < MAX_REQUEST {
            let n = stream.read(&mut buf).await?;
            if n == 0 {
                break;
            }
            request.extend_from_slice(&buf[..n]);
        }
        Ok::<_, std::io::Error>(())
    };
    tokio::time::timeout(IO_TIMEOUT, read)
        .await
        .map_err(|_| std::io::Error::from(std::io::ErrorKind::TimedOut))??;
    let line = request.split(|&b| b == b'\n').next().unwrap_or_default();
    let line = String::from_utf8_lossy(line);
    let mut parts = line.split_whitespace();
    let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let path = path.split('?').next().unwrap_or("");
    let metrics;
    let mut content_type = "text/plain; charset=utf-8";
    let (status, body) = match (method, path) {
        ("GET" | "HEAD", "/metrics") => {
            metrics = health.metrics.render();
            content_type = "application/openmetrics-text; version=1.0.0; charset=utf-8";
            ("200 OK", metrics.as_str())
        }
        ("GET" | "HEAD", "/healthz" | "/livez") if health.is_live() => ("200 OK", "ok\n"),
        ("GET" | "HEAD", "/healthz" | "/livez") => {
            ("503 Service Unavailable", "control loop stalled\n")
        }
        ("GET" | "HEAD", "/readyz") if health.is_ready() => ("200 OK", "ok\n"),
        ("GET" | "HEAD", "/readyz") => ("503 Service Unavailable", "not ready\n"),
        ("GET" | "HEAD", _) => ("404 Not Found", "not found\n"),
        _ => ("405 Method Not Allowed", "method not allowed\n"),
    };
    let head = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\n\
         Connection: close\r\n\r\n",
        body.len()
    );
    let write = async {
        stream.write_all(head.as_bytes()).await?;
        if method != "HEAD" {
            stream.write_all(body.as_bytes()).await?;
        }
        stream.shutdown().await
    };
    tokio::time::timeout(IO_TIMEOUT, write)
        .await
        .map_err(|_| std::io::Error::from(std::io::ErrorKind::TimedOut))?
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn get(addr: SocketAddr, path: &str) -> String {
        let mut stream = TcpStream::connect(addr).await.unwrap();
        stream
            .write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())
            .await
            .unwrap();
        let mut out = String::new();
        stream.read_to_string(&mut out).await.unwrap();
        out.lines().next().unwrap_or_default().to_owned()
    }

    #[tokio::test]
    async fn probes_follow_the_loop() {
        let health = Arc::new(Health::new(Duration::from_millis(200)));
        let addr = serve("127.0.0.1:0".parse().unwrap(), health.clone())
            .await
            .unwrap();
        health.beat();
        assert_eq!(get(addr, "/healthz").await, "HTTP/1.1 200 OK");
        assert_eq!(
            get(addr, "/readyz").await,
            "HTTP/1.1 503 Service Unavailable"
        );
        health.set_ready(true);
        assert_eq!(get(addr, "/readyz").await, "HTTP/1.1 200 OK");
        assert_eq!(get(addr, "/nope").await, "HTTP/1.1 404 Not Found");
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(
            get(addr, "/healthz").await,
            "HTTP/1.1 503 Service Unavailable"
        );
    }
}
