//! `endpoint_slice_controller_*`: upstream's metric names, labels and buckets, so existing
//! dashboards and alerts keep working; plus a sync-duration histogram upstream lacks.

use std::{collections::HashMap, sync::Mutex};

use prometheus::{
    Histogram, HistogramOpts, HistogramVec, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry,
};
use svcplane_core::metrics::registered;

use super::PlanStats;
use crate::{
    model::ObjectKey,
    runtime::{GaugeShares, SyncResult},
};

const SUBSYSTEM: &str = "endpoint_slice_controller";

pub struct EndpointSliceMetrics {
    endpoints_added: Histogram,
    endpoints_removed: Histogram,
    changes: IntCounterVec,
    changed_per_sync: HistogramVec,
    syncs: IntCounterVec,
    by_traffic_distribution: IntGaugeVec,
    sync_duration: Histogram,
    /// Each Service's share of endpoints_desired, num_endpoint_slices, desired_endpoint_slices.
    shares: GaugeShares<3>,
    /// Each Service's trafficDistribution, for services_count_by_traffic_distribution.
    traffic_distribution: Mutex<HashMap<ObjectKey, String>>,
}

impl EndpointSliceMetrics {
    pub fn register(registry: &Registry) -> prometheus::Result<Self> {
        let exp = prometheus::exponential_buckets(2.0, 2.0, 15)?;
        let opts = |name: &str, help: &str| Opts::new(name, help).subsystem(SUBSYSTEM);
        let hopts = |name: &str, help: &str| HistogramOpts::new(name, help).subsystem(SUBSYSTEM);
        let gauge = |name: &str, help: &str| registered(registry, IntGauge::with_opts(opts(name, help))?);
        let endpoints_desired = gauge("endpoints_desired", "Number of endpoints desired")?;
        let num_slices = gauge("num_endpoint_slices", "Number of EndpointSlices")?;
        let desired_slices = gauge(
            "desired_endpoint_slices",
            "Number of EndpointSlices that would exist with perfect endpoint allocation",
        )?;
        let m = Self {
            endpoints_added: registered(
                registry,
                Histogram::with_opts(
                    hopts(
                        "endpoints_added_per_sync",
                        "Number of endpoints added on each Service sync",
                    )
                    .buckets(exp.clone()),
                )?,
            )?,
            endpoints_removed: registered(
                registry,
                Histogram::with_opts(
                    hopts(
                        "endpoints_removed_per_sync",
                        "Number of endpoints removed on each Service sync",
                    )
                    .buckets(exp),
                )?,
            )?,
            changes: registered(
                registry,
                IntCounterVec::new(opts("changes", "Number of EndpointSlice changes"), &["operation"])?,
            )?,
            changed_per_sync: registered(
                registry,
                HistogramVec::new(
                    hopts(
                        "endpointslices_changed_per_sync",
                        "Number of EndpointSlices changed on each Service sync",
                    ),
                    &["topology", "traffic_distribution"],
                )?,
            )?,
            syncs: registered(
                registry,
                IntCounterVec::new(opts("syncs", "Number of EndpointSlice syncs"), &["result"])?,
            )?,
            by_traffic_distribution: registered(
                registry,
                IntGaugeVec::new(
                    opts(
                        "services_count_by_traffic_distribution",
                        "Number of Services using some specific trafficDistribution",
                    ),
                    &["traffic_distribution"],
                )?,
            )?,
            sync_duration: registered(
                registry,
                Histogram::with_opts(
                    HistogramOpts::new(
                        "svcplane_endpointslice_sync_duration_seconds",
                        "Duration of one Service's EndpointSlice sync, writes included",
                    )
                    .buckets(prometheus::exponential_buckets(0.0005, 2.0, 16)?),
                )?,
            )?,
            shares: GaugeShares::new([endpoints_desired, num_slices, desired_slices]),
            traffic_distribution: Mutex::new(HashMap::new()),
        };
        Ok(m)
    }

    pub fn change(&self, operation: &str) {
        self.changes.with_label_values(&[operation]).inc();
    }

    pub fn sync(&self, result: SyncResult, seconds: f64) {
        self.syncs.with_label_values(&[result.label()]).inc();
        self.sync_duration.observe(seconds);
    }

    /// Records a planned sync of `svc`: per-sync histograms, and the Service's share of the gauges.
    pub fn planned(
        &self,
        svc: &ObjectKey,
        stats: &PlanStats,
        writes: usize,
        topology: &str,
        traffic_distribution: Option<&str>,
    ) {
        self.endpoints_added.observe(stats.endpoints_added as f64);
        self.endpoints_removed.observe(stats.endpoints_removed as f64);
        self.changed_per_sync
            .with_label_values(&[topology, traffic_distribution.unwrap_or("")])
            .observe(writes as f64);
        self.shares.set(
            svc,
            Some([stats.endpoints_desired, stats.slices_after, stats.slices_desired]),
        );
        self.set_traffic_distribution(svc, traffic_distribution);
    }

    /// Starts a leadership term from zero: the figures of the previous term may be stale.
    pub fn reset(&self) {
        self.shares.reset();
        self.traffic_distribution
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clear();
        self.by_traffic_distribution.reset();
    }

    /// Removes a deleted Service's share of the gauges.
    pub fn forget(&self, svc: &ObjectKey) {
        self.shares.set(svc, None);
        self.set_traffic_distribution(svc, None);
    }

    fn set_traffic_distribution(&self, svc: &ObjectKey, now: Option<&str>) {
        let mut map = self
            .traffic_distribution
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let before = match now {
            Some(td) => map.insert(svc.clone(), td.to_owned()),
            None => map.remove(svc),
        };
        if before.as_deref() != now {
            if let Some(td) = before {
                self.by_traffic_distribution.with_label_values(&[&td]).dec();
            }
            if let Some(td) = now {
                self.by_traffic_distribution.with_label_values(&[td]).inc();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gauges_sum_over_services_and_forget_removes_shares() {
        let registry = Registry::new();
        let m = EndpointSliceMetrics::register(&registry).unwrap();
        let a = ObjectKey::new("ns", "a");
        let b = ObjectKey::new("ns", "b");
        let stats = |eps, slices| PlanStats {
            endpoints_desired: eps,
            slices_after: slices,
            slices_desired: slices,
            ..Default::default()
        };
        m.planned(&a, &stats(150, 2), 2, "Disabled", None);
        m.planned(&b, &stats(10, 1), 1, "Disabled", Some("PreferClose"));
        assert_eq!(m.shares.totals()[..2], [160, 3]);
        assert_eq!(
            m.by_traffic_distribution
                .with_label_values(&["PreferClose"])
                .get(),
            1
        );
        m.planned(&a, &stats(100, 1), 1, "Disabled", None);
        assert_eq!(m.shares.totals(), [110, 2, 2]);
        m.forget(&b);
        assert_eq!(m.shares.totals()[..2], [100, 1]);
        assert_eq!(
            m.by_traffic_distribution
                .with_label_values(&["PreferClose"])
                .get(),
            0
        );
        let names: Vec<String> = registry.gather().iter().map(|f| f.name().to_owned()).collect();
        for want in [
            "endpoint_slice_controller_endpoints_added_per_sync",
            "endpoint_slice_controller_desired_endpoint_slices",
            "endpoint_slice_controller_endpointslices_changed_per_sync",
            "endpoint_slice_controller_services_count_by_traffic_distribution",
        ] {
            assert!(names.iter().any(|n| n == want), "{want} missing from {names:?}");
        }
    }
}
