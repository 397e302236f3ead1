//! Decision time per statement: parse + classify + decide, uncached and through the cache.
//! `cargo bench -p vigil-node --bench policy` (a plain timing loop; run it on a quiet machine
//! and compare runs, not single numbers).

use std::time::Instant;
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
        "{:<14} {:>14} {:>14}",
        "statement", "uncached µs", "cached µs"
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
        println!("{name:<14} {uncached:>14.2} {cached:>14.2}");
    }
}
