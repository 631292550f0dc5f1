//! IPVS mode's I/O: the kernel's IPVS table over generic netlink ([`client`]), the dummy interface
//! carrying service addresses ([`link`]), and whether the kernel has IPVS at all ([`probe`]).

pub mod client;
pub mod link;
pub mod probe;

use std::{collections::BTreeSet, net::IpAddr};

use anyhow::Context;
use svcplane_dataplane::{
    desired::DesiredState,
    ipvs::plan::{Op, plan, vip_addresses, virtual_servers},
};
use tracing::{debug, warn};

const VS_CONNTRACK: &str = "/proc/sys/net/ipv4/vs/conntrack";

/// Masquerading IPVS-forwarded connections needs conntrack to follow them
/// (`net.ipv4.vs.conntrack=1`, as kube-proxy sets). The file appears once `ip_vs` is loaded, so
/// this is checked on every sync.
fn ensure_conntrack() {
    match std::fs::read_to_string(VS_CONNTRACK) {
        Ok(v) if v.trim() == "1" => {}
        Ok(_) => {
            if let Err(e) = std::fs::write(VS_CONNTRACK, "1") {
                warn!(error = %e, "cannot set net.ipv4.vs.conntrack=1 (in a container, `svcplane dataplane-init` sets it); node-port traffic is not masqueraded");
            }
        }
        Err(e) => warn!(error = %e, "cannot read net.ipv4.vs.conntrack"),
    }
}

/// What one IPVS sync did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Report {
    pub addresses_added: usize,
    pub addresses_removed: usize,
    pub ops: Vec<Op>,
    pub failed: usize,
    /// Virtual servers plus real servers the node should hold after this sync.
    pub entries: usize,
}

/// Takes the node's IPVS table and dummy interface to `state`. A failing operation (say, a
/// scheduler the kernel lacks) is logged and counted; the others still apply.
pub async fn sync(state: &DesiredState, node_ips: &[IpAddr], scheduler: &str) -> anyhow::Result<Report> {
    ensure_conntrack();
    let vips = vip_addresses(state);
    let (addresses_added, addresses_removed, before) = link::sync_addresses(&vips).await?;
    let desired = virtual_servers(state, node_ips, scheduler);
    let entries = desired.values().map(|vs| 1 + vs.dests.len()).sum();
    let mut owned: BTreeSet<IpAddr> = before;
    owned.extend(vips.iter().copied());
    owned.extend(node_ips.iter().copied());
    tokio::task::spawn_blocking(move || {
        let mut client = client::IpvsClient::connect()
            .context("IPVS netlink socket")?
            .context("the kernel has no IPVS")?;
        let observed = client.observe().context("reading the IPVS table")?;
        let ops = plan(&observed, &desired, |k| owned.contains(&k.addr));
        let mut failed = 0;
        for op in &ops {
            match client.apply(op) {
                Ok(()) => debug!(?op, "IPVS updated"),
                Err(e) => {
                    failed += 1;
                    warn!(?op, error = %e, "IPVS refused an operation");
                }
            }
        }
        Ok(Report {
            addresses_added,
            addresses_removed,
            ops,
            failed,
            entries,
        })
    })
    .await
    .context("the IPVS task")?
}
