//! t44: before authentication a client is anyone, and what it can cost the gateway is bounded. A
//! flood of clients declaring 60 MiB messages (startup packets, password messages) and sending
//! megabytes of them leaves the node's memory flat: each is refused at its length field with
//! `08P01` and a `protocol_error` record. Clients that connect and never authenticate take at
//! most `max_unauthenticated_connections` places; the next ones get `53300` at once; the places
//! come back at the startup timeout. A session authenticated before the flood works throughout.

use std::process::Child;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use vigil_chaos::wire;
use vigil_chaos::*;
use vigil_proto::record::Kind;

/// Clients of each flood, and the places for unauthenticated connections (above the floods,
/// so that every flood client reaches its length check).
const FLOOD: usize = 75;
const PLACES: usize = 160;
const PREAUTH_MAX: usize = 8192;
/// What each flood client declares, and how much of it it sends at once before trickling.
const DECLARED: i32 = 60 << 20;
const BURST: usize = 2 << 20;
/// Growth of the node's resident memory the floods may cause.
const RSS_BOUND: u64 = 64 << 20;

fn phase(what: &str) {
    eprintln!("--- {what}");
}

/// Kills the node when the test ends, whatever happens.
struct Node(Child);

impl Drop for Node {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn rss_bytes(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("the node runs");
    let kb = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .expect("VmRSS");
    kb * 1024
}

/// The SQLSTATE and message of the ErrorResponse at the start of `reply`.
fn error_of(reply: &[u8]) -> Option<(String, String)> {
    let len = i32::from_be_bytes(reply.get(1..5)?.try_into().ok()?);
    let body = reply.get(5..(len as usize + 1))?.to_vec();
    wire::Msg {
        tag: reply[0],
        body,
    }
    .error()
}

/// Sends `header`, then `BURST` bytes of the message it declares, then a byte every 200 ms,
/// while reading the answer; returns what came back before the gateway closed.
async fn flood_client(mut s: TcpStream, header: Vec<u8>) -> Vec<u8> {
    s.write_all(&header).await.unwrap();
    let (mut rd, mut wr) = s.into_split();
    let writer = tokio::spawn(async move {
        let chunk = vec![b'x'; 64 * 1024];
        for _ in 0..BURST / chunk.len() {
            if wr.write_all(&chunk).await.is_err() {
                return;
            }
        }
        while wr.write_all(b"x").await.is_ok() {
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    });
    let mut reply = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(20), rd.read_to_end(&mut reply)).await;
    writer.abort();
    reply
}

/// A startup packet declaring `DECLARED` bytes.
async fn oversized_startup(port: u16) -> Vec<u8> {
    let s = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    let mut header = DECLARED.to_be_bytes().to_vec();
    header.extend_from_slice(&196_608i32.to_be_bytes());
    flood_client(s, header).await
}

/// A valid StartupMessage, then a PasswordMessage declaring `DECLARED` bytes.
async fn oversized_password(port: u16) -> Vec<u8> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    s.write_all(&wire::startup(&[("user", "agent"), ("database", "app")]))
        .await
        .unwrap();
    let request = wire::Msg::read_from(&mut s).await.unwrap();
    assert_eq!(request.tag, b'R', "the gateway asks for the password");
    let mut header = vec![b'p'];
    header.extend_from_slice(&DECLARED.to_be_bytes());
    flood_client(s, header).await
}

async fn query_works(client: &tokio_postgres::Client, what: &str) {
    let row = client
        .query_one("SELECT 41 + 1", &[])
        .await
        .unwrap_or_else(|e| panic!("{what}: {e}"));
    assert_eq!(row.get::<_, i32>(0), 42, "{what}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t44_unauthenticated_clients_cannot_exhaust_the_gateway() {
    let (pg_port, admin_port) = (free_port(), free_port());
    let files = NodeFiles::new(&NodeOptions {
        pg_port,
        admin_port,
        allow_cleartext_token: true,
        max_frame_bytes: 64 << 20,
        postgres_extra: "max_preauth_message_bytes = 8192\nmax_unauthenticated_connections = 160\nstartup_timeout_secs = 3",
        connection_extra: "connect_timeout_secs = 2",
        ..NodeOptions::default()
    })
    .await;
    let node = Node(spawn_node(&files, admin_port).await);
    let pid = node.0.id();
    let token = agent_token().await;
    let conn_str = format!("host=127.0.0.1 port={pg_port} user=agent dbname=app password={token}");

    phase("a session authenticated before the flood");
    let (before, _task) = connect_tls(&conn_str).await.expect("connects");
    query_works(&before, "before the flood").await;
    let baseline = rss_bytes(pid);

    phase("flood: oversized startup packets and password messages, megabytes each");
    let peak = Arc::new(AtomicU64::new(baseline));
    let sampler = tokio::spawn({
        let peak = peak.clone();
        async move {
            loop {
                peak.fetch_max(rss_bytes(pid), Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    });
    let startups = (0..FLOOD).map(|_| tokio::spawn(oversized_startup(pg_port)));
    let passwords = (0..FLOOD).map(|_| tokio::spawn(oversized_password(pg_port)));
    let flood: Vec<_> = startups.chain(passwords).collect();
    query_works(&before, "during the flood").await;
    let mut replies = Vec::new();
    for client in flood {
        replies.push(client.await.unwrap());
    }
    // What is still in flight arrives meanwhile.
    tokio::time::sleep(Duration::from_millis(500)).await;
    sampler.abort();
    let peak = peak.load(Ordering::Relaxed).max(rss_bytes(pid));
    eprintln!(
        "VmRSS: baseline {} KiB, after the flood {} KiB",
        baseline / 1024,
        peak / 1024
    );
    for reply in &replies {
        let (code, message) = error_of(reply).expect("an ErrorResponse");
        assert_eq!(code, "08P01", "{message}");
        assert_eq!(
            message,
            format!(
                "message length {DECLARED} exceeds the maximum of {PREAUTH_MAX} bytes before authentication"
            )
        );
    }
    assert!(
        peak < baseline + RSS_BOUND,
        "the node's memory stays flat: {} KiB over the baseline",
        (peak - baseline) / 1024
    );

    phase("clients that never authenticate take every place; the next are refused at once");
    let mut silent = Vec::new();
    for _ in 0..PLACES {
        let mut s = TcpStream::connect(("127.0.0.1", pg_port)).await.unwrap();
        s.write_all(&wire::startup(&[("user", "agent"), ("database", "app")]))
            .await
            .unwrap();
        assert_eq!(wire::Msg::read_from(&mut s).await.unwrap().tag, b'R');
        silent.push(s);
    }
    for _ in 0..20 {
        let mut s = TcpStream::connect(("127.0.0.1", pg_port)).await.unwrap();
        let mut reply = Vec::new();
        tokio::time::timeout(Duration::from_secs(1), s.read_to_end(&mut reply))
            .await
            .expect("refused at once")
            .ok();
        let (code, message) = error_of(&reply).expect("an ErrorResponse");
        assert_eq!(code, "53300", "{message}");
        assert!(message.contains("too many connections are authenticating"));
    }
    query_works(&before, "while every place is taken").await;
    let metrics = node_metrics(admin_port).await;
    assert_eq!(metric(&metrics, "vigil_preauth_refused_total"), 20.0);

    phase("the startup timeout gives the places back");
    for mut s in silent {
        let mut reply = Vec::new();
        tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut reply))
            .await
            .expect("closed at the startup timeout")
            .ok();
        let (code, message) = error_of(&reply).expect("an ErrorResponse");
        assert_eq!(
            (code.as_str(), message.as_str()),
            ("08P01", "startup did not finish in time")
        );
    }
    let (after, _task) = connect_tls(&conn_str)
        .await
        .expect("connects after the flood");
    query_works(&after, "a new session after the flood").await;
    query_works(&before, "the first session after the flood").await;

    phase("judge: every oversized message is on record");
    let records = files.records();
    let oversized = of_kind(&records, Kind::ProtocolError)
        .into_iter()
        .filter(|r| {
            r.body
                .detail
                .as_deref()
                .is_some_and(|d| d.ends_with("before authentication"))
        })
        .count();
    assert_eq!(oversized, 2 * FLOOD, "one protocol_error record each");
    let sessions = of_kind(&records, Kind::SessionStart);
    assert_eq!(sessions.len(), 2, "only the two real sessions started");
}
