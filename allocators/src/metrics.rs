//! kube-apiserver's allocator metrics, same names and labels, kept by every replica: counters
//! for what this replica's webhook allocated, gauges from the ranges as read from etcd.

use prometheus::{IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry};
use svcplane_core::metrics::registered;

use crate::pool::{PoolType, RangeUsage};

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
            ip_allocated: registered(
                registry,
                IntGaugeVec::new(
                    ip(
                        "allocated_ips",
                        "Gauge measuring the number of allocated IPs for Services",
                    ),
                    &["cidr"],
                )?,
            )?,
            ip_available: registered(
                registry,
                IntGaugeVec::new(
                    ip(
                        "available_ips",
                        "Gauge measuring the number of available IPs for Services",
                    ),
                    &["cidr"],
                )?,
            )?,
            ip_allocations: registered(
                registry,
                IntCounterVec::new(
                    ip("allocation_total", "Number of Cluster IPs allocations"),
                    &["cidr", "scope"],
                )?,
            )?,
            ip_errors: registered(
                registry,
                IntCounterVec::new(
                    ip(
                        "allocation_errors_total",
                        "Number of errors trying to allocate Cluster IPs",
                    ),
                    &["cidr", "scope"],
                )?,
            )?,
            port_allocated: registered(
                registry,
                IntGauge::with_opts(port(
                    "allocated_ports",
                    "Gauge measuring the number of allocated NodePorts for Services",
                ))?,
            )?,
            port_available: registered(
                registry,
                IntGauge::with_opts(port(
                    "available_ports",
                    "Gauge measuring the number of available NodePorts for Services",
                ))?,
            )?,
            port_allocations: registered(
                registry,
                IntCounterVec::new(
                    port("allocation_total", "Number of NodePort allocations"),
                    &["scope"],
                )?,
            )?,
            port_errors: registered(
                registry,
                IntCounterVec::new(
                    port(
                        "allocation_errors_total",
                        "Number of errors trying to allocate NodePort",
                    ),
                    &["scope"],
                )?,
            )?,
        };
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

    pub(crate) fn observe(&self, usage: &RangeUsage) {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pool::node_port_usage as usage;

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
