//! HTTP/1.1 as the double speaks it, over hyper: the request as the handler needs it
//! (method, path, decoded query, body), JSON answers, and watch streams as a body fed
//! through a channel (each event one chunk; an error drops the connection mid-stream,
//! without the terminating chunk).

use std::collections::BTreeMap;
use std::pin::Pin;
use std::task::{Context, Poll};

use http_body_util::{BodyExt as _, Full};
use hyper::body::{Bytes, Frame, Incoming};
use hyper::header::{CONTENT_TYPE, HeaderValue};
use hyper::{Response, StatusCode};
use serde_json::{Value, json};
use tokio::sync::mpsc;

/// The body of every answer: a whole JSON document, or a watch stream.
pub(super) type Body = http_body_util::combinators::BoxBody<Bytes, std::io::Error>;

pub(super) struct HttpRequest {
    pub method: String,
    pub path: String,
    pub query: BTreeMap<String, String>,
    pub body: Bytes,
}

/// Reads the whole request (the double's requests are small).
pub(super) async fn read_request(request: hyper::Request<Incoming>) -> hyper::Result<HttpRequest> {
    let (parts, body) = request.into_parts();
    let body = body.collect().await?.to_bytes();
    let query = parts
        .uri
        .query()
        .unwrap_or_default()
        .split('&')
        .filter(|kv| !kv.is_empty())
        .map(|kv| {
            let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
            (percent_decode(k), percent_decode(v))
        })
        .collect();
    Ok(HttpRequest {
        method: parts.method.as_str().to_owned(),
        path: parts.uri.path().to_owned(),
        query,
        body,
    })
}

pub(super) fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = (bytes[i] == b'%' && i + 2 < bytes.len())
            .then(|| std::str::from_utf8(&bytes[i + 1..i + 3]).ok())
            .flatten()
            .and_then(|h| u8::from_str_radix(h, 16).ok());
        match (hex, bytes[i]) {
            (Some(b), _) => {
                out.push(b);
                i += 3;
            }
            (None, b'+') => {
                out.push(b' ');
                i += 1;
            }
            (None, b) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn json_response(status: StatusCode, body: Body) -> Response<Body> {
    let mut response = Response::new(body);
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    response
}

/// A whole JSON document with `status` (hyper adds its `Content-Length`).
pub(super) fn respond(status: StatusCode, body: &Value) -> Response<Body> {
    respond_with(status, body)
}

/// A JSON response of any serializable body.
pub(super) fn respond_with(status: StatusCode, body: &impl serde::Serialize) -> Response<Body> {
    let bytes = serde_json::to_vec(body).expect("a JSON body serializes");
    json_response(
        status,
        Full::new(Bytes::from(bytes))
            .map_err(|never| match never {})
            .boxed(),
    )
}

/// An empty body (the 101 of an upgrade).
pub(super) fn empty() -> Body {
    http_body_util::Empty::new()
        .map_err(|never| match never {})
        .boxed()
}

pub(super) fn status_body(code: u16, reason: &str, message: &str) -> Value {
    json!({
        "kind": "Status", "apiVersion": "v1", "metadata": {},
        "status": "Failure", "message": message, "reason": reason, "code": code,
    })
}

/// What a watch producer sends: one event (a chunk), or an error that drops the
/// connection without a terminating chunk.
pub(super) type Chunk = std::io::Result<Bytes>;

/// A 200 answer whose body is what the returned sender sends, one chunk per event
/// (`Transfer-Encoding: chunked`); it ends properly when the sender is dropped.
pub(super) fn stream() -> (mpsc::Sender<Chunk>, Response<Body>) {
    let (tx, rx) = mpsc::channel(64);
    (tx, json_response(StatusCode::OK, ChannelBody(rx).boxed()))
}

/// One watch event as a line of JSON.
pub(super) fn event(value: &Value) -> Chunk {
    let mut line = serde_json::to_vec(value).map_err(std::io::Error::other)?;
    line.push(b'\n');
    Ok(Bytes::from(line))
}

/// A body of unknown length (so hyper chunks it) read from a channel.
struct ChannelBody(mpsc::Receiver<Chunk>);

impl hyper::body::Body for ChannelBody {
    type Data = Bytes;
    type Error = std::io::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, std::io::Error>>> {
        self.0
            .poll_recv(cx)
            .map(|chunk| chunk.map(|c| c.map(Frame::data)))
    }
}
