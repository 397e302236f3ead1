//! `vigil recording export`: one channel of an SSH session as an asciicast v2 file
//! (<https://docs.asciinema.org/manual/asciicast/v2/>), for asciinema's player and tools.
//!
//! The header's size and `TERM` come from the channel's `pty-req` (80x24 without one), its
//! timestamp from the channel's first record. Events: `o` for output and error chunks, `i` for
//! input, `r` for each `window-change`, `m` (markers) for the command the channel ran, each
//! refused request, each signal sent and the exit. Times are the records' `time`, from the
//! channel's first record, never decreasing (log order is not strictly time order).
//!
//! The cast is ASCII: every other character in its strings is written as a `\u` escape, so
//! printing the file shows the recorded escape sequences instead of running them, while a JSON
//! reader gets the exact text back.

use crate::recording::Utf8Stream;
use crate::terminal::{exit_label, request_label, secs, size_of, Channel, Event};
use serde_json::{json, Value};
use std::fmt::Write as _;

/// The cast of channel `c` of session `session`: the header line, then one line per event.
pub fn cast(session: &str, c: &Channel<'_>) -> String {
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
    let command = c.run().map(request_label).unwrap_or_else(|| "-".into());
    let header = json!({
        "version": 2,
        "width": width,
        "height": height,
        "timestamp": start.floor() as u64,
        "env": env,
        "title": format!("vigil {session} channel {}: {command}", c.number),
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
            Event::Request(_, q) => match q.request_type.as_str() {
                "window-change" => {
                    if let Some((cols, rows)) = q.command.as_deref().and_then(size_of) {
                        events.push((clock, "r", format!("{cols}x{rows}")));
                    }
                }
                "pty-req" => {}
                _ => events.push((clock, "m", request_label(q))),
            },
            Event::Blocked(r, q) => {
                let mut label = format!("refused {}", request_label(q));
                if let Some(d) = &r.body.detail {
                    let _ = write!(label, ": {d}");
                }
                events.push((clock, "m", label));
            }
            Event::End(_, end) => {
                finish(&mut streams, clock, &mut events);
                events.push((clock, "m", exit_label(end)));
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
    use crate::recording::ChunkReader;
    use crate::terminal::tests::session;

    fn lines(cast: &str) -> Vec<Value> {
        cast.lines()
            .map(|l| serde_json::from_str(l).expect("each line is JSON"))
            .collect()
    }

    #[test]
    fn a_channel_is_a_cast_with_its_size_markers_resizes_and_exact_text() {
        let records = session();
        let s = crate::terminal::read(&records, &mut ChunkReader::new(None)).unwrap();
        let cast = cast("s1", s.channel("1").unwrap());
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
        use crate::terminal::tests::{chunk, record, request};
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
        let s = crate::terminal::read(&records, &mut ChunkReader::new(None)).unwrap();
        let lines = lines(&cast("s1", s.channel("1").unwrap()));
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
    fn json_outside_printable_ascii_is_escaped() {
        assert_eq!(
            ascii_json(&json!("a\u{9b}2J\u{7f}é😀")),
            r#""a\u009b2J\u007f\u00e9\ud83d\ude00""#
        );
    }
}
