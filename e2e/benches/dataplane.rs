//! Benchmark (not a test) of the node agent's nftables mode on this machine's kernel, in a network
//! namespace of its own: a full sync and a single-endpoint update for BENCH_DP_SIZES (1000,10000)
//! Services x 10 endpoints, with Services spread over each of BENCH_DP_SHARDS (1,16) tables, and
//! BENCH_DP_CHANGES (50) one-endpoint changes, each to another Service, reported as p50/p99. Times are split into computing (desired state, table, diff:
//! for a change, the changed Service's only, as the agent does between full syncs) and applying
//! (one netlink batch, one kernel transaction).
//!
//! After each full sync it prints the ruleset's shape as the kernel holds it (per table: chains,
//! rules, sets, map elements) and reads every table back over netlink to
//! check it is exactly what was written (exiting non-zero if not).
//!
//! Then what the ruleset costs a connection: the time of a TCP connect over loopback (SYN,
//! SYN-ACK, ACK; reset at once) to an address that is no Service's, which passes every shard's
//! nat chain and misses in each one's map, and to a Service's cluster IP, which is translated in
//! its shard; beside the same connect before any table exists. Only a connection's first packet
//! passes nat chains, so this is the whole of what shards cost traffic.
//!
//! Run with `hack/bench/dataplane.sh`.

#![allow(clippy::unwrap_used)]

use std::{
    net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener, TcpStream},
    process::Command,
    time::{Duration, Instant},
};

use svcplane_core::{IpFamily, ObjectKey, Protocol};
use svcplane_dataplane::{
    desired::{ThisNode, desired, service_state},
    input::{EndpointInfo, Policy, ServiceInfo, ServicePortInfo, SliceInfo, SlicePort},
    nft::{Op, Shards, TableId, Transaction, incremental::FamilyTable, table::Table, transaction},
};
use svcplane_kernel::nft::NftSocket;

fn services(n: usize) -> (Vec<ServiceInfo>, Vec<SliceInfo>) {
    let mut svcs = Vec::with_capacity(n);
    let mut slices = Vec::with_capacity(n);
    for i in 0..n {
        let key = ObjectKey::new("bench", format!("s{i}"));
        let vip = Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 96, 0, 0)) + i as u32 + 1);
        svcs.push(ServiceInfo {
            key: key.clone(),
            cluster_ips: vec![IpAddr::V4(vip)],
            external_ips: vec![],
            ports: vec![ServicePortInfo {
                name: "http".into(),
                protocol: Protocol::Tcp,
                port: 80,
                node_port: (i < 2000).then(|| 30000 + u16::try_from(i).unwrap()),
            }],
            affinity: None,
            internal_policy: Policy::Cluster,
            external_policy: Policy::Cluster,
            health_check_node_port: None,
        });
        let endpoints = (0..10)
            .map(|j| EndpointInfo {
                ip: IpAddr::V4(Ipv4Addr::from(
                    u32::from(Ipv4Addr::new(10, 244, 0, 0)) + (i * 10 + j) as u32,
                )),
                ready: true,
                serving: true,
                terminating: false,
                node_name: Some(format!("node-{}", j % 3)),
                zone_hints: vec![],
                node_hints: vec![],
            })
            .collect();
        slices.push(SliceInfo {
            name: ObjectKey::new("bench", format!("s{i}-abcde")),
            trigger_time: None,
            service: key,
            ports: vec![SlicePort {
                name: "http".into(),
                protocol: Protocol::Tcp,
                port: 8080,
            }],
            endpoints,
        });
    }
    (svcs, slices)
}

fn apply(socket: &mut NftSocket, txs: &[Transaction]) -> Duration {
    let started = Instant::now();
    if let Err(e) = socket.apply(txs) {
        panic!("{e}");
    }
    started.elapsed()
}

fn ms(d: Duration) -> String {
    format!("{:.1}", d.as_secs_f64() * 1000.0)
}

/// What the full sync's tables hold in the kernel, and whether each reads back as written.
fn shape(socket: &mut NftSocket, full: &[Transaction], n: usize, shards: Shards) {
    // The last transaction of each table in use is its rebuild (the others remove tables).
    let mut rebuilds: std::collections::BTreeMap<TableId, &Transaction> = Default::default();
    for tx in full.iter().filter(|t| shards.tables().any(|id| id == t.table)) {
        rebuilds.insert(tx.table, tx);
    }
    let count = |tx: &Transaction, f: fn(&Op) -> bool| tx.ops.iter().filter(|o| f(o)).count();
    let mut rows = Vec::new();
    for (id, tx) in &rebuilds {
        let expected = Table::from_ops(&tx.ops);
        let read = socket
            .read_table(IpFamily::IPv4, *id)
            .expect("reading a table back");
        let equal = read.as_ref().is_some_and(|(t, _)| *t == expected);
        if !equal {
            eprintln!("table {id} does not read back as written");
            std::process::exit(1);
        }
        rows.push((
            *id,
            count(tx, |o| matches!(o, Op::AddChain { .. })),
            count(tx, |o| matches!(o, Op::AddRule { .. })),
            count(tx, |o| matches!(o, Op::AddSet { .. })),
            count(tx, |o| matches!(o, Op::AddElement { .. })),
        ));
    }
    let main = rows.iter().find(|r| r.0 == TableId::Main);
    let shard_rows: Vec<_> = rows.iter().filter(|r| r.0 != TableId::Main).collect();
    let max =
        |f: fn(&&(TableId, usize, usize, usize, usize)) -> usize| shard_rows.iter().map(f).max().unwrap_or(0);
    let sum =
        |f: fn(&&(TableId, usize, usize, usize, usize)) -> usize| shard_rows.iter().map(f).sum::<usize>();
    println!(
        "{n:<9} {:>6} shape: main table {} chains {} rules {} elements; shards: {} chains ({} max), {} rules ({} max), {} sets, {} map elements ({} max); every table reads back as written",
        shards.count(),
        main.map_or(0, |r| r.1),
        main.map_or(0, |r| r.2),
        main.map_or(0, |r| r.4),
        sum(|r| r.1),
        max(|r| r.1),
        sum(|r| r.2),
        max(|r| r.2),
        sum(|r| r.3),
        sum(|r| r.4),
        max(|r| r.4),
    );
}

/// The `p`th percentile of `xs` (sorted in place).
fn percentile(xs: &mut [Duration], p: f64) -> Duration {
    xs.sort();
    let i = ((xs.len() as f64 - 1.0) * p).round() as usize;
    xs[i.min(xs.len() - 1)]
}

fn main() {
    let sizes: Vec<usize> = std::env::var("BENCH_DP_SIZES")
        .unwrap_or_else(|_| "1000,10000".into())
        .split(',')
        .filter_map(|s| s.trim().parse().ok())
        .collect();
    let shard_counts: Vec<u16> = std::env::var("BENCH_DP_SHARDS")
        .unwrap_or_else(|_| "1,16".into())
        .split(',')
        .filter_map(|s| s.trim().parse().ok())
        .collect();
    let changes: usize = std::env::var("BENCH_DP_CHANGES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(50);
    // A network namespace of the benchmark's own, gone when it exits.
    nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET).expect("unshare(CLONE_NEWNET) (needs root)");
    let mut socket = NftSocket::open().unwrap();
    let probe = Probe::start();
    let bare = probe.connect_us(SocketAddr::from((Ipv4Addr::LOCALHOST, Probe::PORT)));
    println!("\nconnect over loopback with no table: {bare:.1} us (the baseline of the connect rows below)");
    println!(
        "\nnftables mode, Services x 10 endpoints (one ClusterIP port each, NodePorts on the first 2000)"
    );
    println!(
        "{:<9} {:>6} {:<22} {:>11} {:>10} {:>9} {:>9}",
        "services", "shards", "sync", "compute ms", "apply ms", "commands", "rules"
    );
    for n in sizes {
        for &count in &shard_counts {
            let shards = Shards::new(count).expect("BENCH_DP_SHARDS: 1 to 64");
            run(&mut socket, &probe, n, shards, changes);
        }
    }
}

fn run(socket: &mut NftSocket, probe: &Probe, n: usize, shards: Shards, changes: usize) {
    let count = shards.count();
    let (svcs, mut slices) = services(n);
    let node = ThisNode::named("node-0");
    let started = Instant::now();
    let mut state = desired(&node, &svcs, &slices);
    let mut table = FamilyTable::new(&state, IpFamily::IPv4, shards);
    let full = transaction(None, table.ruleset(), IpFamily::IPv4, shards);
    let compute = started.elapsed();
    let commands: usize = full.iter().map(Transaction::len).sum();
    let applied = apply(socket, &full);
    println!(
        "{n:<9} {count:>6} {:<22} {:>11} {:>10} {:>9} {:>9}",
        "full",
        ms(compute),
        ms(applied),
        commands,
        table.ruleset().size()
    );
    shape(socket, &full, n, shards);

    // One endpoint of one Service moves to another address, `changes` times (a different
    // Service each time), as the agent does it: that Service's state and fragment only.
    let (mut computes, mut applies, mut totals) = (Vec::new(), Vec::new(), Vec::new());
    let mut commands = 0;
    for c in 0..changes {
        let i = (n / 2 + c * 7919) % n;
        slices[i].endpoints[3].ip = IpAddr::V4(Ipv4Addr::new(10, 250, (c / 250) as u8, (c % 250) as u8 + 1));
        let started = Instant::now();
        let key = svcs[i].key.clone();
        let refs: Vec<&SliceInfo> = vec![&slices[i]];
        state.set_service(&key, Some(service_state(&node, &svcs[i], &refs)));
        let delta = table.update(&state, [&key]);
        let compute = started.elapsed();
        commands = delta.iter().map(Transaction::len).sum();
        let applied = apply(socket, &delta);
        computes.push(compute);
        applies.push(applied);
        totals.push(compute + applied);
    }
    for (label, p) in [("p50", 0.5), ("p99", 0.99)] {
        println!(
            "{n:<9} {count:>6} {:<22} {:>11} {:>10} {:>9} {:>9}",
            format!("one endpoint {label}"),
            ms(percentile(&mut computes, p)),
            ms(percentile(&mut applies, p)),
            commands,
            table.ruleset().size()
        );
    }
    println!(
        "{n:<9} {count:>6} {:<22} {:>11}",
        "one endpoint total p50",
        ms(percentile(&mut totals, 0.5))
    );

    // One Service's endpoints become this namespace's own addresses.
    let i = n / 3;
    for e in &slices[i].endpoints {
        probe.own(e.ip);
    }
    let IpAddr::V4(vip) = svcs[i].cluster_ips[0] else {
        unreachable!("IPv4 Services")
    };
    let IpAddr::V4(endpoint) = slices[i].endpoints[0].ip else {
        unreachable!("IPv4 endpoints")
    };
    println!(
        "{n:<9} {count:>6} {:<22} {:>11.1} us",
        "connect, no Service",
        probe.connect_us(SocketAddr::from((endpoint, Probe::PORT)))
    );
    println!(
        "{n:<9} {count:>6} {:<22} {:>11.1} us",
        "connect, cluster IP",
        probe.connect_us(SocketAddr::from((vip, 80)))
    );
}

/// A listener on every address of the namespace, and a client that times connects to it.
struct Probe;

impl Probe {
    const PORT: u16 = 8080;
    /// Connects per round; the best of the rounds counts (the least disturbed by the machine).
    const CONNECTS: u32 = 2000;
    const ROUNDS: u32 = 3;

    fn start() -> Self {
        ip(&["link", "set", "lo", "up"]);
        // Cluster IPs are routed to loopback (from an address that is no endpoint's), for the
        // nat output chains to translate.
        ip(&["addr", "add", "10.0.0.1/32", "dev", "lo"]);
        ip(&["route", "add", "10.96.0.0/12", "dev", "lo", "src", "10.0.0.1"]);
        let listener = TcpListener::bind((Ipv4Addr::UNSPECIFIED, Self::PORT)).unwrap();
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                drop(conn);
            }
        });
        Probe
    }

    /// Makes `addr` one of the namespace's own (an endpoint the listener answers for).
    fn own(&self, addr: IpAddr) {
        ip(&["addr", "replace", &format!("{addr}/32"), "dev", "lo"]);
    }

    /// Microseconds per connect to `to`: best round's mean.
    fn connect_us(&self, to: SocketAddr) -> f64 {
        (0..Self::ROUNDS)
            .map(|_| {
                let started = Instant::now();
                for _ in 0..Self::CONNECTS {
                    let stream = TcpStream::connect_timeout(&to, Duration::from_secs(2))
                        .unwrap_or_else(|e| panic!("connecting to {to}: {e}"));
                    // Reset, not closed: no TIME_WAIT to run out of ports on.
                    let linger = nix::libc::linger {
                        l_onoff: 1,
                        l_linger: 0,
                    };
                    nix::sys::socket::setsockopt(&stream, nix::sys::socket::sockopt::Linger, &linger)
                        .unwrap();
                }
                started.elapsed().as_secs_f64() * 1e6 / f64::from(Self::CONNECTS)
            })
            .fold(f64::INFINITY, f64::min)
    }
}

fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().expect("running ip");
    assert!(
        out.status.success(),
        "ip {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}
