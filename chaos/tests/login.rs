//! `vigil login` for people, against the dev OIDC provider (deploy/dev/servers.sh): the
//! authorization code flow with PKCE through a browser (a stand-in that logs in at the
//! provider's own pages and follows its redirects, deploy/dev/oidc/browser.mjs, launched the
//! way a real one is, through $BROWSER), and the device authorization grant. Then stock
//! OpenSSH logs in to the host as that person with the certificate the login fetched.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use tokio::io::{AsyncBufReadExt, BufReader};
use vigil_chaos::ssh::Gateway;
use vigil_chaos::{bin, env, eventually, free_port, of_kind, vigil};
use vigil_proto::record::Kind;

fn browser_script() -> PathBuf {
    Path::new(env().get("VIGIL_OIDC_DIR")).join("browser.mjs")
}

/// `$BROWSER` for a person called `user` at the dev provider.
fn browser(user: &str) -> String {
    format!("node {} --user {user}", browser_script().display())
}

/// The claims of a JWT, unverified (what the test compares).
fn claims(token: &str) -> serde_json::Value {
    use base64::Engine as _;
    let payload = token.split('.').nth(1).expect("a JWT");
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload)
        .unwrap();
    serde_json::from_slice(&bytes).unwrap()
}

/// `vigil login ARGS` against the gateway, with `$BROWSER` set; exit code and output.
async fn login(g: &Gateway, home: &Path, args: &[&str], browser: &str) -> (i32, String) {
    let out = tokio::process::Command::new(bin("vigil"))
        .arg("login")
        .args(args)
        .args(g.cli_args(home))
        .env("BROWSER", browser)
        .output()
        .await
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr),
    )
}

/// The token `vigil login` kept (through `vigil token`).
fn kept_token(home: &Path) -> String {
    let (code, out) = vigil(&["token", "--home", &home.display().to_string()]);
    assert_eq!(code, 0, "{out}");
    out.trim().to_string()
}

/// Stock ssh through the config `vigil ssh-config` wrote from the kept token; its stdout.
async fn ssh_as_kept_login(g: &Gateway, home: &Path, command: &str) -> String {
    let (code, config) = g.vigil_cli(home, &["ssh-config"]);
    assert_eq!(code, 0, "{config}");
    assert!(config.contains("Host web"), "{config}");
    let file = home.join("ssh_config");
    std::fs::write(&file, &config).unwrap();
    let out = tokio::process::Command::new("ssh")
        .arg("-F")
        .arg(&file)
        .args(["-o", "BatchMode=yes", "web", command])
        .output()
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_person_logs_in_through_a_browser_and_stock_ssh_runs_as_them() {
    let g = Gateway::start("").await;
    let home = tempfile::tempdir().unwrap();
    let (code, out) = login(&g, home.path(), &[], &browser("alice")).await;
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("logged in as alice"), "{out}");
    assert!(out.contains("certificate "), "{out}");

    // The kept token: alice's ID token for the CLI's client, private to its owner.
    let token_file = home.path().join("token");
    let mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(&token_file).unwrap().permissions(),
    );
    assert_eq!(mode & 0o777, 0o600);
    let token = kept_token(home.path());
    let c = claims(&token);
    assert_eq!(c["sub"], "alice");
    assert_eq!(c["aud"], "vigil-cli");

    // The certificate names alice, and stock ssh gets in as her.
    let shown = std::process::Command::new("ssh-keygen")
        .arg("-Lf")
        .arg(home.path().join("ssh/id_ed25519-cert.pub"))
        .output()
        .unwrap();
    let shown = String::from_utf8_lossy(&shown.stdout);
    assert!(shown.contains("alice"), "{shown}");
    assert!(shown.contains("vigil-gateway-only@vigil"), "{shown}");
    refused_by_a_host_that_trusts_the_ca(&g, home.path()).await;
    let marker = format!("login-{}", vigil_chaos::random_suffix());
    let out = ssh_as_kept_login(&g, home.path(), &format!("echo {marker}")).await;
    assert_eq!(out.trim(), marker);
    let host_log = std::fs::read_to_string(env().get("VIGIL_DEV_SSH_COMMAND_LOG")).unwrap();
    assert!(host_log.contains(&marker), "the host ran it");

    // On record: the certificate issued to alice, and her session.
    let records = g.node.records().await;
    let issued = of_kind(&records, Kind::Request)
        .into_iter()
        .find(|r| r.body.connection.as_ref().and_then(|c| c.name.as_deref()) == Some("certificate"))
        .expect("the certificate's record");
    assert_eq!(issued.body.principal.as_ref().unwrap().subject, "alice");
    let start = of_kind(&records, Kind::SessionStart);
    assert!(
        start
            .iter()
            .any(|r| r.body.principal.as_ref().map(|p| p.subject.as_str()) == Some("alice")),
        "alice's SSH session is on record"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forged_callback_is_turned_away_and_the_real_one_completes_the_login() {
    let g = Gateway::start("").await;
    let home = tempfile::tempdir().unwrap();
    // No browser: the person opens the printed URL later, after a forged redirect arrived.
    let mut child = tokio::process::Command::new(bin("vigil"))
        .args(["login", "--no-browser"])
        .args(g.cli_args(home.path()))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let url = loop {
        let line = lines.next_line().await.unwrap().expect("the login URL");
        if let Some(u) = line.trim().strip_prefix("http") {
            break format!("http{u}");
        }
    };
    let parsed = reqwest::Url::parse(&url).unwrap();
    let redirect = parsed
        .query_pairs()
        .find(|(k, _)| k == "redirect_uri")
        .map(|(_, v)| v.into_owned())
        .expect("a redirect URI");
    assert!(
        redirect.starts_with("http://127.0.0.1:"),
        "a loopback redirect: {redirect}"
    );
    // Someone else's code, sent to the listener: not this login's state, turned away.
    let forged = reqwest::get(format!("{redirect}?code=stolen&state=guess"))
        .await
        .unwrap();
    assert_eq!(forged.status(), 400);
    let st = tokio::process::Command::new("node")
        .arg(browser_script())
        .args(["--user", "alice", &url])
        .status()
        .await
        .unwrap();
    assert!(st.success());
    let out = child.wait_with_output().await.unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}");
    assert!(stdout.contains("logged in as alice"), "{stdout}");
    assert_eq!(claims(&kept_token(home.path()))["sub"], "alice");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_person_logs_in_with_the_device_code_flow() {
    let g = Gateway::start("").await;
    let home = tempfile::tempdir().unwrap();
    let mut child = tokio::process::Command::new(bin("vigil"))
        .args(["login", "--device"])
        .args(g.cli_args(home.path()))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let mut told = String::new();
    let url = loop {
        let line = lines
            .next_line()
            .await
            .unwrap()
            .expect("the verification URL");
        told += &line;
        if let Some(u) = line.trim().strip_prefix("http") {
            break format!("http{u}");
        }
    };
    assert!(told.contains("enter the code"), "{told}");
    // The person confirms the code on "another device".
    let st = tokio::process::Command::new("node")
        .arg(browser_script())
        .args(["--user", "alice", &url])
        .status()
        .await
        .unwrap();
    assert!(st.success());
    let out = tokio::time::timeout(std::time::Duration::from_secs(60), child.wait_with_output())
        .await
        .expect("the CLI's polling ends once the code is confirmed")
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}");
    assert!(stdout.contains("logged in as alice"), "{stdout}");
    let marker = format!("device-{}", vigil_chaos::random_suffix());
    let ran = ssh_as_kept_login(&g, home.path(), &format!("echo {marker}")).await;
    assert_eq!(ran.trim(), marker);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_kept_token_is_not_handed_out() {
    let home = tempfile::tempdir().unwrap();
    let mut c = vigil_chaos::base_claims();
    c["exp"] = serde_json::json!(vigil_chaos::now_secs() - 60);
    let expired = vigil_chaos::forge(&c, "dev-key-1", None);
    std::fs::write(home.path().join("token"), expired).unwrap();
    let (code, out) = vigil(&["token", "--home", &home.path().display().to_string()]);
    assert_ne!(code, 0);
    assert!(
        out.contains("expired") && out.contains("vigil login"),
        "{out}"
    );
}

/// A host whose sshd trusts Vigil's user CA by mistake (`TrustedUserCAKeys`, alice's
/// certificate principal allowed for root) still does not let the certificate in: sshd refuses
/// the critical option `vigil-gateway-only@vigil` every certificate Vigil issues carries, so
/// nobody gets past the gateway's policy and recording with one (outside review, 2026-12-07).
async fn refused_by_a_host_that_trusts_the_ca(g: &Gateway, home: &std::path::Path) {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let ca = g.keys.path().join("ca");
    let ca_pub = std::fs::read_to_string(ca.with_extension("pub")).unwrap();
    std::fs::write(d.join("ca.pub"), ca_pub).unwrap();
    std::fs::write(d.join("principals"), "alice\n").unwrap();
    vigil_chaos::ssh::keygen(d, "host");
    let port = free_port();
    let log = d.join("sshd.log");
    let config = format!(
        "Port {port}\nListenAddress 127.0.0.1\nHostKey {host}\nTrustedUserCAKeys {d}/ca.pub\n\
         AuthorizedPrincipalsFile {d}/principals\nAuthorizedKeysFile none\nPasswordAuthentication no\n\
         KbdInteractiveAuthentication no\nPermitRootLogin yes\nStrictModes no\nPidFile none\n\
         UsePAM no\nLogLevel VERBOSE\n",
        host = d.join("host").display(),
        d = d.display(),
    );
    std::fs::write(d.join("sshd_config"), config).unwrap();
    let mut sshd = tokio::process::Command::new("/usr/sbin/sshd")
        .args(["-D", "-f"])
        .arg(d.join("sshd_config"))
        .arg("-E")
        .arg(&log)
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    eventually("sshd listens", std::time::Duration::from_secs(10), || {
        std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
    })
    .await;
    let key = home.join("ssh/id_ed25519");
    let out = tokio::process::Command::new("ssh")
        .args(["-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=no"])
        .args([
            "-o",
            "UserKnownHostsFile=/dev/null",
            "-o",
            "IdentitiesOnly=yes",
        ])
        .arg("-i")
        .arg(&key)
        .arg("-o")
        .arg(format!("CertificateFile={}-cert.pub", key.display()))
        .args([
            "-p",
            &port.to_string(),
            "root@127.0.0.1",
            "echo DIRECT-LOGIN",
        ])
        .output()
        .await
        .unwrap();
    let _ = sshd.kill().await;
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        !out.status.success() && !stdout.contains("DIRECT-LOGIN"),
        "{stdout}"
    );
    let log = std::fs::read_to_string(&log).unwrap();
    assert!(
        log.contains("critical option") && log.contains("vigil-gateway-only@vigil"),
        "sshd refused the certificate for its critical option: {log}"
    );
}
