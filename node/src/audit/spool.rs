//! What the writer shares with a sink that ships the stream file (the Kafka sink): how far the
//! sink's destination has acknowledged it, and how much may wait unacknowledged before appends
//! are refused.

use std::sync::atomic::Ordering;

/// What the Kafka shipper shares with the writer: how far the broker has acknowledged this
/// stream's file, and how much may wait unacknowledged.
#[derive(Debug, Default)]
pub struct Spool {
    /// Bytes of this stream's file the broker has acknowledged.
    pub acked: std::sync::atomic::AtomicU64,
    /// Unacknowledged bytes of earlier streams still being drained.
    pub earlier: std::sync::atomic::AtomicU64,
    /// The most that may wait; `append` refuses beyond it.
    pub limit: u64,
    /// The largest record the topic takes (`audit.kafka.max_record_bytes`): `append` refuses a
    /// larger one, `record` cuts it (see `AuditLog::record`).
    pub max_record: usize,
    /// Records written to this stream's file so far.
    pub written_records: std::sync::atomic::AtomicU64,
    /// Bytes of this stream's file holding whole records so far.
    pub written_bytes: std::sync::atomic::AtomicU64,
    /// Woken after every write (the shipper tails the file).
    pub notify: tokio::sync::Notify,
}

impl Spool {
    pub fn new(limit: u64, max_record: usize) -> Self {
        Self {
            limit,
            max_record,
            ..Self::default()
        }
    }

    /// Bytes written (this stream's `len`, and earlier streams') the broker has not
    /// acknowledged.
    pub(super) fn unacked(&self, len: u64) -> u64 {
        len.saturating_sub(self.acked.load(Ordering::Relaxed))
            + self.earlier.load(Ordering::Relaxed)
    }
}
