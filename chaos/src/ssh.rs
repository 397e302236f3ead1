//! The SSH gateway in front of the dev sshd (deploy/dev/servers.sh): a node whose `[ssh]`
//! section reaches it as host `web`, and clients for it (a russh client that logs in with a
//! token as the keyboard-interactive answer; stock OpenSSH with a Vigil certificate).

use crate::{env, vigil, NodeOptions, TestNode};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

/// Keys and a node whose `[ssh]` section reaches the dev sshd as host `web`.
pub struct Gateway {
    pub node: TestNode,
    pub keys: tempfile::TempDir,
}

/// The principal JSON of `agent-ops` (groups `ops`, `dba`), for a certificate's extension.
pub const OPS_PRINCIPAL: &str = r#"{"subject":"agent-ops","client_id":"agent-ops","model":"gpt-5","groups":["ops","dba"],"issuer":"test","token_type":"access_token"}"#;

/// Generates an ed25519 key pair with ssh-keygen.
pub fn keygen(dir: &Path, name: &str) -> PathBuf {
    let path = dir.join(name);
    let st = Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-C", name, "-f"])
        .arg(&path)
        .status()
        .expect("ssh-keygen runs");
    assert!(st.success());
    path
}

/// The `[ssh]` section: user CA `ca`, host `web` (the dev sshd, pinned to `host_key`, logged
/// in to with `login_key`), then `policy`.
pub fn ssh_section(ca: &Path, host_key: &str, login_key: &str, policy: &str) -> String {
    ssh_section_with(ca, host_key, login_key, "", policy)
}

/// [`ssh_section`] with `settings` (keys of `[ssh]`) added.
pub fn ssh_section_with(
    ca: &Path,
    host_key: &str,
    login_key: &str,
    settings: &str,
    policy: &str,
) -> String {
    let e = env();
    format!(
        r#"
[ssh]
listen = "127.0.0.1:0"
user_ca_key = {{ file = "{ca}" }}
{settings}

[[ssh.targets]]
name = "web"
address = "{addr}"
host_keys = ["{host_key}"]
login_key = {{ file = "{key}" }}
logins = ["{login}"]
allow = {{ client_ids = ["agent-ops"], groups = ["dba"] }}

{policy}
"#,
        ca = ca.display(),
        addr = e.get("VIGIL_DEV_SSHD_ADDR"),
        key = login_key,
        login = e.get("VIGIL_DEV_SSH_LOGIN"),
    )
}

/// A user key in `dir` with a certificate from `ca` for the principal of `principal_json`,
/// valid for `validity` (ssh-keygen's -V syntax).
pub fn certificate(
    dir: &Path,
    ca: &Path,
    name: &str,
    principal_json: &str,
    validity: &str,
) -> PathBuf {
    let key = keygen(dir, name);
    let subject: serde_json::Value = serde_json::from_str(principal_json).unwrap();
    let st = Command::new("ssh-keygen")
        .args(["-q", "-s"])
        .arg(ca)
        .args(["-I", "test-cert", "-n"])
        .arg(subject["subject"].as_str().unwrap())
        .args(["-V", validity, "-O", "clear", "-O", "permit-pty"])
        .arg("-O")
        .arg(format!("extension:principal@vigil={principal_json}"))
        .arg(key.with_extension("pub"))
        .status()
        .unwrap();
    assert!(st.success(), "ssh-keygen -s");
    key
}

/// An OpenSSH client config for host alias `web` through a gateway on `port` as `user`, with
/// `key` and its certificate (for scp, sftp and rsync, which take no -i of their own in every
/// version).
pub fn client_config(key: &Path, port: u16, user: &str) -> PathBuf {
    let path = key.with_extension("config");
    let cert = format!("{}-cert.pub", key.display());
    std::fs::write(
        &path,
        format!(
            "Host web\n  HostName 127.0.0.1\n  Port {port}\n  User {user}\n  IdentityFile {}\n  CertificateFile {cert}\n  IdentitiesOnly yes\n  BatchMode yes\n  StrictHostKeyChecking no\n  UserKnownHostsFile /dev/null\n  LogLevel ERROR\n",
            key.display()
        ),
    )
    .unwrap();
    path
}

impl Gateway {
    /// A gateway with `policy` (TOML `[[policy.rules]]`) in front of the dev sshd.
    pub async fn start(policy: &str) -> Self {
        Self::start_with(
            env().get("VIGIL_DEV_SSHD_HOST_KEY"),
            env().get("VIGIL_DEV_SSH_GATEWAY_KEY"),
            policy,
        )
        .await
    }

    /// A gateway that pins `host_key` and logs in with `login_key`.
    pub async fn start_with(host_key: &str, login_key: &str, policy: &str) -> Self {
        Self::start_full(host_key, login_key, policy, None, "", "").await
    }

    /// A gateway with `settings` of its `[ssh]` section besides the test's own (and the
    /// `[coordinator]` section of a cluster, if given).
    pub async fn start_settings(policy: &str, settings: &str, coordinator: Option<String>) -> Self {
        let e = env();
        let (host_key, login_key) = (
            e.get("VIGIL_DEV_SSHD_HOST_KEY"),
            e.get("VIGIL_DEV_SSH_GATEWAY_KEY"),
        );
        Self::start_full(host_key, login_key, policy, coordinator, settings, "").await
    }

    /// A gateway with `more` of the node's configuration (sections of its own).
    pub async fn start_more(policy: &str, more: &str) -> Self {
        let e = env();
        let (host_key, login_key) = (
            e.get("VIGIL_DEV_SSHD_HOST_KEY"),
            e.get("VIGIL_DEV_SSH_GATEWAY_KEY"),
        );
        Self::start_full(host_key, login_key, policy, None, "", more).await
    }

    /// A gateway of a cluster: its `[coordinator]` section (`Cluster::node_section`).
    pub async fn start_in(policy: &str, coordinator: String) -> Self {
        let e = env();
        let (host_key, login_key) = (
            e.get("VIGIL_DEV_SSHD_HOST_KEY"),
            e.get("VIGIL_DEV_SSH_GATEWAY_KEY"),
        );
        Self::start_full(host_key, login_key, policy, Some(coordinator), "", "").await
    }

    async fn start_full(
        host_key: &str,
        login_key: &str,
        policy: &str,
        coordinator: Option<String>,
        settings: &str,
        more: &str,
    ) -> Self {
        let keys = tempfile::tempdir().unwrap();
        let ca = keygen(keys.path(), "ca");
        let section = ssh_section_with(&ca, host_key, login_key, settings, policy);
        let opts = NodeOptions {
            protocols: Some(format!(
                "{section}\n[api]\nlisten = \"127.0.0.1:0\"\n[api.login]\nclient_id = \"vigil-cli\"\n{more}"
            )),
            coordinator,
            ..NodeOptions::default()
        };
        let node = TestNode::start(opts).await;
        Self { node, keys }
    }

    pub fn port(&self) -> u16 {
        self.node.node.addr("ssh").expect("an SSH listener").port()
    }

    /// `LOGIN+web`, with the dev sshd's login.
    pub fn user(&self) -> String {
        format!("{}+web", env().get("VIGIL_DEV_SSH_LOGIN"))
    }

    /// A user key with a certificate from `ca` for the principal of `principal_json`, valid
    /// for `validity` (ssh-keygen's -V syntax).
    pub fn certificate(
        &self,
        ca: &Path,
        name: &str,
        principal_json: &str,
        validity: &str,
    ) -> PathBuf {
        certificate(self.keys.path(), ca, name, principal_json, validity)
    }

    /// An OpenSSH client config for host alias `web` through this gateway with `key` and its
    /// certificate (for scp, sftp and rsync, which take no -i of their own in every version).
    pub fn client_config(&self, key: &Path) -> PathBuf {
        client_config(key, self.port(), &self.user())
    }

    /// Stock OpenSSH, BatchMode, with `key` and its certificate (a child process: the node
    /// runs on this test's runtime).
    pub async fn ssh(&self, key: &Path, args: &[&str]) -> std::process::Output {
        self.ssh_command(key, args)
            .output()
            .await
            .expect("ssh runs")
    }

    /// The `ssh` command of [`Gateway::ssh`], to be started by the caller.
    pub fn ssh_command(&self, key: &Path, args: &[&str]) -> tokio::process::Command {
        let mut ssh = tokio::process::Command::new("ssh");
        ssh.args(["-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=no"])
            .args(["-o", "UserKnownHostsFile=/dev/null", "-o", "LogLevel=ERROR"])
            .args(["-o", "IdentitiesOnly=yes", "-i"])
            .arg(key)
            .arg("-o")
            .arg(format!(
                "CertificateFile={}",
                key.with_extension("pub")
                    .display()
                    .to_string()
                    .replace(".pub", "-cert.pub")
            ))
            .args(["-p", &self.port().to_string()])
            .arg(format!("{}@127.0.0.1", self.user()))
            .args(args);
        ssh
    }

    /// `vigil ARGS --gateway URL --gateway-ca CERT --home HOME` (a child process; the node runs
    /// on this test's other worker).
    pub fn vigil_cli(&self, home: &Path, args: &[&str]) -> (i32, String) {
        let mut all: Vec<String> = args.iter().map(|a| a.to_string()).collect();
        all.extend(self.cli_args(home));
        let all: Vec<&str> = all.iter().map(String::as_str).collect();
        vigil(&all)
    }

    /// `--gateway URL --gateway-ca CERT --home HOME`: what a `vigil` command needs to reach
    /// this gateway's API.
    pub fn cli_args(&self, home: &Path) -> Vec<String> {
        let url = format!(
            "https://{}",
            self.node.node.api_addr.expect("an API listener")
        );
        let ca = self.node.files.dir.path().join("tls-api").join("cert.pem");
        vec![
            "--gateway".into(),
            url,
            "--gateway-ca".into(),
            ca.display().to_string(),
            "--home".into(),
            home.display().to_string(),
        ]
    }
}

/// A russh client that logs in with the token as the keyboard-interactive answer.
pub struct TokenClient;

impl russh::client::Handler for TokenClient {
    type Error = russh::Error;

    async fn check_server_key(
        &mut self,
        _key: &russh::keys::PublicKeyOrCertificate,
    ) -> Result<bool, Self::Error> {
        Ok(true)
    }
}

/// Logs in as `user` with `token`; `None` when the gateway refuses.
pub async fn token_login(
    port: u16,
    user: &str,
    token: &str,
) -> Option<russh::client::Handle<TokenClient>> {
    let config = Arc::new(russh::client::Config::default());
    let mut h = russh::client::connect(config, ("127.0.0.1", port), TokenClient)
        .await
        .expect("connects");
    let r = h
        .authenticate_keyboard_interactive_start(user, None)
        .await
        .unwrap();
    let russh::client::KeyboardInteractiveAuthResponse::InfoRequest { prompts, .. } = r else {
        panic!("expected a prompt, got {r:?}");
    };
    assert_eq!(prompts.len(), 1);
    let r = h
        .authenticate_keyboard_interactive_respond(vec![token.to_string()])
        .await
        .unwrap();
    match r {
        russh::client::KeyboardInteractiveAuthResponse::Success => Some(h),
        _ => None,
    }
}

/// Runs `command` on a new channel; returns stdout, stderr and the exit status.
pub async fn exec(
    h: &russh::client::Handle<TokenClient>,
    command: &str,
) -> (Vec<u8>, Vec<u8>, Option<u32>) {
    let mut ch = h.channel_open_session().await.unwrap();
    ch.exec(true, command).await.unwrap();
    outcome(&mut ch).await
}

/// What a channel gives until it closes: stdout, stderr, exit status.
pub async fn outcome(
    ch: &mut russh::Channel<russh::client::Msg>,
) -> (Vec<u8>, Vec<u8>, Option<u32>) {
    let (mut out, mut err, mut status) = (Vec::new(), Vec::new(), None);
    while let Some(msg) = ch.wait().await {
        match msg {
            russh::ChannelMsg::Data { data } => out.extend_from_slice(&data),
            russh::ChannelMsg::ExtendedData { data, .. } => err.extend_from_slice(&data),
            russh::ChannelMsg::ExitStatus { exit_status } => status = Some(exit_status),
            russh::ChannelMsg::Close => break,
            _ => {}
        }
    }
    (out, err, status)
}
