//! Lease-based leader election with client-go semantics.
//!
//! Why not a crate: of the Rust options, only `kube-lease-manager` builds against kube 5, and it
//! keeps reporting leadership after renewals fail, so a partitioned replica would go on writing
//! after another replica took the lease. The others are pinned to older kube releases or step
//! down on the first failed renewal. This module is the small part of client-go's
//! `leaderelection` package that svcplane needs:
//!
//! - expiry is judged on the *local monotonic clock*, from when this replica last saw the lease
//!   record change, never from the wall-clock `renewTime` another machine wrote (clock skew);
//! - every write is conditional on the `resourceVersion` that was read, so two candidates can
//!   never both believe they acquired the same expired lease;
//! - the leader fences itself: it stops its leader-only work once `renew_deadline` has passed
//!   since the start of its last successful renewal, which is at least
//!   `lease_duration - renew_deadline` before any other replica may take the lease;
//! - a clean shutdown stops the work first and then releases the lease, so a successor takes over
//!   at its next retry instead of waiting out the lease;
//! - every write of the leader's work re-checks the claim right before it is sent ([`Claim`],
//!   [`FenceLayer`]), and every write to one of its sockets does too ([`FencedConnector`]), so a
//!   replica that wakes from a pause past its fence sends nothing.
//!
//! [`decision`] is the pure part (what to write, when a lease is expired); [`elector`] does the I/O.

mod config;
mod decision;
mod elector;
mod fence;
mod metrics;
mod record;

pub use config::{ConfigError, ElectionConfig};
pub use decision::{Decision, Observation, Observer, claim, decide, released};
pub use elector::{Elector, Error, Leadership};
pub use fence::{Claim, FenceLayer, Fenced, FencedConnector, FencedExecutor, FencedIo, NotLeading};
pub use metrics::LeaderMetrics;
pub use record::LeaseRecord;
