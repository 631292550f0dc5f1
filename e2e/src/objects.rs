//! Objects tests create (Nodes, Services, Pods in bulk) and observe (slices, write counts).

use std::{
    collections::BTreeMap,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
};

use futures::{StreamExt, TryStreamExt, stream};
use k8s_openapi::{
    api::{
        core::v1::{Node, Pod, Service, ServicePort, ServiceSpec},
        discovery::v1::EndpointSlice,
    },
    apimachinery::pkg::util::intstr::IntOrString,
};
use kube::{
    Api, Client,
    api::{DeleteParams, ListParams, ObjectMeta, PostParams, WatchEvent, WatchParams},
};
use tokio::{sync::Mutex, task::JoinHandle};

use crate::pods::{self, PodFixture};

static CONTROLLER_LOCK: Mutex<()> = Mutex::const_new(());

/// Endpoint controllers act on every namespace: tests that run one take turns, so that exactly
/// one writer exists while they count writes.
pub async fn exclusive_controller() -> tokio::sync::MutexGuard<'static, ()> {
    CONTROLLER_LOCK.lock().await
}

pub async fn create_node(client: &Client, name: &str, zone: Option<&str>) {
    let mut labels = BTreeMap::new();
    if let Some(z) = zone {
        labels.insert("topology.kubernetes.io/zone".to_owned(), z.to_owned());
    }
    let node = Node {
        metadata: ObjectMeta {
            name: Some(name.into()),
            labels: Some(labels),
            ..Default::default()
        },
        ..Default::default()
    };
    match Api::<Node>::all(client.clone())
        .create(&PostParams::default(), &node)
        .await
    {
        Ok(_) => {}
        Err(kube::Error::Api(s)) if s.code == 409 => {}
        Err(e) => panic!("creating node {name}: {e}"),
    }
}

/// A ClusterIP Service selecting `app=<app>` with one port 80 -> `target`.
pub fn service(name: &str, app: &str, target: IntOrString) -> Service {
    Service {
        metadata: ObjectMeta {
            name: Some(name.into()),
            labels: Some([("app".to_owned(), app.to_owned())].into()),
            ..Default::default()
        },
        spec: Some(ServiceSpec {
            selector: Some([("app".to_owned(), app.to_owned())].into()),
            ports: Some(vec![ServicePort {
                name: Some("http".into()),
                port: 80,
                target_port: Some(target),
                ..Default::default()
            }]),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// Service `s<i>` selecting `app=s<i>` with one port 80, of type NodePort with `node_port` and
/// PreferDualStack with `dual_stack`: the allocation tests' and benchmarks' Services.
pub fn numbered_service(i: usize, node_port: bool, dual_stack: bool) -> Service {
    Service {
        metadata: ObjectMeta {
            name: Some(format!("s{i}")),
            ..Default::default()
        },
        spec: Some(ServiceSpec {
            type_: node_port.then(|| "NodePort".to_owned()),
            ip_family_policy: dual_stack.then(|| "PreferDualStack".to_owned()),
            ports: Some(vec![ServicePort {
                port: 80,
                ..Default::default()
            }]),
            selector: Some([("app".to_owned(), format!("s{i}"))].into()),
            ..Default::default()
        }),
        ..Default::default()
    }
}

pub async fn create_service(client: &Client, ns: &str, svc: &Service) -> Service {
    Api::<Service>::namespaced(client.clone(), ns)
        .create(&PostParams::default(), svc)
        .await
        .unwrap()
}

/// Creates the Pods (with status), 32 at a time.
pub async fn create_pods(client: &Client, ns: &str, fixtures: &[PodFixture]) {
    stream::iter(fixtures)
        .map(|f| async move { pods::create(client, ns, f).await })
        .buffer_unordered(32)
        .collect::<Vec<_>>()
        .await;
}

/// Deletes Pods at once (grace period 0: there is no kubelet to confirm a graceful stop).
pub async fn force_delete_pods(client: &Client, ns: &str, names: &[String]) {
    let api: Api<Pod> = Api::namespaced(client.clone(), ns);
    stream::iter(names)
        .map(|n| {
            let api = api.clone();
            async move {
                api.delete(
                    n,
                    &DeleteParams {
                        grace_period_seconds: Some(0),
                        ..Default::default()
                    },
                )
                .await
                .unwrap()
            }
        })
        .buffer_unordered(32)
        .collect::<Vec<_>>()
        .await;
}

/// The EndpointSlices of `service` with the given managed-by value.
pub async fn slices_of(client: &Client, ns: &str, service: &str, managed_by: &str) -> Vec<EndpointSlice> {
    let lp = ListParams::default().labels(&format!(
        "kubernetes.io/service-name={service},endpointslice.kubernetes.io/managed-by={managed_by}"
    ));
    let mut slices = Api::<EndpointSlice>::namespaced(client.clone(), ns)
        .list(&lp)
        .await
        .unwrap()
        .items;
    slices.sort_by(|a, b| a.metadata.name.cmp(&b.metadata.name));
    slices
}

/// Target Pod names of every endpoint across `slices`, in order (duplicates kept).
pub fn endpoint_pods(slices: &[EndpointSlice]) -> Vec<String> {
    slices
        .iter()
        .flat_map(|s| s.endpoints.iter().flatten())
        .filter_map(|e| e.target_ref.as_ref()?.name.clone())
        .collect()
}

/// Counts every write (add, change, delete) of objects of one kind in a namespace from now on,
/// by watching them: each write the apiserver accepts is exactly one watch event.
pub struct WriteCounter {
    count: Arc<AtomicUsize>,
    task: JoinHandle<()>,
}

impl WriteCounter {
    /// Counts EndpointSlice writes.
    pub async fn start(client: &Client, ns: &str) -> Self {
        Self::start_for::<EndpointSlice>(client, ns).await
    }

    pub async fn start_for<K>(client: &Client, ns: &str) -> Self
    where
        K: kube::Resource<Scope = kube::core::NamespaceResourceScope>
            + Clone
            + serde::de::DeserializeOwned
            + std::fmt::Debug
            + Send
            + 'static,
        K::DynamicType: Default,
    {
        let api: Api<K> = Api::namespaced(client.clone(), ns);
        let rv = api
            .list_metadata(&ListParams::default())
            .await
            .unwrap()
            .metadata
            .resource_version
            .unwrap_or_default();
        let count = Arc::new(AtomicUsize::new(0));
        let c = count.clone();
        let stream = api
            .watch(&WatchParams::default().timeout(290), &rv)
            .await
            .unwrap();
        let task = tokio::spawn(async move {
            let mut stream = stream.boxed();
            while let Ok(Some(ev)) = stream.try_next().await {
                if matches!(
                    ev,
                    WatchEvent::Added(_) | WatchEvent::Modified(_) | WatchEvent::Deleted(_)
                ) {
                    c.fetch_add(1, Ordering::SeqCst);
                }
            }
        });
        Self { count, task }
    }

    pub fn count(&self) -> usize {
        self.count.load(Ordering::SeqCst)
    }
}

impl Drop for WriteCounter {
    fn drop(&mut self) {
        self.task.abort();
    }
}
