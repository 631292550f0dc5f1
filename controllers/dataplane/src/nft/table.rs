//! A table as the kernel holds it, in the kernel's vocabulary (chains of expression lists, sets,
//! elements), built either from what svcplane would write or from what a dump read back; and
//! the repair that turns the one read back into the one expected. This is how a rule edited by
//! hand, an element deleted by another tool or a chain flushed behind svcplane's back is found
//! and undone, whatever the model says was applied.

use std::collections::{BTreeMap, BTreeSet};

use super::{
    expr::{Expr, Verdict},
    op::{Hook, Key, Op, SetKind, Transaction},
};

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Chain {
    pub hook: Option<Hook>,
    /// Each rule's expressions; `None` for a rule svcplane cannot read (not one it writes).
    pub rules: Vec<Option<Vec<Expr>>>,
}

/// One family's table.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Table {
    pub chains: BTreeMap<String, Chain>,
    /// `None`: a set svcplane does not write (other flags or key type).
    pub sets: BTreeMap<String, Option<SetKind>>,
    /// Elements per set: the chain a verdict map sends the key to (`None` in plain sets, and
    /// for verdicts other than `goto`, which svcplane never writes).
    pub elements: BTreeMap<String, BTreeMap<Key, Option<String>>>,
}

impl Table {
    /// The table the ops of a from-scratch transaction build.
    pub fn from_ops(ops: &[Op]) -> Self {
        let mut t = Table::default();
        for op in ops {
            match op {
                Op::AddTable => {}
                Op::DeleteTable => t = Table::default(),
                Op::AddChain { name, hook } => {
                    t.chains.entry(name.clone()).or_default().hook = *hook;
                }
                Op::FlushChain(name) => {
                    if let Some(c) = t.chains.get_mut(name) {
                        c.rules.clear();
                    }
                }
                Op::DeleteChain(name) => {
                    t.chains.remove(name);
                }
                Op::AddRule { chain, exprs } => t
                    .chains
                    .entry(chain.clone())
                    .or_default()
                    .rules
                    .push(Some(exprs.clone())),
                Op::AddSet { name, kind } => {
                    t.sets.insert(name.clone(), Some(*kind));
                }
                Op::DeleteSet(name) => {
                    t.sets.remove(name);
                    t.elements.remove(name);
                }
                Op::AddElement { set, key, goto } => {
                    t.elements
                        .entry(set.clone())
                        .or_default()
                        .insert(*key, goto.clone());
                }
                Op::DeleteElement { set, key } => {
                    if let Some(e) = t.elements.get_mut(set) {
                        e.remove(key);
                    }
                }
            }
        }
        t.elements.retain(|_, e| !e.is_empty());
        t
    }

    /// The sets a chain's rules name.
    fn sets_used_by(chain: &Chain) -> impl Iterator<Item = &str> {
        chain.rules.iter().flatten().flatten().filter_map(|e| match e {
            Expr::Lookup { set, .. } | Expr::DynsetUpdate { set, .. } => Some(set.as_str()),
            _ => None,
        })
    }
}

/// What differs between the table read back and the one expected, for the log.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Differences {
    pub chains: Vec<String>,
    pub sets: Vec<String>,
    pub elements: usize,
    /// Something a repair cannot fix in place (a base chain's hook): the table is rebuilt.
    pub rebuild: bool,
}

impl Differences {
    pub fn is_empty(&self) -> bool {
        self.chains.is_empty() && self.sets.is_empty() && self.elements == 0 && !self.rebuild
    }
}

/// The transaction that turns `observed` into `expected` (built from `rebuild`, the whole
/// table's ops, when a repair in place cannot do it), with what differed. `None` when they
/// are equal.
pub fn repair(
    observed: &Table,
    expected: &Table,
    rebuild: &Transaction,
) -> Option<(Transaction, Differences)> {
    if observed == expected {
        return None;
    }
    let mut d = Differences::default();
    // Base chains whose hook is not the one expected (or that should not be base chains).
    let hooks_differ: BTreeSet<&String> = expected
        .chains
        .iter()
        .filter(|(name, c)| c.hook.is_some() && observed.chains.get(*name).map(|o| o.hook) != Some(c.hook))
        .chain(observed.chains.iter().filter(|(name, c)| {
            c.hook.is_some() && expected.chains.get(*name).map(|e| e.hook) != Some(c.hook)
        }))
        .map(|(name, _)| name)
        .collect();
    if !hooks_differ.is_empty() {
        d.rebuild = true;
        d.chains = hooks_differ.into_iter().cloned().collect();
        return Some((rebuild.clone(), d));
    }
    let family = rebuild.family;
    let mut tx = Transaction::on(family, rebuild.table);

    // Sets that must go or be made anew (another kind: another timeout, another key type).
    let stale_sets: BTreeSet<&str> = observed
        .sets
        .iter()
        .filter(|(name, kind)| expected.sets.get(*name) != Some(kind))
        .map(|(name, _)| name.as_str())
        .collect();
    // Chains rewritten: other rules, or rules naming a set that goes.
    let rewritten: BTreeSet<&String> = expected
        .chains
        .iter()
        .filter(|(name, c)| {
            observed
                .chains
                .get(*name)
                .is_some_and(|o| o.rules != c.rules || Table::sets_used_by(o).any(|s| stale_sets.contains(s)))
        })
        .map(|(name, _)| name)
        .collect();
    let missing: Vec<&String> = expected
        .chains
        .keys()
        .filter(|n| !observed.chains.contains_key(*n))
        .collect();
    let extra: Vec<&String> = observed
        .chains
        .keys()
        .filter(|n| !expected.chains.contains_key(*n))
        .collect();
    d.chains = rewritten
        .iter()
        .chain(&missing)
        .chain(&extra)
        .map(|n| (*n).clone())
        .collect();
    d.sets = stale_sets.iter().map(|s| (*s).to_owned()).collect();
    d.sets.extend(
        expected
            .sets
            .keys()
            .filter(|n| !observed.sets.contains_key(*n))
            .cloned(),
    );

    for name in &missing {
        tx.push(Op::AddChain {
            name: (*name).clone(),
            hook: None,
        });
    }
    // Emptied first: what they refer to (sets, chains) can then go.
    for name in rewritten.iter().chain(&extra) {
        tx.push(Op::FlushChain((*name).clone()));
    }
    // Elements: those that are wrong or extra go, then the missing and the right ones come.
    let empty = BTreeMap::new();
    let mut adds = Vec::new();
    let sets: BTreeSet<&String> = observed.elements.keys().chain(expected.elements.keys()).collect();
    for set in sets {
        let have = observed.elements.get(set).unwrap_or(&empty);
        let want = expected.elements.get(set).unwrap_or(&empty);
        // The elements of a set made anew go with it.
        let remade = stale_sets.contains(set.as_str());
        for (key, goto) in have {
            if want.get(key) != Some(goto) && !remade {
                d.elements += 1;
                tx.push(Op::DeleteElement {
                    set: set.clone(),
                    key: *key,
                });
            }
        }
        for (key, goto) in want {
            if have.get(key) != Some(goto) || remade {
                if !remade {
                    d.elements += 1;
                }
                adds.push(Op::AddElement {
                    set: set.clone(),
                    key: *key,
                    goto: goto.clone(),
                });
            }
        }
    }
    for set in &stale_sets {
        tx.push(Op::DeleteSet((*set).to_owned()));
    }
    for (name, kind) in &expected.sets {
        if let Some(kind) = kind
            && observed.sets.get(name) != Some(&Some(*kind))
        {
            tx.push(Op::AddSet {
                name: name.clone(),
                kind: *kind,
            });
        }
    }
    for name in rewritten.iter().chain(&missing) {
        for exprs in expected.chains[*name].rules.iter().flatten() {
            tx.push(Op::AddRule {
                chain: (*name).clone(),
                exprs: exprs.clone(),
            });
        }
    }
    tx.ops.extend(adds);
    for name in &extra {
        tx.push(Op::DeleteChain((*name).clone()));
    }
    Some((tx, d))
}

/// The verdict a read-back element holds, as [`Table::elements`] keeps it.
pub fn element_target(v: Option<&Verdict>) -> Option<String> {
    match v {
        Some(Verdict::Goto(chain)) => Some(chain.clone()),
        // Anything else svcplane never writes: kept as a name no chain has, so that it differs.
        Some(other) => Some(format!("<{other:?}>")),
        None => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nft::{Rule, Ruleset, transaction};
    use svcplane_core::{IpFamily, Protocol};

    fn table() -> (Ruleset, Transaction, Table) {
        let mut rs = Ruleset::default();
        rs.chains.insert("services".into(), vec![Rule::DispatchServices]);
        rs.chains
            .insert("no-endpoints".into(), vec![Rule::DispatchNoEndpoints]);
        rs.chains.insert("reject-chain".into(), vec![Rule::Reject]);
        rs.chains.insert(
            "svc-a".into(),
            vec![
                Rule::Affinity {
                    set: "aff-a".into(),
                    chain: "ep-a".into(),
                },
                Rule::Pick {
                    chain: "ep-a".into(),
                    one_in: 1,
                },
            ],
        );
        rs.chains.insert(
            "ep-a".into(),
            vec![
                Rule::RefreshAffinity("aff-a".into()),
                Rule::Dnat("10.0.0.1:80".parse().unwrap(), Protocol::Tcp),
            ],
        );
        rs.affinity_sets.insert("aff-a".into(), 60);
        rs.service_ips
            .insert(("10.96.0.1".parse().unwrap(), Protocol::Tcp, 80), "svc-a".into());
        let full = transaction(None, &rs, IpFamily::IPv4, crate::nft::Shards::new(1).unwrap())
            .into_iter()
            // The shard: the Service's chains, sets and elements.
            .find(|t| t.table == crate::nft::TableId::Shard(0))
            .unwrap();
        let t = Table::from_ops(&full.ops);
        (rs, full, t)
    }

    fn key() -> Key {
        Key::Service("10.96.0.1".parse().unwrap(), Protocol::Tcp, 80)
    }

    #[test]
    fn a_table_equal_to_the_expected_one_needs_nothing() {
        let (_, full, t) = table();
        assert_eq!(t.chains["svc-a"].rules.len(), 2);
        assert!(t.chains["nat-prerouting"].hook.is_some());
        assert!(repair(&t.clone(), &t, &full).is_none());
    }

    #[test]
    fn an_edited_chain_is_flushed_and_refilled_and_nothing_else_is_touched() {
        let (_, full, want) = table();
        let mut have = want.clone();
        have.chains.get_mut("svc-a").unwrap().rules[1] = None;
        let (tx, d) = repair(&have, &want, &full).unwrap();
        assert_eq!(d.chains, ["svc-a"]);
        assert_eq!(tx.ops[0], Op::FlushChain("svc-a".into()));
        assert_eq!(tx.ops.len(), 3);
        assert_eq!(Table::from_ops(&apply(&have, &tx)), want);
    }

    /// `have` with `tx` applied, as ops from scratch (what the kernel would hold).
    fn apply(have: &Table, tx: &Transaction) -> Vec<Op> {
        let mut ops = Vec::new();
        for (name, kind) in &have.sets {
            ops.push(Op::AddSet {
                name: name.clone(),
                kind: kind.unwrap_or(SetKind::PortSet),
            });
        }
        for (name, c) in &have.chains {
            ops.push(Op::AddChain {
                name: name.clone(),
                hook: c.hook,
            });
            for r in c.rules.iter().flatten() {
                ops.push(Op::AddRule {
                    chain: name.clone(),
                    exprs: r.clone(),
                });
            }
            // An unreadable rule: something no expected table holds.
            for _ in c.rules.iter().filter(|r| r.is_none()) {
                ops.push(Op::AddRule {
                    chain: name.clone(),
                    exprs: vec![Expr::Masquerade, Expr::Masquerade],
                });
            }
        }
        for (set, elements) in &have.elements {
            for (key, goto) in elements {
                ops.push(Op::AddElement {
                    set: set.clone(),
                    key: *key,
                    goto: goto.clone(),
                });
            }
        }
        ops.extend(tx.ops.iter().cloned());
        ops
    }

    #[test]
    fn elements_deleted_redirected_or_added_by_hand_are_put_right() {
        let (_, full, want) = table();
        let mut have = want.clone();
        let ips = have.elements.get_mut("service-ips").unwrap();
        ips.insert(key(), Some("<Accept>".into()));
        ips.insert(
            Key::Service("10.96.0.9".parse().unwrap(), Protocol::Udp, 53),
            Some("svc-a".into()),
        );
        have.elements
            .entry("service-nodeports".into())
            .or_default()
            .insert(Key::Port(Protocol::Tcp, 30000), Some("svc-a".into()));
        let (tx, d) = repair(&have, &want, &full).unwrap();
        assert_eq!(d.elements, 4, "{tx:?}");
        assert!(d.chains.is_empty());
        assert!(
            tx.ops
                .iter()
                .all(|op| matches!(op, Op::AddElement { .. } | Op::DeleteElement { .. }))
        );
        assert_eq!(Table::from_ops(&apply(&have, &tx)), want);
    }

    #[test]
    fn a_set_with_another_timeout_is_made_anew_with_the_chains_that_use_it() {
        let (_, full, want) = table();
        let mut have = want.clone();
        have.sets
            .insert("aff-a".into(), Some(SetKind::Affinity { timeout_secs: 5 }));
        let (tx, d) = repair(&have, &want, &full).unwrap();
        assert_eq!(d.sets, ["aff-a"]);
        // Both chains that name the set are emptied before it goes, and refilled after.
        assert_eq!(d.chains, ["ep-a", "svc-a"]);
        let at = |op: &Op| tx.ops.iter().position(|o| o == op).unwrap();
        let delete = at(&Op::DeleteSet("aff-a".into()));
        assert!(at(&Op::FlushChain("ep-a".into())) < delete);
        assert!(at(&Op::FlushChain("svc-a".into())) < delete);
        assert_eq!(Table::from_ops(&apply(&have, &tx)), want);
    }

    #[test]
    fn missing_and_foreign_chains_are_added_and_removed() {
        let (_, full, want) = table();
        let mut have = want.clone();
        have.chains.remove("ep-a");
        have.chains.insert(
            "added-by-hand".into(),
            Chain {
                hook: None,
                rules: vec![None],
            },
        );
        let (tx, d) = repair(&have, &want, &full).unwrap();
        assert_eq!(d.chains, ["ep-a", "added-by-hand"]);
        assert_eq!(tx.ops.last(), Some(&Op::DeleteChain("added-by-hand".into())));
        assert_eq!(Table::from_ops(&apply(&have, &tx)), want);
    }

    #[test]
    fn a_base_chain_on_another_hook_rebuilds_the_table() {
        let (_, full, want) = table();
        let mut have = want.clone();
        if let Some(h) = &mut have.chains.get_mut("nat-prerouting").unwrap().hook {
            h.priority = 0;
        }
        let (tx, d) = repair(&have, &want, &full).unwrap();
        assert!(d.rebuild);
        assert_eq!(tx, full);
    }
}
