//! svcplane's endpoint controllers (EndpointSlice, Endpoints, mirroring), the runtime they share
//! (informers, caches, work queues: [`runtime`]) and leader election ([`leader`]), which decides
//! which replica may run the writers at all.
//!
//! Each controller is split into pure functions that compute desired state and a thin layer that
//! reads and writes the API. Allocation lives in `svcplane-allocators`, the node agent's logic in
//! `svcplane-dataplane`; both build on the words in `svcplane-core`.

pub mod endpoints;
pub mod endpointslice;
pub mod events;
#[cfg(test)]
mod fixtures;
pub mod leader;
pub mod manager;
pub mod mirroring;
pub mod model;
pub mod podchange;
pub mod runtime;
pub mod selection;
