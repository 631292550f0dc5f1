//! Everything about ClusterIP and NodePort allocation.
//!
//! Pure, with no I/O (and no feature needed): range arithmetic ([`range`]), bitmaps ([`bitmap`]),
//! the allocation policy ([`policy`]), the stored form ([`stored`]), what the admission webhook
//! must allocate for a Service ([`admission`]), what stored Services no longer hold
//! ([`release`]), the repair pass ([`repair`]), the reservations that hold what the webhook
//! handed out until a stored Service does ([`reservation`]), the bound on what one namespace may
//! hold in them ([`pending`]) and the `ServicePool` objects ([`pool`]).
//!
//! Feature `etcd`: the ranges kept atomically in etcd ([`etcd`]), carrying out an admission plan
//! against them ([`ranges`]), their usage ([`usage`]) and kube-apiserver's allocator metrics
//! ([`metrics`]). Feature `controller` (with `etcd`): the leader's loops that talk to the
//! apiserver ([`controller`]).

pub mod admission;
pub mod bitmap;
pub mod pending;
pub mod policy;
pub mod pool;
pub mod range;
pub mod release;
pub mod repair;
pub mod reservation;
pub mod stored;

#[cfg(feature = "etcd")]
pub mod etcd;
#[cfg(feature = "etcd")]
pub mod metrics;
#[cfg(feature = "etcd")]
pub mod ranges;
#[cfg(feature = "etcd")]
pub mod usage;

#[cfg(feature = "controller")]
pub mod controller;

pub use bitmap::Bitmap;
pub use policy::{AllocError, Allocation};
pub use range::{IpRange, NotInRange, PortRange, Range, RangeError};
