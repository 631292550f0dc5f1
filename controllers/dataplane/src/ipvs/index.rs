//! The virtual servers of a node's whole desired state, kept up to date Service by Service, so a
//! sync that changed one Service recomputes that Service's virtual servers, not 10,000 of them,
//! and names the few keys the kernel must be brought to (the plan reads back only those).
//!
//! Two Services may claim one key (the same external IP, protocol and port: a conflict users
//! make); a whole recomputation lets the last in Service order win, and so does an update,
//! which recomputes every Service sharing a key with a changed one.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    net::IpAddr,
};

use svcplane_core::ObjectKey;

use super::plan::{VirtualServer, VsKey, port_servers};
use crate::desired::DesiredState;

#[derive(Clone, Debug, Default)]
pub struct Index {
    servers: BTreeMap<VsKey, VirtualServer>,
    /// The keys each Service claims.
    by_service: HashMap<ObjectKey, BTreeSet<VsKey>>,
    /// The Services claiming each key (almost always one).
    holders: HashMap<VsKey, BTreeSet<ObjectKey>>,
}

impl Index {
    /// Every virtual server of `state`.
    pub fn build(state: &DesiredState, node_ips: &[IpAddr], scheduler: &str) -> Self {
        let mut index = Self::default();
        let services: BTreeSet<ObjectKey> =
            state.ports.keys().map(|(name, _)| name.service.clone()).collect();
        for service in services {
            index.claim(state, &service, node_ips, scheduler);
        }
        index
    }

    pub fn servers(&self) -> &BTreeMap<VsKey, VirtualServer> {
        &self.servers
    }

    /// Brings the index to `state`, where only `changed` Services differ from the state it was
    /// last brought to; returns the keys whose virtual server may have changed (added, removed
    /// or different).
    pub fn update(
        &mut self,
        state: &DesiredState,
        changed: &BTreeSet<ObjectKey>,
        node_ips: &[IpAddr],
        scheduler: &str,
    ) -> BTreeSet<VsKey> {
        // Every Service sharing a key, before or after, with one recomputed is recomputed too
        // (and so on: the last claim of a key must be made again in order).
        let mut services = changed.clone();
        let mut todo: Vec<ObjectKey> = changed.iter().cloned().collect();
        while let Some(service) = todo.pop() {
            let before = self.by_service.get(&service).into_iter().flatten().copied();
            let after = state
                .service_ports(&service)
                .flat_map(|p| port_servers(p, node_ips, scheduler).map(|(k, _)| k))
                .collect::<Vec<_>>();
            for key in before.chain(after) {
                for other in self.holders.get(&key).into_iter().flatten() {
                    if services.insert(other.clone()) {
                        todo.push(other.clone());
                    }
                }
            }
        }
        let mut affected = BTreeSet::new();
        for service in &services {
            for key in self.by_service.remove(service).unwrap_or_default() {
                self.servers.remove(&key);
                if let Some(h) = self.holders.get_mut(&key) {
                    h.remove(service);
                    if h.is_empty() {
                        self.holders.remove(&key);
                    }
                }
                affected.insert(key);
            }
        }
        // In Service order, as a whole recomputation claims them.
        for service in &services {
            affected.extend(self.claim(state, service, node_ips, scheduler));
        }
        affected
    }

    /// Adds `service`'s virtual servers from `state`; returns their keys.
    fn claim(
        &mut self,
        state: &DesiredState,
        service: &ObjectKey,
        node_ips: &[IpAddr],
        scheduler: &str,
    ) -> BTreeSet<VsKey> {
        let mut keys = BTreeSet::new();
        for p in state.service_ports(service) {
            for (key, vs) in port_servers(p, node_ips, scheduler) {
                self.servers.insert(key, vs);
                self.holders.entry(key).or_default().insert(service.clone());
                keys.insert(key);
            }
        }
        if !keys.is_empty() {
            self.by_service.insert(service.clone(), keys.clone());
        }
        keys
    }
}

#[cfg(test)]
mod tests {
    use std::{net::SocketAddr, time::Duration};

    use svcplane_core::{IpFamily, Protocol};

    use super::*;
    use crate::{
        desired::{Backends, PortState, ServicePortName, ServiceState},
        ipvs::plan::virtual_servers,
    };

    use crate::testing::Rng;

    /// Service `i` as a random draw: one or two ports, some endpoints, sometimes an external IP
    /// from a small pool (so Services collide on keys) and a node port.
    fn service(rng: &mut Rng, i: u64) -> (ObjectKey, ServiceState) {
        let key = ObjectKey::new("ns", format!("s{i}"));
        let ports = (0..=rng.below(2))
            .map(|j| {
                let endpoints: Vec<SocketAddr> = (0..rng.below(4))
                    .map(|e| format!("10.1.{i}.{}:8080", e + rng.below(3)).parse().unwrap())
                    .collect();
                let backends = if endpoints.is_empty() {
                    Backends::Reject
                } else {
                    Backends::To(endpoints)
                };
                PortState {
                    name: ServicePortName {
                        service: key.clone(),
                        port: format!("p{j}"),
                        protocol: Protocol::Tcp,
                    },
                    family: IpFamily::IPv4,
                    cluster_ip: format!("10.96.0.{i}").parse().unwrap(),
                    port: 80 + u16::try_from(j).unwrap(),
                    external_ips: (0..rng.below(2))
                        .map(|_| format!("192.0.2.{}", rng.below(3)).parse().unwrap())
                        .collect(),
                    node_port: (rng.below(3) == 0).then(|| 30000 + u16::try_from(rng.below(3)).unwrap()),
                    affinity: (rng.below(3) == 0).then_some(Duration::from_secs(60)),
                    external: backends.clone(),
                    internal: backends,
                    masquerade_external: true,
                    cluster_cidr: None,
                    terminating: vec![],
                }
            })
            .collect();
        (
            key,
            ServiceState {
                ports,
                health_check: None,
            },
        )
    }

    #[test]
    fn updating_the_changed_services_gives_what_a_whole_recomputation_gives() {
        let node_ips: Vec<IpAddr> = vec!["10.200.0.1".parse().unwrap()];
        let mut rng = Rng(0x05ee_d1b5);
        let mut state = DesiredState::default();
        for i in 0..20 {
            let (key, st) = service(&mut rng, i);
            state.set_service(&key, Some(st));
        }
        let mut index = Index::build(&state, &node_ips, "rr");
        assert_eq!(index.servers(), &virtual_servers(&state, &node_ips, "rr"));
        for _ in 0..500 {
            let mut changed = BTreeSet::new();
            for _ in 0..=rng.below(3) {
                let i = rng.below(25);
                let (key, st) = service(&mut rng, i);
                state.set_service(&key, (rng.below(5) != 0).then_some(st));
                changed.insert(key);
            }
            let before = index.servers().clone();
            let affected = index.update(&state, &changed, &node_ips, "rr");
            let whole = virtual_servers(&state, &node_ips, "rr");
            assert_eq!(index.servers(), &whole);
            // Whatever differs from before is among the keys reported.
            for key in before.keys().chain(whole.keys()) {
                if before.get(key) != whole.get(key) {
                    assert!(affected.contains(key), "{key} changed but was not reported");
                }
            }
        }
    }

    #[test]
    fn an_unchanged_service_reports_nothing_of_the_others() {
        let mut rng = Rng(7);
        let mut state = DesiredState::default();
        let (a, st) = service(&mut rng, 1);
        state.set_service(&a, Some(st));
        let (b, mut st) = service(&mut rng, 2);
        for p in &mut st.ports {
            p.external_ips.clear();
            p.node_port = None;
        }
        state.set_service(&b, Some(st));
        let mut index = Index::build(&state, &[], "rr");
        let affected = index.update(&state, &[b.clone()].into(), &[], "rr");
        assert!(
            affected
                .iter()
                .all(|k| k.addr == "10.96.0.2".parse::<IpAddr>().unwrap()),
            "{affected:?}"
        );
        assert!(!affected.is_empty());
    }
}
