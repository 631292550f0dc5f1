//! The dummy interface that makes the node accept traffic for service addresses in IPVS mode
//! (kube-proxy's `kube-ipvs0`), through rtnetlink.

use std::{collections::BTreeSet, net::IpAddr};

use anyhow::{Context, anyhow};
use futures::TryStreamExt;
use rtnetlink::{
    AddressMessageBuilder, Handle, LinkDummy,
    packet_route::address::{AddressAttribute, AddressMessage},
};
use tracing::info;

pub const LINK: &str = "svcplane-ipvs0";

/// The link's index, if it exists.
async fn find_link(handle: &Handle) -> Option<u32> {
    handle
        .link()
        .get()
        .match_name(LINK.to_owned())
        .execute()
        .try_next()
        .await
        .ok()
        .flatten()
        .map(|l| l.header.index)
}

/// The link's index, creating it when missing.
async fn ensure_link(handle: &Handle) -> anyhow::Result<u32> {
    if let Some(index) = find_link(handle).await {
        return Ok(index);
    }
    handle
        .link()
        .add(LinkDummy::new(LINK).build())
        .execute()
        .await
        .map_err(|e| anyhow!("creating {LINK}: {e}"))?;
    info!(link = LINK, "created the dummy interface for service addresses");
    find_link(handle)
        .await
        .context("the dummy interface vanished after creation")
}

/// Makes the dummy interface carry exactly `wanted` (host routes: /32 and /128). Returns how many
/// were added and removed, and what it carried before.
pub async fn sync_addresses(wanted: &BTreeSet<IpAddr>) -> anyhow::Result<(usize, usize, BTreeSet<IpAddr>)> {
    let (conn, handle, _) = rtnetlink::new_connection().context("rtnetlink socket")?;
    let task = tokio::spawn(conn);
    let result = async {
        let index = ensure_link(&handle).await?;
        let mut current = Vec::new();
        let mut stream = handle.address().get().set_link_index_filter(index).execute();
        while let Some(msg) = stream
            .try_next()
            .await
            .map_err(|e| anyhow!("listing addresses: {e}"))?
        {
            let ip = msg.attributes.iter().find_map(|a| match a {
                AddressAttribute::Address(ip) => Some(*ip),
                _ => None,
            });
            if let Some(ip) = ip {
                current.push((ip, msg));
            }
        }
        let have: BTreeSet<IpAddr> = current.iter().map(|(ip, _)| *ip).collect();
        let added = add_addresses(&handle, index, wanted.difference(&have)).await?;
        let mut removed = 0;
        for (ip, msg) in current {
            if !wanted.contains(&ip) {
                handle
                    .address()
                    .del(msg)
                    .execute()
                    .await
                    .map_err(|e| anyhow!("removing {ip} from {LINK}: {e}"))?;
                removed += 1;
            }
        }
        Ok((added, removed, have))
    }
    .await;
    task.abort();
    result
}

/// Adds `add` to the dummy interface and removes `remove` from it, without listing what it
/// carries (the caller knows: at 10,000 Services the listing costs more than the change).
pub async fn change_addresses(add: &BTreeSet<IpAddr>, remove: &BTreeSet<IpAddr>) -> anyhow::Result<()> {
    if add.is_empty() && remove.is_empty() {
        return Ok(());
    }
    let (conn, handle, _) = rtnetlink::new_connection().context("rtnetlink socket")?;
    let task = tokio::spawn(conn);
    let result = async {
        let index = ensure_link(&handle).await?;
        add_addresses(&handle, index, add).await?;
        for ip in remove {
            handle
                .address()
                .del(address_message(index, *ip))
                .execute()
                .await
                .map_err(|e| anyhow!("removing {ip} from {LINK}: {e}"))?;
        }
        Ok(())
    }
    .await;
    task.abort();
    result
}

/// Adds host addresses `ips` to link `index`; returns how many.
async fn add_addresses(
    handle: &Handle,
    index: u32,
    ips: impl IntoIterator<Item = &IpAddr>,
) -> anyhow::Result<usize> {
    let mut added = 0;
    for ip in ips {
        handle
            .address()
            .add(index, *ip, host_prefix(ip))
            .execute()
            .await
            .map_err(|e| anyhow!("adding {ip} to {LINK}: {e}"))?;
        added += 1;
    }
    Ok(added)
}

fn host_prefix(ip: &IpAddr) -> u8 {
    if ip.is_ipv6() { 128 } else { 32 }
}

/// The message naming host address `ip` on link `index`, as an add would carry it.
fn address_message(index: u32, ip: IpAddr) -> AddressMessage {
    match ip {
        IpAddr::V4(v4) => AddressMessageBuilder::<std::net::Ipv4Addr>::new()
            .index(index)
            .address(v4, 32)
            .build(),
        IpAddr::V6(v6) => AddressMessageBuilder::<std::net::Ipv6Addr>::new()
            .index(index)
            .address(v6, 128)
            .build(),
    }
}

/// Removes the dummy interface (cleanup).
pub async fn remove() -> anyhow::Result<bool> {
    let (conn, handle, _) = rtnetlink::new_connection().context("rtnetlink socket")?;
    let task = tokio::spawn(conn);
    let result = async {
        let Some(index) = find_link(&handle).await else {
            return Ok(false);
        };
        handle
            .link()
            .del(index)
            .execute()
            .await
            .map_err(|e| anyhow!("deleting {LINK}: {e}"))?;
        Ok(true)
    }
    .await;
    task.abort();
    result
}
