//! IPVS mode, pure: the generic-netlink messages ([`message`]) and the desired virtual servers and
//! the operations that reach them ([`plan`]).

pub mod message;
pub mod plan;
