//! The node's HTTP listeners hold a bounded number of connections, cut a request head that
//! does not come in time, and read no request body before they know the caller (outside
//! review, 2026-12-07: connections that sent half a head were held for good, and enough of
//! them took every file descriptor of the node; the API read 2 MiB bodies of anyone).

use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use vigil_chaos::kube::{kube_section, Gateway};
use vigil_chaos::{metric, token_for};
use vigil_proto::record::{Kind, Outcome};

async fn tls(port: u16) -> tokio_rustls::client::TlsStream<TcpStream> {
    let tcp = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    let connector =
        tokio_rustls::TlsConnector::from(vigil_node::core::tls::unverified_client_config());
    let name = tokio_rustls::rustls::pki_types::ServerName::try_from("localhost").unwrap();
    connector.connect(name, tcp).await.unwrap()
}

/// What the server sent until it closed the connection; panics if it has not `within`.
async fn closed_within(s: &mut (impl AsyncRead + Unpin), within: Duration) -> Vec<u8> {
    let mut got = Vec::new();
    tokio::time::timeout(within, async {
        let mut buf = [0u8; 4096];
        while let Ok(n) = s.read(&mut buf).await {
            if n == 0 {
                break;
            }
            got.extend_from_slice(&buf[..n]);
        }
    })
    .await
    .unwrap_or_else(|_| panic!("the connection is still open after {within:?}"));
    got
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_kubernetes_listener_holds_a_bounded_number_of_connections_and_cuts_slow_heads() {
    let section =
        kube_section("").replacen("[kubernetes]\n", "[kubernetes]\nmax_connections = 3\n", 1);
    let g = Gateway::start_with(section, None).await;
    let port = g.node.node.addr("kubernetes").unwrap().port();
    // Three connections that send half a request head hold every place.
    let mut held = Vec::new();
    for _ in 0..3 {
        let mut s = tls(port).await;
        s.write_all(b"GET /clusters/dev/api HTTP/1.1\r\nHost: x\r\n")
            .await
            .unwrap();
        held.push(s);
    }
    // A fourth is closed at once, before TLS, and counted.
    let mut fourth = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    closed_within(&mut fourth, Duration::from_secs(5)).await;
    assert!(metric(&g.node.metrics().await, "vigil_preauth_refused_total") >= 1.0);
    // The slow heads are cut once the time for a request's head is over (30 s).
    for s in &mut held {
        closed_within(s, Duration::from_secs(45)).await;
    }
    // Their places are free again: a request is answered.
    let mut s = tls(port).await;
    s.write_all(b"GET /clusters/dev/version HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let answer = closed_within(&mut s, Duration::from_secs(10)).await;
    assert!(
        answer.starts_with(b"HTTP/1.1 401"),
        "{}",
        String::from_utf8_lossy(&answer)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_api_reads_no_body_before_it_knows_the_caller_and_no_large_one_after() {
    let g = vigil_chaos::ssh::Gateway::start("").await;
    let port = g.node.node.api_addr.expect("an API listener").port();
    // Without a token: refused on the head, without waiting for the 100 MB announced.
    let mut s = tls(port).await;
    s.write_all(
        b"POST /v1/ssh/certificate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100000000\r\n\r\n",
    )
    .await
    .unwrap();
    let mut head = [0u8; 12];
    tokio::time::timeout(Duration::from_secs(10), s.read_exact(&mut head))
        .await
        .expect("answered before the body")
        .unwrap();
    assert_eq!(&head, b"HTTP/1.1 401");
    // With one: a body over the limit is refused, on record.
    let token = token_for("agent-ops", "agent-ops-secret").await;
    let mut s = tls(port).await;
    let body = vec![b' '; 1 << 20];
    let head = format!(
        "POST /v1/ssh/certificate HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    s.write_all(head.as_bytes()).await.unwrap();
    let _ = s.write_all(&body).await;
    let answer = closed_within(&mut s, Duration::from_secs(20)).await;
    assert!(
        answer.starts_with(b"HTTP/1.1 413"),
        "{}",
        String::from_utf8_lossy(&answer)
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    let records = g.node.records().await;
    let refused = records.iter().any(|r| {
        r.body.kind == Kind::Request
            && r.body.outcome == Some(Outcome::Denied)
            && r.body
                .detail
                .as_deref()
                .is_some_and(|d| d.contains("the body is too large"))
    });
    assert!(refused, "{records:#?}");
}

/// A body that does not come is not waited for past 30 s from its head: the admin listener
/// reads a passed-on cancel's body before it checks its signature, and a client sending a
/// byte now and then held its connection (one of 32 places, health checks' included) for as
/// long as it liked (final review, 2026-12-07). The API and the console share the same server
/// loop, and so the same bound.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_that_does_not_come_is_cut_after_its_time() {
    let g = vigil_chaos::ssh::Gateway::start("").await;
    let admin = g.node.node.admin_addr;
    let mut s = TcpStream::connect(admin).await.unwrap();
    s.write_all(
        format!(
            "POST {} HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n0123456789",
            vigil_node::core::peers::PG_CANCEL_PATH
        )
        .as_bytes(),
    )
    .await
    .unwrap();
    let started = std::time::Instant::now();
    // A byte every 5 s: never idle for long, never done.
    let answer = tokio::time::timeout(Duration::from_secs(45), async {
        let mut got = Vec::new();
        let mut buf = [0u8; 1024];
        loop {
            tokio::select! {
                n = s.read(&mut buf) => match n {
                    Ok(0) | Err(_) => return got,
                    Ok(n) => got.extend_from_slice(&buf[..n]),
                },
                () = tokio::time::sleep(Duration::from_secs(5)) => {
                    let _ = s.write_all(b"x").await;
                }
            }
        }
    })
    .await
    .expect("the connection is closed within 45 s");
    assert!(started.elapsed() >= Duration::from_secs(25));
    assert!(
        answer.starts_with(b"HTTP/1.1 400"),
        "{}",
        String::from_utf8_lossy(&answer)
    );
}
