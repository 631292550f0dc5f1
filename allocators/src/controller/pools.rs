//! Leader only: one `ServicePool` per range, so that `kubectl get servicepools` answers "how full
//! is it" without access to etcd or to metrics. Only what changed is written.

use std::{collections::HashMap, time::Duration};

use kube::{
    Api, Client,
    api::{ListParams, Patch, PatchParams},
};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::pool::{MANAGED_BY, RangeUsage, ServicePool, desired_pool, desired_status};

const FIELD_MANAGER: &str = "svcplane-controller-manager";
const POOL_RETRY: Duration = Duration::from_secs(5);

/// Leader only: keeps one `ServicePool` per range, writing only what changed.
pub async fn write_pools(client: Client, mut rx: watch::Receiver<Vec<RangeUsage>>, stop: CancellationToken) {
    let api: Api<ServicePool> = Api::all(client);
    let mut known: HashMap<String, ServicePool> = HashMap::new();
    let selector = format!("{}={}", MANAGED_BY.0, MANAGED_BY.1);
    match api.list(&ListParams::default().labels(&selector)).await {
        Ok(list) => {
            for p in list.items {
                if let Some(name) = p.metadata.name.clone() {
                    known.insert(name, p);
                }
            }
        }
        // Without the CRD, pools are simply not shown; allocation does not depend on them.
        Err(e) => warn!(error = %e, "cannot list ServicePools (is the CRD applied?); writing them anyway"),
    }
    loop {
        let usages = rx.borrow_and_update().clone();
        let mut failed = false;
        for usage in &usages {
            if let Err(e) = write_pool(&api, &mut known, usage).await {
                warn!(range = %usage.range, error = %e, "cannot write ServicePool");
                failed = true;
            }
        }
        tokio::select! {
            () = stop.cancelled() => return,
            changed = rx.changed() => if changed.is_err() { return },
            // A failed write (CRD not yet established, apiserver away) is retried even if the
            // usage stays the same.
            () = tokio::time::sleep(POOL_RETRY), if failed => {}
        }
    }
}

async fn write_pool(
    api: &Api<ServicePool>,
    known: &mut HashMap<String, ServicePool>,
    usage: &RangeUsage,
) -> Result<(), kube::Error> {
    let mut want = desired_pool(usage);
    let name = want.metadata.name.clone().unwrap_or_default();
    let current = known.get(&name);
    let params = PatchParams::apply(FIELD_MANAGER).force();
    if current.is_none_or(|c| c.spec != want.spec || c.metadata.labels != want.metadata.labels) {
        let stored = api.patch(&name, &params, &Patch::Apply(&want)).await?;
        info!(pool = %name, "ServicePool written");
        known.insert(name.clone(), stored);
    }
    let previous = known.get(&name).and_then(|c| c.status.clone());
    let status = desired_status(usage, previous.as_ref());
    if previous.as_ref() == Some(&status) {
        return Ok(());
    }
    want.status = Some(status.clone());
    let stored = api.patch_status(&name, &params, &Patch::Apply(&want)).await?;
    debug!(pool = %name, ?status, "ServicePool status written");
    known.insert(name, stored);
    Ok(())
}
