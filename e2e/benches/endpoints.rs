//! Benchmark (not a test): the endpoint controllers of svcplane and of upstream's
//! kube-controller-manager (same release as the apiserver), side by side, on identical fresh
//! control planes. Prints time to converge, API writes and the controller's peak RSS.
//!
//! Scenarios (sizes from the environment):
//! - `many`: BENCH_SERVICES (2000) Services x BENCH_PODS (10) Pods;
//! - `big`: one Service x BENCH_BIG (10000) Pods;
//! - `rolling`: one Service x BENCH_ROLL (1000) Pods replaced 10% at a time while the controller runs.
//!
//! BENCH_CONTROLLERS (`svcplane`, `kube-controller-manager`, `kube-controller-manager (qps 1000)`)
//! and BENCH_SCENARIOS (`many`, `big`, `rolling`), comma-separated, run a subset.
//!
//! Run with `hack/bench/endpoints.sh` (builds svcplane in release mode first).

#![allow(clippy::unwrap_used)]

use std::{
    collections::HashMap,
    time::{Duration, Instant},
};

use k8s_openapi::{
    api::{core::v1::Endpoints, discovery::v1::EndpointSlice},
    apimachinery::pkg::util::intstr::IntOrString,
};
use kube::{
    Api, Client,
    api::{DeleteParams, ListParams},
};
use svcplane_e2e::{
    ControlPlane, OwnedControlPlane,
    objects::{WriteCounter, create_node, create_pods, create_service, force_delete_pods, service},
    pods::PodFixture,
    process::Svcplane,
    test_namespace,
    upstream::UpstreamControllers,
};

const NS_PREFIX: &str = "bench";

fn env(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Controller {
    Svcplane,
    Upstream,
    /// Upstream without its client-side rate limit (--kube-api-qps/burst raised).
    UpstreamUnthrottled,
}

impl Controller {
    fn name(self) -> &'static str {
        match self {
            Self::Svcplane => "svcplane",
            Self::Upstream => "kube-controller-manager",
            Self::UpstreamUnthrottled => "kube-controller-manager (qps 1000)",
        }
    }
}

enum Running {
    Svcplane(Svcplane),
    Upstream(UpstreamControllers),
}

impl Running {
    fn start(c: Controller, cp: &ControlPlane) -> Self {
        let logs = cp.dir.clone();
        match c {
            Controller::Svcplane => Running::Svcplane(Svcplane::controller_manager(
                "bench-svcplane",
                &cp.kubeconfig,
                &logs,
                &[],
            )),
            Controller::Upstream => Running::Upstream(UpstreamControllers::start(cp, &logs.join("kcm.log"))),
            Controller::UpstreamUnthrottled => Running::Upstream(UpstreamControllers::start_with(
                cp,
                &logs.join("kcm-fast.log"),
                &["--kube-api-qps=1000", "--kube-api-burst=1000"],
            )),
        }
    }

    fn pid(&self) -> u32 {
        match self {
            Running::Svcplane(s) => s.pid(),
            Running::Upstream(u) => u.pid(),
        }
    }

    /// Peak resident set size so far, in MiB.
    fn peak_rss_mib(&self) -> f64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).unwrap_or_default();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
            .map_or(f64::NAN, |kb| kb / 1024.0)
    }
}

struct Cluster {
    owned: OwnedControlPlane,
    client: Client,
    ns: String,
    /// Service name -> expected ready endpoints.
    expected: HashMap<String, usize>,
    node_count: usize,
}

impl Cluster {
    async fn new(name: &str) -> Self {
        let owned = OwnedControlPlane::start(name).unwrap();
        let client = owned.cp.client().await;
        let ns = test_namespace(&client, NS_PREFIX).await;
        for n in 0..3 {
            create_node(&client, &format!("node-{n}"), Some(&format!("zone-{n}"))).await;
        }
        Self {
            owned,
            client,
            ns,
            expected: HashMap::new(),
            node_count: 3,
        }
    }

    fn pod(&self, svc: &str, i: usize, serial: usize) -> PodFixture {
        PodFixture::new(
            &format!("{svc}-{i}"),
            &format!(
                "10.{}.{}.{}",
                64 + serial / 62500,
                (serial / 250) % 250,
                serial % 250 + 1
            ),
        )
        .label("app", svc)
        .on_node(&format!("node-{}", i % self.node_count))
    }

    async fn populate(&mut self, services: usize, pods_per_service: usize) {
        let start = Instant::now();
        let names: Vec<String> = (0..services)
            .map(|i| {
                if services == 1 {
                    "big".to_owned()
                } else {
                    format!("svc-{i}")
                }
            })
            .collect();
        for chunk in names.chunks(64) {
            let svcs: Vec<_> = chunk
                .iter()
                .map(|n| service(n, n, IntOrString::Int(8080)))
                .collect();
            futures::future::join_all(svcs.iter().map(|s| create_service(&self.client, &self.ns, s))).await;
        }
        let mut serial = 0;
        let mut fixtures = Vec::with_capacity(services * pods_per_service);
        for n in &names {
            for i in 0..pods_per_service {
                fixtures.push(self.pod(n, i, serial));
                serial += 1;
            }
            self.expected.insert(n.clone(), pods_per_service);
        }
        create_pods(&self.client, &self.ns, &fixtures).await;
        eprintln!(
            "  populated {services} Services x {pods_per_service} Pods in {:.1}s",
            start.elapsed().as_secs_f64()
        );
    }

    /// Removes every slice and Endpoints object, so each controller starts from the same state.
    async fn reset(&self) {
        let dp = DeleteParams::default();
        let lp = ListParams::default();
        Api::<EndpointSlice>::namespaced(self.client.clone(), &self.ns)
            .delete_collection(&dp, &lp)
            .await
            .unwrap();
        Api::<Endpoints>::namespaced(self.client.clone(), &self.ns)
            .delete_collection(&dp, &lp)
            .await
            .unwrap();
    }

    /// Whether every Service has exactly its Pods in its slices and (up to 1000) in its Endpoints.
    async fn converged(&self) -> bool {
        let slices = Api::<EndpointSlice>::namespaced(self.client.clone(), &self.ns)
            .list(&ListParams::default())
            .await
            .unwrap();
        let mut in_slices: HashMap<String, usize> = HashMap::new();
        for s in &slices.items {
            if let Some(svc) = s
                .metadata
                .labels
                .as_ref()
                .and_then(|l| l.get("kubernetes.io/service-name"))
            {
                *in_slices.entry(svc.clone()).or_default() += s.endpoints.as_ref().map_or(0, Vec::len);
            }
        }
        let endpoints = Api::<Endpoints>::namespaced(self.client.clone(), &self.ns)
            .list(&ListParams::default())
            .await
            .unwrap();
        let in_endpoints: HashMap<String, usize> = endpoints
            .items
            .iter()
            .map(|e| {
                let n = e
                    .subsets
                    .iter()
                    .flatten()
                    .map(|s| s.addresses.as_ref().map_or(0, Vec::len))
                    .sum();
                (e.metadata.name.clone().unwrap_or_default(), n)
            })
            .collect();
        self.expected.iter().all(|(svc, &n)| {
            in_slices.get(svc).copied().unwrap_or(0) == n
                && in_endpoints.get(svc).copied() == Some(n.min(1000))
        })
    }

    async fn wait_converged(&self, limit: Duration) -> Option<Duration> {
        let start = Instant::now();
        while start.elapsed() < limit {
            if self.converged().await {
                return Some(start.elapsed());
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        None
    }
}

struct Row {
    scenario: &'static str,
    controller: Controller,
    seconds: Option<f64>,
    slice_writes: usize,
    endpoints_writes: usize,
    rss_mib: f64,
}

async fn converge_from_scratch(cluster: &Cluster, scenario: &'static str, c: Controller) -> Row {
    cluster.reset().await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let slices = WriteCounter::start(&cluster.client, &cluster.ns).await;
    let endpoints = WriteCounter::start_for::<Endpoints>(&cluster.client, &cluster.ns).await;
    let start = Instant::now();
    let running = Running::start(c, &cluster.owned.cp);
    let took = cluster
        .wait_converged(Duration::from_secs(900))
        .await
        .map(|_| start.elapsed().as_secs_f64());
    // Writes that land after convergence (e.g. a trailing rewrite) count too.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let row = Row {
        scenario,
        controller: c,
        seconds: took,
        slice_writes: slices.count(),
        endpoints_writes: endpoints.count(),
        rss_mib: running.peak_rss_mib(),
    };
    drop(running);
    row
}

async fn rolling_update(cluster: &mut Cluster, c: Controller, round: usize) -> Row {
    let svc = "roll";
    let n = *cluster.expected.get(svc).unwrap();
    let running = Running::start(c, &cluster.owned.cp);
    cluster.wait_converged(Duration::from_secs(600)).await;
    let slices = WriteCounter::start(&cluster.client, &cluster.ns).await;
    let endpoints = WriteCounter::start_for::<Endpoints>(&cluster.client, &cluster.ns).await;
    let start = Instant::now();
    let batch = (n / 10).max(1);
    let serial_base = 1_000_000 + round * 100_000;
    for b in 0..n.div_ceil(batch) {
        let new: Vec<PodFixture> = (0..batch)
            .map(|i| {
                let idx = (round + 1) * 100_000 + b * batch + i;
                PodFixture::new(
                    &format!("{svc}-{idx}"),
                    &format!(
                        "10.{}.{}.{}",
                        100 + (serial_base / 62500) % 100,
                        (idx / 250) % 250,
                        idx % 250 + 1
                    ),
                )
                .label("app", svc)
                .on_node(&format!("node-{}", idx % cluster.node_count))
            })
            .collect();
        create_pods(&cluster.client, &cluster.ns, &new).await;
        let old: Vec<String> = (0..batch)
            .map(|i| format!("{svc}-{}", round * 100_000 + b * batch + i))
            .collect();
        force_delete_pods(&cluster.client, &cluster.ns, &old).await;
    }
    let took = cluster
        .wait_converged(Duration::from_secs(600))
        .await
        .map(|_| start.elapsed().as_secs_f64());
    tokio::time::sleep(Duration::from_secs(3)).await;
    Row {
        scenario: "rolling",
        controller: c,
        seconds: took,
        slice_writes: slices.count(),
        endpoints_writes: endpoints.count(),
        rss_mib: running.peak_rss_mib(),
    }
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    // BENCH_CONTROLLERS / BENCH_SCENARIOS (comma-separated names) pick a subset, e.g. to compare
    // two svcplane builds (SVCPLANE_BIN) on one scenario.
    let picked = |var: &str, name: &str| {
        std::env::var(var)
            .map(|v| v.split(',').any(|p| p.trim() == name))
            .unwrap_or(true)
    };
    let controllers: Vec<Controller> = [
        Controller::Svcplane,
        Controller::Upstream,
        Controller::UpstreamUnthrottled,
    ]
    .into_iter()
    .filter(|c| picked("BENCH_CONTROLLERS", c.name()))
    .collect();
    let mut rows = Vec::new();

    if picked("BENCH_SCENARIOS", "many") {
        let (services, pods) = (env("BENCH_SERVICES", 2000), env("BENCH_PODS", 10));
        eprintln!("scenario many: {services} Services x {pods} Pods");
        let mut many = Cluster::new("bench-many").await;
        many.populate(services, pods).await;
        for &c in &controllers {
            rows.push(converge_from_scratch(&many, "many", c).await);
        }
    }

    if picked("BENCH_SCENARIOS", "big") {
        let big = env("BENCH_BIG", 10_000);
        eprintln!("scenario big: 1 Service x {big} Pods");
        let mut cluster = Cluster::new("bench-big").await;
        cluster.populate(1, big).await;
        for &c in &controllers {
            rows.push(converge_from_scratch(&cluster, "big", c).await);
        }
    }

    let roll = env("BENCH_ROLL", 1000);
    if picked("BENCH_SCENARIOS", "rolling") {
        eprintln!("scenario rolling: 1 Service x {roll} Pods, replaced in 10 batches");
    }
    for (round, c) in controllers
        .iter()
        .copied()
        .enumerate()
        .filter(|_| picked("BENCH_SCENARIOS", "rolling"))
    {
        let mut cluster = Cluster::new(&format!("bench-roll-{round}")).await;
        let fixtures: Vec<PodFixture> = (0..roll)
            .map(|i| {
                let idx = round * 100_000 + i;
                PodFixture::new(
                    &format!("roll-{idx}"),
                    &format!("10.90.{}.{}", (idx / 250) % 250, idx % 250 + 1),
                )
                .label("app", "roll")
                .on_node(&format!("node-{}", i % 3))
            })
            .collect();
        create_service(
            &cluster.client,
            &cluster.ns,
            &service("roll", "roll", IntOrString::Int(8080)),
        )
        .await;
        create_pods(&cluster.client, &cluster.ns, &fixtures).await;
        cluster.expected.insert("roll".into(), roll);
        rows.push(rolling_update(&mut cluster, c, round).await);
    }

    println!();
    println!(
        "{:<9} {:<36} {:>12} {:>13} {:>16} {:>13}",
        "scenario", "controller", "converge (s)", "slice writes", "Endpoints writes", "peak RSS MiB"
    );
    for r in &rows {
        let secs = r
            .seconds
            .map_or_else(|| "timeout".to_owned(), |s| format!("{s:.1}"));
        println!(
            "{:<9} {:<36} {:>12} {:>13} {:>16} {:>13.1}",
            r.scenario,
            r.controller.name(),
            secs,
            r.slice_writes,
            r.endpoints_writes,
            r.rss_mib
        );
    }
}
