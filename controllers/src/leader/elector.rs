use std::future::Future;

use k8s_openapi::{api::coordination::v1::Lease, jiff::Timestamp};
use kube::{
    Client,
    api::{Api, ObjectMeta, PostParams},
};
use tokio::{
    sync::watch,
    task::JoinHandle,
    time::{Instant, sleep_until, timeout, timeout_at},
};
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug, error, info, info_span, warn};

use crate::runtime::TaskFailed;

use super::{
    ConfigError, Decision, ElectionConfig, LeaderMetrics, LeaseRecord, Observer, claim, decide, released,
};

/// What this replica knows about the election; published to health checks and to writers that
/// must re-check leadership right before a write.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Leadership {
    /// The holder last seen, this replica included; `None` when nobody holds the lease.
    pub holder: Option<String>,
    /// Set while this replica leads: the instant after which it must no longer act unless it
    /// renews first.
    pub leading_until: Option<Instant>,
}

impl Leadership {
    pub fn is_leading_at(&self, now: Instant) -> bool {
        self.leading_until.is_some_and(|until| now < until)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("invalid leader election configuration: {0}")]
    Config(#[from] ConfigError),
    /// The leader-only work failed while leading; the lease was released so another replica
    /// takes over at once, and this one should not campaign again half-dead.
    #[error("leader-only work failed: {0}")]
    WorkFailed(#[source] TaskFailed),
}

/// Campaigns for one Lease and runs the leader-only work while it holds it.
pub struct Elector {
    api: Api<Lease>,
    cfg: ElectionConfig,
    metrics: LeaderMetrics,
    state: watch::Sender<Leadership>,
}

enum Outcome {
    Leading,
    Following {
        holder: Option<String>,
        recheck_at: Option<Instant>,
    },
}

/// What the elector carries from one attempt to the next.
#[derive(Default)]
struct Session {
    observer: Observer,
    /// The Lease as last read or written: its resourceVersion guards the next write, and fields
    /// other than the election record are written back unchanged.
    lease: Option<Lease>,
    /// Set while leading: when this replica must stop acting without a renewal.
    fence: Option<Instant>,
}

impl Session {
    fn accept_write(&mut self, mut written: Lease, attempt_start: Instant) {
        // The apiserver may normalise what we sent (timestamps to microseconds): remember what it
        // stored, so the next read compares equal and does not look like someone else's renewal.
        let record = LeaseRecord::from_spec(written.spec.as_ref());
        written.metadata.managed_fields = None;
        self.observer.observe(record, attempt_start);
        self.lease = Some(written);
    }
}

/// Leader-only work currently running, with the token that asks it to stop.
struct Worker {
    stop: CancellationToken,
    handle: JoinHandle<Result<(), TaskFailed>>,
}

/// Resolves when the running work ends by itself (it never should while leading).
async fn work_ended(worker: &mut Option<Worker>) -> TaskFailed {
    let Some(w) = worker.as_mut() else {
        return std::future::pending().await;
    };
    let joined = (&mut w.handle).await;
    *worker = None;
    match joined {
        Ok(Err(failed)) => failed,
        Ok(Ok(())) => TaskFailed {
            task: "leader-only work",
            how: "ended unexpectedly".to_owned(),
        },
        Err(e) => TaskFailed {
            task: "leader-only work",
            how: if e.is_panic() {
                "panicked".to_owned()
            } else {
                "was cancelled".to_owned()
            },
        },
    }
}

impl Elector {
    pub fn new(client: Client, cfg: ElectionConfig, metrics: LeaderMetrics) -> Result<Self, Error> {
        cfg.validate()?;
        let api = Api::namespaced(client, &cfg.namespace);
        let (state, _) = watch::channel(Leadership::default());
        metrics.set_leading(&cfg.name, false);
        Ok(Self {
            api,
            cfg,
            metrics,
            state,
        })
    }

    pub fn subscribe(&self) -> watch::Receiver<Leadership> {
        self.state.subscribe()
    }

    /// Campaigns until `shutdown`, running `work` whenever this replica leads. The token handed to
    /// `work` is cancelled when leadership ends; work that has not finished `stop_grace` later is
    /// aborted, which still leaves it gone before the lease can pass to another replica. On
    /// shutdown the work is stopped first and the lease released after.
    ///
    /// Work that ends by itself while leading (a task of it failed) ends the campaign: the lease
    /// is released and the failure returned, so the process can exit and start afresh instead of
    /// leading with part of its work dead.
    pub async fn run<W, F>(self, shutdown: CancellationToken, work: W) -> Result<(), Error>
    where
        W: FnMut(CancellationToken) -> F,
        F: Future<Output = Result<(), TaskFailed>> + Send + 'static,
    {
        let span = info_span!(
            "leader_election",
            lease = %format_args!("{}/{}", self.cfg.namespace, self.cfg.name),
            identity = %self.cfg.identity,
        );
        self.campaign(shutdown, work).instrument(span).await
    }

    async fn campaign<W, F>(self, shutdown: CancellationToken, mut work: W) -> Result<(), Error>
    where
        W: FnMut(CancellationToken) -> F,
        F: Future<Output = Result<(), TaskFailed>> + Send + 'static,
    {
        info!("campaigning for leadership");
        let mut session = Session::default();
        let mut worker: Option<Worker> = None;
        let mut failure = None;
        loop {
            let start = Instant::now();
            // A leader's attempt may not outlive its fence; a follower's is bounded so a hung
            // request cannot stop it from noticing a free lease for long.
            let limit = session.fence.unwrap_or(start + self.cfg.renew_deadline);
            let outcome = tokio::select! {
                biased;
                () = shutdown.cancelled() => break,
                r = timeout_at(limit, self.attempt(&mut session, start)) => r,
            };
            let mut next = Instant::now() + self.cfg.retry_period;
            match outcome {
                Ok(Ok(Outcome::Leading)) => {
                    if session.fence.is_none() {
                        info!("acquired the lease; starting leader-only work");
                        self.metrics.set_leading(&self.cfg.name, true);
                    }
                    let fence = start + self.cfg.renew_deadline;
                    session.fence = Some(fence);
                    // Published first: the work's writes check this claim.
                    self.publish(Some(self.cfg.identity.clone()), Some(fence));
                    if worker.is_none() {
                        let stop = CancellationToken::new();
                        let handle = tokio::spawn(work(stop.clone()));
                        worker = Some(Worker { stop, handle });
                    }
                }
                Ok(Ok(Outcome::Following { holder, recheck_at })) => {
                    if session.fence.take().is_some() {
                        warn!(new_holder = ?holder, "lost the lease");
                        self.step_down(worker.take()).await;
                    }
                    if let Some(at) = recheck_at {
                        // Wake exactly when the holder's lease runs out, not up to a period later.
                        next = next.min(at);
                    }
                    self.publish(holder, None);
                }
                Ok(Err(e)) => warn!(error = %e, "leader election attempt failed"),
                Err(_) => warn!("leader election attempt timed out"),
            }
            if let Some(fence) = session.fence {
                if Instant::now() >= fence {
                    warn!(
                        renew_deadline = ?self.cfg.renew_deadline,
                        "could not renew the lease within the renew deadline; stepping down"
                    );
                    session.fence = None;
                    self.step_down(worker.take()).await;
                    self.publish(Some(self.cfg.identity.clone()), None);
                } else {
                    next = next.min(fence);
                }
            }
            tokio::select! {
                biased;
                () = shutdown.cancelled() => break,
                failed = work_ended(&mut worker) => {
                    error!(task = failed.task, reason = %failed.how, "leader-only work failed; giving up the lease");
                    failure = Some(failed);
                    break;
                }
                () = sleep_until(next) => {}
            }
        }
        let was_leading = session.fence.take().is_some();
        self.step_down(worker.take()).await;
        if was_leading {
            self.release(&session).await;
        }
        self.publish(None, None);
        info!("left the election");
        failure.map_or(Ok(()), |f| Err(Error::WorkFailed(f)))
    }

    async fn attempt(&self, s: &mut Session, start: Instant) -> kube::Result<Outcome> {
        // Fast path: a leader renews the object it last wrote without reading it first. A
        // conflict means someone else wrote; fall back to reading, as client-go does.
        if s.fence.is_some()
            && let Some(lease) = s.lease.clone()
        {
            let record = claim(s.observer.last().map(|o| &o.record), &self.cfg, Timestamp::now());
            match self.write(lease, &record).await {
                Ok(written) => {
                    s.accept_write(written, start);
                    return Ok(Outcome::Leading);
                }
                Err(e) => {
                    debug!(error = %e, "optimistic renewal failed; reading the lease");
                    self.metrics.slowpath(&self.cfg.name);
                }
            }
        }

        let Some(current) = self.api.get_opt(&self.cfg.name).await? else {
            let record = claim(None, &self.cfg, Timestamp::now());
            let mut lease = Lease {
                metadata: ObjectMeta {
                    name: Some(self.cfg.name.clone()),
                    namespace: Some(self.cfg.namespace.clone()),
                    ..Default::default()
                },
                spec: Some(Default::default()),
            };
            record.apply_to(lease.spec.get_or_insert_with(Default::default));
            return match self.api.create(&PostParams::default(), &lease).await {
                Ok(created) => {
                    s.accept_write(created, start);
                    Ok(Outcome::Leading)
                }
                // Another candidate created it first; read it on the next attempt.
                Err(e) if is_conflict(&e) => Ok(Outcome::Following {
                    holder: None,
                    recheck_at: None,
                }),
                Err(e) => Err(e),
            };
        };

        let record = LeaseRecord::from_spec(current.spec.as_ref());
        let observed = s.observer.observe(record, Instant::now()).clone();
        s.lease = Some(current.clone());
        match decide(Some(&observed), &self.cfg, Instant::now(), Timestamp::now()) {
            Decision::Wait { holder, expires_at } => Ok(Outcome::Following {
                holder: Some(holder),
                recheck_at: Some(expires_at),
            }),
            Decision::Write(record) => match self.write(current, &record).await {
                Ok(written) => {
                    s.accept_write(written, start);
                    Ok(Outcome::Leading)
                }
                Err(e) if is_conflict(&e) => Ok(Outcome::Following {
                    holder: observed.record.holder,
                    recheck_at: None,
                }),
                Err(e) => Err(e),
            },
        }
    }

    /// Replaces the Lease under the resourceVersion it was read with.
    async fn write(&self, mut lease: Lease, record: &LeaseRecord) -> kube::Result<Lease> {
        record.apply_to(lease.spec.get_or_insert_with(Default::default));
        lease.metadata.managed_fields = None;
        self.api
            .replace(&self.cfg.name, &PostParams::default(), &lease)
            .await
    }

    /// Stops the leader-only work, then reports this replica as no longer leading: once the
    /// gauge reads 0, nothing of the leader's work is running any more.
    async fn step_down(&self, worker: Option<Worker>) {
        if let Some(Worker { stop, mut handle }) = worker {
            stop.cancel();
            if timeout(self.cfg.stop_grace(), &mut handle).await.is_err() {
                warn!(grace = ?self.cfg.stop_grace(), "leader-only work did not stop in time; aborting it");
                handle.abort();
                // An aborted task finishes at its next await point.
                let _ = handle.await;
            }
            info!("leader-only work stopped");
        }
        self.metrics.set_leading(&self.cfg.name, false);
    }

    async fn release(&self, s: &Session) {
        let (Some(lease), Some(seen)) = (s.lease.clone(), s.observer.last()) else {
            return;
        };
        if !seen.record.is_held_by(&self.cfg.identity) {
            return;
        }
        let record = released(&seen.record, Timestamp::now());
        match timeout(self.cfg.renew_deadline, self.write(lease, &record)).await {
            Ok(Ok(_)) => info!("released the lease"),
            Ok(Err(e)) => warn!(error = %e, "could not release the lease; it will expire"),
            Err(_) => warn!("releasing the lease timed out; it will expire"),
        }
    }

    fn publish(&self, holder: Option<String>, leading_until: Option<Instant>) {
        self.state.send_if_modified(|state| {
            if state.holder != holder && leading_until.is_none() {
                match &holder {
                    Some(h) if *h != self.cfg.identity => info!(leader = %h, "following"),
                    _ => {}
                }
            }
            // Subscribers care about changes of holder or role, not about every renewal.
            let notable = state.holder != holder || state.leading_until.is_some() != leading_until.is_some();
            *state = Leadership {
                holder,
                leading_until,
            };
            notable
        });
    }
}

fn is_conflict(e: &kube::Error) -> bool {
    matches!(e, kube::Error::Api(status) if status.code == 409)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn leadership_expires_at_its_fence() {
        let t0 = Instant::now();
        let l = Leadership {
            holder: Some("me".into()),
            leading_until: Some(t0 + Duration::from_secs(10)),
        };
        assert!(l.is_leading_at(t0));
        assert!(l.is_leading_at(t0 + Duration::from_millis(9_999)));
        assert!(!l.is_leading_at(t0 + Duration::from_secs(10)));
        assert!(
            !Leadership {
                holder: Some("me".into()),
                leading_until: None
            }
            .is_leading_at(t0)
        );
    }
}
