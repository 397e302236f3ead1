//! The relay of an established session.
//!
//! Two halves run side by side. The client half reads client messages, writes each statement's
//! request record (and waits until it is in the log) before forwarding it, and tells the target
//! half, in protocol order, which responses to expect. The target half reads the target's
//! messages, attributes them to the statement they answer (command tags, rows, errors), writes
//! the response records, and injects the gateway's own answers (a refused statement) at the
//! right place in the stream.

use super::backend::{Backend, MAX_BACKEND_FRAME};
use super::cancel::CancelGuard;
use super::codec::{split_frame, Frame};
use super::messages::{self, display_value};
use super::session::outcome_label;
use super::PgContext;
use crate::audit::{AuditError, AuditLog};
use crate::coordination::{Hold, Step, Verdict};
use crate::policy::classify::StatementInfo;
use crate::policy::masking::{ColumnRule, Counts};
use crate::policy::{Action, Classification, Decision};
use crate::tls::BoxStream;
use bytes::{Bytes, BytesMut};
use messages::Field;
use sha2::{Digest, Sha256};
use std::borrow::Cow;
use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;
use tokio::io::{AsyncReadExt, AsyncWriteExt, ReadHalf, WriteHalf};
use tokio::sync::mpsc;
use vigil_proto::record::{
    ApprovalRef, Body, Connection, ErrorInfo, Kind, Outcome, PolicyRef, Principal, Request,
    Response,
};

/// Holds a statement that needs approval until the coordinator's answer (see
/// [`crate::coordination::Approvals::settle`]); each step is recorded under the statement
/// number `stmt` its request will get.
async fn hold(
    ctx: &PgContext,
    session: &Session,
    stmt: u64,
    request: &Request,
    decision: &Decision,
    exact: &[&[u8]],
) -> Verdict {
    let Some(spec) = decision.approval.as_deref() else {
        return Verdict::Refuse {
            sqlstate: "42501",
            message: format!(
                "statement requires approval (Vigil policy rule {}) but the rule has no approval settings",
                decision.rule
            ),
            outcome: Outcome::Blocked,
            approval: None,
        };
    };
    let mut shown = request.clone();
    let masked = mask_request(ctx, &mut shown);
    let policy = ctx.policy.reference(decision);
    let audit = &ctx.audit;
    let mut record = |step: Step| {
        let kind = if step.requested {
            Kind::ApprovalRequested
        } else {
            Kind::ApprovalDecided
        };
        let mut rec = session.body(audit, kind);
        rec.stmt = Some(stmt);
        if step.requested {
            rec.request = Some(shown.clone());
            rec.masked = masked.clone();
        }
        rec.outcome = Some(step.outcome);
        rec.policy = Some(policy.clone());
        rec.approval = Some(step.approval);
        rec.detail = Some(step.detail);
        audit.record(rec);
    };
    let hold = Hold {
        principal: &session.principal,
        connection: session.conn.name.as_deref().unwrap_or(""),
        exact,
        shown: &shown.text,
        rule: &decision.rule,
        reason: decision.reason.as_deref(),
        spec,
    };
    ctx.approvals.settle(hold, &mut record).await
}

/// Masks the audit copy of a request (statement text and bind parameters) with the
/// detectors; the target still gets the original.
fn mask_request(ctx: &PgContext, request: &mut Request) -> Counts {
    let mut counts = Counts::new();
    let masker = &ctx.masker;
    if !masker.is_active() {
        return counts;
    }
    if let Cow::Owned(t) = masker.mask(&request.text, None, false, Some(&mut counts)) {
        request.text = t;
    }
    for p in request.params.iter_mut().flatten().flatten() {
        if let Cow::Owned(t) = masker.mask(p, None, false, Some(&mut counts)) {
            *p = t;
        }
    }
    counts
}

/// What dry-run rules would have done, for the record.
fn dry_run_note(d: &Decision) -> Option<String> {
    (!d.dry_run.is_empty()).then(|| format!("dry-run: {}", d.dry_run.join(", ")))
}

/// Who is on the other end, stamped on every record of the session.
pub struct Session {
    pub id: String,
    pub principal: Arc<Principal>,
    pub conn: Arc<Connection>,
    pub started: Instant,
    /// The connection's `read_only` setting.
    pub read_only: bool,
}

impl Session {
    pub fn body(&self, audit: &AuditLog, kind: Kind) -> Body {
        let mut b = audit.body(Some(&self.id), kind);
        b.principal = Some(self.principal.clone());
        b.connection = Some(self.conn.clone());
        b
    }
}

pub struct Established {
    pub session: Session,
    /// Client bytes read past the password message.
    pub client_buf: BytesMut,
    pub backend: Backend,
    /// When the session must end because its token expires (`identity.session_expiry`).
    pub expires: Option<tokio::time::Instant>,
    pub _cancel_guard: CancelGuard,
}

/// A prepared statement (protocol Parse or SQL PREPARE; they share one namespace): its text,
/// what it does, and the decision that let it be prepared.
#[derive(Clone)]
struct Prepared {
    text: Arc<str>,
    class: Arc<Classification>,
    policy: PolicyRef,
    note: Option<String>,
    /// Set when running it needs approval: the decision that says how (held at Execute).
    hold: Option<Arc<Decision>>,
}

/// A bound portal: its statement, its parameters (for the record) and result formats.
#[derive(Clone, Default)]
struct Portal {
    statement: String,
    params: Vec<Option<String>>,
    result_formats: Vec<i16>,
}

/// A statement in flight: what the target half needs to write its response record.
struct Unit {
    stmt: u64,
    /// Set when the response record must carry the request itself (a Parse that failed: no
    /// request record was written because nothing was executed).
    request: Option<Request>,
    started: Instant,
    statement: Option<String>,
    portal: Option<String>,
    /// The Bind's result formats (Execute only).
    result_formats: Vec<i16>,
}

/// What the target half expects next, in protocol order.
enum Pending {
    Parse {
        name: String,
        text: Arc<str>,
    },
    Bind {
        portal: String,
    },
    Close,
    Describe {
        kind: u8,
        name: String,
    },
    Execute(Unit),
    Query(Unit),
    Sync,
    /// The client ended a COPY FROM STDIN (CopyDone or CopyFail). No response of its own; it
    /// marks which Syncs the target ignored because they arrived during copy-in.
    CopyEnd,
    /// A refused statement. In its place the target got a statement that fails to parse, so
    /// the target fails exactly as PostgreSQL fails on an error (an open transaction is
    /// aborted; the rest of an extended-protocol batch is discarded up to Sync). The target's
    /// ErrorResponse is replaced by `error`. `simple`: a Query, answered up to ReadyForQuery.
    StandIn {
        error: Bytes,
        simple: bool,
    },
}

/// What the target is sent in place of a refused statement: it never parses.
const STAND_IN: &str = "vigil_refused_this_statement";

pub async fn run(ctx: &Arc<PgContext>, est: Established, client: BoxStream) {
    let Established {
        session,
        client_buf,
        backend,
        expires,
        _cancel_guard: cancel_guard,
    } = est;
    let session = Arc::new(session);
    let (client_read, client_write) = tokio::io::split(client);
    let (target_read, target_write) = tokio::io::split(backend.stream);
    let (tx, rx) = mpsc::unbounded_channel();
    let copy_in = Arc::new(AtomicU64::new(0));
    let stmts = Arc::new(AtomicU64::new(0));
    let mut client_half = ClientHalf {
        ctx: ctx.clone(),
        session: session.clone(),
        read: client_read,
        write: target_write,
        buf: client_buf,
        tx,
        statements: HashMap::new(),
        portals: HashMap::new(),
        skip_until_sync: false,
        copy_in: copy_in.clone(),
        stmts: stmts.clone(),
    };
    let mut target_half = TargetHalf {
        ctx: ctx.clone(),
        session: session.clone(),
        read: target_read,
        write: client_write,
        buf: backend.leftover,
        rx,
        queue: VecDeque::new(),
        acc: Acc::default(),
        described: HashMap::new(),
        status: b'I',
        copy_in,
        stmts: stmts.clone(),
        in_copy_in: false,
        drop_syncs_until_copy_end: false,
    };
    let end = tokio::select! {
        end = client_half.run() => end,
        end = target_half.run() => end,
        () = token_expiry(expires) => End::TokenExpired,
    };
    match &end {
        End::ClientProtocol(message) => {
            let _ = target_half
                .write
                .write_all(&messages::error_response(true, "08P01", message))
                .await;
        }
        End::TokenExpired => {
            end_expired(ctx, &session, &cancel_guard, &mut target_half.write).await;
        }
        _ => {}
    }
    target_half.abandon_pending();
    let mut body = session.body(&ctx.audit, Kind::SessionEnd);
    body.duration_us = Some(session.started.elapsed().as_micros() as u64);
    body.detail = Some(format!(
        "{}; {} statements",
        end,
        stmts.load(Ordering::Relaxed)
    ));
    body.outcome = Some(match end {
        End::ClientTerminated | End::ClientClosed => Outcome::Success,
        End::TargetClosed | End::ClientProtocol(_) | End::TargetProtocol(_) => Outcome::Error,
        End::TokenExpired => Outcome::Denied,
    });
    ctx.audit.record(body);
    tracing::info!(%end, "session ended");
}

/// Why a session ended, for the `session_end` record.
#[derive(Debug)]
enum End {
    ClientTerminated,
    ClientClosed,
    TargetClosed,
    ClientProtocol(String),
    TargetProtocol(String),
    /// The session's token expired (`identity.session_expiry = "token"`).
    TokenExpired,
}

impl std::fmt::Display for End {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            End::ClientTerminated => f.write_str("client terminated"),
            End::ClientClosed => f.write_str("client closed the connection"),
            End::TargetClosed => f.write_str("target closed the connection"),
            End::ClientProtocol(e) => write!(f, "client protocol violation: {e}"),
            End::TargetProtocol(e) => write!(f, "target protocol violation: {e}"),
            End::TokenExpired => f.write_str("token expired"),
        }
    }
}

struct ClientHalf {
    ctx: Arc<PgContext>,
    session: Arc<Session>,
    read: ReadHalf<BoxStream>,
    write: WriteHalf<BoxStream>,
    buf: BytesMut,
    tx: mpsc::UnboundedSender<Pending>,
    /// Prepared statements by name (`""` is the unnamed one).
    statements: HashMap<String, Prepared>,
    /// Portals by name → (statement name, bind parameters for the record).
    portals: HashMap<String, Portal>,
    /// After a refused Execute the target never sees the rest of the batch up to Sync, the
    /// way PostgreSQL itself discards messages after an error.
    skip_until_sync: bool,
    copy_in: Arc<AtomicU64>,
    stmts: Arc<AtomicU64>,
}

impl ClientHalf {
    async fn run(&mut self) -> End {
        let mut out = BytesMut::with_capacity(8192);
        loop {
            loop {
                let frame = match split_frame(&mut self.buf, self.ctx.config.max_frame_bytes) {
                    Ok(Some(f)) => f,
                    Ok(None) => break,
                    Err(e) => return self.protocol_error(e.to_string()).await,
                };
                match self.handle(frame, &mut out).await {
                    Ok(None) => {}
                    Ok(Some(end)) => {
                        let _ = self.flush(&mut out).await;
                        return end;
                    }
                    Err(msg) => return self.protocol_error(msg).await,
                }
            }
            if self.flush(&mut out).await.is_err() {
                return End::TargetClosed;
            }
            match self.read.read_buf(&mut self.buf).await {
                Ok(0) | Err(_) => return End::ClientClosed,
                Ok(_) => {}
            }
        }
    }

    async fn flush(&mut self, out: &mut BytesMut) -> std::io::Result<()> {
        if out.is_empty() {
            return Ok(());
        }
        self.ctx.metrics.bytes_to_target.inc_by(out.len() as u64);
        let r = self.write.write_all(out).await;
        out.clear();
        r
    }

    fn expect(&self, p: Pending) {
        // The target half lives as long as this half; a send error means the session is over.
        let _ = self.tx.send(p);
    }

    fn next_stmt(&self) -> u64 {
        self.stmts.fetch_add(1, Ordering::Relaxed) + 1
    }

    /// Handles one client message. `Ok(Some)` ends the session; `Err` is a protocol violation.
    async fn handle(&mut self, frame: Frame, out: &mut BytesMut) -> Result<Option<End>, String> {
        let body = frame.body();
        let m = |e: messages::Malformed| e.to_string();
        if self.skip_until_sync && frame.tag != b'S' && frame.tag != b'X' {
            return Ok(None);
        }
        match frame.tag {
            b'Q' => {
                let text = messages::parse_query(&body).map_err(m)?;
                let request = Request {
                    protocol: "simple".into(),
                    text: text.to_string(),
                    ..Request::default()
                };
                let (decision, class) = self.check(text);
                let approval = if decision.action == Action::RequireApproval {
                    if self.flush(out).await.is_err() {
                        return Ok(Some(End::TargetClosed));
                    }
                    let stmt = self.stmts.load(Ordering::Relaxed) + 1;
                    let exact = [text.as_bytes()];
                    let (ctx, session) = (&self.ctx, &self.session);
                    match hold(ctx, session, stmt, &request, &decision, &exact).await {
                        Verdict::Run(a) => Some(a),
                        refusal => {
                            self.refuse_held(request, &decision, refusal, true, out);
                            return Ok(None);
                        }
                    }
                } else if decision.blocks() {
                    // If one statement of the message is blocked, none runs.
                    self.block(request, &decision, true, out);
                    return Ok(None);
                } else {
                    None
                };
                match self.audit_request(request, &decision, approval) {
                    Ok(unit) => {
                        self.track_sql_prepares(text, &class, &decision);
                        self.expect(Pending::Query(unit));
                        out.extend_from_slice(&frame.raw);
                    }
                    Err(e) => self.refuse_unrecorded(&e, true, out),
                }
            }
            b'P' => {
                let (name, query) = messages::parse_parse(&body).map_err(m)?;
                let (decision, class) = self.check(query);
                if decision.blocks() && decision.action != Action::RequireApproval {
                    // A blocked statement is never prepared.
                    let request = Request {
                        protocol: "extended".into(),
                        text: query.to_string(),
                        statement: Some(name.to_string()),
                        ..Request::default()
                    };
                    self.block(request, &decision, false, out);
                    self.skip_until_sync = true;
                    return Ok(None);
                }
                let text: Arc<str> = query.into();
                self.statements.insert(
                    name.to_string(),
                    Prepared {
                        text: text.clone(),
                        class,
                        policy: self.ctx.policy.reference(&decision),
                        note: dry_run_note(&decision),
                        // Preparing runs nothing; each Execute of it is held.
                        hold: (decision.action == Action::RequireApproval)
                            .then(|| Arc::new(decision.clone())),
                    },
                );
                self.expect(Pending::Parse {
                    name: name.to_string(),
                    text,
                });
                out.extend_from_slice(&frame.raw);
            }
            b'B' => {
                let bind = messages::parse_bind(&body).map_err(m)?;
                let params = bind.params.iter().map(|v| v.map(display_value)).collect();
                self.portals.insert(
                    bind.portal.to_string(),
                    Portal {
                        statement: bind.statement.to_string(),
                        params,
                        result_formats: bind.result_formats,
                    },
                );
                self.expect(Pending::Bind {
                    portal: bind.portal.to_string(),
                });
                out.extend_from_slice(&frame.raw);
            }
            b'E' => {
                let (portal, _max_rows) = messages::parse_execute(&body).map_err(m)?;
                let Portal {
                    statement,
                    params,
                    result_formats,
                } = self.portals.get(portal).cloned().unwrap_or_default();
                let prepared = self.statements.get(&statement);
                let text = prepared.map(|p| p.text.to_string()).unwrap_or_default();
                // The decision was made when the statement was prepared.
                let decision = prepared.map(|p| (p.policy.clone(), p.note.clone()));
                let held = prepared.and_then(|p| p.hold.clone());
                let request = Request {
                    protocol: "extended".into(),
                    text,
                    statement: Some(statement.clone()),
                    portal: Some(portal.to_string()),
                    params: Some(params),
                };
                let approval = match held {
                    Some(d) => {
                        if self.flush(out).await.is_err() {
                            return Ok(Some(End::TargetClosed));
                        }
                        let params = serde_json::to_vec(&request.params).unwrap_or_default();
                        let exact = [request.text.as_bytes(), params.as_slice()];
                        let stmt = self.stmts.load(Ordering::Relaxed) + 1;
                        let (ctx, session) = (&self.ctx, &self.session);
                        match hold(ctx, session, stmt, &request, &d, &exact).await {
                            Verdict::Run(a) => Some(a),
                            refusal => {
                                self.refuse_held(request, &d, refusal, false, out);
                                self.skip_until_sync = true;
                                return Ok(None);
                            }
                        }
                    }
                    None => None,
                };
                match self.audit_request_decided(request, decision, approval) {
                    Ok(mut unit) => {
                        unit.statement = Some(statement);
                        unit.portal = Some(portal.to_string());
                        unit.result_formats = result_formats;
                        self.expect(Pending::Execute(unit));
                        out.extend_from_slice(&frame.raw);
                    }
                    Err(e) => {
                        self.refuse_unrecorded(&e, false, out);
                        self.skip_until_sync = true;
                    }
                }
            }
            b'D' => {
                let (kind, name) = messages::parse_target(&body, "Describe").map_err(m)?;
                self.expect(Pending::Describe {
                    kind,
                    name: name.to_string(),
                });
                out.extend_from_slice(&frame.raw);
            }
            b'C' => {
                let (kind, name) = messages::parse_target(&body, "Close").map_err(m)?;
                // (Closing a statement also forgets it for SQL-level EXECUTE.)
                if kind == b'S' {
                    self.statements.remove(name);
                } else {
                    self.portals.remove(name);
                }
                self.expect(Pending::Close);
                out.extend_from_slice(&frame.raw);
            }
            b'S' => {
                self.skip_until_sync = false;
                self.expect(Pending::Sync);
                out.extend_from_slice(&frame.raw);
            }
            b'H' => out.extend_from_slice(&frame.raw),
            b'd' => {
                self.copy_in.fetch_add(body.len() as u64, Ordering::Relaxed);
                out.extend_from_slice(&frame.raw);
            }
            b'c' | b'f' => {
                self.expect(Pending::CopyEnd);
                out.extend_from_slice(&frame.raw);
            }
            b'X' => {
                out.extend_from_slice(&frame.raw);
                return Ok(Some(End::ClientTerminated));
            }
            b'F' => {
                let stmt = self.next_stmt();
                let mut rec = self.session.body(&self.ctx.audit, Kind::Blocked);
                rec.stmt = Some(stmt);
                rec.request = Some(Request {
                    protocol: "function_call".into(),
                    text: format!("function call, {} bytes", body.len()),
                    ..Request::default()
                });
                rec.outcome = Some(Outcome::Blocked);
                rec.policy = Some(PolicyRef {
                    rule: "function-call".into(),
                    version: self.ctx.policy.version().to_string(),
                });
                rec.detail = Some("the FunctionCall message is not allowed".into());
                self.ctx.audit.record(rec);
                self.refuse(
                    Outcome::Blocked,
                    "42501",
                    "the FunctionCall message is not allowed through the Vigil gateway; use SELECT instead",
                    true,
                    out,
                );
            }
            other => return Err(format!("unexpected message type {:?}", other as char)),
        }
        Ok(None)
    }

    /// Classifies and decides a statement text. `EXECUTE name` is decided on what `name` was
    /// prepared as.
    fn check(&self, text: &str) -> (Decision, Arc<Classification>) {
        let connection = self.session.conn.name.as_deref().unwrap_or("");
        if !self.ctx.policy.governs(connection, self.session.read_only) {
            return (self.ctx.policy.ungoverned(), Arc::new(Ok(Vec::new())));
        }
        let class = self.ctx.classifier.classify(text);
        let resolved: Option<Vec<StatementInfo>> = match class.as_ref() {
            Ok(stmts) if stmts.iter().any(|s| s.executes.is_some()) => Some(
                stmts
                    .iter()
                    .flat_map(|s| {
                        let body = s
                            .executes
                            .as_ref()
                            .and_then(|n| self.statements.get(n))
                            .and_then(|p| p.class.as_ref().as_ref().ok());
                        body.cloned().unwrap_or_else(|| vec![s.clone()])
                    })
                    .collect(),
            ),
            _ => None,
        };
        let input = match (&resolved, class.as_ref()) {
            (Some(v), _) => Ok(v.as_slice()),
            (None, Ok(v)) => Ok(v.as_slice()),
            (None, Err(e)) => Err(e),
        };
        let decision = self.ctx.policy.decide(
            input,
            &self.session.principal,
            connection,
            self.session.read_only,
        );
        (decision, class)
    }

    /// Remembers `PREPARE name AS …` (and forgets `DEALLOCATE`d names) from an allowed message.
    fn track_sql_prepares(&mut self, text: &str, class: &Classification, decision: &Decision) {
        let Ok(stmts) = class else { return };
        for s in stmts {
            if let Some(name) = &s.prepares {
                self.statements.insert(
                    name.clone(),
                    Prepared {
                        text: text.into(),
                        class: Arc::new(Ok(vec![s.clone()])),
                        policy: self.ctx.policy.reference(decision),
                        note: dry_run_note(decision),
                        // SQL EXECUTE is decided (and held) on what it runs.
                        hold: None,
                    },
                );
            }
            match &s.deallocates {
                Some(Some(name)) => {
                    self.statements.remove(name);
                }
                Some(None) => self.statements.clear(),
                None => {}
            }
        }
    }

    /// Refuses a statement the policy blocks: a `blocked` record, then ErrorResponse 42501
    /// (and ReadyForQuery if `ready`). The session continues.
    fn mask_request(&self, request: &mut Request) -> Counts {
        mask_request(&self.ctx, request)
    }

    fn block(&mut self, request: Request, decision: &Decision, simple: bool, out: &mut BytesMut) {
        let reason = decision
            .reason
            .clone()
            .unwrap_or_else(|| "the policy does not allow this statement".into());
        let detail = match dry_run_note(decision) {
            Some(note) => format!("{reason}; {note}"),
            None => reason.clone(),
        };
        let message = format!("blocked by Vigil policy (rule {}): {reason}", decision.rule);
        let refusal = Verdict::Refuse {
            sqlstate: "42501",
            message,
            outcome: Outcome::Blocked,
            approval: None,
        };
        self.refuse_recorded(request, decision, refusal, detail, simple, out);
    }

    /// Refuses a held statement the approval flow did not let run.
    fn refuse_held(
        &mut self,
        request: Request,
        decision: &Decision,
        refusal: Verdict,
        simple: bool,
        out: &mut BytesMut,
    ) {
        let detail = match &refusal {
            Verdict::Refuse { message, .. } => message.clone(),
            Verdict::Run(_) => String::new(),
        };
        self.refuse_recorded(request, decision, refusal, detail, simple, out);
    }

    /// A `blocked` record, then the refusal (ErrorResponse, and ReadyForQuery if `simple`).
    /// The session continues.
    fn refuse_recorded(
        &mut self,
        mut request: Request,
        decision: &Decision,
        refusal: Verdict,
        detail: String,
        simple: bool,
        out: &mut BytesMut,
    ) {
        let Verdict::Refuse {
            sqlstate,
            message,
            outcome,
            approval,
        } = refusal
        else {
            return;
        };
        let stmt = self.next_stmt();
        let masked = self.mask_request(&mut request);
        let mut rec = self.session.body(&self.ctx.audit, Kind::Blocked);
        rec.stmt = Some(stmt);
        rec.request = Some(request);
        rec.outcome = Some(outcome);
        rec.masked = masked;
        rec.policy = Some(self.ctx.policy.reference(decision));
        rec.detail = Some(detail);
        rec.approval = approval;
        self.ctx.audit.record(rec);
        self.refuse(outcome, sqlstate, &message, simple, out);
    }

    fn audit_request(
        &mut self,
        request: Request,
        decision: &Decision,
        approval: Option<ApprovalRef>,
    ) -> Result<Unit, AuditError> {
        let decided = (self.ctx.policy.reference(decision), dry_run_note(decision));
        self.audit_request_decided(request, Some(decided), approval)
    }

    /// Writes a request record and waits until it is in the log. An error means it could not
    /// be written (or the spool is full) and the statement must not reach the target.
    fn audit_request_decided(
        &mut self,
        mut request: Request,
        decided: Option<(PolicyRef, Option<String>)>,
        approval: Option<ApprovalRef>,
    ) -> Result<Unit, AuditError> {
        let stmt = self.next_stmt();
        let mut rec = self.session.body(&self.ctx.audit, Kind::Request);
        rec.stmt = Some(stmt);
        rec.masked = self.mask_request(&mut request);
        rec.request = Some(request);
        rec.approval = approval;
        if let Some((policy, note)) = decided {
            rec.policy = Some(policy);
            rec.detail = note;
        }
        match self.ctx.audit.append(&rec) {
            Ok(()) => Ok(Unit {
                stmt,
                request: None,
                started: Instant::now(),
                statement: None,
                portal: None,
                result_formats: Vec::new(),
            }),
            Err(e) => {
                self.ctx.metrics.audit_refused_statements.inc();
                tracing::warn!(error = %e, "statement refused: its audit record cannot be written");
                // The refusal is recorded too; the log keeps it until it can be written.
                rec.kind = Kind::Blocked;
                rec.time = crate::audit::now_rfc3339();
                rec.outcome = Some(Outcome::Error);
                rec.detail = Some(format!("refused before the target: {e}"));
                self.ctx.audit.record(rec);
                Err(e)
            }
        }
    }

    fn refuse_unrecorded(&self, e: &AuditError, simple: bool, out: &mut BytesMut) {
        let message = match e {
            AuditError::SpoolFull { .. } => format!(
                "statement refused: {e}; nothing was sent to the database (retry once the audit pipeline catches up)"
            ),
            _ => "statement refused: the gateway cannot write its audit record; nothing was sent to the database".to_string(),
        };
        self.refuse(Outcome::Error, "58030", &message, simple, out);
    }

    /// Counts a refused statement and sends the target a stand-in that fails, whose error the
    /// client sees as `message` (see [`Pending::StandIn`]).
    fn refuse(
        &self,
        outcome: Outcome,
        sqlstate: &str,
        message: &str,
        simple: bool,
        out: &mut BytesMut,
    ) {
        self.ctx
            .metrics
            .statements
            .get_or_create(&outcome_label(outcome))
            .inc();
        out.extend_from_slice(&if simple {
            messages::query(STAND_IN)
        } else {
            messages::parse(STAND_IN)
        });
        self.expect(Pending::StandIn {
            error: messages::error_response(false, sqlstate, message),
            simple,
        });
    }

    async fn protocol_error(&mut self, message: String) -> End {
        self.ctx.metrics.protocol_errors.inc();
        let mut rec = self.session.body(&self.ctx.audit, Kind::ProtocolError);
        rec.outcome = Some(Outcome::Error);
        rec.detail = Some(message.clone());
        self.ctx.audit.record(rec);
        End::ClientProtocol(message)
    }
}

/// How one result column is masked.
struct ColMask {
    rule: Option<ColumnRule>,
    /// Its table could not be resolved: masked whole (fail closed).
    unresolved: bool,
    /// Text format (only text values are rewritten for the client).
    text: bool,
}

/// What came back so far for the statement at the head of the queue.
#[derive(Default)]
struct Acc {
    response: Response,
    result_bytes: usize,
    hasher: Option<Sha256>,
    copy_out: u64,
    /// Column masks of the current result set (`None` while masking is off or not yet known).
    masks: Option<Arc<Vec<ColMask>>>,
    /// Rows arrive with no column description while column rules exist: every value is
    /// treated as unresolved.
    unknown_columns: bool,
    masked: Counts,
}

struct TargetHalf {
    ctx: Arc<PgContext>,
    session: Arc<Session>,
    read: ReadHalf<BoxStream>,
    write: WriteHalf<BoxStream>,
    buf: BytesMut,
    rx: mpsc::UnboundedReceiver<Pending>,
    queue: VecDeque<Pending>,
    acc: Acc,
    /// Columns learned from Describe, by (kind, name).
    described: HashMap<(u8, String), Vec<Field>>,
    /// Transaction status of the last ReadyForQuery.
    status: u8,
    copy_in: Arc<AtomicU64>,
    stmts: Arc<AtomicU64>,
    /// The statement at the head is in copy-in mode (CopyInResponse seen).
    in_copy_in: bool,
    /// Copy-in ended before the client's CopyEnd marker arrived: drop Syncs until it does.
    drop_syncs_until_copy_end: bool,
}

impl TargetHalf {
    async fn run(&mut self) -> End {
        let mut out = BytesMut::with_capacity(16 * 1024);
        loop {
            tokio::select! {
                biased;
                pending = self.rx.recv() => match pending {
                    Some(p) => {
                        self.push(p);
                        while let Ok(p) = self.rx.try_recv() {
                            self.push(p);
                        }
                    }
                    // The client half has ended; its End wins the select.
                    None => std::future::pending::<()>().await,
                },
                read = self.read.read_buf(&mut self.buf) => match read {
                    Ok(0) | Err(_) => {
                        let _ = self.write.write_all(&out).await;
                        return End::TargetClosed;
                    }
                    Ok(_) => {
                        while let Ok(p) = self.rx.try_recv() {
                            self.push(p);
                        }
                        loop {
                            match split_frame(&mut self.buf, MAX_BACKEND_FRAME) {
                                Ok(Some(frame)) => self.handle(frame, &mut out).await,
                                Ok(None) => break,
                                Err(e) => {
                                    let msg = e.to_string();
                                    out.extend_from_slice(&messages::error_response(
                                        true,
                                        "08P01",
                                        "the target sent an invalid message",
                                    ));
                                    let _ = self.write.write_all(&out).await;
                                    return End::TargetProtocol(msg);
                                }
                            }
                        }
                    }
                },
            }
            if !out.is_empty() {
                self.ctx.metrics.bytes_from_target.inc_by(out.len() as u64);
                if self.write.write_all(&out).await.is_err() {
                    return End::ClientClosed;
                }
                out.clear();
            }
        }
    }

    fn push(&mut self, p: Pending) {
        if self.drop_syncs_until_copy_end {
            match p {
                Pending::Sync => return,
                Pending::CopyEnd => {
                    self.drop_syncs_until_copy_end = false;
                    return;
                }
                _ => {}
            }
        }
        self.queue.push_back(p);
    }

    /// The target ignores Sync messages received during copy-in. When a copy-in ends, forget
    /// the Syncs the client sent between the COPY and its CopyDone/CopyFail.
    fn end_copy_in(&mut self) {
        if !std::mem::take(&mut self.in_copy_in) {
            return;
        }
        let end = self
            .queue
            .iter()
            .position(|p| matches!(p, Pending::CopyEnd));
        let limit = end.unwrap_or(self.queue.len());
        let mut i = 0;
        // Keep the head (the COPY itself) and everything after the marker; drop the Syncs
        // before it and the marker.
        self.queue.retain(|p| {
            let keep = i == 0 || i > limit || (i < limit && !matches!(p, Pending::Sync));
            i += 1;
            keep
        });
        self.drop_syncs_until_copy_end = end.is_none();
    }

    async fn handle(&mut self, frame: Frame, out: &mut BytesMut) {
        let mut raw = frame.raw.clone();
        // A stray CopyDone outside copy-in gets no answer; it must not shift the queue.
        while matches!(self.queue.front(), Some(Pending::CopyEnd)) {
            self.queue.pop_front();
        }
        let body = frame.body();
        match frame.tag {
            b'G' => self.in_copy_in = true,
            b'1' | b'2' | b'3' => {
                // A statement parsed again, or a portal bound again, is described anew: an
                // old description must not pick the columns that get masked.
                match self.queue.pop_front() {
                    Some(Pending::Parse { name, .. }) => {
                        self.described.remove(&(b'S', name));
                    }
                    Some(Pending::Bind { portal }) => {
                        self.described.remove(&(b'P', portal));
                    }
                    _ => {}
                }
            }
            b'n' => {
                if let Some(Pending::Describe { .. }) = self.queue.front() {
                    self.queue.pop_front();
                }
            }
            b'T' => {
                let fields = messages::parse_row_description(&body).unwrap_or_default();
                match self.queue.front() {
                    Some(Pending::Describe { kind, name }) => {
                        let key = (*kind, name.clone());
                        self.queue.pop_front();
                        self.described.insert(key, fields);
                    }
                    _ => {
                        self.acc.masks = self.masks_for(&fields).await;
                        self.acc.response.columns = fields.into_iter().map(|f| f.name).collect();
                    }
                }
            }
            b'D' => {
                if self.acc.masks.is_none() && self.ctx.masker.is_active() {
                    // An Execute's rows: the columns were described before.
                    let fields = match self.queue.front() {
                        Some(Pending::Execute(unit)) => {
                            // Rows of an Execute nobody described: the columns are unknown, so
                            // column rules cannot be matched; fail closed.
                            self.acc.unknown_columns = self.described_fields(unit).is_none();
                            self.described_fields(unit).map(|fields| {
                                // A statement's Describe does not know the formats; the Bind
                                // chose them.
                                let f = &unit.result_formats;
                                fields
                                    .iter()
                                    .enumerate()
                                    .map(|(i, field)| Field {
                                        format: match f.len() {
                                            0 => 0,
                                            1 => f[0],
                                            _ => f.get(i).copied().unwrap_or(0),
                                        },
                                        ..field.clone()
                                    })
                                    .collect::<Vec<_>>()
                            })
                        }
                        _ => None,
                    };
                    self.acc.masks = self.masks_for(&fields.unwrap_or_default()).await;
                }
                if let Some(masked) = self.add_row(&body) {
                    raw = masked;
                }
            }
            b'd' => self.acc.copy_out += body.len() as u64,
            b'C' | b'I' | b's' => {
                self.end_copy_in();
                if frame.tag == b'C' {
                    let tag = body.strip_suffix(b"\0").unwrap_or(&body);
                    self.acc
                        .response
                        .tags
                        .push(String::from_utf8_lossy(tag).into_owned());
                }
                if let Some(Pending::Execute(_)) = self.queue.front() {
                    if let Some(Pending::Execute(unit)) = self.queue.pop_front() {
                        self.complete(unit);
                    }
                }
            }
            b'E' => {
                self.end_copy_in();
                let (code, message) = messages::parse_error_fields(&body);
                let error = ErrorInfo {
                    sqlstate: code,
                    message,
                };
                match self.queue.front() {
                    // The stand-in failed as intended: the client sees the gateway's error.
                    Some(Pending::StandIn { error, simple }) => {
                        raw = error.clone();
                        if !*simple {
                            // The target now discards everything up to Sync, as after any
                            // error; nothing was queued behind the stand-in but that Sync.
                            self.queue.pop_front();
                        }
                    }
                    Some(Pending::Query(_)) if self.acc.response.error.is_none() => {
                        self.acc.response.error = Some(error);
                    }
                    Some(Pending::Query(_)) => {}
                    Some(_) => {
                        // Extended protocol: the target discards everything up to Sync. The
                        // first statement in that range carries the error; the others never ran.
                        let mut error = Some(error);
                        if let Some(Pending::Parse { name, text }) = self.queue.front() {
                            // A statement that does not parse never runs; its attempt is
                            // recorded with the error.
                            let unit = Unit {
                                stmt: self.stmts.fetch_add(1, Ordering::Relaxed) + 1,
                                request: Some(Request {
                                    protocol: "extended".into(),
                                    text: text.to_string(),
                                    statement: Some(name.clone()),
                                    ..Request::default()
                                }),
                                started: Instant::now(),
                                statement: None,
                                portal: None,
                                result_formats: Vec::new(),
                            };
                            self.queue.pop_front();
                            self.acc.response.error = error.take();
                            self.complete(unit);
                        }
                        while !matches!(self.queue.front(), Some(Pending::Sync) | None) {
                            if let Some(Pending::Execute(unit)) = self.queue.pop_front() {
                                self.acc.response.error = Some(error.take().unwrap_or_else(|| {
                                    ErrorInfo {
                                        sqlstate: String::new(),
                                        message:
                                            "not executed: an earlier message of the batch failed"
                                                .into(),
                                    }
                                }));
                                self.complete(unit);
                            }
                        }
                        self.acc = Acc::default();
                    }
                    None => {}
                }
            }
            b'Z' => {
                self.status = body.first().copied().unwrap_or(b'I');
                match self.queue.pop_front() {
                    Some(Pending::Query(unit)) => self.complete(unit),
                    Some(Pending::Sync) | Some(Pending::StandIn { .. }) | None => {}
                    Some(other) => {
                        // Out of step: keep the entry for the next response rather than guess.
                        self.queue.push_front(other);
                    }
                }
            }
            _ => {}
        }
        out.extend_from_slice(&raw);
    }

    fn masks_for(
        &self,
        fields: &[Field],
    ) -> impl std::future::Future<Output = Option<Arc<Vec<ColMask>>>> + Send + 'static {
        let ctx = self.ctx.clone();
        let conn = self.session.conn.name.clone().unwrap_or_default();
        let fields = fields.to_vec();
        async move { Self::masks(&ctx, &conn, &fields).await }
    }

    /// The Describe result that covers an Execute: its portal's, else its statement's.
    fn described_fields(&self, unit: &Unit) -> Option<&Vec<Field>> {
        let portal = unit.portal.as_ref().map(|p| (b'P', p.clone()));
        let stmt = unit.statement.as_ref().map(|s| (b'S', s.clone()));
        portal
            .and_then(|k| self.described.get(&k))
            .or_else(|| stmt.and_then(|k| self.described.get(&k)))
    }

    /// Column masks for a result set, resolving the tables behind its columns. (Takes the
    /// context rather than `self`: the half's streams are not `Sync`.)
    async fn masks(ctx: &PgContext, conn: &str, fields: &[Field]) -> Option<Arc<Vec<ColMask>>> {
        let masker = &ctx.masker;
        if !masker.is_active() {
            return None;
        }
        let oids: Vec<u32> = fields
            .iter()
            .map(|f| f.table_oid)
            .filter(|&o| o != 0)
            .collect();
        let tables = match ctx.catalogs.get(conn) {
            Some(catalog) if masker.has_column_rules() && !oids.is_empty() => {
                match catalog.tables(&oids).await {
                    Ok(t) => Some(t),
                    Err(e) => {
                        tracing::warn!(error = %crate::error_chain(&e), "cannot resolve result tables; masking those columns whole");
                        None
                    }
                }
            }
            _ => Some(HashMap::new()),
        };
        Some(Arc::new(
            fields
                .iter()
                .map(|f| {
                    let (rule, unresolved) = match &tables {
                        None => (None, f.table_oid != 0),
                        Some(t) => (
                            t.get(&f.table_oid)
                                .and_then(|t| {
                                    let column = t.columns.get(&f.column)?;
                                    masker.column_rule(conn, &t.schema, &t.name, column)
                                })
                                .cloned(),
                            false,
                        ),
                    };
                    ColMask {
                        rule,
                        unresolved,
                        text: f.format == 0 || messages::is_text_type(f.type_oid),
                    }
                })
                .collect(),
        ))
    }

    /// Accounts a DataRow; returns the row to send instead when the client copy is masked.
    fn add_row(&mut self, body: &Bytes) -> Option<Bytes> {
        let masker = &self.ctx.masker;
        let acc = &mut self.acc;
        acc.response.rows += 1;
        acc.response.bytes += body.len() as u64;
        let values = messages::parse_data_row(body).ok();
        let masks = acc.masks.clone();
        let unknown = acc.unknown_columns && masker.has_column_rules();
        let limit = self.ctx.max_result_bytes;
        match &values {
            Some(values) if !acc.response.truncated && acc.result_bytes + body.len() <= limit => {
                acc.result_bytes += body.len();
                let row = values
                    .iter()
                    .enumerate()
                    .map(|(i, v)| {
                        v.map(|v| {
                            let text = display_value(v);
                            let Some(masks) = &masks else { return text };
                            match masks.get(i) {
                                _ if unknown => {
                                    *acc.masked.entry("unresolved".into()).or_default() += 1;
                                    "[redacted]".to_string()
                                }
                                Some(m) if m.unresolved => {
                                    *acc.masked.entry("unresolved".into()).or_default() += 1;
                                    "[redacted]".to_string()
                                }
                                m => masker
                                    .mask(
                                        &text,
                                        m.and_then(|m| m.rule.as_ref()),
                                        false,
                                        Some(&mut acc.masked),
                                    )
                                    .into_owned(),
                            }
                        })
                    })
                    .collect();
                acc.response.result.push(row);
            }
            _ => {
                // Rows past the limit are not recorded one by one; their digest is.
                acc.response.truncated = true;
                acc.hasher.get_or_insert_with(Sha256::new).update(&body[..]);
            }
        }
        let conn = self.session.conn.name.as_deref().unwrap_or("");
        let (Some(masks), Some(values)) = (masks, values) else {
            return None;
        };
        if !masker.masks_clients(conn) {
            return None;
        }
        let mut changed = false;
        let client: Vec<Option<Cow<'_, [u8]>>> = values
            .iter()
            .enumerate()
            .map(|(i, v)| {
                let m = masks.get(i);
                if unknown {
                    // Unknown columns: text is redacted, anything else withheld.
                    changed |= v.is_some();
                    return v.and_then(|v| {
                        std::str::from_utf8(v)
                            .ok()
                            .map(|_| Cow::Owned(b"[redacted]".to_vec()))
                    });
                }
                // A binary value of another type cannot be rewritten: when a client-side rule
                // covers it, it is withheld (NULL) rather than leaked.
                if m.is_some_and(|m| {
                    !m.text && (m.unresolved || m.rule.as_ref().is_some_and(|r| r.client))
                }) {
                    changed |= v.is_some();
                    return None;
                }
                v.map(|v| {
                    let text = match std::str::from_utf8(v) {
                        Ok(t) if m.is_none_or(|m| m.text) => t,
                        _ => return Cow::Borrowed(v),
                    };
                    let out = if m.is_some_and(|m| m.unresolved) {
                        Cow::Owned("[redacted]".to_string())
                    } else {
                        masker.mask(text, m.and_then(|m| m.rule.as_ref()), true, None)
                    };
                    match out {
                        Cow::Owned(o) => {
                            changed = true;
                            Cow::Owned(o.into_bytes())
                        }
                        Cow::Borrowed(_) => Cow::Borrowed(v),
                    }
                })
            })
            .collect();
        changed.then(|| {
            let refs: Vec<Option<&[u8]>> = client.iter().map(|v| v.as_deref()).collect();
            messages::data_row(&refs)
        })
    }

    /// Writes the response record of a finished statement.
    fn complete(&mut self, unit: Unit) {
        let mut acc = std::mem::take(&mut self.acc);
        let copy_in = self.copy_in.swap(0, Ordering::Relaxed);
        acc.response.bytes += acc.copy_out + copy_in;
        acc.response.digest = acc.hasher.map(|h| hex::encode(h.finalize()));
        if acc.response.columns.is_empty() {
            if let Some(fields) = self.described_fields(&unit) {
                acc.response.columns = fields.iter().map(|f| f.name.clone()).collect();
            }
        }
        // Values echoed in errors and in a failed Parse's text are masked like results.
        let masker = &self.ctx.masker;
        let mut request = unit.request;
        if masker.is_active() {
            if let Some(e) = acc.response.error.as_mut() {
                if let Cow::Owned(m) = masker.mask(&e.message, None, false, Some(&mut acc.masked)) {
                    e.message = m;
                }
            }
            if let Some(r) = request.as_mut() {
                if let Cow::Owned(m) = masker.mask(&r.text, None, false, Some(&mut acc.masked)) {
                    r.text = m;
                }
            }
        }
        let outcome = if acc.response.error.is_some() {
            Outcome::Error
        } else {
            Outcome::Success
        };
        self.ctx
            .metrics
            .statements
            .get_or_create(&outcome_label(outcome))
            .inc();
        let mut rec = self.session.body(&self.ctx.audit, Kind::Response);
        rec.stmt = Some(unit.stmt);
        rec.request = request;
        rec.masked = acc.masked;
        rec.response = Some(acc.response);
        rec.outcome = Some(outcome);
        rec.duration_us = Some(unit.started.elapsed().as_micros() as u64);
        self.ctx.audit.record(rec);
    }

    /// Statements still in flight when the session ends get a response record too.
    fn abandon_pending(&mut self) {
        while let Ok(p) = self.rx.try_recv() {
            self.queue.push_back(p);
        }
        while let Some(p) = self.queue.pop_front() {
            if let Pending::Execute(unit) | Pending::Query(unit) = p {
                self.acc.response.error = Some(ErrorInfo {
                    sqlstate: String::new(),
                    message: "no answer: the session ended first".into(),
                });
                self.complete(unit);
            }
        }
    }
}

/// Resolves when the session's token expires; never for a session without a deadline.
async fn token_expiry(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// The message a client gets when its session ends because its token expired.
const EXPIRED: &str =
    "terminating connection: the access token expired; reconnect with a fresh token";

/// Ends a session whose token expired. Both halves have stopped, so nothing the client sends
/// from now on reaches the target. Whatever the target is still running for this session is
/// cancelled the way a client's CancelRequest is (on record first), and the client is told why
/// its connection ends (`57P01`, as for `pg_terminate_backend`). Dropping the target connection
/// afterwards rolls back an open transaction.
async fn end_expired(
    ctx: &PgContext,
    session: &Session,
    cancel_guard: &CancelGuard,
    client: &mut WriteHalf<BoxStream>,
) {
    let (pid, secret) = cancel_guard.key();
    super::session::cancel(ctx, &session.conn, pid, secret).await;
    let _ = client
        .write_all(&messages::error_response(true, "57P01", EXPIRED))
        .await;
}
