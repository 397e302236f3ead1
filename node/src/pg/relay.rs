//! The relay of an established session.
//!
//! Two halves run side by side. The client half reads client messages, writes each statement's
//! request record (and waits until it is in the log) before forwarding it, and tells the target
//! half, in protocol order, which responses to expect. The target half reads the target's
//! messages, attributes them to the statement they answer (command tags, rows, errors), writes
//! the response records, and injects the gateway's own answers (a refused statement) at the
//! right place in the stream.

use super::backend::Backend;
use super::binding::{self, Binding, CustomSettings, Settings};
use super::budget::{large_pending, Lent, MessageBudget, LARGE_MESSAGE};
use super::cancel::CancelGuard;
use super::codec::{split_frame, Frame, FrameError};
use super::encoding::{self, EncodingError};
use super::messages::{self, display_value};
use super::refusal::sql_error;
use super::state::{runs_by_name, Confirmed, Lookup, Op, Portal, Projection, Stmt};
use super::PgContext;
use crate::audit::{AuditError, AuditLog};
use crate::core::approvals::{
    Hold, Step, Verdict, APPROVED_TOO_LATE, CLIENT_LEFT, NODE_ENDING, TARGET_CLOSED, TOKEN_EXPIRED,
};
use crate::core::lifecycle::until;
use crate::core::metrics::OutcomeLabel;
use crate::core::tls::{send_all, BoxStream};
use crate::core::Refusal;
use crate::policy::classify::{StatementInfo, StatementKind};
use crate::policy::masking::{
    mask_recorded, produced_mask, scrub_values, without_credentials, ColumnRule, Counts, MaskScan,
    Masker,
};
use crate::policy::{gateway_block, with_note, Action, Classification, Decision};
use bytes::{Bytes, BytesMut};
use messages::Field;
use sha2::{Digest, Sha256};
use std::borrow::Cow;
use std::collections::{HashMap, HashSet, VecDeque};
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock, RwLock};
use std::task::Poll;
use std::time::Instant;
use tokio::io::{AsyncReadExt, ReadHalf, WriteHalf};
use tokio::sync::mpsc;
use vigil_coordinator::approvals::{ActionKey, Scope};
use vigil_proto::coordinator as pb;
use vigil_proto::record::{
    ApprovalRef, Body, Connection, Kind, Outcome, Parties, PgError, PgNotification, PgRequest,
    PgResponse, PolicyRef, PreparedText, Principal, Request, Response,
};

/// Holds a statement that needs approval until the coordinator's answer (see
/// [`crate::core::approvals::Approvals::settle`]); each step is recorded under the statement
/// number `stmt` its request will get. The approval is bound to `binding` (its `hash`), and
/// the approver is shown all of it, masked without changing how it reads; what cannot be
/// shown that way is not held. `left` resolves when the client hangs up (see
/// [`client_left`]).
#[allow(clippy::too_many_arguments)]
async fn hold(
    ctx: &PgContext,
    session: &Session,
    stmt: u64,
    request: &PgRequest,
    decision: &Decision,
    binding: &Binding<'_>,
    hash: &str,
    left: impl Future<Output = &'static str>,
) -> Verdict {
    let spec = match crate::core::approvals::spec_of(decision) {
        Ok(s) => s,
        Err(refused) => return *refused,
    };
    let mut masked = Counts::new();
    let shown_binding = match binding.shown(&ctx.core.masker, &mut masked) {
        Ok(b) => b,
        Err(why) => return unbound(&decision.rule, why),
    };
    // The audit copy is the approver's copy.
    let mut shown = request.clone();
    shown.text = shown_binding.text.clone();
    for (p, s) in shown.prepared.iter_mut().zip(&shown_binding.runs) {
        p.text = s.text.clone();
    }
    if let Some(params) = shown.params.as_mut() {
        for (p, s) in params.iter_mut().zip(&shown_binding.params) {
            *p = (!s.null).then(|| s.value.clone());
        }
    }
    shown.binding = Some(binding.record(hash));
    if let Some(b) = shown.binding.as_mut() {
        b.database = shown_binding.database.clone();
        b.role = shown_binding.role.clone();
        b.search_path = shown_binding.search_path.clone();
        b.settings = shown_binding.settings.clone();
    }
    let policy = ctx.policy.reference(decision);
    let audit = &ctx.core.audit;
    let mut record = |step: Step| {
        let kind = if step.requested {
            Kind::ApprovalRequested
        } else {
            Kind::ApprovalDecided
        };
        let mut rec = session.body(audit, kind);
        rec.stmt = Some(stmt);
        if step.requested {
            rec.request = Some(Request::Postgres(shown.clone()));
            rec.masked = masked.clone();
        }
        rec.outcome = Some(step.outcome);
        rec.policy = Some(policy.clone());
        rec.approval = Some(step.approval);
        rec.detail = Some(step.detail);
        audit.record(rec);
    };
    let target = session.conn.name.as_deref().unwrap_or("");
    let place = ctx
        .config
        .connections
        .iter()
        .find(|c| c.name == target)
        .map(|c| format!("{}:{}", c.host, c.port))
        .unwrap_or_default();
    let hold = Hold {
        principal: &session.principal,
        key: ActionKey {
            scope: Scope::new(super::PROTOCOL, target),
            hash: hash.to_string(),
        },
        place,
        action: &shown_binding.text,
        shown: pb::ShownAction {
            protocol: Some(pb::shown_action::Protocol::Postgres(shown_binding.clone())),
        },
        rule: &decision.rule,
        reason: decision.reason.as_deref(),
        spec,
    };
    ctx.core.approvals.settle(hold, &mut record, left).await
}

/// Resolves when the client hangs up, setting `left`: a held statement's wait for a decision
/// then ends, nothing runs, and an approval given later stays unused (a client that connects
/// again and sends the statement again can use it). What the client sends meanwhile waits in
/// `buf`, read up to [`BATCH_BUFFER`]; beyond that it waits in the socket, unwatched.
async fn client_left(
    read: &mut ReadHalf<BoxStream>,
    buf: &mut BytesMut,
    left: &mut bool,
) -> &'static str {
    while buf.len() < BATCH_BUFFER {
        if matches!(read.read_buf(buf).await, Ok(0) | Err(_)) {
            *left = true;
            return CLIENT_LEFT;
        }
    }
    std::future::pending().await
}

/// Why a Query of several statements cannot be held: the settings the approver is shown are
/// read before the message, and any statement before the held one but `BEGIN`, `START
/// TRANSACTION`, `SAVEPOINT` or `RELEASE` may change them for the statements after it: a
/// transaction's end reverts what `SET` and `SET LOCAL` did inside it; `SET`, `RESET`,
/// `DISCARD`, `SET ROLE`, `set_config` set them, and so may any function a statement calls
/// (directly, in SQL it runs as text, in a procedure or a `DO` block), which the gateway cannot
/// see into.
fn settings_may_change_within(class: &Classification) -> Option<String> {
    let Ok(statements) = class else {
        return None;
    };
    let (_, before_last) = statements.split_last()?;
    // A transaction's start or a savepoint: kind Transaction, and no transaction ends there.
    let at = before_last
        .iter()
        .position(|s| s.kind != Some(StatementKind::Transaction) || s.ends_portals.is_some())?;
    Some(format!(
        "statement {} of the message runs before the one held and may change the settings it \
         runs under (only BEGIN, START TRANSACTION, SAVEPOINT and RELEASE may come first): send \
         the statement that needs approval in a message of its own",
        at + 1
    ))
}

/// A statement that needs approval but cannot be held: its binding could not be established
/// or it cannot be shown faithfully. Refused; nothing runs.
fn unbound(rule: &str, why: impl std::fmt::Display) -> Verdict {
    Verdict::Refuse {
        refusal: Refusal::Unbound {
            rule: rule.to_string(),
            why: why.to_string(),
        },
        approval: None,
    }
}

/// Masks the audit copy of a request: credentials out of its statements always (see
/// [`without_credentials`]), then the statement text and bind parameters with the detectors;
/// the target still gets the original.
/// The values taken out go to `secrets` (see [`take_credentials`]).
fn mask_request(ctx: &PgContext, request: &mut PgRequest, secrets: &mut Vec<String>) -> Counts {
    let mut counts = Counts::new();
    let texts =
        std::iter::once(&mut request.text).chain(request.prepared.iter_mut().map(|p| &mut p.text));
    for text in texts {
        take_credentials(text, &mut counts, secrets);
    }
    let masker = &ctx.core.masker;
    if !masker.is_active() {
        return counts;
    }
    // A statement's text is masked token by token, so that its copy reads as it runs (a
    // masked number after `/` must not open a comment); only when there is something to mask.
    let statements =
        std::iter::once(&mut request.text).chain(request.prepared.iter_mut().map(|p| &mut p.text));
    for text in statements {
        mask_statement_copy(masker, text, &mut counts);
    }
    let values = request.params.iter_mut().flatten().flatten();
    let settings = request.binding.iter_mut().flat_map(|b| {
        [
            &mut b.database,
            &mut b.role,
            &mut b.search_path,
            &mut b.settings,
        ]
    });
    for v in values {
        if let Cow::Owned(t) = messages::mask_shown(masker, v, None, Some(&mut counts)) {
            *v = t;
        }
    }
    for v in settings {
        if let Cow::Owned(t) = masker.mask(v, None, false, Some(&mut counts)) {
            *v = t;
        }
    }
    counts
}

/// Masks a statement's audit copy with the detectors, token by token ([`mask_recorded`]) when
/// there is something to mask.
fn mask_statement_copy(masker: &Masker, text: &mut String, counts: &mut Counts) {
    if let Cow::Owned(_) = masker.mask(text, None, false, None) {
        if let Some(t) = mask_recorded(masker, text, counts) {
            *text = t;
        }
    }
}

/// Takes the credentials out of a statement's audit copy (counted as `secret` values); the
/// values go to `secrets`, to be taken out of the target's error about the statement too.
fn take_credentials(text: &mut String, counts: &mut Counts, secrets: &mut Vec<String>) {
    if let Some(taken) = without_credentials(text, counts) {
        *text = taken.text;
        secrets.extend(taken.values);
    }
}

/// Who is on the other end, stamped on every record of the session.
pub struct Session {
    pub id: String,
    /// Who authenticated: what every decision is made for.
    pub principal: Arc<Principal>,
    pub conn: Arc<Connection>,
    pub started: Instant,
    /// The connection's `read_only` setting.
    pub read_only: bool,
    /// The principal and connection as recorded (serialised once): `principal` and `conn`,
    /// and since the target reported a new `application_name` (drivers such as pgjdbc set it
    /// after startup) with the declared application and intent changed; the identity does not.
    pub recorded: RwLock<Arc<Parties>>,
    /// The session's trace span (core/trace.rs), the parent of its statements' spans.
    pub trace: tracing::Span,
}

impl Session {
    pub fn body(&self, audit: &AuditLog, kind: Kind) -> Body {
        let mut b = audit.body(Some(&self.id), kind);
        self.recorded
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .fill(&mut b);
        b
    }

    /// The target confirmed a new `application_name`: records name it from now on, as the
    /// application and the declared intent (never trusted for a decision).
    fn application_reported(&self, name: &str) {
        let name = (!name.is_empty()).then(|| name.to_string());
        let mut principal = (*self.principal).clone();
        principal.intent = name.clone();
        let mut conn = (*self.conn).clone();
        conn.application = name;
        *self.recorded.write().unwrap_or_else(|e| e.into_inner()) =
            Parties::new(Arc::new(principal), Arc::new(conn));
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

/// A statement in flight: what the target half needs to write its response record.
struct Unit {
    stmt: u64,
    /// Its trace span (core/trace.rs), ended with the unit.
    span: tracing::Span,
    /// Set when the response record must carry the request itself (a Parse that failed: no
    /// request record was written because nothing was executed).
    request: Option<PgRequest>,
    started: Instant,
    /// The portal an Execute runs (for the columns of its rows).
    portal: Option<Arc<Portal>>,
    /// What it does to the statement and portal tables: `always` whatever its outcome, then
    /// `per_statement[i]` once the target completed its i-th statement.
    always: Vec<Op>,
    per_statement: Vec<Vec<Op>>,
    /// Credentials taken out of its request record, taken out of the target's error too.
    secrets: Vec<String>,
    /// Whether its result columns without a table may carry a value a column rule covers
    /// (`Some(client)`: masked whole, for the client too when `client`; see
    /// [`ClientHalf::derives`]).
    derives: Option<bool>,
}

impl Unit {
    fn new(session: &Session, stmt: u64) -> Self {
        Unit {
            stmt,
            span: crate::core::trace::statement(&session.trace, super::PROTOCOL, &session.id, stmt),
            request: None,
            started: Instant::now(),
            portal: None,
            always: Vec::new(),
            per_statement: Vec::new(),
            secrets: Vec::new(),
            derives: None,
        }
    }
}

/// What a Describe asked about, as resolved when it was sent.
enum Described {
    Statement(Arc<Stmt>),
    Portal(Arc<Portal>),
}

/// What the target half expects next, in protocol order.
enum Pending {
    /// Parse, Bind and Close: their changes to the tables, applied as the target answers.
    Parse {
        name: String,
        text: Arc<str>,
        ops: Vec<Op>,
    },
    Bind(Vec<Op>),
    Close(Vec<Op>),
    Describe(Option<Described>),
    /// The gateway's own Describe of a portal it just bound (see [`ClientHalf::send_bind`]):
    /// its answer goes to no one.
    OwnDescribe(Arc<Portal>),
    /// A Bind the client heard BindComplete for already (see [`ClientHalf::on_bind`]): its
    /// changes to the tables.
    OwnBind(Vec<Op>),
    /// The gateway's Close of a portal of its own: its answer goes to no one.
    OwnClose,
    Execute(Unit),
    Query(Unit),
    Sync,
    /// The client ended a COPY FROM STDIN (CopyDone or CopyFail). No response of its own; it
    /// marks which Syncs the target ignored because they arrived during copy-in.
    CopyEnd,
    /// The gateway's settings probe (see [`ClientHalf::settings`]): its answers up to its
    /// ReadyForQuery go to no one; the row found so far.
    Probe(Option<Settings>),
    /// A refused statement. In its place the target got a statement that fails to parse, so
    /// the target fails exactly as PostgreSQL fails on an error (an open transaction is
    /// aborted; the rest of an extended-protocol batch is discarded up to Sync). The target's
    /// ErrorResponse is replaced by `error`. `simple`: a Query, answered up to ReadyForQuery.
    StandIn {
        error: Bytes,
        simple: bool,
    },
}

/// How much of a batch that has run nothing yet the gateway keeps until the rest arrives.
const BATCH_BUFFER: usize = 1 << 20;

/// Why a session ends whose client sent another message inside its COPY FROM STDIN data.
const COPY_INTERRUPTED: &str = "the client sent a message other than COPY data, CopyDone, CopyFail, Sync or Flush during COPY FROM STDIN: the target fails the copy on it and discards it unanswered, so the session ends";

/// What the target is sent in place of a refused statement: it never parses.
const STAND_IN: &str = "vigil_refused_this_statement";

/// Why the client half stops handling messages.
enum Halt {
    End(End),
    /// The client broke the protocol.
    Violation(String),
}

impl From<messages::Malformed> for Halt {
    fn from(e: messages::Malformed) -> Self {
        Halt::Violation(e.to_string())
    }
}

/// A statement prepared earlier in the same text: its text and what it does.
type Earlier = (Arc<str>, Vec<StatementInfo>);

/// A statement text with its `EXECUTE name`s resolved to what the target holds.
#[derive(Default)]
struct Resolved {
    /// The statements to decide, each `EXECUTE name` joined by what `name` runs (`None`: the
    /// text runs no prepared statement by name; decide it as written).
    decided: Option<Vec<StatementInfo>>,
    /// The prepared statements it runs by name, for the record.
    prepared: Vec<PreparedText>,
    /// Their texts, in order (what an approval binds).
    runs: Vec<Arc<str>>,
    /// A name the target does not hold (or the gateway cannot be sure what it holds).
    unknown: Option<String>,
}

/// The custom settings a client may give at startup (those `policy.allowed_startup_settings`
/// lets through that have a dot), read like the ones the session sets.
fn startup_custom_settings(policy: &crate::policy::Policy) -> CustomSettings {
    let mut custom = CustomSettings::default();
    custom.note(policy.allowed_startup_settings().iter().map(String::as_str));
    custom
}

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
    let confirmed = Confirmed::new();
    let holding = Arc::new(AtomicBool::new(false));
    let target_gone = Arc::new(Gone::default());
    let mut client_half = ClientHalf {
        ctx: ctx.clone(),
        session: session.clone(),
        read: client_read,
        write: target_write,
        buf: client_buf,
        tx,
        tables: Projection::new(confirmed.clone()),
        skip_until_sync: false,
        copy_in: copy_in.clone(),
        stmts: stmts.clone(),
        pending: Vec::new(),
        in_append: None,
        batch: Batch::Empty,
        ran_in_batch: false,
        flush_asked: false,
        copy_scan: None,
        probe_name: format!("vigil_probe_{}", hex::encode(rand::random::<[u8; 8]>())),
        bound_portals: Some(HashSet::new()),
        custom_settings: startup_custom_settings(&ctx.policy),
        expires,
        holding: holding.clone(),
        target_gone: target_gone.clone(),
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
        tables: confirmed,
        status: b'I',
        copy_in,
        stmts: stmts.clone(),
        in_copy_in: false,
        drop_syncs_until_copy_end: false,
        lost_step: None,
        copy_unended: false,
        discarding: None,
        unsolicited: None,
        idle: Idle::default(),
        lent: None,
        torn: false,
        in_block: false,
        unsynced: None,
    };
    // Both halves run in this one task, the client half polled first in every turn: what it
    // hands the target half (a queue the target half polls but never waits on, see `queued`)
    // is taken up in the same turn. A channel that woke its receiver would wake this task from
    // inside its own poll, and the runtime reschedules a task that wakes itself as a yield and
    // wakes an idle worker to steal it: two context switches per statement.
    // The token's expiry, the drain deadline and the target's end end the session, but not in
    // the middle of a held statement: the hold sees them too, and ends first (see
    // `ClientHalf::held`).
    let end = {
        let mut client = std::pin::pin!(client_half.run());
        let mut target = std::pin::pin!(target_half.run());
        let mut expiry = std::pin::pin!(until(expires));
        let mut shutdown = std::pin::pin!(ctx.core.lifecycle.ended());
        let (mut expired, mut ending) = (false, false);
        // The target half's end while the client half held a statement: the session's.
        let mut target_end = None;
        // Looked at before the halves too: once the expiry or the deadline has come, nothing
        // more the client sent is handled (a hold under way excepted); the target half still
        // passes on and records what the target already answered.
        let end_now = |expired: bool, ending: bool| match (
            holding.load(Ordering::Relaxed),
            expired,
            ending,
        ) {
            (true, _, _) | (false, false, false) => None,
            (false, true, _) => Some(End::TokenExpired),
            (false, false, true) => Some(End::NodeShutdown),
        };
        std::future::poll_fn(|cx| {
            expired = expired || expiry.as_mut().poll(cx).is_ready();
            ending = ending || shutdown.as_mut().poll(cx).is_ready();
            let end = end_now(expired, ending);
            if end.is_none() {
                if let Poll::Ready(end) = client.as_mut().poll(cx) {
                    return Poll::Ready(target_end.take().unwrap_or(end));
                }
            }
            if target_end.is_none() {
                if let Poll::Ready(end) = target.as_mut().poll(cx) {
                    if !target_gone.watched() {
                        return Poll::Ready(end);
                    }
                    // The hold sees it (this wakes the task) and ends; so does the client half.
                    target_gone.set(held_end(&end));
                    target_end = Some(end);
                }
            }
            // The client half may have finished a hold.
            match end.or_else(|| end_now(expired, ending)) {
                Some(end) => Poll::Ready(end),
                None => Poll::Pending,
            }
        })
        .await
    };
    // An error with nothing in flight is the target ending the session; a client that hangs
    // up on reading it (as drivers do) does not make the end its own.
    let said = target_half.unsolicited.take();
    let end = match end {
        End::ClientClosed | End::ClientTerminated if said.is_some() => End::TargetClosed,
        end => end,
    };
    match &end {
        End::ClientProtocol(_) | End::TargetProtocol(_) | End::ReadingChanged(_) => {
            let message = match &end {
                End::ClientProtocol(m) => m.clone(),
                // What was wrong is in the session_end record and the node's log.
                End::TargetProtocol(_) => {
                    ctx.core.metrics.target_protocol_errors.inc();
                    "the target sent an invalid message".into()
                }
                other => other.to_string(),
            };
            let said = messages::error_response(true, "08P01", &message);
            target_half.last_words(&said, false).await;
        }
        End::TargetTooLarge { len, max } => {
            let message = format!(
                "vigil: the target's answer holds a message of {len} bytes, more than this \
                 gateway passes on (postgres.max_target_message_bytes = {max}); the session is ended"
            );
            let said = messages::error_response(true, "54000", &message);
            target_half.last_words(&said, false).await;
        }
        End::TokenExpired => {
            end_by_gateway(ctx, &session, &cancel_guard, &mut target_half, EXPIRED).await;
        }
        End::NodeShutdown => {
            let why = crate::core::lifecycle::SHUTTING_DOWN;
            end_by_gateway(ctx, &session, &cancel_guard, &mut target_half, why).await;
        }
        _ => {}
    }
    target_half.abandon_pending(match &end {
        End::TargetTooLarge { .. } => PgError {
            sqlstate: "54000".into(),
            message: format!("the answer was not passed on: {end}; the session was ended"),
        },
        _ => PgError {
            sqlstate: String::new(),
            message: "no answer: the session ended first".into(),
        },
    });
    target_half.abandon(
        client_half.unsent(),
        PgError {
            sqlstate: String::new(),
            message: NOT_SENT.into(),
        },
    );
    let mut body = session.body(&ctx.core.audit, Kind::SessionEnd);
    body.duration_us = Some(session.started.elapsed().as_micros() as u64);
    // What the target said as it ended the session, if it said anything.
    let said = said
        .map(|e| format!(" ({} {})", e.sqlstate, ctx.core.scrub(&e.message)))
        .unwrap_or_default();
    body.detail = Some(format!(
        "{end}{said}; {} statements",
        stmts.load(Ordering::Relaxed)
    ));
    body.outcome = Some(match end {
        End::ClientTerminated | End::ClientClosed => Outcome::Success,
        End::TargetClosed
        | End::ClientProtocol(_)
        | End::TargetProtocol(_)
        | End::TargetTooLarge { .. }
        | End::ClientTooSlow { .. }
        | End::ReadingChanged(_)
        | End::NodeShutdown => Outcome::Error,
        End::TokenExpired => Outcome::Denied,
    });
    ctx.core.audit.record(body);
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
    /// A target message over `postgres.max_target_message_bytes`.
    TargetTooLarge {
        len: i64,
        max: usize,
    },
    /// The target reports a setting that changes how it reads statements: a client encoding
    /// other than UTF-8, or strings that are not standard.
    ReadingChanged(EncodingError),
    /// The client did not take a message over 1 MiB within its deadline (see
    /// `PostgresConfig::large_write_deadline`).
    ClientTooSlow {
        bytes: usize,
        secs: u64,
    },
    /// The session's token expired (`identity.session_expiry = "token"`).
    TokenExpired,
    /// The node drained and the drain deadline passed.
    NodeShutdown,
}

impl std::fmt::Display for End {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            End::ClientTerminated => f.write_str("client terminated"),
            End::ClientClosed => f.write_str("client closed the connection"),
            End::TargetClosed => f.write_str("target closed the connection"),
            End::ClientProtocol(e) => write!(f, "client protocol violation: {e}"),
            End::TargetProtocol(e) => write!(f, "target protocol violation: {e}"),
            End::TargetTooLarge { len, max } => write!(
                f,
                "the target sent a message of {len} bytes, over postgres.max_target_message_bytes ({max})"
            ),
            End::ClientTooSlow { bytes, secs } => write!(
                f,
                "the client did not take a message of {bytes} bytes within {secs} s \
                 (postgres.client_read_grace_secs, postgres.min_client_read_bytes_per_sec)"
            ),
            End::ReadingChanged(e) => e.fmt(f),
            End::TokenExpired => f.write_str("token expired"),
            End::NodeShutdown => f.write_str("the gateway node shut down (drain deadline)"),
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
    /// The target's prepared statements and portals, as confirmed plus this batch's changes.
    tables: Projection,
    /// After a refused Execute the target never sees the rest of the batch up to Sync, the
    /// way PostgreSQL itself discards messages after an error.
    skip_until_sync: bool,
    copy_in: Arc<AtomicU64>,
    stmts: Arc<AtomicU64>,
    /// What the target half expects for the bytes in `out`, handed over when they are sent.
    pending: Vec<Pending>,
    /// The statement whose request record is being written: if the session ends before the
    /// write is confirmed (this half is dropped there), the statement was never sent.
    in_append: Option<u64>,
    /// Where the batch in flight (the messages since the last sync point) starts.
    batch: Batch,
    /// A statement of the batch in flight was forwarded to run.
    ran_in_batch: bool,
    /// The client sent Flush: what is buffered goes now.
    flush_asked: bool,
    /// The COPY data of the copy in progress, looked through for masks on a connection whose
    /// clients receive them (`Some` from its first CopyData until another message); `None`
    /// inside once the copy was refused.
    copy_scan: Option<Option<MaskScan>>,
    /// This session's name for the settings probe's statement and portal.
    probe_name: String,
    /// Every portal name the client has bound with Bind in this session (`None`: more than
    /// [`MAX_BOUND_PORTAL_NAMES`], so any name may be one). Such a portal runs what it was bound
    /// to, decided at its Execute; SQL `FETCH` and `MOVE` of it are refused.
    bound_portals: Option<HashSet<String>>,
    /// The custom settings the session may have given a value, which a held statement's
    /// binding reads by name.
    custom_settings: CustomSettings,
    /// When the session's token runs out: a held statement stops waiting then.
    expires: Option<tokio::time::Instant>,
    /// Set while a statement is held, until the message that holds it is handled: the
    /// session's end at its token's expiry or the node's drain deadline waits for the hold,
    /// which stops waiting then but finishes a call to the coordinator halfway (an approval
    /// used is on record, with its statement recorded and sent, or as not run).
    holding: Arc<AtomicBool>,
    /// The target half's end during a hold.
    target_gone: Arc<Gone>,
}

/// The target half's end while the client half waits for a held statement's decision (see
/// `run`): the session's end then waits for the wait's, which ends on record with why.
#[derive(Default)]
struct Gone {
    /// Set while the client half waits for a decision.
    watched: AtomicBool,
    /// Why the wait ended, once the target half has ended during it.
    why: OnceLock<&'static str>,
    notify: tokio::sync::Notify,
}

impl Gone {
    fn watched(&self) -> bool {
        self.watched.load(Ordering::Relaxed)
    }

    fn watch(&self, on: bool) {
        self.watched.store(on, Ordering::Relaxed);
    }

    fn set(&self, why: &'static str) {
        let _ = self.why.set(why);
        // A permit if nobody waits yet: the next `wait` does not sleep.
        self.notify.notify_one();
    }

    fn is_set(&self) -> bool {
        self.why.get().is_some()
    }

    async fn wait(&self) -> &'static str {
        loop {
            if let Some(why) = self.why.get() {
                return why;
            }
            self.notify.notified().await;
        }
    }
}

/// Why a held statement's wait ended when the target half ended the session `end`.
fn held_end(end: &End) -> &'static str {
    match end {
        End::TargetClosed => TARGET_CLOSED,
        End::ClientClosed | End::ClientTerminated => CLIENT_LEFT,
        _ => "the session ended while it was held (its session_end record says why)",
    }
}

/// Portal names a session's `bound_portals` holds before it stands for every name.
const MAX_BOUND_PORTAL_NAMES: usize = 10_000;

/// Where the batch in flight starts.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Batch {
    /// No message since the last sync point.
    Empty,
    /// Its first message is at these offsets of `out` and `pending`: not sent yet.
    Buffered { out: usize, pending: usize },
    /// Part of it was sent already.
    Sent,
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
                    Ok(()) => {}
                    // What the client sent before its Terminate goes. After any other end
                    // (the client left during a wait, the token expired, the target is gone)
                    // nothing more is sent, and what was recorded gets its response record
                    // (see `unsent`).
                    Err(Halt::End(End::ClientTerminated)) => {
                        let _ = self.flush(&mut out).await;
                        return End::ClientTerminated;
                    }
                    Err(Halt::End(end)) => return end,
                    Err(Halt::Violation(msg)) => return self.protocol_error(msg).await,
                }
                // The message held a statement for approval: decided, recorded and in `out`
                // (or refused) by now. The session's end at its token's expiry or the drain
                // deadline, put off for the hold, comes now, before anything the client sent
                // behind it is looked at; what `out` holds goes first, with its records.
                if self.holding.swap(false, Ordering::Relaxed) {
                    if let Some(end) = self.must_end() {
                        let _ = self.flush(&mut out).await;
                        return end;
                    }
                }
            }
            // A batch that has run nothing yet waits for the rest of it: the target answers
            // none of it before a Sync or Flush anyway, and a statement in it that needs
            // approval gets its settings probe in front of the whole batch.
            let sent = if self.batch_waits(&out) {
                self.flush_earlier(&mut out).await
            } else {
                self.flush(&mut out).await
            };
            if sent.is_err() {
                return End::TargetClosed;
            }
            match self.read.read_buf(&mut self.buf).await {
                Ok(0) | Err(_) => return End::ClientClosed,
                Ok(_) => {}
            }
        }
    }

    /// Sends everything in `out`; the target half learns what to expect first.
    async fn flush(&mut self, out: &mut BytesMut) -> std::io::Result<()> {
        self.release(self.pending.len());
        self.flush_asked = false;
        if let Batch::Buffered { .. } = self.batch {
            self.batch = Batch::Sent;
        }
        if out.is_empty() {
            return Ok(());
        }
        self.ctx
            .core
            .metrics
            .bytes_to_target
            .inc_by(out.len() as u64);
        let r = send_all(&mut self.write, out).await;
        out.clear();
        r
    }

    /// Whether the batch in flight may stay buffered: it has run nothing, the client asked
    /// for no Flush, and it is small.
    fn batch_waits(&self, out: &BytesMut) -> bool {
        matches!(self.batch, Batch::Buffered { .. })
            && !self.ran_in_batch
            && !self.flush_asked
            && out.len() <= BATCH_BUFFER
    }

    /// Sends what precedes the batch in flight, keeping the batch itself buffered (a message
    /// that waits for earlier batches' answers does not need its own batch sent).
    async fn flush_earlier(&mut self, out: &mut BytesMut) -> std::io::Result<()> {
        let Batch::Buffered {
            out: at,
            pending: count,
        } = self.batch
        else {
            return self.flush(out).await;
        };
        self.release(count);
        self.batch = Batch::Buffered { out: 0, pending: 0 };
        let mut earlier = out.split_to(at);
        if earlier.is_empty() {
            return Ok(());
        }
        self.ctx
            .core
            .metrics
            .bytes_to_target
            .inc_by(earlier.len() as u64);
        let r = send_all(&mut self.write, &earlier).await;
        earlier.clear();
        r
    }

    /// Once this half has stopped: the statements it recorded and never sent (the bytes in
    /// its `out` go with it, as does a statement whose record was still being written).
    fn unsent(&mut self) -> Vec<Pending> {
        let mut unsent = std::mem::take(&mut self.pending);
        if let Some(stmt) = self.in_append.take() {
            unsent.push(Pending::Execute(Unit::new(&self.session, stmt)));
        }
        unsent
    }

    /// Hands the first `count` expectations to the target half.
    fn release(&mut self, count: usize) {
        for p in self.pending.drain(..count) {
            // The target half lives as long as this half; a send error means the session is
            // over.
            let _ = self.tx.send(p);
        }
    }

    /// What the target will answer to the message just put in `out`.
    fn expect(&mut self, p: Pending) {
        self.pending.push(p);
    }

    fn next_stmt(&self) -> u64 {
        self.stmts.fetch_add(1, Ordering::Relaxed) + 1
    }

    /// Handles one client message.
    async fn handle(&mut self, frame: Frame, out: &mut BytesMut) -> Result<(), Halt> {
        if self.skip_until_sync && frame.tag != b'S' && frame.tag != b'X' {
            return Ok(());
        }
        // Any message but CopyData, Flush, Sync and the copy's end ends the client's COPY data.
        if self.copy_scan.is_some() && !b"dHScf".contains(&frame.tag) {
            self.copy_scan = None;
        }
        if self.batch == Batch::Empty && b"QPBEDCHS".contains(&frame.tag) {
            self.batch = Batch::Buffered {
                out: out.len(),
                pending: self.pending.len(),
            };
        }
        let r = self.dispatch(&frame, out).await;
        // Sync, Query and FunctionCall (refused with a Query stand-in) are sync points: the
        // batch ends with them.
        if b"SQF".contains(&frame.tag) {
            self.batch = Batch::Empty;
            self.ran_in_batch = false;
        }
        r
    }

    async fn dispatch(&mut self, frame: &Frame, out: &mut BytesMut) -> Result<(), Halt> {
        let body = frame.body();
        match frame.tag {
            b'Q' => self.on_query(frame, &body, out).await,
            b'P' => self.on_parse(frame, &body, out).await,
            b'B' => self.on_bind(frame, &body, out).await,
            b'E' => self.on_execute(frame, &body, out).await,
            b'D' => {
                let (kind, name) = messages::parse_target(&body, "Describe")?;
                let described = if kind == b'S' {
                    self.statement(name, out).await?.map(Described::Statement)
                } else {
                    self.portal(name, out).await?.map(Described::Portal)
                };
                if let Some(Described::Portal(p)) = &described {
                    if let Some(bind) = p.held_back.clone() {
                        return self.describe_held_back(name, p.clone(), &bind, out).await;
                    }
                }
                self.expect(Pending::Describe(described));
                out.extend_from_slice(&frame.raw);
                Ok(())
            }
            b'C' => {
                let (kind, name) = messages::parse_target(&body, "Close")?;
                // (Closing a statement also forgets it for SQL-level EXECUTE.)
                let ops = vec![if kind == b'S' {
                    Op::DropStatement(Some(name.to_string()))
                } else {
                    Op::DropPortal(Some(name.to_string()))
                }];
                self.tables.record(&ops);
                self.expect(Pending::Close(ops));
                out.extend_from_slice(&frame.raw);
                Ok(())
            }
            b'S' => {
                self.skip_until_sync = false;
                self.tables.sync_point();
                self.expect(Pending::Sync);
                out.extend_from_slice(&frame.raw);
                Ok(())
            }
            b'H' => {
                self.flush_asked = true;
                out.extend_from_slice(&frame.raw);
                Ok(())
            }
            b'd' => {
                if let Some(mask) = self.masked_copy_data(&body) {
                    // The rest of this copy's data goes on unread: the target drops it.
                    self.copy_scan = Some(None);
                    self.refuse_copy(&mask, out);
                    return Ok(());
                }
                self.copy_in.fetch_add(body.len() as u64, Ordering::Relaxed);
                out.extend_from_slice(&frame.raw);
                Ok(())
            }
            b'c' | b'f' => {
                self.tables.copy_end();
                self.expect(Pending::CopyEnd);
                // A token the data ended with: the copy fails instead of completing.
                let scan = self.copy_scan.take().flatten();
                let last = scan.filter(|_| frame.tag == b'c');
                match last.and_then(|mut scan| scan.finish()) {
                    Some(mask) => self.refuse_copy(&mask, out),
                    None => out.extend_from_slice(&frame.raw),
                }
                Ok(())
            }
            b'X' => {
                out.extend_from_slice(&frame.raw);
                Err(Halt::End(End::ClientTerminated))
            }
            b'F' => {
                self.function_call(&body, out);
                Ok(())
            }
            other => Err(Halt::Violation(format!(
                "unexpected message type {:?}",
                other as char
            ))),
        }
    }

    async fn on_query(
        &mut self,
        frame: &Frame,
        body: &[u8],
        out: &mut BytesMut,
    ) -> Result<(), Halt> {
        let text = messages::parse_query(body)?;
        let class = self.classify(text);
        let resolved = self.resolve(text, &class, out).await?;
        let decision = self.decide_text(text, &class, &resolved, out).await?;
        let request = PgRequest {
            mode: "simple".into(),
            text: text.to_string(),
            prepared: resolved.prepared,
            ..PgRequest::default()
        };
        let mut request = request;
        let approval = if decision.action == Action::RequireApproval {
            let settled = match settings_may_change_within(&class) {
                Some(why) => Ok(Err(why)),
                None => self.settings(out).await,
            };
            let verdict = match settled? {
                Ok(settings) => {
                    let runs = request.prepared.clone();
                    let binding = Binding {
                        mode: "simple",
                        text,
                        runs: &runs,
                        params: Vec::new(),
                        params_digest: None,
                        settings,
                    };
                    self.held(&mut request, &decision, &binding).await?
                }
                Err(why) => unbound(&decision.rule, why),
            };
            match verdict {
                Verdict::Run(a) => Some(a),
                Verdict::Refuse { refusal, approval } => {
                    self.refuse_held(request, &decision, refusal, approval, true, out);
                    return Ok(());
                }
            }
        } else if decision.blocks() {
            // If one statement of the message is blocked, none runs.
            self.block(request, &decision, true, out);
            return Ok(());
        } else {
            None
        };
        let policy = self.ctx.policy.reference(&decision);
        let note = decision.dry_run_note();
        let per_statement = self.statement_effects(text, &class, &policy, &note);
        match self
            .audit_request(request, Some((policy, note)), approval)
            .await
        {
            Ok(mut unit) => {
                // A Query drops the unnamed statement and portal before it runs anything.
                unit.always = vec![
                    Op::DropStatement(Some(String::new())),
                    Op::DropPortal(Some(String::new())),
                ];
                unit.per_statement = per_statement;
                unit.derives = self.derives(&class);
                self.tables.sync_point();
                self.expect(Pending::Query(unit));
                out.extend_from_slice(&frame.raw);
            }
            Err(e) => self.refuse_unrecorded(&e, true, out),
        }
        Ok(())
    }

    async fn on_parse(
        &mut self,
        frame: &Frame,
        body: &[u8],
        out: &mut BytesMut,
    ) -> Result<(), Halt> {
        let (name, query, param_types) = messages::parse_parse(body)?;
        let class = self.classify(query);
        // Decided as written; a statement that runs others by name (`EXECUTE name`) is
        // decided again at each Execute, on what the names hold then.
        let decision = self
            .decide_text(query, &class, &Resolved::default(), out)
            .await?;
        if decision.blocks() && decision.action != Action::RequireApproval {
            // A blocked statement is never prepared.
            let request = PgRequest {
                mode: "extended".into(),
                text: query.to_string(),
                statement: Some(name.to_string()),
                ..PgRequest::default()
            };
            self.block(request, &decision, false, out);
            self.skip_until_sync = true;
            return Ok(());
        }
        let text: Arc<str> = query.into();
        let stmt = Arc::new(Stmt {
            text: text.clone(),
            class,
            policy: self.ctx.policy.reference(&decision),
            note: decision.dry_run_note(),
            // Preparing runs nothing; each Execute of it is held.
            hold: (decision.action == Action::RequireApproval).then(|| Arc::new(decision)),
            described: OnceLock::new(),
            param_types,
        });
        // A Parse of the unnamed statement drops the old one first, whatever its outcome.
        let mut ops = Vec::with_capacity(2);
        if name.is_empty() {
            ops.push(Op::DropStatement(Some(String::new())));
        }
        ops.push(Op::AddStatement(name.to_string(), stmt));
        self.tables.record(&ops);
        self.expect(Pending::Parse {
            name: name.to_string(),
            text,
            ops,
        });
        out.extend_from_slice(&frame.raw);
        Ok(())
    }

    async fn on_bind(
        &mut self,
        frame: &Frame,
        body: &[u8],
        out: &mut BytesMut,
    ) -> Result<(), Halt> {
        let bind = messages::parse_bind(body)?;
        let Some(stmt) = self.statement(bind.statement, out).await? else {
            let request = PgRequest {
                mode: "extended".into(),
                statement: Some(bind.statement.to_string()),
                portal: Some(bind.portal.to_string()),
                ..PgRequest::default()
            };
            self.refuse_unknown("prepared statement", bind.statement, request, out);
            return Ok(());
        };
        // Only an Execute that may be held needs the parameters' digest.
        let params_digest = stmt.may_hold().then(|| {
            let bound: Vec<binding::Param<'_>> = bind
                .params
                .iter()
                .zip(&bind.param_formats)
                .enumerate()
                .map(|(i, (value, format))| binding::Param {
                    value: *value,
                    binary: *format != 0,
                    type_oid: stmt.param_type(i),
                })
                .collect();
            binding::params_digest(&bound)
        });
        // A statement that may be held, or is decided again at each Execute, is not bound on
        // the target under the client's name before its Execute is decided: a portal the
        // target holds runs by name from SQL without an Execute (`cursor_to_xml('p', …)`, a
        // PL/pgSQL `FETCH` of a refcursor, a function in any language that finds it). The
        // client's Bind goes in front of the Execute that may run it (see `on_execute`).
        // (Binding it privately, below, still plans it, as the Bind itself would have: stable
        // functions in it may be evaluated then, and its locks are taken.)
        let held_back = stmt.may_hold().then(|| frame.raw.clone());
        let portal = Arc::new(Portal {
            statement: bind.statement.to_string(),
            params_digest,
            stmt,
            params: bind.params.iter().map(|v| v.map(display_value)).collect(),
            param_formats: bind.param_formats,
            result_formats: bind.result_formats,
            described: OnceLock::new(),
            held_back,
        });
        if !bind.portal.is_empty() {
            if let Some(names) = &mut self.bound_portals {
                names.insert(bind.portal.to_string());
                if names.len() > MAX_BOUND_PORTAL_NAMES {
                    self.bound_portals = None;
                }
            }
        }
        if portal.held_back.is_some() {
            if !bind.portal.is_empty() && self.portal(bind.portal, out).await?.is_some() {
                // PostgreSQL refuses to bind a named portal that exists; the late Bind would
                // fail only after the approval.
                let message = format!("cursor {:?} already exists", bind.portal);
                self.stand_in("42P03", &message, false, out);
                self.skip_until_sync = true;
                return Ok(());
            }
            // The target binds it under this session's private name and closes it at once,
            // with nothing in between: it fails as the Bind would (parameters, statement,
            // transaction), and the client hears its answer.
            let ops = bind_ops(bind.portal, &portal);
            self.tables.record(&ops);
            self.expect(Pending::Bind(ops));
            self.bind_privately(&frame.raw, out)?;
            self.own_close(out);
            return Ok(());
        }
        self.send_bind(bind.portal, &frame.raw, portal, Pending::Bind, out);
        Ok(())
    }

    /// Sends Bind `raw` under this session's private portal name (closed by the caller, with
    /// nothing of the client's in between).
    fn bind_privately(&mut self, raw: &[u8], out: &mut BytesMut) -> Result<(), Halt> {
        out.extend_from_slice(&messages::rename_bind(raw, &self.probe_name)?);
        Ok(())
    }

    /// Closes the portal of this session's private name.
    fn own_close(&mut self, out: &mut BytesMut) {
        out.extend_from_slice(&messages::close_portal(&self.probe_name));
        self.expect(Pending::OwnClose);
    }

    /// Sends the Bind `raw` of `portal` under `name`, expecting its answer as `pending`.
    fn send_bind(
        &mut self,
        name: &str,
        raw: &[u8],
        portal: Arc<Portal>,
        pending: fn(Vec<Op>) -> Pending,
        out: &mut BytesMut,
    ) {
        let ops = bind_ops(name, &portal);
        self.tables.record(&ops);
        self.expect(pending(ops));
        out.extend_from_slice(raw);
        // Column rules are matched against the portal's own description: the plan chosen at
        // Bind, not one a Describe of the statement saw (the same text may be planned again
        // on other tables: a temporary table gone, another search_path).
        if self.ctx.core.masker.is_active() && portal.described_at_bind() {
            out.extend_from_slice(&messages::describe_portal(name));
            self.expect(Pending::OwnDescribe(portal));
        }
    }

    /// Whether the prepared statement a kept-back Bind names still holds what the portal
    /// was bound to (a Bind sent now binds what the name holds now).
    async fn still_bound(&mut self, portal: &Portal, out: &mut BytesMut) -> Result<bool, Halt> {
        let now = self.statement(&portal.statement, out).await?;
        Ok(now.is_some_and(|s| Arc::ptr_eq(&s, &portal.stmt)))
    }

    /// Refuses a message about portal `name`, whose Bind was kept back, when its prepared
    /// statement was closed or replaced since.
    fn refuse_rebound(&mut self, name: &str, portal: &Portal, out: &mut BytesMut) {
        let request = PgRequest {
            mode: "extended".into(),
            text: portal.stmt.text.to_string(),
            statement: Some(portal.statement.clone()),
            portal: Some(name.to_string()),
            ..PgRequest::default()
        };
        let decision = gateway_block(
            "portal-statement-changed",
            format!(
                "prepared statement {:?} was closed or replaced after portal {name:?} was bound to it; bind the portal again",
                portal.statement
            ),
        );
        self.block(request, &decision, false, out);
        self.skip_until_sync = true;
    }

    /// A Describe of portal `name`, whose Bind `bind` is kept back: the target binds it under
    /// this session's private name, describes that and closes it, with nothing in between.
    async fn describe_held_back(
        &mut self,
        name: &str,
        portal: Arc<Portal>,
        bind: &[u8],
        out: &mut BytesMut,
    ) -> Result<(), Halt> {
        if !self.still_bound(&portal, out).await? {
            self.refuse_rebound(name, &portal, out);
            return Ok(());
        }
        self.bind_privately(bind, out)?;
        self.expect(Pending::OwnBind(Vec::new()));
        out.extend_from_slice(&messages::describe_portal(&self.probe_name));
        self.expect(Pending::Describe(Some(Described::Portal(portal))));
        self.own_close(out);
        Ok(())
    }

    async fn on_execute(
        &mut self,
        frame: &Frame,
        body: &[u8],
        out: &mut BytesMut,
    ) -> Result<(), Halt> {
        let (name, _max_rows) = messages::parse_execute(body)?;
        let Some(portal) = self.portal(name, out).await? else {
            let request = PgRequest {
                mode: "extended".into(),
                portal: Some(name.to_string()),
                ..PgRequest::default()
            };
            self.refuse_unknown("portal", name, request, out);
            return Ok(());
        };
        let stmt = portal.stmt.clone();
        let mut request = PgRequest {
            mode: "extended".into(),
            text: stmt.text.to_string(),
            statement: Some(portal.statement.clone()),
            portal: Some(name.to_string()),
            params: Some(portal.params.clone()),
            ..PgRequest::default()
        };
        if portal.held_back.is_some() && !self.still_bound(&portal, out).await? {
            self.refuse_rebound(name, &portal, out);
            return Ok(());
        }
        let resolved = self.resolve(&stmt.text, &stmt.class, out).await?;
        let values = portal.params.iter().flatten().map(String::as_str);
        if let Some(refusal) = self.masked_write(writes(&stmt.class, &resolved), values) {
            request.prepared = resolved.prepared;
            self.block(request, &refusal, false, out);
            self.skip_until_sync = true;
            return Ok(());
        }
        // A statement that runs others by name is decided now, on what they hold now, and so is
        // a SQL PREPARE's body; any other was decided when it was prepared.
        let (held, decided) = if resolved.decided.is_none() && !stmt.by_sql_prepare() {
            (stmt.hold.clone(), (stmt.policy.clone(), stmt.note.clone()))
        } else {
            let decision = self.decide(&stmt.class, &resolved);
            if decision.blocks() && decision.action != Action::RequireApproval {
                request.prepared = resolved.prepared;
                self.block(request, &decision, false, out);
                self.skip_until_sync = true;
                return Ok(());
            }
            let decided = (
                self.ctx.policy.reference(&decision),
                decision.dry_run_note(),
            );
            let held = (decision.action == Action::RequireApproval).then(|| Arc::new(decision));
            (held, decided)
        };
        request.prepared = resolved.prepared;
        let approval = match held {
            Some(d) => {
                let verdict = match self.settings(out).await? {
                    Ok(settings) => {
                        let runs = request.prepared.clone();
                        let binding = Binding {
                            mode: "extended",
                            text: &stmt.text,
                            runs: &runs,
                            params: portal
                                .params
                                .iter()
                                .zip(&portal.param_formats)
                                .enumerate()
                                .map(|(i, (v, f))| (v.clone(), *f != 0, stmt.param_type(i)))
                                .collect(),
                            params_digest: portal.params_digest,
                            settings,
                        };
                        self.held(&mut request, &d, &binding).await?
                    }
                    Err(why) => unbound(&d.rule, why),
                };
                match verdict {
                    Verdict::Run(a) => Some(a),
                    Verdict::Refuse { refusal, approval } => {
                        self.refuse_held(request, &d, refusal, approval, false, out);
                        self.skip_until_sync = true;
                        return Ok(());
                    }
                }
            }
            None => None,
        };
        let per_statement = self.statement_effects(&stmt.text, &stmt.class, &decided.0, &decided.1);
        match self.audit_request(request, Some(decided), approval).await {
            Ok(mut unit) => {
                // A kept-back Bind goes first: decided, the portal may now exist.
                let portal = match portal.held_back.clone() {
                    Some(bind) => {
                        let bound = Arc::new(portal.bound());
                        self.send_bind(name, &bind, bound.clone(), Pending::OwnBind, out);
                        bound
                    }
                    None => portal,
                };
                for ops in &per_statement {
                    self.tables.record(ops);
                }
                unit.portal = Some(portal);
                unit.per_statement = per_statement;
                unit.derives = self.derives(&stmt.class);
                self.expect(Pending::Execute(unit));
                self.ran_in_batch = true;
                out.extend_from_slice(&frame.raw);
            }
            Err(e) => {
                self.refuse_unrecorded(&e, false, out);
                self.skip_until_sync = true;
            }
        }
        Ok(())
    }

    /// The FunctionCall message runs a function by OID with no statement to decide: refused.
    fn function_call(&mut self, body: &[u8], out: &mut BytesMut) {
        let stmt = self.next_stmt();
        let mut rec = self.session.body(&self.ctx.core.audit, Kind::Blocked);
        rec.stmt = Some(stmt);
        rec.request = Some(Request::Postgres(PgRequest {
            mode: "function_call".into(),
            text: format!("function call, {} bytes", body.len()),
            ..PgRequest::default()
        }));
        rec.outcome = Some(Outcome::Blocked);
        rec.policy = Some(PolicyRef {
            rule: "function-call".into(),
            version: self.ctx.policy.version().to_string(),
        });
        rec.detail = Some("the FunctionCall message is not allowed".into());
        crate::core::trace::refused(&self.session.trace, super::PROTOCOL, &rec);
        self.ctx.core.audit.record(rec);
        self.refuse(
            Outcome::Blocked,
            "42501",
            "the FunctionCall message is not allowed through the Vigil gateway; use SELECT instead",
            true,
            out,
        );
    }

    /// Waits until the target has answered every earlier sync point, so the confirmed tables
    /// are current. Keeps reading the client meanwhile (bounded), to notice it going away.
    /// The session's settings as the statement in hand will run under them, reported by the
    /// target: a probe is put before the batch in flight (which must not have been sent, nor
    /// run anything before this statement) and its answer awaited. `Ok(Err(why))`: the
    /// gateway cannot be sure.
    async fn settings(&mut self, out: &mut BytesMut) -> Result<Result<Settings, String>, Halt> {
        if self.ran_in_batch {
            return Ok(Err(
                "another statement runs before it in the same batch, so the gateway cannot tell the settings it runs under (end that batch with a Sync first)"
                    .into(),
            ));
        }
        let (at, count) = match self.batch {
            Batch::Buffered { out, pending } => (out, pending),
            Batch::Empty => (out.len(), self.pending.len()),
            Batch::Sent => {
                return Ok(Err(
                    "its batch reached the gateway in parts, so the gateway cannot put its settings check before it (send the batch in one piece)"
                        .into(),
                ))
            }
        };
        let probe = match self.custom_settings.probe() {
            Ok(p) => p,
            Err(why) => return Ok(Err(why)),
        };
        let tail = out.split_off(at);
        out.extend_from_slice(&messages::settings_probe(&self.probe_name, &probe));
        out.unsplit(tail);
        self.pending.insert(count, Pending::Probe(None));
        self.tables.sync_before_batch();
        if self.flush(out).await.is_err() {
            return Err(Halt::End(End::TargetClosed));
        }
        self.catch_up(out).await?;
        Ok(self.tables.confirmed().settings().ok_or_else(|| {
            "the target did not report the session's database, role and search_path (an aborted transaction?)".to_string()
        }))
    }

    async fn catch_up(&mut self, out: &mut BytesMut) -> Result<(), Halt> {
        if self.flush_earlier(out).await.is_err() {
            return Err(Halt::End(End::TargetClosed));
        }
        let limit = self.ctx.config.max_frame_bytes.saturating_add(64 * 1024);
        while self.tables.behind() {
            if self.tables.in_copy_in() {
                return Err(Halt::Violation(
                    "a message that depends on an earlier batch arrived during COPY FROM STDIN"
                        .into(),
                ));
            }
            tokio::select! {
                alive = self.tables.changed() => if !alive {
                    return Err(Halt::End(End::TargetClosed));
                },
                read = self.read.read_buf(&mut self.buf), if self.buf.len() < limit => match read {
                    Ok(0) | Err(_) => return Err(Halt::End(End::ClientClosed)),
                    Ok(_) => {}
                },
            }
        }
        Ok(())
    }

    /// The decision on statement `text` as written (a Query, a Parse): refused if the target
    /// could read it otherwise ([`Self::settle_reading`]) or if it writes a mask
    /// ([`Self::masked_write`]), else the policy's.
    async fn decide_text(
        &mut self,
        text: &str,
        class: &Classification,
        resolved: &Resolved,
        out: &mut BytesMut,
    ) -> Result<Decision, Halt> {
        if let Some(refusal) = self.settle_reading(text, out).await? {
            return Ok(refusal);
        }
        // Names it sets are read from now on, before the statement runs.
        let stmts = resolved
            .decided
            .as_deref()
            .or(class.as_ref().ok().map(Vec::as_slice));
        let set = stmts.into_iter().flatten().flat_map(|s| &s.custom_settings);
        self.custom_settings.note(set.map(String::as_str));
        let masked = self.masked_write(writes(class, resolved), [text]);
        Ok(masked.unwrap_or_else(|| self.decide(class, resolved)))
    }

    /// Before a statement the target could read otherwise under other settings
    /// ([`encoding::read_by_settings`]) goes out: waits until the target has answered every
    /// earlier sync point, so that a change of those settings by anything before it has been
    /// reported (and has ended the session). `Some`: the refusal, when a statement of its own
    /// batch ran before it (the target reports settings only at the batch's Sync).
    async fn settle_reading(
        &mut self,
        text: &str,
        out: &mut BytesMut,
    ) -> Result<Option<Decision>, Halt> {
        if !encoding::read_by_settings(text) {
            return Ok(None);
        }
        if self.ran_in_batch {
            return Ok(Some(gateway_block(
                "statement-reading",
                "a statement with a backslash cannot follow another statement of the same batch: the target may read it under settings that statement changed, and reports them only at Sync (send a Sync before it)",
            )));
        }
        self.catch_up(out).await?;
        Ok(None)
    }

    /// The refusal of a statement that writes a value this gateway masks in what the
    /// connection's clients receive (a token or the redaction text, in its text or its
    /// parameters): an agent that writes back what it read would replace the real value with
    /// the mask.
    fn masked_write<'v>(
        &self,
        writes: bool,
        values: impl IntoIterator<Item = &'v str>,
    ) -> Option<Decision> {
        if !writes || !self.masks_clients() {
            return None;
        }
        let mask = values.into_iter().find_map(produced_mask)?;
        Some(masked_value_write(mask))
    }

    /// A mask in the client's COPY data (see [`Self::masked_write`]), once its end is known:
    /// COPY … FROM STDIN writes what it carries like an INSERT.
    fn masked_copy_data(&mut self, chunk: &[u8]) -> Option<String> {
        if self.copy_scan.is_none() {
            let masks = self.masks_clients();
            self.copy_scan = Some(masks.then(MaskScan::default));
        }
        self.copy_scan
            .as_mut()
            .and_then(|scan| scan.as_mut()?.feed(chunk))
    }

    /// COPY data that writes a mask: the target gets a CopyFail in its place, so that the
    /// COPY writes nothing and the client hears the target's error (the target ignores the
    /// rest of the client's COPY data); a `blocked` record tells why.
    fn refuse_copy(&self, mask: &str, out: &mut BytesMut) {
        let decision = masked_value_write(mask);
        let reason = decision.reason.clone().unwrap_or_default();
        let mut rec = self.session.body(&self.ctx.core.audit, Kind::Blocked);
        // The COPY the data belongs to: the last statement on record.
        rec.stmt = Some(self.stmts.load(Ordering::Relaxed));
        rec.request = Some(Request::Postgres(PgRequest {
            mode: "copy_data".into(),
            text: "COPY data".into(),
            ..PgRequest::default()
        }));
        rec.outcome = Some(Outcome::Blocked);
        rec.policy = Some(self.ctx.policy.reference(&decision));
        rec.detail = Some(self.ctx.core.scrub(&reason));
        crate::core::trace::refused(&self.session.trace, super::PROTOCOL, &rec);
        self.ctx.core.audit.record(rec);
        out.extend_from_slice(&messages::copy_fail(&format!(
            "vigil: {reason} (rule masked-value-write)"
        )));
    }

    /// Whether the clients of this connection receive masked values.
    fn masks_clients(&self) -> bool {
        let connection = self.session.conn.name.as_deref().unwrap_or("");
        self.ctx.core.masker.masks_clients(connection)
    }

    /// The prepared statement `name` as the target holds it when this message runs.
    async fn statement(
        &mut self,
        name: &str,
        out: &mut BytesMut,
    ) -> Result<Option<Arc<Stmt>>, Halt> {
        loop {
            match self.tables.statement(name) {
                Lookup::Found(s) => return Ok(Some(s)),
                Lookup::Unknown => return Ok(None),
                Lookup::Unsettled => self.catch_up(out).await?,
            }
        }
    }

    /// The portal `name` as the target holds it when this message runs.
    async fn portal(
        &mut self,
        name: &str,
        out: &mut BytesMut,
    ) -> Result<Option<Arc<Portal>>, Halt> {
        loop {
            match self.tables.portal(name) {
                Lookup::Found(p) => return Ok(Some(p)),
                Lookup::Unknown => return Ok(None),
                Lookup::Unsettled => self.catch_up(out).await?,
            }
        }
    }

    fn classify(&self, text: &str) -> Arc<Classification> {
        // Classified on every connection, governed or not: what a statement does to the
        // prepared statements and portals is what keeps the record true.
        self.ctx.classifier.classify(text)
    }

    /// Resolves every `EXECUTE name` of a statement text to what the target holds under
    /// `name` when it runs: the statements before it in the same text first (a Query runs
    /// them in order and stops at the first error), then the tables.
    async fn resolve(
        &mut self,
        text: &str,
        class: &Classification,
        out: &mut BytesMut,
    ) -> Result<Resolved, Halt> {
        let mut r = Resolved::default();
        let Ok(stmts) = class else { return Ok(r) };
        if !runs_by_name(class) {
            return Ok(r);
        }
        let texts = statement_texts(text, stmts);
        // Names this text prepares or deallocates before a later statement uses them
        // (`None` name: DEALLOCATE ALL).
        let mut local: Vec<(Option<&str>, Option<Earlier>)> = Vec::new();
        let mut decided = Vec::with_capacity(stmts.len());
        for (s, own) in stmts.iter().zip(&texts) {
            if let Some(name) = &s.executes {
                let earlier = local
                    .iter()
                    .rev()
                    .find(|(n, _)| n.is_none_or(|n| n == name));
                let held: Option<Earlier> = match earlier {
                    Some((_, held)) => held.clone(),
                    None => self.statement(name, out).await?.and_then(|p| {
                        let body = p.class.as_ref().as_ref().ok()?.clone();
                        Some((p.text.clone(), body))
                    }),
                };
                match held {
                    Some((text, body)) => {
                        r.prepared.push(PreparedText {
                            name: name.clone(),
                            text: text.to_string(),
                        });
                        r.runs.push(text);
                        decided.extend(body);
                    }
                    None => {
                        r.unknown.get_or_insert_with(|| name.clone());
                    }
                }
            }
            // A plain `EXECUTE name` is what it runs; EXPLAIN ANALYZE EXECUTE and CREATE TABLE
            // AS EXECUTE are what they wrap, and themselves.
            if s.executes.is_none() || s.kind != Some(StatementKind::Utility) {
                decided.push(s.clone());
            }
            if let Some(name) = &s.prepares {
                local.push((Some(name), Some(((*own).into(), vec![s.clone()]))));
            }
            if let Some(name) = &s.deallocates {
                local.push((name.as_deref(), None));
            }
        }
        r.decided = Some(decided);
        Ok(r)
    }

    /// The policy's decision on a statement text whose names were resolved.
    fn decide(&self, class: &Classification, resolved: &Resolved) -> Decision {
        let connection = self.session.conn.name.as_deref().unwrap_or("");
        if let Some(name) = &resolved.unknown {
            return gateway_block("unknown-prepared-statement", format!(
                    "the gateway cannot tell what prepared statement {name:?} holds, so it does not run it"
                ));
        }
        if let Ok(stmts) = class {
            // Whatever the policy: a portal bound over the protocol runs the statement it was
            // bound to, which a FETCH's decision and record would not name.
            let bound = |name: &String| {
                self.bound_portals
                    .as_ref()
                    .is_none_or(|names| names.contains(name))
            };
            if let Some(name) = stmts
                .iter()
                .find_map(|s| s.cursor.as_ref().filter(|n| bound(n)))
            {
                return gateway_block("portal-by-sql", format!(
                    "portal {name:?} was bound over the extended protocol: it runs with Execute, not with FETCH or MOVE"
                ));
            }
            // The gateway reads every message as UTF-8 with standard strings, so a statement
            // that may make the target read them otherwise never runs.
            if stmts.iter().any(StatementInfo::leaves_utf8) {
                return gateway_block("client-encoding", "this gateway relays UTF8 sessions only; client_encoding cannot be changed to another encoding");
            }
            if stmts.iter().any(StatementInfo::leaves_standard_strings) {
                return gateway_block("standard-conforming-strings", "this gateway reads string literals as standard only; standard_conforming_strings cannot be turned off");
            }
        }
        if !self.ctx.policy.governs(connection, self.session.read_only) {
            return self.ctx.policy.ungoverned();
        }
        let input = match (&resolved.decided, class) {
            (Some(d), _) => Ok(d.as_slice()),
            (None, Ok(v)) => Ok(v.as_slice()),
            (None, Err(e)) => Err(e),
        };
        let decision = self.ctx.policy.decide(
            input,
            &self.session.principal,
            connection,
            self.session.read_only,
        );
        // An approval lets a statement run once; a cursor that can run its query again would
        // run it as often as the client likes.
        if decision.action == Action::RequireApproval
            && input.is_ok_and(|stmts| stmts.iter().any(|s| s.reruns))
        {
            return gateway_block("cursor-runs-once", "a cursor over a statement that needs approval must be declared NO SCROLL and WITHOUT HOLD, so that its query runs once");
        }
        decision
    }

    /// What each statement of a text does to the statement and portal tables once the target
    /// completed it.
    /// Whether a result column PostgreSQL reports no table for may carry a value a column
    /// rule covers, in what the message runs ([`Masker::derives`] for each statement). A
    /// `FETCH` or `EXECUTE` returns the rows of a query another statement named, and a
    /// statement that cannot be classified says nothing: as if they named every ruled column.
    fn derives(&self, class: &Classification) -> Option<bool> {
        let masker = &self.ctx.core.masker;
        if !masker.has_column_rules() {
            return None;
        }
        let conn = self.session.conn.name.as_deref().unwrap_or("");
        let any = || Some(masker.client_columns(conn));
        let Ok(stmts) = class else { return any() };
        stmts
            .iter()
            .filter_map(|s| {
                if s.fetches || s.executes.is_some() {
                    return any();
                }
                let tables = s.tables.iter().map(String::as_str);
                masker.derives(conn, tables, s.columns.iter().map(String::as_str))
            })
            .reduce(|a, b| a || b)
    }

    fn statement_effects(
        &self,
        text: &str,
        class: &Classification,
        policy: &PolicyRef,
        note: &Option<String>,
    ) -> Vec<Vec<Op>> {
        let Ok(stmts) = class else { return Vec::new() };
        // Most statements change nothing: no work on the hot path for them.
        if stmts.iter().all(|s| {
            s.prepares.is_none()
                && s.deallocates.is_none()
                && s.ends_portals.is_none()
                && !s.runs_unseen_sql()
        }) {
            return Vec::new();
        }
        let texts = if stmts.iter().any(|s| s.prepares.is_some()) {
            statement_texts(text, stmts)
        } else {
            Vec::new()
        };
        stmts
            .iter()
            .enumerate()
            .map(|(i, s)| {
                let mut ops = Vec::new();
                if let Some(name) = &s.prepares {
                    let own = texts.get(i).copied().unwrap_or(text);
                    ops.push(Op::AddStatement(
                        name.clone(),
                        Arc::new(Stmt {
                            text: own.into(),
                            class: Arc::new(Ok(vec![s.clone()])),
                            policy: policy.clone(),
                            note: note.clone(),
                            // SQL EXECUTE is decided (and held) on what it runs.
                            hold: None,
                            described: OnceLock::new(),
                            // Types and values are in the texts of PREPARE and EXECUTE.
                            param_types: Vec::new(),
                        }),
                    ));
                }
                if let Some(name) = &s.deallocates {
                    ops.push(Op::DropStatement(name.clone()));
                }
                if let Some(name) = &s.ends_portals {
                    ops.push(Op::DropPortal(name.clone()));
                }
                // SQL the gateway did not see may have replaced what any name holds: the
                // gateway forgets them all, and refuses them until they are made again.
                if s.runs_unseen_sql() {
                    ops.push(Op::DropStatement(None));
                    ops.push(Op::DropPortal(None));
                }
                ops
            })
            .collect()
    }

    /// Holds `request` for approval (see [`hold`]) under the number its record will get,
    /// bound to `binding`, which its record then carries. The session ends if the client
    /// hangs up during the wait; the wait also ends when the token expires, the node's drain
    /// deadline comes or the target ends the session, and the session ends right after the
    /// hold (see [`run`]).
    async fn held(
        &mut self,
        request: &mut PgRequest,
        decision: &Decision,
        binding: &Binding<'_>,
    ) -> Result<Verdict, Halt> {
        let stmt = self.stmts.load(Ordering::Relaxed) + 1;
        let hash = binding.hash();
        let mut left = false;
        // Read in the same turn as the expiry or the deadline: not held (nothing to consume
        // or ask for once the session has no authority left).
        if let Some(end) = self.must_end() {
            return Err(Halt::End(end));
        }
        let (ctx, session, expires) = (&self.ctx, &self.session, self.expires);
        let gone = &self.target_gone;
        let client = client_left(&mut self.read, &mut self.buf, &mut left);
        let watch = async {
            tokio::select! {
                why = client => why,
                () = until(expires) => TOKEN_EXPIRED,
                () = ctx.core.lifecycle.ended() => NODE_ENDING,
                why = gone.wait() => why,
            }
        };
        // Cleared once the message that holds the statement is handled (see `run`).
        self.holding.store(true, Ordering::Relaxed);
        // The target half's end waits for the decision's; not for what comes after (an end
        // then stops the session at once, and nothing more is sent).
        gone.watch(true);
        let verdict = hold(ctx, session, stmt, request, decision, binding, &hash, watch).await;
        gone.watch(false);
        request.binding = Some(binding.record(&hash));
        // The session ends here when the client left, the token expired, the drain deadline
        // came or the target ended the session while the statement was held. A wait that
        // ended early is on record already; an approval that came all the same (a call to the
        // coordinator under way is finished, see `Approvals::settle`) is on record as used,
        // and nothing runs: nobody is there for it, nobody with authority, or no session to
        // run it on. Any other refusal is on record too.
        let end = match (left, self.must_end()) {
            (true, _) => End::ClientClosed,
            (false, Some(end)) => end,
            (false, None) => return Ok(verdict),
        };
        match verdict {
            Verdict::Run(approval) => {
                let detail = with_note(APPROVED_TOO_LATE, decision.dry_run_note());
                let request = request.clone();
                self.record_blocked(request, decision, Outcome::Error, &detail, Some(approval));
            }
            Verdict::Refuse {
                refusal: Refusal::Pending { .. },
                ..
            } => {}
            Verdict::Refuse { refusal, approval } => {
                let (_, message) = sql_error(&refusal);
                let request = request.clone();
                self.record_blocked(request, decision, refusal.outcome(), &message, approval);
            }
        }
        Err(Halt::End(end))
    }

    /// Why the session must end now, if it must: its token expired, the node's drain
    /// deadline came, or the target half ended while a statement's decision was awaited (the
    /// session's end is then the target half's, see `run`).
    fn must_end(&self) -> Option<End> {
        if self
            .expires
            .is_some_and(|at| at <= tokio::time::Instant::now())
        {
            Some(End::TokenExpired)
        } else if self.ctx.core.lifecycle.is_ending() {
            Some(End::NodeShutdown)
        } else if self.target_gone.is_set() {
            Some(End::TargetClosed)
        } else {
            None
        }
    }

    /// Refuses a message that names a statement or portal the gateway cannot vouch for.
    fn refuse_unknown(&mut self, what: &str, name: &str, request: PgRequest, out: &mut BytesMut) {
        let decision = gateway_block(
            "unknown-prepared-statement",
            format!("the gateway cannot tell what {what} {name:?} holds, so it does not run it"),
        );
        self.block(request, &decision, false, out);
        self.skip_until_sync = true;
    }

    /// The audit copy of a request (see [`mask_request`]).
    fn mask_request(&self, request: &mut PgRequest, secrets: &mut Vec<String>) -> Counts {
        mask_request(&self.ctx, request, secrets)
    }

    fn block(&mut self, request: PgRequest, decision: &Decision, simple: bool, out: &mut BytesMut) {
        let reason = decision
            .reason
            .clone()
            .unwrap_or_else(|| "the policy does not allow this statement".into());
        let refusal = Refusal::Blocked {
            rule: decision.rule.clone(),
            reason,
        };
        self.refuse_held(request, decision, refusal, None, simple, out);
    }

    /// Refuses a statement the policy blocks or the approval flow did not let run: a
    /// `blocked` record, then the refusal (ErrorResponse, and ReadyForQuery if `simple`). The
    /// session continues.
    fn refuse_held(
        &mut self,
        request: PgRequest,
        decision: &Decision,
        refusal: Refusal,
        approval: Option<ApprovalRef>,
        simple: bool,
        out: &mut BytesMut,
    ) {
        let (sqlstate, message) = sql_error(&refusal);
        let outcome = refusal.outcome();
        // The record says why in the policy's words (and what dry-run rules would have done);
        // an approval's refusal, as the client hears it.
        let detail = match (&refusal, decision.dry_run_note()) {
            (Refusal::Blocked { reason, .. }, note) => with_note(reason, note),
            _ => message.clone(),
        };
        self.record_blocked(request, decision, outcome, &detail, approval);
        self.refuse(outcome, sqlstate, &message, simple, out);
    }

    /// The `blocked` record of a statement that does not run: its audit copy (masked), the
    /// rule that decided it, why, and the approval it came with.
    fn record_blocked(
        &mut self,
        mut request: PgRequest,
        decision: &Decision,
        outcome: Outcome,
        detail: &str,
        approval: Option<ApprovalRef>,
    ) {
        let stmt = self.next_stmt();
        let masked = self.mask_request(&mut request, &mut Vec::new());
        let mut rec = self.session.body(&self.ctx.core.audit, Kind::Blocked);
        rec.stmt = Some(stmt);
        rec.request = Some(Request::Postgres(request));
        rec.outcome = Some(outcome);
        rec.masked = masked;
        rec.policy = Some(self.ctx.policy.reference(decision));
        // A parser's message quotes the text near its error: through the detectors, like it.
        rec.detail = Some(self.ctx.core.scrub(detail));
        rec.approval = approval;
        crate::core::trace::refused(&self.session.trace, super::PROTOCOL, &rec);
        self.ctx.core.audit.record(rec);
    }

    /// Writes a request record and waits until it is in the log. An error means it could not
    /// be written (or the spool is full) and the statement must not reach the target.
    async fn audit_request(
        &mut self,
        mut request: PgRequest,
        decided: Option<(PolicyRef, Option<String>)>,
        approval: Option<ApprovalRef>,
    ) -> Result<Unit, AuditError> {
        let stmt = self.next_stmt();
        let mut rec = self.session.body(&self.ctx.core.audit, Kind::Request);
        rec.stmt = Some(stmt);
        let mut secrets = Vec::new();
        rec.masked = self.mask_request(&mut request, &mut secrets);
        rec.request = Some(Request::Postgres(request));
        rec.approval = approval;
        if let Some((policy, note)) = decided {
            rec.policy = Some(policy);
            rec.detail = note;
        }
        self.in_append = Some(stmt);
        let appended = self.ctx.core.audit.append(&rec).await;
        self.in_append = None;
        match appended {
            Ok(()) => {
                let mut unit = Unit::new(&self.session, stmt);
                unit.secrets = secrets;
                crate::core::trace::from_record(&unit.span, &rec);
                Ok(unit)
            }
            Err(e) => {
                self.ctx.core.metrics.audit_refused_statements.inc();
                tracing::warn!(error = %e, "statement refused: its audit record cannot be written");
                // The refusal is recorded too; the log keeps it until it can be written.
                rec.kind = Kind::Blocked;
                rec.time = crate::audit::now_rfc3339();
                rec.outcome = Some(Outcome::Error);
                rec.detail = Some(format!("refused before the target: {e}"));
                crate::core::trace::refused(&self.session.trace, super::PROTOCOL, &rec);
                self.ctx.core.audit.record(rec);
                Err(e)
            }
        }
    }

    fn refuse_unrecorded(&mut self, e: &AuditError, simple: bool, out: &mut BytesMut) {
        let refusal = Refusal::AuditUnwritable {
            spool_full: matches!(e, AuditError::SpoolFull { .. }),
            why: e.to_string(),
        };
        let (sqlstate, message) = sql_error(&refusal);
        self.refuse(refusal.outcome(), sqlstate, &message, simple, out);
    }

    /// Counts a refused statement and sends the target a stand-in that fails, whose error the
    /// client sees as `message` (see [`Pending::StandIn`]).
    fn refuse(
        &mut self,
        outcome: Outcome,
        sqlstate: &str,
        message: &str,
        simple: bool,
        out: &mut BytesMut,
    ) {
        self.ctx
            .core
            .metrics
            .statements
            .get_or_create(&OutcomeLabel::of(outcome))
            .inc();
        self.stand_in(sqlstate, message, simple, out);
    }

    /// Fails the message in hand as PostgreSQL fails on an error (`sqlstate`, `message`):
    /// the target is sent a stand-in that does not parse, and its error is replaced.
    fn stand_in(&mut self, sqlstate: &str, message: &str, simple: bool, out: &mut BytesMut) {
        out.extend_from_slice(&if simple {
            // A Query stand-in is a sync point the target answers like any Query.
            self.tables.sync_point();
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
        self.ctx.core.metrics.protocol_errors.inc();
        let mut rec = self.session.body(&self.ctx.core.audit, Kind::ProtocolError);
        rec.outcome = Some(Outcome::Error);
        rec.detail = Some(message.clone());
        self.ctx.core.audit.record(rec);
        End::ClientProtocol(message)
    }
}

/// `value` as the client-side detectors mask it, when they change it.
fn client_detected(masker: &crate::policy::masking::Masker, value: &str) -> Option<String> {
    match masker.mask(value, None, true, None) {
        Cow::Owned(m) => Some(m),
        Cow::Borrowed(_) => None,
    }
}

/// A DataRow as the client gets it when masking rules apply to clients; `None` when no value
/// changes. `unknown`: the columns could not be resolved to tables (text is redacted, anything
/// else withheld).
fn client_row(
    masker: &crate::policy::masking::Masker,
    masks: &[ColMask],
    values: &[Option<&[u8]>],
    unknown: bool,
) -> Option<Bytes> {
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
            let v = (*v)?;
            let text_format = m.is_none_or(|m| m.text);
            let text = match std::str::from_utf8(v) {
                Ok(t) if text_format => t,
                // Bytes that cannot be rewritten as text (a binary value of another type, or
                // text that is not UTF-8, as a SQL_ASCII database sends it): hidden whole when
                // a client-side rule covers the column or the detectors find something in
                // them, a binary value withheld (NULL), text redacted.
                _ => {
                    let covered = m.is_some_and(ColMask::client_whole)
                        || m.is_some_and(|m| m.rule.as_ref().is_some_and(|r| r.client));
                    if !covered && !masker.detects_in_bytes(v, true, None) {
                        return Some(Cow::Borrowed(v));
                    }
                    changed = true;
                    return text_format.then(|| Cow::Owned(b"[redacted]".to_vec()));
                }
            };
            Some({
                let out = if m.is_some_and(ColMask::client_whole) {
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

/// How one result column is masked.
struct ColMask {
    rule: Option<ColumnRule>,
    /// Its table could not be resolved: masked whole (fail closed).
    unresolved: bool,
    /// It has no table, and what it is made of may be a column a rule covers: masked whole in
    /// the record, and for the client when `Some(true)`.
    derived: Option<bool>,
    /// Text format (only text values are rewritten for the client).
    text: bool,
}

impl ColMask {
    /// Masked whole in the client's copy.
    fn client_whole(&self) -> bool {
        self.unresolved || self.derived == Some(true)
    }
}

/// What came back so far for the statement at the head of the queue.
#[derive(Default)]
struct Acc {
    response: PgResponse,
    result_bytes: usize,
    hasher: Option<Sha256>,
    copy_out: u64,
    /// Column masks of the current result set (`None` while masking is off or not yet known).
    masks: Option<Arc<Vec<ColMask>>>,
    /// What describes the rows of the current result set.
    columns: Columns,
    masked: Counts,
    /// The response record's `detail`.
    detail: Option<String>,
}

/// What describes the rows of the current result set. Column rules are matched by position,
/// so a row that does not carry exactly the columns described cannot be masked: the session
/// ends rather than pass it (PostgreSQL never sends one).
#[derive(Default, Clone, Copy, PartialEq, Eq)]
enum Columns {
    /// No RowDescription and no row yet.
    #[default]
    Unseen,
    /// A RowDescription of this many columns: the result's own, or for an Execute the one an
    /// earlier Describe of its portal or statement returned.
    Described(usize),
    /// Rows of an Execute nobody described: when column rules exist, every value is treated
    /// as unresolved.
    Unknown,
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
    /// The statements and portals the target confirmed (shared with the client half).
    tables: Arc<Confirmed>,
    /// Transaction status of the last ReadyForQuery.
    status: u8,
    copy_in: Arc<AtomicU64>,
    stmts: Arc<AtomicU64>,
    /// The statement at the head is in copy-in mode (CopyInResponse seen).
    in_copy_in: bool,
    /// Copy-in ended (the target failed it) before the client's CopyEnd marker arrived: a
    /// Sync the client sends before that marker ends the session ([`Self::push`]).
    drop_syncs_until_copy_end: bool,
    /// Why the session must end, found while queueing what the client half sent.
    lost_step: Option<String>,
    /// The target is in copy-in and the client's CopyDone or CopyFail has not been queued: a
    /// message other than a Sync queued now reaches the target during the copy, which fails
    /// the copy on it and discards it unanswered ([`Self::copy_in_started`]).
    copy_unended: bool,
    /// An extended-protocol batch failed and its Sync has not been queued yet: what the
    /// client half queues until then never runs. Holds the batch's error until a statement
    /// carries it.
    discarding: Option<Option<PgError>>,
    /// An error the target sent with nothing in flight: why it ends the session (a FATAL such
    /// as `57P05` idle-session timeout or `57P01` terminated by an administrator), for the
    /// `session_end` record.
    unsolicited: Option<PgError>,
    /// The node's memory lent to the large message being read.
    lent: Option<Lent>,
    /// A write to the client was under way when it stopped (the session ended meanwhile):
    /// the client has part of a message, so the gateway says nothing more.
    torn: bool,
    /// Inside a transaction block as the target reported at its last ReadyForQuery, or a
    /// transaction-control statement ran in the batch since (`BEGIN`, `COMMIT`, `ROLLBACK TO`
    /// …, whose effect on the batch's other statements is not followed): no rollback is
    /// reported until the next ReadyForQuery.
    in_block: bool,
    /// The first and last statement the target completed in the extended batch in flight
    /// outside a transaction block: they commit at the batch's Sync, or not at all.
    unsynced: Option<(u64, u64)>,
    /// Notices and notifications that came with no statement in flight (see
    /// [`TargetHalf::record_unsolicited`]).
    idle: Idle,
}

/// At most this many `unsolicited` records a second per session; the rest of that second's
/// notices and notifications go into one record (a flood from another session's `NOTIFY` loop
/// must not flood the audit log).
const UNSOLICITED_PER_SEC: u32 = 20;

/// The `unsolicited` records of a session's current second, and what came past their limit.
#[derive(Default)]
struct Idle {
    since: Option<Instant>,
    written: u32,
    /// What came past the limit, up to `audit.max_result_bytes` (then `truncated`).
    surplus: PgResponse,
    /// How many messages `surplus` stands for, and their bytes.
    surplus_count: u64,
    surplus_bytes: usize,
}

/// Reads more of the target's answers. The rest of a large message is read only once the node
/// has lent it the memory; until then the target waits on its socket.
async fn read_more(
    read: &mut ReadHalf<BoxStream>,
    buf: &mut BytesMut,
    lent: &mut Option<Lent>,
    budget: &MessageBudget,
) -> std::io::Result<usize> {
    if lent.is_none() {
        if let Some(len) = large_pending(buf) {
            *lent = Some(budget.lend(len).await);
        }
    }
    read.read_buf(buf).await
}

/// The next expectation the client half has handed over, without registering to be woken for
/// more: the relay polls the target half right after the client half, the only sender, in the
/// same turn (see `run`).
fn queued(rx: &mut mpsc::UnboundedReceiver<Pending>) -> Poll<Option<Pending>> {
    match rx.try_recv() {
        Ok(p) => Poll::Ready(Some(p)),
        Err(mpsc::error::TryRecvError::Empty) => Poll::Pending,
        Err(mpsc::error::TryRecvError::Disconnected) => Poll::Ready(None),
    }
}

impl TargetHalf {
    async fn run(&mut self) -> End {
        let mut out = BytesMut::with_capacity(16 * 1024);
        loop {
            tokio::select! {
                biased;
                pending = std::future::poll_fn(|_| queued(&mut self.rx)) => match pending {
                    Some(p) => {
                        self.push(p);
                        while let Ok(p) = self.rx.try_recv() {
                            self.push(p);
                        }
                        if let Some(why) = self.lost_step.take() {
                            return End::ClientProtocol(why);
                        }
                    }
                    // The client half has ended; its End wins the select.
                    None => std::future::pending::<()>().await,
                },
                read = read_more(&mut self.read, &mut self.buf, &mut self.lent, &self.ctx.budget) => match read {
                    Ok(0) | Err(_) => {
                        self.last_words(&out, true).await;
                        return End::TargetClosed;
                    }
                    Ok(_) => {
                        while let Ok(p) = self.rx.try_recv() {
                            self.push(p);
                        }
                        if let Some(why) = self.lost_step.take() {
                            return End::ClientProtocol(why);
                        }
                        let max = self.ctx.config.max_target_message_bytes;
                        loop {
                            match split_frame(&mut self.buf, max) {
                                Ok(Some(frame)) => {
                                    let large = frame.raw.len() > LARGE_MESSAGE;
                                    let raw = match self.handle(frame).await {
                                        Ok(raw) => raw,
                                        Err(end) => {
                                            self.last_words(&out, true).await;
                                            return end;
                                        }
                                    };
                                    if !large {
                                        out.extend_from_slice(&raw);
                                    } else {
                                        // Passed on as it is (a copy would hold it twice),
                                        // then its memory is given back; a client that does
                                        // not take it in time would hold that memory on.
                                        let config = &self.ctx.config;
                                        let deadline = config.large_write_deadline(raw.len());
                                        let sent = tokio::time::timeout(deadline, async {
                                            self.send(&mut out).await?;
                                            self.pass_on(&raw).await
                                        });
                                        match sent.await {
                                            Ok(Ok(())) => {}
                                            Ok(Err(_)) => return self.client_write_failed(),
                                            Err(_) => {
                                                let secs = deadline.as_secs_f64().ceil();
                                                return End::ClientTooSlow {
                                                    bytes: raw.len(),
                                                    secs: secs as u64,
                                                };
                                            }
                                        }
                                        // The message's allocation goes with it: the rest
                                        // moves to a buffer of the usual size.
                                        drop(raw);
                                        let mut rest = BytesMut::with_capacity(16 * 1024);
                                        rest.extend_from_slice(&self.buf);
                                        self.buf = rest;
                                        self.lent = None;
                                    }
                                }
                                Ok(None) => break,
                                Err(FrameError::TooLong { len, max }) => {
                                    self.last_words(&out, true).await;
                                    return End::TargetTooLarge { len, max };
                                }
                                Err(e) => {
                                    self.last_words(&out, true).await;
                                    return End::TargetProtocol(e.to_string());
                                }
                            }
                        }
                    }
                },
            }
            if self.send(&mut out).await.is_err() {
                return self.client_write_failed();
            }
        }
    }

    /// The session's end when a write to the client fails: the client's, unless the target
    /// had ended the session already (an error with nothing in flight, see `unsolicited`).
    fn client_write_failed(&self) -> End {
        match self.unsolicited {
            Some(_) => End::TargetClosed,
            None => End::ClientClosed,
        }
    }

    /// Sends what `out` holds to the client; a buffer grown by a large message is let go.
    async fn send(&mut self, out: &mut BytesMut) -> std::io::Result<()> {
        if out.is_empty() {
            return Ok(());
        }
        self.pass_on(out).await?;
        if out.capacity() > LARGE_MESSAGE {
            *out = BytesMut::with_capacity(16 * 1024);
        } else {
            out.clear();
        }
        Ok(())
    }

    fn push(&mut self, p: Pending) {
        // What came past the limit while idle is on record before the next statement's answer.
        if self.idle.surplus_count > 0 && matches!(p, Pending::Query(_) | Pending::Execute(_)) {
            self.flush_unsolicited();
        }
        if self.copy_unended {
            match p {
                Pending::Sync => {}
                Pending::CopyEnd => self.copy_unended = false,
                _ => {
                    // Queued all the same: the session ends, and what was recorded as
                    // requested gets its record of no answer.
                    self.copy_unended = false;
                    self.lost_step = Some(COPY_INTERRUPTED.into());
                }
            }
        }
        if self.drop_syncs_until_copy_end {
            match p {
                Pending::Sync => {
                    // The target failed the copy-in before the client ended it: a Sync it read
                    // while still copying was ignored, one it read after is answered, and
                    // which it was cannot be known here. Were it taken as ignored when it was
                    // answered, every later answer would be recorded for the statement after
                    // its own (outside review, 2026-12-07). The session ends, fail closed.
                    self.lost_step = Some(
                        "the client sent Sync after the target failed its COPY FROM STDIN and \
                         before its CopyDone or CopyFail: whether the target answers that Sync \
                         cannot be known, so the session ends"
                            .into(),
                    );
                    return;
                }
                Pending::CopyEnd => {
                    self.drop_syncs_until_copy_end = false;
                    return;
                }
                _ => {}
            }
        }
        self.queue.push_back(p);
        self.discard_skipped();
    }

    /// A CopyInResponse: the target now reads only COPY data, CopyDone and CopyFail (it
    /// ignores Sync and Flush). Any other message the client sent before its CopyDone or
    /// CopyFail makes the target fail the copy and discard that message without an answer,
    /// which would leave every later answer recorded for the statement before its own: the
    /// session ends instead.
    fn copy_in_started(&mut self) -> Result<(), End> {
        self.in_copy_in = true;
        self.tables.copy_in_started();
        // The head is the statement that started the copy.
        let end = self
            .queue
            .iter()
            .skip(1)
            .position(|p| matches!(p, Pending::CopyEnd));
        let mut before_end = self.queue.iter().skip(1).take(end.unwrap_or(usize::MAX));
        if before_end.any(|p| !matches!(p, Pending::Sync)) {
            return Err(End::ClientProtocol(COPY_INTERRUPTED.into()));
        }
        self.copy_unended = end.is_none();
        Ok(())
    }

    /// The target ignores Sync messages received during copy-in. When a copy-in ends, forget
    /// the Syncs the client sent between the COPY and its CopyDone/CopyFail.
    fn end_copy_in(&mut self) {
        self.copy_unended = false;
        if !std::mem::take(&mut self.in_copy_in) {
            return;
        }
        let end = self
            .queue
            .iter()
            .position(|p| matches!(p, Pending::CopyEnd));
        let limit = end.unwrap_or(self.queue.len());
        let mut i = 0;
        let mut ignored = 0;
        // Keep the head (the COPY itself) and everything after the marker; drop the Syncs
        // before it and the marker.
        self.queue.retain(|p| {
            let keep = i == 0 || i > limit || (i < limit && !matches!(p, Pending::Sync));
            ignored += u64::from(!keep && matches!(p, Pending::Sync));
            i += 1;
            keep
        });
        // The target ignored those Syncs: sync points it will not answer.
        for _ in 0..ignored {
            self.tables.sync_resolved();
        }
        self.drop_syncs_until_copy_end = end.is_none();
    }

    async fn pass_on(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.ctx
            .core
            .metrics
            .bytes_from_target
            .inc_by(bytes.len() as u64);
        self.torn = true;
        send_all(&mut self.write, bytes).await?;
        self.torn = false;
        Ok(())
    }

    /// Sends what is left for the client as the session ends: the target's last messages
    /// (`from_target`) or the gateway's own error. Never after part of a message (an end that
    /// came while one was being written: the client would read the rest as that message's),
    /// and for no longer than a client is given to take a message: a client that stopped
    /// reading cannot keep the session, and the target's transaction, open.
    async fn last_words(&mut self, bytes: &[u8], from_target: bool) {
        if self.torn || bytes.is_empty() {
            return;
        }
        let deadline = self.ctx.config.large_write_deadline(bytes.len());
        if from_target {
            let _ = tokio::time::timeout(deadline, self.pass_on(bytes)).await;
        } else {
            let _ = tokio::time::timeout(deadline, send_all(&mut self.write, bytes)).await;
        }
    }

    /// Handles one target message: what the client gets for it, or why the session ends.
    async fn handle(&mut self, frame: Frame) -> Result<Bytes, End> {
        if self.probe_answer(&frame) {
            return Ok(Bytes::new());
        }
        let mut raw = frame.raw.clone();
        let mut instead = None;
        // A stray CopyDone outside copy-in gets no answer; it must not shift the queue.
        while matches!(self.queue.front(), Some(Pending::CopyEnd)) {
            self.queue.pop_front();
        }
        let body = frame.body();
        if let Some(Pending::OwnDescribe(portal)) = self.queue.front() {
            match frame.tag {
                b'T' => {
                    let fields = messages::parse_row_description(&body)
                        .map_err(|e| End::TargetProtocol(e.to_string()))?;
                    let _ = portal.described.set(fields);
                    self.queue.pop_front();
                    return Ok(Bytes::new());
                }
                b'n' => {
                    let _ = portal.described.set(Vec::new());
                    self.queue.pop_front();
                    return Ok(Bytes::new());
                }
                _ => {}
            }
        }
        match (self.queue.front(), frame.tag) {
            // The client heard BindComplete when the gateway kept the Bind back.
            (Some(Pending::OwnBind(ops)), b'2') => {
                self.tables.settle(ops, true);
                self.queue.pop_front();
                return Ok(Bytes::new());
            }
            (Some(Pending::OwnClose), b'3') => {
                self.queue.pop_front();
                return Ok(Bytes::new());
            }
            _ => {}
        }
        let handled = match frame.tag {
            b'G' => self.copy_in_started(),
            b'1' | b'2' | b'3' => match self.queue.pop_front() {
                Some(Pending::Parse { ops, .. } | Pending::Bind(ops) | Pending::Close(ops)) => {
                    self.tables.settle(&ops, true);
                    Ok(())
                }
                other => Err(self.out_of_step(other, frame.tag)),
            },
            b'n' => {
                if let Some(Pending::Describe(_)) = self.queue.front() {
                    self.queue.pop_front();
                }
                Ok(())
            }
            b'T' => self.on_row_description(&body).await,
            b'D' => self.on_data_row(&body).await.map(|masked| {
                if let Some(masked) = masked {
                    raw = masked;
                }
            }),
            b'd' => {
                self.acc.copy_out += body.len() as u64;
                Ok(())
            }
            b'C' | b'I' | b's' => {
                self.on_complete(frame.tag, &body);
                Ok(())
            }
            b'E' => self.on_error(&body).map(|i| instead = i),
            // What these carry goes to the client through its detectors (`Some`: instead).
            b'N' => self.on_notice(&body).map(|i| instead = i),
            b'A' => self.on_notification(&body).map(|i| instead = i),
            b'S' => self.on_parameter_status(&body).map(|i| instead = i),
            b'Z' => self.on_ready(&body),
            _ => Ok(()),
        };
        if let Some(instead) = instead {
            raw = instead;
        }
        handled.map(|()| raw)
    }

    /// The answers to the gateway's settings probe go to no one; `true` when `frame` was one.
    fn probe_answer(&mut self, frame: &Frame) -> bool {
        let Some(Pending::Probe(found)) = self.queue.front_mut() else {
            return false;
        };
        match frame.tag {
            b'1' | b'2' | b'3' | b'C' | b'E' => true,
            b'D' => {
                *found = messages::parse_data_row(&frame.body())
                    .ok()
                    .and_then(|row| Settings::from_row(&row));
                true
            }
            b'Z' => {
                let found = found.take();
                self.queue.pop_front();
                self.tables.set_settings(found);
                self.status = frame.body().first().copied().unwrap_or(b'I');
                self.tables.sync_resolved();
                true
            }
            // Notices and parameter changes are the session's, as at any time.
            _ => false,
        }
    }

    async fn on_row_description(&mut self, body: &[u8]) -> Result<(), End> {
        // Column rules are matched against the description: one the gateway cannot read would
        // leave every column unmasked.
        let fields = messages::parse_row_description(body)
            .map_err(|e| End::TargetProtocol(e.to_string()))?;
        match self.queue.front() {
            Some(Pending::Describe(described)) => {
                // The description belongs to the statement or portal the Describe named when
                // it was sent, never to a later one of the same name.
                match described {
                    Some(Described::Statement(s)) => {
                        let _ = s.described.set(fields);
                    }
                    Some(Described::Portal(p)) => {
                        let _ = p.described.set(fields);
                    }
                    None => {}
                }
                self.queue.pop_front();
            }
            _ => {
                self.acc.masks = self.masks_for(&fields).await;
                self.acc.columns = Columns::Described(fields.len());
                self.acc.response.columns = fields.into_iter().map(|f| f.name).collect();
            }
        }
        Ok(())
    }

    /// A row: accounted, and masked for the client where a rule says so (`Some`: send this
    /// instead).
    async fn on_data_row(&mut self, body: &Bytes) -> Result<Option<Bytes>, End> {
        if self.acc.columns == Columns::Unseen {
            // Rows with no RowDescription of their own are an Execute's: the columns were
            // described before. A Query's rows always follow their description.
            let Some(Pending::Execute(unit)) = self.queue.front() else {
                return Err(End::TargetProtocol(
                    "a DataRow without a RowDescription".into(),
                ));
            };
            let portal = unit.portal.as_deref();
            // Rows of an Execute nobody described: the columns are unknown, so column rules
            // cannot be matched; fail closed.
            self.acc.columns = match portal.and_then(Portal::width) {
                Some(n) => Columns::Described(n),
                None => Columns::Unknown,
            };
            if self.ctx.core.masker.is_active() {
                let fields = portal.and_then(Portal::fields).unwrap_or_default();
                self.acc.masks = self.masks_for(&fields).await;
            }
        }
        // Values the gateway cannot match to their columns would reach the client unmasked:
        // the row is not forwarded.
        self.add_row(body).map_err(End::TargetProtocol)
    }

    /// CommandComplete, EmptyQueryResponse or PortalSuspended.
    fn on_complete(&mut self, tag: u8, body: &[u8]) {
        self.end_copy_in();
        let text = body.strip_suffix(b"\0").unwrap_or(body);
        if tag == b'C' {
            self.acc
                .response
                .tags
                .push(String::from_utf8_lossy(text).into_owned());
        }
        if let Some(Pending::Execute(_)) = self.queue.front() {
            if let Some(Pending::Execute(unit)) = self.queue.pop_front() {
                self.track_block(unit.stmt, text);
                // A suspended portal has not completed its statement yet.
                self.complete(unit, tag != b's');
            }
        }
    }

    /// An ErrorResponse; `Some`: the client gets this instead (a refusal's own error, or the
    /// error through the client-side detectors).
    fn on_error(&mut self, body: &[u8]) -> Result<Option<Bytes>, End> {
        self.end_copy_in();
        let (sqlstate, message) = messages::parse_error_fields(body);
        let error = PgError { sqlstate, message };
        match self.queue.front() {
            // The stand-in failed as intended: the client sees the gateway's error.
            Some(Pending::StandIn { error, simple }) => {
                let instead = error.clone();
                if !*simple {
                    // The target now discards everything up to Sync, as after any error;
                    // nothing was queued behind the stand-in but that Sync.
                    self.queue.pop_front();
                    if self.unsynced.is_some() {
                        // The refusal's error ended the implicit transaction, as any would.
                        let (sqlstate, message) = messages::parse_error_fields(&instead[5..]);
                        let refused = PgError { sqlstate, message };
                        self.rolled_back(refused, "the gateway refused a message of the batch");
                    }
                }
                return Ok(Some(instead));
            }
            Some(Pending::Query(_)) if self.acc.response.error.is_none() => {
                // A Query sent inside an extended batch runs in the batch's transaction.
                if self.unsynced.is_some() {
                    self.rolled_back(error.clone(), "a query of the batch failed");
                }
                self.acc.detail = self.query_rolled_back();
                self.acc.response.error = Some(error);
            }
            Some(Pending::Query(_)) => {}
            Some(_) => self.batch_failed(error),
            None => self.unsolicited = Some(error),
        }
        // An error quotes values (`invalid input syntax for type integer: "…"`, `Key (…)=(…)
        // already exists`).
        self.client_fields(b'E', body)
    }

    /// A NoticeResponse: its message on record, the client's copy through the client-side
    /// detectors (`Some`: send this instead).
    fn on_notice(&mut self, body: &[u8]) -> Result<Option<Bytes>, End> {
        let (_, message) = messages::parse_error_fields(body);
        if self.nothing_in_flight() {
            self.record_unsolicited(PgResponse {
                notices: vec![message],
                ..PgResponse::default()
            });
        } else if self.keep(message.len()) {
            self.acc.response.notices.push(message);
        }
        self.client_fields(b'N', body)
    }

    /// A NotificationResponse: on record, its payload through the client-side detectors for
    /// the client (`Some`: send this instead).
    fn on_notification(&mut self, body: &[u8]) -> Result<Option<Bytes>, End> {
        let (pid, channel, payload) =
            messages::parse_notification(body).map_err(|e| End::TargetProtocol(e.to_string()))?;
        let notification = PgNotification {
            channel: channel.to_string(),
            payload: payload.to_string(),
        };
        if self.nothing_in_flight() {
            self.record_unsolicited(PgResponse {
                notifications: vec![notification],
                ..PgResponse::default()
            });
        } else if self.keep(channel.len() + payload.len()) {
            self.acc.response.notifications.push(notification);
        }
        // The channel too: a session can LISTEN on a value it read (`format('LISTEN %I', …)`).
        let (masked_channel, masked_payload) =
            (self.client_masked(channel), self.client_masked(payload));
        if masked_channel.is_none() && masked_payload.is_none() {
            return Ok(None);
        }
        Ok(Some(messages::notification(
            pid,
            masked_channel.as_deref().unwrap_or(channel),
            masked_payload.as_deref().unwrap_or(payload),
        )))
    }

    /// Whether no statement of the client's is in flight: nothing queued but sync points and
    /// the gateway's own messages (a Sync's answer, the settings probe), whose response record
    /// a notice or notification would otherwise join.
    fn nothing_in_flight(&self) -> bool {
        !self
            .queue
            .iter()
            .any(|p| matches!(p, Pending::Query(_) | Pending::Execute(_)))
    }

    /// A notice or notification that came with no statement in flight (another session's
    /// `NOTIFY` on a channel this one listens on, a notice before the server shuts down): on
    /// record now, on its own, rather than in the response of whatever statement comes next;
    /// past [`UNSOLICITED_PER_SEC`] in a second, kept for one record of the surplus.
    fn record_unsolicited(&mut self, response: PgResponse) {
        let now = Instant::now();
        let idle = &mut self.idle;
        if idle
            .since
            .is_none_or(|t| now.duration_since(t) >= std::time::Duration::from_secs(1))
        {
            self.flush_unsolicited();
            self.idle.since = Some(now);
            self.idle.written = 0;
        }
        let idle = &mut self.idle;
        if idle.written < UNSOLICITED_PER_SEC {
            idle.written += 1;
            self.write_unsolicited(response, None);
            return;
        }
        let len: usize = response.notices.iter().map(String::len).sum::<usize>()
            + response
                .notifications
                .iter()
                .map(|n| n.channel.len() + n.payload.len())
                .sum::<usize>();
        idle.surplus_count += 1;
        idle.surplus_bytes += len;
        let surplus = &mut idle.surplus;
        if surplus.truncated || idle.surplus_bytes > self.ctx.max_result_bytes {
            surplus.truncated = true;
        } else {
            surplus.notices.extend(response.notices);
            surplus.notifications.extend(response.notifications);
        }
    }

    /// Writes what came past the limit, if anything did: one record for all of it.
    fn flush_unsolicited(&mut self) {
        let idle = &mut self.idle;
        if idle.surplus_count == 0 {
            return;
        }
        let detail = format!(
            "{} notices and notifications ({} bytes) that came in one second past the first {UNSOLICITED_PER_SEC}, in one record{}",
            idle.surplus_count,
            idle.surplus_bytes,
            if idle.surplus.truncated { ", cut at audit.max_result_bytes" } else { "" }
        );
        let surplus = std::mem::take(&mut idle.surplus);
        idle.surplus_count = 0;
        idle.surplus_bytes = 0;
        self.write_unsolicited(surplus, Some(detail));
    }

    /// An `unsolicited` record: its texts masked like results.
    fn write_unsolicited(&self, mut response: PgResponse, detail: Option<String>) {
        let mut rec = self.session.body(&self.ctx.core.audit, Kind::Unsolicited);
        rec.detail = detail;
        let masker = &self.ctx.core.masker;
        if masker.is_active() {
            let said = response.error.iter_mut().map(|e| &mut e.message);
            let notices = response.notices.iter_mut();
            let notified = response
                .notifications
                .iter_mut()
                .flat_map(|n| [&mut n.channel, &mut n.payload]);
            for text in said.chain(notices).chain(notified) {
                if let Cow::Owned(m) = masker.mask(text, None, false, Some(&mut rec.masked)) {
                    *text = m;
                }
            }
        }
        rec.outcome = Some(match response.error {
            Some(_) => Outcome::Error,
            None => Outcome::Success,
        });
        rec.response = Some(Response::Postgres(response));
        self.ctx.core.audit.record(rec);
    }

    /// Whether `len` more bytes of what came back fit in the response record
    /// (`audit.max_result_bytes`, shared with the rows); else the record says it is
    /// `truncated`.
    fn keep(&mut self, len: usize) -> bool {
        let acc = &mut self.acc;
        if acc.response.truncated || acc.result_bytes + len > self.ctx.max_result_bytes {
            acc.response.truncated = true;
            return false;
        }
        acc.result_bytes += len;
        true
    }

    /// `value` as the client-side detectors mask it, when they change it on this connection.
    fn client_masked(&self, value: &str) -> Option<String> {
        let masker = &self.ctx.core.masker;
        let conn = self.session.conn.name.as_deref().unwrap_or("");
        if !masker.masks_clients(conn) {
            return None;
        }
        client_detected(masker, value)
    }

    /// The client's copy of an ErrorResponse or NoticeResponse: every field through the
    /// client-side detectors (`None`: unchanged).
    fn client_fields(&self, tag: u8, body: &[u8]) -> Result<Option<Bytes>, End> {
        let conn = self.session.conn.name.as_deref().unwrap_or("");
        if !self.ctx.core.masker.masks_clients(conn) {
            return Ok(None);
        }
        let masker = &self.ctx.core.masker;
        messages::mask_fields(tag, body, |v| client_detected(masker, v))
            .map_err(|e| End::TargetProtocol(e.to_string()))
    }

    /// A ParameterStatus (`Some`: the client gets this instead).
    fn on_parameter_status(&mut self, body: &[u8]) -> Result<Option<Bytes>, End> {
        // The gateway reads every client message as UTF-8 with standard strings; once the
        // target reads them otherwise, it can no longer tell what runs.
        match super::encoding::check_parameter_status(body) {
            Ok(()) => {}
            Err(e @ (EncodingError::TargetNotUtf8(_) | EncodingError::TargetNotStandard(_))) => {
                return Err(End::ReadingChanged(e))
            }
            Err(e) => return Err(End::TargetProtocol(e.to_string())),
        }
        let Ok((name, value)) = messages::parse_parameter_status(body) else {
            return Ok(None);
        };
        // The client may set a reported setting from values (`set_config('application_name',
        // …)`, a time zone `<…>+0` made of a column).
        let instead = self
            .client_masked(value)
            .map(|v| messages::parameter_status(name, &v));
        if name == "application_name" {
            let value = self.ctx.core.scrub(value);
            self.session.application_reported(&value);
        }
        Ok(instead)
    }

    /// ReadyForQuery: a sync point answered.
    fn on_ready(&mut self, body: &[u8]) -> Result<(), End> {
        self.status = body.first().copied().unwrap_or(b'I');
        self.in_block = self.status != b'I';
        self.unsynced = None;
        match self.queue.pop_front() {
            Some(Pending::Query(unit)) => {
                self.complete(unit, true);
                self.tables.sync_resolved();
            }
            Some(Pending::Sync) | Some(Pending::StandIn { simple: true, .. }) => {
                self.tables.sync_resolved();
            }
            other => return Err(self.out_of_step(other, b'Z')),
        }
        // Outside a transaction block every portal is gone.
        if self.status == b'I' {
            self.tables.end_portals();
        }
        Ok(())
    }

    /// An extended-protocol message failed: the target discards everything up to Sync. The
    /// first statement in that range carries the error; the others never ran. Whatever they
    /// would have added to the tables is not there; whatever they would have removed is
    /// forgotten anyway.
    fn batch_failed(&mut self, error: PgError) {
        if let Some(Pending::Sync) = self.queue.front() {
            return self.rolled_back(error, "the target failed the batch's Sync");
        }
        let said = self.unsynced.is_some().then(|| error.clone());
        let mut error = Some(error);
        if let Some(Pending::Parse { name, text, ops }) = self.queue.front() {
            // A statement that does not parse never runs; its attempt is recorded with the
            // error.
            self.tables.settle(ops, false);
            let stmt = self.stmts.fetch_add(1, Ordering::Relaxed) + 1;
            let mut unit = Unit::new(&self.session, stmt);
            unit.request = Some(PgRequest {
                mode: "extended".into(),
                text: text.to_string(),
                statement: Some(name.clone()),
                ..PgRequest::default()
            });
            self.queue.pop_front();
            self.acc.response.error = error.take();
            self.complete(unit, false);
        }
        self.discarding = Some(error);
        self.discard_skipped();
        self.acc = Acc::default();
        if let Some(error) = said {
            self.rolled_back(error, "a message of the batch failed");
        }
    }

    /// Keeps `in_block` and `unsynced` as an extended-protocol statement `stmt` completes
    /// with command tag `tag` (empty: its portal was suspended). A transaction-control tag
    /// stops the tracking until the next ReadyForQuery: `ROLLBACK` is also the tag of
    /// `ROLLBACK TO SAVEPOINT`, `COMMIT` that of `COMMIT AND CHAIN`, and a `ROLLBACK` outside a
    /// block rolls the batch's statements back with a warning only.
    fn track_block(&mut self, stmt: u64, tag: &[u8]) {
        if TRANSACTION_CONTROL.contains(&tag) {
            self.in_block = true;
            self.unsynced = None;
        } else if !self.in_block {
            let first = self.unsynced.map_or(stmt, |(first, _)| first);
            self.unsynced = Some((first, stmt));
        }
    }

    /// A simple Query failed: outside a transaction block its statements are one implicit
    /// transaction, so what those it completed before the error did (their tags are in its
    /// `response`) was rolled back. Said only when that is certain: the Query started outside
    /// a block and none of its completed statements was transaction control.
    fn query_rolled_back(&self) -> Option<String> {
        let tags = &self.acc.response.tags;
        if self.in_block
            || tags.is_empty()
            || tags
                .iter()
                .any(|t| TRANSACTION_CONTROL.contains(&t.as_bytes()))
        {
            return None;
        }
        let what = match tags.len() {
            1 => "its first statement".to_string(),
            n => format!("its first {n} statements"),
        };
        Some(format!(
            "the query's implicit transaction did not commit, so what {what} did (recorded as completed in tags) was rolled back"
        ))
    }

    /// The implicit transaction of the extended batch in flight ended with `error` (`what`
    /// failed: a message of the batch, or its Sync after every message had succeeded, as a
    /// deferred constraint or a serialization failure does at commit). What its statements
    /// did is rolled back, though their `response` records say they completed: on record as
    /// an `unsolicited` error that names them.
    fn rolled_back(&mut self, error: PgError, what: &str) {
        let statements = match self.unsynced.take() {
            Some((first, last)) if first == last => format!("statement {first}"),
            Some((first, last)) => format!("statements {first} to {last}"),
            None => "its statements".into(),
        };
        let response = PgResponse {
            error: Some(error),
            ..PgResponse::default()
        };
        let detail = format!(
            "{what}: the batch's implicit transaction did not commit, so what {statements} did (recorded as completed) was rolled back"
        );
        self.write_unsolicited(response, Some(detail));
    }

    /// After an error the target discards every message up to Sync, including those the
    /// client half sends after the error came back (it may flush a batch in parts). Settles
    /// each as not run; the first statement among them carries the batch's error if no
    /// earlier one did.
    fn discard_skipped(&mut self) {
        let Some(mut error) = self.discarding.take() else {
            return;
        };
        loop {
            match self.queue.front() {
                None => {
                    self.discarding = Some(error);
                    return;
                }
                Some(Pending::Sync) => return,
                Some(_) => {}
            }
            match self.queue.pop_front() {
                Some(
                    Pending::Parse { ops, .. }
                    | Pending::Bind(ops)
                    | Pending::Close(ops)
                    | Pending::OwnBind(ops),
                ) => {
                    self.tables.settle(&ops, false);
                }
                Some(Pending::Execute(unit) | Pending::Query(unit)) => {
                    self.acc.response.error = Some(error.take().unwrap_or_else(|| PgError {
                        sqlstate: String::new(),
                        message: "not executed: an earlier message of the batch failed".into(),
                    }));
                    let query = unit.portal.is_none();
                    self.complete(unit, false);
                    if query {
                        // A Query skipped by the target is a sync point it will not answer.
                        self.tables.sync_resolved();
                    }
                }
                Some(Pending::StandIn { simple: true, .. }) => self.tables.sync_resolved(),
                _ => {}
            }
        }
    }

    /// The target answered something the gateway did not expect at this point: it can no
    /// longer tell which statement a response belongs to, so the session ends.
    fn out_of_step(&mut self, expected: Option<Pending>, tag: u8) -> End {
        if let Some(p) = expected {
            self.queue.push_front(p);
        }
        self.tables.forget_all();
        End::TargetProtocol(format!(
            "the target's {:?} message does not answer what the gateway sent",
            tag as char
        ))
    }

    fn masks_for(
        &self,
        fields: &[Field],
    ) -> impl std::future::Future<Output = Option<Arc<Vec<ColMask>>>> + Send + 'static {
        let ctx = self.ctx.clone();
        let conn = self.session.conn.name.clone().unwrap_or_default();
        let fields = fields.to_vec();
        let derives = match self.queue.front() {
            Some(Pending::Query(unit) | Pending::Execute(unit)) => unit.derives,
            _ => None,
        };
        async move { Self::masks(&ctx, &conn, &fields, derives).await }
    }

    /// Column masks for a result set, resolving the tables behind its columns. (Takes the
    /// context rather than `self`: the half's streams are not `Sync`.)
    async fn masks(
        ctx: &PgContext,
        conn: &str,
        fields: &[Field],
        derives: Option<bool>,
    ) -> Option<Arc<Vec<ColMask>>> {
        let masker = &ctx.core.masker;
        if !masker.is_active() {
            return None;
        }
        let columns: Vec<(u32, i16)> = fields
            .iter()
            .map(|f| (f.table_oid, f.column))
            .filter(|&(o, _)| o != 0)
            .collect();
        let tables = match ctx.catalogs.get(conn) {
            Some(catalog) if masker.has_column_rules() && !columns.is_empty() => {
                match catalog.tables(&columns).await {
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
                    // A column of a table the catalog does not know (a table of the client's
                    // own open transaction, or one dropped since) may be covered by a rule
                    // (`table = "*"`): masked whole, like a table that cannot be looked up.
                    let found = || {
                        let table = tables.as_ref()?.get(&f.table_oid)?;
                        Some((table, table.columns.get(&f.column)?))
                    };
                    let (rule, unresolved) = if !masker.has_column_rules() || f.table_oid == 0 {
                        (None, false)
                    } else {
                        match found() {
                            Some((t, column)) => {
                                // A partition's or inheritance child's column is also covered by
                                // its ancestors' rules.
                                let own = std::iter::once((&t.schema, &t.name));
                                let ancestors = t.ancestors.iter().map(|(s, n)| (s, n));
                                let rule = own
                                    .chain(ancestors)
                                    .find_map(|(s, n)| masker.column_rule(conn, s, n, column));
                                (rule.cloned(), false)
                            }
                            None => (None, true),
                        }
                    };
                    ColMask {
                        rule,
                        unresolved,
                        derived: derives.filter(|_| f.table_oid == 0 && masker.has_column_rules()),
                        text: f.format == 0 || messages::is_text_type(f.type_oid),
                    }
                })
                .collect(),
        ))
    }

    /// Accounts a DataRow; returns the row to send instead when the client copy is masked, or
    /// why the row cannot be matched to its columns (then nothing is accounted).
    fn add_row(&mut self, body: &Bytes) -> Result<Option<Bytes>, String> {
        let masker = &self.ctx.core.masker;
        let acc = &mut self.acc;
        let values = messages::parse_data_row(body).map_err(|e| e.to_string())?;
        if let Columns::Described(n) = acc.columns {
            if values.len() != n {
                return Err(format!(
                    "a DataRow of {} values in a result of {n} columns",
                    values.len()
                ));
            }
        }
        acc.response.rows += 1;
        acc.response.bytes += body.len() as u64;
        let masks = acc.masks.clone();
        let unknown = acc.columns == Columns::Unknown && masker.has_column_rules();
        let limit = self.ctx.max_result_bytes;
        if !acc.response.truncated && acc.result_bytes + body.len() <= limit {
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
                            Some(m) if m.derived.is_some() => {
                                *acc.masked.entry("derived".into()).or_default() += 1;
                                "[redacted]".to_string()
                            }
                            m => messages::mask_shown(
                                masker,
                                &text,
                                m.and_then(|m| m.rule.as_ref()),
                                Some(&mut acc.masked),
                            )
                            .into_owned(),
                        }
                    })
                })
                .collect();
            acc.response.result.push(row);
        } else {
            // Rows past the limit are not recorded one by one; their digest is.
            acc.response.truncated = true;
            acc.hasher.get_or_insert_with(Sha256::new).update(&body[..]);
        }
        let conn = self.session.conn.name.as_deref().unwrap_or("");
        let Some(masks) = masks else {
            return Ok(None);
        };
        if !masker.masks_clients(conn) {
            return Ok(None);
        }
        Ok(client_row(masker, &masks, &values, unknown))
    }

    /// Writes the response record of a finished statement.
    /// `ran`: the target answered it (each of its statements with a command tag, up to the
    /// first error), rather than skipping it or leaving it suspended.
    fn complete(&mut self, unit: Unit, ran: bool) {
        let mut acc = std::mem::take(&mut self.acc);
        let copy_in = self.copy_in.swap(0, Ordering::Relaxed);
        acc.response.bytes += acc.copy_out + copy_in;
        acc.response.digest = acc.hasher.map(|h| hex::encode(h.finalize()));
        // What it changed in the tables: each statement the target completed.
        let completed = if ran { acc.response.tags.len() } else { 0 };
        self.tables.settle(&unit.always, true);
        for (i, ops) in unit.per_statement.iter().enumerate() {
            self.tables.settle(ops, i < completed);
        }
        if acc.response.columns.is_empty() && acc.response.error.is_none() {
            if let Some(fields) = unit.portal.as_ref().and_then(|p| p.fields()) {
                acc.response.columns = fields.into_iter().map(|f| f.name).collect();
            }
        }
        // Values echoed in errors and in a failed Parse's text are masked like results.
        let masker = &self.ctx.core.masker;
        let mut request = unit.request;
        let mut secrets = unit.secrets;
        // A statement that failed to parse is recorded here, not at `audit_request`.
        if let Some(r) = request.as_mut() {
            take_credentials(&mut r.text, &mut acc.masked, &mut secrets);
        }
        // The target's error may quote the statement (`syntax error at or near "…"`), and so
        // may its notices and notifications.
        let said = acc.response.error.iter_mut().map(|e| &mut e.message);
        let notices = acc.response.notices.iter_mut();
        let notified = acc
            .response
            .notifications
            .iter_mut()
            .flat_map(|n| [&mut n.channel, &mut n.payload]);
        for text in said.chain(notices).chain(notified) {
            scrub_values(text, &secrets, &mut acc.masked);
            if masker.is_active() {
                if let Cow::Owned(m) = masker.mask(text, None, false, Some(&mut acc.masked)) {
                    *text = m;
                }
            }
        }
        if masker.is_active() {
            // A column's name is the client's to choose (`SELECT 1 AS "…"`).
            for c in acc.response.columns.iter_mut() {
                if let Cow::Owned(m) = masker.mask(c, None, false, Some(&mut acc.masked)) {
                    *c = m;
                }
            }
            if let Some(r) = request.as_mut() {
                mask_statement_copy(masker, &mut r.text, &mut acc.masked);
            }
        }
        let outcome = if acc.response.error.is_some() {
            Outcome::Error
        } else {
            Outcome::Success
        };
        self.ctx
            .core
            .metrics
            .statements
            .get_or_create(&OutcomeLabel::of(outcome))
            .inc();
        let mut rec = self.session.body(&self.ctx.core.audit, Kind::Response);
        rec.stmt = Some(unit.stmt);
        rec.request = request.map(Request::Postgres);
        rec.masked = acc.masked;
        rec.detail = acc.detail;
        rec.response = Some(Response::Postgres(acc.response));
        rec.outcome = Some(outcome);
        rec.duration_us = Some(unit.started.elapsed().as_micros() as u64);
        crate::core::trace::from_record(&unit.span, &rec);
        self.ctx.core.audit.record(rec);
    }

    /// Statements still in flight when the session ends get a response record too.
    fn abandon_pending(&mut self, why: PgError) {
        self.flush_unsolicited();
        while let Ok(p) = self.rx.try_recv() {
            self.queue.push_back(p);
        }
        let queue = std::mem::take(&mut self.queue);
        self.abandon(queue, why);
    }

    /// Records `why` as the response of each statement in `pending`.
    fn abandon(&mut self, pending: impl IntoIterator<Item = Pending>, why: PgError) {
        for p in pending {
            if let Pending::Execute(unit) | Pending::Query(unit) = p {
                self.acc.response.error = Some(why.clone());
                self.complete(unit, false);
            }
        }
    }
}

/// The text of each statement of a message (one text when it holds one statement, or when the
/// split disagrees with the classification).
fn statement_texts<'a>(text: &'a str, stmts: &[StatementInfo]) -> Vec<&'a str> {
    if stmts.len() > 1 {
        if let Ok(parts) = pg_query::split_with_parser(text) {
            if parts.len() == stmts.len() {
                return parts.into_iter().map(str::trim).collect();
            }
        }
    }
    vec![text; stmts.len()]
}

/// The command tags of transaction control.
const TRANSACTION_CONTROL: &[&[u8]] = &[
    b"BEGIN",
    b"START TRANSACTION",
    b"COMMIT",
    b"ROLLBACK",
    b"SAVEPOINT",
    b"RELEASE",
    b"PREPARE TRANSACTION",
    b"COMMIT PREPARED",
    b"ROLLBACK PREPARED",
];

/// The response of a statement recorded but never sent: the session ended first (its client
/// left or broke the protocol, its token expired, the target or the node went away).
const NOT_SENT: &str = "not sent: the session ended before it was forwarded to the target";

/// The message a client gets when its session ends because its token expired.
const EXPIRED: &str =
    "terminating connection: the access token expired; reconnect with a fresh token";

/// Ends a session the gateway itself ends (its token expired, the node shuts down). Both
/// halves have stopped, so nothing the client sends from now on reaches the target. Whatever
/// the target is still running for this session is cancelled the way a client's CancelRequest
/// is (on record first), and the client is told `why` its connection ends (`57P01`, as for
/// `pg_terminate_backend`). Dropping the target connection afterwards rolls back an open
/// transaction.
async fn end_by_gateway(
    ctx: &PgContext,
    session: &Session,
    cancel_guard: &CancelGuard,
    target_half: &mut TargetHalf,
    why: &str,
) {
    let (pid, secret) = cancel_guard.key();
    super::cancel::forward(ctx, &session.conn, pid, secret).await;
    let said = messages::error_response(true, "57P01", why);
    target_half.last_words(&said, false).await;
}

/// What a Bind of `portal` under `name` does to the tables. A failed Bind may leave an older
/// portal of that name: it is forgotten either way.
fn bind_ops(name: &str, portal: &Arc<Portal>) -> Vec<Op> {
    vec![
        Op::DropPortal(Some(name.to_string())),
        Op::AddPortal(name.to_string(), portal.clone()),
    ]
}

/// Whether a statement text writes (an INSERT, UPDATE, DELETE or MERGE anywhere in it, or in
/// the prepared statements it runs).
fn writes(class: &Classification, resolved: &Resolved) -> bool {
    let any = |stmts: &[StatementInfo]| stmts.iter().any(|s| s.writes);
    class.as_ref().is_ok_and(|s| any(s)) || resolved.decided.as_deref().is_some_and(any)
}

/// The refusal of a write of `mask`, a value this gateway masks for the connection's clients.
fn masked_value_write(mask: &str) -> Decision {
    gateway_block(
        "masked-value-write",
        format!("the statement writes {mask:?}, a value this gateway masks for the clients of this connection; it would replace the real value (write the real value, or leave the column out)"),
    )
}
