//! The allocation soak: two controller-manager replicas behind one webhook address, Service
//! creates and deletes going on, and meanwhile what production throws at them: the leader
//! killed (`kill -9`) three times, the leader stopped (SIGSTOP) past its lease, so that the
//! apiserver's calls to it time out, the allocation etcd killed and restarted twice, and one
//! create in ten refused after the webhook (by a second, validating webhook).
//!
//! Checked throughout: no value is ever held by two Services, and no create is refused because
//! the webhook handed out a value in use (the apiserver's own allocator still checks). At the
//! end, once the reservation TTL has passed and without a repair pass to help (the repair
//! interval is an hour), every bitmap in etcd equals what the stored Services hold, no
//! reservation is left, and the ServicePools show the same counts.
//!
//! The lease is shortened (4 s) so that the leader changes take seconds; reservations and
//! everything else run at their defaults. `hack/bench/soak.sh` runs it at 10,000 operations; the
//! test suite at a few hundred.

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    fmt,
    net::IpAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use futures::StreamExt;
use k8s_openapi::{
    api::{coordination::v1::Lease, core::v1::Service},
    apimachinery::pkg::apis::meta::v1::LabelSelector,
};
use kube::{
    Api, Client,
    api::{ListParams, PostParams},
};
use rand::Rng;
use svcplane_allocators::{IpRange, PortRange, etcd::RangeStore};

use crate::{
    ControlPlane, OwnedControlPlane, balancer::Balancer, etcd::Etcd, free_port, objects::numbered_service,
    process::Svcplane, test_namespace, validating, webhook,
};

pub const V4: &str = "10.96.0.0/16";
pub const V6: &str = "fd00:10:96::/112";
pub const PORTS: &str = "30000-32767";
const LEASE: Duration = Duration::from_secs(4);
/// The reservation TTL the replicas run with (the default).
const TTL: Duration = Duration::from_secs(60);

#[derive(Clone, Copy, Debug)]
pub struct Config {
    /// Creates and deletes, in all.
    pub operations: usize,
    /// Operations in flight at once.
    pub concurrency: usize,
}

/// What happened, and what went wrong.
#[derive(Debug, Default)]
pub struct Report {
    pub operations: usize,
    pub created: usize,
    pub deleted: usize,
    /// Creates the validating webhook refused (after svcplane allocated for them).
    pub refused_after_webhook: usize,
    /// Failed create attempts that were tried again, by what the error said.
    pub retried: BTreeMap<&'static str, usize>,
    /// What was done to the replicas and etcd, and when (seconds into the run).
    pub chaos: Vec<(f64, String)>,
    pub run: Duration,
    /// From the last operation until etcd matched the stored Services.
    pub settled_after: Option<Duration>,
    pub held: (usize, usize, usize),
    pub violations: Vec<String>,
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "soak: {} operations in {:.1}s: {} creates, {} deletes, {} refused after the webhook",
            self.operations,
            self.run.as_secs_f64(),
            self.created,
            self.deleted,
            self.refused_after_webhook
        )?;
        for (at, what) in &self.chaos {
            writeln!(f, "  {at:7.1}s  {what}")?;
        }
        writeln!(f, "  create attempts retried: {:?}", self.retried)?;
        writeln!(
            f,
            "  at the end Services hold {} IPv4, {} IPv6, {} NodePorts; etcd matched them {}",
            self.held.0,
            self.held.1,
            self.held.2,
            self.settled_after.map_or_else(
                || "never".to_owned(),
                |d| format!("{:.1}s after the last operation", d.as_secs_f64())
            )
        )?;
        write!(f, "  invariant violations: {}", self.violations.len())?;
        for v in &self.violations {
            write!(f, "\n    {v}")?;
        }
        Ok(())
    }
}

/// The values stored Services hold, each with the Services holding it.
#[derive(Default)]
pub struct Held {
    pub v4: BTreeMap<IpAddr, Vec<String>>,
    pub v6: BTreeMap<IpAddr, Vec<String>>,
    pub ports: BTreeMap<u16, Vec<String>>,
}

impl Held {
    /// Values held by more than one Service.
    pub fn duplicates(&self) -> Vec<String> {
        fn dups<K: fmt::Debug>(m: &BTreeMap<K, Vec<String>>) -> impl Iterator<Item = String> + '_ {
            m.iter()
                .filter(|(_, v)| v.len() > 1)
                .map(|(k, v)| format!("{k:?} held by {v:?}"))
        }
        dups(&self.v4)
            .chain(dups(&self.v6))
            .chain(dups(&self.ports))
            .collect()
    }
}

/// What every stored Service holds, from a consistent list.
pub async fn held(client: &Client) -> kube::Result<Held> {
    let mut h = Held::default();
    for svc in Api::<Service>::all(client.clone())
        .list(&ListParams::default())
        .await?
    {
        let name = format!(
            "{}/{}",
            svc.metadata.namespace.unwrap_or_default(),
            svc.metadata.name.unwrap_or_default()
        );
        let spec = svc.spec.unwrap_or_default();
        for ip in spec.cluster_ips.iter().flatten() {
            if let Ok(ip) = ip.parse::<IpAddr>() {
                let map = if ip.is_ipv6() { &mut h.v6 } else { &mut h.v4 };
                map.entry(ip).or_default().push(name.clone());
            }
        }
        let node_ports = spec.ports.iter().flatten().filter_map(|p| p.node_port);
        for np in node_ports.chain(spec.health_check_node_port) {
            if let Ok(np) = u16::try_from(np) {
                h.ports.entry(np).or_default().push(name.clone());
            }
        }
    }
    Ok(h)
}

/// IPv4, IPv6 and NodePort bitmaps.
pub type Stores = (
    Arc<RangeStore<IpRange>>,
    Arc<RangeStore<IpRange>>,
    Arc<RangeStore<PortRange>>,
);

/// The bitmaps of the ranges above (the local control plane's), under `/svcplane` in `etcd`.
pub fn stores(etcd: etcd_client::Client) -> Stores {
    let ip = |etcd, name: &str, cidr: &str| {
        RangeStore::new(etcd, "/svcplane", name, cidr.parse::<IpRange>().unwrap(), "IP")
    };
    (
        ip(etcd.clone(), "clusterip/10.96.0.0-16", V4),
        ip(etcd.clone(), "clusterip/fd00:10:96::-112", V6),
        RangeStore::new(
            etcd,
            "/svcplane",
            "nodeport",
            PORTS.parse::<PortRange>().unwrap(),
            "port",
        ),
    )
}

fn service(i: usize) -> Service {
    let mut svc = numbered_service(i, i.is_multiple_of(4), i.is_multiple_of(6));
    if i.is_multiple_of(10) {
        svc.metadata.labels = Some([(validating::DENY_LABEL.to_owned(), String::new())].into());
    }
    svc
}

/// What a failed create attempt's error says, in a word.
fn reason(e: &kube::Error) -> &'static str {
    let text = e.to_string();
    [
        ("etcd is unreachable", "etcd unreachable"),
        ("not initialized", "range not initialized"),
        ("GOAWAY", "connection closed (GOAWAY)"),
        ("deadline", "webhook timeout"),
        ("timeout", "webhook timeout"),
        ("Timeout", "webhook timeout"),
        ("connection refused", "replica down"),
        ("EOF", "connection closed (EOF)"),
        ("reset", "connection reset"),
        ("no longer leads", "leader changing"),
        ("--max-pending-allocations-per-namespace", "namespace limit"),
    ]
    .into_iter()
    .find(|(needle, _)| text.contains(needle))
    .map_or("other", |(_, r)| r)
}

/// The shared state of one run's workload.
struct Workload {
    api: Api<Service>,
    live: Mutex<Vec<String>>,
    done: AtomicUsize,
    created: AtomicUsize,
    deleted: AtomicUsize,
    refused: AtomicUsize,
    retried: Mutex<BTreeMap<&'static str, usize>>,
    violations: Mutex<Vec<String>>,
}

impl Workload {
    fn violation(&self, v: String) {
        eprintln!("soak: VIOLATION {v}");
        self.violations.lock().unwrap().push(v);
    }

    async fn op(&self, i: usize) {
        let victim = {
            let mut live = self.live.lock().unwrap();
            let mut rng = rand::rng();
            (!live.is_empty() && rng.random_bool(0.4)).then(|| {
                let at = rng.random_range(0..live.len());
                live.swap_remove(at)
            })
        };
        match victim {
            Some(name) => self.delete(&name).await,
            None => self.create(i).await,
        }
        self.done.fetch_add(1, Ordering::Relaxed);
    }

    async fn delete(&self, name: &str) {
        for _ in 0..60 {
            match self.api.delete(name, &Default::default()).await {
                Ok(_) => {
                    self.deleted.fetch_add(1, Ordering::Relaxed);
                    return;
                }
                Err(kube::Error::Api(s)) if s.code == 404 => return,
                Err(_) => tokio::time::sleep(Duration::from_millis(250)).await,
            }
        }
        self.violation(format!("{name} could not be deleted"));
    }

    /// Creates until stored or refused by the policy, as controllers and users retry.
    async fn create(&self, i: usize) {
        let svc = service(i);
        let name = format!("s{i}");
        for _ in 0..120 {
            match self.api.create(&PostParams::default(), &svc).await {
                Ok(_) => {
                    self.created.fetch_add(1, Ordering::Relaxed);
                    self.live.lock().unwrap().push(name);
                    return;
                }
                Err(kube::Error::Api(s)) if s.message.contains(validating::DENIED) => {
                    self.refused.fetch_add(1, Ordering::Relaxed);
                    return;
                }
                // Stored by an attempt whose answer was lost.
                Err(kube::Error::Api(s)) if s.code == 409 => {
                    self.created.fetch_add(1, Ordering::Relaxed);
                    self.live.lock().unwrap().push(name);
                    return;
                }
                Err(kube::Error::Api(s)) if s.message.contains("already allocated") => {
                    self.violation(format!(
                        "{name}: the webhook handed out a value in use: {}",
                        s.message
                    ));
                    return;
                }
                Err(e) => {
                    *self.retried.lock().unwrap().entry(reason(&e)).or_default() += 1;
                    tokio::time::sleep(Duration::from_millis(250)).await;
                }
            }
        }
        self.violation(format!("{name} could not be created in 120 attempts"));
    }
}

/// The replicas, restarted under new names (as a Deployment's new Pods) when killed.
struct Replicas<'a> {
    cp: &'a ControlPlane,
    kubeconfig: std::path::PathBuf,
    etcd_url: String,
    ports: [u16; 2],
    running: [Option<Svcplane>; 2],
    started: usize,
}

impl Replicas<'_> {
    fn start(&mut self, slot: usize) {
        let name = format!("cm-{}", self.started);
        self.started += 1;
        let args = [
            "--controllers=".to_owned(),
            format!("--service-cluster-ip-range={V4},{V6}"),
            format!("--service-node-port-range={PORTS}"),
            format!("--etcd-servers={}", self.etcd_url),
            format!("--webhook-bind-address=127.0.0.1:{}", self.ports[slot]),
            "--webhook-cert-names=127.0.0.1".to_owned(),
            // Repair would hide leaks: it must not run during the soak (its first pass of each
            // leader term frees nothing, leak counts starting afresh).
            "--allocation-repair-interval=1h".to_owned(),
            format!("--leader-elect-lease-duration={}s", LEASE.as_secs()),
            "--leader-elect-renew-deadline=3s".to_owned(),
            "--leader-elect-retry-period=500ms".to_owned(),
        ];
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        self.running[slot] = Some(Svcplane::controller_manager(
            &name,
            &self.kubeconfig,
            &self.cp.dir,
            &args,
        ));
    }

    /// The slot of the replica holding the Lease, if one of them does.
    async fn leader(&self, client: &Client) -> Option<usize> {
        let lease = Api::<Lease>::namespaced(client.clone(), "kube-system")
            .get("svcplane-controller-manager")
            .await
            .ok()?;
        let holder = lease.spec?.holder_identity?;
        self.running
            .iter()
            .position(|r| r.as_ref().is_some_and(|r| r.name == holder))
    }

    async fn wait_for_leader(&self, client: &Client) -> usize {
        for _ in 0..300 {
            if let Some(l) = self.leader(client).await {
                return l;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("no replica leads after 30s");
    }
}

pub async fn run(cfg: Config) -> Report {
    let owned = OwnedControlPlane::start("soak").unwrap();
    let cp = &owned.cp;
    let client = cp.client().await;
    let dir = cp.dir.join("allocation-etcd");
    std::fs::create_dir_all(&dir).unwrap();
    let mut etcd = Etcd::start(&dir).await;
    let ports = [free_port(), free_port()];
    let balancer = Balancer::on_loopback(&ports).await;
    // Calls to a stopped replica are cut by the apiserver after 3 s.
    webhook::register_with_timeout(&client, "svcplane", balancer.port, None, 3).await;
    let _policy = validating::start(&client, "policy", LabelSelector::default()).await;
    let kubeconfig = cp.install_controller_manager(&client).await;
    let mut replicas = Replicas {
        cp,
        kubeconfig,
        etcd_url: etcd.url(),
        ports,
        running: [None, None],
        started: 0,
    };
    replicas.start(0);
    replicas.start(1);
    for r in replicas.running.iter().flatten() {
        crate::eventually(Duration::from_secs(60), "both replicas ready", || async {
            (r.readyz().await?.0 == 200).then_some(())
        })
        .await;
    }

    let ns = test_namespace(&client, "soak").await;
    let work = Workload {
        api: Api::namespaced(client.clone(), &ns),
        live: Mutex::new(Vec::new()),
        done: AtomicUsize::new(0),
        created: AtomicUsize::new(0),
        deleted: AtomicUsize::new(0),
        refused: AtomicUsize::new(0),
        retried: Mutex::new(BTreeMap::new()),
        violations: Mutex::new(Vec::new()),
    };
    let finished = AtomicBool::new(false);
    let started = Instant::now();
    let mut chaos: Vec<(f64, String)> = Vec::new();

    let workload = async {
        futures::stream::iter(0..cfg.operations)
            .map(|i| work.op(i))
            .buffer_unordered(cfg.concurrency)
            .collect::<Vec<()>>()
            .await;
        finished.store(true, Ordering::Relaxed);
    };
    let checker = async {
        while !finished.load(Ordering::Relaxed) {
            if let Ok(h) = held(&client).await {
                for d in h.duplicates() {
                    work.violation(format!("held twice: {d}"));
                }
            }
            tokio::time::sleep(Duration::from_secs(2)).await;
        }
    };
    let disorder = async {
        let plan: [(f64, &str); 7] = [
            (0.10, "kill -9 the leader"),
            (0.20, "kill etcd, restart it 3s later"),
            (0.30, "kill -9 the leader"),
            (0.45, "SIGSTOP the leader past its lease, SIGCONT"),
            (0.55, "kill etcd, restart it 3s later"),
            (0.70, "kill -9 the leader"),
            (0.80, "(all back)"),
        ];
        for (at, what) in plan {
            while (work.done.load(Ordering::Relaxed) as f64) < at * cfg.operations as f64 {
                if finished.load(Ordering::Relaxed) {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            let t = started.elapsed().as_secs_f64();
            let detail = if what.starts_with("kill -9") {
                let l = replicas.wait_for_leader(&client).await;
                let name = replicas.running[l].as_ref().map(|r| r.name.clone());
                if let Some(mut r) = replicas.running[l].take() {
                    r.kill_hard();
                }
                tokio::time::sleep(Duration::from_secs(1)).await;
                replicas.start(l);
                format!("{what} ({name:?}), replaced")
            } else if what.starts_with("kill etcd") {
                etcd.kill();
                tokio::time::sleep(Duration::from_secs(3)).await;
                etcd.resume().await;
                what.to_owned()
            } else if what.starts_with("SIGSTOP") {
                let l = replicas.wait_for_leader(&client).await;
                let r = replicas.running[l].as_ref().unwrap();
                r.pause();
                tokio::time::sleep(LEASE + Duration::from_secs(3)).await;
                r.resume();
                format!("{what} ({})", r.name)
            } else {
                what.to_owned()
            };
            eprintln!("soak: {t:.1}s {detail}");
            chaos.push((t, detail));
        }
    };
    tokio::join!(workload, checker, disorder);
    let run_time = started.elapsed();

    // The end: within the TTL and a little, with no repair pass, etcd holds exactly what the
    // stored Services hold.
    let store_client = etcd_client::Client::connect([etcd.url()], None).await.unwrap();
    let (v4, v6, np) = stores(store_client);
    let ended = Instant::now();
    let mut settled_after = None;
    let mut last = String::new();
    let mut final_held = Held::default();
    while ended.elapsed() < TTL + Duration::from_secs(45) {
        let Ok(h) = held(&client).await else { continue };
        let want_v4: HashSet<IpAddr> = h.v4.keys().copied().collect();
        let want_v6: HashSet<IpAddr> = h.v6.keys().copied().collect();
        let want_ports: HashSet<u16> = h.ports.keys().copied().collect();
        let read = async {
            let got_v4: HashSet<IpAddr> = v4.read().await.ok()??.0.values().collect();
            let got_v6: HashSet<IpAddr> = v6.read().await.ok()??.0.values().collect();
            let got_ports: HashSet<u16> = np.read().await.ok()??.0.values().collect();
            let reserved = v4.reservations().await.ok()?.len()
                + v6.reservations().await.ok()?.len()
                + np.reservations().await.ok()?.len();
            Some((got_v4, got_v6, got_ports, reserved))
        };
        if let Some((got_v4, got_v6, got_ports, reserved)) = read.await {
            for (what, missing) in [
                ("IPv4", want_v4.difference(&got_v4).count()),
                ("IPv6", want_v6.difference(&got_v6).count()),
                ("NodePort", want_ports.difference(&got_ports).count()),
            ] {
                if missing > 0 {
                    work.violation(format!(
                        "{missing} {what} values held by Services are free in etcd"
                    ));
                }
            }
            last = format!(
                "etcd holds {} IPv4, {} IPv6, {} NodePorts and {reserved} reservations; Services hold {}, {}, {}",
                got_v4.len(),
                got_v6.len(),
                got_ports.len(),
                want_v4.len(),
                want_v6.len(),
                want_ports.len()
            );
            if got_v4 == want_v4 && got_v6 == want_v6 && got_ports == want_ports && reserved == 0 {
                settled_after = Some(ended.elapsed());
                final_held = h;
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    if settled_after.is_none() {
        work.violation(format!(
            "etcd did not match the stored Services within the TTL and 45s: {last}"
        ));
    }
    if settled_after.is_some() {
        check_pools(cp, &final_held, &work).await;
    }
    let retried = work.retried.lock().unwrap().clone();
    let violations = std::mem::take(&mut *work.violations.lock().unwrap());
    Report {
        operations: cfg.operations,
        created: work.created.load(Ordering::Relaxed),
        deleted: work.deleted.load(Ordering::Relaxed),
        refused_after_webhook: work.refused.load(Ordering::Relaxed),
        retried,
        chaos,
        run: run_time,
        settled_after,
        held: (final_held.v4.len(), final_held.v6.len(), final_held.ports.len()),
        violations,
    }
}

/// The ServicePools show what the Services hold.
async fn check_pools(cp: &ControlPlane, held: &Held, work: &Workload) {
    let want: HashMap<&str, usize> = [
        (V4, held.v4.len()),
        (V6, held.v6.len()),
        (PORTS, held.ports.len()),
    ]
    .into();
    let mut seen = String::new();
    for _ in 0..60 {
        let out = cp
            .kubectl()
            .args([
                "get",
                "servicepools",
                "-o",
                "jsonpath={range .items[*]}{.spec.range} {.status.allocated}{\"\\n\"}{end}",
            ])
            .output()
            .unwrap();
        seen = String::from_utf8_lossy(&out.stdout).into_owned();
        let shown: HashMap<&str, usize> = seen
            .lines()
            .filter_map(|l| {
                let (range, n) = l.split_once(' ')?;
                Some((range, n.parse().ok()?))
            })
            .collect();
        if want.iter().all(|(r, n)| shown.get(r) == Some(n)) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    work.violation(format!(
        "the ServicePools do not show what Services hold ({want:?}): {seen}"
    ));
}
