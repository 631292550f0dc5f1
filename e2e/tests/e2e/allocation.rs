//! ClusterIP and NodePort allocation through svcplane's mutating webhook, registered with the real
//! apiserver, with the bitmaps in the real etcd.
//!
//! The webhook here is scoped to the test's namespace (namespaceSelector), and allocates from
//! sub-ranges the apiserver keeps for user-chosen values (the static bands of its own ranges), so
//! Services other tests create through the apiserver's own allocator can never collide with it.

use std::{collections::HashSet, net::IpAddr, time::Duration};

use k8s_openapi::{
    api::{
        admissionregistration::v1::{
            MutatingWebhook, MutatingWebhookConfiguration, RuleWithOperations, WebhookClientConfig,
        },
        core::v1::{Namespace, Service, ServicePort, ServiceSpec},
    },
    apimachinery::pkg::apis::meta::v1::LabelSelector,
};
use kube::{
    Api, Client,
    api::{ObjectMeta, Patch, PatchParams, PostParams},
};
use svcplane_allocators::{IpRange, etcd::RangeStore};
use svcplane_e2e::{control_plane, eventually, free_port, process::Svcplane, test_namespace};

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
    v4: "10.96.0.128/25",
    v6: "fd00:10:96::80/121",
    ports: "30041-30085",
};
const C: Ranges = Ranges {
    v4: "10.96.0.64/26",
    v6: "fd00:10:96::40/122",
    ports: "30021-30040",
};

struct Bed {
    client: Client,
    ns: String,
    prefix: String,
    v4: &'static str,
    _cm: Svcplane,
}

impl Bed {
    async fn new(ranges: &Ranges) -> Self {
        Self::with_args(ranges, &[]).await
    }

    async fn with_args(ranges: &Ranges, extra: &[&str]) -> Self {
        let cp = control_plane();
        let client = cp.client().await;
        let ns = test_namespace(&client, "alloc").await;
        let patch = serde_json::json!({"metadata": {"labels": {"svcplane-webhook-test": ns}}});
        Api::<Namespace>::all(client.clone())
            .patch(&ns, &PatchParams::default(), &Patch::Merge(&patch))
            .await
            .unwrap();
        let port = free_port();
        let webhook = MutatingWebhookConfiguration {
            metadata: ObjectMeta {
                name: Some(format!("svcplane-{ns}")),
                ..Default::default()
            },
            webhooks: Some(vec![MutatingWebhook {
                name: "services.svcplane.io".into(),
                admission_review_versions: vec!["v1".into()],
                side_effects: "NoneOnDryRun".into(),
                failure_policy: Some("Fail".into()),
                timeout_seconds: Some(10),
                client_config: WebhookClientConfig {
                    url: Some(format!("https://127.0.0.1:{port}/mutate-services")),
                    ..Default::default()
                },
                namespace_selector: Some(LabelSelector {
                    match_labels: Some([("svcplane-webhook-test".to_owned(), ns.clone())].into()),
                    ..Default::default()
                }),
                rules: Some(vec![RuleWithOperations {
                    api_groups: Some(vec!["".into()]),
                    api_versions: Some(vec!["v1".into()]),
                    resources: Some(vec!["services".into()]),
                    operations: Some(vec!["CREATE".into(), "UPDATE".into()]),
                    scope: Some("Namespaced".into()),
                }]),
                ..Default::default()
            }]),
        };
        Api::<MutatingWebhookConfiguration>::all(client.clone())
            .create(&PostParams::default(), &webhook)
            .await
            .unwrap();
        let prefix = format!("/svcplane-{ns}");
        let dir = cp.dir.join(&ns);
        std::fs::create_dir_all(&dir).unwrap();
        let args = [
            "--leader-elect-resource-namespace".to_owned(),
            ns.clone(),
            "--controllers=".to_owned(),
            format!("--service-cluster-ip-range={},{}", ranges.v4, ranges.v6),
            format!("--service-node-port-range={}", ranges.ports),
            format!("--etcd-servers=http://127.0.0.1:{}", cp.etcd_port),
            format!("--etcd-prefix={prefix}"),
            format!("--webhook-bind-address=127.0.0.1:{port}"),
            format!("--webhook-cert-secret={ns}/svcplane-webhook-tls"),
            "--webhook-cert-names=127.0.0.1".to_owned(),
            format!("--webhook-configuration-name=svcplane-{ns}"),
        ];
        let mut args: Vec<&str> = args.iter().map(String::as_str).collect();
        args.extend_from_slice(extra);
        let cm = Svcplane::controller_manager("alloc", &cp.kubeconfig, &dir, &args);
        let bed = Self {
            client,
            ns,
            prefix,
            v4: ranges.v4,
            _cm: cm,
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

    async fn v4_store(&self) -> std::sync::Arc<RangeStore<IpRange>> {
        let etcd =
            etcd_client::Client::connect([format!("http://127.0.0.1:{}", control_plane().etcd_port)], None)
                .await
                .unwrap();
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
    let bed = Bed::new(&A).await;
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
        assert!(created <= 126, "more Services than addresses");
    };
    assert!(err.to_string().contains("range 10.96.0.128/25 is full"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deletion_releases_and_a_leak_is_reclaimed_after_three_repairs() {
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

    // An allocation whose Service was never stored (a create that failed after admission).
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
    // Three sightings one interval apart: not before the second interval has passed.
    assert!(
        start.elapsed() >= Duration::from_secs(2),
        "reclaimed after {:?}",
        start.elapsed()
    );
}
