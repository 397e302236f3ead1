//! t13: the PROXY protocol on the SSH, Kubernetes and API listeners, without HAProxy (the
//! PostgreSQL listener behind the real HAProxy: cluster.rs t11). A balancer written in the test
//! (`vigil_chaos::balancer`) relays clients from 127.0.0.2 with a v2 header naming each, as
//! HAProxy's `send-proxy-v2` does; the node lists 127.0.0.2 in `node.proxy_protocol_from`. Judged
//! by the node's records: a client through the balancer is recorded with its own address and
//! the balancer's apart; a client that connects directly from 127.0.0.1 is recorded with its
//! own address, and if it sends a header of its own (at once, or begun and not finished within
//! 5 s) it is refused, recorded with its real address, and the address it claimed is on no
//! record.

use std::net::SocketAddr;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use vigil_chaos::balancer::{v2_header, Balancer};
use vigil_chaos::*;
use vigil_proto::record::{Kind, Record};

/// The address a client claims in a header of its own.
const CLAIMED: &str = "192.0.2.66:4242";

fn phase(what: &str) {
    eprintln!("--- {what}");
}

/// The records of `protocol` sessions that have a connection, once `done` holds for them.
async fn records_until(
    node: &TestNode,
    what: &str,
    done: impl Fn(&[Record]) -> bool,
) -> Vec<Record> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let records = node.records().await;
        if done(&records) {
            return records;
        }
        assert!(tokio::time::Instant::now() < deadline, "no record: {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Records of `protocol` whose connection names `client` as the client.
fn of_client<'a>(records: &'a [Record], protocol: &str, client: SocketAddr) -> Vec<&'a Record> {
    let client = client.to_string();
    records
        .iter()
        .filter(|r| {
            r.body
                .connection
                .as_ref()
                .is_some_and(|c| c.protocol == protocol && c.client_addr == client)
        })
        .collect()
}

/// A connection of [`claim_directly`]: the client's own address, and how many records the node
/// had before it (an earlier session of the test may have had the same address: the kernel
/// reuses a source port, at once for another destination).
struct Claim {
    me: SocketAddr,
    after: usize,
}

/// Sends a header claiming [`CLAIMED`] straight to `listener` (from 127.0.0.1), then waits for
/// the node to close the connection.
async fn claim_directly(node: &TestNode, listener: SocketAddr) -> Claim {
    let after = node.records().await.len();
    let mut s = TcpStream::connect(listener).await.unwrap();
    let me = s.local_addr().unwrap();
    s.write_all(&v2_header(CLAIMED.parse().unwrap(), listener))
        .await
        .unwrap();
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut answer))
        .await
        .expect("the node closes the connection")
        .ok();
    Claim { me, after }
}

/// The refusal of a [`claim_directly`] is on record, once, with the client's own address.
async fn refusal_on_record(node: &TestNode, protocol: &str, claim: Claim) {
    let Claim { me, after } = claim;
    let since = |r: &[Record]| r.len().min(after);
    let records = records_until(node, &format!("{protocol} refusal"), |r| {
        !of_client(&r[since(r)..], protocol, me).is_empty()
    })
    .await;
    let mine = of_client(&records[since(&records)..], protocol, me);
    assert_eq!(mine.len(), 1, "one record of the refused connection");
    let r = mine[0];
    assert_eq!(r.body.kind, Kind::ProtocolError);
    assert_eq!(
        r.body.detail.as_deref(),
        Some(
            format!(
            "refused: a PROXY protocol v2 header from {me}, which is not a configured load balancer (node.proxy_protocol_from)"
        )
            .as_str()
        )
    );
    assert_eq!(r.body.connection.as_ref().unwrap().balancer_addr, None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t13_ssh_kubernetes_and_api_clients_behind_a_proxy_protocol_balancer() {
    let e = env();
    let keys = tempfile::tempdir().unwrap();
    let ca = ssh::keygen(keys.path(), "ca");
    let ssh_section = ssh::ssh_section(
        &ca,
        e.get("VIGIL_DEV_SSHD_HOST_KEY"),
        e.get("VIGIL_DEV_SSH_GATEWAY_KEY"),
        "",
    );
    let node = TestNode::start(NodeOptions {
        node_extra: r#"proxy_protocol_from = ["127.0.0.2"]"#,
        protocols: Some(format!(
            "{ssh_section}\n[api]\nlisten = \"127.0.0.1:0\"\n[api.login]\nclient_id = \"vigil-cli\"\n{}",
            kube::kube_section("")
        )),
        ..NodeOptions::default()
    })
    .await;
    let ssh_addr = node.node.addr("ssh").expect("an SSH listener");
    let kube_addr = node.node.addr("kubernetes").expect("a Kubernetes listener");
    let token = token_for("agent-ops", "agent-ops-secret").await;
    let user = format!("{}+web", e.get("VIGIL_DEV_SSH_LOGIN"));

    phase("ssh through the balancer: the client's address on record, the balancer's apart");
    let lb = Balancer::start(ssh_addr).await;
    let h = ssh::token_login(lb.port, &user, &token)
        .await
        .expect("logs in through the balancer");
    let (out, _, status) = ssh::exec(&h, "echo through-the-balancer").await;
    assert_eq!(
        (out.as_slice(), status),
        (&b"through-the-balancer\n"[..], Some(0))
    );
    drop(h);
    let client = lb.clients()[0];
    let records = records_until(&node, "the ssh session through the balancer", |r| {
        of_client(r, "ssh", client)
            .iter()
            .any(|r| r.body.kind == Kind::SessionEnd)
    })
    .await;
    let session = of_client(&records, "ssh", client);
    for r in &session {
        let balancer = r.body.connection.as_ref().unwrap().balancer_addr.as_deref();
        assert!(
            balancer.is_some_and(|b| b.starts_with("127.0.0.2:")),
            "{:?} names the balancer: {balancer:?}",
            r.body.kind
        );
    }
    assert!(
        session.iter().any(|r| r.body.kind == Kind::Request),
        "the exec is on record with the client's address"
    );

    phase("ssh directly: recorded with the client's own address, no balancer");
    let h = ssh::token_login(ssh_addr.port(), &user, &token)
        .await
        .expect("logs in directly");
    drop(h);
    let records = records_until(&node, "the direct ssh session", |r| {
        r.iter().any(|r| {
            r.body.kind == Kind::SessionStart
                && r.body.connection.as_ref().is_some_and(|c| {
                    c.protocol == "ssh"
                        && c.balancer_addr.is_none()
                        && c.client_addr.starts_with("127.0.0.1:")
                })
        })
    })
    .await;
    assert!(!records.is_empty());

    phase("kubectl through the balancer");
    let lb = Balancer::start(kube_addr).await;
    let server = format!("https://127.0.0.1:{}/clusters/dev", lb.port);
    // The certificate the listener generated: the kubeconfig's CA.
    let cert = node.files.dir.path().join("tls-kubernetes/cert.pem");
    let config = kube::kubeconfig(keys.path(), &server, &cert, &token);
    let out = kube::kubectl(&config, &["get", "pods", "-n", "default"]).await;
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("shell"),
        "{}",
        output_text(&out)
    );
    let clients = lb.clients();
    let records = records_until(&node, "kubectl's request through the balancer", |r| {
        clients.iter().any(|c| {
            of_client(r, "kubernetes", *c)
                .iter()
                .any(|r| r.body.kind == Kind::Request)
        })
    })
    .await;
    let through: Vec<&Record> = clients
        .iter()
        .flat_map(|c| of_client(&records, "kubernetes", *c))
        .collect();
    for r in &through {
        let balancer = r.body.connection.as_ref().unwrap().balancer_addr.as_deref();
        assert!(
            balancer.is_some_and(|b| b.starts_with("127.0.0.2:")),
            "{balancer:?}"
        );
    }
    assert!(
        records
            .iter()
            .all(|r| r.body.connection.as_ref().is_none_or(|c| {
                c.protocol != "kubernetes"
                    || clients.iter().any(|cl| c.client_addr == cl.to_string())
            })),
        "every Kubernetes record names a client the balancer relayed"
    );

    phase("vigil login through the balancer: the certificate endpoint's record");
    let api_addr = node.node.api_addr.expect("an API listener");
    let lb = Balancer::start(api_addr).await;
    let home = tempfile::tempdir().unwrap();
    let api_ca = node.files.dir.path().join("tls-api/cert.pem");
    let (code, out) = vigil_async(&[
        "login",
        "--token",
        &token,
        "--gateway",
        &format!("https://127.0.0.1:{}", lb.port),
        "--gateway-ca",
        api_ca.to_str().unwrap(),
        "--home",
        home.path().to_str().unwrap(),
    ])
    .await;
    assert_eq!(code, 0, "{out}");
    let clients = lb.clients();
    let records = node.records().await;
    let issued: Vec<&Record> = clients
        .iter()
        .flat_map(|c| of_client(&records, "ssh", *c))
        .filter(|r| {
            r.body
                .connection
                .as_ref()
                .is_some_and(|c| c.name.as_deref() == Some("certificate"))
        })
        .collect();
    assert_eq!(issued.len(), 1, "the certificate's record names the client");
    let balancer = issued[0]
        .body
        .connection
        .as_ref()
        .unwrap()
        .balancer_addr
        .as_deref();
    assert!(
        balancer.is_some_and(|b| b.starts_with("127.0.0.2:")),
        "{balancer:?}"
    );

    phase("a header sent directly from 127.0.0.1 is refused on every listener");
    let claim = claim_directly(&node, ssh_addr).await;
    refusal_on_record(&node, "ssh", claim).await;
    let claim = claim_directly(&node, kube_addr).await;
    refusal_on_record(&node, "kubernetes", claim).await;
    // The API's records are the SSH certificate endpoint's.
    let claim = claim_directly(&node, api_addr).await;
    refusal_on_record(&node, "ssh", claim).await;

    phase("a header begun and not finished within 5 s is refused the same way");
    // An outside review: the first byte, then the rest 6 s later, escaped the refusal and its
    // record (the listener took the connection as the protocol's own).
    let after = node.records().await.len();
    let mut s = TcpStream::connect(kube_addr).await.unwrap();
    let me = s.local_addr().unwrap();
    let header = v2_header(CLAIMED.parse().unwrap(), kube_addr);
    s.write_all(&header[..1]).await.unwrap();
    tokio::time::sleep(Duration::from_secs(6)).await;
    let _ = s.write_all(&header[1..]).await;
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut answer))
        .await
        .expect("the node closes the connection")
        .ok();
    let records = records_until(&node, "the slow header's refusal", |r| {
        !of_client(&r[after.min(r.len())..], "kubernetes", me).is_empty()
    })
    .await;
    let mine = of_client(&records[after..], "kubernetes", me);
    assert_eq!(mine.len(), 1, "{mine:?}");
    assert_eq!(mine[0].body.kind, Kind::ProtocolError);
    assert_eq!(
        mine[0].body.detail.as_deref(),
        Some(
            format!("refused: {me} began a PROXY protocol header and did not finish it within 5 s")
                .as_str()
        )
    );

    let records = node.records().await;
    assert!(
        records.iter().all(|r| r
            .body
            .connection
            .as_ref()
            .is_none_or(|c| !c.client_addr.starts_with("192.0.2.66"))),
        "the claimed address is on no record"
    );
    let metrics = node.metrics().await;
    assert!(metric(&metrics, "vigil_protocol_errors_total") >= 4.0);
}
