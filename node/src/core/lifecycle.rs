//! A node's life after it started: serving; draining (SIGTERM: `/readyz` says not ready so the
//! load balancer sends new clients elsewhere, the listeners stop accepting, open sessions may
//! finish); ending (the drain deadline passed: every session still open is ended with a clear
//! error and its `session_end` record). Then the audit stream ends and the spool is shipped.
//!
//! Every protocol server counts its sessions with [`Sessions`] and ends a session when
//! [`Lifecycle::ended`] resolves, each in its protocol's form (PostgreSQL `57P01`, an SSH
//! disconnect, the end of a Kubernetes stream).

use std::sync::{Arc, OnceLock};
use std::time::Duration;
use tokio::sync::watch;
use tokio::time::Instant;

/// How long sessions ended at the drain deadline get to write their `session_end` records and
/// say goodbye before the node stops waiting for them.
const ENDING_GRACE: Duration = Duration::from_secs(5);

/// What a client is told when the node ends its session at the drain deadline.
pub const SHUTTING_DOWN: &str =
    "terminating connection: this Vigil gateway node is shutting down; reconnect to continue";

pub struct Lifecycle {
    drain_timeout: Duration,
    /// When draining began plus `drain_timeout`.
    deadline: OnceLock<Instant>,
    draining: watch::Sender<bool>,
    ending: watch::Sender<bool>,
}

impl Lifecycle {
    pub fn new(drain_timeout: Duration) -> Self {
        Self {
            drain_timeout,
            deadline: OnceLock::new(),
            draining: watch::channel(false).0,
            ending: watch::channel(false).0,
        }
    }

    /// Starts draining (once; later calls keep the first deadline).
    pub fn begin_drain(&self) {
        self.deadline
            .get_or_init(|| Instant::now() + self.drain_timeout);
        self.draining.send_replace(true);
    }

    pub fn is_draining(&self) -> bool {
        *self.draining.borrow()
    }

    /// Resolves when draining begins: a connection that can carry several requests (HTTP)
    /// finishes the one in flight and closes.
    pub async fn draining(&self) {
        let mut rx = self.draining.subscribe();
        let _ = rx.wait_for(|draining| *draining).await;
    }

    /// Ends every open session now (the drain deadline passed, or the operator asked twice).
    pub fn end_sessions(&self) {
        self.begin_drain();
        self.ending.send_replace(true);
    }

    /// Whether open sessions must end now.
    pub fn is_ending(&self) -> bool {
        *self.ending.borrow()
    }

    /// Resolves when open sessions must end.
    pub async fn ended(&self) {
        let mut rx = self.ending.subscribe();
        let _ = rx.wait_for(|ending| *ending).await;
    }

    /// The drain deadline; far away while the node is not draining.
    fn deadline(&self) -> Instant {
        self.deadline
            .get()
            .copied()
            .unwrap_or_else(|| Instant::now() + Duration::from_secs(86_400 * 365))
    }
}

/// Resolves at `deadline`; never without one (a session whose token does not end it).
pub async fn until(deadline: Option<Instant>) {
    match deadline {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// The sessions one listener serves: each holds a [`SessionGuard`] while it runs.
#[derive(Clone)]
pub struct Sessions(Arc<watch::Sender<usize>>);

impl Default for Sessions {
    fn default() -> Self {
        Self(Arc::new(watch::channel(0).0))
    }
}

/// A session being served; counted until dropped.
pub struct SessionGuard(Arc<watch::Sender<usize>>);

/// How long a session's end record waits, after its connection closed, for what of the
/// session still runs (a held request's decision, a closing channel or stream): then it is
/// written all the same, saying so, and the session no longer holds up the node's drain.
pub const END_GRACE: Duration = Duration::from_secs(10);

/// The connection of a session has closed and lets go of `held`, whose drop writes the
/// session's end; what of the session still runs holds it too. If something still does
/// [`END_GRACE`] later, `force` writes the end then.
pub fn end_after_grace<T: Send + Sync + 'static>(
    held: Arc<T>,
    force: impl FnOnce(&T) + Send + 'static,
) {
    let late = Arc::downgrade(&held);
    drop(held);
    if late.strong_count() == 0 {
        return;
    }
    if let Ok(runtime) = tokio::runtime::Handle::try_current() {
        runtime.spawn(async move {
            tokio::time::sleep(END_GRACE).await;
            if let Some(held) = late.upgrade() {
                force(&held);
            }
        });
    }
}

impl Drop for SessionGuard {
    fn drop(&mut self) {
        self.0.send_modify(|n| *n -= 1);
    }
}

impl Sessions {
    pub fn enter(&self) -> SessionGuard {
        self.0.send_modify(|n| *n += 1);
        SessionGuard(self.0.clone())
    }

    /// After the listener stopped accepting: waits for the open sessions to finish until the
    /// drain deadline, then ends them ([`Lifecycle::end_sessions`]) and waits a short grace for
    /// their records.
    pub async fn drain(&self, lifecycle: &Lifecycle) {
        let mut count = self.0.subscribe();
        let finished = tokio::time::timeout_at(lifecycle.deadline(), count.wait_for(|n| *n == 0));
        if finished.await.is_ok() {
            return;
        }
        let open = *count.borrow();
        tracing::warn!(
            sessions = open,
            "drain deadline reached: ending the open sessions"
        );
        lifecycle.end_sessions();
        let ended = tokio::time::timeout(ENDING_GRACE, count.wait_for(|n| *n == 0))
            .await
            .is_ok();
        if !ended {
            tracing::warn!(
                sessions = *count.borrow(),
                "sessions still open after they were told to end"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn sessions_that_finish_in_time_are_not_ended() {
        let lifecycle = Lifecycle::new(Duration::from_secs(60));
        let sessions = Sessions::default();
        let guard = sessions.enter();
        lifecycle.begin_drain();
        assert!(lifecycle.is_draining());
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(50)).await;
            drop(guard);
        });
        let drained = tokio::time::timeout(Duration::from_secs(30), sessions.drain(&lifecycle));
        assert!(drained.await.is_ok(), "drain waits for the deadline");
        assert!(
            !*lifecycle.ending.borrow(),
            "sessions that finished were ended"
        );
    }

    #[tokio::test]
    async fn sessions_still_open_at_the_deadline_are_ended() {
        let lifecycle = Arc::new(Lifecycle::new(Duration::from_millis(300)));
        let sessions = Sessions::default();
        let guard = sessions.enter();
        let session = {
            let lifecycle = lifecycle.clone();
            tokio::spawn(async move {
                lifecycle.ended().await;
                drop(guard);
            })
        };
        let started = Instant::now();
        lifecycle.begin_drain();
        let deadline = lifecycle.deadline();
        // A second SIGTERM does not move the deadline.
        lifecycle.begin_drain();
        assert_eq!(lifecycle.deadline(), deadline);
        sessions.drain(&lifecycle).await;
        session.await.unwrap();
        assert!(started.elapsed() >= Duration::from_millis(300));
        assert_eq!(*sessions.0.borrow(), 0);
    }

    #[tokio::test]
    async fn a_session_that_ignores_the_end_does_not_hold_the_node() {
        let lifecycle = Lifecycle::new(Duration::from_millis(100));
        let sessions = Sessions::default();
        let _stuck = sessions.enter();
        lifecycle.begin_drain();
        let drained = tokio::time::timeout(Duration::from_secs(60), sessions.drain(&lifecycle));
        assert!(drained.await.is_ok());
        assert!(*lifecycle.ending.borrow());
    }
}
