//! Wiring of ClusterIP/NodePort allocation into the controller-manager: flags, the etcd ranges,
//! the webhook server and the caBundle of its configuration.

use std::{
    collections::BTreeMap,
    net::{IpAddr, SocketAddr},
    path::PathBuf,
    sync::Arc,
    time::Duration,
};

use anyhow::{Context, bail};
use k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration;
use kube::{
    Api, Client,
    api::{Patch, PatchParams},
};
use prometheus::Registry;
use svcplane_allocators::{
    IpRange, PortRange,
    admission::{ClusterFamilies, Limits},
    etcd::{EpochKey, EtcdOptions, RangeStore, connect},
    metrics::AllocatorMetrics,
    pool::RangeUsage,
    ranges::{PendingLimit, Ranges},
    usage::monitor,
};
use svcplane_core::IpFamily;
use tokio::{sync::watch, task::JoinHandle};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::webhook::{
    certs::{self, Source},
    drain::Drain,
    handler::{WebhookMetrics, WebhookState, router},
    server,
};

#[derive(clap::Args, Debug)]
pub struct AllocationArgs {
    /// Service CIDRs (one per family, the first is the default family), as given to
    /// kube-apiserver. Allocation is off without it.
    #[arg(long, value_delimiter = ',')]
    pub service_cluster_ip_range: Vec<String>,
    /// NodePort range, as given to kube-apiserver.
    #[arg(long, default_value = "30000-32767")]
    pub service_node_port_range: String,
    /// etcd endpoints holding the allocation bitmaps.
    #[arg(long, value_delimiter = ',')]
    pub etcd_servers: Vec<String>,
    /// Key prefix of the bitmaps in etcd.
    #[arg(long, default_value = "/svcplane")]
    pub etcd_prefix: String,
    #[arg(long)]
    pub etcd_cafile: Option<PathBuf>,
    #[arg(long)]
    pub etcd_certfile: Option<PathBuf>,
    #[arg(long)]
    pub etcd_keyfile: Option<PathBuf>,
    /// HTTPS address of the admission webhook.
    #[arg(long, default_value = "0.0.0.0:9443")]
    pub webhook_bind_address: SocketAddr,
    /// Serving certificate files; without them one is generated and shared through
    /// `--webhook-cert-secret`.
    #[arg(long, requires_all = ["webhook_tls_key_file", "webhook_ca_file"])]
    pub webhook_tls_cert_file: Option<PathBuf>,
    #[arg(long)]
    pub webhook_tls_key_file: Option<PathBuf>,
    #[arg(long)]
    pub webhook_ca_file: Option<PathBuf>,
    /// Serve only clients presenting a certificate signed by this CA (PEM): the apiserver, given
    /// a client certificate for this webhook in its AdmissionConfiguration. Use a CA of its own,
    /// not the cluster's, which signs every node's and user's certificate.
    #[arg(long)]
    pub webhook_client_ca_file: Option<PathBuf>,
    /// namespace/name of the Secret holding the generated serving certificate.
    #[arg(long, default_value = "kube-system/svcplane-webhook-tls")]
    pub webhook_cert_secret: String,
    /// Connections from the apiserver are closed gracefully after about this long, so that
    /// admission requests spread over every replica behind the webhook Service.
    #[arg(long, default_value = "2m", value_parser = humantime::parse_duration)]
    pub webhook_max_connection_age: Duration,
    /// On SIGTERM a replica keeps serving the webhook until it is out of the webhook Service's
    /// endpoints (and node proxies have had a moment to follow), at most this long.
    #[arg(long, default_value = "20s", value_parser = humantime::parse_duration)]
    pub webhook_shutdown_delay: Duration,
    /// This Pod's IP (downward API), to find itself among the webhook Service's endpoints.
    #[arg(long, env = "POD_IP")]
    pub pod_ip: Option<IpAddr>,
    /// Names (DNS or IP) the generated serving certificate is valid for.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "svcplane-webhook.kube-system.svc,svcplane-webhook.kube-system.svc.cluster.local"
    )]
    pub webhook_cert_names: Vec<String>,
    /// MutatingWebhookConfiguration whose caBundle this replica keeps current.
    #[arg(long, default_value = "svcplane")]
    pub webhook_configuration_name: String,
    /// How often the leader reconciles the bitmaps with every Service (leaks are released on
    /// their third consecutive sighting).
    #[arg(long, default_value = "3m", value_parser = humantime::parse_duration)]
    pub allocation_repair_interval: Duration,
    /// How long a value the webhook hands out stays reserved without a stored Service holding
    /// it; then the leader frees it (a create refused after the webhook, timed out or forged).
    /// Keep it above the apiserver's --request-timeout (60s), the longest a create may take to
    /// be stored after its webhook call.
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
    pub allocation_reservation_ttl: Duration,
    /// The most NodePorts one Service may take (its ports, and a health-check port); 0: no
    /// limit. One request must not be able to drain the range.
    #[arg(long, default_value_t = 256)]
    pub max_node_ports_per_service: usize,
    /// The most ClusterIPs and NodePorts one namespace may hold in reservations not yet
    /// confirmed by a stored Service; 0: no limit. Creates refused after the webhook (or forged
    /// reviews) must not keep a range drained; Services that are stored are confirmed within
    /// seconds and hardly count. Each replica counts from etcd every 2s plus what it admitted
    /// since, so a namespace may briefly exceed it by what the replicas admit in that time.
    #[arg(long, default_value_t = 1000)]
    pub max_pending_allocations_per_namespace: usize,
    /// How often every replica reads the ranges from etcd for its allocator gauges, its readiness
    /// and (leader) the ServicePool status.
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    pub allocation_usage_period: Duration,
}

/// What a running allocation hands the rest of the controller-manager.
pub struct Started {
    /// For the leader-only repair and releases.
    pub allocators: Arc<Ranges>,
    /// Every range's usage as last read from etcd.
    pub usage: watch::Receiver<Vec<RangeUsage>>,
    /// The webhook server task; it ends once [`Started::drain`] has stopped it.
    pub webhook: JoinHandle<()>,
    pub drain: Drain,
}

/// How long in-flight admission requests may take to finish once the webhook stops: as long as
/// the apiserver waits for an answer (the configuration's timeout, 15 s). With the drain's
/// `--webhook-shutdown-delay` (20 s) this is the 35 s a replica may take to stop after SIGTERM;
/// the Deployment's grace period (40 s) is longer.
const WEBHOOK_GRACE: Duration = Duration::from_secs(15);

/// Once the EndpointSlices no longer list this replica as ready, it keeps serving at least this
/// long, and until no connection has come for [`DRAIN_QUIET`]: node proxies apply the change
/// within a sync (seconds on a busy node), and whatever they still send here is served. (A
/// proxy slower than that which sends no connection meanwhile is not seen; the settle time is
/// what covers it.)
const DRAIN_SETTLE: Duration = Duration::from_secs(5);
const DRAIN_QUIET: Duration = Duration::from_secs(3);

impl AllocationArgs {
    pub fn enabled(&self) -> bool {
        !self.service_cluster_ip_range.is_empty()
    }
}

/// Starts the webhook and the usage monitor (every replica). `shutdown` stops the background
/// loops; the webhook server stops later, steered by [`Started::drain`] through `webhook`.
pub async fn start(
    args: &AllocationArgs,
    client: &Client,
    registry: &Registry,
    shutdown: CancellationToken,
    webhook: server::Control,
) -> anyhow::Result<Started> {
    if args.etcd_servers.is_empty() {
        bail!("--service-cluster-ip-range needs --etcd-servers: the allocation bitmaps live in etcd");
    }
    if args.service_cluster_ip_range.len() > 2 {
        bail!("--service-cluster-ip-range takes at most two CIDRs, one per family");
    }
    let etcd = connect(&EtcdOptions {
        endpoints: args.etcd_servers.clone(),
        prefix: args.etcd_prefix.clone(),
        ca_file: args.etcd_cafile.clone(),
        cert_file: args.etcd_certfile.clone(),
        key_file: args.etcd_keyfile.clone(),
        timeout: Duration::from_secs(5),
    })
    .await?;
    let mut families = Vec::new();
    let mut cluster_ips = BTreeMap::new();
    for cidr in &args.service_cluster_ip_range {
        let range: IpRange = cidr
            .parse()
            .with_context(|| format!("--service-cluster-ip-range {cidr}"))?;
        let family = if range.is_ipv6() {
            IpFamily::IPv6
        } else {
            IpFamily::IPv4
        };
        if cluster_ips.contains_key(&family) {
            bail!("--service-cluster-ip-range has two {} CIDRs", family.as_str());
        }
        let name = format!("clusterip/{}", range.to_string().replace('/', "-"));
        cluster_ips.insert(
            family,
            RangeStore::new(etcd.clone(), &args.etcd_prefix, &name, range, "IP"),
        );
        families.push(family);
    }
    let ports: PortRange = args
        .service_node_port_range
        .parse()
        .context("--service-node-port-range")?;
    let epoch = EpochKey::new(etcd.clone(), &args.etcd_prefix);
    let node_ports = RangeStore::new(etcd, &args.etcd_prefix, "nodeport", ports, "port");
    let families = ClusterFamilies(families);
    let allocators = Arc::new(Ranges {
        families: families.clone(),
        cluster_ips,
        node_ports,
        metrics: AllocatorMetrics::register(registry).context("registering allocator metrics")?,
        epoch,
        pending: PendingLimit::new(
            (args.max_pending_allocations_per_namespace > 0)
                .then_some(args.max_pending_allocations_per_namespace),
            args.allocation_reservation_ttl,
        ),
        repair_gate: tokio::sync::Mutex::new(()),
    });
    let (usage_tx, usage) = watch::channel(Vec::new());
    {
        let allocators = allocators.clone();
        let period = args.allocation_usage_period;
        let stop = shutdown.clone();
        tokio::spawn(async move {
            let metrics = allocators.metrics.clone();
            monitor(&allocators, &metrics, usage_tx, period, stop).await;
        });
    }

    let source = match (
        &args.webhook_tls_cert_file,
        &args.webhook_tls_key_file,
        &args.webhook_ca_file,
    ) {
        (Some(cert), Some(key), Some(ca)) => Source::Files {
            cert: cert.clone(),
            key: key.clone(),
            ca: ca.clone(),
        },
        _ => {
            let (namespace, name) = args
                .webhook_cert_secret
                .split_once('/')
                .context("--webhook-cert-secret must be namespace/name")?;
            Source::Secret {
                namespace: namespace.into(),
                name: name.into(),
                names: args.webhook_cert_names.clone(),
                configuration: args.webhook_configuration_name.clone(),
            }
        }
    };
    let cert = certs::load(client, &source).await?;
    let keys = server::ServingKeys::new(&cert).context("the webhook's serving certificate")?;
    {
        let (client, name, keys, stop) = (
            client.clone(),
            args.webhook_configuration_name.clone(),
            keys.clone(),
            shutdown.clone(),
        );
        tokio::spawn(async move { keep_certificates(&client, &source, &name, &keys, cert, stop).await });
    }
    let client_ca = match &args.webhook_client_ca_file {
        Some(path) => Some(
            std::fs::read_to_string(path)
                .with_context(|| format!("reading --webhook-client-ca-file {}", path.display()))?,
        ),
        None => None,
    };
    let tls = server::tls_config(keys, client_ca.as_deref()).context("the webhook's TLS configuration")?;
    if client_ca.is_some() {
        info!("webhook clients must present a certificate signed by --webhook-client-ca-file");
    }
    let state = Arc::new(WebhookState {
        allocators: allocators.clone(),
        families,
        limits: Limits {
            max_node_ports: (args.max_node_ports_per_service > 0).then_some(args.max_node_ports_per_service),
        },
        metrics: WebhookMetrics::register(registry).context("registering webhook metrics")?,
    });
    let listener = server::bind(args.webhook_bind_address).await?;
    let server = server::Server {
        tls,
        router: router(state),
        max_connection_age: args.webhook_max_connection_age,
        grace: WEBHOOK_GRACE,
        metrics: server::ConnectionMetrics::register(registry).context("registering webhook metrics")?,
    };
    let webhook = tokio::spawn(async move {
        if let Err(e) = server.serve(listener, webhook).await {
            warn!(error = format!("{e:#}"), "admission webhook server stopped");
        }
    });
    let drain = Drain {
        client: client.clone(),
        configuration: args.webhook_configuration_name.clone(),
        pod_ip: args.pod_ip,
        max: args.webhook_shutdown_delay,
        settle: DRAIN_SETTLE,
        quiet: DRAIN_QUIET,
    };
    Ok(Started {
        allocators,
        usage,
        webhook,
        drain,
    })
}

/// How often the certificates are checked for renewal (files re-read, the shared Secret read and
/// renewed when due) and the configuration's caBundle for the current CAs: the configuration may
/// be applied after the controller-manager starts, or re-applied without the bundle.
const CERTIFICATE_PERIOD: Duration = Duration::from_secs(10);

/// Serves the current certificate and keeps its CAs in the webhook configuration, now and every
/// [`CERTIFICATE_PERIOD`]. Every replica reads the same Secret, so they agree on the bundle.
async fn keep_certificates(
    client: &Client,
    source: &Source,
    name: &str,
    keys: &server::ServingKeys,
    mut current: certs::ServingCert,
    stop: CancellationToken,
) {
    loop {
        match certs::load(client, source).await {
            Ok(cert) if cert != current => match keys.replace(&cert) {
                Ok(()) => {
                    info!("serving the webhook's renewed certificate");
                    current = cert;
                }
                Err(e) => warn!(
                    error = format!("{e:#}"),
                    "the renewed webhook certificate is unusable; serving the previous one"
                ),
            },
            Ok(_) => {}
            Err(e) => warn!(
                error = format!("{e:#}"),
                "cannot check the webhook certificate for renewal"
            ),
        }
        patch_ca_bundle(client, name, &current.ca_pem).await;
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(CERTIFICATE_PERIOD) => {}
        }
    }
}

/// Writes the CA into every webhook of the configuration (when it exists), so the apiserver
/// trusts the serving certificate. Idempotent: every replica writes the same bundle, and nothing
/// when it is already there.
async fn patch_ca_bundle(client: &Client, name: &str, ca_pem: &str) {
    let api: Api<MutatingWebhookConfiguration> = Api::all(client.clone());
    let current = match api.get_opt(name).await {
        Ok(Some(c)) => c,
        Ok(None) => {
            debug!(name, "no MutatingWebhookConfiguration to put the CA into yet");
            return;
        }
        Err(e) => {
            warn!(name, error = %e, "cannot read the MutatingWebhookConfiguration");
            return;
        }
    };
    let bundle = k8s_openapi::ByteString(ca_pem.as_bytes().to_vec());
    let mut ops = Vec::new();
    for (i, w) in current.webhooks.iter().flatten().enumerate() {
        if w.client_config.ca_bundle.as_ref() != Some(&bundle) {
            ops.push(serde_json::json!({"op": "add", "path": format!("/webhooks/{i}/clientConfig/caBundle"), "value": bundle}));
        }
    }
    if ops.is_empty() {
        return;
    }
    let patch: Result<json_patch::Patch, _> = serde_json::from_value(serde_json::Value::Array(ops));
    match patch {
        Ok(p) => match api
            .patch(name, &PatchParams::default(), &Patch::Json::<()>(p))
            .await
        {
            Ok(_) => info!(name, "wrote the webhook CA into the MutatingWebhookConfiguration"),
            Err(e) => warn!(name, error = %e, "cannot write the webhook CA"),
        },
        Err(e) => warn!(error = %e, "building the caBundle patch"),
    }
}
