//! One client session up to the relay: TLS negotiation, startup, token authentication, access
//! check and the gateway's own login to the target.

use super::backend::{Backend, Target};
use super::cancel::CancelEntry;
use super::codec::{split_frame, split_startup, FrameError};
use super::encoding;
use super::messages::{self, Reader, Startup};
use super::relay::{self, Session};
use super::PgContext;
use crate::core::metrics::OutcomeLabel;
use crate::core::proxy_protocol::Origin;
use crate::core::tls::{send_all, BoxStream};
use bytes::{Bytes, BytesMut};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::OwnedSemaphorePermit;
use tracing::Instrument;
use vigil_proto::record::{Connection, Kind, Outcome, Parties, Principal};

/// Client startup parameters passed on to the target; anything else is dropped, except the
/// ones refused outright below. `client_encoding` is the gateway's own (see [`encoding`]).
const PASSED_PARAMS: &[&str] = &[
    "application_name",
    "DateStyle",
    "TimeZone",
    "extra_float_digits",
    "IntervalStyle",
    "search_path",
];

/// Why a session did not reach the relay.
enum Refusal {
    /// Refuse with an error to the client and a `session_start` record.
    Deny {
        sqlstate: &'static str,
        message: String,
        outcome: Outcome,
        principal: Option<Arc<Principal>>,
    },
    /// The client broke the protocol: error, `protocol_error` record, close.
    Protocol(String),
    /// Nothing to say or record (the client went away, or a cancel was handled).
    Quiet,
}

impl From<FrameError> for Refusal {
    fn from(e: FrameError) -> Self {
        Refusal::Protocol(e.to_string())
    }
}

impl From<messages::Malformed> for Refusal {
    fn from(e: messages::Malformed) -> Self {
        Refusal::Protocol(e.to_string())
    }
}

fn deny(sqlstate: &'static str, message: impl Into<String>) -> Refusal {
    Refusal::Deny {
        sqlstate,
        message: message.into(),
        outcome: Outcome::Denied,
        principal: None,
    }
}

/// Answers a client that arrived while every pre-authentication permit was taken, and closes.
/// Nothing is recorded: a flood of these must not fill the audit log (the metric counts them).
pub async fn turn_away(mut tcp: TcpStream, peer: SocketAddr) {
    tracing::debug!(client = %peer, "refused: too many connections are authenticating");
    let answer = messages::error_response(
        true,
        "53300",
        "too many connections are authenticating on this gateway; try again later",
    );
    // A client that does not read cannot hold the task.
    let _ = tokio::time::timeout(Duration::from_secs(1), async {
        let _ = tcp.write_all(&answer).await;
        let _ = tcp.shutdown().await;
    })
    .await;
}

/// Runs one session; `preauth` is the listener's pre-authentication permit, released once the
/// client is authenticated.
pub async fn run(
    ctx: Arc<PgContext>,
    tcp: TcpStream,
    origin: Origin,
    preauth: OwnedSemaphorePermit,
) {
    let id = crate::core::new_session_id();
    let span =
        crate::core::trace::session(super::PROTOCOL, &id, ctx.core.audit.node(), &origin.client);
    async move {
        let mut conn = origin.connection(super::PROTOCOL);
        let mut stream: BoxStream = Box::new(tcp);
        let timeout = Duration::from_secs(ctx.config.startup_timeout_secs);
        let handshake = handshake(&ctx, &id, &mut stream, &mut conn, preauth);
        let started = tokio::time::timeout(timeout, handshake)
            .await
            .unwrap_or_else(|_| Err(Refusal::Protocol("startup did not finish in time".into())));
        match started {
            Ok(established) => {
                crate::core::trace::authenticated(
                    &tracing::Span::current(),
                    &established.session.principal.subject,
                    established.session.conn.name.as_deref(),
                );
                ctx.core
                    .metrics
                    .sessions
                    .get_or_create(&OutcomeLabel::of(Outcome::Success))
                    .inc();
                ctx.core.metrics.active_sessions.inc();
                relay::run(&ctx, established, stream).await;
                ctx.core.metrics.active_sessions.dec();
            }
            Err(refusal) => refuse(&ctx, &id, &mut stream, conn, refusal).await,
        }
    }
    .instrument(span)
    .await
}

async fn refuse(
    ctx: &PgContext,
    id: &str,
    stream: &mut BoxStream,
    conn: Connection,
    refusal: Refusal,
) {
    // What a refused client sent (the database it named, its options) reaches the record, the
    // node's log and the answer only through the detectors.
    let mut conn = conn;
    conn.name = conn.name.map(|n| ctx.core.scrub(&n));
    let conn = Some(Arc::new(conn));
    let said = match refusal {
        Refusal::Deny {
            sqlstate,
            message,
            outcome,
            principal,
        } => {
            let message = ctx.core.scrub(&message);
            tracing::info!(%sqlstate, %message, "session refused");
            ctx.core
                .metrics
                .sessions
                .get_or_create(&OutcomeLabel::of(outcome))
                .inc();
            let mut body = ctx.core.audit.body(Some(id), Kind::SessionStart);
            body.outcome = Some(outcome);
            body.principal = principal;
            body.connection = conn;
            body.detail = Some(message.clone());
            ctx.core.audit.record(body);
            Some(messages::error_response(true, sqlstate, &message))
        }
        Refusal::Protocol(message) => {
            let message = ctx.core.scrub(&message);
            tracing::info!(%message, "protocol violation");
            ctx.core.metrics.protocol_errors.inc();
            let mut body = ctx.core.audit.body(Some(id), Kind::ProtocolError);
            body.outcome = Some(Outcome::Error);
            body.connection = conn;
            body.detail = Some(message.clone());
            ctx.core.audit.record(body);
            Some(messages::error_response(true, "08P01", &message))
        }
        Refusal::Quiet => None,
    };
    // A client that does not read cannot hold the task.
    let _ = tokio::time::timeout(Duration::from_secs(1), async {
        if let Some(said) = said {
            let _ = send_all(stream, &said).await;
        }
        let _ = stream.shutdown().await;
    })
    .await;
}

/// A message longer than the pre-authentication limit: said as such to the client.
fn preauth_frame_error(e: FrameError) -> Refusal {
    match e {
        FrameError::TooLong { .. } => Refusal::Protocol(format!("{e} before authentication")),
        e => e.into(),
    }
}

async fn read_startup(
    stream: &mut BoxStream,
    buf: &mut BytesMut,
    max: usize,
) -> Result<Bytes, Refusal> {
    loop {
        if let Some(p) = split_startup(buf, max).map_err(preauth_frame_error)? {
            return Ok(p);
        }
        match stream.read_buf(buf).await {
            Ok(0) | Err(_) => return Err(Refusal::Quiet),
            Ok(_) => {}
        }
    }
}

/// Reads startup packets — SSLRequest, GSSENCRequest, CancelRequest — up to the
/// StartupMessage, answering each (TLS is set up on `stream`).
async fn read_startup_message(
    ctx: &PgContext,
    stream: &mut BoxStream,
    buf: &mut BytesMut,
    conn: &mut Connection,
    max: usize,
) -> Result<Startup, Refusal> {
    loop {
        let packet = read_startup(stream, buf, max).await?;
        let mut r = Reader::new(&packet, "startup packet");
        match r.i32()? {
            messages::SSL_REQUEST if !conn.client_tls => {
                if !buf.is_empty() {
                    // Bytes sent before the handshake would be read as if they were encrypted.
                    return Err(Refusal::Protocol("data received after SSLRequest".into()));
                }
                stream.write_all(b"S").await.map_err(|_| Refusal::Quiet)?;
                let plain = std::mem::replace(stream, Box::new(tokio::io::duplex(1).0));
                let acceptor = tokio_rustls::TlsAcceptor::from(ctx.tls.clone());
                let tls = acceptor.accept(plain).await.map_err(|e| {
                    tracing::debug!(error = %e, "TLS handshake failed");
                    Refusal::Quiet
                })?;
                *stream = Box::new(tls);
                conn.client_tls = true;
            }
            messages::GSSENC_REQUEST => {
                send_all(stream, b"N").await.map_err(|_| Refusal::Quiet)?;
            }
            messages::CANCEL_REQUEST => {
                let (pid, secret) = (r.i32()?, r.i32()?);
                super::cancel::forward(ctx, conn, pid, secret).await;
                return Err(Refusal::Quiet);
            }
            messages::PROTOCOL_3_0 => return Ok(Startup::parse(&packet[4..])?),
            other => {
                return Err(Refusal::Protocol(format!(
                    "unsupported protocol version or request code {other}"
                )))
            }
        }
    }
}

/// Reads the PasswordMessage that answers the cleartext password request: the token.
async fn read_password(
    stream: &mut BoxStream,
    buf: &mut BytesMut,
    max: usize,
) -> Result<String, Refusal> {
    loop {
        match split_frame(buf, max).map_err(preauth_frame_error)? {
            Some(f) if f.tag == b'p' => {
                let body = f.body();
                let mut r = Reader::new(&body, "PasswordMessage");
                return Ok(r.cstr()?.to_string());
            }
            Some(f) => {
                return Err(Refusal::Protocol(format!(
                    "expected a password message, got {:?}",
                    f.tag as char
                )))
            }
            None => match stream.read_buf(buf).await {
                // psql hangs up here to prompt for a password, then reconnects.
                Ok(0) | Err(_) => return Err(Refusal::Quiet),
                Ok(_) => {}
            },
        }
    }
}

async fn handshake(
    ctx: &Arc<PgContext>,
    id: &str,
    stream: &mut BoxStream,
    conn: &mut Connection,
    preauth: OwnedSemaphorePermit,
) -> Result<relay::Established, Refusal> {
    // Until the token is verified, the client is anyone: it may not make the gateway buffer
    // more than this (checked on the declared length, before anything is reserved).
    let max = ctx.config.preauth_message_limit();
    let mut buf = BytesMut::with_capacity(1024);
    let startup = read_startup_message(ctx, stream, &mut buf, conn, max).await?;
    let database = startup
        .get("database")
        .or(startup.get("user"))
        .unwrap_or("");
    conn.name = Some(database.to_string());
    // Recorded as the application and the declared intent: through the detectors.
    conn.application = startup
        .get("application_name")
        .filter(|a| !a.is_empty())
        .map(|a| ctx.core.scrub(a));

    // The token is a bearer credential: never ask for it over cleartext unless allowed.
    if !conn.client_tls && !ctx.config.allow_cleartext_token {
        return Err(deny(
            "28000",
            "TLS is required: the password is an access token; connect with sslmode=require",
        ));
    }
    send_all(stream, &messages::auth_request(3, &[]))
        .await
        .map_err(|_| Refusal::Quiet)?;
    let token = read_password(stream, &mut buf, max).await?;
    let mut principal = authenticate(ctx, &token).await?;
    drop(preauth);
    principal.intent = conn.application.clone();
    let principal = Arc::new(principal);
    let denied = |sqlstate, message: String| Refusal::Deny {
        sqlstate,
        message,
        outcome: Outcome::Denied,
        principal: Some(principal.clone()),
    };
    let Some(target) = ctx.targets.get(database).cloned() else {
        return Err(denied(
            "3D000",
            format!("no connection named {database:?} on this gateway"),
        ));
    };
    conn.target = Some(target.display.clone());
    if !target.config.config.allow.admits(&principal) {
        return Err(denied(
            "28000",
            format!(
                "{} is not allowed to use connection {database:?}",
                principal.subject
            ),
        ));
    }
    let options = target_options(ctx, &startup).map_err(|(sqlstate, m)| denied(sqlstate, m))?;
    let backend = open_target(&target, &startup, &options, database, &principal).await?;
    let conn = Arc::new(conn.clone());
    let session = Session {
        id: id.to_string(),
        principal: principal.clone(),
        conn: conn.clone(),
        started: Instant::now(),
        read_only: target.config.config.read_only,
        recorded: std::sync::RwLock::new(Parties::new(principal.clone(), conn.clone())),
        trace: tracing::Span::current(),
    };
    // The session is on record before the client may send its first statement.
    let mut body = session.body(&ctx.core.audit, Kind::SessionStart);
    body.outcome = Some(Outcome::Success);
    ctx.core
        .audit
        .append(&body)
        .await
        .map_err(|e| Refusal::Deny {
            sqlstate: "58030",
            message: format!("the gateway cannot record this session: {e}"),
            outcome: Outcome::Error,
            principal: Some(principal.clone()),
        })?;
    tracing::info!(subject = %principal.subject, connection = %database, "session started");
    let (backend_pid, backend_secret) = backend.key.unwrap_or((0, 0));
    let (key, cancel_guard) = ctx.cancels.register(CancelEntry {
        target: target.clone(),
        backend_pid,
        backend_secret,
        session: id.to_string(),
    });
    send_all(stream, &welcome(&backend.parameters, key))
        .await
        .map_err(|_| Refusal::Quiet)?;
    Ok(relay::Established {
        session,
        client_buf: buf,
        backend,
        expires: ctx.core.verifier.session_deadline(&principal),
        _cancel_guard: cancel_guard,
    })
}

/// The token's principal; a token that does not verify is refused (`28000` when the provider
/// cannot be reached, else `28P01`).
async fn authenticate(ctx: &PgContext, token: &str) -> Result<Principal, Refusal> {
    ctx.core.verifier.verify(token).await.map_err(|e| {
        let code = if e == crate::core::identity::TokenError::ProviderUnavailable {
            "28000"
        } else {
            "28P01"
        };
        deny(code, format!("authentication failed: {e}"))
    })
}

/// What an authenticated client is told: authentication ok, the target's parameters, the
/// gateway's cancel key, ready.
fn welcome(parameters: &[Bytes], key: (i32, i32)) -> BytesMut {
    let mut hello = BytesMut::new();
    hello.extend_from_slice(&messages::auth_request(0, &[]));
    for p in parameters {
        hello.extend_from_slice(p);
    }
    hello.extend_from_slice(&messages::backend_key_data(key.0, key.1));
    hello.extend_from_slice(&messages::ready_for_query(b'I'));
    hello
}

/// What the target is told at startup besides the gateway's own parameters: `options` with
/// only the settings on the policy's allow-list (they can change how the target behaves for the
/// whole session, `-c role=…`), never a client encoding or `standard_conforming_strings` (the
/// gateway fixes them). A replication connection is refused. `Err`: the SQLSTATE and message of
/// the refusal.
fn target_options(ctx: &PgContext, startup: &Startup) -> Result<String, (&'static str, String)> {
    let blocked = |e: String| {
        (
            "42501",
            format!("blocked by Vigil policy (rule startup-options): {e}"),
        )
    };
    let mut options = crate::policy::startup_settings(startup.get("options").unwrap_or(""))
        .map_err(|e| blocked(e.to_string()))?;
    take_target_settings(startup, &mut options).map_err(|e| ("22023", e.to_string()))?;
    if let Some((name, _)) = options
        .iter()
        .find(|(name, _)| !ctx.policy.allowed_startup_setting(name))
    {
        return Err(blocked(format!(
            "the startup setting {name:?} is not allowed"
        )));
    }
    if startup
        .get("replication")
        .is_some_and(|r| r != "false" && r != "0" && r != "off")
    {
        return Err((
            "42501",
            "replication connections are not accepted by this gateway".into(),
        ));
    }
    Ok(options
        .iter()
        .map(|(n, v)| format!("-c {n}={v}"))
        .collect::<Vec<_>>()
        .join(" "))
}

/// The gateway's own login to the target for this session; the target must confirm the
/// settings the gateway reads statements with.
async fn open_target(
    target: &Target,
    startup: &Startup,
    options: &str,
    database: &str,
    principal: &Arc<Principal>,
) -> Result<Backend, Refusal> {
    let failed = |message: String| Refusal::Deny {
        sqlstate: "08001",
        message,
        outcome: Outcome::Error,
        principal: Some(principal.clone()),
    };
    let mut params: Vec<(&str, &str)> = startup
        .params
        .iter()
        .filter(|(k, _)| PASSED_PARAMS.contains(&k.as_str()))
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    params.extend(encoding::TARGET_SETTINGS);
    if !options.is_empty() {
        params.push(("options", options));
    }
    let backend = target.connect(&params).await.map_err(|e| {
        tracing::warn!(target = %target.display, error = %crate::error_chain(&e), "cannot open the target connection");
        // The cause (which may name the gateway's own login) goes to the node's log only.
        failed(format!("the gateway cannot open connection {database:?}; see the gateway log"))
    })?;
    for status in &backend.parameters {
        encoding::check_parameter_status(&status[5..]).map_err(|e| failed(e.to_string()))?;
    }
    Ok(backend)
}

/// Checks every `client_encoding` and `standard_conforming_strings` the client asked for:
/// startup parameters (whatever the case of the name: PostgreSQL reads them as setting names)
/// and settings in `options`, which are taken out of `options`. None of them reaches the
/// target, which always gets [`encoding::TARGET_SETTINGS`].
fn take_target_settings(
    startup: &Startup,
    options: &mut Vec<(String, String)>,
) -> Result<(), encoding::EncodingError> {
    startup
        .params
        .iter()
        .chain(options.iter())
        .try_for_each(|(name, value)| encoding::check_client_setting(name, value))?;
    options.retain(|(name, _)| !encoding::is_target_setting(name));
    Ok(())
}
