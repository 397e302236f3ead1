//! Arbitrary bytes, in arbitrary chunks, through the WebSocket readers of every Kubernetes
//! channel protocol, in both directions (masked from the client, unmasked from the server).
//! Refusals are fine; panics are not, and neither is a reader that forwards anything but the
//! input, holds more than its limits allow, or reads the same bytes differently when they
//! arrive in other chunks.
//!
//! Input: a config byte, a chunking byte, then the stream.
//! - config bits 0-2: the protocol (V1, Base64, V4, V4Base64, V5, PortForward,
//!   PortForwardBase64, SpdyTunnel); bit 3: from the client; bit 4: small limits; bits 6-7:
//!   how many ports a port-forward reader has (1 to 4);
//! - config bit 5: the stream is built from records instead of taken as is, so that the
//!   fuzzer spends its time past the framing: each record is `FLAGS LEN PAYLOAD[LEN]`; FLAGS
//!   bit 3 set: PAYLOAD[0] is a channel and the rest its data, written as one message by the
//!   protocol's writer; otherwise one frame with opcode `FLAGS & 7` (continuation, text,
//!   binary, close, ping, pong, binary, text), FIN from bit 7, masked per direction unless bit
//!   6 flips it, the mask key taken from the record's first bytes.
//! - the chunking byte seeds the chunk lengths (1 to 64 bytes; 0: the stream whole).
#![no_main]

use libfuzzer_sys::fuzz_target;
use vigil_node::kube::websocket::{
    encode_frame, ChannelProtocol, Direction, Limits, Opcode, WsEvent, WsMessage, WsReader,
    WsWriter,
};

const PROTOCOLS: [ChannelProtocol; 8] = [
    ChannelProtocol::V1,
    ChannelProtocol::Base64,
    ChannelProtocol::V4,
    ChannelProtocol::V4Base64,
    ChannelProtocol::V5,
    ChannelProtocol::PortForward,
    ChannelProtocol::PortForwardBase64,
    ChannelProtocol::SpdyTunnel,
];

const PORTS: [u16; 4] = [80, 443, 8080, 5432];

const OPCODES: [Opcode; 8] = [
    Opcode::Continuation,
    Opcode::Text,
    Opcode::Binary,
    Opcode::Close,
    Opcode::Ping,
    Opcode::Pong,
    Opcode::Binary,
    Opcode::Text,
];

struct Config {
    direction: Direction,
    protocol: ChannelProtocol,
    limits: Limits,
    ports: usize,
}

impl Config {
    fn reader(&self) -> WsReader {
        let reader = match self.protocol {
            ChannelProtocol::PortForward | ChannelProtocol::PortForwardBase64 => {
                WsReader::port_forward(self.direction, self.protocol, &PORTS[..self.ports])
                    .expect("valid port list")
            }
            p => WsReader::new(self.direction, p),
        };
        reader.with_limits(self.limits)
    }
}

/// Builds a stream from records (see the module doc).
fn build(config: &Config, mut records: &[u8]) -> Vec<u8> {
    let writer = WsWriter::new(config.direction, config.protocol).with_mask_key([1, 2, 3, 4]);
    let mut out = Vec::new();
    while let [flags, len, rest @ ..] = records {
        let len = usize::from(*len).min(rest.len());
        let (payload, tail) = rest.split_at(len);
        records = tail;
        if flags & 0x08 != 0 {
            if let Some((&channel, data)) = payload.split_first() {
                if let Ok(frame) = writer.channel(channel, data) {
                    out.extend_from_slice(&frame);
                }
            }
            continue;
        }
        let masked = (config.direction == Direction::ClientToServer) != (flags & 0x40 != 0);
        let mut key = [0x5a; 4];
        for (k, b) in key.iter_mut().zip(payload) {
            *k = *b;
        }
        let opcode = OPCODES[usize::from(flags & 7)];
        out.extend_from_slice(&encode_frame(
            flags & 0x80 != 0,
            opcode,
            payload,
            masked.then_some(key),
        ));
    }
    out
}

/// Feeds `stream` in chunks; returns the events of the calls that succeeded and the bytes
/// they forwarded.
fn run(config: &Config, stream: &[u8], seed: u8) -> (Vec<WsEvent>, Vec<u8>) {
    let mut reader = config.reader();
    let bound = 14 + config.limits.max_frame_payload + 2 * config.limits.max_message;
    let mut state = u32::from(seed) | 1;
    let mut fed = 0usize;
    let mut events = Vec::new();
    let mut forwarded = Vec::new();
    let mut failed = false;
    let mut rest = stream;
    while !rest.is_empty() {
        let n = if seed == 0 {
            rest.len()
        } else {
            state ^= state << 13;
            state ^= state >> 17;
            state ^= state << 5;
            (state % 64 + 1) as usize
        }
        .min(rest.len());
        let (chunk, tail) = rest.split_at(n);
        rest = tail;
        match reader.push(chunk) {
            Ok(new) => {
                assert!(!failed, "a failed reader stays failed");
                fed += chunk.len();
                for event in new {
                    if event.raw.is_empty() {
                        // Only a control frame between fragments travels with its message.
                        assert!(
                            matches!(
                                event.message,
                                WsMessage::Ping { .. } | WsMessage::Pong { .. }
                            ),
                            "{event:?}"
                        );
                    }
                    forwarded.extend_from_slice(&event.raw);
                    events.push(event);
                }
                assert_eq!(
                    &forwarded[..],
                    &stream[..forwarded.len()],
                    "forwarded bytes are the input's"
                );
                assert_eq!(forwarded.len() + reader.held(), fed);
            }
            Err(_) => failed = true,
        }
        assert!(
            reader.buffered() <= bound,
            "{} > {bound}",
            reader.buffered()
        );
    }
    if !failed {
        let _ = reader.finish();
    }
    (events, forwarded)
}

fuzz_target!(|data: &[u8]| {
    let [config, seed, stream @ ..] = data else {
        return;
    };
    let small = config & 0x10 != 0;
    let config_value = Config {
        direction: if config & 0x08 != 0 {
            Direction::ClientToServer
        } else {
            Direction::ServerToClient
        },
        protocol: PROTOCOLS[usize::from(config & 7)],
        limits: if small {
            Limits {
                max_frame_payload: 200,
                max_message: 600,
            }
        } else {
            Limits::default()
        },
        ports: usize::from(config >> 6) + 1,
    };
    let built;
    let stream = if config & 0x20 != 0 {
        built = build(&config_value, stream);
        &built[..]
    } else {
        stream
    };
    let (mut events, forwarded) = run(&config_value, stream, *seed);
    // The bytes forwarded, read again whole, read the same; but for control frames read
    // between the fragments of a message that never ended: their bytes were not forwarded.
    while events.last().is_some_and(|e| e.raw.is_empty()) {
        events.pop();
    }
    let mut again = config_value.reader();
    let whole = again.push(&forwarded).expect("forwarded bytes read again");
    assert_eq!(whole, events, "chunking changed the reading");
    assert_eq!(again.held(), 0);
});
