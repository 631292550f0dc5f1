//! The Endpoints controller's I/O: queue Services on change, write what [`plan_endpoints`] says.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex, MutexGuard},
    time::Duration,
};

use k8s_openapi::api::core::v1::Endpoints;
use kube::{
    Api, Client,
    api::{DeleteParams, PostParams},
};
use prometheus::{Histogram, HistogramOpts, IntCounterVec, Opts, Registry};
use svcplane_core::metrics::registered;

use super::desired::{EndpointsWrite, plan_endpoints};
use crate::{
    endpointslice::trigger::TriggerTimes,
    events::{EventSink, reference},
    model::{ANNOTATION_LEADER, ObjectKey, PodView, ServiceView},
    podchange,
    runtime::{Backoff, Core, ErrorPolicy, Reconciler, Settings, Store, SyncResult, WorkqueueMetrics},
    selection::ServiceSelection,
};

const CONTROLLER: &str = "endpoints-controller";
const MAX_RETRIES: u32 = 15;
const STALE_RETRY: Duration = Duration::from_millis(100);

#[derive(Clone, Debug)]
pub struct Config {
    /// `--concurrent-endpoint-syncs`
    pub workers: usize,
    /// `--endpoint-updates-batch-period`
    pub batch_period: Duration,
    pub selection: ServiceSelection,
}

#[derive(Clone)]
pub struct Caches {
    pub services: Arc<Store<ServiceView>>,
    pub pods: Arc<Store<PodView>>,
    pub endpoints: Arc<Store<Endpoints>>,
}

/// Sync counts and durations; upstream has no such metrics for this controller.
pub struct EndpointsMetrics {
    syncs: IntCounterVec,
    duration: Histogram,
    writes: IntCounterVec,
}

impl EndpointsMetrics {
    pub fn register(registry: &Registry) -> prometheus::Result<Self> {
        let m = Self {
            syncs: registered(
                registry,
                IntCounterVec::new(
                    Opts::new(
                        "svcplane_endpoints_controller_syncs_total",
                        "Endpoints syncs by result",
                    ),
                    &["result"],
                )?,
            )?,
            duration: registered(
                registry,
                Histogram::with_opts(
                    HistogramOpts::new(
                        "svcplane_endpoints_controller_sync_duration_seconds",
                        "Duration of one Service's Endpoints sync",
                    )
                    .buckets(prometheus::exponential_buckets(0.0005, 2.0, 16)?),
                )?,
            )?,
            writes: registered(
                registry,
                IntCounterVec::new(
                    Opts::new(
                        "svcplane_endpoints_controller_changes_total",
                        "Endpoints writes by operation",
                    ),
                    &["operation"],
                )?,
            )?,
        };
        Ok(m)
    }
}

#[derive(Default)]
struct State {
    triggers: TriggerTimes,
    /// The resourceVersion each write replaced: a cache still showing it has not caught up.
    replaced: HashMap<ObjectKey, String>,
}

pub struct EndpointsController {
    client: Client,
    caches: Caches,
    core: Core,
    state: Mutex<State>,
    cfg: Config,
    metrics: Arc<EndpointsMetrics>,
    events: EventSink,
}

#[derive(Debug, thiserror::Error)]
pub enum SyncError {
    #[error("the Endpoints cache still shows resourceVersion {0}, which this controller already replaced")]
    Stale(String),
    #[error("failed to {op} Endpoints: {source}")]
    Write {
        op: &'static str,
        #[source]
        source: kube::Error,
    },
}

impl EndpointsController {
    pub fn new(
        client: Client,
        caches: Caches,
        cfg: Config,
        metrics: Arc<EndpointsMetrics>,
        queue_metrics: &WorkqueueMetrics,
        events: EventSink,
    ) -> Arc<Self> {
        // Upstream's default controller rate limiter: 5 ms doubling to 1000 s.
        let backoff = Backoff {
            base: Duration::from_millis(5),
            max: Duration::from_secs(1000),
        };
        Arc::new(Self {
            client,
            caches,
            core: Core::new(
                Settings {
                    name: CONTROLLER,
                    workers: cfg.workers,
                    max_retries: MAX_RETRIES,
                },
                backoff,
                queue_metrics,
                "endpoint",
            ),
            state: Mutex::new(State::default()),
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

    /// Deleted Endpoints may need recreating; Endpoints without a Service need deleting.
    pub fn on_endpoints(&self, old: Option<&Arc<Endpoints>>, new: Option<&Arc<Endpoints>>) {
        let Some(ep) = new.or(old) else { return };
        let key = key_of(ep);
        if new.is_none() || self.caches.services.get(&key).is_none() {
            self.core.queue.add(key);
        }
    }

    async fn sync(&self, key: &ObjectKey) -> Result<(), SyncError> {
        let api: Api<Endpoints> = Api::namespaced(self.client.clone(), &key.namespace);
        let current = self.caches.endpoints.get(key);
        let Some(svc) = self.caches.services.get(key) else {
            {
                let mut st = self.state();
                st.triggers.forget(key);
                st.replaced.remove(key);
            }
            if current.as_ref().is_some_and(|e| !is_leader_lock(e)) {
                match api.delete(&key.name, &DeleteParams::default()).await {
                    Ok(_) => self.metrics.writes.with_label_values(&["delete"]).inc(),
                    Err(kube::Error::Api(s)) if s.code == 404 => {}
                    Err(source) => return Err(SyncError::Write { op: "delete", source }),
                }
            }
            return Ok(());
        };
        if svc.is_external_name() || svc.selector.is_none() || !self.cfg.selection.handles(&svc) {
            // Selector-less Services' Endpoints are written by their users.
            return Ok(());
        }
        if let Some(cur) = &current {
            let rv = cur.metadata.resource_version.clone().unwrap_or_default();
            let stale = self.state().replaced.get(key) == Some(&rv);
            if stale {
                return Err(SyncError::Stale(rv));
            }
        }
        let pods = self
            .caches
            .pods
            .list_namespace(&svc.namespace, |p| svc.selects(&p.labels));
        let pod_refs: Vec<&PodView> = pods.iter().map(|p| &**p).collect();
        let trigger_time = self.state().triggers.compute(&svc, &pod_refs);
        match plan_endpoints(&svc, &pod_refs, current.as_deref(), trigger_time) {
            None => Ok(()),
            Some(EndpointsWrite::Create(ep)) => match api.create(&PostParams::default(), &ep).await {
                Ok(_) => {
                    self.metrics.writes.with_label_values(&["create"]).inc();
                    Ok(())
                }
                Err(kube::Error::Api(s))
                    if s.code == 403 && crate::endpointslice::writer::namespace_terminating(&s) =>
                {
                    Ok(())
                }
                Err(source) => Err(SyncError::Write { op: "create", source }),
            },
            Some(EndpointsWrite::Update(ep)) => {
                match api.replace(&key.name, &PostParams::default(), &ep).await {
                    Ok(_) => {
                        self.metrics.writes.with_label_values(&["update"]).inc();
                        if let Some(rv) = ep.metadata.resource_version {
                            self.state().replaced.insert(key.clone(), rv);
                        }
                        Ok(())
                    }
                    Err(source) => Err(SyncError::Write { op: "update", source }),
                }
            }
        }
    }
}

impl Reconciler for EndpointsController {
    type Error = SyncError;

    fn core(&self) -> &Core {
        &self.core
    }

    /// Every Service, and Endpoints whose Service went away while no controller ran.
    fn enqueue_existing(&self) {
        for key in self.caches.services.keys() {
            self.core.queue.add(key);
        }
        for ep in self.caches.endpoints.list_all(|e| !is_leader_lock(e)) {
            let key = key_of(&ep);
            if self.caches.services.get(&key).is_none() {
                self.core.queue.add(key);
            }
        }
    }

    async fn reconcile(&self, key: &ObjectKey) -> Result<(), SyncError> {
        self.sync(key).await
    }

    fn error_policy(&self, key: &ObjectKey, error: &SyncError) -> ErrorPolicy {
        let reason = match error {
            SyncError::Stale(_) => return ErrorPolicy::RetryAfter(STALE_RETRY),
            SyncError::Write { op: "create", .. } => "FailedToCreateEndpoint",
            SyncError::Write { .. } => "FailedToUpdateEndpoint",
        };
        self.events.warning(
            reference("Endpoints", &key.namespace, &key.name, ""),
            reason,
            "UpdateEndpoints",
            format!("Failed to update endpoint {key}: {error}"),
        );
        ErrorPolicy::Backoff
    }

    fn observe(&self, result: SyncResult, seconds: f64) {
        self.metrics.syncs.with_label_values(&[result.label()]).inc();
        self.metrics.duration.observe(seconds);
    }
}

fn key_of(ep: &Endpoints) -> ObjectKey {
    ObjectKey::new(
        ep.metadata.namespace.clone().unwrap_or_default(),
        ep.metadata.name.clone().unwrap_or_default(),
    )
}

fn is_leader_lock(ep: &Endpoints) -> bool {
    ep.metadata
        .annotations
        .as_ref()
        .is_some_and(|a| a.contains_key(ANNOTATION_LEADER))
}
