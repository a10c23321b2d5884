//! Watch streams: the events after a resource version (or the current objects first),
//! bookmarks, 410 Gone, a clean end after `timeoutSeconds`, and killed streams.

use std::time::Duration;

use serde_json::{Value, json};
use tokio::sync::{mpsc, watch};

use super::http::{Chunk, HttpRequest, event, status_body};
use super::{Kind, Shared, in_scope};

/// What a watch stream waits on besides the clock.
pub(super) struct Signals {
    versions: watch::Receiver<u64>,
    kill: watch::Receiver<u64>,
    expire: watch::Receiver<u64>,
}

impl Signals {
    pub(super) fn subscribe(shared: &Shared) -> Self {
        Signals {
            versions: shared.version.subscribe(),
            kill: shared.kill.subscribe(),
            expire: shared.expire.subscribe(),
        }
    }
}

/// The objects a watch stream reports.
pub(super) struct Scope<'a> {
    pub kind: Kind,
    pub namespace: Option<&'a str>,
    pub selector: Option<&'a String>,
}

impl Scope<'_> {
    fn holds(&self, object: &Value) -> bool {
        in_scope(self.kind, self.namespace, self.selector, object)
    }
}

/// Sends one watch event; false when the client is gone.
async fn send(events: &mpsc::Sender<Chunk>, value: &Value) -> bool {
    events.send(event(value)).await.is_ok()
}

/// Streams watch events into `events` until the stream ends properly (the sender is
/// dropped: the terminating chunk is written and the connection may be reused), is
/// killed (an error: the connection drops without a terminating chunk), or the client
/// goes away.
pub(super) async fn watch_stream(
    events: &mpsc::Sender<Chunk>,
    shared: &Shared,
    signals: Signals,
    scope: Scope<'_>,
    request: &HttpRequest,
) {
    let Signals {
        mut versions,
        mut kill,
        mut expire,
    } = signals;
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
                    .filter(|o| scope.holds(o))
                    .map(|o| json!({"type": "ADDED", "object": &**o}))
                    .collect(),
                store.version,
            ),
        }
    };
    let mut next = match start {
        Start::From(version) => version,
        Start::Gone(gone) => {
            send(events, &json!({"type": "ERROR", "object": gone})).await;
            return;
        }
        Start::Current(added, version) => {
            for event in added {
                if !send(events, &event).await {
                    return;
                }
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
                .filter(|c| c.version > next && scope.holds(&c.object))
                .map(|c| json!({"type": c.event, "object": c.object}))
                .collect();
            next = next.max(store.version);
            changes
        };
        for event in pending {
            if !send(events, &event).await {
                return;
            }
        }
        tokio::select! {
            _ = versions.changed() => {}
            _ = kill.changed() => {
                let _ = events.send(Err(std::io::Error::other("watch killed"))).await;
                return;
            }
            _ = expire.changed() => {
                let gone = status_body(410, "Expired", &format!("too old resource version: {next}"));
                send(events, &json!({"type": "ERROR", "object": gone})).await;
                return;
            }
            _ = bookmark.tick(), if bookmarks => {
                let mark = json!({"type": "BOOKMARK", "object": {
                    "kind": scope.kind.kind, "apiVersion": scope.kind.api_version,
                    "metadata": {"resourceVersion": next.to_string()},
                }});
                if !send(events, &mark).await {
                    return;
                }
            }
            _ = events.closed() => return,
            _ = tokio::time::sleep_until(deadline) => return,
        }
    }
}
