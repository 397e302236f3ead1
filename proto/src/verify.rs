//! Verification of audit streams: pure, fed one record at a time, so the same code checks a
//! local log file or records read from a topic.
//!
//! What it proves: every record of a stream is present from seq 0 up to the last one seen, in
//! order, unmodified, and belongs to that stream. What it cannot prove on its own: that records
//! after the last one seen never existed (tail truncation). A graceful stream ends with a
//! `stream_end` record, and a stream without one is reported as open; signed checkpoints held by
//! a witness close that gap for streams that end abruptly.
//!
//! A torn tail (a process killed inside the `write(2)` of its last record) is reported as such,
//! never as a record and never silently: see [`Verifier::push_unterminated`] for exactly what
//! qualifies, and why it cannot hide tampering.

use crate::chain::{node_of, record_hash, record_prefix, GENESIS_PREV};
use crate::checkpoint::{Checkpoint, PinnedKeys};
use serde::Deserialize;
use std::collections::{BTreeMap, HashMap};
use std::fmt;

/// The chain fields every record carries.
#[derive(Debug, Deserialize)]
struct Envelope<'a> {
    v: u32,
    #[serde(borrow)]
    stream: std::borrow::Cow<'a, str>,
    seq: u64,
    #[serde(borrow)]
    prev: std::borrow::Cow<'a, str>,
    #[serde(borrow)]
    kind: std::borrow::Cow<'a, str>,
}

/// The fields of a node's `stream_start` (its `detail` names the node's release) and
/// `stream_end` records.
const FRAME_FIELDS: [&str; 8] = [
    "v", "stream", "seq", "prev", "time", "node", "kind", "detail",
];

/// Whether the record is a bare frame of its stream, one that says nothing of any session:
/// `stream_start` at seq 0 or `stream_end`, with none but the frame's fields.
fn is_frame(env: &Envelope<'_>, bytes: &[u8]) -> bool {
    let kind_fits = match env.kind.as_ref() {
        "stream_start" => env.seq == 0,
        "stream_end" => true,
        _ => false,
    };
    kind_fits
        && serde_json::from_slice::<serde_json::Map<String, serde_json::Value>>(bytes)
            .is_ok_and(|m| m.keys().all(|k| FRAME_FIELDS.contains(&k.as_str())))
}

/// Whether `bytes` are a whole record: a JSON object with the chain fields (whatever their
/// values). The last line of a stream file that is not is torn or malformed.
pub fn is_record(bytes: &[u8]) -> bool {
    serde_json::from_slice::<Envelope<'_>>(bytes).is_ok()
}

/// What is wrong with one record or checkpoint.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Problem {
    /// Not a JSON record with the chain fields.
    Malformed(String),
    /// Schema version this verifier does not know.
    UnknownVersion(u32),
    /// A record of another stream inside a sequence that must hold one stream only.
    ForeignStream { expected: String },
    /// Records are missing: `expected` was next, this record has a higher seq.
    Gap { expected: u64 },
    /// A lower seq than expected whose bytes differ from the record already seen at that seq,
    /// or a seq never seen arriving late (reordered).
    OutOfOrder { expected: u64 },
    /// Same stream and seq as an earlier record, different bytes.
    ConflictingDuplicate,
    /// `prev` is not the hash of the previous record: the previous record (or this one) was
    /// altered, or a record in between was removed.
    HashMismatch { expected_prev: String },
    /// A record after the stream's `stream_end` (at `end_seq`): a node writes nothing after
    /// it, so the record was appended by someone else, even if it chains correctly.
    AfterStreamEnd { end_seq: u64 },
    /// A witnessed checkpoint vouches for records up to `checkpoint_seq`, but the stream stops
    /// earlier: its tail was truncated (or rolled back).
    TruncatedBeforeCheckpoint { checkpoint_seq: u64 },
    /// A checkpoint vouches for records up to `checkpoint_seq` of a stream of which the source
    /// holds no record at all: the stream (its file, its messages) is missing.
    MissingStream { checkpoint_seq: u64 },
    /// The record at the checkpoint's seq is not the one the node signed for.
    CheckpointMismatch,
    /// A checkpoint whose signature does not verify.
    BadCheckpointSignature(String),
    /// A checkpoint signed by a key that is not the stream's (per the witness or the
    /// stream's other checkpoints).
    UnknownCheckpointKey,
    /// A checkpoint signed by a key not pinned for the stream's node (`--keys`).
    UnpinnedKey { node: String },
    /// A checkpoint message that is not a checkpoint.
    MalformedCheckpoint(String),
    /// A checkpoint message whose key is not the stream the checkpoint covers.
    MisfiledCheckpoint { key: Option<String> },
    /// With a witness: the stream holds records besides its `stream_start` and `stream_end`,
    /// and the witness holds no checkpoint of it. A stream needs no key to be made, and a
    /// node has its stream witnessed from its first seconds, so nothing tells these records
    /// from ones written by someone else.
    Unwitnessed,
    /// The bytes of a recorded chunk, read from its store, are not the ones its `recording`
    /// record proves (or cannot be read): which chunk, and what is wrong.
    BadChunk(String),
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Problem::Malformed(e) => write!(f, "malformed record: {e}"),
            Problem::UnknownVersion(v) => write!(f, "unknown schema version {v}"),
            Problem::ForeignStream { expected } => {
                write!(f, "record of another stream spliced into stream {expected}")
            }
            Problem::Gap { expected } => write!(f, "gap: expected seq {expected}"),
            Problem::OutOfOrder { expected } => {
                write!(f, "out of order: expected seq {expected}")
            }
            Problem::ConflictingDuplicate => {
                write!(f, "conflicting duplicate: same seq, different bytes")
            }
            Problem::HashMismatch { expected_prev } => write!(
                f,
                "hash mismatch: prev does not match the previous record (expected {expected_prev})"
            ),
            Problem::AfterStreamEnd { end_seq } => write!(
                f,
                "record after the stream's end: the stream ended at seq {end_seq} (stream_end), \
                 and a node writes nothing after it"
            ),
            Problem::TruncatedBeforeCheckpoint { checkpoint_seq } => write!(
                f,
                "truncated: a checkpoint vouches for records up to seq {checkpoint_seq}, which are missing"
            ),
            Problem::MissingStream { checkpoint_seq } => write!(
                f,
                "missing stream: a checkpoint vouches for records up to seq {checkpoint_seq}, and the source holds none of them"
            ),
            Problem::CheckpointMismatch => {
                write!(f, "the record at the checkpoint's seq is not the one signed for")
            }
            Problem::BadCheckpointSignature(e) => write!(f, "bad checkpoint signature: {e}"),
            Problem::UnknownCheckpointKey => {
                write!(f, "checkpoint signed by a key that is not the stream's")
            }
            Problem::UnpinnedKey { node } => {
                write!(f, "checkpoint signed by a key not pinned for node {node}")
            }
            Problem::MalformedCheckpoint(e) => write!(f, "malformed checkpoint: {e}"),
            Problem::MisfiledCheckpoint { key } => match key {
                Some(key) => write!(f, "checkpoint published under the key of stream {key}"),
                None => write!(f, "checkpoint published without a message key"),
            },
            Problem::BadChunk(e) => write!(f, "recorded chunk does not verify: {e}"),
            Problem::Unwitnessed => write!(
                f,
                "unwitnessed: the witness holds no checkpoint of this stream, so nothing tells its records from ones written by someone else"
            ),
        }
    }
}

/// One failure, located.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Failure {
    /// Where the record came from (file and line, or topic/partition/offset).
    pub location: String,
    /// The stream the record names (or the expected stream when it could not be read).
    pub stream: String,
    pub seq: Option<u64>,
    pub problem: Problem,
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.seq {
            Some(seq) => write!(
                f,
                "{}: stream {} seq {}: {}",
                self.location, self.stream, seq, self.problem
            ),
            None => write!(
                f,
                "{}: stream {}: {}",
                self.location, self.stream, self.problem
            ),
        }
    }
}

/// The torn last line of a stream file: the beginning of a record whose write never finished.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TornTail {
    /// File and line.
    pub location: String,
    /// How many bytes of the record were written.
    pub bytes: u64,
}

/// Per-stream result.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct StreamSummary {
    pub verified: u64,
    pub identical_duplicates: u64,
    /// Highest seq accepted in order (`None`: no record of the stream was read).
    pub last_seq: Option<u64>,
    /// Hex hash of the last record accepted in order.
    pub head: String,
    /// Whether the stream's last record is a `stream_end`.
    pub ended: bool,
    /// The highest seq a valid checkpoint vouches for (after [`Verifier::check_checkpoints`]).
    pub anchored_seq: Option<u64>,
    /// Records after the last checkpoint: present and chained, but nothing proves that more
    /// did not follow them (normal for the last seconds of an open stream).
    pub unanchored: u64,
    /// The stream's file ends in a torn record (not a failure, never a record).
    pub torn_tail: Option<TornTail>,
}

/// Where one stream's chain stands: the seq its next record must have, and the hash of the
/// record before it. A reader that sees a stream's records in order (a topic partition, a
/// stream file) follows the chain with it, one record at a time.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ChainHead {
    pub next_seq: u64,
    pub prev: [u8; 32],
}

impl ChainHead {
    /// Moves the head onto the record `seq` (at or past `next_seq`), whose `prev` field is
    /// `prev` and whose hash is `hash`. What is wrong if it does not continue the chain:
    /// records missing before it, or a `prev` that is not the last record's hash. The head
    /// moves onto it either way, so that one fault is reported once.
    pub fn follow(&mut self, seq: u64, prev: &str, hash: [u8; 32]) -> Option<Problem> {
        let problem = if seq > self.next_seq {
            Some(Problem::Gap {
                expected: self.next_seq,
            })
        } else {
            let expected_prev = if seq == 0 {
                GENESIS_PREV.to_string()
            } else {
                hex::encode(self.prev)
            };
            (prev != expected_prev).then_some(Problem::HashMismatch { expected_prev })
        };
        self.next_seq = seq + 1;
        self.prev = hash;
        problem
    }
}

#[derive(Debug)]
struct StreamState {
    head: ChainHead,
    /// Hash of every accepted record by seq, to tell identical from conflicting duplicates.
    seen: HashMap<u64, [u8; 32]>,
    /// The seq of the stream's `stream_end`, once read in order.
    end: Option<u64>,
    /// The seq of the first record read in order that is not a bare `stream_start` or
    /// `stream_end` ([`is_frame`]): what a witness must vouch for.
    first_content: Option<u64>,
    summary: StreamSummary,
}

impl StreamState {
    fn new() -> Self {
        Self {
            head: ChainHead::default(),
            seen: HashMap::new(),
            end: None,
            first_content: None,
            summary: StreamSummary::default(),
        }
    }
}

/// What a verifier trusts besides the source itself.
#[derive(Clone, Copy, Debug, Default)]
pub struct Trust<'a> {
    /// The witness's checkpoints (one per stream, from the coordinator). They anchor their
    /// streams, their keys are the streams' keys, and every stream they name must be in the
    /// source.
    pub witness: Option<&'a [Checkpoint]>,
    /// Keys pinned per node id: a checkpoint signed by any other key is refused.
    pub pinned: Option<&'a PinnedKeys>,
    /// Report streams that have a checkpoint but no record in the source without failing
    /// them (a source that holds only some nodes' streams on purpose).
    pub allow_missing_streams: bool,
    /// With a witness: report streams with records of which the witness holds no checkpoint
    /// without failing them ([`Problem::Unwitnessed`]; streams written before the witness's
    /// store was replaced).
    pub allow_unwitnessed: bool,
}

/// What became of one recorded chunk: the verifier holds no store, its reader checks the
/// bytes ([`crate::record::Recording::proves`]) and reports here.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ChunkCheck {
    /// Read from its store, and they are the bytes the record proves.
    Verified,
    /// Not read: the source has no store to read it from (a topic, for chunks kept in files
    /// on the node).
    Unchecked,
    /// Missing, short or altered: why.
    Failed(String),
}

/// How many recorded chunks were verified, and how many could not be checked.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ChunkCounts {
    pub verified: u64,
    pub unchecked: u64,
    pub failed: u64,
}

/// Verifies any number of streams from records fed in the order they were stored.
#[derive(Debug, Default)]
pub struct Verifier {
    streams: BTreeMap<String, StreamState>,
    /// Checkpoints read from the source, checked by [`Verifier::check_checkpoints`].
    checkpoints: Vec<(String, Checkpoint)>,
    failures: Vec<Failure>,
    chunks: ChunkCounts,
}

impl Verifier {
    pub fn new() -> Self {
        Self::default()
    }

    /// Whether a record of `stream` was read.
    pub fn holds(&self, stream: &str) -> bool {
        self.streams
            .get(stream)
            .is_some_and(|s| s.summary.last_seq.is_some())
    }

    /// Feeds one record. `expected_stream`, when given, is the only stream this record may
    /// belong to (a local log file holds exactly one stream).
    pub fn push(&mut self, location: &str, bytes: &[u8], expected_stream: Option<&str>) {
        let env: Envelope<'_> = match serde_json::from_slice(bytes) {
            Ok(env) => env,
            Err(e) => {
                self.fail(
                    location,
                    expected_stream.unwrap_or("?"),
                    None,
                    Problem::Malformed(e.to_string()),
                );
                return;
            }
        };
        if env.v != crate::record::SCHEMA_VERSION {
            self.fail(
                location,
                &env.stream,
                Some(env.seq),
                Problem::UnknownVersion(env.v),
            );
            return;
        }
        if let Some(expected) = expected_stream {
            if env.stream != expected {
                self.fail(
                    location,
                    &env.stream,
                    Some(env.seq),
                    Problem::ForeignStream {
                        expected: expected.to_string(),
                    },
                );
                return;
            }
        }
        let hash = record_hash(bytes);
        let state = self
            .streams
            .entry(env.stream.to_string())
            .or_insert_with(StreamState::new);
        let problem = if env.seq < state.head.next_seq {
            match state.seen.get(&env.seq) {
                Some(h) if *h == hash => {
                    state.summary.identical_duplicates += 1;
                    None
                }
                Some(_) => Some(Problem::ConflictingDuplicate),
                None => Some(Problem::OutOfOrder {
                    expected: state.head.next_seq,
                }),
            }
        } else {
            // Nothing legitimate follows a stream_end: a record after it fails, however well
            // it chains, and the stream stays ended where its node ended it.
            let problem = state.head.follow(env.seq, &env.prev, hash);
            if state.first_content.is_none() && !is_frame(&env, bytes) {
                state.first_content = Some(env.seq);
            }
            state.seen.insert(env.seq, hash);
            state.summary.last_seq = Some(env.seq);
            state.summary.head = hex::encode(hash);
            match state.end {
                Some(end_seq) => Some(problem.unwrap_or(Problem::AfterStreamEnd { end_seq })),
                None => {
                    if env.kind == "stream_end" {
                        state.end = Some(env.seq);
                        state.summary.ended = true;
                    }
                    if problem.is_none() {
                        state.summary.verified += 1;
                    }
                    problem
                }
            }
        };
        if let Some(problem) = problem {
            self.fail(location, &env.stream, Some(env.seq), problem);
        }
    }

    /// Feeds the last line of a file of `stream` that has no line terminator (the file ends
    /// inside it). A whole record is taken as any other. Otherwise the line is a **torn tail**
    /// if, and only if, it is a beginning of the exact bytes the stream's next record must
    /// start with (its chain fields: this stream, the next seq, the hash of the last record
    /// read) and the stream has not ended; a torn tail is reported in the stream's summary, not
    /// as a failure. Anything else is malformed.
    ///
    /// Why this cannot hide tampering: the torn bytes are never a record, so they satisfy no
    /// checkpoint (a stream cut back to a torn tail is still reported truncated against a
    /// checkpoint past it), and they can hold nothing but a prefix of chain fields the verifier
    /// computes itself: turning the last record into a torn tail is the same as deleting it,
    /// which only checkpoints can detect in any case. Only the local log can hold one: a node
    /// publishes whole lines only.
    pub fn push_unterminated(&mut self, location: &str, bytes: &[u8], stream: &str) {
        if is_record(bytes) {
            self.push(location, bytes, Some(stream));
            return;
        }
        let state = self
            .streams
            .entry(stream.to_string())
            .or_insert_with(StreamState::new);
        let prefix = record_prefix(stream, state.head.next_seq, &state.head.prev);
        let n = bytes.len().min(prefix.len());
        if !bytes.is_empty() && !state.summary.ended && bytes[..n] == prefix[..n] {
            state.summary.torn_tail = Some(TornTail {
                location: location.to_string(),
                bytes: bytes.len() as u64,
            });
        } else {
            self.fail(
                location,
                stream,
                None,
                Problem::Malformed(
                    "the file ends in an unterminated line that is not the beginning of the stream's next record"
                        .into(),
                ),
            );
        }
    }

    /// Feeds one checkpoint message of the source (checked by
    /// [`Verifier::check_checkpoints`]). Its message key must be the stream it covers.
    pub fn push_checkpoint(&mut self, location: &str, bytes: &[u8], message_key: Option<&str>) {
        match serde_json::from_slice::<Checkpoint>(bytes) {
            Err(e) => self.fail(
                location,
                message_key.unwrap_or("?"),
                None,
                Problem::MalformedCheckpoint(e.to_string()),
            ),
            Ok(cp) if message_key != Some(cp.stream.as_str()) => self.fail(
                location,
                &cp.stream,
                Some(cp.seq),
                Problem::MisfiledCheckpoint {
                    key: message_key.map(str::to_string),
                },
            ),
            Ok(cp) => self.checkpoints.push((location.to_string(), cp)),
        }
    }

    /// Checks the checkpoints of the source and of the witness against the records fed so far
    /// (call after the last push).
    ///
    /// A checkpoint counts if its signature verifies and its key is the stream's: with a
    /// witness, the key of the witness's checkpoint of that stream; without one, the key of
    /// the first checkpoint of that stream; with pinned keys, also one pinned for the stream's
    /// node. Every checkpoint that counts is compared with the record at its seq when that
    /// record was read (its hash must be the checkpoint's); the highest seq among them
    /// anchors the stream: that record must have been read (else the stream is truncated, or
    /// missing when no record of it was read), and records after it are unanchored.
    pub fn check_checkpoints(&mut self, trust: &Trust<'_>) {
        let witness = trust.witness.unwrap_or_default();
        let witness_keys: BTreeMap<&str, &str> = witness
            .iter()
            .map(|c| (c.stream.as_str(), c.public_key.as_str()))
            .collect();
        let read = std::mem::take(&mut self.checkpoints);
        let mut first_key: BTreeMap<String, String> = BTreeMap::new();
        let mut counted: Vec<(String, Checkpoint)> = Vec::new();
        let all = read
            .into_iter()
            .chain(witness.iter().map(|c| ("witness".to_string(), c.clone())));
        for (location, cp) in all {
            let problem = if let Err(e) = cp.verify() {
                Some(Problem::BadCheckpointSignature(e.to_string()))
            } else if !match trust.witness {
                Some(_) => witness_keys.get(cp.stream.as_str()) == Some(&cp.public_key.as_str()),
                None if trust.pinned.is_some() => true,
                None => {
                    *first_key
                        .entry(cp.stream.clone())
                        .or_insert_with(|| cp.public_key.clone())
                        == cp.public_key
                }
            } {
                Some(Problem::UnknownCheckpointKey)
            } else {
                trust.pinned.and_then(|pinned| {
                    let node = node_of(&cp.stream).unwrap_or_default();
                    (!pinned.trusts(node, &cp.public_key)).then(|| Problem::UnpinnedKey {
                        node: node.to_string(),
                    })
                })
            };
            match problem {
                Some(p) => self.fail(&location, &cp.stream, Some(cp.seq), p),
                None => counted.push((location, cp)),
            }
        }
        let mut anchors: BTreeMap<String, u64> = BTreeMap::new();
        for (location, cp) in &counted {
            let read = self
                .streams
                .get(&cp.stream)
                .and_then(|s| s.seen.get(&cp.seq));
            if read.is_some_and(|h| hex::encode(h) != cp.hash) {
                self.fail(
                    location,
                    &cp.stream,
                    Some(cp.seq),
                    Problem::CheckpointMismatch,
                );
            }
            let anchor = anchors.entry(cp.stream.clone()).or_insert(cp.seq);
            *anchor = (*anchor).max(cp.seq);
        }
        for (stream, seq) in anchors {
            let state = self
                .streams
                .entry(stream.clone())
                .or_insert_with(StreamState::new);
            let last = state.summary.last_seq;
            let problem = match last {
                None => (!trust.allow_missing_streams).then_some(Problem::MissingStream {
                    checkpoint_seq: seq,
                }),
                Some(_) if !state.seen.contains_key(&seq) => {
                    Some(Problem::TruncatedBeforeCheckpoint {
                        checkpoint_seq: seq,
                    })
                }
                Some(_) => None,
            };
            state.summary.anchored_seq = Some(seq);
            state.summary.unanchored = last.map_or(0, |l| l.saturating_sub(seq));
            if let Some(p) = problem {
                self.fail("checkpoint", &stream, Some(seq), p);
            }
        }
        let mut unwitnessed = Vec::new();
        for (stream, state) in &mut self.streams {
            if state.summary.anchored_seq.is_none() {
                state.summary.unanchored = state.summary.last_seq.map_or(0, |l| l + 1);
                if trust.witness.is_some() && !trust.allow_unwitnessed {
                    if let Some(seq) = state.first_content {
                        unwitnessed.push((stream.clone(), seq));
                    }
                }
            }
        }
        for (stream, seq) in unwitnessed {
            self.fail("witness", &stream, Some(seq), Problem::Unwitnessed);
        }
    }

    /// Reports the check of the chunk of the `recording` record at `seq` of `stream` (fed
    /// with [`Verifier::push`] too): a failed one is a failure of that record.
    pub fn push_chunk(&mut self, location: &str, stream: &str, seq: u64, check: ChunkCheck) {
        match check {
            ChunkCheck::Verified => self.chunks.verified += 1,
            ChunkCheck::Unchecked => self.chunks.unchecked += 1,
            ChunkCheck::Failed(why) => {
                self.chunks.failed += 1;
                self.fail(location, stream, Some(seq), Problem::BadChunk(why));
            }
        }
    }

    fn fail(&mut self, location: &str, stream: &str, seq: Option<u64>, problem: Problem) {
        self.failures.push(Failure {
            location: location.to_string(),
            stream: stream.to_string(),
            seq,
            problem,
        });
    }

    /// The result so far.
    pub fn report(&self) -> Report {
        Report {
            streams: self
                .streams
                .iter()
                .map(|(k, v)| (k.clone(), v.summary.clone()))
                .collect(),
            failures: self.failures.clone(),
            chunks: self.chunks,
        }
    }
}

/// What a verification found.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Report {
    pub streams: BTreeMap<String, StreamSummary>,
    pub failures: Vec<Failure>,
    /// The recorded chunks reported with [`Verifier::push_chunk`].
    pub chunks: ChunkCounts,
}

impl Report {
    pub fn ok(&self) -> bool {
        self.failures.is_empty()
    }

    pub fn verified(&self) -> u64 {
        self.streams.values().map(|s| s.verified).sum()
    }

    pub fn identical_duplicates(&self) -> u64 {
        self.streams.values().map(|s| s.identical_duplicates).sum()
    }

    /// Streams whose file ends in a torn record.
    pub fn torn_tails(&self) -> usize {
        self.streams
            .values()
            .filter(|s| s.torn_tail.is_some())
            .count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::chain::Chain;

    fn stream(name: &str, n: usize) -> Vec<Vec<u8>> {
        let mut chain = Chain::new(name);
        (0..n)
            .map(|i| {
                let kind = if i + 1 == n { "stream_end" } else { "request" };
                chain.seal_serialized(format!("{{\"kind\":\"{kind}\",\"i\":{i}}}").as_bytes())
            })
            .collect()
    }

    fn verify(records: &[Vec<u8>], expected: Option<&str>) -> Report {
        let mut v = Verifier::new();
        for (i, r) in records.iter().enumerate() {
            v.push(&format!("line {}", i + 1), r, expected);
        }
        v.report()
    }

    #[test]
    fn an_intact_stream_verifies() {
        let r = verify(&stream("a", 5), Some("a"));
        assert!(r.ok(), "{:?}", r.failures);
        assert_eq!(r.verified(), 5);
        assert!(r.streams["a"].ended);
    }

    #[test]
    fn a_record_chained_after_stream_end_fails() {
        let mut chain = Chain::new("a");
        let mut recs: Vec<Vec<u8>> = ["request", "stream_end", "request", "request"]
            .iter()
            .map(|kind| chain.seal_serialized(format!("{{\"kind\":\"{kind}\"}}").as_bytes()))
            .collect();
        let r = verify(&recs, Some("a"));
        assert_eq!(r.failures.len(), 2, "{:?}", r.failures);
        for (f, seq) in r.failures.iter().zip([2, 3]) {
            assert_eq!(f.seq, Some(seq));
            assert_eq!(f.problem, Problem::AfterStreamEnd { end_seq: 1 });
        }
        let said = r.failures[0].to_string();
        assert!(
            said.contains("stream a seq 2: record after the stream's end"),
            "{said}"
        );
        assert_eq!(r.verified(), 2);
        assert!(r.streams["a"].ended);
        // An identical copy of the stream_end itself is still only a duplicate.
        recs.truncate(2);
        recs.push(recs[1].clone());
        assert!(verify(&recs, Some("a")).ok());
    }

    #[test]
    fn a_changed_byte_is_a_hash_mismatch_at_the_next_record() {
        let mut recs = stream("a", 5);
        let pos = recs[2].len() - 2;
        recs[2][pos] ^= 0x01;
        let r = verify(&recs, Some("a"));
        assert_eq!(r.failures.len(), 1, "{:?}", r.failures);
        assert_eq!(r.failures[0].seq, Some(3));
        assert!(matches!(
            r.failures[0].problem,
            Problem::HashMismatch { .. }
        ));
    }

    #[test]
    fn chunks_are_counted_and_a_bad_one_fails_its_record() {
        let mut v = Verifier::new();
        v.push_chunk("f:2", "a", 1, ChunkCheck::Verified);
        v.push_chunk("t/0/7", "a", 2, ChunkCheck::Unchecked);
        v.push_chunk("f:4", "a", 3, ChunkCheck::Failed("f.bin is missing".into()));
        let r = v.report();
        assert_eq!(
            r.chunks,
            ChunkCounts {
                verified: 1,
                unchecked: 1,
                failed: 1
            }
        );
        assert_eq!(
            r.failures[0].to_string(),
            "f:4: stream a seq 3: recorded chunk does not verify: f.bin is missing"
        );
    }

    #[test]
    fn a_deleted_record_is_a_gap() {
        let mut recs = stream("a", 5);
        recs.remove(2);
        let r = verify(&recs, Some("a"));
        assert!(matches!(
            r.failures[0].problem,
            Problem::Gap { expected: 2 }
        ));
    }

    #[test]
    fn a_deleted_first_record_is_a_gap() {
        let mut recs = stream("a", 3);
        recs.remove(0);
        let r = verify(&recs, Some("a"));
        assert!(matches!(
            r.failures[0].problem,
            Problem::Gap { expected: 0 }
        ));
    }

    #[test]
    fn reordered_records_are_caught() {
        let mut recs = stream("a", 5);
        recs.swap(1, 2);
        let r = verify(&recs, Some("a"));
        assert!(!r.ok());
        assert!(r
            .failures
            .iter()
            .any(|f| matches!(f.problem, Problem::Gap { .. })));
    }

    #[test]
    fn a_record_from_another_stream_is_foreign() {
        let mut recs = stream("a", 4);
        let other = stream("b", 4);
        recs.insert(2, other[2].clone());
        let r = verify(&recs, Some("a"));
        assert!(matches!(
            r.failures[0].problem,
            Problem::ForeignStream { .. }
        ));
    }

    #[test]
    fn a_spliced_record_rewritten_to_claim_the_stream_breaks_the_chain() {
        let mut recs = stream("a", 4);
        let other = stream("b", 4);
        let forged = String::from_utf8(other[2].clone())
            .unwrap()
            .replace("\"stream\":\"b\"", "\"stream\":\"a\"");
        recs[2] = forged.into_bytes();
        let r = verify(&recs, Some("a"));
        assert!(matches!(
            r.failures[0].problem,
            Problem::HashMismatch { .. }
        ));
    }

    #[test]
    fn identical_duplicates_are_counted_not_failed() {
        let mut recs = stream("a", 4);
        recs.insert(3, recs[1].clone());
        let r = verify(&recs, None);
        assert!(r.ok(), "{:?}", r.failures);
        assert_eq!(r.identical_duplicates(), 1);
        assert_eq!(r.verified(), 4);
    }

    #[test]
    fn conflicting_duplicates_fail() {
        let mut recs = stream("a", 4);
        let mut dup = recs[1].clone();
        let n = dup.len();
        dup[n - 2] ^= 1;
        recs.push(dup);
        let r = verify(&recs, None);
        assert_eq!(r.failures[0].problem, Problem::ConflictingDuplicate);
    }

    #[test]
    fn garbage_is_malformed_and_does_not_panic() {
        let mut v = Verifier::new();
        for junk in [&b""[..], b"{", b"null", b"{\"v\":1}", &[0xff, 0xfe]] {
            v.push("x", junk, Some("a"));
        }
        let r = v.report();
        assert_eq!(r.failures.len(), 5);
        assert!(r
            .failures
            .iter()
            .all(|f| matches!(f.problem, Problem::Malformed(_))));
    }

    #[test]
    fn a_stream_without_its_end_is_reported_open() {
        let mut recs = stream("a", 4);
        recs.pop();
        let r = verify(&recs, Some("a"));
        assert!(r.ok());
        assert!(!r.streams["a"].ended);
    }

    fn signed(
        key: &ed25519_dalek::SigningKey,
        stream: &str,
        records: &[Vec<u8>],
        seq: usize,
    ) -> (String, Checkpoint) {
        let hash = hex::encode(record_hash(&records[seq]));
        (
            "cp".to_string(),
            Checkpoint::sign(key, stream, seq as u64, &hash, 1),
        )
    }

    fn verify_with(
        records: &[Vec<u8>],
        checkpoints: &[(String, Checkpoint)],
        trust: &Trust<'_>,
    ) -> Report {
        let mut v = Verifier::new();
        for r in records {
            v.push("x", r, None);
        }
        for (location, cp) in checkpoints {
            v.push_checkpoint(location, &serde_json::to_vec(cp).unwrap(), Some(&cp.stream));
        }
        v.check_checkpoints(trust);
        v.report()
    }

    #[test]
    fn checkpoints_anchor_a_stream_and_catch_its_truncation() {
        let key = ed25519_dalek::SigningKey::from_bytes(&[1; 32]);
        let records = stream("a", 10);
        let cp = signed(&key, "a", &records, 7);
        let none = Trust::default();
        // Intact: anchored at 7, two records after it.
        let r = verify_with(&records, std::slice::from_ref(&cp), &none);
        assert!(r.ok(), "{:?}", r.failures);
        assert_eq!(r.streams["a"].anchored_seq, Some(7));
        assert_eq!(r.streams["a"].unanchored, 2);
        // The tail dropped back to seq 5: the chain alone looks fine, the checkpoint does not.
        let r = verify_with(&records[..6], std::slice::from_ref(&cp), &none);
        assert_eq!(
            r.failures[0].problem,
            Problem::TruncatedBeforeCheckpoint { checkpoint_seq: 7 }
        );
        // A forged checkpoint (another key) is refused against the witness's keys.
        let forger = ed25519_dalek::SigningKey::from_bytes(&[2; 32]);
        let forged = signed(&forger, "a", &records, 9);
        let witness = [cp.1.clone()];
        let trust = Trust {
            witness: Some(&witness),
            ..Trust::default()
        };
        let r = verify_with(&records, &[cp.clone(), forged], &trust);
        assert_eq!(r.failures.len(), 1, "{:?}", r.failures);
        assert_eq!(r.failures[0].problem, Problem::UnknownCheckpointKey);
        assert_eq!(r.streams["a"].anchored_seq, Some(7));
        // A checkpoint whose hash is not the record's.
        let wrong = (
            "cp".to_string(),
            Checkpoint::sign(&key, "a", 7, &"00".repeat(32), 1),
        );
        let r = verify_with(&records, &[wrong], &none);
        assert_eq!(r.failures[0].problem, Problem::CheckpointMismatch);
    }

    #[test]
    fn every_checkpoint_is_compared_not_only_the_anchor() {
        let key = ed25519_dalek::SigningKey::from_bytes(&[1; 32]);
        let records = stream("a", 10);
        let earlier_wrong = (
            "cp".to_string(),
            Checkpoint::sign(&key, "a", 3, &"11".repeat(32), 1),
        );
        let r = verify_with(
            &records,
            &[earlier_wrong, signed(&key, "a", &records, 9)],
            &Trust::default(),
        );
        assert_eq!(r.failures.len(), 1, "{:?}", r.failures);
        assert_eq!(r.failures[0].problem, Problem::CheckpointMismatch);
        assert_eq!(r.failures[0].seq, Some(3));
        assert_eq!(r.streams["a"].anchored_seq, Some(9));
        // Two checkpoints at the highest seq: both are compared, either one anchors.
        let twin = (
            "cp".to_string(),
            Checkpoint::sign(&key, "a", 9, &"22".repeat(32), 2),
        );
        let r = verify_with(
            &records,
            &[signed(&key, "a", &records, 9), twin],
            &Trust::default(),
        );
        assert_eq!(r.failures.len(), 1, "{:?}", r.failures);
        assert_eq!(r.failures[0].problem, Problem::CheckpointMismatch);
    }

    /// A stream needs no key to be made: one the witness never heard of, holding anything but
    /// its frame, is not vouched for by anyone (outside review, 2026-12-07: a stream written
    /// by hand passed `verify --witness`).
    #[test]
    fn a_stream_the_witness_never_saw_fails_unless_it_is_a_bare_frame() {
        let key = ed25519_dalek::SigningKey::from_bytes(&[1; 32]);
        let known = stream("a", 4);
        let witness = [signed(&key, "a", &known, 3).1];
        let trust = Trust {
            witness: Some(&witness),
            ..Trust::default()
        };
        let frame = |name: &str, kinds: &[&str]| {
            let mut chain = Chain::new(name);
            kinds
                .iter()
                .map(|k| match *k {
                    "stream_start" => chain
                        .seal_serialized(br#"{"kind":"stream_start","detail":"vigil-node 0.1.0"}"#),
                    k => chain.seal_serialized(format!(r#"{{"kind":"{k}"}}"#).as_bytes()),
                })
                .collect::<Vec<_>>()
        };
        // A node that stopped (or failed) before its first checkpoint: nothing to vouch for.
        let bare = frame("b", &["stream_start", "stream_end"]);
        let r = verify_with(&[known.clone(), bare].concat(), &[], &trust);
        assert!(r.ok(), "{:?}", r.failures);
        // A session in a stream the witness never saw fails at its first record.
        let forged = frame(
            "c",
            &["stream_start", "session_start", "request", "stream_end"],
        );
        let r = verify_with(&[known.clone(), forged.clone()].concat(), &[], &trust);
        assert_eq!(r.failures.len(), 1, "{:?}", r.failures);
        assert_eq!(
            (r.failures[0].stream.as_str(), r.failures[0].seq),
            ("c", Some(1))
        );
        assert_eq!(r.failures[0].problem, Problem::Unwitnessed);
        // So does a frame that says more than a frame does, or comes where none does.
        let mut chain = Chain::new("d");
        let dressed = vec![
            chain.seal_serialized(br#"{"kind":"stream_start","stmt":{"sql":"DROP TABLE t"}}"#)
        ];
        let late = frame("e", &["session_start", "stream_start"]);
        let r = verify_with(&[known.clone(), dressed, late].concat(), &[], &trust);
        let failed: Vec<_> = r
            .failures
            .iter()
            .map(|f| (f.stream.as_str(), f.seq, &f.problem))
            .collect();
        assert_eq!(
            failed,
            [
                ("d", Some(0), &Problem::Unwitnessed),
                ("e", Some(0), &Problem::Unwitnessed)
            ]
        );
        // Allowed: reported, not failed; and without a witness there is nothing to ask.
        let allowed = Trust {
            allow_unwitnessed: true,
            ..trust
        };
        assert!(verify_with(&[known, forged.clone()].concat(), &[], &allowed).ok());
        assert!(verify_with(&forged, &[], &Trust::default()).ok());
    }

    #[test]
    fn a_witnessed_stream_missing_from_the_source_fails_unless_allowed() {
        let key = ed25519_dalek::SigningKey::from_bytes(&[1; 32]);
        let a = stream("a", 4);
        let b = stream("b", 4);
        let witness = [signed(&key, "a", &a, 3).1, signed(&key, "b", &b, 3).1];
        let trust = Trust {
            witness: Some(&witness),
            ..Trust::default()
        };
        let r = verify_with(&a, &[], &trust);
        assert_eq!(r.failures.len(), 1, "{:?}", r.failures);
        assert_eq!(r.failures[0].stream, "b");
        assert_eq!(
            r.failures[0].problem,
            Problem::MissingStream { checkpoint_seq: 3 }
        );
        let r = verify_with(
            &a,
            &[],
            &Trust {
                allow_missing_streams: true,
                ..trust
            },
        );
        assert!(r.ok(), "{:?}", r.failures);
        assert_eq!(r.streams["b"].last_seq, None);
        assert_eq!(r.streams["b"].anchored_seq, Some(3));
    }

    #[test]
    fn pinned_keys_refuse_every_other_key() {
        let node = ed25519_dalek::SigningKey::from_bytes(&[1; 32]);
        let other = ed25519_dalek::SigningKey::from_bytes(&[2; 32]);
        let records = stream("gw-1:5", 6);
        let mut pinned = PinnedKeys::default();
        pinned.insert("gw-1", &hex::encode(node.verifying_key().as_bytes()));
        let trust = Trust {
            pinned: Some(&pinned),
            ..Trust::default()
        };
        let r = verify_with(&records, &[signed(&node, "gw-1:5", &records, 5)], &trust);
        assert!(r.ok(), "{:?}", r.failures);
        // A source rewritten and re-signed whole with another key: every checkpoint agrees
        // with the records and with each other, and none counts.
        let r = verify_with(&records, &[signed(&other, "gw-1:5", &records, 5)], &trust);
        assert_eq!(
            r.failures[0].problem,
            Problem::UnpinnedKey {
                node: "gw-1".into()
            }
        );
        assert_eq!(r.streams["gw-1:5"].anchored_seq, None);
    }

    #[test]
    fn a_checkpoint_must_travel_under_its_streams_key() {
        let key = ed25519_dalek::SigningKey::from_bytes(&[1; 32]);
        let records = stream("a", 3);
        let (_, cp) = signed(&key, "a", &records, 2);
        let bytes = serde_json::to_vec(&cp).unwrap();
        let mut v = Verifier::new();
        v.push_checkpoint("t/0/9", &bytes, Some("b"));
        v.push_checkpoint("t/0/10", &bytes, None);
        v.push_checkpoint("t/0/11", b"{}", Some("a"));
        let r = v.report();
        assert_eq!(
            r.failures[0].problem,
            Problem::MisfiledCheckpoint {
                key: Some("b".into())
            }
        );
        assert_eq!(
            r.failures[1].problem,
            Problem::MisfiledCheckpoint { key: None }
        );
        assert!(matches!(
            r.failures[2].problem,
            Problem::MalformedCheckpoint(_)
        ));
    }

    /// `n` whole records of an open stream and the record that would follow them.
    fn open_stream(name: &str, n: usize) -> (Vec<Vec<u8>>, Vec<u8>) {
        let mut chain = Chain::new(name);
        let mut records: Vec<Vec<u8>> = (0..=n)
            .map(|i| {
                chain.seal_serialized(format!("{{\"kind\":\"request\",\"i\":{i}}}").as_bytes())
            })
            .collect();
        let next = records.pop().unwrap();
        (records, next)
    }

    fn with_tail(records: &[Vec<u8>], stream: &str, tail: &[u8]) -> Report {
        let mut v = Verifier::new();
        for (i, r) in records.iter().enumerate() {
            v.push(&format!("f:{}", i + 1), r, Some(stream));
        }
        v.push_unterminated(&format!("f:{}", records.len() + 1), tail, stream);
        v.report()
    }

    #[test]
    fn a_torn_last_record_is_reported_as_such_at_any_cut() {
        let (records, next) = open_stream("a", 4);
        for cut in [1, 10, 40, next.len() / 2, next.len() - 1] {
            let r = with_tail(&records, "a", &next[..cut]);
            assert!(r.ok(), "cut {cut}: {:?}", r.failures);
            assert_eq!(r.torn_tails(), 1);
            let s = &r.streams["a"];
            assert_eq!(s.verified, 4, "a torn record is never a record");
            assert_eq!(
                s.torn_tail,
                Some(TornTail {
                    location: "f:5".into(),
                    bytes: cut as u64
                })
            );
        }
        // Cut right before its newline: a whole record.
        let r = with_tail(&records, "a", &next);
        assert!(r.ok() && r.torn_tails() == 0 && r.verified() == 5, "{r:?}");
        // A file whose first record was torn.
        let r = with_tail(&[], "a", &records[0][..30]);
        assert!(r.ok() && r.torn_tails() == 1, "{r:?}");
    }

    #[test]
    fn a_torn_tail_cannot_hide_anything() {
        let (records, next) = open_stream("a", 4);
        // Anything that is not the beginning of the next record is malformed: junk, another
        // seq, another prev (an older record's tail), another stream.
        let mut wrong_seq = next.clone();
        let at = wrong_seq
            .windows(7)
            .position(|w| w == b"\"seq\":4")
            .unwrap();
        wrong_seq[at + 6] = b'3';
        for tail in [
            b"garbage".to_vec(),
            wrong_seq[..80].to_vec(),
            records[2][..90].to_vec(),
            open_stream("b", 4).1[..60].to_vec(),
        ] {
            let r = with_tail(&records, "a", &tail);
            assert!(
                matches!(
                    r.failures[..],
                    [Failure {
                        problem: Problem::Malformed(_),
                        ..
                    }]
                ),
                "{:?}",
                String::from_utf8_lossy(&tail)
            );
            assert_eq!(r.torn_tails(), 0);
        }
        // Nothing follows a stream_end.
        let ended = stream("a", 3);
        let tail = record_prefix("a", 3, &record_hash(&ended[2]));
        let r = with_tail(&ended, "a", &tail[..20]);
        assert!(!r.ok(), "{r:?}");
        // A torn record satisfies no checkpoint: cut back to a torn tail, a stream whose
        // checkpoint covers the torn record is truncated.
        let key = ed25519_dalek::SigningKey::from_bytes(&[1; 32]);
        let mut all = records.clone();
        all.push(next.clone());
        let cp = signed(&key, "a", &all, 4).1;
        let mut v = Verifier::new();
        for r in &records {
            v.push("x", r, Some("a"));
        }
        v.push_unterminated("x", &next[..next.len() - 3], "a");
        v.check_checkpoints(&Trust {
            witness: Some(&[cp]),
            ..Trust::default()
        });
        assert_eq!(
            v.report().failures[0].problem,
            Problem::TruncatedBeforeCheckpoint { checkpoint_seq: 4 }
        );
    }
}
