//! Channels: requests decided by policy and forwarded to the host in order (so each reply the
//! client gets is the host's own, in its turn). The request that runs something goes on in a
//! task of the channel's own (an approval's wait must not stop the connection), then, once
//! something runs, two tasks per channel: input (client → host) recorded before the host sees
//! it, output (host → client) recorded before the client sees it.

use super::command::{self, CommandLine, SimpleCommand};
use super::session::{Conn, Ended, SessionEnd};
use super::sftp::SftpOperation;
use super::sftp_guard::SftpGuard;
use super::target::Pinned;
use super::typed::{Decided, Echoes, TypedLines};
use crate::audit::{ChunkOf, RecordingFile};
use crate::core::approvals::{Hold, Step, Verdict, APPROVED_TOO_LATE, CLIENT_LEFT};
use crate::core::idle::Activity;
use crate::core::trace::Stmt;
use crate::core::Refusal;
use crate::policy::ssh::{SshAction, SshRequestKind};
use crate::policy::{gateway_block, with_note, Action, Decision};
use russh::server::Session;
use russh::{client, ChannelId, ChannelMsg, Sig};
use sha2::{Digest, Sha256};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Instant;
use tokio::sync::{mpsc, oneshot, watch};
use tracing::Instrument as _;
use vigil_coordinator::approvals::{ActionKey, Scope};
use vigil_proto::coordinator as pb;
use vigil_proto::record::{
    Body, Connection, Kind, Outcome, PolicyRef, Principal, Request, Response, SshError, SshRequest,
    SshResponse,
};

/// Exit status of a command the gateway refused (as a shell's "cannot execute").
pub const REFUSED_EXIT_STATUS: u32 = 126;

/// How long the host's EOF is held back waiting for the exit status. sshd often sends EOF
/// (the command's output closed) just before the exit status; an OpenSSH client that has sent
/// its own EOF closes the channel as soon as it sees ours, and the exit status relayed a moment
/// later would be lost (the client's `ssh` then exits 255). Passing the exit status first is
/// what sshd itself does when the timing falls that way.
const EOF_HOLD: std::time::Duration = std::time::Duration::from_millis(250);

/// Input messages a running channel may queue before the client is slowed down.
pub(super) const INPUT_QUEUE: usize = 64;

/// The most client input a held request keeps for when it runs (see [`ClientInput::keep`]);
/// each message counts 64 bytes more than its data.
pub(super) const MAX_HELD_INPUT: usize = 1 << 20;

/// The most client input all held requests of the node keep at once: with `ssh.max_channels`
/// per connection, connections are what bounds the rest.
pub(super) const MAX_NODE_HELD_INPUT: usize = 64 << 20;

/// Why a held request's wait ended when its client sent more than [`MAX_HELD_INPUT`].
const HELD_INPUT_OVER: &str = "the client sent more than 1 MiB of input while it was held";

/// Why a held request's wait ended when the node held [`MAX_NODE_HELD_INPUT`] of input.
const NODE_HELD_INPUT_OVER: &str =
    "the node holds 64 MiB of input for held requests: the client sent more while it was held";

/// The client's input to a channel: what came while its request was held, then what the
/// connection's handler queues.
pub(super) struct ClientInput {
    kept: std::collections::VecDeque<Input>,
    kept_bytes: usize,
    rx: mpsc::Receiver<Input>,
    /// The node's count of kept input (`SshContext::held_input`), of which `kept_bytes` is
    /// this channel's share until it is read or let go of.
    node_kept: Option<Arc<AtomicUsize>>,
}

/// What a kept input counts against the bounds: 64 bytes more than its data.
fn kept_cost(input: &Input) -> usize {
    64 + match input {
        Input::Data(data) => data.len(),
        _ => 0,
    }
}

impl ClientInput {
    pub(super) fn new(rx: mpsc::Receiver<Input>) -> Self {
        Self {
            kept: Default::default(),
            kept_bytes: 0,
            rx,
            node_kept: None,
        }
    }

    /// An input that may be held, its kept bytes counted in `node_kept` too.
    fn counted(rx: mpsc::Receiver<Input>, node_kept: Arc<AtomicUsize>) -> Self {
        let mut input = Self::new(rx);
        input.node_kept = Some(node_kept);
        input
    }

    /// The next input, what was kept first; `None` once the handler has let go of the channel.
    async fn recv(&mut self) -> Option<Input> {
        match self.kept.pop_front() {
            Some(input) => {
                self.release(kept_cost(&input));
                Some(input)
            }
            None => self.rx.recv().await,
        }
    }

    fn release(&mut self, cost: usize) {
        self.kept_bytes -= cost;
        if let Some(node) = &self.node_kept {
            node.fetch_sub(cost, Ordering::Relaxed);
        }
    }

    /// Takes what the client sends while its request is held, for when it runs: the handler
    /// waits for room in the queue, and russh's handler is the whole connection's, so a
    /// queue left full would stop every channel of the connection (keepalives included) for
    /// as long as the wait. Resolves, saying why, once more than [`MAX_HELD_INPUT`] came, or
    /// the node keeps more than [`MAX_NODE_HELD_INPUT`] for all its held requests.
    async fn keep(&mut self) -> &'static str {
        while let Some(input) = self.rx.recv().await {
            let cost = kept_cost(&input);
            self.kept_bytes += cost;
            let node = self
                .node_kept
                .as_ref()
                .map_or(0, |n| n.fetch_add(cost, Ordering::Relaxed) + cost);
            self.kept.push_back(input);
            if self.kept_bytes > MAX_HELD_INPUT {
                return HELD_INPUT_OVER;
            }
            if node > MAX_NODE_HELD_INPUT {
                return NODE_HELD_INPUT_OVER;
            }
        }
        // The handler let go of the channel: the client's leaving ends the wait.
        std::future::pending().await
    }
}

impl Drop for ClientInput {
    fn drop(&mut self) {
        let rest = self.kept_bytes;
        self.release(rest);
    }
}

/// A client channel, as far as it got.
#[derive(Default)]
pub enum Chan {
    /// Opened; nothing asked of the host yet.
    #[default]
    Idle,
    /// The host's channel is open; requests that set it up (pty, env) went to it.
    Setup(russh::Channel<client::Msg>),
    /// Something runs, or is on its way (held for an approval, sent to the host): input
    /// goes to the channel's input task. Dropping `_left` (the client closed the channel, the
    /// connection ended) ends a wait for an approval.
    Running {
        input: mpsc::Sender<Input>,
        _left: Option<oneshot::Sender<()>>,
    },
    /// Refused or ended: further input is dropped.
    Done,
}

/// What a client sends on a running channel, in order.
pub enum Input {
    Data(Vec<u8>),
    Resize {
        cols: u32,
        rows: u32,
        pix_width: u32,
        pix_height: u32,
    },
    Signal(Sig),
    Eof,
    Close,
}

pub struct Pty {
    pub term: String,
    pub cols: u32,
    pub rows: u32,
    pub pix_width: u32,
    pub pix_height: u32,
    pub modes: Vec<(russh::Pty, u32)>,
}

/// The host channel behind client channel `id`, opened on first use; `None` when the channel
/// already runs something or the host refused to open one.
async fn host_channel(conn: &mut Conn, id: ChannelId) -> Option<&mut russh::Channel<client::Msg>> {
    let host = conn.host.clone()?;
    let slot = conn.channels.get_mut(&id)?;
    if matches!(slot, Chan::Idle) {
        match open_host_channel(&host).await {
            Some(c) => *slot = Chan::Setup(c),
            None => {
                *slot = Chan::Done;
                return None;
            }
        }
    }
    match slot {
        Chan::Setup(c) => Some(c),
        _ => None,
    }
}

/// A new session channel on the host; `None` when the host refuses it.
async fn open_host_channel(host: &client::Handle<Pinned>) -> Option<russh::Channel<client::Msg>> {
    host.channel_open_session()
        .await
        .inspect_err(|e| tracing::warn!(error = %e, "the host refused a session channel"))
        .ok()
}

/// Waits for the host's answer to the request just sent on `host`.
async fn host_reply(host: &mut russh::Channel<client::Msg>) -> bool {
    loop {
        match host.wait().await {
            Some(ChannelMsg::Success) => return true,
            Some(ChannelMsg::Failure) | Some(ChannelMsg::Close) | None => return false,
            Some(_) => continue,
        }
    }
}

/// `pty-req`: on record (a replay needs the terminal's size), then forwarded; the host's
/// answer is the client's.
pub async fn pty(conn: &mut Conn, id: ChannelId, pty: Pty, session: &mut Session) {
    if busy(conn, id, "pty-req", None, session) {
        return;
    }
    let mut body = conn.body(Kind::Request);
    body.request = Some(ssh_request(
        conn,
        id,
        "pty-req",
        Some(format!("{} {}x{}", pty.term, pty.cols, pty.rows)),
    ));
    let audit = conn.ctx.core.audit.clone();
    if audit.append(&body).await.is_err() {
        reply(session, id, false);
        return;
    }
    let ok = match host_channel(conn, id).await {
        Some(host) => {
            let sent = host
                .request_pty(
                    true,
                    &pty.term,
                    pty.cols,
                    pty.rows,
                    pty.pix_width,
                    pty.pix_height,
                    &pty.modes,
                )
                .await;
            sent.is_ok() && host_reply(host).await
        }
        None => false,
    };
    if ok {
        conn.ptys.insert(id);
    }
    reply(session, id, ok);
}

/// `env`: a variable on the allow-list is recorded (by name only: values may be secrets) and
/// passed to the host; others are refused and recorded. No reply either way: OpenSSH asks for none,
/// and a reply nobody waits for would be taken as the answer to a later request.
pub async fn env(conn: &mut Conn, id: ChannelId, name: &str, value: &str) {
    match conn.channels.get(&id) {
        Some(Chan::Idle | Chan::Setup(_)) => {}
        // What runs (or is held) has its environment already: the variable would reach
        // nothing, so it is on record as refused, not as passed (outside review, 2026-12-07).
        Some(Chan::Running { .. }) => {
            let why = "the channel already runs a request: a variable set now reaches nothing";
            refuse_request(conn, id, "env", Some(name), why);
            return;
        }
        Some(Chan::Done) | None => return,
    }
    let allowed = conn
        .ctx
        .config
        .allowed_env
        .iter()
        .any(|g| command::glob_match(g, name));
    if !allowed {
        refuse_request(
            conn,
            id,
            "env",
            Some(name),
            &format!("environment variable {name:?} is not on ssh.allowed_env"),
        );
        return;
    }
    let mut body = conn.body(Kind::Request);
    body.request = Some(ssh_request(conn, id, "env", Some(name.to_string())));
    if conn.ctx.core.audit.append(&body).await.is_err() {
        return;
    }
    if let Some(host) = host_channel(conn, id).await {
        let _ = host.set_env(false, name, value).await;
    }
}

/// `exec`: the command line is parsed and each command decided; `scp -t`/`-f` is decided on
/// its paths too; `sftp-server` run on its own is decided as `sftp` too and followed like the
/// `sftp` subsystem, anywhere else in a line it is refused (see [`sftp_server`]).
pub async fn exec(conn: &mut Conn, id: ChannelId, data: &[u8], session: &mut Session) {
    let Ok(line) = std::str::from_utf8(data) else {
        let why = "the command line is not UTF-8: it cannot be decided or shown faithfully";
        refuse_run(conn, id, "exec", None, why, session);
        return;
    };
    let parsed = command::parse(line);
    let login = conn.login.clone();
    let sftp = parsed
        .as_ref()
        .map_or(SftpServer::No, |p| sftp_server(line, p));
    let decision = {
        let actions = parsed
            .as_ref()
            .map(|p| {
                let mut actions = exec_actions(p, &login, line.trim().is_empty());
                if sftp == SftpServer::Alone {
                    actions.push(SshAction {
                        kind: SshRequestKind::Sftp,
                        login: &login,
                        command: None,
                        line: None,
                        path: None,
                        operation: None,
                    });
                }
                actions
            })
            .map_err(|e| format!("the command line does not parse: {e}"));
        let principal = conn.principal.clone().unwrap_or_default();
        let scp_paths_decided =
            conn.ctx
                .policy
                .names_paths(SshRequestKind::Scp, &principal, &conn.target);
        let scp = parsed.as_ref().ok().and_then(|p| {
            p.commands
                .iter()
                .filter(|c| scp_server(c))
                .find_map(scp_undecidable)
                .filter(|_| scp_paths_decided)
        });
        match (sftp, scp) {
            (SftpServer::Elsewhere, _) => gateway_block(
                "sftp-server",
                "sftp-server runs only alone on its line (a path and options), where the gateway follows its SFTP stream",
            ),
            (_, Some(why)) => gateway_block("scp-path", why),
            _ => decide(conn, actions.as_deref().map_err(Clone::clone)),
        }
    };
    let kind = match &parsed {
        Ok(p) if p.commands.iter().any(scp_server) => "scp",
        _ => "exec",
    };
    let request = Run {
        sftp: sftp == SftpServer::Alone,
        ..Run::new(kind, Some(line), decision)
    };
    run(conn, id, request, session).await;
}

/// How an exec line runs OpenSSH's `sftp-server` (`sftp -s /usr/lib/openssh/sftp-server`
/// sends its path as an exec), which speaks SFTP on the channel: every request inside would
/// reach the host undecided unless the gateway follows the stream as it follows the `sftp`
/// subsystem's.
#[derive(Clone, Copy, PartialEq, Eq)]
enum SftpServer {
    No,
    /// The line is that one command, its program and options in plain characters (no
    /// redirection, quote, expansion or assignment can hide in it): its channel carries the
    /// client's SFTP stream, which the gateway follows.
    Alone,
    /// Anywhere else (`sudo sftp-server`, `sftp-server < file`, `sh -c sftp-server`): the
    /// stream may not be the client's, or not on the channel, so it cannot be followed.
    Elsewhere,
}

/// See [`SftpServer`]; by the program's last component, so any copy of the program counts.
fn sftp_server(text: &str, line: &CommandLine) -> SftpServer {
    if !line
        .commands
        .iter()
        .any(|c| c.program_name() == "sftp-server")
    {
        return SftpServer::No;
    }
    let plain = text
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b"/._-, \t".contains(&b));
    if plain && line.commands.len() == 1 {
        SftpServer::Alone
    } else {
        SftpServer::Elsewhere
    }
}

/// The actions of an exec line: each command with the line's flags; for an `scp` in server
/// mode, the command and each of its paths as `scp`.
fn exec_actions<'a>(
    line: &'a CommandLine,
    login: &'a str,
    text_is_empty: bool,
) -> Vec<SshAction<'a>> {
    let mut actions: Vec<SshAction<'a>> = Vec::new();
    for c in &line.commands {
        let scp = scp_server(c);
        let kind = if scp {
            SshRequestKind::Scp
        } else {
            SshRequestKind::Exec
        };
        actions.push(SshAction {
            kind,
            login,
            command: Some(c),
            line: Some(line),
            path: None,
            operation: None,
        });
        // The operands (and, read as operands, the values of options such as `-l 100`: a
        // rule on paths sees more, never less).
        let paths = c.args.iter().filter(|a| scp && !a.starts_with('-'));
        actions.extend(paths.map(|p| SshAction {
            kind: SshRequestKind::Scp,
            login,
            command: Some(c),
            line: Some(line),
            path: Some(p),
            operation: None,
        }));
    }
    if actions.is_empty() {
        // No command: an empty line runs the login shell; a line of redirections and
        // assignments only (`> ~/.ssh/authorized_keys`) is an exec decided on its flags.
        let kind = if text_is_empty {
            SshRequestKind::Shell
        } else {
            SshRequestKind::Exec
        };
        actions.push(SshAction {
            kind,
            login,
            command: None,
            line: Some(line),
            path: None,
            operation: None,
        });
    }
    actions
}

/// Whether a command is `scp` in server mode, `-t` (upload) or `-f` (download), anywhere in
/// a line and however its options are written (`-dt`, `-rtp`, `-v -f`): an option word with a
/// `t` or `f` among its letters counts (one such as `-oStrictHostKeyChecking=no` too, which
/// errs on the side of deciding the paths).
fn scp_server(c: &SimpleCommand) -> bool {
    c.program_name() == "scp"
        && c.args.iter().any(|a| {
            a.strip_prefix('-')
                .is_some_and(|o| !o.starts_with('-') && o.contains(['t', 'f']))
        })
}

/// Why an `scp` in server mode cannot be decided on its paths (see [`exec`]: where a rule
/// names paths, it is then refused): it copies a tree (`-r`) or into a directory (`-d`), whose
/// names arrive inside the scp protocol, never seen by the rules; or a path is relative or
/// starts with `~` (the host resolves it against the login's home), is not in its plain
/// spelling (`//`, `.`, `..`: a rule names the plain one), or holds a glob or expansion
/// character (`*?[{$` or a backquote: the host's shell makes other paths of it).
fn scp_undecidable(c: &SimpleCommand) -> Option<&'static str> {
    let (options, paths): (Vec<&String>, Vec<&String>) =
        c.args.iter().partition(|a| a.starts_with('-'));
    let options = options.iter().filter(|o| !o.starts_with("--"));
    if options.into_iter().any(|o| o.contains(['r', 'd'])) {
        return Some("a recursive or directory scp (-r, -d) writes names the rules never see; copy single files, or use SFTP");
    }
    // Decided as written, so written as the host resolves it: no `//`, `.` or `..` (those
    // are another spelling of a path a rule names; a trailing `/` is kept by scp's target).
    let plain = |p: &str| {
        let p = p.strip_suffix('/').filter(|p| !p.is_empty()).unwrap_or(p);
        super::command::normalize_path(p).as_deref() == Some(p)
    };
    paths
        .iter()
        .any(|p| !plain(p) || p.contains(['*', '?', '[', '{', '$', '`']))
        .then_some("an scp path must be absolute and plain (no ~, //, . or .., glob or expansion): the host would make another path of it")
}

/// `shell`: allowed or refused as a whole (commands typed in it are recorded, not decided).
pub async fn shell(conn: &mut Conn, id: ChannelId, session: &mut Session) {
    let login = conn.login.clone();
    let action = SshAction {
        kind: SshRequestKind::Shell,
        login: &login,
        command: None,
        line: None,
        path: None,
        operation: None,
    };
    let decision = decide(conn, Ok(&[action]));
    run(conn, id, Run::new("shell", None, decision), session).await;
}

/// `subsystem`: `sftp`, or another subsystem, allowed or refused as a whole.
pub async fn subsystem(conn: &mut Conn, id: ChannelId, name: &str, session: &mut Session) {
    let login = conn.login.clone();
    let kind = if name == "sftp" {
        SshRequestKind::Sftp
    } else {
        SshRequestKind::Subsystem
    };
    let action = SshAction {
        kind,
        login: &login,
        command: None,
        line: None,
        path: None,
        operation: None,
    };
    let decision = decide(conn, Ok(&[action]));
    run(
        conn,
        id,
        Run::new("subsystem", Some(name), decision),
        session,
    )
    .await;
}

pub(super) fn decide(conn: &Conn, actions: Result<&[SshAction<'_>], String>) -> Decision {
    let principal = conn.principal.clone().unwrap_or_default();
    let target = &conn.target;
    conn.ctx.policy.decide_actions(actions, &principal, target)
}

/// A request that runs something on a channel, with its decision.
struct Run<'a> {
    request_type: &'a str,
    command: Option<&'a str>,
    decision: Decision,
    /// The channel carries SFTP (the `sftp` subsystem, or `sftp-server` as an exec): each
    /// request inside is decided ([`SftpGuard`]).
    sftp: bool,
}

impl<'a> Run<'a> {
    fn new(request_type: &'a str, command: Option<&'a str>, decision: Decision) -> Self {
        Self {
            request_type,
            command,
            decision,
            sftp: request_type == "subsystem" && command == Some("sftp"),
        }
    }
}

fn ssh_request(conn: &Conn, id: ChannelId, request_type: &str, command: Option<String>) -> Request {
    Request::Ssh(SshRequest {
        channel: id.number(),
        request_type: request_type.into(),
        command: command.map(|c| conn.ctx.core.scrub(&c)),
        login: Some(conn.login.clone()),
        ..SshRequest::default()
    })
}

/// Decides a request that runs something. A refusal is answered here; anything else goes on
/// in a task of its own ([`Starting::go`]): held for an approval, recorded and forwarded, so
/// that a request waiting for an approver does not stop the connection's other channels, and
/// the client closing the channel or the connection ends the wait.
async fn run(conn: &mut Conn, id: ChannelId, run: Run<'_>, session: &mut Session) {
    if busy(conn, id, run.request_type, run.command, session) {
        return;
    }
    conn.stmt += 1;
    let stmt = conn.stmt;
    let span = conn.statement_span(stmt);
    let policy = conn.ctx.policy.reference(&run.decision);
    let request = ssh_request(conn, id, run.request_type, run.command.map(str::to_string));
    let mut body = conn.body(Kind::Request);
    body.stmt = Some(stmt);
    body.request = Some(request.clone());
    body.policy = Some(policy.clone());
    body.detail = run.decision.dry_run_note();
    if run.decision.action == Action::Block {
        let why = run
            .decision
            .reason
            .clone()
            .unwrap_or_else(|| "the policy does not allow it".into());
        let refusal = Refusal::Blocked {
            rule: run.decision.rule.clone(),
            reason: why,
        };
        refuse(conn, id, body, &refusal, &span, session);
        return;
    }
    let host = match conn.channels.remove(&id) {
        Some(Chan::Setup(c)) => Some(c),
        _ => None,
    };
    let (input, rx) = mpsc::channel(INPUT_QUEUE);
    let (left, gone) = oneshot::channel();
    conn.channels.insert(
        id,
        Chan::Running {
            input,
            _left: Some(left),
        },
    );
    let starting = Starting {
        ctx: conn.ctx.clone(),
        host_conn: conn.host.clone(),
        host,
        login: conn.login.clone(),
        target: conn.target.clone(),
        recorder: Recorder::new(
            conn,
            id,
            Stmt {
                n: stmt,
                span: span.clone(),
            },
        ),
        client: session.handle(),
        typed: run.request_type == "shell" && conn.ptys.contains(&id),
        sftp: run.sftp,
        request_type: run.request_type.to_string(),
        command: run.command.map(str::to_string),
        decision: run.decision,
        policy,
        request,
        input: ClientInput::counted(rx, conn.ctx.held_input.clone()),
        gone,
        ended_by: conn.ended_by.clone(),
    };
    tokio::spawn(starting.go(body).instrument(span));
}

/// A request on its way to running (see [`run`]): what its task needs of the connection.
struct Starting {
    ctx: Arc<super::SshContext>,
    /// The connection to the host, and the host's channel when one is open already (pty, env).
    host_conn: Option<Arc<client::Handle<Pinned>>>,
    host: Option<russh::Channel<client::Msg>>,
    login: String,
    target: String,
    recorder: Recorder,
    client: russh::server::Handle,
    /// An interactive shell on a terminal: typed lines are recorded.
    typed: bool,
    /// The channel carries SFTP (see [`Run::sftp`]).
    sftp: bool,
    request_type: String,
    command: Option<String>,
    decision: Decision,
    policy: PolicyRef,
    request: Request,
    /// The client's input while the request is held or starts. The connection's handler may
    /// wait for room in it, so it is read, or let go of, before this task waits for the
    /// connection (a `Handle` send): else each would wait for the other.
    input: ClientInput,
    /// Resolves when the client closes the channel or the connection ends.
    gone: oneshot::Receiver<()>,
    /// Why the gateway ended the session, once it has: the connection then ends too.
    ended_by: Arc<OnceLock<Ended>>,
}

impl Starting {
    /// Runs the request whose record is `body` (written before the host sees the request).
    async fn go(mut self, mut body: Body) {
        // A client that has gone already is not waited for, and nothing runs for it.
        if self.left() {
            return;
        }
        if self.decision.action == Action::RequireApproval {
            let verdict = self.hold().await;
            // Its record says what happened after the wait, so it bears the time it ended.
            body.time = crate::audit::now_rfc3339();
            match verdict {
                Verdict::Run(approval) => body.approval = Some(approval),
                Verdict::Refuse { refusal, approval } => {
                    body.approval = approval;
                    self.refuse(body, &refusal).await;
                    return;
                }
            }
            // The approval came as the client left (a call to the coordinator under way is
            // finished first), or the session ended meanwhile: nothing runs for nobody, and
            // the approval used is on record as such.
            if self.left() {
                body.kind = Kind::Blocked;
                body.outcome = Some(Outcome::Error);
                body.detail = Some(with_note(APPROVED_TOO_LATE, body.detail.take()));
                self.ctx.core.audit.record(body);
                return;
            }
        }
        if let Err(e) = self.ctx.core.audit.append(&body).await {
            let refusal = Refusal::AuditUnwritable {
                spool_full: matches!(e, crate::audit::AuditError::SpoolFull { .. }),
                why: e.to_string(),
            };
            body.kind = Kind::Blocked;
            self.refuse(body, &refusal).await;
            return;
        }
        self.start().await;
    }

    /// Whether the client has closed the channel or the connection.
    fn left(&mut self) -> bool {
        !matches!(
            self.gone.try_recv(),
            Err(oneshot::error::TryRecvError::Empty)
        )
    }

    /// Holds the request for approval: bound to the protocol, the host, the login and the
    /// exact request. Only the wait for a decision ends when the client goes.
    async fn hold(&mut self) -> Verdict {
        // Waiting for an approver is not the session's idleness.
        let activity = self.recorder.scope.activity.clone();
        let _waiting = activity.waiting();
        let spec = match crate::core::approvals::spec_of(&self.decision) {
            Ok(s) => s,
            Err(refused) => return *refused,
        };
        let command = self.command.as_deref().unwrap_or("");
        let core = &self.ctx.core;
        if core.scrub(command) != command {
            return Verdict::Refuse {
                refusal: Refusal::Unbound {
                    rule: self.decision.rule.clone(),
                    why: "the command holds values the approver may not see; it cannot be shown faithfully".into(),
                },
                approval: None,
            };
        }
        let hash = action_hash(&self.login, &self.request_type, command);
        let mut record = Step::recorder(
            core.audit.clone(),
            self.recorder.scope.body(Kind::ApprovalRequested),
            self.recorder.stmt,
            self.request.clone(),
            self.policy.clone(),
        );
        let principal = self.recorder.scope.principal.clone().unwrap_or_default();
        let hold = Hold {
            principal: &principal,
            key: ActionKey {
                scope: Scope::new(super::PROTOCOL, &self.target),
                hash,
            },
            place: self
                .ctx
                .targets
                .get(&self.target)
                .map(|t| t.config.address.clone())
                .unwrap_or_default(),
            action: command,
            shown: pb::ShownAction {
                protocol: Some(pb::shown_action::Protocol::Ssh(pb::SshCommand {
                    login: self.login.clone(),
                    request_type: self.request_type.clone(),
                    command: command.into(),
                })),
            },
            rule: &self.decision.rule,
            reason: self.decision.reason.as_deref(),
            spec,
        };
        let (gone, input, ended_by) = (&mut self.gone, &mut self.input, &self.ended_by);
        // The connection ends when the client goes, and when the gateway ends the session (its
        // token expired, the node's drain deadline came), which says so first.
        let left = async move {
            tokio::select! {
                _ = gone => ended_by.get().map_or(CLIENT_LEFT, |e| e.held),
                over = input.keep() => over,
            }
        };
        core.approvals.settle(hold, &mut record, left).await
    }

    /// Sends the request to the host; with the host's yes the channel runs, with its no the
    /// client gets the host's refusal.
    async fn start(self) {
        let started = Instant::now();
        let id = self.recorder.channel;
        let mut host = match (self.host, &self.host_conn) {
            (Some(c), _) => Some(c),
            (None, Some(h)) => open_host_channel(h).await,
            (None, None) => None,
        };
        let accepted = match &mut host {
            Some(host) => {
                let sent = match (self.request_type.as_str(), self.command.as_deref()) {
                    ("exec" | "scp", Some(c)) => host.exec(true, c.as_bytes()).await,
                    ("subsystem", Some(name)) => host.request_subsystem(true, name).await,
                    _ => host.request_shell(true).await,
                };
                sent.is_ok() && host_reply(host).await
            }
            None => false,
        };
        let (true, Some(host)) = (accepted, host) else {
            drop(self.input);
            // Closed as well: a request the client sent meanwhile (a window-change) may have
            // taken the place of the one this failure answers (russh keeps one flag per channel).
            let _ = self.client.channel_failure(id).await;
            let _ = self.client.close(id).await;
            self.recorder.response(
                SshResponse {
                    channel: id.number(),
                    error: Some(SshError {
                        reason_code: None,
                        message: "the host refused the request".into(),
                    }),
                    ..SshResponse::default()
                },
                Outcome::Error,
                started,
            );
            return;
        };
        let sftp = self.sftp.then(|| {
            Arc::new(SftpGuard::new(
                self.ctx.policy.clone(),
                self.recorder.scope.principal.clone().unwrap_or_default(),
                self.target.clone(),
                self.login.clone(),
            ))
        });
        let mut pumps = Pumps::new(self.recorder, self.client, sftp);
        if self.typed {
            pumps.typed = Some(Arc::default());
        }
        // The client's yes goes first on the output side, once the input side reads its input.
        pumps.answer_first = true;
        pumps.run(self.input, host, started);
    }

    /// Records a refused run and tells the client (see [`refuse`]).
    async fn refuse(self, body: Body, refusal: &Refusal) {
        drop(self.input);
        let message = refusal_record(&self.ctx.core, body, refusal, &self.recorder.span);
        let (client, id) = (&self.client, self.recorder.channel);
        let _ = client.channel_success(id).await;
        let _ = client.extended_data(id, 1, refused_line(&message)).await;
        let _ = client.exit_status_request(id, REFUSED_EXIT_STATUS).await;
        let _ = client.eof(id).await;
        let _ = client.close(id).await;
    }
}

/// The two tasks of a running channel and what they share.
pub(super) struct Pumps {
    rec: Recorder,
    client: russh::server::Handle,
    counters: Arc<Counters>,
    /// Set when either side has closed the channel. russh forgets a channel once it has sent
    /// its own close, and drops everything that arrives on it later, the peer's answering
    /// close included: a task waiting for the other side's close would wait for ever.
    ended: Arc<watch::Sender<bool>>,
    sftp: Option<Arc<SftpGuard>>,
    /// An interactive shell on a terminal: lines typed are recorded (see [`super::typed`]),
    /// those the host echoed as text; both tasks watch for the echo.
    typed: Option<Arc<std::sync::Mutex<Echoes>>>,
    /// The output task first tells the client its request succeeded (the request's task
    /// leaves that to it, see [`Starting::input`]).
    answer_first: bool,
}

impl Pumps {
    pub fn new(rec: Recorder, client: russh::server::Handle, sftp: Option<Arc<SftpGuard>>) -> Self {
        Self {
            rec,
            client,
            counters: Arc::new(Counters::default()),
            ended: Arc::new(watch::channel(false).0),
            sftp,
            typed: None,
            answer_first: false,
        }
    }

    /// Runs client channel `id` (whose input arrives through the connection's handler).
    pub fn spawn(
        self,
        conn: &mut Conn,
        id: ChannelId,
        host: russh::Channel<client::Msg>,
        started: Instant,
    ) {
        let (tx, rx) = mpsc::channel(INPUT_QUEUE);
        let running = Chan::Running {
            input: tx,
            _left: None,
        };
        conn.channels.insert(id, running);
        self.run(ClientInput::new(rx), host, started);
    }

    /// Runs the channel with its client input from `rx`.
    pub fn run(self, rx: ClientInput, host: russh::Channel<client::Msg>, started: Instant) {
        let (read, write) = host.split();
        let (inject, injected) = mpsc::unbounded_channel();
        let input = Pumps {
            rec: self.rec.clone(),
            client: self.client.clone(),
            counters: self.counters.clone(),
            ended: self.ended.clone(),
            sftp: self.sftp.clone(),
            typed: self.typed.clone(),
            answer_first: false,
        };
        // The channel's log events name its request (and session).
        let span = self.rec.span.clone();
        tokio::spawn(input_task(input, rx, write, inject).instrument(span.clone()));
        tokio::spawn(output_task(self, read, injected, started).instrument(span));
    }
}

fn reply(session: &mut Session, id: ChannelId, ok: bool) {
    let _ = if ok {
        session.channel_success(id)
    } else {
        session.channel_failure(id)
    };
}

/// Whether channel `id` cannot take a request that wants an answer (`request_type`) because it
/// runs one already, or ended; if so, the request is refused. One that runs something, or
/// whose request is on its way, is closed, on record: russh keeps one "wants a reply" flag per
/// channel, so a second answer owed on it could not be given in its turn (OpenSSH never asks
/// this). One that ended gets no.
pub fn busy(
    conn: &mut Conn,
    id: ChannelId,
    request_type: &str,
    command: Option<&str>,
    session: &mut Session,
) -> bool {
    match conn.channels.get(&id) {
        Some(Chan::Idle | Chan::Setup(_)) => false,
        Some(Chan::Running { .. }) => {
            let why = "the channel already runs a request; it is closed";
            refuse_request(conn, id, request_type, command, why);
            close_channel(conn, id, session);
            true
        }
        Some(Chan::Done) | None => {
            reply(session, id, false);
            true
        }
    }
}

/// Whether the connection already has `ssh.max_channels` channels open, so that channel `id`
/// (of `kind`, being opened) is refused: then on record as a `blocked` request naming the
/// limit. Without a limit, each channel could hold a request for approval with its input, and
/// one connection filled the node's memory and the approvers' inbox (outside review,
/// 2026-12-07).
pub fn over_limit(conn: &mut Conn, id: ChannelId, kind: &str) -> bool {
    let max = conn.ctx.config.max_channels;
    // Channels whose command ended are let go of here (the gateway forgets the ones it
    // closes or refuses as it does): russh forgets a channel once the gateway has closed it,
    // so the client's close never reaches the handler, and they would stay for the
    // connection's life (a ControlMaster connection was refused its 11th command; final
    // review, 2026-12-07). A running channel's input ends when its command's output has
    // ended (the client's channel is closed then) or the client closed it. `Done` channels
    // are still open on the client's side (the host refused to open one): they count.
    conn.channels.retain(|_, c| match c {
        Chan::Running { input, .. } => !input.is_closed(),
        Chan::Idle | Chan::Setup(_) | Chan::Done => true,
    });
    if conn.channels.len() < max {
        return false;
    }
    let why = format!("the connection has {max} channels open, the most ssh.max_channels allows");
    refuse_request(conn, id, kind, None, &why);
    true
}

/// Closes client channel `id` from the gateway's side: what runs on it gets the client's
/// close, a request held for approval stops waiting.
fn close_channel(conn: &mut Conn, id: ChannelId, session: &mut Session) {
    // Forgotten, not kept as `Done`: russh forgets the channel once the gateway closes it, so
    // the client's close never reaches the handler (see [`over_limit`]).
    conn.channels.remove(&id);
    let _ = session.eof(id);
    let _ = session.close(id);
}

/// Hex SHA-256 over the login, the request type and the command line, each length-prefixed:
/// what an SSH approval binds (with the protocol and the host in its scope).
pub fn action_hash(login: &str, request_type: &str, command: &str) -> String {
    let mut h = Sha256::new();
    for part in [login, request_type, command] {
        h.update((part.len() as u64).to_be_bytes());
        h.update(part.as_bytes());
    }
    hex::encode(h.finalize())
}

/// Records a refused run and tells the client: the request "succeeds" so that the client
/// reads the reason on stderr and the exit status, then the channel closes. Nothing reaches
/// the host.
fn refuse(
    conn: &mut Conn,
    id: ChannelId,
    body: Body,
    refusal: &Refusal,
    span: &tracing::Span,
    session: &mut Session,
) {
    let message = refusal_record(&conn.ctx.core, body, refusal, span);
    conn.channels.remove(&id);
    let _ = session.channel_success(id);
    let _ = session.extended_data(id, 1, refused_line(&message));
    let _ = session.exit_status_request(id, REFUSED_EXIT_STATUS);
    let _ = session.eof(id);
    let _ = session.close(id);
}

/// Writes a refused run's record; returns the reason the client is told.
fn refusal_record(
    core: &crate::core::Core,
    mut body: Body,
    refusal: &Refusal,
    span: &tracing::Span,
) -> String {
    let message = core.scrub(&refusal.to_string());
    tracing::info!(reason = %message, "ssh request refused");
    if body.kind == Kind::Request {
        body.kind = Kind::Blocked;
    }
    body.outcome = Some(refusal.outcome());
    body.detail = Some(with_note(&message, body.detail.take()));
    crate::core::trace::from_record(span, &body);
    core.audit.record(body);
    message
}

/// The line on stderr that tells the client why its request was refused.
fn refused_line(message: &str) -> Vec<u8> {
    format!("vigil: {message}\r\n").into_bytes()
}

/// A refused run that has no decision (it could not be decided at all).
fn refuse_run(
    conn: &mut Conn,
    id: ChannelId,
    request_type: &str,
    command: Option<&str>,
    why: &str,
    session: &mut Session,
) {
    conn.stmt += 1;
    let mut body = conn.body(Kind::Blocked);
    body.stmt = Some(conn.stmt);
    body.request = Some(ssh_request(
        conn,
        id,
        request_type,
        command.map(str::to_string),
    ));
    let refusal = Refusal::Blocked {
        rule: "parse-error".into(),
        reason: why.into(),
    };
    let span = conn.statement_span(conn.stmt);
    refuse(conn, id, body, &refusal, &span, session);
}

/// Records a refused request that has no channel to end (env, agent and X11 forwarding).
pub fn refuse_request(
    conn: &Conn,
    id: ChannelId,
    request_type: &str,
    command: Option<&str>,
    why: &str,
) {
    let mut body = conn.body(Kind::Blocked);
    body.request = Some(ssh_request(
        conn,
        id,
        request_type,
        command.map(str::to_string),
    ));
    body.outcome = Some(Outcome::Blocked);
    body.detail = Some(conn.ctx.core.scrub(why));
    conn.ctx.core.audit.record(body);
}

/// Input on client channel `id`: queued for its input task when it runs, dropped otherwise
/// (nothing runs that could read it).
pub async fn input(conn: &mut Conn, id: ChannelId, input: Input) {
    match conn.channels.get_mut(&id) {
        // A close never waits for room: the handler lets go of the channel next, and the
        // input task takes that as the close.
        Some(Chan::Running { input: tx, .. }) if matches!(input, Input::Close) => {
            let _ = tx.try_send(input);
        }
        // Waiting for room stops the whole connection (russh's loop runs this handler): never
        // past the gateway's cut of a session it ended.
        Some(Chan::Running { input: tx, .. }) => {
            if let Err(mpsc::error::TrySendError::Full(input)) = tx.try_send(input) {
                tokio::select! {
                    _ = tx.send(input) => {}
                    () = conn.sever.cut() => {}
                }
            }
        }
        Some(slot @ Chan::Setup(_)) if matches!(input, Input::Close) => *slot = Chan::Done,
        _ => {}
    }
}

#[derive(Default)]
struct Counters {
    input: AtomicU64,
    output: AtomicU64,
}

/// What every record of a session carries (its id, principal and connection), for records
/// written away from the connection's handler: by a channel's tasks, by the relay of a remote
/// forward.
#[derive(Clone)]
pub(super) struct SessionScope {
    pub core: Arc<crate::core::Core>,
    session: String,
    principal: Option<Arc<Principal>>,
    connection: Option<Arc<Connection>>,
    trace: tracing::Span,
    /// Touched by the session's channels as they pass bytes on (`ssh.idle_timeout_secs`).
    activity: Arc<Activity>,
    /// Held while this scope may write records: the session's end waits for it.
    _end: Option<Arc<SessionEnd>>,
}

impl SessionScope {
    pub fn of(conn: &Conn) -> Self {
        Self {
            core: conn.ctx.core.clone(),
            session: conn.id.clone(),
            principal: conn.principal.clone(),
            connection: Some(Arc::new(conn.conn.clone())),
            trace: conn.trace.clone(),
            activity: conn.activity.clone(),
            _end: conn.end.clone(),
        }
    }

    /// The trace span of request `stmt` of the session.
    pub fn statement_span(&self, stmt: u64) -> tracing::Span {
        crate::core::trace::statement(&self.trace, super::PROTOCOL, &self.session, stmt)
    }

    pub fn body(&self, kind: Kind) -> Body {
        let mut body = self.core.audit.body(Some(&self.session), kind);
        body.principal = self.principal.clone();
        body.connection = self.connection.clone();
        body
    }
}

/// Writes a channel's records: its chunks (when the channel is recorded) and its end.
#[derive(Clone)]
pub(super) struct Recorder {
    scope: SessionScope,
    /// Where the channel's chunks go; `None` for a forward, whose bytes are counted only.
    file: Option<Arc<RecordingFile>>,
    /// Bytes recorded so far per direction (`input`, `output`, `error`), as stored: a masked
    /// chunk's audit copy can be shorter or longer than what crossed.
    stored: Arc<[AtomicU64; 3]>,
    stmt: u64,
    channel: ChannelId,
    /// The request's trace span, ended with the channel (its last recorder).
    span: tracing::Span,
}

impl Recorder {
    fn new(conn: &Conn, channel: ChannelId, stmt: Stmt) -> Self {
        Self::of(
            SessionScope::of(conn),
            conn.recording.clone(),
            channel,
            stmt,
        )
    }

    /// The recorder of `channel`, which runs request `stmt`.
    pub fn of(
        scope: SessionScope,
        file: Option<Arc<RecordingFile>>,
        channel: ChannelId,
        stmt: Stmt,
    ) -> Self {
        Self {
            scope,
            file,
            stored: Arc::new(Default::default()),
            stmt: stmt.n,
            channel,
            span: stmt.span,
        }
    }

    fn body(&self, kind: Kind) -> Body {
        let mut body = self.scope.body(kind);
        body.stmt = Some(self.stmt);
        body
    }

    /// Records a chunk's audit copy; with `wait`, returns once it is written (a chunk is on
    /// record before the other side sees it).
    async fn chunk(&self, direction: &'static str, bytes: &[u8], wait: bool) -> bool {
        let Some(file) = &self.file else {
            return true;
        };
        let mut body = self.body(Kind::Recording);
        let copy = self.scope.core.masker.chunk_copy(bytes, &mut body.masked);
        let at = match direction {
            "input" => 0,
            "output" => 1,
            _ => 2,
        };
        let offset = self.stored[at].fetch_add(copy.len() as u64, Ordering::Relaxed);
        let of = ChunkOf {
            channel: self.channel.number().to_string(),
            direction,
            offset,
        };
        self.scope
            .core
            .audit
            .chunk(body, file, of, copy, wait)
            .await
            .is_ok()
    }

    fn response(&self, response: SshResponse, outcome: Outcome, started: Instant) {
        let mut body = self.body(Kind::Response);
        body.response = Some(Response::Ssh(response));
        body.outcome = Some(outcome);
        body.duration_us = Some(started.elapsed().as_micros() as u64);
        crate::core::trace::from_record(&self.span, &body);
        self.scope.core.audit.record(body);
    }

    /// One SFTP operation: finished (`decided` is `None`; its outcome is the host's status)
    /// or refused by the gateway.
    fn sftp(&self, op: &SftpOperation, decided: Option<(&Decision, &SftpGuard)>) {
        let kind = if decided.is_some() {
            Kind::Blocked
        } else {
            Kind::Response
        };
        let mut body = self.body(kind);
        let r = &op.request;
        body.request = Some(Request::Ssh(SshRequest {
            channel: self.channel.number(),
            request_type: "sftp".into(),
            operation: Some(r.op.name().into()),
            path: r.path.clone(),
            to_path: r.target.clone(),
            ..SshRequest::default()
        }));
        let failed = op.status.filter(|s| *s != super::sftp::SSH_FX_OK);
        body.response = Some(Response::Ssh(SshResponse {
            channel: self.channel.number(),
            bytes_in: op.bytes_written,
            bytes_out: op.bytes_read,
            error: failed.map(|code| SshError {
                reason_code: Some(code),
                message: op.message.clone().unwrap_or_default(),
            }),
            ..SshResponse::default()
        }));
        body.outcome = Some(match (decided, failed) {
            (Some(_), _) => Outcome::Blocked,
            (None, Some(_)) => Outcome::Error,
            (None, None) => Outcome::Success,
        });
        if let Some((d, guard)) = decided {
            body.policy = Some(guard.reference(d));
            body.detail = op.message.clone();
        }
        self.scope.core.audit.record(body);
    }

    /// The channel's stream broke the protocol the gateway follows: on record; the channel
    /// ends (fail closed: what the gateway cannot follow, it cannot decide).
    fn protocol_error(&self, why: &str) {
        let mut body = self.body(Kind::ProtocolError);
        body.outcome = Some(Outcome::Error);
        body.detail = Some(why.to_string());
        self.scope.core.audit.record(body);
    }

    /// Lines typed into a shell: an index into the recording (not a decision; see
    /// [`super::typed`]). A line the host did not echo (a password prompt) is on record
    /// without its text. Resolves once they are written, so that a line is on record before
    /// what decided it (its echo, its Enter) goes on to the client or the host.
    async fn typed(&self, lines: Vec<Decided>) {
        if self.typed_records(lines) {
            self.scope.core.audit.flush().await;
        }
    }

    /// [`Self::typed`]'s records, handed to the writer without waiting: for a caller whose
    /// next awaited write (the chunk that decided them) carries them to the log. Whether
    /// there were any.
    fn typed_records(&self, lines: Vec<Decided>) -> bool {
        let any = !lines.is_empty();
        for Decided { typed, echoed } in lines {
            let mut body = self.body(Kind::Request);
            body.request = Some(Request::Ssh(SshRequest {
                channel: self.channel.number(),
                request_type: "typed".into(),
                command: Some(if echoed {
                    self.scope.core.scrub(&typed.line)
                } else {
                    NOT_ECHOED.into()
                }),
                ..SshRequest::default()
            }));
            body.detail = if !echoed {
                Some("typed while the host echoed nothing (a password prompt): the line is not on record, its keystrokes are in the recording".into())
            } else if typed.inexact {
                Some("edited with cursor keys, control keys (history search or recall, kill and yank …), completion or a long paste: the shell may have run another line (see the recording)".into())
            } else {
                None
            };
            self.scope.core.audit.record(body);
        }
        any
    }

    /// A request on a running channel (resize, signal), on record before the host sees it.
    async fn request(&self, request_type: &str, detail: String) -> bool {
        let mut body = self.body(Kind::Request);
        body.request = Some(Request::Ssh(SshRequest {
            channel: self.channel.number(),
            request_type: request_type.into(),
            command: Some(detail),
            ..SshRequest::default()
        }));
        self.scope.core.audit.append(&body).await.is_ok()
    }
}

/// Client → host: each chunk on record before the host gets it. When a chunk cannot be
/// recorded the channel is closed: nothing unrecorded reaches the host. On an SFTP channel,
/// refused requests are taken out (their replies go to the output task).
async fn input_task(
    p: Pumps,
    mut rx: ClientInput,
    write: russh::ChannelWriteHalf<client::Msg>,
    inject: mpsc::UnboundedSender<Vec<u8>>,
) {
    let (rec, client, counters) = (&p.rec, &p.client, &p.counters);
    let id = rec.channel;
    let mut typed = p
        .typed
        .as_ref()
        .map(|echoes| (TypedLines::default(), echoes));
    let mut ended = p.ended.subscribe();
    loop {
        let input = tokio::select! {
            // The handler let go of the channel (the client closed it, the connection ended).
            input = rx.recv() => input.unwrap_or(Input::Close),
            () = closed(&mut ended) => break,
        };
        rec.scope.activity.touch();
        let sent = match input {
            Input::Data(mut bytes) => {
                if let Some(sftp) = &p.sftp {
                    match sftp.client(&bytes) {
                        Ok((forward, refused)) => {
                            for r in refused {
                                rec.sftp(&r.operation, Some((&r.decision, sftp)));
                                let _ = inject.send(r.reply);
                            }
                            bytes = forward;
                        }
                        Err(e) => {
                            rec.protocol_error(&format!("the client's SFTP stream: {e}"));
                            let _ = write.close().await;
                            let _ = client.close(id).await;
                            break;
                        }
                    }
                    if bytes.is_empty() {
                        continue;
                    }
                }
                counters
                    .input
                    .fetch_add(bytes.len() as u64, Ordering::Relaxed);
                if let Some((_, echoes)) = &typed {
                    rec.typed_records(lock(echoes).typing());
                }
                if !rec.chunk("input", &bytes, true).await {
                    let message = b"vigil: the gateway cannot record this channel; closing\r\n";
                    let _ = client.extended_data(id, 1, message.to_vec()).await;
                    let _ = write.close().await;
                    let _ = client.close(id).await;
                    break;
                }
                if let Some((lines, echoes)) = &mut typed {
                    let decided: Vec<Decided> = {
                        let mut echoes = lock(echoes);
                        let lines = lines.feed(&bytes).into_iter();
                        lines.flat_map(|line| echoes.ended(line)).collect()
                    };
                    rec.typed(decided).await;
                }
                write.data_bytes(bytes).await
            }
            Input::Resize {
                cols,
                rows,
                pix_width,
                pix_height,
            } => {
                if !rec.request("window-change", format!("{cols}x{rows}")).await {
                    continue;
                }
                write.window_change(cols, rows, pix_width, pix_height).await
            }
            Input::Signal(sig) => {
                if !rec.request("signal", sig_name(&sig)).await {
                    continue;
                }
                write.signal(sig).await
            }
            Input::Eof => write.eof().await,
            Input::Close => {
                let _ = write.close().await;
                break;
            }
        };
        if sent.is_err() {
            break;
        }
    }
    p.ended.send_replace(true);
}

/// Host → client: each chunk in the log before the client gets it (a chunk that cannot be
/// recorded ends the channel: the client never sees unrecorded output); exit status and
/// signal passed on as the host sent them. The gateway's own SFTP replies go out between the
/// host's packets.
async fn output_task(
    p: Pumps,
    mut read: russh::ChannelReadHalf,
    mut injected: mpsc::UnboundedReceiver<Vec<u8>>,
    started: Instant,
) {
    let (rec, client) = (&p.rec, &p.client);
    let id = rec.channel;
    if p.answer_first {
        let _ = client.channel_success(id).await;
    }
    let mut response = SshResponse {
        channel: id.number(),
        ..SshResponse::default()
    };
    let mut error_offset = 0u64;
    // The host's EOF, held back briefly (see [`EOF_HOLD`]).
    let mut eof_at: Option<tokio::time::Instant> = None;
    let mut ended = p.ended.subscribe();
    loop {
        let at_boundary = p.sftp.as_ref().is_some_and(|s| s.at_boundary());
        let held = eof_at.unwrap_or_else(tokio::time::Instant::now);
        let msg = tokio::select! {
            m = read.wait() => m,
            // The client closed the channel: nothing the host sends now reaches the gateway.
            () = closed(&mut ended) => None,
            () = tokio::time::sleep_until(held), if eof_at.is_some() => {
                eof_at = None;
                if client.eof(id).await.is_err() {
                    break;
                }
                continue;
            }
            Some(reply) = injected.recv(), if at_boundary => {
                p.counters.output.fetch_add(reply.len() as u64, Ordering::Relaxed);
                if !rec.chunk("output", &reply, true).await
                    || client.data(id, reply).await.is_err()
                {
                    break;
                }
                continue;
            }
        };
        let Some(msg) = msg else { break };
        rec.scope.activity.touch();
        let delivered = match msg {
            ChannelMsg::Data { data } => {
                if let Some(sftp) = &p.sftp {
                    match sftp.server(&data) {
                        Ok(ops) => ops.iter().for_each(|op| rec.sftp(op, None)),
                        Err(e) => {
                            rec.protocol_error(&format!("the host's SFTP stream: {e}"));
                            break;
                        }
                    }
                }
                p.counters
                    .output
                    .fetch_add(data.len() as u64, Ordering::Relaxed);
                if let Some(echoes) = &p.typed {
                    rec.typed_records(lock(echoes).shown(&data));
                }
                rec.chunk("output", &data, true).await && client.data(id, data).await.is_ok()
            }
            ChannelMsg::ExtendedData { data, ext } => {
                let recorded = rec.chunk("error", &data, true).await;
                error_offset += data.len() as u64;
                recorded && client.extended_data(id, ext, data).await.is_ok()
            }
            ChannelMsg::ExitStatus { exit_status } => {
                response.exit_status = Some(exit_status);
                client.exit_status_request(id, exit_status).await.is_ok()
                    && (eof_at.take().is_none() || client.eof(id).await.is_ok())
            }
            ChannelMsg::ExitSignal {
                signal_name,
                core_dumped,
                error_message,
                lang_tag,
            } => {
                response.exit_signal = Some(sig_name(&signal_name));
                client
                    .exit_signal_request(id, signal_name, core_dumped, error_message, lang_tag)
                    .await
                    .is_ok()
                    && (eof_at.take().is_none() || client.eof(id).await.is_ok())
            }
            ChannelMsg::Eof => {
                eof_at = Some(tokio::time::Instant::now() + EOF_HOLD);
                true
            }
            ChannelMsg::Close => {
                if eof_at.take().is_some() {
                    let _ = client.eof(id).await;
                }
                break;
            }
            _ => true,
        };
        if !delivered {
            break;
        }
    }
    p.ended.send_replace(true);
    let _ = client.close(id).await;
    if let Some(echoes) = &p.typed {
        let decided = lock(echoes).end();
        rec.typed(decided).await;
    }
    if let Some(sftp) = &p.sftp {
        sftp.finish().iter().for_each(|op| rec.sftp(op, None));
    }
    response.bytes_in = p.counters.input.load(Ordering::Relaxed);
    response.bytes_out = p.counters.output.load(Ordering::Relaxed) + error_offset;
    let outcome = match (response.exit_status, &response.exit_signal) {
        (Some(0), None) | (None, None) => Outcome::Success,
        _ => Outcome::Error,
    };
    rec.response(response, outcome, started);
}

/// What a typed line the host did not echo is recorded as.
const NOT_ECHOED: &str = "[not echoed]";

/// The echo watch of a shell (a panic while it was held leaves it usable: it is an index).
fn lock(echoes: &std::sync::Mutex<Echoes>) -> std::sync::MutexGuard<'_, Echoes> {
    echoes.lock().unwrap_or_else(|e| e.into_inner())
}

/// Resolves once either side has closed the channel (see [`Pumps::ended`]).
async fn closed(ended: &mut watch::Receiver<bool>) {
    let _ = ended.wait_for(|e| *e).await;
}

/// A signal's name as SSH writes it (`INT`, `KILL` …).
fn sig_name(sig: &Sig) -> String {
    match sig {
        Sig::Custom(name) => name.clone(),
        other => format!("{other:?}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Input kept for held requests counts against the node's bound until it is read or let
    /// go of: a held request whose input would take the node past it stops waiting, saying
    /// why (outside review, 2026-12-07: 150 held channels on one connection, 1 MiB each).
    #[tokio::test]
    async fn held_input_counts_against_the_node_until_read_or_let_go_of() {
        let node = Arc::new(AtomicUsize::new(0));
        let (tx, rx) = mpsc::channel(INPUT_QUEUE);
        let mut first = ClientInput::counted(rx, node.clone());
        tx.send(Input::Data(vec![0; 1000])).await.unwrap();
        tx.send(Input::Eof).await.unwrap();
        let waited = tokio::time::timeout(std::time::Duration::from_millis(50), first.keep()).await;
        assert!(waited.is_err(), "within both bounds: still held");
        assert_eq!(node.load(Ordering::Relaxed), 1000 + 64 + 64);
        assert!(matches!(first.recv().await, Some(Input::Data(d)) if d.len() == 1000));
        assert_eq!(
            node.load(Ordering::Relaxed),
            64,
            "what was read is released"
        );

        // Another held request takes the node past its bound.
        node.fetch_add(MAX_NODE_HELD_INPUT - 100, Ordering::Relaxed);
        let (tx2, rx2) = mpsc::channel(INPUT_QUEUE);
        let mut second = ClientInput::counted(rx2, node.clone());
        tx2.send(Input::Data(vec![0; 100])).await.unwrap();
        assert_eq!(second.keep().await, NODE_HELD_INPUT_OVER);
        drop(second);
        drop(first);
        assert_eq!(
            node.load(Ordering::Relaxed),
            MAX_NODE_HELD_INPUT - 100,
            "what was kept and never read is released when let go of"
        );

        // One request's own bound.
        let (tx3, rx3) = mpsc::channel(INPUT_QUEUE);
        let mut third = ClientInput::counted(rx3, Arc::new(AtomicUsize::new(0)));
        let sender = tokio::spawn(async move {
            for _ in 0..20 {
                if tx3.send(Input::Data(vec![0; 64 << 10])).await.is_err() {
                    break;
                }
            }
        });
        assert_eq!(third.keep().await, HELD_INPUT_OVER);
        drop(third);
        let _ = sender.await;
    }

    #[test]
    fn sftp_server_is_followed_only_alone_on_its_line() {
        let of = |text: &str| sftp_server(text, &command::parse(text).unwrap());
        for alone in [
            "/usr/lib/openssh/sftp-server",
            "sftp-server -l DEBUG3 -d /srv -P read,write",
        ] {
            assert!(of(alone) == SftpServer::Alone, "{alone}");
        }
        for elsewhere in [
            "sudo /usr/lib/openssh/sftp-server",
            "sftp-server < /tmp/requests",
            "sftp-server; rm -rf /srv",
            "sh -c sftp-server",
            "'/usr/lib/openssh/sftp-server'",
            "LD_PRELOAD=/tmp/x.so sftp-server",
            "exec sftp-server",
        ] {
            assert!(of(elsewhere) == SftpServer::Elsewhere, "{elsewhere}");
        }
        assert!(of("ls /usr/lib/openssh/sftp-server") == SftpServer::No);
    }

    #[test]
    fn scp_paths_that_cannot_be_decided() {
        let of = |text: &str| {
            let line = command::parse(text).unwrap();
            let scp = line.commands.iter().find(|c| scp_server(c)).unwrap();
            scp_undecidable(scp)
        };
        for plain in [
            "scp -t /srv/up/a",
            "scp -v -p -f /etc/passwd",
            "scp -t -- /x",
            "scp -t /srv/up/",
            "scp -t /",
        ] {
            assert_eq!(of(plain), None, "{plain}");
        }
        for undecidable in [
            "scp -r -t /srv/up",
            "scp -dt /srv/up",
            "scp -t .",
            "scp -t up/a",
            "scp -t ~/../../srv/up",
            "scp -t '/srv/u*/a'",
            "scp -t /srv/up/[a]",
            "scp -t /srv/up/a?",
            "scp -t /srv/{up,down}/a",
            "scp -t '$HOME/a'",
            "scp -t /srv/`x`",
            // Another spelling of a path a rule names (an outside review: /srv//config).
            "scp -t /srv//up/a",
            "scp -t /srv/./up",
            "scp -t /tmp/../srv/up/a",
            "scp -t /srv/up//",
        ] {
            assert!(of(undecidable).is_some(), "{undecidable}");
        }
    }
}
