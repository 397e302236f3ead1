//! Records and recorded bytes an operator did not write, through the readers `vigil replay`
//! and `vigil recording export` run on them: refusals are fine, panics are not; the escaped
//! dump never carries a control character to the terminal, and every line of an asciicast
//! export is JSON.
//!
//! Input: with a first byte 0, JSON lines of records (the audit log's own format). Otherwise a
//! program that builds a session: each step an opcode byte and its operands: a chunk of
//! output, error or input on one of three channels (its bytes are the fuzzer's, its digest
//! right, its offset right unless the opcode's top bit asks for a gap), a `pty-req`, a
//! `window-change`, an `exec` with the fuzzer's command line, an exit status, a chunk of a
//! Kubernetes resize channel (`N.resize`, the fuzzer's bytes where JSON sizes belong). Times
//! advance by the operand bytes, or are garbage. Every session is read both as SSH and as
//! Kubernetes.
#![no_main]

use base64::Engine as _;
use libfuzzer_sys::fuzz_target;
use serde_json::{json, Value};
use std::collections::HashMap;
use vigil_cli::recording::ChunkReader;
use vigil_cli::terminal::Protocol;
use vigil_cli::{asciicast, terminal};
use vigil_proto::record::{chunk_digest, Record};

const DIRECTIONS: [&str; 3] = ["output", "error", "input"];

fn record(seq: u64, time: &str, kind: &str, extra: Value) -> Option<Record> {
    let mut v = json!({
        "v": 2, "stream": "fuzz", "seq": seq, "prev": "0", "time": time, "node": "n",
        "session": "s1", "kind": kind,
    });
    for (k, x) in extra.as_object()? {
        v[k] = x.clone();
    }
    Record::parse(&serde_json::to_vec(&v).ok()?).ok()
}

fn time(ms: u64, garbage: bool) -> String {
    if garbage {
        return "not a time".into();
    }
    let (s, ms) = (ms / 1000, ms % 1000);
    format!("2026-12-03T10:{:02}:{:02}.{ms:03}000000Z", (s / 60) % 60, s % 60)
}

/// The session a program of steps describes.
fn build(mut data: &[u8]) -> Vec<Record> {
    let mut records = Vec::new();
    let connection = json!({"protocol": "ssh", "client_addr": "127.0.0.1:1", "client_tls": false});
    records.extend(record(0, &time(0, false), "session_start", json!({
        "connection": connection, "outcome": "success",
    })));
    let mut offsets: HashMap<(u8, usize), u64> = HashMap::new();
    let (mut seq, mut ms) = (1u64, 0u64);
    while let Some((&op, rest)) = data.split_first() {
        let Some((&arg, rest)) = rest.split_first() else { break };
        data = rest;
        ms += u64::from(arg) * 7;
        let at = time(ms, op == 0xff);
        let channel = arg % 3;
        let extra = match op & 0x7 {
            0..=2 | 7 => {
                let len = usize::from(arg).min(data.len());
                let (bytes, tail) = data.split_at(len);
                data = tail;
                let resize = op & 0x7 == 7;
                let direction = if resize { 3 } else { usize::from(op & 0x7) };
                let offset = offsets.entry((channel, direction)).or_default();
                let at_offset = *offset + u64::from(op & 0x80 != 0);
                *offset += len as u64;
                let name = match resize {
                    true => format!("{channel}.resize"),
                    false => channel.to_string(),
                };
                json!({"recording": {
                    "channel": name, "direction": DIRECTIONS[direction.min(2)],
                    "offset": at_offset, "length": len,
                    "sha256": chunk_digest(None, bytes),
                    "store": {"kind": "inline",
                              "data": base64::engine::general_purpose::STANDARD.encode(bytes)},
                }})
            }
            3 | 4 => {
                let request_type = if op & 0x7 == 3 { "pty-req" } else { "window-change" };
                let size = format!("{}x{}", data.first().copied().unwrap_or(0), arg);
                let command = if op & 0x7 == 3 { format!("xterm {size}") } else { size };
                json!({"request": {"protocol": "ssh", "channel": channel,
                                   "request_type": request_type, "command": command}})
            }
            5 => {
                let len = usize::from(arg).min(data.len());
                let (bytes, tail) = data.split_at(len);
                data = tail;
                json!({"request": {"protocol": "ssh", "channel": channel,
                                   "request_type": "exec",
                                   "command": String::from_utf8_lossy(bytes)}})
            }
            _ => json!({"response": {"protocol": "ssh", "channel": channel,
                                     "exit_status": arg, "bytes_in": 0, "bytes_out": 0}}),
        };
        let kind = match op & 0x7 {
            0..=2 | 7 => "recording",
            3..=5 => "request",
            _ => "response",
        };
        records.extend(record(seq, &at, kind, extra));
        seq += 1;
    }
    records
}

fuzz_target!(|data: &[u8]| {
    let records: Vec<Record> = match data.split_first() {
        Some((0, rest)) => rest
            .split(|b| *b == b'\n')
            .filter_map(|line| Record::parse(line).ok())
            .collect(),
        _ => build(data),
    };
    for protocol in [Protocol::Ssh, Protocol::Kubernetes] {
        let mut reader = ChunkReader::new(None);
        let Ok(session) = terminal::read(protocol, &records, &mut reader) else {
            continue;
        };
        let dump = terminal::dump(&session);
        assert!(
            !dump.chars().any(|c| c.is_control() && c != '\n'),
            "the dump carries a control character: {dump:?}"
        );
        for channel in &session.channels {
            let cast = asciicast::cast(&session, channel);
            for line in cast.lines() {
                serde_json::from_str::<Value>(line).expect("each asciicast line is JSON");
            }
        }
        let pace = terminal::Pace { speed: 1e9, max_idle: Some(0.0) };
        terminal::play(&session, &pace, &mut std::io::sink()).expect("a sink takes everything");
    }
});
