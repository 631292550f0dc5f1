//! Benchmark (not a test) of ClusterIP allocation, on a fresh local control plane:
//!
//! - allocations per second through etcd: `RangeStore`s (one per replica, each with its own etcd
//!   connection and group commit) allocating BENCH_ALLOCS (10000) IPs, 64 at a time, from one
//!   /16 — one replica, then two contending for the same key;
//! - Service creates per second and their latency (BENCH_SERVICES (1000), 32 at a time) with the
//!   apiserver's own allocator only, then through svcplane's webhook with one replica and with two
//!   behind one address; the webhook's own answer time (p50/p99) from its histogram.
//!
//! Run with `hack/bench/allocation.sh` (builds svcplane in release mode first).

#![allow(clippy::unwrap_used)]

use std::{
    collections::HashSet,
    net::{IpAddr, SocketAddr},
    time::{Duration, Instant},
};

use futures::StreamExt;
use k8s_openapi::api::core::v1::Service;
use kube::{Api, Client, api::PostParams};
use svcplane_allocators::{
    Allocation, IpRange,
    etcd::{Done, EpochKey, Op, RangeStore},
};
use svcplane_e2e::{
    OwnedControlPlane,
    balancer::Balancer,
    eventually, free_port,
    http::{histogram_buckets, histogram_quantile},
    objects::numbered_service,
    process::Svcplane,
    test_namespace, webhook,
};

const HISTOGRAM: &str = "svcplane_allocation_webhook_duration_seconds";

fn env(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn percentile(sorted: &[Duration], q: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let i = ((sorted.len() as f64 - 1.0) * q).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// Allocations per second from `replicas` stores sharing one range key.
async fn etcd_allocations(etcd_url: &str, replicas: usize, total: usize) -> (f64, Duration, Duration) {
    let range: IpRange = "10.100.0.0/16".parse().unwrap();
    let prefix = format!("/bench-{replicas}");
    let mut stores = Vec::new();
    for _ in 0..replicas {
        let client = etcd_client::Client::connect([etcd_url], None).await.unwrap();
        stores.push(RangeStore::new(client, &prefix, "clusterip", range.clone(), "IP"));
    }
    let etcd = etcd_client::Client::connect([etcd_url], None).await.unwrap();
    let term = EpochKey::new(etcd, &prefix)
        .begin("bench", std::sync::Arc::new(|| true))
        .await
        .unwrap();
    stores[0]
        .replace(&Allocation::new(range), 0, &term)
        .await
        .unwrap()
        .unwrap();
    let started = Instant::now();
    let results: Vec<(IpAddr, Duration)> = futures::stream::iter(0..total)
        .map(|i| {
            let store = stores[i % replicas].clone();
            async move {
                let t = Instant::now();
                match store.submit(Op::AllocateNext).await.unwrap() {
                    Done::Allocated(ip) => (ip, t.elapsed()),
                    other => panic!("{other:?}"),
                }
            }
        })
        .buffer_unordered(64)
        .collect()
        .await;
    let elapsed = started.elapsed();
    let distinct: HashSet<IpAddr> = results.iter().map(|(ip, _)| *ip).collect();
    assert_eq!(distinct.len(), total, "an IP was handed out twice");
    let (stored, _) = stores[0].read().await.unwrap().unwrap();
    assert_eq!(
        stored.used() as usize,
        total,
        "etcd does not hold every allocation"
    );
    let mut lat: Vec<Duration> = results.iter().map(|(_, d)| *d).collect();
    lat.sort();
    (
        total as f64 / elapsed.as_secs_f64(),
        percentile(&lat, 0.5),
        percentile(&lat, 0.99),
    )
}

fn service(i: usize) -> Service {
    numbered_service(i, false, false)
}

/// Creates `total` Services in a new namespace, 32 at a time: creates/s, p50, p99.
async fn creates(client: &Client, total: usize) -> (f64, Duration, Duration) {
    let ns = test_namespace(client, "bench").await;
    let api: Api<Service> = Api::namespaced(client.clone(), &ns);
    let started = Instant::now();
    let mut lat: Vec<Duration> = futures::stream::iter(0..total)
        .map(|i| {
            let api = api.clone();
            async move {
                let t = Instant::now();
                api.create(&PostParams::default(), &service(i)).await.unwrap();
                t.elapsed()
            }
        })
        .buffer_unordered(32)
        .collect()
        .await;
    let elapsed = started.elapsed();
    lat.sort();
    (
        total as f64 / elapsed.as_secs_f64(),
        percentile(&lat, 0.5),
        percentile(&lat, 0.99),
    )
}

/// The webhook histograms of `replicas`, summed bucket by bucket.
async fn webhook_buckets(replicas: &[&Svcplane]) -> Vec<(f64, f64)> {
    let mut sum: Vec<(f64, f64)> = Vec::new();
    for r in replicas {
        let b = histogram_buckets(&r.metrics().await.unwrap_or_default(), HISTOGRAM);
        if sum.is_empty() {
            sum = b;
        } else {
            for (s, (_, c)) in sum.iter_mut().zip(b) {
                s.1 += c;
            }
        }
    }
    sum
}

fn delta(after: &[(f64, f64)], before: &[(f64, f64)]) -> Vec<(f64, f64)> {
    after
        .iter()
        .enumerate()
        .map(|(i, (le, c))| (*le, c - before.get(i).map_or(0.0, |b| b.1)))
        .collect()
}

fn replica(cp: &svcplane_e2e::ControlPlane, name: &str, port: u16) -> Svcplane {
    let args = [
        "--controllers=".to_owned(),
        "--service-cluster-ip-range=10.96.0.0/16,fd00:10:96::/112".to_owned(),
        format!("--etcd-servers=http://127.0.0.1:{}", cp.etcd_port),
        format!("--webhook-bind-address=127.0.0.1:{port}"),
        "--webhook-cert-names=127.0.0.1".to_owned(),
        "--webhook-max-connection-age=200ms".to_owned(),
    ];
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    Svcplane::controller_manager(name, &cp.kubeconfig, &cp.dir, &args)
}

async fn run() {
    let parts = std::env::var("BENCH_PARTS").unwrap_or_else(|_| "etcd,creates".into());
    let allocs = env("BENCH_ALLOCS", 10_000);
    let services = env("BENCH_SERVICES", 1000);
    let owned = OwnedControlPlane::start("bench-alloc").unwrap();
    let cp = &owned.cp;
    let etcd_url = format!("http://127.0.0.1:{}", cp.etcd_port);

    if parts.contains("etcd") {
        println!("\nallocation through etcd: {allocs} IPs from one /16, 64 in flight");
        println!(
            "{:<10} {:>10} {:>9} {:>9}",
            "replicas", "allocs/s", "p50 ms", "p99 ms"
        );
        for replicas in [1, 2] {
            let (rate, p50, p99) = etcd_allocations(&etcd_url, replicas, allocs).await;
            println!("{replicas:<10} {rate:>10.0} {:>9.2} {:>9.2}", ms(p50), ms(p99));
        }
    }
    if !parts.contains("creates") {
        return;
    }

    let client = cp.client().await;
    let mut rows = vec![("apiserver allocator only", creates(&client, services).await, None)];

    let ports = [free_port(), free_port()];
    let addr = |p: u16| SocketAddr::from(([127, 0, 0, 1], p));
    let one = Balancer::start(vec![addr(ports[0])]).await;
    let two = Balancer::start(vec![addr(ports[0]), addr(ports[1])]).await;
    webhook::register(&client, "svcplane", one.port, None).await;
    let a = replica(cp, "bench-a", ports[0]);
    let b = replica(cp, "bench-b", ports[1]);
    for r in [&a, &b] {
        eventually(Duration::from_secs(60), "the replicas to be ready", || async {
            (r.readyz().await?.0 == 200).then_some(())
        })
        .await;
    }
    let stages: [(&str, u16); 2] = [
        ("svcplane webhook, 1 replica", one.port),
        ("svcplane webhook, 2 replicas", two.port),
    ];
    for (name, port) in stages {
        let patch = serde_json::json!([{
            "op": "replace",
            "path": "/webhooks/0/clientConfig/url",
            "value": format!("https://127.0.0.1:{port}/mutate-services"),
        }]);
        Api::<k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration>::all(client.clone())
            .patch(
                "svcplane",
                &kube::api::PatchParams::default(),
                &kube::api::Patch::Json::<()>(serde_json::from_value(patch).unwrap()),
            )
            .await
            .unwrap();
        // The apiserver picks webhook changes up from a watch; let it settle, then warm up.
        tokio::time::sleep(Duration::from_secs(2)).await;
        creates(&client, 20).await;
        let before = webhook_buckets(&[&a, &b]).await;
        let result = creates(&client, services).await;
        let served = delta(&webhook_buckets(&[&a, &b]).await, &before);
        let quantiles = (
            histogram_quantile(&served, 0.5).unwrap_or(0.0),
            histogram_quantile(&served, 0.99).unwrap_or(0.0),
        );
        rows.push((name, result, Some(quantiles)));
    }

    println!("\nService creates: {services} per row, 32 in flight");
    println!(
        "{:<30} {:>10} {:>9} {:>9} {:>14} {:>14}",
        "path", "creates/s", "p50 ms", "p99 ms", "webhook p50 ms", "webhook p99 ms"
    );
    for (name, (rate, p50, p99), hook) in rows {
        let (h50, h99) = hook.map_or(("-".to_owned(), "-".to_owned()), |(a, b)| {
            (format!("{:.2}", a * 1000.0), format!("{:.2}", b * 1000.0))
        });
        println!(
            "{name:<30} {rate:>10.0} {:>9.2} {:>9.2} {h50:>14} {h99:>14}",
            ms(p50),
            ms(p99)
        );
    }
    println!(
        "\n(webhook percentiles interpolate within histogram buckets 25% wide; create percentiles are exact)"
    );
}

fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(run());
}
