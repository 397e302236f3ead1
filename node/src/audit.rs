//! The local audit log: one append-only file per stream (one gateway process lifetime), written
//! by a dedicated thread with group commit.
//!
//! Two ways in:
//! - [`AuditLog::append`] waits until the record is written: requests use it, so a statement
//!   reaches the target only after its record is in the log. If the write fails, the caller
//!   gets the error and refuses the statement.
//! - [`AuditLog::record`] does not wait (responses, session ends, refusals). Such a record is
//!   never dropped: when a write fails it stays queued, in order, and goes out with the next
//!   batch that succeeds.
//!
//! A failed write is rolled back (file truncated to its last good length, chain state restored),
//! so the file never holds a torn record and seq stays contiguous.

use crate::config::SyncMode;
use crate::metrics::Metrics;
use std::collections::VecDeque;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};
use tokio::sync::{mpsc, oneshot};
use vigil_proto::chain::Chain;
use vigil_proto::record::{Body, Kind};

/// File name suffix of stream files.
pub const LOG_SUFFIX: &str = ".jsonl";

/// Records queued for retry are bounded; past this the oldest would have to be dropped, which is
/// counted and logged (the drop path the tests keep at zero).
const MAX_BACKLOG: usize = 1_000_000;
const MAX_BATCH: usize = 4096;

#[derive(Debug, thiserror::Error, Clone)]
pub enum AuditError {
    #[error("the audit log cannot be written: {0}")]
    Write(String),
    #[error("the audit log is closed")]
    Closed,
}

enum Cmd {
    Append {
        body: Box<Body>,
        ack: Option<oneshot::Sender<Result<(), AuditError>>>,
    },
    /// Answered once everything queued before it has been written (or has failed).
    Flush {
        done: oneshot::Sender<()>,
    },
    Close {
        done: oneshot::Sender<()>,
    },
}

/// A handle to the node's audit stream. Cheap to clone.
#[derive(Clone)]
pub struct AuditLog {
    tx: mpsc::UnboundedSender<Cmd>,
    stream: Arc<str>,
    node: Arc<str>,
    path: Arc<Path>,
    /// False while the last write failed (the node is not ready: it refuses statements).
    healthy: Arc<AtomicBool>,
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
    /// Opens a new stream file in `dir` and starts the writer thread.
    pub fn open(
        dir: &Path,
        node: &str,
        sync: SyncMode,
        metrics: Arc<Metrics>,
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
        let (tx, rx) = mpsc::unbounded_channel();
        let healthy = Arc::new(AtomicBool::new(true));
        let log = Self {
            tx,
            stream: stream.clone().into(),
            node: node.into(),
            path: path.clone().into(),
            healthy: healthy.clone(),
        };
        let writer = Writer {
            file,
            path,
            len: 0,
            chain: Chain::new(stream),
            sync,
            metrics,
            backlog: VecDeque::new(),
            healthy,
        };
        std::thread::Builder::new()
            .name("vigil-audit".into())
            .spawn(move || writer.run(rx))?;
        let mut start = log.body(None, Kind::StreamStart);
        start.detail = Some(format!("vigil-node {}", env!("CARGO_PKG_VERSION")));
        log.record(start);
        Ok(log)
    }

    pub fn stream(&self) -> &str {
        &self.stream
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Whether the last write succeeded.
    pub fn is_healthy(&self) -> bool {
        self.healthy.load(Ordering::Relaxed)
    }

    /// A body stamped with the time, this node and the session.
    pub fn body(&self, session: Option<&str>, kind: Kind) -> Body {
        Body {
            time: now_rfc3339(),
            node: self.node.to_string(),
            session: session.map(str::to_string),
            kind,
            principal: None,
            connection: None,
            stmt: None,
            request: None,
            response: None,
            outcome: None,
            duration_us: None,
            policy: None,
            detail: None,
        }
    }

    /// Appends and waits until the record is written.
    pub async fn append(&self, body: Body) -> Result<(), AuditError> {
        let (ack, done) = oneshot::channel();
        self.tx
            .send(Cmd::Append {
                body: Box::new(body),
                ack: Some(ack),
            })
            .map_err(|_| AuditError::Closed)?;
        done.await.map_err(|_| AuditError::Closed)?
    }

    /// Appends without waiting; the record is kept until it is written.
    pub fn record(&self, body: Body) {
        if self
            .tx
            .send(Cmd::Append {
                body: Box::new(body),
                ack: None,
            })
            .is_err()
        {
            tracing::error!("audit record after the log was closed");
        }
    }

    /// Waits until every record queued so far has been through a write attempt.
    pub async fn flush(&self) {
        let (done, wait) = oneshot::channel();
        if self.tx.send(Cmd::Flush { done }).is_ok() {
            let _ = wait.await;
        }
    }

    /// Writes the `stream_end` record, flushes and stops the writer.
    pub async fn close(&self) {
        self.record(self.body(None, Kind::StreamEnd));
        let (done, wait) = oneshot::channel();
        if self.tx.send(Cmd::Close { done }).is_ok() {
            let _ = wait.await;
        }
    }
}

struct Writer {
    file: File,
    path: PathBuf,
    /// Length of the file up to the last good record.
    len: u64,
    chain: Chain,
    sync: SyncMode,
    metrics: Arc<Metrics>,
    /// Records that do not wait for their write, kept across failed writes.
    backlog: VecDeque<Body>,
    healthy: Arc<AtomicBool>,
}

type Ack = oneshot::Sender<Result<(), AuditError>>;

impl Writer {
    fn run(mut self, mut rx: mpsc::UnboundedReceiver<Cmd>) {
        let mut acks: Vec<Ack> = Vec::new();
        let mut waiting: Vec<Body> = Vec::new();
        let mut flushes: Vec<oneshot::Sender<()>> = Vec::new();
        loop {
            let mut close = None;
            if self.backlog.is_empty() {
                // Nothing to retry: sleep until a command arrives.
                match rx.blocking_recv() {
                    Some(cmd) => close = self.take(cmd, &mut waiting, &mut acks, &mut flushes),
                    None => return,
                }
            } else {
                // The last write failed: retry shortly, with whatever arrived meanwhile.
                std::thread::sleep(std::time::Duration::from_millis(50));
            }
            while close.is_none() && waiting.len() + self.backlog.len() < MAX_BATCH {
                match rx.try_recv() {
                    Ok(cmd) => close = self.take(cmd, &mut waiting, &mut acks, &mut flushes),
                    Err(_) => break,
                }
            }
            self.write_batch(&mut waiting, &mut acks);
            for done in flushes.drain(..) {
                let _ = done.send(());
            }
            if let Some(done) = close {
                if !self.backlog.is_empty() {
                    tracing::error!(
                        records = self.backlog.len(),
                        "audit log closed with unwritten records"
                    );
                }
                let _ = self.file.sync_all();
                let _ = done.send(());
                return;
            }
        }
    }

    /// Sorts one command into the batch; returns the closer when it asks to close.
    fn take(
        &mut self,
        cmd: Cmd,
        waiting: &mut Vec<Body>,
        acks: &mut Vec<Ack>,
        flushes: &mut Vec<oneshot::Sender<()>>,
    ) -> Option<oneshot::Sender<()>> {
        match cmd {
            Cmd::Append {
                body,
                ack: Some(ack),
            } => {
                waiting.push(*body);
                acks.push(ack);
                None
            }
            Cmd::Append { body, ack: None } => {
                self.backlog.push_back(*body);
                None
            }
            Cmd::Flush { done } => {
                flushes.push(done);
                None
            }
            Cmd::Close { done } => Some(done),
        }
    }

    /// Writes the backlog, then the waiting records, in one `write(2)`.
    fn write_batch(&mut self, waiting: &mut Vec<Body>, acks: &mut Vec<Ack>) {
        if waiting.is_empty() && self.backlog.is_empty() {
            return;
        }
        let before = self.chain.clone();
        let mut buf = Vec::with_capacity(512 * (waiting.len() + self.backlog.len()));
        let mut records = 0u64;
        for body in self.backlog.iter().chain(waiting.iter()) {
            buf.extend_from_slice(&self.chain.seal(body));
            buf.push(b'\n');
            records += 1;
        }
        match self.write_all(&buf) {
            Ok(()) => {
                self.len += buf.len() as u64;
                self.backlog.clear();
                waiting.clear();
                for a in acks.drain(..) {
                    let _ = a.send(Ok(()));
                }
                self.metrics.audit_records.inc_by(records);
                self.metrics.audit_bytes.inc_by(buf.len() as u64);
                self.metrics.audit_batches.inc();
                self.healthy.store(true, Ordering::Relaxed);
            }
            Err(e) => {
                self.metrics.audit_write_errors.inc();
                self.healthy.store(false, Ordering::Relaxed);
                tracing::error!(path = %self.path.display(), error = %e, "audit write failed; refusing the statements it carried");
                // Roll back: no torn record stays in the file, seq stays contiguous.
                if let Err(e) = self.file.set_len(self.len) {
                    tracing::error!(error = %e, "cannot truncate the audit log after a failed write");
                }
                self.chain = before;
                let err = AuditError::Write(e.to_string());
                waiting.clear();
                for a in acks.drain(..) {
                    let _ = a.send(Err(err.clone()));
                }
                while self.backlog.len() > MAX_BACKLOG {
                    self.backlog.pop_front();
                    self.metrics.audit_dropped_records.inc();
                }
            }
        }
    }

    fn write_all(&mut self, buf: &[u8]) -> std::io::Result<()> {
        self.file.write_all(buf)?;
        if self.sync == SyncMode::Fsync {
            self.file.sync_data()?;
        }
        Ok(())
    }
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
