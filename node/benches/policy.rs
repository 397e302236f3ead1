//! Decision time per statement: parse + classify + decide, uncached and through the cache.
//! `cargo bench -p vigil-node --bench policy` (a plain timing loop; run it on a quiet machine
//! and compare runs, not single numbers). `cargo bench -p vigil-node --bench policy -- masking`
//! (or the binary with the argument `masking`) runs the masking throughput only, e.g. under
//! `valgrind --tool=callgrind` for instruction counts.

use std::time::Instant;
use vigil_node::policy::masking::{DetectorRule, Masker, MaskingConfig, Method};
use vigil_node::policy::{classify, Classifier, Policy, PolicyConfig};
use vigil_proto::record::Principal;

const STATEMENTS: &[(&str, &str)] = &[
    ("point select", "SELECT abalance FROM pgbench_accounts WHERE aid = $1"),
    ("update", "UPDATE pgbench_accounts SET abalance = abalance + $1 WHERE aid = $2"),
    (
        "join",
        "SELECT c.name, o.total FROM customers c JOIN orders o ON o.customer_id = c.id WHERE c.id = $1 ORDER BY o.created_at DESC LIMIT 10",
    ),
    (
        "cte write",
        "WITH moved AS (DELETE FROM queue WHERE id IN (SELECT id FROM queue ORDER BY id LIMIT 10) RETURNING *) INSERT INTO done SELECT * FROM moved",
    ),
];

fn main() {
    if !std::env::args().skip(1).any(|a| a == "masking") {
        statement_timings();
    }
    masking_throughput();
}

/// Parse + classify + decide per statement, uncached, cached and with varying numbers.
fn statement_timings() {
    let policy = Policy::new(
        toml::from_str::<PolicyConfig>(
            r#"
[[rules]]
id = "no-destruction"
action = "block"
flags = ["drop", "truncate", "delete_without_where", "update_without_where"]
[[rules]]
id = "writes"
action = "require_approval"
kinds = ["write"]
tables = ["payroll"]
"#,
        )
        .unwrap(),
    );
    let principal = Principal {
        subject: "agent".into(),
        groups: vec!["analysts".into()],
        ..Principal::default()
    };
    let classifier = Classifier::default();
    println!(
        "{:<14} {:>14} {:>14} {:>16}",
        "statement", "uncached µs", "cached µs", "new numbers µs"
    );
    for (name, sql) in STATEMENTS {
        let n = 20_000;
        let t = Instant::now();
        for _ in 0..n {
            let c = classify::classify(sql);
            std::hint::black_box(policy.decide(c.as_deref(), &principal, "app", false));
        }
        let uncached = t.elapsed().as_secs_f64() * 1e6 / n as f64;
        let t = Instant::now();
        for _ in 0..n {
            let c = classifier.classify(sql);
            std::hint::black_box(policy.decide(c.as_ref().as_deref(), &principal, "app", false));
        }
        let cached = t.elapsed().as_secs_f64() * 1e6 / n as f64;
        // The same statement with a different number each time (a loop over ids).
        let varied: Vec<String> = (0..n).map(|i| sql.replace("$1", &i.to_string())).collect();
        let t = Instant::now();
        for v in &varied {
            let c = classifier.classify(v);
            std::hint::black_box(policy.decide(c.as_ref().as_deref(), &principal, "app", false));
        }
        let numbers = t.elapsed().as_secs_f64() * 1e6 / n as f64;
        println!("{name:<14} {uncached:>14.2} {cached:>14.2} {numbers:>16.2}");
    }
}

/// Detector masking over realistic row text (mostly clean values, some entities).
fn masking_throughput() {
    let detectors = DetectorRule::every_kind(Method::Token, false);
    let masker = Masker::new(
        MaskingConfig {
            columns: vec![],
            detectors,
        },
        b"bench-key".to_vec(),
    );
    let mut values = Vec::new();
    for i in 0..10_000 {
        values.push(match i % 20 {
            0 => format!("customer{i}@example.com"),
            1 => "4111 1111 1111 1111".to_string(),
            2 => format!("order {i} shipped on 2026-11-27 to warehouse {}", i % 7),
            _ => format!("Customer number {i}, preferred contact by mail, account active"),
        });
    }
    let bytes: usize = values.iter().map(String::len).sum();
    let rounds = 20;
    let t = Instant::now();
    for _ in 0..rounds {
        for v in &values {
            std::hint::black_box(masker.mask(v, None, false, None));
        }
    }
    let secs = t.elapsed().as_secs_f64();
    println!(
        "masking: {:.0} MB/s over {} values of {} bytes on average (6 detectors, 10% entities)",
        (bytes * rounds) as f64 / secs / 1e6,
        values.len(),
        bytes / values.len()
    );
}
