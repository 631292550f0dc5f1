//! `svcplane dataplane`: the node agent. Watches Services and EndpointSlices, computes the node's
//! desired state (pure, `svcplane_dataplane`), and writes only the difference to the
//! kernel. `svcplane cleanup` removes what it wrote.

mod cache;
mod healthcheck;
mod ipvs;
mod metrics;
mod nft;
pub mod sysctls;

use std::{
    collections::HashMap,
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::{Duration, Instant, SystemTime},
};

use anyhow::{Context, bail};
use k8s_openapi::{
    api::{core::v1::Service, discovery::v1::EndpointSlice},
    jiff::Timestamp,
};
use kube::{Api, runtime::watcher};
use prometheus::Registry;
use svcplane_controllers::runtime::{informer::Informer, store::Store};
use svcplane_core::{IpFamily, ObjectKey};
use svcplane_dataplane::{
    desired::{DesiredState, desired},
    input::{Problem, ServiceInfo, SliceInfo},
    ipvs::plan::{Op, SCHEDULERS},
    nft::{IpvsSupport, Ruleset, TABLE, ipvs_support, ipvs_support_transaction, ruleset, transaction},
};
use tokio::{signal::unix::SignalKind, sync::Notify};
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, error, info, info_span, warn};

use crate::{
    dataplane::cache::{Cached, cache_service, cache_slice},
    health::{Check, Checks},
    http::Server,
    kubeclient,
};
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
    #[arg(long, value_enum, default_value = "auto")]
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
    /// The nft program (nftables mode).
    #[arg(long, default_value = "nft")]
    pub nft: PathBuf,
    /// IPVS scheduler for every virtual server (rr, wrr, lc, wlc, lblc, lblcr, dh, sh, sed, nq,
    /// fo, ovf, mh, twos). An unknown name is reported and rr used instead.
    #[arg(long, default_value = "rr")]
    pub scheduler: String,
    /// This node's addresses, where IPVS mode opens NodePorts (nftables mode answers on every
    /// local address by itself).
    #[arg(long, value_delimiter = ',')]
    pub node_ip: Vec<IpAddr>,
    /// Read Services and EndpointSlices from this JSON List instead of the apiserver (offline
    /// programming and tests); implies one sync and exit.
    #[arg(long)]
    pub objects: Option<PathBuf>,
}

/// What programs the kernel.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Backend {
    Nftables,
    Ipvs { scheduler: String },
}

#[derive(clap::Args, Debug)]
pub struct CleanupArgs {
    #[arg(long, default_value = "nft")]
    pub nft: PathBuf,
}

/// The last applied ruleset per family; `None` when unknown (start, or after a failed apply),
/// which makes the next sync rebuild the table.
#[derive(Default)]
struct Applied {
    v4: Option<Ruleset>,
    v6: Option<Ruleset>,
}

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
fn backend(args: &Args, metrics: &DataplaneMetrics) -> anyhow::Result<Backend> {
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
            Backend::Nftables
        }
        (Mode::Auto, Ipvs::Absent(why)) => {
            info!(reason = %why, "nftables mode: no IPVS on this node");
            Backend::Nftables
        }
        (Mode::Ipvs, Ipvs::Absent(why)) => bail!("--mode=ipvs: {why}"),
        (Mode::Auto | Mode::Ipvs, Ipvs::Available { family_id }) => {
            info!(family_id, "IPVS mode");
            Backend::Ipvs {
                scheduler: scheduler(),
            }
        }
    })
}

pub async fn run(args: Args) -> anyhow::Result<()> {
    let registry = Registry::new();
    let metrics = DataplaneMetrics::register(&registry).context("registering metrics")?;
    let backend = backend(&args, &metrics)?;
    if let Some(path) = &args.objects {
        return run_once(&args, &backend, path, &metrics).await;
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
    let slices: Arc<Store<Cached<SliceInfo>>> = Arc::new(Store::new(None));
    let changed = Arc::new(Notify::new());
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
        let c = changed.clone();
        svc_informer.on_change(Box::new(move |_, _| c.notify_one()));
        let c = changed.clone();
        slice_informer.on_change(Box::new(move |_, _| c.notify_one()));
    }
    let mut synced = [svc_informer.synced(), slice_informer.synced()];
    tokio::spawn(svc_informer.run(shutdown.clone()));
    tokio::spawn(slice_informer.run(shutdown.clone()));
    if !svcplane_controllers::runtime::informer::wait_for_sync(
        &mut synced,
        &shutdown,
        Duration::from_secs(10),
    )
    .await
    {
        return Ok(());
    }
    info!(node = %args.node_name, ?backend, "caches synced; programming the kernel");

    let mut state = SyncState::default();
    loop {
        let started = Instant::now();
        let mut wait = args.sync_period;
        let result = sync(&args, &backend, &services, &slices, &mut state, &metrics)
            .instrument(info_span!("sync"))
            .await;
        metrics.sync_duration.observe(started.elapsed().as_secs_f64());
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
                // Retried soon, from scratch (the next nftables sync rebuilds the table).
                wait = FAILED_SYNC_RETRY.min(args.sync_period);
                error!(error = format!("{e:#}"), retry_in = ?wait, "sync failed");
            }
        }
        // Wait for a change (or the period), then at least the minimum interval between syncs.
        tokio::select! {
            () = shutdown.cancelled() => break,
            () = changed.notified() => {}
            () = tokio::time::sleep(wait) => {
                // The periodic sync also notices a table someone else removed (a flushed
                // ruleset, another tool's cleanup) and rebuilds it.
                if backend == Backend::Nftables {
                    forget_missing_tables(&args.nft, &mut state.applied).await;
                }
            }
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

/// What one sync leaves for the next.
#[derive(Default)]
struct SyncState {
    applied: Applied,
    problems: Vec<Problem>,
    health_checks: HealthCheckServers,
    last_ipvs: Option<ipvs::Report>,
    /// IPVS mode's masquerade and reject rules as last applied (IPv4, IPv6).
    ipvs_support: (Option<IpvsSupport>, Option<IpvsSupport>),
    /// Trigger time of every slice version already programmed (`None`: before the first sync,
    /// whose latency is start-up, not programming).
    triggers: Option<HashMap<ObjectKey, Timestamp>>,
}

/// One sync: assemble, compute, diff, apply.
async fn sync(
    args: &Args,
    backend: &Backend,
    services: &Store<Cached<ServiceInfo>>,
    slices: &Store<Cached<SliceInfo>>,
    st: &mut SyncState,
    metrics: &DataplaneMetrics,
) -> anyhow::Result<()> {
    let applied = &mut st.applied;
    let last_problems = &mut st.problems;
    let svc_cache = services.list_all(|_| true);
    let slice_cache = slices.list_all(|_| true);
    let mut problems: Vec<Problem> = svc_cache
        .iter()
        .flat_map(|c| c.problems.iter().cloned())
        .chain(slice_cache.iter().flat_map(|c| c.problems.iter().cloned()))
        .collect();
    problems.sort_by(|a, b| (&a.object, &a.what).cmp(&(&b.object, &b.what)));
    if problems != *last_problems {
        for p in problems.iter().filter(|p| !last_problems.contains(p)) {
            warn!(object = %p.object, problem = %p.what, "skipped part of an object");
        }
        metrics
            .problems
            .set(i64::try_from(problems.len()).unwrap_or(i64::MAX));
        *last_problems = problems;
    }
    let svcs: Vec<ServiceInfo> = svc_cache.iter().filter_map(|c| c.value.clone()).collect();
    let eps: Vec<SliceInfo> = slice_cache.iter().filter_map(|c| c.value.clone()).collect();
    let state: DesiredState = desired(&args.node_name, &svcs, &eps);
    match backend {
        Backend::Nftables => apply_nftables(args, &state, applied, metrics).await?,
        Backend::Ipvs { scheduler } => {
            let report = ipvs::sync(&state, &args.node_ip, scheduler).await?;
            metrics
                .rules
                .with_label_values(&["IPVS"])
                .set(i64::try_from(report.entries).unwrap_or(i64::MAX));
            if report.failed > 0 {
                metrics
                    .ipvs_failures
                    .inc_by(u64::try_from(report.failed).unwrap_or(u64::MAX));
            }
            if !report.ops.is_empty() || report.addresses_added + report.addresses_removed > 0 {
                info!(
                    operations = report.ops.len(),
                    failed = report.failed,
                    addresses_added = report.addresses_added,
                    addresses_removed = report.addresses_removed,
                    "IPVS updated"
                );
            }
            st.last_ipvs = Some(report);
            for (family, slot) in [
                (IpFamily::IPv4, &mut st.ipvs_support.0),
                (IpFamily::IPv6, &mut st.ipvs_support.1),
            ] {
                let next = ipvs_support(&state, family);
                if slot.as_ref() == Some(&next) {
                    continue;
                }
                *slot = None;
                let tx =
                    ipvs_support_transaction(&next, family).context("rendering the IPVS-mode nftables")?;
                nft::apply(&args.nft, &tx).await?;
                *slot = Some(next);
            }
        }
    }
    st.health_checks.sync(&state.health_checks).await;
    observe_programming_latency(&eps, &mut st.triggers, metrics);
    Ok(())
}

/// Forgets what was applied for a family whose table is gone, so the next sync rebuilds it.
/// `nft list tables` names tables only: cheap however large svcplane's table is.
async fn forget_missing_tables(nft: &Path, applied: &mut Applied) {
    match nft::tables(nft).await {
        Ok(tables) => {
            for (family, slot) in [("ip", &mut applied.v4), ("ip6", &mut applied.v6)] {
                if slot.is_some() && !tables.contains(&(family.to_owned(), TABLE.to_owned())) {
                    warn!(family, table = TABLE, "svcplane's table is gone; rebuilding it");
                    *slot = None;
                }
            }
        }
        Err(e) => warn!(error = format!("{e:#}"), "cannot list nftables tables"),
    }
}

async fn apply_nftables(
    args: &Args,
    state: &DesiredState,
    applied: &mut Applied,
    metrics: &DataplaneMetrics,
) -> anyhow::Result<()> {
    for (family, slot) in [
        (IpFamily::IPv4, &mut applied.v4),
        (IpFamily::IPv6, &mut applied.v6),
    ] {
        let next = ruleset(state, family);
        metrics
            .rules
            .with_label_values(&[family_label(family)])
            .set(i64::try_from(next.size()).unwrap_or(i64::MAX));
        let Some(tx) = transaction(slot.as_ref(), &next, family).context("rendering the nftables batch")?
        else {
            continue;
        };
        let full = slot.is_none();
        // Unknown from here until the apply succeeds: a failed batch leaves the old table whole,
        // but the next sync must not diff against a state the kernel may not hold.
        *slot = None;
        nft::apply(&args.nft, &tx).await?;
        info!(
            family = family_label(family),
            commands = tx.len(),
            full,
            "nftables updated"
        );
        *slot = Some(next);
    }
    Ok(())
}

/// `--objects`: one sync from a file, then exit; prints what it did as one JSON line.
async fn run_once(
    args: &Args,
    backend: &Backend,
    path: &Path,
    metrics: &DataplaneMetrics,
) -> anyhow::Result<()> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let list: serde_json::Value =
        serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
    let services: Store<Cached<ServiceInfo>> = Store::new(None);
    let slices: Store<Cached<SliceInfo>> = Store::new(None);
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
                let s: EndpointSlice =
                    serde_json::from_value(item.clone()).with_context(|| format!("EndpointSlice {key}"))?;
                slices.insert(key, Arc::new(cache_slice(s)));
            }
            other => {
                warn!(kind = ?other, "skipping an object that is neither a Service nor an EndpointSlice")
            }
        }
    }
    let mut st = SyncState::default();
    let started = Instant::now();
    sync(args, backend, &services, &slices, &mut st, metrics).await?;
    let elapsed_ms = started.elapsed().as_secs_f64() * 1000.0;
    let mut summary = match &st.last_ipvs {
        Some(r) => serde_json::json!({
            "mode": "ipvs",
            "operations": r.ops.len(),
            "add_service": r.ops.iter().filter(|o| matches!(o, Op::AddService(..))).count(),
            "update_service": r.ops.iter().filter(|o| matches!(o, Op::UpdateService(..))).count(),
            "del_service": r.ops.iter().filter(|o| matches!(o, Op::DelService(..))).count(),
            "add_dest": r.ops.iter().filter(|o| matches!(o, Op::AddDest(..))).count(),
            "update_dest": r.ops.iter().filter(|o| matches!(o, Op::UpdateDest(..))).count(),
            "del_dest": r.ops.iter().filter(|o| matches!(o, Op::DelDest(..))).count(),
            "failed": r.failed,
            "addresses_added": r.addresses_added,
            "addresses_removed": r.addresses_removed,
        }),
        None => serde_json::json!({"mode": "nftables"}),
    };
    summary["elapsed_ms"] = serde_json::json!(elapsed_ms);
    println!("{summary}");
    Ok(())
}

/// For every slice version programmed for the first time: now minus its trigger time.
fn observe_programming_latency(
    slices: &[SliceInfo],
    seen: &mut Option<HashMap<ObjectKey, Timestamp>>,
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
            }
        }
        current.insert(s.name.clone(), t);
    }
    *seen = current;
}

fn family_label(f: IpFamily) -> &'static str {
    match f {
        IpFamily::IPv4 => "IPv4",
        IpFamily::IPv6 => "IPv6",
    }
}

/// `svcplane cleanup`: removes svcplane's nftables tables.
pub async fn cleanup(args: CleanupArgs) -> anyhow::Result<()> {
    let tx = svcplane_dataplane::nft::cleanup().context("rendering the cleanup batch")?;
    match nft::apply(&args.nft, &tx).await {
        Ok(()) => info!("removed svcplane's nftables tables"),
        // A node without nft never ran nftables mode.
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
