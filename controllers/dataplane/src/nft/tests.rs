//! The tables and transactions for the Services a node sees.

use std::time::Duration;

use std::{collections::BTreeMap, net::IpAddr};

use super::{model::*, op::SetKind, *};
use svcplane_core::{IpFamily, ObjectKey, Protocol};

use crate::desired::{Backends, DesiredState, PortState, ServicePortName};

fn port(name: &str, cluster_ip: &str, internal: Backends) -> PortState {
    PortState {
        name: ServicePortName {
            service: ObjectKey::new("ns", name),
            port: "http".into(),
            protocol: Protocol::Tcp,
        },
        family: IpFamily::IPv4,
        cluster_ip: cluster_ip.parse().unwrap(),
        port: 80,
        external_ips: vec![],
        node_port: None,
        affinity: None,
        external: internal.clone(),
        internal,
        masquerade_external: true,
        cluster_cidr: None,
        terminating: vec![],
    }
}

fn to(addrs: &[&str]) -> Backends {
    Backends::To(addrs.iter().map(|a| a.parse().unwrap()).collect())
}

fn state(ports: Vec<PortState>) -> DesiredState {
    DesiredState {
        ports: ports
            .into_iter()
            .map(|p| ((p.name.clone(), p.family), p))
            .collect(),
        health_checks: BTreeMap::new(),
    }
}

fn one() -> Shards {
    Shards::new(1).unwrap()
}

/// The commands that turn `before` into `after` (IPv4, one shard; there must be a change).
fn update(before: &Ruleset, after: &Ruleset) -> Vec<String> {
    let txs = transaction(Some(before), after, IpFamily::IPv4, one());
    assert!(!txs.is_empty());
    commands(&txs)
}

/// Each op as `<verb> <kind> <name>`, transaction after transaction.
fn commands(txs: &[Transaction]) -> Vec<String> {
    txs.iter()
        .flat_map(|t| t.ops.iter().map(move |op| (t.table, op)))
        .map(|(table, op)| match op {
            Op::AddTable => format!("add table {table}"),
            Op::DeleteTable => format!("delete table {table}"),
            Op::AddChain { name, .. } => format!("add chain {name}"),
            Op::FlushChain(name) => format!("flush chain {name}"),
            Op::DeleteChain(name) => format!("delete chain {name}"),
            Op::AddRule { chain, .. } => format!("add rule {chain}"),
            Op::AddSet {
                name,
                kind: SetKind::ServiceMap | SetKind::PortMap,
            } => format!("add map {name}"),
            Op::AddSet { name, .. } => format!("add set {name}"),
            Op::DeleteSet(name) => format!("delete set {name}"),
            Op::AddElement { set, .. } => format!("add element {set}"),
            Op::DeleteElement { set, .. } => format!("delete element {set}"),
        })
        .collect()
}

fn web(backends: Backends) -> PortState {
    let mut web = port("web", "10.96.0.10", backends);
    web.node_port = Some(30080);
    web.external_ips = vec!["192.0.2.1".parse().unwrap()];
    web.affinity = Some(Duration::from_secs(60));
    web
}

#[test]
fn services_map_to_chains_and_empty_ones_to_reject() {
    let st = state(vec![
        web(to(&["10.0.2.2:8080", "10.0.3.2:8080"])),
        port("empty", "10.96.0.11", Backends::Reject),
    ]);
    let rs = ruleset(&st, IpFamily::IPv4);
    let key = |ip: &str| (ip.parse::<IpAddr>().unwrap(), Protocol::Tcp, 80);
    assert_eq!(rs.service_ips[&key("10.96.0.10")], "svc-ns/web/tcp/http");
    assert_eq!(rs.service_ips[&key("192.0.2.1")], "ext-ns/web/tcp/http");
    assert_eq!(rs.node_ports[&(Protocol::Tcp, 30080)], "ext-ns/web/tcp/http");
    assert!(rs.no_endpoint_ips.contains(&key("10.96.0.11")));
    assert!(!rs.service_ips.contains_key(&key("10.96.0.11")));
    let ep = "ep-ns/web/tcp/http__10.0.2.2:8080";
    assert_eq!(
        rs.chains["svc-ns/web/tcp/http"],
        [
            Rule::Affinity {
                set: "aff-ns/web/tcp/http__10.0.2.2:8080".into(),
                chain: ep.into()
            },
            Rule::Affinity {
                set: "aff-ns/web/tcp/http__10.0.3.2:8080".into(),
                chain: "ep-ns/web/tcp/http__10.0.3.2:8080".into()
            },
            Rule::Pick {
                chain: ep.into(),
                one_in: 2
            },
            Rule::Pick {
                chain: "ep-ns/web/tcp/http__10.0.3.2:8080".into(),
                one_in: 1
            },
        ]
    );
    assert_eq!(rs.chains["ext-ns/web/tcp/http"][0], Rule::MarkMasquerade);
    assert_eq!(
        rs.chains[ep],
        [
            Rule::Hairpin("10.0.2.2".parse().unwrap()),
            Rule::RefreshAffinity("aff-ns/web/tcp/http__10.0.2.2:8080".into()),
            Rule::Dnat("10.0.2.2:8080".parse().unwrap(), Protocol::Tcp),
        ]
    );
    assert_eq!(rs.affinity_sets.len(), 2);
    assert!(
        ruleset(&st, IpFamily::IPv6).service_ips.is_empty(),
        "families apart"
    );
}

#[test]
fn the_spread_picks_every_endpoint_with_equal_probability() {
    for n in 1..=7 {
        let eps: Vec<String> = (0..n).map(|i| format!("10.0.{i}.2:80")).collect();
        let eps: Vec<&str> = eps.iter().map(String::as_str).collect();
        let rs = ruleset(&state(vec![port("web", "10.96.0.10", to(&eps))]), IpFamily::IPv4);
        let mut reach = 1.0_f64;
        let mut picked = Vec::new();
        for rule in &rs.chains["svc-ns/web/tcp/http"] {
            if let Rule::Pick { one_in, .. } = rule {
                let p = reach / f64::from(*one_in);
                picked.push(p);
                reach -= p;
            }
        }
        assert_eq!(picked.len(), n);
        assert!(reach.abs() < 1e-12, "some traffic falls through: {reach}");
        for p in picked {
            assert!((p - 1.0 / n as f64).abs() < 1e-12, "{n} endpoints: {p}");
        }
    }
}

#[test]
fn local_policy_without_local_endpoints_drops_external_traffic() {
    let mut p = web(to(&["10.0.2.2:8080"]));
    p.external = Backends::Drop;
    p.masquerade_external = false;
    let rs = ruleset(&state(vec![p]), IpFamily::IPv4);
    assert_eq!(rs.chains["ext-ns/web/tcp/http"], [Rule::Drop]);
    assert!(rs.no_endpoint_node_ports.is_empty(), "dropped, not rejected");
}

#[test]
fn a_first_sync_rebuilds_the_table_and_an_unchanged_one_writes_nothing() {
    let rs = ruleset(&state(vec![web(to(&["10.0.2.2:8080"]))]), IpFamily::IPv4);
    let full = commands(&transaction(None, &rs, IpFamily::IPv4, one()));
    assert_eq!(
        full[..3],
        [
            "add table svcplane",
            "delete table svcplane",
            "add table svcplane"
        ]
    );
    let shard = full.iter().position(|c| c == "add table svcplane-00").unwrap();
    assert_eq!(
        full[shard..shard + 3],
        [
            "add table svcplane-00",
            "delete table svcplane-00",
            "add table svcplane-00"
        ]
    );
    assert!(full.contains(&"add map service-ips".to_owned()));
    assert!(full.contains(&"add chain nat-prerouting".to_owned()));
    assert!(full.contains(&"add element service-nodeports".to_owned()));
    // Shards of an earlier, larger count go.
    assert!(full.ends_with(&[
        "add table svcplane-63".to_owned(),
        "delete table svcplane-63".to_owned()
    ]));
    assert_eq!(transaction(Some(&rs), &rs, IpFamily::IPv4, one()), []);
}

#[test]
fn the_skeleton_has_two_verdict_maps_of_addresses_and_two_of_node_ports() {
    let rs = ruleset(&state(vec![]), IpFamily::IPv4);
    let txs = transaction(None, &rs, IpFamily::IPv4, one());
    let maps: Vec<SetKind> = txs
        .iter()
        .flat_map(|t| &t.ops)
        .filter_map(|op| match op {
            Op::AddSet { kind, .. } => Some(*kind),
            _ => None,
        })
        .collect();
    assert_eq!(
        maps,
        [
            // `svcplane`'s no-endpoint maps, the shard's service maps.
            SetKind::ServiceMap,
            SetKind::PortMap,
            SetKind::ServiceMap,
            SetKind::PortMap
        ]
    );
}

#[test]
fn removing_an_endpoint_rewrites_only_its_service() {
    let before = ruleset(
        &state(vec![
            web(to(&["10.0.2.2:8080", "10.0.3.2:8080"])),
            port("other", "10.96.0.12", to(&["10.0.4.2:80"])),
        ]),
        IpFamily::IPv4,
    );
    let after = ruleset(
        &state(vec![
            web(to(&["10.0.2.2:8080"])),
            port("other", "10.96.0.12", to(&["10.0.4.2:80"])),
        ]),
        IpFamily::IPv4,
    );
    let cmds = update(&before, &after);
    assert_eq!(
        cmds,
        [
            "flush chain ext-ns/web/tcp/http",
            "add rule ext-ns/web/tcp/http",
            "add rule ext-ns/web/tcp/http",
            "add rule ext-ns/web/tcp/http",
            "flush chain svc-ns/web/tcp/http",
            "add rule svc-ns/web/tcp/http",
            "add rule svc-ns/web/tcp/http",
            "delete chain ep-ns/web/tcp/http__10.0.3.2:8080",
            "delete set aff-ns/web/tcp/http__10.0.3.2:8080",
        ]
    );
}

#[test]
fn losing_every_endpoint_moves_the_address_to_the_reject_map() {
    let before = ruleset(
        &state(vec![port("web", "10.96.0.10", to(&["10.0.2.2:80"]))]),
        IpFamily::IPv4,
    );
    let after = ruleset(
        &state(vec![port("web", "10.96.0.10", Backends::Reject)]),
        IpFamily::IPv4,
    );
    let cmds = update(&before, &after);
    assert_eq!(
        cmds,
        [
            // `svcplane`, then the Service's shard: one batch, one kernel transaction.
            "add element no-endpoint-services",
            "delete element service-ips",
            "delete chain ep-ns/web/tcp/http__10.0.2.2:80",
            "delete chain svc-ns/web/tcp/http",
        ]
    );
}

#[test]
fn ipvs_mode_masquerades_cluster_policy_external_traffic_and_rejects_empty_services() {
    let mut local = web(to(&["10.0.2.2:8080"]));
    local.name.service = ObjectKey::new("ns", "local");
    local.cluster_ip = "10.96.0.20".parse().unwrap();
    local.node_port = Some(30090);
    local.masquerade_external = false;
    let st = state(vec![
        web(to(&["10.0.2.2:8080"])),
        local,
        port("empty", "10.96.0.11", Backends::Reject),
    ]);
    let sup = ipvs_support(&st, IpFamily::IPv4);
    assert_eq!(sup.masquerade_node_ports, [(Protocol::Tcp, 30080)].into());
    assert_eq!(
        sup.masquerade_ips,
        [("192.0.2.1".parse().unwrap(), Protocol::Tcp, 80)].into()
    );
    assert_eq!(
        sup.reject_ips,
        [("10.96.0.11".parse().unwrap(), Protocol::Tcp, 80)].into()
    );
    let txs = ipvs_support_transaction(&sup, IpFamily::IPv4);
    // nftables mode's shards go.
    assert_eq!(txs.len(), 65);
    assert_eq!(
        commands(&txs[..1]),
        ["add table svcplane-00", "delete table svcplane-00"]
    );
    let cmds = commands(&txs[64..]);
    assert_eq!(
        cmds[..3],
        [
            "add table svcplane",
            "delete table svcplane",
            "add table svcplane"
        ]
    );
    assert!(cmds.contains(&"add chain nat-postrouting".to_owned()));
}

#[test]
fn with_the_pod_range_known_cluster_ip_traffic_from_outside_it_is_masqueraded() {
    let cidr: ipnet::IpNet = "10.244.0.0/16".parse().unwrap();
    let mut web = web(to(&["10.0.2.2:8080"]));
    web.cluster_cidr = Some(cidr);
    let mut empty = port("empty", "10.96.0.11", Backends::Reject);
    empty.cluster_cidr = Some(cidr);
    let rs = ruleset(&state(vec![web.clone(), empty.clone()]), IpFamily::IPv4);
    // First in the cluster IP's chain, before the affinity checks that may leave it.
    assert_eq!(
        rs.chains["svc-ns/web/tcp/http"][0],
        Rule::MasqueradeFromOutside(cidr)
    );
    // External traffic is masqueraded by its policy alone.
    assert!(!rs.chains["ext-ns/web/tcp/http"].contains(&Rule::MasqueradeFromOutside(cidr)));
    assert!(!rs.chains.contains_key("svc-ns/empty/tcp/http"));
    // The flag's change rewrites the chains it touches (masquerade, affinity, pick), and
    // nothing else.
    web.cluster_cidr = None;
    let before = ruleset(&state(vec![web, empty]), IpFamily::IPv4);
    assert_eq!(
        update(&before, &rs),
        ["flush chain svc-ns/web/tcp/http"]
            .into_iter()
            .chain(std::iter::repeat_n("add rule svc-ns/web/tcp/http", 3))
            .collect::<Vec<_>>()
    );

    // IPVS mode: a set of the cluster IPs with endpoints, and one rule for them.
    let mut web = web_with_cidr(cidr);
    web.masquerade_external = false;
    let sup = ipvs_support(
        &state(vec![web, port("empty", "10.96.0.11", Backends::Reject)]),
        IpFamily::IPv4,
    );
    assert_eq!(
        sup.cluster_ips,
        [("10.96.0.10".parse().unwrap(), Protocol::Tcp, 80)].into()
    );
    assert_eq!(sup.cluster_cidr, Some(cidr));
    let cmds = commands(&ipvs_support_transaction(&sup, IpFamily::IPv4)[64..]);
    assert_eq!(cmds.iter().filter(|c| *c == "add element cluster-ips").count(), 1);
    assert_eq!(
        cmds.iter()
            .filter(|c| *c == "add rule mark-for-masquerade")
            .count(),
        3
    );
    let sup = ipvs_support(
        &state(vec![port("a", "10.96.0.12", to(&["10.0.2.2:8080"]))]),
        IpFamily::IPv4,
    );
    let cmds = commands(&ipvs_support_transaction(&sup, IpFamily::IPv4)[64..]);
    assert_eq!(
        cmds.iter()
            .filter(|c| *c == "add rule mark-for-masquerade")
            .count(),
        2,
        "no range, no rule"
    );
}

#[test]
fn ipvs_mode_changes_its_table_element_by_element_while_its_rules_stay() {
    let st = state(vec![
        web(to(&["10.0.2.2:8080"])),
        port("empty", "10.96.0.11", Backends::Reject),
    ]);
    let before = ipvs_support(&st, IpFamily::IPv4);
    // The empty Service gets an endpoint; web loses its node port.
    let mut web2 = web(to(&["10.0.2.2:8080"]));
    web2.node_port = None;
    let st = state(vec![web2, port("empty", "10.96.0.11", to(&["10.0.3.2:8080"]))]);
    let after = ipvs_support(&st, IpFamily::IPv4);
    let tx = ipvs_support_update(&before, &after, IpFamily::IPv4).unwrap();
    assert_eq!(
        commands(&[tx]),
        [
            "delete element reject-ips",
            "delete element masquerade-node-ports"
        ]
    );
    assert!(
        ipvs_support_update(&after, &after, IpFamily::IPv4)
            .unwrap()
            .is_empty()
    );
    // A new Pod range changes a rule: no update, a rebuild.
    let mut ranged = after.clone();
    ranged.cluster_cidr = Some("10.244.0.0/16".parse().unwrap());
    assert!(ipvs_support_update(&after, &ranged, IpFamily::IPv4).is_none());
}

fn web_with_cidr(cidr: ipnet::IpNet) -> PortState {
    let mut w = web(to(&["10.0.2.2:8080"]));
    w.cluster_cidr = Some(cidr);
    w
}

#[test]
fn cleanup_removes_every_table_of_both_families() {
    let txs = cleanup();
    assert_eq!(txs.len(), 2 * 65);
    for (family, txs) in [IpFamily::IPv4, IpFamily::IPv6].into_iter().zip(txs.chunks(65)) {
        assert!(txs.iter().all(|t| t.family == family));
        assert_eq!(
            commands(&txs[..1]),
            ["add table svcplane", "delete table svcplane"]
        );
        assert_eq!(
            commands(&txs[64..]),
            ["add table svcplane-63", "delete table svcplane-63"]
        );
    }
}
