//! A transaction as a list of changes to one family's table, each one nf_tables message.
//! Each says what it is (in nft's syntax, for logs and errors) and which Service port it is
//! for, so the kernel's complaint about one message names the Service.

use std::{fmt, net::IpAddr};

use svcplane_core::{IpFamily, Protocol};

use super::{
    expr::{Expr, Verdict},
    layout::TableId,
};

/// A netfilter hook and priority, for the chains packets enter by.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Hook {
    pub point: HookPoint,
    pub priority: i32,
    /// A `nat` chain (else `filter`).
    pub nat: bool,
}

/// `enum nf_inet_hooks`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HookPoint {
    Prerouting = 0,
    Input = 1,
    Forward = 2,
    Output = 3,
    Postrouting = 4,
}

/// What a set holds; with the table's family that fixes its key type.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SetKind {
    /// `daddr . l4proto . dport : verdict`.
    ServiceMap,
    /// `l4proto . dport : verdict`.
    PortMap,
    /// `daddr . l4proto . dport`.
    ServiceSet,
    /// `l4proto . dport`.
    PortSet,
    /// Client addresses, each for `timeout_secs` after its last packet (ClientIP affinity).
    Affinity { timeout_secs: u32 },
}

/// A set element's key.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Key {
    Service(IpAddr, Protocol, u16),
    Port(Protocol, u16),
}

impl fmt::Display for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Key::Service(ip, p, port) => write!(f, "{ip} . {} . {port}", p.as_str()),
            Key::Port(p, port) => write!(f, "{} . {port}", p.as_str()),
        }
    }
}

/// One change to the table.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Op {
    AddTable,
    DeleteTable,
    AddChain {
        name: String,
        hook: Option<Hook>,
    },
    /// Deletes every rule of the chain.
    FlushChain(String),
    DeleteChain(String),
    AddRule {
        chain: String,
        exprs: Vec<Expr>,
    },
    AddSet {
        name: String,
        kind: SetKind,
    },
    DeleteSet(String),
    /// Adds a key, with the chain a verdict map sends it to.
    AddElement {
        set: String,
        key: Key,
        goto: Option<String>,
    },
    DeleteElement {
        set: String,
        key: Key,
    },
}

/// The ops of one table; the transactions of one sync go to the kernel in one batch, carried
/// out as one kernel transaction.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Transaction {
    pub family: IpFamily,
    pub table: TableId,
    pub ops: Vec<Op>,
}

impl Transaction {
    /// Ops on `svcplane`, the table Services share.
    pub fn new(family: IpFamily) -> Self {
        Self::on(family, TableId::Main)
    }

    pub fn on(family: IpFamily, table: TableId) -> Self {
        Self {
            family,
            table,
            ops: Vec::new(),
        }
    }

    pub fn push(&mut self, op: Op) {
        self.ops.push(op);
    }

    pub fn len(&self) -> usize {
        self.ops.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ops.is_empty()
    }
}

/// The Service port a chain or set is for: `<ns>/<name>/<protocol>/<port>` in the names
/// `svc-…`, `ext-…`, `ep-…__<endpoint>` and `aff-…__<endpoint>`.
pub fn port_of(name: &str) -> Option<&str> {
    let rest = ["svc-", "ext-", "ep-", "aff-"]
        .iter()
        .find_map(|p| name.strip_prefix(p))?;
    Some(rest.split_once("__").map_or(rest, |(id, _)| id))
}

impl Op {
    /// The Service port this op is for, if any (else it is the table's skeleton).
    pub fn port(&self) -> Option<&str> {
        match self {
            Op::AddTable | Op::DeleteTable => None,
            Op::AddChain { name, .. } | Op::FlushChain(name) | Op::DeleteChain(name) => port_of(name),
            Op::AddRule { chain, .. } => port_of(chain),
            Op::AddSet { name, .. } | Op::DeleteSet(name) => port_of(name),
            Op::AddElement { goto, .. } => goto.as_deref().and_then(port_of),
            Op::DeleteElement { .. } => None,
        }
    }
}

impl fmt::Display for Op {
    /// Roughly nft's syntax (rules by their expressions' names: the kernel's view).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Op::AddTable => f.write_str("add table"),
            Op::DeleteTable => f.write_str("delete table"),
            Op::AddChain { name, hook: None } => write!(f, "add chain {name}"),
            Op::AddChain { name, hook: Some(h) } => write!(
                f,
                "add chain {name} {{ type {} hook {:?} priority {} }}",
                if h.nat { "nat" } else { "filter" },
                h.point,
                h.priority
            ),
            Op::FlushChain(name) => write!(f, "flush chain {name}"),
            Op::DeleteChain(name) => write!(f, "delete chain {name}"),
            Op::AddRule { chain, exprs } => {
                write!(f, "add rule {chain}")?;
                for e in exprs {
                    match e {
                        Expr::Lookup { set, .. } => write!(f, " lookup @{set}")?,
                        Expr::DynsetUpdate { set, .. } => write!(f, " update @{set}")?,
                        Expr::Verdict(Verdict::Jump(c)) => write!(f, " jump {c}")?,
                        Expr::Verdict(Verdict::Goto(c)) => write!(f, " goto {c}")?,
                        Expr::Verdict(v) => write!(f, " {v:?}")?,
                        other => write!(f, " {}", expr_name(other))?,
                    }
                }
                Ok(())
            }
            Op::AddSet { name, kind } => write!(f, "add set {name} ({kind:?})"),
            Op::DeleteSet(name) => write!(f, "delete set {name}"),
            Op::AddElement {
                set,
                key,
                goto: Some(chain),
            } => write!(f, "add element {set} {{ {key} : goto {chain} }}"),
            Op::AddElement { set, key, goto: None } => write!(f, "add element {set} {{ {key} }}"),
            Op::DeleteElement { set, key } => write!(f, "delete element {set} {{ {key} }}"),
        }
    }
}

/// The kernel's name of an expression.
pub fn expr_name(e: &Expr) -> &'static str {
    match e {
        Expr::Payload { .. } => "payload",
        Expr::Meta { .. } | Expr::MetaSet { .. } => "meta",
        Expr::Cmp { .. } => "cmp",
        Expr::Bitwise { .. } => "bitwise",
        Expr::Lookup { .. } => "lookup",
        Expr::Immediate { .. } | Expr::Verdict(_) => "immediate",
        Expr::Numgen { .. } => "numgen",
        Expr::Dnat { .. } => "nat",
        Expr::Masquerade => "masq",
        Expr::DynsetUpdate { .. } => "dynset",
        Expr::FibDaddrType { .. } => "fib",
        Expr::CtState { .. } => "ct",
        Expr::Reject { .. } => "reject",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ops_name_the_service_port_they_are_for() {
        let chain = |n: &str| Op::FlushChain(n.into());
        assert_eq!(chain("svc-ns/web/tcp/http").port(), Some("ns/web/tcp/http"));
        assert_eq!(
            chain("ep-ns/web/tcp/http__10.0.0.1:80").port(),
            Some("ns/web/tcp/http")
        );
        assert_eq!(chain("services").port(), None);
        let add = Op::AddElement {
            set: "service-ips".into(),
            key: Key::Service("10.96.0.1".parse().unwrap(), Protocol::Tcp, 443),
            goto: Some("ext-ns/web/tcp/443".into()),
        };
        assert_eq!(add.port(), Some("ns/web/tcp/443"));
        assert_eq!(
            add.to_string(),
            "add element service-ips { 10.96.0.1 . tcp . 443 : goto ext-ns/web/tcp/443 }"
        );
    }
}
