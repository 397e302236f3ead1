//! The node's configuration file (TOML). Every key is documented in docs/configuration.md and
//! a commented example lives in deploy/vigil-node.toml.
//!
//! Loading is strict: unknown keys, missing required keys and values that make no sense are
//! refused with a message that names the key, before anything is bound.

use crate::core::config_error::invalid;
pub use crate::core::config_error::ConfigError;
use crate::core::secret::SecretRef;
use crate::pg::config::PostgresConfig;
use serde::Deserialize;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub node: NodeConfig,
    #[serde(default)]
    pub admin: AdminConfig,
    #[serde(default)]
    pub log: LogConfig,
    pub identity: IdentityConfig,
    #[serde(default)]
    pub audit: AuditConfig,
    /// The PostgreSQL server (see [`crate::pg::config`]); absent: the node serves no
    /// PostgreSQL clients.
    #[serde(default)]
    pub postgres: Option<PostgresConfig>,
    /// The SSH server (see [`crate::ssh::config`]); absent: the node serves no SSH clients.
    #[serde(default)]
    pub ssh: Option<crate::ssh::config::SshConfig>,
    /// The node's HTTPS API (SSH certificates, `vigil ssh-config`); absent: none.
    #[serde(default)]
    pub api: Option<crate::api::ApiConfig>,
    /// The web console (docs/console.md); absent: none.
    #[serde(default)]
    pub console: Option<crate::console::ConsoleConfig>,
    /// The Kubernetes API gateway (docs/kubernetes.md).
    #[serde(default)]
    pub kubernetes: Option<crate::kube::config::KubeConfig>,
    /// Guardrails (docs/policy.md).
    #[serde(default)]
    pub policy: crate::policy::PolicyConfig,
    /// Where approvals, grants and checkpoints live (docs/configuration.md).
    #[serde(default)]
    pub coordinator: CoordinatorConfig,
    /// The other gateway nodes (docs/configuration.md, `[cluster]`).
    #[serde(default)]
    pub cluster: ClusterConfig,
    /// Traces exported over OTLP (docs/operations.md); absent: none are.
    #[serde(default)]
    pub tracing: Option<crate::core::trace::TracingConfig>,
}

/// The `[cluster]` section: the gateway nodes behind the same load balancer, for what must reach
/// the node that serves a session (a PostgreSQL CancelRequest). Every node may be given the
/// same list: a node skips its own entry.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterConfig {
    #[serde(default)]
    pub peers: Vec<PeerConfig>,
    /// Shared by every node of the cluster: signs the calls between nodes.
    #[serde(default)]
    pub peer_secret: Option<SecretRef>,
}

/// Another gateway node: its `node.id` and the URL of its admin listener.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PeerConfig {
    pub id: String,
    /// `http://host:port` of the peer's `[admin]` listener.
    pub url: String,
}

/// The `[coordinator]` section of a node.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CoordinatorConfig {
    /// `host:port` of the coordinator members. Empty: the node runs a one-member coordinator
    /// in-process (the embedded default), with the same code, on `listen`.
    #[serde(default)]
    pub endpoints: Vec<String>,
    /// The cluster token; required with `endpoints`.
    #[serde(default)]
    pub cluster_token: Option<SecretRef>,
    /// Embedded only: where the in-process member serves gRPC (what `vigil approvals` uses).
    #[serde(default = "default_embedded_listen")]
    pub listen: SocketAddr,
    /// Embedded only: operators in this group may manage grants and membership.
    #[serde(default = "default_admin_group")]
    pub admin_group: String,
    /// How long one coordinator call may keep retrying (leader changes, dead members) before
    /// the statement is refused.
    #[serde(default = "default_coordinator_timeout")]
    pub timeout_secs: u64,
    /// With `endpoints`: reach the members over TLS, verifying them against this CA (PEM).
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// Embedded only: the audiences of the tokens the member takes from operators (approvers,
    /// admins, the console acting for a person); default [`Config::operator_audiences`].
    #[serde(default)]
    pub operator_audiences: Option<Vec<String>>,
}

impl Default for CoordinatorConfig {
    fn default() -> Self {
        Self {
            endpoints: Vec::new(),
            cluster_token: None,
            listen: default_embedded_listen(),
            admin_group: default_admin_group(),
            timeout_secs: default_coordinator_timeout(),
            ca_file: None,
            operator_audiences: None,
        }
    }
}

fn default_embedded_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 7470))
}
pub fn default_admin_group() -> String {
    "vigil-admins".into()
}
fn default_coordinator_timeout() -> u64 {
    5
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeConfig {
    /// Names this node in every audit record and in its stream id.
    pub id: String,
    /// Where the node keeps its audit log, its generated TLS certificate and keys.
    pub data_dir: PathBuf,
    /// The load balancers (addresses, CIDR blocks) whose PROXY protocol v2 header names the
    /// client of each connection they open; from them the header is required, from anyone
    /// else refused. Empty: off.
    #[serde(default)]
    pub proxy_protocol_from: crate::core::proxy_protocol::Balancers,
    /// On SIGTERM, how long open sessions may go on before the node ends them (see
    /// docs/operations.md, "Draining a node"). Keep it below the orchestrator's grace period.
    #[serde(default = "default_drain_timeout")]
    pub drain_timeout_secs: u64,
    /// How many threads run the protocols' sessions (`0`: one per CPU); see
    /// `core::session_threads`.
    #[serde(default)]
    pub session_threads: usize,
}

fn default_drain_timeout() -> u64 {
    20
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdminConfig {
    #[serde(default = "default_admin_listen")]
    pub listen: SocketAddr,
}

impl Default for AdminConfig {
    fn default() -> Self {
        Self {
            listen: default_admin_listen(),
        }
    }
}

fn default_admin_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 9187))
}

#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogConfig {
    #[serde(default)]
    pub format: LogFormat,
    /// A tracing filter (`info`, `vigil_node=debug` …); `RUST_LOG` overrides it.
    #[serde(default = "default_log_level")]
    pub level: String,
}

impl Default for LogConfig {
    fn default() -> Self {
        Self {
            format: LogFormat::default(),
            level: default_log_level(),
        }
    }
}

fn default_log_level() -> String {
    "info".into()
}

#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq, Hash)]
pub enum Algorithm {
    RS256,
    ES256,
    EdDSA,
}

#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq, Hash)]
#[serde(rename_all = "snake_case")]
pub enum TokenType {
    /// OpenID Connect ID tokens (people).
    IdToken,
    /// RFC 9068 JWT access tokens, `typ: at+jwt` (agents, client credentials).
    AccessToken,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IdentityConfig {
    /// The issuer URL, compared exactly with `iss` and with the discovery document.
    pub issuer: String,
    /// Accepted `aud` values: the resource indicator for access tokens, client ids for ID tokens.
    pub audiences: Vec<String>,
    #[serde(default = "default_algorithms")]
    pub algorithms: Vec<Algorithm>,
    #[serde(default = "default_token_types")]
    pub token_types: Vec<TokenType>,
    /// Clock skew tolerated on `exp`, `nbf` and `iat`.
    #[serde(default = "default_leeway")]
    pub leeway_secs: u64,
    /// Whether a session ends when its token expires.
    #[serde(default)]
    pub session_expiry: SessionExpiry,
    /// Minimum time between two JWKS fetches caused by unknown key ids.
    #[serde(default = "default_jwks_cooldown")]
    pub jwks_refresh_cooldown_secs: u64,
    /// Timeout of one HTTP request to the provider.
    #[serde(default = "default_http_timeout")]
    pub http_timeout_secs: u64,
    #[serde(default)]
    pub claims: ClaimNames,
    /// Tokens the cluster issues itself (for SAML identities); absent: none.
    #[serde(default)]
    pub tokens: Option<crate::core::issued::TokensConfig>,
    /// SAML 2.0 sign-in (the console's, `vigil login --saml`); absent: none.
    #[serde(default)]
    pub saml: Option<crate::core::saml::SamlConfig>,
}

/// What bounds a session authenticated with a token.
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
pub enum SessionExpiry {
    /// The session ends when its token expires: when it would be refused at login (`exp`
    /// plus `leeway_secs` has passed).
    #[default]
    #[serde(rename = "token")]
    Token,
    /// The token is checked at login only; the session lasts until either side ends it.
    #[serde(rename = "none")]
    Unbounded,
}

fn default_algorithms() -> Vec<Algorithm> {
    vec![Algorithm::RS256, Algorithm::ES256, Algorithm::EdDSA]
}
fn default_token_types() -> Vec<TokenType> {
    vec![TokenType::AccessToken, TokenType::IdToken]
}
fn default_leeway() -> u64 {
    30
}
fn default_jwks_cooldown() -> u64 {
    30
}
fn default_http_timeout() -> u64 {
    5
}

/// Which claims fill which principal field.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClaimNames {
    #[serde(default = "claim_sub")]
    pub subject: String,
    /// Falls back to `azp` when the named claim is absent.
    #[serde(default = "claim_client_id")]
    pub client_id: String,
    #[serde(default = "claim_model")]
    pub model: String,
    #[serde(default = "claim_model_version")]
    pub model_version: String,
    #[serde(default = "claim_groups")]
    pub groups: String,
    /// The claim that names the person across identity providers (an email, a UPN): the
    /// principal's `person`, which keeps one person from approving their own request under
    /// another identity. Absent: none.
    #[serde(default)]
    pub person: Option<String>,
}

impl Default for ClaimNames {
    fn default() -> Self {
        Self {
            subject: claim_sub(),
            client_id: claim_client_id(),
            model: claim_model(),
            model_version: claim_model_version(),
            groups: claim_groups(),
            person: None,
        }
    }
}

fn claim_sub() -> String {
    "sub".into()
}
fn claim_client_id() -> String {
    "client_id".into()
}
fn claim_model() -> String {
    "model".into()
}
fn claim_model_version() -> String {
    "model_version".into()
}
fn claim_groups() -> String {
    "groups".into()
}

#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum SyncMode {
    /// `write(2)` per batch: a record survives a killed gateway process.
    #[default]
    Write,
    /// `fdatasync(2)` per batch as well: a record also survives a power loss.
    Fsync,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuditConfig {
    /// Directory of the local audit log; default `<data_dir>/audit`.
    #[serde(default)]
    pub dir: Option<PathBuf>,
    #[serde(default)]
    pub sync: SyncMode,
    /// Result rows recorded per statement, in bytes of row data; beyond it a digest.
    #[serde(default = "default_max_result_bytes")]
    pub max_result_bytes: usize,
    /// How often the node signs a checkpoint of its stream and hands it to the coordinator
    /// (and the topic); one more is signed at stream end.
    #[serde(default = "default_checkpoint_interval")]
    pub checkpoint_interval_secs: u64,
    /// Publish the stream to Kafka; the local log becomes the spool.
    #[serde(default)]
    pub kafka: Option<KafkaConfig>,
}

impl Default for AuditConfig {
    fn default() -> Self {
        Self {
            dir: None,
            sync: SyncMode::default(),
            max_result_bytes: default_max_result_bytes(),
            checkpoint_interval_secs: default_checkpoint_interval(),
            kafka: None,
        }
    }
}

fn default_checkpoint_interval() -> u64 {
    5
}

/// Compression of record batches: lz4 by default, the cheapest for the gateway and the broker
/// in `loadtest/pgbench.sh` (loadtest/README.md, "Kafka sink"). (Snappy is left out: Tansu,
/// the broker the project tests with, cannot read snappy batches.)
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Compression {
    None,
    Gzip,
    #[default]
    Lz4,
    Zstd,
}

/// `[audit.kafka]`: the audit topic.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KafkaConfig {
    /// `host:port` of bootstrap brokers.
    pub brokers: Vec<String>,
    pub topic: String,
    /// Unacknowledged bytes the spool may hold; past it, statements are refused before the
    /// target (fail closed) until the broker catches up.
    #[serde(default = "default_spool_max_bytes")]
    pub spool_max_bytes: u64,
    /// The largest record the topic takes, as written (below the topic's `max.message.bytes`).
    #[serde(default = "default_max_record_bytes")]
    pub max_record_bytes: usize,
    #[serde(default)]
    pub compression: Compression,
    /// How long the producer waits to fill a batch.
    #[serde(default = "default_linger_ms")]
    pub linger_ms: u64,
    /// Records read from the spool and handed to the producer, not yet acknowledged.
    #[serde(default = "default_max_in_flight_records")]
    pub max_in_flight_records: usize,
    /// Raw librdkafka settings (e.g. `security.protocol`, `ssl.ca.location`). Settings that
    /// would break idempotence, ordering or the record bytes are refused at start.
    #[serde(default)]
    pub overrides: std::collections::BTreeMap<String, String>,
}

fn default_max_record_bytes() -> usize {
    1_000_000
}
fn default_spool_max_bytes() -> u64 {
    1 << 30
}
fn default_linger_ms() -> u64 {
    5
}
fn default_max_in_flight_records() -> usize {
    50_000
}

/// librdkafka settings Vigil owns: overriding them would break idempotence, per-stream order,
/// delivery until acknowledged, or the bytes of a record.
pub const KAFKA_RESERVED: &[&str] = &[
    "bootstrap.servers",
    "metadata.broker.list",
    "enable.idempotence",
    "acks",
    "request.required.acks",
    "max.in.flight.requests.per.connection",
    "max.in.flight",
    "retries",
    "message.send.max.retries",
    "message.timeout.ms",
    "delivery.timeout.ms",
    "enable.gapless.guarantee",
    "partitioner",
    "partitioner_cb",
    "transactional.id",
    "compression.codec",
    "compression.type",
    "linger.ms",
    "queue.buffering.max.ms",
    "queue.buffering.max.messages",
    "queue.buffering.max.kbytes",
    "message.max.bytes",
];

fn default_max_result_bytes() -> usize {
    64 * 1024
}

fn read_toml<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    toml::from_str(&text).map_err(|e| ConfigError::Parse {
        path: path.to_path_buf(),
        message: e.to_string(),
    })
}

fn check_identity(key: &str, id: &IdentityConfig) -> Result<(), ConfigError> {
    let key = |k: &str| format!("{key}.{k}");
    if !(id.issuer.starts_with("https://") || id.issuer.starts_with("http://")) {
        return Err(invalid(key("issuer"), "must be an http(s) URL"));
    }
    if id.audiences.is_empty() {
        return Err(invalid(key("audiences"), "must name at least one audience"));
    }
    if id.algorithms.is_empty() {
        return Err(invalid(
            key("algorithms"),
            "must allow at least one algorithm",
        ));
    }
    if id.token_types.is_empty() {
        return Err(invalid(
            key("token_types"),
            "must accept at least one token type",
        ));
    }
    // Past its expiry a token is accepted for the leeway: minutes at most, as for SAML.
    if id.leeway_secs > 300 {
        return Err(invalid(key("leeway_secs"), "must be at most 300"));
    }
    if id.http_timeout_secs == 0 {
        return Err(invalid(key("http_timeout_secs"), "must be at least 1"));
    }
    if let Some(tokens) = &id.tokens {
        tokens.validate(&id.issuer)?;
        if !id.algorithms.contains(&Algorithm::EdDSA) {
            return Err(invalid(
                key("tokens"),
                "the cluster signs its tokens with Ed25519: add EdDSA to identity.algorithms",
            ));
        }
        if !id.token_types.contains(&TokenType::AccessToken) {
            return Err(invalid(
                key("tokens"),
                "the cluster's tokens are access tokens: add access_token to identity.token_types",
            ));
        }
    }
    Ok(())
}

/// The configuration file of a coordinator member (`vigil-coordinator --config FILE`).
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CoordinatorFile {
    pub member: MemberSection,
    /// Operators' OIDC tokens are verified against this provider. Without it only the cluster
    /// token is accepted (no operator can decide).
    #[serde(default)]
    pub identity: Option<IdentityConfig>,
    #[serde(default)]
    pub log: LogConfig,
}

/// `[member]`: one coordinator member.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MemberSection {
    /// Unique in the cluster, non-zero, never reused.
    pub id: u64,
    /// gRPC for members, nodes and operators.
    pub listen: SocketAddr,
    /// `host:port` others reach this member at; default: `listen`.
    #[serde(default)]
    pub advertise: String,
    /// The Raft log, vote and snapshots (one redb file).
    pub data_dir: PathBuf,
    /// Shared by the members and the gateway nodes of one cluster.
    pub cluster_token: SecretRef,
    #[serde(default = "default_admin_group")]
    pub admin_group: String,
    #[serde(default = "default_heartbeat_ms")]
    pub heartbeat_ms: u64,
    #[serde(default = "default_election_min_ms")]
    pub election_timeout_min_ms: u64,
    #[serde(default = "default_election_max_ms")]
    pub election_timeout_max_ms: u64,
    /// A snapshot (and log purge) every this many entries.
    #[serde(default = "default_snapshot_after")]
    pub snapshot_after: u64,
    /// Settled requests and ended grants are forgotten this long after they settled.
    #[serde(default = "default_retention_secs")]
    pub retention_secs: u64,
    /// `/metrics`, `/healthz` and `/readyz` over HTTP; absent: not served.
    #[serde(default)]
    pub metrics_listen: Option<SocketAddr>,
    /// TLS on the gRPC port, mutual between members; absent: plaintext.
    #[serde(default)]
    pub tls: Option<vigil_coordinator::tls::MemberTls>,
}

fn default_retention_secs() -> u64 {
    vigil_coordinator::server::DEFAULT_RETENTION.as_secs()
}

fn default_heartbeat_ms() -> u64 {
    100
}
fn default_election_min_ms() -> u64 {
    300
}
fn default_election_max_ms() -> u64 {
    500
}
fn default_snapshot_after() -> u64 {
    5000
}

impl CoordinatorFile {
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let file: Self = read_toml(path)?;
        file.validate()?;
        Ok(file)
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        let m = &self.member;
        if m.id == 0 {
            return Err(invalid("member.id", "must be at least 1"));
        }
        if m.heartbeat_ms == 0 || m.election_timeout_min_ms <= m.heartbeat_ms {
            return Err(invalid(
                "member.election_timeout_min_ms",
                "must be longer than member.heartbeat_ms (and that at least 1)",
            ));
        }
        if m.election_timeout_max_ms <= m.election_timeout_min_ms {
            return Err(invalid(
                "member.election_timeout_max_ms",
                "must be longer than member.election_timeout_min_ms",
            ));
        }
        if m.snapshot_after == 0 {
            return Err(invalid("member.snapshot_after", "must be at least 1"));
        }
        if m.retention_secs == 0 {
            return Err(invalid("member.retention_secs", "must be at least 1"));
        }
        if let Some(id) = &self.identity {
            check_identity("identity", id)?;
            if id.saml.is_some() {
                return Err(invalid(
                    "identity.saml",
                    "a coordinator member serves no SAML sign-in: give it [identity.tokens] only \
                     (to accept the console calls of SAML people)",
                ));
            }
        }
        Ok(())
    }

    /// The member's runtime settings, with the cluster token resolved.
    pub fn member_config(&self) -> Result<vigil_coordinator::server::MemberConfig, ConfigError> {
        let m = &self.member;
        let token = m
            .cluster_token
            .resolve()
            .map_err(|e| invalid("member.cluster_token", e.to_string()))?;
        if token.expose().len() < 16 {
            return Err(invalid(
                "member.cluster_token",
                "must be at least 16 characters",
            ));
        }
        let mut c = vigil_coordinator::server::MemberConfig::new(
            m.id,
            m.listen,
            m.data_dir.clone(),
            token.expose().as_str().into(),
        );
        c.advertise = m.advertise.clone();
        c.admin_group = m.admin_group.clone();
        c.heartbeat = std::time::Duration::from_millis(m.heartbeat_ms);
        c.election_timeout = (
            std::time::Duration::from_millis(m.election_timeout_min_ms),
            std::time::Duration::from_millis(m.election_timeout_max_ms),
        );
        c.snapshot_after = m.snapshot_after;
        c.retention = std::time::Duration::from_secs(m.retention_secs);
        c.metrics_listen = m.metrics_listen;
        c.tls = m.tls.clone();
        Ok(c)
    }
}

impl Config {
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let config: Config = read_toml(path)?;
        config.validate()?;
        Ok(config)
    }

    /// Checks what types alone cannot.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.node.id.is_empty()
            || !self
                .node
                .id
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.')
        {
            return Err(invalid(
                "node.id",
                "must be non-empty and use only letters, digits, '-', '_' and '.'",
            ));
        }
        check_identity("identity", &self.identity)?;
        self.audit.validate()?;
        for peer in &self.cluster.peers {
            if !(peer.url.starts_with("http://") || peer.url.starts_with("https://")) {
                return Err(invalid(
                    "cluster.peers",
                    format!(
                        "the url of peer {:?} must start with http:// or https://",
                        peer.id
                    ),
                ));
            }
        }
        if let Some(pg) = &self.postgres {
            pg.validate()?;
        }
        if let Some(ssh) = &self.ssh {
            ssh.validate()?;
        }
        if let Some(console) = &self.console {
            console.validate(&self.identity)?;
        }
        if let Some(saml) = &self.identity.saml {
            saml.validate(&self.identity, self.console.as_ref())?;
        }
        if let Some(api) = &self.api {
            api.validate(&self.identity)?;
        }
        if let Some(kube) = &self.kubernetes {
            kube.validate()?;
        }
        if self.postgres.is_none() && self.ssh.is_none() && self.kubernetes.is_none() {
            return Err(invalid(
                "postgres",
                "no protocol server is configured: add a [postgres], an [ssh] or a [kubernetes] section",
            ));
        }
        if let Some(t) = &self.tracing {
            t.validate()?;
        }
        self.validate_policy()?;
        self.validate_operator_audiences()?;
        self.coordinator.validate()
    }

    /// The audiences of the tokens the embedded coordinator takes from operators:
    /// `coordinator.operator_audiences`, or by default those of the tokens people log in
    /// with, as this file names them: the console's client id, `vigil login`'s client id
    /// (when the CLI keeps ID tokens, whose audience is that client) and the audience of the
    /// tokens the cluster issues for SAML identities. Never an audience only agents' tokens
    /// carry, unless listed here: an agent's token is not an approver's.
    pub fn operator_audiences(&self) -> Vec<String> {
        if let Some(listed) = &self.coordinator.operator_audiences {
            return listed.clone();
        }
        let mut audiences = Vec::new();
        let mut add = |a: &str| {
            if !audiences.iter().any(|b| b == a) {
                audiences.push(a.to_string());
            }
        };
        if let Some(console) = &self.console {
            add(&console.client_id);
            if let Some(saml) = &self.identity.saml {
                add(saml.token_audience(console));
            }
        }
        if let Some(login) = self.api.as_ref().and_then(|a| a.login.as_ref()) {
            if login.token == TokenType::IdToken {
                add(&login.client_id);
            }
        }
        audiences
    }

    /// `coordinator.operator_audiences`: accepted by the node's verifier, and holding the
    /// audiences the console's calls as a person carry; never the audience of the tokens
    /// workloads get at the SAML token endpoint.
    fn validate_operator_audiences(&self) -> Result<(), ConfigError> {
        const KEY: &str = "coordinator.operator_audiences";
        let workload = self
            .identity
            .saml
            .as_ref()
            .and_then(|s| s.workload_audience.as_ref());
        if let Some(aud) = workload.filter(|_| self.coordinator.endpoints.is_empty()) {
            if self.operator_audiences().contains(aud) {
                return Err(invalid(
                    "identity.saml.workload_audience",
                    format!(
                        "{aud:?} is an audience the embedded coordinator takes from operators \
                         ({KEY}): a workload's token is not an approver's"
                    ),
                ));
            }
        }
        let Some(listed) = &self.coordinator.operator_audiences else {
            return Ok(());
        };
        if !self.coordinator.endpoints.is_empty() {
            return Err(invalid(
                KEY,
                "applies to the embedded coordinator only (members take operators' tokens by \
                 their own identity.audiences)",
            ));
        }
        if let Some(a) = listed.iter().find(|a| !self.identity.audiences.contains(a)) {
            return Err(invalid(
                KEY,
                format!("{a:?} is not one of identity.audiences (the node verifies the tokens)"),
            ));
        }
        if let Some(console) = &self.console {
            let mut needed = vec![("console.client_id", console.client_id.as_str())];
            if let Some(saml) = &self.identity.saml {
                needed.push(("identity.saml.token_audience", saml.token_audience(console)));
            }
            if let Some((what, a)) = needed
                .into_iter()
                .find(|(_, a)| !listed.iter().any(|b| b == a))
            {
                return Err(invalid(
                    KEY,
                    format!(
                        "must hold {a:?} ({what}): the console calls the coordinator with \
                         people's tokens"
                    ),
                ));
            }
        }
        Ok(())
    }

    /// `[policy]`: rule ids, the targets rules name, approval settings, detectors.
    fn validate_policy(&self) -> Result<(), ConfigError> {
        let mut ids = std::collections::HashSet::new();
        for (i, rule) in self.policy.rules.iter().enumerate() {
            let reserved = [
                "default",
                "parse-error",
                "read-only",
                "function-call",
                "startup-options",
            ];
            if rule.id.is_empty() || reserved.contains(&rule.id.as_str()) || !ids.insert(&rule.id) {
                return Err(invalid(
                    format!("policy.rules[{i}].id"),
                    "must be non-empty, unique and not a reserved rule name",
                ));
            }
            for c in &rule.targets {
                let known = match rule.matcher {
                    crate::policy::Matcher::Sql(_) => self
                        .postgres
                        .iter()
                        .flat_map(|pg| &pg.connections)
                        .any(|x| &x.name == c),
                    crate::policy::Matcher::Ssh(_) => self
                        .ssh
                        .iter()
                        .flat_map(|s| &s.targets)
                        .any(|x| &x.name == c),
                    crate::policy::Matcher::Kube(_) => self
                        .kubernetes
                        .iter()
                        .flat_map(|k| &k.clusters)
                        .any(|x| &x.name == c),
                };
                if !known {
                    return Err(invalid(
                        format!("policy.rules[{i}].connections"),
                        format!("no target of the rule's protocol is named {c:?}"),
                    ));
                }
            }
            if let Some(spec) = &rule.approval {
                check_approval(&format!("policy.rules[{i}].approval"), spec)?;
            }
            if rule.action == crate::policy::Action::RequireApproval
                && rule.approval.is_none()
                && self.policy.approval.is_none()
            {
                return Err(invalid(
                    format!("policy.rules[{i}].approval"),
                    "a require_approval rule needs approval settings (here or in [policy.approval])",
                ));
            }
        }
        if let Some(spec) = &self.policy.approval {
            check_approval("policy.approval", spec)?;
        }
        if self.policy.default == crate::policy::Action::RequireApproval
            && self.policy.approval.is_none()
        {
            return Err(invalid(
                "policy.approval",
                "default = \"require_approval\" needs [policy.approval]",
            ));
        }
        for (i, d) in self.policy.masking.detectors.iter().enumerate() {
            if d.kind == crate::policy::masking::EntityKind::Column {
                return Err(invalid(
                    format!("policy.masking.detectors[{i}].kind"),
                    "`column` is not a detector; use [[policy.masking.columns]]",
                ));
            }
        }
        Ok(())
    }

    pub fn coordinator_dir(&self) -> PathBuf {
        self.node.data_dir.join("coordinator")
    }

    pub fn audit_dir(&self) -> PathBuf {
        self.audit
            .dir
            .clone()
            .unwrap_or_else(|| self.node.data_dir.join("audit"))
    }
}

fn check_approval(key: &str, spec: &crate::policy::ApprovalSpec) -> Result<(), ConfigError> {
    if spec.approvers.is_empty() {
        return Err(invalid(format!("{key}.approvers"), "must name a group"));
    }
    if spec.required == 0 {
        return Err(invalid(format!("{key}.required"), "must be at least 1"));
    }
    if spec.ttl_secs == 0 {
        return Err(invalid(format!("{key}.ttl_secs"), "must be at least 1"));
    }
    if spec.wait_secs > spec.ttl_secs {
        return Err(invalid(
            format!("{key}.wait_secs"),
            "cannot be longer than the request lives (ttl_secs)",
        ));
    }
    Ok(())
}

impl AuditConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        if self.checkpoint_interval_secs == 0 {
            return Err(invalid(
                "audit.checkpoint_interval_secs",
                "must be at least 1",
            ));
        }
        if self.max_result_bytes > 64 * 1024 * 1024 {
            return Err(invalid("audit.max_result_bytes", "must be at most 64 MiB"));
        }
        let Some(k) = &self.kafka else {
            return Ok(());
        };
        if k.brokers.is_empty() {
            return Err(invalid(
                "audit.kafka.brokers",
                "must name at least one broker",
            ));
        }
        if k.topic.is_empty() {
            return Err(invalid("audit.kafka.topic", "must not be empty"));
        }
        if !(65_536..=crate::audit::kafka::MAX_RECORD_BYTES).contains(&k.max_record_bytes) {
            return Err(invalid(
                "audit.kafka.max_record_bytes",
                "must be at least 65536 and at most 134217728 (128 MiB)",
            ));
        }
        if k.spool_max_bytes < 1024 * 1024 {
            return Err(invalid(
                "audit.kafka.spool_max_bytes",
                "must be at least 1 MiB",
            ));
        }
        if k.max_in_flight_records == 0 {
            return Err(invalid(
                "audit.kafka.max_in_flight_records",
                "must be at least 1",
            ));
        }
        for key in k.overrides.keys() {
            if KAFKA_RESERVED.contains(&key.as_str()) {
                return Err(invalid(
                    format!("audit.kafka.overrides.{key:?}"),
                    "is set by Vigil (idempotence, ordering, delivery until acknowledged); use the typed setting or leave it",
                ));
            }
        }
        Ok(())
    }
}

impl CoordinatorConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        if !self.endpoints.is_empty() && self.cluster_token.is_none() {
            return Err(invalid(
                "coordinator.cluster_token",
                "is required when coordinator.endpoints are given",
            ));
        }
        if self.timeout_secs == 0 {
            return Err(invalid("coordinator.timeout_secs", "must be at least 1"));
        }
        if self.ca_file.is_some() && self.endpoints.is_empty() {
            return Err(invalid(
                "coordinator.ca_file",
                "applies to coordinator.endpoints only (the embedded member serves plaintext)",
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
[node]
id = "n1"
data_dir = "/tmp/x"
[identity]
issuer = "http://127.0.0.1:1"
audiences = ["urn:vigil:gateway"]
[postgres]
listen = "127.0.0.1:0"
[[postgres.connections]]
name = "app"
host = "127.0.0.1"
database = "app"
user = "gw"
password = { env = "PW" }
allow = { groups = ["dba"] }
"#;

    fn parse(text: &str) -> Result<Config, String> {
        let c: Config = toml::from_str(text).map_err(|e| e.to_string())?;
        c.validate().map_err(|e| e.to_string())?;
        Ok(c)
    }

    /// GOOD, its audiences those of agents, the console's and `vigil login`'s, with `more`.
    fn people_and_agents(more: &str) -> String {
        GOOD.replace(
            "audiences = [\"urn:vigil:gateway\"]",
            "audiences = [\"urn:vigil:gateway\", \"vigil-cli\", \"vigil-console\", \"vigil-saml\"]\n[identity.tokens]\nissuer = \"https://vigil/tokens\"\nsigning_key = { file = \"k.pem\" }\nkey_id = \"k1\"",
        ) + more
    }

    const CONSOLE: &str = "\n[console]\nlisten = \"127.0.0.1:0\"\nclient_id = \"vigil-console\"\npublic_url = \"https://vigil.example\"\n";
    const LOGIN: &str =
        "\n[api]\nlisten = \"127.0.0.1:0\"\n[api.login]\nclient_id = \"vigil-cli\"\n";
    const SAML: &str = "\n[identity.saml]\nidp_metadata = \"idp.xml\"\n";

    /// The embedded coordinator takes operators' tokens only for the audiences people's tokens
    /// carry: by default the console's, `vigil login`'s (ID tokens) and the SAML tokens',
    /// never the gateway's; a list of one's own must hold what the console sends.
    #[test]
    fn the_embedded_coordinator_takes_people_not_agents_as_operators() {
        assert!(parse(GOOD).unwrap().operator_audiences().is_empty());
        let both = parse(&people_and_agents(&format!("{CONSOLE}{LOGIN}{SAML}"))).unwrap();
        assert_eq!(both.operator_audiences(), ["vigil-console", "vigil-cli"]);
        let saml_own =
            people_and_agents(&format!("{CONSOLE}{SAML}token_audience = \"vigil-saml\"\n"));
        assert_eq!(
            parse(&saml_own).unwrap().operator_audiences(),
            ["vigil-console", "vigil-saml"]
        );
        let access = format!("{LOGIN}token = \"access_token\"\n");
        assert!(parse(&people_and_agents(&access))
            .unwrap()
            .operator_audiences()
            .is_empty());
        let listed = |list: &str, more: &str| {
            parse(&people_and_agents(&format!(
                "{more}\n[coordinator]\noperator_audiences = {list}\n"
            )))
        };
        assert_eq!(
            listed("[\"vigil-cli\"]", "").unwrap().operator_audiences(),
            ["vigil-cli"]
        );
        let e = listed("[\"vigil-cli\"]", CONSOLE).unwrap_err();
        assert!(
            e.contains("coordinator.operator_audiences") && e.contains("console.client_id"),
            "{e}"
        );
        let e = listed(
            "[\"vigil-console\"]",
            &format!("{CONSOLE}{SAML}token_audience = \"vigil-saml\"\n"),
        )
        .unwrap_err();
        assert!(e.contains("identity.saml.token_audience"), "{e}");
        // The token endpoint's audience (workloads') is never an operator's.
        let workload = |aud: &str, more: &str| {
            parse(&people_and_agents(&format!(
                "{CONSOLE}{SAML}workload_audience = \"{aud}\"\n{more}"
            )))
        };
        assert!(workload("urn:vigil:gateway", "").is_ok());
        for people in ["vigil-console", "vigil-saml"] {
            let e = workload(people, "token_audience = \"vigil-saml\"\n").unwrap_err();
            assert!(
                e.contains("identity.saml.workload_audience") && e.contains("not a person's"),
                "{e}"
            );
        }
        let e = workload(
            "vigil-cli",
            "\n[coordinator]\noperator_audiences = [\"vigil-console\", \"vigil-cli\"]\n",
        )
        .unwrap_err();
        assert!(
            e.contains("identity.saml.workload_audience") && e.contains("not an approver's"),
            "{e}"
        );
        let e = workload("elsewhere", "").unwrap_err();
        assert!(e.contains("must be one of identity.audiences"), "{e}");
        let e = listed("[\"elsewhere\"]", "").unwrap_err();
        assert!(e.contains("not one of identity.audiences"), "{e}");
        let remote = "\n[coordinator]\nendpoints = [\"10.0.0.1:7470\"]\ncluster_token = { env = \"T\" }\noperator_audiences = [\"vigil-cli\"]\n";
        let e = parse(&people_and_agents(remote)).unwrap_err();
        assert!(e.contains("embedded coordinator only"), "{e}");
    }

    /// A SAML subject names a person: a transient NameID format cannot be asked for; the
    /// person key is named for both kinds of identity or for neither.
    #[test]
    fn saml_asks_for_a_lasting_name_and_names_the_person_like_oidc() {
        let with = |more: &str| parse(&people_and_agents(&format!("{CONSOLE}{SAML}{more}")));
        let c = with("").unwrap();
        assert_eq!(
            c.identity.saml.unwrap().name_id_format,
            "urn:oasis:names:tc:SAML:2.0:nameid-format:persistent"
        );
        for format in ["", "urn:oasis:names:tc:SAML:2.0:nameid-format:transient"] {
            let e = with(&format!("name_id_format = \"{format}\"\n")).unwrap_err();
            assert!(e.contains("identity.saml.name_id_format"), "{e}");
        }
        let e = with("person_attribute = \"mail\"\n").unwrap_err();
        assert!(e.contains("identity.claims.person"), "{e}");
        let claims = "[identity.claims]\nperson = \"email\"\n";
        let e = parse(&people_and_agents(&format!("{CONSOLE}\n{claims}{SAML}"))).unwrap_err();
        assert!(e.contains("identity.saml.person_attribute"), "{e}");
        let both = format!("{CONSOLE}\n{claims}{SAML}person_attribute = \"mail\"\n");
        let c = parse(&people_and_agents(&both)).unwrap();
        assert_eq!(c.identity.claims.person.as_deref(), Some("email"));
    }

    /// A node serves the protocols whose sections are present; with none there is nothing
    /// to serve, and it says so.
    #[test]
    fn a_node_without_a_protocol_section_is_refused() {
        let none = &GOOD[..GOOD.find("[postgres]").unwrap()];
        let e = parse(none).unwrap_err();
        assert!(e.contains("no protocol server is configured"), "{e}");
    }

    /// A people's login whose token the node would refuse is caught at load, naming the key.
    #[test]
    fn a_login_for_people_must_yield_a_token_the_node_accepts() {
        let with = |login: &str| format!("{GOOD}\n[api]\nlisten = \"127.0.0.1:0\"\n{login}");
        let e = parse(&with("[api.login]\nclient_id = \"vigil-cli\"")).unwrap_err();
        assert!(
            e.contains("api.login.client_id") && e.contains("audiences"),
            "{e}"
        );
        let ok = GOOD.replace(
            "\"urn:vigil:gateway\"]",
            "\"urn:vigil:gateway\", \"vigil-cli\"]",
        );
        let login = "[api.login]\nclient_id = \"vigil-cli\"";
        let c = parse(&format!("{ok}\n[api]\nlisten = \"127.0.0.1:0\"\n{login}")).unwrap();
        let answer = c.api.as_ref().unwrap().login_answer(&c.identity).unwrap();
        assert_eq!(answer["token"], "id_token");
        assert_eq!(answer["issuer"], "http://127.0.0.1:1");
        let e = parse(&format!(
            "{ok}\n[api]\nlisten = \"127.0.0.1:0\"\n{login}\nscopes = [\"profile\"]"
        ))
        .unwrap_err();
        assert!(e.contains("openid"), "{e}");
        let e = parse(
            &with("[api.login]\nclient_id = \"vigil-cli\"\ntoken = \"access_token\"")
                .replace("[identity]", "[identity]\ntoken_types = [\"id_token\"]"),
        )
        .unwrap_err();
        assert!(e.contains("api.login.token"), "{e}");
        parse(&with(
            "[api.login]\nclient_id = \"vigil-cli\"\ntoken = \"access_token\"",
        ))
        .unwrap();
    }

    #[test]
    fn a_good_config_loads_with_defaults() {
        let c = parse(GOOD).unwrap();
        assert_eq!(c.identity.leeway_secs, 30);
        assert_eq!(c.postgres.as_ref().unwrap().connections[0].port, 5432);
        assert_eq!(c.audit_dir(), PathBuf::from("/tmp/x/audit"));
    }

    #[test]
    fn errors_name_the_key() {
        let e = parse(&GOOD.replace("host = ", "hots = ")).unwrap_err();
        assert!(e.contains("hots"), "{e}");
        let e = parse(&GOOD.replace("allow = { groups = [\"dba\"] }", "allow = {}")).unwrap_err();
        assert!(e.contains("postgres.connections[0].allow"), "{e}");
        let e = parse(&GOOD.replace("[\"urn:vigil:gateway\"]", "[]")).unwrap_err();
        assert!(e.contains("identity.audiences"), "{e}");
        let leeway = |secs: u32| {
            parse(&GOOD.replace(
                "audiences = [",
                &format!("leeway_secs = {secs}\naudiences = ["),
            ))
        };
        leeway(300).unwrap();
        let e = leeway(301).unwrap_err();
        assert!(e.contains("identity.leeway_secs"), "{e}");
        let e = parse(&GOOD.replace("\"127.0.0.1:0\"", "\"nowhere\"")).unwrap_err();
        assert!(e.contains("listen"), "{e}");
        let e = parse(
            &GOOD
                .replace("algorithms", "x")
                .replace("audiences = [", "algorithms = [\"HS256\"]\naudiences = ["),
        )
        .unwrap_err();
        assert!(e.contains("HS256"), "{e}");
        let preauth = |keys: &str| {
            parse(&GOOD.replace(
                "listen = \"127.0.0.1:0\"",
                &format!("listen = \"127.0.0.1:0\"\n{keys}"),
            ))
        };
        let e = preauth("max_frame_bytes = 4096\nmax_preauth_message_bytes = 8192").unwrap_err();
        assert!(e.contains("postgres.max_preauth_message_bytes"), "{e}");
        let e = preauth("max_unauthenticated_connections = 0").unwrap_err();
        assert!(
            e.contains("postgres.max_unauthenticated_connections"),
            "{e}"
        );
        let c = preauth("").unwrap();
        assert_eq!(c.postgres.as_ref().unwrap().preauth_message_limit(), 16384);
        let c = preauth("max_frame_bytes = 4096").unwrap();
        assert_eq!(c.postgres.as_ref().unwrap().preauth_message_limit(), 4096);
        assert_eq!(
            c.postgres.as_ref().unwrap().max_unauthenticated_connections,
            256
        );
    }

    #[test]
    fn the_commented_example_in_deploy_loads() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/vigil-node.toml");
        Config::load(&path).unwrap_or_else(|e| panic!("{}", crate::error_chain(&e)));
    }

    #[test]
    fn policy_rules_are_checked() {
        let dup = format!("{GOOD}\n[[policy.rules]]\nid = \"a\"\naction = \"block\"\n[[policy.rules]]\nid = \"a\"\naction = \"allow\"\n");
        assert!(parse(&dup).unwrap_err().contains("policy.rules[1].id"));
        let conn = format!(
            "{GOOD}\n[[policy.rules]]\nid = \"a\"\naction = \"block\"\nconnections = [\"nope\"]\n"
        );
        assert!(parse(&conn)
            .unwrap_err()
            .contains("policy.rules[0].connections"));
        let flag = format!("{GOOD}\n[[policy.rules]]\nid = \"a\"\naction = \"block\"\nflags = [\"delete_everything\"]\n");
        assert!(parse(&flag).unwrap_err().contains("delete_everything"));
    }

    #[test]
    fn kafka_overrides_that_break_the_guarantees_are_refused() {
        let ok = format!("{GOOD}\n[audit.kafka]\nbrokers = [\"127.0.0.1:9092\"]\ntopic = \"audit\"\ncompression = \"zstd\"\noverrides = {{ \"socket.keepalive.enable\" = \"true\" }}\n");
        let c = parse(&ok).unwrap();
        assert_eq!(c.audit.kafka.unwrap().compression, Compression::Zstd);
        for key in [
            "enable.idempotence",
            "acks",
            "max.in.flight.requests.per.connection",
            "message.timeout.ms",
        ] {
            let bad = format!("{GOOD}\n[audit.kafka]\nbrokers = [\"b:1\"]\ntopic = \"t\"\noverrides = {{ \"{key}\" = \"1\" }}\n");
            let e = parse(&bad).unwrap_err();
            assert!(
                e.contains(&format!("audit.kafka.overrides.\"{key}\"")),
                "{e}"
            );
        }
        let snappy = format!(
            "{GOOD}\n[audit.kafka]\nbrokers = [\"b:1\"]\ntopic = \"t\"\ncompression = \"snappy\"\n"
        );
        assert!(parse(&snappy).unwrap_err().contains("snappy"));
    }

    #[test]
    fn approval_rules_need_their_settings() {
        let bare = format!("{GOOD}\n[[policy.rules]]\nid = \"a\"\naction = \"require_approval\"\n");
        assert!(parse(&bare)
            .unwrap_err()
            .contains("policy.rules[0].approval"));
        let own = format!("{bare}approval = {{ approvers = \"dba\" }}\n");
        let c = parse(&own).unwrap();
        let spec = c.policy.rules[0].approval.clone().unwrap();
        assert_eq!(
            (spec.required, spec.ttl_secs, spec.wait_secs),
            (1, 3600, 30)
        );
        let wide = format!("{GOOD}\n[policy.approval]\napprovers = \"dba\"\nrequired = 0\n");
        assert!(parse(&wide)
            .unwrap_err()
            .contains("policy.approval.required"));
        let remote = format!("{GOOD}\n[coordinator]\nendpoints = [\"127.0.0.1:1\"]\n");
        assert!(parse(&remote)
            .unwrap_err()
            .contains("coordinator.cluster_token"));
        let embedded_tls = format!("{GOOD}\n[coordinator]\nca_file = \"/etc/vigil/ca.pem\"\n");
        assert!(parse(&embedded_tls)
            .unwrap_err()
            .contains("coordinator.ca_file"));
    }

    /// A member file: `[member.tls]` needs its three files; retention is at least a second.
    #[test]
    fn a_member_file_takes_tls_retention_and_metrics() {
        let base = "[member]\nid = 1\nlisten = \"127.0.0.1:7470\"\ndata_dir = \"/tmp/m\"\n\
                    cluster_token = { env = \"T\" }\nretention_secs = 60\n\
                    metrics_listen = \"127.0.0.1:9470\"\n";
        let tls =
            "[member.tls]\ncert_file = \"m.pem\"\nkey_file = \"m.key\"\nca_file = \"ca.pem\"\n";
        let f: CoordinatorFile = toml::from_str(&format!("{base}{tls}")).unwrap();
        f.validate().unwrap();
        assert_eq!(f.member.retention_secs, 60);
        assert_eq!(f.member.tls.unwrap().ca_file, PathBuf::from("ca.pem"));
        let partial = format!("{base}[member.tls]\ncert_file = \"m.pem\"\n");
        assert!(toml::from_str::<CoordinatorFile>(&partial).is_err());
        let f: CoordinatorFile =
            toml::from_str(&base.replace("retention_secs = 60", "retention_secs = 0")).unwrap();
        assert!(f
            .validate()
            .unwrap_err()
            .to_string()
            .contains("member.retention_secs"));
    }

    /// The cluster's tokens need EdDSA and access tokens wherever they are verified (a node or
    /// a coordinator member); a member serves no SAML sign-in.
    #[test]
    fn the_clusters_tokens_are_checked_on_nodes_and_members() {
        let tokens = "[identity.tokens]\nissuer = \"https://vigil.example/tokens\"\n\
                      signing_key = { env = \"K\" }\nkey_id = \"k1\"\n";
        let member = "[member]\nid = 1\nlisten = \"127.0.0.1:7470\"\ndata_dir = \"/tmp/m\"\n\
                      cluster_token = { env = \"T\" }\n\
                      [identity]\nissuer = \"https://idp.example\"\naudiences = [\"a\"]\n";
        let f: CoordinatorFile = toml::from_str(&format!("{member}{tokens}")).unwrap();
        f.validate().unwrap();
        let rsa_only = member.replace(
            "audiences = [\"a\"]\n",
            "audiences = [\"a\"]\nalgorithms = [\"RS256\"]\n",
        );
        let f: CoordinatorFile = toml::from_str(&format!("{rsa_only}{tokens}")).unwrap();
        let e = f.validate().unwrap_err().to_string();
        assert!(e.contains("identity.tokens") && e.contains("EdDSA"), "{e}");
        let saml = "[identity.saml]\nidp_metadata = \"idp.xml\"\n";
        let f: CoordinatorFile = toml::from_str(&format!("{member}{tokens}{saml}")).unwrap();
        let e = f.validate().unwrap_err().to_string();
        assert!(e.contains("identity.saml"), "{e}");
        let f: CoordinatorFile = toml::from_str(&format!(
            "{member}{}",
            tokens.replace("https://vigil.example/tokens", "https://idp.example")
        ))
        .unwrap();
        let e = f.validate().unwrap_err().to_string();
        assert!(e.contains("identity.tokens.issuer"), "{e}");
    }

    #[test]
    fn a_missing_secret_names_its_key() {
        let mut c = parse(GOOD).unwrap();
        c.postgres.as_mut().unwrap().connections[0].password =
            Some(SecretRef::Env("VIGIL_TEST_UNSET_PW".into()));
        let e = c
            .postgres
            .as_ref()
            .unwrap()
            .targets()
            .unwrap_err()
            .to_string();
        assert!(e.contains("postgres.connections[0].password"), "{e}");
    }
}
