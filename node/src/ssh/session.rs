//! One client connection: authentication (a Vigil certificate or an OIDC token), the login to
//! the host, and the channel requests, each decided and recorded before the host sees it.

use super::ca::GATEWAY_ONLY;
use super::channel::{self, Chan, SessionScope};
use super::config::split_user;
use super::forward::{self, RemoteForwards};
use super::target::{Pinned, Target};
use super::SshContext;
use crate::audit::RecordingFile;
use crate::core::approvals;
use crate::core::identity::TokenError;
use crate::core::idle::Activity;
use crate::core::lifecycle::{end_after_grace, until, SessionGuard};
use crate::core::proxy_protocol::{self, Guarded, Origin};
use futures_util::task::AtomicWaker;
use russh::keys::ssh_key::certificate::CertType;
use russh::keys::Certificate;
use russh::server::{Auth, Msg, Session};
use russh::{client, Channel, ChannelId, MethodKind, MethodSet};
use std::collections::HashMap;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::task::{Context, Poll};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::OwnedSemaphorePermit;
use tracing::Instrument as _;
use vigil_proto::record::{Body, Connection, Kind, Outcome, Principal};

/// The certificate extension that carries the principal (JSON of the audit record's
/// `principal`), set by the certificate endpoint and trusted because the CA signed it.
pub const PRINCIPAL_EXTENSION: &str = "principal@vigil";

/// Runs one client connection until it ends.
pub async fn run(
    ctx: Arc<SshContext>,
    tcp: TcpStream,
    origin: Origin,
    preauth: OwnedSemaphorePermit,
    open: SessionGuard,
) {
    let id = crate::core::new_session_id();
    let span =
        crate::core::trace::session(super::PROTOCOL, &id, ctx.core.audit.node(), &origin.client);
    serve(ctx, tcp, origin, preauth, open, id, span.clone())
        .instrument(span)
        .await;
}

/// [`run`] inside the session's span (`trace`).
async fn serve(
    ctx: Arc<SshContext>,
    tcp: TcpStream,
    origin: Origin,
    preauth: OwnedSemaphorePermit,
    open: SessionGuard,
    id: String,
    trace: tracing::Span,
) {
    let auth_timeout = Duration::from_secs(ctx.config.auth_timeout_secs);
    let conn = Conn {
        open: Some(open),
        ctx: ctx.clone(),
        id,
        conn: origin.connection(super::PROTOCOL),
        principal: None,
        login: String::new(),
        target: String::new(),
        host: None,
        preauth: Some(preauth),
        recording: None,
        forwards: Arc::default(),
        channels: HashMap::new(),
        ptys: Default::default(),
        stmt: 0,
        end: None,
        authenticated: Arc::new(AtomicBool::new(false)),
        tried: false,
        refusals: 0,
        expires: None,
        ended_by: Arc::new(OnceLock::new()),
        sever: Arc::default(),
        activity: Arc::default(),
        ender: None,
        credential: None,
        trace,
    };
    let authenticated = conn.authenticated.clone();
    let sever = conn.sever.clone();
    // The identification exchange counts against the authentication time too: a client that
    // connects and says nothing must not hold a pre-authentication permit.
    let deadline = tokio::time::Instant::now() + auth_timeout;
    // The server speaks first in SSH: a PROXY header at the client's start is found as russh
    // reads it.
    let guarded = Guarded::new(tcp);
    let proxy_header = guarded.found();
    let stream = Severable {
        inner: guarded,
        sever: sever.clone(),
    };
    let started = tokio::time::timeout_at(
        deadline,
        russh::server::run_stream(ctx.russh.clone(), stream, conn),
    );
    let running = match started.await {
        Ok(Ok(r)) => r,
        Ok(Err(e)) => {
            match proxy_header.get() {
                Some(&version) => {
                    let message = proxy_protocol::refusal(version, &origin);
                    proxy_protocol::refuse(&ctx.core, super::PROTOCOL, origin, message);
                }
                None => tracing::debug!(error = %e, "ssh handshake failed"),
            }
            return;
        }
        Err(_) => {
            tracing::debug!("ssh client sent no identification in time");
            return;
        }
    };
    let handle = running.handle();
    // A client that has not authenticated in time is cut off (it holds a pre-auth permit).
    // russh ignores a disconnect asked for during its key exchange, which a client that
    // stops after its identification line keeps going for good: the connection is cut
    // [`DISCONNECT_GRACE`] later whatever russh did with the disconnect.
    let cut = sever.clone();
    let watchdog = tokio::spawn(async move {
        tokio::time::sleep_until(deadline).await;
        if !authenticated.load(Ordering::SeqCst) {
            cut.ending.notify_one();
            let _ = handle
                .disconnect(
                    russh::Disconnect::ByApplication,
                    "authentication did not finish in time".into(),
                    String::new(),
                )
                .await;
        }
    });
    tokio::pin!(running);
    let ended = tokio::select! {
        ended = &mut running => ended,
        () = async {
            sever.ending.notified().await;
            tokio::time::sleep(DISCONNECT_GRACE).await;
        } => {
            tracing::info!("the client did not take the gateway's disconnect; its connection is cut");
            sever.now();
            match tokio::time::timeout(DISCONNECT_GRACE, running).await {
                Ok(ended) => ended,
                Err(_) => {
                    tracing::warn!("the session's loop did not end once its connection was cut");
                    Ok(())
                }
            }
        }
    };
    if let Err(e) = ended {
        tracing::debug!(error = %e, "ssh session ended with an error");
    }
    watchdog.abort();
}

/// The client's connection, which the gateway can cut: once [`Sever::now`], its reads and
/// writes fail wherever the session's loop waits on them, the loop ends (the handler's drop
/// records the session's end) and the connection closes.
struct Severable<S> {
    inner: S,
    sever: Arc<Sever>,
}

/// Ending a session: the ender tells [`serve`] (`ending`), which cuts the connection
/// ([`Sever::now`]) if the session has not ended [`DISCONNECT_GRACE`] later.
pub(super) struct Sever {
    ending: tokio::sync::Notify,
    read: AtomicWaker,
    write: AtomicWaker,
    cut: tokio::sync::watch::Sender<bool>,
}

impl Default for Sever {
    fn default() -> Self {
        Self {
            ending: Default::default(),
            read: Default::default(),
            write: Default::default(),
            cut: tokio::sync::watch::Sender::new(false),
        }
    }
}

impl Sever {
    fn now(&self) {
        self.cut.send_replace(true);
        self.read.wake();
        self.write.wake();
    }

    /// Resolves once the connection is cut: the session's handler must not wait past that
    /// (russh runs it in the session's loop, which must get back to its failing stream).
    pub(super) async fn cut(&self) {
        let _ = self.cut.subscribe().wait_for(|cut| *cut).await;
    }

    /// The error that ends the stream once cut; registers `cx` with `waker` to learn of it.
    fn check(&self, waker: &AtomicWaker, cx: &Context<'_>) -> Option<std::io::Error> {
        waker.register(cx.waker());
        self.cut.borrow().then(|| {
            std::io::Error::new(
                std::io::ErrorKind::ConnectionAborted,
                "the gateway ended the session",
            )
        })
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Severable<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        if let Some(e) = this.sever.check(&this.sever.read, cx) {
            return Poll::Ready(Err(e));
        }
        Pin::new(&mut this.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Severable<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        if let Some(e) = this.sever.check(&this.sever.write, cx) {
            return Poll::Ready(Err(e));
        }
        Pin::new(&mut this.inner).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        if let Some(e) = this.sever.check(&this.sever.write, cx) {
            return Poll::Ready(Err(e));
        }
        Pin::new(&mut this.inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

/// How long a session the gateway ends is given to take the disconnect message. russh sends
/// it from the session's loop, which takes nothing from the gateway's side while a channel's
/// data waits for the client's window: a client that stops reading would keep its session
/// (and its host channels) past its token's expiry, its idleness or the node's drain.
const DISCONNECT_GRACE: Duration = Duration::from_secs(5);

/// Why the gateway ended a session.
#[derive(Clone, Copy, Debug)]
pub(super) struct Ended {
    /// The `session_end` record's detail.
    detail: &'static str,
    /// What the client is told as it is disconnected.
    message: &'static str,
    /// Why a request held for approval stopped waiting (its `approval_decided` record).
    pub held: &'static str,
}

impl Ended {
    const TOKEN_EXPIRED: Self = Self {
        detail: "the session's token expired",
        message: "vigil: the session's token expired; log in again",
        held: approvals::TOKEN_EXPIRED,
    };
    /// A session waiting for an approver is not idle: a held request never sees this one.
    const IDLE: Self = Self {
        detail: "the session was idle for ssh.idle_timeout_secs",
        message: "vigil: the session was idle for too long; reconnect to continue",
        held: "the session was idle for ssh.idle_timeout_secs while it was held",
    };
    const NODE_ENDING: Self = Self {
        detail: "the gateway node shut down (drain deadline)",
        message: "vigil: this gateway node is shutting down; reconnect to continue",
        held: approvals::NODE_ENDING,
    };
}

/// The state of one client connection (russh's handler).
pub(super) struct Conn {
    pub ctx: Arc<SshContext>,
    pub id: String,
    pub conn: Connection,
    pub principal: Option<Arc<Principal>>,
    /// The login on the host.
    pub login: String,
    /// The configured name of the host (rules' `connections`, approval scopes).
    pub target: String,
    pub host: Option<Arc<client::Handle<Pinned>>>,
    preauth: Option<OwnedSemaphorePermit>,
    pub recording: Option<Arc<RecordingFile>>,
    /// The remote forwards the host listens on for this client.
    pub forwards: Arc<RemoteForwards>,
    pub channels: HashMap<ChannelId, Chan>,
    /// Channels with a terminal (the host granted `pty-req`).
    pub ptys: std::collections::HashSet<ChannelId>,
    /// Requests so far: each channel request that runs something gets the next number.
    pub stmt: u64,
    /// The session's end record, once it started (authenticated, host logged in, on record).
    pub(super) end: Option<Arc<SessionEnd>>,
    /// Counts the connection for the node's drain; handed to `end` once the session starts.
    open: Option<SessionGuard>,
    /// Set once the client is in (the authentication watchdog stands down).
    authenticated: Arc<AtomicBool>,
    /// The client asked to authenticate (a connection that only exchanged keys, like
    /// `ssh-keyscan`, leaves no record).
    tried: bool,
    /// Time left before the session must end with its token (`identity.session_expiry`).
    expires: Option<Duration>,
    /// Why the gateway ended the session (its token expired, it was idle, the node shut down),
    /// if it did.
    pub(super) ended_by: Arc<OnceLock<Ended>>,
    /// Told when the gateway ends the session: past [`DISCONNECT_GRACE`] the connection is
    /// closed whether the disconnect went out or not.
    pub(super) sever: Arc<Sever>,
    /// When something last happened in the session (`ssh.idle_timeout_secs`).
    pub activity: Arc<Activity>,
    /// Ends the session when its token expires, when it has been idle for
    /// `ssh.idle_timeout_secs`, or when the node's drain deadline passes.
    ender: Option<tokio::task::JoinHandle<()>>,
    /// Refused logins on record.
    refusals: u32,
    /// The certificate of the login being tried (serial, key id, key), for its
    /// `session_start`: an auditor can tie the session to the certificate's issue record.
    credential: Option<String>,
    /// The session's trace span (core/trace.rs): russh runs the handler on its own task, so
    /// statements' spans name it as their parent explicitly.
    pub trace: tracing::Span,
}

impl Conn {
    /// A record of this session, with its principal and connection.
    pub fn body(&self, kind: Kind) -> Body {
        SessionScope::of(self).body(kind)
    }

    /// The trace span of request `stmt` of this session.
    pub fn statement_span(&self, stmt: u64) -> tracing::Span {
        crate::core::trace::statement(&self.trace, super::PROTOCOL, &self.id, stmt)
    }

    /// Records a refused login and answers it.
    fn deny(&mut self, principal: Option<Arc<Principal>>, outcome: Outcome, why: String) -> Auth {
        let why = self.ctx.core.scrub(&why);
        tracing::info!(reason = %why, "ssh login refused");
        self.ctx
            .core
            .metrics
            .sessions
            .get_or_create(&crate::core::metrics::OutcomeLabel::of(outcome))
            .inc();
        let mut body = self.body(Kind::SessionStart);
        body.principal = principal;
        body.outcome = Some(outcome);
        body.detail = Some(match self.credential.take() {
            Some(c) => format!("{why} ({c})"),
            None => why,
        });
        self.ctx.core.audit.record(body);
        self.refusals += 1;
        Auth::reject()
    }

    /// The principal a certificate carries, if Vigil's CA signed it for a user, it is valid
    /// now, and its only critical option is [`GATEWAY_ONLY`] (which every certificate Vigil
    /// issues carries; an unknown one must refuse).
    fn certificate_principal(&self, cert: &Certificate) -> Result<Principal, String> {
        let ca = self
            .ctx
            .user_ca
            .as_ref()
            .ok_or("this gateway accepts no certificates")?;
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let signer = cert.signature_key().fingerprint(Default::default());
        if &signer != ca {
            return Err(format!(
                "certificate refused: signed by {signer}, not by this gateway's user CA"
            ));
        }
        cert.validate_at(now, [ca])
            .map_err(|e| format!("certificate refused: {e}"))?;
        if cert.cert_type() != CertType::User {
            return Err("certificate refused: not a user certificate".into());
        }
        let options = cert.critical_options();
        if let Some((name, _)) = options.iter().find(|(name, _)| *name != GATEWAY_ONLY) {
            return Err(format!(
                "certificate refused: unknown critical option {name:?}"
            ));
        }
        if !options.contains_key(GATEWAY_ONLY) {
            return Err(format!(
                "certificate refused: it lacks the critical option {GATEWAY_ONLY} of every \
                 certificate Vigil issues"
            ));
        }
        let json = cert
            .extensions()
            .get(PRINCIPAL_EXTENSION)
            .ok_or("certificate refused: it names no Vigil principal")?;
        let mut principal: Principal = serde_json::from_str(json)
            .map_err(|e| format!("certificate refused: bad principal extension: {e}"))?;
        // The session lasts no longer than the certificate, nor than the token it names.
        let cert_end = (cert.valid_before() != u64::MAX).then_some(cert.valid_before());
        principal.token_exp = match (principal.token_exp, cert_end) {
            (Some(t), Some(c)) => Some(t.min(c)),
            (t, c) => t.or(c),
        };
        if principal.token_exp.is_none() {
            return Err("certificate refused: it never expires and names no token expiry".into());
        }
        if !cert.valid_principals().contains(&principal.subject) {
            return Err("certificate refused: its principals do not name its subject".into());
        }
        Ok(principal)
    }

    /// A verified principal asks for `user` (`LOGIN+TARGET`): the host must exist and admit
    /// them and the login, and the gateway must log in to it and put the session on record.
    async fn admit(&mut self, user: &str, principal: Principal) -> Auth {
        let principal = Arc::new(principal);
        self.conn.name = Some(self.ctx.core.scrub(user));
        let p = Some(principal.clone());
        let Some((login, name)) = split_user(user) else {
            return self.deny(
                p,
                Outcome::Denied,
                format!("the user name must be LOGIN+TARGET (got {user:?})"),
            );
        };
        let Some(target) = self.ctx.targets.get(name).cloned() else {
            return self.deny(
                p,
                Outcome::Denied,
                format!("no host named {name:?} on this gateway"),
            );
        };
        self.conn.target = Some(target.config.address.clone());
        if !target.config.allow.admits(&principal) {
            let why = format!("{} may not use host {name:?}", principal.subject);
            return self.deny(p, Outcome::Denied, why);
        }
        if !target.config.allows_login(login) {
            let why = format!("login {login:?} on host {name:?} is not allowed");
            return self.deny(p, Outcome::Denied, why);
        }
        self.log_in(&target, login, principal).await
    }

    async fn log_in(&mut self, target: &Target, login: &str, principal: Arc<Principal>) -> Auth {
        let p = Some(principal.clone());
        let host = match target.connect(login, self.forwards.clone()).await {
            Ok(h) => h,
            Err(e) => return self.deny(p, Outcome::Error, e.to_string()),
        };
        let recording = match self.ctx.core.audit.recording_file(&self.id).await {
            Ok(f) => f,
            Err(e) => {
                return self.deny(
                    p,
                    Outcome::Error,
                    format!("the gateway cannot record this session: {e}"),
                )
            }
        };
        self.principal = Some(principal.clone());
        self.login = login.to_string();
        self.target = target.config.name.clone();
        let mut body = self.body(Kind::SessionStart);
        body.outcome = Some(Outcome::Success);
        body.detail = self.credential.take();
        if let Err(e) = self.ctx.core.audit.append(&body).await {
            self.principal = None;
            return self.deny(
                p,
                Outcome::Error,
                format!("the gateway cannot record this session: {e}"),
            );
        }
        tracing::info!(subject = %principal.subject, target = ?self.conn.name, "ssh session started");
        crate::core::trace::authenticated(&self.trace, &principal.subject, Some(&self.target));
        self.ctx
            .core
            .metrics
            .sessions
            .get_or_create(&crate::core::metrics::OutcomeLabel::of(Outcome::Success))
            .inc();
        self.ctx.core.metrics.active_sessions.inc();
        self.host = Some(Arc::new(host));
        self.recording = Some(recording);
        self.end = Some(Arc::new(SessionEnd {
            scope: SessionScope::of(self),
            started: Instant::now(),
            ended_by: self.ended_by.clone(),
            open: Mutex::new(self.open.take()),
        }));
        self.expires = self.ctx.core.verifier.session_remaining(&principal);
        self.authenticated.store(true, Ordering::SeqCst);
        Auth::Accept
    }

    async fn verify_token(&mut self, user: &str, token: &str) -> Auth {
        match self.ctx.core.verifier.verify(token).await {
            Ok(principal) => self.admit(user, principal).await,
            Err(e) => {
                let outcome = if e == TokenError::ProviderUnavailable {
                    Outcome::Error
                } else {
                    Outcome::Denied
                };
                self.conn.name = Some(self.ctx.core.scrub(user));
                self.deny(None, outcome, format!("authentication failed: {e}"))
            }
        }
    }
}

/// The note of a `session_end` written while a channel's task still waited on the host.
const STILL_RUNNING: &str =
    "written when the grace after the connection closed was over, while a channel still waited on the host";

/// Writes a session's `session_end` when the last part of the session that writes records is
/// gone: the connection and every task of its channels hold it, so a held request's decision
/// or a channel's last chunk, written after the client left, still comes before the end. A
/// task that still waits on the host [`END_GRACE`](crate::core::lifecycle::END_GRACE) after the connection closed (a command
/// that does not read its input, a host that does not answer) does not hold the end longer:
/// it is written then, saying so (see [`Conn`]'s drop).
pub(super) struct SessionEnd {
    /// The session's scope (without an end of its own).
    scope: SessionScope,
    started: Instant,
    ended_by: Arc<OnceLock<Ended>>,
    /// Counts the session for the node's drain until its end is on record; `None` once it is.
    open: Mutex<Option<SessionGuard>>,
}

impl SessionEnd {
    /// Writes the record, once; `still`: what of the session still ran then.
    fn write(&self, still: Option<&str>) {
        let Some(open) = self.open.lock().unwrap_or_else(|e| e.into_inner()).take() else {
            return;
        };
        let core = &self.scope.core;
        core.metrics.active_sessions.dec();
        let mut body = self.scope.body(Kind::SessionEnd);
        body.duration_us = Some(self.started.elapsed().as_micros() as u64);
        let ended = self.ended_by.get().map(|e| e.detail);
        body.detail = match (ended, still) {
            (Some(e), Some(s)) => Some(format!("{e}; {s}")),
            (e, s) => e.or(s).map(str::to_string),
        };
        core.audit.record(body);
        drop(open);
    }
}

impl Drop for SessionEnd {
    fn drop(&mut self) {
        self.write(None);
    }
}

impl Drop for Conn {
    fn drop(&mut self) {
        if let Some(ender) = self.ender.take() {
            ender.abort();
        }
        if let Some(end) = self.end.take() {
            end_after_grace(end, |end| end.write(Some(STILL_RUNNING)));
        } else if self.tried && self.refusals == 0 {
            // russh refuses some credentials before the gateway sees them: an expired or
            // not yet valid certificate, a certificate or key whose signature does not verify.
            self.deny(
                None,
                Outcome::Denied,
                "authentication failed: the client offered no credential the gateway accepts (an expired or not yet valid certificate, or a bad signature, is refused before it is read)".into(),
            );
        }
    }
}

/// Keyboard-interactive (a token), and public keys (certificates) when there is a CA.
pub(super) fn methods(certificates: bool) -> MethodSet {
    let mut m = MethodSet::empty();
    m.push(MethodKind::KeyboardInteractive);
    if certificates {
        m.push(MethodKind::PublicKey);
    }
    m
}

impl russh::server::Handler for Conn {
    type Error = russh::Error;

    async fn auth_none(&mut self, user: &str) -> Result<Auth, Self::Error> {
        self.tried = true;
        self.conn.name = Some(self.ctx.core.scrub(user));
        Ok(Auth::Reject {
            proceed_with_methods: Some(methods(self.ctx.user_ca.is_some())),
            partial_success: false,
        })
    }

    async fn auth_keyboard_interactive<'a>(
        &'a mut self,
        user: &str,
        _submethods: &str,
        response: Option<russh::server::Response<'a>>,
    ) -> Result<Auth, Self::Error> {
        let Some(mut answers) = response else {
            return Ok(Auth::Partial {
                name: "Vigil".into(),
                instructions: "Answer with a Vigil access token (OIDC).".into(),
                prompts: vec![("Token: ".into(), false)].into(),
            });
        };
        let token = answers.next().unwrap_or_default();
        let Ok(token) = std::str::from_utf8(&token) else {
            return Ok(self.deny(None, Outcome::Denied, "the token is not UTF-8".into()));
        };
        let token = token.trim().to_string();
        Ok(self.verify_token(user, &token).await)
    }

    async fn auth_openssh_certificate(
        &mut self,
        user: &str,
        certificate: &Certificate,
    ) -> Result<Auth, Self::Error> {
        let key = certificate.public_key().fingerprint(Default::default());
        self.credential = Some(self.ctx.core.scrub(&format!(
            "certificate serial {} key id {:?} key {key}",
            certificate.serial(),
            certificate.key_id()
        )));
        match self.certificate_principal(certificate) {
            Ok(principal) => Ok(self.admit(user, principal).await),
            Err(why) => {
                self.conn.name = Some(self.ctx.core.scrub(user));
                Ok(self.deny(None, Outcome::Denied, why))
            }
        }
    }

    /// The client is in: its pre-authentication permit goes back, connections on its remote
    /// forwards can reach it, and the session is ended when its token expires
    /// (`identity.session_expiry`) or at the node's drain deadline, like a PostgreSQL session,
    /// or when it has been idle for `ssh.idle_timeout_secs`.
    async fn auth_succeeded(&mut self, session: &mut Session) -> Result<(), Self::Error> {
        self.preauth = None;
        let scope = SessionScope::of(self);
        self.forwards
            .begin(scope, session.handle(), self.login.clone());
        let (handle, ended_by, sever) =
            (session.handle(), self.ended_by.clone(), self.sever.clone());
        let lifecycle = self.ctx.core.lifecycle.clone();
        let expires = self.expires.map(|left| tokio::time::Instant::now() + left);
        let (activity, idle) = (
            self.activity.clone(),
            Duration::from_secs(self.ctx.config.idle_timeout_secs),
        );
        activity.touch();
        self.ender = Some(tokio::spawn(async move {
            let ended = tokio::select! {
                () = until(expires) => Ended::TOKEN_EXPIRED,
                () = activity.idle_for(idle) => Ended::IDLE,
                () = lifecycle.ended() => Ended::NODE_ENDING,
            };
            // Before the connection ends: a request held meanwhile tells why its wait ended.
            let _ = ended_by.set(ended);
            sever.ending.notify_one();
            let _ = handle
                .disconnect(
                    russh::Disconnect::ByApplication,
                    ended.message.into(),
                    String::new(),
                )
                .await;
        }));
        Ok(())
    }

    async fn channel_open_session(
        &mut self,
        channel: Channel<Msg>,
        reply: russh::server::ChannelOpenHandle,
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        self.activity.touch();
        if channel::over_limit(self, channel.id(), "session") {
            reply
                .reject(russh::ChannelOpenFailure::ResourceShortage)
                .await;
            return Ok(());
        }
        self.channels.insert(channel.id(), Chan::default());
        reply.accept().await;
        Ok(())
    }

    async fn pty_request(
        &mut self,
        channel: ChannelId,
        term: &str,
        col_width: u32,
        row_height: u32,
        pix_width: u32,
        pix_height: u32,
        modes: &[(russh::Pty, u32)],
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        let pty = channel::Pty {
            term: term.to_string(),
            cols: col_width,
            rows: row_height,
            pix_width,
            pix_height,
            modes: modes.to_vec(),
        };
        channel::pty(self, channel, pty, session).await;
        Ok(())
    }

    async fn env_request(
        &mut self,
        channel: ChannelId,
        name: &str,
        value: &str,
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        channel::env(self, channel, name, value).await;
        Ok(())
    }

    async fn exec_request(
        &mut self,
        channel: ChannelId,
        data: &[u8],
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        channel::exec(self, channel, data, session).await;
        Ok(())
    }

    async fn shell_request(
        &mut self,
        channel: ChannelId,
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        channel::shell(self, channel, session).await;
        Ok(())
    }

    async fn subsystem_request(
        &mut self,
        channel: ChannelId,
        name: &str,
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        channel::subsystem(self, channel, name, session).await;
        Ok(())
    }

    async fn data(
        &mut self,
        channel: ChannelId,
        data: &[u8],
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        channel::input(self, channel, channel::Input::Data(data.to_vec())).await;
        Ok(())
    }

    async fn window_change_request(
        &mut self,
        channel: ChannelId,
        col_width: u32,
        row_height: u32,
        pix_width: u32,
        pix_height: u32,
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        let resize = channel::Input::Resize {
            cols: col_width,
            rows: row_height,
            pix_width,
            pix_height,
        };
        channel::input(self, channel, resize).await;
        Ok(())
    }

    async fn signal(
        &mut self,
        channel: ChannelId,
        signal: russh::Sig,
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        channel::input(self, channel, channel::Input::Signal(signal)).await;
        Ok(())
    }

    async fn channel_eof(
        &mut self,
        channel: ChannelId,
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        channel::input(self, channel, channel::Input::Eof).await;
        Ok(())
    }

    async fn channel_close(
        &mut self,
        channel: ChannelId,
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        channel::input(self, channel, channel::Input::Close).await;
        self.channels.remove(&channel);
        Ok(())
    }

    async fn x11_request(
        &mut self,
        channel: ChannelId,
        _single_connection: bool,
        _x11_auth_protocol: &str,
        _x11_auth_cookie: &str,
        _x11_screen_number: u32,
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        if channel::busy(self, channel, "x11-req", None, session) {
            return Ok(());
        }
        channel::refuse_request(
            self,
            channel,
            "x11-req",
            None,
            "X11 forwarding is not allowed",
        );
        session.channel_failure(channel)?;
        Ok(())
    }

    async fn agent_request(
        &mut self,
        channel: ChannelId,
        session: &mut Session,
    ) -> Result<bool, Self::Error> {
        if channel::busy(self, channel, "auth-agent-req@openssh.com", None, session) {
            return Ok(false);
        }
        channel::refuse_request(
            self,
            channel,
            "auth-agent-req@openssh.com",
            None,
            "agent forwarding is not allowed",
        );
        Ok(false)
    }

    async fn channel_open_direct_tcpip(
        &mut self,
        channel: Channel<Msg>,
        host_to_connect: &str,
        port_to_connect: u32,
        _originator_address: &str,
        _originator_port: u32,
        reply: russh::server::ChannelOpenHandle,
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        self.activity.touch();
        let (host, port) = (host_to_connect, port_to_connect);
        forward::direct_tcpip(self, channel, host, port, reply, session).await;
        Ok(())
    }

    async fn tcpip_forward(
        &mut self,
        address: &str,
        port: &mut u32,
        _session: &mut Session,
    ) -> Result<bool, Self::Error> {
        Ok(forward::tcpip_forward(self, address, port).await)
    }

    async fn cancel_tcpip_forward(
        &mut self,
        address: &str,
        port: u32,
        _session: &mut Session,
    ) -> Result<bool, Self::Error> {
        Ok(forward::cancel_tcpip_forward(self, address, port).await)
    }
}
