//! Runs the enabled controllers for one leadership term: builds the caches and informers they
//! need, waits until every cache is complete, then runs the controllers until stopped.
//!
//! Caches live only while leading, as in kube-controller-manager: a follower holds no copy of
//! the cluster, and a new leader starts from a fresh list rather than from state that may have
//! drifted while it was not acting.

use std::{collections::BTreeSet, sync::Arc, time::Duration};

use k8s_openapi::api::{
    core::v1::{Endpoints, Node, Pod, Service},
    discovery::v1::EndpointSlice,
};
use kube::{Api, Client, runtime::watcher};
use prometheus::Registry;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::{
    endpoints::controller::{self as endpoints_controller, EndpointsController, EndpointsMetrics},
    endpointslice::{
        controller::{self as slice_controller, EndpointSliceController},
        metrics::EndpointSliceMetrics,
    },
    events::EventSink,
    mirroring::controller::{self as mirroring_controller, MirroringController, MirroringMetrics},
    model::{LABEL_MANAGED_BY, LABEL_SERVICE_NAME, NodeView, PodView, ServiceView},
    runtime::{
        Handler, Informer, Store, Supervisor, Synced, TaskFailed, WorkqueueMetrics, controller, wait_for_sync,
    },
};

pub const ENDPOINTSLICE_CONTROLLER: &str = "endpointslice-controller";
pub const ENDPOINTS_CONTROLLER: &str = "endpoints-controller";
pub const MIRRORING_CONTROLLER: &str = "endpointslice-mirroring-controller";
/// Every controller svcplane's controller-manager knows, in upstream's names.
pub const KNOWN_CONTROLLERS: [&str; 3] = [
    ENDPOINTSLICE_CONTROLLER,
    ENDPOINTS_CONTROLLER,
    MIRRORING_CONTROLLER,
];
/// In KEP-4770 coexistence mode only the EndpointSlice controller is on by default: upstream's
/// Endpoints and mirroring controllers keep running and would fight over the same objects.
pub const COEXISTENCE_DEFAULTS: [&str; 1] = [ENDPOINTSLICE_CONTROLLER];

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ControllersFlagError {
    #[error("unknown controller {0:?}; known controllers: {known}", known = KNOWN_CONTROLLERS.join(", "))]
    Unknown(String),
}

/// Parses kube-controller-manager's `--controllers` syntax: `*` turns on every controller that is
/// on by default, `name` turns one on, `-name` turns one off.
pub fn parse_controllers(
    items: &[String],
    coexistence: bool,
) -> Result<BTreeSet<&'static str>, ControllersFlagError> {
    let mut on = BTreeSet::new();
    let mut off = BTreeSet::new();
    let mut star = false;
    for item in items
        .iter()
        .flat_map(|i| i.split(','))
        .map(str::trim)
        .filter(|i| !i.is_empty())
    {
        if item == "*" {
            star = true;
            continue;
        }
        let (disable, name) = match item.strip_prefix('-') {
            Some(n) => (true, n),
            None => (false, item),
        };
        let known = KNOWN_CONTROLLERS
            .iter()
            .find(|k| **k == name)
            .ok_or_else(|| ControllersFlagError::Unknown(name.to_owned()))?;
        if disable {
            off.insert(*known);
        } else {
            on.insert(*known);
        }
    }
    if star {
        on.extend(if coexistence {
            &COEXISTENCE_DEFAULTS[..]
        } else {
            &KNOWN_CONTROLLERS[..]
        });
    }
    Ok(on.difference(&off).copied().collect())
}

/// Metrics registered once per process and shared by every leadership term.
#[derive(Clone)]
pub struct ControllerMetrics {
    pub workqueue: WorkqueueMetrics,
    pub endpointslice: Arc<EndpointSliceMetrics>,
    pub endpoints: Arc<EndpointsMetrics>,
    pub mirroring: Arc<MirroringMetrics>,
}

impl ControllerMetrics {
    pub fn register(registry: &Registry) -> prometheus::Result<Self> {
        Ok(Self {
            workqueue: WorkqueueMetrics::register(registry)?,
            endpointslice: Arc::new(EndpointSliceMetrics::register(registry)?),
            endpoints: Arc::new(EndpointsMetrics::register(registry)?),
            mirroring: Arc::new(MirroringMetrics::register(registry)?),
        })
    }
}

#[derive(Clone, Debug)]
pub struct ManagerConfig {
    pub controllers: BTreeSet<&'static str>,
    pub endpointslice: slice_controller::Config,
    pub endpoints: endpoints_controller::Config,
    pub mirroring: mirroring_controller::Config,
    /// Reported as the instance of Events (the pod name).
    pub identity: String,
}

/// Runs the enabled controllers until `stop`, or until one of them or their informers fails.
/// `service_handlers` are told of every Service change too (other leader work that follows
/// Services shares this watch instead of opening its own).
pub async fn run(
    client: Client,
    cfg: ManagerConfig,
    metrics: ControllerMetrics,
    service_handlers: Vec<Handler<ServiceView>>,
    stop: CancellationToken,
) -> Result<(), TaskFailed> {
    if cfg.controllers.is_empty() {
        warn!("no endpoint controllers enabled");
        if service_handlers.is_empty() {
            stop.cancelled().await;
            return Ok(());
        }
    }
    // Initial lists are served from the apiserver's watch cache (resourceVersion=0), as
    // client-go's informers do: one response instead of pages read from etcd; the watch that
    // follows brings anything newer.
    let watch_config = || watcher::Config::default().any_semantic();
    let services = Arc::new(Store::<ServiceView>::default());
    let pods = Arc::new(Store::<PodView>::default());
    let nodes = Arc::new(Store::<NodeView>::default());
    let slices = Arc::new(Store::<EndpointSlice>::new(Some(|s: &EndpointSlice| {
        s.metadata.labels.as_ref()?.get(LABEL_SERVICE_NAME).cloned()
    })));

    // Except Services: what this watch reports deleted, allocation releases, and a relist from a
    // watch cache that lags (another apiserver's, after a 410) could report a live Service as
    // deleted, or replay an old deletion. Their lists are consistent (the current revision; the
    // apiserver still serves them from its cache once that has caught up).
    let mut service_informer = Informer::new(
        "services",
        Api::<Service>::all(client.clone()),
        watcher::Config::default(),
        |s| ServiceView::from(&s),
        services.clone(),
    );
    // Allocation's handlers keep what every Service holds, the first list included.
    for handler in service_handlers {
        service_informer.on_change_from_start(handler);
    }
    let mut pod_informer = Informer::new(
        "pods",
        Api::<Pod>::all(client.clone()),
        watch_config(),
        |p| PodView::from(&p),
        pods.clone(),
    );
    let mut node_informer = Informer::new(
        "nodes",
        Api::<Node>::all(client.clone()),
        watch_config(),
        |n| NodeView::from(&n),
        nodes.clone(),
    );

    let mut slice_ctl = None;
    if cfg.controllers.contains(ENDPOINTSLICE_CONTROLLER) {
        let caches = slice_controller::Caches {
            services: services.clone(),
            pods: pods.clone(),
            nodes: nodes.clone(),
            slices: slices.clone(),
        };
        let events = EventSink::new(client.clone(), ENDPOINTSLICE_CONTROLLER, &cfg.identity);
        let c = EndpointSliceController::new(
            client.clone(),
            caches,
            cfg.endpointslice.clone(),
            metrics.endpointslice.clone(),
            &metrics.workqueue,
            events,
        );
        let h = c.clone();
        service_informer.on_change(Box::new(move |o, n| h.on_service(o, n)));
        let h = c.clone();
        pod_informer.on_change(Box::new(move |o, n| h.on_pod(o, n)));
        let h = c.clone();
        node_informer.on_change(Box::new(move |o, n| h.on_node(o, n)));
        slice_ctl = Some(c);
    }

    let endpoints = Arc::new(Store::<Endpoints>::default());
    let mut endpoints_informer = Informer::new(
        "endpoints",
        Api::<Endpoints>::all(client.clone()),
        watch_config(),
        |mut e: Endpoints| {
            e.metadata.managed_fields = None;
            e
        },
        endpoints.clone(),
    );
    let mut endpoints_ctl = None;
    if cfg.controllers.contains(ENDPOINTS_CONTROLLER) {
        let caches = endpoints_controller::Caches {
            services: services.clone(),
            pods: pods.clone(),
            endpoints: endpoints.clone(),
        };
        let events = EventSink::new(client.clone(), ENDPOINTS_CONTROLLER, &cfg.identity);
        let c = EndpointsController::new(
            client.clone(),
            caches,
            cfg.endpoints.clone(),
            metrics.endpoints.clone(),
            &metrics.workqueue,
            events,
        );
        let h = c.clone();
        service_informer.on_change(Box::new(move |o, n| h.on_service(o, n)));
        let h = c.clone();
        pod_informer.on_change(Box::new(move |o, n| h.on_pod(o, n)));
        let h = c.clone();
        endpoints_informer.on_change(Box::new(move |o, n| h.on_endpoints(o, n)));
        endpoints_ctl = Some(c);
    }

    let mut mirroring_ctl = None;
    if cfg.controllers.contains(MIRRORING_CONTROLLER) {
        let caches = mirroring_controller::Caches {
            services: services.clone(),
            endpoints: endpoints.clone(),
            slices: slices.clone(),
        };
        let events = EventSink::new(client.clone(), MIRRORING_CONTROLLER, &cfg.identity);
        let c = MirroringController::new(
            client.clone(),
            caches,
            cfg.mirroring.clone(),
            metrics.mirroring.clone(),
            &metrics.workqueue,
            events,
        );
        let h = c.clone();
        service_informer.on_change(Box::new(move |o, n| h.on_service(o, n)));
        let h = c.clone();
        endpoints_informer.on_change(Box::new(move |o, n| h.on_endpoints(o, n)));
        mirroring_ctl = Some(c);
    }

    // Only the slices svcplane manages are cached: the selector keeps others out of memory.
    let managers = [
        cfg.endpointslice.selection.slice_manager(),
        cfg.endpointslice.selection.mirroring_manager(),
    ];
    let mut slice_informer = Informer::new(
        "endpointslices",
        Api::<EndpointSlice>::all(client.clone()),
        watch_config().labels(&format!("{LABEL_MANAGED_BY} in ({})", managers.join(","))),
        |mut s: EndpointSlice| {
            s.metadata.managed_fields = None;
            s
        },
        slices.clone(),
    );
    if let Some(c) = &slice_ctl {
        let h = c.clone();
        slice_informer.on_change(Box::new(move |o, n| h.on_slice(o, n)));
    }
    if let Some(c) = &mirroring_ctl {
        let h = c.clone();
        slice_informer.on_change(Box::new(move |o, n| h.on_slice(o, n)));
    }

    // One group for the term: the informers, and the controllers once every cache is complete.
    // Any of them dying ends the whole term (see `Supervisor`).
    let mut group = Supervisor::new(&stop);
    let token = group.token();
    let mut synced: Vec<Synced> = vec![service_informer.synced()];
    group.spawn("services informer", service_informer.run(token.clone()));
    // Watch only what the enabled controllers read.
    if !cfg.controllers.is_empty() {
        synced.push(pod_informer.synced());
        group.spawn("pods informer", pod_informer.run(token.clone()));
    }
    if slice_ctl.is_some() {
        synced.push(node_informer.synced());
        group.spawn("nodes informer", node_informer.run(token.clone()));
    }
    if slice_ctl.is_some() || mirroring_ctl.is_some() {
        synced.push(slice_informer.synced());
        group.spawn("endpointslices informer", slice_informer.run(token.clone()));
    }
    if endpoints_ctl.is_some() || mirroring_ctl.is_some() {
        synced.push(endpoints_informer.synced());
        group.spawn("endpoints informer", endpoints_informer.run(token.clone()));
    }
    group.spawn_fallible("endpoint controllers", async move {
        if !wait_for_sync(&mut synced, &token, Duration::from_secs(10)).await {
            return Ok(()); // stopped first
        }
        info!(
            services = services.len(),
            pods = pods.len(),
            nodes = nodes.len(),
            slices = slices.len(),
            endpoints = endpoints.len(),
            "caches synced"
        );
        let mut controllers = Supervisor::new(&token);
        if let Some(c) = slice_ctl {
            controllers.spawn_fallible(ENDPOINTSLICE_CONTROLLER, controller::run(c, controllers.token()));
        }
        if let Some(c) = endpoints_ctl {
            controllers.spawn_fallible(ENDPOINTS_CONTROLLER, controller::run(c, controllers.token()));
        }
        if let Some(c) = mirroring_ctl {
            controllers.spawn_fallible(MIRRORING_CONTROLLER, controller::run(c, controllers.token()));
        }
        controllers.supervise().await
    });
    group.supervise().await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(items: &[&str]) -> Result<Vec<&'static str>, ControllersFlagError> {
        parse_controllers(&items.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>(), false)
            .map(|s| s.into_iter().collect())
    }

    #[test]
    fn controllers_flag_follows_upstream_syntax() {
        let all = [
            "endpoints-controller",
            "endpointslice-controller",
            "endpointslice-mirroring-controller",
        ];
        assert_eq!(parse(&["*"]).unwrap(), all);
        assert_eq!(
            parse(&["*,-endpoints-controller,-endpointslice-mirroring-controller"]).unwrap(),
            ["endpointslice-controller"]
        );
        assert_eq!(parse(&["*", "-endpoints-controller"]).unwrap(), all[1..]);
        assert_eq!(
            parse(&["endpointslice-controller"]).unwrap(),
            ["endpointslice-controller"]
        );
        assert_eq!(parse(&[]).unwrap(), Vec::<&str>::new());
        assert_eq!(
            parse(&["*", "bogus"]),
            Err(ControllersFlagError::Unknown("bogus".into()))
        );
        assert_eq!(
            parse(&["-nope"]),
            Err(ControllersFlagError::Unknown("nope".into()))
        );
        let coexist = parse_controllers(&["*".to_owned()], true).unwrap();
        assert_eq!(
            coexist.into_iter().collect::<Vec<_>>(),
            ["endpointslice-controller"]
        );
    }
}
