//! `vigil replay` of a session whose streams were recorded: an SSH session channel by channel,
//! a Kubernetes session request by request (each exec and attach with its streams). Who and
//! where, then each channel with its requests, their decisions, its exit and its terminal
//! output.
//!
//! Both protocols are read into the same shape ([`Session`], [`Channel`], [`Event`]); only
//! [`read`] knows their records. An SSH channel is the client's channel number; a Kubernetes
//! "channel" is a request of the session, by its number (`stmt`), which is also the channel of
//! its recorded chunks (`STMT` for stdin, stdout and stderr, `STMT.resize` for the terminal
//! sizes a client sent, read back as resizes).
//!
//! Every chunk of the session is read from its store and proved by its record, and every
//! channel's chunks must follow on from each other, before anything is shown ([`read`]): a
//! session with one chunk that does not verify is refused as a whole.
//!
//! The dump ([`dump`]) prints the output escaped, like every text `vigil` did not write
//! ([`crate::audit::display`]): an escape sequence is shown, never run, and each line of output shows
//! its own terminator (`\r\n`, `\n`) and sits behind the continuation marker. Only [`play`],
//! which the operator asks for by name, writes the recorded bytes to the terminal, through
//! [`crate::audit::screen`]: what draws, never what would make the terminal act otherwise.

use crate::audit::display::{escape as esc, escape_lines, push_invalid, CONTINUATION};
use crate::audit::recording::{chunk_name, ChunkReader, Continuity, Utf8Stream};
use std::collections::HashMap;
use std::fmt::Write as _;
use std::time::Duration;
use vigil_proto::record::{
    Body, Kind, KubeRequest, KubeResponse, Outcome, Record, Recording, Request, Response,
    SshRequest, SshResponse,
};

/// The protocols whose sessions replay as channels of terminal streams.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Protocol {
    Ssh,
    Kubernetes,
}

impl Protocol {
    /// What the replay calls a channel of this protocol.
    pub fn noun(self) -> &'static str {
        match self {
            Protocol::Ssh => "channel",
            Protocol::Kubernetes => "request",
        }
    }

    fn name(self) -> &'static str {
        match self {
            Protocol::Ssh => "ssh",
            Protocol::Kubernetes => "kubernetes",
        }
    }
}

/// The protocol of `records` (of one session), when it is one whose streams are recorded.
pub fn protocol(records: &[Record]) -> Option<Protocol> {
    match records
        .iter()
        .find_map(|r| r.body.connection.as_ref())?
        .protocol
        .as_str()
    {
        "ssh" => Some(Protocol::Ssh),
        "kubernetes" => Some(Protocol::Kubernetes),
        _ => None,
    }
}

/// What a request does to the terminal of its channel.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Role {
    /// It runs what the channel is about (an SSH exec or shell; a Kubernetes request).
    Runs,
    /// It asks for a terminal of this type and size (SSH `pty-req`).
    Pty {
        term: String,
        cols: u32,
        rows: u32,
    },
    /// The terminal's new size (SSH `window-change`, a Kubernetes resize).
    Resize {
        cols: u32,
        rows: u32,
    },
    Other,
}

/// A request on a channel, as the replay names it. Its texts are not escaped (the cast is
/// JSON); the dump escapes them.
#[derive(Clone, Debug)]
pub struct Step {
    /// `exec: COMMAND`, `pty-req: xterm 80x24`, `exec default/shell: sh -c …`.
    pub label: String,
    pub role: Role,
    /// More lines for the dump, each `(what, text)`: `http POST /api/…`, `body 12 bytes: …`.
    pub notes: Vec<(&'static str, String)>,
}

/// How a channel ended. Its texts are not escaped.
#[derive(Clone, Debug)]
pub struct Ending {
    /// `exit 3`, `signal KILL`, `HTTP 403`, and the error.
    pub label: String,
    /// `1 bytes in, 25 out`, `HTTP 101, 2048 bytes`.
    pub counts: String,
    /// More lines for the dump, as for [`Step::notes`].
    pub notes: Vec<(&'static str, String)>,
}

/// One record of a channel, in log order.
pub enum Event<'a> {
    /// A request on the channel (`pty-req`, `exec`, `window-change` …; a Kubernetes request,
    /// or a resize its client sent).
    Request(&'a Record, Step),
    /// A request the gateway refused (`detail` says why).
    Blocked(&'a Record, Step),
    /// A recorded chunk, with its bytes, proved by its record.
    Chunk(&'a Record, &'a Recording, Vec<u8>),
    /// How the channel ended.
    End(&'a Record, Ending),
}

impl Event<'_> {
    pub fn record(&self) -> &Record {
        match self {
            Event::Request(r, _) | Event::Blocked(r, _) | Event::Chunk(r, _, _) => r,
            Event::End(r, _) => r,
        }
    }
}

/// A channel of the session: an SSH channel as the client numbered it, a Kubernetes request by
/// its number.
pub struct Channel<'a> {
    pub number: String,
    pub events: Vec<Event<'a>>,
}

impl Channel<'_> {
    /// The request that ran something on the channel (allowed or refused).
    pub fn run(&self) -> Option<&Step> {
        self.events.iter().find_map(|e| match e {
            Event::Request(_, s) | Event::Blocked(_, s) if s.role == Role::Runs => Some(s),
            _ => None,
        })
    }

    /// The terminal type, columns and rows the channel started with: its `pty-req`, else the
    /// first size its client sent.
    pub fn pty(&self) -> Option<(&str, u32, u32)> {
        let steps = || {
            self.events.iter().filter_map(|e| match e {
                Event::Request(_, s) => Some(&s.role),
                _ => None,
            })
        };
        steps()
            .find_map(|role| match role {
                Role::Pty { term, cols, rows } => Some((term.as_str(), *cols, *rows)),
                _ => None,
            })
            .or_else(|| {
                steps().find_map(|role| match role {
                    Role::Resize { cols, rows } => Some(("", *cols, *rows)),
                    _ => None,
                })
            })
    }
}

/// `COLSxROWS`, as `pty-req` and `window-change` records write a terminal's size.
pub fn size_of(s: &str) -> Option<(u32, u32)> {
    let (cols, rows) = s.split_once('x')?;
    Some((cols.parse().ok()?, rows.parse().ok()?))
}

/// A session read back from its records.
pub struct Session<'a> {
    pub id: String,
    pub protocol: Protocol,
    /// The `session_start` that let the client in (else the last refusal).
    pub start: Option<&'a Record>,
    pub end: Option<&'a Record>,
    /// In the order they first appear in the log.
    pub channels: Vec<Channel<'a>>,
}

impl Session<'_> {
    pub fn channel(&self, number: &str) -> Option<&Channel<'_>> {
        self.channels.iter().find(|c| c.number == number)
    }
}

/// The session of `records` (of `protocol`), every chunk read with `reader` and proved by its
/// record, and following on from the chunks before it on its channel and direction; else which
/// chunk does not verify, and why.
pub fn read<'a>(
    protocol: Protocol,
    records: &'a [Record],
    reader: &mut ChunkReader,
) -> Result<Session<'a>, String> {
    let mut session = Session {
        id: records
            .iter()
            .find_map(|r| r.body.session.clone())
            .unwrap_or_default(),
        protocol,
        start: None,
        end: None,
        channels: Vec::new(),
    };
    let mut index: HashMap<String, usize> = HashMap::new();
    let mut continuity = Continuity::default();
    for r in records {
        let b = &r.body;
        let (number, event) = match (b.kind, &b.recording) {
            (Kind::SessionStart, _) => {
                if session
                    .start
                    .is_none_or(|s| s.body.outcome != Some(Outcome::Success))
                {
                    session.start = Some(r);
                }
                continue;
            }
            (Kind::SessionEnd, _) => {
                session.end = Some(r);
                continue;
            }
            (Kind::Recording, Some(rec)) => {
                let bytes = reader
                    .read(rec)
                    .and_then(|bytes| continuity.follow(rec).map(|()| bytes))
                    .map_err(|e| {
                        format!(
                            "the chunk of record seq {} of stream {} ({}) does not verify: {e}",
                            r.seq,
                            r.stream,
                            chunk_name(rec)
                        )
                    })?;
                chunk_event(protocol, r, rec, bytes)
            }
            _ => match protocol {
                Protocol::Ssh => match ssh_event(r) {
                    Some(e) => e,
                    None => continue,
                },
                Protocol::Kubernetes => match kube_event(r) {
                    Some(e) => e,
                    None => continue,
                },
            },
        };
        let i = *index.entry(number.clone()).or_insert_with(|| {
            session.channels.push(Channel {
                number,
                events: Vec::new(),
            });
            session.channels.len() - 1
        });
        session.channels[i].events.push(event);
    }
    Ok(session)
}

/// A proved chunk as an event of its channel. A Kubernetes client's terminal sizes are chunks
/// of the channel `STMT.resize` (JSON `{"Width":W,"Height":H}`): a resize of request `STMT`.
fn chunk_event<'a>(
    protocol: Protocol,
    r: &'a Record,
    rec: &'a Recording,
    bytes: Vec<u8>,
) -> (String, Event<'a>) {
    let resized = match protocol {
        Protocol::Kubernetes => rec.channel.strip_suffix(".resize"),
        Protocol::Ssh => None,
    };
    let Some(number) = resized else {
        return (rec.channel.clone(), Event::Chunk(r, rec, bytes));
    };
    let size: Option<(u32, u32)> = serde_json::from_slice::<serde_json::Value>(&bytes)
        .ok()
        .and_then(|v| {
            let side = |k: &str| v[k].as_u64().and_then(|n| u32::try_from(n).ok());
            Some((side("Width")?, side("Height")?))
        });
    let step = match size {
        Some((cols, rows)) => Step {
            label: format!("resize: {cols}x{rows}"),
            role: Role::Resize { cols, rows },
            notes: Vec::new(),
        },
        None => Step {
            label: format!("resize: {}", String::from_utf8_lossy(&bytes)),
            role: Role::Other,
            notes: Vec::new(),
        },
    };
    (number.to_string(), Event::Request(r, step))
}

fn ssh_event(r: &Record) -> Option<(String, Event<'_>)> {
    let b = &r.body;
    Some(match (b.kind, &b.request, &b.response) {
        (Kind::Request, Some(Request::Ssh(q)), _) => {
            (q.channel.to_string(), Event::Request(r, ssh_step(q)))
        }
        (Kind::Blocked, Some(Request::Ssh(q)), _) => {
            (q.channel.to_string(), Event::Blocked(r, ssh_step(q)))
        }
        (Kind::Response, _, Some(Response::Ssh(s))) => {
            (s.channel.to_string(), Event::End(r, ssh_ending(s)))
        }
        _ => return None,
    })
}

/// Request types that run something on a channel (the channel's command).
const RUNS: [&str; 4] = ["exec", "shell", "subsystem", "scp"];

/// An SSH channel request: `exec: COMMAND`, `pty-req: xterm 80x24`, `direct-tcpip to
/// HOST:PORT`.
fn ssh_step(q: &SshRequest) -> Step {
    let mut label = q.request_type.clone();
    if let Some(c) = &q.command {
        label += ": ";
        label += c;
    }
    if let Some(f) = &q.forward {
        label += " to ";
        label += f;
    }
    let size = || q.command.as_deref();
    let role = match q.request_type.as_str() {
        t if RUNS.contains(&t) => Role::Runs,
        "pty-req" => size()
            .and_then(|c| c.rsplit_once(' '))
            .and_then(|(term, s)| {
                let (cols, rows) = size_of(s)?;
                Some(Role::Pty {
                    term: term.to_string(),
                    cols,
                    rows,
                })
            })
            .unwrap_or(Role::Other),
        "window-change" => size()
            .and_then(size_of)
            .map(|(cols, rows)| Role::Resize { cols, rows })
            .unwrap_or(Role::Other),
        _ => Role::Other,
    };
    Step {
        label,
        role,
        notes: Vec::new(),
    }
}

/// How an SSH channel ended: `exit 3`, `signal KILL`, and the gateway's error.
fn ssh_ending(s: &SshResponse) -> Ending {
    let mut label = match (s.exit_status, &s.exit_signal) {
        (Some(status), _) => format!("exit {status}"),
        (None, Some(signal)) => format!("signal {signal}"),
        (None, None) => "no exit status".into(),
    };
    if let Some(e) = &s.error {
        label += ": ";
        label += &e.message;
    }
    Ending {
        label,
        counts: format!("{} bytes in, {} out", s.bytes_in, s.bytes_out),
        notes: Vec::new(),
    }
}

/// A Kubernetes request's records by its number; a refusal before the session had numbered
/// its requests (a bad token) under `-`.
fn kube_event(r: &Record) -> Option<(String, Event<'_>)> {
    let b = &r.body;
    let number = b.stmt.map_or_else(|| "-".to_string(), |s| s.to_string());
    let event = match (b.kind, &b.request, &b.response) {
        (Kind::Request, Some(Request::Kubernetes(q)), _) => Event::Request(r, kube_step(q)),
        (Kind::Blocked, Some(Request::Kubernetes(q)), _) => Event::Blocked(r, kube_step(q)),
        (Kind::Response, _, Some(Response::Kubernetes(k))) => Event::End(r, kube_ending(b, k)),
        _ => return None,
    };
    Some((number, event))
}

/// A Kubernetes request: `exec default/shell: sh -c …`, `attach default/shell`, `get pods
/// default/shell`, `get /version`; its method, path and body as notes.
fn kube_step(q: &KubeRequest) -> Step {
    let at = |ns: &Option<String>, name: &Option<String>| match (ns, name) {
        (Some(ns), Some(name)) => format!(" {ns}/{name}"),
        (Some(ns), None) => format!(" {ns}"),
        (None, Some(name)) => format!(" {name}"),
        (None, None) => String::new(),
    };
    let mut label = match (q.resource.as_deref(), q.subresource.as_deref()) {
        (Some("pods"), Some(s @ ("exec" | "attach"))) => {
            format!("{s}{}", at(&q.namespace, &q.name))
        }
        (Some(resource), sub) => {
            let mut what = format!("{} ", q.verb);
            if !q.api_group.is_empty() {
                what += &q.api_group;
                what.push('/');
            }
            what += resource;
            if let Some(sub) = sub {
                what.push('/');
                what += sub;
            }
            what + &at(&q.namespace, &q.name)
        }
        (None, _) => format!("{} {}", q.verb, q.path),
    };
    if !q.command.is_empty() {
        label += ": ";
        label += &q.command.join(" ");
    }
    let mut http = format!("{} {}", q.method, q.path);
    if let Some(query) = &q.query {
        http.push('?');
        http += query;
    }
    let mut notes = vec![("http", http)];
    if let Some(body) = &q.body {
        notes.push(("body", format!("{} bytes: {body}", q.body_bytes)));
    }
    Step {
        label,
        role: Role::Runs,
        notes,
    }
}

/// How a Kubernetes request ended: the exit code of an exec or attach (its response record says
/// `exit code N`), else the HTTP status; the `Status` reason and message of a failure.
fn kube_ending(b: &Body, k: &KubeResponse) -> Ending {
    let exit = b
        .detail
        .as_deref()
        .and_then(|d| d.strip_prefix("exit code "));
    let mut label = match exit {
        Some(code) => format!("exit {code}"),
        None => format!("HTTP {}", k.status),
    };
    if let Some(e) = &k.error {
        label += ": ";
        label += &e.reason;
        if !e.message.is_empty() {
            label += ": ";
            label += &e.message;
        }
    }
    let streamed = stream_counts(k);
    let counts = match exit {
        Some(_) => format!("HTTP {}, {} bytes", k.status, k.bytes),
        None => format!("{} bytes{streamed}", k.bytes),
    };
    let notes = k.body.iter().map(|body| ("body", body.clone())).collect();
    Ending {
        label,
        counts,
        notes,
    }
}

/// The header of the replay: who, from where, to which host as which login (or which
/// cluster), and when.
fn header(s: &Session<'_>) -> String {
    let mut out = format!("session {}  {}\n", esc(&s.id), s.protocol.name());
    let start = s.start.map(|r| &r.body);
    if let Some(p) = start.and_then(|b| b.principal.as_deref()) {
        let _ = writeln!(out, "  principal   {}", esc(&p.subject));
        if let Some(c) = &p.client_id {
            let _ = writeln!(out, "  client      {}", esc(c));
        }
        if p.model.is_some() || p.model_version.is_some() {
            let _ = writeln!(
                out,
                "  model       {} {}",
                esc(p.model.as_deref().unwrap_or("-")),
                esc(p.model_version.as_deref().unwrap_or(""))
            );
        }
        if !p.groups.is_empty() {
            let groups: Vec<_> = p.groups.iter().map(|g| esc(g)).collect();
            let _ = writeln!(out, "  groups      {}", groups.join(", "));
        }
        let _ = writeln!(
            out,
            "  token       {} from {}",
            esc(&p.token_type),
            esc(&p.issuer)
        );
    }
    let connection = start.and_then(|b| b.connection.as_deref());
    match s.protocol {
        Protocol::Ssh => {
            if let Some(c) = connection {
                // The client logs in as LOGIN+TARGET.
                let name = c.name.as_deref().unwrap_or("-");
                let (login, host) = crate::ssh::config::split_user(name).unwrap_or(("-", name));
                let _ = writeln!(
                    out,
                    "  target      {} ({})\n  login       {}",
                    esc(host),
                    esc(c.target.as_deref().unwrap_or("-")),
                    esc(login),
                );
            }
        }
        Protocol::Kubernetes => {
            // The cluster is named by each request (its path), not by the session's start.
            let mut clusters: Vec<(&str, &str)> = Vec::new();
            for r in s.channels.iter().flat_map(|c| &c.events).map(Event::record) {
                if let Some(c) = r.body.connection.as_deref() {
                    let named = (
                        c.name.as_deref().unwrap_or("-"),
                        c.target.as_deref().unwrap_or("-"),
                    );
                    if c.name.is_some() && !clusters.contains(&named) {
                        clusters.push(named);
                    }
                }
            }
            for (name, target) in clusters {
                let _ = writeln!(out, "  cluster     {} ({})", esc(name), esc(target));
            }
        }
    }
    if let Some(c) = connection {
        let _ = writeln!(out, "  client addr {}", esc(&c.client_addr));
        if let Some(a) = &c.balancer_addr {
            let _ = writeln!(out, "  balancer    {}", esc(a));
        }
    }
    if let Some(b) = start {
        let _ = writeln!(
            out,
            "  started     {}  {}{}",
            esc(&b.time),
            outcome(b.outcome),
            b.detail
                .as_deref()
                .map(|d| format!(": {}", esc(d)))
                .unwrap_or_default()
        );
    }
    match s.end.map(|r| &r.body) {
        Some(b) => {
            let _ = writeln!(
                out,
                "  ended       {}  after {}{}",
                esc(&b.time),
                duration(b.duration_us.unwrap_or(0)),
                b.detail
                    .as_deref()
                    .map(|d| format!(": {}", esc(d)))
                    .unwrap_or_default()
            );
        }
        None => out.push_str("  ended       - (no session_end record)\n"),
    }
    out
}
fn outcome(o: Option<Outcome>) -> String {
    o.and_then(|o| serde_json::to_value(o).ok())
        .and_then(|v| v.as_str().map(str::to_string))
        .unwrap_or_else(|| "-".into())
}

/// Microseconds as seconds, `1.250s`.
fn duration(us: u64) -> String {
    format!("{}.{:03}s", us / 1_000_000, us % 1_000_000 / 1000)
}

/// The decision on a request: `allowed by rule R`, the approval behind it, the dry-run note.
fn decision(r: &Record) -> Option<String> {
    let b = &r.body;
    let p = b.policy.as_ref()?;
    let mut text = format!("allowed by rule {}", esc(&p.rule));
    if let Some(a) = &b.approval {
        let _ = write!(text, ", approval {} {}", esc(&a.id), esc(&a.state));
    }
    if let Some(d) = &b.detail {
        let _ = write!(text, " ({})", esc(d));
    }
    Some(text)
}

/// The line of a request or refusal in the dump, and its notes.
fn request_line(out: &mut String, r: &Record, step: &Step, blocked: bool) {
    let b = &r.body;
    let _ = write!(
        out,
        "  [{}] {}",
        esc(&b.time),
        escape_lines(&step.label, "  ")
    );
    if blocked {
        let _ = writeln!(
            out,
            "\n    -> REFUSED ({}{}): {}",
            outcome(b.outcome),
            b.policy
                .as_ref()
                .map(|p| format!(", rule {}", esc(&p.rule)))
                .unwrap_or_default(),
            esc(b.detail.as_deref().unwrap_or(""))
        );
    } else if let Some(d) = decision(r) {
        let _ = writeln!(out, "\n    -> {d}");
    } else if let Some(o) = b.outcome {
        let _ = writeln!(out, " ({})", outcome(Some(o)));
    } else {
        out.push('\n');
    }
    notes(out, &step.notes);
}

/// The notes of a request or end, one line each: `    http POST /…`, `    body …`.
fn notes(out: &mut String, notes: &[(&str, String)]) {
    for (what, text) in notes {
        let _ = writeln!(out, "    {what} {}", escape_lines(text, "    "));
    }
}

/// Terminal output as the dump prints it: escaped lines behind the continuation marker, each
/// showing its own terminator, so what is printed reads back to exactly the bytes.
struct OutputLines<'o> {
    out: &'o mut String,
    /// A line is open (its marker written, its terminator not yet).
    open: bool,
    /// The direction (`output`, `error`) whose heading was printed last.
    shown: Option<String>,
}

impl OutputLines<'_> {
    /// Heads what follows with its direction, when it is not the one shown last.
    fn direction(&mut self, direction: &str) {
        if self.shown.as_deref() != Some(direction) {
            self.close();
            let _ = writeln!(self.out, "  {}", esc(direction));
            self.shown = Some(direction.to_string());
        }
    }

    fn piece(&mut self, text: &str, invalid: &[u8]) {
        for line in text.split_inclusive('\n') {
            self.start();
            self.out.push_str(&esc(line));
            if line.ends_with('\n') {
                self.out.push('\n');
                self.open = false;
            }
        }
        if !invalid.is_empty() {
            self.start();
            push_invalid(self.out, invalid);
        }
    }

    fn start(&mut self) {
        if !self.open {
            let _ = write!(self.out, "    {CONTINUATION}");
            self.open = true;
        }
    }

    fn close(&mut self) {
        if self.open {
            self.out.push('\n');
            self.open = false;
        }
    }
}

/// The replay as text: the header, then each channel with its requests, their decisions, its
/// output and error streams (escaped) and its exit. Input is counted, not shown.
pub fn dump(s: &Session<'_>) -> String {
    let mut out = header(s);
    for c in &s.channels {
        let _ = writeln!(out, "\n{} {}", s.protocol.noun(), esc(&c.number));
        let mut lines = OutputLines {
            out: &mut out,
            open: false,
            shown: None,
        };
        let mut streams: Vec<(&str, Utf8Stream)> = Vec::new();
        let mut input = 0u64;
        for e in &c.events {
            match e {
                Event::Chunk(_, rec, _) if rec.direction == "input" => input += rec.length,
                Event::Chunk(_, rec, bytes) => {
                    let direction = rec.direction.as_str();
                    let i = match streams.iter().position(|(d, _)| *d == direction) {
                        Some(i) => i,
                        None => {
                            streams.push((direction, Utf8Stream::default()));
                            streams.len() - 1
                        }
                    };
                    lines.direction(direction);
                    streams[i]
                        .1
                        .feed(bytes, |text, invalid| lines.piece(text, invalid));
                }
                other => {
                    lines.close();
                    lines.shown = None;
                    event_line(lines.out, other);
                }
            }
        }
        // Bytes still carried over at the end can never complete a character.
        for (direction, stream) in &mut streams {
            stream.finish(|text, invalid| {
                lines.direction(direction);
                lines.piece(text, invalid);
            });
        }
        lines.close();
        if input > 0 {
            let _ = writeln!(out, "  input: {input} bytes recorded (not shown)");
        }
    }
    out
}

/// A request, refusal or end, as a line of the dump (and its notes).
fn event_line(out: &mut String, e: &Event<'_>) {
    match e {
        Event::Request(r, step) => request_line(out, r, step, false),
        Event::Blocked(r, step) => request_line(out, r, step, true),
        Event::End(r, end) => {
            let b = &r.body;
            let _ = writeln!(
                out,
                "  [{}] {} ({}), {}, after {}",
                esc(&b.time),
                esc(&end.label),
                outcome(b.outcome),
                end.counts,
                duration(b.duration_us.unwrap_or(0))
            );
            notes(out, &end.notes);
        }
        Event::Chunk(..) => {}
    }
}

/// The seconds since the Unix epoch of a record's `time`.
pub fn secs(time: &str) -> Option<f64> {
    let t =
        time::OffsetDateTime::parse(time, &time::format_description::well_known::Rfc3339).ok()?;
    Some(t.unix_timestamp_nanos() as f64 / 1e9)
}

/// How `--play` paces the recorded output.
pub struct Pace {
    /// Times faster than recorded.
    pub speed: f64,
    /// The longest wait between two chunks, in recorded seconds.
    pub max_idle: Option<f64>,
}

/// Plays the session to `out`: the header and each channel's request and exit escaped, its
/// output and error bytes raw, at the pace their records were written.
pub fn play(s: &Session<'_>, pace: &Pace, out: &mut impl std::io::Write) -> std::io::Result<()> {
    use crate::audit::screen::{Screen, RESET};
    out.write_all(header(s).as_bytes())?;
    // The other side's output draws on the operator's terminal, and does nothing else there;
    // each channel was a terminal of its own, and vigil's own lines come after a reset.
    let (mut dropped, mut drawn) = (0, Vec::new());
    for c in &s.channels {
        let mut screen = Screen::new();
        let what = c.run().map_or("-", |step| step.label.as_str());
        write!(
            out,
            "{RESET}\r\n--- {} {}: {} ---\r\n",
            s.protocol.noun(),
            esc(&c.number),
            escape_lines(what, "")
        )?;
        let mut last = c.events.first().and_then(|e| secs(&e.record().body.time));
        for e in &c.events {
            match e {
                Event::Chunk(r, rec, bytes) if rec.direction != "input" => {
                    let at = secs(&r.body.time);
                    if let (Some(from), Some(to)) = (last, at) {
                        let idle = (to - from).max(0.0);
                        let idle = pace.max_idle.map_or(idle, |m| idle.min(m));
                        std::thread::sleep(Duration::from_secs_f64(idle / pace.speed));
                    }
                    last = at.or(last);
                    drawn.clear();
                    screen.filter(bytes, &mut drawn);
                    out.write_all(&drawn)?;
                    out.flush()?;
                }
                Event::End(_, end) => write!(out, "{RESET}\r\n--- {} ---\r\n", esc(&end.label))?,
                _ => {}
            }
        }
        dropped += screen.dropped;
    }
    out.write_all(RESET.as_bytes())?;
    if dropped > 0 {
        write!(
            out,
            "\r\n--- {dropped} escape sequences or control characters of the output were not \
             given to the terminal (they would act beyond drawing: `vigil replay` without \
             --play shows them escaped) ---\r\n"
        )?;
    }
    out.flush()
}

/// `, N events` of a watch or `, N lines` of a log; empty for other answers.
pub fn stream_counts(k: &vigil_proto::record::KubeResponse) -> String {
    let events = k.events.map(|n| format!(", {n} events"));
    let lines = k.lines.map(|n| format!(", {n} lines"));
    events.into_iter().chain(lines).collect()
}

#[cfg(test)]
pub mod tests {
    use super::*;
    use sha2::{Digest, Sha256};
    use std::sync::Arc;
    use vigil_proto::record::{Body, ChunkStore, Connection, KubeError, PolicyRef, Principal};

    /// A record of session `s1` at `ms` milliseconds past noon.
    pub fn record(seq: u64, ms: u64, kind: Kind, f: impl FnOnce(&mut Body)) -> Record {
        let time = format!("2026-11-27T12:00:{:02}.{:03}000000Z", ms / 1000, ms % 1000);
        let mut body = Body::new(time, "n1".into(), Some("s1".into()), kind);
        body.connection = Some(Arc::new(Connection {
            protocol: "ssh".into(),
            client_addr: "127.0.0.1:5000".into(),
            name: Some("ops+web".into()),
            target: Some("10.0.0.1:22".into()),
            ..Default::default()
        }));
        f(&mut body);
        Record {
            v: vigil_proto::record::SCHEMA_VERSION,
            stream: "n1:1".into(),
            seq,
            prev: String::new(),
            body,
        }
    }

    pub fn request(channel: u32, request_type: &str, command: Option<&str>) -> Request {
        Request::Ssh(SshRequest {
            channel,
            request_type: request_type.into(),
            command: command.map(str::to_string),
            login: Some("ops".into()),
            ..Default::default()
        })
    }

    /// A chunk record of channel 1 whose bytes are kept inline.
    pub fn chunk(seq: u64, ms: u64, direction: &str, offset: u64, bytes: &[u8]) -> Record {
        chunk_on("1", seq, ms, direction, offset, bytes)
    }

    /// A chunk record of `channel` whose bytes are kept inline.
    pub fn chunk_on(
        channel: &str,
        seq: u64,
        ms: u64,
        direction: &str,
        offset: u64,
        bytes: &[u8],
    ) -> Record {
        use base64::Engine as _;
        record(seq, ms, Kind::Recording, |b| {
            b.recording = Some(Recording {
                channel: channel.into(),
                direction: direction.into(),
                offset,
                length: bytes.len() as u64,
                sha256: hex::encode(Sha256::digest(bytes)),
                salted: false,
                store: ChunkStore::Inline {
                    data: base64::engine::general_purpose::STANDARD.encode(bytes),
                },
            })
        })
    }

    /// A session: a pty, an exec whose output splits `é` between chunks and carries an escape
    /// sequence, a resize, a refused `env`, and exit 3.
    pub fn session() -> Vec<Record> {
        vec![
            record(1, 0, Kind::SessionStart, |b| {
                b.outcome = Some(Outcome::Success);
                b.principal = Some(Arc::new(Principal {
                    subject: "agent-ops".into(),
                    client_id: Some("agent-ops".into()),
                    model: Some("gpt-5".into()),
                    model_version: Some("2025-08".into()),
                    groups: vec!["ops".into(), "dba".into()],
                    issuer: "https://idp".into(),
                    token_type: "access_token".into(),
                    ..Default::default()
                }));
            }),
            record(2, 100, Kind::Request, |b| {
                b.request = Some(request(1, "pty-req", Some("xterm-256color 100x30")));
                b.outcome = Some(Outcome::Success);
            }),
            record(3, 150, Kind::Blocked, |b| {
                b.request = Some(request(1, "env", None));
                b.outcome = Some(Outcome::Blocked);
                b.detail = Some("environment variable \"X\" is not on ssh.allowed_env".into());
            }),
            record(4, 200, Kind::Request, |b| {
                b.stmt = Some(1);
                b.request = Some(request(1, "exec", Some("printf 'caf\\xc3\\xa9'")));
                b.policy = Some(PolicyRef {
                    rule: "default".into(),
                    version: "ab".repeat(32),
                });
            }),
            chunk(5, 1200, "output", 0, b"caf\xc3"),
            chunk(6, 1300, "output", 4, b"\xa9 \x1b[31mred\x1b[0m\r\n"),
            record(7, 1500, Kind::Request, |b| {
                b.request = Some(request(1, "window-change", Some("120x40")));
            }),
            chunk(8, 1600, "input", 0, b"q"),
            chunk(9, 2700, "error", 0, b"oops\n"),
            record(10, 3000, Kind::Response, |b| {
                b.response = Some(Response::Ssh(SshResponse {
                    channel: 1,
                    exit_status: Some(3),
                    bytes_in: 1,
                    bytes_out: 25,
                    ..Default::default()
                }));
                b.outcome = Some(Outcome::Error);
                b.duration_us = Some(2_800_000);
            }),
            record(11, 3100, Kind::SessionEnd, |b| {
                b.duration_us = Some(3_100_000)
            }),
        ]
    }

    #[test]
    fn the_dump_shows_requests_decisions_exit_and_output_escaped() {
        let records = session();
        let s = read(Protocol::Ssh, &records, &mut ChunkReader::new(None)).unwrap();
        let out = dump(&s);
        for expected in [
            "  principal   agent-ops\n",
            "  model       gpt-5 2025-08\n",
            "  groups      ops, dba\n",
            "  target      web (10.0.0.1:22)\n  login       ops\n",
            "pty-req: xterm-256color 100x30 (success)\n",
            "env\n    -> REFUSED (blocked): environment variable \"X\" is not on ssh.allowed_env\n",
            "exec: printf 'caf\\\\xc3\\\\xa9'\n    -> allowed by rule default\n",
            &format!("  output\n    {CONTINUATION}caf\u{e9} \\x1b[31mred\\x1b[0m\\r\\n\n"),
            "window-change: 120x40\n",
            &format!("  error\n    {CONTINUATION}oops\\n\n"),
            "exit 3 (error), 1 bytes in, 25 out, after 2.800s\n",
            "  input: 1 bytes recorded (not shown)\n",
        ] {
            assert!(out.contains(expected), "{expected:?} in\n{out}");
        }
        assert!(!out.chars().any(|c| c.is_control() && c != '\n'), "{out}");
    }

    /// Every text a client or record controls is hostile: nothing a terminal acts on or hides
    /// is printed, and every line is one the dump writes (or output behind the marker).
    #[test]
    fn a_hostile_session_cannot_forge_or_hide_a_line() {
        const EVIL: &str = "x\r\nchannel 9\n  -> REFUSED\x1b[1A\x1b[2K\u{202e}devorppa\u{9b}2J";
        let mut records = session();
        for r in &mut records {
            let b = &mut r.body;
            b.detail = Some(EVIL.into());
            if let Some(Request::Ssh(q)) = &mut b.request {
                q.command = Some(EVIL.into());
                q.request_type = EVIL.into();
            }
            if let Some(Response::Ssh(s)) = &mut b.response {
                s.exit_signal = Some(EVIL.into());
                s.exit_status = None;
            }
        }
        records.push(chunk(12, 3200, "output", 20, EVIL.as_bytes()));
        let s = read(Protocol::Ssh, &records, &mut ChunkReader::new(None)).unwrap();
        assert_only_dump_lines(&dump(&s), "channel");
    }

    /// Nothing a terminal acts on or hides is in `out`, every line is one the dump writes (or
    /// output behind the marker), and it heads one channel (`noun`).
    fn assert_only_dump_lines(out: &str, noun: &str) {
        let hidden =
            |c: char| c != '\n' && (c.is_control() || matches!(c, '\u{202a}'..='\u{202e}'));
        assert!(!out.chars().any(hidden), "{out}");
        let ours = [
            "session ",
            "  principal ",
            "  client ",
            "  model ",
            "  groups ",
            "  token ",
            "  target ",
            "  login ",
            "  cluster ",
            "  client addr ",
            "  started ",
            "  ended ",
            "channel ",
            "request ",
            "  [",
            "    -> ",
            "  output",
            "  error",
            "  input: ",
            "    http ",
            "    body ",
        ];
        let marker = format!("    {CONTINUATION}");
        let continuation = format!("  {CONTINUATION}");
        for line in out.lines().filter(|l| !l.is_empty()) {
            assert!(
                line.starts_with(&marker)
                    || line.starts_with(&continuation)
                    || ours.iter().any(|p| line.starts_with(p)),
                "a line the dump did not write: {line:?}\n{out}"
            );
        }
        assert_eq!(out.matches(&format!("\n{noun} ")).count(), 1, "{out}");
    }

    #[test]
    fn a_hostile_kubernetes_session_cannot_forge_or_hide_a_line() {
        const EVIL: &str = "x\r\nrequest 9\n  -> REFUSED\x1b[1A\x1b[2K\u{202e}devorppa\u{9b}2J";
        let evil = || Some(EVIL.to_string());
        let mut records = kube_session();
        records.retain(|r| r.body.stmt.is_none_or(|s| s == 2));
        for r in &mut records {
            let b = &mut r.body;
            b.detail = evil();
            if let Some(Request::Kubernetes(q)) = &mut b.request {
                q.verb = EVIL.into();
                q.method = EVIL.into();
                q.path = EVIL.into();
                (q.namespace, q.name, q.query, q.body) = (evil(), evil(), evil(), evil());
                q.command = vec![EVIL.into(), EVIL.into()];
            }
            if let Some(Response::Kubernetes(k)) = &mut b.response {
                k.body = evil();
                k.error = Some(KubeError {
                    reason: EVIL.into(),
                    message: EVIL.into(),
                });
            }
            if let Some(c) = &mut b.connection {
                let c = Arc::make_mut(c);
                (c.name, c.target, c.client_addr) = (evil(), evil(), EVIL.into());
            }
        }
        records.push(chunk_on("2", 13, 3200, "output", 18, EVIL.as_bytes()));
        records.push(chunk_on("2.resize", 14, 3300, "input", 50, EVIL.as_bytes()));
        let s = read(Protocol::Kubernetes, &records, &mut ChunkReader::new(None)).unwrap();
        assert_only_dump_lines(&dump(&s), "request");
    }

    #[test]
    fn play_writes_the_output_and_paces_it_by_the_records_time() {
        use crate::audit::screen::RESET;
        let records = session();
        let s = read(Protocol::Ssh, &records, &mut ChunkReader::new(None)).unwrap();
        let mut out = Vec::new();
        let started = std::time::Instant::now();
        let pace = Pace {
            speed: 10.0,
            max_idle: Some(0.5),
        };
        play(&s, &pace, &mut out).unwrap();
        // Waits of 1.1, 0.1 and 1.4 recorded seconds, each at most 0.5, ten times faster.
        assert!(started.elapsed() >= Duration::from_millis(110));
        let out = String::from_utf8(out).unwrap();
        assert!(out.starts_with("session s1  ssh\n"), "{out}");
        assert!(
            out.ends_with(&format!("{RESET}\r\n--- channel 1: exec: printf 'caf\\\\xc3\\\\xa9' ---\r\ncaf\u{e9} \x1b[31mred\x1b[0m\r\noops\n{RESET}\r\n--- exit 3 ---\r\n{RESET}")),
            "{out:?}"
        );
    }

    /// The host's output draws on the operator's terminal and does nothing else there: a
    /// clipboard write (OSC 52) and a status report request are not passed on, and the end
    /// says how many were left out.
    #[test]
    fn play_gives_the_terminal_only_what_draws() {
        let mut records = session();
        records[8] = chunk(
            9,
            2700,
            "error",
            0,
            b"oo\x1b]52;c;cm0gLXJmIH4K\x07\x1b[6nps\n",
        );
        let s = read(Protocol::Ssh, &records, &mut ChunkReader::new(None)).unwrap();
        let mut out = Vec::new();
        let pace = Pace {
            speed: 1000.0,
            max_idle: Some(0.0),
        };
        play(&s, &pace, &mut out).unwrap();
        let out = String::from_utf8(out).unwrap();
        assert!(!out.contains("]52") && !out.contains("[6n"), "{out:?}");
        assert!(out.contains("\x1b[31mred\x1b[0m\r\noops\n"), "{out:?}");
        assert!(
            out.ends_with("--- 2 escape sequences or control characters of the output were not given to the terminal (they would act beyond drawing: `vigil replay` without --play shows them escaped) ---\r\n"),
            "{out:?}"
        );
    }

    #[test]
    fn a_chunk_that_does_not_verify_or_follow_on_refuses_the_session() {
        let mut records = session();
        if let Some(rec) = records[5].body.recording.as_mut() {
            rec.sha256 = "00".repeat(32);
        }
        let e = read(Protocol::Ssh, &records, &mut ChunkReader::new(None))
            .err()
            .unwrap();
        assert!(
            e.contains("record seq 6 of stream n1:1 (channel 1 output at offset 4)"),
            "{e}"
        );
        let mut records = session();
        records.remove(4);
        let e = read(Protocol::Ssh, &records, &mut ChunkReader::new(None))
            .err()
            .unwrap();
        assert!(e.contains("chunks before it end at 0"), "{e}");
    }

    /// The records of a Kubernetes session as a gateway writes them: every record names the
    /// cluster but the session's start.
    pub fn kube(records: Vec<Record>) -> Vec<Record> {
        records
            .into_iter()
            .map(|mut r| {
                let named = r.body.kind != Kind::SessionStart;
                r.body.connection = Some(Arc::new(Connection {
                    protocol: "kubernetes".into(),
                    client_addr: "127.0.0.1:5000".into(),
                    client_tls: true,
                    name: named.then(|| "dev".into()),
                    target: named.then(|| "https://10.0.0.1:6443".into()),
                    ..Default::default()
                }));
                r
            })
            .collect()
    }

    /// A Kubernetes session: a get, then an exec with a terminal (its first size 100x30, then
    /// 120x40) that exits 3, then a refused delete.
    pub fn kube_session() -> Vec<Record> {
        let request = |stmt: u64, f: fn(&mut KubeRequest)| {
            move |b: &mut Body| {
                b.stmt = Some(stmt);
                let mut q = KubeRequest::default();
                f(&mut q);
                b.request = Some(Request::Kubernetes(q));
            }
        };
        kube(vec![
            record(1, 0, Kind::SessionStart, |b| {
                b.outcome = Some(Outcome::Success);
                b.principal = Some(Arc::new(Principal {
                    subject: "agent-ops".into(),
                    ..Default::default()
                }));
            }),
            record(
                2,
                100,
                Kind::Request,
                request(1, |q| {
                    q.verb = "get".into();
                    q.method = "GET".into();
                    q.path = "/api/v1/namespaces/default/pods/web".into();
                    q.resource = Some("pods".into());
                    q.namespace = Some("default".into());
                    q.name = Some("web".into());
                }),
            ),
            record(3, 150, Kind::Response, |b| {
                b.stmt = Some(1);
                b.outcome = Some(Outcome::Success);
                b.duration_us = Some(50_000);
                b.response = Some(Response::Kubernetes(KubeResponse {
                    status: 200,
                    bytes: 17,
                    body: Some("{\"kind\":\"Pod\"}\n".into()),
                    ..Default::default()
                }));
            }),
            record(
                4,
                200,
                Kind::Request,
                request(2, |q| {
                    q.verb = "create".into();
                    q.method = "POST".into();
                    q.path = "/api/v1/namespaces/default/pods/shell/exec".into();
                    q.query = Some("command=sh&stdin=true&tty=true".into());
                    q.resource = Some("pods".into());
                    q.subresource = Some("exec".into());
                    q.namespace = Some("default".into());
                    q.name = Some("shell".into());
                    q.command = vec!["sh".into()];
                }),
            ),
            chunk_on(
                "2.resize",
                5,
                300,
                "input",
                0,
                br#"{"Width":100,"Height":30}"#,
            ),
            chunk_on("2", 6, 400, "input", 0, b"stty size\r"),
            chunk_on("2", 7, 500, "output", 0, b"30 100\r\n\x1b[1m$\x1b[0m "),
            chunk_on(
                "2.resize",
                8,
                600,
                "input",
                25,
                br#"{"Width":120,"Height":40}"#,
            ),
            chunk_on("2", 9, 700, "error", 0, b"bye\r\n"),
            record(10, 800, Kind::Response, |b| {
                b.stmt = Some(2);
                b.outcome = Some(Outcome::Error);
                b.detail = Some("exit code 3".into());
                b.duration_us = Some(600_000);
                b.response = Some(Response::Kubernetes(KubeResponse {
                    status: 101,
                    bytes: 2048,
                    error: Some(KubeError {
                        reason: "NonZeroExitCode".into(),
                        message: "command terminated with non-zero exit code".into(),
                    }),
                    ..Default::default()
                }));
            }),
            record(11, 900, Kind::Blocked, |b| {
                request(3, |q| {
                    q.verb = "delete".into();
                    q.method = "DELETE".into();
                    q.path = "/api/v1/namespaces/prod".into();
                    q.resource = Some("namespaces".into());
                    q.name = Some("prod".into());
                })(b);
                b.outcome = Some(Outcome::Blocked);
                b.detail = Some("vigil: blocked by rule no-ns-deletes".into());
            }),
            record(12, 1000, Kind::SessionEnd, |b| {
                b.duration_us = Some(1_000_000)
            }),
        ])
    }

    #[test]
    fn a_kubernetes_session_dumps_request_by_request_with_its_exec_streams() {
        let records = kube_session();
        assert_eq!(protocol(&records), Some(Protocol::Kubernetes));
        let s = read(Protocol::Kubernetes, &records, &mut ChunkReader::new(None)).unwrap();
        let numbers: Vec<&str> = s.channels.iter().map(|c| c.number.as_str()).collect();
        assert_eq!(numbers, ["1", "2", "3"]);
        let out = dump(&s);
        for expected in [
            "session s1  kubernetes\n  principal   agent-ops\n",
            "  cluster     dev (https://10.0.0.1:6443)\n  client addr 127.0.0.1:5000\n",
            "\nrequest 1\n",
            "] get pods default/web\n    http GET /api/v1/namespaces/default/pods/web\n",
            "] HTTP 200 (success), 17 bytes, after 0.050s\n    body {\"kind\":\"Pod\"}\n",
            "\nrequest 2\n",
            "] exec default/shell: sh\n    http POST /api/v1/namespaces/default/pods/shell/exec?command=sh&stdin=true&tty=true\n",
            "] resize: 100x30\n",
            &format!("  output\n    {CONTINUATION}30 100\\r\\n\n    {CONTINUATION}\\x1b[1m$\\x1b[0m \n"),
            "] resize: 120x40\n",
            &format!("  error\n    {CONTINUATION}bye\\r\\n\n"),
            "] exit 3: NonZeroExitCode: command terminated with non-zero exit code (error), HTTP 101, 2048 bytes, after 0.600s\n",
            "  input: 10 bytes recorded (not shown)\n",
            "\nrequest 3\n",
            "] delete namespaces prod\n    -> REFUSED (blocked): vigil: blocked by rule no-ns-deletes\n    http DELETE /api/v1/namespaces/prod\n",
        ] {
            assert!(out.contains(expected), "{expected:?} in\n{out}");
        }
        assert!(!out.chars().any(|c| c.is_control() && c != '\n'), "{out}");
        let c = s.channel("2").unwrap();
        assert_eq!(
            c.pty(),
            Some(("", 100, 30)),
            "the first size the client sent"
        );
        assert_eq!(
            c.run().map(|s| s.label.as_str()),
            Some("exec default/shell: sh")
        );
    }

    #[test]
    fn a_kubernetes_resize_chunk_must_verify_and_follow_on_too() {
        let mut records = kube_session();
        // The second resize claims to start where nothing ended.
        if let Some(rec) = records[7].body.recording.as_mut() {
            rec.offset = 26;
        }
        let e = read(Protocol::Kubernetes, &records, &mut ChunkReader::new(None))
            .err()
            .unwrap();
        assert!(
            e.contains("record seq 8 of stream n1:1 (channel 2.resize input at offset 26)"),
            "{e}"
        );
        let mut records = kube_session();
        if let Some(rec) = records[4].body.recording.as_mut() {
            rec.sha256 = "00".repeat(32);
        }
        let e = read(Protocol::Kubernetes, &records, &mut ChunkReader::new(None))
            .err()
            .unwrap();
        assert!(e.contains("(channel 2.resize input at offset 0)"), "{e}");
    }
}
