//! What programs the kernel from a node's desired state: one trait, an nftables and an IPVS
//! implementation, each owning what it last applied (its view of the kernel), so the sync loop
//! neither knows nor keeps either mode's state.

use std::{net::IpAddr, path::PathBuf};

use anyhow::Context;
use svcplane_core::IpFamily;
use svcplane_dataplane::{
    desired::DesiredState,
    ipvs::plan::Op,
    nft::{IpvsSupport, Ruleset, TABLE, ipvs_support, ipvs_support_transaction, ruleset, transaction},
};
use tracing::{info, warn};

use super::{ipvs, metrics::DataplaneMetrics, nft};

pub trait Backend: Send {
    /// `nftables` or `ipvs`, for logs and `--objects` summaries.
    fn mode(&self) -> &'static str;

    /// Takes the kernel to `state`, writing only the difference from what it last applied.
    fn apply(
        &mut self,
        state: &DesiredState,
        metrics: &DataplaneMetrics,
    ) -> impl Future<Output = anyhow::Result<()>> + Send;

    /// Between syncs: notices what someone else changed, so that the next apply repairs it.
    fn check_drift(&mut self) -> impl Future<Output = ()> + Send;

    /// What the last apply did, as a JSON object (`--objects` prints it).
    fn summary(&self) -> serde_json::Value;
}

/// nftables mode: one table per family, changed by one transaction per sync.
pub struct Nftables {
    nft: PathBuf,
    /// The last applied table per family; `None` when unknown (start, or after a failed apply),
    /// which makes the next apply rebuild the table.
    applied: [(IpFamily, Option<Ruleset>); 2],
}

impl Nftables {
    pub fn new(nft: PathBuf) -> Self {
        Self {
            nft,
            applied: [(IpFamily::IPv4, None), (IpFamily::IPv6, None)],
        }
    }
}

impl Backend for Nftables {
    fn mode(&self) -> &'static str {
        "nftables"
    }

    async fn apply(&mut self, state: &DesiredState, metrics: &DataplaneMetrics) -> anyhow::Result<()> {
        for (family, slot) in &mut self.applied {
            let family = *family;
            let next = ruleset(state, family);
            metrics
                .rules
                .with_label_values(&[family.as_str()])
                .set(i64::try_from(next.size()).unwrap_or(i64::MAX));
            let Some(tx) =
                transaction(slot.as_ref(), &next, family).context("rendering the nftables batch")?
            else {
                continue;
            };
            let full = slot.is_none();
            // Unknown from here until the apply succeeds: a failed batch leaves the old table
            // whole, but the next sync must not diff against a state the kernel may not hold.
            *slot = None;
            nft::apply(&self.nft, &tx).await?;
            info!(
                family = family.as_str(),
                commands = tx.len(),
                full,
                "nftables updated"
            );
            *slot = Some(next);
        }
        Ok(())
    }

    /// A table someone else removed (a flushed ruleset, another tool's cleanup) is rebuilt at
    /// the next apply. `nft list tables` names tables only: cheap however large the table is.
    async fn check_drift(&mut self) {
        match nft::tables(&self.nft).await {
            Ok(tables) => {
                for (family, slot) in &mut self.applied {
                    let name = match family {
                        IpFamily::IPv4 => "ip",
                        IpFamily::IPv6 => "ip6",
                    };
                    if slot.is_some() && !tables.contains(&(name.to_owned(), TABLE.to_owned())) {
                        warn!(
                            family = name,
                            table = TABLE,
                            "svcplane's table is gone; rebuilding it"
                        );
                        *slot = None;
                    }
                }
            }
            Err(e) => warn!(error = format!("{e:#}"), "cannot list nftables tables"),
        }
    }

    fn summary(&self) -> serde_json::Value {
        serde_json::json!({"mode": self.mode()})
    }
}

/// IPVS mode: virtual servers over generic netlink, plus a small nftables table for what IPVS
/// does not do (masquerading node-port traffic, rejecting Services without endpoints).
pub struct Ipvs {
    nft: PathBuf,
    scheduler: String,
    node_ips: Vec<IpAddr>,
    last: Option<ipvs::Report>,
    /// The masquerade and reject rules as last applied, per family.
    support: [(IpFamily, Option<IpvsSupport>); 2],
}

impl Ipvs {
    pub fn new(nft: PathBuf, scheduler: String, node_ips: Vec<IpAddr>) -> Self {
        Self {
            nft,
            scheduler,
            node_ips,
            last: None,
            support: [(IpFamily::IPv4, None), (IpFamily::IPv6, None)],
        }
    }
}

impl Backend for Ipvs {
    fn mode(&self) -> &'static str {
        "ipvs"
    }

    async fn apply(&mut self, state: &DesiredState, metrics: &DataplaneMetrics) -> anyhow::Result<()> {
        let report = ipvs::sync(state, &self.node_ips, &self.scheduler).await?;
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
            *slot = None;
            let tx = ipvs_support_transaction(&next, family).context("rendering the IPVS-mode nftables")?;
            nft::apply(&self.nft, &tx).await?;
            *slot = Some(next);
        }
        Ok(())
    }

    /// Every sync reads the kernel's IPVS table before planning, so there is nothing to do here.
    async fn check_drift(&mut self) {}

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
