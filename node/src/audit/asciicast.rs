//! `vigil recording export`: one channel of an SSH session, or one request of a Kubernetes
//! session (an exec or attach with its streams), as an asciicast v2 file
//! (<https://docs.asciinema.org/manual/asciicast/v2/>), for asciinema's player and tools.
//!
//! The header's size and `TERM` come from the channel's `pty-req`, or else the first terminal
//! size its client sent (a Kubernetes resize; no `TERM`), 80x24 without either; its timestamp
//! from the channel's first record. Events: `o` for output and error chunks, `i` for input,
//! `r` for each `window-change` or resize, `m` (markers) for the command the channel ran, each
//! refused request, each signal sent and the exit. Times are the records' `time`, from the
//! channel's first record, never decreasing (log order is not strictly time order).
//!
//! The cast is ASCII: every other character in its strings is written as a `\u` escape, so
//! printing the file shows the recorded escape sequences instead of running them, while a JSON
//! reader gets the exact text back.

use crate::audit::recording::Utf8Stream;
use crate::audit::terminal::{secs, Channel, Event, Role, Session};
use serde_json::{json, Value};
use std::fmt::Write as _;

/// The cast of channel `c` of session `s`: the header line, then one line per event.
pub fn cast(s: &Session<'_>, c: &Channel<'_>) -> String {
    let (term, width, height) = c.pty().unwrap_or(("", 80, 24));
    let start = c
        .events
        .first()
        .and_then(|e| secs(&e.record().body.time))
        .unwrap_or(0.0);
    let mut env = serde_json::Map::new();
    if !term.is_empty() {
        env.insert("TERM".into(), term.into());
    }
    let command = c.run().map_or("-", |step| step.label.as_str());
    let header = json!({
        "version": 2,
        "width": width,
        "height": height,
        "timestamp": start.floor() as u64,
        "env": env,
        "title": format!("vigil {} {} {}: {command}", s.id, s.protocol.noun(), c.number),
    });
    let mut out = ascii_json(&header);
    out.push('\n');
    for (at, code, data) in events(c, start) {
        out += &ascii_json(&json!([(at * 1e6).round() / 1e6, code, data]));
        out.push('\n');
    }
    out
}

/// The channel's events: seconds since `start`, code, data.
fn events(c: &Channel<'_>, start: f64) -> Vec<(f64, &'static str, String)> {
    let mut events = Vec::new();
    let mut clock = 0.0f64;
    // One decoder per direction: a character split between two chunks of a direction is
    // completed by the next chunk of that direction, whatever comes between them.
    let mut streams: Vec<(&str, Utf8Stream)> = Vec::new();
    for e in &c.events {
        if let Some(t) = secs(&e.record().body.time) {
            clock = clock.max(t - start);
        }
        match e {
            Event::Chunk(_, rec, bytes) => {
                let direction = rec.direction.as_str();
                let i = match streams.iter().position(|(d, _)| *d == direction) {
                    Some(i) => i,
                    None => {
                        streams.push((direction, Utf8Stream::default()));
                        streams.len() - 1
                    }
                };
                let text = streams[i].1.feed_lossy(bytes);
                if !text.is_empty() {
                    events.push((clock, code(direction), text));
                }
            }
            Event::Request(_, step) => match step.role {
                Role::Resize { cols, rows } => events.push((clock, "r", format!("{cols}x{rows}"))),
                Role::Pty { .. } => {}
                Role::Runs | Role::Other => events.push((clock, "m", step.label.clone())),
            },
            Event::Blocked(r, step) => {
                let mut label = format!("refused {}", step.label);
                if let Some(d) = &r.body.detail {
                    let _ = write!(label, ": {d}");
                }
                events.push((clock, "m", label));
            }
            Event::End(_, end) => {
                finish(&mut streams, clock, &mut events);
                events.push((clock, "m", end.label.clone()));
            }
        }
    }
    finish(&mut streams, clock, &mut events);
    events
}

/// The bytes still carried over, which can never complete a character, replaced by U+FFFD.
fn finish(
    streams: &mut [(&str, Utf8Stream)],
    at: f64,
    events: &mut Vec<(f64, &'static str, String)>,
) {
    for (direction, stream) in streams {
        let text = stream.finish_lossy();
        if !text.is_empty() {
            events.push((at, code(direction), text));
        }
    }
}

/// The event code of a chunk's direction: `i` for input, `o` for output and error.
fn code(direction: &str) -> &'static str {
    if direction == "input" {
        "i"
    } else {
        "o"
    }
}

/// `value` as JSON on one line, every character outside printable ASCII as a `\u` escape
/// (UTF-16, as JSON spells characters beyond U+FFFF).
fn ascii_json(value: &Value) -> String {
    let mut out = String::new();
    for c in value.to_string().chars() {
        if c.is_ascii() && !c.is_ascii_control() {
            out.push(c);
        } else {
            for unit in c.encode_utf16(&mut [0; 2]) {
                let _ = write!(out, "\\u{unit:04x}");
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::recording::ChunkReader;
    use crate::audit::terminal::tests::{kube_session, session};
    use crate::audit::terminal::Protocol;

    fn lines(cast: &str) -> Vec<Value> {
        cast.lines()
            .map(|l| serde_json::from_str(l).expect("each line is JSON"))
            .collect()
    }

    #[test]
    fn a_channel_is_a_cast_with_its_size_markers_resizes_and_exact_text() {
        let records = session();
        let s = crate::audit::terminal::read(Protocol::Ssh, &records, &mut ChunkReader::new(None))
            .unwrap();
        let cast = cast(&s, s.channel("1").unwrap());
        assert!(cast.is_ascii(), "{cast}");
        assert!(
            !cast.contains('\x1b'),
            "escape sequences are \\u escapes: {cast}"
        );
        let lines = lines(&cast);
        assert_eq!(
            lines[0],
            json!({
                "version": 2,
                "width": 100,
                "height": 30,
                "timestamp": 1_795_780_800u64,
                "env": {"TERM": "xterm-256color"},
                "title": "vigil s1 channel 1: exec: printf 'caf\\xc3\\xa9'",
            })
        );
        let events: Vec<Value> = lines[1..].to_vec();
        assert_eq!(
            events,
            [
                json!([
                    0.05,
                    "m",
                    "refused env: environment variable \"X\" is not on ssh.allowed_env"
                ]),
                json!([0.1, "m", "exec: printf 'caf\\xc3\\xa9'"]),
                // The é split between two chunks is whole in the second event.
                json!([1.1, "o", "caf"]),
                json!([1.2, "o", "\u{e9} \x1b[31mred\x1b[0m\r\n"]),
                json!([1.4, "r", "120x40"]),
                json!([1.5, "i", "q"]),
                json!([2.6, "o", "oops\n"]),
                json!([2.9, "m", "exit 3"]),
            ]
        );
    }

    #[test]
    fn what_can_never_complete_is_replaced_and_time_never_goes_back() {
        use crate::audit::terminal::tests::{chunk, record, request};
        use vigil_proto::record::Kind;
        let records = vec![
            record(1, 500, Kind::Request, |b| {
                b.request = Some(request(1, "shell", None))
            }),
            chunk(2, 600, "output", 0, b"\xe2\x82"),
            chunk(3, 700, "error", 0, b"\xffok\xf0"),
            // Written later, stamped earlier.
            chunk(4, 400, "output", 2, b"x"),
        ];
        let s = crate::audit::terminal::read(Protocol::Ssh, &records, &mut ChunkReader::new(None))
            .unwrap();
        let lines = lines(&cast(&s, s.channel("1").unwrap()));
        assert_eq!(
            lines[0],
            json!({"version": 2, "width": 80, "height": 24, "timestamp": 1_795_780_800u64, "env": {}, "title": "vigil s1 channel 1: shell"})
        );
        assert_eq!(
            lines[1..],
            [
                json!([0.0, "m", "shell"]),
                json!([0.2, "o", "\u{fffd}ok"]),
                // The output's incomplete euro sign is cut short by "x".
                json!([0.2, "o", "\u{fffd}x"]),
                json!([0.2, "o", "\u{fffd}"]),
            ]
        );
    }

    #[test]
    fn a_kubernetes_exec_is_a_cast_sized_by_its_first_resize() {
        let records = kube_session();
        let s = crate::audit::terminal::read(
            Protocol::Kubernetes,
            &records,
            &mut ChunkReader::new(None),
        )
        .unwrap();
        let lines = lines(&cast(&s, s.channel("2").unwrap()));
        assert_eq!(
            lines[0],
            json!({
                "version": 2,
                "width": 100,
                "height": 30,
                "timestamp": 1_795_780_800u64,
                "env": {},
                "title": "vigil s1 request 2: exec default/shell: sh",
            })
        );
        assert_eq!(
            lines[1..],
            [
                json!([0.0, "m", "exec default/shell: sh"]),
                json!([0.1, "r", "100x30"]),
                json!([0.2, "i", "stty size\r"]),
                json!([0.3, "o", "30 100\r\n\u{1b}[1m$\u{1b}[0m "]),
                json!([0.4, "r", "120x40"]),
                json!([0.5, "o", "bye\r\n"]),
                json!([
                    0.6,
                    "m",
                    "exit 3: NonZeroExitCode: command terminated with non-zero exit code"
                ]),
            ]
        );
    }

    #[test]
    fn json_outside_printable_ascii_is_escaped() {
        assert_eq!(
            ascii_json(&json!("a\u{9b}2J\u{7f}é😀")),
            r#""a\u009b2J\u007f\u00e9\ud83d\ude00""#
        );
    }
}
