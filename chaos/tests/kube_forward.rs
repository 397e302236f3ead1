//! Port-forward through the Kubernetes gateway, against the real dev API server and the test
//! kubelet (which connects a forwarded port to 127.0.0.1:PORT on this host and logs every
//! connection it carries: the ground truth). Refused unless a rule allows it; when allowed,
//! recorded as metadata (ports, connections, bytes), never as content.

use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use vigil_chaos::kube::{audit_len, gateway_events, grant_dba, Gateway, OPS_FORWARD_TO_SHELL};
use vigil_chaos::kubelet::exec_log_since;
use vigil_chaos::{response_to, token_for};
use vigil_proto::record::{Kind, Outcome, Record, Request};

/// A server on 127.0.0.1 (where the test kubelet forwards to) that answers each line with
/// `echo: LINE`.
async fn echo_server() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let (rd, mut wr) = stream.into_split();
                let mut lines = BufReader::new(rd).lines();
                while let Ok(Some(line)) = lines.next_line().await {
                    if wr
                        .write_all(format!("echo: {line}\n").as_bytes())
                        .await
                        .is_err()
                    {
                        break;
                    }
                }
            });
        }
    });
    port
}

/// `kubectl port-forward` through the gateway, once it listens (or its output when it ends
/// first). `env` forces a protocol.
async fn port_forward(
    config: &std::path::Path,
    local: u16,
    remote: u16,
    env: &[(&str, &str)],
) -> Result<tokio::process::Child, String> {
    let mut child = tokio::process::Command::new("kubectl")
        .arg("--kubeconfig")
        .arg(config)
        .args([
            "port-forward",
            "-n",
            "default",
            "pod/shell",
            &format!("{local}:{remote}"),
        ])
        .envs(env.iter().copied())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("kubectl runs");
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let ready = tokio::time::timeout(Duration::from_secs(30), lines.next_line()).await;
    match ready {
        Ok(Ok(Some(line))) if line.contains("Forwarding from") => {
            tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
            Ok(child)
        }
        other => {
            let _ = child.start_kill();
            let mut err = String::new();
            if let Some(mut e) = child.stderr.take() {
                let _ =
                    tokio::time::timeout(Duration::from_secs(5), e.read_to_string(&mut err)).await;
            }
            Err(format!("{other:?}: {err}"))
        }
    }
}

/// Stops kubectl as a user does: Ctrl-C (SIGINT), then waits for it to exit.
async fn interrupt(mut child: tokio::process::Child) {
    let pid = child.id().expect("kubectl is running").to_string();
    let killed = std::process::Command::new("kill")
        .args(["-INT", &pid])
        .status()
        .unwrap();
    assert!(killed.success());
    let _ = tokio::time::timeout(Duration::from_secs(10), child.wait()).await;
}

/// Sends `line` over a new connection to the forwarded local port; returns the answer.
async fn exchange(local: u16, line: &str) -> String {
    let stream = TcpStream::connect(("127.0.0.1", local)).await.unwrap();
    let (rd, mut wr) = stream.into_split();
    wr.write_all(format!("{line}\n").as_bytes()).await.unwrap();
    let mut answer = String::new();
    tokio::time::timeout(
        Duration::from_secs(20),
        BufReader::new(rd).read_line(&mut answer),
    )
    .await
    .expect("the forwarded port answers")
    .unwrap();
    answer
}

/// The kubelet's log lines of port-forward connections to `port`.
fn kubelet_forwards(port: u16) -> usize {
    exec_log_since(0)
        .iter()
        .filter(|e| e["kind"] == "portforward" && e["port"] == port)
        .count()
}

fn portforward_records(records: &[Record], kind: Kind) -> Vec<&Record> {
    records
        .iter()
        .filter(|r| r.body.kind == kind)
        .filter(|r| {
            matches!(&r.body.request, Some(Request::Kubernetes(k))
                if k.subresource.as_deref() == Some("portforward"))
        })
        .collect()
}

/// The request record of a port-forward and its response record, whose detail is `want`.
fn forward_response<'a>(records: &'a [Record], want: &str) -> Option<(&'a Record, &'a Record)> {
    portforward_records(records, Kind::Request)
        .into_iter()
        .find_map(|q| {
            response_to(records, q)
                .filter(|r| r.body.detail.as_deref() == Some(want))
                .map(|r| (q, r))
        })
}

/// A port-forward a rule allows carries two connections (over kubectl's default protocol
/// choice, SPDY tunnelled through WebSocket, which the gateway ends and carries to the API
/// server (1.20, without the tunnel) as SPDY; and over SPDY forced), each reaching the pod's
/// port exactly as the kubelet logs it; one request reaches the API server, with the verb of
/// Vigil's record (kubectl did not fall back); the response record counts the port's
/// connections and bytes, and no byte of the content is in any record. Where no rule allows it (even with a default that allows
/// everything else), it is refused before anything reaches the kubelet.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn port_forward_is_refused_unless_a_rule_allows_it_and_recorded_as_metadata() {
    grant_dba().await;
    let g = Gateway::start(OPS_FORWARD_TO_SHELL).await;
    let dir = tempfile::tempdir().unwrap();
    let marker = format!("fwd-{}", vigil_chaos::random_suffix());

    for (i, env) in [vec![], vec![("KUBECTL_PORT_FORWARD_WEBSOCKETS", "false")]]
        .into_iter()
        .enumerate()
    {
        let remote = echo_server().await;
        let local = vigil_chaos::free_port();
        let ops = token_for("agent-ops", "agent-ops-secret").await;
        let config = g.kubeconfig(dir.path(), &ops);
        let audit_offset = audit_len();
        let child = port_forward(&config, local, remote, &env)
            .await
            .unwrap_or_else(|e| panic!("kubectl port-forward ({env:?}) did not start: {e}"));
        let first = format!("{marker}-{i}-one");
        let second = format!("{marker}-{i}-second");
        assert_eq!(exchange(local, &first).await, format!("echo: {first}\n"));
        assert_eq!(exchange(local, &second).await, format!("echo: {second}\n"));
        interrupt(child).await;
        assert_eq!(
            kubelet_forwards(remote),
            2,
            "the kubelet carried two connections"
        );

        // The response record is written once the streams end.
        let sent = (first.len() + second.len() + 2) as u64;
        let received = sent + 2 * "echo: ".len() as u64;
        let want = format!("port {remote}: 2 connections, {sent} bytes in, {received} bytes out");
        let mut records = Vec::new();
        let mut found = None;
        for _ in 0..50 {
            records = g.node.records().await;
            found = forward_response(&records, &want);
            if found.is_some() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        let (request, end) =
            found.unwrap_or_else(|| panic!("no response record {want:?} of a port-forward"));
        assert_eq!(end.body.outcome, Some(Outcome::Success), "{:?}", end.body);
        assert_eq!(
            request.body.policy.as_ref().map(|p| p.rule.as_str()),
            Some("ops-forward-to-shell")
        );
        let text = serde_json::to_string(&records).unwrap();
        assert!(
            !text.contains(&first) && !text.contains(&second),
            "no content of a forwarded connection is on record"
        );

        // The tunnel is a GET (a WebSocket), SPDY a POST; the API server saw one request, and
        // the verb Vigil recorded and decided.
        let (method, verb) = if env.is_empty() {
            ("GET", "get")
        } else {
            ("POST", "create")
        };
        let Some(Request::Kubernetes(k)) = &request.body.request else {
            panic!("a Kubernetes request record: {:?}", request.body)
        };
        assert_eq!((k.method.as_str(), k.verb.as_str()), (method, verb));
        assert_eq!(
            portforward_records(&records, Kind::Request).len(),
            i + 1,
            "one port-forward request per run: kubectl did not fall back"
        );
        let mut events = Vec::new();
        for _ in 0..50 {
            events = gateway_events(audit_offset, std::slice::from_ref(request))
                .into_iter()
                .filter(|e| {
                    e["stage"] == "ResponseComplete"
                        && e["objectRef"]["subresource"] == "portforward"
                })
                .collect();
            if !events.is_empty() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        assert_eq!(events.len(), 1, "{events:#?}");
        assert_eq!(events[0]["verb"], verb, "{:#}", events[0]);
    }

    // A gateway whose policy allows everything by default, with no rule on port-forward:
    // refused with the reason, nothing reaches the kubelet.
    let g = Gateway::start("").await;
    let remote = echo_server().await;
    let ops = token_for("agent-ops", "agent-ops-secret").await;
    let config = g.kubeconfig(dir.path(), &ops);
    let refused = port_forward(&config, vigil_chaos::free_port(), remote, &[]).await;
    let Err(out) = refused else {
        panic!("a port-forward no rule allows was let through")
    };
    assert!(out.contains("no rule allows port-forward"), "{out}");
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(kubelet_forwards(remote), 0);
    let records = g.node.records().await;
    let blocked = portforward_records(&records, Kind::Blocked);
    assert!(
        blocked.iter().any(|r| r
            .body
            .detail
            .as_deref()
            .is_some_and(|d| d.contains("no rule allows port-forward"))),
        "{blocked:#?}"
    );
}
