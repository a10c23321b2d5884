//! One watcher task: list + watch into its store (a reflector, or the pod store),
//! signalling the source.

use std::fmt::Debug;
use std::hash::Hash;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use ::kube::Resource;
use ::kube::api::Api;
use ::kube::runtime::reflector::Lookup;
use ::kube::runtime::reflector::Store;
use ::kube::runtime::reflector::store::Writer;
use ::kube::runtime::utils::Backoff as _;
use ::kube::runtime::watcher::{self, Event};
use futures::StreamExt as _;
use serde::de::DeserializeOwned;
use tokio::sync::mpsc;

use super::changes::Changes;
use super::incidents::{Backoff, Failure, INCIDENT_QUIET, Signal};
use super::settings::Watched;

/// Where a watcher keeps what it reads: a kube-rs reflector store ([`Reflector`]), or
/// one of the agent's own (pods: [`super::pod::PodWriter`]).
pub(super) trait Keeper<K> {
    /// Applies one event of the watch (after trimming).
    fn apply(&mut self, event: &Event<K>);

    /// Whether the kept copy of `object` holds what the (trimmed) `object` holds,
    /// resourceVersion aside: an update that touched only what trimming drops (a pod's
    /// conditions, a node's heartbeat, a policy's last-applied annotation) changes
    /// nothing the compiler reads.
    fn holds(&self, object: &K) -> bool;
}

/// A reflector store's writer, with its reader and its resource's dynamic type.
pub(super) struct Reflector<K: Lookup + Clone + 'static>
where
    K::DynamicType: Eq + Hash + Clone,
{
    writer: Writer<K>,
    reader: Store<K>,
    dyntype: K::DynamicType,
}

impl<K: Lookup + Clone + 'static> Reflector<K>
where
    K::DynamicType: Eq + Hash + Clone,
{
    pub(super) fn new(writer: Writer<K>, dyntype: K::DynamicType) -> Self {
        Reflector {
            reader: writer.as_reader(),
            writer,
            dyntype,
        }
    }
}

impl<K> Keeper<K> for Reflector<K>
where
    K: Resource + Lookup + Clone + PartialEq + 'static,
    <K as Lookup>::DynamicType: Eq + Hash + Clone,
{
    fn apply(&mut self, event: &Event<K>) {
        self.writer.apply_watcher_event(event);
    }

    fn holds(&self, object: &K) -> bool {
        self.reader
            .get(&object.to_object_ref(self.dyntype.clone()))
            .is_some_and(|old| same_content(old.as_ref(), object))
    }
}

/// What a watcher task needs besides its API and store.
pub(super) struct WatchContext {
    pub(super) watched: Watched,
    pub(super) tx: mpsc::UnboundedSender<Signal>,
    pub(super) resource_version: Arc<AtomicU64>,
    /// Where the objects that changed are recorded, before the version is published.
    pub(super) changes: Arc<Changes>,
    pub(super) backoff: Backoff,
    /// The resource is a CRD's: a 404 means the cluster does not serve it, so it has
    /// none (an empty list, then retried with the backoff in case it is installed).
    pub(super) absent_is_empty: bool,
}

/// Runs one watcher into its store until the source is dropped. `dyntype` is the
/// store's (`()` for the typed resources).
pub(super) async fn watch<K>(
    api: Api<K>,
    config: watcher::Config,
    mut keeper: impl Keeper<K> + Send,
    trim: fn(&mut K),
    mut context: WatchContext,
) where
    K: Resource + Clone + DeserializeOwned + Debug + Send + 'static,
{
    let watched = context.watched;
    loop {
        let mut stream = watcher::watcher(api.clone(), config.clone()).boxed();
        // Highest version of a list in progress: counted once the list is complete.
        let mut listing = 0u64;
        while let Some(item) = stream.next().await {
            let signal = match item {
                Ok(event) => {
                    context.backoff.reset();
                    let event = event.modify(|object: &mut K| {
                        let version = numeric_version(object);
                        listing = listing.max(version);
                        trim(object);
                    });
                    let unchanged = match &event {
                        Event::Apply(object) => keeper.holds(object),
                        _ => false,
                    };
                    keeper.apply(&event);
                    match &event {
                        Event::Init => {
                            listing = 0;
                            None
                        }
                        Event::InitApply(_) => None,
                        Event::InitDone => {
                            context.changes.all(watched);
                            context
                                .resource_version
                                .fetch_max(std::mem::take(&mut listing), Ordering::AcqRel);
                            Some(Signal::Synced(watched))
                        }
                        Event::Apply(object) | Event::Delete(object) => {
                            if !unchanged {
                                context.changes.object(watched, object);
                            }
                            context
                                .resource_version
                                .fetch_max(std::mem::take(&mut listing), Ordering::AcqRel);
                            Some(if unchanged {
                                Signal::Unchanged(watched)
                            } else {
                                Signal::Changed(watched)
                            })
                        }
                    }
                }
                Err(error) if context.absent_is_empty && not_served(&error) => {
                    keeper.apply(&Event::Init);
                    keeper.apply(&Event::InitDone);
                    context.changes.all(watched);
                    if context.tx.send(Signal::Synced(watched)).is_err() {
                        return;
                    }
                    let delay = context.backoff.next().unwrap_or(INCIDENT_QUIET);
                    tokio::time::sleep(delay).await;
                    break;
                }
                Err(error) => {
                    let failure = Failure::of(&error);
                    // kube's watcher retries a watch refused with HTTP 410 from the same
                    // version forever: start over with a fresh list instead.
                    let relist = matches!(
                        &error,
                        watcher::Error::WatchStartFailed(::kube::Error::Api(status)) if status.code == 410
                    );
                    if context.tx.send(Signal::Failed(watched, failure)).is_err() {
                        return;
                    }
                    // The backoff has no limit of attempts: it always gives a delay.
                    let delay = context.backoff.next().unwrap_or(INCIDENT_QUIET);
                    tokio::time::sleep(delay).await;
                    if relist {
                        break;
                    }
                    None
                }
            };
            if let Some(signal) = signal
                && context.tx.send(signal).is_err()
            {
                return;
            }
        }
    }
}

/// Whether the API server says it does not serve the resource at all (HTTP 404 on the
/// list or the watch).
fn not_served(error: &watcher::Error) -> bool {
    match error {
        watcher::Error::InitialListFailed(::kube::Error::Api(status))
        | watcher::Error::WatchStartFailed(::kube::Error::Api(status))
        | watcher::Error::WatchFailed(::kube::Error::Api(status)) => status.code == 404,
        watcher::Error::WatchError(status) => status.code == 404,
        _ => false,
    }
}

/// `metadata.resourceVersion` as a number (0 when absent or opaque).
/// Whether the trimmed `new` holds what the stored `old` holds, resourceVersion aside.
fn same_content<K: Resource + Clone + PartialEq>(old: &K, new: &K) -> bool {
    if old.meta().resource_version == new.meta().resource_version {
        return old == new;
    }
    let mut new = new.clone();
    new.meta_mut()
        .resource_version
        .clone_from(&old.meta().resource_version);
    *old == new
}

fn numeric_version<K: Resource>(object: &K) -> u64 {
    ::kube::ResourceExt::resource_version(object)
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}
