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
use crate::core::lifecycle::Sessions;
use crate::core::proxy_protocol::Origin;
use crate::core::trace::Stmt;
use crate::core::Refusal;
use crate::policy::kube::KubeAction;
use crate::policy::{Action, Decision};
use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Request, Response, StatusCode};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use sha2::{Digest, Sha256};
use std::convert::Infallible;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;
use tokio::net::TcpStream;
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
    /// The session's trace span (core/trace.rs), the parent of its requests' spans.
    trace: tracing::Span,
}

/// Serves one TLS connection (HTTP/1.1 or HTTP/2) until it closes; then ends its session.
pub async fn connection(
    ctx: Arc<KubeContext>,
    stream: TlsStream<TcpStream>,
    origin: Origin,
    sessions: Sessions,
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
    });
    let service = {
        let conn = conn.clone();
        hyper::service::service_fn(move |req| {
            let conn = conn.clone();
            // Requests run on hyper's tasks: their log events name the session.
            let span = conn.trace.clone();
            async move { Ok::<_, Infallible>(conn.handle(req).await) }.instrument(span)
        })
    };
    let mut builder =
        hyper_util::server::conn::auto::Builder::new(hyper_util::rt::TokioExecutor::new());
    builder
        .http1()
        .max_buf_size(ctx.config.max_header_bytes.max(8192));
    builder
        .http2()
        .max_header_list_size(ctx.config.max_header_bytes as u32);
    let io = hyper_util::rt::TokioIo::new(stream);
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
    conn.end();
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

    async fn handle(&self, mut req: Request<Incoming>) -> Response<ClientBody> {
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
                let request = kube_request(&req, None, &[], None);
                return self.refuse(&principal, cluster.as_deref(), request, None, r);
            }
        };
        let (parts, incoming) = req.into_parts();
        let limit = self.ctx.config.max_request_body_bytes;
        let body = match Limited::new(incoming, limit).collect().await {
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
        self.decide_and_forward(principal, routed, parts, body, started)
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
        let rest = full
            .strip_prefix(super::config::CLUSTER_PREFIX)
            .unwrap_or("");
        let (name, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, "/"),
        };
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
            upgrade: None,
        })
    }

    async fn decide_and_forward(
        &self,
        principal: Arc<Principal>,
        routed: Routed,
        parts: http::request::Parts,
        body: Bytes,
        started: Instant,
    ) -> Response<ClientBody> {
        let cluster_name = routed.cluster.config.name.clone();
        let mut routed = routed;
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
        let (recorded_body, masked) = self.masked(super::redact::audit_copy(&body, holds, limit));
        request.body = recorded_body;
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
                match self
                    .hold(
                        &principal,
                        &cluster_name,
                        &decision,
                        &parts,
                        &routed,
                        &body,
                        &request,
                        stmt.n,
                    )
                    .await
                {
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
        let upstream = match self.upstream_request(&routed, &principal, parts, body) {
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
        match routed.cluster.client().request(upstream).await {
            Ok(resp) => self.relay(resp, &principal, &cluster_name, stmt, &routed.info, started),
            Err(e) => self.respond_error(
                &principal,
                &cluster_name,
                &stmt,
                started,
                format!("vigil: the API server of cluster {cluster_name:?} cannot be reached: {e}"),
            ),
        }
    }

    /// The policy's decision on a request: its actions are the request itself, or one per
    /// command of an exec's command line (decided like an SSH exec line). A port-forward is
    /// refused unless a rule allows it, whatever the default.
    fn decide(&self, principal: &Principal, routed: &Routed) -> Decision {
        let info = &routed.info;
        let action = KubeAction {
            verb: &info.verb,
            api_group: &info.api_group,
            resource: &info.resource,
            subresource: &info.subresource,
            namespace: &info.namespace,
            name: &info.name,
            command: None,
            line: None,
        };
        // An exec's command is decided like an SSH exec line: each command of it on its own.
        let line = (!routed.command.is_empty()).then(|| {
            let quoted: Vec<String> = routed.command.iter().map(|a| shell_quote(a)).collect();
            crate::ssh::command::parse(&quoted.join(" ")).map_err(|e| e.to_string())
        });
        let actions: Result<Vec<KubeAction>, String> = match &line {
            None => Ok(vec![action]),
            Some(Err(e)) => Err(format!("the exec command cannot be read: {e}")),
            Some(Ok(l)) => Ok(l
                .commands
                .iter()
                .map(|c| KubeAction {
                    command: Some(c),
                    line: Some(l),
                    ..action
                })
                .collect()),
        };
        let decision = self.ctx.policy.decide_actions(
            actions.as_deref().map_err(Clone::clone),
            principal,
            &routed.cluster.config.name,
        );
        match routed.info.subresource.as_str() {
            "portforward" => decision.only_by_rule(|| "no rule allows port-forward".into()),
            _ => decision,
        }
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
        if exact != Some(shown_body.as_str()) && !body.is_empty()
            || self.ctx.core.scrub(&path) != path
        {
            return Verdict::Refuse {
                refusal: Refusal::Unbound {
                    rule: decision.rule.clone(),
                    why: "the request holds values the approver may not see (a Secret, a masked value, or a body too large to show); it cannot be shown faithfully".into(),
                },
                approval: None,
            };
        }
        let digest = hex::encode(Sha256::digest(body));
        let hash = action_hash(parts.method.as_str(), &path, &digest);
        let mut record = Step::recorder(
            self.ctx.core.audit.clone(),
            self.body(Kind::ApprovalRequested, Some(principal), Some(cluster)),
            stmt,
            RecordRequest::Kubernetes(request.clone()),
            self.ctx.policy.reference(decision),
        );
        let action = format!("{} {path}", parts.method);
        let hold = Hold {
            principal,
            key: ActionKey {
                scope: Scope::new(PROTOCOL, cluster),
                hash,
            },
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
        self.ctx.core.approvals.settle(hold, &mut record).await
    }

    /// The request for the API server: the caller's, with the gateway's credential and the
    /// caller impersonated; hop-by-hop headers and the caller's own credential removed.
    fn upstream_request(
        &self,
        routed: &Routed,
        principal: &Principal,
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
                && !(tunnel && name.as_str().starts_with("sec-websocket-"))
                && !name.as_str().starts_with("x-vigil-")
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
        headers.insert("impersonate-extra-session-id", value(&self.session)?);
        if let Some(model) = &principal.model {
            headers.insert("impersonate-extra-model", value(model)?);
        }
        Ok(out)
    }

    /// exec, attach and port-forward: the request goes to the API server over HTTP/1.1; when
    /// it switches protocols to one Vigil reads (SPDY/3.1, or WebSocket with a subprotocol
    /// that was offered), so does the client, and the streams are relayed and recorded
    /// ([`super::stream`]). A tunnelled port-forward is switched to SPDY/3.1 upstream, and
    /// the gateway answers the client's WebSocket handshake itself. Any other answer goes back
    /// as it is.
    #[allow(clippy::too_many_arguments)]
    async fn switch(
        &self,
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
        let mut resp = match routed.cluster.client().request(upstream).await {
            Ok(r) => r,
            Err(e) => {
                let why =
                    format!("vigil: the API server of cluster {cluster:?} cannot be reached: {e}");
                return self.respond_error(principal, cluster, &stmt, started, why);
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
        &self,
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
        let done = Done {
            ctx: self.ctx.clone(),
            rec,
            status: parts.status,
            holds: Holds::of(&info.resource, &info.subresource),
            started,
            span: stmt.span,
        };
        let tap = Tap::new(incoming, self.ctx.config.max_record_body_bytes, count, done);
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
        let mut rec = self.body(Kind::Response, Some(principal), Some(cluster));
        rec.stmt = Some(stmt.n);
        rec.outcome = Some(Outcome::Error);
        rec.duration_us = Some(started.elapsed().as_micros() as u64);
        rec.response = Some(RecordResponse::Kubernetes(KubeResponse {
            status: StatusCode::BAD_GATEWAY.as_u16(),
            error: Some(KubeError {
                reason: "BadGateway".into(),
                message: why.clone(),
            }),
            ..KubeResponse::default()
        }));
        crate::core::trace::from_record(&stmt.span, &rec);
        self.ctx.core.audit.record(rec);
        status(StatusCode::BAD_GATEWAY, "ServiceUnavailable", &why)
    }

    /// A request refused before it could be authenticated: a `session_start` refusal when the
    /// connection has no session yet, else a blocked request of the session.
    fn refuse_unauthenticated(&self, req: &Request<Incoming>, r: Refused) -> Response<ClientBody> {
        let session = self
            .principal
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let mut rec = match &session {
            None => self.body(Kind::SessionStart, None, None),
            Some(p) => self.body(Kind::Blocked, Some(p), None),
        };
        rec.request = Some(RecordRequest::Kubernetes(kube_request(
            req,
            None,
            &[],
            None,
        )));
        rec.outcome = Some(r.outcome);
        rec.detail = Some(self.ctx.core.scrub(&r.message));
        self.ctx.core.audit.record(rec);
        status(r.code, r.reason, &r.message)
    }

    fn refuse(
        &self,
        principal: &Arc<Principal>,
        cluster: Option<&str>,
        request: KubeRequest,
        policy: Option<vigil_proto::record::PolicyRef>,
        r: Refused,
    ) -> Response<ClientBody> {
        let stmt = self.next_stmt();
        let mut rec = self.body(Kind::Blocked, Some(principal), cluster);
        rec.stmt = Some(stmt.n);
        rec.policy = policy;
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
        rec.detail = Some(match rec.detail.take() {
            Some(note) => format!("{message}; {note}"),
            None => message,
        });
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
        let masked = text.map(|t| {
            self.ctx
                .core
                .masker
                .mask(&t, None, false, Some(&mut counts))
                .into_owned()
        });
        (masked, counts)
    }

    /// The connection closed: its session (if one started) ends.
    fn end(&self) {
        let principal = self
            .principal
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        if let Some(p) = principal {
            let mut rec = self.body(Kind::SessionEnd, Some(&p), None);
            rec.outcome = Some(Outcome::Success);
            rec.duration_us = Some(self.started.elapsed().as_micros() as u64);
            rec.detail = Some(format!("{} requests", self.stmt.load(Ordering::SeqCst)));
            self.ctx.core.audit.record(rec);
            self.ctx.core.metrics.active_sessions.dec();
        }
    }
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

/// Hex SHA-256 over the method, the path with its query and the body's digest, each
/// length-prefixed: what a Kubernetes approval binds (with the cluster in its scope).
pub fn action_hash(method: &str, path: &str, body_sha256: &str) -> String {
    let mut h = Sha256::new();
    for part in [method, path, body_sha256] {
        h.update((part.len() as u64).to_be_bytes());
        h.update(part.as_bytes());
    }
    hex::encode(h.finalize())
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
    let s = s.replace('+', " ");
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = |b: u8| (b as char).to_digit(16);
        match (
            bytes[i],
            bytes.get(i + 1).and_then(|b| hex(*b)),
            bytes.get(i + 2).and_then(|b| hex(*b)),
        ) {
            (b'%', Some(h), Some(l)) => {
                out.push((h * 16 + l) as u8);
                i += 3;
            }
            (b, _, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The name a create gives its object (`metadata.name`; empty with only `generateName`, which
/// the API server completes), from a JSON body or a Kubernetes protobuf envelope (what kubectl
/// sends for built-in kinds). Vigil decides on what it reads: any other body is refused.
fn created_name(body: &[u8]) -> Result<String, String> {
    if let Some(envelope) = body.strip_prefix(b"k8s\x00") {
        return protobuf_name(envelope)
            .ok_or_else(|| "the protobuf body of a create cannot be read".to_string());
    }
    let v: serde_json::Value = serde_json::from_slice(body)
        .map_err(|_| "the body of a create must be JSON or Kubernetes protobuf".to_string())?;
    if !v.is_object() {
        return Err("the body of a create must be a JSON object".into());
    }
    match &v["metadata"]["name"] {
        serde_json::Value::String(n) => Ok(n.clone()),
        serde_json::Value::Null => Ok(String::new()),
        _ => Err("metadata.name must be a string".into()),
    }
}

/// `metadata.name` of a protobuf-encoded object: the envelope (`runtime.Unknown`) holds the
/// object in field 2; every built-in kind has its `ObjectMeta` in field 1, whose field 1 is
/// the name.
fn protobuf_name(envelope: &[u8]) -> Option<String> {
    let object = protobuf_field(envelope, 2)?;
    let Some(meta) = protobuf_field(object, 1) else {
        return Some(String::new());
    };
    match protobuf_field(meta, 1) {
        Some(name) => String::from_utf8(name.to_vec()).ok(),
        None => Some(String::new()),
    }
}

/// The last length-delimited field `number` of a protobuf message (a repeated scalar takes
/// its last value, as protobuf does); `None` when the message is malformed.
fn protobuf_field(mut msg: &[u8], number: u64) -> Option<&[u8]> {
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
    let mut found = None;
    while !msg.is_empty() {
        let key = varint(&mut msg)?;
        match key & 7 {
            0 => {
                varint(&mut msg)?;
            }
            1 => msg = msg.get(8..)?,
            5 => msg = msg.get(4..)?,
            2 => {
                let len = usize::try_from(varint(&mut msg)?).ok()?;
                let value = msg.get(..len)?;
                msg = &msg[len..];
                if key >> 3 == number {
                    found = Some(value);
                }
            }
            _ => return None,
        }
    }
    found
}

/// The record's view of a request that has not been routed (what the client sent).
fn kube_request(
    req: &Request<Incoming>,
    info: Option<&RequestInfo>,
    command: &[String],
    body: Option<&[u8]>,
) -> KubeRequest {
    let mut r = KubeRequest {
        method: req.method().to_string(),
        path: req.uri().path().to_string(),
        query: req.uri().query().map(str::to_string),
        command: command.to_vec(),
        body_sha256: body
            .filter(|b| !b.is_empty())
            .map(|b| hex::encode(Sha256::digest(b))),
        body_bytes: body.map_or(0, |b| b.len() as u64),
        ..KubeRequest::default()
    };
    if let Some(i) = info {
        fill(&mut r, i);
    }
    r
}

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
    fn an_approval_binds_method_path_and_body() {
        let a = action_hash(
            "PATCH",
            "/apis/apps/v1/namespaces/s/deployments/web/scale",
            "x",
        );
        assert_ne!(
            a,
            action_hash(
                "PUT",
                "/apis/apps/v1/namespaces/s/deployments/web/scale",
                "x"
            )
        );
        assert_ne!(
            a,
            action_hash(
                "PATCH",
                "/apis/apps/v1/namespaces/s/deployments/web/scal",
                "ex"
            )
        );
        assert_ne!(
            a,
            action_hash(
                "PATCH",
                "/apis/apps/v1/namespaces/s/deployments/web/scale",
                "y"
            )
        );
    }
}
