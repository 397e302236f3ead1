//! Reading the local log back: verification of every stream, the list of sessions, and the
//! replay of one session as a readable transcript.
//!
//! Every text taken from a record is printed through [`crate::display`], so nothing a client
//! or a record controls can move the cursor, recolour, reorder or forge a line of the output.

use crate::display::{escape as esc, escape_lines};
use std::fmt::Write as _;
use std::path::Path;
use vigil_node::audit::read::each_line;
pub use vigil_node::audit::read::{log_dir, session_records, verify_path};
use vigil_proto::record::{Kind, Outcome, Record, Request, Response};

/// An outcome as written in records (`success`, `denied` …), `-` when absent.
fn outcome(o: Option<Outcome>) -> String {
    o.and_then(|o| serde_json::to_value(o).ok())
        .and_then(|v| v.as_str().map(str::to_string))
        .unwrap_or_else(|| "-".into())
}

/// One line per session: id, start time, subject, model, connection, outcome.
pub fn list_sessions(path: &Path) -> std::io::Result<String> {
    let mut out = String::new();
    each_line(path, |_, _, bytes, _| {
        let Ok(r) = Record::parse(bytes) else { return };
        let b = &r.body;
        if b.kind != Kind::SessionStart {
            return;
        }
        let p = b.principal.as_deref();
        let _ = writeln!(
            out,
            "{}  {}  {:<24} {:<20} {:<12} {}",
            esc(b.session.as_deref().unwrap_or("-")),
            esc(&b.time),
            esc(p.map(|p| p.subject.as_str()).unwrap_or("(unauthenticated)")),
            esc(p.and_then(|p| p.model.as_deref()).unwrap_or("-")),
            esc(b
                .connection
                .as_ref()
                .and_then(|c| c.name.as_deref())
                .unwrap_or("-")),
            outcome(b.outcome),
        );
    })?;
    Ok(out)
}

/// A statement's text as the transcript prints it: escaped, its lines kept as lines, each
/// continuation line behind [`crate::display::CONTINUATION`].
fn statement(text: &str) -> std::borrow::Cow<'_, str> {
    escape_lines(text, "  ")
}

/// Bind parameters as `["value", NULL, …]`, each value escaped.
fn params_list(params: &[Option<String>]) -> String {
    let items: Vec<String> = params
        .iter()
        .map(|p| match p {
            Some(v) => format!("\"{}\"", esc(v)),
            None => "NULL".into(),
        })
        .collect();
    format!("[{}]", items.join(", "))
}

/// A readable transcript of a session.
pub fn render(records: &[Record]) -> String {
    let mut out = String::new();
    for r in records {
        let b = &r.body;
        match b.kind {
            Kind::SessionStart => {
                let _ = writeln!(
                    out,
                    "session {}  {}",
                    esc(b.session.as_deref().unwrap_or("-")),
                    esc(&b.time)
                );
                if let Some(p) = &b.principal {
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
                    if let Some(i) = &p.intent {
                        let _ = writeln!(out, "  intent      {}", esc(i));
                    }
                    let _ = writeln!(
                        out,
                        "  token       {} from {}",
                        esc(&p.token_type),
                        esc(&p.issuer)
                    );
                }
                if let Some(c) = &b.connection {
                    let _ = writeln!(
                        out,
                        "  connection  {} -> {} (client {}, tls {})",
                        esc(c.name.as_deref().unwrap_or("-")),
                        esc(c.target.as_deref().unwrap_or("-")),
                        esc(&c.client_addr),
                        c.client_tls
                    );
                    if let Some(a) = &c.application {
                        let _ = writeln!(out, "  application {}", esc(a));
                    }
                    if let Some(a) = &c.balancer_addr {
                        let _ = writeln!(out, "  balancer    {}", esc(a));
                    }
                }
                let _ = writeln!(out, "  outcome     {}", outcome(b.outcome));
                if let Some(d) = &b.detail {
                    let _ = writeln!(out, "  detail      {}", esc(d));
                }
            }
            Kind::Request => {
                if let Some(q) = &b.request {
                    let _ = writeln!(
                        out,
                        "\n[{}] #{} {}",
                        esc(&b.time),
                        b.stmt.unwrap_or(0),
                        request_text(q)
                    );
                    if let Request::Postgres(q) = q {
                        if let Some(params) = q.params.as_ref().filter(|p| !p.is_empty()) {
                            let _ = writeln!(out, "  params {}", params_list(params));
                        }
                        // What `EXECUTE name` ran: the text the target held under the name.
                        for p in &q.prepared {
                            let _ =
                                writeln!(out, "  runs {} = {}", esc(&p.name), statement(&p.text));
                        }
                    }
                }
            }
            Kind::Response => {
                if let Some(resp) = &b.response {
                    response(&mut out, b, resp);
                }
            }
            Kind::Recording => {
                if let Some(r) = &b.recording {
                    let _ = writeln!(
                        out,
                        "  ~ channel {} {} bytes {}..{} sha256 {}",
                        esc(&r.channel),
                        esc(&r.direction),
                        r.offset,
                        r.offset.saturating_add(r.length),
                        esc(&r.sha256)
                    );
                }
            }
            Kind::SessionEnd => {
                let _ = writeln!(
                    out,
                    "\nsession end {}  {} ({} us)",
                    esc(&b.time),
                    esc(b.detail.as_deref().unwrap_or("")),
                    b.duration_us.unwrap_or(0)
                );
            }
            Kind::Blocked => {
                let rule = b
                    .policy
                    .as_ref()
                    .map(|p| format!(" (rule {})", esc(&p.rule)))
                    .unwrap_or_default();
                let text = b.request.as_ref().map(request_text).unwrap_or_default();
                let _ = writeln!(
                    out,
                    "\n[{}] #{} {}\n  -> #{} REFUSED{rule}: {}",
                    esc(&b.time),
                    b.stmt.unwrap_or(0),
                    text,
                    b.stmt.unwrap_or(0),
                    esc(b.detail.as_deref().unwrap_or(""))
                );
            }
            _ => {
                let _ = writeln!(
                    out,
                    "\n[{}] {:?} {} {}",
                    esc(&b.time),
                    b.kind,
                    outcome(b.outcome),
                    esc(b.detail.as_deref().unwrap_or(""))
                );
                if let Some(q) = &b.request {
                    let _ = writeln!(out, "  request {}", request_text(q));
                }
            }
        }
    }
    out
}

/// A request on one line, in its protocol's terms (safe to print).
fn request_text(q: &Request) -> String {
    match q {
        Request::Postgres(q) => statement(&q.text).to_string(),
        Request::Ssh(q) => format!(
            "ssh channel {} {}{}",
            q.channel,
            esc(&q.request_type),
            q.command
                .as_deref()
                .map(|c| format!(": {}", statement(c)))
                .unwrap_or_default()
        ),
        Request::Kubernetes(q) => {
            let mut what = esc(&q.verb).into_owned();
            for part in [&q.resource, &q.subresource, &q.namespace, &q.name]
                .into_iter()
                .flatten()
            {
                what.push(' ');
                what.push_str(&esc(part));
            }
            if !q.command.is_empty() {
                what.push_str(": ");
                what.push_str(&statement(&q.command.join(" ")));
            }
            let query = q
                .query
                .as_deref()
                .map(|x| format!("?{}", esc(x)))
                .unwrap_or_default();
            let mut line = format!("{what} ({} {}{query})", esc(&q.method), esc(&q.path));
            if let Some(body) = &q.body {
                line.push_str(&format!(
                    ", body {} bytes: {}",
                    q.body_bytes,
                    statement(body)
                ));
            }
            line
        }
        Request::Console(q) => format!("console {} of session {}", esc(&q.action), esc(&q.session)),
    }
}

/// What came back for a request (safe to print).
fn response(out: &mut String, b: &vigil_proto::record::Body, resp: &Response) {
    let head = |out: &mut String, what: String| {
        let _ = writeln!(
            out,
            "  -> #{} {} {what}, {} us",
            b.stmt.unwrap_or(0),
            outcome(b.outcome),
            b.duration_us.unwrap_or(0),
        );
    };
    match resp {
        Response::Postgres(resp) => {
            head(
                out,
                format!(
                    "{} rows, {} bytes{}",
                    resp.rows,
                    resp.bytes,
                    if resp.tags.is_empty() {
                        String::new()
                    } else {
                        let tags: Vec<_> = resp.tags.iter().map(|t| esc(t)).collect();
                        format!(" [{}]", tags.join(", "))
                    }
                ),
            );
            if let Some(e) = &resp.error {
                let _ = writeln!(out, "     error {} {}", esc(&e.sqlstate), esc(&e.message));
            }
            if !resp.columns.is_empty() {
                let columns: Vec<_> = resp.columns.iter().map(|c| esc(c)).collect();
                let _ = writeln!(out, "     | {}", columns.join(" | "));
            }
            for row in &resp.result {
                let cells: Vec<_> = row
                    .iter()
                    .map(|v| esc(v.as_deref().unwrap_or("NULL")))
                    .collect();
                let _ = writeln!(out, "     | {}", cells.join(" | "));
            }
            if resp.truncated {
                let _ = writeln!(
                    out,
                    "     … truncated; sha256 of the remaining rows {}",
                    esc(resp.digest.as_deref().unwrap_or("-"))
                );
            }
            for notice in &resp.notices {
                let _ = writeln!(out, "     notice: {}", esc(notice));
            }
            for n in &resp.notifications {
                let _ = writeln!(out, "     notify {}: {}", esc(&n.channel), esc(&n.payload));
            }
        }
        Response::Ssh(resp) => {
            let exit = match (&resp.exit_status, &resp.exit_signal) {
                (Some(s), _) => format!("exit {s}"),
                (None, Some(sig)) => format!("signal {}", esc(sig)),
                (None, None) => "no exit status".into(),
            };
            head(
                out,
                format!("{exit}, {} bytes in, {} out", resp.bytes_in, resp.bytes_out),
            );
            if let Some(e) = &resp.error {
                let _ = writeln!(out, "     error {}", esc(&e.message));
            }
        }
        Response::Kubernetes(resp) => {
            let counts = vigil_node::audit::terminal::stream_counts(resp);
            head(
                out,
                format!("HTTP {}, {} bytes{counts}", resp.status, resp.bytes),
            );
            if let Some(e) = &resp.error {
                let _ = writeln!(out, "     error {} {}", esc(&e.reason), esc(&e.message));
            }
            if let Some(body) = &resp.body {
                let _ = writeln!(out, "     body {}", statement(body));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use vigil_proto::record::{Body, Connection, PgError, PgRequest, PgResponse, Principal};

    const EVIL: &str = "x\r\n  -> #1 REFUSED: no\x1b[1A\x1b[2K\u{202e}devorppa\u{2066}\u{9b}2J";

    fn record(kind: Kind, f: impl FnOnce(&mut Body)) -> Record {
        let mut body = Body::new(EVIL.into(), EVIL.into(), Some("s1".into()), kind);
        body.stmt = Some(1);
        body.detail = Some(EVIL.into());
        f(&mut body);
        Record {
            v: vigil_proto::record::SCHEMA_VERSION,
            stream: "n1".into(),
            seq: 0,
            prev: String::new(),
            body,
        }
    }

    /// A transcript of records whose every text field is hostile: nothing a terminal acts on
    /// or hides is printed, and every line is one the transcript writes (or a statement's
    /// continuation behind the marker).
    #[test]
    fn a_hostile_session_cannot_forge_or_hide_a_line() {
        let evil = || EVIL.to_string();
        let records = [
            record(Kind::SessionStart, |b| {
                b.principal = Some(Arc::new(Principal {
                    subject: evil(),
                    client_id: Some(evil()),
                    model: Some(evil()),
                    model_version: Some(evil()),
                    groups: vec![evil(), evil()],
                    intent: Some(evil()),
                    issuer: evil(),
                    token_type: evil(),
                    token_exp: None,
                    token_id: None,
                    saml: None,
                    person: Some(evil()),
                }));
                b.connection = Some(Arc::new(Connection {
                    protocol: "postgres".into(),
                    client_addr: evil(),
                    balancer_addr: Some(evil()),
                    client_tls: true,
                    name: Some(evil()),
                    target: Some(evil()),
                    application: Some(evil()),
                }));
            }),
            record(Kind::Request, |b| {
                b.request = Some(Request::Postgres(PgRequest {
                    text: evil(),
                    params: Some(vec![Some(evil()), None]),
                    ..Default::default()
                }));
            }),
            record(Kind::Response, |b| {
                b.response = Some(Response::Postgres(PgResponse {
                    tags: vec![evil()],
                    columns: vec![evil()],
                    result: vec![vec![Some(evil()), None]],
                    truncated: true,
                    digest: Some(evil()),
                    error: Some(PgError {
                        sqlstate: evil(),
                        message: evil(),
                    }),
                    notices: vec![evil()],
                    notifications: vec![vigil_proto::record::PgNotification {
                        channel: evil(),
                        payload: evil(),
                    }],
                    ..Default::default()
                }));
            }),
            record(Kind::Blocked, |b| {
                b.request = Some(Request::Postgres(PgRequest {
                    text: evil(),
                    ..Default::default()
                }));
            }),
            record(Kind::Request, |b| {
                b.request = Some(Request::Ssh(vigil_proto::record::SshRequest {
                    request_type: evil(),
                    command: Some(evil()),
                    ..Default::default()
                }));
            }),
            record(Kind::Response, |b| {
                b.response = Some(Response::Ssh(vigil_proto::record::SshResponse {
                    exit_signal: Some(evil()),
                    error: Some(vigil_proto::record::SshError {
                        reason_code: None,
                        message: evil(),
                    }),
                    ..Default::default()
                }));
            }),
            record(Kind::Request, |b| {
                b.request = Some(Request::Kubernetes(vigil_proto::record::KubeRequest {
                    verb: evil(),
                    method: evil(),
                    path: evil(),
                    resource: Some(evil()),
                    namespace: Some(evil()),
                    name: Some(evil()),
                    command: vec![evil(), evil()],
                    query: Some(evil()),
                    body: Some(evil()),
                    ..Default::default()
                }));
            }),
            record(Kind::Response, |b| {
                b.response = Some(Response::Kubernetes(vigil_proto::record::KubeResponse {
                    status: 403,
                    bytes: 0,
                    error: Some(vigil_proto::record::KubeError {
                        reason: evil(),
                        message: evil(),
                    }),
                    body: Some(evil()),
                    ..Default::default()
                }));
            }),
            record(Kind::Recording, |b| {
                b.recording = Some(vigil_proto::record::Recording {
                    channel: evil(),
                    direction: evil(),
                    sha256: evil(),
                    ..Default::default()
                });
            }),
            record(Kind::SessionEnd, |_| {}),
        ];
        let out = render(&records);
        let hidden = |c: char| {
            c != '\n'
                && (c.is_control()
                    || matches!(c, '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}'))
        };
        assert!(!out.chars().any(hidden), "{out}");
        let continuation = format!("  {}", crate::display::CONTINUATION);
        let ours = [
            "session ",
            "  principal ",
            "  client ",
            "  model ",
            "  groups ",
            "  intent ",
            "  token ",
            "  connection ",
            "  application ",
            "  balancer ",
            "  outcome ",
            "  detail ",
            "  params ",
            "  -> #1 ",
            "     error ",
            "     body ",
            "     | ",
            "     … truncated",
            "     notice: ",
            "     notify ",
            "  ~ channel ",
            "[",
        ];
        for line in out.lines().filter(|l| !l.is_empty()) {
            assert!(
                line.starts_with(&continuation) || ours.iter().any(|p| line.starts_with(p)),
                "a line the transcript did not write: {line:?}\n{out}"
            );
        }
        // The forged refusal is on a continuation line, never at the start of one.
        assert_eq!(out.matches("\n  -> #1 REFUSED").count(), 1, "{out}");
    }
}
