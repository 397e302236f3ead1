//! The web console in a real browser (headless Chromium through chromedriver), logging in
//! through the dev OIDC provider: an agent's statement held for approval appears in alice's
//! inbox without a reload, shown as text; she approves it with a comment and the agent's
//! statement completes. And what the console must refuse: anything without a login, a
//! decision by someone the coordinator does not let decide, a change without the CSRF token.
//! An auditor (dave) finds the agent's session by a word of its statement, opens it, reads the
//! statement and its rows (markup shown as text) and a verified badge; altering one byte of the
//! log turns the badge into a failure naming where the chain breaks. Every look is on record.
//!
//! Screenshots: `<target dir>/test-artefacts/console/<test>/*.png` (or under
//! `$VIGIL_TEST_ARTEFACTS`).

use serde_json::{json, Value};
use std::path::Path;
use std::time::{Duration, Instant};
use vigil_chaos::webdriver::{artefact_dir, Browser, Driver};
use vigil_chaos::*;
use vigil_proto::record::{Kind, Outcome};

const POLICY: &str = r#"
[[policy.rules]]
id = "writes-need-approval"
action = "require_approval"
kinds = ["write"]
reason = "writes to app need an approver"
approval = { approvers = "approvers", wait_secs = 60, ttl_secs = 600 }
"#;

/// The tests run one at a time: two browsers beside the node would slow each other down,
/// and t10 measures how soon the client proceeds.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// A statement whose text is markup: the inbox must show it as text.
const STATEMENT: &str =
    "UPDATE notes SET v = v + 1 WHERE note <> '<img src=x onerror=alert(1)><b id=\"injected\">bold</b>'";

struct Setup {
    node: TestNode,
    console: String,
    _secret_dir: tempfile::TempDir,
}

async fn setup() -> Setup {
    setup_in(NodeOptions::default(), 0, "").await
}

/// [`setup`] with more options (a cluster's coordinator, the audit topic), the console's port
/// (0: any) and more of its section.
async fn setup_in(more: NodeOptions, port: u16, console: &str) -> Setup {
    let secret_dir = tempfile::tempdir().unwrap();
    let secret = secret_dir.path().join("console-secret");
    std::fs::write(&secret, "vigil-console-secret\n").unwrap();
    let node = TestNode::start(NodeOptions {
        allow_cleartext_token: true,
        extra: POLICY,
        protocols: Some(format!(
            "[console]\nlisten = \"127.0.0.1:{port}\"\nclient_id = \"vigil-console\"\n\
             client_secret = {{ file = \"{}\" }}\nadmin_group = \"vigil-admins\"\n\
             auditor_group = \"auditors\"\n{console}{}",
            secret.display(),
            more.protocols.clone().unwrap_or_default()
        )),
        ..more
    })
    .await;
    let gw = env().get("VIGIL_PG_GATEWAY_USER");
    let su = direct_superuser(&node.files.db).await;
    su.batch_execute(&format!(
        "CREATE TABLE notes (id int, v int, note text); INSERT INTO notes VALUES (1, 0, 'n');
         ALTER TABLE notes OWNER TO {gw}"
    ))
    .await
    .unwrap();
    let addr = node.node.console_addr.expect("a console listener");
    Setup {
        console: format!("https://127.0.0.1:{}", addr.port()),
        node,
        _secret_dir: secret_dir,
    }
}

impl Setup {
    async fn value(&self) -> i32 {
        let su = direct_superuser(&self.node.files.db).await;
        su.query_one("SELECT v FROM notes WHERE id = 1", &[])
            .await
            .unwrap()
            .get(0)
    }

    /// Holds the agent's statement: its task ends when the statement has run.
    async fn hold(&self) -> tokio::task::JoinHandle<(Result<u64, tokio_postgres::Error>, Instant)> {
        self.hold_sql(STATEMENT.to_string()).await
    }

    /// Holds the agent's statement `sql`: its task ends when the statement has run (or was
    /// refused), with the rows it changed.
    async fn hold_sql(
        &self,
        sql: String,
    ) -> tokio::task::JoinHandle<(Result<u64, tokio_postgres::Error>, Instant)> {
        let token = token_for("agent-ops", "agent-ops-secret").await;
        let (client, task) = self.node.client(&token).await.unwrap();
        tokio::spawn(async move {
            let _task = task;
            let r = client.simple_query(&sql).await.map(|m| {
                m.iter()
                    .filter_map(|m| match m {
                        tokio_postgres::SimpleQueryMessage::CommandComplete(n) => Some(*n),
                        _ => None,
                    })
                    .sum()
            });
            (r, Instant::now())
        })
    }

    /// The id of the one pending request, once it exists.
    async fn pending_id(&self) -> String {
        let alice = id_token("alice");
        let coord = self.node.node.coordinator.join(",");
        for _ in 0..100 {
            let (code, out) = vigil_async(&[
                "approvals",
                "list",
                "--coordinator",
                &coord,
                "--token",
                &alice,
            ])
            .await;
            assert_eq!(code, 0, "{out}");
            if let Some(at) = out.find("apr-") {
                return out[at..].split_whitespace().next().unwrap().to_string();
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("no request was created");
    }

    fn show(&self, id: &str) -> String {
        let alice = id_token("alice");
        let coord = self.node.node.coordinator.join(",");
        let (code, out) = vigil(&[
            "approvals",
            "show",
            id,
            "--coordinator",
            &coord,
            "--token",
            &alice,
        ]);
        assert_eq!(code, 0, "{out}");
        out
    }
}

/// Logs `user` in through the dev provider's pages, as a person would.
async fn log_in(browser: &Browser, console: &str, user: &str, shots: &Path) {
    log_in_at(browser, console, console, user, shots).await;
}

/// [`log_in`], started at `console`, landing at `lands` (the console's public URL).
async fn log_in_at(browser: &Browser, console: &str, lands: &str, user: &str, shots: &Path) {
    browser.goto(&format!("{console}/")).await;
    let login = browser
        .wait_for("input[name=login]", Duration::from_secs(20))
        .await;
    browser
        .screenshot(&shots.join("01-provider-login.png"))
        .await;
    browser.type_into(&login, user).await;
    let password = browser
        .wait_for("input[name=password]", Duration::from_secs(5))
        .await;
    browser.type_into(&password, "dev").await;
    let submit = browser
        .wait_for("button[type=submit]", Duration::from_secs(5))
        .await;
    browser.click(&submit).await;
    // The provider asks for consent once per client and person.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let url = browser.url().await;
        if url.starts_with(lands) {
            break;
        }
        let found = browser
            .try_execute(
                "const b = document.querySelector('button[type=submit]');\
                 if (b && b.textContent.includes('Continue')) { b.click(); return true; }\
                 return false;",
                json!([]),
            )
            .await;
        assert!(Instant::now() < deadline, "login did not come back: {url}");
        if found != Ok(json!(true)) {
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    browser
        .wait_for_text("#who", user, Duration::from_secs(10))
        .await;
}

/// The console's session cookie and the CSRF token, as the logged-in page holds them.
async fn credentials(browser: &Browser, console: &str) -> (String, String) {
    let cookie = browser
        .cookies()
        .await
        .into_iter()
        .find(|c| c["name"] == json!("__Host-vigil-session"))
        .expect("a session cookie");
    assert_eq!(cookie["httpOnly"], json!(true), "{cookie}");
    assert_eq!(cookie["secure"], json!(true), "{cookie}");
    assert_eq!(cookie["sameSite"], json!("Lax"), "{cookie}");
    let cookie = format!("__Host-vigil-session={}", cookie["value"].as_str().unwrap());
    let me: Value = http()
        .get(format!("{console}/api/me"))
        .header("cookie", &cookie)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    (
        cookie,
        me["csrf"].as_str().expect("a CSRF token").to_string(),
    )
}

/// The console's certificate is the node's generated one.
fn http() -> reqwest::Client {
    reqwest::Client::builder()
        .danger_accept_invalid_certs(true)
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn t10_approver_approves_a_held_statement_in_the_browser() {
    let _serial = ONE_AT_A_TIME.lock().await;
    let s = setup().await;
    let shots = artefact_dir("console/t10");
    let driver = Driver::start().await;
    let browser = driver.browser().await;

    log_in(&browser, &s.console, "alice", &shots).await;
    browser
        .wait_for("#empty:not([hidden])", Duration::from_secs(10))
        .await;
    browser.screenshot(&shots.join("02-inbox-empty.png")).await;
    // A mark on the loaded page: still there later means the page was never reloaded.
    browser
        .execute("window.vigilTestMark = 42;", json!([]))
        .await;

    // The agent's statement is held; the inbox shows it live.
    let held = s.hold().await;
    let item = browser
        .wait_for("li.request", Duration::from_secs(15))
        .await;
    let id = s.pending_id().await;
    assert_eq!(
        browser
            .execute("return window.vigilTestMark;", json!([]))
            .await,
        json!(42),
        "the page was reloaded"
    );
    let shown = browser
        .execute(
            "const li = document.querySelector('li.request');\
             const f = (n) => li.querySelector('[data-f=\"' + n + '\"]').textContent;\
             return { action: f('action'), requester: f('requester'), protocol: f('protocol'),\
                      target: f('target'), rule: f('rule'), reason: f('reason'), id: f('id'),\
                      approvals: f('approvals'), age: f('age'), expires: f('expires'),\
                      injected: document.querySelectorAll('#injected, li.request img').length };",
            json!([]),
        )
        .await;
    assert_eq!(shown["action"], json!(STATEMENT), "{shown}");
    assert_eq!(
        shown["injected"],
        json!(0),
        "markup in a statement became elements"
    );
    assert_eq!(shown["id"], json!(id), "{shown}");
    assert_eq!(shown["protocol"], json!("postgres"), "{shown}");
    assert_eq!(shown["rule"], json!("writes-need-approval"), "{shown}");
    assert_eq!(
        shown["reason"],
        json!("writes to app need an approver"),
        "{shown}"
    );
    assert!(
        shown["requester"]
            .as_str()
            .unwrap()
            .starts_with("\"agent-ops\""),
        "{shown}"
    );
    // What the agent's records say of it (client, model and version, declared intent) joins
    // the request once the index has its approval_requested record.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let requester = browser
            .execute(
                "return document.querySelector('li.request [data-f=\"requester\"]').textContent;",
                json!([]),
            )
            .await;
        let text = requester.as_str().unwrap_or_default().to_string();
        if text.contains("client \"agent-ops\"") {
            assert!(text.contains("model \"claude-opus"), "{text}");
            assert!(text.contains("intent \"vigil-tests\""), "{text}");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no client and model shown: {text}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(shown["target"], json!("app"), "{shown}");
    assert!(
        shown["approvals"]
            .as_str()
            .unwrap()
            .starts_with("0 of 1 (group approvers)"),
        "{shown}"
    );
    assert!(shown["age"].as_str().unwrap().ends_with("ago"), "{shown}");
    assert!(
        shown["expires"].as_str().unwrap().starts_with("in "),
        "{shown}"
    );
    assert!(!held.is_finished(), "the statement waits for a decision");
    assert_eq!(s.value().await, 0, "nothing ran before the decision");
    browser.screenshot(&shots.join("03-inbox-held.png")).await;

    // Approve with a comment: the waiting client proceeds.
    let comment = browser
        .wait_for("li.request input[name=comment]", Duration::from_secs(5))
        .await;
    // Enter in the comment field decides nothing (WebDriver's Enter key is U+E007).
    browser.type_into(&comment, "ticket <42> ok\u{E007}").await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(!held.is_finished(), "Enter in the comment field decided");
    assert_eq!(s.value().await, 0, "Enter in the comment field decided");
    let approve = browser
        .wait_for("li.request button[name=approve]", Duration::from_secs(5))
        .await;
    let clicked = Instant::now();
    browser.click(&approve).await;
    let (ran, at) = tokio::time::timeout(Duration::from_secs(10), held)
        .await
        .expect("the statement completes once approved")
        .unwrap();
    assert_eq!(ran.expect("the statement runs"), 1);
    let waited = at.duration_since(clicked);
    println!("the client proceeded {waited:?} after the click");
    assert!(waited < Duration::from_secs(1), "{waited:?}");
    assert_eq!(s.value().await, 1, "the approved statement ran once");
    let _ = item;
    let shown = s.show(&id);
    assert!(shown.contains("vote        alice approved"), "{shown}");
    assert!(shown.contains("ticket <42> ok"), "{shown}");
    browser
        .wait_for("#empty:not([hidden])", Duration::from_secs(10))
        .await;
    browser
        .screenshot(&shots.join("04-inbox-decided.png"))
        .await;

    // Log out: the session is gone, the console asks for a login again.
    let (cookie, _) = credentials(&browser, &s.console).await;
    let logout = browser.wait_for("#logout", Duration::from_secs(5)).await;
    browser.click(&logout).await;
    browser
        .wait_for("a[href='/']", Duration::from_secs(10))
        .await;
    browser.screenshot(&shots.join("05-logged-out.png")).await;
    let after = http()
        .get(format!("{}/api/me", s.console))
        .header("cookie", &cookie)
        .send()
        .await
        .unwrap();
    assert_eq!(after.status(), 401, "the session ended with the logout");
    browser.close().await;

    // On record: the login and the logout, alice's, on the console.
    let records = s.node.records().await;
    let start = records
        .iter()
        .find(|r| {
            r.body.kind == Kind::SessionStart
                && r.body
                    .connection
                    .as_ref()
                    .is_some_and(|c| c.protocol == "console")
        })
        .expect("the console login is on record");
    assert_eq!(start.body.outcome, Some(Outcome::Success));
    assert_eq!(start.body.principal.as_ref().unwrap().subject, "alice");
    let end = records
        .iter()
        .find(|r| r.body.kind == Kind::SessionEnd && r.body.session == start.body.session)
        .expect("the logout is on record");
    assert_eq!(end.body.detail.as_deref(), Some("logged out"));
}

/// The pending requests as the inbox shows them: id, action, details, whether it is marked
/// summarised, whether Approve is disabled.
async fn inbox(browser: &Browser) -> Vec<Value> {
    let found = browser
        .execute(
            "return Array.from(document.querySelectorAll('li.request')).map((li) => {\
               const t = (n) => li.querySelector('[data-f=\"' + n + '\"]').textContent;\
               const action = t('action');\
               return { id: li.dataset.id, head: action.slice(0, 80), tail: action.slice(-40),\
                        length: action.length, details: t('details'),\
                        summarized: !li.querySelector('.summarized').hidden,\
                        disabled: li.querySelector('button[name=approve]').disabled };\
             });",
            json!([]),
        )
        .await;
    found.as_array().cloned().unwrap_or_default()
}

/// The inbox shows what actually runs, as `vigil approvals show` does: the text an
/// `EXECUTE s1` runs (s1 prepared over the protocol), and each parameter with its format and
/// declared type, so that the eight bytes `00000100` of a binary int8 do not read as the text
/// 00000100. Approved in the browser, the DELETE runs once.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn t12_the_inbox_shows_what_an_execute_runs_and_how_parameters_read() {
    use vigil_chaos::wire::{self, Msg, Wire};
    let _serial = ONE_AT_A_TIME.lock().await;
    let s = setup().await;
    let shots = artefact_dir("console/t12");
    let offset = pg_log_len();
    let token = token_for("agent-ops", "agent-ops-secret").await;
    let delete = "DELETE FROM notes WHERE id = 1";
    let mut by_name = Wire::app_session(s.node.port(), &token).await;
    let r = by_name
        .batch(&[wire::parse("s1", delete), wire::sync()])
        .await;
    assert_eq!(
        r.iter().find_map(Msg::error),
        None,
        "preparing runs nothing"
    );
    let held_by_name =
        tokio::spawn(async move { by_name.batch(&[wire::query("EXECUTE s1")]).await });
    let mut binary = Wire::app_session(s.node.port(), &token).await;
    let held_binary = tokio::spawn(async move {
        binary
            .batch(&[
                wire::parse_typed("", "UPDATE notes SET v = v + 1 WHERE id = $1", &[20]),
                wire::bind_formats("", "", &[Some(b"00000100")], true),
                wire::execute(""),
                wire::sync(),
            ])
            .await
    });

    let driver = Driver::start().await;
    let browser = driver.browser().await;
    log_in(&browser, &s.console, "alice", &shots).await;
    browser
        .wait_for("li.request + li.request", Duration::from_secs(15))
        .await;
    let shown = inbox(&browser).await;
    let item = |action: &str| {
        shown
            .iter()
            .find(|i| i["head"] == json!(action))
            .unwrap_or_else(|| panic!("no request {action:?} in {shown:?}"))
            .clone()
    };
    let by_name_item = item("EXECUTE s1");
    let details = by_name_item["details"].as_str().unwrap();
    assert!(
        details.contains(&format!("runs        s1 = {delete}")),
        "{details}"
    );
    assert!(details.contains("mode        simple"), "{details}");
    let binary_item = item("UPDATE notes SET v = v + 1 WHERE id = $1");
    let details = binary_item["details"].as_str().unwrap();
    assert!(
        details.contains("param $1    '00000100' (binary bytes, declared type int8 (oid 20))"),
        "{details}"
    );
    assert!(details.contains("mode        extended"), "{details}");
    // The CLI says the same.
    let id = by_name_item["id"].as_str().unwrap().to_string();
    assert!(s.show(&id).contains(&format!("runs        s1 = {delete}")));
    browser
        .screenshot(&shots.join("02-inbox-runs-and-params.png"))
        .await;

    let approve = browser
        .wait_for(
            &format!("li.request[data-id='{id}'] button[name=approve]"),
            Duration::from_secs(5),
        )
        .await;
    browser.click(&approve).await;
    let r = tokio::time::timeout(Duration::from_secs(10), held_by_name)
        .await
        .expect("EXECUTE s1 completes once approved")
        .unwrap();
    assert_eq!(r.iter().find_map(Msg::error), None);
    let deleted = pg_executed(&s.node.files.db, offset)
        .iter()
        .filter(|r| r.prepared.as_deref() == Some(delete) || r.text == delete)
        .count();
    assert_eq!(deleted, 1, "PostgreSQL ran the DELETE once");
    held_binary.abort();
    browser.close().await;
}

/// Requests of megabytes do not blind the approval lists: with two statements held of 1.2
/// and 2 MiB (a request then holds over 4 MiB, more than a gRPC client reads by default),
/// `vigil approvals list` answers, marking both cut, `vigil approvals show` prints the larger
/// whole, and the inbox lists both summarised, Approve disabled until the whole request is
/// on the page; then approved there, the statement runs once.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn t16_statements_of_megabytes_do_not_blind_the_lists() {
    let _serial = ONE_AT_A_TIME.lock().await;
    let s = setup_in(
        NodeOptions {
            max_frame_bytes: 4 << 20,
            ..NodeOptions::default()
        },
        0,
        "",
    )
    .await;
    let shots = artefact_dir("console/t16");
    let offset = pg_log_len();
    let statement = |tag: &str, len: usize| {
        let head = format!("UPDATE notes SET v = v + 1 WHERE id = 1 AND note <> '{tag}' /* ");
        let tail = " */ AND v > -1";
        format!("{head}{}{tail}", "x".repeat(len - head.len() - tail.len()))
    };
    let small = statement("a", 1_200_000);
    // The largest a statement may be shown (2 MiB), less a little.
    let large = statement("b", 2 * 1024 * 1024 - 16);
    let held_small = s.hold_sql(small.clone()).await;
    let held_large = s.hold_sql(large.clone()).await;

    let alice = id_token("alice");
    let coord = s.node.node.coordinator.join(",");
    let mut list = String::new();
    for _ in 0..100 {
        let (code, out) = vigil_async(&[
            "approvals",
            "list",
            "--state",
            "pending",
            "--coordinator",
            &coord,
            "--token",
            &alice,
        ])
        .await;
        assert_eq!(code, 0, "the list answers: {out}");
        list = out;
        if list.matches("apr-").count() == 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let id_of = |sql: &str| {
        let line = list
            .lines()
            .find(|l| l.ends_with(&format!("{}…", &sql[..60])))
            .unwrap_or_else(|| panic!("not listed, cut and marked: {list}"));
        line.split_whitespace().next().unwrap().to_string()
    };
    let (small_id, large_id) = (id_of(&small), id_of(&large));
    let shown = s.show(&large_id);
    assert!(
        shown.contains(&format!("{} */ AND v > -1\n", "x".repeat(100))),
        "shown whole"
    );

    let driver = Driver::start().await;
    let browser = driver.browser().await;
    log_in(&browser, &s.console, "alice", &shots).await;
    browser
        .wait_for("li.request + li.request", Duration::from_secs(15))
        .await;
    let listed = inbox(&browser).await;
    for item in &listed {
        assert_eq!(item["summarized"], json!(true), "{item}");
        assert_eq!(
            item["disabled"],
            json!(true),
            "no decision on a part: {item}"
        );
        assert!(item["length"].as_u64().unwrap() <= 1024, "{item}");
    }
    browser
        .screenshot(&shots.join("02-inbox-summarised.png"))
        .await;
    let whole = browser
        .wait_for(
            &format!("li.request[data-id='{small_id}'] button.whole"),
            Duration::from_secs(5),
        )
        .await;
    browser.click(&whole).await;
    let deadline = Instant::now() + Duration::from_secs(15);
    let item = loop {
        let found = inbox(&browser).await;
        let item = found.iter().find(|i| i["id"] == json!(small_id)).cloned();
        if let Some(item) = item.filter(|i| i["summarized"] == json!(false)) {
            break item;
        }
        assert!(Instant::now() < deadline, "never shown whole: {found:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(item["length"], json!(small.len()), "{item}");
    assert_eq!(item["tail"], json!(&small[small.len() - 40..]), "{item}");
    assert_eq!(item["disabled"], json!(false), "{item}");
    assert!(item["details"]
        .as_str()
        .unwrap()
        .contains("mode        simple"));
    browser.screenshot(&shots.join("03-inbox-whole.png")).await;
    let approve = browser
        .wait_for(
            &format!("li.request[data-id='{small_id}'] button[name=approve]"),
            Duration::from_secs(5),
        )
        .await;
    browser.click(&approve).await;
    let (ran, _) = tokio::time::timeout(Duration::from_secs(10), held_small)
        .await
        .expect("the statement completes once approved")
        .unwrap();
    assert_eq!(ran.expect("the statement runs"), 1);
    let runs = pg_executed(&s.node.files.db, offset)
        .iter()
        .filter(|r| r.text.starts_with(&small[..60]))
        .count();
    assert_eq!(runs, 1, "PostgreSQL ran it once");
    assert!(s.show(&large_id).contains("state       pending"));
    held_large.abort();
    browser.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn t20_refusals_without_login_permission_or_csrf() {
    let _serial = ONE_AT_A_TIME.lock().await;
    let s = setup().await;
    let shots = artefact_dir("console/t20");
    let http = http();
    let console = &s.console;

    // Nothing answers without a login.
    let res = http.get(format!("{console}/")).send().await.unwrap();
    assert!(res.status().is_redirection(), "{}", res.status());
    assert_eq!(res.headers()["location"], "/auth/login");
    let csp = res.headers()["content-security-policy"].to_str().unwrap();
    assert!(
        csp.contains("script-src 'self'") && csp.contains("frame-ancestors 'none'"),
        "{csp}"
    );
    assert_eq!(res.headers()["x-frame-options"], "DENY");
    assert_eq!(res.headers()["cross-origin-opener-policy"], "same-origin");
    for path in [
        "/api/me",
        "/api/approvals/events",
        "/api/approvals/apr-x",
        "/static/console.js",
    ] {
        let res = http.get(format!("{console}{path}")).send().await.unwrap();
        assert_eq!(res.status(), 401, "{path}");
    }
    let res = http
        .post(format!("{console}/api/approvals/apr-x/decision"))
        .header("content-type", "application/json")
        .body(r#"{"approve":true}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 401);
    let res = http
        .post(format!("{console}/auth/logout"))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 401);
    // A callback no login started here is refused, and on record.
    let res = http
        .get(format!("{console}/auth/callback?code=x&state=y"))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 401);

    let held = s.hold().await;
    let id = s.pending_id().await;
    let decide = |cookie: String, csrf: Option<String>, kind: &'static str| {
        let mut req = http
            .post(format!("{console}/api/approvals/{id}/decision"))
            .header("cookie", cookie)
            .header("content-type", kind)
            .body(r#"{"approve":true,"comment":"crafted"}"#);
        if let Some(csrf) = csrf {
            req = req.header("x-csrf-token", csrf);
        }
        req.send()
    };

    // bob is no approver: his inbox stays empty, and a crafted decision is refused.
    let driver = Driver::start().await;
    let bob = driver.browser().await;
    log_in(&bob, console, "bob", &shots).await;
    bob.wait_for("#empty:not([hidden])", Duration::from_secs(10))
        .await;
    bob.screenshot(&shots.join("02-bob-inbox.png")).await;
    let (bob_cookie, bob_csrf) = credentials(&bob, console).await;
    let res = decide(bob_cookie, Some(bob_csrf), "application/json")
        .await
        .unwrap();
    assert_eq!(res.status(), 403, "{}", res.text().await.unwrap());
    bob.close().await;

    // alice may decide, but not without her CSRF token, nor with a wrong one, nor as a form.
    let alice = driver.browser().await;
    log_in(&alice, console, "alice", &shots).await;
    alice.wait_for("li.request", Duration::from_secs(15)).await;
    let (cookie, csrf) = credentials(&alice, console).await;
    let res = decide(cookie.clone(), None, "application/json")
        .await
        .unwrap();
    assert_eq!(res.status(), 403);
    let res = decide(
        cookie.clone(),
        Some("x".repeat(csrf.len())),
        "application/json",
    )
    .await
    .unwrap();
    assert_eq!(res.status(), 403);
    let res = decide(
        cookie.clone(),
        Some(csrf.clone()),
        "application/x-www-form-urlencoded",
    )
    .await
    .unwrap();
    assert_eq!(res.status(), 415);
    let res = http
        .post(format!("{console}/auth/logout"))
        .header("cookie", &cookie)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 403, "a logout without the CSRF token");
    alice.close().await;

    // None of it decided anything: the request is still pending, the statement still waits.
    let shown = s.show(&id);
    assert!(shown.contains("state       pending"), "{shown}");
    assert!(!shown.contains("crafted"), "{shown}");
    assert!(!held.is_finished());
    assert_eq!(s.value().await, 0);
    held.abort();

    // The refused login is on record.
    let records = s.node.records().await;
    assert!(
        records.iter().any(|r| r.body.kind == Kind::SessionStart
            && r.body.outcome == Some(Outcome::Denied)
            && r.body
                .connection
                .as_ref()
                .is_some_and(|c| c.protocol == "console")),
        "the refused callback is on record"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn t30_auditor_finds_opens_and_verifies_a_session() {
    let _serial = ONE_AT_A_TIME.lock().await;
    let s = setup().await;
    let shots = artefact_dir("console/t30");
    let console = &s.console;
    let run = random_suffix();
    let marker = format!("marker_{run}");
    let su = direct_superuser(&s.node.files.db).await;
    su.batch_execute(
        "INSERT INTO notes VALUES (2, 7, '<img src=x onerror=alert(2)><b id=\"rowinjected\">x</b>')",
    )
    .await
    .unwrap();

    // The agent's session: a query whose rows hold markup.
    let token = token_for("agent-ops", "agent-ops-secret").await;
    let (client, task) = s.node.client(&token).await.unwrap();
    // A bidirectional isolate in the statement: the page shows it as its escape, as the CLI
    // prints it, never as an invisible character that reorders what is around it.
    let statement = format!(
        "SELECT id, note FROM notes WHERE note <> '{marker}' AND note <> '\u{2067}' ORDER BY id"
    );
    let statement_shown = statement.replace('\u{2067}', "\\u{2067}");
    let rows = client.simple_query(&statement).await.unwrap();
    assert_eq!(
        rows.iter()
            .filter(|m| matches!(m, tokio_postgres::SimpleQueryMessage::Row(_)))
            .count(),
        2
    );
    drop(client);
    let _ = task.await;
    let records = s.node.records().await;
    let session = records
        .iter()
        .find(|r| {
            r.body
                .request
                .as_ref()
                .and_then(|q| q.postgres())
                .is_some_and(|q| q.text.contains(&marker))
        })
        .and_then(|r| r.body.session.clone())
        .expect("the statement is on record");

    // Nothing of it without a login, nor for someone outside the auditor group.
    let http = http();
    for path in [
        "/api/sessions".to_string(),
        format!("/api/sessions/{session}"),
        format!("/api/sessions/{session}/records.jsonl"),
        format!("/api/sessions/{session}/verification"),
    ] {
        let res = http.get(format!("{console}{path}")).send().await.unwrap();
        assert_eq!(res.status(), 401, "{path}");
    }
    let driver = Driver::start().await;
    let alice = driver.browser().await;
    log_in(&alice, console, "alice", &shots).await;
    let (cookie, _) = credentials(&alice, console).await;
    for path in [
        "/api/sessions".to_string(),
        format!("/api/sessions/{session}"),
    ] {
        let res = http
            .get(format!("{console}{path}"))
            .header("cookie", &cookie)
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), 403, "{path}: alice is no auditor");
    }
    let hidden = alice
        .execute(
            "return document.getElementById('nav-sessions').hidden;",
            json!([]),
        )
        .await;
    assert_eq!(hidden, json!(true), "no Sessions link for alice");
    alice.close().await;

    // dave searches by a word of the statement, and opens the session.
    let dave = driver.browser().await;
    log_in(&dave, console, "dave", &shots).await;
    let nav = dave
        .wait_for("#nav-sessions:not([hidden])", Duration::from_secs(10))
        .await;
    dave.click(&nav).await;
    let text = dave.wait_for("#q-text", Duration::from_secs(10)).await;
    dave.type_into(&text, &marker).await;
    let go = dave.wait_for("#search-go", Duration::from_secs(5)).await;
    // The index follows the log every 500 ms: search until the session is in.
    let link = format!("#sessions a[href='#session/{session}']");
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        dave.click(&go).await;
        tokio::time::sleep(Duration::from_millis(500)).await;
        let found = dave
            .execute(
                "return document.querySelectorAll('#sessions tbody tr').length;",
                json!([]),
            )
            .await;
        if found == json!(1) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the search never found the session: {found}"
        );
    }
    dave.wait_for(&link, Duration::from_secs(5)).await;
    let row = dave
        .execute(
            "return Array.from(document.querySelectorAll('#sessions tbody td')).map((td) => td.textContent);",
            json!([]),
        )
        .await;
    assert_eq!(row[1], json!("agent-ops"), "{row}");
    assert_eq!(row[3], json!("postgres"), "{row}");
    assert_eq!(row[4], json!("app"), "{row}");
    dave.screenshot(&shots.join("06-sessions-found.png")).await;
    let open = dave.wait_for(&link, Duration::from_secs(5)).await;
    dave.click(&open).await;
    dave.wait_for("#badge.verified", Duration::from_secs(15))
        .await;
    dave.wait_for("#timeline table.rows", Duration::from_secs(10))
        .await;
    let page = dave
        .execute(
            "return { statements: Array.from(document.querySelectorAll('#timeline pre.statement')).map((p) => p.textContent),\
                      cells: Array.from(document.querySelectorAll('#timeline table.rows td')).map((td) => td.textContent),\
                      injected: document.querySelectorAll('#rowinjected, #timeline img').length,\
                      badge: document.getElementById('badge').textContent };",
            json!([]),
        )
        .await;
    assert!(
        page["statements"]
            .as_array()
            .unwrap()
            .iter()
            .any(|t| t == &json!(statement_shown)),
        "{page}"
    );
    let timeline = dave
        .execute(
            "return document.getElementById('timeline').textContent;",
            json!([]),
        )
        .await;
    assert!(
        !timeline.as_str().unwrap().contains('\u{2067}'),
        "a raw isolate on the page: {timeline}"
    );
    assert!(
        page["cells"].as_array().unwrap().contains(&json!(
            "<img src=x onerror=alert(2)><b id=\"rowinjected\">x</b>"
        )),
        "{page}"
    );
    assert_eq!(
        page["injected"],
        json!(0),
        "markup in a row became elements"
    );
    let badge = page["badge"].as_str().unwrap();
    assert!(
        badge.starts_with("Verified: every record of stream"),
        "{badge}"
    );
    dave.screenshot(&shots.join("07-session-verified.png"))
        .await;
    // Readable on a narrow screen: at 400 px nothing but the tables' own boxes scrolls
    // sideways, on the session page and on the list.
    dave.resize(400, 900).await;
    let overflow =
        "return document.documentElement.scrollWidth - document.documentElement.clientWidth;";
    assert_eq!(
        dave.execute(overflow, json!([])).await,
        json!(0),
        "the session page is wider than 400 px"
    );
    dave.screenshot(&shots.join("07b-session-400px.png")).await;
    dave.execute("window.location.hash = '#sessions';", json!([]))
        .await;
    dave.wait_for("#search", Duration::from_secs(5)).await;
    assert_eq!(
        dave.execute(overflow, json!([])).await,
        json!(0),
        "the session list is wider than 400 px"
    );
    dave.screenshot(&shots.join("07c-sessions-400px.png")).await;
    dave.resize(1280, 1000).await;
    dave.execute(
        &format!("window.location.hash = '#session/{session}';"),
        json!([]),
    )
    .await;
    dave.wait_for("#badge.verified", Duration::from_secs(15))
        .await;

    // The download is the session's records, as written.
    let (dave_cookie, _) = credentials(&dave, console).await;
    let res = http
        .get(format!("{console}/api/sessions/{session}/records.jsonl"))
        .header("cookie", &dave_cookie)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    let lines = res.text().await.unwrap();
    let downloaded: Vec<_> = lines
        .lines()
        .map(|l| vigil_proto::record::Record::parse(l.as_bytes()).unwrap())
        .collect();
    let of_session: Vec<_> = s
        .node
        .records()
        .await
        .into_iter()
        .filter(|r| r.body.session.as_deref() == Some(session.as_str()))
        .collect();
    assert_eq!(downloaded, of_session);
    // Another site's link to it (a navigation carries the SameSite=Lax cookie) makes no look
    // on record under dave's name: refused before it is written.
    let res = http
        .get(format!("{console}/api/sessions/{session}/records.jsonl"))
        .header("cookie", &dave_cookie)
        .header("sec-fetch-site", "cross-site")
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 403);

    // One byte of the statement's request record altered in the log: the badge says where the
    // chain breaks.
    let file = std::fs::read_dir(&s.node.files.audit_dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.to_string_lossy().ends_with(".jsonl"))
        .unwrap();
    let bytes = std::fs::read(&file).unwrap();
    let at = bytes
        .windows(marker.len())
        .position(|w| w == marker.as_bytes())
        .expect("the marker is in the log");
    {
        use std::io::{Seek, Write};
        let mut f = std::fs::OpenOptions::new().write(true).open(&file).unwrap();
        f.seek(std::io::SeekFrom::Start(at as u64)).unwrap();
        f.write_all(b"M").unwrap();
    }
    let line = bytes[..at].iter().filter(|b| **b == b'\n').count() + 1;
    dave.execute("window.location.reload();", json!([])).await;
    // A page opened at a session's address (a reload, a link from anywhere) shows it only
    // once asked: until then no look is on record.
    let open = dave
        .wait_for("#s-offer:not([hidden]) #s-open", Duration::from_secs(10))
        .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let looks_before = s
        .node
        .records()
        .await
        .into_iter()
        .filter(|r| {
            matches!(&r.body.request, Some(vigil_proto::record::Request::Console(q))
                if q.action == "view_session" && q.session == session)
        })
        .count();
    assert_eq!(looks_before, 2, "no look before the person asks");
    dave.click(&open).await;
    dave.wait_for("#badge.broken", Duration::from_secs(15))
        .await;
    let broken = dave
        .execute(
            "return document.getElementById('badge').textContent;",
            json!([]),
        )
        .await;
    let name = file.file_name().unwrap().to_string_lossy().to_string();
    let broken = broken.as_str().unwrap();
    assert!(
        broken.starts_with(&format!("Chain broken at {name}:{}", line + 1)),
        "the record after the altered one no longer chains to it: {broken} (altered line {line})"
    );
    assert!(
        broken.contains(&format!(
            "Altered since it was written: this session's record at seq {} ({name}:{line})",
            line - 1
        )),
        "the altered record is named: {broken}"
    );
    dave.screenshot(&shots.join("08-session-broken.png")).await;
    dave.close().await;

    // Every look is on record, as dave's, before it was shown.
    let looks: Vec<_> = s
        .node
        .records()
        .await
        .into_iter()
        .filter_map(|r| match r.body.request {
            Some(vigil_proto::record::Request::Console(q)) => Some((
                r.body.principal.as_ref().unwrap().subject.clone(),
                q.action,
                q.session,
            )),
            _ => None,
        })
        .collect();
    let dave_looks = |action: &str| {
        looks
            .iter()
            .filter(|(who, a, id)| who == "dave" && a == action && *id == session)
            .count()
    };
    // Opened, opened again after the 400 px check, reloaded after the alteration.
    assert_eq!(dave_looks("view_session"), 3, "{looks:?}");
    assert_eq!(dave_looks("download_records"), 1, "{looks:?}");
    assert!(looks.iter().all(|(who, ..)| who == "dave"), "{looks:?}");
}

/// In a cluster the index follows the audit topic: a session an agent ran on node A is found,
/// opened and verified (from the topic, anchored by A's witnessed checkpoint) in node B's
/// console.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn t40_any_nodes_console_shows_every_nodes_sessions_from_the_topic() {
    let _serial = ONE_AT_A_TIME.lock().await;
    let cluster = vigil_chaos::cluster::Cluster::start(1).await;
    let topic = create_topic(2);
    let a = TestNode::start(NodeOptions {
        kafka_topic: Some(topic.clone()),
        coordinator: Some(cluster.node_section()),
        checkpoint_interval_secs: 1,
        ..NodeOptions::default()
    })
    .await;
    let b = setup_in(
        NodeOptions {
            kafka_topic: Some(topic.clone()),
            coordinator: Some(cluster.node_section()),
            checkpoint_interval_secs: 1,
            ..NodeOptions::default()
        },
        0,
        "",
    )
    .await;
    let shots = artefact_dir("console/t40");
    let marker = format!("marker_{}", random_suffix());
    let token = token_for("agent-ops", "agent-ops-secret").await;
    let (client, task) = a.client(&token).await.unwrap();
    client
        .simple_query(&format!("SELECT '{marker}' AS m"))
        .await
        .unwrap();
    drop(client);
    let _ = task.await;
    let a_node = a.records().await[0].body.node.clone();

    let driver = Driver::start().await;
    let dave = driver.browser().await;
    log_in(&dave, &b.console, "dave", &shots).await;
    let (cookie, _) = credentials(&dave, &b.console).await;
    let http = http();
    let get = |path: String| {
        http.get(format!("{}{path}", b.console))
            .header("cookie", &cookie)
            .send()
    };
    // B's index takes A's records from the topic.
    let mut found = Value::Null;
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        let res: Value = get(format!("/api/sessions?text={marker}"))
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        if let Some(s) = res["sessions"].as_array().and_then(|s| s.first()) {
            found = s.clone();
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(
        found["node"],
        json!(a_node),
        "A's session in B's index: {found}"
    );
    assert_eq!(found["subject"], json!("agent-ops"), "{found}");
    let session = found["session"].as_str().unwrap().to_string();
    // Verified from the topic, and anchored once A's next checkpoint covers the session.
    let mut badge = Value::Null;
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        badge = get(format!("/api/sessions/{session}/verification"))
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        if badge["anchored"] == json!(true) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    assert_eq!(badge["state"], json!("verified"), "{badge}");
    assert_eq!(badge["source"], json!("topic"), "{badge}");
    assert_eq!(badge["anchored"], json!(true), "{badge}");
    dave.goto(&format!("{}/#session/{session}", b.console))
        .await;
    dave.wait_for("#badge.verified", Duration::from_secs(15))
        .await;
    let statement = dave
        .wait_for("#timeline pre.statement", Duration::from_secs(10))
        .await;
    assert_eq!(
        dave.text(&statement).await,
        format!("SELECT '{marker}' AS m")
    );
    dave.screenshot(&shots.join("09-other-nodes-session.png"))
        .await;
    dave.close().await;
    // The look is on record in B's stream.
    let looks = b
        .node
        .records()
        .await
        .into_iter()
        .filter(|r| {
            matches!(&r.body.request, Some(vigil_proto::record::Request::Console(q)) if q.session == session)
        })
        .count();
    assert_eq!(looks, 1);
}

/// An SSH session's terminal recording plays in the browser: the exec's output, as the host
/// sent it, in the player (asciinema-player), from the asciicast the node builds out of the
/// recorded chunks it proves first.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn t50_an_ssh_recording_plays_in_the_browser() {
    use vigil_chaos::ssh;
    let _serial = ONE_AT_A_TIME.lock().await;
    let keys = tempfile::tempdir().unwrap();
    let ca = ssh::keygen(keys.path(), "ca");
    let e = env();
    let section = ssh::ssh_section(
        &ca,
        e.get("VIGIL_DEV_SSHD_HOST_KEY"),
        e.get("VIGIL_DEV_SSH_GATEWAY_KEY"),
        "",
    );
    let s = setup_in(
        NodeOptions {
            protocols: Some(section),
            ..NodeOptions::default()
        },
        0,
        "",
    )
    .await;
    let shots = artefact_dir("console/t50");
    let port = s.node.node.addr("ssh").expect("an SSH listener").port();
    let key = ssh::certificate(keys.path(), &ca, "user", ssh::OPS_PRINCIPAL, "-5m:+1h");
    let marker = format!("hello-{}", random_suffix());
    let out = tokio::process::Command::new("ssh")
        .args(["-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=no"])
        .args(["-o", "UserKnownHostsFile=/dev/null", "-o", "LogLevel=ERROR"])
        .args(["-o", "IdentitiesOnly=yes", "-i"])
        .arg(&key)
        .arg("-o")
        .arg(format!("CertificateFile={}-cert.pub", key.display()))
        .args(["-p", &port.to_string()])
        .arg(format!("{}+web@127.0.0.1", e.get("VIGIL_DEV_SSH_LOGIN")))
        .arg(format!("printf '%s\\n' {marker}"))
        .output()
        .await
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let session = s
        .node
        .records()
        .await
        .into_iter()
        .find(|r| {
            r.body.kind == Kind::SessionStart
                && r.body
                    .connection
                    .as_ref()
                    .is_some_and(|c| c.protocol == "ssh")
        })
        .and_then(|r| r.body.session)
        .expect("the SSH session is on record");

    let driver = Driver::start().await;
    let dave = driver.browser().await;
    log_in(&dave, &s.console, "dave", &shots).await;
    // The index follows the log every 500 ms.
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        dave.goto(&format!("{}/#session/{session}", s.console))
            .await;
        let found = dave
            .wait_for("#badge.verified, #badge.broken", Duration::from_secs(10))
            .await;
        let _ = found;
        let play = dave
            .execute(
                "return document.querySelectorAll('button.play').length;",
                json!([]),
            )
            .await;
        if play != json!(0) {
            break;
        }
        assert!(Instant::now() < deadline, "no recording to play");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let play = dave.wait_for("button.play", Duration::from_secs(5)).await;
    dave.click(&play).await;
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let shown = dave
            .execute(
                "return document.getElementById('player').textContent;",
                json!([]),
            )
            .await;
        if shown.as_str().is_some_and(|t| t.contains(&marker)) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the player never showed the output: {shown}"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    dave.screenshot(&shots.join("10-recording-played.png"))
        .await;
    dave.close().await;
    let played = s
        .node
        .records()
        .await
        .into_iter()
        .filter(|r| {
            matches!(&r.body.request, Some(vigil_proto::record::Request::Console(q)) if q.session == session && q.action == "play_recording")
        })
        .count();
    assert_eq!(played, 1, "the play is on record");
}

/// Grants for admins: carol (vigil-admins) grants agent-ops write on `app` for 60 minutes in
/// the browser, the coordinator holds it (as the CLI shows), she revokes it; bob's crafted
/// grant is refused by the coordinator; without a login nothing answers.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn t60_an_admin_grants_and_revokes_in_the_browser() {
    let _serial = ONE_AT_A_TIME.lock().await;
    let s = setup().await;
    let shots = artefact_dir("console/t60");
    let console = &s.console;
    let http = http();
    let res = http
        .get(format!("{console}/api/grants"))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 401);
    let res = http
        .post(format!("{console}/api/grants"))
        .header("content-type", "application/json")
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 401);

    let driver = Driver::start().await;
    let carol = driver.browser().await;
    log_in(&carol, console, "carol", &shots).await;
    let nav = carol
        .wait_for("#nav-grants:not([hidden])", Duration::from_secs(10))
        .await;
    carol.click(&nav).await;
    let reason = format!("ticket <{}>", random_suffix());
    for (field, value) in [
        ("subject", "agent-ops"),
        ("target", "app"),
        ("access_class", "write"),
        ("reason", reason.as_str()),
    ] {
        let input = carol
            .wait_for(
                &format!("#grant-new [name={field}]"),
                Duration::from_secs(5),
            )
            .await;
        carol.type_into(&input, value).await;
    }
    // Minutes: the form's 60.
    let go = carol
        .wait_for("#grant-create", Duration::from_secs(5))
        .await;
    carol.click(&go).await;
    carol
        .wait_for("#grants tbody button.revoke", Duration::from_secs(10))
        .await;
    let row = carol
        .execute(
            "return Array.from(document.querySelectorAll('#grants tbody tr td')).map((td) => td.textContent);",
            json!([]),
        )
        .await;
    assert_eq!(row[0], json!("agent-ops"), "{row}");
    // The issuer: carol's own, as the form was filled in for her.
    assert_eq!(row[1], json!(env().get("VIGIL_OIDC_ISSUER")), "{row}");
    assert_eq!(row[4], json!("write"), "{row}");
    assert_eq!(row[7], json!("carol"), "{row}");
    assert_eq!(row[8], json!(reason), "the reason as text: {row}");
    assert_eq!(row[9], json!("active"), "{row}");
    carol.screenshot(&shots.join("11-grant-active.png")).await;

    // The coordinator holds it, as the CLI shows.
    let coord = s.node.node.coordinator.join(",");
    let carol_token = id_token("carol");
    let (code, out) = vigil_async(&[
        "grants",
        "list",
        "--coordinator",
        &coord,
        "--token",
        &carol_token,
    ])
    .await;
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("agent-ops") && out.contains("write"), "{out}");

    let revoke = carol
        .wait_for("#grants tbody button.revoke", Duration::from_secs(5))
        .await;
    carol.click(&revoke).await;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let state = carol
            .execute(
                "const td = document.querySelectorAll('#grants tbody tr td'); return td.length ? td[9].textContent : '';",
                json!([]),
            )
            .await;
        if state == json!("revoked") {
            break;
        }
        assert!(Instant::now() < deadline, "not revoked: {state}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    carol.screenshot(&shots.join("12-grant-revoked.png")).await;
    carol.close().await;

    // bob is no admin: no Grants link, and the coordinator refuses his crafted grant.
    let bob = driver.browser().await;
    log_in(&bob, console, "bob", &shots).await;
    let hidden = bob
        .execute(
            "return document.getElementById('nav-grants').hidden;",
            json!([]),
        )
        .await;
    assert_eq!(hidden, json!(true));
    let (cookie, csrf) = credentials(&bob, console).await;
    let res = http
        .post(format!("{console}/api/grants"))
        .header("cookie", &cookie)
        .header("x-csrf-token", &csrf)
        .header("content-type", "application/json")
        .body(r#"{"subject":"bob","issuer":"https://idp.example","protocol":"postgres","target":"app","access_class":"write","minutes":30}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 403, "{}", res.text().await.unwrap());
    // Nor anything without the CSRF token.
    let res = http
        .post(format!("{console}/api/grants"))
        .header("cookie", &cookie)
        .header("content-type", "application/json")
        .body(r#"{"subject":"bob","issuer":"https://idp.example","protocol":"postgres","target":"app","access_class":"write","minutes":30}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 403);
    bob.close().await;
}

/// A login holds on every node of a cluster that shares the cookie key: started at node A,
/// completed at node B (A's public URL names B, as a balancer's name would), used at both
/// with one cookie and one CSRF token. A changed cookie opens nothing. While the coordinator
/// cannot say whether the login was ended, neither node answers; a logout at A ends it at B
/// too, at once. Each node records the login as a session of its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn t70_a_login_holds_on_every_node_and_a_logout_ends_it_everywhere() {
    let _serial = ONE_AT_A_TIME.lock().await;
    let mut cluster = vigil_chaos::cluster::Cluster::start(1).await;
    let key_dir = tempfile::tempdir().unwrap();
    let key = key_dir.path().join("cookie-key");
    std::fs::write(&key, "the cookie key both nodes of this cluster share\n").unwrap();
    let shared = format!("cookie_key = {{ file = \"{}\" }}\n", key.display());
    let in_cluster = || NodeOptions {
        coordinator: Some(cluster.node_section()),
        ..NodeOptions::default()
    };
    let b_port = free_port();
    let b = setup_in(in_cluster(), b_port, &shared).await;
    let public = format!("public_url = \"https://127.0.0.1:{b_port}\"\n");
    let a = setup_in(in_cluster(), 0, &format!("{shared}{public}")).await;
    let shots = artefact_dir("console/t70");

    let driver = Driver::start().await;
    let dave = driver.browser().await;
    log_in_at(&dave, &a.console, &b.console, "dave", &shots).await;
    dave.screenshot(&shots.join("02-logged-in-at-b.png")).await;
    let (cookie, csrf) = credentials(&dave, &b.console).await;
    let http = http();
    let me = |console: &str, cookie: &str| {
        http.get(format!("{console}/api/me"))
            .header("cookie", cookie)
            .send()
    };
    let res = me(&a.console, &cookie).await.unwrap();
    assert_eq!(res.status(), 200);
    let who: Value = res.json().await.unwrap();
    assert_eq!(who["subject"], json!("dave"), "{who}");
    assert_eq!(who["csrf"], json!(csrf), "one CSRF token on every node");
    // The browser, at A's page, is logged in without a second login.
    dave.goto(&format!("{}/#sessions", a.console)).await;
    dave.wait_for_text("#who", "dave", Duration::from_secs(10))
        .await;
    dave.screenshot(&shots.join("03-same-login-at-a.png")).await;

    // A cookie changed anywhere opens nothing.
    let (name, value) = cookie.split_once('=').unwrap();
    for at in [0, value.len() / 2, value.len() - 1] {
        let mut bytes = value.as_bytes().to_vec();
        bytes[at] = if bytes[at] == b'A' { b'B' } else { b'A' };
        let changed = format!("{name}={}", String::from_utf8(bytes).unwrap());
        for console in [&a.console, &b.console] {
            let res = me(console, &changed).await.unwrap();
            assert_eq!(res.status(), 401, "byte {at} changed");
        }
    }

    // Without the coordinator, whether the login was ended is unknown: no answer.
    cluster.kill(1);
    for console in [&a.console, &b.console] {
        let res = me(console, &cookie).await.unwrap();
        assert_eq!(res.status(), 503);
        let why: Value = res.json().await.unwrap();
        assert!(
            why["error"]
                .as_str()
                .unwrap()
                .contains("cannot be confirmed"),
            "{why}"
        );
    }
    cluster.spawn(1);
    cluster.wait_up(1).await;
    let deadline = Instant::now() + Duration::from_secs(30);
    while me(&b.console, &cookie).await.unwrap().status() != 200 {
        assert!(
            Instant::now() < deadline,
            "the login is back with the coordinator"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }

    // A logout at A, with the token B handed out, ends the login at B as well, and the
    // inbox's event stream open at B with it.
    let mut events = http
        .get(format!("{}/api/approvals/events", b.console))
        .header("cookie", &cookie)
        .send()
        .await
        .unwrap();
    assert_eq!(events.status(), 200);
    let res = http
        .post(format!("{}/auth/logout", a.console))
        .header("cookie", &cookie)
        .header("x-csrf-token", &csrf)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200, "{}", res.text().await.unwrap());
    for console in [&b.console, &a.console] {
        let res = me(console, &cookie).await.unwrap();
        assert_eq!(res.status(), 401, "{console}");
    }
    tokio::time::timeout(Duration::from_secs(5), async {
        while events.chunk().await.expect("a clean end").is_some() {}
    })
    .await
    .expect("the event stream ends with the login");
    let res = http
        .get(format!("{}/", b.console))
        .header("cookie", &cookie)
        .send()
        .await
        .unwrap();
    assert_eq!(res.headers()["location"], "/auth/login");
    dave.close().await;

    // Each node's record of the login: B's from the login to the logout it learned of, A's
    // from its continuation to the logout made there.
    let console_records = |records: Vec<vigil_proto::record::Record>| {
        records
            .into_iter()
            .filter(|r| {
                r.body
                    .connection
                    .as_ref()
                    .is_some_and(|c| c.protocol == "console")
                    && r.body
                        .principal
                        .as_ref()
                        .is_some_and(|p| p.subject == "dave")
                    && matches!(r.body.kind, Kind::SessionStart | Kind::SessionEnd)
            })
            .map(|r| {
                let detail = r.body.detail.unwrap_or_default();
                (r.body.kind, detail, r.body.session.unwrap_or_default())
            })
            .collect::<Vec<_>>()
    };
    let at_b = console_records(b.node.records().await);
    let login = &at_b[0].2;
    let b_session = |kind, detail: &str| (kind, detail.to_string(), login.clone());
    assert_eq!(
        at_b,
        [
            b_session(Kind::SessionStart, "logged in to the console"),
            b_session(Kind::SessionEnd, "logged out (on another node)"),
        ]
    );
    let at_a = console_records(a.node.records().await);
    let continued = &at_a[0].2;
    assert_ne!(continued, login, "A's own session of the login");
    let a_session = |kind, detail: &str| (kind, detail.to_string(), continued.clone());
    assert_eq!(
        at_a,
        [
            a_session(
                Kind::SessionStart,
                &format!("the console login {login} continues on this node")
            ),
            a_session(Kind::SessionEnd, "logged out"),
        ]
    );
}
