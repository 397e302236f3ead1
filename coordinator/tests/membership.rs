//! Who may change membership (outside review): adding a member makes the leader send it Raft
//! RPCs carrying the cluster token, so an operator's token must not be enough to name an
//! address the token then goes to in the clear. The embedded coordinator refuses every change;
//! a cluster without `[member.tls]` takes them only with the cluster token.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tonic::Code;
use vigil_coordinator::approvals::Actor;
use vigil_coordinator::client::{Client, Credential};
use vigil_coordinator::server::Member;
use vigil_coordinator::service::{BoxFuture, OperatorAuth};
use vigil_proto::coordinator as pb;

mod common;
use common::client;

const TOKEN: &str = "membership-test-cluster-token";

/// Operators named by their token (`admin:alice`), all in the admin group.
struct Admins;

impl OperatorAuth for Admins {
    fn authenticate<'a>(&'a self, token: &'a str) -> BoxFuture<'a, Result<Actor, String>> {
        Box::pin(async move {
            let subject = token.strip_prefix("admin:").ok_or("not an admin")?;
            Ok(Actor {
                subject: subject.into(),
                groups: vec!["vigil-admins".into()],
                ..Actor::default()
            })
        })
    }
}

/// Member `id` in `dir`; one that bootstraps is returned once it leads.
async fn start(dir: &std::path::Path, id: u64, bootstrap: bool, embedded: bool) -> Member {
    common::member(dir, id, TOKEN, Arc::new(Admins), |cfg| {
        cfg.bootstrap = bootstrap;
        cfg.embedded = embedded;
    })
    .await
}

fn as_admin() -> Credential {
    Credential::Bearer("admin:alice".into())
}

fn as_cluster() -> Credential {
    Credential::Cluster(TOKEN.into())
}

fn admin(member: &Member) -> Client {
    client(member, as_admin())
}

fn cluster(member: &Member) -> Client {
    client(member, as_cluster())
}

/// Asks `who` to add member 2 at a listener of the test's own and says what came back, after
/// asserting that nothing connected to the listener (where the token would have gone).
async fn add_attacker(member: &Member, credential: Credential) -> tonic::Status {
    let attacker = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address: SocketAddr = attacker.local_addr().unwrap();
    let who = client(member, credential);
    let call = tokio::spawn(async move {
        who.add_member(pb::Member {
            id: 2,
            address: address.to_string(),
        })
        .await
    });
    let connected = tokio::time::timeout(Duration::from_secs(2), attacker.accept()).await;
    assert!(
        connected.is_err(),
        "the leader connected to the address an operator named"
    );
    let answer = tokio::time::timeout(Duration::from_secs(5), call)
        .await
        .expect("the call is answered")
        .unwrap();
    answer.expect_err("the change is refused")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t90_embedded_coordinator_refuses_membership_changes() {
    let dir = tempfile::tempdir().unwrap();
    let member = start(dir.path(), 1, true, true).await;

    let refused = add_attacker(&member, as_admin()).await;
    assert_eq!(refused.code(), Code::FailedPrecondition, "{refused:?}");
    assert!(refused.message().contains("embedded"), "{refused:?}");
    // Not even with the cluster token (only the process knows it, but still: no peers).
    let refused = add_attacker(&member, as_cluster()).await;
    assert_eq!(refused.code(), Code::FailedPrecondition, "{refused:?}");
    let refused = admin(&member)
        .remove_member(pb::MemberId { id: 1 })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::FailedPrecondition, "{refused:?}");

    let status = cluster(&member).status(pb::StatusRequest {}).await.unwrap();
    assert_eq!(status.voters.len(), 1, "{status:?}");
    assert!(status.learners.is_empty(), "{status:?}");
    member.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t91_without_tls_only_the_cluster_token_changes_membership() {
    let (d1, d2) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let first = start(d1.path(), 1, true, false).await;

    let refused = add_attacker(&first, as_admin()).await;
    assert_eq!(refused.code(), Code::PermissionDenied, "{refused:?}");
    assert!(refused.message().contains("cluster token"), "{refused:?}");
    let status = cluster(&first).status(pb::StatusRequest {}).await.unwrap();
    assert_eq!(status.voters.len(), 1, "{status:?}");
    assert!(status.learners.is_empty(), "{status:?}");

    // The cluster token adds a real second member, and an admin cannot remove it either.
    let second = start(d2.path(), 2, false, false).await;
    let status = cluster(&first)
        .add_member(pb::Member {
            id: 2,
            address: second.addr.to_string(),
        })
        .await
        .expect("the cluster token adds a member");
    assert_eq!(status.voters.len(), 2, "{status:?}");
    let refused = admin(&first)
        .remove_member(pb::MemberId { id: 2 })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::PermissionDenied, "{refused:?}");
    let status = cluster(&first)
        .remove_member(pb::MemberId { id: 2 })
        .await
        .expect("the cluster token removes a member");
    assert_eq!(status.voters.len(), 1, "{status:?}");

    second.shutdown().await;
    first.shutdown().await;
}
