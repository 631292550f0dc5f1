//! ClusterIP and NodePort allocation for Services: what the admission webhook allocates
//! ([`admission`], pure), carrying it out against the etcd ranges ([`allocators`]), and what
//! stored Services no longer hold ([`release`], pure).

pub mod admission;
pub mod allocators;
pub mod pool;
pub mod release;
pub mod releaser;
pub mod repair;
pub mod usage;
