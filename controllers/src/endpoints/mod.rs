//! The Endpoints controller (legacy core/v1 Endpoints, deprecated since Kubernetes 1.33 but still
//! read by many third-party tools): one Endpoints object per Service with a selector, at most
//! 1000 addresses.
//!
//! [`subsets`] and [`desired`] are pure; the controller loop is in [`controller`].

pub mod controller;
pub mod desired;
pub mod subsets;
