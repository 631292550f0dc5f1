//! Fencing of the leader's API writes: right before any write leaves the process, the replica's
//! claim on the Lease must still be good *now*.
//!
//! Stopping the leader's work when the lease cannot be renewed is not enough on its own: a
//! replica that was paused (SIGSTOP, a VM migration, a stalled node) wakes up with tasks in the
//! middle of a reconcile, and with requests already built but not yet written to the socket, and
//! would send them before anything noticed that another replica has taken over. Three checks,
//! all in the leader's client so that no writer has to remember them:
//!
//! - [`FenceLayer`], in the client's middleware: a write (anything but GET/HEAD/OPTIONS) is
//!   refused with [`NotLeading`] before it is even queued; reads and watches pass this check
//!   (but once the claim has lapsed the two checks below stop them too: the client carries
//!   nothing at all until this replica leads again).
//! - [`FencedExecutor`], which runs the client's connection tasks: a connection is polled only
//!   while the claim holds, and dropped (its socket closed, its unsent frames discarded) at the
//!   first poll after the claim lapsed.
//! - [`FencedConnector`], under TLS: every write to a connection's socket checks the claim, and
//!   fails the connection once it has lapsed. The first two leave a gap that CI found: a pause
//!   that lands *inside* a connection task's poll resumes that poll, and one poll of an HTTP/1
//!   connection reads a response, takes the next queued request and writes it, with no check in
//!   between. The socket check closes that down to the one write system call that the pause
//!   itself interrupts.
//!
//! Leader-only etcd transactions close even that with a leader-epoch compare
//! (`svcplane_allocators::etcd`).

use std::{
    future::Future,
    io,
    pin::Pin,
    task::{Context, Poll},
};

use http::{Method, Request, Uri};
use hyper::rt::{Read, ReadBufCursor, Write};
use hyper_util::client::legacy::connect::{Connected, Connection};
use tokio::{sync::watch, time::Instant};
use tower::{BoxError, Layer, Service};

use super::Leadership;

/// A write refused because this replica no longer leads.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("this replica no longer holds the leader lease; the write was not sent")]
pub struct NotLeading;

/// This replica's claim on the Lease, as the elector publishes it.
#[derive(Clone, Debug)]
pub struct Claim(Option<watch::Receiver<Leadership>>);

impl Claim {
    pub fn new(leadership: watch::Receiver<Leadership>) -> Self {
        Self(Some(leadership))
    }

    /// With leader election off, the one replica is the leader by configuration.
    pub fn unconditional() -> Self {
        Self(None)
    }

    /// Whether this replica may write now: it leads and its fence has not passed.
    pub fn check(&self) -> Result<(), NotLeading> {
        match &self.0 {
            None => Ok(()),
            Some(rx) if rx.borrow().is_leading_at(Instant::now()) => Ok(()),
            Some(_) => Err(NotLeading),
        }
    }
}

/// Adds the claim check to a client's stack
/// (`kube::client::ClientBuilder::with_layer`).
#[derive(Clone, Debug)]
pub struct FenceLayer(Claim);

impl FenceLayer {
    pub fn new(claim: Claim) -> Self {
        Self(claim)
    }
}

impl<S> Layer<S> for FenceLayer {
    type Service = Fenced<S>;

    fn layer(&self, inner: S) -> Fenced<S> {
        Fenced {
            inner,
            claim: self.0.clone(),
        }
    }
}

#[derive(Clone, Debug)]
pub struct Fenced<S> {
    inner: S,
    claim: Claim,
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

/// Runs the leader client's connection tasks (`kube::client::ClientBuilder::try_from((config,
/// executor))`) so that a connection carries nothing once the claim has lapsed.
#[derive(Clone, Debug)]
pub struct FencedExecutor(Claim);

impl FencedExecutor {
    pub fn new(claim: Claim) -> Self {
        Self(claim)
    }
}

impl<F> hyper::rt::Executor<F> for FencedExecutor
where
    F: Future<Output = ()> + Send + 'static,
{
    fn execute(&self, task: F) {
        tokio::spawn(FencedTask {
            task: Box::pin(task),
            claim: self.0.clone(),
        });
    }
}

/// A connection task polled only while the claim holds.
struct FencedTask {
    task: BoxFuture<()>,
    claim: Claim,
}

impl Future for FencedTask {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        if self.claim.check().is_err() {
            // Ends the task: the connection and whatever it had not written are dropped.
            return Poll::Ready(());
        }
        self.task.as_mut().poll(cx)
    }
}

/// Wraps a connector (the TCP one, under TLS) so that each connection it makes writes to its
/// socket only while the claim holds.
#[derive(Clone, Debug)]
pub struct FencedConnector<C> {
    inner: C,
    claim: Claim,
}

impl<C> FencedConnector<C> {
    pub fn new(inner: C, claim: Claim) -> Self {
        Self { inner, claim }
    }
}

impl<C> Service<Uri> for FencedConnector<C>
where
    C: Service<Uri>,
    C::Future: Send + 'static,
{
    type Response = FencedIo<C::Response>;
    type Error = C::Error;
    type Future = BoxFuture<Result<FencedIo<C::Response>, C::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), C::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let claim = self.claim.clone();
        let connecting = self.inner.call(uri);
        Box::pin(async move {
            let io = connecting.await?;
            Ok(FencedIo { io, claim })
        })
    }
}

/// A connection's socket whose writes fail once the claim has lapsed (reads pass: what the
/// apiserver already sent changes nothing).
#[derive(Debug)]
pub struct FencedIo<T> {
    io: T,
    claim: Claim,
}

impl<T> FencedIo<T> {
    fn check(&self) -> io::Result<()> {
        self.claim.check().map_err(io::Error::other)
    }
}

impl<T: Read + Unpin> Read for FencedIo<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: ReadBufCursor<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl<T: Write + Unpin> Write for FencedIo<T> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        self.check()?;
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        self.check()?;
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

impl<T: Connection> Connection for FencedIo<T> {
    fn connected(&self) -> Connected {
        self.io.connected()
    }
}

/// Reads (and watches) go through unchecked; everything else is a write.
fn is_write(method: &Method) -> bool {
    !matches!(*method, Method::GET | Method::HEAD | Method::OPTIONS)
}

impl<S, B> Service<Request<B>> for Fenced<S>
where
    S: Service<Request<B>>,
    S::Response: Send + 'static,
    S::Error: Into<BoxError>,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = BoxError;
    type Future = BoxFuture<Result<S::Response, BoxError>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        if is_write(req.method())
            && let Err(e) = self.claim.check()
        {
            return Box::pin(std::future::ready(Err(e.into())));
        }
        let sent = self.inner.call(req);
        Box::pin(async move { sent.await.map_err(Into::into) })
    }
}

#[cfg(test)]
mod tests {
    use std::{
        sync::{Arc, Mutex},
        time::Duration,
    };

    use tower::{ServiceExt, service_fn};

    use super::*;

    /// A stand-in for the HTTP connection that records what reached it.
    fn recorder(
        sent: &Arc<Mutex<Vec<Method>>>,
    ) -> impl Service<Request<()>, Response = (), Error = BoxError, Future: Send + 'static> + Clone + use<>
    {
        let sent = sent.clone();
        service_fn(move |req: Request<()>| {
            sent.lock().unwrap().push(req.method().clone());
            std::future::ready(Ok::<(), BoxError>(()))
        })
    }

    fn request(method: Method) -> Request<()> {
        Request::builder()
            .method(method)
            .uri("/api/v1/namespaces/ns/endpoints")
            .body(())
            .unwrap()
    }

    #[tokio::test(start_paused = true)]
    async fn writes_pass_only_while_the_claim_holds() {
        let (tx, rx) = watch::channel(Leadership {
            holder: Some("me".into()),
            leading_until: Some(Instant::now() + Duration::from_secs(10)),
        });
        let sent = Arc::new(Mutex::new(Vec::new()));
        let svc = FenceLayer::new(Claim::new(rx)).layer(recorder(&sent));

        svc.clone().oneshot(request(Method::POST)).await.unwrap();
        // The fence passes while nothing renews (a paused replica): the claim lapses by itself.
        tokio::time::sleep(Duration::from_secs(11)).await;
        for m in [Method::POST, Method::PUT, Method::PATCH, Method::DELETE] {
            let err = svc.clone().oneshot(request(m)).await.unwrap_err();
            assert_eq!(err.downcast_ref::<NotLeading>(), Some(&NotLeading));
        }
        svc.clone().oneshot(request(Method::GET)).await.unwrap();
        // Leading again (a new term): writes go out again.
        tx.send_replace(Leadership {
            holder: Some("me".into()),
            leading_until: Some(Instant::now() + Duration::from_secs(10)),
        });
        svc.clone().oneshot(request(Method::DELETE)).await.unwrap();
        // Another replica took over.
        tx.send_replace(Leadership {
            holder: Some("other".into()),
            leading_until: None,
        });
        assert!(svc.clone().oneshot(request(Method::PUT)).await.is_err());

        assert_eq!(*sent.lock().unwrap(), [Method::POST, Method::GET, Method::DELETE]);
    }

    #[tokio::test]
    async fn without_leader_election_every_write_passes() {
        let sent = Arc::new(Mutex::new(Vec::new()));
        let svc = FenceLayer::new(Claim::unconditional()).layer(recorder(&sent));
        svc.oneshot(request(Method::POST)).await.unwrap();
        assert_eq!(sent.lock().unwrap().len(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_connection_task_is_dropped_at_its_first_poll_after_the_claim_lapsed() {
        use hyper::rt::Executor;
        let (tx, rx) = watch::channel(Leadership {
            holder: Some("me".into()),
            leading_until: Some(Instant::now() + Duration::from_secs(10)),
        });
        let polls = Arc::new(Mutex::new(0));
        let (wake, mut woken) = tokio::sync::mpsc::unbounded_channel::<()>();
        let counted = polls.clone();
        // A stand-in for a connection: it does one unit of work each time it is woken.
        FencedExecutor::new(Claim::new(rx)).execute(async move {
            while woken.recv().await.is_some() {
                *counted.lock().unwrap() += 1;
            }
        });
        wake.send(()).unwrap();
        tokio::time::sleep(Duration::from_millis(10)).await;
        assert_eq!(*polls.lock().unwrap(), 1);
        // Paused past the fence, then woken: the task is gone, the work never done.
        tokio::time::sleep(Duration::from_secs(11)).await;
        let _ = wake.send(());
        tokio::time::sleep(Duration::from_millis(10)).await;
        assert_eq!(*polls.lock().unwrap(), 1);
        assert!(wake.is_closed(), "the task (and its receiver) was dropped");
        drop(tx);
    }

    #[tokio::test(start_paused = true)]
    async fn a_connection_writes_to_its_socket_only_while_the_claim_holds() {
        use hyper_util::rt::TokioIo;
        use tokio::io::AsyncReadExt;

        async fn write(io: &mut FencedIo<TokioIo<tokio::io::DuplexStream>>, buf: &[u8]) -> io::Result<usize> {
            std::future::poll_fn(|cx| Pin::new(&mut *io).poll_write(cx, buf)).await
        }

        let (tx, rx) = watch::channel(Leadership {
            holder: Some("me".into()),
            leading_until: Some(Instant::now() + Duration::from_secs(10)),
        });
        let (near, mut far) = tokio::io::duplex(1024);
        let near = Arc::new(Mutex::new(Some(near)));
        let tcp = service_fn(move |_: Uri| {
            let io = near.lock().unwrap().take().map(TokioIo::new);
            std::future::ready(io.ok_or_else(|| io::Error::other("one connection only")))
        });
        let mut io = FencedConnector::new(tcp, Claim::new(rx))
            .oneshot(Uri::from_static("https://127.0.0.1:6443"))
            .await
            .unwrap();

        assert_eq!(write(&mut io, b"PUT /a").await.unwrap(), 6);
        // Paused past the fence in the middle of a poll: the next write fails, with the reason.
        tokio::time::sleep(Duration::from_secs(11)).await;
        let err = write(&mut io, b"PUT /b").await.unwrap_err();
        assert_eq!(
            err.get_ref().and_then(|e| e.downcast_ref::<NotLeading>()),
            Some(&NotLeading)
        );
        drop(io);
        let mut reached = Vec::new();
        far.read_to_end(&mut reached).await.unwrap();
        assert_eq!(reached, b"PUT /a");
        drop(tx);
    }
}
