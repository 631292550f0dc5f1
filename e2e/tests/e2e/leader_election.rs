//! Two controller-manager replicas, as separate processes, electing a leader through a real Lease
//! with the shipped RBAC and the default timings (15 s / 10 s / 2 s).

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use k8s_openapi::{api::coordination::v1::Lease, jiff::Timestamp};
use kube::{Api, Client};
use svcplane_e2e::{control_plane, eventually, process::Svcplane, proxy::Proxy, test_namespace};

const LEASE: &str = "svcplane-controller-manager";
const LEASE_DURATION: f64 = 15.0;
const RENEW_DEADLINE: f64 = 10.0;
const RETRY_PERIOD: f64 = 2.0;
/// Room for request latency and process scheduling on a loaded two-core machine.
const SLACK: f64 = 1.0;

/// A namespace holding the shipped ServiceAccount and leader-election RBAC (moved from
/// kube-system so tests do not share one Lease), and a directory for the replicas' logs.
struct Setup {
    client: Client,
    ns: String,
    dir: PathBuf,
}

impl Setup {
    async fn new(prefix: &str) -> Self {
        let cp = control_plane();
        let client = cp.client().await;
        let ns = test_namespace(&client, prefix).await;
        cp.apply_controller_manager_rbac(&ns);
        let dir = cp.dir.join(&ns);
        std::fs::create_dir_all(&dir).unwrap();
        Self { client, ns, dir }
    }

    async fn kubeconfig(&self, name: &str, via_port: Option<u16>) -> PathBuf {
        control_plane()
            .service_account_kubeconfig(
                &self.client,
                &self.ns,
                "svcplane-controller-manager",
                via_port,
                &self.dir.join(format!("{name}.kubeconfig")),
            )
            .await
    }

    async fn replica(&self, name: &str, via_port: Option<u16>) -> Svcplane {
        let kubeconfig = self.kubeconfig(name, via_port).await;
        Svcplane::controller_manager(
            name,
            &kubeconfig,
            &self.dir,
            &["--leader-elect-resource-namespace", &self.ns],
        )
    }

    async fn lease(&self) -> Option<Lease> {
        Api::<Lease>::namespaced(self.client.clone(), &self.ns)
            .get_opt(LEASE)
            .await
            .unwrap()
    }

    async fn holder(&self) -> Option<String> {
        self.lease()
            .await?
            .spec?
            .holder_identity
            .filter(|h| !h.is_empty())
    }

    fn log(&self, name: &str) -> String {
        std::fs::read_to_string(self.dir.join(format!("{name}.log"))).unwrap_or_default()
    }
}

fn spec_times(lease: &Lease) -> (Option<Timestamp>, Option<Timestamp>, i32) {
    let spec = lease.spec.as_ref().unwrap();
    (
        spec.acquire_time.as_ref().map(|t| t.0),
        spec.renew_time.as_ref().map(|t| t.0),
        spec.lease_transitions.unwrap_or(0),
    )
}

fn seconds_between(earlier: Timestamp, later: Timestamp) -> f64 {
    (later.as_microsecond() - earlier.as_microsecond()) as f64 / 1e6
}

/// Waits until one of `replicas` holds the lease and every replica's gauge agrees; returns the
/// leader's index.
async fn settled_leader(s: &Setup, replicas: &[&Svcplane]) -> usize {
    eventually(Duration::from_secs(30), "a single agreed leader", || async {
        let holder = s.holder().await?;
        let idx = replicas.iter().position(|r| r.name == holder)?;
        for (i, r) in replicas.iter().enumerate() {
            let want = if i == idx { 1.0 } else { 0.0 };
            if r.leader_status(LEASE).await? != want {
                return None;
            }
        }
        Some(idx)
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_leader_and_kill9_failover_within_lease_plus_retry() {
    let s = Setup::new("le-kill").await;
    let mut a = s.replica("replica-a", None).await;
    let mut b = s.replica("replica-b", None).await;
    let leader = settled_leader(&s, &[&a, &b]).await;

    // Stays settled: the follower never claims while the leader renews.
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert_eq!(
        settled_leader(&s, &[&a, &b]).await,
        leader,
        "leadership moved without a failure"
    );

    let (old, new) = if leader == 0 {
        (&mut a, &mut b)
    } else {
        (&mut b, &mut a)
    };
    old.kill_hard();
    // Read after the kill: the dead leader can no longer renew, so this is its last renewal.
    let before = s.lease().await.unwrap();
    let (_, last_renew, transitions) = spec_times(&before);
    let last_renew = last_renew.unwrap();

    let new_name = new.name.clone();
    let after = eventually(
        Duration::from_secs(40),
        "the survivor to take the lease",
        || async {
            let l = s.lease().await?;
            (l.spec.as_ref()?.holder_identity.as_deref() == Some(new_name.as_str())).then_some(l)
        },
    )
    .await;
    let (acquired, _, new_transitions) = spec_times(&after);
    let waited = seconds_between(last_renew, acquired.unwrap());
    eprintln!("kill -9: survivor took over {waited:.2}s after the last renewal");
    // Safety: nobody takes a lease before it expires (measured from the write it observed).
    assert!(
        waited >= LEASE_DURATION - 0.05,
        "took over after {waited:.2}s, before the lease expired"
    );
    // Liveness: the survivor wakes when the lease runs out, not up to a retry period later.
    assert!(
        waited <= LEASE_DURATION + RETRY_PERIOD + SLACK,
        "took over only after {waited:.2}s"
    );
    assert_eq!(new_transitions, transitions + 1);
    assert_eq!(new.leader_status(LEASE).await, Some(1.0));
    assert!(s.log(&new.name).contains("acquired the lease"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_releases_the_lease_for_a_fast_handover() {
    let s = Setup::new("le-term").await;
    let mut a = s.replica("replica-a", None).await;
    let mut b = s.replica("replica-b", None).await;
    let leader = settled_leader(&s, &[&a, &b]).await;
    let (old, new) = if leader == 0 {
        (&mut a, &mut b)
    } else {
        (&mut b, &mut a)
    };

    let term_at = Timestamp::now();
    let status = old.terminate().unwrap();
    assert!(status.success(), "clean shutdown exits 0, got {status:?}");
    let log = s.log(&old.name);
    assert!(log.contains("released the lease"), "no release in log:\n{log}");
    // The work stopped before the release was written.
    let stopped = log.find("leader-only work stopped").unwrap();
    assert!(
        stopped < log.find("released the lease").unwrap(),
        "released before stopping work:\n{log}"
    );

    let new_name = new.name.clone();
    let after = eventually(
        Duration::from_secs(20),
        "the survivor to take the released lease",
        || async {
            let l = s.lease().await?;
            (l.spec.as_ref()?.holder_identity.as_deref() == Some(new_name.as_str())).then_some(l)
        },
    )
    .await;
    let handover = seconds_between(term_at, spec_times(&after).0.unwrap());
    eprintln!("SIGTERM: handover {handover:.2}s after the signal");
    // Where the time went, should the bound below fail: the old leader's side of the handover.
    for line in log.lines().filter(|l| {
        l.contains("SIGTERM") || l.contains("leader-only work stopped") || l.contains("released the lease")
    }) {
        eprintln!("SIGTERM: {}: {line}", old.name);
    }
    // A released lease is taken at the next retry instead of after the lease duration.
    assert!(
        handover <= RETRY_PERIOD + 2.0 * SLACK,
        "handover took {handover:.2}s"
    );
    assert_eq!(new.leader_status(LEASE).await, Some(1.0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partitioned_leader_fences_itself_and_readiness_follows_the_apiserver() {
    let s = Setup::new("le-part").await;
    let apiserver: SocketAddr = format!("127.0.0.1:{}", control_plane().apiserver_port)
        .parse()
        .unwrap();
    let proxy = Proxy::start(apiserver).await;
    // `a` reaches the apiserver only through the proxy; it starts alone so that it leads.
    let a = s.replica("replica-a", Some(proxy.port)).await;
    eventually(Duration::from_secs(30), "replica-a to lead", || async {
        (s.holder().await.as_deref() == Some("replica-a") && a.leader_status(LEASE).await == Some(1.0))
            .then_some(())
    })
    .await;
    let ready = a.readyz().await.unwrap();
    assert_eq!(ready.0, 200, "{ready:?}");
    let b = s.replica("replica-b", None).await;
    eventually(Duration::from_secs(10), "replica-b to follow", || async {
        (b.leader_status(LEASE).await == Some(0.0)).then_some(())
    })
    .await;

    proxy.cut();
    let last_renew = spec_times(&s.lease().await.unwrap()).1.unwrap();

    // `a` reports itself unready while it cannot reach the apiserver...
    let unready = eventually(Duration::from_secs(10), "replica-a to turn unready", || async {
        a.readyz().await.filter(|(code, _)| *code != 200)
    })
    .await;
    assert_eq!(unready.0, 500);
    assert!(unready.1.contains("[-]apiserver failed"), "{}", unready.1);

    // ...stops its leader-only work at the renew deadline...
    eventually(Duration::from_secs(20), "replica-a to step down", || async {
        (a.leader_status(LEASE).await == Some(0.0)).then_some(())
    })
    .await;
    let stepped_down = Timestamp::now();
    let fenced_after = seconds_between(last_renew, stepped_down);
    eprintln!("partition: stepped down {fenced_after:.2}s after the last renewal");
    assert!(
        fenced_after <= RENEW_DEADLINE + RETRY_PERIOD + SLACK,
        "stepped down only {fenced_after:.2}s after its last renewal"
    );
    assert_eq!(
        s.holder().await.as_deref(),
        Some("replica-a"),
        "nobody may take the lease before it expires"
    );

    // ...and only then does `b` take over.
    let after = eventually(Duration::from_secs(30), "replica-b to take over", || async {
        let l = s.lease().await?;
        (l.spec.as_ref()?.holder_identity.as_deref() == Some("replica-b")).then_some(l)
    })
    .await;
    let acquired = spec_times(&after).0.unwrap();
    eprintln!(
        "partition: replica-b acquired {:.2}s after replica-a stepped down",
        seconds_between(stepped_down, acquired)
    );
    assert!(
        acquired > stepped_down,
        "replica-b acquired at {acquired} before replica-a stepped down at {stepped_down}"
    );
    assert!(seconds_between(last_renew, acquired) >= LEASE_DURATION - 0.05);

    // Reachable again: `a` becomes ready by itself and follows the new leader.
    proxy.restore();
    eventually(
        Duration::from_secs(15),
        "replica-a to become ready again",
        || async { (a.readyz().await?.0 == 200).then_some(()) },
    )
    .await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(a.leader_status(LEASE).await, Some(0.0));
    assert_eq!(b.leader_status(LEASE).await, Some(1.0));
    assert_eq!(s.holder().await.as_deref(), Some("replica-b"));
}

/// A task of the leader's work that panics ends the term: the lease is released at once (so the
/// other replica takes over at its next retry) and the campaign returns the failure, so the
/// process exits instead of leading with part of its work dead; the work is not restarted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicking_leader_task_gives_up_the_lease_and_ends_the_campaign() {
    use std::sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    };
    use svcplane_controllers::{
        leader::{ElectionConfig, Elector, Error, LeaderMetrics},
        runtime::Supervisor,
    };
    use tokio_util::sync::CancellationToken;

    let s = Setup::new("le-panic").await;
    let cfg = ElectionConfig {
        namespace: s.ns.clone(),
        name: LEASE.into(),
        identity: "panicking".into(),
        lease_duration: Duration::from_secs(15),
        renew_deadline: Duration::from_secs(10),
        retry_period: Duration::from_secs(2),
    };
    let metrics = LeaderMetrics::register(&prometheus::Registry::new()).unwrap();
    let elector = Elector::new(s.client.clone(), cfg, metrics).unwrap();
    let terms = Arc::new(AtomicUsize::new(0));
    let counted = terms.clone();
    let campaign = elector.run(CancellationToken::new(), move |stop| {
        counted.fetch_add(1, Ordering::SeqCst);
        async move {
            let mut group = Supervisor::new(&stop);
            let token = group.token();
            group.spawn("informer", async move { token.cancelled().await });
            group.spawn("reconcile", async {
                tokio::time::sleep(Duration::from_secs(3)).await;
                panic!("a bug in a reconcile");
            });
            group.supervise().await
        }
    });
    let outcome = tokio::time::timeout(Duration::from_secs(60), campaign)
        .await
        .expect("the campaign ends by itself");
    let ended = Timestamp::now();
    match outcome {
        Err(Error::WorkFailed(f)) => {
            assert_eq!(f.task, "reconcile");
            assert!(f.how.contains("a bug in a reconcile"), "{}", f.how);
        }
        other => panic!("expected the work's failure, got {other:?}"),
    }
    assert_eq!(
        terms.load(Ordering::SeqCst),
        1,
        "the failed work was not restarted"
    );
    let lease = s.lease().await.unwrap();
    assert_eq!(s.holder().await, None, "the lease was released: {lease:?}");
    if let (_, Some(released), _) = spec_times(&lease) {
        eprintln!(
            "panic: lease released {:.2}s before the campaign returned",
            seconds_between(released, ended)
        );
    }
}
