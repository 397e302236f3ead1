//! One real member in-process (openraft, redb, gRPC on loopback), driven through the same
//! client the gateway nodes and the CLI use: retention keeps the state and its snapshots
//! bounded under a steady flow of approvals, `ListApprovals` pages in a stable order, and the
//! member's HTTP endpoints report what happened.

use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use vigil_coordinator::approvals::Actor;
use vigil_coordinator::client::{Client, Credential};
use vigil_coordinator::server::Member;
use vigil_coordinator::service::{BoxFuture, OperatorAuth};
use vigil_proto::coordinator as pb;

mod common;

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
                ..Actor::default()
            })
        })
    }
}

async fn start(dir: &std::path::Path, retention: Duration) -> Member {
    common::member(dir, 1, TOKEN, Arc::new(NamedOperators), |cfg| {
        cfg.bootstrap = true;
        cfg.snapshot_after = 50;
        cfg.retention = retention;
        cfg.metrics_listen = Some("127.0.0.1:0".parse().unwrap());
    })
    .await
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
            ..Default::default()
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
                            ..Default::default()
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

/// Requests of megabytes (a statement shown at its largest, 2 MiB, and the same text as its
/// action) cannot blind the lists: a list carries each of them summarised (the action's first
/// KiB, no shown action) and a page stays within a client's default 4 MiB limit, while
/// `GetApproval` answers each whole, past that limit. Comments and requests too large to read
/// back are refused (a request larger than `MAX_REQUEST` before it is read).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t12_large_requests_are_listed_summarised_and_read_whole() {
    use prost::Message as _;
    use vigil_coordinator::service::{MAX_COMMENT, MAX_REQUEST, SUMMARY_ACTION};
    let dir = tempfile::tempdir().unwrap();
    let member = start(dir.path(), Duration::from_secs(3600)).await;
    let node = node(&member);
    // Each request: its action and shown text, 2 MiB and its id; a two-byte 'é' straddles
    // the summary's cut.
    let big = |id: &str| {
        let mut text = String::from("UPDATE t SET v = 1 /* ");
        text.push_str(&"x".repeat(SUMMARY_ACTION - 1 - text.len()));
        text.push('é');
        text.push_str(&"y".repeat(2 * 1024 * 1024 - text.len()));
        text.push_str(&format!(" */ WHERE id = '{id}'"));
        let mut r = request(id, &format!("h-{id}"), 600_000);
        r.action = text.clone();
        r.shown = Some(pb::ShownAction {
            protocol: Some(pb::shown_action::Protocol::Postgres(pb::StatementBinding {
                mode: "simple".into(),
                text,
                ..Default::default()
            })),
        });
        r
    };
    for id in ["big1", "big2", "big3"] {
        node.create_approval(big(id)).await.unwrap();
    }
    node.create_approval(request("small", "h-small", 600_000))
        .await
        .unwrap();
    let alice = operator(&member, "alice");
    let list = alice
        .list_approvals(pb::ListApprovalsRequest::default())
        .await
        .expect("the list answers");
    assert!(
        list.encoded_len() < 4 * 1024 * 1024,
        "{}",
        list.encoded_len()
    );
    assert_eq!(list.approvals.len(), 4);
    assert!(list.next_page_token.is_empty());
    for a in &list.approvals {
        if a.id == "small" {
            assert!(!a.summarized && a.action == "DELETE FROM t WHERE id = 'small'");
            continue;
        }
        assert!(a.summarized, "{}", a.id);
        assert!(a.shown.is_none());
        // Cut before the two-byte 'é', at a character boundary.
        assert_eq!(a.action.len(), SUMMARY_ACTION - 1);
        assert!(big(&a.id).action.starts_with(&a.action));
    }
    // Whole, one at a time: more than tonic's default 4 MiB.
    let whole = alice
        .get_approval(pb::ApprovalId { id: "big2".into() })
        .await
        .expect("a request is read whole");
    assert!(whole.encoded_len() > 4 * 1024 * 1024);
    assert!(!whole.summarized);
    assert_eq!(whole.action, big("big2").action);
    assert_eq!(whole.shown, big("big2").shown);

    let long = alice
        .decide_approval(pb::DecideApprovalRequest {
            id: "small".into(),
            approve: true,
            comment: "c".repeat(MAX_COMMENT + 1),
        })
        .await
        .unwrap_err();
    assert_eq!(long.code(), tonic::Code::InvalidArgument, "{long:?}");
    let mut huge = request("huge", "h-huge", 600_000);
    huge.action = "x".repeat(MAX_REQUEST);
    // Refused by the service's message limit, as its length is read.
    let refused = node.create_approval(huge).await.unwrap_err();
    assert_eq!(refused.code(), tonic::Code::OutOfRange, "{refused:?}");
    assert_eq!(held(&member).await, 4);
    member.shutdown().await;
}

/// Operators named by their token, `approver:SUBJECT@ISSUER` or
/// `approver:SUBJECT@ISSUER#PERSON`, whose member requires a person key.
struct PersonKeyed;

impl OperatorAuth for PersonKeyed {
    fn authenticate<'a>(&'a self, token: &'a str) -> BoxFuture<'a, Result<Actor, String>> {
        Box::pin(async move {
            let who = token.strip_prefix("approver:").ok_or("not an approver")?;
            let (identity, person) = match who.split_once('#') {
                Some((i, p)) => (i, Some(p.to_string())),
                None => (who, None),
            };
            let (subject, issuer) = identity.split_once('@').ok_or("SUBJECT@ISSUER")?;
            Ok(Actor {
                subject: subject.into(),
                groups: vec!["approvers".into()],
                issuer: issuer.into(),
                person,
            })
        })
    }

    fn person_key(&self) -> Option<&str> {
        Some("identity.claims.person = \"email\"")
    }
}

/// Through the gRPC contract: a person who asked under one identity cannot approve under
/// another that carries the same person key; an operator whose token carries no person key
/// cannot decide at all when the member requires one; the approval is then used only by the
/// requester's own identity (subject and issuer), not by the same subject of another issuer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t13_one_person_is_one_person_across_identity_providers() {
    let dir = tempfile::tempdir().unwrap();
    let member = common::member(dir.path(), 1, TOKEN, Arc::new(PersonKeyed), |cfg| {
        cfg.bootstrap = true
    })
    .await;
    let node = node(&member);
    let mut asked = request("r1", "h", 600_000);
    asked.requester = Some(pb::Actor {
        subject: "3f1c".into(),
        groups: vec!["approvers".into()],
        issuer: "https://oidc".into(),
        person: "alice@example.com".into(),
    });
    let created = node.create_approval(asked).await.unwrap();
    let requester = created.requester.unwrap();
    assert_eq!(
        (requester.issuer.as_str(), requester.person.as_str()),
        ("https://oidc", "alice@example.com")
    );
    let decide = |token: &str| {
        let by = Client::new(
            vec![member.addr.to_string()],
            Credential::Bearer(format!("approver:{token}")),
        )
        .unwrap();
        async move {
            by.decide_approval(pb::DecideApprovalRequest {
                id: "r1".into(),
                approve: true,
                comment: String::new(),
            })
            .await
        }
    };
    let refused = decide("alice@https://vigil/tokens#Alice@Example.com")
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::PermissionDenied);
    assert!(refused.message().contains("own request"), "{refused:?}");
    let refused = decide("bob@https://oidc").await.unwrap_err();
    assert_eq!(refused.code(), tonic::Code::PermissionDenied);
    assert!(refused.message().contains("names no person"), "{refused:?}");
    let approved = decide("bob@https://oidc#bob@example.com").await.unwrap();
    assert_eq!(approved.state, "approved");

    let consume = |issuer: &str| pb::ConsumeApprovalRequest {
        subject: "3f1c".into(),
        issuer: issuer.into(),
        key: created.key.clone(),
        attempt: format!("try-{issuer}"),
        request_id: String::new(),
    };
    let elsewhere = node
        .consume_approval(consume("https://vigil/tokens"))
        .await
        .unwrap_err();
    assert_eq!(elsewhere.code(), tonic::Code::FailedPrecondition);
    let used = node
        .consume_approval(consume("https://oidc"))
        .await
        .unwrap();
    assert_eq!(used.state, "consumed");
    member.shutdown().await;
}
