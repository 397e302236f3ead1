//! `vigil replay` of an SSH session: who and where, then each channel with its requests, their
//! decisions, its exit and its terminal output.
//!
//! Every chunk of the session is read from its store and proved by its record, and every
//! channel's chunks must follow on from each other, before anything is shown ([`read`]): a
//! session with one chunk that does not verify is refused as a whole.
//!
//! The dump ([`dump`]) prints the output escaped, like every text `vigil` did not write
//! ([`crate::display`]): an escape sequence is shown, never run, and each line of output shows
//! its own terminator (`\r\n`, `\n`) and sits behind the continuation marker. Only [`play`],
//! which the operator asks for by name, writes the recorded bytes to the terminal as they are.

use crate::display::{escape as esc, escape_lines, push_invalid, CONTINUATION};
use crate::recording::{chunk_name, ChunkReader, Continuity, Utf8Stream};
use std::collections::HashMap;
use std::fmt::Write as _;
use std::time::Duration;
use vigil_proto::record::{
    Kind, Outcome, Record, Recording, Request, Response, SshRequest, SshResponse,
};

/// Request types that run something on a channel (the channel's command).
const RUNS: [&str; 4] = ["exec", "shell", "subsystem", "scp"];

/// One record of a channel, in log order.
pub enum Event<'a> {
    /// A request on the channel (`pty-req`, `exec`, `window-change`, `signal` …).
    Request(&'a Record, &'a SshRequest),
    /// A request the gateway refused (`detail` says why).
    Blocked(&'a Record, &'a SshRequest),
    /// A recorded chunk, with its bytes, proved by its record.
    Chunk(&'a Record, &'a Recording, Vec<u8>),
    /// How the channel ended.
    End(&'a Record, &'a SshResponse),
}

impl Event<'_> {
    pub fn record(&self) -> &Record {
        match self {
            Event::Request(r, _) | Event::Blocked(r, _) | Event::Chunk(r, _, _) => r,
            Event::End(r, _) => r,
        }
    }
}

/// A channel of the session, as the client numbered it.
pub struct Channel<'a> {
    pub number: String,
    pub events: Vec<Event<'a>>,
}

impl Channel<'_> {
    /// The request that ran something on the channel (allowed or refused).
    pub fn run(&self) -> Option<&SshRequest> {
        self.events.iter().find_map(|e| match e {
            Event::Request(_, q) | Event::Blocked(_, q)
                if RUNS.contains(&q.request_type.as_str()) =>
            {
                Some(*q)
            }
            _ => None,
        })
    }

    /// The terminal type, columns and rows of the channel's `pty-req` (`TERM COLSxROWS`).
    pub fn pty(&self) -> Option<(&str, u32, u32)> {
        self.events.iter().find_map(|e| match e {
            Event::Request(_, q) if q.request_type == "pty-req" => {
                let (term, size) = q.command.as_deref()?.rsplit_once(' ')?;
                let (cols, rows) = size_of(size)?;
                Some((term, cols, rows))
            }
            _ => None,
        })
    }
}

/// `COLSxROWS`, as `pty-req` and `window-change` records write a terminal's size.
pub fn size_of(s: &str) -> Option<(u32, u32)> {
    let (cols, rows) = s.split_once('x')?;
    Some((cols.parse().ok()?, rows.parse().ok()?))
}

/// An SSH session read back from its records.
pub struct Session<'a> {
    pub id: String,
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

/// Whether `records` (of one session) are an SSH session's.
pub fn is_ssh(records: &[Record]) -> bool {
    records
        .iter()
        .find_map(|r| r.body.connection.as_ref())
        .is_some_and(|c| c.protocol == "ssh")
}

/// The session of `records`, every chunk read with `reader` and proved by its record, and
/// following on from the chunks before it on its channel and direction; else which chunk does
/// not verify, and why.
pub fn read<'a>(records: &'a [Record], reader: &mut ChunkReader) -> Result<Session<'a>, String> {
    let mut session = Session {
        id: records
            .iter()
            .find_map(|r| r.body.session.clone())
            .unwrap_or_default(),
        start: None,
        end: None,
        channels: Vec::new(),
    };
    let mut index: HashMap<String, usize> = HashMap::new();
    let mut continuity = Continuity::default();
    for r in records {
        let b = &r.body;
        let (number, event) = match (b.kind, &b.request, &b.response, &b.recording) {
            (Kind::SessionStart, ..) => {
                if session
                    .start
                    .is_none_or(|s| s.body.outcome != Some(Outcome::Success))
                {
                    session.start = Some(r);
                }
                continue;
            }
            (Kind::SessionEnd, ..) => {
                session.end = Some(r);
                continue;
            }
            (Kind::Request, Some(Request::Ssh(q)), ..) => {
                (q.channel.to_string(), Event::Request(r, q))
            }
            (Kind::Blocked, Some(Request::Ssh(q)), ..) => {
                (q.channel.to_string(), Event::Blocked(r, q))
            }
            (Kind::Response, _, Some(Response::Ssh(s)), _) => {
                (s.channel.to_string(), Event::End(r, s))
            }
            (Kind::Recording, _, _, Some(rec)) => {
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
                (rec.channel.clone(), Event::Chunk(r, rec, bytes))
            }
            _ => continue,
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

/// The header of the replay: who, from where, to which host as which login, and when.
fn header(s: &Session<'_>) -> String {
    let mut out = format!("session {}  ssh\n", esc(&s.id));
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
    if let Some(c) = start.and_then(|b| b.connection.as_deref()) {
        // The client logs in as LOGIN+TARGET.
        let name = c.name.as_deref().unwrap_or("-");
        let (login, host) = vigil_node::ssh::config::split_user(name).unwrap_or(("-", name));
        let _ = writeln!(
            out,
            "  target      {} ({})\n  login       {}\n  client addr {}",
            esc(host),
            esc(c.target.as_deref().unwrap_or("-")),
            esc(login),
            esc(&c.client_addr)
        );
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

/// A request as the replay names it: `exec: COMMAND`, `pty-req: xterm 80x24`, `direct-tcpip
/// to HOST:PORT`. Not escaped: for the cast file, which is JSON; the dump escapes it.
pub fn request_label(q: &SshRequest) -> String {
    let mut label = q.request_type.clone();
    if let Some(c) = &q.command {
        label += ": ";
        label += c;
    }
    if let Some(f) = &q.forward {
        label += " to ";
        label += f;
    }
    label
}

/// How a channel ended: `exit 3`, `signal KILL`, and the gateway's error. Not escaped.
pub fn exit_label(s: &SshResponse) -> String {
    let mut label = match (s.exit_status, &s.exit_signal) {
        (Some(status), _) => format!("exit {status}"),
        (None, Some(signal)) => format!("signal {signal}"),
        (None, None) => "no exit status".into(),
    };
    if let Some(e) = &s.error {
        label += ": ";
        label += &e.message;
    }
    label
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

/// The line of a request or refusal in the dump.
fn request_line(out: &mut String, r: &Record, q: &SshRequest, blocked: bool) {
    let b = &r.body;
    let _ = write!(
        out,
        "  [{}] {}",
        esc(&b.time),
        escape_lines(&request_label(q), "  ")
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
        let _ = writeln!(out, "\nchannel {}", esc(&c.number));
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

/// A request, refusal or end, as a line of the dump.
fn event_line(out: &mut String, e: &Event<'_>) {
    match e {
        Event::Request(r, q) => request_line(out, r, q, false),
        Event::Blocked(r, q) => request_line(out, r, q, true),
        Event::End(r, s) => {
            let b = &r.body;
            let _ = writeln!(
                out,
                "  [{}] {} ({}), {} bytes in, {} out, after {}",
                esc(&b.time),
                esc(&exit_label(s)),
                outcome(b.outcome),
                s.bytes_in,
                s.bytes_out,
                duration(b.duration_us.unwrap_or(0))
            );
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
    out.write_all(header(s).as_bytes())?;
    for c in &s.channels {
        let what = c.run().map(request_label).unwrap_or_else(|| "-".into());
        write!(
            out,
            "\r\n--- channel {}: {} ---\r\n",
            esc(&c.number),
            escape_lines(&what, "")
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
                    out.write_all(bytes)?;
                    out.flush()?;
                }
                Event::End(_, end) => write!(out, "\r\n--- {} ---\r\n", esc(&exit_label(end)))?,
                _ => {}
            }
        }
    }
    out.flush()
}

#[cfg(test)]
pub mod tests {
    use super::*;
    use sha2::{Digest, Sha256};
    use std::sync::Arc;
    use vigil_proto::record::{Body, ChunkStore, Connection, PolicyRef, Principal};

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

    /// A chunk record whose bytes are kept inline.
    pub fn chunk(seq: u64, ms: u64, direction: &str, offset: u64, bytes: &[u8]) -> Record {
        use base64::Engine as _;
        record(seq, ms, Kind::Recording, |b| {
            b.recording = Some(Recording {
                channel: "1".into(),
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
        let s = read(&records, &mut ChunkReader::new(None)).unwrap();
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
        let s = read(&records, &mut ChunkReader::new(None)).unwrap();
        let out = dump(&s);
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
            "  client addr ",
            "  started ",
            "  ended ",
            "channel ",
            "  [",
            "    -> ",
            "  output",
            "  error",
            "  input: ",
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
        assert_eq!(out.matches("\nchannel ").count(), 1, "{out}");
    }

    #[test]
    fn play_writes_the_output_raw_and_paces_it_by_the_records_time() {
        let records = session();
        let s = read(&records, &mut ChunkReader::new(None)).unwrap();
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
            out.ends_with("--- channel 1: exec: printf 'caf\\\\xc3\\\\xa9' ---\r\ncaf\u{e9} \x1b[31mred\x1b[0m\r\noops\n\r\n--- exit 3 ---\r\n"),
            "{out:?}"
        );
    }

    #[test]
    fn a_chunk_that_does_not_verify_or_follow_on_refuses_the_session() {
        let mut records = session();
        if let Some(rec) = records[5].body.recording.as_mut() {
            rec.sha256 = "00".repeat(32);
        }
        let e = read(&records, &mut ChunkReader::new(None)).err().unwrap();
        assert!(
            e.contains("record seq 6 of stream n1:1 (channel 1 output at offset 4)"),
            "{e}"
        );
        let mut records = session();
        records.remove(4);
        let e = read(&records, &mut ChunkReader::new(None)).err().unwrap();
        assert!(e.contains("chunks before it end at 0"), "{e}");
    }
}
