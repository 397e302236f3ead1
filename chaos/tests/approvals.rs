//! An approval lets run exactly the statement the approver was shown: the same resolved text,
//! parameters (bytes, formats, declared types), database, role and search_path. Ground truth:
//! PostgreSQL's `log_statement=all`, the tables' contents, and the audit files.

use vigil_chaos::wire::{self, Msg, Wire};
use vigil_chaos::*;
use vigil_proto::record::Kind;

const POLICY: &str = r#"
[[policy.rules]]
id = "writes-need-approval"
action = "require_approval"
kinds = ["write"]
approval = { approvers = "approvers", wait_secs = 0, ttl_secs = 600 }

[[policy.rules]]
id = "setval-needs-approval"
action = "require_approval"
functions = ["setval"]
approval = { approvers = "approvers", wait_secs = 0, ttl_secs = 600 }

[[policy.rules]]
id = "ddl-needs-ops"
action = "require_approval"
kinds = ["ddl"]
approval = { approvers = "ops", wait_secs = 0, ttl_secs = 600 }

[policy.masking]
detectors = [
  { kind = "email", method = "redact" },
  { kind = "phone", method = "redact" },
]
"#;

struct Setup {
    node: TestNode,
    token: String,
    coord: String,
    log_offset: u64,
}

async fn setup() -> Setup {
    setup_with(POLICY).await
}

async fn setup_with(policy: &'static str) -> Setup {
    let node = TestNode::start(NodeOptions {
        allow_cleartext_token: true,
        extra: policy,
        ..NodeOptions::default()
    })
    .await;
    tables(&node.files.db).await;
    let coord = node.node.coordinator.join(",");
    Setup {
        token: token_for("agent-ops", "agent-ops-secret").await,
        log_offset: pg_log_len(),
        coord,
        node,
    }
}

/// Schemas `a` and `b` with a table `t` each (one row, `v = 0`) in `db`, owned by the
/// gateway's role, and a role the gateway may become that may use them.
async fn tables(db: &str) {
    let gw = env().get("VIGIL_PG_GATEWAY_USER");
    let su = direct_superuser(db).await;
    let other = format!("vt_other_{}", &db[3..]);
    su.batch_execute(&format!(
        "CREATE SCHEMA a; CREATE SCHEMA b;
         CREATE TABLE a.t (id int, v int); INSERT INTO a.t VALUES (1, 0);
         CREATE TABLE b.t (id int, v int); INSERT INTO b.t VALUES (1, 0);
         ALTER SCHEMA a OWNER TO {gw}; ALTER SCHEMA b OWNER TO {gw};
         ALTER TABLE a.t OWNER TO {gw}; ALTER TABLE b.t OWNER TO {gw};
         CREATE ROLE {other}; GRANT {other} TO {gw};
         GRANT USAGE ON SCHEMA a, b TO {other}; GRANT ALL ON a.t, b.t TO {other}"
    ))
    .await
    .unwrap();
}

impl Setup {
    /// Runs `msgs`; returns the request id of the approval it is pending on, if any.
    async fn pending(&self, w: &mut Wire, msgs: &[Vec<u8>]) -> Option<String> {
        let r = w.batch(msgs).await;
        let (_, message) = r.iter().find_map(Msg::error)?;
        let at = message
            .find("apr-")
            .unwrap_or_else(|| panic!("refused, not held: {message}"));
        Some(message[at..].split_whitespace().next()?.to_string())
    }

    /// A session of the agent through the node, its `search_path` set to schema `a`.
    async fn session(&self) -> Wire {
        let mut w = Wire::app_session(self.node.port(), &self.token).await;
        w.batch(&q("SET search_path = a")).await;
        w
    }

    /// The id of the approval request a statement is held on, once the coordinator lists it
    /// as pending (within `secs`).
    async fn held(&self, secs: u64) -> String {
        let mut id = None;
        eventually(
            "the statement is held",
            std::time::Duration::from_secs(secs),
            || {
                let list = self.cli(&["approvals", "list", "--state", "pending"]);
                id = list
                    .split_whitespace()
                    .find(|w| w.starts_with("apr-"))
                    .map(str::to_string);
                id.is_some()
            },
        )
        .await;
        id.unwrap()
    }

    fn cli(&self, args: &[&str]) -> String {
        let alice = id_token("alice");
        let mut all = args.to_vec();
        all.extend_from_slice(&["--coordinator", &self.coord, "--token", &alice]);
        let (code, out) = vigil(&all);
        assert_eq!(code, 0, "vigil {args:?}: {out}");
        out
    }

    fn approve(&self, id: &str) -> String {
        self.cli(&["approvals", "approve", "--yes", id]);
        self.cli(&["approvals", "show", id])
    }

    /// A `PREPARE` of a statement that needs approval is held like the statement: approve it
    /// and run it again.
    async fn prepare(&self, w: &mut Wire, sql: &str) {
        let id = self.pending(w, &q(sql)).await.expect("PREPARE held");
        self.approve(&id);
        assert_eq!(
            self.pending(w, &q(sql)).await,
            None,
            "approved PREPARE runs"
        );
    }

    /// How many statements PostgreSQL ran whose text contains `needle`.
    fn ran(&self, needle: &str) -> usize {
        pg_executed(&self.node.files.db, self.log_offset)
            .iter()
            .filter(|r| {
                r.text.contains(needle) || r.prepared.as_deref().is_some_and(|p| p.contains(needle))
            })
            .count()
    }

    /// The settings each run statement's approval was bound to, from its request record.
    async fn bound_settings(&self) -> Vec<String> {
        of_kind(&self.node.records().await, Kind::Request)
            .into_iter()
            .filter_map(|r| r.body.request.as_ref()?.postgres()?.binding.clone())
            .map(|b| b.settings)
            .collect()
    }

    /// Runs `sql` on the target as its superuser, not through the node.
    async fn superuser(&self, sql: &str) {
        direct_superuser(&self.node.files.db)
            .await
            .batch_execute(sql)
            .await
            .unwrap();
    }

    /// After the hold of approval request `id` ended early with `why`: that end on record
    /// before the session's, whose detail starts with `end`; then the approval, given late,
    /// runs nothing (`update` is not in PostgreSQL's log, and the table is as it was).
    async fn ended_early(&self, id: &str, why: &str, end: &str, update: &str) {
        let records = self.node.records().await;
        let ended = of_kind(&records, Kind::ApprovalDecided);
        assert_eq!(ended.len(), 1, "the wait's end is on record");
        assert_eq!(ended[0].body.detail.as_deref(), Some(why));
        assert_eq!(ended[0].body.approval.as_ref().unwrap().id, id);
        let ends = of_kind(&records, Kind::SessionEnd);
        assert_eq!(ends.len(), 1);
        let detail = ends[0].body.detail.as_deref().unwrap();
        assert!(detail.starts_with(end), "{detail}");
        assert!(ended[0].seq < ends[0].seq);
        self.approve(id);
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
        assert_eq!(self.value("a.t").await, 0, "nothing ran");
        assert_eq!(self.ran(update), 0);
    }

    async fn value(&self, table: &str) -> i32 {
        let su = direct_superuser(&self.node.files.db).await;
        su.query_one(&format!("SELECT v FROM {table} WHERE id = 1"), &[])
            .await
            .unwrap()
            .get(0)
    }
}

/// A node whose approvals wait 120 s, and a session of the agent whose `UPDATE` of `a.t` is
/// held there: the node, the session, the statement and the id of its approval request.
async fn a_held_update() -> (Setup, Wire, &'static str, String) {
    let policy = POLICY.replacen("wait_secs = 0", "wait_secs = 120", 1);
    let s = setup_with(Box::leak(policy.into_boxed_str())).await;
    let update = "UPDATE t SET v = v + 1 WHERE id = 1";
    let mut w = s.session().await;
    w.send(&wire::query(update)).await;
    let id = s.held(10).await;
    (s, w, update, id)
}

fn q(sql: &str) -> Vec<Vec<u8>> {
    vec![wire::query(sql)]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t88_search_path_and_role_are_bound() {
    let s = setup().await;
    let mut w = Wire::app_session(s.node.port(), &s.token).await;
    let update = "UPDATE t SET v = v + 1 WHERE id = 1";
    w.batch(&q("SET search_path = a")).await;
    let id = s.pending(&mut w, &q(update)).await.expect("held");
    let shown = s.approve(&id);
    assert!(shown.contains("search_path a\n"), "{shown}");
    assert!(
        shown.contains(&format!("statement   {update}\n")),
        "{shown}"
    );
    // Another schema's `t`: a different statement, held again; the approval stays unused.
    w.batch(&q("SET search_path = b")).await;
    let other = s.pending(&mut w, &q(update)).await.expect("held again");
    assert_ne!(other, id);
    // Another role: the same.
    w.batch(&q("SET search_path = a")).await;
    let role = format!("vt_other_{}", &s.node.files.db[3..]);
    w.batch(&q(&format!("SET ROLE {role}"))).await;
    let third = s
        .pending(&mut w, &q(update))
        .await
        .expect("held under another role");
    assert_ne!(third, id);
    // Back to what was approved: it runs, once.
    w.batch(&q("RESET ROLE")).await;
    assert_eq!(s.pending(&mut w, &q(update)).await, None, "approved: runs");
    assert!(s.pending(&mut w, &q(update)).await.is_some(), "used up");
    assert_eq!(s.ran(update), 1, "PostgreSQL ran the update once");
    assert_eq!((s.value("a.t").await, s.value("b.t").await), (1, 0));
    let state = s.cli(&["approvals", "show", &id]);
    assert!(state.contains("state       consumed"), "{state}");
    // The records say what was bound.
    let records = s.node.records().await;
    let ran = records
        .iter()
        .find(|r| {
            r.body.kind == Kind::Request && r.body.approval.as_ref().is_some_and(|a| a.id == id)
        })
        .expect("the request that ran under the approval");
    let b = ran.body.pg_request().unwrap().binding.as_ref().unwrap();
    assert_eq!(
        (b.search_path.as_str(), b.role.as_str()),
        ("a", env().get("VIGIL_PG_GATEWAY_USER"))
    );
}

/// 1234 as PostgreSQL's binary int4.
const BINARY_1234: [u8; 4] = 1234i32.to_be_bytes();

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t89_parameters_are_bound_with_format_and_type_and_shown() {
    let s = setup().await;
    let mut w = s.session().await;
    let sql = "UPDATE t SET v = $1 WHERE id = 1";
    let text_run = |value: &[u8], binary: bool| {
        vec![
            wire::parse_typed("", sql, &[23]),
            wire::bind_formats("", "", &[Some(value)], binary),
            wire::execute(""),
            wire::sync(),
        ]
    };
    let id = s
        .pending(&mut w, &text_run(b"1234", false))
        .await
        .expect("held");
    let shown = s.approve(&id);
    assert!(
        shown.contains("param $1    '1234' (text, declared type int4 (oid 23))"),
        "{shown}"
    );
    // The same number as binary int4 bytes: another request.
    let binary = s
        .pending(&mut w, &text_run(&BINARY_1234, true))
        .await
        .expect("held");
    assert_ne!(binary, id);
    let shown = s.cli(&["approvals", "show", &binary]);
    // (The CLI escapes the backslash of the hex form.)
    assert!(shown.contains(r"'\\x000004d2' (binary"), "{shown}");
    assert_eq!(s.ran("UPDATE t SET v = $1"), 0);
    assert_eq!(s.pending(&mut w, &text_run(b"1234", false)).await, None);
    assert_eq!(s.value("a.t").await, 1234);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t8a_execute_name_binds_the_prepared_text() {
    let s = setup().await;
    let mut w = s.session().await;
    s.prepare(&mut w, "PREPARE p AS UPDATE t SET v = 7 WHERE id = 1")
        .await;
    let id = s.pending(&mut w, &q("EXECUTE p")).await.expect("held");
    let shown = s.approve(&id);
    assert!(
        shown.contains("runs        p = PREPARE p AS UPDATE t SET v = 7 WHERE id = 1"),
        "{shown}"
    );
    // Another session prepares `p` as something else: the approval does not cover it.
    let mut other = s.session().await;
    s.prepare(&mut other, "PREPARE p AS UPDATE t SET v = 666 WHERE id = 1")
        .await;
    assert!(s.pending(&mut other, &q("EXECUTE p")).await.is_some());
    assert_eq!(s.value("a.t").await, 0);
    assert_eq!(s.pending(&mut w, &q("EXECUTE p")).await, None);
    assert_eq!(s.value("a.t").await, 7);
}

/// An approved SQL `PREPARE` lets the name be made, not run: each protocol Bind and Execute
/// of the name is held again, as `EXECUTE name` is, and runs once per approval.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t8g_a_sql_prepared_body_is_held_at_every_protocol_execute() {
    let s = setup().await;
    let mut w = s.session().await;
    let prepare = "PREPARE p AS UPDATE t SET v = v + 5 WHERE id = 1";
    s.prepare(&mut w, prepare).await;
    let run = [wire::bind("", "p", &[]), wire::execute(""), wire::sync()];
    let id = s.pending(&mut w, &run).await.expect("the Execute is held");
    assert_eq!(s.value("a.t").await, 0);
    let shown = s.approve(&id);
    assert!(shown.contains(prepare), "{shown}");
    assert_eq!(s.pending(&mut w, &run).await, None, "approved, it runs");
    assert_eq!(s.value("a.t").await, 5);
    // Once: the next Execute is held again.
    assert!(s.pending(&mut w, &run).await.is_some());
    assert_eq!(s.value("a.t").await, 5);
}

/// The first error of a batch's answer.
fn refusal(r: &[Msg]) -> Option<(String, String)> {
    r.iter().find_map(Msg::error)
}

/// A portal bound over the protocol runs what it was bound to, decided at its Execute: SQL
/// `FETCH` and `MOVE` of it (which would run a held statement with no approval, and be on
/// record as a `FETCH`) are refused, by a Query or by a prepared statement.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t8h_a_protocol_portal_is_not_run_by_sql_fetch_or_move() {
    let s = setup().await;
    let mut w = s.session().await;
    let update = "UPDATE t SET v = v + 1 WHERE id = 1 RETURNING v";
    let fetches: [&[Vec<u8>]; 3] = [
        &q("FETCH ALL FROM p"),
        &q("MOVE ALL IN p"),
        &[
            wire::parse("f", "FETCH ALL FROM p"),
            wire::bind("", "f", &[]),
            wire::execute(""),
            wire::sync(),
        ],
    ];
    for fetch in fetches {
        w.batch(&q("BEGIN")).await;
        // The held UPDATE parsed and bound, never executed.
        let r = w
            .batch(&[
                wire::parse("u", update),
                wire::bind("p", "u", &[]),
                wire::sync(),
            ])
            .await;
        assert_eq!(refusal(&r), None);
        let r = w.batch(fetch).await;
        let (code, message) = refusal(&r).expect("refused");
        assert_eq!(code, "42501", "{message}");
        assert!(
            message.contains("\"p\" was bound over the extended protocol"),
            "{message}"
        );
        w.batch(&q("ROLLBACK")).await;
        w.batch(&[wire::close(b'S', "u"), wire::close(b'S', "f"), wire::sync()])
            .await;
    }
    assert_eq!(s.value("a.t").await, 0, "the UPDATE never ran");
    assert_eq!(s.ran("FETCH") + s.ran("MOVE"), 0);
    let records = s.node.records().await;
    assert_eq!(pg_blocked_by(&records, "portal-by-sql").len(), 3);
    // A cursor of its own is fetched as always.
    let r = w
        .batch(&q(
            "BEGIN; DECLARE c NO SCROLL CURSOR FOR SELECT v FROM t; FETCH ALL FROM c; COMMIT",
        ))
        .await;
    assert_eq!(refusal(&r), None);
}

/// A held statement is not bound on the target before its Execute is approved: a portal the
/// target held could be run by name from SQL with no Execute (`cursor_to_xml`, a PL/pgSQL
/// function that FETCHes a refcursor; the unnamed portal by its empty name). The client's
/// Describe of the portal is answered with the formats it asked for, and the approved Execute
/// runs the statement once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t8m_a_held_statement_is_not_bound_on_the_target_before_its_approval() {
    let s = setup().await;
    let su = direct_superuser(&s.node.files.db).await;
    su.batch_execute(
        "CREATE FUNCTION public.drain(c refcursor) RETURNS int LANGUAGE plpgsql AS $$
         DECLARE r record; n int := 0;
         BEGIN LOOP FETCH c INTO r; EXIT WHEN NOT FOUND; n := n + 1; END LOOP; RETURN n; END $$",
    )
    .await
    .unwrap();
    let mut w = s.session().await;
    let update = "UPDATE t SET v = v + 1 WHERE id = 1 RETURNING v";
    for (portal, runner) in [
        ("p", "SELECT cursor_to_xml('p', 10, false, false, '')"),
        ("p", "SELECT public.drain('p')"),
        ("", "SELECT cursor_to_xml('', 10, false, false, '')"),
        ("", "SELECT public.drain('')"),
    ] {
        // One batch, so one transaction: the UPDATE parsed and bound, never executed, then a
        // statement that fetches its portal by name.
        let r = w
            .batch(&[
                wire::parse("u", update),
                wire::bind(portal, "u", &[]),
                wire::parse("f", runner),
                wire::bind("x", "f", &[]),
                wire::execute("x"),
                wire::sync(),
            ])
            .await;
        assert_eq!(r.iter().filter(|m| m.tag == b'2').count(), 2, "{r:?}");
        let (code, message) = refusal(&r).expect("no such portal on the target");
        assert_eq!(code, "34000", "{runner}: {message}");
        w.batch(&[wire::close(b'S', "u"), wire::close(b'S', "f"), wire::sync()])
            .await;
    }
    assert_eq!(s.value("a.t").await, 0, "the UPDATE never ran");

    // As libpq's PQexecParams sends it, with binary results: held, then approved, it runs once.
    let run = [
        wire::parse("", update),
        wire::bind_binary_results("", ""),
        wire::describe(b'P', ""),
        wire::execute(""),
        wire::sync(),
    ];
    let id = s.pending(&mut w, &run).await.expect("held");
    s.approve(&id);
    let r = w.batch(&run).await;
    let tags: String = r.iter().map(|m| m.tag as char).collect();
    assert_eq!(tags, "12TDCZ", "{r:?}");
    let description = &r[2];
    assert_eq!(description.columns(), ["v"]);
    assert_eq!(
        description.body[description.body.len() - 2..],
        [0, 1],
        "binary"
    );
    assert_eq!(
        r[3].body[2..],
        [0, 0, 0, 4, 0, 0, 0, 1],
        "v = 1 as binary int4"
    );
    assert_eq!(s.value("a.t").await, 1);
    assert_eq!(s.ran("UPDATE t SET v = v + 1"), 1);

    // A portal whose statement was replaced after its Bind is refused: a Bind sent now would
    // bind what the name holds now.
    let r = w
        .batch(&[
            wire::parse("u", update),
            wire::bind("p", "u", &[]),
            wire::close(b'S', "u"),
            wire::parse("u", "UPDATE t SET v = v + 100 WHERE id = 1"),
            wire::describe(b'P', "p"),
            wire::execute("p"),
            wire::sync(),
        ])
        .await;
    let (code, message) = refusal(&r).expect("refused");
    assert_eq!(code, "42501", "{message}");
    assert!(
        message.contains("closed or replaced after portal \"p\""),
        "{message}"
    );
    assert_eq!(s.value("a.t").await, 1);
    let records = s.node.records().await;
    assert_eq!(pg_blocked_by(&records, "portal-statement-changed").len(), 1);

    // A named portal that exists is not bound again, as PostgreSQL refuses it: at the Bind,
    // not after an approval that the late Bind would then waste.
    w.batch(&q("BEGIN")).await;
    let r = w
        .batch(&[
            wire::parse("s", "SELECT 1"),
            wire::bind("q", "s", &[]),
            wire::execute("q"),
            wire::sync(),
        ])
        .await;
    assert_eq!(refusal(&r), None);
    let r = w
        .batch(&[
            wire::parse("u2", update),
            wire::bind("q", "u2", &[]),
            wire::execute("q"),
            wire::sync(),
        ])
        .await;
    let (code, message) = refusal(&r).expect("refused");
    assert_eq!(
        (code.as_str(), message.as_str()),
        ("42P03", "cursor \"q\" already exists")
    );
    w.batch(&q("ROLLBACK")).await;
    assert_eq!(s.value("a.t").await, 1);
}

/// An approval lets a statement run once. A cursor over a held statement that could run its
/// query again (moved back, or run again to completion at COMMIT when declared WITH HOLD) is
/// refused; one declared NO SCROLL and WITHOUT HOLD is held, and runs its query once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t8i_a_held_cursor_runs_its_query_once() {
    let s = setup().await;
    let gw = env().get("VIGIL_PG_GATEWAY_USER");
    s.superuser(&format!(
        "CREATE SEQUENCE a.s; ALTER SEQUENCE a.s OWNER TO {gw}"
    ))
    .await;
    let mut w = s.session().await;
    let query = "FOR SELECT setval('a.s', pg_catalog.nextval('a.s') + 10) FROM t";
    for cursor in ["CURSOR", "SCROLL CURSOR", "NO SCROLL CURSOR WITH HOLD"] {
        let declare = format!("DECLARE c {cursor} {query}");
        w.batch(&q("BEGIN")).await;
        let r = w.batch(&q(&declare)).await;
        let (code, message) = refusal(&r).expect("refused");
        assert_eq!(code, "42501", "{declare}: {message}");
        assert!(message.contains("NO SCROLL and WITHOUT HOLD"), "{message}");
        w.batch(&q("ROLLBACK")).await;
    }
    let declare = format!("DECLARE c NO SCROLL CURSOR WITHOUT HOLD {query}");
    w.batch(&q("BEGIN")).await;
    let id = s.pending(&mut w, &q(&declare)).await.expect("held");
    w.batch(&q("ROLLBACK")).await;
    s.approve(&id);
    w.batch(&q("BEGIN")).await;
    assert_eq!(
        s.pending(&mut w, &q(&declare)).await,
        None,
        "approved: runs"
    );
    let r = w.batch(&q("FETCH ALL FROM c")).await;
    assert_eq!(refusal(&r), None);
    let r = w.batch(&q("FETCH ABSOLUTE 1 FROM c")).await;
    let (_, message) = refusal(&r).expect("a NO SCROLL cursor does not go back");
    assert!(message.contains("can only scan forward"), "{message}");
    w.batch(&q("ROLLBACK")).await;
    let su = direct_superuser(&s.node.files.db).await;
    let last: i64 = su
        .query_one("SELECT last_value FROM a.s", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(last, 11, "the query ran once for its one row");
}

/// A client that hangs up while its statement waits for a decision gets nothing run: an
/// approval given afterwards stays unused, until the client connects again and sends the
/// statement again, which then runs once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t8k_a_held_statement_whose_client_left_does_not_run() {
    let (s, w, update, id) = a_held_update().await;
    drop(w);
    // The gateway notices the client is gone before anyone decides.
    let records_end = || async { of_kind(&s.node.records().await, Kind::SessionEnd).len() };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while records_end().await == 0 {
        assert!(std::time::Instant::now() < deadline, "the session ended");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    // The wait's end is on record: the request stays pending.
    let records = s.node.records().await;
    let ended = of_kind(&records, Kind::ApprovalDecided);
    assert_eq!(ended.len(), 1);
    assert_eq!(
        ended[0].body.detail.as_deref(),
        Some("the client left while it was held")
    );
    s.approve(&id);
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    assert_eq!(
        s.value("a.t").await,
        0,
        "nothing ran for the client that left"
    );
    assert_eq!(s.ran(update), 0);
    let state = s.cli(&["approvals", "show", &id]);
    assert!(state.contains("state       approved"), "{state}");
    // Sent again from a new session: it runs, once.
    let mut w = s.session().await;
    assert_eq!(refusal(&w.batch(&q(update)).await), None);
    assert_eq!(s.value("a.t").await, 1);
    assert_eq!(s.ran(update), 1);
}

/// A statement held when its session's token expires stops waiting then: the wait's end is
/// on record with why, the session ends as every session does at its token's expiry, and an
/// approval given afterwards runs nothing. (Before, the expiry dropped the session in the
/// middle of the hold: no record said the wait had ended.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t8o_a_held_statement_stops_waiting_when_its_token_expires() {
    let policy = POLICY.replacen("wait_secs = 0", "wait_secs = 120", 1);
    let s = setup_with(Box::leak(policy.into_boxed_str())).await;
    let exp = now_secs() + 4;
    let token = forge(
        &tokens::with(&base_claims(), "exp", serde_json::json!(exp)),
        env().get("VIGIL_OIDC_KID"),
        None,
    );
    let update = "UPDATE t SET v = v + 1 WHERE id = 1";
    let mut w = Wire::app_session(s.node.port(), &token).await;
    w.batch(&q("SET search_path = a")).await;
    w.send(&wire::query(update)).await;
    let id = s.held(3).await;
    // The client is told its token expired, and the session ends.
    let said = String::from_utf8_lossy(&w.until_closed().await).into_owned();
    assert!(now_secs() >= exp, "not before the expiry");
    assert!(said.contains("token expired"), "{said}");
    s.ended_early(
        &id,
        "the token expired while it was held",
        "token expired",
        update,
    )
    .await;
}

/// At the node's drain deadline a held statement stops waiting as at its token's expiry: the
/// wait's end is on record with why, the session ends as every session does then, and the
/// statement does not run.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t8p_a_held_statement_stops_waiting_at_the_drain_deadline() {
    let policy = POLICY.replacen("wait_secs = 0", "wait_secs = 120", 1);
    let (pg_port, admin_port) = (free_port(), free_port());
    let files = NodeFiles::new(&NodeOptions {
        pg_port,
        admin_port,
        allow_cleartext_token: true,
        node_extra: "drain_timeout_secs = 1",
        extra: Box::leak(policy.into_boxed_str()),
        ..NodeOptions::default()
    })
    .await;
    tables(&files.db).await;
    let offset = pg_log_len();
    let mut child = spawn_node(&files, admin_port).await;
    let token = token_for("agent-ops", "agent-ops-secret").await;
    let update = "UPDATE t SET v = v + 1 WHERE id = 1";
    let mut w = Wire::app_session(pg_port, &token).await;
    w.batch(&q("SET search_path = a")).await;
    w.send(&wire::query(update)).await;
    eventually(
        "the statement is held",
        std::time::Duration::from_secs(10),
        || {
            files
                .records()
                .iter()
                .any(|r| r.body.kind == Kind::ApprovalRequested)
        },
    )
    .await;
    let term = std::process::Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(term.success());
    let said = String::from_utf8_lossy(&w.until_closed().await).into_owned();
    assert!(said.contains("shutting down"), "{said}");
    let exited = tokio::task::spawn_blocking(move || child.wait().unwrap())
        .await
        .unwrap();
    assert!(exited.success(), "{exited:?}");
    let records = files.records();
    let ended = of_kind(&records, Kind::ApprovalDecided);
    assert_eq!(ended.len(), 1, "the wait's end is on record");
    assert_eq!(
        ended[0].body.detail.as_deref(),
        Some("the node ended its sessions (drain deadline) while it was held")
    );
    let end = of_kind(&records, Kind::SessionEnd);
    assert_eq!(end.len(), 1);
    assert!(ended[0].seq < end[0].seq);
    let su = direct_superuser(&files.db).await;
    let v: i32 = su
        .query_one("SELECT v FROM a.t WHERE id = 1", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(v, 0, "nothing ran");
    assert!(!pg_executed(&files.db, offset)
        .iter()
        .any(|r| r.text.contains(update)));
}

/// The target ending the session while a statement is held (an administrator's
/// `pg_terminate_backend`, a restart) ends the wait as the client's leaving does: the wait's
/// end is on record with why, before the session's end, and the statement does not run, even
/// once approved.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t8q_a_held_statement_stops_waiting_when_the_target_ends_the_session() {
    let (s, mut w, update, id) = a_held_update().await;
    let gw = env().get("VIGIL_PG_GATEWAY_USER");
    s.superuser(&format!(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity
         WHERE datname = current_database() AND usename = '{gw}'"
    ))
    .await;
    let said = String::from_utf8_lossy(&w.until_closed().await).into_owned();
    assert!(said.contains("administrator command"), "{said}");
    let why = "the target ended the session while it was held";
    s.ended_early(&id, why, "target closed the connection", update)
        .await;
}

/// Settings beyond the search_path change what the same text does: under
/// `transform_null_equals = on`, `WHERE v = NULL` matches rows. The approval binds them and
/// the approver is shown them; under other settings the statement is held again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t8l_other_settings_are_bound_and_shown() {
    let s = setup().await;
    let mut w = s.session().await;
    let update = "UPDATE t SET v = 7 WHERE v = NULL OR id = 2";
    w.batch(&q("SET transform_null_equals = on")).await;
    let id = s.pending(&mut w, &q(update)).await.expect("held");
    let shown = s.approve(&id);
    assert!(
        shown.contains("settings    transform_null_equals='on'\n"),
        "{shown}"
    );
    // Without the setting it is another statement: held again, the approval unused.
    w.batch(&q("RESET transform_null_equals")).await;
    let other = s.pending(&mut w, &q(update)).await.expect("held again");
    assert_ne!(other, id);
    assert!(!s.cli(&["approvals", "show", &other]).contains("settings "));
    assert_eq!(s.value("a.t").await, 0);
    // Under what was approved: it runs, once, and matches the row whose v is NULL.
    s.superuser("UPDATE a.t SET v = NULL").await;
    w.batch(&q("SET transform_null_equals = on")).await;
    assert_eq!(s.pending(&mut w, &q(update)).await, None, "approved: runs");
    assert_eq!(s.value("a.t").await, 7);
    assert_eq!(s.ran(update), 1);
    assert_eq!(s.bound_settings().await, ["transform_null_equals='on'"]);

    // A value may hold `; name=value` (a list of quoted names): quoted as a literal, it does
    // not read as the setting approved above, and the statement is held again.
    w.batch(&q("RESET transform_null_equals")).await;
    let forged = "SET local_preload_libraries = 'x;', 'transform_null_equals=on'";
    assert_eq!(refusal(&w.batch(&q(forged)).await), None);
    let id = s.pending(&mut w, &q(update)).await.expect("held again");
    let shown = s.cli(&["approvals", "show", &id]);
    assert!(
        shown.contains(
            "settings    local_preload_libraries='\"x;\", \"transform_null_equals=on\"'\n"
        ),
        "{shown}"
    );
}

/// Custom settings (`app.*`, what row-level security policies read) are in no list PostgreSQL
/// keeps: the approval binds, by name, those the session set (`SET`, `set_config`) and those
/// `ALTER ROLE … SET` gave its login. Approved where the statement matches no row, it does not
/// run where the setting makes it match one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t8n_custom_settings_are_bound_and_shown() {
    let s = setup().await;
    let update = "UPDATE t SET v = 7 WHERE id = pg_catalog.current_setting('app.row')::int";
    let shows = |id: &str, value: &str| {
        let shown = s.cli(&["approvals", "show", id]);
        assert!(
            shown.contains(&format!("settings    app.row='{value}'\n")),
            "{shown}"
        );
    };
    let mut w = s.session().await;
    w.batch(&q("SET app.row = '2'")).await;
    let id = s.pending(&mut w, &q(update)).await.expect("held");
    s.approve(&id);
    shows(&id, "2");
    // Set again, by set_config and spelt otherwise: another value, another statement.
    let set = "SELECT pg_catalog.set_config('App.Row', '1', false)";
    assert_eq!(refusal(&w.batch(&q(set)).await), None);
    let other = s.pending(&mut w, &q(update)).await.expect("held again");
    assert_ne!(other, id);
    shows(&other, "1");

    // A new session whose login has the value from ALTER ROLE … IN DATABASE: bound too (next
    // to a setting only a superuser may read, which the probe must not ask for).
    let (gw, db) = (env().get("VIGIL_PG_GATEWAY_USER"), &s.node.files.db);
    s.superuser(&format!(
        "ALTER ROLE {gw} IN DATABASE {db} SET app.row = '1';
         ALTER ROLE {gw} IN DATABASE {db} SET dynamic_library_path = '$libdir'"
    ))
    .await;
    let mut w = s.session().await;
    let third = s
        .pending(&mut w, &q(update))
        .await
        .expect("held under the role's value");
    assert_ne!(third, id);
    shows(&third, "1");
    assert_eq!(s.ran(update), 0);
    assert_eq!(s.value("a.t").await, 0);

    // Under the approved value it runs, once, and matches nothing.
    w.batch(&q("SET app.row = '2'")).await;
    assert_eq!(s.pending(&mut w, &q(update)).await, None, "approved: runs");
    assert_eq!(s.ran(update), 1);
    assert_eq!(s.value("a.t").await, 0);
    assert_eq!(s.bound_settings().await, ["app.row='2'"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t8b_the_approver_sees_all_of_it_and_masking_keeps_its_shape() {
    let s = setup().await;
    let mut w = s.session().await;
    // Long: past the old 16 KiB cap, the end of the statement is what matters.
    let long = format!(
        "UPDATE t SET v = 1 /* {} */ WHERE id = 1 OR true",
        "x".repeat(20_000)
    );
    let id = s.pending(&mut w, &q(&long)).await.expect("held");
    let shown = s.cli(&["approvals", "show", &id]);
    assert!(
        shown.contains("*/ WHERE id = 1 OR true"),
        "the whole text is shown"
    );
    // A phone number that runs across a line end, after a comment marker: masking it whole
    // would swallow the line break and show `+ 2671 WHERE id = 1` as part of the comment.
    let sneaky = "UPDATE t SET v = 2 -- ticket of alice@example.com, 415 555\n+ 2671 WHERE id = 1";
    let id = s.pending(&mut w, &q(sneaky)).await.expect("held");
    let shown = s.cli(&["approvals", "show", &id]);
    assert!(!shown.contains("alice@example.com"), "{shown}");
    let statement: Vec<&str> = shown
        .lines()
        .skip_while(|l| !l.starts_with("statement"))
        .take(2)
        .collect();
    assert!(statement[0].contains("-- ticket of [redacted]"), "{shown}");
    assert!(
        statement[1].ends_with("+ 2671 WHERE id = 1"),
        "the second line is shown as a line: {shown}"
    );
    // Nothing a detector covers is in clear in any file the node wrote.
    for f in files_under(s.node.files.dir.path()) {
        let bytes = std::fs::read(&f).unwrap_or_default();
        assert!(
            !String::from_utf8_lossy(&bytes).contains("alice@example.com"),
            "{} holds the address in clear",
            f.display()
        );
    }
    assert_eq!(s.ran("UPDATE t SET v ="), 0, "nothing ran unapproved");
}

/// Where the gateway cannot be sure of the settings a held statement runs under, it refuses to
/// hold it, and nothing of it runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t8d_no_hold_where_the_settings_are_not_known() {
    let s = setup().await;
    let mut w = s.session().await;
    let refusal = |r: &[Msg]| {
        r.iter()
            .find_map(Msg::error)
            .map(|(_, m)| m)
            .unwrap_or_default()
    };
    // Another statement runs before it in the same batch (it could change the settings).
    let r = w
        .batch(&[
            wire::parse("", "SELECT set_config('search_path', 'b', false)"),
            wire::bind("", "", &[]),
            wire::execute(""),
            wire::parse("", "UPDATE t SET v = 41 WHERE id = 1"),
            wire::bind("", "", &[]),
            wire::execute(""),
            wire::sync(),
        ])
        .await;
    assert!(
        refusal(&r).contains("another statement runs before it"),
        "{r:?}"
    );
    // Part of its batch went out before it: the client flushed and read the answers first.
    w.batch(&q("SET search_path = a")).await;
    w.send(
        &[
            wire::parse("", "UPDATE t SET v = 42 WHERE id = 1"),
            wire::bind("", "", &[]),
            wire::typed(b'H', &[]),
        ]
        .concat(),
    )
    .await;
    assert_eq!(w.read().await.tag, b'1');
    assert_eq!(w.read().await.tag, b'2');
    let r = w.batch(&[wire::execute(""), wire::sync()]).await;
    assert!(refusal(&r).contains("in parts"), "{r:?}");
    // An aborted transaction: the target does not answer the gateway's question.
    w.batch(&q("BEGIN")).await;
    w.batch(&q("SELECT 1/0")).await;
    let r = w.batch(&q("UPDATE t SET v = 43 WHERE id = 1")).await;
    assert!(refusal(&r).contains("did not report"), "{r:?}");
    w.batch(&q("ROLLBACK")).await;
    // More custom settings than an approval binds (256), then the statement in a batch of its
    // own: refused with why. The refusal's stand-in takes the place of the batch it refuses,
    // so the target's error for the stand-in is not read as its answer to the client's Parse.
    let sets: String = (0..257).map(|i| format!("SET app.s{i} = '1';")).collect();
    assert_eq!(refusal(&w.batch(&q(&sets)).await), "");
    let r = w
        .batch(&[
            wire::parse("", "UPDATE t SET v = 44 WHERE id = 1"),
            wire::bind("", "", &[]),
            wire::execute(""),
            wire::sync(),
        ])
        .await;
    assert!(
        refusal(&r).contains("more than 256 custom settings"),
        "{r:?}"
    );
    assert_eq!(s.ran("UPDATE t SET v = 4"), 0, "nothing held ran");
    assert_eq!(s.value("a.t").await, 0);
    let records = s.node.records().await;
    assert_eq!(
        records
            .iter()
            .filter(|r| r.body.kind == Kind::Blocked
                && r.body.detail.as_deref().is_some_and(|d| d
                    .contains("it needs approval (Vigil policy rule writes-need-approval), but")))
            .count(),
        4
    );
    assert!(
        !records.iter().any(|r| r.body.kind == Kind::Response
            && r.body
                .pg_request()
                .is_some_and(|q| q.text.contains("v = 44"))),
        "the target never saw the refused statement"
    );
    assert!(!records
        .iter()
        .any(|r| r.body.kind == Kind::ApprovalRequested));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t8c_a_message_needs_every_statements_approval() {
    let s = setup().await;
    let mut w = s.session().await;
    // A write (approvers) and DDL (ops) in one message: no one request can carry both.
    let r = w
        .batch(&q(
            "UPDATE t SET v = 5 WHERE id = 1; CREATE TABLE t2 (a int)",
        ))
        .await;
    let (_, message) = r.iter().find_map(Msg::error).expect("refused");
    assert!(message.contains("one request cannot carry"), "{message}");
    assert_eq!(s.ran("UPDATE t SET v = 5"), 0);
    let records = s.node.records().await;
    assert!(records.iter().any(|r| r.body.kind == Kind::Blocked
        && r.body
            .policy
            .as_ref()
            .is_some_and(|p| p.rule == "approval-conflict")));
}

/// `vigil approvals list` shows the beginning of each statement escaped, so that a carriage
/// return (which ends a `--` comment for PostgreSQL) cannot make the `UPDATE` after it read as
/// part of the comment, and marks what it cut. A decision asks first: without a terminal and
/// without `--yes` nothing is decided; at a terminal the whole request is printed, escaped,
/// and only a typed `yes` decides.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t8j_the_cli_lists_escaped_and_asks_before_it_decides() {
    let s = setup().await;
    let mut w = s.session().await;
    let sneaky = "--x\rUPDATE t SET v = 9 WHERE id = 1";
    let id = s.pending(&mut w, &q(sneaky)).await.expect("held");
    let long = format!("UPDATE t SET v = 1 WHERE id = 1 /* {} */", "y".repeat(70));
    s.pending(&mut w, &q(&long)).await.expect("held");
    let list = s.cli(&["approvals", "list", "--state", "pending"]);
    assert!(!list.contains('\r'), "{list:?}");
    let line = |id: &str| {
        list.lines()
            .find(|l| l.starts_with(id))
            .unwrap()
            .to_string()
    };
    assert!(
        line(&id).ends_with(r"--x\rUPDATE t SET v = 9 WHERE id = 1"),
        "{list}"
    );
    let cut: String = long.chars().take(60).collect();
    assert!(
        list.lines().any(|l| l.ends_with(&format!("{cut}…"))),
        "cut, and marked: {list}"
    );

    // No terminal, no --yes: refused, nothing decided.
    let alice = id_token("alice");
    let (code, out) = vigil(&[
        "approvals",
        "approve",
        &id,
        "--coordinator",
        &s.coord,
        "--token",
        &alice,
    ]);
    assert_eq!(code, 2, "{out}");
    assert!(out.contains("nothing was decided"), "{out}");
    let shown = s.cli(&["approvals", "show", &id]);
    assert!(shown.contains("state       pending"), "{shown}");

    // At a terminal: the request in full, escaped; anything but yes decides nothing.
    let at_terminal = || {
        vigil_chaos::tmux::Tmux::start(
            &format!(
                "{} approvals approve {id} --coordinator {} --token {alice}; sleep 60",
                bin("vigil").display(),
                s.coord
            ),
            200,
            60,
        )
    };
    let question = "approve this request, as shown above? Type yes to approve it:";
    let t = at_terminal();
    t.wait_for(question).await;
    let pane = t.pane();
    assert!(
        pane.contains(r"statement   --x\rUPDATE t SET v = 9 WHERE id = 1"),
        "{pane}"
    );
    assert!(pane.contains("target      postgres/app"), "{pane}");
    t.keys(&["no", "Enter"]);
    t.wait_for("Nothing was decided.").await;
    drop(t);
    let shown = s.cli(&["approvals", "show", &id]);
    assert!(shown.contains("state       pending"), "{shown}");
    let t = at_terminal();
    t.wait_for(question).await;
    t.keys(&["yes", "Enter"]);
    t.wait_for("state       approved").await;
    drop(t);
    assert_eq!(s.pending(&mut w, &q(sneaky)).await, None, "approved: runs");
    assert_eq!(s.value("a.t").await, 9);
    assert_eq!(s.ran("SET v = 9"), 1, "PostgreSQL ran it once");
}

/// An approval binds the rule that held the statement and the principal as rules tell its
/// tokens apart (outside review, 2026-12-07): one subject's tokens of two models, where a
/// strict rule holds `gpt-5`'s writes for the group `security` and a lenient one everyone
/// else's for `approvers`. Approved under the lenient rule (the small model's token), the
/// update is held again, not run, with the `gpt-5` token, and with a token of more groups; it
/// runs once with the token it was approved for. PostgreSQL's log is the ground truth.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t8r_an_approval_binds_the_rule_and_the_token_it_was_asked_for() {
    const ISSUER: &str = "https://vigil.test/tokens";
    let keys = tempfile::tempdir().unwrap();
    let key = keys.path().join("token-key.pem");
    vigil_chaos::saml::token_key(&key);
    let identity = format!(
        "[identity.tokens]\nissuer = \"{ISSUER}\"\nsigning_key = {{ file = \"{}\" }}\nkey_id = \"k1\"",
        key.display()
    );
    let node = TestNode::start(NodeOptions {
        allow_cleartext_token: true,
        identity_extra: Box::leak(identity.into_boxed_str()),
        extra: r#"
[[policy.rules]]
id = "gpt5-writes-need-security"
action = "require_approval"
kinds = ["write"]
principals = { models = ["gpt-5"] }
approval = { approvers = "security", wait_secs = 0, ttl_secs = 600 }

[[policy.rules]]
id = "writes-need-approval"
action = "require_approval"
kinds = ["write"]
approval = { approvers = "approvers", wait_secs = 0, ttl_secs = 600 }
"#,
        ..NodeOptions::default()
    })
    .await;
    tables(&node.files.db).await;
    let s = Setup {
        token: String::new(),
        log_offset: pg_log_len(),
        coord: node.node.coordinator.join(","),
        node,
    };
    // Tokens the cluster would issue to one subject, `agent-x`.
    let pem = std::fs::read(&key).unwrap();
    let sign = |model: &str, groups: &[&str]| {
        let now = time::OffsetDateTime::now_utc().unix_timestamp();
        let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::EdDSA);
        header.kid = Some("k1".into());
        header.typ = Some("at+jwt".into());
        let claims = serde_json::json!({
            "iss": ISSUER, "sub": "agent-x", "aud": env().get("VIGIL_OIDC_AUDIENCE"),
            "groups": groups, "model": model, "iat": now - 5, "nbf": now - 5,
            "exp": now + 600, "jti": random_suffix(),
        });
        let key = jsonwebtoken::EncodingKey::from_ed_pem(&pem).unwrap();
        jsonwebtoken::encode(&header, &claims, &key).unwrap()
    };
    let session = |token: String| {
        let port = s.node.port();
        async move {
            let mut w = Wire::app_session(port, &token).await;
            w.batch(&q("SET search_path = a")).await;
            w
        }
    };
    let update = "UPDATE t SET v = v + 1 WHERE id = 1";
    let mut small = session(sign("small-model", &["dba"])).await;
    let mut gpt5 = session(sign("gpt-5", &["dba"])).await;
    let mut more_groups = session(sign("small-model", &["dba", "ops"])).await;

    let id = s.pending(&mut small, &q(update)).await.expect("held");
    let shown = s.approve(&id);
    assert!(shown.contains("writes-need-approval"), "{shown}");
    assert!(shown.contains("state       approved"), "{shown}");
    let answer = gpt5.batch(&q(update)).await;
    let (_, held) = answer.iter().find_map(Msg::error).expect("held, not run");
    assert!(
        held.contains("rule gpt5-writes-need-security") && !held.contains(&id),
        "held under the strict rule, as a request of its own: {held}"
    );
    let other = s.pending(&mut more_groups, &q(update)).await;
    assert_ne!(other.expect("another token's update is held"), id);
    assert_eq!(s.ran(update), 0, "PostgreSQL ran nothing yet");
    assert_eq!(
        s.pending(&mut small, &q(update)).await,
        None,
        "approved: runs"
    );
    assert_eq!(s.ran(update), 1, "PostgreSQL ran it once");
    assert!(s
        .cli(&["approvals", "show", &id])
        .contains("state       consumed"));
}

/// A Query of several statements is not held when one before its last may change the settings
/// the approver is shown (outside review, 2026-12-07): `ROLLBACK` undoes the `SET ROLE` and
/// `SET search_path` of the open transaction, so `ROLLBACK; UPDATE t …`, shown as run by the
/// restricted role on schema `b`, would update `a.t` as the gateway's login. It is refused
/// (no request) and PostgreSQL runs none of it; so is one after `set_config`, called directly
/// or in SQL run as text. `BEGIN` before the write still holds, and the write alone is held as
/// ever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t8s_no_hold_where_the_message_may_change_its_settings_before_the_statement() {
    let s = setup().await;
    let mut w = s.session().await;
    let role = format!("vt_other_{}", &s.node.files.db[3..]);
    w.batch(&q("BEGIN")).await;
    w.batch(&q(&format!("SET ROLE {role}"))).await;
    w.batch(&q("SET search_path = b")).await;
    for sneaky in [
        "ROLLBACK; UPDATE t SET v = 7 WHERE id = 1",
        "SELECT set_config('search_path', 'a', false); UPDATE t SET v = 7 WHERE id = 1",
        // SQL run as text (final review, 2026-12-07): the function is out of sight.
        "SELECT query_to_xml('select set_config(''search_path'',''a'',false)', true, true, ''); \
         UPDATE t SET v = 7 WHERE id = 1",
    ] {
        let r = w.batch(&q(sneaky)).await;
        let (_, message) = r.iter().find_map(Msg::error).expect("refused");
        assert!(
            message.contains("statement 1 of the message runs before the one held")
                && !message.contains("apr-"),
            "refused, not held: {message}"
        );
        w.batch(&q("ROLLBACK")).await;
        w.batch(&q("BEGIN")).await;
    }
    w.batch(&q("ROLLBACK")).await;
    let list = s.cli(&["approvals", "list", "--state", "pending"]);
    assert!(!list.contains("apr-"), "no request: {list}");
    assert_eq!(s.ran("SET v = 7"), 0, "PostgreSQL ran none of it");
    assert_eq!((s.value("a.t").await, s.value("b.t").await), (0, 0));
    let begin = "BEGIN; UPDATE t SET v = 7 WHERE id = 1";
    assert!(s.pending(&mut w, &q(begin)).await.is_some(), "held");
    w.batch(&q("ROLLBACK")).await;
    let alone = "UPDATE t SET v = 7 WHERE id = 1";
    assert!(s.pending(&mut w, &q(alone)).await.is_some(), "held");
}

/// At a terminal, `vigil approvals show` cuts a line wider than the terminal into rows of its
/// own, each after the first behind the continuation marker: a statement padded to the edge
/// cannot make the terminal start a row with what reads as one of the request's fields
/// (`role        postgres` after a comment's padding, at 60 columns).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t8t_a_long_statement_cannot_start_a_row_of_its_own_at_a_terminal() {
    let s = setup().await;
    let mut w = s.session().await;
    // "statement   " (12) + the statement: the comment's padding ends at column 60.
    let head = "UPDATE t SET v = 3 WHERE id = 1 /*";
    let forged = format!(
        "{head}{}role        postgres */",
        " ".repeat(60 - 12 - head.len())
    );
    let id = s.pending(&mut w, &q(&forged)).await.expect("held");
    let alice = id_token("alice");
    let t = vigil_chaos::tmux::Tmux::start(
        &format!(
            "{} approvals show {id} --coordinator {} --token {alice}; sleep 60",
            bin("vigil").display(),
            s.coord
        ),
        60,
        40,
    );
    t.wait_for("expires").await;
    let pane = t.pane();
    assert!(
        pane.lines()
            .all(|row| !row.starts_with("role        postgres")),
        "{pane}"
    );
    assert!(
        pane.contains(&format!(
            "{}role        postgres */",
            vigil_node::audit::display::CONTINUATION
        )),
        "{pane}"
    );
}
