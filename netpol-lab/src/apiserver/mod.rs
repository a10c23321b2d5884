//! An in-process Kubernetes API server double, speaking the real HTTP list/watch
//! protocol so that the real kube-rs client is exercised (the agent's kube tests, and
//! `cargo xtask conformance --source kube`).
//!
//! Served (HTTP/1.1, JSON, keep-alive):
//! - `GET` list of Namespaces, Pods, NetworkPolicies, Nodes (cluster-wide or in a
//!   namespace): `{"kind": "PodList", "metadata": {"resourceVersion"}, "items"}`, items
//!   without kind/apiVersion as the real server sends them; `fieldSelector` on
//!   `metadata.name`, `metadata.namespace`, `spec.nodeName` (`=`, `==`, `!=`).
//! - `GET ...?watch=1&resourceVersion=N`: a chunked stream of `ADDED`, `MODIFIED`,
//!   `DELETED` events after N, `BOOKMARK`s (with `allowWatchBookmarks`), an `ERROR`
//!   event with code 410 when N is older than the retained history, and a clean end after
//!   `timeoutSeconds`.
//! - `POST`/`PATCH` of `events.k8s.io/v1` and core Events: recorded and echoed.
//!
//! Faults on demand: [`ApiServer::kill_watches`] drops every watch connection mid-stream
//! (no terminating chunk), [`ApiServer::expire`] forgets the event history and answers
//! every open watch with 410 Gone, [`ApiServer::stop`] / [`ApiServer::restart`] take the
//! whole server away and back on the same address, with its objects (as etcd keeps
//! them). Resource versions are one global counter, like etcd revisions.
//!
//! HTTP is spoken by hand (`http.rs`): only tokio, serde_json and std.

mod http;
mod store;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{Value, json};
use tokio::io::AsyncWriteExt as _;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::{AbortHandle, JoinHandle};

use http::{HttpRequest, chunk, read_request, respond, status_body};
use store::{CORE_EVENTS, Key, Store, key_of, kind_named};
pub use store::{KINDS, Kind};

/// One API request as the double saw it (for RBAC checks).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Request {
    /// Kubernetes verb: get, list, watch, create, update, patch, delete.
    pub verb: String,
    pub group: String,
    pub resource: String,
    pub namespace: Option<String>,
}

struct Shared {
    store: Mutex<Store>,
    /// The current version, for watchers to wait on.
    version: watch::Sender<u64>,
    /// Bumped to drop every watch stream abruptly.
    kill: watch::Sender<u64>,
    /// Bumped to end every watch stream with 410 Gone.
    expire: watch::Sender<u64>,
    connections: Mutex<Vec<AbortHandle>>,
    requests: Mutex<Vec<Request>>,
    open_watches: AtomicUsize,
    bookmark_interval: Duration,
    /// (resource, verb) → HTTP status answered instead of serving.
    failing: Mutex<BTreeMap<(String, String), u16>>,
}

/// The double. Dropping it stops serving.
pub struct ApiServer {
    shared: Arc<Shared>,
    addr: SocketAddr,
    accept: Option<JoinHandle<()>>,
}

impl ApiServer {
    /// Serves on a fresh port of 127.0.0.1.
    pub async fn start() -> std::io::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        Ok(Self::serve(listener, Duration::from_secs(1)))
    }

    /// Serves on `listener` (e.g. created inside another network namespace). Must be
    /// called within a tokio runtime.
    pub fn start_on(listener: std::net::TcpListener) -> std::io::Result<Self> {
        listener.set_nonblocking(true)?;
        Ok(Self::serve(
            TcpListener::from_std(listener)?,
            Duration::from_secs(1),
        ))
    }

    fn serve(listener: TcpListener, bookmark_interval: Duration) -> Self {
        let addr = listener.local_addr().expect("a bound listener");
        let shared = Arc::new(Shared {
            store: Mutex::new(Store::default()),
            version: watch::channel(0).0,
            kill: watch::channel(0).0,
            expire: watch::channel(0).0,
            connections: Mutex::new(Vec::new()),
            requests: Mutex::new(Vec::new()),
            open_watches: AtomicUsize::new(0),
            bookmark_interval,
            failing: Mutex::new(BTreeMap::new()),
        });
        let accept = Some(tokio::spawn(accept_loop(listener, shared.clone())));
        ApiServer {
            shared,
            addr,
            accept,
        }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// A kubeconfig pointing at the double.
    pub fn kubeconfig(&self) -> String {
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: double\n  cluster:\n    server: {}\n\
             contexts:\n- name: double\n  context:\n    cluster: double\n    user: double\n\
             current-context: double\nusers:\n- name: double\n  user: {{}}\n",
            self.url()
        )
    }

    /// The current resource version (etcd's revision).
    pub fn resource_version(&self) -> u64 {
        self.shared.store.lock().expect("not poisoned").version
    }

    /// Watch streams now open.
    pub fn open_watches(&self) -> usize {
        self.shared.open_watches.load(Ordering::SeqCst)
    }

    /// Every request so far.
    pub fn requests(&self) -> Vec<Request> {
        self.shared.requests.lock().expect("not poisoned").clone()
    }

    /// Events created or patched by clients.
    pub fn events(&self) -> Vec<Value> {
        self.shared
            .store
            .lock()
            .expect("not poisoned")
            .events
            .clone()
    }

    /// Creates or replaces an object (by its kind, namespace and name); returns the new
    /// resource version. An identical object is left alone (no event).
    pub fn apply(&self, object: Value) -> u64 {
        let mut store = self.shared.store.lock().expect("not poisoned");
        let version = store.apply(object);
        drop(store);
        self.shared.version.send_replace(version);
        version
    }

    /// Deletes an object; returns the new resource version if it existed.
    pub fn delete(&self, kind: &str, namespace: Option<&str>, name: &str) -> Option<u64> {
        let kind = kind_named(kind)?;
        let mut store = self.shared.store.lock().expect("not poisoned");
        let version = store.delete(&(
            kind.kind,
            namespace.unwrap_or_default().to_owned(),
            name.to_owned(),
        ))?;
        drop(store);
        self.shared.version.send_replace(version);
        Some(version)
    }

    /// Makes the objects of `kind` exactly `objects`: new ones are added, changed ones
    /// modified, missing ones deleted, identical ones left alone. Returns the version.
    pub fn replace_all(&self, kind: &str, objects: Vec<Value>) -> u64 {
        let mut store = self.shared.store.lock().expect("not poisoned");
        let mut keep = Vec::new();
        for object in objects {
            keep.push(key_of(&object));
            store.apply(object);
        }
        let stale: Vec<Key> = store
            .objects
            .keys()
            .filter(|key| key.0 == kind && !keep.contains(key))
            .cloned()
            .collect();
        for key in stale {
            store.delete(&key);
        }
        let version = store.version;
        drop(store);
        self.shared.version.send_replace(version);
        version
    }

    /// Answers `verb` (list, watch...) on `resource` (pods...) with HTTP `code` from now on;
    /// `None` serves it again.
    pub fn fail(&self, resource: &str, verb: &str, code: Option<u16>) {
        let mut failing = self.shared.failing.lock().expect("not poisoned");
        let key = (resource.to_owned(), verb.to_owned());
        match code {
            Some(code) => failing.insert(key, code),
            None => failing.remove(&key),
        };
    }

    /// Drops every open watch connection without ending its stream properly.
    pub fn kill_watches(&self) {
        self.shared.kill.send_modify(|epoch| *epoch += 1);
    }

    /// Forgets the event history: watches from older versions get 410 Gone.
    pub fn compact(&self) {
        let mut store = self.shared.store.lock().expect("not poisoned");
        store.history.clear();
        store.oldest = store.version;
    }

    /// [`ApiServer::compact`], and every open watch ends with an ERROR event 410.
    pub fn expire(&self) {
        self.compact();
        self.shared.expire.send_modify(|epoch| *epoch += 1);
    }

    /// Stops listening and drops every connection; the objects stay.
    pub fn stop(&mut self) {
        if let Some(accept) = self.accept.take() {
            accept.abort();
        }
        for connection in self
            .shared
            .connections
            .lock()
            .expect("not poisoned")
            .drain(..)
        {
            connection.abort();
        }
    }

    /// Serves again on the same address, with the same objects (and history).
    pub async fn restart(&mut self) -> std::io::Result<()> {
        self.stop();
        let listener = TcpListener::bind(self.addr).await?;
        self.accept = Some(tokio::spawn(accept_loop(listener, self.shared.clone())));
        Ok(())
    }

    /// Serves again on `listener` (bound to the same address, e.g. in another network
    /// namespace), with the same objects. Must be called within a tokio runtime.
    pub fn restart_on(&mut self, listener: std::net::TcpListener) -> std::io::Result<()> {
        self.stop();
        listener.set_nonblocking(true)?;
        let listener = TcpListener::from_std(listener)?;
        self.accept = Some(tokio::spawn(accept_loop(listener, self.shared.clone())));
        Ok(())
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        self.stop();
    }
}

async fn accept_loop(listener: TcpListener, shared: Arc<Shared>) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(10)).await;
            continue;
        };
        let _ = stream.set_nodelay(true);
        let task = tokio::spawn(connection(stream, shared.clone()));
        let mut connections = shared.connections.lock().expect("not poisoned");
        connections.retain(|c| !c.is_finished());
        connections.push(task.abort_handle());
    }
}

/// Idle keep-alive connections are closed after this long.
const IDLE: Duration = Duration::from_secs(120);

async fn connection(mut stream: TcpStream, shared: Arc<Shared>) {
    let mut buffer = Vec::new();
    loop {
        let request = match tokio::time::timeout(IDLE, read_request(&mut stream, &mut buffer)).await
        {
            Ok(Ok(Some(request))) => request,
            _ => return,
        };
        match handle(&mut stream, &shared, request).await {
            Ok(true) => {}
            // Killed watch: drop the socket without a terminating chunk.
            Ok(false) | Err(_) => return,
        }
    }
}

/// Where a path points: kind, namespace, name.
fn route(path: &str) -> Option<(Kind, Option<String>, Option<String>)> {
    let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
    let (group, rest) = match segments.as_slice() {
        ["api", "v1", rest @ ..] => ("", rest),
        ["apis", group, _version, rest @ ..] => (*group, rest),
        _ => return None,
    };
    let (namespace, resource, name) = match rest {
        ["namespaces", ns, resource, tail @ ..] => (Some(*ns), *resource, tail.first().copied()),
        [resource, tail @ ..] => (None, *resource, tail.first().copied()),
        [] => return None,
    };
    let kind = KINDS
        .iter()
        .copied()
        .chain([CORE_EVENTS])
        .find(|k| k.group == group && k.resource == resource)?;
    Some((kind, namespace.map(str::to_owned), name.map(str::to_owned)))
}

/// `field=value` / `field==value` / `field!=value` terms of a fieldSelector.
fn selector_matches(selector: Option<&String>, object: &Value) -> bool {
    let Some(selector) = selector.filter(|s| !s.is_empty()) else {
        return true;
    };
    selector.split(',').all(|term| {
        let (field, value, negate) = if let Some((f, v)) = term.split_once("!=") {
            (f, v, true)
        } else if let Some((f, v)) = term.split_once("==") {
            (f, v, false)
        } else if let Some((f, v)) = term.split_once('=') {
            (f, v, false)
        } else {
            return true;
        };
        let actual = field
            .trim()
            .split('.')
            .try_fold(object, |v, part| v.get(part))
            .and_then(Value::as_str)
            .unwrap_or_default();
        (actual == value.trim()) != negate
    })
}

fn in_scope(
    kind: Kind,
    namespace: Option<&str>,
    selector: Option<&String>,
    object: &Value,
) -> bool {
    object["kind"].as_str() == Some(kind.kind)
        && namespace.is_none_or(|ns| object["metadata"]["namespace"].as_str() == Some(ns))
        && selector_matches(selector, object)
}

async fn handle(
    stream: &mut TcpStream,
    shared: &Arc<Shared>,
    request: HttpRequest,
) -> std::io::Result<bool> {
    let Some((kind, namespace, name)) = route(&request.path) else {
        return respond(
            stream,
            "404 Not Found",
            &status_body(404, "NotFound", &format!("no route {}", request.path)),
        )
        .await;
    };
    let watching = matches!(
        request.query.get("watch").map(String::as_str),
        Some("1" | "true")
    );
    let verb = match (request.method.as_str(), &name, watching) {
        ("GET", _, true) => "watch",
        ("GET", Some(_), false) => "get",
        ("GET", None, false) => "list",
        ("POST", _, _) => "create",
        ("PUT", _, _) => "update",
        ("PATCH", _, _) => "patch",
        ("DELETE", _, _) => "delete",
        _ => "unknown",
    };
    shared.requests.lock().expect("not poisoned").push(Request {
        verb: verb.to_owned(),
        group: kind.group.to_owned(),
        resource: kind.resource.to_owned(),
        namespace: namespace.clone(),
    });
    let injected = shared
        .failing
        .lock()
        .expect("not poisoned")
        .get(&(kind.resource.to_owned(), verb.to_owned()))
        .copied();
    if let Some(code) = injected {
        let (status, reason) = match code {
            410 => ("410 Gone", "Expired"),
            403 => ("403 Forbidden", "Forbidden"),
            _ => ("503 Service Unavailable", "ServiceUnavailable"),
        };
        return respond(
            stream,
            status,
            &status_body(code, reason, "injected failure"),
        )
        .await;
    }
    let selector = request.query.get("fieldSelector");
    match verb {
        "list" => {
            let body = {
                let store = shared.store.lock().expect("not poisoned");
                let items: Vec<Value> = store
                    .objects
                    .values()
                    .filter(|o| in_scope(kind, namespace.as_deref(), selector, o))
                    .map(|o| {
                        let mut item = o.clone();
                        if let Some(map) = item.as_object_mut() {
                            map.remove("kind");
                            map.remove("apiVersion");
                        }
                        item
                    })
                    .collect();
                json!({
                    "kind": format!("{}List", kind.kind),
                    "apiVersion": kind.api_version,
                    "metadata": {"resourceVersion": store.version.to_string()},
                    "items": items,
                })
            };
            respond(stream, "200 OK", &body).await
        }
        "get" => {
            let key = (
                kind.kind,
                namespace.clone().unwrap_or_default(),
                name.clone().unwrap_or_default(),
            );
            let object = shared
                .store
                .lock()
                .expect("not poisoned")
                .objects
                .get(&key)
                .cloned();
            match object {
                Some(object) => respond(stream, "200 OK", &object).await,
                None => {
                    respond(
                        stream,
                        "404 Not Found",
                        &status_body(404, "NotFound", "not found"),
                    )
                    .await
                }
            }
        }
        "watch" => {
            shared.open_watches.fetch_add(1, Ordering::SeqCst);
            let result = watch_stream(stream, shared, kind, namespace.as_deref(), &request).await;
            shared.open_watches.fetch_sub(1, Ordering::SeqCst);
            result
        }
        "create" | "patch" | "update" if kind.resource == "events" => {
            let mut object: Value = serde_json::from_slice(&request.body).unwrap_or(Value::Null);
            {
                let mut store = shared.store.lock().expect("not poisoned");
                store.version += 1;
                if object.is_object() {
                    object["metadata"]["resourceVersion"] = json!(store.version.to_string());
                }
                store.events.push(object.clone());
            }
            let status = if verb == "create" {
                "201 Created"
            } else {
                "200 OK"
            };
            respond(stream, status, &object).await
        }
        _ => {
            respond(
                stream,
                "405 Method Not Allowed",
                &status_body(405, "MethodNotAllowed", "the double only reads"),
            )
            .await
        }
    }
}

/// Streams watch events; `Ok(true)`: ended properly (the connection may be reused),
/// `Ok(false)`: killed.
async fn watch_stream(
    stream: &mut TcpStream,
    shared: &Arc<Shared>,
    kind: Kind,
    namespace: Option<&str>,
    request: &HttpRequest,
) -> std::io::Result<bool> {
    let selector = request.query.get("fieldSelector");
    let bookmarks = matches!(
        request.query.get("allowWatchBookmarks").map(String::as_str),
        Some("true" | "1")
    );
    let timeout = request
        .query
        .get("timeoutSeconds")
        .and_then(|t| t.parse().ok())
        .map_or(Duration::from_secs(290), Duration::from_secs);
    let deadline = tokio::time::Instant::now() + timeout;
    let mut versions = shared.version.subscribe();
    let mut kill = shared.kill.subscribe();
    let mut expire = shared.expire.subscribe();
    kill.mark_unchanged();
    expire.mark_unchanged();
    stream
        .write_all(
            b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n",
        )
        .await?;
    let requested = request
        .query
        .get("resourceVersion")
        .cloned()
        .unwrap_or_default();
    // Where to start: a version to resume from, 410 Gone, or the current objects.
    enum Start {
        From(u64),
        Gone(Value),
        Current(Vec<Value>, u64),
    }
    let start = {
        let store = shared.store.lock().expect("not poisoned");
        match requested.parse::<u64>() {
            Ok(version) if version > 0 && version < store.oldest => Start::Gone(status_body(
                410,
                "Expired",
                &format!("too old resource version: {version} ({})", store.oldest),
            )),
            Ok(version) if version > 0 => Start::From(version),
            // "" or "0": the current objects as ADDED first.
            _ => Start::Current(
                store
                    .objects
                    .values()
                    .filter(|o| in_scope(kind, namespace, selector, o))
                    .map(|o| json!({"type": "ADDED", "object": o}))
                    .collect(),
                store.version,
            ),
        }
    };
    let mut next = match start {
        Start::From(version) => version,
        Start::Gone(gone) => {
            chunk(stream, &json!({"type": "ERROR", "object": gone})).await?;
            stream.write_all(b"0\r\n\r\n").await?;
            return Ok(true);
        }
        Start::Current(added, version) => {
            for event in added {
                chunk(stream, &event).await?;
            }
            version
        }
    };
    let mut bookmark = tokio::time::interval(shared.bookmark_interval);
    bookmark.tick().await;
    loop {
        let pending: Vec<Value> = {
            let store = shared.store.lock().expect("not poisoned");
            let changes: Vec<Value> = store
                .history
                .iter()
                .filter(|c| c.version > next && in_scope(kind, namespace, selector, &c.object))
                .map(|c| json!({"type": c.event, "object": c.object}))
                .collect();
            next = next.max(store.version);
            changes
        };
        for event in pending {
            chunk(stream, &event).await?;
        }
        tokio::select! {
            _ = versions.changed() => {}
            _ = kill.changed() => return Ok(false),
            _ = expire.changed() => {
                let gone = status_body(410, "Expired", &format!("too old resource version: {next}"));
                chunk(stream, &json!({"type": "ERROR", "object": gone})).await?;
                stream.write_all(b"0\r\n\r\n").await?;
                return Ok(true);
            }
            _ = bookmark.tick(), if bookmarks => {
                let mark = json!({"type": "BOOKMARK", "object": {
                    "kind": kind.kind, "apiVersion": kind.api_version,
                    "metadata": {"resourceVersion": next.to_string()},
                }});
                chunk(stream, &mark).await?;
            }
            _ = tokio::time::sleep_until(deadline) => {
                stream.write_all(b"0\r\n\r\n").await?;
                return Ok(true);
            }
        }
    }
}
