//! Benchmark (not a test): svcplane's node agent against upstream kube-proxy in nftables mode
//! (the pinned release `hack/build-kube.sh` builds), in one run, on one real control plane
//! holding BENCH_VS_SIZES (1000,10000,30000) Services x 10 endpoints. Each agent runs alone (so
//! neither takes CPU from the other) in a network namespace of its own on this kernel, at its
//! defaults, and for each size reports:
//!
//! - the full sync at start-up (its first sync, after its caches filled);
//! - BENCH_DP_CHANGES (50) one-endpoint changes one after another, each to another Service:
//!   the duration of the sync that wrote it (compute + apply), p50/p99;
//! - network programming latency during BENCH_VS_CHURN_SECS (10) seconds of 100 endpoint changes
//!   per second: from the change (the slice's `endpoints.kubernetes.io/last-change-trigger-time`,
//!   set when it is written) to the rules written, p50/p99.
//!
//! Every figure is what the agent itself logs per sync and per change (kube-proxy at `-v=4`:
//! "SyncProxyRules complete" and "Network programming"; svcplane at debug: "sync complete" and
//! "network programming"), so both are timed by the same rule. BENCH_VS_AGENTS
//! (svcplane,kube-proxy) picks the agents. Run with `hack/bench/dataplane.sh`.

#![allow(clippy::unwrap_used)]

use std::{
    path::PathBuf,
    time::{Duration, Instant},
};

use futures::{StreamExt, stream};
use k8s_openapi::api::{core::v1::Service, discovery::v1::EndpointSlice};
use kube::{
    Api, Client,
    api::{Patch, PatchParams, PostParams},
};
use serde_json::json;
use svcplane_e2e::{
    OwnedControlPlane,
    agentlog::{Agent, Tail},
    netns::Topology,
    svcplane_bin,
};

const NS: &str = "bench";
const NODE: &str = "bench-node";

fn endpoint_ip(i: usize, j: usize) -> String {
    let n = u32::from(std::net::Ipv4Addr::new(10, 128, 0, 0)) + u32::try_from(i * 10 + j).unwrap();
    std::net::Ipv4Addr::from(n).to_string()
}

/// Service `i`'s slice body: 10 endpoints, the fourth at `fourth` when given.
fn endpoints(i: usize, fourth: Option<&str>) -> serde_json::Value {
    (0..10)
        .map(|j| {
            let ip = match (j, fourth) {
                (3, Some(ip)) => ip.to_owned(),
                _ => endpoint_ip(i, j),
            };
            json!({"addresses": [ip], "nodeName": format!("node-{}", j % 3),
                   "conditions": {"ready": true, "serving": true, "terminating": false}})
        })
        .collect()
}

fn now_rfc3339() -> String {
    k8s_openapi::jiff::Timestamp::now().to_string()
}

/// Creates Services `from..to` and their slices.
async fn create(client: &Client, from: usize, to: usize) {
    let services: Api<Service> = Api::namespaced(client.clone(), NS);
    let slices: Api<EndpointSlice> = Api::namespaced(client.clone(), NS);
    stream::iter(from..to)
        .for_each_concurrent(32, |i| {
            let (services, slices) = (services.clone(), slices.clone());
            async move {
                let svc: Service = serde_json::from_value(json!({
                    "metadata": {"name": format!("s{i}")},
                    "spec": {"ports": [{"name": "http", "port": 80, "targetPort": 8080}]},
                }))
                .unwrap();
                services.create(&PostParams::default(), &svc).await.unwrap();
                let slice: EndpointSlice = serde_json::from_value(json!({
                    "metadata": {"name": format!("s{i}-x"), "labels": {
                        "kubernetes.io/service-name": format!("s{i}"),
                        "endpointslice.kubernetes.io/managed-by": "bench.svcplane.io"},
                        "annotations": {"endpoints.kubernetes.io/last-change-trigger-time": now_rfc3339()}},
                    "addressType": "IPv4",
                    "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
                    "endpoints": endpoints(i, None),
                }))
                .unwrap();
                slices.create(&PostParams::default(), &slice).await.unwrap();
            }
        })
        .await;
}

/// Moves the fourth endpoint of Service `i` to a new address `c`, stamped with the time now.
async fn change(slices: &Api<EndpointSlice>, i: usize, c: usize) {
    let ip = format!("10.250.{}.{}", (c / 250) % 250, c % 250 + 1);
    let patch = json!({
        "metadata": {"annotations": {"endpoints.kubernetes.io/last-change-trigger-time": now_rfc3339()}},
        "endpoints": endpoints(i, Some(&ip)),
    });
    slices
        .patch(&format!("s{i}-x"), &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .unwrap();
}

fn percentile(xs: &mut [Duration], p: f64) -> Duration {
    if xs.is_empty() {
        return Duration::ZERO;
    }
    xs.sort();
    let i = ((xs.len() as f64 - 1.0) * p).round() as usize;
    xs[i.min(xs.len() - 1)]
}

fn ms(d: Duration) -> String {
    format!("{:.1}", d.as_secs_f64() * 1000.0)
}

struct Figures {
    full: Option<Duration>,
    one: Vec<Duration>,
    programming: Vec<Duration>,
    churn_sent: usize,
}

/// Starts `agent` in a namespace of its own, measures, stops it.
async fn measure(
    agent: Agent,
    cp: &svcplane_e2e::ControlPlane,
    client: &Client,
    n: usize,
    changes: usize,
    churn: Duration,
    counter: &mut usize,
) -> Figures {
    let dir = cp.dir.join(format!("{}-{n}", agent.name()));
    std::fs::create_dir_all(&dir).unwrap();
    let prefix = format!("vs{:04x}", rand::random::<u16>());
    let mut topo = Topology::create(&prefix, 0, &dir).await;
    topo.bridge_apiserver(cp.apiserver_port).await;
    let log = dir.join("agent.log");
    let kubeconfig = cp.kubeconfig.to_string_lossy().into_owned();
    let pid = match agent {
        Agent::Svcplane => topo.spawn_in(
            "n",
            &svcplane_bin(),
            &[
                "dataplane",
                "--kubeconfig",
                &kubeconfig,
                "--node-name",
                NODE,
                "--mode",
                "nftables",
                "--http-bind-address",
                "127.0.0.1:10256",
            ],
            &log,
            &[("RUST_LOG", "info,svcplane=debug")],
        ),
        Agent::KubeProxy => topo.spawn_in(
            "n",
            &cp.kube_bin.join("kube-proxy"),
            &[
                "--kubeconfig",
                &kubeconfig,
                "--proxy-mode",
                "nftables",
                "--hostname-override",
                NODE,
                "--healthz-bind-address",
                "127.0.0.1:10256",
                "--metrics-bind-address",
                "127.0.0.1:10249",
                "--conntrack-max-per-core",
                "0",
                "-v",
                "4",
            ],
            &log,
            &[],
        ),
    };
    // The log exists once the process started.
    let mut tail = loop {
        if let Ok(tail) = Tail::open(&log) {
            break tail;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    let full = tail
        .until(Duration::from_secs(1200), |l| agent.sync_line(l))
        .await;
    // Let anything the start-up left (a second sync, kube-proxy's IPv6 proxier) settle.
    tokio::time::sleep(Duration::from_secs(3)).await;
    tail.skip();

    let slices: Api<EndpointSlice> = Api::namespaced(client.clone(), NS);
    let mut one = Vec::new();
    for c in 0..changes {
        let i = (n / 2 + c * 7919) % n;
        *counter += 1;
        change(&slices, i, *counter).await;
        let service = format!("{NS}/s{i}");
        // The sync that programmed it: its "network programming" line, then its end.
        let seen = tail
            .until(Duration::from_secs(20), |l| {
                agent.programming_line(l).filter(|(s, _)| *s == service)
            })
            .await;
        if seen.is_none() {
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            let last: Vec<&str> = text.lines().rev().take(8).collect();
            eprintln!(
                "{}: change {c} to {service} was not programmed within 60 s; its log ends:\n{}",
                agent.name(),
                last.into_iter().rev().collect::<Vec<_>>().join("\n")
            );
            continue;
        }
        if let Some(d) = tail.until(Duration::from_secs(60), |l| agent.sync_line(l)).await {
            one.push(d);
        }
    }

    // Churn: 100 changes a second, each to another Service, for `churn`.
    tail.skip();
    let count = (churn.as_secs_f64() * 100.0) as usize;
    let mut tick = tokio::time::interval(Duration::from_millis(10));
    let mut sent = Vec::with_capacity(count);
    let mut writes = Vec::with_capacity(count);
    for c in 0..count {
        tick.tick().await;
        let i = (c * 7919 + 13) % n;
        *counter += 1;
        let (slices, k) = (slices.clone(), *counter);
        writes.push(tokio::spawn(async move { change(&slices, i, k).await }));
        sent.push(format!("{NS}/s{i}"));
    }
    for w in writes {
        w.await.unwrap();
    }
    let wanted: std::collections::HashSet<String> = sent.iter().cloned().collect();
    let mut programming = Vec::new();
    let started = Instant::now();
    while programming.len() < wanted.len() && started.elapsed() < Duration::from_secs(120) {
        for line in tail.lines() {
            if let Some((s, d)) = agent.programming_line(&line)
                && wanted.contains(&s)
            {
                programming.push(d);
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    topo.stop(pid);
    // Kept for reading after the run (the control plane's directory goes with it).
    let kept = std::env::temp_dir().join("svcplane-bench-dataplane-vs");
    std::fs::create_dir_all(&kept).unwrap();
    std::fs::copy(&log, kept.join(format!("{}-{n}.log", agent.name()))).unwrap();
    Figures {
        full,
        one,
        programming,
        churn_sent: wanted.len(),
    }
}

async fn run() {
    let sizes: Vec<usize> = std::env::var("BENCH_VS_SIZES")
        .unwrap_or_else(|_| "1000,10000,30000".into())
        .split(',')
        .filter_map(|s| s.trim().parse().ok())
        .collect();
    let changes: usize = std::env::var("BENCH_DP_CHANGES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(50);
    let churn = Duration::from_secs(
        std::env::var("BENCH_VS_CHURN_SECS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(10),
    );
    let agents: Vec<Agent> = std::env::var("BENCH_VS_AGENTS")
        .unwrap_or_else(|_| "svcplane,kube-proxy".into())
        .split(',')
        .filter_map(|a| match a.trim() {
            "svcplane" => Some(Agent::Svcplane),
            "kube-proxy" => Some(Agent::KubeProxy),
            _ => None,
        })
        .collect();
    let owned = OwnedControlPlane::start("bench-dp-vs").unwrap();
    let cp = &owned.cp;
    let kube_proxy: PathBuf = cp.kube_bin.join("kube-proxy");
    assert!(
        kube_proxy.exists(),
        "{} is missing: hack/build-kube.sh builds it",
        kube_proxy.display()
    );
    let client = cp.client().await;
    let namespaces: Api<k8s_openapi::api::core::v1::Namespace> = Api::all(client.clone());
    namespaces
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({"metadata": {"name": NS}})).unwrap(),
        )
        .await
        .unwrap();

    println!(
        "\nsvcplane and kube-proxy {} (nftables mode), each alone in its own network namespace, at their defaults",
        std::process::Command::new(&kube_proxy)
            .arg("--version")
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
            .unwrap_or_default()
    );
    println!(
        "Services x 10 endpoints; one-endpoint: the sync that wrote it; programming: change to rules, at 100 changes/s"
    );
    println!(
        "{:<9} {:<11} {:>12} {:>13} {:>13} {:>15} {:>15}",
        "services", "agent", "full sync ms", "one p50 ms", "one p99 ms", "program p50 ms", "program p99 ms"
    );
    println!(
        "(each agent's log is kept in {})",
        std::env::temp_dir().join("svcplane-bench-dataplane-vs").display()
    );
    let mut created = 0;
    let mut counter = 0;
    for n in sizes {
        if n > created {
            let started = Instant::now();
            create(&client, created, n).await;
            eprintln!(
                "created Services {created}..{n} in {:.0} s",
                started.elapsed().as_secs_f64()
            );
            created = n;
        }
        for agent in agents.iter().copied() {
            let mut f = measure(agent, cp, &client, n, changes, churn, &mut counter).await;
            println!(
                "{n:<9} {:<11} {:>12} {:>13} {:>13} {:>15} {:>15}{}",
                agent.name(),
                f.full.map_or_else(|| "-".into(), ms),
                ms(percentile(&mut f.one, 0.5)),
                ms(percentile(&mut f.one, 0.99)),
                ms(percentile(&mut f.programming, 0.5)),
                ms(percentile(&mut f.programming, 0.99)),
                if f.programming.len() < f.churn_sent || f.one.len() < changes {
                    format!(
                        "  (seen {}/{} changes, {}/{} under churn)",
                        f.one.len(),
                        changes,
                        f.programming.len(),
                        f.churn_sent
                    )
                } else {
                    String::new()
                }
            );
        }
    }
}

fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(run());
}
