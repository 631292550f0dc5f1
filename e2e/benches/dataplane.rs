//! Benchmark (not a test) of the node agent's nftables mode on this machine's kernel, in a network
//! namespace of its own: a full sync and a single-endpoint update for BENCH_DP_SIZES (1000,10000)
//! Services x 10 endpoints. Times are split into computing (desired state, ruleset, diff) and
//! applying (one netlink batch, one kernel transaction).
//!
//! Run with `hack/bench/dataplane.sh`.

#![allow(clippy::unwrap_used)]

use std::{
    net::{IpAddr, Ipv4Addr},
    time::{Duration, Instant},
};

use svcplane_core::{IpFamily, ObjectKey, Protocol};
use svcplane_dataplane::{
    desired::desired,
    input::{EndpointInfo, Policy, ServiceInfo, ServicePortInfo, SliceInfo, SlicePort},
    nft::{Transaction, ruleset, transaction},
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

fn apply(socket: &mut NftSocket, tx: Transaction) -> Duration {
    let started = Instant::now();
    if let Err(e) = socket.apply(&[tx]) {
        panic!("{e}");
    }
    started.elapsed()
}

fn ms(d: Duration) -> String {
    format!("{:.1}", d.as_secs_f64() * 1000.0)
}

fn main() {
    let sizes: Vec<usize> = std::env::var("BENCH_DP_SIZES")
        .unwrap_or_else(|_| "1000,10000".into())
        .split(',')
        .filter_map(|s| s.trim().parse().ok())
        .collect();
    // A network namespace of the benchmark's own, gone when it exits.
    nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET).expect("unshare(CLONE_NEWNET) (needs root)");
    let mut socket = NftSocket::open().unwrap();
    println!(
        "\nnftables mode, Services x 10 endpoints (one ClusterIP port each, NodePorts on the first 2000)"
    );
    println!(
        "{:<9} {:<15} {:>11} {:>10} {:>9} {:>9}",
        "services", "sync", "compute ms", "apply ms", "commands", "rules"
    );
    for n in sizes {
        let (svcs, mut slices) = services(n);
        let started = Instant::now();
        let state = desired("node-0", &svcs, &slices);
        let rs = ruleset(&state, IpFamily::IPv4);
        let full = transaction(None, &rs, IpFamily::IPv4).unwrap();
        let compute = started.elapsed();
        let commands = full.len();
        let applied = apply(&mut socket, full);
        println!(
            "{n:<9} {:<15} {:>11} {:>10} {:>9} {:>9}",
            "full",
            ms(compute),
            ms(applied),
            commands,
            rs.size()
        );

        // One endpoint of one Service moves to another address.
        slices[n / 2].endpoints[3].ip = "10.250.0.1".parse().unwrap();
        let started = Instant::now();
        let state = desired("node-0", &svcs, &slices);
        let next = ruleset(&state, IpFamily::IPv4);
        let delta = transaction(Some(&rs), &next, IpFamily::IPv4).unwrap();
        let compute = started.elapsed();
        let commands = delta.len();
        let applied = apply(&mut socket, delta);
        println!(
            "{n:<9} {:<15} {:>11} {:>10} {:>9} {:>9}",
            "one endpoint",
            ms(compute),
            ms(applied),
            commands,
            next.size()
        );
    }
}
