//! The agent's metrics: kube-proxy's names where kube-proxy has one.

use prometheus::{
    Gauge, Histogram, HistogramOpts, IntCounter, IntGauge, IntGaugeVec, Opts, Registry, exponential_buckets,
};

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
}

impl DataplaneMetrics {
    pub fn register(registry: &Registry) -> prometheus::Result<Self> {
        let m = Self {
            sync_duration: Histogram::with_opts(
                HistogramOpts::new(
                    "kubeproxy_sync_proxy_rules_duration_seconds",
                    "SyncProxyRules latency in seconds",
                )
                .buckets(exponential_buckets(0.001, 2.0, 15)?),
            )?,
            last_sync: Gauge::with_opts(Opts::new(
                "kubeproxy_sync_proxy_rules_last_timestamp_seconds",
                "The last time proxy rules were successfully synced",
            ))?,
            sync_failures: IntCounter::with_opts(Opts::new(
                "kubeproxy_sync_proxy_rules_nftables_sync_failures_total",
                "Number of times an nftables sync failed",
            ))?,
            rules: IntGaugeVec::new(
                Opts::new(
                    "svcplane_dataplane_rules",
                    "What svcplane holds in the kernel: rules in its chains plus map elements per IP family (nftables mode), virtual plus real servers (family IPVS)",
                ),
                &["family"],
            )?,
            problems: IntGauge::with_opts(Opts::new(
                "svcplane_dataplane_object_problems",
                "Parts of Services and EndpointSlices skipped as unusable (bad address, port, protocol)",
            ))?,
            programming_latency: Histogram::with_opts(
                HistogramOpts::new(
                    "kubeproxy_network_programming_duration_seconds",
                    "In Cluster Network Programming Latency in seconds",
                )
                .buckets(exponential_buckets(0.01, 2.0, 14)?),
            )?,
            ipvs_failures: IntCounter::with_opts(Opts::new(
                "svcplane_dataplane_ipvs_operation_failures_total",
                "IPVS operations the kernel refused (e.g. a scheduler it lacks)",
            ))?,
            invalid_config: IntCounter::with_opts(Opts::new(
                "svcplane_dataplane_invalid_config_total",
                "Configuration values replaced by defaults (e.g. an unknown IPVS scheduler)",
            ))?,
        };
        registry.register(Box::new(m.ipvs_failures.clone()))?;
        registry.register(Box::new(m.invalid_config.clone()))?;
        registry.register(Box::new(m.programming_latency.clone()))?;
        registry.register(Box::new(m.sync_duration.clone()))?;
        registry.register(Box::new(m.last_sync.clone()))?;
        registry.register(Box::new(m.sync_failures.clone()))?;
        registry.register(Box::new(m.rules.clone()))?;
        registry.register(Box::new(m.problems.clone()))?;
        Ok(m)
    }
}
