//! Carries out an admission [`Plan`] against the etcd-backed ranges, all or nothing: when one
//! value cannot be had, the values already taken for the same request are released again. What
//! it allocates is reserved for the requesting Service ([`crate::reservation`]), so what a crash
//! or a request refused later leaves behind returns to the pool when the reservation expires;
//! and a namespace with too much reserved already is refused ([`crate::pending`]).

use std::{
    collections::BTreeMap,
    net::IpAddr,
    sync::Arc,
    time::{Duration, Instant},
};

use svcplane_core::IpFamily;
use tokio::sync::{Mutex, watch};
use tracing::warn;

use crate::{
    IpRange, PortRange,
    admission::{Allocated, ClusterFamilies, Plan, Want},
    etcd::{Done, EpochKey, Fence, Op, RangeStore, StoreError},
    metrics::{AllocatorMetrics, Scope},
    pending::{self, Ledger, TooManyPending},
    reservation::{self, Requester},
};

/// How long a read of the pending reservations may take before its figures are given up.
const PENDING_READ_TIMEOUT: Duration = Duration::from_secs(10);

/// How long a request the figures at hand would refuse waits for a read in flight.
const PENDING_READ_WAIT: Duration = Duration::from_secs(2);

/// The ranges one controller-manager allocates from.
pub struct Ranges {
    pub families: ClusterFamilies,
    pub cluster_ips: BTreeMap<IpFamily, Arc<RangeStore<IpRange>>>,
    pub node_ports: Arc<RangeStore<PortRange>>,
    pub metrics: AllocatorMetrics,
    /// Where the leader's term is recorded, for its fenced writes.
    pub epoch: EpochKey,
    pub pending: PendingLimit,
    /// Held by a repair pass from its list of the Services to its last write, and by the
    /// leader's releases and reservation confirmations while they write. Those act on what the
    /// leader's watch saw, which may be newer than the pass's list: a release made in between
    /// would be marked again by the pass (its Service still listed), and a value confirmed in
    /// between for a Service stored after the list, its record gone, would look orphaned.
    pub repair_gate: Mutex<()>,
}

/// What one namespace may hold in unconfirmed reservations.
pub struct PendingLimit {
    /// Values per namespace (`--max-pending-allocations-per-namespace`); `None`: no limit.
    limit: Option<usize>,
    /// The reservation TTL: older reservations are being freed and do not count.
    ttl: Duration,
    /// Never held across an await: requests only count under it, reads of etcd land in it.
    ledger: Arc<std::sync::Mutex<Ledger>>,
    /// Ticks when a read of etcd lands in the ledger (or fails).
    reads: Arc<watch::Sender<u64>>,
}

impl PendingLimit {
    pub fn new(limit: Option<usize>, ttl: Duration) -> Self {
        Self {
            limit,
            ttl,
            ledger: Arc::default(),
            reads: Arc::new(watch::Sender::new(0)),
        }
    }

    fn ledger(&self) -> std::sync::MutexGuard<'_, Ledger> {
        // The ledger's methods do not panic; a poisoned lock still holds consistent counts.
        self.ledger
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// Why a request got nothing.
#[derive(Debug, thiserror::Error)]
pub enum AllocationFailure {
    #[error("failed to allocate a ClusterIP: {0}")]
    ClusterIp(#[source] StoreError),
    #[error("failed to allocate a NodePort: {0}")]
    NodePort(#[source] StoreError),
    #[error("failed to allocate a health-check NodePort: {0}")]
    HealthCheckNodePort(#[source] StoreError),
    #[error("no service range is configured for {0}")]
    NoRange(&'static str),
    #[error(transparent)]
    TooManyPending(#[from] TooManyPending),
}

impl AllocationFailure {
    /// The store's error, if the failure came from one.
    pub fn store_error(&self) -> Option<&StoreError> {
        match self {
            Self::ClusterIp(e) | Self::NodePort(e) | Self::HealthCheckNodePort(e) => Some(e),
            Self::NoRange(_) | Self::TooManyPending(_) => None,
        }
    }
}

fn to_op<V>(want: Want<V>) -> (Op<V>, Scope) {
    match want {
        Want::Next => (Op::AllocateNext, Scope::Dynamic),
        Want::Exactly(v) => (Op::Allocate(v), Scope::Static),
    }
}

impl Ranges {
    pub async fn execute(&self, plan: &Plan, requester: Requester) -> Result<Allocated, AllocationFailure> {
        let wanted = plan.value_count();
        self.admit(&requester, wanted).await?;
        let requester = Arc::new(requester);
        let mut got = Allocated::default();
        let result = self.execute_into(plan, &requester, &mut got).await;
        if self.pending.limit.is_some() {
            self.pending.ledger().finished(&requester, wanted, result.is_ok());
        }
        if let Err(e) = &result {
            warn!(error = %e, "allocation failed; releasing what this request already took");
            self.release(
                &got.cluster_ips,
                &got.node_ports
                    .iter()
                    .copied()
                    .chain(got.health_check_node_port)
                    .collect::<Vec<_>>(),
                None,
            )
            .await;
        }
        result.map(|()| got)
    }

    /// Counts `wanted` values against the limit of `service`'s namespace, on the
    /// figures there are; when they are stale, a read of etcd starts in the background. A
    /// request they would refuse while a read is in flight waits for it (at most
    /// [`PENDING_READ_WAIT`]) and is judged again.
    async fn admit(&self, service: &Requester, wanted: usize) -> Result<(), TooManyPending> {
        let Some(limit) = self.pending.limit else {
            return Ok(());
        };
        let mut landed = {
            let mut ledger = self.pending.ledger();
            if ledger.begin_read(Instant::now(), pending::REFRESH) {
                self.spawn_pending_read();
            }
            match ledger.admit(service, wanted, limit) {
                Err(_) if ledger.reading() => {
                    // Subscribed under the lock the read lands under: its tick cannot be missed.
                    self.pending.reads.subscribe()
                }
                result => return result,
            }
        };
        // Refused anyway if the read does not land in time: the figures there are say so.
        let _ = tokio::time::timeout(PENDING_READ_WAIT, landed.changed()).await;
        self.pending.ledger().admit(service, wanted, limit)
    }

    /// Reads the unexpired reservations in etcd, by Service over every range, into the
    /// ledger. Bounded in time: a read that hangs must not keep the next one from starting.
    fn spawn_pending_read(&self) {
        let stores: Vec<_> = self.cluster_ips.values().cloned().collect();
        let node_ports = self.node_ports.clone();
        let ttl = self.pending.ttl;
        let ledger = self.pending.ledger.clone();
        let reads = self.pending.reads.clone();
        tokio::spawn(async move {
            let read = async {
                let now = reservation::now_ms();
                let mut counts = pending::Counts::new();
                for store in &stores {
                    pending::count(&mut counts, &store.reservations().await?, now, ttl);
                }
                pending::count(&mut counts, &node_ports.reservations().await?, now, ttl);
                Ok::<_, StoreError>(counts)
            };
            let result = tokio::time::timeout(PENDING_READ_TIMEOUT, read).await;
            let mut ledger = ledger.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            match result {
                Ok(Ok(counts)) => ledger.read_done(counts),
                // The figures of the last read stand; the allocations themselves tell whether
                // etcd is there.
                Ok(Err(e)) => {
                    warn!(error = %e, "could not read the reservations to count them");
                    ledger.read_failed();
                }
                Err(_) => {
                    warn!(timeout = ?PENDING_READ_TIMEOUT, "reading the reservations to count them timed out");
                    ledger.read_failed();
                }
            }
            reads.send_modify(|n| *n = n.wrapping_add(1));
        });
    }

    async fn execute_into(
        &self,
        plan: &Plan,
        requester: &Arc<Requester>,
        got: &mut Allocated,
    ) -> Result<(), AllocationFailure> {
        let reserve = || Some(requester.clone());
        for (family, want) in &plan.cluster_ips {
            let store = self
                .cluster_ips
                .get(family)
                .ok_or(AllocationFailure::NoRange(family.as_str()))?;
            let (op, scope) = to_op(*want);
            let result = store.submit_for(op, reserve()).await;
            self.metrics
                .cluster_ip(&store.range().to_string(), scope, result.is_ok());
            match result.map_err(AllocationFailure::ClusterIp)? {
                Done::Allocated(ip) => got.cluster_ips.push(ip),
                Done::Released(_) => {}
            }
        }
        for (_, want) in &plan.node_ports {
            let (op, scope) = to_op(*want);
            let result = self.node_ports.submit_for(op, reserve()).await;
            self.metrics.node_port(scope, result.is_ok());
            match result.map_err(AllocationFailure::NodePort)? {
                Done::Allocated(p) => got.node_ports.push(p),
                Done::Released(_) => {}
            }
        }
        if let Some(want) = plan.health_check_node_port {
            let (op, scope) = to_op(want);
            let result = self.node_ports.submit_for(op, reserve()).await;
            self.metrics.node_port(scope, result.is_ok());
            if let Done::Allocated(p) = result.map_err(AllocationFailure::HealthCheckNodePort)? {
                got.health_check_node_port = Some(p);
            }
        }
        Ok(())
    }

    /// Releases values (best effort: what cannot be released now is a leak repair reclaims).
    /// With a `fence` the releases are the leader's, each fenced by its term; without one they
    /// undo what a failed request of this replica's webhook took.
    pub async fn release(&self, ips: &[IpAddr], ports: &[u16], fence: Option<&Fence>) {
        for ip in ips {
            let family = if ip.is_ipv6() {
                IpFamily::IPv6
            } else {
                IpFamily::IPv4
            };
            if let Some(store) = self.cluster_ips.get(&family)
                && store.range().contains(*ip)
                && let Err(e) = submit(store, Op::Release(*ip), fence).await
            {
                warn!(%ip, error = %e, "could not release a ClusterIP; repair will reclaim it");
            }
        }
        for port in ports {
            if let Err(e) = submit(&self.node_ports, Op::Release(*port), fence).await {
                warn!(port, error = %e, "could not release a NodePort; repair will reclaim it");
            }
        }
    }
}

async fn submit<R>(
    store: &RangeStore<R>,
    op: Op<R::Value>,
    fence: Option<&Fence>,
) -> Result<Done<R::Value>, StoreError>
where
    R: crate::Range + Clone + Send + Sync + 'static,
    R::Value: Send + Sync + 'static,
{
    match fence {
        Some(fence) => store.submit_as_leader(op, fence).await,
        None => store.submit(op).await,
    }
}
