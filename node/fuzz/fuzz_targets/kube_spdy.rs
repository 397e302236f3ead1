//! Both directions of a SPDY/3.1 connection, in arbitrary chunks, through the relay's readers
//! and its stream table. Errors are fine; panics are not, and neither is a reader that
//! changes, drops or invents a byte of the frames it accepts, holds more than one frame, or
//! describes a frame other than its bytes say.
//!
//! Input: a first byte choosing the limits (bit 0: small ones), then records
//! `TAG LEN(2, big-endian) BYTES`: TAG bit 0 is the side (0 client, 1 server), a short last
//! record takes what is left.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vigil_node::kube::spdy::{
    self, Frame, FrameKind, Limits, Side, SpdyReader, SpdyWriter, StreamTable,
};

struct Direction {
    reader: SpdyReader,
    pushed: Vec<u8>,
    forwarded: Vec<u8>,
    failed: bool,
}

fuzz_target!(|data: &[u8]| {
    let Some((&config, mut rest)) = data.split_first() else {
        return;
    };
    let limits = if config & 1 == 1 {
        Limits {
            max_data_len: 64,
            max_control_len: 256,
            max_header_block: 128,
        }
    } else {
        Limits::default()
    };
    let mut sides: Vec<Direction> = (0..2)
        .map(|_| Direction {
            reader: SpdyReader::new(limits),
            pushed: Vec::new(),
            forwarded: Vec::new(),
            failed: false,
        })
        .collect();
    let mut table = StreamTable::new(16);
    while let Some((&tag, tail)) = rest.split_first() {
        let len = match tail {
            [a, b, ..] => usize::from(u16::from_be_bytes([*a, *b])),
            _ => tail.len(),
        };
        let body = tail.get(2..).unwrap_or_default();
        let chunk = &body[..len.min(body.len())];
        rest = &body[chunk.len()..];
        let side = if tag & 1 == 0 {
            Side::Client
        } else {
            Side::Server
        };
        let d = &mut sides[usize::from(tag & 1)];
        if d.failed {
            continue;
        }
        d.pushed.extend_from_slice(chunk);
        d.reader.push(chunk);
        loop {
            match d.reader.next_frame() {
                Ok(Some(frame)) => {
                    check(&frame);
                    d.forwarded.extend_from_slice(frame.raw());
                    let _ = table.observe(side, frame.kind());
                }
                Ok(None) => {
                    assert!(
                        d.reader.buffered() < limits.max_buffered(),
                        "holds {} bytes",
                        d.reader.buffered()
                    );
                    break;
                }
                Err(_) => {
                    assert!(d.reader.next_frame().is_err(), "an error is final");
                    d.failed = true;
                    break;
                }
            }
        }
        assert_eq!(
            d.forwarded[..],
            d.pushed[..d.forwarded.len()],
            "forwarded bytes are the bytes read"
        );
        assert_eq!(d.forwarded.len() as u64, d.reader.consumed());
        if !d.failed {
            assert_eq!(d.forwarded.len() + d.reader.buffered(), d.pushed.len());
        }
    }
    assert!(table.open_streams().count() <= 16);
});

/// A frame says what its bytes say: frames without header blocks are written back to the
/// same bytes; header blocks hold only names and values the writer takes and the reader
/// reads back the same.
fn check(frame: &Frame) {
    let raw = frame.raw();
    assert!(raw.len() >= 8);
    let flags = raw[4];
    let rewritten = match frame.kind() {
        FrameKind::Data {
            stream_id,
            fin,
            payload,
        } => {
            assert_eq!(payload[..], raw[8..]);
            // Flags other than FIN are ignored on reading, so not written back.
            (flags & !spdy::FLAG_FIN == 0).then(|| spdy::data(*stream_id, *fin, payload).unwrap())
        }
        FrameKind::RstStream { stream_id, status } => {
            Some(spdy::rst_stream(*stream_id, *status).unwrap())
        }
        FrameKind::Ping { id } => Some(spdy::ping(*id)),
        FrameKind::GoAway {
            last_good_stream_id,
            status,
        } => Some(spdy::goaway(*last_good_stream_id, *status).unwrap()),
        FrameKind::WindowUpdate { stream_id, delta } => {
            (*delta != 0).then(|| spdy::window_update(*stream_id, *delta).unwrap())
        }
        FrameKind::Settings { clear, entries } => Some(spdy::settings(*clear, entries).unwrap()),
        FrameKind::SynStream { headers, .. }
        | FrameKind::SynReply { headers, .. }
        | FrameKind::Headers { headers, .. } => {
            let pairs: Vec<(&str, &str)> = headers.iter().collect();
            let written = SpdyWriter::new()
                .syn_reply(1, false, &pairs)
                .expect("what the reader accepts, the writer takes");
            let mut reader = SpdyReader::new(Limits {
                max_control_len: spdy::MAX_FRAME_LEN,
                max_header_block: spdy::MAX_FRAME_LEN,
                ..Limits::default()
            });
            reader.push(&written);
            match reader.next_frame() {
                Ok(Some(f)) => match f.kind() {
                    FrameKind::SynReply { headers: back, .. } => assert_eq!(back, headers),
                    other => panic!("read back as {other:?}"),
                },
                other => panic!("not read back: {other:?}"),
            }
            None
        }
        FrameKind::Unknown { .. } => None,
    };
    if let Some(rewritten) = rewritten {
        assert_eq!(rewritten[..], raw[..], "{:?}", frame.kind());
    }
}
