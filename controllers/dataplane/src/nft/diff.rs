//! The single transaction that takes the kernel from the last applied table to the next one, and
//! the whole-table transactions of IPVS mode and `cleanup`.

use std::{
    borrow::Cow,
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
};

use nftables::{
    batch::Batch,
    expr::{Expression, MetaKey, NamedExpression},
    schema::{FlushObject, NfCmd, NfListObject, Set, SetType, SetTypeValue},
    stmt::Statement,
    types::{NfChainType, NfHook},
};

use svcplane_core::{IpFamily, Protocol};

use super::{
    NO_ENDPOINT_IPS, NO_ENDPOINT_NODEPORTS, NO_ENDPOINTS, REJECT, SERVICE_IPS, SERVICE_NODEPORTS, SERVICES,
    TABLE,
    model::{IpvsSupport, Ruleset},
    render::{Transaction, Writer, daddr_is_local, eq, mark_for_masquerade, meta, payload, s},
};

/// The transaction from `prev` (what the kernel holds, `None` when unknown) to `next`; `Ok(None)`
/// when nothing changed. With `prev` unknown the table is rebuilt from scratch.
pub fn transaction(
    prev: Option<&Ruleset>,
    next: &Ruleset,
    family: IpFamily,
) -> Result<Option<Transaction>, serde_json::Error> {
    if prev == Some(next) {
        return Ok(None);
    }
    let mut w = Writer::new(family);
    let empty = Ruleset::default();
    let prev = match prev {
        Some(p) => p,
        None => {
            // `add` then `delete` works whether or not the table exists; then start afresh.
            w.batch.add(NfListObject::Table(w.table()));
            w.batch.delete(NfListObject::Table(w.table()));
            w.skeleton();
            &empty
        }
    };
    for (name, timeout) in &next.affinity_sets {
        if prev.affinity_sets.get(name) != Some(timeout) {
            if prev.affinity_sets.contains_key(name) {
                w.batch
                    .delete(NfListObject::Set(Box::new(w.affinity_set(name, *timeout))));
            }
            w.batch
                .add(NfListObject::Set(Box::new(w.affinity_set(name, *timeout))));
        }
    }
    for (name, rules) in &next.chains {
        match prev.chains.get(name) {
            Some(old) if old == rules => {}
            Some(_) => {
                w.batch.add_cmd(NfCmd::Flush(FlushObject::Chain(w.chain(name))));
                w.write_chain(name, rules);
            }
            None => {
                if !matches!(name.as_str(), SERVICES | NO_ENDPOINTS) || prev != &empty {
                    w.batch.add(NfListObject::Chain(w.chain(name)));
                }
                w.write_chain(name, rules);
            }
        }
    }
    diff_map(
        &mut w,
        SERVICE_IPS,
        &prev.service_ips,
        &next.service_ips,
        Writer::ip_key,
    );
    diff_map(
        &mut w,
        SERVICE_NODEPORTS,
        &prev.node_ports,
        &next.node_ports,
        |_, k| Writer::port_key(k),
    );
    let to_reject = |set: &BTreeSet<(IpAddr, Protocol, u16)>| -> BTreeMap<(IpAddr, Protocol, u16), String> {
        set.iter().map(|k| (*k, REJECT.to_owned())).collect()
    };
    let to_reject_ports = |set: &BTreeSet<(Protocol, u16)>| -> BTreeMap<(Protocol, u16), String> {
        set.iter().map(|k| (*k, REJECT.to_owned())).collect()
    };
    diff_map(
        &mut w,
        NO_ENDPOINT_IPS,
        &to_reject(&prev.no_endpoint_ips),
        &to_reject(&next.no_endpoint_ips),
        Writer::ip_key,
    );
    diff_map(
        &mut w,
        NO_ENDPOINT_NODEPORTS,
        &to_reject_ports(&prev.no_endpoint_node_ports),
        &to_reject_ports(&next.no_endpoint_node_ports),
        |_, k| Writer::port_key(k),
    );
    // Last: nothing refers to these any more.
    for name in prev.chains.keys().filter(|n| !next.chains.contains_key(*n)) {
        w.batch.delete(NfListObject::Chain(w.chain(name)));
    }
    for (name, timeout) in prev
        .affinity_sets
        .iter()
        .filter(|(n, _)| !next.affinity_sets.contains_key(*n))
    {
        w.batch
            .delete(NfListObject::Set(Box::new(w.affinity_set(name, *timeout))));
    }
    Transaction::from_batch(&w.batch.to_nftables()).map(Some)
}

fn diff_map<K: Ord>(
    w: &mut Writer,
    map: &str,
    prev: &BTreeMap<K, String>,
    next: &BTreeMap<K, String>,
    key: impl Fn(&Writer, &K) -> Expression<'static>,
) {
    for (k, chain) in prev {
        if next.get(k) != Some(chain) {
            let e = w.element(map, key(w, k), chain);
            w.batch.delete(e);
        }
    }
    for (k, chain) in next {
        if prev.get(k) != Some(chain) {
            let e = w.element(map, key(w, k), chain);
            w.batch.add(e);
        }
    }
}

/// The whole IPVS-mode table, replaced in one transaction (it holds no state worth keeping).
pub fn ipvs_support_transaction(
    support: &IpvsSupport,
    family: IpFamily,
) -> Result<Transaction, serde_json::Error> {
    let mut w = Writer::new(family);
    w.batch.add(NfListObject::Table(w.table()));
    w.batch.delete(NfListObject::Table(w.table()));
    w.batch.add(NfListObject::Table(w.table()));
    let ip_key = vec![w.addr_type, SetType::InetProto, SetType::InetService];
    let port_key = vec![SetType::InetProto, SetType::InetService];
    let set = |w: &Writer, name: &str, key: Vec<SetType>, elems: Vec<Expression<'static>>| Set {
        family: w.family,
        table: Cow::Borrowed(TABLE),
        name: s(name),
        set_type: SetTypeValue::Concatenated(Cow::Owned(key)),
        elem: (!elems.is_empty()).then(|| Cow::Owned(elems)),
        ..Set::default()
    };
    let np: Vec<_> = support
        .masquerade_node_ports
        .iter()
        .map(Writer::port_key)
        .collect();
    let ips: Vec<_> = support.masquerade_ips.iter().map(|k| w.ip_key(k)).collect();
    let rejects: Vec<_> = support.reject_ips.iter().map(|k| w.ip_key(k)).collect();
    w.batch.add(NfListObject::Set(Box::new(set(
        &w,
        "masquerade-node-ports",
        port_key,
        np,
    ))));
    w.batch.add(NfListObject::Set(Box::new(set(
        &w,
        "masquerade-ips",
        ip_key.clone(),
        ips,
    ))));
    w.batch.add(NfListObject::Set(Box::new(set(
        &w,
        "reject-ips",
        ip_key,
        rejects,
    ))));
    // Marked before IPVS (LOCAL_IN) rewrites the destination.
    w.batch.add(NfListObject::Chain(w.base_chain(
        "mark-for-masquerade",
        NfChainType::Filter,
        NfHook::Prerouting,
        -150,
    )));
    w.add_rule(
        "mark-for-masquerade",
        vec![
            daddr_is_local(),
            eq(
                Expression::Named(NamedExpression::Concat(vec![
                    meta(MetaKey::L4proto),
                    payload("th", "dport"),
                ])),
                Expression::String(Cow::Borrowed("@masquerade-node-ports")),
            ),
            mark_for_masquerade(),
        ],
    );
    w.add_rule(
        "mark-for-masquerade",
        vec![
            eq(
                w.service_tuple(),
                Expression::String(Cow::Borrowed("@masquerade-ips")),
            ),
            mark_for_masquerade(),
        ],
    );
    w.masquerade_chain();
    for (name, hook) in [
        ("filter-input", NfHook::Input),
        ("filter-forward", NfHook::Forward),
    ] {
        w.batch.add(NfListObject::Chain(w.base_chain(
            name,
            NfChainType::Filter,
            hook,
            -1,
        )));
        w.add_rule(
            name,
            vec![
                eq(
                    w.service_tuple(),
                    Expression::String(Cow::Borrowed("@reject-ips")),
                ),
                Statement::Reject(None),
            ],
        );
    }
    Transaction::from_batch(&w.batch.to_nftables())
}

/// Removes svcplane's tables (the `cleanup` command). Deleting what does not exist is not an
/// error: the table is added first.
pub fn cleanup() -> Result<Transaction, serde_json::Error> {
    let mut batch = Batch::new();
    for family in [IpFamily::IPv4, IpFamily::IPv6] {
        let w = Writer::new(family);
        batch.add(NfListObject::Table(w.table()));
        batch.delete(NfListObject::Table(w.table()));
    }
    Transaction::from_batch(&batch.to_nftables())
}
