//! Guards against acting on a cache that has not yet seen this controller's own writes.
//!
//! After every write the generation the apiserver returned is remembered per slice (deletes as
//! "deletion expected"). A sync whose cached slices are older than that, or lack a slice that was
//! written, or still hold a slice that was deleted, would compute from the past and write
//! duplicates or conflicts; it waits for the cache instead. Slice events at or below a remembered
//! generation are this controller's own echoes and need no sync.

use std::collections::HashMap;

use k8s_openapi::api::discovery::v1::EndpointSlice;

use crate::model::{LABEL_MANAGED_BY, LABEL_SERVICE_NAME, ObjectKey};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Expect {
    Generation(i64),
    Deletion,
}

#[derive(Debug, Default)]
pub struct SliceTracker {
    by_service: HashMap<ObjectKey, HashMap<String, Expect>>,
}

/// The Service a slice belongs to, by its service-name label.
pub fn service_of(slice: &EndpointSlice) -> Option<ObjectKey> {
    let name = slice.metadata.labels.as_ref()?.get(LABEL_SERVICE_NAME)?;
    Some(ObjectKey::new(
        slice.metadata.namespace.clone().unwrap_or_default(),
        name.clone(),
    ))
}

/// The controller that manages a slice, by its managed-by label.
pub fn manager_of(slice: &EndpointSlice) -> Option<&str> {
    slice
        .metadata
        .labels
        .as_ref()?
        .get(LABEL_MANAGED_BY)
        .map(String::as_str)
}

fn uid(slice: &EndpointSlice) -> Option<&str> {
    slice.metadata.uid.as_deref()
}

fn generation(slice: &EndpointSlice) -> i64 {
    slice.metadata.generation.unwrap_or(0)
}

impl SliceTracker {
    /// Records a slice as returned by a create or update.
    pub fn wrote(&mut self, slice: &EndpointSlice) {
        if let (Some(svc), Some(uid)) = (service_of(slice), uid(slice)) {
            self.by_service
                .entry(svc)
                .or_default()
                .insert(uid.to_owned(), Expect::Generation(generation(slice)));
        }
    }

    /// Records a slice this controller deleted.
    pub fn deleted(&mut self, slice: &EndpointSlice) {
        if let (Some(svc), Some(uid)) = (service_of(slice), uid(slice)) {
            self.by_service
                .entry(svc)
                .or_default()
                .insert(uid.to_owned(), Expect::Deletion);
        }
    }

    /// Whether an add/update event of `slice` needs a sync: it is unknown or someone else wrote a
    /// newer generation than ours.
    pub fn should_sync(&self, slice: &EndpointSlice) -> bool {
        let Some(expect) = service_of(slice)
            .and_then(|svc| self.by_service.get(&svc))
            .and_then(|m| m.get(uid(slice)?))
        else {
            return true;
        };
        match expect {
            Expect::Generation(g) => generation(slice) > *g,
            Expect::Deletion => true,
        }
    }

    /// Handles a delete event; `true` when it needs a sync (it was not our own delete).
    pub fn observe_deletion(&mut self, slice: &EndpointSlice) -> bool {
        let Some(svc) = service_of(slice) else { return true };
        let Some(map) = self.by_service.get_mut(&svc) else {
            return true;
        };
        match uid(slice).and_then(|u| map.remove(u)) {
            Some(Expect::Deletion) => false,
            Some(Expect::Generation(_)) => true,
            None => true,
        }
    }

    /// Whether `cached` (the cache's slices of `svc`) predates writes this controller made.
    pub fn is_stale(&self, svc: &ObjectKey, cached: &[&EndpointSlice]) -> bool {
        let Some(expected) = self.by_service.get(svc) else {
            return false;
        };
        let mut seen = 0;
        for slice in cached {
            let Some(exp) = uid(slice).and_then(|u| expected.get(u)) else {
                continue;
            };
            match exp {
                Expect::Deletion => return true,
                Expect::Generation(g) if generation(slice) < *g => return true,
                Expect::Generation(_) => seen += 1,
            }
        }
        let written = expected
            .values()
            .filter(|e| matches!(e, Expect::Generation(_)))
            .count();
        seen < written
    }

    /// Forgets a Service (deleted, or a new incarnation under the same name).
    pub fn forget(&mut self, svc: &ObjectKey) {
        self.by_service.remove(svc);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

    fn slice(uid: &str, generation: i64) -> EndpointSlice {
        EndpointSlice {
            metadata: ObjectMeta {
                namespace: Some("ns".into()),
                name: Some(format!("web-{uid}")),
                uid: Some(uid.into()),
                generation: Some(generation),
                labels: Some([(LABEL_SERVICE_NAME.to_owned(), "web".to_owned())].into()),
                ..Default::default()
            },
            address_type: "IPv4".into(),
            ..Default::default()
        }
    }

    fn web() -> ObjectKey {
        ObjectKey::new("ns", "web")
    }

    #[test]
    fn own_writes_are_not_resynced_but_foreign_ones_are() {
        let mut t = SliceTracker::default();
        assert!(t.should_sync(&slice("a", 1)), "unknown slices sync");
        t.wrote(&slice("a", 2));
        assert!(!t.should_sync(&slice("a", 2)), "echo of our write");
        assert!(!t.should_sync(&slice("a", 1)), "older than our write");
        assert!(t.should_sync(&slice("a", 3)), "someone else wrote after us");
    }

    #[test]
    fn stale_cache_is_detected_until_it_catches_up() {
        let mut t = SliceTracker::default();
        assert!(!t.is_stale(&web(), &[&slice("a", 1)]), "nothing written yet");
        t.wrote(&slice("a", 2));
        t.wrote(&slice("b", 1));
        assert!(
            t.is_stale(&web(), &[&slice("a", 1), &slice("b", 1)]),
            "a is behind"
        );
        assert!(t.is_stale(&web(), &[&slice("a", 2)]), "b not seen yet");
        assert!(!t.is_stale(&web(), &[&slice("a", 2), &slice("b", 1)]));
        assert!(
            !t.is_stale(&web(), &[&slice("a", 3), &slice("b", 1)]),
            "newer is fine"
        );

        t.deleted(&slice("b", 1));
        assert!(
            t.is_stale(&web(), &[&slice("a", 2), &slice("b", 1)]),
            "deleted slice still cached"
        );
        assert!(!t.is_stale(&web(), &[&slice("a", 2)]));
    }

    #[test]
    fn deletion_events_of_our_deletes_need_no_sync() {
        let mut t = SliceTracker::default();
        t.wrote(&slice("a", 1));
        t.deleted(&slice("b", 1));
        assert!(!t.observe_deletion(&slice("b", 1)), "our delete");
        assert!(
            t.observe_deletion(&slice("a", 1)),
            "someone deleted a slice we wrote"
        );
        assert!(t.observe_deletion(&slice("c", 1)), "unknown slice");
        assert!(
            !t.is_stale(&web(), &[]),
            "a's deletion was observed, nothing expected any more"
        );
    }

    #[test]
    fn forgetting_a_service_clears_its_expectations() {
        let mut t = SliceTracker::default();
        t.wrote(&slice("a", 5));
        t.forget(&web());
        assert!(!t.is_stale(&web(), &[]));
        assert!(t.should_sync(&slice("a", 5)));
    }

    #[test]
    fn slices_without_identity_are_ignored() {
        let mut t = SliceTracker::default();
        let mut s = slice("a", 1);
        s.metadata.labels = None;
        t.wrote(&s);
        assert!(t.should_sync(&s));
        assert!(t.observe_deletion(&s));
    }
}
