//! svcplane next to upstream's kube-controller-manager (same release as the apiserver): it adopts
//! what upstream wrote without a single write, and a Pod change costs it the same writes.

use std::{collections::BTreeSet, time::Duration};

use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::{
    api::{core::v1::Endpoints, discovery::v1::EndpointSlice},
    apimachinery::pkg::util::intstr::IntOrString,
};
use kube::{Api, Client, api::DeleteParams};
use svcplane_e2e::{
    control_plane, eventually,
    objects::{
        WriteCounter, create_node, create_pods, create_service, endpoint_pods, exclusive_controller,
        force_delete_pods, service, slices_of,
    },
    pods::{PodFixture, set_status},
    process::Svcplane,
    test_namespace,
    upstream::UpstreamControllers,
};

const UPSTREAM_MANAGER: &str = "endpointslice-controller.k8s.io";

struct Bed {
    client: Client,
    ns: String,
    node: String,
}

impl Bed {
    fn pod(&self, i: usize) -> PodFixture {
        PodFixture::new(&format!("web-{i}"), &format!("10.40.{}.{}", i / 250, i % 250 + 1))
            .label("app", "web")
            .on_node(&self.node)
    }

    async fn slices(&self) -> Vec<EndpointSlice> {
        slices_of(&self.client, &self.ns, "web", UPSTREAM_MANAGER).await
    }

    async fn endpoints_count(&self) -> usize {
        Api::<Endpoints>::namespaced(self.client.clone(), &self.ns)
            .get_opt("web")
            .await
            .unwrap()
            .map_or(0, |e| {
                e.subsets
                    .iter()
                    .flatten()
                    .map(|s| s.addresses.as_ref().map_or(0, Vec::len))
                    .sum()
            })
    }

    /// Waits until slices hold exactly `want` and the Endpoints as many ready addresses as `ready`.
    async fn settled(&self, want: &BTreeSet<String>, ready: usize) {
        eventually(
            Duration::from_secs(180),
            "slices and Endpoints to settle",
            || async {
                let pods = endpoint_pods(&self.slices().await);
                let same = pods.len() == want.len() && pods.into_iter().collect::<BTreeSet<_>>() == *want;
                (same && self.endpoints_count().await == ready).then_some(())
            },
        )
        .await;
        // Let late writes land before they are counted.
        tokio::time::sleep(Duration::from_secs(2)).await;
    }

    /// Slice and Endpoints writes caused by four Pod changes, one after the other: readiness
    /// lost, a Pod added, a Pod terminating, that Pod gone. `base` picks distinct Pods per round.
    async fn pod_changes(
        &self,
        members: &mut BTreeSet<String>,
        ready: &mut usize,
        base: usize,
    ) -> Vec<(usize, usize)> {
        let mut costs = Vec::new();
        // Each step is one event, so the count does not depend on how events and syncs
        // interleave (a force delete of a running Pod is two events, an update and a delete).
        for step in 0..4 {
            let slices = WriteCounter::start(&self.client, &self.ns).await;
            let endpoints = WriteCounter::start_for::<Endpoints>(&self.client, &self.ns).await;
            let leaving = format!("web-{}", base + 1);
            match step {
                0 => {
                    set_status(&self.client, &self.ns, &self.pod(base).not_ready()).await;
                    *ready -= 1;
                }
                1 => {
                    create_pods(&self.client, &self.ns, &[self.pod(1000 + base)]).await;
                    members.insert(format!("web-{}", 1000 + base));
                    *ready += 1;
                }
                2 => {
                    // Graceful deletion: the Pod turns terminating (there is no kubelet to finish it).
                    Api::<Pod>::namespaced(self.client.clone(), &self.ns)
                        .delete(&leaving, &DeleteParams::default())
                        .await
                        .unwrap();
                    *ready -= 1;
                }
                _ => {
                    force_delete_pods(&self.client, &self.ns, std::slice::from_ref(&leaving)).await;
                    members.remove(&leaving);
                }
            }
            self.settled(members, *ready).await;
            costs.push((slices.count(), endpoints.count()));
        }
        costs
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn adopts_upstreams_objects_without_writes_and_matches_its_write_count_per_pod_change() {
    let _one_controller = exclusive_controller().await;
    let cp = control_plane();
    let client = cp.client().await;
    let ns = test_namespace(&client, "upstream").await;
    cp.apply_controller_manager_rbac(&ns);
    let dir = cp.dir.join(&ns);
    std::fs::create_dir_all(&dir).unwrap();
    let node = format!("{ns}-node");
    create_node(&client, &node, Some("zone-a")).await;
    let bed = Bed {
        client: client.clone(),
        ns: ns.clone(),
        node,
    };
    create_service(&client, &ns, &service("web", "web", IntOrString::Int(8080))).await;
    let fixtures: Vec<PodFixture> = (0..250).map(|i| bed.pod(i)).collect();
    create_pods(&client, &ns, &fixtures).await;
    let mut members: BTreeSet<String> = fixtures.iter().map(|f| f.name.clone()).collect();
    let mut ready = 250;

    // Upstream writes the objects and handles three Pod changes.
    let mut upstream = UpstreamControllers::start(cp, &dir.join("kube-controller-manager.log"));
    bed.settled(&members, ready).await;
    let upstream_costs = bed.pod_changes(&mut members, &mut ready, 10).await;
    upstream.stop();

    // svcplane takes over: nothing differs, so nothing is written.
    let slice_writes = WriteCounter::start(&client, &ns).await;
    let endpoint_writes = WriteCounter::start_for::<Endpoints>(&client, &ns).await;
    let kubeconfig = cp
        .service_account_kubeconfig(
            &client,
            &ns,
            "svcplane-controller-manager",
            None,
            &dir.join("cm.kubeconfig"),
        )
        .await;
    let cm = Svcplane::controller_manager(
        "cm",
        &kubeconfig,
        &dir,
        &["--leader-elect-resource-namespace", &ns],
    );
    eventually(Duration::from_secs(40), "svcplane to sync", || async {
        let m = cm.metrics().await?;
        (m.contains("endpoint_slice_controller_syncs{result=\"success\"}")
            && m.contains("svcplane_endpoints_controller_syncs_total{result=\"success\"}"))
        .then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        (slice_writes.count(), endpoint_writes.count()),
        (0, 0),
        "takeover wrote"
    );

    // The same three kinds of change, on other Pods, cost svcplane the same writes.
    let own_costs = bed.pod_changes(&mut members, &mut ready, 20).await;
    eprintln!("writes per change (slices, endpoints): upstream {upstream_costs:?}, svcplane {own_costs:?}");
    assert_eq!(own_costs, upstream_costs);
    drop(cm);
}
