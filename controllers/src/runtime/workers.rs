//! The worker loop every controller runs: take a key, sync it, and requeue by the outcome, with
//! client-go's semantics (per-key backoff, a cap on retries, never the same key twice at once).

use std::{future::Future, sync::Arc, time::Duration};

use tokio_util::sync::CancellationToken;
use tracing::{Instrument, info_span, warn};

use super::{
    WorkQueue,
    supervisor::{Supervisor, TaskFailed},
};
use crate::model::ObjectKey;

/// How one sync ended.
#[derive(Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Done; the key's failure count is cleared.
    Done,
    /// Not an error, but the key must be looked at again after a short wait (e.g. a cache that
    /// has not caught up with this controller's own writes).
    RetryAfter(Duration),
    /// Failed; retried with exponential backoff until `max_retries`.
    Failed,
}

/// Runs `workers` concurrent workers over `queue` until `stop`, then shuts the queue down and
/// waits for syncs in progress. A worker that panics stops the others and is returned: the
/// controller must not go on with fewer workers (or none) while its replica keeps the Lease.
pub async fn run_workers<S, F>(
    controller: &'static str,
    queue: Arc<WorkQueue<ObjectKey>>,
    workers: usize,
    max_retries: u32,
    stop: CancellationToken,
    sync: S,
) -> Result<(), TaskFailed>
where
    S: Fn(ObjectKey) -> F + Clone + Send + Sync + 'static,
    F: Future<Output = Outcome> + Send,
{
    let mut group = Supervisor::new(&stop);
    for _ in 0..workers.max(1) {
        let queue = queue.clone();
        let sync = sync.clone();
        group.spawn(controller, async move {
            while let Some(key) = queue.get().await {
                let span = info_span!("sync", controller, key = %key);
                match sync(key.clone()).instrument(span).await {
                    Outcome::Done => queue.forget(&key),
                    Outcome::RetryAfter(d) => queue.add_after(key.clone(), d),
                    Outcome::Failed => {
                        if queue.failures(&key) >= max_retries {
                            warn!(controller, key = %key, max_retries, "dropping key after repeated failures until it changes again");
                            queue.forget(&key);
                        } else {
                            queue.add_rate_limited(key.clone());
                        }
                    }
                }
                queue.done(&key);
            }
        });
    }
    // The workers leave their loop once the queue is shut down: on stop, or when one failed.
    let token = group.token();
    group.spawn(controller, async move {
        token.cancelled().await;
        queue.shut_down();
    });
    group.supervise().await
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::runtime::Backoff;
    use std::sync::Mutex;

    #[tokio::test(start_paused = true)]
    async fn outcomes_requeue_as_documented() {
        let queue = Arc::new(WorkQueue::new(Backoff {
            base: Duration::from_millis(10),
            max: Duration::from_secs(1),
        }));
        let seen = Arc::new(Mutex::new(Vec::<String>::new()));
        let stop = CancellationToken::new();
        queue.add(ObjectKey::new("ns", "ok"));
        queue.add(ObjectKey::new("ns", "fail"));
        queue.add(ObjectKey::new("ns", "later"));
        let s = seen.clone();
        let task = tokio::spawn(run_workers(
            "test",
            queue.clone(),
            2,
            3,
            stop.clone(),
            move |key: ObjectKey| {
                let s = s.clone();
                async move {
                    let mut seen = s.lock().unwrap();
                    seen.push(key.name.clone());
                    let laters = seen.iter().filter(|n| *n == "later").count();
                    match key.name.as_str() {
                        "fail" => Outcome::Failed,
                        "later" if laters < 2 => Outcome::RetryAfter(Duration::from_millis(50)),
                        _ => Outcome::Done,
                    }
                }
            },
        ));
        tokio::time::sleep(Duration::from_secs(5)).await;
        stop.cancel();
        task.await.unwrap().unwrap();
        let seen = seen.lock().unwrap();
        let count = |n: &str| seen.iter().filter(|s| *s == n).count();
        assert_eq!(count("ok"), 1);
        assert_eq!(count("later"), 2);
        assert_eq!(count("fail"), 4, "first try + 3 retries, then dropped");
        assert_eq!(queue.pending(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_panicking_sync_ends_the_controller_with_its_reason() {
        let queue = Arc::new(WorkQueue::new(Backoff {
            base: Duration::from_millis(10),
            max: Duration::from_secs(1),
        }));
        queue.add(ObjectKey::new("ns", "fine"));
        queue.add(ObjectKey::new("ns", "poison"));
        let stop = CancellationToken::new();
        let result = run_workers(
            "test",
            queue.clone(),
            4,
            3,
            stop.clone(),
            |key: ObjectKey| async move {
                assert_ne!(key.name, "poison", "a bug in a reconcile");
                Outcome::Done
            },
        )
        .await;
        let failed = result.unwrap_err();
        assert_eq!(failed.task, "test");
        assert!(failed.how.contains("a bug in a reconcile"), "{failed}");
        assert!(!stop.is_cancelled(), "the caller decides what a failure means");
    }
}
