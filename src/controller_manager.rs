//! `svcplane controller-manager`: leader election, the HTTP endpoints, and the controllers that run
//! on the elected replica only.

use std::{net::SocketAddr, path::PathBuf, sync::Arc, time::Duration};

use anyhow::Context;
use clap::ArgAction;
use kube::Client;
use prometheus::Registry;
use svcplane_allocators::{
    controller::{
        pools::write_pools,
        release,
        repair::{Repair, RepairMetrics},
        reservations::Sweeper,
        run_term,
    },
    pool::RangeUsage,
    ranges::Ranges,
};
use svcplane_controllers::{
    endpoints::controller::Config as EndpointsConfig,
    endpointslice::controller::Config as SliceConfig,
    events::EventSink,
    leader::{Claim, ElectionConfig, Elector, Error as ElectorError, LeaderMetrics},
    manager::{self, ControllerMetrics, ManagerConfig},
    mirroring::controller::Config as MirroringConfig,
    runtime::{Supervisor, TaskFailed},
    selection::ServiceSelection,
};
use tokio::{
    signal::unix::{SignalKind, signal},
    sync::watch,
};
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::{
    health::{Checks, LeaderElectionWatchdog, RangesInitialized, ShuttingDown, spawn_apiserver_probe},
    http::Server,
    kubeclient,
};

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Path to a kubeconfig file; without it the in-cluster service account is used.
    #[arg(long, env = "KUBECONFIG")]
    pub kubeconfig: Option<PathBuf>,

    /// Address serving /metrics, /healthz and /readyz over plain HTTP.
    #[arg(long, default_value = "0.0.0.0:10267", env = "SVCPLANE_HTTP_BIND_ADDRESS")]
    pub http_bind_address: SocketAddr,

    /// How often the apiserver's own /readyz is probed for this replica's readiness.
    #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
    pub apiserver_probe_period: Duration,

    #[command(flatten)]
    pub leader: LeaderElectionArgs,

    #[command(flatten)]
    pub endpoints: EndpointControllerArgs,

    #[command(flatten)]
    pub allocation: crate::allocation::AllocationArgs,
}

/// The endpoint controllers' flags, with kube-controller-manager's names and defaults.
#[derive(clap::Args, Debug)]
pub struct EndpointControllerArgs {
    /// Controllers to run: `*` for all that are on by default, `name` to add one, `-name` to
    /// remove one (e.g. `*,-endpoints-controller`).
    #[arg(long, value_delimiter = ',', default_value = "*")]
    pub controllers: Vec<String>,
    /// Services whose EndpointSlices are synced concurrently.
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u16).range(1..=50))]
    pub concurrent_service_endpoint_syncs: u16,
    /// Maximum endpoints per EndpointSlice.
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u16).range(1..=1000))]
    pub max_endpoints_per_slice: u16,
    /// Delay before Pod changes are synced, so that bursts of changes coalesce into one write.
    #[arg(long, default_value = "0s", value_parser = humantime::parse_duration)]
    pub endpointslice_updates_batch_period: Duration,
    /// Services whose Endpoints are synced concurrently.
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u16).range(1..=50))]
    pub concurrent_endpoint_syncs: u16,
    /// Delay before Pod changes are synced into Endpoints.
    #[arg(long, default_value = "0s", value_parser = humantime::parse_duration)]
    pub endpoint_updates_batch_period: Duration,
    /// Endpoints objects mirrored concurrently.
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u16).range(1..=50))]
    pub mirroring_concurrent_service_endpoint_syncs: u16,
    /// Maximum addresses mirrored per Endpoints subset.
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u16).range(1..=1000))]
    pub mirroring_max_endpoints_per_subset: u16,
    /// Delay before Endpoints changes are mirrored.
    #[arg(long, default_value = "0s", value_parser = humantime::parse_duration)]
    pub mirroring_endpointslice_updates_batch_period: Duration,
    /// KEP-4770 coexistence: handle only Services labelled
    /// `service.kubernetes.io/endpoint-controller-name=<--endpoint-controller-name>` and write
    /// svcplane's own managed-by values, next to upstream's controllers.
    #[arg(long, default_value_t = false, action = ArgAction::Set)]
    pub endpoint_controller_coexistence: bool,
    /// The name Services use to hand their endpoints to svcplane (KEP-4770 label value).
    #[arg(long, default_value = svcplane_controllers::selection::DEFAULT_CONTROLLER_NAME)]
    pub endpoint_controller_name: String,
}

/// kube-controller-manager's `--leader-elect-*` flags, same names and defaults.
#[derive(clap::Args, Debug)]
pub struct LeaderElectionArgs {
    /// Run the controllers only on the replica holding the lease. Disable only for a single
    /// replica: two unelected replicas would both write.
    #[arg(long, default_value_t = true, action = ArgAction::Set)]
    pub leader_elect: bool,
    #[arg(long, default_value = "15s", value_parser = humantime::parse_duration)]
    pub leader_elect_lease_duration: Duration,
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    pub leader_elect_renew_deadline: Duration,
    #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
    pub leader_elect_retry_period: Duration,
    #[arg(long, default_value = "svcplane-controller-manager")]
    pub leader_elect_resource_name: String,
    #[arg(long, default_value = "kube-system")]
    pub leader_elect_resource_namespace: String,
    /// Identity written into the lease; the pod name in a cluster (downward API). Defaults to
    /// the hostname with a random suffix, as upstream does, so that two processes never share one.
    #[arg(long, env = "POD_NAME")]
    pub leader_elect_identity: Option<String>,
}

impl LeaderElectionArgs {
    fn config(&self) -> ElectionConfig {
        let identity = self
            .leader_elect_identity
            .clone()
            .unwrap_or_else(default_identity);
        ElectionConfig {
            lease_duration: self.leader_elect_lease_duration,
            renew_deadline: self.leader_elect_renew_deadline,
            retry_period: self.leader_elect_retry_period,
            ..ElectionConfig::new(
                &self.leader_elect_resource_namespace,
                &self.leader_elect_resource_name,
                identity,
            )
        }
    }
}

fn default_identity() -> String {
    let host = std::env::var("HOSTNAME")
        .ok()
        .filter(|h| !h.is_empty())
        .or_else(|| {
            std::fs::read_to_string("/etc/hostname")
                .ok()
                .map(|h| h.trim().to_owned())
        })
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "svcplane".to_owned());
    format!("{host}_{:016x}", rand::random::<u64>())
}

pub async fn run(args: Args) -> anyhow::Result<()> {
    let controllers = manager::parse_controllers(
        &args.endpoints.controllers,
        args.endpoints.endpoint_controller_coexistence,
    )?;
    // SIGTERM stops the leader's work and the background loops at once (the lease is handed
    // over), the webhook only once this replica is out of its Service's endpoints, and the
    // health and metrics endpoints last.
    let shutdown = CancellationToken::new();
    let webhook_control = crate::webhook::server::Control::new();
    let stop_http = CancellationToken::new();
    spawn_signal_handler(shutdown.clone())?;

    let kube_config = kubeclient::config(args.kubeconfig.as_deref()).await?;
    let client = kubeclient::plain(kube_config.clone())?;
    let registry = Registry::new();
    registry
        .register(Box::new(
            prometheus::process_collector::ProcessCollector::for_self(),
        ))
        .context("registering process metrics")?;

    let mut readiness = Checks::default()
        .with(ShuttingDown(shutdown.clone()))
        .with(spawn_apiserver_probe(
            client.clone(),
            args.apiserver_probe_period,
            shutdown.clone(),
        ));
    let mut liveness = Checks::default();
    let controller_metrics =
        ControllerMetrics::register(&registry).context("registering controller metrics")?;

    let election = args.leader.config();
    let election_identity = election.identity.clone();
    let selection = ServiceSelection {
        coexistence: args.endpoints.endpoint_controller_coexistence,
        controller_name: args.endpoints.endpoint_controller_name.clone(),
    };
    let manager_cfg = ManagerConfig {
        controllers,
        endpointslice: SliceConfig {
            workers: usize::from(args.endpoints.concurrent_service_endpoint_syncs),
            max_endpoints_per_slice: usize::from(args.endpoints.max_endpoints_per_slice),
            batch_period: args.endpoints.endpointslice_updates_batch_period,
            selection: selection.clone(),
        },
        endpoints: EndpointsConfig {
            workers: usize::from(args.endpoints.concurrent_endpoint_syncs),
            batch_period: args.endpoints.endpoint_updates_batch_period,
            selection: selection.clone(),
        },
        mirroring: MirroringConfig {
            workers: usize::from(args.endpoints.mirroring_concurrent_service_endpoint_syncs),
            max_endpoints_per_subset: usize::from(args.endpoints.mirroring_max_endpoints_per_subset),
            batch_period: args.endpoints.mirroring_endpointslice_updates_batch_period,
            selection: selection.clone(),
        },
        identity: election.identity.clone(),
    };
    info!(controllers = ?manager_cfg.controllers, "controllers enabled");

    let elector = if args.leader.leader_elect {
        let cfg = election;
        info!(identity = %cfg.identity, lease = %format_args!("{}/{}", cfg.namespace, cfg.name), "leader election enabled");
        let metrics = LeaderMetrics::register(&registry).context("registering leader election metrics")?;
        let tolerance = cfg.lease_duration;
        let elector = Elector::new(client.clone(), cfg, metrics)?;
        liveness = liveness.with(LeaderElectionWatchdog {
            state: elector.subscribe(),
            tolerance,
        });
        Some(elector)
    } else {
        warn!("leader election disabled: this replica runs the controllers unconditionally");
        None
    };
    // Everything the leader writes through the API goes through this client, which re-checks the
    // claim on the Lease right before each write.
    let claim = elector
        .as_ref()
        .map_or_else(Claim::unconditional, |e| Claim::new(e.subscribe()));
    let leader_client = kubeclient::fenced(kube_config, claim.clone())?;

    let mut webhook = None;
    let allocation = if args.allocation.enabled() {
        let crate::allocation::Started {
            allocators,
            usage,
            webhook: server,
            drain,
        } = crate::allocation::start(
            &args.allocation,
            &client,
            &registry,
            shutdown.clone(),
            webhook_control.clone(),
        )
        .await?;
        webhook = Some((server, drain));
        readiness = readiness.with(RangesInitialized::new(usage.clone()));
        let metrics = RepairMetrics::register(&registry).context("registering repair metrics")?;
        let events = EventSink::new(
            leader_client.clone(),
            "ipallocator-repair-controller",
            &election_identity,
        );
        let interval = args.allocation.allocation_repair_interval;
        let ttl = args.allocation.allocation_reservation_ttl;
        let repair = Arc::new(Repair::new(
            leader_client.clone(),
            allocators.clone(),
            interval,
            ttl,
            metrics,
            events,
        ));
        let sweeper = Arc::new(
            Sweeper::new(leader_client.clone(), allocators.clone(), ttl, &registry)
                .context("registering reservation metrics")?,
        );
        Some(LeaderAllocation {
            repair,
            sweeper,
            ranges: allocators,
            usage,
        })
    } else {
        info!("ClusterIP/NodePort allocation off (no --service-cluster-ip-range)");
        None
    };
    let leader = LeaderWork {
        client: leader_client,
        claim,
        identity: election_identity,
        manager: manager_cfg,
        metrics: controller_metrics,
        allocation,
    };
    let run_leader_work = move |stop: CancellationToken| leader.clone().run(stop);

    let server = Server::bind(args.http_bind_address, registry, liveness, readiness).await?;
    let http = tokio::spawn(server.serve(stop_http.clone()));
    // The webhook's drain starts at SIGTERM, beside the hand-over of the lease, so that the two
    // together fit the Pod's termination grace period.
    let webhook = webhook.map(|(server, drain)| {
        let (shutdown, control) = (shutdown.clone(), webhook_control.clone());
        tokio::spawn(async move {
            shutdown.cancelled().await;
            drain.run(&control).await;
            if let Err(e) = server.await {
                warn!(error = %e, "the webhook server task failed");
            }
        })
    });

    let outcome = match elector {
        Some(elector) => elector.run(shutdown.clone(), run_leader_work).await,
        None => run_leader_work(shutdown.clone())
            .await
            .map_err(ElectorError::WorkFailed),
    };
    // A failed leader term ends the process (after the usual drain), so that it restarts whole
    // rather than serving on with part of its work dead; the lease is already released.
    if let Err(e) = &outcome {
        error!(error = %e, "stopping: leader-only work failed");
    }
    shutdown.cancel();
    if let Some(webhook) = webhook
        && let Err(e) = webhook.await
    {
        warn!(error = %e, "the webhook drain task failed");
    }
    stop_http.cancel();
    http.await.context("HTTP server task")??;
    outcome.context("leader-only work")?;
    info!("controller-manager stopped");
    Ok(())
}

/// What the allocation side of the leader runs.
#[derive(Clone)]
struct LeaderAllocation {
    repair: Arc<Repair>,
    sweeper: Arc<Sweeper>,
    ranges: Arc<Ranges>,
    usage: watch::Receiver<Vec<RangeUsage>>,
}

/// Everything only the leader runs, started and stopped in one place: the endpoint controllers
/// and, with allocation on, the repair loop, the releases and the `ServicePool` objects.
#[derive(Clone)]
struct LeaderWork {
    /// Fenced: writes only while `claim` holds.
    client: Client,
    claim: Claim,
    identity: String,
    manager: ManagerConfig,
    metrics: ControllerMetrics,
    allocation: Option<LeaderAllocation>,
}

impl LeaderWork {
    /// Runs one leadership term until `stop`; the first task to fail ends it.
    async fn run(self, stop: CancellationToken) -> Result<(), TaskFailed> {
        let mut group = Supervisor::new(&stop);
        let mut service_handlers = Vec::new();
        if let Some(LeaderAllocation {
            repair,
            sweeper,
            ranges,
            usage,
        }) = self.allocation
        {
            // Releases and confirmations follow the controllers' Service watch rather than a
            // second one.
            let (handler, releases, holdings) = release::handler();
            service_handlers.push(handler);
            group.spawn_fallible(
                "allocation",
                run_term(
                    ranges,
                    repair,
                    sweeper,
                    (releases, holdings),
                    self.identity,
                    self.claim,
                    group.token(),
                ),
            );
            group.spawn(
                "servicepools",
                write_pools(self.client.clone(), usage, group.token()),
            );
        }
        group.spawn_fallible(
            "endpoint controllers",
            manager::run(
                self.client,
                self.manager,
                self.metrics,
                service_handlers,
                group.token(),
            ),
        );
        group.supervise().await
    }
}

fn spawn_signal_handler(shutdown: CancellationToken) -> anyhow::Result<()> {
    let mut term = signal(SignalKind::terminate()).context("installing SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("installing SIGINT handler")?;
    tokio::spawn(async move {
        tokio::select! {
            _ = term.recv() => info!("SIGTERM: shutting down"),
            _ = int.recv() => info!("SIGINT: shutting down"),
        }
        shutdown.cancel();
    });
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        args: Args,
    }

    fn controllers(argv: &[&str]) -> Vec<&'static str> {
        let cli = Cli::try_parse_from(std::iter::once("cm").chain(argv.iter().copied())).unwrap();
        manager::parse_controllers(
            &cli.args.endpoints.controllers,
            cli.args.endpoints.endpoint_controller_coexistence,
        )
        .unwrap()
        .into_iter()
        .collect()
    }

    #[test]
    fn controllers_flag_defaults_to_all_and_can_be_emptied() {
        assert_eq!(controllers(&[]).len(), 3);
        assert_eq!(controllers(&["--controllers="]), Vec::<&str>::new());
        assert_eq!(controllers(&["--controllers=*,-endpoints-controller"]).len(), 2);
        assert_eq!(
            controllers(&["--endpoint-controller-coexistence=true"]),
            ["endpointslice-controller"]
        );
    }
}
