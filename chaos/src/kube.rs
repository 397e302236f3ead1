//! The Kubernetes gateway in front of the dev API server (deploy/dev/kube.sh): a node whose
//! `[kubernetes]` section reaches it as cluster `dev`, kubectl through it with a Vigil token,
//! and the API server's own audit log (ground truth).

use crate::{env, NodeFiles, NodeOptions, TestNode};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use vigil_proto::record::{Kind, KubeRequest, KubeResponse, Record, Request, Response};

/// A node with the cluster `dev` (the dev API server, the gateway's own token), then `policy`.
pub struct Gateway {
    pub node: TestNode,
}

/// The gateway's own credential towards the dev API server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Credential {
    /// The bearer token of user vigil-gateway.
    Token,
    /// The client certificate of user vigil-gateway-cert.
    ClientCert,
}

/// A rule: no `rm` in any exec (also `sh -c 'rm …'`).
pub const NO_RM_IN_PODS: &str = r#"
[[policy.rules]]
id = "no-rm-in-pods"
protocol = "kubernetes"
action = "block"
programs = ["rm"]
reason = "nothing is deleted inside pods"
"#;

/// A rule: `agent-ops` may port-forward to the dev pod default/shell.
pub const OPS_FORWARD_TO_SHELL: &str = r#"
[[policy.rules]]
id = "ops-forward-to-shell"
protocol = "kubernetes"
action = "allow"
principals = { client_ids = ["agent-ops"] }
subresources = ["portforward"]
namespaces = ["default"]
names = ["shell"]
"#;

/// The `[kubernetes]` section for the dev API server as cluster `dev`, then `policy`.
pub fn kube_section(policy: &str) -> String {
    kube_section_as(Credential::Token, policy)
}

/// [`kube_section`] with the gateway presenting `credential`.
pub fn kube_section_as(credential: Credential, policy: &str) -> String {
    let e = env();
    let credential = match credential {
        Credential::Token => format!(
            r#"token = {{ file = "{}" }}"#,
            e.get("VIGIL_DEV_KUBE_GATEWAY_TOKEN_FILE")
        ),
        Credential::ClientCert => format!(
            "client_cert = \"{}\"\nclient_key = {{ file = \"{}\" }}",
            e.get("VIGIL_DEV_KUBE_GATEWAY_CLIENT_CERT"),
            e.get("VIGIL_DEV_KUBE_GATEWAY_CLIENT_KEY")
        ),
    };
    format!(
        r#"
[kubernetes]
listen = "127.0.0.1:0"

[[kubernetes.clusters]]
name = "dev"
server = "{url}"
ca_file = "{ca}"
{credential}
group_prefix = "vigil:"
allow = {{ client_ids = ["agent-ops", "agent-reporting"], groups = ["dba"] }}

{policy}
"#,
        url = e.get("VIGIL_DEV_KUBE_URL"),
        ca = e.get("VIGIL_DEV_KUBE_CA"),
    )
}

impl Gateway {
    pub async fn start(policy: &str) -> Self {
        Self::start_in(policy, None).await
    }

    /// A gateway that presents `credential` to the API server.
    pub async fn start_as(credential: Credential, policy: &str) -> Self {
        Self::start_with(kube_section_as(credential, policy), None).await
    }

    /// A gateway of a cluster of nodes: its `[coordinator]` section.
    pub async fn start_in(policy: &str, coordinator: Option<String>) -> Self {
        Self::start_with(kube_section(policy), coordinator).await
    }

    /// A gateway with this configuration of its own (`section`: the Kubernetes section and more).
    pub async fn start_with(section: String, coordinator: Option<String>) -> Self {
        let opts = NodeOptions {
            protocols: Some(section),
            coordinator,
            ..NodeOptions::default()
        };
        Self {
            node: TestNode::start(opts).await,
        }
    }

    pub fn server(&self) -> String {
        format!(
            "https://{}/clusters/dev",
            self.node
                .node
                .addr("kubernetes")
                .expect("a Kubernetes listener")
        )
    }

    /// The certificate the listener presents (generated into the data directory).
    pub fn ca(&self) -> PathBuf {
        self.node
            .files
            .dir
            .path()
            .join("tls-kubernetes")
            .join("cert.pem")
    }

    /// A kubeconfig for this gateway with a static `token`, in `dir`.
    pub fn kubeconfig(&self, dir: &Path, token: &str) -> PathBuf {
        kubeconfig(dir, &self.server(), &self.ca(), token)
    }
}

/// A kubeconfig for the gateway at `server` (its listener's certificate `ca`) with a static
/// `token`, in `dir`.
pub fn kubeconfig(dir: &Path, server: &str, ca: &Path, token: &str) -> PathBuf {
    let path = dir.join(format!("kubeconfig-{}", crate::random_suffix()));
    let config = serde_json::json!({
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "vigil", "cluster": {
            "server": server,
            "certificate-authority": ca,
        }}],
        "users": [{"name": "vigil", "user": {"token": token}}],
        "contexts": [{"name": "vigil", "context": {"cluster": "vigil", "user": "vigil"}}],
        "current-context": "vigil",
    });
    std::fs::write(&path, config.to_string()).unwrap();
    path
}

/// A gateway in a process of its own (for `kill -9`).
pub struct Spawned {
    pub files: NodeFiles,
    pub node: std::process::Child,
    pub port: u16,
}

impl Spawned {
    pub async fn start(policy: &str) -> Self {
        let (port, admin_port) = (crate::free_port(), crate::free_port());
        let section = kube_section(policy).replacen("127.0.0.1:0", &format!("127.0.0.1:{port}"), 1);
        let opts = NodeOptions {
            protocols: Some(section),
            admin_port,
            ..NodeOptions::default()
        };
        let files = NodeFiles::new(&opts).await;
        let node = crate::spawn_node(&files, admin_port).await;
        Self { files, node, port }
    }

    pub fn kubeconfig(&self, dir: &Path, token: &str) -> PathBuf {
        let server = format!("https://127.0.0.1:{}/clusters/dev", self.port);
        let ca = self
            .files
            .dir
            .path()
            .join("tls-kubernetes")
            .join("cert.pem");
        kubeconfig(dir, &server, &ca, token)
    }
}

/// `kubectl --kubeconfig CONFIG ARGS` (a child process; the node runs on this test's runtime).
pub async fn kubectl(config: &Path, args: &[&str]) -> std::process::Output {
    tokio::process::Command::new("kubectl")
        .arg("--kubeconfig")
        .arg(config)
        .args(["--request-timeout", "30s"])
        .args(args)
        .output()
        .await
        .expect("kubectl runs")
}

/// A namespace of its own holding deployment `web` at one replica, made by the cluster's
/// admin: the namespace's name.
pub async fn namespace_with_web() -> String {
    let ns = format!("vt-{}", crate::random_suffix());
    let out = admin(&["create", "namespace", &ns]).await;
    assert!(out.status.success(), "{out:?}");
    let web = [
        "-n",
        &ns,
        "create",
        "deployment",
        "web",
        "--image=vigil/none",
    ];
    let out = admin(&web).await;
    assert!(out.status.success(), "{out:?}");
    ns
}

/// The replicas of deployment `web` in `ns`, as the API server has them.
pub async fn web_replicas(ns: &str) -> String {
    let get = [
        "-n",
        ns,
        "get",
        "deployment",
        "web",
        "-o",
        "jsonpath={.spec.replicas}",
    ];
    String::from_utf8_lossy(&admin(&get).await.stdout).into_owned()
}

/// `kubectl` as the cluster's admin, directly (set-up and checks, never through Vigil).
pub async fn admin(args: &[&str]) -> std::process::Output {
    kubectl(
        Path::new(env().get("VIGIL_DEV_KUBE_ADMIN_KUBECONFIG")),
        args,
    )
    .await
}

/// The API server's audit events from line `offset` on.
pub fn audit_events(offset: usize) -> Vec<serde_json::Value> {
    let text = std::fs::read_to_string(env().get("VIGIL_DEV_KUBE_AUDIT_LOG")).unwrap_or_default();
    text.lines()
        .skip(offset)
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

pub fn audit_len() -> usize {
    std::fs::read_to_string(env().get("VIGIL_DEV_KUBE_AUDIT_LOG"))
        .map(|t| t.lines().count())
        .unwrap_or(0)
}

/// A token of agent-ops (groups `ops` and `dba`) that expires `secs` from now, and its `exp`.
pub fn expiring_ops_token(secs: i64) -> (String, i64) {
    let exp = crate::now_secs() + secs;
    let mut claims = crate::base_claims();
    claims["sub"] = "agent-ops".into();
    claims["client_id"] = "agent-ops".into();
    claims["groups"] = serde_json::json!(["ops", "dba"]);
    claims["exp"] = exp.into();
    (
        crate::forge(&claims, crate::env().get("VIGIL_OIDC_KID"), None),
        exp,
    )
}

/// Lets the principals of the tests act in the dev cluster: the gateway impersonates them with
/// their groups prefixed `vigil:`, and `vigil:dba` is bound to cluster-admin.
pub async fn grant_dba() {
    if admin(&["get", "clusterrolebinding", "vigil-test-dba"])
        .await
        .status
        .success()
    {
        return;
    }
    let out = admin(&[
        "create",
        "clusterrolebinding",
        "vigil-test-dba",
        "--clusterrole=cluster-admin",
        "--group=vigil:dba",
    ])
    .await;
    assert!(
        out.status.success() || String::from_utf8_lossy(&out.stderr).contains("already exists"),
        "{out:?}"
    );
}

/// The agent `agent-ops` through a fresh gateway with `policy`, and a namespace of its own
/// made by the admin: what most tests start from.
pub struct Agent {
    pub gateway: Gateway,
    /// The kubeconfig of the agent's Vigil token (kept with its directory).
    pub config: PathBuf,
    pub namespace: String,
    _dir: tempfile::TempDir,
}

impl Agent {
    pub async fn start(policy: &str) -> Self {
        grant_dba().await;
        let gateway = Gateway::start(policy).await;
        let dir = tempfile::tempdir().unwrap();
        let ops = crate::token_for("agent-ops", "agent-ops-secret").await;
        let config = gateway.kubeconfig(dir.path(), &ops);
        let namespace = format!("vt-{}", crate::random_suffix());
        let out = admin(&["create", "namespace", &namespace]).await;
        assert!(out.status.success(), "{out:?}");
        Self {
            gateway,
            config,
            namespace,
            _dir: dir,
        }
    }
}

/// What a request is, as both sides name it: verb, resource (or the path of a non-resource
/// URL), namespace, name; empty where there is none.
pub type RequestKey = (String, String, String, String);

/// The key of a Vigil Kubernetes `request` record.
pub fn record_key(record: &vigil_proto::record::Record) -> Option<RequestKey> {
    use vigil_proto::record::{Kind, Request};
    match (&record.body.kind, &record.body.request) {
        (Kind::Request, Some(Request::Kubernetes(k))) => Some((
            k.verb.clone(),
            k.resource.clone().unwrap_or_else(|| k.path.clone()),
            k.namespace.clone().unwrap_or_default(),
            k.name.clone().unwrap_or_default(),
        )),
        _ => None,
    }
}

/// The key of an API server audit event, as [`record_key`] gives it for Vigil's records.
pub fn event_key(e: &serde_json::Value) -> RequestKey {
    let obj = &e["objectRef"];
    let text = |v: &serde_json::Value| v.as_str().unwrap_or_default().to_string();
    let verb = text(&e["verb"]);
    match obj["resource"].as_str() {
        Some(resource) => (
            verb,
            resource.to_string(),
            text(&obj["namespace"]),
            text(&obj["name"]),
        ),
        None => {
            let uri = text(&e["requestURI"]);
            let path = uri.split('?').next().unwrap_or_default().to_string();
            (verb, path, String::new(), String::new())
        }
    }
}

/// Every request the API server completed for the sessions of `records` since `offset` (its
/// audit log's `ResponseComplete` events), each checked to have its Vigil record: the ground
/// truth of a test.
pub fn every_completed_request_recorded(
    offset: usize,
    records: &[vigil_proto::record::Record],
) -> Vec<serde_json::Value> {
    let vigil: std::collections::HashSet<_> = records.iter().filter_map(record_key).collect();
    let seen: Vec<_> = gateway_events(offset, records)
        .into_iter()
        .filter(|e| e["stage"] == "ResponseComplete")
        .collect();
    for e in &seen {
        let key = event_key(e);
        assert!(
            vigil.contains(&key),
            "the API server saw {key:?} without a Vigil record"
        );
    }
    seen
}

/// The API server's audit events from line `offset` on that came from the gateway acting in
/// one of the sessions of `records` (other tests' gateways use the same API server).
pub fn gateway_events(
    offset: usize,
    records: &[vigil_proto::record::Record],
) -> Vec<serde_json::Value> {
    let sessions: std::collections::HashSet<&str> = records
        .iter()
        .filter_map(|r| r.body.session.as_deref())
        .collect();
    let gateway = env().get("VIGIL_DEV_KUBE_GATEWAY_USER");
    audit_events(offset)
        .into_iter()
        .filter(|e| e["user"]["username"] == gateway)
        .filter(|e| {
            e["impersonatedUser"]["extra"]["session-id"][0]
                .as_str()
                .is_some_and(|s| sessions.contains(s))
        })
        .collect()
}

/// A kube-rs client from a kubeconfig file, as `kube::Client::try_default` would make one from
/// `$KUBECONFIG`.
pub async fn client(kubeconfig: &Path) -> ::kube::Client {
    let file =
        ::kube::config::Kubeconfig::read_from(kubeconfig).expect("kube-rs reads the kubeconfig");
    let options = ::kube::config::KubeConfigOptions::default();
    let config = ::kube::Config::from_custom_kubeconfig(file, &options)
        .await
        .expect("kube-rs takes the kubeconfig");
    ::kube::Client::try_from(config).expect("a kube-rs client")
}

/// The Kubernetes request records `pick` chooses, in log order.
pub fn requests(records: &[Record], pick: impl Fn(&KubeRequest) -> bool) -> Vec<&Record> {
    records
        .iter()
        .filter(|r| {
            r.body.kind == Kind::Request
                && matches!(&r.body.request, Some(Request::Kubernetes(k)) if pick(k))
        })
        .collect()
}

/// The records of the same request (session and number) as `request`.
pub fn same_request<'a>(records: &'a [Record], request: &Record) -> Vec<&'a Record> {
    records
        .iter()
        .filter(|r| r.body.session == request.body.session && r.body.stmt == request.body.stmt)
        .collect()
}

/// The response record of `request` and what it says.
pub fn end_of<'a>(
    records: &'a [Record],
    request: &Record,
) -> Option<(&'a Record, &'a KubeResponse)> {
    same_request(records, request).into_iter().find_map(|r| {
        match (&r.body.kind, &r.body.response) {
            (Kind::Response, Some(Response::Kubernetes(k))) => Some((r, k)),
            _ => None,
        }
    })
}

/// Waits (up to 10 s) for the response record of `request`: the node's records then, the
/// response record and what it says.
pub async fn wait_for_end(
    node: &TestNode,
    request: &Record,
) -> (Vec<Record>, Record, KubeResponse) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let records = node.records().await;
        if let Some((r, k)) = end_of(&records, request) {
            let (r, k) = (r.clone(), k.clone());
            return (records, r, k);
        }
        assert!(Instant::now() < deadline, "no response record: {request:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The bytes recorded for one stream (`channel`, `direction`) among `records`, in order, each
/// chunk read from the log directory `audit_dir` and proved by its record.
pub fn recorded_bytes(
    records: &[&Record],
    audit_dir: &Path,
    channel: &str,
    direction: &str,
) -> Vec<u8> {
    let mut reader = vigil_cli::recording::ChunkReader::new(Some(audit_dir.to_path_buf()));
    records
        .iter()
        .filter_map(|r| r.body.recording.as_ref())
        .filter(|c| c.channel == channel && c.direction == direction)
        .flat_map(|c| reader.read(c).expect("the chunk verifies"))
        .collect()
}
