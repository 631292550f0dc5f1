//! Which Services a Pod event concerns, as upstream's endpoint controllers decide it: only
//! changes that can alter endpoints count, and a Pod whose labels changed concerns the Services
//! it joined or left (all of them, if its endpoint changed too).

use std::{collections::BTreeSet, sync::Arc, time::Duration};

use crate::{
    model::{ObjectKey, PodView, ServiceView},
    runtime::{Store, WorkQueue},
};

/// Whether the Pod's endpoint may differ: deletion mark, readiness, IPs, terminal phase, node.
pub fn endpoint_changed(old: &PodView, new: &PodView) -> bool {
    old.terminating != new.terminating
        || old.ready != new.ready
        || old.ips != new.ips
        || old.terminal != new.terminal
        || old.node_name != new.node_name
}

/// Whether the Pod may have joined or left Services (labels), or changed its DNS identity.
pub fn membership_changed(old: &PodView, new: &PodView) -> bool {
    old.labels != new.labels || old.hostname != new.hostname || old.subdomain != new.subdomain
}

/// Services (from `services`, those of the Pod's namespace) to sync for the event `(old, new)`.
pub fn services_to_sync(
    old: Option<&PodView>,
    new: Option<&PodView>,
    services: &[Arc<ServiceView>],
) -> BTreeSet<ObjectKey> {
    let selecting = |pod: &PodView| -> BTreeSet<ObjectKey> {
        services
            .iter()
            .filter(|s| s.selects(&pod.labels))
            .map(|s| s.key())
            .collect()
    };
    match (old, new) {
        (None, None) => BTreeSet::new(),
        (Some(p), None) | (None, Some(p)) => selecting(p),
        (Some(old), Some(new)) => {
            let changed = endpoint_changed(old, new);
            if !membership_changed(old, new) {
                return if changed { selecting(new) } else { BTreeSet::new() };
            }
            let (before, after) = (selecting(old), selecting(new));
            if changed {
                before.union(&after).cloned().collect()
            } else {
                before.symmetric_difference(&after).cloned().collect()
            }
        }
    }
}

/// Queues, after `delay`, the Services of the Pod's namespace that the event `(old, new)` concerns.
pub fn enqueue_services(
    queue: &WorkQueue<ObjectKey>,
    services: &Store<ServiceView>,
    old: Option<&Arc<PodView>>,
    new: Option<&Arc<PodView>>,
    delay: Duration,
) {
    let Some(ns) = new.or(old).map(|p| p.namespace.as_str()) else {
        return;
    };
    let candidates = services.list_namespace(ns, |s| s.selector.is_some());
    for key in services_to_sync(old.map(|p| &**p), new.map(|p| &**p), &candidates) {
        queue.add_after(key, delay);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    fn svc(name: &str, app: &str) -> Arc<ServiceView> {
        Arc::new(ServiceView {
            namespace: "ns".into(),
            name: name.into(),
            selector: Some(BTreeMap::from([("app".to_owned(), app.to_owned())])),
            ..Default::default()
        })
    }

    fn pod(labels: &[(&str, &str)]) -> PodView {
        PodView {
            namespace: "ns".into(),
            name: "p".into(),
            labels: labels
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
            ips: vec!["10.0.0.1".into()],
            ..Default::default()
        }
    }

    fn names(set: BTreeSet<ObjectKey>) -> Vec<String> {
        set.into_iter().map(|k| k.name).collect()
    }

    #[test]
    fn adds_and_deletes_concern_selecting_services() {
        let services = [
            svc("web", "web"),
            svc("db", "db"),
            Arc::new(ServiceView {
                name: "manual".into(),
                ..Default::default()
            }),
        ];
        let p = pod(&[("app", "web")]);
        assert_eq!(names(services_to_sync(None, Some(&p), &services)), ["web"]);
        assert_eq!(names(services_to_sync(Some(&p), None, &services)), ["web"]);
    }

    #[test]
    fn irrelevant_updates_concern_nobody() {
        let services = [svc("web", "web")];
        let old = pod(&[("app", "web")]);
        let mut new = old.clone();
        new.resource_version = "2".into();
        new.ready_transition = None;
        assert!(services_to_sync(Some(&old), Some(&new), &services).is_empty());
    }

    #[test]
    fn endpoint_changes_concern_current_services() {
        let services = [svc("web", "web")];
        let old = pod(&[("app", "web")]);
        for change in [
            |p: &mut PodView| p.ready = true,
            |p: &mut PodView| p.terminating = true,
            |p: &mut PodView| p.ips.push("fd00::1".into()),
            |p: &mut PodView| p.terminal = true,
        ] {
            let mut new = old.clone();
            change(&mut new);
            assert_eq!(
                names(services_to_sync(Some(&old), Some(&new), &services)),
                ["web"]
            );
        }
    }

    #[test]
    fn relabelling_concerns_services_joined_or_left() {
        let services = [svc("web", "web"), svc("canary", "canary"), svc("any", "web")];
        let old = pod(&[("app", "web")]);
        let new = pod(&[("app", "canary")]);
        assert_eq!(
            names(services_to_sync(Some(&old), Some(&new), &services)),
            ["any", "canary", "web"]
        );
        // Same membership, only another label: nobody.
        let extra = pod(&[("app", "web"), ("x", "y")]);
        assert!(services_to_sync(Some(&old), Some(&extra), &services).is_empty());
        // Relabelled and readiness changed: every Service before or after.
        let mut both = extra.clone();
        both.ready = true;
        assert_eq!(
            names(services_to_sync(Some(&old), Some(&both), &services)),
            ["any", "web"]
        );
    }
}
