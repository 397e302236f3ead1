//! What every connection to the node's own HTTP servers (the API, the console, the admin
//! listener and the Kubernetes listener) is held to, before it authenticates and between its
//! requests: a bounded number of connections per listener, a time limit on a request's head,
//! keep-alive probes on HTTP/2, and a bounded number of requests in flight per connection.
//! Without them a client that opens connections and sends nothing, or half a request head,
//! held its connections for good, and enough of them took every file descriptor of the node
//! (all its listeners, PostgreSQL's and SSH's included, refused new clients).

use crate::api::ClientAddr;
use crate::core::proxy_protocol::Origin;
use axum::extract::connect_info::ConnectInfo;
use axum::Router;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::service::TowerToHyperService;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::{watch, OwnedSemaphorePermit, Semaphore};

/// Time a client has to finish the TLS handshake on the API, console and Kubernetes listeners.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Time a client has to send a request's whole head, from the first byte it is read for (on
/// a kept-alive HTTP/1.1 connection, also the time it may stay idle between requests).
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(30);

/// Time a client of the API, console and admin listeners has to send a request's whole body,
/// from its head on. Their handlers read a body before they can judge it (a SAML form before
/// its signature is checked, a vote before the person's session), so a body sent a byte at a
/// time would otherwise hold its connection, and its place, for good.
pub const BODY_READ_TIMEOUT: Duration = Duration::from_secs(30);

/// An HTTP/2 connection is pinged after this long without a frame, and closed when the ping
/// is not answered within as long again.
pub const KEEP_ALIVE: Duration = Duration::from_secs(20);

/// Requests in flight at once on one HTTP/2 connection of the Kubernetes listener (hyper's
/// default is 200, each of which may hold a body being read). Only that listener speaks
/// HTTP/2 (its TLS offers `h2`): clients of the others, which offer nothing, speak HTTP/1.1,
/// and HTTP/2 with prior knowledge is not served there.
pub const KUBE_MAX_STREAMS: u32 = 100;

/// Connections at once on the API and console listeners (each holds a file descriptor and,
/// while its TLS handshake or request runs, memory).
pub const MAX_CONNECTIONS: usize = 512;

/// Connections at once on the admin listener (metrics scrapers and health checks).
pub const MAX_ADMIN_CONNECTIONS: usize = 32;

/// A hyper connection builder with the limits above; `max_header_bytes` bounds a request's
/// head (HTTP/1.1) and header list (HTTP/2). `h2_streams`: HTTP/2 is served too, with this
/// many requests in flight per connection; `None`: HTTP/1.1 only, so that the time for a
/// request's head runs from the connection's start (the detection of the version, which
/// waits for the client's first bytes, has no time limit of its own).
pub fn builder(max_header_bytes: usize, h2_streams: Option<u32>) -> auto::Builder<TokioExecutor> {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT)
        .max_buf_size(max_header_bytes.max(8192));
    builder
        .http2()
        .timer(TokioTimer::new())
        .keep_alive_interval(KEEP_ALIVE)
        .keep_alive_timeout(KEEP_ALIVE)
        .max_concurrent_streams(h2_streams.unwrap_or(1))
        .max_header_list_size(u32::try_from(max_header_bytes).unwrap_or(u32::MAX));
    match h2_streams {
        Some(_) => builder,
        None => builder.http1_only(),
    }
}

/// The connections a listener may hold at once: one is taken when a connection is accepted,
/// before anything is read from it, and given back when it closes. A connection that comes
/// when none is left is closed at once (counted by the caller).
#[derive(Clone)]
pub struct ConnectionLimit(Arc<Semaphore>);

impl ConnectionLimit {
    pub fn new(max: usize) -> Self {
        Self(Arc::new(Semaphore::new(max)))
    }

    /// A place for a new connection, or `None` when all are taken.
    pub fn enter(&self) -> Option<OwnedSemaphorePermit> {
        self.0.clone().try_acquire_owned().ok()
    }
}

/// Where [`serve`] gets its connections: each with its client and its place under the
/// listener's [`ConnectionLimit`].
pub trait Accept: Send + 'static {
    type Io: AsyncRead + AsyncWrite + Unpin + Send + 'static;
    fn accept(&mut self) -> impl Future<Output = (Self::Io, Origin, OwnedSemaphorePermit)> + Send;
}

/// Resolves once `stop` says so (or its sender is gone).
async fn stopped(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|stop| *stop).await;
}

/// A plain TCP listener (the admin endpoints) under a [`ConnectionLimit`].
pub struct Plain {
    pub tcp: tokio::net::TcpListener,
    pub limit: ConnectionLimit,
    pub metrics: Arc<crate::core::metrics::Metrics>,
}

impl Accept for Plain {
    type Io = tokio::net::TcpStream;

    async fn accept(&mut self) -> (Self::Io, Origin, OwnedSemaphorePermit) {
        loop {
            match self.tcp.accept().await {
                Ok((tcp, peer)) => match self.limit.enter() {
                    Some(place) => return (tcp, Origin::direct(peer), place),
                    None => {
                        self.metrics.preauth_refused.inc();
                    }
                },
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    }
}

/// Serves `app` over HTTP/1.1 on every connection `listener` accepts, with [`builder`]'s
/// limits, until `shutdown` resolves; then stops accepting, lets each connection finish the
/// request it has and returns once all are closed. Handlers see the client as
/// `ConnectInfo<ClientAddr>`.
pub async fn serve(
    mut listener: impl Accept,
    app: Router,
    max_header_bytes: usize,
    shutdown: impl Future<Output = ()> + Send + 'static,
) {
    let builder = Arc::new(builder(max_header_bytes, None));
    let app = app.layer(axum::middleware::map_request(with_body_deadline));
    let (stop, stopping) = watch::channel(false);
    let mut connections = tokio::task::JoinSet::new();
    tokio::pin!(shutdown);
    loop {
        let (io, origin, place) = tokio::select! {
            accepted = listener.accept() => accepted,
            () = &mut shutdown => break,
        };
        // Finished connections' tasks are let go of as new ones come.
        while connections.try_join_next().is_some() {}
        let service = TowerToHyperService::new(
            app.clone()
                .layer(axum::Extension(ConnectInfo(ClientAddr(origin)))),
        );
        let (builder, mut stopping) = (builder.clone(), stopping.clone());
        connections.spawn(async move {
            let _place = place;
            let connection = builder.serve_connection_with_upgrades(TokioIo::new(io), service);
            tokio::pin!(connection);
            let served = tokio::select! {
                served = connection.as_mut() => served,
                () = stopped(&mut stopping) => {
                    connection.as_mut().graceful_shutdown();
                    connection.await
                }
            };
            if let Err(e) = served {
                tracing::debug!(error = %e, "http connection ended with an error");
            }
        });
    }
    let _ = stop.send(true);
    while connections.join_next().await.is_some() {}
}

/// The request with its body held to [`BODY_READ_TIMEOUT`] from now (its head read).
async fn with_body_deadline(req: axum::extract::Request) -> axum::extract::Request {
    req.map(|body| axum::body::Body::new(Deadline::new(body, BODY_READ_TIMEOUT)))
}

/// A request body that fails once it has not ended within its time (see
/// [`BODY_READ_TIMEOUT`]): the handler reading it gets an error (axum answers 400) and the
/// connection closes.
struct Deadline<B> {
    body: B,
    within: Duration,
    sleep: std::pin::Pin<Box<tokio::time::Sleep>>,
}

impl<B> Deadline<B> {
    fn new(body: B, within: Duration) -> Self {
        Self {
            body,
            within,
            sleep: Box::pin(tokio::time::sleep(within)),
        }
    }
}

impl<B> hyper::body::Body for Deadline<B>
where
    B: hyper::body::Body + Unpin,
    B::Error: Into<axum::BoxError>,
{
    type Data = B::Data;
    type Error = axum::BoxError;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Self::Data>, Self::Error>>> {
        use std::task::Poll;
        if let Poll::Ready(frame) = std::pin::Pin::new(&mut self.body).poll_frame(cx) {
            return Poll::Ready(frame.map(|f| f.map_err(Into::into)));
        }
        match self.sleep.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(Some(Err(format!(
                "the request's body did not come within {} s",
                self.within.as_secs()
            )
            .into()))),
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.body.size_hint()
    }
}
