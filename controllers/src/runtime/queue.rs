//! A work queue with client-go's guarantees, for async workers.
//!
//! - A key is queued at most once however often it is added (changes coalesce).
//! - A key is never handed to two workers at once; added while being processed, it is queued
//!   again when the worker is done.
//! - Delayed adds (`add_after`, batching) and per-key exponential backoff (`add_rate_limited`).
//!
//! kube-runtime's `Controller` has the first two but hides the previous object of an update and
//! has no backoff per key or queue metrics; the endpoint controllers need all three, so they use
//! this queue over plain watchers. Metrics carry client-go's names (`workqueue_*{name}`).

use std::{
    collections::{BTreeSet, HashMap, HashSet, VecDeque},
    hash::Hash,
    sync::{Mutex, MutexGuard},
    time::Duration,
};

use prometheus::{
    Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry,
};
use svcplane_core::metrics::registered;
use tokio::{
    sync::Notify,
    time::{Instant, sleep_until},
};

/// client-go's workqueue metrics, registered once and shared by every queue.
#[derive(Clone, Debug)]
pub struct WorkqueueMetrics {
    depth: IntGaugeVec,
    adds: IntCounterVec,
    retries: IntCounterVec,
    queue_duration: HistogramVec,
    work_duration: HistogramVec,
}

impl WorkqueueMetrics {
    pub fn register(registry: &Registry) -> prometheus::Result<Self> {
        // client-go: exponential buckets from 10ns by a factor of 10.
        let buckets = prometheus::exponential_buckets(1e-8, 10.0, 10)?;
        let m = Self {
            depth: registered(
                registry,
                IntGaugeVec::new(
                    Opts::new("workqueue_depth", "Current depth of workqueue"),
                    &["name"],
                )?,
            )?,
            adds: registered(
                registry,
                IntCounterVec::new(
                    Opts::new(
                        "workqueue_adds_total",
                        "Total number of adds handled by workqueue",
                    ),
                    &["name"],
                )?,
            )?,
            retries: registered(
                registry,
                IntCounterVec::new(
                    Opts::new(
                        "workqueue_retries_total",
                        "Total number of retries handled by workqueue",
                    ),
                    &["name"],
                )?,
            )?,
            queue_duration: registered(
                registry,
                HistogramVec::new(
                    HistogramOpts::new(
                        "workqueue_queue_duration_seconds",
                        "How long in seconds an item stays in workqueue before being requested.",
                    )
                    .buckets(buckets.clone()),
                    &["name"],
                )?,
            )?,
            work_duration: registered(
                registry,
                HistogramVec::new(
                    HistogramOpts::new(
                        "workqueue_work_duration_seconds",
                        "How long in seconds processing an item from workqueue takes.",
                    )
                    .buckets(buckets),
                    &["name"],
                )?,
            )?,
        };
        Ok(m)
    }

    fn for_queue(&self, name: &str) -> QueueMetrics {
        QueueMetrics {
            depth: self.depth.with_label_values(&[name]),
            adds: self.adds.with_label_values(&[name]),
            retries: self.retries.with_label_values(&[name]),
            queue_duration: self.queue_duration.with_label_values(&[name]),
            work_duration: self.work_duration.with_label_values(&[name]),
        }
    }
}

#[derive(Clone, Debug)]
struct QueueMetrics {
    depth: IntGauge,
    adds: IntCounter,
    retries: IntCounter,
    queue_duration: Histogram,
    work_duration: Histogram,
}

/// Per-key exponential backoff: `base * 2^failures`, capped.
#[derive(Clone, Copy, Debug)]
pub struct Backoff {
    pub base: Duration,
    pub max: Duration,
}

impl Backoff {
    pub fn delay(&self, failures: u32) -> Duration {
        let factor = 1u32.checked_shl(failures.min(31)).unwrap_or(u32::MAX);
        self.base.saturating_mul(factor).min(self.max)
    }
}

struct Inner<K> {
    ready: VecDeque<K>,
    /// Keys that need processing: queued, or added again while being processed.
    dirty: HashSet<K>,
    processing: HashMap<K, Instant>,
    queued_at: HashMap<K, Instant>,
    /// Delayed keys by due time; `due` holds each key's earliest due time.
    waiting: BTreeSet<(Instant, u64, K)>,
    due: HashMap<K, (Instant, u64)>,
    seq: u64,
    failures: HashMap<K, u32>,
    shut_down: bool,
}

pub struct WorkQueue<K> {
    inner: Mutex<Inner<K>>,
    notify: Notify,
    backoff: Backoff,
    metrics: Option<QueueMetrics>,
}

impl<K: Clone + Eq + Hash + Ord> WorkQueue<K> {
    pub fn new(backoff: Backoff) -> Self {
        Self {
            inner: Mutex::new(Inner {
                ready: VecDeque::new(),
                dirty: HashSet::new(),
                processing: HashMap::new(),
                queued_at: HashMap::new(),
                waiting: BTreeSet::new(),
                due: HashMap::new(),
                seq: 0,
                failures: HashMap::new(),
                shut_down: false,
            }),
            notify: Notify::new(),
            backoff,
            metrics: None,
        }
    }

    pub fn with_metrics(mut self, metrics: &WorkqueueMetrics, name: &str) -> Self {
        self.metrics = Some(metrics.for_queue(name));
        self
    }

    fn lock(&self) -> MutexGuard<'_, Inner<K>> {
        // A panic while holding the lock cannot leave the queue's sets inconsistent in a way
        // that matters more than stopping; keep serving.
        self.inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    pub fn add(&self, key: K) {
        let mut inner = self.lock();
        if self.add_locked(&mut inner, key) {
            drop(inner);
            self.notify.notify_one();
        }
    }

    /// Returns whether a worker should be woken.
    fn add_locked(&self, inner: &mut Inner<K>, key: K) -> bool {
        if inner.shut_down || inner.dirty.contains(&key) {
            return false;
        }
        if let Some(m) = &self.metrics {
            m.adds.inc();
        }
        inner.dirty.insert(key.clone());
        if inner.processing.contains_key(&key) {
            return false;
        }
        inner.queued_at.insert(key.clone(), Instant::now());
        inner.ready.push_back(key);
        self.update_depth(inner);
        true
    }

    /// Adds `key` once `delay` has passed (at once for a zero delay). An earlier pending due
    /// time is kept.
    pub fn add_after(&self, key: K, delay: Duration) {
        if delay.is_zero() {
            return self.add(key);
        }
        let at = Instant::now() + delay;
        let mut inner = self.lock();
        if inner.shut_down {
            return;
        }
        if let Some(&(existing, seq)) = inner.due.get(&key) {
            if existing <= at {
                return;
            }
            inner.waiting.remove(&(existing, seq, key.clone()));
        }
        inner.seq += 1;
        let seq = inner.seq;
        inner.waiting.insert((at, seq, key.clone()));
        inner.due.insert(key, (at, seq));
        drop(inner);
        // A sleeping worker may need to wake earlier than it planned.
        self.notify.notify_waiters();
    }

    /// Adds `key` after its backoff delay and counts a failure.
    pub fn add_rate_limited(&self, key: K) {
        let failures = {
            let mut inner = self.lock();
            let f = inner.failures.entry(key.clone()).or_insert(0);
            let current = *f;
            *f = f.saturating_add(1);
            current
        };
        if let Some(m) = &self.metrics {
            m.retries.inc();
        }
        self.add_after(key, self.backoff.delay(failures));
    }

    /// Clears `key`'s failure count after a success.
    pub fn forget(&self, key: &K) {
        self.lock().failures.remove(key);
    }

    pub fn failures(&self, key: &K) -> u32 {
        self.lock().failures.get(key).copied().unwrap_or(0)
    }

    /// The next key to process; `None` once the queue is shut down.
    pub async fn get(&self) -> Option<K> {
        loop {
            let notified = self.notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let wake_at = {
                let mut inner = self.lock();
                if inner.shut_down {
                    return None;
                }
                self.promote_due(&mut inner);
                if let Some(key) = inner.ready.pop_front() {
                    let now = Instant::now();
                    if let (Some(m), Some(t)) = (&self.metrics, inner.queued_at.remove(&key)) {
                        m.queue_duration.observe((now - t).as_secs_f64());
                    }
                    inner.dirty.remove(&key);
                    inner.processing.insert(key.clone(), now);
                    self.update_depth(&inner);
                    return Some(key);
                }
                inner.waiting.first().map(|(at, _, _)| *at)
            };
            match wake_at {
                Some(at) => {
                    tokio::select! {
                        () = &mut notified => {}
                        () = sleep_until(at) => {}
                    }
                }
                None => notified.await,
            }
        }
    }

    fn promote_due(&self, inner: &mut Inner<K>) {
        let now = Instant::now();
        while let Some((at, _, _)) = inner.waiting.first() {
            if *at > now {
                break;
            }
            if let Some((_, _, key)) = inner.waiting.pop_first() {
                inner.due.remove(&key);
                self.add_locked(inner, key);
            }
        }
    }

    /// Marks `key` as processed; if it was added meanwhile it is queued again.
    pub fn done(&self, key: &K) {
        let mut inner = self.lock();
        if let (Some(m), Some(t)) = (&self.metrics, inner.processing.get(key)) {
            m.work_duration.observe(t.elapsed().as_secs_f64());
        }
        inner.processing.remove(key);
        if inner.dirty.contains(key) && !inner.shut_down {
            inner.queued_at.insert(key.clone(), Instant::now());
            inner.ready.push_back(key.clone());
            self.update_depth(&inner);
            drop(inner);
            self.notify.notify_one();
        }
    }

    /// Stops handing out keys; waiting `get`s return `None`.
    pub fn shut_down(&self) {
        let mut inner = self.lock();
        inner.shut_down = true;
        inner.ready.clear();
        inner.dirty.clear();
        inner.waiting.clear();
        inner.due.clear();
        self.update_depth(&inner);
        drop(inner);
        self.notify.notify_waiters();
    }

    /// Keys ready to be processed now.
    pub fn len(&self) -> usize {
        self.lock().ready.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Keys queued, delayed or being processed: zero means every change has been handled.
    pub fn pending(&self) -> usize {
        let inner = self.lock();
        let mut keys: HashSet<&K> = inner.dirty.iter().collect();
        keys.extend(inner.processing.keys());
        keys.extend(inner.due.keys());
        keys.len()
    }

    fn update_depth(&self, inner: &Inner<K>) {
        if let Some(m) = &self.metrics {
            m.depth.set(i64::try_from(inner.ready.len()).unwrap_or(i64::MAX));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    fn queue() -> WorkQueue<String> {
        WorkQueue::new(Backoff {
            base: Duration::from_millis(10),
            max: Duration::from_secs(1),
        })
    }

    #[tokio::test(start_paused = true)]
    async fn adds_coalesce_and_keep_order() {
        let q = queue();
        q.add("a".into());
        q.add("b".into());
        q.add("a".into());
        assert_eq!(q.len(), 2);
        assert_eq!(q.get().await.as_deref(), Some("a"));
        assert_eq!(q.get().await.as_deref(), Some("b"));
        assert!(q.is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn a_key_is_never_processed_twice_at_once() {
        let q = queue();
        q.add("a".into());
        let k = q.get().await.unwrap();
        q.add("a".into()); // changed while being processed
        assert!(q.is_empty(), "not handed out while processing");
        assert_eq!(q.pending(), 1);
        q.done(&k);
        assert_eq!(q.get().await.as_deref(), Some("a"), "processed again afterwards");
        q.done(&"a".to_owned());
        assert_eq!(q.pending(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn delayed_adds_wait_and_keep_the_earliest_due_time() {
        let q = Arc::new(queue());
        let start = Instant::now();
        q.add_after("a".into(), Duration::from_secs(5));
        q.add_after("a".into(), Duration::from_secs(2));
        q.add_after("a".into(), Duration::from_secs(9));
        assert!(q.is_empty());
        assert_eq!(q.get().await.as_deref(), Some("a"));
        assert_eq!(start.elapsed(), Duration::from_secs(2));
        q.done(&"a".to_owned());
        assert_eq!(q.pending(), 0, "later due times were merged, not kept");
    }

    #[tokio::test(start_paused = true)]
    async fn an_earlier_delayed_add_wakes_a_sleeping_worker() {
        let q = Arc::new(queue());
        q.add_after("late".into(), Duration::from_secs(60));
        let worker = tokio::spawn({
            let q = q.clone();
            async move { q.get().await }
        });
        tokio::task::yield_now().await;
        let start = Instant::now();
        q.add_after("soon".into(), Duration::from_secs(1));
        assert_eq!(worker.await.unwrap().as_deref(), Some("soon"));
        assert_eq!(start.elapsed(), Duration::from_secs(1));
    }

    #[tokio::test(start_paused = true)]
    async fn failures_back_off_exponentially_until_forgotten() {
        let q = queue();
        let start = Instant::now();
        let mut delays = Vec::new();
        for _ in 0..9 {
            let t = Instant::now();
            q.add_rate_limited("a".into());
            let k = q.get().await.unwrap();
            delays.push((Instant::now() - t).as_millis());
            q.done(&k);
        }
        assert_eq!(delays, [10, 20, 40, 80, 160, 320, 640, 1000, 1000]);
        assert_eq!(q.failures(&"a".to_owned()), 9);
        q.forget(&"a".to_owned());
        assert_eq!(q.failures(&"a".to_owned()), 0);
        assert!(start.elapsed() > Duration::from_secs(3));
    }

    #[tokio::test(start_paused = true)]
    async fn shutdown_releases_waiting_workers() {
        let q = Arc::new(queue());
        let worker = tokio::spawn({
            let q = q.clone();
            async move { q.get().await }
        });
        tokio::task::yield_now().await;
        q.shut_down();
        assert_eq!(worker.await.unwrap(), None);
        q.add("a".into());
        assert_eq!(q.get().await, None, "no work after shutdown");
    }

    #[tokio::test(start_paused = true)]
    async fn metrics_count_adds_depth_and_retries() {
        let registry = Registry::new();
        let m = WorkqueueMetrics::register(&registry).unwrap();
        let q: WorkQueue<String> = queue().with_metrics(&m, "endpoint_slice");
        q.add("a".into());
        q.add("b".into());
        q.add("a".into());
        assert_eq!(m.adds.with_label_values(&["endpoint_slice"]).get(), 2);
        assert_eq!(m.depth.with_label_values(&["endpoint_slice"]).get(), 2);
        let k = q.get().await.unwrap();
        q.done(&k);
        q.add_rate_limited("a".into());
        assert_eq!(m.retries.with_label_values(&["endpoint_slice"]).get(), 1);
        assert_eq!(m.depth.with_label_values(&["endpoint_slice"]).get(), 1);
        assert_eq!(
            m.work_duration
                .with_label_values(&["endpoint_slice"])
                .get_sample_count(),
            1
        );
    }

    #[test]
    fn backoff_saturates() {
        let b = Backoff {
            base: Duration::from_secs(1),
            max: Duration::from_secs(1000),
        };
        assert_eq!(b.delay(0), Duration::from_secs(1));
        assert_eq!(b.delay(9), Duration::from_secs(512));
        assert_eq!(b.delay(10), Duration::from_secs(1000));
        assert_eq!(b.delay(u32::MAX), Duration::from_secs(1000));
    }
}
