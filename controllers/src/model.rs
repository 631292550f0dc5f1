//! Compact views of the API objects the endpoint controllers read.
//!
//! The caches hold these instead of whole objects: a Pod is reduced to the few fields that decide
//! its endpoints (a few hundred bytes instead of several kilobytes), which is most of the
//! controller's memory at 10,000 Pods. Converting is pure and total: a field that is missing or
//! malformed in the API object becomes an empty value here, never a panic.

use std::collections::BTreeMap;

pub use svcplane_core::{ObjectKey, wellknown::*};

use k8s_openapi::{
    api::core::v1::{Container, Node, Pod, Service},
    apimachinery::pkg::util::intstr::IntOrString,
    jiff::Timestamp,
};

/// A named container port a Service's string `targetPort` can refer to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NamedPort {
    pub name: String,
    pub protocol: String,
    pub port: i32,
}

/// What the endpoint controllers need to know about a Pod.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PodView {
    pub namespace: String,
    pub name: String,
    pub uid: String,
    pub resource_version: String,
    pub labels: BTreeMap<String, String>,
    pub node_name: Option<String>,
    pub hostname: Option<String>,
    pub subdomain: Option<String>,
    /// `status.podIPs` (or `status.podIP` when the list is absent), as written.
    pub ips: Vec<String>,
    /// Phase `Succeeded` or `Failed`: the Pod will never serve again.
    pub terminal: bool,
    /// The `Ready` condition is `True`.
    pub ready: bool,
    /// When the `Ready` condition last changed, the Pod's contribution to the trigger time.
    pub ready_transition: Option<Timestamp>,
    /// `deletionTimestamp` is set.
    pub terminating: bool,
    /// Named ports of the containers, then of sidecars (restartable init containers), in order.
    pub named_ports: Vec<NamedPort>,
}

impl PodView {
    pub fn key(&self) -> ObjectKey {
        ObjectKey::new(&self.namespace, &self.name)
    }

    /// Resolves a Service's named target port against this Pod's containers, then sidecars:
    /// the first port with that name and protocol.
    pub fn find_named_port(&self, name: &str, protocol: &str) -> Option<i32> {
        self.named_ports
            .iter()
            .find(|p| p.name == name && p.protocol == protocol)
            .map(|p| p.port)
    }
}

impl From<&Pod> for PodView {
    fn from(pod: &Pod) -> Self {
        let meta = &pod.metadata;
        let spec = pod.spec.as_ref();
        let status = pod.status.as_ref();
        let ips: Vec<String> = match status
            .and_then(|s| s.pod_ips.as_ref())
            .filter(|ips| !ips.is_empty())
        {
            Some(ips) => ips
                .iter()
                .map(|ip| ip.ip.clone())
                .filter(|ip| !ip.is_empty())
                .collect(),
            None => status
                .and_then(|s| s.pod_ip.clone())
                .filter(|ip| !ip.is_empty())
                .into_iter()
                .collect(),
        };
        let ready_condition = status
            .and_then(|s| s.conditions.as_ref())
            .and_then(|cs| cs.iter().find(|c| c.type_ == "Ready"));
        let mut named_ports = Vec::new();
        if let Some(spec) = spec {
            let sidecars = spec
                .init_containers
                .iter()
                .flatten()
                .filter(|c| c.restart_policy.as_deref() == Some("Always"));
            for container in spec.containers.iter().chain(sidecars) {
                named_ports.extend(container_named_ports(container));
            }
        }
        Self {
            namespace: meta.namespace.clone().unwrap_or_default(),
            name: meta.name.clone().unwrap_or_default(),
            uid: meta.uid.clone().unwrap_or_default(),
            resource_version: meta.resource_version.clone().unwrap_or_default(),
            labels: meta.labels.clone().unwrap_or_default(),
            node_name: spec.and_then(|s| s.node_name.clone()).filter(|n| !n.is_empty()),
            hostname: spec.and_then(|s| s.hostname.clone()).filter(|h| !h.is_empty()),
            subdomain: spec.and_then(|s| s.subdomain.clone()).filter(|d| !d.is_empty()),
            ips,
            terminal: matches!(
                status.and_then(|s| s.phase.as_deref()),
                Some("Succeeded" | "Failed")
            ),
            ready: ready_condition.is_some_and(|c| c.status == "True"),
            ready_transition: ready_condition
                .and_then(|c| c.last_transition_time.as_ref())
                .map(|t| t.0),
            terminating: meta.deletion_timestamp.is_some(),
            named_ports,
        }
    }
}

fn container_named_ports(container: &Container) -> impl Iterator<Item = NamedPort> + '_ {
    container.ports.iter().flatten().filter_map(|p| {
        let name = p.name.as_ref().filter(|n| !n.is_empty())?;
        Some(NamedPort {
            name: name.clone(),
            protocol: p.protocol.clone().unwrap_or_else(|| DEFAULT_PROTOCOL.to_owned()),
            port: p.container_port,
        })
    })
}

/// What the endpoint controllers need to know about a Node: its zone.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NodeView {
    pub name: String,
    pub resource_version: String,
    pub zone: Option<String>,
}

impl From<&Node> for NodeView {
    fn from(node: &Node) -> Self {
        Self {
            name: node.metadata.name.clone().unwrap_or_default(),
            resource_version: node.metadata.resource_version.clone().unwrap_or_default(),
            zone: node
                .metadata
                .labels
                .as_ref()
                .and_then(|l| l.get(LABEL_TOPOLOGY_ZONE))
                .filter(|z| !z.is_empty())
                .cloned(),
        }
    }
}

/// A Service port's target: a number, or the name of a container port.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TargetPort {
    Number(i32),
    Name(String),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServicePortView {
    pub name: String,
    pub protocol: String,
    pub app_protocol: Option<String>,
    pub port: i32,
    pub target_port: TargetPort,
}

/// What the endpoint controllers need to know about a Service.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ServiceView {
    pub namespace: String,
    pub name: String,
    pub uid: String,
    pub resource_version: String,
    pub labels: BTreeMap<String, String>,
    /// `None` for selector-less Services, whose endpoints are written by users. An empty selector
    /// is the same thing: the apiserver stores it as absent.
    pub selector: Option<BTreeMap<String, String>>,
    pub type_: String,
    pub cluster_ip: Option<String>,
    /// Every assigned cluster IP (one per family), without the `None` of headless Services.
    pub cluster_ips: Vec<String>,
    pub ip_families: Vec<String>,
    pub publish_not_ready_addresses: bool,
    pub ports: Vec<ServicePortView>,
    /// Every node port it holds, as stored: its ports' and its health-check node port (what
    /// allocation releases when they go).
    pub node_ports: Vec<i32>,
    pub traffic_distribution: Option<String>,
    /// Value of the Topology Aware Hints annotation, the deprecated key winning.
    pub topology_mode: Option<String>,
    pub creation_timestamp: Option<Timestamp>,
    /// `deletionTimestamp` is set.
    pub deleting: bool,
}

impl ServiceView {
    pub fn key(&self) -> ObjectKey {
        ObjectKey::new(&self.namespace, &self.name)
    }

    pub fn is_external_name(&self) -> bool {
        self.type_ == "ExternalName"
    }

    /// Headless: no cluster IP (`None`) or none assigned.
    pub fn is_headless(&self) -> bool {
        matches!(self.cluster_ip.as_deref(), None | Some("" | "None"))
    }

    /// Whether the Pod's labels satisfy this Service's selector; selector-less Services select
    /// nothing.
    pub fn selects(&self, pod_labels: &BTreeMap<String, String>) -> bool {
        self.selector
            .as_ref()
            .is_some_and(|sel| sel.iter().all(|(k, v)| pod_labels.get(k) == Some(v)))
    }
}

impl From<&Service> for ServiceView {
    fn from(svc: &Service) -> Self {
        let meta = &svc.metadata;
        let spec = svc.spec.as_ref();
        let annotations = meta.annotations.as_ref();
        let topology_mode = annotations.and_then(|a| {
            a.get(ANNOTATION_TOPOLOGY_AWARE_HINTS)
                .or_else(|| a.get(ANNOTATION_TOPOLOGY_MODE))
                .cloned()
        });
        let ports = spec
            .and_then(|s| s.ports.as_ref())
            .into_iter()
            .flatten()
            .map(|p| ServicePortView {
                name: p.name.clone().unwrap_or_default(),
                protocol: p.protocol.clone().unwrap_or_else(|| DEFAULT_PROTOCOL.to_owned()),
                app_protocol: p.app_protocol.clone(),
                port: p.port,
                target_port: match &p.target_port {
                    Some(IntOrString::Int(n)) if *n != 0 => TargetPort::Number(*n),
                    Some(IntOrString::String(s)) if !s.is_empty() => match s.parse::<i32>() {
                        // The apiserver stores "8080" as a string; it is still a number.
                        Ok(n) => TargetPort::Number(n),
                        Err(_) => TargetPort::Name(s.clone()),
                    },
                    // Defaulted to the port by the apiserver; older objects may lack it.
                    _ => TargetPort::Number(p.port),
                },
            })
            .collect();
        Self {
            namespace: meta.namespace.clone().unwrap_or_default(),
            name: meta.name.clone().unwrap_or_default(),
            uid: meta.uid.clone().unwrap_or_default(),
            resource_version: meta.resource_version.clone().unwrap_or_default(),
            labels: meta.labels.clone().unwrap_or_default(),
            selector: spec.and_then(|s| s.selector.clone()).filter(|s| !s.is_empty()),
            type_: spec
                .and_then(|s| s.type_.clone())
                .unwrap_or_else(|| "ClusterIP".to_owned()),
            cluster_ip: spec.and_then(|s| s.cluster_ip.clone()),
            cluster_ips: spec
                .and_then(|s| {
                    s.cluster_ips
                        .clone()
                        .or_else(|| s.cluster_ip.clone().map(|ip| vec![ip]))
                })
                .unwrap_or_default()
                .into_iter()
                .filter(|ip| !ip.is_empty() && ip != "None")
                .collect(),
            ip_families: spec.and_then(|s| s.ip_families.clone()).unwrap_or_default(),
            publish_not_ready_addresses: spec.and_then(|s| s.publish_not_ready_addresses).unwrap_or(false),
            ports,
            node_ports: spec
                .into_iter()
                .flat_map(|s| {
                    s.ports
                        .iter()
                        .flatten()
                        .filter_map(|p| p.node_port)
                        .chain(s.health_check_node_port)
                })
                .collect(),
            traffic_distribution: spec.and_then(|s| s.traffic_distribution.clone()),
            topology_mode,
            creation_timestamp: meta.creation_timestamp.as_ref().map(|t| t.0),
            deleting: meta.deletion_timestamp.is_some(),
        }
    }
}

impl crate::runtime::Versioned for PodView {
    fn resource_version(&self) -> &str {
        &self.resource_version
    }
}

impl crate::runtime::Versioned for ServiceView {
    fn resource_version(&self) -> &str {
        &self.resource_version
    }
}

impl crate::runtime::Versioned for NodeView {
    fn resource_version(&self) -> &str {
        &self.resource_version
    }
}

impl crate::runtime::Versioned for k8s_openapi::api::discovery::v1::EndpointSlice {
    fn resource_version(&self) -> &str {
        self.metadata.resource_version.as_deref().unwrap_or_default()
    }
}

impl crate::runtime::Versioned for k8s_openapi::api::core::v1::Endpoints {
    fn resource_version(&self) -> &str {
        self.metadata.resource_version.as_deref().unwrap_or_default()
    }
}

/// Whole Services, for the loops that need every field (allocation releases).
impl crate::runtime::Versioned for Service {
    fn resource_version(&self) -> &str {
        self.metadata.resource_version.as_deref().unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::{
        ContainerPort, PodCondition, PodIP, PodSpec, PodStatus, ServicePort, ServiceSpec,
    };
    use kube::api::ObjectMeta;

    fn labels(kv: &[(&str, &str)]) -> BTreeMap<String, String> {
        kv.iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    #[test]
    fn pod_view_reads_the_endpoint_relevant_fields() {
        let pod = Pod {
            metadata: ObjectMeta {
                namespace: Some("ns".into()),
                name: Some("p".into()),
                uid: Some("u1".into()),
                labels: Some(labels(&[("app", "web")])),
                ..Default::default()
            },
            spec: Some(PodSpec {
                node_name: Some("n1".into()),
                hostname: Some("h".into()),
                subdomain: Some("web".into()),
                containers: vec![Container {
                    name: "c".into(),
                    ports: Some(vec![
                        ContainerPort {
                            name: Some("http".into()),
                            container_port: 8080,
                            ..Default::default()
                        },
                        ContainerPort {
                            container_port: 9090,
                            ..Default::default()
                        },
                        ContainerPort {
                            name: Some("dns".into()),
                            container_port: 53,
                            protocol: Some("UDP".into()),
                            ..Default::default()
                        },
                    ]),
                    ..Default::default()
                }],
                init_containers: Some(vec![
                    Container {
                        name: "sidecar".into(),
                        restart_policy: Some("Always".into()),
                        ports: Some(vec![ContainerPort {
                            name: Some("admin".into()),
                            container_port: 15000,
                            ..Default::default()
                        }]),
                        ..Default::default()
                    },
                    Container {
                        name: "init".into(),
                        ports: Some(vec![ContainerPort {
                            name: Some("setup".into()),
                            container_port: 1,
                            ..Default::default()
                        }]),
                        ..Default::default()
                    },
                ]),
                ..Default::default()
            }),
            status: Some(PodStatus {
                phase: Some("Running".into()),
                pod_ip: Some("10.0.0.1".into()),
                pod_ips: Some(vec![
                    PodIP {
                        ip: "10.0.0.1".into(),
                    },
                    PodIP { ip: "fd00::1".into() },
                ]),
                conditions: Some(vec![PodCondition {
                    type_: "Ready".into(),
                    status: "True".into(),
                    ..Default::default()
                }]),
                ..Default::default()
            }),
        };
        let v = PodView::from(&pod);
        assert_eq!(v.ips, ["10.0.0.1", "fd00::1"]);
        assert!(v.ready && !v.terminal && !v.terminating);
        assert_eq!(v.find_named_port("http", "TCP"), Some(8080));
        assert_eq!(v.find_named_port("http", "UDP"), None, "protocol must match");
        assert_eq!(v.find_named_port("dns", "UDP"), Some(53));
        assert_eq!(
            v.find_named_port("admin", "TCP"),
            Some(15000),
            "sidecar ports count"
        );
        assert_eq!(
            v.find_named_port("setup", "TCP"),
            None,
            "plain init containers do not"
        );
        assert_eq!(v.node_name.as_deref(), Some("n1"));
    }

    #[test]
    fn empty_pod_converts_without_panicking() {
        let v = PodView::from(&Pod::default());
        assert!(v.ips.is_empty() && !v.ready && v.named_ports.is_empty());
        let pod_ip_only = Pod {
            status: Some(PodStatus {
                pod_ip: Some("10.1.1.1".into()),
                phase: Some("Failed".into()),
                ..Default::default()
            }),
            ..Default::default()
        };
        let v = PodView::from(&pod_ip_only);
        assert_eq!(v.ips, ["10.1.1.1"]);
        assert!(v.terminal);
    }

    #[test]
    fn service_view_defaults_and_target_ports() {
        let svc = Service {
            metadata: ObjectMeta {
                namespace: Some("ns".into()),
                name: Some("s".into()),
                annotations: Some(labels(&[
                    (ANNOTATION_TOPOLOGY_MODE, "Auto"),
                    (ANNOTATION_TOPOLOGY_AWARE_HINTS, "disabled"),
                ])),
                ..Default::default()
            },
            spec: Some(ServiceSpec {
                selector: Some(labels(&[("app", "web")])),
                cluster_ip: Some("None".into()),
                ports: Some(vec![
                    ServicePort {
                        port: 80,
                        target_port: Some(IntOrString::String("http".into())),
                        ..Default::default()
                    },
                    ServicePort {
                        port: 81,
                        target_port: Some(IntOrString::String("8081".into())),
                        ..Default::default()
                    },
                    ServicePort {
                        port: 82,
                        ..Default::default()
                    },
                    ServicePort {
                        port: 83,
                        target_port: Some(IntOrString::Int(9083)),
                        protocol: Some("UDP".into()),
                        ..Default::default()
                    },
                ]),
                ..Default::default()
            }),
            ..Default::default()
        };
        let v = ServiceView::from(&svc);
        assert!(v.is_headless());
        assert_eq!(v.type_, "ClusterIP");
        assert_eq!(
            v.topology_mode.as_deref(),
            Some("disabled"),
            "deprecated annotation wins"
        );
        let targets: Vec<_> = v.ports.iter().map(|p| p.target_port.clone()).collect();
        assert_eq!(
            targets,
            [
                TargetPort::Name("http".into()),
                TargetPort::Number(8081),
                TargetPort::Number(82),
                TargetPort::Number(9083)
            ]
        );
        assert_eq!(v.ports[3].protocol, "UDP");
        assert_eq!(v.ports[0].protocol, "TCP");
        assert!(v.selects(&labels(&[("app", "web"), ("x", "y")])));
        assert!(!v.selects(&labels(&[("app", "db")])));
    }

    #[test]
    fn empty_selector_is_no_selector() {
        let svc = Service {
            spec: Some(ServiceSpec {
                selector: Some(BTreeMap::new()),
                ..Default::default()
            }),
            ..Default::default()
        };
        let v = ServiceView::from(&svc);
        assert_eq!(v.selector, None);
        assert!(!v.selects(&labels(&[("a", "b")])), "no selector selects nothing");
    }
}
