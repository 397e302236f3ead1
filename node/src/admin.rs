//! The admin endpoints: `/metrics` (Prometheus text), `/healthz` (the process runs) and
//! `/readyz` (the node can authenticate clients and record what they do).

use crate::audit::AuditLog;
use crate::core::http;
use crate::core::identity::TokenVerifier;
use crate::core::lifecycle::Lifecycle;
use crate::core::metrics::Metrics;
use crate::core::peers::{self, CallError, PgCancelAnswer};
use crate::core::reachability::Reachability;
use crate::pg::cancel::PassedCancels;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::HeaderMap;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::{get, post};
use axum::Router;
use std::future::Future;
use std::sync::Arc;

#[derive(Clone)]
pub struct AdminState {
    pub metrics: Arc<Metrics>,
    pub verifier: Arc<TokenVerifier>,
    pub audit: AuditLog,
    pub lifecycle: Arc<Lifecycle>,
    /// Cancels other nodes pass on (see [`crate::core::peers`]); `None` without PostgreSQL.
    pub pg_cancels: Option<PassedCancels>,
    pub coordinator: Arc<Reachability>,
    /// Whether the coordinator holds a checkpoint of the node's stream (the listeners serve
    /// from then on).
    pub witnessed: tokio::sync::watch::Receiver<bool>,
}

pub async fn serve(
    listener: tokio::net::TcpListener,
    state: AdminState,
    shutdown: impl Future<Output = ()> + Send + 'static,
) {
    let metrics_of = state.metrics.clone();
    let app = Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route(peers::PG_CANCEL_PATH, post(pg_cancel))
        .with_state(state);
    let listener = http::Plain {
        tcp: listener,
        limit: http::ConnectionLimit::new(http::MAX_ADMIN_CONNECTIONS),
        metrics: metrics_of,
    };
    // A passed-on cancel is the largest body here (a few hundred bytes).
    let app = app.layer(axum::extract::DefaultBodyLimit::max(16 * 1024));
    http::serve(listener, app, 16 * 1024, shutdown).await;
}

async fn metrics(State(state): State<AdminState>) -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        state.metrics.encode(),
    )
}

/// The first line says whether the node is ready and why not; the next names the coordinator's
/// reachability, which does not decide readiness (see [`crate::core::reachability`]).
async fn readyz(State(state): State<AdminState>) -> impl IntoResponse {
    let (status, verdict) = if state.lifecycle.is_draining() {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "not ready: draining (the node is shutting down)",
        )
    } else if !*state.witnessed.borrow() {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "not ready: the coordinator has not yet taken the first checkpoint of the audit stream",
        )
    } else if !state.verifier.is_ready() {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "not ready: identity provider keys not loaded",
        )
    } else if !state.audit.is_healthy() {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "not ready: the audit log cannot be written",
        )
    } else if state.audit.spool_full() {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "not ready: the audit spool is full (the broker is behind)",
        )
    } else {
        (StatusCode::OK, "ready")
    };
    (
        status,
        format!("{verdict}\n{}\n", state.coordinator.describe()),
    )
}

/// A PostgreSQL cancel another node of the cluster passes on: `401` for a call that does not
/// verify (unsigned, bad signature, stale), `400` for a malformed one, `404` on a node without
/// PostgreSQL; otherwise whether a session here held the key.
async fn pg_cancel(
    State(state): State<AdminState>,
    headers: HeaderMap,
    body: Bytes,
) -> axum::response::Response {
    let Some(cancels) = &state.pg_cancels else {
        return (
            StatusCode::NOT_FOUND,
            "this node serves no PostgreSQL clients\n",
        )
            .into_response();
    };
    let signature = headers
        .get(peers::SIGNATURE_HEADER)
        .and_then(|v| v.to_str().ok());
    match cancels.handle(&body, signature).await {
        Ok(held) => (
            [(header::CONTENT_TYPE, "application/json")],
            serde_json::to_vec(&PgCancelAnswer { held }).unwrap_or_default(),
        )
            .into_response(),
        Err(e) => {
            state.metrics.peer_calls_refused.inc();
            tracing::warn!(error = %e, "a peer call was refused");
            let status = match e {
                CallError::Malformed(_) => StatusCode::BAD_REQUEST,
                _ => StatusCode::UNAUTHORIZED,
            };
            (status, format!("{e}\n")).into_response()
        }
    }
}
