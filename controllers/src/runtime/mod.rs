//! The machinery the controllers share: watch-fed caches, change notification with old and new
//! values, a work queue with per-key backoff and client-go's metrics, and the supervision of
//! task groups (a task that dies is seen).

pub mod controller;
pub mod informer;
pub mod queue;
pub mod shares;
pub mod store;
pub mod supervisor;
pub mod workers;

pub use controller::{Core, ErrorPolicy, Reconciler, Settings, SyncResult};
pub use informer::{Handler, Informer, Synced, Versioned, wait_for_sync};
pub use queue::{Backoff, WorkQueue, WorkqueueMetrics};
pub use shares::GaugeShares;
pub use store::Store;
pub use supervisor::{Supervisor, TaskFailed};
pub use workers::{Outcome, run_workers};
