//! Real coordinator clusters for the scenarios: `vigil-coordinator` child processes on loopback,
//! each with its own data directory and its HTTP endpoints (`/metrics`, `/readyz`), which a test
//! can kill (SIGKILL), pause (SIGSTOP), resume and restart; in plaintext, or with TLS (mutual
//! between members) from certificates made by `deploy/coordinator-tls.sh`.

use crate::{bin, env, free_port, repo_root};
use std::path::PathBuf;
use std::process::{Child, Command};
use std::time::Duration;
use tempfile::TempDir;
use vigil_coordinator::client::{Client, Credential};
use vigil_coordinator::tls::ClientTls;
use vigil_proto::coordinator as pb;

pub struct Member {
    pub id: u64,
    pub addr: String,
    /// `host:port` of `/metrics`, `/healthz` and `/readyz`.
    pub metrics: String,
    config: PathBuf,
    /// Its stdout (the log) and stderr.
    log: PathBuf,
    child: Option<Child>,
}

impl Member {
    /// The member's log (its stdout and stderr).
    pub fn log(&self) -> &std::path::Path {
        &self.log
    }
}

pub struct Cluster {
    pub dir: TempDir,
    pub token: String,
    pub members: Vec<Member>,
    /// With TLS: the directory of `ca.pem` and `member-N.pem`/`.key`.
    pub tls: Option<PathBuf>,
}

impl Cluster {
    /// Starts `n` members and forms a cluster: `init` on the first, then `add` for the rest.
    /// Members snapshot every 200 entries, so that tests go through snapshots and purges.
    pub async fn start(n: u64) -> Self {
        Self::start_with(n, 200).await
    }

    /// [`Cluster::start`] with members that snapshot every `snapshot_after` entries.
    pub async fn start_with(n: u64, snapshot_after: u64) -> Self {
        Self::start_opts(n, snapshot_after, false, 3 * 24 * 3600).await
    }

    /// [`Cluster::start`] with members that forget settled requests `retention_secs` after they
    /// settled.
    pub async fn start_with_retention(n: u64, retention_secs: u64) -> Self {
        Self::start_opts(n, 200, false, retention_secs).await
    }

    /// [`Cluster::start`] with TLS on every member's gRPC port: mutual between members, and
    /// every client here verifies the members against the cluster's CA.
    pub async fn start_tls(n: u64) -> Self {
        Self::start_opts(n, 200, true, 3 * 24 * 3600).await
    }

    async fn start_opts(n: u64, snapshot_after: u64, tls: bool, retention_secs: u64) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let tls = tls.then(|| {
            let tls_dir = dir.path().join("tls");
            let names: Vec<String> = (1..=n)
                .map(|id| format!("member-{id}=IP:127.0.0.1,DNS:localhost"))
                .collect();
            make_certificates(&tls_dir, &names);
            tls_dir
        });
        let token = format!("cluster-{}", crate::random_suffix());
        let e = env();
        let token_file = dir.path().join("cluster-token");
        std::fs::write(&token_file, format!("{token}\n")).unwrap();
        let mut members = Vec::new();
        for id in 1..=n {
            let addr = format!("127.0.0.1:{}", free_port());
            let metrics = format!("127.0.0.1:{}", free_port());
            let tls_section = match &tls {
                Some(d) => format!(
                    "\n[member.tls]\ncert_file = \"{0}/member-{id}.pem\"\nkey_file = \"{0}/member-{id}.key\"\nca_file = \"{0}/ca.pem\"\n",
                    d.display()
                ),
                None => String::new(),
            };
            let config = dir.path().join(format!("member-{id}.toml"));
            std::fs::write(
                &config,
                format!(
                    r#"[member]
id = {id}
listen = "{addr}"
data_dir = "{data}"
cluster_token = {{ file = "{token_file}" }}
heartbeat_ms = 50
election_timeout_min_ms = 300
election_timeout_max_ms = 600
snapshot_after = {snapshot_after}
retention_secs = {retention_secs}
metrics_listen = "{metrics}"
{tls_section}
[identity]
issuer = "{issuer}"
audiences = ["vigil-cli", "vigil-console"]
leeway_secs = 5

[log]
level = "warn"
"#,
                    data = dir.path().join(format!("member-{id}")).display(),
                    token_file = token_file.display(),
                    issuer = e.get("VIGIL_OIDC_ISSUER"),
                ),
            )
            .unwrap();
            members.push(Member {
                id,
                log: dir.path().join(format!("member-{id}.log")),
                addr,
                metrics,
                config,
                child: None,
            });
        }
        let mut cluster = Self {
            dir,
            token,
            members,
            tls,
        };
        for id in 1..=n {
            cluster.spawn(id);
        }
        for id in 1..=n {
            cluster.wait_up(id).await;
        }
        cluster
            .client_for(&[1])
            .init(pb::InitRequest {})
            .await
            .expect("cluster init");
        for id in 2..=n {
            let addr = cluster.member(id).addr.clone();
            cluster
                .client()
                .add_member(pb::Member { id, address: addr })
                .await
                .expect("add member");
        }
        cluster
    }

    pub fn member(&self, id: u64) -> &Member {
        &self.members[(id - 1) as usize]
    }

    fn member_mut(&mut self, id: u64) -> &mut Member {
        &mut self.members[(id - 1) as usize]
    }

    pub fn endpoints(&self) -> Vec<String> {
        self.members.iter().map(|m| m.addr.clone()).collect()
    }

    /// The cluster's CA certificate, with TLS.
    pub fn ca_file(&self) -> Option<PathBuf> {
        self.tls.as_ref().map(|d| d.join("ca.pem"))
    }

    /// A client of `endpoints` presenting `credential`, over TLS when the cluster has it.
    fn client_of(&self, endpoints: Vec<String>, credential: Credential) -> Client {
        let client = Client::new(endpoints, credential)
            .unwrap()
            .retry_for(Duration::from_secs(15));
        match self.ca_file() {
            Some(ca) => client.tls(ClientTls::verify_with(&ca).expect("the cluster's CA")),
            None => client,
        }
    }

    /// A node-side client (cluster token) over every member.
    pub fn client(&self) -> Client {
        self.client_of(
            self.endpoints(),
            Credential::Cluster(self.token.clone().into()),
        )
    }

    /// A client that only talks to the given members.
    pub fn client_for(&self, ids: &[u64]) -> Client {
        let endpoints = ids.iter().map(|&id| self.member(id).addr.clone()).collect();
        self.client_of(endpoints, Credential::Cluster(self.token.clone().into()))
    }

    /// An operator's client (an OIDC token) over every member.
    pub fn operator(&self, token: &str) -> Client {
        self.client_of(self.endpoints(), Credential::Bearer(token.to_string()))
    }

    /// The `vigil` options that reach this cluster (`--coordinator`, and `--ca` with TLS).
    pub fn cli_args(&self) -> Vec<String> {
        let mut args = vec!["--coordinator".to_string(), self.endpoints().join(",")];
        if let Some(ca) = self.ca_file() {
            args.extend(["--ca".to_string(), ca.display().to_string()]);
        }
        args
    }

    /// The `[coordinator]` section of a gateway node using this cluster.
    pub fn node_section(&self) -> String {
        let mut section = format!(
            "[coordinator]\nendpoints = [{}]\ncluster_token = {{ file = \"{}\" }}\ntimeout_secs = 15\n",
            self.endpoints()
                .iter()
                .map(|e| format!("\"{e}\""))
                .collect::<Vec<_>>()
                .join(", "),
            self.dir.path().join("cluster-token").display()
        );
        if let Some(ca) = self.ca_file() {
            section += &format!("ca_file = \"{}\"\n", ca.display());
        }
        section
    }

    /// `GET path` on member `id`'s HTTP endpoints: (status code, body).
    pub async fn http_get(&self, id: u64, path: &str) -> (u16, String) {
        let url = format!("http://{}{path}", self.member(id).metrics);
        match reqwest::get(&url).await {
            Ok(r) => (r.status().as_u16(), r.text().await.unwrap_or_default()),
            Err(e) => (0, e.to_string()),
        }
    }

    pub fn spawn(&mut self, id: u64) {
        let m = self.member_mut(id);
        assert!(m.child.is_none(), "member {id} runs already");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&m.log)
            .unwrap();
        let child = Command::new(bin("vigil-coordinator"))
            .arg("--config")
            .arg(&m.config)
            // A file, not a terminal: no colour codes between a field's name and its value.
            .env("NO_COLOR", "1")
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("vigil-coordinator starts");
        m.child = Some(child);
    }

    /// Waits until the member answers (it may not know a leader yet).
    pub async fn wait_up(&self, id: u64) {
        let client = self.client_for(&[id]).retry_for(Duration::from_millis(200));
        for _ in 0..100 {
            if client.status(pb::StatusRequest {}).await.is_ok() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!(
            "member {id} did not come up; its log:\n{}",
            std::fs::read_to_string(&self.member(id).log).unwrap_or_default()
        );
    }

    /// SIGKILL.
    pub fn kill(&mut self, id: u64) {
        if let Some(mut child) = self.member_mut(id).child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    pub fn signal(&self, id: u64, signal: &str) {
        let pid = self
            .member(id)
            .child
            .as_ref()
            .expect("member runs")
            .id()
            .to_string();
        let ok = Command::new("kill")
            .args([signal, &pid])
            .status()
            .expect("kill")
            .success();
        assert!(ok, "kill {signal} {pid}");
    }

    /// The leader as the live members see it, once they agree on one.
    pub async fn leader(&self, among: &[u64]) -> u64 {
        for _ in 0..200 {
            let mut seen = Vec::new();
            for &id in among {
                let client = self.client_for(&[id]).retry_for(Duration::from_millis(100));
                if let Ok(s) = client.status(pb::StatusRequest {}).await {
                    seen.push(s.leader);
                }
            }
            if seen.len() == among.len()
                && seen[0] != 0
                && among.contains(&seen[0])
                && seen.iter().all(|&l| l == seen[0])
            {
                return seen[0];
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("members {among:?} did not agree on a leader");
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for m in &mut self.members {
            if let Some(mut child) = m.child.take() {
                let _ = Command::new("kill")
                    .args(["-CONT", &child.id().to_string()])
                    .status();
                let _ = child.kill();
                let _ = child.wait();
            }
        }
    }
}

/// Runs `deploy/coordinator-tls.sh DIR NAME=SANS…`: a CA in `dir` (kept when present) and a
/// certificate and key per name.
pub fn make_certificates(dir: &std::path::Path, names: &[String]) {
    let status = Command::new(repo_root().join("deploy/coordinator-tls.sh"))
        .arg(dir)
        .args(names)
        .status()
        .expect("run deploy/coordinator-tls.sh");
    assert!(status.success(), "deploy/coordinator-tls.sh failed");
}
