//! The mirroring controller's I/O: decides which Endpoints are mirrored, writes the slices
//! [`plan_mirror`] asks for, and reports skipped addresses as Events and metrics.

use std::{
    collections::HashSet,
    net::IpAddr,
    sync::{
        Arc, Mutex, MutexGuard,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use k8s_openapi::api::{core::v1::Endpoints, discovery::v1::EndpointSlice};
use kube::Client;
use prometheus::{Histogram, HistogramOpts, IntCounterVec, IntGauge, Opts, Registry};
use svcplane_core::metrics::registered;

use super::desired::{LABEL_SKIP_MIRROR, MirrorOptions, MirrorPlan, plan_mirror};
use crate::{
    endpointslice::{
        endpoint::parse_ip,
        tracker::{SliceTracker, manager_of, service_of},
        writer::{WriteError, write_slices},
    },
    events::{EventSink, reference},
    model::{ANNOTATION_LEADER, ObjectKey, ServiceView},
    runtime::{
        Backoff, Core, ErrorPolicy, GaugeShares, Reconciler, Settings, Store, SyncResult, WorkqueueMetrics,
    },
    selection::ServiceSelection,
};

const CONTROLLER: &str = "endpointslice-mirroring-controller";
const MAX_RETRIES: u32 = 15;
const STALE_RETRY: Duration = Duration::from_millis(100);
const SUBSYSTEM: &str = "endpoint_slice_mirroring_controller";

#[derive(Clone, Debug)]
pub struct Config {
    /// `--mirroring-concurrent-service-endpoint-syncs`
    pub workers: usize,
    /// `--mirroring-max-endpoints-per-subset`
    pub max_endpoints_per_subset: usize,
    /// `--mirroring-endpointslice-updates-batch-period`
    pub batch_period: Duration,
    pub selection: ServiceSelection,
}

#[derive(Clone)]
pub struct Caches {
    pub services: Arc<Store<ServiceView>>,
    pub endpoints: Arc<Store<Endpoints>>,
    pub slices: Arc<Store<EndpointSlice>>,
}

/// `endpoint_slice_mirroring_controller_*` (upstream's names), plus skipped addresses by reason.
pub struct MirroringMetrics {
    added: Histogram,
    updated: Histogram,
    removed: Histogram,
    skipped: Histogram,
    duration: Histogram,
    changes: IntCounterVec,
    forbidden: IntCounterVec,
    /// Each Endpoints object's share of endpoints_desired, num_endpoint_slices and
    /// desired_endpoint_slices.
    shares: GaugeShares<3>,
}

impl MirroringMetrics {
    pub fn register(registry: &Registry) -> prometheus::Result<Self> {
        let exp = prometheus::exponential_buckets(2.0, 2.0, 15)?;
        let h = |name: &str, help: &str, buckets: Vec<f64>| {
            Histogram::with_opts(
                HistogramOpts::new(name, help)
                    .subsystem(SUBSYSTEM)
                    .buckets(buckets),
            )
        };
        let gauge = |name: &str, help: &str| {
            registered(
                registry,
                IntGauge::with_opts(Opts::new(name, help).subsystem(SUBSYSTEM))?,
            )
        };
        let desired = gauge("endpoints_desired", "Number of endpoints desired")?;
        let slices = gauge("num_endpoint_slices", "Number of EndpointSlices")?;
        let desired_slices = gauge(
            "desired_endpoint_slices",
            "Number of EndpointSlices that would exist with perfect endpoint allocation",
        )?;
        let m = Self {
            added: registered(
                registry,
                h(
                    "endpoints_added_per_sync",
                    "Number of endpoints added on each Endpoints sync",
                    exp.clone(),
                )?,
            )?,
            updated: registered(
                registry,
                h(
                    "endpoints_updated_per_sync",
                    "Number of endpoints updated on each Endpoints sync",
                    exp.clone(),
                )?,
            )?,
            removed: registered(
                registry,
                h(
                    "endpoints_removed_per_sync",
                    "Number of endpoints removed on each Endpoints sync",
                    exp.clone(),
                )?,
            )?,
            skipped: registered(
                registry,
                h(
                    "addresses_skipped_per_sync",
                    "Number of addresses skipped on each Endpoints sync due to being invalid or exceeding MaxEndpointsPerSubset",
                    exp,
                )?,
            )?,
            duration: registered(
                registry,
                h(
                    "endpoints_sync_duration",
                    "Duration of syncEndpoints() in seconds",
                    prometheus::exponential_buckets(0.001, 2.0, 15)?,
                )?,
            )?,
            changes: registered(
                registry,
                IntCounterVec::new(
                    Opts::new("changes", "Number of EndpointSlice changes").subsystem(SUBSYSTEM),
                    &["operation"],
                )?,
            )?,
            forbidden: registered(
                registry,
                IntCounterVec::new(
                    Opts::new(
                        "svcplane_endpoint_slice_mirroring_forbidden_addresses_total",
                        "Addresses of user-written Endpoints not mirrored because no endpoint may have them",
                    ),
                    &["reason"],
                )?,
            )?,
            shares: GaugeShares::new([desired, slices, desired_slices]),
        };
        Ok(m)
    }
}

pub struct MirroringController {
    client: Client,
    caches: Caches,
    core: Core,
    tracker: Mutex<SliceTracker>,
    /// Every Service's cluster IPs, rebuilt lazily after Service changes.
    cluster_ips: Mutex<Arc<HashSet<IpAddr>>>,
    cluster_ips_dirty: AtomicBool,
    cfg: Config,
    managed_by: String,
    metrics: Arc<MirroringMetrics>,
    events: EventSink,
}

#[derive(Debug, thiserror::Error)]
pub enum SyncError {
    #[error("the EndpointSlice cache has not caught up with this controller's writes yet")]
    Stale,
    #[error(transparent)]
    Write(#[from] WriteError),
}

impl MirroringController {
    pub fn new(
        client: Client,
        caches: Caches,
        cfg: Config,
        metrics: Arc<MirroringMetrics>,
        queue_metrics: &WorkqueueMetrics,
        events: EventSink,
    ) -> Arc<Self> {
        // Upstream: 1 s doubling to 100 s.
        let backoff = Backoff {
            base: Duration::from_secs(1),
            max: Duration::from_secs(100),
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
                "endpoint_slice_mirroring",
            ),
            tracker: Mutex::new(SliceTracker::default()),
            cluster_ips: Mutex::new(Arc::new(HashSet::new())),
            cluster_ips_dirty: AtomicBool::new(true),
            managed_by: cfg.selection.mirroring_manager(),
            cfg,
            metrics,
            events,
        })
    }

    fn tracker(&self) -> MutexGuard<'_, SliceTracker> {
        self.tracker
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    pub fn on_service(&self, old: Option<&Arc<ServiceView>>, new: Option<&Arc<ServiceView>>) {
        self.cluster_ips_dirty.store(true, Ordering::SeqCst);
        if let Some(s) = new.or(old) {
            self.core.queue.add(s.key());
        }
    }

    pub fn on_endpoints(&self, old: Option<&Arc<Endpoints>>, new: Option<&Arc<Endpoints>>) {
        if let Some(e) = new.or(old) {
            let key = ObjectKey::new(
                e.metadata.namespace.clone().unwrap_or_default(),
                e.metadata.name.clone().unwrap_or_default(),
            );
            self.core.queue.add_after(key, self.cfg.batch_period);
        }
    }

    pub fn on_slice(&self, old: Option<&Arc<EndpointSlice>>, new: Option<&Arc<EndpointSlice>>) {
        let ours = |s: &EndpointSlice| manager_of(s) == Some(self.managed_by.as_str());
        let key = match (old, new) {
            (_, Some(n)) if ours(n) && self.tracker().should_sync(n) => service_of(n),
            (Some(o), None) if ours(o) && self.tracker().observe_deletion(o) => service_of(o),
            _ => None,
        };
        if let Some(key) = key {
            self.core
                .queue
                .add_after(key, self.cfg.batch_period.max(Duration::from_secs(1)));
        }
    }

    fn cluster_ips(&self) -> Arc<HashSet<IpAddr>> {
        let mut cached = self
            .cluster_ips
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if self.cluster_ips_dirty.swap(false, Ordering::SeqCst) {
            let mut ips = HashSet::new();
            for svc in self.caches.services.list_all(|s| !s.cluster_ips.is_empty()) {
                ips.extend(svc.cluster_ips.iter().filter_map(|ip| parse_ip(ip)));
            }
            *cached = Arc::new(ips);
        }
        cached.clone()
    }

    async fn sync(&self, key: &ObjectKey) -> Result<(), SyncError> {
        let mirrored: Vec<Arc<EndpointSlice>> = self
            .caches
            .slices
            .list_group(key)
            .into_iter()
            .filter(|s| {
                manager_of(s) == Some(self.managed_by.as_str()) && s.metadata.deletion_timestamp.is_none()
            })
            .collect();
        let endpoints = self.caches.endpoints.get(key);
        let svc = self.caches.services.get(key);
        let mirror = match (&endpoints, &svc) {
            (Some(ep), Some(svc)) => {
                svc.selector.is_none()
                    && !svc.is_external_name()
                    && self.cfg.selection.handles(svc)
                    && !skip_mirror(ep)
            }
            _ => false,
        };
        let refs: Vec<&EndpointSlice> = mirrored.iter().map(Arc::as_ref).collect();
        let gone = endpoints.is_none() && svc.is_none();
        let (Some(endpoints), true) = (endpoints, mirror) else {
            self.metrics.shares.set(key, None);
            if gone {
                self.tracker().forget(key);
            }
            return self.write(&key.namespace, &[], &[], &refs).await;
        };
        if self.tracker().is_stale(key, &refs) {
            return Err(SyncError::Stale);
        }
        let existing: Vec<EndpointSlice> = refs.iter().map(|s| (*s).clone()).collect();
        let opts = MirrorOptions {
            max_endpoints_per_subset: self.cfg.max_endpoints_per_subset,
            managed_by: self.managed_by.clone(),
        };
        let plan = plan_mirror(&endpoints, &existing, &self.cluster_ips(), &opts);
        self.report(key, &endpoints, existing.len(), &plan);
        let doomed: Vec<&EndpointSlice> = plan.delete.iter().collect();
        self.write(&key.namespace, &plan.create, &plan.update, &doomed)
            .await
    }

    fn report(&self, key: &ObjectKey, endpoints: &Endpoints, existing: usize, plan: &MirrorPlan) {
        let m = &self.metrics;
        m.added.observe(plan.added as f64);
        m.updated.observe(plan.updated as f64);
        m.removed.observe(plan.removed as f64);
        m.skipped
            .observe((plan.invalid + plan.forbidden.len() + plan.over_capacity) as f64);
        let slices_after = (existing + plan.create.len()).saturating_sub(plan.delete.len());
        m.shares.set(
            key,
            Some([plan.desired_endpoints, slices_after, plan.desired_slices]),
        );
        let uid = endpoints.metadata.uid.clone().unwrap_or_default();
        let regarding = || reference("Endpoints", &key.namespace, &key.name, &uid);
        if plan.invalid > 0 {
            self.events.warning(
                regarding(),
                "InvalidIPAddress",
                "Mirroring",
                format!(
                    "Skipped {} invalid IP addresses when mirroring to EndpointSlices",
                    plan.invalid
                ),
            );
        }
        if !plan.forbidden.is_empty() {
            for (_, reason) in &plan.forbidden {
                m.forbidden.with_label_values(&[reason.label()]).inc();
            }
            let list: Vec<String> = plan
                .forbidden
                .iter()
                .map(|(ip, r)| format!("{ip} ({})", r.label()))
                .collect();
            self.events.warning(
                regarding(),
                "ForbiddenIPAddress",
                "Mirroring",
                format!(
                    "Skipped {} addresses an endpoint may not have when mirroring to EndpointSlices: {}",
                    plan.forbidden.len(),
                    list.join(", ")
                ),
            );
        }
        if plan.over_capacity > 0 {
            self.events.warning(
                regarding(),
                "TooManyAddressesToMirror",
                "Mirroring",
                format!(
                    "A max of {} addresses can be mirrored to EndpointSlices per Endpoints subset. {} addresses were skipped",
                    self.cfg.max_endpoints_per_subset, plan.over_capacity
                ),
            );
        }
    }

    async fn write(
        &self,
        namespace: &str,
        create: &[EndpointSlice],
        update: &[EndpointSlice],
        delete: &[&EndpointSlice],
    ) -> Result<(), SyncError> {
        let changed = |op: &'static str| self.metrics.changes.with_label_values(&[op]).inc();
        write_slices(
            &self.client,
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

/// Endpoints that ask not to be mirrored, or that are leader-election locks of old components.
fn skip_mirror(ep: &Endpoints) -> bool {
    let labelled = ep
        .metadata
        .labels
        .as_ref()
        .and_then(|l| l.get(LABEL_SKIP_MIRROR))
        .map(String::as_str);
    let lock = ep
        .metadata
        .annotations
        .as_ref()
        .is_some_and(|a| a.contains_key(ANNOTATION_LEADER));
    labelled == Some("true") || lock
}

impl Reconciler for MirroringController {
    type Error = SyncError;

    fn core(&self) -> &Core {
        &self.core
    }

    /// Every Endpoints object, and mirrored slices whose Endpoints are gone.
    fn enqueue_existing(&self) {
        for ep in self.caches.endpoints.list_all(|_| true) {
            self.on_endpoints(None, Some(&ep));
        }
        for slice in self
            .caches
            .slices
            .list_all(|s| manager_of(s) == Some(self.managed_by.as_str()))
        {
            if let Some(key) = service_of(&slice) {
                self.core.queue.add(key);
            }
        }
    }

    async fn reconcile(&self, key: &ObjectKey) -> Result<(), SyncError> {
        self.sync(key).await
    }

    fn error_policy(&self, _key: &ObjectKey, error: &SyncError) -> ErrorPolicy {
        match error {
            SyncError::Stale => ErrorPolicy::RetryAfter(STALE_RETRY),
            SyncError::Write(_) => ErrorPolicy::Backoff,
        }
    }

    fn observe(&self, _result: SyncResult, seconds: f64) {
        // Upstream's mirroring controller times its syncs but does not count them by result.
        self.metrics.duration.observe(seconds);
    }
}
