//! The witness: checkpoints of this node's audit stream, signed with the node key and held by
//! the coordinator, so that a truncated or rewritten log is detected by `vigil audit verify`.

use super::AuditLog;
use crate::core::approvals::Approvals;
use crate::core::metrics::Metrics;
use ed25519_dalek::SigningKey;
use std::sync::Arc;
use std::time::Duration;
use vigil_proto::checkpoint::Checkpoint;

/// Signs checkpoints of this node's stream and hands them to the coordinator (the witness):
/// at once (covering `stream_start`, before the node serves: [`Witness::witnessed`]), then soon after the stream grows, at spacings that
/// double from [`FIRST_SPACING`] up to the interval, and once more at stream end.
#[derive(Clone)]
pub struct Witness {
    audit: AuditLog,
    approvals: Arc<Approvals>,
    key: Arc<SigningKey>,
    metrics: Arc<Metrics>,
    last: Arc<tokio::sync::Mutex<Option<u64>>>,
}

/// How soon the stream's second checkpoint may follow its first. A process killed before its
/// stream's first interval ends would otherwise leave everything after `stream_start`
/// unanchored; with spacings of 0.25, 0.5, 1, 2, 4 s … a young stream's unanchored tail is as
/// short as its age allows.
pub const FIRST_SPACING: Duration = Duration::from_millis(250);

/// How often a stream's first checkpoint is offered again while the coordinator does not take
/// it (the node serves nothing meanwhile).
const RETRY_FIRST: Duration = Duration::from_secs(1);

impl Witness {
    pub fn new(
        audit: AuditLog,
        approvals: Arc<Approvals>,
        key: Arc<SigningKey>,
        metrics: Arc<Metrics>,
    ) -> Self {
        Self {
            audit,
            approvals,
            key,
            metrics,
            last: Arc::new(tokio::sync::Mutex::new(None)),
        }
    }

    pub async fn run(self, every: Duration, mut stop: tokio::sync::watch::Receiver<bool>) {
        // The stream is polled at the current spacing (a lock, nothing more, while it does not
        // grow); each checkpoint offered doubles the spacing, up to `every` (a coordinator that
        // refuses is not asked more often than that either).
        let mut spacing = Duration::ZERO;
        loop {
            tokio::select! {
                _ = tokio::time::sleep(spacing) => {}
                _ = stop.changed() => {}
            }
            if *stop.borrow() {
                return;
            }
            // The first tick may find the stream as [`Witness::witnessed`] left it.
            if self.checkpoint().await || spacing.is_zero() {
                spacing = (spacing * 2).max(FIRST_SPACING).min(every);
            }
        }
    }

    /// Offers a checkpoint of the stream every [`RETRY_FIRST`] until the coordinator takes one
    /// (of `stream_start` at least): true then, false if `stop` comes first. The node serves
    /// no session before: records in a stream the witness never saw cannot be told from ones
    /// written by someone else.
    pub async fn witnessed(&self, stop: &mut tokio::sync::watch::Receiver<bool>) -> bool {
        loop {
            self.checkpoint().await;
            if self.last.lock().await.is_some() {
                return true;
            }
            tokio::select! {
                _ = tokio::time::sleep(RETRY_FIRST) => {}
                _ = stop.changed() => {}
            }
            if *stop.borrow() {
                return false;
            }
        }
    }

    /// Signs the stream's head, if it moved, and puts it to the coordinator. Returns whether
    /// it moved (a checkpoint was offered, taken or not).
    pub async fn checkpoint(&self) -> bool {
        let Some((seq, hash, _)) = self.audit.head() else {
            return false;
        };
        let mut last = self.last.lock().await;
        if *last == Some(seq) {
            return false;
        }
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0);
        let cp = Checkpoint::sign(&self.key, self.audit.stream(), seq, &hash, now);
        match self.approvals.client().put_checkpoint(cp.into()).await {
            Ok(_) => {
                *last = Some(seq);
                self.metrics.checkpoints.inc();
            }
            Err(e) => {
                self.metrics.checkpoint_errors.inc();
                tracing::warn!(error = %e.message(), "the coordinator did not take the checkpoint; retrying at the next tick");
            }
        }
        true
    }
}
