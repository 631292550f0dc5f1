//! Whether this kernel has IPVS: the generic-netlink family `IPVS` resolves (asking for it loads
//! `ip_vs` when it is a module) or the kernel answers ENOENT.

use netlink_packet_core::{NLM_F_ACK, NLM_F_REQUEST, NetlinkMessage, NetlinkPayload};
use netlink_packet_generic::{
    GenlMessage,
    ctrl::{GenlCtrl, GenlCtrlCmd, nlas::GenlCtrlAttrs},
};
use netlink_sys::{Socket, SocketAddr, protocols::NETLINK_GENERIC};

#[derive(Debug, PartialEq, Eq)]
pub enum Ipvs {
    Available {
        family_id: u16,
    },
    /// Why not, in words for the log.
    Absent(String),
}

pub fn probe() -> Ipvs {
    match resolve("IPVS") {
        Ok(Some(id)) => Ipvs::Available { family_id: id },
        Ok(None) => Ipvs::Absent(
            "the kernel has no generic-netlink family IPVS (ip_vs is not built in or loadable)".into(),
        ),
        Err(e) => Ipvs::Absent(format!("cannot ask the kernel for the IPVS family: {e}")),
    }
}

/// The id of generic-netlink family `name`; `None` when the kernel does not know it.
pub fn resolve(name: &str) -> std::io::Result<Option<u16>> {
    let mut socket = Socket::new(NETLINK_GENERIC)?;
    socket.bind_auto()?;
    socket.connect(&SocketAddr::new(0, 0))?;
    let mut genl = GenlMessage::from_payload(GenlCtrl {
        cmd: GenlCtrlCmd::GetFamily,
        nlas: vec![GenlCtrlAttrs::FamilyName(name.to_owned())],
    });
    genl.finalize();
    let mut msg = NetlinkMessage::from(genl);
    msg.header.flags = NLM_F_REQUEST | NLM_F_ACK;
    msg.finalize();
    let mut tx = vec![0u8; msg.buffer_len()];
    msg.serialize(&mut tx);
    socket.send(&tx, 0)?;
    let mut rx = Vec::with_capacity(8192);
    socket.recv(&mut rx, 0)?;
    let reply = NetlinkMessage::<GenlMessage<GenlCtrl>>::deserialize(&rx)
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e.to_string()))?;
    match reply.payload {
        NetlinkPayload::InnerMessage(m) => Ok(m.payload.nlas.iter().find_map(|a| match a {
            GenlCtrlAttrs::FamilyId(id) => Some(*id),
            _ => None,
        })),
        NetlinkPayload::Error(e) => {
            let io = e.to_io();
            if io.raw_os_error() == Some(2) {
                Ok(None)
            } else {
                Err(io)
            }
        }
        other => Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("unexpected reply {other:?}"),
        )),
    }
}

#[cfg(test)]
mod tests {
    /// Every Linux kernel has the `nlctrl` family itself: resolving works end to end.
    #[test]
    fn resolves_a_family_every_kernel_has() {
        assert!(super::resolve("nlctrl").unwrap().is_some());
        // (Family names are at most 15 bytes; longer ones are EINVAL, not ENOENT.)
        assert_eq!(super::resolve("svcplane-nofam").unwrap(), None);
    }
}
