//! Traces over OTLP (`[tracing]`): a real `vigil-node` process exports to an OTLP/gRPC
//! receiver built here on the `opentelemetry-proto` crate's generated tonic server (the
//! protocol's own service definition; no OpenTelemetry Collector can be installed on these
//! machines). Judged against the audit records: one session span, one child span per
//! statement with the records' `session` and `stmt`, the blocked statement marked with its
//! rule, and no statement text or value anywhere in a span. A collector that is down, or
//! accepts and never answers, changes nothing for sessions and is counted as dropped spans.

use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::{any_value, KeyValue};
use opentelemetry_proto::tonic::trace::v1::Span;
use std::collections::BTreeMap;
use std::io::Write as _;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use vigil_chaos::{
    agent_token, connect_tls, eventually, free_port, metric, node_metrics, of_kind, random_suffix,
    spawn_node, NodeFiles, NodeOptions,
};
use vigil_proto::record::{Kind, Outcome, Record};

const POLICY: &str = r#"
[[policy.rules]]
id = "no-drop"
action = "block"
flags = ["drop"]
reason = "dropping needs a human"

[[policy.rules]]
id = "writes-need-approval"
action = "require_approval"
kinds = ["write"]
approval = { approvers = "approvers", wait_secs = 0, ttl_secs = 600 }
"#;

/// What the receiver was sent: each export's `x-vigil-key` metadata, resource attributes and
/// spans. With `slow` set it answers each export after 500 ms, and keeps what it was sent
/// only then (a collector under load).
#[derive(Clone, Default)]
struct Received(Arc<Mutex<Vec<Export>>>, Arc<AtomicBool>);

struct Export {
    key: Option<String>,
    resource: BTreeMap<String, String>,
    spans: Vec<Span>,
}

#[tonic::async_trait]
impl TraceService for Received {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        if self.1.load(Ordering::Relaxed) {
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        let key = request
            .metadata()
            .get("x-vigil-key")
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        for rs in request.into_inner().resource_spans {
            let resource = rs
                .resource
                .map(|r| attributes(&r.attributes))
                .unwrap_or_default();
            let spans = rs.scope_spans.into_iter().flat_map(|s| s.spans).collect();
            self.0.lock().unwrap().push(Export {
                key: key.clone(),
                resource,
                spans,
            });
        }
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

impl Received {
    /// An OTLP/gRPC receiver on an ephemeral port: its endpoint URL.
    async fn start(&self) -> String {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let service = TraceServiceServer::new(self.clone());
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(service)
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
        );
        format!("http://{addr}")
    }

    fn spans(&self) -> Vec<Span> {
        let exports = self.0.lock().unwrap();
        exports.iter().flat_map(|e| e.spans.clone()).collect()
    }
}

/// Attributes as text (ints and strings are all a span here carries).
fn attributes(kvs: &[KeyValue]) -> BTreeMap<String, String> {
    kvs.iter()
        .filter_map(|kv| {
            let v = match kv.value.as_ref()?.value.as_ref()? {
                any_value::Value::StringValue(s) => s.clone(),
                any_value::Value::IntValue(i) => i.to_string(),
                any_value::Value::BoolValue(b) => b.to_string(),
                any_value::Value::DoubleValue(d) => d.to_string(),
                other => format!("{other:?}"),
            };
            Some((kv.key.clone(), v))
        })
        .collect()
}

fn append_config(files: &NodeFiles, toml: &str) {
    let mut f = std::fs::OpenOptions::new()
        .append(true)
        .open(&files.config_path)
        .unwrap();
    f.write_all(toml.as_bytes()).unwrap();
}

fn conn_str(pg_port: u16, token: &str) -> String {
    format!("host=127.0.0.1 port={pg_port} user=agent dbname=app password={token}")
}

/// The audit records of the session that ran statements, once it ended.
async fn session_records(files: &NodeFiles) -> Vec<Record> {
    let mut records = Vec::new();
    eventually("the session ended", Duration::from_secs(10), || {
        records = files.records();
        !of_kind(&records, Kind::SessionEnd).is_empty()
    })
    .await;
    records
}

/// What a statement's records say: its outcome, the rule of a refusal, its approval.
type Told = (Outcome, Option<String>, Option<String>);

/// The statements of `session` as its records tell them, by `stmt`.
fn statements_of(records: &[Record], session: &str) -> BTreeMap<u64, Told> {
    let mut statements = BTreeMap::new();
    for r in records {
        if r.body.session.as_deref() != Some(session) {
            continue;
        }
        if let (Some(stmt), Kind::Response | Kind::Blocked) = (r.body.stmt, r.body.kind) {
            let rule = (r.body.kind == Kind::Blocked)
                .then(|| r.body.policy.as_ref().map(|p| p.rule.clone()))
                .flatten();
            let approval = r.body.approval.as_ref().map(|a| a.id.clone());
            statements.insert(stmt, (r.body.outcome.unwrap(), rule, approval));
        }
    }
    statements
}

/// One root span for `session`, and one child span of it for every statement the records tell,
/// saying what they say (outcome, rule, approval); the session span's attributes.
fn assert_joined(
    spans: &[Span],
    session: &str,
    statements: &BTreeMap<u64, Told>,
) -> BTreeMap<String, String> {
    let of_session =
        |s: &&Span| attributes(&s.attributes).get("session").map(String::as_str) == Some(session);
    let roots: Vec<_> = spans
        .iter()
        .filter(of_session)
        .filter(|s| s.name == "session")
        .collect();
    assert_eq!(roots.len(), 1, "{session}: {spans:?}");
    let root = roots[0];
    assert!(root.parent_span_id.is_empty(), "the session span is a root");
    let mut traced = BTreeMap::new();
    for s in spans
        .iter()
        .filter(of_session)
        .filter(|s| s.name == "statement")
    {
        let a = attributes(&s.attributes);
        assert_eq!(s.trace_id, root.trace_id, "one trace per session");
        assert_eq!(
            s.parent_span_id, root.span_id,
            "a child of the session span"
        );
        let stmt: u64 = a["stmt"].parse().unwrap();
        assert!(traced.insert(stmt, a).is_none(), "stmt {stmt} twice");
    }
    assert_eq!(
        traced.keys().collect::<Vec<_>>(),
        statements.keys().collect::<Vec<_>>(),
        "{session}: a span for every statement the records tell"
    );
    for (stmt, (outcome, rule, approval)) in statements {
        let a = &traced[stmt];
        let expected = serde_json::to_value(outcome).unwrap();
        assert_eq!(
            a["outcome"],
            expected.as_str().unwrap(),
            "stmt {stmt}: {a:?}"
        );
        if let Some(rule) = rule {
            assert_eq!(&a["rule"], rule, "stmt {stmt}");
        }
        assert_eq!(a.get("approval"), approval.as_ref(), "stmt {stmt}");
    }
    attributes(&root.attributes)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spans_per_session_and_statement_join_the_audit_records() {
    let received = Received::default();
    let endpoint = received.start().await;
    let (pg_port, admin_port) = (free_port(), free_port());
    let files = NodeFiles::new(&NodeOptions {
        pg_port,
        admin_port,
        node_extra: "drain_timeout_secs = 1",
        extra: POLICY,
        ..NodeOptions::default()
    })
    .await;
    let key_file = files.dir.path().join("otlp-key");
    std::fs::write(&key_file, "k-123\n").unwrap();
    append_config(
        &files,
        &format!(
            "\n[tracing]\nendpoint = \"{endpoint}\"\nservice_name = \"vigil-test\"\n\
             headers = {{ x-vigil-key = {{ file = \"{}\" }} }}\n",
            key_file.display()
        ),
    );
    let mut child = spawn_node(&files, admin_port).await;

    let run = random_suffix();
    let secret = format!("sekrit-{run}");
    let token = agent_token().await;
    let (client, conn) = connect_tls(&conn_str(pg_port, &token)).await.unwrap();
    client.simple_query("SELECT 1").await.unwrap();
    client
        .simple_query(&format!("SELECT '{secret}-literal'"))
        .await
        .unwrap();
    let refused = client
        .simple_query(&format!("DROP TABLE IF EXISTS t_{run}"))
        .await
        .unwrap_err();
    assert_eq!(
        refused.code(),
        Some(&tokio_postgres::error::SqlState::INSUFFICIENT_PRIVILEGE)
    );
    // Held, and refused at once (wait_secs = 0) naming its approval request.
    let held = client
        .simple_query(&format!("UPDATE t_{run} SET a = 1 WHERE a = 2"))
        .await
        .unwrap_err();
    assert_eq!(
        held.code(),
        Some(&tokio_postgres::error::SqlState::INSUFFICIENT_PRIVILEGE)
    );
    let param = format!("{secret}-param");
    let row = client
        .query_one("SELECT $1::text", &[&param])
        .await
        .unwrap();
    assert_eq!(row.get::<_, String>(0), param);
    drop(client);
    let _ = conn.await;
    let records = session_records(&files).await;

    let session = of_kind(&records, Kind::SessionEnd)[0]
        .body
        .session
        .clone()
        .unwrap();
    let principal = records
        .iter()
        .find_map(|r| r.body.principal.as_ref())
        .unwrap()
        .subject
        .clone();
    let statements = statements_of(&records, &session);
    assert_eq!(statements.len(), 5, "{records:?}");
    assert!(statements.values().any(|(o, ..)| *o == Outcome::Blocked));
    assert!(statements.values().any(|(_, _, a)| a.is_some()));

    // The session span ends with the session; every span is exported once it ends.
    let spans = {
        let mut spans = Vec::new();
        eventually("the spans arrive", Duration::from_secs(10), || {
            spans = received.spans();
            spans.len() > statements.len()
        })
        .await;
        spans
    };
    let attrs = assert_joined(&spans, &session, &statements);
    assert_eq!(attrs["protocol"], "postgres");
    assert_eq!(attrs["principal"], principal);
    assert_eq!(attrs["node"], records[0].body.node);
    assert_eq!(attrs["target"], "app");
    assert!(attrs["client"].starts_with("127.0.0.1:"), "{attrs:?}");

    // No text, no value: not in any attribute, name or event of any span.
    let everything = format!("{spans:?}");
    assert!(!everything.contains(&secret), "{everything}");
    assert!(!everything.contains("DROP"), "{everything}");
    assert!(!everything.contains("UPDATE"), "{everything}");
    assert!(spans.iter().all(|s| s.events.is_empty()), "{spans:?}");

    for e in received.0.lock().unwrap().iter() {
        assert_eq!(e.key.as_deref(), Some("k-123"), "the configured header");
        assert_eq!(e.resource["service.name"], "vigil-test");
        assert_eq!(e.resource["service.instance.id"], records[0].body.node);
    }
    let text = node_metrics(admin_port).await;
    assert_eq!(metric(&text, "vigil_trace_spans_dropped_total"), 0.0);

    // A session still open when the node is stopped (SIGTERM, drained for 1 s, then ended),
    // with a slow collector: its spans end as the node stops, and are sent before it exits
    // (its session span after its statement's, whose export is still under way).
    received.1.store(true, Ordering::Relaxed);
    let (client, _conn) = connect_tls(&conn_str(pg_port, &token)).await.unwrap();
    client.simple_query("SELECT 2").await.unwrap();
    let term = std::process::Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(term.success());
    let exited = tokio::task::spawn_blocking(move || child.wait().unwrap())
        .await
        .unwrap();
    assert!(exited.success(), "{exited:?}");
    let last = files
        .records()
        .into_iter()
        .filter(|r| r.body.kind == Kind::SessionEnd)
        .filter_map(|r| r.body.session)
        .find(|s| *s != session)
        .expect("the second session ended");
    let spans = received.spans();
    let last_spans: Vec<_> = spans
        .iter()
        .filter(|s| attributes(&s.attributes).get("session") == Some(&last))
        .map(|s| s.name.as_str())
        .collect();
    assert_eq!(last_spans, ["statement", "session"], "{spans:?}");
}

/// A collector that refuses connections, then one that accepts and never answers: statements
/// run and are recorded as without tracing, and the spans that could not go are counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_collector_changes_nothing_for_sessions() {
    // Accepts and holds every connection, reading nothing.
    let hung = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let hung_addr = hung.local_addr().unwrap();
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((s, _)) = hung.accept().await {
            held.push(s);
        }
    });
    let refused = format!("http://127.0.0.1:{}", free_port());
    // Refused at once: every batch fails (export_failed). Never answered: the batch in flight
    // waits out timeout_secs while the statements fill the queue (queue_full).
    for (endpoint, reason) in [
        (refused, "export_failed"),
        (format!("http://{hung_addr}"), "queue_full"),
    ] {
        let (pg_port, admin_port) = (free_port(), free_port());
        let files = NodeFiles::new(&NodeOptions {
            pg_port,
            admin_port,
            ..NodeOptions::default()
        })
        .await;
        append_config(
            &files,
            &format!("\n[tracing]\nendpoint = \"{endpoint}\"\nqueue_spans = 4\ntimeout_secs = 1\n"),
        );
        let mut child = spawn_node(&files, admin_port).await;
        let token = agent_token().await;
        let (client, conn) = connect_tls(&conn_str(pg_port, &token)).await.unwrap();
        let started = Instant::now();
        const N: i32 = 50;
        for i in 0..N {
            let row = client.query_one("SELECT $1::int4", &[&i]).await.unwrap();
            assert_eq!(row.get::<_, i32>(0), i);
        }
        let took = started.elapsed();
        assert!(
            took < Duration::from_secs(5),
            "{endpoint}: {N} statements took {took:?}"
        );
        drop(client);
        let _ = conn.await;
        let records = session_records(&files).await;
        let responses = of_kind(&records, Kind::Response);
        assert_eq!(responses.len(), N as usize, "{endpoint}");
        assert!(responses
            .iter()
            .all(|r| r.body.outcome == Some(Outcome::Success)));
        assert_eq!(of_kind(&records, Kind::Request).len(), N as usize);
        // 51 spans at least (the statements and the session) through a queue of 4, to a
        // collector that takes none: all of them counted, by the time the exports time out.
        let deadline = Instant::now() + Duration::from_secs(30);
        while metric(
            &node_metrics(admin_port).await,
            "vigil_trace_spans_dropped_total",
        ) < f64::from(N + 1)
        {
            assert!(Instant::now() < deadline, "{endpoint}: spans not counted");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let text = node_metrics(admin_port).await;
        let by_reason = format!("vigil_trace_spans_dropped_total{{reason=\"{reason}\"}}");
        assert!(metric(&text, &by_reason) > 0.0, "{endpoint}: {text}");
        child.kill().unwrap();
        child.wait().unwrap();
    }
}

/// The SSH rule of [`ssh_and_kubernetes_sessions_have_spans_too`]: no `rm` on the host; and
/// its Kubernetes rule: no namespace is deleted.
const OTHER_PROTOCOLS_POLICY: &str = r#"
[[policy.rules]]
id = "no-rm"
protocol = "ssh"
action = "block"
programs = ["rm"]
reason = "nothing is deleted on hosts"

[[policy.rules]]
id = "keep-namespaces"
protocol = "kubernetes"
action = "block"
verbs = ["delete"]
resources = ["namespaces"]
reason = "namespaces stay"
"#;

/// The same joins for the other protocols: an SSH session (commands run and refused) and the
/// Kubernetes sessions of kubectl (requests relayed and refused), each a root span with a
/// child per request that its records tell, through the real sshd and kube-apiserver.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ssh_and_kubernetes_sessions_have_spans_too() {
    use vigil_chaos::{env, kube, ssh};
    kube::grant_dba().await;
    let received = Received::default();
    let endpoint = received.start().await;
    let (pg_port, admin_port) = (free_port(), free_port());
    let (ssh_port, kube_port) = (free_port(), free_port());
    let keys = tempfile::tempdir().unwrap();
    let ca = ssh::keygen(keys.path(), "ca");
    let e = env();
    let ssh_section = ssh::ssh_section(
        &ca,
        e.get("VIGIL_DEV_SSHD_HOST_KEY"),
        e.get("VIGIL_DEV_SSH_GATEWAY_KEY"),
        "",
    )
    .replacen("127.0.0.1:0", &format!("127.0.0.1:{ssh_port}"), 1);
    let kube_section = kube::kube_section(OTHER_PROTOCOLS_POLICY).replacen(
        "127.0.0.1:0",
        &format!("127.0.0.1:{kube_port}"),
        1,
    );
    let files = NodeFiles::new(&NodeOptions {
        pg_port,
        admin_port,
        protocols: Some(format!("{ssh_section}\n{kube_section}")),
        ..NodeOptions::default()
    })
    .await;
    append_config(&files, &format!("\n[tracing]\nendpoint = \"{endpoint}\"\n"));
    let mut child = spawn_node(&files, admin_port).await;

    // SSH: a command that runs, one the policy refuses.
    let key = ssh::certificate(keys.path(), &ca, "user", ssh::OPS_PRINCIPAL, "-5m:+1h");
    let user = format!("{}+web@127.0.0.1", e.get("VIGIL_DEV_SSH_LOGIN"));
    let run = random_suffix();
    let ssh_run = |command: String| {
        let mut c = tokio::process::Command::new("ssh");
        c.args(["-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=no"])
            .args(["-o", "UserKnownHostsFile=/dev/null", "-o", "LogLevel=ERROR"])
            .args(["-o", "IdentitiesOnly=yes", "-i"])
            .arg(&key)
            .arg("-o")
            .arg(format!("CertificateFile={}-cert.pub", key.display()))
            .args(["-p", &ssh_port.to_string(), &user, &command]);
        c
    };
    let out = ssh_run(format!("echo ran-{run}")).output().await.unwrap();
    assert!(out.status.success(), "{out:?}");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        format!("ran-{run}")
    );
    let out = ssh_run(format!("rm -f /tmp/nothing-{run}"))
        .output()
        .await
        .unwrap();
    assert!(!out.status.success(), "{out:?}");

    // Kubernetes: kubectl lists pods (discovery and a list), then deletes a namespace, refused.
    let ca_file = files.dir.path().join("tls-kubernetes").join("cert.pem");
    let server = format!("https://127.0.0.1:{kube_port}/clusters/dev");
    let token = vigil_chaos::token_for("agent-ops", "agent-ops-secret").await;
    let config = kube::kubeconfig(keys.path(), &server, &ca_file, &token);
    let out = kube::kubectl(&config, &["get", "pods", "-n", "default"]).await;
    assert!(out.status.success(), "{out:?}");
    let out = kube::kubectl(&config, &["delete", "namespace", &format!("ns-{run}")]).await;
    assert!(!out.status.success(), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("namespaces stay"),
        "{out:?}"
    );

    // Every session's records, once each ended: their spans join them.
    let mut records = Vec::new();
    eventually("the sessions ended", Duration::from_secs(20), || {
        records = files.records();
        let ended = |protocol: &str| {
            records
                .iter()
                .filter(|r| r.body.kind == Kind::SessionEnd)
                .filter(|r| {
                    r.body.connection.as_ref().map(|c| c.protocol.as_str()) == Some(protocol)
                })
                .count()
        };
        ended("ssh") == 2 && ended("kubernetes") >= 2
    })
    .await;
    let sessions: Vec<(String, String)> = records
        .iter()
        .filter(|r| r.body.kind == Kind::SessionEnd)
        .map(|r| {
            let protocol = r.body.connection.as_ref().unwrap().protocol.clone();
            (r.body.session.clone().unwrap(), protocol)
        })
        .collect();
    let told: Vec<_> = sessions
        .iter()
        .map(|(s, _)| statements_of(&records, s))
        .collect();
    let want = sessions.len() + told.iter().map(BTreeMap::len).sum::<usize>();
    let mut spans = Vec::new();
    eventually("the spans arrive", Duration::from_secs(10), || {
        spans = received.spans();
        spans.len() >= want
    })
    .await;
    let mut refused = BTreeMap::new();
    for ((session, protocol), statements) in sessions.iter().zip(&told) {
        assert!(!statements.is_empty(), "{session}: {records:?}");
        let attrs = assert_joined(&spans, session, statements);
        assert_eq!(&attrs["protocol"], protocol);
        assert_eq!(attrs["principal"], "agent-ops", "{attrs:?}");
        assert_eq!(attrs["node"], records[0].body.node);
        if protocol == "ssh" {
            assert_eq!(attrs["target"], "web");
        }
        for (outcome, rule, _) in statements.values() {
            if *outcome == Outcome::Blocked {
                refused.insert(protocol.clone(), rule.clone());
            }
        }
    }
    assert_eq!(refused["ssh"].as_deref(), Some("no-rm"));
    assert_eq!(refused["kubernetes"].as_deref(), Some("keep-namespaces"));
    // Nothing the sessions sent or got is in a span: not the command, not the output.
    let everything = format!("{spans:?}");
    for sent in [
        format!("ran-{run}"),
        format!("nothing-{run}"),
        format!("ns-{run}"),
    ] {
        assert!(!everything.contains(&sent), "{sent}: {everything}");
    }
    // And no statement outside those sessions.
    for s in spans.iter().filter(|s| s.name == "statement") {
        let session = &attributes(&s.attributes)["session"];
        assert!(sessions.iter().any(|(id, _)| id == session), "{s:?}");
    }
    child.kill().unwrap();
    child.wait().unwrap();
}
