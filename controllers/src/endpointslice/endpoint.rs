//! From one Pod to the endpoint and ports it contributes to one Service's slices.

use std::net::{IpAddr, Ipv4Addr};

use k8s_openapi::api::{
    core::v1::ObjectReference,
    discovery::v1::{Endpoint, EndpointConditions, EndpointPort},
};

use svcplane_core::IpFamily;

use crate::model::{PodView, ServiceView, TargetPort};

/// The address types a Service gets slices for: its `ipFamilies`. Without families (objects
/// from an apiserver that predates dual-stack) the family of its cluster IP, and both families
/// for headless Services, so that no traffic is cut while the apiserver catches up.
pub fn address_types(svc: &ServiceView) -> Vec<IpFamily> {
    let mut types: Vec<IpFamily> = svc
        .ip_families
        .iter()
        .filter_map(|f| match f.as_str() {
            "IPv4" => Some(IpFamily::IPv4),
            "IPv6" => Some(IpFamily::IPv6),
            _ => None,
        })
        .collect();
    types.sort();
    types.dedup();
    if !types.is_empty() {
        return types;
    }
    if !svc.is_headless()
        && let Some(ip) = svc.cluster_ip.as_deref().and_then(parse_ip)
    {
        return vec![IpFamily::of(&ip)];
    }
    vec![IpFamily::IPv4, IpFamily::IPv6]
}

/// Parses an IP the way Kubernetes does (IPv4 octets may carry leading zeros) and folds
/// IPv4-mapped IPv6 addresses into IPv4, so that every spelling of one address compares equal.
pub fn parse_ip(s: &str) -> Option<IpAddr> {
    let ip = match s.parse::<IpAddr>() {
        Ok(ip) => ip,
        Err(_) => IpAddr::V4(parse_ipv4_sloppy(s)?),
    };
    Some(match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    })
}

fn parse_ipv4_sloppy(s: &str) -> Option<Ipv4Addr> {
    let mut octets = [0u8; 4];
    let mut parts = s.split('.');
    for o in &mut octets {
        let part = parts.next()?;
        if part.is_empty() || part.len() > 3 || !part.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        *o = part.parse().ok()?;
    }
    parts.next().is_none().then(|| Ipv4Addr::from(octets))
}

/// Upstream's `ShouldPodBeInEndpoints` with terminating Pods included: slices keep terminating
/// Pods (with their conditions) so proxies can drain them.
pub fn pod_has_endpoint(pod: &PodView) -> bool {
    !pod.terminal && !pod.ips.is_empty()
}

/// The endpoint of `pod` for `svc` in `family`; `zone` is its Node's zone label. Addresses are
/// canonical; an endpoint without any address of the family has `addresses` empty and is dropped
/// by the caller.
pub fn pod_to_endpoint(pod: &PodView, zone: Option<&str>, svc: &ServiceView, family: IpFamily) -> Endpoint {
    let serving = pod.ready;
    let terminating = pod.terminating;
    // A terminating Pod is never "ready", unless the Service publishes not-ready addresses.
    let ready = svc.publish_not_ready_addresses || (serving && !terminating);
    let addresses = pod
        .ips
        .iter()
        .filter_map(|s| parse_ip(s))
        .filter(|ip| IpFamily::of(ip) == family)
        .map(|ip| ip.to_string())
        .collect();
    Endpoint {
        addresses,
        conditions: Some(EndpointConditions {
            ready: Some(ready),
            serving: Some(serving),
            terminating: Some(terminating),
        }),
        target_ref: Some(pod_reference(pod)),
        node_name: pod.node_name.clone(),
        zone: zone.filter(|z| !z.is_empty()).map(str::to_owned),
        hostname: should_set_hostname(pod, svc)
            .then(|| pod.hostname.clone())
            .flatten(),
        ..Default::default()
    }
}

/// The reference an endpoint carries to its Pod (no resourceVersion, as upstream writes it).
pub fn pod_reference(pod: &PodView) -> ObjectReference {
    ObjectReference {
        kind: Some("Pod".into()),
        namespace: Some(pod.namespace.clone()),
        name: Some(pod.name.clone()),
        uid: Some(pod.uid.clone()),
        ..Default::default()
    }
}

/// A Pod's hostname is published when its subdomain names this Service (DNS A records of
/// headless Services).
pub fn should_set_hostname(pod: &PodView, svc: &ServiceView) -> bool {
    pod.hostname.is_some()
        && pod.subdomain.as_deref() == Some(svc.name.as_str())
        && pod.namespace == svc.namespace
}

/// The ports `pod` serves for `svc`. A named target port the Pod does not declare (with the
/// Service port's protocol) is left out for this Pod only, so Pods that resolve differently
/// land in different slices.
pub fn endpoint_ports(svc: &ServiceView, pod: &PodView) -> Vec<EndpointPort> {
    svc.ports
        .iter()
        .filter_map(|sp| {
            let port = match &sp.target_port {
                TargetPort::Number(n) => *n,
                TargetPort::Name(name) => pod.find_named_port(name, &sp.protocol)?,
            };
            Some(EndpointPort {
                name: Some(sp.name.clone()),
                port: Some(port),
                protocol: Some(sp.protocol.clone()),
                app_protocol: sp.app_protocol.clone(),
            })
        })
        .collect()
}

/// Identity of an endpoint across syncs: its addresses, hostname and the object it points at.
/// Conditions, node and zone are not part of it, so they can change in place.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct EndpointKey {
    addresses: Vec<String>,
    hostname: String,
    namespace: String,
    name: String,
}

pub fn endpoint_key(ep: &Endpoint) -> EndpointKey {
    let mut addresses = ep.addresses.clone();
    addresses.sort();
    let target = ep.target_ref.as_ref();
    EndpointKey {
        addresses,
        hostname: ep.hostname.clone().unwrap_or_default(),
        namespace: target.and_then(|t| t.namespace.clone()).unwrap_or_default(),
        name: target.and_then(|t| t.name.clone()).unwrap_or_default(),
    }
}

/// Whether two endpoints with the same identity differ in what a slice must reflect: node, zone,
/// conditions or target (its resourceVersion aside). Hints are reconciled separately.
pub fn endpoints_equal_beyond_key(a: &Endpoint, b: &Endpoint) -> bool {
    let conditions = |e: &Endpoint| {
        let c = e.conditions.clone().unwrap_or_default();
        (c.ready, c.serving, c.terminating)
    };
    let target = |e: &Endpoint| {
        e.target_ref.clone().map(|mut t| {
            t.resource_version = None;
            t
        })
    };
    a.node_name == b.node_name && a.zone == b.zone && conditions(a) == conditions(b) && target(a) == target(b)
}

/// One entry of a port set, in a form that orders and compares semantically.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PortKeyItem {
    name: String,
    protocol: String,
    port: Option<i32>,
    app_protocol: Option<String>,
}

/// A set of ports, order-insensitive: slices are grouped by it.
pub type PortKey = Vec<PortKeyItem>;

pub fn port_key(ports: &[EndpointPort]) -> PortKey {
    let mut key: PortKey = ports
        .iter()
        .map(|p| PortKeyItem {
            name: p.name.clone().unwrap_or_default(),
            protocol: p
                .protocol
                .clone()
                .unwrap_or_else(|| crate::model::DEFAULT_PROTOCOL.to_owned()),
            port: p.port,
            app_protocol: p.app_protocol.clone(),
        })
        .collect();
    key.sort();
    key
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{NamedPort, ServicePortView};

    use crate::fixtures::{web_pod as pod, web_service as svc};

    #[test]
    fn conditions_follow_upstream_for_every_combination() {
        // (ready, terminating, publishNotReadyAddresses) -> (ready, serving, terminating)
        let table = [
            ((true, false, false), (true, true, false)),
            ((false, false, false), (false, false, false)),
            ((true, true, false), (false, true, true)),
            ((false, true, false), (false, false, true)),
            ((true, false, true), (true, true, false)),
            ((false, false, true), (true, false, false)),
            ((true, true, true), (true, true, true)),
            ((false, true, true), (true, false, true)),
        ];
        for ((pod_ready, terminating, publish), want) in table {
            let mut p = pod("p", &["10.0.0.1"]);
            p.ready = pod_ready;
            p.terminating = terminating;
            let mut s = svc();
            s.publish_not_ready_addresses = publish;
            let c = pod_to_endpoint(&p, None, &s, IpFamily::IPv4).conditions.unwrap();
            assert_eq!(
                (c.ready.unwrap(), c.serving.unwrap(), c.terminating.unwrap()),
                want,
                "pod ready={pod_ready} terminating={terminating} publishNotReady={publish}"
            );
        }
    }

    #[test]
    fn endpoint_fields() {
        let mut p = pod("p", &["10.0.0.1", "fd00::0001"]);
        p.hostname = Some("p-host".into());
        p.subdomain = Some("web".into());
        let ep = pod_to_endpoint(&p, Some("zone-a"), &svc(), IpFamily::IPv4);
        assert_eq!(ep.addresses, ["10.0.0.1"]);
        assert_eq!(ep.zone.as_deref(), Some("zone-a"));
        assert_eq!(ep.node_name.as_deref(), Some("node-a"));
        assert_eq!(ep.hostname.as_deref(), Some("p-host"));
        let t = ep.target_ref.unwrap();
        assert_eq!(
            (t.kind.as_deref(), t.name.as_deref(), t.uid.as_deref()),
            (Some("Pod"), Some("p"), Some("p-uid"))
        );
        let v6 = pod_to_endpoint(&p, Some(""), &svc(), IpFamily::IPv6);
        assert_eq!(v6.addresses, ["fd00::1"], "canonical form");
        assert_eq!(v6.zone, None, "an empty zone label is no zone");

        p.subdomain = Some("other".into());
        assert_eq!(pod_to_endpoint(&p, None, &svc(), IpFamily::IPv4).hostname, None);
    }

    #[test]
    fn ip_parsing_is_as_sloppy_as_kubernetes() {
        assert_eq!(parse_ip("010.001.002.003"), parse_ip("10.1.2.3"));
        assert_eq!(parse_ip("::ffff:10.1.2.3"), parse_ip("10.1.2.3"));
        assert_eq!(
            parse_ip("FD00:0::1").map(|i| i.to_string()).as_deref(),
            Some("fd00::1")
        );
        for bad in [
            "",
            "10.1.2",
            "10.1.2.3.4",
            "1.2.3.256",
            "10.1.2.0003",
            "x",
            "10..1.2",
        ] {
            assert_eq!(parse_ip(bad), None, "{bad}");
        }
        let p = pod("p", &["not-an-ip", "10.0.0.9"]);
        assert_eq!(
            pod_to_endpoint(&p, None, &svc(), IpFamily::IPv4).addresses,
            ["10.0.0.9"]
        );
    }

    #[test]
    fn address_types_for_services() {
        let mut s = svc();
        s.ip_families = vec!["IPv6".into(), "IPv4".into()];
        assert_eq!(address_types(&s), [IpFamily::IPv4, IpFamily::IPv6]);
        s.ip_families.clear();
        assert_eq!(address_types(&s), [IpFamily::IPv4]);
        s.cluster_ip = Some("fd00::10".into());
        assert_eq!(address_types(&s), [IpFamily::IPv6]);
        s.cluster_ip = Some("None".into());
        assert_eq!(address_types(&s), [IpFamily::IPv4, IpFamily::IPv6]);
    }

    #[test]
    fn named_target_port_resolves_per_pod() {
        let mut s = svc();
        s.ports = vec![
            ServicePortView {
                name: "http".into(),
                protocol: "TCP".into(),
                app_protocol: Some("http".into()),
                port: 80,
                target_port: TargetPort::Name("web".into()),
            },
            ServicePortView {
                name: "metrics".into(),
                protocol: "TCP".into(),
                app_protocol: None,
                port: 9000,
                target_port: TargetPort::Number(9000),
            },
        ];
        let mut a = pod("a", &["10.0.0.1"]);
        a.named_ports = vec![NamedPort {
            name: "web".into(),
            protocol: "TCP".into(),
            port: 8080,
        }];
        let mut b = pod("b", &["10.0.0.2"]);
        b.named_ports = vec![NamedPort {
            name: "web".into(),
            protocol: "TCP".into(),
            port: 8081,
        }];
        let c = pod("c", &["10.0.0.3"]);
        let ports = |p: &PodView| {
            endpoint_ports(&s, p)
                .iter()
                .map(|e| e.port.unwrap())
                .collect::<Vec<_>>()
        };
        assert_eq!(ports(&a), [8080, 9000]);
        assert_eq!(ports(&b), [8081, 9000]);
        assert_eq!(
            ports(&c),
            [9000],
            "a Pod without the name serves the other ports only"
        );
        assert_eq!(endpoint_ports(&s, &a)[0].app_protocol.as_deref(), Some("http"));
        assert_ne!(
            port_key(&endpoint_ports(&s, &a)),
            port_key(&endpoint_ports(&s, &b))
        );
    }

    #[test]
    fn port_key_ignores_order_and_defaults_protocol() {
        let p = |name: &str, port: i32, proto: Option<&str>| EndpointPort {
            name: Some(name.into()),
            port: Some(port),
            protocol: proto.map(Into::into),
            app_protocol: None,
        };
        assert_eq!(
            port_key(&[p("a", 1, Some("TCP")), p("b", 2, None)]),
            port_key(&[p("b", 2, Some("TCP")), p("a", 1, None)])
        );
        assert_ne!(
            port_key(&[p("a", 1, Some("UDP"))]),
            port_key(&[p("a", 1, Some("TCP"))])
        );
        assert_eq!(port_key(&[]), PortKey::new());
    }

    #[test]
    fn identity_ignores_conditions_and_address_order() {
        let a = pod_to_endpoint(&pod("p", &["10.0.0.1"]), None, &svc(), IpFamily::IPv4);
        let mut b = a.clone();
        b.conditions = Some(EndpointConditions {
            ready: Some(false),
            ..Default::default()
        });
        b.zone = Some("z".into());
        assert_eq!(endpoint_key(&a), endpoint_key(&b));
        assert!(!endpoints_equal_beyond_key(&a, &b));
        let mut c = a.clone();
        if let Some(t) = c.target_ref.as_mut() {
            t.resource_version = Some("42".into());
        }
        assert!(
            endpoints_equal_beyond_key(&a, &c),
            "resourceVersion of the target is ignored"
        );
        let mut d = a.clone();
        d.hostname = Some("h".into());
        assert_ne!(endpoint_key(&a), endpoint_key(&d));
        let multi = |addrs: &[&str]| Endpoint {
            addresses: addrs.iter().map(|s| (*s).to_owned()).collect(),
            ..a.clone()
        };
        assert_eq!(
            endpoint_key(&multi(&["10.0.0.2", "10.0.0.1"])),
            endpoint_key(&multi(&["10.0.0.1", "10.0.0.2"]))
        );
    }

    #[test]
    fn terminal_and_ipless_pods_have_no_endpoint() {
        assert!(pod_has_endpoint(&pod("p", &["10.0.0.1"])));
        assert!(!pod_has_endpoint(&pod("p", &[])));
        let mut t = pod("p", &["10.0.0.1"]);
        t.terminal = true;
        assert!(!pod_has_endpoint(&t));
        let mut d = pod("p", &["10.0.0.1"]);
        d.terminating = true;
        assert!(pod_has_endpoint(&d), "terminating pods stay, with conditions");
    }
}
