//! t1x: the PostgreSQL gateway end to end, with stock clients, against real PostgreSQL and a
//! real OIDC provider.

use futures_util::{SinkExt, StreamExt};
use std::process::Command;
use std::time::Duration;
use vigil_chaos::*;
use vigil_proto::record::{Kind, Outcome};

fn psql(node: &TestNode, token: &str, args: &[&str]) -> std::process::Output {
    Command::new("psql")
        .env("PGPASSWORD", token)
        .env("PGSSLMODE", "require")
        .env("PGAPPNAME", "weekly-report")
        .args([
            "-h",
            "127.0.0.1",
            "-p",
            &node.port().to_string(),
            "-U",
            "agent",
            "-d",
            "app",
            "-X",
            "-v",
            "ON_ERROR_STOP=0",
        ])
        .args(args)
        .output()
        .expect("psql runs")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t10_psql_session_is_audited_verified_and_replayable() {
    let node = TestNode::start(NodeOptions::default()).await;
    let token = agent_token().await;
    let out = psql(
        &node,
        &token,
        &[
            "-c",
            "SELECT name FROM customers WHERE id <= 2 ORDER BY id",
            "-c",
            "SELECT 1/0",
            "-c",
            "UPDATE customers SET name = 'renamed' WHERE id = 3",
        ],
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stdout.contains("customer 1") && stdout.contains("UPDATE 1"),
        "{stdout}{stderr}"
    );
    assert!(stderr.contains("division by zero"), "{stderr}");

    let records = node.records_after_sessions(1).await;
    let start = of_kind(&records, Kind::SessionStart);
    assert_eq!(start.len(), 1);
    let p = start[0].body.principal.as_ref().unwrap();
    assert_eq!(p.subject, "agent-reporting");
    assert_eq!(p.model.as_deref(), Some("gpt-5"));
    assert_eq!(p.model_version.as_deref(), Some("2026-08"));
    assert_eq!(p.intent.as_deref(), Some("weekly-report"));
    assert_eq!(p.token_type, "access_token");
    assert!(start[0].body.connection.as_ref().unwrap().client_tls);
    let requests = of_kind(&records, Kind::Request);
    let responses = of_kind(&records, Kind::Response);
    assert_eq!(requests.len(), 3);
    assert_eq!(responses.len(), 3);
    for (req, resp) in requests.iter().zip(&responses) {
        assert_eq!(req.body.stmt, resp.body.stmt);
        assert!(req.seq < resp.seq);
        assert!(req.body.principal.is_some() && req.body.connection.is_some());
    }
    let r0 = responses[0].body.pg_response().unwrap();
    assert_eq!(r0.tags, vec!["SELECT 2"]);
    assert_eq!(r0.columns, vec!["name"]);
    assert_eq!(r0.result[1][0].as_deref(), Some("customer 2"));
    let r1 = responses[1].body.pg_response().unwrap();
    assert_eq!(responses[1].body.outcome, Some(Outcome::Error));
    assert_eq!(r1.error.as_ref().unwrap().sqlstate, "22012");
    assert_eq!(of_kind(&records, Kind::SessionEnd).len(), 1);

    let dir = node.files.audit_dir.to_str().unwrap().to_string();
    let (code, report) = vigil(&["audit", "verify", "--log", &dir]);
    assert_eq!(code, 0, "{report}");
    let session = start[0].body.session.clone().unwrap();
    let (code, replay) = vigil(&["replay", &session[..8], "--log", &dir]);
    assert_eq!(code, 0, "{replay}");
    for needle in [
        "agent-reporting",
        "gpt-5 2026-08",
        "weekly-report",
        "SELECT name FROM customers",
        "customer 2",
        "22012 division by zero",
        "UPDATE 1",
    ] {
        assert!(
            replay.contains(needle),
            "replay lacks {needle:?}:\n{replay}"
        );
    }
    let (code, list) = vigil(&["sessions", "--log", &dir]);
    assert_eq!(code, 0);
    assert!(list.contains(&session), "{list}");
    node.node.shutdown().await;
    let records = node.files.records();
    assert_eq!(records.last().unwrap().body.kind, Kind::StreamEnd);
}

/// The response record that carries an error with this SQLSTATE.
fn response_with_error<'a>(
    responses: &[&'a vigil_proto::record::Record],
    sqlstate: &str,
) -> Option<&'a vigil_proto::record::Record> {
    responses.iter().copied().find(|r| {
        r.body
            .pg_response()
            .and_then(|x| x.error.as_ref())
            .is_some_and(|e| e.sqlstate == sqlstate)
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t11_extended_protocol_prepared_statements_transactions() {
    let node = TestNode::start(NodeOptions::default()).await;
    let (client, _conn) = node.client(&agent_token().await).await.unwrap();
    client
        .batch_execute("CREATE TABLE t (id int PRIMARY KEY, v text)")
        .await
        .unwrap();
    let insert = client
        .prepare("INSERT INTO t (id, v) VALUES ($1, $2)")
        .await
        .unwrap();
    for i in 0..200 {
        client
            .execute(&insert, &[&i, &format!("value {i}")])
            .await
            .unwrap();
    }
    let select = client
        .prepare("SELECT v FROM t WHERE id = $1")
        .await
        .unwrap();
    for i in [0, 17, 199] {
        let row = client.query_one(&select, &[&i]).await.unwrap();
        assert_eq!(row.get::<_, String>(0), format!("value {i}"));
    }
    // Transactions: a rollback leaves nothing, a commit stays.
    client
        .batch_execute("BEGIN; DELETE FROM t; ROLLBACK")
        .await
        .unwrap();
    let n: i64 = client
        .query_one("SELECT count(*) FROM t", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 200);
    let mut tx_client = client;
    let tx = tx_client.transaction().await.unwrap();
    tx.execute("DELETE FROM t WHERE id >= $1", &[&100i32])
        .await
        .unwrap();
    tx.commit().await.unwrap();
    let n: i64 = tx_client
        .query_one("SELECT count(*) FROM t", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 100);
    // A multi-statement query with an error in the middle: the rest does not run, the session
    // stays usable.
    let err = tx_client
        .simple_query("SELECT 1; SELECT 1/0; SELECT 3")
        .await
        .unwrap_err();
    assert_eq!(err.code().unwrap().code(), "22012");
    let rows = tx_client.simple_query("SELECT 42").await.unwrap();
    assert!(
        matches!(&rows[1], tokio_postgres::SimpleQueryMessage::Row(r) if r.get(0) == Some("42"))
    );
    // An error in the extended protocol is attributed and the session continues.
    let err = tx_client
        .query("SELECT * FROM missing_table", &[])
        .await
        .unwrap_err();
    assert_eq!(err.code().unwrap().code(), "42P01");
    tx_client.query_one("SELECT 1", &[]).await.unwrap();

    let records = node.records().await;
    let requests = of_kind(&records, Kind::Request);
    let responses = of_kind(&records, Kind::Response);
    let inserts: Vec<_> = requests
        .iter()
        .filter(|r| {
            r.body
                .pg_request()
                .unwrap()
                .text
                .starts_with("INSERT INTO t")
        })
        .collect();
    assert_eq!(inserts.len(), 200, "one request record per execution");
    let q = inserts[7].body.pg_request().unwrap();
    assert_eq!(q.mode, "extended");
    // The record names its protocol, in the form a SIEM reads it.
    let raw: serde_json::Value = serde_json::to_value(inserts[7]).unwrap();
    assert_eq!(raw["v"], vigil_proto::record::SCHEMA_VERSION);
    assert_eq!(raw["request"]["protocol"], "postgres", "{raw}");
    assert_eq!(raw["request"]["mode"], "extended", "{raw}");
    assert_eq!(raw["connection"]["protocol"], "postgres", "{raw}");
    assert_eq!(q.params.as_ref().unwrap()[1].as_deref(), Some("value 7"));
    let multi =
        response_with_error(&responses, "22012").expect("the multi-statement error is recorded");
    assert_eq!(multi.body.pg_response().unwrap().tags, vec!["SELECT 1"]);
    let missing =
        response_with_error(&responses, "42P01").expect("the extended-protocol error is recorded");
    assert_eq!(missing.body.outcome, Some(Outcome::Error));
    assert_eq!(
        missing.body.pg_request().unwrap().text,
        "SELECT * FROM missing_table",
        "a statement that failed to parse is recorded with its text"
    );
    // Every request has exactly one response.
    let mut req_stmts: Vec<_> = requests.iter().map(|r| r.body.stmt).collect();
    let mut resp_stmts: Vec<_> = responses
        .iter()
        .filter(|r| r.body.request.is_none())
        .map(|r| r.body.stmt)
        .collect();
    req_stmts.sort();
    resp_stmts.sort();
    assert_eq!(req_stmts, resp_stmts);
}

/// A node that takes a token in clear (raw protocol sessions with `wire::Wire`), and the
/// agent's token.
async fn raw_session_node() -> (TestNode, String) {
    let node = TestNode::start(NodeOptions {
        allow_cleartext_token: true,
        ..NodeOptions::default()
    })
    .await;
    (node, agent_token().await)
}

/// A Sync the client sends after PostgreSQL failed its `COPY … FROM STDIN` and before its
/// CopyDone cannot be placed: PostgreSQL ignored it if it read it while still copying and
/// answers it if it read it after. Taken as ignored, every later answer was recorded for the
/// statement after its own (outside review, 2026-12-07). The session ends instead, saying why.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t12b_a_sync_after_a_failed_copy_in_ends_the_session() {
    use vigil_chaos::wire::{self, Msg, Wire};
    let (node, token) = raw_session_node().await;
    let mut w = Wire::app_session(node.port(), &token).await;
    w.batch(&[wire::query("CREATE TABLE cp (id int, v text)")])
        .await;
    w.send(
        &[
            wire::query("COPY cp FROM STDIN"),
            wire::typed(b'd', b"notanint\tx\n"),
        ]
        .concat(),
    )
    .await;
    let failed = w.until_ready().await;
    let (code, _) = failed.iter().find_map(Msg::error).expect("the copy fails");
    assert_eq!(code, "22P02");
    w.send(
        &[
            wire::sync(),
            wire::typed(b'c', b""),
            wire::query("SELECT 'after'"),
        ]
        .concat(),
    )
    .await;
    tokio::time::timeout(Duration::from_secs(20), w.until_closed())
        .await
        .expect("the session ends");
    let records = node.records_after_sessions(1).await;
    let end = of_kind(&records, Kind::SessionEnd);
    let detail = end[0].body.detail.clone().unwrap_or_default();
    assert!(
        detail.contains("the client sent Sync after the target failed its COPY FROM STDIN"),
        "{detail}"
    );
}

/// A FunctionCall inside an extended-protocol batch, before its Sync: PostgreSQL answers it
/// with ReadyForQuery like a Query, and the gateway's refusal of it (a Query stand-in) is such
/// a sync point too. The batch had stayed buffered behind it and the next Execute waited for
/// the stand-in's answer forever (outside review, 2026-12-07).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t12c_a_function_call_inside_an_extended_batch_is_refused_and_the_batch_goes_on() {
    use vigil_chaos::wire::{self, Wire};
    let (node, token) = raw_session_node().await;
    let offset = pg_log_len();
    let mut w = Wire::app_session(node.port(), &token).await;
    let mut call = Vec::new();
    call.extend_from_slice(&957u32.to_be_bytes()); // any function oid
    call.extend_from_slice(&[0, 0, 0, 0, 0, 0]); // no formats, no arguments, text result
    w.send(
        &[
            wire::parse("", "SELECT 'in the batch'"),
            wire::bind("", "", &[]),
            wire::typed(b'F', &call),
            wire::execute(""),
            wire::sync(),
        ]
        .concat(),
    )
    .await;
    let first = tokio::time::timeout(Duration::from_secs(20), w.until_ready())
        .await
        .expect("the FunctionCall is answered");
    let tags: Vec<u8> = first.iter().map(|m| m.tag).collect();
    assert_eq!(tags, b"12EZ", "{first:?}");
    assert_eq!(first[2].error().unwrap().0, "42501");
    // PostgreSQL ended the implicit transaction, and with it the portal: the gateway, which
    // follows what the target confirmed, no longer knows the portal and refuses the Execute.
    let second = tokio::time::timeout(Duration::from_secs(20), w.until_ready())
        .await
        .expect("the Execute after it is answered");
    let (code, message) = second
        .iter()
        .find_map(wire::Msg::error)
        .unwrap_or_else(|| panic!("{second:?}"));
    assert_eq!(code, "42501", "{message}");
    assert!(message.contains("what portal \"\" holds"), "{message}");
    let after = w.batch(&[wire::query("SELECT 'after'")]).await;
    assert_eq!(after.last().unwrap().tag, b'Z');
    let ran: Vec<String> = pg_executed(&node.files.db, offset)
        .into_iter()
        .map(|r| r.text)
        .collect();
    assert_eq!(ran, vec!["SELECT 'after'".to_string()], "{ran:?}");
    let records = node.records().await;
    let blocked: Vec<String> = of_kind(&records, Kind::Blocked)
        .into_iter()
        .map(|r| r.body.pg_request().unwrap().mode.clone())
        .collect();
    assert_eq!(blocked, ["function_call", "extended"], "{records:#?}");
}

/// A Query inside COPY FROM STDIN data: PostgreSQL fails the copy on it and discards it
/// without an answer, so the gateway, which expected one, would have recorded the next
/// statement's answer for it. The session ends instead, whether the Query came in the same
/// write as the COPY or after the target started the copy.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t12d_a_message_inside_copy_in_data_ends_the_session() {
    use vigil_chaos::wire::{self, Wire};
    let (node, token) = raw_session_node().await;
    let offset = pg_log_len();
    for pipelined in [true, false] {
        let mut w = Wire::app_session(node.port(), &token).await;
        w.batch(&[wire::query("CREATE TABLE IF NOT EXISTS cq (id int)")])
            .await;
        if pipelined {
            w.send(
                &[
                    wire::query("COPY cq FROM STDIN"),
                    wire::typed(b'd', b"1\n"),
                    wire::query("SELECT 'inside the copy'"),
                ]
                .concat(),
            )
            .await;
        } else {
            w.send(&wire::query("COPY cq FROM STDIN")).await;
            assert_eq!(w.read().await.tag, b'G');
            w.send(
                &[
                    wire::typed(b'd', b"1\n"),
                    wire::query("SELECT 'inside the copy'"),
                ]
                .concat(),
            )
            .await;
        }
        tokio::time::timeout(Duration::from_secs(20), w.until_closed())
            .await
            .expect("the session ends");
    }
    let ran: Vec<String> = pg_executed(&node.files.db, offset)
        .into_iter()
        .map(|r| r.text)
        .collect();
    assert!(
        !ran.iter().any(|t| t.contains("inside the copy")),
        "{ran:?}"
    );
    let records = node.records_after_sessions(2).await;
    let ends: Vec<String> = of_kind(&records, Kind::SessionEnd)
        .into_iter()
        .filter_map(|r| r.body.detail.clone())
        .collect();
    assert_eq!(ends.len(), 2, "{ends:?}");
    for detail in ends {
        assert!(
            detail.contains("a message other than COPY data")
                && detail.contains("the session ends"),
            "{detail}"
        );
    }
    // The statement sent inside the copy, recorded as requested, has its answer on record:
    // none, as the session ended first.
    let inside: Vec<_> = of_kind(&records, Kind::Request)
        .into_iter()
        .filter(|r| r.body.pg_request().unwrap().text == "SELECT 'inside the copy'")
        .filter_map(|r| r.body.stmt.map(|n| (r.body.session.clone(), n)))
        .collect();
    for (session, stmt) in &inside {
        assert!(
            records.iter().any(|r| r.body.kind == Kind::Response
                && &r.body.session == session
                && r.body.stmt == Some(*stmt)),
            "no response record for {session:?} {stmt}: {records:#?}"
        );
    }
    // The copied row was not written: the copy failed.
    let (client, _conn) = node.client(&token).await.unwrap();
    let n: i64 = client
        .query_one("SELECT count(*) FROM cq", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t12_copy_in_and_out() {
    let node = TestNode::start(NodeOptions::default()).await;
    let (client, _conn) = node.client(&agent_token().await).await.unwrap();
    client
        .batch_execute("CREATE TABLE c (id int, v text)")
        .await
        .unwrap();
    let sink = client.copy_in("COPY c FROM STDIN").await.unwrap();
    futures_util::pin_mut!(sink);
    let mut data = String::new();
    for i in 0..1000 {
        data.push_str(&format!("{i}\trow {i}\n"));
    }
    sink.send(bytes::Bytes::from(data.clone())).await.unwrap();
    let n = sink.finish().await.unwrap();
    assert_eq!(n, 1000);
    let stream = client.copy_out("COPY c TO STDOUT").await.unwrap();
    futures_util::pin_mut!(stream);
    let mut out = Vec::new();
    while let Some(chunk) = stream.next().await {
        out.extend_from_slice(&chunk.unwrap());
    }
    assert_eq!(String::from_utf8(out).unwrap(), data);
    // The copy-out stream ends at CopyDone; the next query proves the command completed.
    client.simple_query("SELECT 1").await.unwrap();
    let records = node.records().await;
    let copies: Vec<_> = of_kind(&records, Kind::Response)
        .into_iter()
        .filter(|r| {
            r.body
                .pg_response()
                .unwrap()
                .tags
                .iter()
                .any(|t| t == "COPY 1000")
        })
        .collect();
    assert_eq!(
        copies.len(),
        2,
        "COPY in and COPY out are both recorded: {records:#?}"
    );
    for c in copies {
        assert!(c.body.pg_response().unwrap().bytes >= data.len() as u64);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t13_cancel_reaches_the_right_backend() {
    let node = TestNode::start(NodeOptions::default()).await;
    let token = agent_token().await;
    let (client, _conn) = node.client(&token).await.unwrap();
    let (other, _conn2) = node.client(&token).await.unwrap();
    let cancel = client.cancel_token();
    let sleeper = tokio::spawn(async move { client.simple_query("SELECT pg_sleep(30)").await });
    tokio::time::sleep(Duration::from_millis(500)).await;
    cancel.cancel_query(tls_connector()).await.unwrap();
    let res = tokio::time::timeout(Duration::from_secs(10), sleeper)
        .await
        .expect("the cancel ends the query")
        .unwrap();
    assert_eq!(res.unwrap_err().code().unwrap().code(), "57014");
    // The other session was not cancelled.
    other.simple_query("SELECT 1").await.unwrap();
    let records = node.records().await;
    let cancels = of_kind(&records, Kind::Cancel);
    assert_eq!(cancels.len(), 1);
    assert_eq!(cancels[0].body.outcome, Some(Outcome::Success));
    let session = cancels[0].body.session.clone();
    let sleep_req = of_kind(&records, Kind::Request)
        .into_iter()
        .find(|r| r.body.pg_request().unwrap().text.contains("pg_sleep"))
        .unwrap();
    assert_eq!(sleep_req.body.session, session);
}

/// A cancel needs no login: a flood of made-up keys is recorded 20 a second at most, the rest
/// are counted, and the next one on record says how many were not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t13b_a_flood_of_made_up_cancels_does_not_fill_the_audit_log() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let node = TestNode::start(NodeOptions::default()).await;
    let port = node.port();
    let send = |pid: i32| async move {
        let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .unwrap();
        let packet: Vec<u8> = [16, 80_877_102, pid, 7]
            .iter()
            .flat_map(|n: &i32| n.to_be_bytes())
            .collect();
        s.write_all(&packet).await.unwrap();
        // The node closes the connection once the cancel is handled.
        let _ = s.read(&mut [0u8; 1]).await;
    };
    let denied = |records: &[vigil_proto::record::Record]| -> Vec<String> {
        of_kind(records, Kind::Cancel)
            .into_iter()
            .filter(|r| r.body.outcome == Some(Outcome::Denied))
            .map(|r| r.body.detail.clone().unwrap_or_default())
            .collect()
    };
    let started = std::time::Instant::now();
    for pid in 0..200 {
        send(pid).await;
    }
    let seconds = started.elapsed().as_secs() as usize + 1;
    // Every cancel is on record or counted.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let (recorded, unrecorded) = loop {
        let recorded = denied(&node.records().await).len();
        let unrecorded = metric(&node.metrics().await, "vigil_cancels_unrecorded_total") as usize;
        if recorded + unrecorded == 200 {
            break (recorded, unrecorded);
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{recorded} recorded and {unrecorded} counted of 200"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(
        recorded <= 20 * seconds,
        "{recorded} records in {seconds} s"
    );
    assert!(
        unrecorded > 0,
        "200 cancels in {seconds} s: some only counted"
    );
    tokio::time::sleep(Duration::from_millis(1100)).await;
    send(1000).await;
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let details = denied(&node.records().await);
        if details.len() == recorded + 1 {
            let last = details.last().unwrap();
            assert!(
                last.contains("denied cancels before this one were not recorded one by one"),
                "{last}"
            );
            break;
        }
        assert!(std::time::Instant::now() < deadline, "{details:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn pgbench(node: &TestNode, token: &str, args: &[&str]) -> String {
    let out = Command::new("pgbench")
        .env("PGPASSWORD", token)
        .env("PGSSLMODE", "require")
        .args([
            "-h",
            "127.0.0.1",
            "-p",
            &node.port().to_string(),
            "-U",
            "agent",
        ])
        .args(args)
        .arg("app")
        .output()
        .expect("pgbench runs");
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "pgbench {args:?} failed:\n{text}");
    text
}

/// A row the target sends is held whole while the gateway looks at it. One over
/// `max_target_message_bytes` ends the session with a clear error and is on record as having
/// run; large rows under it share the node's `target_message_memory_bytes`: a session whose
/// row does not fit waits for the memory, and every row arrives whole.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t13c_large_rows_are_bounded_by_the_node_s_memory_for_them() {
    const MIB: usize = 1 << 20;
    let node = TestNode::start(NodeOptions {
        postgres_extra: "max_target_message_bytes = 4194304\ntarget_message_memory_bytes = 5242880",
        ..Default::default()
    })
    .await;
    let token = agent_token().await;
    let offset = pg_log_len();

    // Three sessions at once, each reading 3 MiB rows: two never fit together.
    let mut readers = Vec::new();
    for i in 0..3 {
        let (client, _task) = node.client(&token).await.unwrap();
        readers.push(tokio::spawn(async move {
            for round in 0..4 {
                let fill = format!("{}", (i * 4 + round) % 10);
                let row = client
                    .query_one(
                        "SELECT repeat($1, 3 * 1048576) AS big, 'after' AS tail",
                        &[&fill],
                    )
                    .await
                    .unwrap();
                let big: String = row.get(0);
                assert_eq!(big.len(), 3 * MIB);
                assert!(big.bytes().all(|b| b == fill.as_bytes()[0]));
                assert_eq!(row.get::<_, String>(1), "after");
            }
        }));
    }
    for r in readers {
        tokio::time::timeout(Duration::from_secs(60), r)
            .await
            .expect("every session gets its rows")
            .unwrap();
    }
    assert_eq!(
        metric(&node.metrics().await, "vigil_target_message_memory_bytes"),
        0.0,
        "all memory lent to large rows is given back"
    );

    // Over the limit: the session ends with 54000; the statement ran and says so.
    let (client, task) = node.client(&token).await.unwrap();
    let err = client
        .simple_query("SELECT repeat('z', 5 * 1048576) AS too_big")
        .await
        .expect_err("a 5 MiB row is over the limit");
    let db = err.as_db_error().expect("an error from the gateway");
    assert_eq!(db.code().code(), "54000");
    assert!(
        db.message()
            .contains("postgres.max_target_message_bytes = 4194304"),
        "{}",
        db.message()
    );
    assert!(client.is_closed() || client.simple_query("SELECT 1").await.is_err());
    let _ = task.await;
    let ran: Vec<String> = pg_executed(&node.files.db, offset)
        .into_iter()
        .map(|r| r.text)
        .collect();
    assert!(
        ran.contains(&"SELECT repeat('z', 5 * 1048576) AS too_big".to_string()),
        "{ran:?}"
    );

    let records = node.records_after_sessions(4).await;
    let too_big = of_kind(&records, Kind::Response)
        .into_iter()
        .find_map(|r| {
            let e = r.body.pg_response()?.error.clone()?;
            (e.sqlstate == "54000").then_some((r.body.outcome, e.message))
        })
        .expect("the statement's response record");
    assert_eq!(too_big.0, Some(Outcome::Error));
    // The row's length field: itself, the column count, the value's length, the value.
    let declared = 4 + 2 + 4 + 5 * MIB;
    assert!(
        too_big.1.contains(&format!(
            "the target sent a message of {declared} bytes, over postgres.max_target_message_bytes (4194304)"
        )),
        "{}",
        too_big.1
    );
    let ends: Vec<String> = of_kind(&records, Kind::SessionEnd)
        .into_iter()
        .filter(|r| r.body.outcome == Some(Outcome::Error))
        .filter_map(|r| r.body.detail.clone())
        .collect();
    assert_eq!(ends.len(), 1, "{ends:?}");
    assert!(
        ends[0].contains("over postgres.max_target_message_bytes"),
        "{ends:?}"
    );
    // Twelve rows of 3 MiB went through, on record.
    let big_rows = of_kind(&records, Kind::Response)
        .into_iter()
        .filter(|r| {
            r.body
                .pg_response()
                .is_some_and(|p| p.rows == 1 && p.bytes > 3 * MIB as u64)
        })
        .count();
    assert_eq!(big_rows, 12);
}

/// A message over 1 MiB holds the node's memory for large messages until the client has taken
/// it. A client that stops reading cannot hold it on: past `client_read_grace_secs` plus the
/// message's length at `min_client_read_bytes_per_sec`, its session ends and the memory is
/// given back. A client that reads gets the same message whole under the same settings.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t13d_a_client_that_stops_reading_gives_back_the_memory_of_a_large_row() {
    const MIB: usize = 1 << 20;
    let node = TestNode::start(NodeOptions {
        allow_cleartext_token: true,
        postgres_extra: "client_read_grace_secs = 1\nmin_client_read_bytes_per_sec = 67108864",
        ..Default::default()
    })
    .await;
    let token = agent_token().await;
    let select = "SELECT repeat('x', 40 * 1048576) AS big";
    let (client, _task) = node.client(&token).await.unwrap();
    let row = client.query_one(select, &[]).await.unwrap();
    assert_eq!(row.get::<_, String>(0).len(), 40 * MIB);
    drop(client);

    // Sends the statement, then reads nothing.
    let mut w = vigil_chaos::wire::Wire::app_session(node.port(), &token).await;
    w.send(&vigil_chaos::wire::query(select)).await;
    let started = std::time::Instant::now();
    let ends = || async {
        of_kind(&node.records().await, Kind::SessionEnd)
            .into_iter()
            .filter_map(|r| Some((r.body.outcome?, r.body.detail.clone()?)))
            .filter(|(_, d)| d.contains("did not take"))
            .collect::<Vec<_>>()
    };
    let mut ended = ends().await;
    while ended.is_empty() {
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "the session ended"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
        ended = ends().await;
    }
    assert_eq!(ended[0].0, Outcome::Error);
    // 1 s of grace, then 40 MiB at 64 MiB/s: 1.6 s, said rounded up.
    let declared = 4 + 2 + 4 + 40 * MIB;
    assert!(
        ended[0].1.starts_with(&format!(
            "the client did not take a message of {} bytes within 2 s",
            declared + 1
        )),
        "{ended:?}"
    );
    assert_eq!(
        metric(&node.metrics().await, "vigil_target_message_memory_bytes"),
        0.0,
        "the memory is given back"
    );
    // The statement ran, and its response record says it was not passed on.
    let records = node.records().await;
    let responses: Vec<_> = of_kind(&records, Kind::Response)
        .into_iter()
        .filter_map(|r| r.body.pg_response())
        .collect();
    assert_eq!(responses.len(), 2, "{responses:?}");
    assert!(responses[1].error.is_some(), "{responses:?}");
    drop(w);
}

/// A client that reads its answers slower than the gateway writes them gets each one whole.
/// Over TLS, the gateway's last write of an answer can end on a full socket, with the last
/// records still in the TLS session's buffer: they must go once the client makes room, not
/// wait for a next write that never comes (the session hung there, the client waiting for
/// ReadyForQuery). The client's small receive buffer keeps the room the gateway finds in its
/// socket small; where an answer's last write falls against that room depends on the answer's
/// size, so the answers step through sizes by 64 KB, TLS's buffer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t13e_a_client_that_reads_slowly_over_tls_gets_each_answer_whole() {
    let node = TestNode::start(NodeOptions::default()).await;
    let token = agent_token().await;
    let offset = pg_log_len();
    let mut w = vigil_chaos::wire::Wire::connect_tls(
        node.port(),
        &[("user", "agent"), ("database", "app")],
        &token,
        Some(16 * 1024),
    )
    .await
    .unwrap_or_else(|e| panic!("session refused: {:?}", e.error()));
    const STEPS: usize = 24;
    let rows = |i: usize| 1_000 + i * 8;
    let size = |i: usize| rows(i) * 8_000;
    for i in 0..STEPS {
        let select = format!(
            "SELECT repeat('y', 8000) FROM generate_series(1, {})",
            rows(i)
        );
        w.send(&vigil_chaos::wire::query(&select)).await;
        let got = w
            .slowly_until_ready(64 * 1024, Duration::ZERO, Duration::from_secs(5))
            .await;
        // The row's message and the answer's others: RowDescription, CommandComplete,
        // ReadyForQuery.
        assert!(
            got.is_some_and(|n| n > size(i)),
            "the answer of {select} stopped short: {got:?}"
        );
    }
    let answer = w.batch(&[vigil_chaos::wire::query("SELECT 'after'")]).await;
    assert!(answer
        .iter()
        .any(|m| m.values() == vec![Some("after".to_string())]));
    drop(w);
    let ran = pg_executed(&node.files.db, offset)
        .into_iter()
        .filter(|r| r.text.starts_with("SELECT repeat('y', 8000)"))
        .count();
    assert_eq!(ran, STEPS);
    let records = node.records_after_sessions(1).await;
    let answered = of_kind(&records, Kind::Response)
        .into_iter()
        .filter_map(|r| r.body.pg_response())
        .filter(|p| p.rows >= 1_000 && p.bytes > 8_000_000)
        .count();
    assert_eq!(answered, STEPS);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t14_pgbench_init_and_all_query_modes() {
    let node = TestNode::start(NodeOptions::default()).await;
    let token = agent_token().await;
    // Initialisation goes through the gateway too: DDL, COPY in, VACUUM.
    pgbench(&node, &token, &["-i", "-s", "1", "-q"]);
    for mode in ["simple", "extended", "prepared"] {
        let out = pgbench(
            &node,
            &token,
            &["-S", "-M", mode, "-c", "4", "-j", "2", "-t", "100"],
        );
        assert!(out.contains("number of failed transactions: 0"), "{out}");
    }
    // The TPC-B-like default script: transactions with updates and inserts.
    let out = pgbench(&node, &token, &["-M", "prepared", "-c", "2", "-t", "50"]);
    assert!(out.contains("number of failed transactions: 0"), "{out}");
    let records = node.records().await;
    let updates = of_kind(&records, Kind::Request)
        .into_iter()
        .filter(|r| {
            r.body
                .pg_request()
                .unwrap()
                .text
                .contains("UPDATE pgbench_accounts")
        })
        .count();
    assert_eq!(updates, 100, "every executed UPDATE has its record");
    let dir = node.files.audit_dir.to_str().unwrap().to_string();
    let (code, report) = vigil(&["audit", "verify", "--log", &dir]);
    assert_eq!(code, 0, "{report}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t15_notices_and_notifications_pass_through() {
    let node = TestNode::start(NodeOptions::default()).await;
    let token = agent_token().await;
    let (client, mut conn) = tokio_postgres::connect(
        &format!("{} sslmode=require", node.conn_str(&token, "app")),
        tls_connector(),
    )
    .await
    .unwrap();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        let mut messages = futures_util::stream::poll_fn(move |cx| conn.poll_message(cx));
        while let Some(Ok(m)) = messages.next().await {
            let _ = tx.send(m);
        }
    });
    client.batch_execute("LISTEN vigil_events").await.unwrap();
    client
        .batch_execute("DO $$ BEGIN RAISE NOTICE 'hello from plpgsql'; END $$")
        .await
        .unwrap();
    let (other, _c) = node.client(&token).await.unwrap();
    other
        .batch_execute("NOTIFY vigil_events, 'payload-1'")
        .await
        .unwrap();
    client.batch_execute("SELECT 1").await.unwrap();
    let (mut notice, mut notification) = (false, false);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while !(notice && notification) && tokio::time::Instant::now() < deadline {
        match tokio::time::timeout(Duration::from_millis(200), rx.recv()).await {
            Ok(Some(tokio_postgres::AsyncMessage::Notice(n))) => {
                notice |= n.message() == "hello from plpgsql"
            }
            Ok(Some(tokio_postgres::AsyncMessage::Notification(n))) => {
                notification |= n.channel() == "vigil_events" && n.payload() == "payload-1"
            }
            Ok(Some(_)) => {}
            Ok(None) => break,
            Err(_) => {
                client.batch_execute("SELECT 1").await.unwrap();
            }
        }
    }
    assert!(notice, "the notice arrived");
    assert!(notification, "the notification arrived");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t16_cleartext_token_is_refused_without_tls() {
    let node = TestNode::start(NodeOptions::default()).await;
    let token = agent_token().await;
    let err = tokio_postgres::connect(
        &format!("{} sslmode=disable", node.conn_str(&token, "app")),
        tokio_postgres::NoTls,
    )
    .await
    .err()
    .expect("refused");
    let db = err.as_db_error().expect("a server error");
    assert_eq!(db.code().code(), "28000");
    assert!(db.message().contains("TLS is required"), "{}", db.message());
    let records = node.records().await;
    let denied = of_kind(&records, Kind::SessionStart);
    assert_eq!(denied[0].body.outcome, Some(Outcome::Denied));
    assert!(!denied[0].body.connection.as_ref().unwrap().client_tls);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t17_md5_login_to_the_target() {
    let node = TestNode::start(NodeOptions {
        md5_target: true,
        ..NodeOptions::default()
    })
    .await;
    let su = direct_superuser(&node.files.db).await;
    su.batch_execute(&format!(
        "GRANT SELECT ON customers TO {}",
        env().get("VIGIL_PG_MD5_USER")
    ))
    .await
    .unwrap();
    let (client, _c) = node.client(&agent_token().await).await.unwrap();
    let row = client
        .query_one("SELECT current_user::text, count(*) FROM customers", &[])
        .await
        .unwrap();
    assert_eq!(row.get::<_, String>(0), env().get("VIGIL_PG_MD5_USER"));
    assert_eq!(row.get::<_, i64>(1), 50);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t18_unknown_connection_and_access_rules() {
    let node = TestNode::start(NodeOptions::default()).await;
    let token = agent_token().await;
    let err = connect_tls(&node.conn_str(&token, "nope"))
        .await
        .err()
        .unwrap();
    assert_eq!(err.code().unwrap().code(), "3D000");
    let denied = token_for("agent-denied", "agent-denied-secret").await;
    let err = node.client(&denied).await.err().unwrap();
    assert_eq!(err.code().unwrap().code(), "28000");
    let message = err.as_db_error().unwrap().message();
    assert!(message.contains("not allowed"), "{message}");
    // People: an ID token from the authorization-code flow; alice is in group dba.
    let alice = id_token("alice");
    let (client, _c) = node
        .client(&alice)
        .await
        .unwrap_or_else(|e| panic!("alice's ID token: {e:?}"));
    client.simple_query("SELECT 1").await.unwrap();
    let bob = id_token("bob");
    let err = node.client(&bob).await.err().unwrap();
    assert_eq!(err.code().unwrap().code(), "28000");
    let records = node.records().await;
    let starts = of_kind(&records, Kind::SessionStart);
    let outcomes: Vec<_> = starts
        .iter()
        .map(|r| {
            (
                r.body.principal.as_ref().map(|p| p.subject.clone()),
                r.body.outcome,
            )
        })
        .collect();
    assert_eq!(
        outcomes,
        vec![
            (Some("agent-reporting".into()), Some(Outcome::Denied)),
            (Some("agent-denied".into()), Some(Outcome::Denied)),
            (Some("alice".into()), Some(Outcome::Success)),
            (Some("bob".into()), Some(Outcome::Denied)),
        ]
    );
    let alice_rec = starts[2].body.principal.as_ref().unwrap();
    assert_eq!(alice_rec.token_type, "id_token");
    assert_eq!(alice_rec.groups, vec!["dba", "approvers"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t19_tls_to_the_target() {
    let token = agent_token().await;
    for mode in ["require", "verify-full"] {
        let node = TestNode::start(NodeOptions {
            target_tls: mode,
            ..NodeOptions::default()
        })
        .await;
        let (client, _c) = node.client(&token).await.unwrap();
        let row = client
            .query_one(
                "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
                &[],
            )
            .await
            .unwrap();
        assert!(row.get::<_, bool>(0), "{mode}: the target leg is encrypted");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t1a_large_results_are_truncated_with_a_digest_of_the_rest() {
    use sha2::{Digest, Sha256};
    let node = TestNode::start(NodeOptions {
        max_result_bytes: 200,
        ..NodeOptions::default()
    })
    .await;
    let (client, _c) = node.client(&agent_token().await).await.unwrap();
    let sql = "SELECT id::text, email FROM customers ORDER BY id";
    let rows: Vec<(String, String)> = client
        .simple_query(sql)
        .await
        .unwrap()
        .into_iter()
        .filter_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(r) => {
                Some((r.get(0).unwrap().to_string(), r.get(1).unwrap().to_string()))
            }
            _ => None,
        })
        .collect();
    assert_eq!(rows.len(), 50);
    let records = node.records().await;
    let resp = of_kind(&records, Kind::Response)
        .into_iter()
        .find(|r| r.body.pg_response().unwrap().rows == 50)
        .expect("the response record")
        .body
        .pg_response()
        .cloned()
        .unwrap();
    assert!(resp.truncated);
    let kept = resp.result.len();
    assert!(kept > 0 && kept < 50, "kept {kept} rows within 200 bytes");
    for (i, row) in resp.result.iter().enumerate() {
        assert_eq!(row[0].as_deref(), Some(rows[i].0.as_str()));
        assert_eq!(row[1].as_deref(), Some(rows[i].1.as_str()));
    }
    // The digest covers exactly the DataRow bodies that were not recorded.
    let mut h = Sha256::new();
    for (id, email) in &rows[kept..] {
        h.update(2i16.to_be_bytes());
        for v in [id, email] {
            h.update((v.len() as i32).to_be_bytes());
            h.update(v.as_bytes());
        }
    }
    assert_eq!(
        resp.digest.as_deref(),
        Some(hex::encode(h.finalize()).as_str())
    );
}

/// A role's password set through the gateway is in no record: `CREATE ROLE … PASSWORD` on the
/// simple protocol and `ALTER ROLE … ENCRYPTED PASSWORD` on the extended one are recorded with
/// `'[redacted]'` in its place (counted as a `secret` in `masked`), while the target gets them
/// as sent: PostgreSQL's own log shows both ran, and the new password logs in. A password
/// given without quotes (a syntax error) is taken out of the statement and of the target's
/// error, which quotes it.
#[tokio::test]
async fn a_password_set_through_the_gateway_is_in_no_record() {
    let e = env();
    let su = direct_superuser("app").await;
    let suffix = random_suffix();
    let (admin, admin_pw) = (format!("vt_admin_{suffix}"), format!("Adm1n-{suffix}"));
    su.batch_execute(&format!(
        "CREATE ROLE {admin} LOGIN CREATEROLE PASSWORD '{admin_pw}'"
    ))
    .await
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let pw_file = dir.path().join("admin-password");
    std::fs::write(&pw_file, &admin_pw).unwrap();
    // A connection whose login may create roles, beside the usual one.
    let extra: &'static str = Box::leak(
        format!(
            r#"
[[postgres.connections]]
name = "roles"
host = "{host}"
port = {port}
database = "app"
user = "{admin}"
password = {{ file = "{pw}" }}
tls = "disable"
allow = {{ client_ids = ["agent-reporting"] }}
"#,
            host = e.get("VIGIL_PG_HOST"),
            port = e.get("VIGIL_PG_PORT"),
            pw = pw_file.display(),
        )
        .into_boxed_str(),
    );
    let node = TestNode::start(NodeOptions {
        extra,
        ..NodeOptions::default()
    })
    .await;
    let (client, conn) = connect_tls(&node.conn_str(&agent_token().await, "roles"))
        .await
        .unwrap();
    let offset = pg_log_len();
    let role = format!("vt_app_{suffix}");
    let (first, second) = (format!("Fir5t-{suffix}"), format!("S3cond-{suffix}"));
    client
        .batch_execute(&format!("CREATE ROLE {role} LOGIN PASSWORD '{first}'"))
        .await
        .unwrap();
    client
        .execute(
            &format!("ALTER ROLE {role} WITH ENCRYPTED PASSWORD '{second}'"),
            &[],
        )
        .await
        .unwrap();
    // Without quotes: a syntax error, whose message quotes the password.
    let third = format!("th1rd_{suffix}");
    let refused = client
        .batch_execute(&format!("ALTER ROLE {role} PASSWORD {third}"))
        .await
        .expect_err("a syntax error");
    let said = refused.as_db_error().map(|e| e.message().to_string());
    assert!(
        said.as_deref().is_some_and(|m| m.contains(&third)),
        "{refused}"
    );
    // A string may be SQL that runs (a `DO` body): what could end it there is never taken out
    // with a password, so the DELETE stays on record (an outside review hid it behind
    // `http://u:[redacted]@h`).
    let scratch = format!("vt_scratch_{suffix}");
    let hidden =
        format!("DO $$BEGIN PERFORM 'http://u:'; DELETE FROM {scratch}; PERFORM '@h'; END$$");
    client
        .batch_execute(&format!("CREATE TEMP TABLE {scratch} (x int)"))
        .await
        .unwrap();
    client.batch_execute(&hidden).await.unwrap();
    drop(client);
    let _ = conn.await;
    // The target got them as sent: its log ran both, and the second password logs in.
    let ran: Vec<String> = pg_executed("app", offset)
        .into_iter()
        .map(|r| r.text)
        .collect();
    assert!(
        ran.iter().any(|t| t.contains(&first)) && ran.iter().any(|t| t.contains(&second)),
        "{ran:?}"
    );
    assert!(ran.contains(&hidden), "{ran:?}");
    let direct = format!(
        "host={} port={} user={role} password={second} dbname=app",
        e.get("VIGIL_PG_HOST"),
        e.get("VIGIL_PG_PORT")
    );
    let (logged_in, task) = tokio_postgres::connect(&direct, tokio_postgres::NoTls)
        .await
        .expect("the password set through the gateway logs in");
    drop(logged_in);
    let _ = task.await;

    let records = node.records_after_sessions(1).await;
    let requests: Vec<_> = of_kind(&records, Kind::Request)
        .into_iter()
        .filter_map(|r| Some((r.body.pg_request()?.text.clone(), r.body.masked.clone())))
        .filter(|(text, _)| text.contains(&role))
        .collect();
    let secret = std::collections::BTreeMap::from([("secret".to_string(), 1)]);
    assert!(
        of_kind(&records, Kind::Request)
            .iter()
            .any(|r| r.body.pg_request().is_some_and(|q| q.text == hidden)),
        "the DO block is not on record as it ran"
    );
    assert_eq!(
        requests,
        [
            (
                format!("CREATE ROLE {role} LOGIN PASSWORD '[redacted]'"),
                secret.clone()
            ),
            (
                format!("ALTER ROLE {role} WITH ENCRYPTED PASSWORD '[redacted]'"),
                secret.clone()
            ),
            (
                format!("ALTER ROLE {role} PASSWORD [redacted]"),
                secret.clone()
            ),
        ]
    );
    // The target's error about it, on record without it.
    let errors: Vec<_> = of_kind(&records, Kind::Response)
        .into_iter()
        .filter_map(|r| {
            Some((
                r.body.pg_response()?.error.clone()?.message,
                r.body.masked.clone(),
            ))
        })
        .collect();
    assert!(
        errors.contains(&(
            r#"syntax error at or near "[redacted]""#.to_string(),
            secret
        )),
        "{errors:?}"
    );
    for path in files_under(&node.files.audit_dir) {
        let log = String::from_utf8_lossy(&std::fs::read(&path).unwrap()).into_owned();
        assert!(
            !log.contains(&first) && !log.contains(&second) && !log.contains(&third),
            "a password reached {}",
            path.display()
        );
    }
    su.batch_execute(&format!("DROP ROLE {role}; DROP ROLE {admin}"))
        .await
        .unwrap();
}
