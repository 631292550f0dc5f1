//! IPVS generic-netlink messages (family `IPVS`, version 1), encode and decode only: the kernel's
//! `include/uapi/linux/ip_vs.h` layout on top of netlink-packet-generic. No I/O here.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use netlink_packet_core::{
    DecodeError, DefaultNla, Emitable, NLA_F_NESTED, Nla, NlaBuffer, NlasIterator, Parseable,
    ParseableParametrized, emit_u16, emit_u16_be, emit_u32, parse_string, parse_u16, parse_u16_be, parse_u32,
};
use netlink_packet_generic::{GenlFamily, GenlHeader};

pub const AF_INET: u16 = 2;
pub const AF_INET6: u16 = 10;
pub const IPPROTO_TCP: u16 = 6;
pub const IPPROTO_UDP: u16 = 17;
pub const IPPROTO_SCTP: u16 = 132;
/// `IP_VS_SVC_F_PERSISTENT`: ClientIP affinity.
pub const SVC_F_PERSISTENT: u32 = 0x1;
/// `IP_VS_CONN_F_MASQ`: NAT forwarding.
pub const CONN_F_MASQ: u32 = 0;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Command {
    NewService,
    SetService,
    DelService,
    GetService,
    NewDest,
    SetDest,
    DelDest,
    GetDest,
    Flush,
    Other(u8),
}

impl From<Command> for u8 {
    fn from(c: Command) -> u8 {
        match c {
            Command::NewService => 1,
            Command::SetService => 2,
            Command::DelService => 3,
            Command::GetService => 4,
            Command::NewDest => 5,
            Command::SetDest => 6,
            Command::DelDest => 7,
            Command::GetDest => 8,
            Command::Flush => 17,
            Command::Other(n) => n,
        }
    }
}

impl From<u8> for Command {
    fn from(n: u8) -> Self {
        match n {
            1 => Self::NewService,
            2 => Self::SetService,
            3 => Self::DelService,
            4 => Self::GetService,
            5 => Self::NewDest,
            6 => Self::SetDest,
            7 => Self::DelDest,
            8 => Self::GetDest,
            17 => Self::Flush,
            n => Self::Other(n),
        }
    }
}

/// An address as IPVS carries it: 16 bytes (`union nf_inet_addr`), IPv4 in the first four.
fn emit_addr(ip: &IpAddr, buf: &mut [u8]) {
    buf[..16].fill(0);
    match ip {
        IpAddr::V4(v4) => buf[..4].copy_from_slice(&v4.octets()),
        IpAddr::V6(v6) => buf[..16].copy_from_slice(&v6.octets()),
    }
}

/// Reads an address given its family (the attribute alone does not say).
pub fn addr(raw: &[u8], family: u16) -> Option<IpAddr> {
    match family {
        AF_INET => {
            let b: [u8; 4] = raw.get(..4)?.try_into().ok()?;
            Some(IpAddr::V4(Ipv4Addr::from(b)))
        }
        AF_INET6 => {
            let b: [u8; 16] = raw.get(..16)?.try_into().ok()?;
            Some(IpAddr::V6(Ipv6Addr::from(b)))
        }
        _ => None,
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ServiceAttr {
    Family(u16),
    Protocol(u16),
    /// Raw 16 bytes from the kernel, or an address to send.
    Addr(IpAddr),
    RawAddr(Vec<u8>),
    Port(u16),
    Fwmark(u32),
    Scheduler(String),
    Flags {
        flags: u32,
        mask: u32,
    },
    /// Persistence timeout, seconds.
    Timeout(u32),
    Netmask(u32),
    Other(DefaultNla),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DestAttr {
    Addr(IpAddr),
    RawAddr(Vec<u8>),
    Port(u16),
    FwdMethod(u32),
    Weight(u32),
    UpperThreshold(u32),
    LowerThreshold(u32),
    ActiveConns(u32),
    InactiveConns(u32),
    PersistConns(u32),
    AddrFamily(u16),
    Other(DefaultNla),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CmdAttr {
    Service(Vec<ServiceAttr>),
    Dest(Vec<DestAttr>),
    Other(DefaultNla),
}

/// A message of the `IPVS` family.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IpvsMessage {
    pub cmd: Command,
    pub attrs: Vec<CmdAttr>,
}

impl GenlFamily for IpvsMessage {
    fn family_name() -> &'static str {
        "IPVS"
    }

    fn command(&self) -> u8 {
        self.cmd.into()
    }

    fn version(&self) -> u8 {
        1
    }
}

impl Nla for ServiceAttr {
    fn value_len(&self) -> usize {
        match self {
            Self::Family(_) | Self::Protocol(_) | Self::Port(_) => 2,
            Self::Addr(_) => 16,
            Self::RawAddr(b) => b.len(),
            Self::Fwmark(_) | Self::Timeout(_) | Self::Netmask(_) => 4,
            Self::Scheduler(s) => s.len() + 1,
            Self::Flags { .. } => 8,
            Self::Other(n) => n.value_len(),
        }
    }

    fn kind(&self) -> u16 {
        match self {
            Self::Family(_) => 1,
            Self::Protocol(_) => 2,
            Self::Addr(_) | Self::RawAddr(_) => 3,
            Self::Port(_) => 4,
            Self::Fwmark(_) => 5,
            Self::Scheduler(_) => 6,
            Self::Flags { .. } => 7,
            Self::Timeout(_) => 8,
            Self::Netmask(_) => 9,
            Self::Other(n) => n.kind(),
        }
    }

    fn emit_value(&self, buf: &mut [u8]) {
        match self {
            Self::Family(v) | Self::Protocol(v) => emit_u16(buf, *v).unwrap_or(()),
            Self::Port(p) => emit_u16_be(buf, *p).unwrap_or(()),
            Self::Addr(ip) => emit_addr(ip, buf),
            Self::RawAddr(b) => buf[..b.len()].copy_from_slice(b),
            Self::Fwmark(v) | Self::Timeout(v) | Self::Netmask(v) => emit_u32(buf, *v).unwrap_or(()),
            Self::Scheduler(s) => {
                buf[..s.len()].copy_from_slice(s.as_bytes());
                buf[s.len()] = 0;
            }
            Self::Flags { flags, mask } => {
                emit_u32(&mut buf[..4], *flags).unwrap_or(());
                emit_u32(&mut buf[4..8], *mask).unwrap_or(());
            }
            Self::Other(n) => n.emit_value(buf),
        }
    }
}

impl<'a, T: AsRef<[u8]> + ?Sized> Parseable<NlaBuffer<&'a T>> for ServiceAttr {
    fn parse(nla: &NlaBuffer<&'a T>) -> Result<Self, DecodeError> {
        let v = nla.value();
        Ok(match nla.kind() {
            1 => Self::Family(parse_u16(v)?),
            2 => Self::Protocol(parse_u16(v)?),
            3 => Self::RawAddr(v.to_vec()),
            4 => Self::Port(parse_u16_be(v)?),
            5 => Self::Fwmark(parse_u32(v)?),
            6 => Self::Scheduler(parse_string(v)?),
            7 if v.len() >= 8 => Self::Flags {
                flags: parse_u32(&v[..4])?,
                mask: parse_u32(&v[4..8])?,
            },
            8 => Self::Timeout(parse_u32(v)?),
            9 => Self::Netmask(parse_u32(v)?),
            _ => Self::Other(DefaultNla::parse(nla)?),
        })
    }
}

impl Nla for DestAttr {
    fn value_len(&self) -> usize {
        match self {
            Self::Addr(_) => 16,
            Self::RawAddr(b) => b.len(),
            Self::Port(_) | Self::AddrFamily(_) => 2,
            Self::Other(n) => n.value_len(),
            _ => 4,
        }
    }

    fn kind(&self) -> u16 {
        match self {
            Self::Addr(_) | Self::RawAddr(_) => 1,
            Self::Port(_) => 2,
            Self::FwdMethod(_) => 3,
            Self::Weight(_) => 4,
            Self::UpperThreshold(_) => 5,
            Self::LowerThreshold(_) => 6,
            Self::ActiveConns(_) => 7,
            Self::InactiveConns(_) => 8,
            Self::PersistConns(_) => 9,
            Self::AddrFamily(_) => 11,
            Self::Other(n) => n.kind(),
        }
    }

    fn emit_value(&self, buf: &mut [u8]) {
        match self {
            Self::Addr(ip) => emit_addr(ip, buf),
            Self::RawAddr(b) => buf[..b.len()].copy_from_slice(b),
            Self::Port(p) => emit_u16_be(buf, *p).unwrap_or(()),
            Self::AddrFamily(f) => emit_u16(buf, *f).unwrap_or(()),
            Self::FwdMethod(v)
            | Self::Weight(v)
            | Self::UpperThreshold(v)
            | Self::LowerThreshold(v)
            | Self::ActiveConns(v)
            | Self::InactiveConns(v)
            | Self::PersistConns(v) => emit_u32(buf, *v).unwrap_or(()),
            Self::Other(n) => n.emit_value(buf),
        }
    }
}

impl<'a, T: AsRef<[u8]> + ?Sized> Parseable<NlaBuffer<&'a T>> for DestAttr {
    fn parse(nla: &NlaBuffer<&'a T>) -> Result<Self, DecodeError> {
        let v = nla.value();
        Ok(match nla.kind() {
            1 => Self::RawAddr(v.to_vec()),
            2 => Self::Port(parse_u16_be(v)?),
            3 => Self::FwdMethod(parse_u32(v)?),
            4 => Self::Weight(parse_u32(v)?),
            5 => Self::UpperThreshold(parse_u32(v)?),
            6 => Self::LowerThreshold(parse_u32(v)?),
            7 => Self::ActiveConns(parse_u32(v)?),
            8 => Self::InactiveConns(parse_u32(v)?),
            9 => Self::PersistConns(parse_u32(v)?),
            11 => Self::AddrFamily(parse_u16(v)?),
            _ => Self::Other(DefaultNla::parse(nla)?),
        })
    }
}

impl Nla for CmdAttr {
    fn value_len(&self) -> usize {
        match self {
            Self::Service(a) => a.as_slice().buffer_len(),
            Self::Dest(a) => a.as_slice().buffer_len(),
            Self::Other(n) => n.value_len(),
        }
    }

    fn kind(&self) -> u16 {
        match self {
            Self::Service(_) => 1 | NLA_F_NESTED,
            Self::Dest(_) => 2 | NLA_F_NESTED,
            Self::Other(n) => n.kind(),
        }
    }

    fn emit_value(&self, buf: &mut [u8]) {
        match self {
            Self::Service(a) => a.as_slice().emit(buf),
            Self::Dest(a) => a.as_slice().emit(buf),
            Self::Other(n) => n.emit_value(buf),
        }
    }
}

fn nested<A>(v: &[u8]) -> Result<Vec<A>, DecodeError>
where
    A: for<'b> Parseable<NlaBuffer<&'b [u8]>>,
{
    NlasIterator::new(v)
        .map(|nla| nla.and_then(|n| A::parse(&n)))
        .collect()
}

impl<'a, T: AsRef<[u8]> + ?Sized> Parseable<NlaBuffer<&'a T>> for CmdAttr {
    fn parse(nla: &NlaBuffer<&'a T>) -> Result<Self, DecodeError> {
        Ok(match nla.kind() & !NLA_F_NESTED {
            1 => Self::Service(nested(nla.value())?),
            2 => Self::Dest(nested(nla.value())?),
            _ => Self::Other(DefaultNla::parse(nla)?),
        })
    }
}

impl Emitable for IpvsMessage {
    fn buffer_len(&self) -> usize {
        self.attrs.as_slice().buffer_len()
    }

    fn emit(&self, buf: &mut [u8]) {
        self.attrs.as_slice().emit(buf);
    }
}

impl ParseableParametrized<[u8], GenlHeader> for IpvsMessage {
    fn parse_with_param(buf: &[u8], header: GenlHeader) -> Result<Self, DecodeError> {
        Ok(Self {
            cmd: header.cmd.into(),
            attrs: nested(buf)?,
        })
    }
}

#[cfg(test)]
mod tests {
    use netlink_packet_generic::GenlMessage;

    use super::*;

    fn round_trip(msg: IpvsMessage) -> IpvsMessage {
        let mut buf = vec![0u8; msg.buffer_len()];
        msg.emit(&mut buf);
        IpvsMessage::parse_with_param(
            &buf,
            GenlHeader {
                cmd: msg.cmd.into(),
                version: 1,
            },
        )
        .unwrap()
    }

    #[test]
    fn a_service_round_trips_with_the_kernels_layout() {
        let msg = IpvsMessage {
            cmd: Command::NewService,
            attrs: vec![CmdAttr::Service(vec![
                ServiceAttr::Family(AF_INET),
                ServiceAttr::Protocol(IPPROTO_TCP),
                ServiceAttr::Addr("10.96.0.1".parse().unwrap()),
                ServiceAttr::Port(80),
                ServiceAttr::Scheduler("rr".into()),
                ServiceAttr::Flags {
                    flags: SVC_F_PERSISTENT,
                    mask: u32::MAX,
                },
                ServiceAttr::Timeout(10800),
                ServiceAttr::Netmask(0xffff_ffff),
            ])],
        };
        let mut buf = vec![0u8; msg.buffer_len()];
        msg.emit(&mut buf);
        // Nested service attribute (type 1 | NLA_F_NESTED), then family = AF_INET.
        assert_eq!(&buf[2..4], &(1u16 | NLA_F_NESTED).to_ne_bytes());
        assert_eq!(&buf[4..10], &[6, 0, 1, 0, 2, 0]);
        // The port is in network byte order.
        let port_at = buf.windows(4).position(|w| w == [6, 0, 4, 0]).unwrap();
        assert_eq!(&buf[port_at + 4..port_at + 6], &[0, 80]);
        let back = round_trip(msg);
        let CmdAttr::Service(attrs) = &back.attrs[0] else {
            panic!("{back:?}")
        };
        assert!(attrs.contains(&ServiceAttr::Port(80)));
        assert!(attrs.contains(&ServiceAttr::Scheduler("rr".into())));
        let raw = attrs
            .iter()
            .find_map(|a| match a {
                ServiceAttr::RawAddr(b) => Some(b.clone()),
                _ => None,
            })
            .unwrap();
        assert_eq!(raw.len(), 16);
        assert_eq!(addr(&raw, AF_INET), Some("10.96.0.1".parse().unwrap()));
    }

    #[test]
    fn a_destination_round_trips() {
        let msg = IpvsMessage {
            cmd: Command::NewDest,
            attrs: vec![
                CmdAttr::Service(vec![ServiceAttr::Family(AF_INET6)]),
                CmdAttr::Dest(vec![
                    DestAttr::Addr("fd00::1".parse().unwrap()),
                    DestAttr::Port(8080),
                    DestAttr::FwdMethod(CONN_F_MASQ),
                    DestAttr::Weight(1),
                    DestAttr::AddrFamily(AF_INET6),
                ]),
            ],
        };
        let back = round_trip(msg);
        let CmdAttr::Dest(d) = &back.attrs[1] else {
            panic!()
        };
        assert!(d.contains(&DestAttr::Port(8080)) && d.contains(&DestAttr::Weight(1)));
        assert!(d.contains(&DestAttr::AddrFamily(AF_INET6)));
        let raw = d
            .iter()
            .find_map(|a| match a {
                DestAttr::RawAddr(b) => Some(b.clone()),
                _ => None,
            })
            .unwrap();
        assert_eq!(addr(&raw, AF_INET6), Some("fd00::1".parse().unwrap()));
    }

    #[test]
    fn the_generic_header_names_command_and_version() {
        let mut m = GenlMessage::from_payload(IpvsMessage {
            cmd: Command::GetService,
            attrs: vec![],
        });
        m.set_resolved_family_id(42);
        m.finalize();
        let mut buf = vec![0u8; m.buffer_len()];
        m.emit(&mut buf);
        assert_eq!(&buf[..2], &[4, 1], "cmd 4 (GET_SERVICE), version 1");
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        for bytes in [
            &[1u8, 2, 3][..],
            &[8, 0, 1, 0x80, 5, 0, 0][..],
            &[255, 255, 1, 0][..],
        ] {
            let _ = IpvsMessage::parse_with_param(bytes, GenlHeader { cmd: 1, version: 1 });
        }
    }
}
