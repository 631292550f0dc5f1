//! How full each range is: kube-apiserver's allocator metrics (same names and labels), the
//! readiness of the webhook (no allocation before the ranges have been reconciled with existing
//! Services), and the leader's `ServicePool` status.
//!
//! Every replica reads the ranges from etcd on a short period ([`monitor`]): that costs one small
//! read per range and keeps each replica's gauges right even when another replica allocated.

use std::{collections::HashMap, time::Duration};

use kube::{
    Api, Client,
    api::{ListParams, Patch, PatchParams},
};
use prometheus::{IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry};
use svcplane_allocators::{
    Range,
    etcd::{RangeStore, StoreError},
};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::{
    allocators::Allocators,
    pool::{MANAGED_BY, PoolType, RangeUsage, ServicePool, desired_pool, desired_status},
};

const FIELD_MANAGER: &str = "svcplane-controller-manager";
const POOL_RETRY: Duration = Duration::from_secs(5);

/// `static` for a value the user chose, `dynamic` for one the allocator picked (upstream's scopes).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scope {
    Static,
    Dynamic,
}

impl Scope {
    fn as_str(self) -> &'static str {
        match self {
            Self::Static => "static",
            Self::Dynamic => "dynamic",
        }
    }
}

/// kube-apiserver's `kube_apiserver_clusterip_allocator_*` and `kube_apiserver_nodeport_allocator_*`.
#[derive(Clone)]
pub struct AllocatorMetrics {
    ip_allocated: IntGaugeVec,
    ip_available: IntGaugeVec,
    ip_allocations: IntCounterVec,
    ip_errors: IntCounterVec,
    port_allocated: IntGauge,
    port_available: IntGauge,
    port_allocations: IntCounterVec,
    port_errors: IntCounterVec,
}

impl AllocatorMetrics {
    pub fn register(registry: &Registry) -> prometheus::Result<Self> {
        let ip = |name: &str, help: &str| {
            Opts::new(name, help)
                .namespace("kube_apiserver")
                .subsystem("clusterip_allocator")
        };
        let port = |name: &str, help: &str| {
            Opts::new(name, help)
                .namespace("kube_apiserver")
                .subsystem("nodeport_allocator")
        };
        let m = Self {
            ip_allocated: IntGaugeVec::new(
                ip(
                    "allocated_ips",
                    "Gauge measuring the number of allocated IPs for Services",
                ),
                &["cidr"],
            )?,
            ip_available: IntGaugeVec::new(
                ip(
                    "available_ips",
                    "Gauge measuring the number of available IPs for Services",
                ),
                &["cidr"],
            )?,
            ip_allocations: IntCounterVec::new(
                ip("allocation_total", "Number of Cluster IPs allocations"),
                &["cidr", "scope"],
            )?,
            ip_errors: IntCounterVec::new(
                ip(
                    "allocation_errors_total",
                    "Number of errors trying to allocate Cluster IPs",
                ),
                &["cidr", "scope"],
            )?,
            port_allocated: IntGauge::with_opts(port(
                "allocated_ports",
                "Gauge measuring the number of allocated NodePorts for Services",
            ))?,
            port_available: IntGauge::with_opts(port(
                "available_ports",
                "Gauge measuring the number of available NodePorts for Services",
            ))?,
            port_allocations: IntCounterVec::new(
                port("allocation_total", "Number of NodePort allocations"),
                &["scope"],
            )?,
            port_errors: IntCounterVec::new(
                port(
                    "allocation_errors_total",
                    "Number of errors trying to allocate NodePort",
                ),
                &["scope"],
            )?,
        };
        registry.register(Box::new(m.ip_allocated.clone()))?;
        registry.register(Box::new(m.ip_available.clone()))?;
        registry.register(Box::new(m.ip_allocations.clone()))?;
        registry.register(Box::new(m.ip_errors.clone()))?;
        registry.register(Box::new(m.port_allocated.clone()))?;
        registry.register(Box::new(m.port_available.clone()))?;
        registry.register(Box::new(m.port_allocations.clone()))?;
        registry.register(Box::new(m.port_errors.clone()))?;
        Ok(m)
    }

    pub fn cluster_ip(&self, cidr: &str, scope: Scope, ok: bool) {
        let counter = if ok { &self.ip_allocations } else { &self.ip_errors };
        counter.with_label_values(&[cidr, scope.as_str()]).inc();
    }

    pub fn node_port(&self, scope: Scope, ok: bool) {
        let counter = if ok {
            &self.port_allocations
        } else {
            &self.port_errors
        };
        counter.with_label_values(&[scope.as_str()]).inc();
    }

    fn observe(&self, usage: &RangeUsage) {
        let Ok(allocated) = usage.allocated else {
            return; // keep the last known values while the bitmap cannot be read
        };
        let allocated = i64::try_from(allocated).unwrap_or(i64::MAX);
        let available = i64::try_from(usage.size).unwrap_or(i64::MAX) - allocated;
        match usage.type_ {
            PoolType::ClusterIP => {
                self.ip_allocated
                    .with_label_values(&[&usage.range])
                    .set(allocated);
                self.ip_available
                    .with_label_values(&[&usage.range])
                    .set(available);
            }
            PoolType::NodePort => {
                self.port_allocated.set(allocated);
                self.port_available.set(available);
            }
        }
    }
}

async fn read_usage<R>(store: &RangeStore<R>, type_: PoolType) -> RangeUsage
where
    R: Range + Clone + Send + Sync + 'static,
    R::Value: Send + Sync + 'static,
{
    let allocated = match store.read().await {
        Ok(Some((alloc, _))) => Ok(alloc.used()),
        Ok(None) => Err(StoreError::NotInitialized {
            range: store.range().to_string(),
        }
        .to_string()),
        Err(e) => Err(e.to_string()),
    };
    RangeUsage {
        type_,
        range: store.range().to_string(),
        size: store.range().size(),
        allocated,
    }
}

/// Every range's usage, now.
pub async fn read_all(allocators: &Allocators) -> Vec<RangeUsage> {
    let mut out = Vec::new();
    for store in allocators.cluster_ips.values() {
        out.push(read_usage(store, PoolType::ClusterIP).await);
    }
    out.push(read_usage(&allocators.node_ports, PoolType::NodePort).await);
    out
}

/// Whether allocation may start: every range has been initialized (by the leader's first repair
/// pass) at least once. Latched: an etcd outage later must not take the webhook away, or the
/// apiserver would report "no endpoints" instead of the webhook's message naming etcd.
pub fn initialized(usages: &[RangeUsage]) -> Result<(), String> {
    let missing: Vec<_> = usages
        .iter()
        .filter_map(|u| u.allocated.as_ref().err())
        .cloned()
        .collect();
    if missing.is_empty() {
        Ok(())
    } else {
        Err(missing.join("; "))
    }
}

/// Reads every range each `period`, publishing the usage and keeping the gauges current.
pub async fn monitor(
    allocators: &Allocators,
    metrics: &AllocatorMetrics,
    tx: watch::Sender<Vec<RangeUsage>>,
    period: Duration,
    stop: CancellationToken,
) {
    loop {
        let usages = read_all(allocators).await;
        for u in &usages {
            metrics.observe(u);
        }
        tx.send_if_modified(|current| {
            if *current == usages {
                false
            } else {
                *current = usages;
                true
            }
        });
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(period) => {}
        }
    }
}

/// Leader only: keeps one `ServicePool` per range, writing only what changed.
pub async fn write_pools(client: Client, mut rx: watch::Receiver<Vec<RangeUsage>>, stop: CancellationToken) {
    let api: Api<ServicePool> = Api::all(client);
    let mut known: HashMap<String, ServicePool> = HashMap::new();
    let selector = format!("{}={}", MANAGED_BY.0, MANAGED_BY.1);
    match api.list(&ListParams::default().labels(&selector)).await {
        Ok(list) => {
            for p in list.items {
                if let Some(name) = p.metadata.name.clone() {
                    known.insert(name, p);
                }
            }
        }
        // Without the CRD, pools are simply not shown; allocation does not depend on them.
        Err(e) => warn!(error = %e, "cannot list ServicePools (is the CRD applied?); writing them anyway"),
    }
    loop {
        let usages = rx.borrow_and_update().clone();
        let mut failed = false;
        for usage in &usages {
            if let Err(e) = write_pool(&api, &mut known, usage).await {
                warn!(range = %usage.range, error = %e, "cannot write ServicePool");
                failed = true;
            }
        }
        tokio::select! {
            () = stop.cancelled() => return,
            changed = rx.changed() => if changed.is_err() { return },
            // A failed write (CRD not yet established, apiserver away) is retried even if the
            // usage stays the same.
            () = tokio::time::sleep(POOL_RETRY), if failed => {}
        }
    }
}

async fn write_pool(
    api: &Api<ServicePool>,
    known: &mut HashMap<String, ServicePool>,
    usage: &RangeUsage,
) -> Result<(), kube::Error> {
    let mut want = desired_pool(usage);
    let name = want.metadata.name.clone().unwrap_or_default();
    let current = known.get(&name);
    let params = PatchParams::apply(FIELD_MANAGER).force();
    if current.is_none_or(|c| c.spec != want.spec || c.metadata.labels != want.metadata.labels) {
        let stored = api.patch(&name, &params, &Patch::Apply(&want)).await?;
        info!(pool = %name, "ServicePool written");
        known.insert(name.clone(), stored);
    }
    let previous = known.get(&name).and_then(|c| c.status.clone());
    let status = desired_status(usage, previous.as_ref());
    if previous.as_ref() == Some(&status) {
        return Ok(());
    }
    want.status = Some(status.clone());
    let stored = api.patch_status(&name, &params, &Patch::Apply(&want)).await?;
    debug!(pool = %name, ?status, "ServicePool status written");
    known.insert(name, stored);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn usage(allocated: Result<u64, String>) -> RangeUsage {
        RangeUsage {
            type_: PoolType::NodePort,
            range: "30000-32767".into(),
            size: 2768,
            allocated,
        }
    }

    #[test]
    fn initialized_only_when_every_range_reads() {
        assert_eq!(initialized(&[usage(Ok(0)), usage(Ok(3))]), Ok(()));
        let err = initialized(&[
            usage(Ok(0)),
            usage(Err("range 30000-32767 is not initialized".into())),
        ])
        .unwrap_err();
        assert!(err.contains("not initialized"), "{err}");
    }

    #[test]
    fn gauges_follow_the_bitmap_and_keep_their_value_while_it_cannot_be_read() {
        let registry = Registry::new();
        let m = AllocatorMetrics::register(&registry).unwrap();
        m.observe(&usage(Ok(10)));
        assert_eq!((m.port_allocated.get(), m.port_available.get()), (10, 2758));
        m.observe(&usage(Err("etcd is unreachable".into())));
        assert_eq!((m.port_allocated.get(), m.port_available.get()), (10, 2758));
        m.node_port(Scope::Static, true);
        m.node_port(Scope::Dynamic, false);
        let names: Vec<String> = registry.gather().iter().map(|f| f.name().to_owned()).collect();
        for name in [
            "kube_apiserver_nodeport_allocator_allocated_ports",
            "kube_apiserver_nodeport_allocator_available_ports",
            "kube_apiserver_nodeport_allocator_allocation_total",
            "kube_apiserver_nodeport_allocator_allocation_errors_total",
        ] {
            assert!(names.iter().any(|n| n == name), "{name} missing from {names:?}");
        }
    }
}
