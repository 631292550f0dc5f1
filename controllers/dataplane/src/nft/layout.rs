//! Which of svcplane's tables holds what. Services are spread over `shards` tables
//! (`svcplane-00`, `svcplane-01`, …) by a hash of their namespace and name; each shard has its
//! own nat base chains, `services` chain and service maps, and holds its Services' chains and
//! affinity sets. What Services share (the no-endpoint rejects, masquerading) is in the table
//! `svcplane`.
//!
//! Why shards: when a transaction adds a rule, or a map element that jumps, the kernel
//! validates at commit every chain reachable from that table's base chains (hooks, loops,
//! depth), so a one-endpoint change costs what its whole table holds: measured on 6.18, about
//! 110 ms with 10,000 Services in one table against 4 ms in a table of 100, the other tables
//! untouched. A shard bounds that to what the shard holds. The price is paid by a connection's
//! first packet only (nat chains see nothing else): two hash lookups per shard (the service
//! tuple, then the node port; the node port's `fib` only when the port is one) on the way to an
//! address that is not a Service's. Established connections and every later packet pass no
//! shard at all. Measured (`hack/bench/dataplane.sh`, a loopback connect that passes every
//! shard's nat output chain): 32 shards cost a new connection about 7 us more than one table,
//! whatever the Service count.

use std::{collections::BTreeMap, fmt};

use super::{NO_ENDPOINTS, REJECT, SERVICES, model::Ruleset, op::port_of};

/// The most shards a node may have: what start-up and `cleanup` remove whatever the count was.
pub const MAX_SHARDS: u16 = 64;
/// 10,000 Services make shards of about 300: a one-endpoint change then costs the kernel's
/// fixed commit cost plus a walk of 300 Services' chains (see the README's figures; 16 shards
/// cost 27 ms on the 2-core benchmark machine, 32 cost 16 ms, 64 no less). The price, two
/// hash lookups per shard for the first packet of a connection to an address that is no
/// Service's, measured 7 us per new connection with 32 shards.
pub const DEFAULT_SHARDS: u16 = 32;

/// One of svcplane's tables (in each family).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum TableId {
    /// `svcplane`: no-endpoint rejects and masquerading (and IPVS mode's support table).
    Main,
    /// `svcplane-NN`: the Services whose name hashes to NN.
    Shard(u16),
}

impl fmt::Display for TableId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TableId::Main => f.write_str(super::TABLE),
            TableId::Shard(n) => write!(f, "{}-{n:02}", super::TABLE),
        }
    }
}

impl TableId {
    /// Every table name svcplane may have created, whatever its shard count.
    pub fn all() -> impl Iterator<Item = TableId> {
        std::iter::once(TableId::Main).chain((0..MAX_SHARDS).map(TableId::Shard))
    }
}

/// How many shard tables Services are spread over (1..=[`MAX_SHARDS`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Shards(u16);

impl Default for Shards {
    fn default() -> Self {
        Shards(DEFAULT_SHARDS)
    }
}

#[derive(Debug, thiserror::Error)]
#[error("the shard count must be between 1 and {MAX_SHARDS}, not {0}")]
pub struct BadShardCount(u16);

impl Shards {
    pub fn new(n: u16) -> Result<Self, BadShardCount> {
        if (1..=MAX_SHARDS).contains(&n) {
            Ok(Shards(n))
        } else {
            Err(BadShardCount(n))
        }
    }

    pub fn count(self) -> u16 {
        self.0
    }

    /// The tables of this layout: `svcplane` and each shard.
    pub fn tables(self) -> impl Iterator<Item = TableId> {
        std::iter::once(TableId::Main).chain((0..self.0).map(TableId::Shard))
    }

    /// The shard of the Service `namespace/name`: FNV-1a of those bytes, so that it is the same
    /// on every node, in every run and every version (a Service never moves between tables
    /// unless the shard count changes).
    pub fn of_service(self, namespace: &str, name: &str) -> TableId {
        self.of_key(&format!("{namespace}/{name}"))
    }

    fn of_key(self, key: &str) -> TableId {
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for b in key.bytes() {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
        TableId::Shard(u16::try_from(h % u64::from(self.0)).unwrap_or(0))
    }

    /// Where the chain or set `name` lives: a Service's in its shard, `services` in every
    /// shard (`None`), the rest in `svcplane`.
    fn home(self, name: &str) -> Option<TableId> {
        if name == SERVICES {
            return None;
        }
        if matches!(name, NO_ENDPOINTS | REJECT) {
            return Some(TableId::Main);
        }
        // A Service port's `<namespace>/<name>/…`: its Service's shard.
        Some(match port_of(name) {
            Some(id) => {
                let service = id.match_indices('/').nth(1).map_or(id, |(at, _)| &id[..at]);
                self.of_key(service)
            }
            None => TableId::Main,
        })
    }

    /// `rs` (a whole table or a part of one) cut into the tables that hold its pieces.
    pub fn split(self, rs: &Ruleset) -> BTreeMap<TableId, Ruleset> {
        let mut out: BTreeMap<TableId, Ruleset> = BTreeMap::new();
        for (name, rules) in &rs.chains {
            match self.home(name) {
                Some(t) => {
                    out.entry(t)
                        .or_default()
                        .chains
                        .insert(name.clone(), rules.clone());
                }
                None => {
                    for t in (0..self.0).map(TableId::Shard) {
                        out.entry(t)
                            .or_default()
                            .chains
                            .insert(name.clone(), rules.clone());
                    }
                }
            }
        }
        for (name, timeout) in &rs.affinity_sets {
            if let Some(t) = self.home(name) {
                out.entry(t)
                    .or_default()
                    .affinity_sets
                    .insert(name.clone(), *timeout);
            }
        }
        for (k, chain) in &rs.service_ips {
            if let Some(t) = self.home(chain) {
                out.entry(t).or_default().service_ips.insert(*k, chain.clone());
            }
        }
        for (k, chain) in &rs.node_ports {
            if let Some(t) = self.home(chain) {
                out.entry(t).or_default().node_ports.insert(*k, chain.clone());
            }
        }
        if !rs.no_endpoint_ips.is_empty() || !rs.no_endpoint_node_ports.is_empty() {
            let main = out.entry(TableId::Main).or_default();
            main.no_endpoint_ips.clone_from(&rs.no_endpoint_ips);
            main.no_endpoint_node_ports.clone_from(&rs.no_endpoint_node_ports);
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nft::model::{Rule, skeleton};

    #[test]
    fn a_services_chains_sets_and_elements_share_its_shard_and_shared_parts_stay_in_main() {
        let shards = Shards::new(8).unwrap();
        let home = shards.of_service("ns", "web");
        let mut rs = skeleton();
        for chain in [
            "svc-ns/web/tcp/http",
            "ext-ns/web/tcp/http",
            "ep-ns/web/tcp/http__10.0.0.1:80",
        ] {
            rs.chains.insert(chain.into(), vec![Rule::Drop]);
        }
        rs.affinity_sets
            .insert("aff-ns/web/tcp/http__10.0.0.1:80".into(), 10);
        let key = ("10.96.0.1".parse().unwrap(), svcplane_core::Protocol::Tcp, 80);
        rs.service_ips.insert(key, "svc-ns/web/tcp/http".into());
        rs.node_ports.insert(
            (svcplane_core::Protocol::Tcp, 30080),
            "ext-ns/web/tcp/http".into(),
        );
        rs.no_endpoint_ips
            .insert(("10.96.0.2".parse().unwrap(), svcplane_core::Protocol::Tcp, 80));

        let parts = shards.split(&rs);
        // Main and every shard (each has the `services` chain).
        assert_eq!(parts.len(), 9);
        let mine = &parts[&home];
        assert_eq!(mine.chains.len(), 4, "services + the Service's three chains");
        assert_eq!(mine.affinity_sets.len(), 1);
        assert_eq!(mine.service_ips.len(), 1);
        assert_eq!(mine.node_ports.len(), 1);
        assert!(mine.no_endpoint_ips.is_empty());
        let main = &parts[&TableId::Main];
        assert_eq!(main.chains.keys().collect::<Vec<_>>(), [NO_ENDPOINTS, REJECT]);
        assert_eq!(main.no_endpoint_ips.len(), 1);
        for (t, part) in &parts {
            if *t != home && *t != TableId::Main {
                assert_eq!(part.chains.keys().collect::<Vec<_>>(), [SERVICES]);
                assert!(part.service_ips.is_empty() && part.affinity_sets.is_empty());
            }
        }
    }

    #[test]
    fn services_spread_over_every_shard_and_the_hash_is_fixed() {
        let shards = Shards::new(16).unwrap();
        let mut counts = [0u32; 16];
        for i in 0..16_000 {
            let TableId::Shard(n) = shards.of_service("default", &format!("svc-{i}")) else {
                panic!("a Service's table is a shard");
            };
            counts[usize::from(n)] += 1;
        }
        // 1,000 each on average; FNV-1a over such names stays within a few percent.
        assert!(counts.iter().all(|c| (900..1100).contains(c)), "{counts:?}");
        // Pinned: a different hash would move every Service between tables on upgrade.
        assert_eq!(shards.of_service("default", "kubernetes"), TableId::Shard(7));
        assert_eq!(shards.of_service("kube-system", "kube-dns"), TableId::Shard(8));
        assert_eq!(TableId::Shard(3).to_string(), "svcplane-03");
        assert_eq!(TableId::Main.to_string(), "svcplane");
        assert!(Shards::new(0).is_err() && Shards::new(MAX_SHARDS + 1).is_err());
    }
}
