//! A bound on what one namespace may hold in pending reservations.
//!
//! Reservations return what a refused, timed-out or forged request took, but only after their
//! TTL: one namespace creating Services that are refused after the webhook (or a caller forging
//! reviews for it) could otherwise keep a small range such as the NodePorts drained, one TTL at a
//! time. So a replica refuses a request when the namespace already has `limit` values reserved
//! and not yet confirmed.
//!
//! The count is an estimate that errs little and on the side of admitting: etcd's unexpired
//! reservations, read at most every [`REFRESH`] by each replica, with this replica's own
//! admissions laid over them until a read that began after their request finished lands. Per
//! Service the larger of the two figures counts, so a reservation both read and admitted here
//! counts once. Another replica's admissions since its last read are missed, so a namespace can
//! exceed the limit by what the other replicas admit for it in one refresh period; legitimate
//! Services are confirmed by the leader within seconds, so they hardly count. Expired
//! reservations do not count: they are being freed (and without a leader to confirm anything, a
//! namespace is not locked out for longer than one TTL).
//!
//! An admitted request never waits for a read: the request that finds the figures stale starts
//! one in the background and is judged, like those after it, on the figures there are. Only a
//! request those figures would refuse waits (briefly) for the read in flight and is judged
//! again, so a namespace is not refused on counts of reservations long expired. A read on the
//! hot path made every request of the replica queue behind it, and one slow etcd read in a busy
//! cluster then timed out admissions that had nothing to do with the limit.
//!
//! This module is the pure part: the ledger and the count.

use std::{
    collections::HashMap,
    time::{Duration, Instant},
};

use crate::reservation::{Listed, Requester};

/// How old the ledger's read of etcd may be before a request starts a new one.
pub const REFRESH: Duration = Duration::from_secs(2);

/// A namespace over its limit.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "namespace {namespace:?} already has {pending} ClusterIPs and NodePorts reserved for Services not yet stored, and this request needs {wanted} more (limit {limit}, the controller-manager's --max-pending-allocations-per-namespace); try again once they are stored or their reservations expire"
)]
pub struct TooManyPending {
    pub namespace: String,
    pub pending: usize,
    pub wanted: usize,
    pub limit: usize,
}

/// Unexpired reservations per Service, as one read of etcd found them.
pub type Counts = HashMap<Requester, usize>;

/// Pending values per namespace: the last read of etcd and this replica's admissions.
#[derive(Debug, Default)]
pub struct Ledger {
    read: Counts,
    /// `read` summed by namespace.
    read_by_namespace: HashMap<String, usize>,
    own: HashMap<Requester, Own>,
    /// Reads begun so far; the one in flight, if any, is the last.
    reads_begun: u64,
    /// When the last read began.
    read_at: Option<Instant>,
    reading: bool,
}

/// What this replica admitted for one Service and has not yet seen a read cover.
#[derive(Debug, Default)]
struct Own {
    values: usize,
    /// Requests still allocating: a read may have seen part of what they reserve, or none.
    in_flight: usize,
    /// `reads_begun` when the last request finished: a read begun after it covers them all.
    finished_after: u64,
}

impl Ledger {
    /// Whether a read of etcd should begin at `now`: none is in flight and the last one began
    /// `every` ago or more (or there was none). If so, the ledger counts it as begun.
    pub fn begin_read(&mut self, now: Instant, every: Duration) -> bool {
        let stale = self
            .read_at
            .is_none_or(|at| now.saturating_duration_since(at) >= every);
        if self.reading || !stale {
            return false;
        }
        self.reading = true;
        self.reads_begun += 1;
        self.read_at = Some(now);
        true
    }

    /// Whether a read is in flight.
    pub fn reading(&self) -> bool {
        self.reading
    }

    /// The read begun last landed. It holds what this replica's requests finished before it
    /// began reserved (or their reservations confirmed or expired), so their own figures go.
    pub fn read_done(&mut self, read: Counts) {
        let mut by_namespace = HashMap::<String, usize>::new();
        for (service, n) in &read {
            *by_namespace.entry(service.namespace.clone()).or_default() += n;
        }
        self.read = read;
        self.read_by_namespace = by_namespace;
        let begun = self.reads_begun;
        self.own
            .retain(|_, own| own.in_flight > 0 || own.finished_after >= begun);
        self.reading = false;
    }

    /// The read begun last failed: the figures of the last one stand, and the next read is a
    /// period after this one began (a slow etcd is not asked again and again).
    pub fn read_failed(&mut self) {
        self.reading = false;
    }

    /// Admits a request of `service` for `wanted` more values, or says why not. An admitted
    /// request is [`finished`](Self::finished) when its allocation is done.
    pub fn admit(&mut self, service: &Requester, wanted: usize, limit: usize) -> Result<(), TooManyPending> {
        let pending = self.pending(&service.namespace);
        if pending.saturating_add(wanted) > limit {
            return Err(TooManyPending {
                namespace: service.namespace.clone(),
                pending,
                wanted,
                limit,
            });
        }
        let own = self.own.entry(service.clone()).or_default();
        own.values += wanted;
        own.in_flight += 1;
        Ok(())
    }

    /// An admitted request of `service` finished: it keeps what it reserved, or (`kept` false)
    /// got nothing and rolled back.
    pub fn finished(&mut self, service: &Requester, wanted: usize, kept: bool) {
        if let Some(own) = self.own.get_mut(service) {
            own.in_flight = own.in_flight.saturating_sub(1);
            if !kept {
                own.values = own.values.saturating_sub(wanted);
            }
            own.finished_after = self.reads_begun;
        }
    }

    pub fn pending(&self, namespace: &str) -> usize {
        let read = self.read_by_namespace.get(namespace).copied().unwrap_or(0);
        let own_beyond_read: usize = self
            .own
            .iter()
            .filter(|(service, _)| service.namespace == namespace)
            .map(|(service, own)| {
                own.values
                    .saturating_sub(self.read.get(service).copied().unwrap_or(0))
            })
            .sum();
        read + own_beyond_read
    }
}

/// Adds the unexpired reservations of `listed` at `now_ms` to `counts`, by Service.
pub fn count<V>(counts: &mut Counts, listed: &[Listed<V>], now_ms: u64, ttl: Duration) {
    for l in listed {
        if let Some(r) = &l.reservation
            && !l.expired(now_ms, ttl)
        {
            let service = Requester {
                namespace: r.namespace.clone(),
                name: r.name.clone(),
            };
            *counts.entry(service).or_default() += 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::reservation::Reservation;

    fn listed(ns: &str, at_ms: u64) -> Listed<u16> {
        Listed {
            value: 1,
            key: String::new(),
            mod_revision: 1,
            reservation: Some(Reservation {
                namespace: ns.into(),
                name: "s".into(),
                value: "1".into(),
                at_ms,
            }),
        }
    }

    fn svc(ns: &str, name: &str) -> Requester {
        Requester {
            namespace: ns.into(),
            name: name.into(),
        }
    }

    fn read_of(entries: &[(&str, &str, usize)]) -> Counts {
        entries.iter().map(|&(ns, name, n)| (svc(ns, name), n)).collect()
    }

    #[test]
    fn a_namespace_is_refused_past_its_limit_and_others_are_not() {
        let mut l = Ledger::default();
        assert!(l.begin_read(Instant::now(), REFRESH));
        l.read_done(read_of(&[("a", "x", 5), ("a", "y", 3)]));
        assert_eq!(l.admit(&svc("a", "z"), 2, 10), Ok(()));
        let err = l.admit(&svc("a", "w"), 1, 10).unwrap_err();
        assert_eq!((err.pending, err.wanted, err.limit), (10, 1, 10));
        assert!(
            err.to_string()
                .contains("--max-pending-allocations-per-namespace"),
            "{err}"
        );
        assert_eq!(l.admit(&svc("b", "x"), 10, 10), Ok(()));
        // One request larger than the limit is refused even in an empty namespace.
        assert!(l.admit(&svc("c", "x"), 11, 10).is_err());
    }

    #[test]
    fn what_a_read_and_this_replica_both_count_counts_once() {
        let mut l = Ledger::default();
        let t0 = Instant::now();
        assert!(l.begin_read(t0, REFRESH));
        // Admitted while a read is in flight: it may see the reservations, or not.
        l.admit(&svc("a", "x"), 2, 10).unwrap();
        l.read_done(read_of(&[("a", "x", 2), ("a", "other", 1)]));
        assert_eq!(l.pending("a"), 3);
        assert!(l.begin_read(t0 + REFRESH, REFRESH));
        l.read_done(read_of(&[("a", "other", 1)]));
        assert_eq!(l.pending("a"), 3);
        // Finished while a read is in flight: that read may still miss them.
        assert!(l.begin_read(t0 + REFRESH * 2, REFRESH));
        l.finished(&svc("a", "x"), 2, true);
        l.read_done(read_of(&[("a", "other", 1)]));
        assert_eq!(l.pending("a"), 3);
        // A read begun after the request finished is the truth: here, confirmed by the leader.
        assert!(!l.begin_read(t0 + REFRESH * 2, REFRESH));
        assert!(l.begin_read(t0 + REFRESH * 3, REFRESH));
        l.read_done(read_of(&[("a", "other", 1)]));
        assert_eq!(l.pending("a"), 1);
    }

    #[test]
    fn a_rolled_back_request_frees_its_room_and_one_in_flight_outlives_reads() {
        let mut l = Ledger::default();
        let t0 = Instant::now();
        l.admit(&svc("a", "x"), 4, 10).unwrap();
        l.admit(&svc("a", "y"), 3, 10).unwrap();
        assert_eq!(l.pending("a"), 7);
        l.finished(&svc("a", "x"), 4, false);
        assert_eq!(l.pending("a"), 3);
        assert!(l.begin_read(t0, REFRESH));
        l.read_done(Counts::new());
        assert!(l.begin_read(t0 + REFRESH, REFRESH));
        l.read_done(Counts::new());
        // Still allocating: however many reads land without its reservations, it counts.
        assert_eq!(l.pending("a"), 3);
    }

    #[test]
    fn one_read_at_a_time_and_a_failed_one_keeps_every_admission() {
        let mut l = Ledger::default();
        let t0 = Instant::now();
        assert!(l.begin_read(t0, REFRESH));
        assert!(l.reading());
        // A read still in flight a period later is not joined by a second one.
        assert!(!l.begin_read(t0 + REFRESH * 2, REFRESH));
        l.admit(&svc("a", "x"), 2, 10).unwrap();
        l.finished(&svc("a", "x"), 2, true);
        l.read_failed();
        assert!(!l.reading());
        assert_eq!(l.pending("a"), 2);
        // The failed read began at t0: the next is due a period after that.
        assert!(!l.begin_read(t0 + Duration::from_secs(1), REFRESH));
        assert!(l.begin_read(t0 + REFRESH, REFRESH));
        l.read_done(Counts::new());
        assert_eq!(l.pending("a"), 0);
    }

    #[test]
    fn only_unexpired_readable_reservations_count() {
        let ttl = Duration::from_secs(60);
        let now = 1_000_000;
        let mut unreadable = listed("a", now);
        unreadable.reservation = None;
        let all = [
            listed("a", now - 1_000),
            listed("a", now - 60_000),
            listed("b", now),
            unreadable,
        ];
        let mut counts = Counts::new();
        count(&mut counts, &all, now, ttl);
        count(&mut counts, &all[..1], now, ttl);
        assert_eq!(counts, read_of(&[("a", "s", 2), ("b", "s", 1)]));
    }
}
