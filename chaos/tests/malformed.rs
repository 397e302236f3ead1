//! t4x: a client that breaks the wire protocol gets an error and a closed connection, never a
//! panic or a hang; the node keeps serving everyone else, and the violation is audited.

use bytes::{BufMut, BytesMut};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use vigil_chaos::wire::{self, typed};
use vigil_chaos::*;
use vigil_proto::record::Kind;

fn startup(db: &str) -> Vec<u8> {
    wire::startup(&[("user", "agent"), ("database", db)])
}

/// Sends `bytes`, closes the sending side and reads until the server closes; returns what came
/// back. Panics on a hang.
async fn exchange(port: u16, bytes: &[u8]) -> Vec<u8> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    let _ = s.write_all(bytes).await;
    // Half-close: a truncated message followed by EOF must end the session, not wait for more.
    let _ = s.shutdown().await;
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut out))
        .await
        .expect("the gateway answers or closes; it does not hang")
        .ok();
    out
}

/// Authenticates over cleartext (allowed in this node's config) and returns the stream after
/// the first ReadyForQuery.
async fn session(port: u16, token: &str) -> TcpStream {
    let mut s = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    s.write_all(&startup("app")).await.unwrap();
    let mut buf = [0u8; 9];
    s.read_exact(&mut buf).await.unwrap();
    assert_eq!(buf[0], b'R');
    let mut pw = token.as_bytes().to_vec();
    pw.push(0);
    s.write_all(&typed(b'p', &pw)).await.unwrap();
    read_until_ready(&mut s).await;
    s
}

/// Reads messages until ReadyForQuery; returns the tags seen.
async fn read_until_ready(s: &mut TcpStream) -> Vec<u8> {
    read_until_ready_status(s).await.0
}

/// Reads messages until ReadyForQuery; returns the tags seen and the transaction status.
async fn read_until_ready_status(s: &mut TcpStream) -> (Vec<u8>, u8) {
    let mut tags = Vec::new();
    loop {
        let tag = s.read_u8().await.unwrap();
        let len = s.read_i32().await.unwrap();
        let mut body = vec![0; len as usize - 4];
        s.read_exact(&mut body).await.unwrap();
        tags.push(tag);
        if tag == b'Z' {
            return (tags, body[0]);
        }
    }
}

fn parse(sql: &str) -> Vec<u8> {
    let mut b = Vec::new();
    b.push(0);
    b.extend_from_slice(sql.as_bytes());
    b.push(0);
    b.extend_from_slice(&0i16.to_be_bytes());
    typed(b'P', &b)
}

fn bind_execute() -> Vec<u8> {
    let mut out = typed(b'B', &[0, 0, 0, 0, 0, 0, 0, 0]);
    out.extend(typed(b'E', &[0, 0, 0, 0, 0]));
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t40_malformed_frames_get_an_error_never_a_hang() {
    let node = TestNode::start(NodeOptions {
        allow_cleartext_token: true,
        max_frame_bytes: 64 * 1024,
        ..NodeOptions::default()
    })
    .await;
    let port = node.port();
    let token = agent_token().await;

    // Startup phase: lengths below the minimum, beyond the maximum, negative; unknown codes;
    // a truncated packet; garbage.
    let mut cases: Vec<(&str, Vec<u8>)> = vec![
        ("length 0", vec![0, 0, 0, 0]),
        ("length 3", vec![0, 0, 0, 3, 1, 2, 3]),
        ("negative length", vec![0xff, 0xff, 0xff, 0xf0, 0, 0]),
        ("huge length", vec![0x7f, 0xff, 0xff, 0xff, 0, 3, 0, 0]),
        ("unknown code", vec![0, 0, 0, 8, 0x12, 0x34, 0x56, 0x78]),
        ("startup without terminator", {
            let mut v = vec![0, 0, 0, 13, 0, 3, 0, 0];
            v.extend_from_slice(b"user\0");
            v
        }),
        ("truncated then closed", vec![0, 0, 0, 100, 0, 3, 0, 0]),
        // PostgreSQL takes the last of a repeated parameter: the gateway would have recorded
        // the first `application_name` (outside review, 2026-12-07).
        (
            "a parameter given twice",
            wire::startup(&[
                ("user", "agent"),
                ("database", "app"),
                ("application_name", "claimed"),
                ("application_name", "real"),
            ]),
        ),
    ];
    for i in 0..20u64 {
        let mut v = rand::random::<[u8; 64]>().to_vec();
        v.truncate((i as usize * 7) % 64 + 1);
        cases.push(("random bytes", v));
    }
    for (name, bytes) in &cases {
        let out = exchange(port, bytes).await;
        if *name == "a parameter given twice" {
            let text = String::from_utf8_lossy(&out);
            assert!(
                out.first() == Some(&b'E') && text.contains("a parameter given twice"),
                "{name}: {text}"
            );
        }
        if !out.is_empty() {
            assert_eq!(
                out[0],
                b'E',
                "{name}: answered {:?}",
                &out[..out.len().min(16)]
            );
        }
    }

    // After authentication: bad lengths, a lying Bind, an unknown message type.
    let lying_bind = {
        let mut b = BytesMut::new();
        b.put_slice(b"\0\0");
        b.put_i16(0);
        b.put_i16(1);
        b.put_i32(1_000_000); // a parameter far longer than the message
        b.put_slice(b"x");
        b.put_i16(0);
        typed(b'B', &b)
    };
    let post_auth: Vec<(&str, Vec<u8>)> = vec![
        ("length 2", vec![b'Q', 0, 0, 0, 2]),
        ("beyond max_frame_bytes", vec![b'Q', 0, 0x10, 0, 0]),
        ("lying Bind", lying_bind),
        ("unknown type", typed(b'@', b"")),
        ("Query without terminator", typed(b'Q', b"SELECT 1")),
        ("password after auth", typed(b'p', b"x\0")),
    ];
    for (name, bytes) in &post_auth {
        let mut s = session(port, &token).await;
        s.write_all(bytes).await.unwrap();
        let mut out = Vec::new();
        tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut out))
            .await
            .unwrap_or_else(|_| panic!("{name}: hang"))
            .ok();
        assert_eq!(out.first(), Some(&b'E'), "{name}: {out:?}");
        let text = String::from_utf8_lossy(&out);
        assert!(text.contains("08P01"), "{name}: {text}");
    }

    // The node is still healthy: a well-formed session works.
    let mut s = session(port, &token).await;
    s.write_all(&typed(b'Q', b"SELECT 1\0")).await.unwrap();
    let tags = read_until_ready(&mut s).await;
    assert_eq!(tags, vec![b'T', b'D', b'C', b'Z']);
    // A FunctionCall is refused with a clear error; the session continues.
    let mut fc = BytesMut::new();
    fc.put_i32(1598); // any function oid
    fc.put_i16(0);
    fc.put_i16(0);
    fc.put_i16(0);
    s.write_all(&typed(b'F', &fc)).await.unwrap();
    let tags = read_until_ready(&mut s).await;
    assert_eq!(tags, vec![b'E', b'Z']);
    s.write_all(&typed(b'Q', b"SELECT 2\0")).await.unwrap();
    assert_eq!(read_until_ready(&mut s).await, vec![b'T', b'D', b'C', b'Z']);

    let records = node.records().await;
    let violations = of_kind(&records, Kind::ProtocolError);
    assert!(
        violations.len() >= post_auth.len() + 5,
        "violations are audited: {}",
        violations.len()
    );
    let blocked = of_kind(&records, Kind::Blocked);
    assert_eq!(blocked.len(), 1, "the FunctionCall is audited as blocked");
    let metrics = node.metrics().await;
    assert!(metric(&metrics, "vigil_protocol_errors_total") >= (post_auth.len() + 5) as f64);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t41_one_statement_in_one_byte_writes_and_many_pipelined() {
    let node = TestNode::start(NodeOptions {
        allow_cleartext_token: true,
        extra:
            "[[policy.rules]]\nid = \"no-truncate\"\naction = \"block\"\nflags = [\"truncate\"]\n",
        ..NodeOptions::default()
    })
    .await;
    let token = agent_token().await;
    let mut s = session(node.port(), &token).await;
    // One byte per write.
    for b in typed(b'Q', b"SELECT 'dribbled'\0") {
        s.write_all(&[b]).await.unwrap();
        s.flush().await.unwrap();
    }
    assert_eq!(read_until_ready(&mut s).await, vec![b'T', b'D', b'C', b'Z']);
    // Fifty statements pipelined in one write.
    let mut batch = Vec::new();
    for i in 0..50 {
        batch.extend(typed(b'Q', format!("SELECT {i}\0").as_bytes()));
    }
    s.write_all(&batch).await.unwrap();
    for _ in 0..50 {
        assert_eq!(read_until_ready(&mut s).await, vec![b'T', b'D', b'C', b'Z']);
    }
    // A blocked statement dribbled one byte at a time is still blocked.
    for b in typed(b'Q', b"TRUNCATE /* x */ customers\0") {
        s.write_all(&[b]).await.unwrap();
        s.flush().await.unwrap();
    }
    assert_eq!(read_until_ready(&mut s).await, vec![b'E', b'Z']);
    // A blocked statement in the middle of a pipelined batch: the others run, in order.
    let mut batch = Vec::new();
    batch.extend(typed(b'Q', b"SELECT 'before'\0"));
    batch.extend(typed(b'Q', b"truncate customers\0"));
    batch.extend(typed(b'Q', b"SELECT 'after'\0"));
    s.write_all(&batch).await.unwrap();
    assert_eq!(read_until_ready(&mut s).await, vec![b'T', b'D', b'C', b'Z']);
    assert_eq!(read_until_ready(&mut s).await, vec![b'E', b'Z']);
    assert_eq!(read_until_ready(&mut s).await, vec![b'T', b'D', b'C', b'Z']);
    // A refusal fails the target's transaction the way any error would: the insert before it
    // in the same extended-protocol batch is rolled back with the batch ...
    let mut batch = parse("INSERT INTO customers VALUES (900, 'x', 'y')");
    batch.extend(bind_execute());
    batch.extend(parse("TRUNCATE customers"));
    batch.extend(bind_execute());
    batch.extend(typed(b'S', b""));
    s.write_all(&batch).await.unwrap();
    let (tags, status) = read_until_ready_status(&mut s).await;
    assert_eq!((tags, status), (vec![b'1', b'2', b'C', b'E', b'Z'], b'I'));
    // ... and inside a transaction block the transaction is aborted.
    for (sql, want) in [
        ("BEGIN", b'T'),
        ("INSERT INTO customers VALUES (901, 'x', 'y')", b'T'),
        ("TRUNCATE customers", b'E'),
        ("COMMIT", b'I'),
    ] {
        s.write_all(&typed(b'Q', format!("{sql}\0").as_bytes()))
            .await
            .unwrap();
        let (_, status) = read_until_ready_status(&mut s).await;
        assert_eq!(status, want, "{sql}");
    }
    let records = node.records().await;
    assert_eq!(of_kind(&records, Kind::Request).len(), 57);
    assert_eq!(of_kind(&records, Kind::Blocked).len(), 4);
    let su = direct_superuser(&node.files.db).await;
    let rolled_back: i64 = su
        .query_one("SELECT count(*) FROM customers WHERE id >= 900", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(
        rolled_back, 0,
        "the statements before a refusal did not commit"
    );
    let n: i64 = su
        .query_one("SELECT count(*) FROM customers", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 50, "nothing was truncated");
}

/// t4m: a statement the gateway recorded but never sent, because the same read brought a
/// message that broke the protocol and ended the session, has a response record that says it
/// was not sent; PostgreSQL's own log shows it never ran.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t4m_a_recorded_statement_cut_off_by_a_violation_is_recorded_as_not_sent() {
    let node = TestNode::start(NodeOptions {
        allow_cleartext_token: true,
        ..NodeOptions::default()
    })
    .await;
    let token = agent_token().await;
    let log_offset = pg_log_len();
    let violations: [(&str, Vec<u8>); 2] = [
        // Not even a frame: the read's frames end there.
        ("length 2", vec![b'Q', 0, 0, 0, 2]),
        // A frame the handler refuses.
        ("unknown type", typed(b'@', b"")),
    ];
    for (i, (name, violation)) in violations.iter().enumerate() {
        let mut s = session(node.port(), &token).await;
        // Execute puts the statement on record before it is forwarded; the violation in the
        // same write stops the session before anything is sent.
        let mut bytes = parse(&format!("SELECT 'cut off {i}'"));
        bytes.extend(bind_execute());
        bytes.extend_from_slice(violation);
        s.write_all(&bytes).await.unwrap();
        let mut out = Vec::new();
        tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut out))
            .await
            .unwrap_or_else(|_| panic!("{name}: hang"))
            .ok();
        assert!(String::from_utf8_lossy(&out).contains("08P01"), "{name}");
    }
    let records = node.records_after_sessions(violations.len()).await;
    for (i, (name, _)) in violations.iter().enumerate() {
        let text = format!("SELECT 'cut off {i}'");
        let request = records
            .iter()
            .find(|r| r.body.kind == Kind::Request && r.body.pg_request().unwrap().text == text)
            .unwrap_or_else(|| panic!("{name}: the statement was recorded at its Execute"));
        let response = response_to(&records, request)
            .unwrap_or_else(|| panic!("{name}: {text} has no response record"));
        let error = response.body.pg_response().unwrap().error.as_ref();
        assert!(
            error.is_some_and(|e| e.message.starts_with("not sent")),
            "{name}: {:?}",
            response.body.pg_response()
        );
    }
    let ran = pg_executed(&node.files.db, log_offset);
    assert!(
        !ran.iter().any(|r| r.text.contains("cut off")),
        "PostgreSQL ran a statement the gateway did not send: {ran:?}"
    );
}
