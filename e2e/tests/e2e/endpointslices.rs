//! The EndpointSlice controller against the real apiserver: Pods as a kubelet would leave them,
//! slices as kube-proxy and CoreDNS read them, and every write counted.

use std::{collections::BTreeSet, path::PathBuf, time::Duration};

use k8s_openapi::{
    api::{
        core::v1::{Endpoints, Pod},
        discovery::v1::EndpointSlice,
    },
    apimachinery::pkg::util::intstr::IntOrString,
};
use kube::{
    Api, Client,
    api::{DeleteParams, Patch, PatchParams},
};
use svcplane_e2e::{
    control_plane, eventually,
    objects::{
        WriteCounter, create_node, create_pods, create_service, endpoint_pods, exclusive_controller,
        force_delete_pods, service, slices_of,
    },
    pods::{PodFixture, set_status},
    process::Svcplane,
    test_namespace,
};

const UPSTREAM_MANAGER: &str = "endpointslice-controller.k8s.io";

struct Setup {
    client: Client,
    ns: String,
    dir: PathBuf,
    node: String,
}

impl Setup {
    async fn new(prefix: &str) -> Self {
        let cp = control_plane();
        let client = cp.client().await;
        let ns = test_namespace(&client, prefix).await;
        cp.apply_controller_manager_rbac(&ns);
        let dir = cp.dir.join(&ns);
        std::fs::create_dir_all(&dir).unwrap();
        let node = format!("{ns}-node");
        create_node(&client, &node, Some("zone-a")).await;
        Self {
            client,
            ns,
            dir,
            node,
        }
    }

    /// A controller-manager as the shipped ServiceAccount, electing within this namespace.
    async fn controller_manager(&self, name: &str, extra: &[&str]) -> Svcplane {
        let kubeconfig = control_plane()
            .service_account_kubeconfig(
                &self.client,
                &self.ns,
                "svcplane-controller-manager",
                None,
                &self.dir.join(format!("{name}.kubeconfig")),
            )
            .await;
        let mut args = vec!["--leader-elect-resource-namespace", &self.ns];
        args.extend_from_slice(extra);
        Svcplane::controller_manager(name, &kubeconfig, &self.dir, &args)
    }

    fn pod(&self, i: usize) -> PodFixture {
        PodFixture::new(&format!("web-{i}"), &format!("10.20.{}.{}", i / 250, i % 250 + 1))
            .label("app", "web")
            .on_node(&self.node)
    }

    async fn slices(&self, svc: &str) -> Vec<EndpointSlice> {
        slices_of(&self.client, &self.ns, svc, UPSTREAM_MANAGER).await
    }

    /// Waits until the slices of `svc` hold exactly `want` (Pod names, each once).
    async fn converged(&self, svc: &str, want: &BTreeSet<String>) -> Vec<EndpointSlice> {
        eventually(Duration::from_secs(90), "slices to converge", || async {
            let slices = self.slices(svc).await;
            let pods = endpoint_pods(&slices);
            (pods.len() == want.len() && pods.iter().cloned().collect::<BTreeSet<_>>() == *want)
                .then_some(slices)
        })
        .await
    }

    async fn endpoints(&self, name: &str) -> Option<Endpoints> {
        Api::<Endpoints>::namespaced(self.client.clone(), &self.ns)
            .get_opt(name)
            .await
            .unwrap()
    }

    fn log(&self, name: &str) -> String {
        std::fs::read_to_string(self.dir.join(format!("{name}.log"))).unwrap_or_default()
    }
}

fn address_count(e: &Endpoints) -> (usize, usize) {
    e.subsets.iter().flatten().fold((0, 0), |(r, n), s| {
        (
            r + s.addresses.as_ref().map_or(0, Vec::len),
            n + s.not_ready_addresses.as_ref().map_or(0, Vec::len),
        )
    })
}

fn over_capacity(e: &Endpoints) -> Option<String> {
    e.metadata
        .annotations
        .as_ref()?
        .get("endpoints.kubernetes.io/over-capacity")
        .cloned()
}

fn names(fixtures: &[PodFixture]) -> BTreeSet<String> {
    fixtures.iter().map(|f| f.name.clone()).collect()
}

fn sizes(slices: &[EndpointSlice]) -> Vec<usize> {
    let mut v: Vec<usize> = slices
        .iter()
        .map(|s| s.endpoints.as_ref().map_or(0, Vec::len))
        .collect();
    v.sort_unstable_by(|a, b| b.cmp(a));
    v
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slices_and_endpoints_follow_1500_pods_then_900_and_resync_writes_nothing() {
    let _one_controller = exclusive_controller().await;
    let s = Setup::new("eps-scale").await;
    create_service(&s.client, &s.ns, &service("web", "web", IntOrString::Int(8080))).await;
    let fixtures: Vec<PodFixture> = (0..1500).map(|i| s.pod(i)).collect();
    create_pods(&s.client, &s.ns, &fixtures).await;

    let cm = s.controller_manager("cm-1", &[]).await;
    let slices = s.converged("web", &names(&fixtures)).await;
    assert_eq!(sizes(&slices), vec![100; 15], "15 full slices");
    for slice in &slices {
        assert_eq!(slice.address_type, "IPv4");
        let port = &slice.ports.as_ref().unwrap()[0];
        assert_eq!(
            (port.name.as_deref(), port.port, port.protocol.as_deref()),
            (Some("http"), Some(8080), Some("TCP"))
        );
        let ep = &slice.endpoints.as_ref().unwrap()[0];
        assert_eq!(ep.zone.as_deref(), Some("zone-a"));
        assert_eq!(ep.node_name.as_deref(), Some(s.node.as_str()));
        let c = ep.conditions.clone().unwrap();
        assert_eq!(
            (c.ready, c.serving, c.terminating),
            (Some(true), Some(true), Some(false))
        );
        let owner = &slice.metadata.owner_references.as_ref().unwrap()[0];
        assert_eq!(
            (owner.kind.as_str(), owner.name.as_str(), owner.controller),
            ("Service", "web", Some(true))
        );
        assert!(slice.metadata.name.as_ref().unwrap().starts_with("web-"));
        assert!(
            slice
                .metadata
                .annotations
                .as_ref()
                .unwrap()
                .contains_key("endpoints.kubernetes.io/last-change-trigger-time")
        );
    }

    // The legacy Endpoints object stops at 1000 addresses and says so.
    let endpoints = eventually(Duration::from_secs(30), "Endpoints truncated at 1000", || async {
        let e = s.endpoints("web").await?;
        (address_count(&e) == (1000, 0)).then_some(e)
    })
    .await;
    assert_eq!(over_capacity(&endpoints).as_deref(), Some("truncated"));
    let managed_by = endpoints
        .metadata
        .labels
        .as_ref()
        .and_then(|l| l.get("endpoints.kubernetes.io/managed-by"));
    assert_eq!(managed_by.map(String::as_str), Some("endpoint-controller"));

    // Scale down to 900: every remaining Pod exactly once, and the annotation goes.
    let gone: Vec<String> = fixtures[900..].iter().map(|f| f.name.clone()).collect();
    force_delete_pods(&s.client, &s.ns, &gone).await;
    let slices = s.converged("web", &names(&fixtures[..900])).await;
    assert_eq!(
        slices
            .iter()
            .map(|s| s.endpoints.as_ref().map_or(0, Vec::len))
            .sum::<usize>(),
        900
    );
    let endpoints = eventually(
        Duration::from_secs(30),
        "Endpoints back under capacity",
        || async {
            let e = s.endpoints("web").await?;
            (address_count(&e) == (900, 0)).then_some(e)
        },
    )
    .await;
    assert_eq!(over_capacity(&endpoints), None);
    let listed: BTreeSet<String> = endpoints
        .subsets
        .iter()
        .flatten()
        .flat_map(|ss| ss.addresses.iter().flatten())
        .filter_map(|a| a.target_ref.as_ref()?.name.clone())
        .collect();
    assert_eq!(listed, names(&fixtures[..900]));

    // A new leader syncs every Service from scratch: nothing changed, so nothing is written.
    drop(cm);
    let writes = WriteCounter::start(&s.client, &s.ns).await;
    let endpoints_rv = s.endpoints("web").await.unwrap().metadata.resource_version;
    let cm2 = s.controller_manager("cm-2", &[]).await;
    eventually(Duration::from_secs(40), "the new controller to sync", || async {
        cm2.metrics()
            .await
            .filter(|m| m.contains("endpoint_slice_controller_syncs{result=\"success\"}"))
            .map(|_| ())
    })
    .await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        writes.count(),
        0,
        "a resync of unchanged slices wrote:\n{}",
        s.log("cm-2")
    );
    let endpoints_rv_after = s.endpoints("web").await.unwrap().metadata.resource_version;
    assert_eq!(
        endpoints_rv_after, endpoints_rv,
        "a resync rewrote the unchanged Endpoints"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conditions_track_readiness_and_termination_with_one_write_each() {
    let _one_controller = exclusive_controller().await;
    let s = Setup::new("eps-cond").await;
    create_service(&s.client, &s.ns, &service("web", "web", IntOrString::Int(8080))).await;
    let fixtures: Vec<PodFixture> = (0..3).map(|i| s.pod(i)).collect();
    create_pods(&s.client, &s.ns, &fixtures).await;
    let _cm = s.controller_manager("cm", &[]).await;
    s.converged("web", &names(&fixtures)).await;
    let conditions = |slices: &[EndpointSlice], pod: &str| {
        let ep = slices
            .iter()
            .flat_map(|s| s.endpoints.iter().flatten())
            .find(|e| e.target_ref.as_ref().and_then(|t| t.name.as_deref()) == Some(pod))
            .cloned()
            .unwrap();
        let c = ep.conditions.unwrap();
        (c.ready, c.serving, c.terminating)
    };

    // Not ready: ready and serving false, one slice write.
    let writes = WriteCounter::start(&s.client, &s.ns).await;
    set_status(&s.client, &s.ns, &fixtures[0].clone().not_ready()).await;
    let slices = eventually(Duration::from_secs(20), "web-0 not ready", || async {
        let slices = s.slices("web").await;
        (conditions(&slices, "web-0") == (Some(false), Some(false), Some(false))).then_some(slices)
    })
    .await;
    assert_eq!(
        conditions(&slices, "web-1"),
        (Some(true), Some(true), Some(false))
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(writes.count(), 1, "one Pod change, one slice write");

    // Terminating while still ready: serving, not ready, terminating. The Pod stays (there is no
    // kubelet to finish the graceful deletion).
    let writes = WriteCounter::start(&s.client, &s.ns).await;
    Api::<Pod>::namespaced(s.client.clone(), &s.ns)
        .delete("web-1", &DeleteParams::default())
        .await
        .unwrap();
    eventually(Duration::from_secs(20), "web-1 terminating", || async {
        let slices = s.slices("web").await;
        (conditions(&slices, "web-1") == (Some(false), Some(true), Some(true))).then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(writes.count(), 1);

    // publishNotReadyAddresses: every endpoint ready, whatever its Pod says.
    let patch = serde_json::json!({"spec": {"publishNotReadyAddresses": true}});
    Api::<k8s_openapi::api::core::v1::Service>::namespaced(s.client.clone(), &s.ns)
        .patch("web", &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .unwrap();
    eventually(
        Duration::from_secs(20),
        "not-ready addresses published",
        || async {
            let slices = s.slices("web").await;
            (conditions(&slices, "web-0") == (Some(true), Some(false), Some(false))
                && conditions(&slices, "web-1") == (Some(true), Some(true), Some(true)))
                .then_some(())
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn named_target_port_maps_each_pod_to_its_own_container_port() {
    let _one_controller = exclusive_controller().await;
    let s = Setup::new("eps-named").await;
    create_service(
        &s.client,
        &s.ns,
        &service("web", "web", IntOrString::String("http".into())),
    )
    .await;
    let fixtures = vec![
        s.pod(0).port("http", 8080),
        s.pod(1).port("http", 8080),
        s.pod(2).port("http", 9090),
        s.pod(3), // declares no such port
    ];
    create_pods(&s.client, &s.ns, &fixtures).await;
    let _cm = s.controller_manager("cm", &[]).await;
    let slices = s.converged("web", &names(&fixtures)).await;
    let mut by_port: Vec<(Vec<i32>, Vec<String>)> = slices
        .iter()
        .map(|sl| {
            let ports = sl.ports.iter().flatten().filter_map(|p| p.port).collect();
            let mut pods = endpoint_pods(std::slice::from_ref(sl));
            pods.sort();
            (ports, pods)
        })
        .collect();
    by_port.sort();
    assert_eq!(
        by_port,
        [
            (vec![], vec!["web-3".to_owned()]),
            (vec![8080], vec!["web-0".to_owned(), "web-1".to_owned()]),
            (vec![9090], vec!["web-2".to_owned()]),
        ]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn user_endpoints_of_selectorless_services_are_mirrored_without_forbidden_addresses() {
    use k8s_openapi::api::{
        core::v1::{EndpointAddress, EndpointPort as CorePort, EndpointSubset},
        events::v1::Event,
    };
    use kube::api::{ObjectMeta, PostParams};

    let _one_controller = exclusive_controller().await;
    let s = Setup::new("eps-mirror").await;
    // A selector-less Service, and another Service whose cluster IP a user lists by mistake.
    let mut ext = service("ext", "none", IntOrString::Int(80));
    ext.spec.as_mut().unwrap().selector = None;
    let ext = create_service(&s.client, &s.ns, &ext).await;
    let other = create_service(&s.client, &s.ns, &service("other", "other", IntOrString::Int(80))).await;
    let own_ip = ext.spec.as_ref().unwrap().cluster_ip.clone().unwrap();
    let other_ip = other.spec.as_ref().unwrap().cluster_ip.clone().unwrap();
    let addr = |ip: &str| EndpointAddress {
        ip: ip.into(),
        ..Default::default()
    };
    let user_endpoints = |ips: &[&str]| Endpoints {
        metadata: ObjectMeta {
            name: Some("ext".into()),
            labels: Some([("team".to_owned(), "a".to_owned())].into()),
            ..Default::default()
        },
        subsets: Some(vec![EndpointSubset {
            addresses: Some(ips.iter().map(|ip| addr(ip)).collect()),
            ports: Some(vec![CorePort {
                name: Some("http".into()),
                port: 8080,
                protocol: Some("TCP".into()),
                app_protocol: None,
            }]),
            ..Default::default()
        }]),
    };
    let api: Api<Endpoints> = Api::namespaced(s.client.clone(), &s.ns);
    // The apiserver itself refuses loopback, link-local and multicast addresses in Endpoints.
    for bad in ["127.0.0.1", "169.254.10.10", "224.0.0.9", "fe80::1"] {
        let err = api
            .create(&PostParams::default(), &user_endpoints(&["10.30.0.1", bad]))
            .await
            .unwrap_err();
        assert!(
            matches!(&err, kube::Error::Api(st) if st.code == 422),
            "{bad}: {err}"
        );
    }
    // Cluster IPs pass validation; the mirroring controller has to catch them.
    let written = api
        .create(
            &PostParams::default(),
            &user_endpoints(&["10.30.0.1", "10.30.0.2", &own_ip, &other_ip]),
        )
        .await
        .unwrap();

    let cm = s.controller_manager("cm", &[]).await;
    let mirrored = eventually(Duration::from_secs(30), "mirrored slice", || async {
        let slices = slices_of(
            &s.client,
            &s.ns,
            "ext",
            "endpointslicemirroring-controller.k8s.io",
        )
        .await;
        (slices.len() == 1).then_some(slices)
    })
    .await;
    let addresses: BTreeSet<String> = mirrored[0]
        .endpoints
        .iter()
        .flatten()
        .flat_map(|e| e.addresses.clone())
        .collect();
    assert_eq!(addresses, ["10.30.0.1".to_owned(), "10.30.0.2".to_owned()].into());
    assert_eq!(
        mirrored[0]
            .metadata
            .labels
            .as_ref()
            .unwrap()
            .get("team")
            .map(String::as_str),
        Some("a")
    );
    assert_eq!(
        mirrored[0].metadata.owner_references.as_ref().unwrap()[0].kind,
        "Endpoints"
    );
    assert!(
        s.slices("ext").await.is_empty(),
        "the EndpointSlice controller leaves selector-less Services alone"
    );

    let events = eventually(Duration::from_secs(20), "a ForbiddenIPAddress event", || async {
        let list = Api::<Event>::namespaced(s.client.clone(), &s.ns)
            .list(&Default::default())
            .await
            .ok()?;
        list.items
            .into_iter()
            .find(|e| e.reason.as_deref() == Some("ForbiddenIPAddress"))
    })
    .await;
    let note = events.note.unwrap_or_default();
    assert!(
        note.contains(&own_ip) && note.contains(&other_ip) && note.contains("cluster-ip"),
        "{note}"
    );
    let series = "svcplane_endpoint_slice_mirroring_forbidden_addresses_total{reason=\"cluster-ip\"}";
    let mut forbidden_counted = 0.0;
    for _ in 0..100 {
        forbidden_counted = cm
            .metrics()
            .await
            .and_then(|m| svcplane_e2e::http::metric_value(&m, series))
            .unwrap_or(0.0);
        if forbidden_counted >= 2.0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(
        forbidden_counted >= 2.0,
        "forbidden addresses not counted; log:\n{}",
        s.log("cm")
    );
    assert_eq!(forbidden_counted % 2.0, 0.0, "each sync counts both cluster IPs");
    // The Endpoints controller never touches user-written Endpoints of selector-less Services.
    let now = api.get("ext").await.unwrap();
    assert_eq!(now.metadata.resource_version, written.metadata.resource_version);

    // 5000 addresses: 1000 mirrored, the rest reported, nothing stuck.
    let many: Vec<String> = (0..5000)
        .map(|i| format!("10.31.{}.{}", i / 250, i % 250 + 1))
        .collect();
    let refs: Vec<&str> = many.iter().map(String::as_str).collect();
    let mut big = user_endpoints(&refs);
    big.metadata.resource_version = now.metadata.resource_version.clone();
    api.replace("ext", &PostParams::default(), &big).await.unwrap();
    eventually(Duration::from_secs(30), "1000 mirrored addresses", || async {
        let slices = slices_of(
            &s.client,
            &s.ns,
            "ext",
            "endpointslicemirroring-controller.k8s.io",
        )
        .await;
        (slices.len() == 1 && slices[0].endpoints.as_ref().map_or(0, Vec::len) == 1000).then_some(())
    })
    .await;
    eventually(
        Duration::from_secs(20),
        "a TooManyAddressesToMirror event",
        || async {
            let list = Api::<Event>::namespaced(s.client.clone(), &s.ns)
                .list(&Default::default())
                .await
                .ok()?;
            list.items
                .into_iter()
                .find(|e| e.reason.as_deref() == Some("TooManyAddressesToMirror"))
        },
    )
    .await;

    // skip-mirror: the mirrored slice goes away.
    let patch =
        serde_json::json!({"metadata": {"labels": {"endpointslice.kubernetes.io/skip-mirror": "true"}}});
    api.patch("ext", &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .unwrap();
    eventually(Duration::from_secs(30), "mirrored slice removed", || async {
        slices_of(
            &s.client,
            &s.ns,
            "ext",
            "endpointslicemirroring-controller.k8s.io",
        )
        .await
        .is_empty()
        .then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn coexistence_mode_touches_only_services_handed_to_svcplane() {
    let _one_controller = exclusive_controller().await;
    let s = Setup::new("eps-coexist").await;
    let mut handed = service("handed", "web", IntOrString::Int(8080));
    handed
        .metadata
        .labels
        .get_or_insert_with(Default::default)
        .insert(
            "service.kubernetes.io/endpoint-controller-name".into(),
            "svcplane".into(),
        );
    create_service(&s.client, &s.ns, &handed).await;
    create_service(
        &s.client,
        &s.ns,
        &service("upstreams", "web", IntOrString::Int(8080)),
    )
    .await;
    let fixtures: Vec<PodFixture> = (0..3).map(|i| s.pod(i)).collect();
    create_pods(&s.client, &s.ns, &fixtures).await;

    let _cm = s
        .controller_manager("cm", &["--endpoint-controller-coexistence=true"])
        .await;
    let own = "endpointslice-controller.svcplane.io";
    let slices = eventually(
        Duration::from_secs(30),
        "slices for the handed Service",
        || async {
            let slices = slices_of(&s.client, &s.ns, "handed", own).await;
            (endpoint_pods(&slices).len() == 3).then_some(slices)
        },
    )
    .await;
    assert_eq!(slices.len(), 1);
    // Give it time to (wrongly) act on the other Service, then check it did not.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let all: Vec<EndpointSlice> = Api::<EndpointSlice>::namespaced(s.client.clone(), &s.ns)
        .list(&Default::default())
        .await
        .unwrap()
        .items;
    let untouched: Vec<&EndpointSlice> = all
        .iter()
        .filter(|sl| {
            sl.metadata
                .labels
                .as_ref()
                .and_then(|l| l.get("kubernetes.io/service-name"))
                .map(String::as_str)
                == Some("upstreams")
        })
        .collect();
    assert!(
        untouched.is_empty(),
        "coexistence mode wrote slices for an unlabelled Service: {untouched:?}"
    );
    assert!(
        s.endpoints("handed").await.is_none(),
        "upstream's Endpoints controller keeps Endpoints in coexistence mode"
    );
    assert!(all.iter().all(|sl| {
        sl.metadata
            .labels
            .as_ref()
            .and_then(|l| l.get("endpointslice.kubernetes.io/managed-by"))
            .map(String::as_str)
            == Some(own)
    }));

    // Handing the Service back: svcplane removes its slices so only the other controller's remain.
    let patch =
        serde_json::json!({"metadata": {"labels": {"service.kubernetes.io/endpoint-controller-name": null}}});
    Api::<k8s_openapi::api::core::v1::Service>::namespaced(s.client.clone(), &s.ns)
        .patch("handed", &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .unwrap();
    eventually(Duration::from_secs(30), "svcplane's slices removed", || async {
        slices_of(&s.client, &s.ns, "handed", own)
            .await
            .is_empty()
            .then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_resync_of_2000_unchanged_services_writes_nothing() {
    let _one_controller = exclusive_controller().await;
    let s = Setup::new("eps-resync").await;
    let names: Vec<String> = (0..2000).map(|i| format!("svc-{i}")).collect();
    for chunk in names.chunks(64) {
        let svcs: Vec<_> = chunk
            .iter()
            .map(|n| service(n, n, IntOrString::Int(8080)))
            .collect();
        futures::future::join_all(svcs.iter().map(|svc| create_service(&s.client, &s.ns, svc))).await;
    }
    let fixtures: Vec<PodFixture> = names
        .iter()
        .enumerate()
        .map(|(i, n)| {
            PodFixture::new(&format!("{n}-0"), &format!("10.50.{}.{}", i / 250, i % 250 + 1))
                .label("app", n)
                .on_node(&s.node)
        })
        .collect();
    create_pods(&s.client, &s.ns, &fixtures).await;

    let cm = s.controller_manager("cm-1", &[]).await;
    let all_slices = || async {
        Api::<EndpointSlice>::namespaced(s.client.clone(), &s.ns)
            .list(&Default::default())
            .await
            .unwrap()
            .items
    };
    eventually(
        Duration::from_secs(180),
        "2000 Services with one endpoint each",
        || async {
            let slices = all_slices().await;
            (slices.len() == 2000
                && slices
                    .iter()
                    .all(|sl| sl.endpoints.as_ref().map_or(0, Vec::len) == 1))
            .then_some(())
        },
    )
    .await;
    eventually(Duration::from_secs(120), "2000 Endpoints objects", || async {
        let list = Api::<Endpoints>::namespaced(s.client.clone(), &s.ns)
            .list(&Default::default())
            .await
            .ok()?;
        (list.items.len() == 2000).then_some(())
    })
    .await;
    drop(cm);

    // A new leader lists everything and syncs all 2000 Services once: no write at all.
    let slice_writes = WriteCounter::start(&s.client, &s.ns).await;
    let endpoint_writes = WriteCounter::start_for::<Endpoints>(&s.client, &s.ns).await;
    let cm2 = s.controller_manager("cm-2", &[]).await;
    eventually(
        Duration::from_secs(120),
        "the new leader to sync every Service",
        || async {
            let m = cm2.metrics().await?;
            let synced =
                svcplane_e2e::http::metric_value(&m, "endpoint_slice_controller_syncs{result=\"success\"}")?;
            let pending = svcplane_e2e::http::metric_value(&m, "workqueue_depth{name=\"endpoint_slice\"}")?;
            (synced >= 2000.0 && pending == 0.0).then_some(())
        },
    )
    .await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        (slice_writes.count(), endpoint_writes.count()),
        (0, 0),
        "resync wrote:\n{}",
        s.log("cm-2")
    );

    // Leave nothing for the controllers of later tests to chew on (there is no garbage collector).
    drop(cm2);
    let (dp, lp) = (DeleteParams::default(), kube::api::ListParams::default());
    Api::<k8s_openapi::api::core::v1::Service>::namespaced(s.client.clone(), &s.ns)
        .delete_collection(&dp, &lp)
        .await
        .unwrap();
    Api::<EndpointSlice>::namespaced(s.client.clone(), &s.ns)
        .delete_collection(&dp, &lp)
        .await
        .unwrap();
    Api::<Endpoints>::namespaced(s.client.clone(), &s.ns)
        .delete_collection(&dp, &lp)
        .await
        .unwrap();
    let force = DeleteParams {
        grace_period_seconds: Some(0),
        ..DeleteParams::default()
    };
    Api::<Pod>::namespaced(s.client.clone(), &s.ns)
        .delete_collection(&force, &lp)
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_input_neither_panics_nor_stalls_other_services() {
    let _one_controller = exclusive_controller().await;
    let s = Setup::new("eps-bad").await;
    // A Service whose named port no Pod declares, Pods without IPs, a Pod on a Node that does
    // not exist, and next to them a healthy Service.
    create_service(
        &s.client,
        &s.ns,
        &service("odd", "odd", IntOrString::String("nope".into())),
    )
    .await;
    create_service(&s.client, &s.ns, &service("fine", "fine", IntOrString::Int(8080))).await;
    let mut no_ip = PodFixture::new("odd-0", "10.60.0.1")
        .label("app", "odd")
        .on_node(&s.node);
    no_ip.ips.clear();
    let lost = PodFixture::new("odd-1", "10.60.0.2")
        .label("app", "odd")
        .on_node("no-such-node");
    let unnamed = PodFixture::new("odd-2", "10.60.0.3")
        .label("app", "odd")
        .on_node(&s.node);
    let fine: Vec<PodFixture> = (0..5)
        .map(|i| {
            PodFixture::new(&format!("fine-{i}"), &format!("10.61.0.{}", i + 1))
                .label("app", "fine")
                .on_node(&s.node)
        })
        .collect();
    create_pods(&s.client, &s.ns, &[no_ip, lost, unnamed]).await;
    create_pods(&s.client, &s.ns, &fine).await;

    let mut cm = s.controller_manager("cm", &[]).await;
    s.converged("fine", &names(&fine)).await;
    // `odd`: only the Pod with an IP on a known Node, with no ports (its named port is unknown).
    let odd = s.converged("odd", &["odd-2".to_owned()].into()).await;
    assert!(odd[0].ports.as_ref().is_none_or(Vec::is_empty));
    assert!(cm.is_running(), "the controller-manager died:\n{}", s.log("cm"));

    // The missing Node appears: the Pod that waited for it is added.
    create_node(&s.client, "no-such-node", None).await;
    s.converged("odd", &["odd-1".to_owned(), "odd-2".to_owned()].into())
        .await;
}
