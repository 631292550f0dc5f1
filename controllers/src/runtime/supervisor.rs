//! Runs a group of tasks that must all live until they are told to stop, and notices when one
//! does not. A controller whose task panicked would otherwise be gone in silence while its
//! replica keeps the Lease and looks healthy; here the first task that ends early (a panic, or a
//! loop that returned on its own) stops its siblings and is reported to whoever started the group,
//! which can then give up leadership or exit.

use std::{collections::HashMap, future::Future};

use tokio::task::{Id, JoinError, JoinSet};
use tokio_util::sync::CancellationToken;
use tracing::error;

/// A task of the group ended before the group was told to stop.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("task {task} {how}")]
pub struct TaskFailed {
    pub task: &'static str,
    /// "panicked: <message>" or "ended unexpectedly".
    pub how: String,
}

pub struct Supervisor {
    tasks: JoinSet<Result<(), TaskFailed>>,
    names: HashMap<Id, &'static str>,
    stop: CancellationToken,
}

impl Supervisor {
    /// A group that stops when `parent` is cancelled, or when one of its tasks fails.
    pub fn new(parent: &CancellationToken) -> Self {
        Self {
            tasks: JoinSet::new(),
            names: HashMap::new(),
            stop: parent.child_token(),
        }
    }

    /// Cancelled when the group stops; tasks end when it is.
    pub fn token(&self) -> CancellationToken {
        self.stop.clone()
    }

    /// Adds a task that runs until the group's token is cancelled.
    pub fn spawn<F>(&mut self, name: &'static str, task: F)
    where
        F: Future<Output = ()> + Send + 'static,
    {
        self.spawn_fallible(name, async move {
            task.await;
            Ok(())
        });
    }

    /// Adds a task that may itself report a failure (a nested group).
    pub fn spawn_fallible<F>(&mut self, name: &'static str, task: F)
    where
        F: Future<Output = Result<(), TaskFailed>> + Send + 'static,
    {
        let handle = self.tasks.spawn(task);
        self.names.insert(handle.id(), name);
    }

    /// Waits until the group is told to stop or a task ends first; then stops the rest and waits
    /// for them. Returns the first failure, if any (later ones are logged).
    pub async fn supervise(mut self) -> Result<(), TaskFailed> {
        let mut first: Option<TaskFailed> = None;
        while let Some(joined) = self.tasks.join_next_with_id().await {
            let failure = match joined {
                Ok((id, Ok(()))) => (!self.stop.is_cancelled()).then(|| TaskFailed {
                    task: self.name(id),
                    how: "ended unexpectedly".to_owned(),
                }),
                Ok((_, Err(nested))) => Some(nested),
                Err(e) => self.join_failure(e),
            };
            if let Some(f) = failure {
                error!(task = f.task, reason = %f.how, "a supervised task failed; stopping its group");
                self.stop.cancel();
                first.get_or_insert(f);
            }
        }
        // Every task has ended: an empty group (or one whose tasks all ended cleanly after the
        // stop) still waits for the stop before it reports success.
        if first.is_none() {
            self.stop.cancelled().await;
        }
        first.map_or(Ok(()), Err)
    }

    fn name(&self, id: Id) -> &'static str {
        self.names.get(&id).copied().unwrap_or("unnamed")
    }

    fn join_failure(&self, e: JoinError) -> Option<TaskFailed> {
        let task = self.name(e.id());
        if e.is_cancelled() {
            return (!self.stop.is_cancelled()).then(|| TaskFailed {
                task,
                how: "was cancelled".to_owned(),
            });
        }
        let payload = e.into_panic();
        let message = payload
            .downcast_ref::<&str>()
            .map(|s| (*s).to_owned())
            .or_else(|| payload.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "non-string panic payload".to_owned());
        Some(TaskFailed {
            task,
            how: format!("panicked: {message}"),
        })
    }
}

#[cfg(test)]
mod tests {
    use std::{
        sync::{
            Arc,
            atomic::{AtomicUsize, Ordering},
        },
        time::Duration,
    };

    use super::*;

    /// A task that counts itself out when its group stops.
    fn well_behaved(
        group: &Supervisor,
        stopped: &Arc<AtomicUsize>,
    ) -> impl Future<Output = ()> + Send + 'static {
        let (token, stopped) = (group.token(), stopped.clone());
        async move {
            token.cancelled().await;
            stopped.fetch_add(1, Ordering::SeqCst);
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_panic_stops_the_siblings_and_is_reported() {
        let parent = CancellationToken::new();
        let stopped = Arc::new(AtomicUsize::new(0));
        let mut group = Supervisor::new(&parent);
        group.spawn("a", well_behaved(&group, &stopped));
        group.spawn("b", well_behaved(&group, &stopped));
        group.spawn("reconcile", async {
            tokio::time::sleep(Duration::from_secs(3)).await;
            panic!("index out of bounds");
        });
        let err = group.supervise().await.unwrap_err();
        assert_eq!(
            err,
            TaskFailed {
                task: "reconcile",
                how: "panicked: index out of bounds".into()
            }
        );
        assert_eq!(stopped.load(Ordering::SeqCst), 2, "both siblings saw the stop");
        assert!(!parent.is_cancelled(), "the caller decides what a failure means");
    }

    #[tokio::test(start_paused = true)]
    async fn a_task_returning_on_its_own_is_a_failure_too() {
        let parent = CancellationToken::new();
        let stopped = Arc::new(AtomicUsize::new(0));
        let mut group = Supervisor::new(&parent);
        group.spawn("a", well_behaved(&group, &stopped));
        group.spawn("watch", async {});
        let err = group.supervise().await.unwrap_err();
        assert_eq!(err.task, "watch");
        assert_eq!(err.how, "ended unexpectedly");
        assert_eq!(stopped.load(Ordering::SeqCst), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_nested_group_reports_its_own_failure() {
        let parent = CancellationToken::new();
        let mut outer = Supervisor::new(&parent);
        let mut inner = Supervisor::new(&outer.token());
        inner.spawn("worker", async { panic!("boom") });
        outer.spawn_fallible("controllers", inner.supervise());
        let err = outer.supervise().await.unwrap_err();
        assert_eq!((err.task, err.how.as_str()), ("worker", "panicked: boom"));
    }

    #[tokio::test(start_paused = true)]
    async fn a_requested_stop_is_success() {
        let parent = CancellationToken::new();
        let stopped = Arc::new(AtomicUsize::new(0));
        let mut group = Supervisor::new(&parent);
        group.spawn("a", well_behaved(&group, &stopped));
        group.spawn("b", well_behaved(&group, &stopped));
        let p = parent.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs(5)).await;
            p.cancel();
        });
        assert_eq!(group.supervise().await, Ok(()));
        assert_eq!(stopped.load(Ordering::SeqCst), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn an_empty_group_waits_for_its_stop() {
        let parent = CancellationToken::new();
        let group = Supervisor::new(&parent);
        let run = tokio::spawn(group.supervise());
        tokio::time::sleep(Duration::from_secs(60)).await;
        assert!(!run.is_finished());
        parent.cancel();
        assert_eq!(run.await.unwrap(), Ok(()));
    }
}
