//! The repair controller's I/O (leader only): on start and every interval, every range's bitmap is
//! rebuilt from the Services that exist ([`repair_pass`]) and written back through the same
//! compare-and-swap as allocations. The first pass is what initializes a range: until it has
//! run, the ranges do not exist in etcd and the webhook refuses to allocate.

use std::{
    collections::{BTreeMap, HashMap},
    hash::Hash,
    net::IpAddr,
    sync::{Arc, Mutex},
    time::Duration,
};

use k8s_openapi::api::core::v1::Service;
use kube::{Api, Client, api::ListParams};
use prometheus::{IntCounter, IntCounterVec, Opts, Registry};
use svcplane_controllers::events::{EventSink, reference};
use svcplane_core::metrics::registered;
use svcplane_core::{IpFamily, ObjectKey};
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, info, info_span, warn};

use super::reservations::{Holdings, Watched};
use crate::{
    Allocation, Range,
    admission::held_values,
    etcd::{Fence, RangeStore, StoreError},
    ranges::Ranges,
    repair::{Finding, Records, repair_pass},
    reservation::now_ms,
};

/// How often a lost compare-and-swap is retried within one pass.
const MAX_ATTEMPTS: usize = 5;

/// kube-apiserver's repair metrics, same names and labels.
#[derive(Clone)]
pub struct RepairMetrics {
    ip_errors: IntCounterVec,
    ip_reconcile_errors: IntCounter,
    port_errors: IntCounterVec,
    port_reconcile_errors: IntCounter,
}

impl RepairMetrics {
    pub fn register(registry: &Registry) -> prometheus::Result<Self> {
        let m = Self {
            ip_errors: registered(
                registry,
                IntCounterVec::new(
                    Opts::new(
                        "apiserver_clusterip_repair_ip_errors_total",
                        "Number of errors detected on clusterips by the repair loop broken down by type of error: leak, repair, full, outOfRange, duplicate, unknown, invalid",
                    ),
                    &["type"],
                )?,
            )?,
            ip_reconcile_errors: registered(
                registry,
                IntCounter::with_opts(Opts::new(
                    "apiserver_clusterip_repair_reconcile_errors_total",
                    "Number of reconciliation failures on the clusterip repair reconcile loop",
                ))?,
            )?,
            port_errors: registered(
                registry,
                IntCounterVec::new(
                    Opts::new(
                        "apiserver_nodeport_repair_port_errors_total",
                        "Number of errors detected on ports by the repair loop broken down by type of error: leak, repair, full, outOfRange, duplicate, unknown",
                    ),
                    &["type"],
                )?,
            )?,
            port_reconcile_errors: registered(
                registry,
                IntCounter::with_opts(Opts::new(
                    "apiserver_nodeport_repair_reconcile_errors_total",
                    "Number of reconciliation failures on the nodeport repair reconcile loop",
                ))?,
            )?,
        };
        Ok(m)
    }
}

pub struct Repair {
    client: Client,
    allocators: Arc<Ranges>,
    interval: Duration,
    /// Reservations younger than this are in flight; older ones are the sweeper's, and counted
    /// as leaks here like any unheld value, in case it cannot free them.
    reservation_ttl: Duration,
    metrics: RepairMetrics,
    events: EventSink,
    /// Consecutive leak sightings, per range (one map per IP family), within one leader term.
    ip_leaks: BTreeMap<IpFamily, Mutex<HashMap<IpAddr, u32>>>,
    port_leaks: Mutex<HashMap<u16, u32>>,
}

/// What stored Services hold: IPs and ports, each with its Service and the Service's UID.
#[derive(Default)]
struct InUse(Vec<(ObjectKey, IpAddr, String)>, Vec<(ObjectKey, u16, String)>);

/// What kind of range a pass repairs, for messages, events and metrics.
#[derive(Clone, Copy)]
enum Kind {
    ClusterIp,
    NodePort,
}

impl Repair {
    pub fn new(
        client: Client,
        allocators: Arc<Ranges>,
        interval: Duration,
        reservation_ttl: Duration,
        metrics: RepairMetrics,
        events: EventSink,
    ) -> Self {
        let ip_leaks = allocators
            .cluster_ips
            .keys()
            .map(|f| (*f, Mutex::new(HashMap::new())))
            .collect();
        Self {
            client,
            allocators,
            interval,
            reservation_ttl,
            metrics,
            events,
            ip_leaks,
            port_leaks: Mutex::new(HashMap::new()),
        }
    }

    /// Repairs now, again once the leader's Service watch has its first list, then every
    /// interval, until `stop`; every write is fenced by this term.
    ///
    /// The second pass closes the term's blind spot: a Service deleted after the first pass
    /// listed it but before the watch's first list is released by neither (the watch never saw
    /// it), and would hold its values until the next interval.
    pub async fn run(&self, fence: &Fence, watch: Arc<Holdings>, stop: CancellationToken) {
        let mut first_list = watch.first_list();
        // Sightings from an earlier term are stale: a value whose create was in flight then may
        // have been seen only once since, and must not be freed on this term's first pass.
        for leaks in self.ip_leaks.values() {
            leaks
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .clear();
        }
        self.port_leaks
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clear();
        let mut listed = false;
        loop {
            if let Err(e) = self
                .run_once(fence, &watch)
                .instrument(info_span!("repair"))
                .await
            {
                warn!(error = %e, "repair pass failed; retrying at the next interval");
            }
            tokio::select! {
                () = stop.cancelled() => return,
                ok = async { first_list.wait_for(|l| *l).await.is_ok() }, if !listed => {
                    // A closed channel: the watch is gone with the term; the interval goes on.
                    listed = true;
                    if !ok {
                        tokio::select! {
                            () = stop.cancelled() => return,
                            () = tokio::time::sleep(self.interval) => {}
                        }
                    }
                }
                () = tokio::time::sleep(self.interval) => {}
            }
        }
    }

    /// One pass over every range. The leader's releases and confirmations wait meanwhile
    /// (`Ranges::repair_gate`).
    pub async fn run_once(&self, fence: &Fence, watch: &Holdings) -> Result<(), kube::Error> {
        let _gate = self.allocators.repair_gate.lock().await;
        let in_use = self.in_use().await?;
        for (family, store) in &self.allocators.cluster_ips {
            let Some(leaks) = self.ip_leaks.get(family) else {
                continue;
            };
            let v6 = family.as_str() == "IPv6";
            let ips: Vec<_> = in_use
                .0
                .iter()
                .filter(|(_, ip, _)| ip.is_ipv6() == v6)
                .cloned()
                .collect();
            if let Err(e) = self
                .repair_range(store, &ips, || watch.watched_ips(), leaks, Kind::ClusterIp, fence)
                .await
            {
                self.metrics.ip_reconcile_errors.inc();
                warn!(range = %store.range(), error = %e, "ClusterIP repair failed");
            }
        }
        if let Err(e) = self
            .repair_range(
                &self.allocators.node_ports,
                &in_use.1,
                || watch.watched_ports(),
                &self.port_leaks,
                Kind::NodePort,
                fence,
            )
            .await
        {
            self.metrics.port_reconcile_errors.inc();
            warn!(range = %self.allocators.node_ports.range(), error = %e, "NodePort repair failed");
        }
        Ok(())
    }

    /// What every stored Service holds, from a consistent list: IPs and ports, each with its
    /// Service and the Service's UID.
    async fn in_use(&self) -> Result<InUse, kube::Error> {
        let services = Api::<Service>::all(self.client.clone())
            .list(&ListParams::default())
            .await?;
        let mut in_use = InUse::default();
        for svc in &services.items {
            let key = ObjectKey::new(
                svc.metadata.namespace.clone().unwrap_or_default(),
                svc.metadata.name.clone().unwrap_or_default(),
            );
            let uid = svc.metadata.uid.clone().unwrap_or_default();
            let (held_ips, held_ports) = held_values(svc);
            in_use
                .0
                .extend(held_ips.into_iter().map(|ip| (key.clone(), ip, uid.clone())));
            in_use
                .1
                .extend(held_ports.into_iter().map(|p| (key.clone(), p, uid.clone())));
        }
        Ok(in_use)
    }

    /// Repairs one range from `in_use` (listed before, with the gate held since): the bitmap
    /// and records are read, and the bitmap written only if unchanged since the read (a value
    /// handed out meanwhile: read again).
    async fn repair_range<R>(
        &self,
        store: &RangeStore<R>,
        in_use: &[(ObjectKey, R::Value, String)],
        watched: impl Fn() -> Watched<R::Value>,
        leaks: &Mutex<HashMap<R::Value, u32>>,
        kind: Kind,
        fence: &Fence,
    ) -> Result<(), StoreError>
    where
        R: Range + Clone + Send + Sync + 'static,
        R::Value: Hash + Send + Sync + 'static,
    {
        let pairs: Vec<(ObjectKey, R::Value)> = in_use.iter().map(|(k, v, _)| (k.clone(), *v)).collect();
        for _ in 0..MAX_ATTEMPTS {
            let (stored, reservations) = store.read_with_reservations().await?;
            let (stored, revision) = match stored {
                Some(s) => s,
                // First pass for this range: start from nothing; everything in use gets marked.
                None => (Allocation::new(store.range().clone()), 0),
            };
            let now = now_ms();
            let watched = watched();
            let records = Records {
                reserved: reservations
                    .iter()
                    .filter(|l| !l.expired(now, self.reservation_ttl))
                    .map(|l| l.value)
                    .collect(),
                recorded: reservations.iter().map(|l| l.value).collect(),
                orphans_known: watched.listed,
                watched: watched.values,
            };
            let mut next_leaks = leaks
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .clone();
            let pass = repair_pass(&stored, &pairs, |_| true, &records, &mut next_leaks);
            let unchanged = revision != 0 && pass.rebuilt.bitmap() == stored.bitmap();
            if !unchanged && store.replace(&pass.rebuilt, revision, fence).await?.is_none() {
                continue; // someone allocated meanwhile: look again
            }
            if revision == 0 {
                info!(range = %store.range(), used = pass.rebuilt.used(), "range initialized from existing Services");
            }
            *leaks.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = next_leaks;
            for finding in &pass.findings {
                self.report(finding, in_use, kind);
            }
            return Ok(());
        }
        Err(StoreError::Contention {
            range: store.range().to_string(),
        })
    }

    fn report<V: std::fmt::Display + PartialEq>(
        &self,
        finding: &Finding<ObjectKey, V>,
        in_use: &[(ObjectKey, V, String)],
        kind: Kind,
    ) {
        let counter = match kind {
            Kind::ClusterIp => &self.metrics.ip_errors,
            Kind::NodePort => &self.metrics.port_errors,
        };
        let leak_released = matches!(
            finding,
            Finding::Leak { released: true, .. } | Finding::Orphan { .. }
        );
        if !matches!(finding, Finding::Leak { .. } | Finding::Orphan { .. }) || leak_released {
            counter.with_label_values(&[finding.kind()]).inc();
        }
        let uid_of = |svc: &ObjectKey| {
            in_use
                .iter()
                .find(|(k, _, _)| k == svc)
                .map(|(_, _, u)| u.clone())
                .unwrap_or_default()
        };
        let (what, prefix) = match kind {
            Kind::ClusterIp => ("Cluster IP", "ClusterIP"),
            Kind::NodePort => ("Port", "Port"),
        };
        let (service, reason, note) = match finding {
            Finding::NotAllocated { service, value } => (
                service,
                format!("{prefix}NotAllocated"),
                format!("{what} {value} is not allocated; repairing"),
            ),
            Finding::Duplicate { service, value, .. } => (
                service,
                format!("{prefix}AlreadyAllocated"),
                format!("{what} {value} was assigned to multiple services; please recreate service"),
            ),
            Finding::OutOfRange { service, value } => (
                service,
                format!("{prefix}OutOfRange"),
                format!("{what} {value} is not within the configured range; please recreate service"),
            ),
            Finding::Orphan { value } => {
                info!(%value, "released a value no Service holds and no reservation covers (its Service went while no leader watched)");
                return;
            }
            Finding::Leak {
                value,
                sightings,
                released,
            } => {
                if *released {
                    info!(%value, "leaked value released after {sightings} sightings");
                } else {
                    info!(%value, sightings, "value may have leaked: flagging for later clean up");
                }
                return;
            }
        };
        let action = match kind {
            Kind::ClusterIp => "ClusterIPAllocation",
            Kind::NodePort => "PortAllocation",
        };
        self.events.warning(
            reference("Service", &service.namespace, &service.name, &uid_of(service)),
            &reason,
            action,
            note,
        );
    }
}
