//! The local audit log: one append-only file per stream (one gateway process lifetime).
//!
//! Sessions serialise their records on their own task and queue them; whoever holds the writer
//! seals everything queued into the chain in the order handed over and writes it in one
//! `write(2)` (group commit: under load, many sessions' records share a write and a
//! `sync_data`). Who holds the writer:
//! - the `vigil-audit` writer thread, always with `sync = "fsync"` (no `fdatasync` runs on the
//!   async runtime), for records nobody waits for, for retries after a failed write, and for an
//!   append that finds the writer busy;
//! - with `sync = "write"`, the appending session itself when nobody else holds the writer
//!   (`try_lock`: a session never waits for the lock). That write is one `write(2)` into the page
//!   cache; handing it to the thread and back cost two wake-ups of sleeping threads, more than
//!   the write (loadtest/README.md, "The audit writer and its hand-offs").
//!
//! Two ways in:
//! - [`AuditLog::append`] resolves once the record is in the file, or with the reason it is
//!   not: requests use it, and a statement whose record cannot be written is refused before it
//!   reaches the target (the session awaits its record before forwarding).
//! - [`AuditLog::record`] cannot fail (responses, session ends, refusals): such a record is
//!   never dropped; when a write fails it stays queued, in order, and goes out with the next
//!   write that succeeds (the writer retries every 100 ms).
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

pub mod asciicast;
pub mod display;
pub mod kafka;
pub mod read;
pub mod recording;
pub mod screen;
pub mod sink;
mod spool;
pub mod terminal;
pub mod witness;

pub use spool::Spool;

use crate::config::SyncMode;
use crate::core::metrics::Metrics;
use std::collections::VecDeque;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, TryLockError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::sync::oneshot;
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
    #[error("its audit record would be {bytes} bytes, more than audit.kafka.max_record_bytes ({max}) lets the topic take")]
    TooLarge { bytes: usize, max: usize },
}

/// What the chain adds to a body (`v`, `stream`, `seq`, `prev`), at most.
const RECORD_PREFIX: usize = 512;

/// A serialised body made at most `max` bytes long: its longest strings are cut, each to a
/// beginning and the marker `…[cut by the gateway: N bytes, sha256 H]` (the whole string's
/// length and hash), until it fits. When cutting the 16 longest does not make it fit (many
/// short strings), its fields larger than 1 KiB are left out and `detail` says so, with the
/// whole record's length and hash. Keys come out in sorted order.
pub fn cut_to_fit(json: &[u8], max: usize) -> Vec<u8> {
    use serde_json::Value;
    /// The longest string in `v` (object values and array items), by length.
    fn longest(v: &mut Value) -> Option<&mut String> {
        let children: Box<dyn Iterator<Item = &mut Value>> = match v {
            Value::String(_) => return None,
            Value::Array(a) => Box::new(a.iter_mut()),
            Value::Object(o) => Box::new(o.values_mut()),
            _ => return None,
        };
        let mut best: Option<&mut String> = None;
        for child in children {
            let found = match child {
                Value::String(s) => Some(s),
                other => longest(other),
            };
            if let Some(s) = found {
                if best.as_ref().is_none_or(|b| s.len() > b.len()) {
                    best = Some(s);
                }
            }
        }
        best
    }
    let Ok(mut value) = serde_json::from_slice::<Value>(json) else {
        return json.to_vec();
    };
    let marker = |len: usize, of: &[u8]| {
        let digest = hex::encode(<sha2::Sha256 as sha2::Digest>::digest(of));
        format!("…[cut by the gateway: {len} bytes, sha256 {digest}]")
    };
    for _ in 0..16 {
        let out = serde_json::to_vec(&value).expect("a JSON value serialises");
        if out.len() <= max {
            return out;
        }
        let excess = out.len() - max;
        let Some(s) = longest(&mut value).filter(|s| s.len() > 256) else {
            break;
        };
        let marker = marker(s.len(), s.as_bytes());
        // JSON escapes can make a character take up to six bytes: cut more than the excess.
        let mut keep = s
            .len()
            .saturating_sub(excess + marker.len())
            .max(128)
            .min(s.len() / 2);
        while !s.is_char_boundary(keep) {
            keep -= 1;
        }
        s.truncate(keep);
        s.push_str(&marker);
    }
    let out = serde_json::to_vec(&value).expect("a JSON value serialises");
    if out.len() <= max {
        return out;
    }
    // Its fields larger than 1 KiB left out; `detail` names the whole record.
    let Value::Object(fields) = value else {
        return out;
    };
    let mut kept: serde_json::Map<String, Value> = fields
        .into_iter()
        .filter(|(k, v)| k != "detail" && serde_json::to_vec(v).map_or(0, |b| b.len()) <= 1024)
        .collect();
    kept.insert(
        "detail".into(),
        Value::String(format!(
            "{} (the record's fields over 1 KiB are left out to fit the topic)",
            marker(json.len(), json)
        )),
    );
    serde_json::to_vec(&Value::Object(kept)).expect("a JSON value serialises")
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
    /// Records waiting for the writer, in the order they were handed over. Taken only by the
    /// holder of `writer` (lock order: `writer`, then `queue`), so the chain follows this order.
    queue: Mutex<Queue>,
    /// Wakes the writer thread.
    wake: Condvar,
    /// The file and the chain: held by whoever writes.
    writer: Mutex<Writer>,
    /// `sync = "write"`: an append may be written by its own session when the writer is free.
    inline: bool,
    /// The recordings directory's entry is synced (`sync = "fsync"`; once is enough, but a
    /// file is not written before it is).
    recordings_dir_synced: AtomicBool,
    /// Records of a failed write wait for a retry (the writer thread retries every 100 ms).
    retrying: AtomicBool,
    /// The last record written: seq, hash, and the file's length up to it (the hash kept as
    /// bytes: made hex only when asked for, not on every write).
    head: Mutex<Option<(u64, [u8; 32], u64)>>,
    /// False while the last write failed (the node is not ready: it refuses statements).
    healthy: AtomicBool,
    metrics: Arc<Metrics>,
    spool: Option<Arc<Spool>>,
}

/// What the writer is handed: a serialised body, and for an append the waiter to tell.
/// An empty body is a flush: nothing is written for it, its waiter is told once everything
/// handed over before it is written.
struct Entry {
    body: Vec<u8>,
    reply: Reply,
    /// A recorded chunk: written into its recording file at this offset before the record.
    chunk: Option<Chunk>,
}

/// A chunk's recording file, its bytes and their offset in the file.
type Chunk = (Arc<RecordingFile>, Vec<u8>, u64);

/// Who learns how an entry's write went.
enum Reply {
    /// A record nobody waits for.
    None,
    /// An append or a flush handed to the writer thread.
    Waiter(oneshot::Sender<Result<(), AuditError>>),
    /// The append of the session that writes the batch itself: [`Writer::write`] returns it.
    Caller,
}

impl Reply {
    fn waited(&self) -> bool {
        !matches!(self, Reply::None)
    }

    /// Tells the waiter, or keeps the caller's own outcome in `own`.
    fn tell(self, outcome: Result<(), AuditError>, own: &mut Option<Result<(), AuditError>>) {
        match self {
            Reply::None => {}
            Reply::Waiter(tx) => {
                let _ = tx.send(outcome);
            }
            Reply::Caller => *own = Some(outcome),
        }
    }
}

/// Where a session's recorded stream bytes go: `recordings/SESSION.bin` next to the stream
/// files, after a random salt (its first `SALT_LEN` bytes). Records of kind `recording` name each chunk's offset, length and SHA-256; the writer
/// thread writes a chunk, at the offset its record names, before the record that proves it.
/// Writes are positional, so chunks handed over by different tasks in any order land where
/// their records say, and a chunk whose record is never written (a failed or refused append)
/// leaves bytes no record names, never a shift.
pub struct RecordingFile {
    file: File,
    /// Random bytes at the start of the file, hashed before each chunk (see
    /// `Recording::salted`): a record's digest does not give a short chunk away.
    salt: [u8; vigil_proto::record::SALT_LEN],
    /// Relative to the audit directory (what records name).
    path: PathBuf,
    /// Bytes handed to the writer so far: the offset of the next chunk.
    next: std::sync::atomic::AtomicU64,
}

/// Which stream a chunk belongs to: the channel, the direction (`input`, `output`, `error`)
/// and the bytes of that channel and direction before it.
pub struct ChunkOf<'a> {
    pub channel: String,
    pub direction: &'a str,
    pub offset: u64,
}

/// The directory of recording files, inside the audit directory.
pub const RECORDINGS_DIR: &str = "recordings";

impl RecordingFile {
    /// The path records name, relative to the audit directory.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

#[derive(Default)]
struct Queue {
    entries: Vec<Entry>,
    /// `close` asked; answered once everything queued is written and the file synced.
    closing: Option<oneshot::Sender<()>>,
    closed: bool,
    /// The writer is waiting and nobody has woken it yet: the next append wakes it, the ones
    /// after ride along (one wake-up per batch, not per record).
    idle: bool,
    /// Entries someone waits for (appends, flushes). Records nobody waits for do not wake the
    /// writer: they go out with the next append's batch, or after [`RECORD_DELAY`].
    waited: usize,
    /// The writer sleeps until woken (nothing was written for [`QUIET_POLLS`] polls): a record
    /// wakes it too.
    deep: bool,
}

/// How long a record nobody waits for (a response, a session end) may wait for an append to
/// share its write with. A request's record is never delayed: its append wakes the writer.
const RECORD_DELAY: Duration = Duration::from_millis(2);

/// Polls for records nobody waits for before the writer sleeps until woken (about a second).
const QUIET_POLLS: u32 = 500;

/// Now, as RFC 3339 UTC with nanoseconds (`2026-12-04T19:56:53.953526877Z`).
pub fn now_rfc3339() -> String {
    rfc3339(time::OffsetDateTime::now_utc())
}

/// `t` (UTC) as RFC 3339 with nanoseconds, its digits written into a template: twice per
/// statement, where the general formatter cost about 2,000 instructions.
fn rfc3339(t: time::OffsetDateTime) -> String {
    /// `n`'s last `field.len()` decimal digits into `field`.
    fn put(field: &mut [u8], mut n: u32) {
        for digit in field.iter_mut().rev() {
            *digit = b'0' + (n % 10) as u8;
            n /= 10;
        }
    }
    let (year, month, day) = t.to_calendar_date();
    let (hour, minute, second, nanosecond) = t.to_hms_nano();
    let mut out = *b"0000-00-00T00:00:00.000000000Z";
    // A year outside 0..=9999 cannot come from the clock of a running machine.
    put(&mut out[0..4], year.clamp(0, 9999).unsigned_abs());
    put(&mut out[5..7], u8::from(month).into());
    put(&mut out[8..10], day.into());
    put(&mut out[11..13], hour.into());
    put(&mut out[14..16], minute.into());
    put(&mut out[17..19], second.into());
    put(&mut out[20..29], nanosecond);
    String::from_utf8(out.to_vec()).expect("ASCII digits and separators")
}

impl AuditLog {
    /// Opens a new stream file in `dir`, writes `stream_start` and starts the writer thread.
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
        if sync == SyncMode::Fsync {
            // The file's name too must survive a power loss, not only what is written in it
            // (and the directory's, made above on a first start).
            sync_dir(dir)?;
            if let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
                sync_dir(parent)?;
            }
        }
        let writer = Writer {
            file,
            len: 0,
            chain: Chain::new(stream.clone()),
            sync,
            backlog: VecDeque::new(),
            buf: Vec::with_capacity(64 * 1024),
        };
        let inner = Arc::new(Inner {
            stream,
            node: node.into(),
            path,
            queue: Mutex::new(Queue::default()),
            wake: Condvar::new(),
            writer: Mutex::new(writer),
            inline: sync == SyncMode::Write,
            recordings_dir_synced: AtomicBool::new(false),
            retrying: AtomicBool::new(false),
            head: Mutex::new(None),
            healthy: AtomicBool::new(true),
            metrics,
            spool,
        });
        {
            let inner = inner.clone();
            std::thread::Builder::new()
                .name("vigil-audit".into())
                .spawn(move || Writer::run(&inner))?;
        }
        let log = Self { inner };
        let mut start = log.body(None, Kind::StreamStart);
        start.detail = Some(format!("vigil-node {}", env!("CARGO_PKG_VERSION")));
        log.record(start);
        Ok(log)
    }

    pub fn stream(&self) -> &str {
        &self.inner.stream
    }

    pub fn path(&self) -> &Path {
        &self.inner.path
    }

    /// The node that writes this stream (`node.id`).
    pub fn node(&self) -> &str {
        &self.inner.node
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

    /// Resolves once the record is in the log (`write(2)` returned, and `sync_data` in
    /// `sync = "fsync"` mode); an error means it is not. With a Kafka sink, a spool past its
    /// limit refuses too (the refusal itself goes in with [`AuditLog::record`]).
    /// A record the Kafka topic would not take (`audit.kafka.max_record_bytes`) is refused:
    /// what it records does not happen.
    pub async fn append(&self, body: &Body) -> Result<(), AuditError> {
        let json = body.to_json();
        if let Some(max) = self.max_record() {
            if json.len() + RECORD_PREFIX > max {
                return Err(AuditError::TooLarge {
                    bytes: json.len() + RECORD_PREFIX,
                    max,
                });
            }
        }
        self.inner.submit(json, None).await
    }

    /// The largest record the Kafka sink's topic takes, when there is one.
    fn max_record(&self) -> Option<usize> {
        self.inner.spool.as_ref().map(|s| s.max_record)
    }

    /// Resolves once every record handed over before the call is written (or kept for retry
    /// after a failed write).
    pub async fn flush(&self) {
        let (tx, rx) = oneshot::channel();
        let flush = Entry {
            body: Vec::new(),
            reply: Reply::Waiter(tx),
            chunk: None,
        };
        if self.inner.push(flush).is_ok() {
            let _ = rx.await;
        }
    }

    /// Whether the spool holds more unacknowledged bytes than it may (statements are refused).
    pub fn spool_full(&self) -> bool {
        let Some(spool) = &self.inner.spool else {
            return false;
        };
        spool.unacked(spool.written_bytes.load(Ordering::Relaxed)) > spool.limit
    }

    /// The seq and hex hash of the last record written, and the file's length up to it
    /// (`None` before the first record).
    pub fn head(&self) -> Option<(u64, String, u64)> {
        let head = *self.inner.head.lock().unwrap_or_else(|e| e.into_inner());
        head.map(|(seq, hash, len)| (seq, hex::encode(hash), len))
    }

    /// Hands the record to the writer, which writes it with the next batch, or keeps it until a
    /// write succeeds.
    /// A record the Kafka topic would not take (`audit.kafka.max_record_bytes`), which would
    /// hold back every record after it, is cut to fit ([`cut_to_fit`]).
    pub fn record(&self, body: Body) {
        let mut json = body.to_json();
        if let Some(max) = self.max_record() {
            if json.len() + RECORD_PREFIX > max {
                json = cut_to_fit(&json, max - RECORD_PREFIX);
                self.inner.metrics.audit_records_cut.inc();
            }
        }
        let entry = Entry {
            body: json,
            reply: Reply::None,
            chunk: None,
        };
        if self.inner.push(entry).is_err() {
            tracing::error!(kind = ?body.kind, "audit record after the log was closed");
            self.inner.metrics.audit_dropped_records.inc();
        }
    }

    /// Creates the recording file of `session` (off the runtime).
    pub async fn recording_file(&self, session: &str) -> std::io::Result<Arc<RecordingFile>> {
        let dir = self
            .inner
            .path
            .parent()
            .unwrap_or(Path::new("."))
            .join(RECORDINGS_DIR);
        let rel = Path::new(RECORDINGS_DIR).join(format!("{session}.bin"));
        let path = dir.join(format!("{session}.bin"));
        let salt: [u8; vigil_proto::record::SALT_LEN] = rand::random();
        let fsync = !self.inner.inline;
        let inner = self.inner.clone();
        let file = tokio::task::spawn_blocking(move || {
            std::fs::create_dir_all(&dir)?;
            use std::os::unix::fs::OpenOptionsExt;
            let mut file = OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&path)?;
            file.write_all(&salt)?;
            if fsync {
                // Under `sync = "fsync"` the chunks are synced with their records; the
                // file's name (and the directory's, the first time) must last as well.
                if !inner.recordings_dir_synced.load(Ordering::Acquire) {
                    if let Some(parent) = dir.parent() {
                        sync_dir(parent)?;
                    }
                    inner.recordings_dir_synced.store(true, Ordering::Release);
                }
                sync_dir(&dir)?;
            }
            Ok::<_, std::io::Error>(file)
        })
        .await
        .map_err(std::io::Error::other)??;
        Ok(Arc::new(RecordingFile {
            file,
            salt,
            path: rel,
            next: std::sync::atomic::AtomicU64::new(vigil_proto::record::SALT_LEN as u64),
        }))
    }

    /// Hands over a chunk of a recorded stream with its record: `body.recording` is filled in
    /// here (offset in `file`, length, SHA-256). With `wait`, resolves once both are written
    /// (input to a target is recorded before the target sees it); else at once.
    pub async fn chunk(
        &self,
        mut body: Body,
        file: &Arc<RecordingFile>,
        of: ChunkOf<'_>,
        bytes: Vec<u8>,
        wait: bool,
    ) -> Result<(), AuditError> {
        let offset = file.next.fetch_add(bytes.len() as u64, Ordering::Relaxed);
        body.recording = Some(vigil_proto::record::Recording {
            channel: of.channel,
            direction: of.direction.into(),
            offset: of.offset,
            length: bytes.len() as u64,
            sha256: vigil_proto::record::chunk_digest(Some(&file.salt), &bytes),
            salted: true,
            store: vigil_proto::record::ChunkStore::File {
                path: file.path.to_string_lossy().into_owned(),
                offset,
            },
        });
        let chunk = Some((file.clone(), bytes, offset));
        if wait {
            return self.inner.submit(body.to_json(), chunk).await;
        }
        self.inner.push(Entry {
            body: body.to_json(),
            reply: Reply::None,
            chunk,
        })
    }

    /// Writes the `stream_end` record, syncs the file and refuses further records; returns
    /// once that is done.
    pub async fn close(&self) {
        let end = self.body(None, Kind::StreamEnd).to_json();
        let (tx, rx) = oneshot::channel();
        {
            // One step: no append can be written between `stream_end` and the close.
            let mut q = self.inner.lock();
            if q.closed || q.closing.is_some() {
                return;
            }
            q.entries.push(Entry {
                body: end,
                reply: Reply::None,
                chunk: None,
            });
            q.closing = Some(tx);
        }
        self.inner.wake.notify_one();
        let _ = rx.await;
    }
}

impl Inner {
    fn lock(&self) -> MutexGuard<'_, Queue> {
        // The queue is a list of owned entries: a panic elsewhere cannot leave it inconsistent.
        self.queue.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// An append: written by the caller itself when it may ([`Inner::write_here`]), else
    /// handed to the writer thread and awaited.
    async fn submit(&self, body: Vec<u8>, chunk: Option<Chunk>) -> Result<(), AuditError> {
        let entry = Entry {
            body,
            reply: Reply::Caller,
            chunk,
        };
        let mut entry = match self.write_here(entry) {
            Ok(outcome) => return outcome,
            Err(entry) => entry,
        };
        let (tx, rx) = oneshot::channel();
        entry.reply = Reply::Waiter(tx);
        self.push(entry)?;
        rx.await.unwrap_or(Err(AuditError::Closed))
    }

    /// Writes everything queued and then `entry` on the calling thread, when `sync = "write"`
    /// and nobody else holds the writer (never waits for it); `Err(entry)` otherwise, for the
    /// writer thread.
    fn write_here(&self, entry: Entry) -> Result<Result<(), AuditError>, Entry> {
        if !self.inline {
            return Err(entry);
        }
        let mut writer = match self.writer.try_lock() {
            Ok(writer) => writer,
            Err(TryLockError::WouldBlock) => return Err(entry),
            // A write panicked: the chain's state is unknown, nothing more is written.
            Err(TryLockError::Poisoned(_)) => {
                self.fail_all();
                return Ok(Err(AuditError::Closed));
            }
        };
        let mut batch = {
            let mut q = self.lock();
            if q.closed || q.closing.is_some() {
                return Ok(Err(AuditError::Closed));
            }
            q.waited = 0;
            std::mem::take(&mut q.entries)
        };
        batch.push(entry);
        Ok(writer.write(self, batch).unwrap_or(Err(AuditError::Closed)))
    }

    /// After a write panicked: the log is closed, and every append and flush still queued is
    /// told so (rather than waiting for a writer that will never come).
    fn fail_all(&self) {
        tracing::error!("a write to the audit log panicked: the log is closed");
        let (queued, _closing) = {
            let mut q = self.lock();
            q.closed = true;
            (std::mem::take(&mut q.entries), q.closing.take())
        };
        let lost = queued.iter().filter(|e| !e.reply.waited()).count();
        self.metrics.audit_dropped_records.inc_by(lost as u64);
        for e in queued {
            e.reply.tell(Err(AuditError::Closed), &mut None);
        }
    }

    fn push(&self, entry: Entry) -> Result<(), AuditError> {
        let wake = {
            let mut q = self.lock();
            if q.closed || q.closing.is_some() {
                return Err(AuditError::Closed);
            }
            let waited = entry.reply.waited();
            q.entries.push(entry);
            q.waited += usize::from(waited);
            let wake = if waited { q.idle } else { q.deep };
            if wake {
                q.idle = false;
                q.deep = false;
            }
            wake
        };
        if wake {
            self.wake.notify_one();
        }
        Ok(())
    }
}

struct Writer {
    file: File,
    /// Length of the file up to the last good record.
    len: u64,
    chain: Chain,
    sync: SyncMode,
    /// Records that do not report failure, kept across failed writes.
    backlog: VecDeque<Entry>,
    /// Reused output buffer.
    buf: Vec<u8>,
}

impl Writer {
    /// The writer thread: takes everything queued, writes it in one `write(2)` (group commit),
    /// then tells each waiting append. While a write fails, records that cannot report failure
    /// are kept and retried every 100 ms.
    fn run(inner: &Inner) {
        let mut quiet = 0;
        loop {
            {
                let mut q = inner.lock();
                while q.waited == 0 && q.closing.is_none() {
                    q.idle = true;
                    // Records only: they wait a little for an append to share a write with.
                    // A backlog of failed writes is retried every 100 ms. Nothing: poll for
                    // records a while, then sleep until woken.
                    let delay = if !q.entries.is_empty() {
                        RECORD_DELAY
                    } else if inner.retrying.load(Ordering::Relaxed) {
                        Duration::from_millis(100)
                    } else if quiet < QUIET_POLLS {
                        quiet += 1;
                        RECORD_DELAY
                    } else {
                        q.deep = true;
                        q = inner.wake.wait(q).unwrap_or_else(|e| e.into_inner());
                        continue;
                    };
                    let (g, timeout) = inner
                        .wake
                        .wait_timeout(q, delay)
                        .unwrap_or_else(|e| e.into_inner());
                    q = g;
                    if timeout.timed_out()
                        && (!q.entries.is_empty() || inner.retrying.load(Ordering::Relaxed))
                    {
                        break;
                    }
                }
                if !q.entries.is_empty() {
                    quiet = 0;
                }
                q.idle = false;
                q.deep = false;
            }
            // A write panicked (poisoned): the chain's state is unknown, nothing more is written.
            let Ok(mut writer) = inner.writer.lock() else {
                inner.fail_all();
                return;
            };
            // Taken under the writer: a session writing meanwhile may have taken them already.
            let (batch, closing) = {
                let mut q = inner.lock();
                q.waited = 0;
                (std::mem::take(&mut q.entries), q.closing.take())
            };
            writer.write(inner, batch);
            if let Some(done) = closing {
                writer.close(inner);
                let _ = done.send(());
                return;
            }
        }
    }

    /// After the last batch: counts what failed writes left, syncs the file and refuses
    /// further records (still holding the writer, so no session writes after this).
    fn close(&mut self, inner: &Inner) {
        if !self.backlog.is_empty() {
            tracing::error!(
                records = self.backlog.len(),
                "audit log closed with unwritten records"
            );
            inner
                .metrics
                .audit_dropped_records
                .inc_by(self.backlog.len() as u64);
        }
        let _ = self.file.sync_all();
        inner.lock().closed = true;
    }

    /// Writes the backlog, then `batch`: each recorded chunk into its recording file, then
    /// every record in one `write(2)`. On failure the log is rolled back (truncated, the chain
    /// restored): no append of the batch is in the log (each caller refuses its action), the
    /// records that cannot fail are kept in order. With `sync = "fsync"` the recording files
    /// are synced before the records that prove their chunks.
    /// Returns the outcome of the batch's [`Reply::Caller`] entry, if it has one.
    fn write(&mut self, inner: &Inner, batch: Vec<Entry>) -> Option<Result<(), AuditError>> {
        let mut own = None;
        let before = self.chain.clone();
        self.buf.clear();
        let mut entries = std::mem::take(&mut self.backlog);
        entries.extend(batch);
        let mut written = Vec::with_capacity(entries.len());
        let mut touched: Vec<Arc<RecordingFile>> = Vec::new();
        let mut failed = None;
        while let Some(e) = entries.pop_front() {
            if let Some(refusal) = self.spool_refusal(inner, &e) {
                e.reply.tell(Err(refusal), &mut own);
                continue;
            }
            if let Some((file, bytes, offset)) = &e.chunk {
                if !touched.iter().any(|f| Arc::ptr_eq(f, file)) {
                    touched.push(file.clone());
                }
                use std::os::unix::fs::FileExt;
                if let Err(err) = file.file.write_all_at(bytes, *offset) {
                    written.push(e);
                    written.extend(entries.drain(..));
                    failed = Some(err);
                    break;
                }
            }
            if !e.body.is_empty() {
                self.chain.seal_into(&e.body, &mut self.buf);
                self.buf.push(b'\n');
            }
            written.push(e);
        }
        if failed.is_none() && self.sync == SyncMode::Fsync {
            failed = touched.iter().find_map(|f| f.file.sync_data().err());
        }
        let result = match failed {
            Some(err) => Err(err),
            None if self.buf.is_empty() => Ok(()),
            None => self.write_buf(),
        };
        match result {
            Ok(()) => self.written(inner, written, &mut own),
            Err(e) => {
                // Chunks already written stay: no record names them (their records are
                // rolled back), and a retry writes them again at the same offsets.
                self.chain = before;
                self.failed(inner, written, e, &mut own)
            }
        }
        inner
            .retrying
            .store(!self.backlog.is_empty(), Ordering::Relaxed);
        own
    }

    /// With a Kafka sink: the refusal of an append while the spool holds more than it may.
    fn spool_refusal(&self, inner: &Inner, e: &Entry) -> Option<AuditError> {
        let spool = inner.spool.as_ref()?;
        if !e.reply.waited() {
            return None;
        }
        let unacked = spool.unacked(self.len + self.buf.len() as u64);
        (unacked > spool.limit).then_some(AuditError::SpoolFull { unacked })
    }

    /// After a good write: the head, the metrics and the spool move on; every waiter is told.
    fn written(
        &mut self,
        inner: &Inner,
        written: Vec<Entry>,
        own: &mut Option<Result<(), AuditError>>,
    ) {
        if !self.buf.is_empty() {
            self.len += self.buf.len() as u64;
            let records = written.iter().filter(|e| !e.body.is_empty()).count() as u64;
            let m = &inner.metrics;
            m.audit_records.inc_by(records);
            m.audit_bytes.inc_by(self.buf.len() as u64);
            m.audit_batches.inc();
            inner.healthy.store(true, Ordering::Relaxed);
            let seq = self.chain.next_seq() - 1;
            *inner.head.lock().unwrap_or_else(|e| e.into_inner()) =
                Some((seq, self.chain.head_hash(), self.len));
            if let Some(spool) = &inner.spool {
                spool
                    .written_records
                    .store(self.chain.next_seq(), Ordering::Relaxed);
                spool.written_bytes.store(self.len, Ordering::Relaxed);
                spool.notify.notify_one();
            }
        }
        for e in written {
            e.reply.tell(Ok(()), own);
        }
    }

    /// After a failed write: the log is cut back to its last good record, appends are told
    /// why, records that cannot fail wait for the next write.
    fn failed(
        &mut self,
        inner: &Inner,
        written: Vec<Entry>,
        e: std::io::Error,
        own: &mut Option<Result<(), AuditError>>,
    ) {
        inner.metrics.audit_write_errors.inc();
        if inner.healthy.swap(false, Ordering::Relaxed) {
            tracing::error!(path = %inner.path.display(), error = %e, "audit write failed; refusing statements until it succeeds");
        }
        if let Err(e) = self.file.set_len(self.len) {
            tracing::error!(error = %e, "cannot truncate the audit log after a failed write");
        }
        let error = AuditError::Write(e.to_string());
        for entry in written {
            match entry.reply {
                Reply::None => self.backlog.push_back(entry),
                reply if entry.body.is_empty() => reply.tell(Ok(()), own),
                reply => reply.tell(Err(error.clone()), own),
            }
        }
        while self.backlog.len() > MAX_BACKLOG {
            self.backlog.pop_front();
            inner.metrics.audit_dropped_records.inc();
        }
    }

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

/// Makes the entries of directory `dir` (a file created in it) survive a power loss.
fn sync_dir(dir: &Path) -> std::io::Result<()> {
    std::fs::File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_record_is_cut_to_fit_its_longest_strings_first_with_their_length_and_hash() {
        use sha2::Digest;
        let long = "é".repeat(40_000);
        let json = serde_json::to_vec(&serde_json::json!({
            "kind": "blocked",
            "request": {"protocol": "postgres", "text": long, "params": ["\u{1}".repeat(9_000)]},
            "detail": "short",
        }))
        .unwrap();
        let cut = cut_to_fit(&json, 20_000);
        assert!(cut.len() <= 20_000, "{}", cut.len());
        let v: serde_json::Value = serde_json::from_slice(&cut).unwrap();
        let text = v["request"]["text"].as_str().unwrap();
        let marker = format!(
            "…[cut by the gateway: 80000 bytes, sha256 {}]",
            hex::encode(sha2::Sha256::digest(long.as_bytes()))
        );
        assert!(text.starts_with("éé") && text.ends_with(&marker), "{text}");
        assert_eq!(v["detail"], "short");
        // Many short strings: the large fields are left out, and the detail says so.
        let many = serde_json::to_vec(&serde_json::json!({
            "kind": "blocked",
            "stmt": 3,
            "request": {"protocol": "postgres", "params": vec!["x".repeat(200); 500]},
        }))
        .unwrap();
        let cut = cut_to_fit(&many, 20_000);
        assert!(cut.len() <= 20_000, "{}", cut.len());
        let v: serde_json::Value = serde_json::from_slice(&cut).unwrap();
        assert_eq!(v["stmt"], 3);
        assert!(v.get("request").is_none());
        let detail = v["detail"].as_str().unwrap();
        assert!(
            detail.starts_with(&format!("…[cut by the gateway: {} bytes", many.len())),
            "{detail}"
        );
        // What fits is left as it is.
        assert_eq!(
            cut_to_fit(&json, json.len()),
            serde_json::to_vec(&serde_json::from_slice::<serde_json::Value>(&json).unwrap())
                .unwrap()
        );
    }

    #[test]
    fn times_are_rfc3339_with_nanoseconds() {
        const FORMAT: &[time::format_description::BorrowedFormatItem<'static>] = time::macros::format_description!(
            "[year]-[month]-[day]T[hour]:[minute]:[second].[subsecond digits:9]Z"
        );
        for unix_ns in [
            0i128,
            1,
            999_999_999,
            1_796_414_213_953_526_877,
            253_402_300_799_999_999_999,
        ] {
            let t = time::OffsetDateTime::from_unix_timestamp_nanos(unix_ns).unwrap();
            assert_eq!(rfc3339(t), t.format(FORMAT).unwrap());
        }
        assert_eq!(
            rfc3339(
                time::OffsetDateTime::from_unix_timestamp_nanos(1_796_414_213_953_526_877).unwrap()
            ),
            "2026-12-04T19:56:53.953526877Z"
        );
    }
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

    /// Concurrent appends share writes (group commit); each resolves only once its record is
    /// in the file; the records chain in the order handed over (each task's records in its
    /// own order, whoever wrote them), and `close` ends the stream. In both sync modes: with
    /// `sync = "write"` sessions write for each other, and the thread takes what finds the
    /// writer busy.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn appends_are_group_committed_and_resolve_once_written() {
        for sync in [SyncMode::Fsync, SyncMode::Write] {
            let dir = tempfile::tempdir().unwrap();
            let metrics = Arc::new(Metrics::default());
            let log = AuditLog::open(dir.path(), "n1", sync, metrics.clone(), None).unwrap();
            let mut tasks = Vec::new();
            for t in 0..8 {
                let log = log.clone();
                tasks.push(tokio::spawn(async move {
                    for i in 0..50 {
                        let mut b = log.body(Some("s"), Kind::Request);
                        b.detail = Some(format!("{t}-{i}"));
                        log.append(&b).await.unwrap();
                        let text = std::fs::read_to_string(log.path()).unwrap();
                        assert!(text.contains(&format!("\"detail\":\"{t}-{i}\"")));
                        let mut b = log.body(Some("s"), Kind::Response);
                        b.detail = Some(format!("{t}-{i}"));
                        log.record(b);
                    }
                }));
            }
            for t in tasks {
                t.await.unwrap();
            }
            log.close().await;
            assert!(log.append(&log.body(None, Kind::Request)).await.is_err());
            let records = 1 + 8 * 50 * 2 + 1;
            assert_eq!(metrics.audit_records.get(), records, "{sync:?}");
            assert!(
                metrics.audit_batches.get() < records,
                "{sync:?}: {} writes for {records} records",
                metrics.audit_batches.get()
            );
            let bytes = std::fs::read(log.path()).unwrap();
            let mut prev = vigil_proto::chain::GENESIS_PREV.to_string();
            let mut next = [(Kind::Request, 0); 8];
            let mut kinds = Vec::new();
            for (seq, line) in bytes
                .split(|b| *b == b'\n')
                .filter(|l| !l.is_empty())
                .enumerate()
            {
                let r = vigil_proto::record::Record::parse(line).unwrap();
                assert_eq!((r.seq, &r.prev), (seq as u64, &prev), "{sync:?}");
                prev = hex::encode(vigil_proto::chain::record_hash(line));
                let body = &r.body;
                kinds.push(body.kind);
                let numbered = match body.kind {
                    Kind::Request | Kind::Response => body.detail.as_deref(),
                    _ => None,
                };
                if let Some((t, i)) = numbered.and_then(|d| d.split_once('-')) {
                    let t: usize = t.parse().unwrap();
                    assert_eq!(
                        (body.kind, i.parse().unwrap()),
                        next[t],
                        "{sync:?}: task {t}"
                    );
                    next[t] = match body.kind {
                        Kind::Request => (Kind::Response, next[t].1),
                        _ => (Kind::Request, next[t].1 + 1),
                    };
                }
            }
            assert_eq!(kinds.first(), Some(&Kind::StreamStart));
            assert_eq!(kinds.last(), Some(&Kind::StreamEnd));
            assert_eq!(
                log.head().map(|(seq, hash, _)| (seq, hash)),
                Some((records - 1, prev))
            );
        }
    }

    /// A log in `sync = "write"` mode (in a directory that lives as long as the first value)
    /// with one request appended.
    async fn log_with_one_request() -> (tempfile::TempDir, AuditLog) {
        let dir = tempfile::tempdir().unwrap();
        let metrics = Arc::new(Metrics::default());
        let log = AuditLog::open(dir.path(), "n1", SyncMode::Write, metrics, None).unwrap();
        log.append(&log.body(None, Kind::Request)).await.unwrap();
        (dir, log)
    }

    /// With `sync = "write"`, an append that finds the writer held (another session writing,
    /// here the test) is not written by its session: the writer thread writes it once the
    /// writer is free, and only then does the append resolve.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_append_that_finds_the_writer_busy_is_written_by_the_thread() {
        let (_dir, log) = log_with_one_request().await;
        // Another writer: a thread holding the writer until told to let go.
        let (held_tx, held_rx) = std::sync::mpsc::channel();
        let (release_tx, release_rx) = std::sync::mpsc::channel::<()>();
        let holder = std::thread::spawn({
            let log = log.clone();
            move || {
                let _writer = log.inner.writer.lock().unwrap();
                held_tx.send(()).unwrap();
                let _ = release_rx.recv();
            }
        });
        held_rx.recv().unwrap();
        let append = tokio::spawn({
            let log = log.clone();
            async move {
                let mut b = log.body(Some("s"), Kind::Request);
                b.detail = Some("while busy".into());
                log.append(&b).await
            }
        });
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!append.is_finished(), "resolved while the writer was held");
        let text = std::fs::read_to_string(log.path()).unwrap();
        assert!(!text.contains("while busy"));
        drop(release_tx);
        holder.join().unwrap();
        append.await.unwrap().unwrap();
        let text = std::fs::read_to_string(log.path()).unwrap();
        assert!(text.contains("\"detail\":\"while busy\""));
        log.close().await;
    }

    /// A write that panicked leaves the chain's state unknown: the log closes, and appends and
    /// flushes, queued or new, are refused rather than left waiting.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_write_that_panicked_closes_the_log_and_nobody_waits() {
        let (_dir, log) = log_with_one_request().await;
        let poisoner = std::thread::spawn({
            let log = log.clone();
            move || {
                let _writer = log.inner.writer.lock().unwrap();
                panic!("a write panics");
            }
        });
        assert!(poisoner.join().is_err());
        let appended = tokio::time::timeout(
            Duration::from_secs(10),
            log.append(&log.body(Some("s"), Kind::Request)),
        )
        .await
        .expect("the append is answered");
        assert!(matches!(appended, Err(AuditError::Closed)), "{appended:?}");
        tokio::time::timeout(Duration::from_secs(10), log.flush())
            .await
            .expect("the flush is answered");
        tokio::time::timeout(Duration::from_secs(10), log.close())
            .await
            .expect("the close is answered");
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
