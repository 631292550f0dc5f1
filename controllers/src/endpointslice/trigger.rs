//! The `endpoints.kubernetes.io/last-change-trigger-time` value, as upstream computes it: the
//! earliest change, since the previous sync, among the Service's creation and its Pods' Ready
//! transitions. kube-proxy measures network programming latency from it.

use std::collections::HashMap;

use k8s_openapi::jiff::Timestamp;

use crate::model::{ObjectKey, PodView, ServiceView};

#[derive(Debug, Default)]
struct State {
    service: Option<Timestamp>,
    pods: HashMap<String, Timestamp>,
}

#[derive(Debug, Default)]
pub struct TriggerTimes {
    services: HashMap<ObjectKey, State>,
}

impl TriggerTimes {
    /// The trigger time for this sync, remembering what was seen. A Service seen for the first
    /// time reports its creation; `None` when nothing advanced (the annotation is then removed).
    pub fn compute(&mut self, svc: &ServiceView, pods: &[&PodView]) -> Option<Timestamp> {
        let key = svc.key();
        let known = self.services.contains_key(&key);
        let state = self.services.entry(key).or_default();
        let mut earliest: Option<Timestamp> = None;
        let mut seen = HashMap::with_capacity(pods.len());
        for pod in pods {
            let Some(t) = pod.ready_transition else { continue };
            if state.pods.get(&pod.name).is_none_or(|last| t > *last) {
                earliest = Some(earliest.map_or(t, |e| e.min(t)));
            }
            seen.insert(pod.name.clone(), t);
        }
        if let Some(t) = svc.creation_timestamp
            && state.service.is_none_or(|last| t > last)
        {
            earliest = Some(earliest.map_or(t, |e| e.min(t)));
        }
        state.pods = seen;
        state.service = svc.creation_timestamp;
        if known { earliest } else { svc.creation_timestamp }
    }

    pub fn forget(&mut self, svc: &ObjectKey) {
        self.services.remove(svc);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ts(s: i64) -> Timestamp {
        Timestamp::from_second(1_700_000_000 + s).unwrap()
    }

    fn pod(name: &str, t: Option<i64>) -> PodView {
        PodView {
            name: name.into(),
            ready_transition: t.map(ts),
            ..Default::default()
        }
    }

    #[test]
    fn first_sync_reports_creation_then_only_advances() {
        let svc = ServiceView {
            namespace: "ns".into(),
            name: "web".into(),
            creation_timestamp: Some(ts(0)),
            ..Default::default()
        };
        let mut tt = TriggerTimes::default();
        let (a, b) = (pod("a", Some(10)), pod("b", Some(20)));
        assert_eq!(
            tt.compute(&svc, &[&a, &b]),
            Some(ts(0)),
            "first sync: service creation"
        );
        assert_eq!(tt.compute(&svc, &[&a, &b]), None, "nothing changed");
        let b2 = pod("b", Some(30));
        assert_eq!(tt.compute(&svc, &[&a, &b2]), Some(ts(30)));
        let (a2, b3) = (pod("a", Some(40)), pod("b", Some(35)));
        assert_eq!(
            tt.compute(&svc, &[&a2, &b3]),
            Some(ts(35)),
            "the earliest of the changes"
        );
        let c = pod("c", Some(5));
        assert_eq!(
            tt.compute(&svc, &[&a2, &b3, &c]),
            Some(ts(5)),
            "a new pod counts with its own time"
        );
        let d = pod("d", None);
        assert_eq!(
            tt.compute(&svc, &[&a2, &b3, &c, &d]),
            None,
            "pods without a Ready transition do not"
        );
        tt.forget(&svc.key());
        assert_eq!(
            tt.compute(&svc, &[&a2]),
            Some(ts(0)),
            "forgotten: first sync again"
        );
    }
}
