//! What one member tells its operators over HTTP: `/metrics` (Prometheus text, every metric in
//! one place here), `/healthz` (the process runs) and `/readyz` (the member knows a leader and
//! has applied what it holds, so it can serve).
//!
//! Raft's own figures (role, term, log and snapshot indices) and the request counts are read
//! when scraped; leader changes, commit latency, purges and errors are counted as they happen.

use crate::store::{NodeId, Raft, StateMachine};
use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use openraft::ServerState;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
use std::future::Future;
use std::sync::Arc;

/// A member whose applied index trails its log by more than this is still catching up.
const READY_LAG: u64 = 1_000;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StateLabel {
    pub state: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabel {
    pub kind: &'static str,
}

#[derive(Debug)]
pub struct Metrics {
    /// Times this member saw a new leader (its own election included).
    pub leader_changes: Counter,
    /// From proposing an entry to its being committed and applied on the leader.
    pub commit_seconds: Histogram,
    /// Proposals that did not commit: no quorum in time, not the leader, Raft stopped.
    pub commit_errors: Counter,
    /// Raft RPCs to other members that failed, by RPC (`append_entries`, `vote`,
    /// `install_snapshot`).
    pub peer_rpc_errors: Family<KindLabel, Counter>,
    /// Settled requests and ended grants forgotten by retention.
    pub purged: Family<KindLabel, Counter>,
    /// Calls the gate refused before reading their body (no or wrong credentials, an
    /// operator on `Raft`), by service (`Coordinator`, `Cluster`, `Raft`).
    pub refused_calls: Family<KindLabel, Counter>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self {
            leader_changes: Counter::default(),
            // 0.5 ms … 8 s: a commit is an fsync on a quorum, seconds mean trouble.
            commit_seconds: Histogram::new(exponential_buckets(0.0005, 2.0, 15)),
            commit_errors: Counter::default(),
            peer_rpc_errors: Family::default(),
            purged: Family::default(),
            refused_calls: Family::default(),
        }
    }
}

impl Metrics {
    /// Counts leader changes as this member sees them, for as long as Raft runs.
    pub fn watch_leader(self: &Arc<Self>, raft: &Raft) -> tokio::task::JoinHandle<()> {
        let mut rx = raft.metrics();
        let metrics = self.clone();
        tokio::spawn(async move {
            let mut leader: Option<NodeId> = None;
            loop {
                let now = rx.borrow_and_update().current_leader;
                if now.is_some() && now != leader {
                    metrics.leader_changes.inc();
                }
                if now.is_some() {
                    leader = now;
                }
                if rx.changed().await.is_err() {
                    return;
                }
            }
        })
    }

    /// The Prometheus text exposition, Raft's figures and the request counts read now.
    pub fn encode(&self, raft: &Raft, sm: &StateMachine, now: crate::approvals::Millis) -> String {
        let m = raft.metrics().borrow().clone();
        let gauge = |v: u64| {
            let g = Gauge::<i64>::default();
            g.set(v as i64);
            g
        };
        let requests = Family::<StateLabel, Gauge>::default();
        let grants = Gauge::<i64>::default();
        sm.read(|s| {
            for r in s.requests.values() {
                requests
                    .get_or_create(&StateLabel {
                        state: r.state_at(now),
                    })
                    .inc();
            }
            grants.set(s.grants.len() as i64);
        });
        let mut registry = Registry::with_prefix("vigil_coordinator");
        registry.register(
            "is_leader",
            "1 while this member is the leader",
            gauge(u64::from(m.state == ServerState::Leader)),
        );
        registry.register("term", "The current Raft term", gauge(m.current_term));
        registry.register(
            "last_log_index",
            "The last entry in this member's Raft log",
            gauge(m.last_log_index.unwrap_or(0)),
        );
        registry.register(
            "last_applied_index",
            "The last entry applied to this member's state",
            gauge(m.last_applied.map_or(0, |l| l.index)),
        );
        registry.register(
            "snapshot_index",
            "The last entry in this member's latest snapshot",
            gauge(m.snapshot.map_or(0, |l| l.index)),
        );
        registry.register(
            "leader_changes",
            "Leaders this member has seen elected",
            self.leader_changes.clone(),
        );
        registry.register(
            "commit_seconds",
            "Time from proposing an entry to its commit and apply (leader)",
            self.commit_seconds.clone(),
        );
        registry.register(
            "commit_errors",
            "Proposals that did not commit (no quorum in time, not the leader)",
            self.commit_errors.clone(),
        );
        registry.register(
            "peer_rpc_errors",
            "Raft RPCs to other members that failed, by RPC",
            self.peer_rpc_errors.clone(),
        );
        registry.register(
            "refused_calls",
            "Calls refused on their headers, before their body was read, by service",
            self.refused_calls.clone(),
        );
        registry.register(
            "requests",
            "Approval requests held, by state (settled ones until retention forgets them)",
            requests,
        );
        registry.register("grants", "Grants held", grants);
        registry.register(
            "purged",
            "Settled requests and ended grants forgotten by retention, by kind",
            self.purged.clone(),
        );
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &registry);
        out
    }
}

/// Why this member cannot serve now, if it cannot.
pub fn not_ready(raft: &Raft) -> Option<&'static str> {
    let m = raft.metrics().borrow().clone();
    if m.running_state.is_err() {
        return Some("Raft has stopped");
    }
    if m.current_leader.is_none() {
        return Some("no leader is known (an election, or no quorum in reach)");
    }
    if m.membership_config.membership().get_node(&m.id).is_none() {
        return Some("this member is not in the cluster's membership");
    }
    let applied = m.last_applied.map_or(0, |l| l.index);
    if m.last_log_index.unwrap_or(0).saturating_sub(applied) > READY_LAG {
        return Some("catching up: its applied state trails its log");
    }
    None
}

#[derive(Clone)]
struct HttpState {
    metrics: Arc<Metrics>,
    raft: Raft,
    sm: StateMachine,
}

/// Serves `/metrics`, `/healthz` and `/readyz` on `listener` until `shutdown`.
pub async fn serve(
    listener: tokio::net::TcpListener,
    metrics: Arc<Metrics>,
    raft: Raft,
    sm: StateMachine,
    shutdown: impl Future<Output = ()> + Send + 'static,
) {
    let app = Router::new()
        .route("/metrics", get(scrape))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .with_state(HttpState { metrics, raft, sm });
    if let Err(e) = axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await
    {
        tracing::error!(error = %e, "metrics server failed");
    }
}

async fn scrape(State(s): State<HttpState>) -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        s.metrics.encode(&s.raft, &s.sm, crate::service::now_ms()),
    )
}

async fn readyz(State(s): State<HttpState>) -> impl IntoResponse {
    match not_ready(&s.raft) {
        None => (StatusCode::OK, "ready\n".to_string()),
        Some(why) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: {why}\n"),
        ),
    }
}
