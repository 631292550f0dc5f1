//! ClusterIP and NodePort allocation for Services: what the admission webhook allocates
//! ([`admission`], pure).

pub mod admission;
