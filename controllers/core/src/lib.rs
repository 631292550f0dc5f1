//! The words every svcplane crate shares: object keys and the label and annotation names
//! Kubernetes fixes. Kept free of dependencies so that the pure crates (allocation, the node
//! agent's logic) can use them without pulling in a Kubernetes client.

pub mod key;
pub mod wellknown;

pub use key::ObjectKey;
