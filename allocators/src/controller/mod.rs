//! The allocation controllers, run by the leader only: the repair pass on a period (which also
//! initializes the ranges), the releases that follow stored Services, and the `ServicePool`
//! objects. They talk to the apiserver; everything they decide comes from the pure modules of
//! this crate.

pub mod pools;
pub mod release;
pub mod repair;
