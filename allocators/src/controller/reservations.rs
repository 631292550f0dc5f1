//! The reservations' I/O (leader only): every couple of seconds, each range's reservations are
//! listed from etcd and judged ([`verdict`]): confirmed when the leader's Service watch has seen
//! a Service hold the value since the last sweep, or, once expired, by a consistent read of the
//! stored Services; freed when expired and held by none. Every write is fenced by the term.

use std::{collections::HashSet, hash::Hash, net::IpAddr, sync::Arc, time::Duration};

use k8s_openapi::api::core::v1::Service;
use kube::{Api, Client, api::ListParams};
use prometheus::{IntCounterVec, Opts, Registry};
use svcplane_core::metrics::registered;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, info, info_span, warn};

use crate::{
    Range,
    admission::held_values,
    etcd::{Fence, RangeStore, StoreError},
    ranges::Ranges,
    release::Held,
    reservation::{Listed, Verdict, now_ms, verdict},
};

/// How often reservations are swept: a refused request's values are back within the TTL and
/// about this.
const SWEEP_PERIOD: Duration = Duration::from_secs(2);

/// What the leader's Service watch saw Services hold, for confirmations.
pub type Seen = mpsc::UnboundedReceiver<Held>;

#[derive(Debug, thiserror::Error)]
enum SweepError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("listing Services: {0}")]
    Api(#[from] kube::Error),
}

pub struct Sweeper {
    client: Client,
    ranges: Arc<Ranges>,
    ttl: Duration,
    /// `svcplane_allocation_reservations_total{outcome}`: confirmed, or freed on expiry.
    outcomes: IntCounterVec,
}

impl Sweeper {
    pub fn new(
        client: Client,
        ranges: Arc<Ranges>,
        ttl: Duration,
        registry: &Registry,
    ) -> prometheus::Result<Self> {
        let outcomes = registered(
            registry,
            IntCounterVec::new(
                Opts::new(
                    "svcplane_allocation_reservations_total",
                    "Reservations of values the webhook handed out, by how they ended: confirmed (a stored Service holds the value) or freed (expired with no Service holding it)",
                ),
                &["outcome"],
            )?,
        )?;
        Ok(Self {
            client,
            ranges,
            ttl,
            outcomes,
        })
    }

    /// Sweeps every period until `stop`.
    pub async fn run(&self, fence: &Fence, mut seen: Seen, stop: CancellationToken) {
        let (mut ips, mut ports) = (HashSet::new(), HashSet::new());
        loop {
            tokio::select! {
                () = stop.cancelled() => return,
                () = tokio::time::sleep(SWEEP_PERIOD) => {}
            }
            while let Ok((i, p)) = seen.try_recv() {
                ips.extend(i);
                ports.extend(p);
            }
            // What was seen is not needed again after a failed sweep: an unconfirmed
            // reservation is checked against the stored Services when it expires. (A deposed
            // replica's sweeps fail until the elector ends its term.)
            if let Err(e) = self
                .sweep(fence, &ips, &ports)
                .instrument(info_span!("reservations"))
                .await
            {
                warn!(error = %e, "reservation sweep failed; retrying");
            }
            ips.clear();
            ports.clear();
        }
    }

    async fn sweep(
        &self,
        fence: &Fence,
        seen_ips: &HashSet<IpAddr>,
        seen_ports: &HashSet<u16>,
    ) -> Result<(), SweepError> {
        let now = now_ms();
        let mut ip_listed = Vec::new();
        for store in self.ranges.cluster_ips.values() {
            ip_listed.push((store, store.reservations().await?));
        }
        let port_listed = self.ranges.node_ports.reservations().await?;
        let check_ips = ip_listed
            .iter()
            .flat_map(|(_, l)| l)
            .any(|l| l.expired(now, self.ttl) && !seen_ips.contains(&l.value));
        let check_ports = port_listed
            .iter()
            .any(|l| l.expired(now, self.ttl) && !seen_ports.contains(&l.value));
        // Only expired reservations need the stored Services, read consistently (never from a
        // cache: this read decides what is freed).
        let stored = if check_ips || check_ports {
            Some(self.stored_values().await?)
        } else {
            None
        };
        for (store, listed) in &ip_listed {
            self.settle(store, listed, seen_ips, stored.as_ref().map(|s| &s.0), now, fence)
                .await?;
        }
        self.settle(
            &self.ranges.node_ports,
            &port_listed,
            seen_ports,
            stored.as_ref().map(|s| &s.1),
            now,
            fence,
        )
        .await?;
        Ok(())
    }

    async fn stored_values(&self) -> Result<(HashSet<IpAddr>, HashSet<u16>), kube::Error> {
        let services = Api::<Service>::all(self.client.clone())
            .list(&ListParams::default())
            .await?;
        let (mut ips, mut ports) = (HashSet::new(), HashSet::new());
        for svc in &services.items {
            let (i, p) = held_values(svc);
            ips.extend(i);
            ports.extend(p);
        }
        Ok((ips, ports))
    }

    async fn settle<R>(
        &self,
        store: &RangeStore<R>,
        listed: &[Listed<R::Value>],
        seen: &HashSet<R::Value>,
        stored: Option<&HashSet<R::Value>>,
        now: u64,
        fence: &Fence,
    ) -> Result<(), StoreError>
    where
        R: Range + Clone + Send + Sync + 'static,
        R::Value: Hash + Send + Sync + 'static,
    {
        let mut confirmed = Vec::new();
        for l in listed {
            match verdict(l, seen, stored, now, self.ttl) {
                Verdict::Keep => {}
                Verdict::Confirm => confirmed.push(l.key.clone()),
                Verdict::Free => {
                    if store.expire(l, fence).await? {
                        self.outcomes.with_label_values(&["freed"]).inc();
                        let who = l
                            .reservation
                            .as_ref()
                            .map(|r| format!("{}/{}", r.namespace, r.name))
                            .unwrap_or_default();
                        info!(range = %store.range(), value = %l.value, requester = %who, "reservation expired with no Service holding it; value freed");
                    }
                }
            }
        }
        if !confirmed.is_empty() {
            store.confirm(&confirmed, fence).await?;
            self.outcomes
                .with_label_values(&["confirmed"])
                .inc_by(confirmed.len() as u64);
        }
        Ok(())
    }
}
