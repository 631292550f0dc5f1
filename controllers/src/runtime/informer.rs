//! Keeps a [`Store`] in step with the apiserver through a watch, and tells handlers what changed
//! with both the old and the new value (which `kube::runtime::reflector` does not), so that a
//! Pod whose labels changed can be taken out of the Services it left.
//!
//! Relists (after a watch expired or the apiserver restarted) are diffed against the store:
//! handlers see exactly the objects that changed or vanished meanwhile.

use std::{collections::HashSet, fmt::Debug, sync::Arc, time::Duration};

use futures::StreamExt;
use kube::{
    Api, Resource,
    runtime::{WatchStreamExt, watcher},
};
use serde::de::DeserializeOwned;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::store::Store;
use crate::model::ObjectKey;

/// A cached value that knows the resourceVersion it was built from, so that unchanged objects
/// re-delivered by a relist do not trigger handlers.
pub trait Versioned: Send + Sync + 'static {
    fn resource_version(&self) -> &str;
}

/// Called with `(old, new)`: `(None, Some)` added, `(Some, Some)` changed, `(Some, None)` deleted.
/// A handler added with [`Informer::on_change_from_start`] also gets `(None, None)`, once: the
/// first list is complete.
pub type Handler<V> = Box<dyn Fn(Option<&Arc<V>>, Option<&Arc<V>>) + Send + Sync>;

pub struct Informer<K, V> {
    name: &'static str,
    api: Api<K>,
    config: watcher::Config,
    convert: fn(K) -> V,
    store: Arc<Store<V>>,
    /// Each with whether it sees the first list too.
    handlers: Vec<(Handler<V>, bool)>,
    synced: watch::Sender<bool>,
}

/// Resolves once the informer has listed everything at least once.
#[derive(Clone)]
pub struct Synced(watch::Receiver<bool>);

impl Synced {
    pub async fn wait(&mut self) -> bool {
        self.0.wait_for(|s| *s).await.is_ok()
    }

    pub fn is_synced(&self) -> bool {
        *self.0.borrow()
    }
}

impl<K, V> Informer<K, V>
where
    K: Resource + Clone + DeserializeOwned + Debug + Send + Sync + 'static,
    K::DynamicType: Default,
    V: Versioned,
{
    pub fn new(
        name: &'static str,
        api: Api<K>,
        config: watcher::Config,
        convert: fn(K) -> V,
        store: Arc<Store<V>>,
    ) -> Self {
        let (synced, _) = watch::channel(false);
        Self {
            name,
            api,
            config,
            convert,
            store,
            handlers: Vec::new(),
            synced,
        }
    }

    pub fn on_change(&mut self, handler: Handler<V>) {
        self.handlers.push((handler, false));
    }

    /// Like [`Self::on_change`], and the first list too: every object as added, then
    /// `(None, None)` once it is complete (for handlers that keep their own view of every
    /// object rather than syncing from the store).
    pub fn on_change_from_start(&mut self, handler: Handler<V>) {
        self.handlers.push((handler, true));
    }

    pub fn synced(&self) -> Synced {
        Synced(self.synced.subscribe())
    }

    /// Watches until `stop`. Handlers are not called for the first list (controllers sync every
    /// object once their caches are complete), only for what changes after it, except those
    /// added with [`Self::on_change_from_start`].
    pub async fn run(self, stop: CancellationToken) {
        let stream = watcher(self.api.clone(), self.config.clone()).default_backoff();
        futures::pin_mut!(stream);
        let mut listed_once = false;
        let mut relist_seen: Option<HashSet<ObjectKey>> = None;
        let mut errors: u64 = 0;
        loop {
            let event = tokio::select! {
                biased;
                () = stop.cancelled() => break,
                e = stream.next() => e,
            };
            let event = match event {
                None => break,
                Some(Ok(e)) => e,
                Some(Err(e)) => {
                    errors += 1;
                    // Backoff is applied by the stream; a flood of identical errors is logged sparsely.
                    if errors.is_power_of_two() {
                        warn!(informer = self.name, error = %e, errors, "watch failed; retrying");
                    }
                    continue;
                }
            };
            match event {
                watcher::Event::Apply(obj) => self.apply(obj, listed_once),
                watcher::Event::Delete(obj) => {
                    let key = key_of(&obj);
                    if let Some(old) = self.store.remove(&key) {
                        self.notify(Some(&old), None, false);
                    }
                }
                watcher::Event::Init => relist_seen = Some(HashSet::new()),
                watcher::Event::InitApply(obj) => {
                    if let Some(seen) = relist_seen.as_mut() {
                        seen.insert(key_of(&obj));
                    }
                    self.apply(obj, listed_once);
                }
                watcher::Event::InitDone => {
                    if let Some(seen) = relist_seen.take() {
                        for key in self.store.keys().into_iter().filter(|k| !seen.contains(k)) {
                            // A first list that had to start again: only handlers that
                            // saw its partial adds hear of the removal.
                            if let Some(old) = self.store.remove(&key) {
                                self.notify(Some(&old), None, !listed_once);
                            }
                        }
                    }
                    if !listed_once {
                        info!(
                            informer = self.name,
                            objects = self.store.len(),
                            "initial list complete"
                        );
                        self.notify(None, None, true);
                    } else {
                        debug!(
                            informer = self.name,
                            objects = self.store.len(),
                            "relist complete"
                        );
                    }
                    listed_once = true;
                    errors = 0;
                    self.synced.send_replace(true);
                }
            }
        }
    }

    fn apply(&self, obj: K, notify: bool) {
        let key = key_of(&obj);
        let new = Arc::new((self.convert)(obj));
        let old = self.store.insert(key, new.clone());
        let unchanged = old
            .as_ref()
            .is_some_and(|o| o.resource_version() == new.resource_version());
        if !unchanged {
            self.notify(old.as_ref(), Some(&new), !notify);
        }
    }

    /// Tells the handlers; during the first list (`first_list`) only those that asked for it.
    fn notify(&self, old: Option<&Arc<V>>, new: Option<&Arc<V>>, first_list: bool) {
        for (h, from_start) in &self.handlers {
            if *from_start || !first_list {
                h(old, new);
            }
        }
    }
}

fn key_of<K: Resource>(obj: &K) -> ObjectKey {
    let meta = obj.meta();
    ObjectKey::new(
        meta.namespace.clone().unwrap_or_default(),
        meta.name.clone().unwrap_or_default(),
    )
}

/// Waits for every informer's first list, or `stop`. Returns `false` if stopped first.
pub async fn wait_for_sync(synced: &mut [Synced], stop: &CancellationToken, log_every: Duration) -> bool {
    for s in synced.iter_mut() {
        loop {
            tokio::select! {
                biased;
                () = stop.cancelled() => return false,
                ok = s.wait() => {
                    if !ok { return false; }
                    break;
                }
                () = tokio::time::sleep(log_every) => info!("waiting for caches to sync"),
            }
        }
    }
    true
}
