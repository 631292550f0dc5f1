//! Builds the API client from a kubeconfig file or, when none is given, the in-cluster config.

use std::path::Path;

use anyhow::{Context, bail};
use hyper_timeout::TimeoutConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use kube::{
    Client, Config,
    client::{ClientBuilder, ConfigExt, retry::RetryPolicy},
    config::{KubeConfigOptions, Kubeconfig},
};
use svcplane_controllers::leader::{Claim, FenceLayer, FencedConnector, FencedExecutor};
use tower::{ServiceBuilder, retry::RetryLayer};

pub async fn client(kubeconfig: Option<&Path>) -> anyhow::Result<Client> {
    plain(config(kubeconfig).await?)
}

/// A client from a loaded configuration (the controller-manager also builds a fenced one).
pub fn plain(config: Config) -> anyhow::Result<Client> {
    Client::try_from(config).context("building the Kubernetes client")
}

/// A client for the leader's work: its requests are sent only while `claim` holds, and its
/// connections carry nothing once it has lapsed (`svcplane_controllers::leader` explains the
/// three checks).
///
/// kube's default stack, built by hand because its TCP connector cannot be replaced: the socket
/// check has to sit under TLS, and the request check under the retries, so that a request
/// retried after a pause is checked again.
pub fn fenced(config: Config, claim: Claim) -> anyhow::Result<Client> {
    if let Some(proxy) = &config.proxy_url {
        bail!(
            "the leader's client cannot go through a proxy ({proxy}, from the kubeconfig's proxy-url or HTTPS_PROXY)"
        );
    }
    let mut tcp = HttpConnector::new();
    tcp.enforce_http(false);
    let tls = config
        .rustls_https_connector_with_connector(FencedConnector::new(tcp, claim.clone()))
        .context("building the TLS connector")?;
    let mut connector = TimeoutConnector::new(tls);
    connector.set_connect_timeout(config.connect_timeout);
    connector.set_read_timeout(config.read_timeout);
    connector.set_write_timeout(config.write_timeout);
    connector.set_reset_reader_on_write(config.reset_reader_on_write);
    let http = hyper_util::client::legacy::Builder::new(FencedExecutor::new(claim.clone())).build(connector);
    let service = ServiceBuilder::new()
        .layer(config.base_uri_layer())
        .option_layer(
            config
                .default_retry
                .then(|| RetryLayer::new(RetryPolicy::server_retry())),
        )
        .option_layer(
            config
                .auth_layer()
                .context("building the client's authentication")?,
        )
        .layer(
            config
                .extra_headers_layer()
                .context("building the client's headers")?,
        )
        .layer(FenceLayer::new(claim))
        .service(http);
    Ok(ClientBuilder::new(service, config.default_namespace).build())
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

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> Config {
        Config::new("https://127.0.0.1:6443".parse().expect("a URL"))
    }

    #[tokio::test]
    async fn the_leader_client_builds_from_a_configuration_without_a_proxy() {
        assert!(fenced(config(), Claim::unconditional()).is_ok());
    }

    #[tokio::test]
    async fn the_leader_client_refuses_a_proxy_with_a_clear_error() {
        let mut config = config();
        config.proxy_url = Some("http://proxy.example:3128".parse().expect("a URL"));
        let err = fenced(config, Claim::unconditional()).err().expect("refused");
        assert!(
            format!("{err:#}").contains("cannot go through a proxy"),
            "{err:#}"
        );
    }
}
