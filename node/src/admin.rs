//! The admin endpoints: `/metrics` (Prometheus text), `/healthz` (the process runs) and
//! `/readyz` (the node can authenticate clients and record what they do).

use crate::audit::AuditLog;
use crate::core::identity::TokenVerifier;
use crate::core::metrics::Metrics;
use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use std::future::Future;
use std::sync::Arc;

#[derive(Clone)]
pub struct AdminState {
    pub metrics: Arc<Metrics>,
    pub verifier: Arc<TokenVerifier>,
    pub audit: AuditLog,
}

pub async fn serve(
    listener: tokio::net::TcpListener,
    state: AdminState,
    shutdown: impl Future<Output = ()> + Send + 'static,
) {
    let app = Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .with_state(state);
    if let Err(e) = axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await
    {
        tracing::error!(error = %e, "admin server failed");
    }
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

async fn readyz(State(state): State<AdminState>) -> impl IntoResponse {
    if !state.verifier.is_ready() {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "not ready: identity provider keys not loaded\n",
        )
    } else if !state.audit.is_healthy() {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "not ready: the audit log cannot be written\n",
        )
    } else if state.audit.spool_full() {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "not ready: the audit spool is full (the broker is behind)\n",
        )
    } else {
        (StatusCode::OK, "ready\n")
    }
}
