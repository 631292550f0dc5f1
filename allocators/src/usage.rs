//! How full each range is, read from etcd: the readiness of the webhook (no allocation before the
//! ranges have been reconciled with existing Services) and the usage the gauges and the leader's
//! `ServicePool` status show.
//!
//! Every replica reads the ranges on a short period ([`monitor`]): that costs one small read per
//! range and keeps each replica's gauges right even when another replica allocated.

use std::time::Duration;

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::{
    Range,
    etcd::{RangeStore, StoreError},
    metrics::AllocatorMetrics,
    pool::{PoolType, RangeUsage},
    ranges::Ranges,
};

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
pub async fn read_all(ranges: &Ranges) -> Vec<RangeUsage> {
    let mut out = Vec::new();
    for store in ranges.cluster_ips.values() {
        out.push(read_usage(store, PoolType::ClusterIP).await);
    }
    out.push(read_usage(&ranges.node_ports, PoolType::NodePort).await);
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
    ranges: &Ranges,
    metrics: &AllocatorMetrics,
    tx: watch::Sender<Vec<RangeUsage>>,
    period: Duration,
    stop: CancellationToken,
) {
    loop {
        let usages = read_all(ranges).await;
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pool::node_port_usage as usage;

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
}
