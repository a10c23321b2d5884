//! Liveness, readiness and metrics over HTTP, for the kubelet's probes and Prometheus.
//!
//! - `GET /healthz` (or `/livez`): 200 while the control loop turns (it beats at least
//!   every poll interval), 503 when it has not beaten for the `stall` given to
//!   [`Health::new`].
//! - `GET /readyz`: 200 once the first complete state is in the kernel (in Kubernetes
//!   mode: after every initial list), 503 before.
//! - `GET /metrics`: Prometheus metrics (OpenMetrics text; see `metrics.rs`).
//!
//! HTTP/1.1 by hyper on a tokio listener: one request per connection (no keep-alive),
//! the request head bounded in size and time, the whole exchange bounded by a timeout.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use http::{Method, Response, StatusCode, header};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
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

/// Bound on reading a request and on writing the answer.
const IO_TIMEOUT: Duration = Duration::from_secs(5);
/// Request heads larger than this are refused (hyper's smallest buffer limit).
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
    pub metrics: crate::telemetry::metrics::Metrics,
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
            metrics: crate::telemetry::metrics::Metrics::new(),
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
                        if let Err(error) = answer(stream, health).await {
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

/// Serves one connection: one request, then the connection closes.
async fn answer(stream: TcpStream, health: Arc<Health>) -> Result<(), hyper::Error> {
    let service = service_fn(move |request| {
        let response = respond(&request, &health);
        async move { Ok::<_, std::convert::Infallible>(response) }
    });
    let connection = http1::Builder::new()
        .keep_alive(false)
        .max_buf_size(MAX_REQUEST)
        .timer(TokioTimer::new())
        .header_read_timeout(IO_TIMEOUT)
        .serve_connection(TokioIo::new(stream), service);
    match tokio::time::timeout(2 * IO_TIMEOUT, connection).await {
        Ok(result) => result,
        Err(_) => {
            debug!("health connection timed out");
            Ok(())
        }
    }
}

/// The answer to one request (hyper leaves the body out for HEAD).
fn respond(request: &http::Request<Incoming>, health: &Health) -> Response<String> {
    const TEXT: &str = "text/plain; charset=utf-8";
    const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";
    let unavailable = StatusCode::SERVICE_UNAVAILABLE;
    let (status, content_type, body) = if !matches!(*request.method(), Method::GET | Method::HEAD) {
        (
            StatusCode::METHOD_NOT_ALLOWED,
            TEXT,
            "method not allowed\n".into(),
        )
    } else {
        match request.uri().path() {
            "/metrics" => (StatusCode::OK, OPENMETRICS, health.metrics.render()),
            "/healthz" | "/livez" if health.is_live() => (StatusCode::OK, TEXT, "ok\n".into()),
            "/healthz" | "/livez" => (unavailable, TEXT, "control loop stalled\n".into()),
            "/readyz" if health.is_ready() => (StatusCode::OK, TEXT, "ok\n".into()),
            "/readyz" => (unavailable, TEXT, "not ready\n".into()),
            _ => (StatusCode::NOT_FOUND, TEXT, "not found\n".into()),
        }
    };
    let mut response = Response::new(body);
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static(content_type),
    );
    response
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

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
        // A loop that beat within the hour is live, however slowly this test runs.
        let health = Arc::new(Health::new(Duration::from_secs(3600)));
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
    }

    #[tokio::test]
    async fn a_loop_that_stopped_beating_is_not_live() {
        // With no time allowed between beats, any beat is already too old.
        let health = Arc::new(Health::new(Duration::ZERO));
        let addr = serve("127.0.0.1:0".parse().unwrap(), health.clone())
            .await
            .unwrap();
        health.beat();
        health.set_ready(true);
        assert_eq!(
            get(addr, "/healthz").await,
            "HTTP/1.1 503 Service Unavailable"
        );
        assert_eq!(get(addr, "/readyz").await, "HTTP/1.1 200 OK");
    }
}
