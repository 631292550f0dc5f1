//! One family's table kept Service by Service, so that a sync after a change costs what the
//! changed Services hold, not what the table holds (kube-proxy's change trackers, the same
//! idea). Each Service's part of the table (its fragment: chains, affinity sets, map elements)
//! is kept apart; the whole table is their union with the skeleton. A change recomputes the
//! fragments of the Services it names, and the transaction is the diff of only what those
//! fragments touch.
//!
//! Two Services may claim the same map key (the same external IP and port, say): the table
//! gives it to the last in Service order, as a whole recomputation does, and when that Service
//! lets go the key passes to the next claimant.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use svcplane_core::{IpFamily, ObjectKey};

use super::{
    diff::transaction,
    layout::Shards,
    model::{Ruleset, fragment, skeleton},
    op::Transaction,
};
use crate::desired::DesiredState;

/// Who claims each key of one map, and the chain each sends it to.
type Claims<K> = BTreeMap<K, BTreeMap<ObjectKey, String>>;

#[derive(Clone, Debug, Default)]
struct AllClaims {
    service_ips: Claims<(std::net::IpAddr, svcplane_core::Protocol, u16)>,
    node_ports: Claims<(svcplane_core::Protocol, u16)>,
    no_endpoint_ips: Claims<(std::net::IpAddr, svcplane_core::Protocol, u16)>,
    no_endpoint_node_ports: Claims<(svcplane_core::Protocol, u16)>,
}

/// One family's table, as applied, and the fragment each Service holds in it.
#[derive(Clone, Debug)]
pub struct FamilyTable {
    family: IpFamily,
    shards: Shards,
    whole: Ruleset,
    fragments: HashMap<ObjectKey, Ruleset>,
    claims: AllClaims,
    /// Rules in the table's chains, kept as fragments come and go (each chain is one
    /// Service's), so that [`FamilyTable::size`] does not walk the table.
    chain_rules: usize,
}

impl FamilyTable {
    /// The table for `state`, computed whole.
    pub fn new(state: &DesiredState, family: IpFamily, shards: Shards) -> Self {
        let whole = skeleton();
        let chain_rules = whole.chains.values().map(Vec::len).sum();
        let mut t = FamilyTable {
            family,
            shards,
            whole,
            fragments: HashMap::new(),
            claims: AllClaims::default(),
            chain_rules,
        };
        let services: BTreeSet<&ObjectKey> = state.ports.keys().map(|(n, _)| &n.service).collect();
        for s in services {
            let f = fragment(state.service_ports(s), family);
            if f != Ruleset::default() {
                t.insert(s, &f);
                t.fragments.insert(s.clone(), f);
            }
        }
        t
    }

    pub fn family(&self) -> IpFamily {
        self.family
    }

    pub fn shards(&self) -> Shards {
        self.shards
    }

    /// The whole table.
    pub fn ruleset(&self) -> &Ruleset {
        &self.whole
    }

    /// [`Ruleset::size`] of the whole table, without walking it.
    pub fn size(&self) -> usize {
        let w = &self.whole;
        self.chain_rules
            + w.service_ips.len()
            + w.node_ports.len()
            + w.no_endpoint_ips.len()
            + w.no_endpoint_node_ports.len()
    }

    /// Takes `services` to what `state` says of them and returns the transactions that do the
    /// same to the kernel (only what their fragments touch, in the tables that hold it; none:
    /// nothing to do). The table
    /// is changed in place, not copied (a copy would cost what the whole table holds): if the
    /// transaction is not applied, the table no longer says what the kernel holds and must be
    /// dropped (the caller then rebuilds).
    pub fn update<'a>(
        &mut self,
        state: &DesiredState,
        services: impl IntoIterator<Item = &'a ObjectKey>,
    ) -> Vec<Transaction> {
        let empty = Ruleset::default();
        let mut changes = Vec::new();
        let mut touched = Ruleset::default();
        for s in services {
            let new = fragment(state.service_ports(s), self.family);
            let old = self.fragments.get(s).unwrap_or(&empty);
            if *old == new {
                continue;
            }
            mark(&mut touched, old);
            mark(&mut touched, &new);
            changes.push((s, new));
        }
        let before = restrict(&self.whole, &touched);
        for (s, new) in changes {
            let old = self.fragments.remove(s).unwrap_or_default();
            self.remove(s, &old);
            self.insert(s, &new);
            if new != empty {
                self.fragments.insert(s.clone(), new);
            }
        }
        transaction(
            Some(&before),
            &restrict(&self.whole, &touched),
            self.family,
            self.shards,
        )
    }

    fn insert(&mut self, s: &ObjectKey, f: &Ruleset) {
        for (name, rules) in &f.chains {
            self.chain_rules += rules.len();
            if let Some(old) = self.whole.chains.insert(name.clone(), rules.clone()) {
                self.chain_rules -= old.len();
            }
        }
        for (name, timeout) in &f.affinity_sets {
            self.whole.affinity_sets.insert(name.clone(), *timeout);
        }
        let c = &mut self.claims;
        for (k, chain) in &f.service_ips {
            c.service_ips
                .entry(*k)
                .or_default()
                .insert(s.clone(), chain.clone());
            settle(&mut self.whole.service_ips, &c.service_ips, k);
        }
        for (k, chain) in &f.node_ports {
            c.node_ports
                .entry(*k)
                .or_default()
                .insert(s.clone(), chain.clone());
            settle(&mut self.whole.node_ports, &c.node_ports, k);
        }
        for k in &f.no_endpoint_ips {
            c.no_endpoint_ips
                .entry(*k)
                .or_default()
                .insert(s.clone(), String::new());
            self.whole.no_endpoint_ips.insert(*k);
        }
        for k in &f.no_endpoint_node_ports {
            c.no_endpoint_node_ports
                .entry(*k)
                .or_default()
                .insert(s.clone(), String::new());
            self.whole.no_endpoint_node_ports.insert(*k);
        }
    }

    fn remove(&mut self, s: &ObjectKey, f: &Ruleset) {
        for name in f.chains.keys() {
            if let Some(old) = self.whole.chains.remove(name) {
                self.chain_rules -= old.len();
            }
        }
        for name in f.affinity_sets.keys() {
            self.whole.affinity_sets.remove(name);
        }
        let c = &mut self.claims;
        for k in f.service_ips.keys() {
            unclaim(&mut c.service_ips, k, s);
            settle(&mut self.whole.service_ips, &c.service_ips, k);
        }
        for k in f.node_ports.keys() {
            unclaim(&mut c.node_ports, k, s);
            settle(&mut self.whole.node_ports, &c.node_ports, k);
        }
        for k in &f.no_endpoint_ips {
            if !unclaim(&mut c.no_endpoint_ips, k, s) {
                self.whole.no_endpoint_ips.remove(k);
            }
        }
        for k in &f.no_endpoint_node_ports {
            if !unclaim(&mut c.no_endpoint_node_ports, k, s) {
                self.whole.no_endpoint_node_ports.remove(k);
            }
        }
    }
}

/// Drops `s`'s claim on `k`; whether anyone still claims it.
fn unclaim<K: Ord>(claims: &mut Claims<K>, k: &K, s: &ObjectKey) -> bool {
    let Some(by) = claims.get_mut(k) else {
        return false;
    };
    by.remove(s);
    if by.is_empty() {
        claims.remove(k);
        false
    } else {
        true
    }
}

/// Gives `k` to its last claimant in Service order, or takes it out of the map.
fn settle<K: Ord + Copy>(map: &mut BTreeMap<K, String>, claims: &Claims<K>, k: &K) {
    match claims.get(k).and_then(|by| by.values().next_back()) {
        Some(chain) => {
            map.insert(*k, chain.clone());
        }
        None => {
            map.remove(k);
        }
    }
}

/// Adds the names and keys of `f` to `touched` (the values do not matter).
fn mark(touched: &mut Ruleset, f: &Ruleset) {
    for name in f.chains.keys() {
        touched.chains.insert(name.clone(), Vec::new());
    }
    for name in f.affinity_sets.keys() {
        touched.affinity_sets.insert(name.clone(), 0);
    }
    for k in f.service_ips.keys() {
        touched.service_ips.insert(*k, String::new());
    }
    for k in f.node_ports.keys() {
        touched.node_ports.insert(*k, String::new());
    }
    touched.no_endpoint_ips.extend(f.no_endpoint_ips.iter().copied());
    touched
        .no_endpoint_node_ports
        .extend(f.no_endpoint_node_ports.iter().copied());
}

/// The part of `whole` that `touched` names.
fn restrict(whole: &Ruleset, touched: &Ruleset) -> Ruleset {
    let mut out = Ruleset::default();
    for name in touched.chains.keys() {
        if let Some(rules) = whole.chains.get(name) {
            out.chains.insert(name.clone(), rules.clone());
        }
    }
    for name in touched.affinity_sets.keys() {
        if let Some(t) = whole.affinity_sets.get(name) {
            out.affinity_sets.insert(name.clone(), *t);
        }
    }
    for k in touched.service_ips.keys() {
        if let Some(c) = whole.service_ips.get(k) {
            out.service_ips.insert(*k, c.clone());
        }
    }
    for k in touched.node_ports.keys() {
        if let Some(c) = whole.node_ports.get(k) {
            out.node_ports.insert(*k, c.clone());
        }
    }
    out.no_endpoint_ips = touched
        .no_endpoint_ips
        .iter()
        .filter(|k| whole.no_endpoint_ips.contains(k))
        .copied()
        .collect();
    out.no_endpoint_node_ports = touched
        .no_endpoint_node_ports
        .iter()
        .filter(|k| whole.no_endpoint_node_ports.contains(k))
        .copied()
        .collect();
    out
}

#[cfg(test)]
mod tests {
    use std::{net::IpAddr, time::Duration};

    use super::*;
    use crate::{
        desired::{Backends, PortState, ServicePortName, ServiceState},
        nft::{model::ruleset, table::Table},
    };
    use svcplane_core::Protocol;

    use crate::testing::Rng;

    /// One Service as a random draw makes it: from a small pool of addresses and ports, so
    /// that Services collide on external IPs and node ports.
    fn service(rng: &mut Rng, i: u64) -> ServiceState {
        let key = ObjectKey::new("ns", format!("s{i}"));
        let mut ports = Vec::new();
        for (j, family) in [IpFamily::IPv4, IpFamily::IPv6].into_iter().enumerate() {
            if rng.below(3) == 0 {
                continue;
            }
            let ip = |n: u64| -> IpAddr {
                if family == IpFamily::IPv4 {
                    format!("10.96.0.{n}").parse().unwrap()
                } else {
                    format!("fd00::{n}").parse().unwrap()
                }
            };
            let endpoints: Vec<_> = (0..rng.below(4))
                .map(|e| std::net::SocketAddr::new(ip(100 + e), 8080))
                .collect();
            let backends = if endpoints.is_empty() {
                Backends::Reject
            } else {
                Backends::To(endpoints)
            };
            ports.push(PortState {
                name: ServicePortName {
                    service: key.clone(),
                    port: format!("p{j}"),
                    protocol: if rng.below(2) == 0 {
                        Protocol::Tcp
                    } else {
                        Protocol::Udp
                    },
                },
                family,
                cluster_ip: ip(i + 1),
                port: 80,
                external_ips: (0..rng.below(2)).map(|_| ip(200 + rng.below(3))).collect(),
                node_port: (rng.below(2) == 0).then(|| 30000 + u16::try_from(rng.below(4)).unwrap()),
                affinity: (rng.below(3) == 0).then_some(Duration::from_secs(60 + rng.below(2))),
                external: if rng.below(4) == 0 {
                    Backends::Drop
                } else {
                    backends.clone()
                },
                internal: backends,
                masquerade_external: rng.below(2) == 0,
                cluster_cidr: (rng.below(2) == 0).then(|| {
                    if family == IpFamily::IPv4 {
                        "10.244.0.0/16"
                    } else {
                        "fd00:10:244::/56"
                    }
                    .parse()
                    .unwrap()
                }),
                terminating: vec![],
            });
        }
        ServiceState {
            ports,
            health_check: None,
        }
    }

    /// What the kernel would hold after `txs`, table by table (tables removed or never made
    /// left out).
    fn tables(txs: &[Transaction]) -> BTreeMap<crate::nft::TableId, Table> {
        let mut ops: BTreeMap<_, Vec<_>> = BTreeMap::new();
        for tx in txs {
            ops.entry(tx.table).or_default().extend(tx.ops.iter().cloned());
        }
        ops.into_iter()
            .map(|(t, ops)| (t, Table::from_ops(&ops)))
            .filter(|(_, t)| *t != Table::default())
            .collect()
    }

    #[test]
    fn syncing_only_the_changed_services_gives_the_tables_a_whole_recomputation_gives() {
        for seed in 1..40_u64 {
            let mut rng = Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15));
            let mut state = DesiredState::default();
            for i in 0..8 {
                let s = service(&mut rng, i);
                state.set_service(&ObjectKey::new("ns", format!("s{i}")), Some(s));
            }
            // One shard, and three: Services that share a key then sit in different tables.
            for shards in [Shards::new(1).unwrap(), Shards::new(3).unwrap()] {
                for family in [IpFamily::IPv4, IpFamily::IPv6] {
                    let mut table = FamilyTable::new(&state, family, shards);
                    assert_eq!(table.ruleset(), &ruleset(&state, family));
                    let mut state = state.clone();
                    for _ in 0..30 {
                        // Up to three Services change, appear or go.
                        let changed: BTreeSet<ObjectKey> = (0..=rng.below(3))
                            .map(|_| ObjectKey::new("ns", format!("s{}", rng.below(10))))
                            .collect();
                        for key in &changed {
                            let i: u64 = key.name[1..].parse().unwrap();
                            let next = (rng.below(4) != 0).then(|| service(&mut rng, i));
                            state.set_service(key, next);
                        }
                        let mut kernel = transaction(None, table.ruleset(), family, shards);
                        let before = tables(&kernel);
                        let txs = table.update(&state, &changed);
                        let whole = ruleset(&state, family);
                        assert_eq!(table.ruleset(), &whole, "seed {seed}");
                        assert_eq!(table.size(), whole.size(), "seed {seed}");
                        // The ops, applied to the tables as they were, give the tables as they
                        // should be.
                        kernel.extend(txs.iter().cloned());
                        let after = tables(&transaction(None, &whole, family, shards));
                        assert_eq!(tables(&kernel), after, "seed {seed}");
                        assert_eq!(txs.is_empty(), before == after, "seed {seed}");
                    }
                }
            }
        }
    }

    #[test]
    fn a_change_to_one_service_touches_only_its_chains_and_keys() {
        let mut rng = Rng(7);
        let mut state = DesiredState::default();
        for i in 0..200 {
            let mut s = service(&mut rng, i);
            for p in &mut s.ports {
                // Apart: no shared external IPs or node ports.
                p.external_ips.clear();
                p.node_port = None;
            }
            state.set_service(&ObjectKey::new("ns", format!("s{i}")), Some(s));
        }
        let shards = Shards::new(16).unwrap();
        let mut table = FamilyTable::new(&state, IpFamily::IPv4, shards);
        let key = ObjectKey::new("ns", "s42");
        let port = PortState {
            name: ServicePortName {
                service: key.clone(),
                port: "http".into(),
                protocol: Protocol::Tcp,
            },
            family: IpFamily::IPv4,
            cluster_ip: "10.96.1.42".parse().unwrap(),
            port: 80,
            external_ips: vec![],
            node_port: None,
            affinity: None,
            internal: Backends::To(vec!["10.1.2.3:80".parse().unwrap()]),
            external: Backends::Reject,
            masquerade_external: true,
            cluster_cidr: None,
            terminating: vec![],
        };
        state.set_service(
            &key,
            Some(ServiceState {
                ports: vec![port],
                health_check: None,
            }),
        );
        let txs = table.update(&state, [&key]);
        // One table: the Service's shard.
        assert_eq!(txs.len(), 1, "{txs:?}");
        let tx = &txs[0];
        assert_eq!(tx.table, shards.of_service("ns", "s42"));
        assert!(
            tx.ops
                .iter()
                .all(|op| op.port().is_none_or(|p| p.starts_with("ns/s42/"))),
            "{tx:?}"
        );
        assert!(tx.len() < 20, "{}", tx.len());
    }
}
