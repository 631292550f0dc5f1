//! svcplane's controllers and the machinery that runs them only on the elected replica.
//!
//! Each controller is split into pure functions that compute desired state and a thin layer that
//! reads and writes the API; `leader` decides which replica may run the writers at all.

pub mod allocation;
pub mod dataplane;
pub mod endpoints;
pub mod endpointslice;
pub mod events;
pub mod leader;
pub mod manager;
pub mod mirroring;
pub mod model;
pub mod podchange;
pub mod runtime;
pub mod selection;
