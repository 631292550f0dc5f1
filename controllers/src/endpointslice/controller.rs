//! The EndpointSlice controller's I/O: turns cache events into queued Service keys, and for each
//! key reads the caches, asks [`plan_slices`] what to write and writes exactly that.

use std::{
    collections::{HashMap, HashSet},
    sync::{Arc, Mutex, MutexGuard},
    time::Duration,
};

use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::Client;
use tracing::debug;

use super::{
    SliceOptions,
    metrics::EndpointSliceMetrics,
    plan_slices,
    tracker::{SliceTracker, manager_of, service_of},
    trigger::TriggerTimes,
    writer::{WriteError, write_slices},
};
use crate::{
    events::{EventSink, reference},
    model::{NodeView, ObjectKey, PodView, ServiceView},
    podchange,
    runtime::{Backoff, Core, ErrorPolicy, Reconciler, Settings, Store, SyncResult, WorkqueueMetrics},
    selection::ServiceSelection,
};

const CONTROLLER: &str = "endpointslice-controller";
/// Upstream's `maxRetries`: after this many failed syncs in a row a Service waits for its next
/// change instead of retrying.
const MAX_RETRIES: u32 = 15;
/// Slice events are batched for at least this long (upstream's `endpointSliceChangeMinSyncDelay`).
const SLICE_CHANGE_MIN_DELAY: Duration = Duration::from_secs(1);
/// A sync that found the cache behind its own writes looks again this soon.
const STALE_RETRY: Duration = Duration::from_millis(100);

#[derive(Clone, Debug)]
pub struct Config {
    /// `--concurrent-service-endpoint-syncs`
    pub workers: usize,
    /// `--max-endpoints-per-slice`
    pub max_endpoints_per_slice: usize,
    /// `--endpointslice-updates-batch-period`
    pub batch_period: Duration,
    pub selection: ServiceSelection,
}

/// The caches the controller reads.
#[derive(Clone)]
pub struct Caches {
    pub services: Arc<Store<ServiceView>>,
    pub pods: Arc<Store<PodView>>,
    pub nodes: Arc<Store<NodeView>>,
    pub slices: Arc<Store<EndpointSlice>>,
}

#[derive(Default)]
struct State {
    triggers: TriggerTimes,
    /// Services that left Pods out because their Node was not known yet.
    waiting_for_nodes: HashSet<ObjectKey>,
}

pub struct EndpointSliceController {
    api_client: Client,
    caches: Caches,
    core: Core,
    state: Mutex<State>,
    tracker: Mutex<SliceTracker>,
    cfg: Config,
    managed_by: String,
    metrics: Arc<EndpointSliceMetrics>,
    events: EventSink,
}

#[derive(Debug, thiserror::Error)]
pub enum SyncError {
    #[error("the EndpointSlice cache has not caught up with this controller's writes yet")]
    Stale,
    #[error("{0} Pods wait for their Node to appear in the cache")]
    NodesMissing(usize),
    #[error(transparent)]
    Write(#[from] WriteError),
}

impl EndpointSliceController {
    pub fn new(
        client: Client,
        caches: Caches,
        cfg: Config,
        metrics: Arc<EndpointSliceMetrics>,
        queue_metrics: &WorkqueueMetrics,
        events: EventSink,
    ) -> Arc<Self> {
        // Upstream: 1 s doubling to 1000 s per key.
        let backoff = Backoff {
            base: Duration::from_secs(1),
            max: Duration::from_secs(1000),
        };
        metrics.reset();
        Arc::new(Self {
            api_client: client,
            managed_by: cfg.selection.slice_manager(),
            caches,
            core: Core::new(
                Settings {
                    name: CONTROLLER,
                    workers: cfg.workers,
                    max_retries: MAX_RETRIES,
                },
                backoff,
                queue_metrics,
                "endpoint_slice",
            ),
            state: Mutex::new(State::default()),
            tracker: Mutex::new(SliceTracker::default()),
            cfg,
            metrics,
            events,
        })
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn tracker(&self) -> MutexGuard<'_, SliceTracker> {
        self.tracker
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    // === event handlers (called by the informers; cheap, never block) ===

    pub fn on_service(&self, old: Option<&Arc<ServiceView>>, new: Option<&Arc<ServiceView>>) {
        if let Some(s) = new.or(old) {
            self.core.queue.add(s.key());
        }
    }

    pub fn on_pod(&self, old: Option<&Arc<PodView>>, new: Option<&Arc<PodView>>) {
        podchange::enqueue_services(
            &self.core.queue,
            &self.caches.services,
            old,
            new,
            self.cfg.batch_period,
        );
    }

    pub fn on_node(&self, old: Option<&Arc<NodeView>>, new: Option<&Arc<NodeView>>) {
        match (old, new) {
            (None, Some(_)) => {
                let waiting: Vec<ObjectKey> = self.state().waiting_for_nodes.drain().collect();
                for key in waiting {
                    self.core.queue.add(key);
                }
            }
            (Some(o), Some(n)) if o.zone != n.zone => {
                // Zones are rare to change; find the Services of the Pods on that Node.
                let on_node = self
                    .caches
                    .pods
                    .list_all(|p| p.node_name.as_deref() == Some(n.name.as_str()));
                for pod in on_node {
                    self.on_pod(None, Some(&pod));
                }
            }
            _ => {}
        }
    }

    pub fn on_slice(&self, old: Option<&Arc<EndpointSlice>>, new: Option<&Arc<EndpointSlice>>) {
        let ours = |s: &EndpointSlice| manager_of(s) == Some(self.managed_by.as_str());
        let delay = self.cfg.batch_period.max(SLICE_CHANGE_MIN_DELAY);
        match (old, new) {
            (_, Some(new)) => {
                let mut keys = Vec::new();
                let foreign_write = ours(new) && self.tracker().should_sync(new);
                if foreign_write {
                    keys.extend(service_of(new));
                }
                if let Some(old) = old {
                    // Relabelled away from us or to another Service: both owners resync.
                    if ours(old) != ours(new) || service_of(old) != service_of(new) {
                        keys.extend(service_of(old));
                        keys.extend(service_of(new).filter(|_| ours(new)));
                    }
                }
                for key in keys {
                    self.core.queue.add_after(key, delay);
                }
            }
            (Some(old), None) => {
                if ours(old)
                    && self.tracker().observe_deletion(old)
                    && let Some(key) = service_of(old)
                {
                    self.core.queue.add_after(key, delay);
                }
            }
            (None, None) => {}
        }
    }

    async fn sync(&self, key: &ObjectKey) -> Result<(), SyncError> {
        let Some(svc) = self.caches.services.get(key) else {
            // Deleted: its slices go with it through their owner references.
            {
                self.tracker().forget(key);
                let mut st = self.state();
                st.triggers.forget(key);
                st.waiting_for_nodes.remove(key);
            }
            self.metrics.forget(key);
            return Ok(());
        };
        let slices: Vec<Arc<EndpointSlice>> = self
            .caches
            .slices
            .list_group(key)
            .into_iter()
            .filter(|s| {
                manager_of(s) == Some(self.managed_by.as_str()) && s.metadata.deletion_timestamp.is_none()
            })
            .collect();
        if svc.is_external_name() || svc.selector.is_none() {
            // Upstream leaves these alone: selector-less Services are the users' (or the
            // mirroring controller's), and ExternalName Services have no endpoints.
            return Ok(());
        }
        if !self.cfg.selection.handles(&svc) {
            // Handed to another endpoint controller: our slices must not compete with its own.
            let doomed: Vec<&EndpointSlice> = slices.iter().map(Arc::as_ref).collect();
            return self.write(&svc.namespace, &[], &[], &doomed).await;
        }
        let slice_refs: Vec<&EndpointSlice> = slices.iter().map(|s| &**s).collect();
        if self.tracker().is_stale(key, &slice_refs) {
            return Err(SyncError::Stale);
        }
        let pods = self
            .caches
            .pods
            .list_namespace(&svc.namespace, |p| svc.selects(&p.labels));
        let pod_refs: Vec<&PodView> = pods.iter().map(|p| &**p).collect();
        let nodes: HashMap<String, Option<String>> = pods
            .iter()
            .filter_map(|p| p.node_name.as_ref())
            .collect::<HashSet<_>>()
            .into_iter()
            .filter_map(|n| {
                self.caches
                    .nodes
                    .get(&ObjectKey::new("", n))
                    .map(|node| (n.clone(), node.zone.clone()))
            })
            .collect();
        let trigger_time = self.state().triggers.compute(&svc, &pod_refs);
        let existing: Vec<EndpointSlice> = slices.iter().map(|s| (**s).clone()).collect();
        let opts = SliceOptions {
            max_endpoints_per_slice: self.cfg.max_endpoints_per_slice,
            managed_by: self.managed_by.clone(),
        };
        let plan = plan_slices(&svc, &pod_refs, &nodes, &existing, trigger_time, &opts);

        let topology = if matches!(svc.topology_mode.as_deref(), Some("Auto" | "auto")) {
            "Auto"
        } else {
            "Disabled"
        };
        let traffic_distribution = svc.traffic_distribution.as_deref().filter(|td| {
            topology == "Disabled" && matches!(*td, "PreferClose" | "PreferSameZone" | "PreferSameNode")
        });
        self.metrics
            .planned(key, &plan.stats, plan.writes(), topology, traffic_distribution);
        if plan.writes() > 0 {
            debug!(
                create = plan.create.len(),
                update = plan.update.len(),
                delete = plan.delete.len(),
                "writing EndpointSlices"
            );
        }

        let doomed: Vec<&EndpointSlice> = plan.delete.iter().collect();
        self.write(&svc.namespace, &plan.create, &plan.update, &doomed)
            .await?;

        if plan.pods_without_node.is_empty() {
            self.state().waiting_for_nodes.remove(key);
            Ok(())
        } else {
            self.state().waiting_for_nodes.insert(key.clone());
            Err(SyncError::NodesMissing(plan.pods_without_node.len()))
        }
    }

    async fn write(
        &self,
        namespace: &str,
        create: &[EndpointSlice],
        update: &[EndpointSlice],
        delete: &[&EndpointSlice],
    ) -> Result<(), SyncError> {
        let changed = |op: &'static str| self.metrics.change(op);
        write_slices(
            &self.api_client,
            namespace,
            create,
            update,
            delete,
            &self.tracker,
            &changed,
        )
        .await?;
        Ok(())
    }
}

impl Reconciler for EndpointSliceController {
    type Error = SyncError;

    fn core(&self) -> &Core {
        &self.core
    }

    /// Every Service once.
    fn enqueue_existing(&self) {
        for key in self.caches.services.keys() {
            self.core.queue.add(key);
        }
    }

    async fn reconcile(&self, key: &ObjectKey) -> Result<(), SyncError> {
        self.sync(key).await
    }

    fn error_policy(&self, key: &ObjectKey, error: &SyncError) -> ErrorPolicy {
        match error {
            SyncError::Stale => return ErrorPolicy::RetryAfter(STALE_RETRY),
            // Waits for the Node informer; not worth an Event.
            SyncError::NodesMissing(_) => {}
            SyncError::Write(_) => {
                if let Some(svc) = self.caches.services.get(key) {
                    self.events.warning(
                        reference("Service", &svc.namespace, &svc.name, &svc.uid),
                        "FailedToUpdateEndpointSlices",
                        "UpdateEndpointSlices",
                        format!("Error updating Endpoint Slices for Service {key}: {error}"),
                    );
                }
            }
        }
        ErrorPolicy::Backoff
    }

    fn observe(&self, result: SyncResult, seconds: f64) {
        self.metrics.sync(result, seconds);
    }
}
