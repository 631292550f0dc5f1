//! IPVS mode, pure: the generic-netlink messages ([`message`]), the desired virtual servers and
//! the operations that reach them ([`plan`]), kept up to date Service by Service ([`index`]).

pub mod index;
pub mod message;
pub mod plan;
