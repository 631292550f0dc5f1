//! Reservations: values the webhook handed out that no stored Service is yet known to hold.
//!
//! The webhook allocates in the mutating phase, before schema validation, quota, later webhooks
//! and storage. A request refused after it, timed out or forged would otherwise keep its values
//! until repair had seen them leaked three times (6-9 minutes at the default interval). So every
//! value the webhook hands out is also recorded as a reservation, in the same etcd transaction as
//! the bitmap: who asked for it and when. The leader then
//! - confirms a reservation (deletes the record) once it sees the Service it was made for
//!   holding the value (matched by name too: a value freed and handed out again must not be
//!   confirmed by the Service that held it before);
//! - frees the value of a reservation that reaches its TTL while no stored Service holds it (a
//!   consistent read of the Services), bitmap and record in one fenced transaction.
//!
//! Repair leaves reserved values alone: they are in flight, not leaked.
//!
//! Ages compare the allocating replica's clock with the leader's. A skew of seconds against a
//! TTL of a minute only moves the moment a leak is freed; what makes freeing safe is the check
//! against the stored Services, not the clock.
//!
//! This module is the pure part: the record, and the verdict on each listed reservation.

use std::{collections::HashSet, hash::Hash, time::Duration};

use serde::{Deserialize, Serialize};

/// Who a value was handed out to.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reservation {
    pub namespace: String,
    /// Empty for a create by `generateName` (the name is chosen after admission).
    #[serde(default)]
    pub name: String,
    /// The value, for people reading etcd.
    pub value: String,
    /// When it was made: Unix time in milliseconds, by the allocating replica's clock.
    pub at_ms: u64,
}

/// The Service a request is for, as the webhook knows it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct Requester {
    pub namespace: String,
    pub name: String,
}

impl Requester {
    pub fn reserve(&self, value: impl std::fmt::Display, at_ms: u64) -> Reservation {
        Reservation {
            namespace: self.namespace.clone(),
            name: self.name.clone(),
            value: value.to_string(),
            at_ms,
        }
    }
}

pub fn encode(r: &Reservation) -> Vec<u8> {
    // A struct of strings and a number always serializes.
    serde_json::to_vec(r).unwrap_or_default()
}

/// `None` for a record that does not decode (written by something else): it is treated as
/// expired, so it is checked against the Services like any other.
pub fn decode(bytes: &[u8]) -> Option<Reservation> {
    serde_json::from_slice(bytes).ok()
}

/// Now, in the unit reservations carry.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// A reservation as listed from etcd.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Listed<V> {
    pub value: V,
    pub key: String,
    pub mod_revision: i64,
    pub reservation: Option<Reservation>,
}

impl<V> Listed<V> {
    /// Whether it has been held longer than `ttl` at `now_ms` (an unreadable record has).
    pub fn expired(&self, now_ms: u64, ttl: Duration) -> bool {
        let ttl = u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX);
        self.reservation
            .as_ref()
            .is_none_or(|r| now_ms.saturating_sub(r.at_ms) >= ttl)
    }
}

/// What becomes of a listed reservation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Still in flight.
    Keep,
    /// A Service holds the value: the record goes, the value stays allocated.
    Confirm,
    /// Expired and no stored Service holds the value: freed, record and all.
    Free,
}

/// The verdict on `listed`. `requester_holds`: the leader's view of the Services (its watch)
/// shows the Service the value was reserved for holding it: enough to confirm, never to free.
/// `stored`: what the stored Services hold, from a consistent read, once the reservation has
/// expired (`None` when not read); an expired reservation without it is kept until it can be
/// checked.
pub fn verdict<V: Eq + Hash>(
    listed: &Listed<V>,
    requester_holds: bool,
    stored: Option<&HashSet<V>>,
    now_ms: u64,
    ttl: Duration,
) -> Verdict {
    if requester_holds {
        return Verdict::Confirm;
    }
    if !listed.expired(now_ms, ttl) {
        return Verdict::Keep;
    }
    match stored {
        None => Verdict::Keep,
        // Held by any stored Service: whoever holds it, freeing it would hand it out twice.
        Some(held) if held.contains(&listed.value) => Verdict::Confirm,
        Some(_) => Verdict::Free,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TTL: Duration = Duration::from_secs(60);

    fn listed(value: u16, at_ms: Option<u64>) -> Listed<u16> {
        Listed {
            value,
            key: format!("/r/{value}"),
            mod_revision: 7,
            reservation: at_ms.map(|at_ms| Requester::default().reserve(value, at_ms)),
        }
    }

    #[test]
    fn a_record_round_trips_and_garbage_does_not_decode() {
        let r = Requester {
            namespace: "ns".into(),
            name: "web".into(),
        }
        .reserve("10.96.0.5", 1_700_000_000_000);
        assert_eq!(decode(&encode(&r)), Some(r));
        assert_eq!(decode(b"not json"), None);
        // A record without a name (generateName) decodes.
        assert!(decode(br#"{"namespace":"ns","value":"30080","at_ms":1}"#).is_some());
    }

    #[test]
    fn expiry_is_measured_from_the_record_and_tolerates_a_clock_ahead() {
        let now = 1_000_000;
        assert!(!listed(1, Some(now - 59_999)).expired(now, TTL));
        assert!(listed(1, Some(now - 60_000)).expired(now, TTL));
        // Made by a replica whose clock runs ahead: not expired, not an overflow.
        assert!(!listed(1, Some(now + 5_000)).expired(now, TTL));
        // Unreadable: checked like an expired one.
        assert!(listed(1, None).expired(now, TTL));
    }

    #[test]
    fn verdicts() {
        let now = 1_000_000;
        let none = HashSet::new();
        let fresh = listed(30080, Some(now - 1_000));
        let old = listed(30081, Some(now - 61_000));
        // Its Service seen holding it: confirmed, however old.
        assert_eq!(verdict(&fresh, true, None, now, TTL), Verdict::Confirm);
        assert_eq!(verdict(&old, true, None, now, TTL), Verdict::Confirm);
        // In flight.
        assert_eq!(verdict(&fresh, false, None, now, TTL), Verdict::Keep);
        assert_eq!(verdict(&fresh, false, Some(&none), now, TTL), Verdict::Keep);
        // Expired: only the stored Services decide, and only once read.
        assert_eq!(verdict(&old, false, None, now, TTL), Verdict::Keep);
        assert_eq!(
            verdict(&old, false, Some(&[30081].into()), now, TTL),
            Verdict::Confirm
        );
        assert_eq!(
            verdict(&old, false, Some(&[30080].into()), now, TTL),
            Verdict::Free
        );
    }
}
