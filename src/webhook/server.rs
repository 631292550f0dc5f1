//! HTTPS for the admission webhook: rustls (ring) in front of an axum router, one task per
//! connection.
//!
//! The apiserver keeps one long-lived (HTTP/2) connection to a webhook Service, so without help
//! every admission request lands on whichever replica it first connected to, and a replica added
//! later never gets any. Each connection is therefore closed gracefully (GOAWAY, in-flight
//! requests finish) after a jittered maximum age, and the next one may go to another replica: the
//! same reasoning as kube-apiserver's `--goaway-chance`.

use std::{
    io,
    net::SocketAddr,
    pin::Pin,
    sync::{Arc, Mutex},
    task::{self, Poll},
    time::{Duration, Instant},
};

use anyhow::Context;
use axum::Router;
use hyper::body::Incoming;
use hyper_util::{
    rt::{TokioExecutor, TokioIo, TokioTimer},
    server::conn::auto::Builder,
    service::TowerToHyperService,
};
use prometheus::{IntCounterVec, Opts, Registry};
use rustls::{
    RootCertStore, ServerConfig,
    pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject},
    server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier},
    sign::CertifiedKey,
};
use svcplane_core::metrics::registered;
use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf},
    net::{TcpListener, TcpStream},
    sync::{OwnedSemaphorePermit, Semaphore, oneshot, watch},
};
use tokio_rustls::TlsAcceptor;
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tower::ServiceExt;
use tracing::{Instrument, debug, info, warn};

use super::certs::ServingCert;

/// The certificate served, replaceable while serving (renewal): each handshake takes the one
/// current then.
#[derive(Debug)]
pub struct ServingKeys(std::sync::RwLock<Arc<CertifiedKey>>);

impl ServingKeys {
    pub fn new(cert: &ServingCert) -> anyhow::Result<Arc<Self>> {
        Ok(Arc::new(Self(std::sync::RwLock::new(Arc::new(certified(cert)?)))))
    }

    /// Serves `cert` from the next handshake on.
    pub fn replace(&self, cert: &ServingCert) -> anyhow::Result<()> {
        let next = Arc::new(certified(cert)?);
        *self.0.write().unwrap_or_else(std::sync::PoisonError::into_inner) = next;
        Ok(())
    }
}

impl ResolvesServerCert for ServingKeys {
    fn resolve(&self, _: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(
            self.0
                .read()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .clone(),
        )
    }
}

fn certified(cert: &ServingCert) -> anyhow::Result<CertifiedKey> {
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(cert.cert_pem.as_bytes())
        .collect::<Result<_, _>>()
        .context("parsing the serving certificate")?;
    let key = PrivateKeyDer::from_pem_slice(cert.key_pem.as_bytes()).context("parsing the serving key")?;
    let signing = rustls::crypto::ring::default_provider()
        .key_provider
        .load_private_key(key)
        .context("loading the serving key")?;
    let certified = CertifiedKey::new(chain, signing);
    certified
        .keys_match()
        .context("the serving certificate and key do not match")?;
    Ok(certified)
}

/// The server's TLS: the certificate `keys` holds, and with `client_ca` (PEM) only clients
/// presenting a certificate that CA signed are served (the apiserver, configured through its
/// AdmissionConfiguration; a CA of its own, since any certificate it signed gets in).
pub fn tls_config(keys: Arc<ServingKeys>, client_ca: Option<&str>) -> anyhow::Result<Arc<ServerConfig>> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .context("TLS versions")?;
    let builder = match client_ca {
        None => builder.with_no_client_auth(),
        Some(pem) => {
            let mut roots = RootCertStore::empty();
            for c in CertificateDer::pem_slice_iter(pem.as_bytes()) {
                roots
                    .add(c.context("parsing the client CA")?)
                    .context("the client CA is not a usable certificate")?;
            }
            if roots.is_empty() {
                anyhow::bail!("the client CA file holds no certificate");
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                .build()
                .context("building the client certificate verifier")?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let mut config = builder.with_cert_resolver(keys);
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
/// that moment gracefully and gives later ones a short life; `stop` closes all of them and ends
/// the server once they are gone (see [`Server::serve`]). The time of
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

/// A connection that has carried no request this long after its handshake is dropped (the
/// apiserver sends one right after it), so idle connections cannot hold the server's slots; one
/// asked to close meanwhile waits for that first request until then.
const FIRST_REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// Once hyper has closed a connection (after its last response and the TLS close_notify: see
/// [`linger`]), how long at most the socket stays open for the client to read to the end and
/// close its side. A Go client closes as soon as it has read everything, normally within
/// milliseconds; more than Go's own HTTP/2 server waits (1 s, `goAwayTimeout`, golang/go#18701)
/// for a client still reading a backlog of responses queued in the kernel.
const LINGER: Duration = Duration::from_secs(5);

/// Connections served at once; more wait in the kernel's accept queue. The apiserver needs a
/// few per replica.
const MAX_CONNECTIONS: usize = 512;

/// An HTTP/1.1 client has this long to send a request's headers.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);

/// HTTP/2 connections are pinged this often when quiet, and closed when a ping goes unanswered
/// for the timeout: a peer that vanished (a node gone) does not hold its slot.
const KEEP_ALIVE_INTERVAL: Duration = Duration::from_secs(30);
const KEEP_ALIVE_TIMEOUT: Duration = Duration::from_secs(10);

/// The webhook server: what it serves and how its connections are wound down.
pub struct Server {
    pub tls: Arc<ServerConfig>,
    pub router: Router,
    /// Connections are closed gracefully after about this long (see the module header).
    pub max_connection_age: Duration,
    /// After `stop`, how long in-flight requests and open connections have to finish.
    pub grace: Duration,
    pub metrics: ConnectionMetrics,
}

/// How the webhook's connections ended, by outcome: `served` (carried at least one request),
/// `no_request`, `tls_failed`, `tls_timeout`. Failed handshakes are how a CA the apiserver does
/// not trust, or a client that is not the apiserver, shows on this side.
#[derive(Clone)]
pub struct ConnectionMetrics(IntCounterVec);

impl ConnectionMetrics {
    pub fn register(registry: &Registry) -> prometheus::Result<Self> {
        registered(
            registry,
            IntCounterVec::new(
                Opts::new(
                    "svcplane_allocation_webhook_connections_total",
                    "Connections to the admission webhook by how they ended",
                ),
                &["outcome"],
            )?,
        )
        .map(Self)
    }

    fn ended(&self, outcome: &str) {
        self.0.with_label_values(&[outcome]).inc();
    }
}

impl Server {
    /// Serves until `control.stop`; then closes every connection gracefully (GOAWAY: the
    /// client sends its next request elsewhere, in-flight requests finish) and waits up to
    /// `grace` for them. The listener stays open meanwhile: a connection a proxy routed here at
    /// the last moment is served and told to go elsewhere, where a closed listener would reset
    /// it (and with it the admission request it carries).
    pub async fn serve(self, Listener(listener): Listener, control: Control) -> anyhow::Result<()> {
        info!(addr = %listener.local_addr()?, "serving the admission webhook over HTTPS");
        let acceptor = TlsAcceptor::from(self.tls.clone());
        let connections = TaskTracker::new();
        let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
        let spawn = |tcp: TcpStream, peer: SocketAddr, slot: OwnedSemaphorePermit| {
            // Connections open when draining starts are closed then; later ones live briefly.
            let late = control.draining.is_cancelled();
            let age = if late {
                debug!(%peer, "connection while draining");
                DRAINING_CONNECTION_AGE
            } else {
                jittered(self.max_connection_age)
            };
            let conn = Connection {
                peer,
                age,
                late,
                control: control.clone(),
                metrics: self.metrics.clone(),
            };
            let (acceptor, router) = (acceptor.clone(), self.router.clone());
            connections.spawn(
                async move {
                    conn.run(acceptor, tcp, router).await;
                    drop(slot);
                }
                .instrument(tracing::debug_span!("webhook_conn", %peer)),
            );
        };
        loop {
            let slot = tokio::select! {
                () = control.stop.cancelled() => break,
                slot = slots.clone().acquire_owned() => slot?,
            };
            tokio::select! {
                () = control.stop.cancelled() => break,
                r = listener.accept() => match r {
                    Ok((tcp, peer)) => {
                        control.accepted();
                        spawn(tcp, peer, slot);
                    }
                    Err(e) => debug!(error = %e, "accept failed"),
                },
            }
        }
        connections.close();
        let open = connections.len();
        let deadline = tokio::time::Instant::now() + self.grace;
        let mut after_stop = 0_usize;
        loop {
            tokio::select! {
                () = connections.wait() => {
                    info!(open, after_stop, "webhook connections closed");
                    break;
                }
                () = tokio::time::sleep_until(deadline) => {
                    warn!(open = connections.len(), grace = ?self.grace, "webhook connections still open after the grace period");
                    break;
                }
                r = listener.accept() => match (r, slots.clone().try_acquire_owned()) {
                    (Ok((tcp, peer)), Ok(slot)) => {
                        after_stop += 1;
                        spawn(tcp, peer, slot);
                    }
                    (Ok(_), Err(_)) => debug!("connection limit reached while stopping; connection dropped"),
                    (Err(e), _) => debug!(error = %e, "accept failed"),
                },
            }
        }
        Ok(())
    }
}

/// One accepted connection and when it is to close.
struct Connection {
    peer: SocketAddr,
    age: Duration,
    /// Accepted while draining: not closed by the start of the drain, only by its short age.
    late: bool,
    control: Control,
    metrics: ConnectionMetrics,
}

impl Connection {
    async fn run(self, acceptor: TlsAcceptor, tcp: TcpStream, router: Router) {
        let peer = self.peer;
        let (tcp, handed_back) = HandBack::new(tcp);
        let tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => {
                debug!(%peer, error = %e, "TLS handshake failed");
                self.metrics.ended("tls_failed");
                return;
            }
            Err(_) => {
                debug!(%peer, "TLS handshake timed out");
                self.metrics.ended("tls_timeout");
                return;
            }
        };
        if self.serve(tls, router).await == Ended::ByHyper {
            // The TLS stream and hyper's connection are gone: the socket is ours again.
            if let Ok(tcp) = handed_back.await {
                linger(tcp, peer).await;
            }
        }
    }

    /// HTTP over the connection until hyper ends it (or the client sends no request).
    async fn serve(&self, tls: tokio_rustls::server::TlsStream<HandBack>, router: Router) -> Ended {
        let peer = self.peer;
        // Set by the connection's first request. Before it, a graceful shutdown is no GOAWAY:
        // hyper has not read the client's preface yet and simply drops the connection, failing
        // the request the client sends right after its handshake. So a close asked for earlier
        // waits for that request (or gives up on a client that sends none).
        let first = Arc::new(watch::Sender::new(false));
        let mut served = first.subscribe();
        let service = {
            let first = first.clone();
            router.map_request(move |req: http::Request<Incoming>| {
                first.send_if_modified(|seen| !std::mem::replace(seen, true));
                req
            })
        };
        let mut builder = Builder::new(TokioExecutor::new());
        builder
            .http1()
            .timer(TokioTimer::new())
            .header_read_timeout(HEADER_READ_TIMEOUT);
        builder
            .http2()
            .timer(TokioTimer::new())
            .keep_alive_interval(KEEP_ALIVE_INTERVAL)
            .keep_alive_timeout(KEEP_ALIVE_TIMEOUT);
        let conn = builder.serve_connection(TokioIo::new(tls), TowerToHyperService::new(service));
        tokio::pin!(conn);
        let expiry = tokio::time::sleep(self.age);
        tokio::pin!(expiry);
        let give_up = tokio::time::sleep(FIRST_REQUEST_TIMEOUT);
        tokio::pin!(give_up);
        let (mut asked, mut closing, mut has_request) = (false, false, false);
        loop {
            let close = tokio::select! {
                r = conn.as_mut() => {
                    if let Err(e) = r {
                        debug!(%peer, error = %e, "webhook connection ended with an error");
                    }
                    let outcome = if *first.borrow() { "served" } else { "no_request" };
                    debug!(%peer, outcome, "connection ended");
                    self.metrics.ended(outcome);
                    return Ended::ByHyper;
                }
                r = served.wait_for(|s| *s), if !has_request => {
                    // An error means the service is gone with the connection: nothing to wait for.
                    drop(r);
                    has_request = true;
                    false
                }
                () = &mut give_up, if !has_request => {
                    debug!(%peer, "no request on the connection in time");
                    self.metrics.ended("no_request");
                    return Ended::NoRequest;
                }
                () = &mut expiry, if !asked => true,
                () = self.control.draining.cancelled(), if !asked && !self.late => true,
                () = self.control.stop.cancelled(), if !asked => true,
            };
            if close {
                asked = true;
            }
            if asked && has_request && !closing {
                closing = true;
                debug!(%peer, "graceful shutdown");
                conn.as_mut().graceful_shutdown();
            }
        }
    }
}

#[derive(PartialEq)]
enum Ended {
    /// hyper closed the connection (after its GOAWAY and last response, or the client's end).
    ByHyper,
    /// The client sent no request in time: dropped.
    NoRequest,
}

/// Keeps a closed connection's socket open until the client has closed its side (or for
/// [`LINGER`]), reading and discarding what it still sends.
///
/// hyper (h2) ends an HTTP/2 connection as soon as its last stream is answered after a GOAWAY:
/// it writes the responses, the TLS close_notify and a FIN, and the future returns. Dropping the
/// socket then closes it for reading too, while the client is still reading those responses and
/// answering them: a WINDOW_UPDATE for every body it consumes, RST_STREAMs, its own close_notify.
/// Whatever of that arrives after the close makes the kernel reset the connection: a response
/// still in our send queue is discarded, and the client sees a reset before it has read the
/// responses to streams the GOAWAY promised to answer. Go's transport then fails them with
/// `http2: server sent GOAWAY and closed the connection` (a read error after a GOAWAY), or, when
/// one of its writes hits the reset first, closes the connection and fails them all with
/// `http2: client connection force closed via ClientConn.Close`; the apiserver retries neither.
async fn linger(mut tcp: TcpStream, peer: SocketAddr) {
    // hyper has normally sent the FIN already; if not (an error), send it now.
    let _ = tcp.shutdown().await;
    let started = Instant::now();
    let mut buf = [0_u8; 4096];
    let drained = tokio::time::timeout(LINGER, async {
        loop {
            match tcp.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(_) => {}
            }
        }
    })
    .await;
    if drained.is_err() {
        debug!(%peer, "client did not close the connection after it ended; closing");
    } else {
        debug!(%peer, lingered = ?started.elapsed(), "client closed the connection");
    }
}

/// The TCP stream under the TLS stream hyper serves, handed back through a channel when they
/// drop it (hyper gives no I/O back from an HTTP/2 connection), so that it can [`linger`].
struct HandBack {
    tcp: Option<TcpStream>,
    back: Option<oneshot::Sender<TcpStream>>,
}

impl HandBack {
    fn new(tcp: TcpStream) -> (Self, oneshot::Receiver<TcpStream>) {
        let (back, handed_back) = oneshot::channel();
        (
            Self {
                tcp: Some(tcp),
                back: Some(back),
            },
            handed_back,
        )
    }

    fn tcp(self: Pin<&mut Self>) -> Pin<&mut TcpStream> {
        Pin::new(self.get_mut().tcp.as_mut().expect("present until dropped"))
    }
}

impl Drop for HandBack {
    fn drop(&mut self) {
        if let (Some(tcp), Some(back)) = (self.tcp.take(), self.back.take()) {
            // Nobody waiting (the connection was not ended by hyper): the socket just closes.
            drop(back.send(tcp));
        }
    }
}

impl AsyncRead for HandBack {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut task::Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        self.tcp().poll_read(cx, buf)
    }
}

impl AsyncWrite for HandBack {
    fn poll_write(self: Pin<&mut Self>, cx: &mut task::Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        self.tcp().poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut task::Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        self.tcp().poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.tcp.as_ref().is_some_and(AsyncWrite::is_write_vectored)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut task::Context<'_>) -> Poll<io::Result<()>> {
        self.tcp().poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut task::Context<'_>) -> Poll<io::Result<()>> {
        self.tcp().poll_shutdown(cx)
    }
}

/// `age` ± 10 %, so connections opened together are not all closed together.
fn jittered(age: Duration) -> Duration {
    age.mul_f64(rand::random_range(0.9..1.1))
}

#[cfg(test)]
mod tests {
    //! The server's connection handling against a real HTTP/2 client over TLS on loopback, as
    //! the apiserver calls it: the shutdown races a rollout goes through, made deterministic.

    use super::*;
    use crate::webhook::certs;
    use http::StatusCode;
    use rustls::{ClientConfig, RootCertStore, pki_types::ServerName};
    use tokio::task::JoinHandle;
    use tokio_rustls::{TlsConnector, client::TlsStream};

    struct Running {
        addr: SocketAddr,
        control: Control,
        metrics: ConnectionMetrics,
        ca_pem: String,
        task: JoinHandle<anyhow::Result<()>>,
    }

    async fn start() -> Running {
        start_with(None).await
    }

    /// A server; with `client_ca`, one that verifies client certificates against it.
    async fn start_with(client_ca: Option<&str>) -> Running {
        let cert = certs::generate(&["127.0.0.1".into()]).unwrap();
        let metrics = ConnectionMetrics::register(&Registry::new()).unwrap();
        let listener = bind("127.0.0.1:0".parse().unwrap()).await.unwrap();
        let addr = listener.0.local_addr().unwrap();
        let control = Control::new();
        let server = Server {
            tls: tls_config(ServingKeys::new(&cert).unwrap(), client_ca).unwrap(),
            router: Router::new().route("/mutate-services", axum::routing::post(|| async { "ok" })),
            max_connection_age: Duration::from_secs(120),
            grace: Duration::from_secs(10),
            metrics: metrics.clone(),
        };
        let task = tokio::spawn(server.serve(listener, control.clone()));
        Running {
            addr,
            control,
            metrics,
            ca_pem: cert.ca_pem,
            task,
        }
    }

    impl Running {
        /// A TLS connection negotiated for HTTP/2, as the apiserver's client opens one.
        async fn connect(&self) -> std::io::Result<TlsStream<TcpStream>> {
            self.connect_as(None).await
        }

        /// The same, presenting `identity` (certificate and key, PEM) when given.
        async fn connect_as(
            &self,
            identity: Option<&ClientIdentity>,
        ) -> std::io::Result<TlsStream<TcpStream>> {
            let tcp = TcpStream::connect(self.addr).await?;
            let name = ServerName::try_from("127.0.0.1").unwrap();
            TlsConnector::from(self.client_config(identity))
                .connect(name, tcp)
                .await
        }

        /// A client's TLS configuration, trusting the server's CA and offering HTTP/2.
        fn client_config(&self, identity: Option<&ClientIdentity>) -> Arc<ClientConfig> {
            let mut roots = RootCertStore::empty();
            for c in CertificateDer::pem_slice_iter(self.ca_pem.as_bytes()) {
                roots.add(c.unwrap()).unwrap();
            }
            let builder =
                ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
                    .with_safe_default_protocol_versions()
                    .unwrap()
                    .with_root_certificates(roots);
            let mut config = match identity {
                None => builder.with_no_client_auth(),
                Some(id) => builder
                    .with_client_auth_cert(
                        CertificateDer::pem_slice_iter(id.cert_pem.as_bytes())
                            .map(Result::unwrap)
                            .collect(),
                        PrivateKeyDer::from_pem_slice(id.key_pem.as_bytes()).unwrap(),
                    )
                    .unwrap(),
            };
            config.alpn_protocols = vec![b"h2".to_vec()];
            Arc::new(config)
        }

        fn ended(&self, outcome: &str) -> u64 {
            self.metrics.0.with_label_values(&[outcome]).get()
        }

        /// The server's task ends (it does after `stop`, once its connections have closed).
        async fn stopped(self) -> Self {
            let Self {
                addr,
                control,
                metrics,
                ca_pem,
                task,
            } = self;
            tokio::time::timeout(FIRST_REQUEST_TIMEOUT + Duration::from_secs(5), task)
                .await
                .expect("the server stops")
                .unwrap()
                .unwrap();
            Self {
                addr,
                control,
                metrics,
                ca_pem,
                task: tokio::spawn(async { Ok(()) }),
            }
        }
    }

    /// An HTTP/2 connection over `tls`, and the task driving it (it ends when the server closes
    /// the connection).
    async fn h2(
        tls: TlsStream<TcpStream>,
    ) -> hyper::Result<(
        hyper::client::conn::http2::SendRequest<String>,
        JoinHandle<hyper::Result<()>>,
    )> {
        let (sender, conn) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tls)).await?;
        Ok((sender, tokio::spawn(conn)))
    }

    async fn send(sender: &mut hyper::client::conn::http2::SendRequest<String>) -> hyper::Result<StatusCode> {
        let req = http::Request::post("https://127.0.0.1/mutate-services")
            .body(String::from("{}"))
            .unwrap();
        Ok(sender.send_request(req).await?.status())
    }

    /// The client's side of the connection ends (the server closed it) within a few seconds.
    async fn closed(conn: JoinHandle<hyper::Result<()>>) {
        tokio::time::timeout(Duration::from_secs(5), conn)
            .await
            .expect("the server closes the connection")
            .unwrap()
            .unwrap();
    }

    /// Let the server's connection tasks see what just changed.
    async fn settle() {
        tokio::time::sleep(Duration::from_millis(300)).await;
    }

    #[tokio::test]
    async fn a_connection_made_just_before_stop_serves_its_request_then_closes() {
        let server = start().await;
        // Connected and through the TLS handshake, but its request not yet sent (the apiserver
        // sends it right after) when the replica stops accepting.
        let tls = server.connect().await.unwrap();
        server.control.stop.cancel();
        settle().await;
        let (mut sender, conn) = h2(tls).await.unwrap();
        assert_eq!(send(&mut sender).await.unwrap(), StatusCode::OK);
        closed(conn).await;
        let server = server.stopped().await;
        assert_eq!(server.ended("served"), 1);
    }

    #[tokio::test]
    async fn connections_arriving_after_stop_are_served_while_others_finish() {
        let server = start().await;
        let first = server.connect().await.unwrap();
        server.control.stop.cancel();
        settle().await;
        // A proxy routes one more connection here after the stop: served, not reset.
        let late = server.connect().await.unwrap();
        let (mut late, late_conn) = h2(late).await.unwrap();
        assert_eq!(send(&mut late).await.unwrap(), StatusCode::OK);
        let (mut first, first_conn) = h2(first).await.unwrap();
        assert_eq!(send(&mut first).await.unwrap(), StatusCode::OK);
        closed(late_conn).await;
        closed(first_conn).await;
        let server = server.stopped().await;
        assert_eq!(server.ended("served"), 2);
        // Once stopped, nothing listens.
        assert!(server.connect().await.is_err());
    }

    #[tokio::test]
    async fn draining_closes_open_connections_and_keeps_accepting() {
        let server = start().await;
        let (mut sender, conn) = h2(server.connect().await.unwrap()).await.unwrap();
        assert_eq!(send(&mut sender).await.unwrap(), StatusCode::OK);
        server.control.draining.cancel();
        // GOAWAY: the client's next request goes on a new connection (to wherever the proxy
        // sends it now); this one ends.
        closed(conn).await;
        let (mut again, again_conn) = h2(server.connect().await.unwrap()).await.unwrap();
        assert_eq!(send(&mut again).await.unwrap(), StatusCode::OK);
        // A connection made while draining lives briefly.
        closed(again_conn).await;
        settle().await;
        assert_eq!(server.ended("served"), 2);
        server.control.stop.cancel();
        server.stopped().await;
    }

    /// The client's side of a connection, handed back when hyper's client drops it, which never
    /// shuts it down: as a client that has not yet read to the end of what the server sent.
    struct StillOpen(HandBack);

    impl AsyncRead for StillOpen {
        fn poll_read(
            mut self: Pin<&mut Self>,
            cx: &mut task::Context<'_>,
            buf: &mut ReadBuf<'_>,
        ) -> Poll<io::Result<()>> {
            Pin::new(&mut self.0).poll_read(cx, buf)
        }
    }

    impl AsyncWrite for StillOpen {
        fn poll_write(
            mut self: Pin<&mut Self>,
            cx: &mut task::Context<'_>,
            buf: &[u8],
        ) -> Poll<io::Result<usize>> {
            Pin::new(&mut self.0).poll_write(cx, buf)
        }

        fn poll_flush(mut self: Pin<&mut Self>, cx: &mut task::Context<'_>) -> Poll<io::Result<()>> {
            Pin::new(&mut self.0).poll_flush(cx)
        }

        fn poll_shutdown(self: Pin<&mut Self>, _: &mut task::Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    /// After the server has closed a connection gracefully, what the client still sends on it
    /// (the WINDOW_UPDATEs for responses it is still reading, its close_notify) does not reset
    /// it: a reset would discard responses not yet delivered, which Go's client reports as
    /// "http2: server sent GOAWAY and closed the connection".
    #[tokio::test]
    async fn a_closed_connection_is_not_reset_by_what_the_client_still_sends() {
        let server = start().await;
        let (tcp, handed_back) = HandBack::new(TcpStream::connect(server.addr).await.unwrap());
        let name = ServerName::try_from("127.0.0.1").unwrap();
        let tls = TlsConnector::from(server.client_config(None))
            .connect(name, StillOpen(tcp))
            .await
            .unwrap();
        let (mut sender, conn) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tls))
                .await
                .unwrap();
        let conn = tokio::spawn(conn);
        let req = http::Request::post("https://127.0.0.1/mutate-services")
            .body(String::from("{}"))
            .unwrap();
        assert_eq!(sender.send_request(req).await.unwrap().status(), StatusCode::OK);
        // GOAWAY, then the server closes the connection: the client reads to the end.
        server.control.draining.cancel();
        closed(conn).await;
        let mut tcp = handed_back.await.unwrap();
        tokio::io::AsyncWriteExt::write_all(&mut tcp, b"a late frame")
            .await
            .unwrap();
        settle().await;
        tokio::io::AsyncWriteExt::write_all(&mut tcp, b"another")
            .await
            .unwrap();
        tokio::io::AsyncWriteExt::shutdown(&mut tcp).await.unwrap();
        // What the client had not read yet (its TLS layer stops at close_notify), then the end of
        // the stream, not a reset.
        let mut rest = Vec::new();
        tokio::io::AsyncReadExt::read_to_end(&mut tcp, &mut rest)
            .await
            .unwrap();
        settle().await;
        assert_eq!(server.ended("served"), 1);
        server.control.stop.cancel();
        server.stopped().await;
    }

    #[tokio::test]
    async fn a_client_that_sends_nothing_is_dropped() {
        let server = start().await;
        let mut idle = server.connect().await.unwrap();
        let started = Instant::now();
        // The server closes it: the client reads the end of the stream.
        let mut buf = [0_u8; 64];
        let read = tokio::time::timeout(
            FIRST_REQUEST_TIMEOUT + Duration::from_secs(5),
            tokio::io::AsyncReadExt::read(&mut idle, &mut buf),
        )
        .await
        .expect("the idle connection is closed");
        assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");
        assert!(started.elapsed() >= FIRST_REQUEST_TIMEOUT - Duration::from_secs(1));
        settle().await;
        assert_eq!(server.ended("no_request"), 1);
        assert_eq!(server.ended("served"), 0);
        server.control.stop.cancel();
        server.stopped().await;
    }

    /// A client certificate and key, and the CA that signed them (PEM).
    struct ClientIdentity {
        ca_pem: String,
        cert_pem: String,
        key_pem: String,
    }

    fn client_identity(cn: &str) -> ClientIdentity {
        use rcgen::{
            BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
        };
        let ca_key = KeyPair::generate().unwrap();
        let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca.distinguished_name.push(DnType::CommonName, "test client CA");
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let ca_cert = ca.self_signed(&ca_key).unwrap();
        let issuer = Issuer::new(ca, &ca_key);
        let key = KeyPair::generate().unwrap();
        let mut leaf = CertificateParams::new(Vec::<String>::new()).unwrap();
        leaf.distinguished_name.push(DnType::CommonName, cn);
        leaf.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        let cert = leaf.signed_by(&key, &issuer).unwrap();
        ClientIdentity {
            ca_pem: ca_cert.pem(),
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        }
    }

    #[tokio::test]
    async fn with_a_client_ca_only_clients_it_signed_are_served() {
        let apiserver = client_identity("kube-apiserver-webhook-client");
        let stranger = client_identity("kube-apiserver-webhook-client");
        let server = start_with(Some(&apiserver.ca_pem)).await;
        // The apiserver's certificate: served.
        let (mut sender, _conn) = h2(server.connect_as(Some(&apiserver)).await.unwrap())
            .await
            .unwrap();
        assert_eq!(send(&mut sender).await.unwrap(), StatusCode::OK);
        // No certificate, or one another CA signed (whatever its name): refused in the handshake
        // (TLS 1.3 reports it on the client's first read, hence the request).
        for who in [None, Some(&stranger)] {
            let refused = match server.connect_as(who).await {
                Err(_) => true,
                Ok(tls) => match h2(tls).await {
                    Err(_) => true,
                    Ok((mut sender, _conn)) => send(&mut sender).await.is_err(),
                },
            };
            assert!(refused, "a client without the CA's certificate was served");
        }
        settle().await;
        assert_eq!(server.ended("tls_failed"), 2);
        server.control.stop.cancel();
        server.stopped().await;
    }

    #[tokio::test]
    async fn a_failed_handshake_is_counted() {
        let server = start().await;
        let mut tcp = TcpStream::connect(server.addr).await.unwrap();
        tokio::io::AsyncWriteExt::write_all(&mut tcp, b"GET / HTTP/1.1\r\n\r\n")
            .await
            .unwrap();
        drop(tcp);
        settle().await;
        assert_eq!(server.ended("tls_failed"), 1);
        server.control.stop.cancel();
        server.stopped().await;
    }

    /// Not a test: the server side of `hack/goaway-repro` (run through `hack/goaway-repro/run.sh`).
    /// Serves `/mutate-services` (answering after 1-5 ms, as the handler does) with a short
    /// `max_connection_age` (`GOAWAY_REPRO_AGE_MS`, 200) on `GOAWAY_REPRO_ADDR`
    /// (127.0.0.1:0), writes its address and CA to `GOAWAY_REPRO_DIR`, and stops when a file
    /// `stop` appears there. `RUST_LOG` selects traces.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    #[ignore = "a reproduction's server, run by hack/goaway-repro/run.sh"]
    async fn goaway_repro_server() {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_writer(std::io::stderr)
            .try_init();
        let var = |name: &str, default: &str| std::env::var(name).unwrap_or_else(|_| default.into());
        let dir = std::path::PathBuf::from(var("GOAWAY_REPRO_DIR", "/tmp/goaway-repro"));
        let age = Duration::from_millis(var("GOAWAY_REPRO_AGE_MS", "200").parse().unwrap());
        std::fs::create_dir_all(&dir).unwrap();
        let _ = std::fs::remove_file(dir.join("stop"));
        let cert = certs::generate(&["127.0.0.1".into()]).unwrap();
        let registry = Registry::new();
        let metrics = ConnectionMetrics::register(&registry).unwrap();
        let listener = bind(var("GOAWAY_REPRO_ADDR", "127.0.0.1:0").parse().unwrap())
            .await
            .unwrap();
        let addr = listener.0.local_addr().unwrap();
        let control = Control::new();
        let answer = |body: String| async move {
            tokio::time::sleep(Duration::from_micros(rand::random_range(1000..5000))).await;
            format!(
                r#"{{"apiVersion":"admission.k8s.io/v1","kind":"AdmissionReview","response":{{"uid":"{}","allowed":true,"patchType":"JSONPatch","patch":"{}"}}}}"#,
                body.len(),
                "A".repeat(400)
            )
        };
        let server = Server {
            tls: tls_config(ServingKeys::new(&cert).unwrap(), None).unwrap(),
            router: Router::new().route("/mutate-services", axum::routing::post(answer)),
            max_connection_age: age,
            grace: Duration::from_secs(10),
            metrics: metrics.clone(),
        };
        std::fs::write(dir.join("ca.pem"), &cert.ca_pem).unwrap();
        std::fs::write(dir.join("addr"), addr.to_string()).unwrap();
        eprintln!("goaway_repro_server: listening on {addr}, max connection age {age:?}");
        let task = tokio::spawn(server.serve(listener, control.clone()));
        while !dir.join("stop").exists() {
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        control.stop.cancel();
        task.await.unwrap().unwrap();
        for outcome in ["served", "no_request", "tls_failed", "tls_timeout"] {
            eprintln!(
                "connections {outcome}: {}",
                metrics.0.with_label_values(&[outcome]).get()
            );
        }
    }
}
