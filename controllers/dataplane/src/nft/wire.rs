//! Transactions as nf_tables netlink messages: one batch (`NFNL_MSG_BATCH_BEGIN` .. `END`) per
//! sync, which the kernel applies as one transaction, and the replies that say which message
//! failed. Message and attribute layouts are netlink-packet-netfilter's; the expressions that
//! crate does not model (numgen, nat, masq, dynset, fib, reject) are encoded here from the
//! kernel's `nf_tables.h`, big-endian like every nf_tables attribute. No I/O.

use std::num::NonZeroI32;

use netlink_packet_core::{
    DefaultNla, NLM_F_ACK, NLM_F_APPEND, NLM_F_CREATE, NLM_F_REQUEST, NetlinkHeader, NetlinkMessage,
    NetlinkPayload,
};
use netlink_packet_netfilter::{
    NetfilterHeader, NetfilterMessage, NetfilterMessageInner, NetfilterProtoFamily, NetfilterSubsystem,
    nftables::{
        Bitwise, ChainAttribute, ChainMessage, Cmp, DataAttribute, ExpressionAttribute, Expressions,
        GenAttribute, GenMessage, Hook as NlHook, HookNumber, Immediate, InetHookNumber, ListAttribute,
        Lookup, Meta, MetaKey as NlMetaKey, NfTablesMessage, Operator, Payload, Register, RuleAttribute,
        RuleMessage, SetAttribute, SetDescription, SetElementAttribute, SetElementList, SetElementMessage,
        SetFlags, SetMessage, TableAttribute, TableFlags, TableMessage, Verdict as NlVerdict,
        VerdictAttribute,
    },
    none::ControlMessage,
};
use svcplane_core::IpFamily;

use super::{
    expr::{self, Base, Expr, MetaKey, Verdict},
    layout::TableId,
    op::{HookPoint, Key, Op, SetKind, Transaction},
};

/// `NFT_DATA_VERDICT`: the data type of verdict maps.
pub(super) const DATA_VERDICT: u32 = 0xffff_ff00;
/// nft's datatype ids (`include/datatype.h`), stored with a set so `nft list` prints its keys.
const TYPE_IPADDR: u32 = 7;
const TYPE_IP6ADDR: u32 = 8;
const TYPE_INET_PROTOCOL: u32 = 12;
const TYPE_INET_SERVICE: u32 = 13;
/// nft's bits per component of a concatenated type.
const TYPE_BITS: u32 = 6;
/// Clients an affinity set remembers at most (nft's default for sets updated by rules).
pub(super) const AFFINITY_SET_SIZE: u32 = 65535;

pub(super) fn family_of(f: IpFamily) -> NetfilterProtoFamily {
    match f {
        IpFamily::IPv4 => NetfilterProtoFamily::IPv4,
        IpFamily::IPv6 => NetfilterProtoFamily::IPv6,
    }
}

fn strz(kind: u16, s: &str) -> DefaultNla {
    let mut v = s.as_bytes().to_vec();
    v.push(0);
    DefaultNla::new(kind, v)
}

fn be32(kind: u16, v: u32) -> DefaultNla {
    DefaultNla::new(kind, v.to_be_bytes().to_vec())
}

fn register(n: u32) -> Register {
    Register::from(n)
}

fn value(v: &[u8]) -> DataAttribute {
    DataAttribute::Value(v.to_vec())
}

fn other(name: &str, attributes: Vec<DefaultNla>) -> Expressions {
    Expressions::Other {
        expression_type: name.into(),
        attributes,
    }
}

fn verdict_data(v: &Verdict) -> DataAttribute {
    let code = |c| VerdictAttribute::Code(c);
    DataAttribute::Verdict(match v {
        // NF_DROP and NF_ACCEPT.
        Verdict::Drop => vec![code(NlVerdict::Other(0))],
        Verdict::Accept => vec![code(NlVerdict::Other(1))],
        Verdict::Jump(c) => vec![code(NlVerdict::Jump), VerdictAttribute::Chain(c.clone())],
        Verdict::Goto(c) => vec![code(NlVerdict::Goto), VerdictAttribute::Chain(c.clone())],
    })
}

fn meta_key(k: MetaKey) -> NlMetaKey {
    match k {
        MetaKey::Mark => NlMetaKey::Mark,
        MetaKey::L4Proto => NlMetaKey::L4Proto,
    }
}

/// One expression as the crate's attributes.
fn expression(e: &Expr) -> Expressions {
    match e {
        Expr::Payload {
            dreg,
            base,
            offset,
            len,
        } => Expressions::Payload(vec![
            Payload::DestinationRegister(register(*dreg)),
            Payload::Base(match base {
                Base::Network => 1,
                Base::Transport => 2,
            }),
            Payload::Offset(*offset),
            Payload::Len(*len),
        ]),
        Expr::Meta { dreg, key } => Expressions::Meta(vec![
            Meta::Key(meta_key(*key)),
            Meta::DestinationRegister(register(*dreg)),
        ]),
        Expr::MetaSet { sreg, key } => Expressions::Meta(vec![
            Meta::Key(meta_key(*key)),
            Meta::SourceRegister(register(*sreg)),
        ]),
        Expr::Cmp { sreg, eq, data } => Expressions::Cmp(vec![
            Cmp::SourceRegister(register(*sreg)),
            Cmp::Op(if *eq { Operator::Equal } else { Operator::NotEqual }),
            Cmp::Data(value(data)),
        ]),
        Expr::Bitwise {
            sreg,
            dreg,
            mask,
            xor,
        } => Expressions::Bitwise(vec![
            Bitwise::SourceRegister(register(*sreg)),
            Bitwise::DestinationRegister(register(*dreg)),
            // NFT_BITWISE_MASK_XOR (nft 1.0.6 sends it; older kernels take its absence as it).
            Bitwise::Op(0),
            Bitwise::Length(u32::try_from(mask.len()).unwrap_or(u32::MAX)),
            Bitwise::Mask(value(mask)),
            Bitwise::Xor(value(xor)),
        ]),
        Expr::Lookup {
            set,
            sreg,
            verdict_map,
        } => {
            let mut attrs = vec![Lookup::Set(set.clone()), Lookup::SourceRegister(register(*sreg))];
            if *verdict_map {
                attrs.push(Lookup::DestinationRegister(Register::Verdict));
            }
            Expressions::Lookup(attrs)
        }
        Expr::Immediate { dreg, data } => Expressions::Immediate(vec![
            Immediate::DestinationRegister(register(*dreg)),
            Immediate::Data(value(data)),
        ]),
        Expr::Verdict(v) => Expressions::Immediate(vec![
            Immediate::DestinationRegister(Register::Verdict),
            Immediate::Data(verdict_data(v)),
        ]),
        // NFTA_NG_DREG, _MODULUS, _TYPE (NFT_NG_RANDOM), _OFFSET.
        Expr::Numgen { dreg, modulus } => other(
            "numgen",
            vec![be32(1, *dreg), be32(2, *modulus), be32(3, 1), be32(4, 0)],
        ),
        // NFTA_NAT_TYPE (NFT_NAT_DNAT), _FAMILY, _REG_ADDR_MIN, _REG_PROTO_MIN, _FLAGS: the
        // flags the kernel stores (NF_NAT_RANGE_MAP_IPS | PROTO_SPECIFIED), so a read-back
        // equals what was sent.
        Expr::Dnat { family, addr, port } => other(
            "nat",
            vec![
                be32(1, 1),
                be32(2, *family),
                be32(3, *addr),
                be32(5, *port),
                be32(7, 0x3),
            ],
        ),
        Expr::Masquerade => other("masq", vec![]),
        // NFTA_DYNSET_SET_NAME, _OP (NFT_DYNSET_OP_UPDATE), _SREG_KEY.
        Expr::DynsetUpdate { set, sreg } => other("dynset", vec![strz(1, set), be32(3, 1), be32(4, *sreg)]),
        // NFTA_FIB_DREG, _RESULT (NFT_FIB_RESULT_ADDRTYPE), _FLAGS (NFTA_FIB_F_DADDR).
        Expr::FibDaddrType { dreg } => other("fib", vec![be32(1, *dreg), be32(2, 3), be32(3, 2)]),
        // NFTA_CT_DREG, _KEY (NFT_CT_STATE).
        Expr::CtState { dreg } => other("ct", vec![be32(1, *dreg), be32(2, 0)]),
        // NFTA_REJECT_TYPE (NFT_REJECT_ICMP_UNREACH), _ICMP_CODE (u8).
        Expr::Reject { icmp_code } => other("reject", vec![be32(1, 0), DefaultNla::new(2, vec![*icmp_code])]),
    }
}

fn expressions(exprs: &[Expr]) -> Vec<ListAttribute<ExpressionAttribute>> {
    exprs.iter().map(|e| expression(e).into()).collect()
}

fn key_bytes(k: &Key) -> Vec<u8> {
    match *k {
        Key::Service(ip, p, port) => expr::service_key(ip, p, port),
        Key::Port(p, port) => expr::port_key(p, port),
    }
}

/// Key type and length of a set of `kind` in `family`'s table.
fn key_type(kind: SetKind, family: IpFamily) -> (u32, u32) {
    let (addr_type, addr_len) = match family {
        IpFamily::IPv4 => (TYPE_IPADDR, 4),
        IpFamily::IPv6 => (TYPE_IP6ADDR, 16),
    };
    let proto_port = (TYPE_INET_PROTOCOL << TYPE_BITS) | TYPE_INET_SERVICE;
    match kind {
        SetKind::ServiceMap | SetKind::ServiceSet => {
            ((addr_type << (2 * TYPE_BITS)) | proto_port, addr_len + 8)
        }
        SetKind::PortMap | SetKind::PortSet => (proto_port, 8),
        SetKind::Affinity { .. } => (addr_type, addr_len),
    }
}

fn set_attributes(table: &str, name: &str, kind: SetKind, family: IpFamily, id: u32) -> Vec<SetAttribute> {
    let (key, key_len) = key_type(kind, family);
    let mut attrs = vec![
        SetAttribute::Table(table.into()),
        SetAttribute::Name(name.into()),
        // The kernel requires an id unique in the batch (for references by id, unused here).
        SetAttribute::Id(id),
    ];
    match kind {
        SetKind::ServiceMap | SetKind::PortMap => {
            attrs.extend([
                SetAttribute::Flags(SetFlags::Map),
                SetAttribute::KeyType(key),
                SetAttribute::KeyLen(key_len),
                SetAttribute::DataType(DATA_VERDICT),
                SetAttribute::DataLen(0),
            ]);
        }
        SetKind::ServiceSet | SetKind::PortSet => {
            attrs.extend([
                SetAttribute::Flags(SetFlags::empty()),
                SetAttribute::KeyType(key),
                SetAttribute::KeyLen(key_len),
            ]);
        }
        SetKind::Affinity { timeout_secs } => {
            // EVAL: updated from the packet path (nft's `dynamic`), which picks a backend that
            // can. Bounded as nft bounds such sets: clients past the bound are not remembered,
            // rather than memory growing with every source address anyone sends from.
            attrs.extend([
                SetAttribute::Flags(SetFlags::Timeout | SetFlags::Eval),
                SetAttribute::KeyType(key),
                SetAttribute::KeyLen(key_len),
                SetAttribute::Description(vec![SetDescription::Size(AFFINITY_SET_SIZE)]),
                SetAttribute::Timeout(u64::from(timeout_secs) * 1000),
            ]);
        }
    }
    attrs
}

fn element_list(table: &str, set: &str, key: &Key, goto: Option<&str>) -> SetElementMessage {
    let mut element = vec![SetElementAttribute::Key(value(&key_bytes(key)))];
    if let Some(chain) = goto {
        element.push(SetElementAttribute::Data(verdict_data(&Verdict::Goto(
            chain.into(),
        ))));
    }
    SetElementMessage {
        attributes: vec![
            SetElementList::Table(table.into()),
            SetElementList::Set(set.into()),
            SetElementList::Elements(vec![ListAttribute::Element(element)]),
        ],
    }
}

fn hook_number(p: HookPoint) -> InetHookNumber {
    match p {
        HookPoint::Prerouting => InetHookNumber::PreRouting,
        HookPoint::Input => InetHookNumber::LocalIn,
        HookPoint::Forward => InetHookNumber::Forward,
        HookPoint::Output => InetHookNumber::LocalOut,
        HookPoint::Postrouting => InetHookNumber::PostRouting,
    }
}

/// One op on `name`d table as a message and the netlink flags it is sent with; `seq` is
/// unique in the batch.
fn message(op: &Op, family: IpFamily, name: &str, seq: u32) -> (NfTablesMessage, u16) {
    let table = || TableMessage {
        attributes: vec![
            TableAttribute::Name(name.into()),
            TableAttribute::Flags(TableFlags::empty()),
        ],
    };
    let table_name = name;
    let chain = |name: &str| {
        vec![
            ChainAttribute::Table(table_name.into()),
            ChainAttribute::Name(name.into()),
        ]
    };
    match op {
        Op::AddTable => (NfTablesMessage::NewTable(table()), NLM_F_CREATE),
        Op::DeleteTable => (
            NfTablesMessage::DeleteTable(TableMessage {
                attributes: vec![TableAttribute::Name(table_name.into())],
            }),
            0,
        ),
        Op::AddChain { name, hook } => {
            let mut attributes = chain(name);
            if let Some(h) = hook {
                attributes.extend([
                    ChainAttribute::Hook(vec![
                        NlHook::Number(HookNumber::Inet(hook_number(h.point))),
                        // A signed priority, carried as its two's complement.
                        NlHook::Priority(h.priority as u32),
                    ]),
                    // NF_ACCEPT: what no rule decides passes.
                    ChainAttribute::Policy(1),
                    ChainAttribute::Type(if h.nat { "nat" } else { "filter" }.into()),
                ]);
            }
            (
                NfTablesMessage::NewChain(ChainMessage { attributes }),
                NLM_F_CREATE,
            )
        }
        Op::FlushChain(name) => (
            NfTablesMessage::DeleteRule(RuleMessage {
                attributes: vec![
                    RuleAttribute::Table(table_name.into()),
                    RuleAttribute::Chain(name.clone()),
                ],
            }),
            0,
        ),
        Op::DeleteChain(name) => (
            NfTablesMessage::DeleteChain(ChainMessage {
                attributes: chain(name),
            }),
            0,
        ),
        Op::AddRule { chain, exprs } => (
            NfTablesMessage::NewRule(RuleMessage {
                attributes: vec![
                    RuleAttribute::Table(table_name.into()),
                    RuleAttribute::Chain(chain.clone()),
                    RuleAttribute::Expressions(expressions(exprs)),
                ],
            }),
            NLM_F_CREATE | NLM_F_APPEND,
        ),
        Op::AddSet { name, kind } => (
            NfTablesMessage::NewSet(SetMessage {
                attributes: set_attributes(table_name, name, *kind, family, seq),
            }),
            NLM_F_CREATE,
        ),
        Op::DeleteSet(name) => (
            NfTablesMessage::DeleteSet(SetMessage {
                attributes: vec![
                    SetAttribute::Table(table_name.into()),
                    SetAttribute::Name(name.clone()),
                ],
            }),
            0,
        ),
        Op::AddElement { set, key, goto } => (
            NfTablesMessage::NewSetElement(element_list(table_name, set, key, goto.as_deref())),
            NLM_F_CREATE,
        ),
        Op::DeleteElement { set, key } => (
            NfTablesMessage::DeleteSetElement(element_list(table_name, set, key, None)),
            0,
        ),
    }
}

fn serialize(
    buf: &mut Vec<u8>,
    family: NetfilterProtoFamily,
    res_id: u16,
    inner: NetfilterMessageInner,
    flags: u16,
    seq: u32,
) {
    let mut msg = NetlinkMessage::new(
        NetlinkHeader::default(),
        NetlinkPayload::InnerMessage(NetfilterMessage::new(
            NetfilterHeader::new(family, 0, res_id),
            inner,
        )),
    );
    msg.header.flags = NLM_F_REQUEST | flags;
    msg.header.sequence_number = seq;
    msg.finalize();
    let at = buf.len();
    buf.resize(at + msg.buffer_len(), 0);
    msg.serialize(&mut buf[at..]);
}

/// A batch ready to send, and which op each sequence number carries.
#[derive(Debug)]
pub struct Batch {
    pub bytes: Vec<u8>,
    /// Sequence number of the `BATCH_BEGIN` message; op `i` of the batch is `first_seq + 1 + i`.
    pub first_seq: u32,
    pub ops: usize,
}

impl Batch {
    /// Index (into the concatenated ops of the transactions) of the op sent as `seq`, or `None`
    /// for the batch's own messages.
    pub fn op_at(&self, seq: u32) -> Option<usize> {
        let i = usize::try_from(seq.wrapping_sub(self.first_seq).checked_sub(1)?).ok()?;
        (i < self.ops).then_some(i)
    }
}

/// The transactions as one batch: the kernel applies all of it or none. Sequence numbers start
/// at `first_seq`. With `generation`, the kernel refuses the batch (`ERESTART`) if the ruleset
/// changed since that generation: a repair computed from a read-back applies only to what was
/// read.
pub fn batch(transactions: &[Transaction], first_seq: u32, generation: Option<u32>) -> Batch {
    let mut bytes = Vec::new();
    let control = |buf: &mut Vec<u8>, m: ControlMessage, seq: u32| {
        // The batch messages name the subsystem in `res_id`.
        serialize(
            buf,
            NetfilterProtoFamily::Unspec,
            u16::from(u8::from(NetfilterSubsystem::NfTables)),
            NetfilterMessageInner::None(m),
            0,
            seq,
        );
    };
    let begin = match generation {
        None => ControlMessage::BatchBegin,
        // NFNL_BATCH_GENID, on NFNL_MSG_BATCH_BEGIN.
        Some(g) => ControlMessage::Other {
            message_type: 0x10,
            attributes: vec![be32(1, g)],
        },
    };
    control(&mut bytes, begin, first_seq);
    let mut seq = first_seq;
    let mut ops = 0;
    for tx in transactions {
        let table = tx.table.to_string();
        for op in &tx.ops {
            seq = seq.wrapping_add(1);
            ops += 1;
            let (m, flags) = message(op, tx.family, &table, seq);
            serialize(
                &mut bytes,
                family_of(tx.family),
                0,
                NetfilterMessageInner::NfTables(m),
                flags,
                seq,
            );
        }
    }
    control(&mut bytes, ControlMessage::BatchEnd, seq.wrapping_add(1));
    Batch {
        bytes,
        first_seq,
        ops,
    }
}

/// One nf_tables message on its own (a request outside a batch).
pub(super) fn message_bytes(
    family: NetfilterProtoFamily,
    m: NfTablesMessage,
    flags: u16,
    seq: u32,
) -> Vec<u8> {
    let mut bytes = Vec::new();
    serialize(
        &mut bytes,
        family,
        0,
        NetfilterMessageInner::NfTables(m),
        flags,
        seq,
    );
    bytes
}

/// `NFT_MSG_GETGEN`: asks for the ruleset's generation. Sent after a batch, its answer comes
/// after every error of the batch.
pub fn get_generation(seq: u32) -> Vec<u8> {
    let mut bytes = Vec::new();
    serialize(
        &mut bytes,
        NetfilterProtoFamily::Unspec,
        0,
        NetfilterMessageInner::NfTables(NfTablesMessage::GetGen(GenMessage { attributes: vec![] })),
        0,
        seq,
    );
    bytes
}

/// `NFT_MSG_GETTABLE` for one of svcplane's tables of `family`: answered by the table or by
/// ENOENT.
pub fn get_table(family: IpFamily, table: TableId, seq: u32) -> Vec<u8> {
    let mut bytes = Vec::new();
    serialize(
        &mut bytes,
        family_of(family),
        0,
        NetfilterMessageInner::NfTables(NfTablesMessage::GetTable(TableMessage {
            attributes: vec![TableAttribute::Name(table.to_string())],
        })),
        NLM_F_ACK,
        seq,
    );
    bytes
}

/// One message from the kernel, as far as svcplane cares.
#[derive(Debug, PartialEq, Eq)]
pub enum Reply {
    /// A request failed (`errno` positive) or was acknowledged (`None`).
    Ack {
        seq: u32,
        errno: Option<i32>,
        /// The kernel's explanation (extended ACK), when it gave one.
        message: Option<String>,
    },
    Generation {
        seq: u32,
        id: u32,
    },
    Table {
        seq: u32,
    },
    /// Part of a dump's answer.
    Object {
        seq: u32,
        message: NfTablesMessage,
    },
    /// The end of a dump; `interrupted` when the ruleset changed during it.
    Done {
        seq: u32,
        interrupted: bool,
    },
    Other {
        seq: u32,
    },
}

/// On the end of a dump: the ruleset changed while it was read.
const NLM_F_DUMP_INTR: u16 = 0x10;
/// `NLM_F_CAPPED` and `NLM_F_ACK_TLVS`, on an error message.
const NLM_F_CAPPED: u16 = 0x100;
const NLM_F_ACK_TLVS: u16 = 0x200;

/// `NLMSGERR_ATTR_MSG`, the kernel's explanation after the echoed request of an error.
fn extended_ack_message(flags: u16, after_code: &[u8]) -> Option<String> {
    if flags & NLM_F_ACK_TLVS == 0 {
        return None;
    }
    // The echoed request: its header only when capped (NETLINK_CAP_ACK), else all of it.
    let echoed = if flags & NLM_F_CAPPED != 0 {
        16
    } else {
        usize::try_from(u32::from_ne_bytes(after_code.get(..4)?.try_into().ok()?)).ok()?
    };
    let tlvs = after_code.get(echoed.next_multiple_of(4)..)?;
    let mut at = 0;
    while at + 4 <= tlvs.len() {
        let len = usize::from(u16::from_ne_bytes([tlvs[at], tlvs[at + 1]]));
        let kind = u16::from_ne_bytes([tlvs[at + 2], tlvs[at + 3]]) & 0x3fff;
        if len < 4 || at + len > tlvs.len() {
            return None;
        }
        if kind == 1 {
            let s = &tlvs[at + 4..at + len];
            let s = s.split(|b| *b == 0).next().unwrap_or(s);
            return Some(String::from_utf8_lossy(s).into_owned());
        }
        at += len.next_multiple_of(4);
    }
    None
}

/// Splits what one `recv` returned into replies; a message that does not parse is an error
/// (the kernel speaks this protocol exactly, so that is a bug worth hearing about).
pub fn replies(buf: &[u8]) -> Result<Vec<Reply>, String> {
    let mut out = Vec::new();
    let mut at = 0;
    while at + 16 <= buf.len() {
        let len = usize::try_from(u32::from_ne_bytes([
            buf[at],
            buf[at + 1],
            buf[at + 2],
            buf[at + 3],
        ]))
        .map_err(|e| e.to_string())?;
        if len < 16 || at + len > buf.len() {
            return Err(format!(
                "netlink message of length {len} at offset {at} of {}",
                buf.len()
            ));
        }
        let raw = &buf[at..at + len];
        let msg = NetlinkMessage::<NetfilterMessage>::deserialize(raw).map_err(|e| e.to_string())?;
        let (seq, flags) = (msg.header.sequence_number, msg.header.flags);
        out.push(match msg.payload {
            NetlinkPayload::Error(e) => Reply::Ack {
                seq,
                errno: e.code.map(|c: NonZeroI32| -c.get()),
                message: raw.get(20..).and_then(|r| extended_ack_message(flags, r)),
            },
            NetlinkPayload::InnerMessage(m) => match m.inner {
                NetfilterMessageInner::NfTables(NfTablesMessage::NewGen(g)) => Reply::Generation {
                    seq,
                    id: g
                        .attributes
                        .iter()
                        .find_map(|a| match a {
                            GenAttribute::Id(id) => Some(*id),
                            _ => None,
                        })
                        .unwrap_or(0),
                },
                NetfilterMessageInner::NfTables(NfTablesMessage::NewTable(_)) => Reply::Table { seq },
                NetfilterMessageInner::NfTables(message) => Reply::Object { seq, message },
                _ => Reply::Other { seq },
            },
            NetlinkPayload::Done(_) => Reply::Done {
                seq,
                interrupted: flags & NLM_F_DUMP_INTR != 0,
            },
            _ => Reply::Other { seq },
        });
        at += len.next_multiple_of(4);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use svcplane_core::Protocol;

    fn u16_at(b: &[u8], at: usize) -> u16 {
        u16::from_ne_bytes([b[at], b[at + 1]])
    }

    fn u32_at(b: &[u8], at: usize) -> u32 {
        u32::from_ne_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
    }

    /// (type, flags, seq, nfgenmsg) of each message in `bytes`.
    fn headers(bytes: &[u8]) -> Vec<(u16, u16, u32, [u8; 4])> {
        let mut out = Vec::new();
        let mut at = 0;
        while at < bytes.len() {
            let len = u32_at(bytes, at) as usize;
            out.push((
                u16_at(bytes, at + 4),
                u16_at(bytes, at + 6),
                u32_at(bytes, at + 8),
                bytes[at + 16..at + 20].try_into().unwrap(),
            ));
            at += len.next_multiple_of(4);
        }
        out
    }

    #[test]
    fn a_batch_is_framed_as_the_kernel_expects_and_maps_sequence_numbers_to_ops() {
        let mut v4 = Transaction::new(IpFamily::IPv4);
        v4.push(Op::AddTable);
        v4.push(Op::FlushChain("svc-x".into()));
        let mut v6 = Transaction::new(IpFamily::IPv6);
        v6.push(Op::DeleteTable);
        let b = batch(&[v4, v6], 100, None);
        let h = headers(&b.bytes);
        // BATCH_BEGIN/END: family AF_UNSPEC, res_id NFNL_SUBSYS_NFTABLES big-endian.
        assert_eq!(h[0], (0x10, 0x1, 100, [0, 0, 0, 10]));
        assert_eq!(h[4], (0x11, 0x1, 104, [0, 0, 0, 10]));
        // NEWTABLE with NLM_F_CREATE, DELRULE (flush), DELTABLE in the ip6 family.
        assert_eq!(h[1], (0x0a00, 0x401, 101, [2, 0, 0, 0]));
        assert_eq!(h[2], (0x0a08, 0x1, 102, [2, 0, 0, 0]));
        assert_eq!(h[3], (0x0a02, 0x1, 103, [10, 0, 0, 0]));
        assert_eq!(
            [100, 101, 103, 104].map(|s| b.op_at(s)),
            [None, Some(0), Some(2), None]
        );
    }

    #[test]
    fn a_verdict_map_element_carries_its_padded_key_and_a_goto() {
        let mut tx = Transaction::new(IpFamily::IPv4);
        tx.push(Op::AddElement {
            set: "service-ips".into(),
            key: Key::Service("10.96.0.1".parse().unwrap(), Protocol::Tcp, 443),
            goto: Some("svc-a".into()),
        });
        let b = batch(&[tx], 0, None);
        let find = |needle: &[u8]| b.bytes.windows(needle.len()).any(|w| w == needle);
        // NFTA_DATA_VALUE (len 16, type 1) with the 12-byte key, as nft sends it.
        assert!(find(&[16, 0, 1, 0, 10, 96, 0, 1, 6, 0, 0, 0, 1, 0xbb, 0, 0]));
        // NFTA_VERDICT_CODE (len 8, type 1): NFT_GOTO (-4) big-endian; then the chain.
        assert!(find(&[8, 0, 1, 0, 0xff, 0xff, 0xff, 0xfc]));
        assert!(find(b"svc-a\0"));
    }

    /// An NLMSG_ERROR for `seq` as the kernel sends it with CAP_ACK and EXT_ACK.
    fn error_reply(seq: u32, errno: i32, msg: Option<&str>) -> Vec<u8> {
        let mut tlvs = Vec::new();
        if let Some(m) = msg {
            let len = 4 + m.len() + 1;
            tlvs.extend_from_slice(&u16::try_from(len).unwrap().to_ne_bytes());
            tlvs.extend_from_slice(&1u16.to_ne_bytes());
            tlvs.extend_from_slice(m.as_bytes());
            tlvs.push(0);
            tlvs.resize(tlvs.len().next_multiple_of(4), 0);
        }
        let len = 16 + 4 + 16 + tlvs.len();
        let flags: u16 = 0x100 | if msg.is_some() { 0x200 } else { 0 };
        let mut out = Vec::new();
        out.extend_from_slice(&u32::try_from(len).unwrap().to_ne_bytes());
        out.extend_from_slice(&2u16.to_ne_bytes()); // NLMSG_ERROR
        out.extend_from_slice(&flags.to_ne_bytes());
        out.extend_from_slice(&seq.to_ne_bytes());
        out.extend_from_slice(&0u32.to_ne_bytes());
        out.extend_from_slice(&(-errno).to_ne_bytes());
        // The echoed request's header: a NEWSETELEM 300 bytes long (capped to its header).
        out.extend_from_slice(&300u32.to_ne_bytes());
        out.extend_from_slice(&0x0a0cu16.to_ne_bytes());
        out.extend_from_slice(&0x401u16.to_ne_bytes());
        out.extend_from_slice(&seq.to_ne_bytes());
        out.extend_from_slice(&0u32.to_ne_bytes());
        out.extend_from_slice(&tlvs);
        out
    }

    #[test]
    fn errors_are_read_with_their_sequence_number_and_the_kernels_explanation() {
        let mut buf = error_reply(7, 2, Some("Could not process rule"));
        buf.extend(error_reply(9, 16, None));
        assert_eq!(
            replies(&buf).unwrap(),
            [
                Reply::Ack {
                    seq: 7,
                    errno: Some(2),
                    message: Some("Could not process rule".into())
                },
                Reply::Ack {
                    seq: 9,
                    errno: Some(16),
                    message: None
                },
            ]
        );
    }

    #[test]
    fn garbage_from_the_socket_is_an_error_not_a_panic() {
        let good = error_reply(7, 2, Some("x"));
        for cut in 0..good.len() {
            let _ = replies(&good[..cut]);
        }
        let mut bad = good.clone();
        bad[0] = 0xff; // a length beyond the buffer
        assert!(replies(&bad).is_err());
        let mut tiny = good;
        tiny[..4].copy_from_slice(&3u32.to_ne_bytes());
        assert!(replies(&tiny).is_err());
        // Random bytes: any outcome but a panic.
        let mut x = 0x2545_f491_u32;
        for _ in 0..2000 {
            let mut b = vec![0u8; 64];
            for v in &mut b {
                x ^= x << 13;
                x ^= x >> 17;
                x ^= x << 5;
                *v = x as u8;
            }
            b[..4].copy_from_slice(&48u32.to_ne_bytes());
            let _ = replies(&b);
        }
    }
}
