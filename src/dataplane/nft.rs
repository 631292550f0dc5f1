//! Runs one nftables batch through `nft -j -f -` (one kernel transaction: all or nothing). The
//! batch is built with the nftables crate's types; nft runs here rather than through the crate's
//! helper so that nft's own error message reaches the log.

use std::{path::Path, process::Stdio};

use anyhow::{Context, bail};
use svcplane_dataplane::nft::Transaction;
use tokio::{io::AsyncWriteExt, process::Command};

pub async fn apply(nft: &Path, tx: &Transaction) -> anyhow::Result<()> {
    let payload = serde_json::to_vec(&tx.0).context("serializing the nftables batch")?;
    let mut child = Command::new(nft)
        .args(["-j", "-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("running {}", nft.display()))?;
    let mut stdin = child.stdin.take().context("nft's stdin")?;
    stdin.write_all(&payload).await.context("writing to nft")?;
    drop(stdin);
    let out = child.wait_with_output().await.context("waiting for nft")?;
    if !out.status.success() {
        bail!(
            "{} refused the batch ({}): {}",
            nft.display(),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// Every table in the kernel as `(family, name)`.
pub async fn tables(nft: &Path) -> anyhow::Result<Vec<(String, String)>> {
    let out = Command::new(nft)
        .args(["-j", "list", "tables"])
        .stdin(Stdio::null())
        .output()
        .await
        .with_context(|| format!("running {}", nft.display()))?;
    if !out.status.success() {
        bail!(
            "{} list tables: {}",
            nft.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).context("parsing nft's table list")?;
    Ok(v.get("nftables")
        .and_then(serde_json::Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(|o| {
            let t = o.get("table")?;
            Some((
                t.get("family")?.as_str()?.to_owned(),
                t.get("name")?.as_str()?.to_owned(),
            ))
        })
        .collect())
}
