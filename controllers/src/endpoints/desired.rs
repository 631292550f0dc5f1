//! The Endpoints object a Service with a selector should have, and whether the current one
//! needs a write.

use std::collections::BTreeMap;

use k8s_openapi::{
    api::core::v1::{EndpointAddress, EndpointPort, EndpointSubset, Endpoints},
    apimachinery::pkg::apis::meta::v1::ObjectMeta,
    jiff::Timestamp,
};

use super::subsets::{MAX_ADDRESSES, address_count, repack, same_subsets, truncate};
use crate::{
    endpointslice::{
        endpoint::{parse_ip, pod_reference, should_set_hostname},
        reconcile::format_trigger_time,
    },
    model::{ANNOTATION_LAST_CHANGE_TRIGGER_TIME, LABEL_HEADLESS, PodView, ServiceView, TargetPort},
};

/// Label marking Endpoints written by the endpoints controller (upstream since 1.33).
pub const LABEL_ENDPOINTS_MANAGED_BY: &str = "endpoints.kubernetes.io/managed-by";
pub const ENDPOINTS_MANAGER: &str = "endpoint-controller";
/// Set while addresses were cut at [`MAX_ADDRESSES`].
pub const ANNOTATION_OVER_CAPACITY: &str = "endpoints.kubernetes.io/over-capacity";
pub const OVER_CAPACITY_TRUNCATED: &str = "truncated";

#[derive(Clone, Debug, PartialEq)]
pub enum EndpointsWrite {
    Create(Endpoints),
    /// A replacement carrying the resourceVersion it was computed from.
    Update(Endpoints),
}

/// Whether an IP is of the family the Endpoints of `svc` carry: its primary family; without
/// families, that of its cluster IP, or for headless Services that of the Pod's first IP.
fn wants_ipv6(svc: &ServiceView, pod: &PodView) -> bool {
    if let Some(first) = svc.ip_families.first() {
        return first == "IPv6";
    }
    let reference = if svc.is_headless() {
        pod.ips.first()
    } else {
        svc.cluster_ip.as_ref()
    };
    reference
        .and_then(|ip| parse_ip(ip))
        .is_some_and(|ip| ip.is_ipv6())
}

fn pod_address(svc: &ServiceView, pod: &PodView) -> Option<EndpointAddress> {
    let want_v6 = wants_ipv6(svc, pod);
    let ip = pod
        .ips
        .iter()
        .filter_map(|s| parse_ip(s))
        .find(|ip| ip.is_ipv6() == want_v6)?;
    Some(EndpointAddress {
        ip: ip.to_string(),
        node_name: pod.node_name.clone(),
        hostname: should_set_hostname(pod, svc)
            .then(|| pod.hostname.clone())
            .flatten(),
        target_ref: Some(pod_reference(pod)),
    })
}

/// The canonical, untruncated subsets for `svc` from the Pods it selects.
pub fn desired_subsets(svc: &ServiceView, pods: &[&PodView]) -> Vec<EndpointSubset> {
    let mut subsets = Vec::new();
    for pod in pods {
        // Terminating Pods are kept only when not-ready addresses are published.
        if pod.terminal || pod.ips.is_empty() || (pod.terminating && !svc.publish_not_ready_addresses) {
            continue;
        }
        let Some(address) = pod_address(svc, pod) else {
            continue;
        };
        let ready = svc.publish_not_ready_addresses || pod.ready;
        let subset = |ports: Option<Vec<EndpointPort>>| EndpointSubset {
            addresses: ready.then(|| vec![address.clone()]),
            not_ready_addresses: (!ready).then(|| vec![address.clone()]),
            ports,
        };
        if svc.ports.is_empty() {
            if svc.cluster_ip.as_deref() == Some("None") {
                subsets.push(subset(None));
            }
            continue;
        }
        for sp in &svc.ports {
            let port = match &sp.target_port {
                TargetPort::Number(n) => *n,
                TargetPort::Name(name) => match pod.find_named_port(name, &sp.protocol) {
                    Some(p) => p,
                    None => continue,
                },
            };
            subsets.push(subset(Some(vec![EndpointPort {
                name: Some(sp.name.clone()).filter(|n| !n.is_empty()),
                port,
                protocol: Some(sp.protocol.clone()),
                app_protocol: sp.app_protocol.clone(),
            }])));
        }
    }
    repack(&subsets)
}

/// Labels of the Endpoints of `svc`: the Service's, the headless marker, the managed-by label.
pub fn desired_labels(svc: &ServiceView) -> BTreeMap<String, String> {
    let mut labels = svc.labels.clone();
    if svc.is_headless() {
        labels.insert(LABEL_HEADLESS.to_owned(), String::new());
    } else {
        labels.remove(LABEL_HEADLESS);
    }
    labels.insert(
        LABEL_ENDPOINTS_MANAGED_BY.to_owned(),
        ENDPOINTS_MANAGER.to_owned(),
    );
    labels
}

/// The write that brings `current` (the cached Endpoints of the Service's name) in line with
/// the Pods, or `None` when it already says what it should. The comparison is made after
/// truncation, so an over-capacity Endpoints is not rewritten on every sync (upstream's is).
pub fn plan_endpoints(
    svc: &ServiceView,
    pods: &[&PodView],
    current: Option<&Endpoints>,
    trigger_time: Option<Timestamp>,
) -> Option<EndpointsWrite> {
    let mut subsets = desired_subsets(svc, pods);
    let truncated = truncate(&mut subsets);
    let labels = desired_labels(svc);
    if let Some(cur) = current {
        let cur_subsets = cur.subsets.as_deref().unwrap_or_default();
        let annotations = cur.metadata.annotations.as_ref();
        let annotated = annotations.is_some_and(|a| a.contains_key(ANNOTATION_OVER_CAPACITY));
        let cur_total = {
            let (r, n) = address_count(cur_subsets);
            r + n
        };
        if same_subsets(cur_subsets, &subsets)
            && cur.metadata.labels.clone().unwrap_or_default() == labels
            && annotated == truncated
            && cur_total <= MAX_ADDRESSES
        {
            return None;
        }
    }
    let mut meta = match current {
        Some(cur) => {
            let mut m = cur.metadata.clone();
            m.managed_fields = None;
            m
        }
        None => ObjectMeta {
            name: Some(svc.name.clone()),
            namespace: Some(svc.namespace.clone()),
            ..Default::default()
        },
    };
    meta.labels = Some(labels);
    let annotations = meta.annotations.get_or_insert_with(BTreeMap::new);
    match trigger_time {
        Some(t) => annotations.insert(
            ANNOTATION_LAST_CHANGE_TRIGGER_TIME.to_owned(),
            format_trigger_time(t),
        ),
        None => annotations.remove(ANNOTATION_LAST_CHANGE_TRIGGER_TIME),
    };
    if truncated {
        annotations.insert(
            ANNOTATION_OVER_CAPACITY.to_owned(),
            OVER_CAPACITY_TRUNCATED.to_owned(),
        );
    } else {
        annotations.remove(ANNOTATION_OVER_CAPACITY);
    }
    let endpoints = Endpoints {
        metadata: meta,
        subsets: Some(subsets),
    };
    Some(if current.is_some() {
        EndpointsWrite::Update(endpoints)
    } else {
        EndpointsWrite::Create(endpoints)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::NamedPort;

    use crate::fixtures::{web_pod, web_service};

    /// `ns/web`, dual-stack.
    fn svc() -> ServiceView {
        ServiceView {
            ip_families: vec!["IPv4".into(), "IPv6".into()],
            ..web_service()
        }
    }

    /// Pod `web-<i>` with an IPv4 and an IPv6 address.
    fn pod(i: usize, ready: bool) -> PodView {
        let (v4, v6) = (
            format!("10.1.{}.{}", i / 250, i % 250 + 1),
            format!("fd00::{:x}", i + 1),
        );
        PodView {
            uid: format!("uid-{i}"),
            ready,
            ..web_pod(&format!("web-{i}"), &[&v4, &v6])
        }
    }

    fn write(plan: Option<EndpointsWrite>) -> Endpoints {
        match plan {
            Some(EndpointsWrite::Create(e) | EndpointsWrite::Update(e)) => e,
            None => panic!("expected a write"),
        }
    }

    fn counts(e: &Endpoints) -> (usize, usize) {
        address_count(e.subsets.as_deref().unwrap_or_default())
    }

    fn over_capacity(e: &Endpoints) -> Option<String> {
        e.metadata
            .annotations
            .as_ref()?
            .get(ANNOTATION_OVER_CAPACITY)
            .cloned()
    }

    #[test]
    fn primary_family_only_ready_and_not_ready() {
        let pods = [pod(0, true), pod(1, false)];
        let refs: Vec<&PodView> = pods.iter().collect();
        let e = write(plan_endpoints(&svc(), &refs, None, None));
        assert_eq!(counts(&e), (1, 1));
        let s = &e.subsets.as_ref().unwrap()[0];
        assert_eq!(s.addresses.as_ref().unwrap()[0].ip, "10.1.0.1");
        assert_eq!(s.not_ready_addresses.as_ref().unwrap()[0].ip, "10.1.0.2");
        assert_eq!(s.ports.as_ref().unwrap()[0].port, 8080);
        let labels = e.metadata.labels.unwrap();
        assert_eq!(
            labels.get(LABEL_ENDPOINTS_MANAGED_BY).map(String::as_str),
            Some(ENDPOINTS_MANAGER)
        );
        assert!(!labels.contains_key(LABEL_HEADLESS));

        let mut v6 = svc();
        v6.ip_families = vec!["IPv6".into(), "IPv4".into()];
        let e = write(plan_endpoints(&v6, &refs, None, None));
        assert_eq!(e.subsets.unwrap()[0].addresses.as_ref().unwrap()[0].ip, "fd00::1");
    }

    #[test]
    fn terminating_pods_only_with_published_not_ready_addresses() {
        let mut p = pod(0, true);
        p.terminating = true;
        let refs = [&p];
        assert_eq!(counts(&write(plan_endpoints(&svc(), &refs, None, None))), (0, 0));
        let mut s = svc();
        s.publish_not_ready_addresses = true;
        assert_eq!(counts(&write(plan_endpoints(&s, &refs, None, None))), (1, 0));
    }

    #[test]
    fn headless_without_ports_lists_addresses_and_is_labelled() {
        let mut s = svc();
        s.cluster_ip = Some("None".into());
        s.ports.clear();
        let pods = [pod(0, true)];
        let refs: Vec<&PodView> = pods.iter().collect();
        let e = write(plan_endpoints(&s, &refs, None, None));
        assert_eq!(counts(&e), (1, 0));
        assert_eq!(e.subsets.as_ref().unwrap()[0].ports, None);
        assert_eq!(
            e.metadata.labels.unwrap().get(LABEL_HEADLESS).map(String::as_str),
            Some("")
        );
        // A non-headless Service without ports has nothing to list.
        let mut no_ports = svc();
        no_ports.ports.clear();
        assert_eq!(
            counts(&write(plan_endpoints(&no_ports, &refs, None, None))),
            (0, 0)
        );
    }

    #[test]
    fn named_ports_group_pods_into_subsets() {
        let mut s = svc();
        s.ports[0].target_port = TargetPort::Name("web".into());
        let mut a = pod(0, true);
        a.named_ports = vec![NamedPort {
            name: "web".into(),
            protocol: "TCP".into(),
            port: 8080,
        }];
        let mut b = pod(1, true);
        b.named_ports = vec![NamedPort {
            name: "web".into(),
            protocol: "TCP".into(),
            port: 9090,
        }];
        let c = pod(2, true);
        let e = write(plan_endpoints(&s, &[&a, &b, &c], None, None));
        let mut ports: Vec<i32> = e
            .subsets
            .unwrap()
            .iter()
            .map(|s| s.ports.as_ref().unwrap()[0].port)
            .collect();
        ports.sort_unstable();
        assert_eq!(ports, [8080, 9090], "a Pod without the port is not listed");
    }

    #[test]
    fn truncation_sets_and_clears_the_annotation_and_resyncs_quietly() {
        for (ready, not_ready, want, annotated) in [
            (999, 0, (999, 0), false),
            (1000, 0, (1000, 0), false),
            (1001, 0, (1000, 0), true),
            (2500, 0, (1000, 0), true),
            (700, 800, (700, 300), true),
            (1200, 300, (1000, 0), true),
        ] {
            let pods: Vec<PodView> = (0..ready + not_ready).map(|i| pod(i, i < ready)).collect();
            let refs: Vec<&PodView> = pods.iter().collect();
            let e = write(plan_endpoints(&svc(), &refs, None, None));
            assert_eq!(counts(&e), want, "{ready} ready + {not_ready} not ready");
            assert_eq!(over_capacity(&e).is_some(), annotated, "{ready}+{not_ready}");
            if annotated {
                assert_eq!(over_capacity(&e).as_deref(), Some("truncated"));
            }
            let mut stored = e.clone();
            stored.metadata.resource_version = Some("5".into());
            assert_eq!(
                plan_endpoints(&svc(), &refs, Some(&stored), None),
                None,
                "{ready}+{not_ready}: resync writes nothing"
            );
        }
    }

    #[test]
    fn falling_back_under_capacity_removes_the_annotation() {
        let pods: Vec<PodView> = (0..1500).map(|i| pod(i, true)).collect();
        let refs: Vec<&PodView> = pods.iter().collect();
        let mut stored = write(plan_endpoints(&svc(), &refs, None, None));
        stored.metadata.resource_version = Some("7".into());
        let fewer: Vec<&PodView> = refs[..900].to_vec();
        let e = match plan_endpoints(&svc(), &fewer, Some(&stored), None) {
            Some(EndpointsWrite::Update(e)) => e,
            other => panic!("expected an update, got {other:?}"),
        };
        assert_eq!(counts(&e), (900, 0));
        assert_eq!(over_capacity(&e), None);
        assert_eq!(
            e.metadata.resource_version.as_deref(),
            Some("7"),
            "conditional on what was read"
        );
    }

    #[test]
    fn an_oversized_or_mislabelled_object_is_rewritten() {
        let pods: Vec<PodView> = (0..3).map(|i| pod(i, true)).collect();
        let refs: Vec<&PodView> = pods.iter().collect();
        let good = write(plan_endpoints(&svc(), &refs, None, None));
        let mut stale_annotation = good.clone();
        stale_annotation
            .metadata
            .annotations
            .get_or_insert_with(BTreeMap::new)
            .insert(ANNOTATION_OVER_CAPACITY.into(), "truncated".into());
        assert!(plan_endpoints(&svc(), &refs, Some(&stale_annotation), None).is_some());
        let mut relabelled = good.clone();
        relabelled
            .metadata
            .labels
            .get_or_insert_with(BTreeMap::new)
            .insert("extra".into(), "x".into());
        assert!(plan_endpoints(&svc(), &refs, Some(&relabelled), None).is_some());
        // The trigger time alone never causes a write.
        let t = Timestamp::from_second(1_700_000_000).unwrap();
        assert_eq!(plan_endpoints(&svc(), &refs, Some(&good), Some(t)), None);
    }
}
