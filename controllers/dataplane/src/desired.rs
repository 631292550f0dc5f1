//! The node's desired state, as plain data: for every Service port and IP family, which
//! addresses it answers on and which endpoints each kind of traffic reaches. Both backends (IPVS
//! and nftables) render this; neither decides anything on its own.
//!
//! Endpoint choice follows kube-proxy: ready endpoints; when none are ready, the serving
//! terminating ones (KEP-1669), per traffic policy: `Cluster` picks among all endpoints, `Local`
//! among this node's. Traffic with nowhere to go is rejected when the Service has no endpoints at
//! all, and dropped when only the policy excludes them.
//!
//! Topology (`Cluster` policy only, as kube-proxy): the EndpointSlice controller hints each ready
//! endpoint to nodes (`trafficDistribution: PreferSameNode`) and zones (`PreferSameZone`,
//! `PreferClose`, topology-mode `Auto`). When every ready endpoint carries a node hint and one
//! names this node, only those hinted to this node are used; else the same with zone hints and
//! this node's zone; else every endpoint. One endpoint without a hint, or none for this node or
//! zone, and the hints are ignored: traffic is never sent nowhere because of them.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    net::{IpAddr, SocketAddr},
    time::Duration,
};

use super::input::{EndpointInfo, Policy, ServiceInfo, SliceInfo};
use svcplane_core::{IpFamily, ObjectKey, Protocol};

/// The node being programmed: its name, its `topology.kubernetes.io/zone` label, and the
/// cluster's Pod ranges as its agent was told them (`--cluster-cidr`, at most one per family).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ThisNode {
    pub name: String,
    pub zone: Option<String>,
    pub cluster_cidrs: Vec<ipnet::IpNet>,
}

impl ThisNode {
    /// A node without a zone label.
    pub fn named(name: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            zone: None,
            cluster_cidrs: Vec::new(),
        }
    }
}

/// A Service port, as kube-proxy names it (`namespace/name:port`).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ServicePortName {
    pub service: ObjectKey,
    pub port: String,
    pub protocol: Protocol,
}

impl std::fmt::Display for ServicePortName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}/{}", self.service, self.port, self.protocol.as_str())
    }
}

/// Where one kind of traffic goes.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Backends {
    /// Spread over these (sorted, distinct).
    To(Vec<SocketAddr>),
    /// The Service has no usable endpoints: refuse (TCP reset / ICMP unreachable).
    Reject,
    /// Endpoints exist, but none this traffic policy allows from here: drop.
    Drop,
}

impl Backends {
    pub fn endpoints(&self) -> &[SocketAddr] {
        match self {
            Self::To(e) => e,
            Self::Reject | Self::Drop => &[],
        }
    }
}

/// One Service port in one IP family.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PortState {
    pub name: ServicePortName,
    pub family: IpFamily,
    pub cluster_ip: IpAddr,
    pub port: u16,
    /// External IPs and load-balancer ingress IPs of this family.
    pub external_ips: Vec<IpAddr>,
    pub node_port: Option<u16>,
    /// ClientIP session affinity timeout.
    pub affinity: Option<Duration>,
    /// What traffic to the cluster IP reaches (`internalTrafficPolicy`).
    pub internal: Backends,
    /// What traffic to node ports and external IPs reaches (`externalTrafficPolicy`).
    pub external: Backends,
    /// `externalTrafficPolicy: Cluster`: external traffic is masqueraded, as it may leave the
    /// node to a remote endpoint whose reply must come back through here. `Local` keeps the
    /// client's address.
    pub masquerade_external: bool,
    /// The cluster's Pod range of this family, when known: traffic to the cluster IP from
    /// outside it (the node itself, clients off the cluster) is masqueraded, as kube-proxy does
    /// with `--cluster-cidr`; from inside it keeps the client's address.
    pub cluster_cidr: Option<ipnet::IpNet>,
    /// Endpoints that are terminating (for graceful termination in IPVS mode).
    pub terminating: Vec<SocketAddr>,
}

/// The health-check node port of a `Local` Service: how many local endpoints it has.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HealthCheck {
    pub service: ObjectKey,
    pub local_endpoints: usize,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DesiredState {
    pub ports: BTreeMap<(ServicePortName, IpFamily), PortState>,
    pub health_checks: BTreeMap<u16, HealthCheck>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
struct Candidate {
    addr: SocketAddr,
    ready: bool,
    serving: bool,
    terminating: bool,
    local: bool,
    /// Whether its node hints name this node (`None`: it has none).
    for_node: Option<bool>,
    /// Whether its zone hints name this node's zone (`None`: it has none).
    for_zone: Option<bool>,
}

/// Which hints decide among a port's ready endpoints.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Topology {
    Everywhere,
    SameNode,
    SameZone,
}

impl Topology {
    /// kube-proxy's rule: node hints if every ready endpoint has some and one is for this
    /// node, else zone hints likewise, else none.
    fn of(candidates: &[Candidate]) -> Self {
        let ready: Vec<&Candidate> = candidates.iter().filter(|c| c.ready).collect();
        let decides = |hint: fn(&Candidate) -> Option<bool>| {
            !ready.is_empty()
                && ready.iter().all(|c| hint(c).is_some())
                && ready.iter().any(|c| hint(c) == Some(true))
        };
        if decides(|c| c.for_node) {
            Topology::SameNode
        } else if decides(|c| c.for_zone) {
            Topology::SameZone
        } else {
            Topology::Everywhere
        }
    }

    fn admits(self, c: &Candidate) -> bool {
        match self {
            Topology::Everywhere => true,
            Topology::SameNode => c.for_node == Some(true),
            Topology::SameZone => c.for_zone == Some(true),
        }
    }
}

/// kube-proxy's choice: ready ones (of the topology's, for `Cluster` traffic), else serving
/// terminating ones (topology never applies to them: it only chooses among ready endpoints).
fn usable(candidates: &[Candidate], only_local: bool) -> Vec<SocketAddr> {
    let pool: Vec<_> = candidates.iter().filter(|c| !only_local || c.local).collect();
    let topology = if only_local {
        Topology::Everywhere
    } else {
        Topology::of(candidates)
    };
    let ready: BTreeSet<SocketAddr> = pool
        .iter()
        .filter(|c| c.ready && topology.admits(c))
        .map(|c| c.addr)
        .collect();
    if !ready.is_empty() {
        return ready.into_iter().collect();
    }
    pool.iter()
        .filter(|c| c.serving && c.terminating)
        .map(|c| c.addr)
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect()
}

fn backends(candidates: &[Candidate], policy: Policy) -> Backends {
    let all = usable(candidates, false);
    if all.is_empty() {
        return Backends::Reject;
    }
    match policy {
        Policy::Cluster => Backends::To(all),
        Policy::Local => {
            let local = usable(candidates, true);
            if local.is_empty() {
                Backends::Drop
            } else {
                Backends::To(local)
            }
        }
    }
}

/// The desired state of node `node` for `services` and their slices.
pub fn desired(node: &ThisNode, services: &[ServiceInfo], slices: &[SliceInfo]) -> DesiredState {
    let mut by_service: HashMap<&ObjectKey, Vec<&SliceInfo>> = HashMap::new();
    for s in slices {
        by_service.entry(&s.service).or_default().push(s);
    }
    let mut state = DesiredState::default();
    for svc in services {
        let svc_slices = by_service.get(&svc.key).map(Vec::as_slice).unwrap_or_default();
        state.set_service(&svc.key, Some(service_state(node, svc, svc_slices)));
    }
    state
}

/// What one Service means for node `node`: its ports in each family, and its health check.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ServiceState {
    pub ports: Vec<PortState>,
    pub health_check: Option<(u16, HealthCheck)>,
}

/// The state of one Service, from its slices (those whose `service` is it).
pub fn service_state(node: &ThisNode, svc: &ServiceInfo, svc_slices: &[&SliceInfo]) -> ServiceState {
    let mut out = ServiceState::default();
    let mut local_for_health = BTreeSet::new();
    for sp in &svc.ports {
        let name = ServicePortName {
            service: svc.key.clone(),
            port: sp.name.clone(),
            protocol: sp.protocol,
        };
        for cluster_ip in &svc.cluster_ips {
            let family = IpFamily::of(cluster_ip);
            let candidates = candidates(svc_slices, &sp.name, sp.protocol, family, node);
            local_for_health.extend(
                candidates
                    .iter()
                    .filter(|c| c.local && c.ready)
                    .map(|c| c.addr.ip()),
            );
            let terminating: BTreeSet<SocketAddr> = candidates
                .iter()
                .filter(|c| c.terminating)
                .map(|c| c.addr)
                .collect();
            out.ports.push(PortState {
                name: name.clone(),
                family,
                cluster_ip: *cluster_ip,
                port: sp.port,
                external_ips: svc
                    .external_ips
                    .iter()
                    .filter(|ip| IpFamily::of(ip) == family)
                    .copied()
                    .collect(),
                node_port: sp.node_port,
                affinity: svc.affinity,
                internal: backends(&candidates, svc.internal_policy),
                external: backends(&candidates, svc.external_policy),
                masquerade_external: svc.external_policy == Policy::Cluster,
                cluster_cidr: node
                    .cluster_cidrs
                    .iter()
                    .find(|c| IpFamily::of(&c.addr()) == family)
                    .copied(),
                terminating: terminating.into_iter().collect(),
            });
        }
    }
    if let (Some(port), Policy::Local) = (svc.health_check_node_port, svc.external_policy) {
        out.health_check = Some((
            port,
            HealthCheck {
                service: svc.key.clone(),
                local_endpoints: local_for_health.len(),
            },
        ));
    }
    out
}

impl DesiredState {
    /// Replaces what `service` contributes (`None`: it is gone). The ports of one Service are
    /// contiguous in the map (they sort by Service first).
    pub fn set_service(&mut self, service: &ObjectKey, state: Option<ServiceState>) {
        let stale: Vec<_> = self
            .ports
            .range(Self::first_of(service)..)
            .take_while(|((name, _), _)| &name.service == service)
            .map(|(k, _)| k.clone())
            .collect();
        for k in stale {
            self.ports.remove(&k);
        }
        self.health_checks.retain(|_, h| &h.service != service);
        let Some(state) = state else { return };
        for p in state.ports {
            self.ports.insert((p.name.clone(), p.family), p);
        }
        if let Some((port, h)) = state.health_check {
            self.health_checks.insert(port, h);
        }
    }

    /// The ports of `service`.
    pub fn service_ports(&self, service: &ObjectKey) -> impl Iterator<Item = &PortState> {
        self.ports
            .range(Self::first_of(service)..)
            .take_while(move |((name, _), _)| &name.service == service)
            .map(|(_, p)| p)
    }

    /// The smallest key a port of `service` can have.
    fn first_of(service: &ObjectKey) -> (ServicePortName, IpFamily) {
        (
            ServicePortName {
                service: service.clone(),
                port: String::new(),
                protocol: Protocol::Tcp,
            },
            IpFamily::IPv4,
        )
    }
}

/// The endpoints of a Service port in one family, from every slice of the Service (an address
/// listed twice counts once, ready if any listing is).
fn candidates(
    slices: &[&SliceInfo],
    port_name: &str,
    protocol: Protocol,
    family: IpFamily,
    node: &ThisNode,
) -> Vec<Candidate> {
    let mut out: BTreeMap<SocketAddr, Candidate> = BTreeMap::new();
    for slice in slices {
        let Some(port) = slice
            .ports
            .iter()
            .find(|p| p.name == port_name && p.protocol == protocol)
        else {
            continue;
        };
        for ep in &slice.endpoints {
            if IpFamily::of(&ep.ip) != family {
                continue;
            }
            let c = candidate(ep, port.port, node);
            out.entry(c.addr)
                .and_modify(|seen| {
                    if c.ready && !seen.ready {
                        *seen = c;
                    }
                })
                .or_insert(c);
        }
    }
    out.into_values().collect()
}

fn candidate(ep: &EndpointInfo, port: u16, node: &ThisNode) -> Candidate {
    let hinted = |hints: &[String], mine: Option<&str>| {
        (!hints.is_empty()).then(|| mine.is_some_and(|m| hints.iter().any(|h| h == m)))
    };
    Candidate {
        addr: SocketAddr::new(ep.ip, port),
        ready: ep.ready,
        serving: ep.serving,
        terminating: ep.terminating,
        local: ep.node_name.as_deref() == Some(node.name.as_str()),
        for_node: hinted(&ep.node_hints, Some(&node.name)),
        for_zone: hinted(&ep.zone_hints, node.zone.as_deref()),
    }
}

#[cfg(test)]
mod tests {
    use k8s_openapi::api::{core::v1::Service, discovery::v1::EndpointSlice};
    use serde_json::{Value, json};

    use super::*;
    use crate::input::{service_info, slice_info};

    const NODE: &str = "node-a";

    fn svc(spec: Value) -> Service {
        let mut spec = spec;
        if spec.get("ports").is_none() {
            spec["ports"] = json!([{"name": "http", "port": 80, "protocol": "TCP"}]);
        }
        if spec.get("clusterIPs").is_none() {
            spec["clusterIPs"] = json!(["10.96.0.10"]);
        }
        serde_json::from_value(json!({"metadata": {"namespace": "ns", "name": "web"}, "spec": spec})).unwrap()
    }

    /// A slice of `ns/web` with port `http`/8080 and endpoints `(ip, ready, serving, terminating, node)`.
    fn slice(name: &str, eps: &[(&str, bool, bool, bool, &str)]) -> EndpointSlice {
        let endpoints: Vec<Value> = eps
            .iter()
            .map(|(ip, ready, serving, terminating, node)| {
                json!({"addresses": [ip], "nodeName": node,
                       "conditions": {"ready": ready, "serving": serving, "terminating": terminating}})
            })
            .collect();
        let family = if eps.first().is_some_and(|e| e.0.contains(':')) {
            "IPv6"
        } else {
            "IPv4"
        };
        serde_json::from_value(json!({
            "metadata": {"namespace": "ns", "name": name, "labels": {"kubernetes.io/service-name": "web"}},
            "addressType": family,
            "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
            "endpoints": endpoints,
        }))
        .unwrap()
    }

    fn run(services: &[Service], slices: &[EndpointSlice]) -> DesiredState {
        run_on(&ThisNode::named(NODE), services, slices)
    }

    fn run_on(node: &ThisNode, services: &[Service], slices: &[EndpointSlice]) -> DesiredState {
        let mut problems = Vec::new();
        let s: Vec<_> = services
            .iter()
            .filter_map(|s| service_info(s, &mut problems))
            .collect();
        let e: Vec<_> = slices
            .iter()
            .filter_map(|s| slice_info(s, &mut problems))
            .collect();
        assert!(problems.is_empty(), "{problems:?}");
        desired(node, &s, &e)
    }

    fn only(state: &DesiredState) -> &PortState {
        assert_eq!(state.ports.len(), 1, "{state:#?}");
        state.ports.values().next().unwrap()
    }

    fn to(addrs: &[&str]) -> Backends {
        Backends::To(addrs.iter().map(|a| a.parse().unwrap()).collect())
    }

    const READY_A: (&str, bool, bool, bool, &str) = ("10.244.0.1", true, true, false, NODE);
    const READY_B: (&str, bool, bool, bool, &str) = ("10.244.1.1", true, true, false, "node-b");
    const TERM_A: (&str, bool, bool, bool, &str) = ("10.244.0.2", false, true, true, NODE);
    const TERM_B: (&str, bool, bool, bool, &str) = ("10.244.1.2", false, true, true, "node-b");
    const UNREADY_A: (&str, bool, bool, bool, &str) = ("10.244.0.3", false, false, false, NODE);

    #[test]
    fn cluster_ip_reaches_every_ready_endpoint() {
        let st = run(&[svc(json!({}))], &[slice("a", &[READY_A, READY_B, UNREADY_A])]);
        let p = only(&st);
        assert_eq!(p.cluster_ip, "10.96.0.10".parse::<IpAddr>().unwrap());
        assert_eq!(p.port, 80);
        assert_eq!(p.internal, to(&["10.244.0.1:8080", "10.244.1.1:8080"]));
        assert_eq!(p.node_port, None);
        assert!(p.external_ips.is_empty());
        assert!(st.health_checks.is_empty());
    }

    #[test]
    fn no_endpoints_rejects() {
        let st = run(&[svc(json!({}))], &[slice("a", &[UNREADY_A])]);
        assert_eq!(only(&st).internal, Backends::Reject);
        let st = run(&[svc(json!({}))], &[]);
        assert_eq!(only(&st).internal, Backends::Reject);
        assert_eq!(only(&st).external, Backends::Reject);
    }

    #[test]
    fn terminating_serving_endpoints_are_the_fallback_only() {
        let st = run(&[svc(json!({}))], &[slice("a", &[READY_B, TERM_A])]);
        assert_eq!(only(&st).internal, to(&["10.244.1.1:8080"]));
        assert_eq!(only(&st).terminating, ["10.244.0.2:8080".parse().unwrap()]);
        let st = run(&[svc(json!({}))], &[slice("a", &[TERM_A, TERM_B, UNREADY_A])]);
        assert_eq!(only(&st).internal, to(&["10.244.0.2:8080", "10.244.1.2:8080"]));
        // Terminating but no longer serving: nothing.
        let st = run(
            &[svc(json!({}))],
            &[slice("a", &[("10.244.0.9", false, false, true, NODE)])],
        );
        assert_eq!(only(&st).internal, Backends::Reject);
    }

    #[test]
    fn node_port_and_load_balancer_answer_externally() {
        let np = svc(json!({"type": "NodePort", "ports": [{"name": "http", "port": 80, "nodePort": 30080}]}));
        let st = run(&[np], &[slice("a", &[READY_A, READY_B])]);
        let p = only(&st);
        assert_eq!(p.node_port, Some(30080));
        assert_eq!(p.external, to(&["10.244.0.1:8080", "10.244.1.1:8080"]));
        assert!(p.masquerade_external);

        let mut lb = svc(json!({"type": "LoadBalancer", "externalIPs": ["192.0.2.7"],
            "ports": [{"name": "http", "port": 80, "nodePort": 30081}]}));
        lb.status = serde_json::from_value(
            json!({"loadBalancer": {"ingress": [{"ip": "198.51.100.1"}, {"hostname": "lb.example"}]}}),
        )
        .unwrap();
        let st = run(&[lb], &[slice("a", &[READY_A])]);
        let p = only(&st);
        assert_eq!(
            p.external_ips,
            [
                "192.0.2.7".parse::<IpAddr>().unwrap(),
                "198.51.100.1".parse().unwrap()
            ]
        );
        assert_eq!(p.node_port, Some(30081));

        // A ClusterIP Service that happens to carry a nodePort gets no node port.
        let st = run(
            &[svc(
                json!({"ports": [{"name": "http", "port": 80, "nodePort": 30082}]}),
            )],
            &[slice("a", &[READY_A])],
        );
        assert_eq!(only(&st).node_port, None);
    }

    #[test]
    fn external_traffic_policy_local_keeps_to_local_endpoints_and_the_client_address() {
        let s = svc(
            json!({"type": "NodePort", "externalTrafficPolicy": "Local", "healthCheckNodePort": 32000,
            "ports": [{"name": "http", "port": 80, "nodePort": 30080}]}),
        );
        let st = run(std::slice::from_ref(&s), &[slice("a", &[READY_A, READY_B])]);
        let p = only(&st);
        assert_eq!(p.external, to(&["10.244.0.1:8080"]));
        assert_eq!(
            p.internal,
            to(&["10.244.0.1:8080", "10.244.1.1:8080"]),
            "cluster IP unaffected"
        );
        assert!(!p.masquerade_external);
        assert_eq!(st.health_checks[&32000].local_endpoints, 1);

        // No local endpoint: external traffic is dropped (other nodes have some), health fails.
        let st = run(std::slice::from_ref(&s), &[slice("a", &[READY_B])]);
        assert_eq!(only(&st).external, Backends::Drop);
        assert_eq!(st.health_checks[&32000].local_endpoints, 0);

        // Local endpoints all terminating: the serving terminating local ones.
        let st = run(std::slice::from_ref(&s), &[slice("a", &[READY_B, TERM_A])]);
        assert_eq!(only(&st).external, to(&["10.244.0.2:8080"]));
        assert_eq!(only(&st).internal, to(&["10.244.1.1:8080"]));
    }

    #[test]
    fn internal_traffic_policy_local() {
        let s = svc(json!({"internalTrafficPolicy": "Local"}));
        let st = run(std::slice::from_ref(&s), &[slice("a", &[READY_A, READY_B])]);
        assert_eq!(only(&st).internal, to(&["10.244.0.1:8080"]));
        let st = run(&[s], &[slice("a", &[READY_B])]);
        assert_eq!(only(&st).internal, Backends::Drop);
    }

    #[test]
    fn client_ip_affinity_with_its_timeout_or_the_default() {
        let st = run(&[svc(json!({"sessionAffinity": "ClientIP"}))], &[]);
        assert_eq!(only(&st).affinity, Some(Duration::from_secs(10800)));
        let st = run(
            &[svc(json!({"sessionAffinity": "ClientIP",
                "sessionAffinityConfig": {"clientIP": {"timeoutSeconds": 60}}}))],
            &[],
        );
        assert_eq!(only(&st).affinity, Some(Duration::from_secs(60)));
        assert_eq!(only(&run(&[svc(json!({}))], &[])).affinity, None);
    }

    #[test]
    fn each_port_maps_to_its_named_slice_port() {
        let s = svc(
            json!({"ports": [{"name": "http", "port": 80}, {"name": "dns", "port": 53, "protocol": "UDP"}]}),
        );
        let mut sl = slice("a", &[READY_A]);
        sl.ports = Some(
            serde_json::from_value(json!([
                {"name": "http", "port": 8080, "protocol": "TCP"},
                {"name": "dns", "port": 5353, "protocol": "UDP"}
            ]))
            .unwrap(),
        );
        let st = run(&[s], &[sl]);
        assert_eq!(st.ports.len(), 2);
        let by_port: BTreeMap<u16, &PortState> = st.ports.values().map(|p| (p.port, p)).collect();
        assert_eq!(by_port[&80].internal, to(&["10.244.0.1:8080"]));
        assert_eq!(by_port[&53].internal, to(&["10.244.0.1:5353"]));
        assert_eq!(by_port[&53].name.protocol, Protocol::Udp);
    }

    #[test]
    fn dual_stack_keeps_families_apart() {
        let s = svc(
            json!({"clusterIPs": ["10.96.0.10", "fd00:10:96::10"], "externalIPs": ["192.0.2.1", "2001:db8::1"]}),
        );
        let st = run(
            &[s],
            &[
                slice("v4", &[READY_A]),
                slice("v6", &[("fd00:244::1", true, true, false, NODE)]),
            ],
        );
        assert_eq!(st.ports.len(), 2);
        let v6 = st.ports.values().find(|p| p.family == IpFamily::IPv6).unwrap();
        assert_eq!(v6.cluster_ip, "fd00:10:96::10".parse::<IpAddr>().unwrap());
        assert_eq!(v6.internal, to(&["[fd00:244::1]:8080"]));
        assert_eq!(v6.external_ips, ["2001:db8::1".parse::<IpAddr>().unwrap()]);
        let v4 = st.ports.values().find(|p| p.family == IpFamily::IPv4).unwrap();
        assert_eq!(v4.internal, to(&["10.244.0.1:8080"]));
        assert_eq!(v4.external_ips, ["192.0.2.1".parse::<IpAddr>().unwrap()]);
    }

    #[test]
    fn headless_and_external_name_get_nothing() {
        let headless = svc(json!({"clusterIP": "None", "clusterIPs": ["None"]}));
        let external = svc(json!({"type": "ExternalName", "externalName": "example.com", "clusterIPs": []}));
        let st = run(&[headless, external], &[slice("a", &[READY_A])]);
        assert!(st.ports.is_empty());
    }

    #[test]
    fn an_address_in_two_slices_counts_once_and_ready_wins() {
        let st = run(
            &[svc(json!({}))],
            &[
                slice("a", &[("10.244.0.1", false, false, false, NODE)]),
                slice("b", &[READY_A]),
            ],
        );
        assert_eq!(only(&st).internal, to(&["10.244.0.1:8080"]));
    }

    #[test]
    fn bad_data_is_reported_and_skipped() {
        let mut problems = Vec::new();
        let s = svc(
            json!({"clusterIPs": ["10.96.0.10", "not-an-ip"], "externalIPs": ["bogus"],
            "ports": [{"name": "zero", "port": 0}, {"name": "sctp", "port": 9, "protocol": "SCTP"},
                      {"name": "weird", "port": 10, "protocol": "QUIC"}]}),
        );
        let info = service_info(&s, &mut problems).unwrap();
        assert_eq!(info.cluster_ips.len(), 1);
        assert_eq!(info.ports.len(), 1, "only the SCTP port is usable");
        assert_eq!(problems.len(), 4, "{problems:?}");
        let mut sl = slice("a", &[READY_A]);
        sl.endpoints.as_mut().unwrap()[0].addresses = vec!["nope".into()];
        sl.ports = Some(serde_json::from_value(json!([{"name": "http", "port": 0}])).unwrap());
        let info = slice_info(&sl, &mut problems).unwrap();
        assert!(info.endpoints.is_empty() && info.ports.is_empty());
        assert_eq!(problems.len(), 6);
    }

    #[test]
    fn a_service_with_a_hundred_ports_gets_each() {
        let ports: Vec<Value> = (0..100)
            .map(|i| json!({"name": format!("p{i}"), "port": 1000 + i}))
            .collect();
        let st = run(&[svc(json!({"ports": ports}))], &[]);
        assert_eq!(st.ports.len(), 100);
    }

    /// A slice of `ns/web` whose endpoints `(ip, ready, zone hints, node hints)` are on other
    /// nodes.
    fn hinted(eps: &[(&str, bool, &[&str], &[&str])]) -> EndpointSlice {
        let endpoints: Vec<Value> = eps
            .iter()
            .map(|(ip, ready, zones, nodes)| {
                let mut hints = json!({});
                if !zones.is_empty() {
                    hints["forZones"] = zones.iter().map(|z| json!({"name": z})).collect();
                }
                if !nodes.is_empty() {
                    hints["forNodes"] = nodes.iter().map(|n| json!({"name": n})).collect();
                }
                json!({"addresses": [ip], "nodeName": "elsewhere", "hints": hints,
                       "conditions": {"ready": ready, "serving": true, "terminating": !ready}})
            })
            .collect();
        serde_json::from_value(json!({
            "metadata": {"namespace": "ns", "name": "web-hinted", "labels": {"kubernetes.io/service-name": "web"}},
            "addressType": "IPv4",
            "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
            "endpoints": endpoints,
        }))
        .unwrap()
    }

    fn in_zone(zone: &str) -> ThisNode {
        ThisNode {
            zone: Some(zone.into()),
            ..ThisNode::named(NODE)
        }
    }

    #[test]
    fn zone_hints_keep_cluster_traffic_in_the_nodes_zone() {
        let slice = hinted(&[
            ("10.244.0.1", true, &["a"], &[]),
            ("10.244.0.2", true, &["a"], &[]),
            ("10.244.1.1", true, &["b"], &[]),
        ]);
        let st = run_on(&in_zone("a"), &[svc(json!({}))], std::slice::from_ref(&slice));
        assert_eq!(only(&st).internal, to(&["10.244.0.1:8080", "10.244.0.2:8080"]));
        let st = run_on(&in_zone("b"), &[svc(json!({}))], std::slice::from_ref(&slice));
        assert_eq!(only(&st).internal, to(&["10.244.1.1:8080"]));
        // No endpoint hinted for the node's zone, or the node has no zone: every endpoint.
        let all = to(&["10.244.0.1:8080", "10.244.0.2:8080", "10.244.1.1:8080"]);
        let st = run_on(&in_zone("c"), &[svc(json!({}))], std::slice::from_ref(&slice));
        assert_eq!(only(&st).internal, all);
        let st = run_on(&ThisNode::named(NODE), &[svc(json!({}))], &[slice]);
        assert_eq!(only(&st).internal, all);
    }

    #[test]
    fn one_ready_endpoint_without_a_hint_and_the_hints_are_ignored() {
        let slice = hinted(&[
            ("10.244.0.1", true, &["a"], &[]),
            ("10.244.1.1", true, &[], &[]),
            // Not ready: its missing hint does not count, and it is never used.
            ("10.244.2.1", false, &[], &[]),
        ]);
        let st = run_on(&in_zone("a"), &[svc(json!({}))], &[slice]);
        assert_eq!(only(&st).internal, to(&["10.244.0.1:8080", "10.244.1.1:8080"]));
        let slice = hinted(&[("10.244.0.1", true, &["a"], &[]), ("10.244.2.1", false, &[], &[])]);
        let st = run_on(&in_zone("a"), &[svc(json!({}))], &[slice]);
        assert_eq!(only(&st).internal, to(&["10.244.0.1:8080"]));
    }

    #[test]
    fn node_hints_come_before_zone_hints_and_fall_back_to_them() {
        let slice = hinted(&[
            ("10.244.0.1", true, &["a"], &[NODE]),
            ("10.244.0.2", true, &["a"], &["node-x"]),
            ("10.244.1.1", true, &["b"], &["node-y"]),
        ]);
        let st = run_on(&in_zone("a"), &[svc(json!({}))], std::slice::from_ref(&slice));
        assert_eq!(only(&st).internal, to(&["10.244.0.1:8080"]));
        // Nothing hinted for this node: the zone's.
        let other = ThisNode {
            zone: Some("a".into()),
            ..ThisNode::named("node-z")
        };
        let st = run_on(&other, &[svc(json!({}))], &[slice]);
        assert_eq!(only(&st).internal, to(&["10.244.0.1:8080", "10.244.0.2:8080"]));
    }

    #[test]
    fn hints_do_not_apply_to_local_policy_or_to_the_terminating_fallback() {
        // Local policy: this node's endpoints, whatever the hints.
        let mut slice = hinted(&[
            ("10.244.0.1", true, &["b"], &[]),
            ("10.244.1.1", true, &["a"], &[]),
        ]);
        slice.endpoints.as_mut().unwrap()[0].node_name = Some(NODE.into());
        let st = run_on(
            &in_zone("a"),
            &[svc(json!({"internalTrafficPolicy": "Local"}))],
            &[slice],
        );
        assert_eq!(only(&st).internal, to(&["10.244.0.1:8080"]));
        // No ready endpoint: the serving terminating ones, hints or not.
        let slice = hinted(&[
            ("10.244.0.1", false, &["b"], &[]),
            ("10.244.1.1", false, &["a"], &[]),
        ]);
        let st = run_on(&in_zone("a"), &[svc(json!({}))], &[slice]);
        assert_eq!(only(&st).internal, to(&["10.244.0.1:8080", "10.244.1.1:8080"]));
    }

    #[test]
    fn each_family_takes_its_own_pod_range() {
        let node = ThisNode {
            cluster_cidrs: vec![
                "fd00:10:244::/56".parse().unwrap(),
                "10.244.0.0/16".parse().unwrap(),
            ],
            ..ThisNode::named(NODE)
        };
        let dual = svc(json!({"clusterIPs": ["10.96.0.10", "fd00::10"]}));
        let st = run_on(&node, &[dual], &[]);
        let cidr = |family| {
            st.ports
                .values()
                .find(|p| p.family == family)
                .and_then(|p| p.cluster_cidr)
        };
        assert_eq!(cidr(IpFamily::IPv4), Some("10.244.0.0/16".parse().unwrap()));
        assert_eq!(cidr(IpFamily::IPv6), Some("fd00:10:244::/56".parse().unwrap()));
        let v4_only = ThisNode {
            cluster_cidrs: vec!["10.244.0.0/16".parse().unwrap()],
            ..ThisNode::named(NODE)
        };
        let st = run_on(&v4_only, &[svc(json!({"clusterIPs": ["fd00::10"]}))], &[]);
        assert_eq!(
            only(&st).cluster_cidr,
            None,
            "no range of the family: nothing masqueraded"
        );
    }
}
