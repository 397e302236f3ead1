//! exec and port-forward over WebSocket through the Kubernetes gateway, with kube-rs (which
//! speaks only WebSocket: it offers `v5.channel.k8s.io` and `v4.channel.k8s.io`, and the test
//! kubelet picks v5), and a client that offers only v4 (as older client libraries do), which the
//! kubelet's own 1.20 streaming code serves. Ground truth is the test kubelet's log of what it
//! ran, on which transport, and which ports it connected; the streams are in Vigil's records.

use futures_util::SinkExt;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, AttachParams, LogParams, TerminalSize};
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpListener;
use vigil_chaos::kube::{
    client, grant_dba, recorded_bytes, requests, same_request, wait_for_end, Gateway,
    NO_RM_IN_PODS, OPS_FORWARD_TO_SHELL,
};
use vigil_chaos::kubelet::{exec_log_since, ran_once};
use vigil_chaos::token_for;
use vigil_proto::record::{Kind, Outcome, Record, Request};

/// The request record of the exec whose command mentions `marker`, and the records of it.
fn exec_records<'a>(records: &'a [Record], marker: &str) -> (&'a Record, Vec<&'a Record>) {
    let request = *requests(records, |k| k.command.iter().any(|c| c.contains(marker)))
        .first()
        .unwrap_or_else(|| panic!("a request record of the exec {marker}"));
    (request, same_request(records, request))
}

/// The node's records once the exec whose command mentions `marker` has its response record,
/// and that record.
async fn response(g: &Gateway, marker: &str) -> (Vec<Record>, Record) {
    let records = g.node.records().await;
    let (request, _) = exec_records(&records, marker);
    let (records, end, _) = wait_for_end(&g.node, request).await;
    (records, end)
}

/// A gateway with the rules of these tests.
async fn gateway() -> Gateway {
    Gateway::start(&format!("{NO_RM_IN_PODS}{OPS_FORWARD_TO_SHELL}")).await
}

/// kube-rs exec over WebSocket: stdin, stdout and stderr each on its channel, the exit code
/// from the error channel's Status, each recorded before it was forwarded; a tty exec's resize
/// reaches the process and is recorded; an exec a rule blocks is a 403 Status to kube-rs and
/// never reaches the kubelet.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kube_rs_exec_over_websocket_is_decided_recorded_and_passes_streams() {
    grant_dba().await;
    let g = gateway().await;
    let dir = tempfile::tempdir().unwrap();
    let ops = token_for("agent-ops", "agent-ops-secret").await;
    let pods: Api<Pod> = Api::namespaced(client(&g.kubeconfig(dir.path(), &ops)).await, "default");
    let marker = format!("ws-{}", vigil_chaos::random_suffix());

    // Streams apart, and the exit code.
    let script = format!("head -n 1; echo err-{marker} >&2; exit 3");
    let params = AttachParams::default().stdin(true);
    let mut p = pods
        .exec("shell", ["sh", "-c", script.as_str()], &params)
        .await
        .expect("kube-rs execs through the gateway over WebSocket");
    let mut stdin = p.stdin().unwrap();
    let (mut out, mut err) = (p.stdout().unwrap(), p.stderr().unwrap());
    let status = p.take_status().unwrap();
    stdin
        .write_all(format!("in-{marker}\n").as_bytes())
        .await
        .unwrap();
    let (mut stdout, mut stderr) = (String::new(), String::new());
    let read = async {
        tokio::try_join!(
            out.read_to_string(&mut stdout),
            err.read_to_string(&mut stderr)
        )
    };
    tokio::time::timeout(Duration::from_secs(30), read)
        .await
        .expect("the exec ends")
        .unwrap();
    let status = status.await.expect("the error channel's Status");
    drop(stdin);
    p.join().await.unwrap();
    assert_eq!(stdout, format!("in-{marker}\n"));
    assert_eq!(stderr, format!("err-{marker}\n"));
    assert_eq!(
        status.reason.as_deref(),
        Some("NonZeroExitCode"),
        "{status:?}"
    );
    let code = status
        .details
        .and_then(|d| d.causes)
        .and_then(|c| {
            c.into_iter()
                .find(|c| c.reason.as_deref() == Some("ExitCode"))
        })
        .and_then(|c| c.message);
    assert_eq!(code.as_deref(), Some("3"));
    assert!(
        exec_log_since(0)
            .iter()
            .any(|e| e["kind"] == "exec" && e["command"][2] == script.as_str()),
        "the kubelet ran it"
    );

    let (records, end) = response(&g, &marker).await;
    assert_eq!(
        end.body.detail.as_deref(),
        Some("exit code 3"),
        "{:?}",
        end.body
    );
    let (request, same) = exec_records(&records, &marker);
    let channel = request.body.stmt.unwrap().to_string();
    assert_eq!(
        recorded_bytes(&same, &g.node.files.audit_dir, &channel, "input"),
        format!("in-{marker}\n").as_bytes()
    );
    assert_eq!(
        recorded_bytes(&same, &g.node.files.audit_dir, &channel, "output"),
        format!("in-{marker}\n").as_bytes()
    );
    assert_eq!(
        recorded_bytes(&same, &g.node.files.audit_dir, &channel, "error"),
        format!("err-{marker}\n").as_bytes()
    );

    // A terminal: the resize reaches the shell, and is recorded.
    let tty_marker = format!("{marker}-tty");
    let script = format!("read x; stty size; echo {tty_marker}");
    let params = AttachParams::interactive_tty();
    let mut p = pods
        .exec("shell", ["sh", "-c", script.as_str()], &params)
        .await
        .expect("a tty exec over WebSocket");
    let mut sizes = p.terminal_size().unwrap();
    sizes
        .send(TerminalSize {
            width: 123,
            height: 45,
        })
        .await
        .unwrap();
    let mut stdin = p.stdin().unwrap();
    let mut out = p.stdout().unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    stdin.write_all(b"go\r").await.unwrap();
    let mut screen = String::new();
    let read = tokio::time::timeout(Duration::from_secs(30), async {
        let mut lines = BufReader::new(&mut out).lines();
        while let Ok(Some(line)) = lines.next_line().await {
            screen.push_str(&line);
            screen.push('\n');
            if line.contains(&tty_marker) && !line.contains("echo") {
                break;
            }
        }
    })
    .await;
    assert!(read.is_ok(), "the tty exec answers: {screen:?}");
    assert!(screen.contains("45 123"), "stty saw the resize: {screen:?}");
    drop((stdin, sizes));
    p.abort();
    let (records, _) = response(&g, &tty_marker).await;
    let (request, same) = exec_records(&records, &tty_marker);
    let resize = format!("{}.resize", request.body.stmt.unwrap());
    let resizes = String::from_utf8(recorded_bytes(
        &same,
        &g.node.files.audit_dir,
        &resize,
        "input",
    ))
    .unwrap();
    assert!(
        resizes.contains(r#"{"Width":123,"Height":45}"#),
        "{resizes}"
    );

    // Blocked by rule: a 403 Status to kube-rs, nothing at the kubelet.
    let doomed = format!("/tmp/{marker}-doomed");
    let refused = pods
        .exec(
            "shell",
            ["rm", "-rf", doomed.as_str()],
            &AttachParams::default(),
        )
        .await;
    let Err(e) = refused else {
        panic!("a blocked exec was let through")
    };
    assert!(e.to_string().contains("no-rm-in-pods"), "{e}");
    assert!(!exec_log_since(0)
        .iter()
        .any(|e| e["command"].to_string().contains(&doomed)));

    let dir = g.node.files.audit_dir.to_str().unwrap().to_string();
    let (code, report) = tokio::task::spawn_blocking(move || {
        vigil_chaos::vigil(&["audit", "verify", "--log", &dir])
    })
    .await
    .unwrap();
    assert_eq!(code, 0, "{report}");
}

/// `s` as a query value: every byte but ASCII letters and digits percent-encoded.
fn query_value(s: &str) -> String {
    s.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() {
                char::from(b).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

/// An exec from a client that offers only `v4.channel.k8s.io`: the gateway offers the API
/// server that and nothing else, the answer names it, and the kubelet's own v4 server runs the
/// command once; stdout on channel 1, the exit code in the error channel's Status, both on
/// record as over v5.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_exec_that_offers_only_v4_is_served_v4() {
    use futures_util::StreamExt;
    use http::header;
    use tokio_tungstenite::tungstenite::{protocol::Role, Message};
    grant_dba().await;
    let g = gateway().await;
    let dir = tempfile::tempdir().unwrap();
    let ops = token_for("agent-ops", "agent-ops-secret").await;
    let kube = client(&g.kubeconfig(dir.path(), &ops)).await;
    let marker = format!("v4-{}", vigil_chaos::random_suffix());
    let script = format!("echo out-{marker}; exit 5");
    let key = tokio_tungstenite::tungstenite::handshake::client::generate_key();
    let request = http::Request::get(format!(
        "/api/v1/namespaces/default/pods/shell/exec?command=sh&command=-c&command={}&stdout=true",
        query_value(&script)
    ))
    .header(header::CONNECTION, "Upgrade")
    .header(header::UPGRADE, "websocket")
    .header(header::SEC_WEBSOCKET_VERSION, "13")
    .header(header::SEC_WEBSOCKET_KEY, &key)
    .header(header::SEC_WEBSOCKET_PROTOCOL, "v4.channel.k8s.io")
    .body(kube::client::Body::empty())
    .unwrap();
    let answer = kube.send(request).await.expect("the upgrade is answered");
    assert_eq!(answer.status(), http::StatusCode::SWITCHING_PROTOCOLS);
    assert_eq!(
        answer.headers()[header::SEC_WEBSOCKET_PROTOCOL],
        "v4.channel.k8s.io"
    );
    let upgraded = hyper::upgrade::on(answer).await.unwrap();
    let mut ws = tokio_tungstenite::WebSocketStream::from_raw_socket(
        hyper_util::rt::TokioIo::new(upgraded),
        Role::Client,
        None,
    )
    .await;
    let (mut stdout, mut status) = (Vec::new(), Vec::new());
    tokio::time::timeout(Duration::from_secs(30), async {
        while let Some(message) = ws.next().await {
            match message.expect("a WebSocket message") {
                Message::Binary(data) => match data.split_first() {
                    Some((1, rest)) => stdout.extend_from_slice(rest),
                    Some((3, rest)) => status.extend_from_slice(rest),
                    _ => {}
                },
                Message::Close(_) => break,
                _ => {}
            }
        }
    })
    .await
    .expect("the exec ends and the connection closes");
    // the close handshake's answer, as a client finishes it
    let _ = ws.close(None).await;
    drop(ws);
    assert_eq!(String::from_utf8_lossy(&stdout), format!("out-{marker}\n"));
    let status: serde_json::Value = serde_json::from_slice(&status).expect("a JSON Status");
    assert_eq!(status["reason"], "NonZeroExitCode", "{status}");
    assert_eq!(status["details"]["causes"][0]["message"], "5", "{status}");
    let ran = ran_once(&script);
    assert_eq!(ran["transport"], "websocket", "{ran}");

    let (records, end) = response(&g, &marker).await;
    assert_eq!(end.body.detail.as_deref(), Some("exit code 5"));
    let (request, same) = exec_records(&records, &marker);
    let channel = request.body.stmt.unwrap().to_string();
    assert_eq!(
        recorded_bytes(&same, &g.node.files.audit_dir, &channel, "output"),
        format!("out-{marker}\n").as_bytes()
    );
}

/// kube-rs port-forward over WebSocket channels (`ports` in the query): the bytes reach the
/// pod's port and come back; the response record counts them, and holds none of them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kube_rs_port_forward_over_websocket_is_recorded_as_metadata() {
    grant_dba().await;
    let g = gateway().await;
    let dir = tempfile::tempdir().unwrap();
    let ops = token_for("agent-ops", "agent-ops-secret").await;
    let pods: Api<Pod> = Api::namespaced(client(&g.kubeconfig(dir.path(), &ops)).await, "default");
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        let (mut stream, _) = listener.accept().await.unwrap();
        let mut line = String::new();
        let (rd, mut wr) = stream.split();
        BufReader::new(rd).read_line(&mut line).await.unwrap();
        wr.write_all(format!("echo: {line}").as_bytes())
            .await
            .unwrap();
    });
    let marker = format!("pf-{}", vigil_chaos::random_suffix());
    let mut forwarder = pods
        .portforward("shell", &[port])
        .await
        .expect("kube-rs port-forwards through the gateway over WebSocket");
    let mut stream = forwarder.take_stream(port).unwrap();
    stream
        .write_all(format!("{marker}\n").as_bytes())
        .await
        .unwrap();
    let mut answer = String::new();
    tokio::time::timeout(
        Duration::from_secs(20),
        BufReader::new(&mut stream).read_line(&mut answer),
    )
    .await
    .expect("the forwarded port answers")
    .unwrap();
    assert_eq!(answer, format!("echo: {marker}\n"));
    drop(stream);
    forwarder.abort();
    assert_eq!(
        exec_log_since(0)
            .iter()
            .filter(|e| e["kind"] == "portforward" && e["port"] == port)
            .count(),
        1
    );

    let sent = marker.len() as u64 + 1;
    let want = format!(
        "port {port}: 1 connection, {sent} bytes in, {} bytes out",
        sent + "echo: ".len() as u64
    );
    let mut records = Vec::new();
    for _ in 0..50 {
        records = g.node.records().await;
        if records
            .iter()
            .any(|r| r.body.detail.as_deref() == Some(want.as_str()))
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let end = records
        .iter()
        .find(|r| r.body.kind == Kind::Response && r.body.detail.as_deref() == Some(want.as_str()))
        .unwrap_or_else(|| panic!("a response record {want:?}"));
    assert_eq!(end.body.outcome, Some(Outcome::Success), "{:?}", end.body);
    let text = serde_json::to_string(&records).unwrap();
    assert!(
        !text.contains(&marker),
        "no content of the connection is on record"
    );
}

/// kube-rs attach over WebSocket (the test kubelet starts a shell to attach to) and a followed
/// log: what is typed runs and its output comes back, a line appended to the container's log
/// arrives while the log stream is open; the attach's streams are recorded, the log's end
/// record counts its lines.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kube_rs_attach_and_a_followed_log_go_through_the_gateway() {
    use futures_util::AsyncBufReadExt as _;
    grant_dba().await;
    let g = gateway().await;
    let dir = tempfile::tempdir().unwrap();
    let ops = token_for("agent-ops", "agent-ops-secret").await;
    let pods: Api<Pod> = Api::namespaced(client(&g.kubeconfig(dir.path(), &ops)).await, "default");
    let marker = format!("att-{}", vigil_chaos::random_suffix());

    let params = AttachParams::default().stdin(true).stderr(false);
    let mut p = pods
        .attach("shell", &params)
        .await
        .expect("kube-rs attaches through the gateway over WebSocket");
    let mut stdin = p.stdin().unwrap();
    let mut out = p.stdout().unwrap();
    stdin
        .write_all(format!("echo {marker}-ran; exit 0\n").as_bytes())
        .await
        .unwrap();
    let mut got = String::new();
    tokio::time::timeout(Duration::from_secs(30), out.read_to_string(&mut got))
        .await
        .expect("the attached shell ends")
        .unwrap();
    assert!(got.contains(&format!("{marker}-ran")), "{got:?}");
    drop(stdin);
    let _ = p.join().await;
    assert!(exec_log_since(0).iter().any(|e| e["kind"] == "attach"));
    let records = g.node.records().await;
    let attach = records
        .iter()
        .rfind(|r| {
            r.body.kind == Kind::Request
                && matches!(&r.body.request, Some(Request::Kubernetes(k))
                    if k.subresource.as_deref() == Some("attach"))
        })
        .expect("the attach's request record");
    let same: Vec<&Record> = records
        .iter()
        .filter(|r| r.body.session == attach.body.session && r.body.stmt == attach.body.stmt)
        .collect();
    let channel = attach.body.stmt.unwrap().to_string();
    let typed = String::from_utf8(recorded_bytes(
        &same,
        &g.node.files.audit_dir,
        &channel,
        "input",
    ))
    .unwrap();
    assert!(typed.contains(&format!("echo {marker}-ran")), "{typed:?}");

    // A followed log: a line appended while it is open arrives.
    let line = format!("{marker}-logged");
    let lp = LogParams {
        follow: true,
        container: Some("shell".into()),
        ..LogParams::default()
    };
    let logs = pods.log_stream("shell", &lp).await.expect("a log stream");
    let mut lines = logs.lines();
    vigil_chaos::kubelet::append_container_log(&line);
    let arrived = tokio::time::timeout(Duration::from_secs(10), async {
        use futures_util::StreamExt as _;
        while let Some(l) = lines.next().await {
            if l.unwrap() == line {
                return true;
            }
        }
        false
    })
    .await;
    assert_eq!(
        arrived,
        Ok(true),
        "the appended line arrives while the log is open"
    );
    drop(lines);
    let mut lines_counted = None;
    for _ in 0..50 {
        let records = g.node.records().await;
        lines_counted = records.iter().rev().find_map(|r| match &r.body.response {
            Some(vigil_proto::record::Response::Kubernetes(k)) if k.lines.is_some() => k.lines,
            _ => None,
        });
        if lines_counted.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(
        lines_counted.is_some_and(|n| n >= 1),
        "the log's end is recorded with its lines: {lines_counted:?}"
    );
}

/// Reading pods is allowed, and exec is blocked by a rule written for its `create` (what
/// kubectl's SPDY exec is).
const READ_PODS_NO_EXEC: &str = r#"
[[policy.rules]]
id = "read-pods"
protocol = "kubernetes"
action = "allow"
verbs = ["get", "list", "watch"]
resources = ["pods"]

[[policy.rules]]
id = "no-exec"
protocol = "kubernetes"
action = "block"
verbs = ["create"]
resources = ["pods/exec"]
reason = "no commands in pods"
"#;

/// A WebSocket exec or port-forward is a GET, which the API server 1.20 authorises as `get`:
/// a rule allowing `get` on `pods` must not open it. The exec is decided as `create` too, so
/// the rule blocking `create` of `pods/exec` refuses it; the port-forward is not named by the
/// rule that covers `pods`, so no rule allows it. Neither reaches the API server or the
/// kubelet.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rule_allowing_get_on_pods_opens_no_websocket_exec_or_port_forward() {
    grant_dba().await;
    let g = Gateway::start(READ_PODS_NO_EXEC).await;
    let dir = tempfile::tempdir().unwrap();
    let ops = token_for("agent-ops", "agent-ops-secret").await;
    let pods: Api<Pod> = Api::namespaced(client(&g.kubeconfig(dir.path(), &ops)).await, "default");
    let offset = vigil_chaos::kube::audit_len();
    pods.get("shell").await.expect("reading a pod is allowed");

    let marker = format!("ws-get-{}", vigil_chaos::random_suffix());
    let exec = pods
        .exec("shell", ["echo", marker.as_str()], &AttachParams::default())
        .await;
    let err = exec.err().expect("the exec is refused").to_string();
    assert!(
        err.contains("403") || err.contains("no commands in pods"),
        "{err}"
    );
    let forward = pods.portforward("shell", &[9]).await;
    let err = forward
        .err()
        .expect("the port-forward is refused")
        .to_string();
    assert!(
        err.contains("403") || err.contains("no rule allows port-forward"),
        "{err}"
    );

    tokio::time::sleep(Duration::from_secs(1)).await;
    let records = g.node.records().await;
    let refused = |sub: &str| {
        records
            .iter()
            .filter(|r| r.body.kind == Kind::Blocked)
            .filter(|r| {
                matches!(&r.body.request, Some(Request::Kubernetes(k))
                if k.verb == "get" && k.subresource.as_deref() == Some(sub))
            })
            .map(|r| {
                (
                    r.body.policy.as_ref().map(|p| p.rule.clone()),
                    r.body.detail.clone().unwrap_or_default(),
                )
            })
            .collect::<Vec<_>>()
    };
    let exec = refused("exec");
    assert_eq!(exec.len(), 1, "{exec:?}");
    assert_eq!(exec[0].0.as_deref(), Some("no-exec"), "{exec:?}");
    let forward = refused("portforward");
    assert_eq!(forward.len(), 1, "{forward:?}");
    assert!(
        forward[0].1.contains("no rule allows port-forward"),
        "{forward:?}"
    );
    let reached: Vec<_> = vigil_chaos::kube::gateway_events(offset, &records)
        .into_iter()
        .filter(|e| {
            matches!(
                e["objectRef"]["subresource"].as_str(),
                Some("exec" | "portforward")
            )
        })
        .collect();
    assert!(reached.is_empty(), "reached the API server: {reached:?}");
    let ran: Vec<_> = exec_log_since(0)
        .into_iter()
        .filter(|e| {
            e.to_string().contains(&marker) || (e["kind"] == "portforward" && e["port"] == 9)
        })
        .collect();
    assert!(ran.is_empty(), "the kubelet ran it: {ran:?}");
}
