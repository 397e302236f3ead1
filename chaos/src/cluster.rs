//! Real coordinator clusters for the scenarios: `vigil-coordinator` child processes on loopback,
//! each with its own data directory, which a test can kill (SIGKILL), pause (SIGSTOP), resume
//! and restart.

use crate::{bin, env, free_port};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;
use tempfile::TempDir;
use vigil_coordinator::client::{Client, Credential};
use vigil_proto::coordinator as pb;

pub struct Member {
    pub id: u64,
    pub addr: String,
    config: PathBuf,
    log: PathBuf,
    child: Option<Child>,
}

pub struct Cluster {
    pub dir: TempDir,
    pub token: String,
    pub members: Vec<Member>,
}

impl Cluster {
    /// Starts `n` members and forms a cluster: `init` on the first, then `add` for the rest.
    /// Members snapshot every 200 entries, so that tests go through snapshots and purges.
    pub async fn start(n: u64) -> Self {
        Self::start_with(n, 200).await
    }

    /// [`Cluster::start`] with members that snapshot every `snapshot_after` entries.
    pub async fn start_with(n: u64, snapshot_after: u64) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let token = format!("cluster-{}", crate::random_suffix());
        let e = env();
        let token_file = dir.path().join("cluster-token");
        std::fs::write(&token_file, format!("{token}\n")).unwrap();
        let mut members = Vec::new();
        for id in 1..=n {
            let addr = format!("127.0.0.1:{}", free_port());
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

[identity]
issuer = "{issuer}"
audiences = ["vigil-cli"]
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
                config,
                child: None,
            });
        }
        let mut cluster = Self {
            dir,
            token,
            members,
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

    /// A node-side client (cluster token) over every member.
    pub fn client(&self) -> Client {
        Client::new(
            self.endpoints(),
            Credential::Cluster(self.token.clone().into()),
        )
        .unwrap()
        .retry_for(Duration::from_secs(15))
    }

    /// A client that only talks to the given members.
    pub fn client_for(&self, ids: &[u64]) -> Client {
        let endpoints = ids.iter().map(|&id| self.member(id).addr.clone()).collect();
        Client::new(endpoints, Credential::Cluster(self.token.clone().into()))
            .unwrap()
            .retry_for(Duration::from_secs(15))
    }

    /// An operator's client (an OIDC token) over every member.
    pub fn operator(&self, token: &str) -> Client {
        Client::new(self.endpoints(), Credential::Bearer(token.to_string()))
            .unwrap()
            .retry_for(Duration::from_secs(15))
    }

    /// The `[coordinator]` section of a gateway node using this cluster.
    pub fn node_section(&self) -> String {
        format!(
            "[coordinator]\nendpoints = [{}]\ncluster_token = {{ file = \"{}\" }}\ntimeout_secs = 15\n",
            self.endpoints()
                .iter()
                .map(|e| format!("\"{e}\""))
                .collect::<Vec<_>>()
                .join(", "),
            self.dir.path().join("cluster-token").display()
        )
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
            .stdout(Stdio::null())
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
