//! Builds the API client from a kubeconfig file or, when none is given, the in-cluster config.

use std::path::Path;

use anyhow::Context;
use kube::{
    Client, Config,
    client::ClientBuilder,
    config::{KubeConfigOptions, Kubeconfig},
};
use svcplane_controllers::leader::{Claim, FenceLayer, FencedExecutor};

pub async fn client(kubeconfig: Option<&Path>) -> anyhow::Result<Client> {
    plain(config(kubeconfig).await?)
}

/// A client from a loaded configuration (the controller-manager also builds a fenced one).
pub fn plain(config: Config) -> anyhow::Result<Client> {
    Client::try_from(config).context("building the Kubernetes client")
}

/// A client for the leader's work: its writes are sent only while `claim` holds, and its
/// connections carry nothing once it has lapsed.
pub fn fenced(config: Config, claim: Claim) -> anyhow::Result<Client> {
    Ok(
        ClientBuilder::try_from((config, FencedExecutor::new(claim.clone())))
            .context("building the Kubernetes client")?
            .with_layer(&FenceLayer::new(claim))
            .build(),
    )
}

pub async fn config(kubeconfig: Option<&Path>) -> anyhow::Result<Config> {
    Ok(match kubeconfig {
        Some(path) => {
            let kc = Kubeconfig::read_from(path)
                .with_context(|| format!("reading kubeconfig {}", path.display()))?;
            Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
                .await
                .with_context(|| format!("loading kubeconfig {}", path.display()))?
        }
        None => Config::incluster().context("no --kubeconfig given and not running in a cluster")?,
    })
}
