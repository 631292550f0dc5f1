//! svcplane's rules in the kernel's terms: each [`Rule`] of the model as the expressions nft
//! would have generated for it, and the fixed rules of the skeleton.

use svcplane_core::IpFamily;

use super::{
    MASQUERADE_MARK, NO_ENDPOINT_IPS, NO_ENDPOINT_NODEPORTS, SERVICE_IPS, SERVICE_NODEPORTS,
    expr::{
        self, Expr, REG1, Verdict, daddr_is_local, dnat, has_mark_bit, host_u32, load_addr, load_proto_port,
        load_service_tuple, set_mark_bit,
    },
    model::Rule,
};

fn is_v6(family: IpFamily) -> bool {
    family == IpFamily::IPv6
}

/// `<daddr> . l4proto . th dport vmap @map` (or `… @set` without `verdict_map`).
pub fn service_lookup(family: IpFamily, set: &str, verdict_map: bool) -> Vec<Expr> {
    let mut e = load_service_tuple(is_v6(family));
    e.push(Expr::Lookup {
        set: set.into(),
        sreg: REG1,
        verdict_map,
    });
    e
}

/// `l4proto . th dport @map fib daddr type local l4proto . th dport vmap @map` (or, for a set,
/// `l4proto . th dport @set fib daddr type local`). The port is looked up first because the
/// route lookup of `fib` is the expensive part, and most packets are for no node port: each
/// shard's `services` chain does this for every new connection, the main table's filter chains
/// for every new one through the node.
pub fn node_port_lookup(set: &str, verdict_map: bool) -> Vec<Expr> {
    let lookup = |verdict_map| Expr::Lookup {
        set: set.into(),
        sreg: REG1,
        verdict_map,
    };
    let mut e = load_proto_port();
    e.push(lookup(false));
    e.extend(daddr_is_local());
    if verdict_map {
        e.extend(load_proto_port());
        e.push(lookup(true));
    }
    e
}

pub fn jump(chain: &str) -> Vec<Expr> {
    vec![Expr::Verdict(Verdict::Jump(chain.into()))]
}

/// `meta mark & MASQUERADE_MARK != 0 masquerade`.
pub fn masquerade_marked() -> Vec<Expr> {
    let mut e = has_mark_bit(MASQUERADE_MARK);
    e.push(Expr::Masquerade);
    e
}

pub fn mark_for_masquerade() -> Vec<Expr> {
    set_mark_bit(MASQUERADE_MARK)
}

/// The rules one model rule becomes in a chain of `family`'s table: one, except that the
/// dispatch rules are two (a rule holds one lookup; node ports are the second).
pub fn rules(rule: &Rule, family: IpFamily) -> Vec<Vec<Expr>> {
    let v6 = is_v6(family);
    let one = |e: Vec<Expr>| vec![e];
    match rule {
        Rule::DispatchServices => vec![
            service_lookup(family, SERVICE_IPS, true),
            node_port_lookup(SERVICE_NODEPORTS, true),
        ],
        Rule::DispatchNoEndpoints => vec![
            service_lookup(family, NO_ENDPOINT_IPS, true),
            node_port_lookup(NO_ENDPOINT_NODEPORTS, true),
        ],
        Rule::Reject => one(vec![expr::reject(v6)]),
        Rule::Drop => one(vec![Expr::Verdict(Verdict::Drop)]),
        Rule::MarkMasquerade => one(mark_for_masquerade()),
        Rule::MasqueradeFromOutside(cidr) => {
            let mut e = expr::saddr_outside(*cidr);
            e.extend(mark_for_masquerade());
            one(e)
        }
        Rule::Affinity { set, chain } => one(vec![
            load_addr(v6, true, REG1),
            Expr::Lookup {
                set: set.clone(),
                sreg: REG1,
                verdict_map: false,
            },
            Expr::Verdict(Verdict::Goto(chain.clone())),
        ]),
        Rule::Pick { chain, one_in: 1 } => one(vec![Expr::Verdict(Verdict::Goto(chain.clone()))]),
        Rule::Pick { chain, one_in } => one(vec![
            Expr::Numgen {
                dreg: REG1,
                modulus: *one_in,
            },
            Expr::Cmp {
                sreg: REG1,
                eq: true,
                data: host_u32(0),
            },
            Expr::Verdict(Verdict::Goto(chain.clone())),
        ]),
        Rule::Hairpin(ip) => {
            let mut e = vec![
                load_addr(v6, true, REG1),
                Expr::Cmp {
                    sreg: REG1,
                    eq: true,
                    data: expr::ip_bytes(*ip),
                },
            ];
            e.extend(mark_for_masquerade());
            one(e)
        }
        Rule::RefreshAffinity(set) => one(vec![
            load_addr(v6, true, REG1),
            Expr::DynsetUpdate {
                set: set.clone(),
                sreg: REG1,
            },
        ]),
        Rule::Dnat(addr, p) => one(dnat(*addr, *p)),
    }
}
