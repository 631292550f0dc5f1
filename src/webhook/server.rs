//! HTTPS for the admission webhook: rustls (ring) in front of an axum router, one task per
//! connection.
//!
//! The apiserver keeps one long-lived (HTTP/2) connection to a webhook Service, so without help
//! every admission request lands on whichever replica it first connected to, and a replica added
//! later never gets any. Each connection is therefore closed gracefully (GOAWAY, in-flight
//! requests finish) after a jittered maximum age, and the next one may go to another replica: the
//! same reasoning as kube-apiserver's `--goaway-chance`.

use std::{
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use anyhow::Context;
use axum::Router;
use hyper_util::{
    rt::{TokioExecutor, TokioIo},
    server::conn::auto::Builder,
    service::TowerToHyperService,
};
use rustls::{
    ServerConfig,
    pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject},
};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tracing::{debug, info, warn};

use super::certs::ServingCert;

pub fn tls_config(cert: &ServingCert) -> anyhow::Result<Arc<ServerConfig>> {
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(cert.cert_pem.as_bytes())
        .collect::<Result<_, _>>()
        .context("parsing the serving certificate")?;
    let key = PrivateKeyDer::from_pem_slice(cert.key_pem.as_bytes()).context("parsing the serving key")?;
    let mut config = ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .context("TLS versions")?
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .context("the serving certificate and key do not match")?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// A bound webhook listener (binding first makes a port clash fail start-up).
pub struct Listener(TcpListener);

pub async fn bind(addr: SocketAddr) -> anyhow::Result<Listener> {
    let listener = TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding the webhook address {addr}"))?;
    Ok(Listener(listener))
}

/// How a running server is wound down (see `drain`): `draining` closes the connections open at
/// that moment gracefully and gives later ones a short life; `stop` stops accepting. The time of
/// the last accepted connection tells the drain whether Service proxies still send new ones here.
#[derive(Clone)]
pub struct Control {
    pub draining: CancellationToken,
    pub stop: CancellationToken,
    last_accept: Arc<Mutex<Instant>>,
}

impl Control {
    pub fn new() -> Self {
        Self {
            draining: CancellationToken::new(),
            stop: CancellationToken::new(),
            last_accept: Arc::new(Mutex::new(Instant::now())),
        }
    }

    /// Time since a connection was last accepted.
    pub fn quiet_for(&self) -> Duration {
        self.last_accept
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .elapsed()
    }

    fn accepted(&self) {
        *self
            .last_accept
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Instant::now();
    }
}

/// A client that does not finish its TLS handshake in this time is dropped (the apiserver's
/// takes milliseconds), so that half-open connections neither pile up nor hold up a shutdown.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);

/// A connection accepted while draining serves briefly, then closes gracefully: its client may
/// send a request or two, and the next connection goes wherever the proxy now sends it.
const DRAINING_CONNECTION_AGE: Duration = Duration::from_secs(1);

/// Serves until `control.stop`; then stops accepting, closes every connection gracefully
/// (GOAWAY: the client sends its next request elsewhere, in-flight requests finish) and waits up
/// to `grace` for them.
pub async fn serve(
    Listener(listener): Listener,
    tls: Arc<ServerConfig>,
    router: Router,
    max_connection_age: Duration,
    control: Control,
    grace: Duration,
) -> anyhow::Result<()> {
    info!(addr = %listener.local_addr()?, "serving the admission webhook over HTTPS");
    let acceptor = TlsAcceptor::from(tls);
    let connections = TaskTracker::new();
    loop {
        let (tcp, peer) = tokio::select! {
            () = control.stop.cancelled() => break,
            r = listener.accept() => match r {
                Ok(c) => c,
                Err(e) => {
                    debug!(error = %e, "accept failed");
                    continue;
                }
            },
        };
        control.accepted();
        let acceptor = acceptor.clone();
        let router = router.clone();
        let control = control.clone();
        // Connections open when draining starts are closed then; later ones live briefly.
        let late = control.draining.is_cancelled();
        let age = if late {
            debug!(%peer, "connection while draining");
            DRAINING_CONNECTION_AGE
        } else {
            jittered(max_connection_age)
        };
        connections.spawn(async move {
            let tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                Ok(Ok(s)) => s,
                Ok(Err(e)) => {
                    debug!(%peer, error = %e, "TLS handshake failed");
                    return;
                }
                Err(_) => {
                    debug!(%peer, "TLS handshake timed out");
                    return;
                }
            };
            let builder = Builder::new(TokioExecutor::new());
            let conn = builder.serve_connection(TokioIo::new(tls), TowerToHyperService::new(router));
            tokio::pin!(conn);
            let expiry = tokio::time::sleep(age);
            tokio::pin!(expiry);
            let mut closing = false;
            loop {
                tokio::select! {
                    r = conn.as_mut() => {
                        if let Err(e) = r {
                            debug!(%peer, error = %e, "webhook connection ended with an error");
                        }
                        return;
                    }
                    () = &mut expiry, if !closing => {
                        closing = true;
                        conn.as_mut().graceful_shutdown();
                    }
                    () = control.draining.cancelled(), if !closing && !late => {
                        closing = true;
                        conn.as_mut().graceful_shutdown();
                    }
                    () = control.stop.cancelled(), if !closing => {
                        closing = true;
                        conn.as_mut().graceful_shutdown();
                    }
                }
            }
        });
    }
    drop(listener);
    connections.close();
    let open = connections.len();
    if tokio::time::timeout(grace, connections.wait()).await.is_err() {
        warn!(
            open = connections.len(),
            ?grace,
            "webhook connections still open after the grace period"
        );
    } else {
        info!(closed = open, "webhook connections closed");
    }
    Ok(())
}

/// `age` ± 10 %, so connections opened together are not all closed together.
fn jittered(age: Duration) -> Duration {
    age.mul_f64(rand::random_range(0.9..1.1))
}
