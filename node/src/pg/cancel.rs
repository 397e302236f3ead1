//! Routing of CancelRequests. Each session hands its client a key pair of the gateway's own
//! making; a cancel carrying that pair is forwarded to the target with the target's real key.
//! The target's key never reaches the client.

use super::backend::Target;
use super::PgContext;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use vigil_proto::record::{Connection, Kind, Outcome};

pub struct CancelEntry {
    pub target: Arc<Target>,
    /// The target's own BackendKeyData.
    pub backend_pid: i32,
    pub backend_secret: i32,
    pub session: String,
}

/// The (pid, secret) pair a client holds.
type Key = (i32, i32);

#[derive(Clone, Default)]
pub struct CancelRegistry {
    inner: Arc<Mutex<HashMap<Key, Arc<CancelEntry>>>>,
}

/// Removes its key from the registry when the session ends.
pub struct CancelGuard {
    registry: CancelRegistry,
    key: (i32, i32),
}

impl CancelGuard {
    /// The key pair the client holds.
    pub fn key(&self) -> (i32, i32) {
        self.key
    }
}

impl Drop for CancelGuard {
    fn drop(&mut self) {
        self.registry
            .inner
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&self.key);
    }
}

impl CancelRegistry {
    /// Registers a session and returns the key pair to give its client.
    pub fn register(&self, entry: CancelEntry) -> ((i32, i32), CancelGuard) {
        let entry = Arc::new(entry);
        let mut map = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            // Positive pids look like real ones to clients that print them.
            let key = (rand::random::<i32>() & i32::MAX, rand::random::<i32>());
            if let std::collections::hash_map::Entry::Vacant(v) = map.entry(key) {
                v.insert(entry);
                return (
                    key,
                    CancelGuard {
                        registry: self.clone(),
                        key,
                    },
                );
            }
        }
    }

    pub fn lookup(&self, pid: i32, secret: i32) -> Option<Arc<CancelEntry>> {
        self.inner
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&(pid, secret))
            .cloned()
    }
}

/// Routes a CancelRequest (a client's, or the gateway's own for a session whose token expired).
/// Like every request, it is on record before the target sees it; an unknown key is refused on
/// record.
pub async fn forward(ctx: &PgContext, conn: &Connection, pid: i32, secret: i32) {
    let mut body = ctx.core.audit.body(None, Kind::Cancel);
    body.connection = Some(Arc::new(conn.clone()));
    let Some(entry) = ctx.cancels.lookup(pid, secret) else {
        body.outcome = Some(Outcome::Denied);
        body.detail = Some("no session holds this cancel key".into());
        ctx.core.audit.record(body);
        return;
    };
    body.session = Some(entry.session.clone());
    body.outcome = Some(Outcome::Success);
    body.detail = Some("forwarded to the target".into());
    if let Err(e) = ctx.core.audit.append(&body).await {
        tracing::warn!(error = %e, "cancel not forwarded: its audit record cannot be written");
        return;
    }
    ctx.core.metrics.cancel_requests.inc();
    if let Err(e) = entry
        .target
        .cancel(entry.backend_pid, entry.backend_secret)
        .await
    {
        body.time = crate::audit::now_rfc3339();
        body.outcome = Some(Outcome::Error);
        body.detail = Some(format!("forwarding failed: {e}"));
        ctx.core.audit.record(body);
    }
}
