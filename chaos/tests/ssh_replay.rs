//! SSH session replay against a real sshd: `vigil replay --dump` shows what an exec printed
//! with its escape sequences made visible, `vigil recording export` writes the channel as an
//! asciicast v2 file with the exact text, and once one byte of the recording file is flipped,
//! replay and export refuse and `vigil audit verify` fails, each naming the chunk.

use vigil_chaos::recording::{flip_first_chunk, Flipped};
use vigil_chaos::ssh::{exec, token_login, Gateway};
use vigil_chaos::{of_kind, token_for, vigil_async};
use vigil_proto::record::{Kind, Outcome, Record, Request};

const POLICY: &str = r#"
[[policy.rules]]
id = "no-rm"
protocol = "ssh"
action = "block"
programs = ["rm"]
reason = "deleting files on hosts is not allowed"
"#;

/// What the exec prints: a character of two bytes and a colour escape sequence.
const PRINTF: &str = r"printf 'caf\303\251 \033[31mred\033[0m\n'";
const PRINTED: &str = "caf\u{e9} \x1b[31mred\x1b[0m\n";

/// The channel number the exec of `command` ran on.
fn channel_of(records: &[Record], command: &str) -> u32 {
    records
        .iter()
        .find_map(|r| match &r.body.request {
            Some(Request::Ssh(q)) if q.command.as_deref() == Some(command) => Some(q.channel),
            _ => None,
        })
        .expect("the exec is on record")
}

/// The text of the events of `code` in a cast, concatenated, and the markers.
fn cast_events(cast: &str, code: &str) -> String {
    cast.lines()
        .skip(1)
        .map(|l| serde_json::from_str::<serde_json::Value>(l).expect("an event is JSON"))
        .filter(|e| e[1] == code)
        .map(|e| e[2].as_str().expect("event data is a string").to_string())
        .collect::<Vec<_>>()
        .join("|")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_exec_replays_escaped_exports_as_a_cast_and_a_flipped_byte_is_refused() {
    let g = Gateway::start(POLICY).await;
    let token = token_for("agent-ops", "agent-ops-secret").await;
    let h = token_login(g.port(), &g.user(), &token)
        .await
        .expect("logged in");
    let (out, _, status) = exec(&h, PRINTF).await;
    assert_eq!(String::from_utf8_lossy(&out), PRINTED);
    assert_eq!(status, Some(0));
    let (_, err, status) = exec(&h, "rm -rf /tmp/vigil-never").await;
    assert_eq!(status, Some(126), "{}", String::from_utf8_lossy(&err));
    drop(h);

    let records = g.node.records_after_sessions(1).await;
    let start = of_kind(&records, Kind::SessionStart);
    assert_eq!(start[0].body.outcome, Some(Outcome::Success));
    let session = start[0].body.session.clone().unwrap();
    let channel = channel_of(&records, PRINTF).to_string();
    let dir = g.node.files.audit_dir.display().to_string();

    // The dump: the text, its escape sequence shown and not run, the refusal, the exits.
    let (code, dump) = vigil_async(&["replay", &session, "--log", &dir, "--dump"]).await;
    assert_eq!(code, 0, "{dump}");
    for expected in [
        "  principal   agent-ops\n",
        &format!("\nchannel {channel}\n"),
        "exec: printf 'caf\\\\303\\\\251 \\\\033[31mred\\\\033[0m\\\\n'\n    -> allowed by rule default",
        "  output\n",
        "caf\u{e9} \\x1b[31mred\\x1b[0m\\n\n",
        "exit 0 (success)",
        "REFUSED (blocked, rule no-rm): blocked by rule no-rm: deleting files on hosts is not allowed",
    ] {
        assert!(dump.contains(expected), "{expected:?} in:\n{dump}");
    }
    assert!(
        !dump.contains('\x1b'),
        "no escape sequence reaches the terminal"
    );

    // The cast: asciicast v2, the exact output text, the command and exit as markers.
    let cast_file = g.keys.path().join("exec.cast");
    let cast_path = cast_file.display().to_string();
    let export = [
        "recording",
        "export",
        &session,
        "--channel",
        &channel,
        "--log",
        &dir,
        "-o",
        &cast_path,
    ];
    let (code, out) = vigil_async(&export).await;
    assert_eq!(code, 0, "{out}");
    let cast = std::fs::read_to_string(&cast_file).unwrap();
    let header: serde_json::Value = serde_json::from_str(cast.lines().next().unwrap()).unwrap();
    assert_eq!(header["version"], 2);
    assert_eq!(
        (header["width"].as_u64(), header["height"].as_u64()),
        (Some(80), Some(24))
    );
    assert!(header["timestamp"].as_u64().unwrap() > 1_700_000_000);
    assert_eq!(
        header["title"],
        format!("vigil {session} channel {channel}: exec: {PRINTF}")
    );
    assert_eq!(cast_events(&cast, "o"), PRINTED);
    assert_eq!(cast_events(&cast, "m"), format!("exec: {PRINTF}|exit 0"));

    let (code, report) = vigil_async(&["audit", "verify", "--log", &dir]).await;
    assert_eq!(code, 0, "{report}");
    let chunks = of_kind(&records, Kind::Recording).len();
    assert!(
        report.contains(&format!("recorded chunks: {chunks} verified\n")),
        "{report}"
    );

    // One byte of the recording file flipped: the chunk that holds it is named everywhere.
    let Flipped {
        seq,
        chunk: rec,
        named,
    } = flip_first_chunk(&g.node.files.audit_dir, &records, &session);

    let (code, out) = vigil_async(&["replay", &session, "--log", &dir, "--dump"]).await;
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("refusing to replay session") && out.contains(&named),
        "{out}"
    );
    assert!(
        !out.contains("principal"),
        "nothing of the session is shown: {out}"
    );
    let (code, out) = vigil_async(&export).await;
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("refusing to export session") && out.contains(&named),
        "{out}"
    );
    let (code, report) = vigil_async(&["audit", "verify", "--log", &dir]).await;
    assert_eq!(code, 1, "{report}");
    let fail = report
        .lines()
        .find(|l| l.starts_with("FAIL "))
        .unwrap_or_else(|| panic!("a failure: {report}"));
    assert!(
        fail.contains(&format!(
            "seq {seq}: recorded chunk does not verify: channel {} {} at offset 0",
            rec.channel, rec.direction
        )) && fail.contains("do not hash to the recorded sha256"),
        "{report}"
    );
    assert!(
        report.contains(&format!(
            "recorded chunks: {} verified, 1 failed",
            chunks - 1
        )),
        "{report}"
    );
}
