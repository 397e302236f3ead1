//! The harness of Vigil's end-to-end and fault scenarios.
//!
//! Every scenario runs against real servers started by `deploy/dev/servers.sh start` (a real
//! PostgreSQL 15 with `log_statement=all`, a real OpenID provider) and real gateway nodes, in
//! process or as child processes that can be killed. A missing server is a failure, never a
//! skip. Each test gets its own database, data directory and ports.

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tempfile::TempDir;
use vigil_proto::record::{Kind, PgRequest, Record};

pub mod balancer;
pub mod cluster;
pub mod kafka_tls;
pub mod kube;
pub mod kubelet;
pub mod partition;
pub mod recording;
pub mod saml;
pub mod ssh;
pub mod tamper;
pub mod tmux;
pub mod tokens;
pub mod webdriver;
pub mod wire;

/// The dev servers' coordinates, from `$VIGIL_DEV_DIR/env`.
pub struct DevEnv {
    vars: HashMap<String, String>,
}

impl DevEnv {
    pub fn get(&self, key: &str) -> &str {
        self.vars
            .get(key)
            .unwrap_or_else(|| panic!("{key} missing from the dev env file"))
    }
}

/// Loads the dev env file once; panics with instructions when the servers are not set up.
pub fn env() -> &'static DevEnv {
    static ENV: OnceLock<DevEnv> = OnceLock::new();
    ENV.get_or_init(|| {
        let dir = std::env::var("VIGIL_DEV_DIR").unwrap_or_else(|_| "/tmp/vigil-dev".into());
        let path = Path::new(&dir).join("env");
        let text = std::fs::read_to_string(&path).unwrap_or_else(|e| {
            panic!(
                "cannot read {}: {e}. Start the test servers first: deploy/dev/servers.sh start",
                path.display()
            )
        });
        let vars = text
            .lines()
            .filter_map(|l| l.strip_prefix("export "))
            .filter_map(|l| l.split_once('='))
            .map(|(k, v)| {
                (
                    k.to_string(),
                    // `export K=a\ b` is how the shell's printf %q writes a space.
                    v.trim_matches('\'').trim_matches('"').replace("\\ ", " "),
                )
            })
            .collect();
        DevEnv { vars }
    })
}

/// A path to one of the workspace's binaries: next to this executable, or next to its
/// directory for test executables (target/<profile>/deps).
pub fn bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("the executable has a path");
    let mut dir = exe.parent().expect("executables live in a directory");
    if dir.ends_with("deps") {
        dir = dir.parent().expect("target/<profile>/deps");
    }
    let path = dir.join(name);
    assert!(
        path.exists(),
        "{} not built: run `cargo build --bins` before the tests",
        path.display()
    );
    path
}

/// The repository's root directory (the parent of `chaos/`), for its scripts under `deploy/`.
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("chaos/ is inside the repository")
        .to_path_buf()
}

/// A finished command's stdout and stderr, one after the other (for assertion messages).
pub fn output_text(out: &std::process::Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// A port nothing listens on right now (bound and released).
/// A port nobody on this machine listens on, for a test's node to bind.
///
/// It is drawn below the kernel's ephemeral range (32768–60999 by default), and above the ports
/// of the Compose stack (1xxxx), clear of the dev servers (25xxx), of `deploy/cluster.sh` (27xxx)
/// and of the chaos clusters (28000–32000). A port of the ephemeral range can become the source
/// port of any outgoing connection on the machine in the moment between a node's kill and its
/// restart on the same ports ("Address already in use"); these cannot. No port is handed out
/// twice by one test process.
pub fn free_port() -> u16 {
    static GIVEN: std::sync::Mutex<BTreeSet<u16>> = std::sync::Mutex::new(BTreeSet::new());
    let mut given = GIVEN.lock().unwrap();
    loop {
        let port = rand::random_range(19_000..25_000);
        if !given.contains(&port) && std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            given.insert(port);
            return port;
        }
    }
}

pub fn random_suffix() -> String {
    hex::encode(rand::random::<[u8; 6]>())
}

fn pg_superuser_conn(db: &str) -> String {
    let e = env();
    format!(
        "host={} port={} user={} password={} dbname={db}",
        e.get("VIGIL_PG_HOST"),
        e.get("VIGIL_PG_PORT"),
        e.get("VIGIL_PG_SUPERUSER"),
        e.get("VIGIL_PG_SUPERPASS")
    )
}

/// Connects to the target directly as the superuser (test setup and ground truth only).
pub async fn direct_superuser(db: &str) -> tokio_postgres::Client {
    let (client, conn) = tokio_postgres::connect(&pg_superuser_conn(db), tokio_postgres::NoTls)
        .await
        .expect("the dev PostgreSQL is running (deploy/dev/servers.sh start)");
    tokio::spawn(conn);
    client
}

/// A fresh database owned by the gateway's login, with a small `customers` table.
pub async fn create_database() -> String {
    let name = format!("vt_{}", random_suffix());
    let su = direct_superuser("postgres").await;
    su.batch_execute(&format!(
        "CREATE DATABASE {name} OWNER {}",
        env().get("VIGIL_PG_GATEWAY_USER")
    ))
    .await
    .expect("create the test database");
    let db = direct_superuser(&name).await;
    db.batch_execute(&format!(
        "SET ROLE {};
         CREATE TABLE customers (id int PRIMARY KEY, name text NOT NULL, email text);
         INSERT INTO customers SELECT i, 'customer ' || i, 'c' || i || '@example.com'
           FROM generate_series(1, 50) i;",
        env().get("VIGIL_PG_GATEWAY_USER")
    ))
    .await
    .expect("fill the test database");
    name
}

/// A client-credentials access token from the dev provider.
pub async fn token_for(client_id: &str, secret: &str) -> String {
    let issuer = env().get("VIGIL_OIDC_ISSUER");
    let http = reqwest::Client::new();
    let discovery: serde_json::Value = http
        .get(format!("{issuer}/.well-known/openid-configuration"))
        .send()
        .await
        .expect("the dev OIDC provider is running")
        .json()
        .await
        .expect("discovery JSON");
    let endpoint = discovery["token_endpoint"]
        .as_str()
        .expect("token_endpoint");
    let resp: serde_json::Value = http
        .post(endpoint)
        .basic_auth(client_id, Some(secret))
        .form(&[("grant_type", "client_credentials")])
        .send()
        .await
        .expect("token request")
        .json()
        .await
        .expect("token JSON");
    resp["access_token"]
        .as_str()
        .unwrap_or_else(|| panic!("no access token in {resp}"))
        .to_string()
}

/// The usual agent: `agent-reporting`, model gpt-5, group analysts.
pub async fn agent_token() -> String {
    token_for("agent-reporting", "agent-reporting-secret").await
}

/// An ID token for a person, through the provider's real authorization-code + PKCE flow.
pub fn id_token(user: &str) -> String {
    let e = env();
    let out = std::process::Command::new(e.get("VIGIL_NODE"))
        .arg(Path::new(e.get("VIGIL_OIDC_DIR")).join("id-token.mjs"))
        .args(["--issuer", e.get("VIGIL_OIDC_ISSUER"), "--user", user])
        .output()
        .expect("run id-token.mjs");
    assert!(
        out.status.success(),
        "id-token.mjs failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

pub fn now_secs() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

/// Claims of a valid-looking access token (before overrides).
pub fn base_claims() -> serde_json::Value {
    let now = now_secs();
    serde_json::json!({
        "iss": env().get("VIGIL_OIDC_ISSUER"),
        "sub": "agent-reporting",
        "aud": env().get("VIGIL_OIDC_AUDIENCE"),
        "client_id": "agent-reporting",
        "model": "gpt-5",
        "groups": ["analysts"],
        "iat": now,
        "exp": now + 300,
        "jti": random_suffix(),
    })
}

/// Signs `claims` with the dev provider's real signing key (or another RSA key PEM).
pub fn forge(claims: &serde_json::Value, kid: &str, key_pem: Option<&[u8]>) -> String {
    let pem = match key_pem {
        Some(p) => p.to_vec(),
        None => std::fs::read(env().get("VIGIL_OIDC_KEY")).expect("the dev signing key"),
    };
    let key = jsonwebtoken::EncodingKey::from_rsa_pem(&pem).expect("an RSA PEM key");
    let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::RS256);
    header.kid = Some(kid.to_string());
    header.typ = Some("at+jwt".into());
    jsonwebtoken::encode(&header, claims, &key).expect("sign")
}

/// Knobs of a test node.
#[derive(Clone, Debug)]
pub struct NodeOptions {
    /// More `[node]` keys (`proxy_protocol_from = […]` …).
    pub node_extra: &'static str,
    pub allow_cleartext_token: bool,
    /// Log in to the target with the md5 user instead of the SCRAM one.
    pub md5_target: bool,
    pub max_result_bytes: usize,
    pub max_frame_bytes: usize,
    /// Put the audit log here instead of under the data directory.
    pub audit_dir: Option<PathBuf>,
    pub jwks_refresh_cooldown_secs: u64,
    /// More `[identity]` keys (`session_expiry = "none"` …).
    pub identity_extra: &'static str,
    pub admin_port: u16,
    pub pg_port: u16,
    /// `tls` of the target connection (`disable`, `require`, `verify-full`).
    pub target_tls: &'static str,
    /// More `[postgres]` keys (`startup_timeout_secs = 2` …).
    pub postgres_extra: &'static str,
    /// Connect the `app` connection to this port of the target's host instead of PostgreSQL's
    /// (a `tamper::TamperProxy` in front of it).
    pub target_port: Option<u16>,
    /// Keys for the `app` connection, added after its `allow` line (`read_only = true` …).
    pub connection_extra: &'static str,
    /// TOML appended to the config (a `[policy]` section …).
    pub extra: &'static str,
    /// The `[coordinator]` section; default: the embedded member on an ephemeral port.
    pub coordinator: Option<String>,
    /// Publish the audit stream to this topic of the dev broker.
    pub kafka_topic: Option<String>,
    /// The bootstrap broker of that topic; default: the dev broker.
    pub kafka_brokers: Option<String>,
    /// More `[audit.kafka]` keys.
    pub kafka_extra: String,
    pub checkpoint_interval_secs: u64,
    /// Protocol sections beyond `[postgres]` (`[ssh]` with its targets, `[kubernetes]` with
    /// its clusters, `[api]`), appended to the config.
    pub protocols: Option<String>,
}

impl Default for NodeOptions {
    fn default() -> Self {
        Self {
            node_extra: "",
            allow_cleartext_token: false,
            md5_target: false,
            max_result_bytes: 65536,
            max_frame_bytes: 1 << 20,
            audit_dir: None,
            jwks_refresh_cooldown_secs: 30,
            identity_extra: "",
            admin_port: 0,
            pg_port: 0,
            target_tls: "disable",
            postgres_extra: "",
            target_port: None,
            connection_extra: "",
            extra: "",
            coordinator: None,
            kafka_topic: None,
            kafka_brokers: None,
            kafka_extra: String::new(),
            checkpoint_interval_secs: 5,
            protocols: None,
        }
    }
}

/// A node's files: data directory, config file, database.
pub struct NodeFiles {
    pub dir: TempDir,
    pub db: String,
    pub config_path: PathBuf,
    pub audit_dir: PathBuf,
}

impl NodeFiles {
    /// Writes a config for a fresh test database.
    pub async fn new(opts: &NodeOptions) -> Self {
        let db = create_database().await;
        Self::for_database(db, opts)
    }

    pub fn for_database(db: String, opts: &NodeOptions) -> Self {
        let e = env();
        let dir = tempfile::tempdir().expect("tempdir");
        let (user, password) = if opts.md5_target {
            (e.get("VIGIL_PG_MD5_USER"), e.get("VIGIL_PG_MD5_PASSWORD"))
        } else {
            (
                e.get("VIGIL_PG_GATEWAY_USER"),
                e.get("VIGIL_PG_GATEWAY_PASSWORD"),
            )
        };
        let pw = dir.path().join("target-password");
        std::fs::write(&pw, format!("{password}\n")).unwrap();
        let ca = if opts.target_tls == "verify-full" {
            format!("ca_file = \"{}\"", e.get("VIGIL_PG_CA_CERT"))
        } else {
            String::new()
        };
        let audit_dir = opts
            .audit_dir
            .clone()
            .unwrap_or_else(|| dir.path().join("audit"));
        let config = format!(
            r#"
[node]
id = "test-{suffix}"
data_dir = "{data}"
{node_extra}

[admin]
listen = "127.0.0.1:{admin_port}"

[log]
level = "warn"

[identity]
issuer = "{issuer}"
audiences = ["{audience}", "vigil-cli", "vigil-console"]
leeway_secs = 5
jwks_refresh_cooldown_secs = {cooldown}
{identity_extra}

[audit]
dir = "{audit}"
max_result_bytes = {max_result}
checkpoint_interval_secs = {checkpoint_every}

[postgres]
listen = "127.0.0.1:{pg_port}"
allow_cleartext_token = {cleartext}
max_frame_bytes = {max_frame}
{postgres_extra}

[[postgres.connections]]
name = "app"
host = "{host}"
port = {port}
database = "{db}"
user = "{user}"
password = {{ file = "{pw}" }}
tls = "{target_tls}"
{ca}
allow = {{ client_ids = ["agent-reporting", "agent-ops"], groups = ["dba"] }}
{connection_extra}

{coordinator}

{kafka}

{protocols}

{extra}
"#,
            suffix = random_suffix(),
            data = dir.path().display(),
            node_extra = opts.node_extra,
            admin_port = opts.admin_port,
            issuer = e.get("VIGIL_OIDC_ISSUER"),
            audience = e.get("VIGIL_OIDC_AUDIENCE"),
            cooldown = opts.jwks_refresh_cooldown_secs,
            identity_extra = opts.identity_extra,
            audit = audit_dir.display(),
            max_result = opts.max_result_bytes,
            pg_port = opts.pg_port,
            cleartext = opts.allow_cleartext_token,
            max_frame = opts.max_frame_bytes,
            postgres_extra = opts.postgres_extra,
            host = e.get("VIGIL_PG_HOST"),
            port = opts
                .target_port
                .map_or_else(|| e.get("VIGIL_PG_PORT").to_string(), |p| p.to_string()),
            pw = pw.display(),
            target_tls = opts.target_tls,
            connection_extra = opts.connection_extra,
            coordinator = opts.coordinator.clone().unwrap_or_else(|| {
                // Operators (vigil approvals, the console) present people's ID tokens.
                "[coordinator]\nlisten = \"127.0.0.1:0\"\n\
                     operator_audiences = [\"vigil-cli\", \"vigil-console\"]"
                    .into()
            }),
            extra = opts.extra,
            protocols = opts.protocols.clone().unwrap_or_default(),
            checkpoint_every = opts.checkpoint_interval_secs,
            kafka = match &opts.kafka_topic {
                Some(topic) => format!(
                    "[audit.kafka]\nbrokers = [\"{}\"]\ntopic = \"{topic}\"\n{}",
                    opts.kafka_brokers
                        .as_deref()
                        .unwrap_or(e.get("VIGIL_KAFKA_BROKERS")),
                    opts.kafka_extra
                ),
                None => String::new(),
            },
        );
        let config_path = dir.path().join("node.toml");
        std::fs::write(&config_path, config).unwrap();
        Self {
            dir,
            db,
            config_path,
            audit_dir,
        }
    }

    /// Every record of every stream in this node's audit directory, in file order.
    pub fn records(&self) -> Vec<Record> {
        read_records(&self.audit_dir)
    }
}

pub fn read_records(dir: &Path) -> Vec<Record> {
    log_lines(dir)
        .iter()
        .map(|line| Record::parse(line).expect("a record"))
        .collect()
}

/// Every record of every stream file in `dir`, as the exact bytes of its line. Only complete
/// lines count: a final line without its newline is the torn tail a `kill -9` can leave inside
/// a write (its statement never reached the target; `vigil audit verify` reports it as such).
pub fn log_lines(dir: &Path) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    for file in vigil_node::audit::log_files(dir).expect("audit dir") {
        let bytes = std::fs::read(&file).unwrap();
        let mut lines: Vec<&[u8]> = bytes.split(|&b| b == b'\n').collect();
        // What follows the last newline: nothing, or a torn tail.
        lines.pop();
        out.extend(
            lines
                .into_iter()
                .filter(|l| !l.is_empty())
                .map(<[u8]>::to_vec),
        );
    }
    out
}

/// Every file below `dir`, in its subdirectories too.
pub fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let path = entry.path();
        if path.is_dir() {
            out.extend(files_under(&path));
        } else {
            out.push(path);
        }
    }
    out
}

/// An in-process node on ephemeral ports.
pub struct TestNode {
    pub files: NodeFiles,
    pub node: vigil_node::RunningNode,
}

impl TestNode {
    pub async fn start(opts: NodeOptions) -> Self {
        let files = NodeFiles::new(&opts).await;
        Self::start_with(files).await
    }

    /// `--gateway URL --gateway-ca CERT --home HOME`: what a `vigil` command needs to reach
    /// this node's API (`[api]`).
    pub fn cli_args(&self, home: &Path) -> Vec<String> {
        let url = format!("https://{}", self.node.api_addr.expect("an API listener"));
        let ca = self.files.dir.path().join("tls-api").join("cert.pem");
        vec![
            "--gateway".into(),
            url,
            "--gateway-ca".into(),
            ca.display().to_string(),
            "--home".into(),
            home.display().to_string(),
        ]
    }

    pub async fn start_with(files: NodeFiles) -> Self {
        let config = vigil_node::config::Config::load(&files.config_path).expect("valid config");
        let node = vigil_node::start(config).await.expect("node starts");
        let t = Self { files, node };
        t.wait_ready().await;
        t
    }

    async fn wait_ready(&self) {
        let url = format!("http://{}/readyz", self.node.admin_addr);
        for _ in 0..100 {
            if let Ok(r) = reqwest::get(&url).await {
                if r.status().is_success() {
                    return;
                }
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("node not ready: {url}");
    }

    pub fn port(&self) -> u16 {
        self.node
            .addr("postgres")
            .expect("a PostgreSQL listener")
            .port()
    }

    /// A connection string through the gateway.
    pub fn conn_str(&self, token: &str, dbname: &str) -> String {
        format!(
            "host=127.0.0.1 port={} user=agent dbname={dbname} password={token} application_name=vigil-tests",
            self.port()
        )
    }

    /// tokio-postgres through the gateway over TLS.
    pub async fn client(
        &self,
        token: &str,
    ) -> Result<(tokio_postgres::Client, ConnTask), tokio_postgres::Error> {
        connect_tls(&self.conn_str(token, "app")).await
    }

    pub async fn metrics(&self) -> String {
        reqwest::get(format!("http://{}/metrics", self.node.admin_addr))
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    }

    /// Every record so far. A request's record is written before the target sees the
    /// request; a response's is handed to the writer before the client sees the answer and
    /// written with the next batch, so this waits for what was handed over.
    pub async fn records(&self) -> Vec<Record> {
        self.node.audit.flush().await;
        self.files.records()
    }

    /// Records once the session-end records of `n` sessions are written (sessions end in the
    /// background after their client hangs up).
    pub async fn records_after_sessions(&self, n: usize) -> Vec<Record> {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            let records = self.records().await;
            if of_kind(&records, Kind::SessionEnd).len() >= n {
                return records;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "fewer than {n} sessions ended"
            );
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }
}

/// The connection's background task; dropping the client ends it.
pub type ConnTask = tokio::task::JoinHandle<Result<(), tokio_postgres::Error>>;

pub fn tls_connector() -> tokio_postgres_rustls::MakeRustlsConnect {
    tokio_postgres_rustls::MakeRustlsConnect::new(
        (*vigil_node::core::tls::unverified_client_config()).clone(),
    )
}

pub async fn connect_tls(
    conn_str: &str,
) -> Result<(tokio_postgres::Client, ConnTask), tokio_postgres::Error> {
    let (client, conn) =
        tokio_postgres::connect(&format!("{conn_str} sslmode=require"), tls_connector()).await?;
    Ok((client, tokio::spawn(conn)))
}

/// The Prometheus text of the node whose admin endpoint listens on `admin_port`.
pub async fn node_metrics(admin_port: u16) -> String {
    reqwest::get(format!("http://127.0.0.1:{admin_port}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
}

/// A metric's value from Prometheus text (sum over label sets when `name` has none).
pub fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| {
            l.strip_prefix(name)
                .is_some_and(|rest| rest.starts_with(' ') || rest.starts_with('{'))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// The PostgreSQL requests of the `blocked` records of `rule`.
pub fn pg_blocked_by<'a>(records: &'a [Record], rule: &str) -> Vec<&'a PgRequest> {
    of_kind(records, Kind::Blocked)
        .into_iter()
        .filter(|r| r.body.policy.as_ref().is_some_and(|p| p.rule == rule))
        .filter_map(|r| r.body.pg_request())
        .collect()
}

/// The `response` record of the statement (or request) of `request`, a record of the same
/// session and `stmt`.
pub fn response_to<'a>(records: &'a [Record], request: &Record) -> Option<&'a Record> {
    records.iter().find(|r| {
        r.body.kind == Kind::Response
            && r.body.session == request.body.session
            && r.body.stmt == request.body.stmt
    })
}

/// Records of one kind.
pub fn of_kind(records: &[Record], kind: Kind) -> Vec<&Record> {
    records.iter().filter(|r| r.body.kind == kind).collect()
}

/// Asserts that what a held request's records say happened after its wait ended (the request
/// run, or refused) bears a time no earlier than that end (`approval_decided`), and returns
/// how many such records there are.
pub fn timed_after_the_wait(records: &[Record]) -> usize {
    let mut after = 0;
    for ended in of_kind(records, Kind::ApprovalDecided) {
        for r in records.iter().filter(|r| {
            r.seq > ended.seq
                && r.body.session == ended.body.session
                && r.body.stmt == ended.body.stmt
                && matches!(r.body.kind, Kind::Request | Kind::Blocked)
        }) {
            // RFC 3339 with nine fractional digits, in UTC: in time order as text.
            assert!(
                r.body.time >= ended.body.time,
                "{:?} at {} before the wait's end at {}",
                r.body.kind,
                r.body.time,
                ended.body.time
            );
            after += 1;
        }
    }
    after
}

/// Starts `vigil-node` as a child process (so a test can kill it) and waits until its
/// `/readyz` on `admin_port` answers.
pub async fn spawn_node(files: &NodeFiles, admin_port: u16) -> std::process::Child {
    let mut cmd = std::process::Command::new(bin("vigil-node"));
    cmd.stderr(std::process::Stdio::inherit());
    start_node_process(cmd, files, admin_port).await
}

/// SIGKILLs a spawned node, then checks its audit stream with `vigil audit verify` (a torn
/// last record allowed for, as after a crash); the report and the records.
pub async fn kill_9_and_verify(
    node: &mut std::process::Child,
    files: &NodeFiles,
) -> (String, Vec<Record>) {
    node.kill().unwrap();
    node.wait().unwrap();
    let dir = files.audit_dir.to_str().unwrap().to_string();
    let (code, report) =
        tokio::task::spawn_blocking(move || vigil(&["audit", "verify", "--log", &dir]))
            .await
            .unwrap();
    assert_eq!(code, 0, "{report}");
    assert!(!report.contains("failed"), "{report}");
    (report, files.records())
}

/// Starts `vigil-node` logging everything (`RUST_LOG=debug`) to `log`.
pub async fn spawn_node_logging(
    files: &NodeFiles,
    admin_port: u16,
    log: &Path,
) -> std::process::Child {
    let mut cmd = std::process::Command::new(bin("vigil-node"));
    cmd.env("RUST_LOG", "debug")
        .stderr(std::fs::File::create(log).expect("the node's log file"));
    start_node_process(cmd, files, admin_port).await
}

async fn start_node_process(
    mut cmd: std::process::Command,
    files: &NodeFiles,
    admin_port: u16,
) -> std::process::Child {
    let mut child = cmd
        .arg("--config")
        .arg(&files.config_path)
        .stdout(std::process::Stdio::null())
        .spawn()
        .expect("vigil-node starts");
    let url = format!("http://127.0.0.1:{admin_port}/readyz");
    for _ in 0..200 {
        if let Ok(r) = reqwest::get(&url).await {
            if r.status().is_success() {
                return child;
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let _ = child.kill();
    let _ = child.wait();
    panic!("vigil-node did not become ready");
}

/// Runs `command`, which must succeed; its stdout, trimmed.
pub(crate) fn run(command: &mut std::process::Command) -> String {
    let out = command
        .output()
        .unwrap_or_else(|e| panic!("{command:?}: {e}"));
    assert!(
        out.status.success(),
        "{command:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// A fresh topic on the dev broker.
pub fn create_topic(partitions: u32) -> String {
    create_topic_on(env().get("VIGIL_KAFKA_URL"), partitions)
}

/// A fresh topic on the Tansu broker at `url` (`tcp://HOST:PORT`).
pub fn create_topic_on(url: &str, partitions: u32) -> String {
    let name = format!("audit-{}", random_suffix());
    let out = std::process::Command::new(env().get("VIGIL_TANSU"))
        .args([
            "topic",
            "create",
            &name,
            "--partitions",
            &partitions.to_string(),
        ])
        .args(["--broker", url])
        .output()
        .expect("run tansu");
    assert!(
        out.status.success(),
        "tansu topic create: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    name
}

/// Pauses (`-STOP`) or resumes (`-CONT`) the dev broker.
pub fn signal_broker(signal: &str) {
    let pid = std::fs::read_to_string(env().get("VIGIL_KAFKA_PID_FILE")).expect("broker pid");
    let ok = std::process::Command::new("kill")
        .args([signal, pid.trim()])
        .status()
        .expect("kill")
        .success();
    assert!(ok, "kill {signal} broker");
}

/// Everything in a topic of the dev broker.
pub fn topic_messages(topic: &str) -> Vec<vigil_node::audit::kafka::TopicMessage> {
    let mut out = Vec::new();
    vigil_node::audit::kafka::read_topic(
        env().get("VIGIL_KAFKA_BROKERS"),
        &[],
        topic,
        Duration::from_secs(10),
        |m| out.push(m),
    )
    .expect("read the topic");
    out
}

/// Runs `vigil` with arguments; returns (exit code, stdout).
pub fn vigil(args: &[&str]) -> (i32, String) {
    let out = std::process::Command::new(bin("vigil"))
        .args(args)
        .output()
        .expect("run vigil");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr),
    )
}

/// [`vigil`] off the async runtime (for tests whose node runs in the same process).
pub async fn vigil_async(args: &[&str]) -> (i32, String) {
    let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
    tokio::task::spawn_blocking(move || {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        vigil(&args)
    })
    .await
    .expect("vigil ran")
}

/// The target's statement log from `offset` on, only lines of database `db`.
pub fn pg_log_lines(db: &str, offset: u64) -> Vec<String> {
    let text = std::fs::read(env().get("VIGIL_PG_LOG")).expect("the PostgreSQL log");
    let text =
        String::from_utf8_lossy(&text[offset.min(text.len() as u64) as usize..]).into_owned();
    let tag = format!("db={db} ");
    text.lines()
        .filter(|l| l.contains(&tag))
        .map(str::to_string)
        .collect()
}

/// A statement PostgreSQL ran, from its log.
#[derive(Debug, Clone, PartialEq)]
pub struct Ran {
    /// A simple Query (`statement:`) rather than an extended-protocol `execute`.
    pub simple: bool,
    pub text: String,
    /// For `EXECUTE name`: the text of the prepared statement (the log's `prepare:` detail).
    pub prepared: Option<String>,
}

/// What PostgreSQL ran in database `db` since `offset`, in order, on both protocols (the
/// gateway's stand-in for refused statements left out).
pub fn pg_executed(db: &str, offset: u64) -> Vec<Ran> {
    let mut out: Vec<Ran> = Vec::new();
    for line in pg_log_lines(db, offset) {
        if let Some((_, text)) = line.split_once("LOG:  statement: ") {
            if text != "vigil_refused_this_statement" {
                out.push(Ran {
                    simple: true,
                    text: text.to_string(),
                    prepared: None,
                });
            }
        } else if let Some((_, rest)) = line.split_once("LOG:  execute ") {
            let (name, text) = rest.split_once(": ").expect("execute NAME: TEXT");
            if name.starts_with("vigil_probe_") && vigil_node::pg::is_settings_probe(text) {
                // The gateway's own read of a session's settings, before a held statement.
                continue;
            }
            out.push(Ran {
                simple: false,
                text: text.to_string(),
                prepared: None,
            });
        } else if let Some((_, text)) = line.split_once("DETAIL:  prepare: ") {
            if let Some(last) = out.last_mut() {
                last.prepared = Some(text.to_string());
            }
        }
    }
    out
}

pub fn pg_log_len() -> u64 {
    std::fs::metadata(env().get("VIGIL_PG_LOG"))
        .map(|m| m.len())
        .unwrap_or(0)
}

/// Waits until `f` holds, polling; panics with `what` after `timeout`.
pub async fn eventually(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + timeout;
    while !f() {
        assert!(tokio::time::Instant::now() < deadline, "timed out: {what}");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}
