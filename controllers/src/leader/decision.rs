use std::time::Duration;

use k8s_openapi::jiff::Timestamp;
use tokio::time::Instant;

use super::{ElectionConfig, LeaseRecord};

/// A lease record together with the local instant at which this replica first saw it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Observation {
    pub record: LeaseRecord,
    pub at: Instant,
}

/// Remembers when the lease record last changed, which is what expiry is measured from.
#[derive(Debug, Default)]
pub struct Observer {
    last: Option<Observation>,
}

impl Observer {
    /// Records `record` as seen at `now`. An unchanged record keeps its first observation time:
    /// a holder that stopped renewing must not look fresh because we keep reading it.
    pub fn observe(&mut self, record: LeaseRecord, now: Instant) -> &Observation {
        match self.last.take() {
            Some(seen) if seen.record == record => self.last.insert(seen),
            _ => self.last.insert(Observation { record, at: now }),
        }
    }

    pub fn last(&self) -> Option<&Observation> {
        self.last.as_ref()
    }
}

/// What a candidate does after reading the lease.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decision {
    /// Another replica holds a lease that has not expired as far as this replica has seen.
    Wait { holder: String, expires_at: Instant },
    /// Write this record: a renewal when this replica already holds the lease, an acquisition
    /// otherwise (create when there was no lease, else replace under the read resourceVersion).
    Write(LeaseRecord),
}

/// Decides between waiting and writing. `now` is the monotonic clock, `wall` the wall clock that
/// goes into `acquireTime`/`renewTime` for humans and other tools; only `now` judges expiry.
pub fn decide(
    observed: Option<&Observation>,
    cfg: &ElectionConfig,
    now: Instant,
    wall: Timestamp,
) -> Decision {
    if let Some(obs) = observed
        && let Some(holder) = obs.record.holder.as_deref().filter(|h| *h != cfg.identity)
    {
        let expires_at = obs.at + observed_duration(&obs.record, cfg);
        if now < expires_at {
            return Decision::Wait {
                holder: holder.to_owned(),
                expires_at,
            };
        }
    }
    Decision::Write(claim(observed.map(|o| &o.record), cfg, wall))
}

/// The record that makes this replica the holder, given the record it replaces (`None` when no
/// lease exists yet). Renewals keep the acquire time and transition count; takeovers count one.
pub fn claim(old: Option<&LeaseRecord>, cfg: &ElectionConfig, wall: Timestamp) -> LeaseRecord {
    let me = cfg.identity.as_str();
    let (acquire_time, transitions) = match old {
        None => (wall, 0),
        Some(old) if old.is_held_by(me) => (old.acquire_time.unwrap_or(wall), old.transitions),
        Some(old) => (wall, old.transitions.saturating_add(1)),
    };
    LeaseRecord {
        holder: Some(me.to_owned()),
        lease_duration_seconds: Some(cfg.lease_duration_seconds()),
        acquire_time: Some(acquire_time),
        renew_time: Some(wall),
        transitions,
    }
}

/// The record a leader writes when it gives the lease up: no holder and a one-second duration,
/// as client-go's `ReleaseOnCancel` writes, so any candidate takes over at its next retry.
pub fn released(held: &LeaseRecord, wall: Timestamp) -> LeaseRecord {
    LeaseRecord {
        holder: None,
        lease_duration_seconds: Some(1),
        acquire_time: Some(wall),
        renew_time: Some(wall),
        transitions: held.transitions,
    }
}

/// The duration the holder announced; a record without a usable one is judged by our own
/// configuration, which errs towards waiting rather than taking over early.
fn observed_duration(record: &LeaseRecord, cfg: &ElectionConfig) -> Duration {
    record
        .lease_duration_seconds
        .and_then(|s| u64::try_from(s).ok())
        .filter(|s| *s > 0)
        .map_or(cfg.lease_duration, Duration::from_secs)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> ElectionConfig {
        ElectionConfig::new("kube-system", "svcplane", "me")
    }

    fn wall(s: i64) -> Timestamp {
        Timestamp::from_second(1_700_000_000 + s).unwrap()
    }

    fn held_by(holder: &str, duration: Option<i32>, transitions: i32) -> LeaseRecord {
        LeaseRecord {
            holder: Some(holder.into()),
            lease_duration_seconds: duration,
            acquire_time: Some(wall(0)),
            renew_time: Some(wall(5)),
            transitions,
        }
    }

    #[test]
    fn no_lease_creates_one_held_by_me() {
        let t0 = Instant::now();
        let Decision::Write(rec) = decide(None, &cfg(), t0, wall(100)) else {
            panic!("must write")
        };
        assert_eq!(rec.holder.as_deref(), Some("me"));
        assert_eq!(rec.lease_duration_seconds, Some(15));
        assert_eq!(
            (rec.acquire_time, rec.renew_time),
            (Some(wall(100)), Some(wall(100)))
        );
        assert_eq!(rec.transitions, 0);
    }

    #[test]
    fn another_holder_is_waited_out_from_our_observation() {
        let t0 = Instant::now();
        let obs = Observation {
            record: held_by("other", Some(15), 3),
            at: t0,
        };
        let expected = t0 + Duration::from_secs(15);
        for now in [
            t0,
            t0 + Duration::from_secs(14),
            expected - Duration::from_millis(1),
        ] {
            assert_eq!(
                decide(Some(&obs), &cfg(), now, wall(0)),
                Decision::Wait {
                    holder: "other".into(),
                    expires_at: expected
                }
            );
        }
        let Decision::Write(rec) = decide(Some(&obs), &cfg(), expected, wall(30)) else {
            panic!("an expired lease is taken over")
        };
        assert_eq!(rec.holder.as_deref(), Some("me"));
        assert_eq!(rec.transitions, 4, "taking over counts a transition");
        assert_eq!(rec.acquire_time, Some(wall(30)));
    }

    #[test]
    fn holders_wall_clock_renew_time_is_ignored() {
        // A renewTime far in the future (skewed clock) or past must not change the expiry.
        let t0 = Instant::now();
        for renew in [wall(-100_000), wall(100_000)] {
            let mut rec = held_by("other", Some(15), 0);
            rec.renew_time = Some(renew);
            let obs = Observation { record: rec, at: t0 };
            assert!(matches!(
                decide(Some(&obs), &cfg(), t0 + Duration::from_secs(10), wall(0)),
                Decision::Wait { .. }
            ));
            assert!(matches!(
                decide(Some(&obs), &cfg(), t0 + Duration::from_secs(15), wall(0)),
                Decision::Write(_)
            ));
        }
    }

    #[test]
    fn holders_announced_duration_wins_over_ours() {
        let t0 = Instant::now();
        let obs = Observation {
            record: held_by("other", Some(60), 0),
            at: t0,
        };
        assert!(matches!(
            decide(Some(&obs), &cfg(), t0 + Duration::from_secs(59), wall(0)),
            Decision::Wait { .. }
        ));
        for bad in [None, Some(0), Some(-5)] {
            let obs = Observation {
                record: held_by("other", bad, 0),
                at: t0,
            };
            assert_eq!(
                decide(Some(&obs), &cfg(), t0 + Duration::from_secs(1), wall(0)),
                Decision::Wait {
                    holder: "other".into(),
                    expires_at: t0 + Duration::from_secs(15)
                },
                "duration {bad:?} falls back to ours"
            );
        }
    }

    #[test]
    fn released_lease_is_taken_at_once() {
        let t0 = Instant::now();
        let released = LeaseRecord {
            holder: None,
            lease_duration_seconds: Some(1),
            acquire_time: Some(wall(9)),
            renew_time: Some(wall(9)),
            transitions: 7,
        };
        let obs = Observation {
            record: released,
            at: t0,
        };
        let Decision::Write(rec) = decide(Some(&obs), &cfg(), t0, wall(10)) else {
            panic!("a released lease needs no waiting")
        };
        assert_eq!(rec.holder.as_deref(), Some("me"));
        assert_eq!(rec.transitions, 8);
        assert_eq!(rec.acquire_time, Some(wall(10)));
    }

    #[test]
    fn renewal_keeps_acquire_time_and_transitions() {
        let t0 = Instant::now();
        let obs = Observation {
            record: held_by("me", Some(15), 5),
            at: t0,
        };
        // Even long after our own record would have expired, we may renew it: only a write by
        // someone else (which changes the resourceVersion) can take it from us.
        let Decision::Write(rec) = decide(Some(&obs), &cfg(), t0 + Duration::from_secs(100), wall(100))
        else {
            panic!("the holder renews")
        };
        assert_eq!(rec.acquire_time, Some(wall(0)));
        assert_eq!(rec.renew_time, Some(wall(100)));
        assert_eq!(rec.transitions, 5);
        assert_eq!(rec.lease_duration_seconds, Some(15));
    }

    #[test]
    fn release_clears_holder_and_keeps_transitions() {
        let rec = released(&held_by("me", Some(15), 6), wall(50));
        assert_eq!(rec.holder, None);
        assert_eq!(rec.lease_duration_seconds, Some(1));
        assert_eq!(rec.transitions, 6);
        assert_eq!(
            (rec.acquire_time, rec.renew_time),
            (Some(wall(50)), Some(wall(50)))
        );
    }

    #[test]
    fn claim_over_a_lease_without_acquire_time_sets_one() {
        let mut own = held_by("me", Some(15), 1);
        own.acquire_time = None;
        assert_eq!(claim(Some(&own), &cfg(), wall(3)).acquire_time, Some(wall(3)));
    }

    #[test]
    fn transitions_do_not_overflow() {
        let t0 = Instant::now();
        let obs = Observation {
            record: held_by("other", Some(15), i32::MAX),
            at: t0,
        };
        let Decision::Write(rec) = decide(Some(&obs), &cfg(), t0 + Duration::from_secs(15), wall(0)) else {
            panic!()
        };
        assert_eq!(rec.transitions, i32::MAX);
    }

    #[test]
    fn observer_keeps_first_sighting_of_an_unchanged_record() {
        let t0 = Instant::now();
        let mut o = Observer::default();
        assert_eq!(o.observe(held_by("other", Some(15), 0), t0).at, t0);
        let t1 = t0 + Duration::from_secs(4);
        assert_eq!(
            o.observe(held_by("other", Some(15), 0), t1).at,
            t0,
            "unchanged record"
        );
        let mut renewed = held_by("other", Some(15), 0);
        renewed.renew_time = Some(wall(7));
        assert_eq!(o.observe(renewed, t1).at, t1, "a renewal resets the clock");
        assert_eq!(o.last().map(|l| l.at), Some(t1));
    }
}
