//! Retention: settled approval requests (used, denied, expired) and ended grants are forgotten
//! once they are older than the configured retention, so that the state, its snapshots and the
//! time to install one on a new member stay bounded under a steady flow of approvals.
//!
//! The leader proposes a [`Command::Purge`] carrying its clock minus the retention; every
//! member applies it alike (apply reads no clock). Only the leader proposes, and only when its
//! state holds something to forget, so an idle cluster writes nothing. What a purged request
//! decided stays in the audit stream (`approval_requested` and `approval_decided` records);
//! the coordinator is not the archive.

use crate::approvals::{Applied, Command};
use crate::metrics::KindLabel;
use crate::service::{now_ms, Shared};
use openraft::ServerState;
use std::sync::Arc;
use std::time::Duration;

/// How often the leader looks for settled requests to forget: a quarter of the retention,
/// between 1 s and 1 min.
pub fn interval(retention: Duration) -> Duration {
    (retention / 4).clamp(Duration::from_secs(1), Duration::from_secs(60))
}

/// Runs until aborted: on the leader, proposes a purge whenever something is old enough.
pub fn start(shared: Arc<Shared>, retention: Duration) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(interval(retention));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            if shared.raft.metrics().borrow().state != ServerState::Leader {
                continue;
            }
            let cutoff = now_ms().saturating_sub(retention.as_millis() as u64);
            if !shared.sm.read(|s| s.purgeable(cutoff)) {
                continue;
            }
            match shared.proposer.propose(Command::Purge { cutoff }).await {
                Ok(Applied::Purged { requests, grants }) => {
                    let purged = &shared.metrics.purged;
                    purged
                        .get_or_create(&KindLabel { kind: "request" })
                        .inc_by(requests);
                    purged
                        .get_or_create(&KindLabel { kind: "grant" })
                        .inc_by(grants);
                    tracing::debug!(requests, grants, cutoff, "retention: forgot settled");
                }
                Ok(other) => tracing::error!(?other, "retention: unexpected reply to a purge"),
                // Lost leadership or quorum: the next leader purges.
                Err(e) => tracing::warn!(error = %e.message(), "retention: purge not committed"),
            }
        }
    })
}
