//! Frees what stored Services no longer hold (leader only). Releases must come from exactly one
//! place: two replicas releasing the same value could free it after it was handed out again.
//!
//! They follow the leader's one Service watch, the endpoint controllers' informer: [`handler`]
//! is added to it and queues what each deletion or update drops; [`run`] frees it. The same
//! handler keeps what each Service holds now ([`Holdings`]), which confirms reservations
//! ([`super::reservations`]).

use std::sync::Arc;

use svcplane_controllers::{model::ServiceView, runtime::Handler};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::info;

use super::reservations::Holdings;
use crate::{
    admission::held,
    etcd::Fence,
    ranges::Ranges,
    release::{Held, dropped},
};

/// What the handler queued, for [`run`].
pub type Releases = mpsc::UnboundedReceiver<Held>;

/// What a Service, as the informer keeps it, holds.
fn held_by(v: &ServiceView) -> Held {
    held(
        &v.type_,
        v.cluster_ips
            .iter()
            .map(String::as_str)
            .chain(v.cluster_ip.as_deref()),
        v.node_ports.iter().copied(),
    )
}

/// The Service informer's handler, from its first list on: queues what a deletion or update
/// drops, and keeps what each Service holds (a handler must not block the watch, so the releases
/// themselves happen in [`run`], the confirmations in the reservation sweeper).
pub fn handler() -> (Handler<ServiceView>, Releases, Arc<Holdings>) {
    let (tx, rx) = mpsc::unbounded_channel();
    let holdings = Arc::new(Holdings::default());
    let current = holdings.clone();
    let handler: Handler<ServiceView> = Box::new(move |old, new| {
        match (old, new) {
            (_, Some(n)) => current.set(&n.namespace, &n.name, Some(held_by(n))),
            (Some(o), None) => current.set(&o.namespace, &o.name, None),
            (None, None) => current.listed(),
        }
        if let Some(old) = old {
            let (ips, ports) = dropped(held_by(old), new.map(|n| held_by(n)));
            if !ips.is_empty() || !ports.is_empty() {
                let held = (ips, ports);
                current.releasing(&held);
                let _ = tx.send(held);
            }
        }
    });
    (handler, rx, holdings)
}

/// Frees what the handler queued until `stop`, every release fenced by this leader term. Ends
/// early only if the informer holding the handler went away.
pub async fn run(
    allocators: Arc<Ranges>,
    fence: Fence,
    (mut releases, holdings): (Releases, Arc<Holdings>),
    stop: CancellationToken,
) {
    loop {
        tokio::select! {
            () = stop.cancelled() => break,
            next = releases.recv() => match next {
                Some((ips, ports)) => {
                    info!(?ips, ?ports, "releasing what a Service no longer holds");
                    let _gate = allocators.repair_gate.lock().await;
                    allocators.release(&ips, &ports, Some(&fence)).await;
                    holdings.released(&(ips, ports));
                }
                None => break,
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use k8s_openapi::api::core::v1::Service;
    use serde_json::json;

    use super::*;
    use crate::admission::held_values;

    fn svc(spec: serde_json::Value) -> Service {
        serde_json::from_value(json!({"metadata": {"namespace": "ns", "name": "s"}, "spec": spec})).unwrap()
    }

    /// The informer keeps views, repair reads whole Services: both must see the same values.
    #[test]
    fn a_view_holds_what_its_service_holds() {
        for spec in [
            json!({"type": "ClusterIP", "clusterIP": "10.96.0.5", "clusterIPs": ["10.96.0.5", "fd00::5"]}),
            json!({"type": "NodePort", "clusterIP": "10.96.0.6",
                   "ports": [{"port": 80, "nodePort": 30080}, {"port": 81, "nodePort": 30081}]}),
            json!({"type": "LoadBalancer", "clusterIP": "10.96.0.7", "externalTrafficPolicy": "Local",
                   "healthCheckNodePort": 32000, "ports": [{"port": 80, "nodePort": 30082}]}),
            json!({"type": "ExternalName", "externalName": "example.com", "clusterIP": "10.96.0.8"}),
            json!({"type": "ClusterIP", "clusterIP": "None"}),
        ] {
            let s = svc(spec);
            assert_eq!(held_by(&ServiceView::from(&s)), held_values(&s), "{s:?}");
        }
    }

    #[test]
    fn the_handler_queues_what_an_update_or_deletion_drops() {
        let (handler, mut releases, _holdings) = handler();
        let np = Arc::new(ServiceView::from(&svc(json!({
            "type": "NodePort", "clusterIP": "10.96.0.6", "ports": [{"port": 80, "nodePort": 30080}]
        }))));
        let cip = Arc::new(ServiceView::from(&svc(
            json!({"type": "ClusterIP", "clusterIP": "10.96.0.6"}),
        )));
        handler(None, Some(&np));
        handler(Some(&np), Some(&cip));
        handler(Some(&cip), None);
        assert_eq!(releases.try_recv().unwrap(), (vec![], vec![30080]));
        assert_eq!(
            releases.try_recv().unwrap(),
            (vec!["10.96.0.6".parse().unwrap()], vec![])
        );
        assert!(releases.try_recv().is_err(), "an add drops nothing");
    }
}
