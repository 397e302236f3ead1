//! t3x: `vigil audit verify` over a real log, and over copies tampered with in every way.

use std::path::{Path, PathBuf};
use vigil_chaos::*;

/// A real log with two streams (the node is restarted once).
async fn real_log() -> (tempfile::TempDir, PathBuf, PathBuf) {
    let audit = tempfile::tempdir().unwrap();
    let opts = NodeOptions {
        audit_dir: Some(audit.path().to_path_buf()),
        ..NodeOptions::default()
    };
    let db = create_database().await;
    let token = agent_token().await;
    for round in 0..2 {
        let node = TestNode::start_with(NodeFiles::for_database(db.clone(), &opts)).await;
        let (client, _c) = node.client(&token).await.unwrap();
        for i in 0..5 {
            client
                .simple_query(&format!("SELECT {i} AS round_{round}"))
                .await
                .unwrap();
        }
        drop(client);
        node.records_after_sessions(1).await;
        node.node.shutdown().await;
    }
    let files = vigil_node::audit::log_files(audit.path()).unwrap();
    assert_eq!(files.len(), 2);
    (audit, files[0].clone(), files[1].clone())
}

fn lines(path: &Path) -> Vec<String> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(str::to_string)
        .collect()
}

/// Writes `lines` as a one-file log and verifies it.
fn verify_lines(lines: &[String]) -> (i32, String) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("copy.jsonl");
    std::fs::write(&path, lines.join("\n") + "\n").unwrap();
    vigil(&["audit", "verify", "--log", path.to_str().unwrap()])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t30_verify_catches_every_kind_of_tampering() {
    let (dir, a, b) = real_log().await;
    let (code, report) = vigil(&["audit", "verify", "--log", dir.path().to_str().unwrap()]);
    assert_eq!(code, 0, "{report}");
    assert!(report.contains("2 streams verified"), "{report}");
    assert!(report.contains("ended"), "{report}");

    let original = lines(&a);
    let other = lines(&b);
    let stream = serde_json::from_str::<serde_json::Value>(&original[0]).unwrap()["stream"]
        .as_str()
        .unwrap()
        .to_string();
    let n = original.len();
    assert!(n > 8);

    // A changed byte in a record in the middle: the next record's prev no longer matches.
    let mut changed = original.clone();
    let victim = n / 2;
    changed[victim] = changed[victim].replacen("\"time\":\"2", "\"time\":\"3", 1);
    assert_ne!(changed[victim], original[victim]);
    let (code, report) = verify_lines(&changed);
    assert_eq!(code, 1, "{report}");
    assert!(
        report.contains(&format!(
            "stream {stream} seq {}: hash mismatch",
            victim + 1
        )),
        "{report}"
    );

    // A flipped byte that breaks the JSON.
    let mut broken = original.clone();
    broken[3] = broken[3].replacen('{', "[", 1);
    let (code, report) = verify_lines(&broken);
    assert_eq!(code, 1, "{report}");
    assert!(report.contains("malformed record"), "{report}");

    // A deleted record.
    let mut deleted = original.clone();
    deleted.remove(victim);
    let (code, report) = verify_lines(&deleted);
    assert_eq!(code, 1, "{report}");
    assert!(
        report.contains(&format!("seq {}: gap: expected seq {victim}", victim + 1)),
        "{report}"
    );

    // Two records swapped.
    let mut reordered = original.clone();
    reordered.swap(victim, victim + 1);
    let (code, report) = verify_lines(&reordered);
    assert_eq!(code, 1, "{report}");
    assert!(
        report.contains("gap") || report.contains("out of order"),
        "{report}"
    );

    // A record spliced in from another stream.
    let mut spliced = original.clone();
    spliced.insert(victim, other[victim].clone());
    let (code, report) = verify_lines(&spliced);
    assert_eq!(code, 1, "{report}");
    assert!(report.contains("spliced into stream"), "{report}");

    // The same record rewritten to claim this stream.
    let mut forged = original.clone();
    let other_stream = serde_json::from_str::<serde_json::Value>(&other[0]).unwrap()["stream"]
        .as_str()
        .unwrap()
        .to_string();
    forged[victim] = other[victim].replace(&other_stream, &stream);
    let (code, report) = verify_lines(&forged);
    assert_eq!(code, 1, "{report}");
    assert!(report.contains("hash mismatch"), "{report}");

    // The first record removed.
    let (code, report) = verify_lines(&original[1..]);
    assert_eq!(code, 1, "{report}");
    assert!(report.contains("gap: expected seq 0"), "{report}");

    // A record appended after the stream_end, chained correctly (the chain has no key):
    // nothing legitimate follows a stream_end, so the log fails.
    let end = &original[n - 1];
    assert!(end.contains("\"kind\":\"stream_end\""), "{end}");
    let copied: serde_json::Value = serde_json::from_str(&original[n - 2]).unwrap();
    let chain_fields = |seq: &serde_json::Value, prev: &serde_json::Value| {
        format!("\"seq\":{seq},\"prev\":{prev}")
    };
    let appended_record = swap_once(
        &original[n - 2],
        &chain_fields(&copied["seq"], &copied["prev"]),
        &chain_fields(
            &serde_json::json!(n),
            &serde_json::json!(hex::encode(vigil_proto::chain::record_hash(end.as_bytes()))),
        ),
    );
    let mut appended = original.clone();
    appended.push(appended_record);
    let (code, report) = verify_lines(&appended);
    assert_eq!(code, 1, "{report}");
    assert!(
        report.contains(&format!(
            "stream {stream} seq {n}: record after the stream's end: the stream ended at seq {}",
            n - 1
        )),
        "{report}"
    );

    // Tail truncation is reported as an open stream (no stream_end); not a failure until
    // checkpoints exist, but visible.
    let (code, report) = verify_lines(&original[..n - 2]);
    assert_eq!(code, 0, "{report}");
    assert!(report.contains("open (no stream_end record)"), "{report}");

    // An empty directory is not a verified log.
    let empty = tempfile::tempdir().unwrap();
    let (code, _) = vigil(&["audit", "verify", "--log", empty.path().to_str().unwrap()]);
    assert_eq!(code, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t31_a_torn_last_record_is_reported_as_such_and_nothing_else_is() {
    let (dir, a, b) = real_log().await;
    let original = lines(&b);
    let n = original.len();
    let end = &original[n - 1];
    assert!(end.contains("\"kind\":\"stream_end\""));
    // What a kill inside the write of the stream's last record leaves: its first bytes, and
    // no newline.
    let torn_at = |cut: &str| {
        let copy = tempfile::tempdir().unwrap();
        std::fs::copy(&a, copy.path().join(a.file_name().unwrap())).unwrap();
        let path = copy.path().join(b.file_name().unwrap());
        std::fs::write(&path, original[..n - 1].join("\n") + "\n" + cut).unwrap();
        let out = vigil(&["audit", "verify", "--log", copy.path().to_str().unwrap()]);
        (copy, path, out)
    };
    let (copy, path, (code, report)) = torn_at(&end[..end.len() / 2]);
    assert_eq!(code, 0, "{report}");
    assert!(
        report.contains(&format!(
            "torn tail of {} bytes at {}:{n}",
            end.len() / 2,
            path.display()
        )),
        "{report}"
    );
    assert!(report.contains("open (no stream_end record)"), "{report}");
    assert!(report.contains("2 streams verified"), "{report}");
    assert!(report.contains(", 1 torn tails"), "{report}");

    // A node started on that directory counts it, keeps it, and its own stream verifies.
    let node = TestNode::start(NodeOptions {
        audit_dir: Some(copy.path().to_path_buf()),
        ..NodeOptions::default()
    })
    .await;
    assert_eq!(metric(&node.metrics().await, "vigil_audit_torn_tails"), 1.0);
    node.node.shutdown().await;
    let (code, report) = vigil(&["audit", "verify", "--log", copy.path().to_str().unwrap()]);
    assert_eq!(code, 0, "{report}");
    assert!(report.contains("in 3 streams verified"), "{report}");
    assert!(report.contains(", 1 torn tails"), "{report}");

    // Anything else at the end of a file is not a torn record: junk, an earlier record's
    // beginning (another seq and prev), a record's middle.
    let earlier = &original[n - 3];
    for cut in [
        "garbage".to_string(),
        earlier[..earlier.len() / 2].to_string(),
        end[10..end.len() / 2].to_string(),
    ] {
        let (_copy, _, (code, report)) = torn_at(&cut);
        assert_eq!(code, 1, "{cut}: {report}");
        assert!(
            report.contains("malformed record: the file ends in an unterminated line"),
            "{report}"
        );
    }
    // A whole last record without its newline is a record.
    let (_copy, _, (code, report)) = torn_at(end);
    assert_eq!(code, 0, "{report}");
    assert!(report.contains("ended"), "{report}");
    assert!(report.contains(", 0 torn tails"), "{report}");
    drop(dir);
}

/// `line` with `from`, which must be in it once, replaced by `to`.
fn swap_once(line: &str, from: &str, to: &str) -> String {
    assert_eq!(line.matches(from).count(), 1, "{from} in {line}");
    line.replacen(from, to, 1)
}
