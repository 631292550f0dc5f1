//! The mutating admission webhook that allocates ClusterIPs and NodePorts for Services. Every
//! replica serves it; allocation is safe from any of them because every bitmap change is an etcd
//! compare-and-swap.

pub mod certs;
pub mod drain;
pub mod handler;
pub mod rotation;
pub mod server;
