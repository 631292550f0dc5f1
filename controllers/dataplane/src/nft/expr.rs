//! nf_tables expressions, the kernel's own vocabulary: what one rule is made of once nft's
//! syntax is gone (`ip daddr . meta l4proto . th dport vmap @m` is a payload load, a meta load,
//! a second payload load and a lookup). Pure data, compared as a whole when the table is read
//! back; [`super::wire`] puts them on the wire.
//!
//! Registers are numbered as the kernel prints them back: a value starting on a 16-byte
//! boundary names the 16-byte register (`NFT_REG_1`..), any other the 4-byte one
//! (`NFT_REG32_00`..), so what is read back equals what was sent.

use std::net::IpAddr;

use svcplane_core::Protocol;

/// The verdict register.
pub const VERDICT: u32 = 0;

/// The register a value starting at the 4-byte slot `slot` (0-based) is loaded into.
pub const fn reg(slot: u32) -> u32 {
    if slot.is_multiple_of(4) {
        1 + slot / 4
    } else {
        8 + slot
    }
}

/// The first register: where single values and concatenations start.
pub const REG1: u32 = reg(0);

/// `payload` bases.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Base {
    Network,
    Transport,
}

/// `meta` keys svcplane uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MetaKey {
    Mark,
    L4Proto,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    Accept,
    Drop,
    Jump(String),
    Goto(String),
}

/// One expression of a rule.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Expr {
    Payload {
        dreg: u32,
        base: Base,
        offset: u32,
        len: u32,
    },
    Meta {
        dreg: u32,
        key: MetaKey,
    },
    MetaSet {
        sreg: u32,
        key: MetaKey,
    },
    /// Equal (`eq` true) or not equal to `data`.
    Cmp {
        sreg: u32,
        eq: bool,
        data: Vec<u8>,
    },
    /// `dreg = (sreg & mask) ^ xor`.
    Bitwise {
        sreg: u32,
        dreg: u32,
        mask: Vec<u8>,
        xor: Vec<u8>,
    },
    /// Membership in `set` (a match: the rule stops here when absent), or with `verdict_map` the
    /// verdict the map holds for the key.
    Lookup {
        set: String,
        sreg: u32,
        verdict_map: bool,
    },
    Immediate {
        dreg: u32,
        data: Vec<u8>,
    },
    Verdict(Verdict),
    /// A random number in `0..modulus`.
    Numgen {
        dreg: u32,
        modulus: u32,
    },
    /// DNAT to the address in `addr` and the port in `port`.
    Dnat {
        family: u32,
        addr: u32,
        port: u32,
    },
    Masquerade,
    /// Adds the key to `set`, or refreshes its timeout.
    DynsetUpdate {
        set: String,
        sreg: u32,
    },
    /// `fib daddr type` into `dreg`.
    FibDaddrType {
        dreg: u32,
    },
    /// `ct state` (the conntrack state bits) into `dreg`.
    CtState {
        dreg: u32,
    },
    /// ICMP port unreachable.
    Reject {
        icmp_code: u8,
    },
}

/// `NFPROTO_*` families.
pub const NFPROTO_IPV4: u32 = 2;
pub const NFPROTO_IPV6: u32 = 10;
/// `RTN_LOCAL`: a `fib … type` result.
pub const RTN_LOCAL: u32 = 2;
/// `NF_CT_STATE_BIT(IP_CT_NEW)`: the `new` bit of `ct state`.
pub const CT_STATE_NEW: u32 = 8;

/// A host-order 32-bit value as a register holds it (marks, fib types, numgen results).
pub fn host_u32(v: u32) -> Vec<u8> {
    v.to_ne_bytes().to_vec()
}

pub fn protocol_number(p: Protocol) -> u8 {
    match p {
        Protocol::Tcp => 6,
        Protocol::Udp => 17,
        Protocol::Sctp => 132,
    }
}

pub fn ip_bytes(ip: IpAddr) -> Vec<u8> {
    match ip {
        IpAddr::V4(v4) => v4.octets().to_vec(),
        IpAddr::V6(v6) => v6.octets().to_vec(),
    }
}

/// Rounds a component's length up to its 4-byte slots.
fn slots(len: usize) -> usize {
    len.div_ceil(4)
}

/// A concatenated set key or value as registers hold it: each component padded to 4 bytes.
pub fn concat(components: &[&[u8]]) -> Vec<u8> {
    let mut out = Vec::new();
    for c in components {
        out.extend_from_slice(c);
        out.resize(out.len() + slots(c.len()) * 4 - c.len(), 0);
    }
    out
}

/// The key of a Service address and port: `daddr . l4proto . dport`.
pub fn service_key(ip: IpAddr, p: Protocol, port: u16) -> Vec<u8> {
    concat(&[&ip_bytes(ip), &[protocol_number(p)], &port.to_be_bytes()])
}

/// The key of a node port: `l4proto . dport`.
pub fn port_key(p: Protocol, port: u16) -> Vec<u8> {
    concat(&[&[protocol_number(p)], &port.to_be_bytes()])
}

/// Offsets of the fields svcplane reads, in their headers.
const IPV4_SADDR: u32 = 12;
const IPV4_DADDR: u32 = 16;
const IPV6_SADDR: u32 = 8;
const IPV6_DADDR: u32 = 24;
/// The destination port of TCP, UDP and SCTP alike.
const TH_DPORT: u32 = 2;

fn addr_len(v6: bool) -> u32 {
    if v6 { 16 } else { 4 }
}

fn addr_offset(v6: bool, source: bool) -> u32 {
    match (v6, source) {
        (false, true) => IPV4_SADDR,
        (false, false) => IPV4_DADDR,
        (true, true) => IPV6_SADDR,
        (true, false) => IPV6_DADDR,
    }
}

/// Loads the source (or destination) address into `dreg`.
pub fn load_addr(v6: bool, source: bool, dreg: u32) -> Expr {
    Expr::Payload {
        dreg,
        base: Base::Network,
        offset: addr_offset(v6, source),
        len: addr_len(v6),
    }
}

/// `<saddr> != cidr`: the source address is outside `cidr`. Encoded as nft encodes it, so the
/// table lists as nft would have written it: a byte-aligned prefix is a shorter load and a
/// compare, any other a whole-address load, a mask and a compare.
pub fn saddr_outside(cidr: ipnet::IpNet) -> Vec<Expr> {
    let v6 = matches!(cidr, ipnet::IpNet::V6(_));
    let network = ip_bytes(cidr.network());
    let offset = addr_offset(v6, true);
    let prefix = u32::from(cidr.prefix_len());
    if prefix % 8 == 0 && prefix > 0 {
        let len = prefix / 8;
        return vec![
            Expr::Payload {
                dreg: REG1,
                base: Base::Network,
                offset,
                len,
            },
            Expr::Cmp {
                sreg: REG1,
                eq: false,
                data: network[..len as usize].to_vec(),
            },
        ];
    }
    vec![
        load_addr(v6, true, REG1),
        Expr::Bitwise {
            sreg: REG1,
            dreg: REG1,
            mask: ip_bytes(cidr.netmask()),
            xor: vec![0; network.len()],
        },
        Expr::Cmp {
            sreg: REG1,
            eq: false,
            data: network,
        },
    ]
}

fn load_dport(dreg: u32) -> Expr {
    Expr::Payload {
        dreg,
        base: Base::Transport,
        offset: TH_DPORT,
        len: 2,
    }
}

/// `<daddr> . meta l4proto . th dport` loaded from [`REG1`] on.
pub fn load_service_tuple(v6: bool) -> Vec<Expr> {
    let addr_slots = addr_len(v6) / 4;
    vec![
        load_addr(v6, false, reg(0)),
        Expr::Meta {
            dreg: reg(addr_slots),
            key: MetaKey::L4Proto,
        },
        load_dport(reg(addr_slots + 1)),
    ]
}

/// `meta l4proto . th dport` loaded from [`REG1`] on.
pub fn load_proto_port() -> Vec<Expr> {
    vec![
        Expr::Meta {
            dreg: reg(0),
            key: MetaKey::L4Proto,
        },
        load_dport(reg(1)),
    ]
}

/// `ct state new`: the first packet of a connection (or one conntrack has not confirmed yet).
pub fn ct_state_new() -> Vec<Expr> {
    vec![
        Expr::CtState { dreg: REG1 },
        Expr::Bitwise {
            sreg: REG1,
            dreg: REG1,
            mask: host_u32(CT_STATE_NEW),
            xor: host_u32(0),
        },
        Expr::Cmp {
            sreg: REG1,
            eq: false,
            data: host_u32(0),
        },
    ]
}

/// `fib daddr type local`: addressed to this node.
pub fn daddr_is_local() -> Vec<Expr> {
    vec![
        Expr::FibDaddrType { dreg: REG1 },
        Expr::Cmp {
            sreg: REG1,
            eq: true,
            data: host_u32(RTN_LOCAL),
        },
    ]
}

/// `meta mark set meta mark | mark`.
pub fn set_mark_bit(mark: u32) -> Vec<Expr> {
    vec![
        Expr::Meta {
            dreg: REG1,
            key: MetaKey::Mark,
        },
        Expr::Bitwise {
            sreg: REG1,
            dreg: REG1,
            mask: host_u32(!mark),
            xor: host_u32(mark),
        },
        Expr::MetaSet {
            sreg: REG1,
            key: MetaKey::Mark,
        },
    ]
}

/// `meta mark & mark != 0`.
pub fn has_mark_bit(mark: u32) -> Vec<Expr> {
    vec![
        Expr::Meta {
            dreg: REG1,
            key: MetaKey::Mark,
        },
        Expr::Bitwise {
            sreg: REG1,
            dreg: REG1,
            mask: host_u32(mark),
            xor: host_u32(0),
        },
        Expr::Cmp {
            sreg: REG1,
            eq: false,
            data: host_u32(0),
        },
    ]
}

/// `meta l4proto <p> dnat to <addr>:<port>`.
pub fn dnat(to: std::net::SocketAddr, p: Protocol) -> Vec<Expr> {
    let v6 = to.is_ipv6();
    let addr_slots = addr_len(v6) / 4;
    vec![
        Expr::Meta {
            dreg: REG1,
            key: MetaKey::L4Proto,
        },
        Expr::Cmp {
            sreg: REG1,
            eq: true,
            data: vec![protocol_number(p)],
        },
        Expr::Immediate {
            dreg: REG1,
            data: ip_bytes(to.ip()),
        },
        Expr::Immediate {
            dreg: reg(addr_slots),
            data: to.port().to_be_bytes().to_vec(),
        },
        Expr::Dnat {
            family: if v6 { NFPROTO_IPV6 } else { NFPROTO_IPV4 },
            addr: REG1,
            port: reg(addr_slots),
        },
    ]
}

/// ICMP (v4) and ICMPv6 codes for "port unreachable".
pub fn reject(v6: bool) -> Expr {
    Expr::Reject {
        icmp_code: if v6 { 4 } else { 3 },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn registers_are_named_as_the_kernel_prints_them() {
        // nft's own choices for `ip daddr . meta l4proto . th dport` (v4) and the v6 tuple.
        assert_eq!([reg(0), reg(1), reg(2)], [1, 9, 10]);
        assert_eq!([reg(0), reg(4), reg(5)], [1, 2, 13]);
    }

    #[test]
    fn concatenated_keys_pad_each_component_to_four_bytes() {
        assert_eq!(
            service_key("10.96.0.1".parse().unwrap(), Protocol::Tcp, 443),
            [10, 96, 0, 1, 6, 0, 0, 0, 1, 0xbb, 0, 0]
        );
        assert_eq!(port_key(Protocol::Udp, 30053), [17, 0, 0, 0, 0x75, 0x65, 0, 0]);
        assert_eq!(
            service_key("fd00::1".parse().unwrap(), Protocol::Sctp, 80).len(),
            24
        );
    }

    #[test]
    fn a_source_range_is_encoded_as_nft_encodes_it() {
        // `nft --debug=netlink` 1.0.6 for `ip saddr != 10.244.0.0/16`, `!= 10.96.0.0/12` and
        // `ip6 saddr != fd00:10:244::/56`.
        assert_eq!(
            saddr_outside("10.244.0.0/16".parse().unwrap()),
            [
                Expr::Payload {
                    dreg: REG1,
                    base: Base::Network,
                    offset: 12,
                    len: 2
                },
                Expr::Cmp {
                    sreg: REG1,
                    eq: false,
                    data: vec![10, 244]
                }
            ]
        );
        assert_eq!(
            saddr_outside("10.96.0.0/12".parse().unwrap()),
            [
                load_addr(false, true, REG1),
                Expr::Bitwise {
                    sreg: REG1,
                    dreg: REG1,
                    mask: vec![255, 240, 0, 0],
                    xor: vec![0; 4]
                },
                Expr::Cmp {
                    sreg: REG1,
                    eq: false,
                    data: vec![10, 96, 0, 0]
                }
            ]
        );
        let v6 = saddr_outside("fd00:10:244::/56".parse().unwrap());
        assert_eq!(
            v6[0],
            Expr::Payload {
                dreg: REG1,
                base: Base::Network,
                offset: 8,
                len: 7
            }
        );
        assert_eq!(
            v6[1],
            Expr::Cmp {
                sreg: REG1,
                eq: false,
                data: vec![0xfd, 0, 0, 0x10, 0x02, 0x44, 0]
            }
        );
    }
}
