//! The EndpointSlice controller: one set of slices per Service with a selector.
//!
//! [`endpoint`] turns one Pod into its endpoint and ports, [`reconcile`] plans the writes for one
//! Service; both are pure. The controller loop that feeds them and writes the plans lives in
//! `crate::runtime`.

pub mod controller;
pub mod endpoint;
pub mod metrics;
pub mod reconcile;
pub mod tracker;
pub mod trigger;
pub mod writer;

pub use reconcile::{NodeZones, PlanStats, SliceOptions, SlicePlan, plan_slices};
