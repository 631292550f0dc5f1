//! nf_tables over netlink against this machine's kernel, each test in a network namespace of its
//! own (root needed). `nft` is the oracle: a table svcplane writes must list exactly as the same
//! table written in nft's own syntax and loaded by nft.

#![allow(clippy::unwrap_used)]

use std::{
    collections::{BTreeMap, BTreeSet},
    io::Write,
    process::{Command, Stdio},
};

use serde_json::Value;
use svcplane_core::{IpFamily, Protocol};
use svcplane_dataplane::nft::{
    Op, Rule, Ruleset, Shards, TableId, Transaction,
    table::{Table, repair},
    transaction,
};
use svcplane_kernel::nft::NftSocket;

/// Runs `f` on a thread in a new network namespace (commands it spawns run there too).
fn in_netns<T: Send>(f: impl FnOnce() -> T + Send) -> T {
    std::thread::scope(|s| {
        s.spawn(|| {
            nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET)
                .expect("unshare(CLONE_NEWNET): these tests need root");
            f()
        })
        .join()
        .unwrap()
    })
}

fn nft(args: &[&str], input: Option<&str>) -> String {
    let mut child = Command::new("nft")
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("running nft (the tests' oracle)");
    let mut stdin = child.stdin.take().unwrap();
    if let Some(text) = input {
        stdin.write_all(text.as_bytes()).unwrap();
    }
    drop(stdin);
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "nft {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// `nft -j list ruleset` without what differs between equal rulesets: handles, the order of
/// objects and of set elements. Rules keep their order within their chain.
fn listing() -> BTreeMap<String, Value> {
    let v: Value = serde_json::from_str(&nft(&["-j", "list", "ruleset"], None)).unwrap();
    let mut out = BTreeMap::new();
    for object in v["nftables"].as_array().unwrap() {
        let (kind, body) = object.as_object().unwrap().iter().next().unwrap();
        let mut body = body.clone();
        let Some(fields) = body.as_object_mut() else {
            continue;
        };
        fields.remove("handle");
        if let Some(Value::Array(elems)) = fields.get_mut("elem") {
            elems.sort_by_key(Value::to_string);
        }
        let family = fields.get("family").map(Value::to_string).unwrap_or_default();
        match kind.as_str() {
            "metainfo" => {}
            "rule" => {
                let chain = fields["chain"].to_string();
                let rules = out
                    .entry(format!("rule {family} {chain}"))
                    .or_insert_with(|| Value::Array(vec![]));
                if let Value::Array(rules) = rules {
                    rules.push(fields["expr"].clone());
                }
            }
            _ => {
                let name = fields.get("name").map(Value::to_string).unwrap_or_default();
                out.insert(format!("{kind} {family} {name}"), body);
            }
        }
    }
    out
}

/// Every table rebuilt for `rs`, with one shard: `svcplane` and `svcplane-00`.
fn full(rs: &Ruleset, family: IpFamily) -> Vec<Transaction> {
    transaction(None, rs, family, Shards::new(1).unwrap())
}

fn apply(transactions: &[Transaction]) {
    let mut socket = NftSocket::open().unwrap();
    if let Err(e) = socket.apply(transactions) {
        panic!("{e}");
    }
}

fn svc(ip: &str, p: Protocol, port: u16) -> (std::net::IpAddr, Protocol, u16) {
    (ip.parse().unwrap(), p, port)
}

fn chains(rs: &mut Ruleset, list: &[(&str, Vec<Rule>)]) {
    for (name, rules) in list {
        rs.chains.insert((*name).into(), rules.clone());
    }
}

/// The skeleton's regular chains, as the model holds them.
fn skeleton() -> Ruleset {
    let mut rs = Ruleset::default();
    chains(
        &mut rs,
        &[
            ("services", vec![Rule::DispatchServices]),
            ("no-endpoints", vec![Rule::DispatchNoEndpoints]),
            ("reject-chain", vec![Rule::Reject]),
        ],
    );
    rs
}

/// Every kind of rule and element svcplane writes, in IPv4.
fn v4() -> Ruleset {
    let mut rs = skeleton();
    let pick = |chain: &str, one_in| Rule::Pick {
        chain: chain.into(),
        one_in,
    };
    chains(
        &mut rs,
        &[
            (
                "ep-web-1",
                vec![
                    Rule::Hairpin("10.0.2.2".parse().unwrap()),
                    Rule::RefreshAffinity("aff-web-1".into()),
                    Rule::Dnat("10.0.2.2:8080".parse().unwrap(), Protocol::Tcp),
                ],
            ),
            (
                "ep-web-2",
                vec![
                    Rule::Hairpin("10.0.3.2".parse().unwrap()),
                    Rule::Dnat("10.0.3.2:8080".parse().unwrap(), Protocol::Tcp),
                ],
            ),
            (
                "svc-web",
                vec![
                    Rule::MasqueradeFromOutside("10.244.0.0/16".parse().unwrap()),
                    Rule::Affinity {
                        set: "aff-web-1".into(),
                        chain: "ep-web-1".into(),
                    },
                    pick("ep-web-1", 2),
                    pick("ep-web-2", 1),
                ],
            ),
            (
                "ext-web",
                vec![Rule::MarkMasquerade, pick("ep-web-1", 2), pick("ep-web-2", 1)],
            ),
            ("ext-dns", vec![Rule::Drop]),
            (
                "svc-odd",
                vec![
                    Rule::MasqueradeFromOutside("10.96.0.0/12".parse().unwrap()),
                    Rule::Drop,
                ],
            ),
        ],
    );
    rs.affinity_sets.insert("aff-web-1".into(), 10800);
    rs.service_ips
        .insert(svc("10.96.0.10", Protocol::Tcp, 80), "svc-web".into());
    rs.service_ips
        .insert(svc("192.0.2.1", Protocol::Tcp, 80), "ext-web".into());
    rs.node_ports.insert((Protocol::Tcp, 30080), "ext-web".into());
    rs.node_ports.insert((Protocol::Udp, 30053), "ext-dns".into());
    rs.no_endpoint_ips.insert(svc("10.96.0.11", Protocol::Tcp, 80));
    rs.no_endpoint_node_ports.insert((Protocol::Tcp, 30081));
    rs
}

fn v6() -> Ruleset {
    let mut rs = skeleton();
    chains(
        &mut rs,
        &[
            (
                "ep-v6",
                vec![
                    Rule::Hairpin("fd00::5".parse().unwrap()),
                    Rule::Dnat("[fd00::5]:9000".parse().unwrap(), Protocol::Sctp),
                ],
            ),
            (
                "svc-v6",
                vec![
                    Rule::MasqueradeFromOutside("fd00:10:244::/60".parse().unwrap()),
                    Rule::Pick {
                        chain: "ep-v6".into(),
                        one_in: 1,
                    },
                ],
            ),
        ],
    );
    rs.service_ips
        .insert(svc("fd00::10", Protocol::Sctp, 9), "svc-v6".into());
    rs
}

/// The skeleton of one family's tables in nft's syntax (one shard), with `body` in the shard.
fn table(family: &str, l3: &str, addr: &str, body: &str) -> String {
    format!(
        r#"table {family} svcplane {{
  map no-endpoint-services {{ type {addr} . inet_proto . inet_service : verdict; }}
  map no-endpoint-nodeports {{ type inet_proto . inet_service : verdict; }}
  chain no-endpoints {{
    {l3} daddr . meta l4proto . th dport vmap @no-endpoint-services
    meta l4proto . th dport @no-endpoint-nodeports fib daddr type local meta l4proto . th dport vmap @no-endpoint-nodeports
  }}
  chain reject-chain {{ reject; }}
  chain filter-input {{ type filter hook input priority -1; policy accept; ct state new jump no-endpoints; }}
  chain filter-forward {{ type filter hook forward priority -1; policy accept; ct state new jump no-endpoints; }}
  chain filter-output {{ type filter hook output priority -1; policy accept; ct state new jump no-endpoints; }}
  chain nat-postrouting {{ type nat hook postrouting priority 100; policy accept; meta mark & 0x4000 != 0 masquerade; }}
}}
table {family} svcplane-00 {{
  map service-ips {{ type {addr} . inet_proto . inet_service : verdict; }}
  map service-nodeports {{ type inet_proto . inet_service : verdict; }}
  chain services {{
    {l3} daddr . meta l4proto . th dport vmap @service-ips
    meta l4proto . th dport @service-nodeports fib daddr type local meta l4proto . th dport vmap @service-nodeports
  }}
{body}
  chain nat-prerouting {{ type nat hook prerouting priority -100; policy accept; jump services; }}
  chain nat-output {{ type nat hook output priority -100; policy accept; jump services; }}
}}
"#
    )
}

const V4_BODY: &str = r"
  set aff-web-1 { type ipv4_addr; flags timeout; timeout 10800s; }
  chain ep-web-1 {
    ip saddr 10.0.2.2 meta mark set meta mark | 0x4000
    update @aff-web-1 { ip saddr }
    meta l4proto tcp dnat to 10.0.2.2:8080
  }
  chain ep-web-2 {
    ip saddr 10.0.3.2 meta mark set meta mark | 0x4000
    meta l4proto tcp dnat to 10.0.3.2:8080
  }
  chain svc-web {
    ip saddr != 10.244.0.0/16 meta mark set meta mark | 0x4000
    ip saddr @aff-web-1 goto ep-web-1
    numgen random mod 2 == 0 goto ep-web-1
    goto ep-web-2
  }
  chain ext-web {
    meta mark set meta mark | 0x4000
    numgen random mod 2 == 0 goto ep-web-1
    goto ep-web-2
  }
  chain ext-dns { drop; }
  chain svc-odd {
    ip saddr != 10.96.0.0/12 meta mark set meta mark | 0x4000
    drop
  }";

const V4_ELEMENTS: &str = r"
add element ip svcplane-00 service-ips { 10.96.0.10 . tcp . 80 : goto svc-web, 192.0.2.1 . tcp . 80 : goto ext-web }
add element ip svcplane no-endpoint-services { 10.96.0.11 . tcp . 80 : goto reject-chain }
add element ip svcplane-00 service-nodeports { tcp . 30080 : goto ext-web, udp . 30053 : goto ext-dns }
add element ip svcplane no-endpoint-nodeports { tcp . 30081 : goto reject-chain }
";

const V6_BODY: &str = r"
  chain ep-v6 {
    ip6 saddr fd00::5 meta mark set meta mark | 0x4000
    meta l4proto sctp dnat to [fd00::5]:9000
  }
  chain svc-v6 {
    ip6 saddr != fd00:10:244::/60 meta mark set meta mark | 0x4000
    goto ep-v6
  }";

const V6_ELEMENTS: &str = r"
add element ip6 svcplane-00 service-ips { fd00::10 . sctp . 9 : goto svc-v6 }
";

fn nft_text() -> String {
    table("ip", "ip", "ipv4_addr", V4_BODY)
        + V4_ELEMENTS
        + &table("ip6", "ip6", "ipv6_addr", V6_BODY)
        + V6_ELEMENTS
}

#[test]
fn a_table_written_over_netlink_lists_as_nft_writes_it() {
    let expected = in_netns(|| {
        nft(&["-f", "-"], Some(&nft_text()));
        listing()
    });
    let got = in_netns(|| {
        let mut txs = full(&v4(), IpFamily::IPv4);
        txs.extend(full(&v6(), IpFamily::IPv6));
        apply(&txs);
        listing()
    });
    let keys = |m: &BTreeMap<String, Value>| m.keys().cloned().collect::<BTreeSet<_>>();
    assert_eq!(keys(&got), keys(&expected));
    for (key, want) in &expected {
        assert_eq!(&got[key], want, "{key}");
    }
}

#[test]
fn a_sync_changes_only_what_changed_and_the_result_lists_as_nft_writes_it() {
    let before = v4();
    let mut after = before.clone();
    // ep-web-2 goes; svc-web and ext-web now send everything to ep-web-1.
    after.chains.remove("ep-web-2");
    let only = |chain: &str| Rule::Pick {
        chain: chain.into(),
        one_in: 1,
    };
    after.chains.insert(
        "svc-web".into(),
        vec![
            Rule::MasqueradeFromOutside("10.244.0.0/16".parse().unwrap()),
            Rule::Affinity {
                set: "aff-web-1".into(),
                chain: "ep-web-1".into(),
            },
            only("ep-web-1"),
        ],
    );
    after
        .chains
        .insert("ext-web".into(), vec![Rule::MarkMasquerade, only("ep-web-1")]);
    // The empty Service got an endpoint: out of the reject map, into the service map.
    after.no_endpoint_ips.clear();
    after
        .service_ips
        .insert(svc("10.96.0.11", Protocol::Tcp, 80), "ext-dns".into());
    let delta = transaction(Some(&before), &after, IpFamily::IPv4, Shards::new(1).unwrap());
    let ops: usize = delta.iter().map(Transaction::len).sum();
    assert!(ops < 12, "only the changes: {delta:?}");
    let body = V4_BODY
        .replace(
            "  chain ep-web-2 {\n    ip saddr 10.0.3.2 meta mark set meta mark | 0x4000\n    meta l4proto tcp dnat to 10.0.3.2:8080\n  }\n",
            "",
        )
        .replace(
            "    numgen random mod 2 == 0 goto ep-web-1\n    goto ep-web-2\n",
            "    goto ep-web-1\n",
        );
    let elements = V4_ELEMENTS.replace(
        "add element ip svcplane no-endpoint-services { 10.96.0.11 . tcp . 80 : goto reject-chain }",
        "add element ip svcplane-00 service-ips { 10.96.0.11 . tcp . 80 : goto ext-dns }",
    );
    let expected = in_netns(|| {
        nft(
            &["-f", "-"],
            Some(&(table("ip", "ip", "ipv4_addr", &body) + &elements)),
        );
        listing()
    });
    let got = in_netns(|| {
        apply(&full(&before, IpFamily::IPv4));
        apply(&delta);
        listing()
    });
    assert_eq!(got, expected);
}

#[test]
fn a_refused_op_names_its_service_port_and_nothing_of_the_batch_is_applied() {
    in_netns(|| {
        let real = "svc-ns/web/tcp/http";
        let mut rs = skeleton();
        rs.chains.insert(real.into(), vec![Rule::Drop]);
        rs.service_ips
            .insert(svc("10.96.0.10", Protocol::Tcp, 80), real.into());
        apply(&full(&rs, IpFamily::IPv4));
        let before = listing();
        // Names as svcplane makes them (slashes, colons, brackets) reach the kernel intact.
        assert!(
            before.contains_key(&format!("chain \"ip\" \"{real}\"")),
            "{before:?}"
        );

        let mut socket = NftSocket::open().unwrap();
        let mut tx = Transaction::on(IpFamily::IPv4, TableId::Shard(0));
        tx.push(Op::FlushChain(real.into()));
        tx.push(Op::AddElement {
            set: "service-ips".into(),
            key: svcplane_dataplane::nft::op::Key::Service("10.96.0.20".parse().unwrap(), Protocol::Udp, 53),
            goto: Some("ext-ns/dns/udp/53".into()),
        });
        let err = socket.apply(&[tx]).unwrap_err();
        assert_eq!(err.refused.len(), 1, "{err}");
        let refused = &err.refused[0];
        assert_eq!(refused.port.as_deref(), Some("ns/dns/udp/53"));
        assert_eq!(refused.error.raw_os_error(), Some(2), "ENOENT: {err}");
        assert!(
            err.to_string()
                .contains("add element service-ips { 10.96.0.20 . udp . 53 : goto ext-ns/dns/udp/53 } (table svcplane-00) (Service port ns/dns/udp/53)"),
            "{err}"
        );
        // The flush before it was undone with the rest of the batch.
        assert_eq!(listing(), before);
    });
}

#[test]
fn a_table_removed_by_someone_else_is_noticed() {
    in_netns(|| {
        let mut socket = NftSocket::open().unwrap();
        assert!(!socket.has_table(IpFamily::IPv4, TableId::Main).unwrap());
        apply(&full(&skeleton(), IpFamily::IPv4));
        assert!(socket.has_table(IpFamily::IPv4, TableId::Main).unwrap());
        assert!(socket.has_table(IpFamily::IPv4, TableId::Shard(0)).unwrap());
        assert!(!socket.has_table(IpFamily::IPv4, TableId::Shard(1)).unwrap());
        assert!(!socket.has_table(IpFamily::IPv6, TableId::Main).unwrap());
        nft(&["delete", "table", "ip", "svcplane-00"], None);
        assert!(!socket.has_table(IpFamily::IPv4, TableId::Shard(0)).unwrap());
        assert!(socket.has_table(IpFamily::IPv4, TableId::Main).unwrap());
    });
}

#[test]
fn cleanup_removes_the_tables_and_is_harmless_without_them() {
    in_netns(|| {
        apply(&svcplane_dataplane::nft::cleanup());
        apply(&full(&v6(), IpFamily::IPv6));
        // Shards of a larger count, as an earlier run may have left them.
        apply(&transaction(
            None,
            &skeleton(),
            IpFamily::IPv4,
            Shards::new(64).unwrap(),
        ));
        apply(&svcplane_dataplane::nft::cleanup());
        assert_eq!(listing(), BTreeMap::new());
    });
}

/// Each table `transaction(None, rs)` builds, with the transaction that builds it, as svcplane
/// expects to read it back.
fn expected(rs: &Ruleset, family: IpFamily) -> BTreeMap<TableId, (Transaction, Table)> {
    full(rs, family)
        .into_iter()
        .filter(|tx| matches!(tx.table, TableId::Main | TableId::Shard(0)))
        .map(|tx| {
            let table = Table::from_ops(&tx.ops);
            (tx.table, (tx, table))
        })
        .collect()
}

/// The shard's rebuild and table: the Services' chains, sets and elements.
fn shard(rs: &Ruleset) -> (Transaction, Table) {
    expected(rs, IpFamily::IPv4).remove(&TableId::Shard(0)).unwrap()
}

#[test]
fn a_table_read_back_is_exactly_what_was_written() {
    in_netns(|| {
        let mut txs = full(&v4(), IpFamily::IPv4);
        txs.extend(full(&v6(), IpFamily::IPv6));
        apply(&txs);
        let mut socket = NftSocket::open().unwrap();
        for family in [IpFamily::IPv4, IpFamily::IPv6] {
            let rs = if family == IpFamily::IPv4 { v4() } else { v6() };
            for (id, (tx, want)) in expected(&rs, family) {
                let (read, _) = socket.read_table(family, id).unwrap().unwrap();
                assert_eq!(read, want, "{family:?} {id}");
                // Nothing to repair.
                assert!(repair(&read, &want, &tx).is_none());
            }
        }
        // A missing table reads as none.
        nft(&["delete", "table", "ip6", "svcplane-00"], None);
        assert!(
            socket
                .read_table(IpFamily::IPv6, TableId::Shard(0))
                .unwrap()
                .is_none()
        );
        assert!(
            socket
                .read_table(IpFamily::IPv6, TableId::Main)
                .unwrap()
                .is_some()
        );
    });
}

#[test]
fn what_someone_else_changed_in_the_table_is_put_back() {
    in_netns(|| {
        let (rebuild, want) = shard(&v4());
        apply(&full(&v4(), IpFamily::IPv4));
        let intact = listing();
        let mut socket = NftSocket::open().unwrap();
        let untouched = socket.generation().unwrap();
        // A rule added and a chain flushed by hand, an element deleted, one redirected, one
        // added, a chain of someone else's in the table, an affinity set made anew with another
        // timeout (and the chains that used it emptied, as the kernel requires).
        nft(
            &["-f", "-"],
            Some(
                r"
add rule ip svcplane-00 svc-web accept
flush chain ip svcplane-00 ext-dns
delete element ip svcplane-00 service-ips { 192.0.2.1 . tcp . 80 }
delete element ip svcplane-00 service-nodeports { tcp . 30080 }
add element ip svcplane-00 service-nodeports { tcp . 30080 : goto ext-dns }
add element ip svcplane-00 service-ips { 10.96.0.99 . udp . 53 : goto ext-web }
add chain ip svcplane-00 by-hand
add rule ip svcplane-00 by-hand drop
flush chain ip svcplane-00 ep-web-1
flush chain ip svcplane-00 svc-web
delete set ip svcplane-00 aff-web-1
add set ip svcplane-00 aff-web-1 { type ipv4_addr; flags timeout; timeout 10s; }
",
            ),
        );
        assert_ne!(socket.generation().unwrap(), untouched);
        let (observed, at) = socket
            .read_table(IpFamily::IPv4, TableId::Shard(0))
            .unwrap()
            .unwrap();
        let (tx, d) = repair(&observed, &want, &rebuild).unwrap();
        assert_eq!(d.chains, ["ep-web-1", "ext-dns", "svc-web", "by-hand"]);
        assert_eq!(d.sets, ["aff-web-1"]);
        assert_eq!(d.elements, 4, "{tx:?}");
        assert!(!d.rebuild);
        socket.apply_at(&[tx], Some(at)).unwrap();
        assert_eq!(listing(), intact);
        let (after, _) = socket
            .read_table(IpFamily::IPv4, TableId::Shard(0))
            .unwrap()
            .unwrap();
        assert_eq!(after, want);
    });
}

#[test]
fn a_repair_computed_before_someone_else_committed_is_refused_whole() {
    in_netns(|| {
        let (rebuild, want) = shard(&v4());
        apply(&full(&v4(), IpFamily::IPv4));
        nft(&["flush", "chain", "ip", "svcplane-00", "ext-dns"], None);
        let mut socket = NftSocket::open().unwrap();
        let (observed, at) = socket
            .read_table(IpFamily::IPv4, TableId::Shard(0))
            .unwrap()
            .unwrap();
        let (tx, _) = repair(&observed, &want, &rebuild).unwrap();
        // Another commit after the read: the repair is stale.
        nft(&["add", "table", "ip", "elsewhere"], None);
        let err = socket.apply_at(&[tx], Some(at)).unwrap_err();
        assert!(err.batch.is_some(), "{err}");
        assert_eq!(
            socket
                .read_table(IpFamily::IPv4, TableId::Shard(0))
                .unwrap()
                .unwrap()
                .0
                .chains["ext-dns"]
                .rules,
            []
        );
    });
}
