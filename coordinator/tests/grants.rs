//! Grants (outside review): an admin cannot grant access to themselves, and a grant's window is
//! bounded (at most 7 days, not starting in the past, not empty), whoever asks.

use std::sync::Arc;
use tonic::Code;
use vigil_coordinator::approvals::Actor;
use vigil_coordinator::client::Credential;
use vigil_coordinator::service::{now_ms, BoxFuture, OperatorAuth, MAX_GRANT_MINUTES};
use vigil_proto::coordinator as pb;

mod common;
use common::client;

const TOKEN: &str = "grants-test-cluster-token";
const ISSUER: &str = "https://idp.example";

/// `admin:SUBJECT:PERSON`: an admin of `ISSUER` with that person key.
struct Admins;

impl OperatorAuth for Admins {
    fn authenticate<'a>(&'a self, token: &'a str) -> BoxFuture<'a, Result<Actor, String>> {
        Box::pin(async move {
            let rest = token.strip_prefix("admin:").ok_or("not an admin")?;
            let (subject, person) = rest.split_once(':').ok_or("admin:SUBJECT:PERSON")?;
            Ok(Actor {
                subject: subject.into(),
                issuer: ISSUER.into(),
                groups: vec!["vigil-admins".into()],
                person: Some(person.into()),
            })
        })
    }
}

fn grant(subject: &str, issuer: &str, minutes: u64) -> pb::CreateGrantRequest {
    pb::CreateGrantRequest {
        subject: subject.into(),
        issuer: issuer.into(),
        scope: Some(pb::Scope {
            protocol: "ssh".into(),
            target: "web-1".into(),
        }),
        access_class: "write".into(),
        duration_ms: minutes.saturating_mul(60_000),
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t92_no_self_grants_and_bounded_windows() {
    let dir = tempfile::tempdir().unwrap();
    let member = common::member(dir.path(), 1, TOKEN, Arc::new(Admins), |cfg| {
        cfg.bootstrap = true
    })
    .await;
    let carol = client(
        &member,
        Credential::Bearer("admin:carol:Carol@Example.com".into()),
    );
    let automation = client(&member, Credential::Cluster(TOKEN.into()));
    let refused = |r: Result<pb::Grant, tonic::Status>, code: Code| {
        let s = r.expect_err("refused");
        assert_eq!(s.code(), code, "{s:?}");
    };

    // Carol, to herself: her subject, her subject at another provider, her person key.
    refused(
        carol.create_grant(grant("carol", ISSUER, 5)).await,
        Code::PermissionDenied,
    );
    refused(
        carol
            .create_grant(grant("carol", "https://other.example", 5))
            .await,
        Code::PermissionDenied,
    );
    refused(
        carol
            .create_grant(grant("carol@example.com", "https://other.example", 5))
            .await,
        Code::PermissionDenied,
    );

    // ~9,500 years, a week and a minute, empty, in the past: refused, even with the token.
    for c in [&carol, &automation] {
        refused(
            c.create_grant(grant("dave", ISSUER, 5_000_000_000)).await,
            Code::InvalidArgument,
        );
        refused(
            c.create_grant(grant("dave", ISSUER, MAX_GRANT_MINUTES + 1))
                .await,
            Code::InvalidArgument,
        );
        let now = now_ms();
        let mut past = grant("dave", ISSUER, 0);
        past.not_before_ms = now - 3_600_000;
        past.not_after_ms = now + 3_600_000;
        refused(c.create_grant(past).await, Code::InvalidArgument);
        let mut empty = grant("dave", ISSUER, 0);
        empty.not_before_ms = now + 60_000;
        empty.not_after_ms = now + 60_000;
        refused(c.create_grant(empty).await, Code::InvalidArgument);
        let mut long = grant("dave", ISSUER, 0);
        long.not_before_ms = now;
        long.not_after_ms = now + (MAX_GRANT_MINUTES + 1) * 60_000;
        refused(c.create_grant(long).await, Code::InvalidArgument);
    }
    let listed = automation
        .list_grants(pb::ListGrantsRequest {})
        .await
        .unwrap();
    assert!(listed.grants.is_empty(), "{listed:?}");

    // Someone else, for up to a week: granted, by carol.
    let g = carol
        .create_grant(grant("dave", ISSUER, MAX_GRANT_MINUTES))
        .await
        .expect("a week for someone else");
    assert_eq!(g.granted_by, "carol");
    automation
        .create_grant(grant("erin", ISSUER, 30))
        .await
        .expect("the cluster token grants");
    member.shutdown().await;
}
