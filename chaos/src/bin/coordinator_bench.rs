//! `coordinator-bench`: approval throughput and commit latency of a real three-member
//! coordinator cluster (separate `vigil-coordinator` processes, fsync'd redb stores), driven
//! over gRPC the way gateway nodes and approvers drive it. Run through loadtest/coordinator.sh.
//!
//! Phase 1 creates requests (what gateway nodes do when they hold a statement); phase 2
//! decides them (what approvers do: each call carries an OIDC token the coordinator verifies).
//! Each phase runs CONCURRENCY callers for DURATION seconds and reports calls per second and
//! p50/p99/max latency of acknowledged (committed) calls.
//!
//! Two runs of both phases: first closed-loop (each caller calls again as soon as its call
//! returns: the cluster's capacity, and its latency at saturation, where a closed loop's
//! latency is CONCURRENCY over the rate whatever the cluster does), then paced at RATE calls
//! per second in all (the latency at that load). A paced call is due at a fixed time (call
//! `i` at `i / RATE` seconds into the phase) and its latency is counted from that time, not
//! from when a caller got to it, so a stall counts for every call it delayed (no coordinated
//! omission). `RATE=0` skips the paced run.

use std::collections::BTreeMap;
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
    /// Each acknowledged call: (when it was due or made, µs into the phase; its latency, µs).
    calls_at: Vec<(u64, u64)>,
    started_at: time::OffsetDateTime,
}

impl Phase {
    /// Prints the phase; with `goal`, whether it meets it (see [`Goal`]).
    fn report(&self, name: &str, goal: Option<Goal>) {
        let mut l: Vec<u64> = self.calls_at.iter().map(|&(_, latency)| latency).collect();
        l.sort_unstable();
        let pct = |p: f64| {
            l.get(((l.len() as f64 * p) as usize).min(l.len().saturating_sub(1)))
                .copied()
                .unwrap_or(0) as f64
                / 1000.0
        };
        self.report_slow_windows(name);
        let rate = self.calls as f64 / self.seconds;
        let verdict = |met: bool| if met { "met" } else { "NOT met" };
        println!(
            "{name:<15} {:>8} ok {:>5} errors {:>9.0}/s   p50 {:>6.2} ms   p99 {:>6.2} ms   max {:>7.2} ms{}",
            self.calls,
            self.errors,
            rate,
            pct(0.50),
            pct(0.99),
            l.last().copied().unwrap_or(0) as f64 / 1000.0,
            match goal {
                None => String::new(),
                Some(Goal::Capacity) => format!(
                    "   goal >= {GOAL_RATE}/s: {}",
                    verdict(rate >= GOAL_RATE as f64)
                ),
                // Paced below the goal's rate, or falling behind the pace, proves nothing.
                Some(Goal::LatencyAt(paced)) => format!(
                    "   goal p99 <= 10 ms at >= {GOAL_RATE}/s: {}",
                    verdict(
                        paced >= GOAL_RATE
                            && rate >= 0.98 * paced as f64
                            && self.errors == 0
                            && pct(0.99) <= 10.0
                    )
                ),
            }
        );
    }

    /// With `SLOW_MS` set: the 100 ms windows (UTC, to match the members' logs) in which a call
    /// due then took longer than that, with their calls and worst latency.
    fn report_slow_windows(&self, name: &str) {
        let Some(slow_ms) = std::env::var("SLOW_MS")
            .ok()
            .and_then(|v| v.parse::<u64>().ok())
        else {
            return;
        };
        let mut windows: BTreeMap<u64, (u64, u64)> = BTreeMap::new();
        for &(at, latency) in &self.calls_at {
            let w = windows.entry(at / 100_000).or_default();
            w.0 += 1;
            w.1 = w.1.max(latency);
        }
        for (w, (calls, worst)) in windows {
            if worst > slow_ms * 1000 {
                let at = self.started_at + Duration::from_millis(w * 100);
                println!(
                    "  {name}: slow window at {:02}:{:02}:{:02}.{:03} UTC: {calls} calls, worst {:.1} ms",
                    at.hour(),
                    at.minute(),
                    at.second(),
                    at.millisecond(),
                    worst as f64 / 1000.0
                );
            }
        }
    }
}

/// The goal: at least this many decisions per second, with p99 <= 10 ms.
const GOAL_RATE: u64 = 5_000;

/// What a phase is checked against.
#[derive(Clone, Copy)]
enum Goal {
    /// Closed loop: the rate the cluster reaches.
    Capacity,
    /// Paced at this rate: the p99 there.
    LatencyAt(u64),
}

/// Runs `work(i)` for `i` in `first..first + limit` from `concurrency` tasks until `duration`
/// has passed: as fast as they can with `rate` 0, else call `i` due at `(i - first) / rate`
/// seconds (latency counted from then).
async fn phase<F, Fut>(
    concurrency: u64,
    duration: Duration,
    rate: u64,
    (first, limit): (u64, u64),
    work: F,
) -> Phase
where
    F: Fn(u64) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = bool> + Send,
{
    let work = Arc::new(work);
    let next = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let started_at = time::OffsetDateTime::now_utc();
    let mut tasks = Vec::new();
    for _ in 0..concurrency {
        let (work, next) = (work.clone(), next.clone());
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            let mut errors = 0;
            while start.elapsed() < duration {
                let n = next.fetch_add(1, Ordering::Relaxed);
                if n >= limit {
                    break;
                }
                let t = match rate {
                    0 => Instant::now(),
                    r => {
                        let due = start + Duration::from_nanos(n * 1_000_000_000 / r);
                        if due > start + duration {
                            break;
                        }
                        tokio::time::sleep_until(due.into()).await;
                        due
                    }
                };
                let i = first + n;
                if work(i).await {
                    lat.push((
                        (t - start).as_micros() as u64,
                        t.elapsed().as_micros() as u64,
                    ));
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
        calls_at: Vec::new(),
        started_at,
    };
    for t in tasks {
        let (lat, errors) = t.await.expect("worker");
        out.calls += lat.len() as u64;
        out.errors += errors;
        out.calls_at.extend(lat);
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
            ..Default::default()
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

/// Creates then decides requests `first..`, with `rate` as in [`phase`]; returns how many
/// ids the create phase used.
async fn run(
    cluster: &Cluster,
    concurrency: u64,
    duration: Duration,
    rate: u64,
    first: u64,
) -> u64 {
    let (create, decide) = match rate {
        0 => ("create".to_string(), "decide".to_string()),
        r => (format!("create @{r}/s"), format!("decide @{r}/s")),
    };
    let nodes: Arc<Client> = Arc::new(cluster.client());
    let created = phase(concurrency, duration, rate, (first, u64::MAX), move |i| {
        let nodes = nodes.clone();
        async move { nodes.create_approval(request(i)).await.is_ok() }
    })
    .await;
    created.report(&create, None);
    let used = created.calls + created.errors;
    let operator: Arc<Client> = Arc::new(cluster.operator(&vigil_chaos::id_token("alice")));
    let decided = phase(concurrency, duration, rate, (first, used), move |i| {
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
    .await;
    let goal = match rate {
        0 => Goal::Capacity,
        r => Goal::LatencyAt(r),
    };
    decided.report(&decide, Some(goal));
    used
}

#[tokio::main]
async fn main() {
    let concurrency = setting("CONCURRENCY", 64);
    let duration = Duration::from_secs(setting("DURATION", 10));
    let members = setting("MEMBERS", 3);
    let rate = setting("RATE", GOAL_RATE);
    // Snapshots as a production member takes them (every 5,000 entries, the default).
    let snapshot_after = setting("SNAPSHOT_AFTER", 5_000);
    println!(
        "coordinator-bench: {members} members (fsync on, a snapshot every {snapshot_after} entries), {concurrency} concurrent callers, {} s per phase; closed loop, then paced at {rate}/s",
        duration.as_secs()
    );
    let cluster = Cluster::start_with(members, snapshot_after).await;
    let leader = cluster.leader(&(1..=members).collect::<Vec<_>>()).await;
    println!("leader: member {leader}");
    let used = run(&cluster, concurrency, duration, 0, 0).await;
    if rate > 0 {
        run(&cluster, concurrency, duration, rate, used).await;
    }
    let status = cluster
        .client()
        .status(pb::StatusRequest {})
        .await
        .expect("status");
    println!(
        "raft log: last index {}, applied {}, term {}",
        status.last_log_index, status.last_applied, status.term
    );
    // What each snapshot cost, from the members' logs (logged at info by the store).
    for m in &cluster.members {
        let log = std::fs::read_to_string(m.log()).unwrap_or_default();
        for line in log.lines().filter(|l| l.contains("snapshot taken")) {
            let when = line.split_whitespace().next().unwrap_or_default();
            let fields = line.rsplit_once("snapshot taken").map_or(line, |(_, f)| f);
            println!("member {} snapshot at {when}:{fields}", m.id);
        }
    }
}
