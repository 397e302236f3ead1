//! The PostgreSQL protocol: a listener that speaks the v3 wire protocol to stock clients,
//! authenticates them with an OIDC token sent as the password, records every statement before
//! the target sees it, and relays to the target over the gateway's own login.

pub mod backend;
mod binding;
mod budget;
pub mod cancel;
pub mod catalog;
pub mod codec;
pub mod config;
pub mod encoding;
pub mod messages;
/// The statement the gateway runs in a session right before a held statement.
pub use binding::is_probe as is_settings_probe;
mod refusal;
mod relay;
mod session;
mod state;

use crate::core::lifecycle::Sessions;
use crate::core::proxy_protocol::{self, FirstWord, Origin, Refused};
use crate::core::{Core, ProtocolServer, Shutdown};
use anyhow::Context as _;
use backend::Targets;
use config::PostgresConfig;
use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;

/// The protocol's name in audit records, approval scopes and grants.
pub const PROTOCOL: &str = "postgres";

/// Everything a session needs, shared by all sessions of the listener.
pub struct PgContext {
    pub core: Arc<Core>,
    pub config: PostgresConfig,
    pub tls: Arc<rustls::ServerConfig>,
    pub targets: Targets,
    pub cancels: cancel::CancelRegistry,
    pub max_result_bytes: usize,
    pub policy: Arc<crate::policy::Policy>,
    pub classifier: crate::policy::Classifier,
    /// Table names behind result columns, per connection name (for column masking rules).
    pub catalogs: HashMap<String, Arc<catalog::Catalog>>,
    /// The memory sessions may hold for large target messages.
    pub budget: budget::MessageBudget,
}

/// The PostgreSQL listener, bound.
pub struct PgServer {
    listener: TcpListener,
    ctx: Arc<PgContext>,
}

impl PgServer {
    /// Builds the server from its config section `pg` (targets, TLS), the node's policy (see
    /// [`config::PostgresConfig::read_only_connections`]) and
    /// the most result data a record keeps, and binds its listener; everything that can fail
    /// on bad configuration fails here.
    pub async fn bind(
        pg: &PostgresConfig,
        policy: Arc<crate::policy::Policy>,
        max_result_bytes: usize,
        core: Arc<Core>,
    ) -> anyhow::Result<Self> {
        let mut targets = HashMap::new();
        for target in pg.targets()? {
            let name = target.config.name.clone();
            let target = backend::Target::new(target)
                .with_context(|| format!("TLS settings of connection {name:?}"))?;
            targets.insert(name, Arc::new(target));
        }
        let lookup = std::time::Duration::from_secs(pg.catalog_timeout_secs);
        let catalogs = targets
            .iter()
            .map(|(name, t)| {
                let catalog = catalog::Catalog::new(t.clone(), lookup);
                (name.clone(), Arc::new(catalog))
            })
            .collect();
        let tls = crate::core::tls::server_config(
            pg.tls_cert.as_deref(),
            pg.tls_key.as_deref(),
            &core.data_dir.join("tls"),
        )
        .context("postgres TLS certificate")?;
        let listener = TcpListener::bind(pg.listen)
            .await
            .with_context(|| format!("cannot bind postgres.listen {}", pg.listen))?;
        let budget =
            budget::MessageBudget::new(pg.target_message_memory_bytes, core.metrics.clone());
        let ctx = Arc::new(PgContext {
            config: pg.clone(),
            tls,
            targets: Arc::new(targets),
            cancels: cancel::CancelRegistry::new(core.peers.tag()),
            core,
            max_result_bytes,
            policy,
            classifier: crate::policy::Classifier::default(),
            catalogs,
            budget,
        });
        Ok(Self { listener, ctx })
    }

    /// Where another node's passed-on cancels reach this server's sessions.
    pub fn passed_cancels(&self) -> cancel::PassedCancels {
        cancel::PassedCancels(self.ctx.clone())
    }
}

impl ProtocolServer for PgServer {
    fn protocol(&self) -> &'static str {
        PROTOCOL
    }

    fn local_addr(&self) -> SocketAddr {
        self.listener
            .local_addr()
            .expect("a bound listener has an address")
    }

    fn serve(self: Box<Self>, shutdown: Shutdown) -> Pin<Box<dyn Future<Output = ()> + Send>> {
        Box::pin(serve(self.listener, self.ctx, shutdown))
    }
}

/// Who the client of a new connection is ([`proxy_protocol::admit`]); `None` when the
/// connection was refused (recorded), after an ErrorResponse that says why.
async fn admit(ctx: &PgContext, tcp: &mut TcpStream, peer: SocketAddr) -> Option<Origin> {
    match proxy_protocol::admit(&ctx.core, PROTOCOL, tcp, peer, FirstWord::Client).await {
        Ok(origin) => Some(origin),
        Err(refused) => {
            if let Refused::Said(message) = refused {
                let answer = messages::error_response(true, "08P01", &message);
                // A client that does not read cannot hold the task.
                let _ = tokio::time::timeout(Duration::from_secs(1), async {
                    let _ = tcp.write_all(&answer).await;
                    let _ = tcp.shutdown().await;
                })
                .await;
            }
            None
        }
    }
}

/// Accepts clients until `shutdown` resolves, then drains ([`Sessions::drain`]).
///
/// A client holds one of `max_unauthenticated_connections` permits from its accept until it is
/// authenticated or refused (within `startup_timeout_secs`); a client that finds none free is
/// refused at once, so clients that never authenticate cannot pile up.
async fn serve(listener: TcpListener, ctx: Arc<PgContext>, shutdown: impl Future<Output = ()>) {
    let sessions = Sessions::default();
    let preauth = Arc::new(Semaphore::new(ctx.config.max_unauthenticated_connections));
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            _ = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok((tcp, peer)) => {
                    let _ = tcp.set_nodelay(true);
                    let Ok(permit) = preauth.clone().try_acquire_owned() else {
                        ctx.core.metrics.preauth_refused.inc();
                        tokio::spawn(session::turn_away(tcp, peer));
                        continue;
                    };
                    let threads = &ctx.core.threads;
                    let ctx = ctx.clone();
                    let open = sessions.enter();
                    let session = move |mut tcp| async move {
                        if let Some(origin) = admit(&ctx, &mut tcp, peer).await {
                            session::run(ctx, tcp, origin, permit).await;
                        }
                        drop(open);
                    };
                    threads.spawn_connection(tcp, session);
                }
                Err(e) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
        }
    }
    drop(listener);
    sessions.drain(&ctx.core.lifecycle).await;
}
