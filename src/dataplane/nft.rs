//! Runs one nftables batch through `nft -j -f -` (one kernel transaction: all or nothing).

use std::path::Path;

use anyhow::{Context, anyhow};
use nftables::helper::{NftablesError, apply_ruleset_raw};
use svcplane_controllers::dataplane::nft::Transaction;

pub async fn apply(nft: &Path, tx: &Transaction) -> anyhow::Result<()> {
    let payload = serde_json::to_string(&tx.0).context("serializing the nftables batch")?;
    let program = nft.to_path_buf();
    tokio::task::spawn_blocking(move || {
        apply_ruleset_raw(&payload, Some(&program), std::iter::empty::<&str>())
    })
    .await
    .context("the nft task")?
    .map(|_| ())
    .map_err(|e| match e {
        // The crate's message leaves out what nft said.
        NftablesError::NftFailed { program, stderr, .. } => {
            anyhow!(
                "{} refused the batch: {}",
                program.to_string_lossy(),
                stderr.trim()
            )
        }
        other => anyhow!(other),
    })
}
