//! t76–t7a, t7e: the gateway's picture of a session — prepared statements, portals, their
//! descriptions, the settings the target reports — follows what PostgreSQL confirmed, never
//! what the client asked for. PostgreSQL's own statement log (`log_statement=all`) is the
//! ground truth: every statement it ran is named exactly by the audit record of that
//! statement, and nothing that needs approval runs without one.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use vigil_chaos::wire::{self, Msg, Wire};
use vigil_chaos::*;
use vigil_proto::record::{Kind, Outcome, Record};

const POLICY: &str = r#"
[[policy.rules]]
id = "payroll-needs-approval"
action = "require_approval"
kinds = ["write"]
tables = ["payroll"]
approval = { approvers = "approvers", wait_secs = 0 }
"#;

struct Setup {
    node: TestNode,
    token: String,
    log_offset: u64,
}

async fn setup() -> Setup {
    let node = TestNode::start(NodeOptions {
        allow_cleartext_token: true,
        extra: POLICY,
        ..NodeOptions::default()
    })
    .await;
    let su = direct_superuser(&node.files.db).await;
    su.batch_execute(&format!(
        "CREATE TABLE payroll (id int, amount int); INSERT INTO payroll VALUES (1, 100);
         ALTER TABLE payroll OWNER TO {}",
        env().get("VIGIL_PG_GATEWAY_USER")
    ))
    .await
    .unwrap();
    Setup {
        token: agent_token().await,
        log_offset: pg_log_len(),
        node,
    }
}

impl Setup {
    fn ran(&self) -> Vec<Ran> {
        pg_executed(&self.node.files.db, self.log_offset)
    }

    /// Payroll row 1's amount, read directly (PostgreSQL logs this statement too: read what
    /// ran first).
    async fn amount(&self) -> i32 {
        let su = direct_superuser(&self.node.files.db).await;
        su.query_one("SELECT amount FROM payroll WHERE id = 1", &[])
            .await
            .unwrap()
            .get(0)
    }
}

fn errors(msgs: &[Msg]) -> Vec<(String, String)> {
    msgs.iter().filter_map(Msg::error).collect()
}

/// A request record with whether its statement failed or never ran (its response has an
/// error).
struct Recorded<'a> {
    record: &'a Record,
    failed: bool,
}

fn requests(records: &[Record]) -> Vec<Recorded<'_>> {
    let error = |r: &&Record| {
        r.body
            .pg_response()
            .and_then(|x| x.error.as_ref())
            .map(|e| e.message.clone())
    };
    let key = |r: &Record| Some((r.body.session.clone()?, r.body.stmt?));
    let responses = records.iter().filter(|r| r.body.kind == Kind::Response);
    let failed: std::collections::HashSet<(String, u64)> = responses
        .clone()
        .filter(|r| error(r).is_some())
        .filter_map(key)
        .collect();
    // Statements the target skipped (an earlier message of their batch failed) never ran:
    // they cannot stand for anything PostgreSQL logged.
    let skipped: std::collections::HashSet<(String, u64)> = responses
        .filter(|r| error(r).is_some_and(|m| m.starts_with("not executed")))
        .filter_map(key)
        .collect();
    records
        .iter()
        .filter(|r| r.body.kind == Kind::Request)
        .filter(|r| key(r).is_none_or(|k| !skipped.contains(&k)))
        .map(|r| Recorded {
            record: r,
            failed: failed.contains(&(
                r.body.session.clone().unwrap_or_default(),
                r.body.stmt.unwrap_or_default(),
            )),
        })
        .collect()
}

/// The invariant: walking PostgreSQL's log and the request records side by side, every
/// statement PostgreSQL ran is named, in order, by a request record with exactly its text
/// (and, for `EXECUTE name`, exactly the prepared text it ran); a request record with no
/// such statement in the log failed or never ran.
fn assert_records_name_what_ran(ran: &[Ran], records: &[Record], context: &str) {
    let reqs = requests(records);
    let mut i = 0;
    for r in ran {
        loop {
            let Some(q) = reqs.get(i) else {
                panic!("{context}: PostgreSQL ran {r:?}, but no audit record names it");
            };
            i += 1;
            let req = q.record.body.pg_request().expect("request");
            let prepared = req.prepared.first().map(|p| p.text.as_str());
            if (req.mode == "simple") == r.simple
                && req.text == r.text
                && (r.prepared.is_none() || prepared == r.prepared.as_deref())
            {
                break;
            }
            assert!(
                q.failed,
                "{context}: the audit says {:?} (prepared {prepared:?}) ran, but PostgreSQL ran {r:?}",
                req.text
            );
        }
    }
    for q in &reqs[i..] {
        assert!(
            q.failed,
            "{context}: the audit says {:?} ran, PostgreSQL did not run it",
            q.record.body.pg_request().map(|r| &r.text)
        );
    }
}

fn ran_text(ran: &[Ran], needle: &str) -> bool {
    ran.iter().any(|r| {
        r.text.contains(needle) || r.prepared.as_deref().is_some_and(|p| p.contains(needle))
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t76_a_failed_reparse_or_skipped_close_cannot_rename_what_runs() {
    let s = setup().await;
    let mut w = Wire::app_session(s.node.port(), &s.token).await;

    // A re-Parse of an existing name fails at the target: the old statement still runs, and
    // the record says so.
    let r = w
        .batch(&[
            wire::parse("s1", "DELETE FROM customers WHERE id = 7"),
            wire::sync(),
        ])
        .await;
    assert!(errors(&r).is_empty(), "{:?}", errors(&r));
    let r = w
        .batch(&[wire::parse("s1", "SELECT 'harmless'"), wire::sync()])
        .await;
    assert_eq!(errors(&r)[0].0, "42P05", "the name exists at the target");
    let r = w
        .batch(&[wire::bind("", "s1", &[]), wire::execute(""), wire::sync()])
        .await;
    assert!(errors(&r).is_empty(), "{:?}", errors(&r));

    // A statement that needs approval, then a Close the target skips after an error, then a
    // re-Parse that fails: the gateway must not believe the name now holds the harmless text.
    let update = "UPDATE payroll SET amount = amount + 1 WHERE id = 1";
    let r = w.batch(&[wire::parse("s2", update), wire::sync()]).await;
    assert!(
        errors(&r).is_empty(),
        "preparing runs nothing: {:?}",
        errors(&r)
    );
    let r = w
        .batch(&[
            // One parameter too many: the target fails the Bind and skips the Close.
            wire::bind("", "s2", &[Some("x")]),
            wire::close(b'S', "s2"),
            wire::sync(),
        ])
        .await;
    assert_eq!(errors(&r).len(), 1);
    let r = w
        .batch(&[wire::parse("s2", "SELECT 'harmless'"), wire::sync()])
        .await;
    assert_eq!(errors(&r)[0].0, "42P05");
    let r = w
        .batch(&[wire::bind("", "s2", &[]), wire::execute(""), wire::sync()])
        .await;
    let errs = errors(&r);
    assert_eq!(errs.len(), 1, "the Execute is refused: {errs:?}");
    // The session is still usable.
    let r = w.batch(&[wire::query("SELECT 1")]).await;
    assert!(errors(&r).is_empty());

    let ran = s.ran();
    assert!(
        !ran_text(&ran, "UPDATE payroll"),
        "ran without approval: {ran:#?}"
    );
    assert!(ran_text(&ran, "DELETE FROM customers WHERE id = 7"));
    assert_records_name_what_ran(&ran, &s.node.records().await, "t76");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t77_sql_prepare_and_deallocate_follow_the_target() {
    let s = setup().await;
    let mut w = Wire::app_session(s.node.port(), &s.token).await;
    // A protocol-prepared statement that needs approval at each Execute.
    let update = "UPDATE payroll SET amount = 0 WHERE id = 1";
    let r = w.batch(&[wire::parse("x", update), wire::sync()]).await;
    assert!(errors(&r).is_empty());
    // DEALLOCATE inside a failed transaction fails: the target still holds `x`.
    for sql in ["BEGIN", "SELECT 1/0", "DEALLOCATE x", "ROLLBACK"] {
        w.batch(&[wire::query(sql)]).await;
    }
    // PREPARE of a name the target holds fails: `x` is still the UPDATE.
    let r = w
        .batch(&[wire::query("PREPARE x AS SELECT 'harmless'")])
        .await;
    assert_eq!(errors(&r)[0].0, "42P05");
    // EXECUTE x: the gateway cannot vouch for `x` any more, so it refuses.
    let r = w.batch(&[wire::query("EXECUTE x")]).await;
    assert_eq!(errors(&r).len(), 1, "refused: {:?}", errors(&r));
    // A PREPARE that fails leaves no name behind.
    let r = w
        .batch(&[wire::query(
            "PREPARE y AS SELECT no_such_column FROM customers",
        )])
        .await;
    assert_eq!(errors(&r).len(), 1);
    let r = w.batch(&[wire::query("EXECUTE y")]).await;
    assert_eq!(errors(&r).len(), 1);
    // A PREPARE that survives a failed transaction (prepared statements are not
    // transactional) is named by the EXECUTE's record with the text it ran.
    for sql in [
        "BEGIN",
        "PREPARE z AS SELECT 'kept'",
        "SELECT 1/0",
        "ROLLBACK",
    ] {
        w.batch(&[wire::query(sql)]).await;
    }
    let r = w.batch(&[wire::query("EXECUTE z")]).await;
    assert!(errors(&r).is_empty(), "{:?}", errors(&r));
    // Several statements in one Query: the PREPARE's own text is what EXECUTE names.
    let r = w
        .batch(&[wire::query(
            "PREPARE q AS SELECT 'first'; EXECUTE q; DEALLOCATE q",
        )])
        .await;
    assert!(errors(&r).is_empty(), "{:?}", errors(&r));

    let ran = s.ran();
    assert!(
        !ran_text(&ran, "UPDATE payroll"),
        "ran without approval: {ran:#?}"
    );
    let records = s.node.records().await;
    assert_records_name_what_ran(&ran, &records, "t77");
    let z = records
        .iter()
        .filter(|r| r.body.kind == Kind::Request)
        .filter_map(|r| r.body.pg_request())
        .find(|r| r.text == "EXECUTE z")
        .expect("the EXECUTE z record");
    assert_eq!(z.prepared[0].name, "z");
    assert_eq!(z.prepared[0].text, "PREPARE z AS SELECT 'kept'");
    // The replay shows what EXECUTE ran.
    let session = records
        .iter()
        .find(|r| r.body.pg_request().is_some_and(|q| q.text == "EXECUTE z"))
        .and_then(|r| r.body.session.clone())
        .unwrap();
    let dir = s.node.files.audit_dir.to_string_lossy().into_owned();
    let (code, replay) = vigil(&["replay", &session, "--log", &dir]);
    assert_eq!(code, 0, "{replay}");
    assert!(
        replay.contains("runs z = PREPARE z AS SELECT 'kept'"),
        "{replay}"
    );
    let q = records
        .iter()
        .filter_map(|r| r.body.pg_request())
        .find(|r| r.text.starts_with("PREPARE q AS SELECT 'first'; EXECUTE q"))
        .expect("the multi-statement record");
    assert_eq!(q.prepared[0].text, "PREPARE q AS SELECT 'first'");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t78_descriptions_belong_to_what_was_described() {
    let s = setup().await;
    let mut w = Wire::app_session(s.node.port(), &s.token).await;
    let r = w
        .batch(&[
            wire::parse("", "SELECT 1 AS first_col"),
            wire::bind("", "", &[]),
            wire::describe(b'P', ""),
            wire::execute(""),
            wire::sync(),
        ])
        .await;
    assert!(errors(&r).is_empty());
    // The Bind fails: the Execute after it is skipped, and its record must not borrow the
    // columns of the portal before it.
    let r = w
        .batch(&[
            wire::parse("", "SELECT 2 AS second_col"),
            wire::bind("", "", &[Some("extra")]),
            wire::execute(""),
            wire::sync(),
        ])
        .await;
    assert_eq!(errors(&r).len(), 1);
    // A cursor takes the name of a portal: the gateway no longer vouches for that name.
    let r = w
        .batch(&[wire::query(
            "DECLARE p1 CURSOR WITH HOLD FOR SELECT 'cursor row'",
        )])
        .await;
    assert!(errors(&r).is_empty(), "{:?}", errors(&r));
    let r = w.batch(&[wire::execute("p1"), wire::sync()]).await;
    assert_eq!(errors(&r).len(), 1, "refused: {:?}", errors(&r));

    let records = s.node.records().await;
    let responses: Vec<_> = records
        .iter()
        .filter(|r| r.body.kind == Kind::Response)
        .filter_map(|r| r.body.pg_response())
        .collect();
    assert!(responses.iter().any(|r| r.columns == ["first_col"]));
    for r in responses.iter().filter(|r| r.error.is_some()) {
        assert!(
            r.columns.is_empty(),
            "a statement that did not run has no columns: {r:?}"
        );
    }
    let ran = s.ran();
    assert!(
        !ran.iter()
            .any(|r| !r.simple && r.text.contains("cursor row")),
        "the cursor was fetched through a portal name the gateway did not vouch for: {ran:#?}"
    );
    assert_records_name_what_ran(&ran, &records, "t78");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t79_settings_the_target_reports_are_recorded() {
    let s = setup().await;
    let mut w = Wire::app_session(s.node.port(), &s.token).await;
    // pgjdbc names its application with SET after startup.
    let r = w
        .batch(&[wire::query("SET application_name = 'jdbc-reporting'")])
        .await;
    assert!(errors(&r).is_empty());
    w.batch(&[wire::query("SELECT 'after set'")]).await;
    let records = s.node.records().await;
    let after = records
        .iter()
        .find(|r| {
            r.body.kind == Kind::Request
                && r.body
                    .pg_request()
                    .is_some_and(|q| q.text == "SELECT 'after set'")
        })
        .expect("the request record");
    let conn = after.body.connection.as_ref().unwrap();
    assert_eq!(conn.application.as_deref(), Some("jdbc-reporting"));
    let principal = after.body.principal.as_ref().unwrap();
    assert_eq!(principal.intent.as_deref(), Some("jdbc-reporting"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t7e_refusals_keep_the_gateway_in_step_with_the_target() {
    let s = setup().await;
    let mut w = Wire::app_session(s.node.port(), &s.token).await;
    let r = w
        .batch(&[wire::parse("s9", "SELECT 'old'"), wire::sync()])
        .await;
    assert!(errors(&r).is_empty());
    for _ in 0..3 {
        // The gateway answers these itself (a stand-in reaches the target): they must not
        // count as answers to anything else.
        let r = w.batch(&[wire::query("EXECUTE nowhere")]).await;
        assert_eq!(errors(&r).len(), 1);
        // Two batches at once: the second runs what the first left under `s9`.
        w.send(
            &[
                wire::close(b'S', "s9"),
                wire::parse("s9", "SELECT 'new'"),
                wire::sync(),
                wire::bind("", "s9", &[]),
                wire::execute(""),
                wire::sync(),
            ]
            .concat(),
        )
        .await;
        for _ in 0..2 {
            let r = w.until_ready().await;
            assert!(errors(&r).is_empty(), "{:?}", errors(&r));
        }
    }
    assert_records_name_what_ran(&s.ran(), &s.node.records().await, "t7e");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t7f_a_batch_sent_in_parts_after_its_error_came_back() {
    let s = setup().await;
    let mut w = Wire::app_session(s.node.port(), &s.token).await;
    let r = w
        .batch(&[
            wire::parse("s1", "SELECT 'first'"),
            wire::parse("div", "SELECT 1/0"),
            wire::sync(),
        ])
        .await;
    assert!(errors(&r).is_empty());
    // The batch's first statement fails when it runs; PostgreSQL sends that error at once,
    // and discards what follows up to Sync, including what the client sends after the error.
    // (A batch that has run something is forwarded as it comes.)
    w.send(&[wire::bind("", "div", &[]), wire::execute("")].concat())
        .await;
    let mut first = w.read().await;
    while first.tag != b'E' {
        first = w.read().await;
    }
    w.send(
        &[
            wire::parse("s2", "SELECT 'part two'"),
            wire::bind("", "s1", &[]),
            wire::execute(""),
            wire::query("SELECT 'also skipped'"),
            wire::sync(),
        ]
        .concat(),
    )
    .await;
    let rest = w.until_ready().await;
    assert!(
        errors(&rest).is_empty(),
        "the rest of the batch was discarded without a word: {rest:?}"
    );
    // The session is in step: s1 still holds the first text, s2 was never created.
    let r = w
        .batch(&[wire::bind("", "s1", &[]), wire::execute(""), wire::sync()])
        .await;
    assert!(errors(&r).is_empty(), "{:?}", errors(&r));
    let r = w
        .batch(&[wire::bind("", "s2", &[]), wire::execute(""), wire::sync()])
        .await;
    assert_eq!(errors(&r).len(), 1, "s2 does not exist: {r:?}");
    let ran = s.ran();
    assert!(!ran_text(&ran, "part two") && !ran_text(&ran, "also skipped"));
    assert!(ran_text(&ran, "first"));
    assert_records_name_what_ran(&ran, &s.node.records().await, "t7f");
}

/// One random client message (or a Query), drawing names from small sets so they collide.
fn random_batch(rng: &mut StdRng, k: &mut u32) -> Vec<Vec<u8>> {
    const STMTS: &[&str] = &["", "s1", "s2"];
    const PORTALS: &[&str] = &["", "p1"];
    let mut next = || {
        *k += 1;
        *k
    };
    if rng.random_bool(0.3) {
        let n = next();
        let sql = match rng.random_range(0..12) {
            0 => format!("PREPARE s1 AS SELECT 'q{n}'"),
            1 => format!("PREPARE s2 AS SELECT 'q{n}'"),
            2 => "DEALLOCATE s1".to_string(),
            3 => "DEALLOCATE ALL".to_string(),
            4 => "EXECUTE s1".to_string(),
            5 => "EXECUTE s2".to_string(),
            6 => "BEGIN".to_string(),
            7 => "COMMIT".to_string(),
            8 => format!("SELECT {n}/0"),
            9 => "DISCARD ALL".to_string(),
            10 => format!("DECLARE p1 CURSOR WITH HOLD FOR SELECT 'cur{n}'"),
            _ => "CLOSE ALL".to_string(),
        };
        return vec![wire::query(&sql)];
    }
    let mut msgs = Vec::new();
    for _ in 0..rng.random_range(1..=5) {
        let stmt = STMTS[rng.random_range(0..STMTS.len())];
        let portal = PORTALS[rng.random_range(0..PORTALS.len())];
        let msg = match rng.random_range(0..10) {
            0..=2 => {
                let n = next();
                let sql = match rng.random_range(0..10) {
                    0..=4 => format!("SELECT 'v{n}' AS c{n}"),
                    5 => format!("SELEC 'bad{n}'"),
                    6 => format!("SELECT {n}/0"),
                    7 => format!("EXECUTE {}", ["s1", "s2"][n as usize % 2]),
                    8 => format!("PREPARE {} AS SELECT 'x{n}'", ["s1", "s2"][n as usize % 2]),
                    _ => ["DEALLOCATE s1", "BEGIN", "COMMIT", "ROLLBACK"][n as usize % 4].into(),
                };
                wire::parse(stmt, &sql)
            }
            3..=4 => wire::bind(portal, stmt, &[]),
            5..=6 => wire::execute(portal),
            7 => wire::describe(if rng.random_bool(0.5) { b'S' } else { b'P' }, portal),
            _ => {
                if rng.random_bool(0.5) {
                    wire::close(b'S', stmt)
                } else {
                    wire::close(b'P', portal)
                }
            }
        };
        msgs.push(msg);
    }
    msgs.push(wire::sync());
    msgs
}

/// The differential property: random sequences of Parse/Bind/Execute/Describe/Close/Sync and
/// PREPARE/EXECUTE/DEALLOCATE/DISCARD/cursors/transactions with errors, some pipelined across
/// Syncs; after the run, every statement PostgreSQL logged is the statement its audit record
/// names. `VIGIL_STATE_SEED` replays a seed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t7a_random_sequences_name_exactly_what_postgres_ran() {
    let s = setup().await;
    let seed = std::env::var("VIGIL_STATE_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(rand::random::<u64>);
    eprintln!("t7a seed: {seed} (replay with VIGIL_STATE_SEED={seed})");
    let mut rng = StdRng::seed_from_u64(seed);
    let mut k = 0;
    for _ in 0..6 {
        let mut w = Wire::app_session(s.node.port(), &s.token).await;
        let mut sent = Vec::new();
        for _ in 0..40 {
            // Sometimes two batches before reading: the second depends on the first's outcome.
            let pipelined = if rng.random_bool(0.25) { 2 } else { 1 };
            for _ in 0..pipelined {
                let b = random_batch(&mut rng, &mut k);
                sent.push(
                    b.iter()
                        .map(|m| {
                            format!(
                                "{}:{}",
                                m[0] as char,
                                String::from_utf8_lossy(&m[5..]).replace('\0', "|")
                            )
                        })
                        .collect::<Vec<_>>()
                        .join(" "),
                );
                w.send(&b.concat()).await;
            }
            for _ in 0..pipelined {
                if let Err(e) = w.try_until_ready().await {
                    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
                    let records = s.node.records().await;
                    let sess = records.last().and_then(|r| r.body.session.clone());
                    let last: Vec<_> = records
                        .iter()
                        .filter(|r| r.body.session == sess)
                        .map(|r| {
                            format!(
                                "{:?} {:?} {:?} {:?} {:?}",
                                r.body.kind,
                                r.body.stmt,
                                r.body
                                    .pg_request()
                                    .map(|q| (&q.text, &q.statement, &q.portal)),
                                r.body.outcome,
                                r.body.detail
                            )
                        })
                        .collect();
                    panic!(
                        "seed {seed}: the gateway ended the session ({e}): {sent:#?}\n{last:#?}"
                    );
                }
            }
        }
        w.send(&wire::typed(b'X', &[])).await;
        w.until_closed().await;
    }
    let ran = s.ran();
    assert!(ran.len() > 50, "the run executed statements: {}", ran.len());
    assert_records_name_what_ran(&ran, &s.node.records().await, &format!("seed {seed}"));
}

/// A statement that runs a prepared statement from inside another (`EXPLAIN ANALYZE`,
/// `CREATE TABLE … AS EXECUTE`, both at once) is decided, held and recorded on what the name
/// holds, however deep the wrapping.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t7i_a_prepared_statement_run_from_inside_another_is_held() {
    let s = setup().await;
    let mut w = Wire::app_session(s.node.port(), &s.token).await;
    let update = "UPDATE payroll SET amount = amount + 1 WHERE id = 1";
    let r = w.batch(&[wire::parse("s", update), wire::sync()]).await;
    assert!(errors(&r).is_empty(), "preparing runs nothing: {r:?}");
    let wrappers = [
        "EXPLAIN ANALYZE CREATE TEMP TABLE x AS EXECUTE s",
        "CREATE TEMP TABLE y AS EXECUTE s",
        "EXPLAIN ANALYZE EXECUTE s",
    ];
    for sql in wrappers {
        let r = w.batch(&[wire::query(sql)]).await;
        let errs = errors(&r);
        assert_eq!(
            errs.len(),
            1,
            "{sql}: held, then refused (no approver waits)"
        );
        assert!(
            errs[0].1.contains("payroll-needs-approval"),
            "{sql}: {errs:?}"
        );
    }
    // What PostgreSQL ran before the test's own look at the table.
    let ran = s.ran();
    assert_eq!(s.amount().await, 100, "the UPDATE never ran");
    assert!(!wrappers.iter().any(|w| ran_text(&ran, w)), "{ran:#?}");
    // Each refusal's record names what the name holds.
    let records = s.node.records().await;
    for sql in wrappers {
        let named = records
            .iter()
            .filter_map(|r| r.body.pg_request())
            .find(|r| r.text == sql)
            .unwrap_or_else(|| panic!("no record of {sql}"));
        assert_eq!(named.prepared[0].text, update, "{sql}");
    }
    assert_records_name_what_ran(&ran, &records, "t7i");
}

/// SQL the gateway does not see (a `DO` block's dynamic SQL) can replace what a name holds:
/// after it, the gateway refuses the names it knew until they are made again, so no record
/// names a statement the target no longer holds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t7j_names_are_not_trusted_after_sql_the_gateway_did_not_see() {
    let s = setup().await;
    let mut w = Wire::app_session(s.node.port(), &s.token).await;
    let r = w
        .batch(&[wire::parse("s1", "SELECT 'harmless'"), wire::sync()])
        .await;
    assert!(errors(&r).is_empty(), "{r:?}");
    let swap = "DO $$BEGIN EXECUTE 'DEALLOCATE s1'; \
                EXECUTE 'PREPARE s1 AS UPDATE payroll SET amount = 0 WHERE id = 1'; END$$";
    let r = w.batch(&[wire::query(swap)]).await;
    assert!(errors(&r).is_empty(), "the DO block runs: {r:?}");
    let r = w
        .batch(&[wire::bind("", "s1", &[]), wire::execute(""), wire::sync()])
        .await;
    let errs = errors(&r);
    assert_eq!(errs.len(), 1, "refused: {errs:?}");
    assert!(errs[0].1.contains("unknown-prepared-statement"), "{errs:?}");
    let r = w.batch(&[wire::query("EXECUTE s1")]).await;
    assert_eq!(errors(&r).len(), 1, "refused: {r:?}");
    // Closed and made again, the name is the gateway's to vouch for again.
    let r = w
        .batch(&[
            wire::close(b'S', "s1"),
            wire::parse("s1", "SELECT 'again'"),
            wire::bind("", "s1", &[]),
            wire::execute(""),
            wire::sync(),
        ])
        .await;
    assert!(errors(&r).is_empty(), "{:?}", errors(&r));
    assert!(
        r.iter().any(|m| m.values() == [Some("again".to_string())]),
        "{r:?}"
    );
    let ran = s.ran();
    assert_eq!(s.amount().await, 100, "the swapped-in UPDATE never ran");
    assert_records_name_what_ran(&ran, &s.node.records().await, "t7j");
}

/// t7k: outside a transaction block an extended batch is one implicit transaction that
/// commits at its Sync. When it ends with an error instead (its Sync fails at a deferred
/// constraint, a later message fails, or the gateway refuses one), what its earlier
/// statements did is rolled back although their `response` records say they completed: an
/// `unsolicited` error record names them. PostgreSQL's table is the ground truth.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t7k_a_batch_whose_implicit_transaction_fails_says_what_was_rolled_back() {
    let s = setup().await;
    let su = direct_superuser(&s.node.files.db).await;
    su.batch_execute(&format!(
        "CREATE TABLE rb (id int PRIMARY KEY DEFERRABLE INITIALLY DEFERRED);
         ALTER TABLE rb OWNER TO {}",
        env().get("VIGIL_PG_GATEWAY_USER")
    ))
    .await
    .unwrap();
    let log_offset = pg_log_len();
    let mut w = Wire::app_session(s.node.port(), &s.token).await;
    let run = |sql: &str| {
        vec![
            wire::parse("", sql),
            wire::bind("", "", &[]),
            wire::execute(""),
        ]
    };
    let batch = |parts: &[Vec<Vec<u8>>]| {
        let mut msgs: Vec<Vec<u8>> = parts.concat();
        msgs.push(wire::sync());
        msgs
    };
    // Both rows go in; the key is checked at commit, at the Sync.
    let r = w
        .batch(&batch(&[
            run("INSERT INTO rb VALUES (1)"),
            run("INSERT INTO rb VALUES (1) -- again"),
        ]))
        .await;
    assert_eq!(errors(&r).len(), 1, "{:?}", errors(&r));
    assert_eq!(errors(&r)[0].0, "23505");
    // A later statement fails.
    let r = w
        .batch(&batch(&[
            run("INSERT INTO rb VALUES (2)"),
            run("SELECT 1/0"),
        ]))
        .await;
    assert_eq!(errors(&r)[0].0, "22012");
    // The gateway refuses a later statement (it needs an approval, and this policy's
    // approvals do not wait).
    let r = w
        .batch(&batch(&[
            run("INSERT INTO rb VALUES (3)"),
            run("UPDATE payroll SET amount = 0 WHERE id = 1"),
        ]))
        .await;
    assert_eq!(errors(&r).len(), 1, "{:?}", errors(&r));
    // Inside a transaction block the block's own end says what happened: no such record.
    w.batch(&[wire::query("BEGIN")]).await;
    w.batch(&batch(&[
        run("INSERT INTO rb VALUES (4)"),
        run("SELECT 1/0"),
    ]))
    .await;
    w.batch(&[wire::query("ROLLBACK")]).await;
    // And a batch that commits.
    let r = w.batch(&batch(&[run("INSERT INTO rb VALUES (5)")])).await;
    assert!(errors(&r).is_empty(), "{:?}", errors(&r));
    // A simple Query of several statements is one implicit transaction too: its response
    // record says what was rolled back; not when a COMMIT in it ended that transaction first.
    let rolled = "INSERT INTO rb VALUES (6); INSERT INTO rb VALUES (7); SELECT 1/0";
    let committed = "INSERT INTO rb VALUES (8); COMMIT; SELECT 1/0";
    for text in [rolled, committed] {
        let r = w.batch(&[wire::query(text)]).await;
        assert_eq!(errors(&r)[0].0, "22012", "{text}");
    }
    // What PostgreSQL ran (its log), before the read below adds to it.
    let ran = pg_executed(&s.node.files.db, log_offset);

    let rows: Vec<i32> = su
        .query("SELECT id FROM rb ORDER BY id", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(
        rows,
        [5, 8],
        "PostgreSQL kept the last batch's row and the committed one"
    );

    let records = s.node.records().await;
    let stmt_of = |text: &str| {
        records
            .iter()
            .find(|r| {
                r.body.kind == Kind::Request && r.body.pg_request().is_some_and(|q| q.text == text)
            })
            .and_then(|r| r.body.stmt)
            .unwrap_or_else(|| panic!("no request record for {text}"))
    };
    let rollbacks: Vec<_> = records
        .iter()
        .filter(|r| r.body.kind == Kind::Unsolicited)
        .map(|r| {
            let error = r.body.pg_response().and_then(|x| x.error.clone());
            (
                r.body.outcome,
                error.map(|e| e.sqlstate),
                r.body.detail.clone().unwrap_or_default(),
            )
        })
        .collect();
    let (a, b) = (
        stmt_of("INSERT INTO rb VALUES (1)"),
        stmt_of("INSERT INTO rb VALUES (1) -- again"),
    );
    let expected = [
        (
            "23505",
            format!("the target failed the batch's Sync: the batch's implicit transaction did not commit, so what statements {a} to {b} did (recorded as completed) was rolled back"),
        ),
        (
            "22012",
            format!("a message of the batch failed: the batch's implicit transaction did not commit, so what statement {} did (recorded as completed) was rolled back", stmt_of("INSERT INTO rb VALUES (2)")),
        ),
        (
            "42501",
            format!("the gateway refused a message of the batch: the batch's implicit transaction did not commit, so what statement {} did (recorded as completed) was rolled back", stmt_of("INSERT INTO rb VALUES (3)")),
        ),
    ];
    assert_eq!(rollbacks.len(), expected.len(), "{rollbacks:#?}");
    for ((outcome, sqlstate, detail), (want_state, want_detail)) in rollbacks.iter().zip(&expected)
    {
        assert_eq!(*outcome, Some(Outcome::Error));
        assert_eq!(sqlstate.as_deref(), Some(*want_state), "{detail}");
        assert_eq!(detail, want_detail);
    }
    let query_detail = |text: &str| {
        let stmt = stmt_of(text);
        let response = records
            .iter()
            .find(|r| r.body.kind == Kind::Response && r.body.stmt == Some(stmt))
            .unwrap_or_else(|| panic!("no response record for {text}"));
        assert_eq!(response.body.outcome, Some(Outcome::Error), "{text}");
        response.body.detail.clone()
    };
    assert_eq!(
        query_detail(rolled).as_deref(),
        Some("the query's implicit transaction did not commit, so what its first 2 statements did (recorded as completed in tags) was rolled back")
    );
    assert_eq!(query_detail(committed), None);
    assert_records_name_what_ran(&ran, &records, "t7k");
}
