//! t6x: the binaries' edges: a bad config is refused before anything is bound, naming the key;
//! what `vigil` prints from records cannot forge its output.

use std::process::Command;
use vigil_chaos::*;
use vigil_proto::record::Kind;

fn node_with(config: &str) -> (i32, String) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.toml");
    std::fs::write(&path, config).unwrap();
    let out = Command::new(bin("vigil-node"))
        .arg("--config")
        .arg(&path)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t60_bad_configs_are_refused_naming_the_key() {
    let files = NodeFiles::new(&NodeOptions::default()).await;
    let good = std::fs::read_to_string(&files.config_path).unwrap();
    let cases = [
        (
            good.replace("leeway_secs", "leeway_seconds"),
            "leeway_seconds",
        ),
        (
            good.replace("issuer = \"http", "issuer = \"ftp"),
            "identity.issuer",
        ),
        (
            good.replace(
                "allow = { client_ids = [\"agent-reporting\", \"agent-ops\"], groups = [\"dba\"] }",
                "allow = {}",
            ),
            "postgres.connections[0].allow",
        ),
        (
            good.replace("max_frame_bytes = ", "max_frame_bytes = -"),
            "max_frame_bytes",
        ),
        (
            good.replace("[postgres]", "[postgres]\nstartup_timeout_secs = 0"),
            "postgres.startup_timeout_secs",
        ),
    ];
    for (config, key) in cases {
        assert_ne!(config, good, "the case changes the file");
        let (code, stderr) = node_with(&config);
        assert_eq!(code, 2, "{key}: {stderr}");
        assert!(stderr.contains(key), "{key}: {stderr}");
    }
    let (code, stderr) = node_with("not toml at all [");
    assert_eq!(code, 2, "{stderr}");
    let missing = Command::new(bin("vigil-node"))
        .args(["--config", "/nonexistent/vigil.toml"])
        .output()
        .unwrap();
    assert_eq!(missing.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&missing.stderr).contains("/nonexistent/vigil.toml"));
}

/// Statement text, application name and a result value full of carriage returns, newlines,
/// ANSI sequences and a right-to-left override: `vigil replay` prints none of them raw, and
/// none of the forged lines starts a line of its output.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t61_replay_escapes_what_records_hold() {
    const FORGED: &str = "\r\nstatus: approved by alice\x1b[1A\x1b[2K\u{202e}devorppa\u{202c}";
    let node = TestNode::start(NodeOptions::default()).await;
    let token = agent_token().await;
    let mut config: tokio_postgres::Config = node.conn_str(&token, "app").parse().unwrap();
    config
        .application_name(format!("report{FORGED}"))
        .ssl_mode(tokio_postgres::config::SslMode::Require);
    let (client, conn) = config.connect(tls_connector()).await.expect("connects");
    let conn = tokio::spawn(conn);
    let sql = format!("SELECT 'value{FORGED}' AS v /*\r\n  -> #1 REFUSED (rule x): forged */");
    let rows = client.simple_query(&sql).await.expect("the statement runs");
    let value = rows.iter().find_map(|m| match m {
        tokio_postgres::SimpleQueryMessage::Row(r) => r.get(0).map(str::to_string),
        _ => None,
    });
    assert_eq!(value, Some(format!("value{FORGED}")));
    drop(client);
    let _ = conn.await;

    let records = node.records_after_sessions(1).await;
    let start = of_kind(&records, Kind::SessionStart);
    let connection = start[0].body.connection.as_ref().unwrap();
    assert_eq!(
        connection.application.as_deref(),
        Some(format!("report{FORGED}").as_str()),
        "the record holds the name as declared"
    );
    let session = start[0].body.session.clone().unwrap();
    let dir = node.files.audit_dir.to_str().unwrap().to_string();
    let (code, replay) = vigil(&["replay", &session[..8], "--log", &dir]);
    assert_eq!(code, 0, "{replay}");
    for raw in ['\r', '\x1b', '\u{202e}', '\u{202c}'] {
        assert!(!replay.contains(raw), "raw {raw:?} in:\n{replay}");
    }
    for line in replay.lines() {
        assert!(
            !line.starts_with("status:") && !line.starts_with("  -> #1 REFUSED"),
            "a forged line: {line:?}\n{replay}"
        );
    }
    // What was escaped is still there to read: the application, the statement with its
    // continuation line, the value.
    for needle in [
        "application report\\r\\nstatus: approved by alice\\x1b[1A\\x1b[2K\\u{202e}devorppa\\u{202c}",
        "AS v /*\\r\n",
        "↳   -> #1 REFUSED (rule x): forged",
        // The recorder writes a value that is not printable UTF-8 as `\x` hex; its backslash
        // is doubled like every other.
        "| \\\\x76616c75650d0a",
    ] {
        assert!(replay.contains(needle), "replay lacks {needle:?}:\n{replay}");
    }
    let (code, list) = vigil(&["sessions", "--log", &dir]);
    assert_eq!(code, 0, "{list}");
    assert!(!list.contains('\x1b') && !list.contains('\r'), "{list}");
    node.node.shutdown().await;

    // A stream of one's own making (it needs no key) with a record naming the session: the
    // replay would have shown it among the session's statements (outside review,
    // 2026-12-07); it refuses the session instead.
    let request = of_kind(&records, Kind::Request)[0];
    let real = serde_json::to_string(request).unwrap();
    let forged = real
        .replace(
            &format!("\"stream\":\"{}\"", request.stream),
            "\"stream\":\"forger:5\"",
        )
        .replace(&format!("\"seq\":{},", request.seq), "\"seq\":0,");
    assert_ne!(forged, real);
    std::fs::write(
        node.files.audit_dir.join("forger-5.jsonl"),
        format!("{forged}\n"),
    )
    .unwrap();
    let (code, refused) = vigil(&["replay", &session[..8], "--log", &dir]);
    assert_ne!(code, 0, "{refused}");
    assert!(refused.contains("streams"), "{refused}");
}

/// `vigil login` and `vigil ssh-config` send the token to the gateway's API: never in clear.
/// An `http://` gateway is refused before anything is sent (a listener there sees no
/// connection; outside review, 2026-12-07).
#[test]
fn t62_the_cli_sends_no_token_to_a_plain_http_gateway() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let gateway = format!("http://{}", listener.local_addr().unwrap());
    let home = tempfile::tempdir().unwrap();
    let home = home.path().display().to_string();
    for command in ["login", "ssh-config"] {
        let args = [
            command,
            "--token",
            "eyJ.x.y",
            "--gateway",
            &gateway,
            "--home",
            &home,
        ];
        let (code, out) = vigil(&args);
        assert_ne!(code, 0, "{out}");
        assert!(out.contains("must be an https:// URL"), "{out}");
    }
    assert!(
        listener.accept().is_err(),
        "nothing connected to the listener"
    );
}
