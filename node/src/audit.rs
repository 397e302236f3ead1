//! The local audit log: one append-only file per stream (one gateway process lifetime).
//!
//! Records are sealed into the chain and written by the session task itself, under a mutex,
//! before it goes on: a request's record is in the file (`write(2)` returned) before the
//! statement is forwarded, with no thread hop on the hot path. Two ways in:
//! - [`AuditLog::append`] reports failure: requests use it, and a statement whose record cannot
//!   be written is refused before it reaches the target.
//! - [`AuditLog::record`] cannot fail (responses, session ends, refusals): such a record is
//!   never dropped; when a write fails it stays queued, in order, and goes out with the next
//!   write that succeeds (a background task retries every 100 ms).
//!
//! A failed write is rolled back (file truncated to its last good length, chain state restored),
//! so an I/O error never leaves a torn record and seq stays contiguous.
//!
//! What this cannot guarantee: that a record's `write(2)` is all-or-nothing when the process
//! dies inside it. Linux copies a buffered write into the page cache page by page and stops
//! between pages when a fatal signal (SIGKILL) arrives, so a process killed while writing a
//! record longer than what is left of its page leaves the first part of the record at the end
//! of the file, without its newline (no signal can be blocked against SIGKILL, and
//! `RWF_ATOMIC` does not apply to buffered appends). Such a statement was never forwarded (its
//! write never returned). At start the node therefore checks the last line of every earlier
//! stream ([`check_earlier_streams`]): a torn record is counted and logged, and left in place
//! for the verifier, which reports it as a torn tail (`vigil_proto::verify`), never as a record.

use crate::config::SyncMode;
use crate::metrics::Metrics;
use std::collections::VecDeque;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use vigil_proto::chain::Chain;
use vigil_proto::record::{Body, Kind};
use vigil_proto::verify::is_record;

/// File name suffix of stream files.
pub const LOG_SUFFIX: &str = ".jsonl";

/// Records queued for retry are bounded; past this the oldest are dropped, which is counted
/// and logged (the drop path the tests keep at zero).
const MAX_BACKLOG: usize = 1_000_000;

#[derive(Debug, thiserror::Error, Clone)]
pub enum AuditError {
    #[error("the audit log cannot be written: {0}")]
    Write(String),
    #[error("the audit log is closed")]
    Closed,
    #[error(
        "the audit spool is full: {unacked} bytes are waiting for the broker's acknowledgement"
    )]
    SpoolFull { unacked: u64 },
}

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
    /// Records written to this stream's file so far.
    pub written_records: std::sync::atomic::AtomicU64,
    /// Bytes of this stream's file holding whole records so far.
    pub written_bytes: std::sync::atomic::AtomicU64,
    /// Woken after every write (the shipper tails the file).
    pub notify: tokio::sync::Notify,
}

impl Spool {
    pub fn new(limit: u64) -> Self {
        Self {
            limit,
            ..Self::default()
        }
    }

    /// Bytes written (this stream's `len`, and earlier streams') the broker has not
    /// acknowledged.
    fn unacked(&self, len: u64) -> u64 {
        len.saturating_sub(self.acked.load(Ordering::Relaxed))
            + self.earlier.load(Ordering::Relaxed)
    }
}

/// A handle to the node's audit stream. Cheap to clone.
#[derive(Clone)]
pub struct AuditLog {
    inner: Arc<Inner>,
}

struct Inner {
    stream: String,
    node: String,
    path: PathBuf,
    writer: Mutex<Writer>,
    /// False while the last write failed (the node is not ready: it refuses statements).
    healthy: AtomicBool,
    metrics: Arc<Metrics>,
    spool: Option<Arc<Spool>>,
}

/// Now, as RFC 3339 UTC with nanoseconds.
pub fn now_rfc3339() -> String {
    const FORMAT: &[time::format_description::BorrowedFormatItem<'static>] = time::macros::format_description!(
        "[year]-[month]-[day]T[hour]:[minute]:[second].[subsecond digits:9]Z"
    );
    time::OffsetDateTime::now_utc()
        .format(FORMAT)
        .unwrap_or_else(|_| "1970-01-01T00:00:00.000000000Z".into())
}

impl AuditLog {
    /// Opens a new stream file in `dir`, writes `stream_start` and starts the retry task.
    /// Must be called inside a tokio runtime.
    pub fn open(
        dir: &Path,
        node: &str,
        sync: SyncMode,
        metrics: Arc<Metrics>,
        spool: Option<Arc<Spool>>,
    ) -> std::io::Result<Self> {
        std::fs::create_dir_all(dir)?;
        let epoch = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        let stream = format!("{node}:{epoch}");
        let path = dir.join(format!("{node}-{epoch}{LOG_SUFFIX}"));
        let file = OpenOptions::new()
            .append(true)
            .create_new(true)
            .open(&path)?;
        let log = Self {
            inner: Arc::new(Inner {
                stream: stream.clone(),
                node: node.into(),
                path,
                writer: Mutex::new(Writer {
                    file,
                    len: 0,
                    chain: Chain::new(stream),
                    sync,
                    backlog: VecDeque::new(),
                    closed: false,
                    buf: Vec::with_capacity(64 * 1024),
                }),
                healthy: AtomicBool::new(true),
                metrics,
                spool,
            }),
        };
        let mut start = log.body(None, Kind::StreamStart);
        start.detail = Some(format!("vigil-node {}", env!("CARGO_PKG_VERSION")));
        log.record(start);
        let weak = Arc::downgrade(&log.inner);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(100));
            loop {
                tick.tick().await;
                let Some(inner) = weak.upgrade() else { return };
                let mut w = inner.lock();
                if !w.backlog.is_empty() && !w.closed {
                    let _ = inner.write(&mut w, None);
                }
            }
        });
        Ok(log)
    }

    pub fn stream(&self) -> &str {
        &self.inner.stream
    }

    pub fn path(&self) -> &Path {
        &self.inner.path
    }

    /// Whether the last write succeeded.
    pub fn is_healthy(&self) -> bool {
        self.inner.healthy.load(Ordering::Relaxed)
    }

    /// A body stamped with the time, this node and the session.
    pub fn body(&self, session: Option<&str>, kind: Kind) -> Body {
        Body::new(
            now_rfc3339(),
            self.inner.node.clone(),
            session.map(str::to_string),
            kind,
        )
    }

    /// Writes the record now; an error means it is not in the log. With a Kafka sink, a
    /// spool past its limit refuses too (the refusal itself goes in with [`AuditLog::record`]).
    pub fn append(&self, body: &Body) -> Result<(), AuditError> {
        let mut w = self.inner.lock();
        if w.closed {
            return Err(AuditError::Closed);
        }
        if let Some(spool) = &self.inner.spool {
            let unacked = spool.unacked(w.len);
            if unacked > spool.limit {
                return Err(AuditError::SpoolFull { unacked });
            }
        }
        self.inner.write(&mut w, Some(body))
    }

    /// Whether the spool holds more unacknowledged bytes than it may (statements are refused).
    pub fn spool_full(&self) -> bool {
        let Some(spool) = &self.inner.spool else {
            return false;
        };
        spool.unacked(self.inner.lock().len) > spool.limit
    }

    /// The seq and hex hash of the last record written, and the file's length up to it
    /// (`None` before the first record).
    pub fn head(&self) -> Option<(u64, String, u64)> {
        let w = self.inner.lock();
        let next = w.chain.next_seq();
        (next > 0).then(|| (next - 1, w.chain.head_hash(), w.len))
    }

    /// Writes the record now, or keeps it until a write succeeds.
    pub fn record(&self, body: Body) {
        let mut w = self.inner.lock();
        if w.closed {
            tracing::error!(kind = ?body.kind, "audit record after the log was closed");
            self.inner.metrics.audit_dropped_records.inc();
            return;
        }
        w.backlog.push_back(body);
        let _ = self.inner.write(&mut w, None);
    }

    /// Writes the `stream_end` record, syncs the file and refuses further records.
    pub fn close(&self) {
        self.record(self.body(None, Kind::StreamEnd));
        let mut w = self.inner.lock();
        if !w.backlog.is_empty() {
            tracing::error!(
                records = w.backlog.len(),
                "audit log closed with unwritten records"
            );
            self.inner
                .metrics
                .audit_dropped_records
                .inc_by(w.backlog.len() as u64);
        }
        let _ = w.file.sync_all();
        w.closed = true;
    }
}

impl Inner {
    fn lock(&self) -> MutexGuard<'_, Writer> {
        // A panic while holding the lock cannot leave a torn record (writes are rolled back),
        // so the state is still consistent.
        self.writer.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Writes the backlog, then `body`, in one `write(2)`. On failure everything is rolled
    /// back: `body` is not in the log (the caller refuses its statement), the backlog is kept.
    fn write(&self, w: &mut Writer, body: Option<&Body>) -> Result<(), AuditError> {
        let before = w.chain.clone();
        let Writer {
            chain,
            backlog,
            buf,
            ..
        } = w;
        buf.clear();
        let mut records = 0u64;
        for b in backlog.iter().chain(body) {
            buf.extend_from_slice(&chain.seal(b));
            buf.push(b'\n');
            records += 1;
        }
        if records == 0 {
            return Ok(());
        }
        match w.write_buf() {
            Ok(()) => {
                w.len += w.buf.len() as u64;
                w.backlog.clear();
                let m = &self.metrics;
                m.audit_records.inc_by(records);
                m.audit_bytes.inc_by(w.buf.len() as u64);
                m.audit_batches.inc();
                self.healthy.store(true, Ordering::Relaxed);
                if let Some(spool) = &self.spool {
                    spool
                        .written_records
                        .store(w.chain.next_seq(), Ordering::Relaxed);
                    spool.written_bytes.store(w.len, Ordering::Relaxed);
                    spool.notify.notify_one();
                }
                Ok(())
            }
            Err(e) => {
                self.metrics.audit_write_errors.inc();
                if self.healthy.swap(false, Ordering::Relaxed) {
                    tracing::error!(path = %self.path.display(), error = %e, "audit write failed; refusing statements until it succeeds");
                }
                if let Err(e) = w.file.set_len(w.len) {
                    tracing::error!(error = %e, "cannot truncate the audit log after a failed write");
                }
                w.chain = before;
                while w.backlog.len() > MAX_BACKLOG {
                    w.backlog.pop_front();
                    self.metrics.audit_dropped_records.inc();
                }
                Err(AuditError::Write(e.to_string()))
            }
        }
    }
}

struct Writer {
    file: File,
    /// Length of the file up to the last good record.
    len: u64,
    chain: Chain,
    sync: SyncMode,
    /// Records that do not report failure, kept across failed writes.
    backlog: VecDeque<Body>,
    closed: bool,
    /// Reused serialisation buffer.
    buf: Vec<u8>,
}

impl Writer {
    fn write_buf(&mut self) -> std::io::Result<()> {
        self.file.write_all(&self.buf)?;
        if self.sync == SyncMode::Fsync {
            self.file.sync_data()?;
        }
        Ok(())
    }
}

/// The stream a stream file holds, from its name: `node-epoch.jsonl` → `node:epoch`.
pub fn stream_of(file: &Path) -> Option<String> {
    let name = file.file_name()?.to_str()?.strip_suffix(LOG_SUFFIX)?;
    let (node, epoch) = name.rsplit_once('-')?;
    Some(format!("{node}:{epoch}"))
}

/// The bytes after the last newline of `file` (empty when it ends with one, or is empty).
pub fn unterminated_tail(file: &Path) -> std::io::Result<Vec<u8>> {
    use std::io::{Read, Seek, SeekFrom};
    let mut f = File::open(file)?;
    let len = f.metadata()?.len();
    let mut tail: Vec<u8> = Vec::new();
    let mut end = len;
    while end > 0 {
        let start = end.saturating_sub(64 * 1024);
        let mut chunk = vec![0u8; (end - start) as usize];
        f.seek(SeekFrom::Start(start))?;
        f.read_exact(&mut chunk)?;
        if let Some(nl) = chunk.iter().rposition(|&b| b == b'\n') {
            chunk.drain(..=nl);
            chunk.extend_from_slice(&tail);
            return Ok(chunk);
        }
        chunk.extend_from_slice(&tail);
        tail = chunk;
        end = start;
    }
    Ok(tail)
}

/// Checks the end of every stream file in `dir`; call before this process opens its own, so
/// that every file found belongs to a process that is gone. A last line without its newline
/// is either a whole record (the process died between the record and its newline: the
/// newline is added, the record's bytes stay as they are) or a torn record, which is logged,
/// counted in `vigil_audit_torn_tails` and left in place as evidence: the verifier reports it
/// as a torn tail and the shipper does not send it. Returns the torn files.
pub fn check_earlier_streams(dir: &Path, metrics: &Metrics) -> Vec<PathBuf> {
    let mut torn = Vec::new();
    for file in log_files(dir).unwrap_or_default() {
        let tail = match unterminated_tail(&file) {
            Ok(tail) if tail.is_empty() => continue,
            Ok(tail) => tail,
            Err(e) => {
                tracing::warn!(file = %file.display(), error = %e, "cannot read the end of an earlier audit stream");
                continue;
            }
        };
        if is_record(&tail) {
            let done = OpenOptions::new()
                .append(true)
                .open(&file)
                .and_then(|mut f| f.write_all(b"\n"));
            match done {
                Ok(()) => {
                    tracing::warn!(file = %file.display(), "an earlier stream's last record lacked its newline; added")
                }
                Err(e) => {
                    tracing::error!(file = %file.display(), error = %e, "cannot end an earlier stream's last line")
                }
            }
        } else {
            tracing::warn!(
                file = %file.display(),
                bytes = tail.len(),
                "an earlier stream ends in a torn record (its process was killed while writing it; the statement never ran); kept for the verifier, not sent"
            );
            torn.push(file);
        }
    }
    metrics.audit_torn_tails.set(torn.len() as i64);
    torn
}

/// Every stream file under `path` (a file or a directory), oldest first.
pub fn log_files(path: &Path) -> std::io::Result<Vec<PathBuf>> {
    if path.is_file() {
        return Ok(vec![path.to_path_buf()]);
    }
    let mut files: Vec<PathBuf> = std::fs::read_dir(path)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.to_string_lossy().ends_with(LOG_SUFFIX))
        .collect();
    files.sort();
    Ok(files)
}

#[cfg(test)]
mod tests {
    use super::*;
    use vigil_proto::chain::Chain;

    #[test]
    fn earlier_streams_are_checked_for_torn_records_and_kept_as_evidence() {
        let dir = tempfile::tempdir().unwrap();
        let mut chain = Chain::new("n:1");
        let a = chain.seal_serialized(br#"{"kind":"stream_start"}"#);
        let b = chain.seal_serialized(br#"{"kind":"request","text":"x"}"#);
        let whole = [&a[..], b"\n", &b[..]].concat();
        let torn = [&a[..], b"\n", &b[..b.len() / 2]].concat();
        let clean = [&a[..], b"\n"].concat();
        let big = [&a[..], b"\n"].concat().repeat(3000);
        for (name, bytes) in [
            ("n-1.jsonl", &clean),
            ("n-2.jsonl", &whole),
            ("n-3.jsonl", &torn),
            ("n-4.jsonl", &[big.as_slice(), &b[..100]].concat()),
        ] {
            std::fs::write(dir.path().join(name), bytes).unwrap();
        }
        assert_eq!(
            unterminated_tail(&dir.path().join("n-4.jsonl")).unwrap(),
            &b[..100]
        );
        let metrics = Metrics::default();
        let found = check_earlier_streams(dir.path(), &metrics);
        assert_eq!(
            found,
            vec![dir.path().join("n-3.jsonl"), dir.path().join("n-4.jsonl")]
        );
        assert_eq!(metrics.audit_torn_tails.get(), 2);
        let read = |n: &str| std::fs::read(dir.path().join(n)).unwrap();
        assert_eq!(read("n-1.jsonl"), clean, "a clean file is left alone");
        assert_eq!(
            read("n-2.jsonl"),
            [&whole[..], b"\n"].concat(),
            "a whole last record gets its newline, its bytes unchanged"
        );
        assert_eq!(read("n-3.jsonl"), torn, "a torn record stays as evidence");
    }

    #[test]
    fn stream_ids_come_from_file_names() {
        assert_eq!(
            stream_of(Path::new("/x/gw-1-1700000000000000000.jsonl")).as_deref(),
            Some("gw-1:1700000000000000000")
        );
        assert_eq!(stream_of(Path::new("/x/notes.txt")), None);
    }
}
