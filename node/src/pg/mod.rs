//! The PostgreSQL protocol: a listener that speaks the v3 wire protocol to stock clients,
//! authenticates them with an OIDC token sent as the password, records every statement before
//! the target sees it, and relays to the target over the gateway's own login.

pub mod backend;
mod binding;
pub mod cancel;
pub mod catalog;
pub mod codec;
pub mod encoding;
pub mod messages;
/// The statement the gateway runs in a session right before a held statement.
pub use binding::PROBE as SETTINGS_PROBE;
mod refusal;
mod relay;
mod session;
mod state;

use crate::audit::AuditLog;
use crate::identity::TokenVerifier;
use crate::metrics::Metrics;
use backend::Targets;
use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

/// The protocol's name in audit records, approval scopes and grants.
pub const PROTOCOL: &str = "postgres";

/// Everything a session needs, shared by all sessions of the listener.
pub struct PgContext {
    pub config: crate::config::PostgresConfig,
    pub tls: Arc<rustls::ServerConfig>,
    pub targets: Targets,
    pub verifier: Arc<TokenVerifier>,
    pub audit: AuditLog,
    pub metrics: Arc<Metrics>,
    pub cancels: cancel::CancelRegistry,
    pub max_result_bytes: usize,
    pub policy: Arc<crate::policy::Policy>,
    pub classifier: crate::policy::Classifier,
    pub masker: crate::policy::masking::Masker,
    /// Table names behind result columns, per connection name (for column masking rules).
    pub catalogs: std::collections::HashMap<String, Arc<catalog::Catalog>>,
    /// Where statements that need approval are held and decided.
    pub approvals: Arc<crate::coordination::Approvals>,
}

impl PgContext {
    /// A value the client chose, as the gateway may write it anywhere (records, its log):
    /// masked by the detectors (column rules do not apply outside results).
    pub fn scrub(&self, value: &str) -> String {
        self.masker.mask(value, None, false, None).into_owned()
    }
}

/// Accepts clients until `shutdown` resolves, then waits (bounded) for open sessions to end.
///
/// A client holds one of `max_unauthenticated_connections` permits from its accept until it is
/// authenticated or refused (within `startup_timeout_secs`); a client that finds none free is
/// refused at once, so clients that never authenticate cannot pile up.
pub async fn serve(listener: TcpListener, ctx: Arc<PgContext>, shutdown: impl Future<Output = ()>) {
    let active = Arc::new(AtomicUsize::new(0));
    let preauth = Arc::new(Semaphore::new(ctx.config.max_unauthenticated_connections));
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            _ = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok((tcp, peer)) => {
                    let _ = tcp.set_nodelay(true);
                    let Ok(permit) = preauth.clone().try_acquire_owned() else {
                        ctx.metrics.preauth_refused.inc();
                        tokio::spawn(session::turn_away(tcp, peer));
                        continue;
                    };
                    let ctx = ctx.clone();
                    let active = active.clone();
                    active.fetch_add(1, Ordering::SeqCst);
                    tokio::spawn(async move {
                        session::run(ctx, tcp, peer, permit).await;
                        active.fetch_sub(1, Ordering::SeqCst);
                    });
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
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while active.load(Ordering::SeqCst) > 0 && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
