//! t7b–t7c: the gateway and PostgreSQL read the same bytes the same way. The encoding between
//! them is UTF-8 whatever the client asks for; a client that asks for another encoding is
//! refused at startup. PostgreSQL's `log_statement=all` is the ground truth.

use std::process::Command;
use vigil_chaos::*;
use vigil_proto::record::{Kind, Outcome};

/// Even if an operator allow-lists `client_encoding` in `options`, it cannot be set there.
const POLICY: &str = r#"
[policy]
allowed_startup_settings = ["client_encoding", "statement_timeout"]

[[policy.rules]]
id = "no-destruction"
action = "block"
flags = ["delete_without_where"]
"#;

/// Valid UTF-8, one SELECT of one string to a UTF-8 reader. The last byte of `丁` (E4 B8 81)
/// and the backslash after it are one character in SJIS, GBK and GB18030: there the quote
/// after the backslash ends the literal and the DELETE runs.
const SWALLOW: &str = r"SELECT E'丁\'; DELETE FROM customers; --'";
/// The same for SJIS with a two-byte UTF-8 character (C4 81).
const SWALLOW_SJIS: &str = r"SELECT E'ā\'; DELETE FROM customers; --'";

fn psql(node: &TestNode, token: &str, env: (&str, &str), args: &[&str]) -> std::process::Output {
    Command::new("psql")
        .env("PGPASSWORD", token)
        .env("PGSSLMODE", "require")
        .env(env.0, env.1)
        .args(["-h", "127.0.0.1", "-p", &node.port().to_string()])
        .args(["-U", "agent", "-d", "app", "-X", "-At"])
        .args(args)
        .output()
        .expect("psql runs")
}

/// The statements PostgreSQL logged for `db` since `offset`, simple and extended protocol.
fn logged_statements(db: &str, offset: u64) -> Vec<String> {
    pg_executed(db, offset)
        .into_iter()
        .map(|r| r.text)
        .collect()
}

async fn customers(db: &str) -> i64 {
    direct_superuser(db)
        .await
        .query_one("SELECT count(*) FROM customers", &[])
        .await
        .unwrap()
        .get(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t7b_client_encodings_other_than_utf8_are_refused_at_startup() {
    let node = TestNode::start(NodeOptions {
        extra: POLICY,
        ..NodeOptions::default()
    })
    .await;
    let db = node.files.db.clone();
    let token = agent_token().await;
    let offset = pg_log_len();
    let mut attempts = 0;
    // psql asks through the startup parameter (PGCLIENTENCODING) or through `options`.
    let cases = [
        ("PGCLIENTENCODING", "SJIS"),
        ("PGCLIENTENCODING", "Shift_JIS"),
        ("PGCLIENTENCODING", "BIG5"),
        ("PGCLIENTENCODING", "GBK"),
        ("PGCLIENTENCODING", "GB18030"),
        ("PGCLIENTENCODING", "UHC"),
        ("PGCLIENTENCODING", "JOHAB"),
        ("PGCLIENTENCODING", "EUC_JP"),
        ("PGCLIENTENCODING", "LATIN1"),
        ("PGOPTIONS", "-c client_encoding=SJIS"),
        ("PGOPTIONS", "--client-encoding=GBK"),
        ("PGOPTIONS", "-c CLIENT_ENCODING=GB18030"),
        (
            "PGOPTIONS",
            "-c statement_timeout=5s -cclient_encoding=BIG5",
        ),
    ];
    for (var, value) in cases {
        let out = psql(
            &node,
            &token,
            (var, value),
            &["-c", SWALLOW, "-c", SWALLOW_SJIS],
        );
        attempts += 1;
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{var}={value}: {stderr}");
        assert!(
            stderr.contains("client_encoding") && stderr.contains("UTF8"),
            "{var}={value}: {stderr}"
        );
    }
    // tokio-postgres (extended protocol) through `options`: SQLSTATE 22023.
    for options in ["-c client_encoding=SJIS", "-c client_encoding=auto"] {
        let Err(err) = connect_tls(&format!(
            "{} options='{options}'",
            node.conn_str(&token, "app")
        ))
        .await
        else {
            panic!("{options}: accepted");
        };
        attempts += 1;
        let db_err = err.as_db_error().expect("a server error");
        assert_eq!(db_err.code().code(), "22023", "{}", db_err.message());
    }

    // Ground truth: nothing of these sessions reached PostgreSQL.
    assert_eq!(logged_statements(&db, offset), Vec::<String>::new());
    assert_eq!(customers(&db).await, 50);
    let records = node.records().await;
    let denied = of_kind(&records, Kind::SessionStart);
    assert_eq!(denied.len(), attempts);
    for r in denied {
        assert_eq!(r.body.outcome, Some(Outcome::Denied));
        assert!(r.body.principal.is_some(), "who asked is on record");
        assert!(r
            .body
            .detail
            .as_deref()
            .unwrap()
            .starts_with("client_encoding"));
    }
    assert!(of_kind(&records, Kind::Request).is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t7c_utf8_and_sql_ascii_sessions_run_exactly_what_is_recorded() {
    let node = TestNode::start(NodeOptions {
        extra: POLICY,
        ..NodeOptions::default()
    })
    .await;
    let db = node.files.db.clone();
    let token = agent_token().await;
    let offset = pg_log_len();
    let cases = [
        ("PGCLIENTENCODING", "UTF8"),
        ("PGCLIENTENCODING", "utf-8"),
        ("PGCLIENTENCODING", "Unicode"),
        // What libpq sends for `auto` under the C locale; the server's report makes it UTF8.
        ("PGCLIENTENCODING", "SQL_ASCII"),
        ("PGOPTIONS", "-c client_encoding=utf8"),
    ];
    for (var, value) in cases {
        let out = psql(
            &node,
            &token,
            (var, value),
            &[
                "-c",
                "SHOW client_encoding",
                "-c",
                r"\encoding",
                "-c",
                SWALLOW,
            ],
        );
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{var}={value}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(
            stdout.lines().collect::<Vec<_>>(),
            ["UTF8", "UTF8", r"丁'; DELETE FROM customers; --"],
            "{var}={value}"
        );
    }
    // The extended protocol: one statement, one string.
    let (client, _conn) = node.client(&token).await.unwrap();
    let row = client.query_one(SWALLOW_SJIS, &[]).await.unwrap();
    assert_eq!(row.get::<_, String>(0), r"ā'; DELETE FROM customers; --");
    drop(client);

    // Ground truth: every statement PostgreSQL ran is named exactly by a request record, and
    // the DELETE inside the strings never ran.
    let records = node.records_after_sessions(cases.len() + 1).await;
    let recorded: Vec<String> = of_kind(&records, Kind::Request)
        .iter()
        .map(|r| r.body.pg_request().unwrap().text.clone())
        .collect();
    let logged = logged_statements(&db, offset);
    assert_eq!(
        logged.iter().filter(|s| s.as_str() == SWALLOW).count(),
        cases.len()
    );
    assert!(logged.iter().any(|s| s == SWALLOW_SJIS), "{logged:?}");
    for statement in &logged {
        assert!(
            recorded.contains(statement),
            "{statement:?} ran but no record names it"
        );
    }
    assert_eq!(customers(&db).await, 50);
    assert!(of_kind(&records, Kind::SessionStart)
        .iter()
        .all(|r| r.body.outcome == Some(Outcome::Success)));
}

/// The backstop: code the server runs on its own account (here a function that calls
/// `set_config`) can still switch the encoding. The target reports the change, and the
/// gateway ends the session rather than read the next message differently from PostgreSQL.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t7d_an_encoding_switched_by_server_side_code_ends_the_session() {
    let node = TestNode::start(NodeOptions {
        extra: POLICY,
        ..NodeOptions::default()
    })
    .await;
    let db = node.files.db.clone();
    direct_superuser(&db)
        .await
        .batch_execute(
            "CREATE FUNCTION switch_encoding() RETURNS text LANGUAGE plpgsql AS $$
             BEGIN PERFORM set_config('client_encoding', 'SJIS', false); RETURN 'switched'; END $$",
        )
        .await
        .unwrap();
    let token = agent_token().await;
    let offset = pg_log_len();
    let (client, conn) = node.client(&token).await.unwrap();
    let _ = client.simple_query("SELECT switch_encoding()").await;
    let after = client.simple_query(SWALLOW_SJIS).await;
    assert!(after.is_err(), "the session is over: {after:?}");
    conn.await.ok();
    let logged = logged_statements(&db, offset);
    assert!(
        !logged.iter().any(|s| s.contains("DELETE")),
        "nothing after the switch reached PostgreSQL: {logged:#?}"
    );
    assert_eq!(customers(&db).await, 50);
    let records = node.records_after_sessions(1).await;
    let end = of_kind(&records, Kind::SessionEnd)
        .into_iter()
        .last()
        .expect("a session_end record");
    assert_eq!(end.body.outcome, Some(Outcome::Error));
    let detail = end.body.detail.as_deref().unwrap_or_default();
    assert!(detail.contains("client_encoding"), "{detail}");
}
