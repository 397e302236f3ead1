//! The gRPC port authenticates a call on its headers, before its body is read (outside
//! review: one unauthenticated connection sent 1 GiB over 1,000 `Raft/AppendEntries` streams
//! and the member held all of it).
//!
//! A raw HTTP/2 client sends what no gRPC client would: a message header announcing 30 MiB,
//! then a first MiB of it, with no or wrong credentials. Each call is answered at once, its
//! body unread, and the member's memory does not grow with the streams. This file holds one
//! test, so that the process's resident memory is the member's and this client's alone.

use std::sync::Arc;
use std::time::Duration;
use tonic::codegen::http::{Request, Response};
use tonic::codegen::Bytes;
use vigil_coordinator::approvals::Actor;
use vigil_coordinator::metrics::KindLabel;
use vigil_coordinator::server::Member;
use vigil_coordinator::service::{BoxFuture, OperatorAuth, CLUSTER_TOKEN_HEADER};

mod common;

const TOKEN: &str = "preauth-test-cluster-token";
const APPEND_ENTRIES: &str = "/vigil.coordinator.v1.Raft/AppendEntries";
const CREATE_APPROVAL: &str = "/vigil.coordinator.v1.Coordinator/CreateApproval";
/// What each message header announces.
const ANNOUNCED: u32 = 30 * 1024 * 1024;
/// How much of it each refused stream sends anyway.
const SENT: usize = 1024 * 1024;
/// Streams opened on one connection.
const STREAMS: usize = 200;
/// The most the member's resident memory may grow by while they are answered. Without the
/// gate it grew by about `STREAMS * SENT` (200 MiB).
const MAX_GROWTH_KIB: u64 = 16 * 1024;

/// `operator:SUBJECT`: an operator outside the admin group.
struct Operators;

impl OperatorAuth for Operators {
    fn authenticate<'a>(&'a self, token: &'a str) -> BoxFuture<'a, Result<Actor, String>> {
        Box::pin(async move {
            let subject = token.strip_prefix("operator:").ok_or("not an operator")?;
            Ok(Actor {
                subject: subject.into(),
                issuer: "https://idp.example".into(),
                ..Actor::default()
            })
        })
    }
}

type Sender = h2::client::SendRequest<Bytes>;

/// A cleartext HTTP/2 connection to `member`, driven in the background.
async fn connect(member: &Member) -> Sender {
    let tcp = tokio::net::TcpStream::connect(member.addr).await.unwrap();
    let (sender, connection) = h2::client::handshake(tcp).await.unwrap();
    tokio::spawn(connection);
    sender
}

/// A call's answer to come, and its stream, held open: the rest of its message is never sent.
type Call = (h2::client::ResponseFuture, h2::SendStream<Bytes>);

/// Opens a gRPC call to `path` with `headers` and sends the 5-byte header of a message
/// announcing [`ANNOUNCED`] bytes, then `body` (none of it is the message's end).
async fn open(
    sender: &mut Sender,
    path: &str,
    headers: &[(&str, &str)],
    body: Option<Bytes>,
) -> Call {
    let mut req = Request::post(format!("http://vigil{path}"))
        .header("content-type", "application/grpc")
        .header("te", "trailers");
    for (name, value) in headers {
        req = req.header(*name, *value);
    }
    let ready = sender.clone().ready().await.unwrap();
    *sender = ready;
    let (answer, mut stream) = sender.send_request(req.body(()).unwrap(), false).unwrap();
    let mut prefix = vec![0u8];
    prefix.extend_from_slice(&ANNOUNCED.to_be_bytes());
    stream.send_data(Bytes::from(prefix), false).unwrap();
    if let Some(body) = body {
        // Refused already, the stream may be reset: what is sent after does not matter.
        let _ = stream.send_data(body, false);
    }
    (answer, stream)
}

/// The `grpc-status` of an answer that came without a message (trailers only).
fn grpc_status(answer: &Response<h2::RecvStream>) -> Option<String> {
    let status = answer.headers().get("grpc-status")?;
    Some(status.to_str().unwrap().to_string())
}

/// The answer to a call whose message was announced and not sent, within 5 s.
async fn answer_before_body((answer, _stream): Call, what: &str) -> String {
    let answer = tokio::time::timeout(Duration::from_secs(5), answer)
        .await
        .unwrap_or_else(|_| panic!("{what}: no answer before the message was sent"))
        .unwrap_or_else(|e| panic!("{what}: {e}"));
    grpc_status(&answer).unwrap_or_else(|| panic!("{what}: no grpc-status in {answer:?}"))
}

/// This process's resident memory, in KiB.
fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS in /proc/self/status")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t93_calls_are_authenticated_before_their_body_is_read() {
    let dir = tempfile::tempdir().unwrap();
    let member = common::member(dir.path(), 1, TOKEN, Arc::new(Operators), |cfg| {
        cfg.bootstrap = true
    })
    .await;
    let mut sender = connect(&member).await;

    eprintln!("phase 1: each refusal comes on the headers alone");
    let none: &[(&str, &str)] = &[];
    let wrong = &[(CLUSTER_TOKEN_HEADER, "not-the-token")][..];
    let forged = &[("authorization", "Bearer forged")][..];
    let basic = &[("authorization", "Basic YWxpY2U6")][..];
    let alice = &[("authorization", "Bearer operator:alice")][..];
    for (path, headers, code, what) in [
        (APPEND_ENTRIES, none, "16", "Raft, no credentials"),
        (CREATE_APPROVAL, none, "16", "Coordinator, none"),
        (APPEND_ENTRIES, wrong, "16", "Raft, a wrong token"),
        (CREATE_APPROVAL, wrong, "16", "Coordinator, wrong token"),
        (CREATE_APPROVAL, forged, "16", "a refused bearer token"),
        (CREATE_APPROVAL, basic, "16", "not a bearer token"),
        // A verified operator is not a member: Raft refuses before the body, too.
        (APPEND_ENTRIES, alice, "7", "Raft, an operator"),
    ] {
        let call = open(&mut sender, path, headers, None).await;
        assert_eq!(answer_before_body(call, what).await, code, "{what}");
    }

    eprintln!("phase 2: {STREAMS} unauthenticated streams, {SENT} bytes sent on each");
    let chunk = Bytes::from(vec![7u8; SENT]);
    // Warm up first: what the connection and its first streams cost is not growth.
    for path in [APPEND_ENTRIES, CREATE_APPROVAL] {
        let call = open(&mut sender, path, &[], Some(chunk.clone())).await;
        assert_eq!(answer_before_body(call, path).await, "16");
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let before = rss_kib();
    let mut calls = Vec::new();
    for i in 0..STREAMS {
        let path = [APPEND_ENTRIES, CREATE_APPROVAL][i % 2];
        calls.push(open(&mut sender, path, &[], Some(chunk.clone())).await);
    }
    // Waiting for the answers gives the member the time to take in what was sent, were it
    // reading it; memory is measured before any is judged.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    let mut answers = Vec::new();
    // Held open to the end: a dropped stream would be cancelled by the client itself.
    let mut streams = Vec::new();
    for (answer, stream) in calls {
        answers.push(tokio::time::timeout_at(deadline, answer).await);
        streams.push(stream);
    }
    let grown = rss_kib().saturating_sub(before);
    eprintln!("resident memory grew by {grown} KiB over {STREAMS} streams");
    assert!(
        grown <= MAX_GROWTH_KIB,
        "resident memory grew by {grown} KiB (at most {MAX_GROWTH_KIB})"
    );
    for answer in answers {
        let answer = answer.expect("answered before the body").unwrap();
        assert_eq!(grpc_status(&answer).as_deref(), Some("16"));
    }
    let refused = |kind| {
        member
            .shared
            .metrics
            .refused_calls
            .get_or_create(&KindLabel { kind })
            .get()
    };
    assert!(refused("Raft") > STREAMS as u64 / 2, "{}", refused("Raft"));
    assert!(refused("Coordinator") > STREAMS as u64 / 2);

    eprintln!("phase 3: a member's credentials still get through");
    let node = common::client(
        &member,
        vigil_coordinator::client::Credential::Cluster(TOKEN.into()),
    );
    let keys = node
        .list_node_keys(vigil_proto::coordinator::ListNodeKeysRequest::default())
        .await;
    assert!(keys.is_ok(), "{keys:?}");
    member.shutdown().await;
}
