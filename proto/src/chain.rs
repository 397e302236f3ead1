//! The hash chain that links the records of one stream.
//!
//! Each record names its `stream`, its `seq` (0, 1, 2 … with no gaps) and `prev`, the hex
//! SHA-256 of the previous record's exact bytes (64 zeros for seq 0). The hash of a record is
//! SHA-256 over its bytes exactly as written, so a verifier never re-serialises anything.

use crate::record::{Body, SCHEMA_VERSION};
use sha2::{Digest, Sha256};

/// `prev` of the first record of every stream.
pub const GENESIS_PREV: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// SHA-256 of a record's exact bytes.
pub fn record_hash(bytes: &[u8]) -> [u8; 32] {
    Sha256::digest(bytes).into()
}

/// The node id of a stream id (`<node id>:<epoch>`): everything before the last `:`.
pub fn node_of(stream: &str) -> Option<&str> {
    stream
        .rsplit_once(':')
        .map(|(node, _)| node)
        .filter(|n| !n.is_empty())
}

/// The exact bytes every record of `stream` at `seq` after a record hashing to `prev` starts
/// with: the chain fields as [`Chain::seal`] writes them, up to and including the comma that
/// precedes the body.
pub fn record_prefix(stream: &str, seq: u64, prev: &[u8; 32]) -> Vec<u8> {
    let mut out = Vec::new();
    push_prefix(&mut out, &stream_json(stream), seq, prev);
    out
}

/// `stream` as a JSON string.
fn stream_json(stream: &str) -> String {
    serde_json::to_string(stream).expect("a string serialises")
}

/// Appends the chain fields (see [`record_prefix`]), `stream` already a JSON string. Written
/// piece by piece: it runs for every record.
fn push_prefix(out: &mut Vec<u8>, stream: &str, seq: u64, prev: &[u8; 32]) {
    let mut hex = [0; 64];
    hex::encode_to_slice(prev, &mut hex).expect("64 hex digits for 32 bytes");
    let mut digits = itoa::Buffer::new();
    out.extend_from_slice(b"{\"v\":");
    out.extend_from_slice(digits.format(SCHEMA_VERSION).as_bytes());
    out.extend_from_slice(b",\"stream\":");
    out.extend_from_slice(stream.as_bytes());
    out.extend_from_slice(b",\"seq\":");
    out.extend_from_slice(digits.format(seq).as_bytes());
    out.extend_from_slice(b",\"prev\":\"");
    out.extend_from_slice(&hex);
    out.extend_from_slice(b"\",");
}

/// The writer's side of one stream: it assigns `seq` and `prev` and remembers the last hash.
#[derive(Clone, Debug)]
pub struct Chain {
    stream: String,
    /// `stream` as a JSON string, as every record names it.
    stream_json: String,
    next_seq: u64,
    prev: [u8; 32],
}

impl Chain {
    /// A new stream, starting at seq 0.
    pub fn new(stream: impl Into<String>) -> Self {
        let stream = stream.into();
        Self {
            stream_json: stream_json(&stream),
            stream,
            next_seq: 0,
            prev: [0; 32],
        }
    }

    pub fn stream(&self) -> &str {
        &self.stream
    }

    /// The seq the next sealed record gets.
    pub fn next_seq(&self) -> u64 {
        self.next_seq
    }

    /// Hash of the last sealed record (all zeros, the genesis value, before the first).
    pub fn head_hash(&self) -> [u8; 32] {
        self.prev
    }

    /// Serialises `body` behind the chain fields, advances the chain and returns the record bytes.
    pub fn seal(&mut self, body: &Body) -> Vec<u8> {
        self.seal_serialized(&body.to_json())
    }

    /// Seals an already serialised body (a JSON object). Used by [`Chain::seal`] and by tests
    /// that need to craft records.
    pub fn seal_serialized(&mut self, body: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        self.seal_into(body, &mut out);
        out
    }

    /// Seals an already serialised body and appends the record's bytes to `out` (the writer's
    /// batch: no copy of its own).
    pub fn seal_into(&mut self, body: &[u8], out: &mut Vec<u8>) {
        debug_assert!(body.first() == Some(&b'{') && body.last() == Some(&b'}'));
        let start = out.len();
        let rest = &body[1..];
        out.reserve(self.stream_json.len() + rest.len() + 128);
        push_prefix(out, &self.stream_json, self.next_seq, &self.prev);
        if rest == b"}" {
            // An empty body: the prefix's comma closes the object instead.
            out.pop();
        }
        out.extend_from_slice(rest);
        self.prev = record_hash(&out[start..]);
        self.next_seq += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::{Kind, Record};

    fn body(kind: Kind) -> Body {
        Body::new(
            "2026-11-27T09:00:00.000000001Z".into(),
            "n1".into(),
            None,
            kind,
        )
    }

    #[test]
    fn sealed_records_link_by_hash_of_exact_bytes() {
        let mut chain = Chain::new("n1/1");
        let a = chain.seal(&body(Kind::StreamStart));
        let b = chain.seal(&body(Kind::StreamEnd));
        let ra = Record::parse(&a).unwrap();
        let rb = Record::parse(&b).unwrap();
        assert_eq!((ra.seq, ra.prev.as_str()), (0, GENESIS_PREV));
        assert_eq!(rb.seq, 1);
        assert_eq!(rb.prev, hex::encode(record_hash(&a)));
        assert_eq!(chain.head_hash(), record_hash(&b));
        assert_eq!(rb.body, body(Kind::StreamEnd));
    }

    #[test]
    fn stream_ids_name_their_node() {
        assert_eq!(node_of("gw-1:1795766400123456789"), Some("gw-1"));
        assert_eq!(node_of("a:b:7"), Some("a:b"));
        assert_eq!(node_of("no-epoch"), None);
        assert_eq!(node_of(":7"), None);
    }

    #[test]
    fn an_empty_body_still_makes_valid_json() {
        let mut chain = Chain::new("s");
        let bytes = chain.seal_serialized(b"{}");
        let v: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
        assert_eq!(v["seq"], 0);
    }
}
