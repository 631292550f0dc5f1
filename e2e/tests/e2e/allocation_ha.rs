//! Allocation as it runs in production: two controller-manager replicas behind one webhook address
//! for every namespace, allocating from the apiserver's own ranges, with the shipped RBAC and CRDs
//! unmodified. A control plane of its own, since this webhook intercepts every Service create.

use std::{
    collections::HashSet,
    net::IpAddr,
    path::Path,
    sync::atomic::{AtomicUsize, Ordering},
    time::Duration,
};

use futures::StreamExt;
use k8s_openapi::{
    api::{
        coordination::v1::{Lease, LeaseSpec},
        core::v1::Service,
    },
    apimachinery::pkg::apis::meta::v1::MicroTime,
    jiff::Timestamp,
};
use kube::{
    Api,
    api::{ObjectMeta, PostParams},
};
use svcplane_e2e::{
    ControlPlane, OwnedControlPlane, balancer::Balancer, eventually, free_port, http::metric_value,
    objects::numbered_service, process::Svcplane, test_namespace, webhook,
};

use svcplane_e2e::soak::{PORTS, V4, V6, held, stores};

const SERVICES: usize = 500;
/// The leader is killed once this many creates have succeeded.
const KILL_AFTER: usize = 200;
/// The controller-manager's default `--allocation-reservation-ttl`.
const RESERVATION_TTL: Duration = Duration::from_secs(60);

fn service(i: usize) -> Service {
    numbered_service(i, i.is_multiple_of(5), i.is_multiple_of(7))
}

/// Creates until it succeeds: a request that reached the replica being killed fails (the webhook
/// fails closed), and the client tries again, as controllers and kubectl users do.
async fn create_until_done(api: &Api<Service>, svc: &Service, failures: &AtomicUsize) -> Service {
    let mut last = None;
    for _ in 0..100 {
        match api.create(&PostParams::default(), svc).await {
            Ok(s) => return s,
            Err(kube::Error::Api(s)) if s.code == 409 => {
                // Stored by an attempt whose answer was lost.
                return api.get(svc.metadata.name.as_deref().unwrap()).await.unwrap();
            }
            Err(e) => {
                last = Some(e);
                failures.fetch_add(1, Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }
    panic!(
        "{:?} could not be created; last error: {last:?}",
        svc.metadata.name
    );
}

fn webhook_requests(metrics: &str) -> f64 {
    metric_value(
        metrics,
        "svcplane_allocation_webhook_requests_total{operation=\"create\",outcome=\"allocated\"}",
    )
    .unwrap_or(0.0)
}

/// A controller-manager replica `name` allocating from the test's ranges, its webhook on
/// loopback `port`, with `extra` arguments.
fn replica(cp: &ControlPlane, kubeconfig: &Path, name: &str, port: u16, extra: &[&str]) -> Svcplane {
    let args = [
        "--controllers=".to_owned(),
        format!("--service-cluster-ip-range={V4},{V6}"),
        format!("--service-node-port-range={PORTS}"),
        format!("--etcd-servers=http://127.0.0.1:{}", cp.etcd_port),
        format!("--webhook-bind-address=127.0.0.1:{port}"),
        "--webhook-cert-names=127.0.0.1".to_owned(),
        "--webhook-max-connection-age=100ms".to_owned(),
    ];
    let mut args: Vec<&str> = args.iter().map(String::as_str).collect();
    args.extend_from_slice(extra);
    Svcplane::controller_manager(name, kubeconfig, &cp.dir, &args)
}

/// A replica and its webhook port.
struct Replica {
    process: Svcplane,
    webhook_port: u16,
}

impl std::ops::Deref for Replica {
    type Target = Svcplane;

    fn deref(&self) -> &Svcplane {
        &self.process
    }
}

/// Two replicas at default settings behind one address, where the webhook is registered, both
/// ready.
async fn two_ready_replicas(cp: &ControlPlane, client: &kube::Client) -> (Balancer, [Replica; 2]) {
    let ports = [free_port(), free_port()];
    let balancer = Balancer::on_loopback(&ports).await;
    webhook::register(client, "svcplane", balancer.port, None).await;
    let kubeconfig = cp.install_controller_manager(client).await;
    let replicas = [("cm-a", ports[0]), ("cm-b", ports[1])].map(|(name, port)| Replica {
        process: replica(cp, &kubeconfig, name, port, &[]),
        webhook_port: port,
    });
    for r in &replicas {
        eventually(Duration::from_secs(60), "both replicas ready", || async {
            (r.readyz().await?.0 == 200).then_some(())
        })
        .await;
    }
    (balancer, replicas)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_behind_one_address_never_duplicate_even_when_the_leader_dies() {
    let owned = OwnedControlPlane::start("alloc-ha").unwrap();
    let cp = &owned.cp;
    let client = cp.client().await;
    let ports = [free_port(), free_port()];
    let balancer = Balancer::on_loopback(&ports).await;
    webhook::register(&client, "svcplane", balancer.port, None).await;

    // Someone else holds the Lease for a few seconds: no repair pass has run, so the ranges are
    // not initialized and neither replica may be ready to allocate.
    let now = MicroTime(Timestamp::now());
    let lease = Lease {
        metadata: ObjectMeta {
            name: Some("svcplane-controller-manager".into()),
            ..Default::default()
        },
        spec: Some(LeaseSpec {
            holder_identity: Some("elsewhere".into()),
            lease_duration_seconds: Some(6),
            acquire_time: Some(now.clone()),
            renew_time: Some(now),
            ..Default::default()
        }),
    };
    Api::<Lease>::namespaced(client.clone(), "kube-system")
        .create(&PostParams::default(), &lease)
        .await
        .unwrap();

    let kubeconfig = cp.install_controller_manager(&client).await;
    let fast = [
        "--allocation-repair-interval=2s",
        "--allocation-usage-period=500ms",
        "--leader-elect-lease-duration=4s",
        "--leader-elect-renew-deadline=3s",
        "--leader-elect-retry-period=500ms",
    ];
    let mut replicas = [
        replica(cp, &kubeconfig, "cm-a", ports[0], &fast),
        replica(cp, &kubeconfig, "cm-b", ports[1], &fast),
    ];

    let (code, body) = eventually(Duration::from_secs(20), "a readiness answer", || async {
        replicas[0].readyz().await
    })
    .await;
    assert_eq!(code, 500, "{body}");
    assert!(
        body.contains("[-]allocation-ranges failed") && body.contains("not initialized"),
        "{body}"
    );
    for r in &replicas {
        eventually(Duration::from_secs(60), "both replicas ready", || async {
            (r.readyz().await?.0 == 200).then_some(())
        })
        .await;
    }
    let leader_name = Api::<Lease>::namespaced(client.clone(), "kube-system")
        .get("svcplane-controller-manager")
        .await
        .unwrap()
        .spec
        .unwrap()
        .holder_identity
        .unwrap();
    let leader = replicas.iter().position(|r| r.name == leader_name).unwrap();
    let survivor = 1 - leader;

    // 500 creates, 50 at a time, through the one address; the leader is killed midway.
    let ns = test_namespace(&client, "ha").await;
    let api: Api<Service> = Api::namespaced(client.clone(), &ns);
    let done = AtomicUsize::new(0);
    let failures = AtomicUsize::new(0);
    let creates = futures::stream::iter(0..SERVICES)
        .map(|i| {
            let (api, done, failures) = (&api, &done, &failures);
            async move {
                let s = create_until_done(api, &service(i), failures).await;
                done.fetch_add(1, Ordering::Relaxed);
                s
            }
        })
        .buffer_unordered(50)
        .collect::<Vec<_>>();
    let kill = async {
        while done.load(Ordering::Relaxed) < KILL_AFTER {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let served = [
            webhook_requests(&replicas[0].metrics().await.unwrap_or_default()),
            webhook_requests(&replicas[1].metrics().await.unwrap_or_default()),
        ];
        replicas[leader].kill_hard();
        (served, std::time::Instant::now())
    };
    let (created, (served, killed_at)) = tokio::join!(creates, kill);
    assert_eq!(created.len(), SERVICES);
    assert!(
        served.iter().all(|n| *n > 0.0),
        "both replicas should have allocated before the kill: {served:?}"
    );
    eprintln!(
        "served before the kill: {served:?}; failed attempts retried: {}",
        failures.load(Ordering::Relaxed)
    );

    // Nothing is held twice, by any Service in the cluster.
    let h = held(&client).await.unwrap();
    assert!(h.duplicates().is_empty(), "{:?}", h.duplicates());
    assert_eq!(h.v6.len(), SERVICES.div_ceil(7));
    assert_eq!(h.ports.len(), SERVICES.div_ceil(5));

    // Nothing is lost: once the new leader has reclaimed what killed requests left behind,
    // each bitmap in etcd holds exactly what the Services hold. A request the dead leader had
    // allocated for when it died left its values reserved; they are freed when the reservation
    // expires (the default TTL, 60 s after the kill) and the sweeper (every 2 s) next runs, so
    // the wait is counted from the kill, with that much and a margin; the creates after the
    // kill may take only a few seconds.
    let etcd = etcd_client::Client::connect([format!("http://127.0.0.1:{}", cp.etcd_port)], None)
        .await
        .unwrap();
    let (v4, v6, np) = stores(etcd);
    let want_v4: HashSet<IpAddr> = h.v4.keys().copied().collect();
    let want_v6: HashSet<IpAddr> = h.v6.keys().copied().collect();
    let want_ports: HashSet<u16> = h.ports.keys().copied().collect();
    let since_kill = killed_at.elapsed();
    eventually(
        (RESERVATION_TTL + Duration::from_secs(30)).saturating_sub(since_kill),
        "the bitmaps to equal what Services hold",
        || async {
            let got_v4: HashSet<IpAddr> = v4.read().await.ok()??.0.values().collect();
            let got_v6: HashSet<IpAddr> = v6.read().await.ok()??.0.values().collect();
            let got_ports: HashSet<u16> = np.read().await.ok()??.0.values().collect();
            assert!(
                want_v4.is_subset(&got_v4),
                "an IPv4 held by a Service is free in etcd"
            );
            assert!(
                want_v6.is_subset(&got_v6),
                "an IPv6 held by a Service is free in etcd"
            );
            assert!(
                want_ports.is_subset(&got_ports),
                "a NodePort held by a Service is free in etcd"
            );
            (got_v4 == want_v4 && got_v6 == want_v6 && got_ports == want_ports).then_some(())
        },
    )
    .await;

    // The survivor leads, and says the same through its gauges and the ServicePool.
    let metrics = eventually(
        Duration::from_secs(30),
        "the survivor's gauges to settle",
        || async {
            let m = replicas[survivor].metrics().await?;
            let allocated = metric_value(
                &m,
                &format!("kube_apiserver_clusterip_allocator_allocated_ips{{cidr=\"{V4}\"}}"),
            )?;
            (allocated == want_v4.len() as f64).then_some(m)
        },
    )
    .await;
    assert_eq!(
        metric_value(
            &metrics,
            &format!("kube_apiserver_clusterip_allocator_available_ips{{cidr=\"{V4}\"}}")
        ),
        Some((65534 - want_v4.len()) as f64)
    );
    assert_eq!(
        metric_value(&metrics, "kube_apiserver_nodeport_allocator_allocated_ports"),
        Some(want_ports.len() as f64)
    );
    assert!(
        metric_value(
            &metrics,
            &format!(
                "kube_apiserver_clusterip_allocator_allocation_total{{cidr=\"{V4}\",scope=\"dynamic\"}}"
            )
        )
        .is_some_and(|n| n > 0.0)
    );
    eventually(Duration::from_secs(30), "the pool to show the usage", || async {
        let out = cp
            .kubectl()
            .args(["get", "servicepools", "--no-headers"])
            .output()
            .ok()?;
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let want = format!(
            "clusterip-10-96-0-0-16 ClusterIP {V4} 65534 {} {}",
            want_v4.len(),
            65534 - want_v4.len()
        );
        text.lines()
            .any(|l| l.split_whitespace().take(6).collect::<Vec<_>>().join(" ") == want)
            .then_some(())
    })
    .await;
}

/// With two replicas behind one address each allocates about half the values, and whichever
/// replica leads (only the leader releases): every delete frees its values within seconds, at
/// the default repair interval (3 min) and reservation TTL (60 s), which would each take far
/// longer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_delete_frees_its_values_within_seconds_whichever_replica_allocated() {
    const N: usize = 60;
    let owned = OwnedControlPlane::start("alloc-ha-delete").unwrap();
    let cp = &owned.cp;
    let client = cp.client().await;
    let (_balancer, replicas) = two_ready_replicas(cp, &client).await;
    let etcd = etcd_client::Client::connect([format!("http://127.0.0.1:{}", cp.etcd_port)], None)
        .await
        .unwrap();
    let (v4, v6, np) = stores(etcd);
    let before = held(&client).await.unwrap();

    let ns = test_namespace(&client, "ha-delete").await;
    let api: Api<Service> = Api::namespaced(client.clone(), &ns);
    let failures = AtomicUsize::new(0);
    // At least N, in bursts of 10, until both replicas have allocated: which replica a burst
    // reaches is the apiserver's and the balancer's choice (connections are recycled every
    // 100 ms; a short burst may ride one connection), and the point is that either replica's
    // allocations are freed.
    let mut created = 0;
    let served = loop {
        futures::stream::iter(created..created + 10)
            .map(|i| {
                let (api, failures) = (&api, &failures);
                async move { create_until_done(api, &service(i), failures).await }
            })
            .buffer_unordered(10)
            .collect::<Vec<_>>()
            .await;
        created += 10;
        let served = [
            webhook_requests(&replicas[0].metrics().await.unwrap_or_default()),
            webhook_requests(&replicas[1].metrics().await.unwrap_or_default()),
        ];
        if created >= N && served.iter().all(|n| *n > 0.0) {
            break served;
        }
        assert!(
            created < 10 * N,
            "both replicas should have allocated: {served:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let during = held(&client).await.unwrap();
    assert!(
        during.v4.len() >= before.v4.len() + created,
        "{} IPv4 held",
        during.v4.len()
    );

    // Delete them all; the bitmaps return to what the remaining Services hold.
    futures::stream::iter(0..created)
        .map(|i| {
            let api = &api;
            async move { api.delete(&format!("s{i}"), &Default::default()).await.unwrap() }
        })
        .buffer_unordered(10)
        .collect::<Vec<_>>()
        .await;
    let deleted_at = std::time::Instant::now();
    let want_v4: HashSet<IpAddr> = before.v4.keys().copied().collect();
    let want_v6: HashSet<IpAddr> = before.v6.keys().copied().collect();
    let want_ports: HashSet<u16> = before.ports.keys().copied().collect();
    let left = loop {
        let got_v4: HashSet<IpAddr> = v4.read().await.unwrap().unwrap().0.values().collect();
        let got_v6: HashSet<IpAddr> = v6.read().await.unwrap().unwrap().0.values().collect();
        let got_ports: HashSet<u16> = np.read().await.unwrap().unwrap().0.values().collect();
        if got_v4 == want_v4 && got_v6 == want_v6 && got_ports == want_ports {
            break None;
        }
        if deleted_at.elapsed() > Duration::from_secs(10) {
            break Some(format!(
                "IPv4 {:?}, IPv6 {:?}, NodePorts {:?}",
                got_v4.difference(&want_v4).collect::<Vec<_>>(),
                got_v6.difference(&want_v6).collect::<Vec<_>>(),
                got_ports.difference(&want_ports).collect::<Vec<_>>(),
            ));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(
        left.is_none(),
        "still allocated 10s after the deletes (served by replica: {served:?}): {left:?}"
    );
    eprintln!(
        "{created} Services allocated by both replicas ({served:?} requests), all freed {:.2}s after the deletes",
        deleted_at.elapsed().as_secs_f64()
    );
}

/// The certificate a webhook replica on `port` serves, PEM, as `openssl s_client` receives it.
fn served_certificate(port: u16) -> Option<String> {
    let out = std::process::Command::new("sh")
        .arg("-c")
        .arg(format!(
            "openssl s_client -connect 127.0.0.1:{port} </dev/null 2>/dev/null | openssl x509"
        ))
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

/// A serving certificate near its end is renewed by the replicas, from the CA they share, and
/// served by both without a failed create: renewal before expiry, one CA for all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_serving_certificate_near_its_end_is_renewed_and_served_without_a_failed_create() {
    use k8s_openapi::{ByteString, api::core::v1::Secret};
    let owned = OwnedControlPlane::start("alloc-ha-renew").unwrap();
    let cp = &owned.cp;
    let client = cp.client().await;
    let (_balancer, replicas) = two_ready_replicas(cp, &client).await;
    let ports = replicas.each_ref().map(|r| r.webhook_port);

    // A serving certificate from the shared CA with 30 days left, as if a year had passed.
    let secrets: Api<Secret> = Api::namespaced(client.clone(), "kube-system");
    let mut secret = secrets.get("svcplane-webhook-tls").await.unwrap();
    let field = |s: &Secret, k: &str| String::from_utf8(s.data.as_ref().unwrap()[k].0.clone()).unwrap();
    let (ca_pem, ca_key) = (field(&secret, "ca.crt"), field(&secret, "ca.key"));
    let issuer =
        rcgen::Issuer::from_ca_cert_pem(&ca_pem, rcgen::KeyPair::from_pem(&ca_key).unwrap()).unwrap();
    let key = rcgen::KeyPair::generate().unwrap();
    let mut params = rcgen::CertificateParams::new(vec!["127.0.0.1".to_owned()]).unwrap();
    params.not_after = time::OffsetDateTime::now_utc() + time::Duration::days(30);
    let old = params.signed_by(&key, &issuer).unwrap().pem();
    let data = secret.data.as_mut().unwrap();
    data.insert("tls.crt".into(), ByteString(old.clone().into_bytes()));
    data.insert("tls.key".into(), ByteString(key.serialize_pem().into_bytes()));
    secrets
        .replace("svcplane-webhook-tls", &PostParams::default(), &secret)
        .await
        .unwrap();

    // Creates go on throughout; none fails.
    let ns = test_namespace(&client, "renew").await;
    let api: Api<Service> = Api::namespaced(client.clone(), &ns);
    let started = std::time::Instant::now();
    let mut created = 0;
    let renewed = loop {
        api.create(&PostParams::default(), &service(created))
            .await
            .unwrap_or_else(|e| panic!("create {created} failed during the renewal: {e}"));
        created += 1;
        let now = field(&secrets.get("svcplane-webhook-tls").await.unwrap(), "tls.crt");
        let served: Vec<Option<String>> = ports.iter().map(|p| served_certificate(*p)).collect();
        if now != old && served.iter().all(|s| s.as_deref() == Some(now.trim())) {
            break now;
        }
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "not renewed and served by both replicas within 60s"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    // The same CA signed it, and the configuration still trusts that CA alone.
    assert_eq!(
        field(&secrets.get("svcplane-webhook-tls").await.unwrap(), "ca.crt"),
        ca_pem
    );
    assert_ne!(renewed, old);
    for _ in 0..10 {
        api.create(&PostParams::default(), &service(created))
            .await
            .unwrap();
        created += 1;
    }
    eprintln!(
        "renewed and served by both replicas {:.1}s after the certificate was found near its end; {created} creates, none failed",
        started.elapsed().as_secs_f64()
    );
}
