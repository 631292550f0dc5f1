//! The one shape every controller has, after kube-runtime's `Controller::run(reconcile,
//! error_policy, ctx)`: a work queue of object keys fed by the informers' handlers, workers that
//! reconcile one key at a time with per-key backoff and a cap on retries, and one place that times
//! each sync, counts it by result and logs failures. A controller supplies only what is its own
//! ([`Reconciler`]): which keys to look at on start, how to reconcile a key, what a failure means
//! (retry soon, or back off and emit an Event), and where its sync metrics go.

use std::{future::Future, sync::Arc, time::Duration};

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::{Backoff, Outcome, TaskFailed, WorkQueue, WorkqueueMetrics, run_workers};
use crate::model::ObjectKey;

/// How one reconcile ended, as the sync metrics count it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SyncResult {
    Success,
    /// Not a failure: the controller's cache had not caught up with its own writes yet.
    Stale,
    Error,
}

impl SyncResult {
    pub fn label(self) -> &'static str {
        match self {
            Self::Success => "success",
            Self::Stale => "stale",
            Self::Error => "error",
        }
    }
}

/// What a failed reconcile calls for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorPolicy {
    /// Look again after this, without counting a failure (a cache behind the controller's own
    /// writes).
    RetryAfter(Duration),
    /// A failure: retried with the queue's backoff until the retry cap.
    Backoff,
}

/// Fixed properties of a controller.
#[derive(Clone, Copy, Debug)]
pub struct Settings {
    /// Upstream's controller name, for logs and spans.
    pub name: &'static str,
    /// Concurrent workers (upstream's `--concurrent-*-syncs`).
    pub workers: usize,
    /// After this many failed syncs in a row a key waits for its next change.
    pub max_retries: u32,
}

/// What every controller owns: its settings and the queue its event handlers feed.
pub struct Core {
    pub settings: Settings,
    pub queue: Arc<WorkQueue<ObjectKey>>,
}

impl Core {
    /// `queue_name` is upstream's work queue name (the `name` label of `workqueue_*`).
    pub fn new(settings: Settings, backoff: Backoff, metrics: &WorkqueueMetrics, queue_name: &str) -> Self {
        Self {
            settings,
            queue: Arc::new(WorkQueue::new(backoff).with_metrics(metrics, queue_name)),
        }
    }
}

/// What a controller supplies to [`run`].
pub trait Reconciler: Send + Sync + 'static {
    type Error: std::fmt::Display + Send;

    fn core(&self) -> &Core;

    /// Queues what must be looked at when the controller starts (every object it manages, and
    /// objects left behind while no controller ran).
    fn enqueue_existing(&self);

    /// Brings one key's objects to their desired state.
    fn reconcile(&self, key: &ObjectKey) -> impl Future<Output = Result<(), Self::Error>> + Send;

    /// What a failure means; emits the controller's Event for it, if any.
    fn error_policy(&self, key: &ObjectKey, error: &Self::Error) -> ErrorPolicy;

    /// Records one sync in the controller's metrics.
    fn observe(&self, result: SyncResult, seconds: f64);
}

/// Runs `reconciler` until `stop`: queues what exists, then reconciles every queued key. Ends
/// early only when a worker panics (see [`run_workers`]).
pub async fn run<R: Reconciler>(reconciler: Arc<R>, stop: CancellationToken) -> Result<(), TaskFailed> {
    let Core { settings, queue } = reconciler.core();
    let settings = *settings;
    reconciler.enqueue_existing();
    info!(
        controller = settings.name,
        workers = settings.workers,
        "controller started"
    );
    let this = reconciler.clone();
    let result = run_workers(
        settings.name,
        queue.clone(),
        settings.workers,
        settings.max_retries,
        stop,
        move |key| {
            let this = this.clone();
            async move { sync_and_report(&*this, &key).await }
        },
    )
    .await;
    info!(controller = settings.name, "controller stopped");
    result
}

async fn sync_and_report<R: Reconciler>(reconciler: &R, key: &ObjectKey) -> Outcome {
    let start = Instant::now();
    let result = reconciler.reconcile(key).await;
    let seconds = start.elapsed().as_secs_f64();
    match result {
        Ok(()) => {
            reconciler.observe(SyncResult::Success, seconds);
            Outcome::Done
        }
        Err(e) => match reconciler.error_policy(key, &e) {
            ErrorPolicy::RetryAfter(after) => {
                reconciler.observe(SyncResult::Stale, seconds);
                debug!(reason = %e, ?after, "retrying shortly");
                Outcome::RetryAfter(after)
            }
            ErrorPolicy::Backoff => {
                reconciler.observe(SyncResult::Error, seconds);
                let failures = reconciler.core().queue.failures(key);
                warn!(error = %e, failures, "sync failed; retrying with backoff");
                Outcome::Failed
            }
        },
    }
}

#[cfg(test)]
mod tests {
    use std::{collections::HashSet, sync::Mutex};

    use super::*;

    /// "stale-*" keys find a stale cache once, "bad" always fails, the rest succeed.
    struct Recorder {
        core: Core,
        existing: Vec<ObjectKey>,
        was_stale: Mutex<HashSet<String>>,
        results: Mutex<Vec<SyncResult>>,
        policies: Mutex<Vec<String>>,
    }

    impl Reconciler for Recorder {
        type Error = String;

        fn core(&self) -> &Core {
            &self.core
        }

        fn enqueue_existing(&self) {
            for key in &self.existing {
                self.core.queue.add(key.clone());
            }
        }

        async fn reconcile(&self, key: &ObjectKey) -> Result<(), String> {
            match key.name.as_str() {
                "bad" => Err("the apiserver said no".into()),
                n if n.starts_with("stale") && self.was_stale.lock().unwrap().insert(n.to_owned()) => {
                    Err("cache behind".into())
                }
                _ => Ok(()),
            }
        }

        fn error_policy(&self, key: &ObjectKey, error: &String) -> ErrorPolicy {
            self.policies
                .lock()
                .unwrap()
                .push(format!("{}: {error}", key.name));
            if error == "cache behind" {
                ErrorPolicy::RetryAfter(Duration::from_millis(100))
            } else {
                ErrorPolicy::Backoff
            }
        }

        fn observe(&self, result: SyncResult, _seconds: f64) {
            self.results.lock().unwrap().push(result);
        }
    }

    #[tokio::test(start_paused = true)]
    async fn every_controller_gets_the_same_queueing_retries_and_reporting() {
        let settings = Settings {
            name: "test-controller",
            workers: 2,
            max_retries: 2,
        };
        let backoff = Backoff {
            base: Duration::from_millis(10),
            max: Duration::from_secs(1),
        };
        let metrics = WorkqueueMetrics::register(&prometheus::Registry::new()).unwrap();
        let r = Arc::new(Recorder {
            core: Core::new(settings, backoff, &metrics, "test"),
            existing: ["ok", "stale-a", "bad"].map(|n| ObjectKey::new("ns", n)).to_vec(),
            was_stale: Mutex::new(HashSet::new()),
            results: Mutex::new(Vec::new()),
            policies: Mutex::new(Vec::new()),
        });
        let stop = CancellationToken::new();
        let task = tokio::spawn(run(r.clone(), stop.clone()));
        tokio::time::sleep(Duration::from_secs(5)).await;
        stop.cancel();
        task.await.unwrap().unwrap();

        let policies = r.policies.lock().unwrap().clone();
        let asked = |prefix: &str| policies.iter().filter(|p| p.starts_with(prefix)).count();
        assert_eq!(asked("stale-a: cache behind"), 1, "{policies:?}");
        assert_eq!(asked("bad: the apiserver said no"), 3, "{policies:?}");
        assert_eq!(policies.len(), 4, "{policies:?}");
        let results = r.results.lock().unwrap().clone();
        let count = |want: SyncResult| results.iter().filter(|r| **r == want).count();
        assert_eq!(count(SyncResult::Success), 2, "ok, and stale-a on its retry");
        assert_eq!(count(SyncResult::Stale), 1);
        assert_eq!(
            count(SyncResult::Error),
            3,
            "first try + max_retries, then left alone"
        );
        assert_eq!(r.core.queue.pending(), 0);
    }
}
