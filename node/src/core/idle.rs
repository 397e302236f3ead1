//! Idle timeouts: a session in which nothing happens for a while is ended by the gateway, like
//! one whose token expired.
//!
//! - SSH (`ssh.idle_timeout_secs`): "something happens" is a byte on any channel in either
//!   direction (exec, shell, subsystem, forwarded connections; window changes and signals count
//!   as input), or a channel the client opens. Every channel task touches the session's
//!   [`Activity`] as it passes a message on; the session's ender waits in
//!   [`Activity::idle_for`]. A session waiting for the gateway itself (a request held for
//!   approval) is not idle: [`Activity::waiting`].
//! - Kubernetes (`kubernetes.idle_timeout_secs`): a byte either way on an exec, attach or
//!   port-forward stream.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;
use tokio::time::Instant;

/// When a session last saw activity, as milliseconds since the session began: a touch is one
/// clock read and one relaxed store, cheap enough for every chunk a channel passes on.
pub struct Activity {
    since: Instant,
    last_ms: AtomicU64,
    /// Requests the gateway holds (approvals being waited for).
    waiting: AtomicUsize,
}

impl Default for Activity {
    fn default() -> Self {
        Self {
            since: Instant::now(),
            last_ms: AtomicU64::new(0),
            waiting: AtomicUsize::new(0),
        }
    }
}

/// A wait on the gateway's side: the session is not idle while it lasts, and its end counts as
/// activity.
pub struct Waiting<'a>(&'a Activity);

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.waiting.fetch_sub(1, Ordering::Relaxed);
        self.0.touch();
    }
}

impl Activity {
    /// Something happened now.
    pub fn touch(&self) {
        let now = self.since.elapsed().as_millis() as u64;
        self.last_ms.fetch_max(now, Ordering::Relaxed);
    }

    /// The session waits for the gateway until the guard is dropped.
    pub fn waiting(&self) -> Waiting<'_> {
        self.waiting.fetch_add(1, Ordering::Relaxed);
        Waiting(self)
    }

    /// Returns once `timeout` has passed since the last activity with none after it and
    /// nothing waited for; never for a zero `timeout` (no idle timeout).
    pub async fn idle_for(&self, timeout: Duration) {
        if timeout.is_zero() {
            return std::future::pending().await;
        }
        loop {
            let last = self.last_ms.load(Ordering::Relaxed);
            tokio::time::sleep_until(self.since + Duration::from_millis(last) + timeout).await;
            if self.waiting.load(Ordering::Relaxed) > 0 {
                self.touch();
            } else if self.last_ms.load(Ordering::Relaxed) == last {
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn activity_puts_the_end_off_and_silence_brings_it() {
        let timeout = Duration::from_millis(600);
        let activity = Activity::default();
        let started = Instant::now();
        // Touched every 100 ms for 1.5 s: never idle for 600 ms.
        let busy = async {
            for _ in 0..15 {
                tokio::time::sleep(Duration::from_millis(100)).await;
                activity.touch();
            }
        };
        tokio::select! {
            () = activity.idle_for(timeout) => panic!("idle while busy, after {:?}", started.elapsed()),
            () = busy => {}
        }
        // Then silence: idle 600 ms after the last touch, not earlier.
        let quiet = Instant::now();
        activity.idle_for(timeout).await;
        assert!(quiet.elapsed() >= timeout - Duration::from_millis(100));
        assert!(started.elapsed() >= Duration::from_millis(2000));
    }

    #[tokio::test]
    async fn a_wait_on_the_gateway_is_not_idleness() {
        let timeout = Duration::from_millis(300);
        let activity = Activity::default();
        let waiting = activity.waiting();
        let held = tokio::time::timeout(Duration::from_millis(1000), activity.idle_for(timeout));
        assert!(held.await.is_err(), "idle while a request was held");
        drop(waiting);
        let released = Instant::now();
        activity.idle_for(timeout).await;
        assert!(released.elapsed() >= timeout - Duration::from_millis(50));
    }

    #[tokio::test]
    async fn a_zero_timeout_never_ends_a_session() {
        let activity = Activity::default();
        let never = activity.idle_for(Duration::ZERO);
        let waited = tokio::time::timeout(Duration::from_millis(200), never).await;
        assert!(waited.is_err());
    }
}
