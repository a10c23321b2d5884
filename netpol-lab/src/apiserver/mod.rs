//! An in-process Kubernetes API server double, speaking the real HTTP list/watch
//! protocol so that the real kube-rs client is exercised (the agent's kube tests, and
//! `cargo xtask conformance --source kube`).
//!
//! Served (HTTP/1.1, JSON, keep-alive):
//! - `GET` list of Namespaces, Pods, NetworkPolicies, Nodes (cluster-wide or in a
//!   namespace): `{"kind": "PodList", "metadata": {"resourceVersion"}, "items"}`, items
//!   without kind/apiVersion as the real server sends them; `fieldSelector` on
//!   `metadata.name`, `metadata.namespace`, `spec.nodeName` (`=`, `==`, `!=`); pages
//!   with `limit` and `continue` (`metadata.continue`, `remainingItemCount`), every page
//!   of one list at the first page's version; a token older than a compaction gets 410.
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
//! HTTP/1.1 is hyper's: `http.rs` adapts requests, JSON answers and chunked bodies to it;
//! `streams.rs` writes the watch streams, `store.rs` holds the objects and their history.

mod exec;
mod http;
mod store;
mod streams;

use std::collections::{BTreeMap, VecDeque};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use serde_json::{Value, json};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::{AbortHandle, JoinHandle};

use self::http::{Body, HttpRequest, read_request, respond, respond_with, status_body};
use self::streams::{Scope, Signals, watch_stream};
pub use exec::{ExecHandler, ExecRequest};
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
    /// What `pods/exec` runs (none: every exec is refused as for a stopped container).
    exec: Mutex<Option<ExecHandler>>,
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
            exec: Mutex::new(None),
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

    /// Serves `pods/exec` of existing pods with what `handler` makes of each request.
    pub fn on_exec(&self, handler: ExecHandler) {
        *self.shared.exec.lock().expect("not poisoned") = Some(handler);
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

    /// Forgets the event history: watches from older versions get 410 Gone, and so do
    /// the next pages of lists in progress (their `continue` tokens expire).
    pub fn compact(&self) {
        let mut store = self.shared.store.lock().expect("not poisoned");
        store.history.clear();
        store.oldest = store.version;
        store.pages.clear();
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

/// Idle keep-alive connections are closed after this long (hyper's wait for the next
/// request head).
const IDLE: Duration = Duration::from_secs(120);

/// Serves one connection (keep-alive) until the client closes it, it idles for [`IDLE`],
/// or a killed watch drops it.
async fn connection(stream: TcpStream, shared: Arc<Shared>) {
    let service = service_fn(move |request: hyper::Request<hyper::body::Incoming>| {
        let shared = shared.clone();
        async move {
            if let Some((namespace, pod)) = exec::exec_path(request.uri().path()) {
                return Ok::<_, hyper::Error>(serve_exec(&shared, request, namespace, pod));
            }
            let request = read_request(request).await?;
            Ok::<_, hyper::Error>(handle(&shared, request))
        }
    });
    let _ = http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(IDLE)
        .serve_connection(TokioIo::new(stream), service)
        .with_upgrades()
        .await;
}

/// `pods/exec`: recorded as `create pods/exec`, served by [`exec::serve`].
fn serve_exec(
    shared: &Arc<Shared>,
    request: hyper::Request<hyper::body::Incoming>,
    namespace: String,
    pod: String,
) -> hyper::Response<Body> {
    shared.requests.lock().expect("not poisoned").push(Request {
        verb: "create".to_owned(),
        group: String::new(),
        resource: "pods/exec".to_owned(),
        namespace: Some(namespace.clone()),
    });
    let exec = exec::exec_request(namespace, pod, request.uri().query().unwrap_or_default());
    let pod_exists = shared
        .store
        .lock()
        .expect("not poisoned")
        .objects
        .contains_key(&("Pod", exec.namespace.clone(), exec.pod.clone()));
    let handler = shared.exec.lock().expect("not poisoned").clone();
    exec::serve(request, &exec, pod_exists, handler)
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

/// A list's page: (resourceVersion, items, continue token, items remaining after it).
type Page = (u64, Vec<Arc<Value>>, Option<String>, usize);

/// A list item as the real server sends it: the object without kind and apiVersion
/// (written without copying the stored object).
struct ListItem<'a>(&'a Value);

impl serde::Serialize for ListItem<'_> {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap as _;
        let Value::Object(fields) = self.0 else {
            return self.0.serialize(serializer);
        };
        let mut map = serializer.serialize_map(None)?;
        for (field, value) in fields {
            if field != "kind" && field != "apiVersion" {
                map.serialize_entry(field, value)?;
            }
        }
        map.end()
    }
}

/// A list's body.
#[derive(serde::Serialize)]
struct ListBody<'a> {
    kind: String,
    #[serde(rename = "apiVersion")]
    api_version: &'a str,
    metadata: Value,
    items: Vec<ListItem<'a>>,
}

/// The first page of a list: every object in scope as of now, at most `limit` of them;
/// the rest is kept for the `continue` token.
fn first_page(
    store: &mut Store,
    kind: Kind,
    namespace: Option<&str>,
    selector: Option<&String>,
    limit: Option<usize>,
) -> Option<Page> {
    let items: VecDeque<Arc<Value>> = store
        .objects
        .values()
        .filter(|o| in_scope(kind, namespace, selector, o))
        .cloned()
        .collect();
    let version = store.version;
    Some(serve_page(store, version, items, limit))
}

/// The next page of a paged list; `None` when its token has expired (or never was).
fn next_page(store: &mut Store, token: &str, limit: Option<usize>) -> Option<Page> {
    let id: u64 = token.parse().ok()?;
    let paged = store.pages.remove(&id)?;
    Some(serve_page(store, paged.version, paged.rest, limit))
}

fn serve_page(
    store: &mut Store,
    version: u64,
    mut items: VecDeque<Arc<Value>>,
    limit: Option<usize>,
) -> Page {
    let take = limit.unwrap_or(items.len()).min(items.len());
    let page: Vec<Arc<Value>> = items.drain(..take).collect();
    if items.is_empty() {
        return (version, page, None, 0);
    }
    let id = store.next_paged;
    store.next_paged += 1;
    let remaining = items.len();
    store.pages.insert(
        id,
        store::Paged {
            version,
            rest: items,
        },
    );
    (version, page, Some(id.to_string()), remaining)
}

fn handle(shared: &Arc<Shared>, request: HttpRequest) -> Response<Body> {
    let Some((kind, namespace, name)) = route(&request.path) else {
        return respond(
            StatusCode::NOT_FOUND,
            &status_body(404, "NotFound", &format!("no route {}", request.path)),
        );
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
            410 => (StatusCode::GONE, "Expired"),
            403 => (StatusCode::FORBIDDEN, "Forbidden"),
            404 => (StatusCode::NOT_FOUND, "NotFound"),
            _ => (StatusCode::SERVICE_UNAVAILABLE, "ServiceUnavailable"),
        };
        return respond(status, &status_body(code, reason, "injected failure"));
    }
    let selector = request.query.get("fieldSelector");
    match verb {
        "list" => {
            let limit = request
                .query
                .get("limit")
                .and_then(|l| l.parse::<usize>().ok())
                .filter(|&l| l > 0);
            let continued = request
                .query
                .get("continue")
                .filter(|token| !token.is_empty());
            let mut store = shared.store.lock().expect("not poisoned");
            let page = match continued {
                Some(token) => next_page(&mut store, token, limit),
                None => first_page(&mut store, kind, namespace.as_deref(), selector, limit),
            };
            let Some((version, items, token, remaining)) = page else {
                return respond(
                    StatusCode::GONE,
                    &status_body(
                        410,
                        "Expired",
                        "The provided continue parameter is too old to display a \
                         consistent list result. You can start a new list without the \
                         continue parameter.",
                    ),
                );
            };
            let mut metadata = json!({"resourceVersion": version.to_string()});
            if let Some(token) = token {
                metadata["continue"] = json!(token);
                metadata["remainingItemCount"] = json!(remaining);
            }
            drop(store);
            let body = ListBody {
                kind: format!("{}List", kind.kind),
                api_version: kind.api_version,
                metadata,
                items: items.iter().map(|item| ListItem(item)).collect(),
            };
            respond_with(StatusCode::OK, &body)
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
                Some(object) => respond(StatusCode::OK, &object),
                None => respond(
                    StatusCode::NOT_FOUND,
                    &status_body(404, "NotFound", "not found"),
                ),
            }
        }
        "watch" => {
            // Subscribed as the request is answered: a fault injected from now on
            // reaches this stream.
            let signals = Signals::subscribe(shared);
            let (events, response) = self::http::stream();
            shared.open_watches.fetch_add(1, Ordering::SeqCst);
            let shared = shared.clone();
            tokio::spawn(async move {
                let scope = Scope {
                    kind,
                    namespace: namespace.as_deref(),
                    selector: request.query.get("fieldSelector"),
                };
                watch_stream(&events, &shared, signals, scope, &request).await;
                shared.open_watches.fetch_sub(1, Ordering::SeqCst);
            });
            response
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
                StatusCode::CREATED
            } else {
                StatusCode::OK
            };
            respond(status, &object)
        }
        _ => respond(
            StatusCode::METHOD_NOT_ALLOWED,
            &status_body(405, "MethodNotAllowed", "the double only reads"),
        ),
    }
}
