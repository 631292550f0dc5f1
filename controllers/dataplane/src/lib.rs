//! The node agent's logic, all pure: what Services and EndpointSlices mean for one node
//! ([`input`] reduces them, [`desired`] decides), how that state is written as nftables rules
//! ([`nft`]) and as IPVS virtual servers with their generic-netlink messages ([`ipvs`]).
//!
//! No sockets and no Kubernetes client here: the agent in the binary (`src/dataplane`) watches
//! the API, opens the netlink sockets and runs `nft`, so everything that decides can be tested
//! and benchmarked without a kernel or a cluster.

pub mod desired;
pub mod input;
pub mod ipvs;
pub mod nft;
#[cfg(test)]
mod testing;
