//! Routing of CancelRequests. Each session hands its client a key pair of the gateway's own
//! making; a cancel carrying that pair is forwarded to the target with the target's real key.
//! The target's key never reaches the client.
//!
//! The pair names the node that made it: bits 15–30 of the pid are the node's tag
//! ([`crate::core::peers::tag_of`] its id), the rest of the pid and all of the secret are
//! random (47 bits to guess). A cancel for another node's tag, which the load balancer sent
//! here, is passed to that node ([`crate::core::peers`]), which records and forwards it.

use super::backend::Target;
use super::PgContext;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use vigil_proto::record::{Body, Connection, Kind, Outcome};

pub struct CancelEntry {
    pub target: Arc<Target>,
    /// The target's own BackendKeyData.
    pub backend_pid: i32,
    pub backend_secret: i32,
    pub session: String,
}

/// The (pid, secret) pair a client holds.
type Key = (i32, i32);

#[derive(Clone)]
pub struct CancelRegistry {
    inner: Arc<Mutex<HashMap<Key, Arc<CancelEntry>>>>,
    /// This node's tag, in every pid it gives out.
    tag: u16,
    denied: Arc<Mutex<Denied>>,
}

/// Denied cancels recorded one by one per second, at most. A cancel needs no login: a flood
/// of made-up keys must not fill the audit log.
pub const DENIED_ON_RECORD_PER_SEC: u32 = 20;

/// The denied cancels of the current second, and those not recorded since the last that was.
#[derive(Default)]
struct Denied {
    second: Option<Instant>,
    recorded: u32,
    unrecorded: u64,
}

impl Denied {
    /// Whether a denied cancel at `now` goes on record, with how many before it did not.
    fn admit(&mut self, now: Instant) -> Option<u64> {
        if self
            .second
            .is_none_or(|s| now.duration_since(s) >= Duration::from_secs(1))
        {
            self.second = Some(now);
            self.recorded = 0;
        }
        if self.recorded == DENIED_ON_RECORD_PER_SEC {
            self.unrecorded += 1;
            return None;
        }
        self.recorded += 1;
        Some(std::mem::take(&mut self.unrecorded))
    }
}

/// The node tag a client's cancel pid carries.
pub fn tag_of_pid(pid: i32) -> u16 {
    ((pid >> 15) & 0xffff) as u16
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
    pub fn new(tag: u16) -> Self {
        Self {
            inner: Default::default(),
            tag,
            denied: Default::default(),
        }
    }

    /// Registers a session and returns the key pair to give its client.
    pub fn register(&self, entry: CancelEntry) -> ((i32, i32), CancelGuard) {
        let entry = Arc::new(entry);
        let mut map = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            // Positive pids look like real ones to clients that print them.
            let pid = (i32::from(self.tag) << 15) | (rand::random::<i32>() & 0x7fff);
            let key = (pid, rand::random::<i32>());
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

    /// Records a denied cancel's `body`, unless [`DENIED_ON_RECORD_PER_SEC`] were this second:
    /// then it is only counted (`vigil_cancels_unrecorded_total`), and the next one on record
    /// says how many were not.
    fn record_denied(&self, ctx: &PgContext, mut body: Body) {
        let admitted = self
            .denied
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .admit(Instant::now());
        match admitted {
            None => {
                ctx.core.metrics.cancels_unrecorded.inc();
            }
            Some(before) => {
                if before > 0 {
                    let detail = body.detail.get_or_insert_with(String::new);
                    detail.push_str(&format!(
                        " ({before} denied cancels before this one were not recorded one by one: more than {DENIED_ON_RECORD_PER_SEC} a second)"
                    ));
                }
                ctx.core.audit.record(body);
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
/// Like every request, it is on record before the target sees it. A key of another node's
/// making goes to that node; the client is told nothing either way (PostgreSQL answers a
/// cancel with nothing), the record says what happened.
pub async fn forward(ctx: &PgContext, conn: &Connection, pid: i32, secret: i32) {
    let tag = tag_of_pid(pid);
    let peers = &ctx.core.peers;
    let peer = (tag != peers.tag()).then(|| peers.by_tag(tag)).flatten();
    let Some(peer) = peer else {
        cancel_here(ctx, conn, pid, secret, None).await;
        return;
    };
    let mut body = ctx.core.audit.body(None, Kind::Cancel);
    body.connection = Some(Arc::new(conn.clone()));
    ctx.core.metrics.cancels_passed.inc();
    match peers.pass_pg_cancel(peer, pid, secret, conn).await {
        Ok(true) => {
            body.outcome = Some(Outcome::Success);
            body.detail = Some(format!(
                "passed to node {}, which holds the session",
                peer.id
            ));
        }
        Ok(false) => {
            body.outcome = Some(Outcome::Denied);
            body.detail = Some(format!(
                "passed to node {}: no session there holds this cancel key",
                peer.id
            ));
            return ctx.cancels.record_denied(ctx, body);
        }
        Err(e) => {
            body.outcome = Some(Outcome::Error);
            body.detail = Some(format!("not passed on: {e:#}"));
        }
    }
    ctx.core.audit.record(body);
}

/// Cancels on this node's target, if a session here holds the key: whether one did. `from`:
/// the node that passed the cancel on. An unknown key is on record only when this node
/// received it (the node that passes one on records the answer itself).
pub async fn cancel_here(
    ctx: &PgContext,
    conn: &Connection,
    pid: i32,
    secret: i32,
    from: Option<&str>,
) -> bool {
    let mut body = ctx.core.audit.body(None, Kind::Cancel);
    body.connection = Some(Arc::new(conn.clone()));
    let routed = from
        .map(|n| format!(" (passed on by node {n})"))
        .unwrap_or_default();
    let Some(entry) = ctx.cancels.lookup(pid, secret) else {
        if from.is_none() {
            body.outcome = Some(Outcome::Denied);
            body.detail = Some("no session holds this cancel key".into());
            ctx.cancels.record_denied(ctx, body);
        }
        return false;
    };
    body.session = Some(entry.session.clone());
    body.outcome = Some(Outcome::Success);
    body.detail = Some(format!("forwarded to the target{routed}"));
    if let Err(e) = ctx.core.audit.append(&body).await {
        tracing::warn!(error = %e, "cancel not forwarded: its audit record cannot be written");
        return true;
    }
    ctx.core.metrics.cancel_requests.inc();
    if let Err(e) = entry
        .target
        .cancel(entry.backend_pid, entry.backend_secret)
        .await
    {
        body.time = crate::audit::now_rfc3339();
        body.outcome = Some(Outcome::Error);
        body.detail = Some(format!("forwarding failed{routed}: {e}"));
        ctx.core.audit.record(body);
    }
    true
}

/// A node's PostgreSQL sessions, as its admin endpoint reaches them for a cancel another node
/// passes on.
#[derive(Clone)]
pub struct PassedCancels(pub(super) Arc<PgContext>);

impl PassedCancels {
    /// Checks the call (signature, age) and cancels here: whether a session held the key.
    pub async fn handle(
        &self,
        body: &[u8],
        signature: Option<&str>,
    ) -> Result<bool, crate::core::peers::CallError> {
        let ctx = &self.0;
        let call = ctx.core.peers.verify_pg_cancel(body, signature)?;
        let conn = Connection {
            protocol: super::PROTOCOL.into(),
            ..call.connection
        };
        Ok(cancel_here(ctx, &conn, call.pid, call.secret, Some(&call.from)).await)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn denied_cancels_are_recorded_a_few_a_second_and_the_rest_counted() {
        let mut d = Denied::default();
        let t0 = Instant::now();
        for _ in 0..DENIED_ON_RECORD_PER_SEC {
            assert_eq!(d.admit(t0), Some(0));
        }
        for _ in 0..5 {
            assert_eq!(d.admit(t0 + Duration::from_millis(900)), None);
        }
        // The next second: the first one on record says how many were not.
        assert_eq!(d.admit(t0 + Duration::from_millis(1000)), Some(5));
        assert_eq!(d.admit(t0 + Duration::from_millis(1001)), Some(0));
    }
}
