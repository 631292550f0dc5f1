//! The words every svcplane crate shares: object keys, IP families and protocols, and the label
//! and annotation names Kubernetes fixes. Kept free of dependencies so that the pure crates (allocation, the node
//! agent's logic) can use them without pulling in a Kubernetes client.

pub mod key;
#[cfg(feature = "metrics")]
pub mod metrics;
pub mod net;
pub mod wellknown;

pub use key::ObjectKey;
pub use net::{IpFamily, Protocol};
