//! IPVS mode's I/O: the kernel's IPVS table over generic netlink ([`client`]), the dummy interface
//! carrying service addresses ([`link`]), and whether the kernel has IPVS at all ([`probe`]).

pub mod client;
pub mod link;
pub mod probe;

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
};

use anyhow::Context;
use svcplane_core::ObjectKey;
use svcplane_dataplane::{
    desired::DesiredState,
    ipvs::{
        index::Index,
        plan::{Op, VirtualServer, VsKey, plan, vip_addresses},
    },
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

/// What the IPVS backend knows of the kernel from one sync to the next: the virtual servers it
/// wants, the ones the kernel had after the last sync, and the dummy interface's addresses.
pub struct View {
    index: Index,
    kernel: BTreeSet<VsKey>,
    addresses: BTreeSet<IpAddr>,
}

/// Takes the node's IPVS table and dummy interface to `state`. With a `view` from the last sync
/// and the Services `changed` since, only their virtual servers are recomputed, read back and
/// planned; otherwise the whole table is read and planned (the sync period's full sync, which
/// also puts right what someone else changed). A failing operation (say, a scheduler the
/// kernel lacks) is logged and counted; the others still apply. On error the view is gone, and
/// the next sync is a full one.
pub async fn sync(
    state: &DesiredState,
    node_ips: &[IpAddr],
    scheduler: &str,
    view: &mut Option<View>,
    changed: Option<&BTreeSet<ObjectKey>>,
) -> anyhow::Result<Report> {
    ensure_conntrack();
    let known = view.take();
    let vips = vip_addresses(state);
    let (report, next) = match (known, changed) {
        (Some(mut v), Some(changed)) => {
            let affected = v.index.update(state, changed, node_ips, scheduler);
            let add: BTreeSet<IpAddr> = vips.difference(&v.addresses).copied().collect();
            let remove: BTreeSet<IpAddr> = v.addresses.difference(&vips).copied().collect();
            link::change_addresses(&add, &remove).await?;
            v.addresses = vips;
            let desired: BTreeMap<VsKey, VirtualServer> = affected
                .iter()
                .filter_map(|k| Some((*k, v.index.servers().get(k)?.clone())))
                .collect();
            let present: Vec<VsKey> = affected
                .iter()
                .filter(|k| v.kernel.contains(k))
                .copied()
                .collect();
            let entries = entries(v.index.servers());
            let (ops, failed, kernel) = tokio::task::spawn_blocking(move || -> anyhow::Result<_> {
                let mut client = connect()?;
                let observed = client
                    .observe_keys(&present)
                    .context("reading virtual servers back")?;
                // Every affected key was svcplane's (its index claimed it before or now).
                let ops = plan(&observed, &desired, |_| true);
                let failed = apply(&mut client, &ops, &mut v.kernel);
                Ok((ops, failed, v.kernel))
            })
            .await
            .context("the IPVS task")??;
            let report = Report {
                addresses_added: add.len(),
                addresses_removed: remove.len(),
                ops,
                failed,
                entries,
            };
            let next = View {
                index: v.index,
                kernel,
                addresses: v.addresses,
            };
            (report, next)
        }
        _ => {
            let (addresses_added, addresses_removed, before) = link::sync_addresses(&vips).await?;
            let index = Index::build(state, node_ips, scheduler);
            let entries = entries(index.servers());
            let mut owned: BTreeSet<IpAddr> = before;
            owned.extend(vips.iter().copied());
            owned.extend(node_ips.iter().copied());
            // The index travels to the blocking task and back: planning reads it, nothing copies it.
            let (ops, failed, kernel, index) = tokio::task::spawn_blocking(move || -> anyhow::Result<_> {
                let mut client = connect()?;
                let observed = client.observe().context("reading the IPVS table")?;
                let ops = plan(&observed, index.servers(), |k| owned.contains(&k.addr));
                let mut kernel = observed.into_keys().collect();
                let failed = apply(&mut client, &ops, &mut kernel);
                Ok((ops, failed, kernel, index))
            })
            .await
            .context("the IPVS task")??;
            let report = Report {
                addresses_added,
                addresses_removed,
                ops,
                failed,
                entries,
            };
            let next = View {
                index,
                kernel,
                addresses: vips,
            };
            (report, next)
        }
    };
    *view = Some(next);
    Ok(report)
}

/// Virtual servers plus real servers.
fn entries(servers: &BTreeMap<VsKey, VirtualServer>) -> usize {
    servers.values().map(|vs| 1 + vs.dests.len()).sum()
}

fn connect() -> anyhow::Result<client::IpvsClient> {
    client::IpvsClient::connect()
        .context("IPVS netlink socket")?
        .context("the kernel has no IPVS")
}

/// Carries out `ops`, keeping `kernel` (the virtual servers the kernel has) up to date; returns
/// how many the kernel refused.
fn apply(client: &mut client::IpvsClient, ops: &[Op], kernel: &mut BTreeSet<VsKey>) -> usize {
    let mut failed = 0;
    for op in ops {
        match client.apply(op) {
            Ok(()) => {
                debug!(?op, "IPVS updated");
                match op {
                    Op::AddService(k, ..) => {
                        kernel.insert(*k);
                    }
                    Op::DelService(k) => {
                        kernel.remove(k);
                    }
                    _ => {}
                }
            }
            Err(e) => {
                failed += 1;
                warn!(?op, error = %e, "IPVS refused an operation");
            }
        }
    }
    failed
}
