//! The allocation controllers, run by the leader only: the repair pass on a period (which also
//! initializes the ranges), the releases that follow stored Services (through the leader's one
//! Service watch), the reservation sweeper, and the `ServicePool` objects. They talk to the apiserver; everything they
//! decide comes from the pure modules of this crate.

pub mod pools;
pub mod release;
pub mod repair;
pub mod reservations;

use std::{sync::Arc, time::Duration};

use svcplane_controllers::{
    leader::Claim,
    runtime::{Supervisor, TaskFailed},
};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::{etcd::Fence, ranges::Ranges};

/// How long to wait before trying again to begin a term while etcd is away.
const BEGIN_RETRY: Duration = Duration::from_secs(2);

/// The allocation side of one leader term: begins the term in etcd, then runs the repair loop,
/// the releases and the reservation sweeper, every write fenced by the term, until `stop` or
/// until one fails.
pub async fn run_term(
    ranges: Arc<Ranges>,
    repair: Arc<repair::Repair>,
    sweeper: Arc<reservations::Sweeper>,
    (releases, holdings): (release::Releases, Arc<reservations::Holdings>),
    identity: String,
    claim: Claim,
    stop: CancellationToken,
) -> Result<(), TaskFailed> {
    let Some(fence) = begin_term(&ranges, &identity, claim, &stop).await else {
        return Ok(()); // stopped before the term could begin
    };
    let mut group = Supervisor::new(&stop);
    let (token, term, watch) = (group.token(), fence.clone(), holdings.clone());
    group.spawn("allocation repair", async move {
        repair.run(&term, watch, token).await;
    });
    let (token, term, watch) = (group.token(), fence.clone(), holdings.clone());
    group.spawn("allocation reservations", async move {
        sweeper.run(&term, watch, token).await;
    });
    group.spawn(
        "allocation releases",
        release::run(ranges, fence, (releases, holdings), group.token()),
    );
    group.supervise().await
}

async fn begin_term(
    ranges: &Ranges,
    identity: &str,
    claim: Claim,
    stop: &CancellationToken,
) -> Option<Fence> {
    let check = Arc::new(move || claim.check().is_ok());
    loop {
        match ranges.epoch.begin(identity, check.clone()).await {
            Ok(fence) => {
                info!("leader term begun in etcd; allocation repair and releases starting");
                return Some(fence);
            }
            Err(e) => warn!(error = %e, "cannot begin the leader term in etcd; retrying"),
        }
        tokio::select! {
            () = stop.cancelled() => return None,
            () = tokio::time::sleep(BEGIN_RETRY) => {}
        }
    }
}
