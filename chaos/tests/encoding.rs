//! t7b–t7d, t7g–t7h: the gateway and PostgreSQL read the same bytes the same way. The encoding
//! between them is UTF-8 and string literals are standard whatever the client asks for; a
//! client that asks otherwise is refused at startup, a statement that would change either is
//! refused, and a change made by code on the server ends the session before anything the
//! client sent behind it can be read otherwise. PostgreSQL's `log_statement=all` is the ground
//! truth.

use std::process::Command;
use vigil_chaos::wire::{self, Msg, Wire};
use vigil_chaos::*;
use vigil_proto::record::{Kind, Outcome, Record};

/// Even if an operator allow-lists `client_encoding` or `standard_conforming_strings` in
/// `options`, they cannot be set there.
const POLICY: &str = r#"
[policy]
allowed_startup_settings = ["client_encoding", "statement_timeout", "standard_conforming_strings"]

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
/// One SELECT of one string with standard strings (`\` is a character, `''` a quote); with
/// `standard_conforming_strings` off, `\'` is the quote, the next one ends the string and the
/// DELETE runs.
const SPLIT: &str = r"SELECT 'a\''; DELETE FROM customers; --'";
/// What `SPLIT` selects when read as the gateway reads it.
const SPLIT_VALUE: &str = r"a\'; DELETE FROM customers; --";
/// The same in one statement for the extended protocol: with strings that are not standard,
/// the second column calls `wipe()`.
const SPLIT_CALL: &str = r"SELECT 'a\'', wipe() --'";

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

async fn node_under_policy(allow_cleartext_token: bool) -> TestNode {
    TestNode::start(NodeOptions {
        allow_cleartext_token,
        extra: POLICY,
        ..NodeOptions::default()
    })
    .await
}

/// A node under `POLICY` whose database has functions that change how the target reads
/// statements on their own account, as any code on the server can: `switch_strings()` turns
/// `standard_conforming_strings` off, `switch_encoding()` sets `client_encoding` to SJIS.
async fn node_with_switches(allow_cleartext_token: bool) -> TestNode {
    let node = node_under_policy(allow_cleartext_token).await;
    direct_superuser(&node.files.db)
        .await
        .batch_execute(
            "CREATE FUNCTION switch_strings() RETURNS text LANGUAGE plpgsql AS $$
             BEGIN PERFORM set_config('standard_conforming_strings', 'off', false); RETURN 'off'; END $$;
             CREATE FUNCTION switch_encoding() RETURNS text LANGUAGE plpgsql AS $$
             BEGIN PERFORM set_config('client_encoding', 'SJIS', false); RETURN 'SJIS'; END $$",
        )
        .await
        .unwrap();
    node
}

/// The SQLSTATE with which a tokio-postgres session asking for `options` is refused at
/// startup.
async fn startup_refusal(node: &TestNode, token: &str, options: &str) -> String {
    let Err(err) = connect_tls(&format!(
        "{} options='{options}'",
        node.conn_str(token, "app")
    ))
    .await
    else {
        panic!("{options}: accepted");
    };
    err.as_db_error()
        .expect("a server error")
        .code()
        .code()
        .to_string()
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
    let node = node_under_policy(false).await;
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
        assert_eq!(startup_refusal(&node, &token, options).await, "22023");
        attempts += 1;
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
    let node = node_under_policy(false).await;
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
    let node = node_with_switches(false).await;
    let db = node.files.db.clone();
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

/// t7g: `standard_conforming_strings` stays on. A client cannot ask for it off at startup (even
/// allow-listed in `options`), a role's or a database's setting does not reach the gateway's
/// sessions, and a statement that turns it off is refused before it runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t7g_string_literals_stay_standard() {
    let node = node_under_policy(false).await;
    let db = node.files.db.clone();
    let su = direct_superuser(&db).await;
    // For the gateway's own login to this database (a test database of its own).
    su.batch_execute(&format!(
        "ALTER ROLE {} IN DATABASE {db} SET standard_conforming_strings = off",
        env().get("VIGIL_PG_GATEWAY_USER")
    ))
    .await
    .unwrap();
    let token = agent_token().await;
    let offset = pg_log_len();

    let mut refused = 0;
    for options in [
        "-c standard_conforming_strings=off",
        "--standard-conforming-strings=false",
        "-c STANDARD_CONFORMING_STRINGS=0",
    ] {
        let out = psql(&node, &token, ("PGOPTIONS", options), &["-c", SPLIT]);
        refused += 1;
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{options}: {stderr}");
        assert!(
            stderr.contains("standard_conforming_strings"),
            "{options}: {stderr}"
        );
    }
    let options = "-c standard_conforming_strings=off";
    assert_eq!(startup_refusal(&node, &token, options).await, "22023");
    refused += 1;

    // The role's setting for this database is off; the gateway's session has it on.
    let out = psql(
        &node,
        &token,
        ("PGAPPNAME", "t7g"),
        &["-c", "SHOW standard_conforming_strings", "-c", SPLIT],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .collect::<Vec<_>>(),
        ["on", SPLIT_VALUE]
    );

    // Statements that turn it off are refused on both protocols; turning it on passes.
    let (client, _conn) = node.client(&token).await.unwrap();
    let turn_off = [
        "SET standard_conforming_strings = off",
        "SET SESSION standard_conforming_strings TO 'false'",
        "SELECT set_config('standard_conforming_strings', 'off', false)",
        "BEGIN; SET LOCAL standard_conforming_strings = off; COMMIT",
    ];
    for sql in turn_off {
        let err = client.simple_query(sql).await.unwrap_err();
        let message = err.as_db_error().expect("a refusal").message().to_string();
        assert!(
            message.contains("standard-conforming-strings"),
            "{sql}: {message}"
        );
    }
    // pg_settings' update rule calls set_config: refused too, under the first of the two
    // rules (it could change either setting).
    let err = client
        .simple_query(
            "UPDATE pg_settings SET setting = 'off' WHERE name = 'standard_conforming_strings'",
        )
        .await
        .unwrap_err();
    let message = err.as_db_error().expect("a refusal").message().to_string();
    assert!(message.contains("rule client-encoding"), "{message}");
    let err = client
        .query(
            "SELECT set_config($1, 'off', false)",
            &[&"standard_conforming_strings"],
        )
        .await
        .unwrap_err();
    assert!(err.as_db_error().is_some(), "{err}");
    client
        .simple_query("SET standard_conforming_strings = on")
        .await
        .unwrap();
    let values = client.simple_query(SPLIT).await.unwrap();
    assert!(
        values.iter().any(|m| matches!(m,
            tokio_postgres::SimpleQueryMessage::Row(r) if r.get(0) == Some(SPLIT_VALUE))),
        "{values:?}"
    );
    drop(client);

    // Ground truth: none of the refused statements reached PostgreSQL, the DELETE never ran,
    // and what ran is what the records name.
    let logged = logged_statements(&db, offset);
    assert!(
        !logged
            .iter()
            .any(|s| s.contains("standard_conforming_strings") && s.contains("off")),
        "{logged:#?}"
    );
    assert_eq!(logged.iter().filter(|s| s.as_str() == SPLIT).count(), 2);
    assert_eq!(customers(&db).await, 50);
    let records = node.records_after_sessions(2).await;
    let denied: Vec<_> = of_kind(&records, Kind::SessionStart)
        .into_iter()
        .filter(|r| r.body.outcome == Some(Outcome::Denied))
        .collect();
    assert_eq!(denied.len(), refused);
    let blocked = blocked_by(&records, "standard-conforming-strings");
    assert_eq!(blocked.len(), turn_off.len(), "{blocked:#?}");
    su.batch_execute(&format!(
        "ALTER ROLE {} IN DATABASE {db} RESET standard_conforming_strings",
        env().get("VIGIL_PG_GATEWAY_USER")
    ))
    .await
    .unwrap();
}

/// The texts of the statements the gateway refused under `rule`.
fn blocked_by<'a>(records: &'a [Record], rule: &str) -> Vec<&'a str> {
    let blocked = pg_blocked_by(records, rule).into_iter();
    blocked.map(|r| r.text.as_str()).collect()
}

/// Parse, Bind and Execute of `sql` as the unnamed statement and portal.
fn unnamed(sql: &str) -> Vec<Vec<u8>> {
    vec![
        wire::parse("", sql),
        wire::bind("", "", &[]),
        wire::execute(""),
    ]
}

/// Every message up to the end of the session.
async fn until_closed(w: &mut Wire) -> Vec<Msg> {
    let mut out = Vec::new();
    while let Ok(m) = w.try_read().await {
        out.push(m);
    }
    out
}

fn messages_of(msgs: &[Msg]) -> Vec<String> {
    msgs.iter().filter_map(Msg::error).map(|(_, m)| m).collect()
}

/// t7h: code on the server (here functions that call `set_config`) can still change how the
/// target reads statements, and report it only when its batch ends. A statement with a
/// backslash that the client sent right behind it is not forwarded before that report: the
/// report ends the session first. In the same extended-protocol batch (no report before its
/// Sync) it is refused. Statements with a backslash behind others that change nothing run.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t7h_a_statement_sent_behind_a_change_by_server_code_is_not_read_otherwise() {
    let node = node_with_switches(true).await;
    let db = node.files.db.clone();
    direct_superuser(&db)
        .await
        .batch_execute(
            "CREATE FUNCTION wipe() RETURNS bigint LANGUAGE sql AS
             'WITH d AS (DELETE FROM customers RETURNING 1) SELECT count(*) FROM d'",
        )
        .await
        .unwrap();
    let token = agent_token().await;
    let offset = pg_log_len();
    let port = node.port();

    // Simple protocol, both in one write: the switch's report ends the session.
    for (switch, then, setting) in [
        (
            "SELECT switch_strings()",
            SPLIT,
            "standard_conforming_strings",
        ),
        ("SELECT switch_encoding()", SWALLOW_SJIS, "client_encoding"),
    ] {
        let mut w = Wire::app_session(port, &token).await;
        w.send(&[wire::query(switch), wire::query(then)].concat())
            .await;
        let errors = messages_of(&until_closed(&mut w).await);
        assert!(
            errors.len() == 1 && errors[0].contains(setting),
            "{switch}: {errors:?}"
        );
    }

    // Extended protocol, one batch: the statement after the switch is refused, and with that
    // error the batch's transaction rolls the switch back.
    let mut w = Wire::app_session(port, &token).await;
    let batch = [
        unnamed("SELECT switch_strings()"),
        unnamed(SPLIT_CALL),
        vec![wire::sync()],
    ];
    w.send(&batch.concat().concat()).await;
    let errors = messages_of(&w.until_ready().await);
    assert!(
        errors.len() == 1 && errors[0].contains("statement-reading"),
        "{errors:?}"
    );
    let r = w
        .batch(&[wire::query("SHOW standard_conforming_strings")])
        .await;
    assert!(
        r.iter().any(|m| m.values() == [Some("on".to_string())]),
        "{r:?}"
    );
    drop(w);

    // Behind statements that change nothing, the same texts run: after the earlier batch's
    // answer, or refused within one batch.
    let mut w = Wire::app_session(port, &token).await;
    w.send(&[wire::query("SELECT 1"), wire::query(SPLIT)].concat())
        .await;
    for _ in 0..2 {
        let r = w.until_ready().await;
        assert!(messages_of(&r).is_empty(), "{:?}", messages_of(&r));
    }
    let batches = [
        unnamed("SELECT 2"),
        vec![wire::sync()],
        unnamed(SPLIT_CALL),
        vec![wire::sync()],
    ];
    w.send(&batches.concat().concat()).await;
    let first = w.until_ready().await;
    assert!(messages_of(&first).is_empty(), "{:?}", messages_of(&first));
    let second = w.until_ready().await;
    assert!(
        second
            .iter()
            .any(|m| m.values() == [Some(r"a\', wipe() --".to_string())]),
        "{second:?}"
    );
    let r = w
        .batch(
            &[
                unnamed("SELECT 3"),
                vec![wire::parse("", SPLIT_CALL), wire::sync()],
            ]
            .concat(),
        )
        .await;
    let errors = messages_of(&r);
    assert!(
        errors.len() == 1 && errors[0].contains("statement-reading"),
        "{errors:?}"
    );
    drop(w);

    // Ground truth: the switches ran, nothing the client sent behind them did, customers are
    // all there, and every statement PostgreSQL ran has its record.
    let logged = logged_statements(&db, offset);
    for switch in ["SELECT switch_strings()", "SELECT switch_encoding()"] {
        assert!(logged.iter().any(|s| s == switch), "{logged:#?}");
    }
    assert_eq!(
        logged.iter().filter(|s| s.as_str() == SPLIT).count(),
        1,
        "only the one behind SELECT 1: {logged:#?}"
    );
    assert_eq!(
        logged.iter().filter(|s| s.as_str() == SPLIT_CALL).count(),
        1,
        "only the one after its own Sync: {logged:#?}"
    );
    assert!(!logged.iter().any(|s| s == SWALLOW_SJIS), "{logged:#?}");
    assert_eq!(customers(&db).await, 50);
    let records = node.records_after_sessions(4).await;
    assert_eq!(
        blocked_by(&records, "statement-reading"),
        [SPLIT_CALL, SPLIT_CALL]
    );
    let recorded: Vec<&str> = of_kind(&records, Kind::Request)
        .iter()
        .map(|r| r.body.pg_request().unwrap().text.as_str())
        .collect();
    for statement in &logged {
        assert!(
            recorded.contains(&statement.as_str()),
            "{statement:?} ran but no record names it"
        );
    }
    let ends: Vec<String> = of_kind(&records, Kind::SessionEnd)
        .iter()
        .filter(|r| r.body.outcome == Some(Outcome::Error))
        .map(|r| r.body.detail.clone().unwrap_or_default())
        .collect();
    assert_eq!(ends.len(), 2, "{ends:?}");
    assert!(
        ends.iter()
            .any(|d| d.contains("standard_conforming_strings"))
            && ends.iter().any(|d| d.contains("client_encoding")),
        "{ends:?}"
    );
}
