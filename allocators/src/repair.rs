//! One pass of the repair controller over one range, as a pure function: the bitmap rebuilt from
//! the values Services actually hold, and what was found on the way.
//!
//! Upstream's rules (kube-apiserver's repair loops): a value in use but not marked is marked
//! (`repair`); one held by two Services is reported and left alone (`duplicate`: repair cannot
//! know which Service should give it up); one outside the range is reported (`out-of-range`);
//! a value marked but used by no Service is a leak, released only after it has been seen leaked
//! in three consecutive passes, since an allocation whose Service is still being created looks
//! exactly like a leak for a moment. Here every value the webhook hands out carries a reservation
//! record ([`crate::reservation`]) until its Service is seen stored, so the moment is visible:
//! a value with an unexpired reservation is in flight and left marked; a marked value no Service
//! holds and no record covers was confirmed for a Service that has gone since (deleted while no
//! leader watched, or while the leader's release could not be made) and is an orphan, released
//! at once. That holds if no reservation was confirmed between the list of the Services and the
//! read of the records, which the caller guarantees (`Ranges::repair_gate`), and only for values
//! the leader's watch neither shows a Service holding nor has a release pending for: those are
//! the watch's to release, and freeing one here too would free it again, later, after it was
//! handed out anew. (A watch lagging by more than the reservation TTL could still miss a
//! Service altogether; the watch is consistent and seconds behind at most in practice.) A
//! value whose reservation expired is the sweeper's to free; repair counts it as a leak, as a
//! backstop.

use std::{
    collections::{HashMap, HashSet},
    hash::Hash,
};

use crate::{policy::Allocation, range::Range};

/// Consecutive passes a leak must be seen in before it is released.
pub const LEAK_SIGHTINGS_BEFORE_RELEASE: u32 = 3;

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Finding<S, V> {
    /// In use by `service` but not marked: marked now.
    NotAllocated { service: S, value: V },
    /// Held by both Services; reported, not changed.
    Duplicate { service: S, other: S, value: V },
    /// Held by `service` but outside the range.
    OutOfRange { service: S, value: V },
    /// Marked, unused, and with no reservation record: released at once.
    Orphan { value: V },
    /// Marked but unused with an expired reservation; `released` once seen in enough
    /// consecutive passes.
    Leak {
        value: V,
        sightings: u32,
        released: bool,
    },
}

impl<S, V> Finding<S, V> {
    /// The label upstream's repair metrics use for this kind of finding.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::NotAllocated { .. } => "repair",
            Self::Duplicate { .. } => "duplicate",
            Self::OutOfRange { .. } => "outOfRange",
            Self::Orphan { .. } | Self::Leak { .. } => "leak",
        }
    }
}

/// The outcome of one pass.
#[derive(Debug)]
pub struct Pass<R: Range, S> {
    pub rebuilt: Allocation<R>,
    pub findings: Vec<Finding<S, R::Value>>,
}

/// What the range's reservation records say, read with the bitmap, and what the leader's watch
/// knows.
#[derive(Debug)]
pub struct Records<V> {
    /// Values with an unexpired reservation: handed out, their Service not stored yet.
    pub reserved: HashSet<V>,
    /// Values with any record, expired or not.
    pub recorded: HashSet<V>,
    /// Whether orphans can be told: the leader's watch has its first list.
    pub orphans_known: bool,
    /// Values the watch shows a Service holding, or has a release pending for.
    pub watched: HashSet<V>,
}

impl<V> Default for Records<V> {
    fn default() -> Self {
        Self {
            reserved: HashSet::new(),
            recorded: HashSet::new(),
            orphans_known: true,
            watched: HashSet::new(),
        }
    }
}

/// Rebuilds `stored` from `in_use` (every value some Service holds, with that Service; values of
/// other ranges may be included, they are skipped if `belongs` says so) and `records`. `leaks`
/// carries the consecutive sightings of each leaked value from pass to pass.
pub fn repair_pass<R, S>(
    stored: &Allocation<R>,
    in_use: &[(S, R::Value)],
    belongs: impl Fn(&R::Value) -> bool,
    records: &Records<R::Value>,
    leaks: &mut HashMap<R::Value, u32>,
) -> Pass<R, S>
where
    R: Range + Clone,
    R::Value: Hash,
    S: Clone + PartialEq,
{
    let mut rebuilt = Allocation::new(stored.range().clone());
    let mut holder: HashMap<R::Value, S> = HashMap::new();
    let mut findings = Vec::new();
    for (service, value) in in_use {
        if !belongs(value) {
            continue;
        }
        if rebuilt.range().offset_of(*value).is_err() {
            findings.push(Finding::OutOfRange {
                service: service.clone(),
                value: *value,
            });
            continue;
        }
        match holder.get(value) {
            Some(other) if other != service => {
                findings.push(Finding::Duplicate {
                    service: service.clone(),
                    other: other.clone(),
                    value: *value,
                });
                continue;
            }
            Some(_) => continue, // the same Service listing a value twice (e.g. TCP and UDP)
            None => {}
        }
        holder.insert(*value, service.clone());
        let _ = rebuilt.allocate(*value, "value");
        if !stored.has(*value) {
            findings.push(Finding::NotAllocated {
                service: service.clone(),
                value: *value,
            });
        }
    }
    // Marked in storage, used by nobody.
    let mut still_leaking = HashMap::new();
    for value in stored.values() {
        if holder.contains_key(&value) {
            continue;
        }
        if records.reserved.contains(&value) {
            let _ = rebuilt.allocate(value, "value");
            continue;
        }
        if !records.recorded.contains(&value) {
            if records.orphans_known && !records.watched.contains(&value) {
                findings.push(Finding::Orphan { value });
            } else {
                // The watch's to release (or, before its first list, not yet known).
                let _ = rebuilt.allocate(value, "value");
            }
            continue;
        }
        let sightings = leaks.get(&value).copied().unwrap_or(0) + 1;
        let released = sightings >= LEAK_SIGHTINGS_BEFORE_RELEASE;
        if !released {
            let _ = rebuilt.allocate(value, "value");
            still_leaking.insert(value, sightings);
        }
        findings.push(Finding::Leak {
            value,
            sightings,
            released,
        });
    }
    *leaks = still_leaking;
    Pass { rebuilt, findings }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::range::PortRange;

    fn range() -> PortRange {
        "30000-30099".parse().unwrap()
    }

    fn stored(marked: &[u16]) -> Allocation<PortRange> {
        let mut a = Allocation::new(range());
        for p in marked {
            a.allocate(*p, "port").unwrap();
        }
        a
    }

    #[test]
    fn marks_missing_reports_duplicates_and_out_of_range() {
        let mut leaks = HashMap::new();
        let in_use = [
            ("a", 30001),
            ("b", 30002),
            ("c", 30002),
            ("d", 40000),
            ("a", 30001),
        ];
        let pass = repair_pass(
            &stored(&[30001]),
            &in_use,
            |_| true,
            &Records::default(),
            &mut leaks,
        );
        assert_eq!(pass.rebuilt.values().collect::<Vec<_>>(), [30001, 30002]);
        assert_eq!(
            pass.findings,
            [
                Finding::NotAllocated {
                    service: "b",
                    value: 30002
                },
                Finding::Duplicate {
                    service: "c",
                    other: "b",
                    value: 30002
                },
                Finding::OutOfRange {
                    service: "d",
                    value: 40000
                },
            ]
        );
        assert_eq!(
            pass.findings.iter().map(Finding::kind).collect::<Vec<_>>(),
            ["repair", "duplicate", "outOfRange"]
        );
    }

    /// 30005's reservation expired: the sweeper's to free; repair counts it as a leak.
    fn expired(values: &[u16]) -> Records<u16> {
        Records {
            recorded: values.iter().copied().collect(),
            ..Records::default()
        }
    }

    #[test]
    fn leaks_are_released_on_the_third_consecutive_sighting() {
        let mut leaks = HashMap::new();
        let mut current = stored(&[30005, 30006]);
        let in_use = [("a", 30006)];
        for pass_no in 1..=3u32 {
            let pass = repair_pass(&current, &in_use, |_| true, &expired(&[30005]), &mut leaks);
            let released = pass_no == 3;
            assert_eq!(
                pass.findings,
                [Finding::Leak {
                    value: 30005,
                    sightings: pass_no,
                    released
                }]
            );
            assert_eq!(pass.rebuilt.has(30005), !released, "pass {pass_no}");
            current = pass.rebuilt;
        }
        assert!(leaks.is_empty());
        assert_eq!(current.values().collect::<Vec<_>>(), [30006]);
    }

    #[test]
    fn a_leak_that_turns_out_used_starts_over() {
        let mut leaks = HashMap::new();
        let s = stored(&[30005]);
        let records = expired(&[30005]);
        repair_pass(&s, &[] as &[(&str, u16)], |_| true, &records, &mut leaks);
        assert_eq!(leaks.get(&30005), Some(&1));
        // The Service whose create was in flight is now stored.
        let pass = repair_pass(&s, &[("late", 30005)], |_| true, &records, &mut leaks);
        assert!(pass.findings.is_empty());
        assert!(leaks.is_empty());
        // Leaked again later: counting restarts from one.
        let pass = repair_pass(&s, &[] as &[(&str, u16)], |_| true, &records, &mut leaks);
        assert_eq!(
            pass.findings,
            [Finding::Leak {
                value: 30005,
                sightings: 1,
                released: false
            }]
        );
    }

    #[test]
    fn a_reserved_value_is_in_flight_not_leaked() {
        let mut leaks = HashMap::new();
        let s = stored(&[30001, 30002]);
        // 30001 is reserved (its Service not stored yet), 30002 is not: only 30002 is a leak,
        // however many passes see 30001 unheld.
        for sightings in 1..=LEAK_SIGHTINGS_BEFORE_RELEASE {
            let records = Records {
                reserved: [30001].into(),
                recorded: [30001, 30002].into(),
                ..Records::default()
            };
            let pass = repair_pass(&s, &[] as &[(&str, u16)], |_| true, &records, &mut leaks);
            assert!(pass.rebuilt.has(30001));
            assert_eq!(
                pass.findings,
                [Finding::Leak {
                    value: 30002,
                    sightings,
                    released: sightings == LEAK_SIGHTINGS_BEFORE_RELEASE
                }]
            );
        }
        assert!(!leaks.contains_key(&30001));
    }

    #[test]
    fn values_of_other_ranges_are_skipped() {
        let mut leaks = HashMap::new();
        let pass = repair_pass(
            &stored(&[]),
            &[("a", 12345u16), ("b", 30001)],
            |p| *p >= 30000,
            &Records::default(),
            &mut leaks,
        );
        assert_eq!(
            pass.findings,
            [Finding::NotAllocated {
                service: "b",
                value: 30001
            }]
        );
    }

    #[test]
    fn a_marked_value_without_holder_or_record_is_an_orphan_released_at_once() {
        let mut leaks = HashMap::new();
        // 30007's Service was confirmed, then deleted while no leader watched.
        let pass = repair_pass(
            &stored(&[30006, 30007]),
            &[("a", 30006)],
            |_| true,
            &Records::default(),
            &mut leaks,
        );
        assert_eq!(pass.findings, [Finding::Orphan { value: 30007 }]);
        assert_eq!(pass.findings[0].kind(), "leak");
        assert_eq!(pass.rebuilt.values().collect::<Vec<_>>(), [30006]);
        assert!(leaks.is_empty());
    }

    #[test]
    fn an_orphan_the_watch_knows_of_is_left_to_its_release() {
        let mut leaks = HashMap::new();
        let s = stored(&[30007, 30008]);
        // 30007: the watch still shows its Service, or has its release queued.
        let records = Records {
            watched: [30007].into(),
            ..Records::default()
        };
        let pass = repair_pass(&s, &[] as &[(&str, u16)], |_| true, &records, &mut leaks);
        assert_eq!(pass.findings, [Finding::Orphan { value: 30008 }]);
        assert!(pass.rebuilt.has(30007) && !pass.rebuilt.has(30008));
        // Before the watch's first list nothing is known to be orphaned.
        let before = Records {
            orphans_known: false,
            ..Records::default()
        };
        let pass = repair_pass(&s, &[] as &[(&str, u16)], |_| true, &before, &mut leaks);
        assert!(pass.findings.is_empty());
        assert_eq!(pass.rebuilt.values().collect::<Vec<_>>(), [30007, 30008]);
    }
}
