//! The reservations' I/O (leader only): every couple of seconds, each range's reservations are
//! listed from etcd and judged ([`verdict`]): confirmed when the leader's Service watch shows the
//! Service a value was reserved for holding it ([`Holdings`]), or, once expired, by a consistent
//! read of the stored Services; freed when expired and held by none. Every write is fenced by
//! the term.

use std::{
    collections::{HashMap, HashSet},
    hash::Hash,
    net::IpAddr,
    sync::{Arc, Mutex},
    time::Duration,
};

use k8s_openapi::api::core::v1::Service;
use kube::{Api, Client, api::ListParams};
use prometheus::{IntCounterVec, Opts, Registry};
use svcplane_core::metrics::registered;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, info, info_span, warn};

use crate::{
    Range,
    admission::held_values,
    etcd::{Fence, RangeStore, StoreError},
    ranges::Ranges,
    release::Held,
    reservation::{Listed, Reservation, Verdict, now_ms, verdict},
};

/// How often reservations are swept: a refused request's values are back within the TTL and
/// about this.
const SWEEP_PERIOD: Duration = Duration::from_secs(2);

/// What each Service holds, as the leader's Service watch last saw it (kept by the watch's
/// handler, read by the sweeper). Current state, matched by name: a Service deleted since, or
/// another one, cannot confirm a value that was freed and handed out again.
#[derive(Default)]
pub struct Holdings {
    by_namespace: Mutex<HashMap<String, HashMap<String, Held>>>,
    /// Whether the watch's first list is in.
    listed: tokio::sync::watch::Sender<bool>,
    /// Values whose release is queued or under way (the watch saw their Service drop them).
    releasing: Mutex<Held>,
}

/// What the leader's watch knows of the values of one range, for repair: values it shows a
/// Service holding or has a release pending for. Repair must leave those to the watch: freeing
/// one itself, it would race the release, which would then free the value again after it was
/// handed out anew.
#[derive(Debug)]
pub struct Watched<V> {
    /// Whether the watch has its first list (before it, it knows nothing).
    pub listed: bool,
    pub values: HashSet<V>,
}

impl Holdings {
    /// The watch's view of the IPs (`ips`) or the ports.
    pub fn watched_ips(&self) -> Watched<IpAddr> {
        self.watched(|h| h.0.clone())
    }

    pub fn watched_ports(&self) -> Watched<u16> {
        self.watched(|h| h.1.clone())
    }

    fn watched<V: Eq + Hash>(&self, part: impl Fn(&Held) -> Vec<V>) -> Watched<V> {
        let mut values: HashSet<V> = part(
            &self
                .releasing
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
        )
        .into_iter()
        .collect();
        let map = self
            .by_namespace
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        values.extend(map.values().flat_map(|names| names.values()).flat_map(&part));
        Watched {
            listed: *self.listed.borrow(),
            values,
        }
    }

    /// A release of `held` is queued.
    pub fn releasing(&self, held: &Held) {
        let mut r = self
            .releasing
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        r.0.extend(&held.0);
        r.1.extend(&held.1);
    }

    /// The release of `held` is done (or failed: repair's to judge now).
    pub fn released(&self, held: &Held) {
        let mut r = self
            .releasing
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        r.0.retain(|v| !held.0.contains(v));
        r.1.retain(|v| !held.1.contains(v));
    }

    /// The watch's first list is in: every Service that existed then is here.
    pub fn listed(&self) {
        self.listed.send_replace(true);
    }

    /// Resolves once the first list is in.
    pub fn first_list(&self) -> tokio::sync::watch::Receiver<bool> {
        self.listed.subscribe()
    }

    /// Records what `namespace/name` holds now (`None`: it is gone).
    pub fn set(&self, namespace: &str, name: &str, held: Option<Held>) {
        let mut map = self
            .by_namespace
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        match held {
            Some(h) => {
                map.entry(namespace.to_owned())
                    .or_default()
                    .insert(name.to_owned(), h);
            }
            None => {
                if let Some(names) = map.get_mut(namespace) {
                    names.remove(name);
                    if names.is_empty() {
                        map.remove(namespace);
                    }
                }
            }
        }
    }

    /// Whether the Service `r` was made for holds what `held` looks for (for a `generateName`
    /// create, whose name was not known at admission: any Service of its namespace).
    fn holds(&self, r: &Reservation, held: impl Fn(&Held) -> bool) -> bool {
        let map = self
            .by_namespace
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let Some(names) = map.get(&r.namespace) else {
            return false;
        };
        if r.name.is_empty() {
            names.values().any(held)
        } else {
            names.get(&r.name).is_some_and(held)
        }
    }

    fn holds_ip(&self, l: &Listed<IpAddr>) -> bool {
        l.reservation
            .as_ref()
            .is_some_and(|r| self.holds(r, |h| h.0.contains(&l.value)))
    }

    fn holds_port(&self, l: &Listed<u16>) -> bool {
        l.reservation
            .as_ref()
            .is_some_and(|r| self.holds(r, |h| h.1.contains(&l.value)))
    }
}

#[derive(Debug, thiserror::Error)]
enum SweepError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("listing Services: {0}")]
    Api(#[from] kube::Error),
}

/// A listed reservation, and whether its Service is seen holding the value.
type Judged<V> = (Listed<V>, bool);

/// `store`'s reservations, each with whether its Service is seen holding the value.
async fn judged<R>(
    store: &RangeStore<R>,
    seen: impl Fn(&Listed<R::Value>) -> bool,
) -> Result<Vec<Judged<R::Value>>, StoreError>
where
    R: Range + Clone + Send + Sync + 'static,
    R::Value: Send + Sync + 'static,
{
    Ok(store
        .reservations()
        .await?
        .into_iter()
        .map(|l| {
            let s = seen(&l);
            (l, s)
        })
        .collect())
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

    /// Sweeps every period until `stop`. (A deposed replica's sweeps fail until the elector
    /// ends its term.)
    pub async fn run(&self, fence: &Fence, holdings: Arc<Holdings>, stop: CancellationToken) {
        loop {
            tokio::select! {
                () = stop.cancelled() => return,
                () = tokio::time::sleep(SWEEP_PERIOD) => {}
            }
            if let Err(e) = self
                .sweep(fence, &holdings)
                .instrument(info_span!("reservations"))
                .await
            {
                warn!(error = %e, "reservation sweep failed; retrying");
            }
        }
    }

    async fn sweep(&self, fence: &Fence, holdings: &Holdings) -> Result<(), SweepError> {
        let _gate = self.ranges.repair_gate.lock().await;
        let now = now_ms();
        let mut ip_listed = Vec::new();
        for store in self.ranges.cluster_ips.values() {
            ip_listed.push((store, judged(store, |l| holdings.holds_ip(l)).await?));
        }
        let port_listed = judged(&self.ranges.node_ports, |l| holdings.holds_port(l)).await?;
        let check = ip_listed
            .iter()
            .flat_map(|(_, l)| l)
            .any(|(l, seen)| !seen && l.expired(now, self.ttl))
            || port_listed
                .iter()
                .any(|(l, seen)| !seen && l.expired(now, self.ttl));
        // Only expired reservations need the stored Services, read consistently (never from a
        // cache: this read decides what is freed).
        let stored = if check {
            Some(self.stored_values().await?)
        } else {
            None
        };
        for (store, listed) in &ip_listed {
            self.settle(store, listed, stored.as_ref().map(|s| &s.0), now, fence)
                .await?;
        }
        self.settle(
            &self.ranges.node_ports,
            &port_listed,
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
        listed: &[Judged<R::Value>],
        stored: Option<&HashSet<R::Value>>,
        now: u64,
        fence: &Fence,
    ) -> Result<(), StoreError>
    where
        R: Range + Clone + Send + Sync + 'static,
        R::Value: Hash + Send + Sync + 'static,
    {
        let mut confirmed = Vec::new();
        for (l, requester_holds) in listed {
            match verdict(l, *requester_holds, stored, now, self.ttl) {
                Verdict::Keep => {}
                Verdict::Confirm => confirmed.push((l.key.clone(), l.mod_revision)),
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::reservation::Requester;

    fn listed_ip(ip: &str, namespace: &str, name: &str) -> Listed<IpAddr> {
        let value: IpAddr = ip.parse().unwrap();
        Listed {
            value,
            key: String::new(),
            mod_revision: 1,
            reservation: Some(
                Requester {
                    namespace: namespace.into(),
                    name: name.into(),
                }
                .reserve(value, 0),
            ),
        }
    }

    #[test]
    fn only_the_service_a_value_was_reserved_for_confirms_it() {
        let h = Holdings::default();
        let ip: IpAddr = "10.96.0.5".parse().unwrap();
        // `probe` held 10.96.0.5, then went; the value was handed out again to `web`.
        h.set("ns", "probe", Some((vec![ip], vec![])));
        assert!(!h.holds_ip(&listed_ip("10.96.0.5", "ns", "web")));
        h.set("ns", "probe", None);
        assert!(!h.holds_ip(&listed_ip("10.96.0.5", "ns", "probe")));
        h.set("ns", "web", Some((vec![ip], vec![])));
        assert!(h.holds_ip(&listed_ip("10.96.0.5", "ns", "web")));
        assert!(!h.holds_ip(&listed_ip("10.96.0.5", "other", "web")));
        // A generateName create: any Service of its namespace.
        assert!(h.holds_ip(&listed_ip("10.96.0.5", "ns", "")));
        assert!(!h.holds_ip(&listed_ip("10.96.0.6", "ns", "")));
    }
}
