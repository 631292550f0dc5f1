//! What the mutating admission webhook must allocate for a Service, decided as kube-apiserver's
//! own allocation step decides it (IP families from `ipFamilyPolicy`/`ipFamilies`/`clusterIPs`,
//! one NodePort per Service port number shared by its protocols, a health-check NodePort for
//! `LoadBalancer` Services with `externalTrafficPolicy: Local`), and the fields to fill in once the
//! values are allocated.
//!
//! The webhook runs before the apiserver's registry: the Service it sees has been defaulted by
//! the API (type, protocols, target ports) but not by the registry (IP families). It therefore
//! fills `ipFamilies` and `ipFamilyPolicy` too, so that the apiserver's own allocator finds every
//! value chosen and merely records it.

use std::{collections::BTreeMap, net::IpAddr};

use json_patch::{AddOperation, Patch, PatchOperation, jsonptr::PointerBuf};
use k8s_openapi::api::core::v1::{Service, ServiceSpec};
use serde_json::{Value, json};
use svcplane_core::IpFamily;

/// The families the cluster's service ranges cover, the primary (default) first.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClusterFamilies(pub Vec<IpFamily>);

impl ClusterFamilies {
    fn has(&self, f: IpFamily) -> bool {
        self.0.contains(&f)
    }

    fn primary(&self) -> IpFamily {
        self.0.first().copied().unwrap_or(IpFamily::IPv4)
    }
}

/// A value to allocate: any free one, or the one the user asked for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Want<V> {
    Next,
    Exactly(V),
}

/// What to allocate for one admission request.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Plan {
    /// Cluster IPs, one per family, in `ipFamilies` order.
    pub cluster_ips: Vec<(IpFamily, Want<IpAddr>)>,
    /// The IPs extend the Service's existing `clusterIPs` (a dual-stack upgrade) instead of
    /// being all of them.
    pub append_cluster_ips: bool,
    /// Families and policy to write (when the request left them to the registry).
    pub ip_families: Option<Vec<IpFamily>>,
    pub ip_family_policy: Option<String>,
    /// One NodePort per distinct Service port number: (port number, want). Ports sharing a
    /// number (e.g. DNS over TCP and UDP) share the NodePort.
    pub node_ports: Vec<(i32, Want<u16>)>,
    pub health_check_node_port: Option<Want<u16>>,
}

impl Plan {
    pub fn is_empty(&self) -> bool {
        self.cluster_ips.is_empty()
            && self.node_ports.is_empty()
            && self.health_check_node_port.is_none()
            && self.ip_families.is_none()
            && self.ip_family_policy.is_none()
    }
}

impl Plan {
    /// NodePorts this plan takes from the range (chosen ones included).
    pub fn node_port_count(&self) -> usize {
        self.node_ports.len() + usize::from(self.health_check_node_port.is_some())
    }

    /// Values this plan takes from the ranges: ClusterIPs and NodePorts.
    pub fn value_count(&self) -> usize {
        self.cluster_ips.len() + self.node_port_count()
    }

    /// Whether one request may take this much: a single Service (or a forged request) must not
    /// be able to drain a range.
    pub fn within(&self, limits: &Limits) -> Result<(), Refusal> {
        let wanted = self.node_port_count();
        match limits.max_node_ports {
            Some(max) if wanted > max => Err(Refusal::TooManyNodePorts { wanted, max }),
            _ => Ok(()),
        }
    }
}

/// What one request may take.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Limits {
    /// NodePorts per Service (`--max-node-ports-per-service`); `None`: no limit.
    pub max_node_ports: Option<usize>,
}

/// A request the webhook refuses, with the message the user sees.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Refusal {
    #[error("spec.clusterIPs[{index}]: {value:?} is not a valid IP address")]
    BadClusterIp { index: usize, value: String },
    #[error("spec.ipFamilies: {0} is not configured on this cluster")]
    FamilyNotConfigured(String),
    #[error("spec.ipFamilyPolicy: this cluster is not configured for dual-stack services")]
    NotDualStack,
    #[error("spec.ports[{index}].nodePort: {value} is not a valid port")]
    BadNodePort { index: usize, value: i32 },
    #[error("spec.healthCheckNodePort: {0} is not a valid port")]
    BadHealthCheckNodePort(i32),
    #[error(
        "spec.ports: this Service needs {wanted} NodePorts, more than the {max} one Service may take (the controller-manager's --max-node-ports-per-service)"
    )]
    TooManyNodePorts { wanted: usize, max: usize },
}

fn spec(svc: &Service) -> ServiceSpec {
    svc.spec.clone().unwrap_or_default()
}

fn type_of(spec: &ServiceSpec) -> &str {
    spec.type_.as_deref().unwrap_or("ClusterIP")
}

fn is_headless(spec: &ServiceSpec) -> bool {
    spec.cluster_ip.as_deref() == Some("None")
        || spec
            .cluster_ips
            .as_ref()
            .and_then(|c| c.first())
            .map(String::as_str)
            == Some("None")
}

/// Whether the Service's ports get NodePorts: `NodePort`, and `LoadBalancer` unless
/// `allocateLoadBalancerNodePorts: false`.
fn wants_node_ports(spec: &ServiceSpec) -> bool {
    match type_of(spec) {
        "NodePort" => true,
        "LoadBalancer" => spec.allocate_load_balancer_node_ports != Some(false),
        _ => false,
    }
}

fn needs_health_check(spec: &ServiceSpec) -> bool {
    type_of(spec) == "LoadBalancer" && spec.external_traffic_policy.as_deref() == Some("Local")
}

fn port_value(v: i32) -> Option<u16> {
    u16::try_from(v).ok().filter(|p| *p > 0)
}

/// The plan for a CREATE.
pub fn plan_create(svc: &Service, cluster: &ClusterFamilies) -> Result<Plan, Refusal> {
    let spec = spec(svc);
    let mut plan = Plan::default();
    if type_of(&spec) == "ExternalName" {
        return Ok(plan);
    }
    if !is_headless(&spec) {
        plan_cluster_ips(&spec, cluster, &mut plan)?;
    }
    plan_node_ports(&spec, None, &mut plan)?;
    if needs_health_check(&spec) {
        plan.health_check_node_port = Some(match spec.health_check_node_port.filter(|p| *p != 0) {
            None => Want::Next,
            Some(p) => Want::Exactly(port_value(p).ok_or(Refusal::BadHealthCheckNodePort(p))?),
        });
    }
    Ok(plan)
}

/// The plan for an UPDATE: only what the update newly needs (a type change that brings cluster
/// IPs or NodePorts, ports added, a second family, a health check); what the update drops is
/// released by the controller that watches Services, once the update is stored.
pub fn plan_update(old: &Service, new: &Service, cluster: &ClusterFamilies) -> Result<Plan, Refusal> {
    let (old_spec, spec) = (self::spec(old), self::spec(new));
    let mut plan = Plan::default();
    if type_of(&spec) == "ExternalName" {
        return Ok(plan);
    }
    let had_ips = type_of(&old_spec) != "ExternalName" && !is_headless(&old_spec);
    if !is_headless(&spec) {
        if !had_ips {
            plan_cluster_ips(&spec, cluster, &mut plan)?;
        } else {
            // Upgrades to dual-stack add the second family; the first is immutable.
            let families = spec.ip_families.clone().unwrap_or_default();
            let ips = spec.cluster_ips.clone().unwrap_or_default();
            let policy = spec.ip_family_policy.as_deref().unwrap_or("SingleStack");
            if policy != "SingleStack" && ips.len() == 1 {
                let primary = ips
                    .first()
                    .and_then(|ip| ip.parse::<IpAddr>().ok())
                    .map(|ip| IpFamily::of(&ip));
                let second = families
                    .get(1)
                    .and_then(|f| IpFamily::parse(f))
                    .or(primary.map(IpFamily::other));
                match second {
                    Some(f) if cluster.has(f) => {
                        plan.cluster_ips.push((f, Want::Next));
                        plan.append_cluster_ips = true;
                        if families.len() < 2 {
                            plan.ip_families = Some(primary.into_iter().chain([f]).collect());
                        }
                    }
                    Some(f) if policy == "RequireDualStack" => {
                        return Err(Refusal::FamilyNotConfigured(f.as_str().into()));
                    }
                    _ => {}
                }
            }
        }
    }
    plan_node_ports(&spec, Some(&old_spec), &mut plan)?;
    if needs_health_check(&spec) && spec.health_check_node_port.unwrap_or(0) == 0 {
        plan.health_check_node_port = Some(Want::Next);
    } else if needs_health_check(&spec)
        && let Some(p) = spec
            .health_check_node_port
            .filter(|p| *p != 0 && Some(*p) != old_spec.health_check_node_port)
    {
        plan.health_check_node_port = Some(Want::Exactly(
            port_value(p).ok_or(Refusal::BadHealthCheckNodePort(p))?,
        ));
    }
    Ok(plan)
}

fn plan_cluster_ips(spec: &ServiceSpec, cluster: &ClusterFamilies, plan: &mut Plan) -> Result<(), Refusal> {
    // User-chosen IPs, from clusterIPs or the older clusterIP field.
    let mut chosen: Vec<IpAddr> = Vec::new();
    let given: Vec<String> = match (&spec.cluster_ips, &spec.cluster_ip) {
        (Some(ips), _) if !ips.is_empty() => ips.clone(),
        (_, Some(ip)) if !ip.is_empty() => vec![ip.clone()],
        _ => Vec::new(),
    };
    for (index, value) in given.iter().enumerate() {
        chosen.push(value.parse().map_err(|_| Refusal::BadClusterIp {
            index,
            value: value.clone(),
        })?);
    }
    let policy = spec.ip_family_policy.clone();
    let effective_policy = policy.clone().unwrap_or_else(|| "SingleStack".into());
    let mut families: Vec<IpFamily> = Vec::new();
    for f in spec.ip_families.iter().flatten() {
        let fam = IpFamily::parse(f).ok_or_else(|| Refusal::FamilyNotConfigured(f.clone()))?;
        if !cluster.has(fam) {
            return Err(Refusal::FamilyNotConfigured(f.clone()));
        }
        families.push(fam);
    }
    // Families of chosen IPs fill in what ipFamilies left out.
    for ip in &chosen[families.len().min(chosen.len())..] {
        let fam = IpFamily::of(ip);
        if !cluster.has(fam) {
            return Err(Refusal::FamilyNotConfigured(fam.as_str().into()));
        }
        families.push(fam);
    }
    if families.is_empty() {
        families.push(cluster.primary());
    }
    if effective_policy == "RequireDualStack" && cluster.0.len() < 2 {
        return Err(Refusal::NotDualStack);
    }
    if effective_policy != "SingleStack" && families.len() == 1 && cluster.0.len() == 2 {
        families.push(families[0].other());
    }
    let wrote_families = spec
        .ip_families
        .as_ref()
        .is_none_or(|f| f.len() != families.len());
    for (i, fam) in families.iter().enumerate() {
        let want = chosen.get(i).map_or(Want::Next, |ip| Want::Exactly(*ip));
        plan.cluster_ips.push((*fam, want));
    }
    if wrote_families {
        plan.ip_families = Some(families);
    }
    if policy.is_none() {
        plan.ip_family_policy = Some(effective_policy);
    }
    Ok(())
}

fn plan_node_ports(spec: &ServiceSpec, old: Option<&ServiceSpec>, plan: &mut Plan) -> Result<(), Refusal> {
    let ports = spec.ports.clone().unwrap_or_default();
    let auto = wants_node_ports(spec);
    // NodePorts the old Service held, by port number: an update keeps them.
    let held: BTreeMap<i32, i32> = old
        .map(|o| {
            o.ports
                .iter()
                .flatten()
                .filter_map(|p| Some((p.port, p.node_port.filter(|n| *n != 0)?)))
                .collect()
        })
        .unwrap_or_default();
    let mut by_number: BTreeMap<i32, Want<u16>> = BTreeMap::new();
    for (index, p) in ports.iter().enumerate() {
        let requested = p.node_port.filter(|n| *n != 0);
        if requested.is_none() && !auto {
            continue;
        }
        if by_number.contains_key(&p.port) {
            continue;
        }
        // A number requested on any port of that number is honoured for all of them.
        let requested = requested.or_else(|| {
            ports
                .iter()
                .filter(|q| q.port == p.port)
                .find_map(|q| q.node_port.filter(|n| *n != 0))
        });
        let want = match requested {
            Some(n) if held.get(&p.port) == Some(&n) => continue,
            Some(n) => Want::Exactly(port_value(n).ok_or(Refusal::BadNodePort { index, value: n })?),
            None => Want::Next,
        };
        by_number.insert(p.port, want);
    }
    plan.node_ports = by_number.into_iter().collect();
    Ok(())
}

/// Values allocated for a plan, in the plan's order.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Allocated {
    pub cluster_ips: Vec<IpAddr>,
    pub node_ports: Vec<u16>,
    pub health_check_node_port: Option<u16>,
}

/// The JSON Patch that writes the allocated values (and the families the plan decided) into the
/// Service as admitted.
pub fn patch(svc: &Service, plan: &Plan, got: &Allocated) -> Patch {
    let spec = spec(svc);
    let field = |name: &str| PointerBuf::from_tokens(["spec", name]);
    let add = |path: PointerBuf, value: Value| PatchOperation::Add(AddOperation { path, value });
    let mut ops = Vec::new();
    if let Some(fams) = &plan.ip_families {
        let v: Vec<&str> = fams.iter().map(|f| f.as_str()).collect();
        ops.push(add(field("ipFamilies"), json!(v)));
    }
    if let Some(p) = &plan.ip_family_policy {
        ops.push(add(field("ipFamilyPolicy"), json!(p)));
    }
    if !plan.cluster_ips.is_empty() {
        let fresh = got.cluster_ips.iter().map(IpAddr::to_string);
        let ips: Vec<String> = if plan.append_cluster_ips {
            spec.cluster_ips
                .clone()
                .unwrap_or_default()
                .into_iter()
                .chain(fresh)
                .collect()
        } else {
            fresh.collect()
        };
        if let Some(first) = ips.first() {
            ops.push(add(field("clusterIP"), json!(first)));
        }
        ops.push(add(field("clusterIPs"), json!(ips)));
    }
    let by_number: BTreeMap<i32, u16> = plan
        .node_ports
        .iter()
        .map(|(n, _)| *n)
        .zip(got.node_ports.iter().copied())
        .collect();
    for (i, p) in spec.ports.iter().flatten().enumerate() {
        if let Some(np) = by_number.get(&p.port)
            && p.node_port.unwrap_or(0) != i32::from(*np)
        {
            let mut path = field("ports");
            path.push_back(i);
            path.push_back("nodePort");
            ops.push(add(path, json!(np)));
        }
    }
    if let Some(hc) = got.health_check_node_port {
        ops.push(add(field("healthCheckNodePort"), json!(hc)));
    }
    Patch(ops)
}

/// Every cluster IP and NodePort a stored Service holds, for releases and repair.
pub fn held_values(svc: &Service) -> (Vec<IpAddr>, Vec<u16>) {
    let spec = spec(svc);
    let ports = spec.ports.iter().flatten().filter_map(|p| p.node_port);
    held(
        type_of(&spec),
        spec.cluster_ips
            .iter()
            .flatten()
            .chain(spec.cluster_ip.iter())
            .map(String::as_str),
        ports.chain(spec.health_check_node_port),
    )
}

/// What a Service of `type_` with these cluster IPs and node ports (as stored) holds: the one
/// rule, whichever form of the Service it is read from.
pub fn held<'a>(
    type_: &str,
    cluster_ips: impl IntoIterator<Item = &'a str>,
    node_ports: impl IntoIterator<Item = i32>,
) -> (Vec<IpAddr>, Vec<u16>) {
    let ips = if type_ == "ExternalName" {
        Vec::new()
    } else {
        cluster_ips
            .into_iter()
            .filter_map(|s| s.parse().ok())
            .collect::<std::collections::BTreeSet<IpAddr>>()
            .into_iter()
            .collect()
    };
    let mut ports: Vec<u16> = node_ports.into_iter().filter_map(port_value).collect();
    ports.sort_unstable();
    ports.dedup();
    (ips, ports)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The patch as the apiserver receives it.
    fn ops(patch: Patch) -> Vec<Value> {
        match serde_json::to_value(patch).unwrap() {
            Value::Array(ops) => ops,
            other => panic!("a JSON Patch is an array: {other}"),
        }
    }
    use k8s_openapi::api::core::v1::ServicePort;

    fn v4() -> ClusterFamilies {
        ClusterFamilies(vec![IpFamily::IPv4])
    }

    fn dual() -> ClusterFamilies {
        ClusterFamilies(vec![IpFamily::IPv4, IpFamily::IPv6])
    }

    fn svc(f: impl FnOnce(&mut ServiceSpec)) -> Service {
        let mut spec = ServiceSpec {
            type_: Some("ClusterIP".into()),
            ports: Some(vec![ServicePort {
                name: Some("http".into()),
                port: 80,
                protocol: Some("TCP".into()),
                ..Default::default()
            }]),
            ..Default::default()
        };
        f(&mut spec);
        Service {
            spec: Some(spec),
            ..Default::default()
        }
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn one_service_takes_at_most_the_node_port_limit() {
        let many = |n: i32, hc: bool| {
            svc(|s| {
                s.type_ = Some("LoadBalancer".into());
                if hc {
                    s.external_traffic_policy = Some("Local".into());
                }
                s.ports = Some(
                    (1..=n)
                        .map(|p| ServicePort {
                            name: Some(format!("p{p}")),
                            port: p,
                            protocol: Some("TCP".into()),
                            ..Default::default()
                        })
                        .collect(),
                );
            })
        };
        let limits = Limits {
            max_node_ports: Some(3),
        };
        assert_eq!(
            plan_create(&many(3, false), &v4()).unwrap().within(&limits),
            Ok(())
        );
        // The health-check NodePort counts too.
        assert_eq!(
            plan_create(&many(3, true), &v4()).unwrap().within(&limits),
            Err(Refusal::TooManyNodePorts { wanted: 4, max: 3 })
        );
        let refusal = plan_create(&many(3000, false), &v4())
            .unwrap()
            .within(&limits)
            .unwrap_err();
        assert!(refusal.to_string().contains("needs 3000 NodePorts"), "{refusal}");
        assert_eq!(
            plan_create(&many(3000, false), &v4())
                .unwrap()
                .within(&Limits::default()),
            Ok(())
        );
    }

    #[test]
    fn cluster_ip_families_follow_the_policy() {
        let p = plan_create(&svc(|_| {}), &v4()).unwrap();
        assert_eq!(p.cluster_ips, [(IpFamily::IPv4, Want::Next)]);
        assert_eq!(p.ip_families, Some(vec![IpFamily::IPv4]));
        assert_eq!(p.ip_family_policy.as_deref(), Some("SingleStack"));

        let p = plan_create(&svc(|_| {}), &dual()).unwrap();
        assert_eq!(
            p.cluster_ips,
            [(IpFamily::IPv4, Want::Next)],
            "single-stack by default, primary family"
        );

        let prefer = svc(|s| s.ip_family_policy = Some("PreferDualStack".into()));
        let p = plan_create(&prefer, &dual()).unwrap();
        assert_eq!(
            p.cluster_ips,
            [(IpFamily::IPv4, Want::Next), (IpFamily::IPv6, Want::Next)]
        );
        assert_eq!(p.ip_families, Some(vec![IpFamily::IPv4, IpFamily::IPv6]));
        assert_eq!(p.ip_family_policy, None, "the user's policy stays");
        assert_eq!(
            plan_create(&prefer, &v4()).unwrap().cluster_ips.len(),
            1,
            "prefer degrades on single-stack"
        );

        let v6_first = svc(|s| {
            s.ip_family_policy = Some("RequireDualStack".into());
            s.ip_families = Some(vec!["IPv6".into()]);
        });
        let p = plan_create(&v6_first, &dual()).unwrap();
        assert_eq!(
            p.cluster_ips,
            [(IpFamily::IPv6, Want::Next), (IpFamily::IPv4, Want::Next)]
        );
        assert_eq!(
            plan_create(&v6_first, &v4()),
            Err(Refusal::FamilyNotConfigured("IPv6".into()))
        );
        let require = svc(|s| s.ip_family_policy = Some("RequireDualStack".into()));
        assert_eq!(plan_create(&require, &v4()), Err(Refusal::NotDualStack));
    }

    #[test]
    fn user_chosen_cluster_ips_are_requested_exactly() {
        let s = svc(|s| s.cluster_ip = Some("10.96.0.10".into()));
        assert_eq!(
            plan_create(&s, &v4()).unwrap().cluster_ips,
            [(IpFamily::IPv4, Want::Exactly(ip("10.96.0.10")))]
        );
        let s = svc(|s| {
            s.cluster_ips = Some(vec!["fd00::10".into(), "10.96.0.10".into()]);
            s.ip_family_policy = Some("RequireDualStack".into());
        });
        let p = plan_create(&s, &dual()).unwrap();
        assert_eq!(
            p.cluster_ips,
            [
                (IpFamily::IPv6, Want::Exactly(ip("fd00::10"))),
                (IpFamily::IPv4, Want::Exactly(ip("10.96.0.10")))
            ]
        );
        let bad = svc(|s| s.cluster_ip = Some("10.96.0.300".into()));
        assert!(matches!(
            plan_create(&bad, &v4()),
            Err(Refusal::BadClusterIp { index: 0, .. })
        ));
        let v6_on_v4 = svc(|s| s.cluster_ip = Some("fd00::1".into()));
        assert_eq!(
            plan_create(&v6_on_v4, &v4()),
            Err(Refusal::FamilyNotConfigured("IPv6".into()))
        );
    }

    #[test]
    fn headless_and_external_name_get_no_ips() {
        let headless = svc(|s| s.cluster_ip = Some("None".into()));
        assert!(plan_create(&headless, &dual()).unwrap().cluster_ips.is_empty());
        let ext = svc(|s| {
            s.type_ = Some("ExternalName".into());
            s.external_name = Some("example.org".into());
        });
        assert!(plan_create(&ext, &dual()).unwrap().is_empty());
    }

    fn dns_node_port(tcp: Option<i32>, udp: Option<i32>) -> Service {
        svc(|s| {
            s.type_ = Some("NodePort".into());
            s.ports = Some(vec![
                ServicePort {
                    name: Some("dns".into()),
                    port: 53,
                    protocol: Some("UDP".into()),
                    node_port: udp,
                    ..Default::default()
                },
                ServicePort {
                    name: Some("dns-tcp".into()),
                    port: 53,
                    protocol: Some("TCP".into()),
                    node_port: tcp,
                    ..Default::default()
                },
                ServicePort {
                    name: Some("metrics".into()),
                    port: 9153,
                    protocol: Some("TCP".into()),
                    ..Default::default()
                },
            ]);
        })
    }

    #[test]
    fn one_node_port_per_port_number_shared_by_protocols() {
        let p = plan_create(&dns_node_port(None, None), &v4()).unwrap();
        assert_eq!(p.node_ports, [(53, Want::Next), (9153, Want::Next)]);
        let s = dns_node_port(Some(30053), None);
        let p = plan_create(&s, &v4()).unwrap();
        assert_eq!(
            p.node_ports,
            [(53, Want::Exactly(30053)), (9153, Want::Next)],
            "a request on either protocol counts"
        );
        let got = Allocated {
            cluster_ips: vec![ip("10.96.0.20")],
            node_ports: vec![30053, 31000],
            health_check_node_port: None,
        };
        let ops = ops(patch(&s, &p, &got));
        assert!(
            ops.contains(&json!({"op": "add", "path": "/spec/ports/0/nodePort", "value": 30053})),
            "UDP gets the TCP request"
        );
        assert!(ops.contains(&json!({"op": "add", "path": "/spec/ports/2/nodePort", "value": 31000})));
        assert!(
            !ops.iter().any(|o| o["path"] == "/spec/ports/1/nodePort"),
            "already set as requested"
        );
        assert!(ops.contains(&json!({"op": "add", "path": "/spec/clusterIPs", "value": ["10.96.0.20"]})));
        assert!(ops.contains(&json!({"op": "add", "path": "/spec/clusterIP", "value": "10.96.0.20"})));
        assert!(matches!(
            plan_create(&dns_node_port(Some(70000), None), &v4()),
            Err(Refusal::BadNodePort { .. })
        ));
    }

    #[test]
    fn load_balancers_node_ports_and_health_checks() {
        let lb = |alloc: Option<bool>, etp: &str| {
            svc(|s| {
                s.type_ = Some("LoadBalancer".into());
                s.allocate_load_balancer_node_ports = alloc;
                s.external_traffic_policy = Some(etp.into());
            })
        };
        let p = plan_create(&lb(None, "Cluster"), &v4()).unwrap();
        assert_eq!((p.node_ports.len(), p.health_check_node_port), (1, None));
        let p = plan_create(&lb(Some(false), "Local"), &v4()).unwrap();
        assert!(p.node_ports.is_empty(), "allocateLoadBalancerNodePorts: false");
        assert_eq!(p.health_check_node_port, Some(Want::Next));
        let mut chosen = lb(None, "Local");
        chosen.spec.as_mut().unwrap().health_check_node_port = Some(32000);
        assert_eq!(
            plan_create(&chosen, &v4()).unwrap().health_check_node_port,
            Some(Want::Exactly(32000))
        );
        let plain = svc(|_| {});
        assert!(
            plan_create(&plain, &v4()).unwrap().node_ports.is_empty(),
            "ClusterIP Services get none"
        );
    }

    #[test]
    fn updates_allocate_only_what_is_new() {
        let old = svc(|s| {
            s.cluster_ip = Some("10.96.0.30".into());
            s.cluster_ips = Some(vec!["10.96.0.30".into()]);
            s.ip_families = Some(vec!["IPv4".into()]);
            s.ip_family_policy = Some("SingleStack".into());
        });
        assert!(
            plan_update(&old, &old, &dual()).unwrap().is_empty(),
            "no change, nothing to do"
        );

        // To NodePort: node ports, no new IPs.
        let mut np = old.clone();
        np.spec.as_mut().unwrap().type_ = Some("NodePort".into());
        let p = plan_update(&old, &np, &dual()).unwrap();
        assert!(p.cluster_ips.is_empty());
        assert_eq!(p.node_ports, [(80, Want::Next)]);

        // A port added to a NodePort Service: only the new one.
        let mut held = np.clone();
        held.spec.as_mut().unwrap().ports.as_mut().unwrap()[0].node_port = Some(30080);
        let mut more = held.clone();
        more.spec
            .as_mut()
            .unwrap()
            .ports
            .as_mut()
            .unwrap()
            .push(ServicePort {
                port: 443,
                protocol: Some("TCP".into()),
                ..Default::default()
            });
        assert_eq!(
            plan_update(&held, &more, &dual()).unwrap().node_ports,
            [(443, Want::Next)]
        );

        // Upgrade to dual-stack: the second family is appended.
        let mut up = old.clone();
        up.spec.as_mut().unwrap().ip_family_policy = Some("PreferDualStack".into());
        let p = plan_update(&old, &up, &dual()).unwrap();
        assert_eq!(p.cluster_ips, [(IpFamily::IPv6, Want::Next)]);
        let ops = ops(patch(
            &up,
            &p,
            &Allocated {
                cluster_ips: vec![ip("fd00::30")],
                ..Default::default()
            },
        ));
        assert!(ops.contains(
            &json!({"op": "add", "path": "/spec/clusterIPs", "value": ["10.96.0.30", "fd00::30"]})
        ));
        assert!(ops.contains(&json!({"op": "add", "path": "/spec/ipFamilies", "value": ["IPv4", "IPv6"]})));

        // From ExternalName to ClusterIP: IPs are allocated as on create.
        let ext = svc(|s| {
            s.type_ = Some("ExternalName".into());
            s.external_name = Some("example.org".into());
        });
        let p = plan_update(&ext, &svc(|_| {}), &v4()).unwrap();
        assert_eq!(p.cluster_ips, [(IpFamily::IPv4, Want::Next)]);
    }

    #[test]
    fn held_values_cover_ips_node_ports_and_health_checks() {
        let s = svc(|s| {
            s.type_ = Some("LoadBalancer".into());
            s.cluster_ips = Some(vec!["10.96.0.40".into(), "fd00::40".into()]);
            s.cluster_ip = Some("10.96.0.40".into());
            s.health_check_node_port = Some(32100);
            s.ports = Some(vec![
                ServicePort {
                    port: 53,
                    protocol: Some("UDP".into()),
                    node_port: Some(30053),
                    ..Default::default()
                },
                ServicePort {
                    port: 53,
                    protocol: Some("TCP".into()),
                    node_port: Some(30053),
                    ..Default::default()
                },
            ]);
        });
        let (ips, ports) = held_values(&s);
        assert_eq!(ips, [ip("10.96.0.40"), ip("fd00::40")]);
        assert_eq!(ports, [30053, 32100]);
    }
}
