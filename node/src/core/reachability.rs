//! Whether this node reaches the coordinator: a probe every [`PROBE_EVERY`] (the cluster's
//! `Status` call, through the client statements use), shown by `/readyz` as a component of its
//! own and by the `vigil_coordinator_reachable` gauge.
//!
//! It does not fail readiness. Without the coordinator only what needs it is refused (a
//! statement held for approval, a grant check), fail closed, while every other statement still
//! runs and is recorded; and every node loses the coordinator at once when it goes, so failing
//! readiness would take the whole gateway out of the balancer for the sake of the few
//! statements that cannot run anyway. The alert `VigilCoordinatorUnreachable` pages instead.

use super::approvals::Approvals;
use super::metrics::Metrics;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::watch;
use tokio::time::Instant;
use vigil_proto::coordinator as pb;

/// How often the node asks.
pub const PROBE_EVERY: Duration = Duration::from_secs(5);

/// How long one probe may take.
const PROBE_TIMEOUT: Duration = Duration::from_secs(3);

enum Seen {
    NotYet,
    Reachable { leader: u64 },
    Unreachable { since: Instant, why: String },
}

pub struct Reachability {
    seen: Mutex<Seen>,
    metrics: Arc<Metrics>,
}

impl Reachability {
    pub fn new(metrics: Arc<Metrics>) -> Arc<Self> {
        Arc::new(Self {
            seen: Mutex::new(Seen::NotYet),
            metrics,
        })
    }

    /// Probes until `stop`.
    pub async fn run(self: Arc<Self>, approvals: Arc<Approvals>, mut stop: watch::Receiver<bool>) {
        loop {
            let probe = tokio::time::timeout(
                PROBE_TIMEOUT,
                approvals.client().status(pb::StatusRequest {}),
            );
            let answer = match probe.await {
                Ok(Ok(status)) if status.leader != 0 => Ok(status.leader),
                Ok(Ok(_)) => Err("the coordinator has no leader".to_string()),
                Ok(Err(e)) => Err(e.message().to_string()),
                Err(_) => Err(format!("no answer within {PROBE_TIMEOUT:?}")),
            };
            self.note(answer);
            tokio::select! {
                _ = stop.wait_for(|s| *s) => return,
                () = tokio::time::sleep(PROBE_EVERY) => {}
            }
        }
    }

    fn note(&self, answer: Result<u64, String>) {
        let mut seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
        self.metrics
            .coordinator_reachable
            .set(i64::from(answer.is_ok()));
        *seen = match (answer, &*seen) {
            (Ok(leader), _) => Seen::Reachable { leader },
            (Err(why), Seen::Unreachable { since, .. }) => Seen::Unreachable { since: *since, why },
            (Err(why), _) => {
                tracing::warn!(error = %why, "the coordinator cannot be reached: statements that need approval are refused");
                Seen::Unreachable {
                    since: Instant::now(),
                    why,
                }
            }
        };
    }

    /// The `/readyz` line of the component.
    pub fn describe(&self) -> String {
        match &*self.seen.lock().unwrap_or_else(|e| e.into_inner()) {
            Seen::NotYet => "coordinator: not probed yet".into(),
            Seen::Reachable { leader } => format!("coordinator: reachable (leader {leader})"),
            Seen::Unreachable { since, why } => format!(
                "coordinator: unreachable for {} s ({why}); statements that need approval are refused",
                since.elapsed().as_secs()
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_component_says_since_when_and_why() {
        let metrics = Arc::new(Metrics::default());
        let r = Reachability::new(metrics.clone());
        assert_eq!(r.describe(), "coordinator: not probed yet");
        r.note(Ok(2));
        assert_eq!(r.describe(), "coordinator: reachable (leader 2)");
        assert_eq!(metrics.coordinator_reachable.get(), 1);
        r.note(Err("connection refused".into()));
        r.note(Err("no answer within 3s".into()));
        let line = r.describe();
        assert!(
            line.starts_with("coordinator: unreachable for 0 s (no answer within 3s)"),
            "{line}"
        );
        assert_eq!(metrics.coordinator_reachable.get(), 0);
        r.note(Ok(3));
        assert_eq!(r.describe(), "coordinator: reachable (leader 3)");
    }
}
