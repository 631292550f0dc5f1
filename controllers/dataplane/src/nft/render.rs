//! Tables as nftables JSON (the schema of the `nftables` crate): the commands that create chains,
//! sets, maps and rules, and the batch that carries them.

use std::{borrow::Cow, net::IpAddr};

use nftables::{
    batch::Batch,
    expr::{
        BinaryOperation, Expression, Fib, FibFlag, FibResult, Meta, MetaKey, NamedExpression, NgMode, Numgen,
        Payload, PayloadField, Verdict,
    },
    schema::{
        Chain, Element, Map, NfListObject, Nftables, Rule as NfRule, Set, SetFlag, SetType, SetTypeValue,
        Table,
    },
    stmt::{JumpTarget, Mangle, Match, NAT, Operator, SetOp, Statement, VerdictMap},
    types::{NfChainPolicy, NfChainType, NfFamily, NfHook},
};

use svcplane_core::{IpFamily, Protocol};

use super::model::Rule;
use super::{
    MASQUERADE_MARK, NO_ENDPOINT_IPS, NO_ENDPOINT_NODEPORTS, NO_ENDPOINTS, SERVICE_IPS, SERVICE_NODEPORTS,
    SERVICES, TABLE,
};

/// Builds nft JSON for one family's table.
pub(super) struct Writer {
    pub(super) family: NfFamily,
    /// `ip` or `ip6`, for address payloads.
    pub(super) l3: &'static str,
    pub(super) addr_type: SetType,
    pub(super) batch: Batch<'static>,
}

pub(super) fn s(v: impl Into<String>) -> Cow<'static, str> {
    Cow::Owned(v.into())
}

pub(super) fn payload(protocol: &'static str, field: &'static str) -> Expression<'static> {
    Expression::Named(NamedExpression::Payload(Payload::PayloadField(PayloadField {
        protocol: Cow::Borrowed(protocol),
        field: Cow::Borrowed(field),
    })))
}

pub(super) fn meta(key: MetaKey) -> Expression<'static> {
    Expression::Named(NamedExpression::Meta(Meta { key }))
}

pub(super) fn eq(left: Expression<'static>, right: Expression<'static>) -> Statement<'static> {
    Statement::Match(Match {
        left,
        right,
        op: Operator::EQ,
    })
}

pub(super) fn goto(chain: &str) -> Verdict<'static> {
    Verdict::Goto(JumpTarget { target: s(chain) })
}

/// `meta mark set meta mark | MASQUERADE_MARK`
pub(super) fn mark_for_masquerade() -> Statement<'static> {
    Statement::Mangle(Mangle {
        key: meta(MetaKey::Mark),
        value: Expression::BinaryOperation(Box::new(BinaryOperation::OR(vec![
            meta(MetaKey::Mark),
            Expression::Number(MASQUERADE_MARK),
        ]))),
    })
}

/// `meta mark & MASQUERADE_MARK != 0 masquerade`
pub(super) fn masquerade_marked() -> Vec<Statement<'static>> {
    vec![
        Statement::Match(Match {
            left: Expression::BinaryOperation(Box::new(BinaryOperation::AND(
                meta(MetaKey::Mark),
                Expression::Number(MASQUERADE_MARK),
            ))),
            right: Expression::Number(0),
            op: Operator::NEQ,
        }),
        Statement::Masquerade(None),
    ]
}

/// `fib daddr type local`: addressed to this node.
pub(super) fn daddr_is_local() -> Statement<'static> {
    eq(
        Expression::Named(NamedExpression::Fib(Fib {
            result: FibResult::Type,
            flags: [FibFlag::Daddr].into_iter().collect(),
        })),
        Expression::String(Cow::Borrowed("local")),
    )
}

pub(super) fn number(n: u16) -> Expression<'static> {
    Expression::Number(u32::from(n))
}

pub(super) fn proto(p: Protocol) -> Expression<'static> {
    Expression::String(Cow::Borrowed(p.as_str()))
}

impl Writer {
    pub(super) fn new(family: IpFamily) -> Self {
        let (family, l3, addr_type) = match family {
            IpFamily::IPv4 => (NfFamily::IP, "ip", SetType::Ipv4Addr),
            IpFamily::IPv6 => (NfFamily::IP6, "ip6", SetType::Ipv6Addr),
        };
        Self {
            family,
            l3,
            addr_type,
            batch: Batch::new(),
        }
    }

    pub(super) fn table(&self) -> Table<'static> {
        Table {
            family: self.family,
            name: Cow::Borrowed(TABLE),
            handle: None,
        }
    }

    pub(super) fn chain(&self, name: &str) -> Chain<'static> {
        Chain {
            family: self.family,
            table: Cow::Borrowed(TABLE),
            name: s(name),
            ..Chain::default()
        }
    }

    pub(super) fn base_chain(
        &self,
        name: &str,
        kind: NfChainType,
        hook: NfHook,
        prio: i32,
    ) -> Chain<'static> {
        Chain {
            _type: Some(kind),
            hook: Some(hook),
            prio: Some(prio),
            policy: Some(NfChainPolicy::Accept),
            ..self.chain(name)
        }
    }

    pub(super) fn map(&self, name: &str, key: Vec<SetType>) -> Map<'static> {
        let set_type = if key.len() == 1 {
            SetTypeValue::Single(key[0])
        } else {
            SetTypeValue::Concatenated(Cow::Owned(key))
        };
        Map {
            family: self.family,
            table: Cow::Borrowed(TABLE),
            name: s(name),
            set_type,
            // Placeholder: nftables 0.6.3 has no "verdict" map type; `to_json` swaps it in.
            map: SetTypeValue::Single(SetType::Mark),
            ..Map::default()
        }
    }

    pub(super) fn affinity_set(&self, name: &str, timeout: u32) -> Set<'static> {
        Set {
            family: self.family,
            table: Cow::Borrowed(TABLE),
            name: s(name),
            set_type: SetTypeValue::Single(self.addr_type),
            // nft adds `dynamic` itself for sets updated from the packet path (1.0.6's JSON parser
            // does not know the flag).
            flags: Some([SetFlag::Timeout].into_iter().collect()),
            timeout: Some(timeout),
            ..Set::default()
        }
    }

    pub(super) fn add_rule(&mut self, chain: &str, expr: Vec<Statement<'static>>) {
        self.batch.add(NfListObject::Rule(NfRule {
            family: self.family,
            table: Cow::Borrowed(TABLE),
            chain: s(chain),
            expr: Cow::Owned(expr),
            handle: None,
            index: None,
            comment: None,
        }));
    }

    pub(super) fn statements(&self, rule: &Rule) -> Vec<Statement<'static>> {
        let l3 = self.l3;
        match rule {
            Rule::DispatchServices | Rule::DispatchNoEndpoints => {
                // Two lookups in one rule are not possible; the node-port one is the second rule
                // (added by `write_chain`).
                let map = if *rule == Rule::DispatchServices {
                    SERVICE_IPS
                } else {
                    NO_ENDPOINT_IPS
                };
                vec![Statement::VerdictMap(VerdictMap {
                    key: self.service_tuple(),
                    data: Expression::String(s(format!("@{map}"))),
                })]
            }
            Rule::Reject => vec![Statement::Reject(None)],
            Rule::Drop => vec![Statement::Drop(None)],
            Rule::MarkMasquerade => vec![mark_for_masquerade()],
            Rule::Affinity { set, chain } => vec![
                eq(payload(l3, "saddr"), Expression::String(s(format!("@{set}")))),
                Statement::Goto(JumpTarget { target: s(chain) }),
            ],
            Rule::Pick { chain, one_in: 1 } => vec![Statement::Goto(JumpTarget { target: s(chain) })],
            Rule::Pick { chain, one_in } => vec![
                eq(
                    Expression::Named(NamedExpression::Numgen(Numgen {
                        mode: NgMode::Random,
                        ng_mod: *one_in,
                        offset: None,
                    })),
                    Expression::Number(0),
                ),
                Statement::Goto(JumpTarget { target: s(chain) }),
            ],
            Rule::Hairpin(ip) => vec![
                eq(payload(l3, "saddr"), Expression::String(s(ip.to_string()))),
                mark_for_masquerade(),
            ],
            Rule::RefreshAffinity(set) => vec![Statement::Set(nftables::stmt::Set {
                op: SetOp::Update,
                elem: payload(l3, "saddr"),
                set: s(format!("@{set}")),
            })],
            Rule::Dnat(addr, p) => vec![
                eq(meta(MetaKey::L4proto), proto(*p)),
                Statement::DNAT(Some(NAT {
                    addr: Some(Expression::String(s(addr.ip().to_string()))),
                    family: None,
                    port: Some(number(addr.port())),
                    flags: None,
                })),
            ],
        }
    }

    pub(super) fn write_chain(&mut self, name: &str, rules: &[Rule]) {
        for rule in rules {
            let stmts = self.statements(rule);
            self.add_rule(name, stmts);
            let node_port_map = match rule {
                Rule::DispatchServices => Some(SERVICE_NODEPORTS),
                Rule::DispatchNoEndpoints => Some(NO_ENDPOINT_NODEPORTS),
                _ => None,
            };
            if let Some(map) = node_port_map {
                // Node ports answer on every local address.
                let stmts = vec![
                    daddr_is_local(),
                    Statement::VerdictMap(VerdictMap {
                        key: Expression::Named(NamedExpression::Concat(vec![
                            meta(MetaKey::L4proto),
                            payload("th", "dport"),
                        ])),
                        data: Expression::String(s(format!("@{map}"))),
                    }),
                ];
                self.add_rule(name, stmts);
            }
        }
    }

    pub(super) fn element(&self, map: &str, key: Expression<'static>, chain: &str) -> NfListObject<'static> {
        NfListObject::Element(Element {
            family: self.family,
            table: Cow::Borrowed(TABLE),
            name: s(map),
            elem: Cow::Owned(vec![Expression::List(vec![
                key,
                Expression::Verdict(goto(chain)),
            ])]),
        })
    }

    pub(super) fn ip_key(&self, (ip, p, port): &(IpAddr, Protocol, u16)) -> Expression<'static> {
        Expression::Named(NamedExpression::Concat(vec![
            Expression::String(s(ip.to_string())),
            proto(*p),
            number(*port),
        ]))
    }

    pub(super) fn port_key((p, port): &(Protocol, u16)) -> Expression<'static> {
        Expression::Named(NamedExpression::Concat(vec![proto(*p), number(*port)]))
    }

    /// The fixed skeleton: table, maps, base chains hooking into netfilter.
    pub(super) fn skeleton(&mut self) {
        self.batch.add(NfListObject::Table(self.table()));
        let ip_key = vec![self.addr_type, SetType::InetProto, SetType::InetService];
        let port_key = vec![SetType::InetProto, SetType::InetService];
        for (name, key) in [
            (SERVICE_IPS, ip_key.clone()),
            (NO_ENDPOINT_IPS, ip_key),
            (SERVICE_NODEPORTS, port_key.clone()),
            (NO_ENDPOINT_NODEPORTS, port_key),
        ] {
            self.batch.add(NfListObject::Map(Box::new(self.map(name, key))));
        }
        for (name, kind, hook, prio, jump) in [
            (
                "nat-prerouting",
                NfChainType::NAT,
                NfHook::Prerouting,
                -100,
                SERVICES,
            ),
            ("nat-output", NfChainType::NAT, NfHook::Output, -100, SERVICES),
            (
                "filter-input",
                NfChainType::Filter,
                NfHook::Input,
                -1,
                NO_ENDPOINTS,
            ),
            (
                "filter-forward",
                NfChainType::Filter,
                NfHook::Forward,
                -1,
                NO_ENDPOINTS,
            ),
            (
                "filter-output",
                NfChainType::Filter,
                NfHook::Output,
                -1,
                NO_ENDPOINTS,
            ),
        ] {
            self.batch
                .add(NfListObject::Chain(self.base_chain(name, kind, hook, prio)));
            self.batch.add(NfListObject::Chain(self.chain(jump)));
            self.add_rule(name, vec![Statement::Jump(JumpTarget { target: s(jump) })]);
        }
        self.masquerade_chain();
    }

    /// `<daddr> . l4proto . th dport`: how a packet names a Service address and port.
    pub(super) fn service_tuple(&self) -> Expression<'static> {
        Expression::Named(NamedExpression::Concat(vec![
            payload(self.l3, "daddr"),
            meta(MetaKey::L4proto),
            payload("th", "dport"),
        ]))
    }

    /// The postrouting chain masquerading what was marked for it.
    pub(super) fn masquerade_chain(&mut self) {
        self.batch.add(NfListObject::Chain(self.base_chain(
            "nat-postrouting",
            NfChainType::NAT,
            NfHook::Postrouting,
            100,
        )));
        self.add_rule("nat-postrouting", masquerade_marked());
    }
}

/// A batch for `nft -j -f -`, applied as one transaction.
#[derive(Clone, Debug, PartialEq)]
pub struct Transaction(pub serde_json::Value);

impl Transaction {
    /// The libnftables JSON, with svcplane's maps typed as verdict maps (the one thing the
    /// nftables crate cannot express: its map types lack `verdict`, and svcplane uses no other).
    pub(super) fn from_batch(nft: &Nftables<'static>) -> Result<Self, serde_json::Error> {
        let mut v = serde_json::to_value(nft)?;
        if let Some(cmds) = v.get_mut("nftables").and_then(serde_json::Value::as_array_mut) {
            for cmd in cmds {
                if let Some(map) = cmd.get_mut("add").and_then(|a| a.get_mut("map")) {
                    map["map"] = serde_json::Value::String("verdict".into());
                }
            }
        }
        Ok(Self(v))
    }

    /// How many commands the batch holds.
    pub fn len(&self) -> usize {
        self.0
            .get("nftables")
            .and_then(serde_json::Value::as_array)
            .map_or(0, Vec::len)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}
