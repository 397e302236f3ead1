//! What an SRE loads into Prometheus and Grafana (deploy/monitoring): the alerting rules pass
//! `promtool check rules` and their unit tests (`promtool test rules`), and the rules and the
//! dashboard name only metrics a real node or a real coordinator member exports, and the
//! dashboard shows every one of them.

use std::collections::BTreeSet;
use std::path::PathBuf;
use vigil_chaos::{NodeOptions, TestNode};

fn monitoring() -> PathBuf {
    vigil_chaos::repo_root().join("deploy/monitoring")
}

/// `promtool ARGS` in deploy/monitoring; its output. promtool comes with Debian's `prometheus`
/// package (deploy/dev/setup.sh installs it): without it this fails, it does not skip.
fn promtool(args: &[&str]) -> String {
    let out = std::process::Command::new("promtool")
        .args(args)
        .current_dir(monitoring())
        .output()
        .expect("promtool runs (apt-get install prometheus; deploy/dev/setup.sh does)");
    let text = vigil_chaos::output_text(&out);
    assert!(out.status.success(), "promtool {args:?}:\n{text}");
    text
}

/// Every `vigil_…` metric name in `text`.
fn named(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let mut rest = text;
    while let Some(i) = rest.find("vigil_") {
        let tail = &rest[i..];
        let end = tail
            .find(|c: char| !(c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_'))
            .unwrap_or(tail.len());
        names.insert(tail[..end].to_string());
        rest = &tail[end..];
    }
    names
}

#[test]
fn the_alerting_rules_load_and_fire_as_their_tests_say() {
    let checked = promtool(&["check", "rules", "vigil-alerts.yml"]);
    assert!(checked.contains("SUCCESS"), "{checked}");
    let tested = promtool(&["test", "rules", "vigil-alerts.test.yml"]);
    assert!(tested.contains("SUCCESS"), "{tested}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_rules_and_the_dashboard_name_only_exported_metrics_and_the_dashboard_shows_all() {
    let node = TestNode::start(NodeOptions::default()).await;
    let coordinator = vigil_chaos::cluster::Cluster::start(1).await;
    let (status, member) = coordinator.http_get(1, "/metrics").await;
    assert_eq!(status, 200, "{member}");
    let exposition = node.metrics().await + &member;
    // Sample names, and for each family its name (counters are sampled as NAME_total, a
    // histogram as NAME_bucket, NAME_sum and NAME_count; a family with labels has no sample
    // until it is used).
    let mut exported = BTreeSet::new();
    for line in exposition.lines() {
        if let Some(decl) = line.strip_prefix("# TYPE ") {
            let mut words = decl.split_whitespace();
            let (name, kind) = (words.next().unwrap(), words.next().unwrap_or(""));
            exported.insert(match kind {
                "counter" => format!("{name}_total"),
                "histogram" => format!("{name}_bucket"),
                "info" => format!("{name}_info"),
                _ => name.to_string(),
            });
        } else if !line.starts_with('#') && !line.is_empty() {
            let end = line.find(['{', ' ']).unwrap_or(line.len());
            exported.insert(line[..end].to_string());
        }
    }
    for expected in [
        "vigil_audit_spool_age_seconds",
        "vigil_coordinator_leader_changes_total",
        "vigil_coordinator_commit_seconds_bucket",
        "vigil_coordinator_requests",
    ] {
        assert!(exported.contains(expected), "{expected}: {exported:?}");
    }

    let rules = std::fs::read_to_string(monitoring().join("vigil-alerts.yml")).unwrap();
    let dashboard_text =
        std::fs::read_to_string(monitoring().join("vigil-dashboard.json")).unwrap();
    let dashboard: serde_json::Value =
        serde_json::from_str(&dashboard_text).expect("the dashboard is JSON");

    let mut exprs = String::new();
    let mut ids = BTreeSet::new();
    for panel in dashboard["panels"].as_array().expect("panels") {
        assert!(
            ids.insert(panel["id"].as_u64().expect("a panel id")),
            "ids are unique"
        );
        let targets = panel["targets"].as_array().expect("each panel has targets");
        assert!(!targets.is_empty(), "{panel}");
        for t in targets {
            exprs.push_str(t["expr"].as_str().expect("each target has an expression"));
            exprs.push('\n');
        }
    }
    for (what, text) in [("the alerting rules", &rules), ("the dashboard", &exprs)] {
        let unknown: Vec<_> = named(text).difference(&exported).cloned().collect();
        assert!(
            unknown.is_empty(),
            "{what} name metrics neither a node nor a coordinator member exports: {unknown:?}"
        );
    }
    let shown = named(&exprs);
    let missing: Vec<_> = exported
        .iter()
        .filter(|m| !shown.contains(*m))
        .cloned()
        .collect();
    assert!(
        missing.is_empty(),
        "exported metrics the dashboard does not show: {missing:?}"
    );
}
