//! The single transaction that takes the kernel from the last applied table to the next one, and
//! the whole-table transactions of IPVS mode and `cleanup`.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
};

use svcplane_core::{IpFamily, Protocol};

use super::{
    NO_ENDPOINT_IPS, NO_ENDPOINT_NODEPORTS, NO_ENDPOINTS, REJECT, SERVICE_IPS, SERVICE_NODEPORTS, SERVICES,
    layout::{Shards, TableId},
    lower::{self, jump, mark_for_masquerade, masquerade_marked, node_port_lookup, service_lookup},
    model::{IpvsSupport, Rule, Ruleset},
    op::{Hook, HookPoint, Key, Op, SetKind, Transaction},
};

/// The transactions from `prev` (what the kernel holds, `None` when unknown) to `next`, one
/// per table that changes (none when nothing did). Both are a whole family's ruleset, or the
/// same part of it; [`Shards`] says which table holds each piece. With `prev` unknown every
/// table is rebuilt from scratch, and every other table svcplane may have made (a larger
/// shard count before a restart) is removed.
pub fn transaction(
    prev: Option<&Ruleset>,
    next: &Ruleset,
    family: IpFamily,
    shards: Shards,
) -> Vec<Transaction> {
    let next = shards.split(next);
    let empty = Ruleset::default();
    match prev {
        None => TableId::all()
            .filter_map(|table| match next.get(&table) {
                Some(part) => table_transaction(None, part, family, table),
                None => Some(remove_table(family, table)),
            })
            .collect(),
        Some(prev) => {
            let prev = shards.split(prev);
            let tables: BTreeSet<&TableId> = prev.keys().chain(next.keys()).collect();
            tables
                .into_iter()
                .filter_map(|table| {
                    table_transaction(
                        Some(prev.get(table).unwrap_or(&empty)),
                        next.get(table).unwrap_or(&empty),
                        family,
                        *table,
                    )
                })
                .collect()
        }
    }
}

/// Removes `table` if it exists (`add` then `delete` works whether or not it does).
fn remove_table(family: IpFamily, table: TableId) -> Transaction {
    let mut tx = Transaction::on(family, table);
    tx.push(Op::AddTable);
    tx.push(Op::DeleteTable);
    tx
}

/// The transaction that takes one table from `prev` to `next` (see [`transaction`]).
fn table_transaction(
    prev: Option<&Ruleset>,
    next: &Ruleset,
    family: IpFamily,
    table: TableId,
) -> Option<Transaction> {
    if prev == Some(next) {
        return None;
    }
    let empty = Ruleset::default();
    let (mut tx, prev) = match prev {
        Some(p) => (Transaction::on(family, table), p),
        None => {
            // Start afresh.
            let mut tx = remove_table(family, table);
            match table {
                TableId::Main => main_skeleton(&mut tx),
                TableId::Shard(_) => shard_skeleton(&mut tx),
            }
            (tx, &empty)
        }
    };
    for (name, timeout) in &next.affinity_sets {
        if prev.affinity_sets.get(name) != Some(timeout) {
            if prev.affinity_sets.contains_key(name) {
                tx.push(Op::DeleteSet(name.clone()));
            }
            tx.push(Op::AddSet {
                name: name.clone(),
                kind: SetKind::Affinity {
                    timeout_secs: *timeout,
                },
            });
        }
    }
    for (name, rules) in &next.chains {
        match prev.chains.get(name) {
            Some(old) if old == rules => {}
            Some(_) => {
                tx.push(Op::FlushChain(name.clone()));
                write_chain(&mut tx, name, rules);
            }
            None => {
                if !matches!(name.as_str(), SERVICES | NO_ENDPOINTS) || prev != &empty {
                    tx.push(Op::AddChain {
                        name: name.clone(),
                        hook: None,
                    });
                }
                write_chain(&mut tx, name, rules);
            }
        }
    }
    let ip_key = |(ip, p, port): &(IpAddr, Protocol, u16)| Key::Service(*ip, *p, *port);
    let port_key = |(p, port): &(Protocol, u16)| Key::Port(*p, *port);
    diff_map(&mut tx, SERVICE_IPS, &prev.service_ips, &next.service_ips, ip_key);
    diff_map(
        &mut tx,
        SERVICE_NODEPORTS,
        &prev.node_ports,
        &next.node_ports,
        port_key,
    );
    let to_reject = |set: &BTreeSet<(IpAddr, Protocol, u16)>| -> BTreeMap<(IpAddr, Protocol, u16), String> {
        set.iter().map(|k| (*k, REJECT.to_owned())).collect()
    };
    let to_reject_ports = |set: &BTreeSet<(Protocol, u16)>| -> BTreeMap<(Protocol, u16), String> {
        set.iter().map(|k| (*k, REJECT.to_owned())).collect()
    };
    diff_map(
        &mut tx,
        NO_ENDPOINT_IPS,
        &to_reject(&prev.no_endpoint_ips),
        &to_reject(&next.no_endpoint_ips),
        ip_key,
    );
    diff_map(
        &mut tx,
        NO_ENDPOINT_NODEPORTS,
        &to_reject_ports(&prev.no_endpoint_node_ports),
        &to_reject_ports(&next.no_endpoint_node_ports),
        port_key,
    );
    // Last: nothing refers to these any more.
    for name in prev.chains.keys().filter(|n| !next.chains.contains_key(*n)) {
        tx.push(Op::DeleteChain(name.clone()));
    }
    for name in prev
        .affinity_sets
        .keys()
        .filter(|n| !next.affinity_sets.contains_key(*n))
    {
        tx.push(Op::DeleteSet(name.clone()));
    }
    Some(tx)
}

fn write_chain(tx: &mut Transaction, name: &str, rules: &[Rule]) {
    for rule in rules {
        for exprs in lower::rules(rule, tx.family) {
            tx.push(Op::AddRule {
                chain: name.to_owned(),
                exprs,
            });
        }
    }
}

fn diff_map<K: Ord>(
    tx: &mut Transaction,
    map: &str,
    prev: &BTreeMap<K, String>,
    next: &BTreeMap<K, String>,
    key: impl Fn(&K) -> Key,
) {
    for (k, chain) in prev {
        if next.get(k) != Some(chain) {
            tx.push(Op::DeleteElement {
                set: map.into(),
                key: key(k),
            });
        }
    }
    for (k, chain) in next {
        if prev.get(k) != Some(chain) {
            tx.push(Op::AddElement {
                set: map.into(),
                key: key(k),
                goto: Some(chain.clone()),
            });
        }
    }
}

fn base_chain(tx: &mut Transaction, name: &str, point: HookPoint, priority: i32, nat: bool) {
    tx.push(Op::AddChain {
        name: name.into(),
        hook: Some(Hook { point, priority, nat }),
    });
}

fn rule(tx: &mut Transaction, chain: &str, exprs: Vec<crate::nft::expr::Expr>) {
    tx.push(Op::AddRule {
        chain: chain.into(),
        exprs,
    });
}

/// The fixed skeleton of `svcplane`: the no-endpoint maps and the filter chains rejecting
/// what they hold, and masquerading.
fn main_skeleton(tx: &mut Transaction) {
    tx.push(Op::AddTable);
    for (name, kind) in [
        (NO_ENDPOINT_IPS, SetKind::ServiceMap),
        (NO_ENDPOINT_NODEPORTS, SetKind::PortMap),
    ] {
        tx.push(Op::AddSet {
            name: name.into(),
            kind,
        });
    }
    tx.push(Op::AddChain {
        name: NO_ENDPOINTS.into(),
        hook: None,
    });
    for (name, point) in [
        ("filter-input", HookPoint::Input),
        ("filter-forward", HookPoint::Forward),
        ("filter-output", HookPoint::Output),
    ] {
        // Rejects just before filter rules, of new connections only (as kube-proxy): an
        // established one needs no lookup, and these chains see every packet of the node.
        base_chain(tx, name, point, -1, false);
        let mut new_connection = crate::nft::expr::ct_state_new();
        new_connection.extend(jump(NO_ENDPOINTS));
        rule(tx, name, new_connection);
    }
    masquerade_chain(tx);
}

/// The fixed skeleton of a shard: its service maps and the nat chains consulting them.
fn shard_skeleton(tx: &mut Transaction) {
    tx.push(Op::AddTable);
    for (name, kind) in [
        (SERVICE_IPS, SetKind::ServiceMap),
        (SERVICE_NODEPORTS, SetKind::PortMap),
    ] {
        tx.push(Op::AddSet {
            name: name.into(),
            kind,
        });
    }
    tx.push(Op::AddChain {
        name: SERVICES.into(),
        hook: None,
    });
    for (name, point) in [
        ("nat-prerouting", HookPoint::Prerouting),
        ("nat-output", HookPoint::Output),
    ] {
        // DNAT before routing decides (NF_IP_PRI_NAT_DST).
        base_chain(tx, name, point, -100, true);
        rule(tx, name, jump(SERVICES));
    }
}

/// The postrouting chain masquerading what was marked for it (NF_IP_PRI_NAT_SRC).
fn masquerade_chain(tx: &mut Transaction) {
    base_chain(tx, "nat-postrouting", HookPoint::Postrouting, 100, true);
    rule(tx, "nat-postrouting", masquerade_marked());
}

/// The whole IPVS-mode table (`svcplane`), replaced in one transaction (it holds no state worth
/// keeping), and the removal of nftables mode's shards, should the node have run it.
pub fn ipvs_support_transaction(support: &IpvsSupport, family: IpFamily) -> Vec<Transaction> {
    let mut out: Vec<Transaction> = TableId::all()
        .filter(|t| *t != TableId::Main)
        .map(|t| remove_table(family, t))
        .collect();
    out.push(ipvs_support_table(support, family));
    out
}

const MASQUERADE_NODE_PORTS: &str = "masquerade-node-ports";
const MASQUERADE_IPS: &str = "masquerade-ips";
const CLUSTER_IPS: &str = "cluster-ips";
const REJECT_IPS: &str = "reject-ips";

/// The element changes that take IPVS mode's table from `prev` to `next`, when its rules are
/// the same (the Pod range is); `None` when they are not, and the table must be rebuilt.
pub fn ipvs_support_update(prev: &IpvsSupport, next: &IpvsSupport, family: IpFamily) -> Option<Transaction> {
    if prev.cluster_cidr != next.cluster_cidr {
        return None;
    }
    let mut tx = Transaction::on(family, TableId::Main);
    let mut sets =
        |set: &str, before: &BTreeSet<(IpAddr, Protocol, u16)>, after: &BTreeSet<(IpAddr, Protocol, u16)>| {
            for (ip, p, port) in before.difference(after) {
                tx.push(Op::DeleteElement {
                    set: set.into(),
                    key: Key::Service(*ip, *p, *port),
                });
            }
            for (ip, p, port) in after.difference(before) {
                tx.push(Op::AddElement {
                    set: set.into(),
                    key: Key::Service(*ip, *p, *port),
                    goto: None,
                });
            }
        };
    sets(MASQUERADE_IPS, &prev.masquerade_ips, &next.masquerade_ips);
    sets(CLUSTER_IPS, &prev.cluster_ips, &next.cluster_ips);
    sets(REJECT_IPS, &prev.reject_ips, &next.reject_ips);
    for (p, port) in prev.masquerade_node_ports.difference(&next.masquerade_node_ports) {
        tx.push(Op::DeleteElement {
            set: MASQUERADE_NODE_PORTS.into(),
            key: Key::Port(*p, *port),
        });
    }
    for (p, port) in next.masquerade_node_ports.difference(&prev.masquerade_node_ports) {
        tx.push(Op::AddElement {
            set: MASQUERADE_NODE_PORTS.into(),
            key: Key::Port(*p, *port),
            goto: None,
        });
    }
    Some(tx)
}

fn ipvs_support_table(support: &IpvsSupport, family: IpFamily) -> Transaction {
    let mut tx = remove_table(family, TableId::Main);
    tx.push(Op::AddTable);
    for (name, kind) in [
        (MASQUERADE_NODE_PORTS, SetKind::PortSet),
        (MASQUERADE_IPS, SetKind::ServiceSet),
        (CLUSTER_IPS, SetKind::ServiceSet),
        (REJECT_IPS, SetKind::ServiceSet),
    ] {
        tx.push(Op::AddSet {
            name: name.into(),
            kind,
        });
    }
    let element = |set: &str, key: Key| Op::AddElement {
        set: set.into(),
        key,
        goto: None,
    };
    for (p, port) in &support.masquerade_node_ports {
        tx.push(element(MASQUERADE_NODE_PORTS, Key::Port(*p, *port)));
    }
    for (ip, p, port) in &support.masquerade_ips {
        tx.push(element(MASQUERADE_IPS, Key::Service(*ip, *p, *port)));
    }
    for (ip, p, port) in &support.cluster_ips {
        tx.push(element(CLUSTER_IPS, Key::Service(*ip, *p, *port)));
    }
    for (ip, p, port) in &support.reject_ips {
        tx.push(element(REJECT_IPS, Key::Service(*ip, *p, *port)));
    }
    // Marked before IPVS (LOCAL_IN) rewrites the destination.
    base_chain(&mut tx, "mark-for-masquerade", HookPoint::Prerouting, -150, false);
    let mut node_ports = node_port_lookup(MASQUERADE_NODE_PORTS, false);
    node_ports.extend(mark_for_masquerade());
    rule(&mut tx, "mark-for-masquerade", node_ports);
    let mut ips = service_lookup(family, MASQUERADE_IPS, false);
    ips.extend(mark_for_masquerade());
    rule(&mut tx, "mark-for-masquerade", ips);
    if let Some(cidr) = support.cluster_cidr {
        let mut from_outside = service_lookup(family, CLUSTER_IPS, false);
        from_outside.extend(crate::nft::expr::saddr_outside(cidr));
        from_outside.extend(mark_for_masquerade());
        rule(&mut tx, "mark-for-masquerade", from_outside);
    }
    masquerade_chain(&mut tx);
    for (name, point) in [
        ("filter-input", HookPoint::Input),
        ("filter-forward", HookPoint::Forward),
    ] {
        base_chain(&mut tx, name, point, -1, false);
        let mut reject = service_lookup(family, REJECT_IPS, false);
        reject.push(crate::nft::expr::reject(family == IpFamily::IPv6));
        rule(&mut tx, name, reject);
    }
    tx
}

/// Removes svcplane's tables (the `cleanup` command), whatever the shard count was. Deleting
/// what does not exist is not an error: each table is added first.
pub fn cleanup() -> Vec<Transaction> {
    [IpFamily::IPv4, IpFamily::IPv6]
        .into_iter()
        .flat_map(|family| TableId::all().map(move |t| remove_table(family, t)))
        .collect()
}
