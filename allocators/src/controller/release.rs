//! Frees what stored Services no longer hold (leader only). Releases must come from exactly one
//! place: two replicas releasing the same value could free it after it was handed out again.

use std::sync::Arc;

use k8s_openapi::api::core::v1::Service;
use kube::{Api, Client, runtime::watcher};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::info;

use svcplane_controllers::runtime::{Informer, Store, Supervisor, TaskFailed};

use crate::{etcd::Fence, ranges::Ranges, release::dropped};

/// Watches Services until `stop`, releasing what deletions and updates drop; every release is
/// fenced by this leader term. Ends early only if its watch or its release loop fails.
pub async fn run(
    client: Client,
    allocators: Arc<Ranges>,
    fence: Fence,
    stop: CancellationToken,
) -> Result<(), TaskFailed> {
    let store = Arc::new(Store::<Service>::default());
    let mut informer = Informer::new(
        "services (allocation releases)",
        Api::<Service>::all(client),
        watcher::Config::default().any_semantic(),
        |mut s: Service| {
            s.metadata.managed_fields = None;
            s
        },
        store,
    );
    // Handlers must not block the watch; releases go through a queue to one task.
    let (tx, mut rx) = mpsc::unbounded_channel();
    informer.on_change(Box::new(move |old, new| {
        if let Some(old) = old {
            let (ips, ports) = dropped(old, new.map(|n| &**n));
            if !ips.is_empty() || !ports.is_empty() {
                let _ = tx.send((ips, ports));
            }
        }
    }));
    let mut group = Supervisor::new(&stop);
    group.spawn("services informer (releases)", informer.run(group.token()));
    let token = group.token();
    group.spawn("releases", async move {
        loop {
            tokio::select! {
                () = token.cancelled() => break,
                next = rx.recv() => match next {
                    Some((ips, ports)) => {
                        info!(?ips, ?ports, "releasing what a Service no longer holds");
                        allocators.release(&ips, &ports, Some(&fence)).await;
                    }
                    None => break,
                },
            }
        }
    });
    group.supervise().await
}
