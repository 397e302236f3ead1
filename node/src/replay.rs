//! Reading the local log back: verification of every stream, the list of sessions, and the
//! replay of one session as a readable transcript.

use crate::audit::{log_files, stream_of};
use std::fmt::Write as _;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use vigil_proto::record::{Kind, Outcome, Record};

/// An outcome as written in records (`success`, `denied` …), `-` when absent.
fn outcome(o: Option<Outcome>) -> String {
    o.and_then(|o| serde_json::to_value(o).ok())
        .and_then(|v| v.as_str().map(str::to_string))
        .unwrap_or_else(|| "-".into())
}
use vigil_proto::verify::Verifier;

/// Calls `f(file, line number, bytes, terminated)` for every line of every stream file under
/// `path`; `terminated` is false only for a last line without its newline.
fn each_line(
    path: &Path,
    mut f: impl FnMut(&Path, usize, &[u8], bool),
) -> std::io::Result<Vec<PathBuf>> {
    let files = log_files(path)?;
    for file in &files {
        let mut reader = BufReader::new(std::fs::File::open(file)?);
        let mut line = Vec::with_capacity(1024);
        let mut n = 0;
        loop {
            line.clear();
            if reader.read_until(b'\n', &mut line)? == 0 {
                break;
            }
            n += 1;
            match line.strip_suffix(b"\n") {
                Some(bytes) => f(file, n, bytes, true),
                None => f(file, n, &line, false),
            }
        }
    }
    Ok(files)
}

/// Verifies every stream file under `path`: each file must hold exactly one stream, whole. A
/// last line without its newline is judged by [`Verifier::push_unterminated`] (a torn tail is
/// reported, not failed).
pub fn verify_path(path: &Path) -> std::io::Result<(Verifier, usize)> {
    let mut verifier = Verifier::new();
    let mut expected: Option<(PathBuf, String)> = None;
    let files = each_line(path, |file, n, bytes, terminated| {
        // The first record of a file names the stream the whole file must hold (the file's
        // name when that record cannot be read).
        if expected.as_ref().is_none_or(|(f, _)| f != file) {
            let stream = serde_json::from_slice::<serde_json::Value>(bytes)
                .ok()
                .and_then(|v| v.get("stream").and_then(|s| s.as_str()).map(str::to_string))
                .or_else(|| stream_of(file))
                .unwrap_or_default();
            expected = Some((file.to_path_buf(), stream));
        }
        let stream = expected.as_ref().map_or("", |(_, s)| s.as_str());
        let location = format!("{}:{n}", file.display());
        if terminated {
            verifier.push(&location, bytes, Some(stream));
        } else {
            verifier.push_unterminated(&location, bytes, stream);
        }
    })?;
    Ok((verifier, files.len()))
}

/// All records of sessions whose id starts with `prefix`, in log order.
pub fn session_records(path: &Path, prefix: &str) -> std::io::Result<Vec<Record>> {
    let mut out = Vec::new();
    each_line(path, |_, _, bytes, _| {
        if let Ok(r) = Record::parse(bytes) {
            if r.body
                .session
                .as_deref()
                .is_some_and(|s| s.starts_with(prefix))
            {
                out.push(r);
            }
        }
    })?;
    Ok(out)
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
            b.session.as_deref().unwrap_or("-"),
            b.time,
            p.map(|p| p.subject.as_str()).unwrap_or("(unauthenticated)"),
            p.and_then(|p| p.model.as_deref()).unwrap_or("-"),
            b.connection
                .as_ref()
                .and_then(|c| c.name.as_deref())
                .unwrap_or("-"),
            outcome(b.outcome),
        );
    })?;
    Ok(out)
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
                    b.session.as_deref().unwrap_or("-"),
                    b.time
                );
                if let Some(p) = &b.principal {
                    let _ = writeln!(out, "  principal   {}", p.subject);
                    if let Some(c) = &p.client_id {
                        let _ = writeln!(out, "  client      {c}");
                    }
                    if p.model.is_some() || p.model_version.is_some() {
                        let _ = writeln!(
                            out,
                            "  model       {} {}",
                            p.model.as_deref().unwrap_or("-"),
                            p.model_version.as_deref().unwrap_or("")
                        );
                    }
                    if !p.groups.is_empty() {
                        let _ = writeln!(out, "  groups      {}", p.groups.join(", "));
                    }
                    if let Some(i) = &p.intent {
                        let _ = writeln!(out, "  intent      {i}");
                    }
                    let _ = writeln!(out, "  token       {} from {}", p.token_type, p.issuer);
                }
                if let Some(c) = &b.connection {
                    let _ = writeln!(
                        out,
                        "  connection  {} -> {} (client {}, tls {})",
                        c.name.as_deref().unwrap_or("-"),
                        c.target.as_deref().unwrap_or("-"),
                        c.client_addr,
                        c.client_tls
                    );
                }
                let _ = writeln!(out, "  outcome     {}", outcome(b.outcome));
                if let Some(d) = &b.detail {
                    let _ = writeln!(out, "  detail      {d}");
                }
            }
            Kind::Request => {
                if let Some(q) = &b.request {
                    let _ = writeln!(out, "\n[{}] #{} {}", b.time, b.stmt.unwrap_or(0), q.text);
                    if let Some(params) = q.params.as_ref().filter(|p| !p.is_empty()) {
                        let _ = writeln!(out, "  params {params:?}");
                    }
                }
            }
            Kind::Response => {
                if let Some(resp) = &b.response {
                    let _ = writeln!(
                        out,
                        "  -> #{} {} {} rows, {} bytes, {} us{}",
                        b.stmt.unwrap_or(0),
                        outcome(b.outcome),
                        resp.rows,
                        resp.bytes,
                        b.duration_us.unwrap_or(0),
                        if resp.tags.is_empty() {
                            String::new()
                        } else {
                            format!(" [{}]", resp.tags.join(", "))
                        }
                    );
                    if let Some(e) = &resp.error {
                        let _ = writeln!(out, "     error {} {}", e.sqlstate, e.message);
                    }
                    if !resp.columns.is_empty() {
                        let _ = writeln!(out, "     | {}", resp.columns.join(" | "));
                    }
                    for row in &resp.result {
                        let cells: Vec<&str> =
                            row.iter().map(|v| v.as_deref().unwrap_or("NULL")).collect();
                        let _ = writeln!(out, "     | {}", cells.join(" | "));
                    }
                    if resp.truncated {
                        let _ = writeln!(
                            out,
                            "     … truncated; sha256 of the remaining rows {}",
                            resp.digest.as_deref().unwrap_or("-")
                        );
                    }
                }
            }
            Kind::SessionEnd => {
                let _ = writeln!(
                    out,
                    "\nsession end {}  {} ({} us)",
                    b.time,
                    b.detail.as_deref().unwrap_or(""),
                    b.duration_us.unwrap_or(0)
                );
            }
            Kind::Blocked => {
                let rule = b
                    .policy
                    .as_ref()
                    .map(|p| format!(" (rule {})", p.rule))
                    .unwrap_or_default();
                let text = b.request.as_ref().map(|q| q.text.as_str()).unwrap_or("");
                let _ = writeln!(
                    out,
                    "\n[{}] #{} {text}\n  -> #{} REFUSED{rule}: {}",
                    b.time,
                    b.stmt.unwrap_or(0),
                    b.stmt.unwrap_or(0),
                    b.detail.as_deref().unwrap_or("")
                );
            }
            _ => {
                let _ = writeln!(
                    out,
                    "\n[{}] {:?} {} {}",
                    b.time,
                    b.kind,
                    outcome(b.outcome),
                    b.detail.as_deref().unwrap_or("")
                );
                if let Some(q) = &b.request {
                    let _ = writeln!(out, "  request {}", q.text);
                }
            }
        }
    }
    out
}
