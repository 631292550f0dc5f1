//! The EndpointSlice mirroring controller: EndpointSlices for the user-written Endpoints of
//! selector-less Services, so that proxies reading only slices still reach them.
//!
//! [`desired`] is pure; [`controller`] does the I/O.

pub mod controller;
pub mod desired;
