//! `console-index-bench`: the console's session index at scale. Run through
//! `loadtest/bench.sh console-index`.
//!
//! Writes a local audit log of SESSIONS sessions (a `session_start`, one statement's `request`
//! and `response` or `blocked`, a `session_end`: four chained records each; 20 principals,
//! 10 targets, 3 protocols, one session in twenty blocked), then measures:
//!
//! 1. catch-up: an empty index taking the whole log (records/s; goal >= 20,000/s), and the
//!    index's size beside the log's;
//! 2. the list and searches an auditor runs, each REPEAT times (median and worst; goal
//!    <= 200 ms each): the newest page, a principal, an outcome, a protocol no session has (the
//!    whole index scanned), a time range, a rare word and a word every session has;
//! 3. following: 1,000 more sessions appended, then taken.

use std::io::Write as _;
use std::time::{Duration, Instant};
use vigil_node::console::index::{Index, Query};
use vigil_proto::chain::Chain;
use vigil_proto::record::{
    Body, Connection, Kind, Outcome, PgRequest, PgResponse, PolicyRef, Principal, Request,
    Response, SshRequest,
};

fn setting(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// The records of session `n`, sealed on `chain`.
fn session(chain: &mut Chain, n: u64, out: &mut Vec<u8>) -> u64 {
    let id = format!("s{n:012x}");
    // One second apart, from 2026-01-01.
    let secs = 1_767_225_600 + n;
    let time = |k: u64| {
        let t = time::OffsetDateTime::from_unix_timestamp(secs as i64).unwrap()
            + time::Duration::milliseconds(k as i64 * 10);
        t.format(&time::format_description::well_known::Rfc3339)
            .unwrap()
    };
    let protocol = ["postgres", "postgres", "ssh", "kubernetes"][(n % 4) as usize];
    let principal = std::sync::Arc::new(Principal {
        subject: format!("agent-{:02}", n % 20),
        client_id: Some(format!("agent-{:02}", n % 20)),
        model: Some(["gpt-5", "claude-opus", "llama-4"][(n % 3) as usize].into()),
        issuer: "https://idp.example".into(),
        token_type: "access_token".into(),
        ..Principal::default()
    });
    let connection = std::sync::Arc::new(Connection {
        protocol: protocol.into(),
        client_addr: format!("10.0.{}.{}:5{:04}", n % 7, n % 250, n % 10_000),
        name: Some(format!("target-{}", n % 10)),
        ..Connection::default()
    });
    let body = |kind: Kind, k: u64| {
        let mut b = Body::new(time(k), "bench".into(), Some(id.clone()), kind);
        b.principal = Some(principal.clone());
        b.connection = Some(connection.clone());
        b
    };
    let mut records = Vec::new();
    let mut start = body(Kind::SessionStart, 0);
    start.outcome = Some(Outcome::Success);
    records.push(start);
    let blocked = n % 20 == 7;
    let mut request = body(
        if blocked {
            Kind::Blocked
        } else {
            Kind::Request
        },
        1,
    );
    request.stmt = Some(1);
    request.policy = Some(PolicyRef {
        rule: if blocked { "no-drop" } else { "default" }.into(),
        version: "v1".into(),
    });
    request.request = Some(match protocol {
        "ssh" => Request::Ssh(SshRequest {
            request_type: "exec".into(),
            command: Some(format!("tail -n 100 /var/log/app-{}.log", n % 1000)),
            ..SshRequest::default()
        }),
        _ => Request::Postgres(PgRequest {
            mode: "simple".into(),
            text: format!(
                "SELECT id, total, status FROM orders_{} WHERE customer_id = {} AND status = 'open'",
                n % 1000,
                n
            ),
            ..PgRequest::default()
        }),
    });
    if blocked {
        request.outcome = Some(Outcome::Blocked);
        request.detail = Some("dropping needs a human".into());
    }
    records.push(request);
    if !blocked {
        let mut response = body(Kind::Response, 2);
        response.stmt = Some(1);
        response.outcome = Some(Outcome::Success);
        response.duration_us = Some(900);
        response.response = Some(Response::Postgres(PgResponse {
            tags: vec!["SELECT 3".into()],
            rows: 3,
            bytes: 120,
            columns: vec!["id".into(), "total".into(), "status".into()],
            result: (0..3)
                .map(|r| {
                    vec![
                        Some(format!("{}", n * 3 + r)),
                        Some("42.50".into()),
                        Some("open".into()),
                    ]
                })
                .collect(),
            ..PgResponse::default()
        }));
        records.push(response);
    }
    let mut end = body(Kind::SessionEnd, 3);
    end.duration_us = Some(30_000);
    records.push(end);
    for r in &records {
        out.extend_from_slice(&chain.seal(r));
        out.push(b'\n');
    }
    records.len() as u64
}

fn write_sessions(file: &std::path::Path, chain: &mut Chain, range: std::ops::Range<u64>) -> u64 {
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(file)
        .unwrap();
    let mut buf = Vec::with_capacity(4 << 20);
    let mut n = 0;
    for s in range {
        n += session(chain, s, &mut buf);
        if buf.len() > (4 << 20) {
            f.write_all(&buf).unwrap();
            buf.clear();
        }
    }
    f.write_all(&buf).unwrap();
    n
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn dir_size(path: &std::path::Path) -> u64 {
    std::fs::metadata(path).map(|m| m.len()).unwrap_or(0)
}

fn main() {
    let sessions = setting("SESSIONS", 100_000);
    let repeat = setting("REPEAT", 20);
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("log");
    std::fs::create_dir_all(&log).unwrap();
    let file = log.join("bench-1.jsonl");
    let mut chain = Chain::new("bench:1");
    let written = write_sessions(&file, &mut chain, 0..sessions);
    let log_bytes = dir_size(&file);
    println!(
        "log: {sessions} sessions, {written} records, {:.1} MB",
        log_bytes as f64 / 1e6
    );

    let path = dir.path().join("index.redb");
    let index = Index::open(&path, &log).unwrap();
    let started = Instant::now();
    let taken = index.catch_up().unwrap();
    let took = started.elapsed();
    let rate = taken.records as f64 / took.as_secs_f64();
    println!(
        "catch-up: {} records in {:.2} s = {rate:.0} records/s (goal >= 20000: {}); index {:.1} MB ({:.2} x the log)",
        taken.records,
        took.as_secs_f64(),
        if rate >= 20_000.0 { "met" } else { "MISSED" },
        dir_size(&path) as f64 / 1e6,
        dir_size(&path) as f64 / log_bytes as f64
    );
    assert_eq!(taken.records, written);
    assert_eq!(index.sessions().unwrap(), sessions);

    let day = 86_400_000u64;
    let base = 1_767_225_600_000u64;
    let queries: Vec<(&str, Query)> = vec![
        ("the newest 50", Query::default()),
        (
            "principal agent-07",
            Query {
                principal: Some("agent-07".into()),
                ..Query::default()
            },
        ),
        (
            "outcome blocked",
            Query {
                outcome: Some(Outcome::Blocked),
                ..Query::default()
            },
        ),
        (
            "protocol no session has (full scan)",
            Query {
                protocol: Some("console".into()),
                ..Query::default()
            },
        ),
        (
            "one hour, a day ago",
            Query {
                from_ms: Some(base + day / 2),
                to_ms: Some(base + day / 2 + 3_600_000),
                ..Query::default()
            },
        ),
        (
            "a rare word (orders_17)",
            Query {
                text: Some("orders_17".into()),
                ..Query::default()
            },
        ),
        (
            "a word of every statement (select)",
            Query {
                text: Some("select".into()),
                ..Query::default()
            },
        ),
        (
            "two words and a principal",
            Query {
                text: Some("customer_id open".into()),
                principal: Some("agent-03".into()),
                ..Query::default()
            },
        ),
    ];
    let mut worst_all = Duration::ZERO;
    for (name, q) in &queries {
        let mut times = Vec::new();
        let mut found = 0;
        for _ in 0..repeat {
            let t = Instant::now();
            found = index.search(q).unwrap().len();
            times.push(t.elapsed());
        }
        times.sort();
        let (median, worst) = (times[times.len() / 2], *times.last().unwrap());
        worst_all = worst_all.max(worst);
        println!(
            "search {name:<40} {found:>3} found  median {:>7.2} ms  worst {:>7.2} ms",
            ms(median),
            ms(worst)
        );
    }
    let t = Instant::now();
    let (_, records) = index.session("s000000000007").unwrap().unwrap();
    println!(
        "a session's page: {} records in {:.2} ms",
        records.len(),
        ms(t.elapsed())
    );
    println!(
        "list and search: worst {:.1} ms (goal <= 200 ms: {})",
        ms(worst_all),
        if worst_all <= Duration::from_millis(200) {
            "met"
        } else {
            "MISSED"
        }
    );

    let more = write_sessions(&file, &mut chain, sessions..sessions + 1_000);
    let t = Instant::now();
    let taken = index.catch_up().unwrap();
    println!(
        "following: {} new records taken in {:.1} ms",
        taken.records,
        ms(t.elapsed())
    );
    assert_eq!(taken.records, more);
}
