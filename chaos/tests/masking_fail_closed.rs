//! t42: a target that breaks the wire protocol where masking depends on it. Column rules are
//! matched to values through the RowDescription, by position; a description the gateway
//! cannot read, a row it cannot read, or rows that do not carry the columns described end the
//! session as a target protocol violation, on both protocols. The client gets an error and
//! never the clear value, and no file the node writes holds it. Real PostgreSQL, behind a
//! proxy that rewrites what it sends (chaos/src/tamper.rs).

use std::time::Duration;
use vigil_chaos::tamper::TamperProxy;
use vigil_chaos::wire::{self, Msg, Wire};
use vigil_chaos::*;
use vigil_proto::record::{Kind, Outcome};

/// A client-side column rule and no detector: only the rule stands between the e-mail and the
/// client (and the audit copy).
const MASKING: &str = r#"
[[policy.masking.columns]]
table = "public.customers"
column = "email"
method = "redact"
client = true
"#;

/// Customer 1's e-mail.
const CLEAR: &str = "ada.lovelace@analytical-engine.example";
const SELECT: &str = "SELECT id, email FROM customers WHERE id = 1";

/// How PostgreSQL's answer to `SELECT` is broken on its way to the gateway.
#[derive(Clone, Copy, Debug)]
enum Fault {
    /// The RowDescription claims one column more than it describes.
    DescriptionUnreadable,
    /// The RowDescription leaves out its last column (`email`); the rows still carry it.
    DescriptionShort,
    /// The RowDescription never arrives.
    DescriptionMissing,
    /// The row holding the clear value claims one value more than it carries.
    RowUnreadable,
}

const FAULTS: [Fault; 4] = [
    Fault::DescriptionUnreadable,
    Fault::DescriptionShort,
    Fault::DescriptionMissing,
    Fault::RowUnreadable,
];

impl Fault {
    /// Applied to every message PostgreSQL sends (the catalog connection's too: its columns
    /// and rows hold neither `email` as a column nor the clear value).
    fn apply(self, mut m: Msg) -> Vec<Msg> {
        let describes_email = m.tag == b'T' && m.columns().iter().any(|c| c == "email");
        let holds_clear = m.tag == b'D' && contains(&m.body, CLEAR.as_bytes());
        match self {
            Fault::DescriptionUnreadable if describes_email => add_to_count(&mut m, 1),
            Fault::DescriptionShort if describes_email => {
                let kept = m.columns().len() - 1;
                let mut end = 2;
                for _ in 0..kept {
                    // A field: its name, NUL, then 18 bytes of table, column, type and format.
                    end += m.body[end..].iter().position(|&b| b == 0).expect("a name") + 1 + 18;
                }
                m.body.truncate(end);
                add_to_count(&mut m, -1);
            }
            Fault::DescriptionMissing if describes_email => return Vec::new(),
            Fault::RowUnreadable if holds_clear => add_to_count(&mut m, 1),
            _ => {}
        }
        vec![m]
    }

    /// What the session_end record gives as the violation.
    fn violation(self) -> &'static str {
        match self {
            Fault::DescriptionUnreadable => "malformed RowDescription message",
            Fault::DescriptionShort => "a DataRow of 2 values in a result of 1 columns",
            Fault::DescriptionMissing => "a DataRow without a RowDescription",
            Fault::RowUnreadable => "malformed DataRow message",
        }
    }
}

/// Changes the count (of fields or values) a RowDescription or DataRow starts with.
fn add_to_count(m: &mut Msg, delta: i16) {
    let n = i16::from_be_bytes([m.body[0], m.body[1]]) + delta;
    m.body[..2].copy_from_slice(&n.to_be_bytes());
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

/// `SELECT` on the simple or the extended protocol (with the Describe drivers send).
fn select(extended: bool) -> Vec<u8> {
    if extended {
        [
            wire::parse("", SELECT),
            wire::bind("", "", &[]),
            wire::describe(b'P', ""),
            wire::execute(""),
            wire::sync(),
        ]
        .concat()
    } else {
        wire::query(SELECT)
    }
}

/// The messages that answer a statement: up to the gateway closing the connection, or up to
/// ReadyForQuery when it let the answer through.
async fn answer(w: &mut Wire) -> Vec<Msg> {
    let mut out = Vec::new();
    while let Ok(m) = w.try_read().await {
        let ready = m.tag == b'Z';
        out.push(m);
        if ready {
            break;
        }
    }
    out
}

/// The session_end record of the `n`th session to end (sessions here run one after another).
async fn nth_session_end(files: &NodeFiles, n: usize) -> (Option<Outcome>, String) {
    eventually("the session ends", Duration::from_secs(10), || {
        of_kind(&files.records(), Kind::SessionEnd).len() >= n
    })
    .await;
    let records = files.records();
    let end = of_kind(&records, Kind::SessionEnd)[n - 1];
    (
        end.body.outcome,
        end.body.detail.clone().unwrap_or_default(),
    )
}

async fn session(port: u16, token: &str) -> Wire {
    Wire::connect(port, &[("user", "agent"), ("database", "app")], token)
        .await
        .unwrap_or_else(|e| panic!("session refused: {:?}", e.error()))
}

/// One session that selects on both protocols, gets the value masked, and terminates.
async fn control(port: u16, token: &str, phase: &str) {
    let mut w = session(port, token).await;
    for extended in [false, true] {
        w.send(&select(extended)).await;
        let msgs = w.until_ready().await;
        let rows: Vec<_> = msgs.iter().filter(|m| m.tag == b'D').collect();
        assert_eq!(rows.len(), 1, "{phase}, extended {extended}: {msgs:?}");
        assert_eq!(
            rows[0].values(),
            [Some("1".to_string()), Some("[redacted]".to_string())],
            "{phase}, extended {extended}"
        );
    }
    w.send(&wire::typed(b'X', &[])).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t42_rows_the_gateway_cannot_match_to_their_columns_end_the_session() {
    let proxy = TamperProxy::start().await;
    let (pg_port, admin_port) = (free_port(), free_port());
    let files = NodeFiles::new(&NodeOptions {
        allow_cleartext_token: true,
        extra: MASKING,
        pg_port,
        admin_port,
        target_port: Some(proxy.port()),
        ..NodeOptions::default()
    })
    .await;
    direct_superuser(&files.db)
        .await
        .execute(
            "UPDATE customers SET email = $1 WHERE id = 1",
            &[&CLEAR.to_string()],
        )
        .await
        .unwrap();
    let log = files.dir.path().join("node.log");
    let mut child = spawn_node_logging(&files, admin_port, &log).await;
    let token = agent_token().await;
    let mut sessions = 0;
    let mut faults = 0;

    // Control: untouched, the proxy passes PostgreSQL's answer and the rule masks the value (so
    // the faults below are what ends their sessions). Again at the end: the node serves on.
    println!("t42: control, nothing rewritten");
    control(pg_port, &token, "control").await;
    sessions += 1;
    let (_, detail) = nth_session_end(&files, sessions).await;
    assert!(detail.starts_with("client terminated"), "{detail}");

    for fault in FAULTS {
        for extended in [false, true] {
            println!("t42: {fault:?}, extended protocol: {extended}");
            proxy.rewrite(move |m| fault.apply(m));
            let mut w = session(pg_port, &token).await;
            w.send(&select(extended)).await;
            let msgs = answer(&mut w).await;
            let what = format!("{fault:?}, extended {extended}: {msgs:?}");
            assert_eq!(
                msgs.last().and_then(Msg::error),
                Some((
                    "08P01".to_string(),
                    "the target sent an invalid message".to_string()
                )),
                "the session ends with an error: {what}"
            );
            assert!(
                !msgs.iter().any(|m| m.tag == b'D'),
                "no row reaches the client: {what}"
            );
            assert!(
                !msgs.iter().any(|m| contains(&m.body, CLEAR.as_bytes())),
                "the clear value never reaches the client: {what}"
            );
            sessions += 1;
            let (outcome, detail) = nth_session_end(&files, sessions).await;
            assert_eq!(outcome, Some(Outcome::Error), "{what}");
            let expected = format!("target protocol violation: {}; ", fault.violation());
            assert!(detail.starts_with(&expected), "{detail:?}: {what}");
            faults += 1;
            proxy.pass();
        }
    }

    println!("t42: control again");
    control(pg_port, &token, "control after the faults").await;
    sessions += 1;
    nth_session_end(&files, sessions).await;
    // Operators see each of them counted.
    let metrics = node_metrics(admin_port).await;
    assert_eq!(
        metric(&metrics, "vigil_target_protocol_errors_total"),
        f64::from(faults)
    );
    let _ = std::process::Command::new("kill")
        .arg(child.id().to_string())
        .status();
    let _ = child.wait();

    // Nothing the node wrote holds the clear value: audit log, its other files, its own log.
    let written = files_under(files.dir.path());
    assert!(written.contains(&log), "the node's log was read");
    for path in &written {
        let text = String::from_utf8_lossy(&std::fs::read(path).unwrap_or_default()).into_owned();
        assert!(
            !text.contains(CLEAR),
            "{CLEAR} in clear in {}",
            path.display()
        );
    }
}

/// A detector that masks card numbers for clients too.
const CARDS: &str = r#"
[[policy.masking.detectors]]
kind = "card"
method = "redact"
client = true
"#;

const CARD: &str = "4111 1111 1111 1111";

/// What the proxy puts in place of `marker` in PostgreSQL's errors and notices: `josé` in
/// Latin-1 (not UTF-8, as a database in SQL_ASCII quotes a stored value), then the card.
fn latin1_with_card(mut m: Msg, marker: &[u8]) -> Msg {
    if let Some(at) = m.body.windows(marker.len()).position(|w| w == marker) {
        let value = [&b"jos\xe9 "[..], CARD.as_bytes()].concat();
        m.body.splice(at..at + marker.len(), value);
    }
    m
}

/// t43: an error or a notice whose text is not UTF-8 still goes through the client-side
/// detectors: a field with a card number reaches the client `[redacted]`, and the session goes
/// on. An ErrorResponse the gateway cannot read ends the session instead of passing as it
/// came. Neither the client nor any file of the node gets the card.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t43_errors_and_notices_that_are_not_utf8_are_masked_for_clients() {
    let proxy = TamperProxy::start().await;
    let node = TestNode::start(NodeOptions {
        allow_cleartext_token: true,
        extra: CARDS,
        target_port: Some(proxy.port()),
        ..NodeOptions::default()
    })
    .await;
    proxy.rewrite(|m| match m.tag {
        b'E' | b'N' => vec![latin1_with_card(m, b"CARD-HERE")],
        _ => vec![m],
    });
    let token = agent_token().await;
    let mut w = session(node.port(), &token).await;
    let mut got = Vec::new();
    for sql in [
        "SELECT 'CARD-HERE'::int",
        "DO $$ BEGIN RAISE NOTICE 'CARD-HERE'; END $$",
        "SELECT 1",
    ] {
        got.extend(w.batch(&[wire::query(sql)]).await);
    }
    let error = got.iter().find(|m| m.tag == b'E').expect("the cast fails");
    assert_eq!(error.error().unwrap().0, "22P02");
    let notice = got.iter().find(|m| m.tag == b'N').expect("the notice came");
    for m in [error, notice] {
        assert!(contains(&m.body, b"M[redacted]\0"), "{m:?}");
    }
    assert!(got.iter().any(|m| m.values() == [Some("1".to_string())]));
    assert!(!got.iter().any(|m| contains(&m.body, CARD.as_bytes())));

    // An error whose last field runs off its end: the session ends, the card stays behind.
    proxy.rewrite(|m| match m.tag {
        b'E' => {
            let mut m = latin1_with_card(m, b"BROKEN-HERE");
            m.body.truncate(m.body.len() - 2);
            vec![m]
        }
        _ => vec![m],
    });
    w.send(&wire::query("SELECT 'BROKEN-HERE'::int")).await;
    let msgs = answer(&mut w).await;
    assert!(
        !msgs.iter().any(|m| contains(&m.body, CARD.as_bytes())),
        "{msgs:?}"
    );
    assert!(
        !msgs.iter().any(|m| m.tag == b'Z'),
        "the session ended: {msgs:?}"
    );
    let (outcome, detail) = nth_session_end(&node.files, 1).await;
    assert_eq!(outcome, Some(Outcome::Error));
    assert!(detail.contains("malformed ErrorResponse"), "{detail}");
    proxy.pass();
    for path in files_under(node.files.dir.path()) {
        let text = String::from_utf8_lossy(&std::fs::read(&path).unwrap_or_default()).into_owned();
        assert!(!text.contains(CARD), "{}", path.display());
    }
}

/// t44: the lookup of the tables behind result columns runs over one connection per target,
/// shared by its sessions. A lookup the target never finishes answering ends after
/// `postgres.catalog_timeout_secs`: the columns are masked whole (fail closed) and the session
/// goes on; the next lookup opens a fresh connection and columns no rule covers are shown.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t44_a_catalog_lookup_that_hangs_masks_whole_and_stalls_nothing() {
    use std::sync::atomic::{AtomicBool, Ordering};
    let proxy = TamperProxy::start().await;
    let node = TestNode::start(NodeOptions {
        allow_cleartext_token: true,
        extra: MASKING,
        postgres_extra: "catalog_timeout_secs = 1",
        target_port: Some(proxy.port()),
        ..NodeOptions::default()
    })
    .await;
    // The catalog's answer loses its ReadyForQuery, once: the lookup never ends by itself.
    let lookup = AtomicBool::new(false);
    let dropped = std::sync::Arc::new(AtomicBool::new(false));
    let once = dropped.clone();
    proxy.rewrite(move |m| {
        if m.tag == b'T' && m.columns().iter().any(|c| c == "attname") {
            lookup.store(true, Ordering::SeqCst);
        }
        if m.tag == b'Z'
            && lookup.swap(false, Ordering::SeqCst)
            && !once.swap(true, Ordering::SeqCst)
        {
            return Vec::new();
        }
        vec![m]
    });
    let token = agent_token().await;
    let mut w = session(node.port(), &token).await;
    let started = std::time::Instant::now();
    let r = w
        .batch(&[wire::query("SELECT id, name FROM customers WHERE id = 1")])
        .await;
    assert!(dropped.load(Ordering::SeqCst), "the lookup was cut");
    assert!(started.elapsed() >= Duration::from_secs(1));
    let rows: Vec<_> = r.iter().filter(|m| m.tag == b'D').collect();
    assert_eq!(
        rows[0].values(),
        [
            Some("[redacted]".to_string()),
            Some("[redacted]".to_string())
        ],
        "the table unresolved: every column masked whole"
    );
    // A fresh lookup: `name` is under no rule.
    let r = w
        .batch(&[wire::query("SELECT id, name FROM customers WHERE id = 2")])
        .await;
    let rows: Vec<_> = r.iter().filter(|m| m.tag == b'D').collect();
    assert_eq!(
        rows[0].values(),
        [Some("2".to_string()), Some("customer 2".to_string())]
    );
}
