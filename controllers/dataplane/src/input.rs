//! What the node agent reads from Services and EndpointSlices, reduced to plain data. Conversion
//! is total: what cannot be used is reported as a [`Problem`] (logged and counted by the caller)
//! and left out, never a panic.

use std::{net::IpAddr, time::Duration};

use k8s_openapi::api::{core::v1::Service, discovery::v1::EndpointSlice};

use k8s_openapi::jiff::Timestamp;

use svcplane_core::{
    ObjectKey, Protocol,
    wellknown::{ANNOTATION_LAST_CHANGE_TRIGGER_TIME, LABEL_SERVICE_NAME},
};

/// kube-proxy's default for `sessionAffinityConfig.clientIP.timeoutSeconds`.
pub const DEFAULT_AFFINITY_TIMEOUT: Duration = Duration::from_secs(10800);

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Policy {
    Cluster,
    Local,
}

impl Policy {
    fn parse(s: Option<&str>) -> Self {
        if s == Some("Local") {
            Self::Local
        } else {
            Self::Cluster
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServicePortInfo {
    pub name: String,
    pub protocol: Protocol,
    pub port: u16,
    pub node_port: Option<u16>,
}

/// A Service that gets rules (headless and ExternalName Services do not).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServiceInfo {
    pub key: ObjectKey,
    pub cluster_ips: Vec<IpAddr>,
    /// `spec.externalIPs` and `status.loadBalancer.ingress[].ip`.
    pub external_ips: Vec<IpAddr>,
    pub ports: Vec<ServicePortInfo>,
    pub affinity: Option<Duration>,
    pub internal_policy: Policy,
    pub external_policy: Policy,
    pub health_check_node_port: Option<u16>,
}

/// Something in an object that the agent skipped.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Problem {
    pub object: String,
    pub what: String,
}

fn port(n: i32) -> Option<u16> {
    u16::try_from(n).ok().filter(|p| *p != 0)
}

/// Reads a Service; `Ok(None)` for Services that get no rules (headless, ExternalName).
pub fn service_info(svc: &Service, problems: &mut Vec<Problem>) -> Option<ServiceInfo> {
    let key = ObjectKey::new(
        svc.metadata.namespace.clone().unwrap_or_default(),
        svc.metadata.name.clone().unwrap_or_default(),
    );
    let spec = svc.spec.as_ref()?;
    if spec.type_.as_deref() == Some("ExternalName") {
        return None;
    }
    let mut problem = |what: String| {
        problems.push(Problem {
            object: format!("Service {key}"),
            what,
        });
    };
    let raw_ips: Vec<&String> = match &spec.cluster_ips {
        Some(ips) if !ips.is_empty() => ips.iter().collect(),
        _ => spec.cluster_ip.iter().collect(),
    };
    if raw_ips.iter().any(|ip| ip.as_str() == "None") {
        return None;
    }
    let mut cluster_ips = Vec::new();
    for ip in raw_ips {
        match ip.parse::<IpAddr>() {
            Ok(ip) => cluster_ips.push(ip),
            Err(_) => problem(format!("clusterIP {ip:?} is not an IP address")),
        }
    }
    if cluster_ips.is_empty() {
        return None;
    }
    let mut external_ips = Vec::new();
    let lb_ips = svc
        .status
        .as_ref()
        .and_then(|s| s.load_balancer.as_ref())
        .and_then(|lb| lb.ingress.as_ref())
        .into_iter()
        .flatten()
        .filter_map(|i| i.ip.as_ref());
    for ip in spec.external_ips.iter().flatten().chain(lb_ips) {
        match ip.parse::<IpAddr>() {
            Ok(ip) if !external_ips.contains(&ip) => external_ips.push(ip),
            Ok(_) => {}
            Err(_) => problem(format!("external IP {ip:?} is not an IP address")),
        }
    }
    let with_node_ports = matches!(spec.type_.as_deref(), Some("NodePort" | "LoadBalancer"));
    let mut ports = Vec::new();
    for p in spec.ports.iter().flatten() {
        let name = p.name.clone().unwrap_or_default();
        let Some(protocol) = Protocol::parse(p.protocol.as_deref()) else {
            problem(format!("port {name:?} has unknown protocol {:?}", p.protocol));
            continue;
        };
        let Some(number) = port(p.port) else {
            problem(format!("port {name:?} has invalid number {}", p.port));
            continue;
        };
        ports.push(ServicePortInfo {
            name,
            protocol,
            port: number,
            node_port: if with_node_ports {
                p.node_port.and_then(port)
            } else {
                None
            },
        });
    }
    let affinity = (spec.session_affinity.as_deref() == Some("ClientIP")).then(|| {
        spec.session_affinity_config
            .as_ref()
            .and_then(|c| c.client_ip.as_ref())
            .and_then(|c| c.timeout_seconds)
            .and_then(|t| u64::try_from(t).ok())
            .filter(|t| *t > 0)
            .map_or(DEFAULT_AFFINITY_TIMEOUT, Duration::from_secs)
    });
    // externalTrafficPolicy only applies to Services reachable from outside.
    let external_policy = if with_node_ports || !external_ips.is_empty() {
        Policy::parse(spec.external_traffic_policy.as_deref())
    } else {
        Policy::Cluster
    };
    Some(ServiceInfo {
        key,
        cluster_ips,
        external_ips,
        ports,
        affinity,
        internal_policy: Policy::parse(spec.internal_traffic_policy.as_deref()),
        external_policy,
        health_check_node_port: spec.health_check_node_port.and_then(port),
    })
}

/// One endpoint of a slice, for one slice port.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct EndpointInfo {
    pub ip: IpAddr,
    pub ready: bool,
    pub serving: bool,
    pub terminating: bool,
    pub node_name: Option<String>,
    /// `hints.forZones[].name`: the zones this endpoint is meant for (topology-aware routing).
    pub zone_hints: Vec<String>,
    /// `hints.forNodes[].name`: the nodes it is meant for.
    pub node_hints: Vec<String>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SlicePort {
    pub name: String,
    pub protocol: Protocol,
    pub port: u16,
}

/// An EndpointSlice, reduced.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SliceInfo {
    pub name: ObjectKey,
    /// `endpoints.kubernetes.io/last-change-trigger-time`: when the change that produced this
    /// version happened (the network programming latency SLI starts there).
    pub trigger_time: Option<Timestamp>,
    pub service: ObjectKey,
    pub ports: Vec<SlicePort>,
    pub endpoints: Vec<EndpointInfo>,
}

/// Reads an EndpointSlice; `None` when it names no Service or is of address type FQDN.
pub fn slice_info(slice: &EndpointSlice, problems: &mut Vec<Problem>) -> Option<SliceInfo> {
    let namespace = slice.metadata.namespace.clone().unwrap_or_default();
    let service = slice.metadata.labels.as_ref()?.get(LABEL_SERVICE_NAME)?.clone();
    if slice.address_type == "FQDN" {
        return None;
    }
    let object = format!(
        "EndpointSlice {namespace}/{}",
        slice.metadata.name.as_deref().unwrap_or_default()
    );
    let mut ports = Vec::new();
    for p in slice.ports.iter().flatten() {
        let name = p.name.clone().unwrap_or_default();
        match (Protocol::parse(p.protocol.as_deref()), p.port.and_then(port)) {
            (Some(protocol), Some(number)) => ports.push(SlicePort {
                name,
                protocol,
                port: number,
            }),
            _ => problems.push(Problem {
                object: object.clone(),
                what: format!("port {name:?} has no usable number or protocol"),
            }),
        }
    }
    let mut endpoints = Vec::new();
    for ep in slice.endpoints.iter().flatten() {
        let Some(first) = ep.addresses.first() else {
            continue;
        };
        let Ok(ip) = first.parse::<IpAddr>() else {
            problems.push(Problem {
                object: object.clone(),
                what: format!("address {first:?} is not an IP address"),
            });
            continue;
        };
        let c = ep.conditions.as_ref();
        // Unset conditions mean ready, serving as ready, not terminating (API documentation).
        let ready = c.and_then(|c| c.ready).unwrap_or(true);
        endpoints.push(EndpointInfo {
            ip,
            ready,
            serving: c.and_then(|c| c.serving).unwrap_or(ready),
            terminating: c.and_then(|c| c.terminating).unwrap_or(false),
            node_name: ep.node_name.clone(),
            zone_hints: ep
                .hints
                .iter()
                .flat_map(|h| h.for_zones.iter().flatten())
                .map(|z| z.name.clone())
                .collect(),
            node_hints: ep
                .hints
                .iter()
                .flat_map(|h| h.for_nodes.iter().flatten())
                .map(|n| n.name.clone())
                .collect(),
        });
    }
    let trigger_time = slice
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(ANNOTATION_LAST_CHANGE_TRIGGER_TIME))
        .and_then(|t| t.parse::<Timestamp>().ok());
    Some(SliceInfo {
        name: ObjectKey::new(namespace.clone(), slice.metadata.name.clone().unwrap_or_default()),
        trigger_time,
        service: ObjectKey::new(namespace, service),
        ports,
        endpoints,
    })
}
