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
        .args(["-O", "critical:vigil-gateway-only@vigil"])
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
        self.node.cli_args(home)
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

/// A raw SFTP client (version 3) on a channel of a russh connection: it sends the packets a
/// test builds, in the writes it chooses (a stock client never pipelines a request on a
/// handle before the host returned it), and reads the replies.
pub struct SftpChannel {
    ch: russh::Channel<russh::client::Msg>,
    buf: Vec<u8>,
}

/// SFTP packet types and flags the tests use (draft-ietf-secsh-filexfer-02).
pub mod fxp {
    pub const OPEN: u8 = 3;
    pub const CLOSE: u8 = 4;
    pub const FSETSTAT: u8 = 10;
    pub const STATUS: u8 = 101;
    pub const HANDLE: u8 = 102;
    pub const READ: u32 = 0x01;
    pub const WRITE: u32 = 0x02;
    pub const CREAT: u32 = 0x08;
    pub const ATTR_PERMISSIONS: u32 = 0x04;
    pub const FX_OK: u32 = 0;
    pub const FX_PERMISSION_DENIED: u32 = 3;
    pub const FX_FAILURE: u32 = 4;
}

/// Builds one SFTP packet: its type, then fields as they go on the wire.
pub struct SftpPacket(Vec<u8>);

impl SftpPacket {
    pub fn new(packet_type: u8) -> Self {
        Self(vec![packet_type])
    }
    pub fn u32(mut self, v: u32) -> Self {
        self.0.extend_from_slice(&v.to_be_bytes());
        self
    }
    pub fn string(mut self, s: &[u8]) -> Self {
        self = self.u32(s.len() as u32);
        self.0.extend_from_slice(s);
        self
    }
    /// The packet with its length prefix.
    pub fn done(self) -> Vec<u8> {
        let mut out = (self.0.len() as u32).to_be_bytes().to_vec();
        out.extend_from_slice(&self.0);
        out
    }
    /// `OPEN(id, path, pflags)` with no attributes.
    pub fn open(id: u32, path: &str, pflags: u32) -> Vec<u8> {
        Self::new(fxp::OPEN)
            .u32(id)
            .string(path.as_bytes())
            .u32(pflags)
            .u32(0)
            .done()
    }
    /// `FSETSTAT(id, handle)` setting the permissions to `mode`.
    pub fn chmod(id: u32, handle: &[u8], mode: u32) -> Vec<u8> {
        Self::new(fxp::FSETSTAT)
            .u32(id)
            .string(handle)
            .u32(fxp::ATTR_PERMISSIONS)
            .u32(mode)
            .done()
    }
    pub fn close(id: u32, handle: &[u8]) -> Vec<u8> {
        Self::new(fxp::CLOSE).u32(id).string(handle).done()
    }
}

/// A reply: its type, its request id and the rest of its payload.
#[derive(Debug)]
pub struct SftpReply {
    pub packet_type: u8,
    pub id: u32,
    pub rest: Vec<u8>,
}

impl SftpReply {
    /// A HANDLE reply's handle.
    pub fn handle(&self) -> Vec<u8> {
        assert_eq!(self.packet_type, fxp::HANDLE, "{self:?}");
        self.rest[4..].to_vec()
    }
    /// A STATUS reply's code.
    pub fn status(&self) -> u32 {
        assert_eq!(self.packet_type, fxp::STATUS, "{self:?}");
        u32::from_be_bytes(self.rest[..4].try_into().unwrap())
    }
}

impl SftpChannel {
    /// The `sftp` subsystem on a new channel, past INIT and VERSION.
    pub async fn start(h: &russh::client::Handle<TokenClient>) -> Self {
        let ch = h.channel_open_session().await.unwrap();
        ch.request_subsystem(true, "sftp").await.unwrap();
        let mut s = Self {
            ch,
            buf: Vec::new(),
        };
        s.send(&SftpPacket::new(1).u32(3).done()).await;
        let version = s.packet().await;
        assert_eq!(version[0], 2, "VERSION");
        s
    }

    /// Sends `bytes` in one data message.
    pub async fn send(&mut self, bytes: &[u8]) {
        self.ch.data(bytes).await.unwrap();
    }

    /// The next `n` replies.
    pub async fn replies(&mut self, n: usize) -> Vec<SftpReply> {
        let mut out = Vec::new();
        for _ in 0..n {
            let p = self.packet().await;
            out.push(SftpReply {
                packet_type: p[0],
                id: u32::from_be_bytes(p[1..5].try_into().unwrap()),
                rest: p[5..].to_vec(),
            });
        }
        out
    }

    /// The reply to `id` among `replies`.
    pub fn reply_to(replies: &[SftpReply], id: u32) -> &SftpReply {
        replies
            .iter()
            .find(|r| r.id == id)
            .unwrap_or_else(|| panic!("no reply to {id}: {replies:?}"))
    }

    /// The next packet's payload (type first).
    async fn packet(&mut self) -> Vec<u8> {
        loop {
            if self.buf.len() >= 4 {
                let len = u32::from_be_bytes(self.buf[..4].try_into().unwrap()) as usize;
                if self.buf.len() >= 4 + len {
                    let p = self.buf[4..4 + len].to_vec();
                    self.buf.drain(..4 + len);
                    return p;
                }
            }
            let msg = tokio::time::timeout(std::time::Duration::from_secs(10), self.ch.wait())
                .await
                .expect("the SFTP channel answers");
            match msg {
                Some(russh::ChannelMsg::Data { data }) => self.buf.extend_from_slice(&data),
                Some(russh::ChannelMsg::Close) | None => panic!("the SFTP channel ended"),
                Some(_) => {}
            }
        }
    }
}
