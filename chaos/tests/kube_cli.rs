//! `vigil kubeconfig` and `vigil kube-credential` with the real kubectl (client-go).
//!
//! - t10: kubectl parses the kubeconfig the CLI writes, runs the exec plugin it names and takes
//!   its ExecCredential (against a closed port: getting as far as dialing shows client-go
//!   accepted the credential, which it checks first), and stops when the plugin says the kept
//!   token has expired or is missing.
//! - t11: an agent's static token merged into an existing JSON kubeconfig (the dev cluster's
//!   admin kubeconfig, deploy/dev/kube.sh), whose own entries still reach the real API server;
//!   a YAML kubeconfig refused and left as it was.
//! - t20: a person's kubectl through the gateway's Kubernetes listener with the plugin: the API
//!   server's audit log shows the gateway acting as the person the kept token names, and so do
//!   Vigil's records; with the token expired nothing reaches the API server as them.
//!
//! Tokens are real ones from the dev OIDC provider. The rest of kubectl through the gateway is
//! kubernetes.rs.

use serde_json::Value;
use std::path::Path;
use std::process::Command;
use vigil_chaos::kube::{audit_events, audit_len, Gateway};
use vigil_chaos::{agent_token, base_claims, bin, env, forge, free_port, id_token, now_secs};
use vigil_proto::record::Request;

/// Runs a command; (exit code, stdout, stderr).
fn run(command: &mut Command) -> (i32, String, String) {
    let out = command.output().expect("run the command");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn vigil(args: &[&str]) -> (i32, String, String) {
    run(Command::new(bin("vigil")).args(args))
}

fn kubectl(kubeconfig: &Path, args: &[&str]) -> (i32, String, String) {
    run(Command::new("kubectl")
        .arg("--kubeconfig")
        .arg(kubeconfig)
        .args(args))
}

/// What kubectl makes of a kubeconfig (it reads and validates it).
fn view(kubeconfig: &Path) -> Value {
    let (code, out, err) = kubectl(kubeconfig, &["config", "view", "--raw", "-o", "json"]);
    assert_eq!(code, 0, "kubectl config view: {err}");
    serde_json::from_str(&out).expect("kubectl config view prints JSON")
}

fn named<'a>(config: &'a Value, list: &str, name: &str) -> &'a Value {
    config[list]
        .as_array()
        .into_iter()
        .flatten()
        .find(|e| e["name"] == name)
        .unwrap_or_else(|| panic!("no {list} entry {name} in {config:#}"))
}

/// The exec credential API v1 is kubectl 1.22's and later.
fn kubectl_runs_v1_plugins() -> bool {
    let (_, out, _) = run(Command::new("kubectl").args(["version", "--client", "-o", "json"]));
    let minor: u32 = serde_json::from_str::<Value>(&out)
        .ok()
        .and_then(|v| v["clientVersion"]["minor"].as_str().map(str::to_string))
        .map(|m| {
            m.chars()
                .take_while(char::is_ascii_digit)
                .collect::<String>()
        })
        .and_then(|m| m.parse().ok())
        .unwrap_or(0);
    minor >= 22
}

/// A JWT's claims, unverified (what the test compares).
fn claims(token: &str) -> Value {
    use base64::Engine as _;
    let payload = token.split('.').nth(1).expect("a JWT");
    serde_json::from_slice(
        &base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(payload)
            .unwrap(),
    )
    .unwrap()
}

fn exp_of(token: &str) -> i64 {
    claims(token)["exp"].as_i64().expect("exp")
}

/// Keeps `token` where `vigil login` keeps it.
fn keep(home: &Path, token: &str) {
    vigil_node::core::secret::write_private_file(
        &home.join("token"),
        format!("{token}\n").as_bytes(),
    )
    .unwrap();
}

fn expired_token() -> String {
    let mut claims = base_claims();
    claims["iat"] = (now_secs() - 600).into();
    claims["exp"] = (now_secs() - 60).into();
    forge(&claims, env().get("VIGIL_OIDC_KID"), None)
}

#[test]
fn t10_a_persons_kubeconfig_runs_the_plugin_with_the_kept_token() {
    let dir = tempfile::tempdir().unwrap();
    let home = dir.path().join("vigil-home");
    let file = dir.path().join("kubeconfig.json");
    let ca = env().get("VIGIL_DEV_KUBE_CA");
    // Nothing listens there: the gateway's listener is not part of this test.
    let server = format!("https://127.0.0.1:{}", free_port());
    let home_arg = home.display().to_string();
    let file_arg = file.display().to_string();

    println!("phase 1: vigil kubeconfig writes a new file; kubectl reads it");
    let (code, out, err) = vigil(&[
        "kubeconfig",
        "prod",
        "--server",
        &server,
        "--ca",
        ca,
        "--home",
        &home_arg,
        "--output",
        &file_arg,
    ]);
    assert_eq!(code, 0, "{out}{err}");
    let config = view(&file);
    assert_eq!(config["current-context"], "vigil-prod");
    let cluster = &named(&config, "clusters", "vigil-prod")["cluster"];
    assert_eq!(cluster["server"], format!("{server}/clusters/prod"));
    use base64::Engine as _;
    let ca_data = base64::engine::general_purpose::STANDARD
        .decode(cluster["certificate-authority-data"].as_str().unwrap())
        .unwrap();
    assert_eq!(ca_data, std::fs::read(ca).unwrap());
    let exec = &named(&config, "users", "vigil-prod")["user"]["exec"];
    assert_eq!(exec["apiVersion"], "client.authentication.k8s.io/v1");
    assert_eq!(
        Path::new(exec["command"].as_str().unwrap())
            .canonicalize()
            .unwrap(),
        bin("vigil").canonicalize().unwrap()
    );
    assert_eq!(
        exec["args"],
        serde_json::json!(["kube-credential", "--home", home_arg])
    );
    assert_eq!(exec["interactiveMode"], "Never");
    let context = &named(&config, "contexts", "vigil-prod")["context"];
    assert_eq!(context["cluster"], "vigil-prod");
    assert_eq!(context["user"], "vigil-prod");

    println!("phase 2: the plugin hands out the kept token of a person, with its expiry");
    let token = id_token("alice");
    keep(&home, &token);
    let (code, out, err) = vigil(&["kube-credential", "--home", &home_arg]);
    assert_eq!(code, 0, "{err}");
    let credential: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(credential["apiVersion"], "client.authentication.k8s.io/v1");
    assert_eq!(credential["kind"], "ExecCredential");
    assert_eq!(credential["status"]["token"], token.as_str());
    // RFC 3339 in UTC, to the second, as client-go parses it
    let (_, expected, _) = run(Command::new("date").args([
        "-u",
        "-d",
        &format!("@{}", exp_of(&token)),
        "+%Y-%m-%dT%H:%M:%SZ",
    ]));
    assert_eq!(credential["status"]["expirationTimestamp"], expected.trim());

    let real_kubectl = kubectl_runs_v1_plugins();
    if real_kubectl {
        println!("phase 3: kubectl runs the plugin, takes its credential and dials the server");
        let (code, _, err) = kubectl(
            &file,
            &["--request-timeout", "5s", "get", "--raw", "/version"],
        );
        assert_ne!(code, 0);
        assert!(err.contains("refused"), "{err}");
        assert!(!err.contains("getting credentials"), "{err}");
    } else {
        println!("phase 3 skipped: this kubectl predates the exec credential API v1 (1.22)");
    }

    println!("phase 4: an expired kept token is refused, never handed out");
    keep(&home, &expired_token());
    let (code, out, err) = vigil(&["kube-credential", "--home", &home_arg]);
    assert_ne!(code, 0);
    assert_eq!(out, "", "a stale token must not be printed");
    assert!(err.contains("run vigil login"), "{err}");
    if real_kubectl {
        let (code, _, err) = kubectl(
            &file,
            &["--request-timeout", "5s", "get", "--raw", "/version"],
        );
        assert_ne!(code, 0);
        assert!(err.contains("getting credentials"), "{err}");
        assert!(err.contains("run vigil login"), "{err}");
    }
    std::fs::remove_file(home.join("token")).unwrap();
    let (code, out, err) = vigil(&["kube-credential", "--home", &home_arg]);
    assert_ne!(code, 0);
    assert_eq!(out, "");
    assert!(err.contains("run vigil login"), "{err}");
}

#[test]
fn t11_an_agents_static_token_merges_into_an_existing_kubeconfig() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let token = rt.block_on(agent_token());
    let dir = tempfile::tempdir().unwrap();
    let token_file = dir.path().join("agent.token");
    std::fs::write(&token_file, &token).unwrap();
    let admin = Path::new(env().get("VIGIL_DEV_KUBE_ADMIN_KUBECONFIG"));

    println!("phase 1: the dev cluster's admin kubeconfig, as JSON, gets the gateway's entries");
    let (code, json, err) = kubectl(
        admin,
        &["config", "view", "--raw", "--flatten", "-o", "json"],
    );
    assert_eq!(code, 0, "{err}");
    let file = dir.path().join("config.json");
    std::fs::write(&file, &json).unwrap();
    let server = format!("https://127.0.0.1:{}", free_port());
    let (code, out, err) = vigil(&[
        "kubeconfig",
        "ci",
        "--server",
        &server,
        "--static-token",
        "--token-file",
        &token_file.display().to_string(),
        "--output",
        &file.display().to_string(),
    ]);
    assert_eq!(code, 0, "{out}{err}");
    let config = view(&file);
    assert_eq!(
        config["current-context"], "vigil-dev",
        "the user's context stays"
    );
    assert_eq!(
        named(&config, "users", "vigil-ci")["user"]["token"],
        token.as_str()
    );
    assert_eq!(
        named(&config, "clusters", "vigil-ci")["cluster"]["server"],
        format!("{server}/clusters/ci")
    );
    let before: Value = serde_json::from_str(&json).unwrap();
    for list in ["clusters", "users", "contexts"] {
        let others: Vec<&Value> = config[list]
            .as_array()
            .unwrap()
            .iter()
            .filter(|e| e["name"] != "vigil-ci")
            .collect();
        let kept: Vec<&Value> = before[list].as_array().unwrap().iter().collect();
        assert_eq!(
            others, kept,
            "{list}: the entries that were there are kept as they were"
        );
    }

    println!("phase 2: the entries that were there still reach the real API server");
    let (code, out, err) = kubectl(
        &file,
        &["--request-timeout", "10s", "get", "--raw", "/version"],
    );
    assert_eq!(code, 0, "{err}");
    let version: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(version["gitVersion"], env().get("VIGIL_DEV_KUBE_VERSION"));

    println!("phase 3: writing it again replaces the gateway's entries, adds none");
    let (code, _, err) = vigil(&[
        "kubeconfig",
        "ci",
        "--server",
        &server,
        "--static-token",
        "--token-file",
        &token_file.display().to_string(),
        "--output",
        &file.display().to_string(),
    ]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(view(&file), config);

    println!("phase 4: a YAML kubeconfig is refused and left as it was");
    let yaml = dir.path().join("config");
    std::fs::copy(admin, &yaml).unwrap();
    let original = std::fs::read(&yaml).unwrap();
    let (code, _, err) = vigil(&[
        "kubeconfig",
        "ci",
        "--server",
        &server,
        "--static-token",
        "--token-file",
        &token_file.display().to_string(),
        "--output",
        &yaml.display().to_string(),
    ]);
    assert_ne!(code, 0);
    assert!(err.contains("KUBECONFIG"), "{err}");
    assert_eq!(std::fs::read(&yaml).unwrap(), original);

    println!("phase 5: an expired static token is refused");
    std::fs::write(&token_file, expired_token()).unwrap();
    let (code, out, err) = vigil(&[
        "kubeconfig",
        "ci",
        "--server",
        &server,
        "--static-token",
        "--token-file",
        &token_file.display().to_string(),
    ]);
    assert_ne!(code, 0);
    assert_eq!(out, "");
    assert!(err.contains("expired"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t20_a_person_runs_kubectl_through_the_gateway_with_the_plugin() {
    if !kubectl_runs_v1_plugins() {
        println!("skipped: this kubectl predates the exec credential API v1 (1.22)");
        return;
    }
    let g = Gateway::start("").await;
    let dir = tempfile::tempdir().unwrap();
    let home = dir.path().join("vigil-home");
    let file = dir.path().join("kubeconfig.json");
    let server = g.server();
    let listener = server
        .strip_suffix("/clusters/dev")
        .expect("the cluster's URL");

    println!("phase 1: alice logged in; vigil kubeconfig for the gateway's cluster dev");
    let token = id_token("alice");
    keep(&home, &token);
    let (code, out, err) = vigil(&[
        "kubeconfig",
        "dev",
        "--server",
        listener,
        "--ca",
        &g.ca().display().to_string(),
        "--home",
        &home.display().to_string(),
        "--output",
        &file.display().to_string(),
    ]);
    assert_eq!(code, 0, "{out}{err}");
    assert_eq!(
        named(&view(&file), "clusters", "vigil-dev")["cluster"]["server"],
        server
    );

    println!("phase 2: kubectl through the gateway; the API server sees alice");
    let offset = audit_len();
    let out = vigil_chaos::kube::kubectl(&file, &["version", "-o", "json"]).await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let version: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        version["serverVersion"]["gitVersion"],
        env().get("VIGIL_DEV_KUBE_VERSION")
    );
    // `get --raw PATH` drops the server URL's path (client-go's RequestURI): the cluster's
    // prefix is written out.
    let out = vigil_chaos::kube::kubectl(&file, &["get", "--raw", "/clusters/dev/version"]).await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let claims = claims(&token);
    let seen: Vec<Value> = audit_events(offset)
        .into_iter()
        .filter(|e| {
            e["requestURI"]
                .as_str()
                .unwrap_or("")
                .starts_with("/version")
        })
        .filter(|e| e["stage"] == "ResponseComplete")
        .filter(|e| e["impersonatedUser"]["username"] == claims["sub"])
        .collect();
    assert!(
        seen.len() >= 2,
        "not both /version requests as {} in the API server's audit log: {seen:?}",
        claims["sub"]
    );
    for e in &seen {
        assert_eq!(
            e["user"]["username"],
            env().get("VIGIL_DEV_KUBE_GATEWAY_USER"),
            "{e}"
        );
    }

    // And Vigil's own records name her, with the token kind a person's login gives.
    let records = g.node.records().await;
    let requests: Vec<_> = records
        .iter()
        .filter(|r| matches!(r.body.request, Some(Request::Kubernetes(_))))
        .collect();
    assert!(requests.len() >= 2, "{requests:?}");
    for r in &requests {
        let principal = r.body.principal.as_ref().expect("a principal");
        assert_eq!(principal.subject, claims["sub"].as_str().unwrap(), "{r:?}");
    }

    println!("phase 3: the kept token expires: kubectl stops before the gateway");
    keep(&home, &expired_token());
    let offset = audit_len();
    let out = vigil_chaos::kube::kubectl(&file, &["version", "-o", "json"]).await;
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("run vigil login"), "{err}");
    assert!(
        !audit_events(offset)
            .iter()
            .any(|e| e["impersonatedUser"]["username"] == claims["sub"]),
        "nothing reaches the API server as that person"
    );
}
