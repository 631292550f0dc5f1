//! Liveness and readiness checks, reported the way Kubernetes components report theirs
//! (`[+]name ok` / `[-]name failed: reason`), so operators read them as they read the apiserver's.

use std::{
    fmt::Write as _,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use kube::Client;
use svcplane_allocators::{pool::RangeUsage, usage::initialized};
use svcplane_controllers::leader::Leadership;
use tokio::{
    sync::watch,
    time::{Instant, MissedTickBehavior, interval, timeout},
};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

pub trait Check: Send + Sync {
    fn name(&self) -> &'static str;
    fn check(&self) -> Result<(), String>;
}

/// A named set of checks; the set passes when every check passes.
#[derive(Clone, Default)]
pub struct Checks(Vec<Arc<dyn Check>>);

pub struct Report {
    pub healthy: bool,
    pub body: String,
}

impl Checks {
    pub fn with(mut self, check: impl Check + 'static) -> Self {
        self.0.push(Arc::new(check));
        self
    }

    /// `what` names the endpoint ("readyz") in the failure line, as the apiserver does.
    pub fn report(&self, what: &str, verbose: bool) -> Report {
        let mut body = String::new();
        let mut healthy = true;
        for c in &self.0 {
            match c.check() {
                Ok(()) => {
                    if verbose {
                        let _ = writeln!(body, "[+]{} ok", c.name());
                    }
                }
                Err(reason) => {
                    healthy = false;
                    let _ = writeln!(body, "[-]{} failed: {reason}", c.name());
                }
            }
        }
        match (healthy, verbose) {
            (true, false) => body.push_str("ok"),
            (true, true) => {
                let _ = writeln!(body, "{what} check passed");
            }
            (false, _) => {
                let _ = writeln!(body, "{what} check failed");
            }
        }
        Report { healthy, body }
    }
}

/// Readiness fails from the moment the replica is told to stop, so load balancers that follow
/// readiness rather than Pod termination move away while it drains.
pub struct ShuttingDown(pub CancellationToken);

impl Check for ShuttingDown {
    fn name(&self) -> &'static str {
        "shutdown"
    }

    fn check(&self) -> Result<(), String> {
        if self.0.is_cancelled() {
            Err("shutting down".into())
        } else {
            Ok(())
        }
    }
}

/// Readiness of the webhook: every allocation range has been initialized in etcd by the leader's
/// first repair pass, so nothing is allocated from a bitmap that has not been reconciled with the
/// Services that exist. Latched: once the ranges were seen, a later etcd outage keeps the replica
/// ready, so the apiserver relays the webhook's own refusal (naming etcd) rather than "no
/// endpoints available". The latch follows the usage readings themselves, not the probes: an
/// outage that comes between two probes must not find it unset.
pub struct RangesInitialized {
    usage: watch::Receiver<Vec<RangeUsage>>,
    seen: Arc<AtomicBool>,
}

impl RangesInitialized {
    pub fn new(usage: watch::Receiver<Vec<RangeUsage>>) -> Self {
        let seen = Arc::new(AtomicBool::new(false));
        let (mut readings, latch) = (usage.clone(), seen.clone());
        tokio::spawn(async move {
            loop {
                let initialized_now = {
                    let u = readings.borrow_and_update();
                    !u.is_empty() && initialized(&u).is_ok()
                };
                if initialized_now {
                    latch.store(true, Ordering::Relaxed);
                    return;
                }
                if readings.changed().await.is_err() {
                    return;
                }
            }
        });
        Self { usage, seen }
    }
}

impl Check for RangesInitialized {
    fn name(&self) -> &'static str {
        "allocation-ranges"
    }

    fn check(&self) -> Result<(), String> {
        if self.seen.load(Ordering::Relaxed) {
            return Ok(());
        }
        let usage = self.usage.borrow();
        if usage.is_empty() {
            return Err("the ranges have not been read from etcd yet".into());
        }
        initialized(&usage)?;
        self.seen.store(true, Ordering::Relaxed);
        Ok(())
    }
}

/// Readiness: whether the apiserver answered its own `/readyz` at the last probe. A replica that
/// cannot reach the apiserver can neither elect nor serve allocations, so it should not receive
/// traffic; the probe keeps running, so readiness comes back by itself.
#[derive(Clone)]
pub struct ApiServerReachable(watch::Receiver<Result<(), String>>);

impl Check for ApiServerReachable {
    fn name(&self) -> &'static str {
        "apiserver"
    }

    fn check(&self) -> Result<(), String> {
        self.0.borrow().clone()
    }
}

pub fn spawn_apiserver_probe(
    client: Client,
    period: Duration,
    shutdown: CancellationToken,
) -> ApiServerReachable {
    let (tx, rx) = watch::channel(Err("not probed yet".to_owned()));
    tokio::spawn(async move {
        let mut tick = interval(period);
        tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                () = shutdown.cancelled() => return,
                _ = tick.tick() => {}
            }
            let result = probe(&client, period).await;
            tx.send_if_modified(|last| {
                let changed = *last != result;
                if changed {
                    match &result {
                        Ok(()) => info!("apiserver reachable"),
                        Err(e) => warn!(error = %e, "apiserver unreachable"),
                    }
                }
                *last = result;
                changed
            });
        }
    });
    ApiServerReachable(rx)
}

async fn probe(client: &Client, limit: Duration) -> Result<(), String> {
    let request = http::Request::get("/readyz")
        .body(Vec::new())
        .map_err(|e| e.to_string())?;
    match timeout(limit, client.request_text(request)).await {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err(format!("no answer within {limit:?}")),
    }
}

/// Liveness: a replica that believes it leads but has not renewed for well past its own fence is
/// wedged (its elector no longer runs); restarting it is the only way out. Mirrors
/// kube-controller-manager's leader-election health check.
pub struct LeaderElectionWatchdog {
    pub state: watch::Receiver<Leadership>,
    pub tolerance: Duration,
}

impl Check for LeaderElectionWatchdog {
    fn name(&self) -> &'static str {
        "leaderElection"
    }

    fn check(&self) -> Result<(), String> {
        match self.state.borrow().leading_until {
            Some(until) if Instant::now() > until + self.tolerance => Err(format!(
                "leading but not renewed for {:?} past the renew deadline",
                Instant::now() - until
            )),
            _ => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Fixed(&'static str, Result<(), String>);
    impl Check for Fixed {
        fn name(&self) -> &'static str {
            self.0
        }
        fn check(&self) -> Result<(), String> {
            self.1.clone()
        }
    }

    #[test]
    fn all_passing_says_ok() {
        let c = Checks::default()
            .with(Fixed("a", Ok(())))
            .with(Fixed("b", Ok(())));
        let r = c.report("readyz", false);
        assert!(r.healthy);
        assert_eq!(r.body, "ok");
        let r = c.report("readyz", true);
        assert_eq!(r.body, "[+]a ok\n[+]b ok\nreadyz check passed\n");
    }

    #[test]
    fn one_failure_fails_and_names_it() {
        let c = Checks::default()
            .with(Fixed("a", Ok(())))
            .with(Fixed("apiserver", Err("refused".into())));
        let r = c.report("readyz", false);
        assert!(!r.healthy);
        assert_eq!(r.body, "[-]apiserver failed: refused\nreadyz check failed\n");
    }

    #[test]
    fn no_checks_is_healthy() {
        assert!(Checks::default().report("healthz", false).healthy);
    }

    #[tokio::test(start_paused = true)]
    async fn watchdog_fails_only_well_past_the_fence() {
        let now = Instant::now();
        let (tx, rx) = watch::channel(Leadership::default());
        let dog = LeaderElectionWatchdog {
            state: rx,
            tolerance: Duration::from_secs(20),
        };
        assert_eq!(dog.check(), Ok(()), "a follower is live");
        tx.send_replace(Leadership {
            holder: Some("me".into()),
            leading_until: Some(now + Duration::from_secs(10)),
        });
        assert_eq!(dog.check(), Ok(()));
        tokio::time::advance(Duration::from_secs(30)).await;
        assert_eq!(dog.check(), Ok(()), "exactly at the tolerance still passes");
        tokio::time::advance(Duration::from_millis(1)).await;
        assert!(dog.check().is_err());
    }

    fn usage(allocated: Result<u64, String>) -> Vec<RangeUsage> {
        vec![RangeUsage {
            type_: svcplane_allocators::pool::PoolType::NodePort,
            range: "30000-32767".into(),
            size: 2768,
            allocated,
        }]
    }

    #[tokio::test]
    async fn ranges_once_seen_keep_the_replica_ready_even_if_no_probe_saw_them() {
        let (tx, rx) = watch::channel(Vec::new());
        let check = RangesInitialized::new(rx);
        assert!(check.check().is_err(), "nothing read yet");
        tx.send(usage(Err("not initialized".into()))).unwrap();
        tokio::task::yield_now().await;
        assert!(check.check().is_err());
        // Initialized, then etcd gone before any probe came.
        tx.send(usage(Ok(3))).unwrap();
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
        tx.send(usage(Err("etcd is unreachable".into()))).unwrap();
        assert_eq!(check.check(), Ok(()));
    }
}
