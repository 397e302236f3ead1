//! Verification of audit streams: pure, fed one record at a time, so the same code checks a
//! local log file or records read from a topic.
//!
//! What it proves: every record of a stream is present from seq 0 up to the last one seen, in
//! order, unmodified, and belongs to that stream. What it cannot prove on its own: that records
//! after the last one seen never existed (tail truncation). A graceful stream ends with a
//! `stream_end` record, and a stream without one is reported as open; signed checkpoints held by
//! a witness close that gap for streams that end abruptly.

use crate::chain::{record_hash, GENESIS_PREV};
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

/// What is wrong with one record.
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
    /// A witnessed checkpoint vouches for records up to `checkpoint_seq`, but the stream stops
    /// earlier: its tail was truncated (or rolled back).
    TruncatedBeforeCheckpoint { checkpoint_seq: u64 },
    /// The record at the checkpoint's seq is not the one the node signed for.
    CheckpointMismatch,
    /// A checkpoint whose signature does not verify.
    BadCheckpointSignature(String),
    /// A checkpoint signed by a key that is not the stream's (per the witness or the
    /// stream's other checkpoints).
    UnknownCheckpointKey,
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
            Problem::TruncatedBeforeCheckpoint { checkpoint_seq } => write!(
                f,
                "truncated: a checkpoint vouches for records up to seq {checkpoint_seq}, which are missing"
            ),
            Problem::CheckpointMismatch => {
                write!(f, "the record at the checkpoint's seq is not the one signed for")
            }
            Problem::BadCheckpointSignature(e) => write!(f, "bad checkpoint signature: {e}"),
            Problem::UnknownCheckpointKey => {
                write!(f, "checkpoint signed by a key that is not the stream's")
            }
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

/// Per-stream result.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct StreamSummary {
    pub verified: u64,
    pub identical_duplicates: u64,
    /// Highest seq accepted in order.
    pub last_seq: Option<u64>,
    /// Hex hash of the last record accepted in order.
    pub head: String,
    /// Whether the stream's last record is a `stream_end`.
    pub ended: bool,
    /// The highest seq a valid checkpoint vouches for (after [`Verifier::witness`]).
    pub anchored_seq: Option<u64>,
    /// Records after the last checkpoint: present and chained, but nothing proves that more
    /// did not follow them (normal for the last seconds of an open stream).
    pub unanchored: u64,
}

#[derive(Debug)]
struct StreamState {
    next_seq: u64,
    prev: [u8; 32],
    /// Hash of every accepted record by seq, to tell identical from conflicting duplicates.
    seen: HashMap<u64, [u8; 32]>,
    summary: StreamSummary,
}

impl StreamState {
    fn new() -> Self {
        Self {
            next_seq: 0,
            prev: [0; 32],
            seen: HashMap::new(),
            summary: StreamSummary::default(),
        }
    }
}

/// Verifies any number of streams from records fed in the order they were stored.
#[derive(Debug, Default)]
pub struct Verifier {
    streams: BTreeMap<String, StreamState>,
    failures: Vec<Failure>,
}

impl Verifier {
    pub fn new() -> Self {
        Self::default()
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
        let problem = if env.seq < state.next_seq {
            match state.seen.get(&env.seq) {
                Some(h) if *h == hash => {
                    state.summary.identical_duplicates += 1;
                    None
                }
                Some(_) => Some(Problem::ConflictingDuplicate),
                None => Some(Problem::OutOfOrder {
                    expected: state.next_seq,
                }),
            }
        } else {
            let mut problem = None;
            if env.seq > state.next_seq {
                problem = Some(Problem::Gap {
                    expected: state.next_seq,
                });
            } else {
                let expected_prev = if env.seq == 0 {
                    GENESIS_PREV.to_string()
                } else {
                    hex::encode(state.prev)
                };
                if env.prev != expected_prev {
                    problem = Some(Problem::HashMismatch { expected_prev });
                }
            }
            // Resynchronise on this record so one fault is reported once, not for every
            // record after it.
            state.next_seq = env.seq + 1;
            state.prev = hash;
            state.seen.insert(env.seq, hash);
            state.summary.last_seq = Some(env.seq);
            state.summary.head = hex::encode(hash);
            state.summary.ended = env.kind == "stream_end";
            if problem.is_none() {
                state.summary.verified += 1;
            }
            problem
        };
        if let Some(problem) = problem {
            self.fail(location, &env.stream, Some(env.seq), problem);
        }
    }

    /// Checks signed checkpoints against the records fed so far (call after the last
    /// [`Verifier::push`]). `keys`, when given, is the witness's public key for each stream
    /// (from the coordinator): a checkpoint signed by any other key fails. Without it, all the
    /// checkpoints of a stream must share one key. The latest valid checkpoint of each stream
    /// anchors it: its records up to that seq must be present and the record at that seq must
    /// be the one signed for; records after it are counted as unanchored.
    pub fn witness(
        &mut self,
        checkpoints: &[(String, crate::checkpoint::Checkpoint)],
        keys: Option<&BTreeMap<String, String>>,
    ) {
        let mut latest: BTreeMap<&str, &crate::checkpoint::Checkpoint> = BTreeMap::new();
        let mut first_key: BTreeMap<&str, &str> = BTreeMap::new();
        for (location, cp) in checkpoints {
            let fail = |v: &mut Self, p| v.fail(location, &cp.stream, Some(cp.seq), p);
            if let Err(e) = cp.verify() {
                fail(self, Problem::BadCheckpointSignature(e.to_string()));
                continue;
            }
            let key = match keys {
                Some(keys) => keys.get(&cp.stream).map(String::as_str),
                None => Some(*first_key.entry(&cp.stream).or_insert(&cp.public_key)),
            };
            if key != Some(cp.public_key.as_str()) {
                fail(self, Problem::UnknownCheckpointKey);
                continue;
            }
            let held = latest.entry(&cp.stream).or_insert(cp);
            if cp.seq > held.seq {
                *held = cp;
            }
        }
        for (stream, cp) in latest {
            let state = self
                .streams
                .entry(stream.to_string())
                .or_insert_with(StreamState::new);
            let problem = match state.seen.get(&cp.seq) {
                None => Some(Problem::TruncatedBeforeCheckpoint {
                    checkpoint_seq: cp.seq,
                }),
                Some(h) if hex::encode(h) != cp.hash => Some(Problem::CheckpointMismatch),
                Some(_) => None,
            };
            let last = state.summary.last_seq;
            state.summary.anchored_seq = Some(cp.seq);
            state.summary.unanchored = last.map_or(0, |l| l.saturating_sub(cp.seq));
            if let Some(p) = problem {
                self.fail("checkpoint", stream, Some(cp.seq), p);
            }
        }
        for state in self.streams.values_mut() {
            if state.summary.anchored_seq.is_none() {
                state.summary.unanchored = state.summary.last_seq.map_or(0, |l| l + 1);
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
        }
    }
}

/// What a verification found.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Report {
    pub streams: BTreeMap<String, StreamSummary>,
    pub failures: Vec<Failure>,
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
    ) -> (String, crate::checkpoint::Checkpoint) {
        let hash = hex::encode(record_hash(&records[seq]));
        (
            "cp".to_string(),
            crate::checkpoint::Checkpoint::sign(key, stream, seq as u64, &hash, 1),
        )
    }

    #[test]
    fn checkpoints_anchor_a_stream_and_catch_its_truncation() {
        let key = ed25519_dalek::SigningKey::from_bytes(&[1; 32]);
        let records = stream("a", 10);
        let cp = signed(&key, "a", &records, 7);
        // Intact: anchored at 7, two records after it.
        let mut v = Verifier::new();
        for r in &records {
            v.push("x", r, None);
        }
        v.witness(std::slice::from_ref(&cp), None);
        let r = v.report();
        assert!(r.ok(), "{:?}", r.failures);
        assert_eq!(r.streams["a"].anchored_seq, Some(7));
        assert_eq!(r.streams["a"].unanchored, 2);
        // The tail dropped back to seq 5: the chain alone looks fine, the checkpoint does not.
        let mut v = Verifier::new();
        for r in &records[..6] {
            v.push("x", r, None);
        }
        v.witness(std::slice::from_ref(&cp), None);
        let r = v.report();
        assert_eq!(
            r.failures[0].problem,
            Problem::TruncatedBeforeCheckpoint { checkpoint_seq: 7 }
        );
        // A forged checkpoint (another key) is refused against the witness's keys.
        let forger = ed25519_dalek::SigningKey::from_bytes(&[2; 32]);
        let forged = signed(&forger, "a", &records, 9);
        let keys = BTreeMap::from([("a".to_string(), hex::encode(key.verifying_key().as_bytes()))]);
        let mut v = Verifier::new();
        for r in &records {
            v.push("x", r, None);
        }
        v.witness(&[cp.clone(), forged], Some(&keys));
        let r = v.report();
        assert_eq!(r.failures.len(), 1);
        assert_eq!(r.failures[0].problem, Problem::UnknownCheckpointKey);
        assert_eq!(r.streams["a"].anchored_seq, Some(7));
        // A checkpoint whose hash is not the record's.
        let mut wrong = cp;
        wrong.1 = crate::checkpoint::Checkpoint::sign(&key, "a", 7, &"00".repeat(32), 1);
        let mut v = Verifier::new();
        for r in &records {
            v.push("x", r, None);
        }
        v.witness(&[wrong], None);
        assert_eq!(v.report().failures[0].problem, Problem::CheckpointMismatch);
    }
}
