//! t8x: the coordinator. Three real `vigil-coordinator` processes (openraft, redb, gRPC) and
//! real gateway nodes; faults are SIGKILL and SIGSTOP; judged by invariants: every acknowledged
//! decision survives, nothing is both approved and denied, a one-time approval is used once,
//! a paused old leader never authorises with stale state.

use std::collections::BTreeMap;
use std::time::Duration;
use tonic::Code;
use vigil_chaos::cluster::Cluster;
use vigil_chaos::*;
use vigil_proto::coordinator as pb;
use vigil_proto::record::Kind;

fn new_request(id: &str, hash: &str) -> pb::CreateApprovalRequest {
    pb::CreateApprovalRequest {
        id: id.into(),
        requester: Some(pb::Actor {
            subject: "agent-ops".into(),
            groups: vec!["ops".into()],
            ..Default::default()
        }),
        key: Some(pb::ActionKey {
            scope: Some(pg_scope("app")),
            hash: hash.into(),
        }),
        action: format!("DELETE FROM customers WHERE id = {id}"),
        reason: "cleanup".into(),
        ttl_ms: 600_000,
        approver_group: "approvers".into(),
        approvals_required: 1,
        node: "test".into(),
        rule: "writes".into(),
        shown: None,
    }
}

fn pg_scope(target: &str) -> pb::Scope {
    pb::Scope {
        protocol: "postgres".into(),
        target: target.into(),
    }
}

fn decide(id: &str, approve: bool) -> pb::DecideApprovalRequest {
    pb::DecideApprovalRequest {
        id: id.into(),
        approve,
        comment: String::new(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t80_a_follower_names_the_leader_and_clients_follow_it() {
    let cluster = Cluster::start(3).await;
    let leader = cluster.leader(&[1, 2, 3]).await;
    let follower = [1, 2, 3].into_iter().find(|&i| i != leader).unwrap();
    // Straight to a follower, without retries: UNAVAILABLE with the leader's address.
    let direct = cluster
        .client_for(&[follower])
        .retry_for(Duration::from_millis(0));
    let err = direct
        .create_approval(new_request("r-follow", "h"))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    assert_eq!(
        err.metadata()
            .get(vigil_coordinator::service::LEADER_HEADER)
            .and_then(|v| v.to_str().ok()),
        Some(cluster.member(leader).addr.as_str())
    );
    // A client that knows only the follower follows the hint and succeeds.
    let created = cluster
        .client_for(&[follower])
        .create_approval(new_request("r-follow", "h"))
        .await
        .expect("the client follows the leader");
    assert_eq!(created.state, "pending");
    let status = cluster.client().status(pb::StatusRequest {}).await.unwrap();
    assert_eq!(status.voters.len(), 3, "{status:?}");

    // The CLI sees the same cluster.
    let (code, out) = vigil(&[
        "cluster",
        "status",
        "--coordinator",
        &cluster.endpoints().join(","),
        "--cluster-token-env",
        "VIGIL_T80_TOKEN",
    ]);
    // (The variable is not set: the CLI says so and fails.)
    assert_eq!(code, 2, "{out}");
    assert!(out.contains("VIGIL_T80_TOKEN is not set"), "{out}");
    let token_file = cluster.dir.path().join("cluster-token");
    let out = std::process::Command::new(bin("vigil"))
        .args([
            "cluster",
            "status",
            "--cluster-token-env",
            "VIGIL_T80_TOKEN",
        ])
        .arg("--coordinator")
        .arg(cluster.endpoints().join(","))
        .env(
            "VIGIL_T80_TOKEN",
            std::fs::read_to_string(token_file).unwrap().trim(),
        )
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert!(text.contains(&format!("leader      {leader} ")), "{text}");
    // Membership changes go through the leader too: remove a follower, and the rest go on.
    let removed = cluster
        .client_for(&[follower])
        .remove_member(pb::MemberId { id: follower })
        .await
        .expect("remove a member");
    assert_eq!(removed.voters.len(), 2, "{removed:?}");
    assert!(removed.voters.iter().all(|m| m.id != follower));
    let rest: Vec<u64> = [1, 2, 3].into_iter().filter(|&i| i != follower).collect();
    cluster
        .client_for(&rest)
        .create_approval(new_request("r-after-remove", "h2"))
        .await
        .expect("two members still commit");
}

/// Decisions keep flowing while the leader is killed (SIGKILL) and restarted, cycle after
/// cycle. Every decision the cluster acknowledged is there at the end, as acknowledged, and no
/// request has both an approval and a denial.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t81_acknowledged_decisions_survive_leader_kills() {
    let mut cluster = Cluster::start(3).await;
    let alice = id_token("alice");
    let nodes = cluster.client();
    let operator = cluster.operator(&alice);
    let mut acked: BTreeMap<String, bool> = BTreeMap::new();
    let mut n = 0u32;
    for cycle in 0..5 {
        // A burst of requests and decisions…
        let burst = async {
            let mut done = Vec::new();
            for _ in 0..15 {
                n += 1;
                let id = format!("r{n}");
                if nodes
                    .create_approval(new_request(&id, &format!("h{n}")))
                    .await
                    .is_err()
                {
                    continue;
                }
                let approve = n % 3 != 0;
                match operator.decide_approval(decide(&id, approve)).await {
                    Ok(a) => {
                        assert_eq!(a.state, if approve { "approved" } else { "denied" });
                        done.push((id, approve));
                    }
                    // Unknown outcome (the leader died mid-commit) or a repeat of a vote that
                    // did commit: not acknowledged, judged below only for consistency.
                    Err(e) => assert!(
                        matches!(
                            e.code(),
                            Code::Unavailable | Code::DeadlineExceeded | Code::FailedPrecondition
                        ),
                        "{e:?}"
                    ),
                }
            }
            done
        };
        // …while the leader is killed partway through.
        let leader = cluster.leader(&[1, 2, 3]).await;
        let killer = async {
            tokio::time::sleep(Duration::from_millis(100 + 60 * cycle)).await;
            cluster.kill(leader);
        };
        let (done, ()) = tokio::join!(burst, killer);
        acked.extend(done);
        let rest: Vec<u64> = [1, 2, 3].into_iter().filter(|&i| i != leader).collect();
        cluster.leader(&rest).await;
        cluster.spawn(leader);
        cluster.wait_up(leader).await;
    }
    assert!(
        acked.len() >= 30,
        "only {} decisions acknowledged",
        acked.len()
    );
    let all = operator
        .list_approvals(pb::ListApprovalsRequest::default())
        .await
        .unwrap();
    let by_id: BTreeMap<_, _> = all.approvals.iter().map(|a| (a.id.clone(), a)).collect();
    for (id, approve) in &acked {
        let a = by_id
            .get(id)
            .unwrap_or_else(|| panic!("acknowledged {id} lost"));
        assert_eq!(
            a.state,
            if *approve { "approved" } else { "denied" },
            "{id}"
        );
    }
    for a in &all.approvals {
        let yes = a.votes.iter().any(|v| v.approve);
        let no = a.votes.iter().any(|v| !v.approve);
        assert!(!(yes && no), "{} has both an approval and a denial", a.id);
        match a.state.as_str() {
            "approved" => assert!(yes && !no),
            "denied" => assert!(no && !yes),
            "pending" => assert!(a.votes.is_empty()),
            other => panic!("unexpected state {other}"),
        }
    }
    // Every member, the restarted ones included, catches up with the leader's log.
    let applied = nodes
        .status(pb::StatusRequest {})
        .await
        .unwrap()
        .last_applied;
    for id in 1..=3 {
        let one = cluster
            .client_for(&[id])
            .retry_for(Duration::from_millis(0));
        eventually_async(&format!("member {id} catches up"), || async {
            one.status(pb::StatusRequest {})
                .await
                .is_ok_and(|s| s.last_applied >= applied)
        })
        .await;
    }
}

async fn eventually_async<F, Fut>(what: &str, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    for _ in 0..200 {
        if f().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("timed out: {what}");
}

/// A paused (SIGSTOP) leader is replaced; after it resumes it must not authorise from its
/// stale state: a grant revoked meanwhile is never reported active by it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t83_a_paused_old_leader_serves_no_stale_authorisation() {
    let cluster = Cluster::start(3).await;
    let nodes = cluster.client();
    let now = vigil_coordinator::service::now_ms();
    let grant = nodes
        .create_grant(pb::CreateGrantRequest {
            subject: "agent-ops".into(),
            issuer: env().get("VIGIL_OIDC_ISSUER").into(),
            scope: Some(pg_scope("app")),
            access_class: "write".into(),
            not_before_ms: now,
            not_after_ms: now + 3_600_000,
            reason: "t83".into(),
            duration_ms: 0,
        })
        .await
        .expect("grant");
    let check = pb::CheckGrantRequest {
        subject: "agent-ops".into(),
        issuer: env().get("VIGIL_OIDC_ISSUER").into(),
        scope: Some(pg_scope("app")),
        access_class: "write".into(),
    };
    assert!(nodes
        .check_grant(check.clone())
        .await
        .unwrap()
        .grant
        .is_some());
    let old = cluster.leader(&[1, 2, 3]).await;
    cluster.signal(old, "-STOP");
    let rest: Vec<u64> = [1, 2, 3].into_iter().filter(|&i| i != old).collect();
    let new = cluster.leader(&rest).await;
    assert_ne!(new, old);
    cluster
        .client_for(&rest)
        .revoke_grant(pb::GrantId {
            id: grant.id.clone(),
        })
        .await
        .expect("revoke through the new leader");
    cluster.signal(old, "-CONT");
    // Ask the old leader alone, at once and for a while: it either refuses (not the leader,
    // cannot confirm) or answers with the current state. Never the revoked grant.
    let only_old = cluster
        .client_for(&[old])
        .retry_for(Duration::from_millis(0));
    for _ in 0..40 {
        match only_old.check_grant(check.clone()).await {
            Ok(r) => assert!(
                r.grant.is_none(),
                "the old leader authorised a revoked grant"
            ),
            Err(e) => assert!(
                matches!(e.code(), Code::Unavailable | Code::DeadlineExceeded),
                "{e:?}"
            ),
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    // Through the cluster, the grant is revoked.
    assert!(nodes.check_grant(check).await.unwrap().grant.is_none());
}

/// All three members killed at once and restarted: every request, decision and grant is
/// still there.
/// Creates requests `r0`… (`created` of them), then approves and denies the first `decided`
/// in turn.
async fn create_and_decide(
    nodes: &vigil_coordinator::client::Client,
    operator: &vigil_coordinator::client::Client,
    created: u32,
    decided: u32,
) {
    for i in 0..created {
        nodes
            .create_approval(new_request(&format!("r{i}"), &format!("h{i}")))
            .await
            .unwrap();
    }
    for i in 0..decided {
        operator
            .decide_approval(decide(&format!("r{i}"), i % 2 == 0))
            .await
            .unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t84_a_full_cluster_restart_keeps_everything() {
    let mut cluster = Cluster::start(3).await;
    let nodes = cluster.client();
    let alice = id_token("alice");
    let operator = cluster.operator(&alice);
    // Enough entries to take snapshots (every 200) and purge the log behind them.
    create_and_decide(&nodes, &operator, 260, 40).await;
    let now = vigil_coordinator::service::now_ms();
    let grant = nodes
        .create_grant(pb::CreateGrantRequest {
            subject: "agent-ops".into(),
            issuer: env().get("VIGIL_OIDC_ISSUER").into(),
            scope: Some(pg_scope("app")),
            access_class: "write".into(),
            not_before_ms: now,
            not_after_ms: now + 3_600_000,
            reason: String::new(),
            duration_ms: 0,
        })
        .await
        .unwrap();
    let before = operator
        .list_approvals(pb::ListApprovalsRequest::default())
        .await
        .unwrap();
    for id in 1..=3 {
        cluster.kill(id);
    }
    for id in 1..=3 {
        cluster.spawn(id);
    }
    for id in 1..=3 {
        cluster.wait_up(id).await;
    }
    cluster.leader(&[1, 2, 3]).await;
    let after = operator
        .list_approvals(pb::ListApprovalsRequest::default())
        .await
        .unwrap();
    assert_eq!(before.approvals.len(), 260);
    let strip = |l: &pb::ApprovalList| {
        l.approvals
            .iter()
            .map(|a| (a.id.clone(), a.state.clone(), a.votes.clone()))
            .collect::<Vec<_>>()
    };
    assert_eq!(strip(&before), strip(&after));
    let grants = nodes.list_grants(pb::ListGrantsRequest {}).await.unwrap();
    assert_eq!(grants.grants, vec![grant]);
}

/// Bad input changes nothing and gets a clear error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t86_unauthenticated_and_malformed_calls_are_refused() {
    let cluster = Cluster::start(3).await;
    let endpoints = cluster.endpoints();
    use vigil_coordinator::client::{Client, Credential};
    let with = |c: Credential| {
        Client::new(endpoints.clone(), c)
            .unwrap()
            .retry_for(Duration::from_secs(5))
    };
    let wrong = with(Credential::Cluster("not-the-token".into()));
    let e = wrong
        .create_approval(new_request("r1", "h"))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated, "{e:?}");
    let forged = with(Credential::Bearer(forge(
        &serde_json::json!({"iss": env().get("VIGIL_OIDC_ISSUER"), "sub": "alice", "aud": "vigil-cli", "exp": 4_000_000_000u64, "groups": ["approvers"]}),
        "unknown-kid",
        None,
    )));
    let e = forged
        .decide_approval(decide("r1", true))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated, "{e:?}");
    let garbage = with(Credential::Bearer("garbage".into()));
    let e = garbage
        .list_approvals(pb::ListApprovalsRequest::default())
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated, "{e:?}");
    // No credential at all: a raw gRPC call.
    let raw = vigil_coordinator::network::channel(&endpoints[0], None).unwrap();
    let e = pb::coordinator_client::CoordinatorClient::new(raw.clone())
        .list_approvals(pb::ListApprovalsRequest::default())
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated, "{e:?}");
    assert!(e.message().contains("no credentials"), "{e:?}");
    // An operator cannot act as a node, and a node cannot decide.
    let alice = cluster.operator(&id_token("alice"));
    let e = alice
        .create_approval(new_request("r1", "h"))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    let nodes = cluster.client();
    nodes.create_approval(new_request("r2", "h")).await.unwrap();
    let e = nodes.decide_approval(decide("r2", true)).await.unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    // bob is not an approver: he can neither decide nor even see the request.
    let bob = cluster.operator(&id_token("bob"));
    let e = bob.decide_approval(decide("r2", true)).await.unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    let seen = bob
        .list_approvals(pb::ListApprovalsRequest::default())
        .await
        .unwrap();
    assert!(seen.approvals.is_empty(), "{seen:?}");
    let e = bob
        .get_approval(pb::ApprovalId { id: "r2".into() })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound, "{e:?}");
    // Grants are for the admin group (or the cluster token), not for approvers.
    let e = alice
        .create_grant(pb::CreateGrantRequest {
            subject: "agent-ops".into(),
            scope: Some(pg_scope("app")),
            access_class: "write".into(),
            duration_ms: 60_000,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    // Malformed requests.
    let e = nodes
        .create_approval(pb::CreateApprovalRequest::default())
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    let mut bad_ttl = new_request("r3", "h");
    bad_ttl.ttl_ms = 0;
    let e = nodes.create_approval(bad_ttl).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    let mut forged_cp = pb::Checkpoint {
        stream: "n1:1".into(),
        seq: 3,
        hash: "ab".repeat(32),
        time_ms: 1,
        signature: "00".repeat(64),
        public_key: "11".repeat(32),
    };
    let e = nodes.put_checkpoint(forged_cp.clone()).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    forged_cp.public_key = "zz".into();
    let e = nodes.put_checkpoint(forged_cp).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    // A malformed Raft message with the right token: refused, nothing changes.
    let leader = cluster.leader(&[1, 2, 3]).await;
    let mut req = tonic::Request::new(pb::RaftMessage {
        json: b"{not json".to_vec(),
        ..Default::default()
    });
    req.metadata_mut().insert(
        vigil_coordinator::service::CLUSTER_TOKEN_HEADER,
        cluster.token.parse().unwrap(),
    );
    let ch = vigil_coordinator::network::channel(&cluster.member(leader).addr, None).unwrap();
    let e = pb::raft_client::RaftClient::new(ch)
        .append_entries(req)
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    // An unauthenticated Raft message: refused.
    let e = pb::raft_client::RaftClient::new(raw)
        .vote(pb::RaftMessage {
            json: b"{}".to_vec(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated, "{e:?}");
    // Only r2 exists, undecided.
    let all = alice
        .list_approvals(pb::ListApprovalsRequest::default())
        .await
        .unwrap();
    assert_eq!(all.approvals.len(), 1);
    assert_eq!(all.approvals[0].id, "r2");
    assert_eq!(all.approvals[0].state, "pending");
    let cps = nodes
        .list_checkpoints(pb::ListCheckpointsRequest {})
        .await
        .unwrap();
    assert!(cps.checkpoints.is_empty());
    let status = nodes.status(pb::StatusRequest {}).await.unwrap();
    assert_eq!(status.voters.len(), 3);
}

const APPROVAL_POLICY: &str = r#"
[[policy.rules]]
id = "writes-need-approval"
action = "require_approval"
kinds = ["write"]
reason = "writes need an approver"
approval = { approvers = "approvers", wait_secs = 2, ttl_secs = 600 }
"#;

/// The same rule, held long enough for an approver to act while the client waits; a grant of
/// class `write` lets writes through without a request.
const PATIENT_POLICY: &str = r#"
[[policy.rules]]
id = "writes-need-approval"
action = "require_approval"
kinds = ["write"]
approval = { approvers = "approvers", wait_secs = 20, ttl_secs = 600, grant_class = "write" }
"#;

fn pending_id(err: &tokio_postgres::Error) -> String {
    let msg = err
        .as_db_error()
        .map(|d| d.message().to_string())
        .unwrap_or_else(|| err.to_string());
    let start = msg
        .find("apr-")
        .unwrap_or_else(|| panic!("no request id in {msg:?}"));
    msg[start..].split_whitespace().next().unwrap().to_string()
}

/// Held on node A, approved with the CLI, run on node B once; a second run is held again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t85_approved_on_one_node_runs_once_on_another() {
    approved_on_one_node_runs_once_on_another(&Cluster::start(3).await).await;
}

/// t85's flow against `cluster`: the nodes and the CLI reach it as its [`Cluster::node_section`]
/// and [`Cluster::cli_args`] say (over TLS when it has TLS).
async fn approved_on_one_node_runs_once_on_another(cluster: &Cluster) {
    let cli_args = cluster.cli_args();
    let cli = |args: &[&str]| {
        let mut all: Vec<&str> = args.to_vec();
        all.extend(cli_args.iter().map(String::as_str));
        vigil(&all)
    };
    let opts = NodeOptions {
        extra: APPROVAL_POLICY,
        coordinator: Some(cluster.node_section()),
        ..NodeOptions::default()
    };
    let files_a = NodeFiles::new(&opts).await;
    let db = files_a.db.clone();
    let a = TestNode::start_with(files_a).await;
    let b = TestNode::start_with(NodeFiles::for_database(db.clone(), &opts)).await;
    let token = token_for("agent-ops", "agent-ops-secret").await;
    let stmt = "DELETE FROM customers WHERE id = 7";
    let log_start = pg_log_len();

    let (client_a, _task) = a.client(&token).await.unwrap();
    let err = client_a.simple_query(stmt).await.unwrap_err();
    let id = pending_id(&err);
    assert!(
        err.to_string().contains("pending") || format!("{err:?}").contains("pending"),
        "{err:?}"
    );
    // Reads are not held.
    client_a.simple_query("SELECT 1").await.unwrap();
    drop(client_a);

    // The approver approves with the CLI and her own token.
    let alice = id_token("alice");
    let (code, shown) = cli(&["approvals", "show", &id, "--token", &alice]);
    assert_eq!(code, 0, "{shown}");
    assert!(shown.contains(stmt), "{shown}");
    assert!(shown.contains("requester   agent-ops"), "{shown}");
    let (code, out) = cli(&[
        "approvals",
        "approve",
        "--yes",
        &id,
        "--comment",
        "ticket 42",
        "--token",
        &alice,
    ]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("state       approved"), "{out}");
    assert!(out.contains("vote        alice approved"), "{out}");

    // The client reconnects, through node B this time: the statement runs, once.
    let (client_b, _task) = b.client(&token).await.unwrap();
    let rows = client_b
        .simple_query(stmt)
        .await
        .expect("runs once approved");
    assert!(rows
        .iter()
        .any(|m| matches!(m, tokio_postgres::SimpleQueryMessage::CommandComplete(1))));
    let again = client_b.simple_query(stmt).await.unwrap_err();
    let second = pending_id(&again);
    assert_ne!(second, id, "a second run needs a new approval");
    drop(client_b);

    let ran: Vec<_> = pg_log_lines(&db, log_start)
        .into_iter()
        .filter(|l| l.contains(stmt))
        .collect();
    assert_eq!(
        ran.len(),
        1,
        "the approved statement ran exactly once: {ran:#?}"
    );
    let (code, out) = cli(&["approvals", "show", &id, "--token", &alice]);
    assert_eq!(code, 0);
    assert!(out.contains("state       consumed"), "{out}");

    // Each step is an audit record: requested and pending on A; run with the approval on B.
    let ra = a.records_after_sessions(1).await;
    let requested = of_kind(&ra, Kind::ApprovalRequested);
    assert_eq!(requested.len(), 1);
    assert_eq!(requested[0].body.approval.as_ref().unwrap().id, id);
    let waited = of_kind(&ra, Kind::ApprovalDecided);
    assert_eq!(waited[0].body.approval.as_ref().unwrap().state, "pending");
    let blocked = of_kind(&ra, Kind::Blocked);
    assert_eq!(blocked.len(), 1);
    let rb = b.records_after_sessions(1).await;
    let ran_with = of_kind(&rb, Kind::Request)
        .into_iter()
        .find(|r| r.body.pg_request().is_some_and(|q| q.text == stmt))
        .expect("the request record on B");
    let approval = ran_with.body.approval.as_ref().unwrap();
    assert_eq!(
        (approval.id.as_str(), approval.state.as_str()),
        (id.as_str(), "consumed")
    );
    assert_eq!(approval.by, vec!["alice".to_string()]);
}

/// TLS on every member's gRPC port. The members form the cluster over mutual TLS; gateway
/// nodes verifying them against the CA hold a statement, the CLI (`--ca`) approves it, another
/// node runs it once (t85's flow, over TLS). A caller without a member's certificate cannot
/// speak Raft even with the cluster token, one with another CA's certificate does not get
/// through the handshake, a plaintext caller gets nowhere, and a client trusting another CA
/// refuses the members. The members' /readyz and /metrics agree on one leader; a member left
/// without a majority stops being ready.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t88_members_use_mutual_tls_and_nodes_and_operators_verify_them() {
    use vigil_coordinator::network::channel;
    use vigil_coordinator::tls::{ClientTls, MemberTls};
    use vigil_proto::coordinator::raft_client::RaftClient;

    let mut cluster = Cluster::start_tls(3).await;
    eprintln!("== t88: a held statement approved and run over TLS");
    approved_on_one_node_runs_once_on_another(&cluster).await;

    eprintln!("== t88: vigil approvals list, a page at a time");
    let client = cluster.client();
    for i in 0..5 {
        client
            .create_approval(new_request(&format!("r-page-{i}"), &format!("h-page-{i}")))
            .await
            .unwrap();
    }
    let list = |extra: &[&str]| {
        let out = std::process::Command::new(bin("vigil"))
            .args([
                "approvals",
                "list",
                "--cluster-token-env",
                "VIGIL_T88_TOKEN",
            ])
            .args(extra)
            .args(cluster.cli_args())
            .env("VIGIL_T88_TOKEN", &cluster.token)
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(out.status.success(), "{text}{}", output_text(&out));
        let ids: Vec<String> = text
            .lines()
            .filter(|l| !l.starts_with("more: "))
            .map(|l| l.split_whitespace().next().unwrap().to_string())
            .collect();
        let after = text
            .lines()
            .find_map(|l| l.strip_prefix("more: --after "))
            .map(str::to_string);
        (ids, after)
    };
    let (all, more) = list(&["--all"]);
    assert_eq!(all.len(), 7, "t85's two requests and five more: {all:?}");
    assert_eq!(more, None);
    assert_eq!(all[0], "r-page-4", "newest first: {all:?}");
    let (mut paged, mut after, mut pages) = (Vec::new(), None::<String>, 0);
    loop {
        let mut args = vec!["--limit", "3"];
        if let Some(a) = &after {
            args.extend(["--after", a.as_str()]);
        }
        let (ids, next) = list(&args);
        assert!(ids.len() <= 3);
        paged.extend(ids);
        pages += 1;
        after = next;
        if after.is_none() {
            break;
        }
    }
    assert_eq!((pages, &paged), (3, &all));

    eprintln!("== t88: who may speak Raft");
    let leader = cluster.leader(&[1, 2, 3]).await;
    let addr = cluster.member(leader).addr.clone();
    let tls_dir = cluster.tls.clone().unwrap();
    let ca = tls_dir.join("ca.pem");
    let token = cluster.token.clone();
    let vote = |ch| {
        let token = token.clone();
        async move {
            let mut req = tonic::Request::new(pb::RaftMessage {
                json: b"{}".to_vec(),
                ..Default::default()
            });
            req.metadata_mut().insert(
                vigil_coordinator::service::CLUSTER_TOKEN_HEADER,
                token.parse().unwrap(),
            );
            RaftClient::new(ch).vote(req).await.unwrap_err()
        }
    };
    // TLS, the right CA and the cluster token, but no client certificate: refused.
    let err = vote(channel(&addr, Some(&ClientTls::verify_with(&ca).unwrap())).unwrap()).await;
    assert_eq!(err.code(), Code::Unauthenticated, "{err:?}");
    assert!(err.message().contains("client certificate"), "{err:?}");
    // A member's certificate gets through to Raft (which then refuses the empty message).
    let member = |dir: &std::path::Path, name: &str| MemberTls {
        cert_file: dir.join(format!("{name}.pem")),
        key_file: dir.join(format!("{name}.key")),
        ca_file: ca.clone(),
    };
    let as_member = member(&tls_dir, "member-1").peer_client().unwrap();
    let err = vote(channel(&addr, Some(&as_member)).unwrap()).await;
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    // A certificate from another CA, for the same address: the handshake fails.
    let other = cluster.dir.path().join("other-ca");
    vigil_chaos::cluster::make_certificates(&other, &["impostor=IP:127.0.0.1".to_string()]);
    let impostor = member(&other, "impostor").peer_client().unwrap();
    let err = vote(channel(&addr, Some(&impostor)).unwrap()).await;
    assert!(
        !matches!(err.code(), Code::InvalidArgument | Code::Unauthenticated),
        "a foreign certificate reached the service: {err:?}"
    );
    eprintln!("foreign certificate: {err:?}");
    // Plaintext.
    let err = vote(channel(&addr, None).unwrap()).await;
    assert!(
        !matches!(err.code(), Code::InvalidArgument | Code::Unauthenticated),
        "a plaintext call reached the service: {err:?}"
    );
    // A node that trusts another CA does not talk to these members.
    let misled = vigil_coordinator::client::Client::new(
        vec![addr.clone()],
        vigil_coordinator::client::Credential::Cluster(cluster.token.clone().into()),
    )
    .unwrap()
    .retry_for(Duration::from_millis(300))
    .tls(ClientTls::verify_with(&other.join("ca.pem")).unwrap());
    let err = misled.status(pb::StatusRequest {}).await.unwrap_err();
    assert!(
        format!("{err:?}").contains("certificate"),
        "untrusted member: {err:?}"
    );
    // The members still agree: nothing above disturbed Raft.
    cluster
        .client()
        .create_approval(new_request("r-after-probes", "h-probes"))
        .await
        .expect("the cluster still commits");

    eprintln!("== t88: health and metrics");
    let mut leaders = 0.0;
    for id in 1..=3 {
        let (code, body) = cluster.http_get(id, "/readyz").await;
        assert_eq!(code, 200, "member {id}: {body}");
        let (code, text) = cluster.http_get(id, "/metrics").await;
        assert_eq!(code, 200);
        leaders += metric(&text, "vigil_coordinator_is_leader");
        assert!(metric(&text, "vigil_coordinator_leader_changes_total") >= 1.0);
        assert!(metric(&text, "vigil_coordinator_last_applied_index") > 0.0);
        if id == leader {
            assert!(metric(&text, "vigil_coordinator_commit_seconds_count") > 0.0);
            assert_eq!(metric(&text, "vigil_coordinator_commit_errors_total"), 0.0);
        }
    }
    assert_eq!(leaders, 1.0, "one leader");
    let alone = [1, 2, 3].into_iter().find(|&i| i != leader).unwrap();
    for id in [1, 2, 3].into_iter().filter(|&i| i != alone) {
        cluster.kill(id);
    }
    eventually_async("a member without a majority reports not ready", || {
        let cluster = &cluster;
        async move { cluster.http_get(alone, "/readyz").await.0 == 503 }
    })
    .await;
    let (_, body) = cluster.http_get(alone, "/readyz").await;
    assert!(body.contains("no leader"), "{body}");
    let (_, text) = cluster.http_get(alone, "/metrics").await;
    assert!(metric(&text, "vigil_coordinator_peer_rpc_errors_total") > 0.0);
    assert_eq!(cluster.http_get(alone, "/healthz").await.0, 200);
}

/// The requests member `id` holds, by its /metrics (none while it does not answer).
async fn requests_held(cluster: &Cluster, id: u64) -> Option<f64> {
    let (code, text) = cluster.http_get(id, "/metrics").await;
    (code == 200).then(|| metric(&text, "vigil_coordinator_requests"))
}

/// Retention on three real members: a flow of requests that expire (the snapshot every 200
/// entries goes through them) is forgotten by the leader's purge on every member alike, a
/// member that was down meanwhile catches up to the same state, and what is still live is kept.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t8e_settled_requests_are_forgotten_on_every_member() {
    let mut cluster = Cluster::start_with_retention(3, 1).await;
    let leader = cluster.leader(&[1, 2, 3]).await;
    let away = [1, 2, 3].into_iter().find(|&i| i != leader).unwrap();
    eprintln!("== t8e: member {away} down while 300 short-lived requests come and go");
    cluster.kill(away);
    let client = cluster.client();
    for i in 0..300 {
        let mut r = new_request(&format!("r-short-{i}"), &format!("h-short-{i}"));
        r.ttl_ms = 200;
        client.create_approval(r).await.unwrap();
    }
    client
        .create_approval(new_request("r-live", "h-live"))
        .await
        .unwrap();
    let up: Vec<u64> = [1, 2, 3].into_iter().filter(|&i| i != away).collect();
    for &id in &up {
        eventually_async("the short-lived requests are forgotten", || async {
            requests_held(&cluster, id).await == Some(1.0)
        })
        .await;
    }
    let (_, text) = cluster.http_get(leader, "/metrics").await;
    assert_eq!(
        metric(&text, "vigil_coordinator_purged_total"),
        300.0,
        "purged on the leader: {text}"
    );
    eprintln!("== t8e: member {away} back: it catches up to the same state");
    cluster.spawn(away);
    cluster.wait_up(away).await;
    let applied = |text: &str| metric(text, "vigil_coordinator_last_applied_index");
    eventually_async(
        "the returning member has applied the leader's log, purge included",
        || async {
            let (_, l) = cluster.http_get(leader, "/metrics").await;
            let (_, a) = cluster.http_get(away, "/metrics").await;
            applied(&a) > 300.0
                && applied(&a) == applied(&l)
                && requests_held(&cluster, away).await == Some(1.0)
        },
    )
    .await;
    let live = cluster
        .client()
        .get_approval(pb::ApprovalId {
            id: "r-live".into(),
        })
        .await
        .expect("a live request is kept");
    assert_eq!(live.state, "pending");
    let gone = cluster
        .client()
        .get_approval(pb::ApprovalId {
            id: "r-short-7".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(gone.code(), Code::NotFound, "{gone:?}");
}

/// A member that was down while the log it needed was purged catches up by installing the
/// state the leader sends (made from the leader's state when asked: snapshots are marks), and
/// keeps it through a SIGKILL and restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t8f_a_member_behind_the_purged_log_installs_the_state_it_is_sent() {
    let mut cluster = Cluster::start(3).await;
    let leader = cluster.leader(&[1, 2, 3]).await;
    let away = [1, 2, 3].into_iter().find(|&i| i != leader).unwrap();
    let applied = |text: &str| metric(text, "vigil_coordinator_last_applied_index");
    let (_, text) = cluster.http_get(away, "/metrics").await;
    let behind = applied(&text);
    eprintln!("== t8f: member {away} down at entry {behind} while 1,500 requests come");
    cluster.kill(away);
    let alice = id_token("alice");
    let operator = cluster.operator(&alice);
    create_and_decide(&cluster.client(), &operator, 1_500, 20).await;
    // The leader keeps 1,000 entries behind its snapshot: past that, the member's next entry
    // is gone from its log.
    let (_, text) = cluster.http_get(leader, "/metrics").await;
    let snapshot = metric(&text, "vigil_coordinator_snapshot_index");
    assert!(
        snapshot > behind + 1_000.0,
        "the leader's snapshot is at {snapshot}, the member at {behind}"
    );
    for (round, late) in [
        ("after the install", 200),
        ("after a SIGKILL and restart", 0),
    ] {
        eprintln!("== t8f: member {away} back ({round}), {late} more requests meanwhile");
        cluster.spawn(away);
        // Requests that keep coming while the member catches up: it installs a state, then
        // applies the entries after it.
        let writer = cluster.client();
        let writes = tokio::spawn(async move {
            for i in 0..late {
                writer
                    .create_approval(new_request(&format!("r-late-{i}"), &format!("hl{i}")))
                    .await
                    .unwrap();
            }
        });
        cluster.wait_up(away).await;
        writes.await.unwrap();
        eventually_async("the returning member holds the leader's state", || async {
            let (_, l) = cluster.http_get(leader, "/metrics").await;
            let (_, a) = cluster.http_get(away, "/metrics").await;
            applied(&a) == applied(&l) && requests_held(&cluster, away).await == Some(1_700.0)
        })
        .await;
        let (_, text) = cluster.http_get(away, "/metrics").await;
        assert!(
            metric(&text, "vigil_coordinator_snapshot_index") > behind + 1_000.0,
            "{round}: the member holds an installed snapshot: {text}"
        );
        cluster.kill(away);
    }
    // The returned member and the third one, without the old leader, elect a leader and
    // answer with the same requests, states and votes.
    let held = operator
        .list_approvals(pb::ListApprovalsRequest::default())
        .await
        .unwrap();
    let states = |l: &pb::ApprovalList| {
        l.approvals
            .iter()
            .map(|a| (a.id.clone(), a.state.clone(), a.votes.len()))
            .collect::<Vec<_>>()
    };
    let other = [1, 2, 3]
        .into_iter()
        .find(|&i| i != leader && i != away)
        .unwrap();
    cluster.spawn(away);
    cluster.wait_up(away).await;
    cluster.kill(leader);
    cluster.leader(&[away, other]).await;
    let after = operator
        .list_approvals(pb::ListApprovalsRequest::default())
        .await
        .unwrap();
    assert_eq!(states(&held), states(&after));
}

/// Three gateway nodes race to consume one approval: exactly one runs the statement.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t82_three_nodes_race_for_one_approval_and_one_wins() {
    let cluster = Cluster::start(3).await;
    let opts = NodeOptions {
        extra: APPROVAL_POLICY,
        coordinator: Some(cluster.node_section()),
        ..NodeOptions::default()
    };
    let files = NodeFiles::new(&opts).await;
    let db = files.db.clone();
    let nodes = [
        TestNode::start_with(files).await,
        TestNode::start_with(NodeFiles::for_database(db.clone(), &opts)).await,
        TestNode::start_with(NodeFiles::for_database(db.clone(), &opts)).await,
    ];
    let token = token_for("agent-ops", "agent-ops-secret").await;
    let stmt = "UPDATE customers SET name = 'raced' WHERE id = 3";
    let (c, _t) = nodes[0].client(&token).await.unwrap();
    let id = pending_id(&c.simple_query(stmt).await.unwrap_err());
    drop(c);
    cluster
        .operator(&id_token("alice"))
        .decide_approval(decide(&id, true))
        .await
        .unwrap();
    let log_start = pg_log_len();
    let mut clients = Vec::new();
    for n in &nodes {
        clients.push(n.client(&token).await.unwrap());
    }
    let results =
        futures_util::future::join_all(clients.iter().map(|(c, _)| c.simple_query(stmt))).await;
    let won = results.iter().filter(|r| r.is_ok()).count();
    assert_eq!(won, 1, "{results:?}");
    let ran = pg_log_lines(&db, log_start)
        .into_iter()
        .filter(|l| l.contains(stmt))
        .count();
    assert_eq!(ran, 1);
}

/// The ids of the pending requests that `token`'s holder may see.
fn pending(coord: &str, token: &str) -> Vec<String> {
    let (_, out) = vigil(&[
        "approvals",
        "list",
        "--state",
        "pending",
        "--coordinator",
        coord,
        "--token",
        token,
    ]);
    out.split_whitespace()
        .filter(|w| w.starts_with("apr-"))
        .map(str::to_string)
        .collect()
}

/// Waits (in a blocking thread: it runs the CLI) for a pending request and decides it with
/// `vigil approvals <how> ID`; returns its id.
fn decide_first_pending(coord: &str, token: &str, how: &[&str]) -> String {
    for _ in 0..200 {
        if let Some(id) = pending(coord, token).first() {
            let mut args = vec!["approvals", how[0], "--yes", id];
            args.extend_from_slice(&how[1..]);
            args.extend_from_slice(&["--coordinator", coord, "--token", token]);
            let (code, out) = vigil(&args);
            assert_eq!(code, 0, "{out}");
            return id.to_string();
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("no pending request appeared");
}

/// The embedded default: no coordinator configured, the node runs a member in-process; the
/// CLI approves through it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t87_the_embedded_coordinator_holds_and_releases_statements() {
    let node = TestNode::start(NodeOptions {
        extra: PATIENT_POLICY,
        ..NodeOptions::default()
    })
    .await;
    let coord = node.node.coordinator.join(",");
    let token = token_for("agent-ops", "agent-ops-secret").await;
    let stmt = "INSERT INTO customers VALUES (900, 'held', NULL)";
    let (client, _task) = node.client(&token).await.unwrap();
    // Approve while the statement is held: the same call returns with the row inserted.
    let alice = id_token("alice");
    let held = tokio::task::spawn_blocking({
        let coord = coord.clone();
        move || decide_first_pending(&coord, &alice, &["approve"])
    });
    let done = client.simple_query(stmt).await;
    let id = held.await.unwrap();
    done.expect("approved while held, then run");
    let rows = client
        .simple_query("SELECT name FROM customers WHERE id = 900")
        .await
        .unwrap();
    assert!(rows.iter().any(
        |m| matches!(m, tokio_postgres::SimpleQueryMessage::Row(r) if r.get(0) == Some("held"))
    ));
    // A denied one is refused with the approver's name.
    let alice = id_token("alice");
    let alice_denies = tokio::task::spawn_blocking({
        let coord = coord.clone();
        move || decide_first_pending(&coord, &alice, &["deny", "--comment", "not today"])
    });
    let err = client
        .simple_query("DELETE FROM customers WHERE id = 900")
        .await
        .unwrap_err();
    alice_denies.await.unwrap();
    let msg = err.as_db_error().unwrap().message().to_string();
    assert!(msg.contains("denied by alice (not today)"), "{msg}");
    // An admin grants agent-ops writes on app for a while: writes run at once, with the grant
    // on record (then the grant is revoked).
    let carol = id_token("carol");
    let (code, out) = vigil(&[
        "grants",
        "create",
        "--subject",
        "agent-ops",
        "--issuer",
        env().get("VIGIL_OIDC_ISSUER"),
        "--connection",
        "app",
        "--class",
        "write",
        "--minutes",
        "5",
        "--reason",
        "migration",
        "--coordinator",
        &coord,
        "--token",
        &carol,
    ]);
    assert_eq!(code, 0, "{out}");
    let grant = out.split_whitespace().next().unwrap().to_string();
    assert!(grant.starts_with("g-"), "{out}");
    client
        .simple_query("UPDATE customers SET name = 'granted' WHERE id = 900")
        .await
        .expect("a grant lets the write through");
    let (code, out) = vigil(&[
        "grants",
        "revoke",
        &grant,
        "--coordinator",
        &coord,
        "--token",
        &carol,
    ]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("revoked"), "{out}");
    drop(client);
    let records = node.records_after_sessions(1).await;
    let decided = of_kind(&records, Kind::ApprovalDecided);
    assert!(decided.iter().any(|r| r
        .body
        .approval
        .as_ref()
        .is_some_and(|a| a.id == id && a.state == "approved")));
    assert!(decided.iter().any(|r| r
        .body
        .approval
        .as_ref()
        .is_some_and(|a| a.state == "denied")));
}

/// A statement held for request R2 and approved while held runs with R2, not with an older
/// approval of the same statement (R1, approved after its client had gone): its records name
/// the request whose approval the node saw, and R1 stays for the run it was asked for. Before,
/// the node consumed the oldest approved request with the statement's key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t8g_a_statement_approved_while_held_runs_with_that_approval() {
    const POLICY: &str = r#"
[[policy.rules]]
id = "writes-need-approval"
action = "require_approval"
kinds = ["write"]
approval = { approvers = "approvers", wait_secs = 8, ttl_secs = 600 }
"#;
    let node = TestNode::start(NodeOptions {
        extra: POLICY,
        ..NodeOptions::default()
    })
    .await;
    let coord = node.node.coordinator.join(",");
    let token = token_for("agent-ops", "agent-ops-secret").await;
    let stmt = "UPDATE customers SET name = 'twice held' WHERE id = 1";
    let alice = id_token("alice");
    let approve = |id: &str| {
        let (code, out) = vigil(&[
            "approvals",
            "approve",
            "--yes",
            id,
            "--coordinator",
            &coord,
            "--token",
            &alice,
        ]);
        assert_eq!(code, 0, "{out}");
    };

    // R1: held until its wait ran out; nobody waits for it any more.
    let (first, _task) = node.client(&token).await.unwrap();
    let r1 = pending_id(&first.simple_query(stmt).await.unwrap_err());
    drop(first);

    // R2: the same statement again, held while both are approved, R1 first.
    let (second, _task) = node.client(&token).await.unwrap();
    let held = tokio::spawn(async move { second.simple_query(stmt).await.map(|_| second) });
    let r2 = loop {
        if let Some(id) = pending(&coord, &alice).into_iter().find(|id| *id != r1) {
            break id;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    approve(&r1);
    approve(&r2);
    held.await.unwrap().expect("approved while held, then run");

    let records = node.records_after_sessions(2).await;
    let ran: Vec<_> = of_kind(&records, Kind::Request)
        .into_iter()
        .filter_map(|r| r.body.approval.clone())
        .collect();
    assert_eq!(ran.len(), 1, "{ran:?}");
    assert_eq!(
        (ran[0].id.as_str(), ran[0].state.as_str()),
        (r2.as_str(), "consumed")
    );
    let (code, out) = vigil(&[
        "approvals",
        "show",
        &r1,
        "--coordinator",
        &coord,
        "--token",
        &alice,
    ]);
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains("state       approved"),
        "R1 is still there to use: {out}"
    );
}
