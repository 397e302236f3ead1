//! The Kubernetes API gateway: callers present a Vigil (OIDC) token as their bearer token; each
//! request is classified as the API server would (verb, resource, namespace, name), decided by
//! policy, recorded, and forwarded to the real API server under the gateway's own credential
//! with the caller impersonated.
//!
//! A TLS connection from a client is a session: its first authenticated request starts it
//! (`session_start`), every later request on it must carry a token of the same principal, and
//! it ends when the connection closes (`session_end`).

mod answer;
pub mod config;
pub mod keys;
mod proxy;
pub mod redact;
pub mod request_info;
pub mod spdy;
mod stream;
pub mod websocket;

/// Keeps a client connection's session open: its `session_end` is recorded when the last
/// holder is gone (the connection, a request still running, an answer still streaming, a
/// switched exec, attach or port-forward stream), so it is the session's last record.
pub(crate) type Open = std::sync::Arc<dyn Send + Sync>;

use crate::core::lifecycle::Sessions;
use crate::core::proxy_protocol::{self, FirstWord};
use crate::core::server::{ProtocolServer, Shutdown};
use crate::core::Core;
use crate::policy::Policy;
use anyhow::Context as _;
use config::{KubeClusterConfig, KubeConfig};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;

pub const PROTOCOL: &str = "kubernetes";

/// Why a stream, a watch or a followed log was ended by the gateway: the token it was opened
/// with expired (`identity.session_expiry`).
const TOKEN_ENDED: &str = "the token expired";

type Upstream = Client<hyper_rustls::HttpsConnector<HttpConnector>, proxy::OutBody>;

/// A cluster and the client the gateway reaches its API server with.
pub struct Cluster {
    pub config: KubeClusterConfig,
    /// The gateway's own bearer token for this API server (none: it presents a client
    /// certificate).
    token: Option<crate::core::secret::Secret<String>>,
    /// Pooled HTTP/1.1 clients: one per session thread, then one for any other thread.
    clients: Vec<Upstream>,
}

impl Cluster {
    /// Sends a request upstream and waits for the API server's answer head (status and
    /// headers) at most `response_timeout_secs`; the body (a watch, `logs -f`, a switched
    /// stream) streams on without that bound. The error is the client's answer: 504 when the
    /// API server did not answer in time, 502 when it could not be reached.
    async fn send(
        &self,
        request: http::Request<proxy::OutBody>,
    ) -> Result<http::Response<hyper::body::Incoming>, (http::StatusCode, String)> {
        let name = &self.config.name;
        let wait = Duration::from_secs(self.config.response_timeout_secs);
        match tokio::time::timeout(wait, self.client().request(request)).await {
            Ok(Ok(resp)) => Ok(resp),
            Ok(Err(e)) => Err((
                http::StatusCode::BAD_GATEWAY,
                format!("vigil: the API server of cluster {name:?} cannot be reached: {e}"),
            )),
            Err(_) => Err((
                http::StatusCode::GATEWAY_TIMEOUT,
                format!(
                    "vigil: the API server of cluster {name:?} did not answer within {} s",
                    wait.as_secs()
                ),
            )),
        }
    }

    /// The pooled client of the calling thread.
    fn client(&self) -> &Upstream {
        // The last is for any other thread; `min` keeps a thread of another node's (in one
        // test process, with more threads) in bounds.
        let other = self.clients.len() - 1;
        let own = crate::core::session_threads::SessionThreads::current();
        &self.clients[own.map_or(other, |i| i.min(other))]
    }
}

/// What every connection of the listener shares.
pub struct KubeContext {
    pub core: Arc<Core>,
    pub policy: Arc<Policy>,
    pub config: KubeConfig,
    clusters: HashMap<String, Arc<Cluster>>,
}

pub struct KubeServer {
    listener: TcpListener,
    tls: TlsAcceptor,
    ctx: Arc<KubeContext>,
}

impl KubeServer {
    pub async fn bind(
        config: &KubeConfig,
        policy: Arc<Policy>,
        core: Arc<Core>,
    ) -> anyhow::Result<Self> {
        let mut tls = (*crate::core::tls::server_config(
            config.tls_cert.as_deref(),
            config.tls_key.as_deref(),
            &core.data_dir.join("tls-kubernetes"),
        )
        .context("kubernetes TLS certificate")?)
        .clone();
        tls.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        let mut clusters = HashMap::new();
        for c in &config.clusters {
            let token = c
                .token
                .as_ref()
                .map(|t| t.resolve())
                .transpose()
                .with_context(|| format!("kubernetes.clusters {:?}: token", c.name))?;
            let key = c
                .client_key
                .as_ref()
                .map(|k| k.resolve())
                .transpose()
                .with_context(|| format!("kubernetes.clusters {:?}: client_key", c.name))?;
            let identity = c
                .client_cert
                .as_deref()
                .zip(key.as_ref().map(|k| k.expose().as_str()));
            let client_tls =
                crate::core::tls::verifying_client_config_as(c.ca_file.as_deref(), identity)
                    .with_context(|| {
                        format!("kubernetes.clusters {:?}: ca_file, client_cert", c.name)
                    })?;
            let mut http = HttpConnector::new();
            http.enforce_http(false);
            http.set_nodelay(true);
            http.set_connect_timeout(Some(Duration::from_secs(c.connect_timeout_secs)));
            // HTTP/1.1 only, for every request. Over HTTP/2 each request went through the
            // connection's task (a hand-off there and back), its framing and HPACK, and the
            // API server spent more per call too: a GET cost the gateway 180-210 us of CPU
            // against 125-140 us now (loadtest/README.md, "HTTP/1.1 to the API server"). A
            // watch or `logs -f` holds a connection of its own while it streams; exec,
            // attach and port-forward switch protocols, which HTTP/2 cannot.
            let https = hyper_rustls::HttpsConnectorBuilder::new()
                .with_tls_config((*client_tls).clone())
                .https_only()
                .enable_http1()
                .wrap_connector(http);
            // One pool per session thread: a request goes out on its own thread's
            // connections, whose tasks run there (`core::session_threads`).
            let clients = (0..=core.threads.count())
                .map(|_| Client::builder(hyper_util::rt::TokioExecutor::new()).build(https.clone()))
                .collect();
            clusters.insert(
                c.name.clone(),
                Arc::new(Cluster {
                    config: c.clone(),
                    token,
                    clients,
                }),
            );
        }
        let listener = TcpListener::bind(config.listen)
            .await
            .with_context(|| format!("cannot bind kubernetes.listen {}", config.listen))?;
        Ok(Self {
            listener,
            tls: TlsAcceptor::from(Arc::new(tls)),
            ctx: Arc::new(KubeContext {
                core,
                policy,
                config: config.clone(),
                clusters,
            }),
        })
    }
}

impl ProtocolServer for KubeServer {
    fn protocol(&self) -> &'static str {
        PROTOCOL
    }

    fn local_addr(&self) -> SocketAddr {
        self.listener
            .local_addr()
            .expect("a bound listener has an address")
    }

    fn serve(self: Box<Self>, shutdown: Shutdown) -> Pin<Box<dyn Future<Output = ()> + Send>> {
        Box::pin(serve(self.listener, self.tls, self.ctx, shutdown))
    }
}

/// Accepts clients until `shutdown` resolves, each connection in its own task, then drains
/// ([`Sessions::drain`]); a switched stream counts as a session of its own.
async fn serve(
    listener: TcpListener,
    tls: TlsAcceptor,
    ctx: Arc<KubeContext>,
    shutdown: impl Future<Output = ()>,
) {
    let sessions = Sessions::default();
    let limit = crate::core::http::ConnectionLimit::new(ctx.config.max_connections);
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            _ = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok((tcp, peer)) => {
                    let Some(place) = limit.enter() else {
                        ctx.core.metrics.preauth_refused.inc();
                        continue;
                    };
                    let _ = tcp.set_nodelay(true);
                    let threads = &ctx.core.threads;
                    let (tls, ctx, sessions) = (tls.clone(), ctx.clone(), sessions.clone());
                    let open = sessions.enter();
                    let session = move |mut tcp| async move {
                        let _place = place;
                        // Refused (recorded) before TLS: nothing the client could read.
                        let admitted =
                            proxy_protocol::admit(&ctx.core, PROTOCOL, &mut tcp, peer, FirstWord::Client);
                        let Ok(origin) = admitted.await else {
                            return;
                        };
                        let Ok(Ok(stream)) =
                            tokio::time::timeout(crate::core::http::HANDSHAKE_TIMEOUT, tls.accept(tcp)).await
                        else {
                            return;
                        };
                        // The session's end record lets go of `open` (see proxy's `Conn`).
                        proxy::connection(ctx, stream, origin, sessions, open).await;
                    };
                    threads.spawn_connection(tcp, session);
                }
                Err(e) => {
                    tracing::warn!(error = %e, "kubernetes accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    }
    drop(listener);
    sessions.drain(&ctx.core.lifecycle).await;
}
