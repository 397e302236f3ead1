//! `coordinator-bench`: approval throughput and commit latency of a real three-member
//! coordinator cluster (separate `vigil-coordinator` processes, fsync'd redb stores), driven
//! over gRPC the way gateway nodes and approvers drive it. Run through loadtest/coordinator.sh.
//!
//! Phase 1 creates requests (what gateway nodes do when they hold a statement); phase 2
//! decides them (what approvers do: each call carries an OIDC token the coordinator verifies).
//! Each phase runs CONCURRENCY callers for DURATION seconds and reports calls per second and
//! p50/p99/max latency of acknowledged (committed) calls.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use vigil_chaos::cluster::Cluster;
use vigil_coordinator::client::Client;
use vigil_proto::coordinator as pb;

fn setting(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

struct Phase {
    calls: u64,
    errors: u64,
    seconds: f64,
    latencies_us: Vec<u64>,
}

impl Phase {
    fn report(&self, name: &str, goal_rate: Option<f64>) {
        let mut l = self.latencies_us.clone();
        l.sort_unstable();
        let pct = |p: f64| {
            l.get(((l.len() as f64 * p) as usize).min(l.len().saturating_sub(1)))
                .copied()
                .unwrap_or(0) as f64
                / 1000.0
        };
        let rate = self.calls as f64 / self.seconds;
        println!(
            "{name:<10} {:>8} ok {:>5} errors {:>9.0}/s   p50 {:>6.2} ms   p99 {:>6.2} ms   max {:>7.2} ms{}",
            self.calls,
            self.errors,
            rate,
            pct(0.50),
            pct(0.99),
            l.last().copied().unwrap_or(0) as f64 / 1000.0,
            match goal_rate {
                Some(g) => format!(
                    "   goal >= {g:.0}/s, p99 <= 10 ms: {}",
                    if rate >= g && pct(0.99) <= 10.0 { "met" } else { "NOT met" }
                ),
                None => String::new(),
            }
        );
    }
}

/// Runs `work(i)` from `concurrency` tasks until `duration` has passed (or `limit` calls).
async fn phase<F, Fut>(concurrency: u64, duration: Duration, limit: u64, work: F) -> Phase
where
    F: Fn(u64) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = bool> + Send,
{
    let work = Arc::new(work);
    let next = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..concurrency {
        let (work, next) = (work.clone(), next.clone());
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            let mut errors = 0;
            while start.elapsed() < duration {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= limit {
                    break;
                }
                let t = Instant::now();
                if work(i).await {
                    lat.push(t.elapsed().as_micros() as u64);
                } else {
                    errors += 1;
                }
            }
            (lat, errors)
        }));
    }
    let mut out = Phase {
        calls: 0,
        errors: 0,
        seconds: 0.0,
        latencies_us: Vec::new(),
    };
    for t in tasks {
        let (lat, errors) = t.await.expect("worker");
        out.calls += lat.len() as u64;
        out.errors += errors;
        out.latencies_us.extend(lat);
    }
    out.seconds = start.elapsed().as_secs_f64();
    out
}

fn request(i: u64) -> pb::CreateApprovalRequest {
    pb::CreateApprovalRequest {
        id: format!("bench-{i}"),
        requester: Some(pb::Actor {
            subject: "agent-ops".into(),
            groups: vec!["ops".into()],
        }),
        key: Some(pb::ActionKey {
            scope: Some(pb::Scope {
                protocol: "postgres".into(),
                target: "app".into(),
            }),
            hash: format!("{i:064x}"),
        }),
        action: format!("DELETE FROM orders WHERE id = {i}"),
        reason: "bench".into(),
        ttl_ms: 3_600_000,
        approver_group: "approvers".into(),
        approvals_required: 1,
        node: "bench".into(),
        rule: "writes".into(),
        shown: None,
    }
}

#[tokio::main]
async fn main() {
    let concurrency = setting("CONCURRENCY", 64);
    let duration = Duration::from_secs(setting("DURATION", 10));
    let members = setting("MEMBERS", 3);
    println!(
        "coordinator-bench: {members} members (fsync on), {concurrency} concurrent callers, {} s per phase",
        duration.as_secs()
    );
    // Snapshots as a production member takes them (every 5,000 entries, the default).
    let cluster = Cluster::start_with(members, 5_000).await;
    let leader = cluster.leader(&(1..=members).collect::<Vec<_>>()).await;
    println!("leader: member {leader}");
    let nodes: Arc<Client> = Arc::new(cluster.client());
    let created = {
        let nodes = nodes.clone();
        phase(concurrency, duration, u64::MAX, move |i| {
            let nodes = nodes.clone();
            async move { nodes.create_approval(request(i)).await.is_ok() }
        })
        .await
    };
    created.report("create", None);
    let alice = vigil_chaos::id_token("alice");
    let operator: Arc<Client> = Arc::new(cluster.operator(&alice));
    let decided = {
        let operator = operator.clone();
        phase(concurrency, duration, created.calls, move |i| {
            let operator = operator.clone();
            async move {
                operator
                    .decide_approval(pb::DecideApprovalRequest {
                        id: format!("bench-{i}"),
                        approve: i % 10 != 0,
                        comment: String::new(),
                    })
                    .await
                    .is_ok()
            }
        })
        .await
    };
    decided.report("decide", Some(5000.0));
    let status = nodes.status(pb::StatusRequest {}).await.expect("status");
    println!(
        "raft log: last index {}, applied {}, term {}",
        status.last_log_index, status.last_applied, status.term
    );
}
