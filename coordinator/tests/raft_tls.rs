//! With `[member.tls]`, only a member speaks Raft: a caller must hold the cluster token and
//! have presented a certificate the cluster's CA issued. The gate checks both before the
//! message is read (chaos t88 checks the same against a three-member cluster).

use std::path::Path;
use std::sync::Arc;
use tonic::Code;
use vigil_coordinator::approvals::Actor;
use vigil_coordinator::network::channel;
use vigil_coordinator::service::{BoxFuture, OperatorAuth, CLUSTER_TOKEN_HEADER};
use vigil_coordinator::tls::{ClientTls, MemberTls};
use vigil_proto::coordinator as pb;
use vigil_proto::coordinator::raft_client::RaftClient;

mod common;

const TOKEN: &str = "raft-tls-test-cluster-token";

/// No operator is accepted: only the cluster token matters here.
struct NoOperators;

impl OperatorAuth for NoOperators {
    fn authenticate<'a>(&'a self, _: &'a str) -> BoxFuture<'a, Result<Actor, String>> {
        Box::pin(async { Err("no operators".to_string()) })
    }
}

/// A CA and a member's certificate, made by deploy/coordinator-tls.sh (openssl).
fn certificates() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/coordinator-tls.sh");
    let status = std::process::Command::new(script)
        .arg(dir.path())
        .arg("m1=IP:127.0.0.1")
        .status()
        .expect("deploy/coordinator-tls.sh runs (openssl)");
    assert!(status.success());
    dir
}

/// An (empty, so malformed) `Vote` to `addr` with the cluster token, over `tls`.
async fn vote(addr: &str, tls: &ClientTls) -> tonic::Status {
    let mut req = tonic::Request::new(pb::RaftMessage {
        json: b"{}".to_vec(),
        ..Default::default()
    });
    req.metadata_mut()
        .insert(CLUSTER_TOKEN_HEADER, TOKEN.parse().unwrap());
    RaftClient::new(channel(addr, Some(tls)).unwrap())
        .vote(req)
        .await
        .unwrap_err()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t94_with_tls_only_a_member_speaks_raft() {
    let certs = certificates();
    let tls = MemberTls {
        cert_file: certs.path().join("m1.pem"),
        key_file: certs.path().join("m1.key"),
        ca_file: certs.path().join("ca.pem"),
    };
    let dir = tempfile::tempdir().unwrap();
    let member = common::member(dir.path(), 1, TOKEN, Arc::new(NoOperators), |cfg| {
        cfg.bootstrap = true;
        cfg.tls = Some(tls.clone());
    })
    .await;
    let addr = member.addr.to_string();

    eprintln!("the cluster token without a member's certificate: refused before the message");
    let verifying = ClientTls::verify_with(&certs.path().join("ca.pem")).unwrap();
    let refused = vote(&addr, &verifying).await;
    assert_eq!(refused.code(), Code::Unauthenticated, "{refused:?}");
    assert!(
        refused.message().contains("client certificate"),
        "{refused:?}"
    );

    eprintln!("with a member's certificate: through to Raft, which refuses the empty message");
    let through = vote(&addr, &tls.peer_client().unwrap()).await;
    assert_eq!(through.code(), Code::InvalidArgument, "{through:?}");
    member.shutdown().await;
}
