use prometheus::{IntCounterVec, IntGaugeVec, Opts, Registry};
use svcplane_core::metrics::registered;

/// client-go's leader election metrics, under the names kube-controller-manager exposes.
#[derive(Clone, Debug)]
pub struct LeaderMetrics {
    master_status: IntGaugeVec,
    slowpath: IntCounterVec,
}

impl LeaderMetrics {
    pub fn register(registry: &Registry) -> prometheus::Result<Self> {
        let master_status = registered(
            registry,
            IntGaugeVec::new(
                Opts::new(
                    "leader_election_master_status",
                    "Gauge of if the reporting system is master of the relevant lease, 0 indicates backup, 1 indicates master. 'name' is the string used to identify the lease.",
                ),
                &["name"],
            )?,
        )?;
        let slowpath = registered(
            registry,
            IntCounterVec::new(
                Opts::new(
                    "leader_election_slowpath_total",
                    "Total number of slow path exercised in renewing leader leases. 'name' is the string used to identify the lease.",
                ),
                &["name"],
            )?,
        )?;
        Ok(Self {
            master_status,
            slowpath,
        })
    }

    pub(super) fn set_leading(&self, lease: &str, leading: bool) {
        self.master_status
            .with_label_values(&[lease])
            .set(i64::from(leading));
    }

    pub(super) fn slowpath(&self, lease: &str) {
        self.slowpath.with_label_values(&[lease]).inc();
    }
}
