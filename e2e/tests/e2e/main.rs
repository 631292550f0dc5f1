//! End-to-end tests: one real etcd + kube-apiserver for the whole run (see `svcplane_e2e`), each
//! test in its own namespace.

#![allow(clippy::unwrap_used)] // Tests: a failed unwrap is a failed assertion.

mod allocation;
mod allocation_ha;
mod allocator_store;
mod control_plane;
mod dataplane_ipvs;
mod dataplane_nft;
mod endpointslices;
mod fencing;
mod leader_election;
mod manifests;
mod soak;
mod upstream;
