//! A bound on what one namespace may hold in pending reservations.
//!
//! Reservations return what a refused, timed-out or forged request took, but only after their
//! TTL: one namespace creating Services that are refused after the webhook (or a caller forging
//! reviews for it) could otherwise keep a small range such as the NodePorts drained, one TTL at a
//! time. So a replica refuses a request when the namespace already has `limit` values reserved
//! and not yet confirmed.
//!
//! The count is an estimate that errs little and on the side of admitting: etcd's unexpired
//! reservations per namespace, read at most every [`REFRESH`] by each replica, plus what this
//! replica admitted since. Another replica's admissions since that read, and commits in flight
//! during it, are missed, so a namespace can exceed the limit by what the replicas admit for it
//! in one refresh period; legitimate Services are confirmed by the leader within seconds, so
//! they hardly count. Expired reservations do not count: they are being freed (and without a
//! leader to confirm anything, a namespace is not locked out for longer than one TTL).
//!
//! This module is the pure part: the ledger and the count.

use std::{
    collections::HashMap,
    time::{Duration, Instant},
};

use crate::reservation::Listed;

/// How old the ledger's read of etcd may be before a request refreshes it.
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

/// Pending values per namespace, as last read and since.
#[derive(Debug, Default)]
pub struct Ledger {
    /// Unexpired reservations per namespace at the last read of etcd.
    read: HashMap<String, usize>,
    /// Values this replica admitted since that read.
    since: HashMap<String, usize>,
    read_at: Option<Instant>,
}

impl Ledger {
    /// Whether the last read is older than `every` at `now` (or there was none).
    pub fn stale(&self, now: Instant, every: Duration) -> bool {
        self.read_at
            .is_none_or(|at| now.saturating_duration_since(at) >= every)
    }

    /// A new read of etcd: it includes what this replica admitted before it.
    pub fn refreshed(&mut self, read: HashMap<String, usize>, now: Instant) {
        self.read = read;
        self.since.clear();
        self.read_at = Some(now);
    }

    /// Admits `wanted` more values for `namespace`, or says why not.
    pub fn admit(&mut self, namespace: &str, wanted: usize, limit: usize) -> Result<(), TooManyPending> {
        let pending = self.pending(namespace);
        if pending.saturating_add(wanted) > limit {
            return Err(TooManyPending {
                namespace: namespace.to_owned(),
                pending,
                wanted,
                limit,
            });
        }
        *self.since.entry(namespace.to_owned()).or_default() += wanted;
        Ok(())
    }

    /// A read of etcd failed at `now`: the figures of the last one stand, and the next read is
    /// a period away (requests must not each wait on a slow etcd in turn).
    pub fn read_failed(&mut self, now: Instant) {
        self.read_at = Some(now);
    }

    /// Takes back an admission whose request got nothing (it failed and was rolled back).
    pub fn undo(&mut self, namespace: &str, wanted: usize) {
        if let Some(n) = self.since.get_mut(namespace) {
            *n = n.saturating_sub(wanted);
        }
    }

    pub fn pending(&self, namespace: &str) -> usize {
        self.read.get(namespace).copied().unwrap_or(0) + self.since.get(namespace).copied().unwrap_or(0)
    }
}

/// Adds the unexpired reservations of `listed` at `now_ms` to `counts`, by namespace.
pub fn count<V>(counts: &mut HashMap<String, usize>, listed: &[Listed<V>], now_ms: u64, ttl: Duration) {
    for l in listed {
        if let Some(r) = &l.reservation
            && !l.expired(now_ms, ttl)
        {
            *counts.entry(r.namespace.clone()).or_default() += 1;
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

    #[test]
    fn a_namespace_is_refused_past_its_limit_and_others_are_not() {
        let mut l = Ledger::default();
        l.refreshed([("a".to_owned(), 8)].into(), Instant::now());
        assert_eq!(l.admit("a", 2, 10), Ok(()));
        let err = l.admit("a", 1, 10).unwrap_err();
        assert_eq!((err.pending, err.wanted, err.limit), (10, 1, 10));
        assert!(
            err.to_string()
                .contains("--max-pending-allocations-per-namespace"),
            "{err}"
        );
        assert_eq!(l.admit("b", 10, 10), Ok(()));
        // One request larger than the limit is refused even in an empty namespace.
        assert!(l.admit("c", 11, 10).is_err());
    }

    #[test]
    fn undone_admissions_free_room_and_a_read_replaces_what_was_admitted_since() {
        let mut l = Ledger::default();
        let t0 = Instant::now();
        l.refreshed(HashMap::new(), t0);
        l.admit("a", 10, 10).unwrap();
        l.undo("a", 4);
        assert_eq!(l.pending("a"), 6);
        // The next read includes this replica's admissions (stored by then) or not (confirmed).
        assert!(!l.stale(t0 + Duration::from_secs(1), REFRESH));
        assert!(l.stale(t0 + REFRESH, REFRESH));
        l.refreshed([("a".to_owned(), 3)].into(), t0 + REFRESH);
        assert_eq!(l.pending("a"), 3);
        l.undo("a", 100);
        assert_eq!(l.pending("a"), 3);
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
        let mut counts = HashMap::new();
        count(&mut counts, &all, now, ttl);
        count(&mut counts, &all[..1], now, ttl);
        assert_eq!(counts, [("a".to_owned(), 2), ("b".to_owned(), 1)].into());
    }
}
