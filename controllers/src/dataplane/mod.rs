//! The node agent's logic: what Services and EndpointSlices mean for one node ([`desired`], pure),
//! and how that state is written as nftables rules ([`nft`], pure).

pub mod cache;
pub mod desired;
pub mod input;
pub mod ipvs;
pub mod nft;
