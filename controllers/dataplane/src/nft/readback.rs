//! Reading a table back: the dump requests for svcplane's table and the decoding of their
//! answers into a [`Table`], in the same vocabulary svcplane writes ([`Expr`], [`SetKind`],
//! [`Key`]). What svcplane never writes decodes to "unreadable" (a rule `None`, a set kind
//! `None`), which differs from any expected table and so is repaired. No I/O.

use netlink_packet_core::{DefaultNla, NLM_F_DUMP, Nla};
use netlink_packet_netfilter::{
    NetfilterMessageInner,
    nftables::{
        Bitwise, ChainAttribute, ChainMessage, Cmp, DataAttribute, ExpressionAttribute, Expressions,
        Hook as NlHook, HookNumber, Immediate, InetHookNumber, ListAttribute, Lookup, Meta,
        MetaKey as NlMetaKey, NfTablesMessage, Operator, Payload, Register, RuleAttribute, RuleMessage,
        SetAttribute, SetDescription, SetElementAttribute, SetElementList, SetElementMessage, SetFlags,
        SetMessage, Verdict as NlVerdict, VerdictAttribute,
    },
};
use svcplane_core::{IpFamily, Protocol};

use super::{
    expr::{Base, Expr, MetaKey, Verdict},
    layout::TableId,
    op::{Hook, HookPoint, Key, SetKind},
    table::{Table, element_target},
    wire::{self, family_of},
};

/// A dump request for one of svcplane's tables of `family`: its chains, rules or sets.
pub fn dump(family: IpFamily, table: TableId, what: Dump, seq: u32) -> Vec<u8> {
    let name = table.to_string();
    let m = match what {
        Dump::Chains => NfTablesMessage::GetChain(ChainMessage {
            attributes: vec![ChainAttribute::Table(name)],
        }),
        Dump::Rules => NfTablesMessage::GetRule(RuleMessage {
            attributes: vec![RuleAttribute::Table(name)],
        }),
        Dump::Sets => NfTablesMessage::GetSet(SetMessage {
            attributes: vec![SetAttribute::Table(name)],
        }),
    };
    wire::message_bytes(family_of(family), m, NLM_F_DUMP, seq)
}

/// The elements of one set of one of svcplane's tables.
pub fn dump_elements(family: IpFamily, table: TableId, set: &str, seq: u32) -> Vec<u8> {
    wire::message_bytes(
        family_of(family),
        NfTablesMessage::GetSetElement(SetElementMessage {
            attributes: vec![
                SetElementList::Table(table.to_string()),
                SetElementList::Set(set.into()),
            ],
        }),
        NLM_F_DUMP,
        seq,
    )
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dump {
    Chains,
    Rules,
    Sets,
}

/// Fills `table` from one dumped message of svcplane's table `id` of `family`. Dumps are
/// filtered by table on the kernel's side for rules, sets and elements; chains are filtered
/// here.
pub fn absorb(table: &mut Table, family: IpFamily, id: TableId, m: NfTablesMessage) {
    let table_name = id.to_string();
    match m {
        NfTablesMessage::NewChain(c) => {
            let mut name = None;
            let mut in_table = false;
            let mut hook = None;
            let (mut kind, mut number, mut priority) = (None, None, None);
            for a in c.attributes {
                match a {
                    ChainAttribute::Table(t) => in_table = t == table_name,
                    ChainAttribute::Name(n) => name = Some(n),
                    ChainAttribute::Type(t) => kind = Some(t),
                    ChainAttribute::Hook(h) => {
                        for part in h {
                            match part {
                                NlHook::Number(HookNumber::Inet(n)) => number = hook_point(n),
                                NlHook::Priority(p) => priority = Some(p as i32),
                                _ => {}
                            }
                        }
                        hook = Some(());
                    }
                    _ => {}
                }
            }
            if let (true, Some(name)) = (in_table, name) {
                let hook = hook.and_then(|()| {
                    Some(Hook {
                        point: number?,
                        priority: priority?,
                        nat: kind.as_deref() == Some("nat"),
                    })
                });
                table.chains.entry(name).or_default().hook = hook;
            }
        }
        NfTablesMessage::NewRule(r) => {
            let mut chain = None;
            let mut exprs = Some(Vec::new());
            for a in r.attributes {
                match a {
                    RuleAttribute::Chain(c) => chain = Some(c),
                    RuleAttribute::Expressions(list) => {
                        exprs = list.into_iter().map(expression).collect::<Option<Vec<_>>>();
                    }
                    _ => {}
                }
            }
            if let Some(chain) = chain {
                table.chains.entry(chain).or_default().rules.push(exprs);
            }
        }
        NfTablesMessage::NewSet(s) => {
            let mut name = None;
            let (mut flags, mut key_len, mut data_type, mut timeout, mut size) =
                (None, None, None, None, None);
            for a in s.attributes {
                match a {
                    SetAttribute::Name(n) => name = Some(n),
                    SetAttribute::Flags(f) => flags = Some(f),
                    SetAttribute::KeyLen(l) => key_len = Some(l),
                    SetAttribute::DataType(t) => data_type = Some(t),
                    SetAttribute::Timeout(t) => timeout = Some(t),
                    SetAttribute::Description(d) => {
                        for part in d {
                            if let SetDescription::Size(n) = part {
                                size = Some(n);
                            }
                        }
                    }
                    _ => {}
                }
            }
            if let Some(name) = name {
                let addr = if family == IpFamily::IPv6 { 16 } else { 4 };
                let kind = set_kind(flags, key_len, data_type, timeout, size, addr);
                table.sets.insert(name, kind);
            }
        }
        NfTablesMessage::NewSetElement(e) => {
            let mut set = None;
            let mut elements = Vec::new();
            for a in e.attributes {
                match a {
                    SetElementList::Set(s) => set = Some(s),
                    SetElementList::Elements(list) => elements = list,
                    _ => {}
                }
            }
            let Some(set) = set else { return };
            let entry = table.elements.entry(set).or_default();
            for element in elements {
                let ListAttribute::Element(attrs) = element else {
                    continue;
                };
                let (mut key, mut verdict) = (None, None);
                for a in attrs {
                    match a {
                        SetElementAttribute::Key(DataAttribute::Value(v)) => key = decode_key(&v, family),
                        SetElementAttribute::Data(DataAttribute::Verdict(v)) => {
                            verdict = Some(verdict_of(&v))
                        }
                        _ => {}
                    }
                }
                // A key svcplane cannot read is no key it wrote; it stays, harmless to it.
                if let Some(key) = key {
                    entry.insert(key, element_target(verdict.as_ref()));
                }
            }
        }
        _ => {}
    }
}

/// Whether a message of a dump belongs to svcplane's table (dumps of chains are per family).
pub fn nftables(inner: NetfilterMessageInner) -> Option<NfTablesMessage> {
    match inner {
        NetfilterMessageInner::NfTables(m) => Some(m),
        _ => None,
    }
}

fn hook_point(n: InetHookNumber) -> Option<HookPoint> {
    Some(match n {
        InetHookNumber::PreRouting => HookPoint::Prerouting,
        InetHookNumber::LocalIn => HookPoint::Input,
        InetHookNumber::Forward => HookPoint::Forward,
        InetHookNumber::LocalOut => HookPoint::Output,
        InetHookNumber::PostRouting => HookPoint::Postrouting,
        _ => return None,
    })
}

fn set_kind(
    flags: Option<SetFlags>,
    key_len: Option<u32>,
    data_type: Option<u32>,
    timeout_ms: Option<u64>,
    size: Option<u32>,
    addr_len: u32,
) -> Option<SetKind> {
    let flags = flags.unwrap_or_else(SetFlags::empty);
    let map = data_type == Some(wire::DATA_VERDICT);
    Some(match (flags.bits(), key_len?, map) {
        (f, len, true) if f == SetFlags::Map.bits() && len == addr_len + 8 => SetKind::ServiceMap,
        (f, 8, true) if f == SetFlags::Map.bits() => SetKind::PortMap,
        (0, len, false) if len == addr_len + 8 => SetKind::ServiceSet,
        (0, 8, false) => SetKind::PortSet,
        (f, len, false)
            if f == (SetFlags::Timeout | SetFlags::Eval).bits()
                && len == addr_len
                && size == Some(wire::AFFINITY_SET_SIZE) =>
        {
            SetKind::Affinity {
                timeout_secs: u32::try_from(timeout_ms? / 1000).ok()?,
            }
        }
        _ => return None,
    })
}

fn decode_key(v: &[u8], family: IpFamily) -> Option<Key> {
    let protocol = |n: u8| match n {
        6 => Some(Protocol::Tcp),
        17 => Some(Protocol::Udp),
        132 => Some(Protocol::Sctp),
        _ => None,
    };
    let port = |b: &[u8]| Some(u16::from_be_bytes([*b.first()?, *b.get(1)?]));
    let addr_len = if family == IpFamily::IPv6 { 16 } else { 4 };
    match v.len() {
        8 => Some(Key::Port(protocol(v[0])?, port(&v[4..])?)),
        n if n == addr_len + 8 => {
            let ip = if addr_len == 16 {
                std::net::IpAddr::from(<[u8; 16]>::try_from(&v[..16]).ok()?)
            } else {
                std::net::IpAddr::from(<[u8; 4]>::try_from(&v[..4]).ok()?)
            };
            Some(Key::Service(
                ip,
                protocol(v[addr_len])?,
                port(&v[addr_len + 4..])?,
            ))
        }
        _ => None,
    }
}

fn verdict_of(attrs: &[VerdictAttribute]) -> Verdict {
    let mut code = None;
    let mut chain = None;
    for a in attrs {
        match a {
            VerdictAttribute::Code(c) => code = Some(*c),
            VerdictAttribute::Chain(c) => chain = Some(c.clone()),
            _ => {}
        }
    }
    match (code, chain) {
        (Some(NlVerdict::Goto), Some(c)) => Verdict::Goto(c),
        (Some(NlVerdict::Jump), Some(c)) => Verdict::Jump(c),
        (Some(NlVerdict::Other(1)), _) => Verdict::Accept,
        // Drop, and whatever else: svcplane compares, it does not need to tell them apart.
        _ => Verdict::Drop,
    }
}

fn reg(r: Register) -> u32 {
    u32::from(r)
}

fn value(d: &DataAttribute) -> Option<Vec<u8>> {
    match d {
        DataAttribute::Value(v) => Some(v.clone()),
        _ => None,
    }
}

fn meta_key(k: &NlMetaKey) -> Option<MetaKey> {
    match k {
        NlMetaKey::Mark => Some(MetaKey::Mark),
        NlMetaKey::L4Proto => Some(MetaKey::L4Proto),
        _ => None,
    }
}

/// An attribute of an expression the crate does not model, by number.
struct Raw(Vec<DefaultNla>);

impl Raw {
    fn get(&self, kind: u16) -> Option<Vec<u8>> {
        self.0.iter().find(|a| a.kind() == kind).map(|a| {
            let mut v = vec![0; a.value_len()];
            a.emit_value(&mut v);
            v
        })
    }

    fn be32(&self, kind: u16) -> Option<u32> {
        let v = self.get(kind)?;
        Some(u32::from_be_bytes(v.get(..4)?.try_into().ok()?))
    }

    fn be64(&self, kind: u16) -> Option<u64> {
        let v = self.get(kind)?;
        Some(u64::from_be_bytes(v.get(..8)?.try_into().ok()?))
    }

    fn string(&self, kind: u16) -> Option<String> {
        let v = self.get(kind)?;
        let s = v.split(|b| *b == 0).next()?;
        String::from_utf8(s.to_vec()).ok()
    }

    fn kinds(&self) -> Vec<u16> {
        let mut k: Vec<u16> = self.0.iter().map(Nla::kind).collect();
        k.sort_unstable();
        k
    }
}

/// One dumped expression in svcplane's vocabulary; `None` for anything it does not write.
fn expression(e: ListAttribute<ExpressionAttribute>) -> Option<Expr> {
    let ListAttribute::Element(attrs) = e else {
        return None;
    };
    let data = attrs.into_iter().find_map(|a| match a {
        ExpressionAttribute::Data(d) => Some(d),
        _ => None,
    })?;
    match data {
        Expressions::Payload(attrs) => {
            let (mut dreg, mut base, mut offset, mut len) = (None, None, None, None);
            for a in attrs {
                match a {
                    Payload::DestinationRegister(r) => dreg = Some(reg(r)),
                    Payload::Base(1) => base = Some(Base::Network),
                    Payload::Base(2) => base = Some(Base::Transport),
                    Payload::Offset(o) => offset = Some(o),
                    Payload::Len(l) => len = Some(l),
                    _ => return None,
                }
            }
            Some(Expr::Payload {
                dreg: dreg?,
                base: base?,
                offset: offset?,
                len: len?,
            })
        }
        Expressions::Meta(attrs) => {
            let (mut key, mut dreg, mut sreg) = (None, None, None);
            for a in attrs {
                match a {
                    Meta::Key(k) => key = meta_key(&k),
                    Meta::DestinationRegister(r) => dreg = Some(reg(r)),
                    Meta::SourceRegister(r) => sreg = Some(reg(r)),
                    _ => return None,
                }
            }
            match (dreg, sreg) {
                (Some(dreg), None) => Some(Expr::Meta { dreg, key: key? }),
                (None, Some(sreg)) => Some(Expr::MetaSet { sreg, key: key? }),
                _ => None,
            }
        }
        Expressions::Cmp(attrs) => {
            let (mut sreg, mut eq, mut data) = (None, None, None);
            for a in attrs {
                match a {
                    Cmp::SourceRegister(r) => sreg = Some(reg(r)),
                    Cmp::Op(Operator::Equal) => eq = Some(true),
                    Cmp::Op(Operator::NotEqual) => eq = Some(false),
                    Cmp::Data(d) => data = value(&d),
                    _ => return None,
                }
            }
            Some(Expr::Cmp {
                sreg: sreg?,
                eq: eq?,
                data: data?,
            })
        }
        Expressions::Bitwise(attrs) => {
            let (mut sreg, mut dreg, mut mask, mut xor) = (None, None, None, None);
            for a in attrs {
                match a {
                    Bitwise::SourceRegister(r) => sreg = Some(reg(r)),
                    Bitwise::DestinationRegister(r) => dreg = Some(reg(r)),
                    Bitwise::Mask(d) => mask = value(&d),
                    Bitwise::Xor(d) => xor = value(&d),
                    // Implied by the mask's length; a boolean operation.
                    Bitwise::Length(_) | Bitwise::Op(0) => {}
                    _ => return None,
                }
            }
            Some(Expr::Bitwise {
                sreg: sreg?,
                dreg: dreg?,
                mask: mask?,
                xor: xor?,
            })
        }
        Expressions::Lookup(attrs) => {
            let (mut set, mut sreg, mut verdict_map) = (None, None, false);
            for a in attrs {
                match a {
                    Lookup::Set(s) => set = Some(s),
                    Lookup::SourceRegister(r) => sreg = Some(reg(r)),
                    Lookup::DestinationRegister(Register::Verdict) => verdict_map = true,
                    Lookup::Flags(0) | Lookup::SetId(_) => {}
                    _ => return None,
                }
            }
            Some(Expr::Lookup {
                set: set?,
                sreg: sreg?,
                verdict_map,
            })
        }
        Expressions::Immediate(attrs) => {
            let (mut dreg, mut data) = (None, None);
            for a in attrs {
                match a {
                    Immediate::DestinationRegister(r) => dreg = Some(reg(r)),
                    Immediate::Data(d) => data = Some(d),
                    _ => return None,
                }
            }
            match (dreg?, data?) {
                (0, DataAttribute::Verdict(v)) => Some(Expr::Verdict(verdict_of(&v))),
                (dreg, DataAttribute::Value(data)) if dreg != 0 => Some(Expr::Immediate { dreg, data }),
                _ => None,
            }
        }
        Expressions::Other {
            expression_type,
            attributes,
        } => other(&expression_type, &Raw(attributes)),
        _ => None,
    }
}

/// The expressions svcplane encodes itself, read back with the attributes the kernel adds
/// when dumping (registers it fills in, flags at their defaults) checked and dropped.
fn other(name: &str, a: &Raw) -> Option<Expr> {
    match name {
        "numgen" => (a.be32(3)? == 1 && a.be32(4).unwrap_or(0) == 0).then_some(Expr::Numgen {
            dreg: a.be32(1)?,
            modulus: a.be32(2)?,
        }),
        "nat" => {
            let (addr, port) = (a.be32(3)?, a.be32(5)?);
            let consistent = a.be32(1)? == 1
                && a.be32(4).unwrap_or(addr) == addr
                && a.be32(6).unwrap_or(port) == port
                && a.be32(7)? == 0x3;
            consistent.then_some(Expr::Dnat {
                family: a.be32(2)?,
                addr,
                port,
            })
        }
        "masq" => a.be32(1).unwrap_or(0).eq(&0).then_some(Expr::Masquerade),
        "dynset" => {
            // The kernel reports a timeout (0: the set's own) and flags (0) it was not given.
            let defaults = a.be64(6).unwrap_or(0) == 0 && a.be32(9).unwrap_or(0) == 0;
            let only = a.kinds().iter().all(|k| [1, 2, 3, 4, 6, 9].contains(k));
            (defaults && only && a.be32(3)? == 1).then_some(Expr::DynsetUpdate {
                set: a.string(1)?,
                sreg: a.be32(4)?,
            })
        }
        "fib" => (a.be32(2)? == 3 && a.be32(3)? == 2).then_some(Expr::FibDaddrType { dreg: a.be32(1)? }),
        // A direction (NFTA_CT_DIRECTION) would make it another expression.
        "ct" => (a.be32(2)? == 0 && a.get(3).is_none()).then_some(Expr::CtState { dreg: a.be32(1)? }),
        "reject" => {
            let code = a.get(2)?;
            (a.be32(1)? == 0 && code.len() == 1).then_some(Expr::Reject { icmp_code: code[0] })
        }
        _ => None,
    }
}
