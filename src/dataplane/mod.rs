//! `svcplane dataplane`: the node agent. Watches Services and EndpointSlices, computes the node's
//! desired state (pure, `svcplane_dataplane`), and writes only the difference to the
//! kernel. `svcplane cleanup` removes what it wrote.

mod backend;
mod cache;
mod healthcheck;
mod ipvs;
mod metrics;

pub mod sysctls;

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant, SystemTime},
};

use anyhow::{Context, bail};
use k8s_openapi::{
    api::{
        core::v1::{Node, Service},
        discovery::v1::EndpointSlice,
    },
    jiff::Timestamp,
};
use kube::{Api, runtime::watcher};
use prometheus::Registry;
use svcplane_controllers::runtime::{informer::Informer, store::Store};
use svcplane_core::ObjectKey;
use svcplane_dataplane::{
    desired::{DesiredState, ThisNode, desired, service_state},
    input::{Problem, ServiceInfo, SliceInfo},
    ipvs::plan::SCHEDULERS,
    nft::{
        Shards,
        layout::{DEFAULT_SHARDS, MAX_SHARDS},
    },
};
use tokio::{signal::unix::SignalKind, sync::Notify};
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug, error, info, info_span, warn};

use crate::{
    dataplane::cache::{Cached, cache_node, cache_service, cache_slice},
    health::{Check, Checks},
    http::Server,
    kubeclient,
};
use backend::Backend;
use healthcheck::HealthCheckServers;
use ipvs::probe::{self as ipvs_probe, Ipvs};
use metrics::DataplaneMetrics;

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// IPVS when the kernel has it, nftables otherwise.
    Auto,
    Ipvs,
    Nftables,
}

#[derive(clap::Args, Debug)]
pub struct Args {
    #[arg(long, env = "KUBECONFIG")]
    pub kubeconfig: Option<PathBuf>,
    /// This node's name, as in `endpoints[].nodeName` (traffic policy Local).
    #[arg(long, env = "NODE_NAME")]
    pub node_name: String,
    #[arg(long, value_enum, default_value = "auto", env = "SVCPLANE_DATAPLANE_MODE")]
    pub mode: Mode,
    /// Full recomputation at least this often, even without changes.
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    pub sync_period: Duration,
    /// Changes are applied at most this often (a burst of changes is one sync).
    #[arg(long, default_value = "100ms", value_parser = humantime::parse_duration)]
    pub min_sync_period: Duration,
    /// Address serving /metrics and /healthz over plain HTTP (kube-proxy's health port).
    #[arg(long, default_value = "0.0.0.0:10256", env = "SVCPLANE_HEALTHZ_BIND_ADDRESS")]
    pub http_bind_address: SocketAddr,
    /// IPVS scheduler for every virtual server (rr, wrr, lc, wlc, lblc, lblcr, dh, sh, sed, nq,
    /// fo, ovf, mh, twos). An unknown name is reported and rr used instead.
    #[arg(long, default_value = "rr")]
    pub scheduler: String,
    /// This node's addresses, where IPVS mode opens NodePorts (nftables mode answers on every
    /// local address by itself).
    #[arg(long, value_delimiter = ',')]
    pub node_ip: Vec<IpAddr>,
    /// nftables mode: how many tables Services are spread over (1-64). The kernel checks a
    /// whole table when a change adds a rule to it, so a change costs what its table holds;
    /// more shards make that less, at one map lookup per shard for a connection's first packet
    /// to an address that is not a Service's. A change of the count rebuilds the tables.
    #[arg(long, default_value_t = DEFAULT_SHARDS,
          value_parser = clap::value_parser!(u16).range(1..=i64::from(MAX_SHARDS)))]
    pub nft_shards: u16,
    /// The cluster's Pod ranges, at most one per family (kube-proxy's `--cluster-cidr`):
    /// traffic to a cluster IP from outside them is masqueraded, so that its replies come back
    /// through this node; Pods keep their own address. Unset: only the node's own hairpin and
    /// `externalTrafficPolicy: Cluster` traffic is masqueraded.
    #[arg(long, value_delimiter = ',', value_parser = pod_range)]
    pub cluster_cidr: Vec<ipnet::IpNet>,
    /// Read Services, EndpointSlices and this node's Node from these JSON Lists instead of the
    /// apiserver (offline programming, tests and benchmarks), one sync per file in order, then
    /// exit. The first sync is a full one; each next one recomputes and writes only the
    /// Services whose objects differ from the file before, as the watch would have reported
    /// them. Prints one JSON line per sync.
    #[arg(long, value_delimiter = ',')]
    pub objects: Vec<PathBuf>,
}

fn pod_range(s: &str) -> Result<ipnet::IpNet, String> {
    let net: ipnet::IpNet = s
        .parse()
        .map_err(|e| format!("{s:?} is not a CIDR (e.g. 10.244.0.0/16): {e}"))?;
    if net.prefix_len() == 0 {
        return Err(format!("{s} holds every address: nothing would be outside it"));
    }
    Ok(net.trunc())
}

impl Args {
    /// This node as the sync sees it, in `zone`.
    fn this_node(&self, zone: Option<String>) -> ThisNode {
        ThisNode {
            zone,
            cluster_cidrs: self.cluster_cidr.clone(),
            ..ThisNode::named(self.node_name.clone())
        }
    }

    fn check(&self) -> anyhow::Result<()> {
        let v4 = self
            .cluster_cidr
            .iter()
            .filter(|c| matches!(c, ipnet::IpNet::V4(_)))
            .count();
        if v4 > 1 || self.cluster_cidr.len() - v4 > 1 {
            bail!(
                "--cluster-cidr: at most one range per IP family, got {:?}",
                self.cluster_cidr
            );
        }
        Ok(())
    }
}

/// Which backend programs the kernel.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Choice {
    Nftables,
    Ipvs { scheduler: String },
}

#[derive(clap::Args, Debug)]
pub struct CleanupArgs {}

/// `/healthz`: the last sync succeeded, or one did within two sync periods.
struct SyncHealth {
    last_ok: Arc<Mutex<Option<Instant>>>,
    last_failed: Arc<Mutex<bool>>,
    tolerance: Duration,
}

impl Check for SyncHealth {
    fn name(&self) -> &'static str {
        "sync"
    }

    fn check(&self) -> Result<(), String> {
        let failed = *self
            .last_failed
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let last_ok = *self
            .last_ok
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        match last_ok {
            None => Err("no successful sync yet".into()),
            Some(t) if failed && t.elapsed() > self.tolerance => {
                Err(format!("syncs have failed for {:.0}s", t.elapsed().as_secs_f64()))
            }
            Some(_) => Ok(()),
        }
    }
}

/// Picks the mode: IPVS where asked for (or, in auto, where the kernel has it), else nftables.
fn choose(args: &Args, metrics: &DataplaneMetrics) -> anyhow::Result<Choice> {
    let scheduler = || {
        if SCHEDULERS.contains(&args.scheduler.as_str()) {
            args.scheduler.clone()
        } else {
            metrics.invalid_config.inc();
            warn!(scheduler = %args.scheduler, known = ?SCHEDULERS, "unknown IPVS scheduler; using rr");
            "rr".to_owned()
        }
    };
    Ok(match (args.mode, ipvs_probe::probe()) {
        (Mode::Nftables, _) => {
            info!("nftables mode (forced)");
            Choice::Nftables
        }
        (Mode::Auto, Ipvs::Absent(why)) => {
            info!(reason = %why, "nftables mode: no IPVS on this node");
            Choice::Nftables
        }
        (Mode::Ipvs, Ipvs::Absent(why)) => bail!("--mode=ipvs: {why}"),
        (Mode::Auto | Mode::Ipvs, Ipvs::Available { family_id }) => {
            info!(family_id, "IPVS mode");
            Choice::Ipvs {
                scheduler: scheduler(),
            }
        }
    })
}

pub async fn run(args: Args) -> anyhow::Result<()> {
    let registry = Registry::new();
    let metrics = DataplaneMetrics::register(&registry).context("registering metrics")?;
    args.check()?;
    match choose(&args, &metrics)? {
        Choice::Nftables => {
            let shards = Shards::new(args.nft_shards).context("--nft-shards")?;
            serve(&args, backend::Nftables::new(shards), registry, metrics).await
        }
        Choice::Ipvs { scheduler } => {
            let ipvs = backend::Ipvs::new(scheduler, args.node_ip.clone());
            serve(&args, ipvs, registry, metrics).await
        }
    }
}

async fn serve<B: Backend>(
    args: &Args,
    mut backend: B,
    registry: Registry,
    metrics: DataplaneMetrics,
) -> anyhow::Result<()> {
    if !args.objects.is_empty() {
        return replay(args, &mut backend, &args.objects, &metrics).await;
    }
    let shutdown = CancellationToken::new();
    {
        let shutdown = shutdown.clone();
        let mut term = tokio::signal::unix::signal(SignalKind::terminate()).context("SIGTERM handler")?;
        let mut int = tokio::signal::unix::signal(SignalKind::interrupt()).context("SIGINT handler")?;
        tokio::spawn(async move {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
            shutdown.cancel();
        });
    }
    let client = kubeclient::client(args.kubeconfig.as_deref()).await?;
    let last_ok = Arc::new(Mutex::new(None));
    let last_failed = Arc::new(Mutex::new(false));
    let health = Checks::default().with(SyncHealth {
        last_ok: last_ok.clone(),
        last_failed: last_failed.clone(),
        tolerance: args.sync_period * 2,
    });
    let server = Server::bind(args.http_bind_address, registry, health.clone(), health).await?;
    let http = tokio::spawn(server.serve(shutdown.clone()));

    let services: Arc<Store<Cached<ServiceInfo>>> = Arc::new(Store::new(None));
    let slices: Arc<Store<Cached<SliceInfo>>> = Arc::new(Store::new(Some(slice_service)));
    let changed = Arc::new(Notify::new());
    // The Services changed since the last sync: only they are recomputed (kube-proxy's change
    // trackers). A slice names its Service; both old and new values count, so a Service or
    // slice that turned unusable still counts for what it was.
    let dirty: Arc<Mutex<BTreeSet<ObjectKey>>> = Arc::default();
    let mut svc_informer = Informer::new(
        "dataplane-services",
        Api::<Service>::all(client.clone()),
        watcher::Config::default(),
        cache_service,
        services.clone(),
    );
    let mut slice_informer = Informer::new(
        "dataplane-endpointslices",
        Api::<EndpointSlice>::all(client.clone()),
        watcher::Config::default(),
        cache_slice,
        slices.clone(),
    );
    {
        let (c, d) = (changed.clone(), dirty.clone());
        svc_informer.on_change(Box::new(move |old, new| {
            mark_dirty(
                &d,
                [old, new]
                    .into_iter()
                    .flatten()
                    .filter_map(|s| s.value.as_ref())
                    .map(|s| &s.key),
            );
            c.notify_one();
        }));
        let (c, d) = (changed.clone(), dirty.clone());
        slice_informer.on_change(Box::new(move |old, new| {
            mark_dirty(
                &d,
                [old, new]
                    .into_iter()
                    .flatten()
                    .filter_map(|s| s.value.as_ref())
                    .map(|s| &s.service),
            );
            c.notify_one();
        }));
    }
    // This node's zone label (topology hints): another zone changes what every Service with
    // zone hints sends where, so the next sync recomputes everything.
    let nodes: Arc<Store<Cached<String>>> = Arc::new(Store::new(None));
    let mut node_informer = Informer::new(
        "dataplane-node",
        Api::<Node>::all(client.clone()),
        watcher::Config::default().fields(&format!("metadata.name={}", args.node_name)),
        cache_node,
        nodes.clone(),
    );
    let zone_changed = Arc::new(AtomicBool::new(false));
    {
        let (c, z) = (changed.clone(), zone_changed.clone());
        node_informer.on_change(Box::new(move |old, new| {
            let zone = |n: Option<&Arc<Cached<String>>>| n.and_then(|n| n.value.clone());
            if zone(old) != zone(new) {
                z.store(true, Ordering::Relaxed);
                c.notify_one();
            }
        }));
    }
    let mut synced = [
        svc_informer.synced(),
        slice_informer.synced(),
        node_informer.synced(),
    ];
    tokio::spawn(svc_informer.run(shutdown.clone()));
    tokio::spawn(slice_informer.run(shutdown.clone()));
    tokio::spawn(node_informer.run(shutdown.clone()));
    if !svcplane_controllers::runtime::informer::wait_for_sync(
        &mut synced,
        &shutdown,
        Duration::from_secs(10),
    )
    .await
    {
        return Ok(());
    }
    info!(node = %args.node_name, mode = backend.mode(), "caches synced; programming the kernel");

    let mut state = SyncState::default();
    let mut last_check = Instant::now();
    let mut last_full: Option<Instant> = None;
    loop {
        let started = Instant::now();
        let mut wait = args.sync_period;
        // Everything once a period (and first, and after a failure); in between, the changes.
        let changes = std::mem::take(&mut *dirty.lock().unwrap_or_else(std::sync::PoisonError::into_inner));
        if zone_changed.swap(false, Ordering::Relaxed) {
            last_full = None;
        }
        let node = args.this_node(
            nodes
                .get(&ObjectKey::new("", args.node_name.as_str()))
                .and_then(|n| n.value.clone()),
        );
        let scope = match last_full {
            Some(at) if at.elapsed() < args.sync_period => Scope::Services(changes),
            _ => {
                last_full = Some(Instant::now());
                Scope::All
            }
        };
        let full = matches!(scope, Scope::All);
        let result = sync(
            &node,
            &mut backend,
            &services,
            &slices,
            &mut state,
            &metrics,
            scope,
        )
        .instrument(info_span!("sync", full))
        .await;
        let elapsed = started.elapsed();
        metrics.sync_duration.observe(elapsed.as_secs_f64());
        debug!(
            full,
            elapsed_ms = elapsed.as_secs_f64() * 1000.0,
            ok = result.is_ok(),
            "sync complete"
        );
        match result {
            Ok(()) => {
                *last_ok.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = Some(Instant::now());
                *last_failed
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner) = false;
                let now = SystemTime::now()
                    .duration_since(SystemTime::UNIX_EPOCH)
                    .unwrap_or_default();
                metrics.last_sync.set(now.as_secs_f64());
            }
            Err(e) => {
                *last_failed
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner) = true;
                metrics.sync_failures.inc();
                last_full = None;
                // Retried soon, from scratch (the next nftables sync rebuilds the table).
                wait = FAILED_SYNC_RETRY.min(args.sync_period);
                error!(error = format!("{e:#}"), retry_in = ?wait, "sync failed");
            }
        }
        // Wait for a change, or until the next full sync or check is due (they are due a period
        // after the last ones, not a period after the last sync: a burst of changes that ends
        // just before one is due must not put it off by most of another period), then at least
        // the minimum interval between syncs.
        let until = |at: Instant| args.sync_period.saturating_sub(at.elapsed());
        let mut wait = wait.min(until(last_check));
        if let Some(at) = last_full {
            wait = wait.min(until(at));
        }
        tokio::select! {
            () = shutdown.cancelled() => break,
            () = changed.notified() => {}
            () = tokio::time::sleep(wait) => {}
        }
        // Once a period however busy the cluster: churn must not put off the check for ever.
        if last_check.elapsed() >= args.sync_period {
            backend.check_drift(&metrics).await;
            last_check = Instant::now();
        }
        let since = started.elapsed();
        if since < args.min_sync_period {
            tokio::select! {
                () = shutdown.cancelled() => break,
                () = tokio::time::sleep(args.min_sync_period - since) => {}
            }
        }
    }
    http.await.context("HTTP server task")??;
    info!("dataplane stopped; rules stay in place (svcplane cleanup removes them)");
    Ok(())
}

/// How soon a failed sync is tried again.
const FAILED_SYNC_RETRY: Duration = Duration::from_secs(1);

/// What one sync recomputes.
enum Scope {
    All,
    /// Only these Services (their slices included).
    Services(BTreeSet<ObjectKey>),
}

fn mark_dirty<'a>(dirty: &Mutex<BTreeSet<ObjectKey>>, keys: impl Iterator<Item = &'a ObjectKey>) {
    dirty
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .extend(keys.cloned());
}

/// The slices of a Service are a group of the slice store: found without a scan.
fn slice_service(c: &Cached<SliceInfo>) -> Option<String> {
    c.value.as_ref().map(|s| s.service.name.clone())
}

/// What one sync leaves for the next (besides what the backend keeps).
#[derive(Default)]
struct SyncState {
    /// The node's desired state as of the last sync; `None` before the first.
    desired: Option<DesiredState>,
    problems: Vec<Problem>,
    health_checks: HealthCheckServers,
    /// Trigger time of every slice version already programmed (`None`: before the first sync,
    /// whose latency is start-up, not programming).
    triggers: Option<HashMap<ObjectKey, Timestamp>>,
}

/// One sync: compute the node's desired state (all of it, or the changed Services' part), let
/// the backend write the difference, then the health-check servers and the programming
/// latency.
async fn sync<B: Backend>(
    node: &ThisNode,
    backend: &mut B,
    services: &Store<Cached<ServiceInfo>>,
    slices: &Store<Cached<SliceInfo>>,
    st: &mut SyncState,
    metrics: &DataplaneMetrics,
    scope: Scope,
) -> anyhow::Result<()> {
    let scope = if st.desired.is_none() { Scope::All } else { scope };
    let result = match scope {
        Scope::All => sync_all(node, backend, services, slices, st, metrics).await,
        Scope::Services(keys) => sync_services(node, backend, services, slices, st, metrics, &keys).await,
    };
    if result.is_err() {
        // Recomputed whole next time.
        st.desired = None;
    }
    result
}

async fn sync_all<B: Backend>(
    node: &ThisNode,
    backend: &mut B,
    services: &Store<Cached<ServiceInfo>>,
    slices: &Store<Cached<SliceInfo>>,
    st: &mut SyncState,
    metrics: &DataplaneMetrics,
) -> anyhow::Result<()> {
    let svc_cache = services.list_all(|_| true);
    let slice_cache = slices.list_all(|_| true);
    let mut problems: Vec<Problem> = svc_cache
        .iter()
        .flat_map(|c| c.problems.iter().cloned())
        .chain(slice_cache.iter().flat_map(|c| c.problems.iter().cloned()))
        .collect();
    problems.sort_by(|a, b| (&a.object, &a.what).cmp(&(&b.object, &b.what)));
    if problems != st.problems {
        for p in problems.iter().filter(|p| !st.problems.contains(p)) {
            warn!(object = %p.object, problem = %p.what, "skipped part of an object");
        }
        metrics
            .problems
            .set(i64::try_from(problems.len()).unwrap_or(i64::MAX));
        st.problems = problems;
    }
    let svcs: Vec<ServiceInfo> = svc_cache.iter().filter_map(|c| c.value.clone()).collect();
    let eps: Vec<SliceInfo> = slice_cache.iter().filter_map(|c| c.value.clone()).collect();
    let state = st.desired.insert(desired(node, &svcs, &eps));
    backend.apply(state, None, metrics).await?;
    st.health_checks.sync(&state.health_checks).await;
    observe_programming_latency(&eps, &mut st.triggers, true, metrics);
    Ok(())
}

/// The changed Services only: their part of the desired state is recomputed from the caches,
/// and the backend told which they are. Problems in objects are reported by the full syncs.
async fn sync_services<B: Backend>(
    node: &ThisNode,
    backend: &mut B,
    services: &Store<Cached<ServiceInfo>>,
    slices: &Store<Cached<SliceInfo>>,
    st: &mut SyncState,
    metrics: &DataplaneMetrics,
    keys: &BTreeSet<ObjectKey>,
) -> anyhow::Result<()> {
    let Some(state) = st.desired.as_mut() else {
        return Ok(());
    };
    let mut changed_slices = Vec::new();
    for key in keys {
        let eps: Vec<SliceInfo> = slices
            .list_group(key)
            .iter()
            .filter_map(|c| c.value.clone())
            .collect();
        let svc = services.get(key).and_then(|c| c.value.clone());
        let refs: Vec<&SliceInfo> = eps.iter().collect();
        state.set_service(key, svc.map(|svc| service_state(node, &svc, &refs)));
        changed_slices.extend(eps);
    }
    backend.apply(state, Some(keys), metrics).await?;
    st.health_checks.sync(&state.health_checks).await;
    observe_programming_latency(&changed_slices, &mut st.triggers, false, metrics);
    Ok(())
}

/// The objects of one `--objects` file, as the watches would have cached them.
struct Objects {
    services: Store<Cached<ServiceInfo>>,
    slices: Store<Cached<SliceInfo>>,
    node: ThisNode,
}

impl Objects {
    fn read(args: &Args, path: &Path) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        let list: serde_json::Value =
            serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
        let services: Store<Cached<ServiceInfo>> = Store::new(None);
        let slices: Store<Cached<SliceInfo>> = Store::new(Some(slice_service));
        let mut node = args.this_node(None);
        for item in list
            .get("items")
            .and_then(serde_json::Value::as_array)
            .into_iter()
            .flatten()
        {
            let key = ObjectKey::new(
                item.pointer("/metadata/namespace")
                    .and_then(|v| v.as_str())
                    .unwrap_or_default(),
                item.pointer("/metadata/name")
                    .and_then(|v| v.as_str())
                    .unwrap_or_default(),
            );
            match item.get("kind").and_then(|k| k.as_str()) {
                Some("Service") => {
                    let svc: Service =
                        serde_json::from_value(item.clone()).with_context(|| format!("Service {key}"))?;
                    services.insert(key, Arc::new(cache_service(svc)));
                }
                Some("EndpointSlice") => {
                    let s: EndpointSlice = serde_json::from_value(item.clone())
                        .with_context(|| format!("EndpointSlice {key}"))?;
                    slices.insert(key, Arc::new(cache_slice(s)));
                }
                Some("Node") => {
                    let n: Node =
                        serde_json::from_value(item.clone()).with_context(|| format!("Node {key}"))?;
                    if key.name == args.node_name {
                        node.zone = cache_node(n).value;
                    }
                }
                other => {
                    warn!(kind = ?other, "skipping an object that is neither a Service, an EndpointSlice nor a Node")
                }
            }
        }
        Ok(Self {
            services,
            slices,
            node,
        })
    }

    /// Each Service's object and its slices, by Service.
    fn by_service(&self) -> BTreeMap<ObjectKey, (Option<ServiceInfo>, Vec<SliceInfo>)> {
        let mut out: BTreeMap<ObjectKey, (Option<ServiceInfo>, Vec<SliceInfo>)> = BTreeMap::new();
        for c in self.services.list_all(|_| true) {
            if let Some(svc) = &c.value {
                out.entry(svc.key.clone()).or_default().0 = Some(svc.clone());
            }
        }
        for c in self.slices.list_all(|_| true) {
            if let Some(slice) = &c.value {
                out.entry(slice.service.clone())
                    .or_default()
                    .1
                    .push(slice.clone());
            }
        }
        for (_, slices) in out.values_mut() {
            slices.sort_by(|a, b| a.name.cmp(&b.name));
        }
        out
    }
}

/// The Services whose objects differ between two files.
fn changed_services(before: &Objects, after: &Objects) -> BTreeSet<ObjectKey> {
    let (before, after) = (before.by_service(), after.by_service());
    before
        .keys()
        .chain(after.keys())
        .filter(|k| before.get(*k) != after.get(*k))
        .cloned()
        .collect()
}

/// `--objects`: one sync per file, then exit; prints what each did as one JSON line.
async fn replay<B: Backend>(
    args: &Args,
    backend: &mut B,
    paths: &[PathBuf],
    metrics: &DataplaneMetrics,
) -> anyhow::Result<()> {
    let mut st = SyncState::default();
    let mut last: Option<Objects> = None;
    for path in paths {
        let objects = Objects::read(args, path)?;
        let scope = match &last {
            Some(before) if before.node == objects.node => {
                Scope::Services(changed_services(before, &objects))
            }
            _ => Scope::All,
        };
        let services = match &scope {
            Scope::All => None,
            Scope::Services(keys) => Some(keys.len()),
        };
        let started = Instant::now();
        sync(
            &objects.node,
            backend,
            &objects.services,
            &objects.slices,
            &mut st,
            metrics,
            scope,
        )
        .await?;
        let elapsed_ms = started.elapsed().as_secs_f64() * 1000.0;
        let mut summary = backend.summary();
        summary["elapsed_ms"] = serde_json::json!(elapsed_ms);
        summary["full"] = serde_json::json!(services.is_none());
        if let Some(n) = services {
            summary["services_changed"] = serde_json::json!(n);
        }
        println!("{summary}");
        last = Some(objects);
    }
    Ok(())
}

/// For every slice version programmed for the first time: now minus its trigger time.
/// With `all`, `slices` are every slice (and slices gone are forgotten); else only some.
fn observe_programming_latency(
    slices: &[SliceInfo],
    seen: &mut Option<HashMap<ObjectKey, Timestamp>>,
    all: bool,
    metrics: &DataplaneMetrics,
) {
    let now = Timestamp::now();
    let first = seen.is_none();
    let seen = seen.get_or_insert_with(HashMap::new);
    let mut current = HashMap::with_capacity(slices.len());
    for s in slices {
        let Some(t) = s.trigger_time else { continue };
        if !first && seen.get(&s.name) != Some(&t) {
            let secs = now.duration_since(t).as_secs_f64();
            if secs >= 0.0 {
                metrics.programming_latency.observe(secs);
                debug!(service = %s.service, slice = %s.name, seconds = secs, "network programming");
            }
        }
        current.insert(s.name.clone(), t);
    }
    if all {
        *seen = current;
    } else {
        seen.extend(current);
    }
}

/// `svcplane cleanup`: removes svcplane's nftables tables.
pub async fn cleanup(_args: CleanupArgs) -> anyhow::Result<()> {
    match backend::apply_nft(svcplane_dataplane::nft::cleanup()).await {
        Ok(_) => info!("removed svcplane's nftables tables"),
        // A kernel without nf_tables never ran nftables mode.
        Err(e) => warn!(error = format!("{e:#}"), "could not remove nftables tables"),
    }
    if ipvs::link::remove().await? {
        info!(link = ipvs::link::LINK, "removed the dummy interface");
    }
    // As kube-proxy's cleanup: every virtual server goes (the node's IPVS is the proxy's).
    let flushed = tokio::task::spawn_blocking(|| -> anyhow::Result<bool> {
        match ipvs::client::IpvsClient::connect()? {
            Some(mut c) => {
                c.flush()?;
                Ok(true)
            }
            None => Ok(false),
        }
    })
    .await
    .context("the IPVS task")??;
    if flushed {
        info!("flushed IPVS");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex as StdMutex;

    use serde_json::json;
    use svcplane_dataplane::desired::Backends;

    use super::*;

    /// A backend that records what it is asked to apply, and fails when told to.
    #[derive(Default)]
    struct Recording {
        applied: Arc<StdMutex<Vec<DesiredState>>>,
        /// The Services each apply was told changed (`None`: a full sync).
        changed: Arc<StdMutex<Vec<Option<BTreeSet<ObjectKey>>>>>,
        fail: bool,
    }

    impl Backend for Recording {
        fn mode(&self) -> &'static str {
            "recording"
        }

        async fn apply(
            &mut self,
            state: &DesiredState,
            changed: Option<&BTreeSet<ObjectKey>>,
            _metrics: &DataplaneMetrics,
        ) -> anyhow::Result<()> {
            if self.fail {
                bail!("the kernel said no");
            }
            self.applied.lock().unwrap().push(state.clone());
            self.changed.lock().unwrap().push(changed.cloned());
            Ok(())
        }

        async fn check_drift(&mut self, _metrics: &DataplaneMetrics) {}

        fn summary(&self) -> serde_json::Value {
            json!({"mode": self.mode(), "applied": self.applied.lock().unwrap().len()})
        }
    }

    fn metrics() -> (Registry, DataplaneMetrics) {
        let registry = Registry::new();
        let m = DataplaneMetrics::register(&registry).unwrap();
        (registry, m)
    }

    fn service(name: &str, ip: &str, protocol: &str) -> Service {
        serde_json::from_value(json!({
            "metadata": {"namespace": "ns", "name": name, "resourceVersion": "1"},
            "spec": {"type": "ClusterIP", "clusterIP": ip, "clusterIPs": [ip],
                     "selector": {"app": name},
                     "ports": [{"name": "http", "port": 80, "protocol": protocol}]},
        }))
        .unwrap()
    }

    fn slice(service: &str, ips: &[&str], trigger: Option<&str>) -> EndpointSlice {
        let annotations = trigger.map_or(json!({}), |t| json!({ANNOTATION: t}));
        serde_json::from_value(json!({
            "metadata": {"namespace": "ns", "name": format!("{service}-abc"), "resourceVersion": "1",
                         "labels": {"kubernetes.io/service-name": service},
                         "annotations": annotations},
            "addressType": "IPv4",
            "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
            "endpoints": ips.iter().map(|ip| json!({"addresses": [ip], "nodeName": "node-a",
                                                      "conditions": {"ready": true}})).collect::<Vec<_>>(),
        }))
        .unwrap()
    }

    const ANNOTATION: &str = "endpoints.kubernetes.io/last-change-trigger-time";

    fn node_a() -> ThisNode {
        ThisNode::named("node-a")
    }

    fn stores(
        services: &[Service],
        slices: &[EndpointSlice],
    ) -> (Store<Cached<ServiceInfo>>, Store<Cached<SliceInfo>>) {
        let (s, e) = (Store::new(None), Store::new(Some(slice_service)));
        for svc in services {
            let key = ObjectKey::new("ns", svc.metadata.name.clone().unwrap());
            s.insert(key, Arc::new(cache_service(svc.clone())));
        }
        for sl in slices {
            let key = ObjectKey::new("ns", sl.metadata.name.clone().unwrap());
            e.insert(key, Arc::new(cache_slice(sl.clone())));
        }
        (s, e)
    }

    #[tokio::test]
    async fn a_sync_hands_the_backend_the_nodes_desired_state_and_reports_bad_objects() {
        let (_registry, m) = metrics();
        let mut backend = Recording::default();
        let mut st = SyncState::default();
        let (services, slices) = stores(
            &[
                service("web", "10.96.0.10", "TCP"),
                service("odd", "10.96.0.11", "FOO"),
            ],
            &[slice("web", &["10.244.0.1", "10.244.0.2"], None)],
        );
        sync(
            &node_a(),
            &mut backend,
            &services,
            &slices,
            &mut st,
            &m,
            Scope::All,
        )
        .await
        .unwrap();

        let applied = backend.applied.lock().unwrap().clone();
        assert_eq!(applied.len(), 1);
        let ports: Vec<_> = applied[0].ports.values().collect();
        assert_eq!(
            ports.len(),
            1,
            "the Service with an unknown protocol is left out: {ports:?}"
        );
        assert_eq!(ports[0].name.service, ObjectKey::new("ns", "web"));
        assert_eq!(
            ports[0].internal,
            Backends::To(vec![
                "10.244.0.1:8080".parse().unwrap(),
                "10.244.0.2:8080".parse().unwrap()
            ])
        );
        assert_eq!(m.problems.get(), 1, "the bad port is counted");
        assert_eq!(st.problems.len(), 1);
        assert!(st.problems[0].object.contains("odd"), "{:?}", st.problems);
    }

    #[tokio::test]
    async fn between_full_syncs_only_the_changed_services_are_recomputed() {
        let (_registry, m) = metrics();
        let mut backend = Recording::default();
        let mut st = SyncState::default();
        let svcs = [
            service("web", "10.96.0.10", "TCP"),
            service("api", "10.96.0.11", "TCP"),
        ];
        let (services, slices) = stores(&svcs, &[slice("web", &["10.244.0.1"], None)]);
        sync(
            &node_a(),
            &mut backend,
            &services,
            &slices,
            &mut st,
            &m,
            Scope::All,
        )
        .await
        .unwrap();
        // Both Services gain an endpoint in the caches; only `web` is said to have changed.
        for (name, ip) in [("web", "10.244.0.2"), ("api", "10.244.0.3")] {
            let sl = slice(name, &[ip], None);
            slices.insert(
                ObjectKey::new("ns", format!("{name}-abc")),
                Arc::new(cache_slice(sl)),
            );
        }
        let web = ObjectKey::new("ns", "web");
        let api = ObjectKey::new("ns", "api");
        let endpoints = |state: &DesiredState, key: &ObjectKey| -> Vec<String> {
            state
                .service_ports(key)
                .flat_map(|p| p.internal.endpoints().iter().map(ToString::to_string))
                .collect()
        };
        sync(
            &node_a(),
            &mut backend,
            &services,
            &slices,
            &mut st,
            &m,
            Scope::Services([web.clone()].into()),
        )
        .await
        .unwrap();
        let last = backend.applied.lock().unwrap().last().unwrap().clone();
        assert_eq!(endpoints(&last, &web), ["10.244.0.2:8080"]);
        assert_eq!(endpoints(&last, &api), Vec::<String>::new(), "not recomputed");
        // The next full sync catches up whatever was missed.
        sync(
            &node_a(),
            &mut backend,
            &services,
            &slices,
            &mut st,
            &m,
            Scope::All,
        )
        .await
        .unwrap();
        let last = backend.applied.lock().unwrap().last().unwrap().clone();
        assert_eq!(endpoints(&last, &api), ["10.244.0.3:8080"]);
        // A Service deleted from the caches goes from the state at its change.
        services.remove(&web);
        sync(
            &node_a(),
            &mut backend,
            &services,
            &slices,
            &mut st,
            &m,
            Scope::Services([web.clone()].into()),
        )
        .await
        .unwrap();
        let last = backend.applied.lock().unwrap().last().unwrap().clone();
        assert_eq!(last.service_ports(&web).count(), 0);
        assert_eq!(last.service_ports(&api).count(), 1);
    }

    #[tokio::test]
    async fn a_failing_backend_fails_the_sync_and_leaves_the_rest_for_the_retry() {
        let (_registry, m) = metrics();
        let mut backend = Recording {
            fail: true,
            ..Default::default()
        };
        let mut st = SyncState::default();
        let (services, slices) = stores(
            &[service("web", "10.96.0.10", "TCP")],
            &[slice("web", &["10.244.0.1"], Some("2026-01-01T00:00:00Z"))],
        );
        let err = sync(
            &node_a(),
            &mut backend,
            &services,
            &slices,
            &mut st,
            &m,
            Scope::All,
        )
        .await
        .unwrap_err();
        assert!(format!("{err:#}").contains("the kernel said no"));
        assert!(st.triggers.is_none(), "nothing counted as programmed");
        backend.fail = false;
        sync(
            &node_a(),
            &mut backend,
            &services,
            &slices,
            &mut st,
            &m,
            Scope::All,
        )
        .await
        .unwrap();
        assert_eq!(backend.applied.lock().unwrap().len(), 1);
        assert!(st.triggers.is_some());
    }

    #[tokio::test]
    async fn programming_latency_counts_each_slice_version_once_and_not_the_first_sync() {
        let (_registry, m) = metrics();
        let mut backend = Recording::default();
        let mut st = SyncState::default();
        let svc = [service("web", "10.96.0.10", "TCP")];
        let at = |t: &str| stores(&svc, &[slice("web", &["10.244.0.1"], Some(t))]);

        let (s, e) = at("2026-01-01T00:00:00Z");
        sync(&node_a(), &mut backend, &s, &e, &mut st, &m, Scope::All)
            .await
            .unwrap();
        assert_eq!(
            m.programming_latency.get_sample_count(),
            0,
            "start-up is not programming"
        );
        let (s, e) = at("2026-01-01T00:00:05Z");
        sync(&node_a(), &mut backend, &s, &e, &mut st, &m, Scope::All)
            .await
            .unwrap();
        assert_eq!(m.programming_latency.get_sample_count(), 1);
        sync(&node_a(), &mut backend, &s, &e, &mut st, &m, Scope::All)
            .await
            .unwrap();
        assert_eq!(
            m.programming_latency.get_sample_count(),
            1,
            "the same version again"
        );
    }

    #[tokio::test]
    async fn objects_mode_syncs_each_file_the_first_whole_the_next_by_changed_service() {
        let (_registry, m) = metrics();
        let dir = std::env::temp_dir().join(format!("svcplane-objects-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = |name: &str, web_ips: &[&str]| {
            let mut items = vec![];
            for (kind, v) in [
                (
                    "Service",
                    serde_json::to_value(service("web", "10.96.0.10", "TCP")).unwrap(),
                ),
                (
                    "EndpointSlice",
                    serde_json::to_value(slice("web", web_ips, None)).unwrap(),
                ),
                (
                    "Service",
                    serde_json::to_value(service("db", "10.96.0.11", "TCP")).unwrap(),
                ),
                (
                    "EndpointSlice",
                    serde_json::to_value(slice("db", &["10.244.9.9"], None)).unwrap(),
                ),
            ] {
                let mut v = v;
                v["kind"] = json!(kind);
                items.push(v);
            }
            let path = dir.join(name);
            std::fs::write(&path, json!({ "items": items }).to_string()).unwrap();
            path
        };
        let paths = [
            file("a.json", &["10.244.0.1"]),
            file("b.json", &["10.244.0.1", "10.244.0.2"]),
            file("c.json", &["10.244.0.1", "10.244.0.2"]),
        ];
        #[derive(clap::Parser)]
        struct Cli {
            #[command(flatten)]
            args: Args,
        }
        let args = <Cli as clap::Parser>::try_parse_from(["dataplane", "--node-name", "node-a"])
            .unwrap()
            .args;
        let mut backend = Recording::default();
        replay(&args, &mut backend, &paths, &m).await.unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
        let applied = backend.applied.lock().unwrap();
        assert_eq!(applied.len(), 3);
        assert_eq!(applied[0].ports.len(), 2);
        let web = |st: &DesiredState| {
            st.ports
                .values()
                .find(|p| p.name.service.name == "web")
                .unwrap()
                .internal
                .endpoints()
                .len()
        };
        assert_eq!((web(&applied[0]), web(&applied[1])), (1, 2));
        assert_eq!(
            *backend.changed.lock().unwrap(),
            [
                None,
                Some([ObjectKey::new("ns", "web")].into()),
                Some(BTreeSet::new())
            ],
            "whole, then web alone, then nothing"
        );
    }

    #[test]
    fn health_follows_the_last_sync_with_a_tolerance() {
        let check = |ok: Option<Duration>, failed: bool| {
            SyncHealth {
                last_ok: Arc::new(Mutex::new(ok.map(|ago| Instant::now() - ago))),
                last_failed: Arc::new(Mutex::new(failed)),
                tolerance: Duration::from_secs(60),
            }
            .check()
        };
        assert!(check(None, false).is_err(), "no sync yet");
        assert!(check(Some(Duration::from_secs(1)), false).is_ok());
        assert!(
            check(Some(Duration::from_secs(30)), true).is_ok(),
            "within the tolerance"
        );
        let err = check(Some(Duration::from_secs(120)), true).unwrap_err();
        assert!(err.contains("have failed for"), "{err}");
    }
}
