//! What the double stores: the served kinds, the objects by key, and the bounded
//! history of changes that watches replay (as the API server's watch cache).

use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;

use serde_json::{Value, json};

/// A served kind.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Kind {
    pub kind: &'static str,
    pub api_version: &'static str,
    /// API group ("" for core).
    pub group: &'static str,
    pub resource: &'static str,
    pub namespaced: bool,
}

pub const KINDS: [Kind; 9] = [
    Kind {
        kind: "Namespace",
        api_version: "v1",
        group: "",
        resource: "namespaces",
        namespaced: false,
    },
    Kind {
        kind: "Pod",
        api_version: "v1",
        group: "",
        resource: "pods",
        namespaced: true,
    },
    Kind {
        kind: "NetworkPolicy",
        api_version: "networking.k8s.io/v1",
        group: "networking.k8s.io",
        resource: "networkpolicies",
        namespaced: true,
    },
    Kind {
        kind: "Node",
        api_version: "v1",
        group: "",
        resource: "nodes",
        namespaced: false,
    },
    Kind {
        kind: "Service",
        api_version: "v1",
        group: "",
        resource: "services",
        namespaced: true,
    },
    Kind {
        kind: "EndpointSlice",
        api_version: "discovery.k8s.io/v1",
        group: "discovery.k8s.io",
        resource: "endpointslices",
        namespaced: true,
    },
    Kind {
        kind: "ServiceCIDR",
        api_version: "networking.k8s.io/v1",
        group: "networking.k8s.io",
        resource: "servicecidrs",
        namespaced: false,
    },
    Kind {
        kind: "ClusterNetworkPolicy",
        api_version: "policy.networking.k8s.io/v1alpha2",
        group: "policy.networking.k8s.io",
        resource: "clusternetworkpolicies",
        namespaced: false,
    },
    Kind {
        kind: "Event",
        api_version: "events.k8s.io/v1",
        group: "events.k8s.io",
        resource: "events",
        namespaced: true,
    },
];

pub(super) const CORE_EVENTS: Kind = Kind {
    kind: "Event",
    api_version: "v1",
    group: "",
    resource: "events",
    namespaced: true,
};

pub(super) fn kind_named(kind: &str) -> Option<Kind> {
    KINDS.iter().copied().find(|k| k.kind == kind)
}

pub(super) type Key = (&'static str, String, String); // kind, namespace ("" if cluster-scoped), name

#[derive(Clone, Debug)]
pub(super) struct Change {
    pub(super) version: u64,
    pub(super) event: &'static str,
    pub(super) object: Value,
}

#[derive(Default)]
pub(super) struct Store {
    pub(super) version: u64,
    /// Shared with the pages of lists in progress: a list holds its snapshot without
    /// copying the objects.
    pub(super) objects: BTreeMap<Key, Arc<Value>>,
    pub(super) history: VecDeque<Change>,
    /// A watch from a version older than this gets 410 Gone.
    pub(super) oldest: u64,
    pub(super) uids: u64,
    pub(super) events: Vec<Value>,
    /// Lists served in pages (`limit`), by the id in their `continue` token: the rest of
    /// the items as of the first page's version (the real server reads the later pages
    /// from etcd at that revision, so a paged list is one consistent snapshot).
    pub(super) pages: BTreeMap<u64, Paged>,
    pub(super) next_paged: u64,
}

/// The items a paged list has still to serve.
#[derive(Debug)]
pub(super) struct Paged {
    pub(super) version: u64,
    pub(super) rest: VecDeque<Arc<Value>>,
}

pub(super) fn key_of(object: &Value) -> Key {
    let kind = object["kind"].as_str().and_then(kind_named);
    let kind = kind.map_or("", |k| k.kind);
    let meta = &object["metadata"];
    let namespace = if kind_named(kind).is_some_and(|k| k.namespaced) {
        meta["namespace"].as_str().unwrap_or("default").to_owned()
    } else {
        String::new()
    };
    (
        kind,
        namespace,
        meta["name"].as_str().unwrap_or_default().to_owned(),
    )
}

/// The object without what the server sets, for "unchanged" checks.
pub(super) fn user_part(object: &Value) -> Value {
    let mut object = object.clone();
    if let Some(meta) = object.get_mut("metadata").and_then(Value::as_object_mut) {
        meta.remove("resourceVersion");
        meta.remove("uid");
    }
    object
}

impl Store {
    pub(super) fn record(&mut self, event: &'static str, object: Value) {
        self.history.push_back(Change {
            version: self.version,
            event,
            object,
        });
        // A bounded window, as the API server's watch cache.
        while self.history.len() > 10_000 {
            if let Some(change) = self.history.pop_front() {
                self.oldest = change.version;
            }
        }
    }

    pub(super) fn apply(&mut self, mut object: Value) -> u64 {
        let key = key_of(&object);
        let Some(kind) = kind_named(key.0) else {
            return self.version;
        };
        if kind.namespaced {
            object["metadata"]["namespace"] = json!(key.1);
        }
        object["apiVersion"] = json!(kind.api_version);
        let existing = self.objects.get(&key);
        if existing.is_some_and(|old| user_part(old) == user_part(&object)) {
            return self.version;
        }
        let uid = match existing.and_then(|old| old["metadata"]["uid"].as_str()) {
            Some(uid) => uid.to_owned(),
            None => {
                self.uids += 1;
                format!("00000000-0000-0000-0000-{:012}", self.uids)
            }
        };
        let event = if existing.is_some() {
            "MODIFIED"
        } else {
            "ADDED"
        };
        self.version += 1;
        object["metadata"]["resourceVersion"] = json!(self.version.to_string());
        object["metadata"]["uid"] = json!(uid);
        self.objects.insert(key, Arc::new(object.clone()));
        self.record(event, object);
        self.version
    }

    pub(super) fn delete(&mut self, key: &Key) -> Option<u64> {
        let mut object = Arc::unwrap_or_clone(self.objects.remove(key)?);
        self.version += 1;
        // The DELETED event carries the object at the deletion's revision.
        object["metadata"]["resourceVersion"] = json!(self.version.to_string());
        self.record("DELETED", object);
        Some(self.version)
    }
}
