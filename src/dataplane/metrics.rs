//! The agent's metrics: kube-proxy's names where kube-proxy has one.

use prometheus::{
    Gauge, Histogram, HistogramOpts, IntCounter, IntGauge, IntGaugeVec, Opts, Registry, exponential_buckets,
};
use svcplane_core::metrics::registered;

#[derive(Clone)]
pub struct DataplaneMetrics {
    pub sync_duration: Histogram,
    pub last_sync: Gauge,
    pub sync_failures: IntCounter,
    pub rules: IntGaugeVec,
    pub problems: IntGauge,
    pub programming_latency: Histogram,
    pub ipvs_failures: IntCounter,
    pub invalid_config: IntCounter,
    pub drift_repairs: IntCounter,
}

impl DataplaneMetrics {
    pub fn register(registry: &Registry) -> prometheus::Result<Self> {
        let m = Self {
            sync_duration: registered(
                registry,
                Histogram::with_opts(
                    HistogramOpts::new(
                        "kubeproxy_sync_proxy_rules_duration_seconds",
                        "SyncProxyRules latency in seconds",
                    )
                    .buckets(exponential_buckets(0.001, 2.0, 15)?),
                )?,
            )?,
            last_sync: registered(
                registry,
                Gauge::with_opts(Opts::new(
                    "kubeproxy_sync_proxy_rules_last_timestamp_seconds",
                    "The last time proxy rules were successfully synced",
                ))?,
            )?,
            sync_failures: registered(
                registry,
                IntCounter::with_opts(Opts::new(
                    "kubeproxy_sync_proxy_rules_nftables_sync_failures_total",
                    "Number of times an nftables sync failed",
                ))?,
            )?,
            rules: registered(
                registry,
                IntGaugeVec::new(
                    Opts::new(
                        "svcplane_dataplane_rules",
                        "What svcplane holds in the kernel: rules in its chains plus map elements per IP family (nftables mode), virtual plus real servers (family IPVS)",
                    ),
                    &["family"],
                )?,
            )?,
            problems: registered(
                registry,
                IntGauge::with_opts(Opts::new(
                    "svcplane_dataplane_object_problems",
                    "Parts of Services and EndpointSlices skipped as unusable (bad address, port, protocol)",
                ))?,
            )?,
            programming_latency: registered(
                registry,
                Histogram::with_opts(
                    HistogramOpts::new(
                        "kubeproxy_network_programming_duration_seconds",
                        "In Cluster Network Programming Latency in seconds",
                    )
                    .buckets(exponential_buckets(0.01, 2.0, 14)?),
                )?,
            )?,
            ipvs_failures: registered(
                registry,
                IntCounter::with_opts(Opts::new(
                    "svcplane_dataplane_ipvs_operation_failures_total",
                    "IPVS operations the kernel refused (e.g. a scheduler it lacks)",
                ))?,
            )?,
            invalid_config: registered(
                registry,
                IntCounter::with_opts(Opts::new(
                    "svcplane_dataplane_invalid_config_total",
                    "Configuration values replaced by defaults (e.g. an unknown IPVS scheduler)",
                ))?,
            )?,
            drift_repairs: registered(
                registry,
                IntCounter::with_opts(Opts::new(
                    "svcplane_dataplane_drift_repairs_total",
                    "Times svcplane's nftables table was found changed by someone else and put back",
                ))?,
            )?,
        };
        Ok(m)
    }
}
