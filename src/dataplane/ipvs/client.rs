//! Talks to the kernel's IPVS over generic netlink (no ipvsadm): dumps the virtual and real
//! servers, and carries out the plan's operations one request at a time, each acknowledged.

use std::{collections::BTreeMap, io, net::SocketAddr};

use netlink_packet_core::{NLM_F_ACK, NLM_F_DUMP, NLM_F_REQUEST, NetlinkMessage, NetlinkPayload};
use netlink_packet_generic::GenlMessage;
use netlink_sys::{Socket, SocketAddr as NlAddr, protocols::NETLINK_GENERIC};
use svcplane_core::Protocol;
use svcplane_dataplane::ipvs::{
    message::{
        AF_INET, AF_INET6, CONN_F_MASQ, CmdAttr, Command, DestAttr, IPPROTO_SCTP, IPPROTO_TCP, IPPROTO_UDP,
        IpvsMessage, SVC_F_PERSISTENT, ServiceAttr, addr,
    },
    plan::{ObservedDest, ObservedVs, Op, VsKey},
};

use super::probe;

/// What IPVS answers for a virtual server it does not have.
const ESRCH: i32 = 3;

pub struct IpvsClient {
    socket: Socket,
    family: u16,
    seq: u32,
}

fn invalid(what: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, what.into())
}

fn family_of(key: &VsKey) -> u16 {
    if key.addr.is_ipv6() { AF_INET6 } else { AF_INET }
}

fn protocol_number(p: Protocol) -> u16 {
    match p {
        Protocol::Tcp => IPPROTO_TCP,
        Protocol::Udp => IPPROTO_UDP,
        Protocol::Sctp => IPPROTO_SCTP,
    }
}

fn protocol_of(n: u16) -> Option<Protocol> {
    match n {
        IPPROTO_TCP => Some(Protocol::Tcp),
        IPPROTO_UDP => Some(Protocol::Udp),
        IPPROTO_SCTP => Some(Protocol::Sctp),
        _ => None,
    }
}

/// The attributes that name a virtual server.
fn service_id(key: &VsKey) -> Vec<ServiceAttr> {
    vec![
        ServiceAttr::Family(family_of(key)),
        ServiceAttr::Protocol(protocol_number(key.protocol)),
        ServiceAttr::Addr(key.addr),
        ServiceAttr::Port(key.port),
    ]
}

fn service_full(key: &VsKey, scheduler: &str, persistence: Option<u32>) -> Vec<ServiceAttr> {
    let mut attrs = service_id(key);
    attrs.push(ServiceAttr::Scheduler(scheduler.to_owned()));
    attrs.push(ServiceAttr::Flags {
        flags: if persistence.is_some() {
            SVC_F_PERSISTENT
        } else {
            0
        },
        mask: u32::MAX,
    });
    attrs.push(ServiceAttr::Timeout(persistence.unwrap_or(0)));
    attrs.push(ServiceAttr::Netmask(if key.addr.is_ipv6() {
        128
    } else {
        u32::MAX
    }));
    attrs
}

fn dest(addr: &SocketAddr, weight: u32) -> Vec<DestAttr> {
    vec![
        DestAttr::Addr(addr.ip()),
        DestAttr::Port(addr.port()),
        DestAttr::FwdMethod(CONN_F_MASQ),
        DestAttr::Weight(weight),
        DestAttr::UpperThreshold(0),
        DestAttr::LowerThreshold(0),
        DestAttr::AddrFamily(if addr.is_ipv6() { AF_INET6 } else { AF_INET }),
    ]
}

impl IpvsClient {
    /// `Ok(None)` when the kernel has no IPVS.
    pub fn connect() -> io::Result<Option<Self>> {
        let Some(family) = probe::resolve("IPVS")? else {
            return Ok(None);
        };
        let mut socket = Socket::new(NETLINK_GENERIC)?;
        socket.bind_auto()?;
        socket.connect(&NlAddr::new(0, 0))?;
        Ok(Some(Self {
            socket,
            family,
            seq: 0,
        }))
    }

    /// Sends one request; returns the messages of the reply (several for a dump).
    fn exchange(&mut self, msg: IpvsMessage, dump: bool) -> io::Result<Vec<IpvsMessage>> {
        self.seq = self.seq.wrapping_add(1);
        let mut genl = GenlMessage::from_payload(msg);
        genl.set_resolved_family_id(self.family);
        genl.finalize();
        let mut nl = NetlinkMessage::from(genl);
        nl.header.flags = NLM_F_REQUEST | if dump { NLM_F_DUMP } else { NLM_F_ACK };
        nl.header.sequence_number = self.seq;
        nl.finalize();
        let mut tx = vec![0u8; nl.buffer_len()];
        nl.serialize(&mut tx);
        self.socket.send(&tx, 0)?;
        let mut out = Vec::new();
        let mut rx = Vec::with_capacity(1 << 16);
        loop {
            rx.clear();
            let n = self.socket.recv(&mut rx, 0)?;
            let mut offset = 0;
            while offset < n {
                let reply = NetlinkMessage::<GenlMessage<IpvsMessage>>::deserialize(&rx[offset..n])
                    .map_err(|e| invalid(format!("IPVS reply: {e}")))?;
                let len = reply.header.length as usize;
                if reply.header.sequence_number != self.seq {
                    // A late answer to an earlier request: not ours.
                } else {
                    match reply.payload {
                        NetlinkPayload::Done(_) => return Ok(out),
                        NetlinkPayload::Error(e) if e.code.is_none() => return Ok(out),
                        NetlinkPayload::Error(e) => return Err(e.to_io()),
                        NetlinkPayload::InnerMessage(m) => {
                            out.push(m.payload);
                            if !dump {
                                return Ok(out);
                            }
                        }
                        _ => {}
                    }
                }
                if len == 0 {
                    break;
                }
                offset += len;
            }
        }
    }

    /// Every virtual server and its real servers.
    pub fn observe(&mut self) -> io::Result<BTreeMap<VsKey, ObservedVs>> {
        let services = self.exchange(
            IpvsMessage {
                cmd: Command::GetService,
                attrs: vec![],
            },
            true,
        )?;
        let mut out = BTreeMap::new();
        for msg in services {
            for attr in msg.attrs {
                let CmdAttr::Service(attrs) = attr else { continue };
                let Some((key, vs)) = parse_service(&attrs) else {
                    continue; // fwmark services and families svcplane does not use
                };
                out.insert(key, vs);
            }
        }
        for (key, vs) in &mut out {
            self.read_dests(key, vs)?;
        }
        Ok(out)
    }

    /// The virtual servers `keys` and their real servers, those that exist.
    pub fn observe_keys<'a>(
        &mut self,
        keys: impl IntoIterator<Item = &'a VsKey>,
    ) -> io::Result<BTreeMap<VsKey, ObservedVs>> {
        let mut out = BTreeMap::new();
        for key in keys {
            let reply = match self.exchange(
                IpvsMessage {
                    cmd: Command::GetService,
                    attrs: vec![CmdAttr::Service(service_id(key))],
                },
                false,
            ) {
                Ok(reply) => reply,
                // No such virtual server.
                Err(e) if e.raw_os_error() == Some(ESRCH) => continue,
                Err(e) => return Err(e),
            };
            let found = reply.into_iter().flat_map(|m| m.attrs).find_map(|a| match a {
                CmdAttr::Service(attrs) => parse_service(&attrs),
                _ => None,
            });
            if let Some((k, mut vs)) = found.filter(|(k, _)| k == key) {
                self.read_dests(&k, &mut vs)?;
                out.insert(k, vs);
            }
        }
        Ok(out)
    }

    /// Fills `vs` with the real servers of virtual server `key`.
    fn read_dests(&mut self, key: &VsKey, vs: &mut ObservedVs) -> io::Result<()> {
        let dests = self.exchange(
            IpvsMessage {
                cmd: Command::GetDest,
                attrs: vec![CmdAttr::Service(service_id(key))],
            },
            true,
        )?;
        for msg in dests {
            for attr in msg.attrs {
                if let CmdAttr::Dest(d) = attr
                    && let Some((addr, od)) = parse_dest(&d, family_of(key))
                {
                    vs.dests.insert(addr, od);
                }
            }
        }
        Ok(())
    }

    /// Removes every virtual server.
    pub fn flush(&mut self) -> io::Result<()> {
        self.exchange(
            IpvsMessage {
                cmd: Command::Flush,
                attrs: vec![],
            },
            false,
        )
        .map(|_| ())
    }

    pub fn apply(&mut self, op: &Op) -> io::Result<()> {
        let (cmd, attrs) = match op {
            Op::AddService(k, s, p) => (
                Command::NewService,
                vec![CmdAttr::Service(service_full(k, s, *p))],
            ),
            Op::UpdateService(k, s, p) => (
                Command::SetService,
                vec![CmdAttr::Service(service_full(k, s, *p))],
            ),
            Op::DelService(k) => (Command::DelService, vec![CmdAttr::Service(service_id(k))]),
            Op::AddDest(k, a, w) => (
                Command::NewDest,
                vec![CmdAttr::Service(service_id(k)), CmdAttr::Dest(dest(a, *w))],
            ),
            Op::UpdateDest(k, a, w) => (
                Command::SetDest,
                vec![CmdAttr::Service(service_id(k)), CmdAttr::Dest(dest(a, *w))],
            ),
            Op::DelDest(k, a) => (
                Command::DelDest,
                vec![CmdAttr::Service(service_id(k)), CmdAttr::Dest(dest(a, 0))],
            ),
        };
        self.exchange(IpvsMessage { cmd, attrs }, false).map(|_| ())
    }
}

fn parse_service(attrs: &[ServiceAttr]) -> Option<(VsKey, ObservedVs)> {
    let (mut family, mut proto, mut raw, mut port) = (None, None, None, None);
    let (mut scheduler, mut flags, mut timeout) = (String::new(), 0, 0);
    for a in attrs {
        match a {
            ServiceAttr::Family(f) => family = Some(*f),
            ServiceAttr::Protocol(p) => proto = Some(*p),
            ServiceAttr::RawAddr(b) => raw = Some(b.clone()),
            ServiceAttr::Port(p) => port = Some(*p),
            ServiceAttr::Scheduler(s) => scheduler.clone_from(s),
            ServiceAttr::Flags { flags: f, .. } => flags = *f,
            ServiceAttr::Timeout(t) => timeout = *t,
            _ => {}
        }
    }
    let key = VsKey {
        addr: addr(&raw?, family?)?,
        protocol: protocol_of(proto?)?,
        port: port?,
    };
    Some((
        key,
        ObservedVs {
            scheduler,
            persistence: (flags & SVC_F_PERSISTENT != 0).then_some(timeout),
            dests: BTreeMap::new(),
        },
    ))
}

fn parse_dest(attrs: &[DestAttr], service_family: u16) -> Option<(SocketAddr, ObservedDest)> {
    let (mut raw, mut port, mut family) = (None, None, service_family);
    let mut d = ObservedDest {
        weight: 0,
        active: 0,
        inactive: 0,
    };
    for a in attrs {
        match a {
            DestAttr::RawAddr(b) => raw = Some(b.clone()),
            DestAttr::Port(p) => port = Some(*p),
            DestAttr::AddrFamily(f) => family = *f,
            DestAttr::Weight(w) => d.weight = *w,
            DestAttr::ActiveConns(n) => d.active = *n,
            DestAttr::InactiveConns(n) => d.inactive = *n,
            _ => {}
        }
    }
    Some((SocketAddr::new(addr(&raw?, family)?, port?), d))
}
