//! ClusterIP and NodePort allocation through svcplane's mutating webhook, registered with the real
//! apiserver, with the bitmaps in the real etcd.
//!
//! The webhook here is scoped to the test's namespace (namespaceSelector), and allocates from
//! sub-ranges the apiserver keeps for user-chosen values (the static bands of its own ranges), so
//! Services other tests create through the apiserver's own allocator can never collide with it.

use std::{collections::HashSet, net::IpAddr, time::Duration};

use k8s_openapi::{
    api::core::v1::{Namespace, Service, ServicePort, ServiceSpec},
    apimachinery::pkg::apis::meta::v1::LabelSelector,
};
use kube::{
    Api, Client,
    api::{ObjectMeta, Patch, PatchParams, PostParams},
};
use svcplane_allocators::{IpRange, PortRange, etcd::RangeStore};
use svcplane_e2e::{
    control_plane, etcd::Etcd, eventually, free_port, process::Svcplane, test_namespace, validating, webhook,
};

/// Ranges of one test; tests running at once use disjoint ones, as two clusters would.
struct Ranges {
    v4: &'static str,
    v6: &'static str,
    ports: &'static str,
}

const A: Ranges = Ranges {
    v4: "10.96.0.0/26",
    v6: "fd00:10:96::/122",
    ports: "30000-30020",
};
const B: Ranges = Ranges {
    v4: "10.96.0.128/27",
    v6: "fd00:10:96::80/123",
    ports: "30041-30051",
};
const F: Ranges = Ranges {
    v4: "10.96.0.160/27",
    v6: "fd00:10:96::a0/123",
    ports: "30052-30062",
};
const C: Ranges = Ranges {
    v4: "10.96.0.64/27",
    v6: "fd00:10:96::40/123",
    ports: "30021-30030",
};
const E: Ranges = Ranges {
    v4: "10.96.0.96/27",
    v6: "fd00:10:96::60/123",
    ports: "30031-30040",
};
const D: Ranges = Ranges {
    v4: "10.96.0.192/26",
    v6: "fd00:10:96::c0/122",
    ports: "30063-30085",
};

struct Bed {
    client: Client,
    ns: String,
    /// The webhook's port on loopback.
    port: u16,
    prefix: String,
    v4: &'static str,
    ports: &'static str,
    etcd_url: String,
    cm: Svcplane,
}

impl Bed {
    async fn new(ranges: &Ranges) -> Self {
        Self::with_args(ranges, &[]).await
    }

    async fn with_args(ranges: &Ranges, extra: &[&str]) -> Self {
        let etcd = format!("http://127.0.0.1:{}", control_plane().etcd_port);
        Self::build(ranges, etcd, None, extra).await
    }

    /// A controller-manager allocating from `ranges` with its bitmaps in the etcd at `etcd_url`
    /// under `prefix` (default: one of the namespace's own), acting with the shipped RBAC, its
    /// webhook registered for the test's namespace only.
    async fn build(ranges: &Ranges, etcd_url: String, prefix: Option<&str>, extra: &[&str]) -> Self {
        let cp = control_plane();
        let client = cp.client().await;
        let ns = test_namespace(&client, "alloc").await;
        let patch = serde_json::json!({"metadata": {"labels": {"svcplane-webhook-test": ns}}});
        Api::<Namespace>::all(client.clone())
            .patch(&ns, &PatchParams::default(), &Patch::Merge(&patch))
            .await
            .unwrap();
        let port = free_port();
        let only_this_namespace = LabelSelector {
            match_labels: Some([("svcplane-webhook-test".to_owned(), ns.clone())].into()),
            ..Default::default()
        };
        webhook::register(
            &client,
            &format!("svcplane-{ns}"),
            port,
            Some(only_this_namespace),
        )
        .await;
        let prefix = prefix.map_or_else(|| format!("/svcplane-{ns}"), str::to_owned);
        let dir = cp.dir.join(&ns);
        std::fs::create_dir_all(&dir).unwrap();
        cp.apply_crds();
        cp.apply_controller_manager_rbac(&ns);
        let kubeconfig = cp
            .service_account_kubeconfig(
                &client,
                &ns,
                "svcplane-controller-manager",
                None,
                &dir.join("sa.kubeconfig"),
            )
            .await;
        let args = [
            "--leader-elect-resource-namespace".to_owned(),
            ns.clone(),
            "--controllers=".to_owned(),
            format!("--service-cluster-ip-range={},{}", ranges.v4, ranges.v6),
            format!("--service-node-port-range={}", ranges.ports),
            format!("--etcd-servers={etcd_url}"),
            format!("--etcd-prefix={prefix}"),
            format!("--webhook-bind-address=127.0.0.1:{port}"),
            format!("--webhook-cert-secret={ns}/svcplane-webhook-tls"),
            "--webhook-cert-names=127.0.0.1".to_owned(),
            format!("--webhook-configuration-name=svcplane-{ns}"),
        ];
        let mut args: Vec<&str> = args.iter().map(String::as_str).collect();
        args.extend_from_slice(extra);
        let cm = Svcplane::controller_manager("alloc", &kubeconfig, &dir, &args);
        let bed = Self {
            client,
            ns,
            port,
            prefix,
            v4: ranges.v4,
            ports: ranges.ports,
            etcd_url,
            cm,
        };
        // Ready once the repair pass initialized the ranges and the apiserver trusts the webhook.
        eventually(Duration::from_secs(60), "the webhook to allocate", || async {
            let svc = bed.create(&bed.service("probe", |_| {})).await.ok()?;
            bed.services().delete("probe", &Default::default()).await.ok()?;
            Some(svc)
        })
        .await;
        bed
    }

    /// Sends the webhook an AdmissionReview no apiserver sent (a NodePort Service `name` in the
    /// test's namespace) from curl, presenting the client certificate `as_cert` (a name under
    /// the control plane's pki/) if given; the response body, or why it failed.
    fn forge(&self, name: &str, as_cert: Option<&str>) -> Result<String, String> {
        let review = serde_json::json!({
            "apiVersion": "admission.k8s.io/v1",
            "kind": "AdmissionReview",
            "request": {
                "uid": format!("forged-{name}"),
                "kind": {"group": "", "version": "v1", "kind": "Service"},
                "resource": {"group": "", "version": "v1", "resource": "services"},
                "namespace": self.ns,
                "name": name,
                "operation": "CREATE",
                "userInfo": {"username": "mallory"},
                "object": {
                    "apiVersion": "v1", "kind": "Service",
                    "metadata": {"name": name, "namespace": self.ns},
                    "spec": {"type": "NodePort", "ports": [{"port": 80, "protocol": "TCP"}]}
                },
                "dryRun": false
            }
        });
        let pki = control_plane().dir.join("pki");
        let mut curl = std::process::Command::new("curl");
        curl.args(["-sS", "-k", "--fail", "--max-time", "10", "-X", "POST"])
            .args(["-H", "Content-Type: application/json", "--data-binary"])
            .arg(review.to_string())
            .arg(format!("https://127.0.0.1:{}/mutate-services", self.port));
        if let Some(cert) = as_cert {
            curl.arg("--cert")
                .arg(pki.join(format!("{cert}.crt")))
                .arg("--key")
                .arg(pki.join(format!("{cert}.key")));
        }
        let out = curl.output().map_err(|e| e.to_string())?;
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        } else {
            Err(String::from_utf8_lossy(&out.stderr).into_owned())
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(control_plane().dir.join(&self.ns).join("alloc.log")).unwrap_or_default()
    }

    fn services(&self) -> Api<Service> {
        Api::namespaced(self.client.clone(), &self.ns)
    }

    fn service(&self, name: &str, f: impl FnOnce(&mut ServiceSpec)) -> Service {
        let mut spec = ServiceSpec {
            ports: Some(vec![ServicePort {
                name: Some("http".into()),
                port: 80,
                ..Default::default()
            }]),
            selector: Some([("app".to_owned(), name.to_owned())].into()),
            ..Default::default()
        };
        f(&mut spec);
        Service {
            metadata: ObjectMeta {
                name: Some(name.into()),
                ..Default::default()
            },
            spec: Some(spec),
            ..Default::default()
        }
    }

    async fn create(&self, svc: &Service) -> Result<Service, kube::Error> {
        self.services().create(&PostParams::default(), svc).await
    }

    async fn etcd(&self) -> etcd_client::Client {
        etcd_client::Client::connect([self.etcd_url.clone()], None)
            .await
            .unwrap()
    }

    async fn ports_store(&self) -> std::sync::Arc<RangeStore<PortRange>> {
        let range: PortRange = self.ports.parse().unwrap();
        RangeStore::new(self.etcd().await, &self.prefix, "nodeport", range, "port")
    }

    async fn v4_store(&self) -> std::sync::Arc<RangeStore<IpRange>> {
        let etcd = self.etcd().await;
        let range: IpRange = self.v4.parse().unwrap();
        RangeStore::new(
            etcd,
            &self.prefix,
            &format!("clusterip/{}", self.v4.replace('/', "-")),
            range,
            "IP",
        )
    }
}

fn cluster_ips(svc: &Service) -> Vec<IpAddr> {
    svc.spec
        .as_ref()
        .unwrap()
        .cluster_ips
        .iter()
        .flatten()
        .map(|s| s.parse().unwrap())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_webhook_allocates_distinct_ips_and_ports_from_etcd() {
    // Only the apiserver may call: clients must present a certificate from the CA the control
    // plane's apiserver has its webhook client certificate from (its AdmissionConfiguration).
    let ca = control_plane().dir.join("pki/webhook-client-ca.crt");
    let only_the_apiserver = format!("--webhook-client-ca-file={}", ca.display());
    let mut bed = Bed::with_args(&A, &[&only_the_apiserver]).await;
    let v4: IpRange = A.v4.parse().unwrap();
    let v6: IpRange = A.v6.parse().unwrap();

    // 40 Services at once: distinct IPs, all from svcplane's range, all in the bitmap in etcd.
    let svcs: Vec<Service> = (0..40).map(|i| bed.service(&format!("s{i}"), |_| {})).collect();
    let created = futures::future::join_all(svcs.iter().map(|s| bed.create(s))).await;
    let mut ips = HashSet::new();
    for c in created {
        let c = c.unwrap();
        let ip = cluster_ips(&c)[0];
        assert!(v4.contains(ip), "{ip} is not from {}", A.v4);
        assert!(ips.insert(ip), "{ip} twice");
    }
    let (stored, _) = bed.v4_store().await.read().await.unwrap().unwrap();
    let in_etcd: HashSet<IpAddr> = stored.values().collect();
    assert!(ips.is_subset(&in_etcd), "every allocated IP is marked in etcd");

    // Dual-stack: one IP per family.
    let dual = bed
        .create(&bed.service("dual", |s| s.ip_family_policy = Some("PreferDualStack".into())))
        .await
        .unwrap();
    let dual_ips = cluster_ips(&dual);
    assert_eq!(dual_ips.len(), 2);
    assert!(
        v4.contains(dual_ips[0]) && v6.contains(dual_ips[1]),
        "{dual_ips:?}"
    );
    assert_eq!(
        dual.spec.as_ref().unwrap().ip_families.as_deref(),
        Some(&["IPv4".to_owned(), "IPv6".to_owned()][..])
    );

    // A chosen IP (from the static band, which dynamic allocation leaves alone while the rest
    // has room) is honoured; the same IP again is refused with the allocator's message.
    let chosen: IpAddr = "10.96.0.10".parse().unwrap();
    let own = bed
        .create(&bed.service("chosen", |s| s.cluster_ip = Some(chosen.to_string())))
        .await
        .unwrap();
    assert_eq!(cluster_ips(&own), [chosen]);
    let err = bed
        .create(&bed.service("chosen-again", |s| s.cluster_ip = Some(chosen.to_string())))
        .await
        .unwrap_err();
    assert!(
        err.to_string()
            .contains("provided IP 10.96.0.10 is already allocated"),
        "{err}"
    );

    // NodePorts from svcplane's range, one per port number across protocols.
    let np = bed
        .create(&bed.service("np", |s| {
            s.type_ = Some("NodePort".into());
            s.ports = Some(vec![
                ServicePort {
                    name: Some("dns".into()),
                    port: 53,
                    protocol: Some("UDP".into()),
                    ..Default::default()
                },
                ServicePort {
                    name: Some("dns-tcp".into()),
                    port: 53,
                    protocol: Some("TCP".into()),
                    ..Default::default()
                },
            ]);
        }))
        .await
        .unwrap();
    let node_ports: Vec<i32> = np
        .spec
        .unwrap()
        .ports
        .unwrap()
        .iter()
        .map(|p| p.node_port.unwrap())
        .collect();
    assert_eq!(node_ports[0], node_ports[1], "shared by TCP and UDP");
    assert!((30000..=30020).contains(&node_ports[0]), "{node_ports:?}");

    // A chosen NodePort is honoured; the same one again, or one outside svcplane's range, is
    // refused with the allocator's message.
    let chosen_port = |name: &str, port: i32| {
        bed.service(name, move |s| {
            s.type_ = Some("NodePort".into());
            s.ports = Some(vec![ServicePort {
                name: Some("http".into()),
                port: 80,
                node_port: Some(port),
                ..Default::default()
            }]);
        })
    };
    let own = bed.create(&chosen_port("np-chosen", 30005)).await.unwrap();
    assert_eq!(own.spec.unwrap().ports.unwrap()[0].node_port, Some(30005));
    let err = bed
        .create(&chosen_port("np-chosen-again", 30005))
        .await
        .unwrap_err();
    assert!(
        err.to_string()
            .contains("provided port 30005 is already allocated"),
        "{err}"
    );
    let err = bed.create(&chosen_port("np-outside", 31000)).await.unwrap_err();
    assert!(
        err.to_string().contains("31000") && err.to_string().contains("30000-30020"),
        "{err}"
    );

    // One Service cannot drain the range: 3,000 ports is over the default limit of 256.
    let huge = bed.service("huge", |s| {
        s.type_ = Some("NodePort".into());
        s.ports = Some(
            (1..=3000)
                .map(|p| ServicePort {
                    name: Some(format!("p{p}")),
                    port: p,
                    ..Default::default()
                })
                .collect(),
        );
    });
    let before_ports = bed.ports_store().await.read().await.unwrap().unwrap().0.used();
    let err = bed.create(&huge).await.unwrap_err();
    assert!(
        err.to_string()
            .contains("this Service needs 3000 NodePorts, more than the 256"),
        "{err}"
    );
    let after_ports = bed.ports_store().await.read().await.unwrap().unwrap().0.used();
    assert_eq!(before_ports, after_ports, "a refused Service took NodePorts");

    // A dry run reserves nothing.
    let before = bed.v4_store().await.read().await.unwrap().unwrap().0.used();
    let dry = PostParams {
        dry_run: true,
        ..Default::default()
    };
    bed.services()
        .create(&dry, &bed.service("dry", |_| {}))
        .await
        .unwrap();
    let after = bed.v4_store().await.read().await.unwrap().unwrap().0.used();
    assert_eq!(before, after, "a dry-run create allocated");

    // Every create above came from the apiserver through client-certificate verification. A
    // review forged by another client is refused in the handshake; with the apiserver's
    // certificate the same request is answered (the refusal was the certificate's).
    let err = bed
        .forge("forged", None)
        .expect_err("a client without a certificate was served");
    assert!(!err.is_empty());
    let answer = bed
        .forge("forged-as-apiserver", Some("webhook-client"))
        .expect("the apiserver's client certificate is accepted");
    assert!(answer.contains("\"allowed\":true"), "{answer}");

    // With the webhook down (failurePolicy: Fail), what needs no allocation still goes through,
    // by the shipped match conditions: an update of labels only, and a Service opted out.
    bed.cm.kill_hard();
    let label = serde_json::json!({"metadata": {"labels": {"tier": "web"}}});
    bed.services()
        .patch("np", &PatchParams::default(), &Patch::Merge(&label))
        .await
        .expect("a label-only update does not call the webhook");
    let mut opted_out = bed.service("opted-out", |_| {});
    opted_out.metadata.labels = Some([("svcplane.io/allocate".to_owned(), "false".to_owned())].into());
    bed.create(&opted_out)
        .await
        .expect("an opted-out Service does not call the webhook");
    // An update that needs values does, and fails closed.
    let to_node_port = serde_json::json!({"spec": {"type": "NodePort"}});
    let err = bed
        .services()
        .patch("dual", &PatchParams::default(), &Patch::Merge(&to_node_port))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("failed calling webhook"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_range_refuses_with_a_clear_message() {
    let bed = Bed::new(&B).await;
    // Fill what is left of the range (the probe Service's address is held until repair frees it).
    let mut created = 0;
    let err = loop {
        match bed.create(&bed.service(&format!("fill{created}"), |_| {})).await {
            Ok(_) => created += 1,
            Err(e) => break e,
        }
        assert!(created <= 30, "more Services than addresses");
    };
    assert!(err.to_string().contains("range 10.96.0.128/27 is full"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deletion_releases_and_an_orphan_is_reclaimed_by_the_next_repair() {
    let bed = Bed::with_args(&C, &["--allocation-repair-interval=1s"]).await;
    let store = bed.v4_store().await;
    let held = |ip: IpAddr| {
        let store = store.clone();
        async move { store.read().await.unwrap().unwrap().0.has(ip) }
    };

    // Deleting a Service frees its IP.
    let svc = bed.create(&bed.service("gone", |_| {})).await.unwrap();
    let ip = cluster_ips(&svc)[0];
    assert!(held(ip).await);
    bed.services().delete("gone", &Default::default()).await.unwrap();
    eventually(
        Duration::from_secs(20),
        "the deleted Service's IP to be released",
        || async { (!held(ip).await).then_some(()) },
    )
    .await;

    // A value marked with no Service holding it and no reservation covering it: what a Service
    // deleted while no leader watched leaves (its reservation was confirmed long ago).
    let leaked = match store
        .submit(svcplane_allocators::etcd::Op::AllocateNext)
        .await
        .unwrap()
    {
        svcplane_allocators::etcd::Done::Allocated(ip) => ip,
        other => panic!("{other:?}"),
    };
    let start = std::time::Instant::now();
    let mut reclaimed = false;
    for _ in 0..150 {
        if !held(leaked).await {
            reclaimed = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(reclaimed, "leak {leaked} not reclaimed; log:\n{}", bed.log());
    // On the next pass, not after three: nothing can be in flight without a reservation.
    assert!(
        start.elapsed() < Duration::from_secs(10),
        "reclaimed after {:?}",
        start.elapsed()
    );
    assert!(bed.log().contains("no reservation covers"), "{}", bed.log());
}

/// A Service refused after the webhook allocated for it (by schema validation, by a second,
/// validating webhook, by a ResourceQuota: all run after mutating admission), or a forged review,
/// gets its values back once their reservation expires, at the default TTL (60 s) and the
/// default repair interval (3 min, which alone would take 6-9 min). Meanwhile they count against
/// the namespace's limit of pending reservations.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn values_of_a_service_refused_after_the_webhook_return_within_the_reservation_ttl() {
    // Room for the four refused requests' eight values (and a probe's one, if still counted).
    let bed = Bed::with_args(&E, &["--max-pending-allocations-per-namespace=9"]).await;
    let (ips, ports) = (bed.v4_store().await, bed.ports_store().await);
    let node_port = |name: &str, port_name: &str| {
        bed.service(name, |s| {
            s.type_ = Some("NodePort".into());
            s.ports = Some(vec![ServicePort {
                name: Some(port_name.into()),
                port: 80,
                ..Default::default()
            }]);
        })
    };
    // An invalid port name: allocated for by the webhook, then refused by validation.
    let err = bed.create(&node_port("invalid", "Not_A_Name")).await.unwrap_err();
    assert!(err.to_string().contains("Not_A_Name"), "{err}");
    // A second webhook, validating (as policy engines are), refuses one: validating webhooks run
    // after every mutating one.
    let _policy = validating::start(
        &bed.client,
        &format!("policy-{}", bed.ns),
        LabelSelector {
            match_labels: Some([("svcplane-webhook-test".to_owned(), bed.ns.clone())].into()),
            ..Default::default()
        },
    )
    .await;
    let mut denied = node_port("denied", "http");
    denied.metadata.labels = Some([(validating::DENY_LABEL.to_owned(), String::new())].into());
    let err = bed.create(&denied).await.unwrap_err();
    assert!(err.to_string().contains(validating::DENIED), "{err}");
    // A quota of no NodePorts in the namespace: refused by the quota after the webhook.
    let quota: k8s_openapi::api::core::v1::ResourceQuota = serde_json::from_value(serde_json::json!({
        "metadata": {"name": "no-node-ports"},
        "spec": {"hard": {"services.nodeports": "0"}}
    }))
    .unwrap();
    let quotas: Api<k8s_openapi::api::core::v1::ResourceQuota> = Api::namespaced(bed.client.clone(), &bed.ns);
    quotas.create(&PostParams::default(), &quota).await.unwrap();
    // No kube-controller-manager here: the test computes the quota's status as its controller
    // would (the quota admission plugin decides from the status).
    let status = serde_json::json!({"status": {
        "hard": {"services.nodeports": "0"},
        "used": {"services.nodeports": "0"}
    }});
    quotas
        .patch_status("no-node-ports", &PatchParams::default(), &Patch::Merge(&status))
        .await
        .unwrap();
    let err = bed.create(&node_port("over-quota", "http")).await.unwrap_err();
    assert!(err.to_string().contains("exceeded quota"), "{err}");
    // Without client verification anyone reaching the port can have values allocated: a forged
    // review (no Service is ever stored) holds them for one TTL only, like the refused ones.
    let answer = bed
        .forge("forged", None)
        .expect("no client verification configured");
    assert!(answer.contains("\"allowed\":true"), "{answer}");
    let refused_at = std::time::Instant::now();
    // The namespace now holds as much as it may in reservations: more is refused, whatever the
    // range still has, until they are confirmed or expire.
    let err = bed.create(&node_port("throttled", "http")).await.unwrap_err();
    assert!(
        err.to_string()
            .contains("--max-pending-allocations-per-namespace"),
        "{err}"
    );

    // What the four requests were given is reserved for them and still held.
    let names = ["invalid", "denied", "over-quota", "forged"];
    let reserved_ips: Vec<IpAddr> = reserved_for(&ips, &bed.ns, &names).await;
    let reserved_ports: Vec<u16> = reserved_for(&ports, &bed.ns, &names).await;
    assert_eq!(reserved_ips.len(), 4, "{reserved_ips:?}");
    assert_eq!(reserved_ports.len(), 4, "{reserved_ports:?}");
    let (bitmap, _) = ips.read().await.unwrap().unwrap();
    assert!(reserved_ips.iter().all(|ip| bitmap.has(*ip)));

    // Back in the pool within the TTL and a sweep or two, records and all.
    let freed = loop {
        let ip_map = ips.read().await.unwrap().unwrap().0;
        let port_map = ports.read().await.unwrap().unwrap().0;
        let (ip_left, port_left) = (
            ips.reservations().await.unwrap(),
            ports.reservations().await.unwrap(),
        );
        let gone = reserved_ips.iter().all(|ip| !ip_map.has(*ip))
            && reserved_ports.iter().all(|p| !port_map.has(*p))
            && ip_left.is_empty()
            && port_left.is_empty();
        if gone {
            break refused_at.elapsed();
        }
        assert!(
            refused_at.elapsed() < Duration::from_secs(90),
            "not freed after 90s; reservations left {ip_left:?} {port_left:?}; log:\n{}",
            bed.log()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    eprintln!(
        "values of the refused Services freed {:.1}s after the refusals",
        freed.as_secs_f64()
    );
    assert!(
        freed >= Duration::from_secs(50),
        "freed after {freed:?}, before the TTL"
    );
    assert!(
        bed.log()
            .contains("reservation expired with no Service holding it"),
        "{}",
        bed.log()
    );
    // And the namespace has its room back.
    bed.create(&bed.service("after", |_| {})).await.unwrap();
}

/// The values of `store` reserved for the Services `names` of namespace `ns`.
async fn reserved_for<R>(store: &RangeStore<R>, ns: &str, names: &[&str]) -> Vec<R::Value>
where
    R: svcplane_allocators::Range + Clone + Send + Sync + 'static,
    R::Value: Send + Sync + 'static,
{
    store
        .reservations()
        .await
        .unwrap()
        .into_iter()
        .filter(|l| {
            l.reservation
                .as_ref()
                .is_some_and(|r| r.namespace == ns && names.contains(&r.name.as_str()))
        })
        .map(|l| l.value)
        .collect()
}

/// `kubectl get servicepool <name>` as a user runs it: header and row, split into columns.
fn kubectl_get_pool(name: &str) -> Option<(Vec<String>, Vec<String>)> {
    let out = control_plane()
        .kubectl()
        .args(["get", "servicepool", name])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let mut lines = text.lines();
    let split = |l: &str| l.split_whitespace().map(str::to_owned).collect::<Vec<_>>();
    Some((split(lines.next()?), split(lines.next()?)))
}

fn pool_message(name: &str) -> String {
    let out = control_plane()
        .kubectl()
        .args(["get", "servicepool", name, "-o", "jsonpath={.status.message}"])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_outages_refuse_naming_etcd_and_a_corrupt_bitmap_is_never_reset() {
    let dir = control_plane()
        .dir
        .join(format!("etcd-{:08x}", rand::random::<u32>()));
    std::fs::create_dir_all(&dir).unwrap();
    let mut etcd = Etcd::start(&dir).await;
    let bed = Bed::build(
        &D,
        etcd.url(),
        None,
        &[
            "--allocation-repair-interval=1s",
            "--allocation-usage-period=300ms",
        ],
    )
    .await;
    let store = bed.v4_store().await;
    let pool = "clusterip-10-96-0-192-26";

    // The pool shows the range's size and what the bitmap in etcd holds, as kubectl columns.
    bed.create(&bed.service("before", |_| {})).await.unwrap();
    eventually(
        Duration::from_secs(30),
        "the pool to match the bitmap",
        || async {
            let used = store.read().await.ok()??.0.used();
            let (header, row) = kubectl_get_pool(pool)?;
            assert_eq!(
                header,
                ["NAME", "TYPE", "RANGE", "SIZE", "ALLOCATED", "FREE", "AGE"]
            );
            (row[1..6]
                == [
                    "ClusterIP",
                    D.v4,
                    "62",
                    &used.to_string(),
                    &(62 - used).to_string(),
                ])
            .then_some(())
        },
    )
    .await;

    // etcd gone: creates are refused with a message naming etcd; the replica stays ready so
    // that the apiserver relays that message; the pool says why it cannot allocate.
    etcd.kill();
    let err = bed.create(&bed.service("during", |_| {})).await.unwrap_err();
    assert!(err.to_string().contains("etcd is unreachable"), "{err}");
    let (code, body) = bed.cm.readyz().await.unwrap();
    assert_eq!(code, 200, "{body}");
    eventually(
        Duration::from_secs(30),
        "the pool to report the outage",
        || async { pool_message(pool).contains("etcd is unreachable").then_some(()) },
    )
    .await;

    // etcd back: allocation works again by itself, and nothing allocated before was lost.
    etcd.resume().await;
    let after = eventually(
        Duration::from_secs(60),
        "creates to work after etcd restarts",
        || async { bed.create(&bed.service("after", |_| {})).await.ok() },
    )
    .await;
    let (stored, _) = store.read().await.unwrap().unwrap();
    let before = bed.services().get("before").await.unwrap();
    assert!(stored.has(cluster_ips(&before)[0]) && stored.has(cluster_ips(&after)[0]));
    eventually(Duration::from_secs(30), "the pool message to clear", || async {
        pool_message(pool).is_empty().then_some(())
    })
    .await;

    // A bitmap that does not decode stops allocation with an error naming the key, and neither
    // allocation nor three repair passes overwrite it.
    let mut kv = etcd_client::Client::connect([etcd.url()], None).await.unwrap();
    kv.put(store.key(), "not a bitmap", None).await.unwrap();
    let err = bed.create(&bed.service("corrupt", |_| {})).await.unwrap_err();
    assert!(
        err.to_string().contains("is corrupt") && err.to_string().contains(store.key()),
        "{err}"
    );
    tokio::time::sleep(Duration::from_secs(4)).await;
    let resp = kv.get(store.key(), None).await.unwrap();
    assert_eq!(
        resp.kvs()[0].value(),
        b"not a bitmap",
        "the corrupt bitmap was overwritten"
    );
    assert!(pool_message(pool).contains("corrupt"), "{}", pool_message(pool));
    let metrics = bed.cm.metrics().await.unwrap();
    let errors = svcplane_e2e::http::metric_value(
        &metrics,
        &format!(
            "kube_apiserver_clusterip_allocator_allocation_errors_total{{cidr=\"{}\",scope=\"dynamic\"}}",
            D.v4
        ),
    );
    assert!(
        errors.is_some_and(|e| e >= 2.0),
        "allocation errors not counted: {errors:?}"
    );
    assert!(
        svcplane_e2e::http::metric_value(&metrics, "apiserver_clusterip_repair_reconcile_errors_total")
            .is_some_and(|e| e >= 1.0),
        "repair did not report the corrupt range"
    );
}

/// etcd with authentication on, as a platform team runs it: svcplane's client certificate is
/// user `svcplane`, whose one role (made by `hack/etcd-user.sh`, as the README says) covers its
/// `--etcd-prefix` and nothing else. svcplane allocates, repairs and releases with it, and the
/// same identity is refused the apiserver's `/registry`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_etcd_authentication_a_role_on_the_prefix_alone_is_enough() {
    const PREFIX: &str = "/svcplane-least-privilege";
    let dir = control_plane()
        .dir
        .join(format!("etcd-auth-{:08x}", rand::random::<u32>()));
    let etcd = Etcd::start_secure(&dir).await;
    let as_root = |args: &[&str]| {
        let out = etcd.etcdctl("root", args);
        assert!(
            out.status.success(),
            "etcdctl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    as_root(&["user", "add", "root", "--no-password"]);
    as_root(&["user", "grant-role", "root", "root"]);
    let mut script = std::process::Command::new(svcplane_e2e::repo_root().join("hack/etcd-user.sh"));
    etcd.etcdctl_env(&mut script, "root");
    let out = script.arg(PREFIX).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    as_root(&["auth", "enable"]);
    as_root(&[
        "put",
        "/registry/secrets/kube-system/bootstrap",
        "the apiserver's",
    ]);

    // svcplane's identity: its prefix only.
    let mut svcplane = etcd.client_as("svcplane").await;
    let refused = svcplane
        .get("/registry/secrets/kube-system/bootstrap", None)
        .await
        .unwrap_err();
    assert!(refused.to_string().contains("permission denied"), "{refused}");
    let refused = svcplane.put("/registry/x", "y", None).await.unwrap_err();
    assert!(refused.to_string().contains("permission denied"), "{refused}");
    // Nor a neighbouring prefix that merely starts the same.
    let neighbour = format!("{PREFIX}-other/x");
    assert!(svcplane.put(neighbour.as_str(), "y", None).await.is_err());

    let tls = etcd.client_tls("svcplane");
    let (ca, cert, key) = (
        format!("--etcd-cafile={}", tls.ca.display()),
        format!("--etcd-certfile={}", tls.cert.display()),
        format!("--etcd-keyfile={}", tls.key.display()),
    );
    let bed = Bed::build(&F, etcd.url(), Some(PREFIX), &[&ca, &cert, &key]).await;
    // Allocation (with its reservation), the leader's confirmation and release all work.
    let svc = bed
        .create(&bed.service("np", |s| s.type_ = Some("NodePort".into())))
        .await
        .unwrap();
    let ip = cluster_ips(&svc)[0];
    let mut root = etcd.client_as("root").await;
    let v4 = RangeStore::new(
        root.clone(),
        PREFIX,
        &format!("clusterip/{}", F.v4.replace('/', "-")),
        F.v4.parse::<IpRange>().unwrap(),
        "IP",
    );
    assert!(v4.read().await.unwrap().unwrap().0.has(ip));
    eventually(Duration::from_secs(30), "the reservation confirmed", || async {
        v4.reservations().await.unwrap().is_empty().then_some(())
    })
    .await;
    bed.services().delete("np", &Default::default()).await.unwrap();
    eventually(Duration::from_secs(30), "the IP released", || async {
        (!v4.read().await.unwrap().unwrap().0.has(ip)).then_some(())
    })
    .await;
    // Nothing svcplane wrote lies outside its prefix, and it met no refusal.
    let all = root
        .get(
            "",
            Some(etcd_client::GetOptions::new().with_all_keys().with_keys_only()),
        )
        .await
        .unwrap();
    let outside: Vec<String> = all
        .kvs()
        .iter()
        .map(|kv| String::from_utf8_lossy(kv.key()).into_owned())
        .filter(|k| !k.starts_with(&format!("{PREFIX}/")) && !k.starts_with("/registry/"))
        .collect();
    assert!(outside.is_empty(), "{outside:?}");
    assert!(!bed.log().contains("permission denied"), "{}", bed.log());
}
