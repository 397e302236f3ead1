//! t6x: the binaries' edges: a bad config is refused before anything is bound, naming the key.

use std::process::Command;
use vigil_chaos::*;

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
