//! `audit-pipeline-bench`: how many ~1 KB audit records one node pushes through the real
//! pipeline (chain + local log write + shipper + idempotent producer + the broker's
//! acknowledgement), the gateway's CPU per record, and end-to-end latency from append to the
//! broker's acknowledgement. Run through loadtest/audit-pipeline.sh.
//!
//! Phase 1 (throughput): WRITERS tasks append RECORDS records as fast as they can; the clock
//! stops when the broker has acknowledged the last one. CPU is this process's user+system time
//! (the broker runs in its own process). Phase 2 (latency): one record at a time, each waiting
//! for its acknowledgement, SAMPLES times.

use std::sync::Arc;
use std::time::{Duration, Instant};
use vigil_node::audit::kafka::Shipper;
use vigil_node::audit::{AuditLog, Spool};
use vigil_node::config::{Compression, KafkaConfig, SyncMode};
use vigil_node::core::metrics::Metrics;
use vigil_proto::record::Kind;

fn setting(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// utime + stime of this process, in seconds.
fn cpu_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let rest = stat.rsplit_once(") ").map(|(_, r)| r).unwrap_or("");
    let f: Vec<u64> = rest
        .split_whitespace()
        .map(|x| x.parse().unwrap_or(0))
        .collect();
    // Fields from `state` on: utime is the 12th, stime the 13th (1-based), in clock ticks.
    (f.get(11).copied().unwrap_or(0) + f.get(12).copied().unwrap_or(0)) as f64 / 100.0
}

fn acked(spool: &Spool, audit: &AuditLog) -> bool {
    audit
        .head()
        .is_some_and(|(_, _, len)| spool.acked.load(std::sync::atomic::Ordering::Relaxed) >= len)
}

#[tokio::main]
async fn main() {
    let records = setting("RECORDS", 200_000);
    let writers = setting("WRITERS", 4);
    let samples = setting("SAMPLES", 2_000);
    let topic = vigil_chaos::create_topic(1);
    let dir = tempfile::tempdir().expect("tempdir");
    let metrics = Arc::new(Metrics::default());
    let spool = Arc::new(Spool::new(8 << 30, 1_000_000));
    let audit = AuditLog::open(
        dir.path(),
        "bench",
        SyncMode::default(),
        metrics.clone(),
        Some(spool.clone()),
    )
    .expect("audit log");
    let cfg = KafkaConfig {
        brokers: vec![vigil_chaos::env().get("VIGIL_KAFKA_BROKERS").to_string()],
        topic: topic.clone(),
        spool_max_bytes: 8 << 30,
        max_record_bytes: 1_000_000,
        compression: Compression::None,
        linger_ms: 5,
        max_in_flight_records: 50_000,
        overrides: Default::default(),
    };
    let key = Arc::new(ed25519_dalek::SigningKey::from_bytes(&rand::random::<
        [u8; 32],
    >()));
    let shipper = Shipper::new(
        cfg,
        metrics.clone(),
        spool.clone(),
        key,
        Duration::from_secs(5),
        Vec::new(),
    )
    .expect("producer");
    let (stop, stop_rx) = tokio::sync::watch::channel(false);
    let shipping =
        tokio::spawn(shipper.run(audit.path().to_path_buf(), stop_rx, Duration::from_secs(30)));
    println!(
        "audit-pipeline-bench: topic {topic}, {records} records of ~1 KB from {writers} writers, then {samples} latency samples"
    );
    let detail = "x".repeat(900);
    let body = {
        let mut b = audit.body(Some("bench-session"), Kind::Request);
        b.detail = Some(detail);
        b
    };
    // Phase 1: throughput.
    let cpu0 = cpu_seconds();
    let t0 = Instant::now();
    let per = records / writers;
    let mut tasks = Vec::new();
    for _ in 0..writers {
        let (audit, body) = (audit.clone(), body.clone());
        tasks.push(tokio::spawn(async move {
            for _ in 0..per {
                audit.append(&body).await.expect("append");
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let written = t0.elapsed();
    while !acked(&spool, &audit) {
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let total = t0.elapsed();
    let cpu = cpu_seconds() - cpu0;
    let n = per * writers;
    let size = audit.head().map(|(_, _, len)| len).unwrap_or(0) as f64 / (n + 1) as f64;
    let rate = n as f64 / total.as_secs_f64();
    let cpu_us = cpu * 1e6 / n as f64;
    println!(
        "throughput: {n} records ({size:.0} B each) appended in {:.2} s, all acknowledged after {:.2} s: {rate:.0} records/s (goal >= 50000: {})",
        written.as_secs_f64(),
        total.as_secs_f64(),
        if rate >= 50_000.0 { "met" } else { "NOT met" }
    );
    println!(
        "gateway CPU: {cpu:.2} s for {n} records = {cpu_us:.1} us/record (goal <= 10: {})",
        if cpu_us <= 10.0 { "met" } else { "NOT met" }
    );
    // Phase 2: latency, one record at a time.
    let mut lat = Vec::with_capacity(samples as usize);
    for _ in 0..samples {
        let t = Instant::now();
        audit.append(&body).await.expect("append");
        while !acked(&spool, &audit) {
            tokio::task::yield_now().await;
        }
        lat.push(t.elapsed().as_micros() as u64);
    }
    lat.sort_unstable();
    let pct = |p: f64| lat[((lat.len() as f64 * p) as usize).min(lat.len() - 1)] as f64 / 1000.0;
    println!(
        "append -> broker ack latency: p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
        pct(0.5),
        pct(0.99),
        lat[lat.len() - 1] as f64 / 1000.0
    );
    audit.close().await;
    let _ = stop.send(true);
    let _ = shipping.await;
    // Everything arrived, chained and identical.
    let mut verifier = vigil_proto::verify::Verifier::new();
    let t = Instant::now();
    let read = vigil_node::audit::kafka::read_topic(
        vigil_chaos::env().get("VIGIL_KAFKA_BROKERS"),
        &[],
        &topic,
        Duration::from_secs(10),
        |m| {
            if !m.checkpoint {
                verifier.push(&m.location, &m.value, m.key.as_deref());
            }
        },
    )
    .expect("read the topic back");
    let report = verifier.report();
    println!(
        "read back {read} messages, {} records verified in {:.2} s ({:.0} records/s), {} failures, {} identical duplicates",
        report.verified(),
        t.elapsed().as_secs_f64(),
        report.verified() as f64 / t.elapsed().as_secs_f64(),
        report.failures.len(),
        report.identical_duplicates()
    );
    if !report.ok() {
        std::process::exit(1);
    }
}
