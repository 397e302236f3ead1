//! t9x: the audit stream in Kafka, against a real Kafka-protocol broker (Tansu, started by
//! deploy/dev/servers.sh). Judged by invariants: every record of the local log arrives in the
//! topic byte for byte, only identical duplicates appear, the spool refuses before the target
//! when full, and `vigil audit verify` catches every kind of tampering, tail truncation
//! included (through the witnessed checkpoints).

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;
use vigil_chaos::kafka_tls::{self, TlsBroker};
use vigil_chaos::*;
use vigil_node::audit::kafka::TopicMessage;
use vigil_proto::record::Kind;

fn records(msgs: &[TopicMessage]) -> Vec<&TopicMessage> {
    msgs.iter().filter(|m| !m.checkpoint).collect()
}

/// Waits until the topic holds every local record (as a set).
async fn until_shipped(topic: &str, dir: &std::path::Path) -> Vec<TopicMessage> {
    until_read_holds(|| topic_messages(topic), dir).await
}

/// Waits until what `read` reads of a topic holds every local record (as a set).
async fn until_read_holds(
    read: impl Fn() -> Vec<TopicMessage>,
    dir: &std::path::Path,
) -> Vec<TopicMessage> {
    for _ in 0..300 {
        let want: BTreeSet<Vec<u8>> = log_lines(dir).into_iter().collect();
        let msgs = read();
        let have: BTreeSet<Vec<u8>> = records(&msgs).iter().map(|m| m.value.clone()).collect();
        if want.is_subset(&have) {
            return msgs;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("the topic never caught up with the local log");
}

fn verify_topic(topic: &str, witness: &[String]) -> (i32, String) {
    let mut args = vec![
        "audit".to_string(),
        "verify".into(),
        "--kafka".into(),
        env().get("VIGIL_KAFKA_BROKERS").into(),
        "--topic".into(),
        topic.into(),
    ];
    if !witness.is_empty() {
        args.push("--witness".into());
        args.push(witness.join(","));
        args.push("--token".into());
        args.push(id_token("alice"));
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    vigil(&args)
}

async fn some_statements(node: &TestNode, n: usize) {
    let (client, _task) = node.client(&agent_token().await).await.unwrap();
    for i in 0..n {
        client
            .simple_query(&format!(
                "SELECT name FROM customers WHERE id = {}",
                i % 50 + 1
            ))
            .await
            .unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t90_the_topic_holds_the_local_log_byte_for_byte_and_verifies() {
    let topic = create_topic(3);
    let node = TestNode::start(NodeOptions {
        kafka_topic: Some(topic.clone()),
        checkpoint_interval_secs: 1,
        ..NodeOptions::default()
    })
    .await;
    some_statements(&node, 40).await;
    some_statements(&node, 10).await;
    let dir = node.files.audit_dir.clone();
    until_shipped(&topic, &dir).await;
    let metrics_before_stop = node.metrics().await;
    let TestNode {
        files,
        node: running,
    } = node;
    running.shutdown().await;
    let msgs = until_shipped(&topic, &dir).await;
    // The same bytes, in the same order, keyed by the stream.
    let local = log_lines(&dir);
    let shipped: Vec<Vec<u8>> = records(&msgs).iter().map(|m| m.value.clone()).collect();
    assert_eq!(shipped, local, "the topic is the local log, byte for byte");
    let stream = files.records()[0].stream.clone();
    assert!(records(&msgs)
        .iter()
        .all(|m| m.key.as_deref() == Some(stream.as_str())));
    // Checkpoints were published, and the last one covers stream_end.
    let cps: Vec<_> = msgs.iter().filter(|m| m.checkpoint).collect();
    assert!(!cps.is_empty());
    assert!(metric(&metrics_before_stop, "vigil_kafka_acked_records_total") > 0.0);
    let (code, out) = verify_topic(&topic, &[]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("ended"), "{out}");
    assert!(
        out.contains("0 unanchored"),
        "the final checkpoint anchors the end: {out}"
    );
    // The local log verifies too.
    let (code, out) = vigil(&["audit", "verify", "--log", dir.to_str().unwrap()]);
    assert_eq!(code, 0, "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t91_a_broker_outage_under_load_loses_nothing() {
    let topic = create_topic(1);
    let node = TestNode::start(NodeOptions {
        kafka_topic: Some(topic.clone()),
        checkpoint_interval_secs: 1,
        ..NodeOptions::default()
    })
    .await;
    let load = async {
        for _ in 0..6 {
            some_statements(&node, 25).await;
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    };
    let outage = async {
        tokio::time::sleep(Duration::from_millis(400)).await;
        signal_broker("-STOP");
        tokio::time::sleep(Duration::from_secs(2)).await;
        let during = node.metrics().await;
        signal_broker("-CONT");
        during
    };
    let ((), during) = tokio::join!(load, outage);
    assert!(
        metric(&during, "vigil_audit_spool_records") > 0.0,
        "statements kept flowing into the spool while the broker was away"
    );
    let dir = node.files.audit_dir.clone();
    let msgs = until_shipped(&topic, &dir).await;
    let (code, out) = verify_topic(&topic, &[]);
    assert_eq!(code, 0, "{out}");
    // Nothing lost; anything seen twice is the same bytes.
    let mut by_seq: BTreeMap<u64, Vec<u8>> = BTreeMap::new();
    for m in records(&msgs) {
        let r = vigil_proto::record::Record::parse(&m.value).unwrap();
        if let Some(prev) = by_seq.insert(r.seq, m.value.clone()) {
            assert_eq!(prev, m.value, "a conflicting duplicate at seq {}", r.seq);
        }
    }
    assert_eq!(by_seq.len(), log_lines(&dir).len());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t92_a_gateway_killed_while_the_broker_is_away_drains_its_spool_after_restart() {
    let topic = create_topic(1);
    let (pg_port, admin_port) = (free_port(), free_port());
    let opts = NodeOptions {
        kafka_topic: Some(topic.clone()),
        checkpoint_interval_secs: 1,
        pg_port,
        admin_port,
        ..NodeOptions::default()
    };
    let files = NodeFiles::new(&opts).await;
    let mut child = spawn_node(&files, admin_port).await;
    let token = agent_token().await;
    let conn = format!(
        "host=127.0.0.1 port={pg_port} user=agent dbname=app password={token} application_name=t92"
    );
    let run = |n: usize| {
        let conn = conn.clone();
        async move {
            let (client, _task) = connect_tls(&conn).await.unwrap();
            for i in 0..n {
                client
                    .simple_query(&format!("SELECT {i} AS spooled"))
                    .await
                    .unwrap();
            }
        }
    };
    run(20).await;
    signal_broker("-STOP");
    run(30).await;
    let _ = child.kill();
    let _ = child.wait();
    let mut child = spawn_node(&files, admin_port).await;
    run(10).await;
    signal_broker("-CONT");
    let msgs = until_shipped(&topic, &files.audit_dir).await;
    let streams: BTreeSet<_> = records(&msgs)
        .iter()
        .filter_map(|m| m.key.clone())
        .collect();
    assert_eq!(streams.len(), 2, "both processes' streams arrived");
    let (code, out) = verify_topic(&topic, &[]);
    assert_eq!(code, 0, "{out}");
    let _ = child.kill();
    let _ = child.wait();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t93_a_full_spool_refuses_statements_before_the_target() {
    let topic = create_topic(1);
    let node = TestNode::start(NodeOptions {
        kafka_topic: Some(topic.clone()),
        kafka_extra: "spool_max_bytes = 1048576\n".into(),
        ..NodeOptions::default()
    })
    .await;
    let (client, _task) = node.client(&agent_token().await).await.unwrap();
    signal_broker("-STOP");
    let padding = "x".repeat(30_000);
    let log_start = pg_log_len();
    let mut refused = None;
    for i in 0..100 {
        match client
            .simple_query(&format!("SELECT '{padding}' AS pad, {i} AS n -- spool-{i}"))
            .await
        {
            Ok(_) => {}
            Err(e) => {
                refused = Some((i, e));
                break;
            }
        }
    }
    let (i, err) = refused.expect("the spool filled up");
    let db = err.as_db_error().expect("an error from the gateway");
    assert_eq!(db.code().code(), "58030");
    assert!(db.message().contains("spool is full"), "{}", db.message());
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(
        !pg_log_lines(&node.files.db, log_start)
            .iter()
            .any(|l| l.contains(&format!("spool-{i}"))),
        "the refused statement reached the target"
    );
    signal_broker("-CONT");
    // Once the broker catches up the same session works again.
    let mut ok = false;
    for _ in 0..100 {
        if client.simple_query("SELECT 1").await.is_ok() {
            ok = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(ok, "the session was usable after the spool drained");
    let refusal = node
        .records()
        .await
        .into_iter()
        .find(|r| r.body.kind == Kind::Blocked)
        .expect("the refusal is on record");
    assert!(refusal
        .body
        .detail
        .as_deref()
        .is_some_and(|d| d.contains("spool is full")));
}

type Message = (Option<String>, bool, Vec<u8>);

/// Publishes `msgs` (after `edit`) into a fresh topic, whose name it returns.
fn republish(msgs: &[TopicMessage], edit: impl FnOnce(&mut Vec<Message>)) -> String {
    use rdkafka::config::ClientConfig;
    use rdkafka::message::{Header, OwnedHeaders};
    use rdkafka::producer::{BaseRecord, DefaultProducerContext, Producer, ThreadedProducer};
    let mut copy: Vec<Message> = msgs
        .iter()
        .map(|m| (m.key.clone(), m.checkpoint, m.value.clone()))
        .collect();
    edit(&mut copy);
    let topic = create_topic(1);
    let producer: ThreadedProducer<DefaultProducerContext> = ClientConfig::new()
        .set("bootstrap.servers", env().get("VIGIL_KAFKA_BROKERS"))
        .set("enable.idempotence", "true")
        .create()
        .unwrap();
    for (key, checkpoint, value) in &copy {
        let mut r = BaseRecord::<str, [u8]>::to(&topic).payload(value.as_slice());
        if let Some(k) = key {
            r = r.key(k.as_str());
        }
        if *checkpoint {
            r = r.headers(OwnedHeaders::new().insert(Header {
                key: vigil_node::audit::kafka::KIND_HEADER,
                value: Some("checkpoint"),
            }));
        }
        producer.send(r).map_err(|(e, _)| e).unwrap();
    }
    producer.flush(Duration::from_secs(10)).unwrap();
    topic
}

/// Re-publishes `msgs` (after `edit`) into a fresh topic and runs the verifier on it.
fn tampered(
    msgs: &[TopicMessage],
    edit: impl FnOnce(&mut Vec<Message>),
    witness: &[String],
) -> (i32, String) {
    verify_topic(&republish(msgs, edit), witness)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t94_tampering_with_the_topic_is_caught() {
    // A real stream, shipped and witnessed; the node keeps running (an open stream).
    let topic = create_topic(1);
    let node = TestNode::start(NodeOptions {
        kafka_topic: Some(topic.clone()),
        checkpoint_interval_secs: 1,
        ..NodeOptions::default()
    })
    .await;
    let other_topic = create_topic(1);
    let other = TestNode::start(NodeOptions {
        kafka_topic: Some(other_topic.clone()),
        ..NodeOptions::default()
    })
    .await;
    some_statements(&node, 20).await;
    some_statements(&other, 2).await;
    let witness = node.node.coordinator.clone();
    // Wait until the witness holds a checkpoint of (nearly) everything.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let msgs = until_shipped(&topic, &node.files.audit_dir).await;
    let foreign = until_shipped(&other_topic, &other.files.audit_dir).await;
    let (code, out) = tampered(&msgs, |_| {}, &witness);
    assert_eq!(code, 0, "an untouched copy verifies: {out}");
    let n_records = msgs.iter().filter(|m| !m.checkpoint).count();
    assert!(n_records > 40);
    let record_index = |copy: &Vec<Message>, nth: usize| {
        copy.iter()
            .enumerate()
            .filter(|(_, m)| !m.1)
            .nth(nth)
            .map(|(i, _)| i)
            .unwrap()
    };

    // A changed byte.
    let (code, out) = tampered(
        &msgs,
        |c| {
            let i = record_index(c, 10);
            let v =
                String::from_utf8(c[i].2.clone())
                    .unwrap()
                    .replacen("customers", "customerz", 1);
            c[i].2 = v.into_bytes();
        },
        &witness,
    );
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("hash mismatch"), "{out}");
    // A record dropped.
    let (code, out) = tampered(
        &msgs,
        |c| {
            let i = record_index(c, 12);
            c.remove(i);
        },
        &witness,
    );
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("gap"), "{out}");
    // Two records swapped.
    let (code, out) = tampered(
        &msgs,
        |c| {
            let (a, b) = (record_index(c, 14), record_index(c, 15));
            c.swap(a, b);
        },
        &witness,
    );
    assert_eq!(code, 1, "{out}");
    // Another stream's record replayed into this one (under this stream's key).
    let (code, out) = tampered(
        &msgs,
        |c| {
            let alien = foreign.iter().find(|m| !m.checkpoint).unwrap();
            let key = c[0].0.clone();
            c.insert(5, (key, false, alien.value.clone()));
        },
        &witness,
    );
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("another stream"), "{out}");
    // The tail dropped: the chain alone cannot tell, the witnessed checkpoint does.
    let (code, out) = tampered(
        &msgs,
        |c| {
            let keep = record_index(c, 5);
            c.truncate(keep);
        },
        &witness,
    );
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("truncated"), "{out}");
    // A forged checkpoint (signed by a key that is not the node's).
    let (code, out) = tampered(
        &msgs,
        |c| {
            let key = ed25519_dalek::SigningKey::from_bytes(&[9; 32]);
            let last = c.iter().rev().find(|m| !m.1).unwrap().clone();
            let r = vigil_proto::record::Record::parse(&last.2).unwrap();
            let hash = hex::encode(vigil_proto::chain::record_hash(&last.2));
            let cp = vigil_proto::checkpoint::Checkpoint::sign(&key, &r.stream, r.seq, &hash, 1);
            c.push((last.0, true, serde_json::to_vec(&cp).unwrap()));
        },
        &witness,
    );
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("not the stream's"), "{out}");
    // A checkpoint with a bad signature.
    let (code, out) = tampered(
        &msgs,
        |c| {
            let i = c
                .iter()
                .position(|m| m.1)
                .expect("a checkpoint in the topic");
            let mut cp: vigil_proto::checkpoint::Checkpoint =
                serde_json::from_slice(&c[i].2).unwrap();
            cp.seq += 1;
            c[i].2 = serde_json::to_vec(&cp).unwrap();
        },
        &witness,
    );
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("bad checkpoint signature"), "{out}");
    // An identical duplicate is harmless and counted.
    let (code, out) = tampered(
        &msgs,
        |c| {
            let i = record_index(c, 3);
            let dup = c[i].clone();
            c.insert(i + 1, dup);
        },
        &witness,
    );
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("1 identical duplicates"), "{out}");

    // The local log against the same witness: intact, then with its tail cut off.
    let alice = id_token("alice");
    let dir = node.files.audit_dir.to_str().unwrap().to_string();
    let coord = witness.join(",");
    let (code, out) = vigil(&[
        "audit",
        "verify",
        "--log",
        &dir,
        "--witness",
        &coord,
        "--token",
        &alice,
    ]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("anchored at seq"), "{out}");
    let cut = tempfile::tempdir().unwrap();
    let file = vigil_node::audit::log_files(&node.files.audit_dir)
        .unwrap()
        .remove(0);
    let text = std::fs::read_to_string(&file).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    let kept = lines[..lines.len() - 8].join("\n") + "\n";
    std::fs::write(cut.path().join(file.file_name().unwrap()), kept).unwrap();
    let (code, out) = vigil(&[
        "audit",
        "verify",
        "--log",
        cut.path().to_str().unwrap(),
        "--witness",
        &coord,
        "--token",
        &alice,
    ]);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("truncated"), "{out}");
}

/// The dev broker paused (SIGSTOP) until dropped, even when the test fails.
struct PausedBroker;

impl PausedBroker {
    fn pause() -> Self {
        signal_broker("-STOP");
        Self
    }
}

impl Drop for PausedBroker {
    fn drop(&mut self) {
        signal_broker("-CONT");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t95_a_restarted_node_counts_its_unacknowledged_tail_at_once() {
    let topic = create_topic(1);
    let (pg_port, admin_port) = (free_port(), free_port());
    let files = NodeFiles::new(&NodeOptions {
        pg_port,
        admin_port,
        kafka_topic: Some(topic),
        ..NodeOptions::default()
    })
    .await;
    let mut child = spawn_node(&files, admin_port).await;
    let broker = PausedBroker::pause();
    let conn = format!(
        "host=127.0.0.1 port={pg_port} user=agent dbname=app password={}",
        agent_token().await
    );
    let (client, _task) = connect_tls(&conn).await.unwrap();
    for i in 0..10 {
        client.simple_query(&format!("SELECT {i}")).await.unwrap();
    }
    child.kill().unwrap();
    child.wait().unwrap();
    // Restarted while the broker is still away: from its very first answer, /metrics counts
    // the earlier stream's unacknowledged tail.
    let mut child = std::process::Command::new(bin("vigil-node"))
        .arg("--config")
        .arg(&files.config_path)
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let url = format!("http://127.0.0.1:{admin_port}/metrics");
    let mut first = None;
    for _ in 0..2000 {
        if let Ok(r) = reqwest::get(&url).await {
            first = Some(r.text().await.unwrap());
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let first = first.expect("the restarted node answers /metrics");
    let _ = child.kill();
    let _ = child.wait();
    drop(broker);
    assert!(
        metric(&first, "vigil_audit_spool_bytes") > 0.0,
        "{}",
        first
            .lines()
            .filter(|l| l.contains("spool"))
            .collect::<Vec<_>>()
            .join("\n")
    );
}

/// The value of `label` in a Prometheus line.
fn label<'a>(line: &'a str, label: &str) -> &'a str {
    let start = line.find(&format!("{label}=\"")).expect(label) + label.len() + 2;
    let len = line[start..].find('"').unwrap();
    &line[start..start + len]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t96_node_keys_are_published_by_the_witness_and_pinned_by_the_verifier() {
    let cluster = vigil_chaos::cluster::Cluster::start(1).await;
    let topic = create_topic(1);
    let node = TestNode::start(NodeOptions {
        kafka_topic: Some(topic.clone()),
        coordinator: Some(cluster.node_section()),
        checkpoint_interval_secs: 1,
        ..NodeOptions::default()
    })
    .await;
    some_statements(&node, 5).await;
    let node_id = node.records().await[0].body.node.clone();
    let stream = node.records().await[0].stream.clone();

    // The node shows its key.
    let metrics = node.metrics().await;
    let info = metrics
        .lines()
        .find(|l| l.starts_with("vigil_node_key_info{"))
        .expect("the key's info metric");
    let (public_key, fingerprint) = (label(info, "public_key"), label(info, "fingerprint"));
    assert_eq!(
        vigil_proto::checkpoint::fingerprint(public_key).as_deref(),
        Some(fingerprint)
    );

    // The witness publishes it, bound to the node id, to any authenticated caller.
    let alice = id_token("alice");
    let coord = cluster.endpoints().join(",");
    let (code, keys) = vigil(&[
        "witness",
        "keys",
        "--coordinator",
        &coord,
        "--token",
        &alice,
    ]);
    assert_eq!(code, 0, "{keys}");
    assert!(
        keys.contains(&format!("\n{node_id} {public_key}\n")),
        "{keys}"
    );
    assert!(keys.contains(fingerprint), "{keys}");
    let (code, list) = vigil(&[
        "witness",
        "list",
        "--coordinator",
        &coord,
        "--token",
        &alice,
    ]);
    assert_eq!(code, 0, "{list}");
    assert!(
        list.contains(&stream) && list.contains(fingerprint),
        "{list}"
    );
    let listed = cluster
        .operator(&alice)
        .list_node_keys(vigil_proto::coordinator::ListNodeKeysRequest {})
        .await
        .unwrap();
    assert_eq!(listed.keys.len(), 1);
    assert_eq!(listed.keys[0].public_key, public_key);
    assert_eq!(listed.keys[0].first_stream, stream);

    // …and refuses another key for a new stream of the same node.
    let intruder = ed25519_dalek::SigningKey::from_bytes(&[9; 32]);
    let forged = vigil_proto::checkpoint::Checkpoint::sign(
        &intruder,
        &format!("{node_id}:1"),
        0,
        &"00".repeat(32),
        1,
    );
    let e = cluster
        .client()
        .put_checkpoint(forged.into())
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::FailedPrecondition, "{e:?}");
    assert!(e.message().contains("registered key"), "{}", e.message());

    // A verifier pins the published keys: the topic as written verifies…
    let keys_file = node.files.dir.path().join("keys");
    std::fs::write(&keys_file, &keys).unwrap();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let msgs = until_shipped(&topic, &node.files.audit_dir).await;
    let with_keys = |topic: &str| {
        vigil(&[
            "audit",
            "verify",
            "--kafka",
            env().get("VIGIL_KAFKA_BROKERS"),
            "--topic",
            topic,
            "--keys",
            keys_file.to_str().unwrap(),
        ])
    };
    let (code, out) = with_keys(&topic);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("anchored at seq"), "{out}");
    // …while the topic rewritten with every checkpoint re-signed by another key passes a
    // verifier that trusts the checkpoints' own keys, and fails one with pinned keys.
    let resigned = republish(&msgs, |c| {
        for m in c.iter_mut().filter(|m| m.1) {
            let cp: vigil_proto::checkpoint::Checkpoint = serde_json::from_slice(&m.2).unwrap();
            let again = vigil_proto::checkpoint::Checkpoint::sign(
                &intruder, &cp.stream, cp.seq, &cp.hash, cp.time_ms,
            );
            m.2 = serde_json::to_vec(&again).unwrap();
        }
    });
    let (code, out) = verify_topic(&resigned, &[]);
    assert_eq!(code, 0, "only pinned keys tell: {out}");
    let (code, out) = with_keys(&resigned);
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains(&format!(
            "checkpoint signed by a key not pinned for node {node_id}"
        )),
        "{out}"
    );
    node.node.shutdown().await;
}

/// The stream file in `dir` (one process, one file) and its cursor: (bytes, records)
/// acknowledged, and the file's size.
fn cursor(dir: &std::path::Path) -> ((u64, u64), u64) {
    let files = vigil_node::audit::log_files(dir).unwrap();
    assert_eq!(files.len(), 1, "one stream file");
    let mut acked = files[0].clone().into_os_string();
    acked.push(".acked");
    let text = std::fs::read_to_string(&acked).unwrap_or_default();
    let mut n = text.split_whitespace().map(|p| p.parse::<u64>().unwrap());
    let c = (n.next().unwrap_or(0), n.next().unwrap_or(0));
    (c, std::fs::metadata(&files[0]).unwrap().len())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t97_the_cursor_moves_only_over_what_the_broker_acknowledged() {
    let topic = create_topic(1);
    let node = TestNode::start(NodeOptions {
        kafka_topic: Some(topic.clone()),
        ..NodeOptions::default()
    })
    .await;
    let dir = node.files.audit_dir.clone();
    some_statements(&node, 10).await;
    until_shipped(&topic, &dir).await;
    // The cursor file is rewritten at most every 100 ms, the idle shipper looks every 200 ms.
    tokio::time::sleep(Duration::from_millis(600)).await;
    let (shipped, size) = cursor(&dir);
    assert_eq!(shipped.0, size, "everything shipped before the pause");
    signal_broker("-STOP");
    some_statements(&node, 20).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let (during, size_during) = cursor(&dir);
    let metrics = node.metrics().await;
    signal_broker("-CONT");
    assert_eq!(
        during, shipped,
        "nothing was acknowledged while the broker was paused"
    );
    assert!(size_during > during.0);
    assert!(metric(&metrics, "vigil_audit_spool_records") > 0.0);
    // Once the broker is back the cursor reaches the end, and every record it has passed over
    // is on the topic.
    let mut end = during;
    for _ in 0..300 {
        let (c, size) = cursor(&dir);
        end = c;
        if c.0 == size {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let file = vigil_node::audit::log_files(&dir).unwrap().remove(0);
    let bytes = std::fs::read(&file).unwrap();
    assert_eq!(end.0, bytes.len() as u64, "the cursor reached the end");
    let msgs = topic_messages(&topic);
    let on_topic: BTreeSet<&[u8]> = records(&msgs).iter().map(|m| m.value.as_slice()).collect();
    let passed: Vec<&[u8]> = bytes[..end.0 as usize]
        .split(|&b| b == b'\n')
        .filter(|l| !l.is_empty())
        .collect();
    assert_eq!(
        passed.len() as u64,
        end.1,
        "the cursor counts the records it passed over"
    );
    for line in passed {
        assert!(
            on_topic.contains(line),
            "a record behind the cursor is on the topic"
        );
    }
}

/// `overrides = { … }` of `[audit.kafka]` with these librdkafka settings.
fn overrides(options: &[(String, String)]) -> String {
    let pairs: Vec<String> = options
        .iter()
        .map(|(k, v)| format!("{k:?} = {v:?}"))
        .collect();
    format!("overrides = {{ {} }}\n", pairs.join(", "))
}

/// Everything in `topic` of the TLS broker, read with `options`.
fn tls_messages(
    broker: &TlsBroker,
    options: &[(String, String)],
    topic: &str,
) -> Result<Vec<TopicMessage>, String> {
    let mut out = Vec::new();
    vigil_node::audit::kafka::read_topic(
        &broker.brokers,
        options,
        topic,
        Duration::from_secs(10),
        |m| out.push(m),
    )
    .map_err(|e| e.to_string())?;
    Ok(out)
}

/// The sink to a broker that requires TLS and a client certificate (`security.protocol`
/// and `ssl.*` in `overrides`), in zstd batches: every record of the local log arrives, and
/// `vigil audit verify --kafka` with the same settings (`--kafka-option`) verifies the topic;
/// without them it cannot read it. A node that does not trust the broker's certificate ships
/// nothing: its records stay in its local log.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t98_the_sink_ships_over_tls_with_a_client_certificate_in_zstd_batches() {
    let broker = TlsBroker::start().await;
    let options = broker.client_options(&broker.path("ca.crt"));
    let topic = broker.create_topic();
    let node = TestNode::start(NodeOptions {
        kafka_topic: Some(topic.clone()),
        kafka_brokers: Some(broker.brokers.clone()),
        kafka_extra: format!("compression = \"zstd\"\n{}", overrides(&options)),
        ..NodeOptions::default()
    })
    .await;
    some_statements(&node, 20).await;
    let msgs = until_read_holds(
        || tls_messages(&broker, &options, &topic).unwrap_or_default(),
        &node.files.audit_dir,
    )
    .await;
    assert!(records(&msgs).len() >= 40, "{} records", msgs.len());

    let mut args: Vec<String> = [
        "audit",
        "verify",
        "--kafka",
        &broker.brokers,
        "--topic",
        &topic,
    ]
    .map(String::from)
    .into();
    for (k, v) in &options {
        args.push("--kafka-option".into());
        args.push(format!("{k}={v}"));
    }
    let (code, out) = vigil(&args.iter().map(String::as_str).collect::<Vec<_>>());
    assert_eq!(code, 0, "{out}");
    assert!(out.lines().any(|l| l.starts_with("OK: ")), "{out}");
    let (code, out) = vigil(&args[..6].iter().map(String::as_str).collect::<Vec<_>>());
    assert_ne!(code, 0, "read without TLS: {out}");

    // Another CA: the node refuses the broker's certificate and ships nothing.
    kafka_tls::ca(broker.dir.path(), "other-ca", "/CN=Not the broker's CA");
    let untrusted = broker.create_topic();
    let other = TestNode::start(NodeOptions {
        kafka_topic: Some(untrusted.clone()),
        kafka_brokers: Some(broker.brokers.clone()),
        kafka_extra: overrides(&broker.client_options(&broker.path("other-ca.crt"))),
        ..NodeOptions::default()
    })
    .await;
    some_statements(&other, 5).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(log_lines(&other.files.audit_dir).len() >= 10);
    let shipped = tls_messages(&broker, &options, &untrusted).unwrap();
    assert!(shipped.is_empty(), "{} messages", shipped.len());
}

/// A record larger than the topic takes would never be delivered and would hold back every
/// record after it. With `max_record_bytes` the node keeps every record within it: a statement
/// whose request record would be larger is refused before the target (`58030`), and a response
/// whose error quotes a large value is written with that value cut, its length and SHA-256
/// kept. The topic holds the local log byte for byte, and verifies.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t99_every_record_fits_the_topic() {
    use sha2::Digest;
    const MAX: usize = 100_000;
    let topic = create_topic(1);
    let node = TestNode::start(NodeOptions {
        kafka_topic: Some(topic.clone()),
        kafka_extra: format!("max_record_bytes = {MAX}"),
        checkpoint_interval_secs: 1,
        ..NodeOptions::default()
    })
    .await;
    let offset = pg_log_len();
    let (client, task) = node.client(&agent_token().await).await.unwrap();
    let statement = format!("SELECT '{}' AS big", "x".repeat(150_000));
    let err = client.simple_query(&statement).await.expect_err("refused");
    let db = err.as_db_error().expect("the gateway's error");
    assert_eq!(db.code().code(), "58030");
    assert!(
        db.message()
            .contains("more than audit.kafka.max_record_bytes (100000)"),
        "{}",
        db.message()
    );
    assert!(
        !pg_executed(&node.files.db, offset)
            .iter()
            .any(|r| r.text.starts_with("SELECT 'xxx")),
        "the refused statement never reached PostgreSQL"
    );
    // The session goes on. PostgreSQL's error quotes the whole 150,000-byte value.
    let err = client
        .simple_query("SELECT repeat('y', 150000)::int")
        .await
        .expect_err("not an integer");
    let said = err
        .as_db_error()
        .expect("PostgreSQL's error")
        .message()
        .to_string();
    assert!(said.len() > 150_000);
    client.simple_query("SELECT 1").await.unwrap();
    drop(client);
    let _ = task.await;

    let written = node.records_after_sessions(1).await;
    let cut = |s: &str| {
        format!(
            "…[cut by the gateway: {} bytes, sha256 {}]",
            s.len(),
            hex::encode(sha2::Sha256::digest(s.as_bytes()))
        )
    };
    let blocked = of_kind(&written, Kind::Blocked);
    assert_eq!(blocked.len(), 1);
    let text = &blocked[0]
        .body
        .request
        .as_ref()
        .unwrap()
        .postgres()
        .unwrap()
        .text;
    assert!(
        text.starts_with("SELECT 'xxx") && text.ends_with(&cut(&statement)),
        "{text:.200}"
    );
    let quoted = of_kind(&written, Kind::Response)
        .into_iter()
        .filter_map(|r| r.body.pg_response()?.error.clone())
        .find(|e| e.sqlstate == "22P02")
        .expect("the error's response record");
    assert!(
        quoted.message.ends_with(&cut(&said)),
        "{:.200}",
        quoted.message
    );
    let metrics = node.metrics().await;
    assert_eq!(metric(&metrics, "vigil_audit_records_cut_total"), 2.0);
    assert_eq!(
        metric(&metrics, "vigil_audit_refused_statements_total"),
        1.0
    );

    let dir = node.files.audit_dir.clone();
    let TestNode { node: running, .. } = node;
    running.shutdown().await;
    let local = log_lines(&dir);
    assert!(local.iter().all(|l| l.len() <= MAX), "every record fits");
    let msgs = until_shipped(&topic, &dir).await;
    let shipped: Vec<Vec<u8>> = records(&msgs).iter().map(|m| m.value.clone()).collect();
    assert_eq!(shipped, local, "the topic is the local log, byte for byte");
    let (code, out) = verify_topic(&topic, &[]);
    assert_eq!(code, 0, "{out}");
}
