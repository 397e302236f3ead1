//! One client connection: each request authenticated, routed to its cluster, classified,
//! decided, recorded, and forwarded with the caller impersonated; the answer streamed back
//! (watches and `logs -f` without buffering) and recorded when it ends.

use super::answer::{Count, Done, Tap};
use super::redact::Holds;
use super::request_info::{self, RequestInfo};
use super::stream::{Framing, Purpose};
use super::websocket::{self, StreamKind};
use super::{Cluster, KubeContext, PROTOCOL};
use crate::core::approvals::{Hold, Step, Verdict};
use crate::core::lifecycle::{end_after_grace, SessionGuard, Sessions};
use crate::core::proxy_protocol::Origin;
use crate::core::trace::Stmt;
use crate::core::Refusal;
use crate::policy::kube::{self, KubeAction};
use crate::policy::masking::{Counts, Masker};
use crate::policy::{Action, Decision, Policy};
use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Request, Response, StatusCode};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use sha2::{Digest, Sha256};
use std::borrow::Cow;
use std::convert::Infallible;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio_rustls::server::TlsStream;
use tracing::Instrument as _;
use vigil_coordinator::approvals::{ActionKey, Scope};
use vigil_proto::coordinator as pb;
use vigil_proto::record::{
    Body as RecordBody, Connection, Kind, KubeError, KubeRequest, KubeResponse, Outcome, Parties,
    Principal, Request as RecordRequest, Response as RecordResponse,
};

/// The body sent upstream (a request's whole body, read before it was decided).
pub type OutBody = Full<Bytes>;
/// The body sent to the client.
type ClientBody = BoxBody<Bytes, hyper::Error>;

/// A client connection, and the session it is once a request authenticated.
struct Conn {
    ctx: Arc<KubeContext>,
    session: String,
    /// Who the client is (the peer, or the client behind a load balancer).
    origin: Origin,
    /// The principal of the session (its first authenticated request).
    principal: Mutex<Option<Arc<Principal>>>,
    /// The principal and connection of the last record, serialised once: the next request of
    /// the same principal to the same cluster shares them.
    parties: Mutex<Option<Arc<Parties>>>,
    stmt: AtomicU64,
    started: Instant,
    /// The session's recording file (exec and attach streams), made at the first one.
    recording: tokio::sync::OnceCell<Arc<crate::audit::RecordingFile>>,
    /// The listener's sessions: a switched stream outlives its connection and counts too.
    sessions: Sessions,
    /// Counts the connection for the node's drain until its end is on record; `None` once
    /// it is (see [`Conn::write_end`]).
    open: Mutex<Option<SessionGuard>>,
    /// The session's trace span (core/trace.rs), the parent of its requests' spans.
    trace: tracing::Span,
}

/// Changes (its sender dropped) when a request's client has gone away.
type Left = watch::Receiver<()>;

/// Serves one TLS connection (HTTP/1.1 or HTTP/2) until it closes; then ends its session.
pub async fn connection(
    ctx: Arc<KubeContext>,
    stream: TlsStream<TcpStream>,
    origin: Origin,
    sessions: Sessions,
    open: SessionGuard,
) {
    let session = crate::core::new_session_id();
    let trace =
        crate::core::trace::session(PROTOCOL, &session, ctx.core.audit.node(), &origin.client);
    let conn = Arc::new(Conn {
        session,
        trace,
        ctx: ctx.clone(),
        origin,
        principal: Mutex::new(None),
        parties: Mutex::new(None),
        stmt: AtomicU64::new(0),
        started: Instant::now(),
        recording: tokio::sync::OnceCell::new(),
        sessions,
        open: Mutex::new(Some(open)),
    });
    let service = {
        let conn = conn.clone();
        hyper::service::service_fn(move |req| {
            let conn = conn.clone();
            // Requests run on tasks of their own: their log events name the session.
            let span = conn.trace.clone();
            async move {
                // hyper drops this future when its client goes away mid-request (an HTTP/1
                // connection closed, an HTTP/2 stream reset). The request runs on to its end:
                // once decided (an approval consumed, its record written) it reaches the API
                // server and its answer is on record. Only a wait for approval ends when the
                // client leaves (`gone` dropped, see `hold`).
                let (gone, left) = watch::channel(());
                let run =
                    tokio::spawn(async move { conn.handle(req, left).await }.instrument(span));
                let response = run.await.unwrap_or_else(|_| {
                    let why = "the gateway failed while handling this request";
                    status(StatusCode::INTERNAL_SERVER_ERROR, "InternalError", why)
                });
                drop(gone);
                Ok::<_, Infallible>(response)
            }
        })
    };
    let builder = crate::core::http::builder(
        ctx.config.max_header_bytes,
        Some(crate::core::http::KUBE_MAX_STREAMS),
    );
    let io = hyper_util::rt::TokioIo::new(stream);
    {
        let serving = builder.serve_connection_with_upgrades(io, service);
        tokio::pin!(serving);
        // Draining: the request in flight finishes (HTTP/2 gets GOAWAY), then the connection
        // closes; a watch or log stream still open at the drain deadline is cut.
        let lifecycle = &ctx.core.lifecycle;
        let served = tokio::select! {
            served = serving.as_mut() => served,
            () = lifecycle.draining() => {
                serving.as_mut().graceful_shutdown();
                tokio::select! {
                    served = serving.as_mut() => served,
                    () = lifecycle.ended() => Ok(()),
                }
            }
        };
        if let Err(e) = served {
            tracing::debug!(error = %e, "kubernetes connection ended with an error");
        }
    }
    // What of the session still runs (a request whose client left, an answer still streaming,
    // a switched stream) holds the connection: its end is written when the last lets go, or
    // END_GRACE from now at the latest.
    end_after_grace(conn, |conn| {
        conn.write_end(Some(
            "written when the grace after the connection closed was over, while a request or stream of it still ran",
        ))
    });
}

/// What the client is told about a refusal: a Kubernetes `Status`.
fn status(code: StatusCode, reason: &str, message: &str) -> Response<ClientBody> {
    let body = super::websocket::failure_status(message, reason, code.as_u16());
    let mut resp = Response::new(full(Bytes::from(body)));
    *resp.status_mut() = code;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    resp
}

fn full(bytes: Bytes) -> ClientBody {
    Full::new(bytes).map_err(|never| match never {}).boxed()
}

/// A refused request: its status, reason and message, and the record's outcome.
struct Refused {
    code: StatusCode,
    reason: &'static str,
    message: String,
    outcome: Outcome,
}

impl Refused {
    fn new(code: StatusCode, reason: &'static str, message: impl Into<String>) -> Self {
        let outcome = match code {
            StatusCode::UNAUTHORIZED => Outcome::Denied,
            StatusCode::SERVICE_UNAVAILABLE | StatusCode::BAD_GATEWAY => Outcome::Error,
            _ => Outcome::Blocked,
        };
        Self {
            code,
            reason,
            message: message.into(),
            outcome,
        }
    }
}

/// Everything known about a request once it is routed and classified.
struct Routed {
    cluster: Arc<Cluster>,
    info: RequestInfo,
    /// The path after the cluster prefix.
    path: String,
    query: Option<String>,
    command: Vec<String>,
    /// exec, attach and port-forward: how the request asks to switch protocols.
    switch: Option<Switch>,
    /// port-forward: the ports its query names.
    ports: Vec<u16>,
    /// The request's `Content-Type` (given at most once): what a patch is, and part of what an
    /// approval binds.
    content_type: Option<String>,
    /// The client's side of the switched connection, once switched.
    upgrade: Option<hyper::upgrade::OnUpgrade>,
}

/// How an exec, attach or port-forward asks to switch protocols.
enum Switch {
    Spdy,
    WebSocket {
        kind: StreamKind,
        key: String,
        /// The subprotocols the client offered that Vigil reads, in the client's order: the
        /// only ones the API server is offered.
        offered: Vec<String>,
    },
    /// A port-forward tunnelling SPDY through WebSocket (`SPDY/3.1+portforward.k8s.io`,
    /// kubectl 1.30 and later): the gateway ends the WebSocket itself and speaks SPDY/3.1 to
    /// the API server, which every version serves (API servers before 1.30 have no tunnel).
    Tunnel {
        key: String,
    },
}

impl Conn {
    fn connection(&self, cluster: Option<&str>) -> Arc<Connection> {
        Arc::new(Connection {
            client_tls: true,
            name: cluster.map(str::to_string),
            target: cluster
                .and_then(|c| self.ctx.clusters.get(c))
                .map(|c| c.config.server.clone()),
            ..self.origin.connection(PROTOCOL)
        })
    }

    fn body(
        &self,
        kind: Kind,
        principal: Option<&Arc<Principal>>,
        cluster: Option<&str>,
    ) -> RecordBody {
        let mut b = self.ctx.core.audit.body(Some(&self.session), kind);
        match principal {
            Some(p) => self.parties(p, cluster).fill(&mut b),
            None => b.connection = Some(self.connection(cluster)),
        }
        b
    }

    /// `principal` and the connection to `cluster`, serialised: the last ones when they are
    /// these, else made (and kept for the next record).
    fn parties(&self, principal: &Arc<Principal>, cluster: Option<&str>) -> Arc<Parties> {
        let mut last = self.parties.lock().unwrap_or_else(|e| e.into_inner());
        match last.as_ref() {
            Some(p)
                if Arc::ptr_eq(p.principal(), principal)
                    && p.connection().name.as_deref() == cluster =>
            {
                p.clone()
            }
            _ => {
                let made = Parties::new(principal.clone(), self.connection(cluster));
                *last = Some(made.clone());
                made
            }
        }
    }

    /// `principal`, as the last record's `Arc` when it is the same principal (so that record's
    /// serialised parties serve again).
    fn shared(&self, principal: Principal) -> Arc<Principal> {
        let last = self.parties.lock().unwrap_or_else(|e| e.into_inner());
        match last.as_ref() {
            Some(p) if **p.principal() == principal => p.principal().clone(),
            _ => Arc::new(principal),
        }
    }

    /// One request; `left` changes (its sender dropped) when the client goes away.
    async fn handle(
        self: &Arc<Self>,
        mut req: Request<Incoming>,
        left: Left,
    ) -> Response<ClientBody> {
        let started = Instant::now();
        let upgrade = req
            .headers()
            .contains_key(header::UPGRADE)
            .then(|| hyper::upgrade::on(&mut req));
        let principal = match self.authenticate(req.headers()).await {
            Ok(p) => p,
            Err(r) => return self.refuse_unauthenticated(&req, r),
        };
        let routed = match self.route(&req, &principal) {
            Ok(mut r) => {
                r.upgrade = upgrade;
                r
            }
            Err((cluster, r)) => {
                let (request, _) = self.unrouted(&req);
                return self.refuse(&principal, cluster.as_deref(), request, None, r);
            }
        };
        let (parts, incoming) = req.into_parts();
        let limit = self.ctx.config.max_request_body_bytes;
        // A body must come whole within its time, as on the node's other listeners.
        let within = crate::core::http::BODY_READ_TIMEOUT;
        let collected = tokio::time::timeout(within, Limited::new(incoming, limit).collect())
            .await
            .unwrap_or_else(|_| {
                Err(format!(
                    "the request body did not come within {} s",
                    within.as_secs()
                )
                .into())
            });
        let body = match collected {
            Ok(b) => b.to_bytes(),
            Err(e) => {
                let request = kube_request_parts(&parts, &routed, None);
                let r = if e
                    .downcast_ref::<http_body_util::LengthLimitError>()
                    .is_some()
                {
                    Refused::new(
                        StatusCode::PAYLOAD_TOO_LARGE,
                        "RequestEntityTooLarge",
                        format!("the request body is larger than {limit} bytes"),
                    )
                } else {
                    Refused::new(
                        StatusCode::BAD_REQUEST,
                        "BadRequest",
                        format!("the request body could not be read: {e}"),
                    )
                };
                return self.refuse(
                    &principal,
                    Some(&routed.cluster.config.name),
                    request,
                    None,
                    r,
                );
            }
        };
        self.decide_and_forward(principal, routed, parts, body, started, left)
            .await
    }

    /// The caller's principal: a valid token, of the session's principal once there is one.
    async fn authenticate(&self, headers: &HeaderMap) -> Result<Arc<Principal>, Refused> {
        let token = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .ok_or_else(|| {
                Refused::new(
                    StatusCode::UNAUTHORIZED,
                    "Unauthorized",
                    "vigil: send a Vigil token as the bearer token (vigil kubeconfig sets it up)",
                )
            })?;
        let mut principal = self
            .ctx
            .core
            .verifier
            .verify(token.trim())
            .await
            .map_err(|e| {
                let code = if e == crate::core::identity::TokenError::ProviderUnavailable {
                    StatusCode::SERVICE_UNAVAILABLE
                } else {
                    StatusCode::UNAUTHORIZED
                };
                Refused::new(
                    code,
                    "Unauthorized",
                    format!("vigil: authentication failed: {e}"),
                )
            })?;
        principal.intent = headers
            .get("x-vigil-intent")
            .and_then(|v| v.to_str().ok())
            .map(|v| self.ctx.core.scrub(v));
        let mut session = self.principal.lock().unwrap_or_else(|e| e.into_inner());
        match session.as_ref() {
            Some(s) if s.subject != principal.subject || s.issuer != principal.issuer => {
                Err(Refused::new(
                    StatusCode::FORBIDDEN,
                    "Forbidden",
                    "vigil: one connection serves one principal; open another connection",
                ))
            }
            Some(_) => {
                drop(session);
                Ok(self.shared(principal))
            }
            None => {
                let p = Arc::new(principal);
                *session = Some(p.clone());
                drop(session);
                crate::core::trace::authenticated(&self.trace, &p.subject, None);
                let mut start = self.body(Kind::SessionStart, Some(&p), None);
                start.outcome = Some(Outcome::Success);
                self.ctx.core.audit.record(start);
                self.ctx.core.metrics.active_sessions.inc();
                Ok(p)
            }
        }
    }

    /// The cluster the path names, the caller's right to it, and what the request is.
    fn route(
        &self,
        req: &Request<Incoming>,
        principal: &Principal,
    ) -> Result<Routed, (Option<String>, Refused)> {
        let full = req.uri().path();
        let (name, path) = split_cluster(full).unwrap_or(("", "/"));
        let not_found = || {
            Refused::new(
                StatusCode::NOT_FOUND,
                "NotFound",
                format!("vigil: no cluster at {full:?}; the server URL is https://GATEWAY/clusters/NAME"),
            )
        };
        let cluster = self
            .ctx
            .clusters
            .get(name)
            .cloned()
            .ok_or((None, not_found()))?;
        let named = Some(cluster.config.name.clone());
        if let Some(reserved) = reserved_identity(principal, &cluster.config.group_prefix) {
            return Err((
                named,
                Refused::new(
                    StatusCode::FORBIDDEN,
                    "Forbidden",
                    format!("vigil: {reserved} is reserved: Kubernetes keeps names that begin with system: for its own identities (system:masters passes every authorization check) and trims blanks at a name's ends; Vigil does not impersonate it (give the cluster a group_prefix)"),
                ),
            ));
        }
        if !cluster.config.allow.admits(principal) {
            return Err((
                named,
                Refused::new(
                    StatusCode::FORBIDDEN,
                    "Forbidden",
                    format!("vigil: {} may not use cluster {name:?}", principal.subject),
                ),
            ));
        }
        if let Some(h) = req
            .headers()
            .keys()
            .find(|k| k.as_str().starts_with("impersonate-"))
        {
            return Err((
                named,
                Refused::new(
                    StatusCode::FORBIDDEN,
                    "Forbidden",
                    format!("vigil: the client may not impersonate ({h}); Vigil impersonates the caller itself"),
                ),
            ));
        }
        let content_type = content_type(req.headers()).map_err(|why| {
            (
                named.clone(),
                Refused::new(
                    StatusCode::BAD_REQUEST,
                    "BadRequest",
                    format!("vigil: {why}"),
                ),
            )
        })?;
        let query = req.uri().query().map(str::to_string);
        let info =
            request_info::classify(req.method().as_str(), path, query.as_deref()).map_err(|e| {
                (
                    named.clone(),
                    Refused::new(StatusCode::BAD_REQUEST, "BadRequest", format!("vigil: {e}")),
                )
            })?;
        let switch = stream_switch(&info, req.headers())
            .map_err(|(code, reason, why)| (named.clone(), Refused::new(code, reason, why)))?;
        let ports = match info.subresource.as_str() {
            "portforward" => query_ports(query.as_deref()).map_err(|why| {
                (
                    named.clone(),
                    Refused::new(
                        StatusCode::BAD_REQUEST,
                        "BadRequest",
                        format!("vigil: {why}"),
                    ),
                )
            })?,
            _ => Vec::new(),
        };
        let mut switch = switch;
        if let Some(Switch::WebSocket {
            kind: StreamKind::PortForward,
            offered,
            key,
        }) = &switch
        {
            // SPDY tunnelled through WebSocket names the ports per stream; over channels they
            // are those of the query.
            if offered.iter().any(|p| p == websocket::SPDY_TUNNEL) {
                switch = Some(Switch::Tunnel { key: key.clone() });
            } else if ports.is_empty() {
                return Err((
                    named,
                    Refused::new(
                        StatusCode::BAD_REQUEST,
                        "BadRequest",
                        "vigil: a port-forward over WebSocket channels names its ports in the query (ports=N)",
                    ),
                ));
            }
        }
        let command = query
            .as_deref()
            .map(|q| {
                url_pairs(q)
                    .filter(|(k, _)| k == "command")
                    .map(|(_, v)| v)
                    .collect()
            })
            .unwrap_or_default();
        Ok(Routed {
            cluster,
            info,
            path: path.to_string(),
            query,
            command,
            switch,
            ports,
            content_type,
            upgrade: None,
        })
    }

    async fn decide_and_forward(
        self: &Arc<Self>,
        principal: Arc<Principal>,
        routed: Routed,
        parts: http::request::Parts,
        body: Bytes,
        started: Instant,
        left: Left,
    ) -> Response<ClientBody> {
        let cluster_name = routed.cluster.config.name.clone();
        let mut routed = routed;
        // A body the API server decodes must be in a format Vigil reads as it does.
        if let Err(why) = body_format(&routed.info, &body, routed.content_type.as_deref()) {
            let request = kube_request_parts(&parts, &routed, Some(&body));
            let r = Refused::new(StatusCode::FORBIDDEN, "Forbidden", format!("vigil: {why}"));
            return self.refuse(&principal, Some(&cluster_name), request, None, r);
        }
        // What the record shows of a body must be what the API server reads (see keys.rs).
        if let Some(fault) = body_fault(&body, routed.content_type.as_deref()) {
            let request = kube_request_parts(&parts, &routed, Some(&body));
            let r = Refused::new(
                StatusCode::BAD_REQUEST,
                "BadRequest",
                format!("vigil: {fault}"),
            );
            return self.refuse(&principal, Some(&cluster_name), request, None, r);
        }
        // A create names its object in the body: the API server's record names it, and so do
        // Vigil's record and the decision. A body Vigil cannot read is refused.
        if routed.info.verb == "create"
            && routed.info.name.is_empty()
            && routed.info.subresource.is_empty()
        {
            match created_name(&body) {
                Ok(name) => routed.info.name = name,
                Err(why) => {
                    let request = kube_request_parts(&parts, &routed, Some(&body));
                    let r = Refused::new(
                        StatusCode::BAD_REQUEST,
                        "BadRequest",
                        format!("vigil: {why}"),
                    );
                    return self.refuse(&principal, Some(&cluster_name), request, None, r);
                }
            }
        }
        let decision = self.decide(&principal, &routed);
        let info = &routed.info;
        let mut request = kube_request_parts(&parts, &routed, Some(&body));
        let holds = Holds::of(&info.resource, &info.subresource);
        let limit = self.ctx.config.max_record_body_bytes;
        let (recorded_body, mut masked) =
            self.masked(super::redact::audit_copy(&body, holds, limit));
        request.body = recorded_body;
        mask_line(&self.ctx.core.masker, &mut request, &mut masked);
        let stmt = self.next_stmt();
        let mut rec = self.body(Kind::Request, Some(&principal), Some(&cluster_name));
        rec.stmt = Some(stmt.n);
        rec.masked = masked;
        rec.policy = Some(self.ctx.policy.reference(&decision));
        rec.detail = decision.dry_run_note();
        match decision.action {
            Action::Allow => {}
            Action::Block => {
                let why = decision
                    .reason
                    .clone()
                    .unwrap_or_else(|| "the policy does not allow it".into());
                let refusal = Refusal::Blocked {
                    rule: decision.rule.clone(),
                    reason: why,
                };
                return self.refuse_record(rec, request, refusal_status(&refusal), &stmt);
            }
            Action::RequireApproval => {
                let verdict = self
                    .hold(
                        &principal,
                        &cluster_name,
                        &decision,
                        &parts,
                        &routed,
                        &body,
                        &request,
                        stmt.n,
                        left,
                    )
                    .await;
                // Its record says what happened after the wait, so it bears the time it ended.
                rec.time = crate::audit::now_rfc3339();
                match verdict {
                    Verdict::Run(approval) => rec.approval = Some(approval),
                    Verdict::Refuse { refusal, approval } => {
                        rec.approval = approval;
                        return self.refuse_record(rec, request, refusal_status(&refusal), &stmt);
                    }
                }
            }
        }
        rec.request = Some(RecordRequest::Kubernetes(request));
        if let Err(e) = self.ctx.core.audit.append(&rec).await {
            let refusal = Refusal::AuditUnwritable {
                spool_full: matches!(e, crate::audit::AuditError::SpoolFull { .. }),
                why: e.to_string(),
            };
            rec.kind = Kind::Blocked;
            let Some(RecordRequest::Kubernetes(request)) = rec.request.take() else {
                unreachable!("set above")
            };
            return self.refuse_record(rec, request, refusal_status(&refusal), &stmt);
        }
        let mut routed = routed;
        let client_side = routed.upgrade.take();
        let upstream = match upstream_request(&routed, &principal, &self.session, parts, body) {
            Ok(u) => u,
            Err(why) => {
                return self.respond_error(&principal, &cluster_name, &stmt, started, why);
            }
        };
        if let Some(client_side) = client_side {
            return self
                .switch(
                    &routed,
                    upstream,
                    client_side,
                    &principal,
                    &cluster_name,
                    stmt,
                    started,
                )
                .await;
        }
        match routed.cluster.send(upstream).await {
            Ok(resp) => self.relay(resp, &principal, &cluster_name, stmt, &routed.info, started),
            Err((code, why)) => {
                self.respond_status(&principal, &cluster_name, &stmt, started, code, why)
            }
        }
    }

    /// The policy's decision on a request ([`decide`]).
    fn decide(&self, principal: &Principal, routed: &Routed) -> Decision {
        decide(
            &self.ctx.policy,
            principal,
            &routed.cluster.config.name,
            &routed.info,
            &routed.command,
            routed.content_type.as_deref(),
        )
    }

    /// Holds a request for approval: bound to the cluster, the method, the path with its query
    /// and the body's digest.
    #[allow(clippy::too_many_arguments)]
    async fn hold(
        &self,
        principal: &Arc<Principal>,
        cluster: &str,
        decision: &Decision,
        parts: &http::request::Parts,
        routed: &Routed,
        body: &Bytes,
        request: &KubeRequest,
        stmt: u64,
        mut left: Left,
    ) -> Verdict {
        let spec = match crate::core::approvals::spec_of(decision) {
            Ok(s) => s,
            Err(refused) => return *refused,
        };
        let path = match &routed.query {
            Some(q) => format!("{}?{q}", routed.path),
            None => routed.path.clone(),
        };
        let shown_body = request.body.clone().unwrap_or_default();
        let exact = std::str::from_utf8(body).ok();
        // The record's request line is masked ([`mask_line`]): the approver sees that copy.
        let line_masked = request.path != routed.path
            || request.query != routed.query
            || request.command != routed.command;
        if exact != Some(shown_body.as_str()) && !body.is_empty() || line_masked {
            return Verdict::Refuse {
                refusal: Refusal::Unbound {
                    rule: decision.rule.clone(),
                    why: "the request holds values the approver may not see (a Secret, a masked value, or a body too large to show); it cannot be shown faithfully".into(),
                },
                approval: None,
            };
        }
        let digest = hex::encode(Sha256::digest(body));
        let content_type = routed.content_type.as_deref().unwrap_or_default();
        let hash = action_hash(parts.method.as_str(), &path, content_type, &digest);
        let mut record = Step::recorder(
            self.ctx.core.audit.clone(),
            self.body(Kind::ApprovalRequested, Some(principal), Some(cluster)),
            stmt,
            RecordRequest::Kubernetes(request.clone()),
            self.ctx.policy.reference(decision),
        );
        // The content type is part of what runs (a strategic-merge patch and a merge patch of
        // the same body do different things): the approver reads it.
        let action = match &routed.content_type {
            Some(t) => format!("{} {path} (Content-Type: {t})", parts.method),
            None => format!("{} {path}", parts.method),
        };
        let hold = Hold {
            principal,
            key: ActionKey {
                scope: Scope::new(PROTOCOL, cluster),
                hash,
            },
            place: routed.cluster.config.server.clone(),
            action: &action,
            shown: pb::ShownAction {
                protocol: Some(pb::shown_action::Protocol::Kubernetes(pb::KubeRequest {
                    method: parts.method.to_string(),
                    path: path.clone(),
                    body: shown_body,
                    body_sha256: digest,
                })),
            },
            rule: &decision.rule,
            reason: decision.reason.as_deref(),
            spec,
        };
        // A request runs under its token: the wait ends when the token does (a PostgreSQL or
        // SSH session, and with it its held statement, ends then too).
        let expires = self.ctx.core.verifier.session_deadline(principal);
        let left = async move {
            tokio::select! {
                _ = left.changed() => crate::core::approvals::CLIENT_LEFT,
                () = crate::core::lifecycle::until(expires) => crate::core::approvals::TOKEN_EXPIRED,
            }
        };
        self.ctx
            .core
            .approvals
            .settle(hold, &mut record, left)
            .await
    }

    /// exec, attach and port-forward: the request goes to the API server over HTTP/1.1; when
    /// it switches protocols to one Vigil reads (SPDY/3.1, or WebSocket with a subprotocol
    /// that was offered), so does the client, and the streams are relayed and recorded
    /// ([`super::stream`]). A tunnelled port-forward is switched to SPDY/3.1 upstream, and
    /// the gateway answers the client's WebSocket handshake itself. Any other answer goes back
    /// as it is.
    #[allow(clippy::too_many_arguments)]
    async fn switch(
        self: &Arc<Self>,
        routed: &Routed,
        upstream: Request<OutBody>,
        client_side: hyper::upgrade::OnUpgrade,
        principal: &Arc<Principal>,
        cluster: &str,
        stmt: Stmt,
        started: Instant,
    ) -> Response<ClientBody> {
        let audit = &self.ctx.core.audit;
        let file = match self
            .recording
            .get_or_try_init(|| audit.recording_file(&self.session))
            .await
        {
            Ok(f) => f.clone(),
            Err(e) => {
                let why = format!("vigil: the gateway cannot record this stream: {e}");
                return self.respond_error(principal, cluster, &stmt, started, why);
            }
        };
        let mut resp = match routed.cluster.send(upstream).await {
            Ok(r) => r,
            Err((code, why)) => {
                return self.respond_status(principal, cluster, &stmt, started, code, why);
            }
        };
        if resp.status() != StatusCode::SWITCHING_PROTOCOLS {
            return self.relay(resp, principal, cluster, stmt, &routed.info, started);
        }
        let framing = match &routed.switch {
            Some(Switch::WebSocket { kind, key, offered }) => {
                websocket::check_server_upgrade(*kind, resp.status(), resp.headers(), key, offered)
                    .map(Framing::WebSocket)
                    .map_err(|e| e.to_string())
            }
            Some(Switch::Tunnel { .. }) if spdy_upgrade(resp.headers()) => Ok(Framing::Tunnel),
            _ if spdy_upgrade(resp.headers()) => Ok(Framing::Spdy),
            _ => Err("the API server switched to something other than SPDY/3.1".into()),
        };
        let framing = match framing {
            Ok(f) => f,
            Err(e) => {
                let why = format!("vigil: the API server's switch cannot be followed: {e}");
                return self.respond_error(principal, cluster, &stmt, started, why);
            }
        };
        let server_side = hyper::upgrade::on(&mut resp);
        let streams = super::stream::Streams {
            ctx: self.ctx.clone(),
            _open: self.clone(),
            base: self.body(Kind::Response, Some(principal), Some(cluster)),
            stmt,
            file,
            started,
            framing,
            purpose: match routed.info.subresource.as_str() {
                "portforward" => Purpose::PortForward {
                    ports: routed.ports.clone(),
                },
                _ => Purpose::Exec,
            },
        };
        let open = self.sessions.enter();
        tokio::spawn(async move {
            let _open = open;
            match tokio::try_join!(client_side, server_side) {
                Ok((client, server)) => super::stream::relay(streams, client, server).await,
                Err(e) => tracing::warn!(error = %e, "kubernetes stream did not switch"),
            }
        });
        let mut answer = Response::new(full(Bytes::new()));
        *answer.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
        *answer.headers_mut() = match &routed.switch {
            Some(Switch::Tunnel { key }) => tunnel_handshake(key),
            _ => resp.headers().clone(),
        };
        answer
    }

    /// Streams the API server's answer back; its record is written when the body ends.
    fn relay(
        self: &Arc<Self>,
        resp: Response<Incoming>,
        principal: &Arc<Principal>,
        cluster: &str,
        stmt: Stmt,
        info: &RequestInfo,
        started: Instant,
    ) -> Response<ClientBody> {
        let (mut parts, incoming) = resp.into_parts();
        let hop: Vec<HeaderName> = parts
            .headers
            .keys()
            .filter(|k| hop_by_hop(k))
            .cloned()
            .collect();
        for h in hop {
            parts.headers.remove(h);
        }
        let mut rec = self.body(Kind::Response, Some(principal), Some(cluster));
        rec.stmt = Some(stmt.n);
        let count = Count::of(info, &parts.headers);
        // A watch or a followed log streams for as long as the API server lets it: it ends
        // with the token, like the other protocols' sessions (`identity.session_expiry`).
        let expires = count
            .as_ref()
            .and_then(|_| self.ctx.core.verifier.session_deadline(principal));
        let done = Done {
            ctx: self.ctx.clone(),
            _open: self.clone(),
            rec,
            status: parts.status,
            holds: Holds::of(&info.resource, &info.subresource),
            started,
            span: stmt.span,
        };
        let mut tap = Tap::new(incoming, self.ctx.config.max_record_body_bytes, count, done);
        if let Some(at) = expires {
            tap.end_at(at, super::TOKEN_ENDED);
        }
        Response::from_parts(parts, tap.boxed())
    }

    fn respond_error(
        &self,
        principal: &Arc<Principal>,
        cluster: &str,
        stmt: &Stmt,
        started: Instant,
        why: String,
    ) -> Response<ClientBody> {
        let code = StatusCode::BAD_GATEWAY;
        self.respond_status(principal, cluster, stmt, started, code, why)
    }

    /// The answer, on record, to a request the gateway could not complete upstream: 502 (the
    /// API server could not be reached, or its answer cannot be followed) or 504 (it did not
    /// answer in time).
    fn respond_status(
        &self,
        principal: &Arc<Principal>,
        cluster: &str,
        stmt: &Stmt,
        started: Instant,
        code: StatusCode,
        why: String,
    ) -> Response<ClientBody> {
        let reason = match code {
            StatusCode::GATEWAY_TIMEOUT => "Timeout",
            _ => "ServiceUnavailable",
        };
        let mut rec = self.body(Kind::Response, Some(principal), Some(cluster));
        rec.stmt = Some(stmt.n);
        rec.outcome = Some(Outcome::Error);
        rec.duration_us = Some(started.elapsed().as_micros() as u64);
        rec.response = Some(RecordResponse::Kubernetes(KubeResponse {
            status: code.as_u16(),
            error: Some(KubeError {
                reason: reason.into(),
                message: why.clone(),
            }),
            ..KubeResponse::default()
        }));
        crate::core::trace::from_record(&stmt.span, &rec);
        self.ctx.core.audit.record(rec);
        status(code, reason, &why)
    }

    /// A request refused before it could be authenticated: a `session_start` refusal when the
    /// connection has no session yet, else a blocked request of the session.
    fn refuse_unauthenticated(&self, req: &Request<Incoming>, r: Refused) -> Response<ClientBody> {
        let session = self
            .principal
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let (mut request, cluster) = self.unrouted(req);
        let mut rec = match &session {
            None => self.body(Kind::SessionStart, None, cluster.as_deref()),
            Some(p) => self.body(Kind::Blocked, Some(p), cluster.as_deref()),
        };
        mask_line(&self.ctx.core.masker, &mut request, &mut rec.masked);
        rec.request = Some(RecordRequest::Kubernetes(request));
        rec.outcome = Some(r.outcome);
        rec.detail = Some(self.ctx.core.scrub(&r.message));
        self.ctx.core.audit.record(rec);
        status(r.code, r.reason, &r.message)
    }

    /// The record's request for a request refused before it was routed, and the cluster it
    /// names: as any other's, its path after the cluster's prefix and what it is (verb,
    /// resource, namespace, name), when it names a configured cluster and its path can be
    /// read; else the path as received, and no cluster.
    fn unrouted(&self, req: &Request<Incoming>) -> (KubeRequest, Option<String>) {
        let mut r = KubeRequest {
            method: req.method().to_string(),
            path: req.uri().path().to_string(),
            query: req.uri().query().map(str::to_string),
            ..KubeRequest::default()
        };
        let Some((name, path)) = split_cluster(&r.path)
            .filter(|(name, _)| self.ctx.clusters.contains_key(*name))
            .map(|(name, path)| (name.to_string(), path.to_string()))
        else {
            return (r, None);
        };
        if let Ok(info) = request_info::classify(&r.method, &path, r.query.as_deref()) {
            fill(&mut r, &info);
        }
        r.path = path;
        (r, Some(name))
    }

    fn refuse(
        &self,
        principal: &Arc<Principal>,
        cluster: Option<&str>,
        mut request: KubeRequest,
        policy: Option<vigil_proto::record::PolicyRef>,
        r: Refused,
    ) -> Response<ClientBody> {
        let stmt = self.next_stmt();
        let mut rec = self.body(Kind::Blocked, Some(principal), cluster);
        rec.stmt = Some(stmt.n);
        rec.policy = policy;
        mask_line(&self.ctx.core.masker, &mut request, &mut rec.masked);
        self.refuse_record(rec, request, r, &stmt)
    }

    /// The session's next request number, and the request's trace span.
    fn next_stmt(&self) -> Stmt {
        let n = self.stmt.fetch_add(1, Ordering::SeqCst) + 1;
        Stmt {
            n,
            span: crate::core::trace::statement(&self.trace, PROTOCOL, &self.session, n),
        }
    }

    /// Writes the refusal's record (what dry-run rules would have done after the reason) and
    /// answers with its `Status`.
    fn refuse_record(
        &self,
        mut rec: RecordBody,
        request: KubeRequest,
        r: Refused,
        stmt: &Stmt,
    ) -> Response<ClientBody> {
        rec.kind = Kind::Blocked;
        rec.request = Some(RecordRequest::Kubernetes(request));
        rec.outcome = Some(r.outcome);
        let message = self.ctx.core.scrub(&r.message);
        rec.detail = Some(crate::policy::with_note(&message, rec.detail.take()));
        tracing::info!(reason = %r.message, "kubernetes request refused");
        crate::core::trace::from_record(&stmt.span, &rec);
        self.ctx.core.audit.record(rec);
        status(r.code, r.reason, &r.message)
    }

    fn masked(
        &self,
        text: Option<String>,
    ) -> (Option<String>, std::collections::BTreeMap<String, u64>) {
        let mut counts = crate::policy::masking::Counts::new();
        let masked = text.map(|t| self.ctx.core.masker.mask_owned(t, Some(&mut counts)));
        (masked, counts)
    }
}

/// The session ends (if one started) when nothing of it can write another record: the
/// connection has closed, and no request still runs, no answer still streams and no switched
/// stream is open (each holds the connection, see [`super::Open`]); or [`END_GRACE`](crate::core::lifecycle::END_GRACE) after
/// the connection closed, whichever comes first.
impl Drop for Conn {
    fn drop(&mut self) {
        self.write_end(None);
    }
}

impl Conn {
    /// Writes the session's end, once (if it started), and lets the node's drain go on;
    /// `still`: what of the session still ran then.
    fn write_end(&self, still: Option<&str>) {
        let Some(open) = self.open.lock().unwrap_or_else(|e| e.into_inner()).take() else {
            return;
        };
        let principal = self
            .principal
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        if let Some(p) = principal {
            let mut rec = self.body(Kind::SessionEnd, Some(&p), None);
            rec.outcome = Some(Outcome::Success);
            rec.duration_us = Some(self.started.elapsed().as_micros() as u64);
            let requests = format!("{} requests", self.stmt.load(Ordering::SeqCst));
            rec.detail = Some(match still {
                Some(s) => format!("{requests}; {s}"),
                None => requests,
            });
            self.ctx.core.audit.record(rec);
            self.ctx.core.metrics.active_sessions.dec();
        }
        drop(open);
    }
}

/// The policy's decision on a request. Its actions are the request itself, or one per command
/// of an exec's command line (decided like an SSH exec line). An update or patch that may
/// create its object ([`kube::may_create`]: the API server then also authorises it as
/// `create`) is decided as well as the same request with the verb `create`, and the stricter
/// of the two decisions applies; the record keeps the API server's verb. A port-forward and a
/// proxy subresource ([`kube::only_by_rule`]) are refused unless a rule allows them, whatever
/// the default. A list or watch is decided as a `get`, a deletecollection as a `delete`, of
/// everything it reaches too, by the rules that block or hold
/// ([`Policy::decide_actions_reaching`]).
fn decide(
    policy: &Policy,
    principal: &Principal,
    cluster: &str,
    info: &RequestInfo,
    command: &[String],
    content_type: Option<&str>,
) -> Decision {
    let by_name = kube::only_by_rule(&info.verb, &info.resource, &info.subresource);
    let action = KubeAction {
        verb: &info.verb,
        api_group: &info.api_group,
        resource: &info.resource,
        subresource: &info.subresource,
        namespace: &info.namespace,
        name: &info.name,
        command: None,
        line: None,
        by_name: by_name.is_some(),
        all_namespaces: kube::across_namespaces(
            &info.verb,
            &info.api_group,
            &info.resource,
            &info.namespace,
        ),
        all_names: kube::whole_collection(&info.verb, &info.resource, &info.name),
    };
    // An exec's command is decided like an SSH exec line: each command of it on its own.
    let line = (!command.is_empty()).then(|| {
        let quoted: Vec<String> = command.iter().map(|a| shell_quote(a)).collect();
        crate::ssh::command::parse(&quoted.join(" ")).map_err(|e| e.to_string())
    });
    // Decided as `create` too: what may create its object.
    let creates = kube::may_create(
        &info.verb,
        &info.api_group,
        &info.resource,
        &info.subresource,
        content_type,
    );
    // An exec, attach or port-forward asked for with a GET (WebSocket) runs what the POST
    // (SPDY, `create`) runs: decided as that `create`, so that one rule covers both, and a
    // port-forward is allowed by name or not at all (the record keeps the API server's verb).
    let action = match kube::runs_like_create(&info.verb, &info.subresource) {
        true => KubeAction {
            verb: "create",
            ..action
        },
        false => action,
    };
    let mut variants = vec![action];
    if creates {
        variants.push(KubeAction {
            verb: "create",
            ..action
        });
    }
    // An eviction deletes its pod: decided as the pod's `delete` too.
    if kube::evicts(
        &info.verb,
        &info.api_group,
        &info.resource,
        &info.subresource,
    ) {
        variants.push(KubeAction {
            verb: "delete",
            subresource: "",
            ..action
        });
    }
    let actions: Result<Vec<KubeAction>, String> = match &line {
        None => Ok(variants),
        Some(Err(e)) => Err(format!("the exec command cannot be read: {e}")),
        Some(Ok(l)) => Ok(variants
            .iter()
            .flat_map(|v| {
                l.commands.iter().map(move |c| KubeAction {
                    command: Some(c),
                    line: Some(l),
                    ..*v
                })
            })
            .collect()),
    };
    // A list or watch gets, a deletecollection deletes, each object it reaches, and what
    // answers with the object as stored gets it: decided as that `get` or `delete` too, by
    // the rules that block or hold it.
    let reached: Vec<KubeAction> = kube::per_object_verbs(&info.verb)
        .iter()
        .map(|&verb| KubeAction { verb, ..action })
        .collect();
    let decision = policy.decide_actions_reaching(
        actions.as_deref().map_err(Clone::clone),
        &reached,
        principal,
        cluster,
    );
    match by_name {
        Some(what) => decision.only_by_rule(|| format!("no rule allows {what}")),
        None => decision,
    }
}

/// The request for the API server: the caller's, with the gateway's credential and the
/// caller impersonated; hop-by-hop headers, the caller's own credential and the headers
/// that would forge the API server's audit event ([`forges_audit`]) removed.
fn upstream_request(
    routed: &Routed,
    principal: &Principal,
    session: &str,
    parts: http::request::Parts,
    body: Bytes,
) -> Result<Request<OutBody>, String> {
    let c = &routed.cluster.config;
    let uri = match &routed.query {
        Some(q) => format!("{}{}?{q}", c.server.trim_end_matches('/'), routed.path),
        None => format!("{}{}", c.server.trim_end_matches('/'), routed.path),
    };
    let mut out = Request::builder()
        .method(parts.method.clone())
        .uri(&uri)
        .body(Full::new(body))
        .map_err(|e| format!("vigil: cannot build the request: {e}"))?;
    let headers = out.headers_mut();
    // The client's own switch goes on, but for a tunnel, which the gateway ends.
    let tunnel = matches!(routed.switch, Some(Switch::Tunnel { .. }));
    let upgrade = routed.switch.is_some() && !tunnel;
    for (name, value) in parts.headers.iter() {
        let switching = upgrade && (name == header::CONNECTION || name == header::UPGRADE);
        if (switching || !hop_by_hop(name))
            && name != header::AUTHORIZATION
            && name != header::HOST
            && name != header::SEC_WEBSOCKET_PROTOCOL
            && name != header::SEC_WEBSOCKET_EXTENSIONS
            && name != header::ACCEPT_ENCODING
            && !(tunnel && name.as_str().starts_with("sec-websocket-"))
            && !name.as_str().starts_with("x-vigil-")
            && !forges_audit(name)
        {
            headers.append(name.clone(), value.clone());
        }
    }
    if tunnel {
        // What kubectl sends for a SPDY port-forward; the method stays the client's (GET),
        // so the API server authorises and audits the verb Vigil decided.
        headers.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
        headers.insert(header::UPGRADE, HeaderValue::from_static("SPDY/3.1"));
        headers.insert(
            "x-stream-protocol-version",
            HeaderValue::from_static("portforward.k8s.io"),
        );
    }
    // Answers come uncompressed: a gzipped body (the API server compresses answers over 128
    // KiB for clients that accept it, as Go clients do) could be neither recorded, masked nor
    // counted.
    headers.insert(
        header::ACCEPT_ENCODING,
        HeaderValue::from_static("identity"),
    );
    let value = |v: &str| {
        HeaderValue::from_str(v).map_err(|_| format!("vigil: {v:?} cannot be sent in a header"))
    };
    // The API server may only choose a subprotocol Vigil reads, and no extension.
    if let Some(Switch::WebSocket { offered, .. }) = &routed.switch {
        if !offered.is_empty() {
            headers.insert(header::SEC_WEBSOCKET_PROTOCOL, value(&offered.join(", "))?);
        }
    }
    if let Some(token) = &routed.cluster.token {
        headers.insert(
            header::AUTHORIZATION,
            value(&format!("Bearer {}", token.expose()))?,
        );
    }
    headers.insert("impersonate-user", value(&principal.subject)?);
    // The identity the user name stands for: the issuer's subject (API servers from 1.22
    // on record it; earlier ones ignore the header).
    headers.insert(
        "impersonate-uid",
        value(&format!("{}#{}", principal.issuer, principal.subject))?,
    );
    for g in principal
        .groups
        .iter()
        .map(|g| format!("{}{g}", c.group_prefix))
        .chain(c.extra_groups.iter().cloned())
    {
        headers.append("impersonate-group", value(&g)?);
    }
    headers.insert("impersonate-extra-session-id", value(session)?);
    if let Some(model) = &principal.model {
        headers.insert("impersonate-extra-model", value(model)?);
    }
    Ok(out)
}

/// The caller's user name or one of its groups as the cluster would get them (with
/// `group_prefix`), if one is in the `system:` namespace: Kubernetes's own identities
/// (`system:masters`, `system:nodes`, `system:serviceaccount:…`, the control plane's
/// components), which an identity provider's name must never become.
/// The cluster a gateway path names, and the API server's path after it (`/` when none):
/// `/clusters/NAME/api/v1/pods` is `NAME` and `/api/v1/pods`. `None` without the prefix.
fn split_cluster(path: &str) -> Option<(&str, &str)> {
    let rest = path.strip_prefix(super::config::CLUSTER_PREFIX)?;
    Some(match rest.find('/') {
        Some(i) => rest.split_at(i),
        None => (rest, "/"),
    })
}

fn reserved_identity(principal: &Principal, group_prefix: &str) -> Option<String> {
    // The API server's header reader trims blanks: ` system:masters` arrives as
    // `system:masters`. A name with blanks or control characters at its ends is refused too.
    let reserved = |name: &str| {
        name.trim_matches(|c: char| c.is_whitespace() || c.is_control())
            .to_ascii_lowercase()
            .starts_with("system:")
            || name.trim() != name
    };
    if reserved(&principal.subject) {
        return Some(format!("the user name {:?}", principal.subject));
    }
    principal
        .groups
        .iter()
        .map(|g| format!("{group_prefix}{g}"))
        .find(|g| reserved(g))
        .map(|g| format!("the group {g:?}"))
}

/// How a core refusal reads as a Kubernetes `Status`.
fn refusal_status(r: &Refusal) -> Refused {
    let message = format!("vigil: {r}");
    let mut refused = Refused::new(StatusCode::FORBIDDEN, "Forbidden", message);
    refused.outcome = r.outcome();
    if matches!(r, Refusal::AuditUnwritable { .. }) {
        refused.code = StatusCode::SERVICE_UNAVAILABLE;
        refused.reason = "ServiceUnavailable";
    }
    refused
}

/// Hex SHA-256 over the method, the path with its query, the `Content-Type` (empty when none
/// was sent) and the body's digest, each length-prefixed: what a Kubernetes approval binds
/// (with the cluster in its scope). The content type says what a body does: the same patch
/// body is a strategic merge (lists merged by key) or a merge patch (lists replaced whole), or
/// a server-side apply, which may create.
pub fn action_hash(method: &str, path: &str, content_type: &str, body_sha256: &str) -> String {
    let mut h = Sha256::new();
    for part in [method, path, content_type, body_sha256] {
        h.update((part.len() as u64).to_be_bytes());
        h.update(part.as_bytes());
    }
    hex::encode(h.finalize())
}

/// The request's `Content-Type`: at most once (the API server reads the first, a record or an
/// approval must name the one it reads), and plain text.
fn content_type(headers: &HeaderMap) -> Result<Option<String>, String> {
    let mut values = headers.get_all(header::CONTENT_TYPE).iter();
    let first = values.next();
    if values.next().is_some() {
        return Err("the request gives Content-Type more than once".into());
    }
    first
        .map(|v| {
            v.to_str()
                .map(str::to_string)
                .map_err(|_| "the request's Content-Type is not plain ASCII text".to_string())
        })
        .transpose()
}

/// Whether a request asks to switch to SPDY/3.1 (what kubectl's exec and attach fall back to).
fn spdy_upgrade(headers: &HeaderMap) -> bool {
    headers
        .get(header::UPGRADE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| {
            v.split(',')
                .any(|p| p.trim().eq_ignore_ascii_case("SPDY/3.1"))
        })
}

/// The gateway's answer to the WebSocket handshake of a tunnelled port-forward.
fn tunnel_handshake(key: &str) -> HeaderMap {
    let mut h = HeaderMap::new();
    h.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
    h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    h.insert(
        header::SEC_WEBSOCKET_PROTOCOL,
        HeaderValue::from_static(websocket::SPDY_TUNNEL),
    );
    // Base64: always a valid header value.
    if let Ok(accept) = HeaderValue::from_str(&websocket::accept_key(key)) {
        h.insert(header::SEC_WEBSOCKET_ACCEPT, accept);
    }
    h
}

/// How a request switches protocols, checked against what it is: exec, attach and
/// port-forward must switch (to SPDY/3.1, or to WebSocket with a subprotocol Vigil reads),
/// nothing else may.
fn stream_switch(
    info: &RequestInfo,
    headers: &HeaderMap,
) -> Result<Option<Switch>, (StatusCode, &'static str, String)> {
    let kind = match info.subresource.as_str() {
        "exec" | "attach" => Some(StreamKind::Exec),
        "portforward" => Some(StreamKind::PortForward),
        _ => None,
    };
    let upgrading = headers.contains_key(header::UPGRADE);
    let bad = |why: String| {
        Err((
            StatusCode::BAD_REQUEST,
            "BadRequest",
            format!("vigil: {why}"),
        ))
    };
    let kind = match (kind, upgrading) {
        (None, false) => return Ok(None),
        (None, true) => {
            return Err((
                StatusCode::FORBIDDEN,
                "Forbidden",
                "vigil: only exec, attach and port-forward may switch protocols".into(),
            ))
        }
        (Some(_), false) => {
            return bad(format!(
                "{} switches protocols (SPDY/3.1 or WebSocket); this request does not ask to",
                info.subresource
            ))
        }
        (Some(kind), true) => kind,
    };
    if spdy_upgrade(headers) {
        return Ok(Some(Switch::Spdy));
    }
    let upgrade = websocket::check_client_upgrade(headers).map_err(|e| {
        (
            StatusCode::BAD_REQUEST,
            "BadRequest",
            format!("vigil: switch to SPDY/3.1 or WebSocket: {e}"),
        )
    })?;
    let offered: Vec<String> = upgrade
        .protocols
        .iter()
        .filter(|p| websocket::select_subprotocol(kind, [p.as_str()]).is_some())
        .cloned()
        .collect();
    if offered.is_empty() && !upgrade.protocols.is_empty() {
        return bad(format!(
            "none of the WebSocket subprotocols offered ({}) is one Vigil reads",
            upgrade.protocols.join(", ")
        ));
    }
    Ok(Some(Switch::WebSocket {
        kind,
        key: upgrade.key,
        offered,
    }))
}

/// The ports of a port-forward's query, in order (`ports=8080&ports=9090`): each must be a
/// port number, as the API server reads them.
fn query_ports(query: Option<&str>) -> Result<Vec<u16>, String> {
    url_pairs(query.unwrap_or_default())
        .filter(|(k, _)| k == "ports")
        .map(|(_, v)| {
            v.parse::<u16>()
                .ok()
                .filter(|p| *p > 0)
                .ok_or_else(|| format!("port-forward port {v:?} is not a port number"))
        })
        .collect()
}

/// One argument as a POSIX shell word (single-quoted where needed): an exec's argument vector
/// becomes a line the command parser reads back as the same words.
fn shell_quote(arg: &str) -> String {
    let plain = !arg.is_empty()
        && arg
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_./=:,+@%".contains(c));
    if plain {
        arg.to_string()
    } else {
        format!("'{}'", arg.replace('\'', "'\\''"))
    }
}

/// Headers the API server takes as facts about the request, which only a hop it trusts may
/// set, never a client through the gateway: `Audit-ID` becomes its audit event's `auditID`;
/// `X-Forwarded-For` and `X-Real-Ip` its `sourceIPs` (with `Forwarded` and the other
/// `X-Forwarded-*` read by proxies and tools in front of or behind it); `X-Remote-User`,
/// `X-Remote-Group` and `X-Remote-Extra-*` are the request-header authenticator's identity
/// (all `X-Remote-*` go: the names are configurable, these are the defaults everyone uses).
fn forges_audit(name: &HeaderName) -> bool {
    let n = name.as_str();
    matches!(n, "audit-id" | "forwarded" | "x-real-ip")
        || n.starts_with("x-forwarded-")
        || n.starts_with("x-remote-")
}

fn hop_by_hop(name: &HeaderName) -> bool {
    matches!(
        name.as_str(),
        "connection"
            | "keep-alive"
            | "proxy-connection"
            | "proxy-authenticate"
            | "proxy-authorization"
            | "te"
            | "trailer"
            | "transfer-encoding"
            | "upgrade"
    )
}

/// `key=value` pairs of a query, percent-decoded.
fn url_pairs(q: &str) -> impl Iterator<Item = (String, String)> + '_ {
    q.split('&').filter(|p| !p.is_empty()).map(|p| {
        let (k, v) = p.split_once('=').unwrap_or((p, ""));
        (decode(k), decode(v))
    })
}

fn decode(s: &str) -> String {
    String::from_utf8_lossy(&request_info::decode_query_component(s)).into_owned()
}

/// Masks with the detectors what a client wrote into a request's line, as every protocol's
/// record masks what a client chose: the exec command's words, the fields read from the path
/// (name, namespace, resource, subresource, API group and version), the path and the query's
/// values, read decoded (`%40` is an `@` to the detectors too). A query
/// value they change is recorded masked and encoded again; a path they change is recorded
/// decoded and masked. Hits are counted in `counts`.
fn mask_line(masker: &Masker, r: &mut KubeRequest, counts: &mut Counts) {
    let mut mask = |v: &str| match masker.mask(v, None, false, Some(counts)) {
        Cow::Owned(m) => Some(m),
        Cow::Borrowed(_) => None,
    };
    for word in &mut r.command {
        if let Some(m) = mask(word) {
            *word = m;
        }
    }
    let named = [
        &mut r.name,
        &mut r.namespace,
        &mut r.resource,
        &mut r.subresource,
    ];
    let fields = named
        .into_iter()
        .flatten()
        .chain([&mut r.api_group, &mut r.api_version]);
    for field in fields {
        if let Some(m) = mask(field) {
            *field = m;
        }
    }
    if let Some(m) = mask(&decode_path_lossy(&r.path)) {
        r.path = m;
    }
    if let Some(query) = &mut r.query {
        let mut changed = false;
        let pairs: Vec<String> = query
            .split('&')
            .map(|pair| {
                let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
                match mask(&decode(value)) {
                    Some(m) => {
                        changed = true;
                        format!("{key}={}", encode_component(&m))
                    }
                    None => pair.to_string(),
                }
            })
            .collect();
        if changed {
            *query = pairs.join("&");
        }
    }
}

/// A path with its `%XX` escapes decoded (a malformed one kept as it is).
fn decode_path_lossy(path: &str) -> String {
    // `+` is a plus in a path.
    decode(&path.replace('+', "%2B"))
}

/// A query component percent-encoded: everything but RFC 3986's unreserved characters.
fn encode_component(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// The media types of a body Vigil reads as the API server does: JSON (and the JSON patch
/// types), and Kubernetes protobuf (its `k8s\0` envelope).
const JSON_TYPES: &[&str] = &[
    "application/json",
    "application/merge-patch+json",
    "application/json-patch+json",
    "application/strategic-merge-patch+json",
];
const PROTOBUF: &str = "application/vnd.kubernetes.protobuf";
const APPLY_YAML: &str = "application/apply-patch+yaml";

/// Whether the body of a request is in a format Vigil reads as the API server does, where
/// the API server decodes it (a request of a resource that is not a proxy, with a body): the
/// decision (a create's name) and the record must name what the API server reads (a body
/// without a `Content-Type` is JSON to both). Refused: YAML (`application/yaml`), CBOR (`application/cbor`,
/// `application/apply-patch+cbor`) and anything else the API server might decode otherwise
/// than as the JSON or protobuf Vigil reads; JSON in a protobuf envelope's place and the
/// other way round. A server-side apply (`application/apply-patch+yaml`, what `kubectl apply
/// --server-side` sends, with a JSON body) is taken when its body is JSON that YAML reads as
/// the same text ([`yaml_reads_as_json`]).
fn body_format(info: &RequestInfo, body: &[u8], content_type: Option<&str>) -> Result<(), String> {
    if body.is_empty()
        || !info.is_resource_request
        || info.subresource == "proxy"
        || info.verb == "proxy"
    {
        return Ok(());
    }
    let media = content_type.map(media_type).unwrap_or_default();
    let protobuf = body.starts_with(b"k8s\x00");
    // Without a Content-Type the API server takes its first type, JSON (`kubectl create
    // --raw -f` sends none).
    if (media.is_empty() || JSON_TYPES.contains(&media.as_str())) && !protobuf {
        return Ok(());
    }
    if media == PROTOBUF && protobuf {
        return Ok(());
    }
    if media == APPLY_YAML {
        return yaml_reads_as_json(body).map_err(|why| {
            format!("the body of a server-side apply must be JSON that YAML reads alike: {why}")
        });
    }
    Err(format!(
        "a request body of Content-Type {:?} is not read: send JSON or Kubernetes protobuf",
        content_type.unwrap_or_default()
    ))
}

/// A `Content-Type`'s media type, lower case, without its parameters.
fn media_type(content_type: &str) -> String {
    let media = content_type.split(';').next().unwrap_or_default();
    media.trim().to_ascii_lowercase()
}

/// Whether a body is JSON that the API server's YAML reader (go-yaml, YAML 1.1, turning the
/// document into JSON) reads as the same text, character for character. In a JSON text every
/// string is double-quoted and every escape YAML's double-quoted style also has, so they differ
/// only by characters YAML treats otherwise: NEL (U+0085), LS (U+2028) and PS (U+2029) are
/// line breaks in YAML 1.1 and fold into a space inside a quoted string (`"a<NEL>b"` is
/// `"a b"`), a BOM (U+FEFF) is dropped, a tab is not allowed everywhere JSON allows it, and
/// the characters YAML does not print (C0 and C1 controls, DEL, surrogates, U+FFFE/U+FFFF)
/// are refused or read otherwise; all are refused here (JSON only lets them into strings raw,
/// where kubectl, whose encoder escapes LS and PS, does not put them). YAML's merge key `<<`
/// is one only unquoted: every key of a JSON text is quoted, so none is read as one.
fn yaml_reads_as_json(body: &[u8]) -> Result<(), String> {
    let text = std::str::from_utf8(body).map_err(|_| "it is not UTF-8".to_string())?;
    serde_json::from_str::<serde::de::IgnoredAny>(text)
        .map_err(|_| "it is not JSON".to_string())?;
    let alike = |c: char| {
        matches!(c, '\n' | '\r' | ' '..='~' | '\u{a0}'..='\u{d7ff}' | '\u{e000}'..='\u{fffd}')
            && !matches!(c, '\u{2028}' | '\u{2029}' | '\u{feff}')
            || c >= '\u{10000}'
    };
    if let Some(c) = text.chars().find(|c| !alike(*c)) {
        return Err(format!(
            "it holds U+{:04X}, which YAML reads otherwise",
            c as u32
        ));
    }
    Ok(())
}

/// What is wrong with the keys of a JSON body (or the paths of a JSON patch), if anything:
/// the API server would read another field than the one the body names ([`super::keys`]).
/// Protobuf bodies name fields by number, and a body that is not JSON has no keys to check.
fn body_fault(body: &[u8], content_type: Option<&str>) -> Option<super::keys::Fault> {
    if body.is_empty() || body.starts_with(b"k8s\x00") {
        return None;
    }
    let text = std::str::from_utf8(body).ok()?;
    match super::keys::fault(text) {
        None | Some(super::keys::Fault::NotJson) => {}
        fault => return fault,
    }
    if media_type(content_type?) == "application/json-patch+json" {
        return super::keys::patch_fault(text);
    }
    None
}

/// The name a create gives its object (`metadata.name`; empty with only `generateName`, which
/// the API server completes), from a JSON body or a Kubernetes protobuf envelope (what kubectl
/// sends for built-in kinds). Vigil decides on what it reads: any other body is refused, and
/// so is a body the API server could read another name from. Its JSON reader (json-iterator)
/// *merges* an object key given twice into a struct (`{"metadata":{"name":"a"},"metadata":
/// {"labels":{}}}` creates `a`) where a JSON tree keeps the last, so a body that gives any key
/// twice in any object is refused; so is a `metadata` that is present but not an object (the
/// server leaves its struct alone on `null`). Protobuf (gogo) merges a
/// repeated message field the same way: a field the name is read through given twice is
/// refused.
fn created_name(body: &[u8]) -> Result<String, String> {
    if let Some(envelope) = body.strip_prefix(b"k8s\x00") {
        return protobuf_name(envelope)
            .map_err(|why| format!("the protobuf body of a create cannot be read: {why}"));
    }
    let not_json = || "the body of a create must be JSON or Kubernetes protobuf".to_string();
    let text = std::str::from_utf8(body).map_err(|_| not_json())?;
    let v: serde_json::Value = serde_json::from_str(text).map_err(|_| not_json())?;
    let serde_json::Value::Object(object) = &v else {
        return Err("the body of a create must be a JSON object".into());
    };
    if let Some(fault) = super::keys::fault(text) {
        return Err(fault.to_string());
    }
    let meta = match object.get("metadata") {
        None => return Ok(String::new()),
        Some(serde_json::Value::Object(meta)) => meta,
        Some(_) => return Err("metadata must be an object".into()),
    };
    match meta.get("name") {
        Some(serde_json::Value::String(n)) => Ok(n.clone()),
        None | Some(serde_json::Value::Null) => Ok(String::new()),
        Some(_) => Err("metadata.name must be a string".into()),
    }
}

/// `metadata.name` of a protobuf-encoded object: the envelope (`runtime.Unknown`) holds the
/// object in field 2; every built-in kind has its `ObjectMeta` in field 1, whose field 1 is
/// the name. Each of the three must be there at most once.
fn protobuf_name(envelope: &[u8]) -> Result<String, String> {
    let Some(object) = protobuf_field(envelope, 2, "the envelope's object (field 2)")? else {
        return Err("the envelope holds no object".into());
    };
    let Some(meta) = protobuf_field(object, 1, "the object's metadata (field 1)")? else {
        return Ok(String::new());
    };
    match protobuf_field(meta, 1, "metadata.name (field 1)")? {
        Some(name) => {
            String::from_utf8(name.to_vec()).map_err(|_| "metadata.name is not UTF-8".to_string())
        }
        None => Ok(String::new()),
    }
}

/// The length-delimited field `number` (`what`) of a protobuf message, if present. Given more
/// than once it is refused: gogo protobuf merges a repeated message field and keeps the last
/// of a repeated string, and the name must be the one the API server reads, whichever way.
/// Given with another wire type it is refused too (the API server refuses the body); so is a
/// malformed message.
fn protobuf_field<'a>(
    mut msg: &'a [u8],
    number: u64,
    what: &str,
) -> Result<Option<&'a [u8]>, String> {
    fn varint(buf: &mut &[u8]) -> Option<u64> {
        let mut v = 0u64;
        for shift in (0..64).step_by(7) {
            let (&b, rest) = buf.split_first()?;
            *buf = rest;
            v |= u64::from(b & 0x7f) << shift;
            if b & 0x80 == 0 {
                return Some(v);
            }
        }
        None
    }
    let malformed = || "a malformed protobuf message".to_string();
    let mut found = None;
    while !msg.is_empty() {
        let key = varint(&mut msg).ok_or_else(malformed)?;
        let wire = key & 7;
        if key >> 3 == number && wire != 2 {
            return Err(format!("{what} is not length-delimited"));
        }
        match wire {
            0 => {
                varint(&mut msg).ok_or_else(malformed)?;
            }
            1 => msg = msg.get(8..).ok_or_else(malformed)?,
            5 => msg = msg.get(4..).ok_or_else(malformed)?,
            2 => {
                let len = varint(&mut msg)
                    .and_then(|l| usize::try_from(l).ok())
                    .ok_or_else(malformed)?;
                let value = msg.get(..len).ok_or_else(malformed)?;
                msg = &msg[len..];
                if key >> 3 == number {
                    if found.is_some() {
                        return Err(format!(
                            "{what} is given more than once (the API server would merge them)"
                        ));
                    }
                    found = Some(value);
                }
            }
            _ => return Err(malformed()),
        }
    }
    Ok(found)
}

/// The record's view of a routed request: its path after the cluster's prefix, as decided.
fn kube_request_parts(
    parts: &http::request::Parts,
    routed: &Routed,
    body: Option<&[u8]>,
) -> KubeRequest {
    let mut r = KubeRequest {
        method: parts.method.to_string(),
        path: routed.path.clone(),
        query: routed.query.clone(),
        command: routed.command.clone(),
        body_sha256: body
            .filter(|b| !b.is_empty())
            .map(|b| hex::encode(Sha256::digest(b))),
        body_bytes: body.map_or(0, |b| b.len() as u64),
        content_type: body
            .filter(|b| !b.is_empty())
            .and(routed.content_type.clone()),
        ..KubeRequest::default()
    };
    fill(&mut r, &routed.info);
    r
}

fn fill(r: &mut KubeRequest, i: &RequestInfo) {
    let some = |s: &str| (!s.is_empty()).then(|| s.to_string());
    r.verb = i.verb.clone();
    r.api_group = i.api_group.clone();
    r.api_version = i.api_version.clone();
    r.resource = some(&i.resource);
    r.subresource = some(&i.subresource);
    r.namespace = some(&i.namespace);
    r.name = some(&i.name);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn what_a_client_wrote_into_the_request_line_is_masked_decoded() {
        use crate::policy::masking::{DetectorRule, MaskingConfig, Method};
        let masker = Masker::new(
            MaskingConfig {
                columns: Vec::new(),
                detectors: DetectorRule::every_kind(Method::Redact, false),
            },
            b"key".to_vec(),
        );
        let mut r = KubeRequest {
            path: "/api/v1/namespaces/default/serviceaccounts/bob%40example.com".into(),
            name: Some("bob@example.com".into()),
            query: Some("command=echo&command=x+bob%40example.com&stdout=true".into()),
            command: vec!["echo".into(), "x bob@example.com".into()],
            ..KubeRequest::default()
        };
        let mut counts = Counts::new();
        mask_line(&masker, &mut r, &mut counts);
        assert_eq!(
            r.path,
            "/api/v1/namespaces/default/serviceaccounts/[redacted]"
        );
        assert_eq!(r.name.as_deref(), Some("[redacted]"));
        assert_eq!(
            r.query.as_deref(),
            Some("command=echo&command=x%20%5Bredacted%5D&stdout=true")
        );
        assert_eq!(r.command, ["echo", "x [redacted]"]);
        assert_eq!(counts.get("email"), Some(&4));
        // Nothing to mask: the line is kept as written, escapes and all.
        let mut plain = KubeRequest {
            path: "/api/v1/namespaces/default/pods/a%2Bb".into(),
            query: Some("labelSelector=app%3Dweb+x".into()),
            ..KubeRequest::default()
        };
        let before = plain.clone();
        mask_line(&masker, &mut plain, &mut counts);
        assert_eq!(plain, before);
    }

    #[test]
    fn a_create_names_its_object_in_json_or_protobuf() {
        assert_eq!(
            created_name(br#"{"metadata":{"name":"web"}}"#).unwrap(),
            "web"
        );
        assert_eq!(
            created_name(br#"{"metadata":{"generateName":"w-"}}"#).unwrap(),
            ""
        );
        assert!(created_name(b"name: web").is_err());
        // runtime.Unknown{raw: ConfigMap{metadata: ObjectMeta{name: "settings"}}}
        let meta = [&[0x0a, 8][..], b"settings"].concat();
        let object = [&[0x0a, meta.len() as u8][..], &meta].concat();
        let envelope = [&b"k8s\x00"[..], &[0x12, object.len() as u8], &object].concat();
        assert_eq!(created_name(&envelope).unwrap(), "settings");
        assert!(
            created_name(&envelope[..envelope.len() - 2]).is_err(),
            "truncated"
        );
        assert_eq!(created_name(br#"{"kind":"ConfigMap"}"#).unwrap(), "");
        assert_eq!(
            created_name(br#"{"metadata":{"name":null,"generateName":"w-"}}"#).unwrap(),
            ""
        );
    }

    /// The API server's JSON reader merges a key given twice, a JSON tree keeps the last: a
    /// create's body that gives any key twice, anywhere, is refused, as is a `metadata` that is
    /// not an object.
    #[test]
    fn a_create_whose_name_the_api_server_could_read_otherwise_is_refused() {
        for body in [
            // What the API server creates as kube-evil, each of them.
            r#"{"metadata":{"name":"kube-evil"},"metadata":null}"#,
            r#"{"metadata":{"name":"kube-evil"},"metadata":{"labels":{}}}"#,
            r#"{"metadata":{"name":"kube-evil"},"metad\u0061ta":{"labels":{}}}"#,
            r#"{"metadata":{"name":"a","name":"b"}}"#,
            r#"{"metadata":{"name":"a"},"data":{"k":"1","k":"2"}}"#,
            r#"{"metadata":{"name":"a"},"items":[{"x":1,"x":2}]}"#,
            r#"{"metadata":null}"#,
            r#"{"metadata":"kube-evil"}"#,
            r#"{"metadata":["kube-evil"]}"#,
            r#"{"metadata":{"name":7}}"#,
            r#"["kube-evil"]"#,
        ] {
            assert!(created_name(body.as_bytes()).is_err(), "{body}");
        }
        assert_eq!(
            created_name(br#"{"metadata":{"name":"a","labels":{"name":"b"}},"data":{"name":"c"}}"#)
                .unwrap(),
            "a",
            "the same key in different objects is fine"
        );
    }

    /// A protobuf create whose name is read through a field given twice (gogo merges a
    /// repeated message and keeps the last string) is refused.
    #[test]
    fn a_protobuf_create_with_a_repeated_field_on_the_way_to_its_name_is_refused() {
        let field = |n: u8, value: &[u8]| [&[n << 3 | 2, value.len() as u8][..], value].concat();
        let envelope = |object: Vec<u8>| [&b"k8s\x00"[..], &object].concat();
        let name = field(1, b"kube-evil");
        let meta = field(1, &name);
        // ObjectMeta{name} then ObjectMeta{labels}: the API server merges them into kube-evil.
        let labels = field(1, &field(11, &[]));
        let object = [meta.clone(), labels].concat();
        assert!(
            created_name(&envelope(field(2, &object))).is_err(),
            "meta twice"
        );
        let once = field(2, &meta);
        assert_eq!(created_name(&envelope(once.clone())).unwrap(), "kube-evil");
        assert!(
            created_name(&envelope([once.clone(), once.clone()].concat())).is_err(),
            "object twice"
        );
        let two_names = field(1, &[name.clone(), field(1, b"other")].concat());
        assert!(
            created_name(&envelope(field(2, &two_names))).is_err(),
            "name twice"
        );
        // The name's field number with another wire type (a varint).
        let varint_name = field(1, &[&[1 << 3, 5][..], &name].concat());
        assert!(created_name(&envelope(field(2, &varint_name))).is_err());
        // Other fields may repeat: the object's data (field 2) and the envelope's type meta.
        let data = field(2, b"x");
        let object = [meta.clone(), data.clone(), data].concat();
        let type_meta = field(1, b"v1");
        let ok = [type_meta.clone(), type_meta, field(2, &object)].concat();
        assert_eq!(created_name(&envelope(ok)).unwrap(), "kube-evil");
        assert!(created_name(b"k8s\x00").is_err(), "no object");
    }

    #[test]
    fn queries_decode_like_the_api_server_reads_them() {
        let pairs: Vec<_> =
            url_pairs("command=sh&command=-c&command=echo%20hi%3B%20rm+-rf&stdin=true").collect();
        assert_eq!(
            pairs[2],
            ("command".to_string(), "echo hi; rm -rf".to_string())
        );
        assert_eq!(pairs.len(), 4);
    }

    #[test]
    fn an_approval_binds_method_path_content_type_and_body() {
        let path = "/apis/apps/v1/namespaces/s/deployments/web";
        let smp = "application/strategic-merge-patch+json";
        let a = action_hash("PATCH", path, smp, "x");
        assert_ne!(a, action_hash("PUT", path, smp, "x"));
        assert_ne!(a, action_hash("PATCH", &path[..path.len() - 1], smp, "bx"));
        assert_ne!(a, action_hash("PATCH", path, smp, "y"));
        // The same body as a merge patch replaces lists whole: another action.
        assert_ne!(
            a,
            action_hash("PATCH", path, "application/merge-patch+json", "x")
        );
        assert_ne!(a, action_hash("PATCH", path, "", "x"));
        // Length-prefixed: moving bytes between the parts is another action.
        assert_ne!(
            action_hash("PATCH", path, "ab", "c"),
            action_hash("PATCH", path, "a", "bc")
        );
        assert_eq!(a, action_hash("PATCH", path, smp, "x"));
    }

    #[test]
    fn a_content_type_is_given_at_most_once_and_as_text() {
        let mut h = HeaderMap::new();
        assert_eq!(content_type(&h), Ok(None));
        h.append(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        assert_eq!(content_type(&h), Ok(Some("application/json".into())));
        h.append(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/apply-patch+yaml"),
        );
        assert!(content_type(&h).is_err(), "twice");
        let mut h = HeaderMap::new();
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_bytes(b"application/json\xff").unwrap(),
        );
        assert!(content_type(&h).is_err(), "not text");
    }

    fn info(method: &str, path: &str) -> RequestInfo {
        request_info::classify(method, path, None).unwrap()
    }

    fn policy(text: &str) -> Arc<Policy> {
        Policy::new(toml::from_str(text).unwrap())
    }

    fn decided(
        policy: &Policy,
        method: &str,
        path: &str,
        content_type: Option<&str>,
    ) -> (Action, String) {
        let d = decide(
            policy,
            &Principal::default(),
            "dev",
            &info(method, path),
            &[],
            content_type,
        );
        (d.action, d.rule)
    }

    /// A rule blocking `create` holds for an update or patch that may create (the API server
    /// authorises those as `create` too); the record keeps the API server's verb.
    #[test]
    fn an_update_or_apply_that_may_create_is_decided_as_a_create_too() {
        let p = policy(
            r#"
default = "allow"
[[rules]]
id = "no-creates"
action = "block"
protocol = "kubernetes"
verbs = ["create"]
resources = ["configmaps", "coordination.k8s.io/leases", "rbac.authorization.k8s.io/rolebindings", "services"]
"#,
        );
        let blocked = (Action::Block, "no-creates".to_string());
        let allowed = (Action::Allow, "default".to_string());
        let lease = "/apis/coordination.k8s.io/v1/namespaces/a/leases/l";
        assert_eq!(decided(&p, "PUT", lease, None), blocked);
        assert_eq!(decided(&p, "GET", lease, None), allowed);
        let binding = "/apis/rbac.authorization.k8s.io/v1/namespaces/a/rolebindings/b";
        assert_eq!(decided(&p, "PUT", binding, None), blocked);
        // A service's status has the service's strategy: a PUT of it may create.
        assert_eq!(
            decided(&p, "PUT", "/api/v1/namespaces/a/services/s/status", None),
            blocked
        );
        let cm = "/api/v1/namespaces/a/configmaps/c";
        // ConfigMaps do not create on update; a patch other than apply never creates.
        assert_eq!(decided(&p, "PUT", cm, None), allowed);
        for t in [
            "application/merge-patch+json",
            "application/strategic-merge-patch+json",
            "application/json-patch+json",
        ] {
            assert_eq!(decided(&p, "PATCH", cm, Some(t)), allowed, "{t}");
        }
        // Server-side apply creates whatever is missing, however the type is spelled.
        for t in [
            "application/apply-patch+yaml",
            "Application/Apply-Patch+YAML",
            "application/apply-patch+yaml; charset=utf-8",
            " application/apply-patch+cbor",
        ] {
            assert_eq!(decided(&p, "PATCH", cm, Some(t)), blocked, "{t}");
        }
        let apply = Some("application/apply-patch+yaml");
        // A status subresource creates only where the strategy does.
        assert_eq!(
            decided(&p, "PATCH", "/api/v1/namespaces/a/services/s/status", apply),
            blocked
        );
        assert_eq!(
            decided(
                &p,
                "PATCH",
                "/api/v1/namespaces/a/configmaps/c/status",
                apply
            ),
            allowed
        );
        // A rule on update alone still decides the update (the stricter of the two applies).
        let p = policy(
            r#"
default = "allow"
[[rules]]
id = "creates-need-approval"
action = "require_approval"
protocol = "kubernetes"
verbs = ["create"]
approval = { approvers = "sre" }

[[rules]]
id = "no-lease-updates"
action = "block"
protocol = "kubernetes"
verbs = ["update"]
resources = ["leases"]
"#,
        );
        assert_eq!(
            decided(&p, "PUT", lease, None),
            (Action::Block, "no-lease-updates".into())
        );
        assert_eq!(
            decided(&p, "PUT", binding, None),
            (Action::RequireApproval, "creates-need-approval".into())
        );
        assert_eq!(decided(&p, "PUT", cm, None), allowed);
    }

    /// A body the API server decodes is read only as JSON or protobuf, and a server-side
    /// apply only as JSON that YAML reads alike (outside review: a raw NEL in a YAML body
    /// named another Role than the API server created).
    #[test]
    fn a_body_is_read_only_in_a_format_read_as_the_api_server_reads_it() {
        let create = info(
            "POST",
            "/apis/rbac.authorization.k8s.io/v1/namespaces/a/roles",
        );
        let apply = info("PATCH", "/api/v1/namespaces/a/configmaps/c");
        let nel = "{\"metadata\":{\"name\":\"rv-role\u{85}x\"}}";
        let json = br#"{"metadata":{"name":"rv-role"},"data":{"a":"caf\u00e9 \u2028"}}"#;
        let ok = |i: &RequestInfo, b: &[u8], t: Option<&str>| body_format(i, b, t).is_ok();
        assert!(ok(&create, json, Some("application/json")));
        assert!(ok(&create, json, Some("Application/JSON; charset=utf-8")));
        assert!(ok(&create, nel.as_bytes(), Some("application/json")));
        assert!(ok(
            &create,
            b"k8s\x00\x0a",
            Some("application/vnd.kubernetes.protobuf")
        ));
        assert!(!ok(&create, b"k8s\x00\x0a", Some("application/json")));
        assert!(!ok(
            &create,
            json,
            Some("application/vnd.kubernetes.protobuf")
        ));
        assert!(!ok(&create, nel.as_bytes(), Some("application/yaml")));
        assert!(!ok(&create, json, Some("application/yaml")));
        assert!(!ok(&create, json, Some("application/cbor")));
        assert!(ok(&create, json, None), "JSON to the API server too");
        assert!(!ok(&create, b"k8s\x00\x0a", None));
        assert!(!ok(&create, json, Some("text/plain")));
        assert!(ok(&create, b"", None), "no body");
        let ssa = Some("application/apply-patch+yaml");
        assert!(ok(&apply, json, ssa));
        assert!(ok(
            &apply,
            "{\"a\":\"caf\u{e9} \u{1F600}\"}".as_bytes(),
            ssa
        ));
        // Quoted, `<<` is a key like any other to YAML, not its merge key.
        assert!(ok(&apply, b"{\"<<\":{\"a\":1}}", ssa));
        for bad in [
            nel,
            "{\"a\":\"x\u{2028}y\"}",
            "{\"a\":\"x\u{2029}y\"}",
            "\u{feff}{\"a\":1}",
            "{\"a\":\"x\u{feff}\"}",
            "{\t\"a\":1}",
            "{\"a\":\"\u{7f}\"}",
            "{\"a\":\"\u{9c}\"}",
            "a: b",
        ] {
            assert!(!ok(&apply, bad.as_bytes(), ssa), "{bad:?}");
        }
        assert!(!ok(&apply, json, Some("application/apply-patch+cbor")));
        // What the API server does not decode: a proxy's body, a non-resource URL.
        let proxy = info("POST", "/api/v1/namespaces/a/services/s/proxy/upload");
        assert!(ok(&proxy, b"a: b", Some("application/yaml")));
        assert!(ok(&info("POST", "/version"), b"a: b", None));
    }

    /// A rule that blocks or holds one named object covers a list, watch or deletecollection
    /// that reaches it (every name, and the per-object `get` or `delete`); a names-restricted
    /// allow never allows a collection, and a rule allowing `list` is not undone by a default
    /// that would block `get`.
    #[test]
    fn a_collection_reaches_every_object_a_rule_names() {
        let p = policy(
            r#"
default = "allow"
[[rules]]
id = "top-secret"
action = "block"
protocol = "kubernetes"
verbs = ["get", "list", "watch"]
resources = ["secrets"]
names = ["top-secret"]

[[rules]]
id = "secret-reads"
action = "block"
protocol = "kubernetes"
verbs = ["get"]
resources = ["tokens"]

[[rules]]
id = "cm-deletes"
action = "require_approval"
protocol = "kubernetes"
verbs = ["delete"]
resources = ["configmaps"]
approval = { approvers = "sre" }
"#,
        );
        let at = |method: &str, path: &str, query: Option<&str>| {
            let d = decide(
                &p,
                &Principal::default(),
                "dev",
                &request_info::classify(method, path, query).unwrap(),
                &[],
                None,
            );
            (d.action, d.rule)
        };
        let blocked = (Action::Block, "top-secret".to_string());
        let allowed = (Action::Allow, "default".to_string());
        assert_eq!(
            at("GET", "/api/v1/namespaces/a/secrets/top-secret", None),
            blocked
        );
        assert_eq!(at("GET", "/api/v1/namespaces/a/secrets", None), blocked);
        assert_eq!(at("GET", "/api/v1/secrets", None), blocked);
        assert_eq!(
            at("GET", "/api/v1/namespaces/a/secrets", Some("watch=1")),
            blocked
        );
        assert_eq!(
            at(
                "GET",
                "/api/v1/namespaces/a/secrets",
                Some("fieldSelector=metadata.name%21%3Dx")
            ),
            blocked
        );
        assert_eq!(
            at("GET", "/api/v1/namespaces/a/secrets/other", None),
            allowed
        );
        assert_eq!(
            at(
                "GET",
                "/api/v1/namespaces/a/secrets",
                Some("fieldSelector=metadata.name%3Dother")
            ),
            allowed,
            "a selector of one other name reaches only it"
        );
        // A rule on `get` alone covers the list and the watch of what it gets.
        assert_eq!(
            at("GET", "/api/v1/namespaces/a/tokens", None),
            (Action::Block, "secret-reads".into())
        );
        // A change answered with the object as stored reads it, dry run or not.
        for (method, query) in [
            ("PATCH", None),
            ("PATCH", Some("dryRun=All")),
            ("PUT", None),
            ("DELETE", None),
            ("DELETE", Some("dryRun=All")),
        ] {
            assert_eq!(
                at(method, "/api/v1/namespaces/a/secrets/top-secret", query),
                blocked,
                "{method} {query:?}"
            );
            assert_eq!(
                at(method, "/api/v1/namespaces/a/secrets/other", query),
                allowed,
                "{method} {query:?}"
            );
        }
        assert_eq!(at("DELETE", "/api/v1/namespaces/a/secrets", None), blocked);
        assert_eq!(
            at("POST", "/api/v1/namespaces/a/secrets", None),
            allowed,
            "a create is answered with what it sent"
        );
        let held = (Action::RequireApproval, "cm-deletes".to_string());
        assert_eq!(
            at("DELETE", "/api/v1/namespaces/a/configmaps/c", None),
            held
        );
        assert_eq!(
            at(
                "DELETE",
                "/api/v1/namespaces/a/configmaps",
                Some("fieldSelector=metadata.name%3Dcm1")
            ),
            held
        );
        assert_eq!(at("DELETE", "/api/v1/namespaces/a/configmaps", None), held);
        assert_eq!(at("GET", "/api/v1/namespaces/a/configmaps", None), allowed);

        // Allow rules keep the strict reading; the default does not decide what is reached.
        let p = policy(
            r#"
default = "block"
[[rules]]
id = "one-secret"
action = "allow"
protocol = "kubernetes"
verbs = ["get", "list"]
resources = ["secrets"]
names = ["public"]

[[rules]]
id = "list-pods"
action = "allow"
protocol = "kubernetes"
verbs = ["list"]
resources = ["pods"]
"#,
        );
        assert_eq!(
            decided(&p, "GET", "/api/v1/namespaces/a/secrets/public", None),
            (Action::Allow, "one-secret".into())
        );
        assert_eq!(
            decided(&p, "GET", "/api/v1/namespaces/a/secrets", None),
            (Action::Block, "default".into())
        );
        assert_eq!(
            decided(&p, "GET", "/api/v1/namespaces/a/pods", None),
            (Action::Allow, "list-pods".into())
        );
    }

    /// `nodes/proxy` reaches the kubelet's own API (`/run`, `/exec`): refused unless a rule
    /// allows it, like port-forward; so are the proxies to pods and services.
    #[test]
    fn a_proxy_is_refused_unless_a_rule_allows_it() {
        let p = policy(r#"default = "allow""#);
        for path in [
            "/api/v1/nodes/node-1/proxy/run/default/shell/c",
            "/api/v1/nodes/node-1/proxy/exec/default/shell/c",
            "/api/v1/namespaces/default/pods/web-0/proxy/admin",
            "/api/v1/namespaces/default/services/https:db:5432/proxy/",
            "/api/v1/proxy/nodes/node-1/run",
            "/api/v1/namespaces/default/pods/web-0/portforward",
        ] {
            for method in ["GET", "POST"] {
                let (action, rule) = decided(&p, method, path, None);
                assert_eq!(
                    (action, rule.as_str()),
                    (Action::Block, "default"),
                    "{path}"
                );
            }
        }
        let d = decide(
            &p,
            &Principal::default(),
            "dev",
            &info("POST", "/api/v1/nodes/node-1/proxy/run/default/shell/c"),
            &[],
            None,
        );
        assert_eq!(d.reason.as_deref(), Some("no rule allows nodes/proxy"));
        assert_eq!(
            decided(&p, "GET", "/api/v1/nodes/node-1", None),
            (Action::Allow, "default".into())
        );
        assert_eq!(
            decided(&p, "GET", "/api/v1/namespaces/default/pods/web-0/log", None),
            (Action::Allow, "default".into())
        );
        let p = policy(
            r#"
[[rules]]
id = "metrics"
action = "allow"
protocol = "kubernetes"
resources = ["nodes/proxy"]
verbs = ["get"]
"#,
        );
        assert_eq!(
            decided(&p, "GET", "/api/v1/nodes/node-1/proxy/metrics", None),
            (Action::Allow, "metrics".into())
        );
        assert_eq!(
            decided(&p, "POST", "/api/v1/nodes/node-1/proxy/run/a/b/c", None).0,
            Action::Block
        );
    }

    /// What the API server would take from a client as facts of its own audit event never
    /// leaves the gateway; the client's other headers do.
    #[test]
    fn headers_that_forge_the_api_servers_audit_event_are_not_forwarded() {
        let config: super::super::config::KubeClusterConfig = toml::from_str(
            r#"
name = "dev"
server = "https://api.example:6443/"
allow = {}
"#,
        )
        .unwrap();
        let path = "/api/v1/namespaces/default/configmaps/c";
        let routed = Routed {
            cluster: Arc::new(Cluster {
                config,
                token: Some(crate::core::secret::Secret::new(
                    "gateway-token".to_string(),
                )),
                clients: Vec::new(),
            }),
            info: info("GET", path),
            path: path.into(),
            query: Some("pretty=1".into()),
            command: Vec::new(),
            switch: None,
            ports: Vec::new(),
            content_type: None,
            upgrade: None,
        };
        let mut req = Request::builder().method("GET").uri(path);
        for (name, value) in [
            ("audit-id", "forged"),
            ("x-forwarded-for", "10.9.9.9"),
            ("x-forwarded-host", "evil.example"),
            ("x-forwarded-proto", "http"),
            ("forwarded", "for=10.9.9.9"),
            ("x-real-ip", "10.9.9.9"),
            ("x-remote-user", "system:admin"),
            ("x-remote-group", "system:masters"),
            ("x-remote-extra-scopes", "all"),
            ("authorization", "Bearer client-token"),
            ("x-vigil-intent", "look"),
            ("accept", "application/json"),
            ("accept-encoding", "gzip"),
            ("user-agent", "kubectl/v1.32"),
        ] {
            req = req.header(name, value);
        }
        let (parts, ()) = req.body(()).unwrap().into_parts();
        let principal = Principal {
            subject: "agent-ops".into(),
            issuer: "https://idp".into(),
            groups: vec!["dba".into()],
            ..Principal::default()
        };
        let out = upstream_request(&routed, &principal, "s-1", parts, Bytes::new()).unwrap();
        assert_eq!(
            out.uri().to_string(),
            "https://api.example:6443/api/v1/namespaces/default/configmaps/c?pretty=1"
        );
        let h = out.headers();
        for name in [
            "audit-id",
            "x-forwarded-for",
            "x-forwarded-host",
            "x-forwarded-proto",
            "forwarded",
            "x-real-ip",
            "x-remote-user",
            "x-remote-group",
            "x-remote-extra-scopes",
            "x-vigil-intent",
        ] {
            assert!(!h.contains_key(name), "{name} forwarded");
        }
        assert_eq!(h["authorization"], "Bearer gateway-token");
        assert_eq!(h["accept"], "application/json");
        assert_eq!(
            h["accept-encoding"], "identity",
            "answers come uncompressed"
        );
        assert_eq!(h.get_all("accept-encoding").iter().count(), 1);
        assert_eq!(h["user-agent"], "kubectl/v1.32");
        assert_eq!(h["impersonate-user"], "agent-ops");
        assert_eq!(h["impersonate-extra-session-id"], "s-1");
        let groups: Vec<_> = h.get_all("impersonate-group").iter().collect();
        assert_eq!(
            groups.len(),
            2,
            "the prefixed group and system:authenticated"
        );
    }

    #[test]
    fn no_identity_in_the_system_namespace_is_impersonated() {
        let p = |subject: &str, group: &str| Principal {
            subject: subject.into(),
            groups: vec![group.into()],
            ..Principal::default()
        };
        assert_eq!(reserved_identity(&p("agent-ops", "dba"), ""), None);
        assert_eq!(
            reserved_identity(&p("agent-ops", "system:masters"), ""),
            Some(r#"the group "system:masters""#.into())
        );
        assert_eq!(
            reserved_identity(&p("agent-ops", "system:masters"), "vigil:"),
            None
        );
        assert!(reserved_identity(&p("agent-ops", "masters"), "System:").is_some());
        assert!(reserved_identity(&p("agent-ops", " system:masters"), "").is_some());
        assert!(reserved_identity(&p("agent-ops", "\tsystem:masters"), "").is_some());
        assert!(reserved_identity(&p(" system:admin", "dba"), "vigil:").is_some());
        assert_eq!(
            reserved_identity(&p("system:kube-controller-manager", "dba"), "vigil:"),
            Some(r#"the user name "system:kube-controller-manager""#.into())
        );
    }
}
