//! t2x: every way a token can be wrong is refused, audited, and does not hammer the provider.

use serde_json::json;
use std::time::Duration;
use vigil_chaos::tokens::{bad_tokens, with, BadToken};
use vigil_chaos::*;
use vigil_proto::record::{Kind, Outcome};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t20_bad_token_matrix_is_refused_and_audited() {
    let node = TestNode::start(NodeOptions::default()).await;
    let kid = env().get("VIGIL_OIDC_KID");
    // A control: a forged-but-valid token signed with the real key passes, so every refusal
    // below is due to the one thing changed.
    let control = forge(&base_claims(), kid, None);
    node.client(&control)
        .await
        .expect("the control token works");

    let mut cases = bad_tokens(&base_claims());
    cases.push(BadToken {
        name: "empty",
        token: String::new(),
        reason: "well-formed",
    });
    for BadToken {
        name,
        token,
        reason: needle,
    } in &cases
    {
        let err = node
            .client(token)
            .await
            .err()
            .unwrap_or_else(|| panic!("{name}: accepted"));
        let db = err
            .as_db_error()
            .unwrap_or_else(|| panic!("{name}: no server error: {err:?}"));
        assert_eq!(db.code().code(), "28P01", "{name}: {}", db.message());
        assert!(
            db.message().contains(needle),
            "{name}: message {:?} lacks {needle:?}",
            db.message()
        );
    }
    let records = node.records().await;
    let denied: Vec<_> = of_kind(&records, Kind::SessionStart)
        .into_iter()
        .filter(|r| r.body.outcome == Some(Outcome::Denied))
        .collect();
    assert_eq!(denied.len(), cases.len(), "every refusal is audited");
    for r in &denied {
        assert!(r.body.principal.is_none(), "no identity from a bad token");
        assert!(r
            .body
            .detail
            .as_deref()
            .unwrap()
            .starts_with("authentication failed"));
        assert!(r.body.connection.as_ref().unwrap().client_tls);
    }
    // Nothing reached the target with a bad token: only the control session ran.
    assert_eq!(of_kind(&records, Kind::Request).len(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t21_unknown_kid_storm_does_not_hammer_the_jwks_endpoint() {
    let node = TestNode::start(NodeOptions::default()).await;
    let issuer = env().get("VIGIL_OIDC_ISSUER");
    let hits = || async {
        reqwest::get(format!("{issuer}/__dev/jwks-hits"))
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
            .trim()
            .parse::<u64>()
            .unwrap()
    };
    let before_metric = metric(&node.metrics().await, "vigil_jwks_fetches_total");
    let before_hits = hits().await;
    let mut tasks = Vec::new();
    for i in 0..60 {
        let token = forge(&base_claims(), &format!("storm-{i}"), None);
        let conn = node.conn_str(&token, "app");
        tasks.push(tokio::spawn(async move {
            connect_tls(&conn)
                .await
                .err()
                .unwrap()
                .code()
                .unwrap()
                .code()
                .to_string()
        }));
    }
    for t in tasks {
        assert_eq!(t.await.unwrap(), "28P01");
    }
    let fetched = metric(&node.metrics().await, "vigil_jwks_fetches_total") - before_metric;
    let provider_hits = hits().await - before_hits;
    // One refresh at most inside the cooldown (other tests may share the provider, so the
    // provider-side count allows for their own starts).
    assert!(fetched <= 1.0, "the node fetched the JWKS {fetched} times");
    assert!(
        provider_hits <= 10,
        "the provider saw {provider_hits} JWKS requests"
    );
    let rejected = metric(&node.metrics().await, "vigil_token_rejections_total");
    assert!(rejected >= 60.0);
    // A good token still works during the storm's cooldown.
    node.client(&agent_token().await).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t22_a_new_key_is_picked_up_after_the_cooldown() {
    // With a short cooldown, an unknown kid triggers a refetch; the real kid keeps working.
    let node = TestNode::start(NodeOptions {
        jwks_refresh_cooldown_secs: 1,
        ..NodeOptions::default()
    })
    .await;
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let before = metric(&node.metrics().await, "vigil_jwks_fetches_total");
    let unknown = forge(&base_claims(), "rotated-key", None);
    assert!(node.client(&unknown).await.is_err());
    assert!(node.client(&unknown).await.is_err());
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert!(node.client(&unknown).await.is_err());
    let after = metric(&node.metrics().await, "vigil_jwks_fetches_total");
    assert_eq!(after - before, 2.0, "one refetch per cooldown window");
    node.client(&agent_token().await).await.unwrap();
}

/// The harness's `identity.leeway_secs`: a token is good through the second `exp` plus this.
const LEEWAY: i64 = 5;

/// Whether the target logged a statement containing `needle` for `db` since `offset`.
fn pg_ran(db: &str, offset: u64, needle: &str) -> bool {
    pg_log_lines(db, offset)
        .iter()
        .any(|l| l.contains("statement: ") && l.contains(needle))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t23_a_session_ends_when_its_token_expires() {
    let node = TestNode::start(NodeOptions::default()).await;
    let db = node.files.db.clone();
    let exp = now_secs() + 2;
    let token = forge(
        &with(&base_claims(), "exp", json!(exp)),
        env().get("VIGIL_OIDC_KID"),
        None,
    );
    let offset = pg_log_len();
    let (client, _conn) = node.client(&token).await.expect("the token is valid now");
    client.simple_query("SELECT 'before expiry'").await.unwrap();

    // A statement still running when the token expires is cancelled, and the client is told
    // why its connection ends.
    let err = tokio::time::timeout(
        Duration::from_secs(30),
        client.simple_query("SELECT 'in flight', pg_sleep(60)"),
    )
    .await
    .expect("the session ends at the expiry, not after the statement")
    .expect_err("the statement does not complete");
    let ended = now_secs();
    let db_err = err.as_db_error().expect("an error from the gateway");
    assert_eq!(db_err.code().code(), "57P01", "{}", db_err.message());
    assert!(db_err.message().contains("token expired"), "{db_err:?}");
    assert!(
        ended > exp + LEEWAY && ended <= exp + LEEWAY + 2,
        "ended at {ended}, the token was good through {}",
        exp + LEEWAY
    );
    // Nothing reaches the target any more.
    assert!(client.simple_query("SELECT 'after expiry'").await.is_err());
    let records = node.records_after_sessions(1).await;
    eventually("the target logs the cancel", Duration::from_secs(5), || {
        pg_log_lines(&db, offset)
            .iter()
            .any(|l| l.contains("canceling statement due to user request"))
    })
    .await;
    assert!(pg_ran(&db, offset, "before expiry"));
    assert!(pg_ran(&db, offset, "in flight"));
    assert!(!pg_ran(&db, offset, "after expiry"));

    let start = of_kind(&records, Kind::SessionStart);
    let principal = start[0].body.principal.as_ref().unwrap();
    assert_eq!(principal.token_exp, Some(exp as u64));
    let end = of_kind(&records, Kind::SessionEnd);
    assert_eq!(end.len(), 1);
    assert_eq!(end[0].body.outcome, Some(Outcome::Denied));
    assert_eq!(
        end[0].body.detail.as_deref(),
        Some("token expired; 2 statements")
    );
    let cancels = of_kind(&records, Kind::Cancel);
    assert_eq!(cancels.len(), 1, "the running statement was cancelled");
    assert_eq!(cancels[0].body.session, start[0].body.session);
    assert_eq!(cancels[0].body.outcome, Some(Outcome::Success));
    assert!(cancels[0].seq < end[0].seq);
    let requests = of_kind(&records, Kind::Request);
    assert_eq!(requests.len(), 2);
    assert!(requests
        .iter()
        .all(|r| !r.body.pg_request().unwrap().text.contains("after expiry")));
    // Every statement has its response record; the cancelled one says it got no answer.
    assert_eq!(of_kind(&records, Kind::Response).len(), 2);
    // The client reconnects with a fresh token; the old one is refused.
    let Err(refused) = node.client(&token).await else {
        panic!("the old token is accepted");
    };
    assert!(refused.as_db_error().unwrap().message().contains("expired"));
    let (fresh, _conn) = node.client(&agent_token().await).await.unwrap();
    fresh.simple_query("SELECT 1").await.unwrap();
}

/// A client that stops reading cannot keep its session, and the target's transaction, past its
/// token: the gateway was writing an answer the client does not take when the token expired.
/// The session ends on record; the gateway adds no error after the part of a message the
/// client has, and the target's backend goes (its transaction rolled back).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t23b_a_session_whose_client_stopped_reading_ends_when_its_token_expires() {
    let node = TestNode::start(NodeOptions::default()).await;
    let exp = now_secs() + 2;
    let token = forge(
        &with(&base_claims(), "exp", json!(exp)),
        env().get("VIGIL_OIDC_KID"),
        None,
    );
    let mut w = wire::Wire::connect_tls(
        node.port(),
        &[("user", "agent"), ("database", "app")],
        &token,
        Some(4096),
    )
    .await
    .unwrap_or_else(|e| panic!("session refused: {:?}", e.error()));
    let marker = format!("stalled-{}", random_suffix());
    w.send(&wire::query(&format!(
        "BEGIN; SELECT '{marker}', repeat('z', 8000) FROM generate_series(1, 5000)"
    )))
    .await;
    // The client reads nothing.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(LEEWAY as u64 + 20);
    let end = loop {
        let records = node.records().await;
        if let Some(end) = of_kind(&records, Kind::SessionEnd).first() {
            break (*end).clone();
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the session outlived its token"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    assert_eq!(end.body.outcome, Some(Outcome::Denied));
    assert!(
        end.body
            .detail
            .as_deref()
            .is_some_and(|d| d.starts_with("token expired")),
        "{:?}",
        end.body.detail
    );
    // What the client got: whole messages, then at most one cut short (the write under way
    // at the expiry), with nothing of the gateway's after or inside it.
    let got = w.until_closed().await;
    let mut rest = &got[..];
    while rest.len() >= 5 {
        let len = u32::from_be_bytes(rest[1..5].try_into().unwrap()) as usize;
        if rest.len() < 1 + len {
            assert!(
                !String::from_utf8_lossy(rest).contains("token expired"),
                "the gateway's error inside a message cut short"
            );
            break;
        }
        rest = &rest[1 + len..];
    }
    // The target's backend for it is gone (the marker is in its query, not in this one's).
    let admin = direct_superuser(&node.files.db).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let rows = admin
            .query(
                "SELECT count(*) FROM pg_stat_activity WHERE query LIKE '%' || $1 || '%' \
                 AND pid <> pg_backend_pid()",
                &[&marker],
            )
            .await
            .unwrap();
        if rows[0].get::<_, i64>(0) == 0 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the target's backend ends"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    drop(w);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t24_with_session_expiry_none_a_session_outlives_its_token() {
    let node = TestNode::start(NodeOptions {
        identity_extra: r#"session_expiry = "none""#,
        ..NodeOptions::default()
    })
    .await;
    let db = node.files.db.clone();
    let exp = now_secs() + 1;
    let token = forge(
        &with(&base_claims(), "exp", json!(exp)),
        env().get("VIGIL_OIDC_KID"),
        None,
    );
    let offset = pg_log_len();
    let (client, _conn) = node.client(&token).await.expect("the token is valid now");
    client.simple_query("SELECT 'before expiry'").await.unwrap();
    let wait = (exp + LEEWAY + 2 - now_secs()).max(0) as u64;
    tokio::time::sleep(Duration::from_secs(wait)).await;
    client
        .simple_query("SELECT 'after expiry'")
        .await
        .expect("the session outlives its token");
    eventually("the target ran it", Duration::from_secs(5), || {
        pg_ran(&db, offset, "after expiry")
    })
    .await;
    // A new login with the same token is still refused.
    let Err(refused) = node.client(&token).await else {
        panic!("the expired token is accepted");
    };
    assert!(refused.as_db_error().unwrap().message().contains("expired"));
    drop(client);
    let records = node.records_after_sessions(1).await;
    let end = of_kind(&records, Kind::SessionEnd);
    assert_eq!(end[0].body.outcome, Some(Outcome::Success));
    assert!(of_kind(&records, Kind::Cancel).is_empty());
}
