//! IPVS mode, pure: the virtual servers the node should have, and the operations that take the
//! kernel's current table there.
//!
//! Graceful termination (as kube-proxy): a real server that should go first gets weight 0, so no
//! new connection picks it while existing ones finish; it is deleted once it has no active or
//! inactive connections left.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, SocketAddr},
};

use svcplane_core::{IpFamily, Protocol};

use crate::desired::{Backends, DesiredState, PortState};

/// Schedulers Linux has (`ip_vs_<name>` modules); others are refused before reaching the kernel.
pub const SCHEDULERS: &[&str] = &[
    "rr", "wrr", "lc", "wlc", "lblc", "lblcr", "dh", "sh", "sed", "nq", "fo", "ovf", "mh", "twos",
];

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct VsKey {
    pub addr: IpAddr,
    pub protocol: Protocol,
    pub port: u16,
}

impl std::fmt::Display for VsKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}:{}",
            self.protocol.as_str(),
            SocketAddr::new(self.addr, self.port)
        )
    }
}

/// What a virtual server should be.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VirtualServer {
    pub scheduler: String,
    /// ClientIP affinity timeout, seconds.
    pub persistence: Option<u32>,
    /// Real servers and their weights.
    pub dests: BTreeMap<SocketAddr, u32>,
}

/// A real server as the kernel reports it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ObservedDest {
    pub weight: u32,
    pub active: u32,
    pub inactive: u32,
}

/// A virtual server as the kernel reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ObservedVs {
    pub scheduler: String,
    pub persistence: Option<u32>,
    pub dests: BTreeMap<SocketAddr, ObservedDest>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Op {
    AddService(VsKey, String, Option<u32>),
    UpdateService(VsKey, String, Option<u32>),
    DelService(VsKey),
    AddDest(VsKey, SocketAddr, u32),
    UpdateDest(VsKey, SocketAddr, u32),
    DelDest(VsKey, SocketAddr),
}

/// The virtual servers for `state`: cluster IPs, external and load-balancer IPs, and node ports
/// on each of `node_ips`.
pub fn virtual_servers(
    state: &DesiredState,
    node_ips: &[IpAddr],
    scheduler: &str,
) -> BTreeMap<VsKey, VirtualServer> {
    let mut out = BTreeMap::new();
    for p in state.ports.values() {
        out.extend(port_servers(p, node_ips, scheduler));
    }
    out
}

/// The virtual servers of one Service port, in the order a later one replaces an earlier one
/// of the same key.
pub fn port_servers<'a>(
    p: &'a PortState,
    node_ips: &'a [IpAddr],
    scheduler: &'a str,
) -> impl Iterator<Item = (VsKey, VirtualServer)> + 'a {
    let vs = move |backends: &Backends| VirtualServer {
        scheduler: scheduler.to_owned(),
        persistence: p.affinity.map(|t| u32::try_from(t.as_secs()).unwrap_or(u32::MAX)),
        dests: backends.endpoints().iter().map(|a| (*a, 1)).collect(),
    };
    let key = move |addr: IpAddr, port: u16| VsKey {
        addr,
        protocol: p.name.protocol,
        port,
    };
    std::iter::once((key(p.cluster_ip, p.port), vs(&p.internal)))
        .chain(
            p.external_ips
                .iter()
                .map(move |ip| (key(*ip, p.port), vs(&p.external))),
        )
        .chain(p.node_port.into_iter().flat_map(move |np| {
            node_ips
                .iter()
                .filter(move |ip| IpFamily::of(ip) == p.family)
                .map(move |ip| (key(*ip, np), vs(&p.external)))
        }))
}

/// The addresses the dummy interface must carry (everything but node addresses).
pub fn vip_addresses(state: &DesiredState) -> BTreeSet<IpAddr> {
    state
        .ports
        .values()
        .flat_map(|p| std::iter::once(p.cluster_ip).chain(p.external_ips.iter().copied()))
        .collect()
}

/// Operations from `observed` to `desired`. Only virtual servers whose address satisfies `owned`
/// are svcplane's to delete; anything else on the node is left alone.
pub fn plan(
    observed: &BTreeMap<VsKey, ObservedVs>,
    desired: &BTreeMap<VsKey, VirtualServer>,
    owned: impl Fn(&VsKey) -> bool,
) -> Vec<Op> {
    let mut ops = Vec::new();
    for (key, want) in desired {
        let Some(have) = observed.get(key) else {
            ops.push(Op::AddService(*key, want.scheduler.clone(), want.persistence));
            ops.extend(want.dests.iter().map(|(a, w)| Op::AddDest(*key, *a, *w)));
            continue;
        };
        if have.scheduler != want.scheduler || have.persistence != want.persistence {
            ops.push(Op::UpdateService(*key, want.scheduler.clone(), want.persistence));
        }
        for (addr, weight) in &want.dests {
            match have.dests.get(addr) {
                None => ops.push(Op::AddDest(*key, *addr, *weight)),
                Some(d) if d.weight != *weight => ops.push(Op::UpdateDest(*key, *addr, *weight)),
                Some(_) => {}
            }
        }
        for (addr, d) in &have.dests {
            if want.dests.contains_key(addr) {
                continue;
            }
            if d.weight > 0 {
                ops.push(Op::UpdateDest(*key, *addr, 0));
            } else if d.active == 0 && d.inactive == 0 {
                ops.push(Op::DelDest(*key, *addr));
            }
        }
    }
    for key in observed.keys() {
        if !desired.contains_key(key) && owned(key) {
            ops.push(Op::DelService(*key));
        }
    }
    ops
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use svcplane_core::ObjectKey;

    use crate::desired::{PortState, ServicePortName};

    fn to(addrs: &[&str]) -> Backends {
        Backends::To(addrs.iter().map(|a| a.parse().unwrap()).collect())
    }

    fn state(internal: Backends, external: Backends) -> DesiredState {
        let p = PortState {
            name: ServicePortName {
                service: ObjectKey::new("ns", "web"),
                port: "http".into(),
                protocol: Protocol::Tcp,
            },
            family: IpFamily::IPv4,
            cluster_ip: "10.96.0.10".parse().unwrap(),
            port: 80,
            external_ips: vec!["192.0.2.1".parse().unwrap()],
            node_port: Some(30080),
            affinity: Some(Duration::from_secs(60)),
            internal,
            external,
            masquerade_external: true,
            cluster_cidr: None,
            terminating: vec![],
        };
        DesiredState {
            ports: [((p.name.clone(), p.family), p)].into(),
            health_checks: BTreeMap::new(),
        }
    }

    fn key(addr: &str, port: u16) -> VsKey {
        VsKey {
            addr: addr.parse().unwrap(),
            protocol: Protocol::Tcp,
            port,
        }
    }

    fn observe(vs: &BTreeMap<VsKey, VirtualServer>) -> BTreeMap<VsKey, ObservedVs> {
        vs.iter()
            .map(|(k, v)| {
                let dests = v
                    .dests
                    .iter()
                    .map(|(a, w)| {
                        (
                            *a,
                            ObservedDest {
                                weight: *w,
                                active: 0,
                                inactive: 0,
                            },
                        )
                    })
                    .collect();
                (
                    *k,
                    ObservedVs {
                        scheduler: v.scheduler.clone(),
                        persistence: v.persistence,
                        dests,
                    },
                )
            })
            .collect()
    }

    #[test]
    fn cluster_external_and_node_port_servers() {
        let st = state(to(&["10.0.0.1:8080", "10.0.0.2:8080"]), to(&["10.0.0.1:8080"]));
        let vs = virtual_servers(
            &st,
            &["10.200.0.1".parse().unwrap(), "fd00::1".parse().unwrap()],
            "rr",
        );
        assert_eq!(vs.len(), 3, "{vs:?}");
        assert_eq!(vs[&key("10.96.0.10", 80)].dests.len(), 2);
        assert_eq!(vs[&key("192.0.2.1", 80)].dests.len(), 1);
        assert_eq!(
            vs[&key("10.200.0.1", 30080)].dests.len(),
            1,
            "node port on the IPv4 node address only"
        );
        assert_eq!(vs[&key("10.96.0.10", 80)].persistence, Some(60));
        assert_eq!(
            vip_addresses(&st),
            ["10.96.0.10".parse().unwrap(), "192.0.2.1".parse().unwrap()].into()
        );
    }

    #[test]
    fn from_nothing_everything_is_added_and_a_second_plan_is_empty() {
        let vs = virtual_servers(&state(to(&["10.0.0.1:8080"]), to(&["10.0.0.1:8080"])), &[], "rr");
        let ops = plan(&BTreeMap::new(), &vs, |_| true);
        assert_eq!(ops.iter().filter(|o| matches!(o, Op::AddService(..))).count(), 2);
        assert_eq!(ops.iter().filter(|o| matches!(o, Op::AddDest(..))).count(), 2);
        assert!(plan(&observe(&vs), &vs, |_| true).is_empty());
    }

    #[test]
    fn a_leaving_endpoint_drains_at_weight_zero_then_goes_when_idle() {
        let before = virtual_servers(
            &state(to(&["10.0.0.1:8080", "10.0.0.2:8080"]), Backends::Reject),
            &[],
            "rr",
        );
        let after = virtual_servers(&state(to(&["10.0.0.1:8080"]), Backends::Reject), &[], "rr");
        let mut observed = observe(&before);
        let k = key("10.96.0.10", 80);
        let gone: SocketAddr = "10.0.0.2:8080".parse().unwrap();
        assert_eq!(plan(&observed, &after, |_| true), [Op::UpdateDest(k, gone, 0)]);
        // Drained to weight 0 but still carrying connections: wait.
        let d = observed.get_mut(&k).unwrap().dests.get_mut(&gone).unwrap();
        *d = ObservedDest {
            weight: 0,
            active: 2,
            inactive: 1,
        };
        assert!(plan(&observed, &after, |_| true).is_empty());
        // Idle: delete.
        let d = observed.get_mut(&k).unwrap().dests.get_mut(&gone).unwrap();
        d.active = 0;
        d.inactive = 0;
        assert_eq!(plan(&observed, &after, |_| true), [Op::DelDest(k, gone)]);
    }

    #[test]
    fn scheduler_and_persistence_changes_update_in_place() {
        let before = virtual_servers(&state(to(&["10.0.0.1:8080"]), Backends::Reject), &[], "rr");
        let after = virtual_servers(&state(to(&["10.0.0.1:8080"]), Backends::Reject), &[], "lc");
        let ops = plan(&observe(&before), &after, |_| true);
        assert_eq!(
            ops,
            [
                Op::UpdateService(key("10.96.0.10", 80), "lc".into(), Some(60)),
                Op::UpdateService(key("192.0.2.1", 80), "lc".into(), Some(60)),
            ]
        );
    }

    #[test]
    fn only_owned_servers_are_deleted() {
        let mut observed = observe(&virtual_servers(
            &state(to(&["10.0.0.1:8080"]), Backends::Reject),
            &[],
            "rr",
        ));
        let foreign = key("172.16.0.1", 443);
        observed.insert(
            foreign,
            ObservedVs {
                scheduler: "rr".into(),
                persistence: None,
                dests: BTreeMap::new(),
            },
        );
        let ops = plan(&observed, &BTreeMap::new(), |k| {
            k.addr.to_string().starts_with("10.96.")
        });
        assert_eq!(ops, [Op::DelService(key("10.96.0.10", 80))]);
    }

    #[test]
    fn no_endpoints_is_a_server_without_real_servers() {
        let vs = virtual_servers(&state(Backends::Reject, Backends::Drop), &[], "rr");
        assert!(vs.values().all(|v| v.dests.is_empty()));
    }
}
