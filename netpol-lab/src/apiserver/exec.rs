//! `pods/exec` as the API server serves it to kube-client's `ws` feature: a WebSocket
//! upgrade speaking `v4.channel.k8s.io` (each binary message starts with its channel:
//! 1 stdout, 2 stderr, 3 the final `Status`). The double runs what the test's
//! [`ExecHandler`] makes of the request (e.g. the command inside the lab's node where
//! that pod's container would run it) and streams its output.

use std::sync::Arc;

use futures::{SinkExt as _, StreamExt as _};
use hyper::body::Incoming;
use hyper::header::{self, HeaderValue};
use hyper::{Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde_json::json;
use tokio::io::AsyncReadExt as _;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::Role;

use super::http::{Body, respond, status_body};

/// The subprotocol the double speaks.
const PROTOCOL: &str = "v4.channel.k8s.io";

/// One exec request: the pod, its container (if named) and the command.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExecRequest {
    pub namespace: String,
    pub pod: String,
    pub container: Option<String>,
    pub command: Vec<String>,
}

/// What an exec runs: a process standing for the command in the pod's container, or
/// `None` when that container cannot run it (not running: the API server's 500).
pub type ExecHandler =
    Arc<dyn Fn(&ExecRequest) -> Option<tokio::process::Command> + Send + Sync + 'static>;

/// The namespace and pod of `/api/v1/namespaces/{ns}/pods/{name}/exec`.
pub(super) fn exec_path(path: &str) -> Option<(String, String)> {
    match path
        .trim_matches('/')
        .split('/')
        .collect::<Vec<_>>()
        .as_slice()
    {
        ["api", "v1", "namespaces", ns, "pods", name, "exec"] => {
            Some(((*ns).to_owned(), (*name).to_owned()))
        }
        _ => None,
    }
}

/// The exec request's parameters (`command` repeats, so not through the usual map).
pub(super) fn exec_request(namespace: String, pod: String, query: &str) -> ExecRequest {
    let mut request = ExecRequest {
        namespace,
        pod,
        container: None,
        command: Vec::new(),
    };
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        let value = super::http::percent_decode(value);
        match key {
            "command" => request.command.push(value),
            "container" => request.container = Some(value),
            _ => {}
        }
    }
    request
}

/// Answers an exec request: 404 without the pod, 400 without a WebSocket upgrade, 500
/// when the handler cannot run it; else 101 and the command's output over the socket.
pub(super) fn serve(
    request: hyper::Request<Incoming>,
    exec: &ExecRequest,
    pod_exists: bool,
    handler: Option<ExecHandler>,
) -> Response<Body> {
    if !pod_exists {
        return respond(
            StatusCode::NOT_FOUND,
            &status_body(404, "NotFound", &format!("pods \"{}\" not found", exec.pod)),
        );
    }
    let headers = request.headers();
    let key = headers
        .get(header::SEC_WEBSOCKET_KEY)
        .and_then(|k| k.to_str().ok())
        .map(str::to_owned);
    let offers_protocol = headers
        .get(header::SEC_WEBSOCKET_PROTOCOL)
        .and_then(|p| p.to_str().ok())
        .is_some_and(|p| p.split(',').any(|p| p.trim() == PROTOCOL));
    let (Some(key), true) = (key, offers_protocol) else {
        return respond(
            StatusCode::BAD_REQUEST,
            &status_body(
                400,
                "BadRequest",
                &format!("exec needs a WebSocket upgrade offering {PROTOCOL}"),
            ),
        );
    };
    let child = handler
        .and_then(|handler| handler(exec))
        .map(|mut command| {
            command
                .stdin(std::process::Stdio::null())
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .kill_on_drop(true)
                .spawn()
        });
    let child = match child {
        Some(Ok(child)) => child,
        Some(Err(error)) => {
            return respond(
                StatusCode::INTERNAL_SERVER_ERROR,
                &status_body(500, "InternalError", &format!("exec failed: {error}")),
            );
        }
        None => {
            return respond(
                StatusCode::INTERNAL_SERVER_ERROR,
                &status_body(
                    500,
                    "InternalError",
                    &format!(
                        "unable to upgrade connection: container not found (\"{}\")",
                        exec.pod
                    ),
                ),
            );
        }
    };
    tokio::spawn(async move {
        let Ok(upgraded) = hyper::upgrade::on(request).await else {
            return;
        };
        let socket =
            WebSocketStream::from_raw_socket(TokioIo::new(upgraded), Role::Server, None).await;
        relay(socket, child).await;
    });
    let mut response = Response::new(super::http::empty());
    *response.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let headers = response.headers_mut();
    headers.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    headers.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
    headers.insert(
        header::SEC_WEBSOCKET_ACCEPT,
        HeaderValue::from_str(&derive_accept_key(key.as_bytes())).expect("base64 is a header"),
    );
    headers.insert(
        header::SEC_WEBSOCKET_PROTOCOL,
        HeaderValue::from_static(PROTOCOL),
    );
    response
}

/// Copies the child's stdout and stderr to their channels until both end, then sends
/// its exit as channel 3's `Status` and closes; a client that goes away ends the child.
async fn relay<S>(mut socket: WebSocketStream<S>, mut child: tokio::process::Child)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let mut stdout = child.stdout.take();
    let mut stderr = child.stderr.take();
    let (mut out_buf, mut err_buf) = (vec![0u8; 16 * 1024], vec![0u8; 16 * 1024]);
    while stdout.is_some() || stderr.is_some() {
        let (channel, read) = tokio::select! {
            read = read_some(&mut stdout, &mut out_buf) => (1u8, read),
            read = read_some(&mut stderr, &mut err_buf) => (2u8, read),
            message = socket.next() => match message {
                Some(Ok(Message::Close(_))) | Some(Err(_)) | None => return,
                Some(Ok(_)) => continue,
            },
        };
        let buf = if channel == 1 { &out_buf } else { &err_buf };
        match read {
            Some(n) if n > 0 => {
                let mut frame = Vec::with_capacity(n + 1);
                frame.push(channel);
                frame.extend_from_slice(&buf[..n]);
                if socket.send(Message::binary(frame)).await.is_err() {
                    return;
                }
            }
            _ => {
                if channel == 1 {
                    stdout = None;
                } else {
                    stderr = None;
                }
            }
        }
    }
    let status = match child.wait().await.ok().and_then(|s| s.code()) {
        Some(0) => json!({"metadata": {}, "status": "Success"}),
        code => json!({
            "metadata": {}, "status": "Failure", "reason": "NonZeroExitCode",
            "message": match code {
                Some(code) => format!("command terminated with non-zero exit code {code}"),
                None => "command terminated by a signal".to_owned(),
            },
            "details": {"causes": [{"reason": "ExitCode",
                                     "message": code.unwrap_or(-1).to_string()}]},
        }),
    };
    let mut frame = vec![3u8];
    frame.extend_from_slice(&serde_json::to_vec(&status).expect("JSON"));
    let _ = socket.send(Message::binary(frame)).await;
    let _ = socket.close(None).await;
}

/// Reads what is available from `pipe` (`None` once it is gone or at its end; pending
/// forever when there is no pipe, so the other branch runs).
async fn read_some<R: tokio::io::AsyncRead + Unpin>(
    pipe: &mut Option<R>,
    buf: &mut [u8],
) -> Option<usize> {
    match pipe {
        Some(pipe) => pipe.read(buf).await.ok(),
        None => std::future::pending().await,
    }
}
