//! One real member in-process (openraft, redb, gRPC on loopback), driven through the same
//! client the gateway nodes and the CLI use: retention keeps the state and its snapshots
//! bounded under a steady flow of approvals, `ListApprovals` pages in a stable order, and the
//! member's HTTP endpoints report what happened.

use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use vigil_coordinator::approvals::Actor;
use vigil_coordinator::client::{Client, Credential};
use vigil_coordinator::server::{Member, MemberConfig};
use vigil_coordinator::service::{BoxFuture, OperatorAuth};
use vigil_proto::coordinator as pb;

const TOKEN: &str = "member-test-cluster-token";

/// Operators named by their token (`approver:alice`): the OIDC verifier is the node's and is
/// tested there; here the decisions only have to be made.
struct NamedOperators;

impl OperatorAuth for NamedOperators {
    fn authenticate<'a>(&'a self, token: &'a str) -> BoxFuture<'a, Result<Actor, String>> {
        Box::pin(async move {
            let subject = token.strip_prefix("approver:").ok_or("not an approver")?;
            Ok(Actor {
                subject: subject.into(),
                groups: vec!["approvers".into()],
            })
        })
    }
}

async fn start(dir: &std::path::Path, retention: Duration) -> Member {
    let mut cfg = MemberConfig::new(
        1,
        "127.0.0.1:0".parse().unwrap(),
        dir.to_path_buf(),
        TOKEN.into(),
    );
    cfg.bootstrap = true;
    cfg.snapshot_after = 50;
    cfg.retention = retention;
    cfg.metrics_listen = Some("127.0.0.1:0".parse().unwrap());
    let member = Member::start(cfg, Some(Arc::new(NamedOperators)))
        .await
        .expect("member starts");
    member
        .wait_for_leader(Duration::from_secs(10))
        .await
        .unwrap();
    member
}

fn node(member: &Member) -> Client {
    Client::new(
        vec![member.addr.to_string()],
        Credential::Cluster(TOKEN.into()),
    )
    .unwrap()
}

fn operator(member: &Member, who: &str) -> Client {
    Client::new(
        vec![member.addr.to_string()],
        Credential::Bearer(format!("approver:{who}")),
    )
    .unwrap()
}

fn request(id: &str, hash: &str, ttl_ms: u64) -> pb::CreateApprovalRequest {
    pb::CreateApprovalRequest {
        id: id.into(),
        requester: Some(pb::Actor {
            subject: "agent".into(),
            groups: vec![],
        }),
        key: Some(pb::ActionKey {
            scope: Some(pb::Scope {
                protocol: "postgres".into(),
                target: "app".into(),
            }),
            hash: hash.into(),
        }),
        action: format!("DELETE FROM t WHERE id = '{id}'"),
        reason: String::new(),
        ttl_ms,
        approver_group: "approvers".into(),
        approvals_required: 1,
        node: "n1".into(),
        rule: "deletes".into(),
        shown: None,
    }
}

/// `GET path` on the member's HTTP listener: (status line, body).
async fn http_get(member: &Member, path: &str) -> (String, String) {
    let mut s = tokio::net::TcpStream::connect(member.metrics_addr.expect("metrics served"))
        .await
        .unwrap();
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: member\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).await.unwrap();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    (head.lines().next().unwrap_or("").to_string(), body.into())
}

/// The value of one sample line (`name{labels} value`) in a scrape; 0 when absent.
fn sample(scrape: &str, series: &str) -> f64 {
    scrape
        .lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or(0.0)
}

async fn held(member: &Member) -> usize {
    member.shared.sm.read(|s| s.requests.len())
}

async fn snapshot_bytes(member: &Member) -> usize {
    use openraft::storage::RaftStateMachine;
    let mut sm = member.shared.sm.clone();
    sm.get_current_snapshot()
        .await
        .unwrap()
        .map_or(0, |s| s.snapshot.get_ref().len())
}

/// A steady flow of approval requests (a third used, a third denied, a third left to expire)
/// with a 1 s retention: the requests held and the snapshot size level off instead of growing
/// with the total; once the flow stops, everything settled is forgotten and the purges are
/// counted in /metrics.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t10_retention_keeps_state_and_snapshots_bounded() {
    let dir = tempfile::tempdir().unwrap();
    let member = start(dir.path(), Duration::from_secs(1)).await;
    let (node, alice) = (node(&member), operator(&member, "alice"));
    let started = Instant::now();
    let mut created = 0u64;
    let mut samples: Vec<(Duration, usize, usize)> = Vec::new();
    let mut next_sample = Duration::from_millis(500);
    while started.elapsed() < Duration::from_secs(8) {
        for k in 0..3 {
            let id = format!("r{created}");
            let hash = format!("h{created}");
            node.create_approval(request(&id, &hash, 300))
                .await
                .unwrap();
            created += 1;
            match k {
                0 => {
                    alice
                        .decide_approval(pb::DecideApprovalRequest {
                            id: id.clone(),
                            approve: true,
                            comment: String::new(),
                        })
                        .await
                        .unwrap();
                    let mut key = request(&id, &hash, 300).key;
                    let used = node
                        .consume_approval(pb::ConsumeApprovalRequest {
                            subject: "agent".into(),
                            key: key.take(),
                            attempt: format!("a-{id}"),
                        })
                        .await
                        .unwrap();
                    assert_eq!(used.state, "consumed");
                }
                1 => {
                    alice
                        .decide_approval(pb::DecideApprovalRequest {
                            id,
                            approve: false,
                            comment: String::new(),
                        })
                        .await
                        .unwrap();
                }
                _ => {} // expires after 300 ms
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
        if started.elapsed() >= next_sample {
            samples.push((
                started.elapsed(),
                held(&member).await,
                snapshot_bytes(&member).await,
            ));
            next_sample += Duration::from_millis(500);
        }
    }
    let warm: Vec<_> = samples
        .iter()
        .filter(|(t, _, _)| *t >= Duration::from_secs(3))
        .collect();
    let first_half_max = |f: fn(&(Duration, usize, usize)) -> usize| {
        warm.iter()
            .filter(|s| s.0 < Duration::from_millis(5_500))
            .map(|s| f(s))
            .max()
            .unwrap()
    };
    let second_half_max = |f: fn(&(Duration, usize, usize)) -> usize| {
        warm.iter()
            .filter(|s| s.0 >= Duration::from_millis(5_500))
            .map(|s| f(s))
            .max()
            .unwrap()
    };
    eprintln!("created {created}; (time, held, snapshot bytes): {samples:?}");
    let (held_1, held_2) = (first_half_max(|s| s.1), second_half_max(|s| s.1));
    let (snap_1, snap_2) = (first_half_max(|s| s.2), second_half_max(|s| s.2));
    assert!(
        held_2 as u64 * 3 < created,
        "{held_2} of {created} requests still held"
    );
    assert!(
        held_2 <= held_1 * 3 / 2 + 20,
        "held requests grow: {held_1} then {held_2}"
    );
    assert!(
        snap_2 <= snap_1 * 3 / 2 + 4096,
        "snapshots grow: {snap_1} then {snap_2} bytes"
    );

    // The flow stops: within retention + a purge interval everything is gone, on disk too.
    let deadline = Instant::now() + Duration::from_secs(5);
    while held(&member).await > 0 {
        assert!(
            Instant::now() < deadline,
            "settled requests never forgotten"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    member
        .shared
        .raft
        .trigger()
        .snapshot()
        .await
        .expect("snapshot");
    let deadline = Instant::now() + Duration::from_secs(5);
    while snapshot_bytes(&member).await > 2048 {
        assert!(Instant::now() < deadline, "the snapshot still holds them");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let (status, scrape) = http_get(&member, "/metrics").await;
    assert!(status.contains(" 200 "), "{status}");
    assert_eq!(
        sample(&scrape, "vigil_coordinator_purged_total{kind=\"request\"}") as u64,
        created,
        "{scrape}"
    );
    assert_eq!(sample(&scrape, "vigil_coordinator_is_leader"), 1.0);
    assert_eq!(
        sample(&scrape, "vigil_coordinator_leader_changes_total"),
        1.0
    );
    assert!(sample(&scrape, "vigil_coordinator_commit_seconds_count") >= created as f64);
    assert!(sample(&scrape, "vigil_coordinator_snapshot_index") > 0.0);
    assert_eq!(
        sample(&scrape, "vigil_coordinator_commit_errors_total"),
        0.0
    );
    let (status, body) = http_get(&member, "/readyz").await;
    assert!(status.contains(" 200 "), "{status} {body}");
    let (status, _) = http_get(&member, "/healthz").await;
    assert!(status.contains(" 200 "), "{status}");
    member.shutdown().await;
}

/// Pages come newest first, without gaps or repeats; a request created between two pages
/// does not shift the pages after it; a bad page token is a clear error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t11_approvals_are_listed_a_page_at_a_time_in_a_stable_order() {
    let dir = tempfile::tempdir().unwrap();
    let member = start(dir.path(), Duration::from_secs(3600)).await;
    let node = node(&member);
    for i in 0..25 {
        node.create_approval(request(&format!("p{i:02}"), "h", 600_000))
            .await
            .unwrap();
    }
    let list = |limit, page_token: String| {
        let node = &node;
        async move {
            node.list_approvals(pb::ListApprovalsRequest {
                state: String::new(),
                limit,
                page_token,
            })
            .await
        }
    };
    let everything = list(0, String::new()).await.unwrap();
    assert_eq!(everything.approvals.len(), 25);
    assert!(everything.next_page_token.is_empty());
    let all_ids: Vec<String> = everything.approvals.iter().map(|a| a.id.clone()).collect();
    let mut paged = Vec::new();
    let mut token = String::new();
    let mut pages = 0;
    loop {
        let page = list(10, token).await.unwrap();
        pages += 1;
        paged.extend(page.approvals.iter().map(|a| a.id.clone()));
        if pages == 1 {
            // Newer than everything listed: must not appear in, or shift, the later pages.
            node.create_approval(request("p-new", "h", 600_000))
                .await
                .unwrap();
        }
        token = page.next_page_token;
        if token.is_empty() {
            break;
        }
    }
    assert_eq!(pages, 3);
    assert_eq!(paged, all_ids);
    let newest = list(1, String::new()).await.unwrap();
    assert_eq!(newest.approvals[0].id, "p-new");
    let bad = list(10, "nonsense".into()).await.unwrap_err();
    assert_eq!(bad.code(), tonic::Code::InvalidArgument, "{bad:?}");
    member.shutdown().await;
}
