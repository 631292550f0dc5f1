//! What programs the kernel from a node's desired state: one trait, an nftables and an IPVS
//! implementation, each owning what it last applied (its view of the kernel), so the sync loop
//! neither knows nor keeps either mode's state.

use std::{
    collections::BTreeSet,
    net::IpAddr,
    sync::{Arc, Mutex, PoisonError},
};

use anyhow::Context;
use svcplane_core::{IpFamily, ObjectKey};
use svcplane_dataplane::{
    desired::DesiredState,
    ipvs::plan::Op,
    nft::{
        IpvsSupport, Ruleset, Shards, TableId, Transaction,
        incremental::FamilyTable,
        ipvs_support, ipvs_support_transaction, ipvs_support_update,
        table::{Differences, Table, repair},
        transaction,
    },
};
use svcplane_kernel::nft::NftSocket;
use tracing::{debug, info, warn};

use super::{ipvs, metrics::DataplaneMetrics};

/// Applies `transactions` as one kernel transaction on a socket of its own, off the async
/// runtime; returns the ruleset's generation after it. For one-off writes (`cleanup`, IPVS
/// mode's small table); the nftables backend keeps an [`NftConn`].
pub async fn apply_nft(transactions: Vec<Transaction>) -> anyhow::Result<u32> {
    let conn = NftConn::default();
    let generation = conn.apply(transactions).await;
    conn.close_aside();
    generation
}

/// A netfilter socket kept open from one sync to the next. Closing one is not free: the
/// kernel first finishes releasing what the last commit removed, an RCU grace period (7-12 ms
/// measured at 10,000 Services, as much as the commit itself), and the sync would wait for it.
/// A socket that saw any error is closed (off the sync's path) and the next apply opens
/// another, so no reply left over from a failed exchange can be read as the next batch's.
#[derive(Clone, Default)]
pub struct NftConn(Arc<Mutex<Option<NftSocket>>>);

impl NftConn {
    /// Applies `transactions` as one kernel transaction, off the async runtime (the kernel
    /// works inside the send: seconds for a whole table of 10,000 Services); returns the
    /// ruleset's generation after it.
    pub async fn apply(&self, transactions: Vec<Transaction>) -> anyhow::Result<u32> {
        let conn = self.0.clone();
        tokio::task::spawn_blocking(move || -> anyhow::Result<u32> {
            let mut slot = conn.lock().unwrap_or_else(PoisonError::into_inner);
            let cpu = || nix::time::clock_gettime(nix::time::ClockId::CLOCK_THREAD_CPUTIME_ID).ok();
            let (started, before) = (std::time::Instant::now(), cpu());
            let socket = match slot.as_mut() {
                Some(s) => s,
                None => slot.insert(NftSocket::open().context("opening a netfilter netlink socket")?),
            };
            let generation = match socket.apply(&transactions) {
                Ok(g) => g,
                Err(e) => {
                    if let Some(s) = slot.take() {
                        close_aside(s);
                    }
                    return Err(e.into());
                }
            };
            // The kernel does the work inside the send, on this thread: CPU time against wall
            // time tells its work from waiting for a CPU.
            if let (Some(b), Some(a)) = (before, cpu()) {
                let cpu = std::time::Duration::from(a).saturating_sub(std::time::Duration::from(b));
                debug!(
                    elapsed_ms = started.elapsed().as_secs_f64() * 1000.0,
                    cpu_ms = cpu.as_secs_f64() * 1000.0,
                    "nftables transaction committed"
                );
            }
            Ok(generation)
        })
        .await
        .context("the nftables apply task failed")?
    }

    /// Closes the socket, if open, off the caller's path.
    fn close_aside(&self) {
        if let Some(s) = self.0.lock().unwrap_or_else(PoisonError::into_inner).take() {
            close_aside(s);
        }
    }
}

/// Closes `socket` on a thread of its own (see [`NftConn`]). When no thread can be started,
/// the refused closure is dropped here, and the socket closed on this thread.
fn close_aside(socket: NftSocket) {
    let _ = std::thread::Builder::new()
        .name("nft-close".into())
        .spawn(move || drop(socket));
}

/// What the read-back of one table found, and the transaction that put it right.
struct Repaired {
    family: IpFamily,
    table: TableId,
    /// The table was gone.
    missing: bool,
    differences: Differences,
    ops: usize,
}

/// Reads svcplane's tables back and repairs what differs from `applied` (each family's ruleset
/// as last written, cut into tables by `shards`), unless nothing committed anything since
/// `generation`. Returns the generation after, and what was repaired.
fn repair_tables(
    applied: &[(IpFamily, Ruleset)],
    shards: Shards,
    generation: Option<u32>,
) -> anyhow::Result<(u32, Vec<Repaired>)> {
    let mut socket = NftSocket::open().context("opening a netfilter netlink socket")?;
    let mut now = socket.generation().context("reading the ruleset's generation")?;
    let mut repaired = Vec::new();
    if Some(now) == generation {
        close_aside(socket);
        return Ok((now, repaired));
    }
    for (family, rs) in applied {
        // The rebuild of each table this layout uses (the others it only removes).
        for rebuild in transaction(None, rs, *family, shards) {
            if !shards.tables().any(|t| t == rebuild.table) {
                continue;
            }
            let expected = Table::from_ops(&rebuild.ops);
            let mut missing = false;
            let (fix, read_at) = match socket
                .read_table(*family, rebuild.table)
                .with_context(|| format!("reading table {} back", rebuild.table))?
            {
                None => {
                    let differences = Differences {
                        rebuild: true,
                        ..Differences::default()
                    };
                    missing = true;
                    (Some((rebuild.clone(), differences)), None)
                }
                Some((observed, at)) => (repair(&observed, &expected, &rebuild), Some(at)),
            };
            let Some((tx, differences)) = fix else {
                continue;
            };
            let ops = tx.len();
            now = socket.apply_at(&[tx], read_at)?;
            repaired.push(Repaired {
                family: *family,
                table: rebuild.table,
                missing,
                differences,
                ops,
            });
        }
    }
    close_aside(socket);
    Ok((now, repaired))
}

pub trait Backend: Send {
    /// `nftables` or `ipvs`, for logs and `--objects` summaries.
    fn mode(&self) -> &'static str;

    /// Takes the kernel to `state`, writing only the difference from what it last applied.
    /// `changed`: only these Services changed since the last apply (`None`: any may have).
    fn apply(
        &mut self,
        state: &DesiredState,
        changed: Option<&BTreeSet<ObjectKey>>,
        metrics: &DataplaneMetrics,
    ) -> impl Future<Output = anyhow::Result<()>> + Send;

    /// Once a sync period: notices what someone else changed in what this backend wrote, and
    /// puts it back.
    fn check_drift(&mut self, metrics: &DataplaneMetrics) -> impl Future<Output = ()> + Send;

    /// What the last apply did, as a JSON object (`--objects` prints it).
    fn summary(&self) -> serde_json::Value;
}

/// nftables mode: `svcplane` and its shards per family, changed by one kernel transaction per
/// sync.
pub struct Nftables {
    shards: Shards,
    /// The socket the syncs write through.
    conn: NftConn,
    /// The last applied table per family, kept Service by Service; `None` when unknown (start,
    /// or after a failed apply), which makes the next apply rebuild the table.
    applied: [(IpFamily, Option<FamilyTable>); 2],
    /// The ruleset's generation after svcplane's last commit: while the kernel is still at it,
    /// nobody else changed anything and there is nothing to read back.
    generation: Option<u32>,
}

impl Nftables {
    pub fn new(shards: Shards) -> Self {
        Self {
            shards,
            conn: NftConn::default(),
            applied: [(IpFamily::IPv4, None), (IpFamily::IPv6, None)],
            generation: None,
        }
    }
}

impl Backend for Nftables {
    fn mode(&self) -> &'static str {
        "nftables"
    }

    async fn apply(
        &mut self,
        state: &DesiredState,
        changed: Option<&BTreeSet<ObjectKey>>,
        metrics: &DataplaneMetrics,
    ) -> anyhow::Result<()> {
        let mut transactions = Vec::new();
        let mut next = Vec::new();
        for (i, (family, slot)) in self.applied.iter_mut().enumerate() {
            let family = *family;
            let full = slot.is_none();
            let (txs, table) = match (slot.take(), changed) {
                // Only the changed Services: the cost of what they hold.
                (Some(mut table), Some(changed)) => (table.update(state, changed), table),
                // Everything: the whole table recomputed and compared.
                (known, _) => {
                    let table = FamilyTable::new(state, family, self.shards);
                    let txs = transaction(
                        known.as_ref().map(FamilyTable::ruleset),
                        table.ruleset(),
                        family,
                        self.shards,
                    );
                    (txs, table)
                }
            };
            metrics
                .rules
                .with_label_values(&[family.as_str()])
                .set(i64::try_from(table.size()).unwrap_or(i64::MAX));
            if txs.is_empty() {
                *slot = Some(table);
                continue;
            }
            info!(
                family = family.as_str(),
                tables = txs.len(),
                commands = txs.iter().map(Transaction::len).sum::<usize>(),
                full,
                "updating nftables"
            );
            transactions.extend(txs);
            // Unknown (the slot stays empty) until the apply succeeds: a refused batch leaves the
            // old table whole, but the next sync must not diff against a state the kernel may
            // not hold.
            next.push((i, table));
        }
        if transactions.is_empty() {
            return Ok(());
        }
        let after = self.conn.apply(transactions).await?;
        // A commit moves the generation by one. More means someone else committed since the
        // generation svcplane knows (perhaps an edit of its tables), which only a read-back can
        // rule out: the next check must read, not take `after` as "nothing happened".
        self.generation = self
            .generation
            .filter(|known| known.wrapping_add(1) == after)
            .map(|_| after);
        for (i, table) in next {
            self.applied[i].1 = Some(table);
        }
        Ok(())
    }

    /// Reads the tables back (only when some transaction was committed since svcplane's last)
    /// and puts back what someone else changed: a rule edited or added by hand, an element
    /// deleted by another tool, a chain flushed, the table removed.
    async fn check_drift(&mut self, metrics: &DataplaneMetrics) {
        let applied: Vec<(IpFamily, Ruleset)> = self
            .applied
            .iter()
            .filter_map(|(f, t)| Some((*f, t.as_ref()?.ruleset().clone())))
            .collect();
        let generation = self.generation;
        let shards = self.shards;
        let result = tokio::task::spawn_blocking(move || repair_tables(&applied, shards, generation)).await;
        match result {
            Ok(Ok((now, repaired))) => {
                self.generation = Some(now);
                for r in repaired {
                    metrics.drift_repairs.inc();
                    warn!(
                        family = r.family.as_str(),
                        table = %r.table,
                        missing = r.missing,
                        chains = ?r.differences.chains,
                        sets = ?r.differences.sets,
                        elements = r.differences.elements,
                        rebuilt = r.differences.rebuild,
                        operations = r.ops,
                        "svcplane's nftables table was changed by someone else; put it back"
                    );
                }
            }
            Ok(Err(e)) => {
                // Unknown: the next sync rebuilds.
                for (_, slot) in &mut self.applied {
                    *slot = None;
                }
                warn!(
                    error = format!("{e:#}"),
                    "could not check svcplane's nftables tables; rebuilding them"
                );
            }
            Err(e) => warn!(error = %e, "the nftables check task failed"),
        }
    }

    fn summary(&self) -> serde_json::Value {
        serde_json::json!({"mode": self.mode()})
    }
}

/// IPVS mode: virtual servers over generic netlink, plus a small nftables table for what IPVS
/// does not do (masquerading node-port traffic, rejecting Services without endpoints).
pub struct Ipvs {
    scheduler: String,
    node_ips: Vec<IpAddr>,
    last: Option<ipvs::Report>,
    /// What the last sync left in the kernel (`None`: the next sync reads it all).
    view: Option<ipvs::View>,
    /// The masquerade and reject rules as last applied, per family.
    support: [(IpFamily, Option<IpvsSupport>); 2],
}

impl Ipvs {
    pub fn new(scheduler: String, node_ips: Vec<IpAddr>) -> Self {
        Self {
            scheduler,
            node_ips,
            last: None,
            view: None,
            support: [(IpFamily::IPv4, None), (IpFamily::IPv6, None)],
        }
    }
}

impl Backend for Ipvs {
    fn mode(&self) -> &'static str {
        "ipvs"
    }

    async fn apply(
        &mut self,
        state: &DesiredState,
        changed: Option<&BTreeSet<ObjectKey>>,
        metrics: &DataplaneMetrics,
    ) -> anyhow::Result<()> {
        let report = ipvs::sync(state, &self.node_ips, &self.scheduler, &mut self.view, changed).await?;
        metrics
            .rules
            .with_label_values(&["IPVS"])
            .set(i64::try_from(report.entries).unwrap_or(i64::MAX));
        if report.failed > 0 {
            metrics
                .ipvs_failures
                .inc_by(u64::try_from(report.failed).unwrap_or(u64::MAX));
        }
        if !report.ops.is_empty() || report.addresses_added + report.addresses_removed > 0 {
            info!(
                operations = report.ops.len(),
                failed = report.failed,
                addresses_added = report.addresses_added,
                addresses_removed = report.addresses_removed,
                "IPVS updated"
            );
        }
        self.last = Some(report);
        for (family, slot) in &mut self.support {
            let family = *family;
            let next = ipvs_support(state, family);
            if slot.as_ref() == Some(&next) {
                continue;
            }
            // Element changes when the rules stay; the whole table when they do not.
            let txs = match slot
                .as_ref()
                .and_then(|prev| ipvs_support_update(prev, &next, family))
            {
                Some(tx) => vec![tx],
                None => ipvs_support_transaction(&next, family),
            };
            *slot = None;
            apply_nft(txs).await?;
            *slot = Some(next);
        }
        Ok(())
    }

    /// The full sync once a period reads the whole IPVS table back and plans against it (the
    /// syncs between read back only the virtual servers they change), so there is nothing to do
    /// here.
    async fn check_drift(&mut self, _metrics: &DataplaneMetrics) {}

    fn summary(&self) -> serde_json::Value {
        let Some(r) = &self.last else {
            return serde_json::json!({"mode": self.mode()});
        };
        let count = |f: fn(&Op) -> bool| r.ops.iter().filter(|o| f(o)).count();
        serde_json::json!({
            "mode": self.mode(),
            "operations": r.ops.len(),
            "add_service": count(|o| matches!(o, Op::AddService(..))),
            "update_service": count(|o| matches!(o, Op::UpdateService(..))),
            "del_service": count(|o| matches!(o, Op::DelService(..))),
            "add_dest": count(|o| matches!(o, Op::AddDest(..))),
            "update_dest": count(|o| matches!(o, Op::UpdateDest(..))),
            "del_dest": count(|o| matches!(o, Op::DelDest(..))),
            "failed": r.failed,
            "addresses_added": r.addresses_added,
            "addresses_removed": r.addresses_removed,
        })
    }
}
